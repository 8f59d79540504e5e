//! What only the ZeroMQ transport has: the handshake and its refusals, rank
//! assignment, the credit windows, bad input from peers, the loss of a peer
//! process that is killed, and the behaviour of the zeromq crate that the
//! design relies on.
//!
//! Raw `zeromq` sockets stand in for misbehaving peers; they speak the wire
//! format documented in the crate (`[header, envelope]`).

mod common;
use common::*;

use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use casa_node_conformance::transport::{self as checks, ping};
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{Envelope, Hello, ProtocolErrorCode, Role};
use casa_node_protocol::{
    Framing, MAX_RANK, PROTOCOL_VERSION, Transport, TransportError, TransportEvent,
};
use casa_node_transport_zmq::{HandshakeError, ZmqConfig, ZmqTransport};
use prost::Message;
use tempfile::TempDir;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const LIMIT: Duration = Duration::from_secs(30);

/// Runs a test body under a time limit, so a hang fails.
async fn bounded<T>(body: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, body)
        .await
        .expect("the test did not finish in time")
}

fn ipc_endpoint(dir: &TempDir, name: &str) -> String {
    format!("ipc://{}/{name}", dir.path().display())
}

async fn head_with(config: ZmqConfig) -> (ZmqTransport, TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let head = ZmqTransport::bind_with(&ipc_endpoint(&dir, "head.sock"), config)
        .await
        .expect("bind");
    (head, dir)
}

/// A head node and one server node (rank 1) joined to it, both with
/// `config`.
async fn joined(config: ZmqConfig) -> (ZmqTransport, ZmqTransport, TempDir) {
    let (mut head, dir) = head_with(config.clone()).await;
    let server = ZmqTransport::connect_with(head.endpoint(), 0, config)
        .await
        .expect("connect");
    assert_eq!(next_event(&mut head).await, TransportEvent::PeerJoined(1));
    (head, server, dir)
}

fn multipart(parts: Vec<Bytes>) -> ZmqMessage {
    ZmqMessage::try_from(parts).expect("parts")
}

fn hello_bytes(envelope_version: u32, hello_version: u32, role: Role) -> Bytes {
    Envelope {
        protocol_version: envelope_version,
        correlation: 9,
        body: Some(Body::Hello(Hello {
            protocol_version: hello_version,
            role: role.into(),
            software: "a test".to_owned(),
            host: "localhost".to_owned(),
            pid: std::process::id(),
            rank: 0,
            token: String::new(),
            shared_memory: false,
        })),
    }
    .encode_to_vec()
    .into()
}

/// Sends a Hello from a raw DEALER and returns the answer's envelope.
async fn raw_hello(raw: &mut DealerSocket, hello: Bytes) -> Envelope {
    raw.send(multipart(vec![Bytes::from_static(b"H"), hello]))
        .await
        .expect("send Hello");
    read_answer(raw).await
}

/// The envelope of the next answer to a Hello that a raw DEALER gets.
async fn read_answer(raw: &mut DealerSocket) -> Envelope {
    let answer = raw.recv().await.expect("answer").into_vec();
    assert_eq!(answer.len(), 2, "{answer:?}");
    assert_eq!(&answer[0][..], b"W");
    Framing::default()
        .decode_body(answer[1].clone())
        .expect("the answer decodes")
}

fn error_code(envelope: &Envelope) -> (ProtocolErrorCode, String) {
    match &envelope.body {
        Some(Body::Error(e)) => (e.code(), e.message.clone()),
        other => panic!("expected a ProtocolError, got {other:?}"),
    }
}

