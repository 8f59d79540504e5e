//! Runs one of the shared transport checks (`casa_node_conformance::transport`)
//! over MPI, each rank playing its own side, or measures the transport.
//! Start it under `mpirun`:
//!
//! ```text
//! mpirun -n 2 mpi-conformance ordering 10000
//! mpirun -n 2 mpi-conformance many-in-flight 20000 DIR   # DIR holds FIFOs 0to1 and 1to0
//! mpirun -n 2 mpi-conformance large 268435456
//! mpirun -n 2 mpi-conformance large-both 268435456
//! mpirun -n 5 mpi-conformance many-peers 200
//! mpirun -n 2 mpi-conformance cancel-safe 5000
//! mpirun -n 3 mpi-conformance server-shutdown            # also server-drop
//! mpirun -n 2 mpi-conformance head-shutdown            # also head-drop
//! mpirun -n 2 mpi-conformance large-then-shutdown 67108864
//! mpirun -n 2 mpi-conformance closed-after-shutdown
//! mpirun -n 3 mpi-conformance stuck-peer 100663296 10000
//! mpirun -n 1 mpi-conformance world-too-small
//! mpirun -n 2 mpi-conformance latency 20000 [PAUSE_US]   # round trips through the transport
//! mpirun -n 2 mpi-conformance raw-latency 20000          # the same bytes with rsmpi alone
//! mpirun -n 4 mpi-conformance idle 5                     # CPU used by idle ranks
//! mpirun -n 2 mpi-conformance wait-forever               # hangs, for the harness's test
//! ```
//!
//! `WINDOW_MESSAGES` and `WINDOW_BYTES` override the defaults of
//! [`MpiConfig::window`] and [`MpiConfig::max_in_flight_bytes`];
//! `IDLE_SPIN_US`, `IDLE_YIELD_US`, `IDLE_FIRST_SLEEP_US` and
//! `IDLE_MAX_SLEEP_US` those of [`IdlePolicy`] (ranks on this machine
//! inherit mpirun's environment; Open MPI's `-x NAME` passes a variable to
//! other machines).
//!
//! Each rank prints `rank R: CHECK ok` and exits with 0, or prints
//! `rank R: CHECK FAILED: why` and exits with 1 at once (which makes
//! `mpirun` end the job). Logs go to stderr (`RUST_LOG`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use casa_node_conformance::transport::{
    self as checks, CheckResult, Failure, HEAVY_LIMIT, LOSS_LIMIT, next_message, ping, within,
};
use casa_node_protocol::pb::Envelope;
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::{Framing, Rank, Transport, TransportEvent};
use casa_node_transport_mpi::{IdlePolicy, MpiConfig, MpiError, MpiTransport};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(check) = args.first().cloned() else {
        eprintln!("usage: mpi-conformance CHECK [ARGS] (see the source's header)");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    match check.as_str() {
        "world-too-small" => return world_too_small(),
        "raw-latency" => return raw_latency(number(rest, 0, 20_000) as usize),
        _ => {}
    }
    let defaults = MpiConfig::default();
    let config = MpiConfig {
        idle: idle_policy(),
        window: env_number("WINDOW_MESSAGES").map_or(defaults.window, |n| n as u32),
        max_in_flight_bytes: env_number("WINDOW_BYTES")
            .map_or(defaults.max_in_flight_bytes, |n| n as u32),
        ..defaults
    };
    let mut transport = match MpiTransport::init_with(config) {
        Ok(transport) => transport,
        Err(error) => {
            println!("rank ?: {check} FAILED: {error}");
            return ExitCode::FAILURE;
        }
    };
    let rank = transport.rank();
    eprintln!("{}", transport.info());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(run(&mut transport, &check, rest));
    match result {
        Ok(()) => {
            println!("rank {rank}: {check} ok");
            // Dropping shuts down if the check did not, and finalises MPI.
            drop(transport);
            ExitCode::SUCCESS
        }
        Err(failure) => {
            println!("rank {rank}: {check} FAILED: {failure}");
            // Without finalising: mpirun then ends the other ranks, which
            // may be waiting for this one.
            std::process::exit(1);
        }
    }
}

