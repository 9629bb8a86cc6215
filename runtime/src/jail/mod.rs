//! The VMM's jail: every thread that runs guest-facing code (vCPUs, device
//! workers) enters it before it touches guest input, and from then on may
//! make only the syscalls its kind needs (`allowlists.rs`), with only the
//! capabilities its kind needs. A syscall outside the list is reported
//! with its number and the thread's kind, and ends the whole VMM process
//! (`sigsys.rs`): a device emulator doing something it never does is taken
//! as compromised, and containerd then ends the pod's tasks the way it
//! does for any shim that died.
//!
//! Filters stack and are inherited by threads a jailed thread creates, so
//! no jailed thread creates threads: a device activated by the guest (on a
//! vCPU) gets its worker from the spawner, an unjailed thread started by
//! [`init`], which also does the little set-up a vCPU may need beyond its
//! list ([`outside`]).
//!
//! The filters are compiled once per process, in [`init`]; entering the
//! jail is then one `capset` and one `seccomp` call per thread, and a VM
//! about to start has its threads enter ahead ([`prepare`], `ahead.rs`),
//! so that starting one on the clone's path costs a wake-up.

mod ahead;
mod allowlists;
mod sigsys;

use std::any::Any;
use std::cell::Cell;
use std::ffi::CString;
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{BpfProgram, SeccompAction};

/// What a thread outside its allow-list meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Report the syscall and end the VMM.
    #[default]
    Kill,
    /// Let the syscall through and have the kernel log it (audit record
    /// type 1326 in `dmesg`, naming the thread and the syscall): how the
    /// lists are brought up to date (docs/security.md).
    Log,
    /// No filters and no dropped capabilities (for debugging only).
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!("{other:?} is not one of kill, log, off")),
        }
    }
}

