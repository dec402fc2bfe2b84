//! What `run` and `print-args` were asked, validated before anything is created.
//!
//! The newtypes (`BootUrl`, `ByteSize`, `Hostname`, `HostForward`, `NicModel`) parse in clap's `value_parser`,
//! so a malformed value is a usage error naming the option. [`LaunchConfig::from_args`] then checks what needs
//! the file system (files that must exist, a usable state directory) without changing anything.

use std::fmt;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::unistd::{AccessFlags, access};

use crate::cli::launcher::{AccelChoice, LaunchArgs};
use crate::error::{Error, Result};
use crate::names::IfName;

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
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
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
        let bytes = n.checked_mul(1u64 << shift).ok_or_else(|| format!("size \"{s}\" is too large"))?;
        if bytes < Self::MIN {
            return Err(format!("size \"{s}\" is too small (at least 1M)"));
        }
        if bytes > Self::MAX {
            return Err(format!("size \"{s}\" is absurdly large (at most 64T)"));
        }
        Ok(ByteSize(bytes))
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

/// Where the boot script chains to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootTarget {
    /// No URL: the built-in diagnostics script.
    Diagnostics,
    Url(BootUrl),
    /// Serve a directory on the host and chain to `netboot.ipxe` in it.
    Dir {
        dir: PathBuf,
        bind: IpAddr,
        port: u16,
    },
}

/// The LAN NIC, before the tap is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LanSpec {
    pub interface: IfName,
    pub model: NicModel,
    pub queues: u32,
}

/// The persistent disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub size: ByteSize,
    /// Whether the image exists already (then it is used as it is).
    pub exists: bool,
}

/// Fixed file names inside the state directory.
pub const BOOT_SCRIPT: &str = "boot.ipxe";
/// The slirp TFTP root: a directory of its own that holds only the boot script (the guest can read all of it).
pub const TFTP_DIR: &str = "tftp";
pub const QMP_SOCKET: &str = "qmp.sock";
pub const LOCK_FILE: &str = "lock";
pub const SERIAL_LOG: &str = "serial.log";
pub const DISK_IMAGE: &str = "disk.qcow2";
/// The file `--boot-dir` chains to.
pub const NETBOOT_SCRIPT: &str = "netboot.ipxe";

/// Everything `run` needs, validated.
#[derive(Clone, Debug)]
pub struct LaunchConfig {
    pub state_dir: PathBuf,
    pub boot: BootTarget,
    pub ipxe: Option<PathBuf>,
    pub dns: Vec<IpAddr>,
    pub hostname: Option<Hostname>,
    pub boot_nic_model: NicModel,
    pub host_forwards: Vec<HostForward>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk: Option<DiskSpec>,
    pub accel: AccelChoice,
    pub qemu: PathBuf,
    pub qemu_img: Option<PathBuf>,
    pub serial_log: PathBuf,
    pub lan: Option<LanSpec>,
    pub shutdown_timeout: Duration,
    pub extra: Vec<String>,
}

impl LaunchConfig {
    pub fn tftp_dir(&self) -> PathBuf {
        self.state_dir.join(TFTP_DIR)
    }

