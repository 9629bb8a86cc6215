//! What happens when a jailed thread makes a syscall its filter does not
//! allow: the kernel sends it SIGSYS (SECCOMP_RET_TRAP) and this handler
//! writes one line naming the thread's kind and the syscall number to
//! stderr (the shim points stderr at containerd's shim log), then ends the
//! process with exit status 128 + SIGSYS. Only async-signal-safe calls:
//! the line is built on the stack, `write` and `exit_group` are in every
//! kind's allow-list.

use std::io;

use super::{ThreadKind, CURRENT};

/// The exit status of a VMM ended by its jail.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

pub(super) fn install() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value;
    // the handler has the SA_SIGINFO signature and only makes
    // async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The syscall number of a seccomp SIGSYS: `si_syscall`, after the
/// `si_call_addr` pointer at the start of siginfo's union (x86-64 and
/// aarch64 layout: the union starts at byte 16).
///
/// # Safety
/// `info` points at the siginfo_t of a SIGSYS with si_code SYS_SECCOMP.
unsafe fn syscall_number(info: *const libc::siginfo_t) -> i32 {
    // SAFETY: per the caller, `info` is a whole siginfo_t (128 bytes);
    // offset 24 is inside it and 4-byte aligned.
    unsafe { std::ptr::read((info as *const u8).add(24) as *const i32) }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a SIGSYS handler its siginfo.
    let nr = unsafe { syscall_number(info) };
    let kind = ThreadKind::from_u8(CURRENT.with(|c| c.get()))
        .map(ThreadKind::name)
        .unwrap_or("unjailed");
    let mut line = Line::default();
    line.push(b"jevm: seccomp: a ");
    line.push(kind.as_bytes());
    line.push(b" thread made syscall ");
    line.push_number(nr as i64);
    line.push(b", which its allow-list does not hold: the VMM exits (docs/security.md)\n");
    // SAFETY: write(2) and exit_group(2) are async-signal-safe and take
    // no pointers but the line's own buffer.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::syscall(libc::SYS_exit_group, EXIT_STATUS);
    }
}

/// A fixed-size line buffer, since the handler may not allocate.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 192],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: i64) {
        if n < 0 {
            self.push(b"-");
            n = -n;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_line_holds_the_kind_and_number_and_never_overflows() {
        let mut l = Line::default();
        l.push(b"syscall ");
        l.push_number(0);
        l.push(b" ");
        l.push_number(-17);
        l.push(b" ");
        l.push_number(435);
        assert_eq!(&l.buf[..l.len], b"syscall 0 -17 435");
        for _ in 0..100 {
            l.push(b"0123456789");
        }
        assert_eq!(l.len, l.buf.len());
    }
}
