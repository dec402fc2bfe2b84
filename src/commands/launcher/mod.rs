//! `ec-ipxe-qemu`: one file per subcommand.

pub mod print_args;
pub mod run;

use crate::cli::launcher::{LauncherCli, LauncherCommand};
use crate::error::Result;

/// Run the subcommand `cli` names.
pub fn dispatch(cli: &LauncherCli) -> Result<()> {
    match &cli.command {
        LauncherCommand::Run(a) => run::run(a),
        LauncherCommand::PrintArgs(a) => print_args::run(a),
    }
}
