//! Run after `ctr_e2e` against the same containerd (`hack/e2e` does): once
//! every test is done, nothing may be left: no task, container, active
//! snapshot, shim, VM, mount, FIFO, socket or file of ours.

use jevm_tests::ctr::{mounts_under, processes, walk};
use jevm_tests::ctr_env_or_skip;
use std::time::{Duration, Instant};

#[test]
fn nothing_is_left_after_all_tests() {
    let env = ctr_env_or_skip!();
    // Shims exit just after their last answer: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    let left = loop {
        let mut left = Vec::new();
        left.extend(env.tasks().into_iter().map(|t| format!("task {t}")));
        left.extend(
            env.containers()
                .into_iter()
                .map(|c| format!("container {c}")),
        );
        left.extend(
            env.active_snapshots()
                .into_iter()
                .map(|s| format!("active snapshot {s}")),
        );
        left.extend(
            env.shims(None)
                .into_iter()
                .map(|p| format!("shim process {p}")),
        );
        for (pid, args) in processes() {
            let cmd = args.join(" ");
            // A jevm VM is the shim process itself; anything else that runs a
            // guest (a stray `jevm` or QEMU) or a container process of ours
            // (their scripts carry e2e- ids) is a leak.
            if cmd.contains("e2e-") && !cmd.contains("ctr_after_all") && !cmd.contains("ctr_e2e") {
                left.push(format!("process {pid}: {cmd}"));
            }
        }
        // The run directory lies under the base; the template store is a
        // tmpfs of its own there (hack/containerd-env, as hack/install
        // mounts it), which stays.
        let store = format!("mount {}", env.base.join("jevm/templates").display());
        left.extend(mounts_under(&env.base).into_iter().filter(|m| *m != store));
        left.extend(env.run_dir_leftovers());
        left.extend(
            walk(&env.task_state_dir())
                .into_iter()
                .map(|f| format!("task state: {}", f.display())),
        );
        for f in walk(std::path::Path::new("/run/containerd/fifo")) {
            if f.to_string_lossy().contains("e2e-") {
                left.push(format!("fifo {}", f.display()));
            }
        }
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        left.is_empty(),
        "left behind after all containerd tests:\n  {}",
        left.join("\n  ")
    );
}
