//! Thin AF_VSOCK stream wrappers over nix: std has no vsock type.

use nix::sys::socket::{
    accept4, bind, connect, listen, setsockopt, shutdown, socket, sockopt, AddressFamily, Backlog,
    Shutdown, SockFlag, SockType, VsockAddr,
};
use nix::sys::time::TimeVal;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// The host's address; the guest is some other CID the VMM assigned.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

fn stream_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Listens on `port` on every CID of this guest.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = stream_socket()?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::MAXCONN)?;
        Ok(Self(fd))
    }

    pub fn accept(&self) -> io::Result<VsockStream> {
        let fd = accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 just returned this descriptor, so nothing else owns
        // it and OwnedFd may close it.
        Ok(VsockStream(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

pub struct VsockStream(OwnedFd);

impl VsockStream {
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = stream_socket()?;
        connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
        Ok(Self(fd))
    }

    /// Tells the peer we have sent everything; reads still work.
    pub fn shutdown_write(&self) -> io::Result<()> {
        Ok(shutdown(self.0.as_raw_fd(), Shutdown::Write)?)
    }

    /// After `timeout` without progress a read or write fails with
    /// `WouldBlock`.
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        let secs = libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX);
        let tv = TimeVal::new(secs, timeout.subsec_micros().into());
        setsockopt(&self.0, sockopt::ReceiveTimeout, &tv)?;
        setsockopt(&self.0, sockopt::SendTimeout, &tv)?;
        Ok(())
    }
}

impl From<VsockStream> for OwnedFd {
    fn from(stream: VsockStream) -> OwnedFd {
        stream.0
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(self.0.as_raw_fd(), buf)?)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(nix::unistd::write(self.0.as_fd(), buf)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
