//! The progress thread: the only thread of the process that calls MPI.
//!
//! It initialises MPI, then loops: takes commands from the async side,
//! starts nonblocking sends, tests the sends in progress, and takes the
//! messages that have arrived with matched probes; when nothing happens it
//! waits as [`IdlePolicy`] says. On shutdown it says goodbye, waits for the
//! goodbyes to be answered, and finalises MPI.
//!
//! # Send buffers
//!
//! rsmpi's safe nonblocking sends borrow their buffer for the lifetime of
//! a request scope, and every request of a scope must complete before the
//! scope ends. So the thread sends in *epochs*: an epoch is a request scope
//! whose send buffers live in slots created before it; once it has started
//! [`EPOCH_MESSAGES`] sends or [`EPOCH_BYTES`] bytes, it starts no more,
//! and it ends (freeing its buffers) when its sends have completed. Small
//! sends complete at once (MPI's eager protocol), so that costs one
//! allocation per epoch, and a large send ends its epoch when it is done.
//!
//! A send that does not complete (its peer is stopped, or slow to take a
//! large message) must not hold up the others: a full epoch whose sends are
//! still in progress opens a nested epoch for new sends, and tests its own
//! sends from there. Sends to a peer with a send in progress in an
//! enclosing epoch wait in that peer's queue (its window then makes
//! `send` to it wait), so the nested epoch can end, and nesting stays as
//! shallow as the number of peers that hold sends up (at most
//! [`MAX_DEPTH`]).

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use casa_node_protocol::Rank;
use mpi::Tag;
use mpi::request::{LocalScope, Request};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tokio::sync::{Semaphore, mpsc::UnboundedSender, oneshot};

use crate::idle::{Backoff, IdlePolicy, Pause};
use crate::{MpiError, MpiInfo};

/// The tag of envelopes.
const TAG_DATA: Tag = 1;
/// The tag of the one-byte control messages below.
const TAG_CONTROL: Tag = 2;
/// Control: "I am leaving and send nothing more; answer with an ack".
static GOODBYE: [u8; 1] = [b'B'];
/// Control: "your goodbye arrived; I send you nothing more".
static GOODBYE_ACK: [u8; 1] = [b'A'];

/// The sends an epoch may start (see the module documentation).
const EPOCH_MESSAGES: usize = 4096;
/// The bytes an epoch may send before it must end.
const EPOCH_BYTES: usize = 64 << 20;
/// Messages taken per round before the thread looks at its other work.
const RECEIVE_BATCH: usize = 64;
/// Commands taken per round.
const COMMAND_BATCH: usize = 256;
/// The most epochs nested in one another; beyond, a full epoch waits for
/// its sends.
const MAX_DEPTH: usize = 64;
/// How long after it started a send in progress keeps the thread from
/// sleeping (see [`IdlePolicy`]); older ones are taken as stuck.
const SENDING_ACTIVE: Duration = Duration::from_secs(1);

/// What the progress thread is told by the async side.
#[derive(Debug)]
pub(crate) enum Command {
    /// Send `body` (an encoded envelope) to `to`; `charge` bytes of its
    /// window were taken for it, and one message.
    Send {
        to: Rank,
        body: Vec<u8>,
        charge: u32,
    },
    /// Say goodbye, flush, finalise MPI.
    Shutdown,
}

/// What the progress thread hands to the async side.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// An envelope's bytes from `from`.
    Message { from: Rank, body: Vec<u8> },
    /// `from` said goodbye; nothing more comes from it.
    Lost(Rank),
}

/// The flow control of sends to one peer: permits taken by `send` and
/// given back when MPI has completed the send.
#[derive(Debug)]
pub(crate) struct Window {
    pub(crate) messages: Semaphore,
    pub(crate) bytes: Semaphore,
}

impl Window {
    fn new(messages: u32, bytes: u32) -> Self {
        Window {
            messages: Semaphore::new(messages as usize),
            bytes: Semaphore::new(bytes as usize),
        }
    }

    fn release(&self, charge: u32) {
        self.messages.add_permits(1);
        self.bytes.add_permits(charge as usize);
    }

