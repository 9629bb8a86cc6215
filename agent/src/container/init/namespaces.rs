//! Namespaces: created or joined per the spec (create), or joined from the
//! container's init (exec); the fork that makes the container's process
//! PID 1 of a new PID namespace.

use super::errors::{errno_desc, io_err, os_err};
use super::sync::Sync;
use crate::container::plan::StageMsg;
use anyhow::{bail, Result};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{fork, pipe2, ForkResult};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;

/// Which process continues after [`fork_child`] (or that there was none).
pub enum Forked {
    NotForked,
    Child,
}

struct Join {
    name: &'static str,
    path: String,
    file: File,
    flag: CloneFlags,
}

pub struct Plan {
    join: Vec<Join>,
    create: CloneFlags,
}

fn ns_name(typ: LinuxNamespaceType) -> &'static str {
    match typ {
        LinuxNamespaceType::Mount => "mount",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "network",
        LinuxNamespaceType::Time => "time",
    }
}

fn ns_flag(typ: LinuxNamespaceType) -> Option<CloneFlags> {
    Some(match typ {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        // The guest has no users to map from and no clocks to offset.
        LinuxNamespaceType::User | LinuxNamespaceType::Time => return None,
    })
}

impl Plan {
    pub fn from_spec(spec: &Spec) -> Result<Plan> {
        let mut plan = Plan {
            join: Vec::new(),
            create: CloneFlags::empty(),
        };
        let namespaces = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for ns in namespaces {
            let name = ns_name(ns.typ());
            let Some(flag) = ns_flag(ns.typ()) else {
                bail!("namespace {name:?}: not supported by jevm");
            };
            if plan.create.contains(flag) || plan.join.iter().any(|j| j.flag == flag) {
                bail!("namespace {name:?}: listed twice");
            }
            match ns.path() {
                Some(path) => {
                    let shown = path.display().to_string();
                    let file = File::open(path)
                        .map_err(|e| io_err(format!("namespace {name:?} path {shown:?}"), &e))?;
                    plan.join.push(Join {
                        name,
                        path: shown,
                        file,
                        flag,
                    });
                }
                None => plan.create |= flag,
            }
        }
        if !plan.has(CloneFlags::CLONE_NEWNS) {
            bail!("a mount namespace is required (the rootfs is pivoted into)");
        }
        // The mount namespace is joined last: its paths would hide the others.
        plan.join.sort_by_key(|j| j.flag == CloneFlags::CLONE_NEWNS);
        Ok(plan)
    }

    fn has(&self, flag: CloneFlags) -> bool {
        self.create.contains(flag) || self.join.iter().any(|j| j.flag == flag)
    }

    pub fn new_uts(&self) -> bool {
        self.create.contains(CloneFlags::CLONE_NEWUTS)
    }

    pub fn needs_fork(&self) -> bool {
        self.has(CloneFlags::CLONE_NEWPID)
    }

    pub fn enter(&self) -> Result<()> {
        for j in &self.join {
            setns(j.file.as_fd(), j.flag)
                .map_err(|e| os_err(format!("join namespace {:?} ({})", j.name, j.path), e))?;
        }
        unshare(self.create).map_err(|e| os_err("create namespaces", e))?;
        if self.create.contains(CloneFlags::CLONE_NEWNET) {
            // runc brings the loopback interface of a new network namespace
            // up, so a container can reach 127.0.0.1 without CNI.
            loopback_up().map_err(|e| io_err("bring up the loopback interface lo", &e))?;
        }
        Ok(())
    }
}

/// `ip link set lo up` in the current network namespace.
fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the interface named in `req` and writes
    // its flags into `req`, which lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Joins the namespaces of the running container whose init is `init_pid`.
pub fn join_container(init_pid: u32) -> Result<()> {
    const KINDS: [(&str, CloneFlags); 6] = [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        // Last: after it, /proc is the container's.
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let mut files = Vec::new();
    for (kind, flag) in KINDS {
        let path = format!("/proc/{init_pid}/ns/{kind}");
        let file = File::open(&path).map_err(|e| io_err(format!("open {path}"), &e))?;
        let ours = std::fs::metadata(format!("/proc/self/ns/{kind}"))
            .map_err(|e| io_err(format!("stat /proc/self/ns/{kind}"), &e))?;
        let theirs = file
            .metadata()
            .map_err(|e| io_err(format!("stat {path}"), &e))?;
        // Re-entering a namespace one is already in is refused by some
        // kinds and pointless for all.
        if (ours.dev(), ours.ino()) != (theirs.dev(), theirs.ino()) {
            files.push((path, file, flag));
        }
    }
    for (path, file, flag) in &files {
        setns(file.as_fd(), *flag).map_err(|e| os_err(format!("join namespace {path}"), e))?;
    }
    Ok(())
}

/// Forks the process that will `execve`. The parent reports the child's PID
/// (in the guest's root PID namespace) and exits; the child continues only
/// once that report is written, so the agent always reads `Pid` first.
pub fn fork_child(sync: &mut Sync) -> Result<Forked> {
    let (read_end, write_end) =
        pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| os_err("pipe", e))?;
    // SAFETY: the stage is single-threaded (it was just exec'd and starts no
    // threads), so the child may run any code.
    match unsafe { fork() }.map_err(|e| os_err("fork", e))? {
        ForkResult::Parent { child } => {
            drop(read_end);
            let pid = child.as_raw() as u32;
            if sync.send(&StageMsg::Pid { pid }).is_err() {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                std::process::exit(1);
            }
            drop(write_end);
            // The child is reparented to the agent, whose reaper collects it.
            std::process::exit(0)
        }
        ForkResult::Child => {
            drop(write_end);
            let mut read_end = File::from(read_end);
            let mut buf = [0u8; 1];
            // EOF: the parent reported the PID and is leaving.
            loop {
                match read_end.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => bail!("waiting for the stage's parent: {e}"),
                }
            }
            Ok(Forked::Child)
        }
    }
}

pub fn set_hostname(spec: &Spec, plan: &Plan) -> Result<()> {
    if let Some(name) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        if !plan.new_uts() {
            bail!("unable to set hostname without a private UTS namespace");
        }
        nix::unistd::sethostname(name).map_err(|e| os_err(format!("sethostname {name:?}"), e))?;
    }
    if let Some(name) = spec.domainname().as_deref().filter(|h| !h.is_empty()) {
        if !plan.new_uts() {
            bail!("unable to set domainname without a private UTS namespace");
        }
        // SAFETY: the pointer and length describe `name`, which outlives the call.
        let rc = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
        if rc != 0 {
            bail!(
                "setdomainname {name:?}: {}",
                errno_desc(nix::errno::Errno::last())
            );
        }
    }
    Ok(())
}
