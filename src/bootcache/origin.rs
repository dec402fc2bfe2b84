//! The origin client: reqwest's blocking client (hyper underneath) over rustls (ring) with TLS 1.2/1.3,
//! trusting the system's CA bundle (Mozilla's roots built into the binary when none is found) plus every
//! `--boot-ca` PEM file. ALPN offers `h2` and `http/1.1`: an origin that accepts `h2` is spoken to in HTTP/2,
//! any other in HTTP/1.1 (plain `http://` is always HTTP/1.1).
//!
//! Redirects are followed here, not by reqwest, so the rule of [`redirect_allowed`] holds on every hop. No
//! proxy from the environment is used, as in `doctor`. Every wait is bounded by the idle timeout: the
//! connection and the response's head together, then each read of the body on its own (reqwest's blocking
//! `timeout` applies per wait, not to the whole body, so a long healthy download is never cut, a stalled one
//! is). A body is cut at the per-file limit, announced or counted (an endless body is cut off).
//!
//! A body is complete when its length was announced and that many bytes came, or, without a length, when
//! its end is framed: an HTTP/1.1 chunked body (last chunk) or any HTTP/2 body (`END_STREAM`). A framed body
//! that is cut (the connection closes, the stream is reset) ends in a read error, never in a clean end, so
//! a clean end of a framed body is its real end. Only an HTTP/1.1 body delimited by the connection's close
//! cannot be told from a cut one: it is passed on but not admitted ([`Fresh::chunked`] is false).
//!
//! reqwest's blocking client runs its connections on a thread of its own per client (a current-thread
//! tokio runtime): the boot cache has one client, so one more thread.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::blocking;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::store::Entry;
use super::target::{redirect_allowed, resolve_location, split_url};

/// Where the system's CA bundle is looked for (`SSL_CERT_FILE` first): Debian/Ubuntu/NixOS/Arch, Fedora/RHEL,
/// Alpine/macOS-style.
pub const SYSTEM_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];
/// Redirect hops followed at most.
pub const MAX_REDIRECTS: usize = 5;
/// The client's `User-Agent`.
const USER_AGENT: &str = concat!("ec-ipxe-qemu/", env!("CARGO_PKG_VERSION"), " (boot cache)");

/// Limits of the origin client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub connect_timeout: Duration,
    /// No byte from the origin for this long cuts the request off: the connection and the response's head
    /// must come within it, then every read of the body.
    pub idle_timeout: Duration,
    /// A file larger than this (announced or counted) is refused.
    pub max_file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
            max_file_bytes: 8 << 30,
        }
    }
}

/// The roots: the system bundle when one is found (else Mozilla's roots built into the binary), plus every
/// `--boot-ca` file.
#[derive(Clone, Debug)]
pub struct Roots {
    /// The certificates of the system bundle; empty when none was found or it held none.
    pub system_certs: Vec<CertificateDer<'static>>,
    /// The system bundle used, if any (`None`: the built-in roots).
    pub system: Option<PathBuf>,
    /// The certificates of the `--boot-ca` files.
    pub extra: Vec<CertificateDer<'static>>,
}

impl Roots {
    /// Load the system bundle and the `--boot-ca` files. Errors (an unreadable `--boot-ca`, not PEM, no
    /// certificate, not a usable CA certificate) name the file.
    pub fn load(extra: &[PathBuf]) -> Result<Roots, String> {
        let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
        let found = env.into_iter().chain(SYSTEM_BUNDLES.iter().map(PathBuf::from)).find(|p| p.is_file());
        let (system, system_certs) = match found {
            Some(p) => match read_pem_certs(&p) {
                Ok(c) if !c.is_empty() => (Some(p), c),
                Ok(_) => {
                    tracing::warn!("boot cache: system CA bundle \"{}\" holds no certificate; not used", p.display());
                    (None, Vec::new())
                }
                Err(e) => {
                    tracing::warn!("boot cache: system CA bundle {e}; not used");
                    (None, Vec::new())
                }
            },
            None => (None, Vec::new()),
        };
        let mut certs = Vec::new();
        for p in extra {
            let c = read_pem_certs(p).map_err(|e| format!("--boot-ca {e}"))?;
            if c.is_empty() {
                return Err(format!("--boot-ca \"{}\": no PEM certificate in the file", p.display()));
            }
            let mut probe = RootCertStore::empty();
            for (i, cert) in c.iter().enumerate() {
                probe.add(cert.clone()).map_err(|e| {
                    format!("--boot-ca \"{}\": certificate {} is not usable as a root: {e}", p.display(), i + 1)
                })?;
            }
            certs.extend(c);
        }
        Ok(Roots { system_certs, system, extra: certs })
    }

