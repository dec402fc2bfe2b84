//! Shared fixtures for the privileged and end-to-end tests: requirement checks that skip with a reason
//! (and fail under `CI=true`), network namespaces and veth pairs that always clean up, a LAN lab with a real
//! dnsmasq, and helpers to read the kernel's own view with `ip -j`.
#![allow(dead_code)]

pub mod guest;
pub mod http;
pub mod launcher;
pub mod origin;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skip (print why, return false) or, under CI=true, fail.
pub fn skip_or_fail(test: &str, why: &str) -> bool {
    if in_ci() {
        panic!("{test}: cannot run: {why} (CI=true, so this is a failure, not a skip)");
    }
    eprintln!("SKIP {test}: {why}");
    false
}

/// Root-only tests are `#[ignore = "needs root"]` (a plain `cargo test` lists them as ignored, `make test` runs
/// them with `--include-ignored`); run without root anyway, they fail here instead of passing.
pub fn require_root(test: &str) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "{test}: needs root (network namespaces, macvtap); run it as root with --include-ignored"
    );
}

/// True when every program is on PATH or an existing path; otherwise skip (or fail under CI=true).
pub fn require_programs(test: &str, programs: &[&str]) -> bool {
    for p in programs {
        if which(p).is_none() {
            return skip_or_fail(test, &format!("needs {p} (install it; the README's test command does)"));
        }
    }
    true
}

pub fn which(p: &str) -> Option<PathBuf> {
    if p.contains('/') {
        return Path::new(p).exists().then(|| PathBuf::from(p));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':').chain(["/usr/sbin", "/sbin"]).map(|d| Path::new(d).join(p)).find(|c| c.is_file())
}

/// A random ifindex in 100000..1100000, for links a test creates with `ip link add ... index N`: `/dev/tapN`
/// is machine-wide, so a test's own macvtaps must not take the low numbers other namespaces use.
pub fn random_index() -> u32 {
    let mut b = [0u8; 4];
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).expect("read /dev/urandom");
    100_000 + u32::from_le_bytes(b) % 1_000_000
}

/// A unique short name (interface names are at most 15 bytes): prefix + pid + counter, base 36.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let id = (std::process::id() as u64) * 1000 + n as u64;
    let s = format!("{prefix}{}", radix36(id));
    assert!(s.len() <= 15, "{s} is too long for an interface name");
    s
}

fn radix36(mut n: u64) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap()
}

pub fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

