//! casa-node's MPI transport: rank 0 of `MPI_COMM_WORLD` is the head node,
//! ranks 1.. are server nodes, with the [`mpi`] crate (rsmpi) over the
//! system's MPI library (Open MPI, MPICH, …).
//!
//! [`MpiTransport::init`] initialises MPI and returns this process's side of
//! the [`Transport`]. The world size comes from MPI itself (`MPI_Init`, then
//! the size of the world), not from a launcher's environment variables, so
//! `mpirun`, `mpiexec` and `srun` all work. Rank 0's peers are ranks
//! `1..N`, a server's only peer is rank 0; all exist from the start, so no
//! [`TransportEvent::PeerJoined`] is ever reported. A world of one process
//! is refused ([`MpiError::WorldTooSmall`]). [`MpiTransport::info`] tells
//! the MPI library's version, the standard version and the thread level
//! granted, for the log.
//!
//! # One thread calls MPI
//!
//! A dedicated progress thread initialises MPI, is the only thread that
//! calls it, and finalises it, so `MPI_THREAD_FUNNELED` is enough and stock
//! builds of Open MPI and MPICH work. The async side talks to it through
//! channels: [`Transport::send`] encodes the envelope and hands the bytes to
//! the thread; [`Transport::recv`] reads what the thread received from a
//! tokio channel, which makes it cancel-safe.
//!
//! # Messages
//!
//! Each envelope is one MPI message of its protobuf bytes (no length prefix:
//! MPI delimits messages), with tag 1; control messages have tag 2. The
//! receiver learns each message's size with a matched probe
//! (`MPI_Improbe`, then `MPI_Mrecv` into a buffer of exactly that size), so
//! messages of any size up to [`MpiConfig::max_frame`] pass without a
//! preallocated buffer. Sends are nonblocking (`MPI_Isend`) and tested in
//! the progress loop, which keeps receiving meanwhile: two ranks sending
//! each other large messages at once do not deadlock.
//!
//! # Delivery and flow control
//!
//! Messages from one rank to another arrive in order (MPI's non-overtaking
//! rule), none lost and none duplicated. Each peer has a window: at most
//! [`MpiConfig::window`] messages and [`MpiConfig::max_in_flight_bytes`]
//! bytes (a larger message goes alone) may be handed to the transport and
//! not yet completed by MPI; [`Transport::send`] waits only when that peer's
//! window is full. The progress thread always takes what arrives, so a
//! sender's sends complete even when the receiving application is slow to
//! call `recv`; what it has not read yet waits in memory on its side. A send
//! that MPI cannot complete (its peer is stopped) holds up only later sends
//! to that peer, not those to the others.
//!
//! # Waiting when idle
//!
//! MPI has no file descriptor to sleep on, so the thread polls, as
//! [`IdlePolicy`] sets out. After the last activity (a message in or out, a
//! completed send, a command) it probes back to back for
//! [`IdlePolicy::spin`] (50 µs by default), then probes yielding its core
//! between probes for [`IdlePolicy::yield_for`] (200 µs): a reply within
//! that time is seen at once, and on an oversubscribed node the spinning
//! gives way to the application's threads. Then it sleeps between probes,
//! from [`IdlePolicy::first_sleep`] (10 µs) doubling up to
//! [`IdlePolicy::max_sleep`] (500 µs): an idle rank wakes about 2 000 times
//! a second (measured: 2.2–2.6 % of a core per idle rank on a 2-core VM,
//! with 4 and with 9 ranks; 1.2 % with a 1 ms cap, 7 % with 100 µs), and a
//! message reaching a long-idle rank waits at most `max_sleep` (plus the
//! kernel's timer slack) before it is seen. A local `send` wakes the thread at once; while sends
//! of its own are in progress it yields instead of sleeping, since some MPI
//! transports move data only while MPI is called.
//!
//! # Leaving
//!
//! [`Transport::shutdown`] flushes what was sent, says goodbye (a control
//! message) to every peer still up, waits for their answers (at most
//! [`MpiConfig::linger`]), and finalises MPI; afterwards `send` and `recv`
//! fail with [`TransportError::Closed`]. A peer that receives the goodbye
//! answers it, reports [`TransportEvent::PeerLost`] after every message
//! sent before it, and can no longer send to that rank. On a server node,
//! losing rank 0 ends the transport: after `PeerLost(0)`, `recv` and `send`
//! fail with [`TransportError::Disconnected`]`(0)`. Rank 0 goes on when
//! servers leave. Dropping the transport without `shutdown` does the same
//! as `shutdown` and blocks until MPI is finalised (at most
//! [`MpiConfig::linger`] plus [`MpiConfig::finalize_timeout`]).
//!
//! MPI itself offers no way to leave the world early: a process that exits
//! or crashes without finalising normally makes the launcher end the whole
//! job, so there is no `PeerLost` for that case. With Open MPI,
//! `MPI_Finalize` also waits for every rank to reach it, so `shutdown`
//! returns once all ranks have shut down, or fails after
//! [`MpiConfig::finalize_timeout`] (a stopped or hung rank), leaving the
//! progress thread behind so that the process can exit.
//!
//! # Safety
//!
//! No `unsafe` here: rsmpi's safe nonblocking sends borrow their buffer for
//! a request scope, so the progress thread keeps send buffers in epochs
//! (see `engine.rs`) rather than handing MPI raw pointers.