impl Mode {
    /// `JEVM_SECCOMP` when it names a mode, else [`Mode::Kill`]: for
    /// programs that embed the VMM without a config file of their own
    /// (the `jevm` command, tests).
    pub fn from_env() -> Mode {
        std::env::var("JEVM_SECCOMP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    }
}

/// The kinds of jailed threads, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    Vcpu = 1,
    Block,
    Net,
    Vsock,
    Fs,
}

impl ThreadKind {
    const ALL: [ThreadKind; 5] = [
        ThreadKind::Vcpu,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Fs,
    ];

    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "virtio-blk",
            ThreadKind::Net => "virtio-net",
            ThreadKind::Vsock => "virtio-vsock",
            ThreadKind::Fs => "virtio-fs",
        }
    }

    fn from_u8(v: u8) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| *k as u8 == v)
    }

    /// The capabilities a thread of this kind keeps. Only the file server
    /// acts on the host's files on the guest's behalf (as the guest
    /// caller's uid/gid, creating what a container creates); the others
    /// work on descriptors opened before they started.
    fn capabilities(self) -> CapsHashSet {
        match self {
            ThreadKind::Fs => [
                Capability::CAP_CHOWN,
                Capability::CAP_DAC_OVERRIDE,
                Capability::CAP_DAC_READ_SEARCH,
                Capability::CAP_FOWNER,
                Capability::CAP_FSETID,
                Capability::CAP_SETUID,
                Capability::CAP_SETGID,
                Capability::CAP_SETFCAP,
                Capability::CAP_MKNOD,
            ]
            .into_iter()
            .collect(),
            _ => CapsHashSet::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot compile the seccomp filter of the {kind} threads: {source}")]
    Compile {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of a {kind} thread: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot drop the capabilities of a {kind} thread: {source}")]
    Capabilities {
        kind: &'static str,
        source: caps::errors::CapsError,
    },
    #[error("cannot confine a {kind} thread with Landlock: {source}")]
    Landlock {
        kind: &'static str,
        source: landlock::RulesetError,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(io::Error),
    #[error("cannot start the jail's spawner thread: {0}")]
    Spawner(io::Error),
    #[error("the jail is already set up with mode {0:?}")]
    ModeChanged(Mode),
}

struct Jail {
    mode: Mode,
    /// Indexed by `ThreadKind as usize - 1`; empty with `Mode::Off`.
    filters: Vec<BpfProgram>,
    spawner: Mutex<mpsc::Sender<Job>>,
    ahead: ahead::Pool,
}

type Job = Box<dyn FnOnce() + Send>;

static JAIL: OnceLock<Jail> = OnceLock::new();

thread_local! {
    /// The kind of jail this thread is in (0: none). Read by the SIGSYS
    /// handler, so const-initialised and without a destructor.
    static CURRENT: Cell<u8> = const { Cell::new(0) };
}

/// Sets the jail up for this process: compiles every kind's filter,
/// installs the SIGSYS reporter, starts the spawner. Call it from an
/// unjailed thread before the first VM starts; later calls with the same
/// mode do nothing.
pub fn init(mode: Mode) -> Result<(), JailError> {
    if let Some(j) = JAIL.get() {
        return if j.mode == mode {
            Ok(())
        } else {
            Err(JailError::ModeChanged(j.mode))
        };
    }
    let mismatch = match mode {
        Mode::Kill => SeccompAction::Trap,
        Mode::Log | Mode::Off => SeccompAction::Log,
    };
    let mut filters = Vec::new();
    if mode != Mode::Off {
        for kind in ThreadKind::ALL {
            let compile = |k: ThreadKind| -> Result<BpfProgram, seccompiler::BackendError> {
                allowlists::filter(k, mismatch.clone())?.try_into()
            };
            filters.push(compile(kind).map_err(|source| JailError::Compile {
                kind: kind.name(),
                source,
            })?);
        }
        sigsys::install().map_err(JailError::Handler)?;
    }
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("jevm-spawner".into())
        .spawn(move || {
            for job in rx {
                job();
            }
        })
        .map_err(JailError::Spawner)?;
    let _ = JAIL.set(Jail {
        mode,
        filters,
        spawner: Mutex::new(tx),
        ahead: ahead::Pool::default(),
    });
    match JAIL.get() {
        Some(j) if j.mode != mode => Err(JailError::ModeChanged(j.mode)),
        _ => Ok(()),
    }
}

/// The mode the jail was set up with, if it was.
pub fn mode() -> Option<Mode> {
    JAIL.get().map(|j| j.mode)
}

/// The jail, when one is set up and not off.
fn active() -> Option<&'static Jail> {
    JAIL.get().filter(|j| j.mode != Mode::Off)
}

/// Puts the calling thread in the jail of `kind`: drops the capabilities
/// the kind does not keep, then installs its filter. Without [`init`], or
/// with `Mode::Off`, does nothing.
pub fn enter(kind: ThreadKind) -> Result<(), JailError> {
    let Some(jail) = active() else {
        return Ok(());
    };
    let keep = kind.capabilities();
    let held = caps::read(None, CapSet::Permitted).map_err(|source| JailError::Capabilities {
        kind: kind.name(),
        source,
    })?;
    let keep: CapsHashSet = keep.intersection(&held).copied().collect();
    // Inheritable only ever shrinks to nothing: raising a capability there
    // needs it in the bounding set, and no jailed thread runs a program.
    for (set, caps) in [
        (CapSet::Effective, &keep),
        (CapSet::Permitted, &keep),
        (CapSet::Inheritable, &CapsHashSet::new()),
    ] {
        caps::set(None, set, caps).map_err(|source| JailError::Capabilities {
            kind: kind.name(),
            source,
        })?;
    }
    CURRENT.with(|c| c.set(kind as u8));
    seccompiler::apply_filter(&jail.filters[kind as usize - 1]).map_err(|source| {
        JailError::Install {
            kind: kind.name(),
            source,
        }
    })
}

/// Has the spawner start `count` threads of `kind` that enter their jail
/// and park (fewer when some are parked or starting already), for a VM
/// about to start: [`spawn`] then hands its work to one of them. Returns
/// at once; without a jail, does nothing.
pub fn prepare(kind: ThreadKind, count: usize) {
    let Some(jail) = active() else {
        return;
    };
    let more = jail.ahead.reserve(kind, count);
    let spawner = jail.spawner.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..more {
        let job: Job = Box::new(move || {
            if let Some(jail) = active() {
                jail.ahead.start_one(kind);
            }
        });
        if spawner.send(job).is_err() {
            // The spawner is gone: nothing will start; let takers know.
            jail.ahead.unreserve(kind, 1);
        }
    }
}

/// Ends up to `count` threads of `kind` that [`prepare`] started and no
/// VM took (the VM they were for failed first), and waits for them.
pub fn release(kind: ThreadKind, count: usize) {
    let Some(jail) = active() else {
        return;
    };
    for t in jail.ahead.release(kind, count) {
        let _ = t.join();
    }
}

/// On a thread in its jail, about to run `work`: the work's thread name
/// (what `ps -L` shows), then Landlock when the work serves a directory.
/// Landlock comes last because it depends on the work, not the kind (the
/// thread may have parked ahead); the kinds that use it allow its calls.
fn run_work(kind: ThreadKind, work: ahead::Work) -> ahead::Output {
    if let Ok(name) = CString::new(work.name.as_str()) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of which the
        // kernel keeps the first 15 bytes; `name` outlives the call.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
    if let (Some(beneath), Some(_)) = (&work.files, active()) {
        if let Err(source) = landlock_beneath(beneath.as_deref()) {
            let e = JailError::Landlock {
                kind: kind.name(),
                source,
            };
            let _ = work.started.send(Err(e.to_string()));
            return None;
        }
    }
    let _ = work.started.send(Ok(()));
    drop(work.started);
    Some((work.run)())
}

/// Landlock: every file access right is handled, and granted only beneath
/// `dir`. A kernel without Landlock (not in its `lsm=` list) leaves the
/// thread unconfined: said once in the log, since seccomp and the dropped
/// capabilities still hold.
fn landlock_beneath(dir: Option<&Path>) -> Result<(), landlock::RulesetError> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, ABI,
    };
    let all = AccessFs::from_all(ABI::V3);
    // The seccomp filter already set no_new_privs.
    let mut ruleset = Ruleset::default()
        .handle_access(all)?
        .create()?
        .no_new_privs(false);
    if let Some(dir) = dir {
        ruleset = ruleset.add_rules(path_beneath_rules([dir], all))?;
    }
    let status = ruleset.restrict_self()?;
    if status.ruleset == RulesetStatus::NotEnforced {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            log::warn!("jail: this kernel has no Landlock: the virtio-fs server is not confined to its share by path (seccomp and capabilities still apply)");
        });
    }
    Ok(())
}

