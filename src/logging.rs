//! Logs: tracing to stderr.
//!
//! Levels, unless `RUST_LOG` says otherwise (it wins):
//! - default: INFO of our own code (what was done, what was decided), WARN and ERROR of everything;
//! - `-v`: DEBUG of ours (each netlink request and its answer, each decision and why);
//! - `-vv`: TRACE of ours (what came back in full: link attributes, fds, QMP traffic);
//! - `-vvv`: TRACE of everything, the dependencies' internals too (netlink-proto, hyper, ...);
//! - `-q`: errors only.
//!
//! When stderr is the journal (`JOURNAL_STREAM` names stderr's device and inode, as systemd documents for
//! services), each line starts with the syslog priority in sd-daemon's form (`<3>` error, `<4>` warning,
//! `<6>` info, `<7>` debug and trace) instead of a timestamp and a level word: journald files every line
//! at its own priority (`journalctl -p warning` works) and adds the time itself. Every line of a multi-line
//! message carries the prefix, since journald splits the stream into lines.
//!
//! Output can never end a run: a line that cannot be written (stderr is a pipe whose reader went away, a
//! closed or full file) is dropped and counted ([`dropped_lines`], which `status.json` reports), never a panic
//! and never a retry that blocks.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Targets of our own code: the library and both binaries.
const OURS: [&str; 2] = ["ec_ipxe_qemu", "ec_macvtap"];

fn ours(target: &str) -> bool {
    OURS.iter().any(|o| target == *o || target.strip_prefix(o).is_some_and(|rest| rest.starts_with("::")))
}

/// The filter for `-v` count and `-q`, as an `EnvFilter` directive string.
pub fn directives(verbose: u8, quiet: bool) -> String {
    let ours_at = |level: &str| OURS.map(|o| format!("{o}={level}")).join(",");
    match (quiet, verbose) {
        (true, _) => "error".to_owned(),
        (false, 0) => format!("warn,{}", ours_at("info")),
        (false, 1) => format!("warn,{}", ours_at("debug")),
        (false, 2) => format!("warn,{}", ours_at("trace")),
        (false, _) => "trace".to_owned(),
    }
}

/// Whether `JOURNAL_STREAM` (`DEVICE:INODE`, decimal) names the file stderr is: then stderr is connected to
/// journald. A value inherited by a process whose stderr goes elsewhere does not match.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else { return false };
    journal_stream_matches(&value.to_string_lossy(), st.st_dev, st.st_ino)
}

fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else { return false };
    d.parse::<u64>().is_ok_and(|d| d == dev) && i.parse::<u64>().is_ok_and(|i| i == ino)
}

/// The syslog priority journald reads from a `<N>` line prefix.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// `text` with the `<N>` prefix on every line; blank lines (spacing meant for a terminal) are left out.
pub fn with_priority(level: Level, text: &str) -> String {
    let p = priority(level);
    let mut out = String::with_capacity(text.len() + 4);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        out.push_str(&format!("<{p}>{line}\n"));
    }
    if out.is_empty() {
        out.push_str(&format!("<{p}>\n"));
    }
    out
}

/// One line for stderr that is not a tracing event (the final error of a command, a usage error): as it is
/// on a terminal or in a file, with its priority prefix when stderr is the journal.
pub fn stderr_text(level: Level, text: &str) -> String {
    if stderr_is_journal() { with_priority(level, text) } else { format!("{}\n", text.trim_end_matches('\n')) }
}

/// Write one such line to stderr (see [`stderr_text`]); a failed write is dropped and counted.
pub fn stderr_line(level: Level, text: &str) {
    write_stderr(&stderr_text(level, text));
}

/// Lines written to stderr (log events and the final error of a command) that could not be written.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How many stderr lines were dropped so far because writing them failed.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

fn count_dropped(text: &[u8]) {
    let lines = text.iter().filter(|&&b| b == b'\n').count().max(1);
    DROPPED.fetch_add(lines as u64, Ordering::Relaxed);
}

