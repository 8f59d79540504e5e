//! The pre-scan: a walk over a message's protobuf wire structure, before
//! prost decodes it, that bounds what decoding will allocate and how deep
//! values nest.
//!
//! prost decodes straight into Rust structs, which can be much larger than
//! their encoding: an empty `DictEntry` is 2 bytes on the wire and 176 in a
//! `Vec`. The scan walks the same fields prost would, with the schema
//! generated from `proto/` by `build.rs` (`$OUT_DIR/schema.rs`), and adds up
//! an upper bound of the bytes prost will request from the allocator:
//!
//! - a repeated field's elements go into a `Vec` that grows by doubling
//!   from a minimum capacity `m` (4 elements; 8 for 1-byte elements, 1 for
//!   elements over 1 KiB), and while it grows the old and new buffers are
//!   both live: `n` elements of `s` bytes take at most `s * (3n + m - 3)`;
//! - a boxed message (the large `Envelope.body` variants) takes its size
//!   once per occurrence;
//! - a string or `Vec<u8>` field takes at most `2 * max(len, 8)` per
//!   occurrence (reserve's minimum capacity, and the growth of a field that
//!   occurs again with a longer value); `bytes::Bytes` fields share the
//!   frame's buffer and take nothing.
//!
//! Each term only grows when the same content is encoded less compactly
//! (fields repeated and merged, unknown fields, sub-messages split), so the
//! bound of a message's canonical encoding is never above that of any other
//! encoding of the same content.
//!
//! The scan also enforces what prost enforces, with the same outcome: the
//! wire format's rules (varints of at most 10 bytes, keys, wire types, known
//! fields with their own wire type, lengths within the enclosing message,
//! groups matched) and prost's recursion limit of 100 nested messages, so
//! that it refuses a frame only when prost would too, or when the frame
//! breaks one of this protocol's bounds ([`MAX_VALUE_DEPTH`]). It allocates
//! nothing, and its own recursion is as deep as the message nesting it
//! allows.

use crate::error::FrameError;

/// The deepest a [`Value`](crate::pb::Value) may nest, counted in protobuf
/// messages as on the wire: the `Value` itself is 1 level; `None`, a
/// complex and a numpy value add 1 (their `Null`, `Complex` or `NdArray`
/// message); a list or tuple adds 2 (its `ValueList`, then its items'
/// `Value`s), a dict 3 (`Dict`, `DictEntry`, then the keys' and values'
/// `Value`s). So at most 47 lists nest around `None` or an int (48 lists
/// when the innermost is empty), and 31 dicts around `None`.
///
/// The number is `CONSTANT_MAX_VALUE_DEPTH` of `envelope.proto`, which says
/// why it is 96 and which every implementation reads: prost and Python's
/// protobuf (upb) refuse a message nested more than 100 levels below the
/// top-level one, and a value sits up to 3 levels down in an envelope.
/// Because the bound is the same wherever the value sits, a value one link
/// accepts can be forwarded on any other.
///
/// Every decoder refuses a deeper value with a clear error
/// ([`FrameError::TooDeep`] here, `DecodeError` in the Python worker,
/// `ValueError` in `casanode`); [`Framing`](crate::Framing)'s encoders
/// refuse one too, and the Python encoders (the worker's, `casanode`'s)
/// pickle it whole instead.
pub const MAX_VALUE_DEPTH: usize = crate::pb::Constant::MaxValueDepth as usize;

/// Decoding a frame of `n` bytes never makes prost request more than
/// `DECODE_EXPANSION * n + DECODE_SLACK` bytes of heap, as counted by
/// [`Framing::scan_body`](crate::Framing::scan_body); frames that would
/// need more are refused before they are decoded
/// ([`FrameError::TooExpansive`]).
///
/// Why 128: a frame of well-formed values (every value has a kind, every
/// dict entry a key and a value) needs at most about 88 bytes per byte
/// (a one-item list is 4 bytes on the wire and a 4-slot `Vec` of 88-byte
/// `Value`s in memory), so none is refused; empty dict entries (up to 264
/// bytes per byte) and empty values in lists (132) are.
pub const DECODE_EXPANSION: u64 = 128;