// ------------------------------------------------------------- handshake

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_protocol_version_is_refused_and_not_admitted() {
    bounded(async {
        let (mut head, _dir) = head_with(ZmqConfig::default()).await;
        let endpoint = head.endpoint().to_owned();

        for (envelope_version, hello_version) in
            [(2, 2), (PROTOCOL_VERSION, 2), (2, PROTOCOL_VERSION)]
        {
            let mut raw = DealerSocket::new();
            raw.connect(&endpoint).await.expect("connect");
            let answer = raw_hello(
                &mut raw,
                hello_bytes(envelope_version, hello_version, Role::ServerNode),
            )
            .await;
            assert_eq!(answer.correlation, 9);
            let (code, message) = error_code(&answer);
            assert_eq!(code, ProtocolErrorCode::IncompatibleVersion);
            assert!(message.contains("version 2"), "{message}");
        }
        let mut raw = DealerSocket::new();
        raw.connect(&endpoint).await.expect("connect");
        let answer = raw_hello(
            &mut raw,
            hello_bytes(PROTOCOL_VERSION, PROTOCOL_VERSION, Role::Driver),
        )
        .await;
        assert_eq!(error_code(&answer).0, ProtocolErrorCode::RoleRefused);
        assert!(head.peers().is_empty());

        // None of them took a rank: the next server to join is rank 1 and
        // the head node's first event is its arrival.
        let server = ZmqTransport::connect(&endpoint, 0).await.expect("connect");
        assert_eq!(server.rank(), 1);
        assert_eq!(next_event(&mut head).await, TransportEvent::PeerJoined(1));
    })
    .await;
}

