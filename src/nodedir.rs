//! Where a macvtap's tap node is found or made.
//!
//! The public node is `/dev/tap<ifindex>`, but `/dev` is machine-wide while ifindexes repeat per namespace,
//! and containers have no udev. So a *private* node may be needed: `<runtime>/net-<netns inode>/<name>`, with
//! `<runtime>` = `$EC_MACVTAP_RUNTIME_DIR` or `/dev/ec-macvtap`. The default lives on `/dev` because a node
//! can only be opened on a mount without `nodev`, and systemd mounts `/run` `nodev`.
//!
//! Safety rules:
//! - the runtime directory and the namespace directory must be owned by root and writable by nobody else, so
//!   no other user can plant a symlink or a node there; both are opened with `O_NOFOLLOW` and used through
//!   their descriptors;
//! - a node is made under a temporary name (it contains `:`, which no interface name can), given its owner
//!   and mode through a descriptor (never by path), and only then renamed over the final name: a reader sees
//!   either the old node or the finished new one;
//! - a directory on a `nodev` mount is refused with the mount's name before any node is made there.
//!
//! Every change here happens under the namespace's lock ([`crate::netns::lock_current`]), so a directory
//! that becomes empty can be removed without racing another run that is about to use it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, SFlag, fchmodat, fstat, fstatat, mkdirat, mknodat};
use nix::sys::statvfs::{FsFlags, fstatvfs};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, unlinkat};

use crate::error::{Error, Result};
use crate::names::IfName;
use crate::tap::{DevNum, public_node_path};

/// The default runtime directory: on `/dev`, the one mount every host and container has that allows nodes.
pub const DEFAULT_RUNTIME_DIR: &str = "/dev/ec-macvtap";
/// The environment variable that moves it.
pub const RUNTIME_DIR_ENV: &str = "EC_MACVTAP_RUNTIME_DIR";

const TEMP_MARK: &str = ":tmp-";

/// Where private device nodes live: `$EC_MACVTAP_RUNTIME_DIR`, else `/dev/ec-macvtap`.
pub fn runtime_dir() -> PathBuf {
    std::env::var_os(RUNTIME_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR))
}

fn ns_dir_name(netns_inode: u64) -> String {
    format!("net-{netns_inode}")
}

/// `<runtime>/net-<netns inode>/<name>`: unique per namespace and link name, computable by any reader.
pub fn private_node_path(netns_inode: u64, name: &IfName) -> PathBuf {
    runtime_dir().join(ns_dir_name(netns_inode)).join(name.as_str())
}

fn is_char(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFCHR
}

fn is_node_of(st: &FileStat, dev: DevNum) -> bool {
    is_char(st) && st.st_rdev == dev.rdev()
}

/// Whether `path` is a character device with exactly this number.
pub fn node_matches(path: &Path, dev: DevNum) -> bool {
    nix::sys::stat::stat(path).is_ok_and(|st| is_node_of(&st, dev))
}

/// Find the node for the link without creating anything: the public `/dev/tapN` when it is the right
/// device, else the private node ec-macvtap made. Any user may call this.
pub fn find_node(name: &IfName, ifindex: u32, dev: DevNum, netns_inode: u64) -> Result<PathBuf> {
    let public = public_node_path(ifindex);
    if node_matches(&public, dev) {
        tracing::debug!("tap node of \"{name}\": {} (public)", public.display());
        return Ok(public);
    }
    let private = private_node_path(netns_inode, name);
    match nix::sys::stat::stat(&private) {
        Ok(st) if is_node_of(&st, dev) => {
            tracing::debug!(
                "tap node of \"{name}\": {} (private; {} is not char {dev})",
                private.display(),
                public.display()
            );
            return Ok(private);
        }
        Err(nix::errno::Errno::EACCES) => {
            return Err(Error::errno(
                format!("tap device of \"{name}\": stat {}", private.display()),
                nix::errno::Errno::EACCES,
            ));
        }
        _ => {}
    }
    Err(Error::not_found(format!(
        "tap device of \"{name}\" (char {dev}): {} is missing or belongs to another link, and there is no private node at {} (run `ec-macvtap create` as root)",
        public.display(),
        private.display()
    )))
}

