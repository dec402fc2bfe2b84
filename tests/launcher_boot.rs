//! End-to-end boot paths of `ec-ipxe-qemu run`: a real QEMU under TCG with real iPXE (Debian's `ipxe-qemu`
//! option ROMs and `ipxe.lkrn`): user-mode chains, `--boot-dir`, the diagnostics, the TFTP root and the sandbox.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::http::Http;
use common::launcher::{BOOT_TIMEOUT, LKRN, OK_LINE, Run, Slot, assert_exit, no_qemu_left, qemu_pids, require_qemu};
use common::{require_programs, unique};

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
