//! Privileged integration tests for `ec-macvtap`, against the real kernel: every test gets fresh network
//! namespaces with veth parents and checks the kernel's own view with `ip -j -d link show`.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::{Netns, json, macvtap, require_root, stderr, unique};
use ec_ipxe_qemu::names::{IfName, MacAddr};

/// `/dev/tapN` names are host-wide while ifindexes repeat per namespace, and two tests here depend on who
/// holds a given node name: the tests in this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh namespace with a veth parent `p` (peer `q`), both up.
fn ns_with_parent() -> (Netns, String) {
    let ns = Netns::new("em");
    let p = unique("p");
    let q = unique("q");
    ns.veth(&p, &q);
    (ns, p)
}

fn flags(link: &serde_json::Value) -> Vec<String> {
    link["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_owned()).collect()
}

#[test]
#[ignore = "needs root"]
fn create_with_derived_mac_then_noop_then_delete_twice() {
    require_root("create_with_derived_mac_then_noop_then_delete_twice");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let name = unique("mv");
    let _guard = common::DeleteOnDrop::new(&ns, &name);
    let v = json(&macvtap(Some(&ns), &["--json", "create", "--link", &parent, "--name", &name]));
    assert_eq!(v["changed"], true);
    assert_eq!(v["name"], name.as_str());
    assert_eq!(v["parent"], parent.as_str());
    assert_eq!(v["mode"], "bridge");
    assert_eq!(v["owned"], true);
    assert_eq!(v["up"], true);
    for field in ["ifindex", "mtu", "carrier", "tap_device", "tap_devnum"] {
        assert!(!v[field].is_null(), "{field} missing in {v}");
    }

    // The derived MAC: app-specific machine id + name + parent, locally administered unicast.
    let machine_id = ec_ipxe_qemu::macvtap::machine_id().unwrap();
    let want = MacAddr::derived(&machine_id, &name.parse::<IfName>().unwrap(), &parent.parse::<IfName>().unwrap());
    assert_eq!(v["mac"], want.to_string().as_str());

    // The kernel's view.
    let k = ns.link_json(&name).expect("link exists");
    assert_eq!(k["linkinfo"]["info_kind"], "macvtap");
    assert_eq!(k["linkinfo"]["info_data"]["mode"], "bridge");
    assert_eq!(k["address"], want.to_string().as_str());
    assert_eq!(k["ifalias"], "ec-macvtap:v1");
    assert_eq!(k["inet6_addr_gen_mode"], "none", "the host must not configure IPv6 on the guest's link");
    let f = flags(&k);
    assert!(f.contains(&"UP".to_owned()) && f.contains(&"ALLMULTI".to_owned()), "{f:?}");
    assert_eq!(k["ifindex"], v["ifindex"]);

    // A second create with the same config changes nothing.
    let again = json(&macvtap(Some(&ns), &["--json", "create", "--link", &parent, "--name", &name]));
    assert_eq!(again["changed"], false);
    assert_eq!(again["ifindex"], v["ifindex"], "the link was not recreated");

    // show agrees.
    let shown = json(&macvtap(Some(&ns), &["--json", "show", &name]));
    assert_eq!(shown["mac"], v["mac"]);
    assert_eq!(shown["tap_devnum"], v["tap_devnum"]);
    let all = json(&macvtap(Some(&ns), &["--json", "show"]));
    assert_eq!(all.as_array().unwrap().len(), 1);

    let d1 = macvtap(Some(&ns), &["delete", &name]);
    assert!(d1.status.success(), "{}", stderr(&d1));
    assert!(String::from_utf8_lossy(&d1.stdout).contains("deleted"));
    assert!(ns.link_json(&name).is_none());
    let d2 = macvtap(Some(&ns), &["delete", &name]);
    assert!(d2.status.success(), "{}", stderr(&d2));
    assert!(String::from_utf8_lossy(&d2.stdout).contains("already absent"));
}

#[test]
#[ignore = "needs root"]
fn explicit_mac_mtu_and_replace() {
    require_root("explicit_mac_mtu_and_replace");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let name = unique("mv");
    let _guard = common::DeleteOnDrop::new(&ns, &name);
    let v = json(&macvtap(
        Some(&ns),
        &["--json", "create", "--link", &parent, "--name", &name, "--mac", "52:54:00:AA:BB:CC", "--mtu", "1400"],
    ));
    assert_eq!(v["mac"], "52:54:00:aa:bb:cc");
    let k = ns.link_json(&name).unwrap();
    assert_eq!(k["address"], "52:54:00:aa:bb:cc");
    assert_eq!(k["mtu"], 1400);
    let ifindex = k["ifindex"].clone();

    // Different config without --replace: refused, link untouched.
    let out = macvtap(Some(&ns), &["create", "--link", &parent, "--name", &name, "--mac", "52:54:00:aa:bb:cd"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("--replace") && stderr(&out).contains(&name), "{}", stderr(&out));
    let k = ns.link_json(&name).unwrap();
    assert_eq!(k["address"], "52:54:00:aa:bb:cc");
    assert_eq!(k["ifindex"], ifindex);

    // With --replace: recreated as asked.
    let v = json(&macvtap(
        Some(&ns),
        &[
            "--json",
            "create",
            "--link",
            &parent,
            "--name",
            &name,
            "--mac",
            "52:54:00:aa:bb:cd",
            "--mode",
            "vepa",
            "--replace",
        ],
    ));
    assert_eq!(v["changed"], true);
    let k = ns.link_json(&name).unwrap();
    assert_eq!(k["address"], "52:54:00:aa:bb:cd");
    assert_eq!(k["linkinfo"]["info_data"]["mode"], "vepa");
    assert_ne!(k["ifindex"], ifindex);
}

#[test]
#[ignore = "needs root"]
fn foreign_links_are_never_touched() {
    require_root("foreign_links_are_never_touched");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let name = unique("fx");
    let index = common::random_index().to_string();
    ns.ip(&[
        "link",
        "add",
        "link",
        &parent,
        "name",
        &name,
        "index",
        &index,
        "address",
        "52:54:00:11:22:33",
        "type",
        "macvtap",
    ]);
    let before = ns.link_json(&name).unwrap();

    let out = macvtap(Some(&ns), &["delete", &name]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains(&format!("\"{name}\"")) && stderr(&out).contains("not managed"), "{}", stderr(&out));

    let out = macvtap(Some(&ns), &["create", "--link", &parent, "--name", &name, "--replace"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("not managed"), "{}", stderr(&out));

    let out = macvtap(Some(&ns), &["--json", "delete", &name]);
    assert_eq!(out.status.code(), Some(4));
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["error"]["code"], 4);
    assert_eq!(err["error"]["kind"], "conflict");

    let after = ns.link_json(&name).unwrap();
    assert_eq!(before["ifindex"], after["ifindex"]);
    assert_eq!(before["address"], after["address"]);
}

#[test]
#[ignore = "needs root"]
fn mac_collision_names_the_offender() {
    require_root("mac_collision_names_the_offender");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let other = unique("ov");
    ns.ip(&["link", "add", "link", &parent, "name", &other, "address", "52:54:00:de:ad:01", "type", "macvlan"]);
    // The kernel checks a MAC against the parent and its other macvlans when a link goes up, and only against
    // those that are up: a down one does not hold its MAC.
    ns.ip(&["link", "set", &other, "up"]);
    let table = ns.link_table();
    let name = unique("mv");
    let _guard = common::DeleteOnDrop::new(&ns, &name);
    let out = macvtap(Some(&ns), &["create", "--link", &parent, "--name", &name, "--mac", "52:54:00:de:ad:01"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("\"{other}\"")), "offender not named: {}", stderr(&out));
    assert_eq!(ns.link_table(), table, "nothing left behind");

    // The parent's own address is taken too.
    let parent_mac = ns.link_json(&parent).unwrap()["address"].as_str().unwrap().to_owned();
    let out = macvtap(Some(&ns), &["create", "--link", &parent, "--name", &name, "--mac", &parent_mac]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("\"{parent}\" as the parent's own address")), "{}", stderr(&out));
    assert_eq!(ns.link_table(), table, "nothing left behind");
}

#[test]
#[ignore = "needs root"]
fn netns_by_name_and_by_path() {
    require_root("netns_by_name_and_by_path");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let name = unique("mv");
    let _guard = common::DeleteOnDrop::new(&ns, &name);
    let by_path = ns.path();
    let out = common::run(
        std::process::Command::new(common::macvtap_bin())
            .args(["--netns", &by_path, "--json", "create", "--link", &parent, "--name", &name]),
    );
    let v = json(&out);
    assert_eq!(v["name"], name.as_str());
    assert!(ns.link_json(&name).is_some());
    // Not in our own namespace.
    let here = common::run(std::process::Command::new("ip").args(["link", "show", "dev", &name]));
    assert!(!here.status.success());
    // By /proc/PID/ns/net of a process living in the namespace.
    let mut sleeper = common::KillOnDrop(ns.cmd("sleep").arg("30").spawn().unwrap());
    let proc_path = common::wait_for(std::time::Duration::from_secs(15), || {
        let pid = sleeper.0.id();
        // `ip netns exec` execs sleep in the same pid once it has joined the namespace.
        let mine = std::fs::read_link("/proc/self/ns/net").ok()?;
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
        (mine != theirs).then(|| format!("/proc/{pid}/ns/net"))
    })
    .expect("sleeper joined the namespace");
    let shown = json(&common::run(
        std::process::Command::new(common::macvtap_bin()).args(["--netns", &proc_path, "--json", "show", &name]),
    ));
    assert_eq!(shown["ifindex"], v["ifindex"]);
    let d = common::run(std::process::Command::new(common::macvtap_bin()).args(["--netns", &ns.name, "delete", &name]));
    assert!(d.status.success());
    assert!(ns.link_json(&name).is_none());
    let _ = sleeper.0.kill();

    let missing = macvtap(None, &["--netns", "ec-no-such-ns", "show"]);
    assert_eq!(missing.status.code(), Some(3), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("ec-no-such-ns"));
}

#[test]
#[ignore = "needs root"]
fn owner_gets_the_node_and_the_fd_passes_tungetiff() {
    require_root("owner_gets_the_node_and_the_fd_passes_tungetiff");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let name = unique("mv");
    let _guard = common::DeleteOnDrop::new(&ns, &name);
    let v = json(&macvtap(Some(&ns), &["--json", "create", "--link", &parent, "--name", &name, "--owner", "nobody"]));
    let node = v["tap_device"].as_str().unwrap().to_owned();
    let meta = std::fs::metadata(&node).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(meta.uid(), nobody.uid.as_raw());
    assert_eq!(meta.gid(), nobody.gid.as_raw());
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert!(meta.file_type().is_char_device());
    let devnum = v["tap_devnum"].as_str().unwrap();
    let (maj, min) = devnum.split_once(':').unwrap();
    assert_eq!(meta.rdev(), nix::sys::stat::makedev(maj.parse().unwrap(), min.parse().unwrap()));

    // The library's open: every fd is checked with TUNGETIFF; check again here independently.
    let spec: ec_ipxe_qemu::netns::NetnsSpec = ns.name.parse().unwrap();
    let opened = ec_ipxe_qemu::macvtap::open(Some(&spec), &name.parse().unwrap(), 2).unwrap();
    assert_eq!(opened.fds.len(), 2);
    assert_eq!(opened.mac.to_string(), v["mac"].as_str().unwrap());
    for fd in &opened.fds {
        let (ifname, _flags) = ec_ipxe_qemu::tap::get_iff(fd).unwrap();
        assert_eq!(ifname, name);
    }
    drop(opened);

    // A different owner on the same link: the node follows.
    let v2 = json(&macvtap(Some(&ns), &["--json", "create", "--link", &parent, "--name", &name, "--owner", "0:0"]));
    assert_eq!(v2["changed"], false);
    assert_eq!(std::fs::metadata(&node).unwrap().uid(), 0);
}

/// A failure after the kernel created the link rolls the link back.
#[test]
#[ignore = "needs root"]
fn failure_after_creation_rolls_back() {
    require_root("failure_after_creation_rolls_back");
    let _serial = serial();
    // Make the private node impossible (runtime dir under a regular file) and force the need for one
    // by taking the public node name with another namespace's link.
    let blocker = tempfile::NamedTempFile::new().unwrap();
    let bad_rt = blocker.path().join("sub");
    let (a, pa) = ns_with_parent();
    let (b, pb) = ns_with_parent();
    let na = unique("ma");
    let nb = unique("mb");
    let _ga = common::DeleteOnDrop::new(&a, &na);
    let _gb = common::DeleteOnDrop::new(&b, &nb);
    json(&macvtap(Some(&a), &["--json", "create", "--link", &pa, "--name", &na]));
    let table = b.link_table();
    let out = common::run(
        std::process::Command::new(common::macvtap_bin())
            .env("EC_MACVTAP_RUNTIME_DIR", &bad_rt)
            .args(["--netns", &b.name, "create", "--link", &pb, "--name", &nb]),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(bad_rt.parent().unwrap().to_str().unwrap()), "{}", stderr(&out));
    assert_eq!(b.link_table(), table, "the half-created link was not rolled back");
    assert!(macvtap(Some(&a), &["delete", &na]).status.success());
}

#[test]
#[ignore = "needs root"]
fn bad_input_leaves_the_link_table_unchanged() {
    require_root("bad_input_leaves_the_link_table_unchanged");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let mv = unique("mv");
    let _guard = common::DeleteOnDrop::new(&ns, &mv);
    json(&macvtap(Some(&ns), &["--json", "create", "--link", &parent, "--name", &mv]));
    let table = ns.link_table();
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (vec!["--link".into(), "lo".into()], 2, "loopback"),
        (vec!["--link".into(), mv.clone()], 2, "itself a macvtap"),
        (vec!["--link".into(), "ec-missing0".into()], 3, "\"ec-missing0\""),
        (vec!["--link".into(), parent.clone(), "--name".into(), "a23456789012345x".into()], 2, "16 bytes"),
        (vec!["--link".into(), parent.clone(), "--name".into(), "a/b".into()], 2, "a/b"),
        (vec!["--link".into(), parent.clone(), "--name".into(), "a b".into()], 2, "a b"),
        (vec!["--link".into(), parent.clone(), "--mac".into(), "01:00:5e:00:00:01".into()], 2, "multicast"),
        (vec!["--link".into(), parent.clone(), "--mac".into(), "00:00:00:00:00:00".into()], 2, "all-zero"),
        (vec!["--link".into(), parent.clone(), "--mode".into(), "source".into()], 2, "source"),
        (vec!["--link".into(), parent.clone(), "--owner".into(), "ec-no-such-user".into()], 3, "ec-no-such-user"),
        (vec!["--link".into(), parent.clone(), "--mtu".into(), "10".into()], 2, "10"),
    ];
    for (args, code, needle) in cases {
        let mut full = vec!["create".to_owned()];
        if !args.iter().any(|a| a == "--name") {
            full.extend(["--name".to_owned(), unique("bx")]);
        }
        full.extend(args.iter().cloned());
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = macvtap(Some(&ns), &refs);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: message does not name {needle:?}: {err}");
        assert_eq!(ns.link_table(), table, "{args:?} changed the link table");
    }
    assert!(macvtap(Some(&ns), &["delete", &mv]).status.success());
}

