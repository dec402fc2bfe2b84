#!/usr/bin/env python3
"""A minimal HDHomeRun tuner for the NixOS VM tests and the probe lab: it answers discovery only.

It listens on UDP 65001 on every address (a socket bound to one unicast address would never see
the broadcast requests discovery sends) and answers every discover request (packet type 0x0002)
that asks for a tuner or for any device type, and for our device id or any id, with a discover
reply (type 0x0003) carrying DEVICE_TYPE=tuner, DEVICE_ID, TUNER_COUNT and BASE_URL, sent
unicast to the request's source address and port. With --bind ADDR the reply comes from ADDR
(IP_PKTINFO), so several emulators can stand for several tuners at different addresses of one
interface. Frames follow libhdhomerun's hdhomerun_pkt.c: u16 type, u16 payload length (both
big-endian), TLVs (u8 tag, 1-2 byte length, value), then a CRC-32 (zlib's) of all of that,
little-endian.
"""

import argparse
import ipaddress
import socket
import struct
import sys
import zlib

PORT = 65001
TYPE_DISCOVER_REQ = 0x0002
TYPE_DISCOVER_RPY = 0x0003
TAG_DEVICE_TYPE = 0x01
TAG_DEVICE_ID = 0x02
TAG_TUNER_COUNT = 0x10
TAG_BASE_URL = 0x2A
TAG_MULTI_TYPE = 0x2D
DEVICE_TYPE_TUNER = 0x00000001
WILDCARD = 0xFFFFFFFF
# Linux's IP_PKTINFO (Python's socket module does not export it everywhere).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


def valid_device_id(device_id: int) -> bool:
    """libhdhomerun's hdhomerun_discover_validate_device_id()."""
    table = [0xA, 0x5, 0xF, 0x6, 0x7, 0xC, 0x1, 0xB, 0x9, 0x2, 0x8, 0xD, 0x4, 0x3, 0xE, 0x0]
    checksum = 0
    for shift in (28, 20, 12, 4):
        checksum ^= table[(device_id >> shift) & 0xF]
        checksum ^= (device_id >> (shift - 4)) & 0xF
    return checksum == 0


def tlv(tag: int, value: bytes) -> bytes:
    if len(value) >= 128:
        raise ValueError("value too long for this emulator")
    return bytes([tag, len(value)]) + value


def frame(packet_type: int, payload: bytes) -> bytes:
    head = struct.pack(">HH", packet_type, len(payload)) + payload
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)


def open_frame(packet: bytes):
    """Return (type, payload) of a well-formed frame, else None."""
    if len(packet) < 8:
        return None
    packet_type, length = struct.unpack(">HH", packet[:4])
    if len(packet) < 4 + length + 4:
        return None
    (crc,) = struct.unpack("<I", packet[4 + length : 8 + length])
    if zlib.crc32(packet[: 4 + length]) & 0xFFFFFFFF != crc:
        return None
    return packet_type, packet[4 : 4 + length]


def read_tlvs(payload: bytes):
    pos = 0
    while pos + 2 <= len(payload):
        tag = payload[pos]
        length = payload[pos + 1]
        pos += 2
        if length & 0x80:
            if pos >= len(payload):
                return
            length = (length & 0x7F) | (payload[pos] << 7)
            pos += 1
        if pos + length > len(payload):
            return
        yield tag, payload[pos : pos + length]
        pos += length


def wants_us(payload: bytes, device_id: int) -> bool:
    types = []
    requested_id = WILDCARD
    for tag, value in read_tlvs(payload):
        if tag in (TAG_DEVICE_TYPE, TAG_MULTI_TYPE):
            types += [struct.unpack(">I", value[i : i + 4])[0] for i in range(0, len(value) - 3, 4)]
        elif tag == TAG_DEVICE_ID and len(value) == 4:
            (requested_id,) = struct.unpack(">I", value)
    type_ok = not types or any(t in (DEVICE_TYPE_TUNER, WILDCARD) for t in types)
    return type_ok and requested_id in (WILDCARD, device_id)


def reply_for(device_id: int, tuners: int, source: str) -> bytes:
    return frame(
        TYPE_DISCOVER_RPY,
        tlv(TAG_DEVICE_TYPE, struct.pack(">I", DEVICE_TYPE_TUNER))
        + tlv(TAG_DEVICE_ID, struct.pack(">I", device_id))
        + tlv(TAG_TUNER_COUNT, bytes([tuners]))
        + tlv(TAG_BASE_URL, f"http://{source}:80".encode()),
    )


def pktinfo(ifindex: int, source: str) -> bytes:
    """struct in_pktinfo: the interface and the source address of a reply."""
    return struct.pack("=i4s4s", ifindex, socket.inet_aton(source), bytes(4))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-id", default="1040CAFC", help="8 hex digits (default 1040CAFC)")
    parser.add_argument("--tuners", type=int, default=2)
    parser.add_argument(
        "--bind",
        default="0.0.0.0",
        help="answer from this address (default: the address the kernel picks for each request)",
    )
    args = parser.parse_args()

    device_id = int(args.device_id, 16)
    if not valid_device_id(device_id):
        print(f"device id {device_id:08X} fails libhdhomerun's checksum", file=sys.stderr)
        return 2
    bind = str(ipaddress.IPv4Address(args.bind))
    fixed_source = None if bind == "0.0.0.0" else bind

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    sock.bind(("0.0.0.0", PORT))
    print(f"hdhomerun-emulator: device {device_id:08X} listening on udp 0.0.0.0:{PORT}, answering from {bind}", flush=True)

    while True:
        packet, ancillary, _flags, peer = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        ifindex, local = 0, None
        for level, kind, data in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
                ifindex = struct.unpack("=i", data[:4])[0]
                local = socket.inet_ntoa(data[4:8])  # ipi_spec_dst: the address a reply would come from
        opened = open_frame(packet)
        if opened is None or opened[0] != TYPE_DISCOVER_REQ:
            print(f"hdhomerun-emulator: ignored {len(packet)} bytes from {peer[0]}:{peer[1]}", flush=True)
            continue
        if not wants_us(opened[1], device_id):
            print(f"hdhomerun-emulator: request from {peer[0]} is not for us", flush=True)
            continue
        source = fixed_source or local or "0.0.0.0"
        reply = reply_for(device_id, args.tuners, source)
        if fixed_source:
            sock.sendmsg([reply], [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo(ifindex, fixed_source))], 0, peer)
        else:
            sock.sendto(reply, peer)
        print(f"hdhomerun-emulator: answered {peer[0]}:{peer[1]} from {source} with {device_id:08X}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
