//! The subcommands, arranged per binary ([`macvtap`] for `ec-macvtap`, [`launcher`] for `ec-ipxe-qemu`), one
//! file each. Each takes its parsed arguments, calls the library and prints the result; errors go back to
//! `main`, which alone decides the exit status.

pub mod launcher;
pub mod macvtap;

use std::process::ExitCode;

use crate::error::Error;

/// Print `value` as one JSON document on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Runtime(format!("encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Report a failed command: one line on stderr (`PROGRAM: what: why`, as an error under the journal), a JSON object on stdout under
/// `--json`, and the documented exit code for `main` to return.
pub fn fail(program: &str, err: &Error, json: bool) -> ExitCode {
    if json {
        println!("{}", err.to_json());
    }
    eprint!("{}", crate::logging::stderr_text(tracing::Level::ERROR, &format!("{program}: {err}")));
    ExitCode::from(err.exit_code())
}
