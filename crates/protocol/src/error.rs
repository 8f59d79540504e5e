//! The errors of this crate, one enum per kind of operation.

use thiserror::Error;

use crate::Rank;

/// Reading a [`Value`](crate::pb::Value) as a Rust type failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValueError {
    /// The value has none of the kinds of the `oneof`.
    #[error("value carries no kind")]
    Empty,
    /// The value holds another Python type.
    #[error("expected {expected}, found {found}")]
    Type {
        /// The type asked for.
        expected: &'static str,
        /// The Python type held.
        found: &'static str,
    },
    /// The integer does not fit the Rust type asked for.
    #[error("integer out of range")]
    IntOutOfRange,
    /// A dict entry lacks its key or its value.
    #[error("dict entry without key or value")]
    IncompleteEntry,
}

/// Framing or decoding a message failed.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The frame is longer than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The frame's length, as declared or as encoded.
        len: u64,
        /// The maximum frame size in force.
        max: usize,
    },
    /// The input ended inside a frame.
    #[error("truncated frame: {needed} bytes needed, {available} available")]
    Truncated {
        /// Bytes the frame needs, length prefix included.
        needed: usize,
        /// Bytes there were.
        available: usize,
    },
    /// Bytes follow the single frame that was expected.
    #[error("{0} unexpected bytes after the frame")]
    TrailingBytes(usize),
    /// The frame's bytes are not a valid envelope (found by prost).
    #[error("malformed envelope: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The frame's bytes are not a valid envelope (found by the scan that
    /// precedes decoding, for a reason prost would refuse it too).
    #[error("malformed envelope: {reason} (byte {at})")]
    Invalid {
        /// Where the offending field starts, from the start of the body.
        at: usize,
        /// What is wrong there.
        reason: &'static str,
    },
    /// A value nests deeper than
    /// [`MAX_VALUE_DEPTH`](crate::MAX_VALUE_DEPTH) protobuf messages.
    #[error(
        "a value nests lists, tuples and dicts deeper than {max} protobuf messages; \
         send it pickled or flatter"
    )]
    TooDeep {
        /// The bound, [`MAX_VALUE_DEPTH`](crate::MAX_VALUE_DEPTH).
        max: usize,
    },
    /// Decoding the frame could take more memory than
    /// [`DECODE_EXPANSION`](crate::DECODE_EXPANSION) bytes per byte of it.
    #[error(
        "a frame of {len} bytes could take {needed} bytes of memory once decoded, \
         more than the {allowed} allowed (many empty values or dict entries?)"
    )]
    TooExpansive {
        /// The length of the frame, or of its content encoded compactly.
        len: u64,
        /// The bound on what decoding it allocates.
        needed: u64,
        /// The most allowed for `len` bytes.
        allowed: u64,
    },
    /// Decoding the frame could take more memory than
    /// [`DECODE_CEILING`](crate::DECODE_CEILING), whatever its size.
    #[error(
        "a frame of {len} bytes could take {needed} bytes of memory once decoded, \
         more than the ceiling of {ceiling} bytes per frame; send large collections \
         of small values as bytes or a NumPy array, or split them"
    )]
    OverCeiling {
        /// The length of the frame, or of its content encoded compactly.
        len: u64,
        /// The bound on what decoding it allocates.
        needed: u64,
        /// [`DECODE_CEILING`](crate::DECODE_CEILING).
        ceiling: u64,
    },
    /// The envelope carries no message.
    #[error("envelope carries no message")]
    NoBody,
}

/// A transport could not deliver or receive a message.
#[derive(Debug, Error)]
pub enum TransportError {
    /// No peer has this rank.
    #[error("no peer with rank {0}")]
    UnknownRank(Rank),
    /// The peer is gone: its link closed or it exited.
    #[error("peer {0} is disconnected")]
    Disconnected(Rank),
    /// The transport was shut down.
    #[error("transport is shut down")]
    Closed,
    /// A message could not be framed or decoded.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The underlying library or operating system failed.
    #[error("{context}: {source}")]
    Io {
        /// What the transport was doing.
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
