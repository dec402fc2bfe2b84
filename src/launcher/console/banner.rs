//! The NIC option ROM's "Press Ctrl-B for the iPXE command line..." banner, answered so the ROM boots at once.
//!
//! On the default boot path (no `--ipxe`) the ROM's iPXE shows that banner and waits for a key before it
//! autoboots: 2 s in Debian's ROMs, 3 s in iPXE's own QEMU build, on every start. Any key other than Ctrl-B
//! ends the wait and autoboot goes on as it would have (DHCP on the boot NIC only, then the boot script). The
//! launcher watches the guest console for the banner and presses Enter once, through its own QMP connection
//! (`send-key` on the PS/2 keyboard, which SeaBIOS hands to iPXE). Nothing else changes: the banner is still
//! printed, a key that arrives late lands in autoboot (which ignores it) and no key is sent after the boot
//! script has started. The price: nobody can press Ctrl-B there to reach the ROM's shell.
//!
//! [`BannerWatch`] is the pure part (it reads console bytes in any chunking); the console broker feeds every
//! byte the guest prints to a [`Spotter`] (see [`GuestSink`](super::sink::GuestSink)), which tells [`answer`] once.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::launcher::qmp::QmpClient;

/// The banner: `"Press Ctrl-B for the " PRODUCT_SHORT_NAME " command line..."` (the product name is "iPXE"
/// unless the build was branded).
const BANNER_START: &[u8] = b"Press Ctrl-B for the ";
const BANNER_END: &[u8] = b" command line...";
/// What the generated boot script prints first: past this, there is no banner to answer.
const SCRIPT_MARK: &[u8] = b"ec-ipxe-qemu:";
/// How much console output is kept between chunks (a banner split across reads is still found).
const KEEP: usize = 256;
/// How long [`answer`] waits for the banner at most.
const WATCH_LIMIT: Duration = Duration::from_secs(180);
const QMP_TIMEOUT: Duration = Duration::from_secs(2);

/// What the console shows so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// The banner is on screen: press a key now.
    Banner,
    /// The boot script runs: nothing left to answer.
    ScriptStarted,
    Nothing,
}

/// Finds the banner in console output fed to it chunk by chunk.
#[derive(Default)]
pub(crate) struct BannerWatch {
    tail: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl BannerWatch {
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Seen {
        self.tail.extend_from_slice(bytes);
        let seen = if find(&self.tail, SCRIPT_MARK).is_some() {
            Seen::ScriptStarted
        } else if let Some(i) = find(&self.tail, BANNER_START)
            && find(&self.tail[i + BANNER_START.len()..], BANNER_END).is_some()
        {
            Seen::Banner
        } else {
            Seen::Nothing
        };
        if self.tail.len() > KEEP {
            self.tail.drain(..self.tail.len() - KEEP);
        }
        seen
    }
}

/// The console side of the watch: fed every console byte, it signals [`answer`] once when the banner shows,
/// and lets it go (drops the signal) once the boot script has started.
pub(crate) struct Spotter {
    watch: BannerWatch,
    tx: Option<oneshot::Sender<()>>,
}

impl Spotter {
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        if self.tx.is_none() {
            return;
        }
        match self.watch.feed(bytes) {
            Seen::Nothing => {}
            Seen::Banner => {
                if let Some(tx) = self.tx.take() {
                    let _ = tx.send(());
                }
            }
            Seen::ScriptStarted => self.tx = None,
        }
    }
}

/// A [`Spotter`] for the console broker and the receiver [`answer`] waits on.
pub(crate) fn spotter() -> (Spotter, oneshot::Receiver<()>) {
    let (tx, rx) = oneshot::channel();
    (Spotter { watch: BannerWatch::default(), tx: Some(tx) }, rx)
}

