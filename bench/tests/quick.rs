//! Runs the client-core benchmark's `--quick` version, so that the harness
//! keeps compiling and its checks (every command completed, one ping per
//! server, no server timed out) keep passing. Its figures mean nothing in a
//! debug build.

use std::process::Command;

#[test]
fn the_quick_benchmark_runs_and_prints_its_table() {
    let output = Command::new(env!("CARGO_BIN_EXE_client-core"))
        .arg("--quick")
        .output()
        .expect("the benchmark runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "client-core --quick failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for row in [
        "dispatch, untargeted",
        "dispatch, targeted round-robin",
        "heartbeat: tick + drain 10000 pings",
        "heartbeat: handle 10000 answers",
        "heartbeat: whole round",
        "baseline: VecDeque push+pop",
        "baseline: prost encode+decode",
    ] {
        assert!(stdout.contains(row), "no {row:?} row in:\n{stdout}");
    }
}

#[test]
fn unknown_arguments_are_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_client-core"))
        .arg("--fast")
        .output()
        .expect("the benchmark runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown argument"));
}

#[test]
fn the_quick_worker_benchmark_runs_against_its_baseline() {
    let output = Command::new(env!("CARGO_BIN_EXE_worker-latency"))
        .arg("--quick")
        .output()
        .expect("the benchmark runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for row in ["baseline: python pipe echo", "1+1 through the executor"] {
        assert!(stdout.contains(row), "no {row:?} row in:\n{stdout}");
    }
}
