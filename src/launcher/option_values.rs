//! The launcher's value types: each parses once from its text form (`FromStr`), so a malformed value is
//! refused, naming itself, before anything is checked on disk or started. The CLI parses options with these
//! `FromStr` impls, so the same text is accepted wherever it comes from.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Characters that would break a QEMU option value, an iPXE script line or both.
fn bad_char(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\' | '`')
}

/// A chain target: `http://`, `https://` or `tftp://`, with a host. iPXE `${...}` settings are allowed
/// (e.g. `?mac=${net0/mac}`), whitespace and quotes are not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootUrl(String);

impl BootUrl {
    pub const SCHEMES: [&'static str; 3] = ["http", "https", "tftp"];

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn scheme(&self) -> &str {
        self.0.split_once("://").map(|(s, _)| s).unwrap_or_default()
    }
}

impl FromStr for BootUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(format!("\"{s}\" is not a URL like http://HOST/PATH"));
        };
        let scheme_lc = scheme.to_ascii_lowercase();
        if !Self::SCHEMES.contains(&scheme_lc.as_str()) {
            return Err(format!("unsupported scheme \"{scheme}\" in \"{s}\" (use http, https or tftp)"));
        }
        if let Some(c) = s.chars().find(|c| bad_char(*c)) {
            return Err(format!("\"{}\" contains {c:?} (no whitespace, quotes or backslashes)", s.escape_default()));
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let hostport = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            match v6.split_once(']') {
                Some((h, p)) => (h, p.strip_prefix(':')),
                None => return Err(format!("\"{s}\": unterminated IPv6 address")),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(format!("\"{s}\" has no host"));
        }
        if let Some(p) = port
            && !(p.starts_with("${") || p.parse::<u16>().is_ok_and(|n| n > 0))
        {
            return Err(format!("\"{s}\": port \"{p}\" is not a number between 1 and 65535"));
        }
        Ok(BootUrl(format!("{scheme_lc}://{rest}")))
    }
}

impl fmt::Display for BootUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A size in bytes: `8G`, `512M`, `1T`, `1048576`; K/M/G/T (optionally with `iB`) are powers of 1024.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const MIN: u64 = 1 << 20;
    pub const MAX: u64 = 64 << 40;
    /// The size a missing disk is created with unless told otherwise.
    pub const DEFAULT_DISK: ByteSize = ByteSize(8 << 30);
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = parse_bytes(s)?;
        if bytes < Self::MIN {
            return Err(format!("size \"{s}\" is too small (at least 1M)"));
        }
        if bytes > Self::MAX {
            return Err(format!("size \"{s}\" is absurdly large (at most 64T)"));
        }
        Ok(ByteSize(bytes))
    }
}

/// Digits with an optional unit (K/M/G/T, optionally with `iB`, or B; powers of 1024) as a number of bytes.
fn parse_bytes(s: &str) -> Result<u64, String> {
    {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(format!("size \"{s}\" must be a positive number with an optional unit (K, M, G, T), e.g. 8G"));
        }
        let shift = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kib" => 10,
            "m" | "mib" => 20,
            "g" | "gib" => 30,
            "t" | "tib" => 40,
            _ => return Err(format!("size \"{s}\": unknown unit \"{unit}\" (use K, M, G or T)")),
        };
        let n: u64 = num.parse().map_err(|_| format!("size \"{s}\" is too large"))?;
        n.checked_mul(1u64 << shift).ok_or_else(|| format!("size \"{s}\" is too large"))
    }
}

/// The cap of `serial.log` (`--serial-log-max`): a size like [`ByteSize`], from 16K to 64T.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogCap(pub u64);

impl LogCap {
    pub const MIN: u64 = 16 << 10;
    pub const DEFAULT: LogCap = LogCap(16 << 20);
}

