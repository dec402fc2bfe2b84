//! The NIC option ROM's "Press Ctrl-B for the iPXE command line..." banner, answered so the ROM boots at once.
//!
//! On the default boot path (no `--ipxe`) the ROM's iPXE shows that banner and waits for a key before it
//! autoboots: 2 s in Debian's ROMs, 3 s in iPXE's own QEMU build, on every start. Any key other than Ctrl-B
//! ends the wait and autoboot goes on as it would have (DHCP on the boot NIC only, then the boot script). The
//! launcher watches the serial console for the banner and presses Enter once, through its own QMP connection
//! (`send-key` on the PS/2 keyboard, which SeaBIOS hands to iPXE). Nothing else changes: the banner is still
//! printed, a key that arrives late lands in autoboot (which ignores it) and no key is sent after the boot
//! script has started. The price: nobody can press Ctrl-B there to reach the ROM's shell.
//!
//! [`BannerWatch`] is the pure part (it reads console bytes in any chunking); [`answer`] polls the serial log.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::launcher::qmp::QmpClient;

/// The banner: `"Press Ctrl-B for the " PRODUCT_SHORT_NAME " command line..."` (the product name is "iPXE"
/// unless the build was branded).
const BANNER_START: &[u8] = b"Press Ctrl-B for the ";
const BANNER_END: &[u8] = b" command line...";
/// What the generated boot script prints first: past this, there is no banner to answer.
const SCRIPT_MARK: &[u8] = b"ec-ipxe-qemu:";
/// How much console output is kept between chunks (a banner split across reads is still found).
const KEEP: usize = 256;
/// How often the serial log is read, and for how long at most.
const POLL: Duration = Duration::from_millis(10);
const WATCH_LIMIT: Duration = Duration::from_secs(180);
const QMP_TIMEOUT: Duration = Duration::from_secs(2);

/// What the console shows so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The banner is on screen: press a key now.
    Banner,
    /// The boot script runs: nothing left to answer.
    ScriptStarted,
    Nothing,
}

/// Finds the banner in console output fed to it chunk by chunk.
#[derive(Default)]
pub struct BannerWatch {
    tail: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl BannerWatch {
    pub fn feed(&mut self, bytes: &[u8]) -> Seen {
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

/// New bytes of the file at `path` since `offset` (from the start again when the file was truncated).
fn read_new(path: &std::path::Path, offset: &mut u64) -> Vec<u8> {
    let Ok(mut f) = std::fs::File::open(path) else { return Vec::new() };
    if f.metadata().is_ok_and(|m| m.len() < *offset) {
        *offset = 0;
    }
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(*offset)).is_ok() && f.read_to_end(&mut buf).is_ok() {
        *offset += buf.len() as u64;
    }
    buf
}

/// Watch the serial log at `serial` for the banner and answer it with Enter through `qmp`; returns when that
/// is done, when the boot script has started, when QMP is gone or after a few minutes. Only a regular file is
/// read (a FIFO given as `--serial-log` belongs to its reader).
pub async fn answer(serial: PathBuf, qmp: QmpClient) {
    if !std::fs::metadata(&serial).is_ok_and(|m| m.is_file()) {
        tracing::debug!("{} is not a regular file: not watching for iPXE's banner", serial.display());
        return;
    }
    let start = Instant::now();
    let mut offset = 0;
    let mut watch = BannerWatch::default();
    while start.elapsed() < WATCH_LIMIT {
        match watch.feed(&read_new(&serial, &mut offset)) {
            Seen::Nothing => {}
            Seen::ScriptStarted => return,
            Seen::Banner => {
                let keys = serde_json::json!({ "keys": [{ "type": "qcode", "data": "ret" }] });
                match tokio::time::timeout(QMP_TIMEOUT, qmp.execute_with("send-key", keys)).await {
                    Ok(Ok(_)) => tracing::info!(
                        "iPXE banner \"Press Ctrl-B for the iPXE command line...\": pressed Enter, so the NIC option \
                         ROM boots without waiting"
                    ),
                    Ok(Err(e)) => tracing::debug!("answering iPXE's banner: {e}"),
                    Err(_) => tracing::debug!("answering iPXE's banner: no QMP answer"),
                }
                return;
            }
        }
        tokio::time::sleep(POLL).await;
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
    fn reads_only_what_is_new_and_restarts_after_truncation() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("serial.log");
        let mut off = 0;
        assert!(read_new(&p, &mut off).is_empty(), "a missing file reads as nothing");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(read_new(&p, &mut off), b"abc");
        assert!(read_new(&p, &mut off).is_empty());
        std::fs::write(&p, b"x").unwrap();
        assert_eq!(read_new(&p, &mut off), b"x", "a truncated file is read from the start");
    }
}
