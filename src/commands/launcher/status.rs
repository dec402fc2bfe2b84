//! `ec-ipxe-qemu status`: what the launcher in a state directory knows about its guest.

use crate::cli::launcher::StatusArgs;
use crate::commands::{print_json, write_stdout};
use crate::error::{Kind, Result};
use crate::launcher::status;

/// Print the report (JSON or text); the exit status is 0 while a launcher holds the directory, 3 when none
/// does (the last known status is printed all the same).
pub fn run(args: &StatusArgs) -> Result<u8> {
    let report = status::read(&args.state_dir)?;
    if args.json {
        print_json(&report)?;
    } else {
        write_stdout(status::render(&args.state_dir, &report).trim_end_matches('\n'))?;
    }
    if report.running {
        return Ok(0);
    }
    crate::logging::stderr_line(
        tracing::Level::WARN,
        &format!(
            "ec-ipxe-qemu: --state-dir \"{}\": no launcher is running there (the last known status is shown)",
            args.state_dir.display()
        ),
    );
    Ok(Kind::NotFound.exit_code())
}
