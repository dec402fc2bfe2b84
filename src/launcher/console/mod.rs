//! The console broker: QEMU's serial port is one end of a socket pair whose other end the launcher reads
//! (QEMU gets `-chardev socket,fd=N`; no file is written by QEMU). Every byte the guest prints goes, in this
//! order, to the line sink (clean lines for the log and the boot watch), to `serial.log`, and to the clients
//! of `console.sock`.
//!
//! Nothing may hold the guest up: the broker reads QEMU's end as fast as QEMU writes, and never waits for
//! anyone.
//! - Viewers: each client has its own queue, bounded in bytes ([`CLIENT_BACKLOG`]); a client that does not read
//!   (a hostile one, or a frozen terminal) is disconnected when its queue is full. At most [`MAX_CLIENTS`] at
//!   once; one more is told so and closed.
//! - One typist: the first client that types holds the keyboard until it leaves; what other clients type is
//!   dropped (they are told once). Input goes to QEMU through a bounded queue drained by a task of its own: when
//!   the guest does not read its UART, only the typist waits.
//! - A new client first gets the last [`REPLAY`] bytes of output, so it sees where the guest is.
//!
//! The pipeline, in flow order: QEMU's serial port → this broker → [`lines`] (clean lines out of the raw
//! bytes) → [`sink`] (the `guest:` log lines, the Ctrl-B [`banner`] spotter and the [`bootwatch`]) and
//! [`seriallog`] (`serial.log`) and the `console.sock` clients (the `console` command is [`client`]).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{Error, Result};

pub(crate) mod banner;
pub(crate) mod bootwatch;
pub(crate) mod client;
pub(crate) mod lines;
pub(crate) mod seriallog;
pub(crate) mod sink;

use lines::{LineAssembler, Piece};
use seriallog::SerialLog;

/// Clients at once.
pub(crate) const MAX_CLIENTS: usize = 16;
/// Output queued for one client before it counts as not reading.
pub(crate) const CLIENT_BACKLOG: usize = 1 << 20;
/// Output a new client gets first.
pub(crate) const REPLAY: usize = 4096;
/// Ctrl-]: the byte `ec-ipxe-qemu console` detaches on.
pub(crate) const DETACH_KEY: u8 = 0x1d;
const READ_CHUNK: usize = 64 << 10;
/// After a short read, the console reader waits this long before reading again, so that output the guest
/// prints a byte at a time (QEMU's UART) is handled in chunks: one wakeup, one log write per chunk, not per
/// byte.
const COALESCE: Duration = Duration::from_millis(20);
/// How often a client that half-closed its socket is checked for having gone away completely.
const HANGUP_CHECK: Duration = Duration::from_secs(1);
const INPUT_QUEUE: usize = 64;
/// A prompt without a newline (`login: `) is handed out as a line after this much quiet.
const IDLE_FLUSH: Duration = Duration::from_secs(1);

/// Where clean console lines go.
pub(crate) trait LineSink: Send + 'static {
    /// Every byte the guest prints, as read (before it is cut into lines).
    fn bytes(&mut self, _chunk: &[u8]) {}
    fn line(&mut self, line: String);
    /// The terminal was reset (`ESC c`), in order with the lines.
    fn screen_reset(&mut self) {}
    /// The unfinished line after a chunk (progress redrawn in place), when there is one.
    fn partial(&mut self, _text: &str) {}
    /// About once a second.
    fn tick(&mut self) {}
    /// Whether lines wrapped at 80 columns are joined (firmware and iPXE output; see [`lines`]).
    fn join_wrapped(&self) -> bool {
        true
    }
    /// The console ended (QEMU's end closed): say what is still pending.
    fn finish(&mut self) {}
}

struct Client {
    id: u64,
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    tasks: Vec<AbortHandle>,
}

