//! Checks every [`Transport`] must pass, written against the trait alone so
//! that each transport's test instantiates the same ones.
//!
//! Each check comes in two layers:
//!
//! - a *runner* (`ordering`, `many_in_flight`, …) that takes already
//!   connected transports living in one process (a head node at rank 0 and
//!   one or more server nodes), drives both sides concurrently in the
//!   calling task and bounds the whole check in time, so that a broken
//!   transport fails instead of hanging;
//! - the *per-side* steps it is made of (`exchange`, `flood_send`,
//!   `flood_receive`, `echo`, …), public so that a transport whose peers
//!   are separate processes (MPI under `mpirun`) can run each side in its
//!   own rank and still use the same checks.
//!
//! No check sleeps to synchronise; every wait is for an event from the
//! transport, under a time limit. Messages are small `PingRequest`s whose
//! sequence numbers reveal loss, duplication and reordering, except for the
//! large-message check, which carries a numpy-like array in a
//! `CommandRequest`.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{
    CommandRequest, Envelope, Parameter, PingRequest, PingResponse, Value, value::Kind,
};
use casa_node_protocol::{Rank, Transport, TransportError, TransportEvent};
use futures::FutureExt;

/// The time limit of the message-heavy checks.
pub const HEAVY_LIMIT: Duration = Duration::from_secs(60);

/// How long a peer's departure may take to be noticed.
pub const LOSS_LIMIT: Duration = Duration::from_secs(10);

/// A check that did not pass, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The check's name.
    pub check: &'static str,
    /// What went wrong.
    pub detail: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "transport check `{}` failed: {}",
            self.check, self.detail
        )
    }
}

impl std::error::Error for Failure {}

/// What a check returns.
pub type CheckResult = Result<(), Failure>;

fn fail<T>(check: &'static str, detail: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        check,
        detail: detail.into(),
    })
}

/// Runs `check` for at most `limit`.
pub async fn within<T>(
    check: &'static str,
    limit: Duration,
    future: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => fail(check, format!("did not finish within {limit:?}")),
    }
}

/// How a peer leaves in the departure checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// [`Transport::shutdown`], then drop.
    Shutdown,
    /// Dropped without a shutdown.
    Drop,
}

/// A `PingRequest` numbered `sequence`.
pub fn ping(sequence: u64) -> Envelope {
    Envelope::new(Body::PingRequest(PingRequest { sequence }))
}

fn ping_sequence(envelope: &Envelope) -> Option<u64> {
    match &envelope.body {
        Some(Body::PingRequest(p)) => Some(p.sequence),
        Some(Body::PingResponse(p)) => Some(p.sequence),
        _ => None,
    }
}

/// The next message, skipping `PeerJoined`; a lost peer or an error fails
/// the check.
pub async fn next_message<T: Transport>(
    check: &'static str,
    transport: &mut T,
) -> Result<(Rank, Envelope), Failure> {
    loop {
        match transport.recv().await {
            Ok(TransportEvent::Message { from, envelope }) => return Ok((from, envelope)),
            Ok(TransportEvent::PeerJoined(_)) => continue,
            Ok(TransportEvent::PeerLost(rank)) => {
                return fail(
                    check,
                    format!("rank {} lost peer {rank} unexpectedly", transport.rank()),
                );
            }
            Err(error) => {
                return fail(check, format!("recv on rank {}: {error}", transport.rank()));
            }
        }
    }
}

async fn send<T: Transport>(
    check: &'static str,
    transport: &mut T,
    to: Rank,
    envelope: Envelope,
) -> CheckResult {
    transport.send(to, envelope).await.map_err(|error| Failure {
        check,
        detail: format!("send from rank {} to {to}: {error}", transport.rank()),
    })
}

