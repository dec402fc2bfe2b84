//! The module's unit running the real Linux publisher guest (scripts/build-test-guest.sh, served through the
//! module's `boot.http`, booted with NixOS's `loglevel=4`) under a real systemd as PID 1 of private namespaces
//! (see tests/systemd_lab), on the lab LAN with dnsmasq and the tuner emulator:
//!
//! - `systemctl start` returns at ready (`Type=notify`): the guest's ready line is on the console, its LAN
//!   address in `status` is dnsmasq's lease, it found the emulator's tuner;
//! - `systemctl stop` powers the guest off through the ACPI power button (the guest's own power-off, not the
//!   launcher's timeout), and nothing is left;
//! - kill -9 of QEMU: `Restart=` starts the unit again and the guest is ready again.
//!
//! Figures (start → ready, stop, kill → ready again) are printed and appended to
//! `$CARGO_TARGET_TMPDIR/systemd-figures.txt`.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

mod systemd_lab;

use std::time::{Duration, Instant};

use common::guest::{TUNER_ADDR, TUNER_ID, require_test_guest, start_tuner, write_boot_dir};
use common::{require_programs, require_root, run, wait_for};
use systemd_lab::{ONE_QEMU_AT_A_TIME, SystemdLab, UNIT, WWW_DIR, figure, module_unit_booting, requirements, secs};

/// How long the unit may take to be active again after QEMU was killed (RestartSec= plus a TCG boot).
const READY_AGAIN: Duration = Duration::from_secs(400);

#[test]
#[ignore = "needs root"]
fn module_unit_runs_the_real_guest() {
    let t = "module_unit_runs_the_real_guest";
    require_root(t);
    if !requirements(t) || !require_programs(t, &["python3"]) {
        return;
    }
    let Some(guest) = require_test_guest(t) else { return };
    let _one = ONE_QEMU_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    write_boot_dir(&www, &guest, "loglevel=4", None);
    let Some(lab) =
        SystemdLab::start_serving("public", Some(&www), |uplink| module_unit_booting(t, uplink, Some(WWW_DIR)))
    else {
        return;
    };
    let _tuner = start_tuner(&lab.lab, tmp.path());

    // start → returns at ready.
    let t0 = Instant::now();
    lab.must(&["start", UNIT]);
    let started = t0.elapsed();
    let serial = lab.serial();
    assert!(
        serial.contains("ec-publisher: ready"),
        "start returned before the ready line:\n{serial}\n{}",
        lab.journal()
    );
    assert_eq!(lab.show("ActiveState"), "active");
    let status_text = lab.show("StatusText");
    assert!(status_text.starts_with("ready: the guest is up (LAN address 192.168.77."), "{status_text:?}");
    let found = format!("ec-publisher: tuner discovery: FOUND hdhomerun device {TUNER_ID} found at {TUNER_ADDR}");
    assert!(serial.contains(&found), "the guest did not find the tuner:\n{serial}");
    let (code, json) = lab.status(&["--json"]);
    assert_eq!(code, Some(0), "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let address = v["lan_address"].as_str().unwrap_or_else(|| panic!("no lan_address: {json}")).to_owned();
    let leases = std::fs::read_to_string(&lab.lab.leases).unwrap_or_default();
    assert!(leases.split_whitespace().any(|w| w == address), "status says {address}; leases:\n{leases}");
    let journal = lab.journal();
    assert!(journal.contains("boot stage kernel"), "no kernel stage at loglevel=4:\n{journal}");
    figure("real guest: systemctl start returned (start → ready)", secs(started));
    lab.check_unprivileged("real guest after start");

    // stop → the guest powers itself off.
    let t0 = Instant::now();
    lab.must(&["stop", UNIT]);
    let stopped = t0.elapsed();
    figure("real guest: systemctl stop (ACPI power-off)", secs(stopped));
    let journal = run(lab.nsenter().args(["journalctl", "--no-pager", "-u", UNIT]));
    let journal = String::from_utf8_lossy(&journal.stdout);
    assert!(journal.contains("the guest powered off"), "not the guest's own power-off:\n{journal}");
    assert!(lab.serial().contains("ec-guest: power button: powering off"), "{}", lab.serial());
    lab.check_clean("real guest after stop", None);
    assert_eq!(lab.show("Result"), "success", "{journal}");

    // kill -9 of QEMU → Restart= → ready again.
    lab.must(&["start", UNIT]);
    let qemu = lab.qemus().pop().expect("a QEMU runs");
    let restarts = lab.show("NRestarts").parse::<u32>().unwrap_or(0);
    let t0 = Instant::now();
    let out = run(lab.nsenter().args(["kill", "-9", &qemu.pid.to_string()]));
    assert!(out.status.success(), "kill -9 QEMU: {}", String::from_utf8_lossy(&out.stderr));
    let again = wait_for(READY_AGAIN, || {
        let restarted = lab.show("NRestarts").parse::<u32>().unwrap_or(0) > restarts;
        (restarted && lab.show("ActiveState") == "active" && lab.show("StatusText").starts_with("ready:"))
            .then(|| t0.elapsed())
    });
    let Some(again) = again else {
        panic!("not ready again after kill -9 of QEMU: {:?}\n{}", lab.show("StatusText"), lab.journal())
    };
    figure("real guest: kill -9 of QEMU → ready again", secs(again));
    assert!(lab.serial().contains("ec-publisher: ready"), "{}", lab.serial());
    assert_eq!(lab.qemus().len(), 1, "exactly one QEMU after the restart");
    lab.must(&["stop", UNIT]);
    lab.check_clean("real guest after the final stop", None);
}
