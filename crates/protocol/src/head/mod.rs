//! The head node's state machine: request ids, the queue, scheduling,
//! the monitor and the lifecycle of the services (rules 2, 11-24, 26-27,
//! 32).
//!
//! The node feeds it driver submissions, envelopes from servers and the
//! passing of time, and carries out the [`Action`]s it hands back.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::clock::WallClock;
use crate::envelope::PROTOCOL_VERSION;
use crate::pb::control_request::{self, Cancel, Recall, SetLogLevel, Start, Stop};
use crate::pb::envelope::Body;
use crate::pb::{
    CancelReply, ClusterInfo, CommandMode, CommandRequest, CommandResponse, CommandStatus,
    ControlRequest, ControlResponse, Envelope, FailureKind, IdLease, LogLevel, LogRecord,
    Parameter, PingRequest, PingResponse, RejectReason, RequestState, ResponseDelivery,
    ServerStatus, StatusReply, SubmitRequest, TrackReply, submit_reply,
};
use crate::{DriverId, Rank, RequestId};

mod events;
mod records;
mod requests;

pub use events::Event;
use records::failure_record;
pub use records::response_record;
use requests::{IdSet, Lease, Request, RequestPhase, RequestTable, skip_unqueued};

/// Ranks above this are refused (by the head core, and by transports
/// before a server joins), so a bogus rank cannot make the server table
/// grow without bound.
pub const MAX_RANK: Rank = 1 << 24;

/// The most ids one lease gives (rule 11): `CONSTANT_MAX_LEASE` of
/// `envelope.proto`, which the Python driver keeps too.
pub const MAX_LEASE: u32 = crate::pb::Constant::MaxLease as u32;

/// Leases a driver may hold with ids left unused; asking for more is
/// refused, so one driver cannot make the head node's memory grow.
pub const MAX_LEASES: usize = 16;

/// Parameters larger than this, encoded, keep a request from being sent
/// ahead to a busy server (rule 12).
pub const PREFETCH_MAX_BYTES: usize = 1 << 20;

/// Settings of a head node.
#[derive(Debug, Clone)]
pub struct HeadConfig {
    /// The head node's host, for logs and the cluster description.
    pub host: String,
    /// The transport's name ("mpi" or "zmq"), for the cluster description.
    pub transport: String,
    /// Time between ping rounds (rule 19).
    pub heartbeat: Duration,
    /// Silence after which a server is marked timed out (rule 20).
    pub timeout: Duration,
    /// Deadline given to requests that carry none (rule 24); `None`: no limit.
    pub default_deadline: Option<Duration>,
    /// Settings sent to every server with START (rule 26).
    pub start: Start,
    /// How many servers must join before the cluster can be ready
    /// ([`Event::AllServersStarted`]).
    pub expected_servers: usize,
    /// Requests in flight per server (rule 12): the one it runs and those
    /// sent ahead to wait there while every server is busy. 1 sends a
    /// server its next request only once it has answered the last.
    pub prefetch: usize,
    /// Whether the head node keeps a journal (rule 33), as drivers are
    /// told in [`ClusterInfo`].
    pub journal: bool,
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig {
            host: "localhost".into(),
            transport: "zmq".into(),
            heartbeat: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            default_deadline: None,
            start: Start::default(),
            expected_servers: 0,
            prefetch: 1,
            journal: false,
        }
    }
}

/// Something the node must do for the head core.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `envelope` to the server at rank `to`.
    Send {
        /// The server's rank.
        to: Rank,
        /// What to send.
        envelope: Envelope,
    },
    /// Hand a final response to the driver that submitted the request.
    Deliver {
        /// The driver.
        driver: DriverId,
        /// The response.
        delivery: Box<ResponseDelivery>,
    },
    /// A server's log record, for the unified log and subscribed drivers.
    Forward(LogRecord),
    /// Something the head node itself has to log (rule 32).
    Event(Event),
    /// Services are stopped: every server acknowledged STOP or is gone.
    Stopped,
}

/// A submission refused as a whole; nothing of it was queued (rule 14).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct Rejection {
    /// The reason, for programs.
    pub reason: RejectReason,
    /// The reason, for people.
    pub message: String,
}

impl Rejection {
    fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Rejection {
            reason,
            message: message.into(),
        }
    }

    /// The traceback of the failure record a pipelined submission's
    /// rejection is delivered as: "rejected (REASON): MESSAGE".
    pub fn traceback(&self) -> String {
        let reason = self.reason.as_str_name();
        let reason = reason.strip_prefix("REJECT_REASON_").unwrap_or(reason);
        format!("rejected ({reason}): {}", self.message)
    }
}

/// A submission whose ids break the lease rules (rule 11): a protocol error
/// of its driver. Its ids are answered with failure records; none of them
/// is queued.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LeaseError {
    /// The id is not leased to this driver, or was already used.
    #[error("request id {0} is not leased to this connection, or was already used")]
    NotLeased(RequestId),
    /// The submission carries a number of ids other than its requests'.
    #[error("the submission carries {given} ids for {needed} requests")]
    WrongCount {
        /// Ids given.
        given: usize,
        /// Requests it makes: one per target, or one.
        needed: usize,
    },
    /// The submission's ids are not strictly increasing.
    #[error("the submission's ids are not increasing: {later} follows {earlier}")]
    NotIncreasing {
        /// The id before.
        earlier: RequestId,
        /// The id after it.
        later: RequestId,
    },
    /// A pipelined submission came without ids.
    #[error("a pipelined submission must carry its ids")]
    NoIds,
    /// The driver already holds [`MAX_LEASES`] leases with ids unused.
    #[error("this connection already holds {MAX_LEASES} leases with unused ids")]
    TooManyLeases,
}

/// Why [`HeadCore::submit`] queued nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubmitError {
    /// The submission was refused (rule 14). A pipelined one's ids have
    /// been answered with failure records carrying the rejection.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// Its ids broke the lease rules; each id has been answered with a
    /// failure record.
    #[error(transparent)]
    Lease(#[from] LeaseError),
}

