//! Drives the real `jevm-agent container-init` stage on this machine the way
//! the agent does: a plan frame on fd 3, `Pid`, `Ready`/`Error`, `Start`,
//! EOF. The test process is a child subreaper, so the container process
//! (forked by the stage, which then exits) is reparented to it and reaped
//! here, as the agent's reaper does in the guest.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;

pub const BUSYBOX: &str = "/bin/busybox";

/// None (with the reason printed) when this machine cannot run the stage.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!(
            "{BUSYBOX} missing (apt-get install busybox-static)"
        ));
    }
    if cgroup_parent().is_none() {
        return Some("no writable cgroup v2 hierarchy".into());
    }
    None
}

#[path = "../../src/test_skip.rs"]
mod test_skip;
pub use test_skip::skipped;

macro_rules! require_host {
    () => {
        if let Some(reason) = common::skip_reason() {
            common::skipped(&reason);
            return;
        }
    };
}
pub(crate) use require_host;

/// A cgroup v2 directory tests may create children in.
fn cgroup_parent() -> Option<PathBuf> {
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let root = Path::new(root);
        if root.join("cgroup.procs").exists() && root.join("cgroup.subtree_control").exists() {
            let parent = root.join("jevm-init-tests");
            if std::fs::create_dir_all(&parent).is_ok() {
                return Some(parent);
            }
        }
    }
    None
}

/// A busybox root file system in a temp dir.
pub struct Rootfs {
    pub dir: tempfile::TempDir,
}

impl Rootfs {
    pub fn new() -> Rootfs {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/u"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
            }
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000:u:/home/u:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nu:x:1000:\n").unwrap();
        Rootfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// containerd's default spec for `ctr run` (captured from `ctr run` with
/// runc on this host), pointed at `rootfs`, running `args`.
pub fn default_spec(rootfs: &Path, args: &[&str]) -> Value {
    let text = include_str!("../fixtures/ctr-default-config.json");
    let mut spec: Value = serde_json::from_str(text).unwrap();
    spec["root"]["path"] = json!(rootfs);
    spec["process"]["args"] = json!(args);
    spec["process"]["env"] =
        json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);
    spec
}

/// What the conversation and the process produced.
#[derive(Debug)]
pub struct Outcome {
    pub pid: Option<u32>,
    /// `Error` before `Ready`.
    pub create_error: Option<String>,
    /// `Error` after `Start` (execve failed).
    pub start_error: Option<String>,
    /// Exit code, or 128 + signal.
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Cgroup {
        // Tests run in parallel and the last one out removes the shared
        // parent: it may vanish between making it and making ours.
        for _ in 0..50 {
            let path = cgroup_parent()
                .unwrap()
                .join(format!("{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir(&path);
            match std::fs::create_dir(&path) {
                Ok(()) => return Cgroup { path },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("cgroup {}: {e}", path.display()),
            }
        }
        panic!("cgroup {name}: its parent kept vanishing")
    }

    pub fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                // The last test out removes the shared parent too.
                if let Some(parent) = self.path.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

static SUBREAPER: Once = Once::new();

fn become_subreaper() {
    SUBREAPER.call_once(|| {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
    });
}

/// A started stage: the socket, its stdout/stderr readers, the process.
pub struct Stage {
    sock: UnixStream,
    child: std::process::Child,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
    pub pid: Option<u32>,
    /// The terminal's master, sent by a stage with `terminal`.
    console: Option<OwnedFd>,
}

pub enum Answer {
    Ready,
    Error(String),
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// fd 0 is /dev/null, fds 1 and 2 pipes to readers (with `terminal` the
/// stage replaces them with its pty, see [`Stage::take_console`]).
pub fn spawn_stage(plan: &Value) -> Stage {
    spawn_stage_env(plan, &[])
}

/// [`spawn_stage`] with extra environment variables for the stage.
pub fn spawn_stage_env(plan: &Value, env: &[(&str, &str)]) -> Stage {
    become_subreaper();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let theirs_fd = theirs.as_raw_fd();
    // JEVM_AGENT_BIN runs the suite against another build (e.g. the static
    // guest agent).
    let bin = std::env::var_os("JEVM_AGENT_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_jevm-agent").into());
    let mut cmd = Command::new(bin);
    cmd.arg("container-init").envs(env.iter().copied());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(theirs_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(theirs);
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());
    let mut sock = ours;
    jevm_protocol::write_frame(&mut sock, plan).unwrap();
    Stage {
        sock,
        child,
        out,
        err,
        pid: None,
        console: None,
    }
}

impl Stage {
    /// Reads `Pid` (if any) and then `Ready` or `Error`.
    pub fn created(&mut self) -> Answer {
        loop {
            let msg: Value = match jevm_protocol::read_frame(&mut self.sock) {
                Ok(v) => v,
                Err(e) => return Answer::Error(format!("<stage closed the socket: {e}>")),
            };
            if let Some(pid) = msg.pointer("/Pid/pid") {
                self.pid = Some(pid.as_u64().unwrap() as u32);
                continue;
            }
            if msg == json!("Console") {
                assert!(self.console.is_none(), "a second terminal");
                self.console = Some(recv_fd(&self.sock));
                continue;
            }
            if let Some(times) = msg.pointer("/Ready/times") {
                for step in ["namespaces_us", "pid_fork_us", "mounts_us", "process_us"] {
                    assert!(times[step].is_u64(), "Ready without {step}: {msg}");
                }
                return Answer::Ready;
            }
            if let Some(m) = msg.pointer("/Error/message") {
                return Answer::Error(m.as_str().unwrap().to_string());
            }
            panic!("unexpected stage message {msg}");
        }
    }

    /// The terminal's master, once the stage sent it.
    pub fn take_console(&mut self) -> Option<OwnedFd> {
        self.console.take()
    }

    /// Sends `Start`; None on EOF (execve happened), else the error.
    pub fn start(&mut self) -> Option<String> {
        jevm_protocol::write_frame(&mut self.sock, &json!("Start")).unwrap();
        match jevm_protocol::read_frame::<_, Value>(&mut self.sock) {
            Ok(msg) => Some(
                msg.pointer("/Error/message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| msg.to_string()),
            ),
            Err(_) => None,
        }
    }

    /// Closes the socket without `Start` (the agent aborting).
    pub fn abort(self) -> Outcome {
        let Stage {
            sock,
            child,
            out,
            err,
            pid,
            ..
        } = self;
        drop(sock);
        finish(child, out, err, pid, None, None)
    }

    pub fn wait(self, start_error: Option<String>) -> Outcome {
        let Stage {
            sock,
            child,
            out,
            err,
            pid,
            ..
        } = self;
        drop(sock);
        finish(child, out, err, pid, None, start_error)
    }
}

/// The one fd sent as SCM_RIGHTS on the byte after a `Console` frame.
fn recv_fd(sock: &UnixStream) -> OwnedFd {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .unwrap();
    let mut fds: Vec<OwnedFd> = Vec::new();
    for cmsg in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these fds for this message.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }),
            );
        }
    }
    assert_eq!(fds.len(), 1, "the terminal's master");
    fds.pop().unwrap()
}

