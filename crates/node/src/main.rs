//! The `casa-node` command: parses flags and hands over to the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use casa_node::casa::{self, Casa};
use casa_node::client::{Submit, Target};
use casa_node::cluster::{self, Ready, UpOptions};
use casa_node::commands::{self, Outcome};
use casa_node::connection_file::ConnectionFile;
use casa_node::dashboard::DashboardAddr;
use casa_node::endpoint::FrontDoorEndpoint;
use casa_node::front_door::FrontDoorError;
use casa_node::literal;
use casa_node::log::{self, Rotation};
use casa_node::packages::{self, Unpacked};
use casa_node::server_node::{self, ServerNodeConfig};
use casa_node_protocol::Rank;
use casa_node_protocol::pb::LogLevel;
use casa_node_transport_zmq::ZmqTransport;
use clap::{Parser, Subcommand, ValueEnum};

const EXAMPLES: &str = "\
Examples:
  casa-node up --servers 4                      start a local cluster (runs until Ctrl-C)
  casa-node submit --param a=1 --param b=2 'a+b'
  casa-node submit --target 1 --target 2 'import os; os.getpid()'
  casa-node submit --no-wait 'flagdata()' --param vis=\"'uid___A002.ms'\"
  casa-node status
  casa-node status --watch                      the table, redrawn every second until Ctrl-C
  casa-node stop
  casa-node up --endpoint tcp://HOST:7000 --connection-file cluster.json
                                                a front door for other machines (TLS + token)
  casa-node status --connection-file cluster.json   from another machine, with a copy of the file
  mpirun -n 5 casa-node --transport mpi run pipeline.py   (4 servers; build with --features mpi)
  casa-node run --casa --servers 4 --python /opt/casa/bin/python3 script.py
                                                a script written for casampi, unchanged";

/// Run Python commands in parallel on a cluster of server processes, the
/// way CASA's mpi4casa does.
#[derive(Parser)]
#[command(name = "casa-node", version, after_help = EXAMPLES)]
struct Cli {
    /// How nodes talk to each other (`up` and `run`; before or after the
    /// subcommand).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "CASA_NODE_TRANSPORT",
        default_value = "zmq"
    )]
    transport: TransportKind,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a head node and N local server nodes, and serve until
    /// SIGINT/SIGTERM or `casa-node stop`.
    Up(UpArgs),
    /// Push a command; print each response record as one JSON line.
    Submit(SubmitArgs),
    /// Print the response records of requests, whoever submitted them, as
    /// JSON lines: a driver that lost its connection, or a head node
    /// restarted from its journal.
    Get(GetArgs),
    /// Print the server table.
    Status(StatusArgs),
    /// Stop services: servers finish their commands (or, forced, are
    /// interrupted) and exit.
    Stop(StopArgs),
    /// Attach one server node to a running head node.
    Server(ServerArgs),
    /// Start a cluster as `up` does, run a Python script against it (with
    /// `casanode` importable), stop services when it ends, and exit with
    /// its status.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    up: UpArgs,
    /// The script to run under the cluster's Python.
    script: PathBuf,
    /// Arguments for the script.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum TransportKind {
    /// ZeroMQ: one machine, or machines that reach each other.
    Zmq,
    /// MPI, under mpirun.
    Mpi,
}

#[derive(Clone, Copy, ValueEnum)]
enum Level {
    Debug,
    Info,
    Warning,
    Error,
    Critical,
}

impl From<Level> for LogLevel {
    fn from(level: Level) -> LogLevel {
        match level {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warning => LogLevel::Warning,
            Level::Error => LogLevel::Error,
            Level::Critical => LogLevel::Critical,
        }
    }
}

