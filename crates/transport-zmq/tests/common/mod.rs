//! What the ZeroMQ transport's test files share: reading the next event
//! and taking apart the error of a join that failed.

#![allow(dead_code)] // each test file uses its own part

use casa_node_protocol::TransportError;
use casa_node_protocol::pb::ProtocolErrorCode;
use casa_node_protocol::{Transport, TransportEvent};
use casa_node_transport_zmq::{HandshakeError, ZmqTransport};

pub async fn next_event(transport: &mut ZmqTransport) -> TransportEvent {
    transport.recv().await.expect("recv")
}

/// The handshake error inside a failed `connect`.
pub fn handshake_error(error: TransportError) -> HandshakeError {
    match error {
        TransportError::Io { source, .. } => source
            .downcast_ref::<HandshakeError>()
            .cloned()
            .unwrap_or_else(|| panic!("not a handshake error: {source}")),
        other => panic!("expected an Io error, got {other:?}"),
    }
}

/// Checks that the head node refused the join with `code`, saying
/// something that contains `says`.
pub fn assert_refused(error: TransportError, code: ProtocolErrorCode, says: &str) {
    match handshake_error(error) {
        HandshakeError::Refused {
            code: refused,
            message,
        } => {
            assert_eq!(refused, code, "{message}");
            assert!(message.contains(says), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Checks that the join failed as unauthenticated, saying something that
/// contains `says`.
pub fn assert_unauthenticated(error: TransportError, says: &str) {
    match handshake_error(error) {
        HandshakeError::Unauthenticated(message) => {
            assert!(message.contains(says), "{message}");
        }
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
}
