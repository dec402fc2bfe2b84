//! The macvtap lifecycle the `ec-macvtap` commands and the launcher share: create (idempotent, owned,
//! rolled back on failure), delete (ours only), show, and open (verified queues).

use std::path::PathBuf;

use netlink_packet_route::link::InfoKind;

use nix::unistd::{Gid, Group, Uid, User};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::link::{self, LinkView, MacvtapSpec, Netlink};
use crate::names::{IfName, MacAddr, MachineId, MacvtapMode, OWNER_MARKER, OwnerSpec};
use crate::netns::{self, NetnsSpec};
use crate::nodedir::{self, NodeDir};
use crate::tap::{self, DevNum};

mod open;
mod show;

pub use open::{OpenedTap, open, open_here};
pub use show::show;

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
    // (uid_t)-1 and (gid_t)-1 mean "leave unchanged" to chown(2): such an owner could never be set.
    for (kind, id_type, id) in [("user", "uid", Some(owner.user.as_str())), ("group", "gid", owner.group.as_deref())] {
        if let Some(id) = id
            && id.parse::<u32>() == Ok(u32::MAX)
        {
            return Err(Error::invalid(
                format!("--owner {kind} {id}"),
                format!("4294967295 is ({}_t)-1, which chown(2) reads as \"leave unchanged\"; name a real id", id_type),
            ));
        }
    }
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
pub fn machine_id() -> Result<MachineId> {
    for p in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(s) = std::fs::read_to_string(p)
            && !s.trim().is_empty()
        {
            return s.parse().map_err(|e: String| Error::invalid(p, format!("{e}; pass --mac instead")));
        }
    }
    Err(Error::not_found("machine id (/etc/machine-id) needed to derive a stable MAC; pass --mac instead".to_string()))
}

fn info_of(v: &LinkView, parent: Option<String>, dev: Option<DevNum>, node: Option<PathBuf>) -> TapInfo {
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
        tap_device: node,
        tap_devnum: dev.map(|d| d.to_string()),
        changed: None,
    }
}

fn not_a_macvtap(l: &LinkView) -> Error {
    Error::invalid(
        format!("link \"{}\"", l.name),
        format!("is a {} link, not a macvtap", l.kind.as_deref().unwrap_or("physical")),
    )
}

fn foreign(l: &LinkView, doing: &str) -> Error {
    Error::conflict(
        format!("link \"{}\"", l.name),
        format!(
            "is not managed by ec-macvtap (kind {}, no \"{}\" alias); {doing}",
            l.kind.as_deref().unwrap_or("unknown"),
            crate::names::OWNER_MARKER
        ),
    )
}

/// Create the macvtap as asked ([`CreateRequest`]). Crash-consistent: the link is made down under
/// [`link::temporary_name`], then renamed and marked in one request, then brought up. Whenever a SIGKILL
/// lands, what is left is either nothing, a link under the temporary name (which the next `create` or
/// `delete` of that name removes), or our marked link (which the next `create` finishes). Runs on one
/// namespace hold its lock, so concurrent identical creates end with one link and all succeed.
pub fn create(ns: Option<&NetnsSpec>, req: &CreateRequest) -> Result<TapInfo> {
    netns::run_in(ns, || {
        let _lock = netns::lock_current()?;
        let nl = Netlink::new()?;
        nl.block_on(create_here(&nl, ns, req))
    })
}

