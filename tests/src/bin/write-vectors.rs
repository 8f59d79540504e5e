//! Writes the conformance vectors: one `NAME.bin` per example envelope (its
//! protobuf bytes, without the frame's length prefix) and `manifest.json`,
//! into `tests/vectors/`.
//!
//! Run with `cargo run -p casa-node-conformance --bin write-vectors`. The
//! files are committed; other implementations decode them and compare.
//!
//! Each manifest description is a sentence saying what the vector is,
//! followed by the exact message as a Python protobuf constructor
//! expression, spelled from the vector's own bytes decoded with descriptors
//! compiled from `proto/` (so it cannot drift from the bytes).

use std::error::Error;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use casa_node_protocol::pb::{
    Ack, CancelReply, CancelRequest, ClaimReply, ClaimRequest, ClusterInfo, CommandMode,
    CommandRequest, CommandResponse, CommandStatus, ControlRequest, ControlResponse,
    DebuggingModeRequest, Envelope, EnvironmentVariable, FailureKind, Hello, IdLease,
    IdLeaseRequest, LogLevel, LogLevelRequest, LogRecord, LogSubscription, Parameter, PingRequest,
    PingResponse, ProtocolErrorCode, RejectReason, RequestState, ResponseDelivery, Role,
    ServerStatus, StatusReply, StatusRequest, StopRequest, SubmitReply, SubmitRequest, TrackReply,
    TrackRequest, Value, Welcome, control_request, envelope::Body, submit_reply,
};
use casa_node_protocol::{Framing, PROTOCOL_VERSION};
use protox::prost_reflect::{self, DescriptorPool, DynamicMessage, Kind, ReflectMessage};
use serde::Serialize;

/// One manifest entry.
#[derive(Serialize)]
struct Entry {
    file: String,
    message: &'static str,
    body: String,
    description: String,
}

/// One vector before it is written.
struct Vector {
    name: &'static str,
    what: &'static str,
    envelope: Envelope,
}

fn vector(name: &'static str, what: &'static str, correlation: u64, body: Body) -> Vector {
    Vector {
        name,
        what,
        envelope: Envelope::correlated(correlation, body),
    }
}

// Realistic settings of a three-process cluster: the head node on
// nmpost050 (rank 0), servers 1 and 2 on nmpost050 and nmpost051.
const SOFTWARE: &str = "casa-node 0.1.0";
const HEAD_HOST: &str = "nmpost050";
const SERVER_1_PID: u32 = 24512;
const SERVER_2_PID: u32 = 24513;
const WORKER_1_PID: u32 = 24530;
const WORKER_2_PID: u32 = 24531;
// Times are binary fractions so that their decimal spelling is exact.
const T0: f64 = 1718035200.25;

fn cluster() -> ClusterInfo {
    ClusterInfo {
        transport: "zmq".into(),
        host: HEAD_HOST.into(),
        head_rank: 0,
        world_size: 3,
        server_ranks: vec![1, 2],
        heartbeat_seconds: 5.0,
        timeout_seconds: 60.0,
        debugging: false,
        journal: false,
    }
}

fn flagdata_parameters() -> Vec<Parameter> {
    vec![
        Parameter::new("vis", "uid___A002.ms"),
        Parameter::new("mode", "summary"),
    ]
}

fn a_plus_b_parameters() -> Vec<Parameter> {
    vec![Parameter::new("a", 1), Parameter::new("b", 2)]
}

fn a_plus_b_response() -> CommandResponse {
    CommandResponse {
        id: 2,
        command: "a+b".into(),
        mode: CommandMode::Eval.into(),
        parameters: a_plus_b_parameters(),
        ret: Some(Value::from(3)),
        server: 1,
        status: CommandStatus::ResponseReceived.into(),
        successful: true,
        traceback: None,
        command_start_time: T0 + 0.5,
        command_stop_time: T0 + 0.625,
        worker_restarted: false,
        failure: FailureKind::None.into(),
        worker_signal: None,
        worker_exit_code: None,
    }
}

