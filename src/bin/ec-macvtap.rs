use std::process::ExitCode;

use ec_ipxe_qemu::cli::macvtap::{MacvtapCli, MacvtapCommand};
use ec_ipxe_qemu::commands::{self, create, delete, exec, show};

fn main() -> ExitCode {
    let cli: MacvtapCli = commands::parse_or_exit("ec-macvtap");
    ec_ipxe_qemu::logging::init(cli.global.verbose, cli.global.quiet);
    let g = &cli.global;
    let result = match &cli.command {
        MacvtapCommand::Create(a) => create::run(g, a),
        MacvtapCommand::Delete(a) => delete::run(g, a),
        MacvtapCommand::Show(a) => show::run(g, a),
        MacvtapCommand::Exec(a) => exec::run(g, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => commands::fail("ec-macvtap", &e, g.json),
    }
}
