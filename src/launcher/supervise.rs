//! `run`: prepare everything, start QEMU as a supervised child and stay with it until it exits.
//!
//! Order matters so that bad input and early failures leave nothing behind: the configuration is validated
//! first (in [`LaunchConfig::from_args`]), then the accelerator is resolved and the `--host-forward` ports are
//! checked, then the state directory is created and locked, then the LAN link is locked (one launcher per
//! macvtap) and only then is its tap opened (a refused second run never touches the first guest's macvtap). A
//! failure before the guest runs, including a QEMU that rejects its command line, removes what this run
//! created.
//!
//! The launcher keeps its own QMP connection to QEMU (one end of a socket pair; operators get `qmp.sock`) from
//! start to end and listens to its events: a STOP it did not ask for, an internal error (KVM) or a guest panic
//! ends the run with exit 1 at once. A stop request (SIGTERM/SIGINT) goes: powerdown, `quit` after
//! `--shutdown-timeout`, SIGTERM to QEMU, SIGKILL last; QEMU's exit and a further signal (which skips to the
//! next step) are noticed at every step. A stop requested while preparing never starts QEMU. If the LAN
//! macvtap disappears (or can no longer be watched), QEMU is stopped at once and the run fails, so systemd
//! restarts the unit and the link is recreated.
//!
//! The guest console belongs to the launcher ([`console`](super::console)): QEMU's serial port is a socket
//! pair, the launcher logs each console line as `guest: LINE`, keeps `serial.log` and serves `console.sock`.
//! The boot watch follows the boot stages on it ([`bootwatch`](super::bootwatch)); the [`Tracker`] keeps
//! `status.json` and tells the service manager (`STATUS=`, `READY=1`, `WATCHDOG=1`). A stop before the guest
//! is ready quits QEMU at once (firmware and iPXE ignore ACPI power-off); after it, the guest gets its power-off
//! and `--shutdown-timeout`. A guest not ready within `--ready-timeout` ends the run with exit 1.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::launcher::accel::{self, Accel};
use crate::launcher::banner;
use crate::launcher::bootwatch::{self, BootWatch};
use crate::launcher::config::{BOOT_SCRIPT, BootTarget, LaunchConfig};
use crate::launcher::console::{self, Console};
use crate::launcher::guest::{GuestSink, Tracker};
use crate::launcher::httpd::BootServer;
use crate::launcher::ipxe::{self, ScriptSpec};
use crate::launcher::lanlock::LanLock;
use crate::launcher::linkwatch::{LinkEnd, LinkWatch};
use crate::launcher::notify::{self, Notifier};
use crate::launcher::qemu_args::{self, LanNic};
use crate::launcher::qmp::{Qmp, QmpClient, QmpEvent};
use crate::launcher::seriallog::SerialLog;
use crate::launcher::state::{self, StateDir};
use crate::launcher::status::{Status, StatusFile};
use crate::launcher::values::{HostForward, Proto};
use crate::launcher::vhost::{self, Vhost};
use crate::macvtap::{self, OpenedTap};
use crate::tap;

/// The first fd number the LAN tap queues get in QEMU; the vhost-net fds and then the launcher's QMP socket
/// follow them.
pub const FIRST_TAP_FD: i32 = 3;

/// The fd number of the launcher's QMP connection in QEMU, after the LAN NIC's `lan_fds` fds (its tap
/// queues, then its vhost-net fds). QEMU's serial port (the console socket pair) follows it.
pub fn qmp_fd(lan_fds: u32) -> i32 {
    FIRST_TAP_FD + lan_fds as i32
}

/// The fd numbers QEMU gets for the LAN NIC: `queues` tap fds from [`FIRST_TAP_FD`], then `vhost` vhost-net
/// fds.
pub fn lan_nic(mac: crate::names::MacAddr, queues: u32, vhost: u32) -> LanNic {
    let fd = |i: u32| FIRST_TAP_FD + i as i32;
    LanNic { mac, fds: (0..queues).map(fd).collect(), vhost_fds: (queues..queues + vhost).map(fd).collect() }
}

/// The LAN NIC's kernel side: the macvtap's tap queues and, with vhost-net, one `/dev/vhost-net` fd per
/// queue. `vhost.as_str()` ("on"/"off") is what status and doctor report.
pub struct Lan {
    pub tap: OpenedTap,
    pub vhost: Vhost,
}

/// How long `quit` gets before SIGTERM, and SIGTERM before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(5);
const TERM_GRACE: Duration = Duration::from_secs(5);
/// The same steps when the run is failing anyway (guest stopped, link gone): quick.
const QUICK_GRACE: Duration = Duration::from_millis(600);
/// How long one QMP exchange may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long QEMU may take from spawn to answering its first QMP command.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the guest's run state is polled, as a backstop to the STOP event.
const STATUS_POLL: Duration = Duration::from_secs(1);
/// QEMU's last stderr lines kept for error messages.
const STDERR_TAIL: usize = 8;
/// Driver passes [`StopSignals::pending`] allows for a signal that already arrived.
const PENDING_POLLS: usize = 3;
/// Threads for tokio's blocking pool (file reads of the boot HTTP server).
const BLOCKING_THREADS: usize = 2;

