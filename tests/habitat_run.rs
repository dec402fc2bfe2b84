//! What a long-running host does to a supervisor, done to `ec-ipxe-qemu run` with a real QEMU guest (TCG,
//! real iPXE) (issue 16): SIGHUP and the signals that must be ignored, a stderr whose reader goes away, a
//! console flood against the journal's rate limit, a viewer that half-closes its socket, a FIFO and a device
//! in `--boot-dir`, a disk image locked by a second QEMU, and a command line over the kernel's limits.
//!
//! Each test asserts the guest's fate (still running, or stopped in order), the exit code, and that no file
//! outside the state directory changed.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;
mod habitat;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::launcher::{BIN, OK_LINE, Run, Slot, assert_exit, no_qemu_left, qemu_pids, require_qemu};
use common::{require_root, wait_for};
use habitat::Tree;
use nix::sys::signal::Signal;

/// How long an iPXE boot may take under TCG with another QEMU beside it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// SIGUSR1, SIGUSR2 and SIGPIPE are ignored and said once each; SIGHUP is the same graceful stop as
/// SIGTERM: the guest is asked to power off, QEMU is quit after the timeout, `ended_at` is written and the
/// sockets go (before: exit 129 and a SIGKILLed guest).
#[test]
fn sighup_stops_in_order_and_usr1_usr2_pipe_are_ignored() {
    let t = "sighup_stops_in_order_and_usr1_usr2_pipe_are_ignored";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let before = Tree::of(tmp.path(), &[&state, &state.with_extension("stderr")]);
    let mut run = Run::start(None, &state, &["--no-disk", "--shutdown-timeout", "1"]);
    run.wait_serial(OK_LINE, BOOT_TIMEOUT);
    for sig in [Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGPIPE, Signal::SIGUSR1, Signal::SIGUSR2] {
        run.signal(sig);
        std::thread::sleep(Duration::from_millis(200));
    }
    run.wait_stderr("SIGPIPE: ignored", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    assert!(run.running(), "the launcher ended on an ignored signal:\n{}", run.stderr());
    assert_eq!(qemu_pids(&state).len(), 1, "the guest is gone:\n{}", run.stderr());
    let log = run.stderr();
    for sig in ["SIGUSR1", "SIGUSR2", "SIGPIPE"] {
        assert_eq!(log.matches(&format!("{sig}: ignored")).count(), 1, "{sig} said once:\n{log}");
    }
    let (code, v) = run.status_json();
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["stage"], "ready", "{v}");

    run.signal(Signal::SIGHUP);
    let status = run.wait(Duration::from_secs(30));
    assert_exit(status, 0, &run);
    assert!(no_qemu_left(&state), "QEMU left behind");
    let log = run.stderr();
    assert!(log.contains("SIGHUP: asking the guest to power off"), "{log}");
    assert!(!state.join("qmp.sock").exists() && !state.join("console.sock").exists(), "sockets left");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("status.json")).unwrap()).unwrap();
    assert!(v["ended_at"].is_string(), "ended_at written: {v}");
    before.assert_same(&Tree::of(tmp.path(), &[&state, &state.with_extension("stderr")]), t);
}

/// The reader of the launcher's stderr goes away while the guest runs (`run 2>&1 | head`): the next log
/// lines fail with EPIPE and are dropped and counted in `status.json`; the guest runs on, and a stop still
/// works (before: exit 134, the guest SIGKILLed).
#[test]
fn a_closed_stderr_pipe_drops_lines_and_the_guest_runs_on() {
    let t = "a_closed_stderr_pipe_drops_lines_and_the_guest_runs_on";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let before = Tree::of(tmp.path(), &[&state]);
    let _slot = Slot::take();
    let child = Run::command(None, &state, "256", &["--no-disk", "--shutdown-timeout", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut guard = common::KillOnDrop(child);
    let child = &mut guard.0;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = lines.by_ref().map_while(Result::ok).any(|l| l.contains("QEMU started"));
    assert!(started, "QEMU did not start");
    drop(lines);
    // Things that log: the guest's console lines, a console client, an ignored signal.
    let _viewer = UnixStream::connect(state.join("console.sock")).unwrap();
    nix::sys::signal::kill(pid, Signal::SIGUSR1).unwrap();
    let serial = state.join("serial.log");
    let ok = wait_for(BOOT_TIMEOUT, || common::launcher::serial(&serial).contains(OK_LINE).then_some(()));
    assert!(ok.is_some(), "the guest did not boot:\n{}", common::launcher::serial(&serial));
    let status = |state: &std::path::Path| {
        let out = Command::new(BIN).args(["status", "-j", "--state-dir"]).arg(state).output().unwrap();
        (out.status.code(), serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default())
    };
    let dropped = wait_for(Duration::from_secs(20), || {
        let (_, v) = status(&state);
        v["dropped_log_lines"].as_u64().filter(|n| *n > 0)
    });
    assert!(dropped.is_some(), "status.json never counted dropped log lines: {}", status(&state).1);
    assert!(child.try_wait().unwrap().is_none(), "the launcher ended");
    assert_eq!(qemu_pids(&state).len(), 1, "the guest is gone");
    let (code, v) = status(&state);
    assert_eq!((code, v["stage"].as_str()), (Some(0), Some("ready")), "{v}");

    nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();
    let exit = wait_for(Duration::from_secs(30), || child.try_wait().ok().flatten());
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "{exit:?}");
    assert!(no_qemu_left(&state));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("status.json")).unwrap()).unwrap();
    assert!(v["dropped_log_lines"].as_u64().unwrap_or(0) > 0 && v["ended_at"].is_string(), "{v}");
    before.assert_same(&Tree::of(tmp.path(), &[&state]), t);
}

