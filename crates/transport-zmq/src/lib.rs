//! casa-node's ZeroMQ transport: a ROUTER on the head node (rank 0), one
//! DEALER per server node, over `ipc://` on one machine or `tcp://` across
//! machines, with the pure-Rust [`zeromq`] crate on tokio.
//!
//! - [`ZmqTransport::bind`] makes the head node's side: it listens, admits
//!   server nodes that open with a compatible `Hello`, gives each a rank and
//!   reports [`TransportEvent::PeerJoined`].
//! - [`ZmqTransport::connect`] makes a server node's side: it connects, says
//!   `Hello` and waits (at most [`ZmqConfig::handshake_timeout`]) for
//!   `Welcome`, or fails with a [`HandshakeError`] saying why. Its only peer
//!   is rank 0, there from the start (no `PeerJoined(0)`).
//!
//! # Wire format
//!
//! Each ZeroMQ message is `[header]` or `[header, envelope]` (on the ROUTER
//! side preceded by ZeroMQ's routing identity). The envelope is one part,
//! protobuf without length prefix
//! ([`Framing::encode_body`](casa_node_protocol::Framing::encode_body)), at
//! most [`ZmqConfig::max_frame`] bytes. The header's first byte says what
//! the message is:
//!
//! | header                   | envelope | meaning                                               |
//! |--------------------------|----------|-------------------------------------------------------|
//! | `H`                      | yes      | `Hello`: the DEALER's first message                   |
//! | `W`                      | yes      | `Welcome`, or a `ProtocolError` refusing the Hello    |
//! | `D`, flags (1 byte)      | yes      | data; flag bit 0: the sender is short of credit       |
//! | `C`, count (u32, BE)     | no       | credit: `count` more data messages may be sent        |
//! | `R`                      | no       | credit request: the sender waits for bytes to return  |
//! | `B`                      | no       | goodbye: the sender is shutting down                  |
//! | `A`                      | no       | goodbye acknowledged                                  |
//!
//! A server node connects and sends `H`; the head node answers `W` and,
//! if it welcomed the peer, `C` with its window; the server node then sends
//! its own `C`. Input that breaks these rules is logged (with `tracing`) and
//! dropped. A connection that has not joined is refused at most once:
//! Hellos of it that would be refused again are dropped (and logged the
//! first time), so that a peer that sends Hellos and never reads cannot
//! fill the socket's queue for it, which would make the head node wait
//! on it and serve nobody else; a valid Hello of it is still welcomed. On
//! a [signed link](#signed-links) every message has one more part in
//! front, its seal, and the head node's `C` waits for the server node's.
//!
//! # Delivery
//!
//! Messages from one peer to another arrive in order, none lost and none
//! duplicated while both are up.
//!
//! The crate's queues are not trusted for that. In zeromq 0.7 a ROUTER or
//! DEALER buffers up to 100 000 messages per peer (of any size) and then makes
//! `send` wait; libzmq's ROUTER instead drops silently at its high-water mark,
//! and neither behaviour suits a socket shared by all peers. So the transport
//! bounds what is in flight itself, with credit: a receiver grants each
//! sender [`ZmqConfig::window`] messages and grants more as its application
//! consumes them; a sender also keeps at most
//! [`ZmqConfig::max_in_flight_bytes`] unacknowledged per peer. A single
//! larger message goes alone, once everything before it is consumed (up to
//! [`ZmqConfig::max_frame`], 1 GiB by default); small messages (at most a
//! 1024th of the budget, 64 KiB by default) may then still go past it on a
//! reserve of a 64th of the budget, so that pings and log records are not
//! held for the seconds a message of hundreds of MiB takes to arrive.
//! [`Transport::send`] waits only when that peer's credit is used up, and
//! never blocks sending to other peers. A receiver returns credit in
//! batches of half a window, or at once for a message flagged as sent short
//! of bytes; a sender that must wait for bytes sends `R`, and the receiver
//! then returns the credit of every message consumed and, as they are
//! consumed, of those still in flight. Credit comes
//! back only as the peer's application takes messages with `recv`: two
//! peers that both keep sending to each other without receiving wait
//! forever once both windows are full, so an event loop should keep taking
//! events between sends.
//!
//! # Peer loss
//!
//! Reported as [`TransportEvent::PeerLost`], once per connection:
//!
//! - when the peer shuts its transport down or drops it (it says goodbye);
//! - when its process exits or is killed, or its connection closes or
//!   fails (the socket sees end of file or an error);
//! - on a server node, losing the head node ends the transport: after
//!   `PeerLost(0)`, `recv` and `send` fail with
//!   [`TransportError::Disconnected`]`(0)`, so the server can exit.
//!
//! Not detected here: a peer that is alive but silent (stopped with SIGSTOP,
//! hung, or behind a network partition or a crashed host with no FIN or RST):
//! its connection stays open, and the protocol's pings are what notice it.
//!
//! # Signed links
//!
//! The zeromq crate has no CURVE, so links between machines are signed
//! instead, as Jupyter signs its messages: with [`ZmqConfig::signing`] set
//! to a [`SigningKey`] (32 bytes, from the connection file's `signing_key`,
//! a file only its owner can read), every message of every link, control
//! messages and the handshake included, starts with a seal, and only
//! messages whose seal checks out reach the transport's logic. Both ends
//! need the same key. Unsigned links (the default, for `ipc://` in a
//! private directory) are unchanged and cost nothing more.
//!
//! A node enables it by reading the key and passing it in the
//! configuration, the same on the head node and on each server node:
//!
//! ```no_run
//! # async fn example(hex_from_connection_file: &str) -> Result<(), Box<dyn std::error::Error>> {
//! use casa_node_transport_zmq::{SigningKey, ZmqConfig, ZmqTransport};
//!
//! let config = ZmqConfig {
//!     signing: Some(SigningKey::from_hex(hex_from_connection_file)?),
//!     ..ZmqConfig::default()
//! };
//! // The head node:
//! let head = ZmqTransport::bind_with("tcp://0.0.0.0:5555", config.clone()).await?;
//! // A server node (0: any rank):
//! let server = ZmqTransport::connect_with("tcp://head-node:5555", 0, config).await?;
//! # Ok(()) }
//! ```
//!
//! A server node whose key differs (or that has none, or whose head node
//! has none) cannot join: `connect_with` fails with
//! [`HandshakeError::Unauthenticated`] (or, for a server node without a
//! key, [`HandshakeError::Refused`]) and the head node logs why.
//!
//! The seal is one part of 56 bytes: the sender's nonce for the link (16
//! bytes), a counter (8) and an HMAC-SHA256 tag (32) over a domain label,
//! the direction, both nonces of the link, the counter, and each part of
//! the message with its length; one pass of HMAC over the payload. A
//! link is named by two random nonces, one the server node draws per
//! `connect`, one the head node draws per Hello it accepts; so:
//!
//! - the Hello is sealed with counter 0 and the server node's nonce alone;
//!   the Welcome (or refusal) with counter 0 and both nonces, so the server
//!   node knows it answers this Hello and no earlier one;
//! - every later message is sealed with both nonces and a counter that
//!   grows by one per message each way, and the receiver accepts only
//!   counters above the last it accepted on the link: a message replayed
//!   in the same session is refused;
//! - the head node admits a welcomed server node (`PeerJoined`, its
//!   credit) only once a message sealed under the Welcome's fresh nonce
//!   proves the Hello is not a replay, and remembers recent Hellos to
//!   name a replayed one; `connect_with` returns once it is admitted;
//! - a message of an earlier link, of this or an earlier process on either
//!   side, carries other nonces and is refused: a restarted server node
//!   joins again as a new link, and nothing of its former life replays
//!   into it.
//!
//! A message that fails the check (no seal, a wrong tag: the wrong key or
//! an altered message, another link's nonces, an old counter, anything but
//! a Hello from a connection that has not joined) is dropped before it is
//! decoded, counted ([`ZmqTransport::rejected_messages`]) and logged as a
//! warning naming the peer's ZeroMQ identity and rank and the reason: the
//! first ten, then one in a thousand, so that a flood cannot fill the
//! disk. Nothing else changes for the other peers. Signing authenticates;
//! it does not hide: messages cross the network in clear.
//!
//! HMAC-SHA256 runs at hundreds of MB/s to a few GB/s, so a message of
//! 1 MiB or more ([`OFFLOAD_THRESHOLD`]) is sealed, and checked, on a
//! blocking thread, by a task per link that keeps the link's messages in
//! order: while it holds one, the later messages of that link (control
//! messages too) go through it, and the engine goes on sending and
//! reading the other links' messages. The receiver first checks what is
//! cheap (a seal, of this link, with a counter above the last accepted: a
//! replayed large message is refused without being hashed), and accepts
//! the counter only once the tag checks out, so a forged message with a
//! counter far ahead cannot make the genuine ones behind it look replayed.
//! A connection that has not joined may send nothing that large: it is
//! refused before it is hashed.
//!
//! # Limits
//!
//! No CURVE (the crate has none): use `ipc://` in a private directory, or
//! `tcp://` with signing. The crate reads a whole ZeroMQ message into
//! memory before this transport sees its size, so `max_frame` protects
//! decoding, not memory, against a hostile peer, on signed links too: the
//! signature is checked once the message has arrived. A large message
//! holds the later messages of its own link for as long as its HMAC takes
//! (in the order of a second per GiB on a busy machine with SHA-NI), as
//! they must arrive after it, not those of the other links; so does a
//! forged large message, from whoever can write into the connection.

