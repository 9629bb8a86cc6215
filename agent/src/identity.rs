//! A clone's own identity: what a VM fork duplicates, and how jevm handles it.
//!
//! Every jevm VM is a copy-on-write clone of one template's memory, so at
//! resume it holds everything the template held. `Request::Identity`, sent to
//! every clone before anything else runs in it, replaces what must differ.
//! What a fork duplicates, and what happens to each:
//!
//! - **Kernel RNG state** (input pool, base crng key, per-CPU crngs, batched
//!   `get_random_u32/u64` entropy, vDSO getrandom generation): fresh host
//!   entropy is credited to the input pool and the crng is reseeded from it
//!   at once (here, first), so no two clones produce the same random bytes.
//! - **Wall clock** (`CLOCK_REALTIME` stands at the template's snapshot time):
//!   set here from the host's clock. `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME`
//!   continue from the template, which is correct: they only promise to move
//!   forward. (`Ready.guest_uptime_ms` is read from `CLOCK_BOOTTIME`.)
//! - **Hostname**: set here.
//! - **Network**: the template's interface stays down with no address; a
//!   pod's clone gives it the pod's MAC, MTU, name, addresses and routes
//!   here (`crate::network`), after the reseed, so its first packet is sent
//!   with its own random state.
//! - **`/proc/sys/kernel/random/boot_id`**: the kernel generates it lazily on
//!   its first read. The template must never read it (the agent never does,
//!   and the host must not ask for it with `Diag::ReadFile` before the
//!   snapshot), so each clone generates its own, after the reseed.
//! - **The share mount**: the template's agent mounted the virtio-fs
//!   share (over an empty directory) before the snapshot, so a clone pays
//!   no mount; its device serves the pod's directory behind the same FUSE
//!   session. A clone without a share unmounts it here.
//! - **vsock connections**: none is open at the snapshot (the agent closes
//!   its READY connection as soon as it is sent; the listener has no peer
//!   state); the host side of the device is created anew for every clone.
//! - **The agent's own userspace state**: std's `HashMap` `RandomState` keys
//!   are drawn from the RNG on first use in each thread; maps created before
//!   the snapshot keep the template's keys. The agent has none today, and
//!   such keys only guard against hash flooding, they are not secrets shown
//!   to anyone. The agent's ASLR layout and stack-protector canary are the
//!   template's too; processes started after `Identity` get their own.
//!   The template holds no TLS keys or other secrets.
//!
//! Not handled (a reseed cannot replace values the kernel already drew, so
//! they are shared by all clones of one template): the KASLR offset, hash
//! table keys the kernel seeded at boot, and any `get_random_once` secret
//! drawn before the snapshot, such as the TCP sequence-number secret (so the
//! template must do no networking before the snapshot: then each clone draws
//! those after the reseed).
//!
//! Linux's own answer to VM forks, the vmgenid device (which makes the
//! kernel reseed), is found through ACPI (or a device tree on arm64), which
//! jevm's x86 guests do not have; this module does the same from userspace.

use crate::handler::Guest;
use crate::network;
use jevm_protocol::{Identity, Response, SHARE_MOUNT, SHARE_TAG};
use std::time::Duration;

/// Fewest entropy bytes accepted: 256 bits, the kernel's own bar for a
/// seeded crng.
pub const MIN_ENTROPY: usize = 32;

/// `HOST_NAME_MAX` on Linux.
pub const MAX_HOSTNAME: usize = 64;

/// Checks everything, then applies in the order entropy → clock → hostname
/// → network → share, stopping at the first failure. The RNG comes first so
/// nothing afterwards runs with the template's random state. An invalid
/// request changes nothing.
pub fn apply(guest: &impl Guest, identity: Identity) -> Response {
    let Identity {
        entropy,
        realtime_ns,
        hostname,
        mount_share,
        network,
    } = identity;
    if entropy.len() < MIN_ENTROPY {
        return refused(format!(
            "identity: entropy of {} bytes refused: at least {MIN_ENTROPY} bytes are needed \
             to reseed the guest RNG",
            entropy.len()
        ));
    }
    if let Err(why) = check_hostname(&hostname) {
        return refused(format!("identity: hostname {hostname:?} refused: {why}"));
    }
    if let Some(network) = &network {
        if let Err(why) = network::validate(network) {
            return refused(format!("identity: network refused: {why}"));
        }
    }
    if let Err(e) = guest.reseed_rng(&entropy) {
        return error(format!("identity: reseeding the guest RNG: {e}"));
    }
    if let Err(e) = guest.set_realtime(Duration::from_nanos(realtime_ns)) {
        return error(format!(
            "identity: setting the clock to {realtime_ns} ns after the epoch: {e}"
        ));
    }
    if let Err(e) = guest.set_hostname(&hostname) {
        return error(format!(
            "identity: setting the hostname to {hostname:?}: {e}"
        ));
    }
    if let Some(network) = &network {
        if let Err(e) = guest.configure_network(network) {
            return error(format!("identity: network: {e}"));
        }
    }
    // The template's agent mounted the share already (its clone's device
    // serves the pod's directory behind that mount); a clone without a
    // share must not keep a mount whose every request fails.
    if mount_share {
        if let Err(e) = guest.mount_share(SHARE_TAG, SHARE_MOUNT) {
            return error(format!(
                "identity: mounting virtio-fs {SHARE_TAG:?} at {SHARE_MOUNT}: {e}"
            ));
        }
    } else if let Err(e) = guest.unmount_share(SHARE_MOUNT) {
        return error(format!(
            "identity: unmounting the template's virtio-fs share at {SHARE_MOUNT}: {e}"
        ));
    }
    Response::IdentityApplied
}

/// What `sethostname` would refuse, or what would make a bad name: `/` and
/// NUL cannot appear in the file names tools build from it.
fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_HOSTNAME {
        return Err(format!(
            "must be 1 to {MAX_HOSTNAME} bytes, is {}",
            name.len()
        ));
    }
    if name.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if name.contains('/') {
        return Err("contains '/'".into());
    }
    Ok(())
}

/// The identity could not be applied: the guest is left as far as it got.
fn error(message: String) -> Response {
    Response::failed(message)
}

/// The identity is invalid: nothing was changed.
fn refused(message: String) -> Response {
    Response::Error {
        message,
        kind: jevm_protocol::ErrorKind::InvalidArgument,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_must_be_one_to_sixty_four_bytes() {
        assert!(check_hostname("a").is_ok());
        assert!(check_hostname(&"a".repeat(64)).is_ok());
        assert_eq!(
            check_hostname(""),
            Err("must be 1 to 64 bytes, is 0".into())
        );
        assert_eq!(
            check_hostname(&"a".repeat(65)),
            Err("must be 1 to 64 bytes, is 65".into())
        );
        // Bytes, not characters: 33 two-byte characters are 66 bytes.
        assert!(check_hostname(&"é".repeat(33)).is_err());
    }

    #[test]
    fn hostname_must_not_contain_nul_or_slash() {
        assert_eq!(check_hostname("a\0b"), Err("contains a NUL byte".into()));
        assert_eq!(check_hostname("a/b"), Err("contains '/'".into()));
        assert!(check_hostname("clone-7.jevm").is_ok());
    }
}
