//! Request → response, with every guest side effect behind [`Guest`] so the
//! mapping (caps, error wording) is testable on any host.

use crate::identity;
use crate::network::NetworkError;
use jevm_protocol::{Diag, Network, Request, Response, PROTOCOL_VERSION, SHARE_MOUNT, SHARE_TAG};
use std::io;
use std::time::Duration;

/// Largest `ReadFile` answer; bigger requests are served short, like a read
/// at end of file, and the host reads on from where the answer ended.
pub const MAX_READ: u32 = 1 << 20;

/// Largest `DialHost` answer; the rest of what the host sends is dropped.
pub const MAX_DIAL_ANSWER: usize = 64 << 10;

/// The side effects requests have on the guest.
pub trait Guest {
    /// Up to `len` bytes at `offset`; fewer only at end of file.
    fn read_file(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// All of `data` at `offset`, flushed to the device before returning.
    fn write_file(&self, path: &str, offset: u64, data: &[u8]) -> io::Result<()>;
    /// `data` stored at the start of an existing file through a shared
    /// writable mapping, left mapped and dirty (no msync, no fsync).
    fn write_mapped(&self, path: &str, data: &[u8]) -> io::Result<()>;
    /// Sends `data` to the host's vsock `port` and returns its answer, at
    /// most `limit` bytes.
    fn dial_host(&self, port: u32, data: &[u8], limit: usize) -> io::Result<Vec<u8>>;
    fn online_cpus(&self) -> io::Result<u64>;
    /// Credits `entropy` to the kernel's input pool and reseeds the crng
    /// from it at once. Errors name the operation that failed.
    fn reseed_rng(&self, entropy: &[u8]) -> io::Result<()>;
    /// Sets `CLOCK_REALTIME` to `since_epoch` after the Unix epoch.
    fn set_realtime(&self, since_epoch: Duration) -> io::Result<()>;
    /// Sets the hostname; `name` was already checked (see `identity`).
    fn set_hostname(&self, name: &str) -> io::Result<()>;
    /// Gives the guest's network interface the pod's settings and brings
    /// it up; `network` was already validated (see `network::validate`).
    fn configure_network(&self, network: &Network) -> Result<(), NetworkError>;
    /// Mounts the virtio-fs share `tag` at `target` (created if missing)
    /// and returns once its FUSE session is open; nothing to do if this
    /// agent (or its template's) mounted it already.
    fn mount_share(&self, tag: &str, target: &str) -> io::Result<()>;
    /// Unmounts the share at `target` if this agent (or its template's)
    /// mounted it.
    fn unmount_share(&self, target: &str) -> io::Result<()>;
}

pub fn agent_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// Answers one request. `Shutdown` is only answered here: the caller powers
/// off after the `ShuttingDown` reply has reached the host, since nothing
/// can be sent once the guest is gone.
pub fn handle(guest: &impl Guest, req: Request) -> Response {
    match req {
        Request::Version => Response::Version {
            agent_version: agent_version(),
            protocol_version: PROTOCOL_VERSION,
        },
        Request::Ping { nonce } => Response::Pong { nonce },
        Request::Shutdown => Response::ShuttingDown,
        Request::Diag(diag) => handle_diag(guest, diag),
        Request::Identity(id) => identity::apply(guest, id),
        Request::MountShare => match guest.mount_share(SHARE_TAG, SHARE_MOUNT) {
            Ok(()) => Response::Done,
            Err(e) => error(format!(
                "mounting virtio-fs {SHARE_TAG:?} at {SHARE_MOUNT}: {e}"
            )),
        },
        // Container requests are routed to `crate::container` by the server
        // before they reach here (some take the connection over).
        other => error(format!(
            "request {} is not served on this path",
            serde_name(&other)
        )),
    }
}

fn handle_diag(guest: &impl Guest, diag: Diag) -> Response {
    match diag {
        Diag::ReadFile { path, offset, len } => {
            let len = len.min(MAX_READ) as usize;
            match guest.read_file(&path, offset, len) {
                Ok(bytes) => Response::Bytes(bytes),
                Err(e) => error(format!("read {path}: {e}")),
            }
        }
        Diag::WriteFile { path, offset, data } => match guest.write_file(&path, offset, &data) {
            Ok(()) => Response::Written {
                len: data.len() as u64,
            },
            Err(e) => error(format!("write {path}: {e}")),
        },
        Diag::WriteMapped { path, data } => match guest.write_mapped(&path, &data) {
            Ok(()) => Response::Written {
                len: data.len() as u64,
            },
            Err(e) => error(format!("write {path} through a mapping: {e}")),
        },
        Diag::DialHost { port, data } => match guest.dial_host(port, &data, MAX_DIAL_ANSWER) {
            Ok(bytes) => Response::Bytes(bytes),
            Err(e) => error(format!("dial host vsock port {port}: {e}")),
        },
        Diag::OnlineCpus => match guest.online_cpus() {
            Ok(n) => Response::Count(n),
            Err(e) => error(format!("count online cpus: {e}")),
        },
    }
}

fn serde_name(req: &Request) -> String {
    serde_json::to_value(req)
        .ok()
        .and_then(|v| match v {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Object(m) => m.keys().next().cloned(),
            _ => None,
        })
        .unwrap_or_else(|| "?".into())
}

fn error(message: String) -> Response {
    Response::failed(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::System;
    use jevm_protocol::{ErrorKind, Identity};
    use std::cell::{Cell, RefCell};

    /// Records what the handler asked for and fails or answers as told.
    #[derive(Default)]
    struct FakeGuest {
        read_len: Cell<Option<usize>>,
        fail_with: Option<i32>,
        /// Identity side effects, in the order they were asked for.
        identity_calls: RefCell<Vec<String>>,
        /// The identity side effect (a `Guest` method name) that fails, and
        /// its errno.
        fail_identity: Option<(&'static str, i32)>,
    }

    impl FakeGuest {
        fn failing(errno: i32) -> Self {
            Self {
                fail_with: Some(errno),
                ..Self::default()
            }
        }

        fn failing_identity_at(step: &'static str, errno: i32) -> Self {
            Self {
                fail_identity: Some((step, errno)),
                ..Self::default()
            }
        }

        fn identity_step(&self, step: &'static str, detail: String) -> io::Result<()> {
            self.identity_calls
                .borrow_mut()
                .push(format!("{step} {detail}"));
            match self.fail_identity {
                Some((failing, errno)) if failing == step => {
                    Err(io::Error::from_raw_os_error(errno))
                }
                _ => Ok(()),
            }
        }

        fn identity_calls(&self) -> Vec<String> {
            self.identity_calls.borrow().clone()
        }

        fn result<T>(&self, ok: T) -> io::Result<T> {
            match self.fail_with {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => Ok(ok),
            }
        }
    }

    impl Guest for FakeGuest {
        fn read_file(&self, _: &str, _: u64, len: usize) -> io::Result<Vec<u8>> {
            self.read_len.set(Some(len));
            self.result(Vec::new())
        }
        fn write_file(&self, _: &str, _: u64, _: &[u8]) -> io::Result<()> {
            self.result(())
        }
        fn write_mapped(&self, _: &str, _: &[u8]) -> io::Result<()> {
            self.result(())
        }
        fn dial_host(&self, _: u32, data: &[u8], _: usize) -> io::Result<Vec<u8>> {
            self.result(data.to_vec())
        }
        fn online_cpus(&self) -> io::Result<u64> {
            self.result(3)
        }
        fn reseed_rng(&self, entropy: &[u8]) -> io::Result<()> {
            self.identity_step("reseed_rng", format!("{} bytes", entropy.len()))
        }
        fn set_realtime(&self, since_epoch: Duration) -> io::Result<()> {
            self.identity_step("set_realtime", format!("{since_epoch:?}"))
        }
        fn set_hostname(&self, name: &str) -> io::Result<()> {
            self.identity_step("set_hostname", name.to_string())
        }
        fn configure_network(&self, network: &Network) -> Result<(), NetworkError> {
            let iface = &network.interface;
            let detail = format!(
                "{} mtu {} {} addresses {} routes",
                iface.name,
                iface.mtu,
                iface.addresses.len(),
                network.routes.len()
            );
            self.identity_step("configure_network", detail)
                .map_err(|source| NetworkError::Step {
                    step: "adding route 0.0.0.0/0 via 10.88.0.1 dev eth0".into(),
                    source,
                })
        }
        fn mount_share(&self, tag: &str, target: &str) -> io::Result<()> {
            self.identity_step("mount_share", format!("{tag} {target}"))
        }
        fn unmount_share(&self, target: &str) -> io::Result<()> {
            self.identity_step("unmount_share", target.to_string())
        }
    }

    fn identity(entropy_len: usize, hostname: &str) -> Request {
        Request::Identity(Identity {
            entropy: vec![0xa5; entropy_len],
            realtime_ns: 1_700_000_000_500_000_000,
            hostname: hostname.into(),
            mount_share: false,
            network: None,
        })
    }

    /// A pod's identity: a network and the share.
    fn pod_identity(mtu: u32) -> Request {
        use jevm_protocol::{IpNet, NetInterface, Route};
        let net = |addr: &str, prefix_len| IpNet {
            addr: addr.parse().unwrap(),
            prefix_len,
        };
        let Request::Identity(mut id) = identity(32, "clone-1") else {
            unreachable!()
        };
        id.mount_share = true;
        id.network = Some(Network {
            interface: NetInterface {
                name: "eth0".into(),
                mac: [0x0a, 0x58, 0x0a, 0x58, 0x00, 0x05],
                mtu,
                addresses: vec![net("10.88.0.5", 16)],
            },
            routes: vec![Route {
                destination: net("0.0.0.0", 0),
                gateway: Some("10.88.0.1".parse().unwrap()),
                source: None,
                metric: 0,
            }],
        });
        Request::Identity(id)
    }

    /// A clone without a share drops the template's share mount last.
    const ALL_IDENTITY_STEPS: [&str; 4] = [
        "reseed_rng 32 bytes",
        "set_realtime 1700000000.5s",
        "set_hostname clone-1",
        "unmount_share /run/jevm/shared",
    ];

    fn read(path: &str, offset: u64, len: u32) -> Request {
        Request::Diag(Diag::ReadFile {
            path: path.into(),
            offset,
            len,
        })
    }

    fn write(path: &str, offset: u64, data: &[u8]) -> Request {
        Request::Diag(Diag::WriteFile {
            path: path.into(),
            offset,
            data: data.to_vec(),
        })
    }

    fn real_guest_creating_under(dir: &std::path::Path) -> System {
        System::new(false).with_creatable_root(dir)
    }

    #[test]
    fn version_reports_crate_and_protocol_version() {
        assert_eq!(
            handle(&FakeGuest::default(), Request::Version),
            Response::Version {
                agent_version: env!("CARGO_PKG_VERSION").into(),
                protocol_version: PROTOCOL_VERSION,
            }
        );
    }

    #[test]
    fn ping_echoes_the_nonce() {
        let nonce = 0xdead_beef_0123_4567;
        assert_eq!(
            handle(&FakeGuest::default(), Request::Ping { nonce }),
            Response::Pong { nonce }
        );
    }

    #[test]
    fn shutdown_is_acknowledged_without_side_effects_in_the_handler() {
        assert_eq!(
            handle(&FakeGuest::default(), Request::Shutdown),
            Response::ShuttingDown
        );
    }

    #[test]
    fn read_length_is_capped_at_one_mebibyte() {
        let guest = FakeGuest::default();
        handle(&guest, read("/dev/vda", 0, u32::MAX));
        assert_eq!(guest.read_len.get(), Some(1 << 20));
        handle(&guest, read("/dev/vda", 0, 4096));
        assert_eq!(guest.read_len.get(), Some(4096));
    }

    #[test]
    fn read_file_returns_bytes_at_offset_and_stops_at_end_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let path = path.to_str().unwrap();
        let guest = System::new(false);
        assert_eq!(
            handle(&guest, read(path, 3, 4)),
            Response::Bytes(b"3456".to_vec())
        );
        assert_eq!(
            handle(&guest, read(path, 8, 100)),
            Response::Bytes(b"89".to_vec())
        );
        assert_eq!(handle(&guest, read(path, 50, 4)), Response::Bytes(vec![]));
    }

    #[test]
    fn write_file_overwrites_in_place_and_reports_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let guest = System::new(false);
        assert_eq!(
            handle(&guest, write(path.to_str().unwrap(), 2, b"ab")),
            Response::Written { len: 2 }
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"01ab456789");
    }

    #[test]
    fn write_file_creates_missing_files_only_under_the_creatable_root() {
        let allowed = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let guest = real_guest_creating_under(allowed.path());

        let inside = allowed.path().join("new");
        assert_eq!(
            handle(&guest, write(inside.to_str().unwrap(), 1, b"x")),
            Response::Written { len: 1 }
        );
        assert_eq!(std::fs::read(&inside).unwrap(), b"\0x");

        let outside = elsewhere.path().join("new");
        let outside = outside.to_str().unwrap();
        assert_eq!(
            handle(&guest, write(outside, 0, b"x")),
            Response::Error {
                message: format!("write {outside}: No such file or directory (os error 2)"),
                kind: ErrorKind::Failed,
            }
        );
        assert!(!std::path::Path::new(outside).exists());
    }

    #[test]
    fn write_file_does_not_create_through_dot_dot_out_of_the_creatable_root() {
        let allowed = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let guest = real_guest_creating_under(allowed.path());
        let sneaky = format!(
            "{}/../{}/new",
            allowed.path().display(),
            elsewhere.path().file_name().unwrap().to_str().unwrap()
        );
        assert!(matches!(
            handle(&guest, write(&sneaky, 0, b"x")),
            Response::Error { .. }
        ));
        assert!(!elsewhere.path().join("new").exists());
    }

    #[test]
    fn read_error_names_the_path_and_the_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let missing = missing.to_str().unwrap();
        assert_eq!(
            handle(&System::new(false), read(missing, 0, 1)),
            Response::Error {
                message: format!("read {missing}: No such file or directory (os error 2)"),
                kind: ErrorKind::Failed,
            }
        );
    }

