//! The `ec-ipxe-qemu run` harness of the end-to-end tests: QEMU requirement checks, a cap on QEMUs at once,
//! a `Run` that is stopped (then killed) on drop with everything of its QEMU, and readers for its stderr,
//! serial log and `status --json`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Lab, Netns, macvtap, require_programs, require_root, skip_or_fail, unique, wait_for};

pub const BIN: &str = env!("CARGO_BIN_EXE_ec-ipxe-qemu");
/// What the built-in diagnostics print when the user-mode boot path works.
pub const OK_LINE: &str = "ec-ipxe-qemu: boot path OK";
/// Debian's iPXE kernel image.
pub const LKRN: &str = "/usr/lib/ipxe/ipxe.lkrn";
/// How long an iPXE boot may take under TCG with another QEMU beside it.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// At most this many QEMUs at once in one test binary (two cores; TCG is CPU-bound).
const MAX_QEMUS: u32 = 2;
static SLOTS: Mutex<u32> = Mutex::new(0);
static SLOT_FREED: Condvar = Condvar::new();

/// A QEMU slot, held for the life of a test.
pub struct Slot;

impl Slot {
    pub fn take() -> Slot {
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
        *SLOTS.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        SLOT_FREED.notify_one();
    }
}

/// QEMU, its iPXE option ROM and qemu-img must be there (skip with the reason, or fail under CI=true).
pub fn require_qemu(test: &str) -> bool {
    if !require_programs(test, &["qemu-system-x86_64", "qemu-img"]) {
        return false;
    }
    let rom = ["/usr/lib/ipxe/qemu/efi-virtio.rom", "/usr/share/qemu/efi-virtio.rom"];
    rom.iter().any(|p| Path::new(p).exists())
        || skip_or_fail(test, "needs the iPXE option ROMs (Debian package ipxe-qemu)")
}

/// Processes whose command line is QEMU with `needle` (a unique state path) in it.
pub fn qemu_pids(needle: &Path) -> Vec<i32> {
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

/// No QEMU with `state` in its command line within 5 s.
pub fn no_qemu_left(state: &Path) -> bool {
    wait_for(Duration::from_secs(5), || qemu_pids(state).is_empty().then_some(())).is_some()
}

/// A serial log with carriage returns removed; bytes that are not UTF-8 are replaced, not the whole log
/// lost (so a `!contains` check never passes on an unreadable log).
pub fn serial(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).replace('\r', "")
}

/// One `ec-ipxe-qemu run`, stopped (then killed) on drop with its QEMU.
pub struct Run {
    pub child: Option<Child>,
    pub state: PathBuf,
    pub log: PathBuf,
    pub status: Option<ExitStatus>,
    pub started: Instant,
}

impl Run {
    /// `run --state-dir STATE --accel tcg --memory 256 ARGS...`, optionally inside a namespace.
    pub fn start(ns: Option<&Netns>, state: &Path, args: &[&str]) -> Run {
        Run::start_in(ns, state, args, &[])
    }

    /// The same, with extra environment.
    pub fn start_in(ns: Option<&Netns>, state: &Path, args: &[&str], env: &[(&str, &Path)]) -> Run {
        Run::start_full(ns, state, "256", args, env)
    }