impl Client {
    /// Queue output; false when the client is gone or too far behind.
    fn send(&self, b: &Bytes) -> bool {
        if self.queued.load(Ordering::Relaxed) + b.len() > CLIENT_BACKLOG {
            return false;
        }
        self.queued.fetch_add(b.len(), Ordering::Relaxed);
        self.tx.send(b.clone()).is_ok()
    }

    fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Default)]
struct Hub {
    clients: Vec<Client>,
    typist: Option<u64>,
    recent: VecDeque<u8>,
    next_id: u64,
}

impl Hub {
    fn broadcast(&mut self, chunk: &[u8]) {
        self.recent.extend(chunk);
        let excess = self.recent.len().saturating_sub(REPLAY);
        self.recent.drain(..excess);
        if self.clients.is_empty() {
            return;
        }
        let b = Bytes::copy_from_slice(chunk);
        let mut dropped = Vec::new();
        self.clients.retain(|c| {
            let ok = c.send(&b);
            if !ok {
                c.close();
                dropped.push(c.id);
            }
            ok
        });
        for id in dropped {
            if self.typist == Some(id) {
                self.typist = None;
            }
            tracing::warn!(
                "console client {id} disconnected: it did not read its output ({} KiB behind)",
                CLIENT_BACKLOG >> 10
            );
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(i) = self.clients.iter().position(|c| c.id == id) {
            let c = self.clients.remove(i);
            c.close();
            tracing::info!("console client {id} detached ({} left)", self.clients.len());
        }
        if self.typist == Some(id) {
            self.typist = None;
        }
    }

    /// A line for one client only.
    fn notice(&mut self, id: u64, text: &str) {
        let b = Bytes::from(format!("\r\n[ec-ipxe-qemu: {text}]\r\n"));
        if let Some(c) = self.clients.iter().find(|c| c.id == id) {
            let _ = c.send(&b);
        }
    }
}

fn lock(hub: &Mutex<Hub>) -> MutexGuard<'_, Hub> {
    hub.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running broker. Dropping it stops every task; the socket file is the caller's to remove.
pub(crate) struct Console {
    hub: Arc<Mutex<Hub>>,
    broker: Option<JoinHandle<()>>,
    tasks: Vec<AbortHandle>,
    /// Tells the serial reader thread to stop.
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Bind `console.sock` (0600; a stale one is removed: the caller holds the state directory's lock).
pub(crate) fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    crate::launcher::private::expect_socket(path, true)?;
    let l = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    l.set_nonblocking(true).map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
    Ok(l)
}

impl Console {
    /// Start serving: `serial` is the launcher's end of QEMU's serial socket pair, `listener` from [`bind`].
    /// Call inside the runtime.
    pub(crate) fn start(
        serial: std::os::unix::net::UnixStream,
        log: SerialLog,
        listener: std::os::unix::net::UnixListener,
        socket: &Path,
        sink: impl LineSink,
    ) -> Result<Console> {
        serial.set_nonblocking(true).map_err(|e| Error::io("serial socket pair", e))?;
        let reading = serial.try_clone().map_err(|e| Error::io("serial socket pair", e))?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let output = read_serial(reading, Arc::clone(&stop))?;
        let listener = UnixListener::from_std(listener)
            .map_err(|e| Error::io(format!("console socket {}", socket.display()), e))?;
        let hub = Arc::new(Mutex::new(Hub::default()));
        let (input_tx, input_rx) = mpsc::channel::<Bytes>(INPUT_QUEUE);
        // The serial socket is never on the event loop: its reader and its writer are threads.
        std::thread::Builder::new()
            .name("console input".into())
            .spawn(move || write_serial(serial, input_rx))
            .map_err(|e| Error::io("start the console input thread", e))?;
        let broker = tokio::spawn(broker(output, log, Arc::clone(&hub), sink));
        let accept = tokio::spawn(accept(listener, Arc::clone(&hub), input_tx));
        Ok(Console { hub, broker: Some(broker), tasks: vec![accept.abort_handle()], stop })
    }

