//! The lifecycle with real processes: the real spawn code forks the test
//! binary as a fake stage (see `fake_stage`), a test reaper feeds the exit
//! table, and a fake cgroup records what the lifecycle asked of it.

use super::cgroup_ops::{Cgroups, ContainerCgroup};
use super::*;
use jevm_protocol::{read_frame, ContainerStats, Stdio};
use serde_json::json;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Instant;

const WAIT: Duration = Duration::from_secs(20);

/// Stands in for the agent's SIGCHLD reaper, which needs SIGCHLD blocked
/// in every thread before any exists (impossible under libtest). Polls,
/// which only tests may.
pub(crate) fn start_test_reaper() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        // SAFETY: prctl with integer arguments: orphans of the fake stage
        // come to this process, as they come to PID 1 in the guest.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        std::thread::spawn(|| loop {
            match nix::sys::wait::waitpid(None, None) {
                Ok(status) => {
                    if let Some((pid, status)) = exits::status_of(status) {
                        exits::reaped(pid, status);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        });
    });
}

#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<String>>>);

impl Calls {
    fn push(&self, call: String) {
        lock(&self.0).push(call);
    }
    fn list(&self) -> Vec<String> {
        lock(&self.0).clone()
    }
}

struct FakeCgroups {
    root: PathBuf,
    calls: Calls,
    fail_create: bool,
}

struct FakeCgroup {
    path: PathBuf,
    calls: Calls,
}

impl Cgroups for FakeCgroups {
    fn create(&self, id: &str, _: Option<&LinuxResources>) -> io::Result<Box<dyn ContainerCgroup>> {
        self.calls.push(format!("create {id}"));
        if self.fail_create {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(Box::new(FakeCgroup {
            path: self.root.join(id),
            calls: self.calls.clone(),
        }))
    }
}

impl ContainerCgroup for FakeCgroup {
    fn path(&self) -> &Path {
        &self.path
    }
    fn update(&self, _: &LinuxResources) -> io::Result<()> {
        self.calls.push("update".into());
        Ok(())
    }
    fn freeze(&self, frozen: bool) -> io::Result<()> {
        self.calls.push(format!("freeze {frozen}"));
        Ok(())
    }
    fn pids(&self) -> io::Result<Vec<u32>> {
        Ok(vec![1, 2])
    }
    fn stats(&self) -> io::Result<ContainerStats> {
        Ok(ContainerStats {
            pids_current: 2,
            ..ContainerStats::default()
        })
    }
    fn signal_all(&self, signal: i32) -> io::Result<()> {
        self.calls.push(format!("signal_all {signal}"));
        Ok(())
    }
    fn watch_oom(&self, _: Box<dyn Fn() + Send + 'static>) -> io::Result<()> {
        self.calls.push("watch_oom".into());
        Ok(())
    }
    fn remove(self: Box<Self>) -> io::Result<()> {
        self.calls.push(format!("remove {}", self.path.display()));
        Ok(())
    }
}

/// A service whose stage is the fake one and whose cgroups are fakes.
pub(crate) fn fake_service() -> Service {
    start_test_reaper();
    Service::new(
        StageCommand::agent(),
        Box::new(FakeCgroups {
            root: PathBuf::from("/sys/fs/cgroup/jevm"),
            calls: Calls::default(),
            fail_create: false,
        }),
    )
    .unwrap()
}

struct Harness {
    service: Service,
    calls: Calls,
    events: UnixStream,
}

/// Stages come from the zygote, as in the guest.
fn harness_with(fail_create: bool) -> Harness {
    start_test_reaper();
    let calls = Calls::default();
    let service = Service::with_zygote(
        StageCommand::agent(),
        Box::new(FakeCgroups {
            root: PathBuf::from("/sys/fs/cgroup/jevm"),
            calls: calls.clone(),
            fail_create,
        }),
    )
    .unwrap();
    let events = take_over(&service, Request::Events);
    Harness {
        service,
        calls,
        events,
    }
}

fn harness() -> Harness {
    harness_with(false)
}

/// Sends a request that takes the connection over; returns the host end.
fn take_over(service: &Service, request: Request) -> UnixStream {
    let (host, agent) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(WAIT)).unwrap();
    match service.handle(request) {
        Outcome::TakeOver(Response::Done, attachment) => {
            std::thread::spawn(move || attachment(agent));
        }
        Outcome::TakeOver(other, _) => panic!("take-over answered {other:?}"),
        Outcome::Reply(reply) => panic!("expected a take-over, got {reply:?}"),
    }
    host
}

