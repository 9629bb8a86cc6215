//! The shim's breakdown of one create→start, logged at info level (one
//! line, `jevm timings: ...`) for the benchmark to pick up from the shim log.

use std::time::Duration;

use jevm_runtime::vmm::devices::fs::RequestCounts;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// `shim start` subcommand to the task service existing (first
    /// container of a pod only).
    pub shim_start: Option<Duration>,
    /// Template store lookup (or build, the first time).
    pub template_lookup: Option<Duration>,
    /// The tap and tc redirects in the pod's network namespace (CRI pods).
    pub network: Option<Duration>,
    /// Clone: restore, resume, the agent's connection, the identity sent
    /// (attaching the pod's virtio-fs share to the clone's device
    /// included).
    pub clone: Option<Duration>,
    /// Host mounts into the share the VM serves over virtio-fs: the rootfs
    /// and bind mounts.
    pub share: Option<Duration>,
    /// A new pod's first create is sent behind the clone's identity: from
    /// that send to the identity's answer (the identity has been under way
    /// since the clone, while the shim mounted the share).
    pub agent_ready: Option<Duration>,
    /// The agent's CreateContainer; in a new pod, from the identity's
    /// answer on.
    pub agent_create: Option<Duration>,
    /// The guest's own account of it, step by step.
    pub guest_create: Option<jevm_protocol::CreateTimes>,
    /// What the guest asked of the share from the container's share
    /// mounts to the create's answer: each request a round trip.
    pub share_requests: Option<RequestCounts>,
    /// Opening the FIFOs and the agent's stdio streams.
    pub stdio: Option<Duration>,
    /// The agent's StartContainer: the process is running.
    pub process_running: Option<Duration>,
    /// The whole create request, arrival to answer: the phases above from
    /// template lookup to stdio, and what lies between them (reading the
    /// config and spec, the pod directory, the VM watcher).
    pub create_wall: Option<Duration>,
}

impl Timings {
    /// The phases of the create request, in order.
    fn create_phases(&self) -> [Option<Duration>; 7] {
        [
            self.template_lookup,
            self.network,
            self.clone,
            self.share,
            self.agent_ready,
            self.agent_create,
            self.stdio,
        ]
    }

    pub fn line(&self, cid: &str) -> String {
        let ms = |d: Option<Duration>| match d {
            Some(d) => format!("{:.2}", d.as_secs_f64() * 1e3),
            None => "-".into(),
        };
        let phases: Duration = self.create_phases().iter().flatten().sum();
        let total =
            phases + self.shim_start.unwrap_or_default() + self.process_running.unwrap_or_default();
        // What the create request spent outside its named phases.
        let other = self.create_wall.map(|w| w.saturating_sub(phases));
        let guest = match &self.guest_create {
            Some(g) => {
                let ms = |us: u64| format!("{:.2}", us as f64 / 1e3);
                format!(
                    " guest_cgroup_ms={} guest_stage_ms={} guest_namespaces_ms={} \
                     guest_pid_fork_ms={} guest_mounts_ms={} guest_process_ms={} guest_create_ms={} \
                     guest_mounts_spec_ms={} guest_mounts_devices_ms={} guest_mounts_pivot_ms={} \
                     guest_mounts_paths_ms={}",
                    ms(g.cgroup_us),
                    ms(g.stage_us),
                    ms(g.namespaces_us),
                    ms(g.pid_fork_us),
                    ms(g.mounts_us),
                    ms(g.process_us),
                    ms(g.total_us),
                    ms(g.mounts_spec_us),
                    ms(g.mounts_devices_us),
                    ms(g.mounts_pivot_us),
                    ms(g.mounts_paths_us),
                )
            }
            None => String::new(),
        };
        let share = match &self.share_requests {
            Some(r) => format!(
                " share_requests={} share_host_ms={:.2} share_ops={r}",
                r.total(),
                r.host.as_secs_f64() * 1e3
            ),
            None => String::new(),
        };
        format!(
            "jevm timings: container={cid} shim_start_ms={} template_lookup_ms={} network_ms={} \
             clone_ms={} virtiofs_share_ms={} agent_ready_ms={} agent_create_ms={} stdio_ms={} \
             create_other_ms={} process_running_ms={} total_ms={} create_wall_ms={}{guest}{share}",
            ms(self.shim_start),
            ms(self.template_lookup),
            ms(self.network),
            ms(self.clone),
            ms(self.share),
            ms(self.agent_ready),
            ms(self.agent_create),
            ms(self.stdio),
            ms(other),
            ms(self.process_running),
            ms(Some(total + other.unwrap_or_default())),
            ms(self.create_wall),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_every_step_and_marks_missing_ones() {
        let t = Timings {
            clone: Some(Duration::from_micros(1500)),
            agent_create: Some(Duration::from_millis(2)),
            ..Default::default()
        };
        assert_eq!(
            t.line("c1"),
            "jevm timings: container=c1 shim_start_ms=- template_lookup_ms=- network_ms=- clone_ms=1.50 \
             virtiofs_share_ms=- agent_ready_ms=- agent_create_ms=2.00 stdio_ms=- create_other_ms=- \
             process_running_ms=- total_ms=3.50 create_wall_ms=-"
        );
    }

    #[test]
    fn the_share_requests_of_the_create_end_the_line() {
        let share = jevm_runtime::vmm::devices::fs::ShareRequests::default();
        share.record(1, Duration::from_micros(300));
        share.record(1, Duration::from_micros(200));
        share.record(3, Duration::from_micros(500));
        let t = Timings {
            share_requests: Some(share.counts()),
            ..Default::default()
        };
        let line = t.line("c");
        assert!(
            line.ends_with(" share_requests=3 share_host_ms=1.00 share_ops=LOOKUP:2,GETATTR:1"),
            "{line}"
        );
    }

    #[test]
    fn what_the_create_spent_outside_its_phases_is_counted_in_the_total() {
        let t = Timings {
            shim_start: Some(Duration::from_millis(10)),
            clone: Some(Duration::from_millis(100)),
            agent_create: Some(Duration::from_millis(200)),
            process_running: Some(Duration::from_millis(5)),
            create_wall: Some(Duration::from_millis(350)),
            ..Default::default()
        };
        let line = t.line("c");
        assert!(line.contains(" create_other_ms=50.00 "), "{line}");
        assert!(line.contains(" total_ms=365.00 "), "{line}");
    }

    #[test]
    fn the_guest_s_steps_follow_and_do_not_count_twice_in_the_total() {
        let t = Timings {
            agent_create: Some(Duration::from_millis(20)),
            guest_create: Some(jevm_protocol::CreateTimes {
                cgroup_us: 1_000,
                stage_us: 2_500,
                namespaces_us: 3_000,
                pid_fork_us: 400,
                mounts_us: 5_000,
                process_us: 6_000,
                total_us: 19_000,
                mounts_spec_us: 1_000,
                mounts_devices_us: 1_500,
                mounts_pivot_us: 500,
                mounts_paths_us: 2_000,
            }),
            ..Default::default()
        };
        let line = t.line("c");
        assert!(
            line.ends_with(
                " total_ms=20.00 create_wall_ms=- guest_cgroup_ms=1.00 guest_stage_ms=2.50 \
                 guest_namespaces_ms=3.00 guest_pid_fork_ms=0.40 guest_mounts_ms=5.00 \
                 guest_process_ms=6.00 guest_create_ms=19.00 guest_mounts_spec_ms=1.00 \
                 guest_mounts_devices_ms=1.50 guest_mounts_pivot_ms=0.50 guest_mounts_paths_ms=2.00"
            ),
            "{line}"
        );
    }
}
