//! Conformance of casa.node.v1 implementations, and the support of the
//! tests that run real processes.
//!
//! - `vectors/` (checked by `vectors.rs`): encoded envelopes for every
//!   implementation, in any language, to decode and re-encode;
//! - [`transport`]: the checks every [`Transport`] passes, instantiated by
//!   each transport's own tests;
//! - [`cluster`]: the one launcher of real clusters (`casa-node up` over
//!   ZeroMQ, or under `mpirun` when `CASA_NODE_TEST_TRANSPORT=mpi`), which
//!   reads their start-up lines and stops every process they started by
//!   PID;
//! - [`driver`]: a driver that speaks the driver plane frame by frame over
//!   a front door's Unix socket;
//! - [`process`]: for the tests and benchmarks that start real processes,
//!   the MPI launcher and the `/proc` look-ups that stop them by PID.
//!
//! [`Transport`]: casa_node_protocol::Transport

pub mod cluster;
pub mod driver;
pub mod process;
pub mod transport;
