//! Length-delimited framing of [`Envelope`]s: a 4-byte big-endian length
//! followed by that many bytes of protobuf.
//!
//! The same framing is used on the front door, on the worker pipes and by
//! the ZeroMQ transport's peers in other languages: it is what tokio-util's
//! `LengthDelimitedCodec` speaks by default and what Python reads with
//! `struct.unpack(">I", ...)`. Decoding never trusts the declared length
//! beyond the configured maximum, never panics, and never reserves memory
//! for bytes that have not arrived.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::error::FrameError;
use crate::pb::Envelope;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Default maximum frame size: 1 GiB, room for 256 MiB arrays and more.
pub const DEFAULT_MAX_FRAME: usize = 1 << 30;

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

    /// The maximum frame size in force.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Appends one frame holding `envelope` to `dst`.
    pub fn encode(&self, envelope: &Envelope, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = self.check_encoded_len(envelope)?;
        dst.reserve(LENGTH_PREFIX + len);
        dst.put_u32(len as u32);
        envelope
            .encode(dst)
            .expect("reserved exactly the encoded length");
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
        Ok(envelope.encode_to_vec())
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
    pub fn decode_body(&self, body: Bytes) -> Result<Envelope, FrameError> {
        if body.len() > self.max_frame {
            return Err(FrameError::TooLarge {
                len: body.len() as u64,
                max: self.max_frame,
            });
        }
        let envelope = Envelope::decode(body)?;
        if envelope.body.is_none() {
            return Err(FrameError::NoBody);
        }
        Ok(envelope)
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
        assert!(matches!(
            framing.decode_exact(&[0, 0, 0, 2, 0xff, 0xff]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            framing.decode_exact(&[0, 0, 0, 0]),
            Err(FrameError::NoBody)
        ));
    }
}
