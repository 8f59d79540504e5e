//! The fuzz target of the Rust decoders: frames (`Framing::decode`,
//! streamed and split anywhere), envelopes (`Framing::decode_body`, and the
//! scan before it, `scan_body`) and bare values (`decode_value`,
//! `scan_value`), fed with arbitrary bytes and with structured hostile
//! input (`strategies::arb_hostile_body`, `arb_hostile_value_bytes`: valid
//! encodings cut, flipped, with lengths set huge or short, fields
//! duplicated; values nested across the bound and far beyond it; thousands
//! of empty elements; unknown fields and groups; invalid UTF-8).
//!
//! For every input:
//!
//! - nothing panics, and the scan allocates nothing;
//! - the decoder allocates at most `DECODE_EXPANSION * len + DECODE_SLACK`
//!   bytes (counted by the allocator in `counting/`);
//! - the scan's estimate bounds what plain prost allocates on the same
//!   bytes, frames refused included (the model in `scan.rs` is sound);
//! - the scan refuses as malformed only what prost refuses, and the
//!   decoder refuses nothing prost accepts within the bounds;
//! - what is accepted has no value deeper than `MAX_VALUE_DEPTH`, encodes
//!   again (the encoders check the same bounds) and decodes to the same;
//! - a stream holding the frame decodes it the same way, however split.
//!
//! Values nested exactly at the bound, and one level past it, are checked
//! for every kind of level and leaf and every place in an envelope.
//!
//! The number of cases is `CASA_NODE_FUZZ_CASES` when set (the long run:
//! `CASA_NODE_FUZZ_CASES=1000000 cargo test --release -p casa-node-protocol
//! --test fuzz`), a few thousand otherwise.

mod counting;

use std::fmt::Debug;

use bytes::{Bytes, BytesMut};
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{CommandResponse, Envelope, ResponseDelivery, Value};
use casa_node_protocol::strategies::*;
use casa_node_protocol::{
    DECODE_EXPANSION, DECODE_SLACK, FrameError, Framing, LENGTH_PREFIX, MAX_VALUE_DEPTH,
};
use counting::measure;
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message;

/// Cases per property: `CASA_NODE_FUZZ_CASES`, or `default`.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("CASA_NODE_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// What plain prost may allocate beyond the scan's estimate: a decode
/// error's location stack, a shared buffer's header.
const PROST_SLACK: u64 = 8 * 1024;

/// The decoders' guarantee for `len` bytes.
fn allowed(len: usize) -> u64 {
    DECODE_EXPANSION * len as u64 + DECODE_SLACK
}

fn debug(x: &impl Debug) -> String {
    format!("{x:?}")
}

/// Which error, without its details.
fn kind(result: &Result<impl Debug, FrameError>) -> String {
    match result {
        Ok(_) => "Ok".into(),
        Err(e) => debug(e)
            .split([' ', '(', '{'])
            .next()
            .unwrap_or("")
            .to_owned(),
    }
}

/// Plain prost on `bytes`, measured, the input kept alive outside.
fn raw<M: Message + Default>(bytes: &Bytes) -> (Result<M, prost::DecodeError>, u64) {
    let input = bytes.clone();
    let (result, usage) = measure(move || M::decode(input));
    (result, usage.peak as u64)
}

