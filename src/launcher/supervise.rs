//! `run`: prepare everything, start QEMU as a supervised child and stay with it until it exits.
//!
//! Order matters so that bad input and early failures leave nothing behind: the configuration is validated
//! first (in [`LaunchConfig::from_args`]), then the accelerator is resolved, then the state directory is
//! created and locked, and only then is the LAN tap opened (a refused second run never touches the first
//! guest's macvtap). A failure before QEMU starts removes a state directory this run created.
//!
//! While QEMU runs: SIGTERM/SIGINT ask the guest to power off over QMP, `quit` follows after
//! `--shutdown-timeout` (a second signal skips the wait), SIGKILL after that. If the LAN macvtap disappears,
//! QEMU is quit at once and the run fails, so systemd restarts the unit and the link is recreated.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::signal::unix::{SignalKind, signal};

use crate::error::{Error, Result};
use crate::launcher::accel::{self, Accel};
use crate::launcher::config::{BootTarget, LaunchConfig};
use crate::launcher::httpd::BootServer;
use crate::launcher::ipxe::{self, ScriptSpec};
use crate::launcher::linkwatch::LinkWatch;
use crate::launcher::qemu_args::{self, LanNic};
use crate::launcher::qmp::Qmp;
use crate::launcher::state::{self, StateDir};
use crate::macvtap::{self, OpenedTap};
use crate::tap;

/// The first fd number the LAN tap queues get in QEMU.
pub const FIRST_TAP_FD: i32 = 3;

/// How long `quit` gets before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(5);
/// How long one QMP exchange may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stop request waits for QEMU to open its QMP socket (it may have been spawned just now).
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything prepared for QEMU; dropping it stops the HTTP server and releases the lock.
struct Prepared {
    argv: Vec<String>,
    _http: Option<BootServer>,
}

/// SIGTERM and SIGINT, registered before any preparation so a stop request during it is not lost (nor fatal):
/// it is seen as soon as QEMU runs and stops it in order.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

pub fn run(cfg: &LaunchConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the supervisor runtime", e))?;
    let signals = {
        let _guard = rt.enter();
        StopSignals {
            term: signal(SignalKind::terminate()).map_err(|e| Error::io("handle SIGTERM", e))?,
            int: signal(SignalKind::interrupt()).map_err(|e| Error::io("handle SIGINT", e))?,
        }
    };
    let accel = accel::resolve(cfg.accel)?;
    // The lock comes before the LAN tap: a refused second run must not open (and so add a queue to) the
    // first guest's macvtap.
    let state = StateDir::create_and_lock(&cfg.state_dir)?;
    let started = open_lan(cfg)
        .and_then(|tap| prepare(cfg, accel, tap.as_ref()).map(|p| (p, tap)))
        .and_then(|(prepared, tap)| rt.block_on(start(cfg, &prepared, tap)).map(|s| (prepared, s)));
    let (prepared, started) = match started {
        Ok(x) => x,
        Err(e) => {
            state.abandon();
            return Err(e);
        }
    };
    let result = rt.block_on(supervise(cfg, started, signals));
    // Remove the socket while the lock is still held, so a successor's socket is never removed.
    remove_if_exists(&cfg.qmp_socket());
    drop(prepared);
    drop(state);
    result
}

fn open_lan(cfg: &LaunchConfig) -> Result<Option<OpenedTap>> {
    let Some(l) = &cfg.lan else { return Ok(None) };
    let t = macvtap::open(None, &l.interface, l.queues).map_err(|e| name_option(e, "--lan-interface"))?;
    tracing::info!(
        "LAN NIC on macvtap \"{}\" (ifindex {}, mac {}, {} queue(s) from {})",
        t.name,
        t.ifindex,
        t.mac,
        l.queues,
        t.node.display()
    );
    Ok(Some(t))
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
    }
}

