//! The Rust client: a driver that talks to a cluster's front door. Async,
//! with [`BlockingClient`] for programs without a runtime.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{
    CancelReply, CancelRequest, ClaimReply, ClaimRequest, ClusterInfo, CommandMode,
    CommandResponse, DebuggingModeRequest, Envelope, Hello, IdLeaseRequest, LogLevel,
    LogLevelRequest, LogRecord, LogSubscription, Parameter, ProtocolError, RejectReason, Role,
    StatusReply, StatusRequest, StopRequest, SubmitRequest, TrackReply, TrackRequest, submit_reply,
};
use casa_node_protocol::{Framing, PROTOCOL_VERSION, Rank, RequestId};
use futures::{SinkExt, StreamExt};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::connection_file::{CONNECTION_FILE_VAR, ConnectionFile, ConnectionFileError, tcp_host};
use crate::endpoint::{self, ENDPOINT_VAR, EndpointError, FrontDoorEndpoint};
use crate::front_door::codec;

/// Where a driver connects: the front door, and for a `tcp://` one its
/// connection file.
#[derive(Debug, Clone)]
pub struct Target {
    /// The front door.
    pub endpoint: FrontDoorEndpoint,
    /// The connection file of a `tcp://` front door; `None` to find it
    /// when connecting (see [`Client::connect`]).
    pub connection_file: Option<ConnectionFile>,
}

impl Target {
    /// The target of the CLI's driver commands: the endpoint flag, else
    /// `$CASA_NODE_ENDPOINT`, else the connection file's endpoint, else the
    /// cluster `up` recorded; the connection file is read (and checked)
    /// now.
    pub fn resolve(
        endpoint: Option<&str>,
        connection_file: Option<&std::path::Path>,
    ) -> Result<Target, ClientError> {
        let connection_file = connection_file.map(ConnectionFile::read).transpose()?;
        let named =
            endpoint.is_some() || std::env::var_os(ENDPOINT_VAR).is_some_and(|v| !v.is_empty());
        let endpoint = match &connection_file {
            Some(file) if !named => file.endpoint(),
            _ => endpoint::resolve(endpoint)?,
        };
        Ok(Target {
            endpoint,
            connection_file,
        })
    }
}

impl From<&FrontDoorEndpoint> for Target {
    fn from(endpoint: &FrontDoorEndpoint) -> Target {
        Target {
            endpoint: endpoint.clone(),
            connection_file: None,
        }
    }
}

impl From<FrontDoorEndpoint> for Target {
    fn from(endpoint: FrontDoorEndpoint) -> Target {
        Target {
            endpoint,
            connection_file: None,
        }
    }
}

impl From<ConnectionFile> for Target {
    fn from(file: ConnectionFile) -> Target {
        Target {
            endpoint: file.endpoint(),
            connection_file: Some(file),
        }
    }
}

/// The connection file for a `tcp://` front door given without one:
/// `$CASA_NODE_CONNECTION_FILE`, else the file `up` recorded with it.
fn find_connection_file(endpoint: &FrontDoorEndpoint) -> Result<ConnectionFile, ClientError> {
    if let Some(path) = std::env::var_os(CONNECTION_FILE_VAR).filter(|p| !p.is_empty()) {
        return Ok(ConnectionFile::read(std::path::Path::new(&path))?);
    }
    match endpoint::recorded()? {
        Some(endpoint::Record {
            endpoint: recorded,
            connection_file: Some(path),
        }) if recorded == *endpoint => Ok(ConnectionFile::read(&path)?),
        _ => Err(ClientError::NoConnectionFile(endpoint.to_string())),
    }
}

