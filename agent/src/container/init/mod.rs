//! The `container-init` stage: builds a container (or joins one, for exec)
//! from an [`InitPlan`](super::plan::InitPlan) and `execve`s its process.
//! See `super::plan` for the conversation with the agent.

/// Entry point when the agent binary runs as `jevm-agent container-init`.
pub fn main() -> ! {
    eprintln!("container-init: not built yet");
    std::process::exit(1)
}
