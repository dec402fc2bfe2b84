//! `ec-ipxe-qemu doctor` against real parts, each failure a real case of this machine: a missing QEMU, KVM
//! that opens but cannot run a guest (nested virtualisation here), a tap node the user `nobody` cannot open
//! (a real macvtap made by ec-macvtap in a lab namespace), a closed loopback port as boot URL, a state
//! directory locked like a running launcher locks it; and a good lab setup that gives no fail. Where it is
//! cheap, `run` is started too, to show that doctor predicted what it meets.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{
    DeleteOnDrop, KillOnDrop, Lab, macvtap, require_programs, require_root, stderr, unique, wait_for,
    with_stdout_closed,
};

fn launcher_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ec-ipxe-qemu")
}

fn doctor(prefix: &[&str], args: &[&str]) -> Output {
    let mut c = if prefix.is_empty() {
        Command::new(launcher_bin())
    } else {
        let mut c = Command::new(prefix[0]);
        c.args(&prefix[1..]).arg(launcher_bin());
        c
    };
    c.arg("doctor").args(args).stdin(Stdio::null());
    c.output().expect("run ec-ipxe-qemu doctor")
}

fn checks(out: &Output) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}); exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    });
    let list = v.as_array().expect("a JSON array").clone();
    for c in &list {
        let mut keys: Vec<_> = c.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["check", "detail", "hint", "status"], "{c}");
        assert!(["ok", "warn", "fail"].contains(&c["status"].as_str().unwrap()), "{c}");
        assert_eq!(c["hint"].is_null(), c["status"] == "ok", "a hint exactly when not ok: {c}");
    }
    list
}

fn find<'a>(list: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    list.iter().find(|c| c["check"] == name).unwrap_or_else(|| panic!("no check {name} in {list:#?}"))
}

fn fails(list: &[serde_json::Value]) -> Vec<String> {
    list.iter().filter(|c| c["status"] == "fail").map(|c| c["check"].as_str().unwrap().to_owned()).collect()
}

fn state_dir(tmp: &Path) -> String {
    tmp.join("state").to_string_lossy().into_owned()
}

