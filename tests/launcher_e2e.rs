//! End-to-end tests of `ec-ipxe-qemu`: a real QEMU under TCG, real iPXE (Debian's `ipxe-qemu` option ROMs and
//! `ipxe.lkrn`), a real dnsmasq in a throwaway LAN namespace.
//!
//! Each test makes what it needs with unique names and removes it on drop, even when it fails. Tests that need
//! QEMU (or root, for the LAN lab) skip with a reason, and fail instead under `CI=true`. At most two QEMUs run
//! at once (the CI machines have two cores; TCG is CPU-bound).
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http::Http;
use common::launcher::{Run, Slot, assert_exit, no_qemu_left, qemu_pids, require_qemu, serial};
use common::{Lab, macvtap, require_programs, require_root, unique, wait_for};

use common::launcher::BIN;
const OK_LINE: &str = "ec-ipxe-qemu: boot path OK";
const LKRN: &str = "/usr/lib/ipxe/ipxe.lkrn";
/// How long an iPXE boot may take under TCG with another QEMU beside it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------------------
// Fixtures

/// A LAN test's world: the lab (host and LAN namespaces, dnsmasq), a macvtap made by ec-macvtap on the
/// lab's uplink (deleted again on drop, before the lab goes), and a state dir. None (after the skip-or-fail
/// rule) when the test cannot run here.
struct LanGuest {
    lab: Lab,
    name: String,
    mac: String,
    node: String,
    state: PathBuf,
    _tmp: tempfile::TempDir,
}

impl LanGuest {
    fn new(test: &str) -> Option<LanGuest> {
        LanGuest::with_create_args(test, &[])
    }

    /// The same, with more `ec-macvtap create` arguments (e.g. `--owner nobody`).
    fn with_create_args(test: &str, extra: &[&str]) -> Option<LanGuest> {
        require_root(test);
        if !require_qemu(test) || !require_programs(test, &["dnsmasq", "ip"]) {
            return None;
        }
        let lab = Lab::new();
        let name = unique("lv");
        let mut args = vec!["--json", "create", "--link", &lab.uplink, "--name", &name];
        args.extend_from_slice(extra);
        let out = macvtap(Some(&lab.host), &args);
        assert!(out.status.success(), "ec-macvtap create: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        Some(LanGuest {
            mac: v["mac"].as_str().unwrap().to_owned(),
            node: v["tap_device"].as_str().unwrap().to_owned(),
            state: tmp.path().join("state"),
            name,
            lab,
            _tmp: tmp,
        })
    }

    /// `ec-ipxe-qemu run` in the host namespace with the LAN NIC on the macvtap.
    fn run(&self) -> Run {
        Run::start(Some(&self.lab.host), &self.state, &["--no-disk", "--lan-interface", &self.name])
    }
}

