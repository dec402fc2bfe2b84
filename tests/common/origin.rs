//! The boot cache's stand-in for the internet: an origin HTTP(S) server in a namespace of its own, reached
//! from a "client" namespace through a veth whose both ends are shaped to 50 Mbit/s with `tbf`. The server
//! (Python's `http.server`, wrapped in `ssl` with a certificate of a private CA made by the `openssl` CLI)
//! sends `ETag`/`Last-Modified`, answers `If-None-Match`/`If-Modified-Since` with 304, logs every request,
//! and misbehaves on demand (a mode file read on every request): `503`, `cut` (half a large body, then
//! close), `stall` (half, then silence), `endless` (a body without end), `redirect-http` (a redirect to
//! plain HTTP on another port).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{KillOnDrop, Netns, sh, unique, wait_for};

pub const CLIENT_IP: &str = "10.77.0.1";
pub const ORIGIN_IP: &str = "10.77.0.2";
/// The shaping on both veth ends.
pub const TBF: [&str; 8] = ["tbf", "rate", "50mbit", "burst", "32kbit", "latency", "400ms", ""];

const SERVER: &str = r#"
import email.utils, http.server, os, ssl, sys, time
root, port, mode_file, log_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
cert = sys.argv[5] if len(sys.argv) > 6 else None
key = sys.argv[6] if len(sys.argv) > 6 else None

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def note(self, status):
        with open(log_file, "a") as f:
            f.write("%s %s %d\n" % (self.command, self.path, status))
    def mode(self):
        try:
            with open(mode_file) as f:
                return f.read().strip()
        except OSError:
            return "ok"
    def do_GET(self):
        mode = self.mode()
        if mode == "503":
            self.note(503)
            self.send_response(503); self.send_header("Content-Length", "0"); self.end_headers(); return
        if mode == "redirect-http":
            self.note(302)
            self.send_response(302); self.send_header("Location", "http://%s:8080%s" % (self.server.server_address[0], self.path))
            self.send_header("Content-Length", "0"); self.end_headers(); return
        path = os.path.join(root, self.path.split("?")[0].lstrip("/"))
        if not os.path.isfile(path):
            self.note(404)
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers(); return
        st = os.stat(path)
        etag = '"%x-%x"' % (st.st_size, st.st_mtime_ns)
        lm = email.utils.formatdate(st.st_mtime, usegmt=True)
        if self.headers.get("If-None-Match") == etag:
            self.note(304)
            self.send_response(304); self.send_header("ETag", etag); self.end_headers(); return
        big = st.st_size > (1 << 20)
        if mode == "endless" and big:
            self.note(200)
            self.send_response(200); self.send_header("Connection", "close"); self.end_headers()
            block = b"\0" * 65536
            try:
                while True:
                    self.wfile.write(block)
            except OSError:
                return
        self.note(200)
        self.send_response(200)
        self.send_header("Content-Length", str(st.st_size))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", lm)
        self.end_headers()
        with open(path, "rb") as f:
            if big and mode in ("cut", "stall"):
                self.wfile.write(f.read(st.st_size // 2)); self.wfile.flush()
                if mode == "stall":
                    time.sleep(3600)
                self.close_connection = True
                return
            while True:
                b = f.read(65536)
                if not b:
                    break
                self.wfile.write(b)

srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), H)
srv.daemon_threads = True
if cert:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
import signal, traceback
def on_signal(n, f):
    sys.stderr.write("origin server: signal %d\n" % n); sys.stderr.flush(); os._exit(128 + n)
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
for n in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1):
    signal.signal(n, on_signal)
try:
    srv.serve_forever()
except BaseException:
    traceback.print_exc()
    raise
"#;

/// Two namespaces, a shaped veth, a private CA and the origin server.
pub struct OriginLab {
    pub client: Netns,
    pub origin: Netns,
    pub dir: tempfile::TempDir,
    pub tls: bool,
    pub port: u16,
    /// The client namespace's end of the veth.
    client_dev: String,
    server: Option<KillOnDrop>,
}

impl OriginLab {
    /// `tls`: HTTPS on 443 with the private CA (`ca()`), else HTTP on 80.
    pub fn new(tls: bool) -> OriginLab {
        let client = Netns::new("ecbc");
        let origin = Netns::new("ecbo");
        let a = unique("bca");
        let b = unique("bcb");
        client.ip(&["link", "add", "name", &a, "type", "veth", "peer", "name", &b, "netns", &origin.name]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", &a]);
        origin.ip(&["addr", "add", &format!("{ORIGIN_IP}/24"), "dev", &b]);
        client.ip(&["link", "set", &a, "up"]);
        origin.ip(&["link", "set", &b, "up"]);
        for (ns, dev) in [(&client, &a), (&origin, &b)] {
            let mut args = vec!["tc", "-n", &ns.name, "qdisc", "add", "dev", dev, "root"];
            args.extend(TBF.iter().filter(|s| !s.is_empty()));
            sh(&args);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("www")).expect("www");
        std::fs::write(dir.path().join("server.py"), SERVER).expect("server.py");
        if tls {
            make_certs(dir.path());
        }
        let mut lab =
            OriginLab { client, origin, dir, tls, port: if tls { 443 } else { 80 }, client_dev: a, server: None };
        lab.start();
        lab
    }

    pub fn www(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn url(&self, name: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{ORIGIN_IP}/{name}")
    }

    pub fn write(&self, name: &str, data: &[u8]) {
        std::fs::write(self.www().join(name), data).expect("write origin file");
    }

    pub fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.path().join("mode"), mode).expect("write mode");
    }

