//! What `probe` found: the JSON document (its fields are the `--json` contract), the human lines, and the
//! diagnosis that turns missing answers into one line per problem saying what that usually means. Pure.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::Serialize;

use super::dhcp::Offer;
use crate::names::MacAddr;

/// `probe --json`: `{"name", "mac", "dhcp", "tuners", "frames", "ok", "problems"}`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct ProbeReport {
    pub name: String,
    pub mac: MacAddr,
    pub dhcp: Option<Offer>,
    pub tuners: Vec<TunerReport>,
    pub frames: FrameCounts,
    pub ok: bool,
    pub problems: Vec<String>,
    /// For the human output only.
    #[serde(skip)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct TunerReport {
    /// Eight hex digits, as HDHomeRun labels show it.
    pub device_id: String,
    pub address: Ipv4Addr,
    pub tuner_count: Option<u8>,
    /// Discovery replies carry no model number: always null here (the device's `discover.json` has it).
    pub model: Option<String>,
    #[serde(skip)]
    pub base_url: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub(crate) struct FrameCounts {
    pub broadcast: u64,
    pub multicast: u64,
    pub unicast: u64,
}

impl FrameCounts {
    pub(crate) fn total(&self) -> u64 {
        self.broadcast + self.multicast + self.unicast
    }
}

/// Human-output details that are not part of the JSON contract.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Extra {
    pub parent: Option<String>,
    pub elapsed: Duration,
    pub acked: bool,
    pub released: bool,
    pub tuner_source: Option<Ipv4Addr>,
    pub answered_hosts: usize,
}

/// Where the tuner discovery was sent from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SourceAddress {
    Leased(Ipv4Addr),
    LinkLocal(Ipv4Addr),
}

impl SourceAddress {
    pub(crate) fn ip(self) -> Ipv4Addr {
        match self {
            SourceAddress::Leased(a) | SourceAddress::LinkLocal(a) => a,
        }
    }
}

/// Everything the session saw: the input of [`diagnose`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Observed {
    pub parent: Option<String>,
    pub parent_wireless: bool,
    pub link_down: bool,
    pub no_carrier: bool,
    pub dhcp_asked: bool,
    pub discovers: u32,
    pub dhcp_wait: Duration,
    pub offer: Option<Offer>,
    pub requests: u32,
    pub acked: bool,
    pub nak: Option<(Ipv4Addr, Option<String>)>,
    pub released: bool,
    pub tuners_asked: bool,
    pub tuner_source: Option<SourceAddress>,
    pub tuner_requests: u32,
    pub tuner_wait: Duration,
    pub tuners: Vec<TunerReport>,
    pub frames: FrameCounts,
    /// Hosts (by MAC) that reacted to something we sent: proof that the segment carries our frames.
    pub answered: BTreeSet<[u8; 6]>,
    pub interrupted: Option<String>,
    pub io_error: Option<String>,
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 { format!("{s:.0} s") } else { format!("{s:.1} s") }
}

fn plural(n: u32, one: &str) -> String {
    if n == 1 { format!("1 {one}") } else { format!("{n} {one}s") }
}

