//! What follows a worker's death, decided from the facts alone (rules 5
//! and 25): no processes, no I/O and no clock. The executor gathers the
//! facts when it takes a dead worker, asks the [`Supervisor`], and carries
//! out its [`Verdict`]: starting a worker, failing a command, reporting.

use super::death::{Death, KillReason};

/// Workers in a row that may be killed by a signal before they are ready
/// and be replaced. A signal from outside (the out-of-memory killer, an
/// operator) is no reason to leave the server without a worker for good;
/// an interpreter that crashes every time it starts is, after a few tries.
pub(super) const STARTUP_KILLS: u32 = 5;

/// What is known about a worker's death when it is handled.
#[derive(Debug, Clone, Copy)]
pub(super) struct Facts {
    /// It had said it was ready.
    pub(super) ready: bool,
    /// Why this side killed it, if it did.
    pub(super) killed_because: Option<KillReason>,
    /// The signal that ended it, or its exit status.
    pub(super) death: Death,
    /// It had been started in place of a worker that died after it was
    /// ready, and that death is reported once a worker is ready.
    pub(super) restart_pending: bool,
    /// A command was running.
    pub(super) command_running: bool,
}

impl Facts {
    /// A command taken while this worker was starting (in place of one
    /// that died idle) was written to its pipe only: it never ran, and it
    /// fails now rather than wait for ever (rule 25).
    pub(super) fn strands_a_command(&self) -> bool {
        !self.ready && self.command_running
    }
}

/// What the executor does about a worker's death.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// It was killed by a signal from elsewhere before it was ready, and
    /// fewer than [`STARTUP_KILLS`] in a row were: start another in its
    /// place, which takes over the restart waiting for it, if any. If none
    /// can be started, `otherwise`.
    StartAnother {
        /// What happens when no other worker can be started.
        otherwise: GiveUp,
    },
    /// It died after it was ready: start a fresh worker (rule 25). Once
    /// that one is ready, the running command fails (`fail_command`) or
    /// the restart is reported; if none can be started, that happens at
    /// once and no worker is left.
    Restart {
        /// A command was running, and it fails.
        fail_command: bool,
    },
    /// Start no other worker.
    GiveUp(GiveUp),
}

/// How the executor is left without a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GiveUp {
    /// The first start fails: `Executor::ready` returns
    /// `ExecutorError::StartupExit`.
    FirstStart,
    /// The worker started in place of a dead one died before it was ready
    /// too: the death waiting for it is reported without a restart, and
    /// later commands fail with that reason.
    Replacement,
}

/// Decides what follows each death, counting the workers killed while
/// they were starting.
#[derive(Debug, Default)]
pub(super) struct Supervisor {
    /// Workers killed by a signal before they were ready since the last
    /// one that was.
    startup_kills: u32,
}

impl Supervisor {
    /// A worker said it is ready: start-up kills are counted from zero
    /// again.
    pub(super) fn worker_ready(&mut self) {
        self.startup_kills = 0;
    }

