//! `ec-ipxe-qemu console`: this terminal on the live guest console.

use crate::cli::launcher::ConsoleArgs;
use crate::error::Result;
use crate::launcher::console::client;

pub fn run(args: &ConsoleArgs) -> Result<()> {
    client::attach(&args.state_dir).map(|_| ())
}
