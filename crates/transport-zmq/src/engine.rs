//! The task that owns a transport's ZeroMQ socket.
//!
//! One engine runs per [`ZmqTransport`](crate::ZmqTransport), as a tokio
//! task. It alone touches the socket's send half; a second small task (the
//! reader) does nothing but `recv()` on the receive half and hand what it
//! gets over a channel, so the crate's `recv` future is never cancelled.
//! The handle talks to the engine through channels and a little shared
//! state (the per-peer credit semaphores), which is what makes the handle's
//! `recv` cancel-safe and lets `send` wait without blocking the engine.
//!
//! Flow control: the rules and the accounting are in [`credit`](crate::credit),
//! which does no I/O. The engine keeps a [`SendWindow`] and a
//! [`ReceiveWindow`] per peer, tells them what it sends, reads and the
//! application consumes, and sends the grants they ask for; the handle
//! waits on semaphores that hold the credit it has not used yet.
//!
//! Large messages: what takes long per message (decoding one of hundreds
//! of MiB, and on a signed link checking and sealing it) is done for each
//! link by a task of its own ([`Decoder`], [`Checker`], [`Sealer`]) on
//! blocking threads, in order, and the engine serves the other links
//! meanwhile. While such a task holds a message of a link, the link's later
//! messages go through it too, so none overtakes another.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{Envelope, ProtocolErrorCode, Role, Welcome};
use casa_node_protocol::{
    Framing, MAX_RANK, OFFLOAD_THRESHOLD, PROTOCOL_VERSION, Rank, TransportEvent, check_hello,
};
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use zeromq::{
    DealerSendHalf, RouterSendHalf, SocketEvent, SocketSend, ZmqError, ZmqMessage, ZmqResult,
};

use crate::ZmqConfig;
use crate::credit::{BeyondWindow, Budget, Charge, Grant, ReceiveWindow, Refund, SendWindow};
use crate::seal::{self, Direction, LinkId, LinkSeal, NO_NONCE, Nonce, Seal, Signer};
use crate::wire::Header;

/// Messages refused by the signature check that are each logged; after
/// them, one in [`LOG_EVERY`], so that a flood cannot fill the disk.
const LOG_FIRST: u64 = 10;
const LOG_EVERY: u64 = 1000;

/// Connections welcomed and not yet proven fresh that a head node keeps;
/// beyond it, Hellos are refused until some expire.
const MAX_PENDING: usize = 1024;

/// Hello nonces a head node remembers, to name a replayed Hello at once.
const SEEN_HELLOS: usize = 4096;

/// Refused connections a head node remembers, to refuse each once; when
/// there are more, it forgets them all (so one that goes on sending is
/// refused once more per this many refusals to others).
const REFUSED: usize = 4096;

/// State the handle reads and the engine writes.
#[derive(Default)]
pub(crate) struct Shared {
    /// The peers one can send to now.
    pub(crate) links: BTreeMap<Rank, Link>,
    /// Peers that were connected and are gone (until their rank is reused).
    pub(crate) lost: BTreeSet<Rank>,
    /// Why the engine stopped, once it has.
    pub(crate) terminal: Option<Terminal>,
    /// Messages dropped because their signature did not check out.
    pub(crate) rejected: u64,
}

/// What the handle needs to send to one connected peer.
#[derive(Clone)]
pub(crate) struct Link {
    /// Tells this connection from an earlier one that had the same rank.
    pub(crate) id: u64,
    /// Data messages the peer lets us send before it returns credit.
    pub(crate) messages: Arc<Semaphore>,
    /// Bytes we may still put in flight to the peer.
    pub(crate) bytes: Arc<Semaphore>,
    /// Bytes small messages may put in flight when `bytes` has too few (see
    /// [`Budget`]).
    pub(crate) reserve: Arc<Semaphore>,
}

impl Link {
    fn new(id: u64, budget: Budget) -> Self {
        Link {
            id,
            messages: Arc::new(Semaphore::new(0)),
            bytes: Arc::new(Semaphore::new(budget.bytes as usize)),
            reserve: Arc::new(Semaphore::new(budget.reserve as usize)),
        }
    }

    /// Gives credit back to the handle.
    pub(crate) fn refund(&self, refund: Refund) {
        self.bytes.add_permits(refund.bytes);
        self.reserve.add_permits(refund.reserve);
        self.messages.add_permits(refund.messages);
    }

    fn close(&self) {
        self.messages.close();
        self.bytes.close();
        self.reserve.close();
    }
}

/// Why an engine stopped.
#[derive(Debug, Clone)]
pub(crate) enum Terminal {
    /// Shut down or dropped by its owner.
    Closed,
    /// A server node lost its head node.
    Lost(Rank),
    /// The socket failed.
    Failed(String),
}

/// What the handle asks of the engine.
pub(crate) enum Command {
    /// Send a data message; the handle has already taken its credit.
    Send {
        to: Rank,
        link: u64,
        body: Bytes,
        charge: Charge,
        credit_wanted: bool,
    },
    /// The handle waits for bytes in flight to `to`: ask it for credit.
    RequestCredit { to: Rank, link: u64 },
    /// The application took a message from `from` off the queue.
    Consumed {
        from: Rank,
        link: u64,
        credit_wanted: bool,
    },
    /// Say goodbye to every peer, then stop; answer when done.
    Shutdown(oneshot::Sender<()>),
}

/// An event for the handle, with what it needs to return credit.
pub(crate) struct Delivery {
    pub(crate) event: TransportEvent,
    pub(crate) link: u64,
    pub(crate) credit_wanted: bool,
}

/// The socket's send half.
pub(crate) enum SendHalf {
    Router(RouterSendHalf),
    Dealer(DealerSendHalf),
}

impl SendHalf {
    /// Sends `parts` to the peer known by `identity` (ignored by a DEALER,
    /// which has one peer).
    async fn send(&mut self, identity: &Bytes, parts: Vec<Bytes>) -> ZmqResult<()> {
        match self {
            SendHalf::Router(half) => {
                let mut message = ZmqMessage::from(identity.clone());
                for part in parts {
                    message.push_back(part);
                }
                half.send(message).await
            }
            SendHalf::Dealer(half) => {
                let message =
                    ZmqMessage::try_from(parts).map_err(|_| ZmqError::Other("empty message"))?;
                half.send(message).await
            }
        }
    }

    fn is_router(&self) -> bool {
        matches!(self, SendHalf::Router(_))
    }
}

/// Spawns the task that receives from the socket, forever, into a channel.
pub(crate) fn spawn_reader<R>(
    mut half: R,
) -> (mpsc::Receiver<ZmqResult<ZmqMessage>>, JoinHandle<()>)
where
    R: zeromq::SocketRecv + Send + 'static,
{
    // Small: the reader waits when the engine is behind, and ZeroMQ and the
    // kernel hold the rest, within the peers' windows.
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(async move {
        loop {
            let result = half.recv().await;
            let failed = result.is_err();
            if tx.send(result).await.is_err() || failed {
                break;
            }
        }
    });
    (rx, task)
}