mod credit;
mod engine;
mod seal;
mod wire;

pub use seal::{KeyError, SigningKey};

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{Envelope, Hello, ProtocolErrorCode, Role};
use casa_node_protocol::{
    DEFAULT_MAX_FRAME, Framing, OFFLOAD_THRESHOLD, PROTOCOL_VERSION, Rank, Transport,
    TransportError, TransportEvent, check_version,
};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketEvent, SocketOptions, ZmqMessage};

use credit::{Budget, Charge, Refund, Source};
use engine::{Command, Delivery, Engine, Inputs, SendHalf, Shared, Terminal};
use seal::{Direction, LinkId, LinkSeal, NO_NONCE, Nonce, Seal, Signer};
use wire::Header;

/// Data messages a receiver lets each peer have in flight by default.
pub const DEFAULT_WINDOW: u32 = 32_768;

/// The largest window: below zeromq's own per-peer queue (100 000
/// messages), so that the crate never makes the engine wait.
pub const MAX_WINDOW: u32 = 65_536;

/// Bytes a sender lets be in flight to one peer by default.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: u32 = 64 << 20;

/// How the transport behaves; [`Default`] suits most uses.
#[derive(Debug, Clone)]
pub struct ZmqConfig {
    /// The largest envelope sent or accepted, in bytes.
    pub max_frame: usize,
    /// Data messages each peer may send us before we return credit;
    /// at least 1, at most [`MAX_WINDOW`].
    pub window: u32,
    /// Bytes we may have in flight to one peer before `send` waits for the
    /// peer to consume them (a larger message waits until nothing else is
    /// in flight, then goes alone); at least 1. Messages of at most a
    /// 1024th of it may exceed it by a 64th, so that they need not wait
    /// behind a large message.
    pub max_in_flight_bytes: u32,
    /// How long a server node's `connect` waits for the connection and the
    /// `Welcome`.
    pub handshake_timeout: Duration,
    /// How long `shutdown` waits for peers to acknowledge the goodbye.
    pub linger: Duration,
    /// Sign every message of every link with this key, and accept only
    /// messages signed with it (see [Signed links](crate#signed-links)).
    /// Both ends must have the same key, or none.
    pub signing: Option<SigningKey>,
}

