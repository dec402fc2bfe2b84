//! Following the boot on the guest console (pure): each clean console line (see [`super::lines`]) moves the
//! boot through its stages, gives addresses, or names a boot failure with the hint that fits it.
//!
//! Stages, in order: `firmware` (QEMU started, SeaBIOS), `ipxe` (iPXE's banner), `dhcp` (the boot NIC has an
//! address: iPXE's `net0: A.B.C.D/...` line or the boot script's `boot net0 ... ip A.B.C.D`), `chain` (the
//! boot script's `chaining URL`), `kernel` (a Linux kernel's first words), `ready` (the `--ready-pattern`).
//! Stages only move forward, except that SeaBIOS's banner, or QEMU's RESET event (routed here by the
//! supervisor through [`BootFeed::reset`](super::sink::BootFeed::reset)), starts over at `firmware`: the guest
//! rebooted.
//!
//! Failures come from iPXE's own error lines (`URL... No such file or directory (http://ipxe.org/2d0c613b)`)
//! and from the boot script's lines. iPXE error numbers carry the POSIX error in their top byte (iPXE's
//! `include/errno.h`), which decides the hint: 0x2d on HTTP is a 404, 0x3c on an https URL is an iPXE without
//! HTTPS, 0x3e is a name that did not resolve, 0x0e/0x0f a refused or reset connection, 0x4c/0x17/0x28/0x26
//! no route or no answer, 0x31/0x34/0x2a out of memory. Each failure is reported once per chain attempt.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use regex::Regex;
use serde::{Deserialize, Serialize};

/// The line the diagnostics print when the user-mode boot path works.
pub(crate) const OK_LINE: &str = "ec-ipxe-qemu: boot path OK";
/// The line the publisher guest prints once it is up.
pub(crate) const PUBLISHER_READY: &str = "ec-publisher: ready";
/// The publisher guest's LAN address line: `ec-publisher: lan ADDRESS`.
pub(crate) const PUBLISHER_LAN: &str = "ec-publisher: lan ";

/// The default `--ready-pattern`: the diagnostics' OK line or the publisher guest's ready line.
pub(crate) fn default_ready_pattern() -> String {
    format!("{}|{}", regex::escape(OK_LINE), regex::escape(PUBLISHER_READY))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Stage {
    Firmware,
    Ipxe,
    Dhcp,
    Chain,
    Kernel,
    Ready,
}

impl Stage {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Stage::Firmware => "firmware",
            Stage::Ipxe => "ipxe",
            Stage::Dhcp => "dhcp",
            Stage::Chain => "chain",
            Stage::Kernel => "kernel",
            Stage::Ready => "ready",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of boot failure, which decides the hint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FailureKind {
    NoDhcp,
    NotFound,
    AccessDenied,
    ServerError,
    HttpsUnsupported,
    NameNotResolved,
    Refused,
    NoRoute,
    OutOfMemory,
    NotBootable,
    Other,
}

/// A boot failure seen on the console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BootFailure {
    pub kind: FailureKind,
    /// What failed: a URL, or the boot NIC.
    pub what: String,
    /// iPXE's words, when it gave some.
    pub message: Option<String>,
    /// iPXE's error number.
    pub code: Option<u32>,
    pub hint: String,
}

impl fmt::Display for BootFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.what)?;
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        if let Some(c) = self.code {
            write!(f, " (iPXE error {c:#010x})")?;
        }
        write!(f, "; {}", self.hint)
    }
}

/// What a console line told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The boot reached this stage.
    Stage(Stage),
    /// The guest started over (SeaBIOS again): addresses and readiness are void.
    Reset,
    BootAddress(Ipv4Addr),
    LanAddress(IpAddr),
    Chain(String),
    Failure(BootFailure),
    /// Something worth a warning that does not stop the boot (the diagnostics' LAN DHCP got no answer).
    Warning(String),
    /// iPXE is downloading `file` (as iPXE names it), `percent` done (its progress, redrawn with backspaces).
    Download {
        file: String,
        percent: u8,
    },
    /// iPXE finished downloading `file` (`file... ok`).
    Downloaded(String),
}

