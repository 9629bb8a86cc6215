//! The pod's network inside the guest: the guest's one virtio-net interface
//! takes the host CNI interface's name, MAC, MTU, addresses and routes
//! (`jevm_protocol::Network`), set over rtnetlink.
//!
//! Packets cross between the pod's network namespace on the host and the
//! guest through a tc redirect, which rewrites nothing: the guest must answer
//! ARP and neighbour solicitations for the pod's addresses with the CNI
//! interface's MAC, and may not send frames larger than its MTU. So all of
//! them are copied exactly, and the name too, for tools in the pod that
//! expect `eth0`.
//!
//! The interface is found as the one Ethernet link besides `lo`, not by
//! name: the kernel calls the virtio-net device `eth0`, but the pod may want
//! another. More or fewer than one is an error, never a guess. (Tunnel
//! fallback devices such as `sit0`, which a kernel may create in every
//! namespace, are not Ethernet links.)
//!
//! Steps, each acknowledged by the kernel before the next (the first failure
//! stops, naming the step and the errno): the link goes down (a MAC or name
//! change needs it down), takes the MAC, the MTU and the name, comes up; `lo`
//! comes up; the addresses are added (IPv6 ones with `IFA_F_NODAD`: a clone
//! must be reachable at once, not after a second of duplicate address
//! detection); then the routes (see [`route_order`]).

use jevm_protocol::{IpNet, NetInterface, Network, Route};
use netlink_packet_core::{
    parse_string, DefaultNla, Emitable, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NlasIterator,
    NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressFlags, AddressHeader, AddressHeaderFlags, AddressScope,
};
use netlink_packet_route::link::{LinkFlags, LinkHeader, LinkLayerType};
use netlink_packet_route::route::{RouteHeader, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::AddressFamily;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;
use std::net::IpAddr;

/// `IFNAMSIZ` less the terminating NUL.
pub const MAX_NAME: usize = 15;

/// Smallest MTU the kernel takes for IPv4 (RFC 791).
pub const MIN_MTU: u32 = 68;

/// Largest MTU of an Ethernet device (`ETH_MAX_MTU`).
pub const MAX_MTU: u32 = 65535;

/// Below this MTU the kernel turns IPv6 off on the interface (RFC 8200).
pub const MIN_IPV6_MTU: u32 = 1280;

/// Why a [`Network`] is refused before anything is changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("interface name {name:?} {why}")]
    Name { name: String, why: &'static str },
    #[error("MTU {0} is outside {MIN_MTU}..={MAX_MTU}")]
    Mtu(u32),
    #[error(
        "MTU {0} is below IPv6's minimum of {MIN_IPV6_MTU}, and the interface has IPv6 addresses"
    )]
    Ipv6Mtu(u32),
    #[error("MAC {0} is a multicast address")]
    MulticastMac(String),
    #[error("MAC 00:00:00:00:00:00 is not an address")]
    ZeroMac,
    #[error("address {addr}/{prefix_len}: the prefix length is above {max}")]
    AddressPrefix {
        addr: IpAddr,
        prefix_len: u8,
        max: u8,
    },
    #[error("route to {destination}: {why}")]
    Route { destination: String, why: String },
}

/// Why configuring the network failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("opening a route netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("no Ethernet interface besides lo")]
    NoInterface,
    #[error("{} Ethernet interfaces ({}), expected exactly one", .0.len(), .0.join(", "))]
    ManyInterfaces(Vec<String>),
    #[error("no loopback interface")]
    NoLoopback,
    /// A netlink request the kernel refused or answered unreadably; `step`
    /// says what was being done, to which interface, address or route.
    #[error("{step}: {source}")]
    Step {
        step: String,
        #[source]
        source: io::Error,
    },
}

fn at(step: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
    let step = step.into();
    move |source| NetworkError::Step { step, source }
}

/// Checks everything the kernel would refuse, or would take but get wrong,
/// so an invalid request changes nothing.
pub fn validate(network: &Network) -> Result<(), Invalid> {
    let NetInterface {
        name,
        mac,
        mtu,
        addresses,
    } = &network.interface;
    check_name(name).map_err(|why| Invalid::Name {
        name: name.clone(),
        why,
    })?;
    if !(MIN_MTU..=MAX_MTU).contains(mtu) {
        return Err(Invalid::Mtu(*mtu));
    }
    if mac[0] & 1 != 0 {
        return Err(Invalid::MulticastMac(mac_string(mac)));
    }
    if mac == &[0; 6] {
        return Err(Invalid::ZeroMac);
    }
    for net in addresses {
        let max = max_prefix(net.addr);
        if net.prefix_len > max {
            return Err(Invalid::AddressPrefix {
                addr: net.addr,
                prefix_len: net.prefix_len,
                max,
            });
        }
    }
    if *mtu < MIN_IPV6_MTU && addresses.iter().any(|net| net.addr.is_ipv6()) {
        return Err(Invalid::Ipv6Mtu(*mtu));
    }
    for route in &network.routes {
        check_route(route).map_err(|why| Invalid::Route {
            destination: net_string(&route.destination),
            why,
        })?;
    }
    Ok(())
}

/// The kernel's `dev_valid_name`, plus `lo`, which exists already.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err("must be 1 to 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("is not a name");
    }
    if name == "lo" {
        return Err("is the loopback interface's");
    }
    if name.contains(['/', ':', '\0']) || name.chars().any(char::is_whitespace) {
        return Err("contains '/', ':', NUL or white space");
    }
    Ok(())
}

