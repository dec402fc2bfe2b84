//! `ec-macvtap` under faults, races, systemd's mount rules and many links, against the real kernel. Every
//! test makes its own namespaces and runtime directory and removes them, whatever happens.
//!
//! `/dev/tapN` is machine-wide while ifindexes repeat per namespace, so no test assumes a public node is free:
//! where a test needs the private-node path it makes the public name foreign on purpose ([`Blocker`]), and
//! otherwise it accepts either node as long as it is this link's device.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Netns, json, random_index, require_root, stderr, unique};
use ec_ipxe_qemu::names::IfName;

/// `ec-macvtap --netns NS ARGS` with `EC_MACVTAP_RUNTIME_DIR` set (or removed when `None`).
fn mvt(rt: Option<&Path>, ns: &Netns, args: &[&str]) -> Command {
    let mut c = Command::new(common::macvtap_bin());
    match rt {
        Some(d) => c.env("EC_MACVTAP_RUNTIME_DIR", d),
        None => c.env_remove("EC_MACVTAP_RUNTIME_DIR"),
    };
    c.args(["--netns", &ns.name]).args(args);
    c
}

fn run(rt: Option<&Path>, ns: &Netns, args: &[&str]) -> Output {
    common::run(&mut mvt(rt, ns, args))
}

/// A namespace with a veth parent at random high indexes (nothing there uses `/dev/tapN` of its own).
fn ns_with_parent() -> (Netns, String) {
    let ns = Netns::new("ef");
    let p = unique("p");
    let q = unique("q");
    let (pi, qi) = (random_index().to_string(), random_index().to_string());
    ns.ip(&["link", "add", "name", &p, "index", &pi, "type", "veth", "peer", "name", &q, "index", &qi]);
    ns.ip(&["link", "set", &p, "up"]);
    ns.ip(&["link", "set", &q, "up"]);
    (ns, p)
}

/// The ifindex the kernel gives the next link made in `ns` without an explicit index (one above the highest
/// automatically numbered link: allocation is cyclic upwards, and explicit indexes here are all ≥ 100000).
fn next_auto_index(ns: &Netns) -> u32 {
    let v: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "link", "show"])).unwrap();
    v.as_array().unwrap().iter().map(|l| l["ifindex"].as_u64().unwrap() as u32).filter(|i| *i < 100_000).max().unwrap()
        + 1
}

/// Another namespace holding macvtaps at the next `count` ifindexes `target` will give its links, so their
/// public `/dev/tapN` belong to somebody else (or to whoever had them already): the private-node path on
/// purpose. (Every link made in `target`, even one rolled back, uses up one index.)
struct Blocker {
    _ns: Netns,
}

impl Blocker {
    fn for_next_links_in(target: &Netns, count: u32) -> Blocker {
        let first = next_auto_index(target);
        let ns = Netns::new("eb");
        let (dp, dq) = (unique("dp"), unique("dq"));
        let (pi, qi) = (random_index().to_string(), random_index().to_string());
        ns.ip(&["link", "add", "name", &dp, "index", &pi, "type", "veth", "peer", "name", &dq, "index", &qi]);
        let batch: String = (first..first + count)
            .map(|i| format!("link add link {dp} name blk{i} index {i} type macvtap\n"))
            .collect();
        let mut ip = Command::new("ip").args(["-n", &ns.name, "-batch", "-"]).stdin(Stdio::piped()).spawn().unwrap();
        std::io::Write::write_all(ip.stdin.as_mut().unwrap(), batch.as_bytes()).unwrap();
        drop(ip.stdin.take());
        assert!(ip.wait().unwrap().success());
        Blocker { _ns: ns }
    }
}

/// The blockers of two tests would share low ifindexes, and one's teardown would free the other's public
/// names: the tests in this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A runtime directory of the test's own (root's, 0755 so an unprivileged owner can reach its node).
fn runtime_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    d
}