/// SIGTERM and SIGINT, registered before any preparation so a stop request during it is not lost (nor fatal).
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    /// A signal that already arrived (while the runtime was not running). Its handler has written to the
    /// runtime's signal pipe; a yield lets the driver read it (a yielded task is woken only after the driver
    /// ran), so this costs microseconds, not a fixed wait, on every start.
    fn pending(&mut self, rt: &tokio::runtime::Runtime) -> Option<&'static str> {
        rt.block_on(async {
            for _ in 0..PENDING_POLLS {
                tokio::select! {
                    biased;
                    sig = self.recv() => return Some(sig),
                    () = tokio::task::yield_now() => {}
                }
            }
            None
        })
    }
}

pub fn run(cfg: &LaunchConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
        .map_err(|e| Error::io("start the supervisor runtime", e))?;
    let mut signals = {
        let _guard = rt.enter();
        StopSignals {
            term: signal(SignalKind::terminate()).map_err(|e| Error::io("handle SIGTERM", e))?,
            int: signal(SignalKind::interrupt()).map_err(|e| Error::io("handle SIGINT", e))?,
        }
    };
    let mut notify = Notifier::from_env();
    notify.status("preparing: checking the configuration and the state directory");
    let accel = accel::resolve(cfg.accel)?;
    check_host_forwards(&cfg.host_forwards)?;
    // The locks come before the LAN tap: a refused second run must not open (and so add a queue to) the
    // first guest's macvtap.
    let state = StateDir::create_and_lock(&cfg.state_dir)?;
    let prepared = lock_lan(cfg).and_then(|lock| {
        let tap = open_lan(cfg, lock.as_ref())?;
        let _guard = rt.enter();
        let prepared = prepare(cfg, accel, tap.as_ref())?;
        if let Some(l) = &lock {
            l.serve();
        }
        Ok((prepared, tap, lock))
    });
    let (mut prepared, tap, _lan_lock) = match prepared {
        Ok(x) => x,
        Err(e) => {
            state.abandon();
            return Err(e);
        }
    };
    if let Some(sig) = signals.pending(&rt) {
        tracing::info!("{sig} while preparing: not starting QEMU");
        remove_if_exists(&cfg.qmp_socket());
        remove_if_exists(&cfg.console_socket());
        return Ok(());
    }
    let status = Status {
        pid: std::process::id(),
        boot_url: prepared.chain.clone(),
        lan_interface: tap.as_ref().map(|l| l.tap.name.to_string()),
        lan_mac: tap.as_ref().map(|l| l.tap.mac.to_string()),
        accel: accel.as_str().to_owned(),
        vhost: tap.as_ref().map_or("off", |l| l.vhost.as_str()).to_owned(),
        ..Status::default()
    };
    let mut tracker = Tracker::new(StatusFile::new(&cfg.state_dir, status), notify);
    let result = rt.block_on(async {
        let guest = match start(cfg, accel, &mut prepared, tap, &mut signals, &mut tracker).await {
            Ok(Some(g)) => g,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e),
        };
        supervise(cfg, accel, guest, &mut signals, &mut tracker).await
    });
    tracker.ended();
    // Remove the sockets while the lock is still held, so a successor's sockets are never removed.
    remove_if_exists(&cfg.qmp_socket());
    remove_if_exists(&cfg.console_socket());
    drop(prepared);
    match result {
        Err(Failure::Rejected(e)) => {
            state.abandon();
            Err(e)
        }
        Err(Failure::Other(e)) => Err(e),
        Ok(()) => Ok(()),
    }
}

/// How a run that got as far as spawning QEMU failed: `Rejected` (QEMU refused its command line, so nothing
/// ran and the run's directories go) or anything else.
enum Failure {
    Rejected(Error),
    Other(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Other(e)
    }
}

/// Every `--host-forward` host port must be free now (QEMU would fail later with a less clear message). The
/// probe binds like slirp does (SO_REUSEADDR for TCP) and closes at once.
fn check_host_forwards(forwards: &[HostForward]) -> Result<()> {
    for f in forwards {
        let ip = f.host_addr.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        let addr = std::net::SocketAddr::from((ip, f.host_port));
        let r = match f.proto {
            Proto::Tcp => std::net::TcpListener::bind(addr).map(drop),
            Proto::Udp => std::net::UdpSocket::bind(addr).map(drop),
        };
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(Error::conflict(
                    format!("--host-forward {f}"),
                    format!("host port {addr} is already in use (pick another port)"),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                return Err(Error::invalid(
                    format!("--host-forward {f}"),
                    format!("{ip} is not an address of this host"),
                ));
            }
            Err(e) => return Err(Error::io(format!("--host-forward {f}: bind {addr}"), e)),
        }
    }
    Ok(())
}

