//! The boot path made visible, end to end, on real parts: a real QEMU under TCG with real iPXE (Debian's NIC
//! option ROMs), a real `SOCK_DGRAM` socket bound as `NOTIFY_SOCKET` (what systemd does), a real pty for
//! `console`, and the LAN lab's real dnsmasq for the guest's LAN address.
//!
//! Covered: `READY=1` only after the ready line, `STATUS=` through firmware → dhcp → chain → ready; `guest:`
//! lines on stderr without escape bytes; `status --json` while running and exit 3 after; `console` under a
//! pty (output, Ctrl-] detaches, the terminal restored); a 404 boot URL is an error with the 404 hint and a
//! stop before ready is quick; `--ready-timeout` ends the run with 1; `serial.log` under its cap with a
//! chatty guest and the previous boot's log kept as `serial.log.1`; hostile console clients do not stall the
//! guest. Figures (start → READY, stop before and after ready, the cap) are printed as `FIGURE` lines.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::Http;
use common::launcher::{BIN, Run, Slot, assert_exit, qemu_pids, require_qemu};
use common::{Lab, macvtap, require_programs, require_root, unique, wait_for};

/// How long an iPXE boot may take under TCG with another QEMU beside it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);

// ---------------------------------------------------------------------------------------------------------
// Fixtures

/// A chained script that acts like the publisher guest: its LAN line and its ready line, then `tick` lines.
fn publisher_script(lan: &str, tick_secs: u32) -> String {
    format!(
        "#!ipxe\necho ec-publisher: lan {lan}\necho ec-publisher: ready\nset n:int32 0\n:tick\ninc n\n\
         echo EC-TICK ${{n}}\nsleep {tick_secs}\ngoto tick\n"
    )
}

/// A guest that prints as fast as iPXE can.
fn chatty_script() -> String {
    "#!ipxe\necho ec-publisher: ready\nset n:int32 0\n:loop\ninc n\n\
     echo ec-chatty ${n} ......................................................\ngoto loop\n"
        .into()
}

/// The highest `ec-chatty N` in a serial log.
fn chatty_count(serial: &str) -> u64 {
    serial.lines().filter_map(|l| l.strip_prefix("ec-chatty ")?.split(' ').next()?.parse().ok()).max().unwrap_or(0)
}

