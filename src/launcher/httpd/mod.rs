//! `--boot-dir`: a small static HTTP server for the guest's iPXE, on the launcher's own tokio runtime (hyper
//! does the HTTP; no thread per connection).
//!
//! GET and HEAD only (405 otherwise). Files are streamed from disk with their length, never read into memory
//! (initrds are hundreds of MB). A request path is percent-decoded, `..` is refused, and the canonical path
//! must stay inside the served directory, so a symlink that leaves it is refused too. Regular files and
//! directory listings are served; anything else (a FIFO, a device, a socket) is 403 and never opened, since
//! opening a FIFO would wait for a writer. Every file-system call (resolving, opening, listing, reading)
//! runs on tokio's blocking pool, never on the event loop, so a file system that stalls stalls only its
//! own request.
//!
//! Any local process and the guest (at 10.0.2.2) can connect, so the server is bounded: at most
//! [`MAX_CONNECTIONS`] connections at once (more are answered 503 and closed at once, so a flood never queues
//! in front of the guest), request headers must arrive within [`HEADER_READ_TIMEOUT`], and a connection that
//! moves no byte either way for [`IDLE_TIMEOUT`] (a half-sent request, a client that stopped reading) is
//! closed. Nothing on a connection's path spawns a thread or can panic.

use std::convert::Infallible;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::bootcache::BootCache;
use crate::error::{Error, Result};

mod files;

pub(super) use files::resolve;
use files::{Served, open_served, refuse};

/// Connections served at the same time; more are answered 503 and closed.
pub(super) const MAX_CONNECTIONS: usize = 64;
/// A request's headers must be complete within this time.
pub(super) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection on which no byte moved, in or out, for this long is closed.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Request headers larger than this are refused (hyper's minimum buffer).
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Bytes read from a file per body chunk.
const CHUNK: usize = 64 * 1024;
/// At most one warning about refused connections or accept errors per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// What one server allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// A file being sent: what `status --json` shows as `download` while the guest loads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Transfer {
    /// The request path without its leading `/`.
    pub(crate) file: String,
    pub(crate) bytes: u64,
    pub(crate) total: u64,
}

/// The transfer in progress (the latest one to send a chunk), shared with the supervisor.
pub(crate) type Progress = Arc<std::sync::Mutex<Option<Transfer>>>;

/// What a server serves: a directory (`--boot-dir`) or the boot cache (`--boot-cache on`).
enum Backend {
    Dir(PathBuf),
    Cache(BootCache),
}

/// What every connection shares: what is served and the progress of the file being sent (the boot cache
/// keeps its own).
struct Shared {
    backend: Backend,
    progress: Progress,
}

/// The running server (a task on the current tokio runtime); stops, with all its connections, when dropped.
pub(super) struct BootServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
    progress: Progress,
}

impl BootServer {
    /// Serve `dir` on `bind:port` (port 0: a free one). Call inside a tokio runtime: the server runs on it
    /// whenever the runtime is driven.
    pub(super) fn start(dir: &Path, bind: IpAddr, port: u16) -> Result<Self> {
        Self::start_with(dir, bind, port, Limits::default())
    }

    /// [`BootServer::start`] with other limits (tests use short ones).
    pub(super) fn start_with(dir: &Path, bind: IpAddr, port: u16, limits: Limits) -> Result<Self> {
        let root = dir.canonicalize().map_err(|e| Error::io(format!("--boot-dir \"{}\"", dir.display()), e))?;
        let shown = dir.display().to_string();
        Self::listen(Backend::Dir(root), &shown, bind, port, limits)
    }

    /// Serve the boot cache on `127.0.0.1`, a free port: every path goes through [`BootCache::get`].
    pub(super) fn start_cache(cache: BootCache) -> Result<Self> {
        let shown = format!("the boot cache of {}", cache.boot_url().url);
        Self::listen(Backend::Cache(cache), &shown, IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0, Limits::default())
    }

