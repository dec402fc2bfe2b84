//! `ec-ipxe-qemu console`: this terminal on the guest console, through the launcher's `console.sock`.
//!
//! The terminal goes to raw mode (every key goes to the guest, Ctrl-C included) and is restored on every way
//! out: Ctrl-] (detach), the launcher ending, SIGTERM/SIGHUP/SIGINT, an error. Not a terminal (a pipe): bytes
//! are copied as they are. The end of input detaches too.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::termios::{self, SetArg, Termios};

use crate::error::{Error, Result};
use crate::launcher::console::DETACH_KEY;
use crate::launcher::layout::CONSOLE_SOCKET;

/// How an attach ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Ctrl-], or the end of input.
    Detached,
    /// The launcher closed the console (it stopped, or dropped this client).
    Closed,
    /// A signal.
    Signal(Signal),
}

/// Puts a terminal in raw mode and restores it when dropped.
struct RawMode<'a> {
    fd: BorrowedFd<'a>,
    saved: Termios,
}

impl<'a> RawMode<'a> {
    fn enter(fd: BorrowedFd<'a>) -> Result<Option<RawMode<'a>>> {
        let Ok(saved) = termios::tcgetattr(fd) else { return Ok(None) };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw).map_err(|e| Error::errno("put the terminal in raw mode", e))?;
        Ok(Some(RawMode { fd, saved }))
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.fd, SetArg::TCSANOW, &self.saved);
    }
}

/// Connect to the console of the launcher running in `state_dir` (none: exit 3).
pub(crate) fn connect(state_dir: &Path) -> Result<UnixStream> {
    let path = state_dir.join(CONSOLE_SOCKET);
    UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Error::not_found(format!(
            "--state-dir \"{}\": console (no launcher is running there: {} is missing or nobody listens)",
            state_dir.display(),
            path.display()
        )),
        _ => Error::io(format!("connect to {}", path.display()), e),
    })
}

/// Copy between this process's stdin/stdout and the console until Ctrl-], the end, or a signal.
pub(crate) fn attach(state_dir: &Path) -> Result<End> {
    let sock = connect(state_dir)?;
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let interactive = nix::unistd::isatty(stdin.as_fd()).unwrap_or(false);
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGHUP, Signal::SIGINT] {
        mask.add(s);
    }
    mask.thread_block().map_err(|e| Error::errno("block signals", e))?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).map_err(|e| Error::errno("signalfd", e))?;
    let raw = if interactive { RawMode::enter(stdin.as_fd())? } else { None };
    if interactive {
        crate::logging::write_stderr(&format!(
            "Connected to the guest console of {} (Ctrl-] detaches).\r\n",
            state_dir.display()
        ));
    }
    let end = pump(&sock, stdin.as_fd(), stdout.as_fd(), &sigfd);
    drop(raw);
    let _ = mask.thread_unblock();
    let end = end?;
    if interactive {
        crate::logging::write_stderr(&match end {
            End::Detached => "\nDetached from the guest console.\n".to_owned(),
            End::Closed => "\nThe launcher closed the console (it stopped, or dropped this client).\n".to_owned(),
            End::Signal(s) => format!("\nConsole left on {s}.\n"),
        });
    }
    Ok(end)
}

fn pump(sock: &UnixStream, input: BorrowedFd, output: BorrowedFd, sigfd: &SignalFd) -> Result<End> {
    let mut buf = [0u8; 4096];
    let mut out = std::fs::File::from(output.try_clone_to_owned().map_err(|e| Error::io("stdout", e))?);
    // Whether stdin is still open: at its end (`console </dev/null`) the socket's sending half is closed and
    // the output goes on until the launcher closes the console or a signal comes.
    let mut input_open = true;
    loop {
        let mut fds = vec![PollFd::new(sock.as_fd(), PollFlags::POLLIN), PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
        if input_open {
            fds.push(PollFd::new(input, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::errno("poll", e)),
        }
        let ready = |i: usize| fds.get(i).and_then(|f| f.revents()).is_some_and(|r| !r.is_empty());
        let (sock_ready, sig_ready, in_ready) = (ready(0), ready(1), ready(2));
        if sig_ready && let Ok(Some(info)) = sigfd.read_signal() {
            let sig = Signal::try_from(info.ssi_signo as i32).unwrap_or(Signal::SIGTERM);
            return Ok(End::Signal(sig));
        }
        if sock_ready {
            let n = nix::unistd::read(sock.as_fd(), &mut buf).map_err(|e| Error::errno("read the console", e))?;
            if n == 0 {
                return Ok(End::Closed);
            }
            out.write_all(&buf[..n]).map_err(|e| Error::io("write to the terminal", e))?;
            out.flush().map_err(|e| Error::io("write to the terminal", e))?;
        }
        if in_ready {
            let n = nix::unistd::read(input, &mut buf).map_err(|e| Error::errno("read the terminal", e))?;
            if n == 0 {
                input_open = false;
                let _ = sock.shutdown(std::net::Shutdown::Write);
                continue;
            }
            let data = &buf[..n];
            let (send, detach) = match data.iter().position(|b| *b == DETACH_KEY) {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            let mut s = sock;
            if !send.is_empty() {
                std::io::Write::write_all(&mut s, send).map_err(|e| Error::io("send to the console", e))?;
            }
            if detach {
                return Ok(End::Detached);
            }
        }
    }
}
