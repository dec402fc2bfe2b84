//! HDHomeRun discovery frames (UDP port 65001), encoded and decoded here.
//!
//! Source of the framing: SiliconDust's libhdhomerun, `hdhomerun_pkt.h` (the format comment and the tag and
//! type numbers) and `hdhomerun_pkt.c` (`hdhomerun_pkt_seal_frame`, `hdhomerun_pkt_open_frame`,
//! `hdhomerun_pkt_read_var_length`), github.com/Silicondust/libhdhomerun:
//! - `u16` packet type, big-endian: 0x0002 discover request, 0x0003 discover reply;
//! - `u16` payload length, big-endian;
//! - the payload, a sequence of TLVs: `u8` tag, a length of one byte (0..=127) or two bytes (the low 7 bits
//!   with 0x80 set, then the length shifted down by 7), the value;
//! - a CRC-32 (Ethernet/zlib polynomial) of everything before it, little-endian.
//!
//! A request carries DEVICE_TYPE and DEVICE_ID (both the wildcard 0xFFFFFFFF: every device of every type).
//! A reply carries DEVICE_TYPE, DEVICE_ID, TUNER_COUNT and, on current firmware, BASE_URL; unknown tags are
//! skipped, as libhdhomerun says they must be.

pub(crate) const PORT: u16 = 65001;
pub(crate) const TYPE_DISCOVER_REQ: u16 = 0x0002;
pub(crate) const TYPE_DISCOVER_RPY: u16 = 0x0003;
pub(crate) const TAG_DEVICE_TYPE: u8 = 0x01;
pub(crate) const TAG_DEVICE_ID: u8 = 0x02;
pub(crate) const TAG_TUNER_COUNT: u8 = 0x10;
pub(crate) const TAG_BASE_URL: u8 = 0x2A;
pub(crate) const WILDCARD: u32 = 0xFFFF_FFFF;

/// Payloads are at most 1452 bytes (`HDHOMERUN_MAX_PAYLOAD_SIZE`); TLV lengths fit in two bytes.
const MAX_TLV_LEN: usize = 0x3FFF;

fn push_tlv(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    let len = value.len().min(MAX_TLV_LEN);
    out.push(tag);
    if len <= 127 {
        out.push(len as u8);
    } else {
        out.push((len & 0x7F) as u8 | 0x80);
        out.push((len >> 7) as u8);
    }
    out.extend_from_slice(&value[..len]);
}

/// Header, payload and CRC: `hdhomerun_pkt_seal_frame`.
pub(crate) fn seal(packet_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&packet_type.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The discovery request for every device of every type.
pub(crate) fn discover_request() -> Vec<u8> {
    let mut payload = Vec::with_capacity(12);
    push_tlv(&mut payload, TAG_DEVICE_TYPE, &WILDCARD.to_be_bytes());
    push_tlv(&mut payload, TAG_DEVICE_ID, &WILDCARD.to_be_bytes());
    seal(TYPE_DISCOVER_REQ, &payload)
}

/// A well-formed frame's type and payload (length and CRC checked), else `None`.
pub(crate) fn open(frame: &[u8]) -> Option<(u16, &[u8])> {
    if frame.len() < 8 {
        return None;
    }
    let packet_type = u16::from_be_bytes([frame[0], frame[1]]);
    let len = u16::from_be_bytes([frame[2], frame[3]]) as usize;
    let body = frame.get(..4 + len)?;
    let crc = frame.get(4 + len..8 + len)?;
    (crc32fast::hash(body).to_le_bytes() == crc).then(|| (packet_type, &body[4..]))
}

/// The TLVs of a payload; a truncated one ends the list.
pub(crate) fn tlvs(payload: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 2 <= payload.len() {
        let tag = payload[pos];
        let mut len = payload[pos + 1] as usize;
        pos += 2;
        if len & 0x80 != 0 {
            let Some(hi) = payload.get(pos) else { break };
            len = (len & 0x7F) | ((*hi as usize) << 7);
            pos += 1;
        }
        let Some(value) = payload.get(pos..pos + len) else { break };
        out.push((tag, value));
        pos += len;
    }
    out
}

/// What one discovery reply says about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    pub device_type: Option<u32>,
    pub device_id: u32,
    pub tuner_count: Option<u8>,
    pub base_url: Option<String>,
}

