//! Does an iPXE image speak HTTPS? Told from the image itself, before QEMU starts, so an https boot URL with an
//! iPXE that cannot fetch it is a warning at start instead of a chain that fails every 10 seconds.
//!
//! How: every iPXE build registers one URI opener per protocol it was built with, and each opener names its
//! scheme as a NUL-terminated string: `"http"`, `"https"` (only with `DOWNLOAD_PROTO_HTTPS`), `"tftp"`, ...
//! Legacy images (`ipxe.lkrn`, the NIC option ROMs) keep their code LZMA-compressed behind a small
//! uncompressed prefix (iPXE's `util/zbin.c`: raw LZMA1, lc=2 lp=0 pb=0), so the scan looks for that stream
//! within the first 64 KiB, decompresses it, and searches the result; EFI images are searched as they are.
//! The `"http"` opener must be found for an answer: without it the image is not one this check understands,
//! and the answer is "unknown".
//!
//! Without `--ipxe`, QEMU's NIC option ROM runs iPXE: the ROM QEMU loads for the boot NIC's model
//! (`efi-virtio.rom` for `virtio-net-pci`, ...) is looked up in QEMU's data directories (`qemu -L help`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What an image supports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Https {
    Yes,
    No,
    /// The check could not tell (and why).
    Unknown(String),
}

/// Images larger than this are not iPXE.
const MAX_IMAGE: u64 = 32 << 20;
/// Where the compressed payload may start.
const SCAN: usize = 64 << 10;
/// A decompressed iPXE is well under this.
const MAX_UNPACKED: usize = 8 << 20;
/// A compressed iPXE payload is longer than this.
const MIN_STREAM: usize = 8 << 10;
/// Shorter than this is not an iPXE payload.
const MIN_UNPACKED: usize = 32 << 10;

fn has(hay: &[u8], scheme: &[u8]) -> bool {
    let mut needle = Vec::with_capacity(scheme.len() + 2);
    needle.push(0);
    needle.extend_from_slice(scheme);
    needle.push(0);
    hay.windows(needle.len()).any(|w| w == needle.as_slice())
}

fn verdict(code: &[u8]) -> Option<Https> {
    has(code, b"http").then(|| if has(code, b"https") { Https::Yes } else { Https::No })
}

