//! Logs of both binaries as an operator sees them: journal priorities when stderr is the journal, what
//! `-v`/`-vv`/`-vvv` add, and `-j` as `--json`.
//!
//! "stderr is the journal" is decided the way systemd documents it: `JOURNAL_STREAM` holds the device and inode
//! of the stream journald gave the service. The tests give the binaries a real file as stderr and put that
//! file's device:inode in `JOURNAL_STREAM`, which is exactly what the binaries see under systemd; what
//! journald then does with `<N>` prefixes is its documented stream protocol (`SyslogLevelPrefix=`, on by
//! default).
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use common::{Netns, require_root, unique};

const LAUNCHER: &str = env!("CARGO_BIN_EXE_ec-ipxe-qemu");
const MACVTAP: &str = env!("CARGO_BIN_EXE_ec-macvtap");

/// How stderr is connected.
#[derive(Clone, Copy, PartialEq)]
enum Stderr {
    /// A file, with `JOURNAL_STREAM` naming it.
    Journal,
    /// A file, with `JOURNAL_STREAM` inherited from somewhere else (another inode).
    OtherStream,
    /// A file, no `JOURNAL_STREAM`.
    Plain,
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run_with(mut cmd: Command, how: Stderr, rust_log: Option<&str>) -> Out {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("stderr");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    cmd.env_remove("RUST_LOG").env_remove("JOURNAL_STREAM");
    match how {
        Stderr::Journal => {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        Stderr::OtherStream => {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino() + 1));
        }
        Stderr::Plain => {}
    }
    if let Some(v) = rust_log {
        cmd.env("RUST_LOG", v);
    }
    let out = cmd.stdin(Stdio::null()).stderr(file).output().unwrap();
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: std::fs::read_to_string(&path).unwrap(),
    }
}

/// Every line starts with a priority prefix and the text right after it (no stray space); returns the
/// (priority, text) pairs.
fn journal_lines(stderr: &str) -> Vec<(u8, String)> {
    assert!(!stderr.is_empty(), "nothing logged");
    stderr
        .lines()
        .map(|l| {
            let rest = l.strip_prefix('<').unwrap_or_else(|| panic!("line without a priority: {l:?}\n{stderr}"));
            let (p, text) = rest.split_once('>').unwrap_or_else(|| panic!("bad prefix: {l:?}"));
            let p: u8 = p.parse().unwrap_or_else(|_| panic!("bad priority in {l:?}"));
            assert!((0..=7).contains(&p), "{l:?}");
            assert!(!text.starts_with(char::is_whitespace), "stray leading space: {l:?}");
            (p, text.to_owned())
        })
        .collect()
}

fn launcher(state: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(LAUNCHER);
    c.args(["print-args", "--qemu", "/bin/true", "--no-disk", "--state-dir"]).arg(state).args(args);
    c
}

#[test]
fn journal_priorities_when_stderr_is_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");

    // INFO (the accelerator decision) and WARNING (an https URL for the ROM's iPXE, without the boot cache):
    // <6> and <4>.
    let args = ["--accel", "auto", "--boot-url", "https://boot.example/x", "--boot-cache", "off"];
    let out = run_with(launcher(&state, &args), Stderr::Journal, None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let lines = journal_lines(&out.stderr);
    assert!(lines.iter().any(|(p, t)| *p == 6 && t.starts_with("accelerator: ")), "{}", out.stderr);
    assert!(lines.iter().any(|(p, t)| *p == 4 && t.starts_with("--boot-url https://")), "{}", out.stderr);
    assert!(!out.stderr.contains("INFO") && !out.stderr.contains("WARN"), "level words under the journal");
    assert!(!out.stderr.contains(" 20") && !out.stderr.starts_with("<6>20"), "timestamps under the journal");

    // -v adds debug lines (<7>) of the launcher's own decisions.
    let out = run_with(launcher(&state, &["-v", "--accel", "tcg"]), Stderr::Journal, None);
    let lines = journal_lines(&out.stderr);
    assert!(lines.iter().any(|(p, t)| *p == 7 && t.starts_with("--qemu /bin/true")), "{}", out.stderr);

    // A failed command: its one line is an error (<3>).
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let out = run_with(launcher(&file, &[]), Stderr::Journal, None);
    assert_eq!(out.code, Some(2));
    let lines = journal_lines(&out.stderr);
    assert!(
        lines
            .iter()
            .any(|(p, t)| *p == 3 && t.starts_with("ec-ipxe-qemu: --state-dir ") && t.contains("is not a directory")),
        "{}",
        out.stderr
    );

    // A usage error: every line of clap's text is an error, the first one names the option.
    let out = run_with(launcher(&state, &["--memory", "1"]), Stderr::Journal, None);
    assert_eq!(out.code, Some(2));
    let lines = journal_lines(&out.stderr);
    assert!(lines.iter().all(|(p, _)| *p == 3), "{}", out.stderr);
    assert!(lines[0].1.starts_with("error: invalid value '1' for '--memory <SIZE>'"), "{}", out.stderr);

    // ec-macvtap's errors too (a lookup by name in this namespace only reads).
    let missing = unique("nx");
    let out = run_with(
        {
            let mut c = Command::new(MACVTAP);
            c.args(["show", &missing]);
            c
        },
        Stderr::Journal,
        None,
    );
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    let lines = journal_lines(&out.stderr);
    assert!(
        lines.iter().any(|(p, t)| *p == 3 && t.starts_with(&format!("ec-macvtap: link \"{missing}\""))),
        "{}",
        out.stderr
    );
}