impl Default for ZmqConfig {
    fn default() -> Self {
        ZmqConfig {
            max_frame: DEFAULT_MAX_FRAME,
            window: DEFAULT_WINDOW,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            handshake_timeout: Duration::from_secs(10),
            linger: Duration::from_secs(2),
            signing: None,
        }
    }
}

impl ZmqConfig {
    fn normalized(mut self) -> Self {
        self.window = self.window.clamp(1, MAX_WINDOW);
        self.max_in_flight_bytes = self.max_in_flight_bytes.max(1);
        self
    }
}

/// Why a server node could not join, inside [`TransportError::Io`]'s
/// `source` (find it with `downcast_ref`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandshakeError {
    /// The head node answered `Hello` with a `ProtocolError`.
    #[error("the head node refused this server node ({}): {message}", code.as_str_name())]
    Refused {
        /// Why, for programs.
        code: ProtocolErrorCode,
        /// Why, for people.
        message: String,
    },
    /// No connection or no answer in time.
    #[error("no Welcome from the head node within {0:?}")]
    Timeout(Duration),
    /// The connection closed before the answer.
    #[error("the head node closed the connection during the handshake")]
    Closed,
    /// The answer was not a `Welcome` this side can accept.
    #[error("unexpected answer to Hello: {0}")]
    Unexpected(String),
    /// The head node could not verify this side's signature: one of the
    /// two signs its links and the other does not, or their keys differ.
    /// (The answer saying so cannot itself be signed.)
    #[error("the head node refused this server node's signature: {0}")]
    Unauthenticated(String),
}