/// The default idle policy, with the overrides from the environment.
fn idle_policy() -> IdlePolicy {
    let mut policy = IdlePolicy::default();
    for (name, field) in [
        ("IDLE_SPIN_US", &mut policy.spin),
        ("IDLE_YIELD_US", &mut policy.yield_for),
        ("IDLE_FIRST_SLEEP_US", &mut policy.first_sleep),
        ("IDLE_MAX_SLEEP_US", &mut policy.max_sleep),
    ] {
        if let Some(micros) = env_number(name) {
            *field = Duration::from_micros(micros);
        }
    }
    policy
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not a number: {value}")),
    )
}

fn number(args: &[String], index: usize, default: u64) -> u64 {
    args.get(index)
        .map(|a| a.parse().unwrap_or_else(|_| panic!("not a number: {a}")))
        .unwrap_or(default)
}

fn failure(check: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        check,
        detail: detail.into(),
    }
}

async fn run(transport: &mut MpiTransport, check: &str, args: &[String]) -> CheckResult {
    let rank = transport.rank();
    let size = transport.info().world_size;
    let peer = if rank == 0 { 1 } else { 0 };
    match check {
        "ordering" => {
            two_ranks("ordering", transport)?;
            let n = number(args, 0, 10_000);
            within(
                "ordering",
                HEAVY_LIMIT,
                checks::exchange(transport, peer, n),
            )
            .await?;
        }
        "many-in-flight" => {
            two_ranks("many in flight", transport)?;
            let n = number(args, 0, 20_000);
            let dir = PathBuf::from(args.get(1).expect("a directory with the FIFOs"));
            within(
                "many in flight",
                HEAVY_LIMIT,
                many_in_flight(transport, n, &dir),
            )
            .await?;
        }
        "large" => {
            two_ranks("large message", transport)?;
            let len = number(args, 0, 256 << 20) as usize;
            within("large message", HEAVY_LIMIT, async {
                if rank == 0 {
                    checks::send_large(transport, 1, len, 1).await?;
                    checks::receive_large(transport, 1, len, 2).await
                } else {
                    checks::receive_large(transport, 0, len, 1).await?;
                    checks::send_large(transport, 0, len, 2).await
                }
            })
            .await?;
        }
        "large-both" => {
            two_ranks("large message", transport)?;
            let len = number(args, 0, 256 << 20) as usize;
            let (mine, theirs) = if rank == 0 { (1, 2) } else { (2, 1) };
            within("large message", HEAVY_LIMIT, async {
                // Both ranks send before either receives.
                checks::send_large(transport, peer, len, mine).await?;
                checks::receive_large(transport, peer, len, theirs).await
            })
            .await?;
        }
        "many-peers" => {
            let count = number(args, 0, 200);
            within("many peers", HEAVY_LIMIT, async {
                let expected: Vec<Rank> = if rank == 0 {
                    (1..size).collect()
                } else {
                    vec![0]
                };
                if transport.peers() != expected {
                    return Err(failure(
                        "many peers",
                        format!("peers {:?}, expected {expected:?}", transport.peers()),
                    ));
                }
                if rank == 0 {
                    checks::many_peers_head(transport, &expected, count).await
                } else {
                    checks::echo(transport, count).await
                }
            })
            .await?;
        }
        "cancel-safe" => {
            two_ranks("cancel-safe recv", transport)?;
            let n = number(args, 0, 5_000);
            within("cancel-safe recv", HEAVY_LIMIT, async {
                if rank == 0 {
                    checks::receive_cancelling(transport, 1, n).await
                } else {
                    checks::flood_send(transport, 0, n).await
                }
            })
            .await?;
        }
        "server-shutdown" => server_departure(transport, true).await?,
        "server-drop" => server_departure(transport, false).await?,
        "large-then-shutdown" => {
            // Rank 0 shuts down right after sending a message still being
            // encoded: rank 1 gets the message, then the goodbye.
            const CHECK: &str = "large message then shutdown";
            two_ranks(CHECK, transport)?;
            let len = number(args, 0, 64 << 20) as usize;
            handshake(CHECK, transport, 1).await?;
            within(CHECK, HEAVY_LIMIT, async {
                if rank == 0 {
                    checks::send_large(transport, 1, len, 7).await?;
                    transport
                        .shutdown()
                        .await
                        .map_err(|e| failure(CHECK, format!("shutdown: {e}")))
                } else {
                    checks::receive_large(transport, 0, len, 7).await?;
                    checks::await_peer_lost(CHECK, transport, 0).await
                }
            })
            .await?;
        }
        "head-shutdown" => head_departure(transport, true).await?,
        "head-drop" => head_departure(transport, false).await?,
        "closed-after-shutdown" => {
            two_ranks("closed after shutdown", transport)?;
            checks::closed_after_shutdown(transport).await?;
        }
        "latency" => {
            two_ranks("latency", transport)?;
            let pause = Duration::from_micros(number(args, 1, 0));
            latency(transport, number(args, 0, 20_000), pause).await?;
        }
        "idle" => idle(transport, number(args, 0, 5)).await?,
        "stuck-peer" => {
            let len = number(args, 0, 96 << 20) as usize;
            let n = number(args, 1, 10_000);
            stuck_peer(transport, len, n).await?;
        }
        "wait-forever" => {
            // For the test harness's own test: never finishes.
            if rank == 0 {
                next_message("wait forever", transport).await?;
            }
        }
        other => return Err(failure("usage", format!("unknown check {other}"))),
    }
    if check.ends_with("-drop") {
        // The caller drops the transport without a shutdown.
        return Ok(());
    }
    if rank != 0 && !check.ends_with("-shutdown") {
        // Rank 0 may still be waiting for other servers: its goodbye says
        // when the check is over for everyone.
        checks::await_peer_lost("shutdown", transport, 0).await?;
    }
    within("shutdown", LOSS_LIMIT, async {
        transport
            .shutdown()
            .await
            .map_err(|e| failure("shutdown", e.to_string()))
    })
    .await
}

