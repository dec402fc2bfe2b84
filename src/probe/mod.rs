//! `ec-macvtap probe`: test the LAN attach with no VM. One queue of the macvtap's tap is opened (the same
//! verified opening `exec` and the launcher use) and the probe speaks as the macvtap's MAC:
//! DHCP (DISCOVER, OFFER, REQUEST, ACK, and a RELEASE at the end so no lease is left behind), HDHomeRun
//! discovery from the leased address (answering ARP for it meanwhile), a count of the frames that arrive,
//! and an IPv6 all-nodes echo whose answers tell "nobody hears us" (port security) from "nobody serves
//! DHCP here". The wire formats are in [`wire`], [`dhcp`] and [`hdhomerun`]; the verdict in [`report`].

pub(crate) mod dhcp;
pub(crate) mod hdhomerun;
pub(crate) mod report;
pub(crate) mod wire;

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::error::{Error, Result};
use crate::launcher::lanlock;
use crate::link::{self, Netlink};
use crate::macvtap;
use crate::names::{IfName, MacAddr};
use crate::netns::{self, NetnsSpec};
use crate::tap;
use report::{Observed, ProbeReport, SourceAddress, TunerReport};
use wire::{BROADCAST, Incoming};

/// How long tuner discovery listens (less when `--timeout` is shorter). HDHomeRuns answer within
/// milliseconds; libhdhomerun's own discovery waits well under a second.
pub(crate) const TUNER_WINDOW: Duration = Duration::from_millis(1500);
/// Discovery requests are sent this far apart, three times.
const TUNER_RESEND: Duration = Duration::from_millis(500);
const TUNER_SENDS: u32 = 3;
/// A REQUEST is repeated this often, and gets at least this long after the OFFER even near the deadline.
const REQUEST_RESEND: Duration = Duration::from_secs(1);
const REQUEST_GRACE: Duration = Duration::from_secs(2);
/// DISCOVER intervals: 1 s, 2 s, then every 4 s (shorter than RFC 2131's 4/8/16 s: a probe waits).
const DISCOVER_FIRST: Duration = Duration::from_secs(1);
const DISCOVER_MAX: Duration = Duration::from_secs(4);
const ECHOES: u32 = 3;

/// What `probe` was asked.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub name: IfName,
    pub timeout: Duration,
    pub dhcp: bool,
    pub tuners: bool,
    pub force: bool,
}

/// The opened queue and what netlink and sysfs say about the link and its parent.
struct Prepared {
    fd: OwnedFd,
    mac: MacAddr,
    up: bool,
    carrier: bool,
    parent: Option<String>,
    parent_wireless: bool,
}

/// Run the probe. `Err` for what stops it before anything is sent (a missing link: exit 3; not a macvtap: 2;
/// the tap in use: 4; no permission: 5); otherwise the report, whose `ok` says whether every asked-for check
/// got its answer.
pub(crate) fn probe(ns: Option<&NetnsSpec>, opts: &ProbeOptions) -> Result<ProbeReport> {
    // SIGINT/SIGTERM become readable on a signalfd, so a stop still releases the lease. Blocked before any
    // thread starts (the namespace worker inherits the mask), restored at the end.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    let old_mask =
        signals.thread_swap_mask(SigmaskHow::SIG_BLOCK).map_err(|e| Error::errno("block SIGINT/SIGTERM", e))?;
    let result = (|| {
        let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| Error::errno("signalfd", e))?;
        let prepared = netns::run_in(ns, || prepare(ns, opts))?;
        tap::set_plain_frames(&prepared.fd)
            .map_err(|e| Error::errno(format!("TUNSETIFF (plain frames) on the tap of \"{}\"", opts.name), e))?;
        Ok(Session::new(opts, &prepared, &sigfd).run())
    })();
    let _ = old_mask.thread_set_mask();
    result
}

