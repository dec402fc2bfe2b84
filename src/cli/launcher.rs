//! `ec-ipxe-qemu`: run (or print the argv of) a QEMU guest that netboots with iPXE.
//!
//! The arguments convert into the launcher's `LaunchOptions` ([`LaunchArgs::to_options`]); values parse with
//! the library types' `FromStr`, so clap reports a malformed one as a usage error naming the option.
//!
//! The doc comments of the arguments are clap's `--help` text and the man pages, written for a terminal, not
//! for rustdoc: `[tcp|udp]` and `<state-dir>` are meant literally.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::launcher::accel::AccelChoice;
use crate::launcher::credentials::{CredentialArg, ENV_DIRECTORY};
use crate::launcher::option_values::{BootUrl, ByteSize, HostForward, Hostname, LogCap, MemSize, NicModel};
use crate::launcher::options::{
    LaunchOptions, MAX_CPUS, MAX_LAN_QUEUES, MAX_READY_TIMEOUT_SECS, MAX_SHUTDOWN_TIMEOUT_SECS,
};
use crate::launcher::vhost::VhostMode;
use crate::names::IfName;

#[derive(Debug, Parser)]
#[command(
    name = "ec-ipxe-qemu",
    version,
    about = "Keep a QEMU guest running that netboots with iPXE over user-mode networking, optionally on the LAN \
             through a macvtap",
    long_about = "Prepares a state directory (boot script, persistent qcow2, lock), starts QEMU with a user-mode boot \
                  NIC whose iPXE chains to a boot URL, optionally adds a LAN NIC on an existing macvtap (see \
                  ec-macvtap), and supervises QEMU until it exits or a stop signal (SIGTERM, SIGINT or SIGHUP; SIGPIPE, \
                  SIGUSR1 and SIGUSR2 are ignored) arrives.\n\n\
                  Exit codes: 0 ok (guest powered off, or stop requested), 1 runtime failure (QEMU failed or was \
                  killed, the guest stopped running, the LAN link vanished), 2 usage or invalid input (also a QEMU \
                  that rejects its command line), 3 not found (the --lan-interface link), 4 conflict (the state \
                  directory or the macvtap is in use by another run, a port is taken, the disk is locked by another \
                  process), 5 permission denied."
)]
pub struct LauncherCli {
    /// More logs on stderr: -v our debug lines (each netlink request, each decision), -vv our trace, -vvv the
    /// libraries' too. RUST_LOG, when set, wins.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: LauncherCommand,
}

#[derive(Debug, Subcommand)]
pub enum LauncherCommand {
    /// Prepare the state directory, start QEMU and supervise it until it exits or a stop signal arrives.
    Run(LaunchArgs),
    /// Print the exact QEMU argv `run` would use, as a JSON array, and exit. No side effects.
    PrintArgs(PrintArgsArgs),
    /// Check everything `run` depends on with these options, as this user, without starting anything.
    #[command(long_about = "Check everything `run` depends on with the same options, as this user, without \
                      starting anything: the options, QEMU and its version, the accelerator (KVM tried with a \
                      one-second QEMU run), the iPXE image, the boot URL (HEAD, then GET, from the host) or boot \
                      directory, the state directory and disk, the LAN macvtap (ours, up, carrier, not in use, its \
                      tap openable by this user) and its parent (wired, up, carrier), and /dev/vhost-net. One \
                      line per check: ok, warn or fail, with a hint.\n\n\
                      Exit codes: 0 no check failed (warnings allowed), 1 a check failed, 2 usage.")]
    Doctor(DoctorArgs),
    /// Show what the launcher in DIR knows about its guest (stage, readiness, addresses), from its
    /// status.json. Exit 3 when no launcher holds DIR (the last known status is still shown).
    Status(StatusArgs),
    /// Attach this terminal to the live guest console of the launcher in DIR (Ctrl-] detaches). Several
    /// viewers may watch; the first one to type holds the keyboard.
    Console(ConsoleArgs),
}

#[derive(Debug, Args, Clone)]
pub struct StatusArgs {
    /// The launcher's state directory.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Machine output: one JSON object (status.json's fields and "running").
    #[arg(short, long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ConsoleArgs {
    /// The launcher's state directory.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
}

