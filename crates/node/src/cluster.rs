//! `casa-node up`: a head node in this process and N server nodes as
//! child processes, joined by the ZeroMQ transport over a private `ipc://`
//! socket, with the front door open for drivers.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use casa_node_protocol::pb::control_request::Start;
use casa_node_protocol::pb::{EnvironmentVariable, LogLevel, LogRecord};
use casa_node_protocol::{Framing, HeadConfig, Rank, Transport, TransportError, WallClock};
use casa_node_transport_zmq::{SigningKey, ZmqConfig, ZmqTransport};
use thiserror::Error;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};

use crate::casa::{self, Casa};
use crate::connection_file::{ConnectionFile, ConnectionFileError};
use crate::dashboard::{Board, Dashboard, DashboardAddr, DashboardError};
use crate::endpoint::{self, EndpointError, FrontDoorEndpoint};
use crate::front_door::{FrontDoor, FrontDoorError};
use crate::head_node::{self, HeadNodeConfig, HeadNodeError, SharedConfig};
use crate::journal::{Journal, JournalError};
use crate::log::{LogSink, Rotation};
use crate::shm;

/// Settings of `casa-node up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Local server nodes to start.
    pub servers: usize,
    /// The front door; `None` for a socket in the private runtime directory.
    pub endpoint: Option<FrontDoorEndpoint>,
    /// The connection file of a `tcp://` front door (created if missing):
    /// its certificate and key, and the token drivers present.
    pub connection_file: Option<PathBuf>,
    /// Where server nodes connect (`ipc://` or `tcp://`); `None` for a
    /// socket in the private runtime directory.
    pub nodes: Option<String>,
    /// The Python interpreter of the workers.
    pub python: PathBuf,
    /// A start-up script for each worker (rule 5).
    pub init: Option<PathBuf>,
    /// Time between pings (rule 19).
    pub heartbeat: Duration,
    /// Silence after which a server is timed out (rule 20).
    pub timeout: Duration,
    /// Deadline for commands that carry none (rule 24).
    pub command_timeout: Option<Duration>,
    /// Requests in flight per server (rule 12).
    pub prefetch: usize,
    /// The head node's journal (rule 33), if any.
    pub journal: Option<PathBuf>,
    /// The unified log file (rule 31).
    pub log_file: PathBuf,
    /// When the log file is started afresh, and how many old ones are kept.
    pub log_rotation: Rotation,
    /// Lowest level logged.
    pub log_level: LogLevel,
    /// Echo the log on standard error too.
    pub log_terminal: bool,
    /// How long the servers may take to start.
    pub start_timeout: Duration,
    /// How long an interrupted command may take before its worker is
    /// killed (rule 24), and a server process may take to exit once the
    /// head node has ended before it is killed.
    pub kill_grace: Duration,
    /// `--casa`: CASA's parallel tasks run unmodified (see [`crate::casa`]).
    pub casa: Option<Casa>,
    /// Where the dashboard listens, if anywhere.
    pub dashboard: DashboardAddr,
}

