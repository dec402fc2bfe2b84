//! File-system checks behind [`LaunchConfig::from_options`](super::config::LaunchConfig::from_options): what
//! must exist, be readable, writable or executable, changing nothing. Each error names the option and the path.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{AccessFlags, access};

use crate::error::{Error, Result};
use crate::launcher::layout::{CONSOLE_SOCKET, NETBOOT_SCRIPT, QMP_SOCKET, STATUS_FILE};

pub(crate) fn show(p: &Path) -> String {
    p.display().to_string()
}

/// Make a path absolute (QEMU gets absolute paths), without resolving symlinks. Commas are fine: the argv
/// builder escapes them.
pub(crate) fn absolute(option: &str, p: &Path) -> Result<PathBuf> {
    if p.as_os_str().is_empty() {
        return Err(Error::invalid(option, "is empty"));
    }
    if p.to_str().is_none() {
        return Err(Error::invalid(format!("{option} {p:?}"), "is not valid UTF-8"));
    }
    std::path::absolute(p).map_err(|e| Error::io(format!("{option} \"{}\"", show(p)), e))
}

/// The state directory must be a writable directory, or missing with a writable directory above it.
pub(crate) fn check_state_dir(dir: &Path) -> Result<()> {
    let what = format!("--state-dir \"{}\"", show(dir));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            if access(dir, AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
                return Err(Error::invalid(what, "is not writable"));
            }
            crate::launcher::private::check_private(dir)?;
            // What the launcher and QEMU put there must be of the right kind (a stale socket is fine).
            for name in [QMP_SOCKET, CONSOLE_SOCKET] {
                crate::launcher::private::expect_socket(&dir.join(name), false)?;
            }
            crate::launcher::private::expect_file(&dir.join(STATUS_FILE))?;
            Ok(())
        }
        Ok(_) => Err(Error::invalid(what, "is not a directory")),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
            let mut up = dir.parent();
            while let Some(p) = up {
                match std::fs::metadata(p) {
                    Ok(m) if m.is_dir() => {
                        if access(p, AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
                            return Err(Error::invalid(
                                what,
                                format!("is missing and cannot be created: {} is not writable", show(p)),
                            ));
                        }
                        return Ok(());
                    }
                    Ok(_) => {
                        return Err(Error::invalid(what, format!("cannot be created: {} is not a directory", show(p))));
                    }
                    Err(_) => up = p.parent(),
                }
            }
            Err(Error::invalid(what, "cannot be created"))
        }
        Err(e) => Err(Error::invalid(what, e.to_string())),
    }
}

pub(crate) fn check_boot_dir(dir: &Path) -> Result<()> {
    let what = format!("--boot-dir \"{}\"", show(dir));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Error::invalid(what, "is not a directory")),
        Err(e) => return Err(Error::invalid(what, e.to_string())),
    }
    let script = dir.join(NETBOOT_SCRIPT);
    if !script.is_file() {
        return Err(Error::invalid(what, format!("has no {NETBOOT_SCRIPT} to chain to")));
    }
    Ok(())
}

pub(crate) fn check_readable_file(option: &str, p: &Path) -> Result<()> {
    let what = format!("{option} \"{}\"", show(p));
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => {
            if access(p, AccessFlags::R_OK).is_err() {
                return Err(Error::invalid(what, "is not readable"));
            }
            Ok(())
        }
        Ok(_) => Err(Error::invalid(what, "is not a regular file")),
        Err(e) => Err(Error::invalid(what, e.to_string())),
    }
}

/// A file QEMU will create or truncate: an existing one must be a writable regular file (or a FIFO/char device
/// such as /dev/null), a missing one needs a writable directory.
pub(crate) fn check_output_file(option: &str, p: &Path) -> Result<()> {
    let what = format!("{option} \"{}\"", show(p));
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() || m.file_type().is_fifo() || m.file_type().is_char_device() => {
            if access(p, AccessFlags::W_OK).is_err() {
                return Err(Error::invalid(what, "is not writable"));
            }
            Ok(())
        }
        Ok(_) => Err(Error::invalid(what, "is not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = p.parent().unwrap_or(Path::new("/"));
            if !dir.is_dir() || access(dir, AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
                return Err(Error::invalid(
                    what,
                    format!("cannot be created: {} is not a writable directory", show(dir)),
                ));
            }
            Ok(())
        }
        Err(e) => Err(Error::invalid(what, e.to_string())),
    }
}

/// An existing disk must be a readable, writable qcow2 image; a missing one needs a place to be created in
/// (the state directory, or an existing writable directory). Returns whether it exists.
pub(crate) fn check_disk(option: &str, p: &Path, in_state_dir: bool) -> Result<bool> {
    let what = format!("{option} \"{}\"", show(p));
    if let Ok(l) = std::fs::symlink_metadata(p) {
        if l.file_type().is_symlink() {
            let target = std::fs::read_link(p).map(|t| show(&t)).unwrap_or_default();
            if std::fs::metadata(p).is_err() {
                return Err(Error::invalid(
                    what,
                    format!(
                        "is a dangling symlink (to \"{target}\") where the disk belongs; remove it, or pass --disk \
                         with the image's own path"
                    ),
                ));
            }
            if in_state_dir {
                return Err(Error::invalid(
                    what,
                    format!(
                        "is a symlink (to \"{target}\"); nothing in the state directory is followed: pass --disk \
                         \"{target}\", or remove the symlink"
                    ),
                ));
            }
        } else if l.is_dir() {
            return Err(crate::launcher::private::misplaced(p, "a directory", "the disk image"));
        }
    }
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => {
            if access(p, AccessFlags::R_OK | AccessFlags::W_OK).is_err() {
                return Err(Error::invalid(what, "is not readable and writable"));
            }
            let mut magic = [0u8; 4];
            let ok = std::fs::File::open(p).and_then(|mut f| f.read_exact(&mut magic)).is_ok();
            if !ok || &magic != b"QFI\xfb" {
                return Err(Error::invalid(what, "exists but is not a qcow2 image (refusing to use or overwrite it)"));
            }
            Ok(true)
        }
        Ok(_) => Err(Error::invalid(what, "is not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = p.parent().unwrap_or(Path::new("/"));
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {
                    if access(dir, AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
                        return Err(Error::invalid(what, format!("cannot be created: {} is not writable", show(dir))));
                    }
                    Ok(false)
                }
                // Inside a state directory that does not exist yet: checked with the state directory.
                Err(_) => Ok(false),
                Ok(_) => Err(Error::invalid(what, format!("cannot be created: {} is not a directory", show(dir)))),
            }
        }
        Err(e) => Err(Error::invalid(what, e.to_string())),
    }
}

/// A program given as a path must be an executable file; a bare name is looked up on PATH. Returns the path
/// that will be executed.
pub(super) fn find_program(option: &str, p: &Path) -> Result<PathBuf> {
    let what = format!("{option} \"{}\"", show(p));
    let is_exec = |c: &Path| {
        std::fs::metadata(c).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            && access(c, AccessFlags::X_OK).is_ok()
    };
    if p.components().count() > 1 || p.is_absolute() {
        let abs = absolute(option, p)?;
        if !abs.exists() {
            return Err(Error::invalid(what, "no such file"));
        }
        if !is_exec(&abs) {
            return Err(Error::invalid(what, "is not an executable file"));
        }
        return Ok(abs);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_absolute() && is_exec(c))
        .ok_or_else(|| Error::invalid(what, "not found on PATH"))
}
