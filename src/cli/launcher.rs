//! `ec-ipxe-qemu`: run (or print the argv of) a QEMU guest that netboots with iPXE.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::launcher::config::{BootUrl, ByteSize, HostForward, Hostname, MemSize, NicModel};
use crate::names::IfName;

#[derive(Debug, Parser)]
#[command(
    name = "ec-ipxe-qemu",
    version,
    about = "Keep a QEMU guest running that netboots with iPXE over user-mode networking, optionally on the LAN \
             through a macvtap",
    long_about = "Prepares a state directory (boot script, persistent qcow2, lock), starts QEMU with a user-mode boot \
                  NIC whose iPXE chains to a boot URL, optionally adds a LAN NIC on an existing macvtap (see \
                  ec-macvtap), and supervises QEMU until it exits or a stop signal arrives.\n\n\
                  Exit codes: 0 ok (guest powered off, or stop requested), 1 runtime failure (QEMU failed or was \
                  killed, the guest stopped running, the LAN link vanished), 2 usage or invalid input (also a QEMU \
                  that rejects its command line), 3 not found (the --lan-interface link), 4 conflict (the state \
                  directory or the macvtap is in use by another run, a port is taken), 5 permission denied."
)]
pub struct LauncherCli {
    /// More logs on stderr (repeatable).
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
    PrintArgs(LaunchArgs),
}

/// `--accel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AccelChoice {
    /// KVM when /dev/kvm can be opened read-write, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Args, Clone)]
pub struct LaunchArgs {
    /// Holds disk.qcow2, the generated boot.ipxe, the QMP socket, the lock and the serial log. Created with mode
    /// 0700 when missing.
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
    #[arg(long, value_name = "N", default_value_t = 2, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..=255),
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
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto, help_heading = "Guest")]
    pub accel: AccelChoice,
    /// QEMU binary (a path, or a name looked up on PATH).
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64", help_heading = "Guest")]
    pub qemu: PathBuf,
    /// qemu-img binary, used only to create a missing disk.
    #[arg(long, value_name = "PATH", default_value = "qemu-img", help_heading = "Guest")]
    pub qemu_img: PathBuf,
    /// Where the serial console goes (truncated on every start). Default: <state-dir>/serial.log.
    #[arg(long, value_name = "PATH", help_heading = "Guest")]
    pub serial_log: Option<PathBuf>,

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
    #[arg(long, value_name = "N", default_value_t = 1, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..=16),
          requires = "lan_interface", help_heading = "LAN")]
    pub lan_queues: u32,

    /// Seconds between asking the guest to power off (SIGTERM/SIGINT) and quitting QEMU (0 to 3600).
    #[arg(long, value_name = "SECS", default_value_t = 30, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(0..=3600),
          help_heading = "Lifecycle")]
    pub shutdown_timeout: u64,

    /// Extra arguments appended to QEMU's command line as they are.
    #[arg(last = true, value_name = "EXTRA_QEMU_ARGS")]
    pub extra: Vec<String>,
}
