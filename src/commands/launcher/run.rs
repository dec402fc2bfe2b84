//! `ec-ipxe-qemu run`.

use crate::cli::launcher::LaunchArgs;
use crate::error::Result;
use crate::launcher::config::LaunchConfig;
use crate::launcher::supervise;

pub fn run(args: &LaunchArgs) -> Result<()> {
    let cfg = LaunchConfig::from_options(&args.to_options())?;
    supervise::run(&cfg)
}
