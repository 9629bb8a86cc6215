//! vsock device.