fn check_route(route: &Route) -> Result<(), String> {
    let dst = route.destination;
    let max = max_prefix(dst.addr);
    if dst.prefix_len > max {
        return Err(format!("the prefix length is above {max}"));
    }
    if host_bits(dst) {
        return Err("the address has bits set beyond the prefix length".into());
    }
    for (what, addr) in [("gateway", route.gateway), ("source", route.source)] {
        if let Some(addr) = addr {
            if addr.is_ipv6() != dst.addr.is_ipv6() {
                return Err(format!(
                    "{what} {addr} is not of the destination's address family"
                ));
            }
        }
    }
    Ok(())
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// Whether `net` has bits set past its prefix (`10.0.0.1/8`); `prefix_len`
/// is already known to be in range.
fn host_bits(net: IpNet) -> bool {
    let (bits, width) = match net.addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    let host = width - u32::from(net.prefix_len);
    // checked: a shift by 128 (a /0 of IPv6) overflows.
    let host_mask = 1u128.checked_shl(host).map_or(u128::MAX, |b| b - 1);
    bits & host_mask != 0
}

fn net_string(net: &IpNet) -> String {
    format!("{}/{}", net.addr, net.prefix_len)
}

fn mac_string(mac: &[u8; 6]) -> String {
    let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

/// How `ip route` would show `route` on `dev`, for errors.
fn route_string(route: &Route, dev: &str) -> String {
    let mut s = net_string(&route.destination);
    if let Some(gw) = route.gateway {
        s += &format!(" via {gw}");
    }
    s += &format!(" dev {dev}");
    if let Some(src) = route.source {
        s += &format!(" src {src}");
    }
    if route.metric != 0 {
        s += &format!(" metric {}", route.metric);
    }
    s
}

/// Validates `network`, then applies it to the guest's one Ethernet
/// interface (see the module doc).
pub fn configure(network: &Network) -> Result<(), NetworkError> {
    validate(network)?;
    let mut rtnl = Rtnl::open().map_err(NetworkError::Socket)?;
    let links = rtnl.links().map_err(at("listing the network interfaces"))?;
    let (lo, nic) = pick_links(&links)?;
    apply(&mut rtnl, network, nic, lo)
}

fn apply(rtnl: &mut Rtnl, network: &Network, nic: &Link, lo: u32) -> Result<(), NetworkError> {
    let iface = &network.interface;
    let index = nic.index;
    let mut dev = nic.name.as_str();
    let mac = mac_string(&iface.mac);
    rtnl.set_link(link_flags(index, false))
        .map_err(at(format!("bringing {dev} down")))?;
    rtnl.set_link(set_mac(index, &iface.mac))
        .map_err(at(format!("setting MAC {mac} on {dev}")))?;
    rtnl.set_link(set_mtu(index, iface.mtu))
        .map_err(at(format!("setting MTU {} on {dev}", iface.mtu)))?;
    if dev != iface.name {
        rtnl.set_link(set_name(index, &iface.name))
            .map_err(at(format!("renaming {dev} to {}", iface.name)))?;
        dev = &iface.name;
    }
    rtnl.set_link(link_flags(index, true))
        .map_err(at(format!("bringing {dev} up")))?;
    rtnl.set_link(link_flags(lo, true))
        .map_err(at("bringing lo up"))?;
    for net in &iface.addresses {
        rtnl.create(libc::RTM_NEWADDR, &address_message(index, net))
            .map_err(at(format!("adding address {} to {dev}", net_string(net))))?;
    }
    for route in route_order(&network.routes) {
        rtnl.create(libc::RTM_NEWROUTE, &route_message(index, route))
            .map_err(at(format!("adding route {}", route_string(route, dev))))?;
    }
    Ok(())
}

/// The routes in the host's order, except that those without a gateway come
/// first: a gateway must be reachable through an on-link route when its
/// route is added, and the host lists routes in table order, where
/// `0.0.0.0/0 via 169.254.1.1` comes before the `169.254.1.1 scope link` it
/// needs (Calico sets up pods that way). No gateway route depends on another
/// (the kernel resolves a gateway only through on-link routes).
fn route_order(routes: &[Route]) -> impl Iterator<Item = &Route> {
    let on_link = routes.iter().filter(|r| r.gateway.is_none());
    on_link.chain(routes.iter().filter(|r| r.gateway.is_some()))
}

/// What discovery needs of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    index: u32,
    name: String,
    kind: LinkLayerType,
    flags: LinkFlags,
}

impl Link {
    /// From an `RTM_NEWLINK` payload: the header and the name attribute,
    /// nothing else decoded (see [`Answer`]).
    fn parse(payload: &[u8]) -> io::Result<Self> {
        let header = LinkHeader::parse(payload).map_err(|e| malformed(e.to_string()))?;
        let attributes = payload.get(header.buffer_len()..).unwrap_or_default();
        let mut name = None;
        for nla in NlasIterator::new(attributes) {
            let nla = nla.map_err(|e| malformed(e.to_string()))?;
            if nla.kind() == IFLA_IFNAME {
                name = Some(parse_string(nla.value()).map_err(|e| malformed(e.to_string()))?);
            }
        }
        Ok(Self {
            index: header.index,
            name: name.unwrap_or_else(|| format!("#{}", header.index)),
            kind: header.link_layer_type,
            flags: header.flags,
        })
    }
}

/// `lo`'s index and the one Ethernet link (see the module doc).
fn pick_links(links: &[Link]) -> Result<(u32, &Link), NetworkError> {
    let lo = links
        .iter()
        .find(|l| l.flags.contains(LinkFlags::Loopback))
        .ok_or(NetworkError::NoLoopback)?;
    let ethernet: Vec<&Link> = links
        .iter()
        .filter(|l| l.kind == LinkLayerType::Ether && !l.flags.contains(LinkFlags::Loopback))
        .collect();
    match ethernet[..] {
        [] => Err(NetworkError::NoInterface),
        [nic] => Ok((lo.index, nic)),
        _ => Err(NetworkError::ManyInterfaces(
            ethernet.iter().map(|l| l.name.clone()).collect(),
        )),
    }
}

// Attribute kinds, kernel ABI (`linux/if_link.h`, `linux/if_addr.h`,
// `linux/rtnetlink.h`).
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_FLAGS: u16 = 8;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_PREFSRC: u16 = 7;

/// A request body: one of the crate's typed headers, then attributes as
/// kind and bytes. The crate's attribute enums are not used here: emitting
/// one links in the emitters of every variant (every kind of link, tunnel
/// and route), a quarter of a megabyte in an agent every template carries.
/// The tests decode these with the crate's parsers.
#[derive(Debug)]
struct Message<H> {
    header: H,
    attributes: Vec<DefaultNla>,
}

impl<H: Emitable> Emitable for Message<H> {
    fn buffer_len(&self) -> usize {
        self.header.buffer_len() + self.attributes.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.header.emit(buffer);
        let header_len = self.header.buffer_len();
        self.attributes.as_slice().emit(&mut buffer[header_len..]);
    }
}

fn ip_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn u32_attribute(kind: u16, value: u32) -> DefaultNla {
    DefaultNla::new(kind, value.to_ne_bytes().to_vec())
}

/// `RTM_SETLINK` of `index` with `attributes`, leaving the flags alone.
fn link_message(index: u32, attributes: Vec<DefaultNla>) -> Message<LinkHeader> {
    let header = LinkHeader {
        index,
        ..LinkHeader::default()
    };
    Message { header, attributes }
}

/// `RTM_SETLINK` that only brings the link up or down.
fn link_flags(index: u32, up: bool) -> Message<LinkHeader> {
    let mut msg = link_message(index, Vec::new());
    msg.header.change_mask = LinkFlags::Up;
    if up {
        msg.header.flags = LinkFlags::Up;
    }
    msg
}

fn set_mac(index: u32, mac: &[u8; 6]) -> Message<LinkHeader> {
    link_message(index, vec![DefaultNla::new(IFLA_ADDRESS, mac.to_vec())])
}

fn set_mtu(index: u32, mtu: u32) -> Message<LinkHeader> {
    link_message(index, vec![u32_attribute(IFLA_MTU, mtu)])
}

fn set_name(index: u32, name: &str) -> Message<LinkHeader> {
    let mut value = name.as_bytes().to_vec();
    value.push(0);
    link_message(index, vec![DefaultNla::new(IFLA_IFNAME, value)])
}

/// `RTM_NEWADDR` as `ip addr add` sends it: local and peer address the
/// same; an IPv4 broadcast address where the prefix leaves room for one
/// (as CNI's plugins give it); IPv6 without duplicate address detection.
fn address_message(index: u32, net: &IpNet) -> Message<AddressHeader> {
    let mut header = AddressHeader {
        index,
        prefix_len: net.prefix_len,
        scope: AddressScope::Universe,
        ..AddressHeader::default()
    };
    let mut attributes = vec![
        DefaultNla::new(IFA_LOCAL, ip_bytes(net.addr)),
        DefaultNla::new(IFA_ADDRESS, ip_bytes(net.addr)),
    ];
    match net.addr {
        IpAddr::V4(addr) => {
            header.family = AddressFamily::Inet;
            if net.prefix_len < 31 {
                let host_mask = u32::MAX >> net.prefix_len;
                let broadcast = u32::from(addr) | host_mask;
                attributes.push(DefaultNla::new(
                    IFA_BROADCAST,
                    broadcast.to_be_bytes().to_vec(),
                ));
            }
        }
        IpAddr::V6(_) => {
            header.family = AddressFamily::Inet6;
            // Both: the header's byte for old kernels, IFA_FLAGS (which
            // wins when present) for new ones.
            header.flags = AddressHeaderFlags::Nodad;
            attributes.push(u32_attribute(IFA_FLAGS, AddressFlags::Nodad.bits()));
        }
    }
    Message { header, attributes }
}

/// `RTM_NEWROUTE` in the main table as `ip route add` sends it: protocol
/// `boot`, scope link when there is no gateway, no destination attribute
/// for a default route.
fn route_message(index: u32, route: &Route) -> Message<RouteHeader> {
    let dst = route.destination;
    let header = RouteHeader {
        address_family: if dst.addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        },
        destination_prefix_length: dst.prefix_len,
        table: RouteHeader::RT_TABLE_MAIN,
        protocol: RouteProtocol::Boot,
        kind: RouteType::Unicast,
        scope: match route.gateway {
            Some(_) => RouteScope::Universe,
            None => RouteScope::Link,
        },
        ..RouteHeader::default()
    };
    let mut attributes = Vec::new();
    if dst.prefix_len > 0 {
        attributes.push(DefaultNla::new(RTA_DST, ip_bytes(dst.addr)));
    }
    if let Some(gateway) = route.gateway {
        attributes.push(DefaultNla::new(RTA_GATEWAY, ip_bytes(gateway)));
    }
    if let Some(source) = route.source {
        attributes.push(DefaultNla::new(RTA_PREFSRC, ip_bytes(source)));
    }
    if route.metric != 0 {
        attributes.push(u32_attribute(RTA_PRIORITY, route.metric));
    }
    attributes.push(u32_attribute(RTA_OIF, index));
    Message { header, attributes }
}

