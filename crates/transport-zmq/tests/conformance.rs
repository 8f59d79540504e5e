//! The shared transport checks (`casa_node_conformance::transport`), over
//! ZeroMQ: `ipc://` endpoints in a fresh temporary directory, and one check
//! over `tcp://127.0.0.1:0`.

use casa_node_conformance::transport::{self as checks, Departure};
use casa_node_protocol::Transport;
use casa_node_transport_zmq::ZmqTransport;
use tempfile::TempDir;

/// A head node bound in a fresh directory (kept alive by the `TempDir`).
async fn head_ipc() -> (ZmqTransport, TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let endpoint = format!("ipc://{}/head.sock", dir.path().display());
    let head = ZmqTransport::bind(&endpoint).await.expect("bind");
    assert_eq!(head.endpoint(), endpoint);
    (head, dir)
}

/// A head node and `n` server nodes joined to it at once.
async fn cluster_ipc(n: usize) -> (ZmqTransport, Vec<ZmqTransport>, TempDir) {
    let (head, dir) = head_ipc().await;
    let endpoint = head.endpoint().to_owned();
    let servers =
        futures::future::try_join_all((0..n).map(|_| ZmqTransport::connect(&endpoint, 0)))
            .await
            .expect("connect");
    (head, servers, dir)
}

async fn pair_ipc() -> (ZmqTransport, ZmqTransport, TempDir) {
    let (head, mut servers, dir) = cluster_ipc(1).await;
    (head, servers.pop().expect("one server"), dir)
}

fn ok(result: checks::CheckResult) {
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_10_000_each_way_ipc() {
    let (mut head, mut server, _dir) = pair_ipc().await;
    ok(checks::ordering(&mut head, &mut server, 10_000).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_10_000_each_way_tcp() {
    let mut head = ZmqTransport::bind("tcp://127.0.0.1:0").await.expect("bind");
    let endpoint = head.endpoint().to_owned();
    assert!(endpoint.starts_with("tcp://127.0.0.1:"), "{endpoint}");
    assert!(
        !endpoint.ends_with(":0"),
        "the bound port is not reported: {endpoint}"
    );
    let mut server = ZmqTransport::connect(&endpoint, 0).await.expect("connect");
    ok(checks::ordering(&mut head, &mut server, 10_000).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_in_flight_20_000_each_way() {
    let (mut head, mut server, _dir) = pair_ipc().await;
    ok(checks::many_in_flight(&mut head, &mut server, 20_000).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_message_256_mib_each_way() {
    let (mut head, mut server, _dir) = pair_ipc().await;
    ok(checks::large_message(&mut head, &mut server, 256 << 20).await);
}

/// Larger than the default byte budget per peer (64 MiB), after a ping
/// that leaves most of the budget free and asks for no credit back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_message_80_mib_after_a_small_one_each_way() {
    let (mut head, mut server, _dir) = pair_ipc().await;
    ok(checks::large_after_small(&mut head, &mut server, 80 << 20).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_peers_32_servers() {
    let (mut head, mut servers, _dir) = cluster_ipc(32).await;
    let mut ranks: Vec<_> = servers.iter().map(|s| s.rank()).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, (1..=32).collect::<Vec<_>>());
    assert_eq!(head.peers(), ranks);
    ok(checks::many_peers(&mut head, &mut servers, 200).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_is_cancel_safe() {
    let (mut head, mut server, _dir) = pair_ipc().await;
    ok(checks::cancel_safe_recv(&mut head, &mut server, 5_000).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_is_noticed() {
    let (mut head, server, _dir) = pair_ipc().await;
    ok(checks::server_departure(&mut head, server, Departure::Shutdown).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_drop_is_noticed() {
    let (mut head, server, _dir) = pair_ipc().await;
    ok(checks::server_departure(&mut head, server, Departure::Drop).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_shutdown_is_noticed() {
    let (head, mut server, _dir) = pair_ipc().await;
    ok(checks::head_departure(head, &mut server, Departure::Shutdown).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_drop_is_noticed() {
    let (head, mut server, _dir) = pair_ipc().await;
    ok(checks::head_departure(head, &mut server, Departure::Drop).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_after_shutdown_on_both_sides() {
    let (mut head, mut server, _dir) = pair_ipc().await;
    ok(checks::closed_after_shutdown(&mut server).await);
    ok(checks::closed_after_shutdown(&mut head).await);
}

// ------------------------------------------------------------ signed links

/// The same checks on signed links (`ZmqConfig::signing`), over
/// `tcp://127.0.0.1:0`, where a real deployment signs.
mod signed {
    use super::*;
    use casa_node_transport_zmq::{SigningKey, ZmqConfig};

    fn signed() -> ZmqConfig {
        ZmqConfig {
            signing: Some(SigningKey::from_bytes([0x5a; SigningKey::LEN])),
            ..ZmqConfig::default()
        }
    }

    async fn cluster_tcp(n: usize) -> (ZmqTransport, Vec<ZmqTransport>) {
        let head = ZmqTransport::bind_with("tcp://127.0.0.1:0", signed())
            .await
            .expect("bind");
        let endpoint = head.endpoint().to_owned();
        let servers = futures::future::try_join_all(
            (0..n).map(|_| ZmqTransport::connect_with(&endpoint, 0, signed())),
        )
        .await
        .expect("connect");
        (head, servers)
    }

    async fn pair_tcp() -> (ZmqTransport, ZmqTransport) {
        let (head, mut servers) = cluster_tcp(1).await;
        (head, servers.pop().expect("one server"))
    }

    /// Every message really went through the check, and none failed it.
    fn none_rejected(transports: &[&ZmqTransport]) {
        for transport in transports {
            assert_eq!(
                transport.rejected_messages(),
                0,
                "rank {}",
                transport.rank()
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ordering_10_000_each_way() {
        let (mut head, mut server) = pair_tcp().await;
        ok(checks::ordering(&mut head, &mut server, 10_000).await);
        none_rejected(&[&head, &server]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_in_flight_20_000_each_way() {
        let (mut head, mut server) = pair_tcp().await;
        ok(checks::many_in_flight(&mut head, &mut server, 20_000).await);
        none_rejected(&[&head, &server]);
    }

    /// Beyond the default byte budget (64 MiB).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_message_80_mib_after_a_small_one_each_way() {
        let (mut head, mut server) = pair_tcp().await;
        ok(checks::large_after_small(&mut head, &mut server, 80 << 20).await);
        none_rejected(&[&head, &server]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_peers_8_servers() {
        let (mut head, mut servers) = cluster_tcp(8).await;
        ok(checks::many_peers(&mut head, &mut servers, 200).await);
        none_rejected(&[&head]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recv_is_cancel_safe() {
        let (mut head, mut server) = pair_tcp().await;
        ok(checks::cancel_safe_recv(&mut head, &mut server, 5_000).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_shutdown_is_noticed() {
        let (mut head, server) = pair_tcp().await;
        ok(checks::server_departure(&mut head, server, Departure::Shutdown).await);
        none_rejected(&[&head]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_drop_is_noticed() {
        let (mut head, server) = pair_tcp().await;
        ok(checks::server_departure(&mut head, server, Departure::Drop).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn head_shutdown_is_noticed() {
        let (head, mut server) = pair_tcp().await;
        ok(checks::head_departure(head, &mut server, Departure::Shutdown).await);
        none_rejected(&[&server]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn head_drop_is_noticed() {
        let (head, mut server) = pair_tcp().await;
        ok(checks::head_departure(head, &mut server, Departure::Drop).await);
    }
}
