//! End-to-end LAN tests of `ec-ipxe-qemu run` (root): a real dnsmasq in a throwaway LAN namespace, a macvtap
//! made by ec-macvtap, vhost-net modes, one launcher per macvtap, and the link deleted under a running guest.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::launcher::{BIN, BOOT_TIMEOUT, LanGuest, OK_LINE, Run, Slot, assert_exit, no_qemu_left, qemu_pids};
use common::{macvtap, require_programs, wait_for};

// ---------------------------------------------------------------------------------------------------------
// LAN

/// The diagnostics DHCP on the LAN NIC: dnsmasq leases to exactly the macvtap's MAC, and the serial log shows
/// the address. print-args shows the LAN NIC with that MAC and fd 3, without side effects.
#[test]
#[ignore = "needs root"]
fn lan_dhcp_through_the_macvtap() {
    let Some(g) = LanGuest::new("lan_dhcp_through_the_macvtap") else { return };
    let out = g
        .lab
        .host
        .cmd(BIN)
        .args(["print-args", "--state-dir", g.state.to_str().unwrap(), "--accel", "tcg", "--no-disk"])
        .args(["--lan-interface", &g.name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let argv: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(argv.contains(&"tap,id=lan,fd=3".to_string()), "{argv:?}");
    assert!(argv.contains(&format!("virtio-net-pci,netdev=lan,mac={},romfile=,addr=0x4", g.mac)), "{argv:?}");
    assert!(!g.state.exists(), "print-args has no side effects");

    let _slot = Slot::take();
    let mut run = g.run();
    let s = run.wait_serial(OK_LINE, BOOT_TIMEOUT);
    let line = s.lines().find(|l| l.starts_with("ec-ipxe-qemu: LAN net1 192.168.77.")).unwrap_or_else(|| {
        panic!(
            "no LAN address in the serial log:\n{s}\n--- dnsmasq ---\n{}",
            std::fs::read_to_string(&g.lab.dhcp_log).unwrap_or_default()
        )
    });
    let ip = line.trim_start_matches("ec-ipxe-qemu: LAN net1 ").trim().to_owned();
    let leases = wait_for(Duration::from_secs(15), || {
        let l = g.lab.leases();
        (!l.is_empty()).then_some(l)
    })
    .unwrap_or_default();
    assert_eq!(leases, vec![(g.mac.clone(), ip)], "dnsmasq leased to exactly the macvtap's MAC");
    // --lan-vhost auto with the real /dev/vhost-net: used when it opens, otherwise one line saying why.
    let log = run.stderr();
    if Path::new("/dev/vhost-net").exists() {
        assert!(log.contains("vhost-net: on (1 fd(s) from /dev/vhost-net)"), "{log}");
    } else {
        assert_eq!(log.matches("vhost-net: off: /dev/vhost-net does not exist").count(), 1, "{log}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// vhost-net (issue 12). This machine has no /dev/vhost-net: the tests point EC_VHOST_NET_DEVICE (a test-only
// override) at paths that make the real open(2) fail the ways it fails in the field, and use the real
// /dev/vhost-net where it exists.

/// `print-args` for the LAN guest with `--lan-vhost MODE`, the device at `device` (None: the real one).
fn vhost_print_args(g: &LanGuest, mode: &str, device: Option<&Path>) -> std::process::Output {
    let mut c = g.lab.host.cmd(BIN);
    c.args(["print-args", "--state-dir", g.state.to_str().unwrap(), "--accel", "tcg", "--no-disk"]);
    c.args(["--lan-interface", &g.name, "--lan-vhost", mode]);
    if let Some(d) = device {
        c.env("EC_VHOST_NET_DEVICE", d);
    }
    common::run(&mut c)
}

/// auto: a missing device is one log line and no vhost in the argv, and the guest boots and leases on the
/// LAN; off: not even the line; on: exit 3 (missing, or not the vhost-net device) with nothing left behind.
#[test]
#[ignore = "needs root"]
fn lan_vhost_auto_falls_back_on_refuses_a_missing_device() {
    let Some(g) = LanGuest::new("lan_vhost_auto_falls_back_on_refuses_a_missing_device") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("vhost-net");
    let fallback = format!("vhost-net: off: {} does not exist", missing.display());

    let out = vhost_print_args(&g, "auto", Some(&missing));
    let argv: Vec<String> = common::json(&out).as_array().unwrap().iter().map(|a| a.as_str().unwrap().into()).collect();
    assert!(argv.contains(&"tap,id=lan,fd=3".to_string()), "{argv:?}");
    assert!(!argv.iter().any(|a| a.contains("vhost")), "{argv:?}");
    assert_eq!(common::stderr(&out).matches(&fallback).count(), 1, "{}", common::stderr(&out));
    let out = vhost_print_args(&g, "off", Some(&missing));
    assert!(out.status.success() && !common::stderr(&out).contains("vhost-net"), "{}", common::stderr(&out));
    for (device, says) in [
        (missing.clone(), format!("--lan-vhost on: {} does not exist (load the vhost_net module)", missing.display())),
        ("/dev/null".into(), "is not the vhost-net device (character device 10:238)".to_string()),
    ] {
        let out = vhost_print_args(&g, "on", Some(&device));
        assert_eq!(out.status.code(), Some(3), "{}", common::stderr(&out));
        assert!(common::stderr(&out).contains(&says), "{}", common::stderr(&out));
        assert_eq!(common::stderr(&out).trim().lines().count(), 1, "one line: {}", common::stderr(&out));
    }
    assert!(!g.state.exists(), "print-args has no side effects");

    // run --lan-vhost on: refused before QEMU, and the state directory it created is gone again.
    let mut c = g.lab.host.cmd(BIN);
    c.args(["run", "--state-dir", g.state.to_str().unwrap(), "--accel", "tcg", "--no-disk"]);
    c.args(["--lan-interface", &g.name, "--lan-vhost", "on"]).env("EC_VHOST_NET_DEVICE", &missing);
    let out = common::run(&mut c);
    assert_eq!(out.status.code(), Some(3), "{}", common::stderr(&out));
    assert!(!g.state.exists(), "run left {} behind", g.state.display());
    assert!(no_qemu_left(&g.state));

    // run --lan-vhost auto: the guest boots without vhost and leases on the LAN.
    let _slot = Slot::take();
    let mut run = Run::start_in(
        Some(&g.lab.host),
        &g.state,
        &["--no-disk", "--lan-interface", &g.name, "--shutdown-timeout", "0"],
        &[("EC_VHOST_NET_DEVICE", missing.as_ref())],
    );
    let s = run.wait_serial(OK_LINE, BOOT_TIMEOUT);
    assert!(s.contains("ec-ipxe-qemu: LAN net1 192.168.77."), "{s}");
    assert_eq!(run.stderr().matches(&fallback).count(), 1, "{}", run.stderr());
    let pids = qemu_pids(&g.state);
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", pids[0])).unwrap();
    assert!(cmdline.contains("tap,id=lan,fd=3\0") && !cmdline.contains("vhost"), "{cmdline:?}");
}

/// `--lan-vhost on` with the real /dev/vhost-net: in use where the device exists (the fd is in QEMU), exit 3
/// where it does not.
#[test]
#[ignore = "needs root"]
fn lan_vhost_on_with_the_real_device() {
    let Some(g) = LanGuest::new("lan_vhost_on_with_the_real_device") else { return };
    let out = vhost_print_args(&g, "on", None);
    if !Path::new("/dev/vhost-net").exists() {
        assert_eq!(out.status.code(), Some(3), "{}", common::stderr(&out));
        assert!(
            common::stderr(&out).contains("--lan-vhost on: /dev/vhost-net does not exist"),
            "{}",
            common::stderr(&out)
        );
        return;
    }
    let argv: Vec<String> = common::json(&out).as_array().unwrap().iter().map(|a| a.as_str().unwrap().into()).collect();
    assert!(argv.contains(&"tap,id=lan,fd=3,vhost=on,vhostfd=4".to_string()), "{argv:?}");
    let _slot = Slot::take();
    let mut run = Run::start(
        Some(&g.lab.host),
        &g.state,
        &["--no-disk", "--lan-interface", &g.name, "--lan-vhost", "on", "--shutdown-timeout", "0"],
    );
    let s = run.wait_serial(OK_LINE, BOOT_TIMEOUT);
    assert!(s.contains("ec-ipxe-qemu: LAN net1 192.168.77."), "{s}");
    let pid = qemu_pids(&g.state)[0];
    let held = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .any(|l| l == Path::new("/dev/vhost-net"));
    assert!(held, "QEMU holds no /dev/vhost-net fd");
}

/// `--lan-vhost on` refused by the device's owner and mode: exit 5, nothing left behind. The launcher runs as
/// `nobody` (as the unit's static user would) on a macvtap given to `nobody`, and the device is a real
/// vhost-net node (10:238, root's, 0600) made with mknod, so the kernel's own permission check refuses it.
/// The same node opened by root reaches the driver: exit 3 without the vhost_net module.
#[test]
#[ignore = "needs root"]
fn lan_vhost_on_refused_is_exit_5() {
    let t = "lan_vhost_on_refused_is_exit_5";
    let Some(g) = LanGuest::with_create_args(t, &["--owner", "nobody"]) else { return };
    if !require_programs(t, &["setpriv"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let node = tmp.path().join("vhost-net");
    nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(10, 238),
    )
    .unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&home, Some(nobody.uid), Some(nobody.gid)).unwrap();
    let state = home.join("state");
    let as_nobody = |sub: &str, mode: &str| {
        let mut c = g.lab.host.cmd("setpriv");
        c.args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--", BIN, sub, "--state-dir"]);
        c.arg(&state).args(["--accel", "tcg", "--no-disk", "--lan-interface", &g.name, "--lan-vhost", mode]);
        common::run(c.env("EC_VHOST_NET_DEVICE", &node))
    };
    let says =
        format!("--lan-vhost on: permission denied opening {} (its owner and mode keep this user out)", node.display());
    for sub in ["print-args", "run"] {
        let out = as_nobody(sub, "on");
        assert_eq!(out.status.code(), Some(5), "{sub}: {}", common::stderr(&out));
        assert!(common::stderr(&out).contains(&says), "{sub}: {}", common::stderr(&out));
        assert!(!state.exists(), "{sub} left {} behind", state.display());
    }
    assert!(no_qemu_left(&state));
    let out = as_nobody("print-args", "auto");
    assert!(out.status.success(), "{}", common::stderr(&out));
    let fallback = format!("vhost-net: off: permission denied opening {}", node.display());
    assert_eq!(common::stderr(&out).matches(&fallback).count(), 1, "{}", common::stderr(&out));
    // The same node as root: the kernel lets root open it, and then it is up to the driver. Without the
    // vhost_net module (no vhost-net in /proc/misc) that is "no driver" (exit 3); with it, vhost is on.
    let loaded = std::fs::read_to_string("/proc/misc").unwrap_or_default().contains("vhost-net");
    let out = vhost_print_args(&g, "on", Some(&node));
    if loaded {
        let argv = common::json(&out).to_string();
        assert!(argv.contains("vhost=on,vhostfd=4"), "{argv}");
    } else {
        assert_eq!(out.status.code(), Some(3), "{}", common::stderr(&out));
        let says = format!("--lan-vhost on: {} has no driver behind it (load the vhost_net module)", node.display());
        assert!(common::stderr(&out).contains(&says), "{}", common::stderr(&out));
    }
}

/// QEMU killed with SIGKILL: `run` exits non-zero, and `ec-macvtap delete` afterwards leaves no link or node.
#[test]
#[ignore = "needs root"]
fn qemu_killed_then_cleanup() {
    let Some(g) = LanGuest::new("qemu_killed_then_cleanup") else { return };
    let _slot = Slot::take();
    let mut run = g.run();
    run.wait_started();
    let pids = qemu_pids(&g.state);
    assert_eq!(pids.len(), 1, "{pids:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_exit(run.wait(Duration::from_secs(10)), 1, &run);
    assert!(run.stderr().contains("QEMU failed: signal 9 (SIGKILL)"), "{}", run.stderr());
    let out = macvtap(Some(&g.lab.host), &["delete", &g.name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(g.lab.host.link_json(&g.name).is_none(), "link left behind");
    // The kernel removes a public /dev/tapN with the link; delete removes a private node.
    let gone = wait_for(Duration::from_secs(10), || (!Path::new(&g.node).exists()).then_some(()));
    assert!(gone.is_some(), "tap node {} left behind", g.node);
    assert!(no_qemu_left(&g.state));
}

/// The LAN link deleted under a running guest: `run` stops QEMU and exits non-zero within 2 s.
#[test]
#[ignore = "needs root"]
fn lan_link_deleted_under_a_running_guest() {
    let Some(g) = LanGuest::new("lan_link_deleted_under_a_running_guest") else { return };
    let _slot = Slot::take();
    let mut run = g.run();
    run.wait_started();
    std::thread::sleep(Duration::from_millis(500));
    let deleted = Instant::now();
    g.lab.host.ip(&["link", "del", &g.name]);
    let status = run.wait(Duration::from_secs(15));
    let took = deleted.elapsed();
    assert_exit(status, 1, &run);
    assert!(took <= Duration::from_secs(8), "took {took:?} to notice\n{}", run.stderr());
    assert!(run.stderr().contains("disappeared"), "{}", run.stderr());
    assert!(no_qemu_left(&g.state));
}

/// One launcher per macvtap: a second `run` on the same `--lan-interface` (another state dir) exits 4 naming
/// the first run's pid, touches nothing, and the first guest runs on. A process that is not a launcher but
/// holds the tap device (here `ec-macvtap exec` running sleep) is named too.
#[test]
#[ignore = "needs root"]
fn one_launcher_per_macvtap() {
    let Some(g) = LanGuest::new("one_launcher_per_macvtap") else { return };
    let _slot = Slot::take();
    let mut first = g.run();
    first.wait_started();
    let other = g.tmp.path().join("other-state");
    let second = |state: &Path| {
        g.lab
            .host
            .cmd(BIN)
            .args(["run", "--state-dir"])
            .arg(state)
            .args(["--accel", "tcg", "--memory", "256", "--no-disk", "--lan-interface", &g.name])
            .output()
            .unwrap()
    };
    let out = second(&other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains(&format!("--lan-interface \"{}\": macvtap is in use", g.name)), "{err}");
    assert!(err.contains(&format!("(pid {})", first.pid())), "{err}");
    assert!(!other.exists(), "the refused run leaves nothing");
    assert!(first.running(), "the first run goes on");
    assert_eq!(qemu_pids(&g.state).len(), 1);
    // A second signal skips the shutdown timeout (iPXE ignores ACPI).
    first.signal(nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert_exit(first.wait(Duration::from_secs(15)), 0, &first);

    // Not a launcher, but holding the tap.
    let mut holder = common::KillOnDrop(
        Command::new(common::macvtap_bin())
            .args(["--netns", &g.lab.host.name, "exec", "--name", &g.name, "--", "sleep", "60"])
            .spawn()
            .unwrap(),
    );
    let held = wait_for(Duration::from_secs(15), || {
        let pid = holder.0.id() as i32;
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()?
            .flatten()
            .any(|f| std::fs::read_link(f.path()).is_ok_and(|p| p.to_string_lossy().contains("tap")))
            .then_some(())
    });
    assert!(held.is_some(), "ec-macvtap exec did not open the tap");
    let out = second(&other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains(&format!("is held by pid {} (sleep)", holder.0.id())), "{err}");
    assert!(!other.exists());
    let _ = holder.0.kill();
}

/// The LAN link deleted while the launcher's link-notification socket is flooded with other links' events:
/// the run still ends with exit 1 naming the link, within 2 s of the deletion.
#[test]
#[ignore = "needs root"]
fn lan_link_deleted_during_a_link_event_flood() {
    let Some(g) = LanGuest::new("lan_link_deleted_during_a_link_event_flood") else { return };
    let _slot = Slot::take();
    let mut run = g.run();
    run.wait_started();
    // 400 veth pairs created and deleted in one batch: thousands of RTM_NEWLINK/DELLINK messages, with the
    // macvtap's deletion in the middle.
    let batch = g.tmp.path().join("flood.batch");
    let mut text = String::new();
    for i in 0..200 {
        text.push_str(&format!("link add fa{i} type veth peer name fb{i}\n"));
    }
    text.push_str(&format!("link del {}\n", g.name));
    for i in 0..200 {
        text.push_str(&format!("link del fa{i}\n"));
    }
    std::fs::write(&batch, text).unwrap();
    g.lab.host.ip(&["-batch", batch.to_str().unwrap()]);
    let deleted = Instant::now();
    let status = run.wait(Duration::from_secs(15));
    assert_exit(status, 1, &run);
    assert!(deleted.elapsed() <= Duration::from_secs(8), "took {:?}\n{}", deleted.elapsed(), run.stderr());
    assert!(run.stderr().contains(&format!("LAN macvtap \"{}\"", g.name)), "{}", run.stderr());
    assert!(run.stderr().contains("disappeared"), "{}", run.stderr());
    assert!(no_qemu_left(&g.state));
}
