//! The launcher's side of the shared refusal table `tests/data/refusals.json`.
//!
//! Each value there is also given to the NixOS module by `nix/tests/module-eval/` (run by
//! `scripts/nix-checks.sh`), which must refuse exactly the values marked `refused`. Here every value that
//! has launcher arguments goes to `ec-ipxe-qemu print-args`: a refused value is a usage error (exit 2, which
//! the unit does not restart: `RestartPreventExitStatus=2`), an accepted one is not. So the module refuses
//! at evaluation what the launcher would refuse at start, from one table.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ec-ipxe-qemu");

fn table() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/refusals.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

#[test]
fn launcher_verdicts_match_the_shared_table() {
    let tmp = tempfile::tempdir().unwrap();
    let boot_dir = tmp.path().join("boot");
    std::fs::create_dir(&boot_dir).unwrap();
    std::fs::write(boot_dir.join("netboot.ipxe"), "#!ipxe\n").unwrap();
    let state = tmp.path().join("state");

    let cases = table();
    let mut checked = 0;
    let mut refused = 0;
    let mut wrong = Vec::new();
    for case in &cases {
        let Some(args) = case["launcher"].as_array() else { continue };
        let args: Vec<String> =
            args.iter().map(|a| a.as_str().unwrap().replace("{boot_dir}", boot_dir.to_str().unwrap())).collect();
        let mut cmd = Command::new(BIN);
        // Real programs that exist everywhere: print-args only checks that they do.
        cmd.args(["print-args", "--qemu", "/bin/true", "--qemu-img", "/bin/true"]);
        if !args.iter().any(|a| a == "--state-dir") {
            cmd.arg("--state-dir").arg(&state);
        }
        if !args.iter().any(|a| a == "--disk-size") {
            cmd.arg("--no-disk");
        }
        cmd.args(&args);
        let out = common::run(&mut cmd);
        let code = out.status.code();
        let launcher_refused = code == Some(2);
        let expected = case["refused"].as_bool().unwrap();
        checked += 1;
        if launcher_refused {
            refused += 1;
            // A refusal is one line naming what is wrong.
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!stderr.trim().is_empty(), "{args:?}: exit 2 without a message");
        }
        if launcher_refused != expected {
            wrong.push(format!(
                "{} = {} ({args:?}): table says {}, the launcher exited {code:?}: {}",
                case["option"],
                case["value"],
                if expected { "refused" } else { "accepted" },
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        // print-args has no side effects.
        assert!(!state.exists(), "print-args {args:?} created {}", state.display());
    }
    eprintln!("refusal table: {checked} values given to the launcher, {refused} refused with exit 2");
    assert!(checked > 50, "the table lost its launcher cases ({checked})");
    assert!(wrong.is_empty(), "the launcher disagrees with tests/data/refusals.json:\n{}", wrong.join("\n"));
}
