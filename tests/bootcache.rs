//! The boot cache against a real HTTPS origin with a private CA, in a namespace of its own behind a 50 Mbit/s
//! veth (tests/common/origin.rs): cold, warm (304), changed, 503, down, cut mid-file, stalled, endless,
//! a first boot with no cache, the TLS trust rule and the redirect rule. The cache runs on the test's own
//! thread, moved into the client namespace. One more test fetches from nghttpd, an HTTP/2-only origin.

#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::origin::{OriginLab, random_bytes};
use common::{require_programs, require_root};
use ec_ipxe_qemu::bootcache::{BootCache, BootSource, Config, MAX_SET_FILES, origin::Limits};

const BIG: usize = 8 << 20;

fn enter(netns: &str) {
    let file = std::fs::File::open(netns).expect("open netns");
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// The test's side of the lab: its thread moved into the client namespace, a runtime, an empty state
/// directory.
fn client_side(lab: &OriginLab) -> (tokio::runtime::Runtime, tempfile::TempDir) {
    enter(&lab.client.path());
    (runtime(), tempfile::tempdir().unwrap())
}

/// The cache of `boot_url` with the tests' short limits.
fn open(boot_url: String, state: &Path, extra_ca: Vec<std::path::PathBuf>) -> BootCache {
    open_with(boot_url, state, extra_ca, MAX_SET_FILES)
}

/// [`open`] with a set of at most `max_set_files` files.
fn open_with(boot_url: String, state: &Path, extra_ca: Vec<std::path::PathBuf>, max_set_files: usize) -> BootCache {
    let limits = Limits {
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(3),
        max_file_bytes: 32 << 20,
    };
    let cfg = Config { boot_url, state_dir: state.to_owned(), extra_ca, limits, max_set_files };
    BootCache::open(&cfg).expect("open the cache")
}

/// The cache of the lab's `boot.ipxe`, trusting the lab's CA when `ca`.
fn cache(lab: &OriginLab, state: &Path, ca: bool) -> BootCache {
    open(lab.url("boot.ipxe"), state, if ca { vec![lab.ca()] } else { vec![] })
}

async fn fetch(c: BootCache, path: &str) -> (u16, std::io::Result<Vec<u8>>) {
    let r = c.get(path).await;
    (r.status, r.into_bytes().await)
}

fn get(rt: &tokio::runtime::Runtime, c: &BootCache, path: &str) -> (u16, std::io::Result<Vec<u8>>) {
    rt.block_on(fetch(c.clone(), path))
}

fn objects(state: &Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut v: Vec<_> = std::fs::read_dir(state.join("boot-cache/objects"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().mode() & 0o777)
        })
        .collect();
    v.sort();
    v
}

fn prepared(test: &str) -> bool {
    require_root(test);
    require_programs(test, &["python3", "openssl", "tc"])
}