/// (b) over two processes: each direction's receiver reads nothing until
/// its sender has handed over all `n + 1` messages, which the sender
/// tells through a FIFO (opening one blocks until the other side opens it).
async fn many_in_flight(transport: &mut MpiTransport, n: u64, dir: &Path) -> CheckResult {
    let to_server = dir.join("0to1");
    let to_head = dir.join("1to0");
    if transport.rank() == 0 {
        checks::flood_send(transport, 1, n).await?;
        signal(&to_server).await?;
        wait_for(&to_head).await?;
        checks::flood_receive(transport, 1, n).await
    } else {
        wait_for(&to_server).await?;
        checks::flood_receive(transport, 0, n).await?;
        checks::flood_send(transport, 0, n).await?;
        signal(&to_head).await
    }
}

async fn signal(fifo: &Path) -> CheckResult {
    let fifo = fifo.to_owned();
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .and_then(|mut f| f.write_all(b"1"))
            .map_err(|e| failure("many in flight", format!("{}: {e}", fifo.display())))
    })
    .await
    .expect("the FIFO task")
}

async fn wait_for(fifo: &Path) -> CheckResult {
    let fifo = fifo.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut byte = [0u8; 1];
        std::fs::File::open(&fifo)
            .and_then(|mut f| f.read_exact(&mut byte))
            .map_err(|e| {
                failure(
                    "many in flight",
                    format!("the sender did not finish ({}: {e})", fifo.display()),
                )
            })
    })
    .await
    .expect("the FIFO task")
}