/// One connected peer, as the engine sees it.
struct Peer {
    /// ZeroMQ's routing identity (empty on a DEALER).
    identity: Bytes,
    link: Link,
    /// The credit of the data messages we send the peer.
    sending: SendWindow,
    /// The credit we grant the peer for the data messages it sends us.
    receiving: ReceiveWindow,
    /// The peer acknowledged our goodbye.
    bye_acked: bool,
    /// On a signed link, its nonces and counters.
    seal: Option<LinkSeal>,
}

/// What a signing engine keeps besides each peer's [`LinkSeal`].
struct Security {
    signer: Signer,
    /// On the head node: connections that sent a valid Hello and were
    /// welcomed, and have not yet sent a message under the nonce of the
    /// Welcome, which proves the Hello was not a replay.
    pending: HashMap<Bytes, Pending>,
    /// On the head node: the nonces of recent Hellos, oldest first.
    seen: VecDeque<Nonce>,
    seen_set: HashSet<Nonce>,
}

/// A welcomed connection that has yet to prove it holds the key.
struct Pending {
    rank: Rank,
    link: LinkId,
    since: Instant,
    requested: Rank,
    host: String,
    pid: u32,
    software: String,
}

/// Why a message failed the signature check.
#[derive(Debug, Clone, Copy)]
enum Rejection {
    /// No seal in front.
    Unsigned,
    /// Sealed by a sender on another link: one that ended, or another
    /// session of the peers (a replay or a stale message).
    OtherLink,
    /// The tag does not match: a wrong key, or the message was altered.
    BadTag,
    /// A counter not above the last one accepted: a replay.
    Replayed { counter: u64, last: u64 },
    /// A Hello seen before.
    ReplayedHello,
    /// Something else than a Hello from a connection that has not joined.
    Stranger,
    /// A message of this many bytes from a connection that has not joined,
    /// refused before its tag is computed.
    Oversized(usize),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Unsigned => f.write_str("not signed"),
            Rejection::OtherLink => f.write_str("signed for another link or session (replayed?)"),
            Rejection::BadTag => {
                f.write_str("the signature does not match (wrong key, or altered)")
            }
            Rejection::Replayed { counter, last } => {
                write!(f, "replayed: counter {counter}, not above {last}")
            }
            Rejection::ReplayedHello => f.write_str("a replayed Hello"),
            Rejection::Stranger => {
                f.write_str("not a Hello, from a connection that has not joined")
            }
            Rejection::Oversized(size) => write!(
                f,
                "{size} bytes from a connection that has not joined, too large for a Hello \
                 (not hashed)"
            ),
        }
    }
}

/// What the signature check made of a message.
enum Unsealed {
    /// From the peer of an established link.
    Link,
    /// A valid Hello from a new connection, with the sender's nonce.
    Hello(Nonce),
    /// The first message of a welcomed connection, with its counter: it
    /// joins.
    Joined(Pending, u64),
}

/// What a peer's [`Decoder`] passes on, in order.
enum Inbound {
    /// A data message's body, to decode and deliver.
    Data {
        body: Bytes,
        link: u64,
        credit_wanted: bool,
    },
    /// An event to deliver once the messages before it are.
    Event(TransportEvent),
}

/// Decodes one peer's messages in order, large ones on a blocking thread,
/// and delivers them. While it holds any, everything else for that peer
/// goes through it too, so nothing overtakes a message being decoded.
struct Decoder {
    link: u64,
    inbox: mpsc::UnboundedSender<Inbound>,
    /// Items given to it and not yet delivered.
    pending: Arc<AtomicUsize>,
}

/// A data message that did not decode, to credit as if consumed.
type Undecodable = (Rank, u64, bool);

impl Decoder {
    fn spawn(
        rank: Rank,
        link: u64,
        framing: Framing,
        events: mpsc::UnboundedSender<Delivery>,
        undecodable: mpsc::UnboundedSender<Undecodable>,
    ) -> Decoder {
        let (inbox, mut queue) = mpsc::unbounded_channel::<Inbound>();
        let pending = Arc::new(AtomicUsize::new(0));
        let left = pending.clone();
        tokio::spawn(async move {
            while let Some(item) = queue.recv().await {
                let delivery = match item {
                    Inbound::Data {
                        body,
                        link,
                        credit_wanted,
                    } => {
                        let decoded = if body.len() >= OFFLOAD_THRESHOLD {
                            tokio::task::spawn_blocking(move || framing.decode_body(body))
                                .await
                                .map_err(|e| e.to_string())
                                .and_then(|r| r.map_err(|e| e.to_string()))
                        } else {
                            framing.decode_body(body).map_err(|e| e.to_string())
                        };
                        match decoded {
                            Ok(envelope) => Some(Delivery {
                                event: TransportEvent::Message {
                                    from: rank,
                                    envelope,
                                },
                                link,
                                credit_wanted,
                            }),
                            Err(error) => {
                                warn!(rank, %error, "dropping a malformed envelope");
                                let _ = undecodable.send((rank, link, credit_wanted));
                                None
                            }
                        }
                    }
                    Inbound::Event(event) => Some(Delivery {
                        event,
                        link: 0,
                        credit_wanted: false,
                    }),
                };
                if let Some(delivery) = delivery {
                    let _ = events.send(delivery);
                }
                // Only once it is delivered may later items skip this queue.
                left.fetch_sub(1, Ordering::AcqRel);
            }
        });
        Decoder {
            link,
            inbox,
            pending,
        }
    }

    fn busy(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    fn push(&self, item: Inbound) -> bool {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.inbox.send(item).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }
}

/// What goes through a peer's [`Checker`], in order.
enum Checked {
    /// A message of the peer's link, seal first. Once through the checker,
    /// `verified` says whether the tag of a large one checks out; a small
    /// one (`None`) the engine checks itself.
    Message {
        identity: Bytes,
        parts: VecDeque<Bytes>,
        verified: Option<bool>,
    },
    /// The connection closed, or (on a server node) failed with
    /// `failure`, after the messages before this.
    Gone {
        identity: Bytes,
        failure: Option<String>,
    },
}

/// Checks the tags of one signed link's large incoming messages on a
/// blocking thread, in order, and hands every message back to the engine,
/// which checks its counter and acts on it there: an HMAC of hundreds of
/// MiB takes seconds, and the engine serves the other peers meanwhile.
/// While it holds any message of the link, every later one of that link
/// goes through it too, so that none is acted on before one that came
/// earlier.
struct Checker {
    jobs: mpsc::UnboundedSender<Checked>,
    /// Items given to it and not yet back (only the engine counts).
    pending: usize,
}

impl Checker {
    /// A checker for link `link`, named `id`, whose messages come
    /// `direction`; it hands them back on `back`, with `link`.
    fn spawn(
        link: u64,
        signer: Signer,
        direction: Direction,
        id: LinkId,
        back: mpsc::UnboundedSender<(u64, Checked)>,
    ) -> Checker {
        let (jobs, mut queue) = mpsc::unbounded_channel::<Checked>();
        tokio::spawn(async move {
            while let Some(mut item) = queue.recv().await {
                if let Checked::Message {
                    parts, verified, ..
                } = &mut item
                    && parts.iter().map(Bytes::len).sum::<usize>() >= OFFLOAD_THRESHOLD
                {
                    let (signer, mut covered) = (signer.clone(), parts.clone());
                    let checking = tokio::task::spawn_blocking(move || {
                        let Some((first, rest)) = covered.make_contiguous().split_first() else {
                            return false;
                        };
                        Seal::parse(first)
                            .is_some_and(|seal| signer.verify(direction, &id, &seal, rest))
                    });
                    // A thread that failed verified nothing.
                    *verified = Some(checking.await.unwrap_or(false));
                }
                if back.send((link, item)).is_err() {
                    break;
                }
            }
        });
        Checker { jobs, pending: 0 }
    }

