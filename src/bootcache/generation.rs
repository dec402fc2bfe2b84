//! Pure choices between the sets: which cached copy a request revalidates, what the fallback may serve
//! (never a mix of two generations), and which absolute URLs a chained script names (those bypass the
//! cache).

use std::collections::BTreeMap;

use super::store::{Entry, Manifest};

/// The files one boot has been given so far and how.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// Path key → what this boot got for it.
    pub served: BTreeMap<String, Entry>,
    /// The origin failed during this boot: everything now comes from the last good set (the reason kept).
    pub fallback: Option<String>,
    /// The boot got a file from the origin that the last good set does not have (new or changed).
    pub new_from_origin: bool,
    /// In fallback: the guest may be given any file of the good set (nothing newer reached it, or it started
    /// over with the good set's script).
    pub consistent: bool,
    /// Fresh bodies from the origin being streamed to the guest: the guest may hold a newer file before it
    /// is recorded (the last byte goes out before the fsync), so a fallback meanwhile counts as after newer
    /// files.
    pub fresh_in_flight: u32,
}

/// The good set, when it belongs to this boot URL.
pub fn usable_good<'a>(good: Option<&'a Manifest>, boot_url: &str) -> Option<&'a Manifest> {
    good.filter(|g| g.boot_url == boot_url && !g.files.is_empty())
}

/// The cached copy to revalidate for `key`: what this boot already got, else the set being fetched (a copy
/// fetched by an earlier boot that did not reach ready), else the last good set. `present` says whether an
/// entry's object is on disk with its length.
pub fn candidate(
    key: &str,
    session: &Session,
    fetching: Option<&Manifest>,
    good: Option<&Manifest>,
    boot_url: &str,
    present: impl Fn(&Entry) -> bool,
) -> Option<Entry> {
    let fetching = fetching.filter(|f| f.boot_url == boot_url);
    [
        session.served.get(key),
        fetching.and_then(|f| f.files.get(key)),
        usable_good(good, boot_url).and_then(|g| g.files.get(key)),
    ]
    .into_iter()
    .flatten()
    .find(|e| present(e))
    .cloned()
}

/// What a request gets when the origin failed (or failed earlier in this boot): the good set's copy, or why
/// not. Switches the session to fallback. The good set is served only as a whole: after this boot got a
/// file from the origin that is not in the good set, only the script itself is served (the guest's retry
/// starts over with it), then the rest.
pub fn fallback(
    key: &str,
    script: &str,
    session: &mut Session,
    good: Option<&Manifest>,
    boot_url: &str,
    origin_error: &str,
) -> Result<Entry, String> {
    let Some(good) = usable_good(good, boot_url) else {
        return Err(format!("origin failed ({origin_error}) and there is no last good set to boot from"));
    };
    if session.fallback.is_none() {
        session.fallback = Some(origin_error.to_owned());
        session.consistent = session.untouched();
    }
    let Some(e) = good.files.get(key) else {
        return Err(format!("origin failed ({origin_error}) and the last good set has no \"{key}\""));
    };
    if key == script {
        session.consistent = true;
    }
    if !session.consistent {
        return Err(format!(
            "origin failed ({origin_error}) after this boot got newer files; the last good set is served from its \
             script on (the guest's retry)"
        ));
    }
    Ok(e.clone())
}

impl Session {
    /// Nothing newer than the good set reached the guest (or may be reaching it).
    pub fn untouched(&self) -> bool {
        !self.new_from_origin && self.fresh_in_flight == 0
    }

    /// A fresh body ended: `Some(sha256)` when the guest got all of it (admitted or not), which makes the
    /// boot newer than the good set unless the good set has the same file.
    pub fn fresh_in_flight_ended(&mut self, key: &str, sha256: Option<&str>, good: Option<&Manifest>, boot_url: &str) {
        self.fresh_in_flight = self.fresh_in_flight.saturating_sub(1);
        if let Some(sha) = sha256 {
            let same = usable_good(good, boot_url).and_then(|g| g.files.get(key)).is_some_and(|g| g.sha256 == sha);
            if !same {
                self.new_from_origin = true;
            }
        }
    }
}