/// Rank 0 and server `with` exchange one ping each way, so both are up
/// and talking before one of them leaves.
async fn handshake(check: &'static str, transport: &mut MpiTransport, with: Rank) -> CheckResult {
    let other = if transport.rank() == 0 { with } else { 0 };
    let expect = |from: Rank, envelope: &Envelope, sequence: u64| match &envelope.body {
        Some(Body::PingRequest(p)) if from == other && p.sequence == sequence => Ok(()),
        _ => Err(failure(
            check,
            format!("expected ping {sequence} from {other}, got {envelope:?} from {from}"),
        )),
    };
    within(check, LOSS_LIMIT, async {
        if transport.rank() == 0 {
            let (from, envelope) = next_message(check, transport).await?;
            expect(from, &envelope, 7)?;
            send(check, transport, with, ping(8)).await
        } else {
            send(check, transport, 0, ping(7)).await?;
            let (from, envelope) = next_message(check, transport).await?;
            expect(from, &envelope, 8)
        }
    })
    .await
}

async fn send(
    check: &'static str,
    transport: &mut MpiTransport,
    to: Rank,
    envelope: Envelope,
) -> CheckResult {
    transport
        .send(to, envelope)
        .await
        .map_err(|e| failure(check, format!("send to {to}: {e}")))
}

/// (e) Rank 1 leaves (shutdown, or drop without one); rank 0 sees
/// `PeerLost(1)` and can no longer send to it, but still talks to the other
/// servers, which then see rank 0 leave.
async fn server_departure(transport: &mut MpiTransport, shutdown: bool) -> CheckResult {
    const CHECK: &str = "server departure";
    let rank = transport.rank();
    let size = transport.info().world_size;
    match rank {
        0 => {
            handshake(CHECK, transport, 1).await?;
            checks::await_peer_lost(CHECK, transport, 1).await?;
            let rest: Vec<Rank> = (2..size).collect();
            if transport.peers() != rest {
                return Err(failure(
                    CHECK,
                    format!(
                        "peers {:?} after losing 1, expected {rest:?}",
                        transport.peers()
                    ),
                ));
            }
            within(CHECK, LOSS_LIMIT, async {
                for &server in &rest {
                    send(CHECK, transport, server, ping(9)).await?;
                    let (from, envelope) = next_message(CHECK, transport).await?;
                    if !matches!(envelope.body, Some(Body::PingRequest(p)) if p.sequence == 9) {
                        return Err(failure(CHECK, format!("rank {from} did not echo ping 9")));
                    }
                }
                Ok(())
            })
            .await
        }
        1 => {
            handshake(CHECK, transport, 1).await?;
            if shutdown {
                within(CHECK, LOSS_LIMIT, async {
                    transport
                        .shutdown()
                        .await
                        .map_err(|e| failure(CHECK, format!("shutdown: {e}")))
                })
                .await
            } else {
                // The caller drops the transport after printing the result.
                Ok(())
            }
        }
        _ => {
            within(CHECK, LOSS_LIMIT, async {
                let (from, envelope) = next_message(CHECK, transport).await?;
                send(CHECK, transport, from, envelope).await
            })
            .await?;
            checks::await_peer_lost("head node departure", transport, 0).await
        }
    }
}

