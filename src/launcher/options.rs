//! What a caller asks of `run` and `print-args`, as plain values: no parsing framework, no checks beyond the
//! value types'. [`LaunchConfig::from_options`](super::config::LaunchConfig::from_options) validates them
//! against each other and the file system. The CLI builds these from its arguments (`cli::launcher`); a library
//! user starts from [`LaunchOptions::new`], which holds the same defaults.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use crate::launcher::accel::AccelChoice;
use crate::launcher::credentials::CredentialArg;
use crate::launcher::option_values::{BootUrl, ByteSize, HostForward, Hostname, LogCap, MemSize, NicModel};
use crate::launcher::vhost::VhostMode;
use crate::names::IfName;

/// Virtual CPUs: 1 to this.
pub(crate) const MAX_CPUS: u32 = 255;
/// LAN NIC queues: 1 to this.
pub(crate) const MAX_LAN_QUEUES: u32 = 16;
/// `--shutdown-timeout`: 0 to this many seconds.
pub(crate) const MAX_SHUTDOWN_TIMEOUT_SECS: u64 = 3600;
/// `--ready-timeout`: 0 (none) to this many seconds.
pub(crate) const MAX_READY_TIMEOUT_SECS: u64 = 86_400;

/// Every option of `run` / `print-args`, one field per command-line option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchOptions {
    /// `--state-dir`: disk, boot script, QMP socket, lock and serial log.
    pub state_dir: PathBuf,
    /// `--boot-url`: chain target (exclusive with `boot_dir`). Neither: the built-in diagnostics script.
    pub boot_url: Option<BootUrl>,
    /// `--boot-dir`: serve this directory over HTTP and chain to `netboot.ipxe` in it.
    pub boot_dir: Option<PathBuf>,
    /// `--boot-cache`: `None` is the default (on for an http/https `boot_url`, off otherwise).
    pub boot_cache: Option<bool>,
    /// `--boot-ca`: PEM files trusted, besides the system's roots, for the boot cache's origin.
    pub boot_ca: Vec<PathBuf>,
    /// `--boot-http-bind` (IPv4: the guest reaches the host at 10.0.2.2).
    pub boot_http_bind: IpAddr,
    /// `--boot-http-port` (0: a free port).
    pub boot_http_port: u16,
    /// `--ipxe`: boot this iPXE image with the generated script instead of the NIC option ROM.
    pub ipxe: Option<PathBuf>,
    /// `--dns`.
    pub dns: Vec<IpAddr>,
    /// `--hostname`.
    pub hostname: Option<Hostname>,
    /// `--boot-nic-model`.
    pub boot_nic_model: NicModel,
    /// `--host-forward`.
    pub host_forwards: Vec<HostForward>,
    /// `--memory`.
    pub memory: MemSize,
    /// `--cpus`, 1 to [`MAX_CPUS`].
    pub cpus: u32,
    /// `--disk` (default: `<state-dir>/disk.qcow2`).
    pub disk: Option<PathBuf>,
    /// `--disk-size`, used only when the disk is created.
    pub disk_size: ByteSize,
    /// `--no-disk` (exclusive with `disk`).
    pub no_disk: bool,
    /// `--accel`.
    pub accel: AccelChoice,
    /// `--qemu`: a path, or a name looked up on PATH.
    pub qemu: PathBuf,
    /// `--qemu-img`: a path, or a name looked up on PATH.
    pub qemu_img: PathBuf,
    /// `--serial-log` (default: `<state-dir>/serial.log`).
    pub serial_log: Option<PathBuf>,
    /// `--serial-log-max`: the cap of the serial log.
    pub serial_log_max: LogCap,
    /// `--ready-pattern`: a regular expression for the console line that means "ready" (default: the
    /// diagnostics' OK line or the publisher guest's ready line).
    pub ready_pattern: Option<String>,
    /// `--ready-timeout`: how long the guest may take to be ready (None: no limit), at most
    /// [`MAX_READY_TIMEOUT_SECS`].
    pub ready_timeout: Option<Duration>,
    /// `--lan-interface`: an existing macvtap.
    pub lan_interface: Option<IfName>,
    /// `--lan-nic-model`.
    pub lan_nic_model: NicModel,
    /// `--lan-queues`, 1 to [`MAX_LAN_QUEUES`].
    pub lan_queues: u32,
    /// `--lan-vhost`: vhost-net for the LAN NIC.
    pub lan_vhost: VhostMode,
    /// `--shutdown-timeout`, at most [`MAX_SHUTDOWN_TIMEOUT_SECS`].
    pub shutdown_timeout: Duration,
    /// `--credential NAME=FILE`: systemd credentials for the guest, passed through QEMU's fw_cfg.
    pub credentials: Vec<CredentialArg>,
    /// `--credentials-from DIR` (the CLI defaults it to `$CREDENTIALS_DIRECTORY`): every regular file in DIR.
    pub credentials_from: Option<PathBuf>,
    /// Extra arguments appended to QEMU's command line.
    pub extra: Vec<String>,
}

impl LaunchOptions {
    /// The defaults of every option, for this state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        LaunchOptions {
            state_dir: state_dir.into(),
            boot_url: None,
            boot_dir: None,
            boot_cache: None,
            boot_ca: Vec::new(),
            boot_http_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            boot_http_port: 0,
            ipxe: None,
            dns: Vec::new(),
            hostname: None,
            boot_nic_model: NicModel::default(),
            host_forwards: Vec::new(),
            memory: MemSize::DEFAULT,
            cpus: 2,
            disk: None,
            disk_size: ByteSize::DEFAULT_DISK,
            no_disk: false,
            accel: AccelChoice::Auto,
            qemu: PathBuf::from("qemu-system-x86_64"),
            qemu_img: PathBuf::from("qemu-img"),
            serial_log: None,
            serial_log_max: LogCap::DEFAULT,
            ready_pattern: None,
            ready_timeout: None,
            lan_interface: None,
            lan_nic_model: NicModel::default(),
            lan_queues: 1,
            lan_vhost: VhostMode::Auto,
            shutdown_timeout: Duration::from_secs(30),
            credentials: Vec::new(),
            credentials_from: None,
            extra: Vec::new(),
        }
    }
}