/// Checks that `envelope`, from `from`, is ping `expected` of `peer`.
fn expect_ping(
    check: &'static str,
    me: Rank,
    peer: Rank,
    from: Rank,
    envelope: &Envelope,
    expected: u64,
) -> CheckResult {
    if from != peer {
        return fail(
            check,
            format!("rank {me} got a message from {from}, expected one from {peer}"),
        );
    }
    match ping_sequence(envelope) {
        Some(sequence) if sequence == expected => Ok(()),
        Some(sequence) => fail(
            check,
            format!(
                "rank {me} got ping {sequence} from {peer}, expected {expected} \
                 (lost, duplicated or reordered)"
            ),
        ),
        None => fail(
            check,
            format!("rank {me} got a {} from {peer}", envelope.kind()),
        ),
    }
}

// ---------------------------------------------------------------- ordering

/// One side of [`ordering`]: sends pings `0..=n` to `peer` while taking the
/// pings `0..=n` that `peer` sends, checking each arrives once and in order.
///
/// Received messages are taken between sends whenever they are ready, as an
/// event loop would, so neither side needs a window of `n` messages.
pub async fn exchange<T: Transport>(transport: &mut T, peer: Rank, n: u64) -> CheckResult {
    const CHECK: &str = "ordering";
    let me = transport.rank();
    let mut expected = 0;
    for sequence in 0..=n {
        send(CHECK, transport, peer, ping(sequence)).await?;
        while expected <= n {
            let Some(event) = transport.recv().now_or_never() else {
                break;
            };
            match event {
                Ok(TransportEvent::Message { from, envelope }) => {
                    expect_ping(CHECK, me, peer, from, &envelope, expected)?;
                    expected += 1;
                }
                Ok(TransportEvent::PeerJoined(_)) => {}
                Ok(TransportEvent::PeerLost(rank)) => {
                    return fail(CHECK, format!("rank {me} lost peer {rank}"));
                }
                Err(error) => return fail(CHECK, format!("recv on rank {me}: {error}")),
            }
        }
    }
    while expected <= n {
        let (from, envelope) = next_message(CHECK, transport).await?;
        expect_ping(CHECK, me, peer, from, &envelope, expected)?;
        expected += 1;
    }
    Ok(())
}

/// (a) `n` messages each way between `head node` and `server` at the same
/// time: none lost, none duplicated, all in order.
pub async fn ordering<T: Transport>(head: &mut T, server: &mut T, n: u64) -> CheckResult {
    let server_rank = server.rank();
    within("ordering", HEAVY_LIMIT, async {
        let (a, b) = tokio::join!(exchange(head, server_rank, n), exchange(server, 0, n));
        a.and(b)
    })
    .await
}

// ---------------------------------------------------------- many in flight

/// Sends pings `0..=n` to `to` without reading anything.
pub async fn flood_send<T: Transport>(transport: &mut T, to: Rank, n: u64) -> CheckResult {
    for sequence in 0..=n {
        send("many in flight", transport, to, ping(sequence)).await?;
    }
    Ok(())
}

/// Receives the pings `0..=n` that [`flood_send`] sent from `from`.
pub async fn flood_receive<T: Transport>(transport: &mut T, from: Rank, n: u64) -> CheckResult {
    const CHECK: &str = "many in flight";
    let me = transport.rank();
    for expected in 0..=n {
        let (sender, envelope) = next_message(CHECK, transport).await?;
        expect_ping(CHECK, me, from, sender, &envelope, expected)?;
    }
    Ok(())
}

/// One direction of [`many_in_flight`]: the receiver reads nothing until
/// the sender has handed over all `n + 1` messages.
pub async fn flood<T: Transport>(sender: &mut T, receiver: &mut T, n: u64) -> CheckResult {
    let to = receiver.rank();
    let from = sender.rank();
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
    let send_side = async {
        flood_send(sender, to, n).await?;
        let _ = sent_tx.send(());
        Ok(())
    };
    let receive_side = async {
        if sent_rx.await.is_err() {
            // The sender failed; its error is the one to report.
            return Ok(());
        }
        flood_receive(receiver, from, n).await
    };
    let (a, b) = tokio::join!(send_side, receive_side);
    a.and(b)
}

