//! One file per subcommand. Each takes its parsed arguments, calls the library and prints the result.

pub mod create;
pub mod delete;
pub mod exec;
pub mod print_args;
pub mod run;
pub mod show;

use std::process::ExitCode;

use crate::error::Error;

/// Print `value` as one JSON document on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Runtime(format!("encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Report a failed command: one line on stderr (`PROGRAM: what: why`), a JSON object on stdout under
/// `--json`, and the documented exit code.
pub fn fail(program: &str, err: &Error, json: bool) -> ExitCode {
    if json {
        println!("{}", err.to_json());
    }
    eprintln!("{program}: {err}");
    ExitCode::from(err.exit_code())
}

/// Parse argv; usage errors exit 2 (as JSON under `--json`), `--help`/`--version` exit 0.
pub fn parse_or_exit<T: clap::Parser>(program: &str) -> T {
    match T::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let informational = matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand;
            if !informational && std::env::args().any(|a| a == "--json") {
                let first = e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_owned();
                println!("{}", Error::invalid(program, first).to_json());
            }
            let _ = e.print();
            std::process::exit(if informational { 0 } else { 2 });
        }
    }
}
