//! Credentials under the real systemd: the NixOS module's `credentials.<name>.file` becomes
//! `LoadCredential=NAME:FILE` (rendered by the real NixOS code, `nix/tests/lab-unit.nix`), systemd 252 as PID 1
//! of the lab (`tests/systemd_lab`) copies the root-only file into the unit's `$CREDENTIALS_DIRECTORY`, and the
//! launcher, running as the unprivileged service user with no credential flag on its command line, hands it
//! to the real Linux test guest (served from the module's `boot.http.directory`) through QEMU's fw_cfg. The
//! guest prints the SHA-256 of what it got; the test compares it with the host's file, and looks for the value
//! in QEMU's command line, the journal, `serial.log` and `status.json`.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

mod systemd_lab;

use std::os::unix::fs::PermissionsExt;

use sha2::{Digest, Sha256};

use common::guest::{require_test_guest, write_boot_dir};
use common::{require_root, run, unique};
use systemd_lab::{BIN_DIR, ONE_QEMU_AT_A_TIME, STATE_DIR, SystemdLab, UNIT, module_unit_with, requirements};

#[test]
#[ignore = "needs root"]
fn load_credential_reaches_the_guest() {
    let t = "load_credential_reaches_the_guest";
    require_root(t);
    if !requirements(t) {
        return;
    }
    let Some(guest) = require_test_guest(t) else { return };
    let _one = ONE_QEMU_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());

    // Outside /tmp (the unit has PrivateTmp=) and readable by the service user: the boot directory. The key
    // is root-only (0600 in a 0700 directory): only systemd reads it, as root.
    let base = tempfile::Builder::new().prefix("ec-creds.").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let www = base.path().join("www");
    write_boot_dir(&www, &guest, "ec_credentials=mesh-key", None);
    for f in ["", "vmlinuz", "initrd.img", "netboot.ipxe"] {
        let mode = if f.is_empty() { 0o755 } else { 0o644 };
        std::fs::set_permissions(www.join(f), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let keys = base.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
    let marker = format!("EC-SYSTEMD-SECRET-{}", unique("k"));
    let value = format!("{marker}\nsecond line\n");
    let key = keys.join("mesh-key");
    std::fs::write(&key, &value).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let hash: String = Sha256::digest(value.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();

    // With the lab's LAN: the unit's first command is the privileged `ExecStartPre=+ec-macvtap create`, the
    // credential must still reach the unprivileged main process.
    let extra = serde_json::json!({
        "memory": 512,
        "credentials": { "mesh-key": { "file": key } },
        "boot": { "http": { "enable": true, "directory": www } },
    })
    .to_string();
    let Some(lab) = SystemdLab::start("public", |uplink| {
        let unit = module_unit_with(t, uplink, &extra)?;
        assert!(unit.contains(&format!("LoadCredential=mesh-key:{}\n", key.display())), "{unit}");
        assert!(!unit.contains("--credential"), "the command line names no credential: {unit}");
        Some(unit)
    }) else {
        return;
    };

    // Type=notify: start returns once the guest printed its ready line.
    lab.must(&["start", UNIT]);
    let serial = lab.serial();
    let got = format!("ec-guest: credential mesh-key sha256 {hash} size {}\n", value.len());
    assert!(serial.contains(&got), "the guest did not get the credential intact ({got:?})\n{serial}");
    assert!(serial.contains("ec-publisher: credentials mesh-key\n"), "{serial}");

    // The launcher found it in $CREDENTIALS_DIRECTORY; QEMU reads the copy there.
    let (code, json) = lab.status(&["--json"]);
    assert_eq!(code, Some(0), "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["credentials"], serde_json::json!(["mesh-key"]), "{json}");
    let qemu = lab.qemus().pop().expect("a QEMU runs");
    let cmdline = run(lab.nsenter().args(["cat", &format!("/proc/{}/cmdline", qemu.pid)]));
    let cmdline = String::from_utf8_lossy(&cmdline.stdout).replace('\0', " ");
    assert!(
        cmdline.contains(&format!(
            "-fw_cfg name=opt/io.systemd.credentials/mesh-key,file=/run/credentials/{UNIT}/mesh-key"
        )),
        "{cmdline}"
    );
    assert!(!cmdline.contains(&marker), "the value is in QEMU's command line");
    // The whole journal of the unit (lab.journal() shows only its tail).
    let journal = || -> String { lab.journal_entries().into_iter().map(|(_, m)| m).collect::<Vec<_>>().join("\n") };
    let text = journal();
    let names =
        format!("credentials for the guest (fw_cfg opt/io.systemd.credentials/NAME): mesh-key ({} bytes)", value.len());
    assert!(text.contains(&names), "{text}");
    assert!(text.contains("guest: ec-publisher: credentials mesh-key"), "{text}");
    lab.check_unprivileged("with a credential");

    lab.must(&["stop", UNIT]);
    lab.check_clean("after the stop", None);
    assert!(!journal().contains(&marker), "the value is in the journal");
    assert!(!lab.serial().contains(&marker), "the value is in serial.log");
    let status = run(lab.nsenter().args(["cat", &format!("{STATE_DIR}/status.json")]));
    assert!(!String::from_utf8_lossy(&status.stdout).contains(&marker), "the value is in status.json");
    // The doctor wrapper's view: outside the unit there is no $CREDENTIALS_DIRECTORY, so nothing to check.
    let doctor = run(lab.nsenter().args([&format!("{BIN_DIR}/ec-ipxe-qemu"), "doctor", "--state-dir", "/nonexistent"]));
    assert!(String::from_utf8_lossy(&doctor.stdout).contains("ok    credentials   none"));
}
