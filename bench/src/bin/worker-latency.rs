//! The cost of one `1+1` through the Python worker, as the server node
//! pays it (`Executor::execute` to `ExecutorEvent::Finished`), against the
//! floor measured in the same run: a bare Python process echoing
//! length-prefixed frames over a pipe.
//!
//! `cargo run --release -p casa-node-bench --bin worker-latency [-- --quick]`

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use casa_node::executor::{Executor, ExecutorConfig, ExecutorEvent};
use casa_node_protocol::pb::{CommandMode, CommandRequest};

const ECHO: &str = r#"
import struct, sys
inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = inp.read(4)
    if len(head) < 4:
        break
    body = inp.read(struct.unpack(">I", head)[0])
    out.write(head + body)
    out.flush()
"#;

fn main() {
    let quick = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--quick") => true,
        Some(other) => {
            eprintln!("unknown argument {other:?}; the only option is --quick");
            std::process::exit(2);
        }
    };
    let (warm, rounds) = if quick { (20, 100) } else { (500, 5000) };
    let python =
        PathBuf::from(std::env::var_os("CASA_NODE_PYTHON").unwrap_or_else(|| "python3".into()));
    let echo = pipe_echo(&python, warm, rounds);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let worker = runtime.block_on(worker(&python, warm, rounds));
    println!(
        "{:<34} {:>9} {:>9} {:>9}  {:>7}",
        "figure", "median", "min", "p90", "ratio"
    );
    for (name, times) in [
        ("baseline: python pipe echo", &echo),
        ("1+1 through the executor", &worker),
    ] {
        println!(
            "{name:<34} {:>7.1}us {:>7.1}us {:>7.1}us  {:>7.2}",
            micros(times[times.len() / 2]),
            micros(times[0]),
            micros(times[times.len() * 9 / 10]),
            micros(times[times.len() / 2]) / micros(echo[echo.len() / 2]),
        );
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Round trips of a 20-byte frame through a Python echo loop, sorted.
fn pipe_echo(python: &Path, warm: usize, rounds: usize) -> Vec<Duration> {
    let mut child = Command::new(python)
        .args(["-u", "-c", ECHO])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python starts");
    let mut input = child.stdin.take().expect("piped");
    let mut output = child.stdout.take().expect("piped");
    let frame = [&16u32.to_be_bytes()[..], &[7u8; 16]].concat();
    let mut back = vec![0u8; frame.len()];
    let mut times = Vec::with_capacity(rounds);
    for i in 0..warm + rounds {
        let began = Instant::now();
        input.write_all(&frame).expect("echo takes the frame");
        output.read_exact(&mut back).expect("echo answers");
        if i >= warm {
            times.push(began.elapsed());
        }
    }
    assert_eq!(back, frame, "the echo returns the frame");
    drop(input);
    let _ = child.wait();
    times.sort();
    times
}

/// Round trips of `1+1` through a real worker, sorted.
async fn worker(python: &Path, warm: usize, rounds: usize) -> Vec<Duration> {
    let mut executor = Executor::start(ExecutorConfig::new(python, 1))
        .await
        .expect("the worker starts");
    let mut times = Vec::with_capacity(rounds);
    for i in 0..warm + rounds {
        let request = CommandRequest {
            id: i as u64 + 1,
            command: "1+1".into(),
            mode: CommandMode::Auto.into(),
            ..CommandRequest::default()
        };
        let began = Instant::now();
        executor
            .execute(request)
            .expect("the worker takes the command");
        loop {
            match executor.next_event().await {
                ExecutorEvent::Finished(outcome) => {
                    assert!(outcome.successful, "1+1 succeeds");
                    break;
                }
                ExecutorEvent::Log { .. } => {}
                ExecutorEvent::WorkerRestarted { reason }
                | ExecutorEvent::NoWorkerLeft { reason } => {
                    panic!("the worker died: {reason}")
                }
            }
        }
        if i >= warm {
            times.push(began.elapsed());
        }
    }
    executor.shutdown().await;
    times.sort();
    times
}
