//! The dashboard: one web page served by the head node, updated live
//! over server-sent events, and `/metrics` for Prometheus, on one HTTP
//! listener (`--dashboard`, by default `127.0.0.1:8787` or the next free
//! port).
//!
//! Loopback is not private on a shared machine, so every request must
//! carry the dashboard's token: `?token=...` in the URL printed at
//! start-up (as Jupyter's), or `Authorization: Bearer ...` (what
//! Prometheus scrapers send). The token is the connection file's when the
//! cluster has one, else a random one. A dashboard on any address other
//! than loopback is served over TLS with the connection file's
//! certificate, and refuses to start without one.
//!
//! The head node's loop owns what the page shows ([`Board`]): the HTTP
//! tasks ask it for a snapshot, a command's record or the metrics over a
//! channel, and receive its live updates (one JSON text about every half
//! second while a page is open) over a broadcast channel.

mod board;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::Stream;
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_rustls::TlsAcceptor;

pub use board::{Board, DETAILS_KEPT, TASKS_KEPT, Traffic};

/// The port tried first when none is given.
pub const DEFAULT_PORT: u16 = 8787;
/// Ports tried after it, one after the other, when it is taken.
const PORTS_TRIED: u16 = 100;

/// Where the dashboard listens, as `--dashboard` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DashboardAddr {
    /// `--dashboard off`.
    Off,
    /// 127.0.0.1, port 8787 or the next free one.
    Default,
    /// This address and port (0: one the system chooses).
    At(SocketAddr),
}

impl std::str::FromStr for DashboardAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(DashboardAddr::Off),
            "" | "default" => Ok(DashboardAddr::Default),
            _ => {
                // A port alone means loopback.
                if let Ok(port) = s.parse::<u16>() {
                    return Ok(DashboardAddr::At(SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::LOCALHOST),
                        port,
                    )));
                }
                s.parse::<SocketAddr>().map(DashboardAddr::At).map_err(|_| {
                    format!("'{s}' is not an address: give HOST:PORT (e.g. 127.0.0.1:8787), a port, or off")
                })
            }
        }
    }
}

/// The dashboard could not start.
#[derive(Debug, Error)]
pub enum DashboardError {
    /// No port could be had.
    #[error("the dashboard could not listen on {addr}: {source}")]
    Bind {
        /// Where it tried.
        addr: String,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// Not on loopback, and no certificate to serve TLS with.
    #[error(
        "the dashboard on {0} is not on loopback, so it needs TLS: give the cluster a tcp:// front door with a connection file (--endpoint tcp://HOST:PORT --connection-file FILE), or keep the dashboard on 127.0.0.1"
    )]
    NeedsTls(SocketAddr),
    /// No random token could be made.
    #[error("the dashboard's token: {0}")]
    Token(String),
}

/// What the head node's loop answers for the HTTP side.
#[derive(Debug)]
pub enum Ask {
    /// Everything the page draws, as JSON.
    Snapshot(oneshot::Sender<String>),
    /// The record of request `id`, as JSON, if it is still kept.
    Record(u64, oneshot::Sender<Option<String>>),
    /// The metrics, in the OpenMetrics text format.
    Metrics(oneshot::Sender<String>),
}

/// A bound dashboard, not yet serving.
pub struct Dashboard {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    token: Arc<str>,
    url: String,
}

impl Dashboard {
    /// Binds the listener `addr` asks for (none when off). `front_door`
    /// is a `tcp://` front door's TLS acceptor and token (its connection
    /// file's), if there is one: the token is then the dashboard's too.
    pub async fn bind(
        addr: &DashboardAddr,
        front_door: Option<(TlsAcceptor, Arc<str>)>,
    ) -> Result<Option<Dashboard>, DashboardError> {
        if let DashboardAddr::At(at) = addr {
            if !at.ip().is_loopback() && front_door.is_none() {
                return Err(DashboardError::NeedsTls(*at));
            }
        }
        let listener = match addr {
            DashboardAddr::Off => return Ok(None),
            DashboardAddr::Default => bind_default().await?,
            DashboardAddr::At(at) => {
                TcpListener::bind(at)
                    .await
                    .map_err(|source| DashboardError::Bind {
                        addr: at.to_string(),
                        source,
                    })?
            }
        };
        let local = listener
            .local_addr()
            .map_err(|source| DashboardError::Bind {
                addr: format!("{addr:?}"),
                source,
            })?;
        let (acceptor, token) = front_door.unzip();
        let tls = if local.ip().is_loopback() {
            None
        } else {
            let Some(acceptor) = acceptor else {
                return Err(DashboardError::NeedsTls(local));
            };
            Some(acceptor)
        };
        let token: Arc<str> = match token {
            Some(token) => token,
            None => {
                let bytes = crate::connection_file::random().map_err(DashboardError::Token)?;
                Arc::from(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let host = match local.ip() {
            IpAddr::V6(ip) => format!("[{ip}]"),
            IpAddr::V4(ip) => ip.to_string(),
        };
        let url = format!("{scheme}://{host}:{}/?token={token}", local.port());
        Ok(Some(Dashboard {
            listener,
            tls,
            token,
            url,
        }))
    }

    /// The URL to open, with its token.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL without its token, for the log.
    pub fn place(&self) -> &str {
        self.url.split('?').next().unwrap_or(&self.url)
    }

    /// Serves until the task is aborted: answers from `ask`, live
    /// updates from `updates`.
    pub fn serve(
        self,
        ask: mpsc::Sender<Ask>,
        updates: broadcast::Sender<Arc<str>>,
    ) -> tokio::task::JoinHandle<()> {
        let state = AppState {
            token: self.token,
            ask,
            updates,
        };
        // Everything that shows the cluster needs the token; the page's
        // code and style do not.
        let guarded = Router::new()
            .route("/", get(page))
            .route("/events", get(events))
            .route("/api/record/{id}", get(record))
            .route("/metrics", get(metrics))
            .route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                require_token,
            ));
        let app = Router::new()
            .route("/app.js", get(script))
            .route("/style.css", get(style))
            .merge(guarded)
            .with_state(state);
        let listener = self.listener;
        match self.tls {
            None => tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }),
            Some(acceptor) => tokio::spawn(async move {
                let _ = axum::serve(TlsListener::start(listener, acceptor), app).await;
            }),
        }
    }
}

