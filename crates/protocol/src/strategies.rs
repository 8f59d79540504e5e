//! proptest strategies for every message of `casa.node.v1`, and for hostile
//! wire input built from them, for the tests that fuzz a decoder (the
//! protocol crate's own, and the Python worker's codec in the node's).
//! Behind the feature `strategies`.
//!
//! Field contents are random, including values a conforming peer would not
//! send (unknown enum numbers, absent oneofs and sub-messages): the codec
//! must carry them all the same.
//!
//! One deliberate restriction: proto3 fields without explicit presence
//! (`double time = 1;`, as opposed to `optional double` or a oneof member)
//! are never `-0.0` here. prost compares such a field with `0.0` to decide
//! whether to write it, and `-0.0 == 0.0`, so `-0.0` is not written and
//! comes back as `+0.0`: the bytes round-trip but the value's sign does
//! not. Values' `double_value` (a oneof member) and `optional double`
//! fields, the parts of a `Complex` among them, do get `-0.0`.

use std::fmt::Debug;

use crate::Framing;
use crate::pb::{
    self, Ack, CancelReply, CancelRequest, ClusterInfo, CommandMode, CommandRequest,
    CommandResponse, CommandStatus, Complex, ControlRequest, ControlResponse, DebuggingModeRequest,
    Dict, DictEntry, Envelope, EnvironmentVariable, FailureKind, Hello, IdLease, IdLeaseRequest,
    LogLevel, LogLevelRequest, LogRecord, LogSubscription, NdArray, Null, Parameter, PingRequest,
    PingResponse, ProtocolError, ProtocolErrorCode, RejectReason, RequestState, ResponseDelivery,
    Role, ServerStatus, StatusReply, StatusRequest, StopRequest, SubmitReply, SubmitRequest,
    TrackReply, TrackRequest, Value, ValueList, Welcome, control_request, envelope::Body,
    submit_reply, value::Kind,
};
use bytes::Bytes;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message;

/// The name ([`Body::name`]) of every `Envelope` body variant, in field
/// number order. `arb_envelope_covers_every_body_variant` in `codec.rs`
/// checks that [`arb_envelope`] produces each of them.
pub const BODY_NAMES: [&str; 28] = [
    "Hello",
    "Welcome",
    "ProtocolError",
    "CommandRequest",
    "CommandResponse",
    "ControlRequest",
    "ControlResponse",
    "PingRequest",
    "PingResponse",
    "LogRecord",
    "SubmitRequest",
    "SubmitReply",
    "ResponseDelivery",
    "StatusRequest",
    "StatusReply",
    "CancelRequest",
    "CancelReply",
    "LogSubscription",
    "StopRequest",
    "DebuggingModeRequest",
    "TrackRequest",
    "TrackReply",
    "LogLevelRequest",
    "Ack",
    "IdLeaseRequest",
    "IdLease",
    "ClaimRequest",
    "ClaimReply",
];

// ---------------------------------------------------------------------------
// Scalars

/// Any `f64`: ordinary numbers, ±0.0, ±inf, the canonical NaN and NaNs with
/// any sign and payload (arbitrary bit patterns).
pub fn arb_f64() -> impl Strategy<Value = f64> + Clone {
    prop_oneof![
        4 => any::<f64>(),
        2 => any::<u64>().prop_map(f64::from_bits),
        1 => Just(f64::NAN),
        1 => Just(-f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(-0.0),
        1 => Just(0.0),
        1 => Just(f64::MIN_POSITIVE / 2.0),
        1 => Just(f64::MAX),
    ]
}

/// Any `i64`, its extremes and small numbers (on both sides of every
/// varint length and of Python's small-int cache) more often than chance.
pub fn arb_i64() -> impl Strategy<Value = i64> + Clone {
    prop_oneof![
        4 => any::<i64>(),
        2 => -300i64..300,
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
    ]
}

/// Any `f64` but `-0.0`, for proto3 fields without presence (see the
/// module documentation).
pub fn arb_plain_f64() -> impl Strategy<Value = f64> + Clone {
    arb_f64().prop_map(|d| if d == 0.0 { 0.0 } else { d })
}

/// A string of any Unicode scalar values, control characters included.
pub fn arb_string() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        3 => "(?s).{0,24}",
        1 => Just(String::new()),
    ]
}

/// Short arbitrary bytes.
pub fn arb_bytes() -> impl Strategy<Value = Vec<u8>> + Clone {
    vec(any::<u8>(), 0..48)
}

/// The number of an enum value of `E`: mostly a known one, sometimes any
/// `i32` (an unknown number must survive a round trip too).
pub fn arb_enum<E: TryFrom<i32>>() -> BoxedStrategy<i32> {
    let known: Vec<i32> = (0..256).filter(|&i| E::try_from(i).is_ok()).collect();
    assert!(!known.is_empty(), "an enum with no value below 256");
    prop_oneof![
        9 => proptest::sample::select(known),
        1 => any::<i32>(),
    ]
    .boxed()
}

fn arb_ids() -> impl Strategy<Value = Vec<u64>> + Clone {
    vec(any::<u64>(), 0..6)
}

fn arb_ranks() -> impl Strategy<Value = Vec<i32>> + Clone {
    vec(any::<i32>(), 0..6)
}

fn sometimes<T: Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Option<T>> {
    option::weighted(0.9, s)
}

// ---------------------------------------------------------------------------
// value.proto

/// `Null`.
pub fn arb_null() -> impl Strategy<Value = Null> + Clone {
    Just(Null {})
}

/// `Complex`, parts of any `f64`, -0.0 included.
pub fn arb_complex() -> impl Strategy<Value = Complex> + Clone {
    (arb_f64(), arb_f64()).prop_map(|(real, imag)| Complex {
        real: Some(real),
        imag: Some(imag),
    })
}