/// Without CAP_NET_ADMIN the kernel refuses: exit 5 with the hint, and nothing is created.
#[test]
#[ignore = "needs root"]
fn unprivileged_create_is_permission_denied() {
    require_root("unprivileged_create_is_permission_denied");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let table = ns.link_table();
    let name = unique("mv");
    let out = common::run(
        ns.cmd("setpriv")
            .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--inh-caps=-all"])
            .args([common::macvtap_bin(), "create", "--link", &parent, "--name", &name, "--mac", "52:54:00:aa:bb:01"]),
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("CAP_NET_ADMIN") && stderr(&out).contains(&name), "{}", stderr(&out));
    assert_eq!(ns.link_table(), table);
}

/// A refused `--replace` (the new MAC is taken) leaves our existing link exactly as it was.
#[test]
#[ignore = "needs root"]
fn refused_replace_keeps_the_old_link() {
    require_root("refused_replace_keeps_the_old_link");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let name = unique("mv");
    let _guard = common::DeleteOnDrop::new(&ns, &name);
    json(&macvtap(Some(&ns), &["--json", "create", "--link", &parent, "--name", &name, "--mac", "52:54:00:de:ad:10"]));
    let before = ns.link_json(&name).unwrap();
    let other = unique("ov");
    ns.ip(&["link", "add", "link", &parent, "name", &other, "address", "52:54:00:de:ad:11", "type", "macvlan"]);
    ns.ip(&["link", "set", &other, "up"]);
    let out =
        macvtap(Some(&ns), &["create", "--link", &parent, "--name", &name, "--mac", "52:54:00:de:ad:11", "--replace"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("\"{other}\"")), "{}", stderr(&out));
    let after = ns.link_json(&name).expect("the old link must survive a refused --replace");
    assert_eq!(after["ifindex"], before["ifindex"]);
    assert_eq!(after["address"], "52:54:00:de:ad:10");
}

