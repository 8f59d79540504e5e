//! The shared transport checks (`casa_node_conformance::transport`) over
//! MPI: each test starts `mpirun` on the `mpi-conformance` binary, whose
//! ranks each play their side of one check, and asserts that every rank
//! reported success and the job exited with 0.
//!
//! Jobs run one at a time (so that they do not compete for the cores), all
//! traffic stays on this machine (Open MPI: shared memory and loopback
//! only), and a job that outlives its time limit is killed — mpirun and the
//! processes it started, each by its PID — and fails the test.

use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use casa_node_conformance::process::{self, collect, descendants, drain, stat};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BINARY: &str = env!("CARGO_BIN_EXE_mpi-conformance");

/// One MPI job at a time.
static JOBS: Mutex<()> = Mutex::new(());

/// What a job printed and how it ended.
struct Job {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl std::fmt::Display for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} after {:.1?}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `mpi-conformance ARGS` on `ranks` processes, killing the job after
/// `limit`.
fn mpirun(ranks: usize, args: &[&str], limit: Duration) -> Job {
    mpirun_with(ranks, args, &[], limit)
}

/// [`mpirun`] with environment variables for the ranks.
fn mpirun_with(ranks: usize, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Job {
    let _one_at_a_time = JOBS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // Shared memory and loopback only (Open MPI).
    let mut command = process::mpirun(ranks).unwrap_or_else(|why| panic!("{why}"));
    command
        .envs(env.iter().copied())
        .arg(BINARY)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command.spawn().expect("start mpirun");
    let pid = Pid::from_raw(child.id() as i32);
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let (exited_tx, exited_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait().expect("wait for mpirun");
        let _ = exited_tx.send(status);
    });
    let status = match exited_rx.recv_timeout(limit) {
        Ok(status) => status,
        Err(_) => {
            // mpirun ends its ranks on SIGTERM. The ranks have process
            // groups of their own: those still alive after that get
            // SIGKILL by PID, as does mpirun.
            let started = descendants(pid);
            let _ = kill(pid, Signal::SIGTERM);
            let status = match exited_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(status) => status,
                Err(_) => {
                    let _ = kill(pid, Signal::SIGKILL);
                    exited_rx.recv().expect("mpirun reaped")
                }
            };
            let below = started.len();
            for (process, started) in started {
                if stat(process).is_some_and(|now| now.started == started) {
                    let _ = kill(process, Signal::SIGKILL);
                }
            }
            waiter.join().expect("the waiter");
            let job = Job {
                status,
                stdout: collect(stdout),
                stderr: collect(stderr),
                elapsed: start.elapsed(),
            };
            panic!(
                "the job ran over its {limit:?} and was killed \
                 (mpirun and the {below} processes it started): {job}"
            );
        }
    };
    waiter.join().expect("the waiter");
    Job {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
        elapsed: start.elapsed(),
    }
}

/// Runs `check` on `ranks` processes and asserts that each rank passed.
fn check(ranks: usize, args: &[&str], limit: Duration) -> Job {
    check_with(ranks, args, &[], limit)
}

