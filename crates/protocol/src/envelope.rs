//! Building envelopes and checking the peer's protocol version.

use crate::pb::envelope::Body;
use crate::pb::{
    CommandResponse, Constant, Envelope, Hello, ProtocolError, ProtocolErrorCode, Role, Value,
};

/// The protocol's major version. Peers with different major versions
/// refuse each other at the handshake. `CONSTANT_PROTOCOL_VERSION` of
/// `envelope.proto`, which every implementation reads.
pub const PROTOCOL_VERSION: u32 = Constant::ProtocolVersion as u32;

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
            Body::ClaimRequest(_) => "ClaimRequest",
            Body::ClaimReply(_) => "ClaimReply",
        }
    }
}

impl CommandResponse {
    /// This response without its return value (None instead) and
    /// parameters: the part of a response that fits any frame.
    pub fn without_payload(&self) -> CommandResponse {
        CommandResponse {
            id: self.id,
            command: self.command.clone(),
            mode: self.mode,
            parameters: Vec::new(),
            ret: Some(Value::none()),
            server: self.server,
            status: self.status,
            successful: self.successful,
            traceback: self.traceback.clone(),
            command_start_time: self.command_start_time,
            command_stop_time: self.command_stop_time,
            worker_restarted: self.worker_restarted,
            failure: self.failure,
            worker_signal: self.worker_signal,
            worker_exit_code: self.worker_exit_code,
        }
    }

    /// What is sent instead of a response too large for a frame: this
    /// response [without its payload](Self::without_payload), failed, its
    /// traceback starting with `why`, so the peer waiting for it learns why
    /// rather than waiting for ever. A success becomes a failure of kind
    /// [`FailureKind::TooLarge`](crate::pb::FailureKind::TooLarge); a
    /// failure keeps its kind.
    pub fn too_large(&self, why: &str) -> CommandResponse {
        let mut response = self.without_payload();
        response.traceback = Some(match response.traceback.take() {
            Some(traceback) if !response.successful && !traceback.is_empty() => {
                format!("{why}\n{traceback}")
            }
            _ => why.to_owned(),
        });
        if response.successful {
            response.failure = crate::pb::FailureKind::TooLarge.into();
        }
        response.successful = false;
        response
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

/// Checks the first message of a connection: a `Hello`, of this protocol
/// version (the envelope's and the Hello's), from a peer of role
/// `expected`; `place` names what it connects to, for the refusal
/// ("the front door"). On a refusal, returns the error envelope to send
/// back before closing.
pub fn check_hello(
    envelope: Envelope,
    expected: Role,
    place: &str,
) -> Result<Hello, Box<Envelope>> {
    let correlation = envelope.correlation;
    let hello = match envelope.body {
        Some(Body::Hello(hello)) => hello,
        other => {
            let kind = other.as_ref().map_or("nothing", Body::name);
            return Err(Box::new(Envelope::error(
                correlation,
                ProtocolErrorCode::UnexpectedMessage,
                format!("expected Hello, got {kind}"),
            )));
        }
    };
    check_version(hello.protocol_version, correlation)?;
    check_version(envelope.protocol_version, correlation)?;
    if hello.role() != expected {
        let who = match expected {
            Role::Driver => "drivers",
            Role::ServerNode => "server nodes",
            Role::HeadNode => "head nodes",
            Role::Unspecified => "peers of a role",
        };
        return Err(Box::new(Envelope::error(
            correlation,
            ProtocolErrorCode::RoleRefused,
            format!(
                "only {who} may connect to {place}, not {}",
                hello.role().as_str_name()
            ),
        )));
    }
    Ok(hello)
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
    fn a_response_too_large_is_sent_failed_without_payload_saying_why() {
        use crate::pb::Parameter;
        use prost::Message;
        let big = Value::bytes(vec![7u8; 1 << 20]);
        let response = CommandResponse {
            id: 9,
            command: "f(x)".into(),
            parameters: vec![Parameter {
                name: "x".into(),
                value: Some(big.clone()),
            }],
            ret: Some(big),
            server: 2,
            successful: true,
            traceback: None,
            command_start_time: 1.5,
            ..CommandResponse::default()
        };
        let small = response.too_large("too large");
        assert!(small.encoded_len() < 100, "{}", small.encoded_len());
        assert_eq!(
            (
                small.id,
                small.server,
                small.command.as_str(),
                small.command_start_time
            ),
            (9, 2, "f(x)", 1.5)
        );
        assert!(!small.successful && small.parameters.is_empty());
        assert_eq!(small.ret, Some(Value::none()));
        assert_eq!(small.traceback.as_deref(), Some("too large"));
        let failed = CommandResponse {
            successful: false,
            traceback: Some("Traceback: boom".into()),
            ..response
        };
        assert_eq!(
            failed
                .without_payload()
                .too_large("too large")
                .traceback
                .as_deref(),
            Some("too large\nTraceback: boom")
        );
    }

    #[test]
    fn a_hello_is_checked_for_kind_versions_and_role() {
        let hello = |version: u32, role: Role| Hello {
            protocol_version: version,
            role: role.into(),
            ..Hello::default()
        };
        let refusal = |envelope: Envelope| {
            let reply = check_hello(envelope, Role::Driver, "the front door").unwrap_err();
            assert_eq!(reply.correlation, 5);
            match reply.body {
                Some(Body::Error(e)) => (e.code(), e.message),
                other => panic!("expected an error, got {other:?}"),
            }
        };
        let ok = Envelope::correlated(5, Body::Hello(hello(PROTOCOL_VERSION, Role::Driver)));
        let checked = check_hello(ok, Role::Driver, "the front door").unwrap();
        assert_eq!(checked.role(), Role::Driver);
        let (code, message) = refusal(Envelope::correlated(
            5,
            Body::PingRequest(Default::default()),
        ));
        assert_eq!(code, ProtocolErrorCode::UnexpectedMessage);
        assert_eq!(message, "expected Hello, got PingRequest");
        let (code, _) = refusal(Envelope::correlated(5, Body::Hello(hello(9, Role::Driver))));
        assert_eq!(code, ProtocolErrorCode::IncompatibleVersion);
        let mut old = Envelope::correlated(5, Body::Hello(hello(PROTOCOL_VERSION, Role::Driver)));
        old.protocol_version = 9;
        let (code, message) = refusal(old);
        assert_eq!(code, ProtocolErrorCode::IncompatibleVersion);
        assert!(message.contains("version 9"), "{message}");
        let (code, message) = refusal(Envelope::correlated(
            5,
            Body::Hello(hello(PROTOCOL_VERSION, Role::ServerNode)),
        ));
        assert_eq!(code, ProtocolErrorCode::RoleRefused);
        assert_eq!(
            message,
            "only drivers may connect to the front door, not ROLE_SERVER_NODE"
        );
    }

    #[test]
    fn envelopes_name_their_message() {
        let env = Envelope::new(Body::Hello(Hello::default()));
        assert_eq!(env.kind(), "Hello");
        assert_eq!(env.protocol_version, PROTOCOL_VERSION);
    }
}
