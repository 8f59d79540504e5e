//! Property tests of the protocol's codec: every message of `casa.node.v1`
//! survives encoding and decoding (SEMANTICS rule 8 for values), framing
//! splits and joins streams correctly, and no input, however malformed,
//! makes a decoder panic.
//!
//! Equality is checked on `Debug` output as well as on bytes: `PartialEq`
//! cannot compare values holding NaN, and the `Debug` text shows every
//! field, the sign of zero included.

use std::collections::BTreeSet;
use std::fmt::Debug;

use bytes::{Bytes, BytesMut};
use casa_node_protocol::pb::{self, Envelope, Value, value::Kind};
use casa_node_protocol::{DEFAULT_MAX_FRAME, FrameError, Framing, LENGTH_PREFIX};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use prost::Message;

use casa_node_protocol::strategies::*;

/// Encodes `original`, decodes the bytes, and checks that the decoded
/// message re-encodes to the same bytes and prints the same as the original.
fn check_round_trip<M: Message + Default + Debug>(original: &M) -> Result<(), TestCaseError> {
    let bytes = original.encode_to_vec();
    prop_assert_eq!(original.encoded_len(), bytes.len(), "encoded_len is wrong");
    let decoded = M::decode(bytes.as_slice())
        .map_err(|e| TestCaseError::fail(format!("own encoding does not decode: {e}")))?;
    prop_assert_eq!(
        decoded.encode_to_vec(),
        bytes,
        "re-encoding changed the bytes"
    );
    prop_assert_eq!(format!("{decoded:?}"), format!("{original:?}"));
    Ok(())
}

// ---------------------------------------------------------------------------
// (a) Values: rule 8

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Rule 8: every kind of Value (nested lists, tuples, dicts with keys of
    /// any kind, big ints, NaN/inf/-0.0, complex, ndarrays, bytes, pickles)
    /// comes back from encode -> decode exactly: same bytes when re-encoded,
    /// same Debug text, same Python repr.
    #[test]
    fn rule_8_every_value_round_trips_losslessly(value in arb_value()) {
        check_round_trip(&value)?;
        let decoded = Value::decode(value.encode_to_vec().as_slice()).unwrap();
        prop_assert_eq!(decoded.to_string(), value.to_string());
    }

    /// Rule 8: a float keeps its exact bits (NaN payloads, -0.0, inf).
    #[test]
    fn rule_8_floats_keep_their_bits(d in arb_f64()) {
        let decoded = Value::decode(Value::from(d).encode_to_vec().as_slice()).unwrap();
        match decoded.kind {
            Some(Kind::DoubleValue(back)) => prop_assert_eq!(back.to_bits(), d.to_bits()),
            other => prop_assert!(false, "expected a double, got {:?}", other),
        }
    }

    /// Rule 8: an int of any size comes back as the same number, whether it
    /// was carried as int_value or big_int_value.
    #[test]
    fn rule_8_ints_of_any_size_keep_their_value(n in any::<i128>()) {
        let decoded = Value::decode(Value::from(n).encode_to_vec().as_slice()).unwrap();
        prop_assert_eq!(i128::try_from(&decoded).unwrap(), n);
        prop_assert_eq!(decoded.to_string(), n.to_string());
    }
}

/// Rule 8: the special floats by name, inside a list, a tuple and a dict.
#[test]
fn rule_8_nan_inf_and_negative_zero_survive_in_containers() {
    let specials = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 0.0];
    let value = Value::dict([
        (
            Value::tuple(specials.map(Value::from)),
            Value::list(specials.map(Value::from)),
        ),
        (Value::from(f64::NAN), Value::from(-0.0)),
    ]);
    let decoded = Value::decode(value.encode_to_vec().as_slice()).unwrap();
    assert_eq!(format!("{decoded:?}"), format!("{value:?}"));
    assert_eq!(
        decoded.to_string(),
        "{(nan, inf, -inf, -0.0, 0.0): [nan, inf, -inf, -0.0, 0.0], nan: -0.0}"
    );
}