#[test]
#[ignore = "needs root"]
fn cold_warm_changed_and_every_fallback() {
    if !prepared("cold_warm_changed_and_every_fallback") {
        return;
    }
    let mut lab = OriginLab::new(true);
    let script = b"#!ipxe\nimgfetch big\necho ready\n".to_vec();
    let big1 = random_bytes(BIG);
    lab.write("boot.ipxe", &script);
    lab.write("big", &big1);
    let (rt, state) = client_side(&lab);
    let c = cache(&lab, state.path(), true);
    assert!(c.good_set().is_none());

    // Cold: both from the origin, streamed and admitted.
    assert_eq!(get(&rt, &c, "/boot.ipxe").1.unwrap(), script);
    assert_eq!(get(&rt, &c, "/big").1.unwrap(), big1);
    let s = c.snapshot();
    assert_eq!(s.boot_source, BootSource::Origin);
    assert_eq!(s.boot_cache.fetched_bytes, (BIG + script.len()) as u64, "{s:?}");
    assert_eq!(s.boot_cache.served_bytes, (BIG + script.len()) as u64);
    assert_eq!((s.boot_cache.hits, s.boot_cache.revalidated), (0, 0));
    assert!(s.download.is_none() && s.not_cached.is_empty());
    assert!(c.mark_good("ready").unwrap());
    assert_eq!(c.good_set().unwrap().files, 2);

    // Warm, origin unchanged: two 304s, nothing fetched.
    lab.clear_log();
    c.begin_boot();
    assert_eq!(get(&rt, &c, "/boot.ipxe").1.unwrap(), script);
    assert_eq!(get(&rt, &c, "/big").1.unwrap(), big1);
    let s = c.snapshot();
    assert_eq!((s.boot_cache.hits, s.boot_cache.revalidated, s.boot_cache.fetched_bytes), (2, 2, 0), "{s:?}");
    assert_eq!(lab.requests().iter().map(|r| r.2).collect::<Vec<_>>(), [304, 304]);
    c.mark_good("ready").unwrap();

    // The origin changed: the new file, and after ready the old one is gone (bounded).
    let big2 = random_bytes(BIG);
    std::thread::sleep(Duration::from_millis(20));
    lab.write("big", &big2);
    c.begin_boot();
    assert_eq!(get(&rt, &c, "/boot.ipxe").1.unwrap(), script);
    assert_eq!(get(&rt, &c, "/big").1.unwrap(), big2);
    assert_eq!(c.snapshot().boot_cache.fetched_bytes, BIG as u64);
    assert_eq!(objects(state.path()).len(), 3, "during the boot: the good set plus the set being fetched");
    c.mark_good("ready").unwrap();
    let objs = objects(state.path());
    assert_eq!(objs.len(), 2, "after ready: the last good set only: {objs:?}");
    assert!(objs.iter().all(|(n, mode)| n.len() == 64 && *mode == 0o600), "{objs:?}");

    // 503: ready from the last good set.
    lab.set_mode("503");
    c.begin_boot();
    assert_eq!(get(&rt, &c, "/boot.ipxe").1.unwrap(), script);
    assert_eq!(get(&rt, &c, "/big").1.unwrap(), big2);
    let s = c.snapshot();
    assert_eq!(s.boot_source, BootSource::Cache);
    assert!(s.boot_cache.origin_error.as_deref().unwrap().contains("HTTP 503"), "{s:?}");
    assert_eq!(s.boot_cache.hits, 2);
    assert!(!c.mark_good("ready").unwrap(), "a boot from the good set keeps it");

    // Down: the same.
    lab.set_mode("ok");
    lab.stop();
    c.begin_boot();
    assert_eq!(get(&rt, &c, "/big").1.unwrap(), big2);
    let s = c.snapshot();
    assert_eq!(s.boot_source, BootSource::Cache);
    assert!(s.boot_cache.origin_error.as_deref().unwrap().contains("connection refused"), "{s:?}");

    // Cut mid-file, stalled, endless: the guest's download fails, the cached copy is unchanged, the retry is
    // served from the last good set.
    lab.start();
    let good_before = objects(state.path());
    for mode in ["cut", "stall", "endless"] {
        let big3 = random_bytes(BIG);
        std::thread::sleep(Duration::from_millis(20));
        lab.write("big", &big3);
        lab.set_mode(mode);
        c.begin_boot();
        assert_eq!(get(&rt, &c, "/boot.ipxe").1.unwrap(), script, "{mode}");
        let started = std::time::Instant::now();
        let (status, body) = get(&rt, &c, "/big");
        assert_eq!(status, 200, "{mode}");
        assert!(
            body.is_err(),
            "{mode}: the guest's copy is cut, not complete: {:?} {:?} {:?}",
            body.as_ref().map(|b| b.len()),
            c.snapshot(),
            lab.requests()
        );
        assert!(started.elapsed() < Duration::from_secs(60), "{mode}: cut off in time");
        assert_eq!(objects(state.path()), good_before, "{mode}: nothing admitted, nothing replaced");
        let (status, body) = get(&rt, &c, "/big");
        assert_eq!(status, 200, "{mode}");
        assert_eq!(body.unwrap(), big2, "{mode}: the retry gets the last good set");
        let s = c.snapshot();
        assert_eq!(s.boot_source, BootSource::Cache, "{mode}");
        let e = s.boot_cache.origin_error.as_deref().unwrap();
        let why = match mode {
            "cut" => "the origin closed the connection before the end",
            "stall" => "no byte from the origin for 3 s",
            _ => "over the per-file limit",
        };
        assert!(e.contains(why), "{mode}: {e}");
        // No temporary file is left behind.
        assert!(objects(state.path()).iter().all(|(n, _)| !n.starts_with(".tmp")), "{mode}");
    }
    lab.set_mode("ok");

    // Confinement.
    for bad in ["/../etc/passwd", "/%2e%2e/x", "http://evil.example/x"] {
        assert_eq!(get(&rt, &c, bad).0, 403, "{bad}");
    }
    // A 404 is passed on, not a fallback.
    c.begin_boot();
    assert_eq!(get(&rt, &c, "/nope").0, 404);

    // A redirect from HTTPS to plain HTTP is refused (and falls back).
    lab.set_mode("redirect-http");
    c.begin_boot();
    assert_eq!(get(&rt, &c, "/big").1.unwrap(), big2);
    let e = c.snapshot().boot_cache.origin_error.unwrap();
    assert!(e.contains("redirect to http://") && e.contains("refused"), "{e}");
    lab.set_mode("ok");

    // A restart (a new launcher) finds the good set; the leftover of a killed download goes.
    std::fs::write(state.path().join("boot-cache/objects/.tmp-killed"), b"x").unwrap();
    drop(c);
    let c = cache(&lab, state.path(), true);
    assert_eq!(c.good_set().unwrap().files, 2);
    assert_eq!(objects(state.path()), good_before);
}