/// `NdArray`: either consistent (a real dtype, a small shape and exactly
/// product(shape) * itemsize bytes) or arbitrary (any dtype string, shape
/// and data: the codec does not check them).
pub fn arb_ndarray() -> impl Strategy<Value = NdArray> + Clone {
    let consistent = (
        proptest::sample::select(vec![
            ("<f8", 8usize),
            ("<f4", 4),
            ("<i4", 4),
            (">i8", 8),
            ("|u1", 1),
            ("|b1", 1),
            ("<c16", 16),
            ("<U3", 12),
        ]),
        vec(0u64..4, 0..4),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|((dtype, itemsize), shape, scalar, seed)| {
            let shape = if scalar { Vec::new() } else { shape };
            let count = shape.iter().product::<u64>() as usize;
            let data: Vec<u8> = (0..count * itemsize)
                .map(|i| (seed.rotate_left(i as u32 % 64) as u8) ^ i as u8)
                .collect();
            NdArray {
                shared: None,
                dtype: dtype.to_owned(),
                shape,
                data: Bytes::from(data),
                scalar,
            }
        });
    let arbitrary = (
        arb_string(),
        vec(any::<u64>(), 0..5),
        arb_bytes(),
        any::<bool>(),
    )
        .prop_map(|(dtype, shape, data, scalar)| NdArray {
            shared: None,
            dtype,
            shape,
            data: Bytes::from(data),
            scalar,
        });
    prop_oneof![3 => consistent, 1 => arbitrary]
}

/// A `Value` of a kind that holds no other value.
pub fn arb_leaf_value() -> impl Strategy<Value = Value> + Clone {
    prop_oneof![
        Just(Value::none()),
        any::<bool>().prop_map(Value::from),
        arb_i64().prop_map(Value::from),
        // Mostly longer than 8 bytes once trimmed, so mostly big_int_value;
        // the short ones become int_value, as Value::big_int promises.
        vec(any::<u8>(), 0..40).prop_map(|b| Value::big_int(&b)),
        arb_f64().prop_map(Value::from),
        arb_string().prop_map(Value::from),
        arb_bytes().prop_map(Value::bytes),
        (arb_f64(), arb_f64()).prop_map(|(r, i)| Value::complex(r, i)),
        arb_ndarray().prop_map(|a| Value::ndarray(a.dtype, a.shape, a.data, a.scalar)),
        arb_bytes().prop_map(Value::pickle),
    ]
}

/// Any `Value`: every kind, lists, tuples and dicts (keys of any kind)
/// nested up to 4 levels, at most about 64 values in all.
pub fn arb_value() -> impl Strategy<Value = Value> + Clone {
    arb_leaf_value().prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::list),
            vec(inner.clone(), 0..6).prop_map(Value::tuple),
            vec((inner.clone(), inner), 0..6).prop_map(Value::dict),
        ]
    })
}

/// A small `Value`, for messages that hold several.
pub fn arb_small_value() -> impl Strategy<Value = Value> + Clone {
    arb_leaf_value().prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..3).prop_map(Value::list),
            vec(inner.clone(), 0..3).prop_map(Value::tuple),
            vec((inner.clone(), inner), 0..3).prop_map(Value::dict),
        ]
    })
}

/// `ValueList`.
pub fn arb_value_list() -> impl Strategy<Value = ValueList> {
    vec(arb_small_value(), 0..6).prop_map(|items| ValueList { items })
}

/// `DictEntry`, key or value sometimes absent.
pub fn arb_dict_entry() -> impl Strategy<Value = DictEntry> {
    (sometimes(arb_small_value()), sometimes(arb_small_value()))
        .prop_map(|(key, value)| DictEntry { key, value })
}

/// `Dict`.
pub fn arb_dict() -> impl Strategy<Value = Dict> {
    vec(arb_dict_entry(), 0..6).prop_map(|entries| Dict { entries })
}

/// `Parameter`, the value sometimes absent.
pub fn arb_parameter() -> impl Strategy<Value = Parameter> {
    (arb_string(), sometimes(arb_small_value())).prop_map(|(name, value)| Parameter { name, value })
}

fn arb_parameters() -> impl Strategy<Value = Vec<Parameter>> {
    vec(arb_parameter(), 0..4)
}

// ---------------------------------------------------------------------------
// node.proto

/// `CommandRequest`.
pub fn arb_command_request() -> impl Strategy<Value = CommandRequest> {
    (
        any::<u64>(),
        arb_string(),
        arb_enum::<CommandMode>(),
        arb_parameters(),
        option::of(arb_f64()),
    )
        .prop_map(
            |(id, command, mode, parameters, deadline_seconds)| CommandRequest {
                id,
                command,
                mode,
                parameters,
                deadline_seconds,
            },
        )
}

/// `CommandResponse`.
pub fn arb_command_response() -> impl Strategy<Value = CommandResponse> {
    (
        (
            any::<u64>(),
            arb_string(),
            arb_enum::<CommandMode>(),
            arb_parameters(),
            sometimes(arb_small_value()),
            any::<i32>(),
        ),
        (
            arb_enum::<CommandStatus>(),
            any::<bool>(),
            option::of(arb_string()),
            arb_plain_f64(),
            arb_plain_f64(),
            any::<bool>(),
        ),
        (
            arb_enum::<FailureKind>(),
            option::of(any::<i32>()),
            option::of(any::<i32>()),
        ),
    )
        .prop_map(
            |(
                (id, command, mode, parameters, ret, server),
                (
                    status,
                    successful,
                    traceback,
                    command_start_time,
                    command_stop_time,
                    worker_restarted,
                ),
                (failure, worker_signal, worker_exit_code),
            )| CommandResponse {
                id,
                command,
                mode,
                parameters,
                ret,
                server,
                status,
                successful,
                traceback,
                command_start_time,
                command_stop_time,
                worker_restarted,
                failure,
                worker_signal,
                worker_exit_code,
            },
        )
}

/// `EnvironmentVariable`.
pub fn arb_environment_variable() -> impl Strategy<Value = EnvironmentVariable> {
    (arb_string(), arb_string()).prop_map(|(name, value)| EnvironmentVariable { name, value })
}

/// `ControlRequest.Start`.
pub fn arb_control_start() -> impl Strategy<Value = control_request::Start> {
    (
        arb_string(),
        vec(arb_environment_variable(), 0..4),
        arb_enum::<LogLevel>(),
    )
        .prop_map(
            |(working_directory, environment, log_level)| control_request::Start {
                working_directory,
                environment,
                log_level,
            },
        )
}

/// `ControlRequest.Stop`.
pub fn arb_control_stop() -> impl Strategy<Value = control_request::Stop> {
    any::<bool>().prop_map(|force| control_request::Stop { force })
}

/// `ControlRequest.SetLogLevel`.
pub fn arb_control_set_log_level() -> impl Strategy<Value = control_request::SetLogLevel> {
    arb_enum::<LogLevel>().prop_map(|log_level| control_request::SetLogLevel { log_level })
}

