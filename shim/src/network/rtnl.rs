//! A blocking rtnetlink socket and the few requests the pod network needs.

use std::io;

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::settings::LinkInfo;

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

pub(super) fn link_message(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m
}

/// A blocking rtnetlink socket in the netns of the thread that opened it.
pub(super) struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    pub(super) fn open() -> io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends `message` with `flags` (and an ACK request) and returns what
    /// the kernel answered before the ACK; an error answer as its errno.
    pub(super) fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        Ok(self.exchange(message, NLM_F_ACK | flags)?.0)
    }

    /// A dump, asked again while the kernel says the table changed under it.
    pub(super) fn dump(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
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
    pub(super) fn exchange(
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
    pub(super) fn link_name(&mut self, index: u32) -> io::Result<Option<String>> {
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
    pub(super) fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
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
    pub(super) fn add_ingress_qdisc(&mut self, index: u32) -> io::Result<()> {
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
    pub(super) fn delete_ingress_qdisc(&mut self, index: u32) -> io::Result<()> {
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
    pub(super) fn add_redirect(&mut self, from: u32, to: u32) -> io::Result<()> {
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
