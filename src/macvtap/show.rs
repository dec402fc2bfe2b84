//! `show`: the macvtaps of a namespace as `show --json` prints them.

use std::collections::HashMap;

use super::*;

/// `show`: one macvtap looked up by name, or every macvtap (a dump filtered by kind in the kernel). Parent
/// names cost one lookup per distinct parent. `tap_device` is null when no node is this link's device.
pub fn show(ns: Option<&NetnsSpec>, name: Option<&IfName>) -> Result<Vec<TapInfo>> {
    // The namespace's own sysfs is mounted only when a device number is read link by link (see `tap_infos`).
    netns::run_in_without_sysfs(ns, || {
        let nl = Netlink::new()?;
        let h = &nl.handle;
        let ns_inode = netns::current_netns_inode()?;
        nl.block_on(async {
            let links = match name {
                Some(n) => {
                    let l = link::get_by_name(h, n)
                        .await?
                        .ok_or_else(|| Error::not_found(format!("link \"{n}\" in {}", netns::describe_current(ns))))?;
                    if !l.is_macvtap() {
                        return Err(not_a_macvtap(&l));
                    }
                    vec![l]
                }
                None => link::dump_kind(InfoKind::MacVtap)?,
            };
            let mut parents: HashMap<u32, Option<String>> = HashMap::new();
            let mut named = Vec::with_capacity(links.len());
            for l in &links {
                let parent = match l.parent_ifindex.filter(|_| l.link_netnsid.is_none()) {
                    Some(p) => match parents.get(&p) {
                        Some(n) => n.clone(),
                        None => {
                            let n = link::get_by_index(h, p).await?.map(|v| v.name);
                            parents.insert(p, n.clone());
                            n
                        }
                    },
                    None => None,
                };
                named.push((l, parent));
            }
            tap_infos(named, ns_inode, ns)
        })
    })
}

/// Links from which `show` reads device numbers from one `/sys/dev/char` listing instead of link by link.
const DEV_INDEX_FROM: usize = 16;

/// The tap device number and usable node of each link, in order.
fn tap_infos(named: Vec<(&LinkView, Option<String>)>, ns_inode: u64, ns: Option<&NetnsSpec>) -> Result<Vec<TapInfo>> {
    let index = if named.len() >= DEV_INDEX_FROM { tap::DevIndex::read(named.len()) } else { None };
    // With `--netns`, reading a link's own sysfs entry needs a sysfs of that namespace: mounted once, on the
    // first link the index does not name (a mount namespace of its own costs about as much as 20 links).
    let mut sysfs_ready = ns.is_none();
    let mut out = Vec::with_capacity(named.len());
    for (l, parent) in named {
        let (dev, node) = match l.name.parse::<IfName>() {
            Ok(n) => {
                let dev = match index.as_ref().and_then(|i| i.get(&n, l.ifindex)) {
                    Some(dev) => Ok(dev),
                    None => {
                        if !sysfs_ready {
                            netns::sysfs_of_current(ns)?;
                            sysfs_ready = true;
                        }
                        tap::sysfs_devnum(&n, l.ifindex)
                    }
                };
                match dev {
                    Ok(dev) => (Some(dev), nodedir::usable_node(&n, l.ifindex, dev, ns_inode)),
                    Err(_) => (None, None),
                }
            }
            Err(_) => (None, None),
        };
        out.push(info_of(l, parent, dev, node));
    }
    Ok(out)
}