/// One line per thing that was asked for and got no answer, each with what that usually means.
pub(crate) fn diagnose(o: &Observed) -> Vec<String> {
    let mut out = Vec::new();
    let parent = o.parent.as_deref().unwrap_or("?");
    if let Some(e) = &o.io_error {
        out.push(format!("tap: {e}"));
    }
    if o.link_down {
        out.push(
            "link: the macvtap is down, so nothing can be sent or received: bring it up (`ec-macvtap create` does)"
                .into(),
        );
    } else if o.no_carrier {
        out.push(format!(
            "link: no carrier on the parent \"{parent}\": check the cable and that the switch port is up"
        ));
    }
    let wifi = o.parent_wireless.then(|| {
        format!(
            "the parent \"{parent}\" is Wi-Fi, and access points drop frames from MAC addresses that did not \
             associate: put the macvtap on a wired NIC"
        )
    });
    let silent_segment = |what: &str| -> String {
        if let Some(w) = &wifi {
            return w.clone();
        }
        if !o.answered.is_empty() {
            return format!(
                "{} on the segment answered us, so our frames get through: {what}",
                if o.answered.len() == 1 { "1 host".to_string() } else { format!("{} hosts", o.answered.len()) }
            );
        }
        let seen = o.frames.total();
        let heard = if seen == 0 {
            "not one frame from anyone else arrived".to_string()
        } else {
            format!("{seen} frames from others arrived but nobody answered anything we sent")
        };
        format!(
            "{heard}: the switch port likely drops frames from unknown MACs (port security or a MAC limit on \
             the port: allow this MAC there), or the segment is empty; otherwise {what}"
        )
    };
    if o.dhcp_asked && o.interrupted.is_none() && !o.link_down && !o.no_carrier && o.io_error.is_none() {
        match (&o.offer, o.acked, &o.nak) {
            (_, _, Some((server, msg))) => out.push(format!(
                "dhcp: server {server} refused our request (DHCPNAK{}): it does not lease that address to this \
                 MAC; check the server's static leases and pools for this MAC",
                msg.as_ref().map(|m| format!(": {m}")).unwrap_or_default()
            )),
            (None, _, None) => out.push(format!(
                "dhcp: no answer to {} in {}; {}",
                plural(o.discovers, "DISCOVER"),
                secs(o.dhcp_wait),
                silent_segment(
                    "there is no DHCP server on this segment (or VLAN), or it ignores this MAC (check its \
                     allow-list)"
                )
            )),
            (Some(offer), false, None) => out.push(format!(
                "dhcp: server {} offered {} but did not acknowledge {}: the server may be refusing this MAC \
                 after the offer (a second DHCP server or a relay on the segment can cause this too)",
                offer.server,
                offer.address,
                plural(o.requests, "REQUEST")
            )),
            (Some(_), true, None) => {}
        }
    }
    if o.tuners_asked && o.interrupted.is_none() && !o.link_down && !o.no_carrier && o.io_error.is_none() {
        match o.tuner_source {
            None => out.push(
                "tuners: discovery not tried: no address to ask from (DHCP got no lease); fix DHCP first, or \
                 try --no-dhcp (a link-local address)"
                    .into(),
            ),
            Some(src) if o.tuners.is_empty() => {
                let from = match src {
                    SourceAddress::Leased(a) => format!("from {a}"),
                    SourceAddress::LinkLocal(a) => format!("from the link-local address {a}"),
                };
                let meaning = "the tuners may sit in another VLAN or subnet (discovery broadcasts do not cross \
                               routers), be powered off, or a firewall drops UDP 65001";
                let why = match src {
                    SourceAddress::Leased(_) => meaning.to_string(),
                    SourceAddress::LinkLocal(_) => silent_segment(&format!(
                        "{meaning}; without DHCP only tuners with a link-local address of their own can answer"
                    )),
                };
                out.push(format!(
                    "tuners: no HDHomeRun answered {} {from} (UDP 65001) in {}: {why}",
                    plural(o.tuner_requests, "discovery broadcast"),
                    secs(o.tuner_wait)
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(sig) = &o.interrupted {
        out.push(format!("interrupted by {sig} before every check finished"));
    }
    out
}

impl ProbeReport {
    pub(crate) fn new(name: &str, mac: MacAddr, o: &Observed, elapsed: Duration) -> Self {
        let problems = diagnose(o);
        ProbeReport {
            name: name.to_owned(),
            mac,
            dhcp: o.offer.clone(),
            tuners: o.tuners.clone(),
            frames: o.frames,
            ok: problems.is_empty(),
            problems,
            extra: Extra {
                parent: o.parent.clone(),
                elapsed,
                acked: o.acked,
                released: o.released,
                tuner_source: o.tuner_source.map(SourceAddress::ip),
                answered_hosts: o.answered.len(),
            },
        }
    }

    /// The human output: one line per finding, then one per problem, then the verdict.
    pub(crate) fn human_lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "{} (mac {}{}): probed in {:.2} s",
            self.name,
            self.mac,
            self.extra.parent.as_ref().map(|p| format!(", parent {p}")).unwrap_or_default(),
            self.extra.elapsed.as_secs_f64()
        )];
        if let Some(d) = &self.dhcp {
            let list = |v: &[Ipv4Addr]| v.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(" ");
            out.push(format!(
                "dhcp: {}{} from server {}, router {}, dns {}, lease {}{}",
                d.address,
                d.prefix_len.map(|p| format!("/{p}")).unwrap_or_default(),
                d.server,
                d.router.map(|r| r.to_string()).unwrap_or_else(|| "none".into()),
                if d.dns.is_empty() { "none".into() } else { list(&d.dns) },
                d.lease_secs.map(|s| format!("{s} s")).unwrap_or_else(|| "?".into()),
                match (self.extra.acked, self.extra.released) {
                    (true, true) => " (acknowledged, released)",
                    (true, false) => " (acknowledged, NOT released)",
                    (false, true) => " (offered only, released)",
                    (false, false) => " (offered only)",
                }
            ));
        }
        for t in &self.tuners {
            out.push(format!(
                "tuner: {} at {}, {} tuners{}",
                t.device_id,
                t.address,
                t.tuner_count.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                t.base_url.as_ref().map(|u| format!(", {u}")).unwrap_or_default()
            ));
        }
        out.push(format!(
            "frames seen: {} broadcast, {} multicast, {} unicast; {} answered us",
            self.frames.broadcast,
            self.frames.multicast,
            self.frames.unicast,
            match self.extra.answered_hosts {
                1 => "1 host".to_string(),
                n => format!("{n} hosts"),
            }
        ));
        out.extend(self.problems.iter().map(|p| format!("problem: {p}")));
        out.push(if self.ok {
            "result: ok".into()
        } else {
            format!("result: {}", plural(self.problems.len() as u32, "problem"))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            server: Ipv4Addr::new(192, 168, 77, 1),
            address: Ipv4Addr::new(192, 168, 77, 53),
            prefix_len: Some(24),
            router: Some(Ipv4Addr::new(192, 168, 77, 1)),
            dns: vec![Ipv4Addr::new(192, 168, 77, 1)],
            lease_secs: Some(3600),
        }
    }

    fn asked() -> Observed {
        Observed {
            parent: Some("eno1".into()),
            dhcp_asked: true,
            tuners_asked: true,
            discovers: 4,
            dhcp_wait: Duration::from_secs(10),
            tuner_wait: Duration::from_millis(1500),
            ..Observed::default()
        }
    }

    fn tuner() -> TunerReport {
        TunerReport {
            device_id: "1040CAFC".into(),
            address: Ipv4Addr::new(192, 168, 77, 2),
            tuner_count: Some(2),
            model: None,
            base_url: Some("http://192.168.77.2:80".into()),
        }
    }

    #[test]
    fn everything_answered_is_ok_and_json_has_exactly_the_contract_keys() {
        let o = Observed {
            offer: Some(offer()),
            acked: true,
            released: true,
            requests: 1,
            tuner_source: Some(SourceAddress::Leased(offer().address)),
            tuner_requests: 3,
            tuners: vec![tuner()],
            frames: FrameCounts { broadcast: 1, multicast: 2, unicast: 3 },
            ..asked()
        };
        let r = ProbeReport::new("ec-lan0", MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]), &o, Duration::from_secs(1));
        assert!(r.ok, "{:?}", r.problems);
        let v = serde_json::to_value(&r).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["dhcp", "frames", "mac", "name", "ok", "problems", "tuners"]);
        let mut dhcp_keys: Vec<_> = v["dhcp"].as_object().unwrap().keys().cloned().collect();
        dhcp_keys.sort();
        assert_eq!(dhcp_keys, ["address", "dns", "lease_secs", "prefix_len", "router", "server"]);
        assert_eq!(v["dhcp"]["server"], "192.168.77.1");
        assert_eq!(v["dhcp"]["dns"][0], "192.168.77.1");
        assert_eq!(
            v["tuners"][0],
            serde_json::json!({"device_id": "1040CAFC", "address": "192.168.77.2", "tuner_count": 2, "model": null})
        );
        assert_eq!(v["frames"], serde_json::json!({"broadcast": 1, "multicast": 2, "unicast": 3}));
        assert_eq!(v["mac"], "52:54:00:aa:bb:cc");
        let text = r.human_lines().join("\n");
        assert!(text.contains("dhcp: 192.168.77.53/24 from server 192.168.77.1, router 192.168.77.1, dns 192.168.77.1, lease 3600 s (acknowledged, released)"), "{text}");
        assert!(text.contains("tuner: 1040CAFC at 192.168.77.2, 2 tuners, http://192.168.77.2:80"), "{text}");
        assert!(text.ends_with("result: ok"), "{text}");
    }

    #[test]
    fn silence_with_zero_frames_points_at_port_security() {
        let p = diagnose(&asked());
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("dhcp: no answer to 4 DISCOVERs in 10 s; not one frame from anyone else arrived"),
            "{}",
            p[0]
        );
        assert!(p[0].contains("port security"), "{}", p[0]);
        assert!(p[1].starts_with("tuners: discovery not tried"), "{}", p[1]);
    }

    #[test]
    fn silence_on_a_live_segment_means_no_dhcp_server() {
        let mut o = asked();
        o.answered.insert([2, 0, 0, 0, 0, 1]);
        o.frames.multicast = 3;
        let p = diagnose(&o);
        assert!(p[0].contains("1 host on the segment answered us"), "{}", p[0]);
        assert!(p[0].contains("there is no DHCP server on this segment"), "{}", p[0]);
        assert!(!p[0].contains("port security"), "{}", p[0]);
    }

    #[test]
    fn wifi_parent_is_named() {
        let o = Observed { parent: Some("wlan0".into()), parent_wireless: true, ..asked() };
        assert!(diagnose(&o)[0].contains("the parent \"wlan0\" is Wi-Fi"));
    }

    #[test]
    fn lease_without_tuners_names_tuner_discovery() {
        let o = Observed {
            offer: Some(offer()),
            acked: true,
            tuner_source: Some(SourceAddress::Leased(offer().address)),
            tuner_requests: 3,
            ..asked()
        };
        let p = diagnose(&o);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("tuners: no HDHomeRun answered 3 discovery broadcasts from 192.168.77.53 (UDP 65001) in 1.5 s: the tuners may sit in another VLAN"), "{}", p[0]);
    }

    #[test]
    fn offers_naks_links_and_signals() {
        let o = Observed { offer: Some(offer()), requests: 3, tuners_asked: false, ..asked() };
        assert!(diagnose(&o)[0].contains("offered 192.168.77.53 but did not acknowledge 3 REQUESTs"));
        let o = Observed { nak: Some((offer().server, Some("wrong network".into()))), tuners_asked: false, ..asked() };
        assert!(diagnose(&o)[0].contains("refused our request (DHCPNAK: wrong network)"));
        let o = Observed { link_down: true, ..asked() };
        assert_eq!(diagnose(&o).len(), 1);
        assert!(diagnose(&o)[0].starts_with("link: the macvtap is down"));
        let o = Observed { no_carrier: true, ..asked() };
        assert!(diagnose(&o)[0].starts_with("link: no carrier on the parent \"eno1\""));
        let o = Observed { interrupted: Some("SIGINT".into()), ..asked() };
        assert_eq!(diagnose(&o), ["interrupted by SIGINT before every check finished"]);
        let o = Observed { dhcp_asked: false, tuners_asked: false, ..asked() };
        assert!(diagnose(&o).is_empty(), "nothing asked, nothing missing");
    }
}