/// A little-endian `<f8` array's bytes.
fn f8(values: &[f64]) -> Bytes {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A little-endian `<i4` array's bytes.
fn i4(values: &[i32]) -> Bytes {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `pickle.dumps(datetime.date(2024, 1, 2), protocol=4)`.
const PICKLED_DATE: &[u8] = b"\x80\x04\x95 \x00\x00\x00\x00\x00\x00\x00\x8c\x08datetime\x94\x8c\x04date\x94\x93\x94C\x04\x07\xe8\x01\x02\x94\x85\x94R\x94.";

/// Parameters holding a value of every kind.
fn every_kind_parameters() -> Vec<Parameter> {
    vec![
        Parameter::new("nothing", Value::none()),
        Parameter::new("flag", true),
        Parameter::new("count", -7),
        Parameter::new("big", 1i128 << 100),
        Parameter::new("negative_big", -(1i128 << 70)),
        Parameter::new("not_a_number", f64::NAN),
        Parameter::new("infinity", f64::INFINITY),
        Parameter::new("minus_infinity", f64::NEG_INFINITY),
        Parameter::new("minus_zero", -0.0),
        Parameter::new("pi", std::f64::consts::PI),
        Parameter::new("field", "M100 – ñ ☉"),
        Parameter::new("raw", Value::bytes(b"\x00\xffCASA\n".to_vec())),
        Parameter::new(
            "channels",
            Value::list([
                Value::from(0),
                Value::from("spw0"),
                Value::from(1.5),
                Value::none(),
            ]),
        ),
        Parameter::new(
            "phasecenter",
            Value::tuple([
                Value::from("J2000"),
                Value::from("12h22m54.9"),
                Value::from("+15d49m15"),
            ]),
        ),
        Parameter::new(
            "keyed",
            Value::dict([
                (Value::from(1), Value::from("one")),
                (
                    Value::tuple([Value::from(2), Value::from(3)]),
                    Value::from("tuple key"),
                ),
                (Value::none(), Value::from("none key")),
                (
                    Value::from(2.5),
                    Value::list([Value::from(true), Value::from(false)]),
                ),
                (Value::bytes(b"k".to_vec()), Value::from("bytes key")),
                (Value::from("spw"), Value::from("0:5~10")),
            ]),
        ),
        Parameter::new("impedance", Value::complex(1.5, -2.0)),
        Parameter::new(
            "image",
            Value::ndarray(
                "<f8",
                vec![2, 3],
                f8(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
                false,
            ),
        ),
        Parameter::new(
            "mask",
            Value::ndarray("|b1", vec![4], Bytes::from_static(&[1, 0, 1, 1]), false),
        ),
        Parameter::new(
            "gain",
            Value::ndarray(
                "<f4",
                vec![],
                Bytes::from(1.5f32.to_le_bytes().to_vec()),
                true,
            ),
        ),
        Parameter::new(
            "nchan",
            Value::ndarray(
                "<i8",
                vec![],
                Bytes::from(7i64.to_le_bytes().to_vec()),
                false,
            ),
        ),
        Parameter::new("when", Value::pickle(PICKLED_DATE.to_vec())),
        Parameter::new("empty_list", Value::list([])),
        Parameter::new("empty_tuple", Value::tuple([])),
        Parameter::new("empty_dict", Value::dict([])),
    ]
}

fn vectors() -> Vec<Vector> {
    use control_request::Action;
    use submit_reply::Outcome;
    let flagdata_summary = Value::dict([
        (Value::from("name"), Value::from("Summary")),
        (Value::from("type"), Value::from("summary")),
        (Value::from("flagged"), Value::from(161280.0)),
        (Value::from("total"), Value::from(2419200.0)),
        (
            Value::from("spw"),
            Value::dict([
                (
                    Value::from("0"),
                    Value::dict([
                        (Value::from("flagged"), Value::from(80640.0)),
                        (Value::from("total"), Value::from(1209600.0)),
                    ]),
                ),
                (
                    Value::from("1"),
                    Value::dict([
                        (Value::from("flagged"), Value::from(80640.0)),
                        (Value::from("total"), Value::from(1209600.0)),
                    ]),
                ),
            ]),
        ),
    ]);
    let imstat = Value::dict([
        (
            Value::from("blc"),
            Value::ndarray("<i4", vec![4], i4(&[0, 0, 0, 0]), false),
        ),
        (
            Value::from("trc"),
            Value::ndarray("<i4", vec![4], i4(&[255, 255, 0, 0]), false),
        ),
        (
            Value::from("npts"),
            Value::ndarray("<f8", vec![1], f8(&[65536.0]), false),
        ),
        (
            Value::from("max"),
            Value::ndarray("<f8", vec![1], f8(&[0.015625]), false),
        ),
        (
            Value::from("min"),
            Value::ndarray("<f8", vec![1], f8(&[-0.0078125]), false),
        ),
        (
            Value::from("maxposf"),
            Value::from("12:22:54.900, +15.49.15.000, I, 1.15e+11Hz"),
        ),
    ]);
    let name_error = "Traceback (most recent call last):\n  File \"<string>\", line 1, in <module>\nNameError: name 'c' is not defined\n";

    vec![
        // Handshake.
        vector(
            "hello_driver",
            "A Python driver opens the front door: Hello with role DRIVER; a driver asks for no rank",
            0,
            Body::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                role: Role::Driver.into(),
                software: "casa-node-python 0.1.0".into(),
                host: HEAD_HOST.into(),
                pid: 31337,
                rank: 0,
                token: String::new(),
                shared_memory: false,
            }),
        ),
        vector(
            "hello_server_node",
            "A server node connects to the head node over ZeroMQ and asks for rank 2",
            0,
            Body::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                role: Role::ServerNode.into(),
                software: SOFTWARE.into(),
                host: "nmpost051".into(),
                pid: SERVER_2_PID,
                rank: 2,
                token: String::new(),
                shared_memory: false,
            }),
        ),
        vector(
            "welcome_server_node",
            "The head node accepts server 2 and describes the cluster: head node rank 0 and servers 1 and 2 (world size 3), pings every 5 s, timeout after 60 s",
            0,
            Body::Welcome(Box::new(Welcome {
                protocol_version: PROTOCOL_VERSION,
                role: Role::HeadNode.into(),
                software: SOFTWARE.into(),
                rank: 2,
                cluster: Some(cluster()),
                shared_memory_directory: String::new(),
                shared_memory_tag: String::new(),
            })),
        ),
        vector(
            "protocol_error_incompatible_version",
            "The answer to a Hello of protocol version 2: INCOMPATIBLE_VERSION, sent before closing",
            0,
            Body::Error(casa_node_protocol::pb::ProtocolError {
                code: ProtocolErrorCode::IncompatibleVersion.into(),
                message: "incompatible protocol version 2: this peer speaks casa.node.v1".into(),
            }),
        ),
        // Node plane.
        vector(
            "command_request_flagdata",
            "Request 1 for a server: the CASA task call flagdata() with vis and mode bound as globals (CASA tasks read their parameters from globals), mode AUTO, no deadline",
            0,
            Body::CommandRequest(CommandRequest {
                id: 1,
                command: "flagdata()".into(),
                mode: CommandMode::Auto.into(),
                parameters: flagdata_parameters(),
                deadline_seconds: None,
            }),
        ),
        vector(
            "command_request_a_plus_b",
            "Request 2 for a server: evaluate a+b with a=1 and b=2, at most 60 s",
            0,
            Body::CommandRequest(CommandRequest {
                id: 2,
                command: "a+b".into(),
                mode: CommandMode::Eval.into(),
                parameters: a_plus_b_parameters(),
                deadline_seconds: Some(60.0),
            }),
        ),
        vector(
            "command_request_push_every_value_kind",
            "Request 3: push one parameter of every Value kind into a server's globals (rule 8): None, bool, int, ints past 64 bits (2**100 and -2**70 as big_int_value), nan (bits 0x7ff8000000000000), inf, -inf, -0.0, pi, a non-ASCII str, bytes, a list, a tuple, a dict with int/tuple/None/float/bytes/str keys, a complex, numpy arrays (2x3 <f8 of 0..5, |b1 mask), a numpy scalar (np.float32(1.5)), a 0-d array (np.array(7)), a pickle of datetime.date(2024, 1, 2) (protocol 4), and empty list, tuple and dict (present but empty sub-messages: in Python use SetInParent() or the constructor)",
            0,
            Body::CommandRequest(CommandRequest {
                id: 3,
                command: "push".into(),
                mode: CommandMode::Push.into(),
                parameters: every_kind_parameters(),
                deadline_seconds: None,
            }),
        ),
        vector(
            "command_response_a_plus_b",
            "Server 1's answer to request 2: a+b returned 3",
            0,
            Body::CommandResponse(Box::new(a_plus_b_response())),
        ),
        vector(
            "command_response_name_error",
            "Server 2's answer to request 4, a+c with only a bound: it raised NameError, so successful is false, ret is None and traceback holds Python's formatted traceback",
            0,
            Body::CommandResponse(Box::new(CommandResponse {
                id: 4,
                command: "a+c".into(),
                mode: CommandMode::Eval.into(),
                parameters: vec![Parameter::new("a", 1)],
                ret: Some(Value::none()),
                server: 2,
                status: CommandStatus::ResponseReceived.into(),
                successful: false,
                traceback: Some(name_error.into()),
                command_start_time: T0 + 1.0,
                command_stop_time: T0 + 1.125,
                worker_restarted: false,
                failure: FailureKind::Raised.into(),
                worker_signal: None,
                worker_exit_code: None,
            })),
        ),
        vector(
            "command_response_worker_died",
            "Server 1's answer to request 7: its worker was killed by signal 9 (SIGKILL, as the out-of-memory killer does) while running the command; a fresh worker was started, so worker_restarted is true and failure says WORKER_DIED",
            0,
            Body::CommandResponse(Box::new(CommandResponse {
                id: 7,
                command: "big = np.zeros(10**12)".into(),
                mode: CommandMode::Exec.into(),
                parameters: vec![],
                ret: Some(Value::none()),
                server: 1,
                status: CommandStatus::ResponseReceived.into(),
                successful: false,
                traceback: Some("Python worker died: killed by signal 9 (SIGKILL) (the system's out-of-memory killer sends this signal) while running this command.\nA fresh Python worker was started (its init script run again): the globals of earlier commands are lost.".into()),
                command_start_time: T0 + 4.0,
                command_stop_time: T0 + 4.5,
                worker_restarted: true,
                failure: FailureKind::WorkerDied.into(),
                worker_signal: Some(9),
                worker_exit_code: None,
            })),
        ),
        vector(
            "command_response_flagdata_summary",
            "Server 1's answer to request 1: flagdata(mode='summary') returned its summary dict (nested dicts of floats per spw)",
            0,
            Body::CommandResponse(Box::new(CommandResponse {
                id: 1,
                command: "flagdata()".into(),
                mode: CommandMode::Eval.into(),
                parameters: flagdata_parameters(),
                ret: Some(flagdata_summary),
                server: 1,
                status: CommandStatus::ResponseReceived.into(),
                successful: true,
                traceback: None,
                command_start_time: T0,
                command_stop_time: T0 + 42.5,
                worker_restarted: false,
                failure: FailureKind::None.into(),
                worker_signal: None,
                worker_exit_code: None,
            })),
        ),
        vector(
            "command_response_imstat_arrays",
            "Server 2's answer to request 5: imstat returned a dict of numpy arrays (<i4 corners, <f8 statistics) and a str",
            0,
            Body::CommandResponse(Box::new(CommandResponse {
                id: 5,
                command: "imstat(imagename='M100_cont.image')".into(),
                mode: CommandMode::Eval.into(),
                parameters: vec![],
                ret: Some(imstat),
                server: 2,
                status: CommandStatus::ResponseReceived.into(),
                successful: true,
                traceback: None,
                command_start_time: T0 + 2.0,
                command_stop_time: T0 + 3.75,
                worker_restarted: true,
                failure: FailureKind::None.into(),
                worker_signal: None,
                worker_exit_code: None,
            })),
        ),
        vector(
            "control_request_start",
            "The head node tells a server to start serving: working directory, two environment variables for the worker, forward log records from INFO up",
            101,
            Body::ControlRequest(ControlRequest {
                action: Some(Action::Start(control_request::Start {
                    working_directory: "/lustre/aoc/projects/m100".into(),
                    environment: vec![
                        EnvironmentVariable {
                            name: "OMP_NUM_THREADS".into(),
                            value: "1".into(),
                        },
                        EnvironmentVariable {
                            name: "CASA_ENGINE".into(),
                            value: "casa-node".into(),
                        },
                    ],
                    log_level: LogLevel::Info.into(),
                })),
            }),
        ),
        vector(
            "control_request_stop",
            "The head node tells a server to stop once its running command is done (force false: Stop is present but empty)",
            102,
            Body::ControlRequest(ControlRequest {
                action: Some(Action::Stop(control_request::Stop { force: false })),
            }),
        ),
        vector(
            "control_request_set_log_level",
            "The head node lowers a server's log level to DEBUG",
            103,
            Body::ControlRequest(ControlRequest {
                action: Some(Action::SetLogLevel(control_request::SetLogLevel {
                    log_level: LogLevel::Debug.into(),
                })),
            }),
        ),
        vector(
            "control_request_cancel",
            "The head node tells a server to cancel request 42",
            104,
            Body::ControlRequest(ControlRequest {
                action: Some(Action::Cancel(control_request::Cancel { request_id: 42 })),
            }),
        ),
        vector(
            "control_request_recall",
            "The head node takes back request 43, sent ahead to a busy server",
            105,
            Body::ControlRequest(ControlRequest {
                action: Some(Action::Recall(control_request::Recall { request_id: 43 })),
            }),
        ),
        vector(
            "control_response_ok",
            "Server 1 answers control request 101: started",
            101,
            Body::ControlResponse(ControlResponse {
                ok: true,
                error: String::new(),
                rank: 1,
                host: HEAD_HOST.into(),
                pid: SERVER_1_PID,
                shared_memory: false,
                worker_pid: WORKER_1_PID,
            }),
        ),
        vector(
            "control_response_failed",
            "Server 2 answers control request 104: it does not hold request 42",
            104,
            Body::ControlResponse(ControlResponse {
                ok: false,
                error: "request 42 is neither queued nor running on server 2".into(),
                rank: 2,
                host: "nmpost051".into(),
                pid: SERVER_2_PID,
                shared_memory: false,
                worker_pid: 0,
            }),
        ),
        vector(
            "ping_request",
            "The head node's monitor, ping round 17",
            0,
            Body::PingRequest(PingRequest { sequence: 17 }),
        ),
        vector(
            "ping_response_busy",
            "Server 1 answers ping 17 while running request 1: its pid, its worker's pid, host, resident memory (700 MiB) and uptime",
            0,
            Body::PingResponse(PingResponse {
                sequence: 17,
                busy: true,
                command_id: 1,
                command_start_time: T0,
                pid: SERVER_1_PID,
                worker_pid: WORKER_1_PID,
                host: HEAD_HOST.into(),
                rss_bytes: 700 << 20,
                uptime_seconds: 3600.5,
            }),
        ),
        vector(
            "ping_response_idle",
            "Server 2 answers ping 17 while idle (busy false, command fields zero and so absent)",
            0,
            Body::PingResponse(PingResponse {
                sequence: 17,
                busy: false,
                command_id: 0,
                command_start_time: 0.0,
                pid: SERVER_2_PID,
                worker_pid: WORKER_2_PID,
                host: "nmpost051".into(),
                rss_bytes: 512 << 20,
                uptime_seconds: 3600.75,
            }),
        ),
        vector(
            "log_record",
            "A WARNING log record from server 2, as forwarded to the head node and to subscribed drivers",
            0,
            Body::LogRecord(LogRecord {
                time: T0 + 1.5,
                level: LogLevel::Warning.into(),
                origin: "nmpost051:server-2".into(),
                rank: 2,
                message: "flagdata::::\tNo data selected for spw='3'; nothing to flag".into(),
            }),
        ),
        // Driver plane.
        vector(
            "submit_request_flagdata",
            "A driver submits flagdata() to servers 1 and 2 (one request each), at most one hour each",
            7,
            Body::SubmitRequest(Box::new(SubmitRequest {
                command: "flagdata()".into(),
                mode: CommandMode::Auto.into(),
                parameters: flagdata_parameters(),
                targets: vec![1, 2],
                deadline_seconds: Some(3600.0),
                ..SubmitRequest::default()
            })),
        ),
        vector(
            "submit_reply_accepted",
            "The head node accepts submission 7 as requests 5 and 6, in target order",
            7,
            Body::SubmitReply(SubmitReply {
                outcome: Some(Outcome::Accepted(submit_reply::Accepted {
                    ids: vec![5, 6],
                })),
            }),
        ),
        vector(
            "submit_reply_rejected",
            "The head node rejects submission 8, which targeted rank 9",
            8,
            Body::SubmitReply(SubmitReply {
                outcome: Some(Outcome::Rejected(submit_reply::Rejected {
                    reason: RejectReason::UnknownTarget.into(),
                    message: "target 9 is not a server rank (server ranks: 1, 2)".into(),
                })),
            }),
        ),
        vector(
            "id_lease_request",
            "A driver asks for a block of 4096 request ids",
            9,
            Body::IdLeaseRequest(IdLeaseRequest { count: 4096 }),
        ),
        vector(
            "id_lease",
            "The head node leases ids 4097 to 8192 to the driver that asked",
            9,
            Body::IdLease(IdLease {
                first: 4097,
                count: 4096,
            }),
        ),
        vector(
            "claim_request",
            "A driver that reconnected asks for the final responses of requests 4097, 4098 and 77",
            10,
            Body::ClaimRequest(ClaimRequest {
                ids: vec![4097, 4098, 77],
            }),
        ),
        vector(
            "claim_reply",
            "4097 was answered (its delivery follows), 4098 is still pending, 77 is unknown",
            10,
            Body::ClaimReply(ClaimReply {
                answered: vec![4097],
                pending: vec![4098],
                unknown: vec![77],
            }),
        ),
        vector(
            "submit_request_no_retry",
            "A driver pushes a command that must not run twice: after a restart from the journal it fails instead of running again",
            11,
            Body::SubmitRequest(Box::new(SubmitRequest {
                command: "append_to_catalogue(row)".into(),
                no_retry: true,
                ..SubmitRequest::default()
            })),
        ),
        vector(
            "submit_request_pipelined",
            "A driver pushes 1/x to rank 9 with leased id 4097 and wants no SubmitReply",
            0,
            Body::SubmitRequest(Box::new(SubmitRequest {
                command: "1/x".into(),
                targets: vec![9],
                ids: vec![4097],
                pipelined: true,
                ..SubmitRequest::default()
            })),
        ),
        vector(
            "response_delivery_rejected",
            "The head node refuses pipelined request 4097, which targeted rank 9, with a failure response carrying the rejection",
            0,
            Body::ResponseDelivery(Box::new(ResponseDelivery {
                response: Some(CommandResponse {
                    id: 4097,
                    command: "1/x".into(),
                    mode: CommandMode::Auto.into(),
                    ret: Some(Value::none()),
                    status: CommandStatus::ResponseReceived.into(),
                    successful: false,
                    traceback: Some(
                        "rejected (UNKNOWN_TARGET): target 9 is not a server rank (server ranks: 1, 2)"
                            .into(),
                    ),
                    ..CommandResponse::default()
                }),
                rejected: Some(submit_reply::Rejected {
                    reason: RejectReason::UnknownTarget.into(),
                    message: "target 9 is not a server rank (server ranks: 1, 2)".into(),
                }),
                ..ResponseDelivery::default()
            })),
        ),
        vector(
            "response_delivery_a_plus_b",
            "The head node delivers request 2's final response (a+b returned 3) to the driver that submitted it",
            0,
            Body::ResponseDelivery(Box::new(ResponseDelivery {
                response: Some(a_plus_b_response()),
                replaces_timeout: false,
                ..ResponseDelivery::default()
            })),
        ),
        vector(
            "response_delivery_replaces_timeout",
            "The head node delivers request 6's real response after having delivered a timeout record for it: server 2 recovered and answered (rule 21); the command ran in EXEC mode, so ret is None",
            0,
            Body::ResponseDelivery(Box::new(ResponseDelivery {
                response: Some(CommandResponse {
                    id: 6,
                    command: "tclean(vis=vis, imagename='M100_cont', niter=1000)".into(),
                    mode: CommandMode::Exec.into(),
                    parameters: vec![Parameter::new("vis", "uid___A002.ms")],
                    ret: Some(Value::none()),
                    server: 2,
                    status: CommandStatus::ResponseReceived.into(),
                    successful: true,
                    traceback: None,
                    command_start_time: T0 + 10.0,
                    command_stop_time: T0 + 250.25,
                    worker_restarted: false,
                    failure: FailureKind::None.into(),
                    worker_signal: None,
                    worker_exit_code: None,
                }),
                replaces_timeout: true,
                ..ResponseDelivery::default()
            })),
        ),
        vector(
            "status_request_all",
            "A driver asks for the whole server table (server absent: StatusRequest is present but empty)",
            9,
            Body::StatusRequest(StatusRequest { server: None }),
        ),
        vector(
            "status_request_server_2",
            "A driver asks for server 2's row only",
            10,
            Body::StatusRequest(StatusRequest { server: Some(2) }),
        ),
        vector(
            "status_reply",
            "The server table: server 1 busy with request 1, server 2 idle; the cluster's settings; 3 requests queued",
            9,
            Body::StatusReply(Box::new(StatusReply {
                servers: vec![
                    ServerStatus {
                        rank: 1,
                        processor: HEAD_HOST.into(),
                        pid: SERVER_1_PID,
                        worker_pid: WORKER_1_PID,
                        busy: true,
                        command: "flagdata()".into(),
                        command_id: 1,
                        command_start_time: T0,
                        timeout: false,
                        online: true,
                        last_ping: T0 + 5.0,
                        rss: 700 << 20,
                    },
                    ServerStatus {
                        rank: 2,
                        processor: "nmpost051".into(),
                        pid: SERVER_2_PID,
                        worker_pid: WORKER_2_PID,
                        busy: false,
                        command: String::new(),
                        command_id: 0,
                        command_start_time: 0.0,
                        timeout: false,
                        online: true,
                        last_ping: T0 + 5.0,
                        rss: 512 << 20,
                    },
                ],
                cluster: Some(cluster()),
                queued: 3,
            })),
        ),
        vector(
            "cancel_request",
            "A driver cancels requests 5, 6 and 7",
            11,
            Body::CancelRequest(CancelRequest { ids: vec![5, 6, 7] }),
        ),
        vector(
            "cancel_reply",
            "What cancelling 5, 6 and 7 did: 7 was still queued, 6 was running and is being interrupted, 5 had already finished",
            11,
            Body::CancelReply(CancelReply {
                dequeued: vec![7],
                interrupting: vec![6],
                not_pending: vec![5],
            }),
        ),
        vector(
            "log_subscription",
            "A driver subscribes to log records from INFO up",
            12,
            Body::LogSubscription(LogSubscription {
                enabled: true,
                min_level: LogLevel::Info.into(),
            }),
        ),
        vector(
            "stop_request",
            "A driver stops services, interrupting running commands",
            13,
            Body::StopRequest(StopRequest { force: true }),
        ),
        vector(
            "debugging_mode_request",
            "A driver turns debugging mode on: no server is marked timed out while it is on",
            14,
            Body::DebuggingModeRequest(DebuggingModeRequest { enabled: true }),
        ),
        vector(
            "track_request",
            "A driver asks where requests 5, 6, 7 and 99 stand",
            15,
            Body::TrackRequest(TrackRequest {
                ids: vec![5, 6, 7, 99],
            }),
        ),
        vector(
            "track_reply",
            "Where they stand: 5 answered by server 1, 6 sent to server 2, 7 queued, 99 never given out (UNSPECIFIED, so only its id is on the wire)",
            15,
            Body::TrackReply(TrackReply {
                states: vec![
                    RequestState {
                        id: 5,
                        status: CommandStatus::ResponseReceived.into(),
                        server: 1,
                    },
                    RequestState {
                        id: 6,
                        status: CommandStatus::RequestSent.into(),
                        server: 2,
                    },
                    RequestState {
                        id: 7,
                        status: CommandStatus::HoldingQueue.into(),
                        server: 0,
                    },
                    RequestState {
                        id: 99,
                        status: CommandStatus::Unspecified.into(),
                        server: 0,
                    },
                ],
            }),
        ),
        vector(
            "log_level_request",
            "A driver sets server 2's log level to DEBUG",
            16,
            Body::LogLevelRequest(LogLevelRequest {
                level: LogLevel::Debug.into(),
                servers: vec![2],
            }),
        ),
        vector(
            "ack_ok",
            "The head node acknowledges request 13 (the stop request)",
            13,
            Body::Ack(Ack {
                ok: true,
                error: String::new(),
            }),
        ),
        vector(
            "ack_failed",
            "The head node refuses a log level request naming rank 5",
            17,
            Body::Ack(Ack {
                ok: false,
                error: "5 is not a server rank (server ranks: 1, 2)".into(),
            }),
        ),
    ]
}

