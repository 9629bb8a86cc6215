//! The tap device the VMM's virtio-net device sends and receives on.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

const TUNTAP: u32 = b'T' as u32;
vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
vmm_sys_util::ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);

/// Creates the tap `name` in the calling thread's netns: Ethernet frames
/// with a virtio-net header in front and no packet-info header,
/// non-persistent, failing if the name exists (never reusing someone
/// else's device).
pub(super) fn open_tap(name: &str) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        // std adds O_CLOEXEC; the VMM's event loop wants non-blocking.
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data (arrays, integers and a union of them,
    // one of which is a pointer that the all-zero pattern leaves null).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name longer than 15 bytes",
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL)
            as libc::c_short;
    // SAFETY: TUNSETIFF reads (and may write back) one ifreq, which `req`
    // is and outlives the call; the fd is the tun device just opened.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let size: libc::c_int = VNET_HDR_LEN;
    // SAFETY: TUNSETVNETHDRSZ reads one int, which `size` is and outlives
    // the call; the fd is the tap just attached.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &size) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}
