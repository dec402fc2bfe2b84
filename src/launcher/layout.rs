//! What the state directory holds, by name, and the fixed addresses of the user-mode network: the one list
//! every other module takes its file names and slirp addresses from.
//!
//! ```text
//! STATE_DIR/
//!   lock          flock held by the running launcher (one launcher per directory)
//!   status.json   what the launcher knows about its guest (replaced atomically)
//!   qmp.sock      QEMU's QMP socket for operators
//!   console.sock  the guest console, served by the launcher
//!   serial.log    everything the guest printed (capped)
//!   disk.qcow2    the persistent disk (unless --disk or --no-disk)
//!   tftp/         the slirp TFTP root: only boot.ipxe
//!     boot.ipxe   the boot script
//! ```

/// The flock a running launcher holds.
pub(crate) const LOCK_FILE: &str = "lock";
/// What the launcher knows about its guest.
pub(crate) const STATUS_FILE: &str = "status.json";
/// QEMU's QMP socket for operators (the launcher has a connection of its own).
pub(crate) const QMP_SOCKET: &str = "qmp.sock";
/// The guest console socket the launcher serves.
pub(crate) const CONSOLE_SOCKET: &str = "console.sock";
/// The default serial log.
pub(crate) const SERIAL_LOG: &str = "serial.log";
/// The default persistent disk.
pub(crate) const DISK_IMAGE: &str = "disk.qcow2";
/// The slirp TFTP root: a directory of its own that holds only the boot script (the guest can read all of it).
pub(crate) const TFTP_DIR: &str = "tftp";
/// The boot script, inside [`TFTP_DIR`].
pub(crate) const BOOT_SCRIPT: &str = "boot.ipxe";
/// The file `--boot-dir` chains to (in the served directory, not the state directory).
pub(crate) const NETBOOT_SCRIPT: &str = "netboot.ipxe";

/// The user-mode network (slirp), fixed in the argv so that the boot script can configure the boot NIC
/// without DHCP and still match what slirp's DHCP server would hand out. These are QEMU's defaults.
pub(crate) mod usernet {
    use std::net::Ipv4Addr;

    /// The network, as `-netdev user,net=` takes it.
    pub(crate) const NET: &str = "10.0.2.0/24";
    pub(crate) const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
    /// The host as the guest sees it (gateway; slirp maps it to the host's loopback).
    pub(crate) const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    /// slirp's DNS forwarder.
    pub(crate) const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
    /// The first (and, with one guest NIC, only) address slirp's DHCP hands out.
    pub(crate) const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
}
