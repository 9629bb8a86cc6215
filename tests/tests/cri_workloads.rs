//! What pods' containers do through Kubernetes' CRI, as the kubelet drives
//! them: volumes, resources, logs, exec and restarts, against containerd's
//! own CRI plugin (`hack/containerd-env`). Every scenario that applies to
//! both runtimes is two tests, `SCENARIO::runc` and `SCENARIO::jevm`, with
//! the same assertions; runc is the reference. What only jevm has (a VM's
//! size) is tested under jevm alone. Every pod is removed at the end of its
//! test and must leave nothing (`cri_after_all` checks the whole run).
//!
//! Volumes are made on the host the way the kubelet makes them, and sent as
//! the OCI bind mounts of the CRI `ContainerConfig`: configMap, secret and
//! projected volumes in the atomic writer's layout (a timestamped data
//! directory, a `..data` symlink to it, a symlink per key), an emptyDir on
//! disk and one on a tmpfs the test mounts, hostPath file and directory,
//! subPath (resolved on the host, as the kubelet does) and read-only
//! mounts. Under jevm they reach the guest over virtio-fs: the shim
//! bind-mounts each source into the pod's share, so a secret is never
//! copied, which the volume test checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jevm_tests::api::CallError;
use jevm_tests::cri::{
    remove_clean, run_pod, stream_exec, volume, ContainerSpec, ContainerStatus, Cri, ExecOutput,
    LinuxContainerResources, Pod, PodSpec, JEVM,
};
use jevm_tests::cri_env_or_skip;

/// CRI's own time limit for one exec (the command is killed after it).
const EXEC: Duration = Duration::from_secs(120);
/// A container that does nothing until killed.
const SLEEP: &[&str] = &["sleep", "1000000"];
const MIB: i64 = 1 << 20;
/// `ContainerState` CONTAINER_RUNNING and CONTAINER_EXITED.
const RUNNING: i32 = 1;
const EXITED: i32 = 2;

/// `SCENARIO::runc` and `SCENARIO::jevm` for `fn SCENARIO(handler)`.
macro_rules! under_runc_and_jevm {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            fn runc() {
                jevm_tests::cri::timed(stringify!($scenario), jevm_tests::cri::RUNC, super::$scenario);
            }
            #[test]
            fn jevm() {
                if jevm_tests::cri::skip_jevm() {
                    return;
                }
                jevm_tests::cri::timed(stringify!($scenario), jevm_tests::cri::JEVM, super::$scenario);
            }
        }
    )*};
}

under_runc_and_jevm!(
    volumes_as_the_kubelet_mounts_them,
    memory_limit_exceeded_is_oomkilled_with_137,
    update_container_resources_reaches_the_container_cgroup,
    stats_report_cpu_and_memory_of_a_busy_container,
    log_file_has_cri_records_per_stream_with_long_lines_split,
    reopen_container_log_starts_a_new_file_at_the_old_path,
    exec_sync_past_its_timeout_is_killed_and_returns,
    streaming_exec_with_a_tty_over_websocket,
    container_recreated_in_its_pod_runs_and_the_pod_keeps_its_ip,
);

fn assert_ok(handler: &str, what: &str, o: &ExecOutput) {
    assert_eq!(o.code, 0, "{handler}: {what}: {o:?}");
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn container(name: &str, script: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        command: sh(script),
        ..Default::default()
    }
}

/// Memory and CPU resources as the kubelet sets them for a limit.
fn limits(memory_bytes: i64, cpu_quota: i64) -> LinuxContainerResources {
    LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota,
        cpu_shares: 512,
        memory_limit_in_bytes: memory_bytes,
        ..Default::default()
    }
}

