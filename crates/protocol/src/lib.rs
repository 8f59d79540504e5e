//! casa-node's protocol: the messages, and the logic that gives them
//! meaning, without any I/O.
//!
//! The messages are generated from `proto/casa/node/v1/*.proto`, the source
//! of truth for every language ([`pb`]). Around them this crate holds:
//!
//! - [`Framing`]: length-delimited frames under a size limit, decoded only
//!   after a scan of their wire structure bounds the memory decoding takes
//!   ([`DECODE_EXPANSION`]) and how deep values nest ([`MAX_VALUE_DEPTH`]);
//! - conversions between [`pb::Value`] and Rust types, and a Python-style
//!   `Display` for values;
//! - [`Transport`]: what MPI and ZeroMQ transports provide;
//! - [`HeadCore`] and [`ServerCore`]: deterministic state machines for the
//!   head node (queue, scheduler, monitor, lifecycle) and a server node
//!   (control, pings, command hand-off). They hold no sockets, threads or
//!   clocks: the caller feeds them events with the current time and carries
//!   out the actions they hand back.
//!
//! Rules cited as "rule N" are those of the project's `SEMANTICS.md`.
//!
//! With the feature `strategies`, [`strategies`] holds proptest strategies
//! for every message and for hostile wire input, for the tests of this
//! crate and of others; the default build has no proptest.

mod clock;
mod envelope;
mod error;
mod frame;
mod head;
mod scan;
mod server;
mod transport;
mod value;

#[cfg(feature = "strategies")]
pub mod strategies;

/// The generated message types of package `casa.node.v1`.
#[allow(missing_docs, clippy::doc_lazy_continuation)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/casa.node.v1.rs"));
}

pub use clock::WallClock;
pub use envelope::{PROTOCOL_VERSION, check_hello, check_version};
pub use error::{FrameError, TransportError, ValueError};
pub use frame::{DEFAULT_MAX_FRAME, Framing, LENGTH_PREFIX, OFFLOAD_THRESHOLD};
pub use head::{
    Action, CoreError, Event, HeadConfig, HeadCore, LeaseError, MAX_LEASE, MAX_LEASES, MAX_RANK,
    PREFETCH_MAX_BYTES, Rejection, SubmitError, response_record,
};
pub use scan::{DECODE_CEILING, DECODE_EXPANSION, DECODE_SLACK, MAX_VALUE_DEPTH};
pub use server::{
    ExecOutcome, Interruption, LAST_CHANCE, SHM_DIR_VAR, SHM_TAG_VAR, ServerAction, ServerConfig,
    ServerCore,
};
pub use transport::{Transport, TransportEvent};

/// A process's place in the cluster: 0 for the head node, 1.. for servers.
pub type Rank = i32;

/// A request's id: unique per head node, never reused, increasing
/// within one driver connection's submissions (rule 11).
pub type RequestId = u64;

/// Which driver connection a request came from; chosen by the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DriverId(pub u64);

impl std::fmt::Display for DriverId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "driver {}", self.0)
    }
}