/// 127.0.0.1:8787, or the first free port after it, or, with all of
/// those taken, any free port.
async fn bind_default() -> Result<TcpListener, DashboardError> {
    let mut last = None;
    for port in DEFAULT_PORT..DEFAULT_PORT + PORTS_TRIED {
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(source) => {
                return Err(DashboardError::Bind {
                    addr: format!("127.0.0.1:{port}"),
                    source,
                });
            }
        }
    }
    // Every one taken (many clusters on one machine): any free port.
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|source| DashboardError::Bind {
            addr: format!(
                "127.0.0.1:{DEFAULT_PORT}-{} ({}) or any port",
                DEFAULT_PORT + PORTS_TRIED - 1,
                last.map_or_else(String::new, |e| e.to_string())
            ),
            source,
        })
}

/// TLS connections, each shaken hands with on a task of its own, so that
/// a slow or silent peer holds up no other.
struct TlsListener {
    ready: mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

/// How long a peer may take over its TLS handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

impl TlsListener {
    fn start(listener: TcpListener, acceptor: TlsAcceptor) -> TlsListener {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
        let (tx, ready) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let acceptor = acceptor.clone();
                let handed = tx.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(stream)).await
                    {
                        let _ = handed.send((tls, peer)).await;
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[derive(Clone)]
struct AppState {
    token: Arc<str>,
    ask: mpsc::Sender<Ask>,
    updates: broadcast::Sender<Arc<str>>,
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

impl AppState {
    /// Whether the request carries the token, in its query or as a bearer
    /// token.
    fn admits(&self, query: &TokenQuery, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let given = query.token.as_deref().or(bearer);
        given.is_some_and(|t| bool::from(t.as_bytes().ct_eq(self.token.as_bytes())))
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Ask) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.ask.send(make(tx)).await.ok()?;
        rx.await.ok()
    }
}

fn refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "casa-node dashboard: this needs the dashboard's token. Open the URL casa-node printed at start-up (it ends in ?token=...), or send the token as `Authorization: Bearer TOKEN`.\n",
    )
        .into_response()
}

fn gone() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "casa-node dashboard: the head node is stopping\n",
    )
        .into_response()
}

/// Headers every answer carries: nothing cached, nothing framed, no
/// referrer (the page's URL holds the token).
fn guarded(mut response: Response, content_type: &'static str) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:",
        ),
    );
    response
}

const PAGE: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

/// Lets a request through only with the token (see the module
/// documentation).
async fn require_token(
    State(state): State<AppState>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if state.admits(&query, &headers) {
        next.run(request).await
    } else {
        refused()
    }
}

async fn page() -> Response {
    guarded(PAGE.into_response(), "text/html; charset=utf-8")
}

/// The page's code and style carry no data of the cluster's: served to
/// anyone, as the binary they come from is.
async fn script() -> Response {
    guarded(SCRIPT.into_response(), "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    guarded(STYLE.into_response(), "text/css; charset=utf-8")
}

async fn record(State(state): State<AppState>, Path(id): Path<u64>) -> Response {
    match state.ask(|tx| Ask::Record(id, tx)).await {
        Some(Some(json)) => guarded(json.into_response(), "application/json"),
        Some(None) => (
            StatusCode::NOT_FOUND,
            format!(
                "the record of request {id} is not kept here: only the latest {DETAILS_KEPT} are\n"
            ),
        )
            .into_response(),
        None => gone(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    match state.ask(Ask::Metrics).await {
        Some(text) => guarded(
            text.into_response(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        None => gone(),
    }
}

async fn events(State(state): State<AppState>) -> Response {
    // Subscribed before the snapshot is taken: an update sent in between
    // repeats what the snapshot has, and the page skips it by number.
    let updates = state.updates.subscribe();
    let stream = live(state, updates);
    let response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    guarded(response, "text/event-stream")
}

/// A snapshot, then every update; a page that falls behind gets a fresh
/// snapshot instead of what it missed.
fn live(
    state: AppState,
    updates: broadcast::Receiver<Arc<str>>,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    futures::stream::unfold(
        (state, updates, true),
        |(state, mut updates, mut fresh)| async move {
            loop {
                if fresh {
                    let snapshot = state.ask(Ask::Snapshot).await?;
                    let event = Event::default().event("snapshot").data(snapshot);
                    return Some((Ok(event), (state, updates, false)));
                }
                match updates.recv().await {
                    Ok(text) => {
                        let event = Event::default().event("update").data(&*text);
                        return Some((Ok(event), (state, updates, false)));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => fresh = true,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    )
}