/// The descriptors of `proto/casa/node/v1/*.proto`.
fn descriptor_pool(proto_root: &Path) -> Result<DescriptorPool, Box<dyn Error>> {
    Ok(protox::Compiler::new([proto_root])?
        .include_imports(true)
        .open_files([
            "casa/node/v1/value.proto",
            "casa/node/v1/node.proto",
            "casa/node/v1/driver.proto",
            "casa/node/v1/envelope.proto",
        ])?
        .descriptor_pool())
}

/// A message's name as Python's generated classes spell it
/// (`ControlRequest.Start`).
fn python_class(full_name: &str) -> &str {
    full_name.strip_prefix("casa.node.v1.").unwrap_or(full_name)
}

/// `s` as Python's `repr` prints it.
fn python_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::from(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                write!(out, "\\x{:02x}", c as u32).unwrap();
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `b` as Python's `repr` prints it.
fn python_bytes(b: &[u8]) -> String {
    let quote = if b.contains(&b'\'') && !b.contains(&b'"') {
        b'"'
    } else {
        b'\''
    };
    let mut out = format!("b{}", quote as char);
    for &c in b {
        match c {
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c as char);
            }
            0x20..=0x7e => out.push(c as char),
            c => write!(out, "\\x{c:02x}").unwrap(),
        }
    }
    out.push(quote as char);
    out
}