/// (b) `n` messages (well over ZeroMQ's usual 1 000) sent to one peer
/// before it reads any, each way: none lost.
///
/// The transport must take all `n + 1` sends without the receiver reading;
/// one whose window is smaller fails with a timeout here.
pub async fn many_in_flight<T: Transport>(head: &mut T, server: &mut T, n: u64) -> CheckResult {
    within("many in flight", HEAVY_LIMIT, async {
        flood(head, server, n).await?;
        flood(server, head, n).await
    })
    .await
}

// ----------------------------------------------------------- large message

/// A deterministic `len`-byte pattern that differs per `seed` and per MiB,
/// so a lost or swapped chunk shows.
pub fn pattern(len: usize, seed: u8) -> Bytes {
    const BLOCK: usize = 1 << 20;
    let block: Vec<u8> = (0..BLOCK)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect();
    let mut data = Vec::with_capacity(len);
    let mut index: u64 = 0;
    while data.len() < len {
        let start = data.len();
        let take = BLOCK.min(len - start);
        data.extend_from_slice(&block[..take]);
        let stamp = index.to_le_bytes();
        let stamp_len = stamp.len().min(take);
        data[start..start + stamp_len].copy_from_slice(&stamp[..stamp_len]);
        index += 1;
    }
    Bytes::from(data)
}

/// A `CommandRequest` carrying `data` as a one-dimensional `uint8` array.
pub fn large_request(id: u64, data: Bytes) -> Envelope {
    let len = data.len() as u64;
    Envelope::new(Body::CommandRequest(CommandRequest {
        id,
        command: "checksum(data)".to_owned(),
        parameters: vec![Parameter::new(
            "data",
            Value::ndarray("|u1", vec![len], data, false),
        )],
        ..Default::default()
    }))
}

/// Sends a `len`-byte array made by [`pattern`] with `seed` to `to`.
pub async fn send_large<T: Transport>(
    transport: &mut T,
    to: Rank,
    len: usize,
    seed: u8,
) -> CheckResult {
    let envelope = large_request(u64::from(seed), pattern(len, seed));
    send("large message", transport, to, envelope).await
}

/// Receives what [`send_large`] sent from `from` and checks every byte.
pub async fn receive_large<T: Transport>(
    transport: &mut T,
    from: Rank,
    len: usize,
    seed: u8,
) -> CheckResult {
    const CHECK: &str = "large message";
    let (sender, envelope) = next_message(CHECK, transport).await?;
    if sender != from {
        return fail(CHECK, format!("came from {sender}, expected {from}"));
    }
    let Some(Body::CommandRequest(request)) = envelope.body else {
        return fail(CHECK, format!("got a {}", envelope.kind()));
    };
    let data = match request
        .parameters
        .first()
        .and_then(|p| p.value.as_ref())
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::NdarrayValue(array)) => array.data.clone(),
        _ => return fail(CHECK, "the request carries no array"),
    };
    drop(request);
    if data.len() != len {
        return fail(CHECK, format!("{} bytes arrived, {len} sent", data.len()));
    }
    let expected = pattern(len, seed);
    if data != expected {
        let at = data
            .iter()
            .zip(expected.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return fail(CHECK, format!("the data differ from byte {at} on"));
    }
    Ok(())
}

/// (c) A `len`-byte message each way (one direction after the other, to
/// bound memory), byte-identical on arrival.
pub async fn large_message<T: Transport>(head: &mut T, server: &mut T, len: usize) -> CheckResult {
    let server_rank = server.rank();
    within("large message", HEAVY_LIMIT, async {
        let (a, b) = tokio::join!(
            send_large(head, server_rank, len, 1),
            receive_large(server, 0, len, 1)
        );
        a.and(b)?;
        let (a, b) = tokio::join!(
            send_large(server, 0, len, 2),
            receive_large(head, server_rank, len, 2)
        );
        a.and(b)
    })
    .await
}