/// One launcher per macvtap: lock the link, and refuse when any other process holds its tap device.
fn lock_lan(cfg: &LaunchConfig) -> Result<Option<LanLock>> {
    let Some(l) = &cfg.lan else { return Ok(None) };
    let link = crate::launcher::lan_link(&l.interface)?;
    let lock = LanLock::acquire(&l.interface, link.ifindex)?;
    if let Ok(dev) = tap::sysfs_devnum(&l.interface, link.ifindex) {
        let holders = tap::holders(dev);
        if !holders.is_empty() {
            return Err(Error::conflict(
                format!("--lan-interface \"{}\"", l.interface),
                format!(
                    "its tap device {dev} is held by {}; refusing to start a second guest on it",
                    tap::describe_holders(&holders)
                ),
            ));
        }
    }
    Ok(Some(lock))
}

fn open_lan(cfg: &LaunchConfig, lock: Option<&LanLock>) -> Result<Option<Lan>> {
    let (Some(l), Some(_)) = (&cfg.lan, lock) else { return Ok(None) };
    let t = macvtap::open(None, &l.interface, l.queues).map_err(|e| name_option(e, "--lan-interface"))?;
    let vhost = vhost::open(l.vhost, l.queues, l.model.is_virtio())?;
    tracing::info!(
        "LAN NIC on macvtap \"{}\" (ifindex {}, mac {}, {} queue(s) from {}, vhost-net {})",
        t.name,
        t.ifindex,
        t.mac,
        l.queues,
        t.node.display(),
        vhost.as_str()
    );
    Ok(Some(Lan { tap: t, vhost }))
}

/// Say which option an error is about.
fn name_option(e: Error, option: &str) -> Error {
    match e {
        Error::Invalid { what, reason } => Error::Invalid { what: format!("{option}: {what}"), reason },
        Error::NotFound { what } => Error::NotFound { what: format!("{option}: {what}") },
        Error::Conflict { what, reason } => Error::Conflict { what: format!("{option}: {what}"), reason },
        Error::Io { op, source } => Error::Io { op: format!("{option}: {op}"), source },
        Error::Netlink { op, errno } => Error::Netlink { op: format!("{option}: {op}"), errno },
        Error::Runtime(m) => Error::Runtime(format!("{option}: {m}")),
        Error::Unusable { kind, what, reason } => Error::Unusable { kind, what: format!("{option}: {what}"), reason },
    }
}

/// Everything prepared for QEMU; dropping it stops the HTTP server.
struct Prepared {
    argv: Vec<String>,
    qmp_fd: i32,
    /// The chain target (None: the diagnostics).
    chain: Option<String>,
    /// The guest console: the launcher's end of the serial socket pair, QEMU's end, the log, the listener.
    console: Option<ConsoleParts>,
    _http: Option<BootServer>,
}

struct ConsoleParts {
    ours: std::os::unix::net::UnixStream,
    theirs: OwnedFd,
    log: SerialLog,
    listener: std::os::unix::net::UnixListener,
}

/// Call inside the runtime's context (the boot HTTP server is a task on it).
fn prepare(cfg: &LaunchConfig, accel: Accel, lan: Option<&Lan>) -> Result<Prepared> {
    let http = match &cfg.boot {
        BootTarget::Dir { dir, bind, port } => Some(BootServer::start(dir, *bind, *port)?),
        _ => None,
    };
    let spec = ScriptSpec::new(
        &cfg.boot,
        http.as_ref().map(|h| h.addr().port()),
        &cfg.dns,
        cfg.lan.is_some(),
        cfg.hostname.as_ref().map(|h| h.as_str()),
    );
    match (cfg.dns.len(), spec.dns) {
        (0, _) => {}
        (_, None) => tracing::warn!("--dns: iPXE takes one IPv4 DNS server and none was given; using the DHCP one"),
        (1, Some(_)) => {}
        (_, Some(d)) => tracing::info!("--dns: iPXE takes one DNS server; using {d}"),
    }
    if let Some(url) = &spec.chain {
        tracing::info!("boot script chains to {url}");
        if url.to_ascii_lowercase().starts_with("https://") {
            crate::launcher::warn_without_https(cfg, url);
        }
    } else {
        tracing::info!("boot script: built-in diagnostics");
    }
    tftp_dir(&cfg.tftp_dir())?;
    state::write_atomically(&cfg.boot_script(), ipxe::script(&spec).as_bytes())?;
    if let (Some(d), Some(img)) = (&cfg.disk, &cfg.qemu_img) {
        state::ensure_disk(img, &d.path, d.size)?;
    }
    remove_if_exists(&cfg.qmp_socket());
    let log = SerialLog::open(&cfg.serial_log, cfg.serial_log_max)?;
    let listener = console::bind(&cfg.console_socket())?;
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| Error::io("create the serial socket pair", e))?;
    let nic = lan.map(|l| lan_nic(l.tap.mac, l.tap.fds.len() as u32, l.vhost.fds.len() as u32));
    let qmp_fd = qmp_fd(nic.as_ref().map_or(0, |n| (n.fds.len() + n.vhost_fds.len()) as u32));
    let argv = qemu_args::build(cfg, accel, nic.as_ref(), qmp_fd);
    Ok(Prepared {
        argv,
        qmp_fd,
        chain: spec.chain.clone(),
        console: Some(ConsoleParts { ours, theirs: OwnedFd::from(theirs), log, listener }),
        _http: http,
    })
}

