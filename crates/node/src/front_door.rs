//! The front door: the stream socket drivers connect to, `unix://` (this
//! user's processes only) or `tcp://` (TLS, and the token of the connection
//! file in the driver's `Hello`). Each connection is one driver; frames are length-delimited protobuf `Envelope`s (tokio
//! util's `LengthDelimitedCodec`: a 4-byte big-endian length, then the
//! bytes). The connection tasks only move frames: every decision is the
//! head node's. What waits between them and the head node's loop is
//! bounded ([`crate::driver_queues`]): a driver that has too many replies
//! waiting to be written, or too many requests not yet taken care of, is
//! not read until they drain, and the tasks wait for room in the loop's
//! channel ([`DRIVER_EVENTS`]) rather than the loop for them.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{Envelope, ProtocolErrorCode};
use casa_node_protocol::{DriverId, FrameError, Framing, OFFLOAD_THRESHOLD};
use futures::{SinkExt, StreamExt};
use prost::Message;
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::codec::{Encoder, FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::connection_file::{CONNECTION_FILE_VAR, ConnectionFile, ConnectionFileError};
use crate::dashboard::Traffic;
use crate::driver_queues::{Credit, DriverQueues, Outbox};
use crate::endpoint::FrontDoorEndpoint;

/// What the connection tasks report to the head node.
#[derive(Debug)]
pub enum DriverEvent {
    /// A driver connected; envelopes for it go into `outbox`, and dropping
    /// it closes the connection once what was queued is written.
    Connected {
        /// The new driver.
        driver: DriverId,
        /// Its outgoing queues.
        outbox: Outbox,
    },
    /// A driver sent an envelope.
    Request {
        /// The driver.
        driver: DriverId,
        /// What it sent.
        envelope: Envelope,
        /// Held until the head node has taken care of the request (it
        /// answered, or the request left the syntax check's line).
        credit: Credit,
    },
    /// A driver's connection closed.
    Disconnected {
        /// The driver.
        driver: DriverId,
    },
    /// A peer was refused before it became a driver (another user, no TLS,
    /// a wrong or missing token): the message says who and why, for the
    /// log.
    Refused {
        /// Who was refused and why.
        message: String,
    },
}

/// The front door could not be opened.
#[derive(Debug, Error)]
pub enum FrontDoorError {
    /// Plain TCP would expose the cluster to anyone who can reach the port.
    #[error(
        "{0}: a tcp:// front door needs TLS and a token: give --connection-file FILE (created if missing) or set {CONNECTION_FILE_VAR}"
    )]
    TcpWithoutTls(FrontDoorEndpoint),
    /// The connection file is unusable.
    #[error(transparent)]
    ConnectionFile(#[from] ConnectionFileError),
    /// Another cluster is listening there.
    #[error("{0}: a casa-node front door is already listening there")]
    InUse(PathBuf),
    /// The socket could not be created.
    #[error("{path}: {source}")]
    Io {
        /// The socket path or address.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How long a `tcp://` peer has for the TLS handshake and its `Hello` with
/// the token: a silent peer must not hold a connection open.
pub const ADMISSION_DEADLINE: Duration = Duration::from_secs(5);

/// Events the connection tasks may have queued for the head node's loop
/// before they wait for it to take some.
pub const DRIVER_EVENTS: usize = 1024;

/// The largest first frame of a `tcp://` peer not yet admitted: a `Hello`
/// is small, and an unknown peer must not make the node buffer much.
const HELLO_MAX_FRAME: usize = 64 * 1024;

/// A bound front door, ready to accept drivers.
#[derive(Debug)]
pub struct FrontDoor {
    door: Door,
    endpoint: FrontDoorEndpoint,
    framing: Framing,
    traffic: Arc<Traffic>,
}

enum Door {
    /// Admits peers of this user (`SO_PEERCRED`).
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    /// Admits peers that complete TLS and present the token.
    Tls {
        listener: TcpListener,
        acceptor: TlsAcceptor,
        token: Arc<str>,
        connection_file: PathBuf,
    },
}

impl std::fmt::Debug for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Door::Unix { path, .. } => f.debug_struct("Unix").field("path", path).finish(),
            Door::Tls {
                connection_file, ..
            } => f
                .debug_struct("Tls")
                .field("connection_file", connection_file)
                .finish_non_exhaustive(),
        }
    }
}

