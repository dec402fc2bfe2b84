//! The macvtap character device: its number, opening queues, checking every fd with `TUNGETIFF` before it is
//! handed on, and placing fds for QEMU. (Where the node is found or made: [`crate::nodedir`].)
//!
//! This is the one module with `unsafe` (the tun/tap ioctls).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::libc;
use nix::sys::stat::makedev;

use crate::error::{Error, Result};
use crate::names::IfName;

pub fn public_node_path(ifindex: u32) -> PathBuf {
    PathBuf::from(format!("/dev/tap{ifindex}"))
}

/// A character device number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevNum {
    pub major: u64,
    pub minor: u64,
}

impl DevNum {
    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.trim().split_once(':')?;
        Some(DevNum { major: a.parse().ok()?, minor: b.parse().ok()? })
    }

    pub fn rdev(self) -> u64 {
        makedev(self.major, self.minor)
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// The macvtap's major:minor as the calling thread's namespace sees it in sysfs.
pub fn sysfs_devnum(name: &IfName, ifindex: u32) -> Result<DevNum> {
    use std::io::Read;
    // Not through the `/sys/class/net/NAME` symlink: resolving it is one more lookup per link.
    let path = format!("/sys/devices/virtual/net/{name}/macvtap/tap{ifindex}/dev");
    // One read into a small buffer: `read_to_string` would add a statx per link, which `show` pays 1,000 times.
    let mut buf = [0u8; 32];
    let n = std::fs::File::open(&path).and_then(|mut f| f.read(&mut buf)).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::not_found(format!("tap device of \"{name}\" ({path})")),
        _ => Error::io(format!("read {path}"), e),
    })?;
    let text = String::from_utf8_lossy(&buf[..n]);
    DevNum::parse(&text).ok_or_else(|| Error::Runtime(format!("read {path}: unexpected content {:?}", text.trim())))
}

/// Every macvtap device number the kernel has, keyed by the link name and ifindex in its sysfs path, read
/// from `/sys/dev/char` in one directory listing and one `readlink` per macvtap.
///
/// `show` (all) uses it instead of one [`sysfs_devnum`] per link: on a fresh sysfs mount (every `--netns`
/// run makes one) each of those builds four kernfs dentries and inodes, about 25 µs a link, where a
/// `readlink` here builds one. `/sys/dev/char` is not per namespace: it lists every namespace's macvtaps.
/// A (name, ifindex) pair that appears more than once is therefore left out, and the caller falls back to
/// [`sysfs_devnum`], which reads the calling namespace's own entry. A pair that appears once is the calling
/// namespace's link when that namespace has a macvtap with that name and index, because that macvtap's
/// device is in the listing too.
pub struct DevIndex(std::collections::HashMap<(String, u32), Option<DevNum>>);

impl DevIndex {
    /// `None` when the macvtap major or the listing cannot be read (callers then read per link), or when
    /// the machine has more than [`DevIndex::MAX_PER_LINK`] macvtaps for each of the caller's `links`:
    /// other namespaces' devices would then cost more `readlink`s than per-link reads.
    pub fn read(links: usize) -> Option<DevIndex> {
        let devices = std::fs::read_to_string("/proc/devices").ok()?;
        let major = macvtap_major(&devices)?;
        let dir =
            nix::dir::Dir::open("/sys/dev/char", nix::fcntl::OFlag::O_DIRECTORY, nix::sys::stat::Mode::empty()).ok()?;
        let dir_fd = std::os::fd::AsFd::as_fd(&dir).try_clone_to_owned().ok()?;
        // Listing builds no dentries; only the `readlink`s below do.
        let names: Vec<_> = dir
            .into_iter()
            .flatten()
            .filter(|e| e.file_name().to_str().ok().and_then(DevNum::parse).is_some_and(|d| d.major == major))
            .map(|e| e.file_name().to_owned())
            .collect();
        if names.len() > links.saturating_mul(Self::MAX_PER_LINK) {
            return None;
        }
        let mut map = std::collections::HashMap::with_capacity(names.len());
        for name in names {
            let Some(dev) = name.to_str().ok().and_then(DevNum::parse) else { continue };
            let Ok(target) = nix::fcntl::readlinkat(&dir_fd, name.as_c_str()) else { continue };
            if let Some(key) = target.to_str().and_then(parse_tap_target) {
                map.entry(key).and_modify(|v| *v = None).or_insert(Some(dev));
            }
        }
        Some(DevIndex(map))
    }

    /// A `readlink` builds one kernfs dentry where a per-link read builds four: measured about 5 µs
    /// against 25 µs on a fresh sysfs mount.
    pub const MAX_PER_LINK: usize = 4;

    /// The device of this link, when the listing names it exactly once.
    pub fn get(&self, name: &IfName, ifindex: u32) -> Option<DevNum> {
        self.0.get(&(name.as_str().to_owned(), ifindex)).copied().flatten()
    }
}

