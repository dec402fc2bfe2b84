//! Everything `run` prepares before QEMU starts, in order: the `--host-forward` ports are checked, the LAN
//! link is locked (one launcher per macvtap) and only then its tap opened, then the boot HTTP server, the
//! TFTP directory and the boot script, the disk, `serial.log`, `console.sock` and the QEMU argv.

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::bootcache::{self, BootCache, OpenError};
use crate::error::{Error, Result};
use crate::launcher::accel::Accel;
use crate::launcher::config::{BootTarget, CacheSpec, LaunchConfig};
use crate::launcher::console::seriallog::SerialLog;
use crate::launcher::console::{self};
use crate::launcher::httpd::BootServer;
use crate::launcher::ipxe::{self, ScriptSpec};
use crate::launcher::lanlock::LanLock;
use crate::launcher::layout::BOOT_SCRIPT;
use crate::launcher::layout::usernet;
use crate::launcher::option_values::{HostForward, Proto};
use crate::launcher::qemu_args::{self, FdPlan};
use crate::launcher::statedir;
use crate::launcher::vhost::{self, Vhost};
use crate::macvtap::{self, OpenedTap};
use crate::tap;

/// The LAN NIC's kernel side, opened: the macvtap's tap queues and, with vhost-net, one `/dev/vhost-net` fd
/// per queue. `vhost.as_str()` ("on"/"off") is what status and doctor report.
pub(crate) struct OpenedLan {
    pub(crate) tap: OpenedTap,
    pub(crate) vhost: Vhost,
}

/// Everything prepared for QEMU; dropping it stops the HTTP server.
pub(super) struct Prepared {
    pub(super) argv: Vec<String>,
    pub(super) fds: FdPlan,
    /// The chain target (None: the diagnostics).
    pub(super) chain: Option<String>,
    /// The guest console, until QEMU starts.
    pub(super) console: Option<ConsoleParts>,
    _http: Option<BootServer>,
    /// The boot cache (`--boot-cache on`), served by its own loopback server.
    pub(super) cache: Option<BootCache>,
    _cache_http: Option<BootServer>,
}

impl Prepared {
    /// The `--boot-dir` server's progress, when it serves the boot.
    pub(super) fn http_progress(&self) -> Option<crate::launcher::httpd::Progress> {
        self._http.as_ref().map(BootServer::progress)
    }
}

/// The guest console before it runs: the launcher's end of the serial socket pair, QEMU's end, the log, the
/// listener.
pub(super) struct ConsoleParts {
    pub(super) ours: UnixStream,
    pub(super) theirs: OwnedFd,
    pub(super) log: SerialLog,
    pub(super) listener: UnixListener,
}

/// Every `--host-forward` host port must be free now (QEMU would fail later with a less clear message). The
/// probe binds like slirp does (SO_REUSEADDR for TCP) and closes at once.
pub(super) fn check_host_forwards(forwards: &[HostForward]) -> Result<()> {
    for f in forwards {
        let ip = f.host_addr.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        let addr = std::net::SocketAddr::from((ip, f.host_port));
        let r = match f.proto {
            Proto::Tcp => std::net::TcpListener::bind(addr).map(drop),
            Proto::Udp => std::net::UdpSocket::bind(addr).map(drop),
        };
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(Error::conflict(
                    format!("--host-forward {f}"),
                    format!("host port {addr} is already in use (pick another port)"),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                return Err(Error::invalid(
                    format!("--host-forward {f}"),
                    format!("{ip} is not an address of this host"),
                ));
            }
            Err(e) => return Err(Error::io(format!("--host-forward {f}: bind {addr}"), e)),
        }
    }
    Ok(())
}

/// One launcher per macvtap: lock the link, and refuse when any other process holds its tap device.
pub(super) fn lock_lan(cfg: &LaunchConfig) -> Result<Option<LanLock>> {
    let Some(l) = &cfg.lan else { return Ok(None) };
    let link = crate::launcher::lan_link(&l.interface)?;
    let lock = LanLock::acquire(&l.interface, link.ifindex)?;
    if let Ok(dev) = tap::sysfs_devnum(&l.interface, link.ifindex) {
        let holders = tap::holders(dev);
        if !holders.is_empty() {
            return Err(Error::conflict(
                format!("--lan-interface \"{}\"", l.interface),
                format!(
                    "its tap device {dev} is held by {}; refusing to start a second guest on it",
                    tap::describe_holders(&holders)
                ),
            ));
        }
    }
    Ok(Some(lock))
}

