//! `ec-ipxe-qemu`: one file per subcommand.

pub mod console;
pub mod print_args;
pub mod run;
pub mod status;

use crate::cli::launcher::{LauncherCli, LauncherCommand};
use crate::error::Result;

/// Run the subcommand `cli` names. `Ok` holds the exit status for `main`: 0, or 3 from `status` when no
/// launcher holds the directory (its report is printed all the same).
pub fn dispatch(cli: &LauncherCli) -> Result<u8> {
    match &cli.command {
        LauncherCommand::Run(a) => run::run(a).map(|()| 0),
        LauncherCommand::PrintArgs(a) => print_args::run(a).map(|()| 0),
        LauncherCommand::Status(a) => status::run(a),
        LauncherCommand::Console(a) => console::run(a).map(|()| 0),
    }
}