fn prepare(cfg: &LaunchConfig, accel: Accel, tap: Option<&OpenedTap>) -> Result<Prepared> {
    let http = match &cfg.boot {
        BootTarget::Dir { dir, bind, port } => Some(BootServer::start(dir, *bind, *port)?),
        _ => None,
    };
    let spec = ScriptSpec::new(&cfg.boot, http.as_ref().map(|h| h.addr().port()), &cfg.dns, cfg.lan.is_some());
    match (cfg.dns.len(), spec.dns) {
        (0, _) => {}
        (_, None) => tracing::warn!("--dns: iPXE takes one IPv4 DNS server and none was given; using the DHCP one"),
        (1, Some(_)) => {}
        (_, Some(d)) => tracing::info!("--dns: iPXE takes one DNS server; using {d}"),
    }
    if let Some(url) = &spec.chain {
        tracing::info!("boot script chains to {url}");
    } else {
        tracing::info!("boot script: built-in diagnostics");
    }
    state::write_atomically(&cfg.boot_script(), ipxe::script(&spec).as_bytes())?;
    if let (Some(d), Some(img)) = (&cfg.disk, &cfg.qemu_img) {
        state::ensure_disk(img, &d.path, d.size)?;
    }
    remove_if_exists(&cfg.qmp_socket());
    let lan = tap.map(|t| LanNic { mac: t.mac, fds: (0..t.fds.len() as i32).map(|i| FIRST_TAP_FD + i).collect() });
    let argv = qemu_args::build(cfg, accel, lan.as_ref());
    Ok(Prepared { argv, _http: http })
}

fn remove_if_exists(p: &Path) {
    match std::fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("remove {}: {e}", p.display()),
    }
}

fn spawn(argv: &[String], tap: Option<OpenedTap>) -> Result<Child> {
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null());
    // Its own process group: a terminal's Ctrl-C reaches only the launcher, which then stops QEMU in order.
    cmd.process_group(0);
    let kept = match tap {
        Some(t) => {
            let n = t.fds.len();
            let (kept, placed) = tap::pass_fds_to_child(&mut cmd, t.fds, FIRST_TAP_FD)?;
            debug_assert_eq!(placed, (0..n as i32).map(|i| FIRST_TAP_FD + i).collect::<Vec<_>>());
            kept
        }
        None => Vec::new(),
    };
    tap::set_parent_death_signal(&mut cmd, Signal::SIGKILL);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| Error::io(format!("start QEMU {}", argv[0]), e))?;
    // QEMU has its copies of the tap fds now.
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

/// The running guest: QEMU, the LAN link watch and which link it watches.
struct Started {
    child: Child,
    watch: Option<LinkWatch>,
    lan: Option<(String, u32)>,
}

/// Subscribe to link removals (before QEMU starts, so none is missed) and spawn QEMU.
async fn start(cfg: &LaunchConfig, prepared: &Prepared, tap: Option<OpenedTap>) -> Result<Started> {
    let lan = tap.as_ref().map(|t| (t.name.to_string(), t.ifindex));
    let watch = match &lan {
        Some((_, ifindex)) => Some(LinkWatch::subscribe(*ifindex).await?),
        None => None,
    };
    tracing::debug!("QEMU argv: {:?}", prepared.argv);
    let child = spawn(&prepared.argv, tap)?;
    tracing::info!(
        "QEMU started (pid {}); serial console in {}",
        child.id().unwrap_or_default(),
        cfg.serial_log.display()
    );
    Ok(Started { child, watch, lan })
}