/// (c') A small message, then a `len`-byte one, each way: what a node
/// does when a large parameter follows its pings. A transport that bounds
/// the bytes in flight must still let the large message through once the
/// small one is consumed, even if it is larger than the whole bound.
pub async fn large_after_small<T: Transport>(
    head: &mut T,
    server: &mut T,
    len: usize,
) -> CheckResult {
    const CHECK: &str = "large message after a small one";
    let server_rank = server.rank();
    within(CHECK, HEAVY_LIMIT, async {
        for (seed, forward) in [(3, true), (4, false)] {
            let (sender, receiver, to, from) = if forward {
                (&mut *head, &mut *server, server_rank, 0)
            } else {
                (&mut *server, &mut *head, 0, server_rank)
            };
            let me = receiver.rank();
            let (sent, received) = tokio::join!(
                async {
                    send(CHECK, sender, to, ping(u64::from(seed))).await?;
                    send_large(sender, to, len, seed).await
                },
                async {
                    let (peer, envelope) = next_message(CHECK, receiver).await?;
                    expect_ping(CHECK, me, from, peer, &envelope, u64::from(seed))?;
                    receive_large(receiver, from, len, seed).await
                }
            );
            sent.and(received)?;
        }
        Ok(())
    })
    .await
}

// -------------------------------------------------------------- many peers

/// The sequence number of ping `i` for `rank`.
fn tagged(rank: Rank, i: u64) -> u64 {
    ((rank as u64) << 32) | i
}

/// A server's side of [`many_peers`]: answers each of the `count` pings
/// from rank 0 with a `PingResponse` of the same sequence, checking that
/// each was meant for this rank and came in order.
pub async fn echo<T: Transport>(server: &mut T, count: u64) -> CheckResult {
    const CHECK: &str = "many peers";
    let me = server.rank();
    for i in 0..count {
        let (from, envelope) = next_message(CHECK, server).await?;
        expect_ping(CHECK, me, 0, from, &envelope, tagged(me, i))?;
        let reply = Envelope::new(Body::PingResponse(PingResponse {
            sequence: tagged(me, i),
            ..Default::default()
        }));
        send(CHECK, server, 0, reply).await?;
    }
    Ok(())
}

/// The head node's side of [`many_peers`]: sends `count` pings to each of
/// `ranks` in turn, takes replies whenever ready, and checks each server
/// answered its own pings, in order.
pub async fn many_peers_head<T: Transport>(
    head: &mut T,
    ranks: &[Rank],
    count: u64,
) -> CheckResult {
    const CHECK: &str = "many peers";
    let mut expected: std::collections::BTreeMap<Rank, u64> =
        ranks.iter().map(|&r| (r, 0)).collect();
    let total = count * ranks.len() as u64;
    let mut received = 0;
    let take = |expected: &mut std::collections::BTreeMap<Rank, u64>,
                from: Rank,
                envelope: Envelope|
     -> CheckResult {
        let Some(next) = expected.get_mut(&from) else {
            return fail(
                CHECK,
                format!("reply from rank {from}, which was not asked"),
            );
        };
        expect_ping(CHECK, 0, from, from, &envelope, tagged(from, *next))?;
        *next += 1;
        Ok(())
    };
    for i in 0..count {
        for &rank in ranks {
            send(CHECK, head, rank, ping(tagged(rank, i))).await?;
            while let Some(event) = head.recv().now_or_never() {
                match event {
                    Ok(TransportEvent::Message { from, envelope }) => {
                        take(&mut expected, from, envelope)?;
                        received += 1;
                    }
                    Ok(TransportEvent::PeerJoined(_)) => {}
                    Ok(TransportEvent::PeerLost(rank)) => {
                        return fail(CHECK, format!("lost rank {rank}"));
                    }
                    Err(error) => return fail(CHECK, format!("recv: {error}")),
                }
            }
        }
    }
    while received < total {
        let (from, envelope) = next_message(CHECK, head).await?;
        take(&mut expected, from, envelope)?;
        received += 1;
    }
    Ok(())
}