/// Everything under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The node a create/show reported is this link's device; it is the public one exactly when `/dev/tapN` is.
fn assert_node_is_the_links(v: &serde_json::Value) {
    let node = v["tap_device"].as_str().unwrap_or_else(|| panic!("no tap_device in {v}"));
    let (maj, min) = v["tap_devnum"].as_str().unwrap().split_once(':').unwrap();
    let rdev = nix::sys::stat::makedev(maj.parse().unwrap(), min.parse().unwrap());
    let meta = std::fs::metadata(node).unwrap();
    assert!(meta.file_type().is_char_device() && meta.rdev() == rdev, "{node} is not char {maj}:{min}");
    let public = format!("/dev/tap{}", v["ifindex"]);
    let public_is_ours = std::fs::metadata(&public).is_ok_and(|m| m.rdev() == rdev);
    assert_eq!(node == public, public_is_ours, "reported {node}; {public} ours: {public_is_ours}");
}

/// Exactly one link called `name` in `ns` (ours, up) and no link under its temporary name.
fn assert_one_good_link(ns: &Netns, name: &str) -> serde_json::Value {
    let k = ns.link_json(name).unwrap_or_else(|| panic!("link {name} missing"));
    assert_eq!(k["ifalias"], "ec-macvtap:v1");
    assert!(k["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "{k}");
    let tmp = ec_ipxe_qemu::link::temporary_name(&name.parse::<IfName>().unwrap());
    assert!(ns.link_json(tmp.as_str()).is_none(), "half-created {tmp} left behind");
    k
}

fn kill9(child: &mut std::process::Child) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

/// A tmpfs mounted `nodev` (as systemd mounts /run), unmounted on drop.
struct NodevMount {
    dir: tempfile::TempDir,
}

impl NodevMount {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        common::sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "nodev,nosuid,mode=755,size=1m",
            "ec-nodev",
            dir.path().to_str().unwrap(),
        ]);
        NodevMount { dir }
    }
}

