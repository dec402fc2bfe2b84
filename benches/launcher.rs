//! Benchmark: what the launcher costs.
//!
//! 1. Start overhead: the time from starting `ec-ipxe-qemu run` until the QEMU binary it starts begins to run,
//!    against starting the same argv (taken from `print-args`) directly. `--qemu` points at this benchmark's
//!    own executable in "recorder" mode (`EC_BENCH_RECORD=FILE`): it writes the wall-clock time at which it
//!    started and exits, so neither side pays for a real QEMU. No disk is created (`--no-disk`); the state
//!    directory exists (a restart, as under systemd). With root, the same again with a LAN macvtap in a
//!    throwaway namespace (tap open, verification, netlink watch), both sides under `ip netns exec`.
//! 2. Memory: the launcher's VmRSS and VmHWM from /proc while it supervises a real QEMU guest (TCG, built-in
//!    diagnostics) for a few seconds, and its thread count; with --boot-dir too (the HTTP server runs on the
//!    launcher's event loop, so it adds no thread per connection).
//!
//! Run with `cargo bench --bench launcher` (release build). `EC_BENCH_RUNS` sets the number of starts
//! (default 30). It prints figures; it asserts nothing about time. Targets: ≤ 5 ms overhead, ≤ 10 MiB RSS.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_ec-ipxe-qemu");
const MACVTAP: &str = env!("CARGO_BIN_EXE_ec-macvtap");

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Start `cmd` with the recorder file set; return milliseconds from spawn to the recorder's start.
fn time_to_exec(cmd: &mut Command, record: &Path) -> f64 {
    let _ = std::fs::remove_file(record);
    cmd.env("EC_BENCH_RECORD", record).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let t0 = now_ns();
    let status = cmd.status().expect("spawn");
    assert!(status.success(), "{cmd:?} failed: {status}");
    let t1: u128 = std::fs::read_to_string(record).expect("recorder ran").trim().parse().expect("a time");
    (t1.saturating_sub(t0)) as f64 / 1e6
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn must(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace with a veth parent and a macvtap made by ec-macvtap.
fn lan_netns() -> Option<(Netns, &'static str)> {
    if !nix::unistd::Uid::effective().is_root() || Command::new("ip").arg("-V").output().is_err() {
        return None;
    }
    let ns = Netns(format!("ecb{}", std::process::id()));
    must(Command::new("ip").args(["netns", "add", &ns.0]));
    must(Command::new("ip").args(["-n", &ns.0, "link", "add", "up0", "type", "veth", "peer", "name", "lp0"]));
    must(Command::new("ip").args(["-n", &ns.0, "link", "set", "up0", "up"]));
    must(Command::new(MACVTAP).args(["-q", "--netns", &ns.0, "create", "--link", "up0", "--name", "benchlan0"]));
    Some((ns, "benchlan0"))
}

fn overhead(runs: usize, dir: &Path, me: &Path, ns: Option<&str>, extra: &[&str]) -> (f64, f64) {
    let state = dir.join(format!("state-{}", ns.unwrap_or("host")));
    let record = dir.join("record");
    let base = |sub: &str| {
        let mut c = match ns {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", n, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        c.args([sub, "--state-dir", state.to_str().unwrap_or_default(), "--no-disk", "--qemu"]).arg(me).args(extra);
        c
    };
    let argv: Vec<String> = serde_json::from_str(&must(&mut base("print-args"))).expect("print-args JSON");
    let direct = || {
        let mut c = match ns {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", n]).arg(&argv[0]);
                c
            }
            None => Command::new(&argv[0]),
        };
        c.args(&argv[1..]);
        c
    };
    // Warm up both (page cache, state directory present).
    time_to_exec(&mut base("run"), &record);
    time_to_exec(&mut direct(), &record);
    let mut l = Vec::with_capacity(runs);
    let mut d = Vec::with_capacity(runs);
    for _ in 0..runs {
        l.push(time_to_exec(&mut base("run"), &record));
        d.push(time_to_exec(&mut direct(), &record));
    }
    (median(l), median(d))
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// Supervise a real TCG guest for `secs` and return (VmRSS, VmHWM) in MiB and the most threads seen.
fn memory(dir: &Path, name: &str, extra: &[&str], secs: u64) -> Option<(f64, f64, u64)> {
    let state = dir.join(format!("mem-{name}"));
    let mut child = Command::new(BIN)
        .args(["-q", "run", "--state-dir", state.to_str()?, "--no-disk", "--accel", "tcg", "--memory", "128"])
        .args(["--shutdown-timeout", "0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let start = Instant::now();
    let mut rss = 0;
    let mut threads = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(250));
        rss = rss.max(status_kib(child.id(), "VmRSS:").unwrap_or(0));
        threads = threads.max(status_kib(child.id(), "Threads:").unwrap_or(0));
    }
    let hwm = status_kib(child.id(), "VmHWM:").unwrap_or(0);
    let serial = std::fs::read_to_string(state.join("serial.log")).unwrap_or_default();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
    if !serial.contains("ec-ipxe-qemu") {
        eprintln!("  (note: the guest had not reached the boot script yet)");
    }
    Some((rss as f64 / 1024.0, hwm as f64 / 1024.0, threads))
}

fn main() {
    if let Some(record) = std::env::var_os("EC_BENCH_RECORD") {
        // Recorder mode: stand in for QEMU.
        let t = now_ns();
        std::fs::write(PathBuf::from(record), t.to_string()).expect("write record");
        return;
    }
    // `cargo bench` passes `--bench`; any other argument filter is ignored.
    let runs: usize = std::env::var("EC_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(30).max(3);
    let me = std::env::current_exe().expect("own path");
    let tmp = tempfile::tempdir().expect("temp dir");

    println!("ec-ipxe-qemu launcher benchmark ({runs} starts each, medians)");
    let (l, d) = overhead(runs, tmp.path(), &me, None, &["--accel", "auto"]);
    println!(
        "start overhead, user-mode only:  run→exec {l:7.2} ms   direct {d:7.2} ms   overhead {:6.2} ms  (target ≤ 5 ms)",
        l - d
    );
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("netboot.ipxe"), "#!ipxe\n").expect("netboot.ipxe");
    let (l, d) = overhead(runs, tmp.path(), &me, None, &["--accel", "auto", "--boot-dir", www.to_str().unwrap_or("")]);
    println!("start overhead, with --boot-dir: run→exec {l:7.2} ms   direct {d:7.2} ms   overhead {:6.2} ms", l - d);
    match lan_netns() {
        Some((ns, lan)) => {
            let (l, d) = overhead(runs, tmp.path(), &me, Some(&ns.0), &["--accel", "auto", "--lan-interface", lan]);
            println!(
                "start overhead, with LAN tap:    run→exec {l:7.2} ms   direct {d:7.2} ms   overhead {:6.2} ms",
                l - d
            );
            let _ = Command::new(MACVTAP).args(["-q", "--netns", &ns.0, "delete", lan]).stdout(Stdio::null()).status();
        }
        None => println!("start overhead, with LAN tap: skipped (needs root and ip)"),
    }

    let have_qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_qemu {
        println!("memory: skipped (needs qemu-system-x86_64)");
        return;
    }
    for (name, extra) in [("diagnostics", vec![]), ("boot-dir", vec!["--boot-dir", www.to_str().unwrap_or("")])] {
        match memory(tmp.path(), name, &extra, 6) {
            Some((rss, hwm, threads)) => println!(
                "memory while supervising a TCG guest ({name}): VmRSS {rss:.2} MiB, VmHWM {hwm:.2} MiB  (target ≤ 10 MiB), \
                 {threads} thread(s)"
            ),
            None => println!("memory ({name}): could not start the launcher"),
        }
    }
}
