//! jevm runtime: the VMM that boots (and, later, clones) a microVM, and the
//! client that talks to the agent inside it.
//!
//! Data flow: [`vmm::Vm::start`] builds guest memory, loads the kernel,
//! creates the vCPUs and devices; the agent in the guest dials the host on
//! the READY port through virtio-vsock; [`agent_client::AgentClient`] then
//! connects over the same vsock Unix socket to send requests.

pub mod agent_client;
pub mod vmm;
