//! End to end: real `casa-node` processes (a head node, server nodes,
//! Python workers) driven through the Rust client and the CLI. Each test
//! names the SEMANTICS rule it checks. Every process a test starts is
//! stopped when the test ends, passed or failed, by PID.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use casa_node::client::{BlockingClient, ClientError, Submit};
use casa_node::endpoint::FrontDoorEndpoint;
use casa_node_conformance::cluster::{self, Cluster, EXIT_BOUND, Launch, WAIT, over_mpi};
use casa_node_conformance::driver::RawDriver;
use casa_node_conformance::process::{self, ChildGuard, wait_gone};
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{
    CommandMode, CommandStatus, LogLevel, RejectReason, StatusRequest, Value,
};
use common::BIN;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// `casa-node up` with `servers` servers, over the transport the tests run
/// on.
fn up(servers: usize) -> Launch {
    Launch::new(BIN, servers)
}

/// Starts `launch`, whose front door must be the one asked for, and
/// notes its servers and workers.
fn start(launch: Launch) -> Cluster {
    let cluster = launch.start();
    let socket = cluster.dir().join("front.sock");
    assert_eq!(
        cluster.front_door(),
        format!("unix://{}", socket.display()),
        "the front door up printed"
    );
    cluster.note_pids();
    cluster
}

/// A running cluster, driven through the Rust client and the CLI.
trait Driven {
    /// Its front door.
    fn endpoint(&self) -> FrontDoorEndpoint;

    fn client(&self) -> BlockingClient {
        BlockingClient::connect(&self.endpoint()).expect("the front door accepts")
    }

    /// Adds the cluster's tree, and the servers and workers its status
    /// names (attached ones too), to the processes seen; the latter.
    fn note_pids(&self) -> Vec<Pid>;

    /// The CLI with `args`, aimed at this cluster.
    fn command(&self, args: &[&str]) -> Command;

    /// Runs the CLI against this cluster.
    fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("the CLI runs")
    }

    fn server_pid(&self, rank: i32) -> (u32, u32) {
        let s = self.client().status(Some(rank)).unwrap().servers.remove(0);
        (s.pid, s.worker_pid)
    }

    /// `casa-node status --watch --interval 0.2 ARGS` on this cluster, its
    /// output piped.
    fn watch(&self, args: &[&str]) -> Watching {
        let mut child = self
            .command(&["status", "--watch", "--interval", "0.2"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the CLI runs");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let stderr = process::drain(child.stderr.take().unwrap());
        let json = args.contains(&"--json");
        let (tx, snapshots) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut block = String::new();
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                let sent = if json {
                    tx.send(line)
                } else if line.is_empty() {
                    tx.send(std::mem::take(&mut block))
                } else {
                    block.push_str(&line);
                    block.push('\n');
                    Ok(())
                };
                if sent.is_err() {
                    break;
                }
            }
        });
        Watching {
            child: ChildGuard(child),
            snapshots,
            stderr,
        }
    }
}

impl Driven for Cluster {
    fn endpoint(&self) -> FrontDoorEndpoint {
        FrontDoorEndpoint::Unix(self.socket())
    }

    fn note_pids(&self) -> Vec<Pid> {
        self.note_tree();
        let status = self.client().status(None).unwrap();
        let pids: Vec<Pid> = status
            .servers
            .iter()
            .flat_map(|s| [s.pid, s.worker_pid])
            .filter(|&p| p != 0)
            .map(|p| Pid::from_raw(p as i32))
            .collect();
        for &pid in &pids {
            self.note(pid);
        }
        pids
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = self.cli_command(BIN);
        command
            .args(args)
            .env("CASA_NODE_ENDPOINT", self.endpoint().to_string());
        command
    }
}

fn one(client: &BlockingClient, submit: Submit) -> casa_node_protocol::pb::CommandResponse {
    let ids = client.submit(submit).expect("accepted");
    let mut responses = client.wait_timeout(&ids, WAIT).expect("answered");
    assert_eq!(responses.len(), 1);
    responses.remove(0)
}