/// Polls ContainerStatus until `done` holds, for up to `timeout`; returns
/// the last status either way.
fn status_until(
    cri: &Cri,
    handler: &str,
    id: &str,
    timeout: Duration,
    done: impl Fn(&ContainerStatus) -> bool,
) -> ContainerStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let s = cri
            .container_status(id)
            .unwrap_or_else(|e| panic!("{handler}: ContainerStatus {id}: {e:?}"));
        if done(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `key=value` lines (a value runs to the end of its line).
fn key_values(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---------------------------------------------------------------- volumes

/// The host side of a pod's volumes, laid out as the kubelet lays them out
/// under `/var/lib/kubelet/pods/<uid>/volumes` (here a temporary directory).
/// The tmpfs of the memory-backed emptyDir is unmounted when dropped.
struct KubeletVolumes {
    root: tempfile::TempDir,
    tmpfs: Option<PathBuf>,
}

impl KubeletVolumes {
    fn new() -> KubeletVolumes {
        let root = tempfile::Builder::new()
            .prefix("jevm-cri-volumes-")
            .tempdir()
            .expect("temporary directory for the volumes");
        KubeletVolumes { root, tmpfs: None }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn dir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        p
    }

    /// An emptyDir with `medium: Memory`: a tmpfs the kubelet mounts itself.
    fn memory_dir(&mut self, rel: &str) -> PathBuf {
        let p = self.dir(rel);
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m,mode=0777", "tmpfs"])
            .arg(&p)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs on {}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.tmpfs = Some(p.clone());
        p
    }
}

impl Drop for KubeletVolumes {
    fn drop(&mut self) {
        if let Some(p) = &self.tmpfs {
            let out = std::process::Command::new("umount").arg(p).output();
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                eprintln!("!!! umount {}: {out:?}", p.display());
            }
        }
    }
}

/// Writes `files` (name, content, mode) into the volume directory `dir` as
/// the kubelet's atomic writer does: a new data directory `..<timestamp>`,
/// a symlink `..data_tmp` to it renamed over `..data` (the one atomic
/// step), a symlink `key -> ..data/key` per key, then the previous data
/// directory removed. Returns the new data directory.
fn atomic_write(dir: &Path, files: &[(&str, &str, u32)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    std::fs::create_dir_all(dir).expect("volume directory");
    let old = std::fs::read_link(dir.join("..data")).ok();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // The kubelet's name is `..` + the time as 2006_01_02_15_04_05 + `.` +
    // a random number; the date part here is fixed, the rest unique.
    let name = format!(
        "..2026_12_04_00_00_00.{secs}{:04}",
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let data = dir.join(&name);
    std::fs::create_dir(&data).expect("data directory");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for (key, content, mode) in files {
        let f = data.join(key);
        std::fs::write(&f, content).expect("volume file");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(*mode)).expect("chmod");
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp).expect("..data_tmp symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("renaming ..data_tmp over ..data");
    for (key, _, _) in files {
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{key}"), &link).expect("key symlink");
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).expect("removing the old data directory");
    }
    data
}

/// Regular files under `dir` that contain `needle`, never crossing a mount
/// point (like `find -xdev`, but by the mount table: a bind mount of a
/// directory of the same file system has the same device number).
fn files_containing_below_mounts(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mounts: std::collections::HashSet<PathBuf> = jevm_tests::ctr::mounts()
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if mounts.contains(&p) {
                continue;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(p),
                Ok(t)
                    if t.is_file()
                        && std::fs::read(&p).is_ok_and(|c| {
                            c.windows(needle.len()).any(|w| w == needle.as_bytes())
                        }) =>
                {
                    found.push(p)
                }
                _ => {}
            }
        }
    }
    found
}