    fn push(&mut self, item: Checked) -> bool {
        let pushed = self.jobs.send(item).is_ok();
        self.pending += usize::from(pushed);
        pushed
    }
}

/// What goes through a peer's [`Sealer`], in order.
enum Outgoing {
    /// A message to seal with `counter`, then (once back, with its seal in
    /// front) to send.
    Message { counter: u64, parts: Vec<Bytes> },
    /// Sealing failed: the peer is lost.
    Failed(String),
    /// The peer is lost, once what goes before this is sent.
    Lose(String),
}

/// Seals one signed link's outgoing messages in order, large ones on a
/// blocking thread, and hands them back to the engine to send: the engine
/// serves the other peers meanwhile. The engine gives the counters; while
/// the sealer holds any message of the link, every later one goes through
/// it too, so that the messages leave in the order of their counters.
struct Sealer {
    rank: Rank,
    jobs: mpsc::UnboundedSender<Outgoing>,
    /// Items given to it and not yet back (only the engine counts).
    pending: usize,
}

impl Sealer {
    /// A sealer for `rank`'s link `link`, named `id`, whose messages go
    /// `direction`; it hands them back on `back`, with `link`.
    fn spawn(
        rank: Rank,
        link: u64,
        signer: Signer,
        direction: Direction,
        id: LinkId,
        back: mpsc::UnboundedSender<(u64, Outgoing)>,
    ) -> Sealer {
        let (jobs, mut queue) = mpsc::unbounded_channel::<Outgoing>();
        tokio::spawn(async move {
            while let Some(item) = queue.recv().await {
                let item = match item {
                    Outgoing::Message { counter, mut parts } => {
                        let size: usize = parts.iter().map(Bytes::len).sum();
                        if size >= OFFLOAD_THRESHOLD {
                            let signer = signer.clone();
                            let sealing = tokio::task::spawn_blocking(move || {
                                let seal = signer.seal(direction, &id, counter, &parts);
                                parts.insert(0, seal);
                                parts
                            });
                            match sealing.await {
                                Ok(parts) => Outgoing::Message { counter, parts },
                                Err(error) => Outgoing::Failed(error.to_string()),
                            }
                        } else {
                            parts.insert(0, signer.seal(direction, &id, counter, &parts));
                            Outgoing::Message { counter, parts }
                        }
                    }
                    other => other,
                };
                if back.send((link, item)).is_err() {
                    break;
                }
            }
        });
        Sealer {
            rank,
            jobs,
            pending: 0,
        }
    }

    fn push(&mut self, item: Outgoing) -> bool {
        let pushed = self.jobs.send(item).is_ok();
        self.pending += usize::from(pushed);
        pushed
    }
}

/// An engine and what it listens to.
pub(crate) struct Engine {
    socket: SendHalf,
    config: ZmqConfig,
    framing: Framing,
    shared: Arc<Mutex<Shared>>,
    events: mpsc::UnboundedSender<Delivery>,
    peers: BTreeMap<Rank, Peer>,
    by_identity: HashMap<Bytes, Rank>,
    next_link: u64,
    /// A DEALER that lost the ROUTER has nothing left to do.
    finished: bool,
    closing: bool,
    /// Set when links are signed.
    security: Option<Security>,
    /// On a signed server node, told when the head node's first credit
    /// arrives: it has admitted this node by then.
    admitted: Option<oneshot::Sender<()>>,
    /// Per peer, what decodes its large messages off this thread.
    decoders: HashMap<Rank, Decoder>,
    /// On the head node: connections that have not joined and were
    /// refused, and whether a later Hello of theirs was dropped (and said
    /// so in the log). Each is refused once: a peer that floods Hellos and
    /// reads nothing would otherwise fill the socket's queue for it, and
    /// then the engine would wait on it and serve no other peer.
    refused: HashMap<Bytes, bool>,
    undecodable_tx: mpsc::UnboundedSender<Undecodable>,
    undecodable_rx: Option<mpsc::UnboundedReceiver<Undecodable>>,
    /// Per signed link (by [`Link::id`]), what checks its large incoming
    /// messages off this task.
    checkers: HashMap<u64, Checker>,
    checked_tx: mpsc::UnboundedSender<(u64, Checked)>,
    checked_rx: Option<mpsc::UnboundedReceiver<(u64, Checked)>>,
    /// Per signed link (by [`Link::id`]), what seals its large outgoing
    /// messages off this task.
    sealers: HashMap<u64, Sealer>,
    sealed_tx: mpsc::UnboundedSender<(u64, Outgoing)>,
    sealed_rx: Option<mpsc::UnboundedReceiver<(u64, Outgoing)>>,
}

/// What an engine waits on.
pub(crate) struct Inputs {
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    pub(crate) incoming: mpsc::Receiver<ZmqResult<ZmqMessage>>,
    pub(crate) monitor: futures::channel::mpsc::Receiver<SocketEvent>,
    pub(crate) reader: JoinHandle<()>,
}

impl Engine {
    pub(crate) fn new(
        socket: SendHalf,
        config: ZmqConfig,
        shared: Arc<Mutex<Shared>>,
        events: mpsc::UnboundedSender<Delivery>,
    ) -> Self {
        let security = config.signing.as_ref().map(|key| Security {
            signer: Signer::new(key),
            pending: HashMap::new(),
            seen: VecDeque::new(),
            seen_set: HashSet::new(),
        });
        let (undecodable_tx, undecodable_rx) = mpsc::unbounded_channel();
        let (checked_tx, checked_rx) = mpsc::unbounded_channel();
        let (sealed_tx, sealed_rx) = mpsc::unbounded_channel();
        Engine {
            socket,
            framing: Framing::new(config.max_frame),
            security,
            admitted: None,
            config,
            shared,
            events,
            peers: BTreeMap::new(),
            by_identity: HashMap::new(),
            next_link: 1,
            finished: false,
            closing: false,
            decoders: HashMap::new(),
            refused: HashMap::new(),
            undecodable_tx,
            undecodable_rx: Some(undecodable_rx),
            checkers: HashMap::new(),
            checked_tx,
            checked_rx: Some(checked_rx),
            sealers: HashMap::new(),
            sealed_tx,
            sealed_rx: Some(sealed_rx),
        }
    }

    /// Registers the ROUTER as rank 0 of a DEALER that was just welcomed
    /// (on `link`, if signed), and grants it its window.
    pub(crate) async fn add_head_node(&mut self, link: Option<LinkSeal>) {
        self.add_peer(0, Bytes::new(), link);
        self.grant_window(0).await;
    }

    /// Tells `admitted` when the head node's first credit arrives.
    pub(crate) fn notify_admission(&mut self, admitted: oneshot::Sender<()>) {
        self.admitted = Some(admitted);
    }

    /// Which way this side sends.
    fn outgoing(&self) -> Direction {
        if self.socket.is_router() {
            Direction::ToDealer
        } else {
            Direction::ToRouter
        }
    }

