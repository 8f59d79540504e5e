//! The one trait every transport implements, so the node's event loop runs
//! unchanged over MPI and ZeroMQ.

use std::future::Future;

use crate::Rank;
use crate::error::TransportError;
use crate::pb::Envelope;

/// Something a transport reports.
// Messages are by far the most frequent event, so they are not boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum TransportEvent {
    /// An envelope arrived from a peer.
    Message {
        /// The sender's rank.
        from: Rank,
        /// What it sent.
        envelope: Envelope,
    },
    /// A peer joined (ZeroMQ servers attaching after start).
    PeerJoined(Rank),
    /// A peer's link closed or the peer exited.
    PeerLost(Rank),
}

/// Moves envelopes between ranks.
///
/// Messages from one sender to one receiver arrive in the order they were
/// sent, none lost and none duplicated while both are up; a transport
/// bounds what it holds in flight per peer itself rather than trusting
/// queues that drop when full.
pub trait Transport: Send {
    /// This process's rank: 0 for the head node, 1.. for servers.
    fn rank(&self) -> Rank;

    /// The ranks this process can send to, ascending.
    fn peers(&self) -> Vec<Rank>;

    /// Whether a peer reported lost can join again with its rank (a
    /// ZeroMQ server node reconnecting), or is gone for good (MPI: the
    /// ranks are fixed for the life of the job).
    fn lost_peers_rejoin(&self) -> bool;

    /// Sends `envelope` to `to`. Completes once the transport has taken the
    /// message; waits only when too much is already in flight to that peer.
    fn send(
        &mut self,
        to: Rank,
        envelope: Envelope,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// The next event. Cancel-safe: dropping the future loses nothing.
    fn recv(&mut self) -> impl Future<Output = Result<TransportEvent, TransportError>> + Send;

    /// Flushes what was sent and closes; afterwards `send` and `recv` fail
    /// with [`TransportError::Closed`].
    fn shutdown(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;
}