impl FrontDoor {
    /// Binds the front door at `endpoint`. A stale socket left by a dead
    /// cluster is replaced; a live one is an error. A `tcp://` front door
    /// needs `connection_file`: read if it exists, else created with a
    /// fresh certificate, token and signing key once the port is bound.
    pub async fn bind(
        endpoint: &FrontDoorEndpoint,
        connection_file: Option<&Path>,
        framing: Framing,
    ) -> Result<FrontDoor, FrontDoorError> {
        let path = match endpoint {
            FrontDoorEndpoint::Unix(path) => path.clone(),
            FrontDoorEndpoint::Tcp(addr) => {
                let file = connection_file
                    .ok_or_else(|| FrontDoorError::TcpWithoutTls(endpoint.clone()))?;
                return Self::bind_tls(endpoint, addr, file, framing).await;
            }
        };
        let io_err = |source| FrontDoorError::Io {
            path: path.clone(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a socket",
                )));
            }
            if UnixStream::connect(&path).await.is_ok() {
                return Err(FrontDoorError::InUse(path));
            }
            std::fs::remove_file(&path).map_err(io_err)?;
        }
        let listener = UnixListener::bind(&path).map_err(io_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        Ok(FrontDoor {
            door: Door::Unix { listener, path },
            endpoint: endpoint.clone(),
            framing,
            traffic: Arc::default(),
        })
    }

    async fn bind_tls(
        endpoint: &FrontDoorEndpoint,
        addr: &str,
        file: &Path,
        framing: Framing,
    ) -> Result<FrontDoor, FrontDoorError> {
        let (connection, created) = ConnectionFile::read_or_generate(file, endpoint)?;
        // A certificate and key that do not go together fail here, before
        // anything listens.
        connection.server_config()?;
        let io_err = |source| FrontDoorError::Io {
            path: PathBuf::from(endpoint.to_string()),
            source,
        };
        // The endpoint parsed, so HOST:PORT is there.
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
        let bare = crate::connection_file::tcp_host(endpoint).unwrap_or_default();
        let port = port.parse::<u16>().unwrap_or_default();
        let listener = TcpListener::bind((bare.as_str(), port))
            .await
            .map_err(io_err)?;
        // With port 0 the system chose one: drivers need to know which.
        let port = listener.local_addr().map_err(io_err)?.port();
        let bound = FrontDoorEndpoint::Tcp(format!("{host}:{port}"));
        let connection = if created {
            connection.write_new(&bound)?
        } else if connection.endpoint() != bound {
            connection.update_endpoint(&bound)?
        } else {
            connection
        };
        // From the file as it now is: another `up` may have created it
        // first.
        let acceptor = TlsAcceptor::from(connection.server_config()?);
        Ok(FrontDoor {
            door: Door::Tls {
                listener,
                acceptor,
                token: Arc::from(connection.token()),
                connection_file: connection.path().to_owned(),
            },
            endpoint: bound,
            framing,
            traffic: Arc::default(),
        })
    }

    /// Where the front door listens (for `tcp://HOST:0`, with the port the
    /// system chose).
    pub fn endpoint(&self) -> &FrontDoorEndpoint {
        &self.endpoint
    }

    /// The socket's path, for a `unix://` front door.
    pub fn path(&self) -> Option<&Path> {
        match &self.door {
            Door::Unix { path, .. } => Some(path),
            Door::Tls { .. } => None,
        }
    }

    /// A `tcp://` front door's TLS acceptor and token (from its connection
    /// file), which the dashboard serves with too.
    pub fn tls(&self) -> Option<(TlsAcceptor, Arc<str>)> {
        match &self.door {
            Door::Unix { .. } => None,
            Door::Tls {
                acceptor, token, ..
            } => Some((acceptor.clone(), token.clone())),
        }
    }

    /// The connection file, for a `tcp://` front door.
    pub fn connection_file(&self) -> Option<&Path> {
        match &self.door {
            Door::Unix { .. } => None,
            Door::Tls {
                connection_file, ..
            } => Some(connection_file),
        }
    }

    /// Accepts drivers until the returned task is aborted, reporting to
    /// `events`; `origin` names the head node in the record that tells a
    /// driver how many log records it read too slowly to be sent. On `unix://`, connections from another user are refused
    /// (the peer's uid, from `SO_PEERCRED`, must be ours); on `tcp://`,
    /// a peer must complete TLS and send a `Hello` with the token within
    /// [`ADMISSION_DEADLINE`]. Every refusal is reported as
    /// [`DriverEvent::Refused`]; other drivers are not affected.
    pub fn serve(
        self,
        events: mpsc::Sender<DriverEvent>,
        origin: Arc<str>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let wire = Wire {
                framing: self.framing,
                traffic: self.traffic.clone(),
                origin,
            };
            match &self.door {
                Door::Unix { listener, .. } => serve_unix(listener, wire, events).await,
                Door::Tls {
                    listener,
                    acceptor,
                    token,
                    ..
                } => serve_tls(listener, acceptor, token, wire, events).await,
            }
        })
    }

    /// The bytes read from and written to drivers, counted as they pass.
    pub fn traffic(&self) -> Arc<Traffic> {
        self.traffic.clone()
    }
}

