//! Fault injection: real clusters (`casa-node up` over ZeroMQ, or an
//! `mpirun` job when CASA_NODE_TEST_TRANSPORT=mpi) with real Python
//! workers run a stream of a few hundred commands (short and slightly
//! longer, targeted and not, blocking and not) while faults strike at
//! random moments: server nodes and workers killed or stopped and
//! continued, commands that crash their worker, exhaust a memory limit or
//! block forever, drivers killed mid-wait, the head node killed; and,
//! as root, a cluster spread over two network namespaces the test creates,
//! whose link is cut for longer than the timeout and restored mid-stream.
//!
//! After every scenario the suite checks that
//!
//! - every accepted request got exactly one final response (success,
//!   failure, timeout or cancelled), counted per id as the front door
//!   delivered them, plus at most one replacement of a timeout record
//!   (rules 11, 21); a successful response carries the value its own
//!   command computes;
//! - nothing hangs: every wait has a deadline, and a request still
//!   unanswered then fails the scenario, naming it;
//! - the cluster still serves a `1+1` where a server survives;
//! - no process is left behind: every process ever seen in the cluster's
//!   tree (head node, server nodes, workers, including workers started
//!   after a fault) is gone once the cluster has stopped (rule 30).
//!
//! Each scenario prints one summary line (on standard error, captured or
//! not): requests, faults injected, what came back, elapsed time, and the
//! seed; CASA_NODE_FAULT_SEED=SEED replays a scenario's schedule. Every
//! process a scenario starts is stopped by PID when it ends, passed or
//! failed.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use casa_node::connection_file::ConnectionFile;
use casa_node_conformance::cluster::{self, EXIT_BOUND, Launch, Transport, WAIT as HANG, over_mpi};
use casa_node_conformance::driver::{self, RawDriver};
use casa_node_conformance::process::{self, ChildGuard, ProcessSet, children};
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{
    CancelReply, CancelRequest, ClaimReply, ClaimRequest, CommandStatus, Envelope, Parameter,
    RejectReason, ServerStatus, StatusReply, StatusRequest, StopRequest, SubmitRequest, TrackReply,
    TrackRequest, Value, submit_reply,
};
use casa_node_protocol::{Framing, Rank, RequestId};
use common::BIN;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use proptest::prelude::Rng;
use proptest::test_runner::{RngAlgorithm, TestRng};

fn transport_name() -> &'static str {
    Transport::from_env().name()
}

/// The seed of a scenario's schedule: CASA_NODE_FAULT_SEED, else a fresh
/// one.
fn seed() -> u64 {
    if let Ok(text) = std::env::var("CASA_NODE_FAULT_SEED") {
        return text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CASA_NODE_FAULT_SEED={text:?} is not a number"));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mixed = (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32);
    mixed ^ NEXT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Starts scenario `name`: its seed, said at once so that a failing run
/// can be replayed, and its start time.
fn begin(name: &str) -> (u64, Instant) {
    let seed = seed();
    eprintln!(
        "fault scenario {name} over {}: CASA_NODE_FAULT_SEED={seed} replays its schedule",
        transport_name()
    );
    (seed, Instant::now())
}

/// A reproducible generator for `seed`, one per thread of a scenario.
fn rng(seed: u64, stream: u8) -> TestRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8] = stream;
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// Sleeps `total` in short steps, returning early (false) once `stop` is
/// set. This is the fault schedule's pause, not a synchronisation.
fn pause(total: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + total;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10).min(end - Instant::now()));
    }
    !stop.load(Ordering::Relaxed)
}

fn millis(rng: &mut TestRng, range: std::ops::Range<u64>) -> Duration {
    Duration::from_millis(rng.random_range(range))
}

// ---------------------------------------------------------------------
// The cluster

/// A running cluster (the harness's [`cluster::Cluster`]: every process
/// seen in its tree is stopped by PID on drop), with what the suite knows
/// of it.
struct Cluster {
    run: cluster::Cluster,
    /// Server ranks and their server nodes' PIDs.
    servers: Vec<(Rank, Pid)>,
    /// The head node: `up` itself, or rank 0 of the MPI job.
    head_node: Pid,
}

impl Deref for Cluster {
    type Target = cluster::Cluster;

    fn deref(&self) -> &cluster::Cluster {
        &self.run
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut cluster::Cluster {
        &mut self.run
    }
}

impl Cluster {
    /// `servers` server nodes with a heartbeat of 0.2 s and a timeout of
    /// 3 s, as the end-to-end tests use.
    fn start(servers: usize) -> Cluster {
        Cluster::start_with(servers, &[])
    }

    /// As [`start`](Self::start), with more options for `up`.
    fn start_with(servers: usize, extra: &[&str]) -> Cluster {
        let run = Launch::new(BIN, servers).args(extra).start();
        let status = Driver::connect(&run.socket()).status();
        let listed: Vec<(Rank, Pid)> = status
            .servers
            .iter()
            .map(|s| (s.rank, Pid::from_raw(s.pid as i32)))
            .collect();
        assert_eq!(listed.len(), servers, "{status:?}");
        run.note_tree();
        let pids: Vec<Pid> = listed.iter().map(|&(_, pid)| pid).collect();
        let head_node = run.head_node(&pids);
        Cluster {
            run,
            servers: listed,
            head_node,
        }
    }

    fn driver(&self) -> Driver {
        Driver::connect(&self.socket())
    }

    fn ranks(&self) -> Vec<Rank> {
        self.servers.iter().map(|&(r, _)| r).collect()
    }

    /// Stops services through `driver` and checks that the cluster ends
    /// and leaves no process behind (rules 27, 30).
    fn stop(&mut self, driver: &Driver) {
        self.note_tree();
        // Nothing may stay stopped: a stopped process cannot exit.
        self.procs().signal_all(Signal::SIGCONT);
        driver.stop();
        self.assert_ends(HANG);
    }
}

// ---------------------------------------------------------------------
// A driver that counts what the front door delivers

/// One `ResponseDelivery`, as it arrived.
#[derive(Debug, Clone)]
struct Delivery {
    status: CommandStatus,
    successful: bool,
    replaces_timeout: bool,
    ret: Option<Value>,
    traceback: String,
    worker_restarted: bool,
    server: Rank,
}

#[derive(Default)]
struct DriverState {
    replies: HashMap<u64, Body>,
    /// Every delivery, per request id, in arrival order: duplicates are
    /// kept, to be counted.
    deliveries: BTreeMap<RequestId, Vec<Delivery>>,
    closed: bool,
}

struct DriverShared {
    state: Mutex<DriverState>,
    changed: Condvar,
}

/// The driver's state, also after a failed check panicked while holding
/// it: the reader thread goes on, and the failure stays the one reported.
fn lock(shared: &DriverShared) -> std::sync::MutexGuard<'_, DriverState> {
    shared
        .state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A driver speaking the driver plane itself over the front door's Unix
/// socket (or a `tcp://` one over TLS), so that every response the head
/// node sends is seen and counted (the Rust client keeps one record per
/// id, which would hide a duplicate).
struct Driver {
    link: Link,
    shared: Arc<DriverShared>,
    correlation: AtomicU64,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// How a [`Driver`]'s messages reach the front door.
enum Link {
    /// Written straight to the front door's Unix socket.
    Unix(Mutex<RawDriver>),
    /// Handed to the thread that owns the TLS connection to a `tcp://`
    /// front door; `None` once the driver is dropped, which ends it.
    Tls(Mutex<Option<tokio::sync::mpsc::UnboundedSender<Envelope>>>),
}

/// Why a wait for responses ended without them.
#[derive(Debug)]
enum WaitError {
    /// The connection closed (the head node is gone).
    Closed,
}

/// The software the suite's drivers name in their `Hello`.
const SOFTWARE: &str = "casa-node fault suite";

/// Files `envelope`, from the front door, in `shared`: every response
/// delivery is counted, and a reply is kept for the call waiting for it.
fn receive(shared: &DriverShared, envelope: Envelope) {
    let mut state = lock(shared);
    match envelope.body {
        Some(Body::ResponseDelivery(delivery)) => {
            let response = delivery.response.expect("a delivery has a response");
            state
                .deliveries
                .entry(response.id)
                .or_default()
                .push(Delivery {
                    status: response.status(),
                    successful: response.successful,
                    replaces_timeout: delivery.replaces_timeout,
                    ret: response.ret.clone(),
                    traceback: response.traceback().to_owned(),
                    worker_restarted: response.worker_restarted,
                    server: response.server,
                });
        }
        Some(Body::LogRecord(_)) | None => return,
        Some(body) => {
            state.replies.insert(envelope.correlation, body);
        }
    }
    drop(state);
    shared.changed.notify_all();
}

/// Marks the connection of `shared` closed.
fn close(shared: &DriverShared) {
    lock(shared).closed = true;
    shared.changed.notify_all();
}

impl Driver {
    fn connect(socket: &Path) -> Driver {
        let mut raw = RawDriver::connect(socket);
        raw.greet(SOFTWARE);
        raw.stream().set_read_timeout(None).unwrap();
        let shared = Arc::new(DriverShared {
            state: Mutex::new(DriverState::default()),
            changed: Condvar::new(),
        });
        let mut reading = raw.try_clone().unwrap();
        let reader_shared = shared.clone();
        let reader = std::thread::spawn(move || {
            while let Ok(Some(envelope)) = reading.read_envelope() {
                receive(&reader_shared, envelope);
            }
            close(&reader_shared);
        });
        Driver {
            link: Link::Unix(Mutex::new(raw)),
            shared,
            correlation: AtomicU64::new(2),
            reader: Some(reader),
        }
    }

