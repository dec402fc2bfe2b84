//! The stop ladder, written once: `system_powerdown` (when the guest is ready and has a shutdown timeout),
//! then `quit`, then SIGTERM, then SIGKILL. QEMU's exit is noticed at every step, and a further stop signal
//! (when the caller passes its signals) skips to the next step at once.
//!
//! QEMU is reached through two small traits, [`Process`] (the child) and [`Control`] (the QMP connection),
//! so the ladder is tested against a fake QEMU.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::process::Child;
use tokio::signal::unix::{SignalKind, signal};

use crate::error::{Error, Result};
use crate::launcher::qmp::QmpClient;

/// Driver passes [`StopSignals::pending`] allows for a signal that already arrived.
const PENDING_POLLS: usize = 3;
/// How long `quit` gets before SIGTERM, and SIGTERM before SIGKILL, in an ordered stop.
const QUIT_GRACE: Duration = Duration::from_secs(5);
const TERM_GRACE: Duration = Duration::from_secs(5);
/// The same steps when the run is failing anyway (guest stopped, link gone, not ready): quick.
pub(super) const QUICK_GRACE: Duration = Duration::from_millis(600);
/// How long one QMP exchange may take.
pub(super) const QMP_TIMEOUT: Duration = Duration::from_secs(2);

/// The stop signals (SIGTERM, SIGINT and SIGHUP: the same graceful stop) and the ones that are ignored
/// (SIGPIPE, SIGUSR1, SIGUSR2: each said once), registered before any preparation so a signal during it is
/// neither lost nor fatal.
pub(super) struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    ignored: [(tokio::signal::unix::Signal, &'static str, bool); 3],
}

impl StopSignals {
    /// Call inside the runtime.
    pub(super) fn new() -> Result<StopSignals> {
        let handle = |kind: SignalKind, name: &str| signal(kind).map_err(|e| Error::io(format!("handle {name}"), e));
        Ok(StopSignals {
            term: handle(SignalKind::terminate(), "SIGTERM")?,
            int: handle(SignalKind::interrupt(), "SIGINT")?,
            hup: handle(SignalKind::hangup(), "SIGHUP")?,
            ignored: [
                (handle(SignalKind::pipe(), "SIGPIPE")?, "SIGPIPE", false),
                (handle(SignalKind::user_defined1(), "SIGUSR1")?, "SIGUSR1", false),
                (handle(SignalKind::user_defined2(), "SIGUSR2")?, "SIGUSR2", false),
            ],
        })
    }

    /// The next stop signal; the ignored ones are said once each on the way.
    pub(super) async fn recv(&mut self) -> &'static str {
        loop {
            let [pipe, usr1, usr2] = &mut self.ignored;
            let i = tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => return "SIGHUP",
                _ = pipe.0.recv() => 0,
                _ = usr1.0.recv() => 1,
                _ = usr2.0.recv() => 2,
            };
            let (_, name, said) = &mut self.ignored[i];
            if !std::mem::replace(said, true) {
                tracing::info!("{name}: ignored (SIGTERM, SIGINT or SIGHUP stop the guest); further ones silently");
            }
        }
    }

    /// A signal that already arrived (while the runtime was not running). Its handler has written to the
    /// runtime's signal pipe; a yield lets the driver read it (a yielded task is woken only after the driver
    /// ran), so this costs microseconds, not a fixed wait, on every start.
    pub(super) fn pending(&mut self, rt: &tokio::runtime::Runtime) -> Option<&'static str> {
        rt.block_on(async {
            for _ in 0..PENDING_POLLS {
                tokio::select! {
                    biased;
                    sig = self.recv() => return Some(sig),
                    () = tokio::task::yield_now() => {}
                }
            }
            None
        })
    }
}

/// QEMU's process, as the ladder sees it.
pub(super) trait Process {
    /// Wait for it to exit (cancel-safe: may be dropped and called again).
    async fn wait(&mut self) -> io::Result<ExitStatus>;
    fn signal(&self, sig: Signal);
    /// SIGKILL, then wait for it.
    async fn kill(&mut self);
}

/// QEMU's QMP connection, as the ladder and the event judgement see it.
pub(super) trait Control {
    async fn execute(&self, command: &str) -> Result<Value>;
}