/// What can go wrong for a driver.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The front door could not be reached.
    #[error("cannot reach the casa-node front door at {endpoint}: {source}")]
    Unreachable {
        /// Where it was looked for.
        endpoint: String,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// No endpoint, or an unusable one.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The connection file is unusable.
    #[error(transparent)]
    ConnectionFile(#[from] ConnectionFileError),
    /// A `tcp://` front door, and no connection file for it.
    #[error(
        "{0}: a tcp:// front door needs its connection file: give --connection-file FILE or set {CONNECTION_FILE_VAR}"
    )]
    NoConnectionFile(String),
    /// TLS failed: the front door's certificate is not the connection
    /// file's, or the peer does not speak TLS.
    #[error("TLS with the casa-node front door at {endpoint} failed: {source}")]
    Tls {
        /// Where the front door is.
        endpoint: String,
        /// Why TLS failed.
        #[source]
        source: std::io::Error,
    },
    /// The head node refused the submission; nothing was queued.
    #[error("rejected: {message}")]
    Rejected {
        /// The reason, for programs.
        reason: RejectReason,
        /// The reason, for people.
        message: String,
    },
    /// Claimed ids the head node does not know (rule 33).
    #[error(
        "the head node knows no request with id {}: never given, or answered and no longer kept (a head node keeps responses with --journal)",
        .0.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
    )]
    UnknownIds(Vec<RequestId>),
    /// The head node reported an error.
    #[error("the head node says: {0}")]
    Refused(String),
    /// The connection closed.
    #[error("the connection to the head node closed")]
    Disconnected,
    /// The head node went away while watched (`status --watch`).
    #[error("the cluster at {0} is gone")]
    Gone(String),
    /// An id this client never received from a submission (rule 17).
    #[error("unknown request id {0}")]
    UnknownId(RequestId),
    /// The head node answered with something unexpected.
    #[error("unexpected answer from the head node: {0}")]
    Protocol(String),
    /// The wait ran out.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
}

/// A command to push: the driver plane's `SubmitRequest`, built with a
/// fluent API.
#[derive(Debug, Clone, Default)]
pub struct Submit {
    request: SubmitRequest,
}

impl Submit {
    /// `command`, to the first available server, no parameters.
    pub fn new(command: impl Into<String>) -> Self {
        Submit {
            request: SubmitRequest {
                command: command.into(),
                ..SubmitRequest::default()
            },
        }
    }

    /// Binds `name` in the server's globals for the command (rule 3).
    pub fn param(
        mut self,
        name: impl Into<String>,
        value: impl Into<casa_node_protocol::pb::Value>,
    ) -> Self {
        self.request.parameters.push(Parameter::new(name, value));
        self
    }

    /// Runs on these servers, one request each, in this order (rule 13).
    pub fn targets(mut self, ranks: impl IntoIterator<Item = Rank>) -> Self {
        self.request.targets.extend(ranks);
        self
    }

    /// Forces the mode instead of letting the server decide (rule 2).
    pub fn mode(mut self, mode: CommandMode) -> Self {
        self.request.mode = mode.into();
        self
    }

    /// Interrupts the command if it runs longer than `deadline` (rule 24).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.request.deadline_seconds = Some(deadline.as_secs_f64());
        self
    }

    /// Not run again after the head node restarts from its journal with
    /// the request unfinished: it ends with a failure naming the restart
    /// instead (rule 33). For commands that must not run twice.
    pub fn no_retry(mut self) -> Self {
        self.request.no_retry = true;
        self
    }
}

impl From<SubmitRequest> for Submit {
    fn from(request: SubmitRequest) -> Self {
        Submit { request }
    }
}

/// Ids a client leases at a time for its submissions (rule 11).
const LEASE_BLOCK: u32 = 4096;

/// Frames waiting to be written to the head node: a submission waits for
/// room, so a driver that streams submissions faster than the head node
/// takes them (rule 31's backpressure) holds a bounded amount.
const OUTBOX: usize = 256;

/// Log records waiting for a subscriber to take them: past this many, new
/// ones are dropped (responses are never held up by a slow log reader)
/// and the subscriber is told how many.
pub const LOG_BUFFER: usize = 4096;

