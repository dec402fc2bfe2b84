//! End-to-end lifecycle of `ec-ipxe-qemu run`: one run per state directory, the persistent disk, bad input
//! (found before or at start) that leaves nothing behind, a stop while preparing, sizes and `print-args`.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::launcher::{BIN, Run, Slot, assert_exit, no_qemu_left, qemu_pids, require_qemu};
use common::{require_programs, require_root, unique, wait_for};

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
    let script = std::fs::read(state.join("tftp/boot.ipxe")).unwrap();
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
    assert_eq!(std::fs::read(state.join("tftp/boot.ipxe")).unwrap(), script, "the first run's script is untouched");
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
/// the disk is finished, QEMU is never started, and `run` exits 0 with no temporary file left behind.
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
    let log = run.stderr();
    assert!(log.contains("SIGTERM while preparing: not starting QEMU"), "{log}");
    assert!(!log.contains("QEMU started"), "{log}");
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

/// Bad input that only QEMU or the kernel detects: a port already in use for `--host-forward` (exit 4), an
/// argument QEMU rejects (exit 2, QEMU's own message). Either way nothing is left behind and no QEMU runs.
#[test]
fn bad_input_found_at_start_leaves_nothing() {
    let t = "bad_input_found_at_start_leaves_nothing";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("new/state");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let fwd = format!("tcp:127.0.0.1:{port}-:22");
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["--host-forward", &fwd], 4, "already in use"),
        (vec!["--", "-foo"], 2, "-foo: invalid option"),
        (vec!["--boot-nic-model", "virtio"], 2, "virtio"),
    ];
    for (args, code, needle) in cases {
        let out = Command::new(BIN)
            .args(["run", "--state-dir"])
            .arg(&state)
            .args(["--accel", "tcg", "--memory", "256M", "--no-disk"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        let last = err.lines().last().unwrap_or("");
        assert!(last.starts_with("ec-ipxe-qemu: "), "{args:?}: one line at the end: {err}");
        assert!(last.contains(needle), "{args:?}: {last}");
        if code == 2 {
            assert!(last.contains("QEMU rejected its command line"), "{last}");
        }
        assert!(!tmp.path().join("new").exists(), "{args:?}: the directories this run made are gone");
        assert!(qemu_pids(tmp.path()).is_empty(), "{args:?}: no QEMU");
    }
}

/// Sizes take units (`--memory 2G`), and `--help` states the ranges.
#[test]
fn memory_takes_units_and_help_states_ranges() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let argv = |mem: &str| {
        let out = Command::new(BIN)
            .args(["print-args", "--state-dir"])
            .arg(&state)
            .args(["--accel", "tcg", "--no-disk", "--qemu", "/bin/true", "--memory", mem])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = argv("2G");
    assert_eq!(code, Some(0), "{err}");
    let v: Vec<String> = serde_json::from_str(&out).unwrap();
    let m = v.iter().position(|a| a == "-m").unwrap();
    assert_eq!(v[m + 1], "2048");
    let (code, _, err) = argv("2X");
    assert_eq!(code, Some(2));
    assert!(err.contains("--memory") && err.contains("64M to 1T"), "{err}");
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for range in ["64M to 1T", "1 to 255", "1M to 64T", "1 to 16", "0 to 3600"] {
        assert!(help.contains(range), "--help must state {range:?}:\n{help}");
    }
    assert!(!state.exists());
}

/// `print-args` into a closed pipe (`print-args | head -c1`): no panic, exit 0.
#[test]
fn print_args_to_a_closed_stdout_does_not_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let out = Command::new(BIN)
        .args(["print-args", "--state-dir"])
        .arg(tmp.path().join("s"))
        .args(["--accel", "tcg", "--no-disk", "--qemu", "/bin/true"])
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
}