    #[test]
    fn write_error_names_the_path_and_the_os_error() {
        assert_eq!(
            handle(&FakeGuest::failing(libc::EROFS), write("/dev/vdb", 0, b"x")),
            Response::Error {
                message: "write /dev/vdb: Read-only file system (os error 30)".into(),
                kind: ErrorKind::Failed,
            }
        );
    }

    #[test]
    fn dial_error_names_the_port_and_the_os_error() {
        let req = Request::Diag(Diag::DialHost {
            port: 5000,
            data: b"hi".to_vec(),
        });
        assert_eq!(
            handle(&FakeGuest::failing(libc::ECONNRESET), req.clone()),
            Response::Error {
                message: "dial host vsock port 5000: Connection reset by peer (os error 104)"
                    .into(),
                kind: ErrorKind::Failed,
            }
        );
        assert_eq!(
            handle(&FakeGuest::default(), req),
            Response::Bytes(b"hi".to_vec())
        );
    }

    #[test]
    fn online_cpus_is_a_count() {
        assert_eq!(
            handle(&FakeGuest::default(), Request::Diag(Diag::OnlineCpus)),
            Response::Count(3)
        );
        assert!(matches!(
            handle(&System::new(false), Request::Diag(Diag::OnlineCpus)),
            Response::Count(n) if n >= 1
        ));
    }

