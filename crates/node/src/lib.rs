//! The casa-node runtime: the client node, server nodes and their Python
//! workers, the front door drivers connect to, and a Rust client for it.

pub mod executor;
