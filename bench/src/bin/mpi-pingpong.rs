//! The floor under a `1+1` round trip over MPI: the bytes casa-node's MPI
//! transport moves for one `1+1` (the `CommandRequest` envelope from the
//! head node to server 1, the `CommandResponse` envelope back), exchanged
//! with rsmpi alone, on the main thread, back to back; or, as a step
//! between that floor and a whole cluster, the same envelopes through
//! casa-node's MPI transport alone.
//!
//! ```text
//! mpirun -n 2 mpi-pingpong [ROUND_TRIPS]                       # default 20000
//! mpirun -n 2 mpi-pingpong ROUND_TRIPS transport [PAUSE_US [IDLE_SLEEP_US]]
//! ```
//!
//! Both envelopes come from the real state machines: a `HeadCore` with
//! one server takes `1+1` targeted at server 1, in mode eval as the head
//! node's syntax check leaves it, and a `ServerCore` answers it with the
//! outcome a worker reports (mode eval, `ret` int 2, start and stop
//! times), [`WARM_IDS`] times, so that the ids have the size they have in a
//! benchmark run; the last pair is the one exchanged.
//!
//! Raw: each envelope is one MPI message of its protobuf bytes with tag 1,
//! as the transport sends it. Rank 0 sends the request (blocking send);
//! rank 1 takes it with a matched probe and a matched receive, as the
//! transport does, and sends the response, which rank 0 takes the same
//! way. Both check the bytes.
//!
//! Transport: rank 0 sends the request envelope with
//! `MpiTransport::send` and waits for the response with `recv`; rank 1
//! answers each request, as a server node's loop would without running
//! anything. The transport has the settings of `casa-node`'s default
//! (`MpiConfig::default()`: the same idle policy); `PAUSE_US` makes rank 0
//! sleep before each round trip, so that both progress threads back off
//! as they do between commands; `IDLE_SLEEP_US` caps the idle sleep as
//! `casa-node --mpi-idle-sleep` does.
//!
//! Rank 0 prints one line for `cluster-roundtrip` to read:
//!
//! ```text
//! raw-mpi bytes=REQ/RESP n=N median_us=.. p99_us=.. min_us=.. mean_us=..
//! transport-mpi bytes=REQ/RESP n=N median_us=.. p99_us=.. min_us=.. mean_us=..
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use casa_node_protocol::pb::control_request;
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::value::Kind;
use casa_node_protocol::pb::{CommandMode, ControlRequest, Envelope, SubmitRequest, Value};
use casa_node_protocol::{
    Action, DriverId, ExecOutcome, HeadConfig, HeadCore, ServerAction, ServerConfig, ServerCore,
    Transport, TransportEvent, WallClock,
};
use casa_node_transport_mpi::{IdlePolicy, MpiConfig, MpiTransport};
use mpi::traits::*;
use prost::Message;

/// Commands run through the cores before the pair that is exchanged: ids
/// in a benchmark run are in the thousands (two bytes as a varint).
const WARM_IDS: usize = 1_000;

/// The tag of envelopes in casa-node's MPI transport.
const TAG_DATA: i32 = 1;

/// The wall time of the cores' clocks, seconds since the Unix epoch
/// (2025-11-24).
const EPOCH: f64 = 1_764_000_000.123_456;

/// Round trips not counted, before the measured ones.
const WARMUP: usize = 1_000;

