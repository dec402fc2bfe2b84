//! `ec-macvtap`: create, delete, show and hand on macvtap links.
//!
//! The doc comments of the arguments are clap's `--help` text and the man pages: `USER[:GROUP]` is meant
//! literally.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::names::{IfName, MacAddr, MacvtapMode, OwnerSpec};
use crate::netns::NetnsSpec;
use crate::probe::ProbeOptions;

#[derive(Debug, Parser)]
#[command(
    name = "ec-macvtap",
    version,
    about = "Create, delete, show and hand on macvtap links over rtnetlink",
    long_about = "Creates a macvtap on a wired parent NIC (no bridge, the host's own addresses untouched), makes its \
                  tap device usable by an unprivileged user, and passes opened, verified tap fds to a program such as QEMU.\n\n\
                  Exit codes: 0 ok, 1 runtime failure, 2 usage or invalid input, 3 not found, 4 conflict (exists, \
                  foreign or different), 5 permission denied."
)]
pub struct MacvtapCli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: MacvtapCommand,
}

#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Operate inside this network namespace: a name under /run/netns or a path like /proc/PID/ns/net.
    #[arg(long, global = true, value_name = "NAME|PATH")]
    pub netns: Option<NetnsSpec>,
    /// Machine output on stdout (errors too).
    #[arg(short, long, global = true)]
    pub json: bool,
    /// More logs on stderr: -v our debug lines (each netlink request, each decision), -vv our trace, -vvv the
    /// libraries' too. RUST_LOG, when set, wins.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum MacvtapCommand {
    /// Create the macvtap on PARENT, bring it up and make its tap device usable by OWNER.
    Create(CreateArgs),
    /// Delete the macvtap if ec-macvtap created it; a missing link is success.
    Delete(DeleteArgs),
    /// List macvtaps (all, or one) with their details.
    Show(ShowArgs),
    /// Open the tap device, put the fds at 3, 4, ... and exec PROGRAM with {fd}/{fds} replaced.
    Exec(ExecArgs),
    /// Test the LAN attach with no VM: DHCP and HDHomeRun discovery through the macvtap's tap, as its MAC.
    #[command(long_about = "Test the LAN attach with no VM: open one queue of NAME's tap and speak as the \
                      macvtap's MAC. DHCP: DISCOVER, OFFER, REQUEST, ACK, then DHCPRELEASE (no lease is left \
                      behind, also after an error or SIGINT/SIGTERM). From the leased address (answering ARP for \
                      it), an HDHomeRun discovery broadcast (UDP 65001) collects the tuners that answer. The \
                      frames seen are counted, and an IPv6 all-nodes echo tells a segment that hears us from one \
                      that drops our frames (switch port security).\n\n\
                      Exit codes: 0 every asked-for check got an answer, 1 something did not (one `problem:` line \
                      each, saying what that usually means), 2 usage, 3 no such link, 4 the tap is held by \
                      another process (a running guest would lose frames; --force probes anyway), 5 permission \
                      denied.")]
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The wired parent NIC, e.g. eno1.
    #[arg(long, value_name = "PARENT")]
    pub link: IfName,
    /// Name of the macvtap.
    #[arg(long, default_value = "ec-lan0")]
    pub name: IfName,
    /// Macvtap mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Bridge)]
    pub mode: ModeArg,
    /// Unicast MAC; default: derived from the app-specific machine id (HMAC-SHA256), the name and the parent
    /// (stable across restarts).
    #[arg(long)]
    pub mac: Option<MacAddr>,
    /// MTU of the macvtap (default: the parent's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(68..=65535))]
    pub mtu: Option<u32>,
    /// Give the tap device node to USER[:GROUP] with mode 0600.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub owner: Option<OwnerSpec>,
    /// Recreate our own link when it exists with a different configuration.
    #[arg(long)]
    pub replace: bool,
}

/// `--mode`, as `ip link` names the macvtap modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Bridge,
    Vepa,
    Private,
    Passthru,
}

impl From<ModeArg> for MacvtapMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Bridge => MacvtapMode::Bridge,
            ModeArg::Vepa => MacvtapMode::Vepa,
            ModeArg::Private => MacvtapMode::Private,
            ModeArg::Passthru => MacvtapMode::Passthru,
        }
    }
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The macvtap to delete.
    pub name: IfName,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Only this macvtap.
    pub name: Option<IfName>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The macvtap whose tap device to open.
    #[arg(long)]
    pub name: IfName,
    /// Number of queues (fds) to open; more than one uses IFF_MULTI_QUEUE.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub queues: u32,
    /// The program and its arguments; {fd} becomes the first fd, {fds} the colon-separated list.
    #[arg(last = true, required = true, value_name = "PROGRAM [ARGS]...")]
    pub program: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The macvtap to probe through.
    #[arg(long)]
    pub name: IfName,
    /// Seconds to wait for DHCP answers, 1 to 300 (tuner discovery then listens 1.5 s, or SECS when shorter).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout: u64,
    /// No DHCP; tuner discovery asks from a link-local address (169.254.x.y, from the MAC) instead.
    #[arg(long)]
    pub no_dhcp: bool,
    /// No HDHomeRun discovery.
    #[arg(long)]
    pub no_tuners: bool,
    /// Probe even while another process (a running guest) holds the tap; it loses frames to the probe meanwhile.
    #[arg(long)]
    pub force: bool,
}

impl ProbeArgs {
    pub fn to_options(&self) -> ProbeOptions {
        ProbeOptions {
            name: self.name.clone(),
            timeout: Duration::from_secs(self.timeout),
            dhcp: !self.no_dhcp,
            tuners: !self.no_tuners,
            force: self.force,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<MacvtapCli, clap::Error> {
        MacvtapCli::try_parse_from(["ec-macvtap"].iter().chain(argv))
    }

    #[test]
    fn modes_are_the_librarys() {
        for m in MacvtapMode::ALL {
            let cli = parse(&["create", "--link", "eth0", "--mode", m.as_str()]).unwrap();
            let MacvtapCommand::Create(a) = cli.command else { panic!("not create") };
            assert_eq!(MacvtapMode::from(a.mode), m);
        }
        let cli = parse(&["create", "--link", "eth0"]).unwrap();
        let MacvtapCommand::Create(a) = cli.command else { panic!("not create") };
        assert_eq!(MacvtapMode::from(a.mode), MacvtapMode::default());
        assert!(
            parse(&["create", "--link", "eth0", "--mode", "passthrough"]).unwrap_err().to_string().contains("--mode")
        );
    }

    #[test]
    fn j_is_json_anywhere() {
        for argv in [&["-j", "show"][..], &["show", "-j"], &["show", "--json"], &["-vj", "delete", "x"]] {
            assert!(parse(argv).unwrap().global.json, "{argv:?}");
        }
        assert!(!parse(&["show"]).unwrap().global.json);
    }

    #[test]
    fn bad_values_are_usage_errors_naming_the_option() {
        for (argv, needle) in [
            (&["create", "--link", "a/b"][..], "--link"),
            (&["create", "--link", "eth0", "--mac", "01:00:00:00:00:01"], "--mac"),
            (&["create", "--link", "eth0", "--mtu", "67"], "--mtu"),
            (&["exec", "--name", "x", "--queues", "17", "--", "true"], "--queues"),
            (&["--netns", "", "show"], "--netns"),
        ] {
            let err = parse(argv).unwrap_err().to_string();
            assert!(err.contains(needle), "{argv:?}: {err}");
        }
    }
}
