use std::process::ExitCode;

use ec_ipxe_qemu::cli::{self, macvtap::MacvtapCli};
use ec_ipxe_qemu::commands;

fn main() -> ExitCode {
    ec_ipxe_qemu::logging::ensure_std_fds();
    let cli: MacvtapCli = match cli::parse("ec-macvtap") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    ec_ipxe_qemu::logging::init(cli.global.verbose, cli.global.quiet);
    match commands::macvtap::dispatch(&cli) {
        Ok(code) => code,
        Err(e) => commands::fail("ec-macvtap", &e, cli.global.json),
    }
}
