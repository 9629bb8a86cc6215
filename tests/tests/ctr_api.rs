//! containerd end to end through its own API, the way the Go client drives
//! it, for what `ctr` cannot say: every test runs the same steps under runc
//! and jevm, checks runc's result against what the test expects, then
//! requires jevm's to be the same. Needs the private containerd of
//! `hack/containerd-env` (run through `hack/e2e`); tests may run in parallel.

use std::time::{Duration, SystemTime};

use jevm_tests::api::{process, Api, CallError, Stdio, CALL_TIMEOUT};
use jevm_tests::ctr::{assert_same, both, id, Env};
use jevm_tests::ctr_env_or_skip;

fn sh(script: &str) -> Vec<&str> {
    vec!["sh", "-c", script]
}

/// A detached container that runs until it is killed.
fn sleeper(env: &Env, rt: &str, name: &str) -> String {
    let id = id(name, rt);
    env.run_detached(
        rt,
        &id,
        &[],
        &sh("trap 'exit 0' TERM; while true; do sleep 0.2; done"),
    );
    id
}

/// What `seq -s " " 1 N` writes on a terminal: the numbers, then CR LF.
fn seq_bytes(n: u32) -> usize {
    (1..=n).map(|i| i.to_string().len()).sum::<usize>() + (n as usize - 1) + 2
}

/// Issue: an exec with a terminal and ~6.9 MB of output, run again and
/// again, at some iteration never delivered its exit. Each iteration must
/// deliver all the output and its exit within the call timeout.
#[test]
fn tty_exec_with_large_output_finishes_100_times() {
    let env = ctr_env_or_skip!();
    const N: u32 = 1_000_000;
    let iterations: u32 = std::env::var("JEVM_E2E_TTY_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    if iterations < 100 {
        // Not a skip, but not the whole loop either: the summary says so.
        jevm_tests::ctr::skipped(&format!(
            "ran {iterations} of the 100 iterations (JEVM_E2E_TTY_LOOPS)"
        ));
    }
    let (r, j) = both(|rt| {
        let api = Api::connect(&env);
        let id = sleeper(&env, rt, "ttyloop");
        let t0 = std::time::Instant::now();
        let mut done = 0usize;
        let mut failure = None;
        for i in 0..iterations {
            let exec = format!("big{i}");
            let mut io = Stdio::output(true);
            let spec = process(&sh(&format!("seq -s ' ' {N}")), true);
            let step = api
                .exec(&id, &exec, &spec, &io)
                .and_then(|()| api.start(&id, &exec))
                .and_then(|_| api.wait(&id, &exec, CALL_TIMEOUT));
            let exit = match step {
                Ok(e) => e,
                Err(e) => {
                    failure = Some(format!("iteration {i}: {e:?}"));
                    break;
                }
            };
            let out = io.stdout(Duration::from_secs(60)).map(|o| o.len());
            let deleted = api.delete_process(&id, &exec).map(|e| e.status);
            if (exit.status, out, &deleted) != (0, Some(seq_bytes(N)), &Ok(0)) {
                failure = Some(format!(
                    "iteration {i}: status {} output {out:?} (want {}) delete {deleted:?}",
                    exit.status,
                    seq_bytes(N)
                ));
                break;
            }
            done += 1;
        }
        eprintln!(
            "{rt}: {done} tty execs of {} bytes in {:?}",
            seq_bytes(N),
            t0.elapsed()
        );
        env.remove(&id);
        (done, failure)
    });
    assert_eq!(r, (iterations as usize, None), "runc");
    assert_same("tty exec loop", &r, &j);
}

/// runc's shim answers ResizePty on a process without a terminal with
/// success and does nothing.
#[test]
fn resize_pty_without_a_terminal_is_accepted() {
    let env = ctr_env_or_skip!();
    let (r, j) = both(|rt| {
        let api = Api::connect(&env);
        let id = sleeper(&env, rt, "resize");
        let init = api.resize_pty(&id, "", 100, 40);
        let io = Stdio::output(false);
        let exec = api.exec(&id, "x", &process(&["sleep", "5"], false), &io);
        let exec_resize = api.resize_pty(&id, "x", 100, 40);
        let unknown = api.resize_pty(&id, "nope", 100, 40).map_err(|e| match e {
            CallError::Status { code, .. } => format!("{code:?}"),
            other => format!("{other:?}"),
        });
        let _ = api.delete_process(&id, "x");
        env.remove(&id);
        (init, exec, exec_resize, unknown)
    });
    assert_eq!(
        (&r.0, &r.1, &r.2),
        (&Ok(()), &Ok(()), &Ok(())),
        "runc: {r:?}"
    );
    assert_same("ResizePty without a terminal", &r, &j);
}

