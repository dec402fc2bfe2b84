//! One guest request of the boot cache, on a thread of its own: decide (revalidate with the origin, or fall
//! back to the last good set), then stream the file to the guest while it is written to the store. A request
//! for a file whose download is running joins it ([`inflight`]). A HEAD takes the same
//! decision as a GET but never downloads a body: a fresh answer's body is dropped after its headers and
//! nothing is admitted or recorded.

use std::io::{Read, Write};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::inflight::Entered;
use super::*;

/// One request on its thread.
pub(super) struct Request<'a> {
    pub(super) shared: &'a Shared,
    pub(super) rel: RelPath,
    pub(super) head: Option<oneshot::Sender<Head>>,
    pub(super) body: mpsc::Sender<std::io::Result<Bytes>>,
    /// The script's first bytes, when this is the script.
    pub(super) script: Option<Vec<u8>>,
    /// A HEAD: the answer's status and length only.
    pub(super) head_only: bool,
    /// The download of this path this request leads, if it does.
    pub(super) leader: Option<inflight::Leader<'a>>,
    /// The boot this request belongs to (a request of an earlier boot leaves the session alone).
    pub(super) boot: u64,
}

/// A file on its way to the guest with its last chunk held back until the whole file's SHA-256 is known, so
/// the guest never gets a complete file that differs from what was admitted.
pub(super) struct HeldBack {
    hasher: Sha256,
    held: Vec<u8>,
}

impl HeldBack {
    pub(super) fn new() -> Self {
        HeldBack { hasher: Sha256::new(), held: Vec::new() }
    }

    /// Take `chunk` in; what came before it is free to go (empty at first).
    pub(super) fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.hasher.update(chunk);
        std::mem::replace(&mut self.held, chunk.to_vec())
    }

    /// The last chunk, when the whole file's SHA-256 is `sha256`.
    pub(super) fn finish(self, sha256: &str) -> Option<Vec<u8>> {
        (store::hex(&self.hasher.finalize()) == sha256).then_some(self.held)
    }
}

enum Outcome {
    /// Serve this cached copy.
    Cached(Entry),
    Fresh(Fresh),
    Status(u16, String),
}

