//! The README's hand-written unit under a real systemd 252 as PID 1 of private namespaces (the harness of
//! `tests/systemd_lab`): the launcher and QEMU run unprivileged and the guest leases on the lab LAN; and the
//! unit passes `systemd-analyze verify`, hardened about as well as the module's.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;
mod systemd_lab;

use std::process::Command;
use std::time::Instant;

use common::{require_programs, require_root, run};
use systemd_lab::*;

/// The README's unit: start (launcher and QEMU unprivileged, the guest leases on the LAN), stop, nothing left.
#[test]
#[ignore = "needs root"]
fn readme_unit_under_real_systemd() {
    let test = "readme_unit_under_real_systemd";
    require_root(test);
    if !requirements(test) {
        return;
    }
    let _one = ONE_QEMU_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = SystemdLab::start("public", |uplink| Some(readme_unit(uplink))) else { return };
    let before = lab.acks();
    let t0 = Instant::now();
    lab.must(&["start", UNIT]);
    let lease = lab.wait_lease(before, t0, "README unit start");
    figure("README unit: start → lease", secs(lease));
    lab.check_unprivileged("README unit");
    assert!(lab.link().is_some(), "README unit: no macvtap");
    let t0 = Instant::now();
    lab.must(&["stop", UNIT]);
    figure("README unit: systemctl stop", secs(t0.elapsed()));
    lab.check_clean("README unit after stop", None);
}

/// The README's unit passes `systemd-analyze verify` and is hardened about as well as the module's.
#[test]
fn readme_unit_passes_systemd_analyze() {
    let test = "readme_unit_passes_systemd_analyze";
    if !require_programs(test, &["systemd-analyze"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join(UNIT);
    let text = readme_unit_text().replace("/usr/bin/ec-macvtap", MACVTAP).replace("/usr/bin/ec-ipxe-qemu", LAUNCHER);
    std::fs::write(&unit, text).unwrap();
    let out = run(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    let out = run(Command::new("systemd-analyze").args(["security", "--offline=yes", "--no-pager"]).arg(&unit));
    let said = String::from_utf8_lossy(&out.stdout);
    let score: f64 = said
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {said}{}", String::from_utf8_lossy(&out.stderr)));
    figure("README unit: systemd-analyze security exposure", format!("{score}"));
    assert!(score <= 3.0, "the README unit's exposure {score} is above the module's 3.0:\n{said}");
}
