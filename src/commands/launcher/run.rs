//! `ec-ipxe-qemu run`.

use crate::cli::launcher::LaunchArgs;
use crate::error::Result;
use crate::launcher::config::LaunchConfig;
use crate::launcher::run as supervisor;

pub fn run(args: &LaunchArgs) -> Result<()> {
    let cfg = LaunchConfig::from_options(&args.to_options())?;
    supervisor::run(&cfg)
}
