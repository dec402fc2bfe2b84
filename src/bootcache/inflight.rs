//! At most one origin download per file. The first request for a path leads: it asks the origin and, on a
//! fresh 200, streams the body to its guest and into a temporary file of the store. A request for the same
//! path meanwhile (a guest's retry, a second connection) joins it instead of asking the origin again: it
//! waits for the leader's answer, then reads the leader's temporary file (a duplicate of its descriptor, read
//! with `pread`, so the leader's write offset is untouched) up to the bytes written so far and follows it as
//! it grows, at the leader's pace. When the leader's download completes, the joiner sends its last chunk only
//! once the SHA-256 of what it read matches the leader's; when the leader fails, the joiner's body is cut too
//! (its guest sees a short download and retries). A temporary file that is admitted is renamed and one that
//! fails is removed: a joiner's descriptor keeps reading it either way, and closes with the joiner.
//!
//! A leader whose answer is not a download it can share (a 304, the fallback, another status, a cache that
//! cannot be written) resigns at once: its joiners then go the ordinary way, one after the other.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::CHUNK;
use super::request::{HeldBack, Request};

/// The downloads running, by path key.
#[derive(Default)]
pub(super) struct Flights {
    map: Mutex<HashMap<String, Arc<Flight>>>,
}

/// One download, shared by its leader and its joiners.
pub(super) struct Flight {
    state: Mutex<Progress>,
    grew: Condvar,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// The leader is asking the origin.
    Asking,
    /// The body is being written to the file.
    Streaming,
    /// All `written` bytes are in; their SHA-256.
    Complete(String),
    Failed(String),
    /// No download to share.
    Resigned,
}

struct Progress {
    phase: Phase,
    /// Bytes written to the file so far (readable by a joiner).
    written: u64,
    /// The announced length.
    length: Option<u64>,
    file: Option<Arc<File>>,
}

/// What a joiner learns when it waits for more.
enum Next {
    /// Bytes are readable up to here.
    Data(u64),
    Complete(String),
    Failed(String),
}

/// How a request enters.
pub(super) enum Entered<'a> {
    Lead(Leader<'a>),
    Join(Arc<Flight>),
}

impl Flights {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lead the download of `key`, or join the one running.
    pub(super) fn enter(&self, key: &str) -> Entered<'_> {
        let mut map = self.map();
        if let Some(f) = map.get(key) {
            return Entered::Join(Arc::clone(f));
        }
        let flight = Arc::new(Flight {
            state: Mutex::new(Progress { phase: Phase::Asking, written: 0, length: None, file: None }),
            grew: Condvar::new(),
        });
        map.insert(key.to_owned(), Arc::clone(&flight));
        Entered::Lead(Leader { flights: self, key: key.to_owned(), flight, ended: false })
    }

    /// For a HEAD: the length of the download of `key` being shared, if one is (`Some(None)`: not announced).
    pub(super) fn shared_length(&self, key: &str) -> Option<Option<u64>> {
        let flight = self.map().get(key).cloned()?;
        let p = flight.progress();
        match p.phase {
            Phase::Streaming => Some(p.length),
            Phase::Complete(_) => Some(Some(p.written)),
            _ => None,
        }
    }
}

impl Flight {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Progress>) -> MutexGuard<'a, Progress> {
        self.grew.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for the leader's answer: its file and announced length when there is a download to share
    /// (running, complete, or failed after it started: the joiner is then cut), `None` when it resigned.
    pub(super) fn decision(&self) -> Option<(Arc<File>, Option<u64>)> {
        let mut p = self.progress();
        while p.phase == Phase::Asking {
            p = self.wait(p);
        }
        let length = match p.phase {
            Phase::Complete(_) => Some(p.written),
            _ => p.length,
        };
        p.file.clone().map(|f| (f, length))
    }

    /// Wait until more than `pos` bytes are written or the download ended.
    fn next(&self, pos: u64) -> Next {
        let mut p = self.progress();
        loop {
            if p.written > pos {
                return Next::Data(p.written);
            }
            match &p.phase {
                Phase::Complete(sha) => return Next::Complete(sha.clone()),
                Phase::Failed(why) => return Next::Failed(why.clone()),
                Phase::Resigned => return Next::Failed("the download was given up".into()),
                Phase::Asking | Phase::Streaming => p = self.wait(p),
            }
        }
    }
}

/// The leading request's handle. Dropped without an end (a panic), it fails the download; dropped at all,
/// it leaves the map (a request for the path after that asks the origin, which has the admitted copy).
pub(super) struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    flight: Arc<Flight>,
    ended: bool,
}

impl Leader<'_> {
    fn set(&mut self, phase: Phase, leave: bool) {
        self.flight.progress().phase = phase;
        self.flight.grew.notify_all();
        if leave {
            self.leave();
        }
    }

    fn leave(&mut self) {
        let mut map = self.flights.map();
        if map.get(&self.key).is_some_and(|f| Arc::ptr_eq(f, &self.flight)) {
            map.remove(&self.key);
        }
    }

    /// The body goes to `file` (a duplicate of the temporary file's descriptor).
    pub(super) fn streaming(&mut self, file: File, length: Option<u64>) {
        let mut p = self.flight.progress();
        p.file = Some(Arc::new(file));
        p.length = length;
        p.phase = Phase::Streaming;
        drop(p);
        self.flight.grew.notify_all();
    }

    /// `n` more bytes are written to the file.
    pub(super) fn wrote(&self, n: u64) {
        self.flight.progress().written += n;
        self.flight.grew.notify_all();
    }

    /// The download is complete (before it is admitted: a request arriving meanwhile still joins).
    pub(super) fn complete(&mut self, sha256: &str) {
        self.ended = true;
        self.set(Phase::Complete(sha256.to_owned()), false);
    }

    /// The download failed: joiners are cut.
    pub(super) fn fail(&mut self, why: &str) {
        self.ended = true;
        self.set(Phase::Failed(why.to_owned()), true);
    }

    /// Nothing to share: joiners go their own way.
    pub(super) fn resign(&mut self) {
        if !self.ended {
            self.ended = true;
            self.set(Phase::Resigned, true);
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.fail("the download ended early");
        }
        self.leave();
    }
}

