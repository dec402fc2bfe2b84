//! The cache on disk, `<state>/boot-cache/`:
//!
//! ```text
//! boot-cache/            0700
//!   objects/<sha256>     0600, the files, named by their content's SHA-256 (one copy when two sets share it)
//!   good.json            the last good set: the files of the last boot that reached ready
//!   fetching.json        the set being fetched: files admitted or revalidated since then
//!   .tmp-<random>, objects/.tmp-<random>   in-flight writes (removed at the next start when left behind)
//! ```
//!
//! Each set (a [`Manifest`]) maps a path under the boot URL's directory to an [`Entry`]: the object's SHA-256
//! and length and the origin's `ETag`/`Last-Modified`, the metadata for revalidation and for checking a file
//! before it is served. Every file is opened with `O_NOFOLLOW`; new files are created with `O_EXCL` under an
//! unpredictable name, fsynced, and renamed into place (then the directory is fsynced), so a crash leaves
//! either the old file or the new one, never a partial one.
//!
//! The cache is bounded: only objects that the last good set or the set being fetched names are kept;
//! [`Store::mark_good`] replaces the good set and removes everything else.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::libc;
use serde::{Deserialize, Serialize};

pub const DIR: &str = "boot-cache";
pub const OBJECTS: &str = "objects";

/// The cache's directories in a state directory, outermost first.
pub fn dirs(state_dir: &Path) -> [PathBuf; 2] {
    let dir = state_dir.join(DIR);
    let objects = dir.join(OBJECTS);
    [dir, objects]
}
const GOOD: &str = "good.json";
const FETCHING: &str = "fetching.json";
const TMP_PREFIX: &str = ".tmp-";

/// One cached file as a set names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Lower-case hex SHA-256 of the content; also the object's file name.
    pub sha256: String,
    pub length: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// The origin URL it was fetched from (for people reading the file).
    pub url: String,
}

/// A set of files: the last good set or the set being fetched.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The boot URL the set belongs to; a set of another URL is never served.
    pub boot_url: String,
    /// For the good set: the stage that made it good (`ready`) and when (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marked: Option<(String, u64)>,
    pub files: BTreeMap<String, Entry>,
}

impl Manifest {
    pub fn new(boot_url: &str) -> Self {
        Manifest { boot_url: boot_url.to_owned(), marked: None, files: BTreeMap::new() }
    }

    pub fn bytes(&self) -> u64 {
        self.files.values().map(|e| e.length).sum()
    }
}

/// Whether a name in the cache is a valid object name (64 lower-case hex digits).
pub fn is_object_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The names in `objects/` to remove: everything that is not an object named by `keep`, except temporary
/// files when `temps` is false (a download may be writing them).
pub fn prune_list<'a>(names: impl IntoIterator<Item = &'a str>, keep: &BTreeSet<String>, temps: bool) -> Vec<String> {
    names
        .into_iter()
        .filter(|n| !(is_object_name(n) && keep.contains(*n)))
        .filter(|n| temps || !n.starts_with(TMP_PREFIX))
        .map(str::to_owned)
        .collect()
}

/// The objects the two sets name.
pub fn referenced(sets: &[&Manifest]) -> BTreeSet<String> {
    sets.iter().flat_map(|m| m.files.values().map(|e| e.sha256.clone())).collect()
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An unpredictable name for a temporary file (the state directory's random suffix).
fn random_name() -> String {
    format!("{TMP_PREFIX}{}", crate::launcher::private::random_suffix())
}

/// The cache lives in the state directory, by its rules: never through a symlink, never waiting on a FIFO,
/// anything but a regular file refused, the path named in the error.
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    crate::launcher::private::open_regular(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("\"{}\": {e}", path.display())))
}

/// Most bytes a set's JSON may have (a set of thousands of files is far below).
const MANIFEST_MAX: u64 = 16 << 20;

/// Read a set's JSON (regular file, no symlink, bounded).
fn read_json(path: &Path) -> std::io::Result<String> {
    let mut s = String::new();
    open_nofollow(path)?.take(MANIFEST_MAX).read_to_string(&mut s)?;
    Ok(s)
}

/// The last good set in `state_dir`, read without creating, changing or removing anything (`doctor`).
pub fn peek_good(state_dir: &Path) -> Option<Manifest> {
    serde_json::from_str(&read_json(&state_dir.join(DIR).join(GOOD)).ok()?).ok()
}

/// A directory we own, 0700, not a symlink; created when missing.
fn private_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() || !m.is_dir() => {
            Err(std::io::Error::other(format!("{} is not a directory (a symlink is never followed)", path.display())))
        }
        Ok(m) => {
            if m.uid() != nix::unistd::geteuid().as_raw() {
                return Err(std::io::Error::other(format!("{} is owned by another user", path.display())));
            }
            if m.mode() & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().mode(0o700).create(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
    }
}

fn fsync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)?
        .sync_all()
}

/// A file being written: created 0600 with `O_EXCL` under a random name; removed on drop unless admitted.
pub struct TempFile {
    pub file: File,
    path: PathBuf,
    done: bool,
}

