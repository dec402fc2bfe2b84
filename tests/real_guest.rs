//! The guest the launcher exists for: a real Linux publisher guest (Debian's cloud kernel and a busybox
//! initramfs running the NixOS module's own discovery and ready scripts, built by scripts/build-test-guest.sh)
//! served by `--boot-dir`, under TCG, in the lab with dnsmasq, the tuner emulator and a macvtap made by
//! ec-macvtap.
//!
//! At the default log level, at `loglevel=4` (what NixOS boots with) and at `quiet`: the stages up to ready
//! with `kernel` reported before the guest's init runs, the LAN address the guest reports equal to dnsmasq's
//! lease, and the emulator's tuner found from inside the guest. Then the ways a run ends (a graceful ACPI
//! power-off, QEMU killed), an 80-column guest line before an anchored ready pattern, and a 64 MiB initrd with
//! download progress in `status`. Figures are printed (`FIGURE ...`), never asserted on.
//!
//! One QEMU at a time (the guest boots a whole kernel under TCG).
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::guest::{GuestLab, TUNER_ADDR, TUNER_ID, stage_at, stages};
use common::launcher::{Run, assert_exit, no_qemu_left, qemu_pids};

/// How long a boot to ready may take under TCG on a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(400);

/// One real guest at a time in this binary.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn one_guest() -> std::sync::MutexGuard<'static, ()> {
    ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest's console lines the launcher logged (`guest: LINE`), as logged.
fn guest_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter_map(|l| l.split_once(" guest: ").map(|(_, g)| g)).collect()
}

/// The stderr line index of the first line containing `needle`.
fn line_of(stderr: &str, needle: &str) -> Option<usize> {
    stderr.lines().position(|l| l.contains(needle))
}

