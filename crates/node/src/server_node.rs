//! A server node's event loop: answers the head node through
//! `ServerCore`, runs commands in the Python worker through the
//! [`Executor`], and exits when told to stop or when the head node is
//! gone (rule 30). Pings are answered here, never by Python, so a busy
//! worker never makes its server look dead (rule 24).

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{
    CommandRequest, ControlRequest, Envelope, FailureKind, LogLevel, control_request,
};
use casa_node_protocol::{
    ExecOutcome, Rank, ServerAction, ServerConfig, ServerCore, Transport, TransportError,
    TransportEvent, WallClock,
};

use crate::executor::{Executor, ExecutorConfig, ExecutorError, ExecutorEvent};
use crate::shm;

/// Settings of a server node.
#[derive(Debug, Clone)]
pub struct ServerNodeConfig {
    /// The Python interpreter the worker runs under.
    pub python: PathBuf,
    /// A start-up script run in each worker's namespace (rule 5).
    pub init: Option<PathBuf>,
    /// `--casa`: the directory holding casa-node's `casampi`, which each
    /// worker puts first on its path before it takes CASA's namespace.
    pub casa: Option<PathBuf>,
    /// How long an interrupted command may take before its worker is
    /// killed (rule 24).
    pub kill_grace: Duration,
    /// Silence from the head node after which this server exits (rule
    /// 30); `None`: never (under MPI). Until then a quiet link costs
    /// nothing: the worker keeps running, and a finished response waits on
    /// the link for the head node.
    pub patience: Option<Duration>,
}

/// Why a server node stopped other than by STOP.
#[derive(Debug, thiserror::Error)]
pub enum ServerNodeError {
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The head node went away.
    #[error("the head node is gone ({0}); exiting")]
    HeadGone(String),
}

type Starting = Pin<Box<dyn Future<Output = Result<Executor, ExecutorError>> + Send>>;

/// Makes a new link to the head node (at the same place, asking for
/// the same rank), for a server node that rejoins one whose link closed.
pub type Rejoin<T> =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<T, TransportError>> + Send>> + Send>;

/// The longest pause between two tries to rejoin.
const REJOIN_PAUSE_MAX: Duration = Duration::from_secs(2);

/// Messages kept for the head node while its link is down: the answers
/// to commands and controls (pings and log records are not kept).
const BACKLOG_MAX: usize = 4096;

/// Runs a server node until STOP or the loss of the head node. With
/// `rejoin`, a closed link is not the end: the node keeps its worker and
/// the answers it owes, and tries to rejoin (every 0.2 s, then less often,
/// up to every 2 s) until its patience runs out; a head node started
/// again from its journal takes those answers (rule 33).
pub async fn run<T: Transport>(
    transport: T,
    config: ServerNodeConfig,
    rejoin: Option<Rejoin<T>>,
) -> Result<(), ServerNodeError> {
    let now = Instant::now();
    let core = ServerCore::new(
        ServerConfig {
            rank: transport.rank(),
            host: crate::hostname(),
            pid: std::process::id(),
            kill_grace: config.kill_grace,
            patience: config.patience,
        },
        WallClock::system(),
        now,
    );
    let rank = transport.rank();
    let mut node = Node {
        core,
        config,
        executor: None,
        starting: None,
        broken: None,
        link: Some(transport),
        rejoin,
        backlog: VecDeque::new(),
        next_try: Instant::now(),
        pause: Duration::from_millis(200),
    };
    loop {
        let deadline = node
            .core
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            event = next_link_event(&mut node.link, node.rejoin.as_ref(), node.next_try) => {
                let now = Instant::now();
                match event {
                    LinkEvent::Transport(Ok(TransportEvent::Message { from, mut envelope })) => {
                        shm_check(&mut envelope);
                        if matches!(envelope.body, Some(Body::PingRequest(_))) {
                            node.update_resources();
                        }
                        if let Err(e) = node.core.handle(from, envelope, now) {
                            node.core.log(LogLevel::Warning, format!("dropped a message: {e}"), now);
                        }
                    }
                    LinkEvent::Transport(Ok(TransportEvent::PeerLost(0)))
                    | LinkEvent::Transport(Err(TransportError::Disconnected(0))) => {
                        if !node.link_closed() {
                            node.shutdown().await;
                            return Err(ServerNodeError::HeadGone("its link closed".into()));
                        }
                    }
                    LinkEvent::Transport(Ok(_)) => {}
                    LinkEvent::Transport(Err(e)) => {
                        node.shutdown().await;
                        return Err(e.into());
                    }
                    LinkEvent::Rejoined(Ok(transport)) => node.rejoined(transport, rank).await,
                    LinkEvent::Rejoined(Err(e)) => node.rejoin_failed(&e),
                }
            }
            event = next_event(&mut node.executor) => node.on_executor(event),
            started = starting(&mut node.starting) => node.on_started(started),
            _ = tokio::time::sleep_until(deadline.into()) => node.core.tick(Instant::now()),
        }
        match node.carry_out().await? {
            Outcome::Serving => {}
            Outcome::Stopped => {
                node.shutdown().await;
                if let Some(mut transport) = node.link.take() {
                    let _ = transport.shutdown().await;
                }
                return Ok(());
            }
            Outcome::HeadGone(silent_for) => {
                node.shutdown().await;
                let silence = silent_for.as_secs_f64();
                return Err(ServerNodeError::HeadGone(format!(
                    "no message for {silence:.0} s"
                )));
            }
        }
    }
}