/// The constant part of the decoding bound ([`DECODE_EXPANSION`]): room for
/// the small allocations every decode makes (shared buffer headers, error
/// messages) and for small frames of large structs.
pub const DECODE_SLACK: u64 = 16 * 1024;

/// The most decoding any one frame may make prost allocate, whatever its
/// size: 4 GiB. The relative bound ([`DECODE_EXPANSION`]) lets a 1 GiB
/// frame of tiny values take 128 GiB; this one refuses such a frame
/// ([`FrameError::OverCeiling`]) and still admits, say, a list of 30
/// million floats (330 MiB on the wire, 2.6 GiB decoded). Bytes and NumPy
/// arrays cost what they weigh, so a frame of them always stays under it.
/// Frames of one connection are decoded one at a time, so this is also
/// what decoding may hold per connection at once.
pub const DECODE_CEILING: u64 = 4 << 30;

/// The most a frame of `len` bytes may make prost allocate, before the
/// ceiling.
pub(crate) fn allowed(len: usize) -> u64 {
    DECODE_EXPANSION
        .saturating_mul(len as u64)
        .saturating_add(DECODE_SLACK)
}

/// prost's `RECURSION_LIMIT`: nested messages below the top-level one.
const RECURSION_LIMIT: u32 = 100;

/// How a field is encoded.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wire {
    /// Wire type 0: integers, bools, enums.
    Varint,
    /// Wire type 1: double, fixed64, sfixed64.
    Fixed64,
    /// Wire type 5: float, fixed32, sfixed32 (no field of casa.node.v1
    /// has one today).
    #[allow(dead_code)]
    Fixed32,
    /// Wire type 2, copied into a `String` or `Vec<u8>`.
    Bytes,
    /// Wire type 2, kept as a slice of the frame (`bytes::Bytes`).
    Shared,
    /// Wire type 2: the message at this index of `MESSAGES`.
    Message(usize),
}

/// One field of a message.
#[derive(Debug)]
pub(crate) struct Field {
    pub(crate) number: u32,
    pub(crate) wire: Wire,
    pub(crate) repeated: bool,
    pub(crate) boxed: bool,
    /// For a repeated field, its index among the message's repeated fields.
    pub(crate) slot: u32,
    /// Bytes one element takes in a repeated field's `Vec`, or a boxed
    /// message's size; 0 otherwise.
    pub(crate) element: usize,
}

/// One message type.
#[derive(Debug)]
pub(crate) struct MessageSchema {
    /// Its fields, by number.
    pub(crate) fields: &'static [Field],
}

include!(concat!(env!("OUT_DIR"), "/schema.rs"));

/// Which message a scan starts from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Root {
    Envelope,
    Value,
}

/// Scans `buf` as one `root` message: the bound on what prost will
/// allocate to decode it, or why it is refused.
pub(crate) fn scan(root: Root, buf: &[u8]) -> Result<u64, FrameError> {
    let mut scanner = Scanner { buf, cost: 0 };
    let (index, level) = match root {
        Root::Envelope => (ENVELOPE, 0),
        Root::Value => (VALUE, 1),
    };
    scanner.message(index, 0, buf.len(), RECURSION_LIMIT, level)?;
    Ok(scanner.cost)
}

fn invalid(at: usize, reason: &'static str) -> FrameError {
    FrameError::Invalid { at, reason }
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

struct Scanner<'a> {
    buf: &'a [u8],
    cost: u64,
}

