//! The shim's breakdown of one create→start, logged at info level (one
//! line, `jevm timings: ...`) for the benchmark to pick up from the shim log.

use std::time::Duration;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// `shim start` subcommand to the task service existing (first
    /// container of a pod only).
    pub shim_start: Option<Duration>,
    /// Template store lookup (or build, the first time).
    pub template_lookup: Option<Duration>,
    /// The tap and tc redirects in the pod's network namespace (CRI pods).
    pub network: Option<Duration>,
    /// Clone: restore, resume, identity (includes attaching the pod's
    /// virtio-fs share to the clone's device).
    pub clone: Option<Duration>,
    /// Host mounts into the share the VM serves over virtio-fs: the rootfs
    /// and bind mounts.
    pub share: Option<Duration>,
    /// The agent's CreateContainer.
    pub agent_create: Option<Duration>,
    /// Opening the FIFOs and the agent's stdio streams.
    pub stdio: Option<Duration>,
    /// The agent's StartContainer: the process is running.
    pub process_running: Option<Duration>,
}

impl Timings {
    pub fn line(&self, cid: &str) -> String {
        let ms = |d: Option<Duration>| match d {
            Some(d) => format!("{:.2}", d.as_secs_f64() * 1e3),
            None => "-".into(),
        };
        let total: Duration = [
            self.shim_start,
            self.template_lookup,
            self.network,
            self.clone,
            self.share,
            self.agent_create,
            self.stdio,
            self.process_running,
        ]
        .iter()
        .flatten()
        .sum();
        format!(
            "jevm timings: container={cid} shim_start_ms={} template_lookup_ms={} network_ms={} \
             clone_ms={} virtiofs_share_ms={} agent_create_ms={} stdio_ms={} process_running_ms={} total_ms={}",
            ms(self.shim_start),
            ms(self.template_lookup),
            ms(self.network),
            ms(self.clone),
            ms(self.share),
            ms(self.agent_create),
            ms(self.stdio),
            ms(self.process_running),
            ms(Some(total)),
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
             virtiofs_share_ms=- agent_create_ms=2.00 stdio_ms=- process_running_ms=- total_ms=3.50"
        );
    }
}
