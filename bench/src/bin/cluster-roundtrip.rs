//! A blocking `1+1` round trip through a real casa-node cluster over MPI,
//! against the floor measured in the same run: a raw rsmpi ping-pong of
//! the same bytes (`mpi-pingpong`). The same `1+1` over the ZeroMQ
//! transport is measured too, for context.
//!
//! ```text
//! cargo build --release -p casa-node --features mpi -p casa-node-bench
//! cargo run --release -p casa-node-bench --bin cluster-roundtrip [-- --quick]
//! ```
//!
//! Run it by hand, not under `mpirun`: it starts the MPI jobs itself. It
//! takes `casa-node` and `mpi-pingpong` from its own directory (the same
//! target directory and profile), or `casa-node` from `$CASA_NODE_BIN`.
//!
//! Each round runs, one after the other:
//!
//! 1. `mpirun -n 2 mpi-pingpong N`: the raw exchange;
//! 2. `mpirun -n 2 mpi-pingpong N transport`: the same envelopes through
//!    casa-node's MPI transport alone, a step between the floor and a
//!    cluster;
//! 3. `mpirun -n 2 casa-node --transport mpi up` in a fresh directory: a
//!    head node and one server; once it prints `front door:`, a
//!    [`BlockingClient`] submits `1+1` targeted at server 1 and waits for
//!    the response, for a warm-up and then N timed round trips, each
//!    checked (`ret` is 2, from server 1); then N status requests, which
//!    the head node answers alone (the front door's share);
//! 4. the same with `casa-node up --servers 1` over ZeroMQ.
//!
//! With `--mpi-idle-sleep US`, steps 2 and 3 are also run with that cap
//! on the progress threads' idle sleep; with `--pause US`, every timed
//! round trip but the raw ones comes after a sleep, so that idle nodes
//! back off as they do between real commands.
//!
//! Every cluster is stopped by PID (SIGTERM, then SIGKILL after a limit,
//! and SIGKILL for any process it started that is left), also when the
//! run fails or panics. The table gives each case's median per round, and
//! over the rounds the median of those medians and of the rounds' p99s;
//! the ratios of medians from the same round; and the CPU each thread of
//! the cluster and of this driver used during the timed `1+1`s. See
//! `bench/README.md` for figures.

use casa_node_bench::positive_number;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use casa_node::client::{BlockingClient, Submit};
use casa_node::endpoint::FrontDoorEndpoint;
use casa_node_conformance::process::{
    alive, collect, descendants, drain, lines, mpi_launcher, mpirun, processes,
};
use casa_node_protocol::pb::value::Kind;
use casa_node_protocol::pb::{CommandStatus, Value};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const USAGE: &str = "\
usage: cluster-roundtrip [--quick] [--rounds N] [--requests N] [--raw N] [--warmup N]
                         [--pause US] [--mpi-idle-sleep US]...

Times a blocking 1+1 through casa-node clusters over MPI and ZeroMQ
against a raw MPI ping-pong of the same bytes. Run it by hand, not under
mpirun; it needs casa-node built with --features mpi in its own directory.
  --quick            one small round (50 round trips), to check the harness
  --rounds N         rounds, each case once per round, interleaved (default 3)
  --requests N       timed 1+1 round trips per cluster and round (default 2000)
  --raw N            timed raw MPI round trips per round (default 20000)
  --warmup N         untimed 1+1 round trips before the timed ones (default 200)
  --pause US         sleep this long before each timed 1+1 (default 0: back to
                     back), so that idle nodes back off as between real commands
  --mpi-idle-sleep US  also time an MPI cluster started with
                     `--mpi-idle-sleep US`, and the transport alone with that
                     idle sleep (repeatable)";

/// How long a cluster may take to print its front door.
const START_LIMIT: Duration = Duration::from_secs(120);
/// How long one `1+1` may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);
/// How long a process tree has after SIGTERM before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(20);
/// How long an `mpi-pingpong` job may run.
const PINGPONG_LIMIT: Duration = Duration::from_secs(300);
/// The shortest timed part for which CPU use is reported: 30 of the
/// kernel's 10 ms ticks, so each thread's figure is good to about 0.03
/// cores.
const CPU_MIN_WALL: Duration = Duration::from_millis(300);
/// Linux reports CPU times in USER_HZ, 100 a second.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone)]
struct Settings {
    rounds: usize,
    requests: usize,
    raw: usize,
    warmup: usize,
    pause: Duration,
    idle_sleeps: Vec<u64>,
}

