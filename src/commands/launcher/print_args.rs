//! `ec-ipxe-qemu print-args`: the exact QEMU argv as a JSON array on stdout.

use std::io::Write;

use crate::cli::launcher::PrintArgsArgs;
use crate::error::{Error, Result};
use crate::launcher::{self, config::LaunchConfig};

/// The argv is a JSON array with or without `--json`; `--json` only makes errors JSON too.
pub fn run(args: &PrintArgsArgs) -> Result<()> {
    let cfg = LaunchConfig::from_options(&args.launch.to_options())?;
    let argv = launcher::print_args(&cfg)?;
    let text = serde_json::to_string_pretty(&argv).map_err(|e| Error::Runtime(format!("encode JSON: {e}")))?;
    write_stdout(&text)
}

/// Write one document to stdout. A reader that went away (`print-args | head -c1`) is not an error: there is
/// no one left to tell.
fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io("write to stdout", e)),
    }
}