struct Patterns {
    seabios: Regex,
    ipxe: Regex,
    net0: Regex,
    script_dhcp: Regex,
    chain: Regex,
    kernel: Regex,
    progress: Regex,
    downloaded: Regex,
    lan: Regex,
    lan_none: Regex,
    ipxe_error: Regex,
    script_failed: Regex,
    no_dhcp: Regex,
}

impl Patterns {
    fn new() -> Patterns {
        // Fixed patterns, checked by the unit tests: building them cannot fail.
        let re = |p: &str| Regex::new(p).unwrap_or_else(|e| unreachable!("pattern {p}: {e}"));
        Patterns {
            seabios: re(r"^SeaBIOS \(version "),
            ipxe: re(r"^iPXE \(|iPXE initialising devices|Open Source Network Boot Firmware"),
            net0: re(r"^net0: (\d+\.\d+\.\d+\.\d+)/"),
            script_dhcp: re(r"^ec-ipxe-qemu: boot net0 \S+ ip (\d+\.\d+\.\d+\.\d+)"),
            chain: re(r"^ec-ipxe-qemu: chaining (\S+)"),
            // Anchored: a kernel's own first words, not a guest program that mentions them.
            kernel: re(
                r"^(?:\[ *\d+\.\d+\] )?Linux version \d|^Decompressing Linux|^Booting the kernel|^\[ *\d+\.\d{6}\] ",
            ),
            progress: re(r"^(\S+)\.\.\. ?\s*(\d{1,3})%$"),
            downloaded: re(r"^(\S+)\.\.\. ok$"),
            lan: re(&format!(
                r"(?:^ec-ipxe-qemu: LAN net1 |{})([0-9a-fA-F.:]+)(?:/\d+)?\s*$",
                regex::escape(PUBLISHER_LAN)
            )),
            lan_none: re(r"^ec-ipxe-qemu: LAN net1 got no DHCP answer"),
            ipxe_error: re(r"^(?:(.*?)\.\.\. ?)?(?:Could not [a-z ]+: )?(.*?) ?\(https?://ipxe\.org/([0-9a-f]{8})\)"),
            script_failed: re(r"^ec-ipxe-qemu: could not boot from (\S+) \(error 0x([0-9a-f]+)\)"),
            no_dhcp: re(r"^ec-ipxe-qemu: no DHCP answer on net0"),
        }
    }
}

/// Follows one boot.
pub(crate) struct BootWatch {
    ready: Regex,
    memory_mib: u32,
    p: Patterns,
    stage: Stage,
    chain_url: Option<String>,
    /// Error numbers already reported in this chain attempt.
    reported: Vec<u32>,
    /// A DHCP failure already reported since the last success.
    dhcp_reported: bool,
}

impl BootWatch {
    /// `ready` is the `--ready-pattern`; `memory_mib` goes into the out-of-memory hint.
    pub(crate) fn new(ready: Regex, memory_mib: u32) -> BootWatch {
        BootWatch {
            ready,
            memory_mib,
            p: Patterns::new(),
            stage: Stage::Firmware,
            chain_url: None,
            reported: Vec::new(),
            dhcp_reported: false,
        }
    }

    pub(crate) fn stage(&self) -> Stage {
        self.stage
    }

    /// QEMU reset the guest (its RESET event): start over.
    pub(crate) fn reset(&mut self) -> Vec<Event> {
        let was = self.stage;
        self.stage = Stage::Firmware;
        self.chain_url = None;
        self.reported.clear();
        self.dhcp_reported = false;
        if was == Stage::Firmware { Vec::new() } else { vec![Event::Reset, Event::Stage(Stage::Firmware)] }
    }

    fn advance(&mut self, to: Stage, ev: &mut Vec<Event>) {
        if to > self.stage {
            self.stage = to;
            ev.push(Event::Stage(to));
        }
    }

