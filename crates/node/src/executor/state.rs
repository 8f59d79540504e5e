//! A worker's lifecycle: starting, ready, killed by this side, ended.

use super::*;

/// Where a worker is in its life: it starts, says it is ready, and its
/// process ends, maybe killed by this side on the way.
///
/// The ready message and the end come on different channels and may be
/// seen in either order, so a worker seen to end can still turn out to
/// have been ready; the later phases keep whether it was.
#[derive(Debug)]
pub(super) enum WorkerState {
    /// Setting up its namespace and running the init script: commands
    /// written to it wait in its pipe.
    Starting,
    /// It said it is ready (rule 5) and runs commands.
    Ready,
    /// This side killed its process group, and the process has not been
    /// seen to end yet.
    Killed {
        /// Why it was killed.
        because: KillReason,
        /// It had said it was ready.
        ready: bool,
    },
    /// Its process has ended; [`Executor::check_death`] takes it once its
    /// output has been read.
    Exited(Exit),
}

/// How a worker's process ended.
#[derive(Debug)]
pub(super) struct Exit {
    /// When its end was seen.
    pub(super) at: Instant,
    /// In words: "exited with status 1", "killed by signal 11 (SIGSEGV)".
    pub(super) description: String,
    /// The signal or exit status behind the words.
    pub(super) death: Death,
    /// It had said it was ready.
    pub(super) ready: bool,
    /// Why this side killed it, if it did.
    pub(super) killed_because: Option<KillReason>,
}

impl WorkerState {
    /// It has said it is ready, whatever happened since.
    pub(super) fn has_been_ready(&self) -> bool {
        match self {
            WorkerState::Starting => false,
            WorkerState::Ready => true,
            WorkerState::Killed { ready, .. } => *ready,
            WorkerState::Exited(exit) => exit.ready,
        }
    }

    /// Its process has not been seen to end.
    pub(super) fn is_alive(&self) -> bool {
        !matches!(self, WorkerState::Exited(_))
    }

    /// It said it is ready.
    pub(super) fn on_ready(&mut self) {
        match self {
            WorkerState::Starting => *self = WorkerState::Ready,
            WorkerState::Ready => {}
            WorkerState::Killed { ready, .. } => *ready = true,
            WorkerState::Exited(exit) => exit.ready = true,
        }
    }

    /// This side killed it. A later reason replaces an earlier one, and
    /// one given after the process ended is kept with its end.
    pub(super) fn on_kill(&mut self, why: KillReason) {
        match self {
            WorkerState::Starting => {
                *self = WorkerState::Killed {
                    because: why,
                    ready: false,
                };
            }
            WorkerState::Ready => {
                *self = WorkerState::Killed {
                    because: why,
                    ready: true,
                };
            }
            WorkerState::Killed { because, .. } => *because = why,
            WorkerState::Exited(exit) => exit.killed_because = Some(why),
        }
    }

    /// Its process ended, `at` the time given; an end seen already stays.
    pub(super) fn on_exit(&mut self, at: Instant, description: String, death: Death) {
        let (ready, killed_because) = match *self {
            WorkerState::Starting => (false, None),
            WorkerState::Ready => (true, None),
            WorkerState::Killed { because, ready } => (ready, Some(because)),
            WorkerState::Exited(_) => return,
        };
        *self = WorkerState::Exited(Exit {
            at,
            description,
            death,
            ready,
            killed_because,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segfault() -> Death {
        Death {
            signal: Some(11),
            exit_code: None,
        }
    }

    fn end<'a>(state: &'a mut WorkerState, description: &str) -> &'a Exit {
        state.on_exit(Instant::now(), description.into(), segfault());
        match state {
            WorkerState::Exited(exit) => exit,
            other => panic!("not ended: {other:?}"),
        }
    }

    /// A worker that ends on its own, ready or not, ends with no kill
    /// reason and says whether it had been ready.
    #[test]
    fn an_end_keeps_whether_the_worker_was_ready() {
        let mut state = WorkerState::Starting;
        assert!(state.is_alive() && !state.has_been_ready());
        let exit = end(&mut state, "killed by signal 11 (SIGSEGV)");
        assert!(!exit.ready && exit.killed_because.is_none());
        assert!(!state.is_alive());

        let mut state = WorkerState::Starting;
        state.on_ready();
        assert!(matches!(state, WorkerState::Ready));
        let exit = end(&mut state, "exited with status 3");
        assert!(exit.ready && exit.killed_because.is_none());
        assert_eq!(exit.death.signal, Some(11));
    }

    /// A kill keeps whether the worker had been ready, and its reason is
    /// carried into the end.
    #[test]
    fn a_kill_is_carried_into_the_end() {
        let mut state = WorkerState::Ready;
        state.on_kill(KillReason::Ordered);
        assert!(state.is_alive() && state.has_been_ready());
        let exit = end(&mut state, "killed by signal 9 (SIGKILL)");
        assert!(exit.ready);
        assert_eq!(exit.killed_because, Some(KillReason::Ordered));

        let mut state = WorkerState::Starting;
        state.on_kill(KillReason::MalformedFrame);
        assert!(!state.has_been_ready());
        let exit = end(&mut state, "killed by signal 9 (SIGKILL)");
        assert!(!exit.ready);
        assert_eq!(exit.killed_because, Some(KillReason::MalformedFrame));
    }

    /// The ready message and the end come on different pipes: a ready
    /// message read after the end, or after a kill, still counts.
    #[test]
    fn a_ready_message_read_late_still_counts() {
        let mut state = WorkerState::Starting;
        end(&mut state, "killed by signal 11 (SIGSEGV)");
        state.on_ready();
        assert!(state.has_been_ready() && !state.is_alive());

        let mut state = WorkerState::Starting;
        state.on_kill(KillReason::ResultsClosed);
        state.on_ready();
        assert!(state.has_been_ready() && state.is_alive());
    }

    /// A later kill reason replaces an earlier one, one given after the
    /// end is kept with it, and an end seen twice keeps the first.
    #[test]
    fn later_kills_and_ends() {
        let mut state = WorkerState::Ready;
        state.on_kill(KillReason::ResultsClosed);
        state.on_kill(KillReason::Ordered);
        let exit = end(&mut state, "killed by signal 9 (SIGKILL)");
        assert_eq!(exit.killed_because, Some(KillReason::Ordered));

        let mut state = WorkerState::Starting;
        end(&mut state, "exited with status 1");
        state.on_kill(KillReason::MalformedFrame);
        let exit = end(&mut state, "exited with status 2");
        assert_eq!(exit.description, "exited with status 1");
        assert_eq!(exit.killed_because, Some(KillReason::MalformedFrame));
    }
}
