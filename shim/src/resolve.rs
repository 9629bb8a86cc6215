//! What the guest would read from the container's rootfs to start its
//! process, read from the same rootfs on the host instead: the `HOME` of
//! its user and the `PATH` directory its command is in.
//!
//! In a new clone every name the guest looks up in the rootfs is a round
//! trip to the VMM's virtio-fs server, and these two lookups cost ~30 ms
//! of a create in the KVM test host (docs/benchmarks.md): the image's
//! `/etc/passwd` opened and read, each `PATH` directory tried in turn. The
//! shim has the rootfs mounted on the host (it is what the share serves),
//! where a lookup is a system call.
//!
//! The host sees the rootfs as the image left it, without the spec's
//! mounts and masked paths, so an answer is given only where none of them
//! can make the container see something else: no file or directory
//! involved lies at or under one of them, no symbolic link is on the way
//! (except the command itself, whose target must be uncovered too), and
//! the files are readable or executable by anyone, so the container's user
//! and capabilities cannot change the outcome. Otherwise nothing is said
//! and the guest looks as before. Names resolve with `openat2`'s
//! `RESOLVE_IN_ROOT`: nothing in the image can point the host outside it.
//!
//! The answers travel in the spec: `HOME` as the environment variable the
//! guest would have added itself (runc adds it the same way), the command's
//! path as the annotation [`EXEC_PATH`], which the guest checks once before
//! using it. A user's own value for that annotation is removed.

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::fstat;
use serde_json::Value;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

pub use jevm_protocol::EXEC_PATH_ANNOTATION as EXEC_PATH;

/// `/etc/passwd` larger than this is left to the guest.
const PASSWD_MAX: u64 = 1 << 20;