/// `d` as Python source.
fn python_float(d: f64) -> String {
    if d.is_nan() {
        assert_eq!(d.to_bits(), f64::NAN.to_bits(), "only the canonical NaN");
        "float('nan')".into()
    } else if d.is_infinite() {
        if d > 0.0 {
            "float('inf')"
        } else {
            "-float('inf')"
        }
        .into()
    } else {
        let s = format!("{d:?}");
        assert!(
            !s.contains('e'),
            "{s}: Rust and Python spell exponents differently"
        );
        s
    }
}

/// A field's value as Python source.
fn python_value(field: &prost_reflect::FieldDescriptor, value: &prost_reflect::Value) -> String {
    use prost_reflect::Value as V;
    match value {
        V::Bool(b) => if *b { "True" } else { "False" }.into(),
        V::I32(i) => i.to_string(),
        V::I64(i) => i.to_string(),
        V::U32(u) => u.to_string(),
        V::U64(u) => u.to_string(),
        V::F32(f) => python_float(f64::from(*f)),
        V::F64(f) => python_float(*f),
        V::String(s) => python_str(s),
        V::Bytes(b) => python_bytes(b),
        V::EnumNumber(n) => match field.kind() {
            Kind::Enum(e) => e
                .get_value(*n)
                .map_or_else(|| n.to_string(), |v| v.name().to_owned()),
            _ => n.to_string(),
        },
        V::Message(m) => python_message(m),
        V::List(items) => {
            let items: Vec<String> = items.iter().map(|v| python_value(field, v)).collect();
            format!("[{}]", items.join(", "))
        }
        V::Map(_) => unreachable!("casa.node.v1 has no map fields"),
    }
}

