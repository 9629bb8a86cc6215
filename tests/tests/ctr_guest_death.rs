//! A guest that dies or hangs ends its pod's tasks: a panic, a reboot or
//! power-off of the whole guest, the agent killed, the agent frozen. The
//! shim must publish TaskExit for every process of the pod (status 137, as
//! for a VM that is gone: docs/shim.md, "When the guest dies"), and
//! `delete` must leave nothing behind.
//!
//! These are jevm only: the same steps under runc would panic, reboot or
//! freeze the machine itself. What runc can be compared on, it is:
//! `reboot -f`/`poweroff -f` in a container's own PID namespace end only
//! that container, with the status the kernel gives.

use std::time::{Duration, Instant};

use jevm_tests::api::{exit_status_of, Api};
use jevm_tests::ctr::{assert_same, both, default_spec, id, Env, CTR_TIMEOUT, JEVM};
use jevm_tests::ctr_env_or_skip;
use serde_json::{json, Value};

/// How long after the cause a test waits for the exits. Detection itself
/// is immediate (VMM exit) or the liveness timeout (10 s); the rest is the
/// nested, emulated test host.
const DEATH_LIMIT: Duration = Duration::from_secs(90);

fn sh(script: &str) -> Vec<&str> {
    vec!["sh", "-c", script]
}

