//! Pure URL work for the boot cache: the boot URL's origin and directory, the confinement of a guest's request
//! to that directory, the origin URL of a cached path, the loopback URL the generated script chains to, and
//! the redirect rule.

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// Bytes escaped in one path segment of an origin URL (RFC 3986 `pchar` keeps the rest).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Why a URL or a request is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn refused(s: impl Into<String>) -> Refused {
    Refused(s.into())
}

/// `scheme://authority` of a URL, lower-cased scheme and host, the default port made explicit, so that two
/// spellings of one origin compare equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Origin {
    pub fn is_https(&self) -> bool {
        self.scheme == "https"
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// Split an absolute `http(s)://` URL into its origin and the rest (path, query), refusing user info and
/// fragments' effect (a fragment is dropped).
pub fn split_url(url: &str) -> Result<(Origin, String), Refused> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| refused(format!("{url}: not an absolute URL")))?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err(refused(format!("{url}: the boot cache fetches http:// and https:// URLs only"))),
    };
    let rest = rest.split('#').next().unwrap_or_default();
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(refused(format!("{url}: user names or passwords in the URL are not supported")));
    }
    if authority.is_empty() || authority.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(refused(format!("{url}: no valid host")));
    }
    // [v6]:port, host:port, host
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6.split_once(']').ok_or_else(|| refused(format!("{url}: unclosed IPv6 literal")))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => parse_port(url, p)?,
            None if tail.is_empty() => default_port,
            None => return Err(refused(format!("{url}: bad port"))),
        };
        (format!("[{}]", h.to_ascii_lowercase()), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_ascii_lowercase(), parse_port(url, p)?),
            None => (authority.to_ascii_lowercase(), default_port),
        }
    };
    if host.is_empty() {
        return Err(refused(format!("{url}: no valid host")));
    }
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
    Ok((Origin { scheme, host, port }, path))
}

fn parse_port(url: &str, p: &str) -> Result<u16, Refused> {
    p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| refused(format!("{url}: bad port \"{p}\"")))
}

/// The boot URL as the cache sees it: the origin, the directory every cached path is confined to, and the
/// script's name in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootUrl {
    pub url: String,
    pub origin: Origin,
    /// The directory's path on the origin, starting and ending with `/` (still percent-encoded).
    pub dir: String,
    /// The last path segment, decoded: the name the chained script is asked for (the cache key of the script).
    pub script: String,
    /// The boot URL's query (without `?`), sent with the script request only.
    pub query: Option<String>,
}

impl BootUrl {
    pub fn parse(url: &str) -> Result<Self, Refused> {
        let (origin, path_query) = split_url(url)?;
        if url.contains("${") {
            return Err(refused(format!("{url}: contains iPXE settings (${{...}}) the host cannot expand")));
        }
        let (path, query) = match path_query.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (path_query, None),
        };
        let (dir, last) = path.rsplit_once('/').unwrap_or(("", &path));
        let script: String = percent_decode_str(last).decode_utf8_lossy().into_owned();
        if script.is_empty() || script == "." || script == ".." || script.contains(['/', '\0']) {
            return Err(refused(format!("{url}: the URL must name a file (its last path segment is the script)")));
        }
        let dir_segments: Vec<&str> = dir.split('/').collect();
        if dir_segments.iter().any(|s| {
            let d = percent_decode_str(s).decode_utf8_lossy();
            d == "." || d == ".."
        }) {
            return Err(refused(format!("{url}: \".\" or \"..\" in the path")));
        }
        Ok(BootUrl { url: url.to_owned(), origin, dir: format!("{dir}/"), script, query })
    }

    /// The origin URL of a confined path (the boot URL's own query goes with the script only).
    pub fn origin_url(&self, rel: &RelPath) -> String {
        let mut u = format!("{}://{}", self.origin.scheme, self.origin.host);
        let default = if self.origin.is_https() { 443 } else { 80 };
        if self.origin.port != default {
            u.push_str(&format!(":{}", self.origin.port));
        }
        u.push_str(&self.dir);
        let encoded: Vec<String> = rel.segments().map(|s| utf8_percent_encode(s, SEGMENT).to_string()).collect();
        u.push_str(&encoded.join("/"));
        match (&rel.query, &self.query) {
            (Some(q), _) => u.push_str(&format!("?{q}")),
            (None, Some(q)) if rel.path == self.script => u.push_str(&format!("?{q}")),
            _ => {}
        }
        u
    }

    /// What the generated iPXE script chains to: the launcher's loopback server at the script's name.
    pub fn chain_url(&self, host: &str, port: u16) -> String {
        format!("http://{host}:{port}/{}", utf8_percent_encode(&self.script, SEGMENT))
    }
}