/// Something a server sent that the head core cannot take.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoreError {
    /// The rank is not a registered server.
    #[error("rank {0} is not a server of this cluster")]
    UnknownRank(Rank),
    /// The rank cannot be a server's (0, negative, or absurdly large).
    #[error("rank {0} cannot be a server rank")]
    InvalidRank(Rank),
    /// The server answered a request it was not running.
    #[error("server {from} answered request {id}, which it was not running")]
    UnknownRequest {
        /// The request id in the answer.
        id: RequestId,
        /// The answering server.
        from: Rank,
    },
    /// The server speaks another protocol version.
    #[error("server {from} speaks protocol version {version}, not {PROTOCOL_VERSION}")]
    VersionMismatch {
        /// The server.
        from: Rank,
        /// Its version.
        version: u32,
    },
    /// The server sent a message servers do not send.
    #[error("server {from} sent an unexpected {message}")]
    Unexpected {
        /// The server.
        from: Rank,
        /// The message's name.
        message: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Servers may register; START not yet sent.
    Idle,
    Running,
    Stopping,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerPhase {
    /// Registered; no START acknowledgement yet.
    Starting,
    Online,
    Stopping,
    Stopped,
    /// Its link closed for good.
    Lost,
}

#[derive(Debug)]
struct Server {
    phase: ServerPhase,
    timed_out: bool,
    /// The request sent to it and not yet answered; stays set while the
    /// server is timed out, so a recovered server's real answer can replace
    /// the timeout record (rule 21).
    running: Option<RequestId>,
    /// Requests sent after `running`, waiting at the server in this order
    /// (the prefetch of rule 12).
    prefetched: VecDeque<RequestId>,
    /// Requests targeted at it, waiting (rule 13), with their arrival
    /// numbers. Ids that are no longer queued are skipped when met.
    queue: VecDeque<(u64, RequestId)>,
    last_seen: Instant,
    last_ping_epoch: f64,
    host: String,
    pid: u32,
    worker_pid: u32,
    rss: u64,
    command_start_time: f64,
}

impl Server {
    fn available(&self) -> bool {
        self.phase == ServerPhase::Online && !self.timed_out
    }

    /// Requests sent to it and not answered.
    fn in_flight(&self) -> usize {
        usize::from(self.running.is_some()) + self.prefetched.len()
    }

    /// Request `id`, sent to it, needs it no more: answered, unsendable,
    /// or cancelled while it waited there. The server runs its requests in
    /// the order sent, so when `id` is the one running, the next sent runs
    /// now. Returns whether one fewer request is sent ahead.
    fn forget(&mut self, id: RequestId) -> bool {
        if self.running == Some(id) {
            self.running = self.prefetched.pop_front();
            self.running.is_some()
        } else if let Some(at) = self.prefetched.iter().position(|&p| p == id) {
            self.prefetched.remove(at);
            true
        } else {
            false
        }
    }

    fn monitored(&self) -> bool {
        matches!(
            self.phase,
            ServerPhase::Starting | ServerPhase::Online | ServerPhase::Stopping
        )
    }
}

#[derive(Debug, Clone, Copy)]
enum ControlKind {
    Start,
    Stop,
    /// Take back a request sent ahead and not started (rule 12).
    Recall(RequestId),
    Other,
}

/// The head node's protocol logic; see the module documentation.
#[derive(Debug)]
pub struct HeadCore {
    config: HeadConfig,
    clock: WallClock,
    phase: Phase,
    /// Indexed by rank.
    servers: Vec<Option<Server>>,
    server_ranks: BTreeSet<Rank>,
    /// Ranks that will not join again (rule 20): given up on by whoever
    /// started them, or lost where ranks are fixed (MPI).
    gone_for_good: BTreeSet<Rank>,
    /// Whether [`Event::NoServerLeft`] was emitted.
    none_left: bool,
    /// Free servers with nothing queued for them, lowest rank first.
    idle: BTreeSet<Rank>,
    /// Requests with no target, oldest first, with their arrival numbers;
    /// ids no longer queued are skipped when met.
    queue: VecDeque<(u64, RequestId)>,
    queued: usize,
    requests: RequestTable,
    next_id: RequestId,
    /// Arrival number of the next queued request: "oldest first" (rules
    /// 12-13) goes by it, since leased ids need not arrive in id order.
    next_arrival: u64,
    /// Each driver's leases that still have unused ids.
    leases: HashMap<DriverId, Vec<Lease>>,
    /// Every id a submission used, given or leased (rule 17's tracking).
    used: IdSet,
    next_correlation: u64,
    controls: HashMap<u64, ControlKind>,
    /// Requests sent ahead to the server named and taken off it without its
    /// word (a cancel answered here, rule 24; the server timed out, rule
    /// 20): that server's answer to it, should it come, is dropped.
    forgotten: HashSet<(RequestId, Rank)>,
    /// Requests sent ahead, on all servers.
    ahead: usize,
    /// Whether [`Event::AllServersStarted`] was emitted.
    ready: bool,
    ping_round: u64,
    next_round: Option<Instant>,
    /// When the next server could time out at the earliest; `None` before
    /// services start.
    next_expiry: Option<Instant>,
    debugging: bool,
    /// The latest time the core was given while services run: a gap of
    /// more than [`STALL`] heartbeats since is the head node's own stall.
    awake: Option<Instant>,
    actions: VecDeque<Action>,
}

/// Heartbeats without a tick after which the head node counts itself as
/// having stalled: while services run it ticks at least once a heartbeat.
const STALL: u32 = 2;

impl HeadCore {
    /// A head core with no servers yet; `clock` gives wall times.
    pub fn new(config: HeadConfig, clock: WallClock) -> Self {
        HeadCore {
            config,
            clock,
            phase: Phase::Idle,
            servers: Vec::new(),
            server_ranks: BTreeSet::new(),
            gone_for_good: BTreeSet::new(),
            none_left: false,
            idle: BTreeSet::new(),
            queue: VecDeque::new(),
            queued: 0,
            requests: RequestTable::default(),
            next_id: 1,
            next_arrival: 0,
            leases: HashMap::new(),
            used: IdSet::default(),
            next_correlation: 1,
            controls: HashMap::new(),
            forgotten: HashSet::new(),
            ahead: 0,
            ready: false,
            ping_round: 0,
            next_round: None,
            next_expiry: None,
            debugging: false,
            awake: None,
            actions: VecDeque::new(),
        }
    }

    /// The next action to carry out, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Moves every pending action into `out`.
    pub fn drain_actions(&mut self, out: &mut Vec<Action>) {
        out.extend(self.actions.drain(..));
    }

    /// When [`tick`](Self::tick) next has work to do; `None` while idle or
    /// stopped.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.phase, Phase::Idle | Phase::Stopped) {
            return None;
        }
        let expiry = if self.debugging {
            None
        } else {
            self.next_expiry
        };
        match (self.next_round, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Registers a server; once services run, it is sent START at once.
    pub fn add_server(&mut self, rank: Rank, now: Instant) -> Result<(), CoreError> {
        if rank <= 0 || rank > MAX_RANK {
            return Err(CoreError::InvalidRank(rank));
        }
        let index = rank as usize;
        if self.servers.len() <= index {
            self.servers.resize_with(index + 1, || None);
        }
        if self.servers[index].as_ref().is_some_and(|s| s.monitored()) {
            return Ok(());
        }
        self.servers[index] = Some(Server {
            phase: ServerPhase::Starting,
            timed_out: false,
            running: None,
            prefetched: VecDeque::new(),
            queue: VecDeque::new(),
            last_seen: now,
            last_ping_epoch: 0.0,
            host: String::new(),
            pid: 0,
            worker_pid: 0,
            rss: 0,
            command_start_time: 0.0,
        });
        self.server_ranks.insert(rank);
        self.gone_for_good.remove(&rank);
        self.none_left = false;
        let expiry = now + self.config.timeout;
        self.next_expiry = self.next_expiry.map(|e| e.min(expiry));
        match self.phase {
            Phase::Running => self.send_start(rank),
            Phase::Stopping => self.send_stop(rank, true),
            Phase::Idle | Phase::Stopped => {}
        }
        Ok(())
    }

    /// Starts services: sends START to every registered server (rule 26)
    /// and begins the monitor.
    pub fn start(&mut self, now: Instant) {
        if self.phase != Phase::Idle {
            return;
        }
        self.phase = Phase::Running;
        let ranks: Vec<Rank> = self.server_ranks.iter().copied().collect();
        for rank in ranks {
            if let Some(s) = self.server_mut(rank) {
                s.last_seen = now;
            }
            self.send_start(rank);
        }
        self.next_round = Some(now);
        self.next_expiry = Some(now);
        self.check_ready();
    }

    /// True once the cluster is ready (see [`Event::AllServersStarted`]).
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Stops services (rule 27): later submissions are refused, requests
    /// not yet sent are answered as cancelled, and every server is told to
    /// stop, finishing (or, forced, interrupting) its running command.
    /// [`Action::Stopped`] follows once all have acknowledged or are gone.
    pub fn stop(&mut self, force: bool) {
        match self.phase {
            Phase::Stopping | Phase::Stopped => return,
            Phase::Idle => {
                self.phase = Phase::Stopped;
                self.actions.push_back(Action::Stopped);
                return;
            }
            Phase::Running => {}
        }
        self.phase = Phase::Stopping;
        self.event(Event::StoppingServices { force });
        let mut pending: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| matches!(r.phase, RequestPhase::Queued))
            .map(|(id, _)| id)
            .collect();
        pending.sort_unstable();
        for id in pending {
            self.finish_unsent(
                id,
                (CommandStatus::Cancelled, FailureKind::Cancelled),
                "Cancelled: services were stopped before the request was sent".into(),
            );
        }
        self.queue.clear();
        self.idle.clear();
        let ranks: Vec<Rank> = self.server_ranks.iter().copied().collect();
        for rank in ranks {
            self.send_stop(rank, force);
        }
        self.check_stopped();
    }

    /// Leases `count` ids (at least 1, at most [`MAX_LEASE`]) to `driver`
    /// for its submissions (rule 11). They come from the one counter that
    /// gives every id, so no other driver ever gets them, and a later lease
    /// has higher ids.
    pub fn lease(&mut self, driver: DriverId, count: u32) -> Result<IdLease, LeaseError> {
        let count = count.clamp(1, MAX_LEASE);
        let leases = self.leases.entry(driver).or_default();
        if leases.len() >= MAX_LEASES {
            return Err(LeaseError::TooManyLeases);
        }
        let first = self.next_id;
        self.next_id += RequestId::from(count);
        leases.push(Lease {
            first,
            end: self.next_id,
            left: RequestId::from(count),
        });
        Ok(IdLease { first, count })
    }

    /// The driver's connection closed: the ids it leased and left unused
    /// are never used by anyone. Its requests still run (rule 17).
    pub fn driver_gone(&mut self, driver: DriverId) {
        self.leases.remove(&driver);
    }

    /// Accepts or rejects a driver's submission (rules 2, 12-14). Accepted
    /// requests get the submission's leased ids, or else consecutive new
    /// ids, in target order. A pipelined submission that is rejected, or
    /// whose ids break the lease rules, is answered with one failure record
    /// per id.
    pub fn submit(
        &mut self,
        driver: DriverId,
        mut request: SubmitRequest,
    ) -> Result<Vec<RequestId>, SubmitError> {
        let leased = self.take_ids(driver, &mut request)?;
        if let Err(rejection) = self.check_submission(&request) {
            return Err(self.rejected(driver, &request, &leased, rejection));
        }
        Ok(self.accept(driver, request, leased))
    }

    /// Silence after which a server is timed out (rule 20).
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// The next id the head node would give: every id below it may have
    /// been given out or leased (a journal records this before any id at
    /// or above what it recorded is given, rule 33).
    pub fn next_id(&self) -> RequestId {
        self.next_id
    }

    /// Ids given from now on start at `first` or above, never below: a
    /// head node started again from its journal (rule 33) continues
    /// where the one before it may have got to.
    pub fn continue_ids_from(&mut self, first: RequestId) {
        self.next_id = self.next_id.max(first);
    }

    /// Queues again, with its own id, a request the head node accepted
    /// before it restarted and had not answered (rule 33), on behalf of
    /// `driver` until a driver claims it. `request` is its submission
    /// narrowed to it: one target or none, no ids. Refused as a submission
    /// would be (an unknown target, services stopped), and then not
    /// queued.
    pub fn resubmit(
        &mut self,
        driver: DriverId,
        id: RequestId,
        mut request: SubmitRequest,
    ) -> Result<(), Rejection> {
        request.ids.clear();
        request.targets.truncate(1);
        self.check_submission(&request)?;
        self.used.insert(id);
        self.next_id = self.next_id.max(id + 1);
        self.accept(driver, request, vec![id]);
        if let Some(request) = self.requests.get_mut(&id) {
            request.recovered = true;
        }
        Ok(())
    }

    /// Deliveries for `ids` go to `driver` from now on (rule 33): a driver
    /// that reconnected, or asks after a restart. Returns the ids still
    /// without a final response here; the others are answered (a timeout
    /// record, whose replacement, should it come, goes to `driver` too) or
    /// unknown.
    pub fn claim(&mut self, driver: DriverId, ids: &[RequestId]) -> Vec<RequestId> {
        let mut pending = Vec::new();
        for &id in ids {
            if let Some(request) = self.requests.get_mut(&id) {
                request.driver = driver;
                if !matches!(request.phase, RequestPhase::TimedOut { .. }) {
                    pending.push(id);
                }
            }
        }
        pending
    }

    /// Queues an accepted submission under `leased` ids, or new ones.
    fn accept(
        &mut self,
        driver: DriverId,
        request: SubmitRequest,
        leased: Vec<RequestId>,
    ) -> Vec<RequestId> {
        let mode = if request.command == "push" {
            CommandMode::Push
        } else {
            match request.mode() {
                CommandMode::Unspecified => CommandMode::Auto,
                mode => mode,
            }
        };
        let deadline_seconds = request
            .deadline_seconds
            .or(self.config.default_deadline.map(|d| d.as_secs_f64()));
        let SubmitRequest {
            command,
            parameters,
            targets,
            ..
        } = request;
        let shared = targets.is_empty();
        let heavy = parameters
            .iter()
            .map(prost::Message::encoded_len)
            .sum::<usize>()
            > PREFETCH_MAX_BYTES;
        let new_request = |command: String, parameters: Vec<Parameter>, arrival: u64| Request {
            driver,
            command,
            mode,
            parameters,
            deadline_seconds,
            phase: RequestPhase::Queued,
            arrival,
            shared,
            heavy,
            recalling: false,
            recovered: false,
        };
        let mut leased = leased.into_iter();
        if targets.is_empty() {
            let id = match leased.next() {
                Some(id) => id,
                None => self.allocate_id(),
            };
            let arrival = self.arrival();
            self.requests
                .insert(id, new_request(command, parameters, arrival));
            self.queued += 1;
            self.queue.push_back((arrival, id));
            self.place_shared();
            return vec![id];
        }
        let mut ids = Vec::with_capacity(targets.len());
        let last = targets.len() - 1;
        let (mut command, mut parameters) = (Some(command), Some(parameters));
        for (i, &rank) in targets.iter().enumerate() {
            let id = match leased.next() {
                Some(id) => id,
                None => self.allocate_id(),
            };
            let arrival = self.arrival();
            let request = if i == last {
                new_request(
                    command.take().unwrap_or_default(),
                    parameters.take().unwrap_or_default(),
                    arrival,
                )
            } else {
                new_request(
                    command.clone().unwrap_or_default(),
                    parameters.clone().unwrap_or_default(),
                    arrival,
                )
            };
            self.requests.insert(id, request);
            self.queued += 1;
            let server = self.server(rank).expect("target checked above");
            if server.queue.is_empty()
                && self.has_room(rank)
                && !(heavy && server.running.is_some())
            {
                self.send_request(id, rank);
            } else {
                self.server_mut(rank)
                    .expect("target checked above")
                    .queue
                    .push_back((arrival, id));
            }
            ids.push(id);
        }
        ids
    }

    /// Rejects a submission for a reason found outside the core (the
    /// syntax check of rule 2) as [`submit`](Self::submit) rejects: its
    /// leased ids are used up, and a pipelined one's are answered with
    /// failure records carrying the rejection.
    pub fn refuse(
        &mut self,
        driver: DriverId,
        mut request: SubmitRequest,
        rejection: Rejection,
    ) -> SubmitError {
        match self.take_ids(driver, &mut request) {
            Ok(leased) => self.rejected(driver, &request, &leased, rejection),
            Err(e) => e.into(),
        }
    }

    /// Why the submission is refused (rule 14), if it is.
    fn check_submission(&self, request: &SubmitRequest) -> Result<(), Rejection> {
        if matches!(self.phase, Phase::Stopping | Phase::Stopped) {
            return Err(Rejection::new(
                RejectReason::Stopped,
                "services are stopped; no more commands are accepted",
            ));
        }
        if self.server_ranks.is_empty() {
            return Err(Rejection::new(
                RejectReason::NoServers,
                "the cluster has no servers",
            ));
        }
        if request.targets.is_empty() && self.no_server_left() {
            return Err(Rejection::new(
                RejectReason::NoServers,
                format!(
                    "no server is left: every server (n# {}) has left for good",
                    describe_ranks(&self.server_ranks)
                ),
            ));
        }
        if let Some(d) = request.deadline_seconds {
            if !(d.is_finite() && d > 0.0) {
                return Err(Rejection::new(
                    RejectReason::InvalidDeadline,
                    format!("deadline must be a positive number of seconds, not {d}"),
                ));
            }
        }
        for &target in &request.targets {
            self.check_target(target)?;
        }
        Ok(())
    }

    /// A rejection of a submission whose leased ids are `leased`: a
    /// pipelined one gets a failure record per id, carrying it.
    fn rejected(
        &mut self,
        driver: DriverId,
        request: &SubmitRequest,
        leased: &[RequestId],
        rejection: Rejection,
    ) -> SubmitError {
        if request.pipelined {
            let traceback = rejection.traceback();
            let rejected = submit_reply::Rejected {
                reason: rejection.reason.into(),
                message: rejection.message.clone(),
            };
            for &id in leased {
                self.refusal(
                    driver,
                    id,
                    request,
                    traceback.clone(),
                    Some(rejected.clone()),
                );
            }
        }
        SubmitError::Rejected(rejection)
    }

    /// Takes the submission's ids out of it and uses them up: the ids it
    /// carries, once checked against the driver's leases (empty when it
    /// carries none). On a violation, the ids leased to the driver are used
    /// up all the same, and every id is answered with a failure record.
    fn take_ids(
        &mut self,
        driver: DriverId,
        request: &mut SubmitRequest,
    ) -> Result<Vec<RequestId>, LeaseError> {
        let ids = std::mem::take(&mut request.ids);
        if ids.is_empty() {
            return if request.pipelined {
                Err(LeaseError::NoIds)
            } else {
                Ok(ids)
            };
        }
        let needed = request.targets.len().max(1);
        let error = if ids.len() != needed {
            Some(LeaseError::WrongCount {
                given: ids.len(),
                needed,
            })
        } else if let Some(w) = ids.windows(2).find(|w| w[0] >= w[1]) {
            Some(LeaseError::NotIncreasing {
                earlier: w[0],
                later: w[1],
            })
        } else {
            ids.iter()
                .find(|&&id| !self.leased_to(driver, id))
                .map(|&id| LeaseError::NotLeased(id))
        };
        for &id in &ids {
            if self.leased_to(driver, id) {
                self.use_leased(driver, id);
            }
        }
        match error {
            None => Ok(ids),
            Some(error) => {
                let traceback = format!("casa-node: protocol error: {error}");
                for &id in &ids {
                    self.refusal(driver, id, request, traceback.clone(), None);
                }
                Err(error)
            }
        }
    }

    /// True when `id` is in one of the driver's leases and unused.
    fn leased_to(&self, driver: DriverId, id: RequestId) -> bool {
        self.leases
            .get(&driver)
            .is_some_and(|leases| leases.iter().any(|l| l.first <= id && id < l.end))
            && !self.used.contains(id)
    }

    /// Marks a leased id used; a lease with no id left is dropped.
    fn use_leased(&mut self, driver: DriverId, id: RequestId) {
        self.used.insert(id);
        if let Some(leases) = self.leases.get_mut(&driver) {
            if let Some(i) = leases.iter().position(|l| l.first <= id && id < l.end) {
                leases[i].left -= 1;
                if leases[i].left == 0 {
                    leases.swap_remove(i);
                }
            }
        }
    }

    /// Answers `id` of a refused submission with a failure record.
    fn refusal(
        &mut self,
        driver: DriverId,
        id: RequestId,
        request: &SubmitRequest,
        traceback: String,
        rejected: Option<submit_reply::Rejected>,
    ) {
        let mode = match request.mode() {
            CommandMode::Unspecified if request.command == "push" => CommandMode::Push,
            CommandMode::Unspecified => CommandMode::Auto,
            mode => mode,
        };
        let record = failure_record(
            id,
            request.command.clone(),
            mode,
            request.parameters.clone(),
            0,
            CommandStatus::ResponseReceived,
            FailureKind::Rejected,
            traceback,
        );
        self.actions.push_back(Action::Deliver {
            driver,
            delivery: Box::new(ResponseDelivery {
                response: Some(record),
                replaces_timeout: false,
                rejected,
            }),
        });
    }

    /// Takes an envelope a server sent.
    pub fn handle(
        &mut self,
        from: Rank,
        envelope: Envelope,
        now: Instant,
    ) -> Result<(), CoreError> {
        self.wake(now);
        let Some(server) = self.server_mut(from) else {
            return Err(CoreError::UnknownRank(from));
        };
        if envelope.protocol_version != PROTOCOL_VERSION {
            return Err(CoreError::VersionMismatch {
                from,
                version: envelope.protocol_version,
            });
        }
        if !server.monitored() {
            return Ok(());
        }
        server.last_seen = now;
        let mut needs_dispatch = server.timed_out;
        if server.timed_out {
            server.timed_out = false;
            let expiry = now + self.config.timeout;
            self.next_expiry = self.next_expiry.map(|e| e.min(expiry));
            self.event(Event::ServerRecovered { rank: from });
        }
        let is_ping = matches!(envelope.body, Some(Body::PingResponse(_)));
        let result = match envelope.body {
            Some(Body::PingResponse(ping)) => {
                needs_dispatch |= self.on_ping(from, ping, now);
                Ok(())
            }
            Some(Body::CommandResponse(response)) => self.on_response(from, *response),
            Some(Body::ControlResponse(response)) => {
                self.on_control(from, envelope.correlation, response);
                Ok(())
            }
            Some(Body::LogRecord(record)) => {
                self.actions.push_back(Action::Forward(record));
                Ok(())
            }
            Some(other) => Err(CoreError::Unexpected {
                from,
                message: other.name(),
            }),
            None => Err(CoreError::Unexpected {
                from,
                message: "empty envelope",
            }),
        };
        if !is_ping || needs_dispatch {
            self.dispatch(from);
        }
        result
    }

    /// Request `id` could not be sent to its server (too large for the
    /// transport, or it could not be encoded): it is answered as failed,
    /// saying `reason`, and the server, which never saw it, is free again.
    /// Unlike a message from the server, this says nothing of the server's
    /// liveness: its silence is still counted, and a timed-out server stays
    /// timed out.
    pub fn send_failed(&mut self, id: RequestId, failure: FailureKind, reason: &str) {
        let Some(request) = self.requests.get(&id) else {
            return;
        };
        let (rank, answered) = match request.phase {
            RequestPhase::Sent { server, .. } => (server, false),
            RequestPhase::TimedOut { server, .. } => (server, true),
            RequestPhase::Queued => return,
        };
        let request = self.requests.remove(&id).expect("just seen");
        self.forget(rank, id);
        if !answered {
            let traceback =
                format!("casa-node: the request could not be sent to server n# {rank}: {reason}");
            self.event(Event::RequestFailed {
                id,
                server: rank,
                traceback: traceback.clone(),
            });
            self.deliver_failure(
                id,
                request,
                rank,
                (CommandStatus::ResponseReceived, failure),
                traceback,
            );
        }
        self.dispatch(rank);
    }

    /// Server `rank` will not join again: whoever started it gave up on
    /// it, or it was lost where ranks are fixed (MPI). Once every server
    /// has left for good, the requests without a target are answered, and
    /// new ones refused (rule 20). A server that joins with the rank after
    /// all counts again.
    pub fn server_gone_for_good(&mut self, rank: Rank) {
        if self.gone_for_good.insert(rank) {
            self.place_shared();
        }
    }

    /// No server can ever run a request: every rank the cluster has or
    /// expects has left for good.
    fn no_server_left(&self) -> bool {
        let expected = (1..).take(self.config.expected_servers);
        !self.gone_for_good.is_empty()
            && self
                .server_ranks
                .iter()
                .copied()
                .chain(expected)
                .all(|rank| self.gone_for_good.contains(&rank))
    }

    /// Answers every request waiting in the shared queue, once no server
    /// is left to run it (rule 20).
    fn end_shared_queue(&mut self) {
        if !self.none_left {
            self.none_left = true;
            let ranks = describe_ranks(&self.server_ranks);
            self.event(Event::NoServerLeft { ranks });
        }
        while let Some((_, id)) = self.queue.pop_front() {
            if self
                .requests
                .get(&id)
                .is_some_and(|r| matches!(r.phase, RequestPhase::Queued))
            {
                self.finish_unsent(
                    id,
                    (CommandStatus::Timeout, FailureKind::NoServer),
                    "Timeout: no server is left to run the command (every server has left for good)"
                        .into(),
                );
            }
        }
    }

    /// A server's link closed for good: its requests are answered with
    /// status timeout and it gets no more work.
    pub fn server_lost(&mut self, rank: Rank) {
        let Some(server) = self.server_mut(rank) else {
            return;
        };
        if matches!(server.phase, ServerPhase::Lost | ServerPhase::Stopped) {
            return;
        }
        server.phase = ServerPhase::Lost;
        self.unload(
            rank,
            &format!("Timeout: server n# {rank} disconnected before the command was started"),
            false,
        );
        self.forgotten.retain(|&(_, r)| r != rank);
        let server = self.servers[rank as usize].as_mut().expect("registered");
        let running = server.running.take();
        let queued: Vec<RequestId> = server.queue.drain(..).map(|(_, id)| id).collect();
        self.idle.remove(&rank);
        self.event(Event::ServerLost { rank });
        if let Some(id) = running {
            let reason =
                format!("Timeout: server n# {rank} disconnected while running the command");
            match self.requests.get(&id).map(|r| &r.phase) {
                Some(RequestPhase::Sent { .. }) => {
                    let request = self.requests.remove(&id).expect("just seen");
                    self.deliver_failure(
                        id,
                        request,
                        rank,
                        (CommandStatus::Timeout, FailureKind::ServerLost),
                        reason,
                    );
                    self.event(Event::RequestTimedOut { id, server: rank });
                }
                Some(RequestPhase::TimedOut { .. }) => {
                    self.requests.remove(&id);
                }
                _ => {}
            }
        }
        for id in queued {
            self.finish_unsent(
                id,
                (CommandStatus::Timeout, FailureKind::ServerLost),
                format!("Timeout: server n# {rank} disconnected before the command was sent"),
            );
        }
        self.place_shared();
        self.check_ready();
        self.check_stopped();
    }

    /// Advances time: sends the ping round when due (rule 19) and marks
    /// silent servers timed out (rule 20).
    pub fn tick(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Idle | Phase::Stopped) {
            return;
        }
        self.wake(now);
        if let Some(due) = self.next_round.filter(|&t| now >= t) {
            self.ping_round += 1;
            let ping = Envelope::new(Body::PingRequest(PingRequest {
                sequence: self.ping_round,
            }));
            for &rank in &self.server_ranks {
                let server = self.servers[rank as usize].as_ref().expect("registered");
                if server.monitored() {
                    self.actions.push_back(Action::Send {
                        to: rank,
                        envelope: ping.clone(),
                    });
                }
            }
            // Keep to the schedule, unless ticks came so late that whole
            // rounds were missed.
            let next = due + self.config.heartbeat;
            self.next_round = Some(if next <= now {
                now + self.config.heartbeat
            } else {
                next
            });
            self.steal();
        }
        if !self.debugging && self.next_expiry.is_some_and(|t| now >= t) {
            self.check_timeouts(now);
        }
    }

    /// Cancels requests (rule 24): queued ones are answered as cancelled at
    /// once; running ones are interrupted by their servers, whose responses
    /// follow with status cancelled.
    pub fn cancel(&mut self, ids: &[RequestId]) -> CancelReply {
        let mut reply = CancelReply::default();
        for &id in ids {
            match self.requests.get(&id).map(|r| &r.phase) {
                Some(RequestPhase::Queued) => {
                    self.finish_unsent(
                        id,
                        (CommandStatus::Cancelled, FailureKind::Cancelled),
                        "Cancelled before the request was sent".into(),
                    );
                    reply.dequeued.push(id);
                }
                Some(RequestPhase::Sent { server, .. }) => {
                    let rank = *server;
                    self.send_control(
                        rank,
                        control_request::Action::Cancel(Cancel { request_id: id }),
                        ControlKind::Other,
                    );
                    if self.server(rank).is_some_and(|s| s.running == Some(id)) {
                        reply.interrupting.push(id);
                        continue;
                    }
                    // Sent ahead and not started: answered here at once, as
                    // a queued one is; the server drops it, and its answer.
                    self.forget(rank, id);
                    self.forgotten.insert((id, rank));
                    let request = self.requests.remove(&id).expect("just seen");
                    self.deliver_failure(
                        id,
                        request,
                        0,
                        (CommandStatus::Cancelled, FailureKind::Cancelled),
                        "Cancelled before the request was started".into(),
                    );
                    reply.dequeued.push(id);
                }
                _ => reply.not_pending.push(id),
            }
        }
        reply
    }

    /// Turns debugging mode on or off (rule 22).
    pub fn set_debugging(&mut self, enabled: bool, now: Instant) {
        if self.debugging == enabled {
            return;
        }
        self.debugging = enabled;
        if !enabled {
            self.next_expiry = Some(now);
        }
        self.event(Event::DebuggingMode { enabled });
    }

    /// True while debugging mode is on.
    pub fn debugging(&self) -> bool {
        self.debugging
    }

    /// Changes the log level of the given servers, or of all when `servers`
    /// is empty (rule 31).
    pub fn set_log_level(&mut self, level: LogLevel, servers: &[Rank]) -> Result<(), CoreError> {
        for &rank in servers {
            if self.server(rank).is_none() {
                return Err(CoreError::UnknownRank(rank));
            }
        }
        let ranks: Vec<Rank> = if servers.is_empty() {
            self.server_ranks.iter().copied().collect()
        } else {
            servers.to_vec()
        };
        for rank in ranks {
            if self.server(rank).is_some_and(|s| s.monitored()) {
                self.send_control(
                    rank,
                    control_request::Action::SetLogLevel(SetLogLevel {
                        log_level: level.into(),
                    }),
                    ControlKind::Other,
                );
            }
        }
        Ok(())
    }

    /// The server table (rule 23), for one server or all.
    pub fn status(&self, server: Option<Rank>) -> Result<StatusReply, CoreError> {
        let ranks: Vec<Rank> = match server {
            Some(rank) if self.server(rank).is_some() => vec![rank],
            Some(rank) => return Err(CoreError::UnknownRank(rank)),
            None => self.server_ranks.iter().copied().collect(),
        };
        let servers = ranks
            .into_iter()
            .map(|rank| {
                let s = self.server(rank).expect("registered");
                let running = s
                    .running
                    .and_then(|id| self.requests.get(&id).map(|r| (id, r)));
                ServerStatus {
                    rank,
                    processor: s.host.clone(),
                    pid: s.pid,
                    worker_pid: s.worker_pid,
                    busy: running.is_some(),
                    command: running.map(|(_, r)| r.command.clone()).unwrap_or_default(),
                    command_id: running.map_or(0, |(id, _)| id),
                    command_start_time: if running.is_some() {
                        s.command_start_time
                    } else {
                        0.0
                    },
                    timeout: s.timed_out || s.phase == ServerPhase::Lost,
                    online: s.available(),
                    last_ping: s.last_ping_epoch,
                    rss: s.rss,
                }
            })
            .collect();
        Ok(StatusReply {
            servers,
            cluster: Some(self.cluster_info()),
            queued: (self.queued + self.ahead) as u64,
        })
    }

    /// Where each request stands (rule 17's pending report).
    pub fn track(&self, ids: &[RequestId]) -> TrackReply {
        let states = ids
            .iter()
            .map(|&id| {
                let (status, server) = match self.requests.get(&id).map(|r| &r.phase) {
                    Some(RequestPhase::Queued) => (CommandStatus::HoldingQueue, 0),
                    Some(RequestPhase::Sent { server, .. }) => {
                        let running = self.server(*server).and_then(|s| s.running);
                        if running == Some(id) {
                            (CommandStatus::RequestSent, *server)
                        } else {
                            // Sent ahead: waiting, at its server.
                            (CommandStatus::HoldingQueue, *server)
                        }
                    }
                    Some(RequestPhase::TimedOut { server, .. }) => {
                        (CommandStatus::Timeout, *server)
                    }
                    None if self.used.contains(id) => (CommandStatus::ResponseReceived, 0),
                    None => (CommandStatus::Unspecified, 0),
                };
                RequestState {
                    id,
                    status: status.into(),
                    server,
                }
            })
            .collect();
        TrackReply { states }
    }

    /// The cluster's description for drivers.
    pub fn cluster_info(&self) -> ClusterInfo {
        ClusterInfo {
            transport: self.config.transport.clone(),
            host: self.config.host.clone(),
            head_rank: 0,
            world_size: self.server_ranks.len() as i32 + 1,
            server_ranks: self.server_ranks.iter().copied().collect(),
            heartbeat_seconds: self.config.heartbeat.as_secs_f64(),
            timeout_seconds: self.config.timeout.as_secs_f64(),
            debugging: self.debugging,
            journal: self.config.journal,
        }
    }

    /// Whether request `id` is still held: pending, or answered with a
    /// timeout record whose real answer may still come (rule 21).
    pub fn holds(&self, id: RequestId) -> bool {
        self.requests.get(&id).is_some()
    }

    /// Requests accepted and not yet finished.
    pub fn pending(&self) -> usize {
        self.requests
            .values()
            .filter(|r| !matches!(r.phase, RequestPhase::TimedOut { .. }))
            .count()
    }

    /// True once services are stopped.
    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    fn server(&self, rank: Rank) -> Option<&Server> {
        usize::try_from(rank)
            .ok()
            .and_then(|i| self.servers.get(i))
            .and_then(Option::as_ref)
    }

    fn server_mut(&mut self, rank: Rank) -> Option<&mut Server> {
        usize::try_from(rank)
            .ok()
            .and_then(|i| self.servers.get_mut(i))
            .and_then(Option::as_mut)
    }

    fn check_target(&self, target: Rank) -> Result<(), Rejection> {
        match self.server(target) {
            None => {
                let ranks = describe_ranks(&self.server_ranks);
                Err(Rejection::new(
                    RejectReason::UnknownTarget,
                    format!("target {target} is not a server rank (server ranks: {ranks})"),
                ))
            }
            Some(s) if s.timed_out || s.phase == ServerPhase::Lost => Err(Rejection::new(
                RejectReason::TargetTimedOut,
                format!("target server n# {target} is in timeout"),
            )),
            Some(s) if s.phase == ServerPhase::Stopped || s.phase == ServerPhase::Stopping => {
                Err(Rejection::new(
                    RejectReason::Stopped,
                    format!("target server n# {target} is stopped"),
                ))
            }
            Some(_) => Ok(()),
        }
    }

    fn allocate_id(&mut self) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        self.used.insert(id);
        id
    }

    fn arrival(&mut self) -> u64 {
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        arrival
    }

    fn event(&mut self, event: Event) {
        self.actions.push_back(Action::Event(event));
    }

    fn send_control(&mut self, rank: Rank, action: control_request::Action, kind: ControlKind) {
        let correlation = self.next_correlation;
        self.next_correlation += 1;
        self.controls.insert(correlation, kind);
        self.actions.push_back(Action::Send {
            to: rank,
            envelope: Envelope::correlated(
                correlation,
                Body::ControlRequest(ControlRequest {
                    action: Some(action),
                }),
            ),
        });
    }

    fn send_start(&mut self, rank: Rank) {
        let start = self.config.start.clone();
        self.send_control(
            rank,
            control_request::Action::Start(start),
            ControlKind::Start,
        );
    }

    fn send_stop(&mut self, rank: Rank, force: bool) {
        let Some(server) = self.server_mut(rank) else {
            return;
        };
        if !server.monitored() {
            return;
        }
        server.phase = ServerPhase::Stopping;
        self.send_control(
            rank,
            control_request::Action::Stop(Stop { force }),
            ControlKind::Stop,
        );
    }

    fn send_request(&mut self, id: RequestId, rank: Rank) {
        let ping_round = self.ping_round;
        let request = self.requests.get_mut(&id).expect("queued request exists");
        request.phase = RequestPhase::Sent {
            server: rank,
            ping_round,
        };
        let envelope = Envelope::new(Body::CommandRequest(CommandRequest {
            id,
            command: request.command.clone(),
            mode: request.mode.into(),
            parameters: request.parameters.clone(),
            deadline_seconds: request.deadline_seconds,
        }));
        self.queued -= 1;
        self.idle.remove(&rank);
        let server = self.servers[rank as usize].as_mut().expect("registered");
        if server.running.is_none() {
            server.running = Some(id);
        } else {
            server.prefetched.push_back(id);
            self.ahead += 1;
        }
        self.actions.push_back(Action::Send { to: rank, envelope });
        self.event(Event::RequestSent { id, server: rank });
    }

    /// Whether server `rank` may be sent a request now: it is online and
    /// not timed out, and runs nothing, or runs a request it has not been
    /// timed out on with fewer than the prefetch in flight (rule 12).
    fn has_room(&self, rank: Rank) -> bool {
        let Some(server) = self.server(rank).filter(|s| s.available()) else {
            return false;
        };
        match server.running {
            None => true,
            Some(head) => {
                server.in_flight() < self.config.prefetch
                    && self
                        .requests
                        .get(&head)
                        .is_some_and(|r| matches!(r.phase, RequestPhase::Sent { .. }))
            }
        }
    }

    /// Where a request without a target goes when no server is idle: the
    /// server with room and the fewest in flight, lowest rank first.
    fn roomiest(&self) -> Option<Rank> {
        let mut best: Option<(usize, Rank)> = None;
        for &rank in &self.server_ranks {
            let in_flight = self.servers[rank as usize]
                .as_ref()
                .expect("registered")
                .in_flight();
            if best.is_none_or(|(fewest, _)| in_flight < fewest) && self.has_room(rank) {
                best = Some((in_flight, rank));
            }
        }
        best.map(|(_, rank)| rank)
    }

    /// Sends the shared queue's requests, oldest first, to idle servers,
    /// lowest rank first, and then ahead to the servers with room (rule
    /// 12), as far as they go.
    fn place_shared(&mut self) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        if self.no_server_left() {
            self.end_shared_queue();
            return;
        }
        loop {
            skip_unqueued(&mut self.queue, &self.requests);
            let Some(&(_, id)) = self.queue.front() else {
                return;
            };
            let heavy = self.requests.get(&id).is_some_and(|r| r.heavy);
            let rank = match self.idle.first() {
                Some(&rank) => rank,
                None if heavy => return,
                None => match self.roomiest() {
                    Some(rank) => rank,
                    None => return,
                },
            };
            self.queue.pop_front();
            self.send_request(id, rank);
        }
    }

    /// Gives server `rank` requests while it has room: each time the
    /// oldest of its own queue's head and the shared queue's head (rules
    /// 12-13). A server left with nothing to run is marked idle and may
    /// take back a request sent ahead elsewhere.
    fn dispatch(&mut self, rank: Rank) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        while self.has_room(rank) {
            let server = self.servers[rank as usize].as_mut().expect("registered");
            let requests = &self.requests;
            skip_unqueued(&mut server.queue, requests);
            skip_unqueued(&mut self.queue, requests);
            let shared = match (server.queue.front(), self.queue.front()) {
                (Some(&(own, _)), Some(&(shared, _))) => shared < own,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (None, None) => {
                    if server.running.is_none() && self.idle.insert(rank) {
                        self.steal();
                    }
                    return;
                }
            };
            let queue = if shared {
                &mut self.queue
            } else {
                &mut server.queue
            };
            let (_, id) = *queue.front().expect("seen above");
            if server.running.is_some() && requests.get(&id).is_some_and(|r| r.heavy) {
                // Not sent ahead: it goes once the server is free.
                return;
            }
            queue.pop_front();
            self.send_request(id, rank);
        }
    }

    /// Recalls requests sent ahead to busy servers for the idle ones
    /// (rule 12): the oldest of those that have waited at their servers
    /// since before the last ping round went out, one recall in flight per
    /// idle server.
    fn steal(&mut self) {
        if self.phase != Phase::Running || self.idle.is_empty() || self.ahead == 0 {
            return;
        }
        let mut recalling = 0;
        let mut candidates: Vec<(u64, RequestId, Rank)> = Vec::new();
        for &rank in &self.server_ranks {
            let server = self.servers[rank as usize].as_ref().expect("registered");
            for id in &server.prefetched {
                let Some(request) = self.requests.get(id) else {
                    continue;
                };
                if request.recalling {
                    recalling += 1;
                    continue;
                }
                let waited = matches!(request.phase,
                    RequestPhase::Sent { ping_round, .. } if ping_round < self.ping_round);
                if request.shared && waited {
                    candidates.push((request.arrival, *id, rank));
                }
            }
        }
        candidates.sort_unstable();
        let wanted = self.idle.len().saturating_sub(recalling);
        for (_, id, rank) in candidates.into_iter().take(wanted) {
            self.requests.get_mut(&id).expect("just seen").recalling = true;
            self.send_recall(rank, id);
        }
    }

    /// Server `rank` is no longer to run request `id` (see
    /// [`Server::forget`]), and the count of requests sent ahead follows.
    fn forget(&mut self, rank: Rank, id: RequestId) {
        if self.server_mut(rank).is_some_and(|s| s.forget(id)) {
            self.ahead -= 1;
        }
    }

    fn send_recall(&mut self, rank: Rank, id: RequestId) {
        self.send_control(
            rank,
            control_request::Action::Recall(Recall { request_id: id }),
            ControlKind::Recall(id),
        );
    }

    /// Puts a request sent ahead and taken back (or whose server is gone)
    /// back into the shared queue at its arrival place; once services are
    /// stopping, answers it as a request not yet sent is (rule 27).
    fn requeue(&mut self, id: RequestId) {
        let Some(request) = self.requests.get_mut(&id) else {
            return;
        };
        request.phase = RequestPhase::Queued;
        request.recalling = false;
        let arrival = request.arrival;
        self.queued += 1;
        if self.phase != Phase::Running {
            self.finish_unsent(
                id,
                (CommandStatus::Cancelled, FailureKind::Cancelled),
                "Cancelled: services were stopped before the request was sent".into(),
            );
            return;
        }
        let at = self.queue.partition_point(|&(a, _)| a < arrival);
        self.queue.insert(at, (arrival, id));
    }

    /// Takes the requests sent ahead to server `rank` off it, as it times
    /// out or is lost: those without a target go back to the shared
    /// queue, targeted ones are answered with `reason` (rule 20). A server
    /// that may still be heard from is told to drop them, and its answers
    /// to them, should it have started one first, are dropped.
    fn unload(&mut self, rank: Rank, reason: &str, recall: bool) {
        let server = self.servers[rank as usize].as_mut().expect("registered");
        let prefetched: Vec<RequestId> = server.prefetched.drain(..).collect();
        self.ahead -= prefetched.len();
        for id in prefetched {
            let Some(shared) = self.requests.get(&id).map(|r| r.shared) else {
                continue;
            };
            if recall {
                self.forgotten.insert((id, rank));
                self.send_recall(rank, id);
            }
            if shared {
                self.requeue(id);
            } else {
                // Answered as one never sent is: it did not start, as far
                // as is known here.
                let request = self.requests.remove(&id).expect("just seen");
                self.event(Event::RequestTimedOut { id, server: 0 });
                self.deliver_failure(
                    id,
                    request,
                    0,
                    (CommandStatus::Timeout, FailureKind::ServerLost),
                    reason.into(),
                );
            }
        }
    }

    fn on_ping(&mut self, from: Rank, ping: PingResponse, now: Instant) -> bool {
        let epoch = self.clock.epoch(now);
        let server = self.servers[from as usize]
            .as_mut()
            .expect("checked by handle");
        server.last_ping_epoch = epoch;
        server.host = ping.host;
        server.pid = ping.pid;
        server.worker_pid = ping.worker_pid;
        server.rss = ping.rss_bytes;
        server.command_start_time = ping.command_start_time;
        // A timed-out record whose command the server no longer runs, as
        // told by a ping it answered after receiving the command, will get
        // no answer: the server finished it before the record could be
        // replaced, or lost it with its worker.
        if let Some(id) = server.running {
            if let Some(Request {
                phase: RequestPhase::TimedOut { ping_round, .. },
                ..
            }) = self.requests.get(&id)
            {
                if ping.sequence > *ping_round && !(ping.busy && ping.command_id == id) {
                    self.requests.remove(&id);
                    server.running = None;
                    return true;
                }
            }
        }
        false
    }

    fn on_response(&mut self, from: Rank, response: CommandResponse) -> Result<(), CoreError> {
        let id = response.id;
        let replaces_timeout = match self.requests.get(&id).map(|r| &r.phase) {
            Some(RequestPhase::Sent { server, .. }) if *server == from => false,
            Some(RequestPhase::TimedOut { server, .. }) if *server == from => true,
            _ if self.forgotten.remove(&(id, from)) => {
                return Ok(());
            }
            // A server that ran a request queued again after a restart,
            // for the head node before, answers it: that answer counts,
            // and the request runs no more (rule 33).
            Some(RequestPhase::Queued | RequestPhase::Sent { .. })
                if self.requests.get(&id).is_some_and(|r| r.recovered) =>
            {
                self.take_back(id);
                false
            }
            _ => return Err(CoreError::UnknownRequest { id, from }),
        };
        let request = self.requests.remove(&id).expect("just seen");
        self.forget(from, id);
        let record = response_record(
            request.command,
            request.mode,
            request.parameters,
            from,
            response,
        );
        if replaces_timeout {
            self.event(Event::ResponseRecovered { id, server: from });
        } else if record.successful {
            self.event(Event::RequestSucceeded { id, server: from });
        } else {
            self.event(Event::RequestFailed {
                id,
                server: from,
                traceback: record.traceback.clone().unwrap_or_default(),
            });
        }
        self.actions.push_back(Action::Deliver {
            driver: request.driver,
            delivery: Box::new(ResponseDelivery {
                response: Some(record),
                replaces_timeout,
                rejected: None,
            }),
        });
        Ok(())
    }

    /// Request `id`, queued again after a restart, was answered by a
    /// server that ran it before: it leaves the queue, or the server it was
    /// sent to again is told to drop it (its answer, should it run there
    /// too, is dropped).
    fn take_back(&mut self, id: RequestId) {
        let Some(request) = self.requests.get(&id) else {
            return;
        };
        match request.phase {
            RequestPhase::Queued => self.queued -= 1,
            RequestPhase::Sent { server, .. } => {
                let started = self.server(server).is_some_and(|s| s.running == Some(id));
                self.forget(server, id);
                self.forgotten.insert((id, server));
                let action = if started {
                    control_request::Action::Cancel(Cancel { request_id: id })
                } else {
                    control_request::Action::Recall(Recall { request_id: id })
                };
                self.send_control(server, action, ControlKind::Other);
            }
            RequestPhase::TimedOut { .. } => {}
        }
    }

    fn on_control(&mut self, from: Rank, correlation: u64, response: ControlResponse) {
        let Some(kind) = self.controls.remove(&correlation) else {
            return;
        };
        match kind {
            ControlKind::Start => {
                let server = self.servers[from as usize]
                    .as_mut()
                    .expect("checked by handle");
                if response.ok {
                    server.host = response.host.clone();
                    server.pid = response.pid;
                    server.worker_pid = response.worker_pid;
                    if server.phase == ServerPhase::Starting {
                        server.phase = ServerPhase::Online;
                    }
                    self.event(Event::ServerStarted {
                        rank: from,
                        host: response.host,
                        pid: response.pid,
                    });
                } else {
                    server.phase = ServerPhase::Lost;
                    self.event(Event::ServerStartFailed {
                        rank: from,
                        error: response.error,
                    });
                }
                self.check_ready();
            }
            ControlKind::Stop => {
                let server = self.servers[from as usize]
                    .as_mut()
                    .expect("checked by handle");
                server.phase = ServerPhase::Stopped;
                self.idle.remove(&from);
                self.event(Event::ServerStopped { rank: from });
                self.check_stopped();
            }
            ControlKind::Recall(id) => {
                if response.ok {
                    // Dropped by a server it was taken off as it timed out.
                    self.forgotten.remove(&(id, from));
                }
                let Some(request) = self.requests.get_mut(&id) else {
                    return;
                };
                if !request.recalling
                    || !matches!(request.phase, RequestPhase::Sent { server, .. } if server == from)
                {
                    return;
                }
                request.recalling = false;
                if response.ok {
                    self.forget(from, id);
                    self.requeue(id);
                    self.event(Event::RequestRecalled { id, server: from });
                    self.place_shared();
                }
            }
            ControlKind::Other => {}
        }
    }

    /// Tells the head node's own stall from its servers' silence (rule
    /// 20): while services run the node ticks every heartbeat, so a longer
    /// gap since the last time it was given means it did not run (stopped
    /// with SIGSTOP, in a debugger, starved, swapping). The servers could
    /// not be heard in that time, so their silence is counted from its end.
    fn wake(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Idle | Phase::Stopped) {
            return;
        }
        let Some(before) = self.awake.replace(now) else {
            return;
        };
        let stalled_for = now.saturating_duration_since(before);
        if stalled_for <= self.config.heartbeat * STALL {
            return;
        }
        for &rank in &self.server_ranks {
            let server = self.servers[rank as usize].as_mut().expect("registered");
            server.last_seen = (server.last_seen + stalled_for).min(now);
        }
        self.next_expiry = Some(now);
        self.event(Event::Stalled { stalled_for });
    }

    fn check_timeouts(&mut self, now: Instant) {
        let mut earliest: Option<Instant> = None;
        let mut expired = Vec::new();
        for &rank in &self.server_ranks {
            let server = self.servers[rank as usize].as_ref().expect("registered");
            if !server.monitored() || server.timed_out {
                continue;
            }
            let expiry = server.last_seen + self.config.timeout;
            if now >= expiry {
                expired.push((rank, now - server.last_seen));
            } else {
                earliest = Some(earliest.map_or(expiry, |e| e.min(expiry)));
            }
        }
        self.next_expiry = Some(earliest.unwrap_or(now + self.config.timeout));
        for (rank, silent_for) in expired {
            self.mark_timed_out(rank, silent_for);
        }
        self.check_stopped();
    }

    fn mark_timed_out(&mut self, rank: Rank, silent_for: Duration) {
        self.unload(
            rank,
            &format!("Timeout: server n# {rank} timed out before the command was started"),
            true,
        );
        let server = self.servers[rank as usize].as_mut().expect("registered");
        server.timed_out = true;
        let running = server.running;
        let queued: Vec<RequestId> = server.queue.drain(..).map(|(_, id)| id).collect();
        self.idle.remove(&rank);
        self.event(Event::ServerTimedOut { rank, silent_for });
        if let Some(id) = running {
            if let Some(request) = self.requests.get_mut(&id) {
                if let RequestPhase::Sent { ping_round, .. } = request.phase {
                    request.phase = RequestPhase::TimedOut {
                        server: rank,
                        ping_round,
                    };
                    let record = failure_record(
                        id,
                        request.command.clone(),
                        request.mode,
                        request.parameters.clone(),
                        rank,
                        CommandStatus::Timeout,
                        FailureKind::ServerLost,
                        format!(
                            "Timeout: server n# {rank} did not answer for {:.1} s while running the command",
                            silent_for.as_secs_f64()
                        ),
                    );
                    let driver = request.driver;
                    self.actions.push_back(Action::Deliver {
                        driver,
                        delivery: Box::new(ResponseDelivery {
                            response: Some(record),
                            replaces_timeout: false,
                            rejected: None,
                        }),
                    });
                    self.event(Event::RequestTimedOut { id, server: rank });
                }
            }
        }
        for id in queued {
            self.finish_unsent(
                id,
                (CommandStatus::Timeout, FailureKind::ServerLost),
                format!("Timeout: server n# {rank} timed out before the command was sent"),
            );
        }
        self.place_shared();
    }

    /// Answers a request that never reached a server.
    fn finish_unsent(&mut self, id: RequestId, how: (CommandStatus, FailureKind), reason: String) {
        let Some(request) = self.requests.remove(&id) else {
            return;
        };
        debug_assert!(matches!(request.phase, RequestPhase::Queued));
        self.queued -= 1;
        if how.0 == CommandStatus::Timeout {
            self.event(Event::RequestTimedOut { id, server: 0 });
        }
        self.deliver_failure(id, request, 0, how, reason);
    }

    fn deliver_failure(
        &mut self,
        id: RequestId,
        request: Request,
        server: Rank,
        (status, failure): (CommandStatus, FailureKind),
        reason: String,
    ) {
        let record = failure_record(
            id,
            request.command,
            request.mode,
            request.parameters,
            server,
            status,
            failure,
            reason,
        );
        self.actions.push_back(Action::Deliver {
            driver: request.driver,
            delivery: Box::new(ResponseDelivery {
                response: Some(record),
                replaces_timeout: false,
                rejected: None,
            }),
        });
    }

    /// Emits [`Event::AllServersStarted`] once the expected servers have
    /// joined and none still there waits for its START acknowledgement: a
    /// server lost, or refusing START, before answering does not hold the
    /// cluster back.
    fn check_ready(&mut self) {
        if self.ready || self.phase != Phase::Running {
            return;
        }
        let joined = self.server_ranks.len() >= self.config.expected_servers;
        let starting = self.server_ranks.iter().any(|&rank| {
            self.servers[rank as usize]
                .as_ref()
                .is_some_and(|s| s.phase == ServerPhase::Starting)
        });
        if joined && !starting {
            self.ready = true;
            self.event(Event::AllServersStarted);
        }
    }

    fn check_stopped(&mut self) {
        if self.phase != Phase::Stopping {
            return;
        }
        let done = self.server_ranks.iter().all(|&rank| {
            let s = self.servers[rank as usize].as_ref().expect("registered");
            matches!(s.phase, ServerPhase::Stopped | ServerPhase::Lost) || s.timed_out
        });
        if done {
            self.phase = Phase::Stopped;
            self.actions.push_back(Action::Stopped);
        }
    }
}

/// "1-4" or "1, 3, 7": the server ranks, for error messages.
fn describe_ranks(ranks: &BTreeSet<Rank>) -> String {
    match (ranks.first(), ranks.last()) {
        (None, _) | (_, None) => "none".into(),
        (Some(first), Some(last)) if (last - first) as usize + 1 == ranks.len() => {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        }
        _ => ranks
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}
