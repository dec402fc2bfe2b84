//! The launcher behind `ec-ipxe-qemu`: plain options ([`options`], made of the value types in [`values`]),
//! validated into a configuration ([`config`], with the file-system checks in [`fscheck`]), the pure parts
//! (the QEMU argv in [`qemu_args`], the iPXE script in [`ipxe`]) and the I/O (state directory, `--boot-dir`
//! HTTP server, QMP, link watch, supervision).

pub mod accel;
pub mod banner;
pub mod config;
pub mod fscheck;
pub mod httpd;
pub mod ipxe;
pub mod lanlock;
pub mod linkwatch;
pub mod options;
pub mod qemu_args;
pub mod qmp;
pub mod state;
pub mod supervise;
pub mod values;
pub mod vhost;

use crate::error::{Error, Result};
use crate::link::{self, LinkView, Netlink};
use crate::names::{IfName, MacAddr};
use config::LaunchConfig;
use qemu_args::LanNic;

/// The MAC of the macvtap `name`, read over netlink without opening anything.
pub fn lan_mac(name: &IfName) -> Result<MacAddr> {
    let l = lan_link(name)?;
    l.mac.ok_or_else(|| Error::Runtime(format!("macvtap \"{name}\" has no MAC address")))
}

/// The macvtap `name` as netlink shows it (not found: exit 3; not a macvtap: exit 2).
pub fn lan_link(name: &IfName) -> Result<LinkView> {
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

/// The argv `run` would execute, with no side effects: the accelerator is resolved the same way, and the LAN
/// NIC's MAC is read from the existing macvtap (so `print-args --lan-interface X` needs X to exist).
pub fn print_args(cfg: &LaunchConfig) -> Result<Vec<String>> {
    let accel = accel::resolve(cfg.accel)?;
    let queues = cfg.lan.as_ref().map_or(0, |l| l.queues);
    let lan = match &cfg.lan {
        Some(l) => Some(LanNic {
            mac: lan_mac(&l.interface)?,
            fds: (0..l.queues as i32).map(|i| supervise::FIRST_TAP_FD + i).collect(),
            vhost_fds: Vec::new(),
        }),
        None => None,
    };
    Ok(qemu_args::build(cfg, accel, lan.as_ref(), supervise::qmp_fd(queues)))
}