fn reply(service: &Service, request: Request) -> Response {
    match service.handle(request) {
        Outcome::Reply(r) => r,
        Outcome::TakeOver(r, _) => panic!("unexpected take-over answering {r:?}"),
    }
}

pub(crate) fn spec(args: &[&str]) -> serde_json::Value {
    json!({
        "ociVersion": "1.0.2",
        "process": { "args": args, "cwd": "/", "user": { "uid": 0, "gid": 0 } },
        "root": { "path": "/" }
    })
}

fn stdio(stdin: bool, stdout: bool, stderr: bool) -> Stdio {
    Stdio {
        stdin,
        stdout,
        stderr,
        terminal: false,
    }
}

impl Harness {
    fn create(&self, id: &str, args: &[&str], stdio: Stdio) -> Response {
        reply(
            &self.service,
            Request::CreateContainer(CreateContainer {
                container_id: id.into(),
                spec: spec(args),
                stdio,
            }),
        )
    }

    fn created(&self, id: &str, args: &[&str], stdio: Stdio) -> u32 {
        match self.create(id, args, stdio) {
            Response::Created { pid, .. } => pid,
            other => panic!("create {id}: {other:?}"),
        }
    }

    fn attach(&self, id: &str, exec_id: Option<&str>, stream: StdioStream) -> UnixStream {
        take_over(
            &self.service,
            Request::AttachStdio {
                container_id: id.into(),
                exec_id: exec_id.map(Into::into),
                stream,
            },
        )
    }

    fn start(&self, id: &str) -> Response {
        reply(
            &self.service,
            Request::StartContainer {
                container_id: id.into(),
            },
        )
    }

    fn next_event(&mut self) -> Event {
        read_frame(&mut self.events).expect("an event")
    }

    fn signal(&self, id: &str, exec_id: Option<&str>, signal: i32) -> Response {
        reply(
            &self.service,
            Request::Signal {
                container_id: id.into(),
                exec_id: exec_id.map(Into::into),
                signal,
                all: false,
            },
        )
    }

    fn delete(&self, id: &str) -> Response {
        reply(
            &self.service,
            Request::DeleteContainer {
                container_id: id.into(),
            },
        )
    }
}

fn read_all(mut conn: UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    conn.read_to_end(&mut out).unwrap();
    out
}

fn exited(id: &str, exec_id: Option<&str>, pid: u32, status: u32) -> impl Fn(&Event) -> bool {
    let id = id.to_string();
    let exec_id = exec_id.map(String::from);
    move |e| {
        matches!(e, Event::Exited { container_id, exec_id: x, pid: p, exit_status, exited_at_ns }
            if *container_id == id && *x == exec_id && *p == pid && *exit_status == status
                && *exited_at_ns > 1_600_000_000_000_000_000)
    }
}

/// The PPid line of `pid`'s /proc status.
fn parent_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

#[test]
fn stages_come_from_the_zygote_as_children_of_the_agent_unless_the_spec_asks_for_exec() {
    let mut h = harness();
    let served = |h: &Harness| h.service.zygote().expect("the zygote started").served();
    let before = served(&h);
    let pid = h.created(
        "z1",
        &["sh", "-c", "read x; exit 3"],
        stdio(true, false, false),
    );
    assert_eq!(served(&h), before + 1);
    // Reparented from the zygote's intermediate: the agent's child, as a
    // stage it forked itself would be (this test process is the agent).
    assert_eq!(parent_of(pid), Some(std::process::id()));
    let stdin = h.attach("z1", None, StdioStream::Stdin);
    assert_eq!(h.start("z1"), Response::Started { pid });
    drop(stdin);
    let event = h.next_event();
    assert!(exited("z1", None, pid, 3)(&event), "{event:?}");
    assert_eq!(h.delete("z1"), Response::Done);

    let mut annotated = spec(&["true"]);
    annotated["annotations"] = json!({ STAGE_ANNOTATION: "exec" });
    let created = reply(
        &h.service,
        Request::CreateContainer(CreateContainer {
            container_id: "z2".into(),
            spec: annotated,
            stdio: Stdio::default(),
        }),
    );
    let Response::Created { pid, .. } = created else {
        panic!("create z2: {created:?}")
    };
    assert_eq!(
        served(&h),
        before + 1,
        "the exec annotation used the zygote"
    );
    assert_eq!(h.start("z2"), Response::Started { pid });
    let event = h.next_event();
    assert!(exited("z2", None, pid, 0)(&event), "{event:?}");
    assert_eq!(h.delete("z2"), Response::Done);
}