impl Drop for LanGuest {
    fn drop(&mut self) {
        let _ = macvtap(Some(&self.lab.host), &["-q", "delete", &self.name]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Boot paths

/// The NIC ROM's iPXE loads boot.ipxe over slirp TFTP and chains to a loopback HTTP URL.
#[test]
fn user_mode_chain_to_loopback_http() {
    let t = "user_mode_chain_to_loopback_http";
    if !require_qemu(t) {
        return;
    }
    let marker = format!("E2E-CHAIN-{}", unique("m"));
    let server = Http::any(format!("#!ipxe\necho {marker}\nsleep 3600\n"));
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let url = format!("http://10.0.2.2:{}/chain.ipxe?from=${{net0/mac}}", server.port);
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--boot-url", &url]);
    let s = run.wait_serial(&marker, BOOT_TIMEOUT);
    assert!(s.contains("tftp://10.0.2.2/boot.ipxe"), "the ROM fetched the script over TFTP:\n{s}");
    assert!(s.contains("ec-ipxe-qemu: chaining http://10.0.2.2:"), "{s}");
    let seen = server.seen();
    // iPXE expanded ${net0/mac} in the URL (and percent-encoded it).
    assert!(seen.iter().any(|r| r == "GET /chain.ipxe?from=52%3A54%3A00%3A12%3A34%3A56"), "server saw {seen:?}");
    // The boot path never touches a LAN NIC.
    assert!(!std::fs::read_to_string(state.join("tftp/boot.ipxe")).unwrap().contains("net1"));
    // One DHCP on the boot NIC (the ROM's autoboot): the script keeps the address it got.
    assert_eq!(s.matches("Configuring (net0").count(), 1, "{s}");
    assert!(s.contains("ec-ipxe-qemu: boot net0 52:54:00:12:34:56 ip 10.0.2.15"), "{s}");
    // The ROM's Ctrl-B banner was shown and answered at once.
    assert!(s.contains("Press Ctrl-B for the iPXE command line..."), "{s}");
    let log = run.stderr();
    assert!(log.contains("iPXE banner \"Press Ctrl-B for the iPXE command line...\": pressed Enter"), "{log}");
}

/// `--ipxe ipxe.lkrn` with a chain URL: the script gives the boot NIC the user-mode network's fixed addresses
/// (no DHCP at all, so none of its waits) and the chain sees them, with `--hostname` as `${hostname}`.
#[test]
fn ipxe_lkrn_chains_with_the_fixed_user_mode_addresses() {
    let t = "ipxe_lkrn_chains_with_the_fixed_user_mode_addresses";
    if !require_qemu(t) || !require_programs(t, &[LKRN]) {
        return;
    }
    let marker = format!("E2E-FIXED-{}", unique("m"));
    let server = Http::any(format!("#!ipxe\necho {marker}\nsleep 3600\n"));
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let url = format!("http://10.0.2.2:{}/c.ipxe?h=${{hostname}}&ip=${{net0/ip}}&gw=${{net0/gateway}}", server.port);
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--ipxe", LKRN, "--hostname", "pub1", "--boot-url", &url]);
    let s = run.wait_serial(&marker, BOOT_TIMEOUT);
    assert!(!s.contains("Configuring (net0"), "no DHCP on the boot NIC:\n{s}");
    assert!(!s.contains("no DHCP answer"), "{s}");
    assert!(s.contains("ec-ipxe-qemu: boot net0 52:54:00:12:34:56 ip 10.0.2.15"), "{s}");
    assert!(s.contains("ec-ipxe-qemu: gateway 10.0.2.2 dns 10.0.2.3"), "{s}");
    let seen = server.seen();
    assert!(seen.iter().any(|r| r == "GET /c.ipxe?h=pub1&ip=10.0.2.15&gw=10.0.2.2"), "server saw {seen:?}");
    assert!(!run.stderr().contains("iPXE banner"), "no ROM banner on the --ipxe path:\n{}", run.stderr());
}

/// `--boot-dir`: the launcher's own HTTP server serves netboot.ipxe to the guest.
#[test]
fn boot_dir_through_builtin_server() {
    let t = "boot_dir_through_builtin_server";
    if !require_qemu(t) {
        return;
    }
    let marker = format!("E2E-BOOTDIR-{}", unique("m"));
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("netboot.ipxe"), format!("#!ipxe\necho {marker}\nsleep 3600\n")).unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--boot-dir", www.to_str().unwrap()]);
    run.wait_serial(&marker, BOOT_TIMEOUT);
    let log = run.stderr();
    assert!(log.contains("boot HTTP: GET /netboot.ipxe from 127.0.0.1"), "{log}");
    assert!(log.contains(": 200 ("), "{log}");
}

/// `--ipxe ipxe.lkrn`: the image boots with the generated script as its initrd; the NIC ROM stays off.
#[test]
fn ipxe_lkrn_runs_the_generated_script() {
    let t = "ipxe_lkrn_runs_the_generated_script";
    if !require_qemu(t) || !require_programs(t, &[LKRN]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--ipxe", LKRN]);
    let s = run.wait_serial(OK_LINE, BOOT_TIMEOUT);
    assert!(!s.contains("tftp://10.0.2.2/boot.ipxe"), "the ROM must not have booted:\n{s}");
    assert!(!s.contains("Press Ctrl-B to configure iPXE (PCI 00:03.0)"), "the boot NIC ROM is off:\n{s}");
}

/// The built-in diagnostics print the OK line; then SIGTERM stops everything with exit 0 within the timeout.
#[test]
fn diagnostics_ok_line_then_graceful_stop() {
    let t = "diagnostics_ok_line_then_graceful_stop";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--shutdown-timeout", "2", "--dns", "9.9.9.9"]);
    let s = run.wait_serial(OK_LINE, BOOT_TIMEOUT);
    assert!(s.contains("ec-ipxe-qemu: boot net0 52:54:00:12:34:56 ip 10.0.2.15"), "{s}");
    assert!(s.contains("dns 9.9.9.9"), "{s}");
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    // iPXE ignores ACPI power-off: the launcher quits QEMU after the timeout, and that is a requested stop.
    let asked = Instant::now();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let status = run.wait(Duration::from_secs(15));
    assert_exit(status, 0, &run);
    assert!(asked.elapsed() < Duration::from_secs(2 + 8), "took {:?}", asked.elapsed());
    assert!(no_qemu_left(&state), "QEMU left behind");
    let log = run.stderr();
    assert!(log.contains("SIGTERM: asking the guest to power off"), "{log}");
    assert!(!state.join("qmp.sock").exists(), "the QMP socket is removed");
}

// ---------------------------------------------------------------------------------------------------------
// Lifecycle

/// A second run on the same state directory exits 4 and leaves the first alone.
#[test]
fn second_run_on_the_same_state_dir_is_refused() {
    let t = "second_run_on_the_same_state_dir_is_refused";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut first = Run::start(None, &state, &["--no-disk", "--shutdown-timeout", "0"]);
    first.wait_started();
    let script = std::fs::read(state.join("tftp/boot.ipxe")).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--state-dir", state.to_str().unwrap(), "--accel", "tcg", "--no-disk", "--boot-url"])
        .arg("http://example.invalid/x")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("is in use by another ec-ipxe-qemu run"), "{err}");
    assert!(err.contains(&format!("pid {}", first.pid())), "{err}");
    assert!(first.running(), "the first run must go on");
    assert_eq!(qemu_pids(&state).len(), 1, "exactly the first QEMU");
    assert_eq!(std::fs::read(state.join("tftp/boot.ipxe")).unwrap(), script, "the first run's script is untouched");
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert_exit(first.wait(Duration::from_secs(15)), 0, &first);
}

/// The qcow2 is created once and never overwritten: data written into it survives a restart of `run`.
#[test]
fn persistent_disk_survives_a_restart() {
    let t = "persistent_disk_survives_a_restart";
    if !require_qemu(t) || !require_programs(t, &["qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let disk = state.join("disk.qcow2");
    let _slot = Slot::take();
    let stop = |mut run: Run| {
        run.wait_started();
        run.signal(nix::sys::signal::Signal::SIGTERM);
        assert_exit(run.wait(Duration::from_secs(15)), 0, &run);
    };
    stop(Run::start(None, &state, &["--disk-size", "16M", "--shutdown-timeout", "0"]));
    let qemu_io = |cmd: &str| {
        let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd]).arg(&disk).output().unwrap();
        assert!(out.status.success(), "qemu-io {cmd}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    qemu_io("write -P 0xab 0 64k");
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&disk).unwrap());
    // A different --disk-size must not recreate or resize it.
    stop(Run::start(None, &state, &["--disk-size", "32M", "--shutdown-timeout", "0"]));
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&disk).unwrap()), inode);
    let read = qemu_io("read -P 0xab 0 64k");
    assert!(read.contains("read 65536/65536 bytes"), "{read}");
    let info = Command::new("qemu-img").args(["info", "--output=json"]).arg(&disk).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["virtual-size"], 16 << 20);
}

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
    let leases = wait_for(Duration::from_secs(5), || {
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
    let gone = wait_for(Duration::from_secs(3), || (!Path::new(&g.node).exists()).then_some(()));
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
    let status = run.wait(Duration::from_secs(5));
    let took = deleted.elapsed();
    assert_exit(status, 1, &run);
    assert!(took <= Duration::from_secs(2), "took {took:?} to notice\n{}", run.stderr());
    assert!(run.stderr().contains("disappeared"), "{}", run.stderr());
    assert!(no_qemu_left(&g.state));
}

// ---------------------------------------------------------------------------------------------------------
// Bad input

/// Each bad input: the documented exit code, a message naming the option, the state dir unchanged or absent,
/// and no QEMU started.
#[test]
fn bad_input_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let state = d.join("state");
    let s = state.to_str().unwrap();
    let file = d.join("a-file");
    std::fs::write(&file, "keep me").unwrap();
    let f = file.to_str().unwrap();
    let raw = d.join("raw.img");
    std::fs::write(&raw, "not qcow2").unwrap();
    let r = raw.to_str().unwrap();
    let www = d.join("www");
    std::fs::create_dir(&www).unwrap();
    let w = www.to_str().unwrap();
    let qemu = common::which("qemu-system-x86_64").map(|p| p.display().to_string()).unwrap_or("/bin/true".into());
    let q = qemu.as_str();
    let missing_link = unique("nolink");
    let under_file = format!("{f}/sub");
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["--state-dir", s, "--memory", "0"], 2, "--memory"),
        (vec!["--state-dir", s, "--memory", "-512"], 2, "--memory"),
        (vec!["--state-dir", s, "--memory", "99999999999"], 2, "--memory"),
        (vec!["--state-dir", s, "--cpus", "0"], 2, "--cpus"),
        (vec!["--state-dir", s, "--cpus", "100000"], 2, "--cpus"),
        (vec!["--state-dir", s, "--disk-size", "0"], 2, "--disk-size"),
        (vec!["--state-dir", s, "--disk-size", "-1G"], 2, "--disk-size"),
        (vec!["--state-dir", s, "--disk-size", "999999T"], 2, "--disk-size"),
        (vec!["--state-dir", s, "--boot-url", "not a url"], 2, "--boot-url"),
        (vec!["--state-dir", s, "--boot-url", "ftp://example.org/x"], 2, "--boot-url"),
        (vec!["--state-dir", s, "--boot-url", "http:///x"], 2, "--boot-url"),
        (vec!["--state-dir", s, "--host-forward", "tcp:2222:22"], 2, "--host-forward"),
        (vec!["--state-dir", s, "--host-forward", "tcp::99999-:22"], 2, "--host-forward"),
        (vec!["--state-dir", s, "--ipxe", "/nonexistent/ipxe.lkrn"], 2, "--ipxe"),
        (vec!["--state-dir", s, "--qemu", "/nonexistent/qemu-system-x86_64"], 2, "--qemu"),
        (vec!["--state-dir", s, "--qemu", f], 2, "--qemu"),
        (vec!["--state-dir", f, "--qemu", q], 2, "--state-dir"),
        (vec!["--state-dir", &under_file, "--qemu", q], 2, "--state-dir"),
        (vec!["--state-dir", s, "--qemu", q, "--disk", r], 2, "--disk"),
        (vec!["--state-dir", s, "--qemu", q, "--boot-dir", w], 2, "--boot-dir"),
        (vec!["--state-dir", s, "--qemu", q, "--boot-url", "http://a/", "--boot-dir", w], 2, "--boot-dir"),
        (vec!["--state-dir", s, "--qemu", q, "--no-disk", "--lan-interface", "bad/name"], 2, "--lan-interface"),
        (vec!["--state-dir", s, "--qemu", q, "--no-disk", "--lan-interface", &missing_link], 3, &missing_link),
        (vec!["--state-dir", s, "--qemu", q, "--no-disk", "--lan-interface", "lo"], 2, "not a macvtap"),
        (
            vec!["--state-dir", s, "--qemu", q, "--no-disk", "--serial-log", "/nonexistent/dir/serial.log"],
            2,
            "--serial-log",
        ),
    ];
    for (args, code, needle) in &cases {
        for sub in ["run", "print-args"] {
            let out = Command::new(BIN).arg(sub).args(args).args(["--accel", "tcg"]).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(*code), "{sub} {args:?}: {err}");
            assert!(err.contains(needle), "{sub} {args:?}: message must name {needle:?}: {err}");
            let first = err.lines().find(|l| l.contains("error") || l.starts_with("ec-ipxe-qemu:")).unwrap_or("");
            assert!(!first.is_empty(), "{sub} {args:?}: one clear line: {err}");
            assert!(!state.exists(), "{sub} {args:?}: the state dir must not be created");
            assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
            assert_eq!(std::fs::read_to_string(&raw).unwrap(), "not qcow2");
            assert!(qemu_pids(d).is_empty(), "{sub} {args:?}: no QEMU");
        }
    }
    assert_eq!(std::fs::read_dir(&www).unwrap().count(), 0);
}

