//! Namespaces: created or joined per the spec (create), or joined from the
//! container's init (exec); the fork that makes the container's process
//! PID 1 of a new PID namespace.
//!
//! User namespaces follow runc: namespaces given by path are joined first
//! (the user namespace in the middle, see [`join_all`]); then a new user
//! namespace is created on its own, its uid/gid maps written from outside
//! by a short-lived helper that stays in the parent user namespace (a
//! process inside cannot map more than its own id), and the stage becomes
//! root in it; only then are the other new namespaces created, so that they
//! are owned by the user namespace.

use super::errors::{errno_desc, io_err, os_err};
use super::premade;
use super::sync::Sync;
use crate::container::plan::StageMsg;
use anyhow::{anyhow, bail, Result};
use nix::errno::Errno;
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Gid, Pid, Uid};
use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, Spec};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
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

/// The uid and gid maps of a user namespace to create, as written to
/// `/proc/<pid>/{uid,gid}_map`.
struct IdMaps {
    uid: String,
    gid: String,
}

pub struct Plan {
    join: Vec<Join>,
    create: CloneFlags,
    /// Set when `create` holds CLONE_NEWUSER.
    maps: Option<IdMaps>,
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
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        // The guest has no clocks to offset.
        LinuxNamespaceType::Time => return None,
    })
}

/// `linux.uidMappings`/`gidMappings` in the kernel's map format: one
/// `<inside> <outside> <count>` line per range.
fn map_text(mappings: &[LinuxIdMapping]) -> String {
    mappings
        .iter()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect()
}

