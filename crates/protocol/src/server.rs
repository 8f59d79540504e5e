//! A server node's state machine: answers control and ping itself, hands
//! commands to the executor one at a time once its worker is ready,
//! enforces deadlines, cancels and forced stops by interrupting and then
//! killing the worker, and notices when the head node has gone silent
//! (rules 19, 24-27, 30, 31).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::clock::WallClock;
use crate::envelope::PROTOCOL_VERSION;
use crate::pb::control_request::{self, Start};
use crate::pb::envelope::Body;
use crate::pb::{
    CommandMode, CommandRequest, CommandResponse, CommandStatus, ControlResponse, Envelope,
    FailureKind, LogLevel, LogRecord, PingRequest, PingResponse, Value,
};
use crate::{Rank, RequestId};

/// Settings of a server node.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This server's rank.
    pub rank: Rank,
    /// The host it runs on.
    pub host: String,
    /// The server node's process id.
    pub pid: u32,
    /// How long an interrupted command may take to stop before its worker
    /// is killed and restarted (rule 24).
    pub kill_grace: Duration,
    /// Silence from the head node after which the server gives up on it
    /// (rule 30). It is far longer than the head node's timeout: a
    /// head node stopped for a while, or behind a network partition,
    /// finds its servers still there, with their workers and finished
    /// responses. After this much silence, one more [`LAST_CHANCE`] passes
    /// for messages already on their way before
    /// [`ServerAction::HeadGone`]. `None`: never (under MPI, where the
    /// job ends with its rank 0).
    pub patience: Option<Duration>,
}

/// After the head node's silence limit passes, how long to wait for
/// anything from it before giving up. A server that was itself stopped
/// (SIGSTOP) finds the limit passed on waking while the messages it missed
/// are still queued; this gives them time to arrive.
pub const LAST_CHANCE: Duration = Duration::from_secs(1);

/// Why a running command is being interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    /// It ran past its deadline; answered with status timeout.
    Deadline,
    /// The driver cancelled it; answered with status cancelled.
    Cancel,
    /// A forced stop; answered with status cancelled.
    Stop,
}

/// Something the node must do for the server core.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerAction {
    /// Send `envelope` to the head node.
    Send(Envelope),
    /// Apply the head node's settings to the executor before the first
    /// command: working directory, environment, log level.
    Configure(Start),
    /// Run this command in the worker; report with
    /// [`ServerCore::finished`].
    Execute(CommandRequest),
    /// Raise KeyboardInterrupt in the worker running command `id`.
    Interrupt {
        /// The running command.
        id: RequestId,
        /// Why.
        reason: Interruption,
    },
    /// The interrupted command `id` did not stop in time: kill the worker,
    /// report the command as failed, start a fresh worker.
    Kill {
        /// The running command.
        id: RequestId,
    },
    /// Forward only log records of this level and above.
    SetLogLevel(LogLevel),
    /// Stopped: the STOP acknowledgement is sent; exit.
    Exit,
    /// Nothing came from the head node for its timeout and the last
    /// chance after it (rule 30): stop the worker and exit.
    HeadGone {
        /// How long the head node has been silent.
        silent_for: Duration,
    },
}

/// What the executor reports when a command ends.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExecOutcome {
    /// The command's request id.
    pub id: RequestId,
    /// The mode it ran in.
    pub mode: CommandMode,
    /// Its return value (rule 6); `None` reads as Python's None.
    pub ret: Option<Value>,
    /// False when it raised or its worker died (rule 7).
    pub successful: bool,
    /// The formatted traceback or the reason for failure.
    pub traceback: Option<String>,
    /// When it started, seconds since the Unix epoch.
    pub start_time: f64,
    /// When it ended, seconds since the Unix epoch.
    pub stop_time: f64,
    /// True when a fresh worker was started after it (rule 25).
    pub worker_restarted: bool,
    /// What kind of failure, when the executor knows better than "it
    /// raised": its worker died, or it could not be handed to one.
    /// [`FailureKind::None`] otherwise; the core sets the rest.
    pub failure: FailureKind,
    /// With [`FailureKind::WorkerDied`]: the signal that killed the
    /// worker, or the status it exited with.
    pub worker_signal: Option<i32>,
    /// See `worker_signal`.
    pub worker_exit_code: Option<i32>,
}