fn prepare(ns: Option<&NetnsSpec>, opts: &ProbeOptions) -> Result<Prepared> {
    let name = &opts.name;
    let nl = Netlink::new()?;
    let l = nl
        .block_on(link::get_by_name(&nl.handle, name))?
        .ok_or_else(|| Error::not_found(format!("macvtap \"{name}\" in {}", netns::describe_current(ns))))?;
    if !l.is_macvtap() {
        return Err(Error::invalid(
            format!("link \"{name}\""),
            format!("is a {} link, not a macvtap", l.kind.as_deref().unwrap_or("physical")),
        ));
    }
    let parent = match l.parent_ifindex.filter(|_| l.link_netnsid.is_none()) {
        Some(p) => nl.block_on(link::get_by_index(&nl.handle, p))?,
        None => None,
    };
    if !opts.force {
        refuse_if_in_use(name, l.ifindex)?;
    }
    let opened = macvtap::open_here(ns, name, 1)?;
    let fd = opened.fds.into_iter().next().ok_or_else(|| Error::Runtime(format!("open the tap of \"{name}\"")))?;
    Ok(Prepared {
        fd,
        mac: opened.mac,
        up: l.up,
        carrier: l.carrier && parent.as_ref().is_none_or(|p| p.carrier),
        parent_wireless: parent.as_ref().is_some_and(|p| link::sysfs_is_wireless(&p.name)),
        parent: parent.map(|p| p.name),
    })
}

/// A running guest would lose frames to the probe (the kernel spreads them over the open queues): refuse
/// while a launcher holds the link's lock or any process has its tap device open.
fn refuse_if_in_use(name: &IfName, ifindex: u32) -> Result<()> {
    let what = format!("probe \"{name}\"");
    let hint = "a running guest would lose frames to the probe; stop it first, or pass --force";
    if let Some(pid) = lanlock::held_by(ifindex) {
        let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
        return Err(Error::conflict(what, format!("an ec-ipxe-qemu run{who} is using this macvtap: {hint}")));
    }
    let dev = tap::sysfs_devnum(name, ifindex)?;
    let holders = tap::holders(dev);
    if !holders.is_empty() {
        return Err(Error::conflict(
            what,
            format!("its tap device (char {dev}) is held by {}: {hint}", tap::describe_holders(&holders)),
        ));
    }
    Ok(())
}

/// Random numbers for transaction ids and ports (not secrets).
fn random_u32() -> u32 {
    use std::io::Read;
    let mut b = [0u8; 4];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u32::from_ne_bytes(b),
        Err(_) => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.subsec_nanos() ^ std::process::id().rotate_left(16)
        }
    }
}

/// RFC 3927's range 169.254.1.0 to 169.254.254.255, picked from the MAC (stable per macvtap).
fn link_local_v4(mac: MacAddr) -> Ipv4Addr {
    Ipv4Addr::new(169, 254, 1 + mac.0[4] % 254, mac.0[5])
}

enum Phase {
    Selecting { next: Instant, interval: Duration, deadline: Instant },
    Requesting { next: Instant, deadline: Instant },
    Tuners { next: Instant, until: Instant },
    Listening { until: Instant },
    Done,
}

/// The lease (or offered address) a RELEASE must give back.
struct ToRelease {
    address: Ipv4Addr,
    server: Ipv4Addr,
    server_mac: MacAddr,
}

struct Session<'a> {
    opts: &'a ProbeOptions,
    fd: &'a OwnedFd,
    sigfd: &'a SignalFd,
    mac: MacAddr,
    start: Instant,
    xid: u32,
    port: u16,
    echo_id: u16,
    /// This run's own link-local address (see [`wire::random_link_local`]).
    ll: std::net::Ipv6Addr,
    echoes: u32,
    next_echo: Instant,
    my_ip: Option<Ipv4Addr>,
    release: Option<ToRelease>,
    phase: Phase,
    o: Observed,
}

