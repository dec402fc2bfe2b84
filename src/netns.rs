//! Working inside another network namespace.
//!
//! `setns` changes only the calling thread, so the work runs on a short-lived thread that has joined the
//! namespace; netlink sockets it creates belong there. That thread also gets a private mount namespace with
//! a fresh sysfs, so `/sys/class/net` shows the links of the namespace it joined.

use std::fmt;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::str::FromStr;

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

use crate::error::{Error, Result};

/// `--netns NAME|PATH`: a name under `/run/netns`, or a path such as `/proc/PID/ns/net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsSpec {
    pub display: String,
    pub path: PathBuf,
}

impl FromStr for NetnsSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("network namespace name is empty".into());
        }
        let path = if s.contains('/') {
            PathBuf::from(s)
        } else if s == "." || s == ".." {
            return Err(format!("network namespace name \"{s}\" is not allowed"));
        } else {
            PathBuf::from("/run/netns").join(s)
        };
        Ok(NetnsSpec { display: s.to_owned(), path })
    }
}

impl fmt::Display for NetnsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

/// Run `f` in the given network namespace (or right here when `None`), with a sysfs of that namespace.
pub fn run_in<T, F>(ns: Option<&NetnsSpec>, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    run(ns, true, f)
}

/// Like [`run_in`] for work that needs only netlink and procfs, not sysfs (saves a mount namespace and a
/// sysfs mount, which `delete` does not need).
pub fn run_in_without_sysfs<T, F>(ns: Option<&NetnsSpec>, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    run(ns, false, f)
}

fn run<T, F>(ns: Option<&NetnsSpec>, sysfs: bool, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let Some(ns) = ns else { return f() };
    let what = format!("network namespace \"{ns}\"");
    tracing::debug!("entering {what} ({}) on a thread of its own", ns.path.display());
    let file = File::open(&ns.path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::not_found(what.clone()),
        _ => Error::io(format!("open {what}"), e),
    })?;
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> Result<T> {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                if e == nix::errno::Errno::EINVAL {
                    Error::invalid(what.clone(), "not a network namespace")
                } else {
                    Error::errno(format!("enter {what}"), e)
                }
            })?;
            if sysfs {
                private_sysfs().map_err(|e| Error::errno(format!("mount sysfs for {what}"), e))?;
            }
            f()
        });
        handle
            .join()
            .unwrap_or_else(|_| Err(Error::Runtime(format!("worker thread in network namespace \"{ns}\" panicked"))))
    })
}

/// For work started with [`run_in_without_sysfs`] that turns out to need sysfs: give the calling thread (the
/// worker, already in `ns`) a sysfs of that namespace. Nothing to do without `ns`. Call at most once.
pub fn sysfs_of_current(ns: Option<&NetnsSpec>) -> Result<()> {
    match ns {
        Some(ns) => private_sysfs().map_err(|e| Error::errno(format!("mount sysfs for network namespace \"{ns}\""), e)),
        None => Ok(()),
    }
}

/// Give this thread its own mount namespace with a sysfs of the network namespace it is in.
fn private_sysfs() -> nix::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS)?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)?;
    // /sys may not be a mount point (containers): a failed detach is fine.
    let _ = umount2("/sys", MntFlags::MNT_DETACH);
    mount(Some("sysfs"), "/sys", Some("sysfs"), MsFlags::empty(), None::<&str>)
}

/// The inode of the calling thread's network namespace: a stable tag for it while it exists.
pub fn current_netns_inode() -> Result<u64> {
    let meta =
        std::fs::metadata("/proc/thread-self/ns/net").map_err(|e| Error::io("read /proc/thread-self/ns/net", e))?;
    Ok(std::os::unix::fs::MetadataExt::ino(&meta))
}

/// A lock on the calling thread's network namespace itself: `flock` on its nsfs inode, which every opener
/// of that namespace (`/proc/PID/ns/net`, `/run/netns/NAME`) shares. `create`, `delete` and root's `open`
/// take it, so runs on one namespace never interleave; it needs no file of its own (nothing is left behind),
/// and the kernel drops it when the process dies, SIGKILL included.
pub struct NamespaceLock {
    _lock: Flock<File>,
}

pub fn lock_current() -> Result<NamespaceLock> {
    let path = "/proc/thread-self/ns/net";
    let file = File::open(path).map_err(|e| Error::io(format!("open {path}"), e))?;
    let lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::errno("lock this network namespace (flock on /proc/thread-self/ns/net)", e))?;
    Ok(NamespaceLock { _lock: lock })
}

/// The namespace a lookup used, for messages: `network namespace "lab" (net:[4026532301])`, or
/// `this process's network namespace (net:[4026531840])`. Call on the thread that is in it.
pub fn describe_current(ns: Option<&NetnsSpec>) -> String {
    let inode = current_netns_inode().map(|i| format!(" (net:[{i}])")).unwrap_or_default();
    match ns {
        Some(ns) => format!("network namespace \"{ns}\"{inode}"),
        None => format!("this process's network namespace{inode}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        let n: NetnsSpec = "lab".parse().unwrap();
        assert_eq!(n.path, PathBuf::from("/run/netns/lab"));
        let p: NetnsSpec = "/proc/1/ns/net".parse().unwrap();
        assert_eq!(p.path, PathBuf::from("/proc/1/ns/net"));
        assert!("".parse::<NetnsSpec>().is_err());
        assert!("..".parse::<NetnsSpec>().is_err());
    }
}