/// A stop request while the launcher is still preparing (here: a slow qemu-img) is neither lost nor fatal:
/// the disk is finished, QEMU is never started, and `run` exits 0 with no temporary file left behind.
#[test]
fn stop_during_preparation_is_orderly() {
    let t = "stop_during_preparation_is_orderly";
    if !require_qemu(t) || !require_programs(t, &["qemu-img"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let marker = tmp.path().join("qemu-img-started");
    let slow_img = tmp.path().join("slow-qemu-img");
    std::fs::write(&slow_img, format!("#!/bin/sh\ntouch '{}'\nsleep 2\nexec qemu-img \"$@\"\n", marker.display()))
        .unwrap();
    std::fs::set_permissions(&slow_img, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let _slot = Slot::take();
    let mut run = Run::start(
        None,
        &state,
        &["--disk-size", "16M", "--qemu-img", slow_img.to_str().unwrap(), "--shutdown-timeout", "1"],
    );
    wait_for(Duration::from_secs(10), || marker.exists().then_some(())).expect("qemu-img started");
    run.signal(nix::sys::signal::Signal::SIGTERM);
    assert_exit(run.wait(Duration::from_secs(30)), 0, &run);
    let log = run.stderr();
    assert!(log.contains("SIGTERM while preparing: not starting QEMU"), "{log}");
    assert!(!log.contains("QEMU started"), "{log}");
    let names: Vec<String> =
        std::fs::read_dir(&state).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.contains(&"disk.qcow2".to_owned()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("tmp") || n.starts_with('.')), "temporary files left: {names:?}");
    assert!(no_qemu_left(&state));
}

/// A state dir the (unprivileged) launcher cannot write is refused before anything happens. Root can write
/// anywhere, so this runs the launcher as `nobody`.
#[test]
#[ignore = "needs root"]
fn unwritable_state_dir_is_refused() {
    let t = "unwritable_state_dir_is_refused";
    require_root(t);
    if !require_programs(t, &["setpriv"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let below = ro.join("state");
    for state in [&ro, &below] {
        for sub in ["run", "print-args"] {
            let out = Command::new("setpriv")
                .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--", BIN, sub, "--state-dir"])
                .arg(state)
                .args(["--accel", "tcg", "--no-disk", "--qemu", "/bin/true"])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{sub} {}: {err}", state.display());
            assert!(err.contains("--state-dir") && err.contains("not writable"), "{sub} {}: {err}", state.display());
        }
    }
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0, "nothing created");
}

// ---------------------------------------------------------------------------------------------------------
// Hostile guests, faults and concurrent runs (issue 8)

/// The number of threads of process `pid` (from /proc/PID/status).
fn threads(pid: i32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok())
}

/// Enough fds for a flood of connections from this process.
fn raise_nofile(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).unwrap();
    }
}

