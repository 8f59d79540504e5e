//! The front door's defences, end to end on real `casa-node up` processes
//! over loopback: a `tcp://` front door admits only TLS peers that trust
//! its certificate and present the token of its connection file; a
//! `unix://` one only this user's processes. Every refusal is checked to
//! be logged in the cluster's log file, and a legitimate driver to be
//! served afterwards. Every process a test starts is stopped by PID when
//! the test ends, passed or failed.

mod common;

use std::io::{Read, Write};
use std::ops::Deref;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use casa_node::client::{BlockingClient, ClientError, Submit, Target};
use casa_node::connection_file::ConnectionFile;
use casa_node::endpoint::FrontDoorEndpoint;
use casa_node::front_door::ADMISSION_DEADLINE;
use casa_node_conformance::cluster::{self, Launch, Transport, WAIT};
use casa_node_conformance::driver;
use casa_node_conformance::process::{self, wait_exit};
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{Envelope, Hello, Role, Value};
use casa_node_protocol::{Framing, PROTOCOL_VERSION};
use common::{BIN, still_serving};

/// `casa-node up` with one server over ZeroMQ, a timeout of 5 s, in `dir`.
fn up(dir: &Path) -> Launch {
    Launch::new(BIN, 1)
        .transport(Transport::Zmq)
        .dir(dir)
        .timeout(5)
}

/// A running `casa-node up` (the harness's [`cluster::Cluster`]) that has
/// served a command, stopped by PID on drop.
struct Cluster {
    run: cluster::Cluster,
    endpoint: FrontDoorEndpoint,
    /// The connection file of a `tcp://` front door.
    connection_file: Option<PathBuf>,
}

impl Deref for Cluster {
    type Target = cluster::Cluster;

    fn deref(&self) -> &cluster::Cluster {
        &self.run
    }
}

impl Cluster {
    /// A cluster whose front door is `tcp://127.0.0.1:PORT` (a port the
    /// system picks), with a connection file `up` creates.
    fn tcp() -> Cluster {
        Self::tcp_with(&[]).0
    }

    /// As [`tcp`](Self::tcp), with node links on `tcp://127.0.0.1` too; its
    /// directory and connection file.
    fn tcp_with_nodes() -> (Cluster, PathBuf, PathBuf) {
        Self::tcp_with(&["--nodes", "tcp://127.0.0.1:0"])
    }

    /// A `tcp://` cluster with `extra` options; its directory and
    /// connection file.
    fn tcp_with(extra: &[&str]) -> (Cluster, PathBuf, PathBuf) {
        let dir = cluster::scratch("security");
        let file = dir.join("secrets").join("cluster.json");
        let launch = up(&dir)
            .endpoint("tcp://127.0.0.1:0")
            .args(["--connection-file", file.to_str().unwrap()])
            .args(extra);
        let cluster = Self::start(launch, Some(file.clone()));
        (cluster, dir, file)
    }

    /// A cluster in `dir` whose front door is the unix socket `socket`.
    fn unix(dir: &Path, socket: &Path) -> Cluster {
        Self::start(
            up(dir).endpoint(format!("unix://{}", socket.display())),
            None,
        )
    }

    fn start(launch: Launch, connection_file: Option<PathBuf>) -> Cluster {
        let run = launch.start();
        let endpoint = run.front_door().parse().expect("an endpoint");
        let cluster = Cluster {
            run,
            endpoint,
            connection_file,
        };
        still_serving(&cluster.client());
        cluster.note_tree();
        cluster
    }

    /// A legitimate driver: for `tcp://`, with the connection file.
    fn client(&self) -> BlockingClient {
        let connection_file = self
            .connection_file
            .as_deref()
            .map(|file| ConnectionFile::read(file).expect("the connection file reads"));
        BlockingClient::connect_to(&Target {
            endpoint: self.endpoint.clone(),
            connection_file,
        })
        .expect("the front door admits a legitimate driver")
    }

    /// The `host:port` of a `tcp://` front door.
    fn address(&self) -> String {
        match &self.endpoint {
            FrontDoorEndpoint::Tcp(addr) => addr.clone(),
            other => panic!("{other} is not tcp://"),
        }
    }

