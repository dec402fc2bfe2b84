//! Validated newtypes for what users type: interface names, MAC addresses, macvtap modes and owners.
//!
//! Everything here is pure and parses once, in clap's `value_parser`, so bad input is a usage error
//! before anything touches the kernel.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The interface-alias marker that says "this link was created by ec-macvtap".
pub const OWNER_MARKER: &str = "ec-macvtap:v1";

/// A Linux interface name: 1–15 bytes, no `/`, no whitespace, not `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct IfName(String);

impl IfName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for IfName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("interface name is empty".into());
        }
        if s.len() > 15 {
            return Err(format!("interface name \"{s}\" is {} bytes long (at most 15)", s.len()));
        }
        if s == "." || s == ".." {
            return Err(format!("interface name \"{s}\" is not allowed"));
        }
        if let Some(c) = s.chars().find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "interface name \"{}\" contains {:?} (no '/', ':' or whitespace allowed)",
                s.escape_default(),
                c
            ));
        }
        Ok(IfName(s.to_owned()))
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// Parse without the unicast rule (for addresses read from the kernel).
    pub fn parse_any(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(format!("MAC address \"{s}\" must have six octets like 52:54:00:12:34:56"));
        }
        let mut out = [0u8; 6];
        for (slot, part) in out.iter_mut().zip(&parts) {
            if part.len() != 2 {
                return Err(format!("MAC address \"{s}\": octet \"{part}\" must be two hex digits"));
            }
            *slot = u8::from_str_radix(part, 16)
                .map_err(|_| format!("MAC address \"{s}\": octet \"{part}\" is not hexadecimal"))?;
        }
        Ok(MacAddr(out))
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
    }

    /// The stable MAC for a link: derived from the machine id, the link name and the parent name.
    /// Locally administered, unicast, and the same on every call with the same inputs.
    pub fn derived(machine_id: &str, name: &IfName, parent: &IfName) -> Self {
        // FNV-1a, 64 bit: stable across Rust versions and platforms (unlike std's hasher).
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for part in [machine_id.trim().as_bytes(), name.as_str().as_bytes(), parent.as_str().as_bytes()] {
            for &b in part.iter().chain(std::iter::once(&0u8)) {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        let b = hash.to_be_bytes();
        MacAddr([(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

/// User-given MACs must be unicast and not all-zero.
impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mac = MacAddr::parse_any(s)?;
        if mac.is_zero() {
            return Err(format!("MAC address \"{s}\" is all-zero"));
        }
        if mac.is_multicast() {
            return Err(format!(
                "MAC address \"{s}\" is multicast (the lowest bit of the first octet is set); a NIC needs a unicast address"
            ));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Macvtap modes, as `ip link` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MacvtapMode {
    Bridge,
    Vepa,
    Private,
    Passthru,
}

impl MacvtapMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MacvtapMode::Bridge => "bridge",
            MacvtapMode::Vepa => "vepa",
            MacvtapMode::Private => "private",
            MacvtapMode::Passthru => "passthru",
        }
    }
}

impl fmt::Display for MacvtapMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `USER[:GROUP]`, names or numeric ids. Resolved against the password database when used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerSpec {
    pub user: String,
    pub group: Option<String>,
}

impl FromStr for OwnerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let ok = |p: &str| !p.is_empty() && !p.contains(|c: char| c.is_whitespace() || c == ':' || c == '/');
        if !ok(user) || group.is_some_and(|g| !ok(g)) {
            return Err(format!("owner \"{s}\" must look like USER or USER:GROUP"));
        }
        Ok(OwnerSpec { user: user.to_owned(), group: group.map(str::to_owned) })
    }
}

impl fmt::Display for OwnerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.group {
            Some(g) => write!(f, "{}:{g}", self.user),
            None => f.write_str(&self.user),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IfName {
        s.parse().unwrap()
    }

    #[test]
    fn names_accept_and_reject() {
        assert_eq!(n("ec-lan0").as_str(), "ec-lan0");
        assert!("a23456789012345".parse::<IfName>().is_ok());
        for bad in ["", "a234567890123456", "a/b", "a b", "a\tb", ".", "..", "a:b", "a\nb"] {
            let err = bad.parse::<IfName>().unwrap_err();
            assert!(err.contains("interface name"), "{bad:?}: {err}");
        }
        assert!("a234567890123456".parse::<IfName>().unwrap_err().contains("16 bytes"));
    }

    #[test]
    fn macs_parse_and_print() {
        let m: MacAddr = "52:54:00:AA:bb:0c".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:aa:bb:0c");
        assert_eq!("52-54-00-aa-bb-0c".parse::<MacAddr>().unwrap(), m);
        assert!("00:00:00:00:00:00".parse::<MacAddr>().unwrap_err().contains("all-zero"));
        assert!("01:00:5e:00:00:01".parse::<MacAddr>().unwrap_err().contains("multicast"));
        assert!("ff:ff:ff:ff:ff:ff".parse::<MacAddr>().unwrap_err().contains("multicast"));
        for bad in ["52:54:00:aa:bb", "52:54:00:aa:bb:cc:dd", "5:54:00:aa:bb:cc", "zz:54:00:aa:bb:cc", ""] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(MacAddr::parse_any("01:00:5e:00:00:01").unwrap().0[0], 1);
    }

    #[test]
    fn derived_mac_is_stable_local_unicast_and_input_sensitive() {
        let a = MacAddr::derived("0123456789abcdef0123456789abcdef\n", &n("ec-lan0"), &n("eno1"));
        let b = MacAddr::derived("0123456789abcdef0123456789abcdef", &n("ec-lan0"), &n("eno1"));
        assert_eq!(a, b, "trailing newline of /etc/machine-id must not matter");
        assert!(a.is_locally_administered());
        assert!(!a.is_multicast());
        assert!(!a.is_zero());
        // Golden value: changing the derivation would change every guest's DHCP lease.
        assert_eq!(a.to_string(), "ba:7f:cb:b4:d6:44");
        assert_ne!(a, MacAddr::derived("0123456789abcdef0123456789abcdef", &n("ec-lan1"), &n("eno1")));
        assert_ne!(a, MacAddr::derived("0123456789abcdef0123456789abcdef", &n("ec-lan0"), &n("eno2")));
        assert_ne!(a, MacAddr::derived("fedcba9876543210fedcba9876543210", &n("ec-lan0"), &n("eno1")));
        // The name/parent boundary is part of the hash: ("ab","c") differs from ("a","bc").
        assert_ne!(MacAddr::derived("m", &n("ab"), &n("c")), MacAddr::derived("m", &n("a"), &n("bc")));
        for i in 0..200 {
            let m = MacAddr::derived(&format!("id{i}"), &n("x"), &n("y"));
            assert!(m.is_locally_administered() && !m.is_multicast(), "{m}");
        }
    }

    #[test]
    fn owners_parse() {
        assert_eq!("qemu".parse::<OwnerSpec>().unwrap(), OwnerSpec { user: "qemu".into(), group: None });
        assert_eq!("1000:kvm".parse::<OwnerSpec>().unwrap().group.as_deref(), Some("kvm"));
        for bad in ["", ":kvm", "qemu:", "a b", "a:b:c"] {
            assert!(bad.parse::<OwnerSpec>().is_err(), "{bad}");
        }
    }
}
