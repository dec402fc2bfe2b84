//! Build-time helper (cargo feature `gen-assets`, not installed): writes man pages and shell completions
//! for both binaries, generated from their clap definitions.
//!
//! `ec-gen-assets OUTDIR` writes `OUTDIR/man/*.1` and `OUTDIR/completions/{NAME.bash,_NAME,NAME.fish}`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use ec_ipxe_qemu::cli::launcher::LauncherCli;
use ec_ipxe_qemu::cli::macvtap::MacvtapCli;

fn man_pages(cmd: &clap::Command, prefix: &str, dir: &Path) -> std::io::Result<()> {
    let name = if prefix.is_empty() { cmd.get_name().to_owned() } else { format!("{prefix}-{}", cmd.get_name()) };
    let page = cmd.clone().name(name.clone());
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    std::fs::write(dir.join(format!("{name}.1")), buf)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        man_pages(sub, &name, dir)?;
    }
    Ok(())
}

fn generate(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    for mut cmd in [MacvtapCli::command(), LauncherCli::command()] {
        cmd.build();
        man_pages(&cmd, "", &man)?;
        let name = cmd.get_name().to_owned();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            clap_complete::generate_to(shell, &mut cmd, &name, &completions)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: ec-gen-assets OUTDIR");
        return ExitCode::from(2);
    };
    match generate(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ec-gen-assets: write assets under {}: {e}", out.display());
            ExitCode::from(1)
        }
    }
}
