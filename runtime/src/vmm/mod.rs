//! The virtual machine monitor: guest memory, vCPUs, boot, devices.
//!
//! `vm.rs` ties the parts together; `boot.rs` + `mptable.rs` + `layout.rs`
//! describe what the guest finds in memory; `vcpu.rs` runs the vCPUs;
//! `bus.rs` routes their I/O exits to `devices/`; `ahead.rs` makes the
//! next VM's KVM VM before it is needed.

pub mod ahead;
pub mod boot;
pub mod bus;
pub mod check;
pub mod copies;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod vcpu;
pub mod vm;

pub use vcpu::StopReason;
pub use vm::{DiskConfig, RestoreConfig, Vm, VmConfig, VmError, VmState};