/// (e) Rank 0 leaves; rank 1's next event is `PeerLost(0)`, after which it
/// can neither send to rank 0 nor wait in `recv`. Mirrors
/// `casa_node_conformance::transport::head_departure`, one side per rank.
async fn head_departure(transport: &mut MpiTransport, shutdown: bool) -> CheckResult {
    const CHECK: &str = "head node departure";
    two_ranks(CHECK, transport)?;
    handshake(CHECK, transport, 1).await?;
    if transport.rank() == 0 {
        if shutdown {
            return within(CHECK, LOSS_LIMIT, async {
                transport
                    .shutdown()
                    .await
                    .map_err(|e| failure(CHECK, format!("shutdown: {e}")))
            })
            .await;
        }
        return Ok(());
    }
    within(CHECK, LOSS_LIMIT, async {
        match transport.recv().await {
            Ok(TransportEvent::PeerLost(0)) => {}
            other => {
                return Err(failure(
                    CHECK,
                    format!("expected PeerLost(0), got {other:?}"),
                ));
            }
        }
        if transport.peers().contains(&0) {
            return Err(failure(CHECK, "rank 0 is still a peer after PeerLost(0)"));
        }
        if transport.send(0, ping(0)).await.is_ok() {
            return Err(failure(
                CHECK,
                "the server could still send to the head node",
            ));
        }
        match transport.recv().await {
            Err(_) => Ok(()),
            Ok(event) => Err(failure(
                CHECK,
                format!("recv after losing the head node gave {event:?}"),
            )),
        }
    })
    .await
}

/// Fails `check` unless the world has two ranks.
fn two_ranks(check: &'static str, transport: &MpiTransport) -> CheckResult {
    let size = transport.info().world_size;
    if size == 2 {
        Ok(())
    } else {
        Err(failure(check, format!("run with 2 ranks, not {size}")))
    }
}

/// A send that cannot complete does not hold up sends to other peers:
/// rank 0 stops rank 2 (SIGSTOP), sends it a `len`-byte message (which MPI
/// cannot deliver while it is stopped) and a ping, then exchanges `n`
/// pings each way with rank 1 (more than one epoch of sends); then it lets
/// rank 2 go on, which must get both, in order.
async fn stuck_peer(transport: &mut MpiTransport, len: usize, n: u64) -> CheckResult {
    const CHECK: &str = "stuck peer";
    let size = transport.info().world_size;
    if size != 3 {
        return Err(failure(CHECK, format!("run with 3 ranks, not {size}")));
    }
    let go = || {
        Envelope::new(Body::PingResponse(
            casa_node_protocol::pb::PingResponse::default(),
        ))
    };
    match transport.rank() {
        0 => {
            let (from, envelope) =
                within(CHECK, LOSS_LIMIT, next_message(CHECK, transport)).await?;
            let pid = match envelope.body {
                Some(Body::PingRequest(p)) if from == 2 => p.sequence,
                _ => {
                    return Err(failure(
                        CHECK,
                        format!("expected rank 2's pid, got {envelope:?}"),
                    ));
                }
            };
            signal_process(pid, "STOP")?;
            within(CHECK, LOSS_LIMIT, async {
                // The signal takes effect asynchronously; rank 2's state says when.
                while process_state(pid) != Some('T') {
                    tokio::task::yield_now().await;
                }
                Ok(())
            })
            .await?;
            checks::send_large(transport, 2, len, 3).await?;
            send(CHECK, transport, 2, ping(11)).await?;
            send(CHECK, transport, 1, go()).await?;
            let exchanged = within(CHECK, HEAVY_LIMIT, checks::exchange(transport, 1, n)).await;
            signal_process(pid, "CONT")?;
            exchanged?;
            let (from, envelope) =
                within(CHECK, HEAVY_LIMIT, next_message(CHECK, transport)).await?;
            match envelope.body {
                Some(Body::PingRequest(p)) if from == 2 && p.sequence == 12 => Ok(()),
                _ => Err(failure(
                    CHECK,
                    format!("expected ping 12 from 2, got {envelope:?}"),
                )),
            }
        }
        1 => {
            within(CHECK, HEAVY_LIMIT, async {
                let (_, envelope) = next_message(CHECK, transport).await?;
                if envelope != go() {
                    return Err(failure(CHECK, format!("expected the go, got {envelope:?}")));
                }
                checks::exchange(transport, 0, n).await
            })
            .await
        }
        _ => {
            send(CHECK, transport, 0, ping(u64::from(std::process::id()))).await?;
            within(CHECK, 2 * HEAVY_LIMIT, async {
                checks::receive_large(transport, 0, len, 3).await?;
                let (_, envelope) = next_message(CHECK, transport).await?;
                if envelope != ping(11) {
                    return Err(failure(
                        CHECK,
                        format!("expected ping 11, got {envelope:?}"),
                    ));
                }
                send(CHECK, transport, 0, ping(12)).await
            })
            .await
        }
    }
}

