//! Benchmark: the boot timeline, from start to the guest's LAN lease, of bare QEMU against the launcher.
//!
//! In the lab of the end-to-end tests (a "host" namespace whose veth uplink leads to a "LAN" namespace running
//! a real dnsmasq, a macvtap made by `ec-macvtap` on the uplink), one run of each variant does the same guest
//! work: DHCP on the boot NIC (user-mode network), fetch a chain script over HTTP from a loopback server,
//! and that script DHCPs on the LAN NIC (standing in for the operating system the chain would start):
//!
//! - `bare`: plain QEMU whose virtio NIC option ROM (iPXE) autoboots with `bootfile=` the chain URL (the
//!   LAN NIC gets the macvtap's fd through `ec-macvtap exec`, `romfile=` empty);
//! - `default`: `ec-ipxe-qemu run --boot-url URL --lan-interface NAME` (the NIC option ROM path);
//! - `ipxe`: the same with `--ipxe /usr/lib/ipxe/ipxe.lkrn`;
//! - `bare-lkrn` (reference): plain QEMU booting `ipxe.lkrn` with a short script (`dhcp net0`, print the
//!   address, `chain URL`) as its initrd.
//!
//! Stages, in seconds from the spawn of the variant's first process, taken from the serial console (polled
//! every few milliseconds) and dnsmasq's log: `firmware` (SeaBIOS prints), `ipxe` (iPXE has initialised its
//! devices), `address` (10.0.2.15 on the console: the boot NIC has its address), `chain` (the chain script
//! runs), `lease` (dnsmasq sends the DHCPACK for the macvtap's MAC).
//!
//! Then, one run each, the real Linux guest (scripts/build-test-guest.sh) in the lab with the tuner emulator:
//! start → chain → kernel → ready at the default log level, `loglevel=4` and `quiet`, and the SIGTERM → exit
//! time; and the download of a 256 MiB initrd (iPXE's `initrd.img...` to its `ok`) through the launcher's
//! `--boot-dir` server against bare QEMU fetching the same directory from `python3 -m http.server`.
//!
//! Every variant runs with `--accel tcg` (KVM fails on the development hosts), 256 MiB, no disk. The runs are
//! interleaved (run 1 of every variant, then run 2, ...) so that load from other processes hits all alike;
//! the load average before and after is printed. `EC_BENCH_RUNS` sets the number of runs (default 5);
//! `EC_BENCH_BEFORE=PATH` adds the launcher variants again with another `ec-ipxe-qemu` binary (e.g. one built
//! from an older commit), so that before and after come from the same run. Run as root:
//! `cargo bench --bench boot`. It prints figures; it asserts nothing about time.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

#[path = "boot/cache.rs"]
mod cache;
#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::http::{read_request_line, respond};
use common::in_netns;
use common::{Lab, macvtap, unique};

const LAUNCHER: &str = env!("CARGO_BIN_EXE_ec-ipxe-qemu");
const LKRN: &str = "/usr/lib/ipxe/ipxe.lkrn";
const QEMU: &str = "qemu-system-x86_64";
const MEMORY: &str = "256";
const CPUS: &str = "2";
/// The chain script's first line: the chain target was fetched and runs.
const CHAINED: &str = "BENCH-CHAINED";
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(4);

const STAGES: [&str; 5] = ["firmware", "ipxe", "address", "chain", "lease"];
/// What marks each serial stage (the lease comes from dnsmasq).
const NEEDLES: [&str; 4] = ["SeaBIOS", "initialising devices...ok", "10.0.2.15", CHAINED];

/// An HTTP server on 127.0.0.1 inside a network namespace (where slirp's 10.0.2.2 leads), serving one body
/// at every path, one request per connection.
struct ChainServer {
    port: u16,
    netns: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChainServer {
    fn start(netns: &str, body: String) -> ChainServer {
        let netns = format!("/run/netns/{netns}");
        let listener = in_netns(&netns, || TcpListener::bind("127.0.0.1:0").expect("bind chain server"));
        let port = listener.local_addr().expect("local addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut s) = conn else { continue };
                read_request_line(&mut s);
                respond(&mut s, 200, &body);
                let _ = s.shutdown(Shutdown::Both);
            }
        });
        ChainServer { port, netns, stop, thread: Some(thread) }
    }
}