    /// Wait (at most `limit`) for the broker to read the rest of QEMU's output, after QEMU exited.
    pub(crate) async fn drain(&mut self, limit: Duration) {
        if let Some(b) = self.broker.as_mut() {
            let _ = tokio::time::timeout(limit, b).await;
            self.broker = None;
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(b) = self.broker.take() {
            b.abort();
        }
        for t in &self.tasks {
            t.abort();
        }
        let mut hub = lock(&self.hub);
        for c in hub.clients.drain(..) {
            c.close();
        }
    }
}

/// QEMU's serial output, read on a thread of its own: whatever is there (up to [`READ_CHUNK`]), then a pause
/// of [`COALESCE`] after a short read. QEMU writes the guest's output a byte at a time; read from the event
/// loop, every byte would be a wakeup (epoll reports each arrival), read here it is one chunk per pause.
/// `None` at the end (QEMU closed its end).
fn read_serial(
    serial: std::os::unix::net::UnixStream,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<mpsc::UnboundedReceiver<Option<Bytes>>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::Read;
    use std::os::fd::AsFd;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut serial = serial;
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            let mut buf = vec![0u8; READ_CHUNK];
            while !stop.load(Ordering::Relaxed) {
                let mut fds = [PollFd::new(serial.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(1000u16)) {
                    Ok(0) => continue,
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::debug!("guest console: poll: {e}");
                        break;
                    }
                }
                match serial.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(Some(Bytes::copy_from_slice(&buf[..n]))).is_err() {
                            return;
                        }
                        if n < READ_CHUNK {
                            std::thread::sleep(COALESCE);
                        }
                    }
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
                    Err(e) => {
                        tracing::debug!("guest console: {e}");
                        break;
                    }
                }
            }
            let _ = tx.send(None);
        })
        .map_err(|e| Error::io("start the console reader thread", e))?;
    Ok(rx)
}

async fn broker(
    mut output: mpsc::UnboundedReceiver<Option<Bytes>>,
    log: SerialLog,
    hub: Arc<Mutex<Hub>>,
    mut sink: impl LineSink,
) {
    let mut log = seriallog::LogWriter::start(log);
    let mut asm = LineAssembler::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        tokio::select! {
            r = output.recv() => {
                let Some(Some(chunk)) = r else { break };
                let chunk = &chunk[..];
                sink.bytes(chunk);
                asm.join_wrapped = sink.join_wrapped();
                asm.push_pieces(chunk, &mut |p| match p {
                    Piece::Line(l) => sink.line(l),
                    Piece::ScreenReset => sink.screen_reset(),
                });
                let partial = asm.partial_text();
                if !partial.is_empty() {
                    sink.partial(&partial);
                }
                log.write(chunk);
                lock(&hub).broadcast(chunk);
                last = Instant::now();
                // Let the clients' writers run between chunks, so a client that reads keeps up.
                tokio::task::yield_now().await;
            }
            _ = tick.tick() => {
                if last.elapsed() >= IDLE_FLUSH && asm.partial_is_prompt() {
                    asm.flush(&mut |l| sink.line(l));
                }
                sink.tick();
            }
        }
    }
    asm.flush(&mut |l| sink.line(l));
    sink.finish();
    // The writer thread writes what it still has; waiting for it is a blocking call, kept off the loop.
    let _ = tokio::task::spawn_blocking(move || log.finish(Duration::from_secs(2))).await;
}

/// What the typist types, to QEMU's serial port (a thread: the socket is non-blocking, so a guest that does
/// not read its UART makes this thread wait in poll(2), and only the typist behind it).
fn write_serial(serial: std::os::unix::net::UnixStream, mut rx: mpsc::Receiver<Bytes>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::Write;
    use std::os::fd::AsFd;
    let mut serial = serial;
    while let Some(b) = rx.blocking_recv() {
        let mut rest = &b[..];
        while !rest.is_empty() {
            match serial.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(serial.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::from(1000u16));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("guest console input: {e}");
                    return;
                }
            }
        }
    }
}