impl LauncherCommand {
    /// Whether machine output (and JSON errors) was asked for.
    pub fn json(&self) -> bool {
        match self {
            LauncherCommand::Run(_) => false,
            LauncherCommand::PrintArgs(a) => a.json,
            LauncherCommand::Doctor(a) => a.json,
            LauncherCommand::Status(a) => a.json,
            LauncherCommand::Console(_) => false,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct PrintArgsArgs {
    #[command(flatten)]
    pub launch: LaunchArgs,
    /// Machine output: the argv is JSON either way; errors become a JSON object on stdout too.
    #[arg(short, long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub launch: LaunchArgs,
    /// Machine output: `[{"check", "status", "detail", "hint"}]` (errors as a JSON object).
    #[arg(short, long)]
    pub json: bool,
}

/// `--accel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    /// KVM when /dev/kvm can be opened read-write, else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl From<AccelArg> for AccelChoice {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => AccelChoice::Auto,
            AccelArg::Kvm => AccelChoice::Kvm,
            AccelArg::Tcg => AccelChoice::Tcg,
        }
    }
}

/// `--lan-vhost`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VhostArg {
    /// vhost-net when /dev/vhost-net opens; otherwise one log line and the LAN NIC works without it.
    Auto,
    /// vhost-net or fail (exit 3 when the device is missing, 5 when it is refused).
    On,
    Off,
}

