//! The pod's network: joins the interface CNI made in the pod's network
//! namespace to a tap device the VMM's virtio-net device uses.
//!
//! No bridge and no iptables: a tap is made *inside* the pod's netns and tc
//! `mirred` redirects every frame both ways (an ingress qdisc on the CNI
//! interface with a match-all u32 filter redirecting to the tap's egress,
//! and the same on the tap towards the CNI interface), as Kata's "tcfilter"
//! mode and firecracker-containerd's tc-redirect-tap do. The guest takes the
//! CNI interface's MAC, MTU, addresses and routes ([`Network`]), so frames
//! cross unchanged.
//!
//! The shim's own threads never change netns: the work runs on a short-lived
//! thread that enters the pod's netns, opens its netlink socket and
//! `/dev/net/tun` there (both stay bound to the netns they were made in),
//! and ends. Netlink is synchronous on that thread (`netlink-packet-route`
//! over a plain `netlink-sys` socket): a few requests, no runtime needed.
//! [`PodNetwork::attach`] and [`PodNetwork::detach`] block for that long;
//! call them from `spawn_blocking`.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use jevm_protocol::{NetInterface, Network};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkFlags, LinkMessage,
};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

mod rtnl;
mod settings;
mod tap;
#[cfg(test)]
mod tests;

use rtnl::{link_message, Rtnl};
use settings::{choose_interface, guest_addresses, guest_routes, Choice, LinkInfo};
use tap::open_tap;

/// The tap's name in the pod's netns. One VM per pod and one netns per pod:
/// a fixed name cannot collide with another pod's, and an operator finds it.
pub const TAP_NAME: &str = "tap0_jevm";

/// The interface CRI asks CNI for.
const CNI_DEFAULT_NAME: &str = "eth0";

/// Size of the virtio-net header the VMM passes through: the virtio 1.0
/// header (`virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: i32 = 12;

/// Why a pod's network could not be joined to its tap (or left).
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The netns file could not be opened or entered.
    #[error("pod {pod}: network namespace {}: {source}", path.display())]
    Netns {
        pod: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("pod {pod}: {} is not a network namespace", path.display())]
    NotNetns { pod: String, path: PathBuf },
    #[error("pod {pod}: no network interface in network namespace {} (only {found})", path.display())]
    NoInterface {
        pod: String,
        path: PathBuf,
        /// The interfaces that were there and do not qualify (`lo`).
        found: String,
    },
    #[error("pod {pod}: network namespace {} has no interface named {CNI_DEFAULT_NAME} and several others: {names}", path.display())]
    AmbiguousInterface {
        pod: String,
        path: PathBuf,
        names: String,
    },
    #[error("pod {pod}: interface {iface} has no {what}")]
    Incomplete {
        pod: String,
        iface: String,
        what: &'static str,
    },
    #[error("pod {pod}: interface {iface} vanished before the tap was joined")]
    Vanished { pod: String, iface: String },
    /// Some other tc user owns the interface's ingress hook (or a killed
    /// shim left its own); jevm does not share it: a stale redirect ahead
    /// of ours would swallow the frames.
    #[error(
        "pod {pod}: interface {iface} already has an ingress qdisc; not joining the tap to it"
    )]
    IngressTaken { pod: String, iface: String },
    #[error("pod {pod}: tap {tap}: {op}: {source}")]
    Tap {
        pod: String,
        tap: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("pod {pod}: {op}: {source}")]
    Netlink {
        pod: String,
        op: String,
        source: io::Error,
    },
    #[error("pod {pod}: network namespace thread: {cause}")]
    Thread { pod: String, cause: String },
}

/// A pod's network namespace with the tap jevm joined to its CNI interface.
/// Holds no fd: the tap fd goes to the VMM, and the tap (with its qdisc)
/// vanishes with its last fd. A killed shim leaves only the interface's
/// ingress qdisc, redirecting to nothing, which goes with the netns when CRI
/// removes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pod: String,
    netns: PathBuf,
    iface: Link,
    tap: Link,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    name: String,
    index: u32,
}