/// `N guest console lines suppressed in T s`: the one summary of an episode.
fn summaries(log: &str) -> Vec<(u64, f64)> {
    let re = regex::Regex::new(r"(\d+) guest console lines suppressed in ([0-9.]+) s").unwrap();
    re.captures_iter(log).map(|c| (c[1].parse().unwrap(), c[2].parse().unwrap())).collect()
}

/// A guest that prints 1,000 lines as fast as it can (well over 50/s): the journal gets the first 200 at
/// once, then at most 50 per second, and one summary for the episode whose count is exactly what was left
/// out; `serial.log` keeps every line; a viewer that half-closed its socket at once still receives all of
/// it (before: 85-97 lines/s and a warning per line let through; the viewer dropped after the replay).
#[test]
fn a_console_flood_is_rate_limited_with_one_summary_and_nothing_lost() {
    let t = "a_console_flood_is_rate_limited_with_one_summary_and_nothing_lost";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut script = habitat::wait_key("FLOOD-WAITING");
    script.extend(habitat::flood("FLOOD", 1000, 0));
    script.extend(["echo FLOOD-DONE".to_owned(), "sleep 3600".to_owned()]);
    let www = habitat::www(tmp.path(), &script);
    let before = Tree::of(tmp.path(), &[&state, &state.with_extension("stderr")]);
    let _slot = Slot::take();
    let mut run = Run::start(
        None,
        &state,
        &["--no-disk", "--boot-dir", www.to_str().unwrap(), "--ready-pattern", "FLOOD-DONE", "--shutdown-timeout", "0"],
    );
    run.wait_serial("FLOOD-WAITING", BOOT_TIMEOUT);
    // A viewer that only listens: it half-closes its end at once, as `console </dev/null` does.
    let viewer = UnixStream::connect(state.join("console.sock")).unwrap();
    viewer.shutdown(std::net::Shutdown::Write).unwrap();
    viewer.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let (replayed, replay_seen) = std::sync::mpsc::channel();
    let watching = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 65536];
        let mut viewer = viewer;
        let mut replayed = Some(replayed);
        while let Ok(n) = viewer.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if let Some(tx) = replayed.take_if(|_| seen.windows(13).any(|w| w == b"FLOOD-WAITING")) {
                let _ = tx.send(());
            }
            if seen.windows(10).any(|w| w == b"FLOOD-DONE") {
                break;
            }
        }
        String::from_utf8_lossy(&seen).replace('\r', "")
    });
    // The launcher took the viewer on once its replay (the recent output, FLOOD-WAITING) arrived.
    replay_seen.recv_timeout(Duration::from_secs(30)).expect("the viewer got no replay with FLOOD-WAITING");
    let mut keyboard = habitat::Keyboard::connect(&state);
    keyboard.key();
    let flood_start = Instant::now();
    run.wait_serial("FLOOD-DONE", BOOT_TIMEOUT);
    let flood_secs = flood_start.elapsed().as_secs_f64();
    drop(keyboard);
    // The episode ends after a quiet second; its summary follows.
    run.wait_stderr("guest console lines suppressed in", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let log = run.stderr();
    let serial = run.serial();
    let seen = watching.join().unwrap();
    // The launcher's record is checked against what QEMU handed it (serial.log), not against the script's
    // text: under TCG the emulated UART now and then garbles a byte of a flood ("FLOOOD 93 0 ..."), which is
    // QEMU's and iPXE's, and the launcher must pass on exactly that.
    let span = |text: &str| -> Option<String> {
        let from = text.find("FLOOD-WAITING")?;
        let to = from + text[from..].find("FLOOD-DONE")?;
        Some(text[from..to].to_owned())
    };
    let flood = span(&serial).unwrap_or_else(|| panic!("serial.log lacks the flood:\n{serial}"));
    // Every console line of the flood (after FLOOD-WAITING's own line, before FLOOD-DONE).
    let flood_lines = flood.lines().skip(1).filter(|l| !l.trim().is_empty()).count() as u64;
    // The guest lines the log let through in that span.
    let logged = log
        .lines()
        .skip_while(|l| !l.contains("guest: FLOOD-WAITING"))
        .skip(1)
        .take_while(|l| !l.contains("guest: FLOOD-DONE"))
        .filter(|l| l.contains(" guest: ") && !l.contains("guest console lines suppressed"))
        .count() as u64;
    let sums = summaries(&log);
    eprintln!("FIGURE flood: {flood_lines} lines in {flood_secs:.1} s; {logged} logged; summaries {sums:?}");
    assert_eq!(
        sums.len(),
        1,
        "one summary per episode:\n{}",
        log.lines().filter(|l| l.contains("suppressed")).collect::<Vec<_>>().join("\n")
    );
    // FLOOD-DONE, right after the flood, may have been left out too.
    let done_left_out = u64::from(!log.contains("guest: FLOOD-DONE"));
    assert_eq!(
        sums[0].0,
        flood_lines - logged + done_left_out,
        "the summary counts exactly the lines left out; the log without the flood's lines:\n{}",
        log.lines().filter(|l| !l.contains("guest: FLOOD ")).collect::<Vec<_>>().join("\n")
    );
    assert!(logged >= 200, "the burst of 200 is logged: {logged}");
    assert!(logged as f64 <= 200.0 + 50.0 * (flood_secs + 1.0), "{logged} lines in {flood_secs:.1} s");
    assert_eq!(log.matches("suppressed").count(), 1, "no other suppression line");
    // The half-closed viewer got exactly what serial.log holds; serial.log has the script's 1,000 lines, but
    // for the rare byte the emulated UART garbles.
    let viewed = span(&seen).unwrap_or_else(|| panic!("the half-closed viewer lacks the flood:\n{seen}"));
    assert!(viewed == flood, "the half-closed viewer and serial.log differ in the flood");
    let mut intact = 0;
    for i in 0..100 {
        for k in 0..10 {
            intact += u32::from(flood.contains(&format!("\nFLOOD {i} {k} abcdefghijklmnopqrstuvwxyz0123456789\n")));
        }
    }
    // Under TCG on a loaded machine the emulated UART garbled up to 6 of the 1,000 lines (iPXE's transmit
    // timeout runs out while QEMU's I/O thread lags); the launcher passes on what QEMU sent, checked above.
    assert!(flood_lines >= 990 && intact >= 950, "{flood_lines} lines, {intact} of the 1,000 intact in serial.log");
    assert!(run.running(), "the launcher ended:\n{}", run.stderr());
    assert_eq!(qemu_pids(&state).len(), 1, "the guest is gone");
    run.signal(Signal::SIGTERM);
    assert_exit(run.wait(Duration::from_secs(30)), 0, &run);
    before.assert_same(&Tree::of(tmp.path(), &[&state, &state.with_extension("stderr")]), t);
}