/// Something the head node sent that the server core cannot take.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ServerError {
    /// Only the head node may send to a server.
    #[error("rank {0} is not the head node")]
    NotFromClient(Rank),
    /// The sender speaks another protocol version.
    #[error("the head node speaks protocol version {0}, not {PROTOCOL_VERSION}")]
    VersionMismatch(u32),
    /// A message servers do not take.
    #[error("unexpected {0} from the head node")]
    Unexpected(&'static str),
    /// The executor reported a command that is not running.
    #[error("command {0} is not running")]
    NotRunning(RequestId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for START; commands are held.
    Waiting,
    Serving,
    /// STOP received; the acknowledgement waits for the running command.
    Stopping {
        correlation: u64,
    },
    Stopped,
}

#[derive(Debug)]
struct Running {
    id: RequestId,
    start_epoch: f64,
    deadline: Option<(Instant, f64)>,
    interrupted: Option<(Interruption, Instant)>,
    killed: bool,
}

/// A server node's protocol logic; see the module documentation.
#[derive(Debug)]
pub struct ServerCore {
    config: ServerConfig,
    clock: WallClock,
    born: Instant,
    phase: Phase,
    log_level: LogLevel,
    running: Option<Running>,
    queue: VecDeque<CommandRequest>,
    worker_pid: u32,
    rss: u64,
    /// The sequence of the last ping answered.
    last_sequence: u64,
    /// The worker has run its init script, or could not start (its
    /// commands then fail at once); commands wait until then.
    worker_ready: bool,
    last_heard: Instant,
    /// Set once the head node's silence passed its limit: when to give
    /// up if nothing arrives meanwhile.
    last_chance: Option<Instant>,
    /// Set once [`ServerAction::HeadGone`] was handed out.
    head_gone: bool,
    /// START's answer, sent once the node has started the worker
    /// ([`ServerCore::configured`]): its correlation, and whether the
    /// server can use the shared-memory directory.
    start_reply: Option<(u64, bool)>,
    actions: VecDeque<ServerAction>,
}

/// The head node's rank.
const HEAD: Rank = 0;

impl ServerCore {
    /// A server core created at `now`, waiting for START.
    pub fn new(config: ServerConfig, clock: WallClock, now: Instant) -> Self {
        ServerCore {
            config,
            clock,
            born: now,
            phase: Phase::Waiting,
            log_level: LogLevel::Info,
            running: None,
            queue: VecDeque::new(),
            worker_pid: 0,
            rss: 0,
            last_sequence: 0,
            worker_ready: false,
            last_heard: now,
            last_chance: None,
            head_gone: false,
            start_reply: None,
            actions: VecDeque::new(),
        }
    }

    /// The next action to carry out, if any.
    pub fn poll_action(&mut self) -> Option<ServerAction> {
        self.actions.pop_front()
    }

    /// When [`tick`](Self::tick) next has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let command = self
            .running
            .as_ref()
            .and_then(|running| match running.interrupted {
                None => running.deadline.map(|(at, _)| at),
                Some((_, kill_at)) if !running.killed => Some(kill_at),
                Some(_) => None,
            });
        match (command, self.watchdog()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// This server's rank.
    pub fn rank(&self) -> Rank {
        self.config.rank
    }

    /// When the head node's silence is next judged (rule 30).
    fn watchdog(&self) -> Option<Instant> {
        if self.head_gone || self.phase == Phase::Stopped {
            return None;
        }
        self.last_chance.or_else(|| {
            self.config
                .patience
                .and_then(|limit| self.last_heard.checked_add(limit))
        })
    }

    /// The worker is ready: its init script has run (rule 5), or it could
    /// not start, and the node fails the commands it is handed. Commands
    /// wait for this, and a command's deadline counts from when it is
    /// handed to the worker.
    pub fn worker_ready(&mut self, now: Instant) {
        self.worker_ready = true;
        self.dispatch(now);
    }

    /// The node has applied [`ServerAction::Configure`]: the worker
    /// process was started (its pid) or could not be. START is answered
    /// now, so that the head node knows the worker's pid from the moment
    /// the server is online (rule 23).
    pub fn configured(&mut self, worker_pid: Option<u32>, now: Instant) {
        self.worker_pid = worker_pid.unwrap_or(0);
        if let Some((correlation, shared_memory)) = self.start_reply.take() {
            self.answer_start(correlation, shared_memory);
        }
        self.dispatch(now);
    }

    fn answer_start(&mut self, correlation: u64, shared_memory: bool) {
        self.reply_control(correlation, None);
        if let Some(ServerAction::Send(Envelope {
            body: Some(Body::ControlResponse(response)),
            ..
        })) = self.actions.back_mut()
        {
            response.shared_memory = shared_memory;
            response.worker_pid = self.worker_pid;
        }
    }

    /// Records the worker's process id and the resident memory of server
    /// and worker, reported in ping answers (rule 19).
    pub fn set_resources(&mut self, worker_pid: u32, rss: u64) {
        self.worker_pid = worker_pid;
        self.rss = rss;
    }

    /// The lowest level of log record forwarded.
    pub fn log_level(&self) -> LogLevel {
        self.log_level
    }

    /// True once STOP has come, acknowledged or not.
    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. } | Phase::Stopped)
    }

    /// True once STOP is acknowledged.
    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// The running command's id, if any.
    pub fn running(&self) -> Option<RequestId> {
        self.running.as_ref().map(|r| r.id)
    }

    /// Forwards a log line to the head node when `level` passes the log
    /// level (rule 31).
    pub fn log(&mut self, level: LogLevel, message: impl Into<String>, now: Instant) {
        if level < self.log_level {
            return;
        }
        let record = LogRecord {
            time: self.clock.epoch(now),
            level: level.into(),
            origin: format!("{}:server-{}", self.config.host, self.config.rank),
            rank: self.config.rank,
            message: message.into(),
        };
        self.send(Envelope::new(Body::LogRecord(record)));
    }

    /// Takes an envelope from the transport.
    pub fn handle(
        &mut self,
        from: Rank,
        envelope: Envelope,
        now: Instant,
    ) -> Result<(), ServerError> {
        if from != HEAD {
            return Err(ServerError::NotFromClient(from));
        }
        if envelope.protocol_version != PROTOCOL_VERSION {
            return Err(ServerError::VersionMismatch(envelope.protocol_version));
        }
        self.last_heard = now;
        self.last_chance = None;
        match envelope.body {
            Some(Body::PingRequest(ping)) => self.on_ping(ping, now),
            Some(Body::ControlRequest(control)) => match control.action {
                Some(action) => self.on_control(envelope.correlation, action, now),
                None => return Err(ServerError::Unexpected("empty ControlRequest")),
            },
            Some(Body::CommandRequest(request)) => self.on_command(request, now),
            Some(other) => return Err(ServerError::Unexpected(other.name())),
            None => return Err(ServerError::Unexpected("empty envelope")),
        }
        Ok(())
    }

    /// The executor reports that a command ended.
    pub fn finished(&mut self, outcome: ExecOutcome, now: Instant) -> Result<(), ServerError> {
        if self.running.as_ref().map(|r| r.id) != Some(outcome.id) {
            return Err(ServerError::NotRunning(outcome.id));
        }
        let running = self.running.take().expect("checked above");
        let (status, failure, traceback) = match (outcome.successful, running.interrupted) {
            (true, _) => (
                CommandStatus::ResponseReceived,
                FailureKind::None,
                outcome.traceback,
            ),
            (false, None) => {
                let failure = match outcome.failure {
                    FailureKind::None => FailureKind::Raised,
                    failure => failure,
                };
                (CommandStatus::ResponseReceived, failure, outcome.traceback)
            }
            (false, Some((Interruption::Deadline, _))) => {
                let limit = running.deadline.map_or(0.0, |(_, s)| s);
                let note = format!("Timeout: the command ran past its deadline of {limit} s");
                (
                    CommandStatus::Timeout,
                    FailureKind::Deadline,
                    Some(join_reason(note, outcome.traceback)),
                )
            }
            (false, Some((Interruption::Cancel, _))) => (
                CommandStatus::Cancelled,
                FailureKind::Cancelled,
                Some(join_reason(
                    "Cancelled while running".into(),
                    outcome.traceback,
                )),
            ),
            (false, Some((Interruption::Stop, _))) => (
                CommandStatus::Cancelled,
                FailureKind::Cancelled,
                Some(join_reason(
                    "Cancelled: services were stopped with force".into(),
                    outcome.traceback,
                )),
            ),
        };
        let died = failure == FailureKind::WorkerDied;
        let response = CommandResponse {
            id: outcome.id,
            mode: outcome.mode.into(),
            ret: Some(outcome.ret.unwrap_or_else(Value::none)),
            server: self.config.rank,
            status: status.into(),
            successful: outcome.successful,
            traceback,
            command_start_time: outcome.start_time,
            command_stop_time: outcome.stop_time,
            worker_restarted: outcome.worker_restarted,
            failure: failure.into(),
            worker_signal: outcome.worker_signal.filter(|_| died),
            worker_exit_code: outcome.worker_exit_code.filter(|_| died),
            ..CommandResponse::default()
        };
        self.send(Envelope::new(Body::CommandResponse(Box::new(response))));
        match self.phase {
            Phase::Stopping { correlation } if self.queue.is_empty() => {
                self.acknowledge_stop(correlation)
            }
            _ => self.dispatch(now),
        }
        Ok(())
    }

    /// Advances time: interrupts a command past its deadline, kills a
    /// worker that ignored an interrupt for the grace period (rule 24),
    /// gives up on a silent head node (rule 30).
    pub fn tick(&mut self, now: Instant) {
        if self.watchdog().is_some_and(|at| now >= at) {
            match self.last_chance {
                None => self.last_chance = Some(now + LAST_CHANCE),
                Some(_) => {
                    self.head_gone = true;
                    self.actions.push_back(ServerAction::HeadGone {
                        silent_for: now.saturating_duration_since(self.last_heard),
                    });
                }
            }
        }
        let grace = self.config.kill_grace;
        let Some(running) = self.running.as_mut() else {
            return;
        };
        match running.interrupted {
            None => {
                if running.deadline.is_some_and(|(at, _)| now >= at) {
                    running.interrupted = Some((Interruption::Deadline, now + grace));
                    let id = running.id;
                    self.actions.push_back(ServerAction::Interrupt {
                        id,
                        reason: Interruption::Deadline,
                    });
                }
            }
            Some((_, kill_at)) if !running.killed && now >= kill_at => {
                running.killed = true;
                let id = running.id;
                self.actions.push_back(ServerAction::Kill { id });
            }
            Some(_) => {}
        }
    }

    fn send(&mut self, envelope: Envelope) {
        self.actions.push_back(ServerAction::Send(envelope));
    }

    fn reply_control(&mut self, correlation: u64, error: Option<String>) {
        let response = ControlResponse {
            ok: error.is_none(),
            error: error.unwrap_or_default(),
            rank: self.config.rank,
            host: self.config.host.clone(),
            pid: self.config.pid,
            shared_memory: false,
            worker_pid: 0,
        };
        self.send(Envelope::correlated(
            correlation,
            Body::ControlResponse(response),
        ));
    }

    fn on_ping(&mut self, ping: PingRequest, now: Instant) {
        self.last_sequence = ping.sequence;
        let response = self.report(ping.sequence, now);
        self.send(Envelope::new(Body::PingResponse(response)));
    }

    /// Tells the head node at once, without waiting for a ping, what a
    /// ping answer would: after the worker started or was replaced, so that
    /// its process id is known from then on (rule 23). It carries the
    /// sequence of the last ping answered.
    pub fn announce(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Serving | Phase::Stopping { .. }) {
            let response = self.report(self.last_sequence, now);
            self.send(Envelope::new(Body::PingResponse(response)));
        }
    }

    fn report(&self, sequence: u64, now: Instant) -> PingResponse {
        let running = self.running.as_ref();
        // A command held until the worker is ready is this server's to
        // answer all the same.
        let held = self.queue.front().map(|r| r.id);
        PingResponse {
            sequence,
            busy: running.is_some() || held.is_some(),
            command_id: running.map(|r| r.id).or(held).unwrap_or(0),
            command_start_time: running.map_or(0.0, |r| r.start_epoch),
            pid: self.config.pid,
            worker_pid: self.worker_pid,
            host: self.config.host.clone(),
            rss_bytes: self.rss,
            uptime_seconds: now.saturating_duration_since(self.born).as_secs_f64(),
        }
    }

    fn on_control(&mut self, correlation: u64, action: control_request::Action, now: Instant) {
        match action {
            control_request::Action::Start(start) => {
                // The node leaves the directory in START only when this
                // server can use it (same host, tag read back).
                let shared_memory = start
                    .environment
                    .iter()
                    .any(|v| v.name == SHM_DIR_VAR && !v.value.is_empty());
                if self.phase == Phase::Waiting {
                    // Answered by `configured`, with the worker's pid.
                    self.phase = Phase::Serving;
                    self.log_level = level_or_info(start.log_level());
                    self.start_reply = Some((correlation, shared_memory));
                    self.actions.push_back(ServerAction::Configure(start));
                } else if self.start_reply.is_none() {
                    self.answer_start(correlation, shared_memory);
                }
                self.dispatch(now);
            }
            control_request::Action::Stop(stop) => {
                if matches!(self.phase, Phase::Stopping { .. } | Phase::Stopped) {
                    self.reply_control(correlation, None);
                    return;
                }
                // Commands held for a worker still starting were sent to
                // this server, and a graceful stop lets them run.
                if stop.force || self.worker_ready {
                    for request in std::mem::take(&mut self.queue) {
                        self.answer_unrun(request.id, "Cancelled: the server is stopping");
                    }
                }
                match self.running.as_mut() {
                    None if self.queue.is_empty() => self.acknowledge_stop(correlation),
                    None => self.phase = Phase::Stopping { correlation },
                    Some(running) => {
                        self.phase = Phase::Stopping { correlation };
                        if stop.force && running.interrupted.is_none() {
                            running.interrupted =
                                Some((Interruption::Stop, now + self.config.kill_grace));
                            let id = running.id;
                            self.actions.push_back(ServerAction::Interrupt {
                                id,
                                reason: Interruption::Stop,
                            });
                        }
                    }
                }
            }
            control_request::Action::SetLogLevel(set) => {
                self.log_level = level_or_info(set.log_level());
                self.actions
                    .push_back(ServerAction::SetLogLevel(self.log_level));
                self.reply_control(correlation, None);
            }
            control_request::Action::Recall(recall) => {
                let id = recall.request_id;
                if let Some(pos) = self.queue.iter().position(|r| r.id == id) {
                    self.queue.remove(pos);
                    self.reply_control(correlation, None);
                    if let Phase::Stopping { correlation } = self.phase {
                        if self.running.is_none() && self.queue.is_empty() {
                            self.acknowledge_stop(correlation);
                        }
                    }
                } else {
                    let error =
                        format!("request {id} is not waiting on server {}", self.config.rank);
                    self.reply_control(correlation, Some(error));
                }
            }
            control_request::Action::Cancel(cancel) => {
                let id = cancel.request_id;
                if let Some(running) = self.running.as_mut().filter(|r| r.id == id) {
                    if running.interrupted.is_none() {
                        running.interrupted =
                            Some((Interruption::Cancel, now + self.config.kill_grace));
                        self.actions.push_back(ServerAction::Interrupt {
                            id,
                            reason: Interruption::Cancel,
                        });
                    }
                    self.reply_control(correlation, None);
                } else if let Some(pos) = self.queue.iter().position(|r| r.id == id) {
                    self.queue.remove(pos);
                    self.answer_unrun(id, "Cancelled before it started");
                    self.reply_control(correlation, None);
                } else {
                    let error =
                        format!("request {id} is not running on server {}", self.config.rank);
                    self.reply_control(correlation, Some(error));
                }
            }
        }
    }

    fn on_command(&mut self, request: CommandRequest, now: Instant) {
        if matches!(self.phase, Phase::Stopping { .. } | Phase::Stopped) {
            self.answer_unrun(request.id, "Cancelled: the server is stopping");
            return;
        }
        // The same request again: a head node started again from its
        // journal queued it again, while this server, rejoining, still runs
        // or holds it for the one before (rule 33). One answer comes.
        let id = request.id;
        if self.running.as_ref().is_some_and(|r| r.id == id)
            || self.queue.iter().any(|q| q.id == id)
        {
            self.log(
                LogLevel::Info,
                format!("Command request with id {id} is here already; the one answer counts"),
                now,
            );
            return;
        }
        self.queue.push_back(request);
        self.dispatch(now);
    }

    fn dispatch(&mut self, now: Instant) {
        let serving = matches!(self.phase, Phase::Serving | Phase::Stopping { .. });
        if !serving || self.running.is_some() || !self.worker_ready {
            return;
        }
        let Some(request) = self.queue.pop_front() else {
            return;
        };
        let deadline = request
            .deadline_seconds
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| (now + Duration::from_secs_f64(s.min(1e9)), s));
        self.running = Some(Running {
            id: request.id,
            start_epoch: self.clock.epoch(now),
            deadline,
            interrupted: None,
            killed: false,
        });
        self.actions.push_back(ServerAction::Execute(request));
    }

    fn answer_unrun(&mut self, id: RequestId, reason: &str) {
        let response = CommandResponse {
            id,
            ret: Some(Value::none()),
            server: self.config.rank,
            status: CommandStatus::Cancelled.into(),
            successful: false,
            traceback: Some(reason.to_owned()),
            failure: FailureKind::Cancelled.into(),
            ..CommandResponse::default()
        };
        self.send(Envelope::new(Body::CommandResponse(Box::new(response))));
    }

    fn acknowledge_stop(&mut self, correlation: u64) {
        self.phase = Phase::Stopped;
        self.reply_control(correlation, None);
        self.actions.push_back(ServerAction::Exit);
    }
}

/// The START environment variable naming the cluster's shared-memory
/// directory (see `SharedBytes` in value.proto).
pub const SHM_DIR_VAR: &str = "CASA_NODE_SHM_DIR";
/// The START environment variable holding the tag the directory's file
/// `tag` must contain.
pub const SHM_TAG_VAR: &str = "CASA_NODE_SHM_TAG";

fn level_or_info(level: LogLevel) -> LogLevel {
    match level {
        LogLevel::Unspecified => LogLevel::Info,
        level => level,
    }
}

fn join_reason(note: String, traceback: Option<String>) -> String {
    match traceback {
        Some(tb) if !tb.is_empty() => format!("{note}\n{tb}"),
        _ => note,
    }
}
