//! The macvtap character device: finding the right node, making a private one when needed, opening queues,
//! and checking every fd with `TUNGETIFF` before it is handed on.
//!
//! This is the one module with `unsafe` (the tun/tap ioctls).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::libc;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, chown};

use crate::error::{Error, Result};
use crate::names::IfName;

/// Where private device nodes live: `$EC_MACVTAP_RUNTIME_DIR`, else `/run/ec-macvtap`.
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("EC_MACVTAP_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/ec-macvtap"))
}

/// `<runtime>/net-<netns inode>/<name>`: unique per namespace and link name, computable by any reader.
pub fn private_node_path(netns_inode: u64, name: &IfName) -> PathBuf {
    runtime_dir().join(format!("net-{netns_inode}")).join(name.as_str())
}

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
    let path = format!("/sys/class/net/{name}/macvtap/tap{ifindex}/dev");
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::not_found(format!("tap device of \"{name}\" ({path})")),
        _ => Error::io(format!("read {path}"), e),
    })?;
    DevNum::parse(&text).ok_or_else(|| Error::Runtime(format!("read {path}: unexpected content {:?}", text.trim())))
}

/// Whether `path` is a character device with exactly this number.
pub fn node_matches(path: &Path, dev: DevNum) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == dev.rdev())
}

/// Find the node for the link without creating anything: the public `/dev/tapN` when it is the right
/// device, else the private node ec-macvtap made.
pub fn find_node(name: &IfName, ifindex: u32, dev: DevNum, netns_inode: u64) -> Result<PathBuf> {
    let public = public_node_path(ifindex);
    if node_matches(&public, dev) {
        return Ok(public);
    }
    let private = private_node_path(netns_inode, name);
    match std::fs::metadata(&private) {
        Ok(m) if m.file_type().is_char_device() && m.rdev() == dev.rdev() => return Ok(private),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Error::io(format!("tap device of \"{name}\": stat {}", private.display()), e));
        }
        _ => {}
    }
    Err(Error::not_found(format!(
        "tap device of \"{name}\" (char {dev}): {} is missing or belongs to another link, and there is no private node at {} (run `ec-macvtap create` as root)",
        public.display(),
        private.display()
    )))
}

/// Find or make the node (root): the public one if it matches, else a private node, then give it to `owner`
/// with mode 0600. Returns the node's path.
pub fn ensure_node(
    name: &IfName,
    ifindex: u32,
    dev: DevNum,
    netns_inode: u64,
    owner: Option<(Uid, Gid)>,
) -> Result<PathBuf> {
    let (path, created) = match find_node(name, ifindex, dev, netns_inode) {
        Ok(p) => (p, false),
        Err(_) => {
            let path = private_node_path(netns_inode, name);
            make_private_node(&path, dev)?;
            (path, true)
        }
    };
    if let Some((uid, gid)) = owner {
        let r = chown(&path, Some(uid), Some(gid))
            .map_err(|e| Error::errno(format!("chown {} to {uid}:{gid}", path.display()), e))
            .and_then(|()| {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| Error::io(format!("chmod 0600 {}", path.display()), e))
            });
        if let Err(e) = r {
            if created {
                let _ = std::fs::remove_file(&path);
            }
            return Err(e);
        }
    }
    Ok(path)
}

/// Create `dir` (and missing parents) with mode 0755 whatever the umask (systemd units often run with
/// `UMask=0077`), so an unprivileged owner can reach its node. Existing directories are left as they are.
fn ensure_dir_0755(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        ensure_dir_0755(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io(format!("chmod 0755 {}", dir.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if dir.is_dir() {
                Ok(())
            } else {
                Err(Error::Runtime(format!("create {}: exists and is not a directory", dir.display())))
            }
        }
        Err(e) => Err(Error::io(format!("create {}", dir.display()), e)),
    }
}

fn make_private_node(path: &Path, dev: DevNum) -> Result<()> {
    if let Some(dir) = path.parent() {
        ensure_dir_0755(dir)?;
    }
    // A stale node from a link that is gone has the wrong number: replace it.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("remove stale {}", path.display()), e)),
    }
    mknod(path, SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), dev.rdev())
        .map_err(|e| Error::errno(format!("mknod {} (char {dev})", path.display()), e))
}

/// Remove the private node of a link (if any) and its directory when empty.
pub fn remove_private_node(name: &IfName, netns_inode: u64) -> Result<bool> {
    let path = private_node_path(netns_inode, name);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::remove_dir(dir);
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
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
            .map_err(|e| Error::io(format!("open {} (queue {q} of \"{name}\")", path.display()), e))?;
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
    }

    #[test]
    fn private_paths_are_per_namespace_and_name() {
        let n: IfName = "ec-lan0".parse().unwrap();
        let a = private_node_path(4026531840, &n);
        assert!(a.ends_with("net-4026531840/ec-lan0"), "{}", a.display());
        assert_ne!(a, private_node_path(4026532000, &n));
        assert_eq!(public_node_path(12), PathBuf::from("/dev/tap12"));
    }

    #[test]
    fn a_regular_file_is_not_a_node() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tap1");
        std::fs::write(&f, b"").unwrap();
        assert!(!node_matches(&f, DevNum { major: 1, minor: 3 }));
        assert!(node_matches(Path::new("/dev/null"), DevNum { major: 1, minor: 3 }));
    }
}
