use std::process::ExitCode;

use ec_ipxe_qemu::cli::{self, launcher::LauncherCli};
use ec_ipxe_qemu::commands;

fn main() -> ExitCode {
    ec_ipxe_qemu::logging::ensure_std_fds();
    let cli: LauncherCli = match cli::parse("ec-ipxe-qemu") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    ec_ipxe_qemu::logging::init(cli.verbose, cli.quiet);
    match commands::launcher::dispatch(&cli) {
        Ok(code) => code,
        Err(e) => commands::fail("ec-ipxe-qemu", &e, cli.command.json()),
    }
}