impl Drop for ChainServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept with a connection from inside its namespace.
        let port = self.port;
        let _ = in_netns(&self.netns, move || TcpStream::connect(("127.0.0.1", port)).map(drop));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bare,
    BareLkrn,
    Default,
    Ipxe,
}

struct Variant {
    label: String,
    kind: Kind,
    /// The launcher binary for the launcher variants.
    launcher: Option<PathBuf>,
}

struct World {
    lab: Lab,
    name: String,
    mac: String,
    url: String,
    dir: PathBuf,
}

impl World {
    fn command(&self, v: &Variant, serial: &Path, state: &Path) -> Command {
        let mut c = self.lab.host.cmd(match v.kind {
            Kind::Bare | Kind::BareLkrn => common::macvtap_bin(),
            Kind::Default | Kind::Ipxe => v.launcher.as_deref().and_then(Path::to_str).unwrap_or(LAUNCHER),
        });
        match v.kind {
            Kind::Bare | Kind::BareLkrn => {
                c.args(["exec", "--name", &self.name, "--", QEMU, "-nodefaults", "-display", "none"]);
                // graphics=off sends the BIOS (and so iPXE's) console to the serial port, where it is timed.
                c.args(["-machine", "pc,graphics=off", "-accel", "tcg", "-m", MEMORY, "-smp", CPUS]);
                c.arg("-serial").arg(format!("file:{}", serial.display()));
                let lan_dev = format!("virtio-net-pci,netdev=lan,mac={},romfile=,addr=0x4", self.mac);
                if v.kind == Kind::Bare {
                    c.args(["-netdev", &format!("user,id=boot,bootfile={}", self.url)]);
                    c.args(["-device", "virtio-net-pci,netdev=boot,addr=0x3"]);
                    c.args(["-netdev", "tap,id=lan,fd={fd}", "-device", &lan_dev, "-boot", "n"]);
                } else {
                    let script = self.dir.join("bare-lkrn.ipxe");
                    c.args(["-netdev", "user,id=boot", "-device", "virtio-net-pci,netdev=boot,addr=0x3,romfile="]);
                    c.args(["-netdev", "tap,id=lan,fd={fd}", "-device", &lan_dev]);
                    c.args(["-kernel", LKRN, "-initrd"]).arg(script);
                }
            }
            Kind::Default | Kind::Ipxe => {
                c.args(["-q", "run", "--state-dir"]).arg(state);
                c.args(["--accel", "tcg", "--memory", MEMORY, "--cpus", CPUS, "--no-disk"]);
                c.args(["--lan-interface", &self.name, "--boot-url", &self.url, "--shutdown-timeout", "0"]);
                if v.kind == Kind::Ipxe {
                    c.args(["--ipxe", LKRN]);
                }
            }
        }
        c.stdin(Stdio::null()).stdout(Stdio::null());
        c
    }
}

/// Seconds from spawn to each stage; None when the stage was not seen.
type Timeline = [Option<f64>; 5];

fn read_new(path: &Path, offset: &mut u64, into: &mut String) {
    let Ok(mut f) = std::fs::File::open(path) else { return };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if let Ok(n) = f.read_to_end(&mut buf) {
        *offset += n as u64;
        into.push_str(&String::from_utf8_lossy(&buf));
    }
}