/// A guest's request confined to the boot URL's directory: decoded `/`-separated segments, none empty, `.`
/// or `..`; plus a query made of plain URL characters. Its `key()` names it in the cache.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RelPath {
    pub path: String,
    pub query: Option<String>,
}

impl RelPath {
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path.split('/')
    }

    /// The cache key: the path, and the query when there is one.
    pub fn key(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// Confine an HTTP request target (`/a/b?q`, origin-form) to the served directory. Absolute-form targets
/// (`http://elsewhere/x`), `..` (also percent-encoded), NUL, backslashes and control characters are refused;
/// `.` and empty segments are dropped, so `//host/x` stays the path `host/x` under the directory.
pub fn confine(target: &str) -> Result<RelPath, Refused> {
    if !target.starts_with('/') {
        return Err(refused("the request target is not a path (absolute URLs are refused)"));
    }
    let target = target.split('#').next().unwrap_or_default();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let decoded =
        percent_decode_str(path).decode_utf8().map_err(|_| refused("the path is not UTF-8 after percent-decoding"))?;
    if decoded.chars().any(|c| c.is_control() || c == '\\') {
        return Err(refused("control character or backslash in the path"));
    }
    let mut segments = Vec::new();
    for s in decoded.split('/') {
        match s {
            "" | "." => {}
            ".." => return Err(refused("path traversal (\"..\") refused")),
            s => segments.push(s),
        }
    }
    if segments.is_empty() {
        return Err(refused("no file named (no directory listings)"));
    }
    let query = match query {
        None | Some("") => None,
        Some(q) if q.bytes().all(is_query_byte) => Some(q.to_owned()),
        Some(_) => return Err(refused("the query has characters that are not allowed in a URL")),
    };
    Ok(RelPath { path: segments.join("/"), query })
}

/// RFC 3986 query characters (unreserved, sub-delims, `:@/?` and `%` escapes).
fn is_query_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// Whether a redirect from `from` to the absolute URL `to` may be followed: to the same origin, or to
/// another origin only over HTTPS (a redirect never downgrades HTTPS to HTTP, even on the same host).
pub fn redirect_allowed(from: &Origin, to: &Origin) -> bool {
    if from.is_https() && !to.is_https() {
        return false;
    }
    from == to || to.is_https()
}

/// Resolve a `Location` header against the URL it came from (absolute, scheme-relative, absolute path or
/// relative path).
pub fn resolve_location(base: &str, location: &str) -> Result<String, Refused> {
    let location = location.trim();
    if location.contains("://") {
        split_url(location)?;
        return Ok(location.to_owned());
    }
    let (origin, path) = split_url(base)?;
    let root = format!("{}://{}:{}", origin.scheme, origin.host, origin.port);
    if let Some(rest) = location.strip_prefix("//") {
        return Ok(format!("{}://{rest}", origin.scheme));
    }
    if location.starts_with('/') {
        return Ok(format!("{root}{location}"));
    }
    let path = path.split('?').next().unwrap_or("/");
    let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    Ok(format!("{root}{dir}/{location}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_url_parts() {
        let b = BootUrl::parse("https://Boot.Example/nixos/x86_64/netboot.ipxe").unwrap();
        assert_eq!(b.origin, Origin { scheme: "https".into(), host: "boot.example".into(), port: 443 });
        assert_eq!(b.dir, "/nixos/x86_64/");
        assert_eq!(b.script, "netboot.ipxe");
        assert_eq!(b.chain_url("10.0.2.2", 8080), "http://10.0.2.2:8080/netboot.ipxe");
        let rel = confine("/bzImage").unwrap();
        assert_eq!(b.origin_url(&rel), "https://boot.example/nixos/x86_64/bzImage");
        let b = BootUrl::parse("http://10.1.2.3:8000/boot%20me.ipxe?mac=1").unwrap();
        assert_eq!(b.script, "boot me.ipxe");
        assert_eq!(b.dir, "/");
        assert_eq!(b.chain_url("10.0.2.2", 1), "http://10.0.2.2:1/boot%20me.ipxe");
        assert_eq!(b.origin_url(&confine("/boot%20me.ipxe").unwrap()), "http://10.1.2.3:8000/boot%20me.ipxe?mac=1");
        assert_eq!(b.origin_url(&confine("/initrd").unwrap()), "http://10.1.2.3:8000/initrd");
        for bad in [
            "ftp://x/y",
            "https://x/",
            "https://u:p@x/a.ipxe",
            "https:///a",
            "https://x:0/a",
            "https://x:99999/a",
            "https://x/../a.ipxe",
            "https://x/%2e%2e/a.ipxe",
            "https://x/${mac}.ipxe",
            "netboot.ipxe",
        ] {
            assert!(BootUrl::parse(bad).is_err(), "{bad}");
        }
        let v6 = BootUrl::parse("https://[2001:DB8::1]:8443/a/b.ipxe").unwrap();
        assert_eq!(v6.origin.host, "[2001:db8::1]");
        assert_eq!(v6.origin_url(&confine("/c").unwrap()), "https://[2001:db8::1]:8443/a/c");
    }

    #[test]
    fn confinement() {
        assert_eq!(confine("/a/b").unwrap(), RelPath { path: "a/b".into(), query: None });
        assert_eq!(confine("//evil.example/x").unwrap().path, "evil.example/x");
        assert_eq!(confine("/./a//b/").unwrap().path, "a/b");
        assert_eq!(confine("/a%20b").unwrap().path, "a b");
        // %2F decodes to a separator, still inside the directory.
        assert_eq!(confine("/a%2Fb").unwrap().path, "a/b");
        assert_eq!(confine("/x?mac=52:54:00&y=%41").unwrap().key(), "x?mac=52:54:00&y=%41");
        assert_eq!(confine("/x?").unwrap().query, None);
        for bad in [
            "http://evil.example/x",
            "evil/x",
            "*",
            "/../etc/passwd",
            "/a/../../b",
            "/%2e%2e/x",
            "/a/%2E%2E",
            "/a%00b",
            "/a%5cb",
            "/a\\b",
            "/%ff",
            "/",
            "//",
            "/x?a b",
            "/x?<script>",
        ] {
            assert!(confine(bad).is_err(), "{bad} was accepted");
        }
        // The origin URL re-encodes what was decoded, so the request cannot leave the directory on the origin.
        let b = BootUrl::parse("https://o.example/d/s.ipxe").unwrap();
        assert_eq!(b.origin_url(&confine("/a%3Fb%23c").unwrap()), "https://o.example/d/a%3Fb%23c");
        assert_eq!(b.origin_url(&confine("/%252e%252e/x").unwrap()), "https://o.example/d/%252e%252e/x");
    }

    #[test]
    fn redirects() {
        let o = |u: &str| split_url(u).unwrap().0;
        let http = o("http://a.example/x");
        let https = o("https://a.example/x");
        assert!(redirect_allowed(&http, &o("http://a.example:80/y")));
        assert!(redirect_allowed(&http, &o("https://cdn.example/y")));
        assert!(!redirect_allowed(&http, &o("http://cdn.example/y")));
        assert!(!redirect_allowed(&http, &o("http://a.example:8080/y")));
        assert!(redirect_allowed(&https, &o("https://cdn.example/y")));
        assert!(!redirect_allowed(&https, &o("http://a.example/y")));
        assert_eq!(resolve_location("https://a.example/d/x", "y").unwrap(), "https://a.example:443/d/y");
        assert_eq!(resolve_location("https://a.example/d/x", "/z").unwrap(), "https://a.example:443/z");
        assert_eq!(resolve_location("https://a.example/d/x", "//b.example/z").unwrap(), "https://b.example/z");
        assert_eq!(resolve_location("http://a/x", "https://b/y").unwrap(), "https://b/y");
        assert!(resolve_location("http://a/x", "file:///etc/passwd").is_err());
    }
}
