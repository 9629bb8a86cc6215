//! serial device.
