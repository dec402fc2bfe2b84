//! The unit in its real habitat: a real systemd 252 as PID 1 of private namespaces (`tests/systemd/pid1.sh`,
//! after `../shared/systemd-lab.md`) runs the unit that the NixOS module renders with the real NixOS code
//! (`nix/tests/lab-unit.nix`), on a lab LAN (veth, real dnsmasq), with a real QEMU (TCG) and real iPXE. Only
//! the binaries, QEMU, iPXE and the lab's network namespace (`NetworkNamespacePath=`) are substituted.
//!
//! Each run: `systemctl start` → launcher and QEMU run as the static user with no capabilities and the guest
//! leases on the lab LAN through the macvtap; `systemctl stop` → no link, node or QEMU left; kill -9 of QEMU
//! → `Restart=` brings a new lease; three `systemctl restart`s are clean. Once with the machine's `/dev`
//! (public `/dev/tapN`), once with a container-like `/dev` without `/dev/tapN` (private node path). The
//! hand-written unit of docs/systemd.md ("the README unit") runs through the same harness. Figures (start →
//! lease, stop, kill → new lease) are printed and appended to `$CARGO_TARGET_TMPDIR/systemd-figures.txt`.
//!
//! One QEMU at a time: the tests take a lock. Everything (systemd, its cgroups, the namespaces, dnsmasq) is
//! removed by drop guards, also when a check fails.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Lab, require_programs, require_root, run, skip_or_fail, wait_for};

const LAUNCHER: &str = env!("CARGO_BIN_EXE_ec-ipxe-qemu");
const MACVTAP: &str = env!("CARGO_BIN_EXE_ec-macvtap");
const UNIT: &str = "every-channel-ipxe-qemu.service";
const SERVICE_USER: &str = "every-channel-ipxe-qemu";
const LINK: &str = "ec-lan0";
const BIN_DIR: &str = "/run/ec-lab/bin";
const LEASE_TIMEOUT: Duration = Duration::from_secs(120);
/// The module's default state directory (the lab unit keeps it).
const STATE_DIR: &str = "/var/lib/every-channel/ipxe-qemu";

