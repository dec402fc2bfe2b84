//! clap derive types only: what each binary accepts, and their conversion into library types. The work is in
//! `commands` and the library; nothing outside `cli/` and `src/bin/` names clap.

pub mod launcher;
pub mod macvtap;

use std::process::ExitCode;

use crate::error::Error;

/// Report an argument-parsing failure the way both binaries do: clap's own text (help and version on stdout,
/// errors on stderr, each line an error under the journal), a JSON error object on stdout when `--json`/`-j` was given, and the exit status for
/// `main` to return: 0 for `--help`/`--version`, 2 (usage) otherwise.
pub fn parse_failed(program: &str, err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let informational = matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if !informational && json_requested(std::env::args().skip(1)) {
        let first = err.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_owned();
        println!("{}", Error::invalid(program, first).to_json());
    }
    if !informational && crate::logging::stderr_is_journal() {
        eprint!("{}", crate::logging::with_priority(tracing::Level::ERROR, &err.render().to_string()));
    } else {
        let _ = err.print();
    }
    ExitCode::from(if informational { 0 } else { 2 })
}

/// Whether argv (without the program name) asks for JSON before any `--`: `--json`, or `-j` alone or in a
/// cluster of short flags such as `-vj`.
pub fn json_requested(args: impl IntoIterator<Item = String>) -> bool {
    args.into_iter().take_while(|a| a != "--").any(|a| {
        a == "--json"
            || a.strip_prefix('-').is_some_and(|s| {
                !s.starts_with('-') && !s.is_empty() && s.chars().all(|c| c.is_ascii_alphabetic()) && s.contains('j')
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_asked_for_before_the_program_args() {
        let asks = |v: &[&str]| json_requested(v.iter().map(|s| s.to_string()));
        assert!(asks(&["--json", "show"]));
        assert!(asks(&["show", "-j"]));
        assert!(asks(&["-vj", "show"]));
        assert!(!asks(&["show"]));
        assert!(!asks(&["exec", "--name", "x", "--", "prog", "--json", "-j"]));
        assert!(!asks(&["--jsonx"]));
        assert!(!asks(&["--memory", "-5"]));
    }
}