/// `ControlRequest.Cancel`.
pub fn arb_control_cancel() -> impl Strategy<Value = control_request::Cancel> {
    any::<u64>().prop_map(|request_id| control_request::Cancel { request_id })
}

/// `ControlRequest`: each action, or (rarely) none.
pub fn arb_control_request() -> impl Strategy<Value = ControlRequest> {
    use control_request::Action;
    let action = prop_oneof![
        arb_control_start().prop_map(Action::Start),
        arb_control_stop().prop_map(Action::Stop),
        arb_control_set_log_level().prop_map(Action::SetLogLevel),
        arb_control_cancel().prop_map(Action::Cancel),
    ];
    sometimes(action).prop_map(|action| ControlRequest { action })
}

/// `ControlResponse`.
pub fn arb_control_response() -> impl Strategy<Value = ControlResponse> {
    (
        any::<bool>(),
        arb_string(),
        any::<i32>(),
        arb_string(),
        any::<u32>(),
        any::<bool>(),
        any::<u32>(),
    )
        .prop_map(
            |(ok, error, rank, host, pid, shared_memory, worker_pid)| ControlResponse {
                ok,
                error,
                rank,
                host,
                pid,
                shared_memory,
                worker_pid,
            },
        )
}

/// `PingRequest`.
pub fn arb_ping_request() -> impl Strategy<Value = PingRequest> {
    any::<u64>().prop_map(|sequence| PingRequest { sequence })
}

/// `PingResponse`.
pub fn arb_ping_response() -> impl Strategy<Value = PingResponse> {
    (
        (any::<u64>(), any::<bool>(), any::<u64>(), arb_plain_f64()),
        (
            any::<u32>(),
            any::<u32>(),
            arb_string(),
            any::<u64>(),
            arb_plain_f64(),
        ),
    )
        .prop_map(
            |(
                (sequence, busy, command_id, command_start_time),
                (pid, worker_pid, host, rss_bytes, uptime_seconds),
            )| PingResponse {
                sequence,
                busy,
                command_id,
                command_start_time,
                pid,
                worker_pid,
                host,
                rss_bytes,
                uptime_seconds,
            },
        )
}

/// `LogRecord`.
pub fn arb_log_record() -> impl Strategy<Value = LogRecord> {
    (
        arb_plain_f64(),
        arb_enum::<LogLevel>(),
        arb_string(),
        any::<i32>(),
        arb_string(),
    )
        .prop_map(|(time, level, origin, rank, message)| LogRecord {
            time,
            level,
            origin,
            rank,
            message,
        })
}

// ---------------------------------------------------------------------------
// driver.proto