/// A discover reply with a device id, else `None` (requests, other packet types, bad CRCs).
pub(crate) fn parse_reply(frame: &[u8]) -> Option<Reply> {
    let (packet_type, payload) = open(frame)?;
    if packet_type != TYPE_DISCOVER_RPY {
        return None;
    }
    let u32_of = |v: &[u8]| v.try_into().ok().map(u32::from_be_bytes);
    let mut reply = Reply { device_type: None, device_id: 0, tuner_count: None, base_url: None };
    let mut id = None;
    for (tag, value) in tlvs(payload) {
        match tag {
            TAG_DEVICE_TYPE => reply.device_type = u32_of(value),
            TAG_DEVICE_ID => id = u32_of(value),
            TAG_TUNER_COUNT => reply.tuner_count = value.first().copied(),
            TAG_BASE_URL => {
                let text = value.split(|b| *b == 0).next().unwrap_or_default();
                reply.base_url = Some(String::from_utf8_lossy(text).into_owned());
            }
            _ => {}
        }
    }
    reply.device_id = id?;
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device type of a tuner (what a real HDHomeRun answers).
    const DEVICE_TYPE_TUNER: u32 = 0x0000_0001;

    /// The request as libhdhomerun builds it, byte for byte (the CRC computed independently with Python's
    /// zlib).
    #[test]
    fn request_bytes() {
        let r = discover_request();
        assert_eq!(
            r[..16],
            [0x00, 0x02, 0x00, 0x0c, 0x01, 0x04, 0xff, 0xff, 0xff, 0xff, 0x02, 0x04, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(r.len(), 20);
        assert_eq!(r[16..], [0x73, 0xcc, 0x7d, 0x8f], "zlib.crc32 of the first 16 bytes is 0x8f7dcc73");
        let (t, payload) = open(&r).unwrap();
        assert_eq!(t, TYPE_DISCOVER_REQ);
        assert_eq!(tlvs(payload), vec![(TAG_DEVICE_TYPE, &[0xff; 4][..]), (TAG_DEVICE_ID, &[0xff; 4][..])]);
    }

    #[test]
    fn replies_parse_and_skip_unknown_tags() {
        let mut p = Vec::new();
        push_tlv(&mut p, TAG_DEVICE_TYPE, &DEVICE_TYPE_TUNER.to_be_bytes());
        push_tlv(&mut p, 0x2B, b"auth");
        push_tlv(&mut p, TAG_DEVICE_ID, &0x1040_CAFCu32.to_be_bytes());
        push_tlv(&mut p, TAG_TUNER_COUNT, &[2]);
        push_tlv(&mut p, TAG_BASE_URL, b"http://192.168.77.2:80");
        let r = parse_reply(&seal(TYPE_DISCOVER_RPY, &p)).unwrap();
        assert_eq!(
            r,
            Reply {
                device_type: Some(1),
                device_id: 0x1040_CAFC,
                tuner_count: Some(2),
                base_url: Some("http://192.168.77.2:80".into())
            }
        );
    }

    #[test]
    fn two_byte_lengths_round_trip() {
        let long = vec![b'x'; 300];
        let mut p = Vec::new();
        push_tlv(&mut p, TAG_BASE_URL, &long);
        assert_eq!(&p[..3], &[TAG_BASE_URL, (300 & 0x7F) as u8 | 0x80, (300 >> 7) as u8]);
        push_tlv(&mut p, TAG_DEVICE_ID, &7u32.to_be_bytes());
        let frame = seal(TYPE_DISCOVER_RPY, &p);
        let r = parse_reply(&frame).unwrap();
        assert_eq!(r.base_url.as_deref().map(str::len), Some(300));
        assert_eq!(r.device_id, 7);
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut r = discover_request();
        assert!(parse_reply(&r).is_none(), "a request is not a reply");
        let last = r.len() - 1;
        r[last] ^= 1;
        assert!(open(&r).is_none(), "bad CRC");
        assert!(open(&r[..6]).is_none(), "short");
        let mut p = Vec::new();
        push_tlv(&mut p, TAG_TUNER_COUNT, &[4]);
        assert!(parse_reply(&seal(TYPE_DISCOVER_RPY, &p)).is_none(), "no device id");
        // A TLV whose length runs past the payload ends the list.
        assert_eq!(tlvs(&[TAG_DEVICE_ID, 9, 1, 2]), vec![]);
    }
}
