//! `ec-ipxe-qemu`: one file per subcommand.

pub mod console;
pub mod doctor;
pub mod print_args;
pub mod run;
pub mod status;

use std::process::ExitCode;

use crate::cli::launcher::{LauncherCli, LauncherCommand};
use crate::error::Result;

/// Run the subcommand `cli` names; the exit status for `main`: `doctor` exits 1 after its report when a
/// check failed, and `status` 3 when no launcher holds the directory (its report is printed all the same);
/// neither is an error of the command.
pub fn dispatch(cli: &LauncherCli) -> Result<ExitCode> {
    let done = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
    match &cli.command {
        LauncherCommand::Run(a) => done(run::run(a)),
        LauncherCommand::PrintArgs(a) => done(print_args::run(a)),
        LauncherCommand::Doctor(a) => doctor::run(a),
        LauncherCommand::Status(a) => status::run(a).map(ExitCode::from),
        LauncherCommand::Console(a) => done(console::run(a)),
    }
}
