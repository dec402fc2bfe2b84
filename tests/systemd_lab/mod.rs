//! The harness of the systemd tests: a real systemd 252 as PID 1 of private namespaces
//! (`tests/systemd/pid1.sh`), the unit the NixOS module renders, the README's unit, and the whole exercise
//! (start, stop, kill -9 of QEMU, restarts) with its figures.
#![allow(dead_code)]

mod lab;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::{Lab, require_programs, require_root, run, skip_or_fail, wait_for};

pub use lab::SystemdLab;

pub const LAUNCHER: &str = env!("CARGO_BIN_EXE_ec-ipxe-qemu");
pub const MACVTAP: &str = env!("CARGO_BIN_EXE_ec-macvtap");
pub const UNIT: &str = "every-channel-ipxe-qemu.service";
pub const SERVICE_USER: &str = "every-channel-ipxe-qemu";
pub const LINK: &str = "ec-lan0";
pub const BIN_DIR: &str = "/run/ec-lab/bin";
/// Where pid1.sh puts the lab's boot directory (a copy of WORK/www), for `boot.http`.
pub const WWW_DIR: &str = "/run/ec-lab/www";
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(120);
/// The module's default state directory (the lab unit keeps it).
pub const STATE_DIR: &str = "/var/lib/every-channel/ipxe-qemu";

pub static ONE_QEMU_AT_A_TIME: Mutex<()> = Mutex::new(());

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Programs the harness needs; under CI=true a missing one fails.
pub fn requirements(test: &str) -> bool {
    require_programs(
        test,
        &[
            "/lib/systemd/systemd",
            "systemctl",
            "nsenter",
            "unshare",
            "setsid",
            "dnsmasq",
            "qemu-system-x86_64",
            "qemu-img",
            "nix-instantiate",
            "/usr/lib/ipxe/ipxe.lkrn",
        ],
    )
}

/// The unit the NixOS module renders for the lab, by the real NixOS code in the kit
/// (`scripts/find-nixos-kit.sh`), with the store paths of the binaries, QEMU and iPXE replaced by real ones
/// and the lab's network namespace added. None (a skip, or a failure under CI=true) without the kit.
pub fn module_unit(test: &str, uplink: &str) -> Option<String> {
    module_unit_full(test, uplink, None, "{}")
}

/// The same with the module's `boot.http` serving `boot_dir` (a path inside the lab, e.g. [`WWW_DIR`]).
pub fn module_unit_booting(test: &str, uplink: &str, boot_dir: Option<&str>) -> Option<String> {
    module_unit_full(test, uplink, boot_dir, "{}")
}

/// [`module_unit`] with more module settings (`extra`: JSON merged over the lab's
/// `services.every-channel.ipxe-qemu`).
pub fn module_unit_with(test: &str, uplink: &str, extra: &str) -> Option<String> {
    module_unit_full(test, uplink, None, extra)
}