/// The jail the calling thread is in.
pub fn current() -> Option<ThreadKind> {
    ThreadKind::from_u8(CURRENT.with(|c| c.get()))
}

/// A thread in its jail, started by [`spawn`]; `W` is what its work returns.
pub struct Thread<W> {
    handle: JoinHandle<ahead::Output>,
    name: String,
    _returns: PhantomData<fn() -> W>,
}

impl<W: 'static> Thread<W> {
    /// Waits for the thread: Err when it panicked, Ok(None) when it never
    /// ran its work.
    pub fn join(self) -> std::thread::Result<Option<W>> {
        let out = self.handle.join()?;
        Ok(out.and_then(|b| b.downcast::<W>().ok()).map(|b| *b))
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// The name it was started with.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Starts a thread named `name` that runs `run` in the jail of `kind`: a
/// thread [`prepare`]d ahead when there is one, else a new one. A jailed
/// caller (a vCPU activating a device) may not create threads, so the
/// spawner does it; the call returns once the thread is in its jail, or
/// with the reason it could not get there.
pub fn spawn<W: Send + 'static>(
    name: &str,
    kind: ThreadKind,
    run: impl FnOnce() -> W + Send + 'static,
) -> io::Result<Thread<W>> {
    spawn_confined(name, kind, None, run)
}

/// [`spawn`], with the thread's file access by path confined beneath
/// `dir` (None: no file at all), for a thread that serves a directory.
pub fn spawn_beneath<W: Send + 'static>(
    name: &str,
    kind: ThreadKind,
    dir: Option<PathBuf>,
    run: impl FnOnce() -> W + Send + 'static,
) -> io::Result<Thread<W>> {
    spawn_confined(name, kind, Some(dir), run)
}

fn spawn_confined<W: Send + 'static>(
    name: &str,
    kind: ThreadKind,
    files: Option<Option<PathBuf>>,
    run: impl FnOnce() -> W + Send + 'static,
) -> io::Result<Thread<W>> {
    let (started_tx, started_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    let work = ahead::Work {
        name: name.into(),
        files,
        run: Box::new(move || Box::new(run()) as Box<dyn Any + Send>),
        started: started_tx,
    };
    let unassigned = match active().and_then(|j| j.ahead.take(kind)) {
        Some(parked) => parked.assign(work),
        None => Err(work),
    };
    let handle = match unassigned {
        Ok(handle) => handle,
        Err(work) => {
            let builder = std::thread::Builder::new().name(name.into());
            let body = move || {
                if let Err(e) = enter(kind) {
                    let _ = work.started.send(Err(e.to_string()));
                    return None;
                }
                run_work(kind, work)
            };
            outside(move || builder.spawn(body))??
        }
    };
    let started = started_rx.recv();
    match started {
        Ok(Ok(())) => Ok(Thread {
            handle,
            name: name.into(),
            _returns: PhantomData,
        }),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(io::Error::other(e))
        }
        Err(_) => {
            let _ = handle.join();
            Err(io::Error::other(format!(
                "thread {name} ended before entering its jail"
            )))
        }
    }
}

/// Runs `f` outside the jail: on the spawner when the calling thread is
/// jailed, else right here. For the set-up a guest's request leads to on
/// a vCPU (a device reset opens a new file-server session, an activation
/// starts a worker) that the vCPU's own list does not allow. Err when the
/// spawner is gone.
pub fn outside<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    let jail = match JAIL.get() {
        Some(jail) if current().is_some() => jail,
        _ => return Ok(f()),
    };
    let gone = || io::Error::other("the jail's spawner thread is gone");
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    jail.spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())
}

/// Drops, for the whole process, every capability not in `keep`: from the
/// bounding set (when the process may still change it) and from this
/// thread's effective and permitted sets; its inheritable and ambient sets
/// are emptied (the shim runs no program that would inherit them). Call it
/// before the process starts any thread, which inherit the result.
pub fn limit_process_capabilities(keep: &[Capability]) -> Result<(), caps::errors::CapsError> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    let held = caps::read(None, CapSet::Permitted)?;
    if held.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding)? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let keep: CapsHashSet = keep.intersection(&held).copied().collect();
    for set in [CapSet::Effective, CapSet::Permitted] {
        caps::set(None, set, &keep)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