/// Receive buffer: more than a dump datagram of the kernel holds (it fills
/// at most 32 KiB); a longer one is reported as truncated, not misread.
const RECV_BUF: usize = 64 << 10;

/// How often a dump is restarted when the kernel marks it inconsistent.
const DUMP_ATTEMPTS: usize = 3;

/// One message of the kernel's answer, its payload not decoded beyond what
/// the caller needs: decoding whole `RouteNetlinkMessage`s would link in the
/// crate's parsers for every kind of link, qdisc and rule, most of a
/// megabyte in an agent that every template carries.
#[derive(Debug)]
enum Answer {
    /// `NLMSG_ERROR`: an acknowledgement (None) or the errno of a refusal.
    Ack(Option<io::Error>),
    /// `NLMSG_DONE`: the end of a dump.
    Done,
    /// Anything else, such as one object of a dump.
    Object { message_type: u16, payload: Vec<u8> },
}

#[derive(Debug)]
struct Received {
    seq: u32,
    flags: u16,
    answer: Answer,
}

/// A blocking rtnetlink socket of the calling thread's network namespace,
/// one request at a time.
struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    fn set_link(&mut self, msg: Message<LinkHeader>) -> io::Result<()> {
        self.request(libc::RTM_SETLINK, 0, &msg)
    }

    /// Adds an object (`message_type` is an `RTM_NEW*`) that must not
    /// exist yet.
    fn create(&mut self, message_type: u16, msg: &impl Emitable) -> io::Result<()> {
        self.request(message_type, NLM_F_CREATE | NLM_F_EXCL, msg)
    }

    fn links(&mut self) -> io::Result<Vec<Link>> {
        let dump = self.dump(libc::RTM_GETLINK, &link_message(0, Vec::new()))?;
        dump.iter()
            .filter(|(message_type, _)| *message_type == libc::RTM_NEWLINK)
            .map(|(_, payload)| Link::parse(payload))
            .collect()
    }

    /// Sends `msg` and waits for its acknowledgement: Ok, or the errno the
    /// kernel answered.
    fn request(&mut self, message_type: u16, flags: u16, msg: &impl Emitable) -> io::Result<()> {
        let seq = self.send(message_type, NLM_F_REQUEST | NLM_F_ACK | flags, msg)?;
        loop {
            for received in self.recv()? {
                if received.seq != seq {
                    continue;
                }
                if let Answer::Ack(result) = received.answer {
                    return result.map_or(Ok(()), Err);
                }
            }
        }
    }

    /// Type and payload of every object the kernel lists for `msg`,
    /// restarting when the kernel says the list changed while it was being
    /// read.
    fn dump(&mut self, message_type: u16, msg: &impl Emitable) -> io::Result<Vec<(u16, Vec<u8>)>> {
        for _ in 0..DUMP_ATTEMPTS {
            let seq = self.send(message_type, NLM_F_REQUEST | NLM_F_DUMP, msg)?;
            let mut objects = Vec::new();
            let mut interrupted = false;
            'datagrams: loop {
                for received in self.recv()? {
                    if received.seq != seq {
                        continue;
                    }
                    interrupted |= received.flags & NLM_F_DUMP_INTR != 0;
                    match received.answer {
                        Answer::Done => break 'datagrams,
                        Answer::Ack(Some(e)) => return Err(e),
                        Answer::Ack(None) => {}
                        Answer::Object {
                            message_type,
                            payload,
                        } => objects.push((message_type, payload)),
                    }
                }
            }
            if !interrupted {
                return Ok(objects);
            }
        }
        Err(io::Error::other(format!(
            "the list changed while being read, {DUMP_ATTEMPTS} times"
        )))
    }

    fn send(&mut self, message_type: u16, flags: u16, msg: &impl Emitable) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        let header_len = header.buffer_len();
        let len = header_len + msg.buffer_len();
        header.length = u32::try_from(len).map_err(io::Error::other)?;
        header.message_type = message_type;
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut bytes = vec![0; len];
        header.emit(&mut bytes[..header_len]);
        msg.emit(&mut bytes[header_len..]);
        let sent = self.socket.send(&bytes, 0)?;
        if sent != len {
            return Err(io::Error::other(format!(
                "netlink took {sent} of {len} bytes"
            )));
        }
        Ok(self.seq)
    }

    /// The messages of one datagram.
    fn recv(&mut self) -> io::Result<Vec<Received>> {
        self.buf.clear();
        // MSG_TRUNC: the datagram's real length, to tell a truncated one.
        let len = self.socket.recv(&mut self.buf, libc::MSG_TRUNC)?;
        if len > self.buf.len() {
            return Err(malformed(format!(
                "datagram of {len} bytes truncated to {RECV_BUF}"
            )));
        }
        parse_datagram(&self.buf[..len])
    }
}

