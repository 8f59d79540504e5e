//! The Python worker's hand-written protobuf codec agrees with prost byte
//! for byte (ARCHITECTURE "Python worker protocol"; SEMANTICS rule 8).
//!
//! One worker runs in codec-echo mode (`CASA_NODE_WORKER_MODE=codec-echo`,
//! frames on its stdin and stdout) for all cases. Each random `Value` goes
//! both ways:
//!
//! - prost -> Python: prost encodes a `CommandRequest` carrying the value;
//!   the worker decodes it into Python objects and encodes a
//!   `CommandResponse` with it as `ret`; the bytes must be exactly what
//!   prost writes for that response.
//! - Python -> prost: the worker evaluates a Python expression that builds
//!   the same value from scratch (ints, floats, dicts as Python makes
//!   them) and encodes it; again the bytes must be prost's, and prost must
//!   decode them and write them back unchanged.
//!
//! In codec-echo mode pickles stay opaque, arrays are numpy objects only
//! when numpy is installed (and gives back the same bytes), and a dict
//! Python cannot hold as given (unhashable or equal keys) is kept as its
//! list of entries, so every `Value` has a Python form that encodes back
//! exactly.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use bytes::Bytes;
use casa_node::executor::WORKER_SOURCE;
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::value::Kind;
use casa_node_protocol::pb::{
    CommandMode, CommandRequest, CommandResponse, Complex, ControlRequest, ControlResponse,
    Envelope, LogLevel, LogRecord, Parameter, Value,
};
use casa_node_protocol::strategies::arb_value;
use casa_node_protocol::{DEFAULT_MAX_FRAME, MAX_VALUE_DEPTH, PROTOCOL_VERSION};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;