pub(super) fn open_lan(cfg: &LaunchConfig, lock: Option<&LanLock>) -> Result<Option<OpenedLan>> {
    let (Some(l), Some(_)) = (&cfg.lan, lock) else { return Ok(None) };
    let t = macvtap::open(None, &l.interface, l.queues).map_err(|e| name_option(e, "--lan-interface"))?;
    let vhost = vhost::open(l.vhost, l.queues, l.model.is_virtio())?;
    tracing::info!(
        "LAN NIC on macvtap \"{}\" (ifindex {}, mac {}, {} queue(s) from {}, vhost-net {})",
        t.name,
        t.ifindex,
        t.mac,
        l.queues,
        t.node.display(),
        vhost.as_str()
    );
    Ok(Some(OpenedLan { tap: t, vhost }))
}

/// Say which option an error is about.
fn name_option(e: Error, option: &str) -> Error {
    match e {
        Error::Invalid { what, reason } => Error::Invalid { what: format!("{option}: {what}"), reason },
        Error::NotFound { what } => Error::NotFound { what: format!("{option}: {what}") },
        Error::Conflict { what, reason } => Error::Conflict { what: format!("{option}: {what}"), reason },
        Error::Io { op, source } => Error::Io { op: format!("{option}: {op}"), source },
        Error::Netlink { op, errno } => Error::Netlink { op: format!("{option}: {op}"), errno },
        Error::Runtime(m) => Error::Runtime(format!("{option}: {m}")),
        Error::Unusable { kind, what, reason } => Error::Unusable { kind, what: format!("{option}: {what}"), reason },
    }
}

/// Call inside the runtime's context (the boot HTTP server is a task on it).
pub(super) fn prepare(cfg: &LaunchConfig, accel: Accel, lan: Option<&OpenedLan>) -> Result<Prepared> {
    let http = match &cfg.boot {
        BootTarget::Dir { dir, bind, port } => Some(BootServer::start(dir, *bind, *port)?),
        _ => None,
    };
    let mut spec = ScriptSpec::new(
        &cfg.boot,
        http.as_ref().map(|h| h.addr().port()),
        &cfg.dns,
        cfg.lan.is_some(),
        cfg.hostname.as_ref().map(|h| h.as_str()),
    );
    match (cfg.dns.len(), spec.dns) {
        (0, _) => {}
        (_, None) => tracing::warn!("--dns: iPXE takes one IPv4 DNS server and none was given; using the DHCP one"),
        (1, Some(_)) => {}
        (_, Some(d)) => tracing::info!("--dns: iPXE takes one DNS server; using {d}"),
    }
    let (cache, cache_http) = match &cfg.boot_cache {
        Some(c) => {
            let cache = open_cache(cfg, c)?;
            let server = BootServer::start_cache(cache.clone())?;
            spec.chain = Some(cache.boot_url().chain_url(&usernet::HOST.to_string(), server.addr().port()));
            tracing::info!(
                "boot cache on: the launcher fetches {} with the host's TLS and keeps it in {}",
                c.url,
                cache.dir().display()
            );
            match cache.good_set() {
                Some(g) => tracing::info!("boot cache: a last good set of {} files ({} bytes)", g.files, g.bytes),
                None => tracing::info!("boot cache: no last good set yet"),
            }
            (Some(cache), Some(server))
        }
        None => (None, None),
    };
    if let Some(url) = &spec.chain {
        tracing::info!("boot script chains to {url}");
        if cache.is_none() && url.to_ascii_lowercase().starts_with("https://") {
            crate::launcher::warn_without_https(cfg, url);
        }
    } else {
        tracing::info!("boot script: built-in diagnostics");
    }
    crate::launcher::credentials::log(&cfg.credentials);
    tftp_dir(&cfg.tftp_dir())?;
    statedir::write_atomically(&cfg.boot_script(), ipxe::script(&spec).as_bytes())?;
    if let (Some(d), Some(img)) = (&cfg.disk, &cfg.qemu_img) {
        statedir::ensure_disk(img, &d.path, d.size)?;
    }
    crate::launcher::private::expect_socket(&cfg.qmp_socket(), true)?;
    let log = SerialLog::open(&cfg.serial_log, cfg.serial_log_max)?;
    let listener = console::bind(&cfg.console_socket())?;
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| Error::io("create the serial socket pair", e))?;
    let fds = FdPlan::new(lan.map(|l| (l.tap.mac, l.tap.fds.len() as u32, l.vhost.fds.len() as u32)));
    let argv = qemu_args::build(cfg, accel, &fds);
    Ok(Prepared {
        argv,
        fds,
        chain: spec.chain.clone(),
        console: Some(ConsoleParts { ours, theirs: OwnedFd::from(theirs), log, listener }),
        _http: http,
        cache,
        _cache_http: cache_http,
    })
}

