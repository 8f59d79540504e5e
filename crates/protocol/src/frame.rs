//! Length-delimited framing of [`Envelope`]s: a 4-byte big-endian length
//! followed by that many bytes of protobuf.
//!
//! The same framing is used on the front door, on the worker pipes and by
//! the ZeroMQ transport's peers in other languages: it is what tokio-util's
//! `LengthDelimitedCodec` speaks by default and what Python reads with
//! `struct.unpack(">I", ...)`.
//!
//! What decoding guarantees, whatever the bytes:
//!
//! - it never panics, and never recurses deeper than prost's limit of 100
//!   nested messages;
//! - it never trusts a declared length beyond the configured maximum, and
//!   never reserves memory for bytes that have not arrived;
//! - before prost decodes a frame of `n` bytes, a scan of its wire
//!   structure (`scan.rs`) bounds what prost will allocate, and the frame
//!   is refused unless the bound is at most
//!   [`DECODE_EXPANSION`](crate::DECODE_EXPANSION)` * n + `[`DECODE_SLACK`](crate::DECODE_SLACK) bytes (128 bytes per
//!   byte, plus 16 KiB); the bound is also checked against the length of
//!   the decoded content encoded compactly, so that what is accepted can
//!   be forwarded;
//! - a [`Value`] nested deeper than [`MAX_VALUE_DEPTH`](crate::MAX_VALUE_DEPTH) messages is
//!   refused ([`FrameError::TooDeep`]).
//!
//! The encoders check the same bounds on what they write, so a peer never
//! refuses what this side sent.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::error::FrameError;
use crate::pb::{Constant, Envelope, Value};
use crate::scan::{self, DECODE_CEILING, DECODE_SLACK, Root};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Default maximum frame size: 1 GiB, room for 256 MiB arrays and more.
/// `CONSTANT_MAX_FRAME` of `envelope.proto`, which the Python driver and
/// worker keep too.
pub const DEFAULT_MAX_FRAME: usize = Constant::MaxFrame as usize;

/// Frames at least this large are encoded and decoded (and on signed links
/// sealed and checked) on a blocking thread rather than on the thread of a
/// node's event loop, which must keep answering pings meanwhile: copying a
/// frame of hundreds of MiB into fresh memory takes a second or more.
pub const OFFLOAD_THRESHOLD: usize = 1 << 20;

/// Encodes and decodes frames under a maximum frame size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    max_frame: usize,
}

impl Default for Framing {
    fn default() -> Self {
        Framing::new(DEFAULT_MAX_FRAME)
    }
}

impl Framing {
    /// Framing that refuses frames longer than `max_frame` bytes (length
    /// prefix excluded). Capped at `u32::MAX`, the most the prefix can say.
    pub fn new(max_frame: usize) -> Self {
        Framing {
            max_frame: max_frame.min(u32::MAX as usize),
        }
    }

    /// Fails with [`FrameError::TooLarge`] when `envelope` is too large for
    /// a frame; its encoded length otherwise. Cheap: nothing is encoded.
    pub fn encoded_len(&self, envelope: &Envelope) -> Result<usize, FrameError> {
        self.check_encoded_len(envelope)
    }

    /// The maximum frame size in force.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Appends one frame holding `envelope` to `dst`; on an error `dst`
    /// is left as it was.
    pub fn encode(&self, envelope: &Envelope, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = self.check_encoded_len(envelope)?;
        let start = dst.len();
        dst.reserve(LENGTH_PREFIX + len);
        dst.put_u32(len as u32);
        envelope
            .encode(dst)
            .expect("reserved exactly the encoded length");
        if let Err(error) = check_bounds(Root::Envelope, &dst[start + LENGTH_PREFIX..]) {
            dst.truncate(start);
            return Err(error);
        }
        Ok(())
    }

    /// One frame holding `envelope`, as a new buffer.
    pub fn encode_to_bytes(&self, envelope: &Envelope) -> Result<Bytes, FrameError> {
        let mut buf = BytesMut::new();
        self.encode(envelope, &mut buf)?;
        Ok(buf.freeze())
    }

    /// The envelope's bytes without a length prefix, for transports that
    /// delimit messages themselves (MPI, ZeroMQ).
    pub fn encode_body(&self, envelope: &Envelope) -> Result<Vec<u8>, FrameError> {
        self.check_encoded_len(envelope)?;
        let body = envelope.encode_to_vec();
        check_bounds(Root::Envelope, &body)?;
        Ok(body)
    }

