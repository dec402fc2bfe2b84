//! Link operations over rtnetlink: reading links, building the macvtap messages, creating and deleting.
//!
//! Message building is pure (`new_macvtap_message`, `configure_message`) so it is unit-tested without root;
//! the async functions do the I/O on a [`Netlink`] connection.

use futures::TryStreamExt;
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoMacVtap, LinkAttribute, LinkExtentMask,
    LinkFlags, LinkInfo, LinkLayerType, LinkMessage, MacVtapMode,
};
use rtnetlink::packet_core::DecodeError;
use rtnetlink::{Handle, LinkMacVtap, LinkUnspec};

use crate::error::{Error, Result};
use crate::names::{IfName, MacAddr, MacvtapMode, OWNER_MARKER};

/// A netlink connection with its own current-thread runtime, for the thread (and namespace) it was made on.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    pub handle: Handle,
}

impl Netlink {
    pub fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the netlink runtime", e))?;
        let _guard = rt.enter();
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| Error::io("open a netlink socket", e))?;
        rt.spawn(connection);
        Ok(Netlink { rt, handle })
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

/// What we read back about a link, independent of the wire format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkView {
    pub name: String,
    pub ifindex: u32,
    pub kind: Option<String>,
    pub parent_ifindex: Option<u32>,
    pub mode: Option<MacvtapMode>,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u32>,
    pub up: bool,
    pub carrier: bool,
    pub loopback: bool,
    pub alias: Option<String>,
    pub link_layer: LinkLayerType,
    /// The bridge, bond or other controller this link is a port of.
    pub controller: Option<u32>,
    /// Set when `parent_ifindex` refers to a link in another namespace.
    pub link_netnsid: Option<i32>,
}

impl LinkView {
    pub fn from_message(msg: &LinkMessage) -> Self {
        let mut v = LinkView {
            name: String::new(),
            ifindex: msg.header.index,
            kind: None,
            parent_ifindex: None,
            mode: None,
            mac: None,
            mtu: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            carrier: msg.header.flags.contains(LinkFlags::LowerUp),
            loopback: msg.header.flags.contains(LinkFlags::Loopback),
            alias: None,
            link_layer: msg.header.link_layer_type,
            controller: None,
            link_netnsid: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => v.name = n.clone(),
                LinkAttribute::Address(a) => v.mac = MacAddr::from_slice(a),
                LinkAttribute::Mtu(m) => v.mtu = Some(*m),
                LinkAttribute::Link(p) => v.parent_ifindex = Some(*p),
                LinkAttribute::IfAlias(a) => v.alias = Some(a.clone()),
                LinkAttribute::Carrier(c) => v.carrier = *c != 0,
                LinkAttribute::Controller(c) => v.controller = Some(*c),
                LinkAttribute::LinkNetNsId(n) => v.link_netnsid = Some(*n),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => v.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::MacVtap(d)) => v.mode = mode_of_macvtap(d),
                            LinkInfo::Data(InfoData::MacVlan(d)) => {
                                v.mode = d.iter().find_map(|i| match i {
                                    netlink_packet_route::link::InfoMacVlan::Mode(m) => mode_from_wire(*m),
                                    _ => None,
                                })
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        v
    }

    /// One line for logs: `#INDEX KIND [MODE] on #PARENT MAC up|down [ours]`.
    pub fn summary(&self) -> String {
        let mut s = format!("#{} {}", self.ifindex, self.kind.as_deref().unwrap_or("device"));
        if let Some(m) = self.mode {
            s.push_str(&format!(" {m}"));
        }
        if let Some(p) = self.parent_ifindex {
            s.push_str(&format!(" on #{p}"));
        }
        if let Some(mac) = self.mac {
            s.push_str(&format!(" {mac}"));
        }
        s.push_str(if self.up { " up" } else { " down" });
        if self.owned() {
            s.push_str(" ours");
        }
        s
    }

    pub fn is_macvtap(&self) -> bool {
        self.kind.as_deref() == Some("macvtap")
    }

    pub fn is_macvlan_family(&self) -> bool {
        matches!(self.kind.as_deref(), Some("macvtap" | "macvlan"))
    }

    /// Created by ec-macvtap: the alias carries our marker.
    pub fn owned(&self) -> bool {
        self.alias.as_deref().is_some_and(|a| a == OWNER_MARKER || a.starts_with(&format!("{OWNER_MARKER} ")))
    }
}

fn mode_of_macvtap(d: &[InfoMacVtap]) -> Option<MacvtapMode> {
    d.iter().find_map(|i| match i {
        InfoMacVtap::Mode(m) => mode_from_wire(*m),
        _ => None,
    })
}

fn mode_from_wire(m: MacVtapMode) -> Option<MacvtapMode> {
    match m {
        MacVtapMode::Bridge => Some(MacvtapMode::Bridge),
        MacVtapMode::Vepa => Some(MacvtapMode::Vepa),
        MacVtapMode::Private => Some(MacvtapMode::Private),
        MacVtapMode::Passthrough => Some(MacvtapMode::Passthru),
        _ => None,
    }
}

fn mode_to_wire(m: MacvtapMode) -> MacVtapMode {
    match m {
        MacvtapMode::Bridge => MacVtapMode::Bridge,
        MacvtapMode::Vepa => MacVtapMode::Vepa,
        MacvtapMode::Private => MacVtapMode::Private,
        MacvtapMode::Passthru => MacVtapMode::Passthrough,
    }
}

/// What the macvtap should look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MacvtapSpec {
    pub name: IfName,
    pub parent: IfName,
    pub mode: MacvtapMode,
    pub mac: MacAddr,
    pub mtu: Option<u32>,
}

