//! `serial.log`: the raw bytes of the guest console, written by the launcher (QEMU never writes a file).
//!
//! - At start the previous boot's log becomes `serial.log.1` (replacing an older one), so a restart after a
//!   crash keeps the crashed boot's console. An empty log (a start that failed before the guest printed a
//!   byte) is not rotated, so such failures do not push the last boot out.
//! - The file never grows past its cap (`--serial-log-max`). When it would, it keeps its first half (the
//!   boot: firmware, iPXE, the kernel's first lines) and the most recent output after a marker line: it is
//!   cut back to the end of that head, a marker says how many bytes were left out so far, and writing goes
//!   on after it. So the size saws between half the cap and the cap, and both the boot and the latest output
//!   are always in it.
//! - A `--serial-log` that is not a regular file (a FIFO, `/dev/null`) is written as it is: no rotation, no
//!   cap.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::launcher::option_values::LogCap;

/// The smallest cap: a few screens of boot output (the least `--serial-log-max` takes).
const MIN_CAP: u64 = LogCap::MIN;

pub(crate) struct SerialLog {
    path: PathBuf,
    file: File,
    /// None: not a regular file, written as it is.
    cap: Option<u64>,
    /// Bytes in the file now.
    len: u64,
    /// Where the head ends once the file has been cut (the marker follows it).
    head_end: Option<u64>,
    /// Bytes left out so far by cutting.
    cut: u64,
    /// The length of the marker after the head.
    marker_len: u64,
    /// Bytes of console output that could not be written in the current failure episode.
    lost: u64,
    /// Why writing fails now (None: it works); said once per episode.
    failing: Option<String>,
}

/// `PATH.1`.
pub(crate) fn previous(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".1");
    path.with_file_name(name)
}

impl SerialLog {
    /// Open `path` for this boot: a regular file is rotated to `PATH.1` first and created anew (0600).
    pub(crate) fn open(path: &Path, cap: u64) -> Result<SerialLog> {
        let cap = cap.max(MIN_CAP);
        // A symlink is never written through: it is moved aside like a previous log.
        let (regular, empty) = match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                return Err(crate::launcher::private::misplaced(path, "a directory", "the serial log"));
            }
            Ok(m) if m.file_type().is_symlink() => (true, false),
            Ok(m) => (m.is_file(), m.len() == 0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (true, true),
            Err(e) => return Err(Error::io(format!("stat serial log {}", path.display()), e)),
        };
        if !regular {
            // Never wait for a reader: a FIFO without one is an error now, a slow one loses output later.
            let file = OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| Error::io(format!("open serial log {}", path.display()), e))?;
            return Ok(SerialLog::new(path, file, None));
        }
        // An empty log (a start that failed before the guest printed anything) does not push the last boot's
        // log out of PATH.1.
        let rotate = if empty { Ok(()) } else { std::fs::rename(path, previous(path)) };
        match rotate {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(format!("keep the previous serial log as {}", previous(path).display()), e));
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| Error::io(format!("create serial log {}", path.display()), e))?;
        Ok(SerialLog::new(path, file, Some(cap)))
    }

    /// A log on `file`, nothing written yet; `cap`: None for a FIFO or device (never cut back).
    fn new(path: &Path, file: File, cap: Option<u64>) -> SerialLog {
        SerialLog {
            path: path.to_owned(),
            file,
            cap,
            len: 0,
            head_end: None,
            cut: 0,
            marker_len: 0,
            lost: 0,
            failing: None,
        }
    }

    /// Append console bytes. The guest must never wait for the disk: a failing write (ENOSPC, EIO) loses
    /// these bytes, is said once per episode, and the next write tries again, first with a note in the log of
    /// how much was lost.
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        if let Some(why) = self.failing.clone() {
            let note = format!("\r\n[ec-ipxe-qemu: {} bytes of guest console output were lost: {why}]\r\n", self.lost);
            if self.append(note.as_bytes()).is_err() {
                self.lost += bytes.len() as u64;
                self.resync();
                return;
            }
            tracing::info!("serial log {}: writing again ({} bytes were lost)", self.path.display(), self.lost);
            self.failing = None;
            self.lost = 0;
        }
        if let Err(e) = self.append(bytes) {
            self.lose(bytes.len() as u64, &e.to_string());
            self.resync();
        }
    }

    /// `n` bytes never reached this log (`why`): counted into the current episode, or starting one.
    pub(crate) fn lose(&mut self, n: u64, why: &str) {
        self.lost += n;
        if self.failing.is_none() {
            tracing::warn!(
                "serial log {}: {why}; trying again on the next write (the guest is not affected)",
                self.path.display()
            );
            self.failing = Some(why.to_owned());
        }
    }

    /// After a failed write: the file's real length (a write may have got part of the way).
    fn resync(&mut self) {
        if self.cap.is_some()
            && let Ok(end) = self.file.seek(SeekFrom::End(0))
        {
            self.len = end;
        }
    }

    fn append(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        let Some(cap) = self.cap else {
            return match self.file.write_all(bytes) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                r => r,
            };
        };
        while !bytes.is_empty() {
            let room = cap.saturating_sub(self.len);
            if room == 0 {
                self.cut_back(cap)?;
                continue;
            }
            let n = (bytes.len() as u64).min(room) as usize;
            self.file.write_all(&bytes[..n])?;
            self.len += n as u64;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// The file is full: keep the head (first half), write the marker, drop the rest.
    fn cut_back(&mut self, cap: u64) -> std::io::Result<()> {
        let head = *self.head_end.get_or_insert(cap / 2);
        self.cut += self.len - head - self.marker_len;
        let marker = format!(
            "\r\n[ec-ipxe-qemu: serial log cut here to stay under {cap} bytes (--serial-log-max); \
             {} bytes of console output left out so far]\r\n",
            self.cut
        );
        self.file.set_len(head)?;
        self.file.seek(SeekFrom::Start(head))?;
        self.file.write_all(marker.as_bytes())?;
        self.marker_len = marker.len() as u64;
        self.len = head + self.marker_len;
        Ok(())
    }
}