/// The major of the `macvtap` line of `/proc/devices` (in its "Character devices:" part).
fn macvtap_major(devices: &str) -> Option<u64> {
    devices
        .lines()
        .take_while(|l| !l.starts_with("Block devices"))
        .find_map(|l| l.trim().split_once(' ').filter(|(_, name)| *name == "macvtap").and_then(|(n, _)| n.parse().ok()))
}

/// `../../devices/virtual/net/NAME/macvtap/tapIFINDEX` → (NAME, IFINDEX).
fn parse_tap_target(target: &str) -> Option<(String, u32)> {
    let mut parts = target.rsplit('/');
    let tap = parts.next()?.strip_prefix("tap")?.parse().ok()?;
    (parts.next()? == "macvtap").then_some(())?;
    let name = parts.next()?;
    (parts.next()? == "net").then_some((name.to_owned(), tap))
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

nix::ioctl_read_bad!(tungetiff, nix::request_code_read!(b'T', 210, std::mem::size_of::<libc::c_uint>()), libc::ifreq);
nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);

fn zeroed_ifreq() -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct (a name array and a union of integers and addresses);
    // all-zero bytes are a valid value for every field.
    unsafe { std::mem::zeroed() }
}

fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req.ifr_name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `TUNGETIFF`: the link name and flags the kernel attached to this fd.
pub fn get_iff(fd: &OwnedFd) -> nix::Result<(String, libc::c_short)> {
    let mut req = zeroed_ifreq();
    // SAFETY: fd is an open descriptor we own; req is a valid, writable ifreq that lives across the call,
    // which is what TUNGETIFF writes into.
    unsafe { tungetiff(fd.as_raw_fd(), &mut req) }?;
    // SAFETY: TUNGETIFF fills ifru_flags; reading a c_short out of the zero-initialised union is valid.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok((ifreq_name(&req), flags))
}

fn set_multi_queue(fd: &OwnedFd) -> nix::Result<()> {
    let mut req = zeroed_ifreq();
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;
    // SAFETY: fd is an open macvtap descriptor we own; req is a valid ifreq that outlives the call, and
    // TUNSETIFF only reads it.
    unsafe { tunsetiff(fd.as_raw_fd(), &req) }.map(drop)
}

/// Check that an opened fd is the tap of link `name` with device number `dev`.
pub fn verify_fd(fd: &OwnedFd, name: &IfName, dev: DevNum, path: &Path) -> Result<()> {
    let st = nix::sys::stat::fstat(fd).map_err(|e| Error::errno(format!("fstat {}", path.display()), e))?;
    if st.st_rdev != dev.rdev() {
        return Err(Error::conflict(
            format!("tap device {}", path.display()),
            format!(
                "is char {}:{}, not the tap of \"{name}\" (char {dev})",
                nix::sys::stat::major(st.st_rdev),
                nix::sys::stat::minor(st.st_rdev)
            ),
        ));
    }
    let (ifname, flags) = get_iff(fd).map_err(|e| Error::errno(format!("TUNGETIFF on {}", path.display()), e))?;
    tracing::trace!(
        "fd {} on {}: char {dev}, TUNGETIFF says \"{ifname}\" flags {flags:#06x}",
        fd.as_raw_fd(),
        path.display()
    );
    if ifname != name.as_str() || flags & IFF_TAP == 0 {
        return Err(Error::conflict(
            format!("tap device {}", path.display()),
            format!("belongs to link \"{ifname}\", not \"{name}\""),
        ));
    }
    Ok(())
}

/// Open `queues` fds on the node and verify each. More than one queue sets `IFF_MULTI_QUEUE`.
pub fn open_queues(path: &Path, name: &IfName, dev: DevNum, queues: u32) -> Result<Vec<OwnedFd>> {
    if queues == 0 {
        return Err(Error::invalid(format!("queues for \"{name}\""), "must be at least 1"));
    }
    let mut fds = Vec::with_capacity(queues as usize);
    for q in 0..queues {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| open_error(path, name, q, e))?;
        let fd = OwnedFd::from(file);
        if queues > 1 {
            set_multi_queue(&fd)
                .map_err(|e| Error::errno(format!("TUNSETIFF multi-queue on {} (queue {q})", path.display()), e))?;
        }
        verify_fd(&fd, name, dev, path)?;
        fds.push(fd);
    }
    Ok(fds)
}

