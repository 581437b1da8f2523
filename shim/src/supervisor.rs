//! The running VM's state machine: what the shim does on each lifecycle
//! event, signal and timeout, and with which code it exits. Pure, so every
//! path is tested without a daemon.

use std::time::Duration;

use libvirt_wire::{LifecycleEvent, StoppedReason};

use crate::exit::Exit;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A lifecycle event of our domain.
    Lifecycle(LifecycleEvent),
    /// A signal arrived (SIGTERM 15, SIGINT 2, SIGQUIT 3, SIGHUP 1).
    Signal(i32),
    /// The shutdown grace period ended.
    ShutdownTimeout,
    /// The connection to libvirtd ended.
    ConnectionLost(String),
    /// A periodic state check found the domain gone (no event seen).
    DomainGone,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Log a line and go on.
    Log(String),
    /// Ask the guest to shut down (ACPI) and arm the timer.
    Shutdown {
        /// How long to wait before destroying.
        timeout: Duration,
    },
    /// Destroy the domain now; exit with the given code once it is gone.
    Destroy(Exit),
    /// Exit (after flushing the console).
    Exit(Exit),
}

/// Signal numbers (Linux).
pub mod signals {
    /// SIGHUP.
    pub const HUP: i32 = 1;
    /// SIGINT.
    pub const INT: i32 = 2;
    /// SIGQUIT.
    pub const QUIT: i32 = 3;
    /// SIGTERM.
    pub const TERM: i32 = 15;
}

/// The supervisor's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// The VM runs.
    Running,
    /// A graceful shutdown was requested.
    Stopping,
    /// The shim is destroying the domain.
    Destroying,
    /// Done.
    Exited,
}

/// The state machine.
#[derive(Debug, Clone)]
pub struct Supervisor {
    state: State,
    shutdown_timeout: Duration,
    /// The guest announced its own shutdown (a SHUTDOWN event): if the domain
    /// is then found gone without a STOPPED event, it powered off.
    guest_shutting_down: bool,
}

impl Supervisor {
    /// A supervisor for a running VM.
    pub fn new(shutdown_timeout: Duration) -> Supervisor {
        Supervisor {
            state: State::Running,
            shutdown_timeout,
            guest_shutting_down: false,
        }
    }

    /// Current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Feeds one input and returns what to do.
    pub fn on(&mut self, input: Input) -> Action {
        use Input::*;
        use LifecycleEvent as E;
        if self.state == State::Exited {
            return Action::None;
        }
        let action = match (&self.state, input) {
            (_, Lifecycle(E::Stopped(reason))) => Action::Exit(self.stopped(reason)),
            (_, Lifecycle(E::Crashed(detail))) => Action::Exit(Exit::GuestCrashed(crash_detail(detail))),
            (_, Lifecycle(E::Undefined(_))) | (_, DomainGone) => Action::Exit(match self.state {
                State::Destroying => Exit::ForcedStop("the guest did not stop in time".into()),
                State::Stopping => Exit::GuestStopped,
                _ if self.guest_shutting_down => Exit::GuestStopped,
                _ => Exit::DestroyedExternally,
            }),
            (_, Lifecycle(E::Shutdown(_))) => {
                self.guest_shutting_down = true;
                Action::Log("the guest is shutting down".into())
            }
            (_, Lifecycle(E::Suspended(_))) => Action::Log("the domain was paused".into()),
            (_, Lifecycle(E::Resumed(_))) => {
                // A guest reboot is a shutdown that libvirt turns into a reset
                // and a resume: the guest runs again, not shutting down.
                self.guest_shutting_down = false;
                Action::Log("the domain was resumed".into())
            }
            (_, Lifecycle(other)) => Action::Log(format!("lifecycle event {other:?}")),
            (_, ConnectionLost(why)) => Action::Exit(Exit::LostLibvirtd(why)),
            (State::Running, Signal(signals::TERM | signals::INT)) => {
                self.state = State::Stopping;
                Action::Shutdown {
                    timeout: self.shutdown_timeout,
                }
            }
            (State::Stopping, Signal(signals::TERM | signals::INT)) => {
                self.state = State::Destroying;
                Action::Destroy(Exit::ForcedStop(
                    "a second stop signal came before the guest shut down".into(),
                ))
            }
            (State::Running | State::Stopping, Signal(signals::QUIT)) => {
                self.state = State::Destroying;
                Action::Destroy(Exit::ForcedStop("SIGQUIT asks for an immediate stop".into()))
            }
            (_, Signal(signals::HUP)) => Action::Log("SIGHUP ignored: the VM keeps running".into()),
            (_, Signal(n)) => Action::Log(format!("signal {n} ignored")),
            (State::Stopping, ShutdownTimeout) => {
                self.state = State::Destroying;
                Action::Destroy(Exit::ForcedStop(format!(
                    "the guest did not shut down within {}s of the ACPI request",
                    self.shutdown_timeout.as_secs()
                )))
            }
            (_, ShutdownTimeout) => Action::None,
        };
        if matches!(action, Action::Exit(_)) {
            self.state = State::Exited;
        }
        action
    }