/// Every kind of volume the kubelet makes, mounted as it mounts them: the
/// container sees their contents and modes through the key symlinks, writes
/// reach the host, read-only mounts refuse writes with EROFS, and a
/// configMap updated the atomic writer's way shows its new value within
/// 10 s (jevm's virtio-fs caches entries for 1 s). Under jevm, the secret's
/// value is in the pod's share only behind the bind mount of the kubelet's
/// directory: no copy of it is a file of the share itself.
fn volumes_as_the_kubelet_mounts_them(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    // Declared before the pod: dropped after it, so the pod's mounts of
    // these directories are gone before the tmpfs is unmounted.
    let mut kubelet = KubeletVolumes::new();
    let secret_value = format!("s3cr3t-{}-{handler}", std::process::id());
    let configmap = kubelet.path("configmap");
    atomic_write(&configmap, &[("key", "value-1", 0o644)]);
    let cm_data = std::fs::canonicalize(configmap.join("key")).expect("configMap key");
    let secret = kubelet.path("secret");
    atomic_write(
        &secret,
        &[
            ("password", &secret_value, 0o400),
            ("username", "admin", 0o644),
        ],
    );
    let projected = kubelet.path("projected");
    atomic_write(
        &projected,
        &[
            ("token", "projected-token", 0o600),
            ("namespace", "jevm-e2e", 0o644),
        ],
    );
    let empty = kubelet.dir("empty-dir");
    let sub = kubelet.dir("empty-dir/sub");
    let memory = kubelet.memory_dir("empty-memory");
    std::fs::write(memory.join("from-host"), "in-memory").expect("tmpfs file");
    let host_dir = kubelet.dir("host-dir");
    std::fs::write(host_dir.join("from-host"), "host-dir-file").expect("hostPath file");
    let host_file = kubelet.path("host-file");
    std::fs::write(&host_file, "host-file\n").expect("hostPath file");
    let host_ro = kubelet.dir("host-ro");

    let spec = PodSpec::new("volumes", handler);
    let pod = run_pod(&cri, handler, &spec);
    let mut c = ContainerSpec::new("app", SLEEP);
    c.mounts = vec![
        volume("/etc/config", &configmap, true),
        volume("/etc/secret", &secret, true),
        volume("/etc/projected", &projected, true),
        volume("/data", &empty, false),
        volume("/cache", &memory, false),
        volume("/host/dir", &host_dir, false),
        volume("/host/file", &host_file, false),
        volume("/host/ro", &host_ro, true),
        // subPath: the kubelet resolves it on the host (symlinks too) and
        // mounts what it found.
        volume("/sub/dir", &sub, false),
        volume("/sub/key", &cm_data, true),
    ];
    let cid = pod.must_run(&c);

    let read = pod.exec(
        &cid,
        &[
            "sh",
            "-c",
            r#"p() { printf '%s=%s\n' "$1" "$2"; }
            for f in /etc/config/key /etc/secret/password /etc/secret/username \
                     /etc/projected/token /etc/projected/namespace /sub/key; do
                p "$f" "$(cat $f)"; p "$f:mode" "$(stat -L -c %a $f)"
            done
            p link "$(readlink /etc/config/key)"
            p data-link "$(readlink /etc/config/..data)"
            p /cache/from-host "$(cat /cache/from-host)"
            p /host/dir/from-host "$(cat /host/dir/from-host)"
            p /host/file "$(cat /host/file)"
            echo from-container > /data/written && p write:/data ok
            echo from-container > /cache/written && p write:/cache ok
            echo from-container > /sub/dir/written && p write:/sub/dir ok
            p /data/sub/written "$(cat /data/sub/written)"
            echo from-container > /host/dir/written && p write:/host/dir ok
            echo appended >> /host/file && p write:/host/file ok
            for d in /etc/config /etc/secret /etc/projected /host/ro; do
                p "ro:$d" "$(touch $d/new 2>&1 && echo WRITTEN)"
            done
            p ro:/sub/key "$( (echo x > /sub/key) 2>&1 && echo WRITTEN)"
            "#,
        ],
        EXEC,
    );
    assert_ok(handler, "reading and writing the volumes", &read);
    let got = key_values(&read.stdout);
    let data_dir = std::fs::read_link(configmap.join("..data"))
        .expect("..data")
        .display()
        .to_string();
    let mut want: BTreeMap<&str, String> = BTreeMap::new();
    for (k, v) in [
        ("/etc/config/key", "value-1"),
        ("/etc/config/key:mode", "644"),
        ("/etc/secret/password", &secret_value),
        ("/etc/secret/password:mode", "400"),
        ("/etc/secret/username", "admin"),
        ("/etc/secret/username:mode", "644"),
        ("/etc/projected/token", "projected-token"),
        ("/etc/projected/token:mode", "600"),
        ("/etc/projected/namespace", "jevm-e2e"),
        ("/etc/projected/namespace:mode", "644"),
        ("/sub/key", "value-1"),
        ("/sub/key:mode", "644"),
        ("link", "..data/key"),
        ("data-link", &data_dir),
        ("/cache/from-host", "in-memory"),
        ("/host/dir/from-host", "host-dir-file"),
        ("/host/file", "host-file"),
        ("write:/data", "ok"),
        ("write:/cache", "ok"),
        ("write:/sub/dir", "ok"),
        ("/data/sub/written", "from-container"),
        ("write:/host/dir", "ok"),
        ("write:/host/file", "ok"),
    ] {
        want.insert(k, v.to_string());
    }
    for (k, v) in &want {
        assert_eq!(
            got.get(*k),
            Some(v),
            "{handler}: {k} in the container (all it said: {:?}, stderr {:?})",
            read.stdout,
            read.stderr
        );
    }
    for d in [
        "/etc/config",
        "/etc/secret",
        "/etc/projected",
        "/host/ro",
        "/sub/key",
    ] {
        let v = got.get(&format!("ro:{d}")).cloned().unwrap_or_default();
        assert!(
            v.contains("Read-only file system") && !v.contains("WRITTEN"),
            "{handler}: a write to the read-only mount {d} did not fail with EROFS: {v:?}"
        );
    }
    // What the container wrote is on the host, in the kubelet's directories.
    for (p, want) in [
        (empty.join("written"), "from-container\n"),
        (memory.join("written"), "from-container\n"),
        (sub.join("written"), "from-container\n"),
        (host_dir.join("written"), "from-container\n"),
        (host_file.clone(), "host-file\nappended\n"),
    ] {
        let got = std::fs::read_to_string(&p).unwrap_or_else(|e| format!("<{e}>"));
        assert_eq!(
            got,
            want,
            "{handler}: {} on the host after the container wrote it",
            p.display()
        );
    }
    for d in [&configmap, &secret, &projected, &host_ro] {
        assert!(
            !d.join("new").exists(),
            "{handler}: a file appeared in the read-only volume {}",
            d.display()
        );
    }

    if handler == JEVM {
        // The secret reaches the guest through the bind mount of the
        // kubelet's directory into the share, never as a copy.
        let share = pod.jevm_share();
        assert!(
            share.is_dir(),
            "jevm: the pod's share {} does not exist",
            share.display()
        );
        let copies = files_containing_below_mounts(&share, &secret_value);
        assert!(
            copies.is_empty(),
            "jevm: the secret's value was copied into the pod's share: {copies:?}"
        );
        let seen_through_a_mount = jevm_tests::ctr::mounts()
            .into_iter()
            .filter(|m| m.starts_with(&share.display().to_string()))
            .any(|m| {
                std::fs::read_to_string(Path::new(&m).join("password"))
                    .is_ok_and(|v| v == secret_value)
            });
        assert!(
            seen_through_a_mount,
            "jevm: no mount point under the share {} shows the secret (the test's premise is wrong)",
            share.display()
        );
    }

    // The configMap changes the kubelet's way; the container must see it.
    let t = Instant::now();
    atomic_write(&configmap, &[("key", "value-2", 0o644)]);
    let seen = pod.exec(
        &cid,
        &[
            "sh",
            "-c",
            r#"end=$(( $(date +%s) + 10 ))
            while :; do
                v=$(cat /etc/config/key 2>&1)
                [ "$v" = value-2 ] && { echo "$v"; exit 0; }
                [ $(date +%s) -ge $end ] && { echo "$v"; exit 1; }
                sleep 0.2
            done"#,
        ],
        EXEC,
    );
    assert_eq!(
        (seen.code, seen.stdout.trim()),
        (0, "value-2"),
        "{handler}: the container did not see the updated configMap within 10 s: {seen:?}"
    );
    eprintln!(
        "{handler}: the configMap update was seen after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    remove_clean(pod);
}

// -------------------------------------------------------------- resources

/// A container over its memory limit is killed by the OOM killer: it exits
/// with 137 and CRI reports the reason `OOMKilled` (from the runtime's OOM
/// event). `dd` with a 128 MiB block allocates that buffer and fills it in
/// one read of /dev/zero: fast even in the emulated test host, where piping
/// 200 MB through `tail` took minutes.
fn memory_limit_exceeded_is_oomkilled_with_137(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let spec = PodSpec::new("oom", handler);
    let pod = run_pod(&cri, handler, &spec);
    let mut c = ContainerSpec::new(
        "hog",
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
    );
    c.resources = Some(limits(64 * MIB, 0));
    let cid = pod.must_run(&c);
    let exited = status_until(&cri, handler, &cid, Duration::from_secs(300), |s| {
        s.state == EXITED
    });
    assert_eq!(
        exited.state, EXITED,
        "{handler}: a container over its 64 MiB limit did not end in 300 s: {exited:?}"
    );
    // The OOM event may reach CRI just after the exit.
    let s = status_until(&cri, handler, &cid, Duration::from_secs(30), |s| {
        s.reason == "OOMKilled"
    });
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (137, "OOMKilled"),
        "{handler}: exit code and reason of a container killed for its memory limit ({s:?}); log: {:?}",
        pod.log("hog")
    );
    remove_clean(pod);
}