    /// The same with `--memory MEMORY` (a guest that loads a large initrd needs more than 256 MiB).
    pub fn start_full(ns: Option<&Netns>, state: &Path, memory: &str, args: &[&str], env: &[(&str, &Path)]) -> Run {
        let mut cmd = Run::command(ns, state, memory, args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Run::spawn(cmd, state, &state.with_extension("stderr"))
    }

    /// The command line the starts above run, `run --state-dir STATE --accel tcg --memory MEMORY ARGS...`
    /// (inside `ns` when given): for a test that changes it (a umask, another stderr) before [`Run::spawn`],
    /// or runs a refused start to completion.
    pub fn command(ns: Option<&Netns>, state: &Path, memory: &str, args: &[&str]) -> Command {
        let mut cmd = match ns {
            Some(ns) => ns.cmd(BIN),
            None => Command::new(BIN),
        };
        cmd.args(["run", "--state-dir"]).arg(state).args(["--accel", "tcg", "--memory", memory]).args(args);
        cmd
    }

    /// Start `cmd` (from [`Run::command`]) for `state`, stdin and stdout null, its stderr in `log`.
    pub fn spawn(mut cmd: Command, state: &Path, log: &Path) -> Run {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap());
        let started = Instant::now();
        let child = cmd.spawn().expect("start ec-ipxe-qemu");
        Run { child: Some(child), state: state.to_owned(), log: log.to_owned(), status: None, started }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn serial(&self) -> String {
        serial(&self.state.join("serial.log"))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Wait for the launcher to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let child = self.child.as_mut()?;
        self.status = wait_for(timeout, || child.try_wait().ok().flatten());
        self.status
    }

    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Wait until the serial log contains `needle`; panic with the logs when it does not.
    pub fn wait_serial(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let s = self.serial();
            if s.contains(needle) {
                return s;
            }
            if start.elapsed() > timeout || !self.running() {
                panic!(
                    "serial log never showed {needle:?} (launcher running: {})\n--- serial ---\n{s}\n--- stderr ---\n{}",
                    self.running(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait until stderr contains `needle`; panic with the logs when it does not.
    /// Wait until `status --json` says ready (or the launcher ends): panics with the logs when it does not.
    pub fn wait_ready(&mut self, timeout: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if self.state.join("status.json").exists() {
                let (_, v) = self.status_json();
                if v["ready"] == true {
                    return v;
                }
            }
            if start.elapsed() > timeout || !self.running() {
                panic!(
                    "the guest was not ready (launcher running: {})\n--- stderr ---\n{}\n--- serial ---\n{}",
                    self.running(),
                    self.stderr(),
                    self.serial()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let s = self.stderr();
            if s.contains(needle) {
                return s;
            }
            if start.elapsed() > timeout || !self.running() {
                panic!(
                    "stderr never showed {needle:?} (running: {})\n--- stderr ---\n{s}\n--- serial ---\n{}",
                    self.running(),
                    self.serial()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until the launcher says QEMU started.
    pub fn wait_started(&mut self) {
        let ok = wait_for(Duration::from_secs(30), || self.stderr().contains("QEMU started").then_some(()));
        assert!(ok.is_some(), "QEMU did not start:\n{}", self.stderr());
    }

    /// `ec-ipxe-qemu status --state-dir STATE --json`: (exit code, JSON).
    pub fn status_json(&self) -> (Option<i32>, serde_json::Value) {
        let out = Command::new(BIN).args(["status", "-j", "--state-dir"]).arg(&self.state).output().unwrap();
        let v = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), v)
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

/// A LAN test's world: the lab (host and LAN namespaces, dnsmasq), a macvtap made by ec-macvtap on the
/// lab's uplink (deleted again on drop, before the lab goes), and a state dir. None (after the skip-or-fail
/// rule) when the test cannot run here.
pub struct LanGuest {
    pub lab: Lab,
    pub name: String,
    pub mac: String,
    pub node: String,
    pub state: PathBuf,
    pub tmp: tempfile::TempDir,
}

impl LanGuest {
    pub fn new(test: &str) -> Option<LanGuest> {
        LanGuest::with_create_args(test, &[])
    }

    /// The same, with more `ec-macvtap create` arguments (e.g. `--owner nobody`).
    pub fn with_create_args(test: &str, extra: &[&str]) -> Option<LanGuest> {
        require_root(test);
        if !require_qemu(test) || !require_programs(test, &["dnsmasq", "ip"]) {
            return None;
        }
        let lab = Lab::new();
        let name = unique("lv");
        let mut args = vec!["--json", "create", "--link", &lab.uplink, "--name", &name];
        args.extend_from_slice(extra);
        let out = macvtap(Some(&lab.host), &args);
        assert!(out.status.success(), "ec-macvtap create: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        Some(LanGuest {
            mac: v["mac"].as_str().unwrap().to_owned(),
            node: v["tap_device"].as_str().unwrap().to_owned(),
            state: tmp.path().join("state"),
            name,
            lab,
            tmp,
        })
    }

    /// `ec-ipxe-qemu run` in the host namespace with the LAN NIC on the macvtap.
    pub fn run(&self) -> Run {
        Run::start(Some(&self.lab.host), &self.state, &["--no-disk", "--lan-interface", &self.name])
    }
}

impl Drop for LanGuest {
    fn drop(&mut self) {
        let _ = macvtap(Some(&self.lab.host), &["-q", "delete", &self.name]);
    }
}

/// The launcher exited in time with `code`; otherwise fail with its stderr.
pub fn assert_exit(status: Option<ExitStatus>, code: i32, run: &Run) {
    let Some(s) = status else { panic!("ec-ipxe-qemu did not exit in time\n{}", run.stderr()) };
    assert_eq!(s.code(), Some(code), "exit {s:?} (signal {:?})\n{}", s.signal(), run.stderr());
}