    /// The console was reset (`ESC c`, see [`super::lines::Piece::ScreenReset`]). After iPXE has started,
    /// that is a Linux kernel's real-mode setup code setting the video mode as it takes over from iPXE: the
    /// kernel stage, whatever the kernel's log level (with `quiet` it prints nothing for seconds). At power-on
    /// (firmware stage) it is SeaBIOS itself, and changes nothing.
    pub(crate) fn screen_reset(&mut self) -> Vec<Event> {
        let mut ev = Vec::new();
        if (Stage::Ipxe..Stage::Kernel).contains(&self.stage) {
            self.advance(Stage::Kernel, &mut ev);
        }
        ev
    }

    /// The unfinished console line as it looks now: iPXE's download progress (`initrd... 43%`).
    pub(crate) fn partial(&mut self, text: &str) -> Option<Event> {
        if !(Stage::Ipxe..Stage::Kernel).contains(&self.stage) {
            return None;
        }
        let c = self.p.progress.captures(text.trim())?;
        let percent = c[2].parse::<u8>().ok().filter(|p| *p <= 100)?;
        Some(Event::Download { file: c[1].to_owned(), percent })
    }

    /// One clean console line.
    pub(crate) fn line(&mut self, line: &str) -> Vec<Event> {
        let mut ev = Vec::new();
        let l = line.trim();
        if l.is_empty() {
            return ev;
        }
        if self.p.seabios.is_match(l) {
            ev.extend(self.reset());
            return ev;
        }
        if self.ready.is_match(l) {
            self.advance(Stage::Ready, &mut ev);
        }
        if self.p.ipxe.is_match(l) {
            self.advance(Stage::Ipxe, &mut ev);
        }
        if let Some(c) = self.p.net0.captures(l).or_else(|| self.p.script_dhcp.captures(l))
            && let Ok(a) = c[1].parse::<Ipv4Addr>()
        {
            self.dhcp_reported = false;
            ev.push(Event::BootAddress(a));
            self.advance(Stage::Dhcp, &mut ev);
        }
        if let Some(c) = self.p.chain.captures(l) {
            self.chain_url = Some(c[1].to_owned());
            self.reported.clear();
            ev.push(Event::Chain(c[1].to_owned()));
            self.advance(Stage::Chain, &mut ev);
        }
        if self.p.kernel.is_match(l) {
            self.advance(Stage::Kernel, &mut ev);
        }
        if self.stage < Stage::Kernel
            && let Some(c) = self.p.downloaded.captures(l)
        {
            ev.push(Event::Downloaded(c[1].to_owned()));
        }
        if let Some(c) = self.p.lan.captures(l)
            && let Ok(a) = c[1].parse::<IpAddr>()
        {
            ev.push(Event::LanAddress(a));
        }
        if self.p.lan_none.is_match(l) {
            ev.push(Event::Warning(
                "the guest's LAN NIC (net1) got no DHCP answer: is there a DHCP server on the macvtap's \
                 segment, and does the switch port let the macvtap's MAC through?"
                    .into(),
            ));
        }
        if self.p.no_dhcp.is_match(l) {
            self.dhcp_failure(None, None, &mut ev);
        } else if let Some(c) = self.p.script_failed.captures(l) {
            if let Ok(code) = u32::from_str_radix(&c[2], 16) {
                let url = c[1].to_owned();
                self.failure(Some(url), None, code, &mut ev);
            }
        } else if let Some(c) = self.p.ipxe_error.captures(l)
            && let Ok(code) = u32::from_str_radix(&c[3], 16)
        {
            let subject = c.get(1).map(|m| m.as_str().trim().to_owned()).filter(|s| !s.is_empty());
            let message = Some(c[2].trim_start_matches(['.', ' ']).trim().to_owned()).filter(|s| !s.is_empty());
            if subject.as_deref().is_some_and(|s| s.starts_with("Configuring (")) {
                self.dhcp_failure(message, Some(code), &mut ev);
            } else {
                self.failure(subject, message, code, &mut ev);
            }
        }
        ev
    }

    fn dhcp_failure(&mut self, message: Option<String>, code: Option<u32>, ev: &mut Vec<Event>) {
        if self.dhcp_reported {
            return;
        }
        self.dhcp_reported = true;
        ev.push(Event::Failure(BootFailure {
            kind: FailureKind::NoDhcp,
            what: "DHCP on the boot NIC (net0, QEMU's user-mode network)".into(),
            message,
            code,
            hint: "QEMU's built-in DHCP server did not answer: check that --boot-nic-model is a model iPXE has a \
                   driver for (virtio-net-pci, e1000) and that extra QEMU arguments do not replace the boot \
                   network"
                .into(),
        }));
    }

