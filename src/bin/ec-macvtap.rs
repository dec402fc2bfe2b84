use std::process::ExitCode;

use clap::Parser;
use ec_ipxe_qemu::cli::{self, macvtap::MacvtapCli};
use ec_ipxe_qemu::commands;

fn main() -> ExitCode {
    let cli = match MacvtapCli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::parse_failed("ec-macvtap", &e),
    };
    ec_ipxe_qemu::logging::init(cli.global.verbose, cli.global.quiet);
    match commands::macvtap::dispatch(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => commands::fail("ec-macvtap", &e, cli.global.json),
    }
}
