//! The launcher behind `ec-ipxe-qemu`, private to the crate (its map, one line per file, is
//! `docs/architecture.md`). In the order a run meets it:
//!
//! ```text
//! options, option_values  what a caller asks, as plain values      (the cli converts into these)
//! config, fscheck         validated against each other and the disk, changing nothing
//! layout                  the state directory's file names and the slirp addresses
//! qemu_args, ipxe         the pure parts: the QEMU argv with its fd plan, the boot script
//! run/                    the supervisor: prepare, qemu (start), watch (event loop), stop (ladder), tracker
//! console/                the guest console: broker, lines, serial.log, sink, bootwatch, banner, client
//! status, statedir        status.json (and `status`), the locked state directory
//! private                 the private state directory's rules: owner and mode, what may stand where, temporary
//!                         files, leftovers, file holders, QEMU's argv limits
//! credentials             systemd credentials for the guest: names, files, the fw_cfg arguments
//! doctor/                 every check `run` depends on
//! accel, vhost, lanlock, linkwatch, httpd, qmp, notify, ipxe_image   one resource each
//! ```

pub(crate) mod accel;
pub(crate) mod config;
pub(crate) mod console;
pub(crate) mod credentials;
pub(crate) mod doctor;
mod fscheck;
mod httpd;
mod ipxe;
mod ipxe_image;
pub(crate) mod lanlock;
mod layout;
mod linkwatch;
mod notify;
pub(crate) mod option_values;
pub(crate) mod options;
pub(crate) mod private;
mod qemu_args;
mod qmp;
pub(crate) mod run;
mod statedir;
pub(crate) mod status;
pub(crate) mod vhost;

pub use linkwatch::{LinkEnd, LinkWatch};

use crate::error::{Error, Result};
use crate::link::{self, LinkView, Netlink};
use crate::names::{IfName, MacAddr};
use config::LaunchConfig;
use ipxe_image::Https;

/// The MAC of the macvtap `name`, read over netlink without opening anything.
pub(crate) fn lan_mac(name: &IfName) -> Result<MacAddr> {
    let l = lan_link(name)?;
    l.mac.ok_or_else(|| Error::Runtime(format!("macvtap \"{name}\" has no MAC address")))
}

/// The macvtap `name` as netlink shows it (not found: exit 3; not a macvtap: exit 2).
pub(crate) fn lan_link(name: &IfName) -> Result<LinkView> {
    let nl = Netlink::new()?;
    let l = nl
        .block_on(link::get_by_name(&nl.handle, name))?
        .ok_or_else(|| Error::not_found(format!("--lan-interface \"{name}\": macvtap")))?;
    if !l.is_macvtap() {
        return Err(Error::invalid(
            format!("--lan-interface \"{name}\""),
            format!("is a {} link, not a macvtap", l.kind.as_deref().unwrap_or("physical")),
        ));
    }
    Ok(l)
}

/// An https boot URL: warn before start when the iPXE that will fetch it has no HTTPS (told from the image:
/// see [`ipxe_image`]).
pub(crate) fn warn_without_https(cfg: &LaunchConfig, url: &str) {
    let (what, https) = ipxe_image::boot_ipxe_https(cfg.ipxe.as_deref(), &cfg.qemu, cfg.boot_nic_model.as_str());
    match https {
        Https::Yes => tracing::debug!("{what} has HTTPS (its \"https\" URI scheme is in the image)"),
        Https::No => tracing::warn!(
            "--boot-url {url}: {what} has no HTTPS support (its URI schemes, read from the image, lack \"https\"), \
             so the chain will fail; pass --ipxe with an HTTPS-capable ipxe.lkrn, or serve the boot files over http"
        ),
        Https::Unknown(why) => tracing::warn!(
            "--boot-url {url}: cannot tell whether {what} has HTTPS ({why}); if the chain fails with \"Operation not \
             supported\", pass --ipxe with an HTTPS-capable ipxe.lkrn"
        ),
    }
}

/// The argv `run` would execute, with no side effects: the accelerator is resolved the same way, and the LAN
/// NIC's MAC is read from the existing macvtap (so `print-args --lan-interface X` needs X to exist).
pub(crate) fn print_args(cfg: &LaunchConfig) -> Result<Vec<String>> {
    if let Some(c) = &cfg.boot_cache {
        tracing::info!(
            "boot cache on: the boot script will chain to the launcher's loopback server, which fetches {}",
            c.url
        );
    } else if let config::BootTarget::Url(u) = &cfg.boot
        && u.scheme() == "https"
    {
        warn_without_https(cfg, u.as_str());
    }
    let accel = accel::resolve(cfg.accel)?;
    credentials::log(&cfg.credentials);
    let lan = match &cfg.lan {
        Some(l) => {
            let mac = lan_mac(&l.interface)?;
            // Decided as `run` decides it: the device is opened (and closed again, which changes nothing).
            let vhost = vhost::open(l.vhost, l.queues, l.model.is_virtio())?;
            Some((mac, l.queues, vhost.fds.len() as u32))
        }
        None => None,
    };
    let argv = qemu_args::build(cfg, accel, &qemu_args::FdPlan::new(lan));
    private::check_argv_here(&argv)?;
    Ok(argv)
}

/// The checks of [`print_args`] on QEMU's command line for `run`, before anything is created.
pub(crate) fn run_argv_fits(cfg: &LaunchConfig, accel: accel::Accel) -> Result<()> {
    private::check_argv_here(&qemu_args::build(cfg, accel, &qemu_args::FdPlan::new(None)))
}