static ONE_QEMU_AT_A_TIME: Mutex<()> = Mutex::new(());

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Programs the harness needs; under CI=true a missing one fails.
fn requirements(test: &str) -> bool {
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
fn module_unit(test: &str, uplink: &str) -> Option<String> {
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
        .args(["--argstr", "interface", uplink, "--argstr", "systemdVersion", &version])
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
fn readme_unit_text() -> String {
    let doc = std::fs::read_to_string(repo().join("docs/systemd.md")).unwrap();
    let start = doc.find("\n## The unit\n").expect("docs/systemd.md has a section \"The unit\"");
    let block = &doc[start..];
    let body = block.split("```ini\n").nth(1).expect("an ```ini block in docs/systemd.md's section \"The unit\"");
    body.split("\n```").next().unwrap().to_owned()
}

fn readme_unit(uplink: &str) -> String {
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

fn with_lab_netns(text: &str) -> String {
    assert!(text.contains("[Service]\n"));
    text.replacen("[Service]\n", "[Service]\nNetworkNamespacePath=/run/netns/lab-host\n", 1)
}

/// A free id in /etc/passwd and /etc/group (the service user is added to copies of them inside the lab).
fn free_id(files: &[&str]) -> u32 {
    let used: Vec<u32> = files
        .iter()
        .flat_map(|f| std::fs::read_to_string(f).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|l| l.split(':').nth(2).and_then(|n| n.parse().ok()))
        .collect();
    (61000..62000).find(|n| !used.contains(n)).unwrap()
}

fn group_id(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .and_then(|l| l.split(':').nth(2)?.parse().ok())
}

fn figure(name: &str, value: String) {
    let line = format!("systemd lab: {name}: {value}");
    eprintln!("{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("systemd-figures.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// A process of the unit, as seen from inside the lab.
#[derive(Debug)]
struct Proc {
    pid: u32,
    comm: String,
    status: String,
}

impl Proc {
    fn field(&self, name: &str) -> String {
        self.status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// systemd as PID 1 of private namespaces on a lab network, torn down on drop.
struct SystemdLab {
    lab: Lab,
    work: tempfile::TempDir,
    outer: Option<Child>,
    pid1: u32,
    uid: u32,
    dev: &'static str,
    /// Where ec-macvtap makes private tap nodes (the unit's EC_MACVTAP_RUNTIME_DIR, else its default).
    node_dir: String,
}

impl SystemdLab {
    fn start(dev: &'static str, unit: impl FnOnce(&str) -> Option<String>) -> Option<Self> {
        let lab = Lab::new();
        bump_ifindex(&lab);
        let unit = unit(&lab.uplink)?;
        let work = tempfile::Builder::new().prefix("ec-systemd-lab.").tempdir().unwrap();
        let w = work.path();
        std::fs::create_dir(w.join("units")).unwrap();
        std::fs::create_dir(w.join("bin")).unwrap();
        std::fs::copy(LAUNCHER, w.join("bin/ec-ipxe-qemu")).unwrap();
        std::fs::copy(MACVTAP, w.join("bin/ec-macvtap")).unwrap();
        std::fs::write(w.join("units").join(UNIT), &unit).unwrap();
        std::fs::write(
            w.join("units/ec-lab.target"),
            "[Unit]\nDescription=ec-ipxe-qemu systemd lab\n\
             Wants=systemd-journald.socket systemd-journald-dev-log.socket systemd-journald.service\n",
        )
        .unwrap();
        // journald, and the targets a unit with default dependencies needs (no .wants directories: nothing
        // else starts).
        for u in [
            "basic.target",
            "sysinit.target",
            "local-fs.target",
            "local-fs-pre.target",
            "swap.target",
            "sockets.target",
            "timers.target",
            "paths.target",
            "slices.target",
            "network.target",
            "network-pre.target",
            "multi-user.target",
            "shutdown.target",
            "umount.target",
            "final.target",
            "exit.target",
            "systemd-journald.service",
            "systemd-journald.socket",
            "systemd-journald-dev-log.socket",
            "systemd-journald-audit.socket",
        ] {
            std::fs::copy(Path::new("/lib/systemd/system").join(u), w.join("units").join(u)).unwrap();
        }
        let uid = free_id(&["/etc/passwd", "/etc/group"]);
        let (gid, group_add) = match group_id("kvm") {
            Some(g) => (g, String::new()),
            None => (uid, format!("kvm:x:{uid}:\n")),
        };
        std::fs::write(
            w.join("passwd.add"),
            format!("{SERVICE_USER}:x:{uid}:{gid}:every-channel lab:/var/empty:/usr/sbin/nologin\n"),
        )
        .unwrap();
        std::fs::write(w.join("group.add"), group_add).unwrap();

        let log = std::fs::File::create(w.join("pid1.log")).unwrap();
        let outer = Command::new("setsid")
            .args(["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "bash"])
            .arg(repo().join("tests/systemd/pid1.sh"))
            .args(["outer", w.to_str().unwrap(), &lab.host.name, dev])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tests/systemd/pid1.sh");
        let outer_pid = outer.id();
        let node_dir = unit
            .lines()
            .find_map(|l| l.split("EC_MACVTAP_RUNTIME_DIR=").nth(1))
            .map(|v| v.trim_end_matches('"').to_owned())
            .unwrap_or_else(|| ec_ipxe_qemu::nodedir::DEFAULT_RUNTIME_DIR.to_owned());
        let mut me = SystemdLab { lab, work, outer: Some(outer), pid1: 0, uid, dev, node_dir };
        me.pid1 = wait_for(Duration::from_secs(20), || {
            if me.outer.as_mut().is_some_and(|o| o.try_wait().ok().flatten().is_some()) {
                return Some(0);
            }
            // pid1.sh runs helpers before it execs unshare, whose only child is PID 1.
            let comm = std::fs::read_to_string(format!("/proc/{outer_pid}/comm")).ok()?;
            if comm.trim() != "unshare" {
                return None;
            }
            let children = std::fs::read_to_string(format!("/proc/{outer_pid}/task/{outer_pid}/children")).ok()?;
            children.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0);
        assert_ne!(me.pid1, 0, "systemd did not start: {}", me.file("pid1.log"));
        let state = wait_for(Duration::from_secs(60), || {
            let s = me.systemctl(&["is-system-running"]);
            let s = String::from_utf8_lossy(&s.stdout).trim().to_owned();
            matches!(s.as_str(), "running" | "degraded").then_some(s)
        });
        assert!(state.is_some(), "systemd did not come up: {}\n{}", me.file("pid1.log"), me.file("console.log"));
        Some(me)
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.work.path().join(name)).unwrap_or_default()
    }

    fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid1.to_string(), "-m", "-p", "-C", "-u", "-i", "--"]);
        c
    }

    fn systemctl(&self, args: &[&str]) -> std::process::Output {
        run(self.nsenter().args(["timeout", "200", "systemctl", "--no-pager"]).args(args))
    }

    fn must(&self, args: &[&str]) {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
    }

    fn show(&self, prop: &str) -> String {
        let out = self.systemctl(&["show", "-p", prop, "--value", UNIT]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The guest console log the launcher keeps in the unit's state directory.
    fn serial(&self) -> String {
        let out = run(self.nsenter().args(["cat", &format!("{STATE_DIR}/serial.log")]));
        String::from_utf8_lossy(&out.stdout).replace('\r', "")
    }

    /// `ec-ipxe-qemu status ARGS... --state-dir STATE_DIR` inside the lab: (exit code, stdout).
    fn status(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = run(self
            .nsenter()
            .arg(format!("{BIN_DIR}/ec-ipxe-qemu"))
            .arg("status")
            .args(args)
            .args(["--state-dir", STATE_DIR]));
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn journal(&self) -> String {
        let out = run(self.nsenter().args(["journalctl", "--no-pager", "-n", "80", "-u", UNIT]));
        format!("--- journal of {UNIT}:\n{}", String::from_utf8_lossy(&out.stdout))
    }

    /// The unit's journal entries as (PRIORITY, MESSAGE), from journald itself.
    fn journal_entries(&self) -> Vec<(String, String)> {
        let out = run(self.nsenter().args(["journalctl", "--no-pager", "-o", "json", "-u", UNIT]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["_PID"].as_str() != Some("1"))
            .filter_map(|e| Some((e["PRIORITY"].as_str()?.to_owned(), e["MESSAGE"].as_str()?.to_owned())))
            .collect()
    }

    /// Our lines reach journald with their own priority: no `<N>` left in the text, no level word, no stray
    /// space; `want` = (priority, message prefix) that must be there.
    fn check_priorities(&self, what: &str, want: &[(&str, &str)]) {
        let entries = self.journal_entries();
        for (p, m) in &entries {
            assert!(
                !m.starts_with('<') && !m.starts_with(' ') && !m.contains(" INFO ") && !m.contains(" WARN "),
                "{what}: journal line not parsed as a priority-prefixed line: PRIORITY={p} {m:?}"
            );
        }
        for (p, prefix) in want {
            assert!(
                entries.iter().any(|(ep, m)| ep == p && m.starts_with(prefix)),
                "{what}: no PRIORITY={p} line starting {prefix:?} in the journal:\n{entries:#?}"
            );
        }
    }

    /// The processes in the unit's cgroup, read inside the lab.
    fn unit_procs(&self) -> Vec<Proc> {
        let script = format!(
            "for p in $(cat /sys/fs/cgroup/systemd/system.slice/{UNIT}/cgroup.procs 2>/dev/null); do \
             printf '@@%s %s\\n' \"$p\" \"$(cat /proc/$p/comm 2>/dev/null)\"; cat /proc/$p/status 2>/dev/null; done"
        );
        let out = run(self.nsenter().args(["sh", "-c", &script]));
        String::from_utf8_lossy(&out.stdout)
            .split("@@")
            .filter(|c| !c.trim().is_empty())
            .filter_map(|chunk| {
                let (head, status) = chunk.split_once('\n')?;
                let (pid, comm) = head.split_once(' ')?;
                Some(Proc { pid: pid.parse().ok()?, comm: comm.to_owned(), status: status.to_owned() })
            })
            .collect()
    }

    fn qemus(&self) -> Vec<Proc> {
        self.unit_procs().into_iter().filter(|p| p.comm.starts_with("qemu-system")).collect()
    }

    /// Every QEMU in the lab's PID namespace, in or out of the unit.
    fn all_qemus(&self) -> usize {
        let out = run(self.nsenter().args(["sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null"]));
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("qemu-system")).count()
    }

    fn acks(&self) -> usize {
        std::fs::read_to_string(&self.lab.dhcp_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("DHCPACK("))
            .count()
    }

    fn link(&self) -> Option<serde_json::Value> {
        self.lab.host.link_json(LINK)
    }

    fn macvtaps(&self) -> usize {
        let out = self.lab.host.ip(&["-j", "-d", "link", "show"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array().unwrap().iter().filter(|l| l["linkinfo"]["info_kind"] == "macvtap").count()
    }

    /// Wait for a DHCPACK after `before` acks, from the macvtap's MAC; returns the time it took since `t0`.
    fn wait_lease(&self, before: usize, t0: Instant, what: &str) -> Duration {
        let got = wait_for(LEASE_TIMEOUT, || (self.acks() > before).then(Instant::now));
        let Some(at) = got else {
            panic!(
                "{what}: no new lease on the lab LAN within {LEASE_TIMEOUT:?}\n--- dnsmasq:\n{}\n{}\n--- console:\n{}",
                std::fs::read_to_string(&self.lab.dhcp_log).unwrap_or_default(),
                self.journal(),
                self.file("console.log")
            )
        };
        let mac = self.link().and_then(|l| l["address"].as_str().map(str::to_lowercase));
        let log = std::fs::read_to_string(&self.lab.dhcp_log).unwrap_or_default();
        let last = log.lines().rfind(|l| l.contains("DHCPACK(")).unwrap_or_default().to_lowercase();
        if let Some(mac) = mac {
            assert!(last.contains(&mac), "{what}: the lease went to another MAC than the macvtap's {mac}: {last}");
        }
        at - t0
    }

    /// Launcher and QEMU run as the static user, with no capabilities and no way to gain any.
    fn check_unprivileged(&self, what: &str) {
        let procs = self.unit_procs();
        assert!(procs.iter().any(|p| p.comm == "ec-ipxe-qemu"), "{what}: no launcher in the unit: {procs:?}");
        assert_eq!(self.qemus().len(), 1, "{what}: not exactly one QEMU in the unit: {procs:?}");
        for p in &procs {
            let uid = self.uid.to_string();
            assert!(
                p.field("Uid").split(' ').all(|u| u == uid),
                "{what}: {} ({}) does not run as {SERVICE_USER} ({uid}): Uid {}",
                p.comm,
                p.pid,
                p.field("Uid")
            );
            for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                assert_eq!(p.field(cap), "0000000000000000", "{what}: {} has {cap} {}", p.comm, p.field(cap));
            }
            assert_eq!(p.field("NoNewPrivs"), "1", "{what}: {} can gain privileges", p.comm);
        }
    }

    /// After a stop: the unit is inactive and no link, tap node or QEMU is left.
    fn check_clean(&self, what: &str, node: Option<&(PathBuf, String)>) {
        assert_eq!(self.show("ActiveState"), "inactive", "{what}: the unit is not inactive\n{}", self.journal());
        assert!(self.link().is_none(), "{what}: the macvtap {LINK} is left");
        assert_eq!(self.macvtaps(), 0, "{what}: a macvtap is left in the lab");
        assert_eq!(self.all_qemus(), 0, "{what}: a QEMU is left");
        // Only this lab's namespace's directory: with the machine's /dev, other tests' private nodes live in
        // the same runtime directory, under their own namespaces.
        let ns_ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(self.lab.host.path()).unwrap());
        let dir = format!("{}/net-{ns_ino}", self.node_dir);
        let nodes = run(self.nsenter().args(["sh", "-c", "find \"$1\" ! -type d 2>/dev/null", "sh", &dir]));
        assert!(nodes.stdout.is_empty(), "{what}: private nodes are left: {}", String::from_utf8_lossy(&nodes.stdout));
        if let Some((path, devnum)) = node {
            // The public node goes with the link (devtmpfs); the number may be reused by another namespace.
            let same = std::fs::read_to_string(format!("/sys/dev/char/{devnum}/uevent")).is_ok() && path.exists();
            assert!(!same || self.dev == "container", "{what}: the tap node {} ({devnum}) is left", path.display());
        }
    }

    /// The tap node ec-macvtap handed on, and its major:minor.
    fn tap_node(&self) -> (PathBuf, String) {
        let out = run(Command::new(MACVTAP).args(["--netns", &self.lab.host.name, "--json", "show", LINK]));
        assert!(out.status.success(), "ec-macvtap show: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let v = if v.is_array() { v[0].clone() } else { v };
        (
            PathBuf::from(v["tap_device"].as_str().unwrap_or_default()),
            v["tap_devnum"].as_str().unwrap_or_default().to_owned(),
        )
    }
}

impl Drop for SystemdLab {
    fn drop(&mut self) {
        if self.pid1 != 0 {
            let _ = run(self.nsenter().args(["timeout", "120", "systemctl", "stop", UNIT]));
            let _ = run(self.nsenter().args(["timeout", "20", "systemctl", "exit"]));
        }
        if let Some(mut outer) = self.outer.take() {
            let gone = wait_for(Duration::from_secs(20), || outer.try_wait().ok().flatten());
            if gone.is_none() {
                // Killing PID 1 of the namespace kills everything in it; unshare then exits.
                if self.pid1 != 0 {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(self.pid1 as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                if wait_for(Duration::from_secs(10), || outer.try_wait().ok().flatten()).is_none() {
                    let _ = outer.kill();
                    let _ = outer.wait();
                }
            }
        }
        // The cgroups pid1.sh made, deepest first (systemd made slices and services below them).
        for top in self.file("cgroups").lines() {
            for _ in 0..50 {
                let out = run(Command::new("find").args([top, "-depth", "-type", "d"]));
                let dirs = String::from_utf8_lossy(&out.stdout).into_owned();
                for d in dirs.lines() {
                    let _ = std::fs::remove_dir(d);
                }
                if !Path::new(top).exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if Path::new(top).exists() {
                eprintln!("systemd lab: could not remove the cgroup {top}");
            }
        }
        // Then the lab (dnsmasq, namespaces) drops.
    }
}

/// Raise the lab netns's next ifindex to a random few hundred, so the macvtap's /dev/tapN is not one that
/// another namespace's link (other tests run concurrently) already holds.
fn bump_ifindex(lab: &Lab) {
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

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// start, stop, start, kill -9 of QEMU, three restarts, stop: with the module's unit.
fn exercise(test: &str, dev: &'static str) {
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

#[test]
#[ignore = "needs root"]
fn module_unit_under_real_systemd() {
    exercise("module_unit_under_real_systemd", "public");
}

#[test]
#[ignore = "needs root"]
fn module_unit_under_real_systemd_without_dev_tap() {
    exercise("module_unit_under_real_systemd_without_dev_tap", "container");
}

/// The README's unit: start (launcher and QEMU unprivileged, the guest leases on the LAN), stop, nothing left.
#[test]
#[ignore = "needs root"]
fn readme_unit_under_real_systemd() {
    let test = "readme_unit_under_real_systemd";
    require_root(test);
    if !requirements(test) {
        return;
    }
    let _one = ONE_QEMU_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = SystemdLab::start("public", |uplink| Some(readme_unit(uplink))) else { return };
    let before = lab.acks();
    let t0 = Instant::now();
    lab.must(&["start", UNIT]);
    let lease = lab.wait_lease(before, t0, "README unit start");
    figure("README unit: start → lease", secs(lease));
    lab.check_unprivileged("README unit");
    assert!(lab.link().is_some(), "README unit: no macvtap");
    let t0 = Instant::now();
    lab.must(&["stop", UNIT]);
    figure("README unit: systemctl stop", secs(t0.elapsed()));
    lab.check_clean("README unit after stop", None);
}

/// The README's unit passes `systemd-analyze verify` and is hardened about as well as the module's.
#[test]
fn readme_unit_passes_systemd_analyze() {
    let test = "readme_unit_passes_systemd_analyze";
    if !require_programs(test, &["systemd-analyze"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join(UNIT);
    let text = readme_unit_text().replace("/usr/bin/ec-macvtap", MACVTAP).replace("/usr/bin/ec-ipxe-qemu", LAUNCHER);
    std::fs::write(&unit, text).unwrap();
    let out = run(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    let out = run(Command::new("systemd-analyze").args(["security", "--offline=yes", "--no-pager"]).arg(&unit));
    let said = String::from_utf8_lossy(&out.stdout);
    let score: f64 = said
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|l| l.split(": ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {said}{}", String::from_utf8_lossy(&out.stderr)));
    figure("README unit: systemd-analyze security exposure", format!("{score}"));
    assert!(score <= 3.0, "the README unit's exposure {score} is above the module's 3.0:\n{said}");
}