/// Under systemd's `UMask=0077` the private node's directories are still reachable by the owner: an
/// unprivileged `exec` opens the node `create --owner` made.
#[test]
#[ignore = "needs root"]
fn private_node_reachable_by_owner_under_umask_0077() {
    require_root("private_node_reachable_by_owner_under_umask_0077");
    let _serial = serial();
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let rt = top.path().join("run/ec-macvtap");
    let (ns, parent) = ns_with_parent();
    let name = unique("mv");
    let _guard = common::DeleteOnDrop { ns: &ns, name: name.clone(), runtime_dir: Some(rt.clone()) };
    let create = |extra: &str| {
        common::run(std::process::Command::new("sh").env("EC_MACVTAP_RUNTIME_DIR", &rt).args([
            "-c",
            &format!(
                "umask 077; exec {} --json --netns {} create --link {parent} --name {name} --owner nobody {extra}",
                common::macvtap_bin(),
                ns.name
            ),
        ]))
    };
    let v = json(&create(""));
    // Force the private node: remove the public one and create again (idempotent, makes the private node).
    std::fs::remove_file(v["tap_device"].as_str().unwrap()).unwrap();
    let v = json(&create(""));
    let node = v["tap_device"].as_str().unwrap().to_owned();
    assert!(node.starts_with(rt.to_str().unwrap()), "{node}");
    for dir in [rt.as_path(), Path::new(&node).parent().unwrap()] {
        let mode = std::fs::metadata(dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o755, "{} is {mode:o}", dir.display());
    }
    let out = common::run(
        ns.cmd("setpriv")
            .env("EC_MACVTAP_RUNTIME_DIR", &rt)
            .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--"])
            .args([common::macvtap_bin(), "exec", "--name", &name, "--", "true"]),
    );
    assert!(out.status.success(), "unprivileged exec: {}", stderr(&out));
}