/// A refused open on a `nodev` mount says so: EACCES alone sends people looking at owners and modes.
fn open_error(path: &Path, name: &IfName, q: u32, e: std::io::Error) -> Error {
    let what = format!("open {} (queue {q} of \"{name}\")", path.display());
    let nodev = e.raw_os_error() == Some(libc::EACCES)
        && nix::sys::statvfs::statvfs(path).is_ok_and(|st| st.flags().contains(nix::sys::statvfs::FsFlags::ST_NODEV));
    if nodev {
        return Error::invalid(
            what,
            "the node is on a nodev mount, where device nodes cannot be opened (systemd mounts /run nodev); \
             recreate it with `ec-macvtap create` without EC_MACVTAP_RUNTIME_DIR pointing there",
        );
    }
    Error::io(what, e)
}

/// Duplicate `fds` to numbers at or above `floor`, close-on-exec, so they cannot collide with the range
/// they are about to be placed in.
fn lift_fds(fds: Vec<OwnedFd>, floor: RawFd) -> Result<Vec<OwnedFd>> {
    fds.into_iter()
        .map(|fd| {
            let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor))
                .map_err(|e| Error::errno(format!("duplicate tap fd {} above {floor}", fd.as_raw_fd()), e))?;
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        })
        .collect()
}

/// For `exec`: put `fds` at `first`, `first + 1`, ... in this process, without close-on-exec, so the program
/// about to be exec'd inherits them. Returns the numbers.
pub fn place_fds_for_exec(fds: Vec<OwnedFd>, first: RawFd) -> Result<Vec<RawFd>> {
    let n = fds.len() as RawFd;
    let lifted = lift_fds(fds, first + n)?;
    let mut placed = Vec::with_capacity(lifted.len());
    for (i, fd) in lifted.iter().enumerate() {
        let target = first + i as RawFd;
        // SAFETY: `target` is in a range we reserve for the exec'd program; whatever was open there is
        // replaced on purpose (dup2 semantics). The returned OwnedFd is leaked with into_raw_fd so it stays
        // open across exec; dup2 leaves it without FD_CLOEXEC.
        let new = unsafe { nix::unistd::dup2_raw(fd, target) }
            .map_err(|e| Error::errno(format!("place tap fd at {target}"), e))?;
        placed.push(new.into_raw_fd());
    }
    Ok(placed)
}

/// For a child process: arrange that `fds` appear at `first`, `first + 1`, ... in the child only. The fds
/// stay owned by the returned vector (keep it alive until the child is spawned). Returns the numbers.
pub fn pass_fds_to_child(
    cmd: &mut std::process::Command,
    fds: Vec<OwnedFd>,
    first: RawFd,
) -> Result<(Vec<OwnedFd>, Vec<RawFd>)> {
    let n = fds.len() as RawFd;
    let lifted = lift_fds(fds, (first + n).max(64))?;
    let sources: Vec<RawFd> = lifted.iter().map(|f| f.as_raw_fd()).collect();
    let targets: Vec<RawFd> = (0..n).map(|i| first + i).collect();
    let t = targets.clone();
    // SAFETY: the closure runs in the forked child before exec and only calls dup2, which is
    // async-signal-safe; sources are above every target, so no source is overwritten before it is used.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            for (s, d) in sources.iter().zip(&t) {
                if libc::dup2(*s, *d) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok((lifted, targets))
}

/// Ask the kernel to send `signal` to the child when this process (the thread that spawned it) dies.
/// If the parent died between fork and prctl, the child is not spawned at all.
pub fn set_parent_death_signal(cmd: &mut std::process::Command, signal: nix::sys::signal::Signal) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only calls prctl and getppid, which are
    // async-signal-safe; it allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            nix::sys::prctl::set_pdeathsig(signal).map_err(std::io::Error::from)?;
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devnum_parse() {
        assert_eq!(DevNum::parse("246:3\n"), Some(DevNum { major: 246, minor: 3 }));
        assert_eq!(DevNum::parse("246"), None);
        assert_eq!(DevNum::parse("a:b"), None);
        assert_eq!(DevNum { major: 246, minor: 3 }.to_string(), "246:3");
        assert_eq!(public_node_path(12), PathBuf::from("/dev/tap12"));
    }

    #[test]
    fn dev_char_targets_and_majors() {
        assert_eq!(
            parse_tap_target("../../devices/virtual/net/ec-lan0/macvtap/tap42"),
            Some(("ec-lan0".to_owned(), 42))
        );
        assert_eq!(parse_tap_target("../../devices/virtual/net/x/ipvtap/tap42"), None);
        assert_eq!(parse_tap_target("../../devices/virtual/misc/tun"), None);
        assert_eq!(parse_tap_target("../../devices/virtual/net/x/macvtap/tapX"), None);
        let devices = "Character devices:\n  1 mem\n246 macvtap\n247 ipvtap\n\nBlock devices:\n246 macvtap\n";
        assert_eq!(macvtap_major(devices), Some(246));
        assert_eq!(macvtap_major("Character devices:\n  1 mem\n\nBlock devices:\n246 macvtap\n"), None);
    }
}
