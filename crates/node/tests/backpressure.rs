//! The driver plane's queues are bounded (docs/semantics.md, "The front
//! door's queues"): a driver that reads nothing costs the head node a
//! bounded amount of memory, its log records are dropped oldest-first with
//! a record saying how many, its replies never are, and once its queue is
//! full the head node stops reading it, so that its own writes block,
//! while other drivers are served. Real `casa-node up` processes, driven
//! over raw Unix sockets; every process a test starts is stopped by PID
//! when the test ends, passed or failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use casa_node::client::{BlockingClient, Submit};
use casa_node::endpoint::FrontDoorEndpoint;
use casa_node_conformance::process::{self, wait_exit, wait_gone};
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{
    CommandResponse, Envelope, Hello, LogLevel, LogSubscription, Parameter, Role, SubmitRequest,
    Value, submit_reply,
};
use casa_node_protocol::{Framing, PROTOCOL_VERSION, RequestId};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_casa-node");
const WAIT: Duration = Duration::from_secs(60);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A running `casa-node up` whose log goes nowhere (these tests make a
/// lot of it), stopped by PID on drop.
struct Cluster {
    up: Child,
    dir: PathBuf,
    socket: PathBuf,
    /// Server node and worker PIDs, stopped with the cluster.
    seen: Vec<u32>,
}

/// True when the tests run over MPI (CASA_NODE_TEST_TRANSPORT=mpi).
fn over_mpi() -> bool {
    std::env::var("CASA_NODE_TEST_TRANSPORT").is_ok_and(|t| t == "mpi")
}

impl Cluster {
    fn start(servers: usize) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "casa-node-backpressure-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("front.sock");
        let mut up = if over_mpi() {
            let mut mpirun =
                process::mpirun_in(servers + 1, &dir).unwrap_or_else(|why| panic!("{why}"));
            mpirun.args([BIN, "--transport", "mpi", "up"]);
            mpirun
        } else {
            let mut up = Command::new(BIN);
            up.args(["up", "--servers", &servers.to_string()]);
            up
        };
        let mut up = up
            .args(["--endpoint", &format!("unix://{}", socket.display())])
            .args(["--log-file", "/dev/null", "--log-max-size", "0"])
            .args(["--heartbeat", "0.2", "--timeout", "3"])
            .env("XDG_RUNTIME_DIR", &dir)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("casa-node up starts");
        let mut first = String::new();
        let read = BufReader::new(up.stdout.take().unwrap()).read_line(&mut first);
        let mut cluster = Cluster {
            up,
            dir,
            socket,
            seen: Vec::new(),
        };
        assert!(read.is_ok_and(|n| n > 0), "casa-node up printed nothing");
        assert!(
            first.starts_with("front door: "),
            "first line of up: {first}"
        );
        let status = cluster.client().status(None).unwrap();
        for s in status.servers {
            cluster
                .seen
                .extend([s.pid, s.worker_pid].into_iter().filter(|&p| p != 0));
        }
        cluster
    }

    fn client(&self) -> BlockingClient {
        BlockingClient::connect(&FrontDoorEndpoint::Unix(self.socket.clone()))
            .expect("the front door accepts")
    }

    /// A greeted raw driver.
    fn raw(&self) -> Raw {
        let stream = UnixStream::connect(&self.socket).expect("the front door accepts");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut raw = Raw { stream };
        raw.send(&Envelope::correlated(
            1,
            Body::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                role: Role::Driver.into(),
                software: "backpressure.rs".into(),
                ..Hello::default()
            }),
        ));
        assert_eq!(raw.read().kind(), "Welcome");
        raw
    }

    /// The head node's PID: the process that listens at the front door
    /// (`up` itself, or rank 0 under mpirun).
    fn head_node_pid(&self, raw: &Raw) -> i32 {
        let credentials =
            nix::sys::socket::getsockopt(&raw.stream, nix::sys::socket::sockopt::PeerCredentials)
                .unwrap();
        if !over_mpi() {
            assert_eq!(credentials.pid(), self.up.id() as i32);
        }
        credentials.pid()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.up.try_wait().ok().flatten().is_none() {
            let _ = kill(Pid::from_raw(self.up.id() as i32), Signal::SIGTERM);
            if wait_exit(&mut self.up, Duration::from_secs(20)).is_none() {
                let _ = self.up.kill();
                let _ = self.up.wait();
            }
        }
        for &pid in &self.seen {
            if !wait_gone(Pid::from_raw(pid as i32), Duration::from_secs(10)) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A driver on a bare socket, which reads only when told to.
struct Raw {
    stream: UnixStream,
}

impl Raw {
    fn send(&mut self, envelope: &Envelope) {
        self.stream.write_all(&frame(envelope)).unwrap();
    }

    fn read(&mut self) -> Envelope {
        read_frame(&mut self.stream)
    }
}

fn frame(envelope: &Envelope) -> Vec<u8> {
    Framing::default()
        .encode_to_bytes(envelope)
        .unwrap()
        .to_vec()
}

fn read_frame(stream: &mut UnixStream) -> Envelope {
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .expect("a frame within the wait");
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).unwrap();
    Framing::default().decode_body(body.into()).unwrap()
}

/// Resident memory of `pid`, in bytes (VmRSS).
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// A submission that waits for its SubmitReply (not pipelined).
fn submission(
    correlation: u64,
    command: &str,
    target: i32,
    parameters: Vec<Parameter>,
) -> Envelope {
    Envelope::correlated(
        correlation,
        Body::SubmitRequest(Box::new(SubmitRequest {
            command: command.into(),
            targets: vec![target],
            parameters,
            ..SubmitRequest::default()
        })),
    )
}

/// What a raw driver was sent: accepted ids, responses by id, log
/// messages, and whether the StatusReply marking the end has come.
#[derive(Default)]
struct Received {
    accepted: Vec<RequestId>,
    responses: std::collections::BTreeMap<RequestId, CommandResponse>,
    logs: Vec<String>,
    marked: bool,
}

/// The correlation of the status request that marks the end of a
/// stream of submissions: answered after their SubmitReplies.
const MARK: u64 = u64::MAX;

/// Reads `raw`'s frames until `done` says so and every accepted id has
/// its response; each submission must be accepted, and each response
/// must answer an accepted id and come once.
fn read_owed(raw: &mut Raw, done: impl Fn(&Received) -> bool) -> Received {
    let mut got = Received::default();
    while !done(&got) || got.responses.len() < got.accepted.len() {
        let envelope = raw.read();
        let correlation = envelope.correlation;
        match envelope.body {
            Some(Body::SubmitReply(reply)) => match reply.outcome {
                Some(submit_reply::Outcome::Accepted(a)) => got.accepted.extend(a.ids),
                other => panic!("a submission was not accepted: {other:?}"),
            },
            Some(Body::ResponseDelivery(d)) => {
                let response = d.response.unwrap();
                let id = response.id;
                assert!(
                    got.responses.insert(id, response).is_none(),
                    "two responses for {id}"
                );
            }
            Some(Body::LogRecord(r)) => got.logs.push(r.message),
            Some(Body::StatusReply(_)) if correlation == MARK => got.marked = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    got.accepted.sort_unstable();
    assert_eq!(
        got.accepted,
        got.responses.keys().copied().collect::<Vec<_>>(),
        "a response for each accepted id, and for no other"
    );
    got
}

fn servers_online(client: &BlockingClient) {
    for s in client.status(None).unwrap().servers {
        assert!(
            s.online && !s.timeout,
            "server {} is not answering: {s:?}",
            s.rank
        );
    }
}

/// A driver subscribed to DEBUG logs that stops reading while commands
/// print a lot: the head node keeps at most 4 MiB of records for it
/// (and no more than the transports and its own log thread hold by their
/// own bounds), another driver's commands complete all along, the servers
/// stay online, and when the slow driver reads at last it finds a record
/// saying how many were dropped and every response it was owed.
#[test]
fn a_driver_that_stops_reading_its_logs_costs_the_head_node_a_bounded_amount() {
    const OWED: usize = 50;
    const WARM_UP: usize = 16;
    const COMMANDS: usize = 320;
    // Each command makes 1000 records of 1000 characters: about 1.1 MiB of
    // envelopes. Kept for the slow driver, COMMANDS of them would be
    // 350 MiB, more than three times the bound below.
    const PRINT: &str = "for _ in range(1000): print('x' * 1000)";
    // Above the resident memory measured after the warm-up (which filled
    // the slow driver's socket and its ring of records), the head node
    // may hold: the ring, 4 MiB; records on their way from the one
    // server in the transport (over ZeroMQ its window is 32 768 messages,
    // 36 MiB of these); records waiting for the log's thread, at most
    // 16 384 (18 MiB); the allocator's slack. 96 MiB covers them all;
    // before the queues were bounded, the head node grew by 350 MiB.
    const BOUND: u64 = 96 << 20;
    let cluster = Cluster::start(1);
    let mut slow = cluster.raw();
    let pid = cluster.head_node_pid(&slow);
    slow.send(&Envelope::correlated(
        2,
        Body::LogSubscription(LogSubscription {
            enabled: true,
            min_level: LogLevel::Debug.into(),
        }),
    ));
    loop {
        let reply = slow.read();
        if reply.correlation == 2 {
            assert_eq!(reply.kind(), "Ack");
            break;
        }
    }
    for n in 0..OWED {
        slow.send(&submission(10 + n as u64, &n.to_string(), 1, Vec::new()));
    }
    // From here on the slow driver reads nothing.
    let fast = cluster.client();
    let run = |n: usize| {
        let ids = fast
            .submit(Submit::new(PRINT).targets([1]))
            .expect("accepted");
        let done = fast.wait_timeout(&ids, WAIT).expect("answered");
        assert!(done[0].successful, "command {n}: {:?}", done[0].traceback);
        servers_online(&fast);
    };
    for n in 0..WARM_UP {
        run(n);
    }
    let baseline = rss(pid);
    let mut most = baseline;
    for n in 0..COMMANDS {
        run(n);
        most = most.max(rss(pid));
    }
    eprintln!(
        "the head node: {} MiB after the warm-up, at most {} MiB after {COMMANDS} more commands",
        baseline >> 20,
        most >> 20
    );
    assert!(
        most <= baseline + BOUND,
        "the head node grew from {} MiB to {} MiB for a driver that reads nothing",
        baseline >> 20,
        most >> 20
    );
    let dropped = |m: &String| m.ends_with(" log records dropped: this driver read too slowly");
    let got = read_owed(&mut slow, |got| {
        got.accepted.len() == OWED && got.logs.iter().any(dropped)
    });
    for (n, response) in got.responses.values().enumerate() {
        assert!(response.successful, "{response:?}");
        assert_eq!(response.command, n.to_string());
    }
    let notice = got.logs.iter().find(|m| dropped(m)).unwrap();
    let count: u64 = notice.split(' ').next().unwrap().parse().unwrap();
    assert!(count > 0, "{notice}");
}

/// A driver that streams submissions and reads none of the replies: once
/// its queue is full the head node stops reading it, so its writes
/// block and stay blocked while another driver's commands complete; it
/// never got more in than the bounds let in; and when it reads, every
/// submission it wrote was accepted and answered.
#[test]
fn a_driver_that_streams_without_reading_is_not_read_until_it_drains() {
    // Each submission carries 4 KiB, which its response carries back.
    const PAYLOAD: usize = 4096;
    let cluster = Cluster::start(2);
    let stuck = cluster.raw();
    let other = cluster.client();
    // What the head node may have taken in when it stops reading: the
    // submissions whose replies fill its socket's buffer towards the
    // driver (at most twice its size, and a reply frame is at least 8
    // bytes), those whose replies wait in its queue (1024), those read
    // and not yet taken care of (1024); and the driver's own socket
    // buffer holds some more.
    let buffer: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let sndbuf =
        nix::sys::socket::getsockopt(&stuck.stream, nix::sys::socket::sockopt::SndBuf).unwrap();
    let most_frames = 2 * buffer / 8 + 1024 + 1024 + 1;
    let most_bytes = most_frames * (PAYLOAD + 64) + 2 * sndbuf;
    let written = std::sync::Arc::new(AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writing = stuck.stream.try_clone().unwrap();
    let writer = {
        let (written, stop) = (written.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                sent += 1;
                let bytes = frame(&submission(
                    sent,
                    "len(payload)",
                    1,
                    vec![Parameter::new("payload", Value::bytes(vec![7u8; PAYLOAD]))],
                ));
                writing.write_all(&bytes).unwrap();
                written.fetch_add(bytes.len(), Ordering::Relaxed);
            }
            // Answered after every SubmitReply.
            writing
                .write_all(&frame(&Envelope::correlated(
                    MARK,
                    Body::StatusRequest(Default::default()),
                )))
                .unwrap();
            sent as usize
        })
    };
    let mut still = 0;
    let mut last = 0;
    // Until the driver's writes have made no progress while another
    // driver completed ten commands: the writer is blocked.
    while still < 10 {
        let ids = other.submit(Submit::new("1+1").targets([2])).unwrap();
        let done = other.wait_timeout(&ids, WAIT).expect("answered");
        assert!(done[0].successful);
        let now = written.load(Ordering::Relaxed);
        assert!(
            now <= most_bytes,
            "the head node took {now} bytes from a driver that reads nothing; at most {most_bytes} fit its bounds"
        );
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    servers_online(&other);
    // It reads, and the writer finishes the frame it was writing.
    stop.store(true, Ordering::Relaxed);
    let mut raw = stuck;
    let draining = std::thread::spawn(move || read_owed(&mut raw, |got| got.marked));
    let sent = writer.join().expect("the writer ends");
    let got = draining.join().expect("every submission answered");
    eprintln!("blocked after {last} bytes; {sent} submissions in all");
    assert_eq!(got.accepted.len(), sent, "every submission accepted");
    for response in got.responses.values() {
        assert!(response.successful, "{response:?}");
        assert_eq!(response.ret, Some(Value::from(PAYLOAD as u64)));
    }
    // And it is served as any other.
    let ids = other.submit(Submit::new("2+2")).unwrap();
    assert!(other.wait_timeout(&ids, WAIT).unwrap()[0].successful);
}