impl FromStr for LogCap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = parse_bytes(s)?;
        if bytes < Self::MIN {
            return Err(format!("size \"{s}\" is too small (at least 16K)"));
        }
        if bytes > ByteSize::MAX {
            return Err(format!("size \"{s}\" is absurdly large (at most 64T)"));
        }
        Ok(LogCap(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Guest memory as QEMU's `-m` takes it: a number of MiB (`2048`), or a size with a unit (`512M`, `2G`,
/// `1T`; powers of 1024, `MiB`/`GiB`/`TiB` too). Whole MiB, from 64 MiB to 1 TiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemSize(u32);

impl MemSize {
    pub const MIN_MIB: u32 = 64;
    pub const MAX_MIB: u32 = 1 << 20;
    /// 2 GiB.
    pub const DEFAULT: MemSize = MemSize(2048);

    pub fn mib(self) -> u32 {
        self.0
    }
}

impl FromStr for MemSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let usage = || format!("memory \"{s}\" must be a number of MiB or a size like 512M or 2G (64M to 1T)");
        if num.is_empty() {
            return Err(usage());
        }
        let factor: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "m" | "mib" | "mb" => 1,
            "g" | "gib" | "gb" => 1 << 10,
            "t" | "tib" | "tb" => 1 << 20,
            _ => return Err(usage()),
        };
        let n: u64 = num.parse().map_err(|_| format!("memory \"{s}\" is too large (at most 1T)"))?;
        let mib = n.saturating_mul(factor);
        if mib < u64::from(Self::MIN_MIB) {
            return Err(format!("memory \"{s}\" is too small (at least 64M)"));
        }
        if mib > u64::from(Self::MAX_MIB) {
            return Err(format!("memory \"{s}\" is too large (at most 1T)"));
        }
        Ok(MemSize(mib as u32))
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A DNS host name: dot-separated labels of letters, digits and `-`, each 1–63 bytes, 253 in all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hostname(String);

impl Hostname {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Hostname {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        if s.is_empty() || s.len() > 253 || !s.split('.').all(ok_label) {
            return Err(format!(
                "host name \"{}\" must be labels of letters, digits and '-' separated by dots",
                s.escape_default()
            ));
        }
        Ok(Hostname(s.to_owned()))
    }
}

/// A QEMU device model name such as `virtio-net-pci` or `e1000`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicModel(String);

impl NicModel {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_virtio(&self) -> bool {
        self.0.starts_with("virtio-net")
    }
}

/// `virtio-net-pci`.
impl Default for NicModel {
    fn default() -> Self {
        NicModel("virtio-net-pci".to_owned())
    }
}

impl FromStr for NicModel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "device model \"{}\" must be a QEMU device name like virtio-net-pci or e1000",
                s.escape_default()
            ));
        }
        Ok(NicModel(s.to_owned()))
    }
}

/// Transport of a host forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// `[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`, as QEMU's `hostfwd=` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostForward {
    pub proto: Proto,
    pub host_addr: Option<Ipv4Addr>,
    pub host_port: u16,
    pub guest_addr: Option<Ipv4Addr>,
    pub guest_port: u16,
}

impl FromStr for HostForward {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!(
                "host forward \"{}\" must look like [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT, \
                 e.g. tcp:127.0.0.1:2222-:22",
                s.escape_default()
            )
        };
        let (host, guest) = s.split_once('-').ok_or_else(usage)?;
        let parts: Vec<&str> = host.split(':').collect();
        let (proto, haddr, hport) = match parts.as_slice() {
            [p, a, port] => (*p, *a, *port),
            [a, port] => ("", *a, *port),
            _ => return Err(usage()),
        };
        let proto = match proto {
            "" | "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => return Err(format!("host forward \"{s}\": protocol \"{other}\" is not tcp or udp")),
        };
        let (gaddr, gport) = guest.split_once(':').ok_or_else(usage)?;
        let addr = |a: &str| -> Result<Option<Ipv4Addr>, String> {
            if a.is_empty() {
                return Ok(None);
            }
            a.parse().map(Some).map_err(|_| format!("host forward \"{s}\": \"{a}\" is not an IPv4 address"))
        };
        let port = |p: &str| -> Result<u16, String> {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("host forward \"{s}\": port \"{p}\" is not a number between 1 and 65535"))
        };
        Ok(HostForward {
            proto,
            host_addr: addr(haddr)?,
            host_port: port(hport)?,
            guest_addr: addr(gaddr)?,
            guest_port: port(gport)?,
        })
    }
}