impl Process for Child {
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        Child::wait(self).await
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    async fn kill(&mut self) {
        let _ = self.start_kill();
        let _ = Child::wait(self).await;
    }
}

impl Control for QmpClient {
    async fn execute(&self, command: &str) -> Result<Value> {
        QmpClient::execute(self, command).await
    }
}

/// The rungs of one stop.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ladder {
    /// Ask the guest to power off first and give it this long (`None`: start at `quit`).
    pub(super) powerdown: Option<Duration>,
    /// How long one QMP command may take.
    pub(super) command: Duration,
    /// After `quit`, and after SIGTERM.
    pub(super) quit_grace: Duration,
    pub(super) term_grace: Duration,
    /// Log each step (an ordered stop) or only the kill (a quick stop of a failing run).
    pub(super) announce: bool,
}

impl Ladder {
    /// The stop an operator asked for: `powerdown` when the guest is ready, with `--shutdown-timeout`.
    pub(super) fn ordered(powerdown: Option<Duration>) -> Ladder {
        Ladder { powerdown, command: QMP_TIMEOUT, quit_grace: QUIT_GRACE, term_grace: TERM_GRACE, announce: true }
    }

    /// The stop of a run that fails anyway: `quit`, SIGTERM, SIGKILL, each with `grace` (SIGTERM twice it).
    pub(super) fn quick(grace: Duration) -> Ladder {
        Ladder { powerdown: None, command: grace, quit_grace: grace, term_grace: grace * 2, announce: false }
    }
}

/// How QEMU ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stopped {
    PoweredOff(ExitStatus),
    Quit(ExitStatus),
    Terminated(ExitStatus),
    Killed,
}

/// Climb the ladder until QEMU is gone. `signals`: a further stop signal skips to the next step.
pub(super) async fn stop(
    p: &mut impl Process,
    qmp: &impl Control,
    ladder: Ladder,
    mut signals: Option<&mut StopSignals>,
) -> io::Result<Stopped> {
    if let Some(limit) = ladder.powerdown {
        if let Some(s) = command(p, qmp, "system_powerdown", &ladder).await {
            return s.map(Stopped::PoweredOff);
        }
        if let Some(s) = wait_for_exit(p, limit, signals.as_deref_mut()).await {
            return s.map(Stopped::PoweredOff);
        }
    }
    if ladder.announce {
        tracing::info!("quitting QEMU");
    }
    if let Some(s) = command(p, qmp, "quit", &ladder).await {
        return s.map(Stopped::Quit);
    }
    if let Some(s) = wait_for_exit(p, ladder.quit_grace, signals.as_deref_mut()).await {
        return s.map(Stopped::Quit);
    }
    if ladder.announce {
        tracing::warn!("QEMU did not quit within {} s; sending it SIGTERM", ladder.quit_grace.as_secs());
    }
    p.signal(Signal::SIGTERM);
    if let Some(s) = wait_for_exit(p, ladder.term_grace, signals).await {
        return s.map(Stopped::Terminated);
    }
    tracing::warn!("killing QEMU (SIGKILL)");
    p.kill().await;
    Ok(Stopped::Killed)
}

/// The ordered stop, as `run` reports it: QEMU must end well, or the run fails.
pub(super) async fn stop_ordered(
    p: &mut impl Process,
    qmp: &impl Control,
    ladder: Ladder,
    signals: Option<&mut StopSignals>,
) -> Result<()> {
    let (status, how) = match stop(p, qmp, ladder, signals).await {
        Err(e) => return Err(Error::io("wait for QEMU", e)),
        Ok(Stopped::Killed) => {
            return Err(Error::Runtime("QEMU did not stop on powerdown, quit or SIGTERM; killed it".into()));
        }
        Ok(Stopped::PoweredOff(s)) => (s, "the guest powered off"),
        Ok(Stopped::Quit(s)) => (s, "QEMU quit"),
        Ok(Stopped::Terminated(s)) => (s, "QEMU ended on SIGTERM"),
    };
    if !status.success() {
        return Err(Error::Runtime(format!("QEMU failed while stopping: {}", describe(status))));
    }
    tracing::info!("{how} ({})", describe(status));
    Ok(())
}