/// The slirp TFTP root (0700): the guest may read everything in it, so it holds the boot script and nothing
/// else; anything else found there is removed.
fn tftp_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(dir).map_err(|e| Error::io(format!("stat {}", dir.display()), e))?;
            if !m.is_dir() {
                return Err(Error::conflict(
                    format!("TFTP directory {}", dir.display()),
                    "exists and is not a directory (remove it)",
                ));
            }
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
            for entry in entries.flatten() {
                if entry.file_name() == BOOT_SCRIPT {
                    continue;
                }
                let p = entry.path();
                let r = match entry.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                    _ => std::fs::remove_file(&p),
                };
                match r {
                    Ok(()) => tracing::warn!("removed {} (the guest can read all of the TFTP directory)", p.display()),
                    Err(e) => return Err(Error::io(format!("remove {} from the TFTP directory", p.display()), e)),
                }
            }
        }
        Err(e) => return Err(Error::io(format!("create {}", dir.display()), e)),
    }
    Ok(())
}

fn remove_if_exists(p: &Path) {
    match std::fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("remove {}: {e}", p.display()),
    }
}

/// QEMU's stderr: every line goes on to ours (prefixed), the last few are kept for error messages.
type Tail = Arc<Mutex<VecDeque<String>>>;

fn forward_stderr(stderr: ChildStderr) -> (Tail, JoinHandle<()>) {
    let tail: Tail = Arc::new(Mutex::new(VecDeque::new()));
    let t = Arc::clone(&tail);
    let task = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::warn!("QEMU: {line}");
            if let Ok(mut t) = t.lock() {
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    });
    (tail, task)
}

fn tail_text(tail: &Tail) -> String {
    tail.lock().map(|t| t.iter().map(String::as_str).collect::<Vec<_>>().join("; ")).unwrap_or_default()
}

/// Start QEMU with the tap fds, the vhost-net fds, then its QMP end, then its serial end, from fd
/// [`FIRST_TAP_FD`] on.
fn spawn(argv: &[String], lan: Option<Lan>, qmp: OwnedFd, serial: OwnedFd, first_qmp_fd: i32) -> Result<Child> {
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null()).stderr(Stdio::piped());
    // The unit's main process is the launcher: QEMU must not talk to the service manager.
    for v in notify::CHILD_ENV_REMOVE {
        cmd.env_remove(v);
    }
    // Its own process group: a terminal's Ctrl-C reaches only the launcher, which then stops QEMU in order.
    cmd.process_group(0);
    // In the order of the argv's fd numbers: tap queues, vhost-net fds, QMP.
    let mut fds: Vec<OwnedFd> = lan.map(|l| l.tap.fds.into_iter().chain(l.vhost.fds).collect()).unwrap_or_default();
    let n = fds.len() as i32;
    fds.push(qmp);
    fds.push(serial);
    let (kept, placed) = tap::pass_fds_to_child(&mut cmd, fds, FIRST_TAP_FD)?;
    debug_assert_eq!(placed.last().copied(), Some(qemu_args::serial_fd(first_qmp_fd)));
    debug_assert_eq!(first_qmp_fd, FIRST_TAP_FD + n);
    tap::set_parent_death_signal(&mut cmd, Signal::SIGKILL);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| Error::io(format!("start QEMU {}", argv[0]), e))?;
    // QEMU has its copies of the tap and vhost-net fds and of its end of the QMP pair now.
    drop(kept);
    Ok(child)
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => {
            let name = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("unknown");
            format!("signal {s} ({name})")
        }
        _ => status.to_string(),
    }
}

/// The running guest: QEMU, the launcher's QMP connection and events, and the LAN link watch.
struct Guest {
    child: Child,
    qmp: QmpClient,
    events: UnboundedReceiver<QmpEvent>,
    watch: Option<LinkWatch>,
    lan: Option<(String, u32)>,
    tail: Tail,
    stderr_task: JoinHandle<()>,
    /// The console broker (dropped: stopped).
    console: Option<Console>,
    /// What the boot watch saw on the console.
    boot: UnboundedReceiver<bootwatch::Event>,
}