async fn accept(listener: UnixListener, hub: Arc<Mutex<Hub>>, input: mpsc::Sender<Bytes>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of fds, most likely: try again later rather than spin.
                tracing::warn!("console socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut h = lock(&hub);
        if h.clients.len() >= MAX_CLIENTS {
            let _ = stream.try_write(
                format!("[ec-ipxe-qemu: {MAX_CLIENTS} console clients are attached already; try again later]\r\n")
                    .as_bytes(),
            );
            tracing::warn!("console: refused a client ({MAX_CLIENTS} attached already)");
            continue;
        }
        let id = h.next_id;
        h.next_id += 1;
        let replay: Vec<u8> = h.recent.iter().copied().collect();
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(replay.len()));
        let writer = tokio::spawn(client_writer(id, wr, rx, Arc::clone(&queued), replay, Arc::clone(&hub)));
        let reader = tokio::spawn(client_reader(id, rd, Arc::clone(&hub), input.clone()));
        h.clients.push(Client { id, tx, queued, tasks: vec![writer.abort_handle(), reader.abort_handle()] });
        tracing::info!("console client {id} attached ({} attached)", h.clients.len());
    }
}

/// A client's output. A client that cannot take it any more (closed) is removed.
async fn client_writer(
    id: u64,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
    replay: Vec<u8>,
    hub: Arc<Mutex<Hub>>,
) {
    if wr.write_all(&replay).await.is_ok() {
        queued.fetch_sub(replay.len(), Ordering::Relaxed);
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
            queued.fetch_sub(b.len(), Ordering::Relaxed);
        }
    }
    lock(&hub).remove(id);
}

/// Whether the peer of a client whose input ended has closed its socket completely (POLLHUP), not only
/// its sending half.
fn hung_up(rd: &OwnedReadHalf) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let stream: &UnixStream = rd.as_ref();
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => true,
    }
}