/// The messages of one datagram, each decoded only as far as [`Answer`].
fn parse_datagram(datagram: &[u8]) -> io::Result<Vec<Received>> {
    let mut messages = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        // Checked: the length field is at least a header and at most
        // what is left, so `payload` cannot panic and the loop ends.
        let msg = NetlinkBuffer::new_checked(rest).map_err(|e| malformed(e.to_string()))?;
        let payload = msg.payload();
        let answer = match msg.message_type() {
            NLMSG_ERROR => {
                let error =
                    ErrorBuffer::new_checked(payload).map_err(|e| malformed(e.to_string()))?;
                // The kernel sends the negative errno.
                let errno = error.code().map(|c| c.get().wrapping_abs());
                Answer::Ack(errno.map(io::Error::from_raw_os_error))
            }
            // A dump that failed part way ends with the errno here.
            NLMSG_DONE => match payload.get(..4).map(|code| code.try_into()) {
                Some(Ok(code)) if i32::from_ne_bytes(code) != 0 => Answer::Ack(Some(
                    io::Error::from_raw_os_error(i32::from_ne_bytes(code).wrapping_abs()),
                )),
                _ => Answer::Done,
            },
            message_type => Answer::Object {
                message_type,
                payload: payload.to_vec(),
            },
        };
        messages.push(Received {
            seq: msg.sequence_number(),
            flags: msg.flags(),
            answer,
        });
        // Messages start 4-byte aligned.
        let next = (msg.length() as usize).next_multiple_of(4);
        rest = rest.get(next..).unwrap_or_default();
    }
    Ok(messages)
}

