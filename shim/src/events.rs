//! containerd task events and the values they carry (exit status, time,
//! metrics), built from what the agent reports.

use containerd_shim::event::Event;
use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{self, Message};
use jevm_protocol::ContainerStats;

/// Exit status of a process whose VM went away under it: killed, as by
/// SIGKILL (what runc's shim reports for a task it lost).
pub const LOST_EXIT_STATUS: u32 = 128 + libc::SIGKILL as u32;

/// An event ready for the publisher: its topic, message, and the time it
/// happened (the envelope's timestamp: taken here, not when containerd is
/// reachable again, so the order of times is the order of events).
pub struct Outgoing {
    pub topic: String,
    /// The event encoded, or why it could not be (the publisher logs it).
    pub event: Result<Any, String>,
    pub at: Timestamp,
}

pub fn outgoing<E: Event + TypeName + Message>(e: E) -> Outgoing {
    let topic = e.topic();
    Outgoing {
        event: to_any(&e).map_err(|err| format!("encoding {}: {err}", E::TYPE_NAME)),
        topic,
        at: now(),
    }
}

/// The protobuf type name a message is sent under in an `Any`.
///
/// Written out, not read from the message's descriptor: the first
/// descriptor lookup builds the protobuf crate's reflection index of the
/// message's file and every file it imports (`descriptor.proto` among
/// them), ~0.4 MiB of heap that then stays in every pod's shim for its
/// whole life. The test below checks each name against the descriptor.
pub trait TypeName {
    const TYPE_NAME: &'static str;
}

macro_rules! type_names {
    ($($t:ty => $name:literal),* $(,)?) => {
        $(impl TypeName for $t {
            const TYPE_NAME: &'static str = $name;
        })*
    };
}

type_names! {
    TaskCreate => "containerd.events.TaskCreate",
    TaskStart => "containerd.events.TaskStart",
    TaskExecAdded => "containerd.events.TaskExecAdded",
    TaskExecStarted => "containerd.events.TaskExecStarted",
    TaskPaused => "containerd.events.TaskPaused",
    TaskResumed => "containerd.events.TaskResumed",
    TaskExit => "containerd.events.TaskExit",
    TaskDelete => "containerd.events.TaskDelete",
    TaskOOM => "containerd.events.TaskOOM",
    Metrics => "io.containerd.cgroups.v2.Metrics",
}

/// `message` in an `Any` (containerd's type URLs for these are the bare
/// full name, as the shim crate's `convert_to_any` writes them).
///
/// Encoded through `Message`, not `MessageDyn`: the dynamic encoder names
/// the message for its size check through the descriptor, which builds
/// the reflection index this module avoids.
pub fn to_any<M: Message + TypeName>(message: &M) -> protobuf::Result<Any> {
    Ok(Any {
        type_url: M::TYPE_NAME.to_string(),
        value: message.write_to_bytes()?,
        ..Default::default()
    })
}

pub fn timestamp_from_ns(ns: u64) -> Timestamp {
    Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
        ..Default::default()
    }
}

pub fn now() -> Timestamp {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    timestamp_from_ns(ns)
}

/// `TaskExit` as containerd expects it: `id` is the container id for the
/// init process, the exec id otherwise.
pub fn task_exit(
    cid: &str,
    exec_id: Option<&str>,
    pid: u32,
    status: u32,
    at: Timestamp,
) -> TaskExit {
    TaskExit {
        container_id: cid.to_string(),
        id: exec_id.unwrap_or(cid).to_string(),
        pid,
        exit_status: status,
        exited_at: Some(at).into(),
        ..Default::default()
    }
}

pub fn task_oom(cid: &str) -> TaskOOM {
    TaskOOM {
        container_id: cid.to_string(),
        ..Default::default()
    }
}