/// A [`Transport`] over ZeroMQ; see the [crate] documentation.
pub struct ZmqTransport {
    rank: Rank,
    endpoint: String,
    framing: Framing,
    budget: Budget,
    shared: Arc<Mutex<Shared>>,
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::UnboundedReceiver<Delivery>,
    closed: bool,
    /// Per peer link, what encodes large messages off this thread.
    encoders: HashMap<(Rank, u64), Encoder>,
    /// Where the socket and the engine run.
    io: Option<IoRuntime>,
}

/// The threads the socket's I/O and the engine run on: copying a frame of
/// hundreds of MiB into ZeroMQ's buffers, or out of them, takes seconds,
/// and the thread of the node's event loop must answer pings meanwhile.
/// One thread: the socket's writes of a large frame are asynchronous, so
/// they do not hold another peer's pings (a second thread only added
/// wake-ups: on 2 cores it cost 1+1 throughput and latency).
struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    fn start() -> Result<IoRuntime, TransportError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("zmq-io")
            .enable_all()
            .build()
            .map_err(|e| io_error("starting the ZeroMQ threads".to_owned(), e))?;
        Ok(IoRuntime(Some(runtime)))
    }

    /// Runs `work` on these threads and waits for it.
    async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, TransportError>> + Send + 'static,
    ) -> Result<T, TransportError> {
        let runtime = self.0.as_ref().expect("running until dropped");
        runtime
            .spawn(work)
            .await
            .map_err(|e| io_error("the ZeroMQ threads".to_owned(), e))?
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            // Dropped on an async thread, where waiting is not allowed.
            runtime.shutdown_background();
        }
    }
}

/// What a link's encoder hands to the engine, in the order given.
enum EncoderItem {
    /// A message to encode off the event loop's thread.
    Message(EncodeJob),
    /// A command for the engine that must not overtake the messages
    /// before it: a credit request, which the receiver answers with the
    /// credit of what it has received by then.
    After(Command),
    /// Everything given before has reached the engine: says so. `shutdown`
    /// waits for this before its goodbye, which must not overtake a
    /// message still being encoded.
    Flushed(oneshot::Sender<()>),
}

/// A message to encode off the event loop's thread, with its credit taken.
struct EncodeJob {
    envelope: Envelope,
    /// Its encoded length.
    len: usize,
    to: Rank,
    link: engine::Link,
    charge: Charge,
    credit_wanted: bool,
}

/// Encodes one peer link's messages in order, large ones on a blocking
/// thread, and hands them to the engine. While it holds any, later
/// messages to that peer go through it too, so none overtakes another.
struct Encoder {
    jobs: mpsc::UnboundedSender<EncoderItem>,
    /// Items given to it and not yet handed to the engine.
    pending: Arc<AtomicUsize>,
}

