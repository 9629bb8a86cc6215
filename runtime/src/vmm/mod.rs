//! The virtual machine monitor: guest memory, vCPUs, boot, devices.

pub mod devices;
