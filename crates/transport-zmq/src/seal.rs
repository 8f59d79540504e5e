//! Signed links: the seal that goes first on every message of a link whose
//! peers share a [`SigningKey`], and the state each side keeps to refuse
//! replays.
//!
//! The crate documentation says what is signed and why; this module does
//! the arithmetic.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a link nonce.
pub(crate) const NONCE_LEN: usize = 16;

/// Bytes of an HMAC-SHA256 tag.
const TAG_LEN: usize = 32;

/// Bytes of the seal part: the sender's nonce, the counter, the tag.
pub(crate) const SEAL_LEN: usize = NONCE_LEN + 8 + TAG_LEN;

/// Put before everything a tag covers, so that a tag made with the same key
/// for anything else (the connection file's key may serve other purposes)
/// is never valid here.
const DOMAIN: &[u8] = b"casa-node zmq link v1";

/// A nonce chosen at random by one side of a link for that link alone.
pub(crate) type Nonce = [u8; NONCE_LEN];

/// The nonce a Hello stands in for the head node's, not chosen yet.
pub(crate) const NO_NONCE: Nonce = [0; NONCE_LEN];

/// The key both ends of a signed link hold: 32 bytes, as in the
/// connection file's `signing_key` (64 hexadecimal digits).
///
/// Not comparable: comparing secrets is the HMAC's job, in constant time.
#[derive(Clone)]
pub struct SigningKey([u8; SigningKey::LEN]);

impl SigningKey {
    /// Bytes of a key.
    pub const LEN: usize = 32;

    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; SigningKey::LEN]) -> Self {
        SigningKey(bytes)
    }

    /// A key from 64 hexadecimal digits (either case), as the connection
    /// file's `signing_key` spells it; surrounding white space is ignored.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim().as_bytes();
        if text.len() != 2 * Self::LEN {
            return Err(KeyError::Length(text.len()));
        }
        let mut key = [0; Self::LEN];
        for (byte, pair) in key.iter_mut().zip(text.chunks_exact(2)) {
            let digit = |c: u8| (c as char).to_digit(16).ok_or(KeyError::NotHex);
            *byte = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
        }
        Ok(SigningKey(key))
    }
}

impl fmt::Debug for SigningKey {
    // A key in a log line would be a key given away.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

/// Why a text is not a [`SigningKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not 64 digits.
    #[error("a signing key is 64 hexadecimal digits (32 bytes), not {0} characters")]
    Length(usize),
    /// A character that is not a hexadecimal digit.
    #[error("a signing key is hexadecimal digits only")]
    NotHex,
}

/// Which way a message goes; in every tag, so that a message cannot be
/// reflected back to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// From a server node's DEALER to the head node's ROUTER.
    ToRouter = 0,
    /// From the head node's ROUTER to a server node's DEALER.
    ToDealer = 1,
}

/// The nonces that name one link: the server node's, chosen per `connect`,
/// and the head node's, chosen per accepted Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkId {
    pub(crate) dealer: Nonce,
    pub(crate) router: Nonce,
}

impl LinkId {
    /// The nonce of the side that sends `direction`.
    pub(crate) fn sender(&self, direction: Direction) -> Nonce {
        match direction {
            Direction::ToRouter => self.dealer,
            Direction::ToDealer => self.router,
        }
    }
}

/// One side's signing state for one link.
#[derive(Debug, Clone)]
pub(crate) struct LinkSeal {
    pub(crate) id: LinkId,
    /// The counter of the last message sealed (the handshake's is 0).
    pub(crate) sent: u64,
    /// The highest counter accepted from the peer.
    pub(crate) received: u64,
}

impl LinkSeal {
    /// A link whose handshake (counter 0 both ways) is done.
    pub(crate) fn new(id: LinkId) -> Self {
        LinkSeal {
            id,
            sent: 0,
            received: 0,
        }
    }
}

/// A seal as read off the wire, not yet checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seal<'a> {
    /// The sender's nonce.
    pub(crate) nonce: Nonce,
    pub(crate) counter: u64,
    tag: &'a [u8],
}

impl<'a> Seal<'a> {
    /// Splits a seal part; `None` if it is not one.
    pub(crate) fn parse(part: &'a [u8]) -> Option<Seal<'a>> {
        if part.len() != SEAL_LEN {
            return None;
        }
        let (nonce, rest) = part.split_at(NONCE_LEN);
        let (counter, tag) = rest.split_at(8);
        Some(Seal {
            nonce: nonce.try_into().expect("NONCE_LEN bytes"),
            counter: u64::from_be_bytes(counter.try_into().expect("8 bytes")),
            tag,
        })
    }
}

/// Makes and checks tags under one key.
#[derive(Clone)]
pub(crate) struct Signer {
    /// Keyed once: cloning it per message skips the key schedule.
    keyed: HmacSha256,
}

impl Signer {
    pub(crate) fn new(key: &SigningKey) -> Self {
        Signer {
            keyed: HmacSha256::new_from_slice(&key.0).expect("HMAC takes keys of any length"),
        }
    }

