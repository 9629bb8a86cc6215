//! The messages the jevm host side and the in-guest agent exchange over vsock.
//!
//! Both crates use these types, so the two ends cannot drift apart. The wire
//! format is a 4-byte big-endian length followed by that many bytes of JSON.
//! Why not ttrpc/protobuf like containerd: the agent is PID 1 of a tiny
//! initramfs and every byte of it is in every template; serde_json keeps it
//! small, needs no code generation, and the protocol is private to jevm (the
//! shim, not the agent, speaks ttrpc to containerd). `PROTOCOL_VERSION` is
//! checked on the first exchange so a host never drives an agent it does not
//! understand.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Bumped on every incompatible change to [`Request`] or [`Response`].
pub const PROTOCOL_VERSION: u32 = 1;

/// vsock port the agent listens on for host requests.
pub const AGENT_PORT: u32 = 1024;

/// vsock port on the host (CID 2) the agent dials once, when it is ready to
/// serve requests. With the hybrid-vsock convention this is the Unix socket
/// `<vsock socket>_1023` on the host.
pub const READY_PORT: u32 = 1023;

/// Largest frame either side accepts; a bigger length prefix is an error,
/// not an allocation.
pub const MAX_FRAME: u32 = 16 << 20;

/// Sent by the agent on the READY connection, then the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub agent_version: String,
    pub protocol_version: u32,
    /// Guest `/proc/uptime` at the moment the agent was ready, in milliseconds.
    pub guest_uptime_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Agent and protocol version.
    Version,
    /// Liveness check; the agent echoes the nonce.
    Ping { nonce: u64 },
    /// Flush file systems and power the guest off (the VM exits).
    Shutdown,
    /// Diagnostics used by the test suite and `jevm` itself.
    Diag(Diag),
    /// Sent first to every clone, before anything else runs in it: what a
    /// forked VM must not share with its siblings and its template.
    Identity(Identity),
}

/// A clone's own identity. Every clone starts from the same memory image, so
/// its RNG state, clock and name are the template's until this arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Fresh host entropy (at least 32 bytes) mixed into the guest RNG, which
    /// is then reseeded so no two clones produce the same random bytes.
    pub entropy: Vec<u8>,
    /// Host wall-clock time, nanoseconds since the Unix epoch.
    pub realtime_ns: u64,
    pub hostname: String,
}

/// Small, explicit guest operations. They exist so the host can check what a
/// guest sees (a block device's bytes, a vsock path) without a shell in the
/// initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Diag {
    /// Read `len` bytes at `offset` of a guest file or device.
    ReadFile { path: String, offset: u64, len: u32 },
    /// Write bytes at `offset` of a guest file or device, then fsync it.
    WriteFile {
        path: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// Connect to the host (CID 2) on `port`, send `data`, and return what
    /// the host answers before it closes the connection (at most 64 KiB).
    DialHost { port: u32, data: Vec<u8> },
    /// Number of online CPUs the guest kernel sees.
    OnlineCpus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Version {
        agent_version: String,
        protocol_version: u32,
    },
    Pong {
        nonce: u64,
    },
    ShuttingDown,
    Bytes(Vec<u8>),
    Written {
        len: u64,
    },
    Count(u64),
    /// The identity was applied.
    IdentityApplied,
    /// The request failed in the guest; `message` names the object and cause.
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("I/O error on the agent channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Writes one length-prefixed JSON frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(u32::MAX))?;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one length-prefixed JSON frame.
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_a_request() {
        let mut buf = Vec::new();
        let req = Request::Diag(Diag::WriteFile {
            path: "/dev/vda".into(),
            offset: 512,
            data: vec![1, 2, 3],
        });
        write_frame(&mut buf, &req).unwrap();
        let back: Request = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_allocating() {
        let mut buf = (MAX_FRAME + 1).to_be_bytes().to_vec();
        buf.extend_from_slice(b"{}");
        let err = read_frame::<_, Request>(&mut buf.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(n) if n == MAX_FRAME + 1));
    }

    #[test]
    fn truncated_frame_is_an_io_error() {
        let mut buf = 10u32.to_be_bytes().to_vec();
        buf.extend_from_slice(b"{\"Ping");
        assert!(matches!(
            read_frame::<_, Request>(&mut buf.as_slice()),
            Err(FrameError::Io(_))
        ));
    }
}