impl Drop for FrontDoor {
    fn drop(&mut self) {
        if let Door::Unix { path, .. } = &self.door {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What every connection of a front door shares.
#[derive(Clone)]
struct Wire {
    framing: Framing,
    traffic: Arc<Traffic>,
    origin: Arc<str>,
}

/// Reports a refused peer to the head node, which logs it.
async fn refuse(events: &mpsc::Sender<DriverEvent>, message: String) {
    if let Err(unsent) = events.send(DriverEvent::Refused { message }).await {
        if let DriverEvent::Refused { message } = unsent.0 {
            tracing::warn!("{message}");
        }
    }
}

/// Waits after a failed accept (out of file descriptors, say), rather than
/// spin.
async fn accept_failed(e: io::Error) {
    tracing::warn!("front door: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn serve_unix(listener: &UnixListener, wire: Wire, events: mpsc::Sender<DriverEvent>) {
    let uid = nix::unistd::getuid().as_raw();
    let mut next = 1;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == uid => {}
            Ok(cred) => {
                let pid = cred.pid().map_or("unknown".to_owned(), |p| p.to_string());
                refuse(
                    &events,
                    format!(
                        "front door: refused a connection from uid {} (pid {pid}): only uid {uid} may connect",
                        cred.uid()
                    ),
                )
                .await;
                continue;
            }
            Err(e) => {
                refuse(
                    &events,
                    format!("front door: refused a connection whose peer is unknown: {e}"),
                )
                .await;
                continue;
            }
        }
        let driver = DriverId(next);
        next += 1;
        let (read_half, write_half) = stream.into_split();
        let reader = FramedRead::new(read_half, codec(wire.framing));
        let writer = FramedWrite::new(write_half, EnvelopeEncoder(wire.framing));
        tokio::spawn(connection(
            reader,
            writer,
            driver,
            wire.clone(),
            events.clone(),
            None,
        ));
    }
}

async fn serve_tls(
    listener: &TcpListener,
    acceptor: &TlsAcceptor,
    token: &Arc<str>,
    wire: Wire,
    events: mpsc::Sender<DriverEvent>,
) {
    let mut next = 1;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let driver = DriverId(next);
        next += 1;
        let acceptor = acceptor.clone();
        let token = token.clone();
        let events = events.clone();
        let wire = wire.clone();
        // Each peer is admitted on a task of its own: a slow one holds up
        // no other.
        tokio::spawn(async move {
            let admitted = tokio::time::timeout(
                ADMISSION_DEADLINE,
                admit(stream, &acceptor, &token, wire.framing),
            )
            .await;
            match admitted {
                Ok(Ok((reader, writer, hello))) => {
                    connection(reader, writer, driver, wire, events, Some(hello)).await;
                }
                Ok(Err(why)) => {
                    refuse(&events, format!("front door: refused {peer}: {why}")).await
                }
                Err(_) => {
                    refuse(
                        &events,
                        format!(
                            "front door: refused {peer}: no TLS handshake and Hello with the token within {ADMISSION_DEADLINE:?}"
                        ),
                    )
                    .await
                }
            }
        });
    }
}

type TlsReader = FramedRead<ReadHalf<TlsStream<TcpStream>>, LengthDelimitedCodec>;
type TlsWriter = FramedWrite<WriteHalf<TlsStream<TcpStream>>, EnvelopeEncoder>;

/// Why a `tcp://` peer was not admitted.
#[derive(Debug, Error)]
enum Refusal {
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    #[error("closed the connection before its Hello")]
    ClosedBeforeHello,
    #[error("a bad first frame: {0}")]
    BadFrame(io::Error),
    #[error("a malformed first frame: {0}")]
    Malformed(FrameError),
    #[error("token required: a tcp:// front door takes the token of its connection file in Hello")]
    NoToken,
    #[error("wrong token: it is not the token of this front door's connection file")]
    WrongToken,
    #[error("token required: the first message must be a Hello with the token")]
    NotHello,
}

/// The TLS handshake, then the first frame, which must be a `Hello` with
/// the token. A peer with a wrong or no token is told so before the
/// connection closes. Returns the connection and the `Hello` (without its
/// token) for the head node.
async fn admit(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    token: &str,
    framing: Framing,
) -> Result<(TlsReader, TlsWriter, Envelope), Refusal> {
    let tls = acceptor.accept(stream).await.map_err(Refusal::Handshake)?;
    let (read_half, write_half) = tokio::io::split(tls);
    let mut hello_codec = codec(framing);
    hello_codec.set_max_frame_length(HELLO_MAX_FRAME.min(framing.max_frame()));
    let mut reader = FramedRead::new(read_half, hello_codec);
    let mut writer = FramedWrite::new(write_half, EnvelopeEncoder(framing));
    let first = match reader.next().await {
        None => return Err(Refusal::ClosedBeforeHello),
        Some(Err(e)) => return Err(Refusal::BadFrame(e)),
        Some(Ok(frame)) => framing
            .decode_body(frame.freeze())
            .map_err(Refusal::Malformed)?,
    };
    let mut hello = first;
    let refusal = match &mut hello.body {
        Some(Body::Hello(h)) if h.token.is_empty() => Some(Refusal::NoToken),
        Some(Body::Hello(h)) if !bool::from(h.token.as_bytes().ct_eq(token.as_bytes())) => {
            Some(Refusal::WrongToken)
        }
        Some(Body::Hello(h)) => {
            // The head node has no use for the secret.
            h.token.clear();
            None
        }
        _ => Some(Refusal::NotHello),
    };
    if let Some(refusal) = refusal {
        let reply = Envelope::error(
            hello.correlation,
            ProtocolErrorCode::RoleRefused,
            refusal.to_string(),
        );
        let _ = writer.send(reply).await;
        let _ = SinkExt::<Envelope>::close(&mut writer).await;
        return Err(refusal);
    }
    reader
        .decoder_mut()
        .set_max_frame_length(framing.max_frame());
    Ok((reader, writer, hello))
}

/// Writes envelopes as front-door frames straight into the writer's
/// buffer. Encoding an envelope to a buffer of its own and then framing it
/// copied every large value twice, each time into fresh memory, which
/// costs a page fault per page: a tenth of a 256 MiB round trip.
#[derive(Debug, Clone, Copy)]
pub struct EnvelopeEncoder(pub Framing);

/// Why an envelope was not written to a driver.
#[derive(Debug)]
pub enum WriteError {
    /// The connection failed: nothing more can be written.
    Io(io::Error),
    /// This envelope cannot be framed (too large, say); the connection is
    /// still in step.
    Frame(FrameError),
}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> Self {
        WriteError::Io(e)
    }
}

