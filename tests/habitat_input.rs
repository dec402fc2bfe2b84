//! Input and output that used to end a run (issue 16): a byte that is not UTF-8 in any option of either
//! binary, output to a reader that went away or a closed descriptor, an owner id chown(2) cannot set, and
//! `exec` of something that is not a program. Real binaries, real pipes, a real kernel namespace.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};

use common::{Netns, random_index, require_root, stderr, unique};

const LAUNCHER: &str = env!("CARGO_BIN_EXE_ec-ipxe-qemu");
const MACVTAP: &str = env!("CARGO_BIN_EXE_ec-macvtap");

/// Exit codes of a panic: 101 (unwind, debug builds) and 134 (abort, release builds).
fn panicked(out: &Output) -> bool {
    matches!(out.status.code(), Some(101 | 134)) || stderr(out).contains("panicked")
}

/// The options of `BIN SUB --help` that take a value, as (flag, VALUE NAME).
fn value_options(bin: &str, sub: &str) -> Vec<(String, String)> {
    let out = Command::new(bin).args([sub, "--help"]).output().unwrap();
    assert!(out.status.success(), "{bin} {sub} --help");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut opts = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        let line = line.split_once(", ").filter(|(s, _)| s.len() == 2).map_or(line, |(_, l)| l);
        let Some(rest) = line.strip_prefix("--") else { continue };
        let mut words = rest.split_whitespace();
        let flag = words.next().unwrap_or_default();
        if let Some(value) = words.next().and_then(|v| v.strip_prefix('<')).and_then(|v| v.strip_suffix('>')) {
            opts.push((format!("--{flag}"), value.to_owned()));
        }
    }
    assert!(!opts.is_empty(), "no options parsed from {bin} {sub} --help:\n{text}");
    opts
}

/// Paths are taken as they are (a file name need not be UTF-8).
fn is_path(value_name: &str) -> bool {
    matches!(value_name, "DIR" | "PATH" | "FILE")
}

fn os(parts: &[&[u8]]) -> Vec<OsString> {
    parts.iter().map(|p| OsString::from_vec(p.to_vec())).collect()
}

/// Every text option of every subcommand of both binaries, in both spellings (`--opt V`, `--opt=V`), and
/// the positional names: exit 2 with one line naming the option, never a panic. Nothing is created: the
/// state directory of the launcher commands stays absent.
#[test]
fn non_utf8_in_any_option_is_one_usage_line() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let state_arg = state.to_str().unwrap().as_bytes().to_vec();
    let mut cases: Vec<(&str, Vec<OsString>, String)> = Vec::new();
    for sub in ["print-args", "doctor", "run", "status", "console"] {
        for (flag, value) in value_options(LAUNCHER, sub) {
            if is_path(&value) {
                continue;
            }
            let pre = os(&[sub.as_bytes(), b"--state-dir", &state_arg]);
            for argv in [
                [pre.clone(), os(&[flag.as_bytes(), b"a\xffb"])].concat(),
                [pre, os(&[&[flag.as_bytes(), b"=a\xffb"].concat()])].concat(),
            ] {
                cases.push((LAUNCHER, argv, flag.clone()));
            }
        }
    }
    for sub in ["create", "delete", "show", "exec", "probe"] {
        for (flag, value) in value_options(MACVTAP, sub) {
            assert!(!is_path(&value), "{sub} {flag}");
            cases.push((MACVTAP, os(&[sub.as_bytes(), flag.as_bytes(), b"\xfe"]), flag.clone()));
        }
    }
    cases.push((MACVTAP, os(&[b"delete", b"ec\xff"]), "argument".into()));
    cases.push((MACVTAP, os(&[b"show", b"ec\xff"]), "argument".into()));
    cases.push((MACVTAP, os(&[b"exec", b"--name", b"x", b"--", b"\xff"]), "argument".into()));
    cases.push((LAUNCHER, os(&[b"print-args", b"--state-dir", &state_arg, b"--", b"-S\xff"]), "argument 5".into()));
    assert!(cases.len() > 40, "too few options found: {}", cases.len());
    for (bin, argv, flag) in &cases {
        for json in [false, true] {
            let mut c = Command::new(bin);
            if json && *bin == MACVTAP {
                c.arg("--json");
            }
            let out = c.args(argv).stdin(Stdio::null()).output().unwrap();
            let what = format!("{bin} {argv:?}");
            assert!(!panicked(&out), "{what}: panicked\n{}", stderr(&out));
            assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
            let err = stderr(&out);
            assert_eq!(err.lines().count(), 1, "{what}: not one line:\n{err}");
            let named = if flag == "argument" {
                let at = argv.iter().position(|a| a.to_str().is_none()).unwrap() + 1 + usize::from(json);
                format!("argument {at} \"")
            } else {
                format!("{flag} \"")
            };
            assert!(err.contains(&named) && err.contains("not valid UTF-8"), "{what}: {err}");
            if json && *bin == MACVTAP {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error on stdout");
                assert_eq!(v["error"]["code"], 2, "{what}: {v}");
            }
        }
    }
    assert!(!state.exists(), "a refused command created {}", state.display());
}