async fn create_here(nl: &Netlink, ns: Option<&NetnsSpec>, req: &CreateRequest) -> Result<TapInfo> {
    let h = &nl.handle;
    let spec = &req.spec;
    let what = format!("create macvtap \"{}\" on \"{}\"", spec.name, spec.parent);
    let parent = link::get_by_name(h, &spec.parent).await?.ok_or_else(|| {
        Error::not_found(format!("{what}: parent link \"{}\" in {}", spec.parent, netns::describe_current(ns)))
    })?;
    if let Some(reason) = link::parent_problem(&parent, link::sysfs_is_wireless(&parent.name)) {
        return Err(Error::invalid(what, reason));
    }
    tracing::debug!("parent \"{}\" can carry a macvtap (wired, not a bridge or bond port)", parent.name);
    if let (Some(mtu), Some(limit)) = (spec.mtu, parent.mtu)
        && mtu > limit
    {
        return Err(Error::invalid(
            what,
            format!(
                "--mtu {mtu} is above the MTU of the parent \"{}\" ({limit}); a macvtap cannot exceed its parent: \
                 raise the parent's MTU first or pick at most {limit}",
                spec.parent
            ),
        ));
    }
    let tmp = link::temporary_name(&spec.name);
    remove_leftover(h, &tmp).await?;

    let existing = link::get_by_name(h, &spec.name).await?;
    if let Some(old) = &existing {
        if !old.owned() {
            return Err(foreign(old, "not touching it"));
        }
        let diff = link::differences(old, spec, parent.ifindex);
        if diff.is_empty() {
            // Ours and as asked (perhaps left down by a killed run): make sure it is up and usable.
            tracing::debug!("\"{}\" is ours and as asked: bringing it up and checking its node only", spec.name);
            return up_and_usable(h, &parent, old.ifindex, req, &what, false).await;
        }
        if !req.replace {
            return Err(Error::conflict(
                format!("link \"{}\"", spec.name),
                format!("exists with a different configuration ({}); pass --replace to recreate it", diff.join(", ")),
            ));
        }
        // Every refusal comes before the first change: a refused --replace keeps the old link.
        if let Some(user) = mac_clash(&parent, spec)? {
            return Err(mac_in_use(&what, spec, &user));
        }
        tracing::info!(link = %spec.name, "replacing: {}", diff.join(", "));
    }

    let temp_spec = MacvtapSpec { name: tmp.clone(), ..spec.clone() };
    tracing::debug!(
        "netlink: add macvtap \"{tmp}\" (down, renamed to \"{}\" once complete) on \"{}\" #{}, mode {}, MAC {}, MTU {}",
        spec.name,
        parent.name,
        parent.ifindex,
        spec.mode,
        spec.mac,
        spec.mtu.map_or_else(|| "the parent's".to_owned(), |m| m.to_string())
    );
    let msg = link::new_macvtap_message(&temp_spec, parent.ifindex);
    tracing::trace!("netlink: RTM_NEWLINK {:?}", msg.attributes);
    if let Err(e) = h.link().add(msg).execute().await {
        return Err(add_error(h, &what, &parent, e).await);
    }
    let mut created = None;
    let result = async {
        let new = link::get_by_name(h, &tmp)
            .await?
            .ok_or_else(|| Error::Runtime(format!("{what}: the link vanished right after creation")))?;
        created = Some(new.ifindex);
        if let Some(old) = &existing {
            link::delete(h, old.ifindex, spec.name.as_str()).await?;
        }
        let ipv6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
        tracing::debug!(
            "netlink: set link #{}: name \"{}\", alias {OWNER_MARKER}{}",
            new.ifindex,
            spec.name,
            if ipv6 { ", no IPv6 link-local address" } else { "" }
        );
        let msg = link::finish_message(new.ifindex, &spec.name, ipv6);
        tracing::trace!("netlink: RTM_SETLINK #{} {:?}", new.ifindex, msg.attributes);
        h.link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("{what}: name, mark and addrgenmode"), e))?;
        up_and_usable(h, &parent, new.ifindex, req, &what, true).await
    }
    .await;
    if result.is_err() {
        // Rollback: the link this run made must not outlive a failed create, nor may a node of a link that no
        // longer exists. Nothing else is touched: the lock guarantees no other run made anything meanwhile.
        tracing::debug!("{what} failed: rolling back");
        let undo = match created {
            Some(ifindex) => link::delete(h, ifindex, spec.name.as_str()).await,
            None => link::delete_by_name(h, &tmp).await,
        };
        if let Err(e) = undo {
            tracing::error!("rollback of \"{}\" failed: {e}", spec.name);
        }
        if matches!(link::get_by_name(h, &spec.name).await, Ok(None)) {
            remove_private_node(&spec.name);
        }
    }
    result
}