impl<'a> Session<'a> {
    fn new(opts: &'a ProbeOptions, p: &'a Prepared, sigfd: &'a SignalFd) -> Self {
        let r = random_u32();
        let start = Instant::now();
        let o = Observed {
            parent: p.parent.clone(),
            parent_wireless: p.parent_wireless,
            link_down: !p.up,
            no_carrier: p.up && !p.carrier,
            dhcp_asked: opts.dhcp,
            tuners_asked: opts.tuners,
            ..Observed::default()
        };
        Session {
            opts,
            fd: &p.fd,
            sigfd,
            mac: p.mac,
            start,
            xid: random_u32(),
            port: 49152 + (r % 16384) as u16,
            echo_id: (r >> 16) as u16,
            ll: wire::random_link_local((u64::from(random_u32()) << 32) | u64::from(random_u32())),
            echoes: 0,
            next_echo: start,
            my_ip: None,
            release: None,
            phase: Phase::Done,
            o,
        }
    }

    fn run(mut self) -> ProbeReport {
        self.phase = if self.o.link_down || self.o.no_carrier {
            Phase::Done
        } else if self.opts.dhcp {
            self.o.dhcp_wait = self.opts.timeout;
            Phase::Selecting { next: self.start, interval: DISCOVER_FIRST, deadline: self.start + self.opts.timeout }
        } else if self.opts.tuners {
            self.start_tuners(SourceAddress::LinkLocal(link_local_v4(self.mac)))
        } else {
            Phase::Listening { until: self.start + self.opts.timeout }
        };
        while !matches!(self.phase, Phase::Done) {
            self.on_timers();
            if matches!(self.phase, Phase::Done) {
                break;
            }
            if !self.wait_and_read() {
                break;
            }
        }
        self.send_release();
        ProbeReport::new(self.opts.name.as_str(), self.mac, &self.o, self.start.elapsed())
    }

    fn start_tuners(&mut self, from: SourceAddress) -> Phase {
        let now = Instant::now();
        let window = TUNER_WINDOW.min(self.opts.timeout);
        self.o.tuner_source = Some(from);
        self.o.tuner_wait = window;
        self.my_ip = Some(from.ip());
        Phase::Tuners { next: now, until: now + window }
    }

    fn after_dhcp(&mut self) -> Phase {
        match (self.opts.tuners, self.my_ip) {
            (true, Some(ip)) => self.start_tuners(SourceAddress::Leased(ip)),
            _ => Phase::Done,
        }
    }

    fn send(&mut self, frame: &[u8]) {
        if self.o.io_error.is_some() {
            return;
        }
        if let Err(e) = nix::unistd::write(self.fd, frame) {
            self.o.io_error = Some(format!("sending on the tap of \"{}\" failed: {}", self.opts.name, e.desc()));
            self.phase = Phase::Done;
        }
    }

