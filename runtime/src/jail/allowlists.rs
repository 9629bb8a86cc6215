//! The syscalls each kind of VMM thread may make once it runs guest-facing
//! code: everything else ends the VMM (see `mod.rs` and docs/security.md,
//! which says how these lists were derived and how to update them).
//!
//! A list holds what the thread's own code, the crates it calls
//! (kvm-ioctls, virtio-queue, fuse-backend-rs) and Rust's std/glibc
//! underneath need: allocation, futexes, logging, a panic's abort and the
//! thread's own exit. `ioctl` is allowed only for the request numbers a
//! thread issues.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use super::ThreadKind;

/// A syscall with no argument checks, or `ioctl`/`prctl` limited to some
/// requests.
enum Allow {
    Any(i64),
    Ioctls(&'static [u64]),
    Prctls(&'static [u64]),
}
use Allow::{Any, Ioctls, Prctls};

// KVM ioctl numbers (linux/kvm.h, _IO(KVMIO=0xAE, n) and friends).
const KVM_RUN: u64 = 0xae80;
const KVM_IRQFD: u64 = 0x4020_ae76;
const KVM_IOEVENTFD: u64 = 0x4040_ae79;
// tty/socket/file ioctls a worker issues on its own descriptors.
const FIONBIO: u64 = 0x5421;
const FIONREAD: u64 = 0x541b;
const FIOCLEX: u64 = 0x5451;

/// Every Rust thread here: memory, locks, time, logging to stderr or the
/// shim's log, the thread's exit, and a panic's message and abort.
const COMMON: &[Allow] = &[
    Any(libc::SYS_brk),
    Any(libc::SYS_mmap),
    Any(libc::SYS_munmap),
    Any(libc::SYS_mremap),
    Any(libc::SYS_mprotect),
    Any(libc::SYS_madvise),
    Any(libc::SYS_futex),
    Any(libc::SYS_sched_yield),
    Any(libc::SYS_clock_gettime),
    Any(libc::SYS_clock_nanosleep),
    Any(libc::SYS_gettimeofday),
    Any(libc::SYS_nanosleep),
    Any(libc::SYS_getrandom),
    Any(libc::SYS_write),
    Any(libc::SYS_writev),
    Any(libc::SYS_read),
    Any(libc::SYS_close),
    Any(libc::SYS_rt_sigreturn),
    Any(libc::SYS_rt_sigprocmask),
    Any(libc::SYS_sigaltstack),
    Any(libc::SYS_getpid),
    Any(libc::SYS_gettid),
    Any(libc::SYS_tgkill),
    Any(libc::SYS_rt_sigaction),
    Any(libc::SYS_exit),
    Any(libc::SYS_exit_group),
    // A thread jailed ahead takes the name of the work it is given.
    Prctls(&[libc::PR_SET_NAME as u64]),
];

/// Every device worker: its epoll loop over the queue eventfds, its stop
/// eventfd and (vsock, net) its sockets or tap.
const EVENT_LOOP: &[Allow] = &[
    Any(libc::SYS_epoll_wait),
    Any(libc::SYS_epoll_pwait),
    Any(libc::SYS_epoll_ctl),
];

/// A vCPU: KVM_RUN, and what the guest's MMIO and port writes reach on this
/// thread: device registers, activation (queue eventfds, irqfds; the worker
/// thread itself is created by the unjailed spawner), reset (stopping a
/// worker), the console log.
const VCPU: &[Allow] = &[
    Ioctls(&[KVM_RUN, KVM_IRQFD, KVM_IOEVENTFD, FIONBIO, FIOCLEX]),
    Any(libc::SYS_eventfd2),
    Any(libc::SYS_epoll_create1),
    Any(libc::SYS_epoll_ctl),
    Any(libc::SYS_fcntl),
    Any(libc::SYS_dup),
    Any(libc::SYS_lseek),
    Any(libc::SYS_fsync),
];

/// virtio-blk: reads and writes on the already-open disk image.
const BLOCK: &[Allow] = &[
    // descriptor flags of the image (seen by hack/seccomp-learn in the
    // guest_boot block test)
    Any(libc::SYS_fcntl),
    Any(libc::SYS_pread64),
    Any(libc::SYS_pwrite64),
    Any(libc::SYS_preadv),
    Any(libc::SYS_pwritev),
    Any(libc::SYS_lseek),
    Any(libc::SYS_fsync),
    Any(libc::SYS_fdatasync),
    Any(libc::SYS_fallocate),
    Any(libc::SYS_fstat),
];

/// virtio-net: frames between the queues and the already-open tap.
const NET: &[Allow] = &[Any(libc::SYS_readv)];

/// virtio-vsock: the muxer, which connects guest streams to the pod's Unix
/// sockets under the run directory and accepts the host's.
const VSOCK: &[Allow] = &[
    Ioctls(&[FIONBIO, FIONREAD, FIOCLEX]),
    Any(libc::SYS_socket),
    Any(libc::SYS_connect),
    Any(libc::SYS_accept4),
    Any(libc::SYS_recvfrom),
    Any(libc::SYS_sendto),
    Any(libc::SYS_recvmsg),
    Any(libc::SYS_sendmsg),
    Any(libc::SYS_shutdown),
    Any(libc::SYS_getsockopt),
    Any(libc::SYS_fcntl),
    Any(libc::SYS_readv),
];

/// virtio-fs: fuse-backend-rs's passthrough server on the pod's share,
/// acting with the guest caller's uid/gid (per-thread setresuid/setresgid)
/// and dropping CAP_FSETID around writes (capget/capset).
const FS: &[Allow] = &[
    Any(libc::SYS_openat),
    Any(libc::SYS_open_by_handle_at),
    Any(libc::SYS_name_to_handle_at),
    Any(libc::SYS_newfstatat),
    Any(libc::SYS_fstat),
    Any(libc::SYS_statx),
    Any(libc::SYS_fstatfs),
    Any(libc::SYS_readlinkat),
    Any(libc::SYS_getdents64),
    Any(libc::SYS_lseek),
    Any(libc::SYS_pread64),
    Any(libc::SYS_pwrite64),
    Any(libc::SYS_preadv),
    Any(libc::SYS_pwritev),
    Any(libc::SYS_readv),
    Any(libc::SYS_mkdirat),
    Any(libc::SYS_mknodat),
    Any(libc::SYS_symlinkat),
    Any(libc::SYS_linkat),
    Any(libc::SYS_unlinkat),
    Any(libc::SYS_renameat2),
    Any(libc::SYS_fchownat),
    Any(libc::SYS_fchown),
    Any(libc::SYS_fchmod),
    Any(libc::SYS_fchmodat),
    Any(libc::SYS_utimensat),
    Any(libc::SYS_ftruncate),
    Any(libc::SYS_fallocate),
    Any(libc::SYS_fsync),
    Any(libc::SYS_fdatasync),
    Any(libc::SYS_flock),
    Any(libc::SYS_fcntl),
    Any(libc::SYS_dup),
    Any(libc::SYS_copy_file_range),
    Any(libc::SYS_getxattr),
    Any(libc::SYS_lgetxattr),
    Any(libc::SYS_fgetxattr),
    Any(libc::SYS_setxattr),
    Any(libc::SYS_lsetxattr),
    Any(libc::SYS_fsetxattr),
    Any(libc::SYS_listxattr),
    Any(libc::SYS_llistxattr),
    Any(libc::SYS_flistxattr),
    Any(libc::SYS_removexattr),
    Any(libc::SYS_lremovexattr),
    Any(libc::SYS_fremovexattr),
    Any(libc::SYS_setresuid),
    Any(libc::SYS_setresgid),
    Any(libc::SYS_capget),
    Any(libc::SYS_capset),
    Any(libc::SYS_umask),
    // Confining itself beneath the share once it is given one (it may have
    // entered its jail ahead); Landlock can only take access away.
    Any(libc::SYS_landlock_create_ruleset),
    Any(libc::SYS_landlock_add_rule),
    Any(libc::SYS_landlock_restrict_self),
];

/// The lists a kind's filter allows, besides COMMON.
fn lists(kind: ThreadKind) -> &'static [&'static [Allow]] {
    match kind {
        ThreadKind::Vcpu => &[VCPU],
        ThreadKind::Block => &[EVENT_LOOP, BLOCK],
        ThreadKind::Net => &[EVENT_LOOP, NET],
        ThreadKind::Vsock => &[EVENT_LOOP, VSOCK],
        ThreadKind::Fs => &[EVENT_LOOP, FS],
    }
}

fn all(kind: ThreadKind) -> impl Iterator<Item = &'static Allow> {
    COMMON
        .iter()
        .chain(lists(kind).iter().flat_map(|l| l.iter()))
}