#[test]
fn a_journal_stream_of_another_file_is_not_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    for how in [Stderr::OtherStream, Stderr::Plain] {
        let out = run_with(launcher(&state, &["--accel", "auto"]), how, None);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let line = out.stderr.lines().find(|l| l.contains("accelerator: ")).expect("the accelerator line");
        assert!(!line.starts_with('<'), "{line:?}");
        // A timestamp, then the level word.
        assert!(line.starts_with("20") && line.contains(" INFO "), "{line:?}");
    }
}

#[test]
fn json_is_j_on_print_args() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    for flag in ["-j", "--json"] {
        let out = run_with(launcher(&state, &[flag, "--accel", "tcg"]), Stderr::Plain, None);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(v.as_array().is_some_and(|a| a.iter().any(|x| x == "tcg")), "{v}");

        // Under -j, errors are JSON on stdout too: a refused value and a usage error.
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let out = run_with(launcher(&file, &[flag]), Stderr::Plain, None);
        assert_eq!(out.code, Some(2));
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["error"]["code"], 2, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("--state-dir"), "{v}");
        let out = run_with(launcher(&state, &[flag, "--memory", "1"]), Stderr::Plain, None);
        assert_eq!(out.code, Some(2));
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("--memory"), "{v}");
    }
}

/// `ec-macvtap --netns NS ARGS`, stderr as a plain file, with `RUST_LOG` when given.
fn macvtap(ns: &Netns, args: &[&str], rust_log: Option<&str>) -> Out {
    let mut c = Command::new(MACVTAP);
    c.args(["--netns", &ns.name]).args(args);
    run_with(c, Stderr::Plain, rust_log)
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.lines().filter(|l| l.contains(needle)).count()
}

#[test]
#[ignore = "needs root"]
fn verbosity_adds_our_lines_and_dependencies_stay_quiet() {
    require_root("verbosity_adds_our_lines_and_dependencies_stay_quiet");
    let ns = Netns::new("lg");
    let p = unique("p");
    ns.veth(&p, &unique("q"));
    let name = unique("mv");
    let _guard = common::DeleteOnDrop::new(&ns, &name);
    let create = ["create", "--link", p.as_str(), "--name", name.as_str()];
    let delete = |ns: &Netns| {
        let out = macvtap(ns, &["-q", "delete", &name], None);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    };

    // Default: INFO of ours only; a plain create has nothing to report on stderr.
    let out = macvtap(&ns, &create, None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(count(&out.stderr, "DEBUG") + count(&out.stderr, "TRACE"), 0, "{}", out.stderr);
    delete(&ns);

    // -v: each netlink request we make and the decisions, at DEBUG; no TRACE, nothing of netlink-proto.
    let out = macvtap(&ns, &["-v"].iter().chain(&create).copied().collect::<Vec<_>>(), None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let e = &out.stderr;
    for needle in [
        format!("netlink: get link \"{p}\""),
        "netlink: add macvtap ".to_owned(),
        "netlink: set link ".to_owned(),
        "MAC ".to_owned(),
        format!("entering network namespace \"{}\"", ns.name),
        "tap node".to_owned(),
    ] {
        assert!(e.contains(&needle), "-v lacks {needle:?}:\n{e}");
    }
    assert!(count(e, " DEBUG ") >= 8, "{e}");
    assert_eq!(count(e, "TRACE"), 0, "{e}");
    assert_eq!(count(e, "netlink_proto") + count(e, "netlink_sys"), 0, "{e}");
    let v_lines = e.lines().count();
    delete(&ns);

    // -vv: more of ours (TRACE), still nothing of the dependencies.
    let out = macvtap(&ns, &["-vv"].iter().chain(&create).copied().collect::<Vec<_>>(), None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let e = &out.stderr;
    assert!(count(e, " TRACE ") > 0 && e.contains("netlink: RTM_NEWLINK"), "{e}");
    assert!(e.lines().count() > v_lines, "-vv adds nothing to -v:\n{e}");
    assert_eq!(count(e, "netlink_proto") + count(e, "netlink_sys"), 0, "{e}");
    let vv_lines = e.lines().count();
    delete(&ns);

    // -vvv: everything, the dependencies' internals too, with their targets.
    let out = macvtap(&ns, &["-vvv"].iter().chain(&create).copied().collect::<Vec<_>>(), None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let e = &out.stderr;
    assert!(count(e, "netlink_proto::") > 0, "-vvv shows no netlink-proto TRACE:\n{e}");
    eprintln!("FIGURE stderr lines of `ec-macvtap create`: -v {v_lines}, -vv {vv_lines}, -vvv {}", e.lines().count());
    delete(&ns);

    // RUST_LOG wins over the flags.
    let out = macvtap(&ns, &create, Some("netlink_proto=trace"));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let e = &out.stderr;
    assert!(count(e, "netlink_proto::") > 0 && !e.contains("netlink: add macvtap"), "{e}");
    delete(&ns);

    // -j is --json, before or after the subcommand, alone or in a cluster.
    let out = macvtap(&ns, &["-j"].iter().chain(&create).copied().collect::<Vec<_>>(), None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!((v["name"].as_str(), v["changed"].as_bool()), (Some(name.as_str()), Some(true)), "{v}");
    let out = macvtap(&ns, &["show", &name, "-j"], None);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["name"], name.as_str(), "{v}");
    let out = macvtap(&ns, &["-qj", "delete", &name], None);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["result"], "deleted", "{v}");
    // Errors as JSON under -j, usage errors included.
    let out = macvtap(&ns, &["-j", "show", &name], None);
    assert_eq!(out.code, Some(3));
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], 3, "{v}");
    let out = macvtap(&ns, &["create", "-j", "--link", &p, "--mode", "nope"], None);
    assert_eq!(out.code, Some(2));
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("--mode"), "{v}");
}