/// Collects decompressed bytes up to [`MAX_UNPACKED`].
struct Capped(Vec<u8>);

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_UNPACKED {
            return Err(std::io::Error::other("too large for an iPXE payload"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// iPXE's compressed payload in `image`, decompressed, if there is one.
fn unpack(image: &[u8]) -> Option<Vec<u8>> {
    use lzma_rs::decompress::raw::{LzmaDecoder, LzmaParams, LzmaProperties};
    let params = LzmaParams::new(LzmaProperties { lc: 2, lp: 0, pb: 0 }, 8 << 20, None);
    let mut decoder = LzmaDecoder::new(params, Some(MAX_UNPACKED)).ok()?;
    // The range coder's first byte is always zero: only those offsets can start a stream.
    for off in (0..image.len().min(SCAN)).filter(|&o| image[o] == 0) {
        decoder.reset(None);
        let mut out = Capped(Vec::new());
        let mut input = &image[off..];
        let mut r = decoder.decompress(&mut input, &mut out);
        // iPXE's stream ends with an end marker and the image goes on after it, which the decoder refuses
        // ("more bytes are available") after consuming exactly the stream: decode that much again.
        let used = image.len() - off - input.len();
        if r.is_err() && used >= MIN_STREAM {
            decoder.reset(None);
            out.0.clear();
            let mut exact = &image[off..off + used];
            r = decoder.decompress(&mut exact, &mut out);
        }
        if r.is_ok() && out.0.len() >= MIN_UNPACKED && has(&out.0, b"http") {
            return Some(out.0);
        }
    }
    None
}

/// Whether the iPXE image in `bytes` has HTTPS.
pub(super) fn https_support(bytes: &[u8]) -> Https {
    if let Some(v) = verdict(bytes) {
        return v;
    }
    match unpack(bytes).and_then(|code| verdict(&code)) {
        Some(v) => v,
        None => Https::Unknown("no iPXE protocol table found in it (not an iPXE image?)".into()),
    }
}

/// [`https_support`] of a file.
pub(super) fn file_https_support(path: &Path) -> Https {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_IMAGE => return Https::Unknown(format!("{} is too large for iPXE", path.display())),
        Ok(_) => {}
        Err(e) => return Https::Unknown(format!("{}: {e}", path.display())),
    }
    match std::fs::read(path) {
        Ok(b) => https_support(&b),
        Err(e) => Https::Unknown(format!("{}: {e}", path.display())),
    }
}

/// The option ROM QEMU loads for a NIC model (QEMU's own defaults).
pub(super) fn rom_for_model(model: &str) -> Option<&'static str> {
    Some(match model {
        "virtio-net-pci" | "virtio-net-pci-non-transitional" | "virtio-net-pci-transitional" => "efi-virtio.rom",
        "e1000" | "e1000-82540em" => "efi-e1000.rom",
        "e1000e" => "efi-e1000e.rom",
        "rtl8139" => "efi-rtl8139.rom",
        "vmxnet3" => "efi-vmxnet3.rom",
        "pcnet" => "efi-pcnet.rom",
        "ne2k_pci" => "efi-ne2k_pci.rom",
        "i82550" | "i82551" | "i82557a" | "i82557b" | "i82557c" | "i82558a" | "i82558b" | "i82559a" | "i82559b"
        | "i82559c" | "i82559er" | "i82562" | "i82801" => "efi-eepro100.rom",
        _ => return None,
    })
}

/// Where QEMU finds `rom`: the first of its data directories (`qemu -L help`) that has it.
pub(super) fn find_rom(qemu: &Path, rom: &str) -> Option<PathBuf> {
    let out = Command::new(qemu).args(["-L", "help"]).stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().map(|d| Path::new(d.trim()).join(rom)).find(|p| p.is_file())
}

/// What runs iPXE for the boot NIC, and whether it has HTTPS: the `--ipxe` image, else QEMU's option ROM for
/// the boot NIC model.
pub(super) fn boot_ipxe_https(ipxe: Option<&Path>, qemu: &Path, model: &str) -> (String, Https) {
    if let Some(p) = ipxe {
        return (format!("--ipxe {}", p.display()), file_https_support(p));
    }
    let Some(rom) = rom_for_model(model) else {
        return (
            format!("the option ROM of --boot-nic-model {model}"),
            Https::Unknown("no known option ROM for that model".into()),
        );
    };
    match find_rom(qemu, rom) {
        Some(p) => (format!("QEMU's option ROM {}", p.display()), file_https_support(&p)),
        None => (format!("QEMU's option ROM {rom}"), Https::Unknown("not found in QEMU's data directories".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_strings_decide() {
        assert_eq!(https_support(b"xx\0http\0\0tftp\0yy"), Https::No);
        assert_eq!(https_support(b"\0https\0\0http\0"), Https::Yes);
        // "https" inside a banner is not the opener's scheme.
        assert_eq!(https_support(b"iPXE (https://ipxe.org)\0http\0"), Https::No);
        assert!(matches!(https_support(b"not an image"), Https::Unknown(_)));
    }

    /// The payload is found and read in Debian's images; they have "http" and lack "https".
    #[test]
    fn debian_images_lack_https() {
        let images =
            ["/usr/lib/ipxe/ipxe.lkrn", "/usr/lib/ipxe/qemu/efi-virtio.rom", "/usr/lib/ipxe/qemu/pxe-e1000.rom"];
        if !Path::new(images[0]).exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "debian_images_lack_https needs Debian's ipxe and ipxe-qemu (CI=true: a failure, not a skip)"
            );
            eprintln!("SKIP debian_images_lack_https: needs /usr/lib/ipxe");
            return;
        }
        for img in images {
            let t = std::time::Instant::now();
            assert_eq!(file_https_support(Path::new(img)), Https::No, "{img}");
            eprintln!("FIGURE HTTPS check of {img}: {:?}", t.elapsed());
        }
        // The compressed payload itself, with "https" added to its opener table: now it is found.
        let raw = std::fs::read(images[0]).unwrap();
        let code = unpack(&raw).expect("ipxe.lkrn's payload");
        assert!(code.len() > 500 << 10, "{}", code.len());
        let mut patched = code.clone();
        patched.extend_from_slice(b"\0https\0");
        assert_eq!(https_support(&patched), Https::Yes);
    }

    #[test]
    fn roms_for_models() {
        assert_eq!(rom_for_model("virtio-net-pci"), Some("efi-virtio.rom"));
        assert_eq!(rom_for_model("e1000"), Some("efi-e1000.rom"));
        assert_eq!(rom_for_model("made-up"), None);
        let (what, h) = boot_ipxe_https(None, Path::new("/nonexistent/qemu"), "virtio-net-pci");
        assert!(what.contains("efi-virtio.rom") && matches!(h, Https::Unknown(_)), "{what} {h:?}");
    }
}