    #[test]
    fn identity_applies_entropy_then_clock_then_hostname_and_reports_success() {
        let guest = FakeGuest::default();
        assert_eq!(
            handle(&guest, identity(32, "clone-1")),
            Response::IdentityApplied
        );
        assert_eq!(guest.identity_calls(), ALL_IDENTITY_STEPS);
    }

    #[test]
    fn identity_with_less_than_32_bytes_of_entropy_is_refused_with_no_side_effect() {
        let guest = FakeGuest::default();
        assert_eq!(
            handle(&guest, identity(31, "clone-1")),
            Response::Error {
                message: "identity: entropy of 31 bytes refused: at least 32 bytes are \
                          needed to reseed the guest RNG"
                    .into(),
                kind: ErrorKind::InvalidArgument,
            }
        );
        assert!(matches!(
            handle(&guest, identity(0, "clone-1")),
            Response::Error { message, kind: ErrorKind::InvalidArgument }
                if message.contains("entropy of 0 bytes refused")
        ));
        assert!(guest.identity_calls().is_empty());
    }

    #[test]
    fn identity_with_a_bad_hostname_is_refused_before_any_side_effect() {
        let cases = [
            ("", "must be 1 to 64 bytes, is 0"),
            (&"h".repeat(65), "must be 1 to 64 bytes, is 65"),
            ("a\0b", "contains a NUL byte"),
            ("a/b", "contains '/'"),
        ];
        for (hostname, why) in cases {
            let guest = FakeGuest::default();
            assert_eq!(
                handle(&guest, identity(32, hostname)),
                Response::Error {
                    message: format!("identity: hostname {hostname:?} refused: {why}"),
                    kind: ErrorKind::InvalidArgument,
                }
            );
            assert!(guest.identity_calls().is_empty(), "{hostname:?}");
        }
        let longest = "h".repeat(64);
        assert_eq!(
            handle(&FakeGuest::default(), identity(32, &longest)),
            Response::IdentityApplied
        );
    }

