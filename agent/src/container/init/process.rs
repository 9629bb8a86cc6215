//! The process itself: rlimits, session and terminal, no_new_privileges,
//! seccomp, capabilities, user and groups, umask, cwd, environment, and the
//! `execve` of `args[0]` looked up in the container's `PATH`.

use super::errors::{errno_desc, io_err, os_err};
use super::seccomp::Filters;
use super::Never;
use anyhow::{anyhow, bail, Context, Result};
use caps::{CapSet, CapsHashSet};
use nix::errno::Errno;
use oci_spec::runtime::{Capabilities, LinuxCapabilities, PosixRlimitType, Process, Spec};
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Everything checked and set up; only the `execve` (and, with
/// no_new_privileges, the seccomp filters) remain.
pub struct Prepared {
    path: CString,
    args: Vec<CString>,
    env: Vec<CString>,
    late_filters: Option<Filters>,
}

/// Marks every inherited descriptor above the sync socket close-on-exec so
/// nothing of the agent leaks into the container.
pub fn close_inherited_fds() -> Result<()> {
    let first = crate::container::plan::SYNC_FD as libc::c_uint + 1;
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets a flag on
    // the fds in the range; no memory is passed. (The guest kernel is
    // 6.12: the call exists.)
    let rc = unsafe { libc::close_range(first, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as _) };
    if rc != 0 {
        return Err(io_err(
            "mark inherited fds close-on-exec",
            &std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// rlimits and oom_score_adj. Raising a hard limit or lowering the score
/// takes privileges of the guest's user namespace, so with a user namespace
/// this is done before entering it (runc sets both from outside too).
pub fn set_limits(process: &Process) -> Result<()> {
    set_rlimits(process)?;
    if let Some(adj) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| io_err(format!("set oom_score_adj to {adj}"), &e))?;
    }
    Ok(())
}

/// Everything up to `execve` but [`set_limits`].
/// `exec_path`: where the host found the command (the container's init
/// only, [`jevm_protocol::EXEC_PATH_ANNOTATION`]); used once it checks out
/// here, else the `PATH` search runs as usual.
pub fn prepare(
    process: &Process,
    spec: &Spec,
    terminal: bool,
    exec_path: Option<&str>,
) -> Result<Prepared> {
    new_session(terminal)?;
    let nnp = process.no_new_privileges().unwrap_or(false);
    if nnp {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            bail!("set no_new_privileges: {}", errno_desc(Errno::last()));
        }
    }
    let filters =
        super::seccomp::compile(spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()))?;
    // Without no_new_privileges only CAP_SYS_ADMIN allows loading a filter,
    // so it goes in before the capabilities are dropped; with it, as late as
    // possible so the filter sees nothing of the set-up.
    let late_filters = match filters {
        Some(f) if !nnp => {
            f.load()?;
            None
        }
        other => other,
    };
    let caps = process.capabilities().as_ref();
    apply_bounding(caps)?;
    set_user(process)?;
    apply_caps(caps)?;
    let umask = process.user().umask().unwrap_or(0o022);
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask & 0o777));

    let cwd = process.cwd();
    nix::unistd::chdir(cwd).map_err(|e| {
        anyhow!(
            "chdir to cwd ({:?}) set in config.json failed: {}",
            cwd.display().to_string(),
            errno_desc(e)
        )
    })?;
    let mut env: Vec<String> = process.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", home_of(process.user().uid())));
    }
    let args = process.args().as_deref().unwrap_or_default();
    let name = args.first().context("args must not be empty")?;
    let path = match exec_path {
        Some(p) if !name.contains('/') && executable(Path::new(p)).is_ok() => p.to_owned(),
        _ => look_path(name, &env)?,
    };
    Ok(Prepared {
        path: cstring(&path, "executable path")?,
        args: args
            .iter()
            .map(|a| cstring(a, "argument"))
            .collect::<Result<_>>()?,
        env: env
            .iter()
            .map(|e| cstring(e, "environment variable"))
            .collect::<Result<_>>()?,
        late_filters,
    })
}

