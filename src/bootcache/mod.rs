//! The verified boot cache (`--boot-cache on`): iPXE fetches everything under the boot URL's directory from
//! the launcher's loopback server; the launcher fetches it from the origin with the host's TLS, streams it to
//! the guest while writing it to `<state>/boot-cache/`, revalidates it on every boot and, when the origin
//! fails, serves the last good set.
//!
//! - [`target`]: the boot URL, the confinement of guest paths, redirects (pure);
//! - [`generation`]: revalidation candidates, the fallback's one-generation rule, the next good set (pure);
//! - [`store`]: the files on disk;
//! - [`origin`]: the HTTP client;
//! - `inflight`: at most one origin download per file; a second request for it joins the running one;
//! - [`BootCache`]: one request's way through them. All blocking I/O (the origin, the disk) runs on a thread
//!   of its own per request, never on the async runtime; the body reaches the runtime through a bounded
//!   channel, so a slow guest slows the origin download rather than filling memory. A `HEAD`
//!   ([`BootCache::head`]) takes a `GET`'s decision without downloading a body.
//!
//! Counters ([`Counters`]) and the progress of the file being sent ([`Download`]) are per boot:
//! [`BootCache::begin_boot`] resets them with the session.

pub mod generation;
mod inflight;
pub mod origin;
mod request;
pub mod store;
pub mod target;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use generation::Session;
use origin::{Answer, Client, Fresh, Limits, Roots};
use request::Request;
use store::{Entry, Manifest, Store};
use target::{BootUrl, RelPath};

/// Bytes read from the origin or the disk per chunk.
const CHUNK: usize = 64 * 1024;
/// Chunks buffered between a request's thread and the guest's connection (4 MiB).
const CHANNEL_CHUNKS: usize = 64;
/// Requests handled at the same time; more are answered 503.
pub const MAX_IN_FLIGHT: usize = 16;
/// How long [`BootCache::mark_good`] waits for the requests in flight to finish admitting their files.
const IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// Files a set (the one being fetched, one boot's) names at most, by default ([`Config::max_set_files`]); a
/// guest asking for more (say, the same file under endless query strings) gets them passed through uncached.
pub const MAX_SET_FILES: usize = 1024;
/// Bytes of the script kept to look for absolute URLs in it.
const SCRIPT_SCAN_BYTES: usize = 256 * 1024;

/// Where the guest's files come from (`status.json`'s `boot_source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootSource {
    /// Fetched or revalidated with the origin.
    Origin,
    /// The last good set, because the origin failed.
    Cache,
    /// No cache: iPXE talks to the boot URL itself (`--boot-cache off`).
    Direct,
}

/// `status.json`'s `boot_cache`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests answered with a cached copy (after a 304, or from the last good set).
    pub hits: u64,
    /// Requests the origin answered 304.
    pub revalidated: u64,
    /// Body bytes received from the origin.
    pub fetched_bytes: u64,
    /// Body bytes sent to the guest.
    pub served_bytes: u64,
    /// The origin's last error in this boot, if any.
    pub origin_error: Option<String>,
}

/// The file being sent to the guest (`status.json`'s `download`, its percentage worked out there).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Download {
    pub file: String,
    pub bytes: u64,
    pub total: Option<u64>,
}

/// What `status` shows of the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub boot_source: BootSource,
    pub boot_cache: Counters,
    pub download: Option<Download>,
    /// Absolute URLs in the chained script: iPXE fetches them itself, not through the cache.
    pub not_cached: Vec<String>,
}

/// How the cache is set up.
#[derive(Clone, Debug)]
pub struct Config {
    pub boot_url: String,
    pub state_dir: PathBuf,
    /// `--boot-ca` files.
    pub extra_ca: Vec<PathBuf>,
    pub limits: Limits,
    /// Files the set being fetched names at most ([`MAX_SET_FILES`]).
    pub max_set_files: usize,
}

/// What the good set holds, for `doctor` and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoodSet {
    pub files: usize,
    pub bytes: u64,
    pub marked: Option<(String, u64)>,
}

