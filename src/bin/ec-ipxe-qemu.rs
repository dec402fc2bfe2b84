use std::process::ExitCode;

use clap::Parser;
use ec_ipxe_qemu::cli::{self, launcher::LauncherCli};
use ec_ipxe_qemu::commands;

fn main() -> ExitCode {
    let cli = match LauncherCli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::parse_failed("ec-ipxe-qemu", &e),
    };
    ec_ipxe_qemu::logging::init(cli.verbose, cli.quiet);
    match commands::launcher::dispatch(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => commands::fail("ec-ipxe-qemu", &e, cli.command.json()),
    }
}