/// Sends `SIG{signal}` to process `pid` with kill(1).
fn signal_process(pid: u64, signal: &str) -> CheckResult {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .map_err(|e| failure("stuck peer", format!("kill -{signal} {pid}: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(failure(
            "stuck peer",
            format!("kill -{signal} {pid}: {status}"),
        ))
    }
}

/// The state letter of process `pid` (`T` when stopped).
fn process_state(pid: u64) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// `MpiTransport::init` refuses a world of one, and MPI cannot be
/// initialised twice.
fn world_too_small() -> ExitCode {
    let report = |outcome: Result<(), String>| match outcome {
        Ok(()) => {
            println!("rank 0: world-too-small ok");
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("rank 0: world-too-small FAILED: {why}");
            ExitCode::FAILURE
        }
    };
    match MpiTransport::init() {
        Err(MpiError::WorldTooSmall(1)) => {}
        Err(other) => return report(Err(format!("expected WorldTooSmall(1), got {other}"))),
        Ok(transport) => {
            return report(Err(format!(
                "a world of {} was accepted",
                transport.info().world_size
            )));
        }
    }
    match MpiTransport::init() {
        Err(MpiError::AlreadyInitialized) => report(Ok(())),
        Err(other) => report(Err(format!(
            "a second init: expected AlreadyInitialized, got {other}"
        ))),
        Ok(_) => report(Err("MPI was initialised twice".to_owned())),
    }
}

/// Small-message round trips between rank 0 and rank 1 through the
/// transport, `pause` apart (to see what the idle backoff adds); rank 0
/// prints the statistics.
async fn latency(transport: &mut MpiTransport, rounds: u64, pause: Duration) -> CheckResult {
    const CHECK: &str = "latency";
    const WARMUP: u64 = 1_000;
    let rank = transport.rank();
    let mut times = Vec::with_capacity(rounds as usize);
    within(CHECK, HEAVY_LIMIT, async {
        for i in 0..WARMUP + rounds {
            if rank == 0 {
                if !pause.is_zero() {
                    // Pacing the measurement; nothing waits on this sleep.
                    tokio::time::sleep(pause).await;
                }
                let start = Instant::now();
                send(CHECK, transport, 1, ping(i)).await?;
                next_message(CHECK, transport).await?;
                if i >= WARMUP {
                    times.push(start.elapsed());
                }
            } else {
                let (_, envelope) = next_message(CHECK, transport).await?;
                send(CHECK, transport, 0, envelope).await?;
            }
        }
        Ok(())
    })
    .await?;
    if rank == 0 {
        let len = Framing::default()
            .encode_body(&ping(WARMUP))
            .map_or(0, |b| b.len());
        print_latency(&format!("transport, {pause:?} apart"), &mut times, len);
    }
    Ok(())
}

/// The same round trips with rsmpi alone on the main thread: blocking
/// send, matched probe, matched receive of the same encoded bytes.
fn raw_latency(rounds: usize) -> ExitCode {
    use mpi::traits::*;
    const WARMUP: usize = 1_000;
    let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        println!("rank ?: raw-latency FAILED: MPI already initialised");
        return ExitCode::FAILURE;
    };
    let world = universe.world();
    let rank = world.rank();
    if world.size() != 2 {
        println!("rank {rank}: raw-latency FAILED: run with 2 ranks");
        return ExitCode::FAILURE;
    }
    let framing = Framing::default();
    let mut times = Vec::with_capacity(rounds);
    let peer = world.process_at_rank(1 - rank);
    let mut len = 0;
    for i in 0..WARMUP + rounds {
        let body = framing.encode_body(&ping(i as u64)).expect("encodes");
        len = body.len();
        let start = Instant::now();
        if rank == 0 {
            peer.send_with_tag(&body[..], 1);
        }
        let (message, status) = peer.matched_probe_with_tag(1);
        let mut received = vec![0u8; status.count(u8::equivalent_datatype()) as usize];
        message.matched_receive_into(&mut received[..]);
        if rank == 1 {
            peer.send_with_tag(&received[..], 1);
        } else if i >= WARMUP {
            times.push(start.elapsed());
        }
    }
    if rank == 0 {
        print_latency("raw rsmpi", &mut times, len);
    }
    println!("rank {rank}: raw-latency ok");
    ExitCode::SUCCESS
}