/// A link under `tmp` is what a killed `create` left: remove it (only if it is a macvtap that is ours or was
/// never marked; anything else with that name is left alone and the `add` that follows names it).
async fn remove_leftover(h: &rtnetlink::Handle, tmp: &IfName) -> Result<()> {
    if let Some(l) = link::get_by_name(h, tmp).await?
        && l.is_macvtap()
        && (l.alias.is_none() || l.owned())
    {
        tracing::info!(link = %tmp, "removing a half-created macvtap left by a killed run");
        match link::delete(h, l.ifindex, tmp.as_str()).await {
            Err(e) if e.netlink_errno() != Some(nix::errno::Errno::ENODEV as i32) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// The last steps of every `create`: the link `ifindex` (named and marked as asked) up, its node in place;
/// what `create` prints, with `changed`.
async fn up_and_usable(
    h: &rtnetlink::Handle,
    parent: &LinkView,
    ifindex: u32,
    req: &CreateRequest,
    what: &str,
    changed: bool,
) -> Result<TapInfo> {
    let spec = &req.spec;
    bring_up(h, parent, ifindex, spec, what).await?;
    let dev = tap::sysfs_devnum(&spec.name, ifindex)?;
    let node = ensure_node(&spec.name, ifindex, dev, req.owner)?;
    let now = refetch(h, ifindex, &spec.name).await?;
    let mut info = info_of(&now, Some(parent.name.clone()), Some(dev), Some(node));
    info.changed = Some(changed);
    Ok(info)
}

/// Up with allmulticast. The kernel checks the MAC against the parent and its other (up) macvlans only
/// here; on EADDRINUSE the parent's macvlans and macvtaps are scanned to name the offender.
async fn bring_up(
    h: &rtnetlink::Handle,
    parent: &LinkView,
    ifindex: u32,
    spec: &MacvtapSpec,
    what: &str,
) -> Result<()> {
    tracing::debug!("netlink: set link #{ifindex} up, allmulticast");
    match h.link().set(link::up_message(ifindex)).execute().await {
        Ok(()) => Ok(()),
        Err(e) => {
            let err = Error::netlink(format!("{what}: bring it up"), e);
            if err.netlink_errno() == Some(nix::errno::Errno::EADDRINUSE as i32)
                && let Ok(Some(user)) = mac_clash(parent, spec)
            {
                return Err(mac_in_use(what, spec, &user));
            }
            Err(err)
        }
    }
}

/// Who uses `spec.mac` on the parent the way the kernel counts it (the error path and `--replace` only).
fn mac_clash(parent: &LinkView, spec: &MacvtapSpec) -> Result<Option<LinkView>> {
    let mut candidates = link::dump_kind(InfoKind::MacVtap)?;
    candidates.extend(link::dump_kind(InfoKind::MacVlan)?);
    Ok(link::mac_user(&candidates, parent, &spec.name, spec.mac).cloned())
}

fn mac_in_use(what: &str, spec: &MacvtapSpec, user: &LinkView) -> Error {
    let whose = if user.is_macvlan_family() { "on the same parent" } else { "as the parent's own address" };
    Error::conflict(format!("{what}: MAC {}", spec.mac), format!("already used by \"{}\" {whose}", user.name))
}

/// The kernel's answer to RTM_NEWLINK, with the context people need.
async fn add_error(h: &rtnetlink::Handle, what: &str, parent: &LinkView, e: rtnetlink::Error) -> Error {
    let err = Error::netlink(what, e);
    if err.netlink_errno() == Some(nix::errno::Errno::EBUSY as i32)
        && let Some(ctl) = parent.controller
    {
        let (ctl_name, ctl_kind) = match link::get_by_index(h, ctl).await {
            Ok(Some(c)) => (c.name, c.kind.unwrap_or_else(|| "controller".into())),
            _ => (format!("#{ctl}"), "controller".into()),
        };
        return Error::conflict(
            what,
            format!(
                "the parent \"{}\" is a port of {ctl_kind} \"{ctl_name}\", which owns its receive path; put the \
                 macvtap on \"{ctl_name}\" instead, or take \"{}\" out of it",
                parent.name, parent.name
            ),
        );
    }
    err
}

async fn refetch(h: &rtnetlink::Handle, ifindex: u32, name: &IfName) -> Result<LinkView> {
    link::get_by_index(h, ifindex)
        .await?
        .ok_or_else(|| Error::Runtime(format!("link \"{name}\" vanished while being configured")))
}

/// The node for a link (public when it is the right device, else private), given to `owner`. With the lock.
fn ensure_node(name: &IfName, ifindex: u32, dev: DevNum, owner: Option<(Uid, Gid)>) -> Result<PathBuf> {
    nodedir::ensure_node(name, ifindex, dev, netns::current_netns_inode()?, owner)
}

/// Remove the private node of `name` and its directory when empty. With the lock.
fn remove_private_node(name: &IfName) -> bool {
    let removed = netns::current_netns_inode().and_then(|ns| match NodeDir::existing(ns)? {
        Some(dir) => {
            let r = dir.remove_node(name);
            dir.remove_if_empty();
            r
        }
        None => Ok(false),
    });
    match removed {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("{e}");
            false
        }
    }
}

/// Result of `delete`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DeleteOutcome {
    pub name: String,
    /// `deleted` or `absent`.
    pub result: &'static str,
    pub removed_private_node: bool,
    /// The namespace the lookup used, e.g. `network namespace "lab" (net:[4026532301])`.
    pub netns: String,
}

pub fn delete(ns: Option<&NetnsSpec>, name: &IfName) -> Result<DeleteOutcome> {
    netns::run_in_without_sysfs(ns, || {
        let _lock = netns::lock_current()?;
        let nl = Netlink::new()?;
        let h = &nl.handle;
        nl.block_on(async {
            // Teardown keeps going: a half-created link and the node are removed even when the link is gone.
            remove_leftover(h, &link::temporary_name(name)).await?;
            let mut result = "absent";
            let mut link_err = None;
            if let Some(l) = link::get_by_name(h, name).await? {
                if !l.owned() {
                    return Err(foreign(&l, "not deleting it"));
                }
                match link::delete(h, l.ifindex, name.as_str()).await {
                    Ok(()) => result = "deleted",
                    Err(e) if e.netlink_errno() == Some(nix::errno::Errno::ENODEV as i32) => {}
                    Err(e) => link_err = Some(e),
                }
            }
            let removed = if link_err.is_none() { remove_private_node(name) } else { false };
            match link_err {
                Some(e) => Err(e),
                None => Ok(DeleteOutcome {
                    name: name.to_string(),
                    result,
                    removed_private_node: removed,
                    netns: netns::describe_current(ns),
                }),
            }
        })
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
