//! Soak: create/start/kill/delete cycles of jevm containers through
//! containerd, several at a time, with every 5th cycle's shim SIGKILLed
//! while its task runs and containerd restarted once in the middle.
//! Afterwards nothing of jevm's may be left (shim, VM, mount, pod
//! directory, file in the run directory, bundle, socket in containerd's
//! shim directory, memfd, cgroup), and every task must have been
//! accounted for by an exit event. Prints the cycle latency (p50/p99) of
//! the first and the last cycles, to show drift.
//!
//! `make test` runs a short soak (`JEVM_SOAK_CYCLES`, 40 by default);
//! `hack/soak` runs the full 1000. This binary stops and starts
//! containerd, so `hack/e2e` runs it alone.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use jevm_tests::ctr::{mounts_under, processes, walk, Env, Events, CTR_TIMEOUT, JEVM};
use jevm_tests::ctr_env_or_skip;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn control(action: &str) {
    let script = std::env::var("JEVM_CTR_CONTROL")
        .expect("JEVM_CTR_CONTROL (hack/containerd-env) is not set");
    let st = std::process::Command::new(&script)
        .arg(action)
        .status()
        .unwrap();
    assert!(st.success(), "{script} {action}: {st}");
}

/// Where containerd 1.6 and the shim crate put shim sockets.
const SHIM_SOCKETS: &str = "/run/containerd/s/";

/// containerd's shim sockets (`/run/containerd/s/<hash>`): one per shim.
fn shim_sockets() -> BTreeSet<String> {
    std::fs::read_dir(SHIM_SOCKETS)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes holding a memfd the VMM made (guest memory of a booted VM).
fn jevm_memfds() -> Vec<String> {
    let mut out = Vec::new();
    for (pid, args) in processes() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if t.starts_with("/memfd:jevm") {
                    out.push(format!("{pid} ({}): {t}", args.join(" ")));
                }
            }
        }
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One cycle; Err says what went wrong. `gate` is held (shared) around
/// every step, so containerd's restart falls between steps.
fn cycle(env: &Env, id: &str, kill_shim: bool, gate: &RwLock<()>) -> Result<(), String> {
    {
        let _g = gate.read().unwrap();
        let mut args = vec!["run", "-d", "--runtime", JEVM, &env.image, id];
        args.extend(["sleep", "3600"]);
        let o = env.ctr_out(&args);
        if o.code != 0 {
            return Err(format!("ctr run -d: {o:?}"));
        }
    }
    {
        let _g = gate.read().unwrap();
        let s = env.wait_status(id, "RUNNING", *CTR_TIMEOUT);
        if s.as_deref() != Some("RUNNING") {
            return Err(format!("not running: {s:?}"));
        }
        // The shim's socket is where the leak check looks for it.
        let address = std::fs::read_to_string(env.task_state_dir().join(id).join("address"))
            .map_err(|e| format!("the bundle's address file: {e}"))?;
        let socket = address.trim().trim_start_matches("unix://");
        if !socket.starts_with(SHIM_SOCKETS) || !Path::new(socket).exists() {
            return Err(format!(
                "the shim's socket {socket} is not in {SHIM_SOCKETS}"
            ));
        }
    }
    {
        let _g = gate.read().unwrap();
        if kill_shim {
            let shims = env.shims(Some(id));
            if shims.len() != 1 {
                return Err(format!("want one shim, found {shims:?}"));
            }
            // SAFETY: kill(2) on the PID of the shim serving our container.
            unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) };
            // containerd notices, runs the shim's `delete` on the bundle and
            // removes the task itself.
            let deadline = Instant::now() + *CTR_TIMEOUT;
            while env.task_status(id).is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
        } else {
            let o = env.ctr_out(&["task", "kill", "-s", "SIGKILL", id]);
            if o.code != 0 {
                return Err(format!("ctr task kill: {o:?}"));
            }
            let s = env.wait_status(id, "STOPPED", *CTR_TIMEOUT);
            if s.as_deref() != Some("STOPPED") {
                return Err(format!("not stopped after SIGKILL: {s:?}"));
            }
            let o = env.ctr_out(&["task", "delete", id]);
            if o.code != 0 {
                return Err(format!("ctr task delete: {o:?}"));
            }
        }
    }
    let _g = gate.read().unwrap();
    if env.task_status(id).is_some() {
        return Err("the task is still listed".into());
    }
    let o = env.ctr_out(&["containers", "delete", id]);
    if o.code != 0 {
        return Err(format!("ctr containers delete: {o:?}"));
    }
    env.remove_ctr_fifos(id);
    Ok(())
}

