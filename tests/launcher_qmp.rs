//! End-to-end QMP events of `ec-ipxe-qemu run`: a STOP the launcher did not ask for, an operator holding
//! `qmp.sock` during a stop, and a guest reset (`system_reset`) that starts the boot stages over.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::launcher::{BOOT_TIMEOUT, OK_LINE, Run, Slot, assert_exit, no_qemu_left, require_qemu};
use common::wait_for;

/// A QMP client of the test's own on the operators' `qmp.sock`.
fn operator_qmp(state: &Path) -> (std::io::BufReader<std::os::unix::net::UnixStream>, std::os::unix::net::UnixStream) {
    use std::io::BufRead;
    let s = std::os::unix::net::UnixStream::connect(state.join("qmp.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"QMP\""), "{line}");
    (r, w)
}

fn operator_command(
    qmp: &mut (std::io::BufReader<std::os::unix::net::UnixStream>, std::os::unix::net::UnixStream),
    cmd: &str,
) {
    use std::io::{BufRead, Write};
    writeln!(qmp.1, "{{\"execute\": \"{cmd}\"}}").unwrap();
    loop {
        let mut line = String::new();
        qmp.0.read_line(&mut line).unwrap();
        if line.contains("\"return\"") || line.contains("\"error\"") || line.is_empty() {
            break;
        }
    }
}

/// A STOP the launcher did not ask for (an operator's `stop` on qmp.sock): the run ends with exit 1 within
/// 2 s and says why; the launcher's own QMP connection is independent of the operator's.
#[test]
fn a_stop_the_launcher_did_not_ask_for_ends_the_run() {
    let t = "a_stop_the_launcher_did_not_ask_for_ends_the_run";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk"]);
    run.wait_started();
    let mut qmp = operator_qmp(&state);
    operator_command(&mut qmp, "qmp_capabilities");
    let stopped = Instant::now();
    operator_command(&mut qmp, "stop");
    let status = run.wait(Duration::from_secs(15));
    let took = stopped.elapsed();
    assert_exit(status, 1, &run);
    eprintln!("FIGURE unrequested STOP to launcher exit: {took:?}");
    assert!(took <= Duration::from_secs(8), "took {took:?}\n{}", run.stderr());
    assert!(run.stderr().contains("the guest stopped running: the guest was paused"), "{}", run.stderr());
    assert!(no_qemu_left(&state));
}

/// An operator holding `qmp.sock` (QEMU serves one client at a time there) does not get in the way of a stop:
/// SIGTERM gives powerdown, then quit after the timeout through the launcher's own connection, exit 0, no
/// SIGKILL.
#[test]
fn stop_works_while_an_operator_holds_qmp_sock() {
    let t = "stop_works_while_an_operator_holds_qmp_sock";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--shutdown-timeout", "1"]);
    run.wait_started();
    let mut qmp = operator_qmp(&state);
    operator_command(&mut qmp, "qmp_capabilities");
    let asked = Instant::now();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let status = run.wait(Duration::from_secs(30));
    let took = asked.elapsed();
    assert_exit(status, 0, &run);
    let log = run.stderr();
    assert!(took < Duration::from_secs(1 + 4), "took {took:?}\n{log}");
    assert!(log.contains("QEMU quit (exit status 0)"), "{log}");
    assert!(!log.contains("SIGKILL"), "{log}");
    drop(qmp);
    assert!(no_qemu_left(&state));
}

/// A guest reset (`system_reset` by an operator on qmp.sock, as a reboot would be) after the guest was ready:
/// QEMU's RESET event reaches the boot watch, the stages start over at `firmware` and advance to `ready`
/// again, and status.json shows the second boot; the run goes on and stops with exit 0.
#[test]
fn a_guest_reset_starts_the_boot_stages_over() {
    let t = "a_guest_reset_starts_the_boot_stages_over";
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _slot = Slot::take();
    let mut run = Run::start(None, &state, &["--no-disk", "--shutdown-timeout", "0"]);
    run.wait_stderr("boot stage ready:", BOOT_TIMEOUT);
    let (_, first) = run.status_json();
    assert_eq!(first["stage"], "ready", "{first}");
    assert_eq!(first["ready"], true, "{first}");
    let first_ready_at = first["ready_at"].as_str().unwrap().to_owned();

    let mut qmp = operator_qmp(&state);
    operator_command(&mut qmp, "qmp_capabilities");
    let reset = Instant::now();
    operator_command(&mut qmp, "system_reset");
    run.wait_stderr("QEMU reset the guest (RESET event)", Duration::from_secs(30));
    // status.json goes back: not ready, at an earlier stage (the way back to ready takes seconds under TCG).
    let back = wait_for(Duration::from_secs(30), || {
        let (_, v) = run.status_json();
        (v["ready"] == false).then(|| v["stage"].as_str().unwrap_or("").to_owned())
    });
    let back = back.unwrap_or_else(|| panic!("status.json never left ready after the reset\n{}", run.stderr()));
    assert!(["firmware", "ipxe", "dhcp", "chain"].contains(&back.as_str()), "stage after the reset: {back}");
    let start = Instant::now();
    let log = loop {
        let log = run.stderr();
        if log.matches("boot stage ready:").count() >= 2 {
            break log;
        }
        assert!(start.elapsed() < BOOT_TIMEOUT && run.running(), "no second ready\n{log}\n{}", run.serial());
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("FIGURE system_reset to ready again (TCG): {:.1?}", reset.elapsed());
    // After the reset: the guest started over (once: the RESET event, or SeaBIOS's banner on the console if
    // that came first, whichever restarted the watch), the stages went back to firmware and on to ready.
    assert_eq!(log.matches("the guest started over").count(), 1, "{log}");
    let after = &log[log.find("the guest started over").unwrap()..];
    let firmware = after.find("boot stage firmware:").unwrap_or_else(|| panic!("no firmware stage\n{log}"));
    let ipxe = after.find("boot stage ipxe:").unwrap_or_else(|| panic!("no ipxe stage\n{log}"));
    let ready = after.find("boot stage ready:").unwrap_or_else(|| panic!("no ready stage\n{log}"));
    assert!(firmware < ipxe && ipxe < ready, "stages out of order after the reset\n{after}");
    assert_eq!(run.serial().matches(OK_LINE).count(), 2, "{}", run.serial());

    let (code, second) = run.status_json();
    assert_eq!(code, Some(0), "{second}");
    assert_eq!(second["stage"], "ready", "{second}");
    assert_eq!(second["ready"], true, "{second}");
    assert!(second["ready_at"].as_str().unwrap() > first_ready_at.as_str(), "{first} then {second}");
    assert_eq!(second["qemu_pid"], first["qemu_pid"], "the same QEMU runs on");

    drop(qmp);
    run.signal(nix::sys::signal::Signal::SIGTERM);
    assert_exit(run.wait(Duration::from_secs(30)), 0, &run);
    assert!(no_qemu_left(&state));
}
