//! The boot cache section of `cargo bench --bench boot` (`EC_BENCH_ONLY=cache` runs only this one): start →
//! a large file fetched by iPXE, cold vs warm vs direct, with the origin behind a 50 Mbit/s link.

#[allow(unused_imports)]
use super::*;

// ---- The boot cache: start → large file fetched, cold vs warm vs direct ----

/// What the fetching script prints once the large file is in the guest's memory.
const FETCHED: &str = "BENCH-FETCHED";
/// The large file's size in MiB: `EC_BENCH_CACHE_MIB`, 48 by default (a NixOS netboot initrd is ~800 MB; the
/// larger the file, the more a warm boot saves against the 50 Mbit/s origin).
fn cache_bench_bytes() -> usize {
    std::env::var("EC_BENCH_CACHE_MIB").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(48) << 20
}

/// The cache's loopback server: hyper on 127.0.0.1 in the client namespace, answering every request with
/// `BootCache::get` (the launcher's own server does the same once integrated); the cache can be swapped
/// between runs.
struct CacheServer {
    port: u16,
    cache: Arc<std::sync::Mutex<Option<ec_ipxe_qemu::bootcache::BootCache>>>,
}

impl CacheServer {
    fn start(netns: String) -> CacheServer {
        let cache: Arc<std::sync::Mutex<Option<ec_ipxe_qemu::bootcache::BootCache>>> = Arc::default();
        let shared = Arc::clone(&cache);
        // The listening socket is made in the namespace (and stays there); the server thread needs not be.
        let listener = common::in_netns(&netns, || TcpListener::bind("127.0.0.1:0").expect("bind"));
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("non-blocking listener");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let c = shared.lock().expect("lock").clone();
                            async move {
                                let target =
                                    req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
                                let c = c.expect("a cache is set");
                                Ok::<_, std::convert::Infallible>(c.get(&target).await.into_response())
                            }
                        });
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                    });
                }
            });
        });
        CacheServer { port, cache }
    }
}

/// QEMU with `ipxe.lkrn` and a script that chains `url`, in the client namespace; seconds until the
/// large file is fetched.
fn fetch_time(netns: &str, dir: &Path, url: &str) -> Option<f64> {
    let script = dir.join(format!("{}.ipxe", unique("s")));
    std::fs::write(&script, format!("#!ipxe\ndhcp net0\nchain {url}\n")).expect("script");
    let serial = dir.join(format!("{}.log", unique("c")));
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        netns,
        QEMU,
        "-machine",
        "pc,graphics=off",
        "-accel",
        "tcg",
        "-m",
        &((cache_bench_bytes() >> 20) + 256).to_string(),
        "-smp",
        CPUS,
        "-nodefaults",
        "-display",
        "none",
    ])
    .args(["-serial", &format!("file:{}", serial.display()), "-kernel", LKRN, "-initrd"])
    .arg(&script)
    .args(["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile="])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let t0 = Instant::now();
    let child = cmd.spawn().expect("spawn qemu");
    let (mut console, mut offset) = (String::new(), 0u64);
    let mut done = None;
    while t0.elapsed() < Duration::from_secs(300) {
        read_new(&serial, &mut offset, &mut console);
        if console.contains(FETCHED) {
            done = Some(t0.elapsed().as_secs_f64());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop(child, Kind::BareLkrn);
    if done.is_none() {
        let tail: Vec<&str> = console.lines().rev().take(8).collect();
        eprintln!("  {url}: the file was not fetched; console ends: {:?}", tail);
    }
    let _ = std::fs::remove_file(&serial);
    done
}

/// Start → large file fetched, behind the 50 Mbit/s link of tests/common/origin.rs: iPXE fetching from the
/// HTTP origin itself (`--boot-cache off`), through the cache with an empty cache (cold) and with the last
/// good set current (warm, 304s). Prints figures; asserts nothing about time.
pub(crate) fn boot_cache_bench(runs: usize) {
    use ec_ipxe_qemu::bootcache::{BootCache, Config, origin::Limits};
    let lab = common::origin::OriginLab::new(false);
    lab.write("big", &common::origin::random_bytes(cache_bench_bytes()));
    lab.write("boot.ipxe", format!("#!ipxe\nimgfetch big\necho {FETCHED}\n").as_bytes());
    let server = CacheServer::start(lab.client.path());
    let tmp = tempfile::tempdir().expect("temp dir");
    let direct_url = lab.url("boot.ipxe");
    let cached_url = format!("http://10.0.2.2:{}/boot.ipxe", server.port);
    let client_netns = lab.client.path();
    let open = |state: &Path| {
        let cfg = Config {
            boot_url: direct_url.clone(),
            state_dir: state.to_owned(),
            extra_ca: vec![],
            limits: Limits::default(),
            max_set_files: ec_ipxe_qemu::bootcache::MAX_SET_FILES,
        };
        // In the client namespace, as the launcher would be: the HTTP client's own thread starts here.
        common::in_netns(&client_netns, move || BootCache::open(&cfg).expect("open the cache"))
    };
    println!();
    println!(
        "boot cache: start → {} MiB file fetched by iPXE (TCG), origin behind 50 Mbit/s (tbf both ends); {runs} run(s)",
        cache_bench_bytes() >> 20
    );
    let (mut direct, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    let mut last_state = None;
    for n in 0..runs {
        direct.extend(fetch_time(&lab.client.name, tmp.path(), &direct_url));
        let state = tmp.path().join(format!("state-{n}"));
        std::fs::create_dir(&state).expect("state dir");
        let c = open(&state);
        *server.cache.lock().expect("lock") = Some(c.clone());
        cold.extend(fetch_time(&lab.client.name, tmp.path(), &cached_url));
        let s = c.snapshot();
        c.mark_good("ready").expect("mark good");
        for _ in 0..2 {
            c.begin_boot();
            warm.extend(fetch_time(&lab.client.name, tmp.path(), &cached_url));
            let w = c.snapshot();
            assert_eq!(w.boot_cache.fetched_bytes, 0, "a warm boot fetches nothing: {w:?}");
            c.mark_good("ready").expect("mark good");
        }
        println!(
            "  run {}: cold fetched {} bytes from the origin, served {}",
            n + 1,
            s.boot_cache.fetched_bytes,
            s.boot_cache.served_bytes
        );
        last_state = Some(state);
    }
    let (d, c, w) = (median(direct.clone()), median(cold.clone()), median(warm.clone()));
    println!("{:<40} {:>10} {:>10}", "variant", "median s", "min s");
    for (label, v) in
        [("direct (--boot-cache off, HTTP origin)", &direct), ("cache, cold", &cold), ("cache, warm (304)", &warm)]
    {
        println!("{label:<40} {:>10} {:>10}", cell(median(v.clone())), cell(min(v)));
    }
    if let (Some(d), Some(c), Some(w)) = (d, c, w) {
        println!("warm ÷ cold = {:.2} (goal ≤ 0.3); cold ÷ direct = {:.2} (goal ≤ 1.1)", w / c, c / d);
    }
    if let Some(state) = last_state {
        println!("on disk after 3 boots (cold, warm, warm) in {}:", state.join("boot-cache").display());
        let out = Command::new("find").arg(state.join("boot-cache")).args(["-printf", "  %M %s %P\n"]).output();
        if let Ok(o) = out {
            print!("{}", String::from_utf8_lossy(&o.stdout));
        }
    }
}
