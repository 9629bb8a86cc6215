//! What the guest must copy from the CNI interface: which interface it is,
//! its addresses and its routes, read from netlink dumps.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use jevm_protocol::{IpNet, Route};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use netlink_packet_route::AddressFamily;

use super::{CNI_DEFAULT_NAME, TAP_NAME};

/// An interface as the link dump lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LinkInfo {
    pub(super) name: String,
    pub(super) index: u32,
    pub(super) ethernet: bool,
    pub(super) loopback: bool,
    pub(super) up: bool,
    pub(super) mac: Option<[u8; 6]>,
    pub(super) mtu: Option<u32>,
}

impl LinkInfo {
    pub(super) fn from_message(m: &LinkMessage) -> LinkInfo {
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
pub(super) enum Choice {
    /// The names that were there and do not qualify.
    None(Vec<String>),
    Ambiguous(Vec<String>),
}

/// The CNI interface: the one named `eth0` (CRI's name); else the only
/// Ethernet interface other than loopback; else, of several, the only one
/// up. Ethernet only: the frames cross to the guest's virtio-net unchanged,
/// and a netns may hold down fallback tunnel devices (`tunl0`, `sit0`) made
/// by the kernel whenever their modules are loaded.
pub(super) fn choose_interface(links: &[LinkInfo]) -> Result<&LinkInfo, Choice> {
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
pub(super) fn guest_addresses(messages: &[AddressMessage], index: u32) -> Vec<IpNet> {
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

pub(super) fn is_ipv6_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

pub(super) fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
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
pub(super) fn guest_routes(messages: &[RouteMessage], index: u32) -> Vec<Route> {
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
