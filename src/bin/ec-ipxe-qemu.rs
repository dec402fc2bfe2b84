use std::process::ExitCode;

use ec_ipxe_qemu::cli::launcher::{LauncherCli, LauncherCommand};
use ec_ipxe_qemu::commands::{self, print_args, run};

fn main() -> ExitCode {
    let cli: LauncherCli = commands::parse_or_exit("ec-ipxe-qemu");
    ec_ipxe_qemu::logging::init(cli.verbose, cli.quiet);
    let result = match &cli.command {
        LauncherCommand::Run(a) => run::run(a),
        LauncherCommand::PrintArgs(a) => print_args::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => commands::fail("ec-ipxe-qemu", &e, false),
    }
}
