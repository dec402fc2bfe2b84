//! Ethernet, ARP, IPv4, UDP and ICMPv6 frames of `probe`, built and read with `etherparse`. Pure.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{ArpEthIpv4Packet, ArpOperation, LinkSlice, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use etherparse::{Icmpv6Type, icmpv6::Icmpv6PayloadSlice};

use crate::names::MacAddr;

pub(crate) const BROADCAST: MacAddr = MacAddr([0xff; 6]);
const TTL: u8 = 64;

/// Where a frame was sent, by its destination MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cast {
    Broadcast,
    Multicast,
    Unicast,
}

pub(crate) fn cast_of(frame: &[u8]) -> Option<Cast> {
    let dst = frame.get(..6)?;
    Some(if dst == BROADCAST.0 {
        Cast::Broadcast
    } else if dst[0] & 1 == 1 {
        Cast::Multicast
    } else {
        Cast::Unicast
    })
}

/// A UDP datagram in an Ethernet frame.
pub(crate) fn udp(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac.0, dst_mac.0).ipv4(src.octets(), dst.octets(), TTL).udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    // Writing into a Vec fails only for payloads over 64 KiB, which we never build.
    let _ = b.write(&mut out, payload);
    out
}

/// The ARP reply that tells `to_mac`/`to_ip` that `our_ip` is at `our_mac`.
pub(crate) fn arp_reply(our_mac: MacAddr, our_ip: Ipv4Addr, to_mac: MacAddr, to_ip: Ipv4Addr) -> Vec<u8> {
    let arp = ArpEthIpv4Packet {
        operation: ArpOperation::REPLY,
        sender_mac: our_mac.0,
        sender_ipv4: our_ip.octets(),
        target_mac: to_mac.0,
        target_ipv4: to_ip.octets(),
    };
    let b = PacketBuilder::ethernet2(our_mac.0, to_mac.0).arp(arp.into());
    let mut out = Vec::with_capacity(b.size());
    let _ = b.write(&mut out);
    out
}

/// A link-local address of our own for one probe run: fe80:: with a random interface identifier (the
/// universal/local bit clear, as RFC 4291 wants for one that is not from a MAC). A new one each run means an
/// answer to it can only be an answer to this run, never a neighbour-cache leftover of an earlier one.
pub(crate) fn random_link_local(random: u64) -> Ipv6Addr {
    let id = (random & !(0x02u64 << 56)).to_be_bytes();
    Ipv6Addr::from([0xfe, 0x80, 0, 0, 0, 0, 0, 0, id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7]])
}

/// An ICMPv6 echo request from `src` (our link-local address) to all nodes (ff02::1). Every IPv6 host on the
/// segment that receives it must first resolve `src` (a neighbour solicitation for it) before it can answer:
/// either is proof that the segment carries frames from our MAC, with or without any IPv4 service on it.
pub(crate) fn all_nodes_echo(mac: MacAddr, src: Ipv6Addr, id: u16, seq: u16) -> Vec<u8> {
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let b = PacketBuilder::ethernet2(mac.0, [0x33, 0x33, 0, 0, 0, 1])
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6_echo_request(id, seq);
    let payload = b"ec-macvtap probe";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    let _ = b.write(&mut out, payload);
    out
}

/// What `probe` cares about in a received frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Incoming<'a> {
    ArpRequest {
        sender_mac: MacAddr,
        sender_ip: Ipv4Addr,
        target_ip: Ipv4Addr,
    },
    Udp {
        src_mac: MacAddr,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        payload: &'a [u8],
    },
    /// Someone resolving `target` (ours when it answers our echo).
    NeighborSolicitation {
        src_mac: MacAddr,
        target: Ipv6Addr,
    },
    EchoReplyV6 {
        src_mac: MacAddr,
        dst: Ipv6Addr,
        id: u16,
    },
    Other,
}

