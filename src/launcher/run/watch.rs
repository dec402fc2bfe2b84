//! Staying with the running guest: one event loop over QEMU's exit, stop signals, the LAN link, the ready
//! deadline, the boot watch's events, QEMU's QMP events and a run-state poll (which also feeds the systemd
//! watchdog). The loop ends with a [`StopReason`]; each reason has one way to end the run.
//!
//! The launcher never stops the guest itself, so a STOP event is someone else's (or an error's) and the run
//! state says whether the guest is still fine; a guest panic ends the run at once; a RESET (the guest
//! rebooted) starts the boot watch over.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::qemu::{Guest, RunFailure};
use super::stop::{self, Control, Ladder, QMP_TIMEOUT, StopSignals};
use super::tracker::Tracker;
use crate::error::{Error, Result};
use crate::launcher::accel::Accel;
use crate::launcher::config::LaunchConfig;
use crate::launcher::linkwatch::LinkEnd;
use crate::launcher::qmp::QmpEvent;

/// How often the guest's run state is polled, as a backstop to the STOP event.
const STATUS_POLL: Duration = Duration::from_secs(1);
/// How often `status.json`'s `download` follows the `--boot-dir` server's byte counts while iPXE loads.
const DOWNLOAD_POLL: Duration = Duration::from_millis(250);