impl Plan {
    pub fn from_spec(spec: &Spec) -> Result<Plan> {
        let mut plan = Plan {
            join: Vec::new(),
            create: CloneFlags::empty(),
            maps: None,
        };
        let linux = spec.linux().as_ref();
        let namespaces = linux
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
        let uid_maps = linux
            .and_then(|l| l.uid_mappings().as_deref())
            .unwrap_or_default();
        let gid_maps = linux
            .and_then(|l| l.gid_mappings().as_deref())
            .unwrap_or_default();
        if !plan.has(CloneFlags::CLONE_NEWUSER) {
            if !uid_maps.is_empty() || !gid_maps.is_empty() {
                bail!("user namespace mappings specified, but user namespace isn't enabled in the config");
            }
        } else if plan.create.contains(CloneFlags::CLONE_NEWUSER) {
            // Mappings beside a path describe the namespace joined (CRI
            // writes them in every container of a pod); only a new
            // namespace needs them.
            for (key, maps) in [("uidMappings", uid_maps), ("gidMappings", gid_maps)] {
                if maps.is_empty() {
                    bail!("namespace \"user\": linux.{key} is empty (a new user namespace needs uid and gid mappings)");
                }
            }
            plan.maps = Some(IdMaps {
                uid: map_text(uid_maps),
                gid: map_text(gid_maps),
            });
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

    /// The container runs in a user namespace other than the guest's (new
    /// or joined): privileged set-up (raising rlimits, device nodes) must
    /// happen before, or differently.
    pub fn user_namespace(&self) -> bool {
        self.has(CloneFlags::CLONE_NEWUSER)
    }

    pub fn enter(&self) -> Result<()> {
        // Namespaces made ahead serve as new ones only outside a user
        // namespace, which must own the namespaces created in it.
        let premade = premade::entered();
        let kept = if self.user_namespace() {
            CloneFlags::empty()
        } else {
            premade & self.create
        };
        premade::leave(premade - kept)?;
        let joined_user = join_all(&self.join)?;
        if let Some(maps) = &self.maps {
            new_user_namespace(maps)?;
            become_root_uid()?;
        }
        unshare(self.create - CloneFlags::CLONE_NEWUSER - kept)
            .map_err(|e| os_err("create namespaces", e))?;
        if joined_user || self.maps.is_some() {
            become_root_gid()?;
        }
        if self.create.contains(CloneFlags::CLONE_NEWNET)
            && !kept.contains(CloneFlags::CLONE_NEWNET)
        {
            // runc brings the loopback interface of a new network namespace
            // up, so a container can reach 127.0.0.1 without CNI.
            loopback_up().map_err(|e| io_err("bring up the loopback interface lo", &e))?;
        }
        Ok(())
    }
}

/// Joins `joins` as runc does: every namespace but the user one first
/// (while the stage still has the guest's root privileges, so namespaces
/// owned by the guest's user namespace can be joined), then the user
/// namespace, becoming root in it, then whatever was refused before
/// (namespaces only the user namespace's root may join). A namespace the
/// stage is already in is skipped: re-entering one's own user namespace is
/// refused. True when a user namespace was joined.
fn join_all(joins: &[Join]) -> Result<bool> {
    // Decided before any join: /proc/self moves with the mount namespace.
    let joins: Vec<&Join> = joins.iter().filter(|j| !is_current(j)).collect();
    let is_user = |j: &&&Join| j.flag == CloneFlags::CLONE_NEWUSER;
    let mut pending: Vec<&Join> = Vec::new();
    for j in joins.iter().filter(|j| !is_user(j)) {
        match setns(j.file.as_fd(), j.flag) {
            Ok(()) => {}
            Err(Errno::EPERM) => pending.push(j),
            Err(e) => return Err(join_err(j, e)),
        }
    }
    let mut joined_user = false;
    for j in joins.iter().filter(is_user) {
        setns(j.file.as_fd(), j.flag).map_err(|e| join_err(j, e))?;
        become_root_uid()?;
        joined_user = true;
    }
    for j in pending {
        setns(j.file.as_fd(), j.flag).map_err(|e| join_err(j, e))?;
    }
    Ok(joined_user)
}

fn join_err(j: &Join, e: Errno) -> anyhow::Error {
    os_err(format!("join namespace {:?} ({})", j.name, j.path), e)
}

/// Whether the stage is in `j`'s namespace already (unknown: no).
fn is_current(j: &Join) -> bool {
    let kind = match j.flag {
        CloneFlags::CLONE_NEWUSER => "user",
        CloneFlags::CLONE_NEWNS => "mnt",
        CloneFlags::CLONE_NEWNET => "net",
        CloneFlags::CLONE_NEWPID => "pid",
        CloneFlags::CLONE_NEWIPC => "ipc",
        CloneFlags::CLONE_NEWUTS => "uts",
        CloneFlags::CLONE_NEWCGROUP => "cgroup",
        _ => return false,
    };
    match (
        std::fs::metadata(format!("/proc/self/ns/{kind}")),
        j.file.metadata(),
    ) {
        (Ok(ours), Ok(theirs)) => (ours.dev(), ours.ino()) == (theirs.dev(), theirs.ino()),
        _ => false,
    }
}

/// Creates a user namespace for the stage and has its maps written. A
/// process inside a new user namespace may only map its own id, so a child
/// forked beforehand, still in the parent namespace with the guest's root
/// privileges, writes them (as runc's parent does), uid_map first.
/// setgroups(2) stays allowed, as runc leaves it when run as root.
fn new_user_namespace(maps: &IdMaps) -> Result<()> {
    let (go_read, go_write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| os_err("pipe", e))?;
    let (err_read, err_write) =
        pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| os_err("pipe", e))?;
    let stage = nix::unistd::getpid();
    // SAFETY: the stage is single-threaded (it was just exec'd and starts no
    // threads), so the child may run any code; it only writes two files and
    // exits.
    match unsafe { fork() }.map_err(|e| os_err("user namespace: fork the map writer", e))? {
        ForkResult::Child => {
            drop((go_write, err_read));
            let code = match write_maps(stage, go_read, maps) {
                Ok(()) => 0,
                Err(e) => {
                    let _ = File::from(err_write).write_all(format!("{e:#}").as_bytes());
                    1
                }
            };
            std::process::exit(code)
        }
        ForkResult::Parent { child } => {
            drop((go_read, err_write));
            let unshared = unshare(CloneFlags::CLONE_NEWUSER);
            let mut go = File::from(go_write);
            if unshared.is_ok() {
                // A failed write shows as the writer's exit status below.
                let _ = go.write_all(b"1");
            }
            drop(go);
            let mut message = String::new();
            let _ = File::from(err_read).read_to_string(&mut message);
            let status = loop {
                match waitpid(child, None) {
                    Err(Errno::EINTR) => continue,
                    other => break other,
                }
            };
            unshared.map_err(|e| os_err("create user namespace", e))?;
            match status {
                Ok(WaitStatus::Exited(_, 0)) => Ok(()),
                _ if !message.is_empty() => Err(anyhow!("user namespace: {message}")),
                other => Err(anyhow!(
                    "user namespace: the map writer ended with {other:?}"
                )),
            }
        }
    }
}

/// The writer's side of [`new_user_namespace`]: waits for the stage to be
/// in its new namespace (EOF: it failed to get there; nothing to do).
fn write_maps(stage: Pid, go: OwnedFd, maps: &IdMaps) -> Result<()> {
    let mut byte = [0u8; 1];
    let mut go = File::from(go);
    loop {
        match go.read(&mut byte) {
            Ok(0) => return Ok(()),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("waiting for the stage", &e)),
        }
    }
    for (file, text) in [("uid_map", &maps.uid), ("gid_map", &maps.gid)] {
        let path = format!("/proc/{stage}/{file}");
        let fail = |e: &std::io::Error| io_err(format!("write {path} ({:?})", text.trim_end()), e);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| fail(&e))?;
        // The kernel takes a map in one write(2) only.
        let n = f.write(text.as_bytes()).map_err(|e| fail(&e))?;
        if n != text.len() {
            bail!("write {path}: short write ({n} of {} bytes)", text.len());
        }
    }
    Ok(())
}

