//! `ec-ipxe-qemu doctor`: every check `run` depends on, without starting anything. Each check is ok, warn or
//! fail with a hint; the checks call the same code `run` does (the option validation, the file-system checks,
//! the macvtap opening, the lock and tap-holder scans), so doctor and run agree.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::bootcache;
use crate::error::Error;
use crate::launcher::config::{self, LaunchConfig};
use crate::launcher::layout::{DISK_IMAGE, LOCK_FILE};
use crate::launcher::options::LaunchOptions;
use crate::launcher::vhost::{self, VhostMode};
use crate::launcher::{credentials, fscheck, ipxe_image, status};

mod lan;
mod qemu;

use lan::check_lan;
use qemu::{check_accel, check_qemu};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CheckStatus {
    Ok,
    Warn,
    Fail,
}

impl CheckStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "fail",
        }
    }
}

/// One line of the report: `{"check", "status", "detail", "hint"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Check {
    pub check: &'static str,
    pub status: CheckStatus,
    pub detail: String,
    pub hint: Option<String>,
}

impl Check {
    pub(crate) fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Check { check, status: CheckStatus::Ok, detail: detail.into(), hint: None }
    }

    pub(crate) fn warn(check: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Check { check, status: CheckStatus::Warn, detail: detail.into(), hint: Some(hint.into()) }
    }

    pub(crate) fn fail(check: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Check { check, status: CheckStatus::Fail, detail: detail.into(), hint: Some(hint.into()) }
    }

    /// `fail  qemu          --qemu "/nonexistent": no such file` and, indented below, the hint.
    pub(crate) fn human(&self) -> String {
        let mut s = format!("{:<4}  {:<13} {}", self.status.as_str(), self.check, self.detail);
        if let Some(h) = &self.hint {
            s.push_str(&format!("\n      {:<13} hint: {h}", ""));
        }
        s
    }
}

/// Whether any check failed (doctor's exit status is 1 then).
pub(crate) fn any_failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == CheckStatus::Fail)
}

/// `vhost-net`: the LAN NIC's fast path, decided as `run` decides it (`--lan-vhost`, the NIC model, the device
/// opening for this user and being the real 10:238). With `auto` a device that does not open is a warning (the
/// LAN NIC works, slower); with `on` it is a fail, as `run` then exits 3 or 5.
pub(crate) fn check_vhost(o: &LaunchOptions, dev: &Path) -> Check {
    const NAME: &str = "vhost-net";
    if o.lan_interface.is_none() {
        return Check::ok(NAME, "not needed (no --lan-interface)");
    }
    if o.lan_vhost == VhostMode::Off {
        return Check::ok(NAME, "off (--lan-vhost off): the LAN NIC's packets go through QEMU's userspace");
    }
    if !o.lan_nic_model.is_virtio() {
        let why =
            format!("--lan-nic-model {} is not virtio-net (vhost-net serves virtio only)", o.lan_nic_model.as_str());
        return match o.lan_vhost {
            VhostMode::On => Check::fail(NAME, why, "use a virtio-net LAN model, or --lan-vhost auto or off"),
            _ => Check::ok(NAME, format!("off: {why}")),
        };
    }
    match (vhost::availability(dev), o.lan_vhost) {
        (Ok(()), _) => Check::ok(NAME, format!("on: {} opens read-write for this user", dev.display())),
        (Err(u), VhostMode::On) => Check::fail(
            NAME,
            format!("--lan-vhost on: {}", u.reason),
            format!("run would exit {}: {}", if u.missing { 3 } else { 5 }, vhost::hint()),
        ),
        (Err(u), _) => Check::warn(
            NAME,
            format!("off: {}", u.reason),
            format!("the LAN NIC runs without vhost (more CPU per packet): {}", vhost::hint()),
        ),
    }
}