impl PodNetwork {
    /// In the netns at `netns`: finds the CNI interface (`eth0`, else the
    /// only Ethernet interface other than `lo`), reads its settings, makes
    /// the tap [`TAP_NAME`] with the interface's MTU, brings it up and
    /// installs the redirects both ways. Returns the tap's fd for the VMM
    /// (non-blocking, close-on-exec, vnet header of [`VNET_HDR_LEN`] bytes,
    /// offloads left to the VMM) and the settings for the guest. On failure
    /// nothing is left behind. Blocks: call from a blocking context.
    pub fn attach(netns: &Path, pod: &str) -> Result<(PodNetwork, File, Network), NetworkError> {
        let ns = File::open(netns).map_err(|source| NetworkError::Netns {
            pod: pod.to_string(),
            path: netns.to_path_buf(),
            source,
        })?;
        in_netns(pod, netns, &ns, || attach_here(pod, netns))
    }

    /// Removes the ingress qdiscs (and so their filters) and the tap, if
    /// the netns is still there; a netns already gone is not an error (CRI
    /// may remove it first). Idempotent. Blocks: call from a blocking context.
    pub fn detach(&self) -> Result<(), NetworkError> {
        let ns = match File::open(&self.netns) {
            Ok(ns) => ns,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                log::info!(
                    "pod {}: network namespace {} is gone; nothing to detach",
                    self.pod,
                    self.netns.display()
                );
                return Ok(());
            }
            Err(source) => {
                return Err(NetworkError::Netns {
                    pod: self.pod.clone(),
                    path: self.netns.clone(),
                    source,
                })
            }
        };
        match in_netns(&self.pod, &self.netns, &ns, || self.detach_here()) {
            // CRI unmounts the netns before it removes the file: an empty
            // file at the path is a netns on its way out.
            Err(NetworkError::NotNetns { .. }) => {
                log::info!(
                    "pod {}: {} is no longer a network namespace; nothing to detach",
                    self.pod,
                    self.netns.display()
                );
                Ok(())
            }
            other => other,
        }
    }

    #[cfg(test)]
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    #[cfg(test)]
    pub fn tap_name(&self) -> &str {
        &self.tap.name
    }

    #[cfg(test)]
    pub fn tap_index(&self) -> u32 {
        self.tap.index
    }

    #[cfg(test)]
    pub fn interface_name(&self) -> &str {
        &self.iface.name
    }

    /// Runs inside the netns.
    fn detach_here(&self) -> Result<(), NetworkError> {
        let pod = &self.pod;
        let mut nl = Rtnl::open().map_err(netlink_error(pod, "opening a netlink socket"))?;
        // The filters go with their qdisc; without the interface's, no
        // frame reaches the tap any more.
        nl.delete_ingress_qdisc(self.iface.index)
            .map_err(netlink_error(
                pod,
                format!("removing the ingress qdisc of {}", self.iface.name),
            ))?;
        match nl.link_name(self.tap.index) {
            // Only our tap: once it is gone, its index may name another
            // device.
            Ok(Some(name)) if name == self.tap.name => {
                match nl.request(
                    RouteNetlinkMessage::DelLink(link_message(self.tap.index)),
                    0,
                ) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                    Err(e) => {
                        return Err(netlink_error(
                            pod,
                            format!("removing tap {}", self.tap.name),
                        )(e))
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                return Err(netlink_error(
                    pod,
                    format!("looking up tap {}", self.tap.name),
                )(e))
            }
        }
        Ok(())
    }
}

/// Runs `work` on a new thread that first enters the network namespace
/// `ns` (opened from `path`). The thread ends with `work`, so its netns
/// goes with it; the caller's thread never changes netns.
fn in_netns<T: Send>(
    pod: &str,
    path: &Path,
    ns: &File,
    work: impl FnOnce() -> Result<T, NetworkError> + Send,
) -> Result<T, NetworkError> {
    let thread_error = |cause: String| NetworkError::Thread {
        pod: pod.to_string(),
        cause,
    };
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("jevm-netns".into())
            .spawn_scoped(scope, || {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|errno| {
                    match errno {
                        nix::errno::Errno::EINVAL => NetworkError::NotNetns {
                            pod: pod.to_string(),
                            path: path.to_path_buf(),
                        },
                        errno => NetworkError::Netns {
                            pod: pod.to_string(),
                            path: path.to_path_buf(),
                            source: errno.into(),
                        },
                    }
                })?;
                work()
            })
            .map_err(|e| thread_error(format!("cannot start: {e}")))?;
        thread
            .join()
            .map_err(|_| thread_error("panicked".to_string()))?
    })
}