/// Root of the user namespace just created or joined, as runc's init
/// becomes it: files the stage creates (mount points, device binds) belong
/// to the container's root, and the spec's user is set from there. Like
/// runc, the uid right away and the gid once the other namespaces exist
/// (what they create at birth, such as the root of the IPC namespace's
/// mqueue, keeps the guest's gid, unmapped: runc's containers see
/// `/dev/mqueue` as `0:65534` too). Needs uid and gid 0 mapped.
fn become_root_uid() -> Result<()> {
    let root = Uid::from_raw(0);
    nix::unistd::setresuid(root, root, root).map_err(|e| not_root("uid", e))
}

/// The gid half of [`become_root_uid`], and no supplementary groups.
fn become_root_gid() -> Result<()> {
    let root = Gid::from_raw(0);
    nix::unistd::setresgid(root, root, root).map_err(|e| not_root("gid", e))?;
    nix::unistd::setgroups(&[]).map_err(|e| os_err("user namespace: become root: setgroups []", e))
}

fn not_root(what: &str, e: Errno) -> anyhow::Error {
    let hint = if e == Errno::EINVAL {
        format!(" ({what} 0 is not mapped)")
    } else {
        String::new()
    };
    anyhow!(
        "user namespace: become root: set{what} 0: {}{hint}",
        errno_desc(e)
    )
}

/// `ip link set lo up` in the current network namespace.
pub(super) fn loopback_up() -> std::io::Result<()> {
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

/// The namespaces of a running container, opened for an exec to join.
pub struct Container {
    joins: Vec<Join>,
}

impl Container {
    /// Opens the namespaces of the container whose init is `init_pid`.
    pub fn open(init_pid: u32) -> Result<Container> {
        const KINDS: [(&str, CloneFlags); 7] = [
            ("user", CloneFlags::CLONE_NEWUSER),
            ("ipc", CloneFlags::CLONE_NEWIPC),
            ("uts", CloneFlags::CLONE_NEWUTS),
            ("net", CloneFlags::CLONE_NEWNET),
            ("pid", CloneFlags::CLONE_NEWPID),
            ("cgroup", CloneFlags::CLONE_NEWCGROUP),
            // Last: after it, /proc is the container's.
            ("mnt", CloneFlags::CLONE_NEWNS),
        ];
        let mut joins = Vec::new();
        for (name, flag) in KINDS {
            let path = format!("/proc/{init_pid}/ns/{name}");
            let file = File::open(&path).map_err(|e| io_err(format!("open {path}"), &e))?;
            let join = Join {
                name,
                path,
                file,
                flag,
            };
            // Re-entering a namespace one is already in is refused by some
            // kinds and pointless for all.
            if !is_current(&join) {
                joins.push(join);
            }
        }
        Ok(Container { joins })
    }

    /// The container has a user namespace of its own.
    pub fn user_namespace(&self) -> bool {
        self.joins
            .iter()
            .any(|j| j.flag == CloneFlags::CLONE_NEWUSER)
    }

    pub fn enter(&self) -> Result<()> {
        if join_all(&self.joins)? {
            become_root_gid()?;
        }
        Ok(())
    }
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