#[test]
#[ignore = "needs root"]
fn first_boot_with_the_origin_down_and_no_cache() {
    if !prepared("first_boot_with_the_origin_down_and_no_cache") {
        return;
    }
    let mut lab = OriginLab::new(true);
    lab.write("boot.ipxe", b"#!ipxe\n");
    lab.stop();
    let (rt, state) = client_side(&lab);
    let c = cache(&lab, state.path(), true);
    for _ in 0..3 {
        let (status, body) = get(&rt, &c, "/boot.ipxe");
        assert_eq!(status, 503);
        let body = String::from_utf8(body.unwrap()).unwrap();
        assert!(body.contains("no last good set"), "{body}");
    }
    assert_eq!(c.snapshot().boot_source, BootSource::Origin);
    assert!(!c.mark_good("ready").unwrap());
    // The origin comes back: the next try works.
    lab.start();
    let (status, body) = get(&rt, &c, "/boot.ipxe");
    assert_eq!((status, body.unwrap()), (200, b"#!ipxe\n".to_vec()));
}

#[test]
#[ignore = "needs root"]
fn the_private_ca_is_needed_and_absolute_urls_are_reported() {
    if !prepared("the_private_ca_is_needed_and_absolute_urls_are_reported") {
        return;
    }
    let lab = OriginLab::new(true);
    lab.write("boot.ipxe", b"#!ipxe\nkernel http://cdn.example/k\ninitrd initrd\n");
    let (rt, state) = client_side(&lab);
    // Without --boot-ca the system roots do not know the private CA: refused, nothing cached.
    let c = cache(&lab, state.path(), false);
    let (status, _) = get(&rt, &c, "/boot.ipxe");
    assert_eq!(status, 503);
    let e = c.snapshot().boot_cache.origin_error.unwrap();
    assert!(e.contains("TLS: invalid peer certificate: UnknownIssuer"), "{e}");
    drop(c);
    let c = cache(&lab, state.path(), true);
    assert_eq!(get(&rt, &c, "/boot.ipxe").0, 200);
    assert_eq!(c.snapshot().not_cached, ["http://cdn.example/k"]);
    // A --boot-ca that is not PEM is refused when the cache is set up.
    let junk = state.path().join("junk.pem");
    std::fs::write(&junk, b"not a certificate").unwrap();
    let cfg = Config {
        boot_url: lab.url("boot.ipxe"),
        state_dir: state.path().to_owned(),
        extra_ca: vec![junk],
        limits: Limits::default(),
        max_set_files: MAX_SET_FILES,
    };
    let e = BootCache::open(&cfg).err().unwrap().to_string();
    assert!(e.starts_with("--boot-ca \""), "{e}");
}