    fn check_encoded_len(&self, envelope: &Envelope) -> Result<usize, FrameError> {
        let len = envelope.encoded_len();
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_frame,
            });
        }
        Ok(len)
    }

    /// Takes the next complete frame off the front of `src`.
    ///
    /// Returns `Ok(None)` when `src` does not yet hold a whole frame; the
    /// caller reads more and calls again. After an error the stream is out
    /// of step and should be closed.
    pub fn decode(&self, src: &mut BytesMut) -> Result<Option<Envelope>, FrameError> {
        let Some(len) = self.peek_len(src)? else {
            return Ok(None);
        };
        if src.len() < LENGTH_PREFIX + len {
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX);
        let body = src.split_to(len).freeze();
        self.decode_body(body).map(Some)
    }

    /// The length of the body of the frame `src` starts with, once its
    /// length prefix is there; fails as [`decode`](Self::decode) does for a
    /// frame too large.
    pub fn next_len(&self, src: &[u8]) -> Result<Option<usize>, FrameError> {
        self.peek_len(src)
    }

    /// Decodes a buffer that must hold exactly one frame.
    pub fn decode_exact(&self, frame: &[u8]) -> Result<Envelope, FrameError> {
        let needed = match self.peek_len(frame)? {
            Some(len) => LENGTH_PREFIX + len,
            None => LENGTH_PREFIX,
        };
        if frame.len() < needed {
            return Err(FrameError::Truncated {
                needed,
                available: frame.len(),
            });
        }
        if frame.len() > needed {
            return Err(FrameError::TrailingBytes(frame.len() - needed));
        }
        self.decode_body(Bytes::copy_from_slice(&frame[LENGTH_PREFIX..]))
    }

    /// Reports the leftover of a stream that ended: an error if it stopped
    /// inside a frame.
    pub fn finish(&self, rest: &[u8]) -> Result<(), FrameError> {
        if rest.is_empty() {
            return Ok(());
        }
        let needed = match self.peek_len(rest)? {
            Some(len) => LENGTH_PREFIX + len,
            None => LENGTH_PREFIX,
        };
        Err(FrameError::Truncated {
            needed,
            available: rest.len(),
        })
    }

    /// Decodes an envelope's bytes without a length prefix. Byte fields of
    /// the result share `body`'s memory rather than copying it.
    ///
    /// Refuses, before decoding, a body longer than the maximum frame, one
    /// whose values nest deeper than
    /// [`MAX_VALUE_DEPTH`](crate::MAX_VALUE_DEPTH), and one that
    /// could make prost allocate more than
    /// [`DECODE_EXPANSION`](crate::DECODE_EXPANSION) bytes per
    /// byte of it (plus [`DECODE_SLACK`]).
    pub fn decode_body(&self, body: Bytes) -> Result<Envelope, FrameError> {
        self.check_len(body.len())?;
        let needed = within_budget(scan::scan(Root::Envelope, &body)?, body.len())?;
        let envelope = Envelope::decode(body)?;
        if envelope.body.is_none() {
            return Err(FrameError::NoBody);
        }
        if needed > DECODE_SLACK {
            // Measured against the content encoded compactly as well: what
            // is accepted here is accepted again when forwarded.
            within_budget(needed, envelope.encoded_len())?;
        }
        Ok(envelope)
    }

    /// Decodes a bare [`Value`] (not in an envelope) under the same bounds
    /// as [`decode_body`](Self::decode_body). A value with no kind is
    /// returned as it is; [`Value::try_kind`] tells.
    pub fn decode_value(&self, bytes: Bytes) -> Result<Value, FrameError> {
        self.check_len(bytes.len())?;
        let needed = within_budget(scan::scan(Root::Value, &bytes)?, bytes.len())?;
        let value = Value::decode(bytes)?;
        if needed > DECODE_SLACK {
            within_budget(needed, value.encoded_len())?;
        }
        Ok(value)
    }

    /// What [`decode_body`](Self::decode_body) checks first: the most
    /// bytes prost may allocate to decode `body` (an envelope without its
    /// length prefix), or why the body is refused outright (malformed, or
    /// values nested too deep). Allocates nothing.
    pub fn scan_body(&self, body: &[u8]) -> Result<u64, FrameError> {
        scan::scan(Root::Envelope, body)
    }

    /// [`scan_body`](Self::scan_body) for a bare [`Value`].
    pub fn scan_value(&self, bytes: &[u8]) -> Result<u64, FrameError> {
        scan::scan(Root::Value, bytes)
    }

    fn check_len(&self, len: usize) -> Result<(), FrameError> {
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_frame,
            });
        }
        Ok(())
    }

    /// The declared length of the frame at the front of `src`, checked
    /// against the limit; `None` while the prefix is incomplete.
    fn peek_len(&self, src: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = src.first_chunk::<LENGTH_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_frame,
            });
        }
        Ok(Some(len))
    }
}

/// `needed` if a message of `len` bytes may allocate that much.
fn within_budget(needed: u64, len: usize) -> Result<u64, FrameError> {
    if needed > DECODE_CEILING {
        return Err(FrameError::OverCeiling {
            len: len as u64,
            needed,
            ceiling: DECODE_CEILING,
        });
    }
    let allowed = scan::allowed(len);
    if needed > allowed {
        return Err(FrameError::TooExpansive {
            len: len as u64,
            needed,
            allowed,
        });
    }
    Ok(needed)
}

