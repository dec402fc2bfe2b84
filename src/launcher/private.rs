//! The state directory is private ground: `run` refuses one that another user owns or that group or others
//! can write; inside it no symlink is ever followed (every file is opened with `O_NOFOLLOW`, temporary files
//! get unpredictable names and `O_EXCL`, and files are replaced by a rename); something else where a
//! socket, `status.json` or the disk belongs is one clear line naming the path and the fix; and what a
//! killed run left behind (`NAME.tmp-*`) is removed at the next start.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The infix of every temporary file the launcher makes: `NAME.tmp-RANDOM`.
pub(crate) const TMP_INFIX: &str = ".tmp-";

/// Refuse a state directory that another user owns, or that group or others can write: its contents could
/// be swapped for symlinks by someone else. `dir` must exist.
pub(crate) fn check_private(dir: &Path) -> Result<()> {
    let what = format!("--state-dir \"{}\"", dir.display());
    let m = std::fs::metadata(dir).map_err(|e| Error::io(format!("stat {what}"), e))?;
    check_private_meta(&what, dir, m.uid(), m.mode(), nix::unistd::geteuid().as_raw())
}

fn check_private_meta(what: &str, dir: &Path, uid: u32, mode: u32, me: u32) -> Result<()> {
    if uid != me {
        return Err(Error::invalid(
            what,
            format!(
                "is owned by uid {uid}, not by this user (uid {me}); the state directory must be private: \
                 chown {me} \"{}\" (or pick a directory of this user's)",
                dir.display()
            ),
        ));
    }
    if mode & 0o022 != 0 {
        return Err(Error::invalid(
            what,
            format!(
                "is writable by group or others (mode {:04o}); the state directory must be private: chmod 0700 \"{}\"",
                mode & 0o7777,
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// What `path` is, without following a symlink: `None` when it does not exist.
pub(crate) fn kind_of(path: &Path) -> Result<Option<&'static str>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(describe(&m))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("stat \"{}\"", path.display()), e)),
    }
}

/// "a FIFO", "a directory", ...: what a file is, for messages.
pub(crate) fn describe(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symlink"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_fifo() {
        "a FIFO"
    } else {
        "a device node"
    }
}

/// A socket the launcher or QEMU will bind at `path`: nothing there, or a stale socket (removed here: the
/// caller holds the state directory's lock). Anything else is refused, naming the path and the fix.
pub(crate) fn expect_socket(path: &Path, remove_stale: bool) -> Result<()> {
    match kind_of(path)? {
        None => Ok(()),
        Some("a socket") => {
            if remove_stale {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(format!("remove stale socket \"{}\"", path.display()), e)),
                }
            }
            Ok(())
        }
        Some(kind) => Err(misplaced(path, kind, "a socket")),
    }
}

/// A file the launcher replaces by a rename (`status.json`, the boot script): nothing there or a regular
/// file. Anything else is refused, naming the path and the fix.
pub(crate) fn expect_file(path: &Path) -> Result<()> {
    match kind_of(path)? {
        None | Some("a regular file") => Ok(()),
        Some(kind) => Err(misplaced(path, kind, "a regular file")),
    }
}

/// A private directory the launcher keeps inside the state directory (`boot-cache/`, `boot-cache/objects/`):
/// nothing there, or a directory (never through a symlink) this user owns. A group/other-writable mode is
/// fixed by its user (the launcher) when it opens it; anything else is refused, naming the path and the fix.
pub(crate) fn expect_private_dir(path: &Path) -> Result<()> {
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("stat \"{}\"", path.display()), e)),
    };
    if !m.is_dir() {
        return Err(misplaced(path, describe(&m), "a directory"));
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        return Err(Error::invalid(
            format!("\"{}\"", path.display()),
            format!(
                "is owned by uid {}, not by this user (uid {me}), inside a private state directory; \
                 chown -R {me} \"{}\" (or remove it) and start again",
                m.uid(),
                path.display()
            ),
        ));
    }
    Ok(())
}

/// `"PATH": is a directory where a socket belongs; remove it`.
pub(crate) fn misplaced(path: &Path, kind: &str, belongs: &str) -> Error {
    let fix = if kind == "a directory" { "rm -r" } else { "rm" };
    Error::invalid(
        format!("\"{}\"", path.display()),
        format!("is {kind} where {belongs} belongs; remove it ({fix} \"{}\") and start again", path.display()),
    )
}

