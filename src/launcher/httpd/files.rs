//! The files `--boot-dir` serves: a request target mapped to a path confined to the served directory, and
//! what that path may serve (a regular file opened without ever waiting, or a directory listing).

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::libc;

/// Why a request gets no file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: u16,
    pub reason: String,
}

pub(super) fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal { status, reason: reason.into() }
}

/// Map a request target to a file inside `root` (which must be canonical). Pure apart from reading the file
/// system's view of the path.
pub(crate) fn resolve(root: &Path, target: &str) -> std::result::Result<PathBuf, Refusal> {
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

/// What a resolved path serves.
pub(super) enum Served {
    File(File, u64),
    Listing(String),
}

/// Look at a resolved path before opening it: only a regular file is opened, and never in a way that waits
/// (`O_NONBLOCK`: a FIFO swapped in since opens at once and is then refused); a directory is listed.
pub(super) fn open_served(path: &Path, target: &str) -> std::result::Result<Served, Refusal> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| refuse(403, format!("cannot stat: {e}")))?;
    if meta.is_dir() {
        return list(path, target).map(Served::Listing);
    }
    if !meta.is_file() {
        return Err(refuse(
            403,
            format!("is {}, not a regular file; refused", crate::launcher::private::describe(&meta)),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| refuse(403, format!("cannot open: {e}")))?;
    let meta = file.metadata().map_err(|e| refuse(500, format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(refuse(403, "is not a regular file; refused"));
    }
    Ok(Served::File(file, meta.len()))
}

/// A directory listing: one link per entry, directories with a trailing `/`.
fn list(dir: &Path, target: &str) -> std::result::Result<String, Refusal> {
    let entries = std::fs::read_dir(dir).map_err(|e| refuse(403, format!("cannot list: {e}")))?;
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| {
            let mut n = e.file_name().to_string_lossy().into_owned();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                n.push('/');
            }
            n
        })
        .collect();
    names.sort();
    let base = target.split(['?', '#']).next().unwrap_or("/");
    let base = if base.ends_with('/') { base.to_owned() } else { format!("{base}/") };
    let mut html = format!("<!DOCTYPE html>\n<title>{}</title>\n<ul>\n", escape(&base));
    for n in names {
        let href: String = percent_encoding::utf8_percent_encode(&n, LINK).collect();
        html.push_str(&format!("<li><a href=\"{}{href}\">{}</a></li>\n", escape(&base), escape(&n)));
    }
    html.push_str("</ul>\n");
    Ok(html)
}

/// What a link percent-encodes (all but unreserved characters and `/`).
const LINK: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'/');

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