/// RTM_NEWLINK for the macvtap, created down (the alias and IPv6 mode are set before it goes up).
pub fn new_macvtap_message(spec: &MacvtapSpec, parent_ifindex: u32) -> LinkMessage {
    let mut b =
        LinkMacVtap::new(spec.name.as_str(), parent_ifindex, mode_to_wire(spec.mode)).address(spec.mac.0.to_vec());
    if let Some(mtu) = spec.mtu {
        b = b.mtu(mtu);
    }
    b.build()
}

/// The name a link has between its creation and [`finish_message`]: derived from the final name, so a run
/// that was killed in between leaves a link the next `create` or `delete` of that name finds and removes.
/// `ect` plus 48 bits of FNV-1a: 15 bytes, and a different name for every name in practice.
pub fn temporary_name(name: &IfName) -> IfName {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name.as_str().as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let s = format!("ect{:012x}", hash & 0xffff_ffff_ffff);
    // Always valid: 15 ASCII bytes, letters and digits only.
    IfName::from_valid(s)
}

/// One RTM_SETLINK that gives the new link its final name, marks it as ours and keeps the host from
/// configuring IPv6 on it. The kernel processes it in one request, so a SIGKILL cannot split it: a link is
/// either still under its temporary name or named and marked.
/// (The kernel ignores IFLA_IFALIAS and refuses IFLA_AF_SPEC in RTM_NEWLINK, hence a second message.)
pub fn finish_message(ifindex: u32, name: &IfName, ipv6: bool) -> LinkMessage {
    let mut b = LinkUnspec::new_with_index(ifindex).name(name.as_str()).alias(OWNER_MARKER);
    if ipv6 {
        b = b.append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![
            AfSpecInet6::AddrGenMode(In6AddrGenMode::None),
        ])]));
    }
    b.build()
}

/// RTM_SETLINK that brings the link up with allmulticast (SSDP, mDNS and IPv6 ND need it).
pub fn up_message(ifindex: u32) -> LinkMessage {
    LinkUnspec::new_with_index(ifindex).allmulticast(true).up().build()
}

/// Look a link up by name; a missing link (ENODEV) is `Ok(None)`.
pub async fn get_by_name(handle: &Handle, name: &IfName) -> Result<Option<LinkView>> {
    let found = first_link(handle.link().get().match_name(name.as_str()), || format!("look up link \"{name}\"")).await;
    log_lookup(&format!("\"{name}\""), &found);
    found
}