    #[test]
    fn identity_stops_at_the_first_failing_step_and_names_it_and_the_os_error() {
        let cases = [
            (
                "reseed_rng",
                libc::EPERM,
                "identity: reseeding the guest RNG: Operation not permitted (os error 1)",
                1,
            ),
            (
                "set_realtime",
                libc::EINVAL,
                "identity: setting the clock to 1700000000500000000 ns after the epoch: \
                 Invalid argument (os error 22)",
                2,
            ),
            (
                "set_hostname",
                libc::EPERM,
                "identity: setting the hostname to \"clone-1\": \
                 Operation not permitted (os error 1)",
                3,
            ),
            (
                "unmount_share",
                libc::EBUSY,
                "identity: unmounting the template's virtio-fs share at /run/jevm/shared: \
                 Device or resource busy (os error 16)",
                4,
            ),
        ];
        for (step, errno, message, attempted) in cases {
            let guest = FakeGuest::failing_identity_at(step, errno);
            assert_eq!(
                handle(&guest, identity(32, "clone-1")),
                Response::Error {
                    message: message.into(),
                    kind: ErrorKind::Failed,
                },
                "{step}"
            );
            assert_eq!(
                guest.identity_calls(),
                ALL_IDENTITY_STEPS[..attempted],
                "{step}"
            );
        }
    }