/// The URL the host checks: the guest reaches the host's loopback at 10.0.2.2 (slirp), so that address means
/// 127.0.0.1 here.
fn host_side_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.strip_prefix("10.0.2.2") {
            Some(tail) if tail.is_empty() || tail.starts_with([':', '/', '?', '#']) => {
                format!("{scheme}://127.0.0.1{tail}")
            }
            _ => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// `boot-url`: reachable from the host: HEAD, then GET when the server refuses HEAD (405), with a timeout.
pub(crate) fn check_boot_url(url: &str, timeout: Duration) -> Check {
    const NAME: &str = "boot-url";
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
    if scheme == "tftp" {
        return Check::warn(NAME, format!("{url}: not checked (tftp)"), "check it from the host with a TFTP client");
    }
    if url.contains("${") {
        return Check::warn(
            NAME,
            format!("{url}: not checked: it contains iPXE settings the host cannot expand"),
            "check the URL by hand with the settings filled in",
        );
    }
    let target = host_side_url(url);
    let shown = if target == url { url.to_owned() } else { format!("{url} (as {target} from the host)") };
    // The host's roots (the system's, else the built-in ones): what the host itself trusts.
    let client =
        bootcache::origin::Roots::load(&[]).and_then(|roots| bootcache::origin::http_client(&roots, timeout, timeout));
    let client = match client {
        Ok(c) => c,
        Err(e) => return Check::fail(NAME, format!("{shown}: not checked: {e}"), "check the host's TLS setup"),
    };
    let mut method = "HEAD";
    let mut result = client.head(&target).send();
    if let Ok(r) = &result
        && r.status().as_u16() == 405
    {
        method = "GET";
        result = client.get(&target).send();
    }
    match result {
        Ok(r) if r.status().is_success() => Check::ok(NAME, format!("{shown}: {method} {}", r.status())),
        Ok(r) => {
            let code = r.status().as_u16();
            let hint = match code {
                404 => "the server has no such file: check the path (iPXE gets the same 404)",
                401 | 403 => "the server refuses it: check its access rules",
                _ => "the server answers with an error: check its logs",
            };
            Check::fail(NAME, format!("{shown}: {method} {}", r.status()), hint)
        }
        Err(e) if e.is_timeout() => Check::fail(
            NAME,
            format!("{shown}: no answer in {} s", timeout.as_secs()),
            "the server is down or a firewall drops the connection",
        ),
        Err(e) => {
            let what = bootcache::origin::describe(&e);
            let hint = if what == "connection refused" {
                "nothing listens there: start the boot server or fix the port"
            } else if what.starts_with("the host name does not resolve") {
                "check the name and DNS"
            } else {
                "check that the host reaches the server"
            };
            Check::fail(NAME, format!("{shown}: {what}"), hint)
        }
    }
}

/// An error of the launcher's own validation, as a failed check naming the exit status `run` would have.
pub(crate) fn fail_from(check: &'static str, e: &Error, hint: impl Into<String>) -> Check {
    Check::fail(check, e.to_string(), format!("{} (run would exit {})", hint.into(), e.exit_code()))
}

/// Where the checks look for the devices (tests point them elsewhere).
#[derive(Clone, Debug)]
pub(crate) struct Devices {
    pub kvm: PathBuf,
    pub vhost_net: PathBuf,
}

impl Default for Devices {
    fn default() -> Self {
        Devices { kvm: PathBuf::from("/dev/kvm"), vhost_net: vhost::device() }
    }
}

/// How long the boot URL check waits for the server.
pub(crate) const URL_TIMEOUT: Duration = Duration::from_secs(5);

/// Every check `run` depends on, in the order `run` meets them, changing nothing.
pub(crate) fn run_checks(o: &LaunchOptions, dev: &Devices) -> Vec<Check> {
    let mut out = vec![match LaunchConfig::from_options(o) {
        Ok(_) => Check::ok("configuration", "run accepts these options"),
        Err(e) => fail_from("configuration", &e, "run refuses these options before starting anything"),
    }];
    let (qemu, qemu_path) = check_qemu(&o.qemu);
    out.push(qemu);
    out.push(check_accel(o.accel, qemu_path.as_deref(), &dev.kvm));
    out.push(check_ipxe(o));
    out.push(check_boot(o));
    if let Some(c) = check_cache(o) {
        out.push(c);
    }
    out.push(check_state(o));
    out.push(check_disk(o));
    out.push(check_credentials(o));
    match &o.lan_interface {
        Some(name) => out.extend(check_lan(name, o.lan_queues)),
        None => out.push(Check::ok("lan-link", "no --lan-interface: the guest gets the user-mode boot NIC only")),
    }
    out.push(check_vhost(o, &dev.vhost_net));
    out
}

/// `credentials`: every credential file exists, is a regular file within the limits and opens for reading as
/// this user (the user QEMU runs as, which reads them).
fn check_credentials(o: &LaunchOptions) -> Check {
    const NAME: &str = "credentials";
    if o.credentials.is_empty() && o.credentials_from.is_none() {
        return Check::ok(NAME, "none (no --credential, --credentials-from or $CREDENTIALS_DIRECTORY)");
    }
    match credentials::collect(&o.credentials, o.credentials_from.as_deref()) {
        Ok(c) if c.is_empty() => Check::ok(NAME, "none: the credentials directory is empty"),
        Ok(c) => Check::ok(
            NAME,
            format!("readable by this user (uid {}): {}", nix::unistd::geteuid(), credentials::describe(&c)),
        ),
        Err(e) => fail_from(
            NAME,
            &e,
            "the user run runs as (and QEMU with it) must read each file; under systemd, LoadCredential= copies \
             root-only files into $CREDENTIALS_DIRECTORY for the unit's user",
        ),
    }
}

/// `ipxe`: what runs iPXE for the boot NIC (the `--ipxe` image or QEMU's NIC option ROM), and HTTPS when the
/// boot URL needs it.
fn check_ipxe(o: &LaunchOptions) -> Check {
    const NAME: &str = "ipxe";
    // With the boot cache, the host fetches the https URL: iPXE talks plain HTTP to the launcher.
    let https = o.boot_url.as_ref().is_some_and(|u| u.scheme() == "https") && !config::cache_wanted(o);
    let image = match &o.ipxe {
        Some(p) => {
            match fscheck::absolute("--ipxe", p).and_then(|p| fscheck::check_readable_file("--ipxe", &p).map(|()| p)) {
                Err(e) => return fail_from(NAME, &e, "point --ipxe at a readable ipxe.lkrn"),
                Ok(p) => Some(p),
            }
        }
        None => None,
    };
    if !https {
        return match image {
            Some(p) => Check::ok(NAME, format!("--ipxe {}: readable", p.display())),
            None => Check::ok(NAME, "the boot NIC's option ROM (QEMU's iPXE) loads the boot script over TFTP"),
        };
    }
    // The same reading of the image that `run` warns from before it starts.
    let qemu = fscheck::find_program("--qemu", &o.qemu).unwrap_or_else(|_| o.qemu.clone());
    let (what, verdict) = ipxe_image::boot_ipxe_https(image.as_deref(), &qemu, o.boot_nic_model.as_str());
    match verdict {
        ipxe_image::Https::Yes => Check::ok(NAME, format!("{what}: has HTTPS, which the https boot URL needs")),
        ipxe_image::Https::No => Check::fail(
            NAME,
            format!("{what} has no HTTPS support, and the boot URL is https"),
            "pass --ipxe with an HTTPS-capable ipxe.lkrn (nixpkgs' ipxe has it; Debian's does not), or serve the \
             boot files over http",
        ),
        ipxe_image::Https::Unknown(why) => Check::warn(
            NAME,
            format!("{what}: whether it has HTTPS could not be told ({why})"),
            "the boot URL is https: make sure the image was built with DOWNLOAD_PROTO_HTTPS",
        ),
    }
}

/// `boot-url` / `boot-dir`: where the boot script chains to, reachable from the host.
fn check_boot(o: &LaunchOptions) -> Check {
    match (&o.boot_url, &o.boot_dir) {
        (Some(u), _) if config::cache_wanted(o) => match bootcache::check_origin(u.as_str(), &o.boot_ca, URL_TIMEOUT) {
            Ok(detail) => Check::ok("boot-url", format!("{detail}; fetched by the boot cache on the host")),
            Err(why) => {
                let hint = if why.ends_with("connection refused") {
                    "nothing listens there: start the boot server or fix the port"
                } else {
                    "check the URL, the host's network and its TLS roots (--boot-ca FILE for a private CA)"
                };
                Check::fail(
                    "boot-url",
                    format!("the boot cache cannot fetch it: {why}"),
                    format!("{hint}; with a last good set the guest still boots from the cache"),
                )
            }
        },
        (Some(u), _) => check_boot_url(u.as_str(), URL_TIMEOUT),
        (None, Some(d)) => {
            match fscheck::absolute("--boot-dir", d).and_then(|d| fscheck::check_boot_dir(&d).map(|()| d)) {
                Ok(d) => Check::ok("boot-dir", format!("{}: served over HTTP, chains to netboot.ipxe", d.display())),
                Err(e) => fail_from("boot-dir", &e, "the directory must exist and hold netboot.ipxe"),
            }
        }
        (None, None) => Check::ok("boot-url", "no --boot-url: the built-in diagnostics script runs"),
    }
}

/// `boot-cache` (with `--boot-cache on`): whether a last good set exists, the boot when the origin fails.
fn check_cache(o: &LaunchOptions) -> Option<Check> {
    const NAME: &str = "boot-cache";
    let u = o.boot_url.as_ref().filter(|_| config::cache_wanted(o))?;
    let state = fscheck::absolute("--state-dir", &o.state_dir).ok()?;
    Some(match bootcache::read_good_set(&state, u.as_str()) {
        Some(g) => Check::ok(
            NAME,
            format!(
                "on: a last good set of {} files ({} bytes){}; the guest boots from it when the origin fails",
                g.files,
                g.bytes,
                g.marked.map(|(stage, at)| format!(", marked at {stage} {}", status::rfc3339(at))).unwrap_or_default()
            ),
        ),
        None => Check::warn(
            NAME,
            format!("on: no last good set for {u} yet in {}", state.join(bootcache::store::DIR).display()),
            "until a boot reaches ready, an origin failure leaves the guest in iPXE's retry loop",
        ),
    })
}

/// `state-dir`: usable (or creatable) by this user, not locked by a running launcher, the serial log writable.
fn check_state(o: &LaunchOptions) -> Check {
    const NAME: &str = "state-dir";
    let dir = match fscheck::absolute("--state-dir", &o.state_dir) {
        Ok(d) => d,
        Err(e) => return fail_from(NAME, &e, "give a directory"),
    };
    if let Err(e) = fscheck::check_state_dir(&dir) {
        return fail_from(NAME, &e, "give the user a directory of its own (the unit's StateDirectory= does)");
    }
    let lock = dir.join(LOCK_FILE);
    // Read from /proc/locks, never taken: a lock doctor takes, even briefly, could make a run starting at that
    // instant refuse.
    if matches!(status::held(&lock), Ok(true)) {
        let pid = std::fs::read_to_string(&lock).unwrap_or_default();
        let pid = pid.trim();
        let who = if pid.is_empty() { String::new() } else { format!(" (pid {pid})") };
        return Check::fail(
            NAME,
            format!("{}: in use by another ec-ipxe-qemu run{who}", dir.display()),
            "run would refuse a second guest on it (exit 4): stop the other run, or use another --state-dir",
        );
    }
    if let Some(log) = &o.serial_log {
        let checked =
            fscheck::absolute("--serial-log", log).and_then(|p| fscheck::check_output_file("--serial-log", &p));
        if let Err(e) = checked {
            return fail_from(NAME, &e, "--serial-log must be writable by this user");
        }
    }
    let what = if dir.is_dir() { "exists and is writable" } else { "is missing and will be created (0700)" };
    Check::ok(NAME, format!("{}: {what}; not in use", dir.display()))
}

/// `disk`: an existing qcow2 used as it is, or a missing one that qemu-img can create.
fn check_disk(o: &LaunchOptions) -> Check {
    const NAME: &str = "disk";
    if o.no_disk {
        return Check::ok(NAME, "--no-disk");
    }
    let path = match &o.disk {
        Some(p) => fscheck::absolute("--disk", p),
        None => fscheck::absolute("--state-dir", &o.state_dir).map(|d| d.join(DISK_IMAGE)),
    };
    let path = match path {
        Ok(p) => p,
        Err(e) => return fail_from(NAME, &e, "give a file path"),
    };
    match fscheck::check_disk("--disk", &path, o.disk.is_none()) {
        Err(e) => fail_from(NAME, &e, "move the file away or point --disk elsewhere"),
        Ok(true) => Check::ok(NAME, format!("{}: a qcow2 image, used as it is", path.display())),
        Ok(false) => match fscheck::find_program("--qemu-img", &o.qemu_img) {
            Ok(img) => Check::ok(
                NAME,
                format!("{}: missing; {} will create it ({} bytes)", path.display(), img.display(), o.disk_size),
            ),
            Err(e) => fail_from(NAME, &e, "install qemu-img (qemu-utils), point --qemu-img at it, or use --no-disk"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::accel::AccelChoice;

    #[test]
    fn slirp_host_address_is_loopback_from_the_host() {
        assert_eq!(host_side_url("http://10.0.2.2:8080/x.ipxe"), "http://127.0.0.1:8080/x.ipxe");
        assert_eq!(host_side_url("http://10.0.2.2/x"), "http://127.0.0.1/x");
        assert_eq!(host_side_url("http://10.0.2.20/x"), "http://10.0.2.20/x");
        assert_eq!(host_side_url("https://boot.example.org/x"), "https://boot.example.org/x");
    }

    #[test]
    fn json_and_human_shapes() {
        let c = Check::fail("qemu", "--qemu \"/nonexistent\": no such file", "install QEMU");
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"check": "qemu", "status": "fail", "detail": "--qemu \"/nonexistent\": no such file", "hint": "install QEMU"})
        );
        assert_eq!(serde_json::to_value(Check::ok("x", "y")).unwrap()["hint"], serde_json::Value::Null);
        assert!(c.human().starts_with("fail  qemu          --qemu \"/nonexistent\": no such file\n"), "{}", c.human());
        assert!(any_failed(&[Check::ok("a", ""), c]));
        assert!(!any_failed(&[Check::warn("a", "", "")]));
    }

    #[test]
    fn tcg_needs_no_kvm_and_auto_falls_back_with_a_warning() {
        assert_eq!(check_accel(AccelChoice::Tcg, None, Path::new("/nonexistent")).status, CheckStatus::Ok);
        let c = check_accel(AccelChoice::Auto, None, Path::new("/nonexistent/kvm"));
        assert_eq!(c.status, CheckStatus::Warn, "{c:?}");
        let c = check_accel(AccelChoice::Kvm, None, Path::new("/nonexistent/kvm"));
        assert_eq!(c.status, CheckStatus::Fail, "{c:?}");
    }
}
