//! The origin client: ureq 3 (blocking, HTTP/1.1) over rustls with TLS 1.2/1.3, trusting the system's roots
//! plus the `--boot-ca` PEM files. Redirects are followed here, not by ureq, so the rule of
//! [`redirect_allowed`] holds on every hop. Every read waits at most the idle timeout (a stalled origin is cut
//! off) and a body is cut at the per-file limit (an endless body is cut off). No proxy from the environment
//! is used, as in `doctor`.
//!
//! HTTP/2 is not spoken: ureq is HTTP/1.1 only, and one large file per request over one connection gains
//! nothing from multiplexing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

use super::store::Entry;
use super::target::{redirect_allowed, resolve_location, split_url};

/// Where the system's CA bundle is looked for (`SSL_CERT_FILE` first): Debian/Ubuntu/NixOS/Arch, Fedora/RHEL,
/// Alpine/macOS-style.
pub const SYSTEM_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];
/// Redirect hops followed at most.
pub const MAX_REDIRECTS: usize = 5;

/// Limits of the origin client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub connect_timeout: Duration,
    /// No byte from the origin for this long (headers or body) cuts the request off.
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

/// The roots: the system bundle (when found) plus every `--boot-ca` file. With no bundle found and no
/// `--boot-ca`, Mozilla's roots built into the binary.
#[derive(Clone, Debug)]
pub struct Roots {
    pub certs: Vec<Certificate<'static>>,
    /// The system bundle used, if any.
    pub system: Option<PathBuf>,
}

impl Roots {
    pub fn load(extra: &[PathBuf]) -> Result<Roots, String> {
        let mut certs = Vec::new();
        let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
        let system = env.into_iter().chain(SYSTEM_BUNDLES.iter().map(PathBuf::from)).find(|p| p.is_file());
        if let Some(p) = &system {
            match read_pem_certs(p) {
                Ok(c) => certs.extend(c),
                Err(e) => tracing::warn!("boot cache: system CA bundle {e}; not used"),
            }
        }
        for p in extra {
            let c = read_pem_certs(p).map_err(|e| format!("--boot-ca {e}"))?;
            if c.is_empty() {
                return Err(format!("--boot-ca \"{}\": no PEM certificate in the file", p.display()));
            }
            certs.extend(c);
        }
        Ok(Roots { certs, system })
    }

    fn root_certs(&self) -> RootCerts {
        if self.certs.is_empty() { RootCerts::WebPki } else { RootCerts::new_with_certs(&self.certs) }
    }
}

/// The certificates of a PEM file (other PEM items are skipped).
pub fn read_pem_certs(path: &Path) -> Result<Vec<Certificate<'static>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("\"{}\": {e}", path.display()))?;
    let mut out = Vec::new();
    for item in ureq::tls::parse_pem(&data) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => out.push(c),
            Ok(_) => {}
            Err(e) => return Err(format!("\"{}\": not valid PEM: {e}", path.display())),
        }
    }
    Ok(out)
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
    /// The body is chunked (its end is marked, so it can be checked complete without a length).
    pub chunked: bool,
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
    agent: ureq::Agent,
    limits: Limits,
}

impl Client {
    pub fn new(roots: &Roots, limits: Limits) -> Client {
        let tls = TlsConfig::builder().provider(TlsProvider::Rustls).root_certs(roots.root_certs()).build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .timeout_connect(Some(limits.connect_timeout))
            .timeout_resolve(Some(limits.connect_timeout))
            .timeout_per_read(Some(limits.idle_timeout))
            .timeout_per_write(Some(limits.idle_timeout))
            .timeout_recv_response(Some(limits.idle_timeout))
            .user_agent(concat!("ec-ipxe-qemu/", env!("CARGO_PKG_VERSION"), " (boot cache)"))
            .build()
            .new_agent();
        Client { agent, limits }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// GET `url`, conditional on `cached` (If-None-Match / If-Modified-Since), following allowed redirects.
    pub fn get(&self, url: &str, cached: Option<&Entry>) -> Result<Answer, OriginError> {
        let mut url = url.to_owned();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.agent.get(&url);
            if let Some(e) = cached {
                if let Some(etag) = &e.etag {
                    req = req.header("If-None-Match", etag);
                }
                if let Some(lm) = &e.last_modified {
                    req = req.header("If-Modified-Since", lm);
                }
            }
            let resp = req.call().map_err(|e| OriginError(format!("{url}: {}", describe(&e))))?;
            let status = resp.status().as_u16();
            let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            match status {
                200 => {
                    let length = header("content-length").and_then(|l| l.trim().parse::<u64>().ok());
                    let chunked =
                        header("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
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
                    let body = resp.into_body().into_with_config().limit(self.limits.max_file_bytes).reader();
                    return Ok(Answer::Fresh(Fresh {
                        url,
                        length,
                        chunked,
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

/// A ureq error in words.
pub fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(t) => format!("no answer in time ({t})"),
        ureq::Error::HostNotFound => "the host name does not resolve".into(),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        ureq::Error::Io(io) => format!("I/O error: {io}"),
        other => other.to_string(),
    }
}