/// Checks every decoder and its guarantees on one envelope body.
fn check_body(body: &[u8], split: Index) -> Result<(), TestCaseError> {
    let framing = Framing::default();
    let len = body.len();

    let (scanned, usage) = measure(|| framing.scan_body(body));
    prop_assert_eq!(usage.count, 0, "the scan allocated");

    let bytes = Bytes::copy_from_slice(body);
    let (plain, plain_peak) = raw::<Envelope>(&bytes);
    if let Ok(estimate) = &scanned {
        prop_assert!(
            plain_peak <= estimate + PROST_SLACK,
            "prost allocated {plain_peak} bytes, more than the scan's {estimate}"
        );
    }

    let input = bytes.clone();
    let (decoded, usage) = measure(move || framing.decode_body(input));
    prop_assert!(
        usage.peak as u64 <= allowed(len) && usage.largest as u64 <= allowed(len),
        "decoding {len} bytes allocated {usage:?}, more than {}",
        allowed(len)
    );

    match &decoded {
        Ok(envelope) => {
            prop_assert!(envelope.body.is_some());
            let estimate = *scanned.as_ref().expect("decoded, so scanned");
            prop_assert!(estimate <= allowed(len));
            for value in envelope_values(envelope) {
                prop_assert!(value.depth() <= MAX_VALUE_DEPTH, "{}", value.depth());
            }
            prop_assert_eq!(debug(plain.as_ref().unwrap()), debug(envelope));
            // Forwardable: it encodes again, and what is encoded decodes.
            let again = framing
                .encode_body(envelope)
                .map_err(|e| TestCaseError::fail(format!("accepted, but not encodable: {e}")))?;
            let back = framing.decode_body(Bytes::from(again)).map_err(|e| {
                TestCaseError::fail(format!("accepted, but not once re-encoded: {e}"))
            })?;
            prop_assert_eq!(debug(&back), debug(envelope));
        }
        Err(FrameError::TooDeep { max }) => {
            prop_assert_eq!(*max, MAX_VALUE_DEPTH);
            prop_assert!(
                matches!(scanned, Err(FrameError::TooDeep { .. })),
                "scanned {:?}",
                scanned
            );
        }
        Err(FrameError::Invalid { .. }) => {
            prop_assert!(
                plain.is_err(),
                "the scan refused what prost reads: {decoded:?}"
            );
            prop_assert_eq!(kind(&scanned), kind(&decoded));
        }
        Err(FrameError::TooExpansive {
            needed, allowed: a, ..
        }) => {
            prop_assert!(needed > a);
            prop_assert_eq!(scanned.as_ref().ok(), Some(needed));
        }
        Err(FrameError::Malformed(_)) => prop_assert!(plain.is_err()),
        Err(FrameError::NoBody) => {
            prop_assert!(plain.as_ref().is_ok_and(|e| e.body.is_none()));
        }
        Err(other) => prop_assert!(false, "unexpected {other:?}"),
    }

    // No refusal of what prost reads within the bounds.
    if let (Ok(envelope), Ok(estimate)) = (&plain, &scanned) {
        let shallow = envelope_values(envelope)
            .iter()
            .all(|v| v.depth() <= MAX_VALUE_DEPTH);
        let compact = envelope.encoded_len();
        let cheap = *estimate <= allowed(len)
            && (*estimate <= DECODE_SLACK || *estimate <= allowed(compact));
        if envelope.body.is_some() && shallow && cheap {
            prop_assert!(decoded.is_ok(), "refused: {decoded:?}");
        }
    }

    // The same body as a frame in a stream, cut in two anywhere.
    let mut frame = (len as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    let cut = split.index(frame.len() + 1);
    let mut buf = BytesMut::from(&frame[..cut]);
    let first = framing.decode(&mut buf);
    prop_assert!(matches!(first, Ok(None)) || cut == frame.len());
    buf.extend_from_slice(&frame[cut..]);
    let streamed = match first {
        Ok(Some(envelope)) => Ok(envelope),
        Err(e) => Err(e),
        Ok(None) => framing
            .decode(&mut buf)
            .map(|e| e.expect("a whole frame is in")),
    };
    prop_assert_eq!(kind(&streamed), kind(&decoded));
    prop_assert!(buf.is_empty());
    prop_assert_eq!(
        kind(&framing.decode_exact(&frame)),
        kind(&decoded),
        "decode_exact"
    );
    Ok(())
}

/// Checks the decoders of bare values on one value's bytes.
fn check_value(bytes: &[u8]) -> Result<(), TestCaseError> {
    let framing = Framing::default();
    let len = bytes.len();
    let (scanned, usage) = measure(|| framing.scan_value(bytes));
    prop_assert_eq!(usage.count, 0, "the scan allocated");

    let input = Bytes::copy_from_slice(bytes);
    let (plain, plain_peak) = raw::<Value>(&input);
    if let Ok(estimate) = &scanned {
        prop_assert!(
            plain_peak <= estimate + PROST_SLACK,
            "{plain_peak} > {estimate}"
        );
    }
    let (decoded, usage) = measure(move || framing.decode_value(input));
    prop_assert!(usage.peak as u64 <= allowed(len), "{usage:?}");
    match &decoded {
        Ok(value) => {
            prop_assert!(value.depth() <= MAX_VALUE_DEPTH);
            prop_assert_eq!(debug(plain.as_ref().unwrap()), debug(value));
            // A value accepted alone goes anywhere in an envelope, even
            // the deepest place.
            let delivery = Envelope::new(Body::ResponseDelivery(Box::new(ResponseDelivery {
                response: Some(CommandResponse {
                    ret: Some(value.clone()),
                    ..CommandResponse::default()
                }),
                replaces_timeout: false,
                rejected: None,
            })));
            let body = framing
                .encode_body(&delivery)
                .map_err(|e| TestCaseError::fail(format!("not forwardable: {e}")))?;
            prop_assert!(framing.decode_body(Bytes::from(body)).is_ok());
        }
        Err(FrameError::Invalid { .. }) => prop_assert!(plain.is_err()),
        Err(FrameError::Malformed(_)) => prop_assert!(plain.is_err()),
        Err(FrameError::TooDeep { .. }) | Err(FrameError::TooExpansive { .. }) => {}
        Err(other) => prop_assert!(false, "unexpected {other:?}"),
    }
    if let (Ok(value), Ok(estimate)) = (&plain, &scanned) {
        if value.depth() <= MAX_VALUE_DEPTH
            && *estimate <= allowed(len)
            && (*estimate <= DECODE_SLACK || *estimate <= allowed(value.encoded_len()))
        {
            prop_assert!(decoded.is_ok(), "refused: {decoded:?}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(2500))]

    /// Envelope bodies of every kind, hostile ones above all, through
    /// every envelope decoder.
    #[test]
    fn envelope_decoders_survive_hostile_input(
        body in arb_hostile_body(),
        split in any::<Index>(),
    ) {
        check_body(&body, split)?;
    }
}

proptest! {
    #![proptest_config(config(2500))]

    /// Bare values of every kind through the value decoders.
    #[test]
    fn value_decoders_survive_hostile_input(bytes in arb_hostile_value_bytes()) {
        check_value(&bytes)?;
    }
}

proptest! {
    #![proptest_config(config(600))]

    /// Streams of arbitrary bytes, plausible length prefixes and damaged
    /// frames decode to frames or errors, frame after frame, allocating
    /// within the bound for the whole input.
    #[test]
    fn frame_streams_survive_hostile_input(input in arb_wire_input()) {
        let framing = Framing::default();
        let mut buf = BytesMut::from(&input[..]);
        let (_, usage) = measure(|| {
            while let Ok(Some(envelope)) = framing.decode(&mut buf) {
                assert!(envelope.body.is_some());
            }
        });
        prop_assert!(usage.peak as u64 <= allowed(input.len()), "{usage:?}");
        let _ = framing.finish(&buf);
    }
}

proptest! {
    #![proptest_config(config(600))]

    /// A chain of containers of any kinds around any leaf, wherever it
    /// sits: accepted with its exact depth up to `MAX_VALUE_DEPTH`,
    /// refused as too deep past it, by the envelope and the value
    /// decoders alike.
    #[test]
    fn values_are_accepted_up_to_the_bound_and_refused_past_it(
        place in arb_place(),
        (value, depth) in arb_chain(),
    ) {
        let framing = Framing::default();
        let decoded = framing.decode_body(Bytes::from(envelope_with_value(place, &value)));
        let bare = framing.decode_value(Bytes::from(value));
        if depth <= MAX_VALUE_DEPTH {
            let envelope = decoded.map_err(|e| TestCaseError::fail(format!("{depth}: {e}")))?;
            let values = envelope_values(&envelope);
            prop_assert_eq!(values.len(), 1);
            prop_assert_eq!(values[0].depth(), depth);
            prop_assert_eq!(bare.map(|v| v.depth()).ok(), Some(depth));
        } else {
            prop_assert!(matches!(decoded, Err(FrameError::TooDeep { .. })), "{depth}: {decoded:?}");
            prop_assert!(matches!(bare, Err(FrameError::TooDeep { .. })), "{depth}: {bare:?}");
        }
    }
}

/// Levels of `level` around `leaf` (a value `leaf_depth` deep), with as
/// few lists as needed to make up the difference, that make a value
/// exactly `depth` deep; `None` when no such chain exists.
fn exactly(depth: usize, level: Level, leaf: &Value, leaf_depth: usize) -> Option<Vec<u8>> {
    let levels = levels_for(depth, level, leaf_depth)?;
    Some(chain(&levels, &leaf.encode_to_vec()))
}

/// One level past the bound is refused and the bound itself accepted, for
/// each kind of level and leaf, at each place, by each decoder.
#[test]
fn the_bound_is_exact_for_every_shape_and_place() {
    let framing = Framing::default();
    let places = [
        Place::CommandParameter,
        Place::CommandRet,
        Place::SubmitParameter,
        Place::DeliveredRet,
    ];
    let mut checked = 0;
    for level in [Level::List, Level::Tuple, Level::DictKey, Level::DictValue] {
        for (leaf, leaf_depth) in chain_leaves() {
            for depth in [MAX_VALUE_DEPTH, MAX_VALUE_DEPTH + 1] {
                let Some(value) = exactly(depth, level, &leaf, leaf_depth) else {
                    continue;
                };
                let plain = Value::decode(value.as_slice()).expect("prost reads it");
                assert_eq!(plain.depth(), depth, "{level:?} {leaf:?}");
                let bare = framing.decode_value(Bytes::from(value.clone()));
                for place in places {
                    let body = envelope_with_value(place, &value);
                    let decoded = framing.decode_body(Bytes::from(body.clone()));
                    if depth == MAX_VALUE_DEPTH {
                        assert!(decoded.is_ok(), "{place:?} {level:?} {leaf:?}: {decoded:?}");
                        // prost reads it there too: the bound fits its limit.
                        Envelope::decode(body.as_slice()).expect("within prost's limit");
                    } else {
                        let error = decoded.expect_err("one past the bound");
                        assert!(
                            matches!(error, FrameError::TooDeep { max: 96 }),
                            "{error:?}"
                        );
                        assert!(error.to_string().contains("deeper than 96"), "{error}");
                    }
                }
                assert_eq!(bare.is_ok(), depth == MAX_VALUE_DEPTH, "{bare:?}");
                // The encoders refuse what the decoders would.
                let request = Envelope::new(Body::CommandResponse(Box::new(CommandResponse {
                    ret: Some(plain),
                    ..CommandResponse::default()
                })));
                let encoded = framing.encode_body(&request);
                assert_eq!(encoded.is_ok(), depth == MAX_VALUE_DEPTH, "{encoded:?}");
                let mut dst = BytesMut::from(&b"kept"[..]);
                let framed = framing.encode(&request, &mut dst);
                assert_eq!(framed.is_ok(), depth == MAX_VALUE_DEPTH);
                if framed.is_err() {
                    assert_eq!(&dst[..], b"kept", "a refused frame leaves nothing behind");
                } else {
                    assert_eq!(dst.len(), 4 + LENGTH_PREFIX + encoded.unwrap().len());
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 40, "{checked} shapes");
}

/// At the deepest place a value sits, prost reads values up to 98
/// messages deep and no deeper: the bound of 96 fits its limit with 2
/// levels to spare.
#[test]
fn the_bound_fits_prosts_limit_at_the_deepest_place() {
    let leaf = Value::none().encode_to_vec();
    let at_bound = exactly(MAX_VALUE_DEPTH, Level::List, &Value::none(), 2).unwrap();
    assert_eq!(Value::decode(at_bound.as_slice()).unwrap().depth(), 96);
    let deeper = |lists: usize| {
        let levels = vec![Level::List; (MAX_VALUE_DEPTH - 2) / 2 + lists];
        envelope_with_value(Place::DeliveredRet, &chain(&levels, &leaf))
    };
    assert!(Envelope::decode(deeper(1).as_slice()).is_ok()); // 98 deep
    assert!(Envelope::decode(deeper(2).as_slice()).is_err()); // 100 deep
}
