//! The real Linux test guest: Debian's cloud kernel and a busybox initramfs running the publisher module's own
//! discovery and ready scripts (built and cached by scripts/build-test-guest.sh), served by the launcher's
//! `--boot-dir`, in the lab with dnsmasq, the tuner emulator and a macvtap made by ec-macvtap.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::launcher::{LanGuest, Run};
use super::{KillOnDrop, Lab, require_programs, require_root, skip_or_fail, wait_for};

/// The tuner the emulator plays in the lab: device id, address on the LAN port.
pub const TUNER_ID: &str = "1040CAFC";
pub const TUNER_ADDR: &str = "192.168.77.2";

/// The directory with vmlinuz and initrd.img, built once per test binary (the builder itself locks and
/// caches across processes). Err: why it could not be built.
pub fn test_guest_dir() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-test-guest.sh");
        let out = Command::new(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}): {}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("vmlinuz").is_file() && dir.join("initrd.img").is_file() {
            Ok(dir)
        } else {
            Err(format!("{} printed {}, which has no vmlinuz and initrd.img", script.display(), dir.display()))
        }
    })
    .clone()
}

/// The guest (skip or fail under CI=true when it cannot be built).
pub fn require_test_guest(test: &str) -> Option<PathBuf> {
    match test_guest_dir() {
        Ok(d) => Some(d),
        Err(e) => {
            skip_or_fail(test, &format!("the test guest: {e}"));
            None
        }
    }
}

/// A `--boot-dir` for the guest: netboot.ipxe booting vmlinuz with `console=ttyS0 CMDLINE` and the initrd.
/// `initrd_size`: pad the initrd with zeros (which the kernel's initramfs unpacker skips) to this many bytes.
pub fn write_boot_dir(www: &Path, guest: &Path, cmdline: &str, initrd_size: Option<u64>) {
    std::fs::create_dir_all(www).unwrap();
    std::fs::copy(guest.join("vmlinuz"), www.join("vmlinuz")).unwrap();
    std::fs::copy(guest.join("initrd.img"), www.join("initrd.img")).unwrap();
    if let Some(size) = initrd_size {
        let f = std::fs::OpenOptions::new().append(true).open(www.join("initrd.img")).unwrap();
        assert!(f.metadata().unwrap().len() <= size, "the initrd is already larger than {size} bytes");
        f.set_len(size).unwrap();
    }
    let script = format!("#!ipxe\nkernel vmlinuz console=ttyS0 {cmdline}\ninitrd initrd.img\nboot\n");
    std::fs::write(www.join("netboot.ipxe"), script).unwrap();
}

/// The tuner emulator (vm-tests/hdhomerun-emulator.py) on the lab's LAN at [`TUNER_ADDR`], as [`TUNER_ID`]
/// with two tuners; its log goes to `dir`. Killed on drop.
pub fn start_tuner(lab: &Lab, dir: &Path) -> KillOnDrop {
    lab.lan.ip(&["addr", "add", &format!("{TUNER_ADDR}/24"), "dev", &lab.lanport]);
    let log = dir.join("emulator.log");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-tests/hdhomerun-emulator.py");
    let child = lab
        .lan
        .cmd("python3")
        .arg(&script)
        .args(["--bind", TUNER_ADDR, "--device-id", TUNER_ID, "--tuners", "2"])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the tuner emulator");
    let emulator = KillOnDrop(child);
    let up = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("listening").then_some(())
    });
    assert!(up.is_some(), "the tuner emulator did not start");
    emulator
}

/// The lab for the real guest: a [`LanGuest`] (host and LAN namespaces, dnsmasq, a macvtap made by ec-macvtap
/// on the uplink, a state dir), the tuner emulator on the LAN, and the guest.
pub struct GuestLab {
    /// First, so the emulator is killed before the lab goes.
    _emulator: KillOnDrop,
    pub lan: LanGuest,
    pub www: PathBuf,
    pub guest: PathBuf,
}

impl GuestLab {
    /// None (after the skip-or-fail rule) when the test cannot run here.
    pub fn new(test: &str) -> Option<GuestLab> {
        require_root(test);
        if !require_programs(test, &["python3"]) {
            return None;
        }
        let guest = require_test_guest(test)?;
        let lan = LanGuest::new(test)?;
        let emulator = start_tuner(&lan.lab, lan.tmp.path());
        Some(GuestLab { _emulator: emulator, www: lan.tmp.path().join("www"), lan, guest })
    }

    /// `ec-ipxe-qemu run` in the host namespace: the guest booted from `--boot-dir` with `cmdline`, the LAN
    /// NIC on the macvtap, and `extra` arguments.
    pub fn run(&self, cmdline: &str, initrd_size: Option<u64>, extra: &[&str]) -> Run {
        write_boot_dir(&self.www, &self.guest, cmdline, initrd_size);
        let www = self.www.to_string_lossy().into_owned();
        let mut args = vec!["--no-disk", "--lan-interface", &self.lan.name, "--boot-dir", &www];
        args.extend_from_slice(extra);
        Run::start(Some(&self.lan.lab.host), &self.lan.state, &args)
    }

    /// dnsmasq's lease for the macvtap's MAC.
    pub fn lease(&self) -> Option<String> {
        self.lan.lab.leases().into_iter().find(|(m, _)| *m == self.lan.mac).map(|(_, ip)| ip)
    }
}

/// The launcher's `boot stage NAME: ... (S s after QEMU started)` log lines, in order: (name, seconds).
pub fn stages(stderr: &str) -> Vec<(String, f64)> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("boot stage ")? + "boot stage ".len()..];
            let name = rest.split(':').next()?.to_owned();
            let secs = rest.rsplit_once(" (")?.1.strip_suffix(" s after QEMU started)")?.parse().ok()?;
            Some((name, secs))
        })
        .collect()
}

/// The seconds of a stage in `stages`, when it was reached.
pub fn stage_at(stages: &[(String, f64)], name: &str) -> Option<f64> {
    stages.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
}
