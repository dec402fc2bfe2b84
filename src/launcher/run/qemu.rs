//! Starting QEMU: spawn it with its fds, tail its stderr, wait for its QMP handshake, and say why it failed
//! when it exits before or after that (a rejected command line, a KVM failure, a plain failure).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use super::prepare::{OpenedLan, Prepared};
use super::stop::{self, StopSignals, describe};
use super::tracker::Tracker;
use crate::error::{Error, Result};
use crate::launcher::accel::Accel;
use crate::launcher::config::LaunchConfig;
use crate::launcher::console::Console;
use crate::launcher::console::banner;
use crate::launcher::console::bootwatch::{BootWatch, Event};
use crate::launcher::console::sink::{BootFeed, GuestSink};
use crate::launcher::linkwatch::LinkWatch;
use crate::launcher::notify;
use crate::launcher::qemu_args::{FIRST_FD, FdPlan};
use crate::launcher::qmp::{Qmp, QmpClient, QmpEvent};
use crate::tap;

/// How long QEMU may take from spawn to answering its first QMP command.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// QEMU's last stderr lines kept for error messages.
const STDERR_TAIL: usize = 8;

/// How a run that got as far as spawning QEMU failed: `Rejected` (QEMU exited before the guest ran, e.g. it
/// refused its command line or found its disk locked, so the run's directories go) or anything else.
pub(super) enum RunFailure {
    Rejected(Error),
    Other(Error),
}

impl From<Error> for RunFailure {
    fn from(e: Error) -> Self {
        RunFailure::Other(e)
    }
}

/// The running guest: QEMU, the launcher's QMP connection and events, the LAN link watch and the console.
pub(super) struct Guest {
    pub(super) child: Child,
    pub(super) qmp: QmpClient,
    pub(super) events: UnboundedReceiver<QmpEvent>,
    pub(super) watch: Option<LinkWatch>,
    /// The LAN macvtap's name and ifindex.
    pub(super) lan: Option<(String, u32)>,
    pub(super) stderr: Stderr,
    /// The console broker (dropped: stopped).
    pub(super) console: Console,
    /// The boot watch (QEMU's RESET event starts it over) and what it saw on the console.
    pub(super) boot_feed: BootFeed,
    pub(super) boot: UnboundedReceiver<Event>,
}

/// QEMU's stderr: every line goes on to ours (prefixed), the last few are kept for error messages.
pub(super) struct Stderr {
    tail: Arc<Mutex<VecDeque<String>>>,
    task: JoinHandle<()>,
}

impl Stderr {
    fn forward(stderr: ChildStderr) -> Stderr {
        let tail = Arc::new(Mutex::new(VecDeque::new()));
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
        Stderr { tail, task }
    }

    /// QEMU exited: wait (briefly) for its last words.
    async fn finish(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.task).await;
    }

    fn text(&self) -> String {
        self.tail.lock().map(|t| t.iter().map(String::as_str).collect::<Vec<_>>().join("; ")).unwrap_or_default()
    }
}

/// Start QEMU with the fds of [`FdPlan`], in its order: tap queues, vhost-net fds, QMP, serial.
fn spawn(argv: &[String], lan: Option<OpenedLan>, qmp: OwnedFd, serial: OwnedFd, plan: &FdPlan) -> Result<Child> {
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null()).stderr(Stdio::piped());
    // The unit's main process is the launcher: QEMU must not talk to the service manager.
    for v in notify::CHILD_ENV_REMOVE {
        cmd.env_remove(v);
    }
    // Its own process group: a terminal's Ctrl-C reaches only the launcher, which then stops QEMU in order.
    cmd.process_group(0);
    let mut fds: Vec<OwnedFd> = lan.map(|l| l.tap.fds.into_iter().chain(l.vhost.fds).collect()).unwrap_or_default();
    fds.push(qmp);
    fds.push(serial);
    let (kept, placed) = tap::pass_fds_to_child(&mut cmd, fds, FIRST_FD)?;
    debug_assert_eq!(placed.last().copied(), Some(plan.serial));
    debug_assert_eq!(placed.iter().rev().nth(1).copied(), Some(plan.qmp));
    tap::set_parent_death_signal(&mut cmd, Signal::SIGKILL);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| Error::io(format!("start QEMU {}", argv[0]), e))?;
    // QEMU has its copies of the tap and vhost-net fds and of its ends of the socket pairs now.
    drop(kept);
    Ok(child)
}