    /// Sends `parts` to `rank`, sealed if the link is signed: at once, or,
    /// if it is large or its link's [`Sealer`] holds messages, once the
    /// sealer has sealed it (see [`on_sealed`](Self::on_sealed)).
    async fn transmit(&mut self, rank: Rank, mut parts: Vec<Bytes>) {
        let direction = self.outgoing();
        let Some(peer) = self.peers.get_mut(&rank) else {
            return;
        };
        if let (Some(security), Some(link)) = (&self.security, &mut peer.seal) {
            link.sent += 1;
            let counter = link.sent;
            let size: usize = parts.iter().map(Bytes::len).sum();
            let key = peer.link.id;
            let queued = self.sealers.get(&key).is_some_and(|s| s.pending > 0);
            if size >= OFFLOAD_THRESHOLD || queued {
                // Hashing hundreds of MiB takes seconds: a blocking thread
                // does it while this engine serves the other peers.
                let sealer = self.sealers.entry(key).or_insert_with(|| {
                    let back = self.sealed_tx.clone();
                    Sealer::spawn(rank, key, security.signer.clone(), direction, link.id, back)
                });
                if !sealer.push(Outgoing::Message { counter, parts }) {
                    self.lose(rank, "sealing messages stopped");
                }
                return;
            }
            parts.insert(
                0,
                security.signer.seal(direction, &link.id, counter, &parts),
            );
        }
        self.send_now(rank, parts).await;
    }

    /// Sends `parts`, sealed if the link is signed, to `rank`.
    async fn send_now(&mut self, rank: Rank, parts: Vec<Bytes>) {
        let Some(peer) = self.peers.get(&rank) else {
            return;
        };
        let identity = peer.identity.clone();
        if let Err(error) = self.socket.send(&identity, parts).await {
            self.lose(rank, &format!("sending failed: {error}"));
        }
    }

    /// A message of link `link` back from its [`Sealer`], sealed: sent now,
    /// in its turn; or a loss to act on in its turn.
    async fn on_sealed(&mut self, link: u64, item: Outgoing) {
        let Some(sealer) = self.sealers.get_mut(&link) else {
            // The peer is lost, and what was going to it is dropped.
            return;
        };
        sealer.pending -= 1;
        let rank = sealer.rank;
        match item {
            Outgoing::Message { parts, .. } => self.send_now(rank, parts).await,
            Outgoing::Failed(error) => {
                self.lose(rank, &format!("sealing a message failed: {error}"));
            }
            Outgoing::Lose(why) => self.lose(rank, &why),
        }
    }

    /// Loses `rank` once what was sent to it so far has gone: at once, or,
    /// if its [`Sealer`] holds messages, after them.
    fn lose_after_sending(&mut self, rank: Rank, why: &str) {
        let key = self.peers.get(&rank).map(|peer| peer.link.id);
        let sealer = key.and_then(|key| self.sealers.get_mut(&key));
        if let Some(sealer) = sealer.filter(|s| s.pending > 0)
            && sealer.push(Outgoing::Lose(why.to_owned()))
        {
            return;
        }
        self.lose(rank, why);
    }

    /// Sends `parts` to a connection that has no link yet: sealed with
    /// counter 0 on `link` if given (the answer to a Hello that verified),
    /// else as it is.
    async fn transmit_first(
        &mut self,
        identity: &Bytes,
        link: Option<LinkId>,
        mut parts: Vec<Bytes>,
    ) -> ZmqResult<()> {
        if let (Some(security), Some(link)) = (&self.security, link) {
            let seal = security.signer.seal(self.outgoing(), &link, 0, &parts);
            parts.insert(0, seal);
        }
        self.socket.send(identity, parts).await
    }

    /// Runs until shut down, dropped, or (on a DEALER) the head node is
    /// lost.
    pub(crate) async fn run(mut self, mut inputs: Inputs) {
        let mut done: Vec<oneshot::Sender<()>> = Vec::new();
        let mut deadline: Option<Instant> = None;
        let mut monitor_open = true;
        let mut reading = true;
        let mut undecodable = self.undecodable_rx.take().expect("an engine runs once");
        let mut checked = self.checked_rx.take().expect("an engine runs once");
        let mut sealed = self.sealed_rx.take().expect("an engine runs once");
        loop {
            if self.finished || (self.closing && self.peers.values().all(|p| p.bye_acked)) {
                break;
            }
            tokio::select! {
                incoming = inputs.incoming.recv(), if reading => match incoming {
                    Some(Ok(message)) => self.on_message(message).await,
                    Some(Err(error)) => {
                        // The reader stops after an error.
                        reading = false;
                        self.on_socket_error(&error);
                    }
                    None => {
                        reading = false;
                        self.on_socket_error(&ZmqError::Other("the socket's reader stopped"));
                    }
                },
                event = inputs.monitor.next(), if monitor_open => match event {
                    Some(SocketEvent::Disconnected(identity)) => {
                        // What the peer sent before it went is already in
                        // the channel: deliver it first.
                        while reading && let Ok(result) = inputs.incoming.try_recv() {
                            match result {
                                Ok(message) => self.on_message(message).await,
                                Err(error) => {
                                    reading = false;
                                    self.on_socket_error(&error);
                                }
                            }
                        }
                        self.on_connection_closed(Bytes::copy_from_slice(&identity), None);
                    }
                    Some(other) => debug!(event = ?other, "socket event"),
                    None => monitor_open = false,
                },
                Some((rank, link, credit_wanted)) = undecodable.recv() => {
                    self.consumed(rank, link, credit_wanted).await;
                }
                Some((link, item)) = checked.recv() => self.on_checked(link, item).await,
                Some((link, item)) = sealed.recv() => self.on_sealed(link, item).await,
                command = inputs.commands.recv(), if !self.closing => match command {
                    Some(Command::Send { to, link, body, charge, credit_wanted }) => {
                        self.send_data(to, link, body, charge, credit_wanted).await;
                    }
                    Some(Command::RequestCredit { to, link }) => {
                        if self.peers.get(&to).is_some_and(|p| p.link.id == link) {
                            self.send_control(to, Header::CreditRequest).await;
                        }
                    }
                    Some(Command::Consumed { from, link, credit_wanted }) => {
                        self.consumed(from, link, credit_wanted).await;
                    }
                    Some(Command::Shutdown(reply)) => {
                        done.push(reply);
                        deadline = Some(Instant::now() + self.config.linger);
                        self.start_closing().await;
                    }
                    None => {
                        deadline = Some(Instant::now() + self.config.linger);
                        self.start_closing().await;
                    }
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    let silent: Vec<Rank> =
                        self.peers.iter().filter(|(_, p)| !p.bye_acked).map(|(r, _)| *r).collect();
                    debug!(?silent, "shutting down without every peer's goodbye");
                    break;
                }
            }
        }
        inputs.reader.abort();
        // Wait for it to let go of the receive half, so that the socket is
        // closed when this returns.
        let _ = (&mut inputs.reader).await;
        {
            let mut shared = self.shared.lock().expect("transport state poisoned");
            for link in shared.links.values() {
                link.close();
            }
            shared.links.clear();
            if shared.terminal.is_none() {
                shared.terminal = Some(Terminal::Closed);
            }
        }
        // Dropping the socket closes the connections; then answer.
        drop(self);
        for reply in done {
            let _ = reply.send(());
        }
    }