impl Encoder<Envelope> for EnvelopeEncoder {
    type Error = WriteError;

    fn encode(&mut self, envelope: Envelope, dst: &mut BytesMut) -> Result<(), WriteError> {
        // On an error `dst` is left as it was.
        self.0.encode(&envelope, dst).map_err(WriteError::Frame)
    }
}

/// Bytes of the length before each frame.
const LENGTH_BYTES: u64 = 4;

/// The codec both ends of the front door use.
pub fn codec(framing: Framing) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(LENGTH_BYTES as usize)
        .max_frame_length(framing.max_frame())
        .new_codec()
}

/// Why a driver's frame gave no envelope.
#[derive(Debug, Error)]
enum DecodeError {
    /// The bytes are not a valid envelope, or break a bound.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The blocking task that decoded a large frame did not finish (it
    /// panicked, or the runtime is shutting down).
    #[error("decoding failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Decodes a driver's frame; a large one on a blocking thread, so the
/// event loop's thread goes on answering pings.
async fn decode(framing: Framing, frame: Bytes) -> Result<Envelope, DecodeError> {
    if frame.len() < OFFLOAD_THRESHOLD {
        return Ok(framing.decode_body(frame)?);
    }
    Ok(tokio::task::spawn_blocking(move || framing.decode_body(frame)).await??)
}

/// One admitted driver: reports its frames to the head node and writes
/// what the head node queues for it. `first` is a frame already read
/// (the `Hello` a `tcp://` peer was admitted with). Before each frame it
/// waits for room in the driver's queues.
async fn connection<R, W>(
    mut reader: FramedRead<R, LengthDelimitedCodec>,
    mut writer: FramedWrite<W, EnvelopeEncoder>,
    driver: DriverId,
    wire: Wire,
    events: mpsc::Sender<DriverEvent>,
    first: Option<Envelope>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Wire {
        framing,
        traffic,
        origin,
    } = wire;
    let queues = DriverQueues::new(origin);
    // The head node holds the only outbox: when it drops it, the writer
    // ends and the connection closes. This side only reports bad frames
    // while the connection is open.
    let outbox = queues.outbox();
    if events
        .send(DriverEvent::Connected { driver, outbox })
        .await
        .is_err()
    {
        return;
    }
    if let Some(envelope) = first {
        let credit = queues.credit(envelope.encoded_len());
        let request = DriverEvent::Request {
            driver,
            envelope,
            credit,
        };
        if events.send(request).await.is_err() {
            return;
        }
    }
    // Everything queued for the driver goes out in as few writes as the
    // codec's buffer allows: under load, one system call and one wake-up
    // of the driver carry many replies.
    let sent = traffic.clone();
    let out = queues.clone();
    let write = tokio::spawn(async move {
        while let Some(first) = out.next().await {
            let mut next = Some(first);
            while let Some((envelope, len)) = next {
                if len <= framing.max_frame() {
                    sent.sent
                        .fetch_add(len as u64 + LENGTH_BYTES, Ordering::Relaxed);
                }
                if len >= OFFLOAD_THRESHOLD {
                    // Encoded on a blocking thread, after what is already
                    // buffered, then written as it is.
                    if SinkExt::<Envelope>::flush(&mut writer).await.is_err() {
                        return out.broken();
                    }
                    let encoded = tokio::task::spawn_blocking(move || {
                        let mut frame = BytesMut::new();
                        framing.encode(&envelope, &mut frame).map(|()| frame)
                    })
                    .await;
                    match encoded {
                        Ok(Ok(frame)) => {
                            if writer.get_mut().write_all(&frame).await.is_err() {
                                return out.broken();
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!("{driver}: a reply could not be framed: {e}")
                        }
                        Err(_) => return out.broken(),
                    }
                    next = out.try_next();
                    continue;
                }
                match writer.feed(envelope).await {
                    Ok(()) => {}
                    Err(WriteError::Frame(e)) => {
                        tracing::warn!("{driver}: a reply could not be framed: {e}")
                    }
                    Err(WriteError::Io(_)) => return out.broken(),
                }
                next = out.try_next();
            }
            if SinkExt::<Envelope>::flush(&mut writer).await.is_err() {
                return out.broken();
            }
        }
        // Over TLS this says goodbye (close_notify) before the socket closes.
        let _ = SinkExt::<Envelope>::close(&mut writer).await;
    });
    loop {
        queues.room_to_read().await;
        match reader.next().await {
            None => break,
            Some(Ok(frame)) => {
                traffic
                    .received
                    .fetch_add(frame.len() as u64 + LENGTH_BYTES, Ordering::Relaxed);
                let credit = queues.credit(frame.len());
                match decode(framing, frame.freeze()).await {
                    Ok(envelope) => {
                        let request = DriverEvent::Request {
                            driver,
                            envelope,
                            credit,
                        };
                        if events.send(request).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("{driver}: dropped a malformed frame: {e}");
                        queues.reply_if_open(Envelope::error(
                            0,
                            ProtocolErrorCode::Malformed,
                            e.to_string(),
                        ));
                    }
                }
            }
            Some(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                // A TLS peer that closed without close_notify, as Python's
                // ssl does: every frame carries its length, so this is an
                // end of stream like any other.
                tracing::debug!("{driver}: closed without TLS close_notify");
                break;
            }
            Some(Err(e)) => {
                // An oversized frame or a broken stream: the stream is out
                // of step, so say why and close.
                tracing::warn!("{driver}: closing: {e}");
                let code = if e.kind() == io::ErrorKind::InvalidData {
                    ProtocolErrorCode::TooLarge
                } else {
                    ProtocolErrorCode::Malformed
                };
                queues.reply_if_open(Envelope::error(0, code, e.to_string()));
                break;
            }
        }
    }
    let _ = events.send(DriverEvent::Disconnected { driver }).await;
    let _ = write.await;
}