    pub fn boot_script(&self) -> PathBuf {
        self.tftp_dir().join(BOOT_SCRIPT)
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.state_dir.join(QMP_SOCKET)
    }

    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join(LOCK_FILE)
    }

    /// Validate the arguments and what they name on disk, changing nothing.
    pub fn from_args(a: &LaunchArgs) -> Result<Self> {
        let state_dir = absolute("--state-dir", &a.state_dir)?;
        check_state_dir(&state_dir)?;
        let qmp = state_dir.join(QMP_SOCKET);
        // sockaddr_un holds 108 bytes including the NUL.
        if qmp.as_os_str().len() > 107 {
            return Err(Error::invalid(
                format!("--state-dir \"{}\"", a.state_dir.display()),
                format!("path too long: the QMP socket {} would exceed 107 bytes", qmp.display()),
            ));
        }
        let boot = match (&a.boot_url, &a.boot_dir) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid("--boot-url and --boot-dir", "are mutually exclusive"));
            }
            (Some(u), None) => BootTarget::Url(u.clone()),
            (None, Some(d)) => {
                let dir = absolute("--boot-dir", d)?;
                check_boot_dir(&dir)?;
                if a.boot_http_bind.is_ipv6() {
                    return Err(Error::invalid(
                        format!("--boot-http-bind {}", a.boot_http_bind),
                        "iPXE reaches the host over the user-mode network's IPv4 only (10.0.2.2); use an IPv4 \
                         address such as 127.0.0.1 or 0.0.0.0",
                    ));
                }
                BootTarget::Dir { dir, bind: a.boot_http_bind, port: a.boot_http_port }
            }
            (None, None) => BootTarget::Diagnostics,
        };
        if let BootTarget::Url(u) = &boot
            && u.scheme() == "https"
            && a.ipxe.is_none()
        {
            tracing::warn!(
                "--boot-url {u}: the NIC option ROM's iPXE may lack HTTPS (Debian's does); pass --ipxe with an \
                 HTTPS-capable ipxe.lkrn if the chain fails"
            );
        }
        let ipxe = match &a.ipxe {
            Some(p) => {
                let p = absolute("--ipxe", p)?;
                check_readable_file("--ipxe", &p)?;
                Some(p)
            }
            None => None,
        };
        let qemu = find_program("--qemu", &a.qemu)?;
        let disk = if a.no_disk {
            None
        } else {
            let path = match &a.disk {
                Some(p) => absolute("--disk", p)?,
                None => state_dir.join(DISK_IMAGE),
            };
            let exists = check_disk("--disk", &path)?;
            Some(DiskSpec { path, size: a.disk_size, exists })
        };
        let qemu_img = match &disk {
            Some(d) if !d.exists => Some(find_program("--qemu-img", &a.qemu_img)?),
            _ => None,
        };
        let serial_log = match &a.serial_log {
            Some(p) => {
                let p = absolute("--serial-log", p)?;
                check_output_file("--serial-log", &p)?;
                p
            }
            None => state_dir.join(SERIAL_LOG),
        };
        let lan = a.lan_interface.as_ref().map(|i| LanSpec {
            interface: i.clone(),
            model: a.lan_nic_model.clone(),
            queues: a.lan_queues,
        });
        if let Some(l) = &lan
            && l.queues > 1
            && !l.model.is_virtio()
        {
            return Err(Error::invalid(
                format!("--lan-queues {}", l.queues),
                format!("more than one queue needs a virtio-net model, not \"{}\"", l.model.as_str()),
            ));
        }
        for (i, x) in a.extra.iter().enumerate() {
            if x.contains('\0') {
                return Err(Error::invalid(format!("extra QEMU argument #{}", i + 1), "contains a NUL byte"));
            }
        }
        Ok(LaunchConfig {
            state_dir,
            boot,
            ipxe,
            dns: a.dns.clone(),
            hostname: a.hostname.clone(),
            boot_nic_model: a.boot_nic_model.clone(),
            host_forwards: a.host_forward.clone(),
            memory_mib: a.memory.mib(),
            cpus: a.cpus,
            disk,
            accel: a.accel,
            qemu,
            qemu_img,
            serial_log,
            lan,
            shutdown_timeout: Duration::from_secs(a.shutdown_timeout),
            extra: a.extra.clone(),
        })
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// Make a path absolute (QEMU gets absolute paths), without resolving symlinks. Commas are fine: the argv
/// builder escapes them.
fn absolute(option: &str, p: &Path) -> Result<PathBuf> {
    if p.as_os_str().is_empty() {
        return Err(Error::invalid(option, "is empty"));
    }
    if p.to_str().is_none() {
        return Err(Error::invalid(format!("{option} {p:?}"), "is not valid UTF-8"));
    }
    std::path::absolute(p).map_err(|e| Error::io(format!("{option} \"{}\"", show(p)), e))
}

/// The state directory must be a writable directory, or missing with a writable directory above it.
fn check_state_dir(dir: &Path) -> Result<()> {
    let what = format!("--state-dir \"{}\"", show(dir));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            if access(dir, AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
                return Err(Error::invalid(what, "is not writable"));
            }
            Ok(())
        }
        Ok(_) => Err(Error::invalid(what, "is not a directory")),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
            let mut up = dir.parent();
            while let Some(p) = up {
                match std::fs::metadata(p) {
                    Ok(m) if m.is_dir() => {
                        if access(p, AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
                            return Err(Error::invalid(
                                what,
                                format!("is missing and cannot be created: {} is not writable", show(p)),
                            ));
                        }
                        return Ok(());
                    }
                    Ok(_) => {
                        return Err(Error::invalid(what, format!("cannot be created: {} is not a directory", show(p))));
                    }
                    Err(_) => up = p.parent(),
                }
            }
            Err(Error::invalid(what, "cannot be created"))
        }
        Err(e) => Err(Error::invalid(what, e.to_string())),
    }
}

fn check_boot_dir(dir: &Path) -> Result<()> {
    let what = format!("--boot-dir \"{}\"", show(dir));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Error::invalid(what, "is not a directory")),
        Err(e) => return Err(Error::invalid(what, e.to_string())),
    }
    let script = dir.join(NETBOOT_SCRIPT);
    if !script.is_file() {
        return Err(Error::invalid(what, format!("has no {NETBOOT_SCRIPT} to chain to")));
    }
    Ok(())
}

