//! vhost-net for the LAN NIC (`--lan-vhost auto|on|off`): the kernel moves the LAN NIC's packets between the
//! macvtap and the guest's virtio rings itself, instead of QEMU copying every frame through its own
//! userspace (tuner video is about 20 Mbit/s per tuner).
//!
//! The launcher opens `/dev/vhost-net` once per LAN queue, as libvirt does, and hands the fds to QEMU
//! (`vhost=on,vhostfd=` / `vhostfds=`), so QEMU itself needs neither the device path nor the permission.
//! Every fd is checked to be the vhost-net device (character device 10:238) before it is passed on.
//! - `auto` (default): vhost when the device opens; otherwise one log line saying why, and the LAN NIC works
//!   without it;
//! - `on`: a missing device (or the `vhost_net` module not loaded) is exit 3, a refused one (owner and mode,
//!   or a device cgroup such as systemd's `DevicePolicy`) exit 5;
//! - `off`: never.
//!
//! vhost-net serves virtio NICs only: with another `--lan-nic-model`, `auto` is off and `on` a usage error.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

use crate::error::{Error, Kind, Result};

/// The vhost-net device.
pub(crate) const DEVICE: &str = "/dev/vhost-net";
/// vhost-net is the misc character device 10:238 (`VHOST_NET_MINOR`).
pub(crate) const DEVNUM: (u64, u64) = (10, 238);
/// For tests only: open this path instead of [`DEVICE`] (the tests point it at a node they made with
/// `mknod ... c 10 238`, so the kernel's own refusals are exercised on machines without vhost-net).
pub(crate) const DEVICE_ENV: &str = "EC_VHOST_NET_DEVICE";

/// What `--lan-vhost` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VhostMode {
    #[default]
    Auto,
    On,
    Off,
}

impl VhostMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VhostMode::Auto => "auto",
            VhostMode::On => "on",
            VhostMode::Off => "off",
        }
    }
}

/// What the LAN NIC uses: the vhost-net fds (one per queue; empty when off; the reason is logged).
#[derive(Debug)]
pub(crate) struct Vhost {
    pub(crate) fds: Vec<OwnedFd>,
}

impl Vhost {
    fn off() -> Vhost {
        Vhost { fds: Vec::new() }
    }

    /// Whether vhost is in use.
    pub(crate) fn in_use(&self) -> bool {
        !self.fds.is_empty()
    }

    /// `"on"` or `"off"`, as `status.json`'s `vhost` and `doctor` show it.
    pub(crate) fn as_str(&self) -> &'static str {
        if self.in_use() { "on" } else { "off" }
    }
}

/// The device path: [`DEVICE`], or the test override.
pub(crate) fn device() -> PathBuf {
    std::env::var_os(DEVICE_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEVICE))
}

/// Why the device cannot be used, with the exit code `--lan-vhost on` gets.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unusable {
    /// Missing or not vhost-net (exit 3) as opposed to refused (exit 5).
    pub missing: bool,
    pub reason: String,
}

/// Open the device once, check it is vhost-net.
fn open_one(dev: &std::path::Path) -> std::result::Result<OwnedFd, Unusable> {
    let f = OpenOptions::new().read(true).write(true).open(dev).map_err(|e| {
        use nix::errno::Errno;
        let errno = e.raw_os_error().map(Errno::from_raw);
        match errno {
            Some(Errno::ENOENT) => Unusable {
                missing: true,
                reason: format!("{} does not exist (load the vhost_net module)", dev.display()),
            },
            Some(Errno::ENODEV | Errno::ENXIO) => Unusable {
                missing: true,
                reason: format!("{} has no driver behind it (load the vhost_net module)", dev.display()),
            },
            Some(Errno::EACCES) => Unusable {
                missing: false,
                reason: format!("permission denied opening {} (its owner and mode keep this user out)", dev.display()),
            },
            Some(Errno::EPERM) => Unusable {
                missing: false,
                reason: format!(
                    "opening {} is not allowed (a device cgroup, e.g. systemd's DevicePolicy without DeviceAllow={})",
                    dev.display(),
                    DEVICE
                ),
            },
            _ => Unusable { missing: false, reason: format!("open {}: {e}", dev.display()) },
        }
    })?;
    let m = f.metadata().map_err(|e| Unusable { missing: true, reason: format!("stat {}: {e}", dev.display()) })?;
    let rdev = m.rdev();
    let devnum = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    if !m.file_type().is_char_device() || devnum != DEVNUM {
        return Err(Unusable {
            missing: true,
            reason: format!(
                "{} is not the vhost-net device (character device {}:{})",
                dev.display(),
                DEVNUM.0,
                DEVNUM.1
            ),
        });
    }
    Ok(OwnedFd::from(f))
}