    fn listen(backend: Backend, shown: &str, bind: IpAddr, port: u16, limits: Limits) -> Result<Self> {
        let std_listener = std::net::TcpListener::bind(SocketAddr::new(bind, port)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                return Error::conflict(
                    format!("--boot-http-port {port}"),
                    format!("{bind}:{port} is already in use (pick another port, or 0 for a free one)"),
                );
            }
            Error::io(format!("--boot-http-bind {bind} --boot-http-port {port}: listen"), e)
        })?;
        let listener = std_listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(std_listener))
            .map_err(|e| Error::io("boot HTTP server: set up the listener", e))?;
        let addr = listener.local_addr().map_err(|e| Error::io("boot HTTP server: listen address", e))?;
        let progress = Progress::default();
        let shared = Arc::new(Shared { backend, progress: Arc::clone(&progress) });
        let task = tokio::spawn(serve(listener, shared, limits));
        tracing::info!("serving {shown} on http://{addr}/");
        Ok(BootServer { addr, task, progress })
    }

    /// The file being sent, as it goes.
    pub(super) fn progress(&self) -> Progress {
        Arc::clone(&self.progress)
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BootServer {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

/// Accept connections until aborted; each is a task in one JoinSet, so the count is exact and bounded.
async fn serve(listener: TcpListener, root: Arc<Shared>, limits: Limits) {
    let mut conns: JoinSet<()> = JoinSet::new();
    let mut refused: u64 = 0;
    let mut last_warning: Option<Instant> = None;
    let mut warn = |what: &str| {
        if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            last_warning = Some(Instant::now());
            tracing::warn!("boot HTTP: {what}");
        }
    };
    loop {
        tokio::select! {
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    while conns.try_join_next().is_some() {}
                    if conns.len() >= limits.max_connections {
                        refused += 1;
                        // Best effort, never blocking: a flood must not queue in front of the guest.
                        let _ = stream.try_write(
                            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                        warn(&format!(
                            "{} connections open; refused the one from {peer} ({refused} refused so far)",
                            limits.max_connections
                        ));
                        continue;
                    }
                    conns.spawn(connection(stream, peer, Arc::clone(&root), limits));
                }
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning; the open connections go on.
                    warn(&format!("accept: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// A stream that records when a byte last moved in either direction.
struct Watched {
    inner: TcpStream,
    epoch: Instant,
    last: Arc<AtomicU64>,
}

impl Watched {
    fn touch(&self) {
        self.last.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serve one connection until it ends, its headers are too slow, or it idles too long.
async fn connection(stream: TcpStream, peer: SocketAddr, root: Arc<Shared>, limits: Limits) {
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Watched { inner: stream, epoch, last: Arc::clone(&last) });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let service = service_fn(move |req| {
        let root = Arc::clone(&root);
        async move { Ok::<_, Infallible>(handle(&req, &root, peer).await) }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("boot HTTP: connection from {peer}: {e}");
                }
                return;
            }
            _ = tick.tick() => {
                let idle = epoch.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if idle >= limits.idle_timeout {
                    tracing::debug!("boot HTTP: connection from {peer}: idle for {} s; closed", idle.as_secs());
                    return;
                }
            }
        }
    }
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn text(s: String) -> Body {
    Full::new(Bytes::from(s)).map_err(|never| match never {}).boxed_unsync()
}

fn status_response(status: u16, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// The body of a file: `len` bytes read in chunks on tokio's blocking pool. Each chunk handed on updates
/// `progress`; the last one logs the transfer (name, size, seconds, rate).
fn file_body(file: File, len: u64, name: String, progress: Progress) -> Body {
    let file = tokio::fs::File::from_std(file);
    let started = Instant::now();
    let set = move |left: u64| {
        let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
        if left == 0 {
            if p.as_ref().is_some_and(|t| t.file == name) {
                *p = None;
            }
            tracing::info!("{}", transfer_summary(&name, len, started.elapsed()));
        } else {
            *p = Some(Transfer { file: name.clone(), bytes: len - left, total: len });
        }
    };
    set(len.max(1));
    let stream = futures::stream::unfold((file, len, set), |(mut file, left, set)| async move {
        if left == 0 {
            return None;
        }
        let mut buf = BytesMut::with_capacity(CHUNK.min(left as usize));
        match file.read_buf(&mut buf).await {
            Ok(0) => Some((
                Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "file shrank while being served")),
                (file, 0, set),
            )),
            Ok(n) => {
                let n = (n as u64).min(left);
                buf.truncate(n as usize);
                set(left - n);
                Some((Ok(Frame::data(buf.freeze())), (file, left - n, set)))
            }
            Err(e) => Some((Err(e), (file, 0, set))),
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// The log line of a file sent in full: `downloaded NAME: SIZE MiB in S s, R MB/s` (files under 1 MiB in
/// bytes).
pub(crate) fn transfer_summary(name: &str, bytes: u64, took: Duration) -> String {
    let secs = took.as_secs_f64().max(0.001);
    let size =
        if bytes < 1 << 20 { format!("{bytes} bytes") } else { format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0)) };
    format!("downloaded {name}: {size} in {secs:.2} s, {:.1} MB/s", bytes as f64 / secs / 1e6)
}

async fn handle(req: &Request<Incoming>, shared: &Shared, peer: SocketAddr) -> Response<Body> {
    let method = req.method();
    let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if method != Method::GET && method != Method::HEAD {
        tracing::warn!("boot HTTP: {method} {target} from {peer}: 405 (only GET and HEAD)");
        let mut r = status_response(405, empty());
        r.headers_mut().insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let root = match &shared.backend {
        Backend::Dir(root) => root.clone(),
        Backend::Cache(cache) => {
            let reply = if method == Method::HEAD { cache.head(target).await } else { cache.get(target).await };
            let status = reply.status;
            if status < 400 {
                let len = reply.length.map_or_else(|| "length unknown".to_owned(), |l| format!("{l} bytes"));
                tracing::info!("boot cache: {method} {target} from {peer}: {status} ({len})");
            } else {
                tracing::warn!("boot cache: {method} {target} from {peer}: {status}");
            }
            let mut r = reply.into_response();
            if method == Method::HEAD {
                *r.body_mut() = empty();
            }
            return r;
        }
    };
    let t = target.to_owned();
    let served = tokio::task::spawn_blocking(move || resolve(&root, &t).and_then(|p| open_served(&p, &t)))
        .await
        .unwrap_or_else(|e| Err(refuse(500, format!("file lookup failed: {e}"))));
    match served {
        Ok(Served::Listing(html)) => {
            tracing::info!("boot HTTP: {method} {target} from {peer}: 200 (listing)");
            let len = html.len();
            let body = if method == Method::HEAD { empty() } else { text(html) };
            let mut r = status_response(200, body);
            r.headers_mut().insert(CONTENT_LENGTH, len.into());
            r.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/html; charset=utf-8"));
            r
        }
        Ok(Served::File(file, len)) => {
            tracing::info!("boot HTTP: {method} {target} from {peer}: 200 ({len} bytes)");
            let body = if method == Method::HEAD || len == 0 {
                empty()
            } else {
                let name = req.uri().path().trim_start_matches('/').to_owned();
                file_body(file, len, name, Arc::clone(&shared.progress))
            };
            let mut r = status_response(200, body);
            r.headers_mut().insert(CONTENT_LENGTH, len.into());
            r.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/octet-stream"));
            r
        }
        Err(refusal) => {
            tracing::warn!("boot HTTP: {method} {target} from {peer}: {} ({})", refusal.status, refusal.reason);
            status_response(refusal.status, text(format!("{}\n", refusal.reason)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("www");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("netboot.ipxe"), b"#!ipxe\necho hi\n").unwrap();
        std::fs::write(root.join("sub/a b.txt"), b"spaced").unwrap();
        std::fs::write(tmp.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink("netboot.ipxe", root.join("inside")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let root = root.canonicalize().unwrap();
        (tmp, root)
    }

    #[test]
    fn transfer_summaries() {
        assert_eq!(
            transfer_summary("initrd", 64 << 20, Duration::from_millis(2120)),
            "downloaded initrd: 64.0 MiB in 2.12 s, 31.7 MB/s"
        );
        assert_eq!(
            transfer_summary("netboot.ipxe", 69, Duration::from_micros(20)),
            "downloaded netboot.ipxe: 69 bytes in 0.00 s, 0.1 MB/s"
        );
    }

    #[test]
    fn resolve_allows_files_inside_and_refuses_the_rest() {
        let (_t, root) = tree();
        assert_eq!(resolve(&root, "/netboot.ipxe").unwrap(), root.join("netboot.ipxe"));
        assert_eq!(resolve(&root, "/netboot.ipxe?x=1").unwrap(), root.join("netboot.ipxe"));
        assert_eq!(resolve(&root, "//./netboot.ipxe").unwrap(), root.join("netboot.ipxe"));
        assert_eq!(resolve(&root, "/sub/a%20b.txt").unwrap(), root.join("sub/a b.txt"));
        assert_eq!(resolve(&root, "/inside").unwrap(), root.join("netboot.ipxe"), "a symlink inside is fine");
        let status = |t: &str| resolve(&root, t).unwrap_err().status;
        assert_eq!(status("/../secret"), 403);
        assert_eq!(status("/sub/../../secret"), 403);
        assert_eq!(status("/%2e%2e/secret"), 403);
        assert_eq!(status("/sub/%2E%2E/%2e%2e/secret"), 403);
        assert_eq!(status("/..%2fsecret"), 403);
        assert_eq!(status("/escape"), 403);
        assert_eq!(status("/etc/passwd"), 403);
        assert_eq!(status("/missing"), 404);
        assert_eq!(resolve(&root, "/").unwrap(), root, "the directory itself (listed)");
        assert_eq!(status("/a%00b"), 400);
        assert_eq!(status("netboot.ipxe"), 400);
        assert!(resolve(&root, "/escape").unwrap_err().reason.contains("outside the served directory"));
    }

    type Job = Box<dyn FnOnce(&Path) + Send>;

    /// A server on a runtime of its own thread (as in `run`, a current-thread runtime); stopped on drop.
    struct Served {
        addr: SocketAddr,
        root: PathBuf,
        tx: Option<std::sync::mpsc::Sender<Job>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Served {
        fn start(root: &Path, limits: Limits) -> Served {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let (atx, arx) = std::sync::mpsc::channel();
            let r = root.to_owned();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let _g = rt.enter();
                let srv = BootServer::start_with(&r, "127.0.0.1".parse().unwrap(), 0, limits).unwrap();
                atx.send(srv.addr()).unwrap();
                rt.block_on(async {
                    loop {
                        match rx.try_recv() {
                            Ok(f) => f(&r),
                            Err(std::sync::mpsc::TryRecvError::Empty) => {
                                tokio::time::sleep(std::time::Duration::from_millis(10)).await
                            }
                            Err(_) => break,
                        }
                    }
                });
                drop(srv);
                // The runtime keeps going a moment so aborted tasks are dropped (and their sockets closed).
                rt.block_on(tokio::time::sleep(std::time::Duration::from_millis(50)));
            });
            Served { addr: arx.recv().unwrap(), root: root.to_owned(), tx: Some(tx), thread: Some(thread) }
        }

        /// Run `f` on the server's runtime thread and return its result.
        fn run<T: Send + 'static>(&self, f: impl FnOnce(PathBuf) -> T + Send + 'static) -> T {
            let (tx, rx) = std::sync::mpsc::channel();
            let root = self.root.clone();
            self.tx.as_ref().unwrap().send(Box::new(move |_: &Path| tx.send(f(root)).unwrap())).unwrap();
            rx.recv().unwrap()
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.tx.take();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn raw(addr: SocketAddr, request: &str) -> (String, Vec<u8>) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (String::from_utf8_lossy(&buf[..split]).into_owned(), buf[split..].to_vec())
    }

    #[test]
    fn server_answers_get_head_and_refuses_the_rest() {
        let (_t, root) = tree();
        // A large sparse file: streamed, not read into memory.
        let big = std::fs::File::create(root.join("initrd")).unwrap();
        big.set_len(64 << 20).unwrap();
        let srv = Served::start(&root, Limits::default());
        let a = srv.addr;
        assert!(a.ip().is_loopback() && a.port() != 0);

        let (h, body) = raw(a, "GET /netboot.ipxe HTTP/1.0\r\n\r\n");
        assert!(h.starts_with("HTTP/1.0 200"), "{h}");
        assert_eq!(body, b"#!ipxe\necho hi\n");

        let (h, body) = raw(a, "HEAD /netboot.ipxe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert!(h.to_ascii_lowercase().contains("content-length: 15"), "{h}");
        assert!(body.is_empty());

        let (h, body) = raw(a, "GET /sub HTTP/1.0\r\n\r\n");
        assert!(h.starts_with("HTTP/1.0 200") && h.contains("text/html"), "{h}");
        assert!(String::from_utf8_lossy(&body).contains("<a href=\"/sub/a%20b.txt\">a b.txt</a>"), "{body:?}");

        let (h, body) = raw(a, "GET /initrd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(h.to_ascii_lowercase().contains(&format!("content-length: {}", 64 << 20)), "{h}");
        assert_eq!(body.len(), 64 << 20);

        for (req, code) in [
            ("POST /netboot.ipxe HTTP/1.0\r\nContent-Length: 0\r\n\r\n", "405"),
            ("PUT /x HTTP/1.0\r\nContent-Length: 0\r\n\r\n", "405"),
            ("DELETE /netboot.ipxe HTTP/1.0\r\n\r\n", "405"),
            ("GET /../secret HTTP/1.0\r\n\r\n", "403"),
            ("GET /%2e%2e/secret HTTP/1.0\r\n\r\n", "403"),
            ("GET /escape HTTP/1.0\r\n\r\n", "403"),
            ("GET /etc/passwd HTTP/1.0\r\n\r\n", "403"),
            ("GET /fifo HTTP/1.0\r\n\r\n", "403"),
            ("GET /nope HTTP/1.0\r\n\r\n", "404"),
        ] {
            let (h, body) = raw(a, req);
            assert!(h.starts_with(&format!("HTTP/1.0 {code}")), "{req:?}: {h}");
            assert!(!String::from_utf8_lossy(&body).contains("outside\n") && body != b"outside", "{req:?}");
            if code == "405" {
                assert!(h.to_ascii_lowercase().contains("allow: get, head"), "{h}");
            }
        }
        let busy = srv.run(move |root| BootServer::start(&root, "127.0.0.1".parse().unwrap(), a.port()).err().unwrap());
        assert_eq!(busy.exit_code(), 4);
        assert!(busy.to_string().starts_with(&format!("--boot-http-port {}: ", a.port())), "{busy}");
        drop(srv);
        let stopped = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            TcpStream::connect(a).is_err()
        });
        assert!(stopped, "the server stops when dropped");
    }

    /// The limits hold: over the cap a client gets 503 at once, a half-sent request and a client that stops
    /// reading are closed after their timeouts, and the server then serves again.
    #[test]
    fn connection_cap_and_timeouts() {
        let (_t, root) = tree();
        std::fs::File::create(root.join("big")).unwrap().set_len(256 << 20).unwrap();
        let limits = Limits {
            max_connections: 4,
            header_read_timeout: std::time::Duration::from_secs(1),
            idle_timeout: std::time::Duration::from_secs(2),
        };
        let srv = Served::start(&root, limits);
        let a = srv.addr;
        // Two half-sent requests and two readers that never read a 256 MiB body.
        let mut held = Vec::new();
        for i in 0..4 {
            let mut s = TcpStream::connect(a).unwrap();
            if i < 2 {
                s.write_all(b"GET /netboot.ipxe HTTP/1.1\r\nHost: x\r\n").unwrap();
            } else {
                s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            }
            held.push(s);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        // Over the cap: a 503, or (when the request crossed the close) a reset; never a wait.
        let over = std::time::Instant::now();
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET /netboot.ipxe HTTP/1.0\r\n\r\n");
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => assert!(buf.starts_with(b"HTTP/1.1 503"), "over the cap: {}", String::from_utf8_lossy(&buf)),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "over the cap: {e}"),
        }
        assert!(over.elapsed() < std::time::Duration::from_secs(2), "refused at once");
        // All four are closed by the server within the timeouts (plus the 1 s idle tick).
        for (i, s) in held.iter_mut().enumerate() {
            s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
            let started = std::time::Instant::now();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) if i >= 2 && started.elapsed() < std::time::Duration::from_millis(100) => {
                        // The reader's socket buffers had filled; stop reading again so the server stalls.
                        std::thread::sleep(std::time::Duration::from_secs(4));
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                    Err(e) => panic!("connection {i} not closed by the server: {e}"),
                }
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "connection {i}");
        }
        let (h, body) = raw(a, "GET /netboot.ipxe HTTP/1.0\r\n\r\n");
        assert!(h.starts_with("HTTP/1.0 200"), "{h}");
        assert_eq!(body, b"#!ipxe\necho hi\n");
    }
}
