//! One launcher per macvtap: a second `run` on a macvtap that another one uses exits 4 and names the holder.
//!
//! The lock is an abstract unix socket, `@ec-ipxe-qemu/lan/<ifindex>`, bound by the run that uses the link.
//! Abstract sockets belong to the network namespace, which is exactly the scope of an ifindex, so the name is
//! unique per link. The kernel releases it when the holder dies (even by SIGKILL), no file system is
//! involved (nothing to clean up, nothing that `ProtectSystem=`, `PrivateTmp=` or a per-user runtime
//! directory would split or hide), and `bind` is atomic, so two runs starting at the same instant cannot both
//! win. A refused run connects to it and reads the holder's pid from `SO_PEERCRED`.
//!
//! Processes that are not launchers (QEMU started by hand with `ec-macvtap exec`, a leftover guest) take no
//! such lock, so the run also looks for any process holding an fd on the link's tap character device (same
//! major:minor, whichever node it was opened through), as far as /proc lets this user see.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};

use crate::error::{Error, Result};
use crate::names::IfName;

/// The held lock; released when dropped (or when the process dies).
pub(crate) struct LanLock {
    listener: UnixListener,
}

fn abstract_name(ifindex: u32) -> String {
    format!("ec-ipxe-qemu/lan/{ifindex}")
}

impl LanLock {
    /// Take the lock for link `ifindex` (named `name` in messages), or fail with a conflict naming the holder.
    pub(crate) fn acquire(name: &IfName, ifindex: u32) -> Result<LanLock> {
        let key = abstract_name(ifindex);
        let addr = SocketAddr::from_abstract_name(key.as_bytes())
            .map_err(|e| Error::io(format!("--lan-interface \"{name}\": lock name"), e))?;
        match UnixListener::bind_addr(&addr) {
            Ok(listener) => {
                listener
                    .set_nonblocking(true)
                    .map_err(|e| Error::io(format!("--lan-interface \"{name}\": lock"), e))?;
                Ok(LanLock { listener })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let who = held_by(ifindex).flatten().map(|pid| format!(" (pid {pid})")).unwrap_or_default();
                Err(Error::conflict(
                    format!("--lan-interface \"{name}\""),
                    format!(
                        "macvtap is in use by another ec-ipxe-qemu run{who}; refusing to start a second guest on it"
                    ),
                ))
            }
            Err(e) => Err(Error::io(format!("--lan-interface \"{name}\": take the lock @{key}"), e)),
        }
    }

    /// Accept and drop the connections refused runs make to learn the holder's pid, so they never pile up.
    /// Call inside a tokio runtime; the task ends with the runtime.
    pub(crate) fn serve(&self) {
        let Ok(l) = self.listener.try_clone().and_then(tokio::net::UnixListener::from_std) else { return };
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
    }
}

/// The pid of the ec-ipxe-qemu run holding the lock of link `ifindex` in the calling thread's namespace
/// (`Some(None)` when held but the pid is unknown), or `None` when no run holds it. Nothing is bound.
pub(crate) fn held_by(ifindex: u32) -> Option<Option<i32>> {
    let key = abstract_name(ifindex);
    let fd: OwnedFd =
        socket::socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
            .ok()?;
    let addr = UnixAddr::new_abstract(key.as_bytes()).ok()?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) | Err(nix::errno::Errno::EAGAIN) => {
            Some(socket::getsockopt(&fd, sockopt::PeerCredentials).ok().map(|c| c.pid()))
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::DevNum;
    use std::os::unix::fs::MetadataExt;

    /// The lock is exclusive, names the holder's pid, and is free again once dropped. (Abstract names are per
    /// network namespace; a random high index keeps this clear of real runs.)
    #[test]
    fn exclusive_names_holder_and_released_on_drop() {
        let name: IfName = "ec-test0".parse().unwrap();
        let ifindex = 3_000_000_000 + (std::process::id() % 1_000_000);
        assert_eq!(held_by(ifindex), None);
        let held = LanLock::acquire(&name, ifindex).unwrap();
        assert_eq!(held_by(ifindex), Some(Some(std::process::id() as i32)));
        let err = LanLock::acquire(&name, ifindex).err().unwrap();
        assert_eq!(err.exit_code(), 4);
        assert!(err.to_string().contains(&format!("(pid {})", std::process::id())), "{err}");
        assert!(err.to_string().starts_with("--lan-interface \"ec-test0\": macvtap is in use"), "{err}");
        assert!(LanLock::acquire(&name, ifindex + 1).is_ok(), "another link is another lock");
        drop(held);
        assert_eq!(held_by(ifindex), None);
        assert!(LanLock::acquire(&name, ifindex).is_ok());
    }

    /// A process holding an fd on a character device is found by the device's number, whatever the path.
    #[test]
    fn finds_holders_of_a_char_device_by_number() {
        let m = std::fs::metadata("/dev/null").unwrap();
        let dev = DevNum { major: nix::sys::stat::major(m.rdev()), minor: nix::sys::stat::minor(m.rdev()) };
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::fs::File::open("/dev/null").unwrap())
            .spawn()
            .unwrap();
        let found = crate::tap::holders(dev).iter().any(|(pid, comm)| *pid == child.id() as i32 && comm == "sleep");
        let _ = child.kill();
        let _ = child.wait();
        assert!(found);
    }
}