impl Encoder {
    fn spawn(framing: Framing, commands: mpsc::UnboundedSender<Command>) -> Encoder {
        let (jobs, mut queue) = mpsc::unbounded_channel::<EncoderItem>();
        let pending = Arc::new(AtomicUsize::new(0));
        let left = pending.clone();
        tokio::spawn(async move {
            while let Some(item) = queue.recv().await {
                let job = match item {
                    EncoderItem::Message(job) => job,
                    EncoderItem::After(command) => {
                        let _ = commands.send(command);
                        left.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    EncoderItem::Flushed(done) => {
                        let _ = done.send(());
                        left.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                };
                let EncodeJob {
                    envelope,
                    len,
                    to,
                    link,
                    charge,
                    credit_wanted,
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
                        let _ = commands.send(Command::Send {
                            to,
                            link: link.id,
                            body: Bytes::from(body),
                            charge,
                            credit_wanted,
                        });
                    }
                    Err(error) => {
                        // Its credit was taken: give it back.
                        tracing::warn!(to, %error, "dropping a message that cannot be encoded");
                        link.refund(Refund::unsent(charge));
                    }
                }
                // Only once the engine has it may a later message skip
                // this queue.
                left.fetch_sub(1, Ordering::AcqRel);
            }
        });
        Encoder { jobs, pending }
    }

    /// Whether it holds items not yet handed to the engine.
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

impl std::fmt::Debug for ZmqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqTransport")
            .field("rank", &self.rank)
            .field("endpoint", &self.endpoint)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl ZmqTransport {
    /// Waits until every encoder has handed what it holds to the engine
    /// (what it holds is marked now; the wait borrows nothing).
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

    /// The head node's side: a ROUTER bound at `endpoint` (`ipc://PATH`
    /// or `tcp://HOST:PORT`; port 0 picks a free port), rank 0.
    pub async fn bind(endpoint: &str) -> Result<ZmqTransport, TransportError> {
        Self::bind_with(endpoint, ZmqConfig::default()).await
    }

    /// [`bind`](Self::bind) with a configuration.
    pub async fn bind_with(
        endpoint: &str,
        config: ZmqConfig,
    ) -> Result<ZmqTransport, TransportError> {
        let io = IoRuntime::start()?;
        let endpoint = endpoint.to_owned();
        let mut transport = io
            .run(async move { Self::bind_here(&endpoint, config).await })
            .await?;
        transport.io = Some(io);
        Ok(transport)
    }

    async fn bind_here(endpoint: &str, config: ZmqConfig) -> Result<ZmqTransport, TransportError> {
        let config = config.normalized();
        let mut socket = RouterSocket::with_options(socket_options(&config));
        let monitor = socket.monitor();
        let bound = socket
            .bind(endpoint)
            .await
            .map_err(|e| io_error(format!("binding the head node's socket to {endpoint}"), e))?;
        let (send, recv) = socket.split();
        let (incoming, reader) = engine::spawn_reader(recv);
        let bound = bound.to_string();
        let span = tracing::info_span!("zmq", endpoint = %bound);
        let (handle, engine, commands) = Self::assemble(0, bound, SendHalf::Router(send), config);
        tokio::spawn(
            engine
                .run(Inputs {
                    commands,
                    incoming,
                    monitor,
                    reader,
                })
                .instrument(span),
        );
        Ok(handle)
    }

    /// A server node's side: a DEALER connected to the head node at
    /// `endpoint`, asking for `requested_rank` (0: any). Returns once the
    /// head node has answered `Welcome`; [`rank`](Transport::rank) is the
    /// rank it gave, which may differ from the one asked for if that was
    /// taken.
    pub async fn connect(
        endpoint: &str,
        requested_rank: Rank,
    ) -> Result<ZmqTransport, TransportError> {
        Self::connect_with(endpoint, requested_rank, ZmqConfig::default()).await
    }

    /// [`connect`](Self::connect) with a configuration.
    pub async fn connect_with(
        endpoint: &str,
        requested_rank: Rank,
        config: ZmqConfig,
    ) -> Result<ZmqTransport, TransportError> {
        let io = IoRuntime::start()?;
        let endpoint = endpoint.to_owned();
        let mut transport = io
            .run(async move { Self::connect_here(&endpoint, requested_rank, config).await })
            .await?;
        transport.io = Some(io);
        Ok(transport)
    }

    async fn connect_here(
        endpoint: &str,
        requested_rank: Rank,
        config: ZmqConfig,
    ) -> Result<ZmqTransport, TransportError> {
        let config = config.normalized();
        let context = || format!("joining the head node at {endpoint}");
        let timeout = config.handshake_timeout;
        let deadline = Instant::now() + timeout;
        let mut options = socket_options(&config);
        options.connect_timeout(timeout);
        let mut socket = DealerSocket::with_options(options);
        let mut monitor = socket.monitor();
        tokio::select! {
            connected = socket.connect(endpoint) => {
                connected.map_err(|e| io_error(context(), e))?;
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(io_error(context(), HandshakeError::Timeout(timeout)));
            }
        }
        let (mut send, recv) = socket.split();
        let (mut incoming, reader) = engine::spawn_reader(recv);
        let framing = Framing::new(config.max_frame);

        let hello = Envelope::correlated(
            1,
            Body::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                role: Role::ServerNode.into(),
                software: software(),
                host: host_name(),
                pid: std::process::id(),
                rank: requested_rank,
                token: String::new(),
                shared_memory: false,
            }),
        );
        let hello = framing.encode_body(&hello)?;
        let mut parts = vec![Header::Hello.encode(), Bytes::from(hello)];
        // This connection's nonce: fresh, so that no earlier Welcome can
        // pass for the answer to this Hello.
        let nonce = seal::nonce();
        let signer = config.signing.as_ref().map(Signer::new);
        if let Some(signer) = &signer {
            let link = LinkId {
                dealer: nonce,
                router: NO_NONCE,
            };
            parts.insert(0, signer.seal(Direction::ToRouter, &link, 0, &parts));
        }
        let message = ZmqMessage::try_from(parts).expect("two or three parts");
        zeromq::SocketSend::send(&mut send, message)
            .await
            .map_err(|e| io_error(context(), e))?;

        let answer = async {
            loop {
                tokio::select! {
                    received = incoming.recv() => match received {
                        Some(Ok(message)) => {
                            if let Some(answer) = read_answer(&framing, signer.as_ref(), nonce, message) {
                                break answer;
                            }
                        }
                        Some(Err(_)) | None => break Err(HandshakeError::Closed),
                    },
                    event = monitor.next() => {
                        if let Some(SocketEvent::Disconnected(_)) | None = event {
                            break Err(HandshakeError::Closed);
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        break Err(HandshakeError::Timeout(timeout));
                    }
                }
            }
        }
        .instrument(tracing::info_span!("zmq", endpoint = %endpoint))
        .await;
        let (rank, link) = match answer {
            Ok(welcomed) => welcomed,
            Err(error) => {
                reader.abort();
                return Err(io_error(context(), error));
            }
        };
        let span = tracing::info_span!("zmq", endpoint = %endpoint, rank);
        let signed = link.is_some();
        let (handle, mut engine, commands) =
            Self::assemble(rank, endpoint.to_owned(), SendHalf::Dealer(send), config);
        // On a signed link the head node admits this node only when our
        // first message (the credit below) proves the Hello fresh, and its
        // own credit follows: wait for it, so that when `connect` returns
        // the head node knows this node, as on an unsigned link.
        let (admitted_tx, admitted) = oneshot::channel();
        if signed {
            engine.notify_admission(admitted_tx);
        }
        async move {
            engine.add_head_node(link).await;
            tokio::spawn(
                engine
                    .run(Inputs {
                        commands,
                        incoming,
                        monitor,
                        reader,
                    })
                    .in_current_span(),
            );
        }
        .instrument(span)
        .await;
        if signed {
            tokio::select! {
                result = admitted => {
                    if result.is_err() {
                        return Err(io_error(context(), HandshakeError::Closed));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(io_error(context(), HandshakeError::Timeout(timeout)));
                }
            }
        }
        Ok(handle)
    }

    fn assemble(
        rank: Rank,
        endpoint: String,
        socket: SendHalf,
        config: ZmqConfig,
    ) -> (ZmqTransport, Engine, mpsc::UnboundedReceiver<Command>) {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let handle = ZmqTransport {
            rank,
            endpoint,
            framing: Framing::new(config.max_frame),
            budget: Budget::new(config.max_in_flight_bytes),
            shared: shared.clone(),
            commands: commands_tx,
            events: events_rx,
            closed: false,
            encoders: HashMap::new(),
            io: None,
        };
        let engine = Engine::new(socket, config, shared, events_tx);
        (handle, engine, commands_rx)
    }

    /// Messages dropped so far because they failed the signature check of
    /// a signed link (each is also logged, up to a rate): missing or wrong
    /// signatures, replays, and anything but a signed Hello from a
    /// connection that has not joined. Always 0 on an unsigned transport.
    pub fn rejected_messages(&self) -> u64 {
        self.state().rejected
    }

    /// Where the head node listens (the resolved address: `tcp://…:0`
    /// becomes the actual port), or, on a server node, the endpoint it
    /// connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("transport state poisoned")
    }

    /// The error for sending to `to`, which has no link.
    fn unreachable(&self, to: Rank) -> TransportError {
        let state = self.state();
        if state.terminal.is_some() {
            drop(state);
            self.terminal_error()
        } else if state.lost.contains(&to) {
            TransportError::Disconnected(to)
        } else {
            TransportError::UnknownRank(to)
        }
    }

    /// The error for an operation after the engine stopped.
    fn terminal_error(&self) -> TransportError {
        if self.closed {
            return TransportError::Closed;
        }
        match self.state().terminal.clone() {
            Some(Terminal::Lost(rank)) => TransportError::Disconnected(rank),
            Some(Terminal::Failed(why)) => TransportError::Io {
                context: format!("the socket at {}", self.endpoint),
                source: why.into(),
            },
            Some(Terminal::Closed) | None => TransportError::Closed,
        }
    }
}

impl Transport for ZmqTransport {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn peers(&self) -> Vec<Rank> {
        if self.closed {
            return Vec::new();
        }
        self.state().links.keys().copied().collect()
    }

