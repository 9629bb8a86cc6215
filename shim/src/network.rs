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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use jevm_protocol::{IpNet, NetInterface, Network, Route};
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkFlags, LinkLayerType, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The tap's name in the pod's netns. One VM per pod and one netns per pod:
/// a fixed name cannot collide with another pod's, and an operator finds it.
pub const TAP_NAME: &str = "tap0_jevm";

/// The interface CRI asks CNI for.
const CNI_DEFAULT_NAME: &str = "eth0";

/// Size of the virtio-net header the VMM passes through: the virtio 1.0
/// header (`virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: i32 = 12;

/// tc handle `ffff:` of an ingress qdisc (and the parent of its filters).
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

/// Our filter is the only one on each ingress qdisc; its priority only has
/// to be fixed so that the two are alike in `tc filter show`.
const FILTER_PRIORITY: u16 = 1;

/// How often a dump the kernel marked interrupted (the table changed while
/// it was read) is asked again before giving up.
const DUMP_TRIES: usize = 5;

const TUNTAP: u32 = b'T' as u32;
vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
vmm_sys_util::ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);

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

/// An interface as the link dump lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkInfo {
    name: String,
    index: u32,
    ethernet: bool,
    loopback: bool,
    up: bool,
    mac: Option<[u8; 6]>,
    mtu: Option<u32>,
}

impl LinkInfo {
    fn from_message(m: &LinkMessage) -> LinkInfo {
        let mut info = LinkInfo {
            name: String::new(),
            index: m.header.index,
            ethernet: m.header.link_layer_type == LinkLayerType::Ether,
            loopback: m.header.flags.contains(LinkFlags::Loopback),
            up: m.header.flags.contains(LinkFlags::Up),
            mac: None,
            mtu: None,
        };
        for attr in &m.attributes {
            match attr {
                LinkAttribute::IfName(name) => info.name = name.clone(),
                LinkAttribute::Address(a) => info.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Mtu(mtu) => info.mtu = Some(*mtu),
                _ => {}
            }
        }
        info
    }
}

/// Why no interface was chosen.
#[derive(Debug, PartialEq, Eq)]
enum Choice {
    /// The names that were there and do not qualify.
    None(Vec<String>),
    Ambiguous(Vec<String>),
}

/// The CNI interface: the one named `eth0` (CRI's name); else the only
/// Ethernet interface other than loopback; else, of several, the only one
/// up. Ethernet only: the frames cross to the guest's virtio-net unchanged,
/// and a netns may hold down fallback tunnel devices (`tunl0`, `sit0`) made
/// by the kernel whenever their modules are loaded.
fn choose_interface(links: &[LinkInfo]) -> Result<&LinkInfo, Choice> {
    if let Some(l) = links.iter().find(|l| l.name == CNI_DEFAULT_NAME) {
        return Ok(l);
    }
    let candidates: Vec<&LinkInfo> = links
        .iter()
        .filter(|l| l.ethernet && !l.loopback && l.name != TAP_NAME)
        .collect();
    match candidates.as_slice() {
        [] => Err(Choice::None(links.iter().map(|l| l.name.clone()).collect())),
        [only] => Ok(only),
        several => {
            let up: Vec<&&LinkInfo> = several.iter().filter(|l| l.up).collect();
            match up.as_slice() {
                [only] => Ok(only),
                _ => Err(Choice::Ambiguous(
                    several.iter().map(|l| l.name.clone()).collect(),
                )),
            }
        }
    }
}

/// The interface's addresses for the guest: IPv4 and IPv6 without
/// link-local IPv6 (the guest kernel makes its own from the MAC).
fn guest_addresses(messages: &[AddressMessage], index: u32) -> Vec<IpNet> {
    let mut out = Vec::new();
    for m in messages.iter().filter(|m| m.header.index == index) {
        // IFA_LOCAL is the address itself; IFA_ADDRESS is the peer's on a
        // point-to-point link and the only one IPv6 sends.
        let mut local = None;
        let mut address = None;
        for attr in &m.attributes {
            match attr {
                AddressAttribute::Local(a) => local = Some(*a),
                AddressAttribute::Address(a) => address = Some(*a),
                _ => {}
            }
        }
        let Some(addr) = local.or(address) else {
            continue;
        };
        if let IpAddr::V6(v6) = addr {
            if is_ipv6_link_local(&v6) {
                continue;
            }
        }
        out.push(IpNet {
            addr,
            prefix_len: m.header.prefix_len,
        });
    }
    out
}

