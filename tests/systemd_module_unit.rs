//! The unit in its real habitat: a real systemd 252 as PID 1 of private namespaces (`tests/systemd/pid1.sh`,
//! after `../shared/systemd-lab.md`) runs the unit that the NixOS module renders with the real NixOS code
//! (`nix/tests/lab-unit.nix`), on a lab LAN (veth, real dnsmasq), with a real QEMU (TCG) and real iPXE. Only
//! the binaries, QEMU, iPXE and the lab's network namespace (`NetworkNamespacePath=`) are substituted.
//!
//! Each run: `systemctl start` → launcher and QEMU run as the static user with no capabilities and the guest
//! leases on the lab LAN through the macvtap; `systemctl stop` → no link, node or QEMU left; kill -9 of QEMU
//! → `Restart=` brings a new lease; three `systemctl restart`s are clean. Once with the machine's `/dev`
//! (public `/dev/tapN`), once with a container-like `/dev` without `/dev/tapN` (private node path). The
//! README's hand-written unit runs through the same harness. Figures (start → lease, stop, kill → new lease)
//! are printed and appended to `$CARGO_TARGET_TMPDIR/systemd-figures.txt`.
//!
//! One QEMU at a time: the tests take a lock. Everything (systemd, its cgroups, the namespaces, dnsmasq) is
//! removed by drop guards, also when a check fails.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

mod systemd_lab;

use systemd_lab::exercise;

#[test]
#[ignore = "needs root"]
fn module_unit_under_real_systemd() {
    exercise("module_unit_under_real_systemd", "public");
}

#[test]
#[ignore = "needs root"]
fn module_unit_under_real_systemd_without_dev_tap() {
    exercise("module_unit_under_real_systemd_without_dev_tap", "container");
}
