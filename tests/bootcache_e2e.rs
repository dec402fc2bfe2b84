//! The boot cache end to end: `ec-ipxe-qemu run --boot-url https://ORIGIN/boot.ipxe --boot-ca CA` with a real
//! QEMU under TCG and Debian's HTTP-only `ipxe.lkrn`, the launcher in the client namespace of
//! tests/common/origin.rs (a Python HTTPS origin with a private CA behind a 50 Mbit/s veth). The guest is an
//! iPXE script that `imgfetch`es a large file (relative: through the cache) and then prints the publisher
//! guest's ready line. Cases: cold, warm (304s), the origin changed, the origin 503 then down (the last good
//! set), a first boot with the origin down and no cache (the visible retry loop), and `--boot-cache off`.

#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::launcher::{BOOT_TIMEOUT, LKRN, Run, Slot, require_qemu};
use common::origin::{OriginLab, random_bytes};
use common::{require_programs, require_root, unique, wait_for};

/// Large enough that status.json shows its download (about 4 s at 50 Mbit/s).
const BIG: usize = 24 << 20;
const READY: &str = "ec-publisher: ready";

fn prepared(test: &str) -> bool {
    require_root(test);
    require_programs(test, &["python3", "openssl", "tc"]) && require_qemu(test)
}

/// The guest: fetch `big` through whatever served this script (retrying a failed fetch 3 times), say which
/// generation it got, then be ready.
fn guest_script(generation: &str) -> String {
    [
        "#!ipxe",
        ":fetch",
        "imgfetch big || goto retry",
        &format!("echo E2E-GOT {generation}"),
        &format!("echo {READY}"),
        "sleep 3600",
        ":retry",
        "inc tries",
        "iseq ${tries} 4 && goto failed ||",
        "echo E2E-RETRY ${tries}",
        "sleep 1",
        "goto fetch",
        ":failed",
        "echo E2E-FETCH-FAILED",
        "sleep 3600",
        "",
    ]
    .join("\n")
}

/// One boot: start the launcher in the client namespace, wait for the ready line and for the good set to be
/// recorded (when `marks`), read status.json, stop.
struct Boot {
    serial: String,
    status: serde_json::Value,
    log: String,
    downloads: Vec<serde_json::Value>,
}