    /// Waits up to `WAIT` for a WARNING line of the log holding every one
    /// of `parts`; the line.
    fn logged(&self, parts: &[&str]) -> String {
        self.wait_log(|l| l.contains("WARNING") && parts.iter().all(|p| l.contains(p)))
            .unwrap_or_else(|| panic!("no warning with {parts:?} in the log:\n{}", self.log()))
    }

    /// Runs the CLI against this cluster's runtime directory.
    fn cli(&self, args: &[&str]) -> Output {
        self.run
            .cli_command(BIN)
            .args(args)
            .output()
            .expect("the CLI runs")
    }
}

/// A driver's Hello frame (length and envelope) with `token`.
fn hello_frame(token: &str) -> Vec<u8> {
    driver::envelope_frame(&driver::hello("security.rs", token))
}

/// A copy of `file` (mode 0600) with its token replaced.
fn with_token(file: &Path, token: &str, copy: &Path) {
    with_field(file, "token", token, copy);
}

/// A copy of `file` (mode 0600) with the string `field` set to `value`.
fn with_field(file: &Path, field: &str, value: &str, copy: &Path) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    json[field] = value.into();
    std::fs::write(copy, json.to_string()).unwrap();
    std::fs::set_permissions(copy, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Runs `command` to its end, killed by PID after `WAIT`: its exit status
/// (`None` if it had to be killed) and what it wrote to stderr.
fn exit_and_stderr(command: &mut Command) -> (Option<std::process::ExitStatus>, String) {
    process::run_to_end(command, WAIT)
}

/// A `casa-node server --connect NODES` with `args`, to its end.
fn attach_server(nodes: &str, args: &[&str]) -> (Option<std::process::ExitStatus>, String) {
    exit_and_stderr(
        Command::new(BIN)
            .args(["server", "--connect", nodes, "--patience", "5"])
            .args(args)
            .env_remove("CASA_NODE_CONNECTION_FILE")
            .stdout(Stdio::null()),
    )
}

/// The right token over TLS is admitted: the Rust client, and the CLI with
/// `--connection-file` and with nothing (the file `up` recorded). The file
/// `up` made is private and its certificate names the loopback host.
#[test]
fn a_tcp_front_door_serves_tls_drivers_with_the_token() {
    let cluster = Cluster::tcp();
    let file = cluster.connection_file.clone().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(file.parent().unwrap()), 0o700);
    let read = ConnectionFile::read(&file).unwrap();
    assert_eq!(read.endpoint(), cluster.endpoint, "the file names the port");
    assert!(
        cluster
            .log()
            .contains(&format!("front door at {} (TLS", cluster.endpoint)),
        "{}",
        cluster.log()
    );
    still_serving(&cluster.client());

    let flagged = cluster.cli(&[
        "submit",
        "--connection-file",
        file.to_str().unwrap(),
        "--param",
        "a=1",
        "a+1",
    ]);
    assert!(flagged.status.success(), "{flagged:?}");
    let line: serde_json::Value =
        serde_json::from_slice(flagged.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(line["ret"], 2);

    let recorded = cluster.cli(&["submit", "1+1"]);
    assert!(recorded.status.success(), "{recorded:?}");
    let line: serde_json::Value =
        serde_json::from_slice(recorded.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(line["ret"], 2);
}

/// A wrong token: a clear refusal for the driver, a warning with its
/// address in the log, and the cluster keeps serving.
#[test]
fn a_wrong_token_is_refused_and_logged() {
    let cluster = Cluster::tcp();
    let served = cluster.client();
    let wrong = cluster.dir().join("wrong.json");
    with_token(
        cluster.connection_file.as_deref().unwrap(),
        &"0".repeat(64),
        &wrong,
    );
    let target = Target {
        endpoint: cluster.endpoint.clone(),
        connection_file: Some(ConnectionFile::read(&wrong).unwrap()),
    };
    match BlockingClient::connect_to(&target) {
        Err(ClientError::Refused(message)) => {
            assert!(message.contains("wrong token"), "{message}");
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a wrong token was admitted"),
    }
    let line = cluster.logged(&["front door: refused 127.0.0.1:", "wrong token"]);
    assert!(
        !line.contains(&"0".repeat(64)),
        "the token is logged: {line}"
    );

    // The CLI says so on one line and exits 2.
    let cli = cluster.cli(&["status", "--connection-file", wrong.to_str().unwrap()]);
    assert_eq!(cli.status.code(), Some(2), "{cli:?}");
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(stderr.contains("wrong token"), "{stderr}");

    still_serving(&served);
    still_serving(&cluster.client());
}

/// TLS with the right certificate but a Hello without a token, and a first
/// message that is no Hello: "token required", logged, and the cluster
/// keeps serving.
#[test]
fn no_token_is_refused_and_logged() {
    let cluster = Cluster::tcp();
    let served = cluster.client();
    let file = ConnectionFile::read(cluster.connection_file.as_deref().unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for first in [
        Body::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Driver.into(),
            ..Hello::default()
        }),
        Body::StatusRequest(Default::default()),
    ] {
        let (reply, framed) = runtime.block_on(tls_exchange(&cluster.address(), &file, first));
        match reply.body {
            Some(Body::Error(e)) => assert!(e.message.contains("token required"), "{e:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(
            runtime.block_on(closes(framed)),
            "the connection stays open after the refusal"
        );
        cluster.logged(&["front door: refused 127.0.0.1:", "token required"]);
    }
    still_serving(&served);
    still_serving(&cluster.client());
}

type TlsFramed = tokio_util::codec::Framed<
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    tokio_util::codec::LengthDelimitedCodec,
>;

/// Over TLS trusting `file`'s certificate, sends `first` as the first
/// message; the answer, and the connection.
async fn tls_exchange(address: &str, file: &ConnectionFile, first: Body) -> (Envelope, TlsFramed) {
    use futures::{SinkExt, StreamExt};

    let framing = Framing::default();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(file.client_config().unwrap());
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS completes");
    let mut framed = tokio_util::codec::Framed::new(tls, casa_node::front_door::codec(framing));
    let frame = framing
        .encode_body(&Envelope::correlated(1, first))
        .unwrap();
    framed.send(bytes::Bytes::from(frame)).await.unwrap();
    let reply = tokio::time::timeout(WAIT, framed.next())
        .await
        .expect("an answer in time")
        .expect("a frame")
        .expect("a readable frame");
    (framing.decode_body(reply.freeze()).unwrap(), framed)
}

/// True once the node closes `framed` with nothing more sent.
async fn closes(mut framed: TlsFramed) -> bool {
    use futures::StreamExt;
    let end = tokio::time::timeout(WAIT, framed.next())
        .await
        .expect("the end in time");
    end.is_none_or(|r| r.is_err())
}

/// Plain TCP (a Hello frame, no TLS) fails the TLS handshake: the peer is
/// sent no Welcome, the failure is logged, and the cluster keeps serving.
#[test]
fn plain_tcp_without_tls_is_refused_and_logged() {
    let cluster = Cluster::tcp();
    let served = cluster.client();
    let token = ConnectionFile::read(cluster.connection_file.as_deref().unwrap())
        .unwrap()
        .token()
        .to_owned();
    let mut raw = std::net::TcpStream::connect(cluster.address()).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    // Even with the right token: in the clear it is refused.
    raw.write_all(&hello_frame(&token)).unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    // At most a TLS alert (content type 21), never a frame.
    assert!(
        answer.is_empty() || answer[0] == 21,
        "plain TCP got {answer:?}"
    );
    cluster.logged(&["front door: refused 127.0.0.1:", "TLS handshake failed"]);
    still_serving(&served);
    still_serving(&cluster.client());
}

/// A peer that connects and says nothing is dropped after the admission
/// deadline, logged, while others are served meanwhile.
#[test]
fn a_silent_peer_is_dropped_after_the_deadline() {
    let cluster = Cluster::tcp();
    let mut silent = std::net::TcpStream::connect(cluster.address()).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let since = Instant::now();
    still_serving(&cluster.client());
    let mut answer = Vec::new();
    let _ = silent.read_to_end(&mut answer);
    let held = since.elapsed();
    assert!(answer.is_empty(), "{answer:?}");
    assert!(
        held >= ADMISSION_DEADLINE - Duration::from_millis(500) && held < WAIT,
        "closed after {held:?}"
    );
    cluster.logged(&["front door: refused 127.0.0.1:", "within"]);
    still_serving(&cluster.client());
}

/// A driver whose connection file holds another certificate refuses the
/// node (it could be an impostor); the node logs the failed handshake and
/// keeps serving.
#[test]
fn a_client_that_trusts_another_certificate_refuses_the_node() {
    let cluster = Cluster::tcp();
    let other = cluster.dir().join("other.json");
    let (fresh, _) = ConnectionFile::read_or_generate(&other, &cluster.endpoint).unwrap();
    let other = fresh.write_new(&cluster.endpoint).unwrap();
    let target = Target {
        endpoint: cluster.endpoint.clone(),
        connection_file: Some(other),
    };
    match BlockingClient::connect_to(&target) {
        Err(e @ ClientError::Tls { .. }) => {
            assert!(e.to_string().contains("certificate"), "{e}");
        }
        Err(other) => panic!("expected a TLS failure, got {other}"),
        Ok(_) => panic!("a client trusted a certificate it was not given"),
    }
    cluster.logged(&["front door: refused 127.0.0.1:", "TLS handshake failed"]);
    still_serving(&cluster.client());
}

/// `up` with a tcp:// endpoint and no connection file refuses on one line,
/// exit 2, before anything listens or is written.
#[test]
fn up_refuses_tcp_without_a_connection_file() {
    let dir = cluster::scratch("security");
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let (status, stderr) = exit_and_stderr(
        Command::new(BIN)
            .args(["up", "--servers", "1"])
            .args(["--endpoint", &format!("tcp://127.0.0.1:{port}")])
            .args(["--log-file", dir.join("casa-node.log").to_str().unwrap()])
            .env("XDG_RUNTIME_DIR", dir.join("runtime"))
            .env_remove("CASA_NODE_CONNECTION_FILE")
            .current_dir(&dir)
            .stdout(Stdio::null()),
    );
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--connection-file"), "{stderr}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something listens on {port}"
    );
    assert!(!dir.join("casa-node.log").exists(), "a cluster started");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A connection file group or others can read is refused by `up` (naming
/// it, before anything listens) and by the CLI's driver commands, while a
/// cluster with a private file keeps serving.
#[test]
fn a_connection_file_others_can_read_is_refused() {
    let cluster = Cluster::tcp();
    let open = cluster.dir().join("open.json");
    std::fs::copy(cluster.connection_file.as_deref().unwrap(), &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();

    let (status, stderr) = exit_and_stderr(
        Command::new(BIN)
            .args(["up", "--servers", "1"])
            .args(["--endpoint", "tcp://127.0.0.1:0"])
            .args(["--connection-file", open.to_str().unwrap()])
            .args([
                "--log-file",
                cluster.dir().join("second.log").to_str().unwrap(),
            ])
            .env("XDG_RUNTIME_DIR", cluster.dir().join("runtime-2"))
            .current_dir(cluster.dir())
            .stdout(Stdio::null()),
    );
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert!(stderr.contains(open.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("mode 644"), "{stderr}");
    assert!(
        !cluster.dir().join("second.log").exists(),
        "a cluster started"
    );

    let cli = cluster.cli(&["submit", "--connection-file", open.to_str().unwrap(), "1+1"]);
    assert_eq!(cli.status.code(), Some(2), "{cli:?}");
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(stderr.contains("mode 644"), "{stderr}");

    still_serving(&cluster.client());
}

/// SO_PEERCRED: a process of another user that reaches the unix socket is
/// refused and logged, and the cluster keeps serving. Needs root (to run a
/// process as another uid); otherwise it says why it cannot check.
#[test]
fn a_unix_peer_of_another_uid_is_refused_and_logged() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "not root: cannot start a process of another uid, so SO_PEERCRED is not checked here"
        );
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = cluster::scratch("security");
    // A directory the other uid can enter; the socket is opened to it
    // below, so that only SO_PEERCRED stands in the way.
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = open.join("front.sock");
    let cluster = Cluster::unix(&dir, &socket);
    let served = cluster.client();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    let script = "\
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(sys.argv[1])
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
    data = s.recv(1 << 16)
except OSError as e:
    print('error', e)
else:
    print('closed' if not data else 'answered ' + data.hex())
";
    let hex: String = hello_frame("").iter().map(|b| format!("{b:02x}")).collect();
    let mut other = Command::new("python3")
        .args(["-c", script, socket.to_str().unwrap(), &hex])
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts as another uid");
    let status = wait_exit(&mut other, WAIT);
    if status.is_none() {
        let _ = other.kill();
        let _ = other.wait();
    }
    let output = other.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        status.is_some_and(|s| s.success()),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with("closed") || stdout.starts_with("error"),
        "uid {NOBODY} got {stdout}"
    );
    cluster.logged(&["front door: refused a connection from uid 65534"]);
    still_serving(&served);
    still_serving(&cluster.client());
}

/// Node links over `tcp://` are signed with the connection file's key
/// (the ZeroMQ transport's signing, tested link by link in
/// `crates/transport-zmq/tests/signing.rs`): `up`'s own server joins over
/// a signed link and serves; a server with the key of another connection
/// file cannot join and says why, one with none is refused before it
/// connects, and `up` will not open tcp:// node links without a connection
/// file. The cluster serves on throughout.
#[test]
fn tcp_node_links_are_signed_with_the_connection_files_key() {
    let (cluster, dir, file) = Cluster::tcp_with_nodes();
    let nodes = cluster.nodes().expect("nodes: over ZeroMQ").to_owned();
    assert!(nodes.starts_with("tcp://127.0.0.1:"), "{nodes}");

    let other = dir.join("other.json");
    with_field(&file, "signing_key", &"5a".repeat(32), &other);
    let (status, stderr) = attach_server(&nodes, &["--connection-file", other.to_str().unwrap()]);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert!(stderr.contains("cannot join"), "{stderr}");
    still_serving(&cluster.client());

    let (status, stderr) = attach_server(&nodes, &[]);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert!(stderr.contains("--connection-file"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // The right key: a second server joins and serves.
    let mut joined = Command::new(BIN)
        .args(["server", "--connect", &nodes, "--patience", "5"])
        .args(["--connection-file", file.to_str().unwrap()])
        .env_remove("CASA_NODE_CONNECTION_FILE")
        .stdin(Stdio::null())
        .spawn()
        .expect("casa-node server starts");
    let client = cluster.client();
    let end = Instant::now() + WAIT;
    while client.status(None).unwrap().servers.len() < 2 {
        assert!(Instant::now() < end, "the keyed server never joined");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ids = client
        .submit(Submit::new("1+1").targets([2]))
        .expect("accepted");
    let response = client.wait_timeout(&ids, WAIT).expect("answered").remove(0);
    assert_eq!(
        response.ret,
        Some(Value::from(2)),
        "{:?}",
        response.traceback
    );
    drop(client);
    drop(cluster);
    if wait_exit(&mut joined, Duration::from_secs(20)).is_none() {
        let _ = joined.kill();
        let _ = joined.wait();
        panic!("the attached server outlived its cluster");
    }

    // No connection file: `up` refuses tcp:// node links, and says how.
    let runtime = cluster::scratch("security");
    let output = Command::new(BIN)
        .args(["up", "--servers", "1", "--nodes", "tcp://127.0.0.1:0"])
        .env("XDG_RUNTIME_DIR", &runtime)
        .env_remove("CASA_NODE_CONNECTION_FILE")
        .env_remove("CASA_NODE_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .expect("casa-node up runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--connection-file"), "{stderr}");
    assert!(
        output.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let _ = std::fs::remove_dir_all(&runtime);
}

/// A TCP relay on loopback between a server node and its head node's
/// `tcp://` node link, which a test can cut and restore: while cut, it
/// moves no byte either way, as a network partition does (the connections
/// stay open, and what is sent waits in the kernel's buffers).
struct Relay {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    /// Relays every connection made to it to `upstream` (`host:port`).
    fn start(upstream: String) -> Relay {
        use std::net::{TcpListener, TcpStream};
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (cut_flag, done_flag) = (cut.clone(), done.clone());
        std::thread::spawn(move || {
            while !done_flag.load(Ordering::Relaxed) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                down.set_nonblocking(false).unwrap();
                for (from, to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let (cut, done) = (cut_flag.clone(), done_flag.clone());
                    std::thread::spawn(move || pump(from, to, &cut, &done));
                }
            }
        });
        Relay { port, cut, done }
    }

    fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut(false);
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` but while `cut`; ends with either side, or `done`.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    cut: &std::sync::atomic::AtomicBool,
    done: &std::sync::atomic::AtomicBool,
) {
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buffer = vec![0u8; 1 << 16];
    while !done.load(Ordering::Relaxed) {
        if cut.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Rules 20, 21, 30: a partition longer than the timeout heals. A server
/// node attached over `tcp://` (through a relay on loopback that the test
/// cuts) runs `time.sleep(4) or 99` when its link goes quiet for 8 s: the
/// head node times it out and answers the request `timeout`; the server
/// node keeps its worker and finished answer, and when the link returns
/// that answer replaces the timeout record, and the same server node is
/// online again and serves.
#[test]
fn a_partition_longer_than_the_timeout_heals() {
    let (cluster, _, file) = Cluster::tcp_with_nodes();
    let upstream = cluster
        .nodes()
        .expect("nodes: over ZeroMQ")
        .trim_start_matches("tcp://")
        .to_owned();
    let relay = Relay::start(upstream);
    let mut remote = Command::new(BIN)
        .args([
            "server",
            "--connect",
            &format!("tcp://127.0.0.1:{}", relay.port),
        ])
        .args(["--connection-file", file.to_str().unwrap()])
        .env_remove("CASA_NODE_CONNECTION_FILE")
        .env_remove("CASA_NODE_PATIENCE")
        .stdin(Stdio::null())
        .spawn()
        .expect("casa-node server starts");
    let client = cluster.client();
    let end = Instant::now() + WAIT;
    let server = loop {
        let status = client.status(None).unwrap();
        if let Some(s) = status.servers.iter().find(|s| s.rank == 2 && s.online) {
            if s.worker_pid != 0 {
                break s.clone();
            }
        }
        assert!(Instant::now() < end, "the remote server never joined");
        std::thread::sleep(Duration::from_millis(20));
    };
    let ids = client
        .submit(Submit::new("time.sleep(4) or 99").targets([2]))
        .expect("accepted");
    while !client.status(Some(2)).unwrap().servers[0].busy {
        assert!(Instant::now() < end, "the command never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cut_at = Instant::now();
    relay.cut(true);
    let first = client.wait_timeout(&ids, WAIT).expect("answered").remove(0);
    assert_eq!(
        first.status(),
        casa_node_protocol::pb::CommandStatus::Timeout,
        "{first:?}"
    );
    // The partition lasts 8 s in all, past the timeout (5 s) and the 6 s
    // after which server nodes used to give up.
    std::thread::sleep(Duration::from_secs(8).saturating_sub(cut_at.elapsed()));
    relay.cut(false);
    let end = Instant::now() + WAIT;
    let replaced = loop {
        let latest = client.poll(&ids).unwrap().remove(0);
        if latest.status() != casa_node_protocol::pb::CommandStatus::Timeout {
            break latest;
        }
        assert!(
            Instant::now() < end,
            "the real answer never replaced the timeout record"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(replaced.ret, Some(Value::from(99)), "{replaced:?}");
    let again = client.status(Some(2)).unwrap().servers.remove(0);
    assert!(again.online && !again.timeout, "{again:?}");
    assert_eq!(
        (again.pid, again.worker_pid),
        (server.pid, server.worker_pid),
        "the server node or its worker was replaced"
    );
    let next = client
        .submit(Submit::new("6*7").targets([2]))
        .expect("accepted");
    let answer = client
        .wait_timeout(&next, WAIT)
        .expect("answered")
        .remove(0);
    assert_eq!(answer.ret, Some(Value::from(42)), "{answer:?}");
    drop(client);
    drop(cluster);
    drop(relay);
    if wait_exit(&mut remote, Duration::from_secs(20)).is_none() {
        let _ = remote.kill();
        let _ = remote.wait();
        panic!("the remote server outlived its cluster");
    }
}