/// Leaves the cluster's shared-memory directory in a START only when this
/// server can use it (its tag file holds START's tag: the same host), so
/// that the worker is told of it and the answer says so.
fn shm_check(envelope: &mut Envelope) {
    let Some(Body::ControlRequest(ControlRequest {
        action: Some(control_request::Action::Start(start)),
    })) = &mut envelope.body
    else {
        return;
    };
    let var = |name: &str| {
        start
            .environment
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.value.clone())
    };
    let usable = match (var(shm::SHM_DIR_VAR), var(shm::SHM_TAG_VAR)) {
        (Some(dir), Some(tag)) => shm::usable(Path::new(&dir), &tag),
        _ => false,
    };
    if !usable {
        start
            .environment
            .retain(|v| v.name != shm::SHM_DIR_VAR && v.name != shm::SHM_TAG_VAR);
    }
}

/// Whether the head node waits for `envelope`: an answer to a command
/// or a control, kept while the link is down (pings and log records are
/// not).
fn owed(envelope: &Envelope) -> bool {
    matches!(
        envelope.body,
        Some(Body::CommandResponse(_) | Body::ControlResponse(_))
    )
}

/// What the link to the head node brought: an event, or, while it is
/// down, the outcome of a try to rejoin.
enum LinkEvent<T> {
    Transport(Result<TransportEvent, TransportError>),
    Rejoined(Result<T, TransportError>),
}

/// The next event on the link; while it is down, a try to rejoin at
/// `next_try`; never, while it is down with no way to rejoin.
async fn next_link_event<T: Transport>(
    link: &mut Option<T>,
    rejoin: Option<&Rejoin<T>>,
    next_try: Instant,
) -> LinkEvent<T> {
    match (link, rejoin) {
        (Some(transport), _) => LinkEvent::Transport(transport.recv().await),
        (None, Some(rejoin)) => {
            tokio::time::sleep_until(next_try.into()).await;
            LinkEvent::Rejoined(rejoin().await)
        }
        (None, None) => std::future::pending().await,
    }
}

async fn next_event(executor: &mut Option<Executor>) -> ExecutorEvent {
    match executor {
        Some(executor) => executor.next_event().await,
        None => std::future::pending().await,
    }
}

async fn starting(starting: &mut Option<Starting>) -> Result<Executor, ExecutorError> {
    match starting {
        Some(future) => {
            let result = future.await;
            *starting = None;
            result
        }
        None => std::future::pending().await,
    }
}

/// Where the server node stands after carrying out the core's actions.
enum Outcome {
    Serving,
    Stopped,
    HeadGone(Duration),
}