    fn lost_peers_rejoin(&self) -> bool {
        true
    }

    async fn send(&mut self, to: Rank, envelope: Envelope) -> Result<(), TransportError> {
        if self.closed {
            return Err(TransportError::Closed);
        }
        let link = self.state().links.get(&to).cloned();
        let Some(link) = link else {
            return Err(self.unreachable(to));
        };
        let len = self.framing.encoded_len(&envelope)?;
        self.encoders
            .retain(|&(rank, id), e| (rank != to || id == link.id) && !e.jobs.is_closed());
        let queued = self.encoders.get(&(to, link.id)).is_some_and(Encoder::busy);
        // Small messages are encoded here, before any wait, as always; a
        // large one, or any behind one, later and elsewhere.
        let body = if len >= OFFLOAD_THRESHOLD || queued {
            None
        } else {
            let body = self.framing.encode_body(&envelope)?;
            Some(body)
        };
        let size = self.budget.size(len);
        let disconnected = |_| TransportError::Disconnected(to);
        // Both waits are cancel-safe: an unused permit goes back.
        let message = link
            .messages
            .clone()
            .acquire_owned()
            .await
            .map_err(disconnected)?;
        let source = self.budget.source(
            size,
            link.bytes.available_permits(),
            link.reserve.available_permits(),
        );
        if source == Source::Wait {
            // What is in flight may not have asked for its credit back
            // (it left over half the budget free): ask now, or a
            // message larger than what is left would wait forever. The
            // request goes after the messages the encoder still holds:
            // the receiver returns the credit of what it has by then.
            let request = || Command::RequestCredit { to, link: link.id };
            let queued = self
                .encoders
                .get(&(to, link.id))
                .is_some_and(|e| e.busy() && e.queue(EncoderItem::After(request())));
            if !queued {
                let _ = self.commands.send(request());
            }
        }
        let reserved = source == Source::Reserve;
        let pool = if reserved { &link.reserve } else { &link.bytes };
        // Only `send` takes permits, and it has `&mut self`: a pool that
        // has room now keeps it, and this returns at once unless the
        // message waits for bytes.
        let bytes = pool
            .clone()
            .acquire_many_owned(size)
            .await
            .map_err(disconnected)?;
        message.forget();
        bytes.forget();
        // A message from the reserve went past a large one: its bytes are
        // wanted back as soon as it is consumed.
        let credit_wanted = self
            .budget
            .credit_wanted(reserved, link.bytes.available_permits());
        let charge = Charge {
            bytes: size,
            reserved,
        };
        let Some(body) = body else {
            let (framing, commands) = (self.framing, self.commands.clone());
            let encoder = self
                .encoders
                .entry((to, link.id))
                .or_insert_with(|| Encoder::spawn(framing, commands));
            let job = EncodeJob {
                envelope,
                len,
                to,
                link,
                charge,
                credit_wanted,
            };
            if !encoder.queue(EncoderItem::Message(job)) {
                return Err(self.terminal_error());
            }
            return Ok(());
        };
        drop(envelope);
        self.commands
            .send(Command::Send {
                to,
                link: link.id,
                body: Bytes::from(body),
                charge,
                credit_wanted,
            })
            .map_err(|_| self.terminal_error())
    }

