//! systemd credentials from the host into the guest (`--credential`, `--credentials-from`), end to end.
//!
//! - The real Linux test guest (scripts/build-test-guest.sh) loads `qemu_fw_cfg`, imports
//!   `/sys/firmware/qemu_fw_cfg/by_name/opt/io.systemd.credentials/*` as systemd does and prints each name with
//!   the SHA-256 of its value: the test compares them with the host's files. The guest's console line
//!   `ec-publisher: credentials ...` (the module's ready script) names them, a missing one marked, before the
//!   ready line. With the LAN's broadcast dropped (nftables in the LAN namespace), the discovery script finds
//!   the emulator's tuner only through the static list `ec.tuners`.
//! - The secret never shows: not in QEMU's `/proc/PID/cmdline`, the launcher's stderr, `serial.log`,
//!   `status.json` or `print-args`.
//! - Bad names, missing, oversized, non-regular and unreadable (as `nobody`) files give the documented exit
//!   codes (2; 5 for permission) with nothing created; `$CREDENTIALS_DIRECTORY` is the default directory.
//! - The most credentials the launcher accepts (16) still fit QEMU's fw_cfg slots with every other fw_cfg
//!   user of the argv (`--ipxe`'s `-kernel`, a disk): QEMU boots them (QEMU aborts at 20).
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::guest::{GuestLab, TUNER_ADDR, TUNER_ID};
use common::launcher::{BIN, Run, assert_exit, no_qemu_left, qemu_pids, require_qemu};
use common::{require_root, run, unique};
use sha2::{Digest, Sha256};

const READY_TIMEOUT: Duration = Duration::from_secs(600);

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A value that is easy to find anywhere: a unique marker, then bytes that are not UTF-8.
fn secret() -> (String, Vec<u8>) {
    let marker = format!("EC-SECRET-{}", unique("k"));
    let mut value = marker.clone().into_bytes();
    value.extend_from_slice(b"\n\xff\x00\x01 tail");
    (marker, value)
}

fn write(p: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(p, bytes).unwrap();
    p.to_path_buf()
}

