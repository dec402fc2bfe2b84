use crate::cli::macvtap::{Global, ShowArgs};
use crate::error::Result;
use crate::macvtap;

pub fn run(global: &Global, args: &ShowArgs) -> Result<()> {
    let list = macvtap::show(global.netns.as_ref(), args.name.as_ref())?;
    match (global.json, &args.name) {
        (true, Some(_)) => crate::commands::print_json(&list.first()),
        (true, None) => crate::commands::print_json(&list),
        (false, _) if list.is_empty() => Ok(()),
        (false, _) => {
            crate::commands::write_stdout(&list.iter().map(|i| i.human_line()).collect::<Vec<_>>().join("\n"))
        }
    }
}