const ALL_CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// A privileged spec (every capability, nothing masked, no seccomp) that
/// shares the guest's PID and cgroup namespaces: its processes see the
/// agent as PID 1, as a `hostPID` container sees the node's init.
fn guest_root_spec(env: &Env, id: &str, args: &[&str]) -> String {
    let mut spec: Value = serde_json::from_str(&default_spec(env)).expect("ctr oci spec");
    spec["process"]["args"] = json!(args);
    spec["process"]["noNewPrivileges"] = json!(false);
    // `ctr oci spec` has no environment at all (ctr adds the image's).
    spec["process"]["env"] =
        json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);
    let caps = json!(ALL_CAPS.to_vec());
    for set in ["bounding", "effective", "permitted"] {
        spec["process"]["capabilities"][set] = caps.clone();
    }
    spec["root"] = json!({"path": env.rootfs.display().to_string(), "readonly": true});
    let linux = spec["linux"].as_object_mut().expect("linux");
    linux.insert(
        "cgroupsPath".into(),
        json!(format!("/{}/{id}", env.namespace)),
    );
    linux.remove("maskedPaths");
    linux.remove("readonlyPaths");
    linux.remove("seccomp");
    let ns = linux["namespaces"].as_array_mut().expect("namespaces");
    ns.retain(|n| n["type"] != "pid" && n["type"] != "cgroup");
    let path = env.base.join(format!("{id}.spec.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    path.display().to_string()
}

/// What the pod's processes showed when the guest went away.
#[derive(Debug)]
struct Ended {
    /// Exit statuses from TaskExit events: (init, exec).
    events: (Option<u32>, Option<u32>),
    /// From the cause to the last exit.
    took: Duration,
    deleted: i32,
}

/// Runs a container whose init waits for /dev/shm/go, then runs `kill`
/// (in the guest's own PID namespace when `guest_root`); an exec'd process sleeps beside it and
/// triggers the init. Both must end, then delete leaves nothing.
fn guest_dies(env: &Env, name: &str, flags: &[&str], guest_root: bool, kill: &str) -> Ended {
    let cid = id(name, JEVM);
    let api = Api::connect(env);
    let script = format!("while [ ! -e /dev/shm/go ]; do sleep 0.1; done; {kill}");
    match guest_root {
        true => {
            let args = sh(&script);
            let file = guest_root_spec(env, &cid, &args);
            let mut a = vec!["run", "-d", "--runtime", JEVM];
            a.extend_from_slice(flags);
            a.extend_from_slice(&["--config", &file, &cid]);
            let o = env.ctr_out(&a);
            assert_eq!(o.code, 0, "ctr run -d --config: {o:?}");
            env.wait_status(&cid, "RUNNING", *CTR_TIMEOUT);
        }
        false => env.run_detached(JEVM, &cid, flags, &sh(&script)),
    }
    let events = api.subscribe(&cid);
    let o = env.ctr_out(&[
        "task",
        "exec",
        "-d",
        "--exec-id",
        "bystander",
        &cid,
        "sh",
        "-c",
        "touch /dev/shm/go; sleep 1000",
    ]);
    assert_eq!(o.code, 0, "exec: {o:?}");
    let t0 = Instant::now();
    let init = api.wait(&cid, "", DEATH_LIMIT);
    let exec = api.wait(&cid, "bystander", DEATH_LIMIT);
    let took = t0.elapsed();
    assert!(
        init.is_ok() && exec.is_ok(),
        "{name}: no exit within {DEATH_LIMIT:?}: init {init:?} exec {exec:?}"
    );
    // The events may trail the Wait answers a little.
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit_of = |who: &str| exit_event(&events, who);
    while (exit_of(&cid).is_none() || exit_of("bystander").is_none()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let ended = (exit_of(&cid), exit_of("bystander"));
    let del = env.ctr_out(&["task", "delete", &cid]);
    env.ctr_out(&["containers", "delete", &cid]);
    env.assert_gone(&cid);
    Ended {
        events: ended,
        took,
        deleted: del.code,
    }
}

/// The status of the TaskExit event for `who` (a container id for its
/// init, else an exec id), once there is one.
fn exit_event(events: &jevm_tests::api::Events, who: &str) -> Option<u32> {
    events
        .all()
        .into_iter()
        .filter(|e| e.topic == "/tasks/exit")
        .find(|e| exit_id(&e.event) == who)
        .and_then(|e| exit_status_of(&e.event))
}

/// TaskExit's `id` (field 2): the container id for init, else the exec id.
fn exit_id(any: &prost_types::Any) -> String {
    use prost::Message;
    containerd_client::events::TaskExit::decode(any.value.as_slice())
        .map(|e| e.id)
        .unwrap_or_default()
}

fn assert_ended(what: &str, e: &Ended) {
    eprintln!("{what}: tasks ended {:?} after the cause", e.took);
    assert_eq!(e.events, (Some(137), Some(137)), "{what}: {e:?}");
    assert_eq!(e.deleted, 0, "{what}: ctr task delete: {e:?}");
}

#[test]
fn guest_kernel_panic_ends_the_pods_tasks() {
    let env = ctr_env_or_skip!();
    // vm.panic_on_oom=2: any OOM (global or of a memory limit) panics the
    // guest kernel.
    let e = guest_dies(
        &env,
        "panic",
        &["--privileged", "--memory-limit", "67108864"],
        false,
        "echo 2 > /proc/sys/vm/panic_on_oom; tail /dev/zero",
    );
    assert_ended("panic on OOM", &e);
}

#[test]
fn guest_reboot_ends_the_pods_tasks() {
    let env = ctr_env_or_skip!();
    let e = guest_dies(&env, "reboot", &[], true, "reboot -f");
    assert_ended("reboot -f in the guest", &e);
}

#[test]
fn guest_poweroff_ends_the_pods_tasks() {
    let env = ctr_env_or_skip!();
    let e = guest_dies(&env, "poweroff", &[], true, "poweroff -f");
    assert_ended("poweroff -f in the guest", &e);
}

#[test]
fn agent_killed_ends_the_pods_tasks() {
    let env = ctr_env_or_skip!();
    // PID 1 cannot be killed by a signal from its own namespace; a fault
    // kills it. Zeroing its code makes the next instruction it runs fault.
    let kill = "grep ' r-xp ' /proc/1/maps | while read range rest; do \
                s=$((0x${range%-*})); e=$((0x${range#*-})); \
                dd if=/dev/zero of=/proc/1/mem bs=4096 seek=$((s/4096)) count=$(((e-s)/4096)) conv=notrunc; \
                done; sleep 1000";
    let e = guest_dies(&env, "agentkill", &[], true, kill);
    assert_ended("agent killed", &e);
}

#[test]
fn agent_hung_is_caught_by_the_liveness_check() {
    let env = ctr_env_or_skip!();
    // The agent (all its threads) frozen in a cgroup of its own: the guest
    // kernel still runs, nothing answers.
    let freeze = "mkdir -p /dev/shm/cg && mount -t cgroup2 none /dev/shm/cg && \
                  mkdir /dev/shm/cg/frozen && echo 1 > /dev/shm/cg/frozen/cgroup.procs && \
                  echo 1 > /dev/shm/cg/frozen/cgroup.freeze; sleep 1000";
    // The default liveness timeout (10 s); the test environment's own is
    // longer (hack/containerd-env says why).
    let config = std::env::var("JEVM_CTR_LIVENESS_10S").expect("JEVM_CTR_LIVENESS_10S");
    let e = guest_dies(
        &env,
        "hang",
        &["--runtime-config-path", &config],
        true,
        freeze,
    );
    assert_ended("agent frozen", &e);
    assert!(
        e.took >= Duration::from_secs(5),
        "a hang is found by the liveness check, not at once: {e:?}"
    );
}

/// `reboot -f` and `poweroff -f` in a container's own PID namespace end
/// that namespace only (the kernel's reboot_pid_ns): the init dies of
/// SIGHUP resp. SIGINT, under runc as under jevm, and the VM lives on.
#[test]
fn reboot_and_poweroff_in_a_container_end_only_it_like_runc() {
    let env = ctr_env_or_skip!();
    let (r, j) = both(|rt| {
        let mut codes = Vec::new();
        for cmd in ["reboot -f", "poweroff -f"] {
            let id = id("nsreboot", rt);
            let o = env.run(rt, &id, &["--privileged"], &sh(cmd));
            env.assert_gone(&id);
            codes.push((cmd, o.code));
        }
        codes
    });
    assert_eq!(r, vec![("reboot -f", 129), ("poweroff -f", 130)], "runc");
    assert_same("reboot/poweroff in a PID namespace", &r, &j);
}

/// The tid of the thread of `pid` whose name is `name`.
fn thread_named(pid: u32, name: &str) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .and_then(|t| t.file_name().to_str()?.parse().ok())
}

/// A VMM thread that makes a syscall outside its seccomp allow-list gets
/// SIGSYS from the kernel, and the jail's handler reports it and ends the
/// VMM (docs/security.md). No guest can be made to do that on purpose (it
/// would be a bug), so the test delivers the same signal to the running
/// pod's vCPU thread: the report must reach containerd's log, the task
/// must end with an exit (the status of a VM that is gone), and delete
/// must leave nothing.
#[test]
fn a_vmm_thread_killed_by_its_filter_ends_the_task_with_its_report_in_containerds_log() {
    let env = ctr_env_or_skip!();
    let log = env.base.join("containerd.log");
    let reports = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("jevm: seccomp: a vcpu thread made syscall")
            .count()
    };
    let before = reports();
    let cid = id("sigsys", JEVM);
    let api = Api::connect(&env);
    env.run_detached(JEVM, &cid, &[], &sh("while true; do sleep 1; done"));
    let events = api.subscribe(&cid);
    let shims = env.shims(Some(&cid));
    assert_eq!(shims.len(), 1, "{cid}: shims {shims:?}");
    let vcpu = thread_named(shims[0], "vcpu0")
        .unwrap_or_else(|| panic!("{cid}: shim {} has no vcpu0 thread", shims[0]));
    let t0 = Instant::now();
    // SAFETY: tgkill(2) on a thread of the shim serving our own container.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, shims[0] as i32, vcpu, libc::SIGSYS) };
    assert_eq!(rc, 0, "tgkill: {}", std::io::Error::last_os_error());
    // containerd answers a Wait on a shim that died with the error of the
    // lost connection; the exit comes as containerd's TaskExit.
    let deadline = Instant::now() + DEATH_LIMIT;
    let exit = || exit_event(&events, &cid);
    while exit().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "SIGSYS on vcpu0: the exit event came {:?} after",
        t0.elapsed()
    );
    let shim_runs = std::path::Path::new(&format!("/proc/{}", shims[0])).exists();
    assert_eq!(
        exit(),
        Some(137),
        "{cid}: no TaskExit event (the shim {} {}; events seen: {:?})",
        shims[0],
        if shim_runs { "still runs" } else { "is gone" },
        events.topics()
    );
    assert!(!shim_runs, "the shim still runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reports() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(reports() > before, "no seccomp report in {}", log.display());
    env.ctr_out(&["task", "delete", &cid]);
    let o = env.ctr_out(&["containers", "delete", &cid]);
    assert_eq!(o.code, 0, "containers delete: {o:?}");
    env.assert_gone(&cid);
    // The FIFOs `ctr run -d` made stay when its task died with its shim,
    // under runc as well (see ctr_e2e's shim_killed_mid_run): ctr's, not
    // the runtime's.
    env.remove_ctr_fifos(&cid);
}