/// Why the watch ended while QEMU still ran.
#[derive(Debug, PartialEq)]
pub(super) enum StopReason {
    /// SIGTERM or SIGINT.
    Stop(&'static str),
    /// Not ready within `--ready-timeout`.
    NotReady(Duration),
    LinkGone(LinkEnd),
    /// QEMU says the guest is dead; `at`: QEMU's timestamp of the event (Unix time).
    GuestFailed {
        reason: String,
        at: Option<f64>,
    },
}

/// What a QMP event means for the run.
#[derive(Debug, PartialEq)]
pub(super) enum Judgement {
    Fine,
    /// The guest was reset (it rebooted): the boot starts over.
    Reset,
    End(StopReason),
}

/// Judge one QMP event; a STOP is checked against the run state.
pub(super) async fn judge_event(ev: &QmpEvent, accel: Accel, qmp: &impl Control) -> Judgement {
    match ev.name.as_str() {
        "GUEST_PANICKED" => {
            Judgement::End(StopReason::GuestFailed { reason: "the guest panicked".into(), at: ev.timestamp })
        }
        "RESET" => Judgement::Reset,
        "STOP" => {
            // The launcher never stops the guest, so this STOP is someone else's; the run state says why.
            let st = run_state(qmp).await.unwrap_or_default();
            if state_is_fine(&st) {
                return Judgement::Fine;
            }
            let reason = if st.is_empty() { "QEMU stopped the guest".into() } else { failure_reason(&st, accel) };
            Judgement::End(StopReason::GuestFailed { reason, at: ev.timestamp })
        }
        _ => Judgement::Fine,
    }
}

/// The guest's run state (`query-status`), when QEMU answers in time.
pub(super) async fn run_state(qmp: &impl Control) -> Option<String> {
    match tokio::time::timeout(QMP_TIMEOUT, qmp.execute("query-status")).await {
        Ok(Ok(v)) => Some(v.get("status").and_then(|s| s.as_str()).unwrap_or("").to_owned()),
        _ => None,
    }
}

/// Why the guest is considered dead: from a run state (`query-status`) or an event.
pub(super) fn failure_reason(status: &str, accel: Accel) -> String {
    match status {
        "internal-error" if accel == Accel::Kvm => {
            "QEMU reports an internal error: the KVM accelerator failed; try --accel tcg".into()
        }
        "internal-error" => "QEMU reports an internal error".into(),
        "guest-panicked" => "the guest panicked".into(),
        "io-error" => "a disk I/O error stopped the guest".into(),
        "paused" => "the guest was paused by someone else (a \"stop\" on qmp.sock?)".into(),
        "shutdown" => "the guest shut down but QEMU stayed".into(),
        other => format!("the guest is in state \"{other}\""),
    }
}

/// Run states in which the guest is fine.
pub(super) fn state_is_fine(status: &str) -> bool {
    matches!(status, "running" | "suspended" | "prelaunch")
}

/// Watch the guest until QEMU exits or a [`StopReason`] ends the run, then read the rest of its console.
pub(super) async fn supervise(
    cfg: &LaunchConfig,
    accel: Accel,
    mut g: Guest,
    signals: &mut StopSignals,
    tracker: &mut Tracker,
) -> Result<(), RunFailure> {
    let result = watch_over(cfg, accel, &mut g, signals, tracker).await;
    // QEMU is gone: read the rest of its console.
    g.console.drain(Duration::from_secs(1)).await;
    while let Ok(ev) = g.boot.try_recv() {
        tracker.handle(ev);
    }
    result
}

async fn watch_over(
    cfg: &LaunchConfig,
    accel: Accel,
    g: &mut Guest,
    signals: &mut StopSignals,
    tracker: &mut Tracker,
) -> Result<(), RunFailure> {
    let mut watch = g.watch.take();
    let watchdog = tracker.notify.watchdog_interval();
    let mut poll = tokio::time::interval(watchdog.map_or(STATUS_POLL, |w| w.min(STATUS_POLL)));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ping: Option<tokio::time::Instant> = None;
    let ready_by = cfg.ready_timeout.map(|t| tokio::time::Instant::now() + t);
    let mut events_open = true;
    let mut boot_open = true;
    let mut downloads = tokio::time::interval(DOWNLOAD_POLL);
    downloads.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        let not_ready_at = ready_by.filter(|_| !tracker.is_ready());
        let not_ready = async move {
            match not_ready_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let link_gone = async {
            match watch.as_mut() {
                Some(w) => w.gone().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = g.child.wait() => return Ok(g.exited(status, accel).await?),
            sig = signals.recv() => break StopReason::Stop(sig),
            end = link_gone => break StopReason::LinkGone(end),
            () = not_ready => break StopReason::NotReady(cfg.ready_timeout.unwrap_or_default()),
            ev = g.boot.recv(), if boot_open => match ev {
                Some(ev) => tracker.handle(ev),
                None => boot_open = false,
            },
            ev = g.events.recv(), if events_open => match ev {
                Some(ev) => match judge_event(&ev, accel, &g.qmp).await {
                    Judgement::Fine => {}
                    Judgement::Reset => {
                        tracing::info!("QEMU reset the guest (RESET event): the boot watch starts over");
                        g.boot_feed.reset();
                    }
                    Judgement::End(reason) => break reason,
                },
                // QEMU closed the connection: it is exiting, which child.wait() reports.
                None => events_open = false,
            },
            _ = downloads.tick(), if tracker.watching_downloads() => tracker.poll_http(),
            _ = poll.tick() => {
                tracker.refresh_cache();
                if let Some(st) = run_state(&g.qmp).await {
                    if !st.is_empty() && !state_is_fine(&st) {
                        break StopReason::GuestFailed { reason: failure_reason(&st, accel), at: None };
                    }
                    // The watchdog is fed only while QEMU says the guest runs.
                    if let Some(every) = watchdog
                        && st == "running"
                        && last_ping.is_none_or(|t| t.elapsed() + STATUS_POLL / 4 >= every)
                    {
                        tracker.notify.watchdog();
                        last_ping = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
    };
    end(cfg, g, reason, signals, tracker).await
}

/// End the run for `reason`: an ordered stop for a stop request, a quick one (and a failure) for the rest.
async fn end(
    cfg: &LaunchConfig,
    g: &mut Guest,
    reason: StopReason,
    signals: &mut StopSignals,
    tracker: &mut Tracker,
) -> Result<(), RunFailure> {
    match reason {
        StopReason::Stop(sig) => {
            // What the console has said so far decides how to stop.
            while let Ok(ev) = g.boot.try_recv() {
                tracker.handle(ev);
            }
            let stage = tracker.stage().map_or("starting", |s| s.as_str());
            let powerdown = if tracker.is_ready() {
                tracker.stopping(&format!("stopping: {sig}: powering the guest off"));
                if cfg.shutdown_timeout.is_zero() {
                    tracing::info!("{sig}: asking the guest to power off; QEMU quits now (--shutdown-timeout 0)");
                    None
                } else {
                    tracing::info!(
                        "{sig}: asking the guest to power off; QEMU quits in {} s if it has not",
                        cfg.shutdown_timeout.as_secs()
                    );
                    Some(cfg.shutdown_timeout)
                }
            } else {
                tracing::info!(
                    "{sig} before the guest was ready (stage {stage}): quitting QEMU at once (firmware and iPXE \
                     ignore an ACPI power-off)"
                );
                tracker.stopping(&format!("stopping: {sig} before the guest was ready: quitting QEMU"));
                None
            };
            Ok(stop::stop_ordered(&mut g.child, &g.qmp, Ladder::ordered(powerdown), Some(signals)).await?)
        }
        StopReason::NotReady(limit) => {
            let stage = tracker.stage().map_or("starting", |s| s.as_str());
            let last =
                tracker.status().last_error.clone().map(|e| format!("; last boot failure: {e}")).unwrap_or_default();
            let msg =
                format!("the guest was not ready within --ready-timeout {} s (stage {stage}{last})", limit.as_secs());
            tracing::error!("{msg}; stopping QEMU");
            tracker.stopping(&format!("stopping: not ready within {} s (stage {stage})", limit.as_secs()));
            stop::stop_quick(&mut g.child, &g.qmp).await;
            Err(Error::Runtime(msg).into())
        }
        StopReason::LinkGone(end) => {
            let (name, ifindex) = g.lan.clone().unwrap_or_default();
            let what = match end {
                LinkEnd::Removed => "disappeared".to_string(),
                LinkEnd::WatchLost(why) => format!("can no longer be watched ({why})"),
            };
            tracing::error!("LAN macvtap \"{name}\" (ifindex {ifindex}) {what}; stopping QEMU");
            stop::stop_quick(&mut g.child, &g.qmp).await;
            Err(Error::Runtime(format!(
                "LAN macvtap \"{name}\" (ifindex {ifindex}) {what} while the guest was running; stopped QEMU"
            ))
            .into())
        }
        StopReason::GuestFailed { reason, at } => {
            if let Some(at) = at {
                tracing::error!("guest failure reported by QEMU at {at:.6} (Unix time)");
            }
            tracing::error!("the guest stopped running: {reason}; stopping QEMU");
            stop::stop_quick(&mut g.child, &g.qmp).await;
            if let Some(at) = at {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(at);
                tracing::info!("{:.3} s from the guest's failure to the end of the run", now - at);
            }
            Err(Error::Runtime(format!("the guest stopped running: {reason}")).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::stop::fake::{State, qemu};
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    fn event(name: &str) -> QmpEvent {
        QmpEvent { name: name.into(), data: serde_json::Value::Null, timestamp: Some(1.5) }
    }

    fn judge(name: &str, run_state: Option<&'static str>, accel: Accel) -> Judgement {
        let mut state = State::default();
        match run_state {
            Some(st) => {
                state.answers.insert("query-status", serde_json::json!({ "status": st }));
            }
            None => state.hang.push("query-status"),
        }
        let (_p, q, _) = qemu(state);
        rt().block_on(judge_event(&event(name), accel, &q))
    }

    #[test]
    fn run_states() {
        for fine in ["running", "suspended", "prelaunch"] {
            assert!(state_is_fine(fine));
        }
        for bad in ["internal-error", "guest-panicked", "paused", "io-error", "shutdown", "debug"] {
            assert!(!state_is_fine(bad), "{bad}");
        }
        assert!(failure_reason("internal-error", Accel::Kvm).contains("the KVM accelerator failed; try --accel tcg"));
        assert!(!failure_reason("internal-error", Accel::Tcg).contains("KVM"));
        assert_eq!(failure_reason("guest-panicked", Accel::Tcg), "the guest panicked");
        assert!(failure_reason("paused", Accel::Tcg).contains("qmp.sock"));
    }

    #[test]
    fn a_panic_ends_the_run_and_a_reset_restarts_the_boot() {
        assert_eq!(
            judge("GUEST_PANICKED", Some("running"), Accel::Tcg),
            Judgement::End(StopReason::GuestFailed { reason: "the guest panicked".into(), at: Some(1.5) })
        );
        assert_eq!(judge("RESET", Some("running"), Accel::Tcg), Judgement::Reset);
        for other in ["RESUME", "NIC_RX_FILTER_CHANGED", "POWERDOWN"] {
            assert_eq!(judge(other, Some("paused"), Accel::Tcg), Judgement::Fine, "{other}");
        }
    }

    #[test]
    fn a_stop_is_judged_by_the_run_state() {
        assert_eq!(judge("STOP", Some("running"), Accel::Tcg), Judgement::Fine);
        assert_eq!(judge("STOP", Some("suspended"), Accel::Tcg), Judgement::Fine);
        let Judgement::End(StopReason::GuestFailed { reason, at }) = judge("STOP", Some("paused"), Accel::Tcg) else {
            panic!("a paused guest ends the run")
        };
        assert!(reason.contains("paused by someone else"), "{reason}");
        assert_eq!(at, Some(1.5));
        let Judgement::End(StopReason::GuestFailed { reason, .. }) = judge("STOP", Some("internal-error"), Accel::Kvm)
        else {
            panic!("an internal error ends the run")
        };
        assert!(reason.contains("try --accel tcg"), "{reason}");
    }
}