/// `SubmitRequest`.
pub fn arb_submit_request() -> impl Strategy<Value = SubmitRequest> {
    (
        arb_string(),
        arb_enum::<CommandMode>(),
        arb_parameters(),
        arb_ranks(),
        option::of(arb_f64()),
        arb_ids(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(command, mode, parameters, targets, deadline_seconds, ids, pipelined, no_retry)| {
                SubmitRequest {
                    command,
                    mode,
                    parameters,
                    targets,
                    deadline_seconds,
                    ids,
                    pipelined,
                    no_retry,
                }
            },
        )
}

/// `SubmitReply.Accepted`.
pub fn arb_submit_accepted() -> impl Strategy<Value = submit_reply::Accepted> {
    arb_ids().prop_map(|ids| submit_reply::Accepted { ids })
}

/// `SubmitReply.Rejected`.
pub fn arb_submit_rejected() -> impl Strategy<Value = submit_reply::Rejected> {
    (arb_enum::<RejectReason>(), arb_string())
        .prop_map(|(reason, message)| submit_reply::Rejected { reason, message })
}

/// `SubmitReply`: accepted, rejected, or (rarely) neither.
pub fn arb_submit_reply() -> impl Strategy<Value = SubmitReply> {
    use submit_reply::Outcome;
    let outcome = prop_oneof![
        arb_submit_accepted().prop_map(Outcome::Accepted),
        arb_submit_rejected().prop_map(Outcome::Rejected),
    ];
    sometimes(outcome).prop_map(|outcome| SubmitReply { outcome })
}

/// `ResponseDelivery`.
pub fn arb_response_delivery() -> impl Strategy<Value = ResponseDelivery> {
    (
        sometimes(arb_command_response()),
        any::<bool>(),
        sometimes(arb_submit_rejected()),
    )
        .prop_map(|(response, replaces_timeout, rejected)| ResponseDelivery {
            response,
            replaces_timeout,
            rejected,
        })
}

/// `TrackRequest`.
pub fn arb_track_request() -> impl Strategy<Value = TrackRequest> {
    arb_ids().prop_map(|ids| TrackRequest { ids })
}

/// `RequestState`.
pub fn arb_request_state() -> impl Strategy<Value = RequestState> {
    (any::<u64>(), arb_enum::<CommandStatus>(), any::<i32>())
        .prop_map(|(id, status, server)| RequestState { id, status, server })
}

/// `TrackReply`.
pub fn arb_track_reply() -> impl Strategy<Value = TrackReply> {
    vec(arb_request_state(), 0..5).prop_map(|states| TrackReply { states })
}

/// `StatusRequest`.
pub fn arb_status_request() -> impl Strategy<Value = StatusRequest> {
    option::of(any::<i32>()).prop_map(|server| StatusRequest { server })
}

/// `ServerStatus`.
pub fn arb_server_status() -> impl Strategy<Value = ServerStatus> {
    (
        (
            any::<i32>(),
            arb_string(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
            arb_string(),
        ),
        (
            any::<u64>(),
            arb_plain_f64(),
            any::<bool>(),
            any::<bool>(),
            arb_plain_f64(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (rank, processor, pid, worker_pid, busy, command),
                (command_id, command_start_time, timeout, online, last_ping, rss),
            )| ServerStatus {
                rank,
                processor,
                pid,
                worker_pid,
                busy,
                command,
                command_id,
                command_start_time,
                timeout,
                online,
                last_ping,
                rss,
            },
        )
}

/// `ClusterInfo`.
pub fn arb_cluster_info() -> impl Strategy<Value = ClusterInfo> {
    (
        (arb_string(), arb_string(), any::<i32>(), any::<i32>()),
        (
            arb_ranks(),
            arb_plain_f64(),
            arb_plain_f64(),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (transport, host, head_rank, world_size),
                (server_ranks, heartbeat_seconds, timeout_seconds, debugging, journal),
            )| ClusterInfo {
                transport,
                host,
                head_rank,
                world_size,
                server_ranks,
                heartbeat_seconds,
                timeout_seconds,
                debugging,
                journal,
            },
        )
}

/// `StatusReply`.
pub fn arb_status_reply() -> impl Strategy<Value = StatusReply> {
    (
        vec(arb_server_status(), 0..4),
        sometimes(arb_cluster_info()),
        any::<u64>(),
    )
        .prop_map(|(servers, cluster, queued)| StatusReply {
            servers,
            cluster,
            queued,
        })
}

/// `CancelRequest`.
pub fn arb_cancel_request() -> impl Strategy<Value = CancelRequest> {
    arb_ids().prop_map(|ids| CancelRequest { ids })
}

/// `CancelReply`.
pub fn arb_cancel_reply() -> impl Strategy<Value = CancelReply> {
    (arb_ids(), arb_ids(), arb_ids()).prop_map(|(dequeued, interrupting, not_pending)| {
        CancelReply {
            dequeued,
            interrupting,
            not_pending,
        }
    })
}

/// `LogSubscription`.
pub fn arb_log_subscription() -> impl Strategy<Value = LogSubscription> {
    (any::<bool>(), arb_enum::<LogLevel>())
        .prop_map(|(enabled, min_level)| LogSubscription { enabled, min_level })
}

/// `StopRequest`.
pub fn arb_stop_request() -> impl Strategy<Value = StopRequest> {
    any::<bool>().prop_map(|force| StopRequest { force })
}

/// `DebuggingModeRequest`.
pub fn arb_debugging_mode_request() -> impl Strategy<Value = DebuggingModeRequest> {
    any::<bool>().prop_map(|enabled| DebuggingModeRequest { enabled })
}

/// `LogLevelRequest`.
pub fn arb_log_level_request() -> impl Strategy<Value = LogLevelRequest> {
    (arb_enum::<LogLevel>(), arb_ranks())
        .prop_map(|(level, servers)| LogLevelRequest { level, servers })
}

/// `Ack`.
pub fn arb_ack() -> impl Strategy<Value = Ack> {
    (any::<bool>(), arb_string()).prop_map(|(ok, error)| Ack { ok, error })
}

// ---------------------------------------------------------------------------
// envelope.proto

/// `Hello`.
pub fn arb_hello() -> impl Strategy<Value = Hello> {
    (
        any::<u32>(),
        arb_enum::<Role>(),
        arb_string(),
        arb_string(),
        any::<u32>(),
        any::<i32>(),
        arb_string(),
    )
        .prop_map(
            |(protocol_version, role, software, host, pid, rank, token)| Hello {
                protocol_version,
                role,
                software,
                host,
                pid,
                rank,
                token,
                shared_memory: false,
            },
        )
}

/// `Welcome`.
pub fn arb_welcome() -> impl Strategy<Value = Welcome> {
    (
        any::<u32>(),
        arb_enum::<Role>(),
        arb_string(),
        any::<i32>(),
        sometimes(arb_cluster_info()),
    )
        .prop_map(
            |(protocol_version, role, software, rank, cluster)| Welcome {
                protocol_version,
                role,
                software,
                rank,
                cluster,
                shared_memory_directory: String::new(),
                shared_memory_tag: String::new(),
            },
        )
}

/// `ProtocolError`.
pub fn arb_protocol_error() -> impl Strategy<Value = ProtocolError> {
    (arb_enum::<ProtocolErrorCode>(), arb_string())
        .prop_map(|(code, message)| ProtocolError { code, message })
}

/// Any `Envelope` body, every variant equally likely.
pub fn arb_body() -> impl Strategy<Value = Body> {
    proptest::strategy::Union::new(vec![
        arb_hello().prop_map(Body::Hello).boxed(),
        arb_welcome()
            .prop_map(|m| Body::Welcome(Box::new(m)))
            .boxed(),
        arb_protocol_error().prop_map(Body::Error).boxed(),
        arb_command_request().prop_map(Body::CommandRequest).boxed(),
        arb_command_response()
            .prop_map(|m| Body::CommandResponse(Box::new(m)))
            .boxed(),
        arb_control_request().prop_map(Body::ControlRequest).boxed(),
        arb_control_response()
            .prop_map(Body::ControlResponse)
            .boxed(),
        arb_ping_request().prop_map(Body::PingRequest).boxed(),
        arb_ping_response().prop_map(Body::PingResponse).boxed(),
        arb_log_record().prop_map(Body::LogRecord).boxed(),
        arb_submit_request()
            .prop_map(|m| Body::SubmitRequest(Box::new(m)))
            .boxed(),
        arb_submit_reply().prop_map(Body::SubmitReply).boxed(),
        arb_response_delivery()
            .prop_map(|m| Body::ResponseDelivery(Box::new(m)))
            .boxed(),
        arb_status_request().prop_map(Body::StatusRequest).boxed(),
        arb_status_reply()
            .prop_map(|m| Body::StatusReply(Box::new(m)))
            .boxed(),
        arb_cancel_request().prop_map(Body::CancelRequest).boxed(),
        arb_cancel_reply().prop_map(Body::CancelReply).boxed(),
        arb_log_subscription()
            .prop_map(Body::LogSubscription)
            .boxed(),
        arb_stop_request().prop_map(Body::StopRequest).boxed(),
        arb_debugging_mode_request()
            .prop_map(Body::DebuggingModeRequest)
            .boxed(),
        arb_track_request().prop_map(Body::TrackRequest).boxed(),
        arb_track_reply().prop_map(Body::TrackReply).boxed(),
        arb_log_level_request()
            .prop_map(Body::LogLevelRequest)
            .boxed(),
        arb_ack().prop_map(Body::Ack).boxed(),
        any::<u32>()
            .prop_map(|count| Body::IdLeaseRequest(IdLeaseRequest { count }))
            .boxed(),
        (any::<u64>(), any::<u32>())
            .prop_map(|(first, count)| Body::IdLease(IdLease { first, count }))
            .boxed(),
        vec(any::<u64>(), 0..4)
            .prop_map(|ids| Body::ClaimRequest(pb::ClaimRequest { ids }))
            .boxed(),
        (
            vec(any::<u64>(), 0..4),
            vec(any::<u64>(), 0..4),
            vec(any::<u64>(), 0..4),
        )
            .prop_map(|(answered, pending, unknown)| {
                Body::ClaimReply(pb::ClaimReply {
                    answered,
                    pending,
                    unknown,
                })
            })
            .boxed(),
    ])
}

/// Any `Envelope` with a body: any body variant with random contents, any
/// correlation, and mostly the current protocol version (sometimes any).
pub fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (
        prop_oneof![
            3 => Just(crate::PROTOCOL_VERSION),
            1 => any::<u32>(),
        ],
        prop_oneof![Just(0u64), any::<u64>()],
        arb_body(),
    )
        .prop_map(|(protocol_version, correlation, body)| pb::Envelope {
            protocol_version,
            correlation,
            body: Some(body),
        })
}

// ---------------------------------------------------------------------------
// Wire input

/// Input for the decoders: random bytes; a plausible length prefix (small,
/// near a limit, huge, or exactly the rest) followed by random bytes; and
/// real frames with bytes flipped, cut short or extended.
pub fn arb_wire_input() -> impl Strategy<Value = Vec<u8>> {
    let prefixed = (
        prop_oneof![
            0u32..64,
            1000u32..1100,
            Just(u32::MAX),
            Just(0xFFFF_FFF0),
            any::<u32>(),
        ],
        vec(any::<u8>(), 0..2048),
    )
        .prop_map(|(len, rest)| {
            let mut input = len.to_be_bytes().to_vec();
            input.extend(rest);
            input
        });
    let exact_prefix = vec(any::<u8>(), 0..2048).prop_map(|body| {
        let mut input = (body.len() as u32).to_be_bytes().to_vec();
        input.extend(body);
        input
    });
    let mutated = (
        arb_envelope(),
        vec((any::<Index>(), 1u8..=255), 0..4),
        proptest::option::weighted(0.3, any::<Index>()),
        vec(any::<u8>(), 0..8),
    )
        .prop_map(|(envelope, flips, cut, tail)| {
            let mut input = Framing::default()
                .encode_to_bytes(&envelope)
                .unwrap()
                .to_vec();
            for (at, mask) in flips {
                let at = at.index(input.len());
                input[at] ^= mask;
            }
            if let Some(cut) = cut {
                input.truncate(cut.index(input.len() + 1));
            }
            input.extend(tail);
            input
        });
    prop_oneof![
        1 => vec(any::<u8>(), 0..4096),
        1 => prefixed,
        1 => exact_prefix,
        2 => mutated,
    ]
}

// ---------------------------------------------------------------------------
// Hostile input, for the fuzz targets (`tests/fuzz.rs` here, and the Python
// worker's in `crates/node/tests/bad_input.rs`): wire structures built field
// by field (deep nesting, empty elements by the thousand, unknown fields and
// groups, odd varints, invalid UTF-8, merged duplicates), and valid
// encodings damaged (bits flipped, cut short, lengths set huge or short,
// wire types changed, bytes inserted).

/// `value` as a protobuf varint.
pub fn varint(value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(value, &mut out);
    out
}

/// The key of field `number` with wire type `wire`.
pub fn key(number: u32, wire: u8) -> Vec<u8> {
    varint(u64::from(number) << 3 | u64::from(wire))
}

/// `content` as length-delimited field `number`.
pub fn ld(number: u32, content: &[u8]) -> Vec<u8> {
    let mut out = key(number, 2);
    out.extend(varint(content.len() as u64));
    out.extend_from_slice(content);
    out
}

/// Where a value sits in an envelope.
#[derive(Debug, Clone, Copy)]
pub enum Place {
    /// `CommandRequest.parameters[0].value` (Envelope field 20).
    CommandParameter,
    /// `CommandResponse.ret` (field 21).
    CommandRet,
    /// `SubmitRequest.parameters[0].value` (field 40), command `v`.
    SubmitParameter,
    /// `ResponseDelivery.response.ret` (field 42): the deepest place.
    DeliveredRet,
}

/// An envelope body holding the Value encoded as `value` at `place`.
pub fn envelope_with_value(place: Place, value: &[u8]) -> Vec<u8> {
    let mut body = vec![0x08, crate::PROTOCOL_VERSION as u8];
    body.extend(match place {
        Place::CommandParameter => ld(20, &ld(4, &[ld(1, b"v"), ld(2, value)].concat())),
        Place::CommandRet => ld(21, &ld(5, value)),
        Place::SubmitParameter => ld(
            40,
            &[ld(1, b"v"), ld(3, &[ld(1, b"v"), ld(2, value)].concat())].concat(),
        ),
        Place::DeliveredRet => ld(42, &ld(1, &ld(5, value))),
    });
    body
}

/// Any place.
pub fn arb_place() -> impl Strategy<Value = Place> + Clone {
    proptest::sample::select(vec![
        Place::CommandParameter,
        Place::CommandRet,
        Place::SubmitParameter,
        Place::DeliveredRet,
    ])
}

/// How one level of a chain of containers nests its inner value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// `[inner]`: 2 messages.
    List,
    /// `(inner,)`: 2 messages.
    Tuple,
    /// `{inner: 1}`: 3 messages.
    DictKey,
    /// `{1: inner}`: 3 messages.
    DictValue,
}

impl Level {
    /// The protobuf messages this level adds to a value's depth.
    pub fn cost(self) -> usize {
        match self {
            Level::List | Level::Tuple => 2,
            Level::DictKey | Level::DictValue => 3,
        }
    }
}

/// Values for the bottom of a chain, each with its depth: scalars are 1
/// message deep, `None`, complex numbers, arrays and empty containers 2.
pub fn chain_leaves() -> Vec<(Value, usize)> {
    vec![
        (Value::from(7), 1),
        (Value::from("leaf"), 1),
        (Value::none(), 2),
        (Value::complex(1.0, -0.0), 2),
        (
            Value::ndarray("<f8", vec![1], Bytes::from_static(&[0; 8]), false),
            2,
        ),
        (Value::list([]), 2),
        (Value::dict([]), 2),
    ]
}

/// Levels of `level` (with up to two lists to make up the difference)
/// around a leaf `leaf_depth` deep that make a value `depth` deep.
pub fn levels_for(depth: usize, level: Level, leaf_depth: usize) -> Option<Vec<Level>> {
    let above = depth.checked_sub(leaf_depth)?;
    let lists = (0..=2).find(|m| {
        above
            .checked_sub(2 * m)
            .is_some_and(|rest| rest % level.cost() == 0)
    })?;
    let mut levels = vec![Level::List; lists];
    levels.extend(std::iter::repeat_n(
        level,
        (above - 2 * lists) / level.cost(),
    ));
    Some(levels)
}

/// The encoding of `leaf` (a Value's bytes) inside `levels` (outermost
/// first), built on the wire without a Value in memory, so that any depth
/// can be made. Its depth is the sum of the levels' costs and the leaf's.
pub fn chain(levels: &[Level], leaf: &[u8]) -> Vec<u8> {
    let one = [0x18, 0x02]; // int 1
    let mut value = leaf.to_vec();
    for level in levels.iter().rev() {
        value = match level {
            Level::List => ld(8, &ld(1, &value)),
            Level::Tuple => ld(9, &ld(1, &value)),
            Level::DictKey => ld(10, &ld(1, &[ld(1, &value), ld(2, &one)].concat())),
            Level::DictValue => ld(10, &ld(1, &[ld(1, &one), ld(2, &value)].concat())),
        };
    }
    value
}

/// A chain of containers, 0 to 60 levels of any kind around any leaf
/// (depths from 1 to 182, across `MAX_VALUE_DEPTH`), or one of the
/// extremes (hundreds or thousands of levels), with its depth.
pub fn arb_chain() -> impl Strategy<Value = (Vec<u8>, usize)> {
    let level = proptest::sample::select(vec![
        Level::List,
        Level::Tuple,
        Level::DictKey,
        Level::DictValue,
    ]);
    let leaf = proptest::sample::select(chain_leaves());
    let near = (vec(level.clone(), 0..60), leaf.clone()).prop_map(|(levels, (leaf, d))| {
        let depth = levels.iter().map(|l| l.cost()).sum::<usize>() + d;
        (chain(&levels, &leaf.encode_to_vec()), depth)
    });
    let extreme = (
        proptest::sample::select(vec![100usize, 300, 1500]),
        level,
        leaf,
    )
        .prop_map(|(n, level, (leaf, d))| {
            let levels = vec![level; n];
            (chain(&levels, &leaf.encode_to_vec()), n * level.cost() + d)
        });
    prop_oneof![6 => near, 1 => extreme]
}

/// A field nobody knows: any wire type (groups included, nested, even
/// ill-matched), with a field number above those of casa.node.v1.
pub fn arb_unknown_field() -> impl Strategy<Value = Vec<u8>> + Clone {
    (100u32..5000, 0u8..8, vec(any::<u8>(), 0..12), any::<u64>()).prop_map(
        |(number, kind, bytes, n)| match kind {
            0 => [key(number, 0), varint(n)].concat(),
            1 => [key(number, 1), n.to_le_bytes().to_vec()].concat(),
            2 => ld(number, &bytes),
            3 => [key(number, 5), (n as u32).to_le_bytes().to_vec()].concat(),
            4 => [
                key(number, 3),
                key(number + 1, 0),
                varint(n),
                key(number, 4),
            ]
            .concat(),
            5 => [
                key(number, 3),
                key(number + 1, 3),
                ld(9, &bytes),
                key(number + 1, 4),
                key(number, 4),
            ]
            .concat(),
            // A group ended by another tag, or never ended.
            6 => [key(number, 3), varint(n % 100), key(number + 1, 4)].concat(),
            _ => [key(number, 3), key(number, 0), varint(n)].concat(),
        },
    )
}

/// The fields of a Value that is odd but small: no kind, two kinds, a bool
/// of 2, varints of 10 and 11 bytes, a string that is not UTF-8, an empty
/// big int, or unknown fields.
fn arb_odd_value() -> impl Strategy<Value = Vec<u8>> + Clone {
    prop_oneof![
        Just(Vec::new()),
        Just(vec![0x0a, 0x00, 0x18, 0x02]),
        Just(vec![0x10, 0x02]),
        Just(vec![
            0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
        ]),
        Just(vec![
            0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02
        ]),
        Just(vec![
            0x18, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00
        ]),
        Just(vec![0x32, 0x02, 0xff, 0xfe]),
        Just(vec![0x32, 0x03, 0xed, 0xa0, 0x80]),
        Just(vec![0x22, 0x00]),
        Just(vec![0x5a, 0x09, 0x09, 1, 2, 3, 4, 5, 6, 7, 8]),
        Just(vec![0x62, 0x04, 0x12, 0x02, 0x80, 0x01]),
        Just(vec![0x62, 0x03, 0x12, 0x01, 0x80]),
        arb_unknown_field(),
    ]
}

/// A Value's encoding built field by field, with odd values, unknown
/// fields, empty and incomplete dict entries and merged duplicates at any
/// level, nested a few levels.
pub fn arb_hostile_value() -> impl Strategy<Value = Vec<u8>> + Clone {
    let leaf = prop_oneof![
        3 => arb_leaf_value().prop_map(|v| v.encode_to_vec()),
        2 => arb_odd_value(),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        let entry = (
            option::of(inner.clone()),
            option::of(inner.clone()),
            option::weighted(0.2, arb_unknown_field()),
        )
            .prop_map(|(k, v, junk)| {
                let mut entry = Vec::new();
                if let Some(k) = k {
                    entry.extend(ld(1, &k));
                }
                if let Some(v) = v {
                    entry.extend(ld(2, &v));
                }
                entry.extend(junk.unwrap_or_default());
                ld(1, &entry)
            });
        prop_oneof![
            (
                proptest::sample::select(vec![8u32, 9]),
                vec(inner.clone(), 0..6)
            )
                .prop_map(|(field, items)| {
                    let items: Vec<u8> = items.iter().flat_map(|i| ld(1, i)).collect();
                    ld(field, &items)
                }),
            vec(entry, 0..5).prop_map(|entries| ld(10, &entries.concat())),
            // Two values' fields in one: a merge, or a kind replaced.
            (inner.clone(), inner.clone()).prop_map(|(a, b)| [a, b].concat()),
            (inner, arb_unknown_field()).prop_map(|(a, junk)| [a, junk].concat()),
        ]
    })
}