/// Checks what an encoder wrote against the decoders' bounds.
fn check_bounds(root: Root, body: &[u8]) -> Result<(), FrameError> {
    within_budget(scan::scan(root, body)?, body.len()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{PingRequest, envelope::Body};

    fn ping(sequence: u64) -> Envelope {
        Envelope::new(Body::PingRequest(PingRequest { sequence }))
    }

    #[test]
    fn frames_split_anywhere_decode_in_order() {
        let framing = Framing::default();
        let mut wire = BytesMut::new();
        for seq in 0..3 {
            framing.encode(&ping(seq), &mut wire).unwrap();
        }
        let wire = wire.freeze();
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(env) = framing.decode(&mut buf).unwrap() {
                got.push(env);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(env) = framing.decode(&mut buf).unwrap() {
                got.push(env);
            }
            assert_eq!(got, vec![ping(0), ping(1), ping(2)], "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn oversized_declared_length_is_refused_before_reading_it() {
        let framing = Framing::new(16);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 17][..]);
        match framing.decode(&mut buf) {
            Err(FrameError::TooLarge { len: 17, max: 16 }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(buf.capacity() < 64);
    }

    #[test]
    fn encoding_past_the_limit_is_refused() {
        let framing = Framing::new(4);
        let env = ping(u64::MAX);
        assert!(matches!(
            framing.encode_to_bytes(&env),
            Err(FrameError::TooLarge { max: 4, .. })
        ));
    }

    #[test]
    fn truncated_and_trailing_input_are_told_apart() {
        let framing = Framing::default();
        let frame = framing.encode_to_bytes(&ping(7)).unwrap();
        assert_eq!(framing.decode_exact(&frame).unwrap(), ping(7));
        assert!(matches!(
            framing.decode_exact(&frame[..frame.len() - 1]),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            framing.decode_exact(&frame[..2]),
            Err(FrameError::Truncated {
                needed: 4,
                available: 2
            })
        ));
        let mut longer = frame.to_vec();
        longer.push(0);
        assert!(matches!(
            framing.decode_exact(&longer),
            Err(FrameError::TrailingBytes(1))
        ));
        assert!(matches!(
            framing.finish(&frame[..3]),
            Err(FrameError::Truncated { .. })
        ));
        assert!(framing.finish(&[]).is_ok());
    }

    #[test]
    fn malformed_and_empty_bodies_are_errors() {
        let framing = Framing::default();
        // A key that is a varint running off the end: the scan refuses it.
        assert!(matches!(
            framing.decode_exact(&[0, 0, 0, 2, 0xff, 0xff]),
            Err(FrameError::Invalid { at: 0, .. })
        ));
        // A string that is not UTF-8 (Hello.software): prost refuses it.
        assert!(matches!(
            framing.decode_exact(&[0, 0, 0, 5, 0x52, 0x03, 0x1a, 0x01, 0xff]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            framing.decode_exact(&[0, 0, 0, 0]),
            Err(FrameError::NoBody)
        ));
    }

    /// A frame within the relative bound that would still take more than
    /// the ceiling to decode: a list of 10 million one-item lists (about
    /// 70 MiB on the wire, 128 times that at most, 4 GiB and more decoded)
    /// is refused before anything is allocated for it, saying why.
    #[test]
    fn a_frame_past_the_decoding_ceiling_is_refused() {
        use crate::pb::Value;
        use prost::Message;
        let one = Value::list([Value::list([Value::none()])]).encode_to_vec();
        // `one` is the list's tag, its length, and one item (tag, length,
        // the item); the same list with `n` items repeats the item.
        let item = &one[2..];
        assert_eq!(usize::from(one[1]), item.len());
        let build = |n: usize| {
            let mut list = vec![one[0]];
            prost::encoding::encode_varint((item.len() * n) as u64, &mut list);
            list.reserve(item.len() * n);
            for _ in 0..n {
                list.extend_from_slice(item);
            }
            Bytes::from(list)
        };
        let framing = Framing::default();
        let small = build(1000);
        let decoded = framing.decode_value(small.clone()).unwrap();
        assert_eq!(decoded.encode_to_vec(), small, "the frame is well formed");
        let big = build(10_000_000);
        let len = big.len();
        let needed = framing.scan_value(&big).unwrap();
        assert!(
            needed > DECODE_CEILING && needed <= scan::allowed(len),
            "{needed}"
        );
        match framing.decode_value(big) {
            Err(e @ FrameError::OverCeiling { .. }) => {
                assert!(
                    e.to_string()
                        .contains("ceiling of 4294967296 bytes per frame"),
                    "{e}"
                )
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
}
