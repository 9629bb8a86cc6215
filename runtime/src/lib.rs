//! jevm runtime: the VMM that boots (and, later, clones) a microVM, and the
//! client that talks to the agent inside it.
//!
//! Data flow: [`microvm::MicroVm::boot`] listens for the agent's READY and
//! starts a [`vmm::Vm`] (guest memory, kernel, vCPUs, devices); the agent in
//! the guest dials the host through virtio-vsock; [`agent_client`] then
//! connects over the same vsock Unix socket to send requests.

pub mod agent_client;
pub mod clone;
pub mod jail;
pub mod microvm;
pub mod template;
#[cfg(test)]
#[path = "../../agent/src/test_skip.rs"]
mod test_skip;
pub mod vmm;
