//! Flow control, as accounting without I/O: no sockets, no tasks, no
//! waiting. The engine and the handle keep those; they tell this module
//! what happened (a message sent, received, consumed; credit granted or
//! asked for) and it tells them what to do (grant this much now, take the
//! bytes from that pool, give this back to the sender).
//!
//! Each side grants its peer `window` data messages up front
//! and grants more as its application *consumes* messages (not when the
//! engine reads them), so the messages the engine holds for the
//! application, and those ZeroMQ holds in its queues, never exceed the
//! window per peer. The sender also bounds the bytes it has in flight per
//! peer; when that budget runs low it flags its messages so the receiver
//! returns credit as soon as they are consumed. A message that does not fit
//! in what is left of the budget may follow messages that were not flagged
//! (they left more than half of it free), whose credit the receiver would
//! return only after half a window of messages: so a sender that has to
//! wait for bytes also asks for credit (`R`), and the receiver then returns
//! the credit of everything consumed so far, and of what is still in
//! flight as it is consumed. The request leaves after every message sent
//! before it, including one still being encoded off the caller's thread:
//! it reaches the receiver after them, or it would hurry nothing.
//!
//! The pieces, per peer:
//!
//! - [`ReceiveWindow`], kept by the receiver: how many messages the peer
//!   may still send, and which of those it sent are consumed and not yet
//!   credited back. It says when to grant credit, and how much.
//! - [`SendWindow`], kept by the sender's engine: the charges of the
//!   messages in flight, settled oldest first as credit comes back. It says
//!   what a grant gives back, and refuses one that would make the window
//!   larger than [`MAX_WINDOW`].
//! - [`Budget`], the sender's byte budget and its rules: how many bytes a
//!   message takes, from which pool, and whether it asks for its credit
//!   back at once.
//!
//! The credit a sender has not used yet (messages, bytes, and the reserve's
//! bytes) is held in semaphores the handle waits on; a [`Refund`] says what
//! to add to them.

use std::collections::VecDeque;

use crate::MAX_WINDOW;

/// The bytes a sender may have in flight to one peer.
///
/// A message takes its size from `bytes` (a message larger than all of it
/// takes all of it, so it goes alone). Once a large message has taken most
/// of `bytes`, the small ones behind it (pings, their answers, log records)
/// would wait until the peer has received and consumed it, seconds for
/// hundreds of MiB, and an event loop waiting in `send` misses its
/// heartbeats; so a small message that does not fit in `bytes` may take its
/// size from a `reserve` of a 64th as much instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// The byte budget proper.
    pub(crate) bytes: u32,
    /// The small messages' reserve.
    pub(crate) reserve: u32,
    /// The largest message the reserve takes: a 16th of it.
    pub(crate) small: u32,
}

impl Budget {
    /// The budget of a sender that may have `max_in_flight_bytes` in
    /// flight to one peer (at least one byte).
    pub(crate) fn new(max_in_flight_bytes: u32) -> Self {
        let bytes = max_in_flight_bytes.max(1);
        let reserve = bytes / 64;
        Budget {
            bytes,
            reserve,
            small: reserve / 16,
        }
    }

    /// The bytes a message of `len` bytes (encoded) takes from the budget:
    /// its length, but at least one byte, and at most the whole budget, so
    /// that a larger message can go once nothing else is in flight.
    pub(crate) fn size(&self, len: usize) -> u32 {
        u32::try_from(len).unwrap_or(u32::MAX).clamp(1, self.bytes)
    }

    /// Where a message that takes `size` bytes (see [`size`](Self::size))
    /// takes them from, when `bytes` are left in the budget proper and
    /// `reserve` in the reserve.
    pub(crate) fn source(&self, size: u32, bytes: usize, reserve: usize) -> Source {
        let size = size as usize;
        if size <= bytes {
            Source::Bytes
        } else if size <= self.small as usize && size <= reserve {
            Source::Reserve
        } else {
            Source::Wait
        }
    }

    /// Whether a message asks the receiver to return its credit as soon as
    /// it is consumed: one that took its bytes from the reserve (it went
    /// past a large one, and the reserve is small), or one after which less
    /// than half the budget proper is left (`bytes_left`).
    pub(crate) fn credit_wanted(&self, reserved: bool, bytes_left: usize) -> bool {
        reserved || bytes_left < (self.bytes / 2) as usize
    }
}

/// Where a message takes its bytes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The budget proper has room for it.
    Bytes,
    /// The budget proper has not, but the message is small and the reserve
    /// has room for it.
    Reserve,
    /// Neither: the message waits for room in the budget proper, and the
    /// sender asks the peer for credit, so that the bytes of the messages
    /// in flight come back even if none of them was flagged.
    Wait,
}

/// What one data message in flight took from the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Charge {
    /// Bytes taken.
    pub(crate) bytes: u32,
    /// Taken from the reserve rather than the budget proper.
    pub(crate) reserved: bool,
}

/// Credit to give back to a sender: to add to what it has not used yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Refund {
    /// Data messages it may send.
    pub(crate) messages: usize,
    /// Bytes for the budget proper.
    pub(crate) bytes: usize,
    /// Bytes for the reserve.
    pub(crate) reserve: usize,
}

impl Refund {
    /// The credit taken for a message that was never sent (it could not be
    /// encoded): one message and its bytes.
    pub(crate) fn unsent(charge: Charge) -> Refund {
        let bytes = charge.bytes as usize;
        Refund {
            messages: 1,
            bytes: if charge.reserved { 0 } else { bytes },
            reserve: if charge.reserved { bytes } else { 0 },
        }
    }
}

/// A grant refused because it would make a sender's window larger than
/// [`MAX_WINDOW`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BeyondWindow;

