//! The state directory: created 0700 when missing, locked with `flock` for the life of one `run`, the boot
//! script written atomically, the qcow2 created with qemu-img only when missing (atomically, never over an
//! existing file).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};
use crate::launcher::config::{ByteSize, LOCK_FILE};

/// A locked state directory. The lock is released when this is dropped; [`StateDir::abandon`] also removes
/// the directory when this run created it (for failures before QEMU started).
pub struct StateDir {
    pub path: PathBuf,
    /// The topmost directory this run created, if any.
    created: Option<std::path::PathBuf>,
    _lock: Flock<File>,
}

impl StateDir {
    /// Create the directory (0700) when missing and take the exclusive lock; a held lock is a conflict (exit 4).
    pub fn create_and_lock(path: &Path) -> Result<StateDir> {
        // The topmost directory this run creates (the state dir or a missing parent), so a failed run can
        // remove exactly what it made.
        let created = match std::fs::metadata(path) {
            Ok(_) => None,
            Err(_) => {
                let mut top = path.to_owned();
                while let Some(parent) = top.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
                    top = parent.to_owned();
                }
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(|e| Error::io(format!("create --state-dir \"{}\"", path.display()), e))?;
                Some(top)
            }
        };
        match Self::lock(path) {
            Ok(lock) => Ok(StateDir { path: path.to_owned(), created, _lock: lock }),
            Err(e) => {
                if let Some(top) = &created {
                    let _ = std::fs::remove_dir_all(top);
                }
                Err(e)
            }
        }
    }

    fn lock(dir: &Path) -> Result<Flock<File>> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io(format!("open lock {}", path.display()), e))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let who = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
                return Err(Error::conflict(
                    format!("--state-dir \"{}\"", dir.display()),
                    format!("is in use by another ec-ipxe-qemu run{who}; refusing to start a second guest on it"),
                ));
            }
            Err((_, e)) => return Err(Error::errno(format!("lock {}", path.display()), e)),
        };
        // Who holds it, for the message a second run prints.
        let _ = lock.set_len(0).and_then(|()| writeln!(&mut *lock, "{}", std::process::id()));
        Ok(lock)
    }

    /// Undo a run that failed before QEMU started: remove the directory if this run created it.
    pub fn abandon(self) {
        if let Some(top) = &self.created
            && let Err(e) = std::fs::remove_dir_all(top)
        {
            tracing::warn!("remove {}: {e}", top.display());
        }
    }
}

/// Write `content` to `path` via a temporary file and a rename, so QEMU never reads half a script.
pub fn write_atomically(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let r = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        f.write_all(content).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("rename to {}", path.display()), e))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Create the qcow2 at `path` unless it exists. The image is made under a temporary name and linked into
/// place, which fails rather than replaces when something appeared there meanwhile. Returns whether it was
/// created.
pub fn ensure_disk(qemu_img: &Path, path: &Path, size: ByteSize) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let tmp = tmp_path(path);
    let _ = std::fs::remove_file(&tmp);
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&tmp)
        .arg(size.0.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("run {}", qemu_img.display()), e));
    let result = out.and_then(|out| {
        if !out.status.success() {
            return Err(Error::Runtime(format!(
                "create disk {} with {}: {} ({})",
                path.display(),
                qemu_img.display(),
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            )));
        }
        std::fs::hard_link(&tmp, path).map_err(|e| Error::io(format!("put the new disk at {}", path.display()), e))
    });
    let _ = std::fs::remove_file(&tmp);
    result?;
    tracing::info!("created disk {} ({} bytes)", path.display(), size.0);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn state_dir_is_0700_and_locked_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/state");
        let s = StateDir::create_and_lock(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let err = StateDir::create_and_lock(&dir).err().unwrap();
        assert_eq!(err.exit_code(), 4);
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
        drop(s);
        let s = StateDir::create_and_lock(&dir).unwrap();
        // Existing dir: abandon leaves it.
        s.abandon();
        assert!(dir.exists());
        let fresh = tmp.path().join("fresh");
        StateDir::create_and_lock(&fresh).unwrap().abandon();
        assert!(!fresh.exists());
        // Missing parents made by this run go too; existing ones stay.
        let deep = tmp.path().join("a/new1/new2/state");
        StateDir::create_and_lock(&deep).unwrap().abandon();
        assert!(!tmp.path().join("a/new1").exists());
        assert!(tmp.path().join("a").exists());
    }

    #[test]
    fn atomic_write_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("boot.ipxe");
        write_atomically(&p, b"one").unwrap();
        write_atomically(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn disk_is_created_once_and_never_overwritten() {
        let Some(img) = crate::launcher::config::find_program("--qemu-img", Path::new("qemu-img")).ok() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "disk_is_created_once_and_never_overwritten needs qemu-img (CI=true: a failure, not a skip)"
            );
            eprintln!("SKIP disk_is_created_once_and_never_overwritten: needs qemu-img");
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("disk.qcow2");
        assert!(ensure_disk(&img, &p, ByteSize(1 << 20)).unwrap());
        let before = std::fs::read(&p).unwrap();
        assert_eq!(&before[..4], b"QFI\xfb");
        assert!(!ensure_disk(&img, &p, ByteSize(2 << 20)).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), before);
        // A failing qemu-img leaves nothing behind.
        let q = tmp.path().join("bad.qcow2");
        assert!(ensure_disk(Path::new("/bin/false"), &q, ByteSize(1 << 20)).is_err());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