/// `up` could not start or run the cluster.
#[derive(Debug, Error)]
pub enum UpError {
    /// The runtime directory or endpoint is unusable.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The front door could not open.
    #[error(transparent)]
    FrontDoor(#[from] FrontDoorError),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The head node failed.
    #[error(transparent)]
    HeadNode(#[from] HeadNodeError),
    /// A file or process could not be created.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Node links over tcp:// without a key to sign them.
    #[error(
        "node links over {0} cross machines and are signed with the key of a connection file: give --connection-file FILE with a tcp:// front door (--endpoint tcp://HOST:PORT creates the file)"
    )]
    UnsignedLinks(String),
    /// The connection file is unusable.
    #[error(transparent)]
    ConnectionFile(#[from] ConnectionFileError),
    /// Not every server started in time.
    #[error("the servers did not all start within {0:?}; see the log for why")]
    StartTimeout(Duration),
    /// The journal cannot be used.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The dashboard could not start.
    #[error(transparent)]
    Dashboard(#[from] DashboardError),
}

/// What a cluster that has started tells whoever started it.
#[derive(Debug)]
pub struct Ready<'a> {
    /// Where drivers connect.
    pub front: &'a FrontDoorEndpoint,
    /// Where more server nodes can connect (empty when none can).
    pub nodes: &'a str,
    /// The dashboard's URL, with its token, when it is on.
    pub dashboard: Option<&'a str>,
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpError {
    let context = context.into();
    move |source| UpError::Io { context, source }
}

/// Runs a local cluster until stop services (from a driver, or the count
/// in `signals` rising: 1 stops gracefully, 2 at once). `on_ready` is
/// called with the front door and the endpoint more server nodes can
/// connect to, once every server has started.
pub async fn up(
    options: UpOptions,
    signals: watch::Receiver<u32>,
    on_ready: impl FnOnce(&Ready<'_>),
) -> Result<(), UpError> {
    start(Servers::<ZmqTransport>::Local, options, signals, on_ready).await
}

/// Where the servers of a cluster come from.
pub enum Servers<T> {
    /// `options.servers` local server processes, joined over ZeroMQ.
    Local,
    /// Servers a launcher started (mpirun), reached over this transport.
    Launched(T, Links),
}

/// Runs a cluster as [`up`] does, with servers from `how`.
pub async fn start<T: Transport + 'static>(
    how: Servers<T>,
    options: UpOptions,
    signals: watch::Receiver<u32>,
    on_ready: impl FnOnce(&Ready<'_>),
) -> Result<(), UpError> {
    endpoint::sweep_runs();
    let run_dir = endpoint::runtime_dir()?.join(std::process::id().to_string());
    endpoint::private_dir(&run_dir)?;
    let result = match how {
        Servers::Local => run(&options, &run_dir, signals, on_ready).await,
        Servers::Launched(transport, links) => {
            serve(
                transport, links, &options, &run_dir, signals, on_ready, false,
            )
            .await
        }
    };
    let _ = std::fs::remove_dir_all(&run_dir);
    result
}

async fn run(
    options: &UpOptions,
    run_dir: &std::path::Path,
    signals: watch::Receiver<u32>,
    on_ready: impl FnOnce(&Ready<'_>),
) -> Result<(), UpError> {
    let nodes = options
        .nodes
        .clone()
        .unwrap_or_else(|| format!("ipc://{}", run_dir.join("nodes.sock").display()));
    let config = link_config(&nodes, link_key(options)?.as_ref());
    let transport = ZmqTransport::bind_with(&nodes, config).await?;
    // With tcp://HOST:0 the port is chosen now.
    let nodes = transport.endpoint().to_owned();
    let links = Links {
        transport: "zmq",
        description: format!("transport zmq at {nodes}"),
        nodes,
        servers: options.servers,
    };
    serve(transport, links, options, run_dir, signals, on_ready, true).await
}

/// How the head node reaches its servers, for [`serve`].
#[derive(Debug, Clone)]
pub struct Links {
    /// The transport's name, as drivers see it in ClusterInfo.
    pub transport: &'static str,
    /// What the start-up line says of it (rule 29), e.g. "transport zmq at
    /// ipc://...".
    pub description: String,
    /// Where more server nodes can connect, for `on_ready` (empty when
    /// none can).
    pub nodes: String,
    /// How many servers to wait for before the cluster is ready.
    pub servers: usize,
}

/// Runs the head node over `transport` until stop services: opens the
/// front door and the unified log, writes the start-up line, starts
/// `links.servers` server processes when `spawn` (not when a launcher
/// such as mpirun started them), and calls `on_ready` once every server
/// has started. A server process that ends while the cluster runs, other
/// than by STOP, is reaped and started again (see [`Spawned`]).
pub async fn serve<T: Transport + 'static>(
    transport: T,
    links: Links,
    options: &UpOptions,
    run_dir: &std::path::Path,
    signals: watch::Receiver<u32>,
    on_ready: impl FnOnce(&Ready<'_>),
    spawn: bool,
) -> Result<(), UpError> {
    let host = crate::hostname();
    // First: a journal in use by another head node, or unusable, ends
    // this one before it opens anything.
    let journal = options.journal.as_deref().map(Journal::open).transpose()?;
    let front = options
        .endpoint
        .clone()
        .unwrap_or_else(|| FrontDoorEndpoint::Unix(run_dir.join("front-door.sock")));
    let framing = Framing::default();
    let door = FrontDoor::bind(&front, options.connection_file.as_deref(), framing).await?;
    // With tcp://HOST:0, the port the system chose.
    let front = door.endpoint().clone();
    let connection_file = door.connection_file().map(ToOwned::to_owned);
    let dashboard = Dashboard::bind(&options.dashboard, door.tls()).await?;
    let log = LogSink::open(
        Some(&options.log_file),
        options.log_terminal,
        options.log_level,
        options.log_rotation,
    )
    .map_err(io_error(format!("log file {}", options.log_file.display())))?;
    let log = Arc::new(match &dashboard {
        Some(_) => log.keeping_recent(LOG_RECORDS_SHOWN),
        None => log,
    });
    log.write(&LogRecord {
        time: WallClock::system().epoch(std::time::Instant::now()),
        level: LogLevel::Info.into(),
        origin: format!("{host}:head"),
        rank: transport.rank(),
        message: format!(
            "casa-node {} head node with rank 0 at {host} (PID {}), {}, front door at {front}{}, {} servers",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            links.description,
            connection_file.as_ref().map_or(String::new(), |file| format!(
                " (TLS, connection file {})",
                file.display()
            )),
            links.servers
        ),
    });
    if let Some(dashboard) = &dashboard {
        log.write(&LogRecord {
            time: WallClock::system().epoch(std::time::Instant::now()),
            level: LogLevel::Info.into(),
            origin: format!("{host}:head"),
            rank: transport.rank(),
            message: format!(
                "Dashboard at {} (open the URL casa-node printed, with its token)",
                dashboard.place()
            ),
        });
    }
    let dashboard_url = dashboard.as_ref().map(|d| d.url().to_owned());
    let (board, serving_dashboard) = match dashboard {
        Some(dashboard) => {
            let board = Board::new(door.traffic());
            let (ask_tx, ask_rx) = tokio::sync::mpsc::channel(64);
            let task = dashboard.serve(ask_tx, board.updates());
            (Some((board, ask_rx)), Some(AbortOnDrop(task)))
        }
        None => (None, None),
    };
    // Removed, with everything in it, when the head node's loop ends.
    // With a journal, values travel inline, so that the journal holds them
    // (a file in shared memory would not outlive the head node).
    let shared_dir = (shm::enabled() && journal.is_none())
        .then(|| match shm::SharedDir::create() {
            Ok(dir) => Some(dir),
            Err(e) => {
                tracing::warn!("shared memory is off: {}: {e}", shm::BASE);
                None
            }
        })
        .flatten();
    let mut start = start_settings(options.log_level, options.casa.as_ref());
    if let Some(dir) = &shared_dir {
        start.environment.push(EnvironmentVariable {
            name: shm::SHM_DIR_VAR.into(),
            value: dir.path().display().to_string(),
        });
        start.environment.push(EnvironmentVariable {
            name: shm::SHM_TAG_VAR.into(),
            value: dir.tag().to_owned(),
        });
    }
    let shared = shared_dir.map(|dir| SharedConfig {
        dir,
        drivers: matches!(front, FrontDoorEndpoint::Unix(_)),
    });
    let (given_up_tx, given_up) = tokio::sync::mpsc::unbounded_channel();
    let mut children = Vec::new();
    if spawn {
        for rank in 1..=links.servers {
            children.push(Spawned::start(options, &links.nodes, rank)?);
        }
    }
    let config = HeadNodeConfig {
        core: HeadConfig {
            host,
            transport: links.transport.into(),
            heartbeat: options.heartbeat,
            timeout: options.timeout,
            default_deadline: options.command_timeout,
            start,
            expected_servers: links.servers,
            prefetch: options.prefetch,
            journal: journal.is_some(),
        },
        log: log.clone(),
        python: Some(options.python.clone()),
        max_frame: framing.max_frame(),
        shared,
        journal,
        given_up: Some(given_up),
        dashboard: board,
    };
    let (ready_tx, mut ready_rx) = oneshot::channel();
    let mut node = tokio::spawn(head_node::run(transport, config, door, ready_tx, signals));
    let start_by = tokio::time::Instant::now() + options.start_timeout;
    let mut on_ready = Some(on_ready);
    let outcome = loop {
        tokio::select! {
            ready = &mut ready_rx, if on_ready.is_some() => {
                let on_ready = on_ready.take().expect("once");
                if ready.is_ok() {
                    on_ready(&Ready {
                        front: &front,
                        nodes: &links.nodes,
                        dashboard: dashboard_url.as_deref(),
                    });
                    endpoint::record(&front, connection_file.as_deref())?;
                }
            }
            _ = tokio::time::sleep_until(start_by), if on_ready.is_some() => {
                node.abort();
                stop_children(&mut children, &log, options.kill_grace).await;
                return Err(UpError::StartTimeout(options.start_timeout));
            }
            finished = &mut node => break finished,
            (index, status) = next_exit(&mut children) => {
                let gone = children.swap_remove(index);
                if !node.is_finished() {
                    let rank = gone.rank;
                    match gone.ended(status, options, &links.nodes, &log) {
                        Some(again) => children.push(again),
                        None => {
                            let _ = given_up_tx.send(rank as Rank);
                        }
                    }
                }
            }
        }
    };
    endpoint::forget(&front);
    drop(serving_dashboard);
    stop_children(&mut children, &log, options.kill_grace).await;
    match outcome {
        Ok(result) => result.map_err(UpError::from),
        Err(e) => Err(UpError::Io {
            context: "the head node".into(),
            source: std::io::Error::other(e),
        }),
    }
}

/// Log records the dashboard keeps for a page that opens.
const LOG_RECORDS_SHOWN: usize = 5_000;

/// Aborts the task when dropped: the dashboard's listener goes with the
/// head node, on every way out.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What START carries to every server (rule 26): this working directory,
/// and under `--casa` the CASA log file the workers share.
fn start_settings(log_level: LogLevel, casa: Option<&Casa>) -> Start {
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let environment = casa
        .map(|casa| EnvironmentVariable {
            name: casa::LOG_FILE_VAR.into(),
            value: casa.log_file.display().to_string(),
        })
        .into_iter()
        .collect();
    Start {
        working_directory: cwd,
        environment,
        log_level: log_level.into(),
    }
}

/// Whether a node link crosses machines, and so must be signed: `tcp://`.
/// `ipc://` links stay in the private runtime directory, which only this
/// user can enter.
pub fn link_is_signed(nodes: &str) -> bool {
    nodes.starts_with("tcp://")
}

/// The transport's settings for a link to `nodes`: signed with `key`
/// (the connection file's `signing_key`) when the link is `tcp://`.
pub fn link_config(nodes: &str, key: Option<&ConnectionFile>) -> ZmqConfig {
    ZmqConfig {
        signing: key
            .filter(|_| link_is_signed(nodes))
            .map(|file| SigningKey::from_bytes(*file.signing_key())),
        ..ZmqConfig::default()
    }
}

/// The connection file whose key signs `tcp://` node links. A missing file
/// is made now, for the tcp front door it goes with, so that the links and
/// the front door share it; the front door then finds it there.
fn link_key(options: &UpOptions) -> Result<Option<ConnectionFile>, UpError> {
    let Some(nodes) = options.nodes.as_deref().filter(|n| link_is_signed(n)) else {
        return Ok(None);
    };
    let unsigned = || UpError::UnsignedLinks(nodes.to_owned());
    let path = options.connection_file.as_deref().ok_or_else(unsigned)?;
    let file = match &options.endpoint {
        Some(front @ FrontDoorEndpoint::Tcp(_)) => {
            let (file, created) = ConnectionFile::read_or_generate(path, front)?;
            if created {
                file.write_new(front)?
            } else {
                file
            }
        }
        _ => ConnectionFile::read(path)?,
    };
    Ok(Some(file))
}

fn spawn_server(options: &UpOptions, nodes: &str, rank: usize) -> Result<Child, UpError> {
    let exe = std::env::current_exe().map_err(io_error("finding the casa-node executable"))?;
    let mut command = Command::new(exe);
    command
        .arg("server")
        .arg("--connect")
        .arg(nodes)
        .arg("--rank")
        .arg(rank.to_string())
        .arg("--python")
        .arg(&options.python)
        .arg("--kill-grace")
        .arg(options.kill_grace.as_secs_f64().to_string())
        .arg("--exit-with-head");
    if let Some(init) = &options.init {
        command.arg("--init").arg(init);
    }
    if options.casa.is_some() {
        command.arg("--casa");
    }
    if let Some(file) = options
        .connection_file
        .as_ref()
        .filter(|_| link_is_signed(nodes))
    {
        command.arg("--connection-file").arg(file);
    }
    // Its own process group: a Ctrl-C in the terminal reaches `up`, which
    // stops the servers in order, rather than killing them mid-command.
    command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
        .spawn()
        .map_err(io_error(format!("starting server node {rank}")))
}

/// A server process that ends sooner than this after it started ends
/// quickly; after [`QUICK_ENDS`] quick ends in a row it is not started
/// again: it would only end again (a broken installation, a rank taken),
/// and it says why on casa-node's standard error.
const RESTART_AFTER: Duration = Duration::from_secs(10);

/// Quick ends in a row after which a server process is given up on.
const QUICK_ENDS: u32 = 3;

/// A server node process `up` or `run` started, watched while the cluster
/// runs: when it ends other than by STOP (killed, out of memory, or gone
/// after its patience ran out), it is reaped, logged, and started again
/// with its rank, where it joins as a new server (rule 20).
struct Spawned {
    rank: usize,
    child: Child,
    /// Its process id (the child forgets it once reaped).
    pid: Option<u32>,
    started: Instant,
    /// Its quick ends in a row before this start.
    quick_ends: u32,
}

impl Spawned {
    fn start(options: &UpOptions, nodes: &str, rank: usize) -> Result<Spawned, UpError> {
        let child = spawn_server(options, nodes, rank)?;
        Ok(Spawned {
            rank,
            pid: child.id(),
            child,
            started: Instant::now(),
            quick_ends: 0,
        })
    }

    /// The process ended with `status`, and was reaped: logs it, and
    /// returns it started again, unless it ended by STOP (status 0) or
    /// ended quickly [`QUICK_ENDS`] times in a row.
    fn ended(
        self,
        status: std::io::Result<std::process::ExitStatus>,
        options: &UpOptions,
        nodes: &str,
        log: &LogSink,
    ) -> Option<Spawned> {
        let rank = self.rank;
        let pid = self.pid.map_or_else(String::new, |p| format!(" (PID {p})"));
        let ran = self.started.elapsed();
        let how = match &status {
            Ok(status) if status.success() => return None,
            Ok(status) => crate::executor::describe_exit(*status),
            Err(e) => format!("could not be waited for: {e}"),
        };
        let said = format!(
            "Server node n# {rank}{pid} {how} after {:.1} s",
            ran.as_secs_f64()
        );
        let quick_ends = if ran < RESTART_AFTER {
            self.quick_ends + 1
        } else {
            0
        };
        if quick_ends >= QUICK_ENDS {
            log_line(
                log,
                LogLevel::Error,
                format!(
                    "{said}; not started again, since it ended within {} s of its start {QUICK_ENDS} times in a row (its errors are on the standard error of casa-node)",
                    RESTART_AFTER.as_secs()
                ),
            );
            return None;
        }
        match Spawned::start(options, nodes, rank) {
            Ok(mut again) => {
                again.quick_ends = quick_ends;
                log_line(log, LogLevel::Warning, format!("{said}; started again"));
                Some(again)
            }
            Err(e) => {
                log_line(
                    log,
                    LogLevel::Error,
                    format!("{said}; it could not be started again: {e}"),
                );
                None
            }
        }
    }
}

/// Writes a line of the head node's in the unified log.
fn log_line(log: &LogSink, level: LogLevel, message: String) {
    log.write(&LogRecord {
        time: WallClock::system().epoch(Instant::now()),
        level: level.into(),
        origin: format!("{}:head", crate::hostname()),
        rank: 0,
        message,
    });
}

/// The next server process to end, and how it ended; never, while none
/// runs.
async fn next_exit(children: &mut [Spawned]) -> (usize, std::io::Result<std::process::ExitStatus>) {
    if children.is_empty() {
        return std::future::pending().await;
    }
    let waits = children.iter_mut().map(|c| Box::pin(c.child.wait()));
    let (status, index, _) = futures::future::select_all(waits).await;
    (index, status)
}

/// Waits for the server processes to exit (they do after STOP, or when
/// they see the head node gone), killing any that take longer than
/// `grace` (the kill grace) and logging which. One stopped with SIGSTOP is
/// continued first, so that it sees its link closed and ends its worker
/// itself.
async fn stop_children(children: &mut [Spawned], log: &LogSink, grace: Duration) {
    let waits = children.iter_mut().map(|spawned| async move {
        let pid = spawned.pid.and_then(|p| i32::try_from(p).ok());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
        if tokio::time::timeout(grace, spawned.child.wait())
            .await
            .is_err()
        {
            let _ = spawned.child.start_kill();
            let _ = spawned.child.wait().await;
            log_line(
                log,
                LogLevel::Warning,
                format!(
                    "Server node n# {}{} did not exit within {} s of the end of services; killed with SIGKILL",
                    spawned.rank,
                    pid.map_or_else(String::new, |p| format!(" (PID {p})")),
                    grace.as_secs_f64()
                ),
            );
        }
    });
    futures::future::join_all(waits).await;
}