fn stop(mut child: Child, kind: Kind) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // The launcher stops its QEMU in order (--shutdown-timeout 0: quit at once); bare QEMU just goes.
    let sig = match kind {
        Kind::Default | Kind::Ipxe => nix::sys::signal::Signal::SIGTERM,
        Kind::Bare | Kind::BareLkrn => nix::sys::signal::Signal::SIGKILL,
    };
    let _ = nix::sys::signal::kill(pid, sig);
    if common::wait_for(Duration::from_secs(15), || child.try_wait().ok().flatten()).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn run_once(w: &World, v: &Variant, n: usize) -> Timeline {
    let state = w.dir.join(format!("state-{}", unique("s")));
    let serial = match v.kind {
        Kind::Default | Kind::Ipxe => state.join("serial.log"),
        Kind::Bare | Kind::BareLkrn => w.dir.join(format!("serial-{}.log", unique("b"))),
    };
    let stderr_path = w.dir.join("variant.stderr");
    let mut log_offset = std::fs::metadata(&w.lab.dhcp_log).map(|m| m.len()).unwrap_or(0);
    let mut cmd = w.command(v, &serial, &state);
    cmd.stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
    let t0 = Instant::now();
    let child = cmd.spawn().expect("spawn variant");
    let mut times: Timeline = [None; 5];
    let (mut console, mut serial_offset, mut dhcp) = (String::new(), 0u64, String::new());
    let ack = "DHCPACK(";
    while t0.elapsed() < RUN_TIMEOUT && times[4].is_none() {
        let now = t0.elapsed().as_secs_f64();
        read_new(&serial, &mut serial_offset, &mut console);
        for (i, needle) in NEEDLES.iter().enumerate() {
            if times[i].is_none() && console.contains(needle) {
                times[i] = Some(now);
            }
        }
        read_new(&w.lab.dhcp_log, &mut log_offset, &mut dhcp);
        if dhcp.lines().any(|l| l.contains(ack) && l.to_lowercase().contains(&w.mac)) {
            times[4] = Some(now);
        }
        std::thread::sleep(POLL);
    }
    stop(child, v.kind);
    if times.iter().any(Option::is_none) {
        let console = console.replace('\r', "");
        let tail: Vec<&str> = console.lines().rev().take(12).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        eprintln!(
            "  {} run {n}: stage(s) {} not seen; console ends:\n{}\n  stderr:\n{}",
            v.label,
            STAGES.iter().zip(times).filter(|(_, t)| t.is_none()).map(|(s, _)| *s).collect::<Vec<_>>().join(", "),
            tail.join("\n"),
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(&serial);
    times
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

fn min(v: &[f64]) -> Option<f64> {
    v.iter().copied().min_by(|a, b| a.total_cmp(b))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// QEMU processes on the machine (other engineers' guests share the two cores).
fn qemu_count() -> usize {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).next().is_some_and(|a| a.ends_with(b"qemu-system-x86_64")))
        })
        .count()
}