struct Node<T> {
    core: ServerCore,
    config: ServerNodeConfig,
    executor: Option<Executor>,
    starting: Option<Starting>,
    /// Why no worker can run, when its start failed.
    broken: Option<String>,
    /// The link to the head node; `None` while it is down.
    link: Option<T>,
    rejoin: Option<Rejoin<T>>,
    /// What waits for the head node while the link is down.
    backlog: VecDeque<Envelope>,
    /// When to try to rejoin next, and the pause after that.
    next_try: Instant,
    pause: Duration,
}

impl<T: Transport> Node<T> {
    /// The link closed: true when the node will try to rejoin (it keeps its
    /// worker and what it owes the head node), false when it must go (it
    /// cannot rejoin, or was told to stop).
    fn link_closed(&mut self) -> bool {
        // Told to stop: the head node is going for good.
        if self.rejoin.is_none() || self.core.is_stopping() {
            return false;
        }
        self.link = None;
        self.pause = Duration::from_millis(200);
        self.next_try = Instant::now();
        tracing::warn!("the head node's link closed: rejoining, with the worker kept");
        true
    }

    /// A new link: what waited for the head node goes first.
    async fn rejoined(&mut self, mut transport: T, rank: Rank) {
        if transport.rank() != rank {
            tracing::warn!(
                "rejoined as rank {}, not {rank} (the rank was taken)",
                transport.rank()
            );
        }
        while let Some(envelope) = self.backlog.pop_front() {
            if let Err(e) = transport.send(0, envelope.clone()).await {
                tracing::warn!("the new link failed at once: {e}");
                self.backlog.push_front(envelope);
                self.rejoin_failed(&e);
                return;
            }
        }
        tracing::warn!("rejoined the head node");
        self.link = Some(transport);
    }

    fn rejoin_failed(&mut self, error: &TransportError) {
        tracing::debug!("rejoining failed: {error}");
        self.next_try = Instant::now() + self.pause;
        self.pause = (self.pause * 2).min(REJOIN_PAUSE_MAX);
    }

    /// Keeps `envelope` for the head node while the link is down, if it
    /// is an answer it waits for.
    fn keep(&mut self, envelope: Envelope) {
        if owed(&envelope) && self.backlog.len() < BACKLOG_MAX {
            self.backlog.push_back(envelope);
        }
    }

