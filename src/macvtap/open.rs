//! Opening a macvtap's tap queues, verified: what `exec` and the launcher hand to QEMU.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use super::*;

/// An opened, verified macvtap: what `exec` and the launcher hand to QEMU.
#[derive(Debug)]
pub struct OpenedTap {
    pub name: IfName,
    pub ifindex: u32,
    pub mac: MacAddr,
    /// The node the queues were opened through (a temporary node is already gone).
    pub node: PathBuf,
    pub devnum: DevNum,
    pub fds: Vec<OwnedFd>,
}

/// Open `queues` verified fds on the macvtap `name`. When no usable node exists and we are root, the queues
/// are opened through a temporary node that is removed at once: nothing is left behind, whoever owns the
/// link.
pub fn open(ns: Option<&NetnsSpec>, name: &IfName, queues: u32) -> Result<OpenedTap> {
    netns::run_in(ns, || open_here(ns, name, queues))
}

/// [`open()`] on a thread that is already in the link's namespace (`ns` only names it in messages).
pub fn open_here(ns: Option<&NetnsSpec>, name: &IfName, queues: u32) -> Result<OpenedTap> {
    let nl = Netlink::new()?;
    let l = nl
        .block_on(link::get_by_name(&nl.handle, name))?
        .ok_or_else(|| Error::not_found(format!("macvtap \"{name}\" in {}", netns::describe_current(ns))))?;
    if !l.is_macvtap() {
        return Err(not_a_macvtap(&l));
    }
    let mac = l.mac.ok_or_else(|| Error::Runtime(format!("macvtap \"{name}\" has no MAC address")))?;
    let dev = tap::sysfs_devnum(name, l.ifindex)?;
    let ns_inode = netns::current_netns_inode()?;
    tracing::debug!("tap of \"{name}\" is char {dev}; opening {queues} queue(s)");
    let (node, fds) = match nodedir::find_node(name, l.ifindex, dev, ns_inode) {
        Ok(p) => {
            let fds = tap::open_queues(&p, name, dev, queues)?;
            (p, fds)
        }
        Err(e) if Uid::effective().is_root() => {
            tracing::debug!("{e}; opening through a temporary node");
            let _lock = netns::lock_current()?;
            let dir = NodeDir::create(ns_inode)?;
            let opened = dir.with_temporary_node(name, dev, |p| {
                tap::open_queues(p, name, dev, queues).map(|fds| (p.to_owned(), fds))
            });
            dir.remove_if_empty();
            opened?
        }
        Err(e) => return Err(e),
    };
    Ok(OpenedTap { name: name.clone(), ifindex: l.ifindex, mac, node, devnum: dev, fds })
}