    /// Send what is due and move on when a phase's time is up.
    fn on_timers(&mut self) {
        let now = Instant::now();
        if self.echoes < ECHOES && now >= self.next_echo && !matches!(self.phase, Phase::Done) {
            self.echoes += 1;
            self.next_echo = now + DISCOVER_FIRST;
            let f = wire::all_nodes_echo(self.mac, self.ll, self.echo_id, self.echoes as u16);
            self.send(&f);
        }
        match self.phase {
            Phase::Selecting { next, interval, deadline } => {
                if now >= deadline {
                    self.phase = self.after_dhcp();
                } else if now >= next {
                    self.o.discovers += 1;
                    let secs = self.start.elapsed().as_secs().min(u16::MAX as u64) as u16;
                    let payload = dhcp::discover(self.xid, self.mac, secs);
                    let f =
                        wire::udp(self.mac, BROADCAST, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 68, 67, &payload);
                    self.send(&f);
                    if let Phase::Selecting { .. } = self.phase {
                        self.phase = Phase::Selecting {
                            next: now + interval,
                            interval: (interval * 2).min(DISCOVER_MAX),
                            deadline,
                        };
                    }
                }
            }
            Phase::Requesting { next, deadline } => {
                if now >= deadline {
                    self.phase = self.after_dhcp();
                } else if now >= next
                    && let Some(offer) = self.o.offer.clone()
                {
                    self.o.requests += 1;
                    let secs = self.start.elapsed().as_secs().min(u16::MAX as u64) as u16;
                    let payload = dhcp::request(self.xid, self.mac, secs, &offer);
                    let f =
                        wire::udp(self.mac, BROADCAST, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 68, 67, &payload);
                    self.send(&f);
                    if let Phase::Requesting { .. } = self.phase {
                        self.phase = Phase::Requesting { next: now + REQUEST_RESEND, deadline };
                    }
                }
            }
            Phase::Tuners { next, until } => {
                if now >= until {
                    self.phase = Phase::Done;
                } else if now >= next && self.o.tuner_requests < TUNER_SENDS {
                    self.o.tuner_requests += 1;
                    let src = self.my_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
                    let f = wire::udp(
                        self.mac,
                        BROADCAST,
                        src,
                        Ipv4Addr::BROADCAST,
                        self.port,
                        hdhomerun::PORT,
                        &hdhomerun::discover_request(),
                    );
                    self.send(&f);
                    if let Phase::Tuners { .. } = self.phase {
                        self.phase = Phase::Tuners { next: now + TUNER_RESEND, until };
                    }
                }
            }
            Phase::Listening { until } => {
                if now >= until {
                    self.phase = Phase::Done;
                }
            }
            Phase::Done => {}
        }
    }

    fn next_wake(&self) -> Instant {
        let phase = match self.phase {
            Phase::Selecting { next, deadline, .. } => next.min(deadline),
            Phase::Requesting { next, deadline } => next.min(deadline),
            Phase::Tuners { next, until } if self.o.tuner_requests < TUNER_SENDS => next.min(until),
            Phase::Tuners { until, .. } => until,
            Phase::Listening { until } => until,
            Phase::Done => Instant::now(),
        };
        if self.echoes < ECHOES { phase.min(self.next_echo) } else { phase }
    }