impl Request<'_> {
    fn key(&self) -> String {
        self.rel.key()
    }

    pub(super) fn reply_head(&mut self, status: u16, length: Option<u64>) {
        if let Some(tx) = self.head.take() {
            let _ = tx.send(Head { status, length });
        }
    }

    fn reply_text(&mut self, status: u16, reason: &str) {
        let body = format!("{reason}\n");
        self.reply_head(status, Some(body.len() as u64));
        let _ = self.body.blocking_send(Ok(Bytes::from(body)));
    }

    pub(super) fn run(&mut self) {
        let key = self.key();
        let sh = self.shared;
        if self.head_only {
            return self.run_head(&key);
        }
        if key == sh.boot.script {
            self.script = Some(Vec::new());
        }
        // Lead the download of this path, or join the one running (until a leader has one to share).
        loop {
            match sh.flights.enter(&key) {
                Entered::Lead(l) => {
                    self.leader = Some(l);
                    break;
                }
                Entered::Join(flight) => {
                    if let Some((file, length)) = flight.decision() {
                        self.serve_joined(&key, &flight, &file, length);
                        return self.scan_script();
                    }
                }
            }
        }
        match self.decide(&key) {
            Outcome::Cached(e) => {
                self.resign();
                self.serve_cached(&key, &e);
            }
            Outcome::Fresh(f) => self.serve_fresh(&key, f),
            Outcome::Status(s, why) => {
                self.resign();
                tracing::warn!("boot cache: {key}: {s} ({why})");
                self.reply_text(s, &why);
            }
        }
        self.leader = None;
        self.scan_script();
    }

    fn resign(&mut self) {
        if let Some(l) = &mut self.leader {
            l.resign();
        }
    }

    /// A HEAD: the length of a download being shared, else the same decision as a GET, without a body.
    fn run_head(&mut self, key: &str) {
        if let Some(length) = self.shared.flights.shared_length(key) {
            return self.reply_head(200, length);
        }
        match self.decide(key) {
            Outcome::Cached(e) => {
                if self.shared.store.has(&e) {
                    self.reply_head(200, Some(e.length));
                } else {
                    self.reply_unusable(key);
                }
            }
            // The body is dropped unread: the connection to the origin is closed.
            Outcome::Fresh(f) => self.reply_head(200, f.length),
            Outcome::Status(s, why) => {
                tracing::warn!("boot cache: HEAD {key}: {s} ({why})");
                self.reply_text(s, &why);
            }
        }
    }

    /// The absolute URLs of the script, when this was the script.
    fn scan_script(&mut self) {
        if let Some(script) = self.script.take() {
            let urls = generation::absolute_urls(&String::from_utf8_lossy(&script));
            if !urls.is_empty() {
                tracing::warn!(
                    "boot cache: the script names absolute URLs, fetched by iPXE past the cache: {}",
                    urls.join(" ")
                );
            }
            self.shared.state().not_cached = urls;
        }
    }

    /// Ask the origin (unless this boot already fell back) and choose the answer.
    fn decide(&self, key: &str) -> Outcome {
        let sh = self.shared;
        let boot = &sh.boot;
        let (cand, in_fallback) = {
            let st = sh.state();
            let cand = generation::candidate(key, &st.session, Some(&st.fetching), st.good.as_ref(), &boot.url, |e| {
                sh.store.has(e)
            });
            (cand, st.session.fallback.clone())
        };
        if let Some(err) = in_fallback {
            return self.fall_back(key, &err);
        }
        let url = boot.origin_url(&self.rel);
        match sh.client.get(&url, cand.as_ref()) {
            Ok(Answer::NotModified { etag, last_modified }) => {
                let Some(mut e) = cand else { return Outcome::Status(502, "304 without a cached copy".into()) };
                if etag.is_some() {
                    e.etag = etag;
                }
                if last_modified.is_some() {
                    e.last_modified = last_modified;
                }
                let mut st = sh.state();
                if !self.head_only {
                    st.counters.revalidated += 1;
                }
                st.counters.origin_error = None;
                drop(st);
                if !self.head_only {
                    self.admit_entry(key, &e);
                }
                Outcome::Cached(e)
            }
            Ok(Answer::Fresh(f)) => {
                let mut st = sh.state();
                st.counters.origin_error = None;
                if !self.head_only && st.boot == self.boot {
                    // Ended by [`Self::fresh_ended`] in [`Self::serve_fresh`].
                    st.session.fresh_in_flight += 1;
                }
                Outcome::Fresh(f)
            }
            Ok(Answer::Status(s)) => Outcome::Status(s, format!("the origin answered {s} for {url}")),
            Err(e) => self.fall_back(key, &e.0),
        }
    }

    fn fall_back(&self, key: &str, err: &str) -> Outcome {
        let sh = self.shared;
        let mut st = sh.state();
        st.counters.origin_error = Some(err.to_owned());
        let st = &mut *st;
        // A HEAD, or a request of an earlier boot, asks what the fallback would give without switching this
        // boot to it.
        let own = !self.head_only && st.boot == self.boot;
        let mut scratch;
        let session = if own {
            &mut st.session
        } else {
            scratch = st.session.clone();
            &mut scratch
        };
        match generation::fallback(key, &sh.boot.script, session, st.good.as_ref(), &sh.boot.url, err) {
            Ok(e) => {
                if own {
                    if !st.warned_fallback {
                        st.warned_fallback = true;
                        tracing::warn!("boot cache: booting from the last good set: the origin failed: {err}");
                    }
                    st.session.served.insert(key.to_owned(), e.clone());
                }
                Outcome::Cached(e)
            }
            Err(why) => Outcome::Status(503, why),
        }
    }

    /// Record a copy the origin confirmed in the session and the set being fetched (on disk).
    fn admit_entry(&self, key: &str, e: &Entry) {
        let _disk = self.shared.store.lock();
        self.record(key, e);
    }

    /// [`Self::admit_entry`] with the disk lock held by the caller.
    fn record(&self, key: &str, e: &Entry) {
        let sh = self.shared;
        let fetching = {
            let mut st = sh.state();
            let st = &mut *st;
            if let Some(full) = st.set_full(key) {
                tracing::warn!("{full}; not recorded");
                return;
            }
            if st.boot == self.boot {
                generation::record(&mut st.session, key, e, st.good.as_ref(), &sh.boot.url, true);
            }
            st.fetching.files.insert(key.to_owned(), e.clone());
            st.fetching.clone()
        };
        if let Err(err) = sh.store.save_fetching(&fetching) {
            tracing::warn!("boot cache: cannot save the set being fetched: {err}");
        }
    }

    pub(super) fn progress(&self, key: &str, bytes: u64, total: Option<u64>) {
        self.shared.state().download = Some(Download { file: key.to_owned(), bytes, total });
    }

    pub(super) fn done(&self) {
        self.shared.state().download = None;
    }

    /// Send a chunk to the guest; false when the guest went away (the download for the cache goes on).
    pub(super) fn send(&mut self, chunk: &[u8], guest: &mut bool) {
        if let Some(s) = &mut self.script
            && s.len() < SCRIPT_SCAN_BYTES
        {
            s.extend_from_slice(&chunk[..chunk.len().min(SCRIPT_SCAN_BYTES - s.len())]);
        }
        if *guest {
            if self.body.blocking_send(Ok(Bytes::copy_from_slice(chunk))).is_err() {
                *guest = false;
            } else {
                self.shared.state().counters.served_bytes += chunk.len() as u64;
            }
        }
    }

    /// Cut the guest's body (it sees a short download) and clear the progress shown.
    pub(super) fn cut(&mut self, why: String) {
        self.done();
        let _ = self.body.blocking_send(Err(std::io::Error::other(why)));
    }

    /// A cached copy that cannot be read: 503, the guest tries again.
    fn reply_unusable(&mut self, key: &str) {
        self.reply_text(503, &format!("cached copy of {key} unusable; try again"));
    }

    /// Serve a cached copy, checking its SHA-256 as it goes: the last chunk is held back until the hash
    /// matches, so the guest never gets a complete file that differs from what was admitted.
    fn serve_cached(&mut self, key: &str, e: &Entry) {
        let sh = self.shared;
        let mut file = match sh.store.open_object(e) {
            Ok(f) => f,
            Err(err) => {
                tracing::warn!("boot cache: {key}: cached copy unusable: {err}");
                // A shortage of descriptors or memory says nothing about the file: it stays.
                let shortage =
                    matches!(err.raw_os_error(), Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOMEM));
                if !shortage {
                    sh.store.discard(&e.sha256);
                }
                return self.reply_unusable(key);
            }
        };
        sh.state().counters.hits += 1;
        self.reply_head(200, Some(e.length));
        let mut check = HeldBack::new();
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        let mut guest = true;
        loop {
            let n = match file.read(&mut buf) {
                Ok(n) => n,
                Err(err) => return self.cut(format!("read the cached copy of {key}: {err}")),
            };
            if n == 0 {
                break;
            }
            let free = check.push(&buf[..n]);
            if !free.is_empty() {
                self.send(&free, &mut guest);
                sent += free.len() as u64;
                self.progress(key, sent, Some(e.length));
            }
            if !guest {
                // The guest went away: nothing to read the rest for.
                return self.done();
            }
        }
        let Some(last) = check.finish(&e.sha256) else {
            tracing::warn!("boot cache: {key}: the cached copy does not match its SHA-256; removed");
            sh.store.discard(&e.sha256);
            return self.cut(format!("cached copy of {key} is corrupt"));
        };
        self.send(&last, &mut guest);
        self.done();
        tracing::info!("boot cache: {key}: {} bytes from the cache", e.length);
    }

    /// Stream a 200 from the origin to the guest and into a temporary file; admit it when complete.
    fn serve_fresh(&mut self, key: &str, mut f: Fresh) {
        let sh = self.shared;
        let full = sh.state().set_full(key);
        let mut tmp = if let Some(full) = full {
            tracing::warn!("{full}; passed through uncached");
            None
        } else {
            match sh.store.temp() {
                Ok(t) => Some(t),
                Err(err) => {
                    tracing::warn!("boot cache: {key}: cannot write the cache ({err}); passed through uncached");
                    None
                }
            }
        };
        // Requests for this path meanwhile read the temporary file through a descriptor of their own.
        match tmp.as_ref().map(|t| t.file.try_clone()) {
            Some(Ok(dup)) => {
                if let Some(l) = &mut self.leader {
                    l.streaming(dup, f.length);
                }
            }
            Some(Err(err)) => {
                tracing::warn!("boot cache: {key}: cannot share the download ({err})");
                self.resign();
            }
            None => self.resign(),
        }
        self.reply_head(200, f.length);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        let mut guest = true;
        loop {
            let n = match f.body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) => {
                    let msg = format!("{}: cut off after {got} bytes: {err}", f.url);
                    tracing::warn!("boot cache: {key}: {msg}; nothing admitted");
                    // The partial file goes before the guest learns of the failure.
                    drop(tmp.take());
                    self.fresh_ended(key, None);
                    self.origin_failed_midway(&msg);
                    self.fail(&msg);
                    return self.cut(msg);
                }
            };
            hasher.update(&buf[..n]);
            if let Some(t) = &mut tmp {
                match t.file.write_all(&buf[..n]) {
                    Ok(()) => {
                        if let Some(l) = &self.leader {
                            l.wrote(n as u64);
                        }
                    }
                    Err(err) => {
                        tracing::warn!("boot cache: {key}: cannot write the cache ({err}); passed through uncached");
                        tmp = None;
                        self.fail(&format!("cannot write the cache: {err}"));
                    }
                }
            }
            got += n as u64;
            sh.state().counters.fetched_bytes += n as u64;
            self.send(&buf[..n], &mut guest);
            self.progress(key, got, f.length);
        }
        self.done();
        let sha = store::hex(&hasher.finalize());
        let framed = f.length.is_some() || f.chunked;
        let complete = match f.length {
            Some(l) => l == got,
            None => f.chunked,
        };
        if !complete {
            let msg = format!(
                "{}: {got} bytes, {} announced: not admitted",
                f.url,
                f.length.map(|l| l.to_string()).unwrap_or_else(|| "no length".into())
            );
            tracing::warn!("boot cache: {key}: {msg}");
            drop(tmp.take());
            self.fail(&msg);
            if framed {
                // Not what the origin announced: a failure, as a cut is.
                self.fresh_ended(key, None);
                self.origin_failed_midway(&msg);
                return self.cut(msg);
            }
            // No length and no framing (an HTTP/1.0 body ended by the connection's close): the guest got
            // what the origin sent, as it would from iPXE, but it is never admitted.
            return self.fresh_ended(key, Some(&sha));
        }
        self.fresh_ended(key, Some(&sha));
        let Some(tmp) = tmp else { return };
        if let Some(l) = &mut self.leader {
            l.complete(&sha);
        }
        // The long fsync before the disk lock: under it, only the rename and the naming.
        if let Err(err) = tmp.file.sync_all() {
            tracing::warn!("boot cache: {key}: cannot admit to the cache: {err}");
            return;
        }
        // The object and its naming in the set being fetched, with no clean-up in between.
        let _disk = sh.store.lock();
        if let Err(err) = sh.store.admit(tmp, &sha) {
            tracing::warn!("boot cache: {key}: cannot admit to the cache: {err}");
            return;
        }
        let e = Entry {
            sha256: sha,
            length: got,
            etag: f.etag.take(),
            last_modified: f.last_modified.take(),
            url: f.url.clone(),
        };
        self.record(key, &e);
        tracing::info!("boot cache: {key}: {got} bytes from {} (admitted)", f.url);
    }

    /// The download this request leads failed: its joiners are cut.
    fn fail(&mut self, why: &str) {
        if let Some(l) = &mut self.leader {
            l.fail(why);
        }
    }

    /// The origin broke off a body: the error is recorded and, when a good set exists, this boot goes on
    /// from it (the guest's retry is served from the cache).
    fn origin_failed_midway(&self, msg: &str) {
        let sh = self.shared;
        let mut st = sh.state();
        st.counters.origin_error = Some(msg.to_owned());
        if st.boot == self.boot
            && st.session.fallback.is_none()
            && generation::usable_good(st.good.as_ref(), &sh.boot.url).is_some()
        {
            st.session.fallback = Some(msg.to_owned());
            st.session.consistent = st.session.untouched();
        }
    }

    /// A fresh body this request streamed ended (`Some(sha256)`: the guest got all of it).
    fn fresh_ended(&self, key: &str, sha256: Option<&str>) {
        let sh = self.shared;
        let mut st = sh.state();
        let st = &mut *st;
        if st.boot == self.boot {
            st.session.fresh_in_flight_ended(key, sha256, st.good.as_ref(), &sh.boot.url);
        }
    }
}