impl Drop for NodevMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// systemd mounts /run nodev: a private node there could never be opened. A nodev runtime directory is
/// refused with the mount's name (and the failed create rolled back); the default, /dev/ec-macvtap, works;
/// a node someone made on a nodev mount anyway is reported as such by `exec`.
#[test]
#[ignore = "needs root"]
fn nodev_runtime_dir_is_refused_and_the_default_works() {
    require_root("nodev_runtime_dir_is_refused_and_the_default_works");
    let _serial = serial();
    let nodev = NodevMount::new();
    let rt = nodev.dir.path().join("ec-macvtap");
    let (ns, parent) = ns_with_parent();
    let name = unique("mv");
    let _guard = common::DeleteOnDrop::new(&ns, &name);
    let _blocker = Blocker::for_next_links_in(&ns, 4);
    let table = ns.link_table();
    let out = run(Some(&rt), &ns, &["create", "--link", &parent, "--name", &name, "--owner", "nobody"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("nodev") && err.contains(nodev.dir.path().to_str().unwrap()), "{err}");
    assert!(err.contains("/dev/ec-macvtap"), "the fix is named: {err}");
    assert_eq!(ns.link_table(), table, "the refused create was rolled back");
    assert!(tree(&rt).iter().all(|e| !e.contains(&name)), "no node left: {:?}", tree(&rt));

    // The default location is on /dev (devtmpfs), which allows nodes.
    let v = json(&run(None, &ns, &["--json", "create", "--link", &parent, "--name", &name, "--owner", "nobody"]));
    let node = v["tap_device"].as_str().unwrap().to_owned();
    let ino = std::fs::metadata(ns.path()).unwrap().ino();
    assert_eq!(node, format!("/dev/ec-macvtap/net-{ino}/{name}"));
    assert_node_is_the_links(&v);
    let out = common::run(
        ns.cmd("setpriv")
            .env_remove("EC_MACVTAP_RUNTIME_DIR")
            .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--"])
            .args([common::macvtap_bin(), "exec", "--name", &name, "--", "readlink", "/proc/self/fd/{fd}"]),
    );
    assert!(out.status.success(), "unprivileged exec: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), node);

    // A node on the nodev mount (made by hand, as an old version did under /run): exec says why it fails.
    let dir = rt.join(format!("net-{ino}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (maj, min) = v["tap_devnum"].as_str().unwrap().split_once(':').unwrap();
    common::sh(&["mknod", dir.join(&name).to_str().unwrap(), "c", maj, min]);
    std::fs::remove_file(&node).unwrap();
    let out = run(Some(&rt), &ns, &["exec", "--name", &name, "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("nodev mount"), "{}", stderr(&out));

    assert!(run(None, &ns, &["delete", &name]).status.success());
    assert!(!Path::new(&node).exists());
    assert!(!Path::new(&node).parent().unwrap().exists(), "the namespace's directory goes with its last node");
}

/// The private node is created under a temporary name, owned and moded through a descriptor, then renamed:
/// a runtime directory that others could write to (where a symlink could be planted) is refused.
#[test]
#[ignore = "needs root"]
fn runtime_dir_must_be_roots_and_private() {
    require_root("runtime_dir_must_be_roots_and_private");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let name = unique("mv");
    let _blocker = Blocker::for_next_links_in(&ns, 8);
    let table = ns.link_table();
    let top = runtime_dir();
    let rt = top.path().join("rt");
    let ino = std::fs::metadata(ns.path()).unwrap().ino();

    // Owned by the service user: refused.
    std::fs::create_dir(&rt).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&rt, Some(nobody.uid), None).unwrap();
    let out = run(Some(&rt), &ns, &["create", "--link", &parent, "--name", &name, "--owner", "nobody"]);
    assert_eq!(out.status.code(), Some(2), "{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    assert!(stderr(&out).contains("not root"), "{}", stderr(&out));
    assert_eq!(ns.link_table(), table);

    // Root's but writable by everyone: refused.
    nix::unistd::chown(&rt, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    std::fs::set_permissions(&rt, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = run(Some(&rt), &ns, &["create", "--link", &parent, "--name", &name]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("writable by group or others"), "{}", stderr(&out));
    assert_eq!(ns.link_table(), table);

    // The namespace's directory is a symlink someone planted: not followed.
    std::fs::set_permissions(&rt, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let elsewhere = top.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, rt.join(format!("net-{ino}"))).unwrap();
    let out = run(Some(&rt), &ns, &["create", "--link", &parent, "--name", &name]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("symlink"), "{}", stderr(&out));
    assert_eq!(ns.link_table(), table);
    assert!(tree(&elsewhere).is_empty(), "nothing made through the symlink: {:?}", tree(&elsewhere));

    // Made right: the node is the link's, the user's, 0600, and there are no temporaries.
    std::fs::remove_file(rt.join(format!("net-{ino}"))).unwrap();
    let v = json(&run(Some(&rt), &ns, &["--json", "create", "--link", &parent, "--name", &name, "--owner", "nobody"]));
    let node = PathBuf::from(v["tap_device"].as_str().unwrap());
    assert_eq!(node, rt.join(format!("net-{ino}")).join(&name));
    let meta = std::fs::symlink_metadata(&node).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (nobody.uid.as_raw(), 0o600));
    assert_eq!(tree(&rt), [format!("net-{ino}"), format!("net-{ino}/{name}")]);
    assert!(run(Some(&rt), &ns, &["delete", &name]).status.success());
    assert!(tree(&rt).is_empty(), "{:?}", tree(&rt));
}

/// `show` reports `tap_device: null` when no node is this link's device, and `exec` on a foreign macvtap
/// without a usable node opens it through a temporary node that is gone afterwards.
#[test]
#[ignore = "needs root"]
fn show_null_without_a_node_and_exec_leaves_nothing() {
    require_root("show_null_without_a_node_and_exec_leaves_nothing");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let rt = runtime_dir();
    let name = unique("fx");
    let index = random_index();
    ns.ip(&["link", "add", "link", &parent, "name", &name, "index", &index.to_string(), "type", "macvtap"]);
    let v = json(&run(Some(rt.path()), &ns, &["--json", "show", &name]));
    assert_eq!(v["owned"], false);
    let public = format!("/dev/tap{index}");
    if v["tap_device"].is_null() {
        // Somebody else's link already had that (random, high) index: no usable node at all.
        assert!(std::fs::metadata(&public).is_ok(), "null, yet {public} is missing rather than foreign");
    } else {
        assert_eq!(v["tap_device"], public.as_str());
        std::fs::remove_file(&public).unwrap();
    }
    let v = json(&run(Some(rt.path()), &ns, &["--json", "show", &name]));
    assert!(v["tap_device"].is_null(), "no usable node, so null: {v}");
    assert!(!v["tap_devnum"].is_null());
    let all = json(&run(Some(rt.path()), &ns, &["--json", "show"]));
    assert!(all[0]["tap_device"].is_null(), "{all}");

    let out = run(Some(rt.path()), &ns, &["exec", "--name", &name, "--", "readlink", "/proc/self/fd/{fd}"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(":tmp-"), "opened through a temporary node");
    assert!(tree(rt.path()).is_empty(), "exec left {:?}", tree(rt.path()));
    let out = run(Some(rt.path()), &ns, &["delete", &name]);
    assert_eq!(out.status.code(), Some(4), "still foreign: {}", stderr(&out));
}

/// A run killed after the kernel created the link but before it was named and marked leaves a link under
/// the temporary name: `delete NAME` and `create NAME` both remove it.
#[test]
#[ignore = "needs root"]
fn half_created_links_are_recovered() {
    require_root("half_created_links_are_recovered");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let rt = runtime_dir();
    let name = unique("mv");
    let _guard = common::DeleteOnDrop { ns: &ns, name: name.clone(), runtime_dir: Some(rt.path().to_owned()) };
    let tmp = ec_ipxe_qemu::link::temporary_name(&name.parse().unwrap());
    let mac = "52:54:00:77:00:01";
    let leftover = |ns: &Netns| {
        let i = random_index().to_string();
        ns.ip(&["link", "add", "link", &parent, "name", tmp.as_str(), "index", &i, "address", mac, "type", "macvtap"]);
    };
    leftover(&ns);
    let out = run(Some(rt.path()), &ns, &["delete", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ns.link_json(tmp.as_str()).is_none(), "delete removed the half-created link");

    leftover(&ns);
    json(&run(Some(rt.path()), &ns, &["--json", "create", "--link", &parent, "--name", &name, "--mac", mac]));
    assert_one_good_link(&ns, &name);
}

/// 200 creates killed with SIGKILL at random instants (fresh creates and replacements, private nodes with an
/// owner), each followed by `create --replace` (three times in four) or `delete` + `create`, which must
/// succeed and leave exactly one good link, its node, and no temporaries.
#[test]
#[ignore = "needs root"]
fn sigkill_at_random_instants_then_recovery() {
    require_root("sigkill_at_random_instants_then_recovery");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let rt = runtime_dir();
    let name = unique("mv");
    let _guard = common::DeleteOnDrop { ns: &ns, name: name.clone(), runtime_dir: Some(rt.path().to_owned()) };
    let _blocker = Blocker::for_next_links_in(&ns, 700);
    let macs = ["52:54:00:99:00:01", "52:54:00:99:00:02"];
    let create = |mac: &str| {
        mvt(
            Some(rt.path()),
            &ns,
            &["-q", "create", "--link", &parent, "--name", &name, "--mac", mac, "--owner", "nobody", "--replace"],
        )
    };
    // Kill instants are drawn over the span of a whole run (measured here, a replacement each time).
    let started = Instant::now();
    for mac in macs.iter().cycle().take(6) {
        assert!(create(mac).stdout(Stdio::null()).status().unwrap().success());
    }
    let span_us = (started.elapsed().as_micros() / 6) as u32;
    eprintln!("one create --replace takes {span_us} µs here");
    let mut outcomes = std::collections::BTreeMap::<&str, u32>::new();
    for i in 0..200 {
        let mac = macs[i % 2];
        let delay = Duration::from_micros(u64::from(random_index() % span_us.max(1)));
        let mut child = create(mac).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(delay);
        let finished = child.try_wait().unwrap().is_some();
        kill9(&mut child);
        *outcomes.entry(if finished { "finished before the kill" } else { "killed" }).or_default() += 1;
        // The recovery finishes what the killed run was asked; the next round asks the other MAC (a replacement).
        let next = mac;
        if i % 4 == 3 {
            let out = run(Some(rt.path()), &ns, &["delete", &name]);
            assert!(out.status.success(), "round {i}: delete after kill: {}", stderr(&out));
            assert!(ns.link_json(&name).is_none());
            let tmp = ec_ipxe_qemu::link::temporary_name(&name.parse().unwrap());
            assert!(ns.link_json(tmp.as_str()).is_none(), "round {i}: delete left the half-created link");
        }
        let v = json(&run(
            Some(rt.path()),
            &ns,
            &["--json", "create", "--link", &parent, "--name", &name, "--mac", next, "--owner", "nobody", "--replace"],
        ));
        let k = assert_one_good_link(&ns, &name);
        assert_eq!(k["address"], next, "round {i}");
        assert_node_is_the_links(&v);
        let meta = std::fs::metadata(v["tap_device"].as_str().unwrap()).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600, "round {i}");
        let entries = tree(rt.path());
        assert!(entries.iter().all(|e| !e.contains(":tmp-")), "round {i}: temporaries left: {entries:?}");
    }
    eprintln!("sigkill rounds: {outcomes:?}");
    assert!(outcomes.get("killed").copied().unwrap_or(0) >= 100, "most runs must really be killed: {outcomes:?}");
}

/// 10 identical creates at once, then 10 deletes at once, 50 times, with the public node and with a
/// private node: every run exits 0, one link exists after the creates and none after the deletes.
fn concurrent_rounds(private: bool) {
    let (ns, parent) = ns_with_parent();
    let rt = runtime_dir();
    let name = unique("mv");
    let _guard = common::DeleteOnDrop { ns: &ns, name: name.clone(), runtime_dir: Some(rt.path().to_owned()) };
    let _blocker = private.then(|| Blocker::for_next_links_in(&ns, 60));
    let spawn_all = |args: &[&str]| -> Vec<std::process::Child> {
        (0..10)
            .map(|_| mvt(Some(rt.path()), &ns, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
            .collect()
    };
    let mut changed_true = 0;
    for round in 0..50 {
        let creates = spawn_all(&["--json", "create", "--link", &parent, "--name", &name, "--owner", "nobody"]);
        let mut ifindexes = std::collections::BTreeSet::new();
        for c in creates {
            let out = c.wait_with_output().unwrap();
            let v = json(&out);
            ifindexes.insert(v["ifindex"].as_u64().unwrap());
            changed_true += usize::from(v["changed"] == true);
            assert_node_is_the_links(&v);
            if private {
                assert!(v["tap_device"].as_str().unwrap().starts_with(rt.path().to_str().unwrap()), "{v}");
            }
        }
        assert_eq!(ifindexes.len(), 1, "round {round}: every create saw the same link: {ifindexes:?}");
        assert_one_good_link(&ns, &name);
        for d in spawn_all(&["delete", &name]) {
            let out = d.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}: delete: {}", stderr(&out));
        }
        assert!(ns.link_json(&name).is_none(), "round {round}");
        assert!(tree(rt.path()).is_empty(), "round {round}: left {:?}", tree(rt.path()));
    }
    assert_eq!(changed_true, 50, "exactly one create per round made the link");
}

#[test]
#[ignore = "needs root"]
fn concurrent_creates_and_deletes_public_node() {
    require_root("concurrent_creates_and_deletes_public_node");
    let _serial = serial();
    concurrent_rounds(false);
}

#[test]
#[ignore = "needs root"]
fn concurrent_creates_and_deletes_private_node() {
    require_root("concurrent_creates_and_deletes_private_node");
    let _serial = serial();
    concurrent_rounds(true);
}

/// With 1,000 macvtaps in the namespace (made with one `ip -batch`), `show`, `show NAME`, `create` and
/// `delete` give the right answers. (Their cost is measured by `cargo bench --bench macvtap`.)
#[test]
#[ignore = "needs root"]
fn a_thousand_links() {
    require_root("a_thousand_links");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let rt = runtime_dir();
    let (bp, bq) = (unique("bp"), unique("bq"));
    ns.veth(&bp, &bq);
    let base = random_index();
    let batch: String = (0..1000)
        .map(|i| format!("link add link {bp} name k{i} index {} type macvtap mode bridge\n", base + i))
        .collect();
    let mut ip = Command::new("ip").args(["-n", &ns.name, "-batch", "-"]).stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(ip.stdin.as_mut().unwrap(), batch.as_bytes()).unwrap();
    drop(ip.stdin.take());
    assert!(ip.wait().unwrap().success());

    let started = Instant::now();
    let all = json(&run(Some(rt.path()), &ns, &["--json", "show"]));
    eprintln!("show with 1,000 links: {:?} (a figure, not a check)", started.elapsed());
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 1000);
    assert!(all.iter().all(|v| v["parent"] == bp.as_str() && v["mode"] == "bridge" && v["owned"] == false));
    // `show` takes device numbers from the machine-wide /sys/dev/char listing: each must be what the
    // namespace's own sysfs says, also for a (name, ifindex) pair that another namespace has too.
    let twin = Netns::new("tw");
    let (tp, tq) = (unique("tp"), unique("tq"));
    twin.veth(&tp, &tq);
    twin.ip(&["link", "add", "link", &tp, "name", "k7", "index", &(base + 7).to_string(), "type", "macvtap"]);
    for (ns, count) in [(&ns, 1000), (&twin, 1)] {
        let own = own_sysfs_devnums(ns);
        let shown = json(&run(Some(rt.path()), ns, &["--json", "show"]));
        let shown = shown.as_array().unwrap();
        assert_eq!(shown.len(), count);
        for v in shown {
            let key = (v["name"].as_str().unwrap().to_owned(), v["ifindex"].as_u64().unwrap());
            assert_eq!(v["tap_devnum"].as_str(), own.get(&key).map(String::as_str), "{key:?} in {}", ns.name);
        }
    }
    let k7 = |ns: &Netns| json(&run(Some(rt.path()), ns, &["--json", "show", "k7"]))["tap_devnum"].clone();
    assert_ne!(k7(&ns), k7(&twin), "two namespaces' k7 at one index are two devices");
    let name = unique("mv");
    let v = json(&run(Some(rt.path()), &ns, &["--json", "create", "--link", &parent, "--name", &name]));
    assert_eq!(v["changed"], true);
    assert_node_is_the_links(&v);
    let one = json(&run(Some(rt.path()), &ns, &["--json", "show", &name]));
    assert_eq!(one["ifindex"], v["ifindex"]);
    assert_eq!(one["parent"], parent.as_str());
    let k500 = json(&run(Some(rt.path()), &ns, &["--json", "show", "k500"]));
    assert_eq!(k500["ifindex"], base + 500);
    assert_eq!(json(&run(Some(rt.path()), &ns, &["--json", "show"])).as_array().unwrap().len(), 1001);
    assert!(run(Some(rt.path()), &ns, &["delete", &name]).status.success());
}

/// (name, ifindex) → "major:minor" of every macvtap, as the namespace's own sysfs lists them.
fn own_sysfs_devnums(ns: &Netns) -> std::collections::HashMap<(String, u64), String> {
    let out = ns.cmd("sh").args(["-c", "grep -H . /sys/class/net/*/macvtap/tap*/dev"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            // /sys/class/net/NAME/macvtap/tapN/dev:MAJ:MIN
            let (path, dev) = l.split_once("/dev:").unwrap();
            let mut parts = path.rsplit('/');
            let index = parts.next().unwrap().strip_prefix("tap").unwrap().parse().unwrap();
            parts.next();
            ((parts.next().unwrap().to_owned(), index), dev.to_owned())
        })
        .collect()
}

/// Kernel refusals come with what to do: a parent that is a bridge port, an MTU above the parent's, and a
/// lookup that finds nothing names the namespace it looked in.
#[test]
#[ignore = "needs root"]
fn errors_carry_their_context() {
    require_root("errors_carry_their_context");
    let _serial = serial();
    let (ns, parent) = ns_with_parent();
    let rt = runtime_dir();
    let br = unique("br");
    ns.ip(&["link", "add", "name", &br, "type", "bridge"]);
    ns.ip(&["link", "set", &parent, "master", &br]);
    let table = ns.link_table();
    let name = unique("mv");
    let out = run(Some(rt.path()), &ns, &["create", "--link", &parent, "--name", &name]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("port of bridge \"{br}\"")), "{}", stderr(&out));
    assert_eq!(ns.link_table(), table);
    ns.ip(&["link", "set", &parent, "nomaster"]);
    let table = ns.link_table();

    let out = run(Some(rt.path()), &ns, &["create", "--link", &parent, "--name", &name, "--mtu", "9000"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("MTU of the parent") && stderr(&out).contains("(1500)"), "{}", stderr(&out));
    assert_eq!(ns.link_table(), table);

    let ino = std::fs::metadata(ns.path()).unwrap().ino();
    let out = run(Some(rt.path()), &ns, &["delete", "ec-typo0"]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("network namespace \"{}\" (net:[{ino}])", ns.name)), "{said}");
    let out = run(Some(rt.path()), &ns, &["show", "ec-typo0"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains(&format!("net:[{ino}]")), "{}", stderr(&out));
    let out = common::run(Command::new(common::macvtap_bin()).args(["delete", "ec-typo0"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("this process's network namespace"));
}