/// Random hex for temporary names (from the kernel's generator; the process's hash seed when
/// /dev/urandom is not readable).
pub(crate) fn random_suffix() -> String {
    let mut b = [0u8; 8];
    let from_kernel = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_ok();
    if !from_kernel {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        h.write_u32(std::process::id());
        b = h.finish().to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `DIR/NAME.tmp-RANDOM` next to `path`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(TMP_INFIX);
    name.push(random_suffix());
    path.with_file_name(name)
}

/// Create a new file that did not exist (`O_CREAT|O_EXCL|O_NOFOLLOW`) with exactly `mode`, whatever the
/// umask.
pub(crate) fn create_new(path: &Path, mode: u32) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(f)
}

/// Read a regular file inside the state directory: never through a symlink, never waiting on a FIFO; a
/// symlink or anything but a regular file is an error saying what is there.
pub(crate) fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    open_regular(path)?.read_to_end(&mut out)?;
    Ok(out)
}

/// Open a regular file inside the state directory for reading, by [`read_regular`]'s rules (`O_NONBLOCK`
/// does nothing to a regular file's reads).
pub(crate) fn open_regular(path: &Path) -> std::io::Result<File> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(std::io::Error::other("is a symlink, which is never followed in the state directory"));
        }
        Err(e) => return Err(e),
    };
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(std::io::Error::other(format!("is {}, not a regular file", describe(&m))));
    }
    Ok(f)
}

/// Replace `path` with `content` (mode `mode`): a new temporary file with an unpredictable name, written
/// and renamed over `path` (which replaces a symlink there, never writes through it). Nothing is left
/// behind on failure.
pub(crate) fn replace(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let r = create_new(&tmp, mode).and_then(|mut f| f.write_all(content)).and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Remove what a killed run left in `dir`: files named `NAME.tmp-*` (temporary files of atomic writes, a
/// half-created disk). Symlinks are removed, not followed; directories are left alone. Returns what was
/// removed.
pub(crate) fn remove_leftovers(dir: &Path) -> Vec<PathBuf> {
    remove_tmp_files(dir, |name| name.contains(TMP_INFIX), "from a run that was killed")
}

/// Leftovers of `file` in its directory: `FILE.tmp-*` only (for a disk outside the state directory, whose
/// neighbours are not ours).
pub(crate) fn remove_leftovers_of(file: &Path) {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else { return };
    let mut prefix = name.to_owned();
    prefix.push(TMP_INFIX);
    let prefix = prefix.to_string_lossy().into_owned();
    remove_tmp_files(dir, |name| name.starts_with(&prefix), "a disk half-created by a run that was killed");
}

/// Remove every entry of `dir` but directories whose name `matches` (symlinks removed, not followed),
/// saying `why` for each; returns what was removed.
fn remove_tmp_files(dir: &Path, matches: impl Fn(&str) -> bool, why: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return removed };
    for e in entries.flatten() {
        if !matches(&e.file_name().to_string_lossy()) || e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let p = e.path();
        match std::fs::remove_file(&p) {
            Ok(()) => {
                tracing::info!("removed leftover {} ({why})", p.display());
                removed.push(p);
            }
            Err(err) => tracing::warn!("remove leftover {}: {err}", p.display()),
        }
    }
    removed
}

/// Processes that have `path` open or hold a lock on it (from `/proc/locks` and `/proc/*/fd`), this
/// process and `except` left out: `(pid, command name)`.
pub(crate) fn file_holders(path: &Path, except: &[i32]) -> Vec<(i32, String)> {
    let Ok(m) = std::fs::metadata(path) else { return Vec::new() };
    let (dev, ino) = (m.dev(), m.ino());
    let me = std::process::id() as i32;
    let mut pids: Vec<i32> = Vec::new();
    // Classic (POSIX, flock) locks name their pid; QEMU's OFD locks show -1, so the fds are searched too.
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let key = format!("{:02x}:{:02x}:{ino}", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    for line in locks.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = f.iter().position(|x| *x == key)
            && let Some(pid) = f.get(i.wrapping_sub(1)).and_then(|p| p.parse::<i32>().ok())
            && pid > 0
        {
            pids.push(pid);
        }
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let holds =
            fds.flatten().any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino));
        if holds {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .filter(|p| *p != me && !except.contains(p))
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_owned())
        })
        .collect()
}