/// [`check`] with environment variables for the ranks.
fn check_with(ranks: usize, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Job {
    let job = mpirun_with(ranks, args, env, limit);
    let name = args[0];
    assert!(
        job.status.success(),
        "`{name}` on {ranks} ranks failed: {job}"
    );
    for rank in 0..ranks {
        let line = format!("rank {rank}: {name} ok");
        assert!(
            job.stdout.lines().any(|l| l == line),
            "`{name}`: no `{line}` line: {job}"
        );
    }
    assert!(
        !job.stdout.contains("FAILED"),
        "`{name}` reported a failure: {job}"
    );
    eprintln!("`{name}` on {ranks} ranks passed in {:.1?}", job.elapsed);
    job
}

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn ordering_10_000_each_way() {
    check(2, &["ordering", "10000"], LIMIT);
}

/// Sends wait for the window and go on as MPI completes earlier ones.
#[test]
fn ordering_through_a_window_of_4_messages_and_64_bytes() {
    let window = [("WINDOW_MESSAGES", "4"), ("WINDOW_BYTES", "64")];
    check_with(2, &["ordering", "10000"], &window, LIMIT);
    check_with(2, &["large-both", &(16 << 20).to_string()], &window, LIMIT);
}

#[test]
fn many_in_flight_20_000_each_way() {
    let dir = tempfile::tempdir().expect("temporary directory");
    for fifo in ["0to1", "1to0"] {
        nix::unistd::mkfifo(&dir.path().join(fifo), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    }
    let dir = dir.path().to_str().expect("UTF-8 path");
    check(2, &["many-in-flight", "20000", dir], LIMIT);
}

#[test]
fn large_message_256_mib_each_way() {
    check(2, &["large", &(256 << 20).to_string()], LIMIT);
}

#[test]
fn large_messages_256_mib_both_ways_at_once() {
    check(2, &["large-both", &(256 << 20).to_string()], LIMIT);
}

#[test]
fn many_peers_32_servers() {
    check(33, &["many-peers", "200"], LIMIT);
}

#[test]
fn recv_is_cancel_safe() {
    check(2, &["cancel-safe", "5000"], LIMIT);
}

#[test]
fn server_shutdown_is_noticed_and_the_others_stay() {
    check(3, &["server-shutdown"], LIMIT);
}

#[test]
fn server_drop_says_goodbye_too() {
    check(3, &["server-drop"], LIMIT);
}

#[test]
fn head_shutdown_is_noticed() {
    check(2, &["head-shutdown"], LIMIT);
}

#[test]
fn head_drop_says_goodbye_too() {
    check(2, &["head-drop"], LIMIT);
}

/// A message still being encoded off the loop when its sender shuts down
/// reaches the peer before the goodbye (the goodbye overtook it, and the
/// peer saw `PeerLost` first, now and then under load).
#[test]
fn a_large_message_sent_just_before_shutdown_arrives_before_the_goodbye() {
    check(2, &["large-then-shutdown", &(64 << 20).to_string()], LIMIT);
}

/// A 96 MiB send to a stopped rank, and a ping after it, do not hold up
/// 10 000 sends each way with another rank, and arrive in order when the
/// rank goes on. (A window of 1 GiB lets the ping be queued behind the
/// large message instead of making `send` wait.)
#[test]
fn a_stopped_peer_does_not_hold_up_the_others() {
    let window = [("WINDOW_BYTES", "1073741824")];
    let args = ["stuck-peer", &(96 << 20).to_string(), "10000"];
    check_with(3, &args, &window, LIMIT);
}

#[test]
fn closed_after_shutdown_on_both_sides_at_once() {
    check(2, &["closed-after-shutdown"], LIMIT);
}

#[test]
fn a_world_of_one_is_refused() {
    check(1, &["world-too-small"], LIMIT);
}

/// The harness itself: a failing rank fails the job, so the checks above
/// can fail.
#[test]
fn a_failing_check_fails_the_job() {
    let job = mpirun(2, &["no-such-check"], LIMIT);
    assert!(!job.status.success(), "the job succeeded: {job}");
    assert!(job.stdout.contains("FAILED"), "no failure reported: {job}");
}

/// The harness itself: a job that hangs is killed at its time limit, ranks
/// included, and fails the test.
#[test]
fn a_hung_job_is_killed() {
    let outcome = std::panic::catch_unwind(|| mpirun(2, &["wait-forever"], Duration::from_secs(5)));
    let Err(panic) = outcome else {
        panic!("the job ended by itself");
    };
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("was killed"), "{message}");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(BINARY) && cmdline.contains("wait-forever"))
        .collect();
    assert!(left.is_empty(), "still running: {left:?}");
}