fn module_unit_full(test: &str, uplink: &str, boot_dir: Option<&str>, extra: &str) -> Option<String> {
    let out = run(&mut Command::new(repo().join("scripts/find-nixos-kit.sh")));
    if !out.status.success() {
        skip_or_fail(test, String::from_utf8_lossy(&out.stderr).trim());
        return None;
    }
    let kit = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // Rendered for the lab's own systemd, so the unit holds only keys it knows (RestartSteps= needs 254).
    let version = run(Command::new("/lib/systemd/systemd").arg("--version"));
    let version = String::from_utf8_lossy(&version.stdout);
    let version = version.split_whitespace().nth(1).filter(|v| v.chars().all(|c| c.is_ascii_digit()));
    let version = version.expect("`/lib/systemd/systemd --version` prints \"systemd N (...)\"").to_owned();
    let out = run(Command::new("nix-instantiate")
        .env("NIX_REMOTE", "")
        .args(["--store", "dummy://", "--eval", "--strict", "--json", "--arg", "nixpkgs", &kit])
        .args(["--argstr", "interface", uplink, "--argstr", "systemdVersion", &version, "--argstr", "extra", extra])
        .args(boot_dir.map(|d| ["--argstr", "bootDir", d]).into_iter().flatten())
        .arg(repo().join("nix/tests/lab-unit.nix")));
    assert!(out.status.success(), "rendering the unit failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let store = |k: &str| v["store"][k].as_str().unwrap().to_owned();
    let text = v["text"]
        .as_str()
        .unwrap()
        .replace(&format!("{}/bin/", store("ec-ipxe-qemu")), &format!("{BIN_DIR}/"))
        .replace(&format!("{}/bin/", store("qemu")), "/usr/bin/")
        .replace(&format!("{}/", store("ipxe")), "/usr/lib/ipxe/");
    for line in text.lines() {
        let exec = line.split_once('=').is_some_and(|(k, v)| k.starts_with("Exec") && v.contains("/nix/store/"));
        assert!(!exec, "a /nix/store executable is left in the lab unit: {line}");
    }
    Some(with_lab_netns(&text))
}

/// The documented hand-written unit (the ```ini block of "The unit" in docs/systemd.md), adapted to the lab:
/// the built binaries, the lab's uplink and network namespace, TCG and a small guest.
pub fn readme_unit_text() -> String {
    let doc = std::fs::read_to_string(repo().join("docs/systemd.md")).unwrap();
    let start = doc.find("\n## The unit\n").expect("docs/systemd.md has a section \"The unit\"");
    let block = &doc[start..];
    let body = block.split("```ini\n").nth(1).expect("an ```ini block in docs/systemd.md's section \"The unit\"");
    body.split("\n```").next().unwrap().to_owned()
}

pub fn readme_unit(uplink: &str) -> String {
    let text = readme_unit_text()
        .replace("/usr/bin/ec-macvtap", &format!("{BIN_DIR}/ec-macvtap"))
        .replace("/usr/bin/ec-ipxe-qemu", &format!("{BIN_DIR}/ec-ipxe-qemu"))
        .replace("eno1", uplink)
        .replace("--memory 2048 --cpus 2", "--memory 256 --cpus 1 --accel tcg")
        // The lab has no boot server: the built-in diagnostics boot, which also leases on the LAN NIC.
        .replace("--boot-url http://boot.example.org/publisher/netboot.ipxe ", "");
    assert!(
        text.contains("--accel tcg") && !text.contains("--boot-url"),
        "the README unit's ExecStart changed; adapt readme_unit()"
    );
    with_lab_netns(&text)
}

pub fn with_lab_netns(text: &str) -> String {
    assert!(text.contains("[Service]\n"));
    text.replacen("[Service]\n", "[Service]\nNetworkNamespacePath=/run/netns/lab-host\n", 1)
}

/// A free id in /etc/passwd and /etc/group (the service user is added to copies of them inside the lab).
pub fn free_id(files: &[&str]) -> u32 {
    let used: Vec<u32> = files
        .iter()
        .flat_map(|f| std::fs::read_to_string(f).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|l| l.split(':').nth(2).and_then(|n| n.parse().ok()))
        .collect();
    (61000..62000).find(|n| !used.contains(n)).unwrap()
}

pub fn group_id(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .and_then(|l| l.split(':').nth(2)?.parse().ok())
}

pub fn figure(name: &str, value: String) {
    let line = format!("systemd lab: {name}: {value}");
    eprintln!("{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("systemd-figures.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// A process of the unit, as seen from inside the lab.
#[derive(Debug)]
pub struct Proc {
    pub pid: u32,
    pub comm: String,
    pub status: String,
}

impl Proc {
    pub fn field(&self, name: &str) -> String {
        self.status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Raise the lab netns's next ifindex to a random few hundred, so the macvtap's /dev/tapN is not one that
/// another namespace's link (other tests run concurrently) already holds.
pub fn bump_ifindex(lab: &Lab) {
    let n = 100 + (std::process::id() as u64 * 7919 + Instant::now().elapsed().as_nanos() as u64) % 400;
    let mut batch = String::new();
    for i in 0..n {
        batch.push_str(&format!("link add bmp{i} type veth peer name bmq{i}\n"));
    }
    for i in 0..n {
        batch.push_str(&format!("link del bmp{i}\n"));
    }
    let path = std::env::temp_dir().join(format!("ec-bump-{}-{}", std::process::id(), lab.host.name));
    std::fs::write(&path, batch).unwrap();
    let out = run(Command::new("ip").args(["-n", &lab.host.name, "-batch"]).arg(&path));
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "bump ifindex: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// start, stop, start, kill -9 of QEMU, three restarts, stop: with the module's unit.
pub fn exercise(test: &str, dev: &'static str) {
    require_root(test);
    if !requirements(test) {
        return;
    }
    let _one = ONE_QEMU_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = SystemdLab::start(dev, |uplink| module_unit(test, uplink)) else { return };

    // start → READY: the unit is Type=notify, so `systemctl start` returns only once the guest's console showed
    // its ready line; the LAN lease (which the diagnostics take before that line) is already there.
    let before = lab.acks();
    let t0 = Instant::now();
    lab.must(&["start", UNIT]);
    let start_returned = t0.elapsed();
    assert!(lab.acks() > before, "systemctl start returned before the guest leased on the LAN\n{}", lab.journal());
    let serial = lab.serial();
    assert!(
        serial.contains("ec-ipxe-qemu: boot path OK"),
        "systemctl start returned before the ready line was on the console:\n{serial}\n{}",
        lab.journal()
    );
    assert_eq!(lab.show("ActiveState"), "active");
    let status_text = lab.show("StatusText");
    assert!(status_text.starts_with("ready: the guest is up"), "StatusText: {status_text:?}");
    let lease = lab.wait_lease(before, t0, "start");
    figure(&format!("{dev} /dev: systemctl start returned (start → READY=1)"), secs(start_returned));
    figure(&format!("{dev} /dev: start → lease"), secs(lease));
    figure(&format!("{dev} /dev: StatusText after start"), status_text.clone());
    // `status` shows the lease the lab's dnsmasq handed out.
    let (code, json) = lab.status(&["--json"]);
    assert_eq!(code, Some(0), "status --json: {json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let leased = std::fs::read_to_string(&lab.lab.dhcp_log).unwrap_or_default();
    let leased = leased.lines().rfind(|l| l.contains("DHCPACK(")).unwrap_or_default().to_owned();
    let address = v["lan_address"].as_str().unwrap_or_else(|| panic!("no lan_address: {json}"));
    assert!(leased.contains(address), "status says {address}, dnsmasq: {leased}");
    assert_eq!(
        (v["stage"].as_str(), v["ready"].as_bool(), v["running"].as_bool()),
        (Some("ready"), Some(true), Some(true))
    );
    assert_eq!(v["lan_interface"], LINK, "{json}");
    if dev == "public" {
        let (_, human) = lab.status(&[]);
        let journal = run(lab.nsenter().args(["journalctl", "--no-pager", "-o", "short-precise", "-u", UNIT]));
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("systemd-example.txt");
        let _ = std::fs::write(
            &path,
            format!(
                "$ systemctl show -p StatusText {UNIT}\nStatusText={status_text}\n\n$ ec-ipxe-qemu status --state-dir \
                 {STATE_DIR}\n{human}\n$ journalctl -u {UNIT}\n{}",
                String::from_utf8_lossy(&journal.stdout)
            ),
        );
    }
    lab.check_unprivileged("after start");
    lab.check_priorities("after start", &[("6", "QEMU started")]);
    let link = lab.link().expect("the macvtap exists while the unit runs");
    assert_eq!(link["ifalias"].as_str(), Some("ec-macvtap:v1"), "the link carries our marker: {link}");
    let node = lab.tap_node();
    if dev == "public" {
        let ifindex = link["ifindex"].as_u64().unwrap();
        assert_eq!(node.0, PathBuf::from(format!("/dev/tap{ifindex}")), "the public node is used");
    } else {
        assert!(!node.0.starts_with("/dev/tap"), "the container /dev has no /dev/tapN: {}", node.0.display());
    }

    // stop after ready → powerdown, quit after --shutdown-timeout (30 s: the diagnostics' iPXE ignores ACPI)
    let t0 = Instant::now();
    lab.must(&["stop", UNIT]);
    figure(&format!("{dev} /dev: systemctl stop after ready"), secs(t0.elapsed()));
    lab.check_clean("after stop", Some(&node));
    let (code, _) = lab.status(&["--json"]);
    assert_eq!(code, Some(3), "status after the stop: no launcher holds the state directory");

    // stop before ready → QEMU is quit at once
    lab.must(&["start", "--no-block", UNIT]);
    let booting = wait_for(Duration::from_secs(60), || {
        let t = lab.show("StatusText");
        (t.starts_with("firmware:") || t.starts_with("ipxe:")).then_some(t)
    });
    assert!(
        booting.is_some(),
        "the guest never showed an early stage: {:?}\n{}",
        lab.show("StatusText"),
        lab.journal()
    );
    assert_eq!(lab.show("ActiveState"), "activating", "not ready yet, so not active yet");
    let t0 = Instant::now();
    lab.must(&["stop", UNIT]);
    let took = t0.elapsed();
    figure(&format!("{dev} /dev: systemctl stop before ready ({})", booting.unwrap_or_default()), secs(took));
    assert!(took < Duration::from_secs(10), "a stop before ready took {took:?}\n{}", lab.journal());
    lab.check_clean("after a stop before ready", None);

    // kill -9 of QEMU → Restart= → new lease
    let before = lab.acks();
    let t0 = Instant::now();
    lab.must(&["start", UNIT]);
    lab.wait_lease(before, t0, "second start");
    assert!(lab.serial().contains("ec-ipxe-qemu: boot path OK"), "second start returned before ready");
    let qemu = lab.qemus().pop().expect("a QEMU runs");
    let restarts = lab.show("NRestarts").parse::<u32>().unwrap_or(0);
    let before = lab.acks();
    let t0 = Instant::now();
    let out = run(lab.nsenter().args(["kill", "-9", &qemu.pid.to_string()]));
    assert!(out.status.success(), "kill -9 QEMU: {}", String::from_utf8_lossy(&out.stderr));
    let relased = lab.wait_lease(before, t0, "after kill -9 of QEMU");
    figure(&format!("{dev} /dev: kill -9 of QEMU → new lease"), secs(relased));
    assert!(lab.show("NRestarts").parse::<u32>().unwrap_or(0) > restarts, "Restart= did not restart the unit");
    // The run that lost its QEMU ended with an error line, filed as an error.
    lab.check_priorities("after kill -9 of QEMU", &[("3", "ec-ipxe-qemu: ")]);
    assert_eq!(lab.macvtaps(), 1, "exactly one macvtap after the restart");
    lab.check_unprivileged("after the kill -9 restart");

    // three restarts, each clean
    for i in 1..=3 {
        let main = lab.show("MainPID");
        let before = lab.acks();
        let t0 = Instant::now();
        lab.must(&["restart", UNIT]);
        let took = lab.wait_lease(before, t0, &format!("restart {i}"));
        figure(&format!("{dev} /dev: systemctl restart {i} → lease"), secs(took));
        assert_ne!(lab.show("MainPID"), main, "restart {i}: the same launcher is still running");
        assert_eq!(lab.macvtaps(), 1, "restart {i}: not exactly one macvtap");
        assert_eq!(lab.all_qemus(), 1, "restart {i}: not exactly one QEMU");
        lab.check_unprivileged(&format!("restart {i}"));
    }
    let node = lab.tap_node();
    lab.must(&["stop", UNIT]);
    lab.check_clean("after the final stop", Some(&node));
    assert_eq!(lab.show("Result"), "success", "the last run did not end cleanly\n{}", lab.journal());
}