/// The quick stop of a failing run; how QEMU ended does not matter.
pub(super) async fn stop_quick(p: &mut impl Process, qmp: &impl Control) {
    let _ = stop(p, qmp, Ladder::quick(QUICK_GRACE), None).await;
}

/// A QMP command, abandoned when QEMU exits meanwhile (then its status is returned).
async fn command(
    p: &mut impl Process,
    qmp: &impl Control,
    command: &str,
    ladder: &Ladder,
) -> Option<io::Result<ExitStatus>> {
    tokio::select! {
        status = p.wait() => Some(status),
        r = tokio::time::timeout(ladder.command, qmp.execute(command)) => {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!("{e}"),
                Err(_) if ladder.announce => {
                    tracing::warn!("QMP {command}: no answer within {} s", ladder.command.as_secs());
                }
                Err(_) => {}
            }
            None
        }
    }
}

/// Wait for QEMU to exit for at most `limit`; a stop signal (when given) cuts the wait short.
async fn wait_for_exit(
    p: &mut impl Process,
    limit: Duration,
    signals: Option<&mut StopSignals>,
) -> Option<io::Result<ExitStatus>> {
    let signal = async {
        match signals {
            Some(s) => {
                let sig = s.recv().await;
                tracing::info!("{sig} again: going to the next step at once");
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        status = p.wait() => Some(status),
        () = tokio::time::sleep(limit) => None,
        () = signal => None,
    }
}

/// An exit status in words: `exit status 1`, `signal 9 (SIGKILL)`.
pub(super) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => {
            let name = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("unknown");
            format!("signal {s} ({name})")
        }
        _ => status.to_string(),
    }
}

#[cfg(test)]
pub(super) mod fake {
    //! A fake QEMU for the ladder and the event judgement: it answers QMP commands from a script and exits
    //! on the command or signal it is told to.

    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::rc::Rc;

    use super::*;

    #[derive(Default)]
    pub(crate) struct State {
        /// Every command and signal, in order.
        pub(crate) log: Vec<String>,
        pub(crate) exited: Option<ExitStatus>,
        /// The command that makes QEMU exit (with status 0).
        pub(crate) exit_on_command: Option<&'static str>,
        /// The signal that makes QEMU exit (killed by it).
        pub(crate) exit_on_signal: Option<Signal>,
        /// Commands that never get an answer.
        pub(crate) hang: Vec<&'static str>,
        /// Answers by command (default: `{}`).
        pub(crate) answers: HashMap<&'static str, Value>,
    }

    pub(crate) struct FakeProcess(pub(crate) Rc<RefCell<State>>);
    pub(crate) struct FakeQmp(pub(crate) Rc<RefCell<State>>);

    pub(crate) fn qemu(state: State) -> (FakeProcess, FakeQmp, Rc<RefCell<State>>) {
        let s = Rc::new(RefCell::new(state));
        (FakeProcess(Rc::clone(&s)), FakeQmp(Rc::clone(&s)), s)
    }