mod engine;
mod idle;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use casa_node_protocol::pb::Envelope;
use casa_node_protocol::{
    DEFAULT_MAX_FRAME, FrameError, Framing, OFFLOAD_THRESHOLD, Rank, Transport, TransportError,
    TransportEvent,
};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tokio::sync::{mpsc, oneshot};

use engine::{Channels, Command, Delivery, Links, Settings};
pub use idle::IdlePolicy;
/// The thread levels MPI can grant (see [`MpiInfo::threading`]).
pub use mpi::Threading;

/// Messages a sender may have in flight to one peer by default.
pub const DEFAULT_WINDOW: u32 = 32_768;

/// Bytes a sender may have in flight to one peer by default.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: u32 = 64 << 20;

/// The largest message MPI can carry as a count of bytes (`int`).
pub const MAX_MPI_MESSAGE: usize = i32::MAX as usize;

/// How the transport behaves; [`Default`] suits most uses.
#[derive(Debug, Clone)]
pub struct MpiConfig {
    /// The largest envelope sent or accepted, in bytes; at most
    /// [`MAX_MPI_MESSAGE`].
    pub max_frame: usize,
    /// Messages that may be in flight to one peer (handed to the transport,
    /// not yet completed by MPI) before `send` waits; at least 1.
    pub window: u32,
    /// Bytes that may be in flight to one peer before `send` waits (a
    /// larger message waits until nothing else is in flight); at least 1.
    pub max_in_flight_bytes: u32,
    /// How the progress thread waits when idle.
    pub idle: IdlePolicy,
    /// How long `shutdown` waits for peers to answer the goodbye.
    pub linger: Duration,
    /// How long `shutdown` (or a drop) waits, after the linger, for the
    /// progress thread to finish its sends and `MPI_Finalize` to return.
    /// With Open MPI, `MPI_Finalize` returns once every rank has called
    /// it, so a stopped or hung rank holds it up; after this time the
    /// thread is left behind, and the process can exit (which makes the
    /// launcher end the job).
    pub finalize_timeout: Duration,
}

impl Default for MpiConfig {
    fn default() -> Self {
        MpiConfig {
            max_frame: DEFAULT_MAX_FRAME,
            window: DEFAULT_WINDOW,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            idle: IdlePolicy::default(),
            linger: Duration::from_secs(5),
            finalize_timeout: Duration::from_secs(30),
        }
    }
}

/// What MPI says about itself and this process, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpiInfo {
    /// This process's rank in the world.
    pub rank: Rank,
    /// The number of processes in the world.
    pub world_size: i32,
    /// The thread level MPI granted (`Funneled` was asked for).
    pub threading: Threading,
    /// The version of the MPI standard the library implements.
    pub standard_version: (i32, i32),
    /// The library's own description (`MPI_Get_library_version`).
    pub library_version: String,
    /// The host this rank runs on (`MPI_Get_processor_name`).
    pub processor_name: String,
}

