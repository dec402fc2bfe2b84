//! `run`: prepare everything, start QEMU as a supervised child and stay with it until it exits.
//!
//! Order matters so that bad input and early failures leave nothing behind: the configuration is validated
//! first (in [`LaunchConfig::from_options`]), then the accelerator is resolved and the `--host-forward` ports are
//! checked, then the state directory is created and locked, then the LAN link is locked (one launcher per
//! macvtap) and only then is its tap opened (a refused second run never touches the first guest's macvtap). A
//! failure before the guest runs, including a QEMU that rejects its command line, removes what this run
//! created.
//!
//! The launcher keeps its own QMP connection to QEMU (one end of a socket pair; operators get `qmp.sock`) from
//! start to end and listens to its events: a STOP it did not ask for, an internal error (KVM) or a guest panic
//! ends the run with exit 1 at once. A stop request (SIGTERM/SIGINT/SIGHUP) goes: powerdown, `quit` after
//! `--shutdown-timeout`, SIGTERM to QEMU, SIGKILL last; QEMU's exit and a further signal (which skips to the
//! next step) are noticed at every step. A stop requested while preparing never starts QEMU. If the LAN
//! macvtap disappears (or can no longer be watched), QEMU is stopped at once and the run fails, so systemd
//! restarts the unit and the link is recreated.
//!
//! The guest console belongs to the launcher ([`console`](super::console)): QEMU's serial port is a socket
//! pair, the launcher logs each console line as `guest: LINE`, keeps `serial.log` and serves `console.sock`.
//! The boot watch follows the boot stages on it ([`bootwatch`](super::console::bootwatch)); the [`Tracker`] keeps
//! `status.json` and tells the service manager (`STATUS=`, `READY=1`, `WATCHDOG=1`). A stop before the guest
//! is ready quits QEMU at once (firmware and iPXE ignore ACPI power-off); after it, the guest gets its power-off
//! and `--shutdown-timeout`. A guest not ready within `--ready-timeout` ends the run with exit 1.

//!
//! The parts, in the order a run meets them: [`prepare`], [`qemu`] (spawn and handshake), [`watch`] (the event
//! loop and [`StopReason`](watch::StopReason)), [`stop`] (the stop ladder) and [`tracker`] (events to
//! `status.json` and the service manager).

use crate::bootcache::BootSource;
use crate::error::{Error, Result};
use crate::launcher::accel;
use crate::launcher::config::{BootTarget, LaunchConfig};
use crate::launcher::notify::Notifier;
use crate::launcher::statedir::StateDir;
use crate::launcher::status::{RunStatus, StatusFile};

mod prepare;
mod qemu;
mod stop;
mod tracker;
mod watch;

use prepare::remove_socket;
use qemu::RunFailure;
use stop::StopSignals;
use tracker::Tracker;

/// Threads for tokio's blocking pool (file reads of the boot HTTP server).
const BLOCKING_THREADS: usize = 2;
/// How long the end of a run waits for the runtime's blocking tasks before the state directory's lock goes.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(2);

/// `ec-ipxe-qemu run`: the whole life of one guest.
pub(crate) fn run(cfg: &LaunchConfig) -> Result<()> {
    // Whatever the caller's umask, nothing the launcher, qemu-img or QEMU creates is open to group or others
    // (files with a documented mode get it explicitly).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
        .map_err(|e| Error::io("start the supervisor runtime", e))?;
    let mut signals = {
        let _guard = rt.enter();
        StopSignals::new()?
    };
    let mut notify = Notifier::from_env();
    notify.status("preparing: checking the configuration and the state directory");
    let accel = accel::resolve(cfg.accel)?;
    // Nothing is created when QEMU's command line could not be executed (the LAN NIC adds a few short
    // arguments only).
    crate::launcher::run_argv_fits(cfg, accel)?;
    prepare::check_host_forwards(&cfg.host_forwards)?;
    // The locks come before the LAN tap: a refused second run must not open (and so add a queue to) the
    // first guest's macvtap.
    let state = StateDir::create_and_lock(&cfg.state_dir)?;
    // What a killed run left behind: temporary files, a half-created disk.
    crate::launcher::private::remove_leftovers(&cfg.state_dir);
    crate::launcher::private::remove_leftovers(&cfg.tftp_dir());
    if let Some(d) = cfg.disk.as_ref().filter(|d| !d.path.starts_with(&cfg.state_dir)) {
        crate::launcher::private::remove_leftovers_of(&d.path);
    }
    let prepared = prepare::lock_lan(cfg).and_then(|lock| {
        let tap = prepare::open_lan(cfg, lock.as_ref())?;
        let _guard = rt.enter();
        let prepared = prepare::prepare(cfg, accel, tap.as_ref())?;
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
        remove_socket(&cfg.qmp_socket());
        remove_socket(&cfg.console_socket());
        return Ok(());
    }
    let status = RunStatus {
        pid: std::process::id(),
        boot_url: match &prepared.cache {
            Some(c) => Some(c.boot_url().url.clone()),
            None => prepared.chain.clone(),
        },
        lan_interface: tap.as_ref().map(|l| l.tap.name.to_string()),
        lan_mac: tap.as_ref().map(|l| l.tap.mac.to_string()),
        accel: accel.as_str().to_owned(),
        vhost: tap.as_ref().map_or("off", |l| l.vhost.as_str()).to_owned(),
        boot_source: match (&cfg.boot, &prepared.cache) {
            (_, Some(_)) => Some(BootSource::Origin),
            (BootTarget::Url(u), None) if matches!(u.scheme(), "http" | "https") => Some(BootSource::Direct),
            _ => None,
        },
        credentials: crate::launcher::credentials::names(&cfg.credentials),
        ..RunStatus::default()
    };
    let mut tracker = Tracker::new(StatusFile::new(&cfg.state_dir, status), notify).with_cache(prepared.cache.clone());
    tracker.http = prepared.http_progress();
    let result = rt.block_on(async {
        let guest = match qemu::start(cfg, accel, &mut prepared, tap, &mut signals, &mut tracker).await {
            Ok(Some(g)) => g,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e),
        };
        watch::supervise(cfg, accel, guest, &mut signals, &mut tracker).await
    });
    tracker.ended();
    // Remove the sockets while the lock is still held, so a successor's sockets are never removed.
    remove_socket(&cfg.qmp_socket());
    remove_socket(&cfg.console_socket());
    // The boot cache's request threads may still be downloading: no write of theirs after this.
    if let Some(c) = &prepared.cache {
        c.close();
    }
    drop(prepared);
    // The runtime's blocking tasks (file writes) end before the state directory's lock goes; one stuck on a
    // hung file system is abandoned after a bound (the process ends right after).
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Err(RunFailure::Rejected(e)) => {
            state.abandon();
            Err(e)
        }
        Err(RunFailure::Other(e)) => Err(e),
        Ok(()) => Ok(()),
    }
}
