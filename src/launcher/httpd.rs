//! `--boot-dir`: a small static HTTP server (tiny_http does the HTTP) for the guest's iPXE.
//!
//! GET and HEAD only (405 otherwise). Files are streamed from disk with their length, never read into memory
//! (initrds are hundreds of MB). A request path is percent-decoded, `..` is refused, and the canonical path
//! must stay inside the served directory, so a symlink that leaves it is refused too. No directory listings.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use nix::libc;
use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

use crate::error::{Error, Result};

/// Requests answered at the same time; more get 503.
const MAX_ACTIVE: usize = 16;

/// Why a request gets no file.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal { status, reason: reason.into() }
}

/// Map a request target to a file inside `root` (which must be canonical). Pure apart from reading the file
/// system's view of the path.
pub fn resolve(root: &Path, target: &str) -> std::result::Result<PathBuf, Refusal> {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(refuse(400, "request target is not an absolute path"));
    }
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    if decoded.contains(&0) {
        return Err(refuse(400, "NUL byte in path"));
    }
    let mut rel = PathBuf::new();
    for part in decoded.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(refuse(403, "path traversal (\"..\") refused")),
            p => rel.push(std::ffi::OsStr::from_bytes(p)),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(refuse(404, "no directory listings"));
    }
    let canonical = match root.join(&rel).canonicalize() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(refuse(404, "not found")),
        Err(e) => return Err(refuse(403, format!("cannot resolve: {e}"))),
    };
    if !canonical.starts_with(root) {
        return Err(refuse(403, "resolves outside the served directory (symlink) and is refused"));
    }
    Ok(canonical)
}

/// Open a resolved path without following a symlink swapped in since, and require a regular file.
fn open_regular(path: &Path) -> std::result::Result<(File, u64), Refusal> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| refuse(403, format!("cannot open: {e}")))?;
    let meta = file.metadata().map_err(|e| refuse(500, format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(refuse(404, "not a regular file"));
    }
    Ok((file, meta.len()))
}

/// The running server; stops when dropped.
pub struct BootServer {
    server: Arc<Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl BootServer {
    /// Serve `dir` on `bind:port` (port 0: a free one).
    pub fn start(dir: &Path, bind: IpAddr, port: u16) -> Result<Self> {
        let root = dir.canonicalize().map_err(|e| Error::io(format!("--boot-dir \"{}\"", dir.display()), e))?;
        let server = Server::http(SocketAddr::new(bind, port)).map_err(|e| {
            let source = match e.downcast::<std::io::Error>() {
                Ok(io) => *io,
                Err(other) => std::io::Error::other(other.to_string()),
            };
            if source.kind() == std::io::ErrorKind::AddrInUse {
                return Error::conflict(
                    format!("--boot-http-port {port}"),
                    format!("{bind}:{port} is already in use (pick another port, or 0 for a free one)"),
                );
            }
            Error::io(format!("--boot-http-bind {bind} --boot-http-port {port}: listen"), source)
        })?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| Error::Runtime("boot HTTP server: no IP listen address".into()))?;
        let server = Arc::new(server);
        let srv = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("boot-httpd".into())
            .spawn(move || serve(&srv, &root))
            .map_err(|e| Error::io("start the boot HTTP server thread", e))?;
        tracing::info!("serving {} on http://{addr}/", dir.display());
        Ok(BootServer { server, addr, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BootServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(server: &Server, root: &Path) {
    let active = Arc::new(AtomicUsize::new(0));
    for request in server.incoming_requests() {
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_ACTIVE {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = request.respond(Response::empty(StatusCode(503)));
            continue;
        }
        let root = root.to_path_buf();
        let active2 = Arc::clone(&active);
        let spawned = std::thread::Builder::new().name("boot-httpd-req".into()).spawn(move || {
            handle(request, &root);
            active2.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("boot HTTP server: cannot start a request thread");
        }
    }
}

fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn handle(request: Request, root: &Path) {
    let method = request.method().clone();
    let target = request.url().to_owned();
    let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    if !matches!(method, Method::Get | Method::Head) {
        tracing::warn!("boot HTTP: {method} {target} from {peer}: 405 (only GET and HEAD)");
        let mut r = Response::empty(StatusCode(405));
        if let Some(h) = header("Allow", "GET, HEAD") {
            r.add_header(h);
        }
        let _ = request.respond(r);
        return;
    }
    match resolve(root, &target).and_then(|p| open_regular(&p)) {
        Ok((file, len)) => {
            tracing::info!("boot HTTP: {method} {target} from {peer}: 200 ({len} bytes)");
            let Ok(len) = usize::try_from(len) else {
                let _ = request.respond(Response::empty(StatusCode(500)));
                return;
            };
            let headers: Vec<Header> = header("Content-Type", "application/octet-stream").into_iter().collect();
            // Identity encoding with Content-Length; the body is copied from the file in small blocks.
            let r = Response::new(StatusCode(200), headers, file, Some(len), None).with_chunked_threshold(usize::MAX);
            if let Err(e) = request.respond(r) {
                tracing::debug!("boot HTTP: {target}: client went away: {e}");
            }
        }
        Err(refusal) => {
            tracing::warn!("boot HTTP: {method} {target} from {peer}: {} ({})", refusal.status, refusal.reason);
            let _ = request
                .respond(Response::from_string(format!("{}\n", refusal.reason)).with_status_code(refusal.status));
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
        let root = root.canonicalize().unwrap();
        (tmp, root)
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
        assert_eq!(status("/"), 404);
        assert_eq!(status("/a%00b"), 400);
        assert_eq!(status("netboot.ipxe"), 400);
        assert!(resolve(&root, "/escape").unwrap_err().reason.contains("outside the served directory"));
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
        let srv = BootServer::start(&root, "127.0.0.1".parse().unwrap(), 0).unwrap();
        let a = srv.addr();
        assert!(a.ip().is_loopback() && a.port() != 0);

        let (h, body) = raw(a, "GET /netboot.ipxe HTTP/1.0\r\n\r\n");
        assert!(h.starts_with("HTTP/1.0 200"), "{h}");
        assert_eq!(body, b"#!ipxe\necho hi\n");

        let (h, body) = raw(a, "HEAD /netboot.ipxe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert!(h.to_ascii_lowercase().contains("content-length: 15"), "{h}");
        assert!(body.is_empty());

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
            ("GET /sub HTTP/1.0\r\n\r\n", "404"),
            ("GET /nope HTTP/1.0\r\n\r\n", "404"),
        ] {
            let (h, body) = raw(a, req);
            assert!(h.starts_with(&format!("HTTP/1.0 {code}")), "{req:?}: {h}");
            assert!(!String::from_utf8_lossy(&body).contains("outside\n") && body != b"outside", "{req:?}");
            if code == "405" {
                assert!(h.contains("Allow: GET, HEAD"), "{h}");
            }
        }
        let busy = BootServer::start(&root, "127.0.0.1".parse().unwrap(), a.port()).err().unwrap();
        assert_eq!(busy.exit_code(), 4);
        assert!(busy.to_string().starts_with(&format!("--boot-http-port {}: ", a.port())), "{busy}");
        drop(srv);
        let stopped = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            TcpStream::connect(a).is_err()
        });
        assert!(stopped, "the server stops when dropped");
    }
}