    impl Process for FakeProcess {
        async fn wait(&mut self) -> io::Result<ExitStatus> {
            loop {
                if let Some(s) = self.0.borrow().exited {
                    return Ok(s);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }

        fn signal(&self, sig: Signal) {
            let mut s = self.0.borrow_mut();
            s.log.push(sig.as_str().to_owned());
            if s.exit_on_signal == Some(sig) {
                s.exited = Some(ExitStatus::from_raw(sig as i32));
            }
        }

        async fn kill(&mut self) {
            let mut s = self.0.borrow_mut();
            s.log.push("SIGKILL".to_owned());
            s.exited = Some(ExitStatus::from_raw(Signal::SIGKILL as i32));
        }
    }

    impl Control for FakeQmp {
        async fn execute(&self, command: &str) -> Result<Value> {
            let hang = {
                let mut s = self.0.borrow_mut();
                s.log.push(command.to_owned());
                if s.exited.is_some() {
                    return Err(Error::Runtime(format!("QMP {command}: QEMU closed the connection")));
                }
                if s.exit_on_command == Some(command) {
                    s.exited = Some(ExitStatus::from_raw(0));
                }
                s.hang.contains(&command)
            };
            if hang {
                std::future::pending::<()>().await;
            }
            Ok(self.0.borrow().answers.get(command).cloned().unwrap_or_else(|| serde_json::json!({})))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{State, qemu};
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    fn short(powerdown: bool) -> Ladder {
        let ms = Duration::from_millis(30);
        Ladder { powerdown: powerdown.then_some(ms), command: ms, quit_grace: ms, term_grace: ms, announce: true }
    }

    #[test]
    fn a_guest_that_powers_off_ends_the_ladder_at_the_first_step() {
        let (mut p, q, s) = qemu(State { exit_on_command: Some("system_powerdown"), ..State::default() });
        let r = rt().block_on(stop(&mut p, &q, short(true), None)).unwrap();
        assert_eq!(r, Stopped::PoweredOff(ExitStatus::from_raw(0)));
        assert_eq!(s.borrow().log, ["system_powerdown"]);
    }

    #[test]
    fn a_guest_that_ignores_powerdown_is_quit() {
        let (mut p, q, s) = qemu(State { exit_on_command: Some("quit"), ..State::default() });
        let r = rt().block_on(stop(&mut p, &q, short(true), None)).unwrap();
        assert_eq!(r, Stopped::Quit(ExitStatus::from_raw(0)));
        assert_eq!(s.borrow().log, ["system_powerdown", "quit"]);
    }

    #[test]
    fn without_powerdown_the_ladder_starts_at_quit() {
        let (mut p, q, s) = qemu(State { exit_on_command: Some("quit"), ..State::default() });
        let r = rt().block_on(stop(&mut p, &q, short(false), None)).unwrap();
        assert_eq!(r, Stopped::Quit(ExitStatus::from_raw(0)));
        assert_eq!(s.borrow().log, ["quit"]);
    }

    #[test]
    fn a_qemu_that_does_not_answer_gets_sigterm_then_sigkill() {
        let (mut p, q, s) = qemu(State {
            hang: vec!["system_powerdown", "quit"],
            exit_on_signal: Some(Signal::SIGTERM),
            ..State::default()
        });
        let r = rt().block_on(stop(&mut p, &q, short(true), None)).unwrap();
        assert_eq!(r, Stopped::Terminated(ExitStatus::from_raw(Signal::SIGTERM as i32)));
        assert_eq!(s.borrow().log, ["system_powerdown", "quit", "SIGTERM"]);

        let (mut p, q, s) = qemu(State { hang: vec!["quit"], ..State::default() });
        let r = rt().block_on(stop(&mut p, &q, short(false), None)).unwrap();
        assert_eq!(r, Stopped::Killed);
        assert_eq!(s.borrow().log, ["quit", "SIGTERM", "SIGKILL"]);
    }

    #[test]
    fn an_ordered_stop_fails_when_qemu_had_to_be_killed_or_failed() {
        let (mut p, q, _) = qemu(State { hang: vec!["quit"], ..State::default() });
        let rt = rt();
        let err = rt.block_on(stop_ordered(&mut p, &q, short(false), None)).unwrap_err();
        assert!(err.to_string().contains("killed it"), "{err}");
        let (mut p, q, _) = qemu(State { exit_on_signal: Some(Signal::SIGTERM), ..State::default() });
        let err = rt.block_on(stop_ordered(&mut p, &q, short(false), None)).unwrap_err();
        assert!(err.to_string().contains("QEMU failed while stopping: signal 15 (SIGTERM)"), "{err}");
        let (mut p, q, _) = qemu(State { exit_on_command: Some("quit"), ..State::default() });
        rt.block_on(stop_ordered(&mut p, &q, short(false), None)).unwrap();
    }

    #[test]
    fn a_qemu_already_gone_is_not_signalled() {
        let (mut p, q, s) = qemu(State { exited: Some(ExitStatus::from_raw(0)), ..State::default() });
        let r = rt().block_on(stop(&mut p, &q, short(true), None)).unwrap();
        assert_eq!(r, Stopped::PoweredOff(ExitStatus::from_raw(0)));
        assert!(!s.borrow().log.iter().any(|l| l.starts_with("SIG")), "{:?}", s.borrow().log);
    }

    #[test]
    fn exit_statuses_in_words() {
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)), "exit status 1");
        assert_eq!(describe(ExitStatus::from_raw(9)), "signal 9 (SIGKILL)");
    }
}