/// Like [`find_node`], but `None` instead of an error: what `show` reports.
pub fn usable_node(name: &IfName, ifindex: u32, dev: DevNum, netns_inode: u64) -> Option<PathBuf> {
    find_node(name, ifindex, dev, netns_inode).ok()
}

/// The open, checked directory of one namespace's private nodes (root only).
pub struct NodeDir {
    path: PathBuf,
    fd: OwnedFd,
    top_fd: OwnedFd,
}

impl NodeDir {
    /// Open `<runtime>/net-<inode>`, creating it (and the runtime directory) when `create` is set; `None`
    /// when it does not exist and `create` is not set. Directories that are not root's, or that others may
    /// write, are refused.
    fn open(netns_inode: u64, create: bool) -> Result<Option<NodeDir>> {
        let top = runtime_dir();
        if !top.is_absolute() {
            return Err(Error::invalid(format!("{RUNTIME_DIR_ENV}=\"{}\"", top.display()), "must be an absolute path"));
        }
        if create {
            ensure_dirs(&top)?;
        } else if !top.is_dir() {
            return Ok(None);
        }
        let top_fd = open_dir(None, &top, &top)?;
        check_dir_owner(&top_fd, &top)?;
        let rel = ns_dir_name(netns_inode);
        let path = top.join(&rel);
        if create {
            match mkdirat(&top_fd, rel.as_str(), Mode::from_bits_truncate(0o755)) {
                Ok(()) => {
                    let fd = open_dir(Some(&top_fd), Path::new(&rel), &path)?;
                    // 0755 whatever the umask (systemd units often run with UMask=0077): the owner of a node
                    // must be able to reach it.
                    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o755))
                        .map_err(|e| Error::errno(format!("chmod 0755 {}", path.display()), e))?;
                    return Ok(Some(NodeDir { path, fd, top_fd }));
                }
                Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(Error::errno(format!("create {}", path.display()), e)),
            }
        }
        let fd = match open_dir(Some(&top_fd), Path::new(&rel), &path) {
            Ok(fd) => fd,
            Err(e) if !create && e.kind() == crate::error::Kind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        check_dir_owner(&fd, &path)?;
        Ok(Some(NodeDir { path, fd, top_fd }))
    }

    /// Create (when missing) and open the namespace's directory.
    pub fn create(netns_inode: u64) -> Result<NodeDir> {
        Self::open(netns_inode, true)?
            .ok_or_else(|| Error::Runtime(format!("create {}", runtime_dir().join(ns_dir_name(netns_inode)).display())))
    }

    /// Open the namespace's directory if it exists.
    pub fn existing(netns_inode: u64) -> Result<Option<NodeDir>> {
        Self::open(netns_inode, false)
    }

    /// Remove the namespace's directory when nothing is left in it.
    pub fn remove_if_empty(self) {
        if let Some(rel) = self.path.file_name() {
            let _ = unlinkat(&self.top_fd, rel, UnlinkatFlags::RemoveDir);
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove temporary nodes a killed run left behind. Call with the lock held: every node is made under it.
    fn sweep_temporaries(&self) {
        let Ok(fd) = self.fd.try_clone() else { return };
        let Ok(mut dir) = Dir::from_fd(fd) else { return };
        let stale: Vec<std::ffi::CString> = dir
            .iter()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.to_bytes().windows(TEMP_MARK.len()).any(|w| w == TEMP_MARK.as_bytes()))
            .collect();
        for n in stale {
            tracing::debug!(dir = %self.path.display(), "removing a temporary node left by a killed run: {n:?}");
            let _ = unlinkat(&self.fd, n.as_c_str(), UnlinkatFlags::NoRemoveDir);
        }
    }

    /// The private node for `name`, given to `owner` (default root) with mode 0600. Idempotent: a node that is
    /// already right is left alone. Call with the lock held.
    pub fn ensure_private(&self, name: &IfName, dev: DevNum, owner: Option<(Uid, Gid)>) -> Result<PathBuf> {
        let path = self.path.join(name.as_str());
        if let Ok(st) = fstatat(&self.fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            && is_node_of(&st, dev)
            && owner
                .is_none_or(|(u, g)| st.st_uid == u.as_raw() && st.st_gid == g.as_raw() && st.st_mode & 0o7777 == 0o600)
        {
            return Ok(path);
        }
        self.sweep_temporaries();
        self.refuse_nodev()?;
        let tmp = self.make_temp_node(name, dev, owner.unwrap_or((Uid::from_raw(0), Gid::from_raw(0))))?;
        renameat(&self.fd, tmp.as_str(), &self.fd, name.as_str()).map_err(|e| {
            let _ = unlinkat(&self.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            Error::errno(format!("rename {} to {}", self.path.join(&tmp).display(), path.display()), e)
        })?;
        Ok(path)
    }

    /// A node that exists only while `f` runs (for opening a link that has no usable node: the fds stay valid
    /// after the name is gone). Call with the lock held.
    pub fn with_temporary_node<T>(&self, name: &IfName, dev: DevNum, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
        self.refuse_nodev()?;
        let tmp = self.make_temp_node(name, dev, (Uid::from_raw(0), Gid::from_raw(0)))?;
        let out = f(&self.path.join(&tmp));
        let _ = unlinkat(&self.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        out
    }

    /// Remove the private node of `name`, if any. Call with the lock held.
    pub fn remove_node(&self, name: &IfName) -> Result<bool> {
        match unlinkat(&self.fd, name.as_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::ENOENT) => Ok(false),
            Err(e) => Err(Error::errno(format!("remove {}", self.path.join(name.as_str()).display()), e)),
        }
    }

    /// `mknod` under a fresh temporary name, then owner and mode set through a descriptor. Returns the name.
    fn make_temp_node(&self, name: &IfName, dev: DevNum, (uid, gid): (Uid, Gid)) -> Result<String> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let tmp = format!("{name}{TEMP_MARK}{}-{nanos}", std::process::id());
        let tmp_path = self.path.join(&tmp);
        mknodat(&self.fd, tmp.as_str(), SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), dev.rdev())
            .map_err(|e| Error::errno(format!("mknod {} (char {dev})", tmp_path.display()), e))?;
        let done = open_node_path(Some(&self.fd), Path::new(&tmp), dev)
            .and_then(|fd| set_owner_and_mode(&fd, &tmp_path, (uid, gid)));
        if let Err(e) = done {
            let _ = unlinkat(&self.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        Ok(tmp)
    }

    /// Refuse a directory whose mount forbids device nodes, naming the mount and the fix.
    fn refuse_nodev(&self) -> Result<()> {
        let st = fstatvfs(&self.fd).map_err(|e| Error::errno(format!("statvfs {}", self.path.display()), e))?;
        if !st.flags().contains(FsFlags::ST_NODEV) {
            return Ok(());
        }
        let mount = mount_point_of(&self.path).unwrap_or_else(|| "?".into());
        Err(Error::invalid(
            format!("private tap node directory {}", self.path.display()),
            format!(
                "is on the nodev mount \"{mount}\", where device nodes cannot be opened (systemd mounts /run nodev); \
                 unset {RUNTIME_DIR_ENV} to use {DEFAULT_RUNTIME_DIR}, or point it at a directory on a mount without nodev"
            ),
        ))
    }
}

/// The node for a link: the public `/dev/tapN` when it is the right device, else a private node; with
/// `owner`, given to that user with mode 0600 (through a descriptor). Call with the namespace's lock held.
pub fn ensure_node(
    name: &IfName,
    ifindex: u32,
    dev: DevNum,
    netns_inode: u64,
    owner: Option<(Uid, Gid)>,
) -> Result<PathBuf> {
    let public = public_node_path(ifindex);
    if node_matches(&public, dev) {
        tracing::debug!("tap node: {} is char {dev}, the right device", public.display());
        if let Some(owner) = owner {
            tracing::debug!("tap node: {} to uid {} gid {}, mode 0600", public.display(), owner.0, owner.1);
            let fd = open_node_path(None, &public, dev)?;
            set_owner_and_mode(&fd, &public, owner)?;
        }
        return Ok(public);
    }
    tracing::debug!("tap node: {} is missing or not char {dev}; using a private node", public.display());
    NodeDir::create(netns_inode)?.ensure_private(name, dev, owner)
}

/// Create `dir` and missing parents with mode 0755 whatever the umask. Existing directories are left alone.
fn ensure_dirs(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        ensure_dirs(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io(format!("chmod 0755 {}", dir.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(Error::Runtime(format!("create {}: exists and is not a directory", dir.display())))
        }
        Err(e) => Err(Error::io(format!("create {}", dir.display()), e)),
    }
}

fn open_dir(at: Option<&OwnedFd>, rel: &Path, shown: &Path) -> Result<OwnedFd> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let r = match at {
        Some(d) => openat(d, rel, flags, Mode::empty()),
        None => openat(nix::fcntl::AT_FDCWD, rel, flags, Mode::empty()),
    };
    r.map_err(|e| match e {
        nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => Error::invalid(
            format!("private tap node directory {}", shown.display()),
            "is a symlink or not a directory (refusing to follow it)",
        ),
        e => Error::errno(format!("open {}", shown.display()), e),
    })
}

/// The directory must be root's and writable by nobody else: otherwise another user could plant a symlink or
/// a node of their choosing where root will look.
fn check_dir_owner(fd: &OwnedFd, path: &Path) -> Result<()> {
    let st = fstat(fd).map_err(|e| Error::errno(format!("stat {}", path.display()), e))?;
    if st.st_uid != 0 {
        return Err(Error::invalid(
            format!("private tap node directory {}", path.display()),
            format!("is owned by uid {}, not root; refusing to make device nodes there", st.st_uid),
        ));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(Error::invalid(
            format!("private tap node directory {}", path.display()),
            format!(
                "is writable by group or others (mode {:o}); refusing to make device nodes there",
                st.st_mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// `O_PATH | O_NOFOLLOW` on a node, checked to be exactly `dev`: the handle owner and mode are set through.
fn open_node_path(at: Option<&OwnedFd>, rel: &Path, dev: DevNum) -> Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = match at {
        Some(d) => openat(d, rel, flags, Mode::empty()),
        None => openat(nix::fcntl::AT_FDCWD, rel, flags, Mode::empty()),
    }
    .map_err(|e| Error::errno(format!("open {}", rel.display()), e))?;
    let st = fstat(&fd).map_err(|e| Error::errno(format!("stat {}", rel.display()), e))?;
    if !is_node_of(&st, dev) {
        return Err(Error::conflict(format!("tap node {}", rel.display()), format!("is not char {dev}")));
    }
    Ok(fd)
}

/// Owner and mode 0600 through the descriptor: `fchownat(fd, "", AT_EMPTY_PATH)`, and `chmod` of the
/// descriptor's own `/proc/self/fd` entry (an `O_PATH` descriptor has no `fchmod`).
fn set_owner_and_mode(fd: &OwnedFd, shown: &Path, (uid, gid): (Uid, Gid)) -> Result<()> {
    fchownat(fd.as_fd(), "", Some(uid), Some(gid), AtFlags::AT_EMPTY_PATH)
        .map_err(|e| Error::errno(format!("chown {} to {uid}:{gid}", shown.display()), e))?;
    let by_fd = format!("/proc/self/fd/{}", fd.as_raw_fd());
    fchmodat(nix::fcntl::AT_FDCWD, by_fd.as_str(), Mode::from_bits_truncate(0o600), FchmodatFlags::FollowSymlink)
        .map_err(|e| Error::errno(format!("chmod 0600 {}", shown.display()), e))
}

/// The mount point that holds `path` (longest matching mount point in this thread's mount table).
fn mount_point_of(path: &Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/thread-self/mountinfo").ok()?;
    let path = std::fs::canonicalize(path).ok()?;
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.len())
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_paths_are_per_namespace_and_name() {
        let n: IfName = "ec-lan0".parse().unwrap();
        let a = private_node_path(4026531840, &n);
        assert!(a.ends_with("net-4026531840/ec-lan0"), "{}", a.display());
        assert_ne!(a, private_node_path(4026532000, &n));
    }

    #[test]
    fn no_link_name_can_be_a_temporary() {
        assert!(format!("x{TEMP_MARK}1-2").parse::<IfName>().is_err());
    }

    #[test]
    fn a_regular_file_is_not_a_node() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tap1");
        std::fs::write(&f, b"").unwrap();
        assert!(!node_matches(&f, DevNum { major: 1, minor: 3 }));
        assert!(node_matches(Path::new("/dev/null"), DevNum { major: 1, minor: 3 }));
    }

    #[test]
    fn mount_points_are_found_and_unescaped() {
        assert_eq!(mount_point_of(Path::new("/proc/self")).as_deref(), Some("/proc"));
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
    }
}