/// The JSON a successful command printed on stdout; a failure shows its exit code and both streams.
pub fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run and require success.
pub fn sh(args: &[&str]) -> String {
    let out = run(Command::new(args[0]).args(&args[1..]));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop even when the test fails.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NS ...`, must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// `ip -n NS -j -d link show dev NAME` as JSON; None when the link does not exist.
    pub fn link_json(&self, name: &str) -> Option<serde_json::Value> {
        let out = run(Command::new("ip").args(["-n", &self.name, "-j", "-d", "link", "show", "dev", name]));
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().and_then(|a| a.first().cloned())
    }

    /// All links in the namespace as (name, kind, mac, alias), sorted: the "link table" that bad-input
    /// tests compare before and after.
    pub fn link_table(&self) -> Vec<(String, String, String, String)> {
        let out = self.ip(&["-j", "-d", "link", "show"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let s = |x: &serde_json::Value| x.as_str().unwrap_or("").to_owned();
        let mut rows: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (s(&l["ifname"]), s(&l["linkinfo"]["info_kind"]), s(&l["address"]), s(&l["ifalias"])))
            .collect();
        rows.sort();
        rows
    }

    /// A veth pair inside this namespace, both ends up; returns (a, b).
    pub fn veth(&self, a: &str, b: &str) -> (String, String) {
        self.ip(&["link", "add", "name", a, "type", "veth", "peer", "name", b]);
        self.ip(&["link", "set", a, "up"]);
        self.ip(&["link", "set", b, "up"]);
        (a.to_owned(), b.to_owned())
    }

    /// Run a program inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The verified lab: a "host" namespace with an uplink veth whose peer sits in a "LAN" namespace running
/// dnsmasq on 192.168.77.0/24. Everything goes away on drop.
pub struct Lab {
    pub host: Netns,
    pub lan: Netns,
    pub uplink: String,
    pub lanport: String,
    pub leases: PathBuf,
    pub dhcp_log: PathBuf,
    dnsmasq: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Self {
        Self::with_dnsmasq(Some(&[]))
    }

    /// The lab with dnsmasq given these extra arguments (e.g. `--no-ping`), or with no DHCP server at all
    /// (`None`).
    pub fn with_dnsmasq(extra: Option<&[&str]>) -> Self {
        let host = Netns::new("eh");
        let lan = Netns::new("el");
        let uplink = unique("up");
        let lanport = unique("lp");
        host.ip(&["link", "add", &uplink, "type", "veth", "peer", "name", &lanport, "netns", &lan.name]);
        host.ip(&["link", "set", &uplink, "up"]);
        lan.ip(&["link", "set", &lanport, "up"]);
        lan.ip(&["addr", "add", "192.168.77.1/24", "dev", &lanport]);
        let dir = tempfile::tempdir().unwrap();
        let leases = dir.path().join("dnsmasq.leases");
        let dhcp_log = dir.path().join("dnsmasq.log");
        let log = std::fs::File::create(&dhcp_log).unwrap();
        let Some(extra) = extra else {
            return Lab { host, lan, uplink, lanport, leases, dhcp_log, dnsmasq: None, _dir: dir };
        };
        let dnsmasq = which("dnsmasq").expect("dnsmasq on PATH");
        let child = lan
            .cmd(&dnsmasq.to_string_lossy())
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                &format!("--interface={lanport}"),
                "--bind-interfaces",
                "--port=0",
                "--dhcp-range=192.168.77.50,192.168.77.60,1h",
                &format!("--dhcp-leasefile={}", leases.display()),
                "--log-dhcp",
                "--log-facility=-",
                "--pid-file=",
                "--user=root",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dnsmasq");
        Lab { host, lan, uplink, lanport, leases, dhcp_log, dnsmasq: Some(child), _dir: dir }
    }

    /// The current leases as (mac, ip) pairs.
    pub fn leases(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(&self.leases)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3).then(|| (f[1].to_lowercase(), f[2].to_owned()))
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.dnsmasq.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Poll `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kill a child on drop (tests must not leave QEMU or servers behind).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn macvtap_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ec-macvtap")
}

/// `ec-macvtap ARGS...` (optionally `--netns NS`), returning the output.
pub fn macvtap(ns: Option<&Netns>, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(macvtap_bin());
    if let Some(ns) = ns {
        c.args(["--netns", &ns.name]);
    }
    c.args(args);
    run(&mut c)
}

/// Runs `ec-macvtap delete` on drop, so a failing test leaves no link and no private node behind.
/// Declare it after the namespace so it is dropped first.
pub struct DeleteOnDrop<'a> {
    pub ns: &'a Netns,
    pub name: String,
    pub runtime_dir: Option<PathBuf>,
}

impl<'a> DeleteOnDrop<'a> {
    pub fn new(ns: &'a Netns, name: &str) -> Self {
        DeleteOnDrop { ns, name: name.to_owned(), runtime_dir: None }
    }
}

impl Drop for DeleteOnDrop<'_> {
    fn drop(&mut self) {
        let mut c = Command::new(macvtap_bin());
        if let Some(d) = &self.runtime_dir {
            c.env("EC_MACVTAP_RUNTIME_DIR", d);
        }
        let _ = c.args(["-q", "--netns", &self.ns.name, "delete", &self.name]).output();
    }
}

/// Spawn `cmd` with its stdout a pipe that is closed at once (a reader that went away, like `| head -1`) and
/// wait for it: its output, stderr included.
pub fn with_stdout_closed(cmd: &mut Command) -> std::process::Output {
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

/// A stand-in guest: `ec-macvtap exec --name NAME -- sleep 60` in `ns`, a process holding a queue of the tap
/// as QEMU would; returns once it runs (`sleep`), killed on drop.
pub fn tap_holder(ns: &Netns, name: &str) -> KillOnDrop {
    let holder = Command::new(macvtap_bin())
        .args(["--netns", &ns.name, "exec", "--name", name, "--", "sleep", "60"])
        .spawn()
        .unwrap();
    let pid = holder.id();
    let holder = KillOnDrop(holder);
    let held = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().filter(|c| c.trim() == "sleep")
    });
    assert!(held.is_some(), "the holder did not start");
    holder
}

/// Run `f` on a thread inside the namespace at `path` (sockets it makes stay there).
pub fn in_netns<T: Send + 'static>(path: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_owned();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}