    #[test]
    fn mount_share_mounts_the_share_and_names_it_when_that_fails() {
        let guest = FakeGuest::default();
        assert_eq!(handle(&guest, Request::MountShare), Response::Done);
        assert_eq!(
            guest.identity_calls(),
            ["mount_share jevm-share /run/jevm/shared"]
        );
        let guest = FakeGuest::failing_identity_at("mount_share", libc::ENODEV);
        assert_eq!(
            handle(&guest, Request::MountShare),
            Response::Error {
                message: "mounting virtio-fs \"jevm-share\" at /run/jevm/shared: \
                          No such device (os error 19)"
                    .into(),
                kind: ErrorKind::Failed,
            }
        );
    }

    #[test]
    fn pod_identity_configures_the_network_after_the_hostname_and_before_the_share() {
        let guest = FakeGuest::default();
        assert_eq!(
            handle(&guest, pod_identity(1500)),
            Response::IdentityApplied
        );
        assert_eq!(
            guest.identity_calls(),
            [
                "reseed_rng 32 bytes".to_string(),
                "set_realtime 1700000000.5s".into(),
                "set_hostname clone-1".into(),
                "configure_network eth0 mtu 1500 1 addresses 1 routes".into(),
                format!(
                    "mount_share {} {}",
                    jevm_protocol::SHARE_TAG,
                    jevm_protocol::SHARE_MOUNT
                ),
            ]
        );
    }

    #[test]
    fn a_failing_network_stops_the_identity_before_the_share_and_names_the_step() {
        let guest = FakeGuest::failing_identity_at("configure_network", libc::ENETUNREACH);
        assert_eq!(
            handle(&guest, pod_identity(1500)),
            Response::Error {
                message: "identity: network: adding route 0.0.0.0/0 via 10.88.0.1 dev eth0: \
                          Network is unreachable (os error 101)"
                    .into(),
                kind: ErrorKind::Failed,
            }
        );
        assert_eq!(guest.identity_calls().len(), 4);
        assert!(guest.identity_calls()[3].starts_with("configure_network"));
    }

    #[test]
    fn an_invalid_network_is_refused_before_any_side_effect() {
        let guest = FakeGuest::default();
        assert_eq!(
            handle(&guest, pod_identity(67)),
            Response::Error {
                message: "identity: network refused: MTU 67 is outside 68..=65535".into(),
                kind: ErrorKind::InvalidArgument,
            }
        );
        assert!(guest.identity_calls().is_empty());
    }
}