impl Prepared {
    pub fn exec(self) -> Result<Never> {
        if let Some(f) = &self.late_filters {
            f.load()?;
        }
        let err = nix::unistd::execve(&self.path, &self.args, &self.env).unwrap_err();
        bail!("exec {}: {}", self.path.to_string_lossy(), errno_desc(err))
    }
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow!("{what} {s:?} contains a NUL byte"))
}

fn rlimit_resource(typ: PosixRlimitType) -> libc::__rlimit_resource_t {
    use PosixRlimitType as T;
    match typ {
        T::RlimitCpu => libc::RLIMIT_CPU,
        T::RlimitFsize => libc::RLIMIT_FSIZE,
        T::RlimitData => libc::RLIMIT_DATA,
        T::RlimitStack => libc::RLIMIT_STACK,
        T::RlimitCore => libc::RLIMIT_CORE,
        T::RlimitRss => libc::RLIMIT_RSS,
        T::RlimitNproc => libc::RLIMIT_NPROC,
        T::RlimitNofile => libc::RLIMIT_NOFILE,
        T::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        T::RlimitAs => libc::RLIMIT_AS,
        T::RlimitLocks => libc::RLIMIT_LOCKS,
        T::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        T::RlimitNice => libc::RLIMIT_NICE,
        T::RlimitRtprio => libc::RLIMIT_RTPRIO,
        T::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

fn set_rlimits(process: &Process) -> Result<()> {
    for r in process.rlimits().as_deref().unwrap_or_default() {
        let limit = libc::rlimit {
            rlim_cur: r.soft(),
            rlim_max: r.hard(),
        };
        // SAFETY: `limit` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(rlimit_resource(r.typ()), &limit) } != 0 {
            bail!(
                "setrlimit {} (soft {}, hard {}): {}",
                r.typ(),
                r.soft(),
                r.hard(),
                errno_desc(Errno::last())
            );
        }
    }
    Ok(())
}

fn new_session(terminal: bool) -> Result<()> {
    match nix::unistd::setsid() {
        Ok(_) => {}
        // Already a session leader (the agent made it one).
        Err(Errno::EPERM) if nix::unistd::getsid(None).ok() == Some(nix::unistd::getpid()) => {}
        Err(e) => return Err(os_err("setsid", e)),
    }
    if terminal {
        // SAFETY: TIOCSCTTY takes an integer argument; fd 0 is ours.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            bail!(
                "set the controlling terminal (fd 0): {}",
                errno_desc(Errno::last())
            );
        }
    }
    Ok(())
}

fn cap_set(set: &Option<Capabilities>) -> CapsHashSet {
    set.iter()
        .flatten()
        // Names this kernel's caps crate does not know are ignored, as runc
        // ignores capabilities unknown to it.
        .filter_map(|c| format!("CAP_{c}").parse::<caps::Capability>().ok())
        .collect()
}

fn caps_err(what: &str, e: caps::errors::CapsError) -> anyhow::Error {
    anyhow!("{what}: {e}")
}

/// Drops from the bounding set what the spec does not list (everything,
/// without a capabilities object, as runc does); needs CAP_SETPCAP, so
/// before the user changes.
fn apply_bounding(c: Option<&LinuxCapabilities>) -> Result<()> {
    let keep = c.map(|c| cap_set(c.bounding())).unwrap_or_default();
    let current =
        caps::read(None, CapSet::Bounding).map_err(|e| caps_err("read bounding set", e))?;
    for cap in current.difference(&keep) {
        caps::drop(None, CapSet::Bounding, *cap)
            .map_err(|e| caps_err(&format!("drop {cap} from the bounding set"), e))?;
    }
    Ok(())
}