    async fn start_closing(&mut self) {
        self.closing = true;
        let ranks: Vec<Rank> = self.peers.keys().copied().collect();
        for rank in ranks {
            self.send_control(rank, Header::Bye).await;
        }
    }

    async fn send_data(&mut self, to: Rank, link: u64, body: Bytes, charge: Charge, wanted: bool) {
        let Some(peer) = self.peers.get_mut(&to).filter(|p| p.link.id == link) else {
            debug!(rank = to, "dropping a message for a peer that is gone");
            return;
        };
        peer.sending.sent(charge);
        let header = Header::Data {
            credit_wanted: wanted,
        };
        self.transmit(to, vec![header.encode(), body]).await;
    }

    async fn send_control(&mut self, to: Rank, header: Header) {
        self.transmit(to, vec![header.encode()]).await;
    }

    /// The application consumed a data message from `from` (on `link`),
    /// flagged if `wanted`: grants credit if it is time to.
    async fn consumed(&mut self, from: Rank, link: u64, wanted: bool) {
        let Some(peer) = self.peers.get_mut(&from).filter(|p| p.link.id == link) else {
            return;
        };
        if let Some(Grant(count)) = peer.receiving.consumed(wanted) {
            self.send_control(from, Header::Credit(count)).await;
        }
    }

    /// The peer waits for credit: see [`ReceiveWindow::credit_requested`].
    async fn on_credit_request(&mut self, rank: Rank) {
        let Some(peer) = self.peers.get_mut(&rank) else {
            return;
        };
        if let Some(Grant(count)) = peer.receiving.credit_requested() {
            self.send_control(rank, Header::Credit(count)).await;
        }
    }

    async fn grant_window(&mut self, rank: Rank) {
        if let Some(peer) = self.peers.get_mut(&rank) {
            let Grant(window) = peer.receiving.open();
            self.send_control(rank, Header::Credit(window)).await;
        }
    }

    fn add_peer(&mut self, rank: Rank, identity: Bytes, seal: Option<LinkSeal>) -> Link {
        let link = Link::new(self.next_link, Budget::new(self.config.max_in_flight_bytes));
        self.next_link += 1;
        if self.socket.is_router() {
            self.refused.remove(&identity);
            self.by_identity.insert(identity.clone(), rank);
        }
        self.peers.insert(
            rank,
            Peer {
                identity,
                link: link.clone(),
                sending: SendWindow::default(),
                receiving: ReceiveWindow::new(self.config.window),
                bye_acked: false,
                seal,
            },
        );
        let mut shared = self.shared.lock().expect("transport state poisoned");
        shared.lost.remove(&rank);
        shared.links.insert(rank, link.clone());
        link
    }

    /// Forgets a peer and reports it lost.
    fn lose(&mut self, rank: Rank, why: &str) {
        let Some(peer) = self.peers.remove(&rank) else {
            return;
        };
        self.by_identity.remove(&peer.identity);
        peer.link.close();
        // What they still hold of this link is dropped when it comes back.
        self.checkers.remove(&peer.link.id);
        self.sealers.remove(&peer.link.id);
        {
            let mut shared = self.shared.lock().expect("transport state poisoned");
            shared.links.remove(&rank);
            shared.lost.insert(rank);
            if !self.socket.is_router() {
                shared.terminal = Some(Terminal::Lost(rank));
            }
        }
        let decoder = self.decoders.remove(&rank);
        if self.closing {
            debug!(rank, why, "peer gone while shutting down");
        } else {
            info!(rank, why, "peer lost");
            // After the messages it sent, still being decoded.
            let queued = decoder.is_some_and(|d| {
                d.busy() && d.push(Inbound::Event(TransportEvent::PeerLost(rank)))
            });
            if !queued {
                self.deliver(TransportEvent::PeerLost(rank), 0, false);
            }
        }
        if !self.socket.is_router() {
            self.finished = true;
        }
    }

    fn deliver(&self, event: TransportEvent, link: u64, credit_wanted: bool) {
        // The handle may be gone already; then nobody is listening.
        let _ = self.events.send(Delivery {
            event,
            link,
            credit_wanted,
        });
    }

    fn on_socket_error(&mut self, error: &ZmqError) {
        if self.socket.is_router() {
            warn!(%error, "the ROUTER socket failed");
            let mut shared = self.shared.lock().expect("transport state poisoned");
            shared.terminal = Some(Terminal::Failed(error.to_string()));
            drop(shared);
            self.finished = true;
        } else {
            let why = format!("the connection failed: {error}");
            self.on_connection_closed(Bytes::new(), Some(why));
        }
    }

    /// The connection on `identity` closed, or (on a server node) failed
    /// with `failure`: acted on once the messages of it that its link's
    /// [`Checker`] holds are through, as they came first.
    fn on_connection_closed(&mut self, identity: Bytes, failure: Option<String>) {
        if let Some(rank) = self.rank_of(&identity)
            && let Some(key) = self.signed_link(rank)
            && self.checkers.get(&key).is_some_and(|c| c.pending > 0)
        {
            self.check_elsewhere(rank, Checked::Gone { identity, failure });
            return;
        }
        self.connection_gone(identity, failure);
    }

    /// See [`on_connection_closed`](Self::on_connection_closed).
    fn connection_gone(&mut self, identity: Bytes, failure: Option<String>) {
        match failure {
            Some(why) => self.lose(0, &why),
            None => self.on_disconnected(identity),
        }
    }

    fn on_disconnected(&mut self, identity: Bytes) {
        let rank = if self.socket.is_router() {
            self.by_identity.get(&identity).copied()
        } else {
            Some(0)
        };
        match rank {
            Some(rank) => self.lose(rank, "connection closed"),
            None => {
                self.refused.remove(&identity);
                let pending = self
                    .security
                    .as_mut()
                    .and_then(|security| security.pending.remove(&identity));
                match pending {
                    Some(pending) => warn!(
                        peer = %hex(&identity),
                        host = pending.host,
                        pid = pending.pid,
                        "a welcomed connection closed without a signed message under the \
                         Welcome's nonce (a replayed Hello?)"
                    ),
                    None => debug!("a connection that never joined closed"),
                }
            }
        }
    }

    async fn on_message(&mut self, message: ZmqMessage) {
        let mut parts = message.into_vecdeque();
        let identity = if self.socket.is_router() {
            match parts.pop_front() {
                Some(identity) => identity,
                None => return,
            }
        } else {
            Bytes::new()
        };
        // On a signed link, a large message has its tag checked off this
        // task, and the link's later messages wait their turn.
        if let Some(rank) = self.rank_of(&identity)
            && let Some(key) = self.signed_link(rank)
        {
            let large = parts.iter().map(Bytes::len).sum::<usize>() >= OFFLOAD_THRESHOLD;
            let queued = self.checkers.get(&key).is_some_and(|c| c.pending > 0);
            if large || queued {
                if large && let Err(why) = self.precheck(rank, &parts) {
                    self.reject(&identity, why);
                    return;
                }
                let item = Checked::Message {
                    identity,
                    parts,
                    verified: None,
                };
                self.check_elsewhere(rank, item);
                return;
            }
        }
        self.act_on(identity, parts, None).await;
    }

