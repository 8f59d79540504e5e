//! The head node's event loop: moves envelopes between the transport,
//! the front door and `HeadCore`, keeps the clock, and writes the
//! unified log. Every decision is the core's.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{
    Ack, ClaimReply, CommandMode, CommandResponse, CommandStatus, Envelope, FailureKind, LogLevel,
    LogRecord, ProtocolErrorCode, RejectReason, ResponseDelivery, Role, SubmitReply, SubmitRequest,
    Welcome, submit_reply,
};
use casa_node_protocol::{
    Action, DriverId, HeadConfig, HeadCore, PROTOCOL_VERSION, Rank, Rejection, RequestId,
    SubmitError, Transport, TransportError, TransportEvent, WallClock, check_hello, check_version,
    response_record,
};
use futures::FutureExt;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};

use crate::dashboard::{Ask, Board};
use crate::driver_queues::{Credit, Outbox};
use crate::front_door::{DRIVER_EVENTS, DriverEvent, FrontDoor};
use crate::journal::{Journal, Recovered};
use crate::log::LogSink;
use crate::shm;
use crate::syntax::{InvalidCommand, SyntaxChecker};

/// A submission on its way through the syntax check, in arrival order.
struct Pending {
    driver: DriverId,
    correlation: u64,
    item: Item,
    /// The request's credit: while a driver has too many requests in the
    /// line, it is not read, which bounds the line.
    credit: Option<Credit>,
}

/// What waits in a driver's line behind its submissions.
enum Item {
    /// A submission, and once checked the syntax error that rejects it.
    Submit(SubmitRequest, Option<InvalidCommand>),
    /// Another request of a driver whose submissions are still being
    /// checked: answered after them, so that it sees them (a cancel, a
    /// track or a stop after pipelined pushes).
    Deferred(Body),
    /// The driver disconnected: its leases die once the submissions it
    /// sent before have reached the core.
    Gone,
}

/// An item after the check, in arrival order.
type Checked = Pending;

/// Checked items the syntax check may have queued for the loop before it
/// waits for the loop to take some.
const CHECKED: usize = 1024;

