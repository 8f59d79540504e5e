//! Bad input (issue 7, part 2), outside the Rust decoders (which
//! `crates/protocol/tests/fuzz.rs` fuzzes):
//!
//! - the Python worker's codec, fuzzed: a harness process loads the
//!   worker's source as a module (its `main` does not run) and decodes
//!   whatever frames it is sent with the worker's own functions, under
//!   `tracemalloc`. Arbitrary and hostile values and envelopes (the
//!   strategies of `casa_node_protocol::strategies`) must give a value or
//!   a clean `DecodeError` (or `UnicodeDecodeError`), never another
//!   exception, a crash or a hang; allocate at most [`PY_EXPANSION`] bytes
//!   per byte; refuse what prost's side refuses as too deep; read every
//!   well-formed value prost reads, and write it back byte for byte; and
//!   write nothing the Rust decoders refuse. The bound `MAX_VALUE_DEPTH` is
//!   checked exactly in both directions, and an oversized frame is refused
//!   before anything is allocated for it.
//! - a real cluster's front door, fed garbage, a truncated frame, an
//!   oversized length, wrong protocol versions, invalid UTF-8, values too
//!   deep or too large for their length, unknown ranks and unknown request
//!   ids: each gets a clear error (or reply) and is logged, while another
//!   driver, connected all along, keeps getting `1+1` answered.
//! - a real server node's link, from a head node the test plays: a wrong
//!   protocol version, messages meant for other roles, an empty control
//!   request and an unknown request id are dropped (or answered with an
//!   error) and logged, and the server keeps serving.
//!
//! The fuzz runs `CASA_NODE_FUZZ_CASES` values and as many envelopes when
//! set (the long run: `CASA_NODE_FUZZ_CASES=1000000 cargo test --release -p
//! casa-node --test bad_input the_worker_codec`, bound by the Python side at
//! a few hundred inputs a second), a few thousand otherwise. Every process
//! is stopped by PID.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use casa_node::client::{BlockingClient, Submit};
use casa_node::endpoint::FrontDoorEndpoint;
use casa_node::executor::WORKER_SOURCE;
use casa_node_conformance::cluster::{Cluster, Launch, WAIT};
use casa_node_conformance::driver::RawDriver;
use casa_node_conformance::process::{self, descendants, wait_gone};
use casa_node_protocol::pb::control_request::{Action, Start};
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::value::Kind;
use casa_node_protocol::pb::{
    CancelRequest, CommandRequest, ControlRequest, Envelope, Hello, IdLeaseRequest, LogLevel,
    LogLevelRequest, ProtocolErrorCode, RejectReason, Role, StatusRequest, SubmitRequest,
    TrackRequest, Value, submit_reply,
};
use casa_node_protocol::strategies::{
    Level, Place, arb_hostile_body, arb_hostile_value_bytes, chain, chain_leaves,
    envelope_with_value, ld, levels_for, well_formed,
};
use casa_node_protocol::{
    DEFAULT_MAX_FRAME, FrameError, Framing, MAX_VALUE_DEPTH, PROTOCOL_VERSION, Transport,
    TransportEvent,
};
use casa_node_transport_zmq::ZmqTransport;
use common::{BIN, still_serving};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;

