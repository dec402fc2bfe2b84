//! A small HTTP/1.0 server of the test's own on 127.0.0.1 (one request per connection), and the two pieces
//! of it the boot bench's namespaced server shares: read a request head, write a response.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Read a request up to the blank line that ends its head (or EOF, an error, the 5 s read timeout); returns
/// the request line ("" when there was none).
pub fn read_request_line(s: &mut TcpStream) -> String {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&req).lines().next().unwrap_or("").to_owned()
}

/// An HTTP/1.0 response with `Connection: close`; errors (a client that went away) are ignored.
pub fn respond(s: &mut TcpStream, code: u16, body: &str) {
    let reason = if code == 200 { "OK" } else { "Not Found" };
    let _ = write!(s, "HTTP/1.0 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
}

/// The server: each known path is (status, body); any other path gets `fallback`. It records every request
/// as "METHOD TARGET".
pub struct Http {
    pub port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Http {
    /// Routes by path (the query string ignored); unknown paths are 404.
    pub fn start(routes: Vec<(&str, u16, String)>) -> Http {
        Http::serve(routes, (404, "not found\n".into()))
    }

    /// `body` with 200 at every path.
    pub fn any(body: String) -> Http {
        Http::serve(vec![], (200, body))
    }

    fn serve(routes: Vec<(&str, u16, String)>, fallback: (u16, String)) -> Http {
        let routes: Vec<(String, u16, String)> = routes.into_iter().map(|(p, s, b)| (p.to_owned(), s, b)).collect();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, halt) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let line = read_request_line(&mut s);
                let mut parts = line.split(' ');
                let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                log.lock().unwrap().push(format!("{method} {target}"));
                let path = target.split('?').next().unwrap_or("");
                let (code, body) = routes
                    .iter()
                    .find(|(p, _, _)| p == path)
                    .map(|(_, c, b)| (*c, b.as_str()))
                    .unwrap_or((fallback.0, fallback.1.as_str()));
                respond(&mut s, code, body);
            }
        });
        Http { port, seen, stop, thread: Some(thread) }
    }

    /// The URL of `path` as the guest sees this server (slirp's 10.0.2.2 is the host's loopback).
    pub fn url(&self, path: &str) -> String {
        format!("http://10.0.2.2:{}{path}", self.port)
    }

    /// The requests so far, as "METHOD TARGET".
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Http {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