    /// The trust anchors: the system's (or the built-in ones) and the `--boot-ca` ones. A certificate of the
    /// system bundle that cannot be a trust anchor is skipped, as other TLS clients do.
    pub fn store(&self) -> RootCertStore {
        let mut store = if self.system_certs.is_empty() {
            RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
        } else {
            let mut s = RootCertStore::empty();
            let (_, skipped) = s.add_parsable_certificates(self.system_certs.iter().cloned());
            if skipped > 0 {
                tracing::debug!("boot cache: {skipped} certificates of the system bundle skipped");
            }
            s
        };
        // Checked in `load`.
        store.add_parsable_certificates(self.extra.iter().cloned());
        store
    }

    /// Where the system's roots come from, in words (`doctor`, logs).
    pub fn describe(&self) -> String {
        let base = match &self.system {
            Some(p) => format!("the system's roots ({})", p.display()),
            None => "the built-in Mozilla roots (no system CA bundle found)".to_owned(),
        };
        if self.extra.is_empty() { base } else { format!("{base} plus --boot-ca") }
    }
}

/// The certificates of a PEM file (other PEM items are skipped).
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("\"{}\": {e}", path.display()))?;
    CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("\"{}\": not valid PEM: {e}", path.display()))
}

/// A blocking HTTP client with `roots`: TLS 1.2/1.3, ALPN `h2` then `http/1.1`, no proxy, no redirects
/// followed, no compression asked for. `timeout` bounds the connection plus the response's head, and then
/// each read of the body on its own (reqwest's blocking client waits at most this long per call).
///
/// The client runs its connections on a thread of its own, started here: call this on the thread (and in
/// the network namespace) the requests should come from, outside an async runtime.
pub fn http_client(roots: &Roots, connect_timeout: Duration, timeout: Duration) -> Result<blocking::Client, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots.store())
        .with_no_client_auth();
    // reqwest takes a preconfigured TLS setup as it is: the protocols are offered here.
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    blocking::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .user_agent(USER_AGENT)
        .build()
        .map_err(|e| format!("cannot start the HTTP client: {}", describe(&e)))
}

/// A failure of the origin: no answer, a 5xx, a timeout, a TLS error, a refused redirect. The cache falls
/// back to the last good set on these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginError(pub String);

impl std::fmt::Display for OriginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fresh body from the origin.
pub struct Fresh {
    /// The URL that answered (after redirects).
    pub url: String,
    /// `Content-Length`, when announced.
    pub length: Option<u64>,
    /// The end of the body is framed (HTTP/1.1 chunked, or HTTP/2's `END_STREAM`), so a body without a
    /// length can be checked complete: a cut one ends in a read error, not a clean end.
    pub chunked: bool,
    /// The HTTP version spoken: `HTTP/1.1` or `HTTP/2`.
    pub version: &'static str,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub body: Box<dyn Read + Send>,
}

/// What the origin answered.
pub enum Answer {
    /// 304: the cached copy is current (with the validators the origin sent again, if any).
    NotModified { etag: Option<String>, last_modified: Option<String> },
    /// 200.
    Fresh(Fresh),
    /// Another non-5xx status (404, 403, ...): an answer, passed on to the guest, never a fallback.
    Status(u16),
}

/// The HTTP client for one boot URL.
pub struct Client {
    http: blocking::Client,
    limits: Limits,
}