#[test]
#[ignore = "needs root"]
fn credentials_reach_the_real_guest_and_nowhere_else() {
    let t = "credentials_reach_the_real_guest_and_nowhere_else";
    let Some(g) = GuestLab::new(t) else { return };
    if !common::require_programs(t, &["nft"]) {
        return;
    }

    // A LAN where broadcast does not reach the tuner: drop HDHomeRun discovery broadcasts in the LAN namespace.
    for rule in [
        &["add", "table", "inet", "ec_nobcast"][..],
        &[
            "add",
            "chain",
            "inet",
            "ec_nobcast",
            "in",
            "{",
            "type",
            "filter",
            "hook",
            "input",
            "priority",
            "0",
            ";",
            "}",
        ],
        &["add", "rule", "inet", "ec_nobcast", "in", "meta", "pkttype", "broadcast", "udp", "dport", "65001", "drop"],
    ] {
        let out = run(g.lan.lab.lan.cmd("nft").args(rule));
        assert!(out.status.success(), "nft {rule:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    let (marker, value) = secret();
    let dir = g.lan.tmp.path().join("keys");
    std::fs::create_dir(&dir).unwrap();
    let key = write(&dir.join("mesh-key.bin"), &value);
    let creds = g.lan.tmp.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let tuners_text = format!("# the lab's tuner\n{TUNER_ADDR}\n");
    write(&creds.join("ec.tuners"), tuners_text.as_bytes());
    let key_arg = format!("mesh-key={}", key.display());
    let creds_arg = creds.to_string_lossy().into_owned();
    let cred_args = ["--credential", &key_arg, "--credentials-from", &creds_arg];

    let mut args = vec!["--ready-timeout", "600"];
    args.extend_from_slice(&cred_args);
    let mut run = g.run("ec_credentials=mesh-key,ec.tuners,absent", None, &args);
    let status = run.wait_ready(READY_TIMEOUT);

    // QEMU's command line names the file, never the value.
    let pids = qemu_pids(&run.state);
    assert_eq!(pids.len(), 1, "one QEMU: {pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let cmdline_text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(!cmdline_text.contains(&marker), "the secret is in QEMU's cmdline: {cmdline_text}");
    assert!(
        cmdline_text.contains(&format!("-fw_cfg name=opt/io.systemd.credentials/mesh-key,file={}", key.display())),
        "{cmdline_text}"
    );

    // The guest got both values, byte for byte.
    let serial = run.serial();
    for (name, bytes) in [("mesh-key", value.as_slice()), ("ec.tuners", tuners_text.as_bytes())] {
        let line = format!("ec-guest: credential {name} sha256 {} size {}\n", sha256_hex(bytes), bytes.len());
        assert!(serial.contains(&line), "{t}: the guest did not get {name} intact ({line:?})\n{serial}");
    }
    // The publisher's line names them, the missing one marked, before the ready line.
    let names_line = "ec-publisher: credentials mesh-key ec.tuners absent(missing)\n";
    let at = serial.find(names_line).unwrap_or_else(|| panic!("{t}: no credentials line\n{serial}"));
    assert!(at < serial.find("ec-publisher: ready").unwrap(), "{t}: the credentials line comes after ready");
    // Broadcast found nothing; the static list found the tuner.
    assert!(serial.contains(&format!("ec-publisher: tuner discovery: static tuner list ec.tuners: {TUNER_ADDR}\n")));
    let found =
        format!("ec-publisher: tuner discovery: FOUND hdhomerun device {TUNER_ID} found at {TUNER_ADDR} (ec.tuners)");
    assert!(serial.contains(&found), "{t}: the tuner was not found through ec.tuners\n{serial}");

    // status.json: the names, not the values.
    assert_eq!(status["credentials"], serde_json::json!(["ec.tuners", "mesh-key"]), "{status:#}");
    let raw_status = std::fs::read(run.state.join("status.json")).unwrap();
    assert!(!String::from_utf8_lossy(&raw_status).contains(&marker));
    let human = run_out(Command::new(BIN).args(["status", "--state-dir"]).arg(&run.state));
    assert!(human.contains("  credentials:   ec.tuners mesh-key\n"), "{human}");

    // print-args: the exact argv, paths and no values; the names and sizes on stderr.
    let other_state = g.lan.tmp.path().join("print-args-state");
    let www = g.www.to_string_lossy().into_owned();
    let print_args =
        ["--accel", "tcg", "--memory", "256", "--no-disk", "--lan-interface", &g.lan.name, "--boot-dir", &www];
    let out = common::run(
        g.lan.lab.host.cmd(BIN).args(["print-args", "--state-dir"]).arg(&other_state).args(print_args).args(cred_args),
    );
    assert!(out.status.success(), "print-args: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    let argv: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!printed.contains(&marker), "{printed}");
    assert!(argv.contains(&format!("name=opt/io.systemd.credentials/mesh-key,file={}", key.display())), "{printed}");
    let said = String::from_utf8_lossy(&out.stderr);
    let sizes = format!("ec.tuners ({} bytes), mesh-key ({} bytes)", tuners_text.len(), value.len());
    assert!(said.contains(&sizes), "print-args does not name the credentials and sizes: {said}");
    assert!(!other_state.exists(), "print-args created its state directory");

    // Stop; nothing anywhere carries the value.
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let ended = run.wait(Duration::from_secs(120));
    assert_exit(ended, 0, &run);
    assert!(no_qemu_left(&run.state));
    let stderr = run.stderr();
    assert!(stderr.contains(&format!("credentials for the guest (fw_cfg opt/io.systemd.credentials/NAME): {sizes}")));
    assert!(!stderr.contains(&marker), "the secret is in the launcher's log");
    let serial_bytes = std::fs::read(run.state.join("serial.log")).unwrap();
    assert!(!String::from_utf8_lossy(&serial_bytes).contains(&marker), "the secret is in serial.log");
    assert!(!serial_bytes.windows(value.len()).any(|w| w == value.as_slice()));
    let raw_status = std::fs::read(run.state.join("status.json")).unwrap();
    assert!(!String::from_utf8_lossy(&raw_status).contains(&marker));
}

fn run_out(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// `ec-ipxe-qemu SUB --state-dir STATE --no-disk --accel tcg ARGS` (as `user` when given, through setpriv).
fn launcher(sub: &str, state: &Path, args: &[&str], user: Option<&str>, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([&format!("--reuid={u}"), &format!("--regid={u}"), "--clear-groups", BIN]);
            c
        }
        None => Command::new(BIN),
    };
    cmd.arg(sub).arg("--state-dir").arg(state).args(["--no-disk", "--accel", "tcg"]).args(args);
    cmd.env_remove("CREDENTIALS_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

/// Bad input: the documented exit code, one line naming the credential, and no state directory.
#[test]
fn bad_credentials_exit_before_anything_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ok = write(&d.join("ok"), b"value");
    let big = write(&d.join("big"), &vec![b'x'; 1024 * 1024 + 1]);
    let half = write(&d.join("half"), &vec![b'x'; 512 * 1024 + 1]);
    let fifo = d.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let bad_dir = d.join("bad-dir");
    std::fs::create_dir(&bad_dir).unwrap();
    write(&bad_dir.join("a-name-that-is-29-bytes-long!"), b"x");
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let c = |name: &str, path: &Path| format!("{name}={}", path.display());
    let many: Vec<String> =
        (0..17).map(|i| c(&format!("c{i}"), &ok)).flat_map(|a| ["--credential".into(), a]).collect();

    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--credential".into(), c("a/b", &ok)], "credential name \"a/b\" contains '/'"),
        (vec!["--credential".into(), c(&"n".repeat(29), &ok)], "is 29 bytes long (at most 28"),
        (vec!["--credential".into(), c("k", &d.join("missing"))], "missing\": does not exist"),
        (vec!["--credential".into(), c("k", &big)], "holds 1048577 bytes, at most 1048576"),
        (
            vec!["--credential".into(), c("h1", &half), "--credential".into(), c("h2", &half)],
            "hold 1048578 bytes together",
        ),
        (vec!["--credential".into(), c("k", &fifo)], "fifo\": is not a regular file"),
        (vec!["--credential".into(), c("k", d)], "is not a regular file"),
        (
            vec!["--credential".into(), c("k", &ok), "--credential".into(), c("k", &ok)],
            "credential \"k\": is given twice",
        ),
        (many, "17 given, at most 16"),
        (vec!["--credentials-from".into(), p(&d.join("no-dir"))], "no-dir\": does not exist"),
        (vec!["--credentials-from".into(), p(&bad_dir)], "is 29 bytes long"),
    ];
    let state = d.join("state");
    for (args, says) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        for sub in ["run", "print-args"] {
            let out = launcher(sub, &state, &args, None, &[]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{sub} {args:?}: {err}");
            // One line naming the credential and the reason (clap adds its "For more information" hint).
            assert!(err.lines().next().is_some_and(|l| l.contains(says)), "{sub} {args:?}: {err}");
            assert!(!state.exists(), "{sub} {args:?} created the state directory");
        }
    }

    // $CREDENTIALS_DIRECTORY is the default directory; set but empty means none; --credentials-from wins.
    let creds = d.join("creds");
    std::fs::create_dir(&creds).unwrap();
    write(&creds.join("ec.tuners"), b"192.0.2.1\n");
    let argv = |env: &[(&str, &str)], args: &[&str]| -> Vec<String> {
        let out = launcher("print-args", &state, args, None, env);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Vec<String>>(&out.stdout)
            .unwrap()
            .into_iter()
            .filter(|a| a.starts_with("name=opt/"))
            .collect()
    };
    let env_dir = p(&creds);
    assert_eq!(
        argv(&[("CREDENTIALS_DIRECTORY", &env_dir)], &[]),
        [format!("name=opt/io.systemd.credentials/ec.tuners,file={}", creds.join("ec.tuners").display())]
    );
    assert!(argv(&[("CREDENTIALS_DIRECTORY", "")], &[]).is_empty());
    let explicit = p(&bad_dir);
    let out = launcher(
        "print-args",
        &state,
        &["--credentials-from", &explicit],
        None,
        &[("CREDENTIALS_DIRECTORY", &env_dir)],
    );
    assert_eq!(out.status.code(), Some(2), "--credentials-from wins over the environment");
    assert!(!state.exists());
}

/// A file the launcher's user cannot read: exit 5 from run and print-args, doctor names it; nothing created.
#[test]
fn an_unreadable_credential_is_exit_5() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let root = nix::unistd::geteuid().is_root();
    // As root, the launcher runs as nobody (root reads any file); the state's parent is writable by nobody, so
    // the credential is the only problem.
    let user = root.then_some("65534");
    if root {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    }
    let key = write(&d.join("key"), b"root-only");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(if root { 0o600 } else { 0o000 }))
        .unwrap();
    let arg = format!("k={}", key.display());
    let state = d.join("state");
    for sub in ["run", "print-args"] {
        let out = launcher(sub, &state, &["--credential", &arg], user, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{sub}: {err}");
        assert!(err.contains("credential \"k\" file") && err.contains("not readable by this user"), "{err}");
        assert!(!state.exists(), "{sub} created the state directory");
    }
    let out = launcher("doctor", &state, &["--credential", &arg], user, &[]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.lines().any(|l| l.starts_with("fail  credentials") && l.contains("not readable by this user")),
        "{said}"
    );
    assert!(!state.exists(), "doctor created the state directory");
}

/// The most credentials the launcher takes, with the argv's other fw_cfg users (`-kernel` for `--ipxe`, a
/// disk): QEMU starts and the diagnostics boot reaches ready.
#[test]
#[ignore = "needs root"]
fn sixteen_credentials_fit_qemus_fw_cfg() {
    let t = "sixteen_credentials_fit_qemus_fw_cfg";
    require_root(t);
    if !require_qemu(t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("creds");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..16 {
        write(&dir.join(format!("credential-number-{i:02}")), format!("value {i}\n").as_bytes());
    }
    let dir = dir.to_string_lossy().into_owned();
    let state = tmp.path().join("state");
    let mut run = Run::start(
        None,
        &state,
        &["--ipxe", "/usr/lib/ipxe/ipxe.lkrn", "--disk-size", "16M", "--credentials-from", &dir],
    );
    run.wait_stderr("boot stage ready", READY_TIMEOUT);
    let pids = qemu_pids(&state);
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap()).into_owned();
    assert_eq!(cmdline.matches("name=opt/io.systemd.credentials/").count(), 16, "{cmdline}");
}
