//! Helpers for the containerd end-to-end tests: run the same `ctr` command
//! under runc and under jevm and compare what a user sees.
//!
//! The containerd they talk to is the private one `hack/containerd-env`
//! starts (`hack/e2e` does it for them); it exports where it is.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const RUNC: &str = "io.containerd.runc.v2";
pub const JEVM: &str = "io.containerd.jevm.v2";
/// runc first: its result is checked against what the test expects, so a
/// jevm mismatch is always "jevm differs from a result known to be right".
pub const RUNTIMES: [&str; 2] = [RUNC, JEVM];

/// How long one `ctr` command may take. Generous: inside the KVM test host
/// (TCG) the first jevm container also builds the template.
/// `JEVM_E2E_CTR_TIMEOUT` (seconds) overrides it, for hunting a hang.
pub static CTR_TIMEOUT: std::sync::LazyLock<Duration> = std::sync::LazyLock::new(|| {
    let secs = std::env::var("JEVM_E2E_CTR_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
});

/// Runs `f` under runc then jevm; returns both results (runc, jevm).
/// JEVM_E2E_RUNC_ONLY=1 (for working on the tests themselves, never in CI)
/// runs runc twice instead, which also shows the test is deterministic.
pub fn both<T>(mut f: impl FnMut(&str) -> T) -> (T, T) {
    let second = if runc_only() { RUNC } else { JEVM };
    (f(RUNC), f(second))
}

pub fn runc_only() -> bool {
    let on = std::env::var_os("JEVM_E2E_RUNC_ONLY").is_some_and(|v| v == "1");
    if on {
        eprintln!("!!! JEVM_E2E_RUNC_ONLY=1: jevm is NOT tested, runc runs twice");
    }
    on
}

/// Where the private containerd is (see `hack/containerd-env`).
#[derive(Debug, Clone)]
pub struct Env {
    pub address: String,
    pub namespace: String,
    pub image: String,
    pub root: PathBuf,
    pub state: PathBuf,
    pub base: PathBuf,
    pub rootfs: PathBuf,
    pub run_dir: PathBuf,
    pub bad_runtime: String,
    pub bad_config: PathBuf,
}

impl Env {
    /// `None` when the environment of `hack/containerd-env` is absent.
    pub fn from_env() -> Option<Env> {
        let v = |n: &str| std::env::var(n).ok().filter(|s| !s.is_empty());
        Some(Env {
            address: v("JEVM_CTR_ADDRESS")?,
            namespace: v("JEVM_CTR_NAMESPACE")?,
            image: v("JEVM_CTR_IMAGE")?,
            root: v("JEVM_CTR_ROOT")?.into(),
            state: v("JEVM_CTR_STATE")?.into(),
            base: v("JEVM_CTR_BASE")?.into(),
            rootfs: v("JEVM_CTR_ROOTFS")?.into(),
            run_dir: v("JEVM_RUN_DIR")?.into(),
            bad_runtime: v("JEVM_CTR_BAD_RUNTIME")?,
            bad_config: v("JEVM_CTR_BAD_CONFIG")?.into(),
        })
    }

    /// `ctr` with our address and namespace.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace);
        c
    }

    /// Runs `ctr ARGS` to completion.
    pub fn ctr_out(&self, args: &[&str]) -> Outcome {
        let mut c = self.ctr();
        c.args(args);
        Running::spawn(c, false).wait(*CTR_TIMEOUT)
    }

    /// `ctr run --rm --runtime RT FLAGS IMAGE ID CMD...`
    pub fn run(&self, rt: &str, id: &str, flags: &[&str], cmd: &[&str]) -> Outcome {
        self.spawn_run(rt, id, flags, cmd, false).wait(*CTR_TIMEOUT)
    }

    /// Starts `ctr run --rm ...` (attached) and returns at once.
    pub fn spawn_run(
        &self,
        rt: &str,
        id: &str,
        flags: &[&str],
        cmd: &[&str],
        stdin: bool,
    ) -> Running {
        let mut c = self.ctr();
        c.args(["run", "--rm", "--runtime", rt]);
        c.args(flags).arg(&self.image).arg(id).args(cmd);
        Running::spawn(c, stdin)
    }

    /// `ctr run -d` of a long-running container; panics unless it runs.
    pub fn run_detached(&self, rt: &str, id: &str, flags: &[&str], cmd: &[&str]) {
        let mut args = vec!["run", "-d", "--runtime", rt];
        args.extend_from_slice(flags);
        args.push(&self.image);
        args.push(id);
        args.extend_from_slice(cmd);
        let o = self.ctr_out(&args);
        assert_eq!(o.code, 0, "{rt}: ctr run -d {id}: {o:?}");
        self.wait_status(id, "RUNNING", *CTR_TIMEOUT);
    }

    /// Runs a ctr command line under a pseudo-terminal (`script`), as a
    /// user at a terminal would: `ctr run -t` wants its stdin to be a TTY.
    pub fn under_tty(&self, args: &[&str]) -> Outcome {
        let line = std::iter::once("ctr")
            .chain(args.iter().copied())
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = Command::new("script");
        c.args(["-q", "-e", "-c", &line, "/dev/null"])
            .env("CONTAINERD_ADDRESS", &self.address)
            .env("CONTAINERD_NAMESPACE", &self.namespace);
        // stdin stays an open, silent pipe: EOF on it would end the session.
        let r = Running::spawn(c, true);
        r.wait(*CTR_TIMEOUT)
    }

    /// The status column of `ctr task ls` for `id` (None: no such task).
    pub fn task_status(&self, id: &str) -> Option<String> {
        let o = self.ctr_out(&["task", "ls"]);
        o.stdout.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.last().unwrap_or(&"").to_string())
        })
    }

    pub fn wait_status(&self, id: &str, want: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.task_status(id);
            if s.as_deref() == Some(want) || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ids(&self, what: &[&str]) -> Vec<String> {
        let mut args = what.to_vec();
        args.push("-q");
        self.ctr_out(&args)
            .stdout
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn containers(&self) -> Vec<String> {
        self.ids(&["containers", "ls"])
    }
    /// The first line of containerd's log containing `needle`, waited for
    /// up to `within` (containerd copies a shim's log asynchronously).
    pub fn log_line(&self, needle: &str, within: Duration) -> Option<String> {
        let log = self.base.join("containerd.log");
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains(needle)) {
                return Some(l.to_string());
            }
            if start.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    pub fn tasks(&self) -> Vec<String> {
        self.ids(&["tasks", "ls"])
    }
    /// Keys of the active (container) snapshots.
    pub fn active_snapshots(&self) -> Vec<String> {
        let o = self.ctr_out(&["snapshots", "ls"]);
        o.stdout
            .lines()
            .skip(1)
            .filter(|l| l.split_whitespace().last() == Some("Active"))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// Best-effort removal of whatever a test left of `id`, so a failed
    /// test does not make the next ones fail too. Says what it removed.
    pub fn cleanup(&self, id: &str) -> Vec<String> {
        let mut removed = Vec::new();
        if self.tasks().iter().any(|t| t == id) {
            removed.push(format!("task {id}"));
            self.ctr_out(&["task", "kill", "-a", "-s", "SIGKILL", id]);
            self.ctr_out(&["task", "delete", "-f", id]);
        }
        if self.containers().iter().any(|c| c == id) {
            removed.push(format!("container {id}"));
            self.ctr_out(&["containers", "delete", id]);
        }
        if self.active_snapshots().iter().any(|s| s == id) {
            removed.push(format!("snapshot {id}"));
            self.ctr_out(&["snapshots", "rm", id]);
        }
        removed
    }

    /// What is left of container `id` anywhere we can see: containerd's
    /// objects, the shim, mounts, the task's state directory, files in the
    /// jevm run directory naming it. Waits a little: a shim exits just after
    /// answering its last call.
    pub fn leftovers(&self, id: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut left = Vec::new();
            for t in self.tasks() {
                if t == id {
                    left.push(format!("task {t}"));
                }
            }
            for c in self.containers() {
                if c == id {
                    left.push(format!("container {c}"));
                }
            }
            for s in self.active_snapshots() {
                if s == id {
                    left.push(format!("snapshot {s}"));
                }
            }
            for p in self.shims(Some(id)) {
                left.push(format!("shim process {p}"));
            }
            let me = std::process::id();
            for (pid, args) in processes() {
                if pid != me
                    && args.iter().any(|a| a.contains(id))
                    && !args.iter().any(|a| a.contains("containerd-shim"))
                {
                    left.push(format!("process {pid}: {}", args.join(" ")));
                }
            }
            for m in mounts() {
                if m.split('/').any(|part| part == id) {
                    left.push(format!("mount {m}"));
                }
            }
            let bundle = self.task_state_dir().join(id);
            if bundle.exists() {
                left.push(format!("bundle {}", bundle.display()));
            }
            for f in walk(&self.run_dir) {
                if f.to_string_lossy().contains(id) {
                    left.push(format!("file {}", f.display()));
                }
            }
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Removes the stdio FIFOs `ctr run -d` made for `id` (only a
    /// successful `ctr task delete` removes them; a task deleted through the
    /// API leaves them, under runc as under jevm: they are ctr's, not the
    /// runtime's). Returns their names with the id as `ID`, sorted.
    pub fn remove_ctr_fifos(&self, id: &str) -> Vec<String> {
        let fifos: Vec<PathBuf> = walk(Path::new("/run/containerd/fifo"))
            .into_iter()
            .filter(|f| {
                f.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{id}-")))
            })
            .collect();
        let mut names: Vec<String> = fifos
            .iter()
            .filter_map(|f| f.file_name())
            .map(|n| n.to_string_lossy().replace(id, "ID"))
            .collect();
        names.sort();
        for f in &fifos {
            let _ = std::fs::remove_file(f);
            if let Some(dir) = f.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
        names
    }

    /// Kills a detached container's task, waits for it to stop, deletes
    /// task and container, and asserts nothing of it is left.
    pub fn remove(&self, id: &str) {
        self.ctr_out(&["task", "kill", "-s", "SIGKILL", id]);
        self.wait_status(id, "STOPPED", *CTR_TIMEOUT);
        self.ctr_out(&["task", "delete", id]);
        self.ctr_out(&["containers", "delete", id]);
        self.assert_gone(id);
    }

    pub fn assert_gone(&self, id: &str) {
        let left = self.leftovers(id);
        if !left.is_empty() {
            let removed = self.cleanup(id);
            panic!("container {id} left behind: {left:?} (cleanup removed {removed:?})");
        }
    }

    /// Files in the jevm run directory beyond the shim's top-level
    /// directories (`pods`, `vms`, which stay like containerd's own under
    /// /run/containerd), as leftover lines: after the last pod, a leak.
    pub fn run_dir_leftovers(&self) -> Vec<String> {
        walk(&self.run_dir)
            .into_iter()
            .filter(|f| !["pods", "vms"].iter().any(|d| *f == self.run_dir.join(d)))
            .map(|f| format!("file in run_dir: {}", f.display()))
            .collect()
    }

    /// Where containerd keeps the task bundles of our namespace.
    pub fn task_state_dir(&self) -> PathBuf {
        self.state
            .join("io.containerd.runtime.v2.task")
            .join(&self.namespace)
    }

    /// PIDs of shims serving our containerd (and container `id`, if given).
    pub fn shims(&self, id: Option<&str>) -> Vec<u32> {
        let mut out = Vec::new();
        for (pid, args) in processes() {
            let is_shim = args.first().is_some_and(|a| a.contains("containerd-shim"));
            let ours = args
                .windows(2)
                .any(|w| w[0] == "-address" && w[1] == self.address);
            let for_id = id.is_none_or(|id| args.windows(2).any(|w| w[0] == "-id" && w[1] == id));
            if is_shim && ours && for_id {
                out.push(pid);
            }
        }
        out
    }

    /// Subscribes to containerd's events (`ctr events`), returning once the
    /// subscription is known to be live.
    pub fn events(&self) -> Events {
        let mut c = self.ctr();
        c.arg("events");
        let r = Running::spawn(c, false);
        let marker = format!("e2e-events-{}", unique());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Labelling the namespace publishes /namespaces/update.
            self.ctr_out(&[
                "namespaces",
                "label",
                &self.namespace,
                &format!("e2e.marker={marker}"),
            ]);
            if r.wait_stdout(&marker, Duration::from_millis(500)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ctr events: no event seen in 30 s: {:?}",
                r.stderr()
            );
        }
        Events { running: r }
    }
}

/// What a command showed: its output and exit status (`128 + signal` when
/// a signal ended it, as a shell would say).
#[derive(Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub stdout_bytes: Vec<u8>,
    pub code: i32,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut = |s: &str| -> String {
            if s.len() > 2000 {
                format!("{}…[{} bytes]", &s[..s.floor_char_boundary(2000)], s.len())
            } else {
                s.to_string()
            }
        };
        f.debug_struct("Outcome")
            .field("code", &self.code)
            .field("stdout", &cut(&self.stdout))
            .field("stderr", &cut(&self.stderr))
            .finish()
    }
}

impl Outcome {
    /// stderr without ctr's own log lines (`time="..." level=...`), which
    /// carry timestamps and races of ctr itself (e.g. a resize after exit).
    pub fn user_stderr(&self) -> String {
        strip_ctr_logs(&self.stderr)
    }
    /// stdout as a terminal shows it: CRs dropped, ctr's log lines dropped.
    pub fn tty_text(&self) -> String {
        strip_ctr_logs(&self.stdout.replace('\r', ""))
    }
}

pub fn strip_ctr_logs(s: &str) -> String {
    s.lines()
        .filter(|l| !(l.contains("level=") || l.contains("resize pty")))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Asserts jevm's outcome equals runc's, with both shown on failure.
#[track_caller]
pub fn assert_same<T: PartialEq + std::fmt::Debug>(what: &str, runc: &T, jevm: &T) {
    if runc != jevm {
        panic!(
            "{what}: jevm differs from runc\n  runc: {runc:?}\n  jevm: {jevm:?}\n(if jevm shows a shim error, the jevm shim is missing or incomplete)"
        );
    }
}

/// A running command with its output collected as it arrives.
pub struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    pub fn spawn(mut c: Command, stdin: bool) -> Running {
        c.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("starting {c:?}: {e}"));
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        readers.push(pump(stdout, out.clone()));
        readers.push(pump(stderr, err.clone()));
        Running {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            readers,
        }
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until stdout contains `needle`.
    pub fn wait_stdout(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn write_stdin(&mut self, data: &[u8]) {
        self.stdin
            .as_mut()
            .expect("spawned with stdin")
            .write_all(data)
            .expect("writing stdin");
    }
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the command to end; past `timeout` it is killed with
    /// SIGKILL (ctr forwards SIGTERM to the container instead of dying).
    pub fn wait(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("waitpid") {
                break Some(s);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.stdin = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let stdout_bytes = std::mem::take(&mut *self.out.lock().unwrap());
        let mut stderr = self.stderr();
        let code = match status {
            Some(s) => {
                use std::os::unix::process::ExitStatusExt;
                s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
            }
            None => {
                stderr.push_str(&format!("\n[e2e: killed after {timeout:?}]\n"));
                -1
            }
        };
        Outcome {
            stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
            stdout_bytes,
            stderr,
            code,
        }
    }
}

fn pump(mut from: impl Read + Send + 'static, to: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => to.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

/// A live `ctr events` subscription.
pub struct Events {
    running: Running,
}

impl Events {
    /// Topics of the events that name container `id`, in order.
    pub fn topics_for(&self, id: &str) -> Vec<String> {
        parse_events(&self.running.stdout(), id)
            .into_iter()
            .map(|(t, _)| t)
            .collect()
    }

    /// (topic, json) of the events naming `id`.
    pub fn for_id(&self, id: &str) -> Vec<(String, String)> {
        parse_events(&self.running.stdout(), id)
    }

    /// Waits until an event with `topic` names `id`.
    pub fn wait_for(&self, id: &str, topic: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.topics_for(id).iter().any(|t| t == topic) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.running.child.kill();
        let _ = self.running.child.wait();
    }
}

/// `ctr events` prints `DATE TIME ZONE UTC NAMESPACE /TOPIC {json}`.
pub fn parse_events(text: &str, id: &str) -> Vec<(String, String)> {
    let quoted = format!("\"{id}\"");
    text.lines()
        .filter_map(|l| {
            let start = l.find(" /")? + 1;
            let rest = &l[start..];
            let (topic, json) = rest.split_once(' ').unwrap_or((rest, ""));
            json.contains(&quoted)
                .then(|| (topic.to_string(), json.to_string()))
        })
        .collect()
}

/// A container id no other test (or run) uses: `e2e-NAME-RT-PID-N`.
pub fn id(name: &str, rt: &str) -> String {
    format!(
        "e2e-{name}-{}-{}-{}",
        short(rt),
        std::process::id(),
        unique()
    )
}

/// "runc" / "jevm" for messages and ids.
pub fn short(rt: &str) -> &str {
    rt.split('.').nth(2).unwrap_or(rt)
}

fn unique() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// (pid, argv) of every process.
pub fn processes() -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(d) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in d.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(raw) = std::fs::read(e.path().join("cmdline")) {
            let args = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            out.push((pid, args));
        }
    }
    out
}

/// `pid` and every process below it.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = processes()
        .into_iter()
        .filter_map(|(p, _)| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // The fields after the command name, which may hold spaces.
            let rest = &stat[stat.rfind(')')? + 2..];
            let ppid = rest.split(' ').nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// Anonymous memory of `pid` and every process below it, in KiB: what a
/// pod's shim (for jevm: its VMM and the guest's copy-on-write copies of
/// template pages) and its container processes (runc) hold of their own.
/// Not Private_Dirty: a template's memory file on tmpfs counts there
/// while one pod alone maps it, though every clone shares it.
pub fn anonymous_kib(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| crate::smaps_rollup(p).ok()?.get("Anonymous").copied())
        .sum()
}

/// Mount points of this mount namespace.
pub fn mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(str::to_string))
        .collect()
}

/// Mounts at or under `prefix`, as leftover lines ("mount PATH").
pub fn mounts_under(prefix: &Path) -> Vec<String> {
    let prefix = prefix.display().to_string();
    mounts()
        .into_iter()
        .filter(|m| m.starts_with(&prefix))
        .map(|m| format!("mount {m}"))
        .collect()
}

/// Every path under `dir` (not following symlinks); empty if it is absent.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// The runtime's default OCI spec (`ctr oci spec`) as JSON text.
pub fn default_spec(env: &Env) -> String {
    let o = env.ctr_out(&["oci", "spec"]);
    assert_eq!(o.code, 0, "ctr oci spec: {o:?}");
    o.stdout
}

/// Names of the metrics `ctr task metrics` lists (values differ by nature).
pub fn metric_names(table: &str) -> BTreeSet<String> {
    table
        .lines()
        .skip_while(|l| !l.starts_with("METRIC"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[path = "../../agent/src/test_skip.rs"]
mod test_skip;
pub use test_skip::skipped;

/// Gets the environment or explains loudly why the test does nothing.
#[macro_export]
macro_rules! ctr_env_or_skip {
    () => {
        match $crate::ctr::Env::from_env() {
            Some(env) => env,
            None => {
                $crate::ctr::skipped(
                    "no private containerd (JEVM_CTR_* unset): run the containerd tests through hack/e2e (or hack/containerd-env)",
                );
                return;
            }
        }
    };
}
