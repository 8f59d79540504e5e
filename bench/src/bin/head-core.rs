//! Benchmark of `HeadCore` alone, with 10 000 simulated servers.
//!
//! Figures (see `bench/README.md`):
//!
//! 1. commands per second dispatched through the core, untargeted and
//!    targeted, every server kept busy with one command running and one
//!    waiting;
//! 2. the cost of one heartbeat round: `tick` sending 10 000 pings, and the
//!    handling of the 10 000 answers;
//! 3. baselines measured in the same run: pushing and popping envelopes
//!    through a `VecDeque<Envelope>`, and prost encode+decode of the
//!    `CommandRequest` envelope.
//!
//! Run with `cargo run --release -p casa-node-bench --bin head-core`;
//! `--quick` runs a tiny version in about a second.

use casa_node_bench::positive_number;
use std::collections::VecDeque;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use casa_node_protocol::pb::control_request;
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::value::Kind;
use casa_node_protocol::pb::{
    CommandMode, CommandRequest, CommandResponse, CommandStatus, ControlRequest, ControlResponse,
    Envelope, PingRequest, PingResponse, SubmitRequest, Value,
};
use casa_node_protocol::{Action, DriverId, HeadConfig, HeadCore, Rank, WallClock};
use prost::Message;

/// The single driver all submissions come from.
const DRIVER: DriverId = DriverId(1);

/// An arbitrary wall time for the cores' clocks (2023-11-14).
const EPOCH: f64 = 1.7e9;

/// How big a run is.
#[derive(Debug, Clone, Copy)]
struct Settings {
    /// Simulated servers.
    servers: usize,
    /// Commands completed per repetition of figure 1.
    requests: usize,
    /// Measured repetitions of figure 1 and of the prost baseline.
    reps: usize,
    /// Measured heartbeat rounds of figure 2 and of the queue baseline.
    rounds: usize,
    /// Runs only this figure (and the baselines).
    only: Option<Figure>,
}

/// A figure that can be run alone, for profiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Figure {
    Untargeted,
    Targeted,
    Heartbeat,
}

impl Settings {
    const FULL: Settings = Settings {
        servers: 10_000,
        requests: 400_000,
        reps: 9,
        rounds: 101,
        only: None,
    };

    const QUICK: Settings = Settings {
        servers: 10_000,
        requests: 20_000,
        reps: 3,
        rounds: 5,
        only: None,
    };
}

const USAGE: &str = "\
usage: head-core [--quick] [--reps N] [--rounds N] [--requests N] [--servers N]
                   [--only untargeted|targeted|heartbeat]

Benchmarks casa-node's HeadCore with simulated servers.
  --quick        a tiny run (about a second), to check that the harness works
  --reps N       measured repetitions of the dispatch figures (default 9)
  --rounds N     measured heartbeat rounds (default 101)
  --requests N   commands per dispatch repetition (default 400000)
  --servers N    simulated servers (default 10000)
  --only FIGURE  runs only that figure and the baselines, for profiling";

