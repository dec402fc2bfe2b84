//! The `qemu` and `accelerator` checks: QEMU runs, and the accelerator works for this user (with KVM, a real
//! one-second run).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Check;
use crate::launcher::accel::{self, AccelChoice};
use crate::launcher::fscheck;
use crate::tap;

/// How a process ended, for messages: `exited 1`, `died of SIGABRT`.
fn ended(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited {c}"),
        (None, Some(sig)) => nix::sys::signal::Signal::try_from(sig)
            .map(|s| format!("died of {}", s.as_str()))
            .unwrap_or_else(|_| format!("died of signal {sig}")),
        (None, None) => "ended".into(),
    }
}

/// Run `program args` with a deadline; (how it ended, or None when still running at the deadline and killed,
/// stdout, stderr).
fn run_briefly(program: &Path, args: &[&str], deadline: Duration) -> std::io::Result<(Option<String>, String, String)> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    tap::set_parent_death_signal(&mut cmd, nix::sys::signal::Signal::SIGKILL);
    let mut child = cmd.spawn()?;
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if start.elapsed() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |r: Option<&mut dyn std::io::Read>| {
        let mut s = String::new();
        if let Some(r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    };
    let out = read(child.stdout.as_mut().map(|r| r as &mut dyn std::io::Read));
    let err = read(child.stderr.as_mut().map(|r| r as &mut dyn std::io::Read));
    Ok((status.map(|s| if s.success() { "exited 0".to_string() } else { ended(s) }), out, err))
}

/// `qemu`: found (a path, or on PATH) and it runs: `--version`.
pub(crate) fn check_qemu(option_value: &Path) -> (Check, Option<PathBuf>) {
    let path = match fscheck::find_program("--qemu", option_value) {
        Ok(p) => p,
        Err(e) => {
            return (
                Check::fail(
                    "qemu",
                    e.to_string(),
                    "install QEMU (qemu-system-x86) or point --qemu at qemu-system-x86_64",
                ),
                None,
            );
        }
    };
    match run_briefly(&path, &["--version"], Duration::from_secs(10)) {
        Ok((Some(how), out, _)) if how == "exited 0" => {
            let version = out.lines().next().unwrap_or("").trim().to_owned();
            (Check::ok("qemu", format!("{}: {version}", path.display())), Some(path))
        }
        Ok((code, _, err)) => (
            Check::fail(
                "qemu",
                format!(
                    "{} --version {}: {}",
                    path.display(),
                    code.unwrap_or_else(|| "did not finish in 10 s".to_string()),
                    err.lines().last().unwrap_or("").trim()
                ),
                "this QEMU does not run; reinstall it or point --qemu at a working qemu-system-x86_64",
            ),
            Some(path),
        ),
        Err(e) => (
            Check::fail(
                "qemu",
                format!("{}: {e}", path.display()),
                "this QEMU does not run; point --qemu at a working qemu-system-x86_64",
            ),
            Some(path),
        ),
    }
}

/// `accelerator`: what `--accel` resolves to for this user, and, for KVM, a real one-second QEMU run with the
/// launcher's own machine and CPU model (QEMU under broken nested virtualisation dies in KVM setup even while
/// /dev/kvm opens fine).
pub(crate) fn check_accel(choice: AccelChoice, qemu: Option<&Path>, kvm_dev: &Path) -> Check {
    const NAME: &str = "accelerator";
    if choice == AccelChoice::Tcg {
        return Check::ok(NAME, "tcg (asked for; KVM not used)");
    }
    let asked = if choice == AccelChoice::Kvm { "--accel kvm" } else { "--accel auto" };
    if let Err(e) = accel::kvm_usable(kvm_dev) {
        let detail = format!("{asked}: {} cannot be opened read-write by this user: {e}", kvm_dev.display());
        return match choice {
            AccelChoice::Kvm => Check::fail(
                NAME,
                detail,
                "run would fail: add the user to group kvm (and DeviceAllow=/dev/kvm rw), or use --accel tcg",
            ),
            _ => Check::warn(
                NAME,
                format!("{detail}; run falls back to tcg"),
                "the guest runs under TCG, several times slower; give the user /dev/kvm for speed",
            ),
        };
    }
    let Some(qemu) = qemu else {
        return Check::warn(
            NAME,
            format!("{asked}: {} opens, but KVM was not tried (no usable QEMU)", kvm_dev.display()),
            "fix the qemu check first",
        );
    };
    let args = [
        "-machine",
        "pc,graphics=off",
        "-accel",
        "kvm",
        "-cpu",
        accel::Accel::Kvm.cpu_model(),
        "-m",
        "64",
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "none",
        "-monitor",
        "none",
        "-net",
        "none",
        "-no-reboot",
    ];
    match run_briefly(qemu, &args, Duration::from_secs(1)) {
        Ok((None, _, _)) => {
            Check::ok(NAME, format!("kvm: a guest ran for 1 s under {} with -cpu host", qemu.display()))
        }
        Ok((Some(how), _, err)) => {
            let why = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
            Check::fail(
                NAME,
                format!("{asked}: {} opens, but KVM is unusable: QEMU {how} at once: {why}", kvm_dev.display()),
                "the guest would die at start (nested virtualisation often breaks KVM): use --accel tcg, or fix KVM on \
                 this host",
            )
        }
        Err(e) => Check::fail(NAME, format!("{asked}: could not start {}: {e}", qemu.display()), "fix the qemu check"),
    }
}