/// Subscribe to link removals (before QEMU starts, so none is missed), spawn QEMU and wait until it answers
/// on QMP (it has then accepted its command line). `Ok(None)`: QEMU is gone already, and that is no failure
/// (a stop request came first, or it exited at once with success).
pub(super) async fn start(
    cfg: &LaunchConfig,
    accel: Accel,
    prepared: &mut Prepared,
    lan_fds: Option<OpenedLan>,
    signals: &mut StopSignals,
    tracker: &mut Tracker,
) -> Result<Option<Guest>, RunFailure> {
    let lan = lan_fds.as_ref().map(|l| (l.tap.name.to_string(), l.tap.ifindex));
    let watch = match &lan {
        Some((_, ifindex)) => Some(LinkWatch::subscribe(*ifindex).await?),
        None => None,
    };
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| Error::io("create the QMP socket pair", e))?;
    let parts = prepared.console.take().ok_or_else(|| Error::Runtime("the guest console is gone".into()))?;
    tracing::debug!("QEMU argv: {:?}", prepared.argv);
    let mut child = spawn(&prepared.argv, lan_fds, OwnedFd::from(theirs), parts.theirs, &prepared.fds)?;
    let pid = child.id().unwrap_or_default();
    let stderr = child.stderr.take().ok_or_else(|| Error::Runtime("QEMU's stderr is not a pipe".into()))?;
    let mut stderr = Stderr::forward(stderr);
    // The console is read from the first byte on, so QEMU never waits on its serial port.
    let (boot_tx, boot) = tokio::sync::mpsc::unbounded_channel();
    // The NIC option ROM's Ctrl-B banner would hold the boot for 2-3 s: watch for it on the default path.
    let (spotter, banner_seen) = cfg.ipxe.is_none().then(banner::spotter).unzip();
    let boot_feed = BootFeed::new(BootWatch::new(cfg.ready_pattern.clone(), cfg.memory_mib), boot_tx);
    let sink = GuestSink::new(boot_feed.clone(), spotter);
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
            return exited_early(cfg, pid, status, &mut stderr, accel).await;
        }
        sig = signals.recv() => {
            tracing::info!("{sig} while QEMU was starting: stopping it");
            stop::stop_quick(&mut child, &QmpClient::closed()).await;
            return Ok(None);
        }
    };
    let (qmp, events, status) = match up {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            // The connection failed: QEMU is most likely exiting; its status and message say why.
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                return exited_early(cfg, pid, status, &mut stderr, accel).await;
            }
            stop::Process::kill(&mut child).await;
            return Err(Error::Runtime(format!("QEMU (pid {pid}) did not answer on QMP: {e}; killed it")).into());
        }
        Err(_) => {
            stop::Process::kill(&mut child).await;
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
    // QEMU bound qmp.sock under the launcher's umask (077): owner only; 0600 as documented. Off the event
    // loop, like all file I/O (the state directory may be on a slow file system).
    let qmp_socket = cfg.qmp_socket();
    let chmod = tokio::task::spawn_blocking(move || {
        std::fs::set_permissions(&qmp_socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| format!("chmod 0600 {}: {e}", qmp_socket.display()))
    });
    if let Ok(Err(e)) = chmod.await {
        tracing::warn!("{e}");
    }
    tracker.qemu_started(pid);
    Ok(Some(Guest { child, qmp, events, watch, lan, stderr, console, boot_feed, boot }))
}

/// QEMU exited before it answered on QMP. Success: it is simply gone. Otherwise its command line (or
/// something it names) was refused; or, under KVM, the accelerator failed.
async fn exited_early(
    cfg: &LaunchConfig,
    pid: u32,
    status: ExitStatus,
    stderr: &mut Stderr,
    accel: Accel,
) -> Result<Option<Guest>, RunFailure> {
    stderr.finish().await;
    if status.success() {
        tracing::info!("QEMU exited at once ({})", describe(status));
        return Ok(None);
    }
    if let Some(e) = kvm_failure(stderr, status, accel) {
        return Err(RunFailure::Other(e));
    }
    if status.signal().is_some() {
        return Err(RunFailure::Other(Error::Runtime(format!("QEMU died while starting: {}", describe(status)))));
    }
    let msg = stderr.text();
    let msg = if msg.is_empty() { format!("QEMU exited with {}", describe(status)) } else { msg };
    let disk = cfg.disk.as_ref().map(|d| d.path.clone());
    // Looking for the disk's holders scans /proc: off the event loop.
    let error = tokio::task::spawn_blocking(move || early_failure(&msg, disk.as_deref(), &[pid as i32])).await;
    Err(RunFailure::Rejected(error.unwrap_or_else(|e| Error::Runtime(format!("QEMU exited early ({e})")))))
}

