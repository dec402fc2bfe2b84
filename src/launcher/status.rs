//! `status.json` in the state directory: what the launcher knows about its guest, replaced atomically (a
//! temporary file and a rename) at every change, so a reader never sees half of it. `ec-ipxe-qemu status`
//! reads it and tells whether a launcher still holds the directory.
//!
//! Whether a launcher holds the directory is read from `/proc/locks` (an flock on `DIR/lock` with that file's
//! device and inode): looking never takes the lock itself, so `status` can never make a starting launcher
//! fail with "in use".

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bootcache::{BootSource, Counters};
use crate::error::{Error, Result};
use crate::launcher::console::bootwatch::Stage;

use crate::launcher::layout::{LOCK_FILE, STATUS_FILE};

/// The contents of `status.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunStatus {
    /// The launcher's pid.
    pub pid: u32,
    /// QEMU's pid while it runs.
    pub qemu_pid: Option<u32>,
    /// When the launcher started QEMU (RFC 3339, UTC).
    pub started_at: String,
    /// The boot stage (see the boot watch); `null` before QEMU starts.
    pub stage: Option<Stage>,
    pub ready: bool,
    /// When the guest became ready.
    pub ready_at: Option<String>,
    /// The chain target (`null` for the built-in diagnostics).
    pub boot_url: Option<String>,
    /// The boot NIC's address (user-mode network).
    pub boot_address: Option<String>,
    pub lan_interface: Option<String>,
    pub lan_mac: Option<String>,
    /// The guest's LAN address, from its console (`ec-publisher: lan ADDRESS` or the diagnostics' LAN line).
    pub lan_address: Option<String>,
    pub accel: String,
    /// vhost-net on the LAN NIC: `on` or `off`.
    pub vhost: String,
    /// Where the guest's boot files come from: `origin` or `cache` (`--boot-cache on`), `direct` (iPXE fetches
    /// the http/https boot URL itself); `null` for `--boot-dir`, tftp and the diagnostics.
    pub boot_source: Option<BootSource>,
    /// The boot cache's counters for this boot (`--boot-cache on`).
    pub boot_cache: Option<Counters>,
    /// Absolute URLs in the chained script: iPXE fetches them itself, not through the cache.
    #[serde(default)]
    pub not_cached: Vec<String>,
    /// The last boot failure seen on the console, with its hint.
    pub last_error: Option<String>,
    /// The names of the credentials passed to the guest (never their values).
    #[serde(default)]
    pub credentials: Vec<String>,
    pub updated_at: String,
    /// When the launcher ended (set as it exits).
    pub ended_at: Option<String>,
    /// Log lines the launcher could not write (its stderr went away or failed) and dropped.
    #[serde(default)]
    pub dropped_log_lines: u64,
    /// The file iPXE is downloading, while it does (`null` otherwise); with the boot cache, its byte counts.
    #[serde(default)]
    pub download: Option<Download>,
}

/// A download in progress: from the `--boot-dir` server's own byte counts when it serves the file, else from
/// iPXE's progress on the console (a percentage only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Download {
    /// The file as the server or iPXE names it.
    pub file: String,
    pub bytes: Option<u64>,
    pub total: Option<u64>,
    pub percent: Option<u8>,
}

impl Download {
    /// A download a server counts (the `--boot-dir` server, the boot cache): the percentage follows from the
    /// bytes and the total (an empty file is 100 %; no total, no percentage).
    pub(crate) fn counted(file: String, bytes: u64, total: Option<u64>) -> Download {
        let percent = total.map(|t| bytes.saturating_mul(100).checked_div(t).map_or(100, |p| p.min(100) as u8));
        Download { file, bytes: Some(bytes), total, percent }
    }
}

/// The status file of a state directory.
pub(crate) fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATUS_FILE)
}