/// The kernel's limit on one argument (MAX_ARG_STRLEN: 32 pages).
pub(crate) fn max_arg_strlen() -> usize {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096);
    32 * usize::try_from(page).unwrap_or(4096)
}

/// The kernel's limit on argv and the environment together (ARG_MAX as `sysconf` reports it).
pub(crate) fn arg_max() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::ARG_MAX)
        .ok()
        .flatten()
        .and_then(|v| usize::try_from(v).ok())
        .unwrap_or(128 << 10)
}

fn kib(n: usize) -> String {
    format!("{} KiB", n.div_ceil(1024))
}

/// QEMU's command line must fit the kernel's limits, or `execve` fails with E2BIG: each argument at most
/// `max_arg` bytes (with its NUL), all of them with the environment at most `max_total` (strings and
/// pointers). The error names the argument's option and what usually makes it long.
pub(crate) fn check_argv(
    argv: &[String],
    env_bytes: usize,
    env_count: usize,
    max_arg: usize,
    max_total: usize,
) -> Result<()> {
    for (i, a) in argv.iter().enumerate() {
        if a.len() + 1 > max_arg {
            let option = (i > 0)
                .then(|| argv[i - 1].as_str())
                .filter(|o| o.starts_with('-'))
                .map_or_else(|| format!("argument {i}"), |o| format!("the {o} argument"));
            let why = if option.contains("-netdev") { ": use fewer --host-forward rules" } else { "" };
            return Err(Error::invalid(
                "QEMU's command line",
                format!(
                    "{option} is {}; the kernel takes at most {} in one argument (MAX_ARG_STRLEN){why}",
                    kib(a.len() + 1),
                    kib(max_arg)
                ),
            ));
        }
    }
    let ptr = std::mem::size_of::<usize>();
    let total = argv.iter().map(|a| a.len() + 1 + ptr).sum::<usize>() + env_bytes + (env_count + 2) * ptr;
    if total > max_total {
        return Err(Error::invalid(
            "QEMU's command line",
            format!(
                "is {} with the environment; the kernel takes at most {} (ARG_MAX): shorten the extra QEMU \
                 arguments or the --host-forward rules",
                kib(total),
                kib(max_total)
            ),
        ));
    }
    Ok(())
}

