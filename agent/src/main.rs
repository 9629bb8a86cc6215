//! `jevm-agent`: PID 1 of a jevm guest. It mounts the API file systems,
//! reaps orphans, tells the host over vsock that it is ready, and answers
//! host requests (see `jevm_protocol`).
//!
//! Run as any other PID (development) it skips mounting and rebooting and
//! only serves.
//!
//! PID 1 must never exit or panic: the kernel panics when init dies. Every
//! failure is therefore logged and survived, and input from the host is
//! handled without `unwrap`.

mod container;
mod handler;
mod identity;
mod init;
mod logger;
mod network;
mod reaper;
mod server;
mod system;
mod vsock;
mod workers;

use jevm_protocol::AGENT_PORT;
use log::{error, warn};
use std::sync::Arc;
use system::System;

/// One malloc arena for all of the agent's threads. glibc gives a thread
/// that allocates an arena of its own, up to 8 per CPU; in a clone each new
/// arena is fresh pages, each a nested page fault, for a control plane
/// whose threads seldom allocate at once. Measured in the KVM test host
/// (`MALLOC_ARENA_MAX=1` on the guest's command line): 50-70 fewer page
/// faults per create. Before any thread exists.
fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter; no other thread
    // exists yet to allocate concurrently.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        warn!("mallopt(M_ARENA_MAX, 1) failed; threads keep arenas of their own");
    }
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some(container::plan::INIT_ARG) => container::init::main(),
        Some(container::zygote::ZYGOTE_ARG) => container::zygote::serve(container::init::main),
        _ => {}
    }
    let pid1 = std::process::id() == 1;
    logger::init();
    one_malloc_arena();

    // Before any thread exists, so every thread inherits the blocked mask.
    if let Err(e) = reaper::block_sigchld() {
        error!("blocking SIGCHLD: {e}; zombies will not be reaped");
    }
    if pid1 {
        init::mount_api_filesystems();
    }
    if let Err(e) = reaper::spawn() {
        error!("starting the reaper thread: {e}; zombies will not be reaped");
    }

    let system = Arc::new(System::new(pid1));
    let containers = match container::Service::guest() {
        Ok(service) => Arc::new(service),
        Err(e) => {
            error!("starting the container service: {e}");
            if !pid1 {
                std::process::exit(1);
            }
            system.power_off();
            park_forever();
        }
    };
    let listener = match server::listen() {
        Ok(listener) => listener,
        Err(e) => {
            error!("listening on vsock port {AGENT_PORT}: {e}");
            if !pid1 {
                std::process::exit(1);
            }
            // A guest the host cannot reach is useless: stopping it now
            // fails the VM start at once rather than at the host's timeout.
            system.power_off();
            park_forever();
        }
    };
    server::announce_ready();
    server::serve(listener, system, containers)
}

/// What PID 1 does when there is nothing left to do but must not exit.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod test_skip;
