//! A worker's death: when it is dead for sure (its output read to the
//! end), how it ended, and what follows, as the supervisor decides: a
//! fresh worker, and the failure of the command it was running (rule 25).

use super::supervisor::{Facts, GiveUp, Verdict};
use super::*;

/// Why the executor killed a worker itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum KillReason {
    /// The server node ordered it: a command ignored its interrupt for
    /// the grace period (rule 24).
    #[error("sent by the server node")]
    Ordered,
    /// It closed its results pipe while still running.
    #[error("because it closed its results pipe")]
    ResultsClosed,
    /// It broke the framing of its results pipe.
    #[error("because it sent a malformed frame")]
    MalformedFrame,
}

#[derive(Debug)]
pub(super) struct Restart {
    pub(super) lost: Option<Running>,
    pub(super) reason: String,
    pub(super) death: Death,
}

/// How a worker ended: the signal that killed it, or its exit status.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Death {
    pub(super) signal: Option<i32>,
    pub(super) exit_code: Option<i32>,
}

impl Executor {
    /// Handles a worker whose process has ended, once its results are read
    /// and its output has ended (or had its time).
    pub(super) fn check_death(&mut self) {
        let Some(w) = &self.worker else {
            return;
        };
        let WorkerState::Exited(exit) = &w.state else {
            return;
        };
        if w.decoding.is_some() {
            // Its last result first.
            return;
        }
        let generation = w.generation;
        let output_open = self.streams.iter().any(|s| s.generation == generation);
        if (w.results_closed.is_none() || output_open) && Instant::now() < exit.at + STRAGGLER_WAIT
        {
            return;
        }
        let dead = self.worker.take().expect("checked above");
        let WorkerState::Exited(exit) = dead.state else {
            unreachable!("checked above");
        };
        // Values it was writing into shared memory when it died.
        if let Some((_, dir)) = self
            .config
            .environment
            .iter()
            .find(|(name, _)| name == crate::shm::SHM_DIR_VAR)
        {
            crate::shm::sweep_tmp(std::path::Path::new(dir), dead.pid);
        }
        self.streams.retain(|s| s.generation != generation);
        self.on_death(dead.pid, generation, exit);
    }

    /// Asks the supervisor what follows a death and does it.
    fn on_death(&mut self, pid: u32, generation: u64, exit: Exit) {
        let facts = Facts {
            ready: exit.ready,
            killed_because: exit.killed_because,
            death: exit.death,
            restart_pending: self.restart.is_some(),
            command_running: self.running.is_some(),
        };
        let verdict = self.supervisor.worker_died(&facts);
        let death = exit.death;
        let mut what = exit.description;
        match exit.killed_because {
            Some(why) => what = format!("{what}, {why}"),
            None if death.signal == Some(Signal::SIGKILL as i32) => {
                what.push_str(" (the system's out-of-memory killer sends this signal)");
            }
            None => {}
        }
        let stderr: Vec<String> = self
            .tail
            .iter()
            .filter(|(g, _)| *g == generation)
            .map(|(_, line)| line.clone())
            .collect();
        if let Some(waiting) = self.running.take_if(|_| facts.strands_a_command()) {
            let reason = format!(
                "Python worker died: {what} before it was ready, with this command \
                 waiting for it: the command did not run.{}",
                stderr_block(&stderr)
            );
            let another = matches!(verdict, Verdict::StartAnother { .. });
            self.report_restart(Some(waiting), reason, another, death);
        }
        match verdict {
            Verdict::StartAnother { otherwise } => {
                let note = format!("A worker {what} before it was ready; starting another.");
                tracing::warn!(pid, "{note}");
                let spawned = self.spawn_worker();
                if let Some(restart) = &mut self.restart {
                    restart.reason = format!("{}\n{note}", restart.reason);
                }
                if let Err(error) = spawned {
                    let what = format!("{what}, and no other could be started: {error}");
                    self.give_up(otherwise, &what, stderr);
                }
            }
            Verdict::GiveUp(how) => self.give_up(how, &what, stderr),
            Verdict::Restart { fail_command } => {
                let lost = if fail_command {
                    self.running.take()
                } else {
                    None
                };
                self.restart_worker(pid, lost, &what, &stderr, death);
            }
        }
    }

    /// Leaves the executor without a worker after one died before it was
    /// ready; `what` says how it ended.
    fn give_up(&mut self, how: GiveUp, what: &str, stderr: Vec<String>) {
        match how {
            GiveUp::FirstStart => {
                self.start_failure = Some(ExecutorError::StartupExit {
                    python: self.config.python.clone(),
                    status: what.to_owned(),
                    stderr,
                });
            }
            GiveUp::Replacement => {
                let restart = self
                    .restart
                    .take()
                    .expect("a replacement has a death waiting for it");
                let reason = format!(
                    "{}\nThe new worker {what} before it was ready{}; no worker is left.",
                    restart.reason,
                    stderr_note(&stderr)
                );
                self.no_worker = Some(reason.clone());
                self.report_restart(restart.lost, reason, false, restart.death);
            }
        }
    }

    /// Starts a fresh worker in place of one that died after it was ready;
    /// `lost` is the command it was running, which fails once the fresh
    /// one is ready, or at once if none can be started (rule 25).
    fn restart_worker(
        &mut self,
        pid: u32,
        lost: Option<Running>,
        what: &str,
        stderr: &[String],
        death: Death,
    ) {
        let mut reason = format!("Python worker died: {what}");
        reason.push_str(match lost {
            Some(_) => " while running this command.",
            None => " while idle.",
        });
        reason.push_str(&stderr_block(stderr));
        tracing::warn!(pid, %reason, "restarting the Python worker");
        match self.spawn_worker() {
            Ok(()) => {
                reason.push_str(
                    "\nA fresh Python worker was started (its init script run again): \
                     the globals of earlier commands are lost.",
                );
                self.restart = Some(Restart {
                    lost,
                    reason,
                    death,
                });
            }
            Err(error) => {
                reason.push_str(&format!("\nNo new worker could be started: {error}"));
                self.no_worker = Some(reason.clone());
                self.report_restart(lost, reason, false, death);
            }
        }
    }

    pub(super) fn report_restart(
        &mut self,
        lost: Option<Running>,
        reason: String,
        restarted: bool,
        death: Death,
    ) {
        let event = match lost {
            Some(running) => ExecutorEvent::Finished(ExecOutcome {
                id: running.id,
                mode: running.mode,
                ret: None,
                successful: false,
                traceback: Some(reason),
                start_time: running.start_time,
                stop_time: epoch_now(),
                worker_restarted: restarted,
                failure: FailureKind::WorkerDied,
                worker_signal: death.signal,
                worker_exit_code: death.exit_code,
            }),
            None if restarted => ExecutorEvent::WorkerRestarted { reason },
            None => ExecutorEvent::NoWorkerLeft { reason },
        };
        self.events.push_back(event);
    }
}

/// A dead worker's last stderr lines, indented under a heading of their
/// own, for a reason that ends in a full sentence; nothing when it wrote
/// none.
fn stderr_block(lines: &[String]) -> String {
    let mut block = String::new();
    if !lines.is_empty() {
        block.push_str("\nIts last lines on stderr:");
        for line in lines {
            block.push_str("\n    ");
            block.push_str(line);
        }
    }
    block
}
