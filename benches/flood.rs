//! Benchmark: what a console flood and an idle guest cost the launcher (issue 16).
//!
//! 1. Flood: a real QEMU guest (TCG) whose `--boot-dir` iPXE script prints numbered lines at about 100 per
//!    second for `EC_BENCH_FLOOD_SECS` (default 60) seconds. From the first flood line to the last, the CPU
//!    time (utime + stime from /proc/PID/stat) of the launcher and of QEMU; the ratio launcher/QEMU is the
//!    figure (goal ≤ 5 %). Also the line rate the guest reached, and how many lines reached the log (the
//!    journal, under systemd) per second against the documented limit (200 at once, then 50/s).
//! 2. Idle: the launcher's VmRSS and VmHWM while it supervises an idle guest (built-in diagnostics, booted).
//!
//! `cargo bench --bench flood` (release build). `EC_BENCH_BIN` runs another build of `ec-ipxe-qemu` (for a
//! before/after comparison). It prints figures and asserts nothing about time.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/habitat/mod.rs"]
mod habitat;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::launcher::{Run, qemu_pids, serial};
use habitat::cpu_ticks as ticks;

fn bin() -> String {
    std::env::var("EC_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ec-ipxe-qemu").to_owned())
}

fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// True once the serial log of `state` shows `needle`, false after `timeout`.
fn wait_serial(state: &Path, needle: &str, timeout: Duration) -> bool {
    common::wait_for(timeout, || serial(&state.join("serial.log")).contains(needle).then_some(())).is_some()
}

/// `run` of [`bin`] on `state` (TCG, no disk, no shutdown wait), stopped on drop with its QEMU.
fn start(state: &Path, stderr: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--state-dir"]).arg(state);
    cmd.args(["--accel", "tcg", "--memory", "256", "--no-disk", "--shutdown-timeout", "0"]).args(args);
    Run::spawn(cmd, state, stderr)
}

fn flood(dir: &Path, secs: u32) {
    // Bursts of 10 lines, paced with `prompt --timeout` (milliseconds): about 100 lines/s under TCG here.
    let mut script = vec!["echo FLOOD-BEGIN".to_owned()];
    script.extend(habitat::flood("FLOOD", secs * 100, 60));
    script.extend(["echo FLOOD-DONE".to_owned(), "sleep 3600".to_owned()]);
    let www = habitat::www(dir, &script);
    let state = dir.join("flood-state");
    let stderr = dir.join("flood.stderr");
    let run =
        start(&state, &stderr, &["--boot-dir", www.to_str().unwrap_or_default(), "--ready-pattern", "FLOOD-DONE"]);
    let pid = run.pid();
    if !wait_serial(&state, "FLOOD-BEGIN", Duration::from_secs(300)) {
        println!("flood: the guest never started its script");
        return;
    }
    let Some(&qemu) = qemu_pids(&state).first() else {
        println!("flood: no QEMU child found");
        return;
    };
    let (l0, q0, t0) = (ticks(pid).unwrap_or(0), ticks(qemu).unwrap_or(0), Instant::now());
    if !wait_serial(&state, "FLOOD-DONE", Duration::from_secs(u64::from(secs) * 4 + 120)) {
        println!("flood: the guest never finished");
        return;
    }
    let (l1, q1, dt) = (ticks(pid).unwrap_or(0), ticks(qemu).unwrap_or(0), t0.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(3));
    let printed = serial(&state.join("serial.log")).lines().filter(|l| l.starts_with("FLOOD ")).count();
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    let logged = log.lines().filter(|l| l.contains("guest: FLOOD ")).count();
    let notes = log.lines().filter(|l| l.contains("suppressed")).count();
    let hz = 100.0; // USER_HZ
    let (lc, qc) = ((l1 - l0) as f64 / hz, (q1 - q0) as f64 / hz);
    println!("flood: {printed} lines in {dt:.1} s ({:.0} lines/s) from the guest", printed as f64 / dt);
    println!(
        "flood: launcher CPU {lc:.2} s ({:.1} % of a core), QEMU CPU {qc:.2} s ({:.1} % of a core)",
        100.0 * lc / dt,
        100.0 * qc / dt
    );
    println!("flood: launcher/QEMU CPU = {:.1} % (goal <= 5 %)", 100.0 * lc / qc.max(0.01));
    println!(
        "flood: {logged} guest lines logged ({:.1}/s; limit 200 then 50/s), {notes} suppression line(s)",
        logged as f64 / dt
    );
    println!(
        "flood: launcher VmRSS {} KiB, VmHWM {} KiB after the flood",
        status_kib(pid, "VmRSS:").unwrap_or(0),
        status_kib(pid, "VmHWM:").unwrap_or(0)
    );
}

fn idle(dir: &Path) {
    let state = dir.join("idle-state");
    let stderr = dir.join("idle.stderr");
    let run = start(&state, &stderr, &[]);
    let pid = run.pid();
    if !wait_serial(&state, "ec-ipxe-qemu: boot path OK", Duration::from_secs(300)) {
        println!("idle: the guest did not boot");
        return;
    }
    std::thread::sleep(Duration::from_secs(5));
    let t0 = ticks(pid).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(10));
    let t1 = ticks(pid).unwrap_or(0);
    println!(
        "idle: launcher VmRSS {} KiB, VmHWM {} KiB, {} threads, CPU {:.2} % of a core over 10 s",
        status_kib(pid, "VmRSS:").unwrap_or(0),
        status_kib(pid, "VmHWM:").unwrap_or(0),
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Threads:")).map(|l| l[8..].trim().to_owned()))
            .unwrap_or_default(),
        (t1 - t0) as f64 / 100.0 / 10.0 * 100.0
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: u32 = std::env::var("EC_BENCH_FLOOD_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let dir = std::env::temp_dir().join(format!("ec-bench-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    println!("binary: {}", bin());
    idle(&dir);
    flood(&dir, secs);
    let _ = std::fs::remove_dir_all(&dir);
}