impl Scanner<'_> {
    /// A varint as prost reads it: at most 10 bytes, the tenth 0 or 1; it
    /// must end before `end`.
    fn varint(&self, pos: &mut usize, end: usize) -> Result<u64, FrameError> {
        let start = *pos;
        let mut value = 0u64;
        for count in 0..10 {
            let Some(&byte) = self.buf[..end].get(start + count) else {
                return Err(invalid(start, "varint runs past the end of its message"));
            };
            value |= u64::from(byte & 0x7f) << (count * 7);
            if byte < 0x80 {
                if count == 9 && byte >= 2 {
                    return Err(invalid(start, "varint overflows 64 bits"));
                }
                *pos = start + count + 1;
                return Ok(value);
            }
        }
        Err(invalid(start, "varint longer than 10 bytes"))
    }

    /// A field key: (field number, wire type).
    fn key(&self, pos: &mut usize, end: usize) -> Result<(u32, u8), FrameError> {
        let at = *pos;
        let key = self.varint(pos, end)?;
        if key > u64::from(u32::MAX) {
            return Err(invalid(at, "field key out of range"));
        }
        let wire = (key & 7) as u8;
        if wire > FIXED32 {
            return Err(invalid(at, "unknown wire type"));
        }
        let number = (key as u32) >> 3;
        if number == 0 {
            return Err(invalid(at, "field number 0"));
        }
        Ok((number, wire))
    }

    /// A length-delimited field's contents: their bounds, with `pos` moved
    /// past them.
    fn length(&self, pos: &mut usize, end: usize) -> Result<(usize, usize), FrameError> {
        let at = *pos;
        let len = self.varint(pos, end)?;
        if len > (end - *pos) as u64 {
            return Err(invalid(at, "length runs past the end of its message"));
        }
        let start = *pos;
        *pos += len as usize;
        Ok((start, *pos))
    }

    fn advance(&self, pos: &mut usize, end: usize, n: usize) -> Result<(), FrameError> {
        if end - *pos < n {
            return Err(invalid(
                *pos,
                "fixed-width field runs past the end of its message",
            ));
        }
        *pos += n;
        Ok(())
    }

    /// Counts `n` more elements of a repeated field; `vecs` marks the
    /// fields of this message instance that already have a `Vec`.
    fn elements(&mut self, field: &Field, vecs: &mut u64, n: u64) {
        if n == 0 {
            return;
        }
        let size = field.element as u64;
        self.cost = self.cost.saturating_add(n.saturating_mul(3 * size));
        let bit = 1u64 << field.slot;
        if *vecs & bit == 0 {
            *vecs |= bit;
            // Vec's minimum non-zero capacity, less the 3 already counted
            // for the first element.
            let minimum = match field.element {
                1 => 8,
                0..=1024 => 4,
                _ => 1,
            };
            self.cost = self
                .cost
                .saturating_add(size * (minimum as u64).saturating_sub(3));
        }
    }

    /// A string or `Vec<u8>` of `len` bytes, once more.
    fn copied(&mut self, len: usize) {
        if len > 0 {
            self.cost = self.cost.saturating_add(2 * len.max(8) as u64);
        }
    }

    /// The message `index` in `buf[pos..end]`. `count` is what is left of
    /// prost's recursion limit; `level` is the depth of this message in
    /// the value it belongs to (1 for a `Value` not inside another), or 0
    /// outside values.
    fn message(
        &mut self,
        index: usize,
        mut pos: usize,
        end: usize,
        count: u32,
        level: usize,
    ) -> Result<(), FrameError> {
        let schema = &MESSAGES[index];
        let mut vecs = 0u64;
        while pos < end {
            let at = pos;
            let (number, wire) = self.key(&mut pos, end)?;
            let Ok(i) = schema.fields.binary_search_by_key(&number, |f| f.number) else {
                self.skip(number, wire, &mut pos, end, count, at)?;
                continue;
            };
            let field = &schema.fields[i];
            match (field.wire, wire) {
                (Wire::Varint, VARINT) => {
                    self.varint(&mut pos, end)?;
                    if field.repeated {
                        self.elements(field, &mut vecs, 1);
                    }
                }
                (Wire::Fixed64, FIXED64) => {
                    self.advance(&mut pos, end, 8)?;
                    if field.repeated {
                        self.elements(field, &mut vecs, 1);
                    }
                }
                (Wire::Fixed32, FIXED32) => {
                    self.advance(&mut pos, end, 4)?;
                    if field.repeated {
                        self.elements(field, &mut vecs, 1);
                    }
                }
                (Wire::Varint | Wire::Fixed64 | Wire::Fixed32, LENGTH_DELIMITED)
                    if field.repeated =>
                {
                    // Packed.
                    let (mut a, b) = self.length(&mut pos, end)?;
                    let n = match field.wire {
                        Wire::Fixed64 | Wire::Fixed32 => {
                            let width = if matches!(field.wire, Wire::Fixed64) {
                                8
                            } else {
                                4
                            };
                            if (b - a) % width != 0 {
                                return Err(invalid(a, "packed field cut inside an element"));
                            }
                            (b - a) / width
                        }
                        _ => {
                            let mut n = 0;
                            while a < b {
                                self.varint(&mut a, b)?;
                                n += 1;
                            }
                            n
                        }
                    };
                    self.elements(field, &mut vecs, n as u64);
                }
                (Wire::Bytes, LENGTH_DELIMITED) => {
                    let (a, b) = self.length(&mut pos, end)?;
                    self.copied(b - a);
                    if field.repeated {
                        self.elements(field, &mut vecs, 1);
                    }
                }
                (Wire::Shared, LENGTH_DELIMITED) => {
                    self.length(&mut pos, end)?;
                }
                (Wire::Message(child), LENGTH_DELIMITED) => {
                    let (a, b) = self.length(&mut pos, end)?;
                    let child_level = if level > 0 {
                        level + 1
                    } else if child == VALUE {
                        1
                    } else {
                        0
                    };
                    if child_level > MAX_VALUE_DEPTH {
                        return Err(FrameError::TooDeep {
                            max: MAX_VALUE_DEPTH,
                        });
                    }
                    if count == 0 {
                        return Err(invalid(at, "messages nested more than 100 deep"));
                    }
                    if field.repeated {
                        self.elements(field, &mut vecs, 1);
                    } else if field.boxed {
                        self.cost = self.cost.saturating_add(field.element as u64);
                    }
                    self.message(child, a, b, count - 1, child_level)?;
                }
                _ => return Err(invalid(at, "a known field with the wrong wire type")),
            }
        }
        Ok(())
    }

    /// Skips an unknown field as prost does (which counts groups against
    /// its recursion limit, and refuses any unknown field once the limit
    /// is reached).
    fn skip(
        &mut self,
        number: u32,
        wire: u8,
        pos: &mut usize,
        end: usize,
        count: u32,
        at: usize,
    ) -> Result<(), FrameError> {
        if count == 0 {
            return Err(invalid(at, "messages nested more than 100 deep"));
        }
        match wire {
            VARINT => {
                self.varint(pos, end)?;
            }
            FIXED64 => self.advance(pos, end, 8)?,
            FIXED32 => self.advance(pos, end, 4)?,
            LENGTH_DELIMITED => {
                self.length(pos, end)?;
            }
            START_GROUP => loop {
                if *pos >= end {
                    return Err(invalid(at, "group without its end"));
                }
                let inner_at = *pos;
                let (inner, inner_wire) = self.key(pos, end)?;
                if inner_wire == END_GROUP {
                    if inner != number {
                        return Err(invalid(inner_at, "group ended by another field's tag"));
                    }
                    break;
                }
                self.skip(inner, inner_wire, pos, end, count - 1, inner_at)?;
            },
            _ => return Err(invalid(at, "end of a group that was not started")),
        }
        Ok(())
    }
}
