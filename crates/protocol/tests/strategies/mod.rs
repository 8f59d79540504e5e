//! proptest strategies for every message of `casa.node.v1`, shared by the
//! protocol crate's integration tests (`mod strategies;`).
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

#![allow(dead_code)]

use std::fmt::Debug;

use bytes::Bytes;
use casa_node_protocol::Framing;
use casa_node_protocol::pb::{
    self, Ack, CancelReply, CancelRequest, ClusterInfo, CommandMode, CommandRequest,
    CommandResponse, CommandStatus, Complex, ControlRequest, ControlResponse, DebuggingModeRequest,
    Dict, DictEntry, Envelope, EnvironmentVariable, Hello, LogLevel, LogLevelRequest, LogRecord,
    LogSubscription, NdArray, Null, Parameter, PingRequest, PingResponse, ProtocolError,
    ProtocolErrorCode, RejectReason, RequestState, ResponseDelivery, Role, ServerStatus,
    StatusReply, StatusRequest, StopRequest, SubmitReply, SubmitRequest, TrackReply, TrackRequest,
    Value, ValueList, Welcome, control_request, envelope::Body, submit_reply,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::Index;

/// The name ([`Body::name`]) of every `Envelope` body variant, in field
/// number order. `arb_envelope_covers_every_body_variant` in `codec.rs`
/// checks that [`arb_envelope`] produces each of them.
pub const BODY_NAMES: [&str; 24] = [
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
        any::<i64>().prop_map(Value::from),
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
    )
        .prop_map(|(ok, error, rank, host, pid)| ControlResponse {
            ok,
            error,
            rank,
            host,
            pid,
        })
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
    )
        .prop_map(
            |(command, mode, parameters, targets, deadline_seconds)| SubmitRequest {
                command,
                mode,
                parameters,
                targets,
                deadline_seconds,
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
    (sometimes(arb_command_response()), any::<bool>()).prop_map(|(response, replaces_timeout)| {
        ResponseDelivery {
            response,
            replaces_timeout,
        }
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
        (arb_ranks(), arb_plain_f64(), arb_plain_f64(), any::<bool>()),
    )
        .prop_map(
            |(
                (transport, host, client_rank, world_size),
                (server_ranks, heartbeat_seconds, timeout_seconds, debugging),
            )| ClusterInfo {
                transport,
                host,
                client_rank,
                world_size,
                server_ranks,
                heartbeat_seconds,
                timeout_seconds,
                debugging,
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
    )
        .prop_map(
            |(protocol_version, role, software, host, pid, rank)| Hello {
                protocol_version,
                role,
                software,
                host,
                pid,
                rank,
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
    ])
}

/// Any `Envelope` with a body: any body variant with random contents, any
/// correlation, and mostly the current protocol version (sometimes any).
pub fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (
        prop_oneof![
            3 => Just(casa_node_protocol::PROTOCOL_VERSION),
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