impl GoodSet {
    /// What `good` holds, when it is a usable good set of `boot_url`.
    fn of(good: Option<&Manifest>, boot_url: &str) -> Option<GoodSet> {
        generation::usable_good(good, boot_url).map(|g| GoodSet {
            files: g.files.len(),
            bytes: g.bytes(),
            marked: g.marked.clone(),
        })
    }
}

struct State {
    session: Session,
    fetching: Manifest,
    good: Option<Manifest>,
    counters: Counters,
    download: Option<Download>,
    not_cached: Vec<String>,
    in_flight: usize,
    warned_fallback: bool,
    /// Which boot this is ([`BootCache::begin_boot`] counts up): a request of an earlier boot, still
    /// running, never changes this boot's session, and a ready of an earlier boot marks nothing.
    boot: u64,
    max_set_files: usize,
}

impl State {
    /// The set being fetched is full and does not name `key`: `key` cannot be added (the warning says so).
    fn set_full(&self, key: &str) -> Option<String> {
        (!self.fetching.files.contains_key(key) && self.fetching.files.len() >= self.max_set_files).then(|| {
            format!("boot cache: {key}: the set being fetched has {} files, the most it holds", self.max_set_files)
        })
    }
}

struct Shared {
    boot: BootUrl,
    store: Store,
    client: Client,
    flights: inflight::Flights,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters unusable: take them as they are.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The boot cache of one `run`. Cheap to clone (shared).
#[derive(Clone)]
pub struct BootCache {
    shared: Arc<Shared>,
}

/// Why the cache cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("--boot-url {0}")]
    Url(String),
    #[error("{0}")]
    Ca(String),
    /// The HTTP client cannot start (its thread or runtime).
    #[error("boot cache: {0}")]
    Client(String),
    #[error("boot cache \"{dir}\": {source}")]
    Store {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BootCache {
    /// Parse the URL, load the roots, open the store (removing leftovers). Blocking: call it before the
    /// runtime runs or on a blocking thread.
    pub fn open(cfg: &Config) -> Result<BootCache, OpenError> {
        let boot = BootUrl::parse(&cfg.boot_url).map_err(|e| OpenError::Url(e.0))?;
        let roots = Roots::load(&cfg.extra_ca).map_err(OpenError::Ca)?;
        let store = Store::open(&cfg.state_dir)
            .map_err(|source| OpenError::Store { dir: cfg.state_dir.join(store::DIR), source })?;
        let good = store.good();
        let fetching = store.fetching().filter(|f| f.boot_url == boot.url).unwrap_or_else(|| Manifest::new(&boot.url));
        let client = Client::new(&roots, cfg.limits.clone()).map_err(OpenError::Client)?;
        let state = State {
            session: Session::default(),
            fetching,
            good,
            counters: Counters::default(),
            download: None,
            not_cached: Vec::new(),
            in_flight: 0,
            warned_fallback: false,
            boot: 0,
            max_set_files: cfg.max_set_files,
        };
        Ok(BootCache {
            shared: Arc::new(Shared { boot, store, client, flights: Default::default(), state: Mutex::new(state) }),
        })
    }

    /// The run is ending: no write to the cache after this returns (requests still running fail theirs).
    pub fn close(&self) {
        self.shared.store.close();
    }

    pub fn boot_url(&self) -> &BootUrl {
        &self.shared.boot
    }

    pub fn dir(&self) -> &Path {
        self.shared.store.dir()
    }

    /// Start a new boot: a new session, counters from zero.
    pub fn begin_boot(&self) {
        let mut st = self.shared.state();
        st.session = Session::default();
        st.counters = Counters::default();
        st.download = None;
        st.not_cached.clear();
        st.warned_fallback = false;
        st.boot += 1;
    }

    /// The boot running now, for [`BootCache::mark_good_of`].
    pub fn boot(&self) -> u64 {
        self.shared.state().boot
    }

    pub fn snapshot(&self) -> Snapshot {
        let st = self.shared.state();
        Snapshot {
            boot_source: if st.session.fallback.is_some() { BootSource::Cache } else { BootSource::Origin },
            boot_cache: st.counters.clone(),
            download: st.download.clone(),
            not_cached: st.not_cached.clone(),
        }
    }

    /// The last good set for this boot URL, if there is one.
    pub fn good_set(&self) -> Option<GoodSet> {
        GoodSet::of(self.shared.state().good.as_ref(), &self.shared.boot.url)
    }

    /// The boot reached `stage` (`ready`: a ready pattern is always set): what it was given
    /// becomes the last good set and everything else is removed. Blocking (disk): call it on a blocking
    /// thread. Returns whether the good set changed.
    pub fn mark_good(&self, stage: &str) -> std::io::Result<bool> {
        self.mark_good_of(stage, self.boot())
    }

    /// [`BootCache::mark_good`] for the boot `boot` ([`BootCache::boot`] when it reached `stage`): nothing
    /// when another boot began since (the guest rebooted at once), so the new boot's first files never
    /// replace the good set.
    pub fn mark_good_of(&self, stage: &str, boot: u64) -> std::io::Result<bool> {
        // The guest may print its ready line as soon as it has a file's last byte, while that file's thread
        // still fsyncs and admits it: wait for the requests in flight, so the good set holds every file of
        // the boot (bounded; a request still running after that is not part of the boot).
        let waited = std::time::Instant::now();
        while self.shared.state().in_flight > 0 && waited.elapsed() < IN_FLIGHT_WAIT {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        // From here to the new state, no request admits or names a file: what it admitted before is in the
        // session (so in the next good set); what it admits after goes into the new set being fetched.
        let _disk = self.shared.store.lock();
        let next = {
            let st = self.shared.state();
            if st.boot != boot {
                tracing::info!("boot cache: the guest rebooted before its ready boot was recorded; the good set stays");
                return Ok(false);
            }
            generation::next_good(&st.session, &self.shared.boot.url, stage, now)
        };
        let Some(next) = next else { return Ok(false) };
        self.shared.store.mark_good(&next)?;
        let (files, bytes) = (next.files.len(), next.bytes());
        let mut st = self.shared.state();
        st.good = Some(next);
        st.fetching = Manifest::new(&self.shared.boot.url);
        drop(st);
        tracing::info!("boot cache: the {files} files of this boot ({bytes} bytes) are the last good set ({stage})");
        Ok(true)
    }

    /// Answer a guest's `GET` of `target`. The work runs on a thread of its own; this returns once the status
    /// is known, with the body to follow.
    pub async fn get(&self, target: &str) -> Reply {
        self.answer(target, false).await
    }

    /// Answer a guest's `HEAD` of `target`: the status and length a `GET` would get, without downloading or
    /// storing a body (the body of the reply is empty).
    pub async fn head(&self, target: &str) -> Reply {
        self.answer(target, true).await
    }

    async fn answer(&self, target: &str, head_only: bool) -> Reply {
        let rel = match target::confine(target) {
            Ok(r) => r,
            Err(e) => return Reply::text(403, e.0),
        };
        let boot = {
            let mut st = self.shared.state();
            if st.in_flight >= MAX_IN_FLIGHT {
                return Reply::text(503, format!("{MAX_IN_FLIGHT} requests in flight; try again"));
            }
            st.in_flight += 1;
            st.boot
        };
        let (head_tx, head_rx) = oneshot::channel();
        let (body_tx, body_rx) = mpsc::channel(CHANNEL_CHUNKS);
        let shared = Arc::clone(&self.shared);
        let spawned = std::thread::Builder::new().name("boot-cache".into()).spawn(move || {
            // Counted out however the request ends (a panic included).
            let _counted = InFlight(&shared);
            let mut req = Request {
                shared: &shared,
                rel,
                head: Some(head_tx),
                body: body_tx,
                script: None,
                head_only,
                leader: None,
                boot,
            };
            req.run();
        });
        if let Err(e) = spawned {
            self.shared.state().in_flight -= 1;
            return Reply::text(503, format!("cannot start a thread: {e}"));
        }
        match head_rx.await {
            Ok(head) => Reply { status: head.status, length: head.length, body: ReplyBody::Stream(body_rx) },
            Err(_) => Reply::text(500, "the request's thread ended without an answer".into()),
        }
    }
}

/// A request counted in `in_flight` until dropped.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.in_flight = st.in_flight.saturating_sub(1);
    }
}

/// `doctor`: ask the origin for the boot URL with the host's TLS (system roots plus `extra_ca`), as the cache
/// would, reading at most a little of the body. `Ok` describes the answer; `Err` is why the cache would fall
/// back (or what the guest would be told).
pub fn check_origin(url: &str, extra_ca: &[PathBuf], timeout: std::time::Duration) -> Result<String, String> {
    let boot = BootUrl::parse(url).map_err(|e| e.0)?;
    let roots = Roots::load(extra_ca)?;
    let limits = Limits { connect_timeout: timeout, idle_timeout: timeout, ..Limits::default() };
    let client = Client::new(&roots, limits)?;
    let script = target::confine(&format!("/{}", boot.script)).map_err(|e| e.0)?;
    let origin_url = boot.origin_url(&script);
    let tls = if boot.origin.is_https() { format!("TLS verified with {}; ", roots.describe()) } else { String::new() };
    match client.get(&origin_url, None) {
        Ok(Answer::Fresh(f)) => Ok(format!(
            "{origin_url}: 200 ({tls}{}; {})",
            f.version,
            f.length.map_or_else(|| "length not announced".to_owned(), |l| format!("{l} bytes"))
        )),
        Ok(Answer::NotModified { .. }) => Ok(format!("{origin_url}: 304 ({tls}not modified)")),
        Ok(Answer::Status(s)) => Err(format!("{origin_url}: the origin answered {s}")),
        Err(e) => Err(e.0),
    }
}

/// `doctor`: the last good set of `boot_url` in `state_dir`, read without creating or changing anything.
pub fn read_good_set(state_dir: &Path, boot_url: &str) -> Option<GoodSet> {
    GoodSet::of(Some(&store::peek_good(state_dir)?), boot_url)
}

/// The status line of a reply.
struct Head {
    status: u16,
    length: Option<u64>,
}

/// An answer to the guest.
pub struct Reply {
    pub status: u16,
    /// `Content-Length` when known.
    pub length: Option<u64>,
    pub body: ReplyBody,
}

pub enum ReplyBody {
    Text(String),
    /// Chunks; an `Err` cuts the body (the guest sees a short download and fails it).
    Stream(mpsc::Receiver<std::io::Result<Bytes>>),
}

impl Reply {
    fn text(status: u16, reason: String) -> Reply {
        let body = format!("{reason}\n");
        Reply { status, length: Some(body.len() as u64), body: ReplyBody::Text(body) }
    }