#[derive(clap::Args)]
struct UpArgs {
    /// Server nodes to start (with MPI the job's size decides: every rank
    /// but rank 0 serves).
    #[arg(long, env = "CASA_NODE_SERVERS", default_value_t = 2)]
    servers: usize,
    /// Where drivers connect: unix://PATH (default: a socket in a private
    /// runtime directory; this user's processes only), or tcp://HOST:PORT
    /// for drivers on other machines, which needs --connection-file.
    #[arg(long, env = "CASA_NODE_ENDPOINT")]
    endpoint: Option<String>,
    /// The connection file of a tcp:// front door: its TLS certificate and
    /// key and the token drivers must present. Created (mode 0600) with a
    /// fresh self-signed certificate if missing; drivers on other machines
    /// need a copy. Without --endpoint, an existing file's endpoint is used.
    #[arg(long, env = "CASA_NODE_CONNECTION_FILE", value_name = "FILE")]
    connection_file: Option<PathBuf>,
    /// Where more server nodes can connect with `casa-node server
    /// --connect`: ipc://PATH, or tcp://HOST:PORT to take servers from
    /// other machines, whose links are signed with the key of the
    /// connection file, so --connection-file is needed (default: a socket
    /// in the private runtime directory).
    #[arg(long, env = "CASA_NODE_NODES")]
    nodes: Option<String>,
    /// The Python interpreter of the workers, e.g. a CASA installation's.
    #[arg(long, env = "CASA_NODE_PYTHON", default_value = "python3")]
    python: PathBuf,
    /// A script each worker runs at start, e.g. `from casatasks import *`.
    #[arg(long, env = "CASA_NODE_INIT")]
    init: Option<PathBuf>,
    /// Run CASA's own parallel tasks unmodified: casa-node's casampi comes
    /// first on the path of the driver (`run`) and of every worker, workers
    /// start with casampi's namespace (`casalog`, `from casatasks import *`)
    /// before --init, and all write one CASA log file.
    #[arg(long)]
    casa: bool,
    /// Seconds between pings of every server.
    #[arg(long, env = "CASA_NODE_HEARTBEAT", default_value_t = 1.0, value_parser = positive_seconds)]
    heartbeat: f64,
    /// Seconds without an answer before a server is marked timed out.
    #[arg(long, env = "CASA_NODE_TIMEOUT", default_value_t = 5.0, value_parser = positive_seconds)]
    timeout: f64,
    /// Default deadline of a command, in seconds (none unless set).
    #[arg(long, env = "CASA_NODE_COMMAND_TIMEOUT", value_parser = positive_seconds)]
    command_timeout: Option<f64>,
    /// Journal what the head node accepts and answers in this file, and
    /// start from it: a head node started again with the same journal
    /// (after a crash, a SIGKILL, a reboot) runs again the requests it had
    /// accepted and not answered, keeps the responses it gave, and gives
    /// ids on from where it got to (rule 33).
    #[arg(long, env = "CASA_NODE_JOURNAL")]
    journal: Option<PathBuf>,
    /// Commands in flight per server: the one it runs and those sent ahead
    /// to wait there while every server is busy, so that it starts the
    /// next without waiting for the head node. 1 sends each server one
    /// command at a time. A command sent ahead and not started is taken
    /// back for a server that falls idle (rule 12).
    #[arg(long, env = "CASA_NODE_PREFETCH", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    prefetch: u16,
    /// The unified log file.
    #[arg(long, env = "CASA_NODE_LOG_FILE", default_value = "casa-node.log")]
    log_file: PathBuf,
    /// The most bytes the log file takes before it is renamed FILE.1 (an
    /// older FILE.1 becoming FILE.2, and so on) and a fresh one started; K,
    /// M and G mean KiB, MiB and GiB; 0 lets the file grow without bound.
    #[arg(long, env = "CASA_NODE_LOG_MAX_SIZE", default_value = "100M", value_name = "SIZE",
          value_parser = log::parse_size)]
    log_max_size: u64,
    /// Old log files kept (FILE.1 to FILE.N); older ones are removed.
    #[arg(long, env = "CASA_NODE_LOG_KEEP", default_value_t = Rotation::DEFAULT_KEEP, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    log_keep: u32,
    /// Lowest level logged.
    #[arg(long, value_enum, env = "CASA_NODE_LOG_LEVEL", default_value = "info")]
    log_level: Level,
    /// Echo the log on standard error too.
    #[arg(long)]
    log_terminal: bool,
    /// Seconds an interrupted command (cancel, deadline, forced stop) may
    /// take before its worker is killed, and a server process may take to
    /// exit once services ended before it is killed.
    #[arg(long, env = "CASA_NODE_KILL_GRACE", default_value_t = 5.0, value_parser = positive_seconds)]
    kill_grace: f64,
    /// Seconds every server may take to start before `up` gives up.
    #[arg(long, env = "CASA_NODE_START_TIMEOUT", default_value_t = 120.0, value_parser = positive_seconds)]
    start_timeout: f64,
    /// The dashboard (a live web page and /metrics for Prometheus):
    /// HOST:PORT, a port on 127.0.0.1, or `off`. By default
    /// 127.0.0.1:8787, or the next free port. Its URL, with the token it
    /// asks for, is printed at start-up. An address other than loopback
    /// needs the TLS of a tcp:// front door's connection file.
    #[arg(
        long,
        env = "CASA_NODE_DASHBOARD",
        default_value = "default",
        value_name = "ADDR",
        hide_default_value = true
    )]
    dashboard: DashboardAddr,
    /// With MPI: the longest pause, in microseconds, between two looks for
    /// messages while a rank is idle. Lower answers an idle rank sooner and
    /// costs more CPU (MPI gives no way to sleep until a message arrives).
    #[arg(long, env = "CASA_NODE_MPI_IDLE_SLEEP", default_value_t = 500, value_name = "MICROSECONDS",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    mpi_idle_sleep: u64,
    /// With MPI: how long, in microseconds, a rank probes back to back for
    /// messages after the last activity before it starts to yield its core.
    /// Shorter spinning or yielding saves CPU between paced commands; on an
    /// oversubscribed 2-core machine it slowed back-to-back pushes.
    #[arg(long, env = "CASA_NODE_MPI_IDLE_SPIN", default_value_t = 50, value_name = "MICROSECONDS",
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    mpi_idle_spin: u64,
    /// With MPI: how long, in microseconds, a rank goes on probing after
    /// spinning, yielding its core between probes, before it sleeps.
    #[arg(long, env = "CASA_NODE_MPI_IDLE_YIELD", default_value_t = 200, value_name = "MICROSECONDS",
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    mpi_idle_yield: u64,
}