/// Large enough that a download takes seconds over the 50 Mbit/s link (about 4 s).
const SHARED: usize = 24 << 20;

/// How many GETs of `path` the origin logged.
fn origin_gets(lab: &OriginLab, path: &str) -> usize {
    lab.requests().iter().filter(|r| r.0 == "GET" && r.1 == path).count()
}

/// This process's descriptors open on files under `dir`.
fn fds_under(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(dir))
        .collect()
}

#[test]
#[ignore = "needs root"]
fn concurrent_requests_share_one_origin_download() {
    if !prepared("concurrent_requests_share_one_origin_download") {
        return;
    }
    let lab = OriginLab::new(true);
    lab.write("boot.ipxe", b"#!ipxe\nimgfetch big\n");
    let big1 = random_bytes(SHARED);
    lab.write("big", &big1);
    let (rt, state) = client_side(&lab);
    let c = cache(&lab, state.path(), true);

    // Three requests at once: one GET at the origin, the same bytes for all three, one object.
    let got = rt
        .block_on(async { tokio::join!(fetch(c.clone(), "/big"), fetch(c.clone(), "/big"), fetch(c.clone(), "/big")) });
    for (status, body) in [got.0, got.1, got.2] {
        assert_eq!(status, 200);
        assert!(body.unwrap() == big1, "every client gets the file");
    }
    assert_eq!(origin_gets(&lab, "/big"), 1, "one origin download: {:?}", lab.requests());
    let s = c.snapshot();
    assert_eq!(s.boot_cache.fetched_bytes, SHARED as u64, "{s:?}");
    assert_eq!(s.boot_cache.served_bytes, 3 * SHARED as u64, "{s:?}");
    // mark_good waits for the requests in flight; then no descriptor on the cache is left open.
    assert!(c.mark_good("ready").unwrap());
    let objs = objects(state.path());
    assert_eq!(objs.len(), 1, "admitted once, no temporary file left: {objs:?}");
    assert!(fds_under(state.path()).is_empty(), "{:?}", fds_under(state.path()));

    // A request arriving mid-download joins it and gets the bytes already written at once, while the
    // leader is still downloading.
    let big2 = random_bytes(SHARED);
    std::thread::sleep(Duration::from_millis(20));
    lab.write("big", &big2);
    lab.clear_log();
    c.begin_boot();
    let (leader, joiner, fetched_at_first) = rt.block_on(async {
        let leader = tokio::spawn(fetch(c.clone(), "/big"));
        let mid = async {
            while c.snapshot().download.is_none_or(|d| d.bytes < 1 << 20) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), mid).await.expect("the leader's download starts");
        let r = c.get("/big").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.length, Some(SHARED as u64));
        let ec_ipxe_qemu::bootcache::ReplyBody::Stream(mut rx) = r.body else { panic!("a stream") };
        let mut joined = rx.recv().await.expect("a first chunk").expect("data").to_vec();
        let fetched_at_first = c.snapshot().boot_cache.fetched_bytes;
        while let Some(chunk) = rx.recv().await {
            joined.extend_from_slice(&chunk.expect("the joiner's body completes"));
        }
        (leader.await.unwrap(), joined, fetched_at_first)
    });
    eprintln!("joiner: first chunk when the leader had fetched {fetched_at_first} of {SHARED} bytes");
    assert!(fetched_at_first < SHARED as u64, "first bytes before the leader finished ({fetched_at_first})");
    assert_eq!(leader.0, 200);
    assert!(leader.1.unwrap() == big2 && joiner == big2, "both get the new file");
    assert_eq!(origin_gets(&lab, "/big"), 1, "{:?}", lab.requests());
    let s = c.snapshot();
    assert_eq!((s.boot_cache.fetched_bytes, s.boot_cache.served_bytes), (SHARED as u64, 2 * SHARED as u64));
    assert!(s.download.is_none(), "{s:?}");
    assert!(c.mark_good("ready").unwrap());
    assert_eq!(objects(state.path()).len(), 1);
    assert!(fds_under(state.path()).is_empty());
}