/// The cgroup files the container sees as its own (`/sys/fs/cgroup` in its
/// cgroup namespace): memory.max and cpu.max.
fn cgroup_limits(pod: &Pod<'_>, cid: &str) -> (String, String) {
    let o = pod.exec(
        cid,
        &[
            "sh",
            "-c",
            "cat /proc/self/cgroup >&2; echo \"memory=$(cat /sys/fs/cgroup/memory.max)\"; echo \"cpu=$(cat /sys/fs/cgroup/cpu.max)\"",
        ],
        EXEC,
    );
    assert_ok(&pod.handler, "reading the container's cgroup limits", &o);
    let kv = key_values(&o.stdout);
    (
        kv.get("memory").cloned().unwrap_or_default(),
        kv.get("cpu").cloned().unwrap_or_default(),
    )
}

/// UpdateContainerResources on a running container changes what its
/// cgroup enforces: memory.max and cpu.max inside it show the new limits.
fn update_container_resources_reaches_the_container_cgroup(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let spec = PodSpec::new("update", handler);
    let pod = run_pod(&cri, handler, &spec);
    let mut c = ContainerSpec::new("app", SLEEP);
    c.resources = Some(limits(128 * MIB, 50_000));
    let cid = pod.must_run(&c);
    assert_eq!(
        cgroup_limits(&pod, &cid),
        ((128 * MIB).to_string(), "50000 100000".to_string()),
        "{handler}: the limits CreateContainer asked for, seen in the container's cgroup"
    );
    cri.update_resources(&cid, limits(96 * MIB, 20_000))
        .unwrap_or_else(|e| panic!("{handler}: UpdateContainerResources: {e:?}"));
    assert_eq!(
        cgroup_limits(&pod, &cid),
        ((96 * MIB).to_string(), "20000 100000".to_string()),
        "{handler}: the limits after UpdateContainerResources, seen in the container's cgroup"
    );
    remove_clean(pod);
}