#[derive(clap::Args)]
struct EndpointArg {
    /// The front door (default: $CASA_NODE_ENDPOINT, else the connection
    /// file's, else the cluster `casa-node up` started last).
    #[arg(long)]
    endpoint: Option<String>,
    /// The connection file of a tcp:// front door (default: the one `up`
    /// recorded with the endpoint).
    #[arg(long, env = "CASA_NODE_CONNECTION_FILE", value_name = "FILE")]
    connection_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct SubmitArgs {
    #[command(flatten)]
    endpoint: EndpointArg,
    /// A server rank to run on; repeat for several (default: the first
    /// available server).
    #[arg(long = "target", value_name = "RANK")]
    targets: Vec<Rank>,
    /// A parameter bound in the server's globals, as NAME=PYTHON_LITERAL.
    #[arg(long = "param", value_name = "NAME=LITERAL")]
    params: Vec<String>,
    /// Print the request ids and return at once.
    #[arg(long)]
    no_wait: bool,
    /// Interrupt the command if it runs longer than this many seconds.
    #[arg(long, value_parser = positive_seconds)]
    timeout: Option<f64>,
    /// Do not run the command again if the head node restarts from its
    /// journal before it is answered: it fails, naming the restart.
    #[arg(long)]
    no_retry: bool,
    /// Seconds to look for the head node again should it go away while
    /// the responses are awaited, when its cluster keeps a journal: a
    /// head node restarted from it answers them (0: give up at once).
    #[arg(long, env = "CASA_NODE_DRIVER_PATIENCE", default_value_t = 120.0,
          value_parser = non_negative_seconds)]
    patience: f64,
    /// The Python command: an expression, statements, or "push".
    command: String,
}

#[derive(clap::Args)]
struct GetArgs {
    #[command(flatten)]
    endpoint: EndpointArg,
    /// Wait for the requests still pending (otherwise each prints as
    /// pending).
    #[arg(long)]
    wait: bool,
    /// The request ids.
    #[arg(required = true, value_name = "ID")]
    ids: Vec<u64>,
}

#[derive(clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    endpoint: EndpointArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Only this server.
    #[arg(long, value_name = "RANK")]
    server: Option<Rank>,
    /// Show the table again every --interval until Ctrl-C: redrawn in
    /// place on a terminal, under a line with the time and the servers
    /// counted by state; otherwise one block per snapshot, a blank line
    /// after each, or with --json one object per line.
    #[arg(long)]
    watch: bool,
    /// Seconds between two snapshots of --watch (0.1 or more; 1 by
    /// default).
    #[arg(long, value_name = "SECONDS", value_parser = watch_interval)]
    interval: Option<f64>,
}

