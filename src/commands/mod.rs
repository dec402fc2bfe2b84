//! The subcommands, arranged per binary ([`macvtap`] for `ec-macvtap`, [`launcher`] for `ec-ipxe-qemu`), one
//! file each. Each takes its parsed arguments, calls the library and prints the result; errors go back to
//! `main`, which alone decides the exit status.

pub mod launcher;
pub mod macvtap;

use std::process::ExitCode;

use crate::error::Error;

/// `value` as one pretty-printed JSON document.
pub fn json_text<T: serde::Serialize>(value: &T) -> Result<String, Error> {
    serde_json::to_string_pretty(value).map_err(|e| Error::Runtime(format!("encode JSON: {e}")))
}

/// Print `value` as one JSON document on stdout (see [`write_stdout`]).
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Error> {
    write_stdout(&json_text(value)?)
}

/// Write text (a JSON document, report lines) and a newline to stdout. A reader that went away
/// (`print-args | head -c1`, `probe | head -1`) is not an error: there is no one left to tell. Any other
/// failure is an error of the command (exit 1), never a panic.
pub fn write_stdout(text: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io("write to stdout", e)),
    }
}

/// Report a failed command: one line on stderr (`PROGRAM: what: why`, as an error under the journal), a JSON object on stdout under
/// `--json`, and the documented exit code for `main` to return.
pub fn fail(program: &str, err: &Error, json: bool) -> ExitCode {
    if json {
        // Nothing is left to report a stdout that cannot take the error to.
        let _ = write_stdout(&err.to_json().to_string());
    }
    crate::logging::stderr_line(tracing::Level::ERROR, &format!("{program}: {err}"));
    ExitCode::from(err.exit_code())
}