/// [`check_argv`] against this kernel and this process's environment (QEMU gets about the same).
pub(crate) fn check_argv_here(argv: &[String]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let (mut bytes, mut count) = (0usize, 0usize);
    for (k, v) in std::env::vars_os() {
        bytes += k.as_bytes().len() + v.as_bytes().len() + 2;
        count += 1;
    }
    check_argv(argv, bytes, count, max_arg_strlen(), arg_max())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_private_directory_passes() {
        let d = Path::new("/s");
        assert!(check_private_meta("d", d, 0, 0o40700, 0).is_ok());
        assert!(check_private_meta("d", d, 0, 0o40755, 0).is_ok());
        let e = check_private_meta("d", d, 0, 0o40777, 0).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("mode 0777") && e.to_string().contains("chmod 0700 \"/s\""), "{e}");
        assert!(check_private_meta("d", d, 0, 0o41770, 0).is_err());
        let e = check_private_meta("d", d, 1000, 0o40700, 0).unwrap_err();
        assert!(e.to_string().contains("owned by uid 1000") && e.to_string().contains("chown 0"), "{e}");
    }

    #[test]
    fn temporary_names_are_unpredictable_and_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("status.json");
        let (a, b) = (tmp_path(&p), tmp_path(&p));
        assert_ne!(a, b);
        assert!(a.to_string_lossy().contains("status.json.tmp-"));
        // A symlink where the file goes is replaced, its target untouched.
        let target = tmp.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, &p).unwrap();
        replace(&p, b"new", 0o640).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        // create_new never follows nor reuses.
        std::os::unix::fs::symlink(&target, tmp.path().join("planted")).unwrap();
        assert!(create_new(&tmp.path().join("planted"), 0o600).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        // Read back: never through the symlink planted above, nor from anything but a regular file.
        assert_eq!(read_regular(&p).unwrap(), b"new");
        let e = read_regular(&tmp.path().join("planted")).unwrap_err().to_string();
        assert!(e.contains("is a symlink"), "{e}");
        assert!(read_regular(tmp.path()).unwrap_err().to_string().contains("is a directory"));
        assert_eq!(read_regular(&tmp.path().join("none")).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        // A directory where the file goes: the rename fails and nothing is left.
        let d = tmp.path().join("dir.json");
        std::fs::create_dir(&d).unwrap();
        assert!(replace(&d, b"x", 0o600).is_err());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 4);
    }

    #[test]
    fn leftovers_are_removed_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        for n in ["status.json.tmp-1", "disk.qcow2.tmp-abc", "status.json", "serial.log"] {
            std::fs::write(tmp.path().join(n), "x").unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("x.tmp-2")).unwrap();
        std::fs::create_dir(tmp.path().join("d.tmp-3")).unwrap();
        let removed = remove_leftovers(tmp.path());
        assert_eq!(removed.len(), 3);
        let mut left: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["d.tmp-3", "serial.log", "status.json"]);
        assert!(Path::new("/etc/passwd").exists());
        // Next to a disk outside the state directory: that disk's leftovers only.
        for n in ["vm.qcow2.tmp-1", "other.qcow2.tmp-2", "vm.qcow2"] {
            std::fs::write(tmp.path().join(n), "x").unwrap();
        }
        remove_leftovers_of(&tmp.path().join("vm.qcow2"));
        assert!(!tmp.path().join("vm.qcow2.tmp-1").exists());
        assert!(tmp.path().join("other.qcow2.tmp-2").exists() && tmp.path().join("vm.qcow2").exists());
    }

    #[test]
    fn kinds_where_a_socket_or_file_belongs() {
        let tmp = tempfile::tempdir().unwrap();
        let s = tmp.path().join("qmp.sock");
        assert!(expect_socket(&s, true).is_ok());
        std::fs::create_dir(&s).unwrap();
        let e = expect_socket(&s, true).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("is a directory where a socket belongs; remove it (rm -r"), "{e}");
        let l = std::os::unix::net::UnixListener::bind(tmp.path().join("c.sock")).unwrap();
        drop(l);
        expect_socket(&tmp.path().join("c.sock"), true).unwrap();
        assert!(!tmp.path().join("c.sock").exists(), "a stale socket is removed");
        let f = tmp.path().join("status.json");
        std::fs::create_dir(&f).unwrap();
        assert!(expect_file(&f).unwrap_err().to_string().contains("is a directory where a regular file belongs"));
    }

    #[test]
    fn argv_limits() {
        let argv = |n: usize| vec!["qemu".to_owned(), "-netdev".to_owned(), "u".repeat(n)];
        assert!(check_argv(&argv(100), 0, 0, 131_072, 2 << 20).is_ok());
        let e = check_argv(&argv(131_072), 0, 0, 131_072, 2 << 20).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let m = e.to_string();
        assert!(m.contains("the -netdev argument is 129 KiB") && m.contains("at most 128 KiB"), "{m}");
        assert!(m.contains("fewer --host-forward"), "{m}");
        let many: Vec<String> =
            std::iter::once("qemu".to_owned()).chain((0..25).map(|_| "x".repeat(100_000))).collect();
        let m = check_argv(&many, 1000, 10, 131_072, 2 << 20).unwrap_err().to_string();
        assert!(m.contains("ARG_MAX") && m.contains("at most 2048 KiB"), "{m}");
        assert!(max_arg_strlen() >= 131_072 && arg_max() >= 131_072);
    }

    #[test]
    fn holders_of_a_locked_file_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("held");
        std::fs::write(&p, "x").unwrap();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 7<\"{}\"; exec sleep 30", p.display()))
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let mut found = Vec::new();
        for _ in 0..50 {
            found = file_holders(&p, &[]);
            if found.iter().any(|(p, _)| *p == pid) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.iter().any(|(p, c)| *p == pid && c == "sleep"), "{found:?}");
        assert!(file_holders(&p, &[pid]).iter().all(|(p, _)| *p != pid));
    }
}
