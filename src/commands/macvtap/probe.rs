//! `ec-macvtap probe`: the report on stdout (JSON under `--json`), exit 1 when a check got no answer.

use std::process::ExitCode;

use crate::cli::macvtap::{Global, ProbeArgs};
use crate::error::Result;
use crate::probe;

pub fn run(global: &Global, args: &ProbeArgs) -> Result<ExitCode> {
    let report = probe::probe(global.netns.as_ref(), &args.to_options())?;
    if global.json {
        crate::commands::print_json(&report)?;
    } else {
        for line in report.human_lines() {
            println!("{line}");
        }
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
