//! Conformance of casa.node.v1 implementations.
//!
//! - `vectors/` (checked by `vectors.rs`): encoded envelopes for every
//!   implementation, in any language, to decode and re-encode;
//! - [`transport`]: the checks every [`Transport`] passes, instantiated by
//!   each transport's own tests;
//! - [`process`]: for the tests and benchmarks that start real processes,
//!   the MPI launcher and the `/proc` look-ups that stop them by PID.
//!
//! [`Transport`]: casa_node_protocol::Transport

pub mod process;
pub mod transport;
