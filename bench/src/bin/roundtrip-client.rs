//! Blocking `1+1` round trips from the Rust [`BlockingClient`] against a
//! cluster someone else started: the L2 figure of the comparison harness
//! (`bench/compare.sh`), which starts the cluster, times the same `1+1`
//! from Python on it, and compares both with an mpi4py ping-pong.
//!
//! ```text
//! roundtrip-client unix:///PATH/front.sock [--requests N] [--warmup N] [--target RANK]
//! ```
//!
//! Submits `1+1` targeted at one server (1 by default) and waits for its
//! response, `--warmup` times untimed and then `--requests` times timed,
//! checking each response (successful, ret 2, from that server). Prints
//! one JSON line: `{"requests":N,"median_us":..,"min_us":..,"p99_us":..,
//! "mean_us":..}`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use casa_node::client::{BlockingClient, Submit};
use casa_node::endpoint::FrontDoorEndpoint;
use casa_node_protocol::pb::value::Kind;
use casa_node_protocol::pb::{CommandStatus, Value};

const USAGE: &str = "\
usage: roundtrip-client ENDPOINT [--requests N] [--warmup N] [--target RANK]

Times blocking 1+1 round trips from the Rust BlockingClient through the
running cluster whose front door is ENDPOINT (unix://PATH).
  --requests N   timed round trips (default 2000)
  --warmup N     untimed round trips first (default 200)
  --target RANK  the server the 1+1 goes to (default 1)";

/// How long one `1+1` may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);

struct Settings {
    endpoint: FrontDoorEndpoint,
    requests: usize,
    warmup: usize,
    target: i32,
}

fn parse_args() -> Result<Settings, String> {
    let mut endpoint = None;
    let mut requests = 2_000;
    let mut warmup = 200;
    let mut target = 1;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| casa_node_bench::number(&mut args, name);
        match arg.as_str() {
            "--requests" => requests = number("--requests")?.max(1),
            "--warmup" => warmup = number("--warmup")?,
            "--target" => {
                target = i32::try_from(number("--target")?)
                    .map_err(|_| "--target is out of range".to_owned())?;
            }
            "-h" | "--help" => return Err(String::new()),
            other if other.starts_with('-') => {
                return Err(format!("unknown argument {other:?}"));
            }
            other if endpoint.is_none() => {
                endpoint = Some(
                    other
                        .parse::<FrontDoorEndpoint>()
                        .map_err(|e| format!("{other:?}: {e}"))?,
                );
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(Settings {
        endpoint: endpoint.ok_or("the cluster's front door (unix://PATH) is missing")?,
        requests,
        warmup,
        target,
    })
}

fn main() -> ExitCode {
    let settings = match parse_args() {
        Ok(settings) => settings,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("roundtrip-client: {why}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&settings) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("roundtrip-client: {why}");
            ExitCode::FAILURE
        }
    }
}

fn run(settings: &Settings) -> Result<String, String> {
    let client = BlockingClient::connect(&settings.endpoint)
        .map_err(|e| format!("cannot connect to {}: {e}", settings.endpoint))?;
    let two = Value {
        kind: Some(Kind::IntValue(2)),
    };
    let one = |i: usize| -> Result<Duration, String> {
        let began = Instant::now();
        let ids = client
            .submit(Submit::new("1+1").targets([settings.target]))
            .map_err(|e| format!("submit: {e}"))?;
        let responses = client
            .wait_timeout(&ids, COMMAND_LIMIT)
            .map_err(|e| format!("1+1 number {i}: {e}"))?;
        let elapsed = began.elapsed();
        match responses.as_slice() {
            [r] if r.successful
                && r.ret.as_ref() == Some(&two)
                && r.server == settings.target
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
    let mut times = Vec::with_capacity(settings.requests);
    for i in 0..settings.requests {
        times.push(one(settings.warmup + i)?);
    }
    times.sort_unstable();
    let n = times.len();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| micros(times[((n as f64 * q) as usize).min(n - 1)]);
    let mean = times.iter().map(|&d| micros(d)).sum::<f64>() / n as f64;
    Ok(format!(
        "{{\"requests\":{n},\"median_us\":{:.2},\"min_us\":{:.2},\"p99_us\":{:.2},\"mean_us\":{mean:.2}}}",
        at(0.5),
        micros(times[0]),
        at(0.99),
    ))
}