/// Envelope bodies whose decoded structs are large for their length:
/// thousands of empty values, dict entries, parameters, server statuses,
/// request states or packed ids, repeated boxed bodies and strings, and
/// (for comparison) the largest well-formed structures (lists of `None`,
/// of one-item lists, of one-entry dicts), sometimes padded with an
/// unknown field that is not part of the content.
pub fn arb_expansive_body() -> impl Strategy<Value = Vec<u8>> {
    let version = vec![0x08, 0x01];
    (
        0usize..14,
        0usize..3000,
        option::weighted(0.3, 0usize..60_000),
    )
        .prop_map(move |(shape, n, padding)| {
            let repeat = |item: &[u8]| -> Vec<u8> { item.repeat(n) };
            let value_place = |value: Vec<u8>| envelope_with_value(Place::CommandParameter, &value);
            let mut body = match shape {
                0 => value_place(ld(8, &repeat(&[0x0a, 0x00]))), // [<no kind>] * n
                1 => value_place(ld(10, &repeat(&[0x0a, 0x00]))), // {<empty entry>} * n
                2 => value_place(ld(8, &repeat(&[0x0a, 0x02, 0x0a, 0x00]))), // [None] * n
                3 => value_place(ld(8, &repeat(&ld(1, &ld(8, &ld(1, &[0x0a, 0x00])))))), // [[None]] * n
                4 => value_place(ld(
                    8,
                    &repeat(&ld(
                        1,
                        &ld(
                            10,
                            &ld(1, &[ld(1, &[0x0a, 0x00]), ld(2, &[0x0a, 0x00])].concat()),
                        ),
                    )),
                )), // [{None: None}] * n
                5 => [version.clone(), ld(40, &repeat(&[0x1a, 0x00]))].concat(), // SubmitRequest, n empty parameters
                6 => [version.clone(), ld(20, &repeat(&[0x22, 0x00]))].concat(), // CommandRequest, n empty parameters
                7 => [version.clone(), ld(44, &repeat(&[0x0a, 0x00]))].concat(), // StatusReply, n empty ServerStatus
                8 => [version.clone(), ld(51, &repeat(&[0x0a, 0x00]))].concat(), // TrackReply, n empty RequestState
                9 => [version.clone(), ld(46, &ld(1, &vec![0; n]))].concat(), // CancelReply, n packed ids
                10 => [version.clone(), repeat(&[0x5a, 0x00])].concat(),      // Welcome, n times
                11 => [version.clone(), ld(10, &repeat(&[0x1a, 0x01, b'x']))].concat(), // Hello.software, n times
                // Hello.software of 8n bytes, then again one byte longer:
                // the string's buffer doubles while the old one is live.
                12 => {
                    let long = vec![b'x'; 8 * n];
                    let longer = vec![b'y'; 8 * n + 1];
                    [
                        version.clone(),
                        ld(10, &[ld(3, &long), ld(3, &longer)].concat()),
                    ]
                    .concat()
                }
                _ => [version.clone(), repeat(&[0x5a, 0x00, 0xe2, 0x02, 0x00])].concat(), // Welcome and StatusReply, alternating
            };
            if let Some(padding) = padding {
                body.extend(ld(1000, &vec![0x55; padding]));
            }
            body
        })
}