    /// What to do about the death described by `facts`.
    pub(super) fn worker_died(&mut self, facts: &Facts) -> Verdict {
        if facts.ready {
            return Verdict::Restart {
                fail_command: facts.command_running,
            };
        }
        let otherwise = if facts.restart_pending {
            GiveUp::Replacement
        } else {
            GiveUp::FirstStart
        };
        let killed_from_elsewhere = facts.killed_because.is_none() && facts.death.signal.is_some();
        if killed_from_elsewhere && self.startup_kills < STARTUP_KILLS {
            self.startup_kills += 1;
            Verdict::StartAnother { otherwise }
        } else {
            Verdict::GiveUp(otherwise)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGKILL: i32 = 9;
    const SIGSEGV: i32 = 11;

    /// A worker that was not ready and died on its own, with the first
    /// start under way and no command running.
    fn starting() -> Facts {
        Facts {
            ready: false,
            killed_because: None,
            death: Death {
                signal: None,
                exit_code: Some(1),
            },
            restart_pending: false,
            command_running: false,
        }
    }

    fn signalled(signal: i32) -> Death {
        Death {
            signal: Some(signal),
            exit_code: None,
        }
    }

    /// A worker killed by a signal while starting (the out-of-memory
    /// killer, an operator) is replaced; if that fails, the first start
    /// fails.
    #[test]
    fn a_worker_killed_while_starting_is_replaced() {
        let mut supervisor = Supervisor::default();
        let facts = Facts {
            death: signalled(SIGKILL),
            ..starting()
        };
        assert_eq!(
            supervisor.worker_died(&facts),
            Verdict::StartAnother {
                otherwise: GiveUp::FirstStart
            }
        );
    }

    /// The same during a restart: if no other can be started, the
    /// replacement gives up and the waiting death is reported.
    #[test]
    fn a_replacement_killed_while_starting_is_replaced_too() {
        let mut supervisor = Supervisor::default();
        let facts = Facts {
            death: signalled(SIGSEGV),
            restart_pending: true,
            ..starting()
        };
        assert_eq!(
            supervisor.worker_died(&facts),
            Verdict::StartAnother {
                otherwise: GiveUp::Replacement
            }
        );
    }

    /// An interpreter that crashes every time it starts is given
    /// STARTUP_KILLS tries in a row, then given up on.
    #[test]
    fn workers_killed_while_starting_are_replaced_only_so_many_times() {
        let mut supervisor = Supervisor::default();
        let facts = Facts {
            death: signalled(SIGSEGV),
            ..starting()
        };
        for kill in 1..=STARTUP_KILLS {
            assert_eq!(
                supervisor.worker_died(&facts),
                Verdict::StartAnother {
                    otherwise: GiveUp::FirstStart
                },
                "kill {kill}"
            );
        }
        assert_eq!(
            supervisor.worker_died(&facts),
            Verdict::GiveUp(GiveUp::FirstStart)
        );
        let replacement = Facts {
            restart_pending: true,
            ..facts
        };
        assert_eq!(
            supervisor.worker_died(&replacement),
            Verdict::GiveUp(GiveUp::Replacement)
        );
    }

    /// The tries count from zero again once a worker is ready.
    #[test]
    fn a_ready_worker_resets_the_count_of_startup_kills() {
        let mut supervisor = Supervisor::default();
        let facts = Facts {
            death: signalled(SIGKILL),
            ..starting()
        };
        for _ in 0..STARTUP_KILLS {
            supervisor.worker_died(&facts);
        }
        supervisor.worker_ready();
        assert_eq!(
            supervisor.worker_died(&facts),
            Verdict::StartAnother {
                otherwise: GiveUp::FirstStart
            }
        );
    }

    /// A worker that exits before it is ready (a broken installation, a
    /// bad `--casa`) would only do it again: the first start fails, or a
    /// restart leaves no worker. It is not counted as a kill.
    #[test]
    fn a_worker_that_exits_while_starting_is_not_replaced() {
        let mut supervisor = Supervisor::default();
        assert_eq!(
            supervisor.worker_died(&starting()),
            Verdict::GiveUp(GiveUp::FirstStart)
        );
        let replacement = Facts {
            restart_pending: true,
            ..starting()
        };
        assert_eq!(
            supervisor.worker_died(&replacement),
            Verdict::GiveUp(GiveUp::Replacement)
        );
        assert_eq!(supervisor.startup_kills, 0);
    }

    /// A worker this side killed while starting (it broke the results
    /// pipe) died of the SIGKILL sent to it, which is no signal from
    /// elsewhere: it is not replaced.
    #[test]
    fn a_worker_killed_by_this_side_while_starting_is_not_replaced() {
        let mut supervisor = Supervisor::default();
        for why in [KillReason::ResultsClosed, KillReason::MalformedFrame] {
            let facts = Facts {
                killed_because: Some(why),
                death: signalled(SIGKILL),
                ..starting()
            };
            assert_eq!(
                supervisor.worker_died(&facts),
                Verdict::GiveUp(GiveUp::FirstStart),
                "{why}"
            );
        }
    }

    /// A ready worker that dies while running a command is restarted, and
    /// the command fails (rule 25), however it died.
    #[test]
    fn a_death_after_ready_restarts_and_fails_the_running_command() {
        let deaths = [
            (None, signalled(SIGSEGV)),
            (None, starting().death),
            (Some(KillReason::Ordered), signalled(SIGKILL)),
            (Some(KillReason::MalformedFrame), signalled(SIGKILL)),
        ];
        for (killed_because, death) in deaths {
            let mut supervisor = Supervisor::default();
            let facts = Facts {
                ready: true,
                killed_because,
                death,
                restart_pending: false,
                command_running: true,
            };
            assert_eq!(
                supervisor.worker_died(&facts),
                Verdict::Restart { fail_command: true },
                "{killed_because:?} {death:?}"
            );
        }
    }

    /// A ready worker that dies while idle is restarted with no command
    /// to fail, and its death is not counted as a start-up kill.
    #[test]
    fn a_death_after_ready_while_idle_restarts_only() {
        let mut supervisor = Supervisor::default();
        let facts = Facts {
            ready: true,
            death: signalled(SIGKILL),
            ..starting()
        };
        assert_eq!(
            supervisor.worker_died(&facts),
            Verdict::Restart {
                fail_command: false
            }
        );
        assert_eq!(supervisor.startup_kills, 0);
    }
}