/// A path that is not UTF-8 cannot go into QEMU's command line: one line naming the option, exit 2, nothing
/// created.
#[test]
fn non_utf8_paths_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let mut state = tmp.path().as_os_str().to_owned().into_vec();
    state.extend_from_slice(b"/st\xffate");
    let out = Command::new(LAUNCHER)
        .arg("print-args")
        .arg("--state-dir")
        .arg(OsString::from_vec(state))
        .arg("--no-disk")
        .output()
        .unwrap();
    assert!(!panicked(&out), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--state-dir") && err.contains("st\\xFFate"), "{err}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "print-args created something");
}

/// A pipe whose reader has gone away (`| head -c0`), on stdout or stderr or both.
#[derive(Clone, Copy, Debug)]
enum Gone {
    Stdout,
    Stderr,
    Both,
    /// The descriptors are closed outright (`>&- 2>&-`).
    Closed,
}

fn run_gone(mut cmd: Command, gone: Gone) -> Option<i32> {
    use std::os::unix::process::CommandExt;
    match gone {
        Gone::Closed => {
            // SAFETY: only async-signal-safe close(2) between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    nix::libc::close(1);
                    nix::libc::close(2);
                    Ok(())
                });
            }
            let out = cmd.stdin(Stdio::null()).status().unwrap();
            return out.code();
        }
        Gone::Stdout | Gone::Both | Gone::Stderr => {}
    }
    let out_pipe = matches!(gone, Gone::Stdout | Gone::Both);
    let err_pipe = matches!(gone, Gone::Stderr | Gone::Both);
    cmd.stdin(Stdio::null()).stdout(if out_pipe { Stdio::piped() } else { Stdio::null() }).stderr(if err_pipe {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    child.wait().unwrap().code()
}

/// Commands that print data, log lines and a final error, each with stdout and/or stderr gone: the exit
/// code is the one it has with both open, never a panic (before: 101/134 from `println!`/`eprint!` and from
/// tracing's fallback on EPIPE).
#[test]
fn a_reader_that_went_away_changes_no_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let s = state.to_str().unwrap();
    let missing = tmp.path().join("missing");
    let m = missing.to_str().unwrap();
    let cases: Vec<(&str, Vec<&str>, i32)> = vec![
        // data on stdout, trace lines on stderr
        (LAUNCHER, vec!["-vvv", "print-args", "--state-dir", s, "--no-disk"], 0),
        // one error line (exit 2) and a JSON error on stdout
        (LAUNCHER, vec!["-vv", "print-args", "--json", "--state-dir", s, "--boot-dir", m], 2),
        // a usage error from clap
        (MACVTAP, vec!["create", "--link", "a/b"], 2),
        (MACVTAP, vec!["--json", "create", "--link", "a\u{1}b"], 2),
        // status of a directory no launcher holds: report on stdout, warning on stderr, exit 3
        (LAUNCHER, vec!["status", "--state-dir", m], 3),
        (LAUNCHER, vec!["status", "--json", "--state-dir", m], 3),
        // help on stdout
        (LAUNCHER, vec!["run", "--help"], 0),
    ];
    for (bin, args, _) in &cases {
        let open = Command::new(bin).args(args).stdin(Stdio::null()).output().unwrap();
        assert!(!panicked(&open), "{args:?}: {}", stderr(&open));
        for gone in [Gone::Stdout, Gone::Stderr, Gone::Both, Gone::Closed] {
            let mut c = Command::new(bin);
            c.args(args);
            let code = run_gone(c, gone);
            assert_eq!(code, open.status.code(), "{bin} {args:?} with {gone:?}");
        }
    }
    for (bin, args, code) in &cases {
        let open = Command::new(bin).args(args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(open.status.code(), Some(*code), "{bin} {args:?}: {}", stderr(&open));
    }
    assert!(!state.exists() && !missing.exists(), "a command created files");
}

/// A namespace with a veth parent at random high indexes.
fn ns_with_parent() -> (Netns, String) {
    let ns = Netns::new("eh");
    let (p, q) = (unique("p"), unique("q"));
    let (pi, qi) = (random_index().to_string(), random_index().to_string());
    ns.ip(&["link", "add", "name", &p, "index", &pi, "type", "veth", "peer", "name", &q, "index", &qi]);
    ns.ip(&["link", "set", &p, "up"]);
    (ns, p)
}

/// `--owner 4294967295` (or `USER:4294967295`) is (uid_t)-1 / (gid_t)-1, which chown(2) reads as "leave
/// unchanged": exit 2 before anything is created (before: exit 0, "owned", and the node stayed root's).
#[test]
#[ignore = "needs root"]
fn an_owner_chown_cannot_set_is_refused_before_anything_is_created() {
    require_root("an_owner_chown_cannot_set_is_refused_before_anything_is_created");
    let (ns, parent) = ns_with_parent();
    let before = ns.link_table();
    for (owner, word) in [("4294967295", "uid_t"), ("0:4294967295", "gid_t"), ("4294967295:0", "uid_t")] {
        let name = unique("eo");
        let out = common::macvtap(Some(&ns), &["create", "--link", &parent, "--name", &name, "--owner", owner]);
        assert_eq!(out.status.code(), Some(2), "--owner {owner}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("--owner") && err.contains("4294967295") && err.contains(word), "{err}");
        assert_eq!(ns.link_table(), before, "--owner {owner} left a link");
    }
    // The largest id chown(2) can set is still taken.
    let name = unique("eo");
    let _del = common::DeleteOnDrop::new(&ns, &name);
    let out =
        common::macvtap(Some(&ns), &["--json", "create", "--link", &parent, "--name", &name, "--owner", "4294967294"]);
    let v = common::json(&out);
    let node = v["tap_device"].as_str().expect("a tap node");
    let meta = std::fs::metadata(node).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (4_294_967_294, 4_294_967_294), "{v}");
}

/// `exec` of a file that is not a program says so, names the program, and gives no hint about the tap node
/// (which it had opened fine): exit 5 (before: "check the owner of the device node", the node blamed).
#[test]
#[ignore = "needs root"]
fn exec_of_something_that_is_not_a_program_says_so() {
    require_root("exec_of_something_that_is_not_a_program_says_so");
    let (ns, parent) = ns_with_parent();
    let name = unique("ex");
    let _del = common::DeleteOnDrop::new(&ns, &name);
    let out = common::macvtap(Some(&ns), &["create", "--link", &parent, "--name", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("script.sh");
    std::fs::write(&plain, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dir = tmp.path().join("adir");
    std::fs::create_dir(&dir).unwrap();
    for (program, reason, code) in
        [(&plain, "cannot be executed", 5), (&dir, "is a directory", 5), (&tmp.path().join("absent"), "not found", 3)]
    {
        let p = program.to_str().unwrap();
        let out = common::macvtap(Some(&ns), &["exec", "--name", &name, "--", p, "{fd}"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{p}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&format!("program {p:?}")) && err.contains(reason), "{p}: {err}");
        assert!(!err.contains("device node"), "{p}: blames the tap node: {err}");
    }
    let meta = std::fs::metadata(&plain).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o644, "the file was changed");
}