/// Where the length-delimited fields of an encoding are, as (key start,
/// length start, contents start, contents end), found by a walk that
/// takes a length-delimited field's contents for a message when they parse
/// as one.
pub fn length_fields(buf: &[u8]) -> Vec<(usize, usize, usize, usize)> {
    fn read_varint(buf: &[u8], pos: &mut usize, end: usize) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = *buf[..end].get(*pos)?;
            *pos += 1;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }
    fn walk(
        buf: &[u8],
        start: usize,
        end: usize,
        out: &mut Vec<(usize, usize, usize, usize)>,
    ) -> bool {
        let mut pos = start;
        let mark = out.len();
        while pos < end {
            let key_at = pos;
            let Some(key) = read_varint(buf, &mut pos, end) else {
                out.truncate(mark);
                return false;
            };
            let ok = match key & 7 {
                0 => read_varint(buf, &mut pos, end).is_some(),
                1 => {
                    pos += 8;
                    pos <= end
                }
                5 => {
                    pos += 4;
                    pos <= end
                }
                2 => {
                    let len_at = pos;
                    match read_varint(buf, &mut pos, end) {
                        Some(len) if len <= (end - pos) as u64 => {
                            let (a, b) = (pos, pos + len as usize);
                            out.push((key_at, len_at, a, b));
                            walk(buf, a, b, out);
                            pos = b;
                            true
                        }
                        _ => false,
                    }
                }
                _ => false,
            };
            if !ok || key >> 3 == 0 {
                out.truncate(mark);
                return false;
            }
        }
        true
    }
    let mut out = Vec::new();
    walk(buf, 0, buf.len(), &mut out);
    out
}