/// (d) Every server exchanges `count` messages with the head node at once;
/// each reply must come from the rank it was sent to.
pub async fn many_peers<T: Transport>(head: &mut T, servers: &mut [T], count: u64) -> CheckResult {
    let ranks: Vec<Rank> = servers.iter().map(|s| s.rank()).collect();
    let mut distinct = ranks.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() != ranks.len() || distinct.contains(&0) {
        return fail(
            "many peers",
            format!("servers' ranks are not distinct: {ranks:?}"),
        );
    }
    within("many peers", HEAVY_LIMIT, async {
        let servers_side =
            futures::future::try_join_all(servers.iter_mut().map(|s| echo(s, count)));
        let (a, b) = tokio::join!(many_peers_head(head, &ranks, count), servers_side);
        a.and(b.map(drop))
    })
    .await
}

// ------------------------------------------------------ cancelled receives

/// Receives pings `0..=n` from `from` while cancelling `recv` futures
/// after a poll over and over: nothing may be lost to the cancellations.
pub async fn receive_cancelling<T: Transport>(
    transport: &mut T,
    from: Rank,
    n: u64,
) -> CheckResult {
    const CHECK: &str = "cancel-safe recv";
    let me = transport.rank();
    let mut expected = 0;
    while expected <= n {
        tokio::select! {
            biased;
            event = transport.recv() => match event {
                Ok(TransportEvent::Message { from: sender, envelope }) => {
                    expect_ping(CHECK, me, from, sender, &envelope, expected)?;
                    expected += 1;
                }
                Ok(TransportEvent::PeerJoined(_)) => {}
                Ok(other) => return fail(CHECK, format!("unexpected {other:?}")),
                Err(error) => return fail(CHECK, format!("recv: {error}")),
            },
            () = tokio::task::yield_now() => {}
        }
    }
    Ok(())
}

/// (g) `recv` is cancel-safe: a receiver that drops pending `recv`
/// futures all the time still gets all `n + 1` messages, in order.
pub async fn cancel_safe_recv<T: Transport>(head: &mut T, server: &mut T, n: u64) -> CheckResult {
    let server_rank = server.rank();
    within("cancel-safe recv", HEAVY_LIMIT, async {
        let (a, b) = tokio::join!(
            flood_send(server, 0, n),
            receive_cancelling(head, server_rank, n)
        );
        a.and(b)
    })
    .await
}

// -------------------------------------------------------------- departures

/// Waits for `PeerLost(rank)`, skipping other events, then checks that
/// `rank` is no longer a peer and cannot be sent to.
pub async fn await_peer_lost<T: Transport>(
    check: &'static str,
    transport: &mut T,
    rank: Rank,
) -> CheckResult {
    let me = transport.rank();
    within(check, LOSS_LIMIT, async {
        loop {
            match transport.recv().await {
                Ok(TransportEvent::PeerLost(lost)) if lost == rank => break,
                Ok(TransportEvent::PeerLost(other)) => {
                    return fail(check, format!("rank {me} lost {other}, expected {rank}"));
                }
                Ok(_) => continue,
                Err(error) => {
                    return fail(
                        check,
                        format!("recv on rank {me} before PeerLost({rank}): {error}"),
                    );
                }
            }
        }
        Ok(())
    })
    .await?;
    if transport.peers().contains(&rank) {
        return fail(
            check,
            format!("rank {rank} is still among rank {me}'s peers after PeerLost"),
        );
    }
    if transport.send(rank, ping(0)).await.is_ok() {
        return fail(
            check,
            format!("rank {me} could still send to {rank} after PeerLost"),
        );
    }
    Ok(())
}