#[derive(clap::Args)]
struct StopArgs {
    #[command(flatten)]
    endpoint: EndpointArg,
    /// Interrupt running commands instead of letting them finish.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct ServerArgs {
    /// The head node's ZeroMQ endpoint (ipc://PATH or tcp://HOST:PORT).
    #[arg(long)]
    connect: String,
    /// The rank to ask for (default: the next free one).
    #[arg(long, default_value_t = 0)]
    rank: Rank,
    /// The Python interpreter of the worker.
    #[arg(long, env = "CASA_NODE_PYTHON", default_value = "python3")]
    python: PathBuf,
    /// A script the worker runs at start.
    #[arg(long, env = "CASA_NODE_INIT")]
    init: Option<PathBuf>,
    /// Run CASA's tasks: the worker imports casa-node's casampi and starts
    /// with casampi's namespace (`casalog`, `from casatasks import *`).
    #[arg(long)]
    casa: bool,
    /// Exit after this many seconds without a message from the head node
    /// (it pings every heartbeat). Until then a quiet link (a network
    /// partition, a head node stopped for a while) costs nothing: the
    /// worker goes on, and its answer is delivered when the link returns.
    #[arg(long, env = "CASA_NODE_PATIENCE", default_value_t = 600.0, value_parser = positive_seconds)]
    patience: f64,
    /// Seconds an interrupted command may take before its worker is killed.
    #[arg(long, env = "CASA_NODE_KILL_GRACE", default_value_t = 5.0, value_parser = positive_seconds)]
    kill_grace: f64,
    /// The cluster's connection file: its key signs a tcp:// link.
    #[arg(long, env = "CASA_NODE_CONNECTION_FILE")]
    connection_file: Option<PathBuf>,
    /// Exit when the head node's link closes rather than rejoin a head
    /// node started again at the same place (`up` starts its servers so).
    #[arg(long, hide = true)]
    exit_with_head: bool,
}

fn non_negative_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..1e9).contains(&v) => Ok(v),
        _ => Err(format!("{text:?} is not a number of seconds, 0 or more")),
    }
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(v),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}

