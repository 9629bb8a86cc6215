//! cgroup v2 inside the guest: one cgroup per container under
//! `/sys/fs/cgroup/jevm/<container id>`, limits from the OCI spec, freeze,
//! counters, and OOM-kill notification.
