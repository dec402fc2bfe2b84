//! End-to-end tests of `ec-ipxe-qemu`: a real QEMU under TCG, real iPXE (Debian's `ipxe-qemu` option ROMs and
//! `ipxe.lkrn`), a real dnsmasq in a throwaway LAN namespace.
//!
//! Each test makes what it needs with unique names and removes it on drop, even when it fails. Tests that need
//! QEMU (or root, for the LAN lab) skip with a reason, and fail instead under `CI=true`. At most two QEMUs run
//! at once (the CI machines have two cores; TCG is CPU-bound).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{Lab, Netns, macvtap, require_programs, require_root, unique, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_ec-ipxe-qemu");
const OK_LINE: &str = "ec-ipxe-qemu: boot path OK";
const LKRN: &str = "/usr/lib/ipxe/ipxe.lkrn";
/// How long an iPXE boot may take under TCG with another QEMU beside it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------------------
// Fixtures

/// At most this many QEMUs at once.
const MAX_QEMUS: u32 = 2;
static SLOTS: Mutex<u32> = Mutex::new(0);
static SLOT_FREED: Condvar = Condvar::new();

/// A QEMU slot, held for the life of a test.
struct Slot;

impl Slot {
    fn take() -> Slot {
        let mut n = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= MAX_QEMUS {
            n = SLOT_FREED.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut n = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        SLOT_FREED.notify_one();
    }
}

/// QEMU, its option ROM and qemu-img must be there.
fn require_qemu(test: &str) -> bool {
    if !require_programs(test, &["qemu-system-x86_64", "qemu-img"]) {
        return false;
    }
    let rom = ["/usr/lib/ipxe/qemu/efi-virtio.rom", "/usr/share/qemu/efi-virtio.rom"];
    if !rom.iter().any(|p| Path::new(p).exists()) {
        return common::skip_or_fail(test, "needs the iPXE option ROMs (Debian package ipxe-qemu)");
    }
    true
}

/// Processes whose command line is QEMU with `needle` (a unique state path) in it.
fn qemu_pids(needle: &Path) -> Vec<i32> {
    let needle = needle.to_string_lossy();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.first().is_some_and(|a| a.ends_with("qemu-system-x86_64")) && args.iter().any(|a| a.contains(&*needle))
        {
            pids.push(pid);
        }
    }
    pids
}

fn no_qemu_left(state: &Path) -> bool {
    wait_for(Duration::from_secs(5), || qemu_pids(state).is_empty().then_some(())).is_some()
}

/// One `ec-ipxe-qemu run`, killed on drop (QEMU follows through its parent-death signal).
struct Run {
    child: Option<Child>,
    state: PathBuf,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Run {
    /// Start `run --state-dir STATE --accel tcg --memory 256 ARGS...`, optionally inside a namespace.
    fn start(ns: Option<&Netns>, state: &Path, args: &[&str]) -> Run {
        let log = state.with_extension("stderr");
        let mut cmd = match ns {
            Some(ns) => ns.cmd(BIN),
            None => Command::new(BIN),
        };
        cmd.args(["run", "--state-dir"]).arg(state).args(["--accel", "tcg", "--memory", "256"]).args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("start ec-ipxe-qemu");
        Run { child: Some(child), state: state.to_owned(), log, status: None }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn serial(&self) -> String {
        serial(&self.state.join("serial.log"))
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Wait for the launcher to exit.
    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let child = self.child.as_mut()?;
        self.status = wait_for(timeout, || child.try_wait().ok().flatten());
        self.status
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Wait until the serial log contains `needle`; panic with the logs when it does not.
    fn wait_serial(&mut self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let s = self.serial();
            if s.contains(needle) {
                return s;
            }
            if start.elapsed() > BOOT_TIMEOUT || !self.running() {
                panic!(
                    "serial log never showed {needle:?} (launcher running: {})\n--- serial ---\n{s}\n--- stderr ---\n{}",
                    self.running(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait until the launcher says QEMU started.
    fn wait_started(&mut self) {
        let ok = wait_for(Duration::from_secs(30), || self.stderr().contains("QEMU started").then_some(()));
        assert!(ok.is_some(), "QEMU did not start:\n{}", self.stderr());
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Stop in order (a second signal skips the shutdown timeout), so the launcher reaps its QEMU;
            // SIGKILL only if that does not work.
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            for _ in 0..2 {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                std::thread::sleep(Duration::from_millis(100));
            }
            if wait_for(Duration::from_secs(10), || c.try_wait().ok().flatten()).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Belt and braces: nothing of ours may outlive the test.
        for pid in qemu_pids(&self.state) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn serial(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default().replace('\r', "")
}

/// A small HTTP server of the test's own on 127.0.0.1 that serves `body` at every path and records the
/// request lines it saw.
struct TestServer {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(body: String) -> TestServer {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (srv, log) = (Arc::clone(&server), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            for rq in srv.incoming_requests() {
                log.lock().unwrap().push(format!("{} {}", rq.method(), rq.url()));
                let _ = rq.respond(tiny_http::Response::from_string(body.clone()));
            }
        });
        TestServer { port, seen, server, thread: Some(thread) }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn assert_exit(status: Option<ExitStatus>, code: i32, run: &Run) {
    let Some(s) = status else { panic!("ec-ipxe-qemu did not exit in time\n{}", run.stderr()) };
    assert_eq!(s.code(), Some(code), "exit {s:?} (signal {:?})\n{}", s.signal(), run.stderr());
}

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
        require_root(test);
        if !require_qemu(test) || !require_programs(test, &["dnsmasq", "ip"]) {
            return None;
        }
        let lab = Lab::new();
        let name = unique("lv");
        let out = macvtap(Some(&lab.host), &["--json", "create", "--link", &lab.uplink, "--name", &name]);
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
    let server = TestServer::start(format!("#!ipxe\necho {marker}\nsleep 3600\n"));
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let url = format!("http://10.0.2.2:{}/chain.ipxe?from=${{net0/mac}}", server.port);
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--boot-url", &url]);
    let s = run.wait_serial(&marker);
    assert!(s.contains("tftp://10.0.2.2/boot.ipxe"), "the ROM fetched the script over TFTP:\n{s}");
    assert!(s.contains("ec-ipxe-qemu: chaining http://10.0.2.2:"), "{s}");
    let seen = server.seen();
    // iPXE expanded ${net0/mac} in the URL (and percent-encoded it).
    assert!(seen.iter().any(|r| r == "GET /chain.ipxe?from=52%3A54%3A00%3A12%3A34%3A56"), "server saw {seen:?}");
    // The boot path never touches a LAN NIC.
    assert!(!std::fs::read_to_string(state.join("boot.ipxe")).unwrap().contains("net1"));
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
    run.wait_serial(&marker);
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
    let s = run.wait_serial(OK_LINE);
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
    let s = run.wait_serial(OK_LINE);
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
    let script = std::fs::read(state.join("boot.ipxe")).unwrap();
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
    assert_eq!(std::fs::read(state.join("boot.ipxe")).unwrap(), script, "the first run's script is untouched");
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
    let s = run.wait_serial(OK_LINE);
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
/// the disk is finished, QEMU starts, is stopped in order, and `run` exits 0 with nothing left behind.
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
    assert!(run.stderr().contains("SIGTERM"), "{}", run.stderr());
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