impl fmt::Display for HostForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |a: Option<Ipv4Addr>| a.map(|a| a.to_string()).unwrap_or_default();
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(f, "{proto}:{}:{}-{}:{}", opt(self.host_addr), self.host_port, opt(self.guest_addr), self.guest_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_urls() {
        for ok in [
            "http://boot.example/netboot.ipxe",
            "HTTPS://boot.example:8443/x?mac=${net0/mac}&a=b",
            "tftp://10.0.2.2/boot.ipxe",
            "http://[fe80::1]:80/x",
            "http://10.0.2.2:${port}/x",
        ] {
            assert!(ok.parse::<BootUrl>().is_ok(), "{ok}");
        }
        assert_eq!("HTTP://a/b".parse::<BootUrl>().unwrap().as_str(), "http://a/b");
        let cases = [
            ("ftp://a/b", "unsupported scheme \"ftp\""),
            ("file:///etc/passwd", "unsupported scheme"),
            ("boot.example/x", "is not a URL"),
            ("http:///x", "has no host"),
            ("http://a:0/x", "port \"0\""),
            ("http://a:99999/x", "port \"99999\""),
            ("http://a/b c", "contains ' '"),
            ("http://a/b\nchain x", "contains '\\n'"),
            ("http://a/\"x\"", "contains '\"'"),
        ];
        for (bad, msg) in cases {
            let err = bad.parse::<BootUrl>().unwrap_err();
            assert!(err.contains(msg), "{bad:?}: {err}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!("8G".parse::<ByteSize>().unwrap().0, 8 << 30);
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("1048576".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("2t".parse::<ByteSize>().unwrap().0, 2 << 40);
        assert_eq!("16K".parse::<LogCap>().unwrap().0, 16 << 10);
        assert_eq!("16M".parse::<LogCap>().unwrap(), LogCap::DEFAULT);
        assert!("15K".parse::<LogCap>().unwrap_err().contains("at least 16K"));
        assert!("-1".parse::<LogCap>().is_err() && "65T".parse::<LogCap>().is_err());
        for (bad, msg) in [
            ("0", "too small"),
            ("0G", "too small"),
            ("-1G", "positive number"),
            ("100K", "too small"),
            ("65T", "absurdly large"),
            ("99999999999999999999999", "too large"),
            ("18446744073709551615G", "too large"),
            ("8X", "unknown unit"),
            ("", "positive number"),
            ("G", "positive number"),
            ("1.5G", "unknown unit"),
        ] {
            let err = bad.parse::<ByteSize>().unwrap_err();
            assert!(err.contains(msg), "{bad:?}: {err}");
        }
    }

    #[test]
    fn memory_sizes() {
        let mib = |s: &str| s.parse::<MemSize>().map(MemSize::mib);
        assert_eq!(mib("2048"), Ok(2048));
        assert_eq!(mib("2G"), Ok(2048));
        assert_eq!(mib("512M"), Ok(512));
        assert_eq!(mib("1GiB"), Ok(1024));
        assert_eq!(mib("1T"), Ok(1 << 20));
        assert_eq!(mib("64"), Ok(64));
        for (bad, msg) in [
            ("0", "too small"),
            ("63", "too small"),
            ("2T", "too large"),
            ("99999999999999999999", "too large"),
            ("-5", "number of MiB"),
            ("1.5G", "number of MiB"),
            ("2X", "number of MiB"),
            ("", "number of MiB"),
        ] {
            let err = mib(bad).unwrap_err();
            assert!(err.contains(msg), "{bad:?}: {err}");
        }
    }

    #[test]
    fn host_forwards() {
        let f: HostForward = "tcp:127.0.0.1:2222-:22".parse().unwrap();
        assert_eq!(f.host_addr, Some(Ipv4Addr::LOCALHOST));
        assert_eq!((f.host_port, f.guest_port, f.guest_addr), (2222, 22, None));
        assert_eq!(f.to_string(), "tcp:127.0.0.1:2222-:22");
        assert_eq!(":8080-:80".parse::<HostForward>().unwrap().to_string(), "tcp::8080-:80");
        assert_eq!("udp::5353-10.0.2.15:53".parse::<HostForward>().unwrap().to_string(), "udp::5353-10.0.2.15:53");
        for bad in [
            "",
            "2222:22",
            "tcp:2222-22",
            "sctp::1-:2",
            "tcp::0-:22",
            "tcp::2222-:70000",
            "tcp:localhost:2222-:22",
            "tcp::2222-:22,hostfwd=tcp::1-:1",
            "tcp:1.2.3.4:5:6-:22",
        ] {
            assert!(bad.parse::<HostForward>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostnames_and_models() {
        assert!("publisher-1.lan".parse::<Hostname>().is_ok());
        for bad in ["", "-a", "a-", "a..b", "a b", "a,b", "a_b", &"x".repeat(64)] {
            assert!(bad.parse::<Hostname>().is_err(), "{bad:?}");
        }
        assert!("virtio-net-pci".parse::<NicModel>().unwrap().is_virtio());
        assert!(!"e1000".parse::<NicModel>().unwrap().is_virtio());
        for bad in ["", "virtio-net-pci,romfile=x", "a b"] {
            assert!(bad.parse::<NicModel>().is_err(), "{bad:?}");
        }
    }
}