/// The current time as RFC 3339 UTC with seconds (`2026-11-25T12:47:03Z`).
pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the epoch as RFC 3339 UTC (civil-from-days, H. Hinnant's algorithm).
pub(crate) fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The status the launcher keeps, written to disk at every change.
///
/// The writing happens on a thread of its own, never on the supervisor's event loop: a file system that
/// stalls (NFS, a dying disk) stalls only that thread. A write that fails (ENOSPC, EIO) is said once per
/// episode and tried again every [`RETRY`] with the latest status, so `status.json` catches up within a
/// fraction of a second of the file system's recovery. The count of log lines that could not be written
/// ([`crate::logging::dropped_lines`]) is refreshed at most every [`REFRESH`].
pub(crate) struct StatusFile {
    path: PathBuf,
    pub status: RunStatus,
    writer: Option<Writer>,
}

/// How often a failed write is tried again.
const RETRY: Duration = Duration::from_millis(250);
/// How often the dropped-lines count is looked at.
const REFRESH: Duration = Duration::from_secs(1);
/// How long the last status may take to reach the disk as the launcher ends.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

struct Writer {
    shared: Arc<Shared>,
    done: std::sync::mpsc::Receiver<()>,
}

#[derive(Default)]
struct Shared {
    slot: Mutex<Slot>,
    wake: Condvar,
}

#[derive(Default)]
struct Slot {
    /// The newest status not yet picked up by the writer.
    latest: Option<RunStatus>,
    closing: bool,
}

impl StatusFile {
    pub(crate) fn new(state_dir: &Path, status: RunStatus) -> StatusFile {
        let path = path(state_dir);
        let shared = Arc::new(Shared::default());
        let (tx, done) = std::sync::mpsc::channel();
        let (p, sh) = (path.clone(), Arc::clone(&shared));
        let spawned = std::thread::Builder::new().name("status.json".into()).spawn(move || {
            write_loop(&p, &sh);
            let _ = tx.send(());
        });
        let writer = match spawned {
            Ok(_) => Some(Writer { shared, done }),
            Err(e) => {
                tracing::warn!("status file: no writer thread ({e}); writing on the event loop");
                None
            }
        };
        StatusFile { path, status, writer }
    }

    /// Change the status and write it; nothing is written when nothing changed.
    pub(crate) fn update(&mut self, f: impl FnOnce(&mut RunStatus)) {
        let before = self.status.clone();
        f(&mut self.status);
        if self.status != before {
            self.write();
        }
    }

    /// Write it (hand it to the writer).
    pub(crate) fn write(&mut self) {
        match &self.writer {
            Some(w) => {
                lock(&w.shared.slot).latest = Some(self.status.clone());
                w.shared.wake.notify_one();
            }
            None => {
                let _ = write_once(&self.path, &self.status);
            }
        }
    }

    /// Wait (at most [`CLOSE_WAIT`]) until the last status is on disk, and stop the writer.
    pub(crate) fn close(&mut self) {
        if let Some(w) = self.writer.take() {
            lock(&w.shared.slot).closing = true;
            w.shared.wake.notify_one();
            if w.done.recv_timeout(CLOSE_WAIT).is_err() {
                tracing::warn!("status file {}: the last status could not be written in time", self.path.display());
            }
        }
    }
}

impl Drop for StatusFile {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock(m: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write_once(path: &Path, status: &RunStatus) -> Result<()> {
    let mut status = status.clone();
    status.updated_at = now_rfc3339();
    status.dropped_log_lines = crate::logging::dropped_lines();
    let mut text =
        serde_json::to_vec_pretty(&status).map_err(|e| Error::Runtime(format!("encode {}: {e}", path.display())))?;
    text.push(b'\n');
    crate::launcher::private::replace(path, &text, 0o640).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// The writer thread: the latest status, written when it changes; a failed write tried again every
/// [`RETRY`] (one warning per episode); the dropped-lines count refreshed.
fn write_loop(path: &Path, shared: &Shared) {
    let mut current: Option<RunStatus> = None;
    let (mut dirty, mut failing, mut reported) = (false, false, 0u64);
    let mut closing_since: Option<std::time::Instant> = None;
    loop {
        {
            let mut slot = lock(&shared.slot);
            if slot.latest.is_none() && !slot.closing {
                let wait = if failing { RETRY } else { REFRESH };
                slot = shared.wake.wait_timeout(slot, wait).map_or_else(|e| e.into_inner().0, |r| r.0);
            }
            if let Some(s) = slot.latest.take() {
                current = Some(s);
                dirty = true;
            }
            if slot.closing && closing_since.is_none() {
                closing_since = Some(std::time::Instant::now());
            }
        }
        let dropped = crate::logging::dropped_lines();
        if dropped != reported {
            dirty = true;
        }
        if dirty && let Some(s) = &current {
            match write_once(path, s) {
                Ok(()) => {
                    dirty = false;
                    reported = dropped;
                    if std::mem::replace(&mut failing, false) {
                        tracing::info!("status file {}: written again", path.display());
                    }
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            "status file: {e}; trying again every {} ms (the guest is not affected)",
                            RETRY.as_millis()
                        );
                    }
                }
            }
        }
        if let Some(since) = closing_since {
            if !dirty || current.is_none() || since.elapsed() >= CLOSE_WAIT {
                return;
            }
            std::thread::sleep(RETRY);
        }
    }
}

/// What `status` reads: the last status written, and whether a launcher holds the directory now.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    #[serde(flatten)]
    pub status: RunStatus,
    /// Whether a launcher holds the state directory now.
    pub running: bool,
}

/// Read the status of `state_dir`. No status file: not found (exit 3).
pub(crate) fn read(state_dir: &Path) -> Result<Report> {
    let p = path(state_dir);
    let text = match crate::launcher::private::read_regular(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(format!(
                "--state-dir \"{}\": {STATUS_FILE} (no launcher has run there yet)",
                state_dir.display()
            )));
        }
        Err(e) => return Err(Error::io(format!("read {}", p.display()), e)),
    };
    let status: RunStatus = serde_json::from_slice(&text)
        .map_err(|e| Error::Runtime(format!("{}: not a status file ({e})", p.display())))?;
    let running = held(&state_dir.join(LOCK_FILE))?;
    Ok(Report { status, running })
}