    /// Wakes the senders waiting for this window: the peer is gone.
    fn close(&self) {
        self.messages.close();
        self.bytes.close();
    }
}

/// The peers, as both sides see them.
#[derive(Debug, Default)]
pub(crate) struct Links {
    /// Peers that can be sent to, and their windows.
    pub(crate) up: BTreeMap<Rank, Arc<Window>>,
    /// Peers that said goodbye.
    pub(crate) lost: BTreeSet<Rank>,
}

/// What the progress thread reports once MPI is up.
pub(crate) struct Started {
    pub(crate) info: MpiInfo,
    pub(crate) links: Arc<Mutex<Links>>,
}

/// The settings the progress thread needs.
pub(crate) struct Settings {
    pub(crate) max_frame: usize,
    pub(crate) window: u32,
    pub(crate) max_in_flight_bytes: u32,
    pub(crate) idle: IdlePolicy,
    pub(crate) linger: Duration,
}

/// The channels between the progress thread and the async side.
pub(crate) struct Channels {
    pub(crate) started: SyncSender<Result<Started, MpiError>>,
    pub(crate) commands: Receiver<Command>,
    pub(crate) events: UnboundedSender<Delivery>,
    pub(crate) finished: oneshot::Sender<()>,
    /// Told the same, for a `Drop` outside the async world.
    pub(crate) finished_sync: SyncSender<()>,
}

/// The body of the progress thread.
pub(crate) fn run(settings: Settings, channels: Channels) {
    let Channels {
        started,
        commands,
        events,
        finished,
        finished_sync,
    } = channels;
    let Some((universe, threading)) = mpi::initialize_with_threading(mpi::Threading::Funneled)
    else {
        let _ = started.send(Err(MpiError::AlreadyInitialized));
        return;
    };
    let world = universe.world();
    let info = MpiInfo::gather(&world, threading);
    if info.world_size < 2 {
        let _ = started.send(Err(MpiError::WorldTooSmall(info.world_size)));
        // Dropping `universe` finalises MPI.
        return;
    }
    if threading < mpi::Threading::Funneled {
        tracing::warn!(
            ?threading,
            "the MPI library grants less than MPI_THREAD_FUNNELED; \
             MPI is called from one thread only, which most libraries accept"
        );
    }
    let rank = info.rank;
    let peers: Vec<Rank> = if rank == 0 {
        (1..info.world_size).collect()
    } else {
        vec![0]
    };
    let windows: BTreeMap<Rank, Arc<Window>> = peers
        .iter()
        .map(|&peer| {
            let window = Window::new(settings.window, settings.max_in_flight_bytes);
            (peer, Arc::new(window))
        })
        .collect();
    let links = Arc::new(Mutex::new(Links {
        up: windows.clone(),
        lost: BTreeSet::new(),
    }));
    tracing::info!(%info, "MPI initialised");
    if started
        .send(Ok(Started {
            info,
            links: links.clone(),
        }))
        .is_err()
    {
        return;
    }
    let mut engine = Engine {
        // A communicator of our own, so that other MPI users in the process
        // cannot take our messages or we theirs.
        comm: world.duplicate(),
        max_frame: settings.max_frame,
        linger: settings.linger,
        commands,
        commands_open: true,
        events,
        links,
        windows,
        queues: BTreeMap::new(),
        waiting: BTreeSet::new(),
        closing: None,
        backoff: Backoff::new(settings.idle),
    };
    while engine.epoch(&mut Outermost) == Flow::NextEpoch {}
    // Frees the communicator before MPI_Finalize.
    drop(engine);
    drop(universe);
    tracing::debug!(rank, "MPI finalised");
    let _ = finished.send(());
    let _ = finished_sync.send(());
}

/// A send waiting to be started, in its peer's queue.
enum Outgoing {
    Data { body: Vec<u8>, charge: u32 },
    Goodbye,
}

/// The goodbye handshake of a shutdown in progress.
struct Closing {
    since: Instant,
    /// Peers whose answer to our goodbye has not come yet.
    awaiting: BTreeSet<Rank>,
    /// Whether the linger ran out.
    lingered: bool,
}