/// The credit of the data messages one side sends to a peer, as its engine
/// keeps it: what each message sent and not yet credited back took from
/// the budget. The credit not used yet is the handle's; a grant says what
/// to give back to it.
#[derive(Debug, Default)]
pub(crate) struct SendWindow {
    /// The byte charges of the data messages sent and not yet credited, in
    /// order.
    charges: VecDeque<Charge>,
}

impl SendWindow {
    /// A data message that took `charge` is sent.
    pub(crate) fn sent(&mut self, charge: Charge) {
        self.charges.push_back(charge);
    }

    /// The peer grants `count` more messages, while the sender has
    /// `available` messages of credit it has not used yet.
    ///
    /// The peer credits messages as they are consumed, which is the order
    /// they were sent in (a message dropped as malformed is credited when
    /// it arrives, which may be earlier: its count then settles an older
    /// message's charge, and its own is settled by a later grant); so the
    /// grant settles the oldest charges, as many as it counts, and gives
    /// back their bytes and `count` messages. A grant beyond the messages
    /// in flight (the first, which opens the window) settles all of them.
    ///
    /// Credit available plus messages in flight is the peer's window,
    /// which may not exceed MAX_WINDOW: more would let ZeroMQ's queue
    /// for that peer fill up and make the engine wait. A grant that would
    /// is refused, and changes nothing.
    pub(crate) fn on_credit(
        &mut self,
        count: u32,
        available: usize,
    ) -> Result<Refund, BeyondWindow> {
        let count = count as usize;
        let window = available
            .saturating_add(self.charges.len())
            .saturating_add(count);
        if window > MAX_WINDOW as usize {
            return Err(BeyondWindow);
        }
        let settled = count.min(self.charges.len());
        let mut refund = Refund {
            messages: count,
            ..Refund::default()
        };
        for charge in self.charges.drain(..settled) {
            if charge.reserved {
                refund.reserve += charge.bytes as usize;
            } else {
                refund.bytes += charge.bytes as usize;
            }
        }
        Ok(refund)
    }
}

/// A data message received beyond the credit granted to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BeyondCredit;

/// Credit to grant a peer now: a `C` message with this count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a grant not sent is credit lost to the peer"]
pub(crate) struct Grant(pub(crate) u32);

/// The credit one side grants a peer for the data messages the peer sends
/// it: how many it may still send, and how many of those it sent the
/// application has consumed and not yet had credited back.
#[derive(Debug)]
pub(crate) struct ReceiveWindow {
    /// The messages granted up front.
    window: u32,
    /// Consumed messages returned in one grant, unless one is wanted
    /// sooner: half the window, and at least one.
    batch: u32,
    /// Data messages the peer may still send us.
    allowed: u64,
    /// Messages the application consumed since we last granted credit.
    consumed: u32,
    /// Messages delivered to the application and not yet consumed (as far
    /// as the engine knows: consumption is reported through a channel).
    unconsumed: u32,
    /// Messages whose credit goes back as soon as they are consumed, as if
    /// they had been flagged: those still unconsumed when the peer asked
    /// for credit.
    hurried: u32,
}

impl ReceiveWindow {
    /// A window of `window` messages, not yet open: the peer may send
    /// nothing until [`open`](Self::open).
    pub(crate) fn new(window: u32) -> Self {
        ReceiveWindow {
            window,
            batch: (window / 2).max(1),
            allowed: 0,
            consumed: 0,
            unconsumed: 0,
            hurried: 0,
        }
    }

    /// Opens the window: the peer may send `window` messages before it
    /// hears from us again.
    pub(crate) fn open(&mut self) -> Grant {
        self.allowed += u64::from(self.window);
        Grant(self.window)
    }

    /// A data message arrived: it uses one message of the credit granted,
    /// unless none is left, which a peer that keeps to the rules never
    /// does (the message is then to be dropped, and is not counted).
    pub(crate) fn received(&mut self) -> Result<(), BeyondCredit> {
        if self.allowed == 0 {
            return Err(BeyondCredit);
        }
        self.allowed -= 1;
        Ok(())
    }

    /// A message received goes to the application, which is to report when
    /// it has consumed it (a message dropped on arrival is reported
    /// consumed at once, so that the sender's window does not shrink).
    pub(crate) fn delivered(&mut self) {
        self.unconsumed += 1;
    }

    /// The application consumed a message, which its sender flagged if
    /// `credit_wanted`: returns the credit of every message consumed since
    /// the last grant if this one was flagged, or is one of those the peer
    /// hurried with a credit request, or makes half a window; else nothing
    /// yet.
    pub(crate) fn consumed(&mut self, credit_wanted: bool) -> Option<Grant> {
        self.consumed += 1;
        self.unconsumed = self.unconsumed.saturating_sub(1);
        let hurried = self.hurried > 0;
        self.hurried = self.hurried.saturating_sub(1);
        if credit_wanted || hurried || self.consumed >= self.batch {
            return Some(self.grant_consumed());
        }
        None
    }

    /// The peer waits for credit: return what is owed now, and the credit
    /// of the messages still unconsumed as each is consumed. (Everything it
    /// sent before asking has reached us: the request follows it on the
    /// same connection.)
    pub(crate) fn credit_requested(&mut self) -> Option<Grant> {
        self.hurried = self.unconsumed;
        (self.consumed > 0).then(|| self.grant_consumed())
    }

    /// Grants the messages consumed since the last grant.
    fn grant_consumed(&mut self) -> Grant {
        let grant = std::mem::take(&mut self.consumed);
        self.allowed += u64::from(grant);
        Grant(grant)
    }
}

#[cfg(test)]
mod tests;
