//! `ec-ipxe-qemu print-args`: the exact QEMU argv as a JSON array on stdout.

use crate::cli::launcher::LaunchArgs;
use crate::commands::print_json;
use crate::error::Result;
use crate::launcher::{self, config::LaunchConfig};

pub fn run(args: &LaunchArgs) -> Result<()> {
    let cfg = LaunchConfig::from_args(args)?;
    print_json(&launcher::print_args(&cfg)?)
}
