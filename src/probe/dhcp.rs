//! The DHCP client messages of `probe`, built and read with `dhcproto`: DISCOVER, REQUEST and RELEASE out,
//! OFFER, ACK and NAK in. Pure: no I/O here.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};

use crate::names::MacAddr;

/// BOOTP's minimum message size; some relays drop shorter requests, so requests are padded to it.
const MIN_SIZE: usize = dhcproto::v4::MIN_PACKET_SIZE;

fn request_list() -> DhcpOption {
    DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::AddressLeaseTime,
        OptionCode::ServerIdentifier,
    ])
}

fn encode(msg: &Message) -> Vec<u8> {
    // Encoding into a Vec only fails for values dhcproto itself bounds (chaddr of 6 bytes, our options).
    let mut out = msg.to_vec().unwrap_or_default();
    if out.len() < MIN_SIZE {
        out.resize(MIN_SIZE, 0);
    }
    out
}

fn base(xid: u32, mac: MacAddr, secs: u16, kind: MessageType) -> Message {
    let mut m = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac.0,
    );
    m.set_opcode(Opcode::BootRequest).set_secs(secs).set_flags(Flags::default());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m
}

/// DHCPDISCOVER (sent from 0.0.0.0 to the broadcast address).
pub(crate) fn discover(xid: u32, mac: MacAddr, secs: u16) -> Vec<u8> {
    let mut m = base(xid, mac, secs, MessageType::Discover);
    m.opts_mut().insert(request_list());
    encode(&m)
}

/// DHCPREQUEST for an offered address, naming the server that offered it (SELECTING state, broadcast).
pub(crate) fn request(xid: u32, mac: MacAddr, secs: u16, offer: &Offer) -> Vec<u8> {
    let mut m = base(xid, mac, secs, MessageType::Request);
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(offer.address));
    m.opts_mut().insert(DhcpOption::ServerIdentifier(offer.server));
    m.opts_mut().insert(request_list());
    encode(&m)
}

/// DHCPRELEASE of `address` to the server that leased it (unicast from the address itself).
pub(crate) fn release(xid: u32, mac: MacAddr, address: Ipv4Addr, server: Ipv4Addr) -> Vec<u8> {
    let mut m = base(xid, mac, 0, MessageType::Release);
    m.set_ciaddr(address);
    m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    encode(&m)
}

/// What an OFFER or ACK says; `probe --json`'s `dhcp` object as it is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Offer {
    /// The server identifier (option 54), else the IP source of the reply.
    pub server: Ipv4Addr,
    pub address: Ipv4Addr,
    pub prefix_len: Option<u8>,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: Option<u32>,
}

/// A server's answer to us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Offer(Offer),
    Ack(Offer),
    Nak { server: Ipv4Addr, message: Option<String> },
}