/// What an epoch tells the one around it when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Its sends are done: go on.
    NextEpoch,
    /// The shutdown is complete: end once your own sends are done.
    Stop,
}

/// The state of the progress thread.
struct Engine {
    comm: SimpleCommunicator,
    max_frame: usize,
    linger: Duration,
    commands: Receiver<Command>,
    /// False once the transport handle is gone.
    commands_open: bool,
    events: UnboundedSender<Delivery>,
    links: Arc<Mutex<Links>>,
    /// The peers that are up, as this thread sees them.
    windows: BTreeMap<Rank, Arc<Window>>,
    /// Per peer, the sends not started yet, in the order they were asked for.
    queues: BTreeMap<Rank, VecDeque<Outgoing>>,
    /// The peers whose queue is not empty.
    waiting: BTreeSet<Rank>,
    closing: Option<Closing>,
    backoff: Backoff,
}

/// The sends in progress of the epochs around the current one.
trait Enclosing {
    /// Tests them; gives the windows back for those done. True if any was.
    fn complete(&mut self) -> bool;
    /// Whether one of them goes to `peer`.
    fn sending_to(&self, peer: Rank) -> bool;
    /// Whether one of them started less than [`SENDING_ACTIVE`] ago.
    fn sending(&self) -> bool;
    /// How many epochs there are around the current one.
    fn depth(&self) -> usize;
}

/// Around the outermost epoch: nothing.
struct Outermost;

impl Enclosing for Outermost {
    fn complete(&mut self) -> bool {
        false
    }

    fn sending_to(&self, _peer: Rank) -> bool {
        false
    }

    fn sending(&self) -> bool {
        false
    }

    fn depth(&self) -> usize {
        0
    }
}

/// An epoch that has a nested one, as that one sees it.
struct Around<'e, 'a, 's> {
    epoch: &'e mut Epoch<'a, 's>,
    enclosing: &'e mut dyn Enclosing,
}

impl Enclosing for Around<'_, '_, '_> {
    fn complete(&mut self) -> bool {
        let mine = self.epoch.complete();
        self.enclosing.complete() || mine
    }

    fn sending_to(&self, peer: Rank) -> bool {
        self.epoch.sending_to(peer) || self.enclosing.sending_to(peer)
    }

    fn sending(&self) -> bool {
        self.epoch.sending() || self.enclosing.sending()
    }

    fn depth(&self) -> usize {
        1 + self.enclosing.depth()
    }
}

/// One epoch's sends: their buffers live in `slots`, which outlive the
/// epoch's request scope.
struct Epoch<'a, 's> {
    scope: &'s LocalScope<'a>,
    slots: &'a [OnceCell<Vec<u8>>],
    used: usize,
    bytes: usize,
    pending: Vec<InFlight<'a, 's>>,
    /// How many of `pending` go to each peer.
    to_peers: BTreeMap<Rank, usize>,
}

/// A send MPI has not completed yet.
struct InFlight<'a, 's> {
    to: Rank,
    started: Instant,
    /// The window to give the permits back to, and how many bytes.
    credit: Option<(Arc<Window>, u32)>,
    request: Request<'a, [u8], &'s LocalScope<'a>>,
}

impl<'a, 's> Epoch<'a, 's> {
    fn new(scope: &'s LocalScope<'a>, slots: &'a [OnceCell<Vec<u8>>]) -> Self {
        Epoch {
            scope,
            slots,
            used: 0,
            bytes: 0,
            pending: Vec::new(),
            to_peers: BTreeMap::new(),
        }
    }

    /// No more data sends in this epoch: its buffers are to be freed.
    fn full(&self) -> bool {
        self.used == self.slots.len() || self.bytes >= EPOCH_BYTES
    }

    fn sending_to(&self, peer: Rank) -> bool {
        self.to_peers.contains_key(&peer)
    }

    fn sending(&self) -> bool {
        self.pending
            .iter()
            .any(|in_flight| in_flight.started.elapsed() < SENDING_ACTIVE)
    }