/// The boot HTTP server under 1,000 half-sent requests and 100 clients that request a large file and never
/// read it: the launcher's thread count stays bounded, the guest still chains its script, and SIGTERM still
/// ends the run with exit 0.
#[test]
fn boot_http_server_survives_a_connection_flood() {
    let t = "boot_http_server_survives_a_connection_flood";
    if !require_qemu(t) {
        return;
    }
    use std::io::Write;
    raise_nofile(4096);
    let marker = format!("E2E-FLOOD-{}", unique("m"));
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("netboot.ipxe"), format!("#!ipxe\necho {marker}\nsleep 3600\n")).unwrap();
    std::fs::File::create(www.join("big.img")).unwrap().set_len(512 << 20).unwrap();
    // A fixed free port, so the flood can start before the guest boots.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(
        None,
        &state,
        // iPXE ignores the ACPI power-off, so the stop waits out the whole timeout: keep it well inside the 30 s
        // the test waits for the exit (the default 30 s raced it on a loaded machine).
        &[
            "--no-disk",
            "--boot-dir",
            www.to_str().unwrap(),
            "--boot-http-port",
            &port.to_string(),
            "--shutdown-timeout",
            "2",
        ],
    );
    run.wait_started();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut flood = Vec::new();
    let mut max_threads = threads(run.pid()).unwrap();
    // Interleaved: every 11th client is a slow reader, so both kinds hold some of the server's slots.
    for i in 0..1100 {
        let Ok(mut s) = std::net::TcpStream::connect(addr) else { continue };
        let _ = if i % 11 != 10 {
            s.write_all(b"GET /netboot.ipxe HTTP/1.1\r\nHost: 10.0.2.2\r\nX-Half: ")
        } else {
            s.write_all(b"GET /big.img HTTP/1.1\r\nHost: 10.0.2.2\r\n\r\n")
        };
        flood.push(s);
        if i % 50 == 0 {
            max_threads = max_threads.max(threads(run.pid()).unwrap_or(0));
        }
    }
    let flood_open = Instant::now();
    // While the flood is held open, the guest boots and chains its script.
    let mut during = 0;
    let start = Instant::now();
    let s = loop {
        max_threads = max_threads.max(threads(run.pid()).unwrap_or(0));
        during += 1;
        let s = run.serial();
        if s.contains(&marker) {
            break s;
        }
        assert!(run.running(), "the launcher died under the flood\n{}", run.stderr());
        assert!(start.elapsed() < BOOT_TIMEOUT, "the guest did not chain\n{s}\n{}", run.stderr());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(s.contains("chaining http://10.0.2.2:"), "{s}");
    eprintln!(
        "FIGURE launcher threads under 1,000 half-open + 100 slow-reader connections: max {max_threads} \
         (sampled {during} times over {:?} while the flood was held open)",
        flood_open.elapsed()
    );
    assert!(max_threads <= 8, "thread count not bounded: {max_threads}");
    let log = run.stderr();
    assert!(log.contains("connections open; refused the one from 127.0.0.1"), "the cap held:\n{log}");
    assert!(log.contains("boot HTTP: GET /netboot.ipxe from 127.0.0.1"), "{log}");
    run.signal(nix::sys::signal::Signal::SIGTERM);
    assert_exit(run.wait(Duration::from_secs(30)), 0, &run);
    drop(flood);
    assert!(no_qemu_left(&state));
}