    /// A driver of the `tcp://` front door at `address` (`host:port`)
    /// inside the network namespace `netns` (its file, `/run/netns/NAME`),
    /// over TLS with `file`'s certificate and token. Its thread enters the
    /// namespace (setns(2) moves only the calling thread), so the socket it
    /// opens is the namespace's, and owns the connection; the rest of the
    /// test stays where it is.
    fn connect_tls(netns: &Path, address: &str, file: &ConnectionFile) -> Driver {
        let namespace = std::fs::File::open(netns)
            .unwrap_or_else(|e| panic!("the network namespace {}: {e}", netns.display()));
        let config = file
            .client_config()
            .expect("the connection file's certificate");
        let token = file.token().to_owned();
        let address = address.to_owned();
        let shared = Arc::new(DriverShared {
            state: Mutex::new(DriverState::default()),
            changed: Condvar::new(),
        });
        let (outbox, queue) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready) = mpsc::channel();
        let reader_shared = shared.clone();
        let reader = std::thread::spawn(move || {
            match nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET) {
                Ok(()) => {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime for the driver");
                    runtime.block_on(tls_session(
                        address,
                        config,
                        token,
                        queue,
                        ready_tx,
                        &reader_shared,
                    ));
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("setns into the namespace: {e}")));
                }
            }
            close(&reader_shared);
        });
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => panic!("the tcp:// front door did not admit a driver: {why}"),
            Err(_) => panic!("the driver's thread ended before the handshake"),
        }
        Driver {
            link: Link::Tls(Mutex::new(Some(outbox))),
            shared,
            correlation: AtomicU64::new(2),
            reader: Some(reader),
        }
    }

    /// Hands `envelope` on to the front door; false once the connection
    /// is known to be closed.
    fn send(&self, envelope: &Envelope) -> bool {
        match &self.link {
            Link::Unix(writer) => writer.lock().unwrap().write_envelope(envelope).is_ok(),
            Link::Tls(outbox) => outbox
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|outbox| outbox.send(envelope.clone()).is_ok()),
        }
    }

    /// Sends `body` and waits for its reply; a reply that does not come
    /// within [`HANG`] fails the scenario.
    fn call(&self, body: Body) -> Result<Body, WaitError> {
        let correlation = self.correlation.fetch_add(1, Ordering::Relaxed);
        let what = body.name();
        if !self.send(&Envelope::correlated(correlation, body)) {
            return Err(WaitError::Closed);
        }
        let end = Instant::now() + HANG;
        let mut state = lock(&self.shared);
        loop {
            if let Some(reply) = state.replies.remove(&correlation) {
                return Ok(reply);
            }
            if state.closed {
                return Err(WaitError::Closed);
            }
            let now = Instant::now();
            assert!(now < end, "hang: no reply to {what} within {HANG:?}");
            state = self
                .shared
                .changed
                .wait_timeout(state, end - now)
                .unwrap()
                .0;
        }
    }

    /// Submits; the accepted ids, or the rejection's reason.
    fn submit(
        &self,
        request: SubmitRequest,
    ) -> Result<Result<Vec<RequestId>, RejectReason>, WaitError> {
        match self.call(Body::SubmitRequest(Box::new(request)))? {
            Body::SubmitReply(reply) => Ok(match reply.outcome {
                Some(submit_reply::Outcome::Accepted(a)) => Ok(a.ids),
                Some(submit_reply::Outcome::Rejected(r)) => Err(r.reason()),
                None => panic!("an empty SubmitReply"),
            }),
            other => panic!("expected SubmitReply, got {}", other.name()),
        }
    }

    fn cancel(&self, ids: &[RequestId]) -> Result<CancelReply, WaitError> {
        match self.call(Body::CancelRequest(CancelRequest { ids: ids.to_vec() }))? {
            Body::CancelReply(reply) => Ok(reply),
            other => panic!("expected CancelReply, got {}", other.name()),
        }
    }

    fn status(&self) -> StatusReply {
        match self.call(Body::StatusRequest(StatusRequest { server: None })) {
            Ok(Body::StatusReply(reply)) => *reply,
            other => panic!("expected StatusReply, got {other:?}"),
        }
    }

    /// Claims the final responses of `ids` (rule 33).
    fn claim(&self, ids: &[RequestId]) -> ClaimReply {
        match self.call(Body::ClaimRequest(ClaimRequest { ids: ids.to_vec() })) {
            Ok(Body::ClaimReply(reply)) => reply,
            other => panic!("expected ClaimReply, got {other:?}"),
        }
    }

    fn track(&self, ids: &[RequestId]) -> TrackReply {
        match self.call(Body::TrackRequest(TrackRequest { ids: ids.to_vec() })) {
            Ok(Body::TrackReply(reply)) => reply,
            other => panic!("expected TrackReply, got {other:?}"),
        }
    }

    fn stop(&self) {
        match self.call(Body::StopRequest(StopRequest { force: false })) {
            Ok(Body::Ack(ack)) if ack.ok => {}
            other => panic!("stop services was refused: {other:?}"),
        }
    }

    /// Waits until each of `ids` has had its final response; the ones
    /// still unanswered after `limit` fail the scenario as a hang.
    fn wait(&self, ids: &[RequestId], limit: Duration) -> Result<(), WaitError> {
        let end = Instant::now() + limit;
        let mut state = lock(&self.shared);
        loop {
            let missing: Vec<RequestId> = ids
                .iter()
                .copied()
                .filter(|id| {
                    !state
                        .deliveries
                        .get(id)
                        .is_some_and(|d| d.iter().any(|d| !d.replaces_timeout))
                })
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if state.closed {
                return Err(WaitError::Closed);
            }
            let now = Instant::now();
            assert!(
                now < end,
                "hang: requests {missing:?} got no final response within {limit:?}"
            );
            state = self
                .shared
                .changed
                .wait_timeout(state, end - now)
                .unwrap()
                .0;
        }
    }

    /// Waits up to `limit` for the connection to close; true if it did.
    fn wait_closed(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let mut state = lock(&self.shared);
        while !state.closed {
            let now = Instant::now();
            if now >= end {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, end - now)
                .unwrap()
                .0;
        }
        true
    }

    /// The final delivery of `id`, if it came.
    fn final_of(&self, id: RequestId) -> Option<Delivery> {
        let state = lock(&self.shared);
        state
            .deliveries
            .get(&id)
            .and_then(|d| d.iter().find(|d| !d.replaces_timeout).cloned())
    }

    fn deliveries(&self) -> BTreeMap<RequestId, Vec<Delivery>> {
        lock(&self.shared).deliveries.clone()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        match &self.link {
            Link::Unix(writer) => {
                if let Ok(writer) = writer.lock() {
                    writer.shutdown();
                }
            }
            Link::Tls(outbox) => {
                if let Ok(mut outbox) = outbox.lock() {
                    outbox.take();
                }
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// A TLS connection to the `tcp://` front door at `address`, trusting
/// `config`'s certificate and showing `token`: says on `ready` whether the
/// front door welcomed it, then sends what comes from `queue` and files
/// what comes back in `shared`, until either side closes.
async fn tls_session(
    address: String,
    config: Arc<tokio_rustls::rustls::ClientConfig>,
    token: String,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Envelope>,
    ready: mpsc::Sender<Result<(), String>>,
    shared: &DriverShared,
) {
    use futures::{SinkExt, StreamExt};
    let framing = Framing::default();
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(&address)
            .await
            .map_err(|e| format!("connecting to {address}: {e}"))?;
        let name =
            tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").expect("an address");
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {address}: {e}"))?;
        let mut framed = tokio_util::codec::Framed::new(tls, casa_node::front_door::codec(framing));
        let frame = framing
            .encode_body(&driver::hello(SOFTWARE, &token))
            .expect("Hello frames");
        framed
            .send(Bytes::from(frame))
            .await
            .map_err(|e| format!("sending Hello: {e}"))?;
        let answer = framed.next().await;
        match answer.map(|frame| frame.map(|f| framing.decode_body(f.freeze()))) {
            Some(Ok(Ok(Envelope {
                body: Some(Body::Welcome(_)),
                ..
            }))) => Ok(framed),
            other => Err(format!("expected Welcome, got {other:?}")),
        }
    };
    let mut framed = match tokio::time::timeout(HANG, handshake).await {
        Ok(Ok(framed)) => framed,
        Ok(Err(why)) => {
            let _ = ready.send(Err(why));
            return;
        }
        Err(_) => {
            let _ = ready.send(Err(format!("no Welcome within {HANG:?}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    loop {
        tokio::select! {
            outgoing = queue.recv() => {
                let Some(envelope) = outgoing else { break };
                let frame = framing
                    .encode_body(&envelope)
                    .expect("the suite's messages frame");
                if framed.send(Bytes::from(frame)).await.is_err() {
                    break;
                }
            }
            incoming = framed.next() => {
                let Some(Ok(frame)) = incoming else { break };
                let Ok(envelope) = framing.decode_body(frame.freeze()) else { break };
                receive(shared, envelope);
            }
        }
    }
    // Over TLS this says goodbye (close_notify) before the socket closes.
    let _ = SinkExt::<Bytes>::close(&mut framed).await;
}

// ---------------------------------------------------------------------
// The stream of commands and what each should come back as

/// What a request's response may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// If successful, `ret` is this integer.
    Ret(i64),
    /// Statements: if successful, `ret` is None.
    Nothing,
    /// Raises ZeroDivisionError: never successful.
    Raises,
    /// Kills its worker or exhausts its memory: never successful.
    Crashes,
    /// Blocks forever, ended by its deadline or a cancel: never
    /// successful.
    Blocks,
}

/// The requests a scenario submitted, and its counts.
#[derive(Default)]
struct Ledger {
    accepted: BTreeMap<RequestId, Expect>,
    submitted: usize,
    rejected: usize,
    bad_commands: usize,
}

impl Ledger {
    /// Adds `other`'s counts (for the summary; the requests stay apart).
    fn add(&mut self, other: &Ledger) {
        self.submitted += other.submitted;
        self.rejected += other.rejected;
        self.bad_commands += other.bad_commands;
        for (&id, &expect) in &other.accepted {
            assert!(
                self.accepted.insert(id, expect).is_none(),
                "id {id} was given to two drivers (rule 11)"
            );
        }
    }
}

fn request(
    command: impl Into<String>,
    parameters: Vec<(&str, Value)>,
    targets: Vec<Rank>,
    deadline: Option<f64>,
) -> SubmitRequest {
    SubmitRequest {
        command: command.into(),
        parameters: parameters
            .into_iter()
            .map(|(n, v)| Parameter::new(n, v))
            .collect(),
        targets,
        deadline_seconds: deadline,
        ..SubmitRequest::default()
    }
}

/// What a stream is made of.
#[derive(Debug, Clone, Copy)]
struct Mix {
    /// The share of bad commands (see [`Stream::bad`]).
    bad: f64,
    /// The share of ordinary commands given a deadline (1.5 s).
    deadlines: f64,
}

impl Mix {
    /// Ordinary commands only, a tenth of them with a deadline.
    const ORDINARY: Mix = Mix {
        bad: 0.0,
        deadlines: 0.1,
    };
}

/// Runs commands through one driver.
struct Stream<'a> {
    driver: &'a Driver,
    rng: TestRng,
    ranks: Vec<Rank>,
    ledger: Ledger,
    mix: Mix,
    /// Non-blocking requests not yet waited for, oldest first.
    pending: VecDeque<RequestId>,
    /// False once the connection closed (the head node is gone).
    open: bool,
    /// True once a submission was refused because services are stopped.
    stopped: bool,
}

/// Non-blocking requests allowed in flight before the oldest are waited
/// for, so that a scenario's work stays bounded.
const MAX_PENDING: usize = 16;

impl<'a> Stream<'a> {
    fn new(driver: &'a Driver, seed: u64, number: u8, ranks: Vec<Rank>, mix: Mix) -> Self {
        Stream {
            driver,
            rng: rng(seed, number),
            ranks,
            ledger: Ledger::default(),
            mix,
            pending: VecDeque::new(),
            open: true,
            stopped: false,
        }
    }

    /// Some targets (rule 13), or none (rule 12).
    fn targets(&mut self) -> Vec<Rank> {
        match self.rng.random_range(0..10) {
            0..7 => Vec::new(),
            7..9 => vec![self.ranks[self.rng.random_range(0..self.ranks.len())]],
            _ => {
                let mut ranks = self.ranks.clone();
                let first = ranks.swap_remove(self.rng.random_range(0..ranks.len()));
                match ranks.is_empty() {
                    true => vec![first],
                    false => vec![first, ranks[self.rng.random_range(0..ranks.len())]],
                }
            }
        }
    }

    /// Submits one ordinary command: an expression, a slightly longer
    /// one, statements, or one that raises; blocking or not.
    fn ordinary(&mut self) {
        let x: i64 = self.rng.random_range(0..1_000_000);
        let seconds = self.rng.random_range(20..300) as f64 / 1000.0;
        let (command, expect) = match self.rng.random_range(0..20) {
            0..8 => ("x + 1".to_owned(), Expect::Ret(x + 1)),
            8..15 => (
                format!("(time.sleep({seconds}), x + 1)[1]"),
                Expect::Ret(x + 1),
            ),
            15..18 => ("y = x + 1".to_owned(), Expect::Nothing),
            _ => ("x // 0".to_owned(), Expect::Raises),
        };
        // Far more time than the command needs, unless its worker or
        // server is stopped.
        let deadline = self.rng.random_bool(self.mix.deadlines).then_some(1.5);
        let targets = self.targets();
        let blocking = self.rng.random_bool(0.5);
        self.submit(
            request(command, vec![("x", Value::from(x))], targets, deadline),
            expect,
            blocking,
        );
    }

    /// Submits one command that ends its worker, exhausts a memory limit
    /// or blocks forever (rules 24, 25).
    fn bad(&mut self) {
        self.ledger.bad_commands += 1;
        let targets = self.targets();
        let deadline = self.rng.random_range(200..1000) as f64 / 1000.0;
        match self.rng.random_range(0..7) {
            6 => {
                // A child process that outlives the command, as tasks that
                // run external programs leave: it must not outlive the
                // cluster.
                self.submit(
                    request(
                        "import subprocess; subprocess.Popen(['sleep', '600'])",
                        vec![],
                        targets,
                        None,
                    ),
                    Expect::Nothing,
                    false,
                );
            }
            0 => {
                self.submit(
                    request("import ctypes; ctypes.string_at(0)", vec![], targets, None),
                    Expect::Crashes,
                    false,
                );
            }
            1 => {
                self.submit(
                    request("os._exit(3)", vec![], targets, None),
                    Expect::Crashes,
                    false,
                );
            }
            2 => {
                // A soft address-space limit 256 MiB above what the worker
                // maps now, then 1 GiB asked for: MemoryError, and the
                // worker goes on under the limit.
                let command = "import resource\n\
                     _soft, _hard = resource.getrlimit(resource.RLIMIT_AS)\n\
                     _mapped = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n\
                     resource.setrlimit(resource.RLIMIT_AS, (_mapped + (256 << 20), _hard))\n\
                     bytearray(1 << 30)";
                self.submit(
                    request(command, vec![], targets, None),
                    Expect::Crashes,
                    false,
                );
            }
            3 => {
                self.submit(
                    request("time.sleep(1e6)", vec![], targets, Some(deadline)),
                    Expect::Blocks,
                    false,
                );
            }
            4 => {
                self.submit(
                // Deaf to the interrupt: killed after the grace period.
                request(
                    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(1e6)",
                    vec![],
                    targets,
                    Some(deadline),
                ),
                Expect::Blocks,
                false,
                );
            }
            _ => {
                // No deadline: cancelled by the driver after a while.
                let ids = self.submit(
                    request(
                        "import threading; threading.Event().wait()",
                        vec![],
                        targets,
                        None,
                    ),
                    Expect::Blocks,
                    false,
                );
                if let Some(ids) = ids {
                    std::thread::sleep(millis(&mut self.rng, 20..500));
                    if self.driver.cancel(&ids).is_err() {
                        self.open = false;
                    }
                }
            }
        }
    }

    /// Submits `request`; waits for it at once if `blocking`. The accepted
    /// ids, if any.
    fn submit(
        &mut self,
        request: SubmitRequest,
        expect: Expect,
        blocking: bool,
    ) -> Option<Vec<RequestId>> {
        if !self.open {
            return None;
        }
        self.ledger.submitted += 1;
        let ids = match self.driver.submit(request) {
            Ok(Ok(ids)) => ids,
            Ok(Err(reason)) => {
                self.ledger.rejected += 1;
                // Services stopped (rule 27): nothing more will be accepted.
                self.stopped |= reason == RejectReason::Stopped;
                return None;
            }
            Err(WaitError::Closed) => {
                self.open = false;
                return None;
            }
        };
        for &id in &ids {
            assert!(
                self.ledger.accepted.insert(id, expect).is_none(),
                "id {id} was given out twice (rule 11)"
            );
        }
        if blocking {
            if self.driver.wait(&ids, HANG).is_err() {
                self.open = false;
            }
        } else {
            self.pending.extend(&ids);
            while self.pending.len() > MAX_PENDING {
                let oldest = self.pending.pop_front().expect("not empty");
                if self.driver.wait(&[oldest], HANG).is_err() {
                    self.open = false;
                    break;
                }
            }
        }
        Some(ids)
    }

    /// Has every server's worker start a program that outlives the
    /// command (`sleep 600`), as tasks that drive other tools do: it must
    /// not outlive the cluster, whatever happens to its worker or server.
    fn start_programs(&mut self) {
        let ranks = self.ranks.clone();
        self.submit(
            request(
                "import subprocess; subprocess.Popen(['sleep', '600'])",
                vec![],
                ranks,
                None,
            ),
            Expect::Nothing,
            true,
        );
    }

    /// Runs `count` commands, calling `between` every 20 commands.
    fn run(&mut self, count: usize, between: impl FnMut()) {
        self.run_while(|i| i < count, between);
    }

    /// Runs commands while `more` says so of the number run, calling
    /// `between` every 20 commands.
    fn run_while(&mut self, more: impl Fn(usize) -> bool, mut between: impl FnMut()) {
        for i in 0.. {
            if !more(i) || !self.open || self.stopped {
                break;
            }
            if i % 20 == 0 {
                between();
            }
            if self.rng.random_bool(self.mix.bad) {
                self.bad();
            } else {
                self.ordinary();
            }
        }
    }

    /// Waits for every request still pending.
    fn finish(&mut self) {
        let pending: Vec<RequestId> = self.pending.drain(..).collect();
        if self.open && self.driver.wait(&pending, HANG).is_err() {
            self.open = false;
        }
    }
}

// ---------------------------------------------------------------------
// The invariant

/// What came back, per outcome.
#[derive(Debug, Default)]
struct Outcomes {
    success: usize,
    failure: usize,
    timeout: usize,
    cancelled: usize,
    /// Timeout records replaced by the real response (rule 21).
    replaced: usize,
    /// Requests left unanswered because the head node died.
    lost: usize,
}

impl Outcomes {
    fn add(&mut self, other: &Outcomes) {
        self.success += other.success;
        self.failure += other.failure;
        self.timeout += other.timeout;
        self.cancelled += other.cancelled;
        self.replaced += other.replaced;
        self.lost += other.lost;
    }
}

/// Checks rule 11 on everything `driver` received: each accepted request
/// got exactly one final response, and at most one later record replacing
/// a timeout; nothing came for an id this driver was not given; each
/// response is one its command can give. With `head_node_died`, a
/// request may instead have no response at all (the connection closed).
fn check_responses(ledger: &Ledger, driver: &Driver, head_node_died: bool) -> Outcomes {
    let deliveries = driver.deliveries();
    for id in deliveries.keys() {
        assert!(
            ledger.accepted.contains_key(id),
            "a response for request {id}, which this driver was never given"
        );
    }
    let mut outcomes = Outcomes::default();
    for (&id, &expect) in &ledger.accepted {
        let list = deliveries.get(&id).map(Vec::as_slice).unwrap_or_default();
        let finals: Vec<&Delivery> = list.iter().filter(|d| !d.replaces_timeout).collect();
        let replacements: Vec<&Delivery> = list.iter().filter(|d| d.replaces_timeout).collect();
        if finals.is_empty() && head_node_died {
            assert!(list.is_empty(), "request {id}: {list:?}");
            outcomes.lost += 1;
            continue;
        }
        assert_eq!(
            finals.len(),
            1,
            "request {id} got {} final responses (rule 11): {list:?}",
            finals.len()
        );
        let first = finals[0];
        assert!(
            replacements.len() <= 1,
            "request {id}: its timeout record was replaced more than once: {list:?}"
        );
        if !replacements.is_empty() {
            assert!(
                first.status == CommandStatus::Timeout && !list[0].replaces_timeout,
                "request {id}: a replacement for a record that was not a timeout (rule 21): {list:?}"
            );
            outcomes.replaced += 1;
        }
        let effective = replacements.first().copied().unwrap_or(first);
        check_expected(id, expect, effective);
        match first.status {
            CommandStatus::Timeout => outcomes.timeout += 1,
            CommandStatus::Cancelled => outcomes.cancelled += 1,
            CommandStatus::ResponseReceived if first.successful => outcomes.success += 1,
            CommandStatus::ResponseReceived => outcomes.failure += 1,
            other => panic!("request {id}: a final response with status {other:?}: {list:?}"),
        }
    }
    outcomes
}

/// Checks that `response` is one that request `id`'s command can give.
fn check_expected(id: RequestId, expect: Expect, response: &Delivery) {
    if response.successful {
        assert_eq!(
            response.status,
            CommandStatus::ResponseReceived,
            "request {id}: successful with status {:?}",
            response.status
        );
        let ret = response.ret.as_ref();
        match expect {
            Expect::Ret(value) => assert_eq!(
                ret.map(i64::try_from),
                Some(Ok(value)),
                "request {id} returned another command's value (server n# {}): {ret:?}",
                response.server
            ),
            Expect::Nothing => assert_eq!(ret, Some(&Value::none()), "request {id}"),
            Expect::Raises | Expect::Crashes | Expect::Blocks => {
                panic!("request {id} ({expect:?}) succeeded: {response:?}")
            }
        }
        return;
    }
    // A failure of a command that does not fail by itself must say what
    // failed around it: its worker died, its server timed out, or it was
    // cancelled or ran out of time.
    if response.status == CommandStatus::ResponseReceived {
        let tb = &response.traceback;
        let explained = match expect {
            Expect::Raises => tb.contains("ZeroDivisionError"),
            Expect::Crashes => true,
            Expect::Blocks | Expect::Ret(_) | Expect::Nothing => false,
        };
        assert!(
            explained || response.worker_restarted || tb.contains("casa-node"),
            "request {id} ({expect:?}) failed without a cause of its own: {response:?}"
        );
    }
}

/// The cluster still serves: a `1+1` comes back successful (where a
/// server survives). A timeout of a server on this loaded machine is an
/// answer too (rule 20), so it is tried again, within [`HANG`].
fn check_serves(driver: &Driver, ledger: &mut Ledger) {
    let end = Instant::now() + HANG;
    loop {
        let ids = driver
            .submit(request("1+1", vec![], vec![], None))
            .expect("the head node is up")
            .expect("1+1 is accepted");
        ledger.accepted.insert(ids[0], Expect::Ret(2));
        ledger.submitted += 1;
        driver.wait(&ids, HANG).expect("the head node is up");
        let response = driver.final_of(ids[0]).expect("waited for");
        if response.successful {
            return;
        }
        assert!(
            response.status == CommandStatus::Timeout && Instant::now() < end,
            "the cluster no longer serves 1+1: {response:?}"
        );
    }
}

/// One scenario's line: requests, faults, outcomes, time, seed, and
/// `note` if there is one.
fn summary(
    name: &str,
    seed: u64,
    ledger: &Ledger,
    faults: usize,
    o: &Outcomes,
    started: Instant,
    note: &str,
) {
    report(&format!(
        "fault scenario {name} over {}: {} submissions, {} requests accepted, {} rejected; \
         {faults} faults injected; back: {} success, {} failure, {} timeout ({} replaced), \
         {} cancelled, {} lost with the head node; {:.1} s{note}; CASA_NODE_FAULT_SEED={seed}",
        transport_name(),
        ledger.submitted,
        ledger.accepted.len(),
        ledger.rejected,
        o.success,
        o.failure,
        o.timeout,
        o.replaced,
        o.cancelled,
        o.lost,
        started.elapsed().as_secs_f64(),
    ));
}

/// Writes `line` straight to the process's standard error, past the test
/// harness's capture: it is part of the suite's report.
fn report(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

// ---------------------------------------------------------------------
// Faults

/// Injects faults on a thread of its own until stopped; counts them.
struct Injector {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<usize>>,
}

impl Injector {
    /// Calls `fault` at random moments, `gap` apart; it returns how many
    /// faults it injected, and should return early once the flag it is
    /// given is set.
    fn start(
        seed: u64,
        gap: std::ops::Range<u64>,
        mut fault: impl FnMut(&mut TestRng, &AtomicBool) -> usize + Send + 'static,
    ) -> Injector {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut rng = rng(seed, 100);
            let mut injected = 0;
            while pause(millis(&mut rng, gap.clone()), &flag) {
                injected += fault(&mut rng, &flag);
            }
            injected
        });
        Injector {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops injecting; the number of faults injected.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().expect("finished once").join() {
            Ok(n) => n,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Stops `pid` for a random while (up to `longest`, past the cluster's
/// 3 s timeout at times), then continues it.
fn stop_for_a_while(pid: Pid, rng: &mut TestRng, longest: u64, stop: &AtomicBool) -> usize {
    if kill(pid, Signal::SIGSTOP).is_err() {
        return 0;
    }
    pause(millis(rng, 100..longest), stop);
    let _ = kill(pid, Signal::SIGCONT);
    1
}

/// The worker of the server node `server`: its child process.
fn worker_of(server: Pid) -> Option<Pid> {
    children(server).into_iter().next()
}

/// Everything a fault needs to know about the cluster.
#[derive(Clone)]
struct Target {
    servers: Vec<(Rank, Pid)>,
    procs: Arc<ProcessSet>,
    root: Pid,
}

impl Target {
    fn of(cluster: &Cluster) -> Target {
        Target {
            servers: cluster.servers.clone(),
            procs: cluster.procs().clone(),
            root: cluster.pid(),
        }
    }

    fn any_server(&self, rng: &mut TestRng) -> Pid {
        self.servers[rng.random_range(0..self.servers.len())].1
    }
}

/// Drivers that run commands side by side in each scenario.
const DRIVERS: usize = 2;

/// A scenario whose faults come from `fault`, on a cluster of `servers`,
/// with `count` commands made as `mix` says, split between [`DRIVERS`]
/// drivers running side by side.
fn scenario(
    name: &str,
    servers: usize,
    count: usize,
    mix: Mix,
    gap: std::ops::Range<u64>,
    fault: impl FnMut(&mut TestRng, &AtomicBool, &Target) -> usize + Send + 'static,
) {
    let (seed, started) = begin(name);
    let mut cluster = Cluster::start(servers);
    let drivers: Vec<Driver> = (0..DRIVERS).map(|_| cluster.driver()).collect();
    let target = Target::of(&cluster);
    let mut fault = fault;
    let injector = {
        let target = target.clone();
        Injector::start(seed, gap, move |rng, stop| {
            target.procs.note_tree(target.root);
            fault(rng, stop, &target)
        })
    };
    let streams: Vec<(Ledger, bool)> = std::thread::scope(|scope| {
        let cluster = &cluster;
        let running: Vec<_> = drivers
            .iter()
            .enumerate()
            .map(|(i, driver)| {
                scope.spawn(move || {
                    let mut stream = Stream::new(driver, seed, 1 + i as u8, cluster.ranks(), mix);
                    if i == 0 {
                        stream.start_programs();
                    }
                    stream.run(count / DRIVERS, || cluster.note_tree());
                    stream.finish();
                    (std::mem::take(&mut stream.ledger), stream.open)
                })
            })
            .collect();
        running
            .into_iter()
            .map(|stream| {
                stream
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e))
            })
            .collect()
    });
    let faults = injector.finish();
    // Every fault has ended: nothing is stopped any more.
    cluster.note_tree();
    cluster.procs().signal_all(Signal::SIGCONT);
    let mut ledgers = Vec::new();
    for (ledger, open) in streams {
        assert!(open, "the head node went away\n{}", cluster.diagnostics());
        ledgers.push(ledger);
    }
    check_serves(&drivers[0], &mut ledgers[0]);
    cluster.stop(&drivers[0]);
    let mut total = Ledger::default();
    let mut outcomes = Outcomes::default();
    for (driver, ledger) in drivers.iter().zip(&ledgers) {
        assert!(driver.wait_closed(HANG), "the front door stayed open");
        outcomes.add(&check_responses(ledger, driver, false));
        total.add(ledger);
    }
    let faults = faults + total.bad_commands;
    summary(name, seed, &total, faults, &outcomes, started, "");
}

// ---------------------------------------------------------------------
// The scenarios

/// Rules 11, 20, 30: server nodes SIGKILLed while commands run. Their
/// running and queued requests end with status timeout, their workers do
/// not outlive them, `up` starts them again, and the cluster goes on
/// serving. Over MPI
/// killing a rank ends the whole job (mpirun aborts it), so there the
/// scenario does not apply.
#[test]
fn server_nodes_killed() {
    if over_mpi() {
        report(
            "fault scenario server_nodes_killed over mpi: skipped, killing a server rank \
             ends the whole mpirun job, which is not a fault an MPI cluster survives",
        );
        return;
    }
    let mut killed = BTreeSet::new();
    scenario(
        "server_nodes_killed",
        4,
        240,
        Mix {
            bad: 0.05,
            ..Mix::ORDINARY
        },
        600..2500,
        move |rng, _, target| {
            // Keep two servers alive.
            if killed.len() + 2 >= target.servers.len() {
                return 0;
            }
            let (rank, pid) = target.servers[rng.random_range(0..target.servers.len())];
            if !killed.insert(rank) {
                return 0;
            }
            usize::from(kill(pid, Signal::SIGKILL).is_ok())
        },
    );
}

/// Rules 11, 19-21: server nodes stopped (SIGSTOP) for up to 5 s, past
/// the 3 s timeout at times, then continued: their requests time out and
/// their real responses replace the timeout records when they come back.
#[test]
fn server_nodes_stopped_and_continued() {
    scenario(
        "server_nodes_stopped_and_continued",
        3,
        240,
        Mix::ORDINARY,
        300..1500,
        |rng, stop, target| {
            let pid = target.any_server(rng);
            stop_for_a_while(pid, rng, 5000, stop)
        },
    );
}

/// Rules 11, 25: Python workers SIGKILLed at random moments, busy or
/// idle, and at times the fresh worker too, before it is ready: the
/// command running fails saying so, and a fresh worker serves.
#[test]
fn workers_killed() {
    scenario(
        "workers_killed",
        3,
        240,
        Mix::ORDINARY,
        200..900,
        |rng, _, target| {
            let server = target.any_server(rng);
            let Some(worker) = worker_of(server) else {
                return 0;
            };
            if kill(worker, Signal::SIGKILL).is_err() {
                return 0;
            }
            if !rng.random_bool(0.4) {
                return 1;
            }
            // Its replacement, as soon as it appears.
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Some(fresh) = worker_of(server).filter(|&p| p != worker) {
                    target.procs.note(fresh);
                    return 1 + usize::from(kill(fresh, Signal::SIGKILL).is_ok());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            1
        },
    );
}

/// Rules 11, 24: Python workers stopped (SIGSTOP) and continued: the
/// server keeps answering pings, so nothing times out but what has a
/// deadline; a command whose deadline passes while its worker is stopped
/// is interrupted once the worker continues, or, stopped for longer than
/// the grace period (8 s at times here), its worker is killed.
#[test]
fn workers_stopped_and_continued() {
    scenario(
        "workers_stopped_and_continued",
        3,
        240,
        Mix {
            deadlines: 0.5,
            ..Mix::ORDINARY
        },
        200..1200,
        |rng, stop, target| match worker_of(target.any_server(rng)) {
            Some(worker) => {
                let longest = if rng.random_bool(0.25) { 8000 } else { 3000 };
                stop_for_a_while(worker, rng, longest, stop)
            }
            None => 0,
        },
    );
}

/// Rules 11, 24, 25: commands that segfault, call os._exit, exceed a
/// memory limit (resource.setrlimit), or block forever (ended by their
/// deadline, deaf to the interrupt so killed after the grace period, or
/// cancelled), amid ordinary ones.
#[test]
fn commands_that_crash_exhaust_memory_or_block() {
    scenario(
        "commands_that_crash_exhaust_memory_or_block",
        3,
        240,
        Mix {
            bad: 0.12,
            ..Mix::ORDINARY
        },
        1000..2000,
        |_, _, _| 0,
    );
}

/// Rules 11, 17: drivers that go away mid-wait, killed (SIGKILL of a
/// `casa-node submit` waiting for its command) or disconnecting with
/// requests outstanding, while another driver keeps working. Their
/// requests still run to their end (none stays queued or running for a
/// driver that is gone), and the other driver gets all its responses.
#[test]
fn drivers_killed_mid_wait() {
    let name = "drivers_killed_mid_wait";
    let (seed, started) = begin(name);
    let mut cluster = Cluster::start(2);
    let driver = cluster.driver();
    let socket = cluster.socket();
    let runtime = cluster.runtime_dir();
    let ranks = cluster.ranks();
    let injector = Injector::start(seed, 200..800, move |rng, stop| {
        let seconds = rng.random_range(50..1500) as f64 / 1000.0;
        let command = format!("(time.sleep({seconds}), 1)[1]");
        if rng.random_bool(0.7) {
            let mut cli = Command::new(BIN);
            cli.arg("submit");
            if rng.random_bool(0.3) {
                cli.args([
                    "--target",
                    &ranks[rng.random_range(0..ranks.len())].to_string(),
                ]);
            }
            let mut cli = ChildGuard(
                cli.arg(command)
                    .env("CASA_NODE_ENDPOINT", format!("unix://{}", socket.display()))
                    .env("XDG_RUNTIME_DIR", &runtime)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("casa-node submit starts"),
            );
            pause(millis(rng, 50..1200), stop);
            if cli.wait_timeout(Duration::ZERO).is_some() {
                return 0;
            }
            let _ = kill(cli.pid(), Signal::SIGKILL);
            cli.wait_timeout(HANG).expect("a killed driver ends");
            1
        } else {
            let gone = Driver::connect(&socket);
            for _ in 0..rng.random_range(1..4) {
                let _ = gone.submit(request(command.as_str(), vec![], vec![], None));
            }
            pause(millis(rng, 0..300), stop);
            drop(gone);
            1
        }
    });
    let mut stream = Stream::new(&driver, seed, 0, cluster.ranks(), Mix::ORDINARY);
    stream.start_programs();
    stream.run(240, || cluster.note_tree());
    let faults = injector.finish();
    stream.finish();
    assert!(
        stream.open,
        "the head node went away\n{}",
        cluster.diagnostics()
    );
    let mut ledger = std::mem::take(&mut stream.ledger);
    check_serves(&driver, &mut ledger);
    // Every request up to the last one, the gone drivers' too, ends.
    let last = *ledger.accepted.keys().next_back().expect("requests ran");
    let all: Vec<RequestId> = (1..=last).collect();
    let end = Instant::now() + HANG;
    loop {
        let pending: Vec<RequestId> = driver
            .track(&all)
            .states
            .iter()
            .filter(|s| {
                matches!(
                    s.status(),
                    CommandStatus::HoldingQueue | CommandStatus::RequestSent
                )
            })
            .map(|s| s.id)
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(
            Instant::now() < end,
            "hang: requests {pending:?} of drivers that went away never ended\n{}",
            cluster.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.stop(&driver);
    assert!(driver.wait_closed(HANG), "the front door stayed open");
    let outcomes = check_responses(&ledger, &driver, false);
    summary(name, seed, &ledger, faults, &outcomes, started, "");
}

/// Rules 11, 30: the head node SIGKILLed while commands run (over MPI,
/// rank 0 of the job). The driver's waits end at once with the connection
/// closed (no response comes twice before that), and every server node
/// and worker exits within the bound.
#[test]
fn the_head_node_killed() {
    let name = "the_head_node_killed";
    let (seed, started) = begin(name);
    let mut cluster = Cluster::start(3);
    let driver = cluster.driver();
    let mix = Mix {
        bad: 0.05,
        ..Mix::ORDINARY
    };
    let (ledger, faults, killed_at) =
        until_the_head_node_is_killed(&mut cluster, &driver, seed, mix, true);
    let ended = killed_at.elapsed();
    let outcomes = check_responses(&ledger, &driver, true);
    let note = format!(
        " (every process gone {:.1} s after the kill)",
        ended.as_secs_f64()
    );
    summary(name, seed, &ledger, faults, &outcomes, started, &note);
}

/// Streams commands mixed as `mix` through `driver` (with programs left
/// running when `programs`) until the head node, SIGKILLed once 2 to 6 s
/// in, is gone; then checks that the driver's connection closed, the
/// cluster's launcher ended and no process is left. The stream's ledger,
/// the faults injected, and when the kill came.
fn until_the_head_node_is_killed(
    cluster: &mut Cluster,
    driver: &Driver,
    seed: u64,
    mix: Mix,
    programs: bool,
) -> (Ledger, usize, Instant) {
    let head_node = cluster.head_node;
    let killed_at = Arc::new(Mutex::new(None));
    let injector = {
        let killed_at = killed_at.clone();
        let target = Target::of(cluster);
        Injector::start(seed, 2000..6000, move |_, _| {
            let mut killed_at = killed_at.lock().unwrap();
            if killed_at.is_some() {
                return 0;
            }
            target.procs.note_tree(target.root);
            kill(head_node, Signal::SIGKILL).expect("the head node is there to kill");
            *killed_at = Some(Instant::now());
            1
        })
    };
    let mut stream = Stream::new(driver, seed, 0, cluster.ranks(), mix);
    if programs {
        stream.start_programs();
    }
    // Until the connection closes; the kill comes within seconds.
    stream.run(5000, || cluster.note_tree());
    let faults = injector.finish();
    assert!(
        !stream.open,
        "the stream ended before the head node was killed"
    );
    let killed_at = killed_at.lock().unwrap().expect("killed");
    assert!(driver.wait_closed(EXIT_BOUND), "the front door stayed open");
    assert!(
        cluster.wait_exit(EXIT_BOUND).is_some(),
        "the cluster's launcher outlived its head node by {EXIT_BOUND:?}\n{}",
        cluster.diagnostics()
    );
    cluster.assert_nothing_left();
    (std::mem::take(&mut stream.ledger), faults, killed_at)
}

/// Rule 33: the head node, run with a journal, SIGKILLed while commands
/// run (over MPI, rank 0 of the job), then started again with the same
/// journal. Every request acknowledged before the kill is known to the new
/// head node and ends with exactly one final response, claimed by a new
/// driver: the one given before the kill, or, for those unanswered then,
/// the one they get when run again. Ids go on above every id given before.
#[test]
fn the_head_node_killed_and_restarted_with_its_journal() {
    killed_and_restarted("the_head_node_killed_and_restarted_with_its_journal", false);
}

/// Rule 33: as [`the_head_node_killed_and_restarted_with_its_journal`],
/// with the journal then cut at a random byte after the kill, as a crash
/// mid-write (or a disk that kept only part of the last writes) leaves it.
/// The new head node starts (the journal's own tests check that it
/// says how many bytes it dropped) and knows every request whose record
/// survived: the ones it does not know are the newest, and everything it
/// knows ends with exactly one final response.
#[test]
fn the_journal_cut_at_a_random_byte() {
    killed_and_restarted("the_journal_cut_at_a_random_byte", true);
}

/// The two scenarios above: a kill, a restart with the journal (cut at a
/// random byte first when `cut`), then claims of every acknowledged id.
fn killed_and_restarted(name: &str, cut: bool) {
    let (seed, started) = begin(name);
    let keep = cluster::scratch("faults-journal");
    let journal = keep.join("journal");
    let options = ["--journal", journal.to_str().unwrap()];
    let mut cluster = Cluster::start_with(3, &options);
    let driver = cluster.driver();
    let (mut ledger, faults, _) =
        until_the_head_node_is_killed(&mut cluster, &driver, seed, Mix::ORDINARY, false);
    let before = driver.deliveries();
    drop(driver);
    drop(cluster);

    let mut dropped = 0;
    if cut {
        let bytes = std::fs::read(&journal).expect("the journal is there");
        let at = rng(seed, 7).random_range(0..bytes.len() as u64) as usize;
        // A journal cut inside its header is no journal: keep that whole.
        let at = at.max(64.min(bytes.len()));
        dropped = bytes.len() - at;
        std::fs::write(&journal, &bytes[..at]).unwrap();
    }
    let restarting = Instant::now();
    let mut cluster = Cluster::start_with(3, &options);
    let driver = cluster.driver();
    let restart = restarting.elapsed();
    let mut ids: Vec<RequestId> = ledger.accepted.keys().copied().collect();
    let claim = driver.claim(&ids);
    if cut {
        // What the cut took are the latest records: the requests it lost
        // are newer than every one it kept.
        let oldest_lost = claim
            .unknown
            .iter()
            .min()
            .copied()
            .unwrap_or(RequestId::MAX);
        let known: Vec<RequestId> = ids
            .iter()
            .copied()
            .filter(|id| !claim.unknown.contains(id))
            .collect();
        assert!(
            known.iter().all(|&id| id < oldest_lost),
            "the cut lost requests {:?} but kept later ones\n{}",
            claim.unknown,
            cluster.diagnostics()
        );
        for id in &claim.unknown {
            ledger.accepted.remove(id);
        }
        ids = known;
    } else {
        assert!(
            claim.unknown.is_empty(),
            "acknowledged requests the journal lost: {:?}\n{}",
            claim.unknown,
            cluster.diagnostics()
        );
    }
    driver.wait(&ids, HANG).expect("the head node is up");
    // What came before the kill stands: a final response given then is
    // the one given now (a timeout record may have been replaced since).
    for (id, list) in before.iter().filter(|(id, _)| claim.answered.contains(id)) {
        let Some(first) = list.iter().find(|d| !d.replaces_timeout) else {
            continue;
        };
        let now = driver.final_of(*id).expect("waited for");
        if first.status != CommandStatus::Timeout {
            assert_eq!(
                (now.status, now.successful, &now.ret),
                (first.status, first.successful, &first.ret),
                "request {id}: answered otherwise after the restart"
            );
        }
    }
    let newest = ids.iter().max().copied().unwrap_or(0);
    check_serves(&driver, &mut ledger);
    assert!(
        ledger.accepted.keys().max().copied().unwrap_or(0) > newest,
        "an id was given again after the restart"
    );
    let outcomes = check_responses(&ledger, &driver, false);
    cluster.stop(&driver);
    assert!(driver.wait_closed(HANG), "the front door stayed open");
    drop(driver);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&keep);
    let lost = if cut {
        format!(
            ", {} lost with the {dropped} bytes cut",
            claim.unknown.len()
        )
    } else {
        String::new()
    };
    let note = format!(
        " ({} answered before the kill and given again from the journal, {} run again after it{lost}; \
         the new head node served {:.1} s after it was started)",
        claim.answered.len(),
        claim.pending.len(),
        restart.as_secs_f64()
    );
    summary(name, seed, &ledger, faults, &outcomes, started, &note);
}

/// Rules 20, 30: the head node stopped (SIGSTOP) for 3 s and then 8 s,
/// the second past the 3 s timeout and the timeout plus a second after
/// which servers used to leave, while commands run. Its own stall is not
/// its servers' silence: no server is timed out or lost, every server node
/// is the one that started, and every request is answered as if nothing
/// had happened.
#[test]
fn the_head_node_stopped_and_continued() {
    let name = "the_head_node_stopped_and_continued";
    let (seed, started) = begin(name);
    let mut cluster = Cluster::start(3);
    let driver = cluster.driver();
    let head_node = cluster.head_node;
    let before = cluster.servers.clone();
    let stops = [Duration::from_secs(3), Duration::from_secs(8)];
    let done = AtomicBool::new(false);
    let ledger = std::thread::scope(|scope| {
        let cluster = &cluster;
        let (driver, done) = (&driver, &done);
        let stream = scope.spawn(move || {
            let mut stream = Stream::new(driver, seed, 1, cluster.ranks(), Mix::ORDINARY);
            stream.run_while(|_| !done.load(Ordering::Relaxed), || cluster.note_tree());
            stream.finish();
            (std::mem::take(&mut stream.ledger), stream.open)
        });
        let mut rng = rng(seed, 100);
        for stop in stops {
            let never = AtomicBool::new(false);
            pause(millis(&mut rng, 500..1500), &never);
            kill(head_node, Signal::SIGSTOP).expect("the head node is there");
            pause(stop, &never);
            kill(head_node, Signal::SIGCONT).expect("the head node is there");
        }
        // Commands run on after the last stop, then the stream ends.
        pause(Duration::from_secs(1), &AtomicBool::new(false));
        done.store(true, Ordering::Relaxed);
        stream
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    let (mut ledger, open) = ledger;
    assert!(open, "the head node went away\n{}", cluster.diagnostics());
    let status = driver.status();
    let after: Vec<(Rank, Pid)> = status
        .servers
        .iter()
        .map(|s| (s.rank, Pid::from_raw(s.pid as i32)))
        .collect();
    assert_eq!(
        after,
        before,
        "the server nodes changed\n{}",
        cluster.diagnostics()
    );
    for server in &status.servers {
        assert!(
            server.online && !server.timeout,
            "server {} is not online after the head node's stall: {server:?}\n{}",
            server.rank,
            cluster.diagnostics()
        );
    }
    check_serves(&driver, &mut ledger);
    let outcomes = check_responses(&ledger, &driver, false);
    assert_eq!(
        outcomes.timeout,
        0,
        "the head node's own stall was counted as its servers' silence\n{}",
        cluster.diagnostics()
    );
    cluster.stop(&driver);
    assert!(driver.wait_closed(HANG), "the front door stayed open");
    summary(name, seed, &ledger, stops.len(), &outcomes, started, "");
}

/// Rules 11, 19-25: everything at once, on one cluster: server nodes and
/// workers stopped and continued, workers killed (over ZeroMQ, one server
/// node killed too), amid commands that crash, exhaust memory or block.
#[test]
fn mixed_faults() {
    let mut server_killed = over_mpi();
    scenario(
        "mixed_faults",
        3,
        240,
        Mix {
            bad: 0.08,
            deadlines: 0.2,
        },
        150..900,
        move |rng, stop, target| {
            let server = target.any_server(rng);
            match rng.random_range(0..10) {
                0..3 => stop_for_a_while(server, rng, 4500, stop),
                3..6 => match worker_of(server) {
                    Some(worker) => {
                        let longest = if rng.random_bool(0.25) { 8000 } else { 3000 };
                        stop_for_a_while(worker, rng, longest, stop)
                    }
                    None => 0,
                },
                6..9 => match worker_of(server) {
                    Some(worker) => usize::from(kill(worker, Signal::SIGKILL).is_ok()),
                    None => 0,
                },
                _ if !server_killed => {
                    server_killed = true;
                    usize::from(kill(server, Signal::SIGKILL).is_ok())
                }
                _ => 0,
            }
        },
    );
}

/// Rules 11, 20, 27: services stopped (by a third driver, gracefully or
/// forced, at times while a server node is stopped with SIGSTOP) while two
/// drivers stream commands amid crashing and blocking ones: requests not yet sent end as cancelled, running ones finish (or,
/// forced, are interrupted), later submissions are refused, and every
/// accepted request has its one final response before the front door
/// closes; then the whole cluster exits.
#[test]
fn services_stopped_mid_stream() {
    let name = "services_stopped_mid_stream";
    let (seed, started) = begin(name);
    let mut cluster = Cluster::start(3);
    let drivers: Vec<Driver> = (0..DRIVERS).map(|_| cluster.driver()).collect();
    let stopper = cluster.driver();
    let stopped = Arc::new(AtomicBool::new(false));
    let injector = {
        let stopped = stopped.clone();
        let target = Target::of(&cluster);
        Injector::start(seed, 1000..4000, move |rng, stop| {
            if stopped.swap(true, Ordering::Relaxed) {
                return 0;
            }
            target.procs.note_tree(target.root);
            // At times with a server stopped (SIGSTOP) around the moment
            // services stop, past the timeout at times.
            let frozen = rng
                .random_bool(0.5)
                .then(|| target.any_server(rng))
                .filter(|&server| kill(server, Signal::SIGSTOP).is_ok());
            if frozen.is_some() {
                pause(millis(rng, 0..500), stop);
            }
            let force = rng.random_bool(0.5);
            let acked = stopper.call(Body::StopRequest(StopRequest { force }));
            if let Some(server) = frozen {
                pause(millis(rng, 0..4500), stop);
                let _ = kill(server, Signal::SIGCONT);
            }
            match acked {
                Ok(Body::Ack(ack)) if ack.ok => 1 + usize::from(frozen.is_some()),
                other => panic!("stop services was refused: {other:?}"),
            }
        })
    };
    let mix = Mix {
        bad: 0.05,
        ..Mix::ORDINARY
    };
    let ledgers: Vec<Ledger> = std::thread::scope(|scope| {
        let cluster = &cluster;
        let running: Vec<_> = drivers
            .iter()
            .enumerate()
            .map(|(i, driver)| {
                scope.spawn(move || {
                    let mut stream = Stream::new(driver, seed, 1 + i as u8, cluster.ranks(), mix);
                    // Until services stop; what was accepted until then
                    // is all answered, and then the connection closes.
                    stream.run(5000, || cluster.note_tree());
                    stream.finish();
                    assert!(stream.stopped || !stream.open, "services never stopped");
                    std::mem::take(&mut stream.ledger)
                })
            })
            .collect();
        running
            .into_iter()
            .map(|stream| {
                stream
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e))
            })
            .collect()
    });
    let faults = injector.finish();
    assert!(
        cluster.wait_exit(HANG).is_some(),
        "the cluster did not end within {HANG:?} of stop services\n{}",
        cluster.diagnostics()
    );
    cluster.assert_nothing_left();
    let mut total = Ledger::default();
    let mut outcomes = Outcomes::default();
    for (driver, ledger) in drivers.iter().zip(&ledgers) {
        assert!(driver.wait_closed(HANG), "the front door stayed open");
        // Stopped, not killed: nothing may be left unanswered.
        outcomes.add(&check_responses(ledger, driver, false));
        total.add(ledger);
    }
    let faults = faults + total.bad_commands;
    summary(name, seed, &total, faults, &outcomes, started, "");
}

// ---------------------------------------------------------------------
// A cluster spread over two network namespaces

/// The two sides of a split cluster: the head node's and the remote
/// server's.
const A: usize = 0;
const B: usize = 1;

/// The addresses of the veth pair's two ends. They are loopback-range
/// addresses, as every address in this project's tests is (127.0.0.0/8,
/// ::1, ipc): they exist only in the two network namespaces the test
/// creates, on the link between them, so nothing the test sends reaches
/// the host's network, or the host's own loopback.
const VETH_ADDRESSES: [&str; 2] = ["127.77.0.1", "127.77.0.2"];

/// Their network, for Open MPI's interface selection.
const VETH_NETWORK: &str = "127.77.0.0/30";

/// How long the link is cut: past the 5 s timeout, and past the timeout
/// plus a second after which server nodes used to give up.
const CUT: Duration = Duration::from_secs(8);

/// Runs `ip` with `args` (words apart); its error output if it fails.
fn ip(args: &str) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`ip` cannot run: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "`ip {args}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// [`ip`], where a failure fails the test.
fn ip_ok(args: &str) {
    ip(args).unwrap_or_else(|why| panic!("{why}"));
}

/// Two network namespaces joined by a veth pair, made for one test
/// (their names hold the test process's PID) and deleted when dropped,
/// also when the test fails. Each has its loopback up and one end of the
/// pair, with an address of [`VETH_ADDRESSES`].
struct Namespaces {
    names: [String; 2],
    veths: [String; 2],
}

impl Namespaces {
    /// Creates the namespaces and their link; why not where the machine
    /// forbids it (not root, no `ip`, `ip netns add` refused). Anything
    /// that fails after that fails the test.
    fn create() -> Result<Namespaces, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root: creating network namespaces needs root".into());
        }
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let (pid, n) = (std::process::id(), MADE.fetch_add(1, Ordering::Relaxed));
        let namespaces = Namespaces {
            names: [
                format!("casa-node-{pid}-{n}-a"),
                format!("casa-node-{pid}-{n}-b"),
            ],
            // Interface names have at most 15 characters.
            veths: [format!("cn{pid}-{n}a"), format!("cn{pid}-{n}b")],
        };
        ip(&format!("netns add {}", namespaces.names[A]))?;
        // From here on, what was made is deleted on drop.
        ip(&format!("netns add {}", namespaces.names[B]))?;
        namespaces.link_up();
        Ok(namespaces)
    }

    /// The veth pair, its addresses, and the routing that lets loopback
    /// range addresses cross it.
    fn link_up(&self) {
        let [a, b] = &self.names;
        let [veth_a, veth_b] = &self.veths;
        ip_ok(&format!(
            "-n {a} link add {veth_a} type veth peer name {veth_b} netns {b}"
        ));
        for side in [A, B] {
            let (ns, veth) = (&self.names[side], &self.veths[side]);
            ip_ok(&format!("-n {ns} link set lo up"));
            // The kernel drops packets with 127.0.0.0/8 addresses on any
            // interface but lo as martians, unless route_localnet allows
            // them...
            let sysctl = self
                .exec(side)
                .args(["sh", "-c"])
                .arg(format!(
                    "echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet && \
                     echo 1 > /proc/sys/net/ipv4/conf/{veth}/route_localnet"
                ))
                .status();
            assert!(
                sysctl.as_ref().is_ok_and(|s| s.success()),
                "route_localnet in {ns}: {sysctl:?}"
            );
            // ...and delivers all of 127.0.0.0/8 to lo: here only
            // 127.0.0.0/16, so that 127.77.0.0/30 goes over the pair.
            ip_ok(&format!("-n {ns} route del 127.0.0.0/8 dev lo table local"));
            ip_ok(&format!(
                "-n {ns} route add local 127.0.0.0/16 dev lo table local"
            ));
            let address = VETH_ADDRESSES[side];
            ip_ok(&format!("-n {ns} addr add {address}/30 dev {veth}"));
            ip_ok(&format!("-n {ns} link set {veth} up"));
        }
        for side in [A, B] {
            let end = Instant::now() + HANG;
            while !self.carrier(side) {
                assert!(
                    Instant::now() < end,
                    "the veth pair has no carrier in {}",
                    self.names[side]
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// True when `side`'s end of the pair is up with a carrier.
    fn carrier(&self, side: usize) -> bool {
        Command::new("ip")
            .args(["-n", &self.names[side], "-o", "link", "show", "dev"])
            .arg(&self.veths[side])
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("LOWER_UP"))
    }

    /// Takes `side`'s end of the pair down, or up again.
    fn set_link(&self, side: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip_ok(&format!(
            "-n {} link set {} {state}",
            self.names[side], self.veths[side]
        ));
    }

    /// `ip netns exec NAME`, for a program (its first argument) to run in
    /// `side`'s namespace (`ip netns exec` runs the program itself in its
    /// place: its PID is the program's).
    fn exec(&self, side: usize) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.names[side]]);
        command
    }

    /// The file that names `side`'s namespace, for setns(2): where `ip`
    /// keeps it, /run/netns (or /var/run/netns, where that is not the
    /// same).
    fn file(&self, side: usize) -> PathBuf {
        let name = &self.names[side];
        ["/run/netns", "/var/run/netns"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|path| path.exists())
            .unwrap_or_else(|| panic!("`ip netns add {name}` made no /run/netns/{name}"))
    }

    /// True when process `pid` lives in `side`'s namespace.
    fn holds(&self, side: usize, pid: Pid) -> bool {
        use std::os::unix::fs::MetadataExt;
        let inode = |path: PathBuf| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
        let own = inode(self.file(side));
        own.is_some() && inode(PathBuf::from(format!("/proc/{pid}/ns/net"))) == own
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // The veth pair goes with them.
        for name in &self.names {
            let _ = ip(&format!("netns del {name}"));
        }
    }
}

/// How the test's drivers reach a split cluster's front door.
enum Door {
    /// A Unix socket: from the test's own namespace too.
    Unix(PathBuf),
    /// A `tcp://` front door inside namespace A, over TLS.
    Tls {
        netns: PathBuf,
        address: String,
        file: ConnectionFile,
    },
}

/// A cluster whose head node and two server nodes run in namespace A
/// and one more server node in namespace B: over ZeroMQ, `up` and a
/// `casa-node server --connect` over the pair; under MPI, one `mpirun` job
/// whose ranks the rsh agent places in either namespace. Stopped on drop:
/// every process seen in its trees is stopped by PID.
struct SplitCluster {
    /// `up`, or `mpirun`, in namespace A.
    run: cluster::Cluster,
    /// Over ZeroMQ, the server node in namespace B.
    remote: Option<ChildGuard>,
    door: Door,
}

impl SplitCluster {
    /// Over ZeroMQ: `up` in A, with its front door on A's loopback (TLS,
    /// a connection file) and its node links on A's end of the pair
    /// (signed), then `casa-node server --connect` to those in B.
    fn zmq(namespaces: &Namespaces) -> SplitCluster {
        let dir = cluster::scratch("faults");
        let file = dir.join("secrets").join("cluster.json");
        let run = Launch::new(BIN, 2)
            .transport(Transport::Zmq)
            .launcher(namespaces.exec(A))
            .dir(&dir)
            .endpoint("tcp://127.0.0.1:0")
            .timeout(5)
            .args(["--connection-file", file.to_str().unwrap()])
            .args(["--nodes", &format!("tcp://{}:0", VETH_ADDRESSES[A])])
            .start();
        let nodes = run.nodes().expect("nodes: over ZeroMQ").to_owned();
        let stderr = std::fs::File::create(dir.join("remote.stderr")).unwrap();
        let remote = namespaces
            .exec(B)
            .arg(BIN)
            .args(["server", "--connect", &nodes])
            .args(["--connection-file", file.to_str().unwrap()])
            .env_remove("CASA_NODE_PATIENCE")
            .env_remove("CASA_NODE_CONNECTION_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("casa-node server starts");
        let remote = ChildGuard(remote);
        run.note(remote.pid());
        let door = Door::Tls {
            netns: namespaces.file(A),
            address: run
                .front_door()
                .strip_prefix("tcp://")
                .unwrap_or_else(|| panic!("a tcp:// front door: {}", run.front_door()))
                .to_owned(),
            file: ConnectionFile::read(&file).expect("up wrote its connection file"),
        };
        SplitCluster {
            run,
            remote: Some(remote),
            door,
        }
    }

    /// Under MPI: one `mpirun` in A over two fake hosts, three ranks
    /// (head node and two servers) on the one in A, one on the one in B.
    /// Open MPI starts an orted on each through its rsh agent, here a
    /// script that runs it in the host's namespace; the runtime (OOB) and
    /// the ranks' TCP BTL between hosts use the veth pair only.
    fn mpi(namespaces: &Namespaces) -> SplitCluster {
        let dir = cluster::scratch("faults");
        let hosts = ["netns-a", "netns-b"];
        let hostfile = dir.join("hostfile");
        std::fs::write(
            &hostfile,
            format!("{} slots=3\n{} slots=1\n", hosts[A], hosts[B]),
        )
        .unwrap();
        // Each fake host keeps its own session directory: the orteds of
        // both run on this machine. (mpirun passes its own
        // orte_tmpdir_base on the orteds' command lines, over their
        // environment, so it keeps its session by TMPDIR instead.)
        let mut agent = String::from(
            "#!/bin/sh\n\
             # Open MPI's rsh agent for the fault suite: HOST COMMAND... runs\n\
             # COMMAND (an orted) in HOST's network namespace.\n\
             host=$1\nshift\ncase $host in\n",
        );
        for side in [A, B] {
            let session = dir.join(format!("session-{}", hosts[side]));
            std::fs::create_dir_all(&session).unwrap();
            agent.push_str(&format!(
                "  {host}) exec ip netns exec {ns} env OMPI_MCA_orte_tmpdir_base={session} sh -c \"$*\" ;;\n",
                host = hosts[side],
                ns = namespaces.names[side],
                session = session.display(),
            ));
        }
        agent.push_str("esac\necho \"no such host: $host\" >&2\nexit 1\n");
        let script = dir.join("rsh-agent");
        std::fs::write(&script, agent).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let launcher_session = dir.join("session-mpirun");
        std::fs::create_dir_all(&launcher_session).unwrap();
        // The suite's mpirun (as root, oversubscribed, no binding), run in A.
        let mpirun = process::mpirun(4).unwrap_or_else(|why| panic!("{why}"));
        let mut command = namespaces.exec(A);
        command.arg(mpirun.get_program()).args(mpirun.get_args());
        for (name, value) in mpirun.get_envs() {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
            .args(["--hostfile", hostfile.to_str().unwrap()])
            .env("OMPI_MCA_plm_rsh_agent", &script)
            .env_remove("OMPI_MCA_orte_tmpdir_base")
            .env("TMPDIR", &launcher_session)
            // Shared memory within a host, TCP between the two. Open MPI
            // leaves 127.0.0.0/8 out of its TCP BTL by default
            // (btl_tcp_if_exclude = 127.0.0.1/8,sppp); a btl_tcp_if_include
            // replaces that default, so the pair's network is used.
            .env("OMPI_MCA_btl", "self,vader,tcp")
            .env("OMPI_MCA_btl_tcp_if_include", VETH_NETWORK)
            .env("OMPI_MCA_oob_tcp_if_include", VETH_NETWORK);
        let run = Launch::new(BIN, 3)
            .transport(Transport::Mpi)
            .launcher(command)
            .dir(&dir)
            .timeout(5)
            .start();
        let door = Door::Unix(run.socket());
        SplitCluster {
            run,
            remote: None,
            door,
        }
    }

    fn driver(&self) -> Driver {
        match &self.door {
            Door::Unix(socket) => Driver::connect(socket),
            Door::Tls {
                netns,
                address,
                file,
            } => Driver::connect_tls(netns, address, file),
        }
    }

    fn note_tree(&self) {
        self.run.note_tree();
        if let Some(remote) = &self.remote {
            self.run.procs().note_tree(remote.pid());
        }
    }

    /// Waits until the cluster's three servers are online with their
    /// workers; their status, with the head node's PID.
    fn wait_ready(&self, driver: &Driver) -> (Vec<ServerStatus>, Pid) {
        let end = Instant::now() + HANG;
        let servers = loop {
            let status = driver.status();
            if status.servers.len() == 3
                && status.servers.iter().all(|s| s.online && s.worker_pid != 0)
            {
                break status.servers;
            }
            assert!(
                Instant::now() < end,
                "the cluster never had its three servers online: {status:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.note_tree();
        // Over ZeroMQ `ip netns exec` ran `up` in its place; under MPI,
        // rank 0 is the rank that no server is.
        let pids: Vec<Pid> = servers
            .iter()
            .map(|s| Pid::from_raw(s.pid as i32))
            .collect();
        let head_node = self.run.head_node(&pids);
        (servers, head_node)
    }

    fn diagnostics(&self) -> String {
        let remote =
            std::fs::read_to_string(self.run.dir().join("remote.stderr")).unwrap_or_default();
        let lines: Vec<&str> = remote.lines().collect();
        format!(
            "{}\n--- the remote server's stderr (tail):\n{}",
            self.run.diagnostics(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

impl Drop for SplitCluster {
    fn drop(&mut self) {
        // The harness's cluster, dropped next, stops every process seen,
        // the remote server's too: its link may still be cut, and then it
        // cannot hear the stop.
        self.note_tree();
    }
}

/// Sets its flag when dropped: the streams of a scenario stop also when
/// the thread that runs its faults fails.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Driver {
    /// Waits until the timeout record of `id` has been replaced (rule 21);
    /// the replacement.
    fn wait_replaced(&self, id: RequestId, limit: Duration) -> Delivery {
        let end = Instant::now() + limit;
        let mut state = lock(&self.shared);
        loop {
            if let Some(replaced) = state
                .deliveries
                .get(&id)
                .and_then(|list| list.iter().find(|d| d.replaces_timeout))
            {
                return replaced.clone();
            }
            assert!(
                !state.closed,
                "the front door closed before request {id}'s answer came"
            );
            let now = Instant::now();
            assert!(
                now < end,
                "hang: the timeout record of request {id} was not replaced within {limit:?}"
            );
            state = self
                .shared
                .changed
                .wait_timeout(state, end - now)
                .unwrap()
                .0;
        }
    }

    /// The status of server `rank`.
    fn server(&self, rank: Rank) -> ServerStatus {
        self.status()
            .servers
            .into_iter()
            .find(|s| s.rank == rank)
            .unwrap_or_else(|| panic!("no server n# {rank}"))
    }
}

/// What one partition did, timed.
struct Partition {
    /// From the cut to the timeout record of the remote server's command.
    timed_out: Duration,
    /// From the link's return to the remote server being online again.
    online: Duration,
    /// From the link's return to the real answer replacing the timeout.
    replaced: Duration,
}

/// Rules 11, 20, 21, 30: a network partition between machines, longer
/// than the timeout, heals. The cluster is spread over two network
/// namespaces that the test creates, joined by a veth pair: the head
/// node and two server nodes in A, one server node in B (over ZeroMQ
/// attached with `server --connect` over signed tcp:// links; under MPI a
/// rank of the same `mpirun` job, placed there by the rsh agent). While
/// two drivers stream commands at the servers in A, the server in B runs
/// a command across a cut of the link (B's end down for 8 s): its request
/// is answered `timeout`, and once the link is back the same server node,
/// with the same worker, is online again and its real answer replaces the
/// timeout record. Every acknowledged id ends with exactly one final
/// response, services stop cleanly (`up`, or mpirun, exits 0), and no
/// process is left. Skipped, saying why, where the machine forbids
/// network namespaces (not root, no `ip`, `ip netns add` refused).
#[test]
fn a_partition_between_network_namespaces_heals() {
    let name = "a_partition_between_network_namespaces_heals";
    // Declared first, dropped last: after every process in them is gone.
    let namespaces = match Namespaces::create() {
        Ok(namespaces) => namespaces,
        Err(why) => {
            report(&format!(
                "fault scenario {name} over {}: skipped, {why}",
                transport_name()
            ));
            return;
        }
    };
    let (seed, started) = begin(name);
    let mut cluster = if over_mpi() {
        SplitCluster::mpi(&namespaces)
    } else {
        SplitCluster::zmq(&namespaces)
    };
    let probe = cluster.driver();
    let (servers, head_node) = cluster.wait_ready(&probe);
    assert!(
        namespaces.holds(A, head_node),
        "the head node (PID {head_node}) is not in {}\n{}",
        namespaces.names[A],
        cluster.diagnostics()
    );
    let (remote, local): (Vec<ServerStatus>, Vec<ServerStatus>) = servers
        .into_iter()
        .partition(|s| namespaces.holds(B, Pid::from_raw(s.pid as i32)));
    assert!(
        remote.len() == 1
            && local
                .iter()
                .all(|s| namespaces.holds(A, Pid::from_raw(s.pid as i32))),
        "expected one server in {} and the others in {}: {remote:?} {local:?}\n{}",
        namespaces.names[B],
        namespaces.names[A],
        cluster.diagnostics()
    );
    let remote = remote.into_iter().next().expect("one");
    let local: Vec<Rank> = local.iter().map(|s| s.rank).collect();
    // Over ZeroMQ the command ends during the cut, and its answer waits
    // on the quiet link (rule 30); under MPI it outlasts the cut, and its
    // answer crosses the link once it is back.
    let command = if over_mpi() {
        "time.sleep(10) or 99"
    } else {
        "time.sleep(4) or 99"
    };
    let drivers: Vec<Driver> = (0..DRIVERS).map(|_| cluster.driver()).collect();
    let done = AtomicBool::new(false);
    let (streams, mut probed, partition) = std::thread::scope(|scope| {
        let (cluster, done, local) = (&cluster, &done, &local);
        let running: Vec<_> = drivers
            .iter()
            .enumerate()
            .map(|(i, driver)| {
                scope.spawn(move || {
                    let mut stream =
                        Stream::new(driver, seed, 1 + i as u8, local.clone(), Mix::ORDINARY);
                    stream.run_while(|_| !done.load(Ordering::Relaxed), || cluster.note_tree());
                    stream.finish();
                    (std::mem::take(&mut stream.ledger), stream.open)
                })
            })
            .collect();
        let stop_streams = SetOnDrop(done);
        let (probed, partition) = cut_and_heal(&namespaces, cluster, &probe, &remote, command);
        drop(stop_streams);
        let streams: Vec<(Ledger, bool)> = running
            .into_iter()
            .map(|stream| {
                stream
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e))
            })
            .collect();
        (streams, probed, partition)
    });
    let mut ledgers = Vec::new();
    for (ledger, open) in streams {
        assert!(open, "the head node went away\n{}", cluster.diagnostics());
        ledgers.push(ledger);
    }
    check_serves(&drivers[0], &mut ledgers[0]);

    // Services stop: the launcher ends well, and so does the remote server
    // node, told to stop over the healed link.
    cluster.note_tree();
    let stopping = Instant::now();
    probe.stop();
    let status = cluster.run.wait_exit(HANG);
    assert!(
        status.is_some_and(|s| s.success()),
        "the cluster's launcher did not end well within {HANG:?} of stop services: {status:?}\n{}",
        cluster.diagnostics()
    );
    if let Some(remote) = &mut cluster.remote {
        let status = remote.wait_timeout(EXIT_BOUND);
        assert!(
            status.is_some_and(|s| s.success()),
            "the remote server node did not end well within {EXIT_BOUND:?}: {status:?}\n{}",
            cluster.diagnostics()
        );
    }
    let left = cluster.run.procs().survivors(EXIT_BOUND);
    assert!(
        left.is_empty(),
        "processes left behind {EXIT_BOUND:?} after the cluster ended: {left:?}\n{}",
        cluster.diagnostics()
    );
    let stopped = stopping.elapsed();

    let mut total = Ledger::default();
    let mut outcomes = Outcomes::default();
    for (driver, ledger) in drivers.iter().zip(&ledgers) {
        assert!(driver.wait_closed(HANG), "the front door stayed open");
        outcomes.add(&check_responses(ledger, driver, false));
        total.add(ledger);
    }
    assert!(probe.wait_closed(HANG), "the front door stayed open");
    let probe_outcomes = check_responses(&probed, &probe, false);
    assert_eq!(
        probe_outcomes.replaced,
        1,
        "the remote server's command: {:?}",
        probe.deliveries()
    );
    outcomes.add(&probe_outcomes);
    total.add(&std::mem::take(&mut probed));
    let note = format!(
        " (link cut {:.1} s; server n# {} in the other namespace answered timeout {:.1} s into the cut, \
         was online again {:.1} s after the link came back, and its answer replaced the timeout \
         {:.1} s after; every process gone {:.2} s after stop services)",
        CUT.as_secs_f64(),
        remote.rank,
        partition.timed_out.as_secs_f64(),
        partition.online.as_secs_f64(),
        partition.replaced.as_secs_f64(),
        stopped.as_secs_f64()
    );
    summary(name, seed, &total, 1, &outcomes, started, &note);
}

/// Runs `command` on the `remote` server, cuts its link (B's end of the
/// pair) while it runs, for [`CUT`], and restores it; checks that the
/// request is answered `timeout` during the cut, that afterwards the same
/// server node and worker are online again, that the real answer (99)
/// replaces the timeout record, and that the server serves on. The probe's
/// requests, and the partition's times.
fn cut_and_heal(
    namespaces: &Namespaces,
    cluster: &SplitCluster,
    probe: &Driver,
    remote: &ServerStatus,
    command: &str,
) -> (Ledger, Partition) {
    let mut ledger = Ledger::default();
    let mut submit = |command: &str, expect: Expect| {
        let ids = probe
            .submit(request(command, vec![], vec![remote.rank], None))
            .expect("the head node is up")
            .expect("accepted");
        ledger.submitted += 1;
        ledger.accepted.insert(ids[0], expect);
        ids[0]
    };
    let id = submit(command, Expect::Ret(99));
    // It may first finish commands sent ahead to it.
    let end = Instant::now() + HANG;
    while probe.server(remote.rank).command_id != id {
        assert!(
            Instant::now() < end,
            "the remote server never ran request {id}\n{}",
            cluster.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // B's end goes down: A's end loses its carrier but keeps its address
    // and routes, so the servers in A, whose node links go to A's address,
    // are untouched.
    let cut_at = Instant::now();
    namespaces.set_link(B, false);
    probe.wait(&[id], HANG).expect("the head node is up");
    let timed_out = cut_at.elapsed();
    let first = probe.final_of(id).expect("waited for");
    assert_eq!(
        first.status,
        CommandStatus::Timeout,
        "request {id} was answered across a cut link: {first:?}\n{}",
        cluster.diagnostics()
    );
    // The cut's length is the scenario, not a synchronisation.
    std::thread::sleep(CUT.saturating_sub(cut_at.elapsed()));
    namespaces.set_link(B, true);
    let restored_at = Instant::now();
    let end = restored_at + HANG;
    let again = loop {
        let status = probe.server(remote.rank);
        if status.online && !status.timeout {
            break status;
        }
        assert!(
            Instant::now() < end,
            "server n# {} never came back online after the partition: {status:?}\n{}",
            remote.rank,
            cluster.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let online = restored_at.elapsed();
    let replacement = probe.wait_replaced(id, HANG);
    let replaced = restored_at.elapsed();
    assert!(
        replacement.successful && replacement.ret == Some(Value::from(99)),
        "request {id}'s real answer: {replacement:?}"
    );
    assert_eq!(
        (again.pid, again.worker_pid),
        (remote.pid, remote.worker_pid),
        "the remote server node or its worker was replaced\n{}",
        cluster.diagnostics()
    );
    // It serves on.
    let next = submit("6*7", Expect::Ret(42));
    probe.wait(&[next], HANG).expect("the head node is up");
    let answer = probe.final_of(next).expect("waited for");
    assert_eq!(answer.ret, Some(Value::from(42)), "{answer:?}");
    (
        ledger,
        Partition {
            timed_out,
            online,
            replaced,
        },
    )
}
