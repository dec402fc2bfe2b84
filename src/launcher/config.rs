//! What `run` and `print-args` will do, validated before anything is created: [`LaunchConfig::from_options`]
//! checks the [`LaunchOptions`] against each other and, through [`fscheck`](super::fscheck), against the file
//! system (files that must exist, a usable state directory) without changing anything.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::launcher::accel::AccelChoice;
use crate::launcher::console::bootwatch;
use crate::launcher::credentials::{self, Credential};
use crate::launcher::fscheck::{
    absolute, check_boot_dir, check_disk, check_output_file, check_readable_file, check_state_dir, find_program,
};
use crate::launcher::layout::{BOOT_SCRIPT, CONSOLE_SOCKET, DISK_IMAGE, QMP_SOCKET, SERIAL_LOG, TFTP_DIR};
use crate::launcher::option_values::{BootUrl, ByteSize, HostForward, Hostname, NicModel};
use crate::launcher::options::{
    LaunchOptions, MAX_CPUS, MAX_LAN_QUEUES, MAX_READY_TIMEOUT_SECS, MAX_SHUTDOWN_TIMEOUT_SECS,
};
use crate::launcher::vhost::VhostMode;
use crate::names::IfName;

/// Where the boot script chains to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BootTarget {
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

/// The boot cache (`--boot-cache on`): the launcher fetches the boot URL's files and serves them to iPXE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CacheSpec {
    /// The `--boot-url`.
    pub url: String,
    /// `--boot-ca` files (absolute, checked to hold PEM certificates).
    pub extra_ca: Vec<PathBuf>,
}

/// The LAN NIC as configured (`--lan-*`), before its tap is opened (then it is an `OpenedLan`; QEMU sees it as
/// a `LanNicFds`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LanConfig {
    pub interface: IfName,
    pub model: NicModel,
    pub queues: u32,
    pub vhost: VhostMode,
}

/// The persistent disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DiskSpec {
    pub path: PathBuf,
    pub size: ByteSize,
    /// Whether the image exists already (then it is used as it is).
    pub exists: bool,
}

/// Everything `run` needs, validated.
#[derive(Clone, Debug)]
pub(crate) struct LaunchConfig {
    pub state_dir: PathBuf,
    pub boot: BootTarget,
    /// `--boot-cache on` (only with an http/https `BootTarget::Url`).
    pub boot_cache: Option<CacheSpec>,
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
    /// The cap of the serial log, in bytes.
    pub serial_log_max: u64,
    /// The console line that means "ready".
    pub ready_pattern: regex::Regex,
    /// How long the guest may take to be ready (None: no limit).
    pub ready_timeout: Option<Duration>,
    pub lan: Option<LanConfig>,
    pub shutdown_timeout: Duration,
    /// The checked credentials, sorted by name (QEMU reads the files; the launcher never reads a value).
    pub credentials: Vec<Credential>,
    pub extra: Vec<String>,
}

impl LaunchConfig {
    pub(crate) fn tftp_dir(&self) -> PathBuf {
        self.state_dir.join(TFTP_DIR)
    }

    pub(crate) fn boot_script(&self) -> PathBuf {
        self.tftp_dir().join(BOOT_SCRIPT)
    }

    pub(crate) fn qmp_socket(&self) -> PathBuf {
        self.state_dir.join(QMP_SOCKET)
    }

    pub(crate) fn console_socket(&self) -> PathBuf {
        self.state_dir.join(CONSOLE_SOCKET)
    }

