//! The service manager protocol (`sd_notify`, through the `sd-notify` crate): `STATUS=` at every boot stage,
//! `READY=1` once the guest is ready (so `Type=notify` makes `systemctl start` wait for a booted guest),
//! `STOPPING=1` on a stop, and `WATCHDOG=1` while QMP reports the guest running when the unit has
//! `WatchdogSec=`. Without `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

pub(super) struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    ready_sent: bool,
    failed: bool,
}

impl Notifier {
    /// From the environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub(super) fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
            ready_sent: false,
            failed: false,
        }
    }

    /// How often to send `WATCHDOG=1` (half the unit's `WatchdogSec=`), when the watchdog is on.
    pub(super) fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled).map(|d| d / 2)
    }

    fn send(&mut self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        match sd_notify::notify(states) {
            Ok(()) => self.failed = false,
            Err(e) if !self.failed => {
                self.failed = true;
                tracing::warn!("sd_notify to $NOTIFY_SOCKET: {e}");
            }
            Err(_) => {}
        }
    }

    pub(super) fn status(&mut self, text: &str) {
        self.send(&[NotifyState::Status(text)]);
    }

    /// `READY=1` (once per run) with a status line, and `RESTART_RESET=1`: a guest that came up resets the
    /// unit's restart counter (systemd >= 258), so the next crash of a healthy guest restarts after the first
    /// `RestartSec=` step, not after the backoff a run of failed starts built up (older systemd ignores it).
    pub(super) fn ready(&mut self, text: &str) {
        if self.ready_sent {
            self.status(text);
            return;
        }
        self.ready_sent = true;
        self.send(&[NotifyState::Ready, NotifyState::Custom("RESTART_RESET=1"), NotifyState::Status(text)]);
    }

    pub(super) fn stopping(&mut self, text: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(text)]);
    }

    pub(super) fn watchdog(&mut self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// Variables QEMU must not inherit: it is not the unit's main process.
pub(super) const CHILD_ENV_REMOVE: [&str; 4] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS"];