#[test]
fn missing_qemu_is_a_fail_line_and_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = state_dir(tmp.path());
    let out = doctor(&[], &["--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--qemu", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let list = checks(&out);
    let q = find(&list, "qemu");
    assert_eq!(q["status"], "fail");
    assert_eq!(q["detail"], "--qemu \"/nonexistent\": no such file");
    assert!(q["hint"].as_str().unwrap().contains("install QEMU"), "{q}");
    // run refuses the same options before starting anything, with the same words.
    let run = Command::new(launcher_bin())
        .args(["run", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--qemu", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(stderr(&run).contains("--qemu \"/nonexistent\": no such file"), "{}", stderr(&run));
    assert!(!Path::new(&sd).exists(), "doctor and the refused run left the state dir behind");

    // The human output: one line per check, the failing one with its hint below.
    let out = doctor(&[], &["--state-dir", &sd, "--no-disk", "--accel", "tcg", "--qemu", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("fail  qemu ") && l.contains("no such file")), "{text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("hint: install QEMU")), "{text}");

    // A reader that went away (`doctor | head -1`): the same exit status, no panic.
    let out = with_stdout_closed(Command::new(launcher_bin()).args([
        "doctor",
        "--state-dir",
        &sd,
        "--no-disk",
        "--accel",
        "tcg",
        "--qemu",
        "/nonexistent",
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
#[ignore = "needs root"]
fn kvm_that_opens_but_cannot_run_a_guest_fails() {
    let t = "kvm_that_opens_but_cannot_run_a_guest_fails";
    require_root(t);
    if !require_programs(t, &["qemu-system-x86_64"]) {
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        common::skip_or_fail(t, "no /dev/kvm on this machine (the case needs a KVM that opens and fails)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let sd = state_dir(tmp.path());
    let out = doctor(&[], &["--json", "--state-dir", &sd, "--no-disk", "--accel", "kvm"]);
    let list = checks(&out);
    let a = find(&list, "accelerator");
    assert_eq!(a["status"], "fail", "{a} (this test expects the development hosts' broken nested KVM)");
    assert!(a["detail"].as_str().unwrap().contains("KVM is unusable: QEMU "), "{a}");
    assert!(a["hint"].as_str().unwrap().contains("--accel tcg"), "{a}");
    assert_eq!(out.status.code(), Some(1));
    // --accel auto picks KVM here too (/dev/kvm opens), so it fails the same way.
    let auto = checks(&doctor(&[], &["--json", "--state-dir", &sd, "--no-disk", "--accel", "auto"]));
    assert_eq!(find(&auto, "accelerator")["status"], "fail");

    // What run meets: the guest dies at once and the run ends with an error.
    let run = Command::new(launcher_bin())
        .args(["run", "--state-dir", &sd, "--no-disk", "--accel", "kvm", "--memory", "128"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut run = KillOnDrop(run);
    let ended = wait_for(Duration::from_secs(60), || run.0.try_wait().unwrap());
    let status = ended.expect("run under the broken KVM did not end");
    assert!(!status.success(), "run succeeded where doctor said KVM fails");
}

/// A lab namespace with a macvtap made by ec-macvtap (tap node root's, mode 0600).
struct LanSetup {
    lab: Lab,
    name: String,
}

impl LanSetup {
    fn new(test: &str) -> Option<LanSetup> {
        require_root(test);
        if !require_programs(test, &["ip", "dnsmasq", "setpriv", "qemu-system-x86_64"]) {
            return None;
        }
        let lab = Lab::with_dnsmasq(None);
        let name = unique("dv");
        let out = macvtap(Some(&lab.host), &["create", "--link", &lab.uplink, "--name", &name]);
        assert!(out.status.success(), "ec-macvtap create: {}", stderr(&out));
        Some(LanSetup { lab, name })
    }

    /// `ip netns exec HOST [setpriv as nobody] ec-ipxe-qemu doctor ARGS`.
    fn doctor(&self, as_nobody: bool, args: &[&str]) -> Output {
        let mut prefix = vec!["ip", "netns", "exec", self.lab.host.name.as_str()];
        if as_nobody {
            prefix.extend(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]);
        }
        doctor(&prefix, args)
    }
}

impl Drop for LanSetup {
    fn drop(&mut self) {
        let _ = DeleteOnDrop::new(&self.lab.host, &self.name);
    }
}

#[test]
#[ignore = "needs root"]
fn a_tap_node_this_user_cannot_open_fails_as_run_would() {
    let t = "a_tap_node_this_user_cannot_open_fails_as_run_would";
    let Some(s) = LanSetup::new(t) else { return };
    let tmp = tempfile::tempdir().unwrap();
    // A state directory nobody may use, so that only the tap stands in the way.
    let sd = tmp.path().join("state");
    std::fs::create_dir(&sd).unwrap();
    nix::unistd::chown(&sd, Some(nix::unistd::Uid::from_raw(65534)), Some(nix::unistd::Gid::from_raw(65534))).unwrap();
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sd = sd.to_string_lossy().into_owned();
    let args = ["--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--lan-interface", &s.name];

    let out = s.doctor(true, &args);
    let list = checks(&out);
    assert_eq!(out.status.code(), Some(1), "{list:#?}");
    let tap = find(&list, "lan-tap");
    assert_eq!(tap["status"], "fail", "{tap}");
    assert!(tap["detail"].as_str().unwrap().contains("Permission denied"), "{tap}");
    let hint = tap["hint"].as_str().unwrap();
    assert!(hint.contains("this user (nobody) cannot open the tap node") && hint.contains("run would exit 5"), "{tap}");
    assert_eq!(fails(&list), ["lan-tap"], "only the tap stands in the way: {list:#?}");

    // run as nobody meets exactly that: exit 5 (print-args, no preflight, says 0).
    let mut run = Command::new("ip");
    run.args([
        "netns",
        "exec",
        &s.lab.host.name,
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "--",
    ]);
    run.arg(launcher_bin()).args([
        "run",
        "--state-dir",
        &sd,
        "--no-disk",
        "--accel",
        "tcg",
        "--lan-interface",
        &s.name,
    ]);
    let out = run.stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));

    // As root the same tap opens (no fail at all). The state directory nobody's run made is nobody's: root
    // refuses a directory another user owns, so it becomes root's first.
    if std::path::Path::new(&sd).exists() {
        std::os::unix::fs::chown(&sd, Some(0), Some(0)).unwrap();
    }
    let out = s.doctor(false, &args);
    let list = checks(&out);
    assert_eq!(find(&list, "lan-tap")["status"], "ok", "{list:#?}");
    assert_eq!(fails(&list), Vec::<String>::new(), "{list:#?}");
}

#[test]
fn an_unreachable_boot_url_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = state_dir(tmp.path());
    // A loopback port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for url in [format!("http://127.0.0.1:{port}/boot.ipxe"), format!("http://10.0.2.2:{port}/boot.ipxe")] {
        let out = doctor(&[], &["--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--boot-url", &url]);
        let list = checks(&out);
        assert_eq!(out.status.code(), Some(1), "{list:#?}");
        let b = find(&list, "boot-url");
        assert_eq!(b["status"], "fail", "{b}");
        assert!(b["detail"].as_str().unwrap().ends_with(": connection refused"), "{b}");
        assert!(b["hint"].as_str().unwrap().contains("nothing listens there"), "{b}");
        assert_eq!(fails(&list), ["boot-url"], "{list:#?}");
    }
}

/// An https boot URL with an iPXE that cannot fetch it: Debian's `ipxe.lkrn` and QEMU's NIC ROMs here lack
/// HTTPS, read from the images themselves, which is what `run` would then fail on at every retry.
#[test]
fn an_https_url_with_an_ipxe_without_https_fails() {
    if !common::require_programs("an_https_url_with_an_ipxe_without_https_fails", &["qemu-system-x86_64"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let sd = state_dir(tmp.path());
    // The URL's host does not answer either; only the ipxe line is looked at here.
    let url = "https://127.0.0.1:1/boot.ipxe";
    // With the boot cache (the default for https) the host fetches the URL: iPXE needs no HTTPS.
    let out = doctor(&[], &["--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--boot-url", url]);
    assert_eq!(find(&checks(&out), "ipxe")["status"], "ok");
    for extra in [&["--ipxe", "/usr/lib/ipxe/ipxe.lkrn"][..], &[][..]] {
        let mut args =
            vec!["--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--boot-url", url, "--boot-cache", "off"];
        args.extend_from_slice(extra);
        let out = doctor(&[], &args);
        let list = checks(&out);
        assert_eq!(out.status.code(), Some(1), "{list:#?}");
        let i = find(&list, "ipxe");
        assert_eq!(i["status"], "fail", "{i}");
        assert!(i["detail"].as_str().unwrap().contains("has no HTTPS support"), "{i}");
        assert!(i["hint"].as_str().unwrap().contains("HTTPS-capable"), "{i}");
    }
    // The same image with an http URL is fine.
    let out = doctor(
        &[],
        &["--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--ipxe", "/usr/lib/ipxe/ipxe.lkrn"],
    );
    assert_eq!(find(&checks(&out), "ipxe")["status"], "ok");
}

#[test]
fn a_state_dir_locked_by_a_run_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = tmp.path().join("state");
    std::fs::create_dir(&sd).unwrap();
    // Locked the way a running launcher locks it (flock on DIR/lock, its pid inside).
    let lock = sd.join("lock");
    std::fs::write(&lock, "4242\n").unwrap();
    let held =
        nix::fcntl::Flock::lock(std::fs::File::open(&lock).unwrap(), nix::fcntl::FlockArg::LockExclusiveNonblock)
            .unwrap();
    let sd = sd.to_string_lossy().into_owned();
    let out = doctor(&[], &["--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg"]);
    let list = checks(&out);
    let s = find(&list, "state-dir");
    assert_eq!(s["status"], "fail", "{s}");
    assert!(s["detail"].as_str().unwrap().contains("in use by another ec-ipxe-qemu run (pid 4242)"), "{s}");
    assert_eq!(out.status.code(), Some(1));
    drop(held);
    let list = checks(&doctor(&[], &["--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg"]));
    assert_eq!(find(&list, "state-dir")["status"], "ok");
}

#[test]
#[ignore = "needs root"]
fn a_good_lab_setup_has_no_fail() {
    let t = "a_good_lab_setup_has_no_fail";
    let Some(s) = LanSetup::new(t) else { return };
    if !require_programs(t, &["python3", "qemu-img", "ss"]) {
        return;
    }
    // A real HTTP server on loopback with the boot script (HEAD and GET, 404 for anything else).
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("boot.ipxe"), "#!ipxe\necho hello\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // In the lab's host namespace, where doctor and run (QEMU's 10.0.2.2 is that namespace's loopback) run.
    let server = s
        .lab
        .host
        .cmd("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string()])
        .current_dir(www.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = KillOnDrop(server);
    let up = wait_for(Duration::from_secs(10), || {
        let out = s.lab.host.cmd("ss").args(["-Htln", &format!("sport = :{port}")]).output().ok()?;
        (!out.stdout.is_empty()).then_some(())
    });
    assert!(up.is_some(), "python3 -m http.server did not start");

    let tmp = tempfile::tempdir().unwrap();
    let sd = state_dir(tmp.path());
    let url = format!("http://10.0.2.2:{port}/boot.ipxe");
    let args = ["--json", "--state-dir", &sd, "--accel", "tcg", "--boot-url", &url, "--lan-interface", &s.name];
    let out = s.doctor(false, &args);
    let list = checks(&out);
    assert_eq!(fails(&list), Vec::<String>::new(), "{list:#?}");
    assert_eq!(out.status.code(), Some(0));
    for name in [
        "configuration",
        "qemu",
        "accelerator",
        "ipxe",
        "boot-url",
        "state-dir",
        "disk",
        "credentials",
        "lan-link",
        "lan-in-use",
        "lan-tap",
        "lan-parent",
        "vhost-net",
    ] {
        let c = find(&list, name);
        assert!(c["status"] != "fail", "{c}");
    }
    assert!(find(&list, "qemu")["detail"].as_str().unwrap().contains("QEMU emulator version"), "{list:#?}");
    assert!(find(&list, "boot-url")["detail"].as_str().unwrap().contains("HEAD 200"), "{list:#?}");
    assert!(find(&list, "disk")["detail"].as_str().unwrap().contains("qemu-img"), "{list:#?}");
    assert!(!Path::new(&sd).exists(), "doctor created the state directory");

    // vhost-net as run decides it: with a device that is missing or not vhost-net, auto warns (run falls back)
    // and on fails (run exits 3).
    let missing_dev = tmp.path().join("no-vhost-net");
    for (dev, mode, status) in [
        (missing_dev.to_str().unwrap(), "auto", "warn"),
        (missing_dev.to_str().unwrap(), "on", "fail"),
        ("/dev/null", "on", "fail"),
        ("/dev/null", "off", "ok"),
    ] {
        let env = format!("EC_VHOST_NET_DEVICE={dev}");
        let prefix = ["ip", "netns", "exec", s.lab.host.name.as_str(), "env", env.as_str()];
        let out = doctor(&prefix, &[&args[..], &["--lan-vhost", mode]].concat());
        let list = checks(&out);
        let v = find(&list, "vhost-net");
        assert_eq!(v["status"], status, "{dev} {mode}: {v}");
        let want_fails: Vec<String> = if status == "fail" { vec!["vhost-net".into()] } else { vec![] };
        assert_eq!(fails(&list), want_fails, "{list:#?}");
        assert_eq!(out.status.code(), Some(if status == "fail" { 1 } else { 0 }), "{list:#?}");
        if status == "fail" {
            assert!(v["hint"].as_str().unwrap().contains("run would exit 3"), "{v}");
        }
    }

    // The same server, a missing file: a 404 fail, as iPXE would meet.
    let missing = format!("http://127.0.0.1:{port}/nope.ipxe");
    let out = s.doctor(false, &["--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--boot-url", &missing]);
    let list = checks(&out);
    let b = find(&list, "boot-url");
    assert_eq!(b["status"], "fail");
    assert!(b["detail"].as_str().unwrap().contains("404"), "{b}");

    let human = s.doctor(false, &args[1..]);
    eprintln!(
        "README sample:\n$ ec-ipxe-qemu doctor {}\n{}",
        args[1..].join(" "),
        String::from_utf8_lossy(&human.stdout)
    );
}

#[test]
#[ignore = "needs root"]
fn a_tap_held_by_another_process_is_in_use() {
    let t = "a_tap_held_by_another_process_is_in_use";
    let Some(s) = LanSetup::new(t) else { return };
    // A stand-in guest holding a queue of the tap, as QEMU would.
    let holder = common::tap_holder(&s.lab.host, &s.name);
    let pid = holder.0.id();
    let tmp = tempfile::tempdir().unwrap();
    let sd = state_dir(tmp.path());
    let out =
        s.doctor(false, &["--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--lan-interface", &s.name]);
    let list = checks(&out);
    assert_eq!(out.status.code(), Some(1));
    let u = find(&list, "lan-in-use");
    assert_eq!(u["status"], "fail", "{u}");
    assert!(u["detail"].as_str().unwrap().contains(&format!("pid {pid} (sleep)")), "{u}");
    assert!(u["hint"].as_str().unwrap().contains("exit 4"), "{u}");
    // The tap is not opened while in use (a queue would take a share of the guest's frames).
    assert_eq!(find(&list, "lan-tap")["status"], "warn");
    // run meets the same: exit 4.
    let run = Command::new("ip")
        .args(["netns", "exec", &s.lab.host.name])
        .arg(launcher_bin())
        .args(["run", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--lan-interface", &s.name])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(4), "{}", stderr(&run));
}

/// A FIFO (or a symlink) planted as `boot-cache/good.json` neither blocks doctor nor is followed: doctor
/// ends and says there is no last good set (before: doctor hung in open() on the FIFO).
#[test]
fn a_fifo_or_symlink_as_the_good_set_is_no_good_set() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = state_dir(tmp.path());
    let cache = Path::new(&sd).join("boot-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let outside = tmp.path().join("good.json");
    let url = "https://127.0.0.1:1/x/boot.ipxe";
    std::fs::write(
        &outside,
        format!(
            r#"{{"boot_url":"{url}","files":{{"boot.ipxe":{{"sha256":"{}","length":1,"url":"{url}"}}}}}}"#,
            "a".repeat(64)
        ),
    )
    .unwrap();
    for kind in ["fifo", "symlink"] {
        let good = cache.join("good.json");
        let _ = std::fs::remove_file(&good);
        match kind {
            "fifo" => nix::unistd::mkfifo(&good, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap(),
            _ => std::os::unix::fs::symlink(&outside, &good).unwrap(),
        }
        let mut child = Command::new(launcher_bin())
            .args(["doctor", "--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--boot-url", url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let ended = wait_for(Duration::from_secs(60), || child.try_wait().unwrap());
        if ended.is_none() {
            let _ = child.kill();
            panic!("{kind}: doctor did not end");
        }
        let out = child.wait_with_output().unwrap();
        let c = find(&checks(&out), "boot-cache").clone();
        assert_eq!(c["status"], "warn", "{kind}: {c}");
        assert!(c["detail"].as_str().unwrap().contains("no last good set"), "{kind}: {c}");
    }
    // The same file, in place, is a good set: the check reads it when it is real.
    std::fs::remove_file(cache.join("good.json")).unwrap();
    std::fs::copy(&outside, cache.join("good.json")).unwrap();
    let out = doctor(&[], &["--json", "--state-dir", &sd, "--no-disk", "--accel", "tcg", "--boot-url", url]);
    let c = find(&checks(&out), "boot-cache").clone();
    assert_eq!(c["status"], "ok", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("a last good set of 1 files"), "{c}");
}