impl Client {
    /// The client with `roots` and `limits`. Its connections run on a thread of its own started here (see
    /// [`http_client`]): call it where the requests should come from, outside an async runtime.
    pub fn new(roots: &Roots, limits: Limits) -> Result<Client, String> {
        let http = http_client(roots, limits.connect_timeout, limits.idle_timeout)?;
        Ok(Client { http, limits })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// GET `url`, conditional on `cached` (If-None-Match / If-Modified-Since), following allowed redirects.
    pub fn get(&self, url: &str, cached: Option<&Entry>) -> Result<Answer, OriginError> {
        let mut url = url.to_owned();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.http.get(&url);
            if let Some(e) = cached {
                if let Some(etag) = &e.etag {
                    req = req.header("If-None-Match", etag);
                }
                if let Some(lm) = &e.last_modified {
                    req = req.header("If-Modified-Since", lm);
                }
            }
            let resp = req.send().map_err(|e| OriginError(format!("{url}: {}", describe(&e))))?;
            let status = resp.status().as_u16();
            let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            match status {
                200 => {
                    let length = header("content-length").and_then(|l| l.trim().parse::<u64>().ok());
                    let http2 = resp.version() == reqwest::Version::HTTP_2;
                    let chunked = http2
                        || header("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
                    if let Some(l) = length
                        && l > self.limits.max_file_bytes
                    {
                        return Err(OriginError(format!(
                            "{url}: {l} bytes announced, over the per-file limit of {} bytes",
                            self.limits.max_file_bytes
                        )));
                    }
                    let etag = header("etag");
                    let last_modified = header("last-modified");
                    let version = if http2 { "HTTP/2" } else { "HTTP/1.1" };
                    tracing::debug!("boot cache: {url}: 200 over {version}");
                    let body = Body {
                        inner: resp,
                        read: 0,
                        limit: self.limits.max_file_bytes,
                        idle: self.limits.idle_timeout,
                    };
                    return Ok(Answer::Fresh(Fresh {
                        url,
                        length,
                        chunked,
                        version,
                        etag,
                        last_modified,
                        body: Box::new(body),
                    }));
                }
                304 if cached.is_some() => {
                    return Ok(Answer::NotModified { etag: header("etag"), last_modified: header("last-modified") });
                }
                301 | 302 | 303 | 307 | 308 => {
                    let location =
                        header("location").ok_or_else(|| OriginError(format!("{url}: {status} without a Location")))?;
                    let next = resolve_location(&url, &location)
                        .map_err(|e| OriginError(format!("{url}: redirect refused: {e}")))?;
                    let (from, _) = split_url(&url).map_err(|e| OriginError(e.0))?;
                    let (to, _) = split_url(&next).map_err(|e| OriginError(e.0))?;
                    if !redirect_allowed(&from, &to) {
                        return Err(OriginError(format!(
                            "{url}: redirect to {next} refused (another origin is followed only over https://)"
                        )));
                    }
                    url = next;
                }
                s if s >= 500 => return Err(OriginError(format!("{url}: HTTP {s}"))),
                s => return Ok(Answer::Status(s)),
            }
        }
        Err(OriginError(format!("{url}: more than {MAX_REDIRECTS} redirects")))
    }
}

/// A response body: counted against the per-file limit, its errors in words.
struct Body {
    inner: blocking::Response,
    read: u64,
    limit: u64,
    idle: Duration,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // One byte more than the limit may be read: that byte is the proof the body is over it.
        let room = usize::try_from(self.limit.saturating_sub(self.read).saturating_add(1)).unwrap_or(usize::MAX);
        let want = buf.len().min(room);
        let n = self.inner.read(&mut buf[..want]).map_err(|e| describe_io(&e, self.idle))?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(std::io::Error::other(format!("over the per-file limit of {} bytes", self.limit)));
        }
        Ok(n)
    }
}