fn malformed(why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink answer: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use jevm_protocol::NetInterface;
    use netlink_packet_core::Parseable;
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    use netlink_packet_route::link::{
        InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
    };
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
    use std::fs::File;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::os::fd::AsRawFd;

    fn net(addr: &str, prefix_len: u8) -> IpNet {
        IpNet {
            addr: addr.parse().unwrap(),
            prefix_len,
        }
    }

    fn route(dst: &str, len: u8, gateway: Option<&str>) -> Route {
        Route {
            destination: net(dst, len),
            gateway: gateway.map(|g| g.parse().unwrap()),
            source: None,
            metric: 0,
        }
    }

    const MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x58, 0x00, 0x05];

    /// A pod as a Calico-like CNI sets it up, routes in the host's table
    /// order: the default route's gateway is reachable only through the
    /// on-link route listed after it.
    fn pod_network() -> Network {
        Network {
            interface: NetInterface {
                name: "eth0".into(),
                mac: MAC,
                mtu: 1450,
                addresses: vec![net("10.88.0.5", 16), net("fd00:88::5", 64)],
            },
            routes: vec![
                route("0.0.0.0", 0, Some("169.254.1.1")),
                route("169.254.1.1", 32, None),
                Route {
                    source: Some("10.88.0.5".parse().unwrap()),
                    metric: 100,
                    ..route("192.168.50.0", 24, Some("10.88.0.1"))
                },
                Route {
                    metric: 1024,
                    ..route("::", 0, Some("fe80::1"))
                },
            ],
        }
    }

    fn with_interface(edit: impl FnOnce(&mut NetInterface)) -> Result<(), Invalid> {
        let mut network = pod_network();
        edit(&mut network.interface);
        validate(&network)
    }

    fn with_route(route: Route) -> Result<(), Invalid> {
        let mut network = pod_network();
        network.routes = vec![route];
        validate(&network)
    }

    #[test]
    fn a_cni_pod_network_is_valid() {
        assert_eq!(validate(&pod_network()), Ok(()));
    }

    #[test]
    fn interface_names_follow_the_kernel_rules_and_may_not_be_lo() {
        for good in ["eth0", "net1", "a", "fifteen-bytes-x"] {
            assert_eq!(with_interface(|i| i.name = good.into()), Ok(()), "{good}");
        }
        let cases = [
            ("", "must be 1 to 15 bytes"),
            ("sixteen-bytes-xx", "must be 1 to 15 bytes"),
            ("lo", "is the loopback interface's"),
            (".", "is not a name"),
            ("..", "is not a name"),
            ("a/b", "contains '/', ':', NUL or white space"),
            ("eth0:1", "contains '/', ':', NUL or white space"),
            ("a b", "contains '/', ':', NUL or white space"),
            ("a\tb", "contains '/', ':', NUL or white space"),
            ("a\0b", "contains '/', ':', NUL or white space"),
        ];
        for (name, why) in cases {
            let err = with_interface(|i| i.name = name.into()).unwrap_err();
            assert_eq!(err.to_string(), format!("interface name {name:?} {why}"));
        }
    }

    #[test]
    fn mtu_must_be_68_to_65535_and_1280_with_ipv6() {
        for mtu in [68, 1279, 65535] {
            let v4_only = with_interface(|i| {
                i.mtu = mtu;
                i.addresses.retain(|a| a.addr.is_ipv4());
            });
            assert_eq!(v4_only, Ok(()), "{mtu}");
        }
        for mtu in [0, 67, 65536] {
            assert_eq!(with_interface(|i| i.mtu = mtu), Err(Invalid::Mtu(mtu)));
        }
        assert_eq!(with_interface(|i| i.mtu = 1280), Ok(()));
        let err = with_interface(|i| i.mtu = 1279).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MTU 1279 is below IPv6's minimum of 1280, and the interface has IPv6 addresses"
        );
    }

    #[test]
    fn mac_must_be_unicast_and_not_zero() {
        let err = with_interface(|i| i.mac = [0x01, 0x00, 0x5e, 0, 0, 1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MAC 01:00:5e:00:00:01 is a multicast address"
        );
        assert_eq!(with_interface(|i| i.mac = [0; 6]), Err(Invalid::ZeroMac));
        // Locally administered (bit 1) is what CNI plugins generate.
        assert_eq!(with_interface(|i| i.mac = [0x02, 0, 0, 0, 0, 1]), Ok(()));
    }

    #[test]
    fn address_prefix_lengths_must_fit_the_family() {
        assert_eq!(
            with_interface(|i| i.addresses = vec![net("10.0.0.1", 32)]),
            Ok(())
        );
        assert_eq!(
            with_interface(|i| i.addresses = vec![net("fd00::1", 128)]),
            Ok(())
        );
        let err = with_interface(|i| i.addresses = vec![net("10.0.0.1", 33)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "address 10.0.0.1/33: the prefix length is above 32"
        );
        let err = with_interface(|i| i.addresses = vec![net("fd00::1", 129)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "address fd00::1/129: the prefix length is above 128"
        );
    }

    #[test]
    fn routes_must_keep_to_one_family_and_their_prefix() {
        let cases = [
            (
                route("0.0.0.0", 0, Some("fe80::1")),
                "route to 0.0.0.0/0: gateway fe80::1 is not of the destination's address family",
            ),
            (
                route("::", 0, Some("10.88.0.1")),
                "route to ::/0: gateway 10.88.0.1 is not of the destination's address family",
            ),
            (
                Route {
                    source: Some("fd00::5".parse().unwrap()),
                    ..route("10.0.0.0", 8, None)
                },
                "route to 10.0.0.0/8: source fd00::5 is not of the destination's address family",
            ),
            (
                route("10.0.0.0", 33, None),
                "route to 10.0.0.0/33: the prefix length is above 32",
            ),
            (
                route("10.0.0.1", 8, None),
                "route to 10.0.0.1/8: the address has bits set beyond the prefix length",
            ),
            (
                route("fd00::1", 64, None),
                "route to fd00::1/64: the address has bits set beyond the prefix length",
            ),
        ];
        for (route, message) in cases {
            assert_eq!(with_route(route).unwrap_err().to_string(), message);
        }
        for ok in [
            route("0.0.0.0", 0, Some("10.88.0.1")),
            route("::", 0, Some("fe80::1")),
            route("10.0.0.1", 32, None),
            route("fd00::", 64, None),
        ] {
            assert_eq!(with_route(ok.clone()), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn host_bits_are_those_past_the_prefix_for_every_length() {
        assert!(!host_bits(net("0.0.0.0", 0)));
        assert!(host_bits(net("0.0.0.1", 0)));
        assert!(!host_bits(net("::", 0)));
        assert!(host_bits(net("::1", 0)));
        assert!(!host_bits(net("255.255.255.255", 32)));
        assert!(!host_bits(net("ffff::ffff", 128)));
        assert!(!host_bits(net("10.0.0.128", 25)));
        assert!(host_bits(net("10.0.0.128", 24)));
    }

    #[test]
    fn routes_without_a_gateway_go_first_otherwise_in_the_hosts_order() {
        let network = pod_network();
        let order: Vec<String> = route_order(&network.routes)
            .map(|r| route_string(r, "eth0"))
            .collect();
        assert_eq!(
            order,
            [
                "169.254.1.1/32 dev eth0",
                "0.0.0.0/0 via 169.254.1.1 dev eth0",
                "192.168.50.0/24 via 10.88.0.1 dev eth0 src 10.88.0.5 metric 100",
                "::/0 via fe80::1 dev eth0 metric 1024",
            ]
        );
    }

    fn link(index: u32, name: &str, kind: LinkLayerType, flags: LinkFlags) -> Link {
        Link {
            index,
            name: name.into(),
            kind,
            flags,
        }
    }

    #[test]
    fn the_interface_is_the_one_ethernet_link_besides_lo() {
        let lo = link(1, "lo", LinkLayerType::Loopback, LinkFlags::Loopback);
        let sit = link(2, "sit0", LinkLayerType::Sit, LinkFlags::Noarp);
        let eth0 = link(3, "eth0", LinkLayerType::Ether, LinkFlags::Broadcast);
        let eth1 = link(4, "eth1", LinkLayerType::Ether, LinkFlags::Broadcast);

        let links = [lo.clone(), sit.clone(), eth0.clone()];
        let (lo_index, nic) = pick_links(&links).unwrap();
        assert_eq!((lo_index, nic), (1, &eth0));

        let err = pick_links(&[lo.clone(), sit.clone()]).unwrap_err();
        assert_eq!(err.to_string(), "no Ethernet interface besides lo");
        let err = pick_links(&[lo, eth0.clone(), eth1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "2 Ethernet interfaces (eth0, eth1), expected exactly one"
        );
        let err = pick_links(&[eth0]).unwrap_err();
        assert_eq!(err.to_string(), "no loopback interface");
    }

    /// `msg` on the wire, read back with the crate's parser: checks the
    /// bytes, not just what was meant.
    fn decode<T: Parseable<[u8]>>(msg: &impl Emitable) -> T {
        let mut bytes = vec![0; msg.buffer_len()];
        msg.emit(&mut bytes);
        T::parse(&bytes).unwrap()
    }

    #[test]
    fn ipv4_addresses_get_a_broadcast_address_where_the_prefix_has_room() {
        let msg: AddressMessage = decode(&address_message(7, &net("10.88.0.5", 16)));
        assert_eq!(msg.header.family, AddressFamily::Inet);
        assert_eq!((msg.header.index, msg.header.prefix_len), (7, 16));
        assert_eq!(msg.header.scope, AddressScope::Universe);
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 88, 0, 5));
        assert_eq!(
            msg.attributes,
            [
                AddressAttribute::Local(v4),
                AddressAttribute::Address(v4),
                AddressAttribute::Broadcast(Ipv4Addr::new(10, 88, 255, 255)),
            ]
        );
        for prefix_len in [31, 32] {
            let msg: AddressMessage = decode(&address_message(7, &net("10.88.0.5", prefix_len)));
            assert_eq!(
                msg.attributes.len(),
                2,
                "{prefix_len}: {:?}",
                msg.attributes
            );
        }
        let msg: AddressMessage = decode(&address_message(7, &net("10.0.0.0", 0)));
        assert!(msg
            .attributes
            .contains(&AddressAttribute::Broadcast(Ipv4Addr::BROADCAST)));
    }

    #[test]
    fn ipv6_addresses_skip_duplicate_address_detection() {
        let msg: AddressMessage = decode(&address_message(7, &net("fd00:88::5", 64)));
        assert_eq!(msg.header.family, AddressFamily::Inet6);
        assert_eq!(msg.header.flags, AddressHeaderFlags::Nodad);
        let v6 = IpAddr::V6("fd00:88::5".parse().unwrap());
        assert_eq!(
            msg.attributes,
            [
                AddressAttribute::Local(v6),
                AddressAttribute::Address(v6),
                AddressAttribute::Flags(AddressFlags::Nodad),
            ]
        );
    }

    #[test]
    fn route_messages_are_main_table_boot_routes_through_the_interface() {
        let default: RouteMessage =
            decode(&route_message(7, &route("0.0.0.0", 0, Some("10.88.0.1"))));
        assert_eq!(default.header.address_family, AddressFamily::Inet);
        assert_eq!(default.header.destination_prefix_length, 0);
        assert_eq!(default.header.table, RouteHeader::RT_TABLE_MAIN);
        assert_eq!(default.header.protocol, RouteProtocol::Boot);
        assert_eq!(default.header.kind, RouteType::Unicast);
        assert_eq!(default.header.scope, RouteScope::Universe);
        assert_eq!(
            default.attributes,
            [
                RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 88, 0, 1))),
                RouteAttribute::Oif(7),
            ]
        );

        let on_link: RouteMessage = decode(&route_message(
            7,
            &Route {
                source: Some("fd00::5".parse().unwrap()),
                metric: 100,
                ..route("fd00:1::", 64, None)
            },
        ));
        assert_eq!(on_link.header.address_family, AddressFamily::Inet6);
        assert_eq!(on_link.header.destination_prefix_length, 64);
        assert_eq!(on_link.header.scope, RouteScope::Link);
        assert_eq!(
            on_link.attributes,
            [
                RouteAttribute::Destination(RouteAddress::Inet6("fd00:1::".parse().unwrap())),
                RouteAttribute::PrefSource(RouteAddress::Inet6("fd00::5".parse().unwrap())),
                RouteAttribute::Priority(100),
                RouteAttribute::Oif(7),
            ]
        );
    }

    #[test]
    fn link_messages_change_only_what_they_name() {
        let down: LinkMessage = decode(&link_flags(3, false));
        assert_eq!(down.header.index, 3);
        assert_eq!(down.header.change_mask, LinkFlags::Up);
        assert_eq!(down.header.flags, LinkFlags::empty());
        assert!(down.attributes.is_empty());
        let up: LinkMessage = decode(&link_flags(3, true));
        assert_eq!(
            (up.header.flags, up.header.change_mask),
            (LinkFlags::Up, LinkFlags::Up)
        );

        let mac: LinkMessage = decode(&set_mac(3, &MAC));
        assert_eq!(mac.header.change_mask, LinkFlags::empty());
        assert_eq!(mac.attributes, [LinkAttribute::Address(MAC.to_vec())]);
        let mtu: LinkMessage = decode(&set_mtu(3, 1450));
        assert_eq!(mtu.attributes, [LinkAttribute::Mtu(1450)]);
        let name: LinkMessage = decode(&set_name(3, "eth0"));
        assert_eq!(name.attributes, [LinkAttribute::IfName("eth0".into())]);
    }

    #[test]
    fn link_discovery_reads_index_name_type_and_flags_from_the_kernels_message() {
        let mut msg = LinkMessage::default();
        msg.header.index = 3;
        msg.header.link_layer_type = LinkLayerType::Ether;
        msg.header.flags = LinkFlags::Broadcast | LinkFlags::Multicast;
        msg.attributes = vec![
            LinkAttribute::Mtu(1500),
            LinkAttribute::IfName("eth0".into()),
            LinkAttribute::TxQueueLen(1000),
        ];
        let mut bytes = vec![0; msg.buffer_len()];
        msg.emit(&mut bytes);
        assert_eq!(
            Link::parse(&bytes).unwrap(),
            link(3, "eth0", LinkLayerType::Ether, msg.header.flags)
        );
        msg.attributes
            .retain(|a| !matches!(a, LinkAttribute::IfName(_)));
        let mut bytes = vec![0; msg.buffer_len()];
        msg.emit(&mut bytes);
        assert_eq!(Link::parse(&bytes).unwrap().name, "#3");
        assert!(Link::parse(&bytes[..10]).is_err());
    }

    /// One netlink message as the kernel lays it out, padded to 4 bytes.
    fn nlmsg(message_type: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend((16 + payload.len() as u32).to_ne_bytes());
        bytes.extend(message_type.to_ne_bytes());
        bytes.extend(flags.to_ne_bytes());
        bytes.extend(seq.to_ne_bytes());
        bytes.extend(0u32.to_ne_bytes());
        bytes.extend(payload);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    /// An `NLMSG_ERROR` payload: the code, then the request's header.
    fn error_payload(code: i32) -> Vec<u8> {
        let mut payload = code.to_ne_bytes().to_vec();
        payload.extend(nlmsg(libc::RTM_NEWROUTE, 0, 1, &[]));
        payload
    }

    #[test]
    fn datagrams_split_into_acks_errnos_objects_and_done() {
        let mut datagram = nlmsg(NLMSG_ERROR, 0, 1, &error_payload(0));
        datagram.extend(nlmsg(NLMSG_ERROR, 0, 2, &error_payload(-libc::ENETUNREACH)));
        datagram.extend(nlmsg(libc::RTM_NEWLINK, NLM_F_DUMP_INTR, 3, &[1, 2, 3]));
        datagram.extend(nlmsg(NLMSG_DONE, 0, 3, &0i32.to_ne_bytes()));
        datagram.extend(nlmsg(NLMSG_DONE, 0, 4, &(-libc::EBUSY).to_ne_bytes()));
        let messages = parse_datagram(&datagram).unwrap();
        let summary: Vec<String> = messages
            .iter()
            .map(|m| format!("{} {} {:?}", m.seq, m.flags, m.answer))
            .collect();
        assert_eq!(
            summary,
            [
                "1 0 Ack(None)".to_string(),
                format!("2 0 Ack(Some({:?}))", io::Error::from_raw_os_error(101)),
                "3 16 Object { message_type: 16, payload: [1, 2, 3] }".into(),
                "3 0 Done".into(),
                format!("4 0 Ack(Some({:?}))", io::Error::from_raw_os_error(16)),
            ]
        );
    }

    #[test]
    fn a_message_longer_than_its_datagram_is_malformed_not_read_past() {
        let mut datagram = nlmsg(libc::RTM_NEWLINK, 0, 1, &[0; 8]);
        datagram.truncate(20);
        let err = parse_datagram(&datagram).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().starts_with("malformed netlink answer: "),
            "{err}"
        );
        let short_error = nlmsg(NLMSG_ERROR, 0, 1, &[0; 2]);
        assert!(parse_datagram(&short_error).is_err());
    }

    // ---- Against the real kernel, in network namespaces of their own ----

    /// Runs `f` on a thread of its own moved into a new network namespace,
    /// which goes away with the thread; the test's process stays where it
    /// is. None (after saying why) when this host does not allow it.
    fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
        if !nix::unistd::geteuid().is_root() {
            crate::test_skip::skipped("needs root to create network namespaces");
            return None;
        }
        let outcome = std::thread::scope(|s| {
            s.spawn(|| nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map(|()| f()))
                .join()
        });
        match outcome {
            Ok(Ok(value)) => Some(value),
            Ok(Err(errno)) => {
                crate::test_skip::skipped(&format!("unshare(CLONE_NEWNET): {errno}"));
                None
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn veth(name: &str, peer: LinkMessage) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        msg
    }

    fn named(name: &str) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg
    }

    fn index_of(rtnl: &mut Rtnl, name: &str) -> u32 {
        let links = rtnl.links().unwrap();
        links.iter().find(|l| l.name == name).unwrap().index
    }

    /// The guest's virtio-net interface as a veth named `jv0` in the
    /// calling thread's namespace, with its peer up in a second namespace
    /// (so it has a carrier and is the only Ethernet link here). The peer's
    /// namespace lives as long as the returned handle.
    fn fake_nic() -> File {
        use nix::sched::{setns, unshare, CloneFlags};
        let here = File::open("/proc/thread-self/ns/net").unwrap();
        unshare(CloneFlags::CLONE_NEWNET).unwrap();
        let peer_ns = File::open("/proc/thread-self/ns/net").unwrap();
        let mut peer_rtnl = Rtnl::open().unwrap();
        setns(&here, CloneFlags::CLONE_NEWNET).unwrap();

        let mut peer = named("jvpeer");
        peer.attributes
            .push(LinkAttribute::NetNsFd(peer_ns.as_raw_fd()));
        let veth = veth("jv0", peer);
        Rtnl::open()
            .unwrap()
            .create(libc::RTM_NEWLINK, &veth)
            .unwrap();
        let index = index_of(&mut peer_rtnl, "jvpeer");
        peer_rtnl.set_link(link_flags(index, true)).unwrap();
        peer_ns
    }

    /// Every object of a dump, decoded in full (unlike `Rtnl::links`).
    fn dump<T: Default + Parseable<[u8]> + Emitable>(
        rtnl: &mut Rtnl,
        get: u16,
        new: u16,
    ) -> Vec<T> {
        let objects = rtnl.dump(get, &T::default()).unwrap();
        objects
            .iter()
            .filter(|(message_type, _)| *message_type == new)
            .map(|(_, payload)| T::parse(payload).unwrap())
            .collect()
    }

    fn ip(address: &RouteAddress) -> IpAddr {
        match address {
            RouteAddress::Inet(a) => IpAddr::V4(*a),
            RouteAddress::Inet6(a) => IpAddr::V6(*a),
            other => panic!("not an IP address: {other:?}"),
        }
    }

    /// `ip route`-like lines of the main table's routes through `index`.
    fn routes_through(rtnl: &mut Rtnl, index: u32) -> Vec<String> {
        let mut lines = Vec::new();
        for route in dump::<RouteMessage>(rtnl, libc::RTM_GETROUTE, libc::RTM_NEWROUTE) {
            let attrs = &route.attributes;
            if route.header.table != RouteHeader::RT_TABLE_MAIN
                || !attrs.contains(&RouteAttribute::Oif(index))
            {
                continue;
            }
            let mut line = match attrs.iter().find_map(|a| match a {
                RouteAttribute::Destination(d) => Some(ip(d)),
                _ => None,
            }) {
                Some(dst) => format!("{dst}/{}", route.header.destination_prefix_length),
                None if route.header.address_family == AddressFamily::Inet => "0.0.0.0/0".into(),
                None => "::/0".into(),
            };
            // In `ip route`'s order, whatever the kernel's.
            for attr in attrs {
                if let RouteAttribute::Gateway(g) = attr {
                    line += &format!(" via {}", ip(g));
                }
            }
            for attr in attrs {
                if let RouteAttribute::PrefSource(s) = attr {
                    line += &format!(" src {}", ip(s));
                }
            }
            for attr in attrs {
                if let RouteAttribute::Priority(p) = attr {
                    line += &format!(" metric {p}");
                }
            }
            if route.header.scope == RouteScope::Link {
                line += " scope link";
            }
            lines.push(line);
        }
        lines
    }

    /// Address, prefix length and flags of each address on `index`.
    fn addresses_on(rtnl: &mut Rtnl, index: u32) -> Vec<(IpAddr, u8, AddressFlags)> {
        let mut found = Vec::new();
        for addr in dump::<AddressMessage>(rtnl, libc::RTM_GETADDR, libc::RTM_NEWADDR) {
            if addr.header.index != index {
                continue;
            }
            let mut ip = None;
            let mut flags = AddressFlags::from_bits_retain(addr.header.flags.bits().into());
            for attr in &addr.attributes {
                match attr {
                    AddressAttribute::Address(a) => ip = Some(*a),
                    AddressAttribute::Flags(f) => flags = *f,
                    _ => {}
                }
            }
            found.push((ip.unwrap(), addr.header.prefix_len, flags));
        }
        found
    }

    fn link_message(rtnl: &mut Rtnl, index: u32) -> LinkMessage {
        dump::<LinkMessage>(rtnl, libc::RTM_GETLINK, libc::RTM_NEWLINK)
            .into_iter()
            .find(|l| l.header.index == index)
            .unwrap()
    }

    #[test]
    fn configure_gives_the_interface_the_pods_mac_mtu_name_addresses_and_routes() {
        in_new_netns(|| {
            let _peer_ns = fake_nic();
            let mut rtnl = Rtnl::open().unwrap();
            let index = index_of(&mut rtnl, "jv0");

            configure(&pod_network()).unwrap();

            let link = link_message(&mut rtnl, index);
            let attrs = &link.attributes;
            assert!(
                attrs.contains(&LinkAttribute::IfName("eth0".into())),
                "{attrs:?}"
            );
            assert!(
                attrs.contains(&LinkAttribute::Address(MAC.to_vec())),
                "{attrs:?}"
            );
            assert!(attrs.contains(&LinkAttribute::Mtu(1450)), "{attrs:?}");
            assert!(link.header.flags.contains(LinkFlags::Up));
            let lo_index = index_of(&mut rtnl, "lo");
            let lo = link_message(&mut rtnl, lo_index);
            assert!(lo.header.flags.contains(LinkFlags::Up));

            let addresses = addresses_on(&mut rtnl, index);
            let v4 = IpAddr::V4(Ipv4Addr::new(10, 88, 0, 5));
            assert!(
                addresses.iter().any(|a| (a.0, a.1) == (v4, 16)),
                "{addresses:?}"
            );
            let v6: IpAddr = "fd00:88::5".parse::<Ipv6Addr>().unwrap().into();
            let (_, _, flags) = addresses
                .iter()
                .find(|a| (a.0, a.1) == (v6, 64))
                .unwrap_or_else(|| panic!("no fd00:88::5/64 in {addresses:?}"));
            assert!(flags.contains(AddressFlags::Nodad), "{flags:?}");
            assert!(!flags.contains(AddressFlags::Tentative), "{flags:?}");

            let routes = routes_through(&mut rtnl, index);
            for expected in [
                "0.0.0.0/0 via 169.254.1.1",
                "169.254.1.1/32 scope link",
                "192.168.50.0/24 via 10.88.0.1 src 10.88.0.5 metric 100",
                "::/0 via fe80::1 metric 1024",
            ] {
                assert!(
                    routes.iter().any(|r| r == expected),
                    "{expected} in {routes:?}"
                );
            }
        });
    }

    #[test]
    fn a_route_the_kernel_refuses_fails_naming_route_interface_and_errno() {
        in_new_netns(|| {
            let _peer_ns = fake_nic();
            let mut network = pod_network();
            network.routes = vec![route("0.0.0.0", 0, Some("192.0.2.1"))];
            let err = configure(&network).unwrap_err();
            assert_eq!(
                err.to_string(),
                "adding route 0.0.0.0/0 via 192.0.2.1 dev eth0: \
                 Network is unreachable (os error 101)"
            );
        });
    }

    #[test]
    fn configure_refuses_a_namespace_without_exactly_one_ethernet_link() {
        in_new_netns(|| {
            let err = configure(&pod_network()).unwrap_err();
            assert_eq!(err.to_string(), "no Ethernet interface besides lo");

            let mut rtnl = Rtnl::open().unwrap();
            rtnl.create(libc::RTM_NEWLINK, &veth("jva", named("jvb")))
                .unwrap();
            let err = configure(&pod_network()).unwrap_err();
            assert!(
                matches!(&err, NetworkError::ManyInterfaces(names) if names.len() == 2),
                "{err}"
            );
            // Nothing was changed: neither end was renamed or brought up.
            for name in ["jva", "jvb"] {
                let index = index_of(&mut rtnl, name);
                let link = link_message(&mut rtnl, index);
                assert!(!link.header.flags.contains(LinkFlags::Up), "{name}");
            }
        });
    }
}
