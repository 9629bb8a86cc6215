//! A stand-in for the `container-init` stage in unit tests: the test binary
//! itself, re-executed by the real spawn code as `<test binary>
//! container-init`, caught before libtest's `main` runs. It speaks the plan
//! protocol on fd 3 and `execvp`s `process.args` without building any
//! container, so the agent's lifecycle can be exercised with real processes
//! on any host.
//!
//! Behaviours, chosen by the plan:
//! - `args[0] == "fail-stage"`: answers `Error { message: args[1] }`.
//! - container id starting with `fork-`: forks, the stage exits at once and
//!   the child (reparented to the test process, a subreaper) goes on, like a
//!   stage with an intermediate process.
//! - `terminal`: allocates a pseudo-terminal (the host's devpts), makes its
//!   slave fds 0-2 and the controlling terminal, and sends the master, as
//!   the real stage does with the container's devpts.

use super::plan::{self, AgentMsg, InitPlan, PlanKind, StageMsg, INIT_ARG, SYNC_FD};
use jevm_protocol::{read_frame, write_frame};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};

#[used]
#[link_section = ".init_array"]
static FAKE_STAGE_HOOK: extern "C" fn(
    libc::c_int,
    *const *const libc::c_char,
    *const *const libc::c_char,
) = hook;

extern "C" fn hook(
    argc: libc::c_int,
    argv: *const *const libc::c_char,
    _: *const *const libc::c_char,
) {
    if argc < 2 || argv.is_null() {
        return;
    }
    // SAFETY: glibc passes the process's argv, argc entries long, to
    // .init_array functions.
    let arg1 = unsafe { *argv.add(1) };
    if arg1.is_null() {
        return;
    }
    // SAFETY: argv entries are NUL-terminated strings.
    let arg1 = unsafe { CStr::from_ptr(arg1) }.to_bytes();
    if arg1 == super::zygote::ZYGOTE_ARG.as_bytes() {
        super::zygote::serve(run);
    }
    if arg1 != INIT_ARG.as_bytes() {
        return;
    }
    run();
}

fn run() -> ! {
    // SAFETY: the spawn code put the sync socket at fd 3; nothing else in
    // this fresh process owns it.
    let mut sync = unsafe { File::from_raw_fd(SYNC_FD) };
    let plan: InitPlan = match read_frame(&mut sync) {
        Ok(plan) => plan,
        Err(_) => exit(2),
    };
    let args: Vec<String> = match &plan.kind {
        PlanKind::Create { spec } => spec
            .process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .unwrap_or_default(),
        PlanKind::Exec { process, .. } => process.args().clone().unwrap_or_default(),
    };
    if args.first().map(String::as_str) == Some("fail-stage") {
        let message = args.get(1).cloned().unwrap_or_default();
        let _ = write_frame(&mut sync, &StageMsg::Error { message });
        exit(1);
    }
    if plan.container_id.starts_with("fork-") {
        // SAFETY: this process is single-threaded (before main).
        match unsafe { libc::fork() } {
            0 => {}
            pid if pid > 0 => exit(0),
            _ => exit(3),
        }
    }
    let pid = std::process::id();
    if write_frame(&mut sync, &StageMsg::Pid { pid }).is_err() {
        exit(4);
    }
    if plan.terminal {
        terminal(&mut sync);
    }
    if write_frame(
        &mut sync,
        &StageMsg::Ready {
            times: Default::default(),
        },
    )
    .is_err()
    {
        exit(4);
    }
    match read_frame::<_, AgentMsg>(&mut sync) {
        Ok(AgentMsg::Start) => {}
        Err(_) => exit(5),
    }
    // SAFETY: fcntl on an fd this process owns.
    unsafe { libc::fcntl(SYNC_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let cargs: Vec<CString> = args
        .iter()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = cargs.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    if let Some(exe) = cargs.first() {
        // SAFETY: NUL-terminated argv of valid C strings.
        unsafe { libc::execvp(exe.as_ptr(), ptrs.as_ptr()) };
    }
    let message = format!(
        "exec: {:?}: {}",
        args.first().cloned().unwrap_or_default(),
        std::io::Error::last_os_error()
    );
    let _ = write_frame(&mut sync, &StageMsg::Error { message });
    exit(127)
}

fn terminal(sync: &mut File) {
    let Ok(pty) = nix::pty::openpty(None, None) else {
        exit(6)
    };
    for target in 0..3 {
        // SAFETY: dup2 on fds this process owns.
        if unsafe { libc::dup2(pty.slave.as_raw_fd(), target) } < 0 {
            exit(6);
        }
    }
    // SAFETY: setsid and TIOCSCTTY take no pointers; fd 0 is the slave.
    if unsafe { libc::setsid() } < 0 || unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
        exit(6);
    }
    if write_frame(&mut *sync, &StageMsg::Console).is_err()
        || plan::send_console(sync.as_fd(), pty.master.as_fd()).is_err()
    {
        exit(6);
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: ends this process without running libtest's machinery.
    unsafe { libc::_exit(code) }
}