impl Request<'_> {
    /// Serve the download another request leads, from its file, checking the SHA-256 as [`Request`]'s
    /// cached copies are checked: the last chunk is held back until the hash matches the leader's.
    pub(super) fn serve_joined(&mut self, key: &str, flight: &Flight, file: &File, length: Option<u64>) {
        self.reply_head(200, length);
        let mut check = HeldBack::new();
        let mut buf = vec![0u8; CHUNK];
        let mut pos = 0u64;
        let mut guest = true;
        loop {
            match flight.next(pos) {
                Next::Data(upto) => {
                    while pos < upto && guest {
                        let want = usize::try_from(upto - pos).unwrap_or(CHUNK).min(CHUNK);
                        let n = match file.read_at(&mut buf[..want], pos) {
                            Ok(0) => return self.cut_joined(format!("{key}: the shared file ends at {pos} bytes")),
                            Ok(n) => n,
                            Err(err) => return self.cut_joined(format!("{key}: read the shared download: {err}")),
                        };
                        let free = check.push(&buf[..n]);
                        if !free.is_empty() {
                            self.send(&free, &mut guest);
                            self.progress_behind(key, pos, length);
                        }
                        pos += n as u64;
                    }
                    if !guest {
                        return self.done();
                    }
                }
                Next::Complete(sha) => {
                    let Some(last) = check.finish(&sha) else {
                        return self.cut_joined(format!("{key}: the shared download does not match its SHA-256"));
                    };
                    self.send(&last, &mut guest);
                    self.done();
                    tracing::info!("boot cache: {key}: {pos} bytes from a download another request led");
                    return;
                }
                Next::Failed(why) => return self.cut_joined(format!("{key}: the shared download failed: {why}")),
            }
        }
    }

    fn cut_joined(&mut self, why: String) {
        tracing::warn!("boot cache: {why}");
        self.cut(why);
    }

    /// The progress of a joiner, shown unless the leader's download of the same file is further on.
    fn progress_behind(&self, key: &str, bytes: u64, total: Option<u64>) {
        let ahead = self.shared.state().download.as_ref().is_some_and(|d| d.file == key && d.bytes >= bytes);
        if !ahead {
            self.progress(key, bytes, total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn lead<'a>(flights: &'a Flights, key: &str) -> Leader<'a> {
        match flights.enter(key) {
            Entered::Lead(l) => l,
            Entered::Join(_) => panic!("a leader was expected"),
        }
    }

    fn join(flights: &Flights, key: &str) -> Arc<Flight> {
        match flights.enter(key) {
            Entered::Join(f) => f,
            Entered::Lead(_) => panic!("a joiner was expected"),
        }
    }

    #[test]
    fn one_leader_per_key_and_joiners_follow_it() {
        let flights = Flights::default();
        let mut l = lead(&flights, "big");
        let f = join(&flights, "big");
        let other = lead(&flights, "other");
        assert_eq!(flights.shared_length("big"), None, "still asking the origin");
        let tmp = tempfile::tempfile().unwrap();
        std::thread::scope(|s| {
            let waiting = s.spawn(|| f.decision().map(|(_, length)| length));
            l.streaming(tmp.try_clone().unwrap(), Some(10));
            assert_eq!(waiting.join().unwrap(), Some(Some(10)), "the joiner waited for the leader's answer");
        });
        assert_eq!(flights.shared_length("big"), Some(Some(10)));
        (&tmp).write_all(b"hello").unwrap();
        l.wrote(5);
        assert!(matches!(f.next(0), Next::Data(5)));
        let (file, _) = f.decision().unwrap();
        let mut buf = [0u8; 5];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello");
        l.complete("sha");
        assert!(matches!(f.next(5), Next::Complete(s) if s == "sha"));
        assert!(matches!(flights.enter("big"), Entered::Join(_)), "complete but not yet admitted: still shared");
        drop(l);
        drop(other);
        assert!(flights.map().is_empty(), "the leaders left");
    }

    #[test]
    fn a_resigned_or_failed_leader_lets_go() {
        let flights = Flights::default();
        let mut l = lead(&flights, "k");
        let f = join(&flights, "k");
        l.resign();
        assert!(f.decision().is_none(), "nothing to share: the joiner goes its own way");
        let l2 = lead(&flights, "k");
        let f2 = join(&flights, "k");
        drop(l);
        assert!(matches!(flights.enter("k"), Entered::Join(_)), "an old leader does not remove a new one");
        // A leader that ends without a word (a panic) fails its joiners.
        drop(l2);
        assert!(f2.decision().is_none());
        assert!(matches!(f2.next(0), Next::Failed(_)));
        let mut l3 = lead(&flights, "k");
        let f3 = join(&flights, "k");
        l3.streaming(tempfile::tempfile().unwrap(), None);
        l3.wrote(3);
        l3.fail("cut");
        assert!(matches!(f3.next(0), Next::Data(3)), "what was written is still read");
        assert!(matches!(f3.next(3), Next::Failed(w) if w == "cut"));
        assert!(matches!(flights.enter("k"), Entered::Lead(_)), "a failed download is not joined");
    }
}
