//! `ec-ipxe-qemu print-args`: the exact QEMU argv as a JSON array on stdout.

use crate::cli::launcher::PrintArgsArgs;
use crate::error::Result;
use crate::launcher::{self, config::LaunchConfig};

/// The argv is a JSON array with or without `--json`; `--json` only makes errors JSON too.
pub fn run(args: &PrintArgsArgs) -> Result<()> {
    let cfg = LaunchConfig::from_options(&args.launch.to_options())?;
    let argv = launcher::print_args(&cfg)?;
    crate::commands::print_json(&argv)
}