impl MpiInfo {
    fn gather(world: &SimpleCommunicator, threading: Threading) -> Self {
        let clean = |text: Result<String, _>| {
            text.map(|t: String| {
                t.trim_matches(|c: char| c == '\0' || c.is_whitespace())
                    .to_owned()
            })
            .unwrap_or_else(|_| "(not UTF-8)".to_owned())
        };
        MpiInfo {
            rank: world.rank(),
            world_size: world.size(),
            threading,
            standard_version: mpi::environment::version(),
            library_version: clean(mpi::environment::library_version()),
            processor_name: clean(mpi::environment::processor_name()),
        }
    }
}

impl fmt::Display for MpiInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = self.standard_version;
        let library = self.library_version.lines().next().unwrap_or_default();
        write!(
            f,
            "rank {} of {} on {}, MPI {major}.{minor} ({library}), thread level {:?}",
            self.rank, self.world_size, self.processor_name, self.threading
        )
    }
}

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum MpiError {
    /// MPI was initialised before in this process (by this transport or
    /// another library); MPI allows it once per process.
    #[error("MPI was already initialised in this process, and can be only once")]
    AlreadyInitialized,
    /// The world has fewer than 2 processes: there is no server node.
    #[error(
        "the MPI world has {0} process(es); casa-node needs at least 2 \
         (rank 0 is the head node, ranks 1.. are server nodes): \
         start it with `mpirun -n N` and N >= 2"
    )]
    WorldTooSmall(i32),
    /// The progress thread could not be started.
    #[error("could not start the MPI progress thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The progress thread stopped before MPI was up.
    #[error("the MPI progress thread stopped while initialising MPI")]
    ThreadDied,
}

impl From<MpiError> for TransportError {
    fn from(error: MpiError) -> Self {
        TransportError::Io {
            context: "starting the MPI transport".to_owned(),
            source: Box::new(error),
        }
    }
}

/// A [`Transport`] over MPI; see the [crate] documentation.
pub struct MpiTransport {
    info: MpiInfo,
    framing: Framing,
    max_in_flight_bytes: u32,
    links: Arc<Mutex<Links>>,
    commands: std_mpsc::Sender<Command>,
    events: mpsc::UnboundedReceiver<Delivery>,
    /// Fires when the progress thread has finalised MPI.
    finished: Option<oneshot::Receiver<()>>,
    /// The same, for `Drop`.
    finished_sync: std_mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
    /// How long closing may take: linger plus finalize timeout.
    closing_time: Duration,
    closed: bool,
    /// On a server node, set once rank 0 is lost.
    ended: bool,
    /// Per peer, what encodes large messages off the event loop's thread.
    encoders: HashMap<Rank, Encoder>,
    /// Per peer, a large message being decoded on a blocking thread, and
    /// what arrived from that peer after it.
    decoding: HashMap<Rank, Decoding>,
    /// Events ready for `recv`, in order.
    ready: VecDeque<TransportEvent>,
}

/// A large message being decoded, and what came after it from its sender.
struct Decoding {
    task: tokio::task::JoinHandle<Result<Envelope, FrameError>>,
    after: VecDeque<Delivery>,
}

/// What a peer's encoder hands to the progress thread, in the order given.
enum EncoderItem {
    /// A message to encode off the event loop's thread.
    Message(EncodeJob),
    /// Everything given before has reached the progress thread: says so.
    /// `shutdown` waits for this before its goodbye, which must not
    /// overtake a message still being encoded.
    Flushed(oneshot::Sender<()>),
}

/// A message to encode off the event loop's thread, its credit taken.
struct EncodeJob {
    envelope: Envelope,
    len: usize,
    window: Arc<engine::Window>,
    charge: u32,
}

/// Encodes one peer's messages in order, large ones on a blocking thread,
/// and hands them to the progress thread. While it holds any, later
/// messages to that peer go through it too, so none overtakes another.
struct Encoder {
    jobs: mpsc::UnboundedSender<EncoderItem>,
    /// Items given to it and not yet handed to the progress thread.
    pending: Arc<AtomicUsize>,
}