/// ContainerStats and ListContainerStats of a container that spins (half a
/// CPU) and holds ~20 MB: CPU time grows past 0.5 s, the working set is at
/// least 16 MiB and below the 128 MiB limit.
fn stats_report_cpu_and_memory_of_a_busy_container(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let spec = PodSpec::new("stats", handler);
    let pod = run_pod(&cri, handler, &spec);
    let mut c = container(
        "busy",
        "x=$(head -c 20000000 /dev/zero | tr '\\0' a); echo held; while :; do :; done",
    );
    c.resources = Some(limits(128 * MIB, 50_000));
    let cid = pod.must_run(&c);
    // Building the 20 MB string goes through a pipe: slow in the emulated
    // test host, slower in a nested guest (more than 2 minutes was seen
    // under jevm). Stats count from when it is held.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !pod.log("busy").contains("held") {
        assert!(
            Instant::now() < deadline,
            "{handler}: the busy container did not build its 20 MB string in 600 s (log {:?})",
            pod.log("busy")
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let (cpu, mem, stats) = loop {
        let s = cri
            .container_stats(&cid)
            .unwrap_or_else(|e| panic!("{handler}: ContainerStats: {e:?}"));
        let cpu = s
            .cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map_or(0, |v| v.value);
        let mem = s
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes.as_ref())
            .map_or(0, |v| v.value);
        if (cpu >= 500_000_000 && mem >= 16 << 20) || Instant::now() >= deadline {
            break (cpu, mem, s);
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(
        cpu >= 500_000_000,
        "{handler}: ContainerStats CPU usage of a spinning container stayed at {cpu} ns for 120 s (log {:?})",
        pod.log("busy")
    );
    if !(16 << 20..128 << 20).contains(&mem) {
        // What the container's own cgroup says, for the report.
        let inside = pod.exec(
            &cid,
            &[
                "sh",
                "-c",
                "echo memory.current $(cat /sys/fs/cgroup/memory.current); \
                 grep -E '^(anon|file|active_file|inactive_file|shmem) ' /sys/fs/cgroup/memory.stat; \
                 grep VmRSS /proc/1/status",
            ],
            EXEC,
        );
        panic!(
            "{handler}: ContainerStats working set {mem} bytes of a container holding 20 MB under a \
             128 MiB limit (want 16..128 MiB); its memory stats {:?}; inside the container: {}",
            stats.memory,
            inside.stdout
        );
    }
    let listed = cri
        .list_container_stats(&pod.id)
        .unwrap_or_else(|e| panic!("{handler}: ListContainerStats: {e:?}"));
    let mine = listed
        .iter()
        .find(|s| s.attributes.as_ref().is_some_and(|a| a.id == cid))
        .unwrap_or_else(|| {
            panic!("{handler}: ListContainerStats of the pod does not list {cid}: {listed:?}")
        });
    let cpu2 = mine
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value);
    assert!(
        cpu2 >= cpu,
        "{handler}: ListContainerStats CPU usage {cpu2} ns is below the earlier ContainerStats {cpu} ns"
    );
    remove_clean(pod);
}

/// Under jevm, a container whose memory limit is above its pod's VM (1 GiB
/// in a 256 MiB VM) is refused, naming the annotation that would make it
/// fit (at StartContainer: see below); one that fits starts in the same pod.
#[test]
fn container_bigger_than_its_vm_is_refused_naming_the_annotation_under_jevm() {
    if jevm_tests::cri::skip_jevm() {
        return;
    }
    let env = cri_env_or_skip!();
    let t = Instant::now();
    let cri = Cri::connect(&env);
    let spec = PodSpec::new("toobig", JEVM);
    let pod = run_pod(&cri, JEVM, &spec);
    let mut big = ContainerSpec::new("big", SLEEP);
    big.resources = Some(limits(1024 * MIB, 0));
    // containerd's CRI plugin makes only a container record at
    // CreateContainer; the shim first sees the container at StartContainer
    // (the task's create), so that is where jevm can refuse it.
    let (at, message) = match pod.create(&big) {
        Err(CallError::Status { message, .. }) => ("CreateContainer", message),
        Err(e) => panic!("jevm: CreateContainer of a too-big container: {e:?}"),
        Ok(id) => match pod.start(&id) {
            Err(CallError::Status { message, .. }) => ("StartContainer", message),
            Err(e) => panic!("jevm: StartContainer of a too-big container: {e:?}"),
            Ok(()) => panic!(
                "jevm: a container with a 1 GiB memory limit started ({id}) in a pod whose VM has 256 MiB"
            ),
        },
    };
    assert!(
        message.contains("io.jevm.vm.memory_mib"),
        "jevm: the refusal does not name the annotation io.jevm.vm.memory_mib: {message:?}"
    );
    let mut fits = ContainerSpec::new("fits", SLEEP);
    fits.resources = Some(limits(128 * MIB, 0));
    pod.must_run(&fits);
    remove_clean(pod);
    eprintln!(
        "container_bigger_than_its_vm_is_refused_naming_the_annotation_under_jevm: {:.1} s, refused at {at}: {message}",
        t.elapsed().as_secs_f64()
    );
}

/// Under jevm, a pod annotated `io.jevm.vm.memory_mib: "512"` gets a VM of
/// that size: MemTotal in the guest is close to 512 MiB (the kernel keeps
/// some for itself), far above the default 256. It builds a second
/// template (a cold boot): slow in the emulated test host.
#[test]
fn pod_annotation_sizes_its_vm_under_jevm() {
    if jevm_tests::cri::skip_jevm() {
        return;
    }
    let env = cri_env_or_skip!();
    let t = Instant::now();
    let cri = Cri::connect(&env);
    let mut spec = PodSpec::new("vm512", JEVM);
    spec.annotations
        .insert("io.jevm.vm.memory_mib".into(), "512".into());
    let pod = run_pod(&cri, JEVM, &spec);
    let cid = pod.must_run(&ContainerSpec::new("app", SLEEP));
    let o = pod.exec(&cid, &["cat", "/proc/meminfo"], EXEC);
    assert_ok(JEVM, "cat /proc/meminfo", &o);
    let kib: u64 = o
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("jevm: no MemTotal in /proc/meminfo: {:?}", o.stdout));
    assert!(
        (440 * 1024..=512 * 1024).contains(&kib),
        "jevm: MemTotal {kib} kB in a pod annotated io.jevm.vm.memory_mib=512 (want 440..=512 MiB)"
    );
    remove_clean(pod);
    eprintln!(
        "pod_annotation_sizes_its_vm_under_jevm: {:.1} s, MemTotal {kib} kB",
        t.elapsed().as_secs_f64()
    );
}