fn netlink_error(pod: &str, op: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
    let pod = pod.to_string();
    let op = op.into();
    move |source| NetworkError::Netlink { pod, op, source }
}

/// Runs inside the pod's netns.
fn attach_here(pod: &str, netns: &Path) -> Result<(PodNetwork, File, Network), NetworkError> {
    let mut nl = Rtnl::open().map_err(netlink_error(pod, "opening a netlink socket"))?;
    let links: Vec<LinkInfo> = nl
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .map_err(netlink_error(
            pod,
            format!("listing the interfaces of {}", netns.display()),
        ))?
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(LinkInfo::from_message(l)),
            _ => None,
        })
        .collect();
    let chosen = choose_interface(&links).map_err(|why| match why {
        Choice::None(found) => NetworkError::NoInterface {
            pod: pod.to_string(),
            path: netns.to_path_buf(),
            found: if found.is_empty() {
                "nothing".to_string()
            } else {
                found.join(", ")
            },
        },
        Choice::Ambiguous(names) => NetworkError::AmbiguousInterface {
            pod: pod.to_string(),
            path: netns.to_path_buf(),
            names: names.join(", "),
        },
    })?;
    let incomplete = |what| NetworkError::Incomplete {
        pod: pod.to_string(),
        iface: chosen.name.clone(),
        what,
    };
    let mac = chosen.mac.ok_or_else(|| incomplete("MAC address"))?;
    let mtu = chosen.mtu.ok_or_else(|| incomplete("MTU"))?;
    let iface = Link {
        name: chosen.name.clone(),
        index: chosen.index,
    };

    let addresses: Vec<AddressMessage> = nl
        .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
        .map_err(netlink_error(
            pod,
            format!("listing the addresses of {}", iface.name),
        ))?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => Some(a),
            _ => None,
        })
        .collect();
    let mut routes = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = RouteMessage::default();
        request.header.address_family = family;
        let listed = nl
            .dump(RouteNetlinkMessage::GetRoute(request))
            .map_err(netlink_error(
                pod,
                format!("listing the routes of {}", iface.name),
            ))?;
        routes.extend(listed.into_iter().filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => Some(r),
            _ => None,
        }));
    }
    let guest = Network {
        interface: NetInterface {
            name: iface.name.clone(),
            mac,
            mtu,
            addresses: guest_addresses(&addresses, iface.index),
        },
        routes: guest_routes(&routes, iface.index),
    };

    let tap_error = |op: &'static str| {
        move |source| NetworkError::Tap {
            pod: pod.to_string(),
            tap: TAP_NAME.to_string(),
            op,
            source,
        }
    };
    // Dropped on any failure below: a non-persistent tap goes with its
    // last fd, and its ingress qdisc with it.
    let tap_file = open_tap(TAP_NAME).map_err(tap_error("creating"))?;
    let tap_index = nl
        .link_index(TAP_NAME)
        .map_err(tap_error("looking up"))?
        .ok_or_else(|| tap_error("looking up")(io::Error::from_raw_os_error(libc::ENODEV)))?;
    let tap = Link {
        name: TAP_NAME.to_string(),
        index: tap_index,
    };

    // On failure the tap goes with `tap_file`; redirect_iface takes back
    // its own qdisc.
    prepare_tap(pod, &mut nl, &iface, &tap, mtu)?;
    redirect_iface(pod, &mut nl, &iface, &tap)?;
    log::info!(
        "pod {pod}: tap {} (index {}) joined to {} (index {}) in {}",
        tap.name,
        tap.index,
        iface.name,
        iface.index,
        netns.display()
    );
    let network = PodNetwork {
        pod: pod.to_string(),
        netns: netns.to_path_buf(),
        iface,
        tap,
    };
    Ok((network, tap_file, guest))
}