/// Record what a request got; `from_origin` marks copies the origin just sent or confirmed.
pub fn record(session: &mut Session, key: &str, e: &Entry, good: Option<&Manifest>, boot_url: &str, from_origin: bool) {
    if from_origin {
        let same = usable_good(good, boot_url).and_then(|g| g.files.get(key)).is_some_and(|g| g.sha256 == e.sha256);
        if !same {
            session.new_from_origin = true;
        }
    }
    session.served.insert(key.to_owned(), e.clone());
}

/// The set a boot that reached ready makes good: what it was given, unless it booted from the good set
/// (which then stays as it is: `None`).
pub fn next_good(session: &Session, boot_url: &str, stage: &str, now: u64) -> Option<Manifest> {
    if session.fallback.is_some() || session.served.is_empty() {
        return None;
    }
    Some(Manifest {
        boot_url: boot_url.to_owned(),
        marked: Some((stage.to_owned(), now)),
        files: session.served.clone(),
    })
}

/// Absolute URLs a script names (`http://`, `https://`, `tftp://`, `ftp://`): iPXE fetches those itself,
/// past the cache.
pub fn absolute_urls(script: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in script.lines() {
        let line = line.trim_start();
        if line.starts_with('#') {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("://") {
            let scheme_start = rest[..i].rfind(|c: char| !c.is_ascii_alphanumeric()).map(|p| p + 1).unwrap_or(0);
            let scheme = rest[scheme_start..i].to_ascii_lowercase();
            let url: String =
                rest[scheme_start..].chars().take_while(|c| !c.is_whitespace() && *c != '"' && *c != '\'').collect();
            if ["http", "https", "tftp", "ftp"].contains(&scheme.as_str()) && !out.contains(&url) {
                out.push(url);
            }
            rest = &rest[i + 3..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://o/d/boot.ipxe";

    fn e(sha: char) -> Entry {
        Entry {
            sha256: sha.to_string().repeat(64),
            length: 1,
            etag: Some(format!("\"{sha}\"")),
            last_modified: None,
            url: "u".into(),
        }
    }

    fn set(files: &[(&str, char)]) -> Manifest {
        let mut m = Manifest::new(URL);
        for (k, s) in files {
            m.files.insert((*k).into(), e(*s));
        }
        m
    }

    #[test]
    fn candidate_order_and_presence() {
        let good = set(&[("boot.ipxe", 'a'), ("k", 'b')]);
        let fetching = set(&[("k", 'c')]);
        let mut s = Session::default();
        let all = |_: &Entry| true;
        assert_eq!(candidate("k", &s, Some(&fetching), Some(&good), URL, all).unwrap(), e('c'));
        assert_eq!(candidate("boot.ipxe", &s, Some(&fetching), Some(&good), URL, all).unwrap(), e('a'));
        // A missing object is skipped for the next copy.
        let no_c = |x: &Entry| !x.sha256.starts_with('c');
        assert_eq!(candidate("k", &s, Some(&fetching), Some(&good), URL, no_c).unwrap(), e('b'));
        s.served.insert("k".into(), e('d'));
        assert_eq!(candidate("k", &s, Some(&fetching), Some(&good), URL, all).unwrap(), e('d'));
        // Sets of another boot URL are not used.
        assert_eq!(candidate("boot.ipxe", &s, Some(&fetching), Some(&good), "https://other/x", all), None);
        assert_eq!(candidate("nope", &s, None, None, URL, all), None);
    }

    #[test]
    fn fallback_serves_one_generation() {
        let good = set(&[("boot.ipxe", 'a'), ("k", 'b')]);
        // Nothing new from the origin yet: the good set is served at once.
        let mut s = Session::default();
        record(&mut s, "boot.ipxe", &e('a'), Some(&good), URL, true);
        assert!(!s.new_from_origin);
        assert_eq!(fallback("k", "boot.ipxe", &mut s, Some(&good), URL, "HTTP 503").unwrap(), e('b'));
        assert_eq!(s.fallback.as_deref(), Some("HTTP 503"));
        assert!(fallback("x", "boot.ipxe", &mut s, Some(&good), URL, "HTTP 503").unwrap_err().contains("has no \"x\""));
        assert!(next_good(&s, URL, "ready", 1).is_none(), "a boot from the good set keeps it");

        // A new script came from the origin, then the kernel failed: not served with the new script; the
        // guest's retry gets the old script, then the old kernel.
        let mut s = Session::default();
        record(&mut s, "boot.ipxe", &e('n'), Some(&good), URL, true);
        assert!(s.new_from_origin);
        assert!(fallback("k", "boot.ipxe", &mut s, Some(&good), URL, "cut").unwrap_err().contains("newer files"));
        assert_eq!(fallback("boot.ipxe", "boot.ipxe", &mut s, Some(&good), URL, "cut").unwrap(), e('a'));
        assert_eq!(fallback("k", "boot.ipxe", &mut s, Some(&good), URL, "cut").unwrap(), e('b'));
        assert_eq!(s.fallback.as_deref(), Some("cut"), "the first error is kept");

        // A fresh body is still on its way to the guest (its last byte may be there before it is recorded):
        // a fallback meanwhile counts as after newer files; a body that ended as the good set's stays
        // consistent, one that was cut too.
        let mut s = Session { fresh_in_flight: 1, ..Session::default() };
        assert!(fallback("k", "boot.ipxe", &mut s, Some(&good), URL, "refused").unwrap_err().contains("newer files"));
        let mut s = Session { fresh_in_flight: 2, ..Session::default() };
        s.fresh_in_flight_ended("k", Some(&"b".repeat(64)), Some(&good), URL);
        s.fresh_in_flight_ended("boot.ipxe", None, Some(&good), URL);
        assert!(s.untouched());
        s.fresh_in_flight += 1;
        s.fresh_in_flight_ended("k", Some(&"n".repeat(64)), Some(&good), URL);
        assert!(!s.untouched() && s.new_from_origin && s.fresh_in_flight == 0);

        // No good set (or another URL's): the guest's retry loop goes on.
        let mut s = Session::default();
        assert!(fallback("k", "boot.ipxe", &mut s, None, URL, "refused").unwrap_err().contains("no last good set"));
        assert!(fallback("k", "boot.ipxe", &mut s, Some(&good), "https://other/x", "refused").is_err());
    }

    #[test]
    fn the_next_good_set_is_what_the_boot_got() {
        let good = set(&[("boot.ipxe", 'a'), ("old", 'b')]);
        let mut s = Session::default();
        record(&mut s, "boot.ipxe", &e('a'), Some(&good), URL, true);
        record(&mut s, "k", &e('c'), Some(&good), URL, true);
        let next = next_good(&s, URL, "ready", 7).unwrap();
        assert_eq!(next.files.keys().collect::<Vec<_>>(), ["boot.ipxe", "k"]);
        assert_eq!(next.marked, Some(("ready".into(), 7)));
        assert!(next_good(&Session::default(), URL, "ready", 7).is_none());
    }

    #[test]
    fn absolute_urls_in_a_script() {
        let s = "#!ipxe\n# see https://docs.example/\nkernel bzImage init=/x\ninitrd http://cdn.example/initrd || goto x\n\
                 chain \"https://a.example/b.ipxe\"\nimgfetch tftp://10.0.0.1/f\ninitrd http://cdn.example/initrd\n";
        assert_eq!(
            absolute_urls(s),
            ["http://cdn.example/initrd", "https://a.example/b.ipxe", "tftp://10.0.0.1/f"].map(String::from)
        );
        assert!(absolute_urls("kernel bzImage\ninitrd initrd\nboot\n").is_empty());
    }
}