    fn stopped(&self, reason: StoppedReason) -> Exit {
        match (reason, &self.state) {
            (StoppedReason::Shutdown, _) => Exit::GuestStopped,
            (StoppedReason::Destroyed, State::Destroying) => {
                Exit::ForcedStop("the guest did not shut down in time".into())
            }
            (StoppedReason::Destroyed, _) => Exit::DestroyedExternally,
            (StoppedReason::Crashed, _) => Exit::GuestCrashed("libvirt stopped it after a crash".into()),
            (StoppedReason::Failed, _) => Exit::GuestCrashed("the QEMU process failed".into()),
            (other, _) => Exit::GuestCrashed(format!("the domain stopped unexpectedly ({other:?})")),
        }
    }
}

fn crash_detail(detail: i32) -> String {
    match detail {
        0 => "its kernel panicked (reported through the pvpanic device)".into(),
        1 => "the hypervisor reported a crash".into(),
        other => format!("crash detail {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> Supervisor {
        Supervisor::new(Duration::from_secs(25))
    }

    fn exit_of(action: Action) -> i32 {
        match action {
            Action::Exit(e) => e.code(),
            other => panic!("expected an exit, got {other:?}"),
        }
    }

    #[test]
    fn guest_poweroff_exits_zero() {
        let mut s = running();
        assert_eq!(
            exit_of(s.on(Input::Lifecycle(LifecycleEvent::Stopped(StoppedReason::Shutdown)))),
            0
        );
        assert_eq!(s.on(Input::Signal(signals::TERM)), Action::None, "nothing after exit");
    }

    #[test]
    fn sigterm_asks_acpi_then_clean_stop_exits_zero() {
        let mut s = running();
        assert_eq!(
            s.on(Input::Signal(signals::TERM)),
            Action::Shutdown {
                timeout: Duration::from_secs(25)
            }
        );
        assert!(matches!(
            s.on(Input::Lifecycle(LifecycleEvent::Shutdown(0))),
            Action::Log(_)
        ));
        assert_eq!(
            exit_of(s.on(Input::Lifecycle(LifecycleEvent::Stopped(StoppedReason::Shutdown)))),
            0
        );
    }

    #[test]
    fn sigint_is_like_sigterm() {
        let mut s = running();
        assert!(matches!(s.on(Input::Signal(signals::INT)), Action::Shutdown { .. }));
    }

    #[test]
    fn timeout_destroys_and_exits_six() {
        let mut s = running();
        s.on(Input::Signal(signals::TERM));
        let Action::Destroy(exit) = s.on(Input::ShutdownTimeout) else {
            panic!()
        };
        assert_eq!(exit.code(), 6);
        assert_eq!(
            exit_of(s.on(Input::Lifecycle(LifecycleEvent::Stopped(StoppedReason::Destroyed)))),
            6
        );
    }

    #[test]
    fn second_signal_destroys_at_once() {
        let mut s = running();
        s.on(Input::Signal(signals::TERM));
        assert!(matches!(
            s.on(Input::Signal(signals::TERM)),
            Action::Destroy(Exit::ForcedStop(_))
        ));
        assert_eq!(exit_of(s.on(Input::DomainGone)), 6);
    }

    #[test]
    fn sigquit_destroys_at_once_and_sighup_is_ignored() {
        let mut s = running();
        assert!(matches!(s.on(Input::Signal(signals::HUP)), Action::Log(_)));
        assert_eq!(s.state(), &State::Running);
        assert!(matches!(s.on(Input::Signal(signals::QUIT)), Action::Destroy(_)));
    }

    #[test]
    fn a_timeout_while_running_is_stale_and_ignored() {
        let mut s = running();
        assert_eq!(s.on(Input::ShutdownTimeout), Action::None);
        assert_eq!(s.state(), &State::Running);
    }

    #[test]
    fn causes_map_to_their_codes() {
        let cases = [
            (Input::Lifecycle(LifecycleEvent::Stopped(StoppedReason::Destroyed)), 5),
            (Input::Lifecycle(LifecycleEvent::Stopped(StoppedReason::Crashed)), 3),
            (Input::Lifecycle(LifecycleEvent::Stopped(StoppedReason::Failed)), 3),
            (Input::Lifecycle(LifecycleEvent::Crashed(0)), 3),
            (Input::ConnectionLost("eof".into()), 4),
            (Input::DomainGone, 5),
            (Input::Lifecycle(LifecycleEvent::Undefined(0)), 5),
        ];
        for (input, code) in cases {
            assert_eq!(exit_of(running().on(input.clone())), code, "{input:?}");
        }
    }

    #[test]
    fn a_guest_that_announced_its_shutdown_and_is_gone_powered_off() {
        // Seen in the cluster tests: the SHUTDOWN event arrives, then the domain is
        // gone before (or without) the STOPPED event.
        let mut s = running();
        assert!(matches!(
            s.on(Input::Lifecycle(LifecycleEvent::Shutdown(1))),
            Action::Log(_)
        ));
        assert_eq!(exit_of(s.on(Input::DomainGone)), 0);
        let mut s = running();
        s.on(Input::Lifecycle(LifecycleEvent::Shutdown(1)));
        assert_eq!(exit_of(s.on(Input::Lifecycle(LifecycleEvent::Undefined(0)))), 0);
    }

    #[test]
    fn a_stop_requested_by_us_that_ends_in_poweroff_is_zero_even_if_gone_without_event() {
        let mut s = running();
        s.on(Input::Signal(signals::TERM));
        assert_eq!(exit_of(s.on(Input::DomainGone)), 0);
    }
}