#[test]
#[ignore = "needs root"]
fn a_head_downloads_nothing_and_a_cut_leader_cuts_its_joiner() {
    if !prepared("a_head_downloads_nothing_and_a_cut_leader_cuts_its_joiner") {
        return;
    }
    let lab = OriginLab::new(true);
    let script = b"#!ipxe\nimgfetch big\n".to_vec();
    lab.write("boot.ipxe", &script);
    let big1 = random_bytes(SHARED);
    lab.write("big", &big1);
    let (rt, state) = client_side(&lab);
    let c = cache(&lab, state.path(), true);
    let head = |path: &str| {
        rt.block_on(async {
            let r = c.head(path).await;
            (r.status, r.length, r.into_bytes().await.unwrap())
        })
    };

    // Cold HEAD: the origin's 200 gives the length; its body is dropped after the headers.
    let rx_before = lab.client_rx_bytes();
    assert_eq!(head("/big"), (200, Some(SHARED as u64), vec![]));
    // Whatever was already on its way arrives, then the link is quiet.
    std::thread::sleep(Duration::from_secs(2));
    let received = lab.client_rx_bytes() - rx_before;
    eprintln!("HEAD: {received} bytes crossed the link (file: {SHARED})");
    assert!(received < SHARED as u64 / 2, "{received} bytes crossed the link for a HEAD of {SHARED}");
    let s = c.snapshot();
    assert_eq!((s.boot_cache.fetched_bytes, s.boot_cache.served_bytes), (0, 0), "{s:?}");
    assert!(objects(state.path()).is_empty(), "nothing written: {:?}", objects(state.path()));
    assert_eq!(lab.requests(), [("GET".to_owned(), "/big".to_owned(), 200)]);

    // Cached: the HEAD revalidates (304) and answers the cached length; no counter moves.
    assert_eq!(get(&rt, &c, "/boot.ipxe").1.unwrap(), script);
    assert!(get(&rt, &c, "/big").1.unwrap() == big1);
    assert!(c.mark_good("ready").unwrap());
    let good = objects(state.path());
    lab.clear_log();
    c.begin_boot();
    assert_eq!(head("/big"), (200, Some(SHARED as u64), vec![]));
    assert_eq!(lab.requests(), [("GET".to_owned(), "/big".to_owned(), 304)]);
    let s = c.snapshot();
    // A HEAD counts nothing: the GET that follows it is what the guest gets.
    assert_eq!((s.boot_cache.revalidated, s.boot_cache.hits, s.boot_cache.fetched_bytes), (0, 0, 0), "{s:?}");
    // The origin fails: the fallback's length, as a GET would be answered; a missing file: 404.
    lab.set_mode("503");
    c.begin_boot();
    assert_eq!(head("/big"), (200, Some(SHARED as u64), vec![]));
    // ... without switching the boot to the fallback (only what the guest GETs does).
    let s = c.snapshot();
    assert_eq!(s.boot_source, BootSource::Origin, "{s:?}");
    assert!(s.boot_cache.origin_error.as_deref().is_some_and(|e| e.contains("503")), "{s:?}");
    lab.set_mode("ok");
    c.begin_boot();
    assert_eq!(head("/nope").0, 404);

    // A ready of a boot that is over (the guest rebooted at once) marks nothing: the new boot's first file
    // never replaces the good set.
    let ended = c.boot();
    c.begin_boot();
    assert_eq!(get(&rt, &c, "/boot.ipxe").1.unwrap(), script);
    assert!(!c.mark_good_of("ready", ended).unwrap());
    assert_eq!(objects(state.path()), good, "the good set and its objects stay");

    // The origin cuts the (changed) file mid-body: the leader and the request that joined it are both cut,
    // after one origin GET, and nothing is admitted.
    let big2 = random_bytes(SHARED);
    std::thread::sleep(Duration::from_millis(20));
    lab.write("big", &big2);
    lab.set_mode("cut");
    lab.clear_log();
    c.begin_boot();
    let (a, b) = rt.block_on(async { tokio::join!(fetch(c.clone(), "/big"), fetch(c.clone(), "/big")) });
    lab.set_mode("ok");
    for (status, body) in [a, b] {
        assert_eq!(status, 200);
        let len = body.as_ref().map(Vec::len);
        assert!(body.is_err(), "cut, not complete: {len:?} {:?}", c.snapshot());
    }
    assert_eq!(origin_gets(&lab, "/big"), 1, "{:?}", lab.requests());
    assert!(c.snapshot().boot_cache.fetched_bytes < SHARED as u64);
    c.mark_good("ready").unwrap();
    assert_eq!(objects(state.path()), good, "nothing admitted, no temporary file left");
    assert!(fds_under(state.path()).is_empty(), "{:?}", fds_under(state.path()));
}

