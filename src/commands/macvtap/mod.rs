//! `ec-macvtap`: one file per subcommand.

pub mod create;
pub mod delete;
pub mod exec;
pub mod show;

use crate::cli::macvtap::{MacvtapCli, MacvtapCommand};
use crate::error::Result;

/// Run the subcommand `cli` names.
pub fn dispatch(cli: &MacvtapCli) -> Result<()> {
    let g = &cli.global;
    match &cli.command {
        MacvtapCommand::Create(a) => create::run(g, a),
        MacvtapCommand::Delete(a) => delete::run(g, a),
        MacvtapCommand::Show(a) => show::run(g, a),
        MacvtapCommand::Exec(a) => exec::run(g, a),
    }
}