/// Sets the spec's effective, permitted, inheritable and ambient sets. With
/// no capabilities object the process keeps none.
fn apply_caps(c: Option<&LinuxCapabilities>) -> Result<()> {
    let (mut eff, mut perm, mut inh, mut amb) = Default::default();
    if let Some(c) = c {
        eff = cap_set(c.effective());
        perm = cap_set(c.permitted());
        inh = cap_set(c.inheritable());
        amb = cap_set(c.ambient());
    }
    // Order matters to capset: inheritable while permitted is still full,
    // effective before permitted shrinks under it.
    caps::set(None, CapSet::Inheritable, &inh)
        .map_err(|e| caps_err("set inheritable capabilities", e))?;
    caps::set(None, CapSet::Effective, &eff)
        .map_err(|e| caps_err("set effective capabilities", e))?;
    caps::set(None, CapSet::Permitted, &perm)
        .map_err(|e| caps_err("set permitted capabilities", e))?;
    caps::set(None, CapSet::Ambient, &amb).map_err(|e| caps_err("set ambient capabilities", e))?;
    Ok(())
}

/// Groups, gid, uid, keeping the permitted capabilities across the uid
/// change (PR_SET_KEEPCAPS) so that the spec's sets can be applied after.
fn set_user(process: &Process) -> Result<()> {
    let user = process.user();
    let (uid, gid) = (user.uid(), user.gid());
    let groups: Vec<libc::gid_t> = user.additional_gids().clone().unwrap_or_default();
    caps::securebits::set_keepcaps(true).map_err(|e| caps_err("set keepcaps", e))?;
    // SAFETY: the pointer and length describe `groups`, which outlives the call.
    if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
        bail!("setgroups {groups:?}: {}", errno_desc(Errno::last()));
    }
    // setgid/setuid, not setres*: -1 must be refused, not mean "unchanged".
    // SAFETY: plain integer syscall.
    if unsafe { libc::setgid(gid) } != 0 {
        bail!("setgid {gid}: {}", errno_desc(Errno::last()));
    }
    // SAFETY: plain integer syscall.
    if unsafe { libc::setuid(uid) } != 0 {
        bail!("setuid {uid}: {}", errno_desc(Errno::last()));
    }
    caps::securebits::set_keepcaps(false).map_err(|e| caps_err("clear keepcaps", e))?;
    Ok(())
}

/// HOME as runc sets it when the spec's env lacks it: the user's home in the
/// container's /etc/passwd, else "/".
fn home_of(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .map(|passwd| jevm_protocol::home_in_passwd(&passwd, uid.into()))
        .unwrap_or_else(|_| "/".to_string())
}

/// `args[0]` as Go's `exec.LookPath` finds it with the container's PATH,
/// with runc's error wording.
pub fn look_path(name: &str, env: &[String]) -> Result<String> {
    if name.contains('/') {
        return match executable(Path::new(name)) {
            Ok(()) => Ok(name.to_string()),
            Err(cause) => bail!("exec: {name:?}: {cause}"),
        };
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("");
    if !path.is_empty() {
        for dir in path.split(':') {
            let dir = if dir.is_empty() { "." } else { dir };
            let candidate = format!("{dir}/{name}");
            if executable(Path::new(&candidate)).is_ok() {
                return Ok(candidate);
            }
        }
    }
    bail!("exec: {name:?}: executable file not found in $PATH")
}

fn executable(path: &Path) -> std::result::Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("stat {}: {}", path.display(), super::errors::errno_text(&e)))?;
    if meta.is_dir() || meta.permissions().mode() & 0o111 == 0 {
        return Err("permission denied".into());
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)
        .map_err(|_| "permission denied".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_follows_path_and_words_errors_like_runc() {
        let env = vec!["PATH=/nonexistent:/bin".to_string()];
        assert_eq!(look_path("sh", &env).unwrap(), "/bin/sh");
        assert_eq!(
            look_path("nosuch", &env).unwrap_err().to_string(),
            "exec: \"nosuch\": executable file not found in $PATH"
        );
        assert_eq!(
            look_path("sh", &[]).unwrap_err().to_string(),
            "exec: \"sh\": executable file not found in $PATH"
        );
        assert_eq!(
            look_path("/nosuch", &env).unwrap_err().to_string(),
            "exec: \"/nosuch\": stat /nosuch: no such file or directory"
        );
    }
}