/// Brings the tap up at the interface's MTU and redirects what the guest
/// sends to the interface. Done before [`redirect_iface`], so that frames
/// reach the tap only once the way back exists.
fn prepare_tap(
    pod: &str,
    nl: &mut Rtnl,
    iface: &Link,
    tap: &Link,
    mtu: u32,
) -> Result<(), NetworkError> {
    let tap_error = |op: &'static str| {
        move |source| NetworkError::Tap {
            pod: pod.to_string(),
            tap: tap.name.clone(),
            op,
            source,
        }
    };
    // No IPv6 link-local address on the tap: its router solicitations and
    // DAD probes would reach the guest as frames from nowhere. A kernel
    // without IPv6 refuses the attribute, and then there is nothing to stop.
    let mut no_ipv6 = link_message(tap.index);
    no_ipv6
        .attributes
        .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
            vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
        )]));
    if let Err(e) = nl.request(RouteNetlinkMessage::SetLink(no_ipv6), 0) {
        log::debug!(
            "pod {pod}: tap {}: no IPv6 address generation: {e}",
            tap.name
        );
    }
    let mut up = link_message(tap.index);
    up.header.flags = LinkFlags::Up;
    up.header.change_mask = LinkFlags::Up;
    up.attributes.push(LinkAttribute::Mtu(mtu));
    nl.request(RouteNetlinkMessage::SetLink(up), 0)
        .map_err(tap_error("setting the MTU and bringing it up"))?;
    nl.add_ingress_qdisc(tap.index)
        .map_err(tap_error("adding the ingress qdisc"))?;
    if let Err(e) = nl.add_redirect(tap.index, iface.index) {
        return Err(match e.raw_os_error() {
            Some(libc::ENODEV) => {
                missing_device(pod, nl, iface, tap, "adding the redirect filter", e)
            }
            _ => tap_error("adding the redirect filter")(e),
        });
    }
    Ok(())
}

/// Adds the interface's ingress qdisc and its redirect to the tap; takes
/// the qdisc back if the redirect cannot be added.
fn redirect_iface(pod: &str, nl: &mut Rtnl, iface: &Link, tap: &Link) -> Result<(), NetworkError> {
    let error = |nl: &mut Rtnl, op: &'static str, e: io::Error| match e.raw_os_error() {
        Some(libc::ENODEV) => missing_device(pod, nl, iface, tap, op, e),
        Some(libc::EEXIST) => NetworkError::IngressTaken {
            pod: pod.to_string(),
            iface: iface.name.clone(),
        },
        _ => NetworkError::Netlink {
            pod: pod.to_string(),
            op: format!("{op} of {}", iface.name),
            source: e,
        },
    };
    if let Err(e) = nl.add_ingress_qdisc(iface.index) {
        return Err(error(nl, "adding the ingress qdisc", e));
    }
    if let Err(e) = nl.add_redirect(iface.index, tap.index) {
        let err = error(nl, "adding the redirect filter", e);
        if let Err(undo) = nl.delete_ingress_qdisc(iface.index) {
            log::warn!(
                "pod {pod}: removing the ingress qdisc of {} after a failed attach: {undo}",
                iface.name
            );
        }
        return Err(err);
    }
    Ok(())
}

/// ENODEV while joining names no device: the interface if it is gone,
/// else the tap.
fn missing_device(
    pod: &str,
    nl: &mut Rtnl,
    iface: &Link,
    tap: &Link,
    op: &'static str,
    source: io::Error,
) -> NetworkError {
    match nl.link_name(iface.index) {
        Ok(Some(name)) if name == iface.name => NetworkError::Tap {
            pod: pod.to_string(),
            tap: tap.name.clone(),
            op,
            source,
        },
        _ => vanished(pod, iface),
    }
}

fn vanished(pod: &str, iface: &Link) -> NetworkError {
    NetworkError::Vanished {
        pod: pod.to_string(),
        iface: iface.name.clone(),
    }
}