fn check_readable_file(option: &str, p: &Path) -> Result<()> {
    let what = format!("{option} \"{}\"", show(p));
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => {
            if access(p, AccessFlags::R_OK).is_err() {
                return Err(Error::invalid(what, "is not readable"));
            }
            Ok(())
        }
        Ok(_) => Err(Error::invalid(what, "is not a regular file")),
        Err(e) => Err(Error::invalid(what, e.to_string())),
    }
}

/// A file QEMU will create or truncate: an existing one must be a writable regular file (or a FIFO/char device
/// such as /dev/null), a missing one needs a writable directory.
fn check_output_file(option: &str, p: &Path) -> Result<()> {
    let what = format!("{option} \"{}\"", show(p));
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() || m.file_type().is_fifo() || m.file_type().is_char_device() => {
            if access(p, AccessFlags::W_OK).is_err() {
                return Err(Error::invalid(what, "is not writable"));
            }
            Ok(())
        }
        Ok(_) => Err(Error::invalid(what, "is not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = p.parent().unwrap_or(Path::new("/"));
            if !dir.is_dir() || access(dir, AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
                return Err(Error::invalid(
                    what,
                    format!("cannot be created: {} is not a writable directory", show(dir)),
                ));
            }
            Ok(())
        }
        Err(e) => Err(Error::invalid(what, e.to_string())),
    }
}

/// An existing disk must be a readable, writable qcow2 image; a missing one needs a place to be created in
/// (the state directory, or an existing writable directory). Returns whether it exists.
fn check_disk(option: &str, p: &Path) -> Result<bool> {
    let what = format!("{option} \"{}\"", show(p));
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => {
            if access(p, AccessFlags::R_OK | AccessFlags::W_OK).is_err() {
                return Err(Error::invalid(what, "is not readable and writable"));
            }
            let mut magic = [0u8; 4];
            let ok = std::fs::File::open(p).and_then(|mut f| f.read_exact(&mut magic)).is_ok();
            if !ok || &magic != b"QFI\xfb" {
                return Err(Error::invalid(what, "exists but is not a qcow2 image (refusing to use or overwrite it)"));
            }
            Ok(true)
        }
        Ok(_) => Err(Error::invalid(what, "is not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = p.parent().unwrap_or(Path::new("/"));
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {
                    if access(dir, AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
                        return Err(Error::invalid(what, format!("cannot be created: {} is not writable", show(dir))));
                    }
                    Ok(false)
                }
                // Inside a state directory that does not exist yet: checked with the state directory.
                Err(_) => Ok(false),
                Ok(_) => Err(Error::invalid(what, format!("cannot be created: {} is not a directory", show(dir)))),
            }
        }
        Err(e) => Err(Error::invalid(what, e.to_string())),
    }
}