fn stdout_lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn cli_submit_prints_json_records_and_fails_on_errors() {
    let cluster = start(up(2));
    // Rules 1, 3, 6, 9: parameters, eval, the record's fields.
    let out = cluster.cli(&["submit", "--param", "a=1", "--param", "b=2", "a+b"]);
    assert!(out.status.success(), "{out:?}");
    let records = stdout_lines(&out);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r["ret"], 3);
    assert_eq!(r["mode"], "eval");
    assert_eq!(r["status"], "response received");
    assert_eq!(r["successful"], true);
    assert_eq!(r["parameters"], serde_json::json!({"a": 1, "b": 2}));
    assert!(r["server"] == 1 || r["server"] == 2);
    assert!(r["command_stop_time"].as_f64().unwrap() >= r["command_start_time"].as_f64().unwrap());
    // Rule 7: a failure names its exception and the CLI exits non-zero.
    let out = cluster.cli(&["submit", "import something"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r = &stdout_lines(&out)[0];
    assert_eq!(r["successful"], false);
    assert!(
        r["traceback"]
            .as_str()
            .unwrap()
            .contains("ModuleNotFoundError"),
        "{r}"
    );
    assert_eq!(r["mode"], "exec");
    assert_eq!(r["failure"], "raised");
    // Rule 7: a worker that exits says how, in its failure's kind.
    let out = cluster.cli(&["submit", "--target", "1", "import os; os._exit(3)"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r = &stdout_lines(&out)[0];
    assert_eq!(
        (&r["failure"], &r["worker_exit_code"], &r["worker_signal"]),
        (
            &serde_json::json!("worker_died"),
            &serde_json::json!(3),
            &serde_json::Value::Null
        ),
        "{r}"
    );
    // Rule 13: one request per target, in order.
    let out = cluster.cli(&[
        "submit",
        "--target",
        "2",
        "--target",
        "1",
        "import os; os.getpid()",
    ]);
    let records = stdout_lines(&out);
    let servers: Vec<_> = records
        .iter()
        .map(|r| r["server"].as_i64().unwrap())
        .collect();
    assert_eq!(servers, vec![2, 1]);
    // Rule 14: a bad target is a one-line error and a non-zero exit.
    let out = cluster.cli(&["submit", "--target", "7", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("target 7 is not a server rank"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // --no-wait prints the ids.
    let out = cluster.cli(&["submit", "--no-wait", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.trim().parse::<u64>().is_ok(), "{text}");
}

#[test]
fn cli_status_and_stop() {
    let mut cluster = start(up(2));
    let out = cluster.cli(&["status"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("RANK"), "{table}");
    assert!(table.contains("idle"), "{table}");
    let out = cluster.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["servers"].as_array().unwrap().len(), 2);
    // Rule 23: the fields of each server.
    for key in [
        "rank",
        "processor",
        "pid",
        "worker_pid",
        "busy",
        "command",
        "command_start_time",
        "timeout",
        "online",
        "last_ping",
        "rss",
    ] {
        assert!(
            status["servers"][0].get(key).is_some(),
            "no {key} in {status}"
        );
    }
    // Rule 27: stop services; the whole cluster exits, nothing left behind.
    let out = cluster.cli(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    assert!(cluster.assert_ends(WAIT).success());
    // Afterwards the CLI reports the cluster unreachable in one line.
    let out = cluster.cli(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

/// Rule 23: `status --watch` with its output piped prints a snapshot
/// after another, each a block (a line with the time and the servers by
/// state, the table, its summary) and a blank line, without escape
/// sequences; a command that runs shows its server busy, then idle again;
/// SIGINT ends it with success.
#[test]
fn rule_23_status_watch_follows_the_servers_until_interrupted() {
    let cluster = start(up(2));
    let mut watching = cluster.watch(&[]);
    // (rank, state) of each row: the lines between the column heads and
    // the summary.
    let rows = |snapshot: &str| -> Vec<(String, String)> {
        let lines: Vec<&str> = snapshot.lines().collect();
        lines[2..lines.len() - 1]
            .iter()
            .map(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                (cells[0].to_owned(), cells[4].to_owned())
            })
            .collect()
    };
    for _ in 0..2 {
        let snapshot = watching.next();
        let lines: Vec<&str> = snapshot.lines().collect();
        assert!(
            lines[0].contains("servers: 2 idle, 0 busy, 0 timed out, 0 offline; every 200ms"),
            "{snapshot}"
        );
        assert!(lines[1].starts_with("RANK"), "{snapshot}");
        assert_eq!(
            rows(&snapshot),
            [("1".into(), "idle".into()), ("2".into(), "idle".into())],
            "{snapshot}"
        );
        assert!(
            lines.last().unwrap().starts_with("2 servers, 0 queued"),
            "{snapshot}"
        );
        assert!(
            !snapshot.contains('\x1b'),
            "escape sequences in a pipe: {snapshot:?}"
        );
    }
    let c = cluster.client();
    let ids = c.submit(Submit::new("time.sleep(3)").targets([1])).unwrap();
    let end = Instant::now() + WAIT;
    let busy = loop {
        let snapshot = watching.next();
        if rows(&snapshot).contains(&("1".into(), "busy".into())) {
            break snapshot;
        }
        assert!(
            Instant::now() < end,
            "server 1 never showed busy: {snapshot}"
        );
    };
    assert!(
        busy.contains("servers: 1 idle, 1 busy, 0 timed out, 0 offline"),
        "{busy}"
    );
    assert!(
        busy.contains(&format!("#{} time.sleep(3)", ids[0])),
        "{busy}"
    );
    c.wait_timeout(&ids, WAIT).expect("answered");
    loop {
        let snapshot = watching.next();
        if rows(&snapshot) == [("1".into(), "idle".into()), ("2".into(), "idle".into())] {
            break;
        }
        assert!(Instant::now() < end, "server 1 stayed busy: {snapshot}");
    }
    kill(watching.pid(), Signal::SIGINT).unwrap();
    let status = watching
        .child
        .wait_timeout(WAIT)
        .expect("status --watch ends on SIGINT");
    let stderr = process::collect(watching.stderr);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
}

/// Rule 23: `status --watch --json` prints one JSON object per snapshot
/// and line; when the cluster goes away it exits with status 2 and one
/// line on stderr saying so.
#[test]
fn rule_23_status_watch_says_when_the_cluster_is_gone() {
    let mut cluster = start(up(1));
    let watching = cluster.watch(&["--json"]);
    let mut times = Vec::new();
    for _ in 0..2 {
        let line = watching.next();
        let snapshot: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        assert_eq!(snapshot["servers"][0]["rank"], 1, "{snapshot}");
        assert_eq!(
            snapshot["servers"].as_array().unwrap().len(),
            1,
            "{snapshot}"
        );
        times.push(snapshot["time"].as_f64().expect("a time"));
    }
    assert!(times[1] > times[0], "{times:?}");
    let out = cluster.cli(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    assert!(cluster.assert_ends(WAIT).success());
    let mut watching = watching;
    let status = watching
        .child
        .wait_timeout(WAIT)
        .expect("status --watch ends");
    let stderr = process::collect(watching.stderr);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "casa-node: error: the cluster at {} is gone",
            cluster.endpoint()
        )),
        "{stderr}"
    );
}

/// A running `casa-node status --watch`: its snapshots (blocks of lines
/// ended by a blank line, or lines with `--json`) read on a thread of
/// their own, and its stderr; killed by PID should the test end first.
struct Watching {
    child: ChildGuard,
    snapshots: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Watching {
    /// The next snapshot.
    fn next(&self) -> String {
        self.snapshots
            .recv_timeout(WAIT)
            .expect("status --watch printed a snapshot")
    }

    fn pid(&self) -> Pid {
        self.child.pid()
    }
}

#[test]
fn cli_refuses_bad_input_in_one_line() {
    for args in [
        &["submit", "--no-such-flag", "1"][..],
        &["up", "--servers", "many"],
        &["submit", "--param", "a", "1"],
        &["submit", "--param", "a=flagdata", "1"],
        &["submit", "--endpoint", "http://x", "1"],
        &["up", "--heartbeat", "-1"],
        &["up", "--log-max-size", "10X"],
        &["run", "--log-max-size", "1.5M", "script.py"],
        &["up", "--log-keep", "0"],
        &["up", "--log-keep", "many"],
        &["up", "--init", "/nonexistent/init.py"],
        &["status", "--endpoint", "unix:///nonexistent/casa.sock"],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("casa-node: error: "), "{args:?}: {err}");
    }
    // A bad size names the option and what it takes, from the command
    // line or the environment.
    for (args, env) in [
        (&["up", "--log-max-size", "10X"][..], None),
        (&["up"][..], Some("10X")),
    ] {
        let out = Command::new(BIN)
            .args(args)
            .envs(env.map(|v| ("CASA_NODE_LOG_MAX_SIZE", v)))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("--log-max-size") && err.contains("\"10X\" is not a size in bytes"),
            "{err}"
        );
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("casa-node "));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Examples:"));
}

#[test]
fn mpi_outside_a_launcher_says_how_to_start_in_one_line() {
    // Without mpirun the MPI world has one process (or, in a build without
    // MPI, there is no MPI at all): either way one clear line, exit 2.
    let dir = std::env::temp_dir().join(format!("casa-node-e2e-nompi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(BIN)
        .args(["--transport", "mpi", "up", "--log-file"])
        .arg(dir.join("log"))
        .env("XDG_RUNTIME_DIR", &dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("casa-node: error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    if cfg!(feature = "mpi") {
        assert!(line.contains("the MPI world has 1 process"), "{line}");
        assert!(line.contains("mpirun -n N"), "{line}");
    } else {
        assert!(line.contains("--features mpi"), "{line}");
    }
}

#[test]
fn rules_2_to_7_commands_parameters_and_globals() {
    /// Removes the start-up script when the test ends, passed or failed.
    struct Init(PathBuf);
    impl Drop for Init {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let init = Init(std::env::temp_dir().join(format!("casa-node-init-{}.py", std::process::id())));
    std::fs::write(&init.0, "def hello():\n    return 'hi from init'\n").unwrap();
    let cluster = start(up(1).args(["--init", init.0.to_str().unwrap()]));
    let c = cluster.client();
    // Rule 5: the start-up script ran in the worker's namespace.
    assert_eq!(
        one(&c, Submit::new("hello()")).ret,
        Some(Value::from("hi from init"))
    );
    // Rule 26: the worker runs in the client's working directory.
    let cwd = one(&c, Submit::new("os.getcwd()")).ret.unwrap();
    assert_eq!(
        String::try_from(&cwd).unwrap(),
        cluster.dir().canonicalize().unwrap().display().to_string()
    );
    // Rule 5: os, sys and time are there; globals persist.
    assert_eq!(
        one(&c, Submit::new("sys.version_info[0]")).ret,
        Some(Value::from(3))
    );
    let r = one(&c, Submit::new("x = 41"));
    assert_eq!(
        (r.mode(), r.ret.clone()),
        (CommandMode::Exec, Some(Value::none()))
    );
    assert_eq!(one(&c, Submit::new("x + 1")).ret, Some(Value::from(42)));
    // Rule 3: parameters are removed afterwards; push keeps them.
    assert_eq!(
        one(&c, Submit::new("p * 2").param("p", 21)).ret,
        Some(Value::from(42))
    );
    let r = one(&c, Submit::new("p"));
    assert!(!r.successful && r.traceback().contains("NameError"));
    one(&c, Submit::new("push").param("kept", "yes"));
    assert_eq!(one(&c, Submit::new("kept")).ret, Some(Value::from("yes")));
    // Rule 4: f() is called with the parameters as keyword arguments.
    one(
        &c,
        Submit::new("def f(vis, mode='x'): return vis + ':' + mode"),
    );
    let r = one(
        &c,
        Submit::new("f()")
            .param("vis", "a.ms")
            .param("mode", "summary"),
    );
    assert_eq!(r.ret, Some(Value::from("a.ms:summary")));
    // Rule 7: a task returning False is successful.
    let r = one(&c, Submit::new("False"));
    assert!(r.successful);
    // Rule 8: values come back as they went.
    let v = Value::dict([
        (
            Value::tuple([Value::from(1), Value::from("a")]),
            Value::list([Value::from(f64::INFINITY), Value::bytes(b"\x00".to_vec())]),
        ),
        (Value::from(u64::MAX), Value::complex(1.0, -2.0)),
    ]);
    let r = one(&c, Submit::new("v").param("v", v.clone()));
    assert_eq!(r.ret, Some(v));
    // Rule 8: a value nested deeper than protobuf decoders allow travels
    // pickled, and the worker keeps its globals.
    one(
        &c,
        Submit::new("deep = []\nfor _ in range(60): deep = [deep]"),
    );
    let r = one(&c, Submit::new("deep"));
    assert!(r.successful, "{r:?}");
    assert!(matches!(
        r.ret.and_then(|v| v.kind),
        Some(casa_node_protocol::pb::value::Kind::PickleValue(_))
    ));
    assert_eq!(one(&c, Submit::new("len(deep)")).ret, Some(Value::from(1)));
    // Rule 2: a command that is neither an expression nor statements is
    // rejected at submission, naming its SyntaxError.
    match c
        .submit(Submit::new("1 +* 2"))
        .and_then(|ids| c.wait_timeout(&ids, WAIT))
    {
        Err(ClientError::Rejected { reason, message }) => {
            assert_eq!(reason, RejectReason::InvalidCommand);
            assert!(message.contains("SyntaxError"), "{message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn rules_11_to_17_ids_targets_and_waiting() {
    let cluster = start(up(2));
    let c = cluster.client();
    // Rule 15: the seed's busy-target example.
    let first = c
        .submit(Submit::new("time.sleep(1); test_bs = 1").targets([1]))
        .unwrap();
    let pair = c
        .submit(Submit::new("test_bs + 1").targets([1, 2]))
        .unwrap();
    // Rule 11: ids unique, increasing within one connection's pushes.
    assert!(pair[0] > first[0] && pair[1] > pair[0]);
    // Rule 17: without blocking, only what has arrived.
    let got = c.wait_timeout(&[pair[1]], WAIT).unwrap();
    assert!(got[0].traceback().contains("NameError"));
    assert!(c.poll(&[pair[0]]).unwrap().is_empty(), "A is still busy");
    let track = c.track(&[pair[0]]).unwrap();
    assert_eq!(track.states[0].status(), CommandStatus::HoldingQueue);
    // Rule 16: blocking returns all, in id order.
    let both = c.wait_timeout(&pair, WAIT).unwrap();
    assert_eq!(both[0].ret, Some(Value::from(2)));
    assert_eq!(both.iter().map(|r| r.id).collect::<Vec<_>>(), pair);
    // Rule 14: bad and timed-out targets reject the whole push; the
    // rejection arrives as the ids' responses, and waiting returns it.
    match c
        .submit(Submit::new("1").targets([1, 9]))
        .and_then(|ids| c.wait_timeout(&ids, WAIT))
    {
        Err(ClientError::Rejected { reason, .. }) => {
            assert_eq!(reason, RejectReason::UnknownTarget)
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // Rule 17: an unknown id is an error.
    assert!(matches!(c.poll(&[9999]), Err(ClientError::UnknownId(9999))));
    // Rule 12: untargeted work spreads over free servers.
    let ids: Vec<u64> = (0..6)
        .flat_map(|_| {
            c.submit(Submit::new("time.sleep(0.2); os.getpid()"))
                .unwrap()
        })
        .collect();
    let responses = c.wait_timeout(&ids, WAIT).unwrap();
    let servers: std::collections::BTreeSet<i32> = responses.iter().map(|r| r.server).collect();
    assert_eq!(servers.len(), 2, "{servers:?}");
}

/// Rules 3 and 9 with a parameter larger than the ZeroMQ transport's byte
/// budget per peer (64 MiB): it reaches the server behind the pings, its
/// value comes back as the return value, and the response record carries
/// both; the other server, and a second large request to the same server,
/// go on meanwhile. (It used to end with "server n# 1 disconnected" and a
/// timeout.) The server timeout is 10 s: how long a ping may wait behind
/// a large value is the subject of
/// `pings_are_answered_while_a_512_mib_value_crosses`, and this debug build
/// copying 80 MiB values while other tests load both cores once went 3 s
/// without a ping answer under MPI.
#[test]
fn a_parameter_larger_than_the_byte_budget_goes_there_and_back() {
    const LEN: usize = 80 << 20;
    let cluster = start(up(2).timeout(10));
    cluster.note_pids();
    let c = cluster.client();
    let data: Vec<u8> = (0..LEN)
        .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
        .collect();
    let large = Value::bytes(data);
    let started = Instant::now();
    let small = c
        .submit(Submit::new("(time.sleep(0.5), 'small')[1]").targets([2]))
        .unwrap();
    let echo = c
        .submit(Submit::new("x").param("x", large.clone()).targets([1]))
        .unwrap();
    let length = c
        .submit(Submit::new("len(y)").param("y", large.clone()).targets([1]))
        .unwrap();
    let mut responses = c
        .wait_timeout(&[small[0], echo[0], length[0]], WAIT)
        .expect("answered");
    eprintln!(
        "two {} MiB requests and their answers in {:?}",
        LEN >> 20,
        started.elapsed()
    );
    let length = responses.pop().unwrap();
    let echo = responses.pop().unwrap();
    let small = responses.pop().unwrap();
    for r in [&small, &echo, &length] {
        assert!(
            r.successful && r.status() == CommandStatus::ResponseReceived,
            "request {} on server n# {}: {:?} {}",
            r.id,
            r.server,
            r.status(),
            r.traceback()
        );
    }
    assert_eq!(small.ret, Some(Value::from("small")));
    assert_eq!(length.ret, Some(Value::from(LEN as i64)));
    assert_eq!(echo.parameters.len(), 1);
    assert_eq!(echo.parameters[0].value.as_ref(), Some(&large));
    assert!(echo.ret == Some(large), "the return value differs");
    let log = cluster.log();
    for trouble in ["disconnected", "timed out", "not responding"] {
        assert!(!log.contains(trouble), "the log says {trouble:?}:\n{log}");
    }
    assert_eq!(
        c.status(None)
            .unwrap()
            .servers
            .iter()
            .filter(|s| s.online)
            .count(),
        2
    );
}

/// Server n# 2's pings stay answered while a 512 MiB parameter goes to
/// server n# 1 and comes back in its response record: the nodes encode and
/// decode such frames, and ZeroMQ copies them, away from the thread of the
/// event loop. With a heartbeat of 0.2 s, the largest gap between two of
/// server n# 2's answered pings, as the head node records them, stays
/// under 3 s over ZeroMQ (it is 4-5 s when all that work shares the
/// loop's thread, and 0.2 to 1 s on an idle machine; up to 2.5 s was seen
/// while a full test run shared the two cores); under MPI, server n# 2 is
/// never timed out.
#[test]
fn pings_are_answered_while_a_512_mib_value_crosses() {
    const LEN: usize = 512 << 20;
    // Pings to server n# 1 wait behind the large frame on its link, so the
    // cluster's timeout leaves room for the frame's copies on a loaded
    // machine; server n# 2's pings, on a link of their own, must never wait
    // as long as a 3 s timeout. Under MPI each rank's progress thread spins
    // while a large message is in flight, and on a machine of two cores
    // that alone holds the other threads back for seconds, however the
    // nodes share their work (1.5 to 5.6 s seen): there the test holds
    // server n# 2 to the cluster's timeout only.
    let gap_limit = (!over_mpi()).then_some(3.0);
    let cluster = start(up(2).timeout(10));
    let watcher = cluster.client();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = {
        let done = done.clone();
        std::thread::spawn(move || {
            // (largest gap between consecutive pings, ever timed out, pings seen)
            let (mut gap, mut timed_out, mut seen) = (0.0f64, false, 0usize);
            let mut last: Option<f64> = None;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let s = watcher.status(Some(2)).unwrap().servers.remove(0);
                timed_out |= s.timeout || !s.online;
                if s.last_ping > 0.0 && last.is_none_or(|l| s.last_ping > l) {
                    if let Some(l) = last {
                        gap = gap.max(s.last_ping - l);
                    }
                    last = Some(s.last_ping);
                    seen += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (gap, timed_out, seen)
        })
    };
    let c = cluster.client();
    let large = Value::bytes(vec![0x5a; LEN]);
    let started = Instant::now();
    let r = one(&c, Submit::new("len(x)").param("x", large).targets([1]));
    let crossed = started.elapsed();
    // A few more heartbeats after the value is back.
    std::thread::sleep(Duration::from_millis(600));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (gap, timed_out, seen) = watching.join().unwrap();
    eprintln!(
        "512 MiB there and back in {crossed:?}; largest gap between server n# 2's pings: {gap:.3} s ({seen} pings seen)"
    );
    let log = cluster.log();
    assert!(r.successful, "{:?}: {}\n{log}", r.status(), r.traceback());
    assert_eq!(r.ret, Some(Value::from(LEN as i64)));
    assert_eq!(r.parameters.len(), 1, "the parameter comes back");
    assert!(!timed_out, "server n# 2 was marked timed out");
    assert!(seen > 2, "too few pings seen: {seen}");
    if let Some(limit) = gap_limit {
        assert!(
            gap < limit,
            "server n# 2's pings went unanswered for {gap:.3} s"
        );
    }
    for trouble in ["timed out", "not responding", "Timeout"] {
        assert!(!log.contains(trouble), "the log says {trouble:?}:\n{log}");
    }
}

/// What a worker reports after filling a 64 MiB `bytearray`: its
/// `GLIBC_TUNABLES`, and how many KiB of its memory are huge pages.
fn huge_pages_in_worker(cluster: &Cluster) -> (Option<String>, i64) {
    let c = cluster.client();
    let fill = one(
        &c,
        Submit::new(
            "b = bytearray(64 << 20)\n\
             b[::4096] = b'\\x01' * (len(b) // 4096)\n\
             huge = [int(l.split()[1]) for l in open('/proc/self/smaps_rollup')\n\
                     if l.startswith('AnonHugePages:')][0]\n\
             tunables = os.environ.get('GLIBC_TUNABLES')",
        ),
    );
    assert!(fill.successful, "{}", fill.traceback());
    let answer = one(&c, Submit::new("[tunables, huge]")).ret.unwrap();
    let items = Vec::<Value>::try_from(&answer).expect("a list");
    let [tunables, huge] = &items[..] else {
        panic!("not two items: {items:?}")
    };
    let tunables = String::try_from(tunables).ok();
    let huge = i64::try_from(huge).expect("an int");
    (tunables, huge)
}

/// Large buffers live in transparent huge pages (`casa_node::tuning`): the
/// nodes start themselves with glibc's `glibc.malloc.hugetlb=1` (under
/// mpirun too), workers inherit it, and a worker's 64 MiB buffer is then mostly huge pages
/// when the kernel offers them on request. A tunable set by the user, here
/// `glibc.malloc.hugetlb=0`, is kept, and the same buffer gets none.
#[test]
fn large_buffers_get_huge_pages_unless_turned_off() {
    let on_request = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|mode| mode.contains("[madvise]") || mode.contains("[always]"));
    let always = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|mode| mode.contains("[always]"));
    let cluster = start(up(1));
    let (tunables, huge) = huge_pages_in_worker(&cluster);
    assert_eq!(tunables.as_deref(), Some("glibc.malloc.hugetlb=1"));
    let server_node = std::fs::read(format!("/proc/{}/environ", cluster.server_pid(1).0)).unwrap();
    assert!(
        server_node
            .split(|&b| b == 0)
            .any(|var| var == b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1"),
        "the server node runs without the tunable"
    );
    if on_request {
        assert!(huge >= 32 << 10, "only {huge} KiB of huge pages");
    } else {
        eprintln!("transparent huge pages are off on this machine: only the tunable is checked");
    }
    drop(cluster);

    let cluster = start(up(1).env("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0"));
    let (tunables, huge) = huge_pages_in_worker(&cluster);
    assert_eq!(tunables.as_deref(), Some("glibc.malloc.hugetlb=0"));
    if on_request && !always {
        assert!(
            huge < 32 << 10,
            "{huge} KiB of huge pages though turned off"
        );
    }
}

#[test]
fn rules_19_to_21_a_stopped_server_times_out_and_recovers() {
    let cluster = start(up(2));
    cluster.note_pids();
    let c = cluster.client();
    let (server, _) = cluster.server_pid(2);
    let ids = c
        .submit(Submit::new("(time.sleep(1), 'done')[1]").targets([2]))
        .unwrap();
    kill(Pid::from_raw(server as i32), Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    // Rule 20: timed out, the request answered with status timeout.
    let r = c.wait_timeout(&ids, WAIT).unwrap().remove(0);
    let detected = stopped.elapsed();
    assert_eq!(r.status(), CommandStatus::Timeout);
    assert!(r.traceback().contains("Timeout"));
    eprintln!("stopped server detected after {detected:?} (heartbeat 0.2 s, timeout 3 s)");
    let status = c.status(Some(2)).unwrap().servers.remove(0);
    assert!(status.timeout && !status.online);
    match c
        .submit(Submit::new("1").targets([2]))
        .and_then(|ids| c.wait_timeout(&ids, WAIT))
    {
        Err(ClientError::Rejected { reason, .. }) => {
            assert_eq!(reason, RejectReason::TargetTimedOut)
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // Rule 21: it recovers, and its real response replaces the timeout.
    kill(Pid::from_raw(server as i32), Signal::SIGCONT).unwrap();
    let end = Instant::now() + WAIT;
    loop {
        let r = c.poll(&ids).unwrap().remove(0);
        if r.status() == CommandStatus::ResponseReceived {
            assert_eq!(r.ret, Some(Value::from("done")));
            break;
        }
        assert!(Instant::now() < end, "no recovery");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(c.status(Some(2)).unwrap().servers[0].online);
}

#[test]
fn stop_services_ends_the_cluster_while_a_server_hangs() {
    // A server that never answers again (stopped, not dead) must not keep
    // the cluster from ending: over ZeroMQ `up` kills its child, over MPI
    // rank 0 gives up waiting for it in MPI_Finalize and mpirun ends the job.
    let mut cluster = start(up(2));
    cluster.note_pids();
    let c = cluster.client();
    let (server, _) = cluster.server_pid(2);
    kill(Pid::from_raw(server as i32), Signal::SIGSTOP).unwrap();
    let end = Instant::now() + WAIT;
    while !c.status(Some(2)).unwrap().servers[0].timeout {
        assert!(Instant::now() < end, "the server never timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(one(&c, Submit::new("1+1").targets([1])).successful);
    c.stop(false).unwrap();
    let stopped = Instant::now();
    let status = cluster.wait_exit(Duration::from_secs(90));
    assert!(status.is_some(), "the cluster hangs on a hung server");
    eprintln!("ended {:?} after stop services", stopped.elapsed());
    cluster.assert_nothing_left();
}

#[test]
fn rule_22_debugging_mode_keeps_a_stopped_server_online() {
    let cluster = start(up(1));
    let c = cluster.client();
    let (server, _) = cluster.server_pid(1);
    c.set_debugging(true).unwrap();
    kill(Pid::from_raw(server as i32), Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let id = c.submit(Submit::new("1").targets([1])).unwrap();
    // More than two timeouts pass with the server stopped; it stays online.
    while started.elapsed() < Duration::from_secs(7) {
        assert!(c.poll(&id).unwrap().is_empty());
        assert!(c.status(Some(1)).unwrap().servers[0].online);
    }
    kill(Pid::from_raw(server as i32), Signal::SIGCONT).unwrap();
    assert!(c.wait_timeout(&id, WAIT).unwrap()[0].successful);
}

#[test]
fn rule_24_deadline_and_cancel_interrupt_the_worker() {
    let cluster = start(up(1));
    let c = cluster.client();
    let r = one(
        &c,
        Submit::new("while True: pass").deadline(Duration::from_millis(500)),
    );
    assert_eq!(r.status(), CommandStatus::Timeout);
    assert!(r.traceback().contains("deadline"), "{}", r.traceback());
    let ids = c.submit(Submit::new("time.sleep(60)")).unwrap();
    while c.track(&ids).unwrap().states[0].status() != CommandStatus::RequestSent {}
    let reply = c.cancel(&ids).unwrap();
    assert_eq!(reply.interrupting, ids);
    let r = c.wait_timeout(&ids, WAIT).unwrap().remove(0);
    assert_eq!(r.status(), CommandStatus::Cancelled);
    assert!(
        r.traceback().contains("KeyboardInterrupt"),
        "{}",
        r.traceback()
    );
    // Globals survive an interrupt.
    one(&c, Submit::new("y = 5"));
    assert_eq!(one(&c, Submit::new("y")).ret, Some(Value::from(5)));
}

#[test]
fn rule_24_a_deadline_counts_from_the_start_of_the_command_not_during_the_init_script() {
    /// Removes the start-up script when the test ends, passed or failed.
    struct Init(PathBuf);
    impl Drop for Init {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let init =
        Init(std::env::temp_dir().join(format!("casa-node-slow-init-{}.py", std::process::id())));
    std::fs::write(&init.0, "import time\ntime.sleep(3)\ninit_done = True\n").unwrap();
    // The front door opens once the servers have started, while their
    // workers still run the init script.
    let cluster = start(up(1).args(["--init", init.0.to_str().unwrap()]));
    let c = cluster.client();
    let r = one(
        &c,
        Submit::new("(time.sleep(0.5), init_done)[1]").deadline(Duration::from_secs(2)),
    );
    assert!(r.successful, "{:?}: {}", r.status(), r.traceback());
    assert_eq!(r.ret, Some(Value::from(true)));
}

#[test]
fn rule_25_a_dead_worker_fails_its_command_and_a_fresh_one_serves() {
    let cluster = start(up(1));
    let c = cluster.client();
    for (how, expect) in [
        ("import ctypes; ctypes.string_at(0)", "SIGSEGV"),
        ("os._exit(3)", "exit"),
        ("os.kill(os.getpid(), 9)", "SIGKILL"),
    ] {
        one(&c, Submit::new("g = 1"));
        let r = one(&c, Submit::new(how));
        assert!(!r.successful, "{how}");
        assert!(r.worker_restarted, "{how}");
        assert!(r.traceback().contains(expect), "{how}: {}", r.traceback());
        // The next command succeeds on a fresh worker, without the globals.
        assert!(one(&c, Submit::new("1+1")).successful);
        assert!(!one(&c, Submit::new("g")).successful);
    }
}

#[test]
fn rule_26_and_31_32_the_unified_log() {
    let mut cluster = start(up(2));
    let c = cluster.client();
    one(
        &c,
        Submit::new("print('hello from the worker')").targets([1]),
    );
    one(&c, Submit::new("1/0").targets([2]));
    c.stop(false).unwrap();
    assert!(cluster.assert_ends(WAIT).success());
    let log = cluster.log();
    // Rule 29: the start-up line names the transport, and for MPI the
    // version, the library and the thread level granted.
    let transport: &[&str] = if over_mpi() {
        &["transport mpi: rank 0 of 3", "MPI ", "thread level "]
    } else {
        &["transport zmq at ipc://"]
    };
    for expected in transport.iter().copied().chain([
        "head node with rank 0 at",
        "Server with rank 1 started at",
        "Server with rank 2 started at",
        "sent to server n# 1",
        "successfully handled by server n# 1",
        "failed in server n# 2 with traceback",
        ":server-1 hello from the worker",
        "ZeroDivisionError",
    ]) {
        assert!(log.contains(expected), "no {expected:?} in the log:\n{log}");
    }
}

#[test]
fn rule_30_killing_the_head_node_leaves_nothing_behind() {
    let mut cluster = start(up(2));
    let noted = cluster.note_pids();
    assert!(noted.len() >= 4, "servers and workers: {noted:?}");
    if over_mpi() {
        // The head node is rank 0, below mpirun beside the servers.
        let servers: Vec<Pid> = cluster
            .client()
            .status(None)
            .unwrap()
            .servers
            .iter()
            .map(|s| Pid::from_raw(s.pid as i32))
            .collect();
        kill(cluster.head_node(&servers), Signal::SIGKILL).unwrap();
        assert!(cluster.wait_exit(WAIT).is_some(), "mpirun ends");
    } else {
        cluster.kill();
    }
    let left = cluster.left_behind(EXIT_BOUND);
    assert!(
        left.is_empty(),
        "processes outlived the head node: {left:?}"
    );
}

#[test]
fn rule_31_log_level_changes_at_run_time() {
    let mut cluster = start(up(1).args(["--log-level", "debug"]));
    let c = cluster.client();
    c.set_log_level(LogLevel::Error, &[]).unwrap();
    one(&c, Submit::new("print('quiet please')"));
    c.set_log_level(LogLevel::Info, &[1]).unwrap();
    one(&c, Submit::new("print('loud again')"));
    one(
        &c,
        Submit::new("import logging; logging.getLogger('casa').debug('not at info')"),
    );
    c.set_log_level(LogLevel::Debug, &[1]).unwrap();
    one(
        &c,
        Submit::new("logging.getLogger('casa').debug('python debug record')"),
    );
    c.stop(false).unwrap();
    assert!(cluster.assert_ends(WAIT).success());
    let log = cluster.log();
    assert!(!log.contains("quiet please"), "{log}");
    assert!(log.contains("loud again"), "{log}");
    assert!(!log.contains("not at info"), "{log}");
    assert!(log.contains("python debug record"), "{log}");
}

#[test]
fn rule_31_the_log_file_rotates_at_its_max_size() {
    const MAX: usize = 2048;
    const COMMANDS: usize = 40;
    let mut cluster = start(up(1).args(["--log-max-size", "2K", "--log-keep", "2"]));
    let c = cluster.client();
    // Three lines of about 100 bytes each: sent, printed, handled; the
    // whole is several times what three files hold.
    for i in 0..COMMANDS {
        one(&c, Submit::new(format!("print('command {i}')")));
    }
    c.stop(false).unwrap();
    assert!(cluster.assert_ends(WAIT).success());
    let log = cluster.dir().join("casa-node.log");
    let numbered = |n: usize| PathBuf::from(format!("{}.{n}", log.display()));
    assert!(!numbered(3).exists(), "more than 2 old log files kept");
    for path in [numbered(2), numbered(1), log] {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            !text.is_empty() && text.len() <= MAX,
            "{} has {} bytes",
            path.display(),
            text.len()
        );
        assert!(text.ends_with('\n'), "{} ends mid-line", path.display());
        for line in text.lines() {
            assert!(
                line.len() > 24 && line.as_bytes()[..4].iter().all(u8::is_ascii_digit),
                "{}: a line without its time: {line:?}",
                path.display()
            );
        }
    }
    let last = format!(":server-1 command {}\n", COMMANDS - 1);
    assert!(cluster.log().contains(&last), "{}", cluster.log());
}

#[test]
fn the_front_door_refuses_garbage_and_keeps_serving() {
    let cluster = start(up(1));
    // Garbage gets a ProtocolError; a message other than Hello first gets
    // one too, and the connection closes.
    let mut raw = RawDriver::connect(&cluster.socket());
    raw.send_bytes(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    let reply = raw.reply();
    assert!(matches!(reply, Body::Error(_)), "{reply:?}");
    raw.send(Body::StatusRequest(StatusRequest::default()));
    let reply = raw.reply();
    assert!(matches!(reply, Body::Error(_)), "{reply:?}");
    assert!(raw.closed(), "closed after the refusal");
    // Other drivers are served all along.
    let c = cluster.client();
    assert!(one(&c, Submit::new("1")).successful);
}

#[test]
fn a_server_attached_with_connect_joins_and_serves() {
    if over_mpi() {
        eprintln!("MPI: the world is fixed at start; servers attach over ZeroMQ only");
        return;
    }
    let mut cluster = start(up(1));
    let nodes = cluster.nodes().expect("nodes: over ZeroMQ");
    assert!(nodes.starts_with("ipc://"), "{nodes}");
    let mut extra = attach(nodes, &["--patience", "3"]);
    let c = cluster.client();
    let end = Instant::now() + WAIT;
    while c
        .status(None)
        .unwrap()
        .servers
        .iter()
        .filter(|s| s.online)
        .count()
        < 2
    {
        assert!(
            Instant::now() < end,
            "the attached server never came online"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.note_pids();
    let r = one(&c, Submit::new("os.getpid()").targets([2]));
    assert!(r.successful && r.server == 2);
    c.stop(false).unwrap();
    assert!(cluster.assert_ends(WAIT).success());
    assert!(extra.wait_timeout(WAIT).is_some_and(|s| s.success()));
}

/// SIGKILLs the head node of `first` (its servers attached by hand go
/// on) and starts `again` in its place (rule 33).
fn killed_and_started_again(first: Cluster, again: Launch) -> Cluster {
    first.signal(Signal::SIGKILL);
    drop(first);
    start(again)
}

/// A directory that outlives the clusters of a test (a journal, files a
/// command writes), removed at the end of the test, passed or failed.
struct Kept(PathBuf);

impl Kept {
    fn new(name: &str) -> Kept {
        let dir = std::env::temp_dir().join(format!("casa-node-e2e-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Kept(dir)
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rule 33: `casa-node submit` waiting for its response when the head
/// node dies finds the head node started again from its journal, claims
/// its request there, and prints the response as if nothing had happened;
/// `casa-node get` prints it again by its id.
#[test]
fn cli_submit_waits_through_a_head_node_restarted_from_its_journal() {
    if over_mpi() {
        eprintln!("MPI: the fault suite restarts the job with its journal");
        return;
    }
    let keep = Kept::new("journal");
    let journal = keep.0.join("journal");
    let options = ["--journal", journal.to_str().unwrap()];
    let first = start(up(1).args(options));
    let dir = first.dir().to_owned();
    let mut cli = ChildGuard(
        first
            .command(&["submit", "--target", "1", "time.sleep(1.5) or 7"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the CLI runs"),
    );
    // Once server 1 runs the command, the head node dies.
    let c = first.client();
    wait_busy(&c, 1);
    drop(c);
    first.signal(Signal::SIGKILL);
    drop(first);
    let stdout = process::drain(cli.0.stdout.take().unwrap());
    let stderr = process::drain(cli.0.stderr.take().unwrap());
    let second = start(up(1).dir(dir).args(options));
    let Some(status) = cli.wait_timeout(WAIT) else {
        panic!("the CLI still waits: {}", process::collect(stderr));
    };
    let stderr = process::collect(stderr);
    assert!(status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = process::collect(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["ret"], 7, "{lines:?}");
    assert_eq!(lines[0]["status"], "response received", "{lines:?}");
    // Any driver gets it again by its id, from the journal's keeping.
    let id = lines[0]["id"].to_string();
    let again = second.cli(&["get", &id]);
    assert!(again.status.success(), "{again:?}");
    assert_eq!(stdout_lines(&again), lines);
    let unknown = second.cli(&["get", "987654"]);
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("knows no request with id 987654"),
        "{unknown:?}"
    );
    drop(second);
}

/// Rule 33: a server node attached with `--connect` keeps its worker and
/// the answer it owes when the head node dies, rejoins the head node
/// started again from its journal at the same place, and its answer
/// counts: the command ran once, and the same server serves on.
#[test]
fn an_attached_server_rejoins_a_head_node_restarted_from_its_journal() {
    if over_mpi() {
        eprintln!("MPI: the world is fixed at start; servers attach over ZeroMQ only");
        return;
    }
    let keep = Kept::new("rejoin");
    let journal = keep.0.join("journal");
    let runs = keep.0.join("runs");
    let dir = cluster::scratch("e2e");
    let nodes = format!("ipc://{}/nodes.sock", dir.display());
    let options = ["--journal", journal.to_str().unwrap(), "--nodes", &nodes];
    let first = start(up(1).dir(&dir).args(options));
    let mut attached = attach(&nodes, &["--patience", "60"]);
    let c = first.client();
    wait_online(&c, 2);
    let before = first.server_pid(2);
    let ids = c
        .submit(
            Submit::new("time.sleep(2) or open(path, 'a').write('ran\\n') and 99")
                .param("path", runs.to_str().unwrap())
                .targets([2]),
        )
        .unwrap();
    wait_busy(&c, 2);
    drop(c);
    let mut second = killed_and_started_again(first, up(1).dir(dir).args(options));
    let c = second.client();
    let claim = c.claim(&ids).unwrap();
    assert!(claim.unknown.is_empty(), "{claim:?}");
    let response = c.wait_timeout(&ids, WAIT).expect("answered").remove(0);
    assert_eq!(
        (response.ret.clone(), response.server),
        (Some(Value::from(99)), 2),
        "{response:?}\n{}",
        second.log()
    );
    let end = Instant::now() + WAIT;
    while !c.status(Some(2)).unwrap().servers[0].online {
        assert!(Instant::now() < end, "the rejoined server is not online");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        second.server_pid(2),
        before,
        "the server or its worker was replaced"
    );
    assert_eq!(
        one(&c, Submit::new("6*7").targets([2])).ret,
        Some(Value::from(42))
    );
    second.note_pids();
    c.stop(false).unwrap();
    assert!(second.assert_ends(WAIT).success());
    assert!(attached.wait_timeout(WAIT).is_some_and(|s| s.success()));
    // Services stop once every command ran: one run, not two.
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "ran\n",
        "the command ran again"
    );
}

/// Rule 33: a request the journal held, queued again for a server that
/// rejoined and then left before answering, waits for its rank again (for
/// the rest of its wait) rather than ending `server_lost`: another server
/// that takes the rank runs it.
#[test]
fn a_request_from_the_journal_waits_again_when_its_server_leaves_after_rejoining() {
    if over_mpi() {
        eprintln!("MPI: the world is fixed at start; servers attach over ZeroMQ only");
        return;
    }
    let keep = Kept::new("flap");
    let journal = keep.0.join("journal");
    let dir = cluster::scratch("e2e");
    let nodes = format!("ipc://{}/nodes.sock", dir.display());
    let options = ["--journal", journal.to_str().unwrap(), "--nodes", &nodes];
    let first = start(up(1).dir(&dir).args(options));
    // Server A is slow (its environment says so); B, which takes its
    // rank later, is not.
    let mut slow = ChildGuard(
        Command::new(BIN)
            .args(["server", "--connect", &nodes, "--patience", "60"])
            .env("CASA_NODE_E2E_SLOW", "600")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = first.client();
    wait_online(&c, 2);
    let ids = c
        .submit(
            Submit::new(
                "time.sleep(float(os.environ.get('CASA_NODE_E2E_SLOW', '0'))) or os.getpid()",
            )
            .targets([2]),
        )
        .unwrap();
    wait_busy(&c, 2);
    drop(c);
    let mut second = killed_and_started_again(first, up(1).dir(dir).args(options));
    let c = second.client();
    c.claim(&ids).unwrap();
    // A rejoins with its command running, then dies.
    wait_online(&c, 2);
    kill(slow.pid(), Signal::SIGKILL).unwrap();
    assert!(slow.wait_timeout(WAIT).is_some(), "server A ended");
    let mut fresh = attach(&nodes, &["--rank", "2", "--patience", "60"]);
    let response = c.wait_timeout(&ids, WAIT).expect("answered").remove(0);
    assert!(
        response.successful && response.server == 2,
        "{response:?}\n{}",
        second.log()
    );
    let pid = response.ret.as_ref().and_then(|v| i64::try_from(v).ok());
    assert!(pid.is_some_and(|p| p > 0), "{response:?}");
    assert!(
        second.log().contains("waits again for server n# 2"),
        "{}",
        second.log()
    );
    second.note_pids();
    c.stop(false).unwrap();
    assert!(second.assert_ends(WAIT).success());
    assert!(fresh.wait_timeout(WAIT).is_some_and(|s| s.success()));
}

/// Rules 27, 33: a server attached by hand does not wait to rejoin a
/// head node that stopped at once (two SIGTERMs while a command runs):
/// it was told to stop, and leaves when the link closes.
#[test]
fn an_attached_server_leaves_with_a_head_node_stopped_at_once() {
    if over_mpi() {
        eprintln!("MPI: the world is fixed at start; servers attach over ZeroMQ only");
        return;
    }
    let mut cluster = start(up(1));
    let mut attached = attach(cluster.nodes().expect("nodes: over ZeroMQ"), &[]);
    let c = cluster.client();
    wait_online(&c, 2);
    let end = Instant::now() + WAIT;
    cluster.note_pids();
    c.submit(Submit::new("time.sleep(60)").targets([2]))
        .unwrap();
    wait_busy(&c, 2);
    let up = cluster.pid();
    kill(up, Signal::SIGTERM).unwrap();
    // The second once the first is seen (signals that come together count
    // as one).
    while !cluster
        .log()
        .contains("Sending stop service signal to all servers")
    {
        assert!(Instant::now() < end, "the first SIGTERM was not seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(up, Signal::SIGTERM).unwrap();
    assert!(cluster.wait_exit(WAIT).is_some(), "up did not exit");
    // Its patience is 600 s: leaving within seconds is leaving at once.
    assert!(
        attached.wait_timeout(Duration::from_secs(20)).is_some(),
        "the attached server waits to rejoin a head node that stopped"
    );
}

/// `casa-node server --connect nodes` with `args`, killed by PID if the
/// test ends first.
fn attach(nodes: &str, args: &[&str]) -> ChildGuard {
    ChildGuard(
        Command::new(BIN)
            .args(["server", "--connect", nodes])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits until server `rank` is online with its worker.
fn wait_online(c: &BlockingClient, rank: i32) {
    let end = Instant::now() + WAIT;
    while !c
        .status(None)
        .unwrap()
        .servers
        .iter()
        .any(|s| s.rank == rank && s.online && s.worker_pid != 0)
    {
        assert!(Instant::now() < end, "server {rank} never came online");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until server `rank` runs a command.
fn wait_busy(c: &BlockingClient, rank: i32) {
    let end = Instant::now() + WAIT;
    while !c.status(Some(rank)).unwrap().servers[0].busy {
        assert!(Instant::now() < end, "the command never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rule 20: a server node `up` started that dies (SIGKILL here) is reaped,
/// logged, and started again with its rank; it serves as a new server.
#[test]
fn a_server_node_of_up_that_dies_is_reaped_and_started_again() {
    if over_mpi() {
        eprintln!("MPI: mpirun starts the ranks, and a rank that dies ends the job");
        return;
    }
    let mut cluster = start(up(2));
    let c = cluster.client();
    let (dead, _) = cluster.server_pid(2);
    kill(Pid::from_raw(dead as i32), Signal::SIGKILL).unwrap();
    // Reaped: no zombie is left under `up`.
    assert!(
        wait_gone(Pid::from_raw(dead as i32), WAIT),
        "server node {dead} was not reaped"
    );
    let end = Instant::now() + WAIT;
    let again = loop {
        let s = c.status(Some(2)).unwrap().servers.remove(0);
        if s.online && s.pid != dead && s.worker_pid != 0 {
            break s;
        }
        assert!(
            Instant::now() < end,
            "server 2 was not started again: {s:?}\n{}",
            cluster.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    cluster.note_pids();
    let r = one(&c, Submit::new("os.getpid()").targets([2]));
    assert!(r.successful && r.server == 2, "{r:?}");
    assert_eq!(r.ret, Some(Value::from(i64::from(again.worker_pid))));
    let log = cluster.log();
    assert!(
        log.contains(&format!(
            "Server node n# 2 (PID {dead}) killed by signal 9 (SIGKILL)"
        )) && log.contains("; started again"),
        "{log}"
    );
    c.stop(false).unwrap();
    assert!(cluster.assert_ends(WAIT).success());
}

/// Rule 20: once `up` gives up starting its last server node again (it
/// ended within 10 s of its start three times in a row), no request is
/// left waiting for a server that will never come: those waiting are
/// answered, and new untargeted pushes refused.
#[test]
fn requests_waiting_when_up_gives_up_on_its_last_server_are_answered() {
    if over_mpi() {
        eprintln!("MPI: mpirun starts the ranks, and a rank that dies ends the job");
        return;
    }
    let mut cluster = start(up(1));
    let c = cluster.client();
    let mut dead = Vec::new();
    let mut ids = Vec::new();
    for life in 0..3 {
        let end = Instant::now() + WAIT;
        let pid = loop {
            let s = c.status(Some(1)).unwrap().servers.remove(0);
            if s.online && s.worker_pid != 0 && !dead.contains(&s.pid) {
                break s.pid;
            }
            assert!(
                Instant::now() < end,
                "server 1 was not started again: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        cluster.note_pids();
        if life == 2 {
            // Its last life: one command runs, more wait, sent ahead or
            // at the head node (accepted before the kill: confirmed,
            // and with their mode given, not checked first).
            ids.extend(c.submit(Submit::new("time.sleep(60)")).unwrap());
            wait_busy(&c, 1);
            for _ in 0..6 {
                let submit = Submit::new("1 + 1").mode(CommandMode::Eval);
                ids.extend(c.submit_confirmed(submit).unwrap());
            }
        }
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        assert!(
            wait_gone(Pid::from_raw(pid as i32), WAIT),
            "{pid} was not reaped"
        );
        dead.push(pid);
    }
    let responses = c
        .wait_timeout(&ids, WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log()));
    let running = &responses[0];
    assert_eq!(running.status(), CommandStatus::Timeout, "{running:?}");
    assert!(
        running.traceback().contains("disconnected while running"),
        "{running:?}"
    );
    for r in &responses[1..] {
        assert_eq!((r.status(), r.server), (CommandStatus::Timeout, 0), "{r:?}");
        assert!(r.traceback().contains("no server is left"), "{r:?}");
    }
    match c.submit_confirmed(Submit::new("1 + 1")) {
        Err(ClientError::Rejected { reason, message }) => {
            assert_eq!(reason, RejectReason::NoServers);
            assert!(message.contains("has left for good"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?} after {ids:?}"),
    }
    let log = cluster.log();
    assert!(
        log.contains("not started again") && log.contains("No server is left"),
        "{log}"
    );
    c.stop(false).unwrap();
    assert!(cluster.assert_ends(WAIT).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_31_a_driver_subscribes_to_the_log() {
    let cluster = tokio::task::spawn_blocking(|| start(up(1))).await.unwrap();
    let c = casa_node::client::Client::connect(&cluster.endpoint())
        .await
        .unwrap();
    let mut logs = c.subscribe_logs(LogLevel::Info).await.unwrap();
    let ids = c
        .submit(Submit::new("print('to the subscriber')"))
        .await
        .unwrap();
    c.wait_timeout(&ids, WAIT).await.unwrap();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|m: &String| m.contains("to the subscriber"))
    {
        let record = tokio::time::timeout(WAIT, logs.recv())
            .await
            .unwrap()
            .unwrap();
        seen.push(format!("{} {}", record.origin, record.message));
    }
    assert!(
        seen.iter()
            .any(|m| m.contains(":head Command request with id# 1 sent")),
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|m| m.contains(":server-1 to the subscriber")),
        "{seen:#?}"
    );
    drop(c);
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

#[test]
fn run_names_the_package_to_install_when_protobuf_is_missing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("casa-node-noproto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A Python without site-packages, hence without protobuf.
    let python = dir.join("bare-python");
    std::fs::write(&python, "#!/bin/sh\nexec python3 -S \"$@\"\n").unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.join("script.py");
    std::fs::write(&script, "print('never runs')\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "run",
            "--python",
            python.to_str().unwrap(),
            script.to_str().unwrap(),
        ])
        .env("XDG_RUNTIME_DIR", &dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-m pip install 'protobuf"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("never runs"));
}

/// A head node killed before it could clean up leaves its endpoint
/// record and run directory behind. The next command without an endpoint
/// says that no cluster is found, instead of trying the dead socket, and
/// removes both.
#[test]
fn a_killed_head_nodes_record_and_run_directory_are_removed_when_met() {
    if over_mpi() {
        eprintln!("skipped under MPI: the launched process is mpirun, not the head node");
        return;
    }
    let mut cluster = start(up(1));
    cluster.note_pids();
    let runtime = cluster.runtime_dir().join("casa-node");
    let run_dir = runtime.join(cluster.pid().to_string());
    assert!(runtime.join("endpoint").is_file());
    assert!(run_dir.is_dir(), "{}", run_dir.display());
    cluster.kill();
    let out = cluster
        .cli_command(BIN)
        .arg("status")
        .output()
        .expect("the CLI runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no casa-node cluster found"), "{stderr}");
    assert!(!runtime.join("endpoint").exists());
    assert!(!run_dir.exists());
}