    /// The [`Link::id`] of `rank`'s link, if it is signed.
    fn signed_link(&self, rank: Rank) -> Option<u64> {
        let peer = self.peers.get(&rank)?;
        peer.seal.as_ref().map(|_| peer.link.id)
    }

    /// Gives `item` to the [`Checker`] of `rank`'s signed link.
    fn check_elsewhere(&mut self, rank: Rank, item: Checked) {
        let direction = self.incoming();
        let (Some(security), Some(peer)) = (&self.security, self.peers.get(&rank)) else {
            return;
        };
        let Some(link) = &peer.seal else {
            return;
        };
        let (key, id) = (peer.link.id, link.id);
        let checker = self.checkers.entry(key).or_insert_with(|| {
            let back = self.checked_tx.clone();
            Checker::spawn(key, security.signer.clone(), direction, id, back)
        });
        if !checker.push(item) {
            self.lose(rank, "checking messages stopped");
        }
    }

    /// Something of link `link` back from its [`Checker`], in its turn.
    async fn on_checked(&mut self, link: u64, item: Checked) {
        let Some(checker) = self.checkers.get_mut(&link) else {
            // The peer is lost, and what it sent after is dropped.
            return;
        };
        checker.pending -= 1;
        match item {
            Checked::Message {
                identity,
                parts,
                verified,
            } => self.act_on(identity, parts, verified).await,
            Checked::Gone { identity, failure } => self.connection_gone(identity, failure),
        }
    }

    /// Acts on a message from the connection on `identity`, seal first on
    /// a signed link, where `verified` says whether the tag of a large one
    /// checks out.
    async fn act_on(
        &mut self,
        identity: Bytes,
        mut parts: VecDeque<Bytes>,
        verified: Option<bool>,
    ) {
        let mut hello_nonce = None;
        if self.security.is_some() {
            match self.unseal(&identity, &mut parts, verified) {
                Ok(Unsealed::Link) => {}
                Ok(Unsealed::Hello(nonce)) => hello_nonce = Some(nonce),
                Ok(Unsealed::Joined(pending, counter)) => {
                    self.join(identity.clone(), pending, counter).await;
                }
                Err(why) => {
                    self.reject(&identity, why);
                    if matches!(why, Rejection::Unsigned | Rejection::BadTag) {
                        self.refuse_unverified_hello(&identity, &parts).await;
                    }
                    return;
                }
            }
        }
        let Some(header) = parts.front().and_then(|h| Header::decode(h)) else {
            warn!(
                parts = parts.len(),
                "dropping a message without a valid transport header"
            );
            if self.is_signed_hello(&identity, &parts) {
                let reply = Envelope::error(
                    0,
                    ProtocolErrorCode::UnexpectedMessage,
                    "this head node's links are not signed: give it the signing key too, \
                     or none to this server node",
                );
                self.refuse_stranger(&identity, &reply, None).await;
            }
            return;
        };
        parts.pop_front();
        let rank = self.rank_of(&identity);
        let expected_parts = usize::from(header.carries_envelope());
        if parts.len() != expected_parts {
            warn!(
                ?header,
                rank,
                parts = parts.len(),
                "dropping a message with the wrong number of parts"
            );
            if let (Header::Data { credit_wanted }, Some(rank)) = (header, rank) {
                self.dropped_data(rank, credit_wanted).await;
            }
            return;
        }
        let body = parts.pop_front();
        let Some(rank) = rank else {
            match (header, body) {
                (Header::Hello, Some(body)) => self.on_hello(identity, body, hello_nonce).await,
                _ => debug!(
                    ?header,
                    "dropping a message from a peer that has not joined"
                ),
            }
            return;
        };
        match (header, body) {
            (Header::Data { credit_wanted }, Some(body)) => {
                self.on_data(rank, body, credit_wanted).await;
            }
            (Header::Credit(count), None) => self.on_credit(rank, count),
            (Header::CreditRequest, None) => self.on_credit_request(rank).await,
            (Header::Bye, None) => {
                self.send_control(rank, Header::ByeAck).await;
                self.lose_after_sending(rank, "it said goodbye");
            }
            (Header::ByeAck, None) => {
                if let Some(peer) = self.peers.get_mut(&rank) {
                    peer.bye_acked = true;
                }
            }
            (header, _) => warn!(?header, rank, "dropping an unexpected message"),
        }
    }

    async fn on_data(&mut self, rank: Rank, body: Bytes, credit_wanted: bool) {
        let Some(peer) = self.peers.get_mut(&rank) else {
            return;
        };
        if peer.receiving.received().is_err() {
            warn!(rank, "dropping a message sent beyond the credit granted");
            return;
        }
        let link = peer.link.id;
        if self.closing {
            // Nobody will read it; say goodbye rather than credit it.
            return;
        }
        // Delivered, or credited at once below if it does not decode.
        peer.receiving.delivered();
        if self.decoders.get(&rank).is_some_and(|d| d.link != link) {
            self.decoders.remove(&rank);
        }
        let busy = self.decoders.get(&rank).is_some_and(Decoder::busy);
        if body.len() >= OFFLOAD_THRESHOLD || busy {
            let (framing, events) = (self.framing, self.events.clone());
            let undecodable = self.undecodable_tx.clone();
            let decoder = self
                .decoders
                .entry(rank)
                .or_insert_with(|| Decoder::spawn(rank, link, framing, events, undecodable));
            decoder.push(Inbound::Data {
                body,
                link,
                credit_wanted,
            });
            return;
        }
        match self.framing.decode_body(body) {
            Ok(envelope) => self.deliver(
                TransportEvent::Message {
                    from: rank,
                    envelope,
                },
                link,
                credit_wanted,
            ),
            Err(error) => {
                warn!(rank, %error, "dropping a malformed envelope");
                self.consumed(rank, link, credit_wanted).await;
            }
        }
    }

    /// Credits a data message that was dropped as if it had been consumed,
    /// so the sender's window does not shrink.
    async fn dropped_data(&mut self, rank: Rank, credit_wanted: bool) {
        let Some(peer) = self.peers.get_mut(&rank) else {
            return;
        };
        if peer.receiving.received().is_err() {
            warn!(rank, "dropping a message sent beyond the credit granted");
            return;
        }
        peer.receiving.delivered();
        let link = peer.link.id;
        self.consumed(rank, link, credit_wanted).await;
    }

    fn on_credit(&mut self, rank: Rank, count: u32) {
        let Some(peer) = self.peers.get_mut(&rank) else {
            return;
        };
        if let Some(admitted) = self.admitted.take() {
            let _ = admitted.send(());
        }
        let available = peer.link.messages.available_permits();
        match peer.sending.on_credit(count, available) {
            Ok(refund) => peer.link.refund(refund),
            Err(BeyondWindow) => warn!(
                rank,
                count, "ignoring a credit grant beyond the largest window"
            ),
        }
    }