/// Subscribe to link removals (before QEMU starts, so none is missed), spawn QEMU and wait until it answers
/// on QMP (it has then accepted its command line). `Ok(None)`: a stop request came first and QEMU was stopped.
async fn start(
    cfg: &LaunchConfig,
    accel: Accel,
    prepared: &mut Prepared,
    lan_fds: Option<Lan>,
    signals: &mut StopSignals,
    tracker: &mut Tracker,
) -> Result<Option<Guest>, Failure> {
    let lan = lan_fds.as_ref().map(|l| (l.tap.name.to_string(), l.tap.ifindex));
    let watch = match &lan {
        Some((_, ifindex)) => Some(LinkWatch::subscribe(*ifindex).await?),
        None => None,
    };
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| Error::io("create the QMP socket pair", e))?;
    let parts = prepared.console.take().ok_or_else(|| Error::Runtime("the guest console is gone".into()))?;
    tracing::debug!("QEMU argv: {:?}", prepared.argv);
    let mut child = spawn(&prepared.argv, lan_fds, OwnedFd::from(theirs), parts.theirs, prepared.qmp_fd)?;
    let pid = child.id().unwrap_or_default();
    let stderr = child.stderr.take().ok_or_else(|| Error::Runtime("QEMU's stderr is not a pipe".into()))?;
    let (tail, stderr_task) = forward_stderr(stderr);
    // The console is read from the first byte on, so QEMU never waits on its serial port.
    let (boot_tx, boot) = tokio::sync::mpsc::unbounded_channel();
    // The NIC option ROM's Ctrl-B banner would hold the boot for 2-3 s: watch for it on the default path.
    let (spotter, banner_seen) = cfg.ipxe.is_none().then(banner::spotter).unzip();
    let sink = GuestSink::new(BootWatch::new(cfg.ready_pattern.clone(), cfg.memory_mib), boot_tx, spotter);
    let console = Console::start(parts.ours, parts.log, parts.listener, &cfg.console_socket(), sink)?;
    let handshake = async {
        ours.set_nonblocking(true).map_err(|e| Error::io("QMP socket pair", e))?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(|e| Error::io("QMP socket pair", e))?;
        let qmp = Qmp::from_stream(stream, Path::new("(launcher connection)")).await?;
        let (client, events) = qmp.into_client();
        let status = client.execute("query-status").await?;
        Ok::<_, Error>((client, events, status))
    };
    let up = tokio::select! {
        r = tokio::time::timeout(STARTUP_TIMEOUT, handshake) => r,
        status = child.wait() => {
            let status = status.map_err(|e| Error::io("wait for QEMU", e))?;
            let _ = tokio::time::timeout(Duration::from_secs(1), stderr_task).await;
            if status.success() {
                tracing::info!("QEMU exited at once ({})", describe(status));
                return Ok(None);
            }
            return Err(rejected(&tail, status, accel));
        }
        sig = signals.recv() => {
            tracing::info!("{sig} while QEMU was starting: stopping it");
            let mut g = Guest::starting(child, tail, stderr_task, console);
            return match g.terminate(QUICK_GRACE).await {
                Ok(_) => Ok(None),
                Err(e) => Err(e.into()),
            };
        }
    };
    let (qmp, events, status) = match up {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            // The connection failed: QEMU is most likely exiting; its status and message say why.
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                let _ = tokio::time::timeout(Duration::from_secs(1), stderr_task).await;
                if status.success() {
                    tracing::info!("QEMU exited at once ({})", describe(status));
                    return Ok(None);
                }
                return Err(rejected(&tail, status, accel));
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(Error::Runtime(format!("QEMU (pid {pid}) did not answer on QMP: {e}; killed it")).into());
        }
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(Error::Runtime(format!(
                "QEMU (pid {pid}) did not answer on QMP within {} s; killed it",
                STARTUP_TIMEOUT.as_secs()
            ))
            .into());
        }
    };
    if let Some(seen) = banner_seen {
        // Answer the banner when the console shows it (ends by itself).
        tokio::spawn(banner::answer(seen, qmp.clone()));
    }
    tracing::info!(
        "QEMU started (pid {pid}, accel {}, guest {}); console: {} (log {})",
        accel.as_str(),
        status.get("status").and_then(|s| s.as_str()).unwrap_or("?"),
        cfg.console_socket().display(),
        cfg.serial_log.display()
    );
    tracker.qemu_started(pid);
    Ok(Some(Guest { child, qmp, events, watch, lan, tail, stderr_task, console: Some(console), boot }))
}

/// QEMU exited before it answered on QMP: its command line (or something it names) was refused; or, under
/// KVM, the accelerator failed.
fn rejected(tail: &Tail, status: ExitStatus, accel: Accel) -> Failure {
    if let Some(e) = kvm_failure(tail, status, accel) {
        return Failure::Other(e);
    }
    if status.signal().is_some() {
        return Failure::Other(Error::Runtime(format!("QEMU died while starting: {}", describe(status))));
    }
    let msg = tail_text(tail);
    let msg = if msg.is_empty() { format!("QEMU exited with {}", describe(status)) } else { msg };
    Failure::Rejected(Error::invalid("QEMU rejected its command line", msg))
}