/// Makes sure `head node` and `server` talk before one of them leaves.
async fn handshake_traffic<T: Transport>(
    check: &'static str,
    head: &mut T,
    server: &mut T,
) -> CheckResult {
    let server_rank = server.rank();
    within(check, LOSS_LIMIT, async {
        send(check, server, 0, ping(7)).await?;
        let (from, envelope) = next_message(check, head).await?;
        expect_ping(check, 0, server_rank, from, &envelope, 7)?;
        send(check, head, server_rank, ping(8)).await?;
        let (from, envelope) = next_message(check, server).await?;
        expect_ping(check, server_rank, 0, from, &envelope, 8)
    })
    .await
}

/// (e) A server that leaves (`how`) is reported as `PeerLost(its rank)` at
/// the head node within [`LOSS_LIMIT`]; the head node then cannot send to it.
pub async fn server_departure<T: Transport>(
    head: &mut T,
    mut server: T,
    how: Departure,
) -> CheckResult {
    const CHECK: &str = "server departure";
    handshake_traffic(CHECK, head, &mut server).await?;
    let rank = server.rank();
    if how == Departure::Shutdown {
        within(CHECK, LOSS_LIMIT, async {
            server.shutdown().await.map_err(|e| Failure {
                check: CHECK,
                detail: format!("shutdown: {e}"),
            })
        })
        .await?;
    }
    drop(server);
    await_peer_lost(CHECK, head, rank).await
}

/// (e) A head node that leaves (`how`) is noticed by the server within
/// [`LOSS_LIMIT`]: its next event is `PeerLost(0)` or an error, after
/// which it can neither send to rank 0 nor wait forever in `recv`.
pub async fn head_departure<T: Transport>(
    mut head: T,
    server: &mut T,
    how: Departure,
) -> CheckResult {
    const CHECK: &str = "head node departure";
    handshake_traffic(CHECK, &mut head, server).await?;
    if how == Departure::Shutdown {
        within(CHECK, LOSS_LIMIT, async {
            head.shutdown().await.map_err(|e| Failure {
                check: CHECK,
                detail: format!("shutdown: {e}"),
            })
        })
        .await?;
    }
    drop(head);
    within(CHECK, LOSS_LIMIT, async {
        loop {
            match server.recv().await {
                Ok(TransportEvent::PeerLost(0)) | Err(_) => break,
                Ok(TransportEvent::PeerLost(other)) => {
                    return fail(CHECK, format!("lost {other}, expected 0"));
                }
                Ok(TransportEvent::PeerJoined(_)) => continue,
                Ok(TransportEvent::Message { envelope, .. }) => {
                    return fail(CHECK, format!("unexpected {}", envelope.kind()));
                }
            }
        }
        if server.send(0, ping(0)).await.is_ok() {
            return fail(CHECK, "the server could still send to the head node");
        }
        match server.recv().await {
            Err(_) => Ok(()),
            Ok(event) => fail(
                CHECK,
                format!("recv after losing the head node gave {event:?}"),
            ),
        }
    })
    .await
}

/// After [`Transport::shutdown`], `send` and `recv` fail with
/// [`TransportError::Closed`].
pub async fn closed_after_shutdown<T: Transport>(transport: &mut T) -> CheckResult {
    const CHECK: &str = "closed after shutdown";
    within(CHECK, LOSS_LIMIT, async {
        transport.shutdown().await.map_err(|e| Failure {
            check: CHECK,
            detail: format!("shutdown: {e}"),
        })?;
        let peer = if transport.rank() == 0 { 1 } else { 0 };
        match transport.send(peer, ping(0)).await {
            Err(TransportError::Closed) => {}
            other => return fail(CHECK, format!("send after shutdown gave {other:?}")),
        }
        match transport.recv().await {
            Err(TransportError::Closed) => Ok(()),
            other => fail(CHECK, format!("recv after shutdown gave {other:?}")),
        }
    })
    .await
}
