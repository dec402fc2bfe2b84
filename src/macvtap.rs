//! The macvtap lifecycle the `ec-macvtap` commands and the launcher share: create (idempotent, owned,
//! rolled back on failure), delete (ours only), show, and open (verified queues).

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::link::{self, LinkView, MacvtapSpec, Netlink};
use crate::names::{IfName, MacAddr, MacvtapMode, OwnerSpec};
use crate::netns::{self, NetnsSpec};
use crate::tap::{self, DevNum};

/// One macvtap as `show --json` and `create --json` print it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TapInfo {
    pub name: String,
    pub ifindex: u32,
    pub parent: Option<String>,
    pub mode: Option<MacvtapMode>,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u32>,
    pub up: bool,
    pub carrier: bool,
    pub owned: bool,
    pub tap_device: Option<PathBuf>,
    pub tap_devnum: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
}

impl TapInfo {
    /// One line for people: `ec-lan0 on eno1 bridge 02:..:.. mtu 1500 up carrier owned /dev/tap5 (246:1)`.
    pub fn human_line(&self) -> String {
        let opt = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        format!(
            "{} on {} mode {} mac {} mtu {} {} {} {} tap {} ({})",
            self.name,
            opt(self.parent.clone()),
            opt(self.mode.map(|m| m.to_string())),
            opt(self.mac.map(|m| m.to_string())),
            opt(self.mtu.map(|m| m.to_string())),
            if self.up { "up" } else { "down" },
            if self.carrier { "carrier" } else { "no-carrier" },
            if self.owned { "owned" } else { "foreign" },
            opt(self.tap_device.as_ref().map(|p| p.display().to_string())),
            opt(self.tap_devnum.clone()),
        )
    }
}

/// What `create` was asked, validated and resolved before any netlink call.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    pub spec: MacvtapSpec,
    pub owner: Option<(Uid, Gid)>,
    pub replace: bool,
}

/// Resolve `USER[:GROUP]` (names or numbers) to ids; without a group, the user's primary group.
pub fn resolve_owner(owner: &OwnerSpec) -> Result<(Uid, Gid)> {
    let user = match owner.user.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)),
        Err(_) => User::from_name(&owner.user),
    }
    .map_err(|e| Error::errno(format!("look up user \"{}\"", owner.user), e))?;
    let (uid, primary) = match (user, owner.user.parse::<u32>()) {
        (Some(u), _) => (u.uid, Some(u.gid)),
        (None, Ok(n)) => (Uid::from_raw(n), None),
        (None, Err(_)) => return Err(Error::not_found(format!("owner user \"{}\"", owner.user))),
    };
    let gid = match &owner.group {
        None => primary.unwrap_or_else(|| Gid::from_raw(uid.as_raw())),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => Gid::from_raw(n),
            Err(_) => {
                Group::from_name(g)
                    .map_err(|e| Error::errno(format!("look up group \"{g}\""), e))?
                    .ok_or_else(|| Error::not_found(format!("owner group \"{g}\"")))?
                    .gid
            }
        },
    };
    Ok((uid, gid))
}

/// The machine id for the derived MAC: `/etc/machine-id`, else D-Bus's copy.
pub fn machine_id() -> Result<String> {
    for p in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(s) = std::fs::read_to_string(p)
            && !s.trim().is_empty()
        {
            return Ok(s.trim().to_owned());
        }
    }
    Err(Error::not_found("machine id (/etc/machine-id) needed to derive a stable MAC; pass --mac instead".to_string()))
}

fn info_of(v: &LinkView, links: &[LinkView], tap: Option<(PathBuf, DevNum)>) -> TapInfo {
    let parent = v.parent_ifindex.and_then(|p| links.iter().find(|l| l.ifindex == p)).map(|l| l.name.clone());
    TapInfo {
        name: v.name.clone(),
        ifindex: v.ifindex,
        parent,
        mode: v.mode,
        mac: v.mac,
        mtu: v.mtu,
        up: v.up,
        carrier: v.carrier,
        owned: v.owned(),
        tap_device: tap.as_ref().map(|(p, _)| p.clone()),
        tap_devnum: tap.map(|(_, d)| d.to_string()),
        changed: None,
    }
}