/// Open the boot cache in the state directory (blocking: before the runtime runs).
fn open_cache(cfg: &LaunchConfig, c: &CacheSpec) -> Result<BootCache> {
    let bc = bootcache::Config {
        boot_url: c.url.clone(),
        state_dir: cfg.state_dir.clone(),
        extra_ca: c.extra_ca.clone(),
        limits: bootcache::origin::Limits::default(),
        max_set_files: bootcache::MAX_SET_FILES,
    };
    // Checked when the configuration was read; again under the state directory's lock.
    for d in bootcache::store::dirs(&cfg.state_dir) {
        crate::launcher::private::expect_private_dir(&d)?;
    }
    BootCache::open(&bc).map_err(|e| match e {
        OpenError::Url(m) => Error::invalid("--boot-cache on", m),
        OpenError::Ca(m) => Error::invalid("--boot-ca", m),
        OpenError::Client(m) => Error::io("start the boot cache", std::io::Error::other(m)),
        OpenError::Store { dir, source } => Error::io(format!("open the boot cache {}", dir.display()), source),
    })
}

/// The slirp TFTP root (0700): the guest may read everything in it, so it holds the boot script and nothing
/// else; anything else found there is removed.
fn tftp_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(dir).map_err(|e| Error::io(format!("stat {}", dir.display()), e))?;
            if !m.is_dir() {
                return Err(Error::conflict(
                    format!("TFTP directory {}", dir.display()),
                    "exists and is not a directory (remove it)",
                ));
            }
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
            for entry in entries.flatten() {
                if entry.file_name() == BOOT_SCRIPT {
                    continue;
                }
                let p = entry.path();
                let r = match entry.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                    _ => std::fs::remove_file(&p),
                };
                match r {
                    Ok(()) => tracing::warn!("removed {} (the guest can read all of the TFTP directory)", p.display()),
                    Err(e) => return Err(Error::io(format!("remove {} from the TFTP directory", p.display()), e)),
                }
            }
        }
        Err(e) => return Err(Error::io(format!("create {}", dir.display()), e)),
    }
    Ok(())
}

/// Remove the socket at `p`, if a socket is there (nothing else is ever removed; a missing one is fine).
pub(super) fn remove_socket(p: &Path) {
    if !std::fs::symlink_metadata(p).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
        return;
    }
    match std::fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("remove {}: {e}", p.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_forward_ports_in_use_are_a_conflict() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let f: HostForward = format!("tcp:127.0.0.1:{port}-:22").parse().unwrap();
        let err = check_host_forwards(std::slice::from_ref(&f)).unwrap_err();
        assert_eq!(err.exit_code(), 4);
        assert!(err.to_string().starts_with(&format!("--host-forward tcp:127.0.0.1:{port}-:22: ")), "{err}");
        drop(taken);
        check_host_forwards(&[f]).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        let f: HostForward = format!("udp:127.0.0.1:{port}-:53").parse().unwrap();
        assert_eq!(check_host_forwards(&[f]).unwrap_err().exit_code(), 4);
    }
}