/// A fake QEMU for tests about the launcher's own steps before QEMU matters: it ignores its arguments, holds
/// everything it was given for `secs` seconds and exits 0.
fn fake_qemu(dir: &Path, secs: f32) -> PathBuf {
    let p = dir.join(format!("fake-qemu-{secs}"));
    std::fs::write(&p, format!("#!/bin/sh\nexec sleep {secs}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Concurrent `run`s on fresh state directories, hundreds of rounds: exactly one wins each round, the others
/// exit 4, and the winner's files (lock, boot script) are intact after every loser is gone.
#[test]
fn concurrent_runs_on_a_fresh_state_dir_have_one_winner() {
    let tmp = tempfile::tempdir().unwrap();
    let qemu = fake_qemu(tmp.path(), 3.0);
    let rounds = 200;
    let per_round = 3;
    let batch = 20;
    for first in (0..rounds).step_by(batch) {
        let mut procs = Vec::new();
        for round in first..first + batch {
            let state = tmp.path().join(format!("r{round}/deeper/state"));
            for _ in 0..per_round {
                let child = Command::new(BIN)
                    .args(["-q", "run", "--state-dir"])
                    .arg(&state)
                    .args(["--accel", "tcg", "--no-disk", "--qemu"])
                    .arg(&qemu)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                procs.push((round, state.clone(), child));
            }
        }
        let mut winners = std::collections::HashMap::new();
        for (round, state, child) in procs {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            match out.status.code() {
                Some(0) => *winners.entry(round).or_insert(0) += 1,
                Some(4) => {
                    assert!(err.contains("is in use by another ec-ipxe-qemu run"), "round {round}: {err}");
                    assert!(state.join("lock").exists(), "round {round}: a loser removed the winner's lock");
                    assert!(
                        state.join("tftp/boot.ipxe").exists(),
                        "round {round}: a loser removed the winner's script"
                    );
                }
                other => panic!("round {round}: exit {other:?}: {err}"),
            }
        }
        for round in first..first + batch {
            assert_eq!(winners.get(&round), Some(&1), "round {round}: exactly one winner");
            let state = tmp.path().join(format!("r{round}/deeper/state"));
            assert!(state.join("tftp/boot.ipxe").exists(), "round {round}: the winner's script");
        }
    }
}

/// Seconds since midnight (UTC) of a tracing timestamp such as `2026-11-25T12:03:22.763954Z` at the start of
/// `line`.
fn log_time_of_day(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
    let mut p = t.split(':');
    let (h, m, s): (f64, f64, f64) = (p.next()?.parse().ok()?, p.next()?.parse().ok()?, p.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// `--accel kvm` on a host whose KVM fails (nested virtualisation): QEMU either stops the guest with
/// `internal-error` ("KVM internal error ... emulation failure") or aborts in KVM setup ("failed to set MSR");
/// either way the launcher ends the run with exit 1 within 2 s, saying what to do. Needs /dev/kvm; SKIP
/// otherwise (a failure under CI=true).
#[test]
fn kvm_failure_ends_the_run_within_2s() {
    let t = "kvm_failure_ends_the_run_within_2s";
    if !Path::new("/dev/kvm").exists() {
        common::skip_or_fail(t, "needs /dev/kvm");
        return;
    }
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let log = state.with_extension("stderr");
    let mut child = Command::new(BIN)
        .args(["run", "--state-dir"])
        .arg(&state)
        .args(["--accel", "kvm", "--memory", "256", "--no-disk"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = wait_for(BOOT_TIMEOUT, || child.try_wait().ok().flatten());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        if serial(&state.join("serial.log")).contains(OK_LINE) {
            common::skip_or_fail(t, "KVM works on this host (no failure to detect)");
            return;
        }
        panic!("the launcher did not end the run\n{err}");
    };
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("the KVM accelerator failed; try --accel tcg"), "{err}");
    // When the guest failed: QMP's event time, or the time the launcher logged QEMU's last words.
    let failed_at = err
        .lines()
        .find_map(|l| l.split("guest failure reported by QEMU at ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|at| now - at)
        .or_else(|| {
            let line = err.lines().find(|l| l.contains("QEMU: ") && l.to_ascii_lowercase().contains("kvm"))?;
            let mut d = (now % 86400.0) - log_time_of_day(line)?;
            if d < 0.0 {
                d += 86400.0;
            }
            Some(d)
        })
        .unwrap_or_else(|| panic!("no failure time in the log:\n{err}"));
    eprintln!("FIGURE KVM failure to launcher exit: {failed_at:.3} s (exit polled every 50 ms)");
    assert!(failed_at <= 2.0, "took {failed_at:.3} s\n{err}");
    assert!(no_qemu_left(&state));
}

/// A QMP client of the test's own on the operators' `qmp.sock`.
fn operator_qmp(state: &Path) -> (std::io::BufReader<std::os::unix::net::UnixStream>, std::os::unix::net::UnixStream) {
    use std::io::BufRead;
    let s = std::os::unix::net::UnixStream::connect(state.join("qmp.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"QMP\""), "{line}");
    (r, w)
}

fn operator_command(
    qmp: &mut (std::io::BufReader<std::os::unix::net::UnixStream>, std::os::unix::net::UnixStream),
    cmd: &str,
) {
    use std::io::{BufRead, Write};
    writeln!(qmp.1, "{{\"execute\": \"{cmd}\"}}").unwrap();
    loop {
        let mut line = String::new();
        qmp.0.read_line(&mut line).unwrap();
        if line.contains("\"return\"") || line.contains("\"error\"") || line.is_empty() {
            break;
        }
    }
}

/// A STOP the launcher did not ask for (an operator's `stop` on qmp.sock): the run ends with exit 1 within
/// 2 s and says why; the launcher's own QMP connection is independent of the operator's.
#[test]
fn a_stop_the_launcher_did_not_ask_for_ends_the_run() {
    let t = "a_stop_the_launcher_did_not_ask_for_ends_the_run";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk"]);
    run.wait_started();
    let mut qmp = operator_qmp(&state);
    operator_command(&mut qmp, "qmp_capabilities");
    let stopped = Instant::now();
    operator_command(&mut qmp, "stop");
    let status = run.wait(Duration::from_secs(10));
    let took = stopped.elapsed();
    assert_exit(status, 1, &run);
    eprintln!("FIGURE unrequested STOP to launcher exit: {took:?}");
    assert!(took <= Duration::from_secs(2), "took {took:?}\n{}", run.stderr());
    assert!(run.stderr().contains("the guest stopped running: the guest was paused"), "{}", run.stderr());
    assert!(no_qemu_left(&state));
}

/// An operator holding `qmp.sock` (QEMU serves one client at a time there) does not get in the way of a stop:
/// SIGTERM gives powerdown, then quit after the timeout through the launcher's own connection, exit 0, no
/// SIGKILL.
#[test]
fn stop_works_while_an_operator_holds_qmp_sock() {
    let t = "stop_works_while_an_operator_holds_qmp_sock";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--shutdown-timeout", "1"]);
    run.wait_started();
    let mut qmp = operator_qmp(&state);
    operator_command(&mut qmp, "qmp_capabilities");
    let asked = Instant::now();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let status = run.wait(Duration::from_secs(30));
    let took = asked.elapsed();
    assert_exit(status, 0, &run);
    let log = run.stderr();
    assert!(took < Duration::from_secs(1 + 4), "took {took:?}\n{log}");
    assert!(log.contains("QEMU quit (exit status 0)"), "{log}");
    assert!(!log.contains("SIGKILL"), "{log}");
    drop(qmp);
    assert!(no_qemu_left(&state));
}

/// QEMU runs under its seccomp sandbox (-sandbox on,...): the kernel reports filter mode for its process.
#[test]
fn qemu_runs_sandboxed() {
    let t = "qemu_runs_sandboxed";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--shutdown-timeout", "0"]);
    run.wait_started();
    let pids = qemu_pids(&state);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "QEMU is not in seccomp filter mode:\n{status}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
        "{cmdline}"
    );
    run.signal(nix::sys::signal::Signal::SIGTERM);
    assert_exit(run.wait(Duration::from_secs(15)), 0, &run);
}

/// The guest's TFTP sees only the boot script: the ROM loads boot.ipxe from there, but the lock file (and the
/// rest of the state dir) is not found.
#[test]
fn tftp_serves_only_the_boot_script() {
    let t = "tftp_serves_only_the_boot_script";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--boot-url", "tftp://10.0.2.2/lock"]);
    let s = run.wait_serial("could not boot from tftp://10.0.2.2/lock", BOOT_TIMEOUT);
    assert!(s.contains("tftp://10.0.2.2/boot.ipxe"), "the ROM loaded the script over TFTP:\n{s}");
    let names: Vec<String> = std::fs::read_dir(state.join("tftp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["boot.ipxe"]);
    assert!(state.join("lock").exists() && state.join("serial.log").exists());
    // iPXE names the failure: no such file (2d12603b... is ENOENT), not an image it could not run.
    let fetch = s.lines().filter(|l| l.contains("tftp://10.0.2.2/lock")).collect::<Vec<_>>().join("\n");
    assert!(!s.contains("Exec format error"), "the guest got the lock file:\n{s}");
    assert!(s.contains("No such file") || s.contains("2d12603b") || s.contains("Not found"), "{fetch}\n---\n{s}");
}

/// Bad input that only QEMU or the kernel detects: a port already in use for `--host-forward` (exit 4), an
/// argument QEMU rejects (exit 2, QEMU's own message). Either way nothing is left behind and no QEMU runs.
#[test]
fn bad_input_found_at_start_leaves_nothing() {
    let t = "bad_input_found_at_start_leaves_nothing";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("new/state");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let fwd = format!("tcp:127.0.0.1:{port}-:22");
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["--host-forward", &fwd], 4, "already in use"),
        (vec!["--", "-foo"], 2, "-foo: invalid option"),
        (vec!["--boot-nic-model", "virtio"], 2, "virtio"),
    ];
    for (args, code, needle) in cases {
        let out = Command::new(BIN)
            .args(["run", "--state-dir"])
            .arg(&state)
            .args(["--accel", "tcg", "--memory", "256M", "--no-disk"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        let last = err.lines().last().unwrap_or("");
        assert!(last.starts_with("ec-ipxe-qemu: "), "{args:?}: one line at the end: {err}");
        assert!(last.contains(needle), "{args:?}: {last}");
        if code == 2 {
            assert!(last.contains("QEMU rejected its command line"), "{last}");
        }
        assert!(!tmp.path().join("new").exists(), "{args:?}: the directories this run made are gone");
        assert!(qemu_pids(tmp.path()).is_empty(), "{args:?}: no QEMU");
    }
}

/// Sizes take units (`--memory 2G`), and `--help` states the ranges.
#[test]
fn memory_takes_units_and_help_states_ranges() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let argv = |mem: &str| {
        let out = Command::new(BIN)
            .args(["print-args", "--state-dir"])
            .arg(&state)
            .args(["--accel", "tcg", "--no-disk", "--qemu", "/bin/true", "--memory", mem])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = argv("2G");
    assert_eq!(code, Some(0), "{err}");
    let v: Vec<String> = serde_json::from_str(&out).unwrap();
    let m = v.iter().position(|a| a == "-m").unwrap();
    assert_eq!(v[m + 1], "2048");
    let (code, _, err) = argv("2X");
    assert_eq!(code, Some(2));
    assert!(err.contains("--memory") && err.contains("64M to 1T"), "{err}");
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for range in ["64M to 1T", "1 to 255", "1M to 64T", "1 to 16", "0 to 3600"] {
        assert!(help.contains(range), "--help must state {range:?}:\n{help}");
    }
    assert!(!state.exists());
}

/// `print-args` into a closed pipe (`print-args | head -c1`): no panic, exit 0.
#[test]
fn print_args_to_a_closed_stdout_does_not_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let out = Command::new(BIN)
        .args(["print-args", "--state-dir"])
        .arg(tmp.path().join("s"))
        .args(["--accel", "tcg", "--no-disk", "--qemu", "/bin/true"])
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
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
    let other = g._tmp.path().join("other-state");
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
    let held = wait_for(Duration::from_secs(5), || {
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
    let batch = g._tmp.path().join("flood.batch");
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
    let status = run.wait(Duration::from_secs(10));
    assert_exit(status, 1, &run);
    assert!(deleted.elapsed() <= Duration::from_secs(2), "took {:?}\n{}", deleted.elapsed(), run.stderr());
    assert!(run.stderr().contains(&format!("LAN macvtap \"{}\"", g.name)), "{}", run.stderr());
    assert!(run.stderr().contains("disappeared"), "{}", run.stderr());
    assert!(no_qemu_left(&g.state));
}