    /// Wait for a frame, a signal or the next timer; handle every frame that is there. False: stop now.
    fn wait_and_read(&mut self) -> bool {
        let wait = self.next_wake().saturating_duration_since(Instant::now());
        // Round up so a wake-up is never early (an early wake-up spins until the timer is due).
        let ms = wait.as_micros().div_ceil(1000).min(60_000) as u32;
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        let mut fds =
            [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN), PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                self.o.io_error = Some(format!("poll: {}", e.desc()));
                return false;
            }
        }
        let tap_ready = fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLERR));
        let sig_ready = fds[1].revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        if sig_ready && let Ok(Some(info)) = self.sigfd.read_signal() {
            let name = Signal::try_from(info.ssi_signo as i32).map(|s| s.as_str()).unwrap_or("a signal");
            self.o.interrupted = Some(name.to_owned());
            return false;
        }
        if tap_ready {
            let mut buf = vec![0u8; 65536];
            loop {
                match nix::unistd::read(self.fd, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => self.on_frame(&buf[..n]),
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        self.o.io_error =
                            Some(format!("reading the tap of \"{}\" failed: {}", self.opts.name, e.desc()));
                        return false;
                    }
                }
                if matches!(self.phase, Phase::Done) {
                    break;
                }
            }
        }
        true
    }

    fn on_frame(&mut self, frame: &[u8]) {
        match wire::cast_of(frame) {
            Some(wire::Cast::Broadcast) => self.o.frames.broadcast += 1,
            Some(wire::Cast::Multicast) => self.o.frames.multicast += 1,
            Some(wire::Cast::Unicast) => self.o.frames.unicast += 1,
            None => return,
        }
        match wire::parse(frame) {
            Incoming::ArpRequest { sender_mac, sender_ip, target_ip }
                if Some(target_ip) == self.my_ip && sender_ip != target_ip && sender_mac != self.mac =>
            {
                self.o.answered.insert(sender_mac.0);
                let f = wire::arp_reply(self.mac, target_ip, sender_mac, sender_ip);
                self.send(&f);
            }
            Incoming::Udp { src_mac, src, payload, dport: 68, sport: 67, .. } => self.on_dhcp(src_mac, src, payload),
            Incoming::Udp { src, dst, sport: hdhomerun::PORT, dport, payload, .. }
                if dport == self.port && Some(dst) == self.my_ip =>
            {
                self.on_tuner(src, payload)
            }
            Incoming::NeighborSolicitation { src_mac, target } if target == self.ll => {
                self.o.answered.insert(src_mac.0);
            }
            Incoming::EchoReplyV6 { src_mac, dst, id } if id == self.echo_id && dst == self.ll => {
                self.o.answered.insert(src_mac.0);
            }
            _ => {}
        }
    }

    fn on_dhcp(&mut self, src_mac: MacAddr, src: Ipv4Addr, payload: &[u8]) {
        let Some(reply) = dhcp::parse_reply(payload, self.xid, self.mac, src) else { return };
        self.o.answered.insert(src_mac.0);
        let now = Instant::now();
        match (reply, &self.phase) {
            (dhcp::Reply::Offer(offer), Phase::Selecting { deadline, .. }) => {
                tracing::debug!("DHCPOFFER of {} from {}", offer.address, offer.server);
                self.release = Some(ToRelease { address: offer.address, server: offer.server, server_mac: src_mac });
                self.o.offer = Some(offer);
                self.phase = Phase::Requesting { next: now, deadline: (*deadline).max(now + REQUEST_GRACE) };
            }
            (dhcp::Reply::Ack(ack), Phase::Requesting { .. })
                if self.o.offer.as_ref().is_some_and(|o| o.address == ack.address) =>
            {
                tracing::debug!("DHCPACK of {} from {}", ack.address, ack.server);
                self.release = Some(ToRelease { address: ack.address, server: ack.server, server_mac: src_mac });
                self.my_ip = Some(ack.address);
                self.o.offer = Some(ack);
                self.o.acked = true;
                self.phase = self.after_dhcp();
            }
            (dhcp::Reply::Nak { server, message }, Phase::Requesting { .. }) => {
                self.o.nak = Some((server, message));
                self.phase = self.after_dhcp();
            }
            _ => {}
        }
    }

    fn on_tuner(&mut self, src: Ipv4Addr, payload: &[u8]) {
        let Some(r) = hdhomerun::parse_reply(payload) else { return };
        let device_id = format!("{:08X}", r.device_id);
        if self.o.tuners.iter().any(|t| t.device_id == device_id) {
            return;
        }
        tracing::debug!("HDHomeRun {device_id} answered from {src}");
        self.o.tuners.push(TunerReport {
            device_id,
            address: src,
            tuner_count: r.tuner_count,
            model: None,
            base_url: r.base_url,
        });
    }

    /// Give back whatever was requested (an ACKed lease, or an offer we asked for whose ACK may be lost).
    fn send_release(&mut self) {
        let Some(rel) = self.release.take() else { return };
        let payload = dhcp::release(random_u32(), self.mac, rel.address, rel.server);
        let f = wire::udp(self.mac, rel.server_mac, rel.address, rel.server, 68, 67, &payload);
        let before = self.o.io_error.clone();
        self.o.io_error = None;
        self.send(&f);
        self.o.released = self.o.io_error.is_none();
        if before.is_some() {
            self.o.io_error = before;
        }
        tracing::debug!("DHCPRELEASE of {} to {}", rel.address, rel.server);
    }
}