/// Under KVM, a QEMU that failed with KVM in its last words (e.g. "kvm_buf_set_msrs: Assertion ... failed",
/// "KVM internal error"): say so, with what to do.
fn kvm_failure(tail: &Tail, status: ExitStatus, accel: Accel) -> Option<Error> {
    let msg = tail_text(tail);
    (accel == Accel::Kvm && msg.to_ascii_lowercase().contains("kvm")).then(|| {
        Error::Runtime(format!(
            "QEMU failed ({}: {msg}): the KVM accelerator failed; try --accel tcg",
            describe(status)
        ))
    })
}

/// Why the guest is considered dead: from a run state (`query-status`) or an event.
pub fn failure_reason(status: &str, accel: Accel) -> String {
    match status {
        "internal-error" if accel == Accel::Kvm => {
            "QEMU reports an internal error: the KVM accelerator failed; try --accel tcg".into()
        }
        "internal-error" => "QEMU reports an internal error".into(),
        "guest-panicked" => "the guest panicked".into(),
        "io-error" => "a disk I/O error stopped the guest".into(),
        "paused" => "the guest was paused by someone else (a \"stop\" on qmp.sock?)".into(),
        "shutdown" => "the guest shut down but QEMU stayed".into(),
        other => format!("the guest is in state \"{other}\""),
    }
}

/// Run states in which the guest is fine.
pub fn state_is_fine(status: &str) -> bool {
    matches!(status, "running" | "suspended" | "prelaunch")
}

