use crate::cli::macvtap::{CreateArgs, Global};
use crate::error::Result;
use crate::link::MacvtapSpec;
use crate::macvtap::{self, CreateRequest};
use crate::names::MacAddr;

pub fn run(global: &Global, args: &CreateArgs) -> Result<()> {
    // Everything that can be checked without the kernel is checked first.
    let mac = match args.mac {
        Some(m) => m,
        None => {
            let mac = MacAddr::derived(&macvtap::machine_id()?, &args.name, &args.link);
            tracing::debug!("MAC {mac}: derived from the machine id, \"{}\" and \"{}\"", args.name, args.link);
            mac
        }
    };
    let owner = args.owner.as_ref().map(macvtap::resolve_owner).transpose()?;
    let req = CreateRequest {
        spec: MacvtapSpec {
            name: args.name.clone(),
            parent: args.link.clone(),
            mode: args.mode.into(),
            mac,
            mtu: args.mtu,
        },
        owner,
        replace: args.replace,
    };
    let info = macvtap::create(global.netns.as_ref(), &req)?;
    if info.changed == Some(false) {
        tracing::info!(link = %info.name, "already present as asked; nothing changed");
    }
    if global.json { crate::commands::print_json(&info) } else { crate::commands::write_stdout(&info.human_line()) }
}
