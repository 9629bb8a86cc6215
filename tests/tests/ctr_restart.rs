//! containerd restarted under running shims, as an upgrade (or the CRI
//! tests) do it: the same steps under runc and jevm, compared. These tests
//! stop and start the one private containerd of `hack/containerd-env`, so
//! `hack/e2e` runs this binary alone, one test at a time.

use std::process::Command;
use std::time::Duration;

use jevm_tests::api::{Api, CallError};
use jevm_tests::ctr::{assert_same, both, id, Env, JEVM};
use jevm_tests::ctr_env_or_skip;

/// containerd's task status numbers (`containerd.v1.types.Status`).
const RUNNING: i32 = 2;
const STOPPED: i32 = 3;

fn control(action: &str) {
    let script = std::env::var("JEVM_CTR_CONTROL")
        .expect("JEVM_CTR_CONTROL (hack/containerd-env) is not set");
    let st = Command::new(&script).arg(action).status().unwrap();
    assert!(st.success(), "{script} {action}: {st}");
}

fn sh(script: &str) -> Vec<&str> {
    vec!["sh", "-c", script]
}

fn code(r: Result<u32, CallError>) -> Result<u32, String> {
    r.map_err(|e| format!("{e:?}"))
}

/// What a client sees of two tasks after containerd was down for
/// `downtime`, during which one of them exited with status 7.
#[derive(Debug, PartialEq)]
struct AfterRestart {
    wait_exited: Result<u32, String>,
    state_exited: Result<(i32, u32), String>,
    state_running: Result<i32, String>,
    kill_running: Result<(), String>,
    wait_killed: Result<u32, String>,
    delete_exited: Result<u32, String>,
    delete_killed: Result<u32, String>,
}

fn restart_with_an_exit_while_down(
    env: &Env,
    rt: &str,
    downtime: Duration,
) -> (AfterRestart, Duration) {
    let dir = tempfile::tempdir_in(&env.base).unwrap();
    let exits = id("rs-exit", rt);
    env.run_detached(
        rt,
        &exits,
        &[
            "--mount",
            &format!(
                "type=bind,src={},dst=/t,options=rbind:ro",
                dir.path().display()
            ),
        ],
        &sh("while [ ! -e /t/go ]; do sleep 0.1; done; exit 7"),
    );
    let runs = id("rs-run", rt);
    env.run_detached(rt, &runs, &[], &sh("while true; do sleep 0.2; done"));

    control("stop");
    std::fs::write(dir.path().join("go"), "").unwrap();
    std::thread::sleep(downtime);
    control("start");

    let api = Api::connect(env);
    let t = Duration::from_secs(60);
    let r = AfterRestart {
        wait_exited: code(api.wait(&exits, "", t).map(|e| e.status)),
        state_exited: api
            .get(&exits, "")
            .map(|(s, e)| (s, e.status))
            .map_err(|e| format!("{e:?}")),
        state_running: api
            .get(&runs, "")
            .map(|(s, _)| s)
            .map_err(|e| format!("{e:?}")),
        kill_running: api
            .kill(&runs, "", libc::SIGKILL as u32)
            .map_err(|e| format!("{e:?}")),
        wait_killed: code(api.wait(&runs, "", t).map(|e| e.status)),
        delete_exited: code(api.delete_task(&exits).map(|e| e.status)),
        delete_killed: code(api.delete_task(&runs).map(|e| e.status)),
    };
    for c in [&exits, &runs] {
        env.ctr_out(&["containers", "delete", c]);
        env.remove_ctr_fifos(c);
        env.assert_gone(c);
    }
    (r, downtime)
}

/// containerd down for 3 s while a task exits: afterwards every call on
/// both tasks answers as before the restart.
#[test]
fn tasks_answer_after_a_containerd_restart() {
    let env = ctr_env_or_skip!();
    let (r, j) = both(|rt| restart_with_an_exit_while_down(&env, rt, Duration::from_secs(3)).0);
    let want = AfterRestart {
        wait_exited: Ok(7),
        state_exited: Ok((STOPPED, 7)),
        state_running: Ok(RUNNING),
        kill_running: Ok(()),
        wait_killed: Ok(137),
        delete_exited: Ok(7),
        delete_killed: Ok(137),
    };
    assert_eq!(r, want, "runc");
    assert_same("after a containerd restart", &r, &j);
}

/// jevm only: runc's shim drops an event after ~15 s of retries; jevm's
/// keeps it until containerd takes it. 25 s of downtime, no exit lost.
///
/// A subscriber cannot be there when containerd comes back (the shim may
/// deliver first), so delivery is read from containerd's log, where the
/// shim says it: this binary runs alone, and the only event made while
/// containerd was down is that exit.
#[test]
fn jevm_keeps_an_exit_through_25s_of_containerd_downtime() {
    let env = ctr_env_or_skip!();
    let log = env.base.join("containerd.log");
    let delivered = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("event /tasks/exit: published after")
            .count()
    };
    let before = delivered();
    let (r, took) = restart_with_an_exit_while_down(&env, JEVM, Duration::from_secs(25));
    assert_eq!((r.wait_exited, r.delete_exited), (Ok(7), Ok(7)));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while delivered() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        delivered() > before,
        "the exit made while containerd was down for {took:?} never reached it (no \"published after\" in {})",
        log.display()
    );
}
