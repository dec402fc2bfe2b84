//! `--accel auto|kvm|tcg`: KVM when `/dev/kvm` can be opened read-write, else TCG.

use std::fs::OpenOptions;
use std::path::Path;

use crate::error::{Error, Result};

/// What `--accel` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM when /dev/kvm can be opened read-write, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator QEMU gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// The CPU model: the host's under KVM, everything TCG can emulate otherwise.
    pub(crate) fn cpu_model(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

/// Whether `dev` opens read-write (opening and closing /dev/kvm changes nothing). An `open` is the only
/// faithful test: a device cgroup (systemd's DevicePolicy) refuses it even when the mode bits allow it.
pub(crate) fn kvm_usable(dev: &Path) -> std::io::Result<()> {
    OpenOptions::new().read(true).write(true).open(dev).map(drop)
}

pub(crate) fn resolve(choice: AccelChoice) -> Result<Accel> {
    resolve_with(choice, Path::new("/dev/kvm"))
}

pub(crate) fn resolve_with(choice: AccelChoice, dev: &Path) -> Result<Accel> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => kvm_usable(dev).map(|()| Accel::Kvm).map_err(|e| {
            Error::io(format!("--accel kvm: {} is not usable (use --accel auto or tcg)", dev.display()), e)
        }),
        AccelChoice::Auto => match kvm_usable(dev) {
            Ok(()) => {
                tracing::info!("accelerator: kvm ({} is usable)", dev.display());
                Ok(Accel::Kvm)
            }
            Err(e) => {
                tracing::info!("accelerator: tcg ({} is not usable: {e}); the guest will be slow", dev.display());
                Ok(Accel::Tcg)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_tcg() {
        let missing = Path::new("/nonexistent/kvm");
        assert_eq!(resolve_with(AccelChoice::Auto, missing).unwrap(), Accel::Tcg);
        assert_eq!(resolve_with(AccelChoice::Tcg, missing).unwrap(), Accel::Tcg);
        let err = resolve_with(AccelChoice::Kvm, missing).unwrap_err();
        assert!(err.to_string().contains("--accel kvm"), "{err}");
        assert_eq!(err.exit_code(), 3);
        // /dev/null opens read-write: a stand-in for a usable device.
        assert_eq!(resolve_with(AccelChoice::Auto, Path::new("/dev/null")).unwrap(), Accel::Kvm);
    }
}