/// A program given as a path must be an executable file; a bare name is looked up on PATH. Returns the path
/// that will be executed.
pub fn find_program(option: &str, p: &Path) -> Result<PathBuf> {
    let what = format!("{option} \"{}\"", show(p));
    let is_exec = |c: &Path| {
        std::fs::metadata(c).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            && access(c, AccessFlags::X_OK).is_ok()
    };
    if p.components().count() > 1 || p.is_absolute() {
        let abs = absolute(option, p)?;
        if !abs.exists() {
            return Err(Error::invalid(what, "no such file"));
        }
        if !is_exec(&abs) {
            return Err(Error::invalid(what, "is not an executable file"));
        }
        return Ok(abs);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_absolute() && is_exec(c))
        .ok_or_else(|| Error::invalid(what, "not found on PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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

    fn args(extra: &[&str]) -> std::result::Result<LaunchArgs, clap::Error> {
        let mut v = vec!["ec-ipxe-qemu", "run"];
        v.extend_from_slice(extra);
        crate::cli::launcher::LauncherCli::try_parse_from(v).map(|c| match c.command {
            crate::cli::launcher::LauncherCommand::Run(a) => a,
            crate::cli::launcher::LauncherCommand::PrintArgs(a) => a,
        })
    }

    fn sh_true() -> String {
        let p = find_program("--qemu", Path::new("true")).unwrap();
        p.display().to_string()
    }

    #[test]
    fn clap_rejects_bad_values_naming_the_option() {
        let cases: &[(&[&str], &str)] = &[
            (&["--state-dir", "/x", "--memory", "0"], "--memory"),
            (&["--state-dir", "/x", "--memory", "-5"], "--memory"),
            (&["--state-dir", "/x", "--memory", "99999999"], "--memory"),
            (&["--state-dir", "/x", "--cpus", "0"], "--cpus"),
            (&["--state-dir", "/x", "--disk-size", "0"], "--disk-size"),
            (&["--state-dir", "/x", "--disk-size", "-8G"], "--disk-size"),
            (&["--state-dir", "/x", "--cpus", "-1"], "--cpus"),
            (&["--state-dir", "/x", "--shutdown-timeout", "-1"], "--shutdown-timeout"),
            (&["--state-dir", "/x", "--boot-url", "gopher://x/"], "--boot-url"),
            (&["--state-dir", "/x", "--host-forward", "bad"], "--host-forward"),
            (&["--state-dir", "/x", "--boot-url", "http://a/", "--boot-dir", "/tmp"], "--boot-dir"),
            (&["--state-dir", "/x", "--no-disk", "--disk", "/a.qcow2"], "--disk"),
            (&["--state-dir", "/x", "--lan-queues", "2"], "--lan-interface"),
            (&["--state-dir", "/x", "--boot-http-port", "8080"], "--boot-dir"),
            (&["--state-dir", "/x", "--lan-interface", "a/b"], "--lan-interface"),
            (&["--memory", "512"], "--state-dir"),
        ];
        for (argv, needle) in cases {
            let err = args(argv).unwrap_err().to_string();
            assert!(err.contains(needle), "{argv:?}: {err}");
        }
    }

    #[test]
    fn config_checks_the_file_system_without_changing_it() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let state = d.join("state");
        let s = state.to_str().unwrap();
        let qemu = sh_true();
        let ok =
            LaunchConfig::from_args(&args(&["--state-dir", s, "--qemu", &qemu, "--qemu-img", &qemu]).unwrap()).unwrap();
        assert_eq!(ok.boot, BootTarget::Diagnostics);
        assert_eq!(ok.serial_log, state.join("serial.log"));
        assert_eq!(ok.disk.as_ref().unwrap().path, state.join("disk.qcow2"));
        assert!(!state.exists(), "validation must not create the state dir");

        let file = d.join("file");
        std::fs::write(&file, b"x").unwrap();
        let f = file.to_str().unwrap();
        let notq = d.join("raw.img");
        std::fs::write(&notq, b"not a qcow2").unwrap();
        let bootdir = d.join("www");
        std::fs::create_dir(&bootdir).unwrap();
        let under_file = format!("{f}/sub");
        let too_long = format!("/{}", "x".repeat(120));
        let www = d.join("www2");
        std::fs::create_dir(&www).unwrap();
        std::fs::write(www.join("netboot.ipxe"), b"#!ipxe\n").unwrap();
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["--state-dir", f], "is not a directory"),
            (vec!["--state-dir", &under_file], "is not a directory"),
            (vec!["--state-dir", s, "--qemu", "/nonexistent/qemu"], "--qemu \"/nonexistent/qemu\": no such file"),
            (vec!["--state-dir", s, "--qemu", f], "is not an executable file"),
            (vec!["--state-dir", s, "--qemu", "no-such-qemu-binary"], "not found on PATH"),
            (vec!["--state-dir", s, "--qemu", &qemu, "--ipxe", "/nonexistent.lkrn"], "--ipxe \"/nonexistent.lkrn\""),
            (vec!["--state-dir", s, "--qemu", &qemu, "--no-disk", "--boot-dir", f], "is not a directory"),
            (
                vec!["--state-dir", s, "--qemu", &qemu, "--no-disk", "--boot-dir", bootdir.to_str().unwrap()],
                "has no netboot.ipxe",
            ),
            (vec!["--state-dir", s, "--qemu", &qemu, "--disk", notq.to_str().unwrap()], "not a qcow2"),
            (vec!["--state-dir", s, "--qemu", &qemu, "--qemu-img", "/nonexistent/qemu-img"], "--qemu-img"),
            (
                vec!["--state-dir", s, "--qemu", &qemu, "--no-disk", "--serial-log", "/nonexistent/dir/log"],
                "--serial-log",
            ),
            (
                vec![
                    "--state-dir",
                    s,
                    "--qemu",
                    &qemu,
                    "--no-disk",
                    "--lan-interface",
                    "x",
                    "--lan-nic-model",
                    "e1000",
                    "--lan-queues",
                    "2",
                ],
                "--lan-queues 2",
            ),
            (vec!["--state-dir", &too_long, "--qemu", &qemu], "path too long"),
            (
                vec![
                    "--state-dir",
                    s,
                    "--qemu",
                    &qemu,
                    "--no-disk",
                    "--boot-dir",
                    www.to_str().unwrap(),
                    "--boot-http-bind",
                    "::1",
                ],
                "--boot-http-bind ::1",
            ),
        ];
        for (argv, needle) in cases {
            let err = LaunchConfig::from_args(&args(&argv).unwrap()).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{argv:?}: {err}");
            assert!(err.to_string().contains(needle), "{argv:?}: {err}");
        }
        assert!(!state.exists());
    }
}