    async fn recv(&mut self) -> Result<TransportEvent, TransportError> {
        if self.closed {
            return Err(TransportError::Closed);
        }
        match self.events.recv().await {
            Some(Delivery {
                event,
                link,
                credit_wanted,
            }) => {
                if let TransportEvent::Message { from, .. } = &event {
                    let _ = self.commands.send(Command::Consumed {
                        from: *from,
                        link,
                        credit_wanted,
                    });
                }
                Ok(event)
            }
            None => Err(self.terminal_error()),
        }
    }

    async fn shutdown(&mut self) -> Result<(), TransportError> {
        if self.closed {
            return Ok(());
        }
        // What was sent goes before the goodbye, also a large message
        // still being encoded.
        self.flush_encoders().await;
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).is_ok() {
            // An error means the engine stopped on its own: closed too.
            let _ = rx.await;
        }
        self.closed = true;
        self.events.close();
        Ok(())
    }
}

/// Reads the ROUTER's answer to Hello, sent with `nonce`:
/// `Some(Ok((rank, link)))` for a Welcome (with the link's signing state if
/// signed), `Some(Err(_))` for a refusal or a bad answer, `None` for
/// anything to skip.
fn read_answer(
    framing: &Framing,
    signer: Option<&Signer>,
    nonce: Nonce,
    message: ZmqMessage,
) -> Option<Result<(Rank, Option<LinkSeal>), HandshakeError>> {
    let mut parts = message.into_vecdeque();
    let Some(signer) = signer else {
        return welcome_or_refusal(framing, parts).map(|answer| answer.map(|rank| (rank, None)));
    };
    let first = parts.pop_front()?;
    let Some(seal) = Seal::parse(&first).filter(|seal| seal.counter == 0) else {
        parts.push_front(first);
        // A head node that cannot verify our Hello cannot sign its
        // answer either; a refusal is all it may say unsigned.
        return match welcome_or_refusal(framing, parts)? {
            Err(HandshakeError::Refused { message, .. }) => {
                Some(Err(HandshakeError::Unauthenticated(message)))
            }
            Ok(_) | Err(_) => {
                tracing::warn!("ignoring an unsigned answer to a signed Hello");
                None
            }
        };
    };
    let link = LinkId {
        dealer: nonce,
        router: seal.nonce,
    };
    if !signer.verify(Direction::ToDealer, &link, &seal, parts.make_contiguous()) {
        tracing::warn!("ignoring an answer to Hello whose signature does not verify");
        return None;
    }
    welcome_or_refusal(framing, parts)
        .map(|answer| answer.map(|rank| (rank, Some(LinkSeal::new(link)))))
}

