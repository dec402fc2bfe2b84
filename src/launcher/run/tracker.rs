//! The supervisor's view of the boot: the boot watch's events become `status.json`, `sd_notify` messages
//! (`STATUS=`, `READY=1`, `STOPPING=1`) and log lines.

use std::net::IpAddr;
use std::time::Instant;

use crate::bootcache::{BootCache, BootSource, Counters};
use crate::launcher::console::bootwatch::{BootFailure, Event, Stage};
use crate::launcher::httpd::Progress;
use crate::launcher::layout::usernet;
use crate::launcher::notify::Notifier;
use crate::launcher::status::{Download, RunStatus, StatusFile, now_rfc3339};

/// The supervisor's view of the boot: stage, readiness, addresses, the last failure.
pub(crate) struct Tracker {
    pub(crate) file: StatusFile,
    pub(crate) notify: Notifier,
    started: Instant,
    /// The boot cache (`--boot-cache on`).
    cache: Option<BootCache>,
    /// The `--boot-dir` server's progress, when it serves the boot.
    pub(crate) http: Option<Progress>,
    /// The file iPXE shows progress for, and when it first did.
    ipxe_download: Option<(String, Instant)>,
}

impl Tracker {
    pub(crate) fn new(file: StatusFile, notify: Notifier) -> Tracker {
        Tracker { file, notify, started: Instant::now(), cache: None, http: None, ipxe_download: None }
    }

    /// Report the boot cache's state in `status.json` and the stage line.
    pub(crate) fn with_cache(mut self, cache: Option<BootCache>) -> Tracker {
        self.cache = cache;
        self
    }

    /// A new boot (QEMU started, or the guest started over): the cache's counters start from zero.
    fn begin_boot(&mut self) {
        if let Some(c) = &self.cache {
            c.begin_boot();
        }
        self.refresh_cache();
    }

    /// Copy the cache's counters and the file being sent into `status.json` (written only when they changed;
    /// called at most about once a second while a file is sent). When the boot turns to the last good set,
    /// the stage line says so once, with the origin's error.
    pub(crate) fn refresh_cache(&mut self) {
        let Some(c) = &self.cache else { return };
        let snap = c.snapshot();
        let was = self.file.status.boot_source;
        // The cache's byte counts win over iPXE's percentage; when no file is being sent, only a download
        // the cache reported is cleared (iPXE's own progress lines keep theirs).
        let download = match snap.download {
            Some(d) => Some(Download::counted(d.file, d.bytes, d.total)),
            None if self.file.status.download.as_ref().is_some_and(|d| d.bytes.is_some()) => None,
            None => self.file.status.download.clone(),
        };
        self.file.update(|s| {
            s.boot_source = Some(snap.boot_source);
            s.boot_cache = Some(snap.boot_cache.clone());
            s.download = download;
            s.not_cached = snap.not_cached.clone();
        });
        if snap.boot_source == BootSource::Cache && was != Some(BootSource::Cache) {
            let stage = self.stage().map_or("boot", Stage::as_str);
            self.notify.status(&format!("{stage}: booting from cache{}", from_cache_reason(&snap.boot_cache)));
        }
    }

    /// ", from cache (origin: ERROR)" when the boot uses the last good set.
    fn cache_note(&self) -> String {
        match &self.cache {
            Some(c) => {
                let snap = c.snapshot();
                if snap.boot_source == BootSource::Cache {
                    format!(", from cache{}", from_cache_reason(&snap.boot_cache))
                } else {
                    String::new()
                }
            }
            None => String::new(),
        }
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
        self.begin_boot();
        self.notify.status(&format!("firmware: QEMU started (pid {qemu_pid}), waiting for iPXE"));
    }