    fn send_data(
        &mut self,
        comm: &SimpleCommunicator,
        to: Rank,
        body: Vec<u8>,
        credit: (Arc<Window>, u32),
    ) {
        let slots: &'a [OnceCell<Vec<u8>>] = self.slots;
        self.bytes += body.len();
        let buffer: &'a [u8] = slots[self.used].get_or_init(|| body);
        self.used += 1;
        let request = comm
            .process_at_rank(to)
            .immediate_send_with_tag(self.scope, buffer, TAG_DATA);
        self.track(to, Some(credit), request);
    }

    fn send_control(&mut self, comm: &SimpleCommunicator, to: Rank, what: &'static [u8; 1]) {
        let request =
            comm.process_at_rank(to)
                .immediate_send_with_tag(self.scope, &what[..], TAG_CONTROL);
        self.track(to, None, request);
    }

    fn track(
        &mut self,
        to: Rank,
        credit: Option<(Arc<Window>, u32)>,
        request: Request<'a, [u8], &'s LocalScope<'a>>,
    ) {
        *self.to_peers.entry(to).or_default() += 1;
        self.pending.push(InFlight {
            to,
            started: Instant::now(),
            credit,
            request,
        });
    }

    /// Tests the sends in progress; gives the window back for those done.
    fn complete(&mut self) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let before = self.pending.len();
        let mut still = Vec::with_capacity(before);
        for in_flight in self.pending.drain(..) {
            match in_flight.request.test() {
                Ok(_) => {
                    if let Some((window, charge)) = in_flight.credit {
                        window.release(charge);
                    }
                    if let Some(count) = self.to_peers.get_mut(&in_flight.to) {
                        *count -= 1;
                        if *count == 0 {
                            self.to_peers.remove(&in_flight.to);
                        }
                    }
                }
                Err(request) => still.push(InFlight {
                    request,
                    ..in_flight
                }),
            }
        }
        self.pending = still;
        self.pending.len() != before
    }
}

impl Engine {
    /// Runs an epoch (see the module documentation) inside `enclosing`.
    fn epoch(&mut self, enclosing: &mut dyn Enclosing) -> Flow {
        let slots: Vec<OnceCell<Vec<u8>>> = (0..EPOCH_MESSAGES).map(|_| OnceCell::new()).collect();
        mpi::request::scope(|scope| self.run_epoch(Epoch::new(scope, &slots), enclosing))
    }

    fn run_epoch(&mut self, mut epoch: Epoch<'_, '_>, enclosing: &mut dyn Enclosing) -> Flow {
        let mut stopping = false;
        loop {
            let mut busy = self.take_commands();
            busy |= self.start_sends(&mut epoch, enclosing);
            busy |= epoch.complete();
            busy |= enclosing.complete();
            busy |= self.receive(&mut epoch);
            if epoch.pending.is_empty() {
                if stopping || self.closed_down() {
                    return Flow::Stop;
                }
                if epoch.full() {
                    return Flow::NextEpoch;
                }
            } else if epoch.full() && !stopping && self.can_nest(&epoch, enclosing) {
                let mut around = Around {
                    epoch: &mut epoch,
                    enclosing,
                };
                stopping = self.epoch(&mut around) == Flow::Stop;
                continue;
            }
            self.check_linger();
            if busy {
                self.backoff.reset();
            } else {
                let sending = epoch.sending() || enclosing.sending();
                self.idle(sending);
            }
        }
    }

    /// Whether a nested epoch would have sends to start: a peer with
    /// queued sends and none in progress.
    fn can_nest(&self, epoch: &Epoch<'_, '_>, enclosing: &dyn Enclosing) -> bool {
        enclosing.depth() + 1 < MAX_DEPTH
            && self
                .waiting
                .iter()
                .any(|&peer| !epoch.sending_to(peer) && !enclosing.sending_to(peer))
    }