fn print_latency(what: &str, times: &mut [Duration], bytes: usize) {
    times.sort_unstable();
    let n = times.len();
    let mean = times.iter().sum::<Duration>() / n as u32;
    let at = |q: f64| times[((n as f64 * q) as usize).min(n - 1)];
    println!(
        "{what}: {n} round trips of {bytes}-byte messages: median {:.1} µs, mean {:.1} µs, \
         p90 {:.1} µs, p99 {:.1} µs, min {:.1} µs",
        micros(at(0.5)),
        micros(mean),
        micros(at(0.9)),
        micros(at(0.99)),
        micros(times[0]),
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Every rank idles for `seconds` after a round of pings, and prints the
/// CPU time its process (and each of its threads) used meanwhile.
async fn idle(transport: &mut MpiTransport, seconds: u64) -> CheckResult {
    const CHECK: &str = "idle";
    let rank = transport.rank();
    let servers: Vec<Rank> = (1..transport.info().world_size).collect();
    if rank == 0 {
        for &server in &servers {
            send(CHECK, transport, server, ping(1)).await?;
        }
        let before = cpu_times();
        let start = Instant::now();
        // Measuring over a fixed window; nothing waits on this sleep.
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        report_cpu(rank, &before, start.elapsed());
        for &server in &servers {
            send(CHECK, transport, server, ping(2)).await?;
        }
    } else {
        within(CHECK, LOSS_LIMIT, next_message(CHECK, transport)).await?;
        let before = cpu_times();
        let start = Instant::now();
        within(
            CHECK,
            Duration::from_secs(seconds) + LOSS_LIMIT,
            next_message(CHECK, transport),
        )
        .await?;
        report_cpu(rank, &before, start.elapsed());
    }
    Ok(())
}

/// Clock ticks of user plus system time, per thread (name, ticks), with
/// the process total first.
fn cpu_times() -> Vec<(String, u64)> {
    let ticks = |stat: &str| -> Option<u64> {
        // The fields after the parenthesised name; utime and stime are
        // the 14th and 15th of the line.
        let after = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    let mut out = Vec::new();
    if let Some(total) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| ticks(&s))
    {
        out.push(("process".to_owned(), total));
    }
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if let Some(t) = ticks(&stat) {
                out.push((
                    format!("{} ({})", name.trim(), task.file_name().to_string_lossy()),
                    t,
                ));
            }
        }
    }
    out
}

fn report_cpu(rank: Rank, before: &[(String, u64)], elapsed: Duration) {
    // Linux reports these in USER_HZ, 100 per second on every platform.
    const HZ: f64 = 100.0;
    let after = cpu_times();
    let percent = |name: &str, ticks: u64| {
        let start = before
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, t)| *t);
        (ticks.saturating_sub(start)) as f64 / HZ / elapsed.as_secs_f64() * 100.0
    };
    let threads: Vec<String> = after
        .iter()
        .skip(1)
        .map(|(name, t)| format!("{name} {:.2}%", percent(name, *t)))
        .collect();
    if let Some((name, total)) = after.first() {
        println!(
            "rank {rank}: idle for {:.1} s: process CPU {:.2}% of a core; threads: {}",
            elapsed.as_secs_f64(),
            percent(name, *total),
            threads.join(", ")
        );
    }
}