// ------------------------------------------------------------------- logs

/// One record of a CRI log file: `TIMESTAMP STREAM TAG CONTENT`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LogRecord {
    stream: String,
    /// `F` (full line) or `P` (partial: the line goes on in the next one).
    tag: String,
    content: String,
}

fn parse_log(handler: &str, text: &str) -> Vec<LogRecord> {
    text.lines()
        .map(|l| {
            let mut f = l.splitn(4, ' ');
            let (time, stream, tag) = (f.next(), f.next(), f.next());
            let (Some(time), Some(stream), Some(tag)) = (time, stream, tag) else {
                panic!("{handler}: log line is not `TIME STREAM TAG CONTENT`: {l:?}");
            };
            assert!(
                time.len() >= 20 && time.as_bytes()[10] == b'T',
                "{handler}: log record time {time:?} is not RFC 3339"
            );
            LogRecord {
                stream: stream.into(),
                tag: tag.into(),
                content: f.next().unwrap_or("").into(),
            }
        })
        .collect()
}

/// Joins the partial records of one stream into its lines; a line still
/// open at the end is returned as `(text, false)`.
fn joined_lines(records: &[LogRecord], stream: &str) -> Vec<(String, bool)> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    let mut open = false;
    for r in records.iter().filter(|r| r.stream == stream) {
        cur.push_str(&r.content);
        open = r.tag == "P";
        if !open {
            lines.push((std::mem::take(&mut cur), true));
        }
    }
    if open {
        lines.push((cur, false));
    }
    lines
}

