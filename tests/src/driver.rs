//! A driver that speaks the driver plane itself, frame by frame, over a
//! front door's Unix socket ([`RawDriver`]): for the tests that send what
//! no client library would (garbage, truncated frames, wrong versions) or
//! that must see every envelope the head node sends (a client library
//! keeps one record per request id, which would hide a duplicate).
//!
//! A frame is a 4-byte big-endian length and an `Envelope`'s bytes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use bytes::Bytes;
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{Envelope, Hello, ProtocolErrorCode, Role, StatusRequest};
use casa_node_protocol::{Framing, PROTOCOL_VERSION};

use crate::cluster::WAIT;

/// The correlation of what [`RawDriver::send`] sends.
const CORRELATION: u64 = 7;

/// A driver's `Hello` from `software`, with a front door's `token` (empty
/// for a Unix socket).
pub fn hello(software: &str, token: &str) -> Envelope {
    Envelope::correlated(
        1,
        Body::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Driver.into(),
            software: software.into(),
            host: "localhost".into(),
            pid: std::process::id(),
            token: token.into(),
            ..Hello::default()
        }),
    )
}

/// `body` (an envelope's bytes, however made) as one frame.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

/// `envelope` as one frame.
pub fn envelope_frame(envelope: &Envelope) -> Vec<u8> {
    Framing::default()
        .encode_to_bytes(envelope)
        .expect("a test's envelope frames")
        .to_vec()
}

/// A driver connection to a front door's Unix socket, spoken to frame by
/// frame. Reads wait up to [`WAIT`] (see [`stream`](Self::stream) to
/// change that). The `write_`/`read_` methods say what failed; the others
/// fail the test.
#[derive(Debug)]
pub struct RawDriver {
    stream: UnixStream,
}

impl RawDriver {
    /// Connects to the front door at `socket` (it says nothing yet: see
    /// [`greet`](Self::greet)).
    pub fn connect(socket: &Path) -> RawDriver {
        let stream = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("the front door {} accepts: {e}", socket.display()));
        stream.set_read_timeout(Some(WAIT)).expect("a read timeout");
        RawDriver { stream }
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Another handle on the same connection (to read on one thread and
    /// write on another).
    pub fn try_clone(&self) -> std::io::Result<RawDriver> {
        Ok(RawDriver {
            stream: self.stream.try_clone()?,
        })
    }

    /// Closes both directions: a reader waiting on another handle sees the
    /// end.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Sends `envelope` as one frame.
    pub fn write_envelope(&mut self, envelope: &Envelope) -> std::io::Result<()> {
        self.stream.write_all(&envelope_frame(envelope))
    }

    /// The next envelope, or `None` once the connection has closed between
    /// two frames.
    pub fn read_envelope(&mut self) -> std::io::Result<Option<Envelope>> {
        let mut prefix = [0u8; 4];
        match self.stream.read_exact(&mut prefix) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let framing = Framing::default();
        let len = u32::from_be_bytes(prefix) as usize;
        if len > framing.max_frame() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a frame of {len} bytes from the front door"),
            ));
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        framing
            .decode_body(Bytes::from(body))
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
    }

    /// Sends `bytes` as they are.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("the front door reads");
    }

    /// Sends `body` (an envelope's bytes, however made) as one frame.
    pub fn send_body(&mut self, body: &[u8]) {
        self.send_bytes(&frame(body));
    }

    /// Sends `body` in an envelope.
    pub fn send(&mut self, body: Body) {
        self.write_envelope(&Envelope::correlated(CORRELATION, body))
            .expect("the front door reads");
    }

    /// The next envelope, or `None` once the connection is closed.
    pub fn read(&mut self) -> Option<Envelope> {
        self.read_envelope()
            .unwrap_or_else(|e| panic!("reading the front door: {e}"))
    }

    /// The next envelope's body other than a log record.
    pub fn reply(&mut self) -> Body {
        loop {
            let envelope = self.read().expect("an answer before the connection closes");
            match envelope.body {
                Some(Body::LogRecord(_)) => continue,
                Some(body) => return body,
                None => unreachable!("decode_body refuses envelopes without a body"),
            }
        }
    }

    /// Expects a ProtocolError with `code`; returns its message.
    pub fn error(&mut self, code: ProtocolErrorCode) -> String {
        match self.reply() {
            Body::Error(e) => {
                assert_eq!(e.code(), code, "{}", e.message);
                e.message
            }
            other => panic!("expected a ProtocolError, got {other:?}"),
        }
    }

    /// Says [`hello`] as `software` and expects a Welcome.
    pub fn greet(&mut self, software: &str) {
        self.write_envelope(&hello(software, ""))
            .expect("Hello is sent");
        match self.reply() {
            Body::Welcome(_) => {}
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// True once the head node has closed the connection (and sent
    /// nothing more).
    pub fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(self.stream.read_to_end(&mut rest), Ok(0))
    }

    /// The connection is still in step: a status request is answered.
    pub fn in_step(&mut self) {
        self.send(Body::StatusRequest(StatusRequest::default()));
        assert!(matches!(self.reply(), Body::StatusReply(_)));
    }
}