/// The name a stage has until it `execve`s: `spare-<zygote>` if it was
/// the zygote's spare.
fn from_spare(h: &Harness, pid: u32) -> bool {
    let zygote = h.service.zygote().expect("the zygote started").pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    comm.trim() == format!("spare-{zygote}")
}

#[test]
fn stages_one_after_another_come_from_the_zygote_and_its_spares_in_a_kubernetes_pod() {
    let mut h = harness();
    let served = |h: &Harness| h.service.zygote().expect("the zygote started").served();
    let before = served(&h);
    // s0 takes the spare forked when the zygote started. A plain pod's
    // stage is not followed by a spare, so s1 is forked on request, and so
    // is s2; but s2 is a Kubernetes pod's, and s3 takes the spare forked
    // after it, and s4 the one after s3.
    for (i, code) in [3, 4, 5, 6, 7].into_iter().enumerate() {
        let id = format!("s{i}");
        let mut spec = spec(&["sh", "-c", &format!("exit {code}")]);
        if i >= 2 {
            spec["annotations"] = json!({ CRI_CONTAINER_TYPE: "container" });
        }
        let created = reply(
            &h.service,
            Request::CreateContainer(CreateContainer {
                container_id: id.clone(),
                spec,
                stdio: Stdio::default(),
            }),
        );
        let Response::Created { pid, .. } = created else {
            panic!("create {id}: {created:?}")
        };
        assert_eq!(served(&h), before + i + 1);
        assert_eq!(
            from_spare(&h, pid),
            [true, false, false, true, true][i],
            "{id}: from a spare"
        );
        assert_eq!(parent_of(pid), Some(std::process::id()), "{id}");
        assert_eq!(h.start(&id), Response::Started { pid });
        let event = h.next_event();
        assert!(exited(&id, None, pid, code)(&event), "{event:?}");
        assert_eq!(h.delete(&id), Response::Done);
    }
}

#[test]
fn a_dead_zygote_leaves_stages_to_exec() {
    let mut h = harness();
    let zygote = h.service.zygote().expect("the zygote started").pid();
    // SAFETY: kill(2) of the zygote this service started.
    unsafe { libc::kill(zygote, libc::SIGKILL) };
    let pid = h.created("zd", &["sh", "-c", "exit 5"], Stdio::default());
    assert_eq!(h.start("zd"), Response::Started { pid });
    let event = h.next_event();
    assert!(exited("zd", None, pid, 5)(&event), "{event:?}");
    assert_eq!(h.delete("zd"), Response::Done);
    let pid = h.created("zd2", &["true"], Stdio::default());
    assert_eq!(h.start("zd2"), Response::Started { pid });
    let event = h.next_event();
    assert!(exited("zd2", None, pid, 0)(&event), "{event:?}");
}

#[test]
fn a_container_runs_its_process_with_stdout_and_stderr_apart_and_reports_its_exit_code() {
    let mut h = harness();
    let pid = h.created(
        "c1",
        &["sh", "-c", "echo out; echo err >&2; exit 42"],
        stdio(false, true, true),
    );
    assert_eq!(h.calls.list(), ["create c1", "watch_oom"]);
    let out = h.attach("c1", None, StdioStream::Stdout);
    let err = h.attach("c1", None, StdioStream::Stderr);
    assert_eq!(h.start("c1"), Response::Started { pid });
    let event = h.next_event();
    assert!(exited("c1", None, pid, 42)(&event), "{event:?}");
    // Exited comes after the output reached EOF: all of it is there.
    assert_eq!(read_all(out), b"out\n");
    assert_eq!(read_all(err), b"err\n");

    assert_eq!(
        h.signal("c1", None, 15),
        Response::Error {
            message: "process already finished".into(),
            kind: ErrorKind::NotFound,
        }
    );
    assert_eq!(h.delete("c1"), Response::Done);
    assert_eq!(
        h.calls.list(),
        ["create c1", "watch_oom", "remove /sys/fs/cgroup/jevm/c1"]
    );
    assert_eq!(
        reply(
            &h.service,
            Request::Pids {
                container_id: "c1".into()
            }
        ),
        Response::Error {
            message: "container \"c1\" not found".into(),
            kind: ErrorKind::NotFound,
        }
    );
}

