//! mmio device.