fn parse_args() -> Result<Settings, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut settings = if args.iter().any(|a| a == "--quick") {
        Settings {
            rounds: 1,
            requests: 50,
            raw: 500,
            warmup: 10,
            pause: Duration::ZERO,
            idle_sleeps: Vec::new(),
        }
    } else {
        Settings {
            rounds: 3,
            requests: 2_000,
            raw: 20_000,
            warmup: 200,
            pause: Duration::ZERO,
            idle_sleeps: Vec::new(),
        }
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut number = |name: &str| positive_number(&mut args, name);
        match arg.as_str() {
            "--quick" => {}
            "--rounds" => settings.rounds = number("--rounds")?,
            "--requests" => settings.requests = number("--requests")?,
            "--raw" => settings.raw = number("--raw")?,
            "--warmup" => settings.warmup = number("--warmup")?,
            "--pause" => {
                settings.pause = Duration::from_micros(number("--pause")? as u64);
            }
            "--mpi-idle-sleep" => {
                settings
                    .idle_sleeps
                    .push(number("--mpi-idle-sleep")? as u64);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(settings)
}

fn main() -> ExitCode {
    let settings = match parse_args() {
        Ok(settings) => settings,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("cluster-roundtrip: {why}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("cluster-roundtrip: {why}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// The run.

/// One thing timed per round.
#[derive(Debug, Clone, PartialEq)]
enum Case {
    Raw,
    Transport { idle_sleep: Option<u64> },
    Mpi { idle_sleep: Option<u64> },
    Zmq,
}

impl Case {
    fn label(&self) -> String {
        match self {
            Case::Raw => "raw MPI ping-pong".into(),
            Case::Transport { idle_sleep: None } => "MPI transport alone".into(),
            Case::Transport {
                idle_sleep: Some(us),
            } => format!("MPI transport alone, idle sleep {us} us"),
            Case::Mpi { idle_sleep: None } => "1+1 over MPI".into(),
            Case::Mpi {
                idle_sleep: Some(us),
            } => format!("1+1 over MPI, idle sleep {us} us"),
            Case::Zmq => "1+1 over ZeroMQ".into(),
        }
    }
}

/// What one case measured in one round.
#[derive(Debug, Clone)]
struct Measured {
    median_us: f64,
    p99_us: f64,
    /// The median round trip of a status request through the front door
    /// (clusters).
    front_door_us: Option<f64>,
    /// Cores busy per role and thread during the timed part (clusters;
    /// `None` when that part was too short for the kernel's 10 ms ticks).
    cpu: Option<BTreeMap<(String, String), f64>>,
}

/// Where the binaries are.
struct Tools {
    casa_node: PathBuf,
    pingpong: PathBuf,
    /// The cargo profile the binaries were built with, for messages.
    release: bool,
}

fn run(settings: &Settings) -> Result<(), String> {
    let tools = tools()?;
    let mut cases = vec![Case::Raw, Case::Transport { idle_sleep: None }];
    cases.extend(settings.idle_sleeps.iter().map(|&us| Case::Transport {
        idle_sleep: Some(us),
    }));
    cases.push(Case::Mpi { idle_sleep: None });
    cases.extend(settings.idle_sleeps.iter().map(|&us| Case::Mpi {
        idle_sleep: Some(us),
    }));
    cases.push(Case::Zmq);
    eprintln!(
        "cluster-roundtrip: {} round(s); raw MPI {} round trips, clusters {} after {} of warm-up",
        settings.rounds, settings.raw, settings.requests, settings.warmup
    );
    let mut results: Vec<Vec<Measured>> = vec![Vec::new(); cases.len()];
    let mut bytes = String::new();
    for round in 1..=settings.rounds {
        for (case, out) in cases.iter().zip(results.iter_mut()) {
            let measured = match case {
                Case::Raw => {
                    let (measured, sizes) = pingpong(&tools, settings.raw, None)?;
                    bytes = sizes;
                    measured
                }
                Case::Transport { idle_sleep } => {
                    let how = (settings.pause, idle_sleep.unwrap_or(500));
                    pingpong(&tools, settings.requests, Some(how))?.0
                }
                Case::Mpi { idle_sleep } => cluster(&tools, settings, true, *idle_sleep)?,
                Case::Zmq => cluster(&tools, settings, false, None)?,
            };
            eprintln!(
                "round {round}: {:<38} median {:>8.1} us, p99 {:>8.1} us",
                case.label(),
                measured.median_us,
                measured.p99_us
            );
            out.push(measured);
        }
    }
    print_table(settings, &cases, &results, &bytes);
    Ok(())
}

fn print_table(settings: &Settings, cases: &[Case], results: &[Vec<Measured>], bytes: &str) {
    let rounds = settings.rounds;
    let heads = (1..=rounds)
        .map(|r| format!("{:>9}", format!("round {r}")))
        .collect::<Vec<_>>()
        .join(" ");
    let pacing = if settings.pause.is_zero() {
        "back to back".to_owned()
    } else {
        format!("each after a pause of {:?}", settings.pause)
    };
    println!(
        "raw: {} round trips of the {bytes}-byte request/response envelopes per round; \
         clusters: {} timed 1+1 per round after {} of warm-up, {pacing}; {rounds} round(s)",
        settings.raw, settings.requests, settings.warmup
    );
    println!();
    println!(
        "{:<38} {}  {:>9}  {:>9}",
        "median round trip, us", heads, "median", "p99"
    );
    for (case, runs) in cases.iter().zip(results) {
        let medians: Vec<f64> = runs.iter().map(|m| m.median_us).collect();
        let p99s: Vec<f64> = runs.iter().map(|m| m.p99_us).collect();
        println!(
            "{:<38} {}  {}  {}",
            case.label(),
            row(&medians),
            figure(median(&medians)),
            figure(median(&p99s))
        );
    }
    println!();
    println!(
        "{:<38} {}  {:>9}",
        "ratios of medians (same round)", heads, "median"
    );
    let find = |wanted: &Case| {
        cases
            .iter()
            .position(|c| c == wanted)
            .map(|i| &results[i])
            .expect("every case is measured")
    };
    let raw = find(&Case::Raw);
    let zmq = find(&Case::Zmq);
    let suffix = |idle_sleep: &Option<u64>| match idle_sleep {
        None => String::new(),
        Some(us) => format!(" (idle sleep {us} us)"),
    };
    let mut ratios: Vec<(String, &Vec<Measured>, &Vec<Measured>)> = Vec::new();
    // The three headline ratios first, then the steps in between.
    for case in cases {
        if let Case::Mpi { idle_sleep } = case {
            let name = format!("MPI 1+1{} / raw MPI", suffix(idle_sleep));
            ratios.push((name, find(case), raw));
        }
    }
    ratios.push(("ZeroMQ 1+1 / raw MPI".into(), zmq, raw));
    for case in cases {
        if let Case::Mpi { idle_sleep } = case {
            let name = format!("MPI 1+1{} / ZeroMQ 1+1", suffix(idle_sleep));
            ratios.push((name, find(case), zmq));
        }
    }
    for case in cases {
        if let Case::Transport { idle_sleep } = case {
            let name = format!("transport{} / raw MPI", suffix(idle_sleep));
            ratios.push((name, find(case), raw));
            let name = format!("MPI 1+1{} / transport", suffix(idle_sleep));
            let idle_sleep = *idle_sleep;
            ratios.push((name, find(&Case::Mpi { idle_sleep }), find(case)));
        }
    }
    for (name, over, under) in ratios {
        let per_round: Vec<f64> = over
            .iter()
            .zip(under)
            .map(|(a, b)| a.median_us / b.median_us)
            .collect();
        println!(
            "{:<38} {}  {}",
            name,
            row(&per_round),
            figure(median(&per_round))
        );
    }
    println!();
    println!(
        "{:<38} {}  {:>9}",
        "front door alone (status), us", heads, "median"
    );
    for (case, runs) in cases.iter().zip(results) {
        let fronts: Vec<f64> = runs.iter().filter_map(|m| m.front_door_us).collect();
        if !fronts.is_empty() {
            let name = case.label().replacen("1+1", "status", 1);
            println!("{name:<38} {}  {}", row(&fronts), figure(median(&fronts)));
        }
    }
    println!();
    println!("cores busy during the timed 1+1 round trips (median over rounds; threads >= 0.03):");
    for (case, runs) in cases.iter().zip(results) {
        if !matches!(case, Case::Mpi { .. } | Case::Zmq) {
            continue;
        }
        let Some(cpus) = runs
            .iter()
            .map(|m| m.cpu.as_ref())
            .collect::<Option<Vec<_>>>()
        else {
            println!("  {}: the timed part was too short to tell", case.label());
            continue;
        };
        let mut keys: Vec<&(String, String)> = cpus.iter().flat_map(|cpu| cpu.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut by_role: BTreeMap<&str, (f64, Vec<String>)> = BTreeMap::new();
        for key in keys {
            let value = median(
                &cpus
                    .iter()
                    .map(|cpu| cpu.get(key).copied().unwrap_or(0.0))
                    .collect::<Vec<_>>(),
            );
            let entry = by_role.entry(&key.0).or_default();
            entry.0 += value;
            if value >= 0.03 {
                entry.1.push(format!("{} {value:.2}", key.1));
            }
        }
        let total: f64 = by_role.values().map(|(v, _)| v).sum();
        println!("  {} (total {total:.2}):", case.label());
        for (role, (value, threads)) in by_role {
            println!("    {role:<12} {value:.2}  [{}]", threads.join(", "));
        }
    }
}

fn row(values: &[f64]) -> String {
    values
        .iter()
        .map(|&v| figure(v))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A figure, 9 wide: two decimals below 100, one above.
fn figure(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:>9.1}")
    } else {
        format!("{v:>9.2}")
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------
// Finding the binaries and the launcher.

fn tools() -> Result<Tools, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no directory", exe.display()))?
        .to_owned();
    let release = dir.file_name().is_some_and(|n| n == "release");
    let casa_node = std::env::var_os("CASA_NODE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("casa-node"));
    let build = if release {
        "cargo build --release -p casa-node --features mpi"
    } else {
        "cargo build -p casa-node --features mpi"
    };
    if !casa_node.is_file() {
        return Err(format!(
            "{} is missing: build it with `{build}` (or set CASA_NODE_BIN)",
            casa_node.display()
        ));
    }
    let pingpong = dir.join("mpi-pingpong");
    if !pingpong.is_file() {
        return Err(format!(
            "{} is missing: build it with `cargo build{} -p casa-node-bench`",
            pingpong.display(),
            if release { " --release" } else { "" }
        ));
    }
    // Without an MPI launcher, fail before the first case.
    mpi_launcher()?;
    Ok(Tools {
        casa_node,
        pingpong,
        release,
    })
}

// ---------------------------------------------------------------------------
// The raw ping-pong.

/// Runs `mpirun -n 2 mpi-pingpong N` (raw), or with `transport PAUSE_US
/// IDLE_SLEEP_US` (`through`: the pause and the idle sleep), and reads its
/// line; also returns the sizes (`REQ/RESP`).
fn pingpong(
    tools: &Tools,
    rounds: usize,
    through: Option<(Duration, u64)>,
) -> Result<(Measured, String), String> {
    let mut command = mpirun(2)?;
    command.arg(&tools.pingpong).arg(rounds.to_string());
    if let Some((pause, idle_sleep)) = through {
        command
            .arg("transport")
            .arg(pause.as_micros().to_string())
            .arg(idle_sleep.to_string());
    }
    let prefix = if through.is_some() {
        "transport-mpi "
    } else {
        "raw-mpi "
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut job = Tree::spawn("mpirun mpi-pingpong", command)?;
    let stdout = drain(job.child.stdout.take().expect("piped"));
    let stderr = drain(job.child.stderr.take().expect("piped"));
    let status = job.wait(PINGPONG_LIMIT);
    let stdout = collect(stdout);
    let stderr = collect(stderr);
    let status = status.ok_or_else(|| {
        format!("mpirun mpi-pingpong ran over {PINGPONG_LIMIT:?} and was killed\n{stdout}{stderr}")
    })?;
    if !status.success() {
        return Err(format!(
            "mpirun -n 2 mpi-pingpong failed ({status})\nstdout:\n{stdout}stderr:\n{stderr}"
        ));
    }
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .ok_or_else(|| format!("mpi-pingpong printed no {prefix}line:\n{stdout}{stderr}"))?;
    let field = |name: &str| -> Result<&str, String> {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .ok_or_else(|| format!("no {name} in {line:?}"))
    };
    let number = |name: &str| -> Result<f64, String> {
        field(name)?
            .parse()
            .map_err(|e| format!("{name} in {line:?}: {e}"))
    };
    Ok((
        Measured {
            median_us: number("median_us")?,
            p99_us: number("p99_us")?,
            front_door_us: None,
            cpu: None,
        },
        field("bytes")?.to_owned(),
    ))
}

// ---------------------------------------------------------------------------
// The clusters.

/// Starts a cluster of one server (over MPI or ZeroMQ), times `1+1`
/// through it, and stops it.
fn cluster(
    tools: &Tools,
    settings: &Settings,
    over_mpi: bool,
    idle_sleep: Option<u64>,
) -> Result<Measured, String> {
    let mut cluster = Cluster::start(tools, over_mpi, idle_sleep)?;
    match time_cluster(&cluster, settings) {
        Ok(measured) => {
            cluster.stop()?;
            Ok(measured)
        }
        Err(why) => Err(cluster.failure(&why)),
    }
}

/// The timed part of [`cluster`].
fn time_cluster(cluster: &Cluster, settings: &Settings) -> Result<Measured, String> {
    let client = BlockingClient::connect(&cluster.endpoint).map_err(|e| e.to_string())?;
    let two = Value {
        kind: Some(Kind::IntValue(2)),
    };
    let one = |i: usize| -> Result<Duration, String> {
        let began = Instant::now();
        let ids = client
            .submit(Submit::new("1+1").targets([1]))
            .map_err(|e| format!("submit: {e}"))?;
        let responses = client
            .wait_timeout(&ids, COMMAND_LIMIT)
            .map_err(|e| format!("1+1 number {i}: {e}"))?;
        let elapsed = began.elapsed();
        match responses.as_slice() {
            [r] if r.successful
                && r.ret.as_ref() == Some(&two)
                && r.server == 1
                && r.status() == CommandStatus::ResponseReceived =>
            {
                Ok(elapsed)
            }
            other => Err(format!("1+1 number {i}: unexpected responses {other:?}")),
        }
    };
    for i in 0..settings.warmup {
        one(i)?;
    }
    let before = cpu_snapshot(cluster.tree.pid());
    let mut times = Vec::with_capacity(settings.requests);
    let started = Instant::now();
    for i in 0..settings.requests {
        if !settings.pause.is_zero() {
            // Pacing: idle time between commands, not timed.
            std::thread::sleep(settings.pause);
        }
        times.push(one(settings.warmup + i)?);
    }
    let wall = started.elapsed();
    let after = cpu_snapshot(cluster.tree.pid());
    // The front door alone: a status request about server 1, which the
    // head node answers from its own table without asking the server.
    let mut front = Vec::with_capacity(settings.requests);
    for _ in 0..settings.requests {
        if !settings.pause.is_zero() {
            std::thread::sleep(settings.pause);
        }
        let began = Instant::now();
        let status = client.status(Some(1)).map_err(|e| format!("status: {e}"))?;
        front.push(began.elapsed());
        if status.servers.len() != 1 {
            return Err(format!("status of server 1: {status:?}"));
        }
    }
    let (median_us, p99_us) = median_p99(&mut times);
    Ok(Measured {
        median_us,
        p99_us,
        front_door_us: Some(median_p99(&mut front).0),
        cpu: (wall >= CPU_MIN_WALL).then(|| cpu_use(&before, &after, wall)),
    })
}

/// The median and the 99th percentile of some durations, in µs.
fn median_p99(times: &mut [Duration]) -> (f64, f64) {
    times.sort_unstable();
    let n = times.len();
    let at = |q: f64| micros(times[((n as f64 * q) as usize).min(n - 1)]);
    (at(0.5), at(0.99))
}

/// A running cluster, stopped (by PID) on drop.
struct Cluster {
    name: String,
    tree: Tree,
    dir: PathBuf,
    endpoint: FrontDoorEndpoint,
    /// What the cluster writes on stderr, once it has ended.
    stderr: Option<mpsc::Receiver<String>>,
}

static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Cluster {
    fn start(tools: &Tools, over_mpi: bool, idle_sleep: Option<u64>) -> Result<Cluster, String> {
        let dir = std::env::temp_dir().join(format!(
            "casa-node-bench-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let socket = dir.join("front.sock");
        let mut command = if over_mpi {
            let mut command = mpirun(2)?;
            command
                .arg(&tools.casa_node)
                .args(["--transport", "mpi", "up"]);
            command
        } else {
            let mut command = Command::new(&tools.casa_node);
            command.args(["up", "--servers", "1"]);
            command
        };
        if let Some(us) = idle_sleep {
            command.args(["--mpi-idle-sleep", &us.to_string()]);
        }
        command
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--log-file")
            .arg(dir.join("casa-node.log"))
            .env("XDG_RUNTIME_DIR", &dir)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let name = if over_mpi {
            "mpirun -n 2 casa-node --transport mpi up"
        } else {
            "casa-node up --servers 1"
        };
        let mut cluster = Cluster {
            name: name.to_owned(),
            tree: Tree::spawn(name, command)?,
            dir,
            endpoint: FrontDoorEndpoint::Unix(socket),
            stderr: None,
        };
        let stderr = drain(cluster.tree.child.stderr.take().expect("piped"));
        let lines = lines(cluster.tree.child.stdout.take().expect("piped"));
        let wanted = format!("front door: {}", cluster.endpoint);
        let deadline = Instant::now() + START_LIMIT;
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.trim() == wanted => break,
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{name} did not print {wanted:?} within {START_LIMIT:?}"
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // It ended (or closed stdout) before being ready.
                    let status = cluster.tree.wait(STOP_LIMIT);
                    let stderr = collect(stderr);
                    let mut why = format!(
                        "{name} ended before its front door was ready ({})\nstdout:\n{seen}stderr:\n{stderr}",
                        status.map_or("still running".to_owned(), |s| s.to_string())
                    );
                    if stderr.contains("without MPI support") {
                        let build = if tools.release {
                            "cargo build --release -p casa-node --features mpi"
                        } else {
                            "cargo build -p casa-node --features mpi"
                        };
                        why = format!(
                            "{} was built without MPI support: run `{build}`, then run this again\n{why}",
                            tools.casa_node.display()
                        );
                    }
                    return Err(why);
                }
            }
        }
        // Both pipes stay drained in the background, so that a chatty node
        // never blocks on a full pipe; stderr is kept for a failure.
        std::thread::spawn(move || for _ in lines {});
        cluster.stderr = Some(stderr);
        cluster.tree.remember_descendants();
        Ok(cluster)
    }

    /// Stops the cluster after `why` and tells what it said: its stderr and
    /// the end of its log.
    fn failure(&mut self, why: &str) -> String {
        self.tree.stop();
        let stderr = self.stderr.take().map(collect).unwrap_or_default();
        let log = std::fs::read_to_string(self.dir.join("casa-node.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!(
            "{}: {why}\nstderr:\n{stderr}\nthe log's last lines:\n{tail}",
            self.name
        )
    }

    fn stop(&mut self) -> Result<(), String> {
        match self.tree.stop() {
            Stopped::Gracefully => Ok(()),
            Stopped::Killed => Err(format!(
                "{} did not end within {STOP_LIMIT:?} of SIGTERM and was killed",
                self.name
            )),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The tree is stopped by its own drop; the directory goes after.
        self.tree.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Process trees, stopped by PID.

/// A process this program started, and the processes below it, stopped on
/// drop: SIGTERM to the root, SIGKILL after [`STOP_LIMIT`], then SIGKILL
/// to any process below it that is left (identified by PID and start time,
/// so that a reused PID is never hit).
struct Tree {
    name: String,
    child: Child,
    below: Vec<(Pid, u64)>,
    status: Option<ExitStatus>,
}

#[derive(Debug, PartialEq, Eq)]
enum Stopped {
    Gracefully,
    Killed,
}

impl Tree {
    fn spawn(name: &str, mut command: Command) -> Result<Tree, String> {
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Tree {
            name: name.to_owned(),
            child,
            below: Vec::new(),
            status: None,
        })
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Notes the processes now below the root, to be sure they end too.
    fn remember_descendants(&mut self) {
        for process in descendants(self.pid()) {
            if !self.below.contains(&process) {
                self.below.push(process);
            }
        }
    }

    /// Waits up to `limit` for the root to exit on its own; past that,
    /// stops the tree and returns `None`.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.wait_root(limit) {
            self.kill_leftovers();
            return Some(status);
        }
        self.stop();
        None
    }

    fn wait_root(&mut self, limit: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                return self.status;
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, SIGKILL after [`STOP_LIMIT`], then the leftovers.
    fn stop(&mut self) -> Stopped {
        let mut how = Stopped::Gracefully;
        if self.status.is_none() {
            self.remember_descendants();
            let _ = kill(self.pid(), Signal::SIGTERM);
            if self.wait_root(STOP_LIMIT).is_none() {
                eprintln!(
                    "cluster-roundtrip: {} outlived SIGTERM by {STOP_LIMIT:?}: SIGKILL",
                    self.name
                );
                let _ = self.child.kill();
                self.status = self.child.wait().ok();
                how = Stopped::Killed;
            }
        }
        if self.kill_leftovers() {
            how = Stopped::Killed;
        }
        how
    }

    /// Gives the processes that were below the root a few seconds to end,
    /// then SIGKILLs those left; true if any was.
    fn kill_leftovers(&mut self) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            self.below.retain(|&(pid, started)| alive(pid, started));
            if self.below.is_empty() {
                return false;
            }
            if Instant::now() >= end {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for &(pid, _) in &self.below {
            eprintln!(
                "cluster-roundtrip: process {pid} of {} was left: SIGKILL",
                self.name
            );
            let _ = kill(pid, Signal::SIGKILL);
        }
        self.below.clear();
        true
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// CPU use.

/// CPU ticks (user + system) of every thread of the cluster below `root`
/// and of this process (the driver), keyed by (pid, tid), with the role
/// and thread name.
type CpuSnapshot = BTreeMap<(i32, i32), (String, String, u64)>;

fn cpu_snapshot(root: Pid) -> CpuSnapshot {
    let all = processes();
    let mut tree = vec![root];
    tree.extend(descendants(root).into_iter().map(|(pid, _)| pid));
    let comm = |pid: Pid| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_default()
    };
    let role = |pid: Pid| -> String {
        let name = comm(pid);
        if name.starts_with("python") {
            // The server node's worker, or the head node's syntax
            // checker (which compiles each new command string once).
            let parent = all.iter().find(|p| p.0 == pid).map(|p| p.1.ppid);
            return match parent.map(is_server_node) {
                Some(true) => "worker".into(),
                _ => "checker".into(),
            };
        }
        if name == "casa-node" {
            return if is_server_node(pid) {
                "server node".into()
            } else {
                "head node".into()
            };
        }
        name
    };
    let mut snapshot = CpuSnapshot::new();
    let mut add = |pid: Pid, task_dir: PathBuf, role: String| {
        let Ok(tasks) = std::fs::read_dir(task_dir) else {
            return;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if let Some(ticks) = ticks(&stat) {
                snapshot.insert(
                    (pid.as_raw(), tid),
                    (role.clone(), name.trim().to_owned(), ticks),
                );
            }
        }
    };
    for pid in tree {
        add(pid, format!("/proc/{pid}/task").into(), role(pid));
    }
    let me = Pid::this();
    add(me, "/proc/self/task".into(), "driver".into());
    snapshot
}

/// True when `pid` is a server node: `casa-node server` (ZeroMQ), or a
/// rank other than 0 of an MPI job.
fn is_server_node(pid: Pid) -> bool {
    let read = |what: &str| std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
    let cmdline = read("cmdline");
    if cmdline.split(|&b| b == 0).any(|arg| arg == b"server") {
        return true;
    }
    let environ = read("environ");
    environ.split(|&b| b == 0).any(|var| {
        ["OMPI_COMM_WORLD_RANK=", "PMI_RANK=", "PMIX_RANK="]
            .iter()
            .any(|name| var.strip_prefix(name.as_bytes()).is_some_and(|r| r != b"0"))
    })
}

/// User plus system ticks from a /proc stat line (its 14th and 15th
/// fields).
fn ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Cores busy per (role, thread name) between two snapshots.
fn cpu_use(
    before: &CpuSnapshot,
    after: &CpuSnapshot,
    wall: Duration,
) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for (key, (role, thread, ticks)) in after {
        let start = before.get(key).map_or(0, |(_, _, t)| *t);
        let cores = ticks.saturating_sub(start) as f64 / TICKS_PER_SECOND / wall.as_secs_f64();
        *out.entry((role.clone(), thread.clone())).or_insert(0.0) += cores;
    }
    out
}