const USAGE: &str =
    "usage: mpirun -n 2 mpi-pingpong [ROUND_TRIPS [transport [PAUSE_US [IDLE_SLEEP_US]]]]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |index: usize, default: u64| match args.get(index).map(|a| a.parse::<u64>()) {
        None => Some(default),
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => None,
    };
    let (Some(rounds), Some(pause), Some(idle_sleep)) =
        (number(0, 20_000), number(2, 0), number(3, 500))
    else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rounds = rounds.max(1) as usize;
    let (request, response) = one_plus_one();
    match args.get(1).map(String::as_str) {
        None => raw(rounds, &request, &response),
        Some("transport") => {
            // As casa-node's --mpi-idle-sleep sets it.
            let defaults = MpiConfig::default();
            let max_sleep = Duration::from_micros(idle_sleep.max(1));
            let config = MpiConfig {
                idle: IdlePolicy {
                    max_sleep,
                    first_sleep: defaults.idle.first_sleep.min(max_sleep),
                    ..defaults.idle
                },
                ..defaults
            };
            through_transport(
                config,
                rounds,
                Duration::from_micros(pause),
                &request,
                &response,
            )
        }
        Some(_) => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// The round trips with rsmpi alone.
fn raw(rounds: usize, request: &Envelope, response: &Envelope) -> ExitCode {
    let (request, response) = (request.encode_to_vec(), response.encode_to_vec());
    let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        eprintln!("mpi-pingpong: MPI was already initialised");
        return ExitCode::FAILURE;
    };
    let world = universe.world();
    let rank = world.rank();
    if world.size() != 2 {
        eprintln!(
            "mpi-pingpong: run with 2 ranks (mpirun -n 2), not {}",
            world.size()
        );
        return ExitCode::FAILURE;
    }
    let peer = world.process_at_rank(1 - rank);
    let (mine, theirs) = if rank == 0 {
        (&request, &response)
    } else {
        (&response, &request)
    };
    let mut times = Vec::with_capacity(rounds);
    for i in 0..WARMUP + rounds {
        let start = Instant::now();
        if rank == 0 {
            peer.send_with_tag(&mine[..], TAG_DATA);
        }
        let (message, status) = peer.matched_probe_with_tag(TAG_DATA);
        let mut received = vec![0u8; status.count(u8::equivalent_datatype()) as usize];
        message.matched_receive_into(&mut received[..]);
        if rank == 1 {
            peer.send_with_tag(&mine[..], TAG_DATA);
        } else if i >= WARMUP {
            times.push(start.elapsed());
        }
        if received != *theirs {
            failed(rank, &format!("other bytes received in round trip {i}"));
        }
    }
    if rank == 0 {
        report("raw-mpi", &mut times, request.len(), response.len());
    }
    ExitCode::SUCCESS
}

