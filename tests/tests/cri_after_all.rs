//! Run after `cri_pods` and `cri_workloads` against the same containerd
//! (`hack/e2e` does): once every CRI test is done, nothing of theirs may be
//! left: no pod sandbox or container CRI lists, no pod IP host-local holds,
//! no network namespace CRI pins, no shim in CRI's namespace.

use jevm_tests::cri::Cri;
use jevm_tests::cri_env_or_skip;
use std::time::{Duration, Instant};

#[test]
fn nothing_of_the_cri_pods_is_left_after_all_tests() {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    // Shims exit just after their last answer: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    let left = loop {
        let mut left = Vec::new();
        match cri.list_pods() {
            Ok(p) => left.extend(
                p.into_iter()
                    .map(|(id, name)| format!("pod sandbox {id} ({name})")),
            ),
            Err(e) => left.push(format!("ListPodSandbox failed: {e:?}")),
        }
        match cri.list_containers() {
            Ok(c) => left.extend(
                c.into_iter()
                    .map(|(id, name)| format!("container {id} ({name})")),
            ),
            Err(e) => left.push(format!("ListContainers failed: {e:?}")),
        }
        left.extend(
            env.allocated_ips()
                .into_iter()
                .map(|ip| format!("pod IP {ip} held by host-local")),
        );
        left.extend(env.pinned_netns());
        left.extend(env.shims(None));
        if left.is_empty() || Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        left.is_empty(),
        "left behind after all CRI tests:\n  {}",
        left.join("\n  ")
    );
}
