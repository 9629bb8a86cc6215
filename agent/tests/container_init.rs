//! The `container-init` stage run for real on this host (root, busybox
//! rootfs, a temporary cgroup), checked against what it must produce and,
//! where runc is installed, against runc given the same spec.

mod common;

use common::{
    cap_mask, create_plan, default_spec, exec_plan, mounts_under, require_host, run, run_env,
    run_runc, spawn_stage, Answer, Cgroup, Rootfs,
};
use serde_json::json;

const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn status_line(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

#[test]
fn exit_codes_pass_through() {
    require_host!();
    let rootfs = Rootfs::new();
    for code in [0, 1, 42] {
        let spec = default_spec(rootfs.path(), &["sh", "-c", &format!("exit {code}")]);
        let o = run(&format!("exit{code}"), &spec);
        assert_eq!(o.create_error, None);
        assert_eq!(o.start_error, None);
        assert_eq!(o.status, Some(code), "{o:?}");
    }
    assert!(mounts_under(rootfs.path()).is_empty());
}

#[test]
fn container_process_is_pid_1_with_its_hostname() {
    require_host!();
    let rootfs = Rootfs::new();
    let mut spec = default_spec(
        rootfs.path(),
        &[
            "sh",
            "-c",
            "echo $$; hostname; cat /proc/1/cmdline | tr '\\0' ' '",
        ],
    );
    spec["hostname"] = json!("jevm-test");
    let o = run("pid1", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert_eq!(
        o.stdout,
        "1\njevm-test\nsh -c echo $$; hostname; cat /proc/1/cmdline | tr '\\0' ' ' "
    );
    // The PID reported is the container process in the host's namespace.
    assert!(o.pid.is_some());
}

#[test]
fn env_cwd_and_user_are_the_specs() {
    require_host!();
    let rootfs = Rootfs::new();
    let mut spec = default_spec(
        rootfs.path(),
        &["sh", "-c", "env | sort; pwd; id -u; id -g; id -G; umask"],
    );
    spec["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    spec["process"]["cwd"] = json!("/work/dir");
    spec["process"]["user"] =
        json!({"uid": 1000, "gid": 1000, "additionalGids": [5, 1000, 7], "umask": 63});
    let o = run("user", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert_eq!(
        o.stdout,
        "FOO=bar baz\nHOME=/home/u\nPATH=/bin\nPWD=/work/dir\nSHLVL=1\n/work/dir\n1000\n1000\n1000 5 7\n0077\n"
    );
    if let Some((code, out, err)) = run_runc("user", &spec) {
        assert_eq!(code, 0, "runc: {err}");
        assert_eq!(o.stdout, out, "differs from runc");
    }
}

#[test]
fn default_capabilities_match_the_spec() {
    require_host!();
    let rootfs = Rootfs::new();
    let spec = default_spec(rootfs.path(), &["cat", "/proc/self/status"]);
    let o = run("caps", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    let want = cap_mask(&DEFAULT_CAPS);
    assert_eq!(status_line(&o.stdout, "CapBnd"), want);
    assert_eq!(status_line(&o.stdout, "CapEff"), want);
    assert_eq!(status_line(&o.stdout, "CapPrm"), want);
    assert_eq!(status_line(&o.stdout, "CapInh"), "0000000000000000");
    assert_eq!(status_line(&o.stdout, "CapAmb"), "0000000000000000");
    assert_eq!(status_line(&o.stdout, "NoNewPrivs"), "1");
    if let Some((code, out, _)) = run_runc("caps", &spec) {
        assert_eq!(code, 0);
        for key in [
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Seccomp",
        ] {
            assert_eq!(
                status_line(&o.stdout, key),
                status_line(&out, key),
                "{key} differs from runc"
            );
        }
    }
}

#[test]
fn ambient_capabilities_reach_a_non_root_user() {
    require_host!();
    let rootfs = Rootfs::new();
    let mut spec = default_spec(rootfs.path(), &["cat", "/proc/self/status"]);
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    let one = json!(["CAP_NET_BIND_SERVICE"]);
    spec["process"]["capabilities"] = json!({
        "bounding": ["CAP_NET_BIND_SERVICE", "CAP_KILL"],
        "effective": one, "permitted": one, "inheritable": one, "ambient": one,
    });
    spec["process"]["noNewPrivileges"] = json!(false);
    let o = run("ambient", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    let net = cap_mask(&["CAP_NET_BIND_SERVICE"]);
    assert_eq!(status_line(&o.stdout, "CapEff"), net);
    assert_eq!(status_line(&o.stdout, "CapAmb"), net);
    assert_eq!(status_line(&o.stdout, "CapInh"), net);
    assert_eq!(
        status_line(&o.stdout, "CapBnd"),
        cap_mask(&["CAP_NET_BIND_SERVICE", "CAP_KILL"])
    );
    assert_eq!(status_line(&o.stdout, "NoNewPrivs"), "0");
    assert_eq!(status_line(&o.stdout, "Uid"), "1000\t1000\t1000\t1000");
}

#[test]
fn rlimits_are_set() {
    require_host!();
    let rootfs = Rootfs::new();
    let mut spec = default_spec(
        rootfs.path(),
        &["sh", "-c", "ulimit -n; ulimit -Hn; ulimit -c"],
    );
    spec["process"]["rlimits"] = json!([
        {"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200},
        {"type": "RLIMIT_CORE", "soft": 0, "hard": 0},
    ]);
    let o = run("rlimits", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert_eq!(o.stdout, "100\n200\n0\n");
}

#[test]
fn masked_and_readonly_paths() {
    require_host!();
    let rootfs = Rootfs::new();
    let spec = default_spec(
        rootfs.path(),
        &[
            "sh",
            "-c",
            "wc -c < /proc/keys; ls -A /sys/firmware | wc -l; \
             echo 1 > /proc/sys/kernel/domainname && echo wrote; \
             grep -c ' /proc/sys ro,' /proc/self/mountinfo",
        ],
    );
    let o = run("masked", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert_eq!(o.stdout, "0\n0\n1\n");
    assert!(o.stderr.contains("Read-only file system"), "{o:?}");
}

#[test]
fn readonly_rootfs_refuses_writes() {
    require_host!();
    let rootfs = Rootfs::new();
    let mut spec = default_spec(
        rootfs.path(),
        &[
            "sh",
            "-c",
            "touch /x; echo $?; touch /tmp/y; echo $?; touch /run/z; echo $?",
        ],
    );
    spec["root"]["readonly"] = json!(true);
    let o = run("ro", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    // / and /tmp (part of the rootfs) refuse; /run is a tmpfs of its own.
    assert_eq!(o.stdout, "1\n1\n0\n");
    assert!(o.stderr.contains("Read-only file system"), "{o:?}");
    assert!(!rootfs.path().join("x").exists());
}

#[test]
fn dev_is_what_runc_makes() {
    require_host!();
    let rootfs = Rootfs::new();
    let script = "cd /dev && for f in $(ls -A | sort); do stat -c '%N %F %a %u:%g %t:%T' $f; done";
    let spec = default_spec(rootfs.path(), &["sh", "-c", script]);
    let o = run("dev", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    for want in [
        "null character special file 666 0:0 1:3",
        "zero character special file 666 0:0 1:5",
        "full character special file 666 0:0 1:7",
        "random character special file 666 0:0 1:8",
        "urandom character special file 666 0:0 1:9",
        "tty character special file 666 0:0 5:0",
        "'ptmx' -> 'pts/ptmx' symbolic link 777 0:0 0:0",
        "'fd' -> '/proc/self/fd' symbolic link 777 0:0 0:0",
        "'stdin' -> '/proc/self/fd/0' symbolic link",
        "pts directory",
        "shm directory 1777",
        "mqueue directory",
    ] {
        assert!(o.stdout.contains(want), "missing {want:?} in\n{}", o.stdout);
    }
    if let Some((code, out, err)) = run_runc("dev", &spec) {
        assert_eq!(code, 0, "runc: {err}");
        // runc links /dev/core only when its kernel has /proc/kcore (this
        // machine's may not); the stage always does (see devices.rs).
        let strip = |s: &str| -> String {
            s.lines()
                .filter(|l| !l.contains("'core' -> '/proc/kcore'"))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        assert_eq!(strip(&o.stdout), strip(&out), "/dev differs from runc's");
    }
}

#[test]
fn mounts_match_runc() {
    require_host!();
    let rootfs = Rootfs::new();
    // Mount point, per-mount options, fs type, per-superblock options:
    // everything but ids, which differ per run.
    let script = "awk '{ for (i = 7; $i != \"-\"; i++) ; print $5, $6, $(i+1), $(i+3) }' /proc/self/mountinfo";
    let mut spec = default_spec(rootfs.path(), &["sh", "-c", script]);
    spec["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
        "options": ["ro", "nosuid", "noexec", "nodev"]
    }));
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("f"), "x").unwrap();
    spec["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/data", "type": "bind", "source": data.path(),
        "options": ["rbind", "ro", "nosuid"]
    }));
    let o = run("mounts", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert!(o.stdout.contains("/data ro,nosuid"), "{}", o.stdout);
    assert!(
        o.stdout.contains("/sys/fs/cgroup ro,nosuid,nodev,noexec"),
        "{}",
        o.stdout
    );
    if let Some((code, out, err)) = run_runc("mounts", &spec) {
        assert_eq!(code, 0, "runc: {err}");
        // On a host with cgroup v1 controllers runc mounts the v1 tree;
        // the guest, like a v2 host, has only cgroup2.
        let v2_host = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let strip = |s: &str| -> Vec<String> {
            s.lines()
                // The root's own superblock options name the host's disk.
                .skip(1)
                .filter(|l| v2_host || !l.starts_with("/sys/fs/cgroup"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(strip(&o.stdout), strip(&out), "mounts differ from runc's");
    }
}

#[test]
fn missing_binary_is_refused_at_create_in_runcs_words() {
    require_host!();
    let rootfs = Rootfs::new();
    let spec = default_spec(rootfs.path(), &["nosuch"]);
    let o = run("nosuch", &spec);
    assert_eq!(
        o.create_error.as_deref(),
        Some("exec: \"nosuch\": executable file not found in $PATH")
    );
    assert_ne!(o.status, Some(0));
    let spec = default_spec(rootfs.path(), &["/bin/nosuch"]);
    let o = run("nosuch2", &spec);
    assert_eq!(
        o.create_error.as_deref(),
        Some("exec: \"/bin/nosuch\": stat /bin/nosuch: no such file or directory")
    );
    assert!(mounts_under(rootfs.path()).is_empty());
}

#[test]
fn unknown_mount_type_names_the_mount() {
    require_host!();
    let rootfs = Rootfs::new();
    let mut spec = default_spec(rootfs.path(), &["true"]);
    spec["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/x", "type": "nosuchfs", "source": "none"
    }));
    let o = run("badmount", &spec);
    assert_eq!(
        o.create_error.as_deref(),
        Some("mount \"/x\" (type \"nosuchfs\"): no such device")
    );
    assert_ne!(o.status, Some(0));
    assert!(
        mounts_under(rootfs.path()).is_empty(),
        "a mount leaked into the host"
    );
}

#[test]
fn bad_uid_is_refused() {
    require_host!();
    let rootfs = Rootfs::new();
    let mut spec = default_spec(rootfs.path(), &["true"]);
    spec["process"]["user"] = json!({"uid": 4294967295u32, "gid": 0});
    let o = run("baduid", &spec);
    assert_eq!(
        o.create_error.as_deref(),
        Some("setuid 4294967295: invalid argument")
    );
}

#[test]
fn seccomp_profile_blocks_mkdir() {
    require_host!();
    let rootfs = Rootfs::new();
    let mut spec = default_spec(
        rootfs.path(),
        &["sh", "-c", "mkdir /tmp/a; echo $?; touch /tmp/b; echo $?"],
    );
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let o = run("seccomp", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert_eq!(o.stdout, "1\n0\n");
    assert!(o.stderr.contains("Operation not permitted"), "{o:?}");
}

#[test]
fn seccomp_allow_list_with_errno_default() {
    require_host!();
    let rootfs = Rootfs::new();
    // Everything busybox needs, but not mkdir: the default answers ENOSYS.
    let allowed: Vec<&str> = [
        "read",
        "write",
        "open",
        "openat",
        "close",
        "stat",
        "fstat",
        "lstat",
        "newfstatat",
        "statx",
        "mmap",
        "munmap",
        "mprotect",
        "brk",
        "rt_sigaction",
        "rt_sigprocmask",
        "rt_sigreturn",
        "ioctl",
        "access",
        "execve",
        "exit",
        "exit_group",
        "getpid",
        "getppid",
        "getuid",
        "geteuid",
        "getgid",
        "getegid",
        "wait4",
        "fork",
        "vfork",
        "clone",
        "clone3",
        "fcntl",
        "dup2",
        "dup3",
        "arch_prctl",
        "set_tid_address",
        "set_robust_list",
        "getcwd",
        "chdir",
        "uname",
        "prlimit64",
        "getdents64",
        "lseek",
        "readlink",
        "pipe",
        "pipe2",
        "getrandom",
        "rseq",
        "futex",
        "umask",
        "sigaltstack",
        "getpgrp",
        "setpgid",
        "getpgid",
        "kill",
        "tgkill",
        "gettid",
        "writev",
    ]
    .to_vec();
    let mut spec = default_spec(
        rootfs.path(),
        &["sh", "-c", "mkdir /tmp/a; echo $?; echo ok"],
    );
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "syscalls": [{"names": allowed, "action": "SCMP_ACT_ALLOW"}]
    });
    let o = run("seccomp-allow", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert_eq!(o.stdout, "1\nok\n");
    assert!(o.stderr.contains("not implemented"), "{o:?}");
}

#[test]
fn abort_before_start_runs_nothing() {
    require_host!();
    let rootfs = Rootfs::new();
    let spec = default_spec(rootfs.path(), &["sh", "-c", "echo ran"]);
    let cgroup = Cgroup::new("abort");
    let mut stage = spawn_stage(&create_plan("abort", &spec, &cgroup, false));
    assert!(matches!(stage.created(), Answer::Ready));
    let pid = stage.pid.expect("Pid before Ready");
    assert!(
        cgroup.procs().contains(&pid),
        "the container process is in its cgroup"
    );
    let o = stage.abort();
    assert_eq!(o.stdout, "");
    assert_ne!(o.status, Some(0));
}

#[test]
fn exec_joins_the_running_container() {
    require_host!();
    let rootfs = Rootfs::new();
    let mut spec = default_spec(rootfs.path(), &["sleep", "30"]);
    spec["hostname"] = json!("execbox");
    let cgroup = Cgroup::new("exec");
    let mut init = spawn_stage(&create_plan("exec", &spec, &cgroup, false));
    assert!(matches!(init.created(), Answer::Ready));
    assert_eq!(init.start(), None);
    let init_pid = init.pid.unwrap();

    let mut process = spec["process"].clone();
    process["args"] = json!(["sh", "-c", "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; pwd; id -u; cat /proc/self/status | grep CapEff"]);
    process["cwd"] = json!("/tmp");
    process["user"] = json!({"uid": 1000, "gid": 1000});
    let mut exec = spawn_stage(&exec_plan("exec", init_pid, &spec, &process, &cgroup));
    assert!(matches!(exec.created(), Answer::Ready));
    let exec_pid = exec.pid.unwrap();
    assert!(cgroup.procs().contains(&exec_pid));
    let start_error = exec.start();
    let o = exec.wait(start_error);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert_eq!(
        o.stdout,
        "execbox\nsleep 30 \n/tmp\n1000\nCapEff:\t0000000000000000\n"
    );

    // A missing binary in an exec is refused at create too.
    process["args"] = json!(["nosuch"]);
    let mut exec = spawn_stage(&exec_plan("exec", init_pid, &spec, &process, &cgroup));
    assert!(
        matches!(exec.created(), Answer::Error(m) if m == "exec: \"nosuch\": executable file not found in $PATH")
    );
    exec.wait(None);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let o = init.wait(None);
    assert_eq!(o.status, Some(137));
}

/// Everything the process wrote on its terminal, until the last slave
/// holder exits (EIO on the master), with the terminal's CRs dropped.
fn read_terminal(master: std::os::fd::OwnedFd) -> String {
    let mut master = std::fs::File::from(master);
    let mut out = Vec::new();
    let _ = std::io::Read::read_to_end(&mut master, &mut out);
    String::from_utf8_lossy(&out).replace('\r', "")
}

#[test]
fn terminal_is_allocated_in_the_container_and_bound_on_console() {
    require_host!();
    let rootfs = Rootfs::new();
    let script =
        "tty; stat -c '%F %t:%T' /dev/console /dev/pts/0; [ -t 0 ] && [ -t 2 ] && echo tty; \
                  echo ctty >/dev/tty; ls -1 /dev/pts";
    let mut spec = default_spec(rootfs.path(), &["sh", "-c", script]);
    spec["process"]["terminal"] = json!(true);
    let cgroup = Cgroup::new("tty");
    let mut stage = spawn_stage(&create_plan("tty", &spec, &cgroup, true));
    match stage.created() {
        Answer::Ready => {}
        Answer::Error(e) => panic!("{e}"),
    }
    let master = stage.take_console().expect("the stage sent no terminal");
    assert_eq!(stage.start(), None);
    let out = read_terminal(master);
    let o = stage.wait(None);
    assert_eq!(o.status, Some(0), "{o:?} {out}");
    // As under runc: the container's own devpts, whose first pty it is.
    assert_eq!(
        out,
        "/dev/pts/0\ncharacter special file 88:0\ncharacter special file 88:0\ntty\nctty\n0\nptmx\n"
    );
    assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("", ""));
}

#[test]
fn exec_with_a_terminal_gets_its_own_in_the_container() {
    require_host!();
    let rootfs = Rootfs::new();
    let spec = default_spec(rootfs.path(), &["sleep", "30"]);
    let cgroup = Cgroup::new("exec-tty");
    let mut init = spawn_stage(&create_plan("exec-tty", &spec, &cgroup, false));
    assert!(matches!(init.created(), Answer::Ready));
    assert_eq!(init.start(), None);
    let init_pid = init.pid.unwrap();

    let mut process = spec["process"].clone();
    process["args"] = json!(["sh", "-c", "tty; echo ctty >/dev/tty; stty size"]);
    process["terminal"] = json!(true);
    let mut plan = exec_plan("exec-tty", init_pid, &spec, &process, &cgroup);
    plan["terminal"] = json!(true);
    let mut exec = spawn_stage(&plan);
    match exec.created() {
        Answer::Ready => {}
        Answer::Error(e) => panic!("{e}"),
    }
    let master = exec.take_console().expect("the stage sent no terminal");
    let size = nix::pty::Winsize {
        ws_row: 30,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives
    // the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&master),
            libc::TIOCSWINSZ,
            &size,
        )
    };
    assert_eq!(rc, 0);
    assert_eq!(exec.start(), None);
    let out = read_terminal(master);
    let o = exec.wait(None);
    assert_eq!(o.status, Some(0), "{o:?} {out}");
    assert_eq!(out, "/dev/pts/0\nctty\n30 100\n");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(init.wait(None).status, Some(137));
}

#[test]
fn containerds_default_seccomp_profile_behaves_as_under_runc() {
    require_host!();
    let rootfs = Rootfs::new();
    // `ctr run --seccomp`'s profile (default ERRNO, an allow list, a few
    // calls refused with their own errno), captured on this host.
    let profile: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/containerd-default-seccomp.json")).unwrap();
    let script = "rm -rf /tmp/x; mkdir /tmp/x && echo made; unshare -U true; echo unshare=$?; \
                  grep '^Seccomp:' /proc/self/status; ls / >/dev/null && echo listed";
    let mut spec = default_spec(rootfs.path(), &["sh", "-c", script]);
    spec["linux"]["seccomp"] = profile;
    let o = run("seccomp-default", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert_eq!(o.stdout, "made\nunshare=1\nSeccomp:\t2\nlisted\n");
    if let Some((code, out, err)) = run_runc("seccomp-default", &spec) {
        assert_eq!(code, 0, "runc: {err}");
        assert_eq!(o.stdout, out, "differs from runc: {err}");
        assert_eq!(o.stderr, err, "stderr differs from runc");
    }
}

#[test]
fn execve_failure_after_start_is_reported() {
    require_host!();
    let rootfs = Rootfs::new();
    let bad = rootfs.path().join("bin/bad");
    std::fs::write(&bad, "not a program\n").unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut spec = default_spec(rootfs.path(), &["bad"]);
    spec["process"]["oomScoreAdj"] = json!(500);
    let o = run("badexec", &spec);
    assert_eq!(o.create_error, None);
    assert_eq!(
        o.start_error.as_deref(),
        Some("exec /bin/bad: exec format error")
    );
    assert_ne!(o.status, Some(0));

    let mut spec = default_spec(rootfs.path(), &["cat", "/proc/self/oom_score_adj"]);
    spec["process"]["oomScoreAdj"] = json!(500);
    let o = run("oomadj", &spec);
    assert_eq!(o.stdout, "500\n", "{o:?}");
}

/// In the guest the root is the initramfs, which pivot_root refuses: the
/// stage moves the rootfs onto / and chroots instead. Forced here, the view
/// must be the same as after pivot_root, with none of the host's mounts.
#[test]
fn move_and_chroot_gives_the_same_view_as_pivot_root() {
    require_host!();
    let rootfs = Rootfs::new();
    let script = "awk '{ for (i = 7; $i != \"-\"; i++) ; print $5, $6, $(i+1), $(i+3) }' /proc/self/mountinfo; ls /";
    let mut spec = default_spec(rootfs.path(), &["sh", "-c", script]);
    spec["root"]["readonly"] = json!(true);
    let pivoted = run("pivot", &spec);
    let moved = run_env("moved", &spec, &[("JEVM_NO_PIVOT", "1")]);
    assert_eq!(pivoted.status, Some(0), "{pivoted:?}");
    assert_eq!(moved.status, Some(0), "{moved:?}");
    assert_eq!(moved.stdout, pivoted.stdout);
    assert!(moved.stdout.contains("/ ro,"), "{}", moved.stdout);
    assert!(!moved.stdout.contains("/sys/fs/cgroup"), "{}", moved.stdout);
    assert!(mounts_under(rootfs.path()).is_empty());
}

#[test]
fn sysctls_and_domainname() {
    require_host!();
    let rootfs = Rootfs::new();
    let mut spec = default_spec(
        rootfs.path(),
        &[
            "sh",
            "-c",
            "cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/msgmax /proc/sys/kernel/domainname",
        ],
    );
    spec["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1", "kernel.msgmax": "4242"});
    spec["domainname"] = json!("jevm.example");
    let o = run("sysctl", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert_eq!(o.stdout, "1\n4242\njevm.example\n");
}

#[test]
fn missing_rootfs_and_unsupported_namespaces_are_named() {
    require_host!();
    let rootfs = Rootfs::new();
    let mut spec = default_spec(&rootfs.path().join("nope"), &["true"]);
    let o = run("norootfs", &spec);
    let want = format!(
        "rootfs {:?}: no such file or directory",
        rootfs.path().join("nope").display().to_string()
    );
    assert_eq!(o.create_error.as_deref(), Some(want.as_str()));
    spec["root"]["path"] = json!(rootfs.path());
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "time"}));
    let o = run("timens", &spec);
    assert_eq!(
        o.create_error.as_deref(),
        Some("namespace \"time\": not supported by jevm")
    );
}

// ---- User namespaces ----------------------------------------------------

/// The host ids container ids 0..65536 map to in these tests (what
/// Kubernetes gives a `hostUsers: false` pod).
const MAP_BASE: u32 = 100_000;
const MAP_SIZE: u32 = 65_536;

/// `spec` with a new user namespace mapping container ids 0.. to
/// `MAP_BASE`.., uids and gids alike.
fn with_user_namespace(spec: &mut serde_json::Value) {
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "user"}));
    let map = json!([{"containerID": 0, "hostID": MAP_BASE, "size": MAP_SIZE}]);
    spec["linux"]["uidMappings"] = map.clone();
    spec["linux"]["gidMappings"] = map;
}

/// A rootfs as containerd prepares it for `--uidmap`/`--gidmap` (a remapped
/// snapshot): every file owned by the mapped ids, the directory holding it
/// traversable by the container's root.
fn remapped_rootfs() -> Rootfs {
    use std::os::unix::fs::PermissionsExt;
    let rootfs = Rootfs::new();
    std::fs::set_permissions(rootfs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    fn chown_tree(path: &std::path::Path) {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).unwrap();
        std::os::unix::fs::lchown(
            path,
            Some(MAP_BASE + meta.uid()),
            Some(MAP_BASE + meta.gid()),
        )
        .unwrap();
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                chown_tree(&entry.unwrap().path());
            }
        }
    }
    chown_tree(rootfs.path());
    // As in an image: anyone may create files in /tmp.
    std::fs::set_permissions(
        rootfs.path().join("tmp"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .unwrap();
    rootfs
}

/// (uid, gid) of a file, as the host sees it.
fn host_owner(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.uid(), meta.gid())
}

/// The numbers of a `/proc/<pid>/{uid,gid}_map` text, line by line.
fn map_numbers(text: &str) -> Vec<Vec<u32>> {
    text.lines()
        .map(|l| l.split_whitespace().map(|n| n.parse().unwrap()).collect())
        .collect()
}

#[test]
fn user_namespace_maps_ids_as_the_spec_says_like_runc() {
    require_host!();
    let rootfs = remapped_rootfs();
    let script = "id; cat /proc/self/uid_map; echo --; cat /proc/self/gid_map; echo --; \
                  grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; \
                  rm -f /tmp/by-root /tmp/given; touch /tmp/by-root; \
                  touch /tmp/given; chown 1000:1000 /tmp/given; \
                  stat -c '%n %u:%g' /tmp/by-root /tmp/given /dev/null; hostname";
    let mut spec = default_spec(rootfs.path(), &["sh", "-c", script]);
    spec["hostname"] = json!("userns");
    with_user_namespace(&mut spec);
    let o = run("userns", &spec);
    assert_eq!(o.create_error, None);
    assert_eq!(o.status, Some(0), "{o:?}");
    let mut parts = o.stdout.split("--\n");
    let (head, gid_map, rest) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let mut head = head.lines();
    let id = head.next().unwrap();
    assert!(id.starts_with("uid=0(root) gid=0(root)"), "{id}");
    let uid_map: Vec<&str> = head.collect();
    // The maps inside are the spec's.
    assert_eq!(
        map_numbers(&uid_map.join("\n")),
        vec![vec![0, MAP_BASE, MAP_SIZE]]
    );
    assert_eq!(map_numbers(gid_map), vec![vec![0, MAP_BASE, MAP_SIZE]]);
    // The spec's capabilities, within the namespace.
    let want = cap_mask(&DEFAULT_CAPS);
    assert_eq!(status_line(rest, "CapEff"), want);
    assert_eq!(status_line(rest, "CapBnd"), want);
    // Inside, ids are the container's; the guest's root is unmapped there.
    assert!(
        rest.contains("/tmp/by-root 0:0\n/tmp/given 1000:1000\n/dev/null 65534:65534\nuserns\n"),
        "{rest}"
    );
    // Outside, the mapped host ids.
    assert_eq!(
        host_owner(&rootfs.path().join("tmp/by-root")),
        (MAP_BASE, MAP_BASE)
    );
    assert_eq!(
        host_owner(&rootfs.path().join("tmp/given")),
        (MAP_BASE + 1000, MAP_BASE + 1000)
    );
    assert!(mounts_under(rootfs.path()).is_empty());
    if let Some((code, out, err)) = run_runc("userns", &spec) {
        assert_eq!(code, 0, "runc: {err}");
        assert_eq!(o.stdout, out, "differs from runc");
    }
}

#[test]
fn user_namespace_with_a_non_root_user_like_runc() {
    require_host!();
    let rootfs = remapped_rootfs();
    let script = "id; touch /tmp/by-user; stat -c '%u:%g' /tmp/by-user; \
                  grep -E '^(Uid|Gid|Groups|CapEff)' /proc/self/status";
    let mut spec = default_spec(rootfs.path(), &["sh", "-c", script]);
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [5]});
    with_user_namespace(&mut spec);
    let o = run("userns-user", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert!(
        o.stdout
            .starts_with("uid=1000(u) gid=1000(u) groups=5\n1000:1000\n"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("CapEff:\t0000000000000000"),
        "{}",
        o.stdout
    );
    assert_eq!(
        host_owner(&rootfs.path().join("tmp/by-user")),
        (MAP_BASE + 1000, MAP_BASE + 1000)
    );
    if let Some((code, out, err)) = run_runc("userns-user", &spec) {
        assert_eq!(code, 0, "runc: {err}");
        assert_eq!(o.stdout, out, "differs from runc");
    }
}

#[test]
fn user_namespace_mounts_and_dev_match_runc() {
    require_host!();
    let rootfs = remapped_rootfs();
    let script = "awk '{ for (i = 7; $i != \"-\"; i++) ; print $5, $6, $(i+1), $(i+3) }' /proc/self/mountinfo; \
                  cd /dev && for f in $(ls -A | sort); do stat -c '%N %F %a %u:%g %t:%T' $f; done";
    let mut spec = default_spec(rootfs.path(), &["sh", "-c", script]);
    spec["root"]["readonly"] = json!(true);
    with_user_namespace(&mut spec);
    let o = run("userns-mounts", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    // Devices are the host's nodes, bound: owned by the unmapped root.
    for want in [
        "null character special file 666 65534:65534 1:3",
        "tty character special file 666 65534:65534 5:0",
        "'ptmx' -> 'pts/ptmx' symbolic link",
        "\n/proc rw,nosuid,nodev,noexec,relatime proc rw\n",
        "\n/sys ro,nosuid,nodev,noexec,relatime sysfs ro\n",
        "\n/dev/null rw,relatime devtmpfs ",
        "/ ro,",
    ] {
        assert!(o.stdout.contains(want), "missing {want:?} in\n{}", o.stdout);
    }
    if let Some((code, out, err)) = run_runc("userns-mounts", &spec) {
        assert_eq!(code, 0, "runc: {err}");
        let strip = |s: &str| -> Vec<String> {
            s.lines()
                // The root's superblock options name the host's disk; runc
                // links /dev/core only with a /proc/kcore (see devices.rs).
                .skip(1)
                .filter(|l| !l.contains("'core' -> '/proc/kcore'"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(strip(&o.stdout), strip(&out), "differs from runc");
    }
}

/// The guest's path (no pivot_root from the initramfs) in a user namespace:
/// the same view as with pivot_root.
#[test]
fn user_namespace_move_and_chroot_gives_the_same_view_as_pivot_root() {
    require_host!();
    let rootfs = remapped_rootfs();
    let script = "awk '{ for (i = 7; $i != \"-\"; i++) ; print $5, $6, $(i+1), $(i+3) }' /proc/self/mountinfo; ls /; id";
    let mut spec = default_spec(rootfs.path(), &["sh", "-c", script]);
    with_user_namespace(&mut spec);
    let pivoted = run("userns-pivot", &spec);
    let moved = run_env("userns-moved", &spec, &[("JEVM_NO_PIVOT", "1")]);
    assert_eq!(pivoted.status, Some(0), "{pivoted:?}");
    assert_eq!(moved.status, Some(0), "{moved:?}");
    assert_eq!(moved.stdout, pivoted.stdout);
    assert!(mounts_under(rootfs.path()).is_empty());
}

#[test]
fn user_namespace_without_network_namespace_binds_the_guests_sys() {
    require_host!();
    let rootfs = remapped_rootfs();
    let mut spec = default_spec(
        rootfs.path(),
        &["sh", "-c", "ls /sys/class >/dev/null && echo listed; grep ' /sys ' /proc/self/mountinfo | awk '{print $6}'"],
    );
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|n| n["type"] != "network");
    with_user_namespace(&mut spec);
    let o = run("userns-nonet", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert!(o.stdout.starts_with("listed\nro,"), "{}", o.stdout);
    // runc (1.1 and 1.4 alike) fails here: a new sysfs needs a network
    // namespace owned by the user namespace. jevm binds the guest's /sys
    // instead (docs/containers.md).
    if let Some((code, out, err)) = run_runc("userns-nonet", &spec) {
        if code == 0 {
            assert_eq!(o.stdout, out, "differs from runc");
        } else {
            assert!(
                err.contains("mounting \\\"sysfs\\\"") && err.contains("operation not permitted"),
                "runc: {err}"
            );
        }
    }
}

#[test]
fn raised_rlimits_and_lowered_oom_score_apply_in_a_user_namespace() {
    require_host!();
    if !caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_RESOURCE,
    )
    .unwrap()
    {
        // Some sandboxes run their root without it; the guest's agent has it.
        common::skipped("no CAP_SYS_RESOURCE to raise limits with");
        return;
    }
    let rootfs = remapped_rootfs();
    let mut spec = default_spec(
        rootfs.path(),
        &["sh", "-c", "ulimit -Hn; cat /proc/self/oom_score_adj"],
    );
    // Above the test's own hard limit: only a privileged process may.
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `current`, which outlives
    // the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) };
    assert_eq!(rc, 0);
    let hard = current.rlim_max + 1;
    spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": hard}]);
    spec["process"]["oomScoreAdj"] = json!(-500);
    with_user_namespace(&mut spec);
    let o = run("userns-limits", &spec);
    assert_eq!(o.status, Some(0), "{o:?}");
    assert_eq!(o.stdout, format!("{hard}\n-500\n"));
}

#[test]
fn exec_joins_the_containers_user_namespace() {
    require_host!();
    let rootfs = remapped_rootfs();
    let mut spec = default_spec(rootfs.path(), &["sleep", "30"]);
    with_user_namespace(&mut spec);
    let cgroup = Cgroup::new("userns-exec");
    let mut init = spawn_stage(&create_plan("userns-exec", &spec, &cgroup, false));
    match init.created() {
        Answer::Ready => {}
        Answer::Error(e) => panic!("{e}"),
    }
    assert_eq!(init.start(), None);
    let init_pid = init.pid.unwrap();
    let init_userns = std::fs::read_link(format!("/proc/{init_pid}/ns/user")).unwrap();

    for (uid, file) in [(0, "exec-root"), (1000, "exec-user")] {
        let mut process = spec["process"].clone();
        let script = format!(
            "id -u; readlink /proc/self/ns/user; cat /proc/self/uid_map; touch /tmp/{file}"
        );
        process["args"] = json!(["sh", "-c", script]);
        process["user"] = json!({"uid": uid, "gid": uid});
        let mut exec = spawn_stage(&exec_plan(
            "userns-exec",
            init_pid,
            &spec,
            &process,
            &cgroup,
        ));
        match exec.created() {
            Answer::Ready => {}
            Answer::Error(e) => panic!("{e}"),
        }
        let start_error = exec.start();
        let o = exec.wait(start_error);
        assert_eq!(o.status, Some(0), "{o:?}");
        let mut lines = o.stdout.lines();
        assert_eq!(lines.next(), Some(uid.to_string().as_str()));
        assert_eq!(
            lines.next().map(std::path::PathBuf::from),
            Some(init_userns.clone())
        );
        assert_eq!(
            map_numbers(&lines.collect::<Vec<_>>().join("\n")),
            vec![vec![0, MAP_BASE, MAP_SIZE]]
        );
        assert_eq!(
            host_owner(&rootfs.path().join("tmp").join(file)),
            (MAP_BASE + uid, MAP_BASE + uid)
        );
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(init.wait(None).status, Some(137));
}

/// A pod member (CRI) joins its sandbox's namespaces by path, the user
/// namespace among them, and creates its own mount and PID namespaces,
/// owned by that user namespace.
#[test]
fn pod_member_joins_the_sandboxs_user_namespace_by_path() {
    require_host!();
    let sandbox_rootfs = remapped_rootfs();
    let mut spec = default_spec(sandbox_rootfs.path(), &["sleep", "30"]);
    spec["hostname"] = json!("pod");
    with_user_namespace(&mut spec);
    let cgroup = Cgroup::new("userns-sandbox");
    let mut sandbox = spawn_stage(&create_plan("userns-sandbox", &spec, &cgroup, false));
    match sandbox.created() {
        Answer::Ready => {}
        Answer::Error(e) => panic!("{e}"),
    }
    assert_eq!(sandbox.start(), None);
    let pid = sandbox.pid.unwrap();
    let ns = |kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();

    let rootfs = remapped_rootfs();
    let script = "id -u; hostname; cat /proc/self/uid_map; echo $$; \
                  for n in user net uts ipc; do readlink /proc/self/ns/$n; done; \
                  touch /tmp/member";
    let mut member = default_spec(rootfs.path(), &["sh", "-c", script]);
    // As containerd writes it: the sandbox's namespaces by path (user in
    // the middle of the list, the order must not matter), the mappings
    // repeated.
    member["linux"]["namespaces"] = json!([
        {"type": "pid"},
        {"type": "ipc", "path": format!("/proc/{pid}/ns/ipc")},
        {"type": "uts", "path": format!("/proc/{pid}/ns/uts")},
        {"type": "user", "path": format!("/proc/{pid}/ns/user")},
        {"type": "mount"},
        {"type": "network", "path": format!("/proc/{pid}/ns/net")},
    ]);
    member["linux"]["uidMappings"] = spec["linux"]["uidMappings"].clone();
    member["linux"]["gidMappings"] = spec["linux"]["gidMappings"].clone();
    let o = run("userns-member", &member);
    assert_eq!(o.create_error, None);
    assert_eq!(o.status, Some(0), "{o:?}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(&lines[..2], ["0", "pod"]);
    assert_eq!(map_numbers(lines[2]), vec![vec![0, MAP_BASE, MAP_SIZE]]);
    // PID 1 of its own PID namespace, which only root of the user namespace
    // it joined could mount a proc for.
    assert_eq!(lines[3], "1");
    let joined: Vec<std::path::PathBuf> = lines[4..8].iter().map(Into::into).collect();
    assert_eq!(joined, vec![ns("user"), ns("net"), ns("uts"), ns("ipc")]);
    assert_eq!(
        host_owner(&rootfs.path().join("tmp/member")),
        (MAP_BASE, MAP_BASE)
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(sandbox.wait(None).status, Some(137));
}

#[test]
fn user_namespace_spec_errors_are_named() {
    require_host!();
    let rootfs = remapped_rootfs();
    let base = default_spec(rootfs.path(), &["true"]);

    let mut spec = base.clone();
    with_user_namespace(&mut spec);
    spec["linux"]["gidMappings"] = json!([]);
    let o = run("userns-nogid", &spec);
    assert_eq!(
        o.create_error.as_deref(),
        Some("namespace \"user\": linux.gidMappings is empty (a new user namespace needs uid and gid mappings)")
    );

    let mut spec = base.clone();
    spec["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": MAP_BASE, "size": 1}]);
    let o = run("userns-nons", &spec);
    assert_eq!(
        o.create_error.as_deref(),
        Some("user namespace mappings specified, but user namespace isn't enabled in the config")
    );

    // The kernel refuses overlapping ranges: the map writer's error.
    let mut spec = base.clone();
    with_user_namespace(&mut spec);
    spec["linux"]["uidMappings"] = json!([
        {"containerID": 0, "hostID": MAP_BASE, "size": 10},
        {"containerID": 5, "hostID": MAP_BASE + 100, "size": 10},
    ]);
    let o = run("userns-overlap", &spec);
    let message = o.create_error.unwrap();
    assert!(
        message.starts_with("user namespace: write /proc/")
            && message.ends_with("/uid_map (\"0 100000 10\\n5 100100 10\"): invalid argument"),
        "{message}"
    );

    // Root of the namespace is needed to build the container.
    let mut spec = base;
    with_user_namespace(&mut spec);
    spec["linux"]["uidMappings"] = json!([{"containerID": 1000, "hostID": MAP_BASE, "size": 1}]);
    let o = run("userns-noroot", &spec);
    assert_eq!(
        o.create_error.as_deref(),
        Some("user namespace: become root: setuid 0: invalid argument (uid 0 is not mapped)")
    );
}

#[test]
fn terminal_in_a_user_namespace_is_the_containers_own() {
    require_host!();
    let rootfs = remapped_rootfs();
    let script = "tty; stat -c '%F %t:%T %u:%g' /dev/console /dev/pts/0; [ -t 0 ] && echo tty; \
                  echo ctty >/dev/tty";
    let mut spec = default_spec(rootfs.path(), &["sh", "-c", script]);
    spec["process"]["terminal"] = json!(true);
    with_user_namespace(&mut spec);
    let cgroup = Cgroup::new("userns-tty");
    let mut stage = spawn_stage(&create_plan("userns-tty", &spec, &cgroup, true));
    match stage.created() {
        Answer::Ready => {}
        Answer::Error(e) => panic!("{e}"),
    }
    let master = stage.take_console().expect("the stage sent no terminal");
    assert_eq!(stage.start(), None);
    let out = read_terminal(master);
    let o = stage.wait(None);
    assert_eq!(o.status, Some(0), "{o:?} {out}");
    // The pty belongs to the container's root and its tty group (gid 5).
    assert_eq!(
        out,
        "/dev/pts/0\ncharacter special file 88:0 0:5\ncharacter special file 88:0 0:5\ntty\nctty\n"
    );
}
