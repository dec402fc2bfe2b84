//! `ec-macvtap`: one file per subcommand.

pub mod create;
pub mod delete;
pub mod exec;
pub mod probe;
pub mod show;

use std::process::ExitCode;

use crate::cli::macvtap::{MacvtapCli, MacvtapCommand};
use crate::error::Result;

/// Run the subcommand `cli` names; the exit status for `main` (`probe` reports a failed check as 1 after
/// printing its report, which is not an error of the command).
pub fn dispatch(cli: &MacvtapCli) -> Result<ExitCode> {
    let g = &cli.global;
    let done = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
    match &cli.command {
        MacvtapCommand::Create(a) => done(create::run(g, a)),
        MacvtapCommand::Delete(a) => done(delete::run(g, a)),
        MacvtapCommand::Show(a) => done(show::run(g, a)),
        MacvtapCommand::Exec(a) => done(exec::run(g, a)),
        MacvtapCommand::Probe(a) => probe::run(g, a),
    }
}