/// Rule 8: the sign of a zero complex part survives (the parts are
/// `optional double`, so proto3 writes -0.0).
#[test]
fn rule_8_complex_keeps_the_sign_of_zero() {
    let value = Value::complex(-0.0, -0.0);
    let decoded = Value::decode(value.encode_to_vec().as_slice()).unwrap();
    assert_eq!(format!("{decoded:?}"), format!("{value:?}"));
}

// ---------------------------------------------------------------------------
// (b) Every message type, and every Envelope body variant

macro_rules! round_trip_each_message {
    ($($name:ident: $strategy:expr;)*) => {
        proptest! {
            $(
                /// This message type, with random contents, survives
                /// encode -> decode -> encode with identical bytes and
                /// identical Debug text.
                #[test]
                fn $name(message in $strategy) {
                    check_round_trip(&message)?;
                }
            )*
        }
    };
}

round_trip_each_message! {
    round_trip_null: arb_null();
    round_trip_value_list: arb_value_list();
    round_trip_dict: arb_dict();
    round_trip_dict_entry: arb_dict_entry();
    round_trip_complex: arb_complex();
    round_trip_nd_array: arb_ndarray();
    round_trip_parameter: arb_parameter();
    round_trip_command_request: arb_command_request();
    round_trip_command_response: arb_command_response();
    round_trip_control_request: arb_control_request();
    round_trip_control_request_start: arb_control_start();
    round_trip_control_request_stop: arb_control_stop();
    round_trip_control_request_set_log_level: arb_control_set_log_level();
    round_trip_control_request_cancel: arb_control_cancel();
    round_trip_environment_variable: arb_environment_variable();
    round_trip_control_response: arb_control_response();
    round_trip_ping_request: arb_ping_request();
    round_trip_ping_response: arb_ping_response();
    round_trip_log_record: arb_log_record();
    round_trip_submit_request: arb_submit_request();
    round_trip_submit_reply: arb_submit_reply();
    round_trip_submit_reply_accepted: arb_submit_accepted();
    round_trip_submit_reply_rejected: arb_submit_rejected();
    round_trip_response_delivery: arb_response_delivery();
    round_trip_track_request: arb_track_request();
    round_trip_track_reply: arb_track_reply();
    round_trip_request_state: arb_request_state();
    round_trip_status_request: arb_status_request();
    round_trip_status_reply: arb_status_reply();
    round_trip_server_status: arb_server_status();
    round_trip_cancel_request: arb_cancel_request();
    round_trip_cancel_reply: arb_cancel_reply();
    round_trip_log_subscription: arb_log_subscription();
    round_trip_stop_request: arb_stop_request();
    round_trip_debugging_mode_request: arb_debugging_mode_request();
    round_trip_log_level_request: arb_log_level_request();
    round_trip_ack: arb_ack();
    round_trip_cluster_info: arb_cluster_info();
    round_trip_hello: arb_hello();
    round_trip_welcome: arb_welcome();
    round_trip_protocol_error: arb_protocol_error();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Every Envelope body variant, with random contents, correlation and
    /// protocol version, survives encode -> decode -> encode with identical
    /// bytes and identical Debug text.
    #[test]
    fn every_envelope_body_variant_round_trips(envelope in arb_envelope()) {
        check_round_trip(&envelope)?;
    }
}

/// `arb_envelope` produces every body variant, so the round-trip and
/// framing properties above cover them all.
#[test]
fn arb_envelope_covers_every_body_variant() {
    let expected: BTreeSet<&str> = BODY_NAMES.into_iter().collect();
    assert_eq!(
        expected.len(),
        BODY_NAMES.len(),
        "BODY_NAMES repeats a name"
    );
    let mut runner = TestRunner::deterministic();
    let strategy = arb_envelope();
    let mut seen = BTreeSet::new();
    for _ in 0..2000 {
        let envelope = strategy.new_tree(&mut runner).unwrap().current();
        seen.insert(envelope.kind());
    }
    assert_eq!(seen, expected);
}

// ---------------------------------------------------------------------------
// (c) Framing

