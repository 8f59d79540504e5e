//! The casa-node runtime: the head node, server nodes and their Python
//! workers, the front door drivers connect to, and a Rust client for it.

pub mod casa;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod connection_file;
pub mod dashboard;
pub mod driver_queues;
pub mod endpoint;
pub mod executor;
pub mod front_door;
pub mod head_node;
pub mod journal;
pub mod json;
pub mod literal;
pub mod log;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod packages;
pub mod run;
pub mod server_node;
pub mod shm;
pub mod signals;
pub mod syntax;
pub mod tuning;

/// This machine's host name, for logs and the cluster description.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
