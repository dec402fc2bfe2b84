//! The state directory: created 0700 when missing, locked with `flock` for the life of one `run`, the boot
//! script written atomically, the qcow2 created with qemu-img only when missing (atomically, never over an
//! existing file).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};
use crate::launcher::layout::LOCK_FILE;
use crate::launcher::option_values::ByteSize;

/// A locked state directory. The lock is released when this is dropped; [`StateDir::abandon`] also removes
/// what this run created (for failures before the guest ran).
pub(super) struct StateDir {
    pub path: PathBuf,
    /// The directories this run's own `mkdir` created, topmost first (the state dir last, when it was one).
    created: Vec<PathBuf>,
    _lock: Flock<File>,
}

/// How many times a run starts over when the directory vanished between its `mkdir` and its lock (a failing
/// run that created it removed it meanwhile).
const ATTEMPTS: usize = 5;

impl StateDir {
    /// Create the directory (0700) when missing and take the exclusive lock; a held lock is a conflict (exit 4).
    ///
    /// Race-free against concurrent runs: every missing component is made with a plain `mkdir`, and only a
    /// `mkdir` that succeeded counts as "created by this run"; a refused lock removes nothing; and the lock is
    /// held on the file that is still at `DIR/lock` (checked by inode after locking), so a run never believes
    /// it holds a directory that another run removed and a third one recreated.
    pub(super) fn create_and_lock(path: &Path) -> Result<StateDir> {
        for _ in 0..ATTEMPTS {
            let created = create_missing(path)?;
            match Self::lock(path) {
                Ok(Some(lock)) => {
                    let dir = StateDir { path: path.to_owned(), created, _lock: lock };
                    // Checked before (by the configuration); again now that it is ours, in case it changed.
                    if let Err(e) = crate::launcher::private::check_private(path) {
                        dir.abandon();
                        return Err(e);
                    }
                    return Ok(dir);
                }
                // Removed under us before we held it: start over (nothing of ours is in it).
                Ok(None) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Runtime(format!(
            "--state-dir \"{}\": removed by another run {ATTEMPTS} times while this one was locking it",
            path.display()
        )))
    }

    /// The lock, or None when the directory or lock file vanished (or was replaced) before it was held.
    fn lock(dir: &Path) -> Result<Option<Flock<File>>> {
        let path = dir.join(LOCK_FILE);
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("open lock {}", path.display()), e)),
        };
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
        let held = lock.metadata().map_err(|e| Error::io(format!("stat lock {}", path.display()), e))?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.ino() == held.ino() && m.dev() == held.dev() => {}
            _ => return Ok(None),
        }
        // Who holds it, for the message a second run prints.
        let _ = lock.set_len(0).and_then(|()| writeln!(&mut *lock, "{}", std::process::id()));
        Ok(Some(lock))
    }

    /// Undo a run that failed before its guest ran: remove the directories this run created (the state dir
    /// with its contents, while the lock is still held; missing parents only when empty).
    pub(super) fn abandon(self) {
        let mut parents: &[PathBuf] = &self.created;
        if let Some((last, rest)) = self.created.split_last()
            && *last == self.path
        {
            parents = rest;
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!("remove {}: {e}", self.path.display());
            }
        }
        for dir in parents.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `mkdir` (0700) every missing component of `path`, topmost first; returns those this call created. A
/// component that exists (made by someone else, even just now) is not ours. On failure, what this call made
/// is removed again.
fn create_missing(path: &Path) -> Result<Vec<PathBuf>> {
    let mut chain: Vec<&Path> = path.ancestors().take_while(|p| !p.as_os_str().is_empty()).collect();
    chain.reverse();
    // Skip what clearly exists, so the common case (an existing state dir) is one stat.
    let first_missing = chain.iter().rposition(|p| p.is_dir()).map_or(0, |i| i + 1);
    let mut created: Vec<PathBuf> = Vec::new();
    for dir in &chain[first_missing..] {
        match DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => created.push(dir.to_path_buf()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => {
                for d in created.iter().rev() {
                    let _ = std::fs::remove_dir(d);
                }
                return Err(Error::io(format!("create --state-dir \"{}\"", path.display()), e));
            }
        }
    }
    Ok(created)
}

/// Write `content` to `path` via a new temporary file (unpredictable name, `O_EXCL|O_NOFOLLOW`, mode 0600)
/// and a rename, so QEMU never reads half a script and no symlink is written through.
pub(super) fn write_atomically(path: &Path, content: &[u8]) -> Result<()> {
    crate::launcher::private::expect_file(path)?;
    crate::launcher::private::replace(path, content, 0o600)
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// Create the qcow2 at `path` unless it exists. The image is made under a temporary name and linked into
/// place, which fails rather than replaces when something appeared there meanwhile. Returns whether it was
/// created.
pub(super) fn ensure_disk(qemu_img: &Path, path: &Path, size: ByteSize) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let tmp = crate::launcher::private::tmp_path(path);
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
        // 0600 whatever the umask (qemu-img creates it 0644 less the umask).
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("chmod the new disk {}", tmp.display()), e))?;
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
        let Some(img) = crate::launcher::fscheck::find_program("--qemu-img", Path::new("qemu-img")).ok() else {
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

    /// Concurrent runs on fresh directories: in every round exactly one wins, every loser is told "in use"
    /// (exit 4) and removes nothing, and the winner's files are intact afterwards.
    #[test]
    fn concurrent_creates_have_one_winner_and_lose_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let threads = 4;
        for round in 0..300 {
            let dir = tmp.path().join(format!("r{round}/parent/state"));
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads));
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (dir, barrier) = (dir.clone(), std::sync::Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        barrier.wait();
                        match StateDir::create_and_lock(&dir) {
                            Ok(s) => {
                                std::fs::write(s.path.join("mine"), b"winner").unwrap();
                                // Hold it until every other thread has tried.
                                barrier.wait();
                                Ok(s)
                            }
                            Err(e) => {
                                barrier.wait();
                                Err(e)
                            }
                        }
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let winners: Vec<&StateDir> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(winners.len(), 1, "round {round}: exactly one winner");
            for r in &results {
                if let Err(e) = r {
                    assert_eq!(e.exit_code(), 4, "round {round}: {e}");
                }
            }
            assert_eq!(std::fs::read(dir.join("mine")).unwrap(), b"winner", "round {round}: winner's file");
            assert!(dir.join(LOCK_FILE).exists(), "round {round}");
        }
    }
}
