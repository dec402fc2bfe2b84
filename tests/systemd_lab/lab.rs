//! systemd as PID 1 of private namespaces on a lab network, torn down on drop.

use super::*;

use crate::common::{Lab, run, wait_for};

/// systemd as PID 1 of private namespaces on a lab network, torn down on drop.
pub struct SystemdLab {
    pub lab: Lab,
    pub work: tempfile::TempDir,
    pub outer: Option<Child>,
    pub pid1: u32,
    pub uid: u32,
    pub dev: &'static str,
    /// Where ec-macvtap makes private tap nodes (the unit's EC_MACVTAP_RUNTIME_DIR, else its default).
    pub node_dir: String,
}

impl SystemdLab {
    pub fn start(dev: &'static str, unit: impl FnOnce(&str) -> Option<String>) -> Option<Self> {
        Self::start_serving(dev, None, unit)
    }

    /// The same with `www` copied to the lab's boot directory ([`super::WWW_DIR`]).
    pub fn start_serving(
        dev: &'static str,
        www: Option<&Path>,
        unit: impl FnOnce(&str) -> Option<String>,
    ) -> Option<Self> {
        let lab = Lab::new();
        bump_ifindex(&lab);
        let unit = unit(&lab.uplink)?;
        let work = tempfile::Builder::new().prefix("ec-systemd-lab.").tempdir().unwrap();
        let w = work.path();
        std::fs::create_dir(w.join("units")).unwrap();
        std::fs::create_dir(w.join("bin")).unwrap();
        if let Some(www) = www {
            std::fs::create_dir(w.join("www")).unwrap();
            for f in std::fs::read_dir(www).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), w.join("www").join(f.file_name())).unwrap();
            }
        }
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

    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.work.path().join(name)).unwrap_or_default()
    }

    pub fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid1.to_string(), "-m", "-p", "-C", "-u", "-i", "--"]);
        c
    }

    pub fn systemctl(&self, args: &[&str]) -> std::process::Output {
        run(self.nsenter().args(["timeout", "200", "systemctl", "--no-pager"]).args(args))
    }

    pub fn must(&self, args: &[&str]) {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
    }

    pub fn show(&self, prop: &str) -> String {
        let out = self.systemctl(&["show", "-p", prop, "--value", UNIT]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The guest console log the launcher keeps in the unit's state directory.
    pub fn serial(&self) -> String {
        let out = run(self.nsenter().args(["cat", &format!("{STATE_DIR}/serial.log")]));
        String::from_utf8_lossy(&out.stdout).replace('\r', "")
    }

    /// `ec-ipxe-qemu status ARGS... --state-dir STATE_DIR` inside the lab: (exit code, stdout).
    pub fn status(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = run(self
            .nsenter()
            .arg(format!("{BIN_DIR}/ec-ipxe-qemu"))
            .arg("status")
            .args(args)
            .args(["--state-dir", STATE_DIR]));
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn journal(&self) -> String {
        let out = run(self.nsenter().args(["journalctl", "--no-pager", "-n", "80", "-u", UNIT]));
        format!("--- journal of {UNIT}:\n{}", String::from_utf8_lossy(&out.stdout))
    }

    /// The unit's journal entries as (PRIORITY, MESSAGE), from journald itself.
    pub fn journal_entries(&self) -> Vec<(String, String)> {
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
    pub fn check_priorities(&self, what: &str, want: &[(&str, &str)]) {
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
    pub fn unit_procs(&self) -> Vec<Proc> {
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

    pub fn qemus(&self) -> Vec<Proc> {
        self.unit_procs().into_iter().filter(|p| p.comm.starts_with("qemu-system")).collect()
    }

    /// Every QEMU in the lab's PID namespace, in or out of the unit.
    pub fn all_qemus(&self) -> usize {
        let out = run(self.nsenter().args(["sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null"]));
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("qemu-system")).count()
    }

    pub fn acks(&self) -> usize {
        std::fs::read_to_string(&self.lab.dhcp_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("DHCPACK("))
            .count()
    }

    pub fn link(&self) -> Option<serde_json::Value> {
        self.lab.host.link_json(LINK)
    }

    pub fn macvtaps(&self) -> usize {
        let out = self.lab.host.ip(&["-j", "-d", "link", "show"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array().unwrap().iter().filter(|l| l["linkinfo"]["info_kind"] == "macvtap").count()
    }

    /// Wait for a DHCPACK after `before` acks, from the macvtap's MAC; returns the time it took since `t0`.
    pub fn wait_lease(&self, before: usize, t0: Instant, what: &str) -> Duration {
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
    pub fn check_unprivileged(&self, what: &str) {
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
    pub fn check_clean(&self, what: &str, node: Option<&(PathBuf, String)>) {
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
    pub fn tap_node(&self) -> (PathBuf, String) {
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