pub(crate) fn parse(frame: &[u8]) -> Incoming<'_> {
    let Ok(p) = SlicedPacket::from_ethernet(frame) else { return Incoming::Other };
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else { return Incoming::Other };
    let src_mac = MacAddr(eth.source());
    match (&p.net, &p.transport) {
        (Some(NetSlice::Arp(a)), _) => match a.to_packet().try_eth_ipv4() {
            Ok(arp) if arp.operation == ArpOperation::REQUEST => Incoming::ArpRequest {
                sender_mac: MacAddr(arp.sender_mac),
                sender_ip: arp.sender_ipv4_addr(),
                target_ip: arp.target_ipv4_addr(),
            },
            _ => Incoming::Other,
        },
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) => Incoming::Udp {
            src_mac,
            src: ip.header().source_addr(),
            dst: ip.header().destination_addr(),
            sport: u.source_port(),
            dport: u.destination_port(),
            payload: u.payload(),
        },
        (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Icmpv6(icmp))) => match icmp.icmp_type() {
            Icmpv6Type::NeighborSolicitation => match icmp.payload_slice() {
                Ok(Icmpv6PayloadSlice::NeighborSolicitation(ns)) => {
                    Incoming::NeighborSolicitation { src_mac, target: ns.target_address() }
                }
                _ => Incoming::Other,
            },
            Icmpv6Type::EchoReply(echo) => {
                Incoming::EchoReplyV6 { src_mac, dst: ip.header().destination_addr(), id: echo.id }
            }
            _ => Incoming::Other,
        },
        _ => Incoming::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: MacAddr = MacAddr([0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
    const THEM: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 7]);

    #[test]
    fn casts() {
        assert_eq!(cast_of(&[0xff; 14]), Some(Cast::Broadcast));
        assert_eq!(cast_of(&[0x33, 0x33, 0, 0, 0, 1, 0, 0]), Some(Cast::Multicast));
        assert_eq!(cast_of(&[0x01, 0, 0x5e, 0, 0, 1]), Some(Cast::Multicast));
        assert_eq!(cast_of(&US.0), Some(Cast::Unicast));
        assert_eq!(cast_of(&[0xff]), None);
    }

    #[test]
    fn udp_round_trips() {
        let f = udp(US, BROADCAST, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 68, 67, b"hello");
        assert_eq!(&f[..6], &BROADCAST.0);
        assert_eq!(&f[6..12], &US.0);
        assert_eq!(
            parse(&f),
            Incoming::Udp {
                src_mac: US,
                src: Ipv4Addr::UNSPECIFIED,
                dst: Ipv4Addr::BROADCAST,
                sport: 68,
                dport: 67,
                payload: b"hello"
            }
        );
    }

    #[test]
    fn arp_requests_are_read_and_replies_built() {
        let ours = Ipv4Addr::new(192, 168, 77, 53);
        let theirs = Ipv4Addr::new(192, 168, 77, 2);
        let req = ArpEthIpv4Packet {
            operation: ArpOperation::REQUEST,
            sender_mac: THEM.0,
            sender_ipv4: theirs.octets(),
            target_mac: [0; 6],
            target_ipv4: ours.octets(),
        };
        let b = PacketBuilder::ethernet2(THEM.0, BROADCAST.0).arp(req.into());
        let mut frame = Vec::new();
        b.write(&mut frame).unwrap();
        assert_eq!(parse(&frame), Incoming::ArpRequest { sender_mac: THEM, sender_ip: theirs, target_ip: ours });

        let reply = arp_reply(US, ours, THEM, theirs);
        let p = SlicedPacket::from_ethernet(&reply).unwrap();
        let Some(NetSlice::Arp(a)) = p.net else { panic!("not ARP") };
        let a = a.to_packet().try_eth_ipv4().unwrap();
        assert_eq!(a.operation, ArpOperation::REPLY);
        assert_eq!((a.sender_mac, a.sender_ipv4_addr()), (US.0, ours));
        assert_eq!((a.target_mac, a.target_ipv4_addr()), (THEM.0, theirs));
        assert_eq!(&reply[..6], &THEM.0, "unicast back to the asker");
    }

    #[test]
    fn random_link_locals_are_link_local_and_differ() {
        let a = random_link_local(0xffff_ffff_ffff_ffff);
        assert_eq!(a, "fe80::fdff:ffff:ffff:ffff".parse::<Ipv6Addr>().unwrap());
        assert_ne!(random_link_local(1), random_link_local(2));
    }

    #[test]
    fn echo_goes_to_all_nodes() {
        let ll = random_link_local(7);
        let f = all_nodes_echo(US, ll, 9, 1);
        assert_eq!(&f[..6], &[0x33, 0x33, 0, 0, 0, 1]);
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(NetSlice::Ipv6(ip)) = &p.net else { panic!("not IPv6") };
        assert_eq!(ip.header().source_addr(), ll);
        assert_eq!(ip.header().destination_addr(), "ff02::1".parse::<Ipv6Addr>().unwrap());
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else { panic!("not ICMPv6") };
        assert!(matches!(icmp.icmp_type(), Icmpv6Type::EchoRequest(e) if e.id == 9 && e.seq == 1));
    }
}
