//! `ec-macvtap probe`: the report on stdout (JSON under `--json`), exit 1 when a check got no answer.

use std::process::ExitCode;

use crate::cli::macvtap::{Global, ProbeArgs};
use crate::error::Result;
use crate::probe;

pub fn run(global: &Global, args: &ProbeArgs) -> Result<ExitCode> {
    let report = probe::probe(global.netns.as_ref(), &args.to_options())?;
    let text = if global.json { crate::commands::json_text(&report)? } else { report.human_lines().join("\n") };
    crate::commands::write_stdout(&text)?;
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