/// A message as a Python protobuf constructor call, naming only the fields
/// present on the wire, in declaration order.
fn python_message(message: &DynamicMessage) -> String {
    let descriptor = message.descriptor();
    let fields: Vec<String> = descriptor
        .fields()
        .filter(|f| message.has_field(f))
        .map(|f| {
            let value = message.get_field(&f);
            format!("{}={}", f.name(), python_value(&f, &value))
        })
        .collect();
    format!(
        "{}({})",
        python_class(descriptor.full_name()),
        fields.join(", ")
    )
}

/// The name of the `body` oneof field set in `envelope`.
fn body_field(envelope: &DynamicMessage) -> Result<String, Box<dyn Error>> {
    let descriptor = envelope.descriptor();
    let oneof = descriptor
        .oneofs()
        .find(|o| o.name() == "body")
        .ok_or("Envelope has no oneof body")?;
    let set: Vec<String> = oneof
        .fields()
        .filter(|f| envelope.has_field(f))
        .map(|f| f.name().to_owned())
        .collect();
    match set.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(format!("body fields set: {set:?}").into()),
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = manifest_dir.join("vectors");
    let pool = descriptor_pool(&manifest_dir.join("../proto"))?;
    let envelope_descriptor = pool
        .get_message_by_name("casa.node.v1.Envelope")
        .ok_or("no casa.node.v1.Envelope")?;

    fs::create_dir_all(&out)?;
    for entry in fs::read_dir(&out)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "bin") {
            fs::remove_file(path)?;
        }
    }

    let framing = Framing::default();
    let mut manifest = Vec::new();
    for Vector {
        name,
        what,
        envelope,
    } in vectors()
    {
        let bytes = framing.encode_body(&envelope)?;
        let dynamic = DynamicMessage::decode(envelope_descriptor.clone(), bytes.as_slice())?;
        let file = format!("{name}.bin");
        if manifest.iter().any(|e: &Entry| e.file == file) {
            return Err(format!("two vectors named {name}").into());
        }
        fs::write(out.join(&file), &bytes)?;
        manifest.push(Entry {
            file,
            message: "casa.node.v1.Envelope",
            body: body_field(&dynamic)?,
            description: format!(
                "{what}. Exactly (Python protobuf classes of casa.node.v1, enum values by name): {}",
                python_message(&dynamic)
            ),
        });
    }
    let mut json = serde_json::to_string_pretty(&manifest)?;
    json.push('\n');
    fs::write(out.join("manifest.json"), json)?;
    println!("wrote {} vectors to {}", manifest.len(), out.display());
    Ok(())
}