fn parse_args() -> Result<Settings, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut settings = if args.iter().any(|a| a == "--quick") {
        Settings::QUICK
    } else {
        Settings::FULL
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut number = |name: &str| positive_number(&mut args, name);
        match arg.as_str() {
            "--quick" => {}
            "--reps" => settings.reps = number("--reps")?,
            "--rounds" => settings.rounds = number("--rounds")?,
            "--requests" => settings.requests = number("--requests")?,
            "--servers" => settings.servers = number("--servers")?,
            "--only" => {
                settings.only = Some(match args.next().as_deref() {
                    Some("untargeted") => Figure::Untargeted,
                    Some("targeted") => Figure::Targeted,
                    Some("heartbeat") => Figure::Heartbeat,
                    other => return Err(format!("--only needs a figure, not {other:?}")),
                });
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(settings)
}

/// Median, min and max of some samples.
#[derive(Debug, Clone, Copy)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

impl Summary {
    fn of(samples: &[f64]) -> Summary {
        assert!(!samples.is_empty(), "no samples");
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Summary {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        }
    }
}

// ---------------------------------------------------------------------------
// The simulated cluster.

/// A head core whose `servers` servers (ranks 1..=servers) are all online.
fn online_core(servers: usize, now: Instant) -> HeadCore {
    let config = HeadConfig {
        heartbeat: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        ..HeadConfig::default()
    };
    let mut core = HeadCore::new(config, WallClock::new(now, EPOCH));
    for rank in 1..=servers {
        core.add_server(rank as Rank, now).expect("valid rank");
    }
    core.start(now);
    let mut starts = Vec::with_capacity(servers);
    while let Some(action) = core.poll_action() {
        if let Action::Send {
            to,
            envelope:
                Envelope {
                    correlation,
                    body:
                        Some(Body::ControlRequest(ControlRequest {
                            action: Some(control_request::Action::Start(_)),
                        })),
                    ..
                },
        } = action
        {
            starts.push((to, correlation));
        } else {
            panic!("unexpected action after start: {action:?}");
        }
    }
    assert_eq!(starts.len(), servers, "one START per server");
    for (rank, correlation) in starts {
        let reply = ControlResponse {
            ok: true,
            error: String::new(),
            rank,
            host: host_name(rank),
            pid: 10_000 + rank as u32,
            shared_memory: false,
            worker_pid: 0,
        };
        core.handle(
            rank,
            Envelope::correlated(correlation, Body::ControlResponse(reply)),
            now,
        )
        .expect("START answered");
    }
    let mut actions = Vec::new();
    core.drain_actions(&mut actions);
    assert!(
        matches!(
            actions.last(),
            Some(Action::Event(casa_node_protocol::Event::AllServersStarted))
        ),
        "all servers started"
    );
    let status = core.status(None).expect("status");
    assert!(
        status.servers.iter().all(|s| s.online),
        "every server online"
    );
    core
}

fn host_name(rank: Rank) -> String {
    format!("node{rank:05}")
}

/// What a server answers to a `1+1` command, but for the id.
fn response_template() -> CommandResponse {
    CommandResponse {
        id: 0,
        mode: CommandMode::Eval.into(),
        ret: Some(Value {
            kind: Some(Kind::IntValue(2)),
        }),
        status: CommandStatus::ResponseReceived.into(),
        successful: true,
        command_start_time: EPOCH,
        command_stop_time: EPOCH + 1e-4,
        ..CommandResponse::default()
    }
}

fn untargeted(_: usize) -> SubmitRequest {
    SubmitRequest {
        command: "1+1".into(),
        ..SubmitRequest::default()
    }
}

// ---------------------------------------------------------------------------
// Figure 1: commands per second.

/// The state of one dispatch run.
struct Dispatch {
    /// Commands sent to servers and not answered yet, oldest first.
    in_flight: VecDeque<(Rank, u64)>,
    completed: usize,
}

impl Dispatch {
    /// Carries out the core's actions: sends of commands are remembered to
    /// be answered, deliveries counted.
    fn drain(&mut self, core: &mut HeadCore) {
        while let Some(action) = core.poll_action() {
            match action {
                Action::Send {
                    to,
                    envelope:
                        Envelope {
                            body: Some(Body::CommandRequest(request)),
                            ..
                        },
                } => self.in_flight.push_back((to, request.id)),
                Action::Deliver { delivery, .. } => {
                    debug_assert!(delivery.response.as_ref().is_some_and(|r| r.successful));
                    self.completed += 1;
                }
                Action::Event(_) => {}
                other => panic!("unexpected action while dispatching: {other:?}"),
            }
        }
    }
}

/// Submits every request of `submissions`, keeping at most `window`
/// outstanding, and answers each command sent in the order sent. Returns
/// the seconds taken.
fn dispatch(
    core: &mut HeadCore,
    submissions: Vec<SubmitRequest>,
    window: usize,
    now: Instant,
) -> f64 {
    let total = submissions.len();
    let template = response_template();
    let mut run = Dispatch {
        in_flight: VecDeque::with_capacity(window),
        completed: 0,
    };
    let mut submissions = submissions.into_iter();
    let mut submitted = 0;
    let start = Instant::now();
    loop {
        while submitted - run.completed < window {
            let Some(request) = submissions.next() else {
                break;
            };
            core.submit(DRIVER, request).expect("accepted");
            submitted += 1;
            run.drain(core);
        }
        let Some((rank, id)) = run.in_flight.pop_front() else {
            break;
        };
        let mut response = template.clone();
        response.id = id;
        core.handle(
            rank,
            Envelope::new(Body::CommandResponse(Box::new(response))),
            now,
        )
        .expect("response taken");
        run.drain(core);
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(run.completed, total, "every command completed");
    assert_eq!(core.pending(), 0, "nothing left pending");
    elapsed
}

/// Commands per second over `settings.reps` repetitions, after one warm-up;
/// `make(i)` builds the i-th submission of a repetition.
fn commands_per_second(
    settings: Settings,
    make: impl Fn(usize) -> SubmitRequest,
) -> (Vec<f64>, Vec<f64>) {
    let now = Instant::now();
    let mut core = online_core(settings.servers, now);
    // Every server runs one command and has one waiting.
    let window = 2 * settings.servers;
    let mut rates = Vec::with_capacity(settings.reps);
    let mut nanos = Vec::with_capacity(settings.reps);
    for rep in 0..=settings.reps {
        let submissions: Vec<SubmitRequest> = (0..settings.requests).map(&make).collect();
        let seconds = dispatch(&mut core, submissions, window, now);
        if rep > 0 {
            rates.push(settings.requests as f64 / seconds);
            nanos.push(seconds * 1e9 / settings.requests as f64);
        }
    }
    (rates, nanos)
}

// ---------------------------------------------------------------------------
// Figure 2: heartbeat rounds.

/// Microseconds per `tick` + draining of the pings, and per handling of
/// the round's answers, for each of `settings.rounds` rounds after warm-up.
fn heartbeat_rounds(settings: Settings) -> (Vec<f64>, Vec<f64>) {
    const WARM_UP: usize = 5;
    let servers = settings.servers;
    let mut now = Instant::now();
    let mut core = online_core(servers, now);
    let heartbeat = Duration::from_secs(1);
    let mut tick_us = Vec::with_capacity(settings.rounds);
    let mut answer_us = Vec::with_capacity(settings.rounds);
    let mut pongs: Vec<(Rank, Envelope)> = Vec::with_capacity(servers);
    let mut sequence = 0;
    for round in 0..WARM_UP + settings.rounds {
        now += heartbeat;

        let start = Instant::now();
        core.tick(now);
        let mut pings = 0usize;
        while let Some(action) = core.poll_action() {
            match action {
                Action::Send {
                    envelope:
                        Envelope {
                            body: Some(Body::PingRequest(PingRequest { sequence: s })),
                            ..
                        },
                    ..
                } => {
                    pings += 1;
                    sequence = s;
                }
                other => panic!("unexpected action in a ping round: {other:?}"),
            }
        }
        let ticked = start.elapsed();
        assert_eq!(pings, servers, "one ping per server");

        // The answers, built outside the timed part.
        pongs.extend((1..=servers).map(|rank| {
            let rank = rank as Rank;
            let pong = PingResponse {
                sequence,
                busy: false,
                command_id: 0,
                command_start_time: 0.0,
                pid: 10_000 + rank as u32,
                worker_pid: 20_000 + rank as u32,
                host: host_name(rank),
                rss_bytes: 150 << 20,
                uptime_seconds: round as f64,
            };
            (rank, Envelope::new(Body::PingResponse(pong)))
        }));

        let start = Instant::now();
        for (rank, envelope) in pongs.drain(..) {
            core.handle(rank, envelope, now).expect("ping answer taken");
        }
        if let Some(action) = core.poll_action() {
            panic!("unexpected action after ping answers: {action:?}");
        }
        let answered = start.elapsed();

        if round >= WARM_UP {
            tick_us.push(ticked.as_secs_f64() * 1e6);
            answer_us.push(answered.as_secs_f64() * 1e6);
        }
    }
    let status = core.status(None).expect("status");
    assert!(
        status.servers.iter().all(|s| s.online && !s.timeout),
        "no server timed out"
    );
    (tick_us, answer_us)
}

// ---------------------------------------------------------------------------
// Figure 3: baselines.

/// Nanoseconds per envelope pushed to and popped from a `VecDeque`, in
/// batches of `servers` envelopes (one per server, as in a ping round).
fn queue_baseline(settings: Settings) -> Vec<f64> {
    const WARM_UP: usize = 5;
    let n = settings.servers;
    let mut queue: VecDeque<Envelope> = VecDeque::with_capacity(n);
    let mut samples = Vec::with_capacity(settings.rounds);
    for round in 0..WARM_UP + settings.rounds {
        let sequence = round as u64;
        let start = Instant::now();
        for _ in 0..n {
            queue.push_back(Envelope::new(Body::PingRequest(PingRequest { sequence })));
        }
        let mut popped = 0usize;
        while let Some(envelope) = queue.pop_front() {
            black_box(&envelope);
            popped += 1;
        }
        let elapsed = start.elapsed();
        assert_eq!(popped, n);
        if round >= WARM_UP {
            samples.push(elapsed.as_secs_f64() * 1e9 / n as f64);
        }
    }
    samples
}

/// Nanoseconds per prost encode + decode of the `CommandRequest` envelope
/// the core sends for `1+1`.
fn prost_baseline(settings: Settings) -> Vec<f64> {
    let n = settings.requests;
    let mut buffer = Vec::with_capacity(64);
    let mut samples = Vec::with_capacity(settings.reps);
    let command = String::from("1+1");
    for rep in 0..=settings.reps {
        let start = Instant::now();
        for id in 0..n as u64 {
            let envelope = Envelope::new(Body::CommandRequest(CommandRequest {
                id: id + 1,
                command: command.clone(),
                mode: CommandMode::Auto.into(),
                parameters: Vec::new(),
                deadline_seconds: None,
            }));
            buffer.clear();
            envelope.encode(&mut buffer).expect("buffer grows");
            let decoded = Envelope::decode(buffer.as_slice()).expect("decodes");
            black_box(decoded);
        }
        let elapsed = start.elapsed();
        if rep > 0 {
            samples.push(elapsed.as_secs_f64() * 1e9 / n as f64);
        }
    }
    samples
}

// ---------------------------------------------------------------------------
// The report.

/// One line of the table.
struct Row {
    name: String,
    unit: &'static str,
    summary: Summary,
    /// Median nanoseconds per unit of work, for the ratios.
    nanos: f64,
    /// Envelopes a unit of work moves, for the ratios.
    envelopes: f64,
}

fn format_value(value: f64) -> String {
    if value >= 100_000.0 {
        format!("{value:.0}")
    } else if value >= 100.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn print_table(rows: &[Row], queue_ns: f64, prost_ns: f64) {
    let header = [
        "figure", "median", "min", "max", "unit", "x queue", "x prost",
    ];
    let lines: Vec<[String; 7]> = rows
        .iter()
        .map(|row| {
            [
                row.name.clone(),
                format_value(row.summary.median),
                format_value(row.summary.min),
                format_value(row.summary.max),
                row.unit.to_string(),
                format!("{:.2}", row.nanos / (row.envelopes * queue_ns)),
                format!("{:.2}", row.nanos / (row.envelopes * prost_ns)),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.len());
        }
    }
    let print = |cells: &[String]| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i == 0 || i == 4 {
                out.push_str(&format!("{cell:<width$}  "));
            } else {
                out.push_str(&format!("{cell:>width$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    print(&header.map(String::from));
    println!(
        "{}",
        "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
    );
    for line in &lines {
        print(line);
    }
}

fn main() -> ExitCode {
    let settings = match parse_args() {
        Ok(settings) => settings,
        Err(message) => {
            if message.is_empty() {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            eprintln!("head-core: {message}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    let Settings {
        servers,
        requests,
        reps,
        rounds,
        only,
    } = settings;
    let runs = |figure: Figure| only.is_none_or(|o| o == figure);
    println!(
        "HeadCore benchmark: {servers} servers, {requests} commands x {reps} repetitions, \
         {rounds} heartbeat rounds{}",
        if cfg!(debug_assertions) {
            " (debug build: figures are not meaningful)"
        } else {
            ""
        }
    );
    println!(
        "sizes: Envelope {} bytes, Action {} bytes",
        std::mem::size_of::<Envelope>(),
        std::mem::size_of::<Action>()
    );

    let mut rows = Vec::new();
    let row = |name: String, unit, samples: &[f64], nanos: &[f64], envelopes: f64| {
        let row = Row {
            name,
            unit,
            summary: Summary::of(samples),
            nanos: Summary::of(nanos).median,
            envelopes,
        };
        println!(
            "{:<40} {:>10} {}",
            row.name,
            format_value(row.summary.median),
            row.unit
        );
        row
    };

    let queue = queue_baseline(settings);
    let queue_ns = Summary::of(&queue).median;
    rows.push(row(
        "baseline: VecDeque push+pop".into(),
        "ns/envelope",
        &queue,
        &queue,
        1.0,
    ));
    let prost = prost_baseline(settings);
    let prost_ns = Summary::of(&prost).median;
    rows.push(row(
        "baseline: prost encode+decode".into(),
        "ns/envelope",
        &prost,
        &prost,
        1.0,
    ));

    if runs(Figure::Untargeted) {
        let (rates, nanos) = commands_per_second(settings, untargeted);
        rows.push(row(
            "dispatch, untargeted".into(),
            "commands/s",
            &rates,
            &nanos,
            2.0,
        ));
    }
    if runs(Figure::Targeted) {
        let targeted = |i: usize| SubmitRequest {
            command: "1+1".into(),
            targets: vec![(i % servers) as Rank + 1],
            ..SubmitRequest::default()
        };
        let (rates, nanos) = commands_per_second(settings, targeted);
        rows.push(row(
            "dispatch, targeted round-robin".into(),
            "commands/s",
            &rates,
            &nanos,
            2.0,
        ));
    }
    if runs(Figure::Heartbeat) {
        let (tick_us, answer_us) = heartbeat_rounds(settings);
        let round_us: Vec<f64> = tick_us.iter().zip(&answer_us).map(|(a, b)| a + b).collect();
        let as_ns = |us: &[f64]| us.iter().map(|u| u * 1e3).collect::<Vec<f64>>();
        let per_round = servers as f64;
        rows.push(row(
            format!("heartbeat: tick + drain {servers} pings"),
            "us/round",
            &tick_us,
            &as_ns(&tick_us),
            per_round,
        ));
        rows.push(row(
            format!("heartbeat: handle {servers} answers"),
            "us/round",
            &answer_us,
            &as_ns(&answer_us),
            per_round,
        ));
        rows.push(row(
            "heartbeat: whole round".into(),
            "us/round",
            &round_us,
            &as_ns(&round_us),
            2.0 * per_round,
        ));
    }

    // The baselines last, under the figures.
    rows.rotate_left(2);
    println!();
    print_table(&rows, queue_ns, prost_ns);
    println!();
    println!(
        "x queue, x prost: the figure's median time over the baseline's for as many \
         envelopes (2 per command; 1 per server for tick or answers, 2 for a whole round)."
    );
    ExitCode::SUCCESS
}