pub async fn get_by_index(handle: &Handle, ifindex: u32) -> Result<Option<LinkView>> {
    let found = first_link(handle.link().get().match_index(ifindex), || format!("look up link #{ifindex}")).await;
    log_lookup(&format!("#{ifindex}"), &found);
    found
}

fn log_lookup(what: &str, found: &Result<Option<LinkView>>) {
    match found {
        Ok(Some(v)) => {
            tracing::debug!("netlink: get link {what}: \"{}\" {}", v.name, v.summary());
            tracing::trace!(
                "netlink: link {what}: mtu {:?}, carrier {}, alias {:?}, controller {:?}, link-netnsid {:?}, {:?}",
                v.mtu,
                v.carrier,
                v.alias,
                v.controller,
                v.link_netnsid,
                v.link_layer
            );
        }
        Ok(None) => tracing::debug!("netlink: get link {what}: absent"),
        Err(e) => tracing::debug!("netlink: get link {what}: {e}"),
    }
}

/// rtnetlink answers a lookup of a missing link with ENODEV, not an empty stream: map that to `None`.
async fn first_link(req: rtnetlink::LinkGetRequest, what: impl FnOnce() -> String) -> Result<Option<LinkView>> {
    match req.execute().try_next().await {
        Ok(msg) => Ok(msg.as_ref().map(LinkView::from_message)),
        Err(rtnetlink::Error::NetlinkError(e)) if -e.raw_code() == nix::errno::Errno::ENODEV as i32 => Ok(None),
        Err(e) => Err(Error::netlink(what(), e)),
    }
}

/// Every link of one kind, filtered by the kernel (as `ip link show type KIND` asks): the cost follows the
/// number of such links, not of all links. Read with a blocking dump on a socket of its own.
///
/// Not through the [`Netlink`] connection: its reader decodes every message of a receive into the request's
/// queue before the caller sees the first, so a thousand fully parsed messages (about 13 KiB each) are alive
/// at once, and the worker thread's heap grows by that much, page fault by page fault. Here one receive
/// buffer is reused and each message becomes a [`LinkView`] and is dropped before the next is parsed.
pub fn dump_kind(kind: InfoKind) -> Result<Vec<LinkView>> {
    use rtnetlink::packet_core::{
        NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
        NetlinkPayload,
    };
    use rtnetlink::packet_route::RouteNetlinkMessage;
    use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

    let what = format!("list {kind} links");
    let io = |e: std::io::Error| Error::io(what.clone(), e);
    let mut req = LinkMessage::default();
    req.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind.clone())]));
    // Counters are not needed here: without them each message is about a third shorter to fill and parse.
    req.attributes.push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::GetLink(req)));
    msg.finalize();
    let mut out = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut out);

    let mut socket = Socket::new(NETLINK_ROUTE).map_err(io)?;
    socket.bind_auto().map_err(io)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    socket.send(&out, 0).map_err(io)?;

    let mut links = Vec::new();
    // The kernel fills a dump receive up to the buffer's size (32 KiB at least), so this takes it whole.
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let undecodable = |e: DecodeError| Error::Runtime(format!("{what}: undecodable reply: {e}"));
    loop {
        buf.clear();
        socket.recv(&mut buf, 0).map_err(io)?;
        let mut offset = 0;
        while offset < buf.len() {
            let msg = NetlinkBuffer::new_checked(&buf[offset..]).map_err(undecodable)?;
            let len = msg.length() as usize;
            match msg.message_type() {
                RTM_NEWLINK => {
                    let v = LinkView::from_message(&parse_link_view_attributes(msg.payload()).map_err(undecodable)?);
                    tracing::trace!("netlink: \"{}\" {}", v.name, v.summary());
                    links.push(v);
                }
                NLMSG_DONE => {
                    tracing::debug!("netlink: {what}: {}", links.len());
                    return Ok(links);
                }
                NLMSG_ERROR => {
                    let code = msg.payload().first_chunk::<4>().map_or(0, |b| i32::from_ne_bytes(*b));
                    if code != 0 {
                        return Err(Error::Netlink { op: what, errno: -code });
                    }
                }
                _ => {}
            }
            if len == 0 {
                return Err(Error::Runtime(format!("{what}: zero-length reply")));
            }
            // Messages start on 4-byte boundaries.
            offset += (len + 3) & !3;
        }
    }
}

