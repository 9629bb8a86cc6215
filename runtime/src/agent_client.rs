//! Client for the in-guest agent.