#[test]
fn sigkill_is_reported_as_137_and_a_second_create_with_the_id_is_refused() {
    let mut h = harness();
    let pid = h.created("k1", &["sleep", "100"], Stdio::default());
    assert!(matches!(
        h.create("k1", &["true"], Stdio::default()),
        Response::Error { message, kind: ErrorKind::AlreadyExists }
            if message == "container \"k1\" already exists"
    ));
    assert_eq!(h.start("k1"), Response::Started { pid });
    assert!(
        matches!(h.start("k1"), Response::Error { message, kind: ErrorKind::FailedPrecondition }
            if message.contains("already started"))
    );
    assert_eq!(h.signal("k1", None, libc::SIGKILL), Response::Done);
    let event = h.next_event();
    assert!(exited("k1", None, pid, 137)(&event), "{event:?}");
    assert_eq!(h.delete("k1"), Response::Done);
}

#[test]
fn a_stage_error_is_answered_verbatim_and_nothing_is_left() {
    let h = harness();
    let message = "exec: \"nosuch\": executable file not found in $PATH";
    assert_eq!(
        h.create("bad", &["fail-stage", message], stdio(true, true, true)),
        Response::Error {
            message: message.into(),
            kind: ErrorKind::Failed,
        }
    );
    assert_eq!(
        h.calls.list(),
        ["create bad", "remove /sys/fs/cgroup/jevm/bad"]
    );
    assert_eq!(
        h.start("bad"),
        Response::Error {
            message: "container \"bad\" not found".into(),
            kind: ErrorKind::NotFound,
        }
    );
    // The id is free again.
    assert!(matches!(
        h.create("bad", &["true"], Stdio::default()),
        Response::Created { .. }
    ));
    assert_eq!(h.delete("bad"), Response::Done);
}

#[test]
fn a_cgroup_failure_names_the_container_and_the_cause() {
    let h = harness_with(true);
    assert_eq!(
        h.create("cg", &["true"], Stdio::default()),
        Response::Error {
            message: "container \"cg\": creating its cgroup: No space left on device (os error 28)"
                .into(),
            kind: ErrorKind::Failed,
        }
    );
    assert!(matches!(
        h.create("a/b", &["true"], Stdio::default()),
        Response::Error { message, kind: ErrorKind::InvalidArgument }
            if message == "container id \"a/b\" is not valid"
    ));
}

