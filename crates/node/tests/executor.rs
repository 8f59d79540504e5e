//! The executor end to end with a real Python worker (`python3`, or the
//! interpreter named by CASA_NODE_TEST_PYTHON): SEMANTICS rules 2-8, 24, 25
//! and 31.
//!
//! Every test stops the processes it starts: `Executor::shutdown` at the
//! end, and `Executor`'s `Drop` (SIGKILL to the worker's process group)
//! when a test fails first. Waits are on events, bounded by `LIMIT` so a
//! bug fails the test instead of hanging it.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use casa_node::executor::{Executor, ExecutorConfig, ExecutorError, ExecutorEvent, WORKER_SOURCE};
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::value::Kind;
use casa_node_protocol::pb::{
    CommandMode, CommandRequest, Envelope, FailureKind, LogLevel, Parameter, Value,
};
use casa_node_protocol::{ExecOutcome, Framing};
use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use prost::Message;

/// The longest any single wait may take before the test fails.
const LIMIT: Duration = Duration::from_secs(60);

fn python() -> PathBuf {
    std::env::var_os("CASA_NODE_TEST_PYTHON")
        .map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

fn config() -> ExecutorConfig {
    ExecutorConfig::new(python(), 1)
}

async fn start() -> Executor {
    start_with(config()).await
}

async fn start_with(config: ExecutorConfig) -> Executor {
    tokio::time::timeout(LIMIT, Executor::start(config))
        .await
        .expect("the worker starts in time")
        .expect("the worker starts")
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn request(command: &str) -> CommandRequest {
    CommandRequest {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        command: command.to_owned(),
        mode: CommandMode::Auto.into(),
        ..CommandRequest::default()
    }
}

fn with_params(command: &str, params: Vec<Parameter>) -> CommandRequest {
    CommandRequest {
        parameters: params,
        ..request(command)
    }
}

fn with_mode(command: &str, mode: CommandMode) -> CommandRequest {
    CommandRequest {
        mode: mode.into(),
        ..request(command)
    }
}

async fn next(executor: &mut Executor) -> ExecutorEvent {
    tokio::time::timeout(LIMIT, executor.next_event())
        .await
        .expect("an event comes in time")
}

/// A command's outcome and the log lines seen before it.
struct Ran {
    outcome: ExecOutcome,
    logs: Vec<(LogLevel, String)>,
}

impl Ran {
    fn ret(&self) -> &Value {
        static NONE: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
        self.outcome
            .ret
            .as_ref()
            .unwrap_or_else(|| NONE.get_or_init(Value::none))
    }

    fn traceback(&self) -> &str {
        self.outcome.traceback.as_deref().unwrap_or("")
    }

    fn has_log(&self, level: LogLevel, message: &str) -> bool {
        self.logs.iter().any(|(l, m)| *l == level && m == message)
    }
}

async fn run(executor: &mut Executor, request: CommandRequest) -> Ran {
    let id = request.id;
    executor.execute(request).expect("the executor takes it");
    finish(executor, id).await
}

/// Waits for command `id` to finish.
async fn finish(executor: &mut Executor, id: u64) -> Ran {
    let mut logs = Vec::new();
    loop {
        match next(executor).await {
            ExecutorEvent::Finished(outcome) => {
                assert_eq!(outcome.id, id, "the outcome of the running command");
                return Ran { outcome, logs };
            }
            ExecutorEvent::Log { level, message } => logs.push((level, message)),
            ExecutorEvent::WorkerRestarted { reason } | ExecutorEvent::NoWorkerLeft { reason } => {
                panic!("unexpected restart while command {id} ran: {reason}")
            }
        }
    }
}

/// Runs `command`, which must succeed, and returns its value.
async fn run_ok(executor: &mut Executor, command: &str) -> Value {
    let ran = run(executor, request(command)).await;
    assert!(
        ran.outcome.successful,
        "{command} failed:\n{}",
        ran.traceback()
    );
    ran.ret().clone()
}

/// Waits for a log line equal to `message`, whatever comes before it.
async fn wait_for_log(executor: &mut Executor, message: &str) -> LogLevel {
    loop {
        if let ExecutorEvent::Log { level, message: m } = next(executor).await {
            if m == message {
                return level;
            }
        }
    }
}

fn int(v: &Value) -> i64 {
    i64::try_from(v).unwrap_or_else(|e| panic!("{v} is not an int: {e}"))
}

fn string(v: &Value) -> String {
    String::try_from(v).unwrap_or_else(|e| panic!("{v} is not a str: {e}"))
}

/// True while a process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        // "PID (COMM) STATE ...": the state follows the last ')'.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Waits until `pid` is gone: a signal takes effect a little after kill()
/// returns.
async fn wait_gone(pid: u32) {
    let deadline = Instant::now() + LIMIT;
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still there");
        tokio::task::yield_now().await;
    }
}

/// A file in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "casa-node-executor-test-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).expect("write a temporary file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Rules 2 and 6: modes and return values

#[tokio::test]
async fn rule_6_eval_returns_the_value() {
    let mut ex = start().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let ran = run(&mut ex, request("1+1")).await;
    assert!(ran.outcome.successful, "{}", ran.traceback());
    assert_eq!(ran.ret(), &Value::from(2));
    assert_eq!(ran.outcome.mode, CommandMode::Eval);
    assert_eq!(ran.outcome.traceback, None);
    assert!(!ran.outcome.worker_restarted);
    assert!(ran.outcome.start_time >= before - 1.0);
    assert!(ran.outcome.stop_time >= ran.outcome.start_time);
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_6_exec_returns_none() {
    let mut ex = start().await;
    let ran = run(&mut ex, request("x = 1\ny = x + 1")).await;
    assert!(ran.outcome.successful, "{}", ran.traceback());
    assert!(ran.ret().is_none());
    assert_eq!(ran.outcome.mode, CommandMode::Exec);
    assert_eq!(run_ok(&mut ex, "y").await, Value::from(2));
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_2_the_mode_is_resolved_or_taken_as_given() {
    let mut ex = start().await;
    // An expression in EXEC mode runs as a statement and returns None.
    let ran = run(&mut ex, with_mode("40 + 2", CommandMode::Exec)).await;
    assert!(ran.outcome.successful && ran.ret().is_none());
    assert_eq!(ran.outcome.mode, CommandMode::Exec);
    // Statements in EVAL mode are a SyntaxError.
    let ran = run(&mut ex, with_mode("z = 1", CommandMode::Eval)).await;
    assert!(!ran.outcome.successful);
    assert!(
        ran.traceback().contains("SyntaxError"),
        "{}",
        ran.traceback()
    );
    // An unset mode reads as AUTO.
    let ran = run(&mut ex, with_mode("3 * 3", CommandMode::Unspecified)).await;
    assert_eq!(ran.outcome.mode, CommandMode::Eval);
    assert_eq!(ran.ret(), &Value::from(9));
    // "push" in AUTO mode is PUSH.
    let ran = run(&mut ex, with_params("push", vec![Parameter::new("p", 1)])).await;
    assert_eq!(ran.outcome.mode, CommandMode::Push);
    assert!(ran.outcome.successful && ran.ret().is_none());
    // Neither an expression nor statements: the SyntaxError, and nothing of
    // the worker's own code in the traceback.
    let ran = run(&mut ex, request("1 +* 2")).await;
    assert!(!ran.outcome.successful);
    assert!(ran.ret().is_none());
    assert_eq!(ran.outcome.mode, CommandMode::Auto);
    let tb = ran.traceback();
    assert!(tb.contains("SyntaxError"), "{tb}");
    assert!(tb.contains("<command>"), "{tb}");
    assert!(!tb.contains("During handling"), "{tb}");
    assert!(!tb.contains("<string>"), "worker frames leaked: {tb}");
    ex.shutdown().await;
}

// ---------------------------------------------------------------------------
// Rules 3 and 4: parameters

#[tokio::test]
async fn rule_3_parameters_are_injected_then_removed() {
    let mut ex = start().await;
    let ran = run(
        &mut ex,
        with_params(
            "a + b",
            vec![Parameter::new("a", 40), Parameter::new("b", 2)],
        ),
    )
    .await;
    assert_eq!(ran.ret(), &Value::from(42));
    let ran = run(&mut ex, request("a")).await;
    assert!(!ran.outcome.successful);
    assert!(
        ran.traceback()
            .contains("NameError: name 'a' is not defined"),
        "{}",
        ran.traceback()
    );
    // Removed after a failure too.
    let ran = run(&mut ex, with_params("1/0", vec![Parameter::new("c", 1)])).await;
    assert!(!ran.outcome.successful);
    let ran = run(&mut ex, request("c")).await;
    assert!(ran.traceback().contains("NameError"), "{}", ran.traceback());
    // Exec mode sees them as globals as well.
    let ran = run(
        &mut ex,
        with_params("d = a * 2", vec![Parameter::new("a", 21)]),
    )
    .await;
    assert!(ran.outcome.successful, "{}", ran.traceback());
    assert_eq!(run_ok(&mut ex, "d").await, Value::from(42));
    // A global the parameter shadowed comes back.
    run_ok(&mut ex, "e = 'global'").await;
    let ran = run(
        &mut ex,
        with_params("e", vec![Parameter::new("e", "param")]),
    )
    .await;
    assert_eq!(ran.ret(), &Value::from("param"));
    assert_eq!(run_ok(&mut ex, "e").await, Value::from("global"));
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_3_push_keeps_the_parameters() {
    let mut ex = start().await;
    let ran = run(
        &mut ex,
        with_params(
            "push",
            vec![Parameter::new("a", 5), Parameter::new("s", "kept")],
        ),
    )
    .await;
    assert!(ran.outcome.successful, "{}", ran.traceback());
    assert_eq!(
        run_ok(&mut ex, "(a, s)").await,
        Value::tuple([5.into(), "kept".into()])
    );
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_4_a_call_gets_the_parameters_as_keyword_arguments() {
    let mut ex = start().await;
    run_ok(
        &mut ex,
        "def flagdata(vis, mode='manual'):\n    return vis + ':' + mode",
    )
    .await;
    let ran = run(
        &mut ex,
        with_params(
            "flagdata()",
            vec![
                Parameter::new("vis", "x.ms"),
                Parameter::new("mode", "summary"),
            ],
        ),
    )
    .await;
    assert!(ran.outcome.successful, "{}", ran.traceback());
    assert_eq!(ran.ret(), &Value::from("x.ms:summary"));
    assert_eq!(ran.outcome.mode, CommandMode::Eval);
    // The call's own traceback starts in the function.
    let ran = run(
        &mut ex,
        with_params("flagdata()", vec![Parameter::new("bad", 1)]),
    )
    .await;
    assert!(!ran.outcome.successful);
    assert!(ran.traceback().contains("TypeError"), "{}", ran.traceback());
    // And the parameters are gone again.
    let ran = run(&mut ex, request("vis")).await;
    assert!(ran.traceback().contains("NameError"), "{}", ran.traceback());
    ex.shutdown().await;
}

// ---------------------------------------------------------------------------
// Rule 5: the namespace

#[tokio::test]
async fn rule_5_globals_persist_and_os_sys_time_are_imported() {
    let mut ex = start().await;
    let ran = run(&mut ex, request("x = 41")).await;
    assert!(ran.outcome.successful);
    assert_eq!(run_ok(&mut ex, "x + 1").await, Value::from(42));
    let v = run_ok(
        &mut ex,
        "(os.getpid(), sys.version_info[0], time.time() > 0, __name__)",
    )
    .await;
    let items = Vec::<Value>::try_from(&v).unwrap();
    assert_eq!(int(&items[0]), i64::from(ex.worker_pid().unwrap()));
    assert_eq!(items[1], Value::from(3));
    assert_eq!(items[2], Value::from(true));
    assert_eq!(items[3], Value::from("__main__"));
    // Classes defined by commands pickle, as they live in a real __main__.
    run_ok(&mut ex, "class Point:\n    pass").await;
    let v = run_ok(&mut ex, "Point()").await;
    assert!(matches!(v.kind, Some(Kind::PickleValue(_))), "{v:?}");
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_5_the_init_script_runs_before_the_first_command() {
    let init = TempFile::new(
        "init.py",
        "print('init ran')\nfrom_init = 'yes'\nimported = sorted(k for k in ('os', 'sys', 'time') if k in globals())\n",
    );
    let mut ex = start_with(ExecutorConfig {
        init: Some(init.0.clone()),
        ..config()
    })
    .await;
    assert_eq!(wait_for_log(&mut ex, "init ran").await, LogLevel::Info);
    assert_eq!(run_ok(&mut ex, "from_init").await, Value::from("yes"));
    assert_eq!(
        run_ok(&mut ex, "imported").await,
        Value::list(["os".into(), "sys".into(), "time".into()])
    );
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_5_a_failing_init_script_is_a_clear_error() {
    let init = TempFile::new("bad_init.py", "x = 1\n1/0\n");
    let result = Executor::start(ExecutorConfig {
        init: Some(init.0.clone()),
        ..config()
    })
    .await;
    match result {
        Err(ExecutorError::Init { path, traceback }) => {
            assert_eq!(path, init.0);
            assert!(traceback.contains("ZeroDivisionError"), "{traceback}");
            assert!(traceback.contains("line 2"), "{traceback}");
            let message = ExecutorError::Init { path, traceback }.to_string();
            assert!(message.contains("init script"), "{message}");
        }
        Err(other) => panic!("expected an init error, got {other}"),
        Ok(_) => panic!("a failing init script must fail the start"),
    }
    let missing = Executor::start(ExecutorConfig {
        init: Some(PathBuf::from("/nonexistent/casa-node-init.py")),
        ..config()
    })
    .await;
    match missing {
        Err(ExecutorError::Init { traceback, .. }) => {
            assert!(traceback.contains("FileNotFoundError"), "{traceback}")
        }
        Err(other) => panic!("expected an init error, got {other}"),
        Ok(_) => panic!("a missing init script must fail the start"),
    }
}

#[tokio::test]
async fn a_missing_python_is_a_clear_error() {
    let result = Executor::start(ExecutorConfig::new("/nonexistent/python3", 1)).await;
    match result {
        Err(error @ ExecutorError::Spawn { .. }) => {
            let message = error.to_string();
            assert!(message.contains("/nonexistent/python3"), "{message}");
            assert!(message.contains("No such file"), "{message}");
        }
        Err(other) => panic!("expected a spawn error, got {other}"),
        Ok(_) => panic!("a missing interpreter cannot start"),
    }
}

#[tokio::test]
async fn an_interpreter_that_exits_at_once_is_a_clear_error() {
    // A broken installation: Python cannot find its standard library.
    let config = ExecutorConfig {
        environment: vec![("PYTHONHOME".into(), "/nonexistent".into())],
        ..config()
    };
    match Executor::start(config).await {
        Err(error @ ExecutorError::StartupExit { .. }) => {
            let message = error.to_string();
            assert!(message.contains("exited with status 1"), "{message}");
            assert!(message.contains("before it was ready"), "{message}");
            assert!(message.contains("encodings"), "{message}");
        }
        Err(other) => panic!("expected a start-up exit, got {other}"),
        Ok(_) => panic!("Python without its library cannot start a worker"),
    }
}

// ---------------------------------------------------------------------------
// Rule 7: failures

#[tokio::test]
async fn rule_7_tracebacks_name_the_exception_and_start_at_user_code() {
    let mut ex = start().await;
    for (command, expected) in [
        (
            "undefined_name",
            "NameError: name 'undefined_name' is not defined",
        ),
        ("1/0", "ZeroDivisionError"),
        (
            "import something_that_does_not_exist",
            "ModuleNotFoundError",
        ),
        ("len(5)", "TypeError"),
        ("[][3]", "IndexError"),
        ("{}['k']", "KeyError"),
        ("raise SystemExit(4)", "SystemExit: 4"),
    ] {
        let ran = run(&mut ex, request(command)).await;
        assert!(!ran.outcome.successful, "{command} succeeded");
        assert!(ran.ret().is_none(), "{command}: ret must be None");
        let tb = ran.traceback();
        assert!(tb.contains(expected), "{command}: {tb}");
        assert!(
            tb.starts_with("Traceback (most recent call last):\n  File \"<command>\""),
            "{command}: the traceback must start at the user's code: {tb}"
        );
    }
    // Returning False is not a failure.
    let ran = run(&mut ex, request("False")).await;
    assert!(ran.outcome.successful);
    assert_eq!(ran.ret(), &Value::from(false));
    // The worker survived all of it.
    assert_eq!(run_ok(&mut ex, "2 + 2").await, Value::from(4));
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_7_a_return_value_that_cannot_be_sent_fails_clearly() {
    let mut ex = start().await;
    let ran = run(&mut ex, request("(x for x in range(3))")).await;
    assert!(!ran.outcome.successful);
    assert!(ran.ret().is_none());
    let tb = ran.traceback();
    assert!(tb.contains("cannot be sent back"), "{tb}");
    assert!(tb.contains("generator"), "{tb}");
    ex.shutdown().await;
}

// ---------------------------------------------------------------------------
// Rule 8: values

fn numpy_installed() -> bool {
    std::process::Command::new(python())
        .args(["-c", "import numpy"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One value of every kind, nested ones included, with the Python type
/// name each must have in the worker.
fn every_kind() -> Vec<(Value, &'static str)> {
    let numpy = numpy_installed();
    let big = Value::big_int(&[0x7f; 40]);
    vec![
        (Value::none(), "NoneType"),
        (Value::from(true), "bool"),
        (Value::from(false), "bool"),
        (Value::from(0), "int"),
        (Value::from(i64::MIN), "int"),
        (Value::from(i64::MAX), "int"),
        (Value::from(u64::MAX), "int"),
        (Value::from(i128::MIN), "int"),
        (big, "int"),
        (Value::big_int(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0]), "int"),
        (Value::from(1.5), "float"),
        (Value::from(f64::NAN), "float"),
        (Value::from(f64::from_bits(0x7ff8_dead_beef_0001)), "float"),
        (Value::from(-0.0), "float"),
        (Value::from(f64::INFINITY), "float"),
        (Value::from(f64::NEG_INFINITY), "float"),
        (Value::from("héllo ☃ \u{0}"), "str"),
        (Value::from(""), "str"),
        (Value::bytes((0..=255).collect::<Vec<u8>>()), "bytes"),
        (Value::bytes(Vec::new()), "bytes"),
        (Value::list([1.into(), "a".into(), Value::none()]), "list"),
        (Value::list([]), "list"),
        (Value::tuple([1.into()]), "tuple"),
        (Value::tuple([]), "tuple"),
        (
            Value::dict([
                ("a".into(), 1.into()),
                (2.into(), Value::list([3.into()])),
                (Value::tuple([1.into(), "x".into()]), Value::none()),
                (Value::none(), Value::bytes(b"".to_vec())),
                (2.5.into(), Value::complex(0.0, 1.0)),
            ]),
            "dict",
        ),
        (Value::dict([]), "dict"),
        (Value::complex(-0.0, 1.0), "complex"),
        (Value::complex(f64::NAN, f64::NEG_INFINITY), "complex"),
        (Value::complex(0.0, -0.0), "complex"),
        (
            Value::ndarray(
                "<f8",
                vec![2, 3],
                Bytes::from((0..48u8).collect::<Vec<_>>()),
                false,
            ),
            if numpy { "ndarray" } else { "NdArray" },
        ),
        (
            Value::ndarray("<i4", vec![], Bytes::from_static(&[7, 0, 0, 0]), true),
            if numpy { "int32" } else { "NdArray" },
        ),
        (
            Value::ndarray("<i4", vec![], Bytes::from_static(&[7, 0, 0, 0]), false),
            if numpy { "ndarray" } else { "NdArray" },
        ),
        (
            Value::ndarray("|b1", vec![0, 4], Bytes::new(), false),
            if numpy { "ndarray" } else { "NdArray" },
        ),
        (
            Value::list([Value::dict([(
                Value::tuple([Value::from(u64::MAX), Value::from(-0.0)]),
                Value::list([Value::tuple([]), Value::dict([])]),
            )])]),
            "list",
        ),
    ]
}

#[tokio::test]
async fn rule_8_every_kind_of_value_round_trips_through_the_worker() {
    let mut ex = start().await;
    for (value, type_name) in every_kind() {
        let ran = run(
            &mut ex,
            with_params(
                "(v, type(v).__name__)",
                vec![Parameter::new("v", value.clone())],
            ),
        )
        .await;
        assert!(
            ran.outcome.successful,
            "{value:?} failed:\n{}",
            ran.traceback()
        );
        let items = Vec::<Value>::try_from(ran.ret()).unwrap();
        assert_eq!(
            items[0].encode_to_vec(),
            value.encode_to_vec(),
            "{value:?} came back as {:?}",
            items[0]
        );
        assert_eq!(string(&items[1]), type_name, "type of {value:?}");
    }
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_8_values_made_in_python_arrive_as_their_kinds() {
    let mut ex = start().await;
    let got = run_ok(
        &mut ex,
        "{'a': [1, 2.5, None], (1, 'x'): b'\\x00', 3: 1j, 'big': 2**70, 'neg': -2**64, \
         't': (), 'nan': float('-inf'), 'z': complex(-0.0, -0.0), True: 'yes', 'u': '\\u2603'}",
    )
    .await;
    let expected = Value::dict([
        (
            "a".into(),
            Value::list([1.into(), 2.5.into(), Value::none()]),
        ),
        (Value::tuple([1.into(), "x".into()]), Value::bytes(vec![0])),
        (3.into(), Value::complex(0.0, 1.0)),
        ("big".into(), Value::from(1i128 << 70)),
        ("neg".into(), Value::from(-(1i128 << 64))),
        ("t".into(), Value::tuple([])),
        ("nan".into(), f64::NEG_INFINITY.into()),
        ("z".into(), Value::complex(-0.0, -0.0)),
        (true.into(), "yes".into()),
        ("u".into(), "☃".into()),
    ]);
    assert_eq!(got.encode_to_vec(), expected.encode_to_vec(), "{got}");
    // Subclasses of the basic types are pickled, so they come back whole.
    let v = run_ok(&mut ex, "__import__('collections').OrderedDict(a=1)").await;
    assert!(matches!(v.kind, Some(Kind::PickleValue(_))), "{v:?}");
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_8_any_picklable_object_goes_there_and_back() {
    let mut ex = start().await;
    let pickled = run_ok(&mut ex, "__import__('fractions').Fraction(1, 3)").await;
    assert!(
        matches!(pickled.kind, Some(Kind::PickleValue(_))),
        "{pickled:?}"
    );
    let ran = run(
        &mut ex,
        with_params(
            "(p, type(p).__name__, p * 3 == 1)",
            vec![Parameter::new("p", pickled.clone())],
        ),
    )
    .await;
    assert!(ran.outcome.successful, "{}", ran.traceback());
    let items = Vec::<Value>::try_from(ran.ret()).unwrap();
    assert_eq!(items[0].encode_to_vec(), pickled.encode_to_vec());
    assert_eq!(string(&items[1]), "Fraction");
    assert_eq!(items[2], Value::from(true));
    // A pickle that cannot be loaded fails the command, naming the
    // parameter.
    let ran = run(
        &mut ex,
        with_params(
            "q",
            vec![Parameter::new("q", Value::pickle(b"junk".to_vec()))],
        ),
    )
    .await;
    assert!(!ran.outcome.successful);
    assert!(
        ran.traceback().contains("parameter 'q'"),
        "{}",
        ran.traceback()
    );
    // So does a dict Python cannot hold (1 and True are the same key).
    let ran = run(
        &mut ex,
        with_params(
            "d",
            vec![Parameter::new(
                "d",
                Value::dict([(1.into(), 1.into()), (true.into(), 2.into())]),
            )],
        ),
    )
    .await;
    assert!(!ran.outcome.successful);
    assert!(
        ran.traceback().contains("parameter 'd'"),
        "{}",
        ran.traceback()
    );
    ex.shutdown().await;
}

// ---------------------------------------------------------------------------
// Rule 31: output and logging

#[tokio::test]
async fn rule_31_output_and_logging_records_come_back_as_log_events() {
    let mut ex = start().await;
    let ran = run(
        &mut ex,
        request(
            "import logging\n\
             print('hello from print')\n\
             print('to stderr', file=sys.stderr)\n\
             logging.getLogger('casa.test').warning('careful %s', 'now')\n\
             logging.getLogger('casa.test').error('broken')\n\
             logging.getLogger('casa.test').debug('not shown at INFO')\n\
             print('two\\nlines')\n\
             print('part', end='', flush=True)\n\
             print('rest')\n\
             print('no newline', end='')",
        ),
    )
    .await;
    assert!(ran.outcome.successful, "{}", ran.traceback());
    // What Python writes comes before the command's end, in order.
    let logs: Vec<_> = ran.logs.iter().map(|(l, m)| (*l, m.as_str())).collect();
    assert_eq!(
        logs,
        [
            (LogLevel::Info, "hello from print"),
            (LogLevel::Warning, "to stderr"),
            (LogLevel::Warning, "casa.test: careful now"),
            (LogLevel::Error, "casa.test: broken"),
            (LogLevel::Info, "two"),
            (LogLevel::Info, "lines"),
            (LogLevel::Info, "part"),
            (LogLevel::Info, "rest"),
            (LogLevel::Info, "no newline"),
        ]
    );
    // Output written below Python (C code, subprocesses) comes too.
    let ran = run(
        &mut ex,
        request("os.write(1, b'fd one\\n'); os.write(2, b'fd two\\n')"),
    )
    .await;
    assert!(ran.outcome.successful);
    for (level, message) in [(LogLevel::Info, "fd one"), (LogLevel::Warning, "fd two")] {
        if !ran.has_log(level, message) {
            assert_eq!(wait_for_log(&mut ex, message).await, level);
        }
    }
    // A lower log level lets DEBUG records through.
    ex.set_log_level(LogLevel::Debug);
    let ran = run(
        &mut ex,
        request("logging.getLogger('casa.test').debug('now shown')"),
    )
    .await;
    assert!(
        ran.has_log(LogLevel::Debug, "casa.test: now shown"),
        "{:?}",
        ran.logs
    );
    ex.shutdown().await;
}

// ---------------------------------------------------------------------------
// Rule 24: interrupts

#[tokio::test]
async fn rule_24_interrupt_stops_a_running_command_and_keeps_the_globals() {
    let mut ex = start().await;
    run_ok(&mut ex, "kept = 7").await;
    let looping = request("print('looping')\nwhile True:\n    pass");
    let id = looping.id;
    ex.execute(looping).unwrap();
    wait_for_log(&mut ex, "looping").await;
    ex.interrupt();
    let ran = finish(&mut ex, id).await;
    assert!(!ran.outcome.successful);
    assert!(!ran.outcome.worker_restarted);
    assert!(
        ran.traceback().contains("KeyboardInterrupt"),
        "{}",
        ran.traceback()
    );
    assert_eq!(run_ok(&mut ex, "kept").await, Value::from(7));
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_24_an_interrupt_right_after_execute_is_not_lost() {
    let mut ex = start().await;
    let sleeping = request("time.sleep(600)");
    let id = sleeping.id;
    ex.execute(sleeping).unwrap();
    ex.interrupt();
    let ran = finish(&mut ex, id).await;
    assert!(!ran.outcome.successful);
    assert!(
        ran.traceback().contains("KeyboardInterrupt"),
        "{}",
        ran.traceback()
    );
    // Blocking calls are interrupted too, not only Python loops.
    let sleeping = request("print('sleeping'); time.sleep(600)");
    let id = sleeping.id;
    ex.execute(sleeping).unwrap();
    wait_for_log(&mut ex, "sleeping").await;
    ex.interrupt();
    let ran = finish(&mut ex, id).await;
    assert!(
        ran.traceback().contains("KeyboardInterrupt"),
        "{}",
        ran.traceback()
    );
    ex.shutdown().await;
}

/// A SIGINT that lands just before the worker blocks in a system call
/// would wait for that call to end; the worker signals again until its
/// handler has run, so no interrupt is lost (seen with Python 3.13).
#[tokio::test]
async fn rule_24_no_interrupt_is_lost() {
    let mut ex = start().await;
    for _ in 0..300 {
        let sleeping = request("time.sleep(600)");
        let id = sleeping.id;
        ex.execute(sleeping).unwrap();
        ex.interrupt();
        let ran = finish(&mut ex, id).await;
        assert!(
            ran.traceback().contains("KeyboardInterrupt"),
            "{}",
            ran.traceback()
        );
    }
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_24_sigint_while_idle_is_ignored() {
    let mut ex = start().await;
    run_ok(&mut ex, "kept = 1").await;
    let pid = ex.worker_pid().unwrap();
    // No command runs: interrupt() does nothing, and a SIGINT from
    // elsewhere is ignored by the idle worker.
    ex.interrupt();
    kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
    // A command that waits for the signal to have been handled proves the
    // worker is alive and did not carry the interrupt over.
    let ran = run(&mut ex, request("kept + 1")).await;
    assert!(ran.outcome.successful, "{}", ran.traceback());
    assert_eq!(ran.ret(), &Value::from(2));
    assert_eq!(ex.worker_pid(), Some(pid));
    // A SIGINT from elsewhere while a command runs interrupts it.
    let sleeping = request("print('sleeping'); time.sleep(600)");
    let id = sleeping.id;
    ex.execute(sleeping).unwrap();
    wait_for_log(&mut ex, "sleeping").await;
    kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
    let ran = finish(&mut ex, id).await;
    assert!(
        ran.traceback().contains("KeyboardInterrupt"),
        "{}",
        ran.traceback()
    );
    ex.shutdown().await;
}

// ---------------------------------------------------------------------------
// Rule 25: a worker that dies

/// Runs `command`, which kills the worker (or is killed by `action` once
/// it printed "ready"), checks the failure and the restart, and returns
/// what the command ended with.
async fn check_death(ex: &mut Executor, command: &str, expect: &[&str]) -> Ran {
    run_ok(ex, "lost = True").await;
    let old_pid = ex.worker_pid().unwrap();
    let ran = run(ex, request(command)).await;
    assert!(!ran.outcome.successful, "{command} succeeded");
    assert!(ran.outcome.worker_restarted);
    assert!(ran.ret().is_none());
    let tb = ran.traceback();
    assert!(tb.starts_with("Python worker died: "), "{tb}");
    for text in expect {
        assert!(tb.contains(text), "{command}: {text:?} missing in {tb}");
    }
    assert!(tb.contains("globals of earlier commands are lost"), "{tb}");
    let new_pid = ex.worker_pid().unwrap();
    assert_ne!(new_pid, old_pid);
    assert!(!alive(old_pid));
    // The fresh worker serves, without the old globals.
    assert_eq!(run_ok(ex, "1 + 1").await, Value::from(2));
    let after = run(ex, request("lost")).await;
    assert!(
        after.traceback().contains("NameError"),
        "{}",
        after.traceback()
    );
    ran
}

#[tokio::test]
async fn rule_25_a_segfault_fails_the_command_and_restarts_the_worker() {
    let mut ex = start().await;
    let ran = check_death(
        &mut ex,
        "import ctypes; ctypes.string_at(0)",
        &[
            "killed by signal 11 (SIGSEGV)",
            "while running this command",
        ],
    )
    .await;
    drop(ran);
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_25_the_segfault_report_shows_the_python_stack() {
    let mut ex = start().await;
    let ran = run(&mut ex, request("import ctypes; ctypes.string_at(0)")).await;
    let tb = ran.traceback();
    // faulthandler's report, from the worker's stderr.
    assert!(tb.contains("Segmentation fault"), "{tb}");
    assert!(tb.contains("<command>"), "{tb}");
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_25_os_exit_fails_the_command_and_restarts_the_worker() {
    let mut ex = start().await;
    let ran = check_death(&mut ex, "os._exit(3)", &["exited with status 3"]).await;
    assert_eq!(
        (
            ran.outcome.failure,
            ran.outcome.worker_signal,
            ran.outcome.worker_exit_code
        ),
        (FailureKind::WorkerDied, None, Some(3))
    );
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_25_sigkill_mid_command_fails_it_and_restarts_the_worker() {
    let mut ex = start().await;
    run_ok(&mut ex, "lost = True").await;
    let old_pid = ex.worker_pid().unwrap();
    let sleeping = request("print('ready'); time.sleep(600)");
    let id = sleeping.id;
    ex.execute(sleeping).unwrap();
    wait_for_log(&mut ex, "ready").await;
    kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL).unwrap();
    let ran = finish(&mut ex, id).await;
    assert!(!ran.outcome.successful);
    assert!(ran.outcome.worker_restarted);
    // Rule 7: the kind of failure, and the signal, for a driver to act on.
    assert_eq!(
        (
            ran.outcome.failure,
            ran.outcome.worker_signal,
            ran.outcome.worker_exit_code
        ),
        (FailureKind::WorkerDied, Some(9), None)
    );
    let tb = ran.traceback();
    assert!(tb.contains("killed by signal 9 (SIGKILL)"), "{tb}");
    assert!(tb.contains("out-of-memory"), "{tb}");
    assert!(tb.contains("globals of earlier commands are lost"), "{tb}");
    assert_ne!(ex.worker_pid(), Some(old_pid));
    assert!(!alive(old_pid));
    assert_eq!(run_ok(&mut ex, "2 * 21").await, Value::from(42));
    let ran = run(&mut ex, request("lost")).await;
    assert!(ran.traceback().contains("NameError"));
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_25_kill_stops_a_command_that_ignores_interrupts() {
    let mut ex = start().await;
    let stubborn = request(
        "print('ignoring')\n\
         while True:\n    \
             try:\n        \
                 time.sleep(600)\n    \
             except KeyboardInterrupt:\n        \
                 pass",
    );
    let id = stubborn.id;
    ex.execute(stubborn).unwrap();
    wait_for_log(&mut ex, "ignoring").await;
    ex.interrupt();
    ex.kill();
    let ran = finish(&mut ex, id).await;
    assert!(!ran.outcome.successful);
    assert!(ran.outcome.worker_restarted);
    let tb = ran.traceback();
    assert!(tb.contains("SIGKILL"), "{tb}");
    assert!(tb.contains("sent by the server node"), "{tb}");
    assert!(!tb.contains("out-of-memory"), "{tb}");
    assert_eq!(run_ok(&mut ex, "'alive'").await, Value::from("alive"));
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_25_a_death_while_idle_restarts_the_worker_and_reruns_init() {
    let init = TempFile::new("init_pid.py", "init_pid = os.getpid()\n");
    let mut ex = start_with(ExecutorConfig {
        init: Some(init.0.clone()),
        ..config()
    })
    .await;
    let old_pid = ex.worker_pid().unwrap();
    assert_eq!(int(&run_ok(&mut ex, "init_pid").await), i64::from(old_pid));
    kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL).unwrap();
    match next(&mut ex).await {
        ExecutorEvent::WorkerRestarted { reason } => {
            assert!(reason.contains("SIGKILL"), "{reason}");
            assert!(reason.contains("while idle"), "{reason}");
            assert!(
                reason.contains("globals of earlier commands are lost"),
                "{reason}"
            );
        }
        other => panic!("expected a restart, got {other:?}"),
    }
    let new_pid = ex.worker_pid().unwrap();
    assert_ne!(new_pid, old_pid);
    assert_eq!(int(&run_ok(&mut ex, "init_pid").await), i64::from(new_pid));
    // kill() while idle does the same.
    ex.kill();
    assert!(matches!(
        next(&mut ex).await,
        ExecutorEvent::WorkerRestarted { .. }
    ));
    assert_eq!(run_ok(&mut ex, "3").await, Value::from(3));
    ex.shutdown().await;
}

/// A command taken while the worker started in place of one that died
/// idle is still starting is answered when that worker dies too before
/// it is ready (rule 25): as failed, with how it ended; nothing waits for
/// ever, and the executor says no worker is left.
#[tokio::test]
async fn rule_25_a_command_waiting_for_a_replacement_that_dies_starting_fails() {
    let marker = TempFile::new("started", "");
    std::fs::remove_file(&marker.0).unwrap();
    let init = TempFile::new(
        "init_once.py",
        &format!(
            "if os.path.exists({path:?}):\n    time.sleep(1.0)\n    os._exit(3)\nopen({path:?}, 'w').close()\n",
            path = marker.0.display().to_string()
        ),
    );
    let mut ex = start_with(ExecutorConfig {
        init: Some(init.0.clone()),
        ..config()
    })
    .await;
    let old_pid = ex.worker_pid().unwrap();
    kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL).unwrap();
    // Until the executor has taken the death and started the replacement.
    let started = Instant::now();
    while ex.worker_pid().is_none_or(|pid| pid == old_pid) {
        assert!(started.elapsed() < LIMIT, "no replacement was started");
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(20), ex.next_event()).await {
            panic!("nothing is due before the replacement is ready: {event:?}");
        }
    }
    let waiting = request("1+1");
    let id = waiting.id;
    ex.execute(waiting)
        .expect("a starting worker takes a command");
    let ran = finish(&mut ex, id).await;
    assert!(!ran.outcome.successful);
    assert_eq!(ran.outcome.failure, FailureKind::WorkerDied);
    assert_eq!(ran.outcome.worker_exit_code, Some(3));
    assert!(
        ran.traceback().contains("before it was ready"),
        "{}",
        ran.traceback()
    );
    match next(&mut ex).await {
        ExecutorEvent::NoWorkerLeft { reason } => {
            assert!(reason.contains("no worker is left"), "{reason}");
        }
        other => panic!("expected word that no worker is left, got {other:?}"),
    }
    assert!(matches!(
        ex.execute(request("2")),
        Err(ExecutorError::NoWorker(_))
    ));
    ex.shutdown().await;
}

// ---------------------------------------------------------------------------
// Lifecycle

#[tokio::test]
async fn shutdown_leaves_no_process_behind() {
    let mut ex = start().await;
    let pid = ex.worker_pid().unwrap();
    let child = run_ok(
        &mut ex,
        "__import__('subprocess').Popen(['sleep', '600']).pid",
    )
    .await;
    let child = u32::try_from(int(&child)).unwrap();
    assert!(alive(pid) && alive(child));
    ex.shutdown().await;
    assert!(!alive(pid), "the worker {pid} is still there");
    // The worker's process group was sent SIGKILL.
    wait_gone(child).await;
}

#[tokio::test]
async fn shutdown_in_the_middle_of_a_command_stops_the_worker() {
    let mut ex = start().await;
    let pid = ex.worker_pid().unwrap();
    ex.execute(request("print('busy'); time.sleep(600)"))
        .unwrap();
    wait_for_log(&mut ex, "busy").await;
    tokio::time::timeout(LIMIT, ex.shutdown())
        .await
        .expect("shutdown finishes");
    assert!(!alive(pid));
}

/// The worker leaves by itself when its pipes close, even in the middle of
/// a command, so none is orphaned when its server node dies (rule 30).
/// Started by hand as the executor starts it, so that its exit status
/// shows it was not killed.
#[tokio::test]
async fn the_worker_exits_when_its_pipes_close_even_mid_command() {
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let (commands_read, commands_write) = pipe();
    let (results_read, results_write) = pipe();
    let (control_read, control_write) = pipe();
    let mut command = std::process::Command::new(python());
    command
        .args(["-u", "-c", WORKER_SOURCE])
        .env("CASA_NODE_WORKER_FDS", "3,4,5")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0);
    command
        .fd_mappings(vec![
            FdMapping {
                parent_fd: commands_read,
                child_fd: 3,
            },
            FdMapping {
                parent_fd: results_write,
                child_fd: 4,
            },
            FdMapping {
                parent_fd: control_read,
                child_fd: 5,
            },
        ])
        .unwrap();
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    let mut child = command.spawn().expect("start the worker");
    drop(command);

    let framing = Framing::default();
    let mut commands = std::fs::File::from(commands_write);
    let mut results = std::fs::File::from(results_read);
    let mut inbox = BytesMut::new();
    let mut next_frame = move || loop {
        if let Some(envelope) = framing.decode(&mut inbox).unwrap() {
            return envelope;
        }
        let mut chunk = [0u8; 4096];
        let n = results.read(&mut chunk).expect("read the results pipe");
        assert!(n > 0, "the worker closed its results pipe");
        inbox.extend_from_slice(&chunk[..n]);
    };
    assert!(matches!(next_frame().body, Some(Body::ControlResponse(_))));
    let sleeping = Envelope::new(Body::CommandRequest(request(
        "print('sleeping'); time.sleep(600)",
    )));
    commands
        .write_all(&framing.encode_to_bytes(&sleeping).unwrap())
        .unwrap();
    // print() arrives as a log record once the command runs.
    loop {
        if let Some(Body::LogRecord(record)) = next_frame().body {
            assert_eq!(record.message, "sleeping");
            break;
        }
    }
    // The commands pipe alone closing is enough.
    drop(commands);
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("the worker exits by itself")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
    drop(control_write);
}

#[tokio::test]
async fn dropping_the_executor_kills_the_worker() {
    let ex = start().await;
    let pid = ex.worker_pid().unwrap();
    drop(ex);
    wait_gone(pid).await;
}

#[tokio::test]
async fn one_command_at_a_time() {
    let mut ex = start().await;
    let first = request("print('first'); time.sleep(600)");
    let id = first.id;
    ex.execute(first).unwrap();
    match ex.execute(request("1")) {
        Err(ExecutorError::Busy(busy)) => assert_eq!(busy, id),
        other => panic!("expected Busy, got {other:?}"),
    }
    ex.interrupt();
    let ran = finish(&mut ex, id).await;
    assert!(!ran.outcome.successful);
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_26_the_head_nodes_settings_reach_the_worker() {
    let dir = std::env::temp_dir();
    let mut config = config();
    config.working_directory = Some(dir.clone());
    config
        .environment
        .push(("CASA_NODE_TEST_SETTING".into(), "on".into()));
    let mut ex = start_with(config).await;
    let v = run_ok(
        &mut ex,
        "(os.getcwd(), os.environ.get('CASA_NODE_TEST_SETTING'), os.environ.get('CASA_NODE_RANK'))",
    )
    .await;
    let items = Vec::<Value>::try_from(&v).unwrap();
    assert_eq!(
        std::fs::canonicalize(string(&items[0])).unwrap(),
        std::fs::canonicalize(&dir).unwrap()
    );
    assert_eq!(string(&items[1]), "on");
    assert_eq!(string(&items[2]), "1");
    // A restarted worker starts with them.
    ex.kill();
    assert!(matches!(
        next(&mut ex).await,
        ExecutorEvent::WorkerRestarted { .. }
    ));
    let v = run_ok(&mut ex, "os.environ.get('CASA_NODE_TEST_SETTING')").await;
    assert_eq!(string(&v), "on");
    ex.shutdown().await;
}

#[tokio::test]
async fn rule_19_resident_memory_counts_the_worker() {
    let mut ex = start().await;
    run_ok(&mut ex, "ballast = b'x' * (64 << 20)").await;
    // The worker is idle, so its own figure holds still; this test
    // process's changes with the tests running beside it.
    let statm =
        std::fs::read_to_string(format!("/proc/{}/statm", ex.worker_pid().unwrap())).unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .unwrap()
        .unwrap() as u64;
    let worker = pages * page;
    assert!(worker >= 64 << 20, "{worker}");
    assert!(ex.rss_bytes() > worker, "{} <= {worker}", ex.rss_bytes());
    ex.shutdown().await;
}

#[tokio::test]
async fn large_values_cross_the_pipes() {
    let mut ex = start().await;
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    let ran = run(
        &mut ex,
        with_params(
            "(len(blob), blob[:3], blob)",
            vec![Parameter::new("blob", Value::bytes(data.clone()))],
        ),
    )
    .await;
    assert!(ran.outcome.successful, "{}", ran.traceback());
    let items = Vec::<Value>::try_from(ran.ret()).unwrap();
    assert_eq!(int(&items[0]), 8 << 20);
    assert_eq!(items[1], Value::bytes(vec![0, 1, 2]));
    assert_eq!(Vec::<u8>::try_from(&items[2]).unwrap(), data);
    ex.shutdown().await;
}