/// Tap node and number of a macvtap in the current namespace, without creating anything.
fn tap_of(name: &str, ifindex: u32) -> Option<(PathBuf, DevNum)> {
    let name: IfName = name.parse().ok()?;
    let dev = tap::sysfs_devnum(&name, ifindex).ok()?;
    let ns = netns::current_netns_inode().ok()?;
    let path = tap::find_node(&name, ifindex, dev, ns).unwrap_or_else(|_| tap::public_node_path(ifindex));
    Some((path, dev))
}

pub fn create(ns: Option<&NetnsSpec>, req: &CreateRequest) -> Result<TapInfo> {
    netns::run_in(ns, || {
        let nl = Netlink::new()?;
        nl.block_on(create_here(&nl, req))
    })
}

async fn create_here(nl: &Netlink, req: &CreateRequest) -> Result<TapInfo> {
    let h = &nl.handle;
    let spec = &req.spec;
    let what = format!("create macvtap \"{}\" on \"{}\"", spec.name, spec.parent);
    let parent = link::get_by_name(h, &spec.parent)
        .await?
        .ok_or_else(|| Error::not_found(format!("{what}: parent link \"{}\"", spec.parent)))?;
    if let Some(reason) = link::parent_problem(&parent, link::sysfs_is_wireless(&parent.name)) {
        return Err(Error::invalid(what, reason));
    }

    let links = link::dump(h).await?;
    if let Some(existing) = links.iter().find(|l| l.name == spec.name.as_str()) {
        if !existing.owned() {
            return Err(Error::conflict(
                format!("link \"{}\"", spec.name),
                format!(
                    "exists and is not managed by ec-macvtap (kind {}, no \"{}\" alias); not touching it",
                    existing.kind.as_deref().unwrap_or("unknown"),
                    crate::names::OWNER_MARKER
                ),
            ));
        }
        let diff = link::differences(existing, spec, parent.ifindex);
        if diff.is_empty() {
            // Ours and as asked: make sure it is usable, change nothing else.
            let (path, dev) = finish(nl, existing.ifindex, req).await?;
            let mut info = info_of(&refetch(h, existing.ifindex, &spec.name).await?, &links, Some((path, dev)));
            info.changed = Some(false);
            return Ok(info);
        }
        if !req.replace {
            return Err(Error::conflict(
                format!("link \"{}\"", spec.name),
                format!("exists with a different configuration ({}); pass --replace to recreate it", diff.join(", ")),
            ));
        }
    }
    // Every refusal comes before the first change: a refused --replace must leave the old link in place.
    if let Some(user) = link::mac_user(&links, spec, parent.ifindex) {
        return Err(Error::conflict(
            format!("{what}: MAC {}", spec.mac),
            format!("already used by \"{}\" on the same parent", user.name),
        ));
    }
    if let Some(existing) = links.iter().find(|l| l.name == spec.name.as_str()) {
        tracing::info!(link = %spec.name, "replacing: {}", link::differences(existing, spec, parent.ifindex).join(", "));
        link::delete(h, existing.ifindex, spec.name.as_str()).await?;
    }

    h.link()
        .add(link::new_macvtap_message(spec, parent.ifindex))
        .execute()
        .await
        .map_err(|e| Error::netlink(what.clone(), e))?;
    let configured = async {
        let created = link::get_by_name(h, &spec.name)
            .await?
            .ok_or_else(|| Error::Runtime(format!("{what}: the link vanished right after creation")))?;
        let tap = finish(nl, created.ifindex, req).await?;
        let now = refetch(h, created.ifindex, &spec.name).await?;
        let mut info = info_of(&now, &links, Some(tap));
        info.changed = Some(true);
        Ok(info)
    }
    .await;
    if configured.is_err() {
        // Rollback: the link (and a private node) must not outlive a failed create. The name is ours: the
        // kernel just created it exclusively.
        if let Err(del) = link::delete_by_name(h, &spec.name).await {
            tracing::error!("rollback of \"{}\" failed: {del}", spec.name);
        }
        if let Ok(ns) = netns::current_netns_inode() {
            let _ = tap::remove_private_node(&spec.name, ns);
        }
    }
    configured
}

