use crate::cli::macvtap::{DeleteArgs, Global};
use crate::error::Result;
use crate::macvtap;

pub fn run(global: &Global, args: &DeleteArgs) -> Result<()> {
    let out = macvtap::delete(global.netns.as_ref(), &args.name)?;
    if global.json {
        crate::commands::print_json(&out)
    } else {
        crate::commands::write_stdout(&match out.result {
            "deleted" => format!("{}: deleted", out.name),
            _ => format!("{}: already absent (no such link in {})", out.name, out.netns),
        })
    }
}