impl From<VhostArg> for VhostMode {
    fn from(a: VhostArg) -> Self {
        match a {
            VhostArg::Auto => VhostMode::Auto,
            VhostArg::On => VhostMode::On,
            VhostArg::Off => VhostMode::Off,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct LaunchArgs {
    /// Holds disk.qcow2, the generated boot.ipxe, the QMP and console sockets, the lock, status.json and the
    /// serial log. Created with mode 0700 when missing.
    #[arg(long, value_name = "DIR", help_heading = "State")]
    pub state_dir: PathBuf,

    /// Chain target of the boot script (http, https or tftp). Without it (and without --boot-dir) the built-in
    /// diagnostics script runs.
    #[arg(long, value_name = "URL", conflicts_with = "boot_dir", help_heading = "Boot")]
    pub boot_url: Option<BootUrl>,
    /// Serve DIR over HTTP on the host's loopback and chain to netboot.ipxe in it (the guest reaches it at
    /// 10.0.2.2).
    #[arg(long, value_name = "DIR", help_heading = "Boot")]
    pub boot_dir: Option<PathBuf>,
    /// The verified boot cache: iPXE chains to the launcher's loopback server, which fetches every file under
    /// the boot URL's directory with the host's TLS, keeps it in <state-dir>/boot-cache and serves the last good
    /// set when the origin fails. Default: on for an http:// or https:// --boot-url, off otherwise.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off, help_heading = "Boot")]
    pub boot_cache: Option<bool>,
    /// A PEM file of CA certificates the boot cache trusts for the origin, besides the system's roots
    /// (repeatable).
    #[arg(long, value_name = "FILE", help_heading = "Boot")]
    pub boot_ca: Vec<PathBuf>,
    /// Address the --boot-dir server listens on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1", requires = "boot_dir", help_heading = "Boot")]
    pub boot_http_bind: IpAddr,
    /// Port of the --boot-dir server (0 to 65535; 0: a free port).
    #[arg(long, value_name = "PORT", default_value_t = 0, requires = "boot_dir", help_heading = "Boot")]
    pub boot_http_port: u16,
    /// Boot this iPXE image (e.g. an HTTPS-capable ipxe.lkrn) with the generated script as its initrd, instead
    /// of the boot NIC's option ROM.
    #[arg(long, value_name = "FILE", help_heading = "Boot")]
    pub ipxe: Option<PathBuf>,
    /// DNS server for iPXE (repeatable; iPXE uses the first IPv4 one).
    #[arg(long, value_name = "ADDR", help_heading = "Boot")]
    pub dns: Vec<IpAddr>,
    /// Host name the user-mode DHCP server hands to the guest.
    #[arg(long, value_name = "NAME", help_heading = "Boot")]
    pub hostname: Option<Hostname>,
    /// QEMU device model of the boot NIC (PCI 00:03.0).
    #[arg(long, value_name = "MODEL", default_value = "virtio-net-pci", help_heading = "Boot")]
    pub boot_nic_model: NicModel,
    /// Forward a host port to the guest, QEMU hostfwd syntax: [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT
    /// (repeatable).
    #[arg(long, value_name = "RULE", help_heading = "Boot")]
    pub host_forward: Vec<HostForward>,

    /// Guest memory: a number of MiB or a size with a unit (512M, 2G; K/M/G/T are powers of 1024). Range 64M
    /// to 1T.
    #[arg(long, value_name = "SIZE", default_value = "2048", allow_hyphen_values = true, help_heading = "Guest")]
    pub memory: MemSize,
    /// Virtual CPUs (1 to 255).
    #[arg(long, value_name = "N", default_value_t = 2, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CPUS)),
          help_heading = "Guest")]
    pub cpus: u32,
    /// Persistent disk image (qcow2), created with qemu-img only when missing and never overwritten.
    /// Default: <state-dir>/disk.qcow2.
    #[arg(long, value_name = "PATH", conflicts_with = "no_disk", help_heading = "Guest")]
    pub disk: Option<PathBuf>,
    /// Size of the disk when it is created (e.g. 8G, 512M; K/M/G/T are powers of 1024). Range 1M to 64T.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "8G",
        allow_hyphen_values = true,
        conflicts_with = "no_disk",
        help_heading = "Guest"
    )]
    pub disk_size: ByteSize,
    /// No persistent disk.
    #[arg(long, help_heading = "Guest")]
    pub no_disk: bool,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto, help_heading = "Guest")]
    pub accel: AccelArg,
    /// QEMU binary (a path, or a name looked up on PATH).
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64", help_heading = "Guest")]
    pub qemu: PathBuf,
    /// qemu-img binary, used only to create a missing disk.
    #[arg(long, value_name = "PATH", default_value = "qemu-img", help_heading = "Guest")]
    pub qemu_img: PathBuf,
    /// Where the launcher keeps the raw guest console; the previous boot's file becomes PATH.1 at start.
    /// Default: <state-dir>/serial.log.
    #[arg(long, value_name = "PATH", help_heading = "Guest")]
    pub serial_log: Option<PathBuf>,
    /// Cap of the serial log (16K to 64T; K/M/G/T are powers of 1024): past it, the log keeps its first half
    /// (the boot) and the latest output.
    #[arg(long, value_name = "SIZE", default_value = "16M", allow_hyphen_values = true, help_heading = "Guest")]
    pub serial_log_max: LogCap,

    /// An existing macvtap (see ec-macvtap): the guest gets a second NIC (PCI 00:04.0) on it, with its MAC and
    /// no option ROM.
    #[arg(long, value_name = "NAME", help_heading = "LAN")]
    pub lan_interface: Option<IfName>,
    /// QEMU device model of the LAN NIC.
    #[arg(
        long,
        value_name = "MODEL",
        default_value = "virtio-net-pci",
        requires = "lan_interface",
        help_heading = "LAN"
    )]
    pub lan_nic_model: NicModel,
    /// Queues of the LAN NIC, 1 to 16 (more than one needs a virtio model).
    #[arg(long, value_name = "N", default_value_t = 1, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_LAN_QUEUES)),
          requires = "lan_interface", help_heading = "LAN")]
    pub lan_queues: u32,
    /// vhost-net for the LAN NIC: the kernel moves its packets instead of QEMU's userspace. One /dev/vhost-net
    /// fd per queue is opened and handed to QEMU (virtio-net models only).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = VhostArg::Auto, requires = "lan_interface",
          help_heading = "LAN")]
    pub lan_vhost: VhostArg,

    /// Regular expression for the guest console line that means the guest is ready (READY=1 to systemd).
    /// Default: the diagnostics' "ec-ipxe-qemu: boot path OK" or the publisher guest's "ec-publisher: ready".
    #[arg(long, value_name = "REGEX", help_heading = "Lifecycle")]
    pub ready_pattern: Option<String>,
    /// Seconds the guest has, from QEMU's start, to be ready; then the run ends with exit 1 (0 to 86400; 0: no
    /// limit).
    #[arg(long, value_name = "SECS", default_value_t = 0, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(0..=MAX_READY_TIMEOUT_SECS),
          help_heading = "Lifecycle")]
    pub ready_timeout: u64,
    /// Seconds between asking a ready guest to power off (SIGTERM/SIGINT/SIGHUP) and quitting QEMU (0 to 3600). A
    /// guest that is not ready yet (firmware, iPXE) is quit at once.
    #[arg(long, value_name = "SECS", default_value_t = 30, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(0..=MAX_SHUTDOWN_TIMEOUT_SECS),
          help_heading = "Lifecycle")]
    pub shutdown_timeout: u64,

    /// A systemd credential for the guest (repeatable): QEMU reads FILE itself and hands it over as the fw_cfg
    /// file opt/io.systemd.credentials/NAME, which a systemd guest imports as a system credential. The value
    /// never enters a command line or a log. NAME: printable ASCII without / or :, not . or .., at most 28
    /// bytes (split at the first =); FILE: a regular file, at most 1 MiB (all together at most 1 MiB, at most
    /// 16 credentials). Missing or bad: exit 2; unreadable by this user: exit 5.
    #[arg(long, value_name = "NAME=FILE", help_heading = "Credentials")]
    pub credential: Vec<CredentialArg>,
    /// Pass every regular file in DIR as a credential named after the file (symlinks and other entries are
    /// skipped). Default: $CREDENTIALS_DIRECTORY when set (not empty), where systemd puts the unit's
    /// LoadCredential= files.
    #[arg(long, value_name = "DIR", help_heading = "Credentials")]
    pub credentials_from: Option<PathBuf>,

    /// Extra arguments appended to QEMU's command line as they are.
    #[arg(last = true, value_name = "EXTRA_QEMU_ARGS")]
    pub extra: Vec<String>,
}