#[test]
#[ignore = "needs root"]
fn an_http2_origin_is_fetched_over_http2() {
    let test = "an_http2_origin_is_fetched_over_http2";
    if !prepared(test) || !require_programs(test, &["nghttpd"]) {
        return;
    }
    let lab = OriginLab::new(true);
    let h2 = lab.nghttpd(8443);
    let script = b"#!ipxe\nimgfetch big\necho ready\n".to_vec();
    // 24 MiB: at 50 Mbit/s at least 4 s, longer than the idle timeout (3 s), which must not cut it.
    let big = random_bytes(3 * BIG);
    lab.write("boot.ipxe", &script);
    lab.write("big", &big);
    let (rt, state) = client_side(&lab);
    let c = open(h2.url("boot.ipxe"), state.path(), vec![lab.ca()]);

    // Cold, from the HTTP/2-only origin: streamed, counted and admitted; a download longer than the idle
    // timeout is not cut.
    assert_eq!(get(&rt, &c, "/boot.ipxe").1.unwrap(), script);
    let started = std::time::Instant::now();
    assert_eq!(get(&rt, &c, "/big").1.unwrap(), big);
    assert!(started.elapsed() > Duration::from_secs(3), "the link is shaped: {:?}", started.elapsed());
    let s = c.snapshot();
    assert_eq!(s.boot_source, BootSource::Origin, "{s:?}");
    assert_eq!(s.boot_cache.fetched_bytes, (big.len() + script.len()) as u64, "{s:?}");
    assert!(s.download.is_none() && s.boot_cache.origin_error.is_none(), "{s:?}");
    assert!(c.mark_good("ready").unwrap());
    assert_eq!(c.good_set().unwrap().files, 2);
    let good = objects(state.path());
    assert_eq!(good.len(), 2, "{good:?}");

    // The server saw HTTP/2 requests for both files (nghttpd's frame log), the client says HTTP/2.
    let log = h2.log();
    for path in ["/boot.ipxe", "/big"] {
        assert!(log.contains(&format!(":path: {path}")), "nghttpd's log shows {path}:\n{log}");
    }
    assert!(log.contains("recv HEADERS frame") && log.contains("send DATA frame"), "{log}");
    let detail = ec_ipxe_qemu::bootcache::check_origin(&h2.url("boot.ipxe"), &[lab.ca()], Duration::from_secs(20))
        .expect("doctor's origin check");
    assert!(detail.contains("HTTP/2") && detail.contains("plus --boot-ca"), "{detail}");
    // The Python origin (no ALPN) on the same lab gets HTTP/1.1 from the same client.
    let detail = ec_ipxe_qemu::bootcache::check_origin(&lab.url("boot.ipxe"), &[lab.ca()], Duration::from_secs(20))
        .expect("doctor's origin check");
    assert!(detail.contains("HTTP/1.1"), "{detail}");

    // The origin dies mid-file over HTTP/2 (a new file, larger than what the kernel and the windows buffer):
    // the guest's copy is cut, nothing admitted; the good set is served while the origin is down.
    // (A new name: nghttpd keeps files open and would serve a rewritten one at its old length.)
    let huge = random_bytes(3 * BIG);
    lab.write("huge", &huge);
    c.begin_boot();
    assert_eq!(get(&rt, &c, "/boot.ipxe").1.unwrap(), script);
    let body = rt.block_on(async {
        let r = c.get("/huge").await;
        assert_eq!(r.status, 200);
        let ec_ipxe_qemu::bootcache::ReplyBody::Stream(mut rx) = r.body else { panic!("a stream") };
        let first = rx.recv().await.expect("a first chunk").expect("a first chunk");
        drop(h2);
        let mut got = first.len();
        loop {
            match rx.recv().await {
                Some(Ok(b)) => got += b.len(),
                Some(Err(e)) => break Err(e),
                None => break Ok(got),
            }
        }
    });
    assert!(body.is_err(), "the guest's copy is cut: {body:?} of {} bytes", huge.len());
    assert_eq!(objects(state.path()), good, "nothing admitted, nothing replaced");
    let e = c.snapshot().boot_cache.origin_error.expect("the origin's error");
    assert!(e.contains("/huge"), "{e}");
    let (status, body) = get(&rt, &c, "/big");
    assert_eq!((status, body.unwrap()), (200, big));
    let s = c.snapshot();
    assert_eq!(s.boot_source, BootSource::Cache, "{s:?}");
}