    /// A Hello from a new connection; `nonce` is the sender's, on a signed
    /// link (where the Hello's seal has been checked).
    async fn on_hello(&mut self, identity: Bytes, body: Bytes, nonce: Option<Nonce>) {
        // Answers to a signed Hello are sealed under a fresh nonce of ours.
        let link = nonce.map(|dealer| LinkId {
            dealer,
            router: seal::nonce(),
        });
        let hello_envelope = match self.framing.decode_body(body) {
            Ok(envelope) => envelope,
            Err(error) => {
                let reply = Envelope::error(0, ProtocolErrorCode::Malformed, error.to_string());
                if self.refuse_stranger(&identity, &reply, link).await {
                    warn!(%error, "refusing a peer whose Hello cannot be decoded");
                }
                return;
            }
        };
        let correlation = hello_envelope.correlation;
        let hello = match check_hello(hello_envelope, Role::ServerNode, "a head node") {
            Ok(hello) => hello,
            Err(reply) => {
                if self.refuse_stranger(&identity, &reply, link).await
                    && let Some(Body::Error(error)) = &reply.body
                {
                    warn!(reason = error.message, "refusing a peer");
                }
                return;
            }
        };
        let refusal = if self.closing {
            Some((
                ProtocolErrorCode::UnexpectedMessage,
                "the head node is shutting down".to_owned(),
            ))
        } else if !(0..=MAX_RANK).contains(&hello.rank) {
            // The head core takes no rank past this: refused here, before
            // the peer joins, rather than joined and then unknown there.
            Some((
                ProtocolErrorCode::UnknownRank,
                format!(
                    "rank {} is out of range: a server node asks for a rank from 1 to {MAX_RANK}, or 0 for any",
                    hello.rank
                ),
            ))
        } else if self
            .security
            .as_ref()
            .is_some_and(|security| security.pending.len() >= MAX_PENDING)
        {
            Some((
                ProtocolErrorCode::UnexpectedMessage,
                "too many server nodes are joining at once: try again".to_owned(),
            ))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            let reply = Envelope::error(correlation, code, message.clone());
            if self.refuse_stranger(&identity, &reply, link).await {
                warn!(
                    host = hello.host,
                    pid = hello.pid,
                    message,
                    "refusing a peer"
                );
            }
            return;
        }
        let rank = self.pick_rank(hello.rank);
        if link.is_none() {
            self.add_peer(rank, identity.clone(), None);
        }
        let welcome = Envelope::correlated(
            correlation,
            Body::Welcome(
                Welcome {
                    protocol_version: PROTOCOL_VERSION,
                    role: Role::HeadNode.into(),
                    software: crate::software(),
                    rank,
                    cluster: None,
                    shared_memory_directory: String::new(),
                    shared_memory_tag: String::new(),
                }
                .into(),
            ),
        );
        let sent = match self.framing.encode_body(&welcome) {
            Ok(bytes) => self
                .transmit_first(
                    &identity,
                    link,
                    vec![Header::Welcome.encode(), Bytes::from(bytes)],
                )
                .await
                .map_err(|error| format!("welcoming it failed: {error}")),
            Err(error) => {
                warn!(%error, "cannot encode Welcome");
                Err("cannot encode Welcome".to_owned())
            }
        };
        if let Err(why) = sent {
            self.lose(rank, &why);
            return;
        }
        if let (Some(link), Some(security)) = (link, self.security.as_mut()) {
            // It joins once it proves the Hello fresh: see `unseal`.
            debug!(
                rank,
                host = hello.host,
                pid = hello.pid,
                "server node welcomed"
            );
            security.pending.insert(
                identity,
                Pending {
                    rank,
                    link,
                    since: Instant::now(),
                    requested: hello.rank,
                    host: hello.host,
                    pid: hello.pid,
                    software: hello.software,
                },
            );
            return;
        }
        let who = (
            hello.rank,
            hello.host.as_str(),
            hello.pid,
            hello.software.as_str(),
        );
        self.announce_join(rank, who, false).await;
    }

    /// Grants a server node that joins its window and reports it; `who`
    /// is what its Hello said: the rank it asked for, host, pid, software.
    async fn announce_join(&mut self, rank: Rank, who: (Rank, &str, u32, &str), signed: bool) {
        let (requested, host, pid, software) = who;
        self.grant_window(rank).await;
        if !self.peers.contains_key(&rank) {
            return;
        }
        info!(
            rank,
            requested, host, pid, software, signed, "server node joined"
        );
        self.deliver(TransportEvent::PeerJoined(rank), 0, false);
    }

    /// The requested rank if it is free, else the lowest free rank >= 1
    /// (ranks of welcomed connections yet to join are not free).
    fn pick_rank(&self, requested: Rank) -> Rank {
        let taken = |rank: Rank| {
            self.peers.contains_key(&rank)
                || self
                    .security
                    .as_ref()
                    .is_some_and(|s| s.pending.values().any(|p| p.rank == rank))
        };
        if requested >= 1 && !taken(requested) {
            return requested;
        }
        let mut rank = 1;
        while taken(rank) {
            rank += 1;
        }
        rank
    }

    /// Sends a refusal to a connection that has not joined, sealed on
    /// `link` if its Hello verified, unless it was refused before: then
    /// drops it, and says so in the log the first time. Whether it sent
    /// it (the caller then logs why).
    async fn refuse_stranger(
        &mut self,
        identity: &Bytes,
        reply: &Envelope,
        link: Option<LinkId>,
    ) -> bool {
        if let Some(logged) = self.refused.get_mut(identity) {
            if !*logged {
                *logged = true;
                warn!(
                    peer = %hex(identity),
                    "not answering a connection refused before (each is answered once, \
                     and its further refusals are not logged)"
                );
            }
            return false;
        }
        if self.refused.len() >= REFUSED {
            self.refused.clear();
        }
        self.refused.insert(identity.clone(), false);
        if let Ok(bytes) = self.framing.encode_body(reply) {
            let parts = vec![Header::Welcome.encode(), Bytes::from(bytes)];
            if let Err(error) = self.transmit_first(identity, link, parts).await {
                debug!(%error, "could not answer a peer that has not joined");
            }
        }
        true
    }

    /// The rank of the peer on this connection, if it joined.
    fn rank_of(&self, identity: &Bytes) -> Option<Rank> {
        if self.socket.is_router() {
            self.by_identity.get(identity).copied()
        } else {
            self.peers.contains_key(&0).then_some(0)
        }
    }

    /// Which way messages come to this side.
    fn incoming(&self) -> Direction {
        match self.outgoing() {
            Direction::ToDealer => Direction::ToRouter,
            Direction::ToRouter => Direction::ToDealer,
        }
    }

    /// The cheap part of the check of a large message from `rank`, made
    /// before its link's [`Checker`] computes its tag: it is sealed, by the
    /// peer of this link, with a counter above the last one accepted (so a
    /// replay is refused without being hashed). Once the checker is through
    /// with it, [`unseal`](Self::unseal) checks it all again with the tag
    /// found, and only then accepts its counter: a forged message with a
    /// counter far ahead is refused for its tag, and the genuine messages
    /// behind it still pass. (Accepting the counter before the tag checks
    /// out would let anyone who can put a message on the wire make every
    /// later genuine one look replayed.)
    ///
    /// A message refused for its tag is not credited as consumed, as no
    /// refused message is: it was never counted against the peer's window,
    /// and crediting a forged one would grant the peer credit it did not
    /// use, after which its genuine messages would be dropped as sent
    /// beyond the credit. A genuine message altered on the wire thus costs
    /// its sender that credit, like any message lost with the connection.
    fn precheck(&self, rank: Rank, parts: &VecDeque<Bytes>) -> Result<(), Rejection> {
        let link = self
            .peers
            .get(&rank)
            .and_then(|peer| peer.seal.as_ref())
            .expect("every link of a signed transport is signed");
        let seal = parts
            .front()
            .and_then(|first| Seal::parse(first))
            .ok_or(Rejection::Unsigned)?;
        if seal.nonce != link.id.sender(self.incoming()) {
            return Err(Rejection::OtherLink);
        }
        if seal.counter <= link.received {
            return Err(Rejection::Replayed {
                counter: seal.counter,
                last: link.received,
            });
        }
        Ok(())
    }