/// The guest's cgroup v2 counters as containerd's cgroup v2 `Metrics`
/// (what `ctr task metrics` decodes for a cgroup v2 runc container).
pub fn metrics(s: &ContainerStats) -> Metrics {
    let cpu = |k: &str| s.cpu.get(k).copied().unwrap_or(0);
    let mem = |k: &str| s.memory.get(k).copied().unwrap_or(0);
    let ev = |k: &str| s.memory_events.get(k).copied().unwrap_or(0);
    Metrics {
        pids: Some(PidsStat {
            current: s.pids_current,
            limit: s.pids_max.unwrap_or(0),
            ..Default::default()
        })
        .into(),
        cpu: Some(CPUStat {
            usage_usec: cpu("usage_usec"),
            user_usec: cpu("user_usec"),
            system_usec: cpu("system_usec"),
            nr_periods: cpu("nr_periods"),
            nr_throttled: cpu("nr_throttled"),
            throttled_usec: cpu("throttled_usec"),
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStat {
            anon: mem("anon"),
            file: mem("file"),
            kernel_stack: mem("kernel_stack"),
            slab: mem("slab"),
            sock: mem("sock"),
            shmem: mem("shmem"),
            file_mapped: mem("file_mapped"),
            file_dirty: mem("file_dirty"),
            file_writeback: mem("file_writeback"),
            anon_thp: mem("anon_thp"),
            inactive_anon: mem("inactive_anon"),
            active_anon: mem("active_anon"),
            inactive_file: mem("inactive_file"),
            active_file: mem("active_file"),
            unevictable: mem("unevictable"),
            slab_reclaimable: mem("slab_reclaimable"),
            slab_unreclaimable: mem("slab_unreclaimable"),
            pgfault: mem("pgfault"),
            pgmajfault: mem("pgmajfault"),
            workingset_refault: mem("workingset_refault_anon")
                + mem("workingset_refault_file")
                + mem("workingset_refault"),
            workingset_activate: mem("workingset_activate_anon")
                + mem("workingset_activate_file")
                + mem("workingset_activate"),
            workingset_nodereclaim: mem("workingset_nodereclaim"),
            pgrefill: mem("pgrefill"),
            pgscan: mem("pgscan"),
            pgsteal: mem("pgsteal"),
            pgactivate: mem("pgactivate"),
            pgdeactivate: mem("pgdeactivate"),
            pglazyfree: mem("pglazyfree"),
            pglazyfreed: mem("pglazyfreed"),
            thp_fault_alloc: mem("thp_fault_alloc"),
            thp_collapse_alloc: mem("thp_collapse_alloc"),
            usage: s.memory_current,
            // runc reports "max" as the largest value.
            usage_limit: s.memory_max.unwrap_or(u64::MAX),
            ..Default::default()
        })
        .into(),
        memory_events: Some(MemoryEvents {
            low: ev("low"),
            high: ev("high"),
            max: ev("max"),
            oom: ev("oom"),
            oom_kill: ev("oom_kill"),
            oom_group_kill: ev("oom_group_kill"),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::MessageFull;

    fn named<T: TypeName + MessageFull>() -> (&'static str, String) {
        (T::TYPE_NAME, T::descriptor().full_name().to_string())
    }

    #[test]
    fn type_names_are_the_descriptors_full_names() {
        for (written, descriptor) in [
            named::<TaskCreate>(),
            named::<TaskStart>(),
            named::<TaskExecAdded>(),
            named::<TaskExecStarted>(),
            named::<TaskPaused>(),
            named::<TaskResumed>(),
            named::<TaskExit>(),
            named::<TaskDelete>(),
            named::<TaskOOM>(),
            named::<Metrics>(),
        ] {
            assert_eq!(written, descriptor);
        }
    }

    #[test]
    fn an_event_in_an_any_is_what_the_shim_crate_would_send() {
        let e = task_exit("c1", Some("e1"), 43, 3, timestamp_from_ns(7));
        let ours = to_any(&e).unwrap();
        let theirs = containerd_shim::util::convert_to_any(Box::new(e)).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn topics_are_the_ones_containerd_subscribes_to() {
        let t = |o: Outgoing| o.topic;
        assert_eq!(t(outgoing(TaskCreate::default())), "/tasks/create");
        assert_eq!(t(outgoing(TaskStart::default())), "/tasks/start");
        assert_eq!(t(outgoing(TaskExecAdded::default())), "/tasks/exec-added");
        assert_eq!(
            t(outgoing(TaskExecStarted::default())),
            "/tasks/exec-started"
        );
        assert_eq!(t(outgoing(TaskPaused::default())), "/tasks/paused");
        assert_eq!(t(outgoing(TaskResumed::default())), "/tasks/resumed");
        assert_eq!(
            t(outgoing(task_exit("c", None, 1, 0, now()))),
            "/tasks/exit"
        );
        assert_eq!(t(outgoing(TaskDelete::default())), "/tasks/delete");
        assert_eq!(t(outgoing(task_oom("c"))), "/tasks/oom");
        assert_eq!(
            outgoing(task_oom("c")).event.unwrap().type_url,
            "containerd.events.TaskOOM"
        );
    }

    #[test]
    fn exit_event_names_init_by_container_id_and_exec_by_exec_id() {
        let e = task_exit("c1", None, 42, 137, timestamp_from_ns(1_500_000_000));
        assert_eq!(
            (e.container_id.as_str(), e.id.as_str(), e.pid, e.exit_status),
            ("c1", "c1", 42, 137)
        );
        assert_eq!((e.exited_at.seconds, e.exited_at.nanos), (1, 500_000_000));
        let e = task_exit("c1", Some("e1"), 43, 3, now());
        assert_eq!(e.id, "e1");
    }

    #[test]
    fn a_lost_vm_reads_as_sigkill() {
        assert_eq!(LOST_EXIT_STATUS, 137);
    }

    #[test]
    fn metrics_carry_the_cgroup_counters() {
        let mut s = ContainerStats {
            memory_current: 4096,
            memory_max: Some(1 << 20),
            pids_current: 3,
            pids_max: None,
            ..Default::default()
        };
        s.cpu.insert("usage_usec".into(), 10);
        s.cpu.insert("user_usec".into(), 7);
        s.memory.insert("anon".into(), 2048);
        s.memory_events.insert("oom_kill".into(), 1);
        let m = metrics(&s);
        assert_eq!((m.pids.current, m.pids.limit), (3, 0));
        assert_eq!(
            (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec),
            (10, 7, 0)
        );
        assert_eq!(
            (m.memory.usage, m.memory.usage_limit, m.memory.anon),
            (4096, 1 << 20, 2048)
        );
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(
            Metrics::descriptor().full_name(),
            "io.containerd.cgroups.v2.Metrics"
        );
        s.memory_max = None;
        assert_eq!(metrics(&s).memory.usage_limit, u64::MAX);
    }
}
