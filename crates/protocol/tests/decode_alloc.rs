//! How much memory decoding may allocate: a frame's length prefix is never
//! trusted beyond the limit, and what a frame decodes to stays within a
//! known multiple of the limit, whatever the bytes.
//!
//! A counting global allocator (one per test binary, hence this separate
//! file) records, on the current thread only and only inside
//! [`measure`], the largest single allocation request and the peak of live
//! bytes. The workspace forbids unsafe code, so the allocator is
//! `tracking-allocator`'s, which wraps the system allocator and calls safe
//! hooks. Its `realloc` is an allocation of the new size followed by a
//! release of the old one, so a growing buffer counts old and new together
//! at the peak: the figures here are upper bounds of what the system
//! allocator really holds.
//!
//! The bounds, for a frame limit `L` (all in requested bytes):
//!
//! - A declared length over `L` is refused before anything is allocated.
//! - A partial frame (prefix in, body not all there) allocates nothing.
//! - A complete frame is decoded by prost into structs larger than their
//!   encoding. The worst expansion is an empty `DictEntry` (two bytes on the
//!   wire: tag and zero length) that takes `size_of::<DictEntry>()` = 176
//!   bytes in a `Vec<DictEntry>`, i.e. 88 bytes per frame byte; `Vec`'s
//!   doubling growth can leave half of the capacity unused (×2), and while it
//!   grows the old and new buffers are both live (×1.5). So one allocation
//!   is at most `size_of::<DictEntry>() * L` and the peak at most
//!   `1.5 * size_of::<DictEntry>() * L`, plus a small constant. Adversarial
//!   frames do reach these figures (`adversarial_frames_stay_within_the_worst_case_bound`):
//!   a 1 KiB limit lets a frame make prost allocate 88 KiB at once and hold
//!   132 KiB at the peak, so `64 * L` is not a bound for arbitrary input.
//!   Frames of ordinary content stay under `64 ×` their own length
//!   (`realistic_frames_peak_under_64_times_their_length`; 37× was the worst
//!   seen over 20,000 random envelopes).

mod strategies;

use std::alloc::System;
use std::cell::Cell;
use std::sync::Once;

use bytes::BytesMut;
use casa_node_protocol::pb::DictEntry;
use casa_node_protocol::{FrameError, Framing};
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;
use tracking_allocator::{AllocationGroupId, AllocationRegistry, AllocationTracker, Allocator};

#[global_allocator]
static GLOBAL: Allocator<System> = Allocator::system();

/// The frame limit most tests use.
const LIMIT: usize = 1024;

/// Slack for the framing's and error's own small allocations.
const SLACK: usize = 4096;

/// Heap bytes one frame byte can make prost request in a single `Vec`,
/// counting `Vec`'s unused doubling capacity (see the module docs).
const WORST_EXPANSION: usize = size_of::<DictEntry>();

/// Most any single allocation may be while decoding a frame under `LIMIT`.
const SINGLE_BOUND: usize = WORST_EXPANSION * LIMIT + SLACK;

/// Most the live bytes may peak at while decoding a frame under `LIMIT`.
const PEAK_BOUND: usize = 3 * WORST_EXPANSION * LIMIT / 2 + SLACK;

/// What one thread's measuring window has seen.
struct Window {
    active: Cell<bool>,
    live: Cell<isize>,
    peak: Cell<isize>,
    largest: Cell<usize>,
    count: Cell<usize>,
}

thread_local! {
    static WINDOW: Window = const {
        Window {
            active: Cell::new(false),
            live: Cell::new(0),
            peak: Cell::new(0),
            largest: Cell::new(0),
            count: Cell::new(0),
        }
    };
}

/// Feeds every allocation and release to the current thread's window.
struct Counter;

impl AllocationTracker for Counter {
    fn allocated(&self, _addr: usize, size: usize, _wrapped: usize, _group: AllocationGroupId) {
        let _ = WINDOW.try_with(|w| {
            if w.active.get() {
                let live = w.live.get() + size as isize;
                w.live.set(live);
                w.peak.set(w.peak.get().max(live));
                w.largest.set(w.largest.get().max(size));
                w.count.set(w.count.get() + 1);
            }
        });
    }

    fn deallocated(
        &self,
        _addr: usize,
        size: usize,
        _wrapped: usize,
        _source: AllocationGroupId,
        _current: AllocationGroupId,
    ) {
        let _ = WINDOW.try_with(|w| {
            if w.active.get() {
                w.live.set(w.live.get() - size as isize);
            }
        });
    }
}

/// What `f` allocated on this thread.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// The largest single allocation requested, in bytes.
    largest: usize,
    /// The most bytes live at once, counted from zero when `f` started
    /// (memory freed that was allocated before counts negative).
    peak: usize,
    /// Allocations made.
    count: usize,
}