/// `RTM_NEWLINK`'s message type (linux/rtnetlink.h).
const RTM_NEWLINK: u16 = 16;

/// The attributes [`LinkView::from_message`] reads (linux/if_link.h): address, name, MTU, link, master, link
/// info, alias, carrier, link netnsid.
const LINK_VIEW_ATTRIBUTES: [u16; 9] = [1, 3, 4, 5, 10, 18, 20, 33, 37];

/// A link message with only the attributes a [`LinkView`] reads. A dump's messages carry some forty
/// attributes (per-family configuration tables, queue and XDP details) that would be parsed into owned values
/// only to be dropped; skipping them halves the parse.
fn parse_link_view_attributes(payload: &[u8]) -> std::result::Result<LinkMessage, DecodeError> {
    use netlink_packet_route::link::LinkHeader;
    use rtnetlink::packet_core::{NlasIterator, ParseableParametrized};
    // The header is 16 bytes (struct ifinfomsg); its attributes follow.
    const LINK_HEADER_LEN: usize = 16;
    let header = LinkHeader::parse(payload)?;
    let mut msg = LinkMessage::default();
    for nla in NlasIterator::new(payload.get(LINK_HEADER_LEN..).unwrap_or_default()) {
        let nla = nla?;
        if LINK_VIEW_ATTRIBUTES.contains(&nla.kind()) {
            msg.attributes.push(LinkAttribute::parse_with_param(&nla, header.interface_family)?);
        }
    }
    msg.header = header;
    Ok(msg)
}

/// Delete by name (for rollback, when the index may not be known); a missing link is fine.
pub async fn delete_by_name(handle: &Handle, name: &IfName) -> Result<()> {
    tracing::debug!("netlink: delete link \"{name}\" by name");
    match handle.link().del_with_message(LinkUnspec::new_with_name(name.as_str()).build()).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if -e.raw_code() == nix::errno::Errno::ENODEV as i32 => Ok(()),
        Err(e) => Err(Error::netlink(format!("delete link \"{name}\""), e)),
    }
}

pub async fn delete(handle: &Handle, ifindex: u32, name: &str) -> Result<()> {
    tracing::debug!("netlink: delete link \"{name}\" (#{ifindex})");
    handle.link().del(ifindex).execute().await.map_err(|e| Error::netlink(format!("delete link \"{name}\""), e))
}

/// Why a parent cannot carry a macvtap, as a one-line reason (None when it can).
pub fn parent_problem(parent: &LinkView, sysfs_wireless: bool) -> Option<String> {
    if parent.loopback || parent.link_layer == LinkLayerType::Loopback {
        return Some("parent is the loopback device (macvtap needs a wired Ethernet parent)".into());
    }
    if parent.is_macvlan_family() {
        return Some(format!(
            "parent is itself a {} (stack the macvtap on the physical NIC instead)",
            parent.kind.as_deref().unwrap_or("macvlan")
        ));
    }
    if sysfs_wireless {
        return Some("parent is a wireless device (macvtap needs a wired parent)".into());
    }
    if parent.link_layer != LinkLayerType::Ether {
        return Some(format!("parent is not an Ethernet device (link type {:?})", parent.link_layer));
    }
    None
}

/// `/sys/class/net/X/wireless` or `phy80211` exists: the parent is Wi-Fi.
pub fn sysfs_is_wireless(name: &str) -> bool {
    is_wireless_under(std::path::Path::new("/sys/class/net"), name)
}

fn is_wireless_under(class_net: &std::path::Path, name: &str) -> bool {
    let base = class_net.join(name);
    base.join("wireless").exists() || base.join("phy80211").exists()
}

