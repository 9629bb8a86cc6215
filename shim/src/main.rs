//! `containerd-shim-jevm-v2`: containerd's task API v2 for pods that run
//! in jevm microVMs (one VM per pod, cloned from a template).

mod agent;
mod config;
mod events;
mod layout;
mod lifecycle;
mod mount_points;
mod mounts;
mod network;
mod pod;
mod publisher;
mod record;
mod resolve;
mod runtime_options;
mod service;
mod sizing;
mod spec;
mod stdio;
mod task;
#[cfg(test)]
#[path = "../../agent/src/test_skip.rs"]
mod test_skip;
mod timings;

use std::sync::OnceLock;
use std::time::SystemTime;

use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};

const RUNTIME_ID: &str = "io.containerd.jevm.v2";

static PROCESS_START: OnceLock<SystemTime> = OnceLock::new();

/// When this process started (for the shim-start timing).
pub fn process_start() -> SystemTime {
    *PROCESS_START.get_or_init(SystemTime::now)
}

/// `-info` (containerd 2.x introspection): the runtime's name and version
/// as a protobuf `RuntimeInfo` on stdout.
fn print_info() -> std::io::Result<()> {
    use std::io::Write;
    let info = RuntimeInfo {
        name: "containerd-shim-jevm-v2".into(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = info.write_to_bytes().map_err(std::io::Error::other)?;
    std::io::stdout().write_all(&bytes)
}

/// `start` gets containerd's bootstrap data on stdin: runc's `Options`
/// from 1.6 (never jevm's, whose options arrive with Create), a
/// `BootstrapParams` from 2.3. The shim crate would parse it as runc's
/// options and refuse the 2.3 message; jevm needs none of it, so it is
/// read (containerd waits for that) and stdin becomes /dev/null.
fn discard_start_stdin() -> std::io::Result<()> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    let null = std::fs::File::open("/dev/null")?;
    nix::unistd::dup2(null.as_raw_fd(), libc::STDIN_FILENO).map_err(std::io::Error::from)?;
    Ok(())
}

/// The log level from the jevm config file, if it sets one; the runtime
/// options (read at create) may still change it.
fn configured_log_level() -> Option<String> {
    let env = std::env::var(config::ENV_PATH).ok();
    let source = config::choose_source(None, false, env.as_deref());
    config::load(&source, None).ok()?.log_level
}

/// The capabilities the serving shim keeps, for the whole pod's life:
/// mounts and namespaces (SYS_ADMIN), the tap and its tc filters
/// (NET_ADMIN), and what the virtio-fs server needs to act as the guest's
/// users on the share (see jevm_runtime::jail). Everything else (module
/// loading, raw I/O, ptrace, the clock, the audit and MAC controls, ...)
/// goes before any thread starts, so no thread has it.
const SHIM_CAPABILITIES: &[caps::Capability] = &[
    caps::Capability::CAP_SYS_ADMIN,
    caps::Capability::CAP_NET_ADMIN,
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_SETFCAP,
    caps::Capability::CAP_MKNOD,
];

/// `PR_SET_THP_DISABLE`'s flag (Linux 6.18) that leaves THP on in
/// mappings advised `MADV_HUGEPAGE`; older kernels refuse it (EINVAL).
const PR_THP_DISABLE_EXCEPT_ADVISED: libc::c_ulong = 1 << 1;

/// The serving shim (neither `start` nor `delete`, which containerd runs
/// as short-lived commands): drops the capabilities it never needs and
/// points stderr at containerd's shim log (the `log` FIFO in the bundle,
/// the working directory), so a panic or a jailed thread's last words
/// reach containerd's log instead of /dev/null.
fn prepare_serving_process() {
    // One malloc arena for the whole shim: glibc otherwise gives each of
    // the VMM's and tokio's threads that allocates an arena of its own,
    // whose partly used pages stay dirty for the pod's life (~0.6 MiB of
    // an idle pod's 2.3 MiB of VMM heap, measured with five pods). The
    // per-thread tcache still serves small allocations without the lock.
    // SAFETY: mallopt with integer arguments, before any other thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    // No transparent huge pages in the shim: with THP `always` a thread's
    // stack or a heap arena that crosses a 2 MiB boundary became one huge
    // page (+2 MiB for some pods, measured). The one mapping that gains
    // from them is the guest's: the template's huge pages (a template
    // store on a tmpfs with huge pages) mapped 2 MiB at a time. Linux
    // 6.1 maps those whatever this says; from 6.12 a process without THP
    // gets them only in mappings advised MADV_HUGEPAGE (as guest memory
    // is, `vmm::memory::map_template`) and only with "except advised"
    // (6.18), so that is asked for first.
    // SAFETY: prctl with integer arguments only.
    let except_advised = unsafe {
        libc::prctl(
            libc::PR_SET_THP_DISABLE,
            1,
            PR_THP_DISABLE_EXCEPT_ADVISED,
            0,
            0,
        )
    };
    // SAFETY: as above.
    if except_advised != 0 && unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        eprintln!(
            "containerd-shim-jevm-v2: cannot turn transparent huge pages off: {}",
            std::io::Error::last_os_error()
        );
    }
    if let Err(e) = jevm_runtime::jail::limit_process_capabilities(SHIM_CAPABILITIES) {
        eprintln!("containerd-shim-jevm-v2: cannot drop capabilities: {e}");
        std::process::exit(1);
    }
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(log) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
    {
        let _ = nix::unistd::dup2(log.as_raw_fd(), libc::STDERR_FILENO);
    }
}

fn main() {
    process_start();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let action = args.last().map(String::as_str);
    let serving = !matches!(action, Some("start" | "delete"))
        && !args
            .iter()
            .any(|a| ["-v", "--version", "-version", "-info", "--info"].contains(&a.as_str()));
    if serving {
        prepare_serving_process();
        // The pod's KVM VM is made while containerd prepares the create
        // request: a serving shim is started for one new pod.
        jevm_runtime::clone::prepare_vm();
    }
    // `start` and `delete` are short commands containerd waits for: one
    // thread does, without a worker pool to start and stop.
    let mut builder = if serving {
        // Two workers whatever the node's size: one pod's requests are few
        // and the VM's own work runs on its own threads; a worker per CPU
        // would be dozens of idle threads per pod on a large node.
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        // Blocking threads (the clone, mounts, the VM's stop) are used in
        // bursts around a pod's requests; kept 10 s (tokio's default) they
        // are an idle pod's stacks for nothing.
        b.thread_keep_alive(std::time::Duration::from_secs(1));
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("containerd-shim-jevm-v2: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(run(args));
}

async fn run(args: Vec<String>) {
    if args
        .iter()
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!("containerd-shim-jevm-v2 {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if args.iter().any(|a| a == "-info" || a == "--info") {
        if let Err(e) = print_info() {
            eprintln!("containerd-shim-jevm-v2: -info: {e}");
            std::process::exit(1);
        }
        return;
    }
    if args.last().map(String::as_str) == Some("start") {
        if let Err(e) = discard_start_stdin() {
            eprintln!("containerd-shim-jevm-v2: start: stdin: {e}");
            std::process::exit(1);
        }
    }
    let mut cfg = containerd_shim::Config::default();
    if let Some(level) = configured_log_level() {
        cfg.default_log_level = level;
    }
    containerd_shim::asynchronous::run::<service::Service>(RUNTIME_ID, Some(cfg)).await;
}