/// Whether some process holds an flock on `lock` (from `/proc/locks`, without touching the lock).
pub(crate) fn held(lock: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let m = match std::fs::metadata(lock) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(format!("stat {}", lock.display()), e)),
    };
    let locks = std::fs::read_to_string("/proc/locks").map_err(|e| Error::io("read /proc/locks", e))?;
    Ok(locks_hold(&locks, m.dev(), m.ino()))
}

/// Whether `/proc/locks` text lists an flock on the file with device `dev` and inode `ino`.
pub(crate) fn locks_hold(locks: &str, dev: u64, ino: u64) -> bool {
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev as nix::libc::dev_t),
        nix::sys::stat::minor(dev as nix::libc::dev_t)
    );
    locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 3217 fe:00:5578762 0 EOF"; blocked waiters carry "->" first.
        let f: Vec<&str> = f.into_iter().filter(|x| *x != "->").collect();
        f.len() >= 6 && f[1] == "FLOCK" && f[5] == want
    })
}

/// The human form of a report.
pub(crate) fn render(state_dir: &Path, r: &Report) -> String {
    let s = &r.status;
    let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut out = String::new();
    if r.running {
        out.push_str(&format!(
            "{}: running (launcher pid {}, QEMU pid {}, started {})\n",
            state_dir.display(),
            s.pid,
            s.qemu_pid.map_or("-".into(), |p| p.to_string()),
            s.started_at
        ));
    } else {
        out.push_str(&format!(
            "{}: not running (no launcher holds it); last known status (launcher pid {}, started {}, ended {}):\n",
            state_dir.display(),
            s.pid,
            s.started_at,
            or_none(&s.ended_at)
        ));
    }
    let stage = s.stage.map_or("-".to_owned(), |st| st.to_string());
    let ready = match (&s.ready, &s.ready_at) {
        (true, Some(at)) => format!("yes (since {at})"),
        (true, None) => "yes".into(),
        (false, _) => "no".into(),
    };
    let mut rows: Vec<(&str, String)> = vec![("stage", stage)];
    if let Some(d) = &s.download {
        rows.push(("download", download_text(d)));
    }
    rows.extend([
        ("ready", ready),
        ("boot URL", s.boot_url.clone().unwrap_or_else(|| "(built-in diagnostics)".into())),
    ]);
    if let Some(src) = s.boot_source {
        let src = match src {
            BootSource::Origin => "origin (through the boot cache)",
            BootSource::Cache => "cache (the last good set: the origin failed)",
            BootSource::Direct => "direct (iPXE fetches the boot URL itself)",
        };
        rows.push(("boot source", src.to_owned()));
    }
    if let Some(c) = &s.boot_cache {
        rows.push((
            "boot cache",
            format!(
                "{} hits, {} revalidated, {} bytes fetched, {} bytes served{}",
                c.hits,
                c.revalidated,
                c.fetched_bytes,
                c.served_bytes,
                c.origin_error.as_deref().map(|e| format!("; origin error: {e}")).unwrap_or_default()
            ),
        ));
    }
    rows.extend([
        ("boot address", or_none(&s.boot_address)),
        ("LAN interface", or_none(&s.lan_interface)),
        ("LAN MAC", or_none(&s.lan_mac)),
        ("LAN address", or_none(&s.lan_address)),
        ("accel", s.accel.clone()),
        ("vhost", s.vhost.clone()),
        ("credentials", if s.credentials.is_empty() { "-".into() } else { s.credentials.join(" ") }),
        ("last error", or_none(&s.last_error)),
        ("updated", s.updated_at.clone()),
    ]);
    for (k, v) in rows {
        out.push_str(&format!("  {:<14} {v}\n", format!("{k}:")));
    }
    out
}