/// One way to damage an encoding.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// XOR a byte with a mask.
    Flip(Index, u8),
    /// Cut the encoding short.
    Truncate(Index),
    /// Set a length field to a huge value (or one past the truth).
    HugeLength(Index, u64),
    /// Make a length field one byte short.
    ShortLength(Index),
    /// Repeat a length-delimited field right after itself.
    Duplicate(Index),
    /// Change a one-byte key's wire type.
    WireType(Index, u8),
    /// Make the first byte of a field's contents 0xff (not UTF-8).
    NotUtf8(Index),
    /// Insert bytes anywhere.
    Insert(Index, Vec<u8>),
    /// Append a field at the top level.
    Append(Vec<u8>),
}

/// Any mutation.
pub fn arb_mutation() -> impl Strategy<Value = Mutation> + Clone {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        any::<Index>().prop_map(Mutation::Truncate),
        (
            any::<Index>(),
            proptest::sample::select(vec![
                u64::from(u32::MAX),
                1 << 31,
                u64::MAX >> 1,
                u64::MAX,
                1,
                1000,
            ])
        )
            .prop_map(|(i, n)| Mutation::HugeLength(i, n)),
        any::<Index>().prop_map(Mutation::ShortLength),
        any::<Index>().prop_map(Mutation::Duplicate),
        (any::<Index>(), 0u8..8).prop_map(|(i, w)| Mutation::WireType(i, w)),
        any::<Index>().prop_map(Mutation::NotUtf8),
        (any::<Index>(), vec(any::<u8>(), 1..6)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        arb_unknown_field().prop_map(Mutation::Append),
    ]
}

