//! Namespaces made ahead: a network and an IPC namespace that the zygote
//! creates once, in the template before the snapshot, for the first
//! container of every clone.
//!
//! Creating a network namespace is the costliest step of a container's
//! set-up in a fresh clone: the kernel allocates and writes its per-namespace
//! tables (sysctls, proc entries, the loopback device, routing and socket
//! tables), and in a clone each page it touches for the first time is a copy
//! of the template's page or a fault through the hypervisor. Made in the
//! template, those pages are the template's, shared by every clone, and the
//! first container only joins them.
//!
//! The zygote holds the namespaces by fd for as long as it lives, and its
//! first spare stage sits in them while it waits. A stage that finds itself
//! in them ([`entered`]) keeps each one its spec asks to create (without a
//! user namespace: new namespaces must then be owned by it) and goes back to
//! the agent's for every other ([`leave`]), so it then starts from exactly
//! where a stage forked from the agent starts. A namespace left unused stays
//! held by the zygote rather than being torn down: the teardown would write
//! to the template's pages, which is the cost this avoids. Later spares do not
//! sit in them: each pair is used once.
//!
//! Only where the agent is PID 1 (the guest), since going back is joining
//! `/proc/1/ns/*`. The UTS namespace is not made ahead: a new one copies the
//! hostname, which a clone only receives after the snapshot. Nor the mount
//! namespace, which copies the mount table (the share and the container's
//! rootfs are mounted after the snapshot), nor the PID namespace, which is
//! cheap to create.

use super::errors::{io_err, os_err};
use anyhow::Result;
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicI32, Ordering};

/// The kinds made ahead, with their `/proc/<pid>/ns/` names.
const KINDS: [(CloneFlags, &str); 2] = [
    (CloneFlags::CLONE_NEWNET, "net"),
    (CloneFlags::CLONE_NEWIPC, "ipc"),
];

/// The kinds of namespace made ahead that this process sits in; set by
/// [`Premade::enter`] in the spare before it becomes a stage.
static ENTERED: AtomicI32 = AtomicI32::new(0);

/// The namespaces, held open by the zygote.
pub struct Premade {
    held: Vec<(CloneFlags, File)>,
}

impl Premade {
    /// Creates them, each as new as a container's (the loopback interface
    /// up, as the stage brings it up in a network namespace it creates), and
    /// takes the calling process back to where it was. An error after the
    /// `unshare` that could not take it back is fatal for the caller (the
    /// zygote exits, and the agent starts stages with `fork`+`execve`):
    /// every stage forked from it would start in the wrong namespaces.
    pub fn make() -> Result<Premade, (std::io::Error, bool)> {
        let mut flags = CloneFlags::empty();
        let mut originals = Vec::new();
        for (flag, name) in KINDS {
            let file =
                File::open(format!("/proc/thread-self/ns/{name}")).map_err(|e| (e, false))?;
            originals.push((flag, file));
            flags |= flag;
        }
        unshare(flags).map_err(|e| (e.into(), false))?;
        let made = (|| {
            super::namespaces::loopback_up()?;
            KINDS
                .iter()
                .map(|&(flag, name)| {
                    Ok((flag, File::open(format!("/proc/thread-self/ns/{name}"))?))
                })
                .collect::<std::io::Result<Vec<_>>>()
        })();
        for (flag, file) in &originals {
            setns(file.as_fd(), *flag).map_err(|e| (e.into(), true))?;
        }
        made.map(|held| Premade { held }).map_err(|e| (e, false))
    }

    /// Moves the calling process (a spare, before it runs the stage) into
    /// the namespaces. One that cannot be joined is not entered, and the
    /// stage creates its own as usual.
    pub fn enter(&self) {
        for (flag, file) in &self.held {
            if setns(file.as_fd(), *flag).is_ok() {
                ENTERED.fetch_or(flag.bits(), Ordering::Relaxed);
            }
        }
    }
}

/// The namespaces made ahead that this process sits in (empty for a stage
/// not started from the zygote's first spare).
pub fn entered() -> CloneFlags {
    CloneFlags::from_bits_truncate(ENTERED.load(Ordering::Relaxed))
}

/// Goes back from the namespaces made ahead of `kinds` to the agent's.
pub fn leave(kinds: CloneFlags) -> Result<()> {
    go_back(kinds, "/proc/1/ns")
}

/// [`leave`] for the namespaces in `dir`.
fn go_back(kinds: CloneFlags, dir: &str) -> Result<()> {
    for (flag, name) in KINDS {
        if !kinds.contains(flag) {
            continue;
        }
        let path = format!("{dir}/{name}");
        let file = File::open(&path).map_err(|e| io_err(format!("open {path}"), &e))?;
        setns(file.as_fd(), flag)
            .map_err(|e| os_err(format!("go back to the agent's {name} namespace"), e))?;
        ENTERED.fetch_and(!flag.bits(), Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ns_id(path: &str) -> (u64, u64) {
        let m = std::fs::metadata(path).unwrap();
        (m.dev(), m.ino())
    }

    /// A datagram to 127.0.0.1 goes out in the thread's network namespace
    /// only with `lo` up.
    fn lo_is_up() -> bool {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0");
        sock.is_ok_and(|s| s.connect(s.local_addr().unwrap()).is_ok() && s.send(b"x").is_ok())
    }

    /// Made on a thread of its own (network and IPC namespaces are per
    /// thread), which then goes in and back out, as the spare and the stage
    /// do.
    #[test]
    fn namespaces_made_ahead_are_new_with_lo_up_and_can_be_left() {
        if !nix::unistd::geteuid().is_root() {
            crate::test_skip::skipped("needs root to create namespaces");
            return;
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                let net = "/proc/thread-self/ns/net";
                let ipc = "/proc/thread-self/ns/ipc";
                let before = (ns_id(net), ns_id(ipc));
                let premade = match Premade::make() {
                    Ok(p) => p,
                    Err((e, _)) => {
                        crate::test_skip::skipped(&format!("unshare: {e}"));
                        return;
                    }
                };
                assert_eq!((ns_id(net), ns_id(ipc)), before, "make() went back");
                assert_eq!(entered(), CloneFlags::empty());

                premade.enter();
                assert_eq!(
                    entered(),
                    CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC
                );
                assert_ne!(ns_id(net), before.0);
                assert_ne!(ns_id(ipc), before.1);
                let held: Vec<_> = premade
                    .held
                    .iter()
                    .map(|(_, f)| f.metadata().unwrap().ino())
                    .collect();
                assert_eq!(held, vec![ns_id(net).1, ns_id(ipc).1]);
                assert!(lo_is_up(), "the loopback interface is up in the new one");

                // The process's main thread stands for the agent (PID 1 in
                // the guest; its /proc/1 may not be open to a test).
                let main = "/proc/self/ns";
                go_back(CloneFlags::CLONE_NEWNET, main).unwrap();
                assert_eq!(ns_id(net), before.0);
                assert_ne!(ns_id(ipc), before.1, "only the network one was left");
                assert_eq!(entered(), CloneFlags::CLONE_NEWIPC);
                go_back(CloneFlags::CLONE_NEWIPC, main).unwrap();
                assert_eq!(ns_id(ipc), before.1);
                assert_eq!(entered(), CloneFlags::empty());
            })
            .join()
            .unwrap()
        });
    }
}