/// Exit times come from the host's clock and follow the start: a client
/// that compares the exit with the start it saw must see them in order.
#[test]
fn exit_times_follow_the_start() {
    let env = ctr_env_or_skip!();
    let (r, j) = both(|rt| {
        let api = Api::connect(&env);
        let before_run = SystemTime::now();
        let id = sleeper(&env, rt, "exittime");
        let events = api.subscribe(&id);
        let mut checks = Vec::new();
        // A process that runs a while, and one that exits at once (its
        // exit may reach the shim before Start returns).
        for (exec, args) in [("slow", vec!["sleep", "1"]), ("quick", vec!["true"])] {
            let io = Stdio::output(false);
            api.exec(&id, exec, &process(&args, false), &io).unwrap();
            let before_start = SystemTime::now();
            api.start(&id, exec).unwrap();
            let after_start = SystemTime::now();
            let exit = api.wait(&id, exec, CALL_TIMEOUT).unwrap();
            let started = events
                .all()
                .into_iter()
                .find(|e| e.topic == "/tasks/exec-started" && exec_of(&e.event) == exec)
                .and_then(|e| e.at);
            let at = exit.at.expect("exited_at");
            checks.push((
                exec,
                at > before_start,
                exec != "slow" || at > after_start,
                // runc stamps a quick exit when it reaps it, which may be
                // before TaskExecStarted went out; only a process that ran a
                // while has an order to keep there.
                exec != "slow" || started.is_some_and(|s| at > s),
            ));
            api.delete_process(&id, exec).unwrap();
        }
        env.ctr_out(&["task", "kill", &id]);
        let init = api.wait(&id, "", CALL_TIMEOUT).unwrap();
        let started = events
            .wait_for("/tasks/start", Duration::ZERO)
            .and_then(|e| e.at);
        let at = init.at.expect("init exited_at");
        checks.push((
            "init",
            at > before_run,
            true,
            // Subscribed after the start: the task's start is before now.
            started.is_none_or(|s| at > s),
        ));
        env.remove(&id);
        checks
    });
    for c in &r {
        assert_eq!((c.1, c.2, c.3), (true, true, true), "runc: {c:?}");
    }
    assert_same("exit times after the start", &r, &j);
}

/// The exec id in a TaskExecStarted event (field 2, a string).
fn exec_of(any: &prost_types::Any) -> String {
    use prost::Message;
    containerd_client::events::TaskExecStarted::decode(any.value.as_slice())
        .map(|e| e.exec_id)
        .unwrap_or_default()
}

/// An exec created and never started, deleted, then the task: the exit
/// statuses runc's shim gives.
#[test]
fn exec_created_never_started_then_deleted() {
    let env = ctr_env_or_skip!();
    let (r, j) = both(|rt| {
        let api = Api::connect(&env);
        let id = sleeper(&env, rt, "unstarted");
        let io1 = Stdio::output(false);
        api.exec(&id, "e1", &process(&["true"], false), &io1)
            .unwrap();
        let e1 = api.delete_process(&id, "e1").map(|e| e.status);
        let io2 = Stdio::output(false);
        api.exec(&id, "e2", &process(&["true"], false), &io2)
            .unwrap();
        api.kill(&id, "", libc::SIGKILL as u32).unwrap();
        let init = api.wait(&id, "", CALL_TIMEOUT).map(|e| e.status);
        let e2 = api.delete_process(&id, "e2").map(|e| e.status);
        let task = api.delete_task(&id).map(|e| e.status);
        env.ctr_out(&["containers", "delete", &id]);
        env.remove_ctr_fifos(&id);
        env.assert_gone(&id);
        (e1, init, e2, task)
    });
    assert_eq!((&r.0, &r.1), (&Ok(0), &Ok(137)), "runc: {r:?}");
    assert_same("deleting never-started execs", &r, &j);
}

/// A user namespace with uid/gid maps (`ctr run --uidmap/--gidmap`, as
/// Kubernetes' hostUsers: false asks): containerd prepares a remapped
/// snapshot; the container sees itself as root, the host sees the
/// mapped ids.
#[test]
fn user_namespace_maps_ids_like_runc() {
    let env = ctr_env_or_skip!();
    let (r, j) = both(|rt| {
        let id = id("userns", rt);
        let o = env.run(
            rt,
            &id,
            &["--uidmap", "0:200000:65536", "--gidmap", "0:200000:65536"],
            &sh(
                "id; cat /proc/self/uid_map /proc/self/gid_map | tr -s ' '; \
                 touch /made && stat -c '%u:%g' /made /bin/sh; \
                 su -s /bin/sh nobody -c id 2>&1 | head -1",
            ),
        );
        env.assert_gone(&id);
        o
    });
    assert_eq!(r.code, 0, "runc: {r:?}");
    assert!(
        r.stdout.starts_with("uid=0(root) gid=0(root)"),
        "runc: {r:?}"
    );
    assert!(r.stdout.contains(" 0 200000 65536"), "runc: {r:?}");
    assert_same("user namespace", &r, &j);
}