#[test]
fn cycles_with_killed_shims_and_a_containerd_restart_leave_nothing() {
    let env = ctr_env_or_skip!();
    let cycles = env_number("JEVM_SOAK_CYCLES", 40);
    let parallel = env_number("JEVM_SOAK_PARALLEL", 10);
    let sockets_before = shim_sockets();
    let run = format!("soak{}", std::process::id());
    let ids: Vec<String> = (0..cycles).map(|i| format!("e2e-{run}-{i}")).collect();

    let gate = RwLock::new(());
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let restarted = AtomicUsize::new(0);
    let latencies = Mutex::new(vec![Duration::ZERO; cycles]);
    let failures = Mutex::new(Vec::new());
    let event_logs: Mutex<Vec<Events>> = Mutex::new(vec![env.events()]);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..parallel {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= cycles {
                    break;
                }
                let start = Instant::now();
                let r = cycle(&env, &ids[i], i % 5 == 4, &gate);
                latencies.lock().unwrap()[i] = start.elapsed();
                if let Err(e) = r {
                    failures.lock().unwrap().push(format!("{}: {e}", ids[i]));
                    env.cleanup(&ids[i]);
                }
                // Halfway, with other cycles' tasks running: restart
                // containerd (between steps), and subscribe again.
                if done.fetch_add(1, Ordering::SeqCst) + 1 == cycles / 2
                    && restarted.fetch_add(1, Ordering::SeqCst) == 0
                {
                    let _g = gate.write().unwrap();
                    control("stop");
                    std::thread::sleep(Duration::from_secs(2));
                    control("start");
                    event_logs.lock().unwrap().push(env.events());
                }
            });
        }
    });
    let took = t0.elapsed();
    // The last events reach the subscribers just after the last delete.
    std::thread::sleep(Duration::from_secs(2));

    let failures = failures.into_inner().unwrap();
    let mut left = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        left.clear();
        for id in &ids {
            left.extend(
                env.shims(Some(id))
                    .into_iter()
                    .map(|p| format!("shim {p} of {id}")),
            );
        }
        left.extend(
            env.tasks()
                .into_iter()
                .filter(|t| t.contains(&run))
                .map(|t| format!("task {t}")),
        );
        left.extend(
            env.containers()
                .into_iter()
                .filter(|c| c.contains(&run))
                .map(|c| format!("container {c}")),
        );
        left.extend(mounts_under(&env.run_dir));
        left.extend(env.run_dir_leftovers());
        left.extend(
            walk(&env.task_state_dir())
                .into_iter()
                .filter(|f| f.to_string_lossy().contains(&run))
                .map(|f| format!("bundle file {}", f.display())),
        );
        left.extend(
            shim_sockets()
                .difference(&sockets_before)
                .map(|s| format!("containerd shim socket /run/containerd/s/{s}")),
        );
        left.extend(
            jevm_memfds()
                .into_iter()
                .map(|m| format!("memfd held by {m}")),
        );
        left.extend(
            walk(Path::new("/sys/fs/cgroup"))
                .into_iter()
                .filter(|f| f.to_string_lossy().contains(&run))
                .map(|f| format!("cgroup {}", f.display())),
        );
        if left.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    let logs = event_logs.into_inner().unwrap();
    let unaccounted: Vec<&String> = ids
        .iter()
        .filter(|id| {
            !logs
                .iter()
                .any(|l| l.topics_for(id).iter().any(|t| t == "/tasks/exit"))
        })
        .collect();

    let lat = latencies.into_inner().unwrap();
    let window = (cycles / 10).clamp(1, 100);
    let mut first: Vec<Duration> = lat[..window].to_vec();
    let mut last: Vec<Duration> = lat[cycles - window..].to_vec();
    first.sort();
    last.sort();
    eprintln!(
        "soak: {cycles} cycles, {parallel} at a time, {} shims SIGKILLed, containerd restarted once, in {:.0} s; \
         cycle latency first {window}: p50 {:.0} ms p99 {:.0} ms; last {window}: p50 {:.0} ms p99 {:.0} ms",
        cycles / 5,
        took.as_secs_f64(),
        percentile(&first, 0.5).as_secs_f64() * 1e3,
        percentile(&first, 0.99).as_secs_f64() * 1e3,
        percentile(&last, 0.5).as_secs_f64() * 1e3,
        percentile(&last, 0.99).as_secs_f64() * 1e3,
    );
    // Everything that went wrong, in one report: a failed cycle must not
    // hide what was left behind.
    let mut wrong = Vec::new();
    if !failures.is_empty() {
        wrong.push(format!(
            "{} cycles failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        ));
    }
    if !left.is_empty() {
        wrong.push(format!(
            "left behind after the soak:\n  {}",
            left.join("\n  ")
        ));
    } else {
        eprintln!("soak: nothing left behind");
    }
    if !unaccounted.is_empty() {
        wrong.push(format!("tasks with no exit event: {unaccounted:?}"));
    } else {
        eprintln!("soak: every task has its /tasks/exit event");
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