fn python() -> PathBuf {
    std::env::var_os("CASA_NODE_TEST_PYTHON")
        .map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

/// Cases per property: `CASA_NODE_FUZZ_CASES`, or `default`.
fn cases(default: u32) -> u32 {
    std::env::var("CASA_NODE_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// The worker's codec

/// Python objects the worker's decoder may make per byte of input, as
/// `tracemalloc` counts them (the worst seen over 2 million inputs is 40:
/// a dict of empty entries is a `(None, None)` tuple of 56 bytes for every
/// 2 bytes).
const PY_EXPANSION: u64 = 64;

/// The constant part of that bound.
const PY_SLACK: u64 = 64 * 1024;

/// The harness: reads the worker's source from the first frame on stdin
/// and runs it as a module, then answers each frame. The first byte of a
/// frame says what the rest is: `V` a Value to decode (raw, as in
/// codec-echo mode) and encode again; `E` an Envelope whose CommandRequest
/// parameters are decoded; `X` a Python expression whose value is encoded.
/// Each answer is a status byte (`O` done, `E` an exception, `F` a framing
/// error, after which the harness exits), the peak of memory traced while
/// decoding (8 bytes, little-endian), and the encoded value or
/// `TypeName: message`.
const HARNESS: &str = r#"
import os, struct, sys, tracemalloc, types

def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data

source = read_exact(struct.unpack(">I", read_exact(4))[0]).decode("utf-8")
module = types.ModuleType("casa_node_worker")
sys.modules["casa_node_worker"] = module  # so that its classes pickle
worker = module.__dict__
exec(compile(source, "worker.py", "exec"), worker)
DecodeError = worker["DecodeError"]
reader = worker["_FrameReader"](0)
write_all = worker["_write_all"]

def answer(status, peak, payload):
    body = status + struct.pack("<Q", max(peak, 0)) + payload
    write_all(1, struct.pack(">I", len(body)) + body)

def failure(e):
    return ("%s: %s" % (type(e).__name__, e)).encode("utf-8", "backslashreplace")

def begin():
    """The memory traced now, the peak reset (Python 3.8: tracing anew)."""
    if hasattr(tracemalloc, "reset_peak"):
        tracemalloc.reset_peak()
    else:
        tracemalloc.stop()
        tracemalloc.start()
    return tracemalloc.get_traced_memory()[0]

tracemalloc.start()
while True:
    base = begin()
    try:
        body = reader.read()
    except DecodeError as e:
        answer(b"F", tracemalloc.get_traced_memory()[1] - base, failure(e))
        sys.exit(0)
    if body is None:
        sys.exit(0)
    mode, data = body[0], body[1:]
    del body
    base = begin()
    try:
        if mode == ord("V"):
            value = worker["_dec_value"](data, memoryview(data), 0, len(data), True)
        elif mode == ord("E"):
            _, _, field, a, b = worker["_dec_envelope"](data)
            value = None
            if field == 20:
                mv = memoryview(data)
                params = worker["_dec_command"](data, mv, a, b)[3]
                value = [
                    worker["_dec_value"](data, mv, span[0], span[1], True)
                    for _, span in params if span is not None
                ]
        else:
            value = eval(data.decode("utf-8"), worker)
        peak = tracemalloc.get_traced_memory()[1] - base
    except Exception as e:
        answer(b"E", tracemalloc.get_traced_memory()[1] - base, failure(e))
        continue
    try:
        parts, n = worker["_encode_value"](value)
    except Exception as e:
        answer(b"E", peak, b"encoding: " + failure(e))
        continue
    del value
    answer(b"O", peak, b"".join(parts) if mode != ord("E") else b"")
"#;

/// What the harness answered.
#[derive(Debug)]
struct Reply {
    status: u8,
    peak: u64,
    payload: Vec<u8>,
}

impl Reply {
    fn error(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// The harness process; killed (by PID) and reaped when dropped.
struct Harness {
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<Reply>,
}

impl Harness {
    fn spawn() -> Harness {
        let mut child = Command::new(python())
            .args(["-c", HARNESS])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the harness");
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            loop {
                let mut prefix = [0u8; 4];
                if stdout.read_exact(&mut prefix).is_err() {
                    return;
                }
                let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
                if stdout.read_exact(&mut body).is_err() || body.len() < 9 {
                    return;
                }
                let reply = Reply {
                    status: body[0],
                    peak: u64::from_le_bytes(body[1..9].try_into().unwrap()),
                    payload: body[9..].to_vec(),
                };
                if tx.send(reply).is_err() {
                    return;
                }
            }
        });
        let mut first = (WORKER_SOURCE.len() as u32).to_be_bytes().to_vec();
        first.extend_from_slice(WORKER_SOURCE.as_bytes());
        stdin.write_all(&first).expect("send the worker's source");
        Harness {
            child,
            stdin,
            replies,
        }
    }

    /// Sends raw bytes and waits for one reply.
    fn raw(&mut self, bytes: &[u8]) -> Reply {
        self.stdin.write_all(bytes).expect("the harness reads");
        self.replies
            .recv_timeout(WAIT)
            .expect("the harness answers in time, without dying")
    }

    /// Sends one frame: `mode`, then `data`.
    fn ask(&mut self, mode: u8, data: &[u8]) -> Reply {
        let mut frame = ((data.len() + 1) as u32).to_be_bytes().to_vec();
        frame.push(mode);
        frame.extend_from_slice(data);
        self.raw(&frame)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The exceptions the worker's decoder may raise.
fn clean(reply: &Reply) -> bool {
    let error = reply.error();
    error.starts_with("DecodeError: ") || error.starts_with("UnicodeDecodeError: ")
}

/// The most bytes of Python objects per byte of input seen so far, for
/// inputs of 1 KiB or more (below that the constant part dominates).
static WORST: Mutex<f64> = Mutex::new(0.0);

fn note_ratio(peak: u64, len: usize) {
    if len >= 1024 {
        let mut worst = WORST.lock().unwrap();
        *worst = worst.max(peak as f64 / len as f64);
    }
}

/// Checks the worker's decoder on one Value's bytes.
fn check_worker_value(harness: &mut Harness, bytes: &[u8]) -> Result<(), TestCaseError> {
    let reply = harness.ask(b'V', bytes);
    note_ratio(reply.peak, bytes.len());
    let framing = Framing::default();
    let bound = PY_EXPANSION * bytes.len() as u64 + PY_SLACK;
    prop_assert!(
        reply.peak <= bound,
        "decoding {} bytes took {} bytes of Python objects",
        bytes.len(),
        reply.peak
    );
    let rust = framing.decode_value(Bytes::copy_from_slice(bytes));
    match reply.status {
        b'O' => {
            // What the worker writes, Rust reads.
            let written = framing
                .decode_value(Bytes::from(reply.payload.clone()))
                .map_err(|e| {
                    TestCaseError::fail(format!("the worker wrote what Rust refuses: {e}"))
                })?;
            prop_assert!(written.depth() <= MAX_VALUE_DEPTH);
            prop_assert!(
                !matches!(rust, Err(FrameError::TooDeep { .. })),
                "the worker read a value deeper than the bound"
            );
        }
        b'E' => prop_assert!(clean(&reply), "{}", reply.error()),
        other => prop_assert!(false, "status {other}"),
    }
    // Every well-formed value prost reads, written compactly, the worker
    // reads and writes back byte for byte.
    if let Ok(value) = &rust {
        if well_formed(value) && value.encode_to_vec() == bytes {
            prop_assert_eq!(reply.status, b'O', "{}", reply.error());
            prop_assert!(reply.payload == bytes, "written back differently");
        }
    }
    Ok(())
}

/// Checks the worker's envelope and command decoders on one body.
fn check_worker_envelope(harness: &mut Harness, body: &[u8]) -> Result<(), TestCaseError> {
    let reply = harness.ask(b'E', body);
    note_ratio(reply.peak, body.len());
    let bound = PY_EXPANSION * body.len() as u64 + PY_SLACK;
    prop_assert!(reply.peak <= bound, "{} bytes: {}", body.len(), reply.peak);
    match reply.status {
        b'O' => {}
        b'E' => prop_assert!(clean(&reply), "{}", reply.error()),
        other => prop_assert!(false, "status {other}"),
    }
    Ok(())
}

/// Hostile values and envelopes through the worker's decoders, and back
/// through its encoder.
#[test]
fn the_worker_codec_survives_hostile_input() {
    let harness = std::cell::RefCell::new(Harness::spawn());
    let config = |n| Config {
        cases: cases(n),
        failure_persistence: None,
        ..Config::default()
    };
    let started = Instant::now();
    let mut runner = TestRunner::new(config(3000));
    if let Err(error) = runner.run(&arb_hostile_value_bytes(), |bytes| {
        check_worker_value(&mut harness.borrow_mut(), &bytes)
    }) {
        panic!("{error}");
    }
    let mut runner = TestRunner::new(config(1500));
    if let Err(error) = runner.run(&arb_hostile_body(), |body| {
        check_worker_envelope(&mut harness.borrow_mut(), &body)
    }) {
        panic!("{error}");
    }
    eprintln!(
        "worker codec: {} values and {} envelopes in {:.1?}; at most {:.1} bytes of Python objects per byte",
        cases(3000),
        cases(1500),
        started.elapsed(),
        *WORST.lock().unwrap()
    );
}

/// The Python source for a chain of `levels` around `leaf`.
fn python_chain(levels: &[Level], leaf: &str) -> String {
    let mut expression = leaf.to_owned();
    for level in levels.iter().rev() {
        expression = match level {
            Level::List => format!("[{expression}]"),
            Level::Tuple => format!("({expression},)"),
            Level::DictKey => format!("DictEntries([({expression}, 1)])"),
            Level::DictValue => format!("{{1: {expression}}}"),
        };
    }
    expression
}

/// The leaves of `chain_leaves`, as Python builds them.
const PYTHON_LEAVES: [&str; 7] = [
    "7",
    "'leaf'",
    "None",
    "complex(1.0, -0.0)",
    "NdArray('<f8', [1], bytes(8))",
    "[]",
    "{}",
];

/// The worker reads values up to `MAX_VALUE_DEPTH` deep and refuses one
/// level more; it writes values up to the bound natively (the bytes prost
/// writes) and pickles deeper ones whole. For every kind of level and
/// leaf; `_MAX_DEPTH` and `_MAX_FRAME` are the protocol crate's.
#[test]
fn the_worker_keeps_the_depth_bound_both_ways() {
    let number = |name: &str| -> usize {
        let line = WORKER_SOURCE
            .lines()
            .find(|l| l.starts_with(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("worker.py defines {name}"));
        let value = line.split('=').nth(1).unwrap().trim();
        match value.split_once("<<") {
            Some((a, b)) => {
                a.trim().parse::<usize>().unwrap() << b.trim().parse::<usize>().unwrap()
            }
            None => value.parse().unwrap(),
        }
    };
    assert_eq!(number("_MAX_DEPTH"), MAX_VALUE_DEPTH);
    assert_eq!(number("_MAX_FRAME"), DEFAULT_MAX_FRAME);

    let mut harness = Harness::spawn();
    let mut checked = 0;
    for level in [Level::List, Level::Tuple, Level::DictKey, Level::DictValue] {
        for ((leaf, leaf_depth), python_leaf) in chain_leaves().into_iter().zip(PYTHON_LEAVES) {
            for depth in [MAX_VALUE_DEPTH - 1, MAX_VALUE_DEPTH, MAX_VALUE_DEPTH + 1] {
                let Some(levels) = levels_for(depth, level, leaf_depth) else {
                    continue;
                };
                let bytes = chain(&levels, &leaf.encode_to_vec());
                assert_eq!(Value::decode(bytes.as_slice()).unwrap().depth(), depth);
                let read = harness.ask(b'V', &bytes);
                let written = harness.ask(b'X', python_chain(&levels, python_leaf).as_bytes());
                assert_eq!(written.status, b'O', "{}", written.error());
                if depth <= MAX_VALUE_DEPTH {
                    assert_eq!(read.status, b'O', "{level:?} {leaf:?}: {}", read.error());
                    assert_eq!(read.payload, bytes, "read and written back");
                    assert_eq!(
                        written.payload, bytes,
                        "{level:?} {leaf:?}: written as prost does"
                    );
                } else {
                    assert_eq!(read.status, b'E', "{level:?} {leaf:?}");
                    assert!(
                        read.error().starts_with("DecodeError: ")
                            && read.error().contains("deeper than 96"),
                        "{}",
                        read.error()
                    );
                    let value = Value::decode(written.payload.as_slice()).unwrap();
                    assert!(
                        matches!(value.kind, Some(Kind::PickleValue(_))),
                        "{level:?} {leaf:?}: pickled whole"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 60, "{checked} shapes");
}

/// A frame longer than the limit is refused as soon as its length is in,
/// before anything is allocated for it (the worker would otherwise make a
/// 4 GiB buffer and wait for it to fill).
#[test]
fn the_worker_refuses_an_oversized_frame_at_once() {
    let mut harness = Harness::spawn();
    let reply = harness.ask(b'V', &[0x18, 0x02]);
    assert_eq!(reply.status, b'O');
    let reply = harness.raw(&[0xff, 0xff, 0xff, 0xf0, b'V']);
    assert_eq!(reply.status, b'F', "{reply:?}");
    assert!(
        reply
            .error()
            .contains("a frame of 4294967280 bytes exceeds the maximum"),
        "{}",
        reply.error()
    );
    assert!(reply.peak < 1 << 20, "{} bytes", reply.peak);
}

// ---------------------------------------------------------------------------
// A real cluster's front door

/// A running `casa-node up` with one server and a timeout of 5 s, once it
/// has run a command (its server and worker are then up).
fn start() -> Cluster {
    let cluster = Launch::new(BIN, 1).timeout(5).start();
    still_serving(&client(&cluster));
    cluster.note_tree();
    cluster
}

fn client(cluster: &Cluster) -> BlockingClient {
    BlockingClient::connect(&FrontDoorEndpoint::Unix(cluster.socket()))
        .expect("the front door accepts")
}

/// Waits up to `WAIT` for `up` to log (to stderr) a warning with `text`.
fn logged(cluster: &Cluster, text: &str) -> bool {
    cluster.wait_stderr(|line| line.contains("WARN") && line.contains(text))
}

/// Resident memory of the process `pid`, in bytes.
fn rss(pid: Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Bad input of every kind at the front door of a real cluster: each gets
/// a clear error or reply and is logged, and another driver is served all
/// along.
#[test]
fn the_front_door_answers_bad_input_and_keeps_serving() {
    let cluster = start();
    let other = client(&cluster);

    // Garbage after the handshake: an error, and the stream stays in step.
    let mut raw = RawDriver::connect(&cluster.socket());
    raw.greet("bad_input.rs");
    raw.send_bytes(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]);
    let message = raw.error(ProtocolErrorCode::Malformed);
    assert!(message.contains("malformed envelope"), "{message}");
    raw.in_step();
    assert!(logged(&cluster, "dropped a malformed frame"));
    // On a pipe, not a terminal: plain text, no colour escapes.
    let warnings = cluster.stderr();
    assert!(
        !warnings.contains('\u{1b}'),
        "colour escapes on a pipe: {warnings:?}"
    );
    still_serving(&other);

    // Invalid UTF-8 in a string (the command): the same.
    let mut submit = ld(1, &[0xff, 0xfe, b'1']);
    submit.extend(ld(4, &[]));
    raw.send_body(&[&[0x08, 0x01][..], &ld(40, &submit)].concat());
    let message = raw.error(ProtocolErrorCode::Malformed);
    assert!(message.contains("UTF-8"), "{message}");
    raw.in_step();
    still_serving(&other);

    // A value one level deeper than the bound: refused, clearly; at the
    // bound: run by the worker, and sent back whole.
    let levels = vec![Level::List; (MAX_VALUE_DEPTH - 2) / 2];
    let at_bound = chain(&levels, &Value::none().encode_to_vec());
    let too_deep = chain(
        &[&levels[..], &[Level::List]].concat(),
        &Value::none().encode_to_vec(),
    );
    raw.send_body(&envelope_with_value(Place::SubmitParameter, &too_deep));
    let message = raw.error(ProtocolErrorCode::Malformed);
    assert!(message.contains("deeper than 96"), "{message}");
    raw.send_body(&envelope_with_value(Place::SubmitParameter, &at_bound));
    let Body::SubmitReply(reply) = raw.reply() else {
        panic!("expected a SubmitReply")
    };
    assert!(
        matches!(reply.outcome, Some(submit_reply::Outcome::Accepted(_))),
        "{reply:?}"
    );
    let Body::ResponseDelivery(delivery) = raw.reply() else {
        panic!("expected the response")
    };
    let response = delivery.response.unwrap();
    assert!(response.successful, "{:?}", response.traceback);
    assert_eq!(response.ret.unwrap().encode_to_vec(), at_bound);
    // A result deeper than the bound comes back pickled.
    let deeper = "(lambda f: f(f, 48))(lambda f, n: [f(f, n - 1)] if n else None)";
    let ids = other.submit(Submit::new(deeper)).unwrap();
    let response = other.wait_timeout(&ids, WAIT).unwrap().remove(0);
    assert!(response.successful, "{:?}", response.traceback);
    assert!(matches!(
        response.ret.unwrap().kind,
        Some(Kind::PickleValue(_))
    ));
    still_serving(&other);

    // Thousands of values without a kind: refused before decoding.
    let empties = ld(8, &[0x0a, 0x00].repeat(20_000));
    let before = rss(cluster.pid());
    raw.send_body(&envelope_with_value(Place::SubmitParameter, &empties));
    let message = raw.error(ProtocolErrorCode::Malformed);
    assert!(message.contains("could take"), "{message}");
    raw.in_step();
    still_serving(&other);

    // An unknown rank as target, in a status request and a log level
    // change: rejected, each in its own way.
    raw.send(Body::SubmitRequest(Box::new(SubmitRequest {
        command: "1".into(),
        targets: vec![99],
        ..SubmitRequest::default()
    })));
    match raw.reply() {
        Body::SubmitReply(reply) => match reply.outcome {
            Some(submit_reply::Outcome::Rejected(r)) => {
                assert_eq!(r.reason(), RejectReason::UnknownTarget, "{}", r.message);
                assert!(r.message.contains("99"), "{}", r.message);
            }
            other => panic!("expected a rejection, got {other:?}"),
        },
        other => panic!("expected a SubmitReply, got {other:?}"),
    }
    raw.send(Body::StatusRequest(StatusRequest { server: Some(99) }));
    let message = raw.error(ProtocolErrorCode::UnknownRank);
    assert!(message.contains("99"), "{message}");
    raw.send(Body::LogLevelRequest(LogLevelRequest {
        level: LogLevel::Debug.into(),
        servers: vec![99],
    }));
    match raw.reply() {
        Body::Ack(ack) => assert!(!ack.ok && ack.error.contains("99"), "{ack:?}"),
        other => panic!("expected an Ack, got {other:?}"),
    }
    still_serving(&other);

    // Unknown request ids: tracked as unknown, cancelled as not pending.
    raw.send(Body::TrackRequest(TrackRequest { ids: vec![987_654] }));
    match raw.reply() {
        Body::TrackReply(reply) => {
            assert_eq!(reply.states.len(), 1);
            assert_eq!(reply.states[0].id, 987_654);
            assert_eq!(reply.states[0].status, 0, "unspecified: never given out");
        }
        other => panic!("expected a TrackReply, got {other:?}"),
    }
    raw.send(Body::CancelRequest(CancelRequest { ids: vec![987_654] }));
    match raw.reply() {
        Body::CancelReply(reply) => {
            assert_eq!(reply.not_pending, vec![987_654]);
            assert!(reply.dequeued.is_empty() && reply.interrupting.is_empty());
        }
        other => panic!("expected a CancelReply, got {other:?}"),
    }
    raw.in_step();
    still_serving(&other);

    // Pipelined pushes whose ids are not this connection's to use (rule
    // 11): another connection's, one used twice, one never leased, or
    // none: a ProtocolError, and a failure response for each id.
    let pipelined = |ids: Vec<u64>| {
        Body::SubmitRequest(Box::new(SubmitRequest {
            command: "6 * 7".into(),
            ids,
            pipelined: true,
            ..SubmitRequest::default()
        }))
    };
    let mut owner = RawDriver::connect(&cluster.socket());
    owner.greet("bad_input.rs");
    owner.send(Body::IdLeaseRequest(IdLeaseRequest { count: u32::MAX }));
    let Body::IdLease(theirs) = owner.reply() else {
        panic!("expected an IdLease")
    };
    assert_eq!(theirs.count, 65_536, "a lease is capped");
    raw.send(Body::IdLeaseRequest(IdLeaseRequest { count: 2 }));
    let Body::IdLease(mine) = raw.reply() else {
        panic!("expected an IdLease")
    };
    assert!(
        mine.first >= theirs.first + 65_536,
        "{mine:?} after {theirs:?}"
    );
    let refused = |raw: &mut RawDriver, id: u64| {
        let Body::ResponseDelivery(delivery) = raw.reply() else {
            panic!("expected the failure response of {id}")
        };
        let response = delivery.response.unwrap();
        assert_eq!(response.id, id);
        assert!(!response.successful);
        assert!(
            response
                .traceback()
                .starts_with("casa-node: protocol error:"),
            "{:?}",
            response.traceback
        );
    };
    raw.send(pipelined(vec![theirs.first]));
    let message = raw.error(ProtocolErrorCode::IdNotLeased);
    assert!(message.contains(&theirs.first.to_string()), "{message}");
    refused(&mut raw, theirs.first);
    raw.send(pipelined(vec![mine.first]));
    let Body::ResponseDelivery(delivery) = raw.reply() else {
        panic!("expected the response, and no SubmitReply before it")
    };
    assert_eq!(delivery.response.unwrap().ret, Some(Value::from(42)));
    raw.send(pipelined(vec![mine.first]));
    raw.error(ProtocolErrorCode::IdNotLeased);
    refused(&mut raw, mine.first);
    raw.send(pipelined(vec![u64::MAX]));
    raw.error(ProtocolErrorCode::IdNotLeased);
    refused(&mut raw, u64::MAX);
    raw.send(pipelined(vec![]));
    let message = raw.error(ProtocolErrorCode::IdNotLeased);
    assert!(message.contains("must carry its ids"), "{message}");
    // The other connection's id was not touched: it can still use it.
    owner.send(pipelined(vec![theirs.first]));
    let Body::ResponseDelivery(delivery) = owner.reply() else {
        panic!("expected the response")
    };
    let response = delivery.response.unwrap();
    assert_eq!(response.id, theirs.first);
    assert!(response.successful, "{:?}", response.traceback);
    raw.in_step();
    still_serving(&other);

    // A wrong protocol version after the handshake: refused, closed.
    raw.send_body(
        &Envelope {
            protocol_version: 9,
            ..Envelope::new(Body::StatusRequest(StatusRequest::default()))
        }
        .encode_to_vec(),
    );
    let message = raw.error(ProtocolErrorCode::IncompatibleVersion);
    assert!(message.contains("version 9"), "{message}");
    assert!(raw.closed());
    // ... and in the handshake.
    let mut raw = RawDriver::connect(&cluster.socket());
    raw.send(Body::Hello(Hello {
        protocol_version: 2,
        role: Role::Driver.into(),
        ..Hello::default()
    }));
    let message = raw.error(ProtocolErrorCode::IncompatibleVersion);
    assert!(message.contains("version 2"), "{message}");
    assert!(raw.closed());
    still_serving(&other);

    // A truncated frame (the connection ends inside it): an error, closed,
    // logged.
    let mut raw = RawDriver::connect(&cluster.socket());
    raw.greet("bad_input.rs");
    raw.send_bytes(&[0, 0, 0, 100, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    raw.stream().shutdown(std::net::Shutdown::Write).unwrap();
    let message = raw.error(ProtocolErrorCode::Malformed);
    assert!(message.contains("bytes remaining"), "{message}");
    assert!(raw.closed());
    assert!(logged(&cluster, "bytes remaining on stream"));
    still_serving(&other);

    // A length over the limit: refused as soon as it is read, without
    // reserving it, and closed.
    let mut raw = RawDriver::connect(&cluster.socket());
    raw.greet("bad_input.rs");
    raw.send_bytes(&[0xff, 0xff, 0xff, 0xf0, 1, 2, 3]);
    let message = raw.error(ProtocolErrorCode::TooLarge);
    assert!(message.contains("frame size too big"), "{message}");
    assert!(raw.closed());
    assert!(logged(&cluster, "frame size too big"));
    still_serving(&other);
    let grown = rss(cluster.pid()).saturating_sub(before);
    assert!(grown < 256 << 20, "the head node grew by {grown} bytes");
}

// ---------------------------------------------------------------------------
// A server node's link

/// A `casa-node server` attached to a head node that the test plays,
/// with the transport's own API, so that it can send what a real head
/// node never would. Stopped by PID on drop, with its worker.
struct LoneServer {
    child: Child,
    started: Vec<(Pid, u64)>,
    /// The test's directory, removed at the end.
    dir: PathBuf,
}

impl Drop for LoneServer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for &(pid, started) in &self.started {
            if !wait_gone(pid, Duration::from_secs(10)) && process::alive(pid, started) {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The next message from the server other than a ping's answer.
async fn next_from_server(client: &mut ZmqTransport) -> Body {
    loop {
        let event = tokio::time::timeout(WAIT, client.recv())
            .await
            .expect("the server answers in time")
            .expect("the link works");
        match event {
            TransportEvent::Message { from: 1, envelope } => match envelope.body {
                Some(Body::PingResponse(_)) => {}
                Some(body) => return body,
                None => panic!("an envelope without a body"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The next message from the server other than a log record (kept in
/// `log`) or a ping's answer.
async fn from_server(client: &mut ZmqTransport, log: &mut Vec<String>) -> Body {
    loop {
        match next_from_server(client).await {
            Body::LogRecord(record) => log.push(record.message),
            body => return body,
        }
    }
}

/// Waits for a log record containing `text`, failing on any other message.
async fn logged_by_server(client: &mut ZmqTransport, log: &mut Vec<String>, text: &str) {
    while !log.iter().any(|m| m.contains(text)) {
        match next_from_server(client).await {
            Body::LogRecord(record) => log.push(record.message),
            body => panic!("expected a log record with {text:?}, got {body:?}"),
        }
    }
}

async fn run_on_server(
    client: &mut ZmqTransport,
    log: &mut Vec<String>,
    id: u64,
    command: &str,
) -> Value {
    let request = CommandRequest {
        id,
        command: command.into(),
        ..CommandRequest::default()
    };
    client
        .send(1, Envelope::new(Body::CommandRequest(request)))
        .await
        .unwrap();
    match from_server(client, log).await {
        Body::CommandResponse(r) => {
            assert_eq!(r.id, id);
            assert!(r.successful, "{:?}", r.traceback);
            r.ret.expect("a return value")
        }
        other => panic!("expected a CommandResponse, got {other:?}"),
    }
}

/// Bad input on a server node's link, from its head node: a wrong
/// protocol version, messages only drivers send, an empty control request
/// and a cancel of an unknown request id are each dropped (or answered
/// with an error) and logged back to the head node, and the server goes
/// on serving. Garbage below the envelope (unknown headers, undecodable
/// envelopes, messages beyond the credit) is the transport's, tested in
/// `crates/transport-zmq/tests/zmq.rs`. ZeroMQ only: under MPI the link is
/// the job's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_node_drops_bad_input_and_keeps_serving() {
    let dir = std::env::temp_dir().join(format!("casa-node-bad-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let endpoint = format!("ipc://{}", dir.join("nodes.sock").display());
    let mut client = ZmqTransport::bind(&endpoint).await.expect("bind");
    let mut server = LoneServer {
        child: Command::new(BIN)
            .args(["server", "--connect", &endpoint, "--patience", "8"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .spawn()
            .expect("casa-node server starts"),
        started: Vec::new(),
        dir: dir.clone(),
    };
    let joined = tokio::time::timeout(WAIT, client.recv())
        .await
        .expect("joins in time");
    assert_eq!(joined.unwrap(), TransportEvent::PeerJoined(1));
    let mut log = Vec::new();
    let start = Start {
        working_directory: dir.display().to_string(),
        ..Start::default()
    };
    client
        .send(
            1,
            Envelope::correlated(1, Body::ControlRequest(control(Action::Start(start)))),
        )
        .await
        .unwrap();
    assert!(matches!(from_server(&mut client, &mut log).await, Body::ControlResponse(r) if r.ok));
    assert_eq!(
        run_on_server(&mut client, &mut log, 1, "1+1").await,
        Value::from(2)
    );
    server.started = descendants(Pid::from_raw(server.child.id() as i32));

    // A wrong protocol version: dropped, not run.
    let mut wrong = Envelope::new(Body::CommandRequest(CommandRequest {
        id: 2,
        command: "open('ran', 'w').write('x')".into(),
        ..CommandRequest::default()
    }));
    wrong.protocol_version = PROTOCOL_VERSION + 1;
    client.send(1, wrong).await.unwrap();
    logged_by_server(&mut client, &mut log, "dropped a message").await;
    assert!(log.iter().any(|m| m.contains("version")), "{log:?}");

    // A driver's message, and an empty control request: dropped.
    client
        .send(
            1,
            Envelope::new(Body::StatusRequest(StatusRequest::default())),
        )
        .await
        .unwrap();
    logged_by_server(&mut client, &mut log, "StatusRequest").await;
    client
        .send(
            1,
            Envelope::correlated(5, Body::ControlRequest(ControlRequest { action: None })),
        )
        .await
        .unwrap();
    logged_by_server(&mut client, &mut log, "empty ControlRequest").await;

    // Cancelling an id the server never had: an error in the reply.
    client
        .send(
            1,
            Envelope::correlated(
                6,
                Body::ControlRequest(control(Action::Cancel(
                    casa_node_protocol::pb::control_request::Cancel { request_id: 999 },
                ))),
            ),
        )
        .await
        .unwrap();
    match from_server(&mut client, &mut log).await {
        Body::ControlResponse(r) => {
            assert!(!r.ok && r.error.contains("999"), "{r:?}");
        }
        other => panic!("expected a ControlResponse, got {other:?}"),
    }

    // Still serving, and the wrongly versioned command never ran.
    assert_eq!(
        run_on_server(&mut client, &mut log, 3, "2+2").await,
        Value::from(4)
    );
    assert!(
        !dir.join("ran").exists(),
        "a command of the wrong version ran"
    );
    client.shutdown().await.unwrap();
    let end = Instant::now() + WAIT;
    while server.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < end,
            "the server did not leave with its head node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for &(pid, _) in &server.started {
        assert!(
            wait_gone(pid, Duration::from_secs(15)),
            "process {pid} was left behind"
        );
    }
}

fn control(action: Action) -> ControlRequest {
    ControlRequest {
        action: Some(action),
    }
}

/// `--casa` with a workers' Python that lacks CASA (issue 13) is one line
/// at start-up naming the interpreter, exit 2, before any server starts:
/// for `run`, `up` and `server` alike.
#[test]
fn casa_without_casatasks_is_one_line_at_start_up() {
    let python = "python3";
    let probe = Command::new(python)
        .args([
            "-c",
            "import importlib.util as u; print(u.find_spec('casatasks'))",
        ])
        .output()
        .expect("python3 runs");
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        "None",
        "this test needs a python3 without casatasks"
    );
    let dir = std::env::temp_dir().join(format!("casa-node-nocasa-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("script.py");
    std::fs::write(&script, "open('ran', 'w').close()\n").unwrap();
    let script = script.to_str().unwrap();
    let nodes = format!("ipc://{}", dir.join("nodes.sock").display());
    let runs: [&[&str]; 3] = [
        &["run", "--casa", "--python", python, script],
        &["up", "--casa", "--python", python],
        &["server", "--casa", "--python", python, "--connect", &nodes],
    ];
    for args in runs {
        let (status, stderr) = process::run_to_end(
            Command::new(BIN)
                .args(args)
                .current_dir(&dir)
                .env("XDG_RUNTIME_DIR", dir.join("runtime"))
                .stdout(Stdio::null()),
            WAIT,
        );
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("--casa") && stderr.contains(python) && stderr.contains("casatasks"),
            "{args:?}: {stderr}"
        );
    }
    assert!(!dir.join("ran").exists(), "the script ran");
    assert!(!dir.join("casa-node.log").exists(), "a cluster started");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A dashboard asked for on an address other than loopback, without the
/// TLS of a connection file, is one line at start-up, exit 2, before
/// anything listens or starts (issue 16). 192.0.2.1 is a documentation
/// address: refused before it is ever bound. A `--dashboard` that is not
/// an address is refused by the argument parser, naming the forms.
#[test]
fn a_dashboard_off_loopback_without_tls_is_one_line_at_start_up() {
    let dir = std::env::temp_dir().join(format!("casa-node-dashboard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cases: [(&[&str], &str); 2] = [
        (
            &["up", "--dashboard", "192.0.2.1:8787"],
            "is not on loopback, so it needs TLS",
        ),
        (
            &["up", "--dashboard", "nowhere"],
            "give HOST:PORT (e.g. 127.0.0.1:8787), a port, or off",
        ),
    ];
    for (args, says) in cases {
        let (status, stderr) = process::run_to_end(
            Command::new(BIN)
                .args(args)
                .current_dir(&dir)
                .env("XDG_RUNTIME_DIR", dir.join("runtime"))
                .env_remove("CASA_NODE_DASHBOARD")
                .stdout(Stdio::null()),
            WAIT,
        );
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(!dir.join("casa-node.log").exists(), "a cluster started");
    std::fs::remove_dir_all(&dir).unwrap();
}