/// Runs `f`, recording its allocations on this thread.
fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        AllocationRegistry::set_global_tracker(Counter).expect("no other tracker is set");
        AllocationRegistry::enable_tracking();
    });
    WINDOW.with(|w| {
        w.live.set(0);
        w.peak.set(0);
        w.largest.set(0);
        w.count.set(0);
        w.active.set(true);
    });
    let result = f();
    let usage = WINDOW.with(|w| {
        w.active.set(false);
        Usage {
            largest: w.largest.get(),
            peak: w.peak.get().max(0) as usize,
            count: w.count.get(),
        }
    });
    (result, usage)
}

/// Decodes frames off `buf` until it runs dry or fails, dropping each.
fn drain(framing: Framing, buf: &mut BytesMut) -> Result<usize, FrameError> {
    let mut frames = 0;
    while framing.decode(buf)?.is_some() {
        frames += 1;
    }
    Ok(frames)
}

/// `inner` as a length-delimited field whose key is `key`.
fn field(key: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut out = key.to_vec();
    prost::encoding::encode_varint(inner.len() as u64, &mut out);
    out.extend_from_slice(inner);
    out
}

/// `body` behind its 4-byte big-endian length.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// An envelope holding a CommandRequest whose one parameter has the value
/// encoded as `value`.
fn envelope_with_value(value: &[u8]) -> Vec<u8> {
    let parameter = field(&[0x12], value); // Parameter.value = 2
    let request = field(&[0x22], &parameter); // CommandRequest.parameters = 4
    field(&[0xa2, 0x01], &request) // Envelope.command_request = 20
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
    /// real frames damaged), decoding them under a 1 KiB limit makes no
    /// allocation larger than `size_of::<DictEntry>() * limit` and peaks
    /// under 1.5 times that (see the module docs for the derivation).
    #[test]
    fn decoding_arbitrary_input_stays_within_the_allocation_bounds(
        input in strategies::arb_wire_input(),
    ) {
        let mut buf = BytesMut::from(&input[..]);
        let (_, usage) = measure(|| drain(Framing::new(LIMIT), &mut buf));
        prop_assert!(usage.largest <= SINGLE_BOUND, "{usage:?}");
        prop_assert!(usage.peak <= PEAK_BOUND, "{usage:?}");

        let (_, usage) = measure(|| Framing::new(LIMIT).decode_exact(&input));
        prop_assert!(usage.largest <= SINGLE_BOUND, "{usage:?}");
        prop_assert!(usage.peak <= PEAK_BOUND + LIMIT, "{usage:?}");
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
        let bound = 64 * body.len() + SLACK;
        prop_assert!(usage.peak <= bound, "{} bytes: {usage:?}", body.len());
        prop_assert!(usage.largest <= bound, "{} bytes: {usage:?}", body.len());
    }
}

/// The frames that make prost allocate the most per byte (dicts of empty
/// entries, lists of one-entry dicts, packed ids, nested dicts), at sizes
/// just past `Vec`'s doubling points and up to the limit, decode within the
/// worst-case bounds; the worst of them needs more than `64 * limit`.
#[test]
fn adversarial_frames_stay_within_the_worst_case_bound() {
    let mut bodies = Vec::new();
    for n in [1, 5, 17, 65, 129, 257, 500] {
        // {<empty>: <empty>, ...}: n empty DictEntry.
        let entries: Vec<u8> = (0..n).flat_map(|_| [0x0a, 0x00]).collect();
        bodies.push(envelope_with_value(&field(&[0x52], &entries)));
        // [<empty>, ...]: n empty Values.
        bodies.push(envelope_with_value(&field(&[0x42], &entries)));
    }
    for n in [1, 17, 65, 160] {
        // [{<empty>: <empty>}, ...]: n one-entry dicts in a list.
        let items: Vec<u8> = (0..n)
            .flat_map(|_| [0x0a, 0x04, 0x52, 0x02, 0x0a, 0x00])
            .collect();
        bodies.push(envelope_with_value(&field(&[0x42], &items)));
    }
    for n in [1, 100, 1000] {
        // CancelReply { dequeued: [0; n] }, packed.
        bodies.push(field(&[0xf2, 0x02], &field(&[0x0a], &vec![0; n])));
    }
    // {{{...: <empty>}: <empty>}: <empty>}, as deep as the recursion limit allows.
    let mut value = Vec::new();
    for _ in 0..30 {
        value = field(&[0x52], &field(&[0x0a], &field(&[0x0a], &value)));
    }
    bodies.push(envelope_with_value(&value));

    let mut worst_peak = 0;
    for body in &bodies {
        assert!(body.len() <= LIMIT, "test frame of {} bytes", body.len());
        let mut buf = BytesMut::from(&frame(body)[..]);
        let (result, usage) = measure(|| Framing::new(LIMIT).decode(&mut buf));
        assert!(
            matches!(result, Ok(Some(_))),
            "{} bytes: {result:?}",
            body.len()
        );
        assert!(
            usage.largest <= SINGLE_BOUND,
            "{} bytes: {usage:?}",
            body.len()
        );
        assert!(usage.peak <= PEAK_BOUND, "{} bytes: {usage:?}", body.len());
        worst_peak = worst_peak.max(usage.peak);
    }
    // The bound is not slack: some frame needs more than 64 times the limit.
    assert!(worst_peak > 64 * LIMIT, "worst peak {worst_peak}");
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