#[test]
fn an_execve_failure_at_start_is_the_start_error() {
    let mut h = harness();
    let pid = h.created("nx", &["/nonexistent/binary"], Stdio::default());
    match h.start("nx") {
        Response::Error { message, .. } => {
            assert!(
                message.starts_with("exec: \"/nonexistent/binary\""),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    let event = h.next_event();
    assert!(exited("nx", None, pid, 127)(&event), "{event:?}");
    assert_eq!(h.delete("nx"), Response::Done);
}

#[test]
fn a_process_reparented_from_an_exited_intermediate_is_still_reported() {
    let mut h = harness();
    let pid = h.created("fork-1", &["sh", "-c", "exit 7"], Stdio::default());
    assert_eq!(h.start("fork-1"), Response::Started { pid });
    let event = h.next_event();
    assert!(exited("fork-1", None, pid, 7)(&event), "{event:?}");
    assert_eq!(h.delete("fork-1"), Response::Done);
}

#[test]
fn eight_mib_of_stdout_from_a_fast_exiting_process_arrive_complete() {
    let mut h = harness();
    let pid = h.created(
        "big",
        &["head", "-c", "8388608", "/dev/zero"],
        stdio(false, true, false),
    );
    let out = h.attach("big", None, StdioStream::Stdout);
    let reader = std::thread::spawn(move || read_all(out));
    h.start("big");
    let event = h.next_event();
    assert!(exited("big", None, pid, 0)(&event), "{event:?}");
    let got = reader.join().unwrap();
    assert_eq!(got.len(), 8 << 20);
    assert!(got.iter().all(|&b| b == 0));
    assert_eq!(h.delete("big"), Response::Done);
}

#[test]
fn stdin_reaches_the_process_and_its_eof_follows_the_host_eof() {
    let mut h = harness();
    let pid = h.created("cat", &["cat"], stdio(true, true, false));
    let mut stdin = h.attach("cat", None, StdioStream::Stdin);
    let out = h.attach("cat", None, StdioStream::Stdout);
    h.start("cat");
    stdin.write_all(b"piped in\n").unwrap();
    stdin.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_all(out), b"piped in\n");
    let event = h.next_event();
    assert!(exited("cat", None, pid, 0)(&event), "{event:?}");
    assert_eq!(h.delete("cat"), Response::Done);
}

#[test]
fn close_stdin_ends_the_stdin_of_a_process_whose_host_side_stays_open() {
    let mut h = harness();
    let pid = h.created("cat2", &["cat"], stdio(true, true, false));
    let mut stdin = h.attach("cat2", None, StdioStream::Stdin);
    let out = h.attach("cat2", None, StdioStream::Stdout);
    h.start("cat2");
    stdin.write_all(b"abc").unwrap();
    let started = Instant::now();
    let close = Request::CloseStdin {
        container_id: "cat2".into(),
        exec_id: None,
    };
    assert_eq!(reply(&h.service, close), Response::Done);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(read_all(out), b"abc");
    let event = h.next_event();
    assert!(exited("cat2", None, pid, 0)(&event), "{event:?}");
    drop(stdin);
    assert_eq!(h.delete("cat2"), Response::Done);

    // Never attached: closing drops the pipe at once.
    let pid = h.created("cat3", &["cat"], stdio(true, false, false));
    let close = Request::CloseStdin {
        container_id: "cat3".into(),
        exec_id: None,
    };
    assert_eq!(reply(&h.service, close), Response::Done);
    h.start("cat3");
    let event = h.next_event();
    assert!(exited("cat3", None, pid, 0)(&event), "{event:?}");
    assert_eq!(h.delete("cat3"), Response::Done);
}

#[test]
fn exited_is_not_held_back_long_by_a_grandchild_holding_stdout() {
    let mut h = harness();
    let pid = h.created(
        "gc",
        &["sh", "-c", "sleep 6 & echo parent; exit 3"],
        stdio(false, true, false),
    );
    let out = h.attach("gc", None, StdioStream::Stdout);
    let started = Instant::now();
    h.start("gc");
    let event = h.next_event();
    let waited = started.elapsed();
    assert!(exited("gc", None, pid, 3)(&event), "{event:?}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    drop(out);
    assert_eq!(h.delete("gc"), Response::Done);
}

#[test]
fn exec_runs_beside_the_init_and_delete_kills_the_init() {
    let mut h = harness();
    let init = h.created("ex", &["sleep", "100"], Stdio::default());
    let exec = |h: &Harness, exec_id: &str, args: &[&str], stdio: Stdio| {
        reply(
            &h.service,
            Request::Exec(ExecProcess {
                container_id: "ex".into(),
                exec_id: exec_id.into(),
                process: json!({ "args": args, "cwd": "/", "user": { "uid": 0, "gid": 0 } }),
                stdio,
            }),
        )
    };
    assert_eq!(
        exec(&h, "e1", &["true"], Stdio::default()),
        Response::Error {
            message: "container \"ex\" is not running".into(),
            kind: ErrorKind::FailedPrecondition,
        }
    );
    h.start("ex");
    let Response::Created { pid, .. } = exec(
        &h,
        "e1",
        &["sh", "-c", "echo x; exit 3"],
        stdio(false, true, false),
    ) else {
        panic!("exec not created")
    };
    assert!(matches!(
        exec(&h, "e1", &["true"], Stdio::default()),
        Response::Error { message, kind: ErrorKind::AlreadyExists }
            if message == "exec \"e1\" already exists in container \"ex\""
    ));
    let out = h.attach("ex", Some("e1"), StdioStream::Stdout);
    assert!(matches!(
        h.attach_error("ex", Some("e1"), StdioStream::Stderr),
        Response::Error { message, .. } if message.contains("stderr was not asked for")
    ));
    let start = Request::StartExec {
        container_id: "ex".into(),
        exec_id: "e1".into(),
    };
    assert_eq!(reply(&h.service, start), Response::Started { pid });
    let event = h.next_event();
    assert!(exited("ex", Some("e1"), pid, 3)(&event), "{event:?}");
    assert_eq!(read_all(out), b"x\n");
    assert_eq!(
        h.signal("ex", Some("nope"), 9),
        Response::Error {
            message: "exec \"nope\" not found in container \"ex\"".into(),
            kind: ErrorKind::NotFound,
        }
    );
    let delete_exec = Request::DeleteExec {
        container_id: "ex".into(),
        exec_id: "e1".into(),
    };
    assert_eq!(reply(&h.service, delete_exec.clone()), Response::Done);
    assert!(matches!(
        reply(&h.service, delete_exec),
        Response::Error { .. }
    ));

    // Pause, pids, stats, update reach the cgroup.
    let id = || "ex".to_string();
    assert_eq!(
        reply(&h.service, Request::Pause { container_id: id() }),
        Response::Done
    );
    assert_eq!(
        reply(&h.service, Request::Resume { container_id: id() }),
        Response::Done
    );
    assert_eq!(
        reply(&h.service, Request::Pids { container_id: id() }),
        Response::Pids(vec![1, 2])
    );
    assert!(matches!(
        reply(&h.service, Request::Stats { container_id: id() }),
        Response::Stats(s) if s.pids_current == 2
    ));
    let update = |resources| Request::Update {
        container_id: id(),
        resources,
    };
    assert_eq!(
        reply(
            &h.service,
            update(json!({ "memory": { "limit": 1048576 } }))
        ),
        Response::Done
    );
    assert!(matches!(
        reply(&h.service, update(json!({ "memory": { "limit": "lots" } }))),
        Response::Error { message, kind: ErrorKind::InvalidArgument }
            if message.starts_with("container \"ex\": invalid OCI resources")
    ));

    assert_eq!(h.delete("ex"), Response::Done);
    let event = h.next_event();
    assert!(exited("ex", None, init, 137)(&event), "{event:?}");
    let calls = h.calls.list();
    assert!(calls.contains(&"signal_all 9".to_string()), "{calls:?}");
    assert_eq!(calls.last().unwrap(), "remove /sys/fs/cgroup/jevm/ex");
}

#[test]
fn a_terminal_is_the_process_stdio_and_can_be_resized() {
    let mut h = harness();
    let tty = Stdio {
        stdin: false,
        stdout: true,
        stderr: false,
        terminal: true,
    };
    let pid = h.created(
        "t",
        &["sh", "-c", "test -t 0 && test -t 2 && echo tty"],
        tty,
    );
    let resize = Request::ResizePty {
        container_id: "t".into(),
        exec_id: None,
        width: 100,
        height: 30,
    };
    assert_eq!(reply(&h.service, resize), Response::Done);
    let out = h.attach("t", None, StdioStream::Stdout);
    h.start("t");
    let event = h.next_event();
    assert!(exited("t", None, pid, 0)(&event), "{event:?}");
    assert_eq!(read_all(out), b"tty\r\n");
    assert_eq!(h.delete("t"), Response::Done);
}

#[test]
fn deleting_a_created_but_never_started_container_kills_its_process() {
    let mut h = harness();
    let pid = h.created("idle", &["true"], Stdio::default());
    assert_eq!(h.delete("idle"), Response::Done);
    let event = h.next_event();
    assert!(
        matches!(&event, Event::Exited { pid: p, .. } if *p == pid),
        "{event:?}"
    );
}

impl Harness {
    fn attach_error(&self, id: &str, exec_id: Option<&str>, stream: StdioStream) -> Response {
        match self.service.handle(Request::AttachStdio {
            container_id: id.into(),
            exec_id: exec_id.map(Into::into),
            stream,
        }) {
            Outcome::Reply(r) => r,
            Outcome::TakeOver(..) => panic!("attach unexpectedly accepted"),
        }
    }
}