    /// The MAC over everything a tag covers: which way, the link, the
    /// counter, and each part with its length (so that moving bytes from
    /// one part to the next changes the tag).
    fn mac(
        &self,
        direction: Direction,
        link: &LinkId,
        counter: u64,
        parts: &[Bytes],
    ) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(DOMAIN);
        mac.update(&[direction as u8]);
        mac.update(&link.dealer);
        mac.update(&link.router);
        mac.update(&counter.to_be_bytes());
        mac.update(&(parts.len() as u64).to_be_bytes());
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// The seal part for `parts`, sent with `counter` on `link`.
    pub(crate) fn seal(
        &self,
        direction: Direction,
        link: &LinkId,
        counter: u64,
        parts: &[Bytes],
    ) -> Bytes {
        let own = link.sender(direction);
        let tag = self
            .mac(direction, link, counter, parts)
            .finalize()
            .into_bytes();
        let mut seal = BytesMut::with_capacity(SEAL_LEN);
        seal.put_slice(&own);
        seal.put_u64(counter);
        seal.put_slice(&tag);
        seal.freeze()
    }

    /// Whether `seal` is the tag of `parts` on `link`, in constant time.
    pub(crate) fn verify(
        &self,
        direction: Direction,
        link: &LinkId,
        seal: &Seal<'_>,
        parts: &[Bytes],
    ) -> bool {
        self.mac(direction, link, seal.counter, parts)
            .verify_slice(seal.tag)
            .is_ok()
    }
}

/// A fresh random nonce.
pub(crate) fn nonce() -> Nonce {
    let mut nonce = NO_NONCE;
    // Without the OS's random numbers nothing here can be safe: better to
    // stop than to reuse a nonce.
    getrandom::fill(&mut nonce).expect("the operating system's random number generator failed");
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(items: &[&'static [u8]]) -> Vec<Bytes> {
        items.iter().map(|p| Bytes::from_static(p)).collect()
    }

    #[test]
    fn a_seal_verifies_only_what_it_sealed() {
        let signer = Signer::new(&SigningKey::from_bytes([7; 32]));
        let link = LinkId {
            dealer: [1; NONCE_LEN],
            router: [2; NONCE_LEN],
        };
        let message = parts(&[b"D\0", b"payload"]);
        let sealed = signer.seal(Direction::ToRouter, &link, 5, &message);
        assert_eq!(sealed.len(), SEAL_LEN);
        let seal = Seal::parse(&sealed).expect("a seal");
        assert_eq!((seal.nonce, seal.counter), (link.dealer, 5));
        assert!(signer.verify(Direction::ToRouter, &link, &seal, &message));

        let other_key = Signer::new(&SigningKey::from_bytes([8; 32]));
        assert!(!other_key.verify(Direction::ToRouter, &link, &seal, &message));
        assert!(!signer.verify(Direction::ToDealer, &link, &seal, &message));
        let other_link = LinkId {
            router: [3; NONCE_LEN],
            ..link
        };
        assert!(!signer.verify(Direction::ToRouter, &other_link, &seal, &message));
        for tampered in [
            parts(&[b"D\0", b"paylOad"]),
            parts(&[b"D\0p", b"ayload"]),
            parts(&[b"D\0", b"payload", b""]),
            parts(&[b"D\0"]),
        ] {
            assert!(!signer.verify(Direction::ToRouter, &link, &seal, &tampered));
        }
        let mut counter_changed = sealed.to_vec();
        counter_changed[NONCE_LEN + 7] ^= 1;
        let changed = Seal::parse(&counter_changed).expect("a seal");
        assert!(!signer.verify(Direction::ToRouter, &link, &changed, &message));
        assert!(Seal::parse(&sealed[1..]).is_none());
    }

    #[test]
    fn keys_are_read_from_hex_and_never_shown() {
        let hex = "00ff10ab".repeat(8);
        let key = SigningKey::from_hex(&format!(" {}\n", hex.to_uppercase())).expect("a key");
        assert_eq!(key.0.to_vec(), [0x00, 0xff, 0x10, 0xab].repeat(8));
        assert_eq!(format!("{key:?}"), "SigningKey(..)");
        let error = |text: &str| SigningKey::from_hex(text).err();
        assert_eq!(error("abc"), Some(KeyError::Length(3)));
        assert_eq!(error(&"g".repeat(64)), Some(KeyError::NotHex));
        assert_eq!(error(&"é".repeat(32)), Some(KeyError::NotHex));
        assert_ne!(nonce(), nonce());
    }
}
