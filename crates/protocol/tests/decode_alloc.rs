//! How much memory decoding may allocate: a frame's length prefix is never
//! trusted beyond the limit, and what a frame decodes to stays within a
//! fixed multiple of the frame's length, whatever the bytes.
//!
//! Allocations are counted by the allocator in `counting/` (requested
//! bytes; a growing buffer counts old and new together at the peak). The
//! bounds, for a frame limit `L` and a frame of `n` bytes:
//!
//! - A declared length over `L` is refused before anything is allocated.
//! - A partial frame (prefix in, body not all there) allocates nothing.
//! - A complete frame is decoded by prost into structs larger than their
//!   encoding: an empty `DictEntry` is 2 bytes on the wire and 176 in a
//!   `Vec`, so without a check a frame could make prost allocate 264 bytes
//!   per byte. The scan before decoding (`src/scan.rs`) bounds what prost
//!   will allocate and refuses the frame when that is more than
//!   `DECODE_EXPANSION * n + DECODE_SLACK` (128 bytes per byte, plus
//!   16 KiB): the peak never exceeds that. Frames of well-formed values
//!   need at most 88 bytes per byte and are never refused
//!   (`the_worst_structures_are_refused_and_well_formed_ones_pass` prints
//!   the figures with `--nocapture`).

mod counting;

use bytes::{Bytes, BytesMut};
use casa_node_protocol::pb::Envelope;
use casa_node_protocol::strategies::{self, Place, envelope_with_value, ld};
use casa_node_protocol::{DECODE_EXPANSION, DECODE_SLACK, FrameError, Framing};
use counting::measure;
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;

/// The frame limit the length tests use.
const LIMIT: usize = 1024;

/// The decoders' guarantee for `n` bytes.
fn allowed(n: usize) -> usize {
    DECODE_EXPANSION as usize * n + DECODE_SLACK as usize
}

/// Decodes frames off `buf` until it runs dry or fails, dropping each.
fn drain(framing: Framing, buf: &mut BytesMut) -> Result<usize, FrameError> {
    let mut frames = 0;
    while framing.decode(buf)?.is_some() {
        frames += 1;
    }
    Ok(frames)
}

/// `body` behind its 4-byte big-endian length.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A length prefix declaring more than the limit (up to 0xFFFF_FFFF) is
    /// refused with `TooLarge` as soon as the prefix is in, allocating
    /// nothing of that size (in fact next to nothing).
    #[test]
    fn a_declared_length_over_the_limit_is_refused_without_allocating(
        declared in prop_oneof![Just(0xFFFF_FFF0u32), (LIMIT as u32 + 1)..=u32::MAX],
        rest in vec(any::<u8>(), 0..64),
    ) {
        let mut input = declared.to_be_bytes().to_vec();
        input.extend(&rest);
        let mut buf = BytesMut::from(&input[..]);
        let framing = Framing::new(LIMIT);
        let (result, usage) = measure(|| framing.decode(&mut buf));
        match result {
            Err(FrameError::TooLarge { len, max }) => {
                prop_assert_eq!(len, u64::from(declared));
                prop_assert_eq!(max, LIMIT);
            }
            other => prop_assert!(false, "expected TooLarge, got {:?}", other),
        }
        prop_assert!(usage.largest <= 256, "{usage:?}");

        let (result, usage) = measure(|| framing.decode_exact(&input));
        prop_assert!(matches!(result, Err(FrameError::TooLarge { .. })), "{result:?}");
        prop_assert!(usage.largest <= 256, "{usage:?}");
    }

    /// A frame whose prefix is in but whose body is not all there yet makes
    /// `decode` return `None` without allocating: the caller's reads grow
    /// the buffer as bytes arrive.
    #[test]
    fn a_partial_frame_allocates_nothing(
        declared in 1..=LIMIT,
        arrived in any::<proptest::sample::Index>(),
    ) {
        let mut input = (declared as u32).to_be_bytes().to_vec();
        input.extend((0..arrived.index(declared)).map(|i| i as u8));
        let mut buf = BytesMut::from(&input[..]);
        let (result, usage) = measure(|| Framing::new(LIMIT).decode(&mut buf));
        prop_assert!(matches!(result, Ok(None)), "{result:?}");
        prop_assert_eq!(usage.count, 0, "{:?}", usage);
    }

    /// Whatever the bytes (random, with a plausible prefix, real frames,
    /// real frames damaged), decoding them peaks within the guarantee for
    /// their length (`decode_exact` also copies the frame: its length more).
    #[test]
    fn decoding_arbitrary_input_stays_within_the_guarantee(
        input in strategies::arb_wire_input(),
    ) {
        let mut buf = BytesMut::from(&input[..]);
        let (_, usage) = measure(|| drain(Framing::new(LIMIT), &mut buf));
        prop_assert!(usage.peak <= allowed(input.len()), "{usage:?}");

        let (_, usage) = measure(|| Framing::new(LIMIT).decode_exact(&input));
        prop_assert!(usage.peak <= allowed(input.len()) + input.len(), "{usage:?}");
    }

    /// A frame of ordinary content (any envelope the strategies make) peaks
    /// at under 64 times its own length, plus a small constant, while it is
    /// decoded.
    #[test]
    fn realistic_frames_peak_under_64_times_their_length(
        envelope in strategies::arb_envelope(),
    ) {
        let body = envelope.encode_to_vec();
        let mut buf = BytesMut::from(&frame(&body)[..]);
        let (result, usage) = measure(|| Framing::default().decode(&mut buf));
        prop_assert!(matches!(result, Ok(Some(_))));
        let bound = 64 * body.len() + 4096;
        prop_assert!(usage.peak <= bound, "{} bytes: {usage:?}", body.len());
        prop_assert!(usage.largest <= bound, "{} bytes: {usage:?}", body.len());
    }
}