/// `on` or `off`.
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("\"{s}\" is neither on nor off")),
    }
}

impl LaunchArgs {
    /// The library's options: one field per option, nothing checked beyond what parsing did. The one default
    /// taken from the environment: `--credentials-from` is `$CREDENTIALS_DIRECTORY` when systemd set it.
    pub fn to_options(&self) -> LaunchOptions {
        LaunchOptions {
            state_dir: self.state_dir.clone(),
            boot_url: self.boot_url.clone(),
            boot_dir: self.boot_dir.clone(),
            boot_cache: self.boot_cache,
            boot_ca: self.boot_ca.clone(),
            boot_http_bind: self.boot_http_bind,
            boot_http_port: self.boot_http_port,
            ipxe: self.ipxe.clone(),
            dns: self.dns.clone(),
            hostname: self.hostname.clone(),
            boot_nic_model: self.boot_nic_model.clone(),
            host_forwards: self.host_forward.clone(),
            memory: self.memory,
            cpus: self.cpus,
            disk: self.disk.clone(),
            disk_size: self.disk_size,
            no_disk: self.no_disk,
            accel: self.accel.into(),
            qemu: self.qemu.clone(),
            qemu_img: self.qemu_img.clone(),
            serial_log: self.serial_log.clone(),
            serial_log_max: self.serial_log_max,
            ready_pattern: self.ready_pattern.clone(),
            ready_timeout: (self.ready_timeout > 0).then(|| Duration::from_secs(self.ready_timeout)),
            lan_interface: self.lan_interface.clone(),
            lan_nic_model: self.lan_nic_model.clone(),
            lan_queues: self.lan_queues,
            lan_vhost: self.lan_vhost.into(),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
            credentials: self.credential.clone(),
            credentials_from: self
                .credentials_from
                .clone()
                .or_else(|| std::env::var_os(ENV_DIRECTORY).filter(|v| !v.is_empty()).map(PathBuf::from)),
            extra: self.extra.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<LauncherCli, clap::Error> {
        LauncherCli::try_parse_from(["ec-ipxe-qemu"].iter().chain(argv))
    }

    fn args(extra: &[&str]) -> Result<LaunchArgs, clap::Error> {
        let mut v = vec!["run"];
        v.extend_from_slice(extra);
        parse(&v).map(|c| match c.command {
            LauncherCommand::Run(a) => a,
            LauncherCommand::PrintArgs(a) => a.launch,
            LauncherCommand::Doctor(a) => a.launch,
            other => panic!("not a launch command: {other:?}"),
        })
    }

    #[test]
    fn credentials_parse_and_repeat() {
        let a = args(&[
            "--state-dir",
            "/x",
            "--credential",
            "mesh-key=/run/keys/k",
            "--credential",
            "ec.tuners=t=1",
            "--credentials-from",
            "/run/c",
        ])
        .unwrap()
        .to_options();
        let got: Vec<(&str, &str)> =
            a.credentials.iter().map(|c| (c.name.as_str(), c.path.to_str().unwrap())).collect();
        assert_eq!(got, [("mesh-key", "/run/keys/k"), ("ec.tuners", "t=1")]);
        assert_eq!(a.credentials_from, Some(PathBuf::from("/run/c")));
        for (bad, says) in [("a:b=/f", "contains ':'"), ("=f", "is empty"), ("k", "is not NAME=FILE")] {
            let e = args(&["--state-dir", "/x", "--credential", bad]).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("--credential") && e.to_string().contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn clap_rejects_bad_values_naming_the_option() {
        let cases: &[(&[&str], &str)] = &[
            (&["--state-dir", "/x", "--memory", "0"], "--memory"),
            (&["--state-dir", "/x", "--memory", "-5"], "--memory"),
            (&["--state-dir", "/x", "--memory", "99999999"], "--memory"),
            (&["--state-dir", "/x", "--cpus", "0"], "--cpus"),
            (&["--state-dir", "/x", "--ready-timeout", "-1"], "--ready-timeout"),
            (&["--state-dir", "/x", "--ready-timeout", "86401"], "--ready-timeout"),
            (&["--state-dir", "/x", "--serial-log-max", "1K"], "--serial-log-max"),
            (&["--state-dir", "/x", "--cpus", "256"], "--cpus"),
            (&["--state-dir", "/x", "--disk-size", "0"], "--disk-size"),
            (&["--state-dir", "/x", "--disk-size", "-8G"], "--disk-size"),
            (&["--state-dir", "/x", "--cpus", "-1"], "--cpus"),
            (&["--state-dir", "/x", "--shutdown-timeout", "-1"], "--shutdown-timeout"),
            (&["--state-dir", "/x", "--shutdown-timeout", "3601"], "--shutdown-timeout"),
            (&["--state-dir", "/x", "--boot-url", "gopher://x/"], "--boot-url"),
            (&["--state-dir", "/x", "--host-forward", "bad"], "--host-forward"),
            (&["--state-dir", "/x", "--boot-url", "http://a/", "--boot-dir", "/tmp"], "--boot-dir"),
            (&["--state-dir", "/x", "--no-disk", "--disk", "/a.qcow2"], "--disk"),
            (&["--state-dir", "/x", "--lan-queues", "2"], "--lan-interface"),
            (&["--state-dir", "/x", "--lan-vhost", "on"], "--lan-interface"),
            (&["--state-dir", "/x", "--lan-interface", "x", "--lan-vhost", "yes"], "--lan-vhost"),
            (&["--state-dir", "/x", "--lan-interface", "x", "--lan-queues", "17"], "--lan-queues"),
            (&["--state-dir", "/x", "--boot-http-port", "8080"], "--boot-dir"),
            (&["--state-dir", "/x", "--lan-interface", "a/b"], "--lan-interface"),
            (&["--state-dir", "/x", "--accel", "hvf"], "--accel"),
            (&["--state-dir", "/x", "--boot-cache", "yes"], "--boot-cache"),
            (&["--memory", "512"], "--state-dir"),
        ];
        for (argv, needle) in cases {
            let err = args(argv).unwrap_err().to_string();
            assert!(err.contains(needle), "{argv:?}: {err}");
        }
    }

    #[test]
    fn boot_cache_flags() {
        let o =
            args(&["--state-dir=/s", "--boot-url=https://a/b", "--boot-cache=off", "--boot-ca=/c1", "--boot-ca=/c2"])
                .unwrap()
                .to_options();
        assert_eq!(o.boot_cache, Some(false));
        assert_eq!(o.boot_ca, [PathBuf::from("/c1"), PathBuf::from("/c2")]);
        assert_eq!(args(&["--state-dir=/s", "--boot-cache", "on"]).unwrap().to_options().boot_cache, Some(true));
    }

    #[test]
    fn defaults_are_the_librarys() {
        assert_eq!(args(&["--state-dir", "/x"]).unwrap().to_options(), LaunchOptions::new("/x"));
    }

    #[test]
    fn every_option_reaches_the_options() {
        let a = args(&[
            "--state-dir=/s",
            "--boot-dir=/b",
            "--boot-http-bind=0.0.0.0",
            "--boot-http-port=8080",
            "--ipxe=/i.lkrn",
            "--dns=1.1.1.1",
            "--dns=9.9.9.9",
            "--hostname=pub",
            "--boot-nic-model=e1000",
            "--host-forward=tcp::2222-:22",
            "--memory=1G",
            "--cpus=4",
            "--disk=/d.qcow2",
            "--disk-size=1G",
            "--accel=tcg",
            "--qemu=/q",
            "--qemu-img=/qi",
            "--serial-log=/l",
            "--lan-interface=ec-lan0",
            "--lan-nic-model=virtio-net-pci",
            "--lan-queues=2",
            "--lan-vhost=off",
            "--shutdown-timeout=5",
            "--",
            "-S",
        ])
        .unwrap()
        .to_options();
        let want = LaunchOptions {
            boot_dir: Some("/b".into()),
            boot_http_bind: "0.0.0.0".parse().unwrap(),
            boot_http_port: 8080,
            ipxe: Some("/i.lkrn".into()),
            dns: vec!["1.1.1.1".parse().unwrap(), "9.9.9.9".parse().unwrap()],
            hostname: Some("pub".parse().unwrap()),
            boot_nic_model: "e1000".parse().unwrap(),
            host_forwards: vec!["tcp::2222-:22".parse().unwrap()],
            memory: "1024".parse().unwrap(),
            cpus: 4,
            disk: Some("/d.qcow2".into()),
            disk_size: "1G".parse().unwrap(),
            accel: AccelChoice::Tcg,
            qemu: "/q".into(),
            qemu_img: "/qi".into(),
            serial_log: Some("/l".into()),
            lan_interface: Some("ec-lan0".parse().unwrap()),
            lan_queues: 2,
            lan_vhost: VhostMode::Off,
            shutdown_timeout: Duration::from_secs(5),
            extra: vec!["-S".into()],
            ..LaunchOptions::new("/s")
        };
        assert_eq!(a, want);
        let u = args(&["--state-dir=/s", "--boot-url=http://a/b", "--no-disk"]).unwrap().to_options();
        assert_eq!((u.boot_url.map(|u| u.to_string()), u.no_disk), (Some("http://a/b".into()), true));
    }

    #[test]
    fn json_is_j_on_print_args() {
        for flag in ["-j", "--json"] {
            let cli = parse(&["print-args", flag, "--state-dir", "/x"]).unwrap();
            assert!(cli.command.json(), "{flag}");
        }
        assert!(!parse(&["print-args", "--state-dir", "/x"]).unwrap().command.json());
    }

    /// doctor takes every run option (the NixOS wrapper passes the unit's own), and -j/--json.
    #[test]
    fn doctor_takes_the_run_options() {
        let argv =
            ["--state-dir", "/x", "--accel", "tcg", "--lan-interface", "ec-lan0", "--lan-queues", "2", "--", "-S"];
        let run = parse(&[&["run"][..], &argv].concat()).unwrap();
        let doc = parse(&[&["doctor", "-j"][..], &argv].concat()).unwrap();
        assert!(doc.command.json());
        let (LauncherCommand::Run(r), LauncherCommand::Doctor(d)) = (run.command, doc.command) else {
            panic!("not run and doctor")
        };
        assert_eq!(r.to_options(), d.launch.to_options());
    }
}
