//! Runs the head-core benchmark's `--quick` version, so that the harness
//! keeps compiling and its checks (every command completed, one ping per
//! server, no server timed out) keep passing. Its figures mean nothing in a
//! debug build.

use std::process::Command;

#[test]
fn the_quick_benchmark_runs_and_prints_its_table() {
    let output = Command::new(env!("CARGO_BIN_EXE_head-core"))
        .arg("--quick")
        .output()
        .expect("the benchmark runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "head-core --quick failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
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
    let output = Command::new(env!("CARGO_BIN_EXE_head-core"))
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

/// The cluster round trip's `--quick` run: a raw MPI ping-pong, the MPI
/// transport alone, and 50 `1+1` through a cluster over MPI and over
/// ZeroMQ, each started and stopped by the benchmark. It takes the
/// `casa-node` binary next to its own, `target/debug/casa-node`, which
/// `cargo test --workspace --all-features` builds with MPI support in the
/// same run; with `cargo test -p casa-node-bench` alone, build it first
/// (`cargo build -p casa-node --features mpi`).
#[test]
fn the_quick_cluster_round_trip_runs_and_prints_its_ratios() {
    let driver = std::path::Path::new(env!("CARGO_BIN_EXE_cluster-roundtrip"));
    let casa_node = driver.with_file_name("casa-node");
    assert!(
        casa_node.is_file(),
        "{} is missing: the cluster round trip needs it, built with MPI support \
         (`cargo build -p casa-node --features mpi`, or run the workspace's tests with \
         `cargo test --workspace --all-features`, which builds it)",
        casa_node.display()
    );
    let output = Command::new(driver)
        .arg("--quick")
        .env_remove("CASA_NODE_BIN")
        .output()
        .expect("the benchmark runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "cluster-roundtrip --quick failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let numbers = |label: &str| -> Vec<f64> {
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no {label:?} row in:\n{stdout}"));
        let numbers: Vec<f64> = line
            .split_whitespace()
            .map(|n| {
                n.parse()
                    .unwrap_or_else(|_| panic!("{label:?}: {n:?} is not a number in:\n{stdout}"))
            })
            .collect();
        assert!(!numbers.is_empty(), "{label:?} has no figures:\n{stdout}");
        for n in &numbers {
            assert!(
                n.is_finite() && *n > 0.0,
                "{label:?}: {n} is not a positive figure in:\n{stdout}"
            );
        }
        numbers
    };
    for row in [
        "raw MPI ping-pong",
        "MPI transport alone",
        "1+1 over MPI",
        "1+1 over ZeroMQ",
        "MPI 1+1 / raw MPI",
        "ZeroMQ 1+1 / raw MPI",
        "MPI 1+1 / ZeroMQ 1+1",
        "status over MPI",
        "status over ZeroMQ",
    ] {
        numbers(row);
    }
    // A 1+1 through a cluster does more than exchange two messages.
    assert!(
        numbers("MPI 1+1 / raw MPI")[0] > 1.0,
        "a 1+1 over MPI was no slower than the raw exchange:\n{stdout}"
    );
}

#[test]
fn the_cluster_round_trip_refuses_unknown_arguments() {
    let output = Command::new(env!("CARGO_BIN_EXE_cluster-roundtrip"))
        .arg("--fast")
        .output()
        .expect("the benchmark runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown argument"));
}

/// The comparison harness's L2 client (`bench/compare.sh` runs it against
/// a cluster it starts): its arguments are checked, and a front door that
/// is not there is an error, not a hang.
#[test]
fn the_roundtrip_client_checks_its_arguments_and_its_cluster() {
    let client = env!("CARGO_BIN_EXE_roundtrip-client");
    let output = Command::new(client)
        .arg("--fast")
        .output()
        .expect("the client runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown argument"));
    let output = Command::new(client).output().expect("the client runs");
    assert_eq!(output.status.code(), Some(2));
    let missing = std::env::temp_dir().join(format!("no-cluster-{}.sock", std::process::id()));
    let output = Command::new(client)
        .arg(format!("unix://{}", missing.display()))
        .output()
        .expect("the client runs");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot connect"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