/// Write `text` to stderr as it is; a failure drops it and counts its lines.
pub fn write_stderr(text: &str) {
    write_or_count(text.as_bytes());
}

/// Write `bytes` to stderr (unbuffered: nothing to flush); a failure drops them and counts their lines.
fn write_or_count(bytes: &[u8]) {
    if std::io::stderr().lock().write_all(bytes).is_err() {
        count_dropped(bytes);
    }
}

/// The writer behind every log event: stderr, where a failed write is dropped and counted instead of being
/// reported (tracing-subscriber would print the error to the same broken stderr, which panics on EPIPE).
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_or_count(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Make sure file descriptors 0, 1 and 2 are open (on `/dev/null` when they were closed), so a file the
/// program opens later never becomes "stderr" and receives log lines.
pub fn ensure_std_fds() {
    use std::os::fd::{AsRawFd, IntoRawFd};
    for _ in 0..3 {
        let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") else { return };
        if null.as_raw_fd() > 2 {
            return;
        }
        // The lowest free descriptor was one of 0, 1, 2: keep it open for the life of the process.
        let _ = null.into_raw_fd();
    }
}

/// Events for the journal: `<N>`, the target when it is not ours, the message and its fields.
struct JournalFormat;

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut text = String::new();
        if !ours(meta.target()) {
            text.push_str(meta.target());
            text.push_str(": ");
        }
        ctx.format_fields(Writer::new(&mut text), event)?;
        writer.write_str(&with_priority(*meta.level(), &text))
    }
}

/// Set up logging for a binary. `RUST_LOG` wins over `-v`/`-q`.
pub fn init(verbose: u8, quiet: bool) {
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty());
    let filter = from_env
        .as_deref()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(directives(verbose, quiet)));
    // Whose event it is matters once other crates speak.
    let targets = from_env.is_some() || verbose >= 3;
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| LossyStderr).log_internal_errors(false);
    let _ = if stderr_is_journal() {
        builder.with_ansi(false).event_format(JournalFormat).try_init()
    } else {
        builder.with_target(targets).with_ansi(std::io::stderr().is_terminal()).try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_per_verbosity() {
        assert_eq!(directives(0, false), "warn,ec_ipxe_qemu=info,ec_macvtap=info");
        assert_eq!(directives(1, false), "warn,ec_ipxe_qemu=debug,ec_macvtap=debug");
        assert_eq!(directives(2, false), "warn,ec_ipxe_qemu=trace,ec_macvtap=trace");
        assert_eq!(directives(3, false), "trace");
        assert_eq!(directives(2, true), "error");
        for v in 0..5 {
            assert!(EnvFilter::try_new(directives(v, false)).is_ok());
        }
    }

    #[test]
    fn our_targets() {
        assert!(ours("ec_ipxe_qemu") && ours("ec_ipxe_qemu::link") && ours("ec_macvtap"));
        assert!(!ours("netlink_proto::connection") && !ours("ec_ipxe_qemu_x") && !ours("hyper"));
    }

    #[test]
    fn journal_stream_must_name_this_file() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(journal_stream_matches("8:12345\n", 8, 12345));
        assert!(!journal_stream_matches("8:12346", 8, 12345));
        assert!(!journal_stream_matches("9:12345", 8, 12345));
        assert!(!journal_stream_matches("", 8, 12345));
        assert!(!journal_stream_matches("8", 8, 12345));
        assert!(!journal_stream_matches("x:y", 8, 12345));
    }

    #[test]
    fn every_line_has_its_priority() {
        assert_eq!(with_priority(Level::ERROR, "a: b"), "<3>a: b\n");
        assert_eq!(with_priority(Level::WARN, "one\ntwo\n"), "<4>one\n<4>two\n");
        assert_eq!(with_priority(Level::ERROR, "error: x\n\nmore\n"), "<3>error: x\n<3>more\n");
        assert_eq!(with_priority(Level::INFO, "x"), "<6>x\n");
        assert_eq!(with_priority(Level::DEBUG, ""), "<7>\n");
        assert_eq!(with_priority(Level::TRACE, "t"), "<7>t\n");
    }
}