    fn failure(&mut self, subject: Option<String>, message: Option<String>, code: u32, ev: &mut Vec<Event>) {
        if self.reported.contains(&code) {
            return;
        }
        self.reported.push(code);
        // The subject is a URL when iPXE named one; else the URL being chained.
        let url = subject.filter(|s| s.contains("://")).or_else(|| self.chain_url.clone());
        let what = url.clone().unwrap_or_else(|| "the boot".into());
        let scheme = url.as_deref().and_then(|u| u.split_once("://")).map(|(s, _)| s.to_ascii_lowercase());
        let http = matches!(scheme.as_deref(), Some("http" | "https"));
        let (kind, hint) = classify(code, scheme.as_deref(), http, self.memory_mib);
        ev.push(Event::Failure(BootFailure { kind, what, message, code: Some(code), hint }));
    }
}

/// The kind and hint for an iPXE error number.
fn classify(code: u32, scheme: Option<&str>, http: bool, memory_mib: u32) -> (FailureKind, String) {
    let posix = (code >> 24) & 0x7f;
    let s = |t: &str| t.to_owned();
    match posix {
        0x3c if scheme == Some("https") => (
            FailureKind::HttpsUnsupported,
            s("this iPXE cannot fetch https:// URLs (it was built without HTTPS, like Debian's ipxe.lkrn and \
               NIC ROMs): pass --ipxe with an HTTPS-capable ipxe.lkrn, or serve the boot files over http"),
        ),
        0x2d if http => (
            FailureKind::NotFound,
            s("HTTP 404 Not Found: the server has nothing at that path; check the path in the URL (with \
               --boot-dir, that the file is in that directory)"),
        ),
        0x2d => (FailureKind::NotFound, s("not found: the server has no such file; check the path in the URL")),
        0x02 if http => (
            FailureKind::AccessDenied,
            s("HTTP 401/403: the server refused access; check the server's permissions for that path"),
        ),
        0x1d if http => {
            (FailureKind::ServerError, s("HTTP 5xx: the server failed to answer the request; see the server's own log"))
        }
        0x3e => (
            FailureKind::NameNotResolved,
            s("the host name in the URL did not resolve: check its spelling and the DNS server (--dns; without \
               it, QEMU's user-mode DNS at 10.0.2.3 asks the host's resolver)"),
        ),
        0x0e | 0x0f => (
            FailureKind::Refused,
            s("the connection was refused or reset: nothing listens at that address and port, or the host cannot \
               reach it (QEMU's user-mode network connects from the host, where 10.0.2.2 is the host's loopback: \
               try the URL with curl on the host)"),
        ),
        0x4c | 0x17 | 0x28 | 0x26 => (
            FailureKind::NoRoute,
            s("no route to the server, or it did not answer: check the address and the host's routes and \
               firewall (QEMU's user-mode network connects from the host)"),
        ),
        0x31 | 0x34 | 0x2a => (
            FailureKind::OutOfMemory,
            format!(
                "the guest ran out of memory while loading: the kernel and initrd must fit in --memory \
                 ({memory_mib} MiB now) with room to spare; raise --memory or shrink the initrd"
            ),
        ),
        0x2e => (
            FailureKind::NotBootable,
            s("the file is neither a bootable image nor an iPXE script (a script starts with #!ipxe)"),
        ),
        0x3c => (FailureKind::Other, s("this iPXE does not support that (see the ipxe.org page for the error)")),
        _ => (FailureKind::Other, format!("see https://ipxe.org/err/{code:08x}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> BootWatch {
        BootWatch::new(Regex::new(&default_ready_pattern()).unwrap(), 256)
    }

    fn feed(w: &mut BootWatch, lines: &[&str]) -> Vec<Event> {
        lines.iter().flat_map(|l| w.line(l)).collect()
    }

    fn stages(ev: &[Event]) -> Vec<Stage> {
        ev.iter()
            .filter_map(|e| match e {
                Event::Stage(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    fn failures(ev: &[Event]) -> Vec<BootFailure> {
        ev.iter()
            .filter_map(|e| match e {
                Event::Failure(f) => Some(f.clone()),
                _ => None,
            })
            .collect()
    }

    /// The diagnostics boot, as the console shows it (lines from a real run, joined at 80 columns).
    #[test]
    fn diagnostics_boot_to_ready() {
        let mut w = watch();
        let ev = feed(
            &mut w,
            &[
                "SeaBIOS (version 1.16.2-debian-1.16.2-1)",
                "iPXE (http://ipxe.org) 00:03.0 C000 PCI2.10 PnP PMM+0EFCF040+0EF0F040 C000",
                "iPXE initialising devices...ok",
                "Configuring (net0 52:54:00:12:34:56)...... ok",
                "net0: 10.0.2.15/255.255.255.0 gw 10.0.2.2",
                "net0: fec0::5054:ff:fe12:3456/64 gw fe80::2",
                "ec-ipxe-qemu: boot net0 52:54:00:12:34:56 ip 10.0.2.15",
                "ec-ipxe-qemu: LAN net1 mac 52:54:00:aa:bb:cc: trying DHCP",
                "ec-ipxe-qemu: LAN net1 192.168.77.53",
                "ec-ipxe-qemu: boot path OK",
            ],
        );
        assert_eq!(stages(&ev), [Stage::Ipxe, Stage::Dhcp, Stage::Ready]);
        assert!(ev.contains(&Event::BootAddress(Ipv4Addr::new(10, 0, 2, 15))));
        assert!(ev.contains(&Event::LanAddress("192.168.77.53".parse().unwrap())));
        assert_eq!(ev.iter().filter(|e| matches!(e, Event::LanAddress(_))).count(), 1);
        assert!(failures(&ev).is_empty());
        assert_eq!(w.stage(), Stage::Ready);
        // A reboot starts over.
        let ev = w.line("SeaBIOS (version 1.16.2-debian-1.16.2-1)");
        assert_eq!(ev, [Event::Reset, Event::Stage(Stage::Firmware)]);
    }

    #[test]
    fn publisher_boot_through_chain_and_kernel() {
        let mut w = watch();
        let ev = feed(
            &mut w,
            &[
                "iPXE initialising devices...ok",
                "ec-ipxe-qemu: boot net0 52:54:00:12:34:56 ip 10.0.2.15",
                "ec-ipxe-qemu: chaining http://10.0.2.2:8080/netboot.ipxe",
                "http://10.0.2.2:8080/netboot.ipxe... ok",
                "[    0.000000] Linux version 6.6.1 (nixbld@localhost) (gcc 13.2.0) #1-NixOS SMP",
                "[    2.100000] ec-publisher: lan 192.168.1.40/24",
                "ec-publisher: lan 192.168.1.41",
                "ec-publisher: ready",
                // Stages never go back, apart from a reset.
                "ec-ipxe-qemu: chaining http://x/y",
            ],
        );
        assert_eq!(stages(&ev), [Stage::Ipxe, Stage::Dhcp, Stage::Chain, Stage::Kernel, Stage::Ready]);
        assert!(ev.contains(&Event::Chain("http://10.0.2.2:8080/netboot.ipxe".into())));
        let lan: Vec<_> = ev.iter().filter(|e| matches!(e, Event::LanAddress(_))).collect();
        assert_eq!(lan.len(), 2, "{lan:?}");
        assert_eq!(w.stage(), Stage::Ready);
    }

    /// Failure lines from real runs of Debian's iPXE (joined at 80 columns), each once per attempt.
    #[test]
    fn failures_get_their_hint() {
        let cases: &[(&str, &[&str], FailureKind, &str)] = &[
            (
                "http://10.0.2.2:18081/missing.ipxe",
                &[
                    "http://10.0.2.2:18081/missing.ipxe... No such file or directory (http://ipxe.org/2d0c613b)",
                    "ec-ipxe-qemu: could not boot from http://10.0.2.2:18081/missing.ipxe (error 0x2d0c613b); \
                     retrying in 10 seconds",
                ],
                FailureKind::NotFound,
                "HTTP 404",
            ),
            (
                "http://10.0.2.2:1/x.ipxe",
                &["http://10.0.2.2:1/x.ipxe... Connection reset (http://ipxe.org/0f0a6039)"],
                FailureKind::Refused,
                "refused or reset",
            ),
            (
                "http://no-such-host.invalid/x.ipxe",
                &["http://no-such-host.invalid/x.ipxe... Error 0x3e11613b (http://ipxe.org/3e11613b)"],
                FailureKind::NameNotResolved,
                "did not resolve",
            ),
            (
                "https://10.0.2.2:18081/x.ipxe",
                &["Could not start download: Operation not supported (http://ipxe.org/3c092003)"],
                FailureKind::HttpsUnsupported,
                "--ipxe with an HTTPS-capable ipxe.lkrn",
            ),
            (
                "http://10.0.2.2:18081/big.img",
                &[
                    "http://10.0.2.2:18081/big.img... No space left on device (http://ipxe.org/34182006)",
                    "Could not boot: No space left on device (http://ipxe.org/34182006)",
                    "ec-ipxe-qemu: could not boot from http://10.0.2.2:18081/bigchain.ipxe (error 0x34182006); \
                     retrying in 10 seconds",
                ],
                FailureKind::OutOfMemory,
                "raise --memory",
            ),
            (
                "http://192.0.2.9/x",
                &["http://192.0.2.9/x... Connection timed out (http://ipxe.org/4c0a6035)"],
                FailureKind::NoRoute,
                "no route",
            ),
        ];
        for (url, lines, kind, hint) in cases {
            let mut w = watch();
            let chain = if url.ends_with("big.img") { "http://10.0.2.2:18081/bigchain.ipxe" } else { url };
            w.line(&format!("ec-ipxe-qemu: chaining {chain}"));
            let f = failures(&feed(&mut w, lines));
            assert_eq!(f.len(), 1, "{url}: one report per attempt: {f:?}");
            assert_eq!(f[0].kind, *kind, "{url}");
            assert_eq!(f[0].what, *url);
            assert!(f[0].hint.contains(hint), "{url}: {}", f[0].hint);
            assert!(!f[0].to_string().contains("check the URL, that the server is up"), "{}", f[0]);
            // The next attempt reports again.
            w.line(&format!("ec-ipxe-qemu: chaining {chain}"));
            assert_eq!(failures(&feed(&mut w, lines)).len(), 1, "{url}: next attempt");
        }
        let f = &failures(
            &watch().line("http://10.0.2.2:18081/missing.ipxe... No such file or directory (http://ipxe.org/2d0c613b)"),
        )[0];
        assert_eq!(
            f.to_string(),
            "http://10.0.2.2:18081/missing.ipxe: No such file or directory (iPXE error 0x2d0c613b); HTTP 404 Not \
             Found: the server has nothing at that path; check the path in the URL (with --boot-dir, that the \
             file is in that directory)"
        );
    }

    #[test]
    fn no_dhcp_on_the_boot_nic_once_until_it_works() {
        let mut w = watch();
        let ev = feed(
            &mut w,
            &[
                "Configuring (net0 52:54:00:12:34:56)...... Connection timed out (http://ipxe.org/4c106035)",
                "ec-ipxe-qemu: no DHCP answer on net0 (the user-mode network), attempt 1; retrying in 3 seconds",
                "ec-ipxe-qemu: no DHCP answer on net0 (the user-mode network), attempt 2; retrying in 3 seconds",
            ],
        );
        let f = failures(&ev);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].kind, FailureKind::NoDhcp);
        assert!(f[0].hint.contains("--boot-nic-model"));
        w.line("ec-ipxe-qemu: boot net0 52:54:00:12:34:56 ip 10.0.2.15");
        assert_eq!(failures(&w.line("ec-ipxe-qemu: no DHCP answer on net0, attempt 9")).len(), 1);
    }

    #[test]
    fn custom_ready_pattern_and_lan_warning() {
        let mut w = BootWatch::new(Regex::new("^login: ?$").unwrap(), 512);
        assert!(stages(&w.line("ec-ipxe-qemu: boot path OK")).is_empty());
        assert_eq!(stages(&w.line("login:")), [Stage::Ready]);
        let ev = w.line("ec-ipxe-qemu: LAN net1 got no DHCP answer (is there a DHCP server on the LAN?)");
        assert!(matches!(&ev[..], [Event::Warning(m)] if m.contains("no DHCP answer")), "{ev:?}");
        // Not addresses.
        assert!(w.line("ec-ipxe-qemu: LAN net1 mac 52:54:00:aa:bb:cc: trying DHCP").is_empty());
        assert!(w.line("ec-publisher: lan none").is_empty());
        assert_eq!(w.line("ec-publisher: lan fd00::5"), [Event::LanAddress("fd00::5".parse().unwrap())]);
    }

    /// `quiet` and `loglevel=4`: the kernel prints nothing, but its setup code resets SeaBIOS's serial
    /// console (`ESC c`) as it takes over from iPXE. At power-on the same reset is SeaBIOS's own.
    #[test]
    fn a_screen_reset_after_ipxe_is_the_kernel() {
        let mut w = watch();
        assert!(w.screen_reset().is_empty(), "SeaBIOS's reset at power-on is not a kernel");
        feed(
            &mut w,
            &[
                "iPXE initialising devices...ok",
                "ec-ipxe-qemu: boot net0 52:54:00:12:34:56 ip 10.0.2.15",
                "ec-ipxe-qemu: chaining http://10.0.2.2:8080/netboot.ipxe",
                "initrd... ok",
            ],
        );
        assert_eq!(w.screen_reset(), [Event::Stage(Stage::Kernel)]);
        assert!(w.screen_reset().is_empty());
        assert_eq!(stages(&w.line("ec-publisher: ready")), [Stage::Ready]);
        assert!(w.screen_reset().is_empty(), "a reset of a running guest's console changes nothing");
    }

    /// Kernel patterns are anchored: SeaBIOS leftovers or a program quoting them are not a kernel.
    #[test]
    fn kernel_patterns_are_anchored() {
        let mut w = watch();
        w.line("ec-ipxe-qemu: chaining http://10.0.2.2:8080/netboot.ipxe");
        assert!(stages(&w.line("grep 'Linux version 6' /proc/version")).is_empty());
        assert!(stages(&w.line("echo [    1.000000] x")).is_empty());
        assert_eq!(
            stages(&w.line("Linux version 6.1.0-48-cloud-amd64 (debian-kernel@lists.debian.org)")),
            [Stage::Kernel]
        );
        let mut w = watch();
        w.line("ec-ipxe-qemu: chaining http://10.0.2.2:8080/netboot.ipxe");
        assert_eq!(stages(&w.line("[    0.000000] Command line: console=ttyS0")), [Stage::Kernel]);
    }

    /// iPXE's progress (redrawn in place with backspaces) and its `ok`.
    #[test]
    fn download_progress_and_completion() {
        let mut w = watch();
        assert_eq!(w.partial("initrd.img... 19%"), None, "not before iPXE runs");
        w.line("iPXE initialising devices...ok");
        assert_eq!(w.partial("initrd.img... 19%"), Some(Event::Download { file: "initrd.img".into(), percent: 19 }));
        assert_eq!(
            w.partial("http://10.0.2.2:80/nixos/initrd...100%"),
            Some(Event::Download { file: "http://10.0.2.2:80/nixos/initrd".into(), percent: 100 })
        );
        assert_eq!(w.partial("initrd.img..."), None);
        assert_eq!(w.partial("Configuring (net0 52:54:00:12:34:56)...."), None);
        assert_eq!(w.partial("a... 101%"), None);
        assert_eq!(w.line("initrd.img... ok"), [Event::Downloaded("initrd.img".into())]);
        w.line("ec-ipxe-qemu: chaining http://10.0.2.2:8080/netboot.ipxe");
        w.screen_reset();
        assert!(w.line("x... ok").is_empty(), "a guest's own `... ok` is no download");
        assert_eq!(w.partial("initrd.img... 19%"), None);
    }
}