/// The set being fetched is bounded (a guest asking for endless names, say one file under endless query
/// strings): past the cap, files are passed through whole but neither written nor recorded, and the good set
/// holds what fitted.
#[test]
#[ignore = "needs root"]
fn past_the_set_cap_files_pass_through_uncached() {
    if !prepared("past_the_set_cap_files_pass_through_uncached") {
        return;
    }
    let lab = OriginLab::new(true);
    lab.write("boot.ipxe", b"#!ipxe\nimgfetch a\nimgfetch b\n");
    lab.write("a", b"first file");
    lab.write("b", b"second file");
    let (rt, state) = client_side(&lab);
    let c = open_with(lab.url("boot.ipxe"), state.path(), vec![lab.ca()], 2);
    assert_eq!(get(&rt, &c, "/boot.ipxe").1.unwrap(), b"#!ipxe\nimgfetch a\nimgfetch b\n");
    assert_eq!(get(&rt, &c, "/a").1.unwrap(), b"first file");
    assert_eq!(get(&rt, &c, "/b").1.unwrap(), b"second file", "past the cap: still served whole");
    // The same file under another query string is another name: past the cap too.
    assert_eq!(get(&rt, &c, "/a?again").1.unwrap(), b"first file");
    assert!(c.mark_good("ready").unwrap());
    assert_eq!(objects(state.path()).len(), 2, "the script and a only, no temporary file left");
    let good: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("boot-cache/good.json")).unwrap()).unwrap();
    let mut names: Vec<&String> = good["files"].as_object().unwrap().keys().collect();
    names.sort();
    assert_eq!(names, ["a", "boot.ipxe"]);
}