impl Encoder {
    fn spawn(to: Rank, framing: Framing, commands: std_mpsc::Sender<Command>) -> Encoder {
        let (jobs, mut queue) = mpsc::unbounded_channel::<EncoderItem>();
        let pending = Arc::new(AtomicUsize::new(0));
        let left = pending.clone();
        tokio::spawn(async move {
            while let Some(item) = queue.recv().await {
                let job = match item {
                    EncoderItem::Message(job) => job,
                    EncoderItem::Flushed(done) => {
                        let _ = done.send(());
                        left.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                };
                let EncodeJob {
                    envelope,
                    len,
                    window,
                    charge,
                } = job;
                let encoded = if len >= OFFLOAD_THRESHOLD {
                    tokio::task::spawn_blocking(move || framing.encode_body(&envelope))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()))
                } else {
                    framing.encode_body(&envelope).map_err(|e| e.to_string())
                };
                match encoded {
                    Ok(body) => {
                        let _ = commands.send(Command::Send { to, body, charge });
                    }
                    Err(error) => {
                        // Its credit was taken: give it back.
                        tracing::warn!(to, %error, "dropping a message that cannot be encoded");
                        window.messages.add_permits(1);
                        window.bytes.add_permits(charge as usize);
                    }
                }
                // Only once the progress thread has it may a later message
                // skip this queue.
                left.fetch_sub(1, Ordering::AcqRel);
            }
        });
        Encoder { jobs, pending }
    }

    /// Whether it holds items not yet handed to the progress thread.
    fn busy(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// Queues `item` behind what it holds; false if the encoder has
    /// stopped.
    fn queue(&self, item: EncoderItem) -> bool {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let queued = self.jobs.send(item).is_ok();
        if !queued {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
        queued
    }
}

impl fmt::Debug for MpiTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpiTransport")
            .field("rank", &self.info.rank)
            .field("world_size", &self.info.world_size)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl MpiTransport {
    /// Waits until every encoder has handed what it holds to the progress
    /// thread (what it holds is marked now; the wait borrows nothing, as
    /// the transport is not `Sync`).
    fn flush_encoders(&self) -> impl Future<Output = ()> + Send + use<> {
        let flushing: Vec<_> = self
            .encoders
            .values()
            .filter(|e| e.busy())
            .filter_map(|encoder| {
                let (done, flushed) = oneshot::channel();
                encoder.queue(EncoderItem::Flushed(done)).then_some(flushed)
            })
            .collect();
        async move {
            for flushed in flushing {
                // An encoder that stopped has nothing left to hand over.
                let _ = flushed.await;
            }
        }
    }

    /// Initialises MPI with the default configuration; see
    /// [`init_with`](Self::init_with).
    pub fn init() -> Result<MpiTransport, MpiError> {
        Self::init_with(MpiConfig::default())
    }

    /// Starts the progress thread, which initialises MPI
    /// (`MPI_Init_thread` asking for `MPI_THREAD_FUNNELED`), and returns
    /// this rank's side once MPI is up. Blocks the calling thread for the
    /// time `MPI_Init` takes; needs no tokio runtime. Fails if MPI was
    /// initialised before in this process or the world has one process
    /// only.
    pub fn init_with(config: MpiConfig) -> Result<MpiTransport, MpiError> {
        let max_frame = config.max_frame.min(MAX_MPI_MESSAGE);
        let max_in_flight_bytes = config.max_in_flight_bytes.max(1);
        let settings = Settings {
            max_frame,
            window: config.window.max(1),
            max_in_flight_bytes,
            idle: config.idle,
            linger: config.linger,
        };
        let (started_tx, started_rx) = std_mpsc::sync_channel(1);
        let (commands_tx, commands_rx) = std_mpsc::channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (finished_tx, finished_rx) = oneshot::channel();
        let (finished_sync_tx, finished_sync_rx) = std_mpsc::sync_channel(1);
        let channels = Channels {
            started: started_tx,
            commands: commands_rx,
            events: events_tx,
            finished: finished_tx,
            finished_sync: finished_sync_tx,
        };
        let thread = std::thread::Builder::new()
            .name("mpi-progress".to_owned())
            .spawn(move || engine::run(settings, channels))
            .map_err(MpiError::Thread)?;
        let started = match started_rx.recv() {
            Ok(Ok(started)) => started,
            Ok(Err(error)) => {
                let _ = thread.join();
                return Err(error);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(MpiError::ThreadDied);
            }
        };
        Ok(MpiTransport {
            info: started.info,
            framing: Framing::new(max_frame),
            max_in_flight_bytes,
            links: started.links,
            commands: commands_tx,
            events: events_rx,
            finished: Some(finished_rx),
            finished_sync: finished_sync_rx,
            thread: Some(thread),
            closing_time: config.linger + config.finalize_timeout,
            closed: false,
            ended: false,
            encoders: HashMap::new(),
            decoding: HashMap::new(),
            ready: VecDeque::new(),
        })
    }

    /// Takes one delivery from the progress thread: an event now, or, for
    /// a large message or anything behind one from the same peer, later.
    fn take(&mut self, delivery: Delivery) {
        let from = match &delivery {
            Delivery::Message { from, .. } => *from,
            Delivery::Lost(rank) => *rank,
        };
        if let Some(decoding) = self.decoding.get_mut(&from) {
            decoding.after.push_back(delivery);
            return;
        }
        match delivery {
            Delivery::Message { from, body } if body.len() >= OFFLOAD_THRESHOLD => {
                let framing = self.framing;
                let task =
                    tokio::task::spawn_blocking(move || framing.decode_body(Bytes::from(body)));
                self.decoding.insert(
                    from,
                    Decoding {
                        task,
                        after: VecDeque::new(),
                    },
                );
            }
            Delivery::Message { from, body } => {
                let decoded = self.framing.decode_body(Bytes::from(body));
                self.decoded(from, decoded);
            }
            Delivery::Lost(rank) => {
                if self.info.rank != 0 && rank == 0 {
                    self.ended = true;
                }
                self.ready.push_back(TransportEvent::PeerLost(rank));
            }
        }
    }

    fn decoded(&mut self, from: Rank, decoded: Result<Envelope, FrameError>) {
        match decoded {
            Ok(envelope) => self
                .ready
                .push_back(TransportEvent::Message { from, envelope }),
            Err(error) => {
                tracing::warn!(from, %error, "dropping a message that does not decode");
            }
        }
    }

    /// A large message from `from` is decoded: it is ready, and so is what
    /// came after it, up to the next large one.
    fn finish_decoding(&mut self, from: Rank, decoded: Result<Envelope, FrameError>) {
        let Some(decoding) = self.decoding.remove(&from) else {
            return;
        };
        self.decoded(from, decoded);
        for delivery in decoding.after {
            self.take(delivery);
        }
    }

    /// What MPI says about itself and this process.
    pub fn info(&self) -> &MpiInfo {
        &self.info
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().expect("links poisoned")
    }

    /// The error for sending to `to`, which is not up.
    fn unreachable(&self, to: Rank) -> TransportError {
        if self.closed {
            TransportError::Closed
        } else if self.links().lost.contains(&to) {
            TransportError::Disconnected(to)
        } else {
            TransportError::UnknownRank(to)
        }
    }

    /// The error once the progress thread is gone.
    fn thread_gone(&self) -> TransportError {
        if self.closed {
            return TransportError::Closed;
        }
        TransportError::Io {
            context: format!("rank {}'s MPI progress thread", self.info.rank),
            source: "stopped unexpectedly".into(),
        }
    }
}

impl Transport for MpiTransport {
    fn rank(&self) -> Rank {
        self.info.rank
    }

    fn peers(&self) -> Vec<Rank> {
        if self.closed {
            return Vec::new();
        }
        self.links().up.keys().copied().collect()
    }

    fn lost_peers_rejoin(&self) -> bool {
        false
    }

    async fn send(&mut self, to: Rank, envelope: Envelope) -> Result<(), TransportError> {
        if self.closed {
            return Err(TransportError::Closed);
        }
        let window = self.links().up.get(&to).cloned();
        let Some(window) = window else {
            return Err(self.unreachable(to));
        };
        let len = self.framing.encoded_len(&envelope)?;
        self.encoders.retain(|_, e| !e.jobs.is_closed());
        let queued = self.encoders.get(&to).is_some_and(Encoder::busy);
        let body = if len >= OFFLOAD_THRESHOLD || queued {
            None
        } else {
            Some(self.framing.encode_body(&envelope)?)
        };
        let charge = u32::try_from(len)
            .unwrap_or(u32::MAX)
            .clamp(1, self.max_in_flight_bytes);
        // Both waits are cancel-safe: an unused permit goes back. A closed
        // window means the peer left meanwhile.
        let message = window
            .messages
            .acquire()
            .await
            .map_err(|_| self.unreachable(to))?;
        let bytes = window
            .bytes
            .acquire_many(charge)
            .await
            .map_err(|_| self.unreachable(to))?;
        // The progress thread gives them back when MPI completes the send.
        message.forget();
        bytes.forget();
        let Some(body) = body else {
            let (framing, commands) = (self.framing, self.commands.clone());
            let encoder = self
                .encoders
                .entry(to)
                .or_insert_with(|| Encoder::spawn(to, framing, commands));
            let job = EncodeJob {
                envelope,
                len,
                window,
                charge,
            };
            if !encoder.queue(EncoderItem::Message(job)) {
                return Err(self.thread_gone());
            }
            return Ok(());
        };
        drop(envelope);
        self.commands
            .send(Command::Send { to, body, charge })
            .map_err(|_| self.thread_gone())
    }

    async fn recv(&mut self) -> Result<TransportEvent, TransportError> {
        if self.closed {
            return Err(TransportError::Closed);
        }
        loop {
            // Events taken before rank 0 was lost, and PeerLost(0) itself,
            // come first.
            if let Some(event) = self.ready.pop_front() {
                return Ok(event);
            }
            if self.ended {
                return Err(TransportError::Disconnected(0));
            }
            // Cancel-safe: what is taken is kept in `self` before the next
            // await, and the decodings are only polled.
            let decoding = &mut self.decoding;
            let decoded = std::future::poll_fn(|cx| {
                for (&from, decoding) in decoding.iter_mut() {
                    if let std::task::Poll::Ready(result) =
                        std::pin::Pin::new(&mut decoding.task).poll(cx)
                    {
                        return std::task::Poll::Ready((from, result));
                    }
                }
                std::task::Poll::Pending
            });
            tokio::select! {
                (from, result) = decoded => {
                    let result = result.unwrap_or_else(|e| {
                        Err(FrameError::Invalid { at: 0, reason: if e.is_panic() { "decoding panicked" } else { "decoding was cancelled" } })
                    });
                    self.finish_decoding(from, result);
                }
                delivery = self.events.recv() => match delivery {
                    Some(delivery) => self.take(delivery),
                    None => {
                        if self.decoding.is_empty() {
                            return Err(self.thread_gone());
                        }
                        // What is being decoded is delivered first.
                        let (&from, _) = self.decoding.iter().next().expect("not empty");
                        let decoding = self.decoding.get_mut(&from).expect("just seen");
                        let result = (&mut decoding.task).await.unwrap_or_else(|_| {
                            Err(FrameError::Invalid { at: 0, reason: "decoding failed" })
                        });
                        self.finish_decoding(from, result);
                    }
                },
            }
        }
    }

    async fn shutdown(&mut self) -> Result<(), TransportError> {
        if !self.closed {
            // What was sent goes before the goodbye, also a large message
            // still being encoded.
            self.flush_encoders().await;
            self.closed = true;
            // An error means the thread is gone already.
            let _ = self.commands.send(Command::Shutdown);
            self.events.close();
        }
        if let Some(finished) = self.finished.as_mut() {
            let outcome = tokio::time::timeout(self.closing_time, finished).await;
            self.finished = None;
            let thread = self.thread.take();
            let failure = match outcome {
                // The thread has finalised MPI and is returning.
                Ok(Ok(())) => match thread.map(JoinHandle::join) {
                    Some(Err(_)) => Some("the MPI progress thread panicked".to_owned()),
                    _ => None,
                },
                Ok(Err(_)) => Some("the MPI progress thread stopped unexpectedly".to_owned()),
                // Dropping the handle leaves the thread behind.
                Err(_) => Some(format!(
                    "MPI_Finalize did not return within {:?} (a rank that is stopped, \
                     hung or never shuts down holds it up); leaving it behind",
                    self.closing_time
                )),
            };
            if let Some(failure) = failure {
                return Err(TransportError::Io {
                    context: format!("shutting down rank {}'s MPI transport", self.info.rank),
                    source: failure.into(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for MpiTransport {
    /// Without a `shutdown` before, closes the same way and blocks until
    /// MPI is finalised (a process must not exit before that), or at most
    /// [`MpiConfig::linger`] plus [`MpiConfig::finalize_timeout`].
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.commands.send(Command::Shutdown);
            match self.finished_sync.recv_timeout(self.closing_time) {
                Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = thread.join();
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => tracing::warn!(
                    rank = self.info.rank,
                    "MPI_Finalize did not return within {:?}; leaving it behind",
                    self.closing_time
                ),
            }
        }
    }
}