/// `buf` with `mutation` applied (unchanged when it does not apply).
pub fn mutate(buf: &mut Vec<u8>, mutation: &Mutation) {
    let fields = length_fields(buf);
    let field = |i: &Index| (!fields.is_empty()).then(|| fields[i.index(fields.len())]);
    match mutation {
        Mutation::Flip(i, mask) if !buf.is_empty() => {
            let at = i.index(buf.len());
            buf[at] ^= mask;
        }
        Mutation::Truncate(i) => buf.truncate(i.index(buf.len() + 1)),
        Mutation::HugeLength(i, n) => {
            if let Some((_, len_at, a, b)) = field(i) {
                let n = if *n == 1 || *n == 1000 {
                    (b - a) as u64 + n
                } else {
                    *n
                };
                buf.splice(len_at..a, varint(n));
            }
        }
        Mutation::ShortLength(i) => {
            if let Some((_, len_at, a, b)) = field(i) {
                if b > a {
                    buf.splice(len_at..a, varint((b - a - 1) as u64));
                }
            }
        }
        Mutation::Duplicate(i) => {
            if let Some((key_at, _, _, b)) = field(i) {
                let copy = buf[key_at..b].to_vec();
                buf.splice(b..b, copy);
            }
        }
        Mutation::WireType(i, wire) => {
            if let Some((key_at, len_at, _, _)) = field(i) {
                if len_at == key_at + 1 {
                    buf[key_at] = (buf[key_at] & !7) | wire;
                }
            }
        }
        Mutation::NotUtf8(i) => {
            if let Some((_, _, a, b)) = field(i) {
                if b > a {
                    buf[a] = 0xff;
                }
            }
        }
        Mutation::Insert(i, bytes) => {
            let at = i.index(buf.len() + 1);
            buf.splice(at..at, bytes.iter().copied());
        }
        Mutation::Append(field) => buf.extend_from_slice(field),
        Mutation::Flip(..) => {}
    }
}

/// `base` with one to four mutations applied.
pub fn arb_mutated(base: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (base, vec(arb_mutation(), 1..5)).prop_map(|(mut buf, mutations)| {
        for mutation in &mutations {
            mutate(&mut buf, mutation);
        }
        buf
    })
}

/// Envelope bodies for the fuzz target: random bytes, valid envelopes,
/// valid envelopes damaged, envelopes carrying hostile values and deep
/// chains anywhere a value goes, large-for-their-length structures, and
/// all of these damaged.
pub fn arb_hostile_body() -> impl Strategy<Value = Vec<u8>> {
    fn valid() -> impl Strategy<Value = Vec<u8>> {
        arb_envelope().prop_map(|e| e.encode_to_vec())
    }
    fn hostile() -> impl Strategy<Value = Vec<u8>> {
        (arb_place(), arb_hostile_value()).prop_map(|(p, v)| envelope_with_value(p, &v))
    }
    fn deep() -> impl Strategy<Value = Vec<u8>> {
        (arb_place(), arb_chain()).prop_map(|(p, (v, _))| envelope_with_value(p, &v))
    }
    prop_oneof![
        1 => vec(any::<u8>(), 0..256),
        1 => vec(any::<u8>(), 0..4096),
        2 => valid(),
        4 => arb_mutated(valid()),
        3 => hostile(),
        2 => arb_mutated(hostile()),
        2 => deep(),
        1 => arb_mutated(deep()),
        1 => arb_expansive_body(),
        1 => arb_mutated(arb_expansive_body()),
    ]
}

/// Values large for their length: up to 3000 values without a kind,
/// empty dict entries, `None`s, one-item lists or one-entry dicts in a list.
pub fn arb_expansive_value() -> impl Strategy<Value = Vec<u8>> {
    (0usize..5, 0usize..3000).prop_map(|(shape, n)| {
        let item: Vec<u8> = match shape {
            0 | 1 => vec![0x0a, 0x00],
            2 => vec![0x0a, 0x02, 0x0a, 0x00],
            3 => ld(1, &ld(8, &ld(1, &[0x0a, 0x00]))),
            _ => ld(
                1,
                &ld(
                    10,
                    &ld(1, &[ld(1, &[0x0a, 0x00]), ld(2, &[0x0a, 0x00])].concat()),
                ),
            ),
        };
        ld(if shape == 1 { 10 } else { 8 }, &item.repeat(n))
    })
}

/// Bare Value encodings for the fuzz targets: random bytes, valid values,
/// hostile values, deep chains, large-for-their-length values, and all of
/// these damaged.
pub fn arb_hostile_value_bytes() -> impl Strategy<Value = Vec<u8>> {
    fn valid() -> impl Strategy<Value = Vec<u8>> {
        arb_value().prop_map(|v| v.encode_to_vec())
    }
    fn deep() -> impl Strategy<Value = Vec<u8>> {
        arb_chain().prop_map(|(v, _)| v)
    }
    prop_oneof![
        1 => vec(any::<u8>(), 0..512),
        2 => valid(),
        3 => arb_mutated(valid()),
        3 => arb_hostile_value(),
        2 => arb_mutated(arb_hostile_value()),
        2 => deep(),
        1 => arb_mutated(deep()),
        1 => arb_expansive_value(),
        1 => arb_mutated(arb_expansive_value()),
    ]
}

/// True when `value` is what a conforming encoder writes for some Python
/// object: every value has a kind; every dict entry a key and a value;
/// both parts of a complex are present; a big int is in shortest form and
/// outside 64 bits.
pub fn well_formed(value: &Value) -> bool {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match &value.kind {
            None => return false,
            Some(Kind::ComplexValue(c)) if c.real.is_none() || c.imag.is_none() => return false,
            Some(Kind::BigIntValue(b)) => {
                if Value::big_int(b) != *value {
                    return false;
                }
            }
            Some(Kind::ListValue(list)) | Some(Kind::TupleValue(list)) => {
                pending.extend(&list.items);
            }
            Some(Kind::DictValue(dict)) => {
                for entry in &dict.entries {
                    match (&entry.key, &entry.value) {
                        (Some(k), Some(v)) => pending.extend([k, v]),
                        _ => return false,
                    }
                }
            }
            Some(_) => {}
        }
    }
    true
}

/// The values an envelope carries (parameters and returned values).
pub fn envelope_values(envelope: &Envelope) -> Vec<&Value> {
    fn parameters(ps: &[Parameter]) -> Vec<&Value> {
        ps.iter().filter_map(|p| p.value.as_ref()).collect()
    }
    match &envelope.body {
        Some(Body::CommandRequest(r)) => parameters(&r.parameters),
        Some(Body::SubmitRequest(r)) => parameters(&r.parameters),
        Some(Body::CommandResponse(r)) => r.ret.iter().collect(),
        Some(Body::ResponseDelivery(d)) => d.response.iter().flat_map(|r| r.ret.iter()).collect(),
        _ => Vec::new(),
    }
}
