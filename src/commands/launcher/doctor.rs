//! `ec-ipxe-qemu doctor`: one line per check (a JSON array under `--json`), exit 1 when any failed.

use std::process::ExitCode;

use crate::cli::launcher::DoctorArgs;
use crate::error::Result;
use crate::launcher::doctor::{self, Devices};

pub fn run(args: &DoctorArgs) -> Result<ExitCode> {
    let checks = doctor::run_checks(&args.launch.to_options(), &Devices::default());
    let text = if args.json {
        crate::commands::json_text(&checks)?
    } else {
        checks.iter().map(|c| c.human()).collect::<Vec<_>>().join("\n")
    };
    crate::commands::write_stdout(&text)?;
    Ok(if doctor::any_failed(&checks) { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