/// Differences between an existing link of ours and what is asked, as human-readable items.
pub fn differences(existing: &LinkView, spec: &MacvtapSpec, parent_ifindex: u32) -> Vec<String> {
    let mut out = Vec::new();
    if existing.kind.as_deref() != Some("macvtap") {
        out.push(format!("kind is {} (want macvtap)", existing.kind.as_deref().unwrap_or("unknown")));
    }
    if existing.parent_ifindex != Some(parent_ifindex) {
        out.push(format!("parent is another link (want \"{}\")", spec.parent));
    }
    if existing.mode != Some(spec.mode) {
        let have = existing.mode.map(|m| m.to_string()).unwrap_or_else(|| "unknown".into());
        out.push(format!("mode is {have} (want {})", spec.mode));
    }
    if existing.mac != Some(spec.mac) {
        let have = existing.mac.map(|m| m.to_string()).unwrap_or_else(|| "none".into());
        out.push(format!("MAC is {have} (want {})", spec.mac));
    }
    if let Some(mtu) = spec.mtu
        && existing.mtu != Some(mtu)
    {
        out.push(format!("MTU is {} (want {mtu})", existing.mtu.unwrap_or(0)));
    }
    out
}

/// The link that makes the kernel refuse `mac` on this parent with EADDRINUSE when the macvtap goes up: the
/// parent itself, or another macvlan/macvtap on it that is up with that MAC (the kernel checks only those).
pub fn mac_user<'a>(
    candidates: &'a [LinkView],
    parent: &'a LinkView,
    name: &IfName,
    mac: MacAddr,
) -> Option<&'a LinkView> {
    if parent.mac == Some(mac) {
        return Some(parent);
    }
    candidates.iter().find(|l| {
        l.name != name.as_str()
            && l.up
            && l.mac == Some(mac)
            && l.is_macvlan_family()
            && l.parent_ifindex == Some(parent.ifindex)
            && l.link_netnsid.is_none()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MacvtapSpec {
        MacvtapSpec {
            name: "ec-lan0".parse().unwrap(),
            parent: "eno1".parse().unwrap(),
            mode: MacvtapMode::Bridge,
            mac: "52:54:00:aa:bb:cc".parse().unwrap(),
            mtu: Some(1400),
        }
    }

    #[test]
    fn new_link_message_carries_kind_mode_parent_mac_mtu() {
        let msg = new_macvtap_message(&spec(), 7);
        let v = LinkView::from_message(&msg);
        assert_eq!(v.name, "ec-lan0");
        assert_eq!(v.kind.as_deref(), Some("macvtap"));
        assert_eq!(v.mode, Some(MacvtapMode::Bridge));
        assert_eq!(v.parent_ifindex, Some(7));
        assert_eq!(v.mac, Some(spec().mac));
        assert_eq!(v.mtu, Some(1400));
        assert!(!v.up, "created down: marked before it goes up");
    }

    #[test]
    fn finish_and_up_messages() {
        let name: IfName = "ec-lan0".parse().unwrap();
        let m = finish_message(9, &name, true);
        assert_eq!(m.header.index, 9);
        let v = LinkView::from_message(&m);
        assert!(v.owned());
        assert_eq!(v.name, "ec-lan0", "renamed and marked in the same request");
        assert!(m.attributes.iter().any(|a| matches!(a, LinkAttribute::AfSpecUnspec(_))));
        assert!(
            !finish_message(9, &name, false).attributes.iter().any(|a| matches!(a, LinkAttribute::AfSpecUnspec(_)))
        );
        let u = up_message(9);
        assert!(u.header.flags.contains(LinkFlags::Up | LinkFlags::Allmulti));
        assert!(u.header.change_mask.contains(LinkFlags::Up | LinkFlags::Allmulti));
    }

    #[test]
    fn temporary_names_are_valid_distinct_and_stable() {
        let a = temporary_name(&"ec-lan0".parse().unwrap());
        let b = temporary_name(&"ec-lan1".parse().unwrap());
        assert_eq!(a.as_str().len(), 15);
        assert!(a.as_str().parse::<IfName>().is_ok());
        assert_ne!(a, b);
        assert_eq!(a, temporary_name(&"ec-lan0".parse().unwrap()));
        assert_eq!(a.as_str(), "ect8a673023d845", "golden: a killed run's leftover must be found by the next one");
    }

    fn view(name: &str, idx: u32, kind: Option<&str>, parent: Option<u32>, mac: &str) -> LinkView {
        LinkView {
            name: name.into(),
            ifindex: idx,
            kind: kind.map(str::to_owned),
            parent_ifindex: parent,
            mode: Some(MacvtapMode::Bridge),
            mac: Some(MacAddr::parse_any(mac).unwrap()),
            mtu: Some(1400),
            up: true,
            carrier: true,
            loopback: false,
            alias: Some(OWNER_MARKER.into()),
            link_layer: LinkLayerType::Ether,
            controller: None,
            link_netnsid: None,
        }
    }

    #[test]
    fn differences_and_collisions() {
        let same = view("ec-lan0", 10, Some("macvtap"), Some(7), "52:54:00:aa:bb:cc");
        assert!(differences(&same, &spec(), 7).is_empty());
        let mut other = same.clone();
        other.mode = Some(MacvtapMode::Vepa);
        other.mac = Some(MacAddr::parse_any("52:54:00:aa:bb:cd").unwrap());
        let d = differences(&other, &spec(), 8);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[1].contains("mode is vepa (want bridge)"));

        let parent = view("eno1", 7, None, None, "52:54:00:00:00:01");
        let mut down = view("down", 12, Some("macvtap"), Some(7), "52:54:00:aa:bb:cc");
        down.up = false;
        let links = vec![
            view("ec-lan0", 10, Some("macvtap"), Some(7), "52:54:00:aa:bb:cc"),
            down,
            view("other", 11, Some("macvlan"), Some(7), "52:54:00:aa:bb:cc"),
        ];
        let s = spec();
        assert_eq!(mac_user(&links, &parent, &s.name, s.mac).map(|l| l.name.as_str()), Some("other"));
        let elsewhere = view("eno2", 99, None, None, "52:54:00:00:00:02");
        assert!(mac_user(&links, &elsewhere, &s.name, s.mac).is_none(), "a link on another parent is no collision");
        assert_eq!(
            mac_user(&links[..2], &parent, &s.name, s.mac).map(|l| l.name.as_str()),
            None,
            "our own link and a link that is down do not count: the kernel ignores them"
        );
        let own = MacAddr::parse_any("52:54:00:00:00:01").unwrap();
        assert_eq!(mac_user(&links, &parent, &s.name, own).map(|l| l.name.as_str()), Some("eno1"));
    }

    #[test]
    fn parent_checks() {
        let mut p = view("eno1", 7, None, None, "52:54:00:00:00:01");
        assert_eq!(parent_problem(&p, false), None);
        assert!(parent_problem(&p, true).unwrap().contains("wireless"));
        p.loopback = true;
        assert!(parent_problem(&p, false).unwrap().contains("loopback"));
        let m = view("mv", 8, Some("macvtap"), Some(7), "52:54:00:00:00:02");
        assert!(parent_problem(&m, false).unwrap().contains("itself a macvtap"));
    }

    #[test]
    fn wireless_is_seen_in_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        for (name, marker) in [("wlan0", Some("wireless")), ("wlp2s0", Some("phy80211")), ("eno1", None)] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            if let Some(m) = marker {
                std::fs::create_dir_all(dir.path().join(name).join(m)).unwrap();
            }
        }
        assert!(is_wireless_under(dir.path(), "wlan0"));
        assert!(is_wireless_under(dir.path(), "wlp2s0"));
        assert!(!is_wireless_under(dir.path(), "eno1"));
    }

    #[test]
    fn ownership_marker() {
        let mut v = view("x", 1, Some("macvtap"), Some(2), "52:54:00:00:00:02");
        assert!(v.owned());
        v.alias = Some("somebody else".into());
        assert!(!v.owned());
        v.alias = None;
        assert!(!v.owned());
    }
}