/// Whether the vhost-net device at `dev` opens for this user (what `doctor` reports); the fd is closed again.
pub(crate) fn availability(dev: &std::path::Path) -> std::result::Result<(), Unusable> {
    open_one(dev).map(drop)
}

/// What to do when the device opens but the NIC model cannot use it, or when it does not open.
pub(crate) fn hint() -> &'static str {
    "load the vhost_net module and let the launcher's user open /dev/vhost-net (the NixOS module does both)"
}

/// Open one vhost-net fd per LAN queue as `mode` asks. `virtio`: whether the LAN NIC model is virtio-net.
pub(crate) fn open(mode: VhostMode, queues: u32, virtio: bool) -> Result<Vhost> {
    open_at(&device(), mode, queues, virtio)
}

fn open_at(dev: &std::path::Path, mode: VhostMode, queues: u32, virtio: bool) -> Result<Vhost> {
    if mode == VhostMode::Off {
        return Ok(Vhost::off());
    }
    if !virtio {
        let why = "the LAN NIC model is not virtio-net (vhost-net serves virtio only)";
        if mode == VhostMode::On {
            return Err(Error::invalid("--lan-vhost on", why));
        }
        tracing::info!("vhost-net: off: {why}");
        return Ok(Vhost::off());
    }
    let mut fds = Vec::with_capacity(queues as usize);
    for _ in 0..queues {
        match open_one(dev) {
            Ok(fd) => fds.push(fd),
            Err(u) => {
                // The fds opened so far close on return.
                if mode == VhostMode::On {
                    let kind = if u.missing { Kind::NotFound } else { Kind::Permission };
                    return Err(Error::unusable(kind, "--lan-vhost on", u.reason));
                }
                tracing::warn!("vhost-net: off: {}; the LAN NIC's packets go through QEMU's userspace", u.reason);
                return Ok(Vhost::off());
            }
        }
    }
    tracing::info!("vhost-net: on ({} fd(s) from {})", fds.len(), dev.display());
    Ok(Vhost { fds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_and_non_virtio_never_open() {
        let missing = std::path::Path::new("/nonexistent/vhost-net");
        let v = open_at(missing, VhostMode::Off, 2, true).unwrap();
        assert!(!v.in_use());
        assert_eq!(v.as_str(), "off");
        let v = open_at(missing, VhostMode::Auto, 1, false).unwrap();
        assert!(!v.in_use());
        let e = open_at(missing, VhostMode::On, 1, false).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().starts_with("--lan-vhost on: "), "{e}");
    }

    #[test]
    fn missing_device_auto_falls_back_on_fails_with_3() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("vhost-net");
        let v = open_at(&missing, VhostMode::Auto, 1, true).unwrap();
        assert!(!v.in_use());
        let e = open_at(&missing, VhostMode::On, 1, true).unwrap_err();
        assert_eq!(e.exit_code(), 3, "{e}");
        assert_eq!(
            e.to_string(),
            format!("--lan-vhost on: {} does not exist (load the vhost_net module)", missing.display())
        );
    }

    #[test]
    fn a_device_that_is_not_vhost_net_is_refused() {
        // /dev/null opens read-write for anyone, but it is 1:3, not 10:238.
        let e = open_at(std::path::Path::new("/dev/null"), VhostMode::On, 1, true).unwrap_err();
        assert_eq!(e.exit_code(), 3, "{e}");
        assert!(e.to_string().contains("is not the vhost-net device (character device 10:238)"), "{e}");
        let v = open_at(std::path::Path::new("/dev/null"), VhostMode::Auto, 2, true).unwrap();
        assert!(!v.in_use());
    }
}