/// Fills in `HOME` and [`EXEC_PATH`] in `spec` where the host can answer
/// for the guest (see the module's doc); `rootfs` is the container's root
/// as mounted on the host.
pub fn resolve_ahead(spec: &mut Value, rootfs: &Path) {
    if let Some(a) = spec.get_mut("annotations").and_then(Value::as_object_mut) {
        a.remove(EXEC_PATH);
    }
    let Ok(root) = open_root(rootfs) else {
        return;
    };
    let covered = Covered::of(spec);
    let Some(process) = spec.get("process") else {
        return;
    };
    let env: Vec<String> = process
        .get("env")
        .and_then(Value::as_array)
        .map(|e| {
            e.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let uid = process
        .pointer("/user/uid")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let command = process
        .pointer("/args/0")
        .and_then(Value::as_str)
        .map(str::to_owned);

    let home = (!env.iter().any(|e| e.starts_with("HOME=")))
        .then(|| home_of(&root, &covered, uid))
        .flatten();
    let exec = command.and_then(|c| exec_path(&root, &covered, &c, &env));

    if let Some(home) = home {
        if let Some(env) = spec
            .pointer_mut("/process/env")
            .and_then(Value::as_array_mut)
        {
            env.push(Value::String(format!("HOME={home}")));
        } else if let Some(p) = spec.get_mut("process").and_then(Value::as_object_mut) {
            p.insert(
                "env".into(),
                Value::Array(vec![format!("HOME={home}").into()]),
            );
        }
    }
    if let Some(exec) = exec {
        if let Some(obj) = spec.as_object_mut() {
            let a = obj
                .entry("annotations")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(a) = a.as_object_mut() {
                a.insert(EXEC_PATH.into(), Value::String(exec));
            }
        }
    }
}

/// The paths the container sees differently from the host's rootfs: the
/// spec's mount destinations and masked paths, and what the guest itself
/// mounts or makes there (`/dev`, `/proc`, `/sys`).
struct Covered(Vec<PathBuf>);

impl Covered {
    fn of(spec: &Value) -> Covered {
        let mut paths: Vec<PathBuf> = ["/dev", "/proc", "/sys"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let strings = |v: Option<&Value>, key: Option<&str>| -> Vec<PathBuf> {
            v.and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|m| match key {
                            Some(k) => m.get(k).and_then(Value::as_str),
                            None => m.as_str(),
                        })
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default()
        };
        paths.extend(strings(spec.get("mounts"), Some("destination")));
        paths.extend(strings(spec.pointer("/linux/maskedPaths"), None));
        Covered(paths.iter().filter_map(|p| normal(p)).collect())
    }

    /// Whether the container may see something else at `path` (absolute,
    /// normal) than the host does: a covered path is it or one of its
    /// ancestors.
    fn covers(&self, path: &Path) -> bool {
        self.0.iter().any(|c| path.starts_with(c))
    }
}

/// `path` made absolute and lexically normal; None if it has `..` (which
/// would need the file system to resolve) or is not absolute.
pub(crate) fn normal(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

pub(crate) fn open_root(rootfs: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(rootfs)
        .map(OwnedFd::from)
}

/// Opens `path` (absolute, normal) inside `root` with no symbolic link on
/// the way (ELOOP if there is one).
pub(crate) fn open_plain(root: &OwnedFd, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = openat2(root.as_raw_fd(), rel, how)?;
    // SAFETY: `openat2` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Every directory from `/` to `dir` (absolute, normal) exists with no link
/// on the way, uncovered, searchable by anyone.
fn searchable(root: &OwnedFd, covered: &Covered, dir: &Path) -> bool {
    dir.ancestors().all(|d| {
        !covered.covers(d)
            && open_plain(root, d, OFlag::O_PATH | OFlag::O_DIRECTORY)
                .and_then(|fd| fstat(fd.as_raw_fd()))
                .is_ok_and(|st| st.st_mode & 0o001 != 0)
    })
}

/// The guest's `HOME` for `uid` from the image's `/etc/passwd`, as the
/// agent reads it (`init::process::home_of`), if the host's copy is the
/// one the container sees.
fn home_of(root: &OwnedFd, covered: &Covered, uid: u64) -> Option<String> {
    let passwd = Path::new("/etc/passwd");
    if covered.covers(passwd) || !searchable(root, covered, Path::new("/etc")) {
        return None;
    }
    let fd = open_plain(root, passwd, OFlag::O_RDONLY).ok()?;
    let st = fstat(fd.as_raw_fd()).ok()?;
    let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
    if !regular || st.st_mode & 0o004 == 0 || st.st_size as u64 > PASSWD_MAX {
        return None;
    }
    let text = std::io::read_to_string(std::fs::File::from(fd)).ok()?;
    Some(jevm_protocol::home_in_passwd(&text, uid))
}

/// The guest's path for `command` through `env`'s `PATH`, as the agent's
/// `look_path` finds it, if the host can tell for certain: every
/// directory tried before it surely lacks the command, and it is a regular
/// file executable by anyone, or a link to one in one hop (busybox's
/// applets are), with no other link on the way.
fn exec_path(root: &OwnedFd, covered: &Covered, command: &str, env: &[String]) -> Option<String> {
    if command.is_empty() || command.contains('/') {
        return None;
    }
    let path = env.iter().rev().find_map(|e| e.strip_prefix("PATH="))?;
    for dir in path.split(':') {
        let dir = normal(Path::new(dir))?;
        let candidate = dir.join(command);
        if covered.covers(&candidate) {
            return None;
        }
        let st = match open_plain(root, &candidate, OFlag::O_PATH)
            .and_then(|fd| fstat(fd.as_raw_fd()))
        {
            // Not there, and no link on the way that could lead the
            // container somewhere else: the guest goes on too.
            Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
            Ok(st) => st,
            // A link in `dir` (ELOOP), or anything unexpected.
            Err(_) => return None,
        };
        if !searchable(root, covered, &dir) {
            return None;
        }
        // The command itself may be a link, followed here one hop.
        let st = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            let dir_fd = open_plain(root, &dir, OFlag::O_PATH | OFlag::O_DIRECTORY).ok()?;
            let target = nix::fcntl::readlinkat(Some(dir_fd.as_raw_fd()), command).ok()?;
            let real = normal(&dir.join(target))?;
            if covered.covers(&real) || !searchable(root, covered, real.parent()?) {
                return None;
            }
            let fd = open_plain(root, &real, OFlag::O_PATH).ok()?;
            fstat(fd.as_raw_fd()).ok()?
        } else {
            st
        };
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFDIR {
            // The guest skips a directory of that name.
            continue;
        }
        return (kind == libc::S_IFREG && st.st_mode & 0o111 == 0o111)
            .then(|| candidate.to_string_lossy().into_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

    /// A busybox-like rootfs: `/bin/true` a link to `busybox`, a passwd
    /// readable by all, directories searchable by all.
    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in ["bin", "etc", "usr/bin", "usr/sbin", "root"] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        fs::write(r.join("bin/busybox"), b"\x7fELF").unwrap();
        fs::set_permissions(r.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("busybox", r.join("bin/true")).unwrap();
        fs::write(
            r.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n",
        )
        .unwrap();
        fs::set_permissions(r, fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn spec(args: &[&str], env: &[&str], mounts: &[&str]) -> Value {
        json!({
            "process": {"args": args, "env": env, "user": {"uid": 0, "gid": 0}},
            "mounts": mounts.iter().map(|d| json!({"destination": d, "type": "bind", "source": "/x"})).collect::<Vec<_>>(),
            "annotations": {EXEC_PATH: "/user/said/so"},
        })
    }

    fn run(spec: &mut Value, root: &Path) -> (Option<String>, Vec<String>) {
        resolve_ahead(spec, root);
        let exec = spec["annotations"][EXEC_PATH].as_str().map(str::to_owned);
        let env = spec["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        (exec, env)
    }

    #[test]
    fn a_command_and_home_the_host_can_answer_for_are_filled_in() {
        let root = rootfs();
        let mut s = spec(&["true"], &[PATH], &["/proc", "/dev", "/sys/fs/cgroup"]);
        let (exec, env) = run(&mut s, root.path());
        assert_eq!(exec.as_deref(), Some("/bin/true"));
        assert_eq!(env, vec![PATH.to_owned(), "HOME=/root".to_owned()]);

        // Another user's home; a HOME already set stays alone.
        let mut s = spec(&["true"], &[PATH], &[]);
        s["process"]["user"]["uid"] = 1000.into();
        assert_eq!(run(&mut s, root.path()).1[1], "HOME=/home/u");
        let mut s = spec(&["true"], &[PATH, "HOME=/x"], &[]);
        assert_eq!(run(&mut s, root.path()).1, vec![PATH, "HOME=/x"]);
    }

    #[test]
    fn nothing_is_said_where_the_container_may_see_something_else() {
        let root = rootfs();
        let r = root.path();
        // A volume over a PATH directory before /bin, over the command, over
        // /etc: the guest looks itself; the user's annotation is gone.
        for mounts in [&["/usr/local/bin"][..], &["/bin/true"], &["/bin"], &["/"]] {
            let mut s = spec(&["true"], &[PATH], mounts);
            assert_eq!(run(&mut s, r).0, None, "mounts {mounts:?}");
        }
        let mut s = spec(&["true"], &[PATH], &["/etc"]);
        let (exec, env) = run(&mut s, r);
        assert_eq!((exec.as_deref(), env.len()), (Some("/bin/true"), 1));
        let mut s = spec(&["true"], &[PATH], &[]);
        s["linux"] = json!({"maskedPaths": ["/etc/passwd"]});
        assert_eq!(run(&mut s, r).1.len(), 1, "masked passwd");

        // A path, a relative PATH entry, no PATH: nothing to look for.
        for (args, env) in [
            (["/bin/true"], PATH),
            (["true"], "PATH=bin:/bin"),
            (["true"], "X=1"),
        ] {
            let mut s = spec(&args, &[env], &[]);
            assert_eq!(run(&mut s, r).0, None, "{args:?} {env}");
        }

        // A file only its owner may run, earlier in PATH: access() in the
        // container's credentials decides, so the guest does.
        fs::write(r.join("usr/bin/true"), b"#!").unwrap();
        fs::set_permissions(r.join("usr/bin/true"), fs::Permissions::from_mode(0o700)).unwrap();
        let mut s = spec(&["true"], &[PATH], &[]);
        assert_eq!(run(&mut s, r).0, None);
        fs::remove_file(r.join("usr/bin/true")).unwrap();

        // A directory of links (usr-merged /sbin), a link leaving through
        // `..`, a passwd only root may read.
        symlink("usr/sbin", r.join("sbin")).unwrap();
        let mut s = spec(&["true"], &["PATH=/sbin:/bin"], &[]);
        assert_eq!(run(&mut s, r).0, None, "/sbin is a link");
        symlink("../../bin/busybox", r.join("usr/bin/env")).unwrap();
        let mut s = spec(&["env"], &[PATH], &[]);
        assert_eq!(run(&mut s, r).0, None, "a link with ..");
        fs::set_permissions(r.join("etc/passwd"), fs::Permissions::from_mode(0o600)).unwrap();
        let mut s = spec(&["true"], &[PATH], &[]);
        assert_eq!(run(&mut s, r).1.len(), 1, "unreadable passwd");
    }

    #[test]
    fn a_directory_named_like_the_command_is_skipped_as_the_guest_skips_it() {
        let root = rootfs();
        fs::create_dir(root.path().join("usr/bin/true")).unwrap();
        let mut s = spec(&["true"], &[PATH], &[]);
        assert_eq!(run(&mut s, root.path()).0.as_deref(), Some("/bin/true"));
    }

    #[test]
    fn the_passwd_parser_is_the_agents() {
        let p = "a:x:0:0::/ra:/bin/sh\nbad line\nb:x:7:7::/hb:/bin/sh\nc:x:8:8:::\n";
        assert_eq!(jevm_protocol::home_in_passwd(p, 0), "/ra");
        assert_eq!(jevm_protocol::home_in_passwd(p, 7), "/hb");
        assert_eq!(jevm_protocol::home_in_passwd(p, 8), "/", "empty home");
        assert_eq!(jevm_protocol::home_in_passwd(p, 9), "/", "no such user");
    }
}
