//! clap derive types only: what each binary accepts, and their conversion into library types. The work is in
//! `commands` and the library; nothing outside `cli/` and `src/bin/` names clap.

pub mod launcher;
pub mod macvtap;

use std::ffi::{OsStr, OsString};
use std::process::ExitCode;

use crate::error::Error;

/// Parse argv (as `OsString`s, so a byte that is not UTF-8 is a usage error, never a panic) into `T`, or
/// report the failure as [`parse_failed`] does and give the exit status for `main`.
pub fn parse<T: clap::Parser>(program: &str) -> Result<T, ExitCode> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    T::try_parse_from(&argv).map_err(|e| {
        // clap's error is about the bad bytes when it says so, or when it quotes them (lossily, as U+FFFD:
        // a value enum, a subcommand name).
        let about_bytes =
            e.kind() == clap::error::ErrorKind::InvalidUtf8 || e.to_string().contains(char::REPLACEMENT_CHARACTER);
        match not_utf8(&argv).filter(|_| about_bytes) {
            Some(err) => {
                let json = json_requested(argv.iter().skip(1).map(OsString::as_os_str));
                crate::commands::fail(program, &err, json)
            }
            None => parse_failed(program, &e, &argv),
        }
    })
}

/// The first argument that is not UTF-8, as one usage error naming its option (clap's own message names
/// none): `--hostname "\xFF"`, `--link=...`, or its position when no option precedes it.
pub fn not_utf8(argv: &[OsString]) -> Option<Error> {
    let (i, bad) = argv.iter().enumerate().skip(1).find(|(_, a)| a.to_str().is_none())?;
    use std::os::unix::ffi::OsStrExt;
    let bytes = bad.as_os_str().as_bytes();
    let inline = bytes.iter().position(|&b| b == b'=').filter(|_| bytes.starts_with(b"--"));
    let (what, value) = match inline {
        Some(eq) => (String::from_utf8_lossy(&bytes[..eq]).into_owned(), OsStr::from_bytes(&bytes[eq + 1..])),
        None => match argv[i - 1].to_str() {
            Some(prev) if prev.starts_with('-') && prev != "--" && !prev.contains('=') && i > 1 => {
                (prev.to_owned(), bad.as_os_str())
            }
            _ => (format!("argument {i}"), bad.as_os_str()),
        },
    };
    Some(Error::invalid(format!("{what} {value:?}"), "not valid UTF-8 (text is expected here)"))
}

/// Report an argument-parsing failure the way both binaries do: clap's own text (help and version on stdout,
/// errors on stderr, each line an error under the journal), a JSON error object on stdout when `--json`/`-j` was given, and the exit status for
/// `main` to return: 0 for `--help`/`--version`, 2 (usage) otherwise.
pub fn parse_failed(program: &str, err: &clap::Error, argv: &[OsString]) -> ExitCode {
    use clap::error::ErrorKind;
    let informational = matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    let args = argv.iter().skip(1).map(OsString::as_os_str);
    if !informational && json_requested(args) {
        let first = err.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_owned();
        let _ = crate::commands::write_stdout(&Error::invalid(program, first).to_json().to_string());
    }
    if !informational && crate::logging::stderr_is_journal() {
        crate::logging::write_stderr(&crate::logging::with_priority(tracing::Level::ERROR, &err.render().to_string()));
    } else {
        let _ = err.print();
    }
    ExitCode::from(if informational { 0 } else { 2 })
}

/// Whether argv (without the program name) asks for JSON before any `--`: `--json`, or `-j` alone or in a
/// cluster of short flags such as `-vj`.
pub fn json_requested<'a>(args: impl IntoIterator<Item = &'a OsStr>) -> bool {
    // A flag is ASCII; an argument that is not UTF-8 is no flag of ours.
    args.into_iter().take_while(|a| *a != "--").filter_map(OsStr::to_str).any(|a| {
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
        let asks = |v: &[&str]| json_requested(v.iter().map(OsStr::new));
        assert!(asks(&["--json", "show"]));
        assert!(asks(&["show", "-j"]));
        assert!(asks(&["-vj", "show"]));
        assert!(!asks(&["show"]));
        assert!(!asks(&["exec", "--name", "x", "--", "prog", "--json", "-j"]));
        assert!(!asks(&["--jsonx"]));
        assert!(!asks(&["--memory", "-5"]));
        use std::os::unix::ffi::OsStrExt;
        let bad = OsStr::from_bytes(b"\xff-j");
        assert!(json_requested([bad, OsStr::new("-j")]));
        assert!(!json_requested([bad, OsStr::new("x")]));
    }

    #[test]
    fn the_bad_byte_is_named_with_its_option() {
        use std::os::unix::ffi::OsStringExt;
        let argv = |v: &[&[u8]]| v.iter().map(|a| OsString::from_vec(a.to_vec())).collect::<Vec<_>>();
        let msg = |v: &[&[u8]]| not_utf8(&argv(v)).map(|e| (e.exit_code(), e.to_string()));
        let (code, text) = msg(&[b"p", b"create", b"--link", b"a\xffb"]).unwrap();
        assert_eq!(code, 2);
        assert_eq!(text, r#"--link "a\xFFb": not valid UTF-8 (text is expected here)"#);
        assert!(msg(&[b"p", b"run", b"--hostname=\xff"]).unwrap().1.starts_with(r#"--hostname "\xFF":"#));
        assert!(msg(&[b"p", b"\xff"]).unwrap().1.starts_with("argument 1 "));
        assert!(msg(&[b"p", b"exec", b"--", b"\xff"]).unwrap().1.starts_with("argument 3 "));
        assert!(msg(&[b"p", b"show"]).is_none());
    }
}