impl TempFile {
    fn create(dir: &Path) -> std::io::Result<TempFile> {
        let path = dir.join(random_name());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        Ok(TempFile { file, path, done: false })
    }

    /// fsync, rename to `to`, fsync the directory.
    fn persist(mut self, to: &Path) -> std::io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.path, to)?;
        self.done = true;
        if let Some(parent) = to.parent() {
            fsync_dir(parent)?;
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The cache directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Held across "admit an object and name it in a set" and across "replace the good set and prune", so
    /// a clean-up never removes an object between its admission and its naming. Lock order: this, then
    /// the cache's state.
    disk: std::sync::Mutex<()>,
    /// Set when the run ends: nothing is written any more, so a successor that takes the state directory
    /// never meets a write of ours.
    closed: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Open (create) `<state>/boot-cache`, remove leftovers of a killed run (temporary files, objects no set
    /// names, sets that do not parse).
    pub fn open(state_dir: &Path) -> std::io::Result<Store> {
        let dir = state_dir.join(DIR);
        private_dir(&dir)?;
        private_dir(&dir.join(OBJECTS))?;
        let store = Store { dir, disk: std::sync::Mutex::new(()), closed: false.into() };
        for name in store.list(&store.dir)? {
            if name.starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(store.dir.join(&name));
            }
        }
        store.prune(true)?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir)? {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn read_manifest(&self, name: &str) -> Option<Manifest> {
        let path = self.dir.join(name);
        match read_json(&path) {
            Ok(s) => match serde_json::from_str(&s) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!("boot cache: {} does not parse ({e}); ignored and removed", path.display());
                    let _ = std::fs::remove_file(&path);
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!("boot cache: cannot read {}: {e}; ignored", path.display());
                None
            }
        }
    }

    fn write_manifest(&self, name: &str, m: &Manifest) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(m).map_err(std::io::Error::other)?;
        let mut tmp = TempFile::create(&self.dir)?;
        tmp.file.write_all(&json)?;
        tmp.persist(&self.dir.join(name))
    }

    /// The last good set, if any.
    pub fn good(&self) -> Option<Manifest> {
        self.read_manifest(GOOD)
    }

    /// The set being fetched (empty when none).
    pub fn fetching(&self) -> Option<Manifest> {
        self.read_manifest(FETCHING)
    }

    pub fn save_fetching(&self, m: &Manifest) -> std::io::Result<()> {
        self.open_for_writes()?;
        self.write_manifest(FETCHING, m)
    }

    /// Make `m` the last good set, drop the set being fetched and every object `m` does not name.
    pub fn mark_good(&self, m: &Manifest) -> std::io::Result<()> {
        self.open_for_writes()?;
        self.write_manifest(GOOD, m)?;
        match std::fs::remove_file(self.dir.join(FETCHING)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.prune(false)
    }

    /// Remove objects that neither set names, and leftover temporary files when `temps` (at open, when no
    /// download can be in flight).
    pub fn prune(&self, temps: bool) -> std::io::Result<()> {
        let good = self.good().unwrap_or_default();
        let fetching = self.fetching().unwrap_or_default();
        let keep = referenced(&[&good, &fetching]);
        let objects = self.dir.join(OBJECTS);
        let names = self.list(&objects)?;
        for name in prune_list(names.iter().map(String::as_str), &keep, temps) {
            let path = objects.join(&name);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("boot cache: cannot remove {}: {e}", path.display());
            }
        }
        Ok(())
    }

    pub fn object_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(OBJECTS).join(sha256)
    }

    /// Open a cached object for reading: a regular file (never through a symlink) of the length the entry
    /// says.
    pub fn open_object(&self, e: &Entry) -> std::io::Result<File> {
        if !is_object_name(&e.sha256) {
            return Err(std::io::Error::other(format!("bad object name {:?}", e.sha256)));
        }
        let f = open_nofollow(&self.object_path(&e.sha256))?;
        let m = f.metadata()?;
        if !m.is_file() || m.len() != e.length {
            return Err(std::io::Error::other(format!(
                "object {} is {} bytes, {} expected",
                e.sha256,
                m.len(),
                e.length
            )));
        }
        Ok(f)
    }

    /// Whether an entry's object is present with its length.
    pub fn has(&self, e: &Entry) -> bool {
        self.open_object(e).is_ok()
    }

    /// A new temporary file in `objects/`.
    pub fn temp(&self) -> std::io::Result<TempFile> {
        self.open_for_writes()?;
        TempFile::create(&self.dir.join(OBJECTS))
    }

    /// The disk lock (see [`Store`]); a panic while it was held leaves nothing to repair.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No more writes: waits for one in progress under the disk lock (an admission, a clean-up), then every
    /// write fails. For the end of a run, before the state directory's lock goes.
    pub fn close(&self) {
        let _disk = self.lock();
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn open_for_writes(&self) -> std::io::Result<()> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("the boot cache is closed (the run is ending)"));
        }
        Ok(())
    }

    /// Admit a complete download under its hash (fsync, rename, fsync the directory).
    pub fn admit(&self, tmp: TempFile, sha256: &str) -> std::io::Result<()> {
        self.open_for_writes()?;
        tmp.persist(&self.object_path(sha256))
    }

    /// Drop an object that failed its check (a later set may still name it: it is fetched again).
    pub fn discard(&self, sha256: &str) {
        if is_object_name(sha256) && self.open_for_writes().is_ok() {
            let _ = std::fs::remove_file(self.object_path(sha256));
        }
    }

    /// What is on disk, for people and tests: (object count, bytes).
    pub fn usage(&self) -> std::io::Result<(usize, u64)> {
        let objects = self.dir.join(OBJECTS);
        let mut n = 0;
        let mut bytes = 0;
        for name in self.list(&objects)? {
            if let Ok(m) = std::fs::symlink_metadata(objects.join(&name)) {
                n += 1;
                bytes += m.len();
            }
        }
        Ok((n, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sha: char, len: u64) -> Entry {
        Entry { sha256: sha.to_string().repeat(64), length: len, etag: None, last_modified: None, url: "u".into() }
    }

    #[test]
    fn pruning_keeps_both_sets_only() {
        let mut good = Manifest::new("u");
        good.files.insert("a".into(), entry('a', 1));
        let mut fetching = Manifest::new("u");
        fetching.files.insert("a".into(), entry('b', 2));
        let keep = referenced(&[&good, &fetching]);
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let c = "c".repeat(64);
        let names = [a.as_str(), b.as_str(), c.as_str(), ".tmp-123", "junk", "A"];
        assert_eq!(prune_list(names, &keep, true), vec![c.clone(), ".tmp-123".into(), "junk".into(), "A".into()]);
        assert_eq!(prune_list(names, &keep, false), vec![c.clone(), "junk".into(), "A".into()]);
        assert!(is_object_name(&a) && !is_object_name("A".repeat(64).as_str()) && !is_object_name("ab"));
        assert_eq!(good.bytes() + fetching.bytes(), 3);
    }

    #[test]
    fn manifest_round_trip_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let dir = tmp.path().join(DIR);
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert!(store.good().is_none() && store.fetching().is_none());

        let mut t = store.temp().unwrap();
        t.file.write_all(b"hello").unwrap();
        let sha = hex(&<sha2::Sha256 as sha2::Digest>::digest(b"hello"));
        store.admit(t, &sha).unwrap();
        let e =
            Entry { sha256: sha.clone(), length: 5, etag: Some("\"x\"".into()), last_modified: None, url: "u".into() };
        assert_eq!(std::fs::metadata(store.object_path(&sha)).unwrap().mode() & 0o777, 0o600);
        assert!(store.has(&e));
        assert!(!store.has(&Entry { length: 6, ..e.clone() }), "a length mismatch is not a hit");

        let mut m = Manifest::new("https://o/x.ipxe");
        m.files.insert("x.ipxe".into(), e.clone());
        store.save_fetching(&m).unwrap();
        assert_eq!(store.fetching().unwrap(), m);
        // Leftovers of a killed run and unnamed objects go at the next open; named ones stay.
        std::fs::write(dir.join("objects/.tmp-dead"), b"x").unwrap();
        std::fs::write(dir.join(".tmp-dead"), b"x").unwrap();
        std::fs::write(dir.join("objects").join("d".repeat(64)), b"x").unwrap();
        drop(store);
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.usage().unwrap(), (1, 5));
        assert!(!dir.join(".tmp-dead").exists());
        store.mark_good(&m).unwrap();
        assert!(store.fetching().is_none());
        assert_eq!(store.good().unwrap(), m);
        // A symlinked object is never opened.
        store.discard(&sha);
        std::os::unix::fs::symlink("/etc/hostname", store.object_path(&sha)).unwrap();
        assert!(store.open_object(&e).is_err());
        // A garbled set is ignored, not fatal.
        std::fs::write(dir.join(GOOD), b"{").unwrap();
        assert!(store.good().is_none());
        // A FIFO as a set is not a set, and reading it does not block (the garbled one went).
        assert!(!dir.join(GOOD).exists());
        nix::unistd::mkfifo(&dir.join(GOOD), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(store.good().is_none() && peek_good(tmp.path()).is_none());
        std::fs::remove_file(dir.join(GOOD)).unwrap();

        // Closed (the run ends): no write of any kind any more, what is there stays.
        let before = store.usage().unwrap();
        let t = store.temp().unwrap();
        store.close();
        assert!(store.admit(t, &"e".repeat(64)).is_err());
        assert!(store.temp().is_err());
        assert!(store.save_fetching(&m).is_err() && store.mark_good(&m).is_err());
        assert_eq!(store.usage().unwrap(), before);
        assert!(!store.object_path(&"e".repeat(64)).exists() && store.fetching().is_none());
    }

    #[test]
    fn refuses_a_symlinked_cache_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), tmp.path().join(DIR)).unwrap();
        let e = Store::open(tmp.path()).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
    }
}