async fn refetch(h: &rtnetlink::Handle, ifindex: u32, name: &IfName) -> Result<LinkView> {
    link::get_by_index(h, ifindex)
        .await?
        .ok_or_else(|| Error::Runtime(format!("link \"{name}\" vanished while being configured")))
}

/// Mark, configure and bring the link up; make its node (checked by device number) usable by the owner.
async fn finish(nl: &Netlink, ifindex: u32, req: &CreateRequest) -> Result<(PathBuf, DevNum)> {
    let h = &nl.handle;
    let name = &req.spec.name;
    let ipv6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
    h.link()
        .set(link::mark_message(ifindex, ipv6))
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("set alias and addrgenmode on \"{name}\""), e))?;
    h.link()
        .set(link::up_message(ifindex))
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("bring up \"{name}\""), e))?;
    let dev = tap::sysfs_devnum(name, ifindex)?;
    let ns = netns::current_netns_inode()?;
    // The node is checked by device number (sysfs vs stat), not by opening it: closing a macvtap queue
    // costs the kernel an RCU grace period (about 9 ms here), and every fd that is handed on is verified
    // with TUNGETIFF by `open` anyway.
    let path = tap::ensure_node(name, ifindex, dev, ns, req.owner)?;
    Ok((path, dev))
}

/// Result of `delete`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DeleteOutcome {
    pub name: String,
    /// `deleted` or `absent`.
    pub result: &'static str,
    pub removed_private_node: bool,
}

pub fn delete(ns: Option<&NetnsSpec>, name: &IfName) -> Result<DeleteOutcome> {
    netns::run_in_without_sysfs(ns, || {
        let nl = Netlink::new()?;
        nl.block_on(async {
            let existing = link::get_by_name(&nl.handle, name).await?;
            // Teardown keeps going: the node is removed even when the link is already gone.
            let mut result = "absent";
            let mut link_err = None;
            if let Some(l) = existing {
                if !l.owned() {
                    return Err(Error::conflict(
                        format!("link \"{name}\""),
                        format!(
                            "is not managed by ec-macvtap (kind {}, no \"{}\" alias); not deleting it",
                            l.kind.as_deref().unwrap_or("unknown"),
                            crate::names::OWNER_MARKER
                        ),
                    ));
                }
                match link::delete(&nl.handle, l.ifindex, name.as_str()).await {
                    Ok(()) => result = "deleted",
                    // Gone between lookup and delete: somebody else finished the job.
                    Err(e) if e.netlink_errno() == Some(nix::errno::Errno::ENODEV as i32) => {}
                    Err(e) => link_err = Some(e),
                }
            }
            let removed = tap::remove_private_node(name, netns::current_netns_inode()?)?;
            match link_err {
                Some(e) => Err(e),
                None => Ok(DeleteOutcome { name: name.to_string(), result, removed_private_node: removed }),
            }
        })
    })
}

pub fn show(ns: Option<&NetnsSpec>, name: Option<&IfName>) -> Result<Vec<TapInfo>> {
    netns::run_in(ns, || {
        let nl = Netlink::new()?;
        let links = nl.block_on(link::dump(&nl.handle))?;
        if let Some(n) = name {
            let l =
                links.iter().find(|l| l.name == n.as_str()).ok_or_else(|| Error::not_found(format!("link \"{n}\"")))?;
            if !l.is_macvtap() {
                return Err(Error::invalid(
                    format!("link \"{n}\""),
                    format!("is a {} link, not a macvtap", l.kind.as_deref().unwrap_or("physical")),
                ));
            }
        }
        Ok(links
            .iter()
            .filter(|l| l.is_macvtap() && name.is_none_or(|n| l.name == n.as_str()))
            .map(|l| info_of(l, &links, tap_of(&l.name, l.ifindex)))
            .collect())
    })
}