/// `GET PATH` on the boot HTTP server: (status code, body), or None when it does not answer in time.
fn http_get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text))
}

/// A FIFO, a symlink to a device and a device node in `--boot-dir`: 403 at once, never opened; the event
/// loop stays free (status, console, further requests) and the guest boots (before: one `GET /fifo` froze
/// console, HTTP, QMP and SIGTERM until someone wrote to the FIFO).
#[test]
#[ignore = "needs root"]
fn a_fifo_or_device_in_the_boot_dir_is_403_and_blocks_nothing() {
    let t = "a_fifo_or_device_in_the_boot_dir_is_403_and_blocks_nothing";
    require_root(t);
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let marker = format!("BOOTDIR-{}", common::unique("m"));
    let www = habitat::www(tmp.path(), &[format!("echo {marker}"), "sleep 3600".into()]);
    nix::unistd::mkfifo(&www.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", www.join("zero")).unwrap();
    nix::sys::stat::mknod(
        &www.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    std::fs::create_dir(www.join("sub")).unwrap();
    std::fs::write(www.join("sub/file.txt"), "hello").unwrap();
    let before = Tree::of(tmp.path(), &[&state, &state.with_extension("stderr")]);
    let port = habitat::free_port();
    let _slot = Slot::take();
    let mut run = Run::start(
        None,
        &state,
        &[
            "--no-disk",
            "--boot-dir",
            www.to_str().unwrap(),
            "--boot-http-port",
            &port.to_string(),
            "--shutdown-timeout",
            "0",
        ],
    );
    run.wait_started();
    let wait = Duration::from_secs(20);
    for path in ["/fifo", "/zero", "/null", "/fifo", "/sub/../fifo"] {
        let got = http_get(port, path, wait);
        assert_eq!(got.as_ref().map(|g| g.0), Some(403), "GET {path}: {got:?}\n{}", run.stderr());
    }
    let (code, body) = http_get(port, "/sub/", wait).expect("a listing");
    assert_eq!(code, 200);
    assert!(body.contains("file.txt"), "{body}");
    assert_eq!(http_get(port, "/sub/file.txt", wait).map(|g| g.0), Some(200));
    // A request that holds the FIFO open would block a reader; these must not have: status and the
    // console answer.
    let (code, v) = run.status_json();
    assert_eq!(code, Some(0), "{v}");
    let mut viewer = UnixStream::connect(state.join("console.sock")).unwrap();
    viewer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut replay = [0u8; 16];
    assert!(viewer.read(&mut replay).unwrap_or(0) > 0, "the console did not answer");
    run.wait_serial(&marker, BOOT_TIMEOUT);
    assert_eq!(qemu_pids(&state).len(), 1);
    run.signal(Signal::SIGTERM);
    assert_exit(run.wait(Duration::from_secs(30)), 0, &run);
    before.assert_same(&Tree::of(tmp.path(), &[&state, &state.with_extension("stderr")]), t);
}

/// A qcow2 held by a second QEMU (its `write` lock): exit 4, naming the holder, so the unit retries; the
/// holder runs on and the image is unchanged (before: exit 2, "QEMU rejected its command line", and
/// `RestartPreventExitStatus=2` disabled the unit for good).
#[test]
fn a_disk_locked_by_another_qemu_is_exit_4_naming_it() {
    let t = "a_disk_locked_by_another_qemu_is_exit_4_naming_it";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let disk = tmp.path().join("shared.qcow2");
    let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk).arg("16M").output().unwrap();
    assert!(out.status.success());
    let _slot = Slot::take();
    let holder = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-display", "none", "-S", "-machine", "accel=tcg", "-drive"])
        .arg(format!("file={},format=qcow2,if=virtio", disk.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let holder_pid = holder.id();
    let mut holder = common::KillOnDrop(holder);
    let locked = wait_for(Duration::from_secs(30), || {
        let out = Command::new("qemu-img").arg("info").arg(&disk).output().ok()?;
        String::from_utf8_lossy(&out.stderr).contains("lock").then_some(())
    });
    assert!(locked.is_some(), "the holder QEMU did not lock the image");
    let before = Tree::of(tmp.path(), &[&state, &state.with_extension("stderr")]);
    let mut run = Run::start(None, &state, &["--disk", disk.to_str().unwrap()]);
    let status = run.wait(Duration::from_secs(60));
    assert_exit(status, 4, &run);
    let log = run.stderr();
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains(disk.to_str().unwrap()) && last.contains("locked"), "{log}");
    assert!(last.contains(&format!("pid {holder_pid}")), "names the holder: {last}");
    assert!(!last.contains("rejected its command line"), "{last}");
    assert!(holder.0.try_wait().unwrap().is_none(), "the holder QEMU ended");
    assert!(!state.exists(), "the refused run left its state directory");
    before.assert_same(&Tree::of(tmp.path(), &[&state, &state.with_extension("stderr")]), t);
}

/// A QEMU argument longer than the kernel takes (MAX_ARG_STRLEN, 128 KiB: here the user-mode netdev with
/// 10,000 `--host-forward` rules): exit 2 from `print-args` and `run` alike, before anything is created
/// (before: print-args exit 0, run exit 1 "Argument list too long" and a new state directory left behind).
#[test]
fn a_command_line_over_the_kernel_limits_is_exit_2_before_anything_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let rules: Vec<String> = (0..10_000).map(|i| format!("--host-forward=tcp:127.0.0.1:{}-:22", 20_000 + i)).collect();
    let before = Tree::of(tmp.path(), &[]);
    for sub in ["print-args", "run"] {
        let out = Command::new(BIN)
            .args([sub, "--state-dir"])
            .arg(&state)
            .args(["--no-disk", "--accel", "tcg"])
            .args(&rules)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sub}: {err}");
        assert_eq!(err.lines().count(), 1, "{sub}: {err}");
        assert!(err.contains("128 KiB") && err.contains("-netdev"), "{sub}: {err}");
        assert!(out.stdout.is_empty(), "{sub} printed an argv");
    }
    assert!(!state.exists(), "run created the state directory");
    before.assert_same(&Tree::of(tmp.path(), &[]), "command line over the limits");
}