fn cell(x: Option<f64>) -> String {
    x.map_or_else(|| format!("{:>7}", "-"), |x| format!("{x:7.2}"))
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("SKIP boot bench: needs root (network namespaces, macvtap, dnsmasq)");
        return;
    }
    for p in [QEMU, "dnsmasq", "ip", LKRN] {
        if common::which(p).is_none() {
            println!("SKIP boot bench: needs {p}");
            return;
        }
    }
    let runs: usize = std::env::var("EC_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1);
    if std::env::var("EC_BENCH_ONLY").is_ok_and(|v| v == "cache") {
        cache::boot_cache_bench(runs);
        return;
    }
    let before = std::env::var_os("EC_BENCH_BEFORE").map(PathBuf::from);

    let lab = Lab::new();
    let name = unique("bv");
    let out = macvtap(Some(&lab.host), &["--json", "create", "--link", &lab.uplink, "--name", &name]);
    assert!(out.status.success(), "ec-macvtap create: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("create JSON");
    let mac = v["mac"].as_str().expect("mac").to_lowercase();
    let server = ChainServer::start(
        &lab.host.name,
        format!("#!ipxe\necho {CHAINED}\n:lan\ndhcp net1 || goto lan\necho BENCH-LAN ${{net1/ip}}\nsleep 3600\n"),
    );
    let url = format!("http://10.0.2.2:{}/chain.ipxe", server.port);
    let tmp = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        tmp.path().join("bare-lkrn.ipxe"),
        format!("#!ipxe\ndhcp net0\necho net0 ${{net0/ip}}\nchain {url}\n"),
    )
    .expect("script");
    let world = World { lab, name, mac, url, dir: tmp.path().to_owned() };

    let mut variants = vec![
        Variant { label: "bare QEMU, NIC ROM + HTTP bootfile".into(), kind: Kind::Bare, launcher: None },
        Variant { label: "launcher, default (NIC ROM)".into(), kind: Kind::Default, launcher: None },
        Variant { label: "launcher, --ipxe ipxe.lkrn".into(), kind: Kind::Ipxe, launcher: None },
        Variant { label: "bare QEMU, ipxe.lkrn + initrd (ref.)".into(), kind: Kind::BareLkrn, launcher: None },
    ];
    if let Some(b) = &before {
        variants.push(Variant {
            label: "BEFORE launcher, default".into(),
            kind: Kind::Default,
            launcher: Some(b.clone()),
        });
        variants.push(Variant { label: "BEFORE launcher, --ipxe".into(), kind: Kind::Ipxe, launcher: Some(b.clone()) });
    }

    println!(
        "ec-ipxe-qemu boot timeline: {runs} run(s) per variant, interleaved; TCG, {MEMORY} MiB, {CPUS} CPUs, no disk"
    );
    println!("load average before: {}; QEMU processes already running: {}", loadavg(), qemu_count());
    let mut results: Vec<Vec<Timeline>> = vec![Vec::new(); variants.len()];
    for n in 0..runs {
        // Rotate the order so no variant always runs first after a pause.
        for k in 0..variants.len() {
            let i = (k + n) % variants.len();
            let t = run_once(&world, &variants[i], n + 1);
            results[i].push(t);
            let _ = std::io::stdout().flush();
        }
    }
    println!("load average after:  {}; QEMU processes still running: {}", loadavg(), qemu_count());

    let stage_values = |i: usize, s: usize| -> Vec<f64> { results[i].iter().filter_map(|t| t[s]).collect() };
    let bare_median: Vec<Option<f64>> = (0..STAGES.len()).map(|s| median(stage_values(0, s))).collect();
    println!();
    println!("seconds from start (median / min over {runs} runs); ratio = median ÷ bare QEMU's median");
    print!("{:<38}", "variant");
    for s in STAGES {
        print!(" {s:>15}");
    }
    println!("   lease ratio");
    for (i, v) in variants.iter().enumerate() {
        print!("{:<38}", v.label);
        for s in 0..STAGES.len() {
            let vals = stage_values(i, s);
            print!(" {}/{}", cell(median(vals.clone())), cell(min(&vals)));
        }
        let ratio = match (median(stage_values(i, 4)), bare_median[4]) {
            (Some(a), Some(b)) => format!("{:.2}×", a / b),
            _ => "-".into(),
        };
        println!("   {ratio}");
    }
    println!();
    println!("ratio to bare QEMU per stage (medians)");
    for (i, v) in variants.iter().enumerate() {
        print!("{:<38}", v.label);
        for (s, b) in bare_median.iter().enumerate() {
            match (median(stage_values(i, s)), b) {
                (Some(a), Some(b)) if *b > 0.0 => print!(" {:>15}", format!("{:.2}×", a / b)),
                _ => print!(" {:>15}", "-"),
            }
        }
        println!();
    }
    let missing: usize = results.iter().flatten().filter(|t| t.iter().any(Option::is_none)).count();
    if missing > 0 {
        println!("\n{missing} run(s) missed a stage (see stderr)");
    }
    let _ = macvtap(Some(&world.lab.host), &["-q", "delete", &world.name]);
    drop(server);
    drop(world);
    real_guest();
    cache::boot_cache_bench(runs);
}

// ---------------------------------------------------------------------------------------------------------
// The real Linux guest (scripts/build-test-guest.sh): its boot timeline under the launcher, and the download
// rate of a large initrd through `--boot-dir` against bare QEMU fetching from `python3 -m http.server`.

/// Size of the initrd of the download-rate comparison (the guest's initrd padded with zeros).
const BIG_INITRD: u64 = 256 << 20;

fn real_guest() {
    println!();
    let guest = match common::guest::test_guest_dir() {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP real guest: {e}");
            return;
        }
    };
    println!("real Linux guest ({}), one run each, TCG", guest.display());
    real_guest_timeline("");
    real_guest_timeline("loglevel=4");
    real_guest_timeline("quiet");
    download_rates(&guest);
}

/// One boot of the real guest in the lab (dnsmasq, tuner emulator, macvtap): its stages and the stop time.
fn real_guest_timeline(cmdline: &str) {
    let t = "boot bench (real guest)";
    let Some(g) = common::guest::GuestLab::new(t) else { return };
    let mut run = g.run(cmdline, None, &["--ready-timeout", "600"]);
    let ready = common::wait_for(Duration::from_secs(400), || {
        let (_, v) = run.status_json();
        (v["ready"] == true).then_some(())
    });
    let st = common::guest::stages(&run.stderr());
    let at = |n| common::guest::stage_at(&st, n).map_or("-".to_owned(), |s| format!("{s:.1} s"));
    let label = if cmdline.is_empty() { "default log level" } else { cmdline };
    if ready.is_none() {
        println!("  [{label}] not ready within 400 s; stages {st:?}");
        return;
    }
    let asked = Instant::now();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let stopped = run.wait(Duration::from_secs(120));
    println!(
        "  [{label:<17}] start->chain {}, start->kernel {}, start->ready {}; SIGTERM->exit {:.2} s ({:?})",
        at("chain"),
        at("kernel"),
        at("ready"),
        asked.elapsed().as_secs_f64(),
        stopped.and_then(|s| s.code())
    );
}