/// Read a BOOTREPLY for transaction `xid` and hardware address `mac`; anything else (other clients' replies,
/// requests, other message types, garbage) is `None`. `ip_source` stands in for a missing server identifier.
pub(crate) fn parse_reply(payload: &[u8], xid: u32, mac: MacAddr, ip_source: Ipv4Addr) -> Option<Reply> {
    let m = Message::from_bytes(payload).ok()?;
    if m.opcode() != Opcode::BootReply || m.xid() != xid || m.chaddr().get(..6) != Some(&mac.0[..]) {
        return None;
    }
    let opts = m.opts();
    let server = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => ip_source,
    };
    let offer = || Offer {
        server,
        address: m.yiaddr(),
        prefix_len: match opts.get(OptionCode::SubnetMask) {
            Some(DhcpOption::SubnetMask(mask)) => Some(u32::from(*mask).leading_ones() as u8),
            _ => None,
        },
        router: match opts.get(OptionCode::Router) {
            Some(DhcpOption::Router(r)) => r.first().copied(),
            _ => None,
        },
        dns: match opts.get(OptionCode::DomainNameServer) {
            Some(DhcpOption::DomainNameServer(d)) => d.clone(),
            _ => Vec::new(),
        },
        lease_secs: match opts.get(OptionCode::AddressLeaseTime) {
            Some(DhcpOption::AddressLeaseTime(t)) => Some(*t),
            _ => None,
        },
    };
    match opts.msg_type()? {
        MessageType::Offer => Some(Reply::Offer(offer())),
        MessageType::Ack => Some(Reply::Ack(offer())),
        MessageType::Nak => Some(Reply::Nak {
            server,
            message: match opts.get(OptionCode::Message) {
                Some(DhcpOption::Message(s)) => Some(s.clone()),
                _ => None,
            },
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);

    fn server_reply(kind: MessageType, xid: u32, chaddr: &[u8]) -> Vec<u8> {
        let mut m = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(192, 168, 77, 53),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            chaddr,
        );
        m.set_opcode(Opcode::BootReply);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 168, 77, 1)));
        o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        o.insert(DhcpOption::Router(vec![Ipv4Addr::new(192, 168, 77, 1)]));
        o.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(192, 168, 77, 1), Ipv4Addr::new(9, 9, 9, 9)]));
        o.insert(DhcpOption::AddressLeaseTime(3600));
        m.to_vec().unwrap()
    }

    #[test]
    fn requests_carry_what_servers_need() {
        let d = Message::from_bytes(&discover(7, MAC, 2)).unwrap();
        assert_eq!(d.xid(), 7);
        assert_eq!(d.secs(), 2);
        assert_eq!(d.chaddr(), &MAC.0);
        assert_eq!(d.opts().msg_type(), Some(MessageType::Discover));
        assert!(d.opts().get(OptionCode::ParameterRequestList).is_some());
        assert!(discover(7, MAC, 0).len() >= 300);

        let offer = Offer {
            server: Ipv4Addr::new(192, 168, 77, 1),
            address: Ipv4Addr::new(192, 168, 77, 53),
            prefix_len: Some(24),
            router: None,
            dns: vec![],
            lease_secs: None,
        };
        let r = Message::from_bytes(&request(7, MAC, 0, &offer)).unwrap();
        assert_eq!(r.opts().msg_type(), Some(MessageType::Request));
        assert_eq!(r.opts().get(OptionCode::RequestedIpAddress), Some(&DhcpOption::RequestedIpAddress(offer.address)));
        assert_eq!(r.opts().get(OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(offer.server)));
        assert_eq!(r.ciaddr(), Ipv4Addr::UNSPECIFIED);

        let rel = Message::from_bytes(&release(8, MAC, offer.address, offer.server)).unwrap();
        assert_eq!(rel.opts().msg_type(), Some(MessageType::Release));
        assert_eq!(rel.ciaddr(), offer.address);
        assert_eq!(rel.opts().get(OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(offer.server)));
    }

    #[test]
    fn offers_and_acks_are_read() {
        let src = Ipv4Addr::new(10, 0, 0, 1);
        let want = Offer {
            server: Ipv4Addr::new(192, 168, 77, 1),
            address: Ipv4Addr::new(192, 168, 77, 53),
            prefix_len: Some(24),
            router: Some(Ipv4Addr::new(192, 168, 77, 1)),
            dns: vec![Ipv4Addr::new(192, 168, 77, 1), Ipv4Addr::new(9, 9, 9, 9)],
            lease_secs: Some(3600),
        };
        let o = parse_reply(&server_reply(MessageType::Offer, 5, &MAC.0), 5, MAC, src);
        assert_eq!(o, Some(Reply::Offer(want.clone())));
        let a = parse_reply(&server_reply(MessageType::Ack, 5, &MAC.0), 5, MAC, src);
        assert_eq!(a, Some(Reply::Ack(want)));
        assert!(matches!(
            parse_reply(&server_reply(MessageType::Nak, 5, &MAC.0), 5, MAC, src),
            Some(Reply::Nak { server, .. }) if server == Ipv4Addr::new(192, 168, 77, 1)
        ));
    }

    #[test]
    fn other_clients_and_transactions_are_ignored() {
        let src = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(parse_reply(&server_reply(MessageType::Offer, 6, &MAC.0), 5, MAC, src), None, "other xid");
        let other = [0x52, 0x54, 0, 0, 0, 1];
        assert_eq!(parse_reply(&server_reply(MessageType::Offer, 5, &other), 5, MAC, src), None, "other MAC");
        assert_eq!(parse_reply(&discover(5, MAC, 0), 5, MAC, src), None, "a request is no reply");
        assert_eq!(parse_reply(b"garbage", 5, MAC, src), None);
    }
}
