//! `ec-macvtap probe` against real parts: the kernel's macvtap on a veth uplink, a real dnsmasq in the LAN
//! namespace (with `--no-ping`, so the time measured is the probe's, not dnsmasq's ~3 s ping of a new
//! address before its first offer), and the project's HDHomeRun emulator (vm-tests/hdhomerun-emulator.py)
//! answering discovery from second addresses of the LAN port.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    KillOnDrop, Lab, macvtap_bin, random_index, require_programs, require_root, stderr, unique, wait_for,
    with_stdout_closed,
};

const DNSMASQ_ARGS: &[&str] = &["--no-ping", "--dhcp-option=option:dns-server,192.168.77.1"];

/// One probe lab: the lab (with or without dnsmasq), a macvtap on its uplink created with `ip link` at a
/// random high index, and the tuner emulators that were asked for. Everything goes on drop.
struct ProbeLab {
    lab: Lab,
    name: String,
    mac: String,
    emulators: Vec<KillOnDrop>,
    tmp: tempfile::TempDir,
}

fn random_mac() -> String {
    let i = random_index();
    format!("02:ec:{:02x}:{:02x}:{:02x}:{:02x}", (i >> 24) as u8, (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

impl ProbeLab {
    /// None (after the skip-or-fail rule) when the lab cannot run here.
    fn new(test: &str, dhcp: bool) -> Option<ProbeLab> {
        require_root(test);
        if !require_programs(test, &["ip", "dnsmasq", "python3", "nft"]) {
            return None;
        }
        let lab = Lab::with_dnsmasq(dhcp.then_some(DNSMASQ_ARGS));
        let name = unique("pv");
        let mac = random_mac();
        let index = random_index().to_string();
        lab.host.ip(&[
            "link",
            "add",
            "link",
            &lab.uplink,
            "name",
            &name,
            "index",
            &index,
            "address",
            &mac,
            "type",
            "macvtap",
            "mode",
            "bridge",
        ]);
        // What `ec-macvtap create` sets: the probe hears the multicast neighbour solicitations aimed at it.
        lab.host.ip(&["link", "set", &name, "allmulticast", "on", "up"]);
        // The LAN port's IPv6 link-local address must be usable (DAD done) for it to answer the probe's echo.
        let lanport = lab.lanport.clone();
        let ready = wait_for(Duration::from_secs(10), || {
            let out = lab.lan.ip(&["-6", "addr", "show", "dev", &lanport, "scope", "link"]);
            (out.contains("inet6") && !out.contains("tentative")).then_some(())
        });
        assert!(ready.is_some(), "the LAN port never got a usable IPv6 link-local address");
        let tmp = tempfile::tempdir().unwrap();
        Some(ProbeLab { lab, name, mac, emulators: Vec::new(), tmp })
    }

    /// Start a tuner emulator answering from `addr` (added to the LAN port as `addr/prefix`).
    fn tuner(&mut self, addr: &str, prefix: u8, device_id: &str, tuners: u8) {
        self.lab.lan.ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", &self.lab.lanport]);
        let log = self.tmp.path().join(format!("emulator-{device_id}.log"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-tests/hdhomerun-emulator.py");
        let child = self
            .lab
            .lan
            .cmd("python3")
            .arg(&script)
            .args(["--bind", addr, "--device-id", device_id, "--tuners", &tuners.to_string()])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the tuner emulator");
        self.emulators.push(KillOnDrop(child));
        let up = wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string(&log).unwrap_or_default().contains("listening").then_some(())
        });
        assert!(up.is_some(), "emulator {device_id} did not start");
    }

    fn probe_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(macvtap_bin());
        c.args(["--netns", &self.lab.host.name]).args(args);
        c
    }

    /// `ec-macvtap --netns HOST ARGS...`, timed.
    fn probe(&self, args: &[&str]) -> (Output, Duration) {
        let t = Instant::now();
        let out = self.probe_cmd(args).output().expect("run ec-macvtap");
        (out, t.elapsed())
    }

    fn dhcp_log(&self) -> String {
        std::fs::read_to_string(&self.lab.dhcp_log).unwrap_or_default()
    }

    /// dnsmasq logged a DHCPRELEASE from our MAC and keeps no lease for it.
    fn assert_no_lease_left(&self) {
        let released = wait_for(Duration::from_secs(10), || {
            let log = self.dhcp_log().to_lowercase();
            let gone = !self.lab.leases().iter().any(|(m, _)| *m == self.mac);
            (log.lines().any(|l| l.contains("dhcprelease") && l.contains(&self.mac)) && gone).then_some(())
        });
        assert!(
            released.is_some(),
            "no DHCPRELEASE logged or a lease is left for {}:\nleases {:?}\n{}",
            self.mac,
            self.lab.leases(),
            self.dhcp_log()
        );
    }

    /// The private node directory of the host namespace: the probe must not leave one behind.
    fn private_dir(&self) -> PathBuf {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(self.lab.host.path()).unwrap().ino();
        PathBuf::from(format!("/dev/ec-macvtap/net-{inode}"))
    }
}

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

fn problems(v: &serde_json::Value) -> Vec<String> {
    v["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect()
}

#[test]
#[ignore = "needs root"]
fn everything_answers_offer_tuners_and_no_lease_left() {
    let t = "everything_answers_offer_tuners_and_no_lease_left";
    let Some(mut lab) = ProbeLab::new(t, true) else { return };
    lab.tuner("192.168.77.2", 24, "1040CAFC", 2);
    lab.tuner("192.168.77.3", 24, "10A0000D", 4);

    let (out, took) = lab.probe(&["--json", "probe", "--name", &lab.name]);
    eprintln!("FIGURE probe with every answer (dnsmasq --no-ping, 2 tuners): {:.2} s", took.as_secs_f64());
    let v = report(&out);
    assert_eq!(out.status.code(), Some(0), "{v:#}\n{}", stderr(&out));
    assert_eq!(v["ok"], true);
    assert_eq!(v["name"], lab.name.as_str());
    assert_eq!(v["mac"], lab.mac.as_str());
    let d = &v["dhcp"];
    assert_eq!(d["server"], "192.168.77.1");
    let addr = d["address"].as_str().unwrap();
    let last: u8 = addr.strip_prefix("192.168.77.").unwrap().parse().unwrap();
    assert!((50..=60).contains(&last), "{addr} is outside dnsmasq's range");
    assert_eq!(d["prefix_len"], 24);
    assert_eq!(d["router"], "192.168.77.1");
    assert_eq!(d["dns"], serde_json::json!(["192.168.77.1"]));
    assert_eq!(d["lease_secs"], 3600);
    let mut tuners = v["tuners"].as_array().unwrap().clone();
    tuners.sort_by_key(|t| t["device_id"].as_str().unwrap().to_owned());
    assert_eq!(
        serde_json::Value::Array(tuners),
        serde_json::json!([
            {"device_id": "1040CAFC", "address": "192.168.77.2", "tuner_count": 2, "model": null},
            {"device_id": "10A0000D", "address": "192.168.77.3", "tuner_count": 4, "model": null},
        ])
    );
    // The OFFER and ACK came unicast to our MAC; the tuners' replies too (after they ARPed for us).
    assert!(v["frames"]["unicast"].as_u64().unwrap() >= 4, "{v:#}");
    assert_eq!(problems(&v), Vec::<String>::new());
    assert!(took < Duration::from_secs(9), "everything answered, yet the probe took {took:?}");
    lab.assert_no_lease_left();
    let log = lab.dhcp_log();
    assert!(log.contains("DHCPDISCOVER") && log.contains("DHCPACK"), "{log}");

    // The human output says the same in lines.
    let (out, _) = lab.probe(&["probe", "--name", &lab.name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(
        text.contains(
            " from server 192.168.77.1, router 192.168.77.1, dns 192.168.77.1, lease 3600 s (acknowledged, released)"
        ),
        "{text}"
    );
    assert!(text.contains("tuner: 1040CAFC at 192.168.77.2, 2 tuners, http://192.168.77.2:80"), "{text}");
    assert!(text.contains("tuner: 10A0000D at 192.168.77.3, 4 tuners, http://192.168.77.3:80"), "{text}");
    assert!(text.trim_end().ends_with("result: ok"), "{text}");
    eprintln!("README sample:\n$ ec-macvtap probe --name {}\n{text}", lab.name);
    lab.assert_no_lease_left();
    assert!(!lab.private_dir().exists(), "the probe left {}", lab.private_dir().display());
}

#[test]
#[ignore = "needs root"]
fn no_dhcp_server_is_a_problem_line_not_a_hang() {
    let t = "no_dhcp_server_is_a_problem_line_not_a_hang";
    let Some(lab) = ProbeLab::new(t, false) else { return };
    let (out, took) = lab.probe(&["--json", "probe", "--name", &lab.name, "--timeout", "3"]);
    eprintln!("FIGURE verdict with no DHCP answer (--timeout 3): {:.2} s", took.as_secs_f64());
    let v = report(&out);
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    assert_eq!(v["ok"], false);
    assert_eq!(v["dhcp"], serde_json::Value::Null);
    let p = problems(&v);
    assert_eq!(p.len(), 2, "{p:?}");
    // The LAN port answered the IPv6 all-nodes echo: the segment carries our frames, nobody serves DHCP.
    assert!(p[0].starts_with("dhcp: no answer to "), "{}", p[0]);
    assert!(p[0].contains("1 host on the segment answered us"), "{}", p[0]);
    assert!(p[0].contains("there is no DHCP server on this segment"), "{}", p[0]);
    assert!(p[1].starts_with("tuners: discovery not tried"), "{}", p[1]);
    assert!(took < Duration::from_secs(8), "never a hang: {took:?} for --timeout 3");

    // Human output: the problem lines and the verdict, exit 1.
    let (out, _) = lab.probe(&["probe", "--name", &lab.name, "--timeout", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("problem: dhcp: no answer to "), "{text}");
    assert!(text.trim_end().ends_with("result: 2 problems"), "{text}");
    eprintln!("README sample:\n$ ec-macvtap probe --name {} --timeout 2\n{text}", lab.name);

    // A reader that went away (`probe | head -1`) changes nothing: same exit status, no panic.
    let out = with_stdout_closed(&mut lab.probe_cmd(&["probe", "--name", &lab.name, "--timeout", "1"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
#[ignore = "needs root"]
fn dhcp_without_tuners_names_tuner_discovery() {
    let t = "dhcp_without_tuners_names_tuner_discovery";
    let Some(lab) = ProbeLab::new(t, true) else { return };
    let (out, took) = lab.probe(&["--json", "probe", "--name", &lab.name]);
    let v = report(&out);
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    assert_eq!(v["dhcp"]["server"], "192.168.77.1");
    assert_eq!(v["tuners"], serde_json::json!([]));
    let p = problems(&v);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("tuners: no HDHomeRun answered 3 discovery broadcasts from 192.168.77."), "{}", p[0]);
    assert!(p[0].contains("another VLAN"), "{}", p[0]);
    eprintln!("FIGURE probe with DHCP but no tuner: {:.2} s", took.as_secs_f64());
    lab.assert_no_lease_left();
}

#[test]
#[ignore = "needs root"]
fn port_security_on_the_lan_side_gets_the_hint() {
    let t = "port_security_on_the_lan_side_gets_the_hint";
    let Some(mut lab) = ProbeLab::new(t, true) else { return };
    lab.tuner("192.168.77.2", 24, "1040CAFC", 2);
    // A good probe first: the LAN side now has our MAC in its neighbour caches, and its IPv6 stack keeps
    // probing the previous run's address for a while. None of that may pass for an answer below.
    let (out, _) = lab.probe(&["--json", "probe", "--name", &lab.name]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    // The switch port knows one MAC, the host's own uplink; frames from any other source are dropped.
    let known = lab.lab.host.link_json(&lab.lab.uplink).unwrap()["address"].as_str().unwrap().to_owned();
    let rules = format!(
        "table netdev portsec {{\n chain in {{\n  type filter hook ingress device \"{}\" priority 0; policy drop;\n  \
         ether saddr {known} accept\n }}\n}}\n",
        lab.lab.lanport
    );
    let out = lab.lab.lan.cmd("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().and_then(|mut c| {
        use std::io::Write;
        c.stdin.take().unwrap().write_all(rules.as_bytes())?;
        c.wait_with_output()
    });
    assert!(out.unwrap().status.success(), "nft refused {rules}");
    let discovers_before = lab.dhcp_log().matches("DHCPDISCOVER").count();

    let (out, took) = lab.probe(&["--json", "probe", "--name", &lab.name, "--timeout", "3"]);
    eprintln!("FIGURE verdict behind port security (--timeout 3): {:.2} s", took.as_secs_f64());
    let v = report(&out);
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    let p = problems(&v);
    assert!(p[0].starts_with("dhcp: no answer to "), "{p:?}");
    assert!(p[0].contains("port security"), "{}", p[0]);
    assert!(lab.lab.leases().is_empty(), "{:?}", lab.lab.leases());
    assert_eq!(
        lab.dhcp_log().matches("DHCPDISCOVER").count(),
        discovers_before,
        "the drop rule let a DISCOVER through"
    );
    assert!(took < Duration::from_secs(8), "never a hang: {took:?}");
}

#[test]
#[ignore = "needs root"]
fn a_held_tap_is_refused_unless_forced() {
    let t = "a_held_tap_is_refused_unless_forced";
    let Some(lab) = ProbeLab::new(t, true) else { return };
    // A stand-in guest: a process holding a queue of the tap, as QEMU would.
    let holder = common::tap_holder(&lab.lab.host, &lab.name);
    let pid = holder.0.id();

    let (out, _) = lab.probe(&["probe", "--name", &lab.name]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(&format!("pid {pid} (sleep)")) && err.contains("--force"), "{err}");
    assert!(out.stdout.is_empty());
    assert!(!lab.dhcp_log().contains("DHCPDISCOVER"), "a refused probe sent nothing");

    let (out, _) = lab.probe(&["--json", "probe", "--name", &lab.name]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(report(&out)["error"]["code"], 4);

    // --force probes anyway (frames may be split with the holder's queue, so only the refusal is checked).
    let (out, _) = lab.probe(&["--json", "probe", "--name", &lab.name, "--force", "--no-tuners", "--timeout", "3"]);
    assert_ne!(out.status.code(), Some(4), "{}", stderr(&out));
    let v = report(&out);
    assert!(v["problems"].is_array() && v["frames"].is_object(), "{v:#}");
    if v["dhcp"].is_object() {
        lab.assert_no_lease_left();
    }
}

#[test]
#[ignore = "needs root"]
fn a_stop_after_the_ack_still_releases() {
    let t = "a_stop_after_the_ack_still_releases";
    let Some(lab) = ProbeLab::new(t, true) else { return };
    // No tuner: after the ACK the probe listens for discovery answers, which is when the stop comes.
    let child = lab.probe_cmd(&["--json", "probe", "--name", &lab.name]).stdout(Stdio::piped()).spawn().unwrap();
    let acked = wait_for(Duration::from_secs(15), || lab.dhcp_log().contains("DHCPACK").then_some(()));
    assert!(acked.is_some(), "{}", lab.dhcp_log());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let v = report(&out);
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    assert!(problems(&v).iter().any(|p| p == "interrupted by SIGINT before every check finished"), "{v:#}");
    lab.assert_no_lease_left();
}

#[test]
#[ignore = "needs root"]
fn without_dhcp_tuners_answer_a_link_local_address() {
    let t = "without_dhcp_tuners_answer_a_link_local_address";
    let Some(mut lab) = ProbeLab::new(t, false) else { return };
    lab.tuner("169.254.77.2", 16, "1040CAFC", 2);
    let (out, _) = lab.probe(&["--json", "probe", "--name", &lab.name, "--no-dhcp"]);
    let v = report(&out);
    assert_eq!(out.status.code(), Some(0), "{v:#}\n{}", stderr(&out));
    assert_eq!(v["dhcp"], serde_json::Value::Null);
    assert_eq!(v["tuners"][0]["device_id"], "1040CAFC");
    assert_eq!(v["tuners"][0]["address"], "169.254.77.2");

    // Nothing asked: the probe only listens and counts (the LAN port's neighbour solicitation at least).
    let (out, _) = lab.probe(&["--json", "probe", "--name", &lab.name, "--no-dhcp", "--no-tuners", "--timeout", "2"]);
    let v = report(&out);
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    assert_eq!(v["ok"], true);
    assert!(v["frames"]["multicast"].as_u64().unwrap() >= 1, "{v:#}");
}

#[test]
#[ignore = "needs root"]
fn bad_input_is_one_line_and_leaves_nothing() {
    let t = "bad_input_is_one_line_and_leaves_nothing";
    let Some(lab) = ProbeLab::new(t, false) else { return };
    let before = lab.lab.host.link_table();
    for (args, code, needle) in [
        (vec!["probe", "--name", "ec-no-such"], 3, "\"ec-no-such\""),
        (vec!["probe", "--name", lab.lab.uplink.as_str()], 2, "not a macvtap"),
        (vec!["probe", "--name", lab.name.as_str(), "--timeout", "0"], 2, "--timeout"),
        (vec!["probe", "--name", "a/b"], 2, "--name"),
    ] {
        let (out, took) = lab.probe(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        if code != 2 || needle == "not a macvtap" {
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        }
        assert!(took < Duration::from_secs(8), "{args:?} took {took:?}");
    }
    assert_eq!(lab.lab.host.link_table(), before);
    assert!(!lab.private_dir().exists(), "{}", lab.private_dir().display());
}

#[test]
#[ignore = "needs root"]
fn a_macvtap_that_is_down_is_a_quick_problem_line() {
    let t = "a_macvtap_that_is_down_is_a_quick_problem_line";
    let Some(lab) = ProbeLab::new(t, true) else { return };
    lab.lab.host.ip(&["link", "set", &lab.name, "down"]);
    let (out, took) = lab.probe(&["--json", "probe", "--name", &lab.name]);
    let v = report(&out);
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    assert_eq!(
        problems(&v),
        ["link: the macvtap is down, so nothing can be sent or received: bring it up (`ec-macvtap create` does)"]
    );
    assert!(took < Duration::from_secs(8), "nothing to wait for when the link is down: {took:?}");
    assert!(!lab.dhcp_log().contains("DHCPDISCOVER"));
}