fn watch_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.1..1e9).contains(&v) => Ok(v),
        _ => Err(format!("{text:?} is not a number of seconds, 0.1 or more")),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line, as scripts expect; the details are in --help.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            return fail(format!("{first} (see casa-node --help)"));
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if matches!(
        cli.command,
        Command::Up(_) | Command::Run(_) | Command::Server(_)
    ) {
        // Before any thread or MPI starts: see `tuning`.
        casa_node::tuning::restart_with_huge_pages();
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(commands::colour_wanted(std::io::stderr().is_terminal()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CASA_NODE_TRACE")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,zeromq=error")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(dispatch(cli.transport, cli.command))
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("casa-node: error: {message}");
    ExitCode::from(2)
}

fn exit(outcome: Outcome) -> ExitCode {
    match outcome {
        Outcome::Success => ExitCode::SUCCESS,
        Outcome::Failed => ExitCode::from(1),
    }
}

fn front_door(arg: &EndpointArg) -> Result<Target, ExitCode> {
    Target::resolve(arg.endpoint.as_deref(), arg.connection_file.as_deref()).map_err(fail)
}

async fn dispatch(transport: TransportKind, command: Command) -> ExitCode {
    match command {
        Command::Up(args) => up(transport, args).await,
        Command::Submit(args) => {
            // Said at once (no cluster found, a bad connection file), before
            // the command is parsed.
            if let Err(code) = front_door(&args.endpoint) {
                return code;
            }
            let mut submit = Submit::new(args.command).targets(args.targets);
            for param in &args.params {
                let Some((name, text)) = param.split_once('=') else {
                    return fail(format!("--param {param:?}: expected NAME=PYTHON_LITERAL"));
                };
                match literal::parse(text) {
                    Ok(value) => submit = submit.param(name.trim(), value),
                    Err(e) => return fail(format!("--param {name}: {e}")),
                }
            }
            if let Some(seconds) = args.timeout {
                submit = submit.deadline(Duration::from_secs_f64(seconds));
            }
            if args.no_retry {
                submit = submit.no_retry();
            }
            let find = || {
                Target::resolve(
                    args.endpoint.endpoint.as_deref(),
                    args.endpoint.connection_file.as_deref(),
                )
            };
            let patience = Duration::from_secs_f64(args.patience);
            match commands::submit(find, submit, args.no_wait, patience).await {
                Ok(outcome) => exit(outcome),
                Err(e) => fail(e),
            }
        }
        Command::Get(args) => match front_door(&args.endpoint) {
            Ok(endpoint) => commands::get(&endpoint, &args.ids, args.wait)
                .await
                .map_or_else(fail, exit),
            Err(code) => code,
        },
        Command::Status(args) if args.interval.is_some() && !args.watch => {
            fail("--interval is the time between the snapshots of --watch: give --watch too")
        }
        Command::Status(args) => match front_door(&args.endpoint) {
            Ok(endpoint) if args.watch => {
                let options = commands::WatchOptions {
                    server: args.server,
                    json: args.json,
                    interval: Duration::from_secs_f64(args.interval.unwrap_or(1.0)),
                };
                let signals = casa_node::signals::watch();
                commands::status_watch(&endpoint, options, signals)
                    .await
                    .map_or_else(fail, exit)
            }
            Ok(endpoint) => commands::status(&endpoint, args.server, args.json)
                .await
                .map_or_else(fail, exit),
            Err(code) => code,
        },
        Command::Stop(args) => match front_door(&args.endpoint) {
            Ok(endpoint) => commands::stop(&endpoint, args.force)
                .await
                .map_or_else(fail, exit),
            Err(code) => code,
        },
        Command::Server(args) => server(args).await,
        Command::Run(args) => run(transport, args).await,
    }
}

async fn run(transport: TransportKind, args: RunArgs) -> ExitCode {
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    let idle = MpiIdle::of(&args.up);
    let options = match up_options(transport, args.up).await {
        Ok(options) => options,
        Err(code) => return code,
    };
    let signals = casa_node::signals::watch();
    #[cfg(feature = "mpi")]
    if matches!(transport, TransportKind::Mpi) {
        let script = Some((args.script, args.args));
        return mpi(options, idle, script, signals, |_: &Ready<'_>| {}).await;
    }
    let how = cluster::Servers::<ZmqTransport>::Local;
    match casa_node::run::run(how, options, args.script, args.args, signals).await {
        Ok(status) => script_exit(status),
        Err(e) => fail(e),
    }
}

/// The exit code that passes a script's status on: its code, or 128 plus
/// the signal that ended it.
fn script_exit(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// `up` or `run` on one rank of an MPI job.
#[cfg(feature = "mpi")]
async fn mpi(
    options: UpOptions,
    idle: MpiIdle,
    script: Option<(PathBuf, Vec<String>)>,
    signals: tokio::sync::watch::Receiver<u32>,
    on_ready: impl FnOnce(&Ready<'_>),
) -> ExitCode {
    use casa_node::mpi::{self, Outcome};
    let transport =
        match tokio::task::spawn_blocking(move || mpi::init(idle.spin, idle.yield_for, idle.sleep))
            .await
        {
            Ok(Ok(transport)) => transport,
            Ok(Err(e)) => return fail(e),
            Err(e) => return fail(format!("starting MPI: {e}")),
        };
    match mpi::launch(transport, options, script, signals, on_ready).await {
        Ok(Outcome::Script(status)) => script_exit(status),
        Ok(Outcome::Head | Outcome::Server) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

async fn up_options(transport: TransportKind, args: UpArgs) -> Result<UpOptions, ExitCode> {
    if matches!(transport, TransportKind::Mpi) && !cfg!(feature = "mpi") {
        return Err(fail(
            "this casa-node was built without MPI support: build it with `cargo build --release --features mpi`",
        ));
    }
    let mut endpoint = match args.endpoint.as_deref().map(str::parse).transpose() {
        Ok(endpoint) => endpoint,
        Err(e) => return Err(fail(e)),
    };
    // A connection file only concerns a tcp:// front door.
    let mut connection_file = None;
    match (&endpoint, args.connection_file) {
        (Some(FrontDoorEndpoint::Tcp(_)), None) => {
            return Err(fail(FrontDoorError::TcpWithoutTls(
                endpoint.expect("matched"),
            )));
        }
        (Some(FrontDoorEndpoint::Tcp(_)), file) => connection_file = file,
        (None, Some(file)) if file.exists() => match ConnectionFile::read(&file) {
            Ok(read) => {
                endpoint = Some(read.endpoint());
                connection_file = Some(file);
            }
            Err(e) => return Err(fail(e)),
        },
        _ => {}
    }
    if args.servers == 0 {
        return Err(fail("--servers must be at least 1"));
    }
    if let Some(init) = &args.init {
        if let Err(e) = std::fs::File::open(init) {
            return Err(fail(format!("--init {}: {e}", init.display())));
        }
    }
    if args.casa {
        casa::check_python(&args.python).await.map_err(fail)?;
    }
    let casa = match args.casa.then(std::env::current_dir).transpose() {
        Ok(dir) => dir.map(|dir| Casa::starting_in(&dir, std::time::SystemTime::now())),
        Err(e) => return Err(fail(format!("the working directory: {e}"))),
    };
    Ok(UpOptions {
        dashboard: args.dashboard,
        servers: args.servers,
        endpoint,
        connection_file,
        nodes: args.nodes,
        python: args.python,
        init: args.init,
        heartbeat: Duration::from_secs_f64(args.heartbeat),
        timeout: Duration::from_secs_f64(args.timeout),
        command_timeout: args.command_timeout.map(Duration::from_secs_f64),
        prefetch: args.prefetch.into(),
        journal: args.journal,
        log_file: args.log_file,
        log_rotation: Rotation {
            max_size: args.log_max_size,
            keep: args.log_keep,
        },
        log_level: args.log_level.into(),
        log_terminal: args.log_terminal,
        start_timeout: Duration::from_secs_f64(args.start_timeout),
        kill_grace: Duration::from_secs_f64(args.kill_grace),
        casa,
    })
}

/// The `--mpi-idle-*` options: how an MPI rank waits for messages.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
struct MpiIdle {
    spin: Duration,
    yield_for: Duration,
    sleep: Duration,
}

impl MpiIdle {
    fn of(args: &UpArgs) -> MpiIdle {
        MpiIdle {
            spin: Duration::from_micros(args.mpi_idle_spin),
            yield_for: Duration::from_micros(args.mpi_idle_yield),
            sleep: Duration::from_micros(args.mpi_idle_sleep),
        }
    }
}

async fn up(transport: TransportKind, args: UpArgs) -> ExitCode {
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    let idle = MpiIdle::of(&args);
    let options = match up_options(transport, args).await {
        Ok(options) => options,
        Err(code) => return code,
    };
    let signals = casa_node::signals::watch();
    // With --casa, drivers started by hand need casa-node's casampi first
    // on their path: `up` unpacks it once ready (on rank 0 only, under MPI)
    // for its lifetime, and says where.
    let casa = options.casa.is_some();
    let mut python_path = None;
    let on_ready = |ready: &Ready<'_>| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "front door: {}", ready.front);
        if !ready.nodes.is_empty() {
            let _ = writeln!(out, "nodes: {}", ready.nodes);
        }
        if let Some(url) = ready.dashboard {
            let _ = writeln!(out, "dashboard: {url}");
        }
        if casa {
            match packages::for_driver(true) {
                Ok(unpacked) => {
                    let _ = writeln!(out, "python path: {}", unpacked.dir().display());
                    python_path = Some(unpacked);
                }
                Err(e) => eprintln!("casa-node: casampi for drivers: {e}"),
            }
        }
        let _ = out.flush();
    };
    #[cfg(feature = "mpi")]
    if matches!(transport, TransportKind::Mpi) {
        return mpi(options, idle, None, signals, on_ready).await;
    }
    match cluster::up(options, signals, on_ready).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

async fn server(args: ServerArgs) -> ExitCode {
    if args.casa {
        if let Err(e) = casa::check_python(&args.python).await {
            return fail(e);
        }
    }
    let casampi = match args
        .casa
        .then(|| Unpacked::new("casampi", &[packages::CASAMPI]))
        .transpose()
    {
        Ok(unpacked) => unpacked,
        Err(e) => return fail(e),
    };
    let key = if cluster::link_is_signed(&args.connect) {
        let Some(path) = &args.connection_file else {
            return fail(format!(
                "a link over {} crosses machines and is signed with the key of the cluster's connection file: give --connection-file FILE",
                args.connect
            ));
        };
        match ConnectionFile::read(path) {
            Ok(file) => Some(file),
            Err(e) => return fail(e),
        }
    } else {
        None
    };
    let config = cluster::link_config(&args.connect, key.as_ref());
    let transport = match ZmqTransport::connect_with(&args.connect, args.rank, config.clone()).await
    {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot join {}: {e}", args.connect)),
    };
    // A server attached by hand rejoins a head node started again (from
    // its journal) at the same place; one `up` started goes with its `up`.
    let rejoin = (!args.exit_with_head).then(|| {
        let (endpoint, rank) = (
            args.connect.clone(),
            casa_node_protocol::Transport::rank(&transport),
        );
        Box::new(move || {
            let (endpoint, config) = (endpoint.clone(), config.clone());
            Box::pin(async move { ZmqTransport::connect_with(&endpoint, rank, config).await })
                as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
        }) as server_node::Rejoin<ZmqTransport>
    });
    let config = ServerNodeConfig {
        python: args.python,
        init: args.init,
        casa: casampi.as_ref().map(|u| u.dir().to_owned()),
        kill_grace: Duration::from_secs_f64(args.kill_grace),
        patience: Some(Duration::from_secs_f64(args.patience)),
    };
    match server_node::run(transport, config, rejoin).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use clap::CommandFactory;

    use super::Cli;

    const BEGIN: &str = "<!-- environment: the table below is made from the CLI's definition; crates/node/src/main.rs checks it -->";
    const END: &str = "<!-- end of the environment table -->";

    /// The README's table of environment variables, as the CLI defines
    /// them: each variable, the option it sets, and the commands that
    /// take it, with the option's first line of help.
    fn table() -> String {
        let mut rows: BTreeMap<String, (String, Vec<String>, String)> = BTreeMap::new();
        let cli = Cli::command();
        let mut commands: Vec<(String, &clap::Command)> = vec![("casa-node".into(), &cli)];
        commands.extend(cli.get_subcommands().map(|c| (c.get_name().to_owned(), c)));
        for (name, command) in commands {
            for arg in command.get_arguments() {
                let Some(var) = arg.get_env() else {
                    continue;
                };
                let var = var.to_string_lossy().into_owned();
                let option = format!("--{}", arg.get_long().unwrap_or(arg.get_id().as_str()));
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                let first = first_sentence(&help);
                let row = rows
                    .entry(var)
                    .or_insert_with(|| (option, Vec::new(), first.replace('|', "\\|")));
                if arg.is_global_set() || name == "casa-node" {
                    row.1.push("all".into());
                } else {
                    row.1.push(format!("`{name}`"));
                }
            }
        }
        let mut text = String::from("| variable | option | of | what |\n|---|---|---|---|\n");
        for (var, (option, of, what)) in rows {
            text.push_str(&format!(
                "| `{var}` | `{option}` | {} | {what} |\n",
                of.join(", ")
            ));
        }
        text
    }

    /// The help's first sentence, without its full stop ("e.g." and
    /// "i.e." do not end one).
    fn first_sentence(help: &str) -> &str {
        let mut from = 0;
        while let Some(at) = help[from..].find(". ") {
            let end = from + at;
            if !(help[..end].ends_with("e.g") || help[..end].ends_with("i.e")) {
                return &help[..end];
            }
            from = end + 2;
        }
        help.trim_end_matches('.')
    }

    /// Issue 17: one variable per concept, listed in the README as the CLI
    /// defines it; and every `CASA_NODE_*` name the code reads or sets is
    /// in the README.
    #[test]
    fn the_readme_lists_every_environment_variable() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let start = readme
            .find(BEGIN)
            .expect("the README has the table's marker")
            + BEGIN.len();
        let end = readme[start..].find(END).expect("and its end marker") + start;
        let expected = table();
        assert_eq!(
            readme[start..end].trim(),
            expected.trim(),
            "README.md's environment table differs from the CLI; it should read:\n{expected}"
        );
        let mut sources = Vec::new();
        for dir in ["crates/node/src", "python/casanode"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "rs" || e == "py") {
                    sources.push(std::fs::read_to_string(path).unwrap());
                }
            }
        }
        for text in sources {
            for (at, _) in text.match_indices("\"CASA_NODE_") {
                let name: String = text[at + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                    .collect();
                if name.ends_with('_') {
                    // A prefix, not a variable.
                    continue;
                }
                assert!(
                    readme.contains(&format!("`{name}`")),
                    "{name} is read or set by casa-node but not in README.md"
                );
            }
        }
    }
}