/// `serial.log` off the event loop: a thread of its own writes what the console broker hands it, so a file
/// system that stalls stalls only that thread. What queues up beyond [`MAX_QUEUED`] meanwhile is left out
/// and counted (the log notes it when it can).
pub(crate) struct LogWriter {
    tx: Option<std::sync::mpsc::Sender<Vec<u8>>>,
    queued: Arc<AtomicU64>,
    overflow: Arc<AtomicU64>,
    done: Option<std::sync::mpsc::Receiver<()>>,
}

/// Console bytes waiting for the writer before new ones are left out.
const MAX_QUEUED: u64 = 16 << 20;

impl LogWriter {
    pub(crate) fn start(mut log: SerialLog) -> LogWriter {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let queued = Arc::new(AtomicU64::new(0));
        let overflow = Arc::new(AtomicU64::new(0));
        let (q, o) = (Arc::clone(&queued), Arc::clone(&overflow));
        let spawned = std::thread::Builder::new().name("serial.log".into()).spawn(move || {
            while let Ok(mut buf) = rx.recv() {
                while let Ok(more) = rx.try_recv() {
                    buf.extend_from_slice(&more);
                }
                q.fetch_sub(buf.len() as u64, Ordering::Relaxed);
                let over = o.swap(0, Ordering::Relaxed);
                if over > 0 {
                    log.lose(over, "the file system did not keep up");
                }
                log.write(&buf);
            }
            let _ = done_tx.send(());
        });
        match spawned {
            Ok(_) => LogWriter { tx: Some(tx), queued, overflow, done: Some(done) },
            Err(e) => {
                tracing::warn!("serial log: no writer thread ({e}); the console goes on without the log");
                LogWriter { tx: None, queued, overflow, done: None }
            }
        }
    }

    /// Hand console bytes to the writer; never waits.
    pub(crate) fn write(&mut self, chunk: &[u8]) {
        let Some(tx) = &self.tx else { return };
        let n = chunk.len() as u64;
        if self.queued.load(Ordering::Relaxed) + n > MAX_QUEUED {
            self.overflow.fetch_add(n, Ordering::Relaxed);
            return;
        }
        self.queued.fetch_add(n, Ordering::Relaxed);
        if tx.send(chunk.to_vec()).is_err() {
            self.queued.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// No more bytes: wait (at most `limit`, blocking) for the writer to write what it has.
    pub(crate) fn finish(mut self, limit: std::time::Duration) {
        self.tx = None;
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_open_and_stays_under_the_cap() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("serial.log");
        std::fs::write(&p, b"previous boot").unwrap();
        std::fs::write(previous(&p), b"older boot").unwrap();
        let cap = MIN_CAP;
        let mut log = SerialLog::open(&p, 1).unwrap();
        assert_eq!(std::fs::read(previous(&p)).unwrap(), b"previous boot");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        log.write(b"BOOT-START\r\n");
        let mut written = 12u64;
        for i in 0..5000 {
            let line = format!("line {i:05} ................................................\r\n");
            log.write(line.as_bytes());
            written += line.len() as u64;
            assert!(std::fs::metadata(&p).unwrap().len() <= cap, "over the cap after line {i}");
        }
        let text = String::from_utf8(std::fs::read(&p).unwrap()).unwrap();
        assert!(text.starts_with("BOOT-START\r\n"), "the head (the boot) is kept");
        assert!(
            text.ends_with("line 04999 ................................................\r\n"),
            "the latest output too"
        );
        let markers = text.matches("[ec-ipxe-qemu: serial log cut here").count();
        assert_eq!(markers, 1, "one marker between head and tail");
        assert!(log.cut > 0 && log.cut < written);
        assert_eq!(log.cut + text.len() as u64, written + marker_len(&text), "every byte is accounted for");
        // A second open keeps this one as .1; an empty log does not replace it there.
        drop(log);
        let again = SerialLog::open(&p, cap).unwrap();
        assert_eq!(std::fs::read_to_string(previous(&p)).unwrap(), text);
        drop(again);
        let _third = SerialLog::open(&p, cap).unwrap();
        assert_eq!(std::fs::read_to_string(previous(&p)).unwrap(), text, "an empty log is not rotated");
    }

    fn marker_len(text: &str) -> u64 {
        let start = text.find("\r\n[ec-ipxe-qemu: serial log cut here").unwrap();
        let end = text[start + 2..].find("\r\n").unwrap() + start + 4;
        (end - start) as u64
    }

    #[test]
    fn a_fifo_is_written_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // No reader: refused at once instead of waiting.
        assert!(SerialLog::open(&p, MIN_CAP).is_err());
        let mut reader = OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK).open(&p).unwrap();
        let mut log = SerialLog::open(&p, MIN_CAP).unwrap();
        log.write(b"hello");
        drop(log);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut got).unwrap();
        assert_eq!(got, b"hello");
        assert!(!previous(&p).exists());
    }
}
