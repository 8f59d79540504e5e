//! Building envelopes and checking the peer's protocol version.

use crate::pb::envelope::Body;
use crate::pb::{Envelope, ProtocolError, ProtocolErrorCode};

/// The protocol's major version. Peers with different major versions
/// refuse each other at the handshake.
pub const PROTOCOL_VERSION: u32 = 1;

impl Envelope {
    /// An envelope of this protocol version carrying `body`, outside any
    /// request/reply pair.
    pub fn new(body: Body) -> Self {
        Envelope {
            protocol_version: PROTOCOL_VERSION,
            correlation: 0,
            body: Some(body),
        }
    }

    /// An envelope carrying `body` as the request or reply numbered
    /// `correlation`.
    pub fn correlated(correlation: u64, body: Body) -> Self {
        Envelope {
            protocol_version: PROTOCOL_VERSION,
            correlation,
            body: Some(body),
        }
    }

    /// A [`ProtocolError`] envelope answering `correlation`.
    pub fn error(correlation: u64, code: ProtocolErrorCode, message: impl Into<String>) -> Self {
        Envelope::correlated(
            correlation,
            Body::Error(ProtocolError {
                code: code.into(),
                message: message.into(),
            }),
        )
    }

    /// The name of the message carried, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match &self.body {
            None => "empty envelope",
            Some(body) => body.name(),
        }
    }
}

impl Body {
    /// The message's name in the specification.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Hello(_) => "Hello",
            Body::Welcome(_) => "Welcome",
            Body::Error(_) => "ProtocolError",
            Body::CommandRequest(_) => "CommandRequest",
            Body::CommandResponse(_) => "CommandResponse",
            Body::ControlRequest(_) => "ControlRequest",
            Body::ControlResponse(_) => "ControlResponse",
            Body::PingRequest(_) => "PingRequest",
            Body::PingResponse(_) => "PingResponse",
            Body::LogRecord(_) => "LogRecord",
            Body::SubmitRequest(_) => "SubmitRequest",
            Body::SubmitReply(_) => "SubmitReply",
            Body::ResponseDelivery(_) => "ResponseDelivery",
            Body::StatusRequest(_) => "StatusRequest",
            Body::StatusReply(_) => "StatusReply",
            Body::CancelRequest(_) => "CancelRequest",
            Body::CancelReply(_) => "CancelReply",
            Body::LogSubscription(_) => "LogSubscription",
            Body::StopRequest(_) => "StopRequest",
            Body::DebuggingModeRequest(_) => "DebuggingModeRequest",
            Body::TrackRequest(_) => "TrackRequest",
            Body::TrackReply(_) => "TrackReply",
            Body::LogLevelRequest(_) => "LogLevelRequest",
            Body::Ack(_) => "Ack",
            Body::IdLeaseRequest(_) => "IdLeaseRequest",
            Body::IdLease(_) => "IdLease",
        }
    }
}

/// Checks a peer's protocol version (from its `Hello`, `Welcome` or any
/// envelope). On a mismatch, returns the [`ProtocolError`] envelope to send
/// back before closing, so the peer gets a clear error rather than a hang.
pub fn check_version(peer_version: u32, correlation: u64) -> Result<(), Box<Envelope>> {
    if peer_version == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(Box::new(Envelope::error(
        correlation,
        ProtocolErrorCode::IncompatibleVersion,
        format!(
            "incompatible protocol version {peer_version}: this peer speaks casa.node.v{PROTOCOL_VERSION}"
        ),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::Hello;

    #[test]
    fn a_wrong_version_gets_an_error_naming_both_versions() {
        assert!(check_version(PROTOCOL_VERSION, 1).is_ok());
        let reply = check_version(7, 42).unwrap_err();
        assert_eq!(reply.correlation, 42);
        match reply.body {
            Some(Body::Error(e)) => {
                assert_eq!(e.code(), ProtocolErrorCode::IncompatibleVersion);
                assert!(e.message.contains("version 7"), "{}", e.message);
                assert!(e.message.contains("v1"), "{}", e.message);
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn envelopes_name_their_message() {
        let env = Envelope::new(Body::Hello(Hello::default()));
        assert_eq!(env.kind(), "Hello");
        assert_eq!(env.protocol_version, PROTOCOL_VERSION);
    }
}