enum Why {
    Stop(&'static str),
    NotReady(Duration),
    LinkGone(LinkEnd),
    GuestFailed { reason: String, at: Option<f64> },
}

async fn supervise(
    cfg: &LaunchConfig,
    accel: Accel,
    mut g: Guest,
    signals: &mut StopSignals,
    tracker: &mut Tracker,
) -> Result<(), Failure> {
    let result = watch_over(cfg, accel, &mut g, signals, tracker).await;
    // QEMU is gone: read the rest of its console.
    if let Some(c) = g.console.as_mut() {
        c.drain(Duration::from_secs(1)).await;
    }
    while let Ok(ev) = g.boot.try_recv() {
        tracker.handle(ev);
    }
    result
}

async fn watch_over(
    cfg: &LaunchConfig,
    accel: Accel,
    g: &mut Guest,
    signals: &mut StopSignals,
    tracker: &mut Tracker,
) -> Result<(), Failure> {
    let mut watch = g.watch.take();
    let watchdog = tracker.notify.watchdog_interval();
    let mut poll = tokio::time::interval(watchdog.map_or(STATUS_POLL, |w| w.min(STATUS_POLL)));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ping: Option<tokio::time::Instant> = None;
    let ready_by = cfg.ready_timeout.map(|t| tokio::time::Instant::now() + t);
    let mut events_open = true;
    let mut boot_open = true;
    let why = loop {
        let not_ready_at = ready_by.filter(|_| !tracker.is_ready());
        let not_ready = async move {
            match not_ready_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let link_gone = async {
            match watch.as_mut() {
                Some(w) => w.gone().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = g.child.wait() => return Ok(g.exited(status, accel).await?),
            sig = signals.recv() => break Why::Stop(sig),
            end = link_gone => break Why::LinkGone(end),
            () = not_ready => break Why::NotReady(cfg.ready_timeout.unwrap_or_default()),
            ev = g.boot.recv(), if boot_open => match ev {
                Some(ev) => tracker.handle(ev),
                None => boot_open = false,
            },
            ev = g.events.recv(), if events_open => match ev {
                Some(ev) => {
                    if let Some(why) = g.judge_event(&ev, accel).await {
                        break why;
                    }
                }
                // QEMU closed the connection: it is exiting, which child.wait() reports.
                None => events_open = false,
            },
            _ = poll.tick() => {
                if let Ok(Ok(v)) = tokio::time::timeout(QMP_TIMEOUT, g.qmp.execute("query-status")).await {
                    let st = v.get("status").and_then(|s| s.as_str()).unwrap_or("");
                    if !st.is_empty() && !state_is_fine(st) {
                        break Why::GuestFailed { reason: failure_reason(st, accel), at: None };
                    }
                    // The watchdog is fed only while QEMU says the guest runs.
                    if let Some(every) = watchdog
                        && st == "running"
                        && last_ping.is_none_or(|t| t.elapsed() + STATUS_POLL / 4 >= every)
                    {
                        tracker.notify.watchdog();
                        last_ping = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
    };
    match why {
        Why::Stop(sig) => {
            // What the console has said so far decides how to stop.
            while let Ok(ev) = g.boot.try_recv() {
                tracker.handle(ev);
            }
            let stage = tracker.stage().map_or("starting", |s| s.as_str());
            if tracker.is_ready() {
                tracker.stopping(&format!("stopping: {sig}: powering the guest off"));
                Ok(g.stop(cfg, sig, signals, true).await?)
            } else {
                tracing::info!(
                    "{sig} before the guest was ready (stage {stage}): quitting QEMU at once (firmware and iPXE \
                     ignore an ACPI power-off)"
                );
                tracker.stopping(&format!("stopping: {sig} before the guest was ready: quitting QEMU"));
                Ok(g.stop(cfg, sig, signals, false).await?)
            }
        }
        Why::NotReady(limit) => {
            let stage = tracker.stage().map_or("starting", |s| s.as_str());
            let last =
                tracker.status().last_error.clone().map(|e| format!("; last boot failure: {e}")).unwrap_or_default();
            let msg =
                format!("the guest was not ready within --ready-timeout {} s (stage {stage}{last})", limit.as_secs());
            tracing::error!("{msg}; stopping QEMU");
            tracker.stopping(&format!("stopping: not ready within {} s (stage {stage})", limit.as_secs()));
            let _ = g.terminate(QUICK_GRACE).await;
            Err(Error::Runtime(msg).into())
        }
        Why::LinkGone(end) => {
            let (name, ifindex) = g.lan.clone().unwrap_or_default();
            let what = match end {
                LinkEnd::Removed => "disappeared".to_string(),
                LinkEnd::WatchLost(why) => format!("can no longer be watched ({why})"),
            };
            tracing::error!("LAN macvtap \"{name}\" (ifindex {ifindex}) {what}; stopping QEMU");
            let _ = g.terminate(QUICK_GRACE).await;
            Err(Error::Runtime(format!(
                "LAN macvtap \"{name}\" (ifindex {ifindex}) {what} while the guest was running; stopped QEMU"
            ))
            .into())
        }
        Why::GuestFailed { reason, at } => {
            if let Some(at) = at {
                tracing::error!("guest failure reported by QEMU at {at:.6} (Unix time)");
            }
            tracing::error!("the guest stopped running: {reason}; stopping QEMU");
            let _ = g.terminate(QUICK_GRACE).await;
            if let Some(at) = at {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(at);
                tracing::info!("{:.3} s from the guest's failure to the end of the run", now - at);
            }
            Err(Error::Runtime(format!("the guest stopped running: {reason}")).into())
        }
    }
}

impl Guest {
    /// A guest whose QMP connection is not up yet (for stopping it during startup).
    fn starting(child: Child, tail: Tail, stderr_task: JoinHandle<()>, console: Console) -> Guest {
        let (_, events) = tokio::sync::mpsc::unbounded_channel();
        let (_, boot) = tokio::sync::mpsc::unbounded_channel();
        Guest {
            child,
            qmp: QmpClient::closed(),
            events,
            watch: None,
            lan: None,
            tail,
            stderr_task,
            console: Some(console),
            boot,
        }
    }

    /// QEMU exited by itself.
    async fn exited(&mut self, status: std::io::Result<ExitStatus>, accel: Accel) -> Result<()> {
        let status = status.map_err(|e| Error::io("wait for QEMU", e))?;
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.stderr_task).await;
        // A panic event may still be queued: it names the reason better than the exit status.
        while let Ok(ev) = self.events.try_recv() {
            if ev.name == "GUEST_PANICKED" {
                return Err(Error::Runtime(format!("the guest panicked; QEMU exited ({})", describe(status))));
            }
        }
        if status.success() {
            tracing::info!("QEMU exited (the guest powered off)");
            return Ok(());
        }
        if let Some(e) = kvm_failure(&self.tail, status, accel) {
            return Err(e);
        }
        let tail = tail_text(&self.tail);
        let tail = if tail.is_empty() { String::new() } else { format!(" ({tail})") };
        Err(Error::Runtime(format!("QEMU failed: {}{tail}", describe(status))))
    }

    /// Whether an event means the guest is dead.
    async fn judge_event(&mut self, ev: &QmpEvent, accel: Accel) -> Option<Why> {
        match ev.name.as_str() {
            "GUEST_PANICKED" => Some(Why::GuestFailed { reason: "the guest panicked".into(), at: ev.timestamp }),
            "STOP" => {
                // The launcher never stops the guest, so this STOP is someone else's; the run state says why.
                let st = match tokio::time::timeout(QMP_TIMEOUT, self.qmp.execute("query-status")).await {
                    Ok(Ok(v)) => v.get("status").and_then(|s| s.as_str()).unwrap_or("").to_owned(),
                    _ => String::new(),
                };
                if state_is_fine(&st) {
                    return None;
                }
                let reason = if st.is_empty() { "QEMU stopped the guest".into() } else { failure_reason(&st, accel) };
                Some(Why::GuestFailed { reason, at: ev.timestamp })
            }
            _ => None,
        }
    }

    /// Wait for QEMU to exit for at most `limit`; a stop signal (when given) cuts the wait short.
    async fn wait_for_exit(
        &mut self,
        limit: Duration,
        signals: Option<&mut StopSignals>,
    ) -> Option<std::io::Result<ExitStatus>> {
        let signal = async {
            match signals {
                Some(s) => {
                    let sig = s.recv().await;
                    tracing::info!("{sig} again: going to the next step at once");
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = self.child.wait() => Some(status),
            () = tokio::time::sleep(limit) => None,
            () = signal => None,
        }
    }

    /// A QMP command, abandoned when QEMU exits meanwhile (then its status is returned).
    async fn command(&mut self, command: &str) -> Option<std::io::Result<ExitStatus>> {
        tokio::select! {
            status = self.child.wait() => Some(status),
            r = tokio::time::timeout(QMP_TIMEOUT, self.qmp.execute(command)) => {
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::debug!("{e}"),
                    Err(_) => tracing::warn!("QMP {command}: no answer within {} s", QMP_TIMEOUT.as_secs()),
                }
                None
            }
        }
    }

    /// The ordered stop: powerdown (when `powerdown`; the guest is ready), then `quit`, then SIGTERM, then
    /// SIGKILL.
    async fn stop(&mut self, cfg: &LaunchConfig, sig: &str, signals: &mut StopSignals, powerdown: bool) -> Result<()> {
        let done = |status: std::io::Result<ExitStatus>, how: &str| -> Result<()> {
            let status = status.map_err(|e| Error::io("wait for QEMU", e))?;
            if !status.success() {
                return Err(Error::Runtime(format!("QEMU failed while stopping: {}", describe(status))));
            }
            tracing::info!("{how} ({})", describe(status));
            Ok(())
        };
        if !powerdown {
            // Said by the caller.
        } else if !cfg.shutdown_timeout.is_zero() {
            tracing::info!(
                "{sig}: asking the guest to power off; QEMU quits in {} s if it has not",
                cfg.shutdown_timeout.as_secs()
            );
            if let Some(s) = self.command("system_powerdown").await {
                return done(s, "the guest powered off");
            }
            if let Some(s) = self.wait_for_exit(cfg.shutdown_timeout, Some(signals)).await {
                return done(s, "the guest powered off");
            }
        } else {
            tracing::info!("{sig}: asking the guest to power off; QEMU quits now (--shutdown-timeout 0)");
        }
        tracing::info!("quitting QEMU");
        if let Some(s) = self.command("quit").await {
            return done(s, "QEMU quit");
        }
        if let Some(s) = self.wait_for_exit(QUIT_GRACE, Some(signals)).await {
            return done(s, "QEMU quit");
        }
        tracing::warn!("QEMU did not quit within {} s; sending it SIGTERM", QUIT_GRACE.as_secs());
        self.signal(Signal::SIGTERM);
        if let Some(s) = self.wait_for_exit(TERM_GRACE, Some(signals)).await {
            return done(s, "QEMU ended on SIGTERM");
        }
        self.kill().await;
        Err(Error::Runtime("QEMU did not stop on powerdown, quit or SIGTERM; killed it".into()))
    }

    /// The quick stop of a run that fails anyway: quit, SIGTERM, SIGKILL, each with a short grace.
    async fn terminate(&mut self, grace: Duration) -> Result<()> {
        let quit = async {
            let _ = tokio::time::timeout(grace, self.qmp.execute("quit")).await;
        };
        tokio::select! {
            _ = self.child.wait() => return Ok(()),
            () = quit => {}
        }
        if self.wait_for_exit(grace, None).await.is_some() {
            return Ok(());
        }
        self.signal(Signal::SIGTERM);
        if self.wait_for_exit(grace * 2, None).await.is_some() {
            return Ok(());
        }
        self.kill().await;
        Ok(())
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    async fn kill(&mut self) {
        tracing::warn!("killing QEMU (SIGKILL)");
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_states() {
        for fine in ["running", "suspended", "prelaunch"] {
            assert!(state_is_fine(fine));
        }
        for bad in ["internal-error", "guest-panicked", "paused", "io-error", "shutdown", "debug"] {
            assert!(!state_is_fine(bad), "{bad}");
        }
        assert!(failure_reason("internal-error", Accel::Kvm).contains("the KVM accelerator failed; try --accel tcg"));
        assert!(!failure_reason("internal-error", Accel::Tcg).contains("KVM"));
        assert_eq!(failure_reason("guest-panicked", Accel::Tcg), "the guest panicked");
        assert!(failure_reason("paused", Accel::Tcg).contains("qmp.sock"));
    }

    #[test]
    fn host_forward_ports_in_use_are_a_conflict() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let f: HostForward = format!("tcp:127.0.0.1:{port}-:22").parse().unwrap();
        let err = check_host_forwards(std::slice::from_ref(&f)).unwrap_err();
        assert_eq!(err.exit_code(), 4);
        assert!(err.to_string().starts_with(&format!("--host-forward tcp:127.0.0.1:{port}-:22: ")), "{err}");
        drop(taken);
        check_host_forwards(&[f]).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        let f: HostForward = format!("udp:127.0.0.1:{port}-:53").parse().unwrap();
        assert_eq!(check_host_forwards(&[f]).unwrap_err().exit_code(), 4);
    }
}
