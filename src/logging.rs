//! tracing to stderr. `RUST_LOG` wins over `-v`/`-q`; under systemd (`JOURNAL_STREAM`) no timestamps or
//! colour, since the journal adds its own.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(!journal && std::io::stderr().is_terminal());
    let _ = if journal { builder.without_time().try_init() } else { builder.try_init() };
}