/// A body's read error in words: a stall, a cut connection, a reset stream, the per-file limit.
fn describe_io(e: &std::io::Error, idle: Duration) -> std::io::Error {
    let inner = e.get_ref().and_then(|r| r.downcast_ref::<reqwest::Error>());
    match inner {
        Some(r) if r.is_timeout() => std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no byte from the origin for {} s", idle.as_secs_f64()),
        ),
        Some(r) => std::io::Error::other(plainly(r).unwrap_or_else(|| causes(r))),
        None => std::io::Error::new(e.kind(), plainly(e).unwrap_or_else(|| chain(e))),
    }
}

/// A reqwest error in words: timeouts, names that do not resolve, refused connections, cut connections and
/// TLS errors said plainly, anything else with its causes.
pub fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return if e.is_connect() { "no connection in time (timed out)" } else { "no answer in time (timed out)" }
            .into();
    }
    plainly(e).unwrap_or_else(|| causes(e))
}

/// The cause of `e` that users know by name, if any (an `io::Error` is looked into: its `source` skips the
/// error it wraps).
fn plainly(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return Some(format!("TLS: {tls}"));
        }
        if s.to_string() == "error resolving DNS" {
            return Some(format!("the host name does not resolve ({})", chain(s)));
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref()
                && let Some(found) = plainly(inner)
            {
                return Some(found);
            }
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return Some("connection refused".into()),
                std::io::ErrorKind::ConnectionReset => return Some("the connection was reset".into()),
                std::io::ErrorKind::UnexpectedEof => {
                    return Some("the origin closed the connection before the end".into());
                }
                _ => {}
            }
        }
        src = s.source();
    }
    None
}

/// The causes of a reqwest error without its first line, which repeats the URL the caller already names.
fn causes(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    match e.source() {
        Some(s) => chain(s),
        None => e.to_string(),
    }
}

/// An error and its causes, `a: b: c`, each said once (a layer that repeats its cause is skipped).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed P-256 CA (openssl, valid until 2126), standing in for a `--boot-ca` file.
    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBrjCCAVWgAwIBAgIUU/tCE/F4f8fTRia9R0TQRmqIRx4wCgYIKoZIzj0EAwIw