/// The service manager's side of `NOTIFY_SOCKET`: a bound SOCK_DGRAM socket; each datagram is kept with the
/// time it arrived and whether `serial.log` held `needle` at that moment.
struct Notify {
    path: PathBuf,
    got: Arc<Mutex<Vec<(Instant, String, bool)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Notify {
    fn bind(dir: &Path, serial: PathBuf, needle: &'static str) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, halt) = (Arc::clone(&got), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let at = Instant::now();
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let seen = std::fs::read(&serial).is_ok_and(|s| String::from_utf8_lossy(&s).contains(needle));
                    g.lock().unwrap().push((at, text, seen));
                }
            }
        });
        Notify { path, got, stop, thread: Some(thread) }
    }

    fn messages(&self) -> Vec<(Instant, String, bool)> {
        self.got.lock().unwrap().clone()
    }

    /// The STATUS= texts, in order.
    fn statuses(&self) -> Vec<String> {
        self.messages()
            .iter()
            .flat_map(|(_, m, _)| {
                m.lines().filter_map(|l| l.strip_prefix("STATUS=")).map(str::to_owned).collect::<Vec<_>>()
            })
            .collect()
    }

    fn ready_at(&self) -> Option<(Instant, String, bool)> {
        self.messages().into_iter().find(|(_, m, _)| m.lines().any(|l| l == "READY=1"))
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `guest:` lines on stderr carry no escape or carriage-return bytes.
fn assert_clean_guest_lines(stderr: &str) {
    let guest: Vec<&str> = stderr.lines().filter(|l| l.contains("guest: ")).collect();
    assert!(guest.len() > 5, "few guest lines on stderr:\n{stderr}");
    assert!(guest.iter().any(|l| l.contains("guest: iPXE")), "no iPXE banner among the guest lines:\n{stderr}");
    for l in &guest {
        assert!(!l.bytes().any(|b| b == 0x1b || b == b'\r' || (b < 0x20 && b != b'\t')), "control bytes in {l:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Readiness, stages, status

/// READY=1 arrives only once the ready line is on the console, STATUS= goes firmware → … → dhcp → chain →
/// ready, WATCHDOG=1 comes while the guest runs, `status --json` shows the boot, a stop after ready powers off then quits after the timeout, and
/// `status` exits 3 once the launcher is gone (still showing the last status).
#[test]
fn ready_only_after_the_ready_line_with_stages_and_status() {
    let t = "ready_only_after_the_ready_line_with_stages_and_status";
    if !require_qemu(t) {
        return;
    }
    let http = Http::start(vec![("/publisher.ipxe", 200, publisher_script("192.0.2.77", 2))]);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let notify = Notify::bind(tmp.path(), state.join("serial.log"), "ec-publisher: ready");
    let _slot = Slot::take();
    let url = http.url("/publisher.ipxe");
    let mut run = Run::start_in(
        None,
        &state,
        &["--no-disk", "--boot-url", &url, "--shutdown-timeout", "2"],
        &[("NOTIFY_SOCKET", notify.path.as_path()), ("WATCHDOG_USEC", Path::new("2000000"))],
    );
    let ready = wait_for(BOOT_TIMEOUT, || notify.ready_at()).unwrap_or_else(|| {
        panic!("no READY=1\nstatuses: {:?}\n--- stderr ---\n{}\n{}", notify.statuses(), run.stderr(), run.serial())
    });
    let (at, msg, line_was_there) = ready;
    let to_ready = at.duration_since(run.started);
    eprintln!("FIGURE start to READY=1 (TCG, chain over HTTP): {to_ready:.1?} (load {})", loadavg());
    assert!(line_was_there, "READY=1 came before the ready line was on the console: {msg:?}");
    assert!(msg.contains("STATUS=ready:"), "{msg:?}");
    assert!(msg.lines().any(|l| l == "RESTART_RESET=1"), "a ready guest resets the restart backoff: {msg:?}");
    let before: Vec<_> = notify.messages().into_iter().filter(|(t, _, _)| *t < at).collect();
    assert!(before.iter().all(|(_, m, _)| !m.contains("READY=1")), "READY=1 twice");

    let statuses = notify.statuses();
    let stages: Vec<&str> = statuses.iter().filter_map(|s| s.split(':').next()).collect();
    let mut want = ["firmware", "dhcp", "chain", "ready"].into_iter().peekable();
    for s in &stages {
        if want.peek() == Some(s) {
            want.next();
        }
    }
    assert!(want.peek().is_none(), "STATUS= did not go firmware → dhcp → chain → ready: {statuses:?}");
    assert!(stages.contains(&"ipxe"), "{statuses:?}");
    assert!(statuses.iter().any(|s| s.starts_with("dhcp: the boot NIC has 10.0.2.15")), "{statuses:?}");
    assert!(statuses.iter().any(|s| s.starts_with("chain: loading http://10.0.2.2:")), "{statuses:?}");

    // status while running.
    let (code, v) = run.status_json();
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["running"], true, "{v}");
    assert_eq!(v["stage"], "ready", "{v}");
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(v["boot_address"], "10.0.2.15", "{v}");
    assert_eq!(v["lan_address"], "192.0.2.77", "{v}");
    assert_eq!(v["boot_url"], url, "{v}");
    assert_eq!(v["accel"], "tcg", "{v}");
    assert_eq!(v["vhost"], "off", "{v}");
    assert_eq!(v["lan_interface"], serde_json::Value::Null, "{v}");
    assert_eq!(v["pid"], run.child.as_ref().unwrap().id(), "{v}");
    assert_eq!(v["qemu_pid"].as_i64().map(|p| p as i32), qemu_pids(&state).first().copied(), "{v}");
    assert!(v["started_at"].as_str().is_some_and(|s| s.ends_with('Z')), "{v}");
    let human = Command::new(BIN).args(["status", "--state-dir"]).arg(&state).output().unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains(": running") && human.contains("192.0.2.77"), "{human}");

    // The watchdog is fed while the guest runs (WATCHDOG_USEC=2 s: every second or so), and QEMU does not
    // inherit the service manager's variables.
    let pings =
        |m: &[(Instant, String, bool)]| m.iter().filter(|(_, m, _)| m.lines().any(|l| l == "WATCHDOG=1")).count();
    let before_wait = pings(&notify.messages());
    std::thread::sleep(Duration::from_secs(4));
    let fed = pings(&notify.messages()) - before_wait;
    assert!((2..=8).contains(&fed), "{fed} WATCHDOG=1 in 4 s with WATCHDOG_USEC=2000000");
    let qemu = qemu_pids(&state)[0];
    let environ = std::fs::read(format!("/proc/{qemu}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains("NOTIFY_SOCKET=") && !environ.contains("WATCHDOG_USEC="), "QEMU inherited them");

    // The console went to stderr as clean guest lines.
    let err = run.stderr();
    assert_clean_guest_lines(&err);
    assert!(err.contains("guest: ec-publisher: ready"), "{err}");

    // A stop after ready: powerdown, then quit after --shutdown-timeout (iPXE ignores ACPI).
    let asked = Instant::now();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    assert_exit(run.wait(Duration::from_secs(20)), 0, &run);
    let took = asked.elapsed();
    eprintln!("FIGURE stop after ready (--shutdown-timeout 2, iPXE ignores ACPI): {took:.2?}");
    assert!(took >= Duration::from_secs(2), "the guest got no time to power off: {took:?}");
    assert!(run.stderr().contains("SIGTERM: asking the guest to power off"), "{}", run.stderr());
    assert!(notify.messages().iter().any(|(_, m, _)| m.contains("STOPPING=1")), "no STOPPING=1");
    assert!(qemu_pids(&state).is_empty());
    // No launcher: exit 3, the last status still shown.
    let (code, v) = run.status_json();
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["running"], false, "{v}");
    assert_eq!(v["stage"], "ready", "{v}");
    assert!(v["ended_at"].is_string() && v["qemu_pid"].is_null(), "{v}");
    assert!(!state.join("console.sock").exists(), "console.sock is removed");
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The LAN lab: the diagnostics lease on the macvtap from dnsmasq, and `status --json` shows that address with
/// the LAN interface and MAC.
#[test]
#[ignore = "needs root"]
fn status_shows_the_lan_address_from_the_lab() {
    let t = "status_shows_the_lan_address_from_the_lab";
    require_root(t);
    if !require_qemu(t) || !require_programs(t, &["dnsmasq", "ip"]) {
        return;
    }
    let lab = Lab::new();
    let name = unique("vs");
    let out = macvtap(Some(&lab.host), &["--json", "create", "--link", &lab.uplink, "--name", &name]);
    assert!(out.status.success(), "ec-macvtap create: {}", String::from_utf8_lossy(&out.stderr));
    let _link = common::DeleteOnDrop::new(&lab.host, &name);
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mac = created["mac"].as_str().unwrap().to_owned();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run =
        Run::start(Some(&lab.host), &state, &["--no-disk", "--lan-interface", &name, "--shutdown-timeout", "0"]);
    let v = wait_for(BOOT_TIMEOUT, || {
        let (_, v) = run.status_json();
        (v["ready"] == true).then_some(v)
    })
    .unwrap_or_else(|| panic!("never ready\n{}\n{}", run.stderr(), run.serial()));
    let lease = wait_for(Duration::from_secs(15), || lab.leases().into_iter().next()).expect("a dnsmasq lease");
    assert_eq!(lease.0, mac.to_lowercase());
    assert_eq!(v["lan_address"], lease.1, "{v}");
    assert_eq!(v["lan_interface"], name, "{v}");
    assert_eq!(v["lan_mac"], mac, "{v}");
    assert_eq!(v["stage"], "ready", "{v}");
    assert!(run.stderr().contains(&format!("the guest's LAN address is {}", lease.1)), "{}", run.stderr());
    run.signal(nix::sys::signal::Signal::SIGTERM);
    assert_exit(run.wait(Duration::from_secs(15)), 0, &run);
    let (code, v) = run.status_json();
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["lan_address"], lease.1, "the last known status keeps the address: {v}");
}

// ---------------------------------------------------------------------------------------------------------
// Boot failures, timeouts, quick stops

/// A 404 boot URL: an error line on stderr with the 404 hint (not the generic advice); a stop before ready
/// quits QEMU at once (< 3 s).
#[test]
fn boot_404_is_an_error_with_its_hint_and_a_stop_is_quick() {
    let t = "boot_404_is_an_error_with_its_hint_and_a_stop_is_quick";
    if !require_qemu(t) {
        return;
    }
    let http = Http::start(vec![]);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let url = http.url("/missing.ipxe");
    let mut run = Run::start(None, &state, &["--no-disk", "--boot-url", &url]);
    let err = run.wait_stderr("boot failure:", BOOT_TIMEOUT);
    let line = err.lines().find(|l| l.contains("boot failure:")).unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&url) && line.contains("HTTP 404 Not Found"), "{line}");
    assert!(!err.contains("check the URL, that the server is up"), "the generic advice is gone: {err}");
    let (_, v) = run.status_json();
    assert_eq!(v["stage"], "chain", "{v}");
    assert_eq!(v["ready"], false, "{v}");
    assert!(v["last_error"].as_str().is_some_and(|e| e.contains("404")), "{v}");
    let asked = Instant::now();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    assert_exit(run.wait(Duration::from_secs(25)), 0, &run);
    let took = asked.elapsed();
    eprintln!("FIGURE stop before ready (iPXE retrying a 404, default --shutdown-timeout 30): {took:.2?}");
    assert!(took < Duration::from_secs(10), "took {took:?}\n{}", run.stderr());
    assert!(run.stderr().contains("SIGTERM before the guest was ready (stage chain)"), "{}", run.stderr());
    assert!(qemu_pids(&state).is_empty());
}

/// Not ready within `--ready-timeout`: exit 1, naming the stage and the last boot failure.
#[test]
fn ready_timeout_ends_the_run_with_1() {
    let t = "ready_timeout_ends_the_run_with_1";
    if !require_qemu(t) {
        return;
    }
    let http = Http::start(vec![]);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let url = http.url("/missing.ipxe");
    let mut run = Run::start(None, &state, &["--no-disk", "--boot-url", &url, "--ready-timeout", "25"]);
    let status = run.wait(Duration::from_secs(60));
    assert_exit(status, 1, &run);
    let took = run.started.elapsed();
    assert!(took >= Duration::from_secs(25) && took < Duration::from_secs(40), "took {took:?}");
    let last = run.stderr().lines().last().unwrap_or("").to_owned();
    assert!(last.contains("the guest was not ready within --ready-timeout 25 s (stage chain"), "{last}");
    assert!(last.contains("404"), "{last}");
    assert!(qemu_pids(&state).is_empty());
}

/// An https URL with Debian's iPXE (no HTTPS): a warning before QEMU starts that says how it knows, and the
/// boot failure names the missing HTTPS.
#[test]
fn https_without_https_in_ipxe_is_warned_before_start() {
    let t = "https_without_https_in_ipxe_is_warned_before_start";
    if !require_qemu(t) || !require_programs(t, &["/usr/lib/ipxe/ipxe.lkrn"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _slot = Slot::take();
    for ipxe in [None, Some("/usr/lib/ipxe/ipxe.lkrn")] {
        let state = tmp.path().join(if ipxe.is_some() { "lkrn" } else { "rom" });
        let mut args = vec!["--no-disk", "--boot-url", "https://10.0.2.2:9/netboot.ipxe"];
        if let Some(i) = ipxe {
            args.extend(["--ipxe", i]);
        }
        let mut run = Run::start(None, &state, &args);
        let err = run.wait_stderr("boot failure:", BOOT_TIMEOUT);
        let warn = err.lines().find(|l| l.contains("has no HTTPS support")).unwrap_or_else(|| panic!("{err}"));
        assert!(warn.contains("WARN") && warn.contains("read from the image"), "{warn}");
        match ipxe {
            Some(i) => assert!(warn.contains(&format!("--ipxe {i}")), "{warn}"),
            None => assert!(warn.contains("efi-virtio.rom"), "{warn}"),
        }
        let warned = err.find("has no HTTPS support").unwrap();
        assert!(warned < err.find("QEMU started").unwrap(), "warned before start:\n{err}");
        let failure = err.lines().find(|l| l.contains("boot failure:")).unwrap();
        assert!(failure.contains("cannot fetch https:// URLs"), "{failure}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// The serial log

/// A chatty guest: serial.log never exceeds --serial-log-max, keeps the boot and the latest output; a restart
/// keeps the previous boot's log as serial.log.1.
#[test]
fn serial_log_stays_under_its_cap_and_the_previous_boot_survives() {
    let t = "serial_log_stays_under_its_cap_and_the_previous_boot_survives";
    if !require_qemu(t) {
        return;
    }
    let http = Http::start(vec![("/chatty.ipxe", 200, chatty_script())]);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let log = state.join("serial.log");
    let cap: u64 = 32 << 10;
    let _slot = Slot::take();
    let url = http.url("/chatty.ipxe");
    let mut run = Run::start(
        None,
        &state,
        &["--no-disk", "--boot-url", &url, "--serial-log-max", "32K", "--shutdown-timeout", "0"],
    );
    let mut max = 0u64;
    let mut cuts_seen = 0;
    let start = Instant::now();
    let mut samples = 0;
    while cuts_seen < 2 {
        let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        max = max.max(size);
        samples += 1;
        assert!(size <= cap, "serial.log is {size} bytes, over its cap {cap}");
        let text = run.serial();
        let counts: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split("bytes (--serial-log-max); ").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        cuts_seen = counts.first().map_or(0, |c| if *c > cap { 2 } else { 1 });
        assert!(start.elapsed() < Duration::from_secs(240), "no second cut within 240 s\n{}", run.stderr());
        assert!(run.running(), "{}", run.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = run.serial();
    assert!(text.contains("SeaBIOS") && text.contains("iPXE"), "the head keeps the boot");
    assert!(chatty_count(&text) > 100, "the tail keeps the latest output");
    eprintln!(
        "FIGURE serial.log with --serial-log-max 32K and a chatty guest: at most {max} bytes over {samples} samples \
         in {:.0?}; the boot and the latest lines kept",
        start.elapsed()
    );
    run.signal(nix::sys::signal::Signal::SIGTERM);
    assert_exit(run.wait(Duration::from_secs(15)), 0, &run);
    let first_boot = std::fs::read(&log).unwrap();
    drop(run);
    // The restart keeps it as serial.log.1.
    let mut again = Run::start(None, &state, &["--no-disk", "--boot-url", &url, "--shutdown-timeout", "0"]);
    again.wait_stderr("QEMU started", Duration::from_secs(30));
    assert_eq!(std::fs::read(state.join("serial.log.1")).unwrap(), first_boot, "the previous boot's log");
    let fresh = std::fs::read(&log).unwrap();
    assert!(fresh.len() < first_boot.len() && !String::from_utf8_lossy(&fresh).contains("serial log cut here"));
}

// ---------------------------------------------------------------------------------------------------------
// The console

/// `console` under a real pty: the guest's output shows, Ctrl-] detaches with exit 0, and the terminal's
/// settings are restored.
#[test]
fn console_attaches_under_a_pty_and_detaches_on_ctrl_bracket() {
    let t = "console_attaches_under_a_pty_and_detaches_on_ctrl_bracket";
    if !require_qemu(t) {
        return;
    }
    let http = Http::start(vec![("/publisher.ipxe", 200, publisher_script("192.0.2.5", 1))]);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--boot-url", &http.url("/publisher.ipxe")]);
    run.wait_stderr("boot stage ready", BOOT_TIMEOUT);

    let pty = nix::pty::openpty(None, None).unwrap();
    let before = nix::sys::termios::tcgetattr(pty.slave.as_fd()).unwrap();
    let slave = std::fs::File::from(pty.slave.try_clone().unwrap());
    let mut console = Command::new(BIN)
        .args(["console", "--state-dir"])
        .arg(&state)
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let shown = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let mut m = master.try_clone().unwrap();
        let shown = Arc::clone(&shown);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = m.read(&mut buf) {
                if n == 0 {
                    break;
                }
                shown.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&shown.lock().unwrap()).into_owned();
    wait_for(Duration::from_secs(10), || text().contains("Ctrl-] detaches").then_some(()))
        .unwrap_or_else(|| panic!("no banner: {:?}", text()));
    // Raw mode while attached.
    let raw = nix::sys::termios::tcgetattr(pty.slave.as_fd()).unwrap();
    assert!(!raw.local_flags.contains(nix::sys::termios::LocalFlags::ICANON), "not in raw mode");
    // Live output: a tick printed after attaching.
    let ticks_at_attach = text().matches("EC-TICK").count();
    wait_for(Duration::from_secs(30), || (text().matches("EC-TICK").count() > ticks_at_attach + 1).then_some(()))
        .unwrap_or_else(|| panic!("no live output: {:?}", text()));
    assert!(String::from_utf8_lossy(&std::fs::read(state.join("serial.log")).unwrap()).contains("EC-TICK"));
    master.write_all(&[0x1d]).unwrap();
    let status = wait_for(Duration::from_secs(30), || console.try_wait().ok().flatten());
    let wchan = std::fs::read_to_string(format!("/proc/{}/wchan", console.id())).unwrap_or_default();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "console waits in {wchan:?}\nshown: {:?}\nlauncher: {}",
        text(),
        run.stderr()
    );
    let after = nix::sys::termios::tcgetattr(pty.slave.as_fd()).unwrap();
    assert_eq!(after.local_flags, before.local_flags, "terminal restored");
    assert_eq!(after.input_flags, before.input_flags, "terminal restored");
    assert_eq!(after.output_flags, before.output_flags, "terminal restored");
    assert!(text().contains("Detached from the guest console"), "{:?}", text());
    drop(pty.slave);
    drop(master);
    let _ = reader.join();
    assert!(run.running(), "detaching leaves the guest alone");
    // No launcher: exit 3.
    drop(run);
    let out = Command::new(BIN).args(["console", "--state-dir"]).arg(&state).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Hostile local clients on console.sock — ten that never read, one that floods input, and more than the
/// cap — do not slow the guest down; the extra ones are turned away, and the run still stops cleanly.
#[test]
fn hostile_console_clients_do_not_stall_the_guest() {
    let t = "hostile_console_clients_do_not_stall_the_guest";
    if !require_qemu(t) {
        return;
    }
    let http = Http::start(vec![("/chatty.ipxe", 200, chatty_script())]);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run =
        Run::start(None, &state, &["--no-disk", "--boot-url", &http.url("/chatty.ipxe"), "--shutdown-timeout", "0"]);
    run.wait_stderr("boot stage ready", BOOT_TIMEOUT);
    let rate = |secs: u64| {
        let a = chatty_count(&run.serial());
        std::thread::sleep(Duration::from_secs(secs));
        (chatty_count(&run.serial()) - a) as f64 / secs as f64
    };
    let alone = rate(8);
    // Without this, a guest that printed nothing would pass the comparison below (0 >= 0).
    assert!(alone > 0.0, "the chatty guest printed no ec-chatty line in 8 s\n{}", run.stderr());
    let sock = state.join("console.sock");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The flooder first: it holds the keyboard.
    let flooder = {
        let mut s = UnixStream::connect(&sock).unwrap();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let junk = [b'a'; 4096];
            let mut sent = 0u64;
            s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = s.write(&junk) {
                    sent += n as u64;
                }
            }
            sent
        })
    };
    let idle: Vec<UnixStream> = (0..10).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let fill: Vec<UnixStream> = (0..5).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = UnixStream::connect(&sock).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut refused = String::new();
    let _ = extra.read_to_string(&mut refused);
    assert!(refused.contains("console clients are attached already"), "{refused:?}");
    let hostile = rate(8);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    eprintln!(
        "FIGURE guest console lines/s: {alone:.0} alone, {hostile:.0} with 10 idle clients, 5 more and one \
         flooding input ({} KiB sent before it blocked)",
        sent >> 10
    );
    assert!(hostile >= alone * 0.5, "the guest slowed down: {alone:.0}/s → {hostile:.0}/s");
    let (code, v) = run.status_json();
    assert_eq!((code, v["running"].clone()), (Some(0), serde_json::Value::Bool(true)), "{v}");
    drop(idle);
    drop(fill);
    run.signal(nix::sys::signal::Signal::SIGTERM);
    assert_exit(run.wait(Duration::from_secs(15)), 0, &run);
    assert!(run.stderr().contains("console: refused a client (16 attached already)"), "{}", run.stderr());
}