    fn take_commands(&mut self) -> bool {
        let mut busy = false;
        for _ in 0..COMMAND_BATCH {
            match self.commands.try_recv() {
                Ok(command) => {
                    busy = true;
                    self.on_command(command);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    busy |= self.on_handle_gone();
                    break;
                }
            }
        }
        busy
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Send { to, body, charge } => {
                if self.windows.contains_key(&to) && self.closing.is_none() {
                    self.enqueue(to, Outgoing::Data { body, charge });
                } else {
                    tracing::debug!(to, "dropping a message to a peer that left");
                }
            }
            Command::Shutdown => self.begin_closing(),
        }
    }

    fn enqueue(&mut self, to: Rank, outgoing: Outgoing) {
        self.queues.entry(to).or_default().push_back(outgoing);
        self.waiting.insert(to);
    }

    /// The transport was dropped: close as on shutdown. True the first time.
    fn on_handle_gone(&mut self) -> bool {
        if !self.commands_open {
            return false;
        }
        self.commands_open = false;
        self.begin_closing();
        true
    }

    /// Queues a goodbye to every peer still up, after what is already
    /// queued for it, so that it arrives last.
    fn begin_closing(&mut self) {
        if self.closing.is_some() {
            return;
        }
        let awaiting: BTreeSet<Rank> = self.windows.keys().copied().collect();
        for &peer in &awaiting {
            self.enqueue(peer, Outgoing::Goodbye);
        }
        {
            let mut links = self.links.lock().expect("links poisoned");
            for window in links.up.values() {
                window.close();
            }
            links.up.clear();
        }
        tracing::debug!(peers = ?awaiting, "saying goodbye");
        self.closing = Some(Closing {
            since: Instant::now(),
            awaiting,
            lingered: false,
        });
    }

    /// Starts the queued sends the epoch has room for, in order per peer,
    /// except to peers with a send in progress in an enclosing epoch.
    fn start_sends(&mut self, epoch: &mut Epoch<'_, '_>, enclosing: &dyn Enclosing) -> bool {
        if self.waiting.is_empty() {
            return false;
        }
        let mut busy = false;
        let peers: Vec<Rank> = self.waiting.iter().copied().collect();
        for peer in peers {
            if enclosing.sending_to(peer) {
                continue;
            }
            let queue = self.queues.entry(peer).or_default();
            while let Some(front) = queue.front() {
                if matches!(front, Outgoing::Data { .. }) && epoch.full() {
                    break;
                }
                busy = true;
                match queue.pop_front().expect("there is a front") {
                    Outgoing::Data { body, charge } => match self.windows.get(&peer) {
                        Some(window) => {
                            epoch.send_data(&self.comm, peer, body, (window.clone(), charge));
                        }
                        None => tracing::debug!(peer, "dropping a message to a peer that left"),
                    },
                    Outgoing::Goodbye => epoch.send_control(&self.comm, peer, &GOODBYE),
                }
            }
            if queue.is_empty() {
                self.queues.remove(&peer);
                self.waiting.remove(&peer);
            }
        }
        busy
    }

    /// Takes up to [`RECEIVE_BATCH`] messages that have arrived, of any
    /// size: a matched probe says how long each is.
    fn receive(&mut self, epoch: &mut Epoch<'_, '_>) -> bool {
        let mut busy = false;
        for _ in 0..RECEIVE_BATCH {
            // A probe that finds nothing makes MPI progress, which may take
            // a message in without the probe reporting it (Open MPI's ob1
            // does so): probe once more before concluding nothing is there.
            let probe = || self.comm.any_process().immediate_matched_probe();
            let Some((message, status)) = probe().or_else(probe) else {
                break;
            };
            busy = true;
            let from = status.source_rank();
            let count = status.count(u8::equivalent_datatype());
            // Negative only for messages over 2 GiB, which this transport
            // never sends; receiving such a one into nothing makes MPI
            // report the truncation.
            let len = usize::try_from(count).unwrap_or_else(|_| {
                tracing::error!(from, count, "a message too large for MPI to count");
                0
            });
            let mut body = vec![0u8; len];
            message.matched_receive_into(&mut body[..]);
            match status.tag() {
                TAG_DATA => self.on_data(from, body),
                TAG_CONTROL => self.on_control(from, &body, epoch),
                tag => tracing::warn!(from, tag, "ignoring a message with an unknown tag"),
            }
        }
        busy
    }

    fn on_data(&mut self, from: Rank, body: Vec<u8>) {
        if self.closing.is_some() {
            tracing::trace!(from, "discarding a message that arrived while closing");
        } else if body.len() > self.max_frame {
            tracing::warn!(
                from,
                len = body.len(),
                max = self.max_frame,
                "dropping a message larger than the maximum frame"
            );
        } else if !self.windows.contains_key(&from) {
            tracing::warn!(from, "dropping a message from a rank that is not a peer");
        } else {
            // A closed channel means the handle is gone; the thread learns
            // that from the commands channel.
            let _ = self.events.send(Delivery::Message { from, body });
        }
    }

    fn on_control(&mut self, from: Rank, body: &[u8], epoch: &mut Epoch<'_, '_>) {
        match body {
            b"B" => {
                if let Some(closing) = &mut self.closing {
                    // We are leaving too, and our own goodbye (sent or
                    // queued) tells the peer so: no answer needed.
                    closing.awaiting.remove(&from);
                } else if self.windows.contains_key(&from) {
                    epoch.send_control(&self.comm, from, &GOODBYE_ACK);
                }
                self.lose(from);
            }
            b"A" => match &mut self.closing {
                Some(closing) => {
                    closing.awaiting.remove(&from);
                }
                None => tracing::warn!(from, "ignoring an unexpected goodbye acknowledgement"),
            },
            _ => tracing::warn!(from, ?body, "ignoring an unknown control message"),
        }
    }

    /// `peer` left: no more sends to it (but our goodbye, if queued), and
    /// the async side learns it after every message `peer` sent before.
    fn lose(&mut self, peer: Rank) {
        if self.windows.remove(&peer).is_none() {
            return;
        }
        if let Some(queue) = self.queues.get_mut(&peer) {
            queue.retain(|out| matches!(out, Outgoing::Goodbye));
            if queue.is_empty() {
                self.queues.remove(&peer);
                self.waiting.remove(&peer);
            }
        }
        {
            let mut links = self.links.lock().expect("links poisoned");
            if let Some(window) = links.up.remove(&peer) {
                window.close();
            }
            links.lost.insert(peer);
        }
        if self.closing.is_none() {
            tracing::debug!(peer, "peer said goodbye");
            let _ = self.events.send(Delivery::Lost(peer));
        }
    }

    /// Whether the shutdown is complete, apart from sends in progress.
    fn closed_down(&self) -> bool {
        self.closing
            .as_ref()
            .is_some_and(|closing| closing.awaiting.is_empty() && self.waiting.is_empty())
    }

    /// After the linger time, stops waiting for the peers that have not
    /// answered the goodbye, and drops what is still queued for them.
    fn check_linger(&mut self) {
        let Some(closing) = &mut self.closing else {
            return;
        };
        if closing.lingered || closing.since.elapsed() < self.linger {
            return;
        }
        closing.lingered = true;
        if closing.awaiting.is_empty() {
            return;
        }
        tracing::warn!(
            ranks = ?closing.awaiting,
            linger = ?self.linger,
            "no answer to our goodbye; finalising MPI without it"
        );
        for peer in std::mem::take(&mut closing.awaiting) {
            self.queues.remove(&peer);
            self.waiting.remove(&peer);
        }
    }

    fn idle(&mut self, sending: bool) {
        match self.backoff.pause(sending) {
            Pause::Spin => std::hint::spin_loop(),
            Pause::Yield => std::thread::yield_now(),
            Pause::Sleep(duration) => {
                if !self.commands_open {
                    std::thread::sleep(duration);
                    return;
                }
                match self.commands.recv_timeout(duration) {
                    Ok(command) => {
                        self.on_command(command);
                        self.backoff.reset();
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        self.on_handle_gone();
                        self.backoff.reset();
                    }
                }
            }
        }
    }
}