/// Reads an answer to Hello without its seal: `Some(Ok(rank))` for a
/// Welcome, `Some(Err(_))` for a refusal or a bad answer, `None` for
/// anything to skip.
fn welcome_or_refusal(
    framing: &Framing,
    mut parts: std::collections::VecDeque<Bytes>,
) -> Option<Result<Rank, HandshakeError>> {
    let header = parts.front().and_then(|h| Header::decode(h));
    if header != Some(Header::Welcome) || parts.len() != 2 {
        tracing::warn!(?header, "ignoring a message before Welcome");
        return None;
    }
    let body = parts.pop_back().expect("two parts");
    let envelope = match framing.decode_body(body) {
        Ok(envelope) => envelope,
        Err(error) => return Some(Err(HandshakeError::Unexpected(error.to_string()))),
    };
    Some(match envelope.body {
        Some(Body::Welcome(welcome)) => {
            if check_version(welcome.protocol_version, 0).is_err() {
                Err(HandshakeError::Unexpected(format!(
                    "the head node speaks protocol version {}, this server node {PROTOCOL_VERSION}",
                    welcome.protocol_version
                )))
            } else if welcome.rank < 1 {
                Err(HandshakeError::Unexpected(format!(
                    "Welcome gives rank {}, not a server rank",
                    welcome.rank
                )))
            } else {
                Ok(welcome.rank)
            }
        }
        Some(Body::Error(error)) => Err(HandshakeError::Refused {
            code: error.code(),
            message: error.message,
        }),
        other => Err(HandshakeError::Unexpected(format!(
            "{} instead of Welcome",
            other.as_ref().map_or("an empty envelope", Body::name)
        ))),
    })
}

fn socket_options(_config: &ZmqConfig) -> SocketOptions {
    // The crate's read buffer (64 KiB chunks at most) is as fast as larger
    // ones for 256 MiB messages: the time goes to page faults and copies.
    SocketOptions::default()
}

fn io_error(
    context: String,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> TransportError {
    TransportError::Io {
        context,
        source: source.into(),
    }
}

/// This software, for Hello and Welcome.
pub(crate) fn software() -> String {
    format!("casa-node {}", env!("CARGO_PKG_VERSION"))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}