proptest! {
    /// A framed envelope is a 4-byte big-endian length and the envelope's
    /// bytes; `decode_exact` of it, and `decode_body` of the bytes without
    /// the prefix, give back the same envelope.
    #[test]
    fn framed_envelope_decodes_exactly_to_itself(envelope in arb_envelope()) {
        let framing = Framing::default();
        let frame = framing.encode_to_bytes(&envelope).unwrap();
        let body = framing.encode_body(&envelope).unwrap();
        prop_assert_eq!(&frame[..LENGTH_PREFIX], &(body.len() as u32).to_be_bytes()[..]);
        prop_assert_eq!(&frame[LENGTH_PREFIX..], &body[..]);
        let decoded = framing.decode_exact(&frame).unwrap();
        prop_assert_eq!(format!("{decoded:?}"), format!("{envelope:?}"));
        let decoded = framing.decode_body(Bytes::from(body)).unwrap();
        prop_assert_eq!(format!("{decoded:?}"), format!("{envelope:?}"));
    }

    /// Several frames sent back to back and received in pieces cut at
    /// arbitrary points come out of `Framing::decode` whole and in order,
    /// leaving nothing behind.
    #[test]
    fn frame_stream_split_anywhere_decodes_in_order(
        envelopes in vec(arb_envelope(), 1..6),
        cuts in vec(any::<Index>(), 0..10),
    ) {
        let framing = Framing::default();
        let mut wire = BytesMut::new();
        for envelope in &envelopes {
            framing.encode(envelope, &mut wire).unwrap();
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();

        let mut buf = BytesMut::new();
        let mut received = Vec::new();
        let mut start = 0;
        for cut in cuts {
            buf.extend_from_slice(&wire[start..cut]);
            start = cut;
            while let Some(envelope) = framing.decode(&mut buf).unwrap() {
                received.push(envelope);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert!(framing.finish(&buf).is_ok());
        prop_assert_eq!(format!("{received:?}"), format!("{envelopes:?}"));
    }

    /// A stream that ends inside a frame is reported as truncated by
    /// `finish`, and what came before is decoded.
    #[test]
    fn a_stream_cut_inside_a_frame_is_truncated(
        envelopes in vec(arb_envelope(), 1..4),
        cut in any::<Index>(),
    ) {
        let framing = Framing::default();
        let mut wire = BytesMut::new();
        let mut ends = Vec::new();
        for envelope in &envelopes {
            framing.encode(envelope, &mut wire).unwrap();
            ends.push(wire.len());
        }
        let cut = cut.index(wire.len());
        let whole = ends.iter().filter(|&&end| end <= cut).count();
        let mut buf = BytesMut::from(&wire[..cut]);
        let mut received = 0;
        while framing.decode(&mut buf).unwrap().is_some() {
            received += 1;
        }
        prop_assert_eq!(received, whole);
        let at_boundary = cut == 0 || ends.contains(&cut);
        prop_assert_eq!(framing.finish(&buf).is_ok(), at_boundary);
    }
}

// ---------------------------------------------------------------------------
// (d) Malformed input never panics

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// No input makes `Framing::decode`, `decode_exact`, `decode_body`,
    /// `finish`, `Envelope::decode` or `Value::decode` (nor printing what
    /// they return) panic, under small and default frame limits; and
    /// whatever they accept carries a body.
    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(
        input in arb_wire_input(),
        limit in proptest::sample::select(vec![0usize, 1, 7, 64, 1024, 4096, DEFAULT_MAX_FRAME]),
    ) {
        let framing = Framing::new(limit);

        let mut buf = BytesMut::from(&input[..]);
        let mut streamed = Vec::new();
        loop {
            match framing.decode(&mut buf) {
                Ok(Some(envelope)) => {
                    prop_assert!(envelope.body.is_some());
                    streamed.push(envelope);
                }
                Ok(None) => {
                    let _ = framing.finish(&buf);
                    break;
                }
                Err(e) => {
                    let _ = e.to_string();
                    break;
                }
            }
        }

        match framing.decode_exact(&input) {
            Ok(envelope) => {
                prop_assert!(envelope.body.is_some());
                // A buffer holding exactly one frame streams as that frame.
                prop_assert_eq!(streamed.len(), 1);
                prop_assert_eq!(format!("{:?}", streamed[0]), format!("{envelope:?}"));
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }

        match framing.decode_body(Bytes::from(input.clone())) {
            Ok(envelope) => {
                prop_assert!(envelope.body.is_some());
                prop_assert!(input.len() <= limit);
                let _ = format!("{envelope:?}");
            }
            Err(FrameError::TooLarge { len, max }) => {
                prop_assert_eq!(len, input.len() as u64);
                prop_assert_eq!(max, limit);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }

        if let Ok(envelope) = Envelope::decode(&input[..]) {
            let _ = (envelope.kind(), format!("{envelope:?}"));
        }
        for start in [0, LENGTH_PREFIX.min(input.len())] {
            if let Ok(value) = Value::decode(&input[start..]) {
                let _ = (value.to_string(), value.type_name(), format!("{value:?}"));
            }
        }
    }
}

/// Encodes `depth` nested one-item lists around an empty Value.
fn nested_lists(depth: usize) -> Vec<u8> {
    let mut value = Vec::new();
    for _ in 0..depth {
        // ValueList { items: [value] }
        let mut list = vec![0x0a];
        prost::encoding::encode_varint(value.len() as u64, &mut list);
        list.extend_from_slice(&value);
        // Value { list_value: list }
        value = vec![0x42];
        prost::encoding::encode_varint(list.len() as u64, &mut value);
        value.extend_from_slice(&list);
    }
    value
}

/// Values nested deeper than the decoder's recursion limit are refused, not
/// decoded on an ever-deeper stack: by prost alone (malformed), and by the
/// framing's decoders as deeper than `MAX_VALUE_DEPTH` (tests/fuzz.rs checks
/// that bound exactly); nesting within the limit decodes.
#[test]
fn values_nested_past_the_recursion_limit_are_refused() {
    assert!(Value::decode(nested_lists(10).as_slice()).is_ok());
    assert!(Value::decode(nested_lists(1_000).as_slice()).is_err());

    // The same inside a framed CommandRequest parameter.
    let mut parameter = vec![0x12];
    let deep = nested_lists(1_000);
    prost::encoding::encode_varint(deep.len() as u64, &mut parameter);
    parameter.extend_from_slice(&deep);
    let mut request = vec![0x22];
    prost::encoding::encode_varint(parameter.len() as u64, &mut request);
    request.extend_from_slice(&parameter);
    let mut body = vec![0xa2, 0x01]; // field 20, length-delimited
    prost::encoding::encode_varint(request.len() as u64, &mut body);
    body.extend_from_slice(&request);
    assert!(Envelope::decode(body.as_slice()).is_err());
    assert!(matches!(
        Framing::default().decode_body(Bytes::from(body)),
        Err(FrameError::TooDeep { .. })
    ));
}

/// A declared length above the limit is refused as soon as the prefix is
/// in, whatever follows, and before anything is reserved for it.
#[test]
fn a_declared_length_over_the_limit_is_refused_at_once() {
    for limit in [0, 1024, DEFAULT_MAX_FRAME] {
        let framing = Framing::new(limit);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xf0, 1, 2, 3][..]);
        let capacity = buf.capacity();
        match framing.decode(&mut buf) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, 0xFFFF_FFF0);
                assert_eq!(max, limit);
            }
            other => panic!("limit {limit}: expected TooLarge, got {other:?}"),
        }
        assert_eq!(buf.capacity(), capacity);
        assert!(matches!(
            framing.decode_exact(&[0xff, 0xff, 0xff, 0xf0]),
            Err(FrameError::TooLarge { .. })
        ));
    }
}

/// Sanity check of the test's own helper: the Envelope field number used
/// above for CommandRequest is 20.
#[test]
fn command_request_is_envelope_field_20() {
    let envelope = Envelope::new(pb::envelope::Body::CommandRequest(
        pb::CommandRequest::default(),
    ));
    let bytes = envelope.encode_to_vec();
    assert_eq!(&bytes[bytes.len() - 3..], &[0xa2, 0x01, 0x00]);
}