/// Wait for the [`Spotter`] to see the banner, then answer it with Enter through `qmp`; returns when that is
/// done, when the boot script has started (or the console is gone) or after a few minutes.
pub(crate) async fn answer(seen: oneshot::Receiver<()>, qmp: QmpClient) {
    match tokio::time::timeout(WATCH_LIMIT, seen).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return tracing::debug!("the boot script started: no iPXE banner to answer"),
        Err(_) => return tracing::debug!("no iPXE banner within {} s", WATCH_LIMIT.as_secs()),
    }
    let keys = serde_json::json!({ "keys": [{ "type": "qcode", "data": "ret" }] });
    match tokio::time::timeout(QMP_TIMEOUT, qmp.execute_with("send-key", keys)).await {
        Ok(Ok(_)) => tracing::info!(
            "iPXE banner \"Press Ctrl-B for the iPXE command line...\": pressed Enter, so the NIC option ROM boots \
             without waiting"
        ),
        Ok(Err(e)) => tracing::debug!("answering iPXE's banner: {e}"),
        Err(_) => tracing::debug!("answering iPXE's banner: no QMP answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's ROM output, as the serial log holds it.
    const ROM: &[u8] = b"\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n\
        iPXE (http://ipxe.org) 00:03.0 C000 PCI2.10 PnP PMM+0EFCF160+0EF0F160 C000\r\n\
        Press Ctrl-B to configure iPXE (PCI 00:03.0)...\r\nBooting from ROM...\r\n\
        iPXE (PCI 00:03.0) starting execution...ok\r\niPXE initialising devices...ok\r\n\r\n\r\n\r\n\
        \x1b[0;1miPXE 1.0.0+git-20190125.36a4c85-5.1\x1b[0m -- Open Source Network Boot Firmware -- \r\n\
        Features: DNS HTTP iSCSI NFS TFTP AoE ELF MBOOT PXE bzImage Menu PXEXT\r\n\
        Press Ctrl-B for the iPXE command line...";

    #[test]
    fn finds_the_banner_in_any_chunking_and_not_the_post_prompt() {
        let banner_at = ROM.len();
        for size in [1, 2, 7, 64, ROM.len()] {
            let mut w = BannerWatch::default();
            let mut fed = 0;
            let mut found = None;
            for chunk in ROM.chunks(size) {
                fed += chunk.len();
                if w.feed(chunk) == Seen::Banner {
                    found = Some(fed);
                    break;
                }
            }
            assert_eq!(found, Some(banner_at), "chunks of {size}");
        }
        // The POST-time prompt ("to configure") is not the banner.
        let post = find(ROM, b"Booting from ROM").unwrap();
        assert_eq!(BannerWatch::default().feed(&ROM[..post]), Seen::Nothing);
    }

    #[test]
    fn a_branded_build_and_the_script_start() {
        let mut w = BannerWatch::default();
        assert_eq!(w.feed(b"Press Ctrl-B for the Acme PXE command line..."), Seen::Banner);
        // The generated script has started (e.g. --ipxe, or the banner was answered): stop watching.
        let mut w = BannerWatch::default();
        assert_eq!(w.feed(b"iPXE initialising devices...ok\r\n"), Seen::Nothing);
        assert_eq!(w.feed(b"ec-ipxe-qemu: boot NIC net0"), Seen::ScriptStarted);
        // The kept tail stays bounded.
        let mut w = BannerWatch::default();
        for _ in 0..100 {
            assert_eq!(w.feed(&[b'x'; 1000]), Seen::Nothing);
        }
        assert!(w.tail.len() <= KEEP);
    }

    #[test]
    fn the_spotter_signals_once_and_lets_go_after_the_script_starts() {
        let (mut sp, mut rx) = spotter();
        sp.feed(&ROM[..ROM.len() - 3]);
        assert!(rx.try_recv().is_err(), "no banner yet");
        sp.feed(&ROM[ROM.len() - 3..]);
        assert_eq!(rx.try_recv(), Ok(()));
        sp.feed(ROM);
        assert!(sp.tx.is_none());

        let (mut sp, mut rx) = spotter();
        sp.feed(b"ec-ipxe-qemu: boot NIC net0\r\n");
        assert_eq!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed), "the script started: let go");
        sp.feed(ROM);
        assert_eq!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }
}
