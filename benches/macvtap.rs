//! Benchmark: macvtap lifecycle cost of `ec-macvtap` against the shell glue and the kernel's own floor.
//!
//! In a throwaway network namespace with a veth parent, N cycles of:
//! - ours:      `ec-macvtap create` + open the tap (verified, as the launcher does) + `ec-macvtap delete`;
//! - ours, no open: the same without the tap open (what the references do);
//! - (a) shell: `ip link add ... type macvtap`, `ip link set X allmulticast on`, `ip link set X up`, `ip link del X`
//!   as four processes;
//! - (b) batch: the same four operations in one `ip -batch` process per cycle (the kernel's floor plus one
//!   process start), and all cycles in a single `ip -batch` (the bare kernel floor).
//!
//! With 1,000 macvtaps in a namespace against a namespace with none: `show NAME`, `create` (the delete that
//! follows is not timed) and `show` (all) against `ip -j -d link show type macvtap`.
//!
//! Also measured: variants of the delete path (down before delete, IPv6 off) and the cost of closing a tap
//! fd, and the peak RSS of one `ec-macvtap create`. Run as root: `cargo bench --bench macvtap`
//! (`EC_BENCH_CYCLES` sets N, default 50; `EC_BENCH_ONLY=1000` runs only the 1,000-link rows). It prints mean figures; it asserts nothing about time.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:be:9c:01";

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn must(cmd: &mut Command) {
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().expect("spawn");
    if !out.status.success() {
        panic!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn ip(ns: &str, args: &[&str]) {
    must(Command::new("ip").args(["-n", ns]).args(args));
}

fn batch(ns: &str, script: &str) {
    let mut child =
        Command::new("ip").args(["-n", ns, "-batch", "-"]).stdin(Stdio::piped()).spawn().expect("ip -batch");
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write batch");
    assert!(child.wait().expect("wait").success(), "ip -batch failed");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One warm-up cycle of each variant, then n rounds that run one cycle of every variant in turn, so drift in
/// the machine's load hits all of them alike. Returns the mean per variant. (Not the median: link deletion
/// waits for RCU grace periods, which end on timer ticks, so single cycles cluster on a few values and a
/// median jumps between them.)
fn time_interleaved(n: usize, variants: &mut [Box<dyn FnMut() + '_>]) -> Vec<Duration> {
    for v in variants.iter_mut() {
        v();
    }
    let mut total = vec![Duration::ZERO; variants.len()];
    for _ in 0..n {
        for (v, t) in variants.iter_mut().zip(total.iter_mut()) {
            // Let the previous cycle's deferred kernel work (RCU callbacks) drain, so no variant pays for
            // another's.
            std::thread::sleep(Duration::from_millis(50));
            let start = Instant::now();
            v();
            *t += start.elapsed();
        }
    }
    total.into_iter().map(|t| t / n as u32).collect()
}

fn cycle_script(name: &str, parent: &str, extra: &[&str]) -> String {
    let mut s = format!(
        "link add link {parent} name {name} address {MAC} type macvtap mode bridge\nlink set {name} allmulticast on\nlink set {name} up\n"
    );
    for e in extra {
        s.push_str(e);
        s.push('\n');
    }
    s.push_str(&format!("link del {name}\n"));
    s
}

/// A namespace with a veth parent `bup0` (and `bup1`) at high indexes, and `extra` macvtaps on `bup1`.
fn lab_ns(tag: &str, extra: u32) -> Ns {
    let ns = Ns(format!("ecb{tag}{}", std::process::id()));
    must(Command::new("ip").args(["netns", "add", &ns.0]));
    ip(
        &ns.0,
        &["link", "add", "name", "bup0", "index", "900001", "type", "veth", "peer", "name", "bup1", "index", "900002"],
    );
    ip(&ns.0, &["link", "set", "bup0", "up"]);
    ip(&ns.0, &["link", "set", "bup1", "up"]);
    let script: String = (0..extra)
        .map(|i| format!("link add link bup1 name k{i} index {} type macvtap mode bridge\n", 910_000 + i))
        .collect();
    if extra > 0 {
        batch(&ns.0, &script);
    }
    ns
}

/// The cost of `show NAME`, `create` and `show` with 1,000 links, against none (means of n interleaved runs).
fn thousand_links(bin: &str, n: usize) {
    let empty = lab_ns("e", 0);
    let full = lab_ns("f", 1000);
    let run = |ns: &Ns, args: &[&str]| must(Command::new(bin).args(["-q", "--netns", &ns.0]).args(args));
    for ns in [&empty, &full] {
        run(ns, &["create", "--link", "bup0", "--name", "shown0"]);
    }
    let timed = |f: &mut dyn FnMut()| {
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        f();
        t.elapsed()
    };
    let mut total = [Duration::ZERO; 7];
    for _ in 0..n {
        let mut i = 0;
        for ns in [&empty, &full] {
            total[i] += timed(&mut || run(ns, &["--json", "show", "shown0"]));
            total[i + 1] += timed(&mut || run(ns, &["create", "--link", "bup0", "--name", "made0"]));
            run(ns, &["delete", "made0"]);
            total[i + 2] += timed(&mut || run(ns, &["--json", "show"]));
            i += 3;
        }
        total[6] += timed(&mut || {
            must(Command::new("ip").args(["-n", &full.0, "-j", "-d", "link", "show", "type", "macvtap"]))
        });
    }
    // Deleting the namespace would take the link but not a private node ec-macvtap made for it.
    for ns in [&empty, &full] {
        run(ns, &["delete", "shown0"]);
    }
    let m: Vec<f64> = total.iter().map(|t| ms(*t / n as u32)).collect();
    println!("with 1,000 macvtaps in the namespace (mean of {n}, against an empty namespace):");
    println!("  show NAME   {:7.2} ms  vs {:7.2} ms   ratio {:5.2}  (target <= 1.5)", m[3], m[0], m[3] / m[0]);
    println!("  create      {:7.2} ms  vs {:7.2} ms   ratio {:5.2}  (target <= 1.5)", m[4], m[1], m[4] / m[1]);
    println!("  show (all)  {:7.2} ms  (empty: {:.2} ms); ip -j -d link show type macvtap {:.2} ms", m[5], m[2], m[6]);
    println!("  show / ip   {:5.2}  (target <= 1.5, and show <= 50 ms)", m[5] / m[6]);
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("SKIP macvtap bench: needs root (network namespaces, macvtap)");
        return;
    }
    let n: usize = std::env::var("EC_BENCH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let bin = env!("CARGO_BIN_EXE_ec-macvtap");
    if std::env::var("EC_BENCH_ONLY").is_ok_and(|v| v == "1000") {
        thousand_links(bin, n);
        return;
    }
    let ns = Ns(format!("ecb{}", std::process::id()));
    must(Command::new("ip").args(["netns", "add", &ns.0]));
    ip(&ns.0, &["link", "add", "bup0", "type", "veth", "peer", "name", "bup1"]);
    ip(&ns.0, &["link", "set", "bup0", "up"]);
    ip(&ns.0, &["link", "set", "bup1", "up"]);
    let name = "bmv0";
    let ours_create = || {
        must(Command::new(bin).args(["-q", "--netns", &ns.0, "create", "--link", "bup0", "--name", name, "--mac", MAC]))
    };
    let ours_delete = || must(Command::new(bin).args(["-q", "--netns", &ns.0, "delete", name]));

    // Peak RSS of one create (the only child waited for so far besides `ip`).
    ours_create();
    let ru = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let peak_kib = ru.max_rss();
    ours_delete();

    let spec: ec_ipxe_qemu::netns::NetnsSpec = ns.0.parse().expect("netns");
    let ifname: ec_ipxe_qemu::names::IfName = name.parse().expect("name");

    let script = cycle_script(name, "bup0", &[]);
    let mut variants: Vec<Box<dyn FnMut() + '_>> = vec![
        Box::new(|| {
            ours_create();
            let opened = ec_ipxe_qemu::macvtap::open(Some(&spec), &ifname, 1).expect("open tap");
            drop(opened);
            ours_delete();
        }),
        Box::new(|| {
            ours_create();
            ours_delete();
        }),
        Box::new(|| {
            ip(
                &ns.0,
                &["link", "add", "link", "bup0", "name", name, "address", MAC, "type", "macvtap", "mode", "bridge"],
            );
            ip(&ns.0, &["link", "set", name, "allmulticast", "on"]);
            ip(&ns.0, &["link", "set", name, "up"]);
            ip(&ns.0, &["link", "del", name]);
        }),
        Box::new(|| batch(&ns.0, &script)),
    ];
    let means = time_interleaved(n, &mut variants);
    drop(variants);
    let [ours, ours_no_open, shell, batch_per_cycle] = means[..] else { unreachable!("four variants") };
    let floor = |extra: &[&str]| {
        let one = cycle_script(name, "bup0", extra);
        let all: String = std::iter::repeat_n(one.as_str(), n).collect();
        let t = Instant::now();
        batch(&ns.0, &all);
        t.elapsed() / n as u32
    };
    let kernel_floor = floor(&[]);
    let down_first = floor(&[&format!("link set {name} down")]);
    let addrgen_none = floor(&[&format!("link set {name} addrgenmode none")]);
    // The cost of closing a tap queue: the kernel waits for an RCU grace period in tap release.
    ours_create();
    let close_cost = median(
        (0..n)
            .map(|_| {
                let opened = ec_ipxe_qemu::macvtap::open(Some(&spec), &ifname, 1).expect("open tap");
                let t = Instant::now();
                drop(opened);
                t.elapsed()
            })
            .collect(),
    );
    ours_delete();

    println!("ec-macvtap lifecycle benchmark: {n} cycles each, mean per cycle");
    println!("  ours   create + tap open + delete       {:7.2} ms", ms(ours));
    println!("  ours   create + delete (no tap open)    {:7.2} ms", ms(ours_no_open));
    println!("  (a)    shell glue, 4 ip processes       {:7.2} ms", ms(shell));
    println!("  (b)    one ip -batch process per cycle  {:7.2} ms", ms(batch_per_cycle));
    println!("  floor  all cycles in one ip -batch      {:7.2} ms", ms(kernel_floor));
    println!("ratios (no tap open, like the references):");
    println!("  ours / (b)     {:5.2}   (target <= 1.15)", ms(ours_no_open) / ms(batch_per_cycle));
    println!("  ours / (a)     {:5.2}   (target <= 0.80)", ms(ours_no_open) / ms(shell));
    println!("  ours / floor   {:5.2}", ms(ours_no_open) / ms(kernel_floor));
    println!("ratios (with the tap open):");
    println!("  ours / (b)     {:5.2}", ms(ours) / ms(batch_per_cycle));
    println!("  ours / (a)     {:5.2}", ms(ours) / ms(shell));
    println!("delete path variants (single ip -batch, per cycle):");
    println!("  plain delete of an up link              {:7.2} ms", ms(kernel_floor));
    println!("  down first, then delete                 {:7.2} ms", ms(down_first));
    println!("  addrgenmode none before delete          {:7.2} ms", ms(addrgen_none));
    println!("  closing one tap fd                      {:7.2} ms", ms(close_cost));
    println!("peak RSS of one `ec-macvtap create`: {:.2} MiB (target <= 8 MiB)", peak_kib as f64 / 1024.0);
    drop(ns);
    thousand_links(bin, n.min(20));
}