/// `initrd: 43% (28.0 of 64.0 MiB)`, or `initrd: 43%` from iPXE's progress alone.
fn download_text(d: &Download) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let pct = d.percent.map_or(String::new(), |p| format!(" {p}%"));
    match (d.bytes, d.total) {
        (Some(b), Some(t)) => format!("{}:{pct} ({:.1} of {:.1} MiB)", d.file, mib(b), mib(t)),
        _ => format!("{}:{pct}", d.file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_downloads_work_out_their_percentage() {
        let pc = |bytes, total| Download::counted("f".into(), bytes, total).percent;
        assert_eq!(
            (pc(28 << 20, Some(64 << 20)), pc(5, Some(4)), pc(0, Some(0)), pc(9, None)),
            (Some(43), Some(100), Some(100), None)
        );
        assert_eq!(Download::counted("f".into(), 1, Some(2)).bytes, Some(1));
    }

    #[test]
    fn download_lines() {
        let d = Download { file: "initrd".into(), bytes: Some(28 << 20), total: Some(64 << 20), percent: Some(43) };
        assert_eq!(download_text(&d), "initrd: 43% (28.0 of 64.0 MiB)");
        let d = Download { file: "http://x/bzImage".into(), bytes: None, total: None, percent: Some(7) };
        assert_eq!(download_text(&d), "http://x/bzImage: 7%");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_610_823), "2026-11-25T12:47:03Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn proc_locks_lines() {
        let dev = nix::sys::stat::makedev(0xfe, 0) as u64;
        let text = "1: FLOCK  ADVISORY  WRITE 3217 fe:00:5578762 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 3218 fe:00:42 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 99 fe:01:42 0 EOF\n\
                    3: -> FLOCK  ADVISORY  WRITE 100 fe:00:77 0 EOF\n";
        assert!(locks_hold(text, dev, 5_578_762));
        assert!(!locks_hold(text, dev, 42), "a POSIX lock is not the launcher's flock; fe:01 is another device");
        assert!(locks_hold(text, dev, 77));
        assert!(!locks_hold(text, dev, 1));
    }

    #[test]
    fn written_atomically_read_back_and_held_is_seen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert_eq!(read(dir).unwrap_err().exit_code(), 3);
        let mut f = StatusFile::new(
            dir,
            RunStatus {
                pid: 7,
                accel: "tcg".into(),
                vhost: "off".into(),
                stage: Some(Stage::Firmware),
                ..RunStatus::default()
            },
        );
        f.write();
        f.update(|s| s.lan_address = Some("192.168.77.53".into()));
        f.close();
        let r = read(dir).unwrap();
        assert!(!r.running, "no lock file, no launcher");
        assert_eq!(r.status.lan_address.as_deref(), Some("192.168.77.53"));
        assert_eq!(r.status.stage, Some(Stage::Firmware));
        // Only the status file is left (no temporary file).
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 1);
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for k in [
            "pid",
            "qemu_pid",
            "started_at",
            "stage",
            "ready",
            "boot_url",
            "boot_address",
            "lan_interface",
            "lan_mac",
            "lan_address",
            "accel",
            "vhost",
            "running",
        ] {
            assert!(v.get(k).is_some(), "{k} in {v}");
        }
        assert_eq!(v["stage"], "firmware");
        // A held flock is seen, without being taken.
        let lock = std::fs::File::create(dir.join("lock")).unwrap();
        assert!(!read(dir).unwrap().running);
        let held_lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
        assert!(read(dir).unwrap().running);
        drop(held_lock);
        assert!(!read(dir).unwrap().running);
        let text = render(dir, &read(dir).unwrap());
        assert!(text.contains("not running") && text.contains("192.168.77.53"), "{text}");
    }

    #[test]
    fn a_symlink_or_fifo_at_status_json_is_refused_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let elsewhere = dir.join("elsewhere.json");
        std::fs::write(&elsewhere, serde_json::to_vec(&RunStatus::default()).unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, path(dir)).unwrap();
        let e = read(dir).unwrap_err().to_string();
        assert!(e.contains(&format!("read {}: is a symlink", path(dir).display())), "{e}");
        std::fs::remove_file(path(dir)).unwrap();
        nix::unistd::mkfifo(&path(dir), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read(dir).unwrap_err().to_string();
        assert!(e.contains("is a FIFO, not a regular file"), "{e}");
    }

    #[test]
    fn flocks_are_seen_without_taking_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let f = std::fs::File::create(&p).unwrap();
        assert!(!held(&p).unwrap());
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
        assert!(held(&p).unwrap());
        drop(lock);
        assert!(!held(&p).unwrap());
    }
}
