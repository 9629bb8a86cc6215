//! The two socket calls std cannot make for us without blocking the device
//! thread or killing the process.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Writes to a stream socket without blocking and without SIGPIPE.
///
/// `write(2)` on a socket whose peer has gone raises SIGPIPE; the shim
/// embedding this library must not die because a host client hung up.
pub fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a live, initialised slice of `buf.len()` bytes for
        // the whole call, and the descriptor belongs to `stream`, which the
        // caller keeps open across the call.
        let r = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if r >= 0 {
            // `send` never returns more than `buf.len()`.
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Connects to a listening Unix stream socket without ever blocking.
///
/// `UnixStream::connect` sleeps while the listener's backlog is full, which
/// would stall every connection of the VM behind one slow host process. On a
/// non-blocking AF_UNIX socket the kernel answers at once: connected, or
/// EAGAIN when the backlog is full (we treat that as refused).
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    // Keep one byte for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is too long or contains NUL", path.display()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let addr_len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;

    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2), is open and owned by no
    // one else, so `OwnedFd` may take it over (and close it on every error
    // path below).
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    // SAFETY: `addr` is a fully initialised sockaddr_un that outlives the
    // call, and `addr_len` is within its size (checked against sun_path).
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            addr_len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_nonblocking_reaches_listener_and_refuses_missing_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        assert!(connect_nonblocking(&path).is_err());
        let listener = UnixListener::bind(&path).unwrap();
        let client = connect_nonblocking(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        assert_eq!(send_nosignal(&client, b"hi").unwrap(), 2);
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn send_to_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let e = send_nosignal(&a, b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