    /// The whole body in memory (for tests and small files); `Err` when it was cut.
    pub async fn into_bytes(self) -> std::io::Result<Vec<u8>> {
        match self.body {
            ReplyBody::Text(t) => Ok(t.into_bytes()),
            ReplyBody::Stream(mut rx) => {
                let mut out = Vec::new();
                while let Some(chunk) = rx.recv().await {
                    out.extend_from_slice(&chunk?);
                }
                Ok(out)
            }
        }
    }

    /// As a hyper response.
    pub fn into_response(self) -> hyper::Response<http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>> {
        use http_body_util::{BodyExt, Full, StreamBody};
        let body = match self.body {
            ReplyBody::Text(t) => Full::new(Bytes::from(t)).map_err(|never| match never {}).boxed_unsync(),
            ReplyBody::Stream(mut rx) => {
                let stream = futures::stream::poll_fn(move |cx| {
                    rx.poll_recv(cx).map(|o| o.map(|r| r.map(hyper::body::Frame::data)))
                });
                StreamBody::new(stream).boxed_unsync()
            }
        };
        let mut r = hyper::Response::new(body);
        *r.status_mut() = hyper::StatusCode::from_u16(self.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        if let Some(l) = self.length {
            r.headers_mut().insert(hyper::header::CONTENT_LENGTH, l.into());
        }
        r.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/octet-stream"));
        r
    }
}