    /// Validate the options and what they name on disk, changing nothing.
    pub(crate) fn from_options(a: &LaunchOptions) -> Result<Self> {
        // Ranges the CLI already enforces while parsing; checked again for callers that build options directly.
        if !(1..=MAX_CPUS).contains(&a.cpus) {
            return Err(Error::invalid(format!("--cpus {}", a.cpus), format!("must be between 1 and {MAX_CPUS}")));
        }
        if !(1..=MAX_LAN_QUEUES).contains(&a.lan_queues) {
            return Err(Error::invalid(
                format!("--lan-queues {}", a.lan_queues),
                format!("must be between 1 and {MAX_LAN_QUEUES}"),
            ));
        }
        if a.shutdown_timeout > Duration::from_secs(MAX_SHUTDOWN_TIMEOUT_SECS) {
            return Err(Error::invalid(
                format!("--shutdown-timeout {}", a.shutdown_timeout.as_secs()),
                format!("must be at most {MAX_SHUTDOWN_TIMEOUT_SECS} seconds"),
            ));
        }
        if a.no_disk && a.disk.is_some() {
            return Err(Error::invalid("--disk and --no-disk", "are mutually exclusive"));
        }
        let state_dir = absolute("--state-dir", &a.state_dir)?;
        check_state_dir(&state_dir)?;
        // sockaddr_un holds 108 bytes including the NUL; console.sock is the longest socket name.
        let socket = state_dir.join(CONSOLE_SOCKET);
        if socket.as_os_str().len() > 107 {
            return Err(Error::invalid(
                format!("--state-dir \"{}\"", a.state_dir.display()),
                format!("path too long: the console socket {} would exceed 107 bytes", socket.display()),
            ));
        }
        let ready_pattern = ready_pattern(a.ready_pattern.as_deref())?;
        if let Some(t) = a.ready_timeout
            && t > Duration::from_secs(MAX_READY_TIMEOUT_SECS)
        {
            return Err(Error::invalid(
                format!("--ready-timeout {}", t.as_secs()),
                format!("must be at most {MAX_READY_TIMEOUT_SECS} seconds (0: no limit)"),
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
        let boot_cache = boot_cache(a, &boot)?;
        if boot_cache.is_some() {
            for d in crate::bootcache::store::dirs(&state_dir) {
                crate::launcher::private::expect_private_dir(&d)?;
            }
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
        tracing::debug!("--qemu {}: {}", a.qemu.display(), qemu.display());
        let disk = if a.no_disk {
            None
        } else {
            let path = match &a.disk {
                Some(p) => absolute("--disk", p)?,
                None => state_dir.join(DISK_IMAGE),
            };
            let exists = check_disk("--disk", &path, a.disk.is_none())?;
            if exists {
                tracing::debug!("disk {}: a qcow2 image, used as it is", path.display());
            } else {
                tracing::debug!("disk {}: missing; qemu-img will create it ({} bytes)", path.display(), a.disk_size);
            }
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
        let lan = a.lan_interface.as_ref().map(|i| LanConfig {
            interface: i.clone(),
            model: a.lan_nic_model.clone(),
            queues: a.lan_queues,
            vhost: a.lan_vhost,
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
        if let Some(l) = &lan
            && l.vhost == VhostMode::On
            && !l.model.is_virtio()
        {
            return Err(Error::invalid(
                "--lan-vhost on",
                format!("vhost-net serves virtio-net NICs only, not \"{}\"", l.model.as_str()),
            ));
        }
        let credentials = credentials::collect(&a.credentials, a.credentials_from.as_deref())?;
        for (i, x) in a.extra.iter().enumerate() {
            if x.contains('\0') {
                return Err(Error::invalid(format!("extra QEMU argument #{}", i + 1), "contains a NUL byte"));
            }
        }
        let cfg = LaunchConfig {
            state_dir,
            boot,
            boot_cache,
            ipxe,
            dns: a.dns.clone(),
            hostname: a.hostname.clone(),
            boot_nic_model: a.boot_nic_model.clone(),
            host_forwards: a.host_forwards.clone(),
            memory_mib: a.memory.mib(),
            cpus: a.cpus,
            disk,
            accel: a.accel,
            qemu,
            qemu_img,
            serial_log,
            serial_log_max: a.serial_log_max.0,
            ready_pattern,
            ready_timeout: a.ready_timeout.filter(|t| !t.is_zero()),
            lan,
            shutdown_timeout: a.shutdown_timeout,
            credentials,
            extra: a.extra.clone(),
        };
        tracing::trace!("configuration: {cfg:?}");
        Ok(cfg)
    }
}

/// Whether `run` would use the boot cache with these options (for `doctor`, which must not stop at an error).
pub(crate) fn cache_wanted(a: &LaunchOptions) -> bool {
    a.boot_cache != Some(false)
        && a.boot_url.as_ref().is_some_and(|u| matches!(u.scheme(), "http" | "https") && cache_refusal(u).is_none())
}

/// Why the cache cannot serve an http/https URL: the host cannot expand iPXE settings in it, or it names this
/// host as the guest sees it (10.0.2.2, the host's loopback through the user-mode network: the files are on
/// this host already, and the host cannot reach that address).
fn cache_refusal(u: &BootUrl) -> Option<String> {
    match crate::bootcache::target::BootUrl::parse(u.as_str()) {
        Err(e) => Some(e.0),
        Ok(b) if b.origin.host == crate::launcher::layout::usernet::HOST.to_string() => Some(format!(
            "{u}: 10.0.2.2 is this host as the guest sees it; nothing to cache (use --boot-dir for local files)"
        )),
        Ok(_) => None,
    }
}

/// `--boot-cache` and `--boot-ca`: on by default for an http/https boot URL the cache can serve.
fn boot_cache(a: &LaunchOptions, boot: &BootTarget) -> Result<Option<CacheSpec>> {
    let mut extra_ca = Vec::new();
    for f in &a.boot_ca {
        let p = absolute("--boot-ca", f)?;
        match crate::bootcache::origin::read_pem_certs(&p) {
            Ok(certs) if certs.is_empty() => {
                return Err(Error::invalid(format!("--boot-ca \"{}\"", p.display()), "holds no PEM certificate"));
            }
            Ok(_) => {}
            Err(e) => return Err(Error::invalid("--boot-ca", e)),
        }
        extra_ca.push(p);
    }
    let url = match boot {
        BootTarget::Url(u) if matches!(u.scheme(), "http" | "https") => u,
        _ => {
            if a.boot_cache == Some(true) {
                return Err(Error::invalid("--boot-cache on", "needs an http:// or https:// --boot-url"));
            }
            if !extra_ca.is_empty() {
                return Err(Error::invalid(
                    "--boot-ca",
                    "is for the boot cache, which needs an http:// or https:// --boot-url",
                ));
            }
            return Ok(None);
        }
    };
    if a.boot_cache == Some(false) {
        if !extra_ca.is_empty() {
            return Err(Error::invalid("--boot-ca", "is for the boot cache, which --boot-cache off turns off"));
        }
        return Ok(None);
    }
    if let Some(why) = cache_refusal(url) {
        if a.boot_cache == Some(true) {
            return Err(Error::invalid("--boot-cache on", why));
        }
        if !extra_ca.is_empty() {
            // The same as `--boot-cache off` with `--boot-ca`: a CA that would silently go unused.
            return Err(Error::invalid("--boot-ca", format!("is for the boot cache, which is off here: {why}")));
        }
        tracing::debug!("boot cache off: {why}");
        return Ok(None);
    }
    Ok(Some(CacheSpec { url: url.to_string(), extra_ca }))
}

/// `--ready-pattern` compiled (default: the diagnostics' OK line or the publisher guest's ready line). An
/// empty pattern would match every line, so it is refused.
fn ready_pattern(p: Option<&str>) -> Result<regex::Regex> {
    let text = p.map_or_else(bootwatch::default_ready_pattern, str::to_owned);
    if text.is_empty() {
        return Err(Error::invalid("--ready-pattern \"\"", "is empty (it would match every console line)"));
    }
    regex::Regex::new(&text).map_err(|e| {
        let why = e.to_string().lines().last().unwrap_or_default().trim().to_owned();
        Error::invalid(
            format!("--ready-pattern \"{}\"", text.escape_default()),
            format!("not a regular expression: {why}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn sh_true() -> PathBuf {
        find_program("--qemu", Path::new("true")).unwrap()
    }

    #[test]
    fn config_checks_the_file_system_without_changing_it() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let state = d.join("state");
        let qemu = sh_true();
        let base = || LaunchOptions { qemu: qemu.clone(), qemu_img: qemu.clone(), ..LaunchOptions::new(&state) };
        let ok = LaunchConfig::from_options(&base()).unwrap();
        assert_eq!(ok.boot, BootTarget::Diagnostics);
        assert_eq!(ok.serial_log, state.join("serial.log"));
        assert_eq!(ok.disk.as_ref().unwrap().path, state.join("disk.qcow2"));
        assert_eq!((ok.memory_mib, ok.cpus, ok.accel), (2048, 2, AccelChoice::Auto));
        assert!(!state.exists(), "validation must not create the state dir");

        let file = d.join("file");
        std::fs::write(&file, b"x").unwrap();
        let notq = d.join("raw.img");
        std::fs::write(&notq, b"not a qcow2").unwrap();
        let bootdir = d.join("www");
        std::fs::create_dir(&bootdir).unwrap();
        let www = d.join("www2");
        std::fs::create_dir(&www).unwrap();
        std::fs::write(www.join("netboot.ipxe"), b"#!ipxe\n").unwrap();
        let (f, nd) = (file.clone(), || LaunchOptions { no_disk: true, ..base() });
        // A PEM file with one certificate item (its DER is not looked at here).
        let pem = d.join("ca.pem");
        std::fs::write(&pem, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let with_ca = |url: &str, cache: Option<bool>| LaunchOptions {
            boot_url: Some(url.parse().unwrap()),
            boot_cache: cache,
            boot_ca: vec![pem.clone()],
            ..nd()
        };
        let cases: Vec<(LaunchOptions, &str)> = vec![
            (LaunchOptions { state_dir: f.clone(), ..base() }, "is not a directory"),
            (LaunchOptions { state_dir: f.join("sub"), ..base() }, "is not a directory"),
            (
                LaunchOptions { qemu: "/nonexistent/qemu".into(), ..base() },
                "--qemu \"/nonexistent/qemu\": no such file",
            ),
            (LaunchOptions { qemu: f.clone(), ..base() }, "is not an executable file"),
            (LaunchOptions { qemu: "no-such-qemu-binary".into(), ..base() }, "not found on PATH"),
            (LaunchOptions { ipxe: Some("/nonexistent.lkrn".into()), ..base() }, "--ipxe \"/nonexistent.lkrn\""),
            (LaunchOptions { boot_dir: Some(f.clone()), ..nd() }, "is not a directory"),
            (LaunchOptions { boot_dir: Some(bootdir.clone()), ..nd() }, "has no netboot.ipxe"),
            (LaunchOptions { disk: Some(notq.clone()), ..base() }, "not a qcow2"),
            (LaunchOptions { qemu_img: "/nonexistent/qemu-img".into(), ..base() }, "--qemu-img"),
            (LaunchOptions { serial_log: Some("/nonexistent/dir/log".into()), ..nd() }, "--serial-log"),
            (
                LaunchOptions {
                    lan_interface: Some("x".parse().unwrap()),
                    lan_nic_model: "e1000".parse().unwrap(),
                    lan_queues: 2,
                    ..nd()
                },
                "--lan-queues 2",
            ),
            (
                LaunchOptions {
                    lan_interface: Some("x".parse().unwrap()),
                    lan_nic_model: "e1000".parse().unwrap(),
                    lan_vhost: VhostMode::On,
                    ..nd()
                },
                "--lan-vhost on: vhost-net serves virtio-net NICs only, not \"e1000\"",
            ),
            (LaunchOptions { state_dir: format!("/{}", "x".repeat(120)).into(), ..base() }, "path too long"),
            (
                LaunchOptions { boot_dir: Some(www.clone()), boot_http_bind: "::1".parse().unwrap(), ..nd() },
                "--boot-http-bind ::1",
            ),
            (
                LaunchOptions { boot_url: Some("http://a/".parse().unwrap()), boot_dir: Some(www.clone()), ..nd() },
                "--boot-url and --boot-dir",
            ),
            // What the CLI refuses while parsing, the library refuses too.
            (LaunchOptions { cpus: 0, ..base() }, "--cpus 0"),
            (LaunchOptions { cpus: 256, ..base() }, "--cpus 256"),
            (LaunchOptions { lan_queues: 17, ..base() }, "--lan-queues 17"),
            (LaunchOptions { shutdown_timeout: Duration::from_secs(3601), ..base() }, "--shutdown-timeout 3601"),
            (LaunchOptions { disk: Some(d.join("a.qcow2")), ..nd() }, "--disk and --no-disk"),
            (LaunchOptions { extra: vec!["-S".into(), "a\0b".into()], ..nd() }, "extra QEMU argument #2"),
            (LaunchOptions { boot_cache: Some(true), ..nd() }, "--boot-cache on: needs an http:// or https://"),
            (
                LaunchOptions { boot_url: Some("tftp://10.0.2.2/x".parse().unwrap()), boot_cache: Some(true), ..nd() },
                "--boot-cache on: needs an http://",
            ),
            (
                LaunchOptions {
                    boot_url: Some("https://a/b/c.ipxe".parse().unwrap()),
                    boot_ca: vec![f.clone()],
                    ..nd()
                },
                "holds no PEM certificate",
            ),
            (
                LaunchOptions {
                    boot_url: Some("https://a/b/c.ipxe".parse().unwrap()),
                    boot_ca: vec![d.join("missing.pem")],
                    ..nd()
                },
                "--boot-ca: ",
            ),
            (
                LaunchOptions {
                    boot_url: Some("https://a/b/c.ipxe".parse().unwrap()),
                    boot_cache: Some(false),
                    boot_ca: vec![f.clone()],
                    ..nd()
                },
                "--boot-ca",
            ),
            // A CA for a cache that is off, by flag or because the URL cannot be cached, is never ignored.
            (with_ca("https://a/b/c.ipxe", Some(false)), "--boot-ca: is for the boot cache, which --boot-cache off"),
            (with_ca("http://10.0.2.2:8080/c.ipxe", None), "--boot-ca: is for the boot cache, which is off here: "),
            (with_ca("https://a/c.ipxe?m=${net0/mac}", None), "--boot-ca: is for the boot cache, which is off here: "),
            (with_ca("tftp://a/c.ipxe", None), "--boot-ca: is for the boot cache, which needs an http://"),
            (
                LaunchOptions { boot_url: Some("https://a/b/".parse().unwrap()), boot_cache: Some(true), ..nd() },
                "--boot-cache on: https://a/b/: the URL must name a file",
            ),
        ];
        for (opts, needle) in cases {
            let err = LaunchConfig::from_options(&opts).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{opts:?}: {err}");
            assert!(err.to_string().contains(needle), "{opts:?}: {err}");
        }
        assert!(!state.exists());
    }

    #[test]
    fn the_boot_cache_is_on_by_default_for_http_and_https_only() {
        let tmp = tempfile::tempdir().unwrap();
        let qemu = sh_true();
        let base = |url: &str, cache: Option<bool>| LaunchOptions {
            qemu: qemu.clone(),
            no_disk: true,
            boot_url: Some(url.parse().unwrap()),
            boot_cache: cache,
            ..LaunchOptions::new(tmp.path().join("s"))
        };
        let on = |url: &str, cache| LaunchConfig::from_options(&base(url, cache)).unwrap().boot_cache;
        assert_eq!(on("https://a/b/c.ipxe", None).unwrap().url, "https://a/b/c.ipxe");
        assert!(on("http://a/c.ipxe", None).is_some());
        assert!(on("http://a/c.ipxe", Some(false)).is_none());
        assert!(on("tftp://a/c.ipxe", None).is_none());
        // iPXE settings in the URL cannot be expanded on the host: the default falls back to a direct chain.
        assert!(on("http://a/c.ipxe?mac=${net0/mac}", None).is_none());
        // The host as the guest sees it: the files are here already.
        assert!(on("http://10.0.2.2:8080/c.ipxe", None).is_none());
        let err = LaunchConfig::from_options(&base("http://10.0.2.2:8080/c.ipxe", Some(true))).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