/// Checks submissions one after another, so each driver's submissions
/// keep their order (and their ids increase in that order).
async fn check_submissions(
    python: Option<PathBuf>,
    mut pending: mpsc::UnboundedReceiver<Pending>,
    checked: mpsc::Sender<Checked>,
) {
    let mut checker = python.and_then(|python| match SyntaxChecker::start(&python) {
        Ok(checker) => Some(checker),
        Err(e) => {
            tracing::warn!(
                "commands are not checked at submission: {}: {e}",
                python.display()
            );
            None
        }
    });
    while let Some(Pending {
        driver,
        correlation,
        item,
        credit,
    }) = pending.recv().await
    {
        let mut request = match item {
            Item::Submit(request, _) => request,
            item => {
                let passed = Pending {
                    driver,
                    correlation,
                    item,
                    credit,
                };
                if checked.send(passed).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let auto = matches!(request.mode(), CommandMode::Unspecified | CommandMode::Auto);
        let mut error = None;
        if auto && request.command != "push" {
            if let Some(c) = checker.as_mut() {
                match c.check(&request.command).await {
                    Ok(Ok(mode)) => request.mode = mode.into(),
                    Ok(Err(e)) => error = Some(e),
                    Err(e) => {
                        tracing::warn!(
                            "the syntax checker failed ({e}); workers will check commands"
                        );
                        checker = None;
                    }
                }
            }
        }
        if checked
            .send(Checked {
                driver,
                correlation,
                item: Item::Submit(request, error),
                credit,
            })
            .await
            .is_err()
        {
            break;
        }
    }
    if let Some(checker) = checker {
        checker.stop().await;
    }
}

/// Whom requests queued again from the journal belong to until a driver
/// claims them (rule 33): no connection (the front door numbers its
/// connections from 1).
const RECOVERED: DriverId = DriverId(0);

/// Settings of the head node's loop.
pub struct HeadNodeConfig {
    /// The core's settings.
    pub core: HeadConfig,
    /// Where the unified log goes (shared with whoever else logs in it:
    /// `up`'s watch over the server processes it started).
    pub log: Arc<LogSink>,
    /// The Python that checks commands at submission (rule 2); `None`
    /// leaves it to the workers.
    pub python: Option<PathBuf>,
    /// The largest frame the front door sends a driver: a response record
    /// larger than this is delivered without its return value and
    /// parameters, as failed, saying why.
    pub max_frame: usize,
    /// The cluster's shared-memory directory, when shared memory is on.
    pub shared: Option<SharedConfig>,
    /// The journal (rule 33), opened, and what it held.
    pub journal: Option<(Journal, Recovered)>,
    /// Ranks whose server process will not be started again: `up` and
    /// `run` gave up on it (rule 20).
    pub given_up: Option<mpsc::UnboundedReceiver<Rank>>,
    /// The dashboard's state, and what its HTTP side asks of it.
    pub dashboard: Option<(Board, mpsc::Receiver<Ask>)>,
}

/// How often the dashboard's pages are updated; every other time, the
/// progress chart gets a sample.
const DASHBOARD_EVERY: Duration = Duration::from_millis(500);

/// The cluster's shared-memory directory as the head node uses it.
#[derive(Debug)]
pub struct SharedConfig {
    /// The directory, removed when the head node's loop ends.
    pub dir: shm::SharedDir,
    /// Whether drivers are told of it (only on unix:// front doors: a tcp
    /// driver may be on another host).
    pub drivers: bool,
}

/// The next item of `rx`, if there is a channel; never otherwise.
async fn recv_some<T>(rx: &mut Option<mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What the dashboard asks next, if it is on; never otherwise.
async fn recv_asked(rx: &mut Option<mpsc::Receiver<Ask>>) -> Option<Ask> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next tick of `interval`, if there is one; never otherwise.
async fn next_tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// At most this many events already queued are taken before a timer tick.
const DRAIN_BEFORE_TICK: usize = 4096;

/// Why the head node stopped other than by stop services.
#[derive(Debug, thiserror::Error)]
pub enum HeadNodeError {
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
}

struct Driver {
    outbox: Outbox,
    greeted: bool,
    logs: Option<LogLevel>,
    /// The driver reads shared-memory references (its Hello said so, and
    /// it was told of the directory).
    shared: bool,
    /// Its process id, from its Hello.
    pid: u32,
}

/// Runs the head node until services are stopped: by a driver, or when
/// `stop` becomes true (SIGINT/SIGTERM), or `force_stop` (a second
/// signal). `ready` fires once the expected servers have started and the
/// front door is open.
pub async fn run<T: Transport>(
    mut transport: T,
    mut config: HeadNodeConfig,
    front_door: FrontDoor,
    ready: oneshot::Sender<()>,
    mut stop: watch::Receiver<u32>,
) -> Result<(), HeadNodeError> {
    let clock = WallClock::system();
    let origin = format!("{}:head", config.core.host);
    // The loop never waits to put an item in the syntax check's line: the
    // credit each item holds bounds it (rule 11).
    let (pending_tx, pending_rx) = mpsc::unbounded_channel();
    let (checked_tx, mut checked_rx) = mpsc::channel(CHECKED);
    let checker = tokio::spawn(check_submissions(
        config.python.take(),
        pending_rx,
        checked_tx,
    ));
    let mut node = Node {
        core: HeadCore::new(config.core.clone(), clock),
        clock,
        origin,
        drivers: HashMap::new(),
        log: &config.log,
        ready: false,
        pending: pending_tx,
        checking: HashMap::new(),
        max_frame: config.max_frame,
        shared: config.shared.take(),
        shared_ranks: HashSet::new(),
        request_files: HashMap::new(),
        renamed: HashMap::new(),
        claimed: Vec::new(),
        journal: None,
        recovered: None,
        early: HashMap::new(),
        parked: Vec::new(),
        unparked: HashMap::new(),
        board: None,
    };
    if let Some((journal, recovered)) = config.journal.take() {
        node.journal = Some(journal);
        node.recovered = Some(recovered);
    }
    let now = Instant::now();
    for rank in transport.peers() {
        if rank != 0 {
            node.core
                .add_server(rank, now)
                .expect("transport ranks are valid");
        }
    }
    node.core.start(now);
    let lost_peers_rejoin = transport.lost_peers_rejoin();
    let (driver_tx, mut driver_rx) = mpsc::channel(DRIVER_EVENTS);
    let mut given_up = config.given_up.take();
    let (board, mut asks) = match config.dashboard.take() {
        Some((board, asks)) => (Some(board), Some(asks)),
        None => (None, None),
    };
    node.board = board;
    let mut dashboard_ticks = node.board.as_ref().map(|_| {
        let mut every = tokio::time::interval(DASHBOARD_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every
    });
    let mut dashboard_round = 0u64;
    let mut front_door = Some(front_door);
    let mut ready = Some(ready);
    let mut serving = None;
    let result = loop {
        if ready.is_some() && node.ready {
            // What the journal held is queued again before any driver is
            // let in.
            node.recover();
            if let Some(door) = front_door.take() {
                serving = Some(door.serve(driver_tx.clone(), Arc::from(node.origin.as_str())));
            }
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
        }
        let deadline = node
            .core
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            event = transport.recv() => {
                let lost = match &event {
                    Ok(TransportEvent::PeerLost(rank)) if !lost_peers_rejoin => Some(*rank),
                    _ => None,
                };
                if let Err(e) = node.on_transport(event) {
                    break Err(e.into());
                }
                if let Some(rank) = lost {
                    node.core.server_gone_for_good(rank);
                }
            }
            Some(rank) = recv_some(&mut given_up) => node.core.server_gone_for_good(rank),
            Some(ask) = recv_asked(&mut asks) => node.answer_dashboard(ask),
            _ = next_tick(&mut dashboard_ticks) => {
                dashboard_round += 1;
                node.dashboard_tick(dashboard_round % 2 == 0);
            }
            Some(event) = driver_rx.recv() => node.on_driver(event),
            Some(checked) = checked_rx.recv() => node.on_checked(checked),
            _ = tokio::time::sleep_until(deadline.into()) => {
                // This thread may have been busy for seconds (encoding or
                // decoding a message of hundreds of MiB) while the servers'
                // answers queued up: take those first, or their silence
                // would be judged from before they arrived.
                tokio::task::yield_now().await;
                let mut failed = None;
                for _ in 0..DRAIN_BEFORE_TICK {
                    let Some(event) = transport.recv().now_or_never() else {
                        break;
                    };
                    if let Err(e) = node.on_transport(event) {
                        failed = Some(e);
                        break;
                    }
                }
                if let Some(e) = failed {
                    break Err(e.into());
                }
                node.core.tick(Instant::now());
            }
            changed = stop.changed() => {
                let signals = if changed.is_ok() { *stop.borrow_and_update() } else { 2 };
                if signals >= 2 {
                    // Servers told STOP leave when the link closes, rather
                    // than wait to rejoin.
                    node.warn("stopping at once: the servers are told to stop, and exit when they notice the head node is gone");
                    node.core.stop(true);
                    let _ = node.carry_out(&mut transport).await;
                    break Ok(());
                }
                node.core.stop(false);
            }
        }
        node.unpark(Instant::now());
        let stopped = node.carry_out(&mut transport).await?;
        if stopped {
            break Ok(());
        }
    };
    if let Some(task) = serving {
        task.abort();
    }
    drop(node.pending);
    // The syntax check may be waiting to hand over an item: it ends.
    drop(checked_rx);
    // The directory goes with everything in it, before the transport's
    // shutdown (which under MPI may be cut short).
    drop(node.shared.take());
    let _ = checker.await;
    let _ = transport.shutdown().await;
    result
}

struct Node<'a> {
    core: HeadCore,
    clock: WallClock,
    origin: String,
    drivers: HashMap<DriverId, Driver>,
    log: &'a LogSink,
    /// The core said the cluster is ready: the front door opens.
    ready: bool,
    pending: mpsc::UnboundedSender<Pending>,
    /// Items each driver has in the syntax check's line.
    checking: HashMap<DriverId, usize>,
    max_frame: usize,
    shared: Option<SharedConfig>,
    /// The servers whose START answer said they can use the directory.
    shared_ranks: HashSet<Rank>,
    /// The shared-memory files each pending request's parameters
    /// reference: unlinked when its response is delivered (the worker has
    /// unlinked them already when it decoded them; when it never did, they
    /// would be left behind).
    request_files: HashMap<u64, Vec<String>>,
    /// The requests of a list target but the first: the names their
    /// parameters' files have for them (from, to), applied when each is
    /// sent.
    renamed: HashMap<u64, Vec<(String, String)>>,
    /// Deliveries a claim found answered, sent after the claim's reply.
    claimed: Vec<(DriverId, Envelope)>,
    /// The journal (rule 33): what is accepted and answered is written
    /// there before acknowledgements and deliveries go out.
    journal: Option<Journal>,
    /// What the journal held, until it is queued again.
    recovered: Option<Recovered>,
    /// Answers to requests the journal holds, from servers that ran them
    /// for the head node before and rejoined before they were queued
    /// again: they count (rule 33).
    early: HashMap<RequestId, (Rank, CommandResponse)>,
    /// Requests the journal held for a rank not (yet) in the cluster, until
    /// when they wait for a server of that rank to rejoin.
    /// Each with the driver that claimed it, if one did.
    parked: Vec<(Instant, RequestId, SubmitRequest, DriverId)>,
    /// Requests the journal held, queued again for their rank, with the
    /// end of their wait: a server that rejoins may flap (a first link
    /// that fails at once, then another), and until then a loss of its
    /// rank parks them again rather than ending them.
    unparked: HashMap<RequestId, (Instant, SubmitRequest)>,
    /// What the dashboard shows, when it is on.
    board: Option<Board>,
}

impl Node<'_> {
    /// Takes one event from the transport; an error ends the head node.
    fn on_transport(
        &mut self,
        event: Result<TransportEvent, TransportError>,
    ) -> Result<(), TransportError> {
        let now = Instant::now();
        match event? {
            TransportEvent::Message { from, envelope } => {
                if let Some(Body::ControlResponse(response)) = &envelope.body {
                    if response.shared_memory && self.shared.is_some() {
                        self.shared_ranks.insert(from);
                    }
                }
                // A server that rejoined answers a request the journal
                // holds before it is queued again: kept for recover().
                let early = match (&self.recovered, &envelope.body) {
                    (Some(recovered), Some(Body::CommandResponse(response)))
                        if recovered.pending.iter().any(|a| a.id == response.id) =>
                    {
                        self.early.insert(response.id, (from, (**response).clone()));
                        true
                    }
                    _ => false,
                };
                if let Err(e) = self.core.handle(from, envelope, now) {
                    if !early {
                        self.warn(&format!("dropped a message: {e}"));
                    }
                }
            }
            TransportEvent::PeerJoined(rank) => {
                if let Err(e) = self.core.add_server(rank, now) {
                    self.warn(&e.to_string());
                }
            }
            TransportEvent::PeerLost(rank) => {
                self.shared_ranks.remove(&rank);
                self.core.server_lost(rank);
            }
        }
        Ok(())
    }

    /// Carries out the core's actions; true once services are stopped.
    async fn carry_out<T: Transport>(&mut self, transport: &mut T) -> Result<bool, HeadNodeError> {
        let mut stopped = false;
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Send { to, mut envelope } => {
                    let request = match &envelope.body {
                        Some(Body::CommandRequest(r)) => Some(r.id),
                        _ => None,
                    };
                    if let (Some(id), Some(Body::CommandRequest(r))) = (request, &mut envelope.body)
                    {
                        if let Some(renames) = self.renamed.remove(&id) {
                            for value in r.parameters.iter_mut().filter_map(|p| p.value.as_mut()) {
                                shm::rename(value, &renames);
                            }
                        }
                    }
                    if let Err(e) = self.inline_for(to, &mut envelope) {
                        if let Some(id) = request {
                            self.core
                                .send_failed(id, FailureKind::NotSent, &e.to_string());
                        }
                        continue;
                    }
                    match transport.send(to, envelope).await {
                        Ok(()) => {}
                        Err(
                            TransportError::UnknownRank(rank) | TransportError::Disconnected(rank),
                        ) => {
                            self.core.server_lost(rank);
                        }
                        // Too large to send: the request fails, the
                        // cluster goes on.
                        Err(TransportError::Frame(e)) => match request {
                            Some(id) => {
                                self.core
                                    .send_failed(id, FailureKind::TooLarge, &e.to_string());
                            }
                            None => self.warn(&format!("could not send to server n# {to}: {e}")),
                        },
                        Err(e) => return Err(e.into()),
                    }
                }
                Action::Deliver {
                    driver,
                    mut delivery,
                } => {
                    if self.park_again(driver, &delivery) {
                        continue;
                    }
                    if let Some(response) = &delivery.response {
                        self.journal_write(|journal| journal.answered(response));
                        if let Some(board) = &mut self.board {
                            board.answered(response, delivery.replaces_timeout);
                        }
                    }
                    self.release_files(&mut delivery, driver);
                    if self.drivers.contains_key(&driver) {
                        let envelope = Envelope::new(Body::ResponseDelivery(delivery));
                        let envelope = self.deliverable(envelope);
                        if let Some(d) = self.drivers.get(&driver) {
                            d.outbox.reply(envelope);
                        }
                    }
                }
                Action::Forward(record) => self.record(record),
                Action::Event(event) => {
                    if event == casa_node_protocol::Event::AllServersStarted {
                        self.ready = true;
                    }
                    let record = LogRecord {
                        time: self.clock.epoch(Instant::now()),
                        level: event.level().into(),
                        origin: self.origin.clone(),
                        rank: 0,
                        message: event.to_string(),
                    };
                    self.record(record);
                }
                Action::Stopped => stopped = true,
            }
        }
        Ok(stopped)
    }

    /// Puts inline the shared-memory references of a request for server
    /// `to` when `to` cannot read the directory.
    fn inline_for(&self, to: Rank, envelope: &mut Envelope) -> Result<(), shm::ShmError> {
        let (Some(shared), Some(Body::CommandRequest(request))) =
            (&self.shared, &mut envelope.body)
        else {
            return Ok(());
        };
        if self.shared_ranks.contains(&to) {
            return Ok(());
        }
        for value in request
            .parameters
            .iter_mut()
            .filter_map(|p| p.value.as_mut())
        {
            shm::inline(shared.dir.path(), value)?;
        }
        Ok(())
    }

    /// Before a response goes to `driver`: unlinks the files its request's
    /// parameters referenced (gone already when the worker read them), and
    /// the files of its return value when the driver is gone; puts the
    /// return value inline for a driver that does not read references.
    fn release_files(
        &mut self,
        delivery: &mut casa_node_protocol::pb::ResponseDelivery,
        driver: DriverId,
    ) {
        let Some(shared) = &self.shared else {
            return;
        };
        let Some(response) = delivery.response.as_mut() else {
            return;
        };
        self.renamed.remove(&response.id);
        for name in self.request_files.remove(&response.id).unwrap_or_default() {
            shm::unlink(shared.dir.path(), &name);
        }
        let Some(ret) = response.ret.as_mut() else {
            return;
        };
        match self.drivers.get(&driver) {
            Some(d) if d.shared => {}
            Some(_) => {
                if let Err(e) = shm::inline(shared.dir.path(), ret) {
                    let why = format!("casa-node: the return value could not be read: {e}");
                    shm::for_each_shared(ret, &mut |s| shm::unlink(shared.dir.path(), &s.name));
                    response.ret = Some(casa_node_protocol::pb::Value::none());
                    if response.successful {
                        response.failure = FailureKind::NotSent.into();
                    }
                    response.successful = false;
                    response.traceback = Some(match response.traceback.take() {
                        Some(traceback) => format!("{why}\n{traceback}"),
                        None => why,
                    });
                }
            }
            None => shm::for_each_shared(ret, &mut |s| shm::unlink(shared.dir.path(), &s.name)),
        }
    }

    /// `envelope`, or, for a response record too large for the front door,
    /// the record without its return value and parameters, failed, saying
    /// why (the front door would otherwise drop it, and the driver wait).
    fn deliverable(&mut self, mut envelope: Envelope) -> Envelope {
        let size = envelope.encoded_len();
        if size <= self.max_frame {
            return envelope;
        }
        let Some(Body::ResponseDelivery(delivery)) = &mut envelope.body else {
            return envelope;
        };
        let Some(response) = delivery.response.as_mut() else {
            return envelope;
        };
        let ret = response.ret.as_ref().map_or(0, |v| v.encoded_len());
        let parameters: usize = response.parameters.iter().map(|p| p.encoded_len()).sum();
        let why = format!(
            "casa-node: the response to request {} ({size} bytes: {ret} of return value, \
             {parameters} of parameters) exceeds the largest frame a driver is sent \
             ({} bytes), so neither its return value nor its parameters are delivered",
            response.id, self.max_frame
        );
        *response = response.too_large(&why);
        self.warn(&why);
        envelope
    }

    /// Answers the dashboard's HTTP side.
    fn answer_dashboard(&mut self, ask: Ask) {
        let Some(board) = &mut self.board else {
            return;
        };
        match ask {
            Ask::Snapshot(reply) => {
                let status = self.core.status(None).unwrap_or_default();
                let _ = reply.send(board.snapshot(&status, self.log));
            }
            Ask::Record(id, reply) => {
                let _ = reply.send(board.detail(id));
            }
            Ask::Metrics(reply) => {
                let status = self.core.status(None).unwrap_or_default();
                let _ = reply.send(board.metrics(&status));
            }
        }
    }

    /// Updates the dashboard's pages, and with `sample` its progress chart.
    fn dashboard_tick(&mut self, sample: bool) {
        if let Some(board) = &mut self.board {
            let status = self.core.status(None).unwrap_or_default();
            board.tick(&status, self.log, self.drivers.len(), sample);
        }
    }

    fn record(&mut self, record: LogRecord) {
        self.log.write(&record);
        for driver in self.drivers.values() {
            if driver.logs.is_some_and(|min| record.level() >= min) {
                driver.outbox.log(record.clone());
            }
        }
    }

    fn warn(&mut self, message: &str) {
        let record = LogRecord {
            time: self.clock.epoch(Instant::now()),
            level: LogLevel::Warning.into(),
            origin: self.origin.clone(),
            rank: 0,
            message: message.to_owned(),
        };
        self.record(record);
    }

    fn on_driver(&mut self, event: DriverEvent) {
        match event {
            DriverEvent::Connected { driver, outbox } => {
                self.drivers.insert(
                    driver,
                    Driver {
                        outbox,
                        greeted: false,
                        logs: None,
                        shared: false,
                        pid: 0,
                    },
                );
            }
            DriverEvent::Disconnected { driver } => {
                if let Some(d) = self.drivers.remove(&driver) {
                    // Values it was writing when it went.
                    if let (true, Some(shared)) = (d.shared, &self.shared) {
                        shm::sweep_tmp(shared.dir.path(), d.pid);
                    }
                }
                self.in_line(driver, 0, Item::Gone, None);
            }
            DriverEvent::Refused { message } => self.warn(&message),
            DriverEvent::Request {
                driver,
                envelope,
                credit,
            } => {
                let correlation = envelope.correlation;
                if let Some((reply, close)) = self.answer(driver, envelope, credit) {
                    self.reply(driver, correlation, reply, close);
                }
            }
        }
    }

    fn reply(&mut self, driver: DriverId, correlation: u64, reply: Body, close: bool) {
        if let Some(d) = self.drivers.get(&driver) {
            d.outbox.reply(Envelope::correlated(correlation, reply));
            // A claim's reply is sent as soon as it is made: what it found
            // answered is this driver's.
            for (to, delivery) in std::mem::take(&mut self.claimed) {
                if to == driver {
                    d.outbox.reply(delivery);
                }
            }
        }
        if close {
            // Dropping the outbox closes the connection once the
            // refusal is written.
            self.drivers.remove(&driver);
        }
    }

    /// Puts an item in the driver's line through the syntax check, with
    /// the credit of the request it comes from.
    fn in_line(&mut self, driver: DriverId, correlation: u64, item: Item, credit: Option<Credit>) {
        *self.checking.entry(driver).or_default() += 1;
        let _ = self.pending.send(Pending {
            driver,
            correlation,
            item,
            credit,
        });
    }

    /// The reply to one driver request, and whether to close the
    /// connection after it. A request put in the syntax check's line takes
    /// its credit along; any other's is given back once answered.
    fn answer(
        &mut self,
        driver: DriverId,
        envelope: Envelope,
        credit: Credit,
    ) -> Option<(Body, bool)> {
        let greeted = self.drivers.get(&driver)?.greeted;
        if !greeted {
            return Some(self.greet(driver, envelope));
        }
        let correlation = envelope.correlation;
        let body = envelope.body?;
        if let Err(error) = check_version(envelope.protocol_version, 0) {
            return Some((error.body?, true));
        }
        match body {
            Body::SubmitRequest(request) => {
                // Answered once checked (rule 2), in on_checked.
                self.in_line(
                    driver,
                    correlation,
                    Item::Submit(*request, None),
                    Some(credit),
                );
                None
            }
            Body::IdLeaseRequest(_) => Some((self.serve(driver, body), false)),
            body if self.checking.contains_key(&driver) => {
                self.in_line(driver, correlation, Item::Deferred(body), Some(credit));
                None
            }
            body => Some((self.serve(driver, body), false)),
        }
    }

    /// The reply to a greeted driver's request other than a submission.
    fn serve(&mut self, driver: DriverId, body: Body) -> Body {
        let now = Instant::now();
        match body {
            Body::IdLeaseRequest(request) => match self.core.lease(driver, request.count) {
                Ok(lease) => {
                    let next = self.core.next_id();
                    self.journal_write(|journal| journal.reserve(next));
                    Body::IdLease(lease)
                }
                Err(e) => error_body(ProtocolErrorCode::UnexpectedMessage, e.to_string()),
            },
            Body::StatusRequest(request) => match self.core.status(request.server) {
                Ok(reply) => Body::StatusReply(Box::new(reply)),
                Err(e) => error_body(ProtocolErrorCode::UnknownRank, e.to_string()),
            },
            Body::TrackRequest(request) => Body::TrackReply(self.core.track(&request.ids)),
            Body::ClaimRequest(request) => Body::ClaimReply(self.claim(driver, &request.ids)),
            Body::CancelRequest(request) => Body::CancelReply(self.core.cancel(&request.ids)),
            Body::StopRequest(request) => {
                self.core.stop(request.force);
                acked()
            }
            Body::DebuggingModeRequest(request) => {
                self.core.set_debugging(request.enabled, now);
                acked()
            }
            Body::LogLevelRequest(request) => {
                let result = self.core.set_log_level(request.level(), &request.servers);
                ack(result)
            }
            Body::LogSubscription(request) => {
                if let Some(d) = self.drivers.get_mut(&driver) {
                    d.logs = request.enabled.then(|| match request.min_level() {
                        LogLevel::Unspecified => LogLevel::Info,
                        level => level,
                    });
                }
                acked()
            }
            other => error_body(
                ProtocolErrorCode::UnexpectedMessage,
                format!("a driver may not send {}", other.name()),
            ),
        }
    }

    /// Submits a checked request, or rejects it, and answers the driver:
    /// with a SubmitReply, or for a pipelined submission only with a
    /// ProtocolError when its ids break the lease rules (the core delivers
    /// its rejection as failure records).
    fn on_checked(&mut self, checked: Checked) {
        let driver = checked.driver;
        if let Some(n) = self.checking.get_mut(&driver) {
            *n -= 1;
            if *n == 0 {
                self.checking.remove(&driver);
            }
        }
        let (request, error) = match checked.item {
            Item::Submit(request, error) => (request, error),
            Item::Deferred(body) => {
                let reply = self.serve(driver, body);
                self.reply(driver, checked.correlation, reply, false);
                return;
            }
            Item::Gone => {
                self.core.driver_gone(driver);
                return;
            }
        };
        let files = match &self.shared {
            Some(_) => shm::parameter_names(&request.parameters),
            None => Vec::new(),
        };
        let pipelined = request.pipelined;
        let journaled = self.journal.is_some().then(|| request.clone());
        let result = match error {
            None => self.core.submit(driver, request),
            Some(error) => {
                let rejection = Rejection {
                    reason: RejectReason::InvalidCommand,
                    message: format!(
                        "the command is neither an expression nor statements: {error}"
                    ),
                };
                Err(self.core.refuse(driver, request, rejection))
            }
        };
        if let (Ok(ids), Some(board)) = (&result, &mut self.board) {
            board.submitted(ids.len() as u64);
        }
        if let (Ok(ids), Some(request)) = (&result, journaled) {
            self.journal_accepted(ids, request);
        }
        match (&result, &self.shared) {
            (Ok(ids), Some(shared)) if !files.is_empty() => {
                // The first request maps the driver's files; each other
                // one gets names of its own for the same bytes.
                let directory = shared.dir.path().to_owned();
                for (n, &id) in ids.iter().enumerate() {
                    if n == 0 {
                        self.request_files.insert(id, files.clone());
                        continue;
                    }
                    let mut renames = Vec::with_capacity(files.len());
                    for name in &files {
                        match shm::link_for(&directory, name, id) {
                            Ok(linked) => renames.push((name.clone(), linked)),
                            // The request's worker is told the file is
                            // missing; the others run.
                            Err(e) => self.warn(&format!("request {id}: {e}")),
                        }
                    }
                    self.request_files
                        .insert(id, renames.iter().map(|(_, to)| to.clone()).collect());
                    self.renamed.insert(id, renames);
                }
            }
            (Err(_), Some(shared)) => {
                for name in &files {
                    shm::unlink(shared.dir.path(), name);
                }
            }
            _ => {}
        }
        let reply = match result {
            Ok(_) if pipelined => return,
            Err(SubmitError::Rejected(_)) if pipelined => return,
            Ok(ids) => Body::SubmitReply(SubmitReply {
                outcome: Some(submit_reply::Outcome::Accepted(submit_reply::Accepted {
                    ids,
                })),
            }),
            Err(SubmitError::Rejected(rejection)) => Body::SubmitReply(SubmitReply {
                outcome: Some(submit_reply::Outcome::Rejected(submit_reply::Rejected {
                    reason: rejection.reason.into(),
                    message: rejection.message,
                })),
            }),
            Err(SubmitError::Lease(e)) => error_body(ProtocolErrorCode::IdNotLeased, e.to_string()),
        };
        self.reply(driver, checked.correlation, reply, false);
    }

    /// Writes to the journal, if there is one. A journal that cannot be
    /// written (a full or failed disk) is given up, loudly: the head
    /// node goes on serving without it rather than refuse all work.
    fn journal_write(&mut self, write: impl FnOnce(&mut Journal) -> std::io::Result<()>) {
        let Some(journal) = self.journal.as_mut() else {
            return;
        };
        if let Err(e) = write(journal) {
            let message = format!(
                "the journal {} could not be written ({e}): the head node goes on without it, and what it accepts from now on is lost if it dies",
                journal.path().display()
            );
            self.journal = None;
            self.record(LogRecord {
                time: self.clock.epoch(Instant::now()),
                level: LogLevel::Error.into(),
                origin: self.origin.clone(),
                rank: 0,
                message,
            });
        }
    }

    /// Journals the requests `ids` of an accepted `request`, before the
    /// driver is told: each with its own target.
    fn journal_accepted(&mut self, ids: &[RequestId], mut request: SubmitRequest) {
        let next = self.core.next_id();
        let targets = std::mem::take(&mut request.targets);
        request.ids.clear();
        request.pipelined = false;
        self.journal_write(|journal| {
            journal.reserve(next)?;
            for (n, &id) in ids.iter().enumerate() {
                let mut one = request.clone();
                one.targets = targets.get(n).copied().into_iter().collect();
                journal.accepted(id, one)?;
            }
            Ok(())
        });
    }

    /// Deliveries of `ids` go to `driver` from now on (rule 33): those
    /// answered (kept in the journal) right after the reply, the others
    /// when they are answered.
    fn claim(&mut self, driver: DriverId, ids: &[RequestId]) -> ClaimReply {
        let mut pending: HashSet<RequestId> = self.core.claim(driver, ids).into_iter().collect();
        for (_, id, _, claimer) in &mut self.parked {
            if ids.contains(id) {
                *claimer = driver;
                pending.insert(*id);
            }
        }
        let mut reply = ClaimReply::default();
        for &id in ids {
            if pending.contains(&id) {
                reply.pending.push(id);
                continue;
            }
            match self.journal.as_ref().and_then(|j| j.response(id)) {
                Some(response) => {
                    reply.answered.push(id);
                    let delivery = ResponseDelivery {
                        response: Some(response.clone()),
                        replaces_timeout: false,
                        rejected: None,
                    };
                    let envelope =
                        self.deliverable(Envelope::new(Body::ResponseDelivery(Box::new(delivery))));
                    self.claimed.push((driver, envelope));
                }
                None => reply.unknown.push(id),
            }
        }
        reply
    }

    /// Queues again what the journal held (rule 33): requests accepted and
    /// not answered run again, but those submitted with `no_retry`, which
    /// end with a failure naming the restart; ids go on from where the
    /// last head node may have got to.
    fn recover(&mut self) {
        let Some(recovered) = self.recovered.take() else {
            return;
        };
        let Some(path) = self
            .journal
            .as_ref()
            .map(|j| j.path().display().to_string())
        else {
            return;
        };
        if recovered.dropped_bytes > 0 {
            self.warn(&format!(
                "journal {path}: {} bytes after the last whole record dropped (the head node before this one died while writing)",
                recovered.dropped_bytes
            ));
        }
        self.core.continue_ids_from(recovered.next_id);
        let (mut not_again, mut rejoined) = (0, 0);
        // A server attached by hand may rejoin in a moment: requests for
        // its rank wait for it, as long as the timeout, or 10 s.
        let until = Instant::now() + self.core.timeout().max(Duration::from_secs(10));
        for accepted in recovered.pending {
            let id = accepted.id;
            let request = accepted.request.unwrap_or_default();
            if let Some((server, answer)) = self.early.remove(&id) {
                rejoined += 1;
                let mode = request.mode();
                let response =
                    response_record(request.command, mode, request.parameters, server, answer);
                self.journal_write(|journal| journal.answered(&response));
            } else if request.no_retry {
                not_again += 1;
                self.end_recovered(id, request, "it was submitted with retry=False, so it is not run again (it may have run, in part or whole, before the restart)".to_owned(), RECOVERED);
            } else {
                self.parked.push((until, id, request, RECOVERED));
            }
        }
        let waiting = self.parked.len();
        self.unpark(Instant::now());
        let parked = self.parked.len();
        let again = waiting - parked;
        let message = if recovered.created {
            format!("journal {path}: new")
        } else {
            format!(
                "journal {path}: {again} requests accepted before the restart queued again, {parked} waiting for their server to rejoin, {rejoined} answered by servers that rejoined, {not_again} not run again (retry=False); {} responses kept; ids go on from {}",
                recovered.answered, recovered.next_id
            )
        };
        let record = LogRecord {
            time: self.clock.epoch(Instant::now()),
            level: LogLevel::Info.into(),
            origin: self.origin.clone(),
            rank: 0,
            message,
        };
        self.record(record);
    }

    /// Queues the requests the journal held (rule 33); those whose server
    /// is not (yet) there wait for it to rejoin, and those still without it
    /// by their time, or refused for another reason, end with a failure
    /// saying so.
    fn unpark(&mut self, now: Instant) {
        if self.parked.is_empty() {
            return;
        }
        for (until, id, request, driver) in std::mem::take(&mut self.parked) {
            match self.core.resubmit(driver, id, request.clone()) {
                Ok(()) => {
                    if !request.targets.is_empty() {
                        self.unparked.insert(id, (until, request));
                    }
                }
                Err(rejection)
                    if now < until
                        && matches!(
                            rejection.reason,
                            RejectReason::UnknownTarget | RejectReason::TargetTimedOut
                        ) =>
                {
                    self.parked.push((until, id, request, driver));
                }
                Err(rejection) => {
                    let why = format!("it could not be queued again: {}", rejection.message);
                    self.end_recovered(id, request, why, driver);
                }
            }
        }
    }

    /// Parks again a request the journal held whose server was lost before
    /// answering, while its wait lasts (see `unparked`); true if it did.
    fn park_again(&mut self, driver: DriverId, delivery: &ResponseDelivery) -> bool {
        let Some(response) = &delivery.response else {
            return false;
        };
        let Some((until, request)) = self.unparked.remove(&response.id) else {
            return false;
        };
        // Lost, not timed out: a timed-out server's real answer may still
        // replace the record, and the core holds the request for it.
        let lost = response.failure() == FailureKind::ServerLost
            && !delivery.replaces_timeout
            && !self.core.holds(response.id);
        if !lost || Instant::now() >= until {
            return false;
        }
        self.warn(&format!(
            "Command request with id {} from the journal waits again for server n# {}, which left before answering",
            response.id,
            request.targets.first().copied().unwrap_or_default()
        ));
        self.parked.push((until, response.id, request, driver));
        true
    }

    /// Ends a request the journal held, without running it, saying `why`;
    /// `driver`, if connected, gets the answer.
    fn end_recovered(
        &mut self,
        id: RequestId,
        request: SubmitRequest,
        why: String,
        driver: DriverId,
    ) {
        let response = CommandResponse {
            id,
            command: request.command,
            mode: request.mode,
            parameters: request.parameters,
            ret: Some(casa_node_protocol::pb::Value::none()),
            server: 0,
            status: CommandStatus::Cancelled.into(),
            successful: false,
            traceback: Some(format!(
                "casa-node: the head node restarted from its journal while this request was pending; {why}"
            )),
            failure: FailureKind::Restarted.into(),
            ..CommandResponse::default()
        };
        self.journal_write(|journal| journal.answered(&response));
        if self.drivers.contains_key(&driver) {
            let delivery = ResponseDelivery {
                response: Some(response),
                replaces_timeout: false,
                rejected: None,
            };
            let envelope =
                self.deliverable(Envelope::new(Body::ResponseDelivery(Box::new(delivery))));
            if let Some(d) = self.drivers.get(&driver) {
                d.outbox.reply(envelope);
            }
        }
    }

    /// Answers the first message of a connection: it must be a driver's
    /// `Hello` of this protocol version; anything else is refused and the
    /// connection closed.
    fn greet(&mut self, driver: DriverId, envelope: Envelope) -> (Body, bool) {
        let told = self.shared.as_ref().filter(|s| s.drivers);
        let hello = match check_hello(envelope, Role::Driver, "the front door") {
            Ok(hello) => hello,
            Err(refusal) => {
                let refusal = refusal.body.unwrap_or_else(|| {
                    error_body(ProtocolErrorCode::Malformed, "refused".to_owned())
                });
                return (refusal, true);
            }
        };
        let reads_shared = (hello.shared_memory && told.is_some(), hello.pid);
        if let Some(d) = self.drivers.get_mut(&driver) {
            d.greeted = true;
            (d.shared, d.pid) = reads_shared;
        }
        let welcome = Body::Welcome(Box::new(Welcome {
            protocol_version: PROTOCOL_VERSION,
            role: Role::HeadNode.into(),
            software: format!("casa-node {}", env!("CARGO_PKG_VERSION")),
            rank: 0,
            cluster: Some(self.core.cluster_info()),
            shared_memory_directory: told
                .map(|s| s.dir.path().display().to_string())
                .unwrap_or_default(),
            shared_memory_tag: told.map(|s| s.dir.tag().to_owned()).unwrap_or_default(),
        }));
        (welcome, false)
    }
}

fn error_body(code: ProtocolErrorCode, message: String) -> Body {
    Envelope::error(0, code, message)
        .body
        .expect("error envelopes carry a body")
}

/// An `Ack` of an order carried out.
fn acked() -> Body {
    ack(Ok::<(), std::convert::Infallible>(()))
}

/// An `Ack` of `result`: carried out, or why not.
fn ack<E: std::fmt::Display>(result: Result<(), E>) -> Body {
    match result {
        Ok(()) => Body::Ack(Ack {
            ok: true,
            error: String::new(),
        }),
        Err(error) => Body::Ack(Ack {
            ok: false,
            error: error.to_string(),
        }),
    }
}
