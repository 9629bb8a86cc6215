//! block device.