/// A stand-in head node that answers every Hello with `answer`, if any.
async fn fake_head_node(endpoint: &str, answer: Option<Envelope>) -> tokio::task::JoinHandle<()> {
    let mut router = RouterSocket::new();
    router.bind(endpoint).await.expect("bind");
    tokio::spawn(async move {
        while let Ok(message) = router.recv().await {
            let identity = message.get(0).expect("identity").clone();
            if let Some(answer) = &answer {
                let reply = multipart(vec![
                    identity,
                    Bytes::from_static(b"W"),
                    answer.encode_to_vec().into(),
                ]);
                let _ = router.send(reply).await;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reports_a_refusal_clearly() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let endpoint = ipc_endpoint(&dir, "fake.sock");
        let refusal = Envelope::error(
            1,
            ProtocolErrorCode::IncompatibleVersion,
            "incompatible protocol version 1: this peer speaks casa.node.v2",
        );
        let fake = fake_head_node(&endpoint, Some(refusal)).await;
        let error = ZmqTransport::connect(&endpoint, 0)
            .await
            .expect_err("refused");
        let text = error.to_string();
        assert!(text.contains(&endpoint), "{text}");
        let error = handshake_error(error);
        assert_eq!(
            error,
            HandshakeError::Refused {
                code: ProtocolErrorCode::IncompatibleVersion,
                message: "incompatible protocol version 1: this peer speaks casa.node.v2"
                    .to_owned(),
            }
        );
        assert!(
            error
                .to_string()
                .contains("PROTOCOL_ERROR_CODE_INCOMPATIBLE_VERSION"),
            "{error}"
        );
        fake.abort();
    })
    .await;
}

/// A server node asking for a rank past the one the head core takes is
/// refused before it joins, saying why; the head node goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_out_of_range_is_refused_before_it_joins() {
    bounded(async {
        let (mut head, dir) = head_with(ZmqConfig::default()).await;
        let endpoint = ipc_endpoint(&dir, "head.sock");
        for rank in [MAX_RANK + 1, -3] {
            let error = ZmqTransport::connect(&endpoint, rank)
                .await
                .expect_err("refused");
            assert_refused(error, ProtocolErrorCode::UnknownRank, "out of range");
        }
        assert!(head.peers().is_empty(), "{:?}", head.peers());
        let server = ZmqTransport::connect(&endpoint, MAX_RANK)
            .await
            .expect("the highest rank is taken");
        assert_eq!(server.rank(), MAX_RANK);
        assert_eq!(
            next_event(&mut head).await,
            TransportEvent::PeerJoined(MAX_RANK)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_gives_up_without_a_welcome_or_a_listener() {
    bounded(async {
        let config = ZmqConfig {
            handshake_timeout: Duration::from_millis(300),
            ..ZmqConfig::default()
        };
        let dir = tempfile::tempdir().expect("temporary directory");

        let silent = ipc_endpoint(&dir, "silent.sock");
        let fake = fake_head_node(&silent, None).await;
        let error = ZmqTransport::connect_with(&silent, 0, config.clone())
            .await
            .expect_err("no Welcome");
        assert_eq!(
            handshake_error(error),
            HandshakeError::Timeout(config.handshake_timeout)
        );
        fake.abort();

        let nobody = ipc_endpoint(&dir, "nobody.sock");
        let error = ZmqTransport::connect_with(&nobody, 0, config)
            .await
            .expect_err("no listener");
        assert!(error.to_string().contains(&nobody), "{error}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_are_given_as_asked_when_free_else_the_lowest_free_one() {
    bounded(async {
        let (mut head, _dir) = head_with(ZmqConfig::default()).await;
        let endpoint = head.endpoint().to_owned();
        let five = ZmqTransport::connect(&endpoint, 5).await.expect("connect");
        let also_five = ZmqTransport::connect(&endpoint, 5).await.expect("connect");
        let any = ZmqTransport::connect(&endpoint, 0).await.expect("connect");
        assert_eq!((five.rank(), also_five.rank(), any.rank()), (5, 1, 2));
        assert_eq!(head.peers(), vec![1, 2, 5]);
        for rank in [5, 1, 2] {
            assert_eq!(
                next_event(&mut head).await,
                TransportEvent::PeerJoined(rank)
            );
        }

        // A rank freed by a departure is given again, to the new peer.
        drop(also_five);
        assert_eq!(next_event(&mut head).await, TransportEvent::PeerLost(1));
        assert!(matches!(
            head.send(1, ping(0)).await,
            Err(TransportError::Disconnected(1))
        ));
        assert!(matches!(
            head.send(9, ping(0)).await,
            Err(TransportError::UnknownRank(9))
        ));
        let mut again = ZmqTransport::connect(&endpoint, 0).await.expect("connect");
        assert_eq!(again.rank(), 1);
        assert_eq!(next_event(&mut head).await, TransportEvent::PeerJoined(1));
        head.send(1, ping(42)).await.expect("send");
        let event = next_event(&mut again).await;
        assert_eq!(
            event,
            TransportEvent::Message {
                from: 0,
                envelope: ping(42)
            }
        );
    })
    .await;
}

// ------------------------------------------------------------ flow control

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_waits_only_while_the_peers_window_is_full() {
    bounded(async {
        let (mut head, _dir) = head_with(ZmqConfig::default()).await;
        let endpoint = head.endpoint().to_owned();
        let window = ZmqConfig {
            window: 8,
            ..ZmqConfig::default()
        };
        let mut server = ZmqTransport::connect_with(&endpoint, 0, window)
            .await
            .expect("connect");
        for sequence in 0..8 {
            head.send(1, ping(sequence))
                .await
                .expect("within the window");
        }
        {
            let ninth = head.send(1, ping(8));
            tokio::pin!(ninth);
            assert!(
                tokio::time::timeout(Duration::from_millis(200), &mut ninth)
                    .await
                    .is_err(),
                "a ninth message went out with a window of 8"
            );
            // Consuming half the window returns credit.
            for sequence in 0..4 {
                assert_eq!(
                    next_event(&mut server).await,
                    TransportEvent::Message {
                        from: 0,
                        envelope: ping(sequence)
                    }
                );
            }
            ninth.await.expect("credit came back");
        }
        for sequence in 4..9 {
            assert_eq!(
                next_event(&mut server).await,
                TransportEvent::Message {
                    from: 0,
                    envelope: ping(sequence)
                }
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_waits_while_too_many_bytes_are_in_flight() {
    bounded(async {
        let (mut head, _dir) = head_with(ZmqConfig {
            max_in_flight_bytes: 1_000,
            ..ZmqConfig::default()
        })
        .await;
        let endpoint = head.endpoint().to_owned();
        let mut server = ZmqTransport::connect(&endpoint, 0).await.expect("connect");
        let big = |seed| checks::large_request(seed, checks::pattern(600, seed as u8));
        head.send(1, big(1)).await.expect("the first fits");
        {
            let second = head.send(1, big(2));
            tokio::pin!(second);
            assert!(
                tokio::time::timeout(Duration::from_millis(200), &mut second)
                    .await
                    .is_err(),
                "1 200 bytes went in flight with a limit of 1 000"
            );
            // The first was flagged: consuming it returns its bytes at once.
            assert_eq!(
                next_event(&mut server).await,
                TransportEvent::Message {
                    from: 0,
                    envelope: big(1)
                }
            );
            second.await.expect("bytes came back");
        }
        assert_eq!(
            next_event(&mut server).await,
            TransportEvent::Message {
                from: 0,
                envelope: big(2)
            }
        );
        // A message larger than the whole budget still goes, alone.
        let huge = checks::large_request(3, checks::pattern(5_000, 3));
        head.send(1, huge.clone()).await.expect("alone");
        assert_eq!(
            next_event(&mut server).await,
            TransportEvent::Message {
                from: 0,
                envelope: huge
            }
        );
    })
    .await;
}

/// Sends `first`, then `second`, which does not fit beside it in the byte
/// budget; the receiver takes `first` before (`consumed_first`) or while
/// `second` waits. `first` leaves over half the budget free, so it asks
/// for no credit back: the waiting sender must ask for it.
async fn second_waits_for_the_first(
    sender: &mut ZmqTransport,
    receiver: &mut ZmqTransport,
    first: Envelope,
    second: Envelope,
    consumed_first: bool,
) {
    let to = receiver.rank();
    let from = sender.rank();
    sender
        .send(to, first.clone())
        .await
        .expect("the first fits");
    if consumed_first {
        assert_eq!(
            next_event(receiver).await,
            TransportEvent::Message {
                from,
                envelope: first.clone()
            }
        );
    }
    {
        let waiting = sender.send(to, second.clone());
        tokio::pin!(waiting);
        if !consumed_first {
            assert!(
                tokio::time::timeout(Duration::from_millis(200), &mut waiting)
                    .await
                    .is_err(),
                "the second went beside the first beyond the byte budget"
            );
            assert_eq!(
                next_event(receiver).await,
                TransportEvent::Message {
                    from,
                    envelope: first
                }
            );
        }
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the bytes of the first never came back")
            .expect("send");
    }
    assert_eq!(
        next_event(receiver).await,
        TransportEvent::Message {
            from,
            envelope: second
        }
    );
}

/// [`second_waits_for_the_first`] from the head node to the server and
/// back, the first consumed before the second is sent and while it waits:
/// messages of `first` and `second` bytes (`first` 0: a ping).
async fn both_ways(
    head: &mut ZmqTransport,
    server: &mut ZmqTransport,
    first: usize,
    second: usize,
) {
    let message = |seed: u64, len: usize| match len {
        0 => ping(seed),
        len => checks::large_request(seed, checks::pattern(len, seed as u8)),
    };
    let mut seed = 0;
    for consumed_first in [true, false] {
        for head_sends in [true, false] {
            let (sender, receiver) = if head_sends {
                (&mut *head, &mut *server)
            } else {
                (&mut *server, &mut *head)
            };
            seed += 2;
            let (one, two) = (message(seed, first), message(seed + 1, second));
            second_waits_for_the_first(sender, receiver, one, two, consumed_first).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_does_not_fit_gets_the_bytes_back_without_a_flag() {
    bounded(async {
        let budget = ZmqConfig {
            max_in_flight_bytes: 1_000,
            ..ZmqConfig::default()
        };
        let (mut head, mut server, _dir) = joined(budget).await;
        // Larger than the whole budget, after a ping.
        both_ways(&mut head, &mut server, 0, 5_000).await;
        // Within the budget but not beside the first.
        both_ways(&mut head, &mut server, 400, 700).await;
    })
    .await;
}

/// A first message large enough to be encoded off the caller's thread
/// (1 MiB or more) may still be on its way to the engine when the second,
/// which does not fit beside it, asks for credit: the request must not
/// overtake it, or the receiver has nothing to hurry, the first comes
/// back in no batch, and the second waits for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_request_does_not_overtake_a_message_being_encoded() {
    bounded(async {
        let budget = ZmqConfig {
            max_in_flight_bytes: 4 << 20,
            ..ZmqConfig::default()
        };
        let (mut head, mut server, _dir) = joined(budget).await;
        both_ways(&mut head, &mut server, 1_200_000, 3_500_000).await;
    })
    .await;
}

/// An event, without the bytes of a message.
fn describe(event: &TransportEvent) -> String {
    match event {
        TransportEvent::Message { from, envelope } => format!("a {} from {from}", envelope.kind()),
        other => format!("{other:?}"),
    }
}

/// A message still being encoded off the caller's thread when its sender
/// shuts down reaches the peer before the goodbye.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_sent_just_before_shutdown_arrives_before_the_goodbye() {
    bounded(async {
        let (mut head, mut server, _dir) = joined(ZmqConfig::default()).await;
        let large = checks::large_request(1, checks::pattern(64 << 20, 1));
        server.send(0, large.clone()).await.expect("send");
        server.shutdown().await.expect("shutdown");
        match next_event(&mut head).await {
            TransportEvent::Message { from, envelope } => {
                assert_eq!(from, 1);
                assert!(envelope == large, "the message arrived changed");
            }
            other => panic!("expected the message first, got {}", describe(&other)),
        }
        assert_eq!(next_event(&mut head).await, TransportEvent::PeerLost(1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_go_past_a_large_one_on_a_reserve() {
    bounded(async {
        // A reserve of 1 KiB for messages of at most 64 bytes.
        let budget = ZmqConfig {
            max_in_flight_bytes: 64 << 10,
            ..ZmqConfig::default()
        };
        let (mut head, _dir) = head_with(budget).await;
        let endpoint = head.endpoint().to_owned();
        let mut server = ZmqTransport::connect(&endpoint, 0).await.expect("connect");
        assert_eq!(next_event(&mut head).await, TransportEvent::PeerJoined(1));
        let large = checks::large_request(1, checks::pattern(100 << 10, 1));
        head.send(1, large.clone()).await.expect("alone");
        // Not consumed yet, and it took the whole budget; pings still go.
        let quick = Duration::from_secs(2);
        for sequence in 0..10 {
            tokio::time::timeout(quick, head.send(1, ping(sequence)))
                .await
                .expect("a ping waited behind the large message")
                .expect("send");
        }
        // A message above the reserve's limit waits.
        let medium = checks::large_request(2, checks::pattern(200, 2));
        {
            let waiting = head.send(1, medium.clone());
            tokio::pin!(waiting);
            assert!(
                tokio::time::timeout(Duration::from_millis(200), &mut waiting)
                    .await
                    .is_err(),
                "a 200-byte message went past the large one"
            );
            assert_eq!(
                next_event(&mut server).await,
                TransportEvent::Message {
                    from: 0,
                    envelope: large
                }
            );
            tokio::time::timeout(quick, waiting)
                .await
                .expect("the large message's bytes never came back")
                .expect("send");
        }
        for sequence in 0..10 {
            assert_eq!(
                next_event(&mut server).await,
                TransportEvent::Message {
                    from: 0,
                    envelope: ping(sequence)
                }
            );
        }
        assert_eq!(
            next_event(&mut server).await,
            TransportEvent::Message {
                from: 0,
                envelope: medium
            }
        );
        // The reserve came back: as many pings go past the next large one.
        let large = checks::large_request(3, checks::pattern(100 << 10, 3));
        head.send(1, large.clone()).await.expect("alone");
        for sequence in 10..20 {
            tokio::time::timeout(quick, head.send(1, ping(sequence)))
                .await
                .expect("the reserve did not come back")
                .expect("send");
        }
        assert_eq!(
            next_event(&mut server).await,
            TransportEvent::Message {
                from: 0,
                envelope: large
            }
        );
        for sequence in 10..20 {
            assert_eq!(
                next_event(&mut server).await,
                TransportEvent::Message {
                    from: 0,
                    envelope: ping(sequence)
                }
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------- bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_from_a_peer_is_dropped_and_credited() {
    bounded(async {
        let (mut head, _dir) = head_with(ZmqConfig {
            window: 8,
            max_frame: 256,
            ..ZmqConfig::default()
        })
        .await;
        let endpoint = head.endpoint().to_owned();
        let mut raw = DealerSocket::new();
        raw.connect(&endpoint).await.expect("connect");
        let welcome = raw_hello(
            &mut raw,
            hello_bytes(PROTOCOL_VERSION, PROTOCOL_VERSION, Role::ServerNode),
        )
        .await;
        let rank = match welcome.body {
            Some(Body::Welcome(w)) => w.rank,
            other => panic!("expected Welcome, got {other:?}"),
        };
        assert_eq!(
            next_event(&mut head).await,
            TransportEvent::PeerJoined(rank)
        );
        let grant = raw.recv().await.expect("initial credit").into_vec();
        assert_eq!(grant, vec![Bytes::from_static(b"C\0\0\0\x08")]);

        let data = Bytes::from_static(b"D\0");
        let good = |sequence| Bytes::from(ping(sequence).encode_to_vec());
        let too_large =
            Bytes::from(checks::large_request(1, checks::pattern(300, 1)).encode_to_vec());
        let junk: Vec<Vec<Bytes>> = vec![
            vec![Bytes::from_static(b"X")],     // unknown header
            vec![Bytes::from_static(b"C\0\0")], // short credit
            vec![data.clone()],                 // data without envelope
            vec![data.clone(), Bytes::from_static(b"\xff\xff\xff")], // not protobuf
            vec![data.clone(), Bytes::new()],   // an envelope without body
            vec![data.clone(), good(1), good(1)], // a part too many
            vec![data.clone(), too_large],      // over max_frame
            vec![Bytes::from_static(b"H"), good(1)], // Hello again
        ];
        for parts in junk {
            raw.send(multipart(parts)).await.expect("send");
        }
        raw.send(multipart(vec![data.clone(), good(2)]))
            .await
            .expect("send");
        assert_eq!(
            next_event(&mut head).await,
            TransportEvent::Message {
                from: rank,
                envelope: ping(2)
            }
        );
        // The four dropped data messages were credited back as consumed,
        // half the window: the sender's window does not shrink.
        let grant = raw.recv().await.expect("credit").into_vec();
        assert_eq!(grant, vec![Bytes::from_static(b"C\0\0\0\x04")]);

        // A peer that has not joined is ignored whatever it sends.
        let mut stranger = DealerSocket::new();
        stranger.connect(&endpoint).await.expect("connect");
        stranger
            .send(multipart(vec![data, good(3)]))
            .await
            .expect("send");
        stranger
            .send(multipart(vec![
                Bytes::from_static(b"H"),
                Bytes::from_static(b"\xff"),
            ]))
            .await
            .expect("send");
        let answer = stranger.recv().await.expect("refusal").into_vec();
        let answer = Framing::default()
            .decode_body(answer[1].clone())
            .expect("decodes");
        assert_eq!(error_code(&answer).0, ProtocolErrorCode::Malformed);
        raw.send(multipart(vec![
            Bytes::from_static(b"D\0"),
            Bytes::from(ping(4).encode_to_vec()),
        ]))
        .await
        .expect("send");
        assert_eq!(
            next_event(&mut head).await,
            TransportEvent::Message {
                from: rank,
                envelope: ping(4)
            }
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_over_max_frame_is_refused_on_send() {
    bounded(async {
        let (mut head, _dir) = head_with(ZmqConfig {
            max_frame: 256,
            ..ZmqConfig::default()
        })
        .await;
        let endpoint = head.endpoint().to_owned();
        let _server = ZmqTransport::connect(&endpoint, 0).await.expect("connect");
        let result = head
            .send(1, checks::large_request(1, checks::pattern(300, 1)))
            .await;
        assert!(
            matches!(result, Err(TransportError::Frame(_))),
            "{result:?}"
        );
    })
    .await;
}

/// A connection that sends Hello after malformed Hello and never reads is
/// refused once: were each refused, its refusals would fill the queue the
/// socket keeps for it (100 000 messages, then `send` waits), and the
/// head node's engine would wait on it and serve nobody else. Meanwhile
/// a server node's round trips through the head node come back within a
/// heartbeat, and the stranger may still join with a valid Hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_flooding_malformed_hellos_is_answered_once_and_holds_nobody_up() {
    const HEARTBEAT: Duration = Duration::from_secs(1);
    // Well beyond the queue, and what the sockets' buffers hold besides.
    const HELLOS: usize = 200_000;
    /// The ping that ends the exchange.
    const STOP: u64 = u64::MAX;
    bounded(async {
        let (mut head, _dir) = head_with(ZmqConfig::default()).await;
        let endpoint = head.endpoint().to_owned();
        let mut server = ZmqTransport::connect(&endpoint, 0).await.expect("connect");
        assert_eq!(next_event(&mut head).await, TransportEvent::PeerJoined(1));

        let mut flooder = DealerSocket::new();
        flooder.connect(&endpoint).await.expect("connect");
        let flooding = tokio::spawn(async move {
            for _ in 0..HELLOS {
                let malformed = vec![Bytes::from_static(b"H"), Bytes::from_static(b"\xff")];
                flooder.send(multipart(malformed)).await.expect("send");
            }
            // When the head node reports this one joined, it has read
            // every Hello before it.
            let hello = hello_bytes(PROTOCOL_VERSION, PROTOCOL_VERSION, Role::ServerNode);
            flooder
                .send(multipart(vec![Bytes::from_static(b"H"), hello]))
                .await
                .expect("send");
            flooder
        });
        // The head node's event loop: it echoes the server node's pings.
        let (joined_tx, mut joined) = tokio::sync::oneshot::channel();
        let head_loop = tokio::spawn(async move {
            let mut joined_tx = Some(joined_tx);
            loop {
                match next_event(&mut head).await {
                    TransportEvent::Message { from: 1, envelope } => {
                        let last = envelope == ping(STOP);
                        head.send(1, envelope).await.expect("echo");
                        if last {
                            return head;
                        }
                    }
                    TransportEvent::PeerJoined(rank) => {
                        let joined_tx = joined_tx.take().expect("one stranger joins");
                        let _ = joined_tx.send(rank);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        });

        // Round trips, one every 20 ms, until the flood is read.
        let mut pace = tokio::time::interval(Duration::from_millis(20));
        let started = tokio::time::Instant::now();
        let (mut last, mut longest, mut sequence) = (started, Duration::ZERO, 0);
        let stranger = loop {
            pace.tick().await;
            let stranger = joined.try_recv().ok();
            let sent = if stranger.is_some() { STOP } else { sequence };
            server.send(0, ping(sent)).await.expect("send");
            let echo = tokio::time::timeout(10 * HEARTBEAT, next_event(&mut server))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no answer to ping {sent} within {:?} (longest gap so far {longest:?})",
                        10 * HEARTBEAT
                    )
                });
            assert_eq!(
                echo,
                TransportEvent::Message {
                    from: 0,
                    envelope: ping(sent)
                }
            );
            let now = tokio::time::Instant::now();
            longest = longest.max(now - last);
            last = now;
            if let Some(stranger) = stranger {
                break stranger;
            }
            sequence += 1;
        };
        println!(
            "{HELLOS} malformed Hellos read in {:?}; {sequence} round trips, \
             the longest gap between two {longest:?}",
            started.elapsed()
        );
        assert!(
            longest < HEARTBEAT,
            "the server node's round trips stopped for {longest:?}"
        );

        // One refusal, then the Welcome and the credit of the valid Hello.
        let mut flooder = flooding.await.expect("the flood");
        let refusal = read_answer(&mut flooder).await;
        assert_eq!(error_code(&refusal).0, ProtocolErrorCode::Malformed);
        match read_answer(&mut flooder).await.body {
            Some(Body::Welcome(welcome)) => assert_eq!(welcome.rank, stranger),
            other => panic!("expected the Welcome, got {other:?}"),
        }
        let credit = flooder.recv().await.expect("credit").into_vec();
        assert_eq!(&credit[0][..1], b"C", "{credit:?}");

        let mut head = head_loop.await.expect("the head node's loop");
        server.shutdown().await.expect("shutdown");
        head.shutdown().await.expect("shutdown");
    })
    .await;
}

// ------------------------------------------------------- processes killed

const CHILD: &str = "CASA_NODE_ZMQ_TEST_CHILD";

/// Not a test on its own: the body of the child processes of the tests
/// below, which run this test binary again with `CHILD` set to
/// `server ENDPOINT` or `head node ENDPOINT`. The child exits when its
/// standard input closes, so it cannot outlive its parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let (role, endpoint) = spec.split_once(' ').expect("ROLE ENDPOINT");
    let mut transport = match role {
        "server" => ZmqTransport::connect(endpoint, 0).await.expect("connect"),
        "head" => ZmqTransport::bind(endpoint).await.expect("bind"),
        other => panic!("unknown role {other}"),
    };
    while transport.recv().await.is_ok() {}
}

fn spawn_child(role: &str, endpoint: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, format!("{role} {endpoint}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn a child")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_process_is_lost() {
    bounded(async {
        let (mut head, _dir) = head_with(ZmqConfig::default()).await;
        let mut child = spawn_child("server", head.endpoint());
        let rank = match next_event(&mut head).await {
            TransportEvent::PeerJoined(rank) => rank,
            other => panic!("expected PeerJoined, got {other:?}"),
        };
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        checks::await_peer_lost("killed server", &mut head, rank)
            .await
            .unwrap_or_else(|failure| panic!("{failure}"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_head_process_is_lost() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let endpoint = ipc_endpoint(&dir, "child.sock");
        let mut child = spawn_child("head", &endpoint);
        // Connecting retries until the child listens.
        let mut server = ZmqTransport::connect(&endpoint, 0).await.expect("connect");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        assert_eq!(next_event(&mut server).await, TransportEvent::PeerLost(0));
        assert!(matches!(
            server.recv().await,
            Err(TransportError::Disconnected(0))
        ));
        assert!(matches!(
            server.send(0, ping(0)).await,
            Err(TransportError::Disconnected(0))
        ));
    })
    .await;
}

// ---------------------------------------------------- the crate underneath

/// What zeromq 0.7 does when a peer does not read: a ROUTER queues up to
/// 100 000 messages for it (plus what the socket buffers hold), then `send`
/// waits, stalling every other peer of the socket; it never drops. A send
/// abandoned while waiting may still be delivered. The transport's windows keep it below that
/// queue. If an upgrade changes this, the design must be looked at again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeromq_router_queues_100_000_per_peer_then_waits_and_never_drops() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut router = RouterSocket::new();
        let endpoint = router
            .bind(&ipc_endpoint(&dir, "raw.sock"))
            .await
            .expect("bind");
        let mut dealer = DealerSocket::new();
        dealer
            .connect(&endpoint.to_string())
            .await
            .expect("connect");
        dealer.send(ZmqMessage::from("hi")).await.expect("send");
        let identity = router
            .recv()
            .await
            .expect("recv")
            .get(0)
            .expect("identity")
            .clone();

        let mut sent: u64 = 0;
        loop {
            let message = multipart(vec![
                identity.clone(),
                Bytes::from(sent.to_be_bytes().to_vec()),
            ]);
            match tokio::time::timeout(Duration::from_secs(1), router.send(message)).await {
                Ok(result) => result.expect("send"),
                Err(_) => break, // waiting, with the message not taken
            }
            sent += 1;
            assert!(sent < 1_000_000, "the ROUTER never waited");
        }
        assert!(
            sent >= 100_000,
            "the ROUTER waited after only {sent} messages"
        );
        for expected in 0..sent {
            let message = dealer.recv().await.expect("recv").into_vec();
            assert_eq!(message, vec![Bytes::from(expected.to_be_bytes().to_vec())]);
        }
        router
            .send(multipart(vec![identity, Bytes::from_static(b"end")]))
            .await
            .expect("send");
        // The send given up on may still have gone out (it is not a
        // reliable way to withdraw a message either); nothing else did.
        let mut last = dealer.recv().await.expect("recv").into_vec();
        if last == vec![Bytes::from(sent.to_be_bytes().to_vec())] {
            last = dealer.recv().await.expect("recv").into_vec();
        }
        assert_eq!(last, vec![Bytes::from_static(b"end")]);
    })
    .await;
}