    /// One event of the boot watch.
    pub(crate) fn handle(&mut self, ev: Event) {
        match ev {
            Event::Stage(stage) => self.enter(stage),
            Event::Reset => {
                tracing::warn!("the guest started over (its firmware is running again)");
                // The stage goes back in the same write, so status.json never shows `ready` with ready false
                // (the Stage(Firmware) event that follows may wait behind other work of the supervisor).
                self.file.update(|s| {
                    s.stage = Some(Stage::Firmware);
                    s.ready = false;
                    s.ready_at = None;
                    s.boot_address = None;
                    s.lan_address = None;
                    s.download = None;
                });
                self.begin_boot();
            }
            Event::BootAddress(a) => self.file.update(|s| s.boot_address = Some(a.to_string())),
            Event::LanAddress(a) => self.lan_address(a),
            // Through the cache iPXE chains to the loopback server: the status names the origin.
            Event::Chain(url) => {
                let url = match &self.cache {
                    Some(c) if url.starts_with(&format!("http://{}:", usernet::HOST)) => c.boot_url().url.clone(),
                    _ => url,
                };
                self.file.update(|s| s.boot_url = Some(url));
            }
            Event::Failure(f) => self.failure(&f),
            Event::Warning(w) => tracing::warn!("{w}"),
            Event::Download { file, percent } => self.ipxe_progress(file, percent),
            Event::Downloaded(file) => self.ipxe_done(&file),
        }
    }

    /// Whether downloads are worth polling the boot server for: it serves the boot and no kernel runs yet.
    pub(crate) fn watching_downloads(&self) -> bool {
        self.http.is_some() && self.stage().is_some_and(|s| s < Stage::Kernel)
    }

    /// The boot server's byte counts into `download` (they win over iPXE's percentage).
    pub(crate) fn poll_http(&mut self) {
        let Some(http) = &self.http else { return };
        let t = http.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let d = t.map(|t| Download::counted(t.file, t.bytes, Some(t.total)));
        let current = &self.file.status.download;
        // Done on the server side: clear only what the server put there.
        if d.is_none() && current.as_ref().is_none_or(|c| c.bytes.is_none()) {
            return;
        }
        if *current != d {
            self.file.update(|s| s.download = d);
        }
    }

    fn ipxe_progress(&mut self, file: String, percent: u8) {
        if self.ipxe_download.as_ref().is_none_or(|(f, _)| *f != file) {
            self.ipxe_download = Some((file.clone(), Instant::now()));
        }
        // The boot server's counts, when it serves this file, are the better figures.
        if self.file.status.download.as_ref().is_some_and(|d| d.bytes.is_some()) {
            return;
        }
        let d = Some(Download { file, bytes: None, total: None, percent: Some(percent) });
        if self.file.status.download != d {
            self.file.update(|s| s.download = d);
        }
    }

    fn ipxe_done(&mut self, file: &str) {
        if let Some((f, since)) = self.ipxe_download.take_if(|(f, _)| f == file) {
            // The boot server logs its own files with their size; for another server iPXE tells no size.
            if self.http.is_none() {
                tracing::info!(
                    "downloaded {f} in {:.2} s (iPXE's progress; the size is not shown)",
                    since.elapsed().as_secs_f64()
                );
            }
        }
        if self.file.status.download.is_some() {
            self.file.update(|s| s.download = None);
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
            Stage::Chain => format!(
                "chain: loading {}{}",
                s.boot_url.as_deref().unwrap_or("the boot URL"),
                if self.cache.is_some() { " through the boot cache" } else { "" }
            ),
            Stage::Kernel => "kernel: the guest's kernel is booting".to_owned(),
            Stage::Ready => match &s.lan_address {
                Some(a) => format!("ready: the guest is up (LAN address {a})"),
                None => "ready: the guest is up".to_owned(),
            },
        };
        self.refresh_cache();
        let text = if matches!(stage, Stage::Chain | Stage::Kernel | Stage::Ready) {
            format!("{text}{}", self.cache_note())
        } else {
            text
        };
        let secs = self.started.elapsed().as_secs_f64();
        tracing::info!("boot stage {text} ({secs:.1} s after QEMU started)");
        let ready = stage == Stage::Ready;
        self.file.update(|s| {
            s.stage = Some(stage);
            if stage >= Stage::Kernel {
                s.download = None;
            }
            if ready {
                s.ready = true;
                s.ready_at = Some(now_rfc3339());
                s.last_error = None;
            }
        });
        if ready && let Some(c) = &self.cache {
            let c = c.clone();
            // The files of this boot become the last good set: disk work, on a blocking thread, for this
            // boot only (a reboot meanwhile makes it a no-op).
            let boot = c.boot();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = c.mark_good_of("ready", boot) {
                    tracing::warn!("boot cache: cannot record the last good set: {e}");
                }
            });
        }
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

/// " (the origin failed: ERROR)" for the stage line.
fn from_cache_reason(c: &Counters) -> String {
    c.origin_error.as_deref().map(|e| format!(" (the origin failed: {e})")).unwrap_or_default()
}