fn boot(lab: &OriginLab, state: &Path, extra: &[&str], marks: bool) -> Boot {
    let url = lab.url("boot.ipxe");
    let ca = lab.ca();
    let mut args = vec!["--no-disk", "--ipxe", LKRN, "--boot-url", &url, "--boot-ca", ca.to_str().unwrap()];
    args.extend_from_slice(extra);
    // The previous boot's serial log must not answer for this one.
    let _ = std::fs::remove_file(state.join("serial.log"));
    let mut run = Run::start(Some(&lab.client), state, &args);
    // While the guest boots, status.json shows the file being sent (`download`), refreshed about once a second.
    let mut downloads = Vec::new();
    let t0 = std::time::Instant::now();
    while !run.serial().contains(READY) && run.running() && t0.elapsed() < BOOT_TIMEOUT {
        if state.join("status.json").exists() {
            let (_, v) = run.status_json();
            if !v["download"].is_null() {
                downloads.push(v["download"].clone());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = run.wait_serial(READY, BOOT_TIMEOUT);
    if marks {
        run.wait_stderr("are the last good set (ready)", Duration::from_secs(30));
    }
    let st = wait_for(Duration::from_secs(10), || {
        let (_, v) = run.status_json();
        (v["ready"] == true).then_some(v)
    })
    .unwrap_or_else(|| panic!("status.json never said ready:\n{}", run.stderr()));
    let log = run.stderr();
    drop(run);
    Boot { serial: s, status: st, log, downloads }
}

/// `doctor --json` in the client namespace: check name → check.
fn doctor(lab: &OriginLab, state: &Path, ca: bool) -> std::collections::HashMap<String, serde_json::Value> {
    let url = lab.url("boot.ipxe");
    let mut cmd = lab.client.cmd(common::launcher::BIN);
    cmd.args(["doctor", "--json", "--accel", "tcg", "--no-disk", "--boot-url", &url, "--state-dir"]).arg(state);
    if ca {
        cmd.arg("--boot-ca").arg(lab.ca());
    }
    let out = cmd.output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    v.as_array().unwrap().iter().map(|c| (c["check"].as_str().unwrap().to_owned(), c.clone())).collect()
}

fn object_names(state: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state.join("boot-cache/objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

fn objects(state: &Path) -> usize {
    std::fs::read_dir(state.join("boot-cache/objects")).map(|d| d.count()).unwrap_or(0)
}

#[test]
#[ignore = "needs root"]
fn cold_warm_changed_and_fallback_through_the_launcher() {
    let t = "cold_warm_changed_and_fallback_through_the_launcher";
    if !prepared(t) {
        return;
    }
    let _slot = Slot::take();
    let mut lab = OriginLab::new(true);
    lab.write("big", &random_bytes(BIG));
    lab.write("boot.ipxe", guest_script("one").as_bytes());
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join(unique("state"));

    // Cold: everything fetched from the origin over HTTPS (which this iPXE cannot do itself).
    let Boot { serial: s, status: st, log, downloads } = boot(&lab, &state, &[], true);
    assert!(log.contains("boot cache: no last good set yet"), "{log}");
    assert!(
        downloads
            .iter()
            .any(|d| d["file"] == "big" && d["total"] == BIG as u64 && d["bytes"].as_u64() <= Some(BIG as u64)),
        "status.json showed the download of big: {downloads:?}"
    );
    assert!(s.contains("E2E-GOT one"), "{s}");
    assert!(s.contains("ec-ipxe-qemu: chaining http://10.0.2.2:"), "iPXE chained to the loopback server:\n{s}");
    assert_eq!(st["boot_source"], "origin", "{st}");
    assert_eq!(st["boot_url"], lab.url("boot.ipxe"), "status names the origin: {st}");
    assert!(log.contains(&format!("chain: loading {} through the boot cache", lab.url("boot.ipxe"))), "{log}");
    let c = &st["boot_cache"];
    assert!(c["fetched_bytes"].as_u64().unwrap() >= BIG as u64, "{st}");
    assert!(c["served_bytes"].as_u64().unwrap() >= BIG as u64, "{st}");
    assert_eq!(c["revalidated"], 0, "{st}");
    assert!(state.join("boot-cache/good.json").is_file());
    assert_eq!(objects(&state), 2, "the script and the big file");
    let reqs = lab.requests();
    assert!(reqs.iter().any(|(m, p, code)| m == "GET" && p == "/big" && *code == 200), "{reqs:?}");

    // Warm: both files revalidated (304), nothing fetched.
    lab.clear_log();
    let Boot { serial: s, status: st, log, .. } = boot(&lab, &state, &[], true);
    assert!(log.contains("boot cache: a last good set of 2 files"), "{log}");
    assert!(s.contains("E2E-GOT one"), "{s}");
    assert_eq!(st["boot_source"], "origin", "{st}");
    let c = &st["boot_cache"];
    assert_eq!(c["fetched_bytes"], 0, "{st}");
    assert_eq!(c["revalidated"], 2, "{st}");
    assert!(c["served_bytes"].as_u64().unwrap() >= BIG as u64, "{st}");
    let reqs = lab.requests();
    assert!(reqs.iter().all(|(_, _, code)| *code == 304), "{reqs:?}");

    // doctor: the origin through the host's TLS with --boot-ca (and not without), and the last good set.
    let checks = doctor(&lab, &state, true);
    assert_eq!(checks["boot-url"]["status"], "ok", "{checks:?}");
    assert!(checks["boot-url"]["detail"].as_str().unwrap().contains("TLS verified"), "{checks:?}");
    assert_eq!(checks["boot-cache"]["status"], "ok", "{checks:?}");
    assert!(checks["boot-cache"]["detail"].as_str().unwrap().contains("a last good set of 2 files"), "{checks:?}");
    let checks = doctor(&lab, &state, false);
    assert_eq!(checks["boot-url"]["status"], "fail", "without --boot-ca the private CA is unknown: {checks:?}");
    let fresh = tmp.path().join(unique("fresh"));
    let checks = doctor(&lab, &fresh, true);
    assert_eq!(checks["boot-cache"]["status"], "warn", "{checks:?}");
    assert!(!fresh.exists(), "doctor changes nothing");

    // The origin changed: the guest gets the new files; the old ones are removed once it is ready.
    std::thread::sleep(Duration::from_millis(20));
    lab.write("boot.ipxe", guest_script("two").as_bytes());
    lab.write("big", &random_bytes(BIG));
    let Boot { serial: s, status: st, log, .. } = boot(&lab, &state, &[], true);
    assert!(log.contains("boot cache: a last good set of 2 files"), "{log}");
    assert!(s.contains("E2E-GOT two"), "{s}\n{:?}\n{st}", lab.requests());
    assert!(st["boot_cache"]["fetched_bytes"].as_u64().unwrap() >= BIG as u64, "{st}");
    assert!(wait_for(Duration::from_secs(10), || (objects(&state) == 2).then_some(())).is_some(), "pruned");

    // The origin answers 503: ready from the last good set, and status says so with the origin's error.
    lab.set_mode("503");
    let Boot { serial: s, status: st, log, .. } = boot(&lab, &state, &[], false);
    assert!(s.contains("E2E-GOT two"), "{s}");
    assert_eq!(st["boot_source"], "cache", "{st}");
    let err = st["boot_cache"]["origin_error"].as_str().unwrap_or_default().to_owned();
    assert!(err.contains("503"), "{st}");
    assert!(log.contains("boot stage ready: the guest is up, from cache (the origin failed: "), "{log}");
    assert_eq!(log.matches("booting from the last good set").count(), 1, "warned once:\n{log}");
    assert!(st["boot_cache"]["hits"].as_u64().unwrap() >= 2, "{st}");

    // The origin cuts the (changed) big file mid-body: nothing of it enters the cache, and the guest's retry
    // gets the last good set.
    let before = object_names(&state);
    lab.set_mode("cut");
    lab.write("big", &random_bytes(BIG));
    let Boot { serial: s, status: st, log, .. } = boot(&lab, &state, &[], false);
    assert!(s.contains("E2E-GOT two"), "{s}\n{log}");
    assert!(s.contains("E2E-RETRY"), "the cut fetch failed in the guest and was retried:\n{s}");
    assert_eq!(st["boot_source"], "cache", "{st}");
    assert_eq!(object_names(&state), before, "a cut download never enters the cache");

    // The origin is down: the same.
    lab.set_mode("ok");
    lab.stop();
    let Boot { serial: s, status: st, log, .. } = boot(&lab, &state, &[], false);
    assert!(log.contains("from cache (the origin failed: "), "{log}");
    assert!(s.contains("E2E-GOT two"), "{s}");
    assert_eq!(st["boot_source"], "cache", "{st}");
    assert!(!st["boot_cache"]["origin_error"].is_null(), "{st}");
}

#[test]
#[ignore = "needs root"]
fn first_boot_with_the_origin_down_retries_visibly() {
    let t = "first_boot_with_the_origin_down_retries_visibly";
    if !prepared(t) {
        return;
    }
    let _slot = Slot::take();
    let mut lab = OriginLab::new(true);
    lab.write("big", &random_bytes(1 << 20));
    lab.write("boot.ipxe", guest_script("one").as_bytes());
    lab.stop();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join(unique("state"));
    let url = lab.url("boot.ipxe");
    let ca = lab.ca();
    let mut run = Run::start(
        Some(&lab.client),
        &state,
        &["--no-disk", "--ipxe", LKRN, "--boot-url", &url, "--boot-ca", ca.to_str().unwrap()],
    );
    let s = run.wait_serial("retrying in 10 seconds", BOOT_TIMEOUT);
    assert!(s.contains("ec-ipxe-qemu: could not boot from http://10.0.2.2:"), "{s}");
    assert!(run.running(), "the launcher goes on:\n{}", run.stderr());
    let st = wait_for(Duration::from_secs(10), || {
        let (_, v) = run.status_json();
        (!v["boot_cache"]["origin_error"].is_null()).then_some(v)
    })
    .unwrap_or_else(|| panic!("status.json never showed the origin's error:\n{}", run.stderr()));
    assert_eq!(st["ready"], false, "{st}");
    assert_eq!(st["boot_source"], "origin", "{st}");
    let human =
        std::process::Command::new(common::launcher::BIN).args(["status", "--state-dir"]).arg(&state).output().unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("boot source:   origin (through the boot cache)"), "{human}");
    assert!(human.contains("; origin error: https://10.77.0.2/boot.ipxe: connection refused"), "{human}");
    // The origin comes back: the next attempt of the retry loop boots.
    lab.start();
    let s = run.wait_serial(READY, BOOT_TIMEOUT);
    assert!(s.contains("E2E-GOT one"), "{s}");
}

#[test]
#[ignore = "needs root"]
fn boot_cache_off_chains_directly() {
    let t = "boot_cache_off_chains_directly";
    if !prepared(t) {
        return;
    }
    let _slot = Slot::take();
    let lab = OriginLab::new(false);
    lab.write("big", &random_bytes(1 << 20));
    lab.write("boot.ipxe", guest_script("direct").as_bytes());
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join(unique("state"));
    let url = lab.url("boot.ipxe");
    let mut run = Run::start(
        Some(&lab.client),
        &state,
        &["--no-disk", "--ipxe", LKRN, "--boot-url", &url, "--boot-cache", "off"],
    );
    let s = run.wait_serial("E2E-GOT direct", BOOT_TIMEOUT);
    assert!(s.contains(&format!("ec-ipxe-qemu: chaining {url}")), "{s}");
    let reqs = lab.requests();
    assert!(reqs.iter().any(|(m, p, code)| m == "GET" && p == "/boot.ipxe" && *code == 200), "{reqs:?}");
    assert!(reqs.iter().any(|(m, p, code)| m == "GET" && p == "/big" && *code == 200), "{reqs:?}");
    let (_, st) = run.status_json();
    assert_eq!(st["boot_source"], "direct", "{st}");
    assert!(st["boot_cache"].is_null(), "{st}");
    assert!(!state.join("boot-cache").exists(), "no cache with --boot-cache off");
}