/// The round trips through `MpiTransport`.
fn through_transport(
    config: MpiConfig,
    rounds: usize,
    pause: Duration,
    request: &Envelope,
    response: &Envelope,
) -> ExitCode {
    let mut transport = match MpiTransport::init_with(config) {
        Ok(transport) => transport,
        Err(e) => {
            eprintln!("mpi-pingpong: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rank = transport.rank();
    if transport.info().world_size != 2 {
        failed(rank, "run with 2 ranks (mpirun -n 2)");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut times = Vec::with_capacity(rounds);
    runtime.block_on(async {
        for i in 0..WARMUP + rounds {
            if rank == 0 {
                if !pause.is_zero() {
                    // Pacing; nothing waits on this sleep.
                    tokio::time::sleep(pause).await;
                }
                let start = Instant::now();
                if let Err(e) = transport.send(1, request.clone()).await {
                    failed(rank, &format!("send: {e}"));
                }
                let got = next(&mut transport, rank).await;
                if i >= WARMUP {
                    times.push(start.elapsed());
                }
                if got != *response {
                    failed(
                        rank,
                        &format!("another envelope in round trip {i}: {got:?}"),
                    );
                }
            } else {
                let got = next(&mut transport, rank).await;
                if got != *request {
                    failed(
                        rank,
                        &format!("another envelope in round trip {i}: {got:?}"),
                    );
                }
                if let Err(e) = transport.send(0, response.clone()).await {
                    failed(rank, &format!("send: {e}"));
                }
            }
        }
        if rank != 0 {
            // Rank 0's goodbye says when it is over.
            loop {
                match transport.recv().await {
                    Ok(TransportEvent::PeerLost(0)) => break,
                    Ok(_) => {}
                    Err(e) => failed(rank, &format!("waiting for the goodbye: {e}")),
                }
            }
        }
        if let Err(e) = transport.shutdown().await {
            failed(rank, &format!("shutdown: {e}"));
        }
    });
    if rank == 0 {
        report(
            "transport-mpi",
            &mut times,
            request.encoded_len(),
            response.encoded_len(),
        );
    }
    ExitCode::SUCCESS
}

/// The next envelope, or the end of this rank.
async fn next(transport: &mut MpiTransport, rank: i32) -> Envelope {
    match transport.recv().await {
        Ok(TransportEvent::Message { envelope, .. }) => envelope,
        other => failed(rank, &format!("expected an envelope, got {other:?}")),
    }
}

/// Ends this rank at once, without finalising MPI: mpirun then ends the
/// other rank, which may be waiting for this one.
fn failed(rank: i32, why: &str) -> ! {
    eprintln!("mpi-pingpong: rank {rank}: {why}");
    std::process::exit(1)
}

fn report(what: &str, times: &mut [Duration], request: usize, response: usize) {
    times.sort_unstable();
    let n = times.len();
    let at = |q: f64| micros(times[((n as f64 * q) as usize).min(n - 1)]);
    println!(
        "{what} bytes={request}/{response} n={n} median_us={:.2} p99_us={:.2} min_us={:.2} mean_us={:.2}",
        at(0.5),
        at(0.99),
        micros(times[0]),
        micros(times.iter().sum::<Duration>()) / n as f64,
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The `CommandRequest` and `CommandResponse` envelopes of one `1+1` on
/// server 1, as casa-node's head node and server nodes send them.
fn one_plus_one() -> (Envelope, Envelope) {
    // Both ranks must build the same bytes: a fixed wall time (the times
    // are doubles, 8 bytes whatever their value) and pid.
    let now = Instant::now();
    let clock = WallClock::new(now, EPOCH);
    let mut head = HeadCore::new(
        HeadConfig {
            transport: "mpi".into(),
            ..HeadConfig::default()
        },
        clock,
    );
    let mut server = ServerCore::new(
        ServerConfig {
            rank: 1,
            host: "localhost".into(),
            pid: 4242,
            kill_grace: Duration::from_secs(5),
            patience: None,
        },
        clock,
        now,
    );
    head.add_server(1, now).expect("rank 1 is valid");
    head.start(now);
    // START goes to the server, its answer back.
    let start = to_server(&mut head);
    assert!(
        matches!(
            start.body,
            Some(Body::ControlRequest(ControlRequest {
                action: Some(control_request::Action::Start(_))
            }))
        ),
        "START first, not {start:?}"
    );
    server.handle(0, start, now).expect("START taken");
    // The node starts the worker (its pid), which is then ready.
    server.configured(Some(std::process::id()), now);
    server.worker_ready(now);
    while let Some(action) = server.poll_action() {
        if let ServerAction::Send(envelope) = action {
            head.handle(1, envelope, now).expect("START answered");
        }
    }
    let mut pair = None;
    for _ in 0..WARM_IDS {
        let ids = head
            .submit(
                DriverId(1),
                SubmitRequest {
                    command: "1+1".into(),
                    // The head node's syntax check sets the mode of
                    // an AUTO command before the core sees it.
                    mode: CommandMode::Eval.into(),
                    targets: vec![1],
                    ..SubmitRequest::default()
                },
            )
            .expect("accepted");
        let request = to_server(&mut head);
        server
            .handle(0, request.clone(), now)
            .expect("the command taken");
        let command = loop {
            match server.poll_action().expect("the server runs the command") {
                ServerAction::Execute(command) => break command,
                ServerAction::Send(_) | ServerAction::Configure(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(ids, [command.id]);
        let begun = clock.epoch(now);
        server
            .finished(
                ExecOutcome {
                    id: command.id,
                    mode: CommandMode::Eval,
                    ret: Some(Value {
                        kind: Some(Kind::IntValue(2)),
                    }),
                    successful: true,
                    traceback: None,
                    start_time: begun,
                    stop_time: begun + 4.3e-5,
                    ..ExecOutcome::default()
                },
                now,
            )
            .expect("the command ran");
        let response = match server.poll_action() {
            Some(ServerAction::Send(envelope)) => envelope,
            other => panic!("expected the response, got {other:?}"),
        };
        head.handle(1, response.clone(), now)
            .expect("the response taken");
        let delivered = drain(&mut head)
            .into_iter()
            .any(|a| matches!(a, Action::Deliver { .. }));
        assert!(delivered, "the response is delivered");
        pair = Some((request, response));
    }
    pair.expect("at least one command")
}

/// The one envelope the head core sends next (to server 1), dropping its
/// events.
fn to_server(head: &mut HeadCore) -> Envelope {
    let mut sent = drain(head).into_iter().filter_map(|action| match action {
        Action::Send { to: 1, envelope } => Some(envelope),
        _ => None,
    });
    let envelope = sent.next().expect("an envelope for server 1");
    assert!(sent.next().is_none(), "one envelope at a time");
    envelope
}

fn drain(head: &mut HeadCore) -> Vec<Action> {
    let mut actions = Vec::new();
    head.drain_actions(&mut actions);
    actions
}