/// The CRI log file of a container that exited: stdout and stderr lines
/// tagged with their stream, a 20,000-byte line split into a partial `P`
/// record of at most 16 KiB and a final `F`, and output without a trailing
/// newline kept as a last `P` record (containerd writes what it has when
/// the stream ends).
fn log_file_has_cri_records_per_stream_with_long_lines_split(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let spec = PodSpec::new("logs", handler);
    let pod = run_pod(&cri, handler, &spec);
    let cid = pod.must_run(&container(
        "talker",
        "echo to-stdout; echo to-stderr >&2; head -c 20000 /dev/zero | tr '\\0' x; echo; printf no-newline-at-end",
    ));
    let s = status_until(&cri, handler, &cid, Duration::from_secs(120), |s| {
        s.state == EXITED
    });
    assert_eq!(
        (s.state, s.exit_code),
        (EXITED, 0),
        "{handler}: the logging container did not exit 0: {s:?}"
    );
    // The log is complete once both streams ended; give CRI a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let t = pod.log("talker");
        if (t.contains("no-newline-at-end") && t.contains("to-stderr"))
            || Instant::now() >= deadline
        {
            break t;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let records = parse_log(handler, &text);
    let long = "x".repeat(20_000);
    assert_eq!(
        joined_lines(&records, "stdout"),
        vec![
            ("to-stdout".to_string(), true),
            (long, true),
            ("no-newline-at-end".to_string(), false),
        ],
        "{handler}: stdout lines in the CRI log {}",
        pod.log_path("talker").display()
    );
    assert_eq!(
        joined_lines(&records, "stderr"),
        vec![("to-stderr".to_string(), true)],
        "{handler}: stderr lines in the CRI log"
    );
    let long_records: Vec<(&str, usize)> = records
        .iter()
        .filter(|r| r.content.starts_with('x'))
        .map(|r| (r.tag.as_str(), r.content.len()))
        .collect();
    assert!(
        long_records.len() >= 2
            && long_records[0].0 == "P"
            && long_records.iter().all(|(_, n)| *n <= 16 * 1024),
        "{handler}: the 20,000-byte line is not split into records of at most 16 KiB, P first: {long_records:?}"
    );
    remove_clean(pod);
}

/// Line numbers `line-N` in a log text.
fn numbers(text: &str) -> Vec<u64> {
    text.split_whitespace()
        .filter_map(|w| w.strip_prefix("line-")?.parse().ok())
        .collect()
}

/// After the kubelet's rotation (rename the log file, ReopenContainerLog),
/// the container's new output goes to a new file at the old path, and the
/// renamed file gets nothing more.
fn reopen_container_log_starts_a_new_file_at_the_old_path(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let spec = PodSpec::new("reopen", handler);
    let pod = run_pod(&cri, handler, &spec);
    let cid = pod.must_run(&container(
        "ticker",
        "i=0; while :; do echo line-$i; i=$((i+1)); sleep 0.2; done",
    ));
    let path = pod.log_path("ticker");
    let wait_for = |p: &Path, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            if numbers(&t).len() >= 3 {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "{handler}: {what}: fewer than 3 lines in {} after 60 s: {t:?}",
                p.display()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    wait_for(&path, "before the rotation");
    let rotated = path.with_extension("log.1");
    std::fs::rename(&path, &rotated).expect("renaming the log file");
    cri.reopen_log(&cid)
        .unwrap_or_else(|e| panic!("{handler}: ReopenContainerLog: {e:?}"));
    let new = wait_for(&path, "after ReopenContainerLog");
    std::thread::sleep(Duration::from_secs(1));
    let old_len = std::fs::metadata(&rotated).expect("rotated log").len();
    std::thread::sleep(Duration::from_secs(2));
    let old = std::fs::read_to_string(&rotated).expect("rotated log");
    assert_eq!(
        old.len() as u64,
        old_len,
        "{handler}: the rotated log file still grows after ReopenContainerLog"
    );
    let (old_n, new_n) = (numbers(&old), numbers(&new));
    assert!(
        old_n.iter().max() < new_n.iter().min(),
        "{handler}: lines of the new file ({new_n:?}) are not all after those of the rotated one ({old_n:?})"
    );
    remove_clean(pod);
}

// ------------------------------------------------------------------- exec

/// ExecSync of a command that outlives its timeout (sleep 600, timeout 3 s)
/// returns within bounded time with containerd's timeout error, and the
/// command is killed (no `sleep 600` left in the container).
fn exec_sync_past_its_timeout_is_killed_and_returns(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let spec = PodSpec::new("exectimeout", handler);
    let pod = run_pod(&cri, handler, &spec);
    let cid = pod.must_run(&ContainerSpec::new("app", SLEEP));
    let t = Instant::now();
    let r = cri.exec_sync(&cid, &["sleep", "600"], Duration::from_secs(3));
    let took = t.elapsed();
    eprintln!("{handler}: ExecSync with a 3 s timeout took {took:?}: {r:?}");
    // containerd 1.6 kills the process and answers DEADLINE_EXCEEDED
    // "failed to exec in container: timeout 3s exceeded: context deadline
    // exceeded" (seen under runc); no exit code.
    match &r {
        Err(CallError::Status { code, message }) => assert!(
            *code == tonic::Code::DeadlineExceeded && message.contains("timeout 3s exceeded"),
            "{handler}: ExecSync past its timeout failed, but not with containerd's timeout error: {code:?} {message:?}"
        ),
        other => panic!("{handler}: ExecSync of sleep 600 with a 3 s timeout: {other:?}"),
    }
    assert!(
        took < Duration::from_secs(60),
        "{handler}: ExecSync with a 3 s timeout took {took:?}"
    );
    let ps = pod.exec(&cid, &["ps", "-o", "pid,args"], EXEC);
    assert_ok(handler, "ps", &ps);
    assert!(
        !ps.stdout.contains("sleep 600"),
        "{handler}: the timed-out exec still runs: {}",
        ps.stdout
    );
    remove_clean(pod);
}

/// A streaming exec with a TTY, the way `kubectl exec -it` reaches the
/// node: CRI `Exec` gives a URL on containerd's streaming server, which
/// speaks Kubernetes' websocket protocol (`v4.channel.k8s.io`). The test
/// sets the terminal size (channel 4), then sends a line on stdin; the
/// command, waiting for that line, reports the size and its terminal.
fn streaming_exec_with_a_tty_over_websocket(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let spec = PodSpec::new("ttyexec", handler);
    let pod = run_pod(&cri, handler, &spec);
    let cid = pod.must_run(&ContainerSpec::new("app", SLEEP));
    let url = cri
        .exec_url(
            &cid,
            &["sh", "-c", "read line; stty size; tty; echo got-$line"],
            true,
        )
        .unwrap_or_else(|e| panic!("{handler}: Exec: {e:?}"));
    let out = stream_exec(
        &url,
        &[
            (4, br#"{"Width":123,"Height":45}"#.to_vec()),
            (0, b"go\n".to_vec()),
        ],
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{handler}: streaming exec at {url}: {e}"));
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    assert!(
        lines.contains(&"45 123") && lines.iter().any(|l| l.starts_with("/dev/pts/"))
            && lines.contains(&"got-go"),
        "{handler}: a TTY exec sized 123x45 did not report `45 123`, a /dev/pts terminal and its input: {out:?}"
    );
    assert!(
        out.error.contains("Success"),
        "{handler}: the exec's status on the error channel: {out:?}"
    );
    remove_clean(pod);
}

// ---------------------------------------------------------------- restart

/// A container that exited is removed and created again under the same
/// name with attempt 1 (the kubelet's restart), in the same pod: it runs,
/// and sees the same pod IP as before.
fn container_recreated_in_its_pod_runs_and_the_pod_keeps_its_ip(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let spec = PodSpec::new("restart", handler);
    let pod = run_pod(&cri, handler, &spec);
    let ip = pod.ip().to_string();
    let first = pod.must_run(&container("app", "ip -4 -o addr show; exit 3"));
    let s = status_until(&cri, handler, &first, Duration::from_secs(120), |s| {
        s.state == EXITED
    });
    assert_eq!(
        (s.state, s.exit_code),
        (EXITED, 3),
        "{handler}: the first attempt did not exit with 3: {s:?}"
    );
    assert!(
        pod.log("app").contains(&format!("inet {ip}/")),
        "{handler}: the first attempt did not see the pod IP {ip}: {:?}",
        pod.log("app")
    );
    cri.remove_container(&first)
        .unwrap_or_else(|e| panic!("{handler}: RemoveContainer: {e:?}"));
    let mut again = ContainerSpec::new("app", SLEEP);
    again.attempt = 1;
    let second = pod.must_run(&again);
    assert_ne!(second, first, "{handler}: the new attempt has the old id");
    let s = status_until(&cri, handler, &second, Duration::from_secs(60), |s| {
        s.state == RUNNING
    });
    assert_eq!(
        (
            s.state,
            s.metadata.as_ref().map(|m| (m.name.as_str(), m.attempt))
        ),
        (RUNNING, Some(("app", 1))),
        "{handler}: the second attempt: {s:?}"
    );
    let o = pod.exec(&second, &["ip", "-4", "-o", "addr", "show"], EXEC);
    assert_ok(handler, "ip addr in the second attempt", &o);
    assert!(
        o.stdout.contains(&format!("inet {ip}/")),
        "{handler}: the second attempt does not see the pod IP {ip}: {o:?}"
    );
    let now = cri
        .pod_status(&pod.id)
        .unwrap_or_else(|e| panic!("{handler}: PodSandboxStatus: {e:?}"));
    assert_eq!(
        now.ip.as_deref(),
        Some(ip.as_str()),
        "{handler}: the pod's IP changed across the container's restart"
    );
    remove_clean(pod);
}