    /// Checks and removes the seal in front of `parts`, from the peer on
    /// `identity`'s connection: the message must be sealed with the key,
    /// for this link (the nonces of both sides), with a counter above the
    /// last one accepted; `verified` is whether the tag of a large one
    /// checks out, found by its link's [`Checker`] (`None`: to check here).
    /// A connection that has not joined may only send a Hello, sealed with
    /// counter 0 and no nonce of ours, or once welcomed its first message,
    /// both small.
    fn unseal(
        &mut self,
        identity: &Bytes,
        parts: &mut VecDeque<Bytes>,
        verified: Option<bool>,
    ) -> Result<Unsealed, Rejection> {
        let incoming = self.incoming();
        let rank = self.rank_of(identity);
        let security = self.security.as_mut().expect("a signed link");
        let first = parts.pop_front().ok_or(Rejection::Unsigned)?;
        let Some(seal) = Seal::parse(&first) else {
            parts.push_front(first);
            return Err(Rejection::Unsigned);
        };
        let rest = &*parts.make_contiguous();
        if let Some(rank) = rank {
            let link = self
                .peers
                .get_mut(&rank)
                .and_then(|peer| peer.seal.as_mut())
                .expect("every link of a signed transport is signed");
            if seal.nonce != link.id.sender(incoming) {
                return Err(Rejection::OtherLink);
            }
            let valid =
                verified.unwrap_or_else(|| security.signer.verify(incoming, &link.id, &seal, rest));
            if !valid {
                return Err(Rejection::BadTag);
            }
            if seal.counter <= link.received {
                return Err(Rejection::Replayed {
                    counter: seal.counter,
                    last: link.received,
                });
            }
            link.received = seal.counter;
            return Ok(Unsealed::Link);
        }
        // Hashing a large message here would hold up every peer, and none
        // can come from a connection that has not joined.
        let size = rest.iter().map(Bytes::len).sum();
        if size >= OFFLOAD_THRESHOLD {
            return Err(Rejection::Oversized(size));
        }
        if let Some(pending) = security.pending.get(identity) {
            if seal.nonce != pending.link.dealer {
                return Err(Rejection::OtherLink);
            }
            if !security.signer.verify(incoming, &pending.link, &seal, rest) {
                return Err(Rejection::BadTag);
            }
            if seal.counter == 0 {
                // Only the Hello has counter 0: this is it again.
                return Err(Rejection::ReplayedHello);
            }
            let pending = security.pending.remove(identity).expect("just found");
            return Ok(Unsealed::Joined(pending, seal.counter));
        }
        if !self.socket.is_router() || seal.counter != 0 {
            return Err(Rejection::Stranger);
        }
        let link = LinkId {
            dealer: seal.nonce,
            router: NO_NONCE,
        };
        if !security.signer.verify(incoming, &link, &seal, rest) {
            return Err(Rejection::BadTag);
        }
        if rest.first().and_then(|h| Header::decode(h)) != Some(Header::Hello) {
            return Err(Rejection::Stranger);
        }
        if !security.seen_set.insert(seal.nonce) {
            return Err(Rejection::ReplayedHello);
        }
        security.seen.push_back(seal.nonce);
        if security.seen.len() > SEEN_HELLOS {
            let oldest = security.seen.pop_front().expect("not empty");
            security.seen_set.remove(&oldest);
        }
        // Welcomed connections that never answered make room.
        let timeout = self.config.handshake_timeout;
        security.pending.retain(|identity, pending| {
            let alive = pending.since.elapsed() < timeout;
            if !alive {
                warn!(
                    peer = %hex(identity),
                    host = pending.host,
                    pid = pending.pid,
                    "a welcomed connection sent no signed message under the Welcome's nonce \
                     in time (a replayed Hello?)"
                );
            }
            alive
        });
        Ok(Unsealed::Hello(seal.nonce))
    }

    /// A welcomed connection sent its first message on the link (counter
    /// `counter`): the server node joins.
    async fn join(&mut self, identity: Bytes, pending: Pending, counter: u64) {
        let rank = pending.rank;
        let mut link = LinkSeal::new(pending.link);
        link.received = counter;
        self.add_peer(rank, identity, Some(link));
        let who = (
            pending.requested,
            pending.host.as_str(),
            pending.pid,
            pending.software.as_str(),
        );
        self.announce_join(rank, who, true).await;
    }

    /// Counts and logs a message that failed the signature check; the
    /// first [`LOG_FIRST`], then one in [`LOG_EVERY`].
    fn reject(&mut self, identity: &Bytes, why: Rejection) {
        let count = {
            let mut shared = self.shared.lock().expect("transport state poisoned");
            shared.rejected += 1;
            shared.rejected
        };
        if count <= LOG_FIRST || count % LOG_EVERY == 0 {
            let rank = self.rank_of(identity);
            let peer = if self.socket.is_router() {
                hex(identity)
            } else {
                "the head node".to_owned()
            };
            warn!(
                %peer,
                rank,
                reason = %why,
                rejected = count,
                "dropping a message that fails the link's signature check"
            );
            if count == LOG_FIRST {
                warn!("from now on, one message in {LOG_EVERY} that fails the check is logged");
            }
        }
    }

    /// Answers a Hello whose seal is missing or does not verify with an
    /// unsealed refusal, so that a server node with no key or the wrong one
    /// learns why it cannot join.
    async fn refuse_unverified_hello(&mut self, identity: &Bytes, parts: &VecDeque<Bytes>) {
        if !self.socket.is_router() || self.rank_of(identity).is_some() {
            return;
        }
        // What is left once the seal, if any, is taken off: `[H, hello]`.
        if parts.len() == 2 && &parts[0][..] == b"H" {
            let reply = Envelope::error(
                0,
                ProtocolErrorCode::UnexpectedMessage,
                "the head node could not verify this server node's signature: \
                 its links are signed, with another key than this server node's, or it has none",
            );
            // Why is logged as the message's rejection.
            self.refuse_stranger(identity, &reply, None).await;
        }
    }

    /// Whether an unsigned head node got a signed Hello.
    fn is_signed_hello(&self, identity: &Bytes, parts: &VecDeque<Bytes>) -> bool {
        self.security.is_none()
            && self.socket.is_router()
            && parts.len() == 3
            && parts[0].len() == seal::SEAL_LEN
            && &parts[1][..] == b"H"
            && self.rank_of(identity).is_none()
    }
}

/// A ZeroMQ routing identity, for logs.
fn hex(identity: &[u8]) -> String {
    identity.iter().map(|b| format!("{b:02x}")).collect()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