fn finish(
    mut child: std::process::Child,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
    pid: Option<u32>,
    create_error: Option<String>,
    start_error: Option<String>,
) -> Outcome {
    let stage_status = child.wait().unwrap();
    let status = match pid {
        Some(pid) if pid != child.id() => wait_pid(pid),
        _ => stage_status.code().or_else(|| {
            std::os::unix::process::ExitStatusExt::signal(&stage_status).map(|s| 128 + s)
        }),
    };
    Outcome {
        pid,
        create_error,
        start_error,
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn wait_pid(pid: u32) -> Option<i32> {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid as i32), None) {
            Ok(WaitStatus::Exited(_, code)) => return Some(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Some(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return None,
        }
    }
}

pub fn create_plan(id: &str, spec: &Value, cgroup: &Cgroup, terminal: bool) -> Value {
    json!({
        "container_id": id,
        "kind": { "Create": { "spec": spec } },
        "cgroup": cgroup.path,
        "terminal": terminal,
    })
}

pub fn exec_plan(id: &str, init_pid: u32, spec: &Value, process: &Value, cgroup: &Cgroup) -> Value {
    json!({
        "container_id": id,
        "kind": { "Exec": { "init_pid": init_pid, "spec": spec, "process": process } },
        "cgroup": cgroup.path,
        "terminal": false,
    })
}

/// Creates, starts and waits for a container from `spec`.
pub fn run(name: &str, spec: &Value) -> Outcome {
    run_env(name, spec, &[])
}

pub fn run_env(name: &str, spec: &Value, env: &[(&str, &str)]) -> Outcome {
    let cgroup = Cgroup::new(name);
    let mut stage = spawn_stage_env(&create_plan(name, spec, &cgroup, false), env);
    match stage.created() {
        Answer::Ready => {
            let start_error = stage.start();
            stage.wait(start_error)
        }
        Answer::Error(message) => {
            let mut o = stage.wait(None);
            o.create_error = Some(message);
            o
        }
    }
}

/// Mount points under `dir` in this (the test's) mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

/// The capability mask `/proc/<pid>/status` shows for these names.
pub fn cap_mask(names: &[&str]) -> String {
    let mask = names
        .iter()
        .map(|n| n.parse::<caps::Capability>().unwrap().bitmask())
        .fold(0u64, |a, b| a | b);
    format!("{mask:016x}")
}

/// Runs `spec` under runc (installed on this host) for comparison. None
/// when runc is missing.
pub fn run_runc(name: &str, spec: &Value) -> Option<(i32, String, String)> {
    if Command::new("runc").arg("--version").output().is_err() {
        return None;
    }
    let bundle = tempfile::tempdir().unwrap();
    let mut spec = spec.clone();
    spec["linux"]["cgroupsPath"] = json!(format!("/jevm-init-cmp-{name}-{}", std::process::id()));
    std::fs::write(bundle.path().join("config.json"), spec.to_string()).unwrap();
    let id = format!("jevm-cmp-{name}-{}", std::process::id());
    let out = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(bundle.path())
        .arg(&id)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = Command::new("runc").args(["delete", "-f", &id]).output();
    Some((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