JDEiMCAGA1UEAwwZZWMtaXB4ZS1xZW11IHVuaXQgdGVzdCBDQTAgFw0yNjEyMDcw
OTU3MjlaGA8yMTI2MTExMzA5NTcyOVowJDEiMCAGA1UEAwwZZWMtaXB4ZS1xZW11
IHVuaXQgdGVzdCBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMceu/t4Ci1l
JScaR43ooB+YUcPemYJjeJozyksJgIwbloUQGtCmHA5v/TNID+tBnd9iSOqwbf/e
8T8dQKRDNTOjYzBhMB0GA1UdDgQWBBRVTbDVoiLr0Wxu9hgXHK8Rj/N1ODAfBgNV
HSMEGDAWgBRVTbDVoiLr0Wxu9hgXHK8Rj/N1ODAPBgNVHRMBAf8EBTADAQH/MA4G
A1UdDwEB/wQEAwIBBjAKBggqhkjOPQQDAgNHADBEAiBtJTPSTjzDj6TUkgZ0YTky
WNHpNpi8UxnzUP+pmOis/wIgMcdvYks9ebw7wA1wLif0HKMrAaE2/fBSpWLGvTSl
TT8=
-----END CERTIFICATE-----
";

    #[test]
    fn built_in_roots_plus_boot_ca_when_no_system_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, format!("# a comment\n{CA}")).unwrap();
        let loaded = Roots::load(std::slice::from_ref(&ca)).unwrap();
        assert_eq!(loaded.extra.len(), 1);
        // Whatever the machine has, the --boot-ca is added to it.
        let system = if loaded.system_certs.is_empty() {
            webpki_roots::TLS_SERVER_ROOTS.len()
        } else {
            let mut s = RootCertStore::empty();
            s.add_parsable_certificates(loaded.system_certs.iter().cloned());
            s.roots.len()
        };
        assert_eq!(loaded.store().roots.len(), system + 1);
        // No system bundle: the built-in roots, plus the --boot-ca (not the --boot-ca alone).
        let none = Roots { system_certs: Vec::new(), system: None, extra: loaded.extra.clone() };
        assert_eq!(none.store().roots.len(), webpki_roots::TLS_SERVER_ROOTS.len() + 1);
        assert!(
            none.describe().starts_with("the built-in Mozilla roots") && none.describe().ends_with("plus --boot-ca")
        );
    }

    #[test]
    fn a_bad_boot_ca_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = Roots::load(std::slice::from_ref(&junk)).unwrap_err();
        assert_eq!(e, format!("--boot-ca \"{}\": no PEM certificate in the file", junk.display()));
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n").unwrap();
        let e = Roots::load(std::slice::from_ref(&broken)).unwrap_err();
        assert!(e.starts_with(&format!("--boot-ca \"{}\": not valid PEM", broken.display())), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = Roots::load(std::slice::from_ref(&missing)).unwrap_err();
        assert!(e.starts_with(&format!("--boot-ca \"{}\": ", missing.display())), "{e}");
    }

    /// A one-connection HTTP/1.1 server on loopback answering `head` then `body`, then closing (or, with
    /// `stall`, keeping the connection open and silent for that long).
    fn serve_once(head: &'static str, body: &'static [u8], stall: Duration) -> String {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req);
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(body).unwrap();
            std::thread::sleep(stall);
        });
        format!("http://127.0.0.1:{port}/f")
    }

    fn client(idle: Duration) -> Client {
        let roots = Roots { system_certs: Vec::new(), system: None, extra: Vec::new() };
        Client::new(&roots, Limits { connect_timeout: idle, idle_timeout: idle, max_file_bytes: 1 << 20 }).unwrap()
    }

    fn fresh(a: Answer) -> Fresh {
        match a {
            Answer::Fresh(f) => f,
            _ => panic!("not a 200"),
        }
    }

    #[test]
    fn framing_tells_a_complete_body_from_a_cut_one() {
        let c = client(Duration::from_secs(10));
        let ok = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        // Chunked, with its last chunk: framed, read to a clean end.
        let mut f = fresh(c.get(&serve_once(ok, b"5\r\nhello\r\n0\r\n\r\n", Duration::ZERO), None).unwrap());
        assert!(f.chunked && f.length.is_none() && f.version == "HTTP/1.1");
        let mut got = Vec::new();
        f.body.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello");
        // Chunked, cut before the last chunk: a read error, never a clean end.
        let mut f = fresh(c.get(&serve_once(ok, b"5\r\nhello\r\n", Duration::ZERO), None).unwrap());
        assert!(f.chunked);
        let e = f.body.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("closed the connection before the end"), "{e}");
        // Delimited by the close: not framed (passed on, never admitted).
        let close = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
        let mut f = fresh(c.get(&serve_once(close, b"hello", Duration::ZERO), None).unwrap());
        assert!(!f.chunked && f.length.is_none());
        f.body.read_to_end(&mut Vec::new()).unwrap();
        // A length over the per-file limit is refused before the body.
        let big = "HTTP/1.1 200 OK\r\nContent-Length: 2097152\r\n\r\n";
        let e = c.get(&serve_once(big, b"", Duration::ZERO), None).err().unwrap();
        assert!(e.0.ends_with("2097152 bytes announced, over the per-file limit of 1048576 bytes"), "{e}");
    }

    #[test]
    fn a_stalled_body_is_cut_at_the_idle_timeout() {
        let c = client(Duration::from_secs(1));
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        let mut f = fresh(c.get(&serve_once(head, b"hello", Duration::from_secs(30)), None).unwrap());
        let mut buf = [0u8; 10];
        assert_eq!(f.body.read(&mut buf).unwrap(), 5);
        let e = f.body.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(e.to_string(), "no byte from the origin for 1 s");
    }

    #[test]
    fn a_refused_connection_is_said_plainly() {
        let roots = Roots { system_certs: Vec::new(), system: None, extra: Vec::new() };
        let client = http_client(&roots, Duration::from_secs(5), Duration::from_secs(5)).unwrap();
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = client.get(format!("http://127.0.0.1:{port}/x")).send().unwrap_err();
        assert_eq!(describe(&e), "connection refused");
    }
}