async fn supervise(cfg: &LaunchConfig, started: Started, signals: StopSignals) -> Result<()> {
    let StopSignals { term: mut sigterm, int: mut sigint } = signals;
    let Started { mut child, mut watch, lan } = started;
    let link_gone = async {
        match watch.as_mut() {
            Some(w) => w.gone().await,
            None => std::future::pending().await,
        }
    };
    enum Why {
        Signal(&'static str),
        LinkGone,
    }
    let why = tokio::select! {
        status = child.wait() => {
            let status = status.map_err(|e| Error::io("wait for QEMU", e))?;
            return if status.success() {
                tracing::info!("QEMU exited (the guest powered off)");
                Ok(())
            } else {
                Err(Error::Runtime(format!("QEMU failed: {}", describe(status))))
            };
        }
        _ = sigterm.recv() => Why::Signal("SIGTERM"),
        _ = sigint.recv() => Why::Signal("SIGINT"),
        () = link_gone => Why::LinkGone,
    };
    let qmp_path = cfg.qmp_socket();
    match why {
        Why::Signal(name) => {
            tracing::info!(
                "{name}: asking the guest to power off; QEMU quits in {} s if it has not",
                cfg.shutdown_timeout.as_secs()
            );
            let mut qmp = qmp_command(&qmp_path, None, "system_powerdown").await;
            let waited = tokio::select! {
                status = child.wait() => Some(status),
                () = tokio::time::sleep(cfg.shutdown_timeout) => None,
                _ = sigterm.recv() => { tracing::info!("second signal: quitting now"); None }
                _ = sigint.recv() => { tracing::info!("second signal: quitting now"); None }
            };
            if let Some(status) = waited {
                let status = status.map_err(|e| Error::io("wait for QEMU", e))?;
                if !status.success() {
                    return Err(Error::Runtime(format!("QEMU failed while stopping: {}", describe(status))));
                }
                tracing::info!("the guest powered off ({})", describe(status));
                return Ok(());
            }
            tracing::info!("quitting QEMU");
            qmp = qmp_command(&qmp_path, qmp, "quit").await;
            drop(qmp);
            match tokio::time::timeout(QUIT_GRACE, child.wait()).await {
                Ok(status) => {
                    let status = status.map_err(|e| Error::io("wait for QEMU", e))?;
                    if !status.success() {
                        return Err(Error::Runtime(format!("QEMU failed while quitting: {}", describe(status))));
                    }
                    tracing::info!("QEMU quit ({})", describe(status));
                    Ok(())
                }
                Err(_) => {
                    kill(&mut child).await;
                    Err(Error::Runtime(format!(
                        "QEMU did not quit within {} s after the stop request; killed it",
                        QUIT_GRACE.as_secs()
                    )))
                }
            }
        }
        Why::LinkGone => {
            let (name, ifindex) = lan.unwrap_or_default();
            tracing::error!("LAN macvtap \"{name}\" (ifindex {ifindex}) disappeared; stopping QEMU");
            let quick = Duration::from_millis(700);
            let _ = tokio::time::timeout(quick, qmp_command(&qmp_path, None, "quit")).await;
            if tokio::time::timeout(quick, child.wait()).await.is_err() {
                kill(&mut child).await;
            }
            Err(Error::Runtime(format!(
                "LAN macvtap \"{name}\" (ifindex {ifindex}) disappeared while the guest was running; stopped QEMU"
            )))
        }
    }
}

/// Run one QMP command, connecting first when needed; failures are logged, the connection kept for reuse.
async fn qmp_command(path: &Path, qmp: Option<Qmp>, command: &str) -> Option<Qmp> {
    let mut qmp = match qmp {
        Some(q) => q,
        None => match tokio::time::timeout(QMP_CONNECT_TIMEOUT, Qmp::connect_when_ready(path)).await {
            Ok(Ok(q)) => q,
            Ok(Err(e)) => {
                tracing::warn!("{e}");
                return None;
            }
            Err(_) => {
                tracing::warn!("QMP {}: not reachable within {} s", path.display(), QMP_CONNECT_TIMEOUT.as_secs());
                return None;
            }
        },
    };
    match tokio::time::timeout(QMP_TIMEOUT, qmp.execute(command)).await {
        Ok(Ok(_)) => Some(qmp),
        // `quit` may close the socket before the reply arrives; that is success too.
        Ok(Err(e)) if command == "quit" => {
            tracing::debug!("{e}");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!("{e}");
            Some(qmp)
        }
        Err(_) => {
            tracing::warn!("QMP {command}: no answer within {} s", QMP_TIMEOUT.as_secs());
            None
        }
    }
}

async fn kill(child: &mut Child) {
    tracing::warn!("killing QEMU (SIGKILL)");
    let _ = child.start_kill();
    let _ = child.wait().await;
}