/// An opened, verified macvtap: what `exec` and the launcher hand to QEMU.
#[derive(Debug)]
pub struct OpenedTap {
    pub name: IfName,
    pub ifindex: u32,
    pub mac: MacAddr,
    pub node: PathBuf,
    pub devnum: DevNum,
    pub fds: Vec<OwnedFd>,
}

/// Open `queues` verified fds on the macvtap `name`. When the node is missing and we are root, a private
/// node is made (without changing its owner).
pub fn open(ns: Option<&NetnsSpec>, name: &IfName, queues: u32) -> Result<OpenedTap> {
    netns::run_in(ns, || {
        let nl = Netlink::new()?;
        let l = nl
            .block_on(link::get_by_name(&nl.handle, name))?
            .ok_or_else(|| Error::not_found(format!("macvtap \"{name}\"")))?;
        if !l.is_macvtap() {
            return Err(Error::invalid(
                format!("link \"{name}\""),
                format!("is a {} link, not a macvtap", l.kind.as_deref().unwrap_or("physical")),
            ));
        }
        let mac = l.mac.ok_or_else(|| Error::Runtime(format!("macvtap \"{name}\" has no MAC address")))?;
        let dev = tap::sysfs_devnum(name, l.ifindex)?;
        let ns_inode = netns::current_netns_inode()?;
        let node = match tap::find_node(name, l.ifindex, dev, ns_inode) {
            Ok(p) => p,
            Err(e) if Uid::effective().is_root() => {
                tracing::debug!("{e}; making a private node");
                tap::ensure_node(name, l.ifindex, dev, ns_inode, None)?
            }
            Err(e) => return Err(e),
        };
        let fds = tap::open_queues(&node, name, dev, queues)?;
        Ok(OpenedTap { name: name.clone(), ifindex: l.ifindex, mac, node, devnum: dev, fds })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let info = TapInfo {
            name: "ec-lan0".into(),
            ifindex: 7,
            parent: Some("eno1".into()),
            mode: Some(MacvtapMode::Bridge),
            mac: Some(MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc])),
            mtu: Some(1500),
            up: true,
            carrier: false,
            owned: true,
            tap_device: Some(PathBuf::from("/dev/tap7")),
            tap_devnum: Some("246:1".into()),
            changed: None,
        };
        let v = serde_json::to_value(&info).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want =
            ["name", "ifindex", "parent", "mode", "mac", "mtu", "up", "carrier", "owned", "tap_device", "tap_devnum"];
        want.sort();
        let mut got = keys.clone();
        got.sort();
        assert_eq!(got, want, "show has no `changed`");
        assert_eq!(v["mac"], "52:54:00:aa:bb:cc");
        assert_eq!(v["mode"], "bridge");
        assert_eq!(v["tap_devnum"], "246:1");
        let created = TapInfo { changed: Some(true), ..info };
        assert_eq!(serde_json::to_value(&created).unwrap()["changed"], true);
        assert!(created.human_line().starts_with("ec-lan0 on eno1 mode bridge mac 52:54:00:aa:bb:cc"));
    }

    #[test]
    fn owners_resolve_by_name_and_number() {
        let root: OwnerSpec = "root".parse().unwrap();
        assert_eq!(resolve_owner(&root).unwrap(), (Uid::from_raw(0), Gid::from_raw(0)));
        let numeric: OwnerSpec = "4242:4243".parse().unwrap();
        assert_eq!(resolve_owner(&numeric).unwrap(), (Uid::from_raw(4242), Gid::from_raw(4243)));
        let missing: OwnerSpec = "ec-no-such-user".parse().unwrap();
        assert_eq!(resolve_owner(&missing).unwrap_err().exit_code(), 3);
    }
}
