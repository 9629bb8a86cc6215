//! The pod network on real network namespaces, veth pairs and taps (root),
//! and the choices it makes from netlink dumps.

use super::settings::{choose_interface, guest_routes, Choice, LinkInfo};
use super::*;
use jevm_protocol::{IpNet, Route};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
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