/// Seconds from iPXE's `initrd.img...` to its `ok` on the serial console at `serial` (polled), or None.
fn time_download(serial: &Path, timeout: Duration, alive: &mut dyn FnMut() -> bool) -> Option<f64> {
    let (mut console, mut offset) = (String::new(), 0u64);
    let t0 = Instant::now();
    let mut started = None;
    while t0.elapsed() < timeout && alive() {
        read_new(serial, &mut offset, &mut console);
        let Some(i) = console.find("initrd.img...") else {
            std::thread::sleep(POLL);
            continue;
        };
        let began = *started.get_or_insert_with(Instant::now);
        let rest = &console[i..];
        if let Some(end) = rest.find('\n') {
            return rest[..end].contains("ok").then(|| began.elapsed().as_secs_f64());
        }
        std::thread::sleep(POLL);
    }
    None
}

fn rate(secs: Option<f64>) -> String {
    secs.map_or("failed".to_owned(), |s| format!("{s:.2} s, {:.1} MB/s", BIG_INITRD as f64 / s / 1e6))
}

/// A 256 MiB initrd through the launcher's `--boot-dir` server against bare QEMU (NIC ROM, `bootfile=`) and
/// `python3 -m http.server` serving the same directory.
fn download_rates(guest: &Path) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let www = tmp.path().join("www");
    common::guest::write_boot_dir(&www, guest, "quiet", Some(BIG_INITRD));
    let memory = "1024";

    // The launcher, serving www itself.
    let state = tmp.path().join("state");
    let mut run = common::launcher::Run::start_full(
        None,
        &state,
        memory,
        &["--no-disk", "--boot-dir", www.to_str().expect("path"), "--shutdown-timeout", "0"],
        &[],
    );
    let launcher = time_download(&state.join("serial.log"), Duration::from_secs(300), &mut || run.running());
    let summary = run.stderr().lines().find(|l| l.contains("downloaded initrd.img")).map(str::to_owned);
    drop(run);

    // Bare QEMU and python3 -m http.server.
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let server = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string()])
        .current_dir(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(server) = server else {
        println!("  SKIP bare QEMU download: python3 did not start");
        return;
    };
    let _server = common::KillOnDrop(server);
    let up = common::wait_for(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).ok());
    if up.is_none() {
        println!("  SKIP bare QEMU download: python3 -m http.server did not listen");
        return;
    }
    let serial = tmp.path().join("bare-serial.log");
    let bare = Command::new(QEMU)
        .args(["-nodefaults", "-display", "none", "-machine", "pc,graphics=off", "-accel", "tcg", "-m", memory])
        .args(["-smp", CPUS, "-serial"])
        .arg(format!("file:{}", serial.display()))
        .args(["-netdev", &format!("user,id=boot,bootfile=http://10.0.2.2:{port}/netboot.ipxe")])
        .args(["-device", "virtio-net-pci,netdev=boot,addr=0x3", "-boot", "n"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn QEMU");
    let mut bare = common::KillOnDrop(bare);
    let bare_secs =
        time_download(&serial, Duration::from_secs(300), &mut || bare.0.try_wait().ok().flatten().is_none());
    drop(bare);

    println!("  download of a {} MiB initrd (iPXE's `initrd.img...` to `ok`):", BIG_INITRD >> 20);
    println!("    launcher --boot-dir:               {}", rate(launcher));
    println!("    bare QEMU + python3 -m http.server: {}", rate(bare_secs));
    if let (Some(a), Some(b)) = (launcher, bare_secs) {
        println!("    launcher rate ÷ bare rate: {:.2}×", b / a);
    }
    if let Some(s) = summary {
        println!("    the launcher's own line: {}", s.split_once(" INFO ").map_or(s.as_str(), |(_, m)| m));
    }
}
