//! The sink of the console broker: [`GuestSink`] logs each clean line as `guest: LINE` (rate-limited), feeds
//! every byte to the Ctrl-B banner spotter and every line to the boot watch. The boot watch sits in a
//! [`BootFeed`], shared with the supervisor so that QEMU's RESET event (a reboot the console may not show)
//! starts the stages over; its events reach the supervisor's tracker in order, through one channel.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::launcher::console::LineSink;
use crate::launcher::console::banner::Spotter;
use crate::launcher::console::bootwatch::{BootWatch, Event, Stage};
use crate::launcher::console::lines::{RateLimit, Summary, Verdict};

/// Guest lines logged at once before the rate limit applies, and per second after.
const LOG_BURST: u32 = 200;
const LOG_PER_SEC: u32 = 50;
/// A suppression episode ends when no line has been left out for this long.
const EPISODE_QUIET: Duration = Duration::from_secs(1);

/// The boot watch and where its events go, shared by the console sink (lines) and the supervisor (QEMU's
/// RESET event).
#[derive(Clone)]
pub(crate) struct BootFeed(Arc<Mutex<Feed>>);

struct Feed {
    watch: BootWatch,
    events: UnboundedSender<Event>,
}

impl BootFeed {
    pub(crate) fn new(watch: BootWatch, events: UnboundedSender<Event>) -> BootFeed {
        BootFeed(Arc::new(Mutex::new(Feed { watch, events })))
    }

    fn lock(&self) -> MutexGuard<'_, Feed> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One clean console line. The events are sent under the lock, so they stay in order with a reset's.
    pub(crate) fn line(&self, line: &str) {
        let mut f = self.lock();
        for ev in f.watch.line(line) {
            let _ = f.events.send(ev);
        }
    }

    /// The console was reset (`ESC c`): a kernel taking over, once iPXE ran.
    pub(crate) fn screen_reset(&self) {
        let mut f = self.lock();
        for ev in f.watch.screen_reset() {
            let _ = f.events.send(ev);
        }
    }

    /// The unfinished console line changed (iPXE's download progress).
    pub(crate) fn partial(&self, text: &str) {
        let mut f = self.lock();
        if let Some(ev) = f.watch.partial(text) {
            let _ = f.events.send(ev);
        }
    }

    /// QEMU reset the guest (its RESET event): the stages start over.
    pub(crate) fn reset(&self) {
        let mut f = self.lock();
        for ev in f.watch.reset() {
            let _ = f.events.send(ev);
        }
    }

    pub(crate) fn stage(&self) -> Stage {
        self.lock().watch.stage()
    }
}

pub(crate) struct GuestSink {
    boot: BootFeed,
    rate: RateLimit,
    banner: Option<Spotter>,
    /// The unfinished line last handed to the boot watch.
    partial: String,
}

impl GuestSink {
    /// `banner`: on the default boot path, the watch for the NIC ROM's Ctrl-B banner (see [`super::banner`]).
    pub(crate) fn new(boot: BootFeed, banner: Option<Spotter>) -> GuestSink {
        GuestSink { boot, rate: RateLimit::new(LOG_BURST, LOG_PER_SEC), banner, partial: String::new() }
    }

    fn suppressed(s: Summary) {
        tracing::warn!(
            "{} guest console lines suppressed in {:.1} s (the log takes {LOG_BURST} at once, then \
             {LOG_PER_SEC} per second); serial.log and the console have them",
            s.suppressed,
            s.secs
        );
    }
}

impl LineSink for GuestSink {
    fn bytes(&mut self, chunk: &[u8]) {
        if let Some(b) = &mut self.banner {
            b.feed(chunk);
        }
    }

    fn line(&mut self, line: String) {
        self.partial.clear();
        if !line.is_empty() {
            let now = Instant::now();
            if let Some(s) = self.rate.ended(now, EPISODE_QUIET) {
                Self::suppressed(s);
            }
            if self.rate.check(now) == Verdict::Log {
                tracing::info!("guest: {line}");
            }
        }
        self.boot.line(&line);
    }

    fn screen_reset(&mut self) {
        self.boot.screen_reset();
    }

    fn partial(&mut self, text: &str) {
        if text != self.partial {
            text.clone_into(&mut self.partial);
            self.boot.partial(text);
        }
    }

    fn tick(&mut self) {
        if let Some(s) = self.rate.ended(Instant::now(), EPISODE_QUIET) {
            Self::suppressed(s);
        }
    }

    fn finish(&mut self) {
        if let Some(s) = self.rate.finish() {
            Self::suppressed(s);
        }
    }

    fn join_wrapped(&self) -> bool {
        self.boot.stage() < Stage::Kernel
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::console::bootwatch::default_ready_pattern;

    #[test]
    fn a_reset_starts_the_stages_over_in_order_with_the_lines() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let feed = BootFeed::new(BootWatch::new(regex::Regex::new(&default_ready_pattern()).unwrap(), 256), tx);
        feed.reset();
        assert!(rx.try_recv().is_err(), "a reset in the firmware stage changes nothing");
        feed.line("iPXE 1.21.1+ -- Open Source Network Boot Firmware -- https://ipxe.org");
        assert_eq!(feed.stage(), Stage::Ipxe);
        feed.reset();
        feed.line("iPXE 1.21.1+ -- Open Source Network Boot Firmware -- https://ipxe.org");
        let got: Vec<Event> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got,
            [Event::Stage(Stage::Ipxe), Event::Reset, Event::Stage(Stage::Firmware), Event::Stage(Stage::Ipxe)]
        );
    }
}