    /// Carries out the core's actions.
    async fn carry_out(&mut self) -> Result<Outcome, ServerNodeError> {
        while let Some(action) = self.core.poll_action() {
            match action {
                ServerAction::Send(envelope) => {
                    let failed = match &envelope.body {
                        Some(Body::CommandResponse(response)) => Some(response.without_payload()),
                        _ => None,
                    };
                    let Some(transport) = self.link.as_mut() else {
                        self.keep(envelope);
                        continue;
                    };
                    // An answer is kept until sent, should the link be found
                    // closed: the head node that takes its place wants it.
                    let kept = (self.rejoin.is_some() && owed(&envelope)).then(|| envelope.clone());
                    match transport.send(0, envelope).await {
                        Ok(()) => {}
                        Err(TransportError::Disconnected(0)) if self.rejoin.is_some() => {
                            self.link_closed();
                            if let Some(envelope) = kept {
                                self.keep(envelope);
                            }
                        }
                        // Too large to send (a return value near the frame
                        // limit): the command fails, saying why, and the
                        // server goes on.
                        Err(TransportError::Frame(e)) => {
                            let why = format!("casa-node: the response could not be sent: {e}");
                            self.core
                                .log(LogLevel::Warning, why.clone(), Instant::now());
                            if let Some(response) = failed {
                                let body =
                                    Body::CommandResponse(Box::new(response.too_large(&why)));
                                if let Some(transport) = self.link.as_mut() {
                                    transport.send(0, Envelope::new(body)).await?;
                                }
                            }
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                ServerAction::Configure(start) => {
                    let config = ExecutorConfig {
                        python: self.config.python.clone(),
                        init: self.config.init.clone(),
                        casa: self.config.casa.clone(),
                        working_directory: (!start.working_directory.is_empty())
                            .then(|| PathBuf::from(&start.working_directory)),
                        environment: start
                            .environment
                            .iter()
                            .map(|v| (v.name.clone(), v.value.clone()))
                            .collect(),
                        rank: self.core.rank(),
                    };
                    let now = Instant::now();
                    match Executor::spawn(config) {
                        Ok(executor) => {
                            self.core.configured(executor.worker_pid(), now);
                            self.starting = Some(Box::pin(executor.ready()));
                        }
                        Err(e) => {
                            self.core.configured(None, now);
                            self.starting = Some(Box::pin(std::future::ready(Err(e))));
                        }
                    }
                }
                ServerAction::Execute(request) => self.execute(request),
                ServerAction::Interrupt { .. } => {
                    if let Some(executor) = &mut self.executor {
                        executor.interrupt();
                    }
                }
                ServerAction::Kill { .. } => {
                    if let Some(executor) = &mut self.executor {
                        executor.kill();
                    }
                }
                ServerAction::SetLogLevel(level) => {
                    if let Some(executor) = &mut self.executor {
                        executor.set_log_level(level);
                    }
                }
                ServerAction::Exit => return Ok(Outcome::Stopped),
                ServerAction::HeadGone { silent_for } => {
                    return Ok(Outcome::HeadGone(silent_for));
                }
            }
        }
        Ok(Outcome::Serving)
    }

    fn execute(&mut self, request: CommandRequest) {
        if let Some(reason) = &self.broken {
            let reason = reason.clone();
            self.fail(request.id, reason);
            return;
        }
        match &mut self.executor {
            Some(executor) => {
                let id = request.id;
                if let Err(e) = executor.execute(request) {
                    self.fail(
                        id,
                        format!("the Python worker could not take the command: {e}"),
                    );
                }
            }
            None => self.fail(request.id, "the Python worker is not running".to_owned()),
        }
    }

    fn fail(&mut self, id: u64, traceback: String) {
        let outcome = ExecOutcome {
            id,
            traceback: Some(traceback),
            failure: FailureKind::NotSent,
            ..ExecOutcome::default()
        };
        if let Err(e) = self.core.finished(outcome, Instant::now()) {
            tracing::warn!("{e}");
        }
    }

    fn on_started(&mut self, started: Result<Executor, ExecutorError>) {
        let now = Instant::now();
        match started {
            Ok(mut executor) => {
                // Python's own logging follows the level START set.
                executor.set_log_level(self.core.log_level());
                self.core.log(
                    LogLevel::Info,
                    format!(
                        "Python worker started with PID {}",
                        executor.worker_pid().unwrap_or(0)
                    ),
                    now,
                );
                self.executor = Some(executor);
                self.announce_worker(now);
            }
            Err(e) => {
                let reason = format!("the Python worker could not start: {e}");
                self.core.log(LogLevel::Error, reason.clone(), now);
                self.broken = Some(reason);
            }
        }
        self.core.worker_ready(now);
    }

    fn on_executor(&mut self, event: ExecutorEvent) {
        let now = Instant::now();
        match event {
            ExecutorEvent::Finished(outcome) => {
                if outcome.worker_restarted {
                    // Known before the command's answer goes out (rule 23).
                    self.announce_worker(now);
                }
                if let Err(e) = self.core.finished(outcome, now) {
                    self.core.log(LogLevel::Warning, e.to_string(), now);
                }
            }
            ExecutorEvent::Log { level, message } => self.core.log(level, message, now),
            ExecutorEvent::WorkerRestarted { reason } => {
                self.core.log(LogLevel::Warning, reason, now);
                self.announce_worker(now);
            }
            ExecutorEvent::NoWorkerLeft { reason } => {
                self.core.log(LogLevel::Error, reason, now);
                self.announce_worker(now);
            }
        }
    }

    /// A worker started or was replaced: the head node learns its pid
    /// now, not at the next ping (rule 23).
    fn announce_worker(&mut self, now: Instant) {
        self.update_resources();
        self.core.announce(now);
    }

    fn update_resources(&mut self) {
        if let Some(executor) = &self.executor {
            self.core
                .set_resources(executor.worker_pid().unwrap_or(0), executor.rss_bytes());
        }
    }

    async fn shutdown(&mut self) {
        self.starting = None;
        if let Some(executor) = self.executor.take() {
            executor.shutdown().await;
        }
    }
}