fn is_ipv6_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The routes the guest needs: unicast routes of the main table out of the
/// interface, in the host's order, without the prefix routes the kernel adds
/// for each address (the guest's kernel adds its own) and without IPv6
/// link-local and multicast routes (likewise). Multipath routes are left
/// out: their next hops do not fit [`Route`].
fn guest_routes(messages: &[RouteMessage], index: u32) -> Vec<Route> {
    let mut out = Vec::new();
    for m in messages {
        let h = &m.header;
        let table = m
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(h.table));
        if table != u32::from(RouteHeader::RT_TABLE_MAIN)
            || h.kind != RouteType::Unicast
            || h.protocol == RouteProtocol::Kernel
        {
            continue;
        }
        let (mut oif, mut dst, mut gateway, mut source, mut metric) = (None, None, None, None, 0);
        for attr in &m.attributes {
            match attr {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Destination(a) => dst = route_ip(a),
                RouteAttribute::Gateway(a) => gateway = route_ip(a),
                RouteAttribute::PrefSource(a) => source = route_ip(a),
                RouteAttribute::Priority(p) => metric = *p,
                _ => {}
            }
        }
        if oif != Some(index) {
            continue;
        }
        let addr = match (dst, h.address_family) {
            (Some(a), _) => a,
            (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (None, AddressFamily::Inet6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            (None, _) => continue,
        };
        if let IpAddr::V6(v6) = addr {
            if is_ipv6_link_local(&v6) || v6.is_multicast() {
                continue;
            }
        }
        out.push(Route {
            destination: IpNet {
                addr,
                prefix_len: h.destination_prefix_length,
            },
            gateway,
            source,
            metric,
        });
    }
    out
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

fn link_message(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m
}

/// Creates the tap `name` in the calling thread's netns: Ethernet frames
/// with a virtio-net header in front and no packet-info header,
/// non-persistent, failing if the name exists (never reusing someone
/// else's device).
fn open_tap(name: &str) -> io::Result<File> {
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

/// A blocking rtnetlink socket in the netns of the thread that opened it.
struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    fn open() -> io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends `message` with `flags` (and an ACK request) and returns what
    /// the kernel answered before the ACK; an error answer as its errno.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        Ok(self.exchange(message, NLM_F_ACK | flags)?.0)
    }

    /// A dump, asked again while the kernel says the table changed under it.
    fn dump(&mut self, message: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut tries = 0;
        loop {
            let (messages, interrupted) = self.exchange(message.clone(), NLM_F_DUMP)?;
            tries += 1;
            if !interrupted {
                return Ok(messages);
            }
            if tries == DUMP_TRIES {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    format!("the table kept changing during {DUMP_TRIES} dumps"),
                ));
            }
        }
    }

    /// One request and its answers up to the ACK or the end of the dump;
    /// also whether the kernel marked the dump interrupted.
    fn exchange(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<(Vec<RouteNetlinkMessage>, bool)> {
        self.seq = self.seq.wrapping_add(1);
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | flags;
        request.header.sequence_number = self.seq;
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let mut answers = Vec::new();
        let mut interrupted = false;
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                // Messages in one datagram are 4-byte aligned.
                offset += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                interrupted |= reply.header.flags & NLM_F_DUMP_INTR != 0;
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok((answers, interrupted)),
                        Some(_) => return Err(e.to_io()),
                    },
                    NetlinkPayload::Done(done) => {
                        if done.code < 0 {
                            return Err(io::Error::from_raw_os_error(-done.code));
                        }
                        return Ok((answers, interrupted));
                    }
                    _ => {}
                }
            }
        }
    }

    /// The name of the link with this index, None if there is none.
    fn link_name(&mut self, index: u32) -> io::Result<Option<String>> {
        match self.request(RouteNetlinkMessage::GetLink(link_message(index)), 0) {
            Ok(answers) => Ok(answers.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(LinkInfo::from_message(l).name),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The index of the link with this name, None if there is none.
    fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(m), 0) {
            Ok(answers) => Ok(answers.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `tc qdisc add dev <index> handle ffff: ingress`; EEXIST if the
    /// interface has one.
    fn add_ingress_qdisc(&mut self, index: u32) -> io::Result<()> {
        let mut m = TcMessage::with_index(index as i32);
        m.header.parent = TcHandle::INGRESS;
        m.header.handle = INGRESS_HANDLE;
        m.attributes.push(TcAttribute::Kind("ingress".to_string()));
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Removes the interface's ingress qdisc and its filters, if it has one.
    fn delete_ingress_qdisc(&mut self, index: u32) -> io::Result<()> {
        let mut query = TcMessage::with_index(index as i32);
        query.header.parent = TcHandle::INGRESS;
        let listed = match self.dump(RouteNetlinkMessage::GetQueueDiscipline(query)) {
            Ok(listed) => listed,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
            Err(e) => return Err(e),
        };
        // A qdisc dump is of every interface: the index picks this one.
        let present = listed.iter().any(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(q) => {
                q.header.index == index as i32 && q.header.parent == TcHandle::INGRESS
            }
            _ => false,
        });
        if !present {
            return Ok(());
        }
        let mut m = TcMessage::with_index(index as i32);
        m.header.parent = TcHandle::INGRESS;
        m.header.handle = INGRESS_HANDLE;
        match self.request(RouteNetlinkMessage::DelQueueDiscipline(m), 0) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENOENT)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `tc filter add dev <from> parent ffff: protocol all prio 1 u32 match
    /// u32 0 0 action mirred egress redirect dev <to>`: every frame that
    /// arrives on `from` leaves through `to`.
    fn add_redirect(&mut self, from: u32, to: u32) -> io::Result<()> {
        let mut m = TcMessage::with_index(from as i32);
        m.header.parent = INGRESS_HANDLE;
        m.header.info = u32::from(TcHandle {
            major: FILTER_PRIORITY,
            // The protocol is compared with the frame's, in network order.
            minor: (libc::ETH_P_ALL as u16).to_be(),
        });
        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        // One key with a zero mask matches every frame.
        selector.nkeys = 1;
        selector.keys = vec![TcU32Key::default()];
        let mut mirror = TcMirror::default();
        // Stolen: the frame leaves with the redirect and goes no further up
        // the stack of `from`.
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror,
            ))]),
        ];
        m.attributes
            .push(TcAttribute::Kind(TcFilterU32::KIND.to_string()));
        m.attributes.push(TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]));
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr as InetSocketAddr, UdpSocket};
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use crate::test_skip;

    /// Whether this test can make network namespaces; says so loudly if not.
    fn can_make_netns() -> bool {
        if !nix::unistd::geteuid().is_root() {
            test_skip::skipped("needs root to create network namespaces and veth pairs");
            return false;
        }
        if Command::new("ip").arg("-V").output().is_err() {
            test_skip::skipped("needs iproute2's `ip`");
            return false;
        }
        true
    }

    fn run(program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A network namespace of the test's own, under /var/run/netns, removed
    /// (with every interface in it) when dropped, also when the test fails.
    struct TestNetns {
        name: String,
        path: PathBuf,
    }

    impl TestNetns {
        fn new(role: &str) -> TestNetns {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("jevm-test-{}-{n}-{role}", std::process::id());
            run("ip", &["netns", "add", &name]);
            TestNetns {
                path: Path::new("/var/run/netns").join(&name),
                name,
            }
        }

        /// `ip -n <this netns> <args>`
        fn ip(&self, args: &[&str]) -> String {
            let mut all = vec!["-n", &self.name];
            all.extend_from_slice(args);
            run("ip", &all)
        }

        /// Whether `ip -n <this netns> <args>` succeeds.
        fn ip_ok(&self, args: &[&str]) -> bool {
            Command::new("ip")
                .arg("-n")
                .arg(&self.name)
                .args(args)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        }

        fn tc(&self, args: &[&str]) -> String {
            let mut all = vec!["-n", &self.name];
            all.extend_from_slice(args);
            run("tc", &all)
        }

        fn mac(&self, dev: &str) -> [u8; 6] {
            let out = self.ip(&["-o", "link", "show", "dev", dev]);
            let text = out
                .split("link/ether ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("no MAC in {out}"));
            let bytes: Vec<u8> = text
                .split(':')
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect();
            bytes.try_into().unwrap()
        }

        fn index(&self, dev: &str) -> u32 {
            let out = self.ip(&["-o", "link", "show", "dev", dev]);
            out.split(':').next().unwrap().parse().unwrap()
        }

        /// A UDP socket bound to `addr` inside this netns.
        fn udp(&self, addr: &str) -> UdpSocket {
            let ns = File::open(&self.path).unwrap();
            let addr: InetSocketAddr = addr.parse().unwrap();
            let socket = in_netns("test", &self.path, &ns, || {
                UdpSocket::bind(addr).map_err(|source| NetworkError::Netns {
                    pod: "test".into(),
                    path: self.path.clone(),
                    source,
                })
            })
            .unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            socket
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    /// A pod netns with `eth0` (MTU 1400, 10.77.<subnet>.2/24,
    /// fd77:<subnet>::2/64, default routes both families and one route with
    /// a source and a metric) veth-paired with `vnode` in a node netns
    /// (10.77.<subnet>.1/24, fd77:<subnet>::1/64).
    fn pod_and_node(subnet: u8) -> (TestNetns, TestNetns) {
        let pod = TestNetns::new("pod");
        let node = TestNetns::new("node");
        let v4 = |host: u8| format!("10.77.{subnet}.{host}");
        let v6 = |host: u8| format!("fd77:{subnet}::{host}");
        pod.ip(&[
            "link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "vnode", "mtu",
            "1400", "netns", &node.name,
        ]);
        pod.ip(&["addr", "add", &format!("{}/24", v4(2)), "dev", "eth0"]);
        pod.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", v6(2)),
            "dev",
            "eth0",
            "nodad",
        ]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["route", "add", "default", "via", &v4(1), "dev", "eth0"]);
        pod.ip(&[
            "route",
            "add",
            "192.168.77.0/24",
            "via",
            &v4(1),
            "dev",
            "eth0",
            "src",
            &v4(2),
            "metric",
            "7",
        ]);
        pod.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &v6(1),
            "dev",
            "eth0",
            "metric",
            "1024",
        ]);
        node.ip(&["addr", "add", &format!("{}/24", v4(1)), "dev", "vnode"]);
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", v6(1)),
            "dev",
            "vnode",
            "nodad",
        ]);
        node.ip(&["link", "set", "vnode", "up"]);
        (pod, node)
    }

    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An Ethernet frame carrying an IPv4 UDP datagram (UDP checksum 0:
    /// none, which IPv4 allows).
    fn udp_frame(
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        ip.extend_from_slice(&src.0.octets());
        ip.extend_from_slice(&dst.0.octets());
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&src.1.to_be_bytes());
        f.extend_from_slice(&dst.1.to_be_bytes());
        f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// Reads frames from the tap until one carries a UDP datagram to `port`;
    /// returns that frame (without the virtio-net header).
    fn read_udp_from_tap(tap: &mut File, port: u16) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        loop {
            assert!(
                Instant::now() < deadline,
                "no UDP datagram to port {port} came out of the tap"
            );
            let n = match tap.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => panic!("reading the tap: {e}"),
            };
            assert!(
                n > VNET_HDR_LEN as usize,
                "a read shorter than the vnet header"
            );
            let frame = &buf[VNET_HDR_LEN as usize..n];
            // Other frames (the node's IPv6 chatter) cross too: skip them.
            if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
                continue;
            }
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            let udp = &frame[14 + ihl..];
            if u16::from_be_bytes([udp[2], udp[3]]) == port {
                return frame.to_vec();
            }
        }
    }

    #[test]
    fn attach_joins_the_cni_interface_to_a_tap_both_ways_and_detach_undoes_it() {
        if !can_make_netns() {
            return;
        }
        let (pod, node) = pod_and_node(1);
        let eth0_mac = pod.mac("eth0");
        let node_mac = node.mac("vnode");

        let (network, mut tap, guest) = PodNetwork::attach(&pod.path, "p1").unwrap();

        let net = |s: &str| {
            let (addr, len) = s.split_once('/').unwrap();
            IpNet {
                addr: addr.parse().unwrap(),
                prefix_len: len.parse().unwrap(),
            }
        };
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let expected = Network {
            interface: NetInterface {
                name: "eth0".into(),
                mac: eth0_mac,
                mtu: 1400,
                // Not the fe80:: address the kernel gave eth0.
                addresses: vec![net("10.77.1.2/24"), net("fd77:1::2/64")],
            },
            // Not the kernel's prefix routes (10.77.1.0/24, fd77:1::/64,
            // fe80::/64).
            routes: vec![
                Route {
                    destination: net("0.0.0.0/0"),
                    gateway: ip("10.77.1.1"),
                    source: None,
                    metric: 0,
                },
                Route {
                    destination: net("192.168.77.0/24"),
                    gateway: ip("10.77.1.1"),
                    source: ip("10.77.1.2"),
                    metric: 7,
                },
                Route {
                    destination: net("::/0"),
                    gateway: ip("fd77:1::1"),
                    source: None,
                    metric: 1024,
                },
            ],
        };
        assert_eq!(guest, expected);
        assert_eq!(network.interface_name(), "eth0");
        assert_eq!(network.tap_name(), TAP_NAME);

        let tap_link = pod.ip(&["-o", "link", "show", "dev", TAP_NAME]);
        assert!(tap_link.contains("mtu 1400"), "{tap_link}");
        assert!(tap_link.contains(",UP"), "{tap_link}");
        let tap_addrs = pod.ip(&["-o", "addr", "show", "dev", TAP_NAME]);
        assert!(
            !tap_addrs.contains("inet"),
            "the tap has an address: {tap_addrs}"
        );
        // SAFETY: F_GETFL on an fd this test owns reads its flags.
        let fl = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&tap), libc::F_GETFL) };
        assert!(fl & libc::O_NONBLOCK != 0, "the tap fd blocks");
        // SAFETY: as above, F_GETFD.
        let fd = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&tap), libc::F_GETFD) };
        assert!(
            fd & libc::FD_CLOEXEC != 0,
            "the tap fd is inherited across exec"
        );

        // Guest → node: a frame written into the tap, behind a zeroed
        // virtio-net header, leaves through eth0 and reaches the node.
        let node_socket = node.udp("10.77.1.1:4001");
        let mut write = vec![0u8; VNET_HDR_LEN as usize];
        write.extend_from_slice(&udp_frame(
            node_mac,
            eth0_mac,
            ("10.77.1.2".parse().unwrap(), 4000),
            ("10.77.1.1".parse().unwrap(), 4001),
            b"from the guest",
        ));
        tap.write_all(&write).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = node_socket
            .recv_from(&mut buf)
            .expect("the frame written into the tap did not reach the node");
        assert_eq!(&buf[..n], b"from the guest");
        assert_eq!(from, "10.77.1.2:4000".parse().unwrap());

        // Node → guest: a datagram to the pod's address arrives on eth0 and
        // comes out of the tap, with the virtio-net header in front.
        let mac_text: Vec<String> = eth0_mac.iter().map(|b| format!("{b:02x}")).collect();
        node.ip(&[
            "neigh",
            "replace",
            "10.77.1.2",
            "lladdr",
            &mac_text.join(":"),
            "dev",
            "vnode",
            "nud",
            "permanent",
        ]);
        node_socket
            .send_to(b"to the guest", "10.77.1.2:4000")
            .unwrap();
        let frame = read_udp_from_tap(&mut tap, 4000);
        assert_eq!(frame[0..6], eth0_mac);
        assert_eq!(frame[6..12], node_mac);
        assert!(frame.ends_with(b"to the guest"));

        network.detach().unwrap();
        assert!(
            !pod.ip_ok(&["link", "show", "dev", TAP_NAME]),
            "the tap survived detach"
        );
        let qdiscs = pod.tc(&["qdisc", "show", "dev", "eth0"]);
        assert!(
            !qdiscs.contains("ingress"),
            "eth0 kept its ingress qdisc: {qdiscs}"
        );
        network.detach().expect("a second detach is not an error");
        drop(tap);
    }

    #[test]
    fn a_failed_attach_leaves_no_tap_and_keeps_what_was_there() {
        if !can_make_netns() {
            return;
        }
        let (pod, _node) = pod_and_node(2);
        // Someone else's tc on eth0: attach refuses it, after it made the
        // tap and its redirect, which it must take back.
        pod.tc(&["qdisc", "add", "dev", "eth0", "ingress"]);
        match PodNetwork::attach(&pod.path, "p2") {
            Err(e @ NetworkError::IngressTaken { .. }) => {
                assert_eq!(
                    e.to_string(),
                    "pod p2: interface eth0 already has an ingress qdisc; not joining the tap to it"
                );
            }
            other => panic!("expected IngressTaken, got {other:?}"),
        }
        assert!(
            !pod.ip_ok(&["link", "show", "dev", TAP_NAME]),
            "a failed attach left its tap"
        );
        let qdiscs = pod.tc(&["qdisc", "show", "dev", "eth0"]);
        assert!(
            qdiscs.contains("ingress"),
            "attach removed a qdisc it did not add"
        );
    }

    #[test]
    fn a_second_attach_to_the_same_netns_fails_and_spares_the_first() {
        if !can_make_netns() {
            return;
        }
        let (pod, _node) = pod_and_node(3);
        let (network, tap, _) = PodNetwork::attach(&pod.path, "p3").unwrap();
        let tap_index = network.tap_index();
        match PodNetwork::attach(&pod.path, "p3") {
            // The tap name is taken (IFF_TUN_EXCL): caught before any tc.
            Err(NetworkError::Tap { op: "creating", .. }) => {}
            other => panic!("expected the tap name to be taken, got {other:?}"),
        }
        let tap_link = pod.ip(&["-o", "link", "show", "dev", TAP_NAME]);
        assert!(
            tap_link.starts_with(&format!("{tap_index}: ")),
            "the first tap is gone: {tap_link}"
        );
        let filters = pod.tc(&["filter", "show", "dev", "eth0", "parent", "ffff:"]);
        assert!(
            filters.contains(TAP_NAME),
            "the first redirect is gone: {filters}"
        );
        network.detach().unwrap();
        drop(tap);
    }

    /// Runs `work` with a netlink socket in `ns`, as attach does.
    fn with_netlink<T: Send>(ns: &TestNetns, work: impl FnOnce(&mut Rtnl) -> T + Send) -> T {
        let file = File::open(&ns.path).unwrap();
        in_netns("test", &ns.path, &file, || {
            Ok(work(&mut Rtnl::open().unwrap()))
        })
        .unwrap()
    }

    #[test]
    fn a_redirect_that_cannot_be_added_takes_its_qdisc_back() {
        if !can_make_netns() {
            return;
        }
        let (pod, _node) = pod_and_node(6);
        let eth0 = Link {
            name: "eth0".into(),
            index: pod.index("eth0"),
        };
        // A tap that is gone by the time the redirect to it is added.
        let gone = Link {
            name: TAP_NAME.into(),
            index: 99_999,
        };
        let result = with_netlink(&pod, |nl| redirect_iface("p6", nl, &eth0, &gone));
        match result {
            Err(e @ NetworkError::Tap { .. }) => assert_eq!(
                e.to_string(),
                "pod p6: tap tap0_jevm: adding the redirect filter: No such device (os error 19)"
            ),
            other => panic!("expected a Tap error, got {other:?}"),
        }
        let qdiscs = pod.tc(&["qdisc", "show", "dev", "eth0"]);
        assert!(!qdiscs.contains("ingress"), "the qdisc stayed: {qdiscs}");
    }

    #[test]
    fn an_interface_that_vanished_before_the_join_is_named() {
        if !can_make_netns() {
            return;
        }
        let (pod, _node) = pod_and_node(7);
        let gone = Link {
            name: "eth0".into(),
            index: 99_999,
        };
        let tap = Link {
            name: TAP_NAME.into(),
            index: pod.index("eth0"),
        };
        match with_netlink(&pod, |nl| redirect_iface("abc", nl, &gone, &tap)) {
            Err(e @ NetworkError::Vanished { .. }) => assert_eq!(
                e.to_string(),
                "pod abc: interface eth0 vanished before the tap was joined"
            ),
            other => panic!("expected Vanished, got {other:?}"),
        }
    }

    #[test]
    fn detach_after_the_netns_is_gone_is_not_an_error() {
        if !can_make_netns() {
            return;
        }
        let (pod, node) = pod_and_node(4);
        let (network, tap, _) = PodNetwork::attach(&pod.path, "p4").unwrap();
        drop(tap);
        drop(pod);
        drop(node);
        assert!(!network.netns().exists());
        network.detach().unwrap();
    }

    #[test]
    fn closing_the_tap_fd_removes_the_tap() {
        if !can_make_netns() {
            return;
        }
        let (pod, _node) = pod_and_node(5);
        let (_network, tap, _) = PodNetwork::attach(&pod.path, "p5").unwrap();
        assert!(pod.ip_ok(&["link", "show", "dev", TAP_NAME]));
        // What a killed shim does: its fds close, and the tap goes.
        drop(tap);
        assert!(
            !pod.ip_ok(&["link", "show", "dev", TAP_NAME]),
            "the tap is persistent"
        );
    }

    #[test]
    fn attach_to_a_missing_netns_names_the_path() {
        let path = PathBuf::from(format!(
            "/var/run/netns/jevm-test-{}-missing",
            std::process::id()
        ));
        match PodNetwork::attach(&path, "abc") {
            Err(e @ NetworkError::Netns { .. }) => assert_eq!(
                e.to_string(),
                format!(
                    "pod abc: network namespace {}: No such file or directory (os error 2)",
                    path.display()
                )
            ),
            other => panic!("expected Netns, got {other:?}"),
        }
    }

    #[test]
    fn attach_to_a_netns_with_only_lo_says_so() {
        if !can_make_netns() {
            return;
        }
        let empty = TestNetns::new("empty");
        match PodNetwork::attach(&empty.path, "abc") {
            Err(e @ NetworkError::NoInterface { .. }) => assert_eq!(
                e.to_string(),
                format!(
                    "pod abc: no network interface in network namespace {} (only lo)",
                    empty.path.display()
                )
            ),
            other => panic!("expected NoInterface, got {other:?}"),
        }
        assert!(!empty.ip_ok(&["link", "show", "dev", TAP_NAME]));
    }

    #[test]
    fn attach_to_a_file_that_is_no_netns_says_so() {
        if !can_make_netns() {
            return;
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        match PodNetwork::attach(file.path(), "abc") {
            Err(NetworkError::NotNetns { path, .. }) => assert_eq!(path, file.path()),
            other => panic!("expected NotNetns, got {other:?}"),
        }
    }

    fn link(name: &str, index: u32, ethernet: bool, up: bool) -> LinkInfo {
        LinkInfo {
            name: name.into(),
            index,
            ethernet,
            loopback: name == "lo",
            up,
            mac: None,
            mtu: None,
        }
    }

    #[test]
    fn eth0_is_chosen_over_other_interfaces() {
        let links = [
            link("lo", 1, false, true),
            link("net1", 2, true, true),
            link("eth0", 3, true, true),
        ];
        assert_eq!(choose_interface(&links).unwrap().index, 3);
    }

    #[test]
    fn without_eth0_the_only_ethernet_interface_is_chosen_over_tunnels() {
        let links = [
            link("lo", 1, false, true),
            link("tunl0", 2, false, false),
            link("net1", 3, true, true),
        ];
        assert_eq!(choose_interface(&links).unwrap().index, 3);
    }

    #[test]
    fn of_several_ethernet_interfaces_the_only_one_up_is_chosen_else_none() {
        let one_up = [link("gretap0", 2, true, false), link("net1", 3, true, true)];
        assert_eq!(choose_interface(&one_up).unwrap().index, 3);
        let two_up = [link("net0", 2, true, true), link("net1", 3, true, true)];
        assert_eq!(
            choose_interface(&two_up),
            Err(Choice::Ambiguous(vec!["net0".into(), "net1".into()]))
        );
        let only_lo = [link("lo", 1, false, true), link("sit0", 2, false, false)];
        assert_eq!(
            choose_interface(&only_lo),
            Err(Choice::None(vec!["lo".into(), "sit0".into()]))
        );
    }

    #[test]
    fn ipv6_link_local_and_multicast_routes_stay_on_the_host() {
        let route = |dst: &str, len: u8| {
            let mut m = RouteMessage::default();
            m.header.address_family = AddressFamily::Inet6;
            m.header.table = RouteHeader::RT_TABLE_MAIN;
            m.header.kind = RouteType::Unicast;
            m.header.protocol = RouteProtocol::Boot;
            m.header.destination_prefix_length = len;
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet6(
                    dst.parse().unwrap(),
                )));
            m.attributes.push(RouteAttribute::Oif(7));
            m
        };
        let routes = [
            route("fe80::", 64),
            route("ff00::", 8),
            route("2001:db8::", 32),
        ];
        let kept = guest_routes(&routes, 7);
        assert_eq!(kept.len(), 1);
        assert_eq!(
            kept[0].destination.addr,
            "2001:db8::".parse::<IpAddr>().unwrap()
        );
        assert!(
            guest_routes(&routes, 8).is_empty(),
            "a route of another interface"
        );
    }
}
