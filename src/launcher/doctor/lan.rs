//! The LAN checks: the macvtap, its tap and its parent, opened as `run` opens them.

use super::{Check, fail_from};
use crate::error::Kind;
use crate::launcher::lanlock;
use crate::link::{self, Netlink};
use crate::macvtap;
use crate::names::IfName;
use crate::tap;

/// The LAN checks: the macvtap (exists, a macvtap, ours, up, carrier), its tap (not in use, openable by this
/// user with `queues` queues: the very opening `run` does), and its parent (wired, up, carrier).
pub(crate) fn check_lan(name: &IfName, queues: u32) -> Vec<Check> {
    let nl = match Netlink::new() {
        Ok(nl) => nl,
        Err(e) => return vec![Check::fail("lan-link", e.to_string(), "netlink is not available to this user")],
    };
    let l = match nl.block_on(link::get_by_name(&nl.handle, name)) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return vec![Check::fail(
                "lan-link",
                format!("--lan-interface \"{name}\": no such link"),
                "create it: ec-macvtap create --link PARENT --name NAME --owner USER (run would exit 3)",
            )];
        }
        Err(e) => return vec![Check::fail("lan-link", e.to_string(), "netlink refused the lookup")],
    };
    if !l.is_macvtap() {
        return vec![Check::fail(
            "lan-link",
            format!("--lan-interface \"{name}\": is a {} link, not a macvtap", l.kind.as_deref().unwrap_or("physical")),
            "name the macvtap ec-macvtap created (run would exit 2)",
        )];
    }
    let mut out = Vec::new();
    let state = format!(
        "{} (ifindex {}, mac {}), {}, {}",
        name,
        l.ifindex,
        l.mac.map(|m| m.to_string()).unwrap_or_else(|| "?".into()),
        if l.up { "up" } else { "down" },
        if l.carrier { "carrier" } else { "no carrier" }
    );
    out.push(if !l.owned() {
        Check::warn(
            "lan-link",
            format!("{state}; not made by ec-macvtap (no ownership alias)"),
            "the unit's ExecStopPost will not delete it; recreate it with ec-macvtap create",
        )
    } else if !l.up {
        Check::fail(
            "lan-link",
            state,
            "the guest's LAN NIC would see nothing: ip link set NAME up (or ec-macvtap create)",
        )
    } else if !l.carrier {
        Check::warn("lan-link", state, "no carrier: check the parent's cable and switch port")
    } else {
        Check::ok("lan-link", format!("{state}, made by ec-macvtap"))
    });

    // Not in use: another launcher (its lock) or any process holding the tap device.
    let dev = tap::sysfs_devnum(name, l.ifindex);
    let holders = dev.as_ref().map(|d| tap::holders(*d)).unwrap_or_default();
    let launcher = lanlock::held_by(l.ifindex);
    let in_use = launcher.is_some() || !holders.is_empty();
    out.push(match (&launcher, holders.is_empty()) {
        (Some(pid), _) => Check::fail(
            "lan-in-use",
            format!("an ec-ipxe-qemu run{} uses \"{name}\"", pid.map(|p| format!(" (pid {p})")).unwrap_or_default()),
            "run would refuse a second guest on it (exit 4): stop the other run",
        ),
        (None, false) => Check::fail(
            "lan-in-use",
            format!("the tap of \"{name}\" is held by {}", tap::describe_holders(&holders)),
            "run would refuse (exit 4): stop that process (a leftover QEMU?)",
        ),
        (None, true) => {
            Check::ok("lan-in-use", format!("no process holds the tap of \"{name}\" (as far as /proc shows this user)"))
        }
    });

    // Openable by this user: the opening run does (node lookup, TUNGETIFF check, queues), unless a guest holds
    // it (an open queue would take a share of its frames).
    out.push(if in_use {
        Check::warn("lan-tap", "not opened: the tap is in use", "fix lan-in-use first")
    } else {
        match macvtap::open(None, name, queues) {
            Ok(t) => Check::ok(
                "lan-tap",
                format!(
                    "{} opens read-write for this user ({} queue(s), checked with TUNGETIFF)",
                    t.node.display(),
                    queues
                ),
            ),
            Err(e) if e.kind() == Kind::Permission => {
                let user = nix::unistd::User::from_uid(nix::unistd::Uid::effective())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_else(|| nix::unistd::Uid::effective().to_string());
                fail_from(
                    "lan-tap",
                    &e,
                    format!("this user ({user}) cannot open the tap node: ec-macvtap create --owner {user} gives it"),
                )
            }
            Err(e) => fail_from("lan-tap", &e, "run opens the tap the same way"),
        }
    });

    // The parent: wired, up, carrier.
    let parent = match l.parent_ifindex.filter(|_| l.link_netnsid.is_none()) {
        Some(p) => nl.block_on(link::get_by_index(&nl.handle, p)).ok().flatten(),
        None => None,
    };
    out.push(match parent {
        None => Check::warn(
            "lan-parent",
            format!("the parent of \"{name}\" is not in this namespace"),
            "check the parent where it lives",
        ),
        Some(p) => {
            let wireless = link::sysfs_is_wireless(&p.name);
            let state = format!(
                "{} ({}, {}, {})",
                p.name,
                if wireless { "wireless" } else { "wired" },
                if p.up { "up" } else { "down" },
                if p.carrier { "carrier" } else { "no carrier" }
            );
            if let Some(problem) = link::parent_problem(&p, wireless) {
                Check::fail(
                    "lan-parent",
                    format!("{state}: {problem}"),
                    "access points drop frames from MACs that did not associate: use a wired NIC",
                )
            } else if !p.up {
                Check::fail("lan-parent", state, "bring the parent up (the host's network configuration)")
            } else if !p.carrier {
                Check::fail("lan-parent", state, "no link on the parent: check the cable and the switch port")
            } else {
                Check::ok("lan-parent", state)
            }
        }
    });
    out
}