/// The filter for `kind`: allow what its list holds, `mismatch` for the
/// rest.
pub(super) fn filter(
    kind: ThreadKind,
    mismatch: SeccompAction,
) -> Result<SeccompFilter, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for allow in all(kind) {
        match allow {
            Any(nr) => {
                rules.insert(*nr, Vec::new());
            }
            Ioctls(requests) | Prctls(requests) => {
                let (nr, arg) = match allow {
                    Ioctls(_) => (libc::SYS_ioctl, 1),
                    _ => (libc::SYS_prctl, 0),
                };
                let entry = rules.entry(nr).or_default();
                for &request in requests.iter() {
                    entry.push(SeccompRule::new(vec![SeccompCondition::new(
                        arg,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        request,
                    )?])?);
                }
            }
        }
    }
    SeccompFilter::new(
        rules,
        mismatch,
        SeccompAction::Allow,
        std::env::consts::ARCH.try_into()?,
    )
}

/// The syscall numbers a kind may make, for docs and tests.
#[cfg(test)]
pub(super) fn allowed(kind: ThreadKind) -> Vec<i64> {
    all(kind)
        .map(|a| match a {
            Any(nr) => *nr,
            Ioctls(_) => libc::SYS_ioctl,
            Prctls(_) => libc::SYS_prctl,
        })
        .collect()
}