async fn client_reader(id: u64, mut rd: OwnedReadHalf, hub: Arc<Mutex<Hub>>, input: mpsc::Sender<Bytes>) {
    let mut buf = [0u8; 4096];
    let mut told = false;
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => {
                // Input ended. A viewer that only half-closed (`console </dev/null`, `socat -u`) goes on
                // receiving output until it closes completely; it gives up the keyboard now.
                {
                    let mut h = lock(&hub);
                    if h.typist == Some(id) {
                        h.typist = None;
                    }
                }
                while !hung_up(&rd) {
                    tokio::time::sleep(HANGUP_CHECK).await;
                }
                break;
            }
            Err(_) => break,
            Ok(n) => n,
        };
        let typist = {
            let mut h = lock(&hub);
            match h.typist {
                None => {
                    h.typist = Some(id);
                    true
                }
                Some(t) => t == id,
            }
        };
        if typist {
            // Waits only when the guest does not read its UART: then only this client waits.
            if input.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                break;
            }
        } else if !told {
            told = true;
            lock(&hub).notice(id, "another console client has the keyboard; this one only watches");
        }
    }
    lock(&hub).remove(id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    struct Lines(Arc<Mutex<Vec<String>>>);

    fn clients(c: &Console) -> usize {
        lock(&c.hub).clients.len()
    }

    impl LineSink for Lines {
        fn line(&mut self, line: String) {
            self.0.lock().unwrap().push(line);
        }
    }

    /// The broker against a fake QEMU (the other end of the pair), with real sockets: output reaches the log,
    /// the sink and a viewer; one typist's input reaches QEMU, another client's does not; a client that
    /// never reads is dropped while the fake guest keeps printing; the client cap holds.
    #[test]
    fn viewers_typist_and_a_client_that_never_reads() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join(crate::launcher::layout::CONSOLE_SOCKET);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (ours, mut qemu) = std::os::unix::net::UnixStream::pair().unwrap();
        let log = SerialLog::open(&tmp.path().join("serial.log"), 16 << 20).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = bind(&sock).unwrap();
        let _g = rt.enter();
        let console = Console::start(ours, log, listener, &sock, Lines(Arc::clone(&seen))).unwrap();
        let step = |d: u64| rt.block_on(tokio::time::sleep(Duration::from_millis(d)));

        qemu.write_all(b"\x1b[0mhello\r\n").unwrap();
        step(50);
        // A viewer gets the replay, then live output.
        let mut viewer = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        viewer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        step(50);
        let mut typist = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        step(50);
        let mut got = [0u8; 64];
        let n = viewer.read(&mut got).unwrap();
        assert_eq!(&got[..n], b"\x1b[0mhello\r\n");
        typist.write_all(b"typed\r").unwrap();
        step(50);
        viewer.write_all(b"not me").unwrap();
        step(50);
        qemu.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut input = [0u8; 64];
        let n = qemu.read(&mut input).unwrap();
        assert_eq!(&input[..n], b"typed\r", "only the typist's input reaches the guest");
        let n = viewer.read(&mut got).unwrap();
        assert!(String::from_utf8_lossy(&got[..n]).contains("another console client has the keyboard"));

        // A client that never reads, while the guest prints 4 MiB: dropped, and the guest never waited. The
        // typist reads its output.
        let mut typist_out = typist.try_clone().unwrap();
        let drain = std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = typist_out.read_to_end(&mut sink);
        });
        let hog = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        step(50);
        assert_eq!(clients(&console), 3);
        let mut guest = qemu.try_clone().unwrap();
        let printing = std::thread::spawn(move || {
            let line = [b'x'; 1023];
            let start = Instant::now();
            for _ in 0..4096 {
                guest.write_all(&line).unwrap();
                guest.write_all(b"\n").unwrap();
            }
            start.elapsed()
        });
        rt.block_on(async {
            while !printing.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let took = printing.join().unwrap();
        // The sink works through the output at its own pace (slower on a loaded machine): wait for it.
        let waited = Instant::now();
        while seen.lock().unwrap().len() < 1 + 4096 && waited.elapsed() < Duration::from_secs(20) {
            step(20);
        }
        eprintln!("FIGURE 4 MiB of guest output with a client that never reads: {took:?}");
        assert!(took < Duration::from_secs(30), "the guest waited: {took:?}");
        drop(hog);
        let waited = Instant::now();
        while clients(&console) != 1 && waited.elapsed() < Duration::from_secs(10) {
            step(20);
        }
        // The viewer did not read either: both were dropped; the sink saw every line.
        assert_eq!(clients(&console), 1, "the two clients that did not read are gone, the typist stays");
        assert_eq!(seen.lock().unwrap().len(), 1 + 4096);
        assert_eq!(seen.lock().unwrap()[0], "hello");

        // At most MAX_CLIENTS.
        let mut more: Vec<_> =
            (0..MAX_CLIENTS - 1).map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap()).collect();
        step(100);
        assert_eq!(clients(&console), MAX_CLIENTS);
        let mut extra = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        step(100);
        let mut text = String::new();
        extra.read_to_string(&mut text).unwrap();
        assert!(text.contains("console clients are attached already"), "{text}");
        assert_eq!(clients(&console), MAX_CLIENTS);
        more.clear();
        step(100);
        assert_eq!(clients(&console), 1);
        typist.shutdown(std::net::Shutdown::Both).unwrap();
        step(100);
        assert_eq!(clients(&console), 0);
        drain.join().unwrap();
        let log = std::fs::read(tmp.path().join("serial.log")).unwrap();
        assert_eq!(log.len(), 11 + 4096 * 1024);
    }
}