#[derive(Default)]
struct State {
    replies: HashMap<u64, oneshot::Sender<Body>>,
    responses: HashMap<RequestId, CommandResponse>,
    known: HashSet<RequestId>,
    logs: Option<mpsc::Sender<LogRecord>>,
    /// Log records dropped since the subscriber last had room.
    logs_dropped: u64,
    closed: bool,
    /// Leased ids not yet used: `[next, end)` blocks, oldest first.
    leases: VecDeque<[RequestId; 2]>,
    leased: u64,
    /// The head node gives no leases: submissions wait for a SubmitReply.
    no_leases: bool,
    /// The rejections that pipelined submissions' ids were answered with.
    rejected: HashMap<RequestId, submit_reply::Rejected>,
}

impl State {
    /// Hands a log record to the subscriber, or counts it dropped when the
    /// subscriber has no room; once it has room again, a record saying how
    /// many were dropped goes first.
    fn log(&mut self, record: LogRecord) {
        let Some(logs) = &self.logs else {
            return;
        };
        if self.logs_dropped > 0 {
            let Ok(room) = logs.try_reserve() else {
                self.logs_dropped += 1;
                return;
            };
            let dropped = std::mem::take(&mut self.logs_dropped);
            room.send(LogRecord {
                time: record.time,
                level: LogLevel::Warning.into(),
                origin: "casa_node::client".into(),
                rank: 0,
                message: format!("{dropped} log records dropped: this subscriber read too slowly"),
            });
        }
        match logs.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.logs_dropped += 1,
            Err(mpsc::error::TrySendError::Closed(_)) => self.logs = None,
        }
    }

    /// `count` leased ids, in increasing order, if that many are left.
    fn take_ids(&mut self, count: u64) -> Option<Vec<RequestId>> {
        if self.leased < count {
            return None;
        }
        let mut ids = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        while (ids.len() as u64) < count {
            let block = self.leases.front_mut()?;
            let take = (count - ids.len() as u64).min(block[1] - block[0]);
            ids.extend(block[0]..block[0] + take);
            block[0] += take;
            if block[0] == block[1] {
                self.leases.pop_front();
            }
        }
        self.leased -= count;
        Some(ids)
    }

    /// The rejection of a submission among `ids`, if one was refused.
    fn rejection(&self, ids: &[RequestId]) -> Option<ClientError> {
        ids.iter()
            .find_map(|id| self.rejected.get(id))
            .map(|r| ClientError::Rejected {
                reason: r.reason(),
                message: r.message.clone(),
            })
    }

    /// The responses to `ids` received so far, in id order; an error for
    /// an id this client was never given.
    fn received(&self, ids: &[RequestId]) -> Result<Vec<CommandResponse>, ClientError> {
        if let Some(&id) = ids.iter().find(|id| !self.known.contains(id)) {
            return Err(ClientError::UnknownId(id));
        }
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        Ok(sorted
            .iter()
            .filter_map(|id| self.responses.get(id).cloned())
            .collect())
    }
}

fn count_distinct(ids: &[RequestId]) -> usize {
    ids.iter().collect::<HashSet<_>>().len()
}

struct Shared {
    state: Mutex<State>,
    arrived: Notify,
}

/// A connection to a cluster's front door.
pub struct Client {
    shared: Arc<Shared>,
    outbox: mpsc::Sender<Envelope>,
    correlation: AtomicU64,
    cluster: ClusterInfo,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    /// Connects to the front door at `endpoint` and shakes hands; see
    /// [`connect_to`](Self::connect_to) for a `tcp://` one.
    pub async fn connect(endpoint: &FrontDoorEndpoint) -> Result<Client, ClientError> {
        Self::connect_to(&Target::from(endpoint)).await
    }