    /// The origin's request log: (method, path, status).
    pub fn requests(&self) -> Vec<(String, String, u16)> {
        self.file("requests.log")
            .lines()
            .filter_map(|l| {
                let mut it = l.split(' ');
                Some((it.next()?.to_owned(), it.next()?.to_owned(), it.next()?.parse().ok()?))
            })
            .collect()
    }

    /// Bytes the client namespace has received over the link from the origin.
    pub fn client_rx_bytes(&self) -> u64 {
        let out = self.client.ip(&["-j", "-s", "link", "show", "dev", &self.client_dev]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j -s link");
        v[0]["stats64"]["rx"]["bytes"].as_u64().expect("rx bytes")
    }

    pub fn clear_log(&self) {
        let _ = std::fs::remove_file(self.dir.path().join("requests.log"));
    }

    /// Start (again) the server.
    pub fn start(&mut self) {
        let d = self.dir.path();
        let p = |n: &str| d.join(n).to_string_lossy().into_owned();
        let mut cmd = self.origin.cmd("python3");
        cmd.args([p("server.py"), p("www"), self.port.to_string(), p("mode"), p("requests.log")]);
        if self.tls {
            cmd.args([p("server.pem"), p("server.key")]);
        }
        let err = std::fs::File::create(d.join("server.err")).expect("server.err");
        let child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn().expect("start the origin server");
        self.server = Some(KillOnDrop(child));
        assert!(self.listens(self.port), "the origin server listens: {}", self.file("server.err"));
    }

    /// Whether something accepts connections on `port` of the origin within 10 s.
    fn listens(&self, port: u16) -> bool {
        let origin = self.origin.path();
        wait_for(Duration::from_secs(10), || {
            super::in_netns(&origin, move || std::net::TcpStream::connect((ORIGIN_IP, port)).ok()).map(drop)
        })
        .is_some()
    }

    /// A file of the lab's directory (a server's log), empty when unreadable.
    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Stop the server: the origin is down (connection refused).
    pub fn stop(&mut self) {
        self.server = None;
    }
}

/// `nghttpd` (nghttp2's HTTP/2-only static file server) serving the lab's `www` over TLS with the lab's
/// certificate on `port` of the origin namespace, its `-v` frame log in `nghttpd.log`. It speaks nothing but
/// HTTP/2 (ALPN `h2`): a client that fetches from it spoke HTTP/2.
pub struct H2Origin {
    pub port: u16,
    log: PathBuf,
    _server: KillOnDrop,
}

impl H2Origin {
    pub fn url(&self, name: &str) -> String {
        format!("https://{ORIGIN_IP}:{}/{name}", self.port)
    }

    /// nghttpd's `-v` output: every frame received and sent.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl OriginLab {
    /// Start nghttpd next to the Python server (needs `new(true)`).
    pub fn nghttpd(&self, port: u16) -> H2Origin {
        assert!(self.tls, "nghttpd serves TLS with the lab's certificate");
        let d = self.dir.path();
        let p = |n: &str| d.join(n).to_string_lossy().into_owned();
        let program = super::which("nghttpd").expect("nghttpd");
        let log = d.join("nghttpd.log");
        let out = std::fs::File::create(&log).expect("nghttpd.log");
        let err = out.try_clone().expect("nghttpd.log");
        let child = self
            .origin
            .cmd(&program.to_string_lossy())
            .args(["-v", "-a", ORIGIN_IP, &format!("--htdocs={}", p("www")), &port.to_string()])
            .args([p("server.key"), p("server.pem")])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start nghttpd");
        let server = KillOnDrop(child);
        assert!(self.listens(port), "nghttpd listens: {}", self.file("nghttpd.log"));
        H2Origin { port, log, _server: server }
    }
}

/// A private CA and a server certificate for ORIGIN_IP, with the openssl CLI.
fn make_certs(d: &Path) {
    let p = |n: &str| d.join(n).to_string_lossy().into_owned();
    let ok = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    ok(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
        "-days",
        "2",
        "-subj",
        "/CN=ec-ipxe-qemu test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    ok(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &p("server.key"),
        "-out",
        &p("server.csr"),
        "-subj",
        "/CN=origin",
    ]);
    std::fs::write(
        d.join("ext.cnf"),
        format!("subjectAltName=IP:{ORIGIN_IP}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )
    .expect("ext.cnf");
    ok(&[
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("server.pem"),
        "-days",
        "2",
        "-extfile",
        &p("ext.cnf"),
    ]);
}

/// `n` bytes from the kernel's random source.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").expect("urandom"), &mut v).expect("read");
    v
}
