//! What the node's suites that start real clusters share beyond the test
//! support crate (`casa_node_conformance`, which cannot depend on this
//! crate): the binary under test, and the check, through the Rust client,
//! that a cluster serves. Each suite includes it with `mod common;`.

#![allow(dead_code)] // each suite uses part of it

use casa_node::client::{BlockingClient, Submit};
use casa_node_conformance::cluster::WAIT;
use casa_node_protocol::pb::Value;

/// The `casa-node` binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_casa-node");

/// `1+1` through `client` gives 2: the cluster serves.
pub fn still_serving(client: &BlockingClient) {
    let ids = client.submit(Submit::new("1+1")).expect("accepted");
    let mut responses = client.wait_timeout(&ids, WAIT).expect("answered");
    let response = responses.remove(0);
    assert!(response.successful, "{:?}", response.traceback);
    assert_eq!(response.ret, Some(Value::from(2)));
}
