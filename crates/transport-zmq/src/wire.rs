//! The transport's own header: the first part of every ZeroMQ message
//! between a DEALER and the ROUTER.
//!
//! The table of headers is in the crate documentation.

use bytes::Bytes;

const HELLO: u8 = b'H';
const WELCOME: u8 = b'W';
const DATA: u8 = b'D';
const CREDIT: u8 = b'C';
const BYE: u8 = b'B';
const BYE_ACK: u8 = b'A';
const CREDIT_REQUEST: u8 = b'R';

const FLAG_CREDIT_WANTED: u8 = 1;

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Header {
    Hello,
    Welcome,
    Data { credit_wanted: bool },
    Credit(u32),
    CreditRequest,
    Bye,
    ByeAck,
}

impl Header {
    pub(crate) fn encode(self) -> Bytes {
        match self {
            Header::Hello => Bytes::from_static(&[HELLO]),
            Header::Welcome => Bytes::from_static(&[WELCOME]),
            Header::Data {
                credit_wanted: false,
            } => Bytes::from_static(&[DATA, 0]),
            Header::Data {
                credit_wanted: true,
            } => Bytes::from_static(&[DATA, FLAG_CREDIT_WANTED]),
            Header::Credit(count) => {
                let mut buf = Vec::with_capacity(5);
                buf.push(CREDIT);
                buf.extend_from_slice(&count.to_be_bytes());
                Bytes::from(buf)
            }
            Header::CreditRequest => Bytes::from_static(&[CREDIT_REQUEST]),
            Header::Bye => Bytes::from_static(&[BYE]),
            Header::ByeAck => Bytes::from_static(&[BYE_ACK]),
        }
    }

    /// Reads a header; `None` for anything this version does not know.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Header> {
        match bytes {
            [HELLO] => Some(Header::Hello),
            [WELCOME] => Some(Header::Welcome),
            [DATA, flags] => Some(Header::Data {
                credit_wanted: flags & FLAG_CREDIT_WANTED != 0,
            }),
            [CREDIT, a, b, c, d] => Some(Header::Credit(u32::from_be_bytes([*a, *b, *c, *d]))),
            [CREDIT_REQUEST] => Some(Header::CreditRequest),
            [BYE] => Some(Header::Bye),
            [BYE_ACK] => Some(Header::ByeAck),
            _ => None,
        }
    }

    /// Whether an envelope part follows this header.
    pub(crate) fn carries_envelope(self) -> bool {
        matches!(self, Header::Hello | Header::Welcome | Header::Data { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_unknown_ones_are_refused() {
        for header in [
            Header::Hello,
            Header::Welcome,
            Header::Data {
                credit_wanted: false,
            },
            Header::Data {
                credit_wanted: true,
            },
            Header::Credit(0),
            Header::Credit(u32::MAX),
            Header::CreditRequest,
            Header::Bye,
            Header::ByeAck,
        ] {
            assert_eq!(Header::decode(&header.encode()), Some(header));
        }
        for junk in [&b""[..], b"X", b"D", b"C\0\0\0", b"HH", b"B\0", b"R\0"] {
            assert_eq!(Header::decode(junk), None, "{junk:?}");
        }
    }
}
