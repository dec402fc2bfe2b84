//! The supervisor's view of the boot: the boot watch's events become `status.json`, `sd_notify` messages
//! (`STATUS=`, `READY=1`, `STOPPING=1`) and log lines.

use std::net::IpAddr;
use std::time::Instant;

use crate::launcher::console::bootwatch::{BootFailure, Event, Stage};
use crate::launcher::notify::Notifier;
use crate::launcher::status::{RunStatus, StatusFile, now_rfc3339};

/// The supervisor's view of the boot: stage, readiness, addresses, the last failure.
pub(crate) struct Tracker {
    pub(crate) file: StatusFile,
    pub(crate) notify: Notifier,
    started: Instant,
}

impl Tracker {
    pub(crate) fn new(file: StatusFile, notify: Notifier) -> Tracker {
        Tracker { file, notify, started: Instant::now() }
    }

    pub(crate) fn status(&self) -> &RunStatus {
        &self.file.status
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.file.status.ready
    }

    pub(crate) fn stage(&self) -> Option<Stage> {
        self.file.status.stage
    }

    /// QEMU runs (it answered on QMP): the firmware stage begins.
    pub(crate) fn qemu_started(&mut self, qemu_pid: u32) {
        self.started = Instant::now();
        self.file.update(|s| {
            s.qemu_pid = Some(qemu_pid);
            s.started_at = now_rfc3339();
            s.stage = Some(Stage::Firmware);
            s.ready = false;
            s.ready_at = None;
            s.ended_at = None;
        });
        self.notify.status(&format!("firmware: QEMU started (pid {qemu_pid}), waiting for iPXE"));
    }

    /// One event of the boot watch.
    pub(crate) fn handle(&mut self, ev: Event) {
        match ev {
            Event::Stage(stage) => self.enter(stage),
            Event::Reset => {
                tracing::warn!("the guest started over (its firmware is running again)");
                self.file.update(|s| {
                    s.ready = false;
                    s.ready_at = None;
                    s.boot_address = None;
                    s.lan_address = None;
                });
            }
            Event::BootAddress(a) => self.file.update(|s| s.boot_address = Some(a.to_string())),
            Event::LanAddress(a) => self.lan_address(a),
            Event::Chain(url) => self.file.update(|s| s.boot_url = Some(url)),
            Event::Failure(f) => self.failure(&f),
            Event::Warning(w) => tracing::warn!("{w}"),
        }
    }

    fn lan_address(&mut self, a: IpAddr) {
        let a = a.to_string();
        if self.file.status.lan_address.as_deref() != Some(a.as_str()) {
            tracing::info!("the guest's LAN address is {a}");
            self.file.update(|s| s.lan_address = Some(a));
        }
    }

    fn failure(&mut self, f: &BootFailure) {
        tracing::error!("boot failure: {f}");
        let stage = self.stage().map_or("boot", Stage::as_str);
        let text = format!(
            "{stage}: failing: {}{}",
            f.what,
            f.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
        );
        self.notify.status(&text);
        self.file.update(|s| s.last_error = Some(f.to_string()));
    }

    fn enter(&mut self, stage: Stage) {
        let s = &self.file.status;
        let text = match stage {
            Stage::Firmware => "firmware: the guest's firmware is running".to_owned(),
            Stage::Ipxe => "ipxe: iPXE is running".to_owned(),
            Stage::Dhcp => format!("dhcp: the boot NIC has {}", s.boot_address.as_deref().unwrap_or("an address")),
            Stage::Chain => format!("chain: loading {}", s.boot_url.as_deref().unwrap_or("the boot URL")),
            Stage::Kernel => "kernel: the guest's kernel is booting".to_owned(),
            Stage::Ready => match &s.lan_address {
                Some(a) => format!("ready: the guest is up (LAN address {a})"),
                None => "ready: the guest is up".to_owned(),
            },
        };
        let secs = self.started.elapsed().as_secs_f64();
        tracing::info!("boot stage {text} ({secs:.1} s after QEMU started)");
        let ready = stage == Stage::Ready;
        self.file.update(|s| {
            s.stage = Some(stage);
            if ready {
                s.ready = true;
                s.ready_at = Some(now_rfc3339());
                s.last_error = None;
            }
        });
        if ready {
            self.notify.ready(&text);
        } else {
            self.notify.status(&text);
        }
    }

    /// A stop began.
    pub(crate) fn stopping(&mut self, why: &str) {
        self.notify.stopping(why);
    }

    /// The launcher is ending: QEMU is gone.
    pub(crate) fn ended(&mut self) {
        self.file.update(|s| {
            s.qemu_pid = None;
            s.ended_at = Some(now_rfc3339());
        });
        self.file.close();
    }
}