/// Seconds of the day of a log line's RFC 3339 timestamp (`2026-01-02T03:04:05.123456Z ...`).
fn timestamp(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?.split_once('T')?.1.strip_suffix('Z')?;
    let mut f = t.split(':');
    let (h, m, s): (f64, f64, f64) = (f.next()?.parse().ok()?, f.next()?.parse().ok()?, f.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Boot the guest with `cmdline` to ready and check what every log level must give: the stages in order with
/// `kernel` before the guest's init ran, the LAN address equal to dnsmasq's lease, the NICs named by slot, the
/// emulator's tuner found. Prints the stage timings.
fn boot_to_ready(t: &str, g: &GuestLab, cmdline: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--ready-timeout", "600"];
    args.extend_from_slice(extra);
    let mut run = g.run(cmdline, None, &args);
    let status = run.wait_ready(READY_TIMEOUT);
    let log = run.stderr();
    let serial = run.serial();

    // The stages, in order, with `kernel` among them whatever the kernel printed.
    let st = stages(&log);
    let names: Vec<&str> = st.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ipxe", "dhcp", "chain", "kernel", "ready"], "{t} ({cmdline}): stages\n{log}");
    // `kernel` was reported before the guest's init said its first word.
    let kernel_line = line_of(&log, "boot stage kernel").unwrap();
    let init_line = line_of(&log, "guest: ec-guest: init started")
        .unwrap_or_else(|| panic!("{t}: the launcher did not log the guest's init line\n{log}"));
    assert!(kernel_line < init_line, "{t} ({cmdline}): kernel stage after the guest's init ran\n{log}");
    // No firmware leftovers or escape sequences in front of the first kernel line.
    if let Some(first) = guest_lines(&log).into_iter().find(|l| l.contains("Linux version")) {
        assert!(first.starts_with("[    0.000000] Linux version"), "{t}: first kernel line {first:?}");
    }

    // The contract: NICs by PCI slot, the LAN address dnsmasq leased, the tuner found through the macvtap.
    assert!(serial.contains("ec-guest: boot0 is 0000:00:03.0 52:54:00:12:34:56"), "{t}: boot0\n{serial}");
    assert!(serial.contains(&format!("ec-guest: lan0 is 0000:00:04.0 {}", g.lan.mac)), "{t}: lan0\n{serial}");
    let lease =
        g.lease().unwrap_or_else(|| panic!("{t}: dnsmasq has no lease for {}: {:?}", g.lan.mac, g.lan.lab.leases()));
    assert_eq!(status["lan_address"], lease.as_str(), "{t}: status {status:#}");
    assert!(serial.contains(&format!("ec-publisher: lan {lease}\n")), "{t}\n{serial}");
    let found = format!("ec-publisher: tuner discovery: FOUND hdhomerun device {TUNER_ID} found at {TUNER_ADDR}");
    assert!(serial.contains(&found), "{t}: the guest did not find the emulator's tuner\n{serial}");
    assert!(log.contains(&format!("guest: {found}")), "{t}: the tuner line is not in the launcher's log\n{log}");

    let at = |n| stage_at(&st, n).unwrap_or(f64::NAN);
    // When the kernel took over: iPXE's last download finished (it boots at once after `initrd ... ok`).
    let loaded = log.lines().rfind(|l| l.contains("guest: initrd.img... ok")).and_then(timestamp);
    let kernel_stage = log.lines().find(|l| l.contains("boot stage kernel")).and_then(timestamp);
    let lag = match (loaded, kernel_stage) {
        (Some(a), Some(b)) => format!("{:.1} s", b - a),
        _ => "?".to_owned(),
    };
    eprintln!(
        "FIGURE real guest [{cmdline}]: start->chain {:.1} s, start->kernel {:.1} s, start->ready {:.1} s; \
         kernel stage {lag} after iPXE's last `ok`",
        at("chain"),
        at("kernel"),
        at("ready")
    );
    run
}

/// SIGTERM after ready: the guest powers off on the ACPI power button, exit 0. Prints the time it took.
fn graceful_stop(t: &str, run: &mut Run) {
    let asked = Instant::now();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let status = run.wait(Duration::from_secs(120));
    let took = asked.elapsed();
    assert_exit(status, 0, run);
    let log = run.stderr();
    assert!(log.contains("SIGTERM: asking the guest to power off"), "{t}\n{log}");
    assert!(log.contains("the guest powered off"), "{t}: not the guest's own power-off\n{log}");
    assert!(run.serial().contains("ec-guest: power button: powering off"), "{t}\n{}", run.serial());
    assert!(no_qemu_left(&run.state), "{t}: QEMU left behind");
    eprintln!("FIGURE real guest: SIGTERM -> guest powered off -> exit 0 in {:.2} s", took.as_secs_f64());
}

#[test]
#[ignore = "needs root"]
fn default_loglevel_boots_to_ready_and_stops_by_power_off() {
    let t = "default_loglevel_boots_to_ready_and_stops_by_power_off";
    let _one = one_guest();
    let Some(g) = GuestLab::new(t) else { return };
    let mut run = boot_to_ready(t, &g, "", &[]);
    graceful_stop(t, &mut run);
}

/// NixOS's log level: the kernel prints nearly nothing, yet `kernel` is reported. A guest line of exactly 80
/// columns just before the ready line stays its own line, so an anchored ready pattern matches.
#[test]
#[ignore = "needs root"]
fn loglevel_4_eighty_columns_before_an_anchored_ready_line() {
    let t = "loglevel_4_eighty_columns_before_an_anchored_ready_line";
    let _one = one_guest();
    let Some(g) = GuestLab::new(t) else { return };
    let mut run = boot_to_ready(t, &g, "loglevel=4 ec_line80", &["--ready-pattern", "^ec-publisher: ready$"]);
    let log = run.stderr();
    let line80 = format!("ec-guest: {}", "0".repeat(70));
    assert_eq!(line80.len(), 80);
    let lines = guest_lines(&log);
    assert!(lines.contains(&line80.as_str()), "{t}: the 80-column line is not its own line\n{log}");
    assert!(lines.contains(&"ec-publisher: ready"), "{t}\n{log}");
    assert!(!log.contains(&format!("{line80}ec-publisher")), "{t}: joined with the next line\n{log}");
    graceful_stop(t, &mut run);
}

/// `quiet`: the kernel prints nothing at all, yet `kernel` is reported. Then QEMU killed with SIGKILL: the
/// launcher exits 1.
#[test]
#[ignore = "needs root"]
fn quiet_boots_to_ready_and_a_killed_qemu_is_exit_1() {
    let t = "quiet_boots_to_ready_and_a_killed_qemu_is_exit_1";
    let _one = one_guest();
    let Some(g) = GuestLab::new(t) else { return };
    let mut run = boot_to_ready(t, &g, "quiet", &[]);
    assert!(!run.serial().contains("Linux version"), "{t}: quiet printed the kernel banner");
    let pids = qemu_pids(&run.state);
    assert_eq!(pids.len(), 1, "{pids:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    let status = run.wait(Duration::from_secs(60));
    assert_exit(status, 1, &run);
    assert!(no_qemu_left(&run.state), "{t}: QEMU left behind");
}

/// A 64 MiB initrd (the guest's, padded with zeros the kernel skips) boots, and `status --json` shows the
/// download while iPXE loads it; one log line says how it went.
#[test]
#[ignore = "needs root"]
fn a_64_mib_initrd_shows_download_progress() {
    let t = "a_64_mib_initrd_shows_download_progress";
    let _one = one_guest();
    let Some(g) = GuestLab::new(t) else { return };
    const SIZE: u64 = 64 << 20;
    let mut run = g.run("loglevel=4", Some(SIZE), &["--ready-timeout", "600"]);
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let start = Instant::now();
    loop {
        if run.state.join("status.json").exists() {
            let (_, v) = run.status_json();
            let d = &v["download"];
            if d.is_object() && d["file"].as_str().is_some_and(|f| f.ends_with("initrd.img")) {
                seen.push(d.clone());
            }
            if v["ready"] == true {
                break;
            }
        }
        assert!(start.elapsed() < READY_TIMEOUT && run.running(), "{t}: not ready\n{}", run.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = run.stderr();
    assert!(!seen.is_empty(), "{t}: status never showed the initrd's download\n{log}");
    for d in &seen {
        let (bytes, total) = (d["bytes"].as_u64().unwrap(), d["total"].as_u64().unwrap());
        assert_eq!(total, SIZE, "{d}");
        assert!(bytes <= total, "{d}");
        let percent = d["percent"].as_u64().unwrap();
        assert!(percent <= 100, "{d}");
    }
    let done = log
        .lines()
        .find(|l| l.contains("downloaded initrd.img: "))
        .unwrap_or_else(|| panic!("{t}: no completion line for initrd.img\n{log}"));
    assert!(done.contains("64.0 MiB") && done.contains(" MB/s"), "{done}");
    eprintln!("FIGURE 64 MiB initrd: {} progress samples; {done}", seen.len());
}