/// An envelope body holding a structure of `n` elements.
type Shape = Box<dyn Fn(usize) -> Vec<u8>>;

/// The structures that make prost allocate the most per byte are refused
/// (plain prost would take more than the guarantee for them), and the
/// largest per byte that well-formed values make are accepted, within it,
/// at sizes just past `Vec`'s doubling points and not.
#[test]
fn the_worst_structures_are_refused_and_well_formed_ones_pass() {
    let none = [0x0a, 0x00]; // Value { null_value: Null {} }
    let value = |v: Vec<u8>| envelope_with_value(Place::CommandParameter, &v);
    let version = [0x08, 0x01];
    let refused: Vec<(&str, Shape)> = vec![
        (
            "{<empty entry>: ...} * n",
            Box::new(move |n| value(ld(10, &[0x0a, 0x00].repeat(n)))),
        ),
        (
            "[<value without kind>] * n",
            Box::new(move |n| value(ld(8, &[0x0a, 0x00].repeat(n)))),
        ),
        (
            "n empty Parameters",
            Box::new(move |n| [&version[..], &ld(40, &[0x1a, 0x00].repeat(n))].concat()),
        ),
        (
            "n empty ServerStatus",
            Box::new(move |n| [&version[..], &ld(44, &[0x0a, 0x00].repeat(n))].concat()),
        ),
    ];
    let accepted: Vec<(&str, Shape)> = vec![
        (
            "[None] * n",
            Box::new(move |n| value(ld(8, &ld(1, &none).repeat(n)))),
        ),
        (
            "[False] * n",
            Box::new(move |n| value(ld(8, &ld(1, &[0x10, 0x00]).repeat(n)))),
        ),
        (
            "[[None]] * n",
            Box::new(move |n| value(ld(8, &ld(1, &ld(8, &ld(1, &none))).repeat(n)))),
        ),
        (
            "[[[[[None]]]]] * n",
            Box::new(move |n| {
                let mut item = none.to_vec();
                for _ in 0..4 {
                    item = ld(8, &ld(1, &item));
                }
                value(ld(8, &ld(1, &item).repeat(n)))
            }),
        ),
        (
            "[{None: None}] * n",
            Box::new(move |n| {
                let entry = ld(1, &[ld(1, &none), ld(2, &none)].concat());
                value(ld(8, &ld(1, &ld(10, &entry)).repeat(n)))
            }),
        ),
        (
            "{i: None for i in range(n)}",
            Box::new(move |n| {
                let entries: Vec<u8> = (0..n as u64)
                    .flat_map(|i| {
                        ld(
                            1,
                            &[
                                ld(1, &[&[0x18][..], &strategies::varint(i << 1)].concat()),
                                ld(2, &none),
                            ]
                            .concat(),
                        )
                    })
                    .collect();
                value(ld(10, &entries))
            }),
        ),
        (
            "n packed ids",
            Box::new(move |n| [&version[..], &ld(46, &ld(1, &vec![0; n]))].concat()),
        ),
        (
            "n empty RequestStates",
            Box::new(move |n| [&version[..], &ld(51, &[0x0a, 0x00].repeat(n))].concat()),
        ),
    ];
    let framing = Framing::default();
    let mut needed = vec![false; refused.len()];
    for n in [1_000, 1_025, 4_097, 20_000] {
        // Small ones fit in DECODE_SLACK; these sizes do not.
        let refused = if n > 4_000 { &refused[..] } else { &[] };
        for (i, (name, make)) in refused.iter().enumerate() {
            let body = make(n);
            let input = Bytes::from(body.clone());
            let (result, usage) = measure(move || framing.decode_body(input));
            let plain = measure(|| Envelope::decode(body.as_slice())).1;
            eprintln!(
                "{name:28} n={n:6}: {:6} bytes, refused after {:4} bytes; prost alone: {:3.0} per byte",
                body.len(),
                usage.peak,
                plain.peak as f64 / body.len() as f64
            );
            assert!(
                matches!(result, Err(FrameError::TooExpansive { .. })),
                "{name}: {:?}",
                result.map(|_| "accepted")
            );
            assert!(
                usage.peak <= 4096,
                "{name}: the refusal allocated {usage:?}"
            );
            needed[i] |= plain.peak > allowed(body.len());
        }
        for (name, make) in &accepted {
            let body = make(n);
            let input = Bytes::from(body.clone());
            let (result, usage) = measure(move || framing.decode_body(input));
            eprintln!(
                "{name:28} n={n:6}: {:6} bytes, decoded in {:8} bytes: {:3.0} per byte",
                body.len(),
                usage.peak,
                usage.peak as f64 / body.len() as f64
            );
            assert!(result.is_ok(), "{name}: {:?}", result.map(|_| ()));
            assert!(usage.peak <= allowed(body.len()), "{name}: {usage:?}");
        }
    }
    // Each refusal is needed: at some size, prost alone exceeds the bound.
    for ((name, _), needed) in refused.iter().zip(needed) {
        assert!(needed, "{name}: prost alone never exceeded the bound");
    }
}

/// Decoding never reserves memory for bytes that have not arrived: a
/// 4-byte prefix declaring 1 GiB allocates nothing of that size.
#[test]
fn decode_reserves_nothing_for_bytes_that_have_not_arrived() {
    let mut buf = BytesMut::from(&0x3FFF_FFFFu32.to_be_bytes()[..]);
    let (result, usage) = measure(|| Framing::default().decode(&mut buf));
    assert!(matches!(result, Ok(None)));
    assert!(usage.largest < 64 * 1024, "{usage:?}");
}