/// What QEMU's last words at start mean. Exit 2 (a restart cannot help) is kept for what is wrong with the
/// command line itself; a resource someone else holds is exit 4 (the unit retries), a refused file 5, a
/// missing one 3, a shortage of memory or space 1.
fn early_failure(msg: &str, disk: Option<&Path>, ours: &[i32]) -> Error {
    let lower = msg.to_ascii_lowercase();
    if lower.contains("failed to get") && lower.contains("lock") {
        let Some(disk) = disk else { return Error::conflict("QEMU", format!("an image it opens is locked: {msg}")) };
        let holders = crate::launcher::private::file_holders(disk, ours);
        let who = if holders.is_empty() {
            "another process (not visible from here)".to_owned()
        } else {
            crate::tap::describe_holders(&holders)
        };
        return Error::conflict(
            format!("--disk \"{}\"", disk.display()),
            format!("is locked by {who}, which has it open; the run fails for now and is retried (QEMU: {msg})"),
        );
    }
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    if has(&["address already in use", "could not set up host forwarding rule", "device or resource busy"]) {
        return Error::conflict("QEMU", format!("a resource it needs is in use: {msg}"));
    }
    if has(&["permission denied", "operation not permitted"]) {
        return Error::unusable(crate::error::Kind::Permission, "QEMU", format!("was refused access: {msg}"));
    }
    if has(&["no such file or directory"]) {
        return Error::unusable(crate::error::Kind::NotFound, "QEMU", format!("a file it needs is missing: {msg}"));
    }
    if has(&["cannot allocate memory", "out of memory", "no space left", "resource temporarily unavailable"]) {
        return Error::Runtime(format!("QEMU failed to start: {msg}"));
    }
    Error::invalid("QEMU rejected its command line", msg)
}

impl Guest {
    /// QEMU exited by itself while the guest ran.
    pub(super) async fn exited(&mut self, status: std::io::Result<ExitStatus>, accel: Accel) -> Result<()> {
        let status = status.map_err(|e| Error::io("wait for QEMU", e))?;
        self.stderr.finish().await;
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
        if let Some(e) = kvm_failure(&self.stderr, status, accel) {
            return Err(e);
        }
        let tail = self.stderr.text();
        let tail = if tail.is_empty() { String::new() } else { format!(" ({tail})") };
        Err(Error::Runtime(format!("QEMU failed: {}{tail}", describe(status))))
    }
}

/// Under KVM, a QEMU that failed with KVM in its last words (e.g. "kvm_buf_set_msrs: Assertion ... failed",
/// "KVM internal error"): say so, with what to do.
fn kvm_failure(stderr: &Stderr, status: ExitStatus, accel: Accel) -> Option<Error> {
    let msg = stderr.text();
    (accel == Accel::Kvm && msg.to_ascii_lowercase().contains("kvm")).then(|| {
        Error::Runtime(format!(
            "QEMU failed ({}: {msg}): the KVM accelerator failed; try --accel tcg",
            describe(status)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit of QEMU's start failures: exit 2 only for what is wrong with the command line.
    #[test]
    fn start_failures_map_to_what_a_restart_can_change() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("d.qcow2");
        std::fs::write(&disk, "x").unwrap();
        let code = |msg: &str| early_failure(msg, Some(&disk), &[]).exit_code();
        let e = early_failure(
            "qemu-system-x86_64: -drive if=none,id=disk0,file=/x: Failed to get \"write\" lock; Is another process using the image [/x]?",
            Some(&disk),
            &[],
        );
        assert_eq!(e.exit_code(), 4);
        assert!(e.to_string().starts_with(&format!("--disk \"{}\": is locked by ", disk.display())), "{e}");
        assert_eq!(code("Failed to get shared \"write\" lock"), 4);
        assert_eq!(code("Could not set up host forwarding rule 'tcp::2222-:22'"), 4);
        assert_eq!(code("-chardev socket,id=qmp,path=/s/qmp.sock: Failed to bind socket: Address already in use"), 4);
        assert_eq!(code("-kernel /x: Could not open '/x': Permission denied"), 5);
        assert_eq!(code("Could not open '/usr/share/qemu/efi-virtio.rom': No such file or directory"), 3);
        assert_eq!(code("cannot set up guest memory 'pc.ram': Cannot allocate memory"), 1);
        assert_eq!(code("-foo: invalid option"), 2);
        assert_eq!(code("-device virtio: 'virtio' is not a valid device model name"), 2);
        assert!(
            early_failure("-foo: invalid option", None, &[]).to_string().starts_with("QEMU rejected its command line")
        );
    }
}