    /// Connects to the front door of `target` and shakes hands. A `tcp://`
    /// front door is reached over TLS, trusting only the certificate of its
    /// connection file, and is shown the file's token; without a connection
    /// file in the target, the file is `$CASA_NODE_CONNECTION_FILE`, else
    /// the one `up` recorded with this endpoint.
    pub async fn connect_to(target: &Target) -> Result<Client, ClientError> {
        let endpoint = target.endpoint.to_string();
        let unreachable = |source| ClientError::Unreachable {
            endpoint: endpoint.clone(),
            source,
        };
        match &target.endpoint {
            FrontDoorEndpoint::Unix(path) => {
                let stream = UnixStream::connect(path).await.map_err(unreachable)?;
                let (read_half, write_half) = stream.into_split();
                Self::start(read_half, write_half, String::new()).await
            }
            FrontDoorEndpoint::Tcp(addr) => {
                let file = match &target.connection_file {
                    Some(file) => file.clone(),
                    None => find_connection_file(&target.endpoint)?,
                };
                let tls = |source| ClientError::Tls {
                    endpoint: endpoint.clone(),
                    source,
                };
                // The endpoint parsed, so it has a host and a port.
                let host = tcp_host(&target.endpoint).unwrap_or_default();
                let port = addr
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .unwrap_or_default();
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| tls(std::io::Error::other(e)))?;
                let connector = TlsConnector::from(file.client_config()?);
                let stream = TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(unreachable)?;
                let _ = stream.set_nodelay(true);
                let stream = connector.connect(name, stream).await.map_err(tls)?;
                let (read_half, write_half) = tokio::io::split(stream);
                Self::start(read_half, write_half, file.token().to_owned()).await
            }
        }
    }

    /// The handshake on a connected stream, then the reader and writer
    /// tasks.
    async fn start<R, W>(read_half: R, write_half: W, token: String) -> Result<Client, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let framing = Framing::default();
        let mut reader = FramedRead::new(read_half, codec(framing));
        let mut writer = FramedWrite::new(write_half, codec(framing));
        let hello = Envelope::correlated(
            1,
            Body::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                role: Role::Driver.into(),
                software: format!("casa-node {}", env!("CARGO_PKG_VERSION")),
                host: crate::hostname(),
                pid: std::process::id(),
                rank: 0,
                token,
                shared_memory: false,
            }),
        );
        let hello = framing
            .encode_body(&hello)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        writer
            .send(Bytes::from(hello))
            .await
            .map_err(|_| ClientError::Disconnected)?;
        let first = reader
            .next()
            .await
            .ok_or(ClientError::Disconnected)?
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let welcome = framing
            .decode_body(first.freeze())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let cluster = match welcome.body {
            Some(Body::Welcome(w)) => w.cluster.unwrap_or_default(),
            Some(Body::Error(e)) => return Err(ClientError::Refused(e.message)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected Welcome, got {}",
                    other.map_or("nothing", |b| b.name())
                )));
            }
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            arrived: Notify::new(),
        });
        let (outbox, mut queue) = mpsc::channel::<Envelope>(OUTBOX);
        tokio::spawn(async move {
            while let Some(envelope) = queue.recv().await {
                let Ok(bytes) = framing.encode_body(&envelope) else {
                    continue;
                };
                if writer.send(Bytes::from(bytes)).await.is_err() {
                    return;
                }
            }
            // Over TLS this says goodbye (close_notify) before the socket
            // closes.
            let _ = SinkExt::<Bytes>::close(&mut writer).await;
        });
        let reader = tokio::spawn(read_loop(reader, framing, shared.clone()));
        Ok(Client {
            shared,
            outbox,
            correlation: AtomicU64::new(2),
            cluster,
            reader,
        })
    }

    /// The cluster as it was when this client connected.
    pub fn cluster(&self) -> &ClusterInfo {
        &self.cluster
    }

    async fn request(&self, body: Body) -> Result<Body, ClientError> {
        let correlation = self.correlation.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.shared.state.lock().expect("client state");
            if state.closed {
                return Err(ClientError::Disconnected);
            }
            state.replies.insert(correlation, tx);
        }
        self.outbox
            .send(Envelope::correlated(correlation, body))
            .await
            .map_err(|_| ClientError::Disconnected)?;
        match rx.await.map_err(|_| ClientError::Disconnected)? {
            Body::Error(ProtocolError { message, .. }) => Err(ClientError::Refused(message)),
            body => Ok(body),
        }
    }

    /// Pushes a command and returns its ids at once, without waiting for
    /// the head node: they come from the connection's leases (rule 11),
    /// asked for when none is left. A refusal (rule 14) comes as each id's
    /// failure response, and [`wait`](Self::wait) returns it as
    /// [`ClientError::Rejected`].
    pub async fn submit(&self, submit: impl Into<Submit>) -> Result<Vec<RequestId>, ClientError> {
        let mut request = submit.into().request;
        let count = request.targets.len().max(1) as u64;
        loop {
            // Room in the outbox first: the send below is under the lock.
            let room = self
                .outbox
                .reserve()
                .await
                .map_err(|_| ClientError::Disconnected)?;
            {
                let mut state = self.shared.state.lock().expect("client state");
                if state.closed {
                    return Err(ClientError::Disconnected);
                }
                if state.no_leases {
                    break;
                }
                if let Some(ids) = state.take_ids(count) {
                    state.known.extend(ids.iter().copied());
                    request.ids.clone_from(&ids);
                    request.pipelined = true;
                    // Sent under the lock: one connection's ids go out in
                    // increasing order.
                    room.send(Envelope::new(Body::SubmitRequest(Box::new(request))));
                    return Ok(ids);
                }
            }
            // The lease request below needs room of its own.
            drop(room);
            let asked = u32::try_from(count).unwrap_or(u32::MAX).max(LEASE_BLOCK);
            match self
                .request(Body::IdLeaseRequest(IdLeaseRequest { count: asked }))
                .await
            {
                Ok(Body::IdLease(lease)) if lease.count > 0 => {
                    let mut state = self.shared.state.lock().expect("client state");
                    let end = lease.first + u64::from(lease.count);
                    state.leases.push_back([lease.first, end]);
                    state.leased += u64::from(lease.count);
                }
                Err(ClientError::Refused(_)) => {
                    self.shared.state.lock().expect("client state").no_leases = true;
                }
                Ok(other) => return Err(unexpected(other)),
                Err(e) => return Err(e),
            }
        }
        self.submit_confirmed(Submit { request }).await
    }

    /// Pushes a command and waits for the head node's answer: the ids of
    /// the accepted requests, or the rejection (rule 14).
    pub async fn submit_confirmed(
        &self,
        submit: impl Into<Submit>,
    ) -> Result<Vec<RequestId>, ClientError> {
        let body = Body::SubmitRequest(Box::new(submit.into().request));
        match self.request(body).await? {
            Body::SubmitReply(reply) => match reply.outcome {
                Some(submit_reply::Outcome::Accepted(accepted)) => {
                    let mut state = self.shared.state.lock().expect("client state");
                    state.known.extend(accepted.ids.iter().copied());
                    Ok(accepted.ids)
                }
                Some(submit_reply::Outcome::Rejected(rejected)) => Err(ClientError::Rejected {
                    reason: rejected.reason(),
                    message: rejected.message,
                }),
                None => Err(ClientError::Protocol("empty SubmitReply".into())),
            },
            other => Err(unexpected(other)),
        }
    }

    /// Waits for the responses to `ids` and returns them in id order
    /// (rule 16). A request whose server timed out comes back with status
    /// timeout (rule 17). If a submission among them was refused, returns
    /// its rejection (rule 14).
    pub async fn wait(&self, ids: &[RequestId]) -> Result<Vec<CommandResponse>, ClientError> {
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let state = self.shared.state.lock().expect("client state");
                let received = state.received(ids)?;
                if received.len() == count_distinct(ids) {
                    return match state.rejection(ids) {
                        Some(rejection) => Err(rejection),
                        None => Ok(received),
                    };
                }
                if state.closed {
                    return Err(ClientError::Disconnected);
                }
            }
            arrived.await;
        }
    }

    /// Completes when the connection has closed, as it does when the
    /// head node exits.
    pub async fn closed(&self) {
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.shared.state.lock().expect("client state").closed {
                return;
            }
            arrived.await;
        }
    }

    /// [`wait`](Self::wait) with a time limit.
    pub async fn wait_timeout(
        &self,
        ids: &[RequestId],
        limit: Duration,
    ) -> Result<Vec<CommandResponse>, ClientError> {
        tokio::time::timeout(limit, self.wait(ids))
            .await
            .map_err(|_| ClientError::TimedOut(limit))?
    }

    /// The responses to `ids` received so far, in id order, leaving out the
    /// pending ones (rule 17).
    pub fn poll(&self, ids: &[RequestId]) -> Result<Vec<CommandResponse>, ClientError> {
        self.shared
            .state
            .lock()
            .expect("client state")
            .received(ids)
    }

    /// Forgets the responses to `ids`, so a long-running driver does not
    /// keep every response it ever received.
    pub fn forget(&self, ids: &[RequestId]) {
        let mut state = self.shared.state.lock().expect("client state");
        for id in ids {
            state.responses.remove(id);
            state.rejected.remove(id);
        }
    }

    /// Claims the final responses of `ids`, whoever submitted them (rule
    /// 33): those answered arrive at once, the pending ones when answered,
    /// and [`wait`](Self::wait) returns them. The reply names the ids the
    /// head node does not know.
    pub async fn claim(&self, ids: &[RequestId]) -> Result<ClaimReply, ClientError> {
        // Known before the reply, which the answered ones' deliveries follow.
        self.shared
            .state
            .lock()
            .expect("client state")
            .known
            .extend(ids.iter().copied());
        match self
            .request(Body::ClaimRequest(ClaimRequest { ids: ids.to_vec() }))
            .await?
        {
            Body::ClaimReply(reply) => {
                let mut state = self.shared.state.lock().expect("client state");
                for id in &reply.unknown {
                    state.known.remove(id);
                }
                Ok(reply)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Where requests stand: queued, sent to which server, or done.
    pub async fn track(&self, ids: &[RequestId]) -> Result<TrackReply, ClientError> {
        match self
            .request(Body::TrackRequest(TrackRequest { ids: ids.to_vec() }))
            .await?
        {
            Body::TrackReply(reply) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    /// The server table (rule 23), for one server or all.
    pub async fn status(&self, server: Option<Rank>) -> Result<StatusReply, ClientError> {
        match self
            .request(Body::StatusRequest(StatusRequest { server }))
            .await?
        {
            Body::StatusReply(reply) => Ok(*reply),
            other => Err(unexpected(other)),
        }
    }

    /// Cancels requests (rule 24).
    pub async fn cancel(&self, ids: &[RequestId]) -> Result<CancelReply, ClientError> {
        match self
            .request(Body::CancelRequest(CancelRequest { ids: ids.to_vec() }))
            .await?
        {
            Body::CancelReply(reply) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    /// Stops services (rule 27); `force` interrupts running commands.
    pub async fn stop(&self, force: bool) -> Result<(), ClientError> {
        self.ack(Body::StopRequest(StopRequest { force })).await
    }

    /// Turns debugging mode on or off (rule 22).
    pub async fn set_debugging(&self, enabled: bool) -> Result<(), ClientError> {
        self.ack(Body::DebuggingModeRequest(DebuggingModeRequest { enabled }))
            .await
    }

    /// Changes the log level of the given servers, or of all (rule 31).
    pub async fn set_log_level(
        &self,
        level: LogLevel,
        servers: &[Rank],
    ) -> Result<(), ClientError> {
        self.ack(Body::LogLevelRequest(LogLevelRequest {
            level: level.into(),
            servers: servers.to_vec(),
        }))
        .await
    }

    /// Receives every log record of `min_level` and above from now on:
    /// the servers' and the head node's (rule 31). Records the receiver
    /// leaves unread past [`LOG_BUFFER`] are dropped, and a WARNING record
    /// says how many when there is room again.
    pub async fn subscribe_logs(
        &self,
        min_level: LogLevel,
    ) -> Result<mpsc::Receiver<LogRecord>, ClientError> {
        let (tx, rx) = mpsc::channel(LOG_BUFFER);
        {
            let mut state = self.shared.state.lock().expect("client state");
            state.logs = Some(tx);
            state.logs_dropped = 0;
        }
        self.ack(Body::LogSubscription(LogSubscription {
            enabled: true,
            min_level: min_level.into(),
        }))
        .await?;
        Ok(rx)
    }

    async fn ack(&self, body: Body) -> Result<(), ClientError> {
        match self.request(body).await? {
            Body::Ack(ack) if ack.ok => Ok(()),
            Body::Ack(ack) => Err(ClientError::Refused(ack.error)),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(body: Body) -> ClientError {
    ClientError::Protocol(format!("unexpected {}", body.name()))
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: FramedRead<R, LengthDelimitedCodec>,
    framing: Framing,
    shared: Arc<Shared>,
) {
    while let Some(Ok(frame)) = reader.next().await {
        let Ok(envelope) = framing.decode_body(frame.freeze()) else {
            continue;
        };
        let Some(body) = envelope.body else {
            continue;
        };
        let mut state = shared.state.lock().expect("client state");
        match body {
            Body::ResponseDelivery(delivery) => {
                if let Some(response) = delivery.response {
                    if let Some(rejected) = delivery.rejected {
                        state.rejected.insert(response.id, rejected);
                    }
                    state.responses.insert(response.id, response);
                    drop(state);
                    shared.arrived.notify_waiters();
                }
            }
            Body::LogRecord(record) => state.log(record),
            body => {
                if let Some(reply) = state.replies.remove(&envelope.correlation) {
                    let _ = reply.send(body);
                } else if let Body::Error(e) = body {
                    tracing::warn!("the head node reports: {}", e.message);
                }
            }
        }
    }
    let mut state = shared.state.lock().expect("client state");
    state.closed = true;
    state.replies.clear();
    state.logs = None;
    drop(state);
    shared.arrived.notify_waiters();
}

/// [`Client`] for programs without an async runtime: every call blocks.
pub struct BlockingClient {
    runtime: tokio::runtime::Runtime,
    inner: Client,
}

impl BlockingClient {
    /// Connects to the front door at `endpoint`; see [`Client::connect`].
    pub fn connect(endpoint: &FrontDoorEndpoint) -> Result<BlockingClient, ClientError> {
        Self::connect_to(&Target::from(endpoint))
    }

    /// Connects to the front door of `target`; see [`Client::connect_to`].
    pub fn connect_to(target: &Target) -> Result<BlockingClient, ClientError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|source| ClientError::Unreachable {
                endpoint: target.endpoint.to_string(),
                source,
            })?;
        let inner = runtime.block_on(Client::connect_to(target))?;
        Ok(BlockingClient { runtime, inner })
    }

    /// See [`Client::cluster`].
    pub fn cluster(&self) -> &ClusterInfo {
        self.inner.cluster()
    }

    /// See [`Client::submit`].
    pub fn submit(&self, submit: impl Into<Submit>) -> Result<Vec<RequestId>, ClientError> {
        self.runtime.block_on(self.inner.submit(submit))
    }

    /// See [`Client::submit_confirmed`].
    pub fn submit_confirmed(
        &self,
        submit: impl Into<Submit>,
    ) -> Result<Vec<RequestId>, ClientError> {
        self.runtime.block_on(self.inner.submit_confirmed(submit))
    }

    /// See [`Client::wait`].
    pub fn wait(&self, ids: &[RequestId]) -> Result<Vec<CommandResponse>, ClientError> {
        self.runtime.block_on(self.inner.wait(ids))
    }

    /// See [`Client::wait_timeout`].
    pub fn wait_timeout(
        &self,
        ids: &[RequestId],
        limit: Duration,
    ) -> Result<Vec<CommandResponse>, ClientError> {
        self.runtime.block_on(self.inner.wait_timeout(ids, limit))
    }

    /// See [`Client::poll`].
    pub fn poll(&self, ids: &[RequestId]) -> Result<Vec<CommandResponse>, ClientError> {
        self.inner.poll(ids)
    }

    /// See [`Client::claim`].
    pub fn claim(&self, ids: &[RequestId]) -> Result<ClaimReply, ClientError> {
        self.runtime.block_on(self.inner.claim(ids))
    }

    /// See [`Client::track`].
    pub fn track(&self, ids: &[RequestId]) -> Result<TrackReply, ClientError> {
        self.runtime.block_on(self.inner.track(ids))
    }

    /// See [`Client::status`].
    pub fn status(&self, server: Option<Rank>) -> Result<StatusReply, ClientError> {
        self.runtime.block_on(self.inner.status(server))
    }

    /// See [`Client::cancel`].
    pub fn cancel(&self, ids: &[RequestId]) -> Result<CancelReply, ClientError> {
        self.runtime.block_on(self.inner.cancel(ids))
    }

    /// See [`Client::stop`].
    pub fn stop(&self, force: bool) -> Result<(), ClientError> {
        self.runtime.block_on(self.inner.stop(force))
    }

    /// See [`Client::set_debugging`].
    pub fn set_debugging(&self, enabled: bool) -> Result<(), ClientError> {
        self.runtime.block_on(self.inner.set_debugging(enabled))
    }

    /// See [`Client::set_log_level`].
    pub fn set_log_level(&self, level: LogLevel, servers: &[Rank]) -> Result<(), ClientError> {
        self.runtime
            .block_on(self.inner.set_log_level(level, servers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> LogRecord {
        LogRecord {
            time: n as f64,
            level: LogLevel::Info.into(),
            origin: "h:server-1".into(),
            rank: 1,
            message: format!("record {n}"),
        }
    }

    /// A subscriber that stops reading holds at most LOG_BUFFER records;
    /// the rest are dropped, and once it reads again it is told how many
    /// before the next record.
    #[test]
    fn rule_31_a_slow_log_subscriber_holds_a_bounded_number_and_is_told_what_it_lost() {
        let (tx, mut rx) = mpsc::channel(LOG_BUFFER);
        let mut state = State {
            logs: Some(tx),
            ..State::default()
        };
        for n in 0..LOG_BUFFER + 10 {
            state.log(record(n));
        }
        let mut kept = Vec::new();
        while let Ok(r) = rx.try_recv() {
            kept.push(r.message);
        }
        assert_eq!(kept.len(), LOG_BUFFER);
        assert_eq!(kept.last().unwrap(), &format!("record {}", LOG_BUFFER - 1));
        state.log(record(99_999));
        let notice = rx.try_recv().expect("the notice");
        assert_eq!(notice.level(), LogLevel::Warning);
        assert_eq!(
            notice.message,
            "10 log records dropped: this subscriber read too slowly"
        );
        assert_eq!(rx.try_recv().expect("the record").message, "record 99999");
        assert!(rx.try_recv().is_err());
        // A receiver that is gone ends the subscription.
        drop(rx);
        state.log(record(1));
        assert!(state.logs.is_none());
    }
}