fn python() -> PathBuf {
    std::env::var_os("CASA_NODE_TEST_PYTHON")
        .map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

/// A worker in codec-echo mode; killed and reaped when dropped.
struct Echo {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl Echo {
    fn spawn() -> Echo {
        let mut child = Command::new(python())
            .args(["-u", "-c", WORKER_SOURCE])
            .env("CASA_NODE_WORKER_MODE", "codec-echo")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the worker in codec-echo mode");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        Echo {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends one frame body and returns the body of the answer.
    fn exchange(&mut self, body: &[u8]) -> Vec<u8> {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        self.stdin.write_all(&frame).expect("write to the worker");
        let mut prefix = [0u8; 4];
        self.stdout
            .read_exact(&mut prefix)
            .expect("the worker answers");
        let mut answer = vec![0u8; u32::from_be_bytes(prefix) as usize];
        self.stdout
            .read_exact(&mut answer)
            .expect("the worker answers in full");
        answer
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The request carrying `value` as parameter `v`, or, with `expression`,
/// the Python source that builds it.
fn request(correlation: u64, id: u64, value: &Value, expression: Option<String>) -> Envelope {
    let request = match expression {
        None => CommandRequest {
            id,
            parameters: vec![Parameter::new("v", value.clone())],
            ..CommandRequest::default()
        },
        Some(command) => CommandRequest {
            id,
            command,
            mode: CommandMode::Eval.into(),
            ..CommandRequest::default()
        },
    };
    Envelope::correlated(correlation, Body::CommandRequest(request))
}

/// What the worker must answer, as prost writes it.
fn expected_answer(correlation: u64, id: u64, value: &Value) -> Vec<u8> {
    let response = CommandResponse {
        id,
        ret: Some(value.clone()),
        successful: true,
        ..CommandResponse::default()
    };
    Envelope::correlated(correlation, Body::CommandResponse(Box::new(response))).encode_to_vec()
}

/// Readable bytes for failure messages, with the worker's traceback when
/// it sent one.
fn explain(bytes: &[u8]) -> String {
    match Envelope::decode(bytes) {
        Ok(Envelope {
            body: Some(Body::CommandResponse(r)),
            ..
        }) if r.traceback.is_some() => r.traceback.unwrap(),
        Ok(envelope) => format!("{envelope:?}\n{bytes:02x?}"),
        Err(e) => format!("undecodable ({e}): {bytes:02x?}"),
    }
}

/// Both directions for one value.
fn check(echo: &mut Echo, case: u64, value: &Value) -> Result<(), TestCaseError> {
    let correlation = case.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let expected = expected_answer(correlation, case, value);

    let answer = echo.exchange(&request(correlation, case, value, None).encode_to_vec());
    prop_assert!(
        answer == expected,
        "prost -> worker -> bytes differ for {value:?}\n got: {}\nwant: {expected:02x?}",
        explain(&answer)
    );

    let expression = py_expr(value);
    let answer =
        echo.exchange(&request(correlation, case, value, Some(expression.clone())).encode_to_vec());
    prop_assert!(
        answer == expected,
        "Python -> bytes differ for {value:?}\nexpression: {expression}\n got: {}\nwant: {expected:02x?}",
        explain(&answer)
    );
    let decoded = Envelope::decode(answer.as_slice())
        .map_err(|e| TestCaseError::fail(format!("prost cannot read the worker: {e}")))?;
    prop_assert_eq!(decoded.encode_to_vec(), answer);
    Ok(())
}

// ---------------------------------------------------------------------------
// Python source for a Value, built the way Python code would build it.

fn py_float(d: f64) -> String {
    format!("_f({})", d.to_bits())
}

fn py_str(s: &str) -> String {
    let mut out = String::from("'");
    for c in s.chars() {
        write!(out, "\\U{:08x}", c as u32).unwrap();
    }
    out.push('\'');
    out
}

fn py_bytes(b: &[u8]) -> String {
    let mut out = String::from("b'");
    for byte in b {
        write!(out, "\\x{byte:02x}").unwrap();
    }
    out.push('\'');
    out
}

fn py_expr(value: &Value) -> String {
    let Some(kind) = &value.kind else {
        return "None".into();
    };
    match kind {
        Kind::NullValue(_) => "None".into(),
        Kind::BoolValue(b) => if *b { "True" } else { "False" }.into(),
        Kind::IntValue(i) => format!("({i})"),
        // Value's Display prints big ints in decimal.
        Kind::BigIntValue(_) => format!("({value})"),
        Kind::DoubleValue(d) => py_float(*d),
        Kind::StringValue(s) => py_str(s),
        Kind::BytesValue(b) => py_bytes(b),
        Kind::ListValue(l) => {
            let items: Vec<String> = l.items.iter().map(py_expr).collect();
            format!("[{}]", items.join(", "))
        }
        Kind::TupleValue(l) => {
            let items: String = l.items.iter().map(|v| py_expr(v) + ", ").collect();
            format!("({items})")
        }
        Kind::DictValue(d) => {
            let entries: Vec<String> = d
                .entries
                .iter()
                .map(|e| {
                    let key = e.key.as_ref().map_or("None".into(), py_expr);
                    let value = e.value.as_ref().map_or("None".into(), py_expr);
                    format!("({key}, {value})")
                })
                .collect();
            format!("_d([{}])", entries.join(", "))
        }
        Kind::ComplexValue(c) => format!(
            "complex({}, {})",
            py_float(c.real.unwrap_or(0.0)),
            py_float(c.imag.unwrap_or(0.0))
        ),
        Kind::NdarrayValue(a) => format!(
            "_nd({}, [{}], {}, {})",
            py_str(&a.dtype),
            a.shape
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            py_bytes(&a.data),
            if a.scalar { "True" } else { "False" }
        ),
        Kind::PickleValue(p) => format!("_pk({})", py_bytes(p)),
    }
}

// ---------------------------------------------------------------------------
// Edge values (the random ones are the protocol crate's strategies)

/// Values at the edges of each encoding.
fn edge_values() -> Vec<Value> {
    let mut values = vec![
        Value::none(),
        Value::from(true),
        Value::from(false),
        Value::from(0),
        Value::from(-1),
        Value::from(63),
        Value::from(-64),
        Value::from(64),
        Value::from(i64::MIN),
        Value::from(i64::MAX),
        Value::from(i128::from(i64::MAX) + 1),
        Value::from(i128::from(i64::MIN) - 1),
        Value::from(u64::MAX),
        Value::from(i128::MIN),
        Value::from(i128::MAX),
        Value::from(-(1i128 << 71)),
        Value::from(-(1i128 << 71) - 1),
        Value::from((1i128 << 71) - 1),
        Value::from(1i128 << 71),
        Value::big_int(&[0x80; 33]),
        Value::from(-0.0),
        Value::from(f64::from_bits(0x7ff0_0000_0000_0001)),
        Value::from(f64::from_bits(0xfff8_0000_0000_0000)),
        Value::from(5e-324),
        Value::from(""),
        Value::from("\u{10ffff}\u{0}\u{7f}é"),
        Value::from("x".repeat(300)),
        Value::bytes(vec![0u8; 70_000]),
        Value::list([]),
        Value::tuple([]),
        Value::dict([]),
        Value::complex(-0.0, -0.0),
        Value::complex(0.0, 0.0),
        Value::ndarray("", vec![], Bytes::new(), false),
        Value::ndarray("<f8", vec![0], Bytes::new(), false),
        Value::ndarray("<f8", vec![300, 2], Bytes::from(vec![1u8; 4800]), false),
        Value::ndarray("|u1", vec![1 << 17], Bytes::from(vec![7u8; 1 << 17]), false),
        Value::ndarray("<i4", vec![], Bytes::from_static(&[1, 2, 3, 4]), true),
        Value::pickle(Vec::new()),
        // Keys Python takes as equal, and keys it cannot hash.
        Value::dict([(1.into(), 1.into()), (true.into(), 2.into())]),
        Value::dict([(0.0.into(), 1.into()), ((-0.0).into(), 2.into())]),
        Value::dict([(Value::list([]), 1.into())]),
        Value::dict([(
            Value::tuple([Value::dict([(Value::none(), Value::none())])]),
            Value::none(),
        )]),
        Value::dict([(f64::NAN.into(), 1.into()), (f64::NAN.into(), 2.into())]),
    ];
    // A deep nest, to exercise the recursion.
    let mut deep = Value::from(1);
    for _ in 0..40 {
        deep = Value::list([deep]);
    }
    values.push(deep);
    values
}

#[test]
fn rule_8_prost_and_the_worker_agree_byte_for_byte() {
    let echo = RefCell::new(Echo::spawn());
    let mut case = 0u64;
    for value in edge_values() {
        case += 1;
        if let Err(error) = check(&mut echo.borrow_mut(), case, &value) {
            panic!("{error}");
        }
    }
    let next_case = std::cell::Cell::new(case);
    let mut runner = TestRunner::new(Config {
        cases: 512,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&arb_value(), |value| {
        next_case.set(next_case.get() + 1);
        check(&mut echo.borrow_mut(), next_case.get(), &value)
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}

/// Unknown fields, at every level the worker reads, are skipped as prost
/// skips them.
#[test]
fn unknown_fields_are_skipped() {
    let mut echo = Echo::spawn();
    let value = Value::list([
        Value::from(5),
        Value::dict([("k".into(), Value::complex(1.0, 2.0))]),
    ]);
    // Unknown fields of each wire type: varint, fixed64, length-delimited,
    // fixed32, with small and large field numbers.
    let unknown: &[u8] = &[
        0xf8, 0x3e, 0x05, // field 1000, varint 5
        0x79, 1, 2, 3, 4, 5, 6, 7, 8, // field 15, fixed64
        0xba, 0x06, 0x02, 0xaa, 0xbb, // field 103, 2 bytes
        0x7d, 9, 9, 9, 9, // field 15, fixed32
    ];
    let with_unknown = |mut bytes: Vec<u8>| {
        bytes.extend_from_slice(unknown);
        bytes
    };
    let length_delimited = |field: u8, bytes: &[u8]| {
        let mut out = vec![field << 3 | 2];
        prost::encoding::encode_varint(bytes.len() as u64, &mut out);
        out.extend_from_slice(bytes);
        out
    };
    // Value > ValueList > Value, each with unknown fields after its own.
    let inner = with_unknown(Value::from(5).encode_to_vec());
    let dict = with_unknown(Value::dict([("k".into(), Value::complex(1.0, 2.0))]).encode_to_vec());
    let list = with_unknown([length_delimited(1, &inner), length_delimited(1, &dict)].concat());
    let value_bytes = with_unknown(length_delimited(8, &list));
    let parameter =
        with_unknown([length_delimited(1, b"v"), length_delimited(2, &value_bytes)].concat());
    let command = with_unknown([vec![0x08, 7], length_delimited(4, &parameter)].concat());
    let mut envelope = with_unknown(vec![0x08, PROTOCOL_VERSION as u8, 0x10, 3]);
    envelope.extend_from_slice(&[0xa2, 0x01]);
    prost::encoding::encode_varint(command.len() as u64, &mut envelope);
    envelope.extend_from_slice(&command);
    let envelope = with_unknown(envelope);

    // prost reads the same message out of these bytes.
    let read = Envelope::decode(envelope.as_slice()).unwrap();
    assert_eq!(
        read.encode_to_vec(),
        request(3, 7, &value, None).encode_to_vec()
    );
    let answer = echo.exchange(&envelope);
    assert_eq!(
        answer,
        expected_answer(3, 7, &value),
        "{}",
        explain(&answer)
    );
}

/// A Complex with a part left out reads as 0.0, as value.proto says; the
/// worker writes both parts back (Python's complex always has both).
#[test]
fn an_absent_complex_part_reads_as_zero() {
    let mut echo = Echo::spawn();
    let half = Value {
        kind: Some(Kind::ComplexValue(Complex {
            real: None,
            imag: Some(2.0),
        })),
    };
    let answer = echo.exchange(&request(1, 1, &half, None).encode_to_vec());
    assert_eq!(
        answer,
        expected_answer(1, 1, &Value::complex(0.0, 2.0)),
        "{}",
        explain(&answer)
    );
}

/// The numbers worker.py spells out (it has no protobuf runtime to read
/// them from) are the protocol crate's, which come from `proto/`: the
/// protocol's constants, the enum values it uses, and the `Envelope` keys
/// of the bodies it reads and writes. (python/tests/test_wire.py checks
/// them, and the rest of the `body` oneof, against the descriptors.)
#[test]
fn the_workers_numbers_are_the_protocol_crates() {
    const PRINT: &str = r#"
import sys, types
worker = types.ModuleType("casa_node_worker")
exec(compile(sys.stdin.read(), "worker.py", "exec"), worker.__dict__)
for name, value in sorted(vars(worker).items()):
    if isinstance(value, bytes):
        value = value.hex()
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        print(name, value)
"#;
    let mut child = Command::new(python())
        .args(["-c", PRINT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(WORKER_SOURCE.as_bytes()).unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "worker.py loads as a module");
    let printed = String::from_utf8(output.stdout).unwrap();
    let worker = |name: &str| -> String {
        printed
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("worker.py defines {name}"))
            .to_owned()
    };
    let number = |name: &str| -> u64 { worker(name).parse().unwrap() };

    assert_eq!(number("PROTOCOL_VERSION"), u64::from(PROTOCOL_VERSION));
    assert_eq!(number("_MAX_DEPTH"), MAX_VALUE_DEPTH as u64);
    assert_eq!(number("_MAX_FRAME"), DEFAULT_MAX_FRAME as u64);
    for (name, mode) in [
        ("AUTO", CommandMode::Auto),
        ("EVAL", CommandMode::Eval),
        ("EXEC", CommandMode::Exec),
        ("PUSH", CommandMode::Push),
    ] {
        assert_eq!(number(name), mode as u64, "{name}");
    }
    for (name, level) in [
        ("L_DEBUG", LogLevel::Debug),
        ("L_INFO", LogLevel::Info),
        ("L_WARNING", LogLevel::Warning),
        ("L_ERROR", LogLevel::Error),
        ("L_CRITICAL", LogLevel::Critical),
    ] {
        assert_eq!(number(name), level as u64, "{name}");
    }

    // The key prost writes before an Envelope's body, and its field number.
    let key = |body: Body| -> Vec<u8> {
        let mut bytes = Envelope {
            protocol_version: 0,
            correlation: 0,
            body: Some(body),
        }
        .encode_to_vec();
        assert_eq!(bytes.pop(), Some(0), "an empty body, then its key alone");
        bytes
    };
    let field = |key: Vec<u8>| -> u64 {
        let varint = key
            .iter()
            .rev()
            .fold(0u64, |n, byte| n << 7 | u64::from(byte & 0x7f));
        varint >> 3
    };
    let hex = |bytes: Vec<u8>| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    assert_eq!(
        number("_COMMAND_REQUEST"),
        field(key(Body::CommandRequest(CommandRequest::default())))
    );
    assert_eq!(
        number("_CONTROL_REQUEST"),
        field(key(Body::ControlRequest(ControlRequest::default())))
    );
    assert_eq!(
        worker("_COMMAND_RESPONSE"),
        hex(key(Body::CommandResponse(Box::default())))
    );
    assert_eq!(
        worker("_CONTROL_RESPONSE"),
        hex(key(Body::ControlResponse(ControlResponse::default())))
    );
    assert_eq!(
        worker("_LOG_RECORD"),
        hex(key(Body::LogRecord(LogRecord::default())))
    );
}
