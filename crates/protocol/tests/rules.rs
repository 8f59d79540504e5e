//! The behaviour rules of SEMANTICS.md, one or more tests each, on a small
//! cluster of `HeadCore` and `ServerCore`s joined without delay. Each test
//! names the rule it checks.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use casa_node_protocol::pb::control_request::{self, Start};
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{
    CommandMode, CommandRequest, CommandResponse, CommandStatus, ControlRequest, ControlResponse,
    Envelope, FailureKind, LogLevel, Parameter, RejectReason, ResponseDelivery, SubmitRequest,
    Value,
};
use casa_node_protocol::{
    Action, DriverId, Event, ExecOutcome, HeadConfig, HeadCore, Interruption, LAST_CHANCE,
    LeaseError, MAX_LEASE, MAX_LEASES, Rank, Rejection, RequestId, ServerAction, ServerConfig,
    ServerCore, SubmitError, WallClock,
};

const EPOCH: f64 = 1_700_000_000.0;
const DRIVER: DriverId = DriverId(7);
const GRACE: Duration = Duration::from_secs(2);

/// A head core and `n` server cores joined by instant, ordered links.
struct Cluster {
    t0: Instant,
    now: Instant,
    head: HeadCore,
    servers: HashMap<Rank, ServerCore>,
    /// What each server's worker runs now.
    running: HashMap<Rank, CommandRequest>,
    /// Servers that read nothing (SIGSTOP), and what waits for them.
    stalled: HashSet<Rank>,
    held: HashMap<Rank, Vec<Envelope>>,
    /// Servers commands cannot be sent to (too large for the transport).
    unsendable: HashSet<Rank>,
    deliveries: Vec<(DriverId, ResponseDelivery)>,
    events: Vec<Event>,
    sent: Vec<(Rank, Envelope)>,
    executed: Vec<(Rank, RequestId)>,
    server_actions: Vec<(Rank, ServerAction)>,
}

impl Cluster {
    fn new(n: Rank) -> Cluster {
        Cluster::with_config(n, HeadConfig::default())
    }

    fn with_config(n: Rank, config: HeadConfig) -> Cluster {
        let t0 = Instant::now();
        let clock = WallClock::new(t0, EPOCH);
        let mut head = HeadCore::new(config, clock);
        let mut servers = HashMap::new();
        for rank in 1..=n {
            head.add_server(rank, t0).unwrap();
            let config = ServerConfig {
                rank,
                host: format!("node{rank}"),
                pid: 100 + rank as u32,
                kill_grace: GRACE,
                patience: None,
            };
            servers.insert(rank, ServerCore::new(config, clock, t0));
        }
        let mut cluster = Cluster {
            t0,
            now: t0,
            head,
            servers,
            running: HashMap::new(),
            stalled: HashSet::new(),
            held: HashMap::new(),
            unsendable: HashSet::new(),
            deliveries: Vec::new(),
            events: Vec::new(),
            sent: Vec::new(),
            executed: Vec::new(),
            server_actions: Vec::new(),
        };
        cluster.head.start(t0);
        cluster.pump();
        cluster
    }

    fn submit(&mut self, command: &str, targets: &[Rank]) -> Result<Vec<RequestId>, RejectReason> {
        self.submit_request(SubmitRequest {
            command: command.into(),
            targets: targets.to_vec(),
            ..SubmitRequest::default()
        })
    }

    fn submit_request(&mut self, request: SubmitRequest) -> Result<Vec<RequestId>, RejectReason> {
        let result = self.head.submit(DRIVER, request).map_err(|e| match e {
            SubmitError::Rejected(r) => r.reason,
            SubmitError::Lease(e) => panic!("no leased ids were given: {e}"),
        });
        self.pump();
        result
    }

    /// Carries every action across until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(action) = self.head.poll_action() {
                moved = true;
                match action {
                    Action::Send { to, envelope } => {
                        self.sent.push((to, envelope.clone()));
                        if let Some(Body::CommandRequest(request)) = &envelope.body {
                            if self.unsendable.contains(&to) {
                                self.head.send_failed(
                                    request.id,
                                    FailureKind::TooLarge,
                                    "frame too large",
                                );
                                continue;
                            }
                        }
                        if self.stalled.contains(&to) {
                            self.held.entry(to).or_default().push(envelope);
                        } else {
                            let now = self.now;
                            self.servers
                                .get_mut(&to)
                                .unwrap()
                                .handle(0, envelope, now)
                                .unwrap();
                        }
                    }
                    Action::Deliver { driver, delivery } => {
                        self.deliveries.push((driver, *delivery))
                    }
                    Action::Event(event) => self.events.push(event),
                    Action::Forward(_) | Action::Stopped => {}
                }
            }
            let ranks: Vec<Rank> = self.servers.keys().copied().collect();
            for rank in ranks {
                if self.stalled.contains(&rank) {
                    continue;
                }
                while let Some(action) = self.servers.get_mut(&rank).unwrap().poll_action() {
                    moved = true;
                    match action {
                        ServerAction::Send(envelope) => {
                            let now = self.now;
                            self.head.handle(rank, envelope, now).unwrap();
                        }
                        ServerAction::Execute(request) => {
                            self.executed.push((rank, request.id));
                            self.running.insert(rank, request);
                        }
                        ServerAction::Configure(start) => {
                            // The worker is ready at once.
                            let now = self.now;
                            let server = self.servers.get_mut(&rank).unwrap();
                            server.configured(Some(1000 + rank as u32), now);
                            server.worker_ready(now);
                            self.server_actions
                                .push((rank, ServerAction::Configure(start)));
                        }
                        other => self.server_actions.push((rank, other)),
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// The worker of `rank` finishes its command.
    fn finish(&mut self, rank: Rank, ret: Value) -> RequestId {
        self.end(rank, true, Some(ret), None)
    }

    fn fail(&mut self, rank: Rank, traceback: &str) -> RequestId {
        self.end(rank, false, None, Some(traceback.into()))
    }

    fn end(&mut self, rank: Rank, ok: bool, ret: Option<Value>, tb: Option<String>) -> RequestId {
        let request = self.running.remove(&rank).expect("a command runs there");
        let now_epoch = EPOCH + (self.now - self.t0).as_secs_f64();
        let outcome = ExecOutcome {
            id: request.id,
            mode: CommandMode::Eval,
            ret,
            successful: ok,
            traceback: tb,
            start_time: now_epoch,
            stop_time: now_epoch,
            ..ExecOutcome::default()
        };
        let now = self.now;
        self.servers
            .get_mut(&rank)
            .unwrap()
            .finished(outcome, now)
            .unwrap();
        self.pump();
        request.id
    }

    /// Lets `d` pass in steps of 100 ms, ticking every core.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now = (self.now + Duration::from_millis(100)).min(end);
            let now = self.now;
            self.head.tick(now);
            for (rank, server) in self.servers.iter_mut() {
                if !self.stalled.contains(rank) {
                    server.tick(now);
                }
            }
            self.pump();
        }
    }

    fn stall(&mut self, rank: Rank) {
        self.stalled.insert(rank);
    }

    fn resume(&mut self, rank: Rank) {
        self.stalled.remove(&rank);
        let now = self.now;
        for envelope in self.held.remove(&rank).unwrap_or_default() {
            self.servers
                .get_mut(&rank)
                .unwrap()
                .handle(0, envelope, now)
                .unwrap();
        }
        self.pump();
    }

    fn response(&self, id: RequestId) -> &CommandResponse {
        let finals: Vec<_> = self
            .deliveries
            .iter()
            .filter(|(_, d)| !d.replaces_timeout)
            .filter_map(|(_, d)| d.response.as_ref())
            .filter(|r| r.id == id)
            .collect();
        assert_eq!(
            finals.len(),
            1,
            "request {id}: {} final responses",
            finals.len()
        );
        finals[0]
    }

    fn has_response(&self, id: RequestId) -> bool {
        self.deliveries
            .iter()
            .any(|(_, d)| d.response.as_ref().is_some_and(|r| r.id == id))
    }

    fn log_lines(&self) -> Vec<String> {
        self.events.iter().map(ToString::to_string).collect()
    }
}

#[test]
fn rule_2_the_command_push_is_push_mode_and_others_default_to_auto() {
    let mut c = Cluster::new(1);
    let ids = c.submit("push", &[1]).unwrap();
    assert_eq!(c.running[&1].mode(), CommandMode::Push);
    c.finish(1, Value::none());
    assert_eq!(
        c.response(ids[0]).mode(),
        CommandMode::Eval,
        "the server's mode is reported"
    );
    c.submit("a+b", &[1]).unwrap();
    assert_eq!(c.running[&1].mode(), CommandMode::Auto);
    c.finish(1, 3.into());
    c.submit_request(SubmitRequest {
        command: "x = 1".into(),
        mode: CommandMode::Exec.into(),
        targets: vec![1],
        ..SubmitRequest::default()
    })
    .unwrap();
    assert_eq!(c.running[&1].mode(), CommandMode::Exec);
}

#[test]
fn rule_3_parameters_travel_with_the_command_and_come_back_in_the_response() {
    let mut c = Cluster::new(1);
    let ids = c
        .submit_request(SubmitRequest {
            command: "a+b".into(),
            parameters: vec![Parameter::new("a", 1), Parameter::new("b", 2)],
            ..SubmitRequest::default()
        })
        .unwrap();
    assert_eq!(c.running[&1].parameters.len(), 2);
    c.finish(1, 3.into());
    let response = c.response(ids[0]);
    assert_eq!(
        response.parameters,
        vec![Parameter::new("a", 1), Parameter::new("b", 2)]
    );
    assert_eq!(response.command, "a+b");
    assert_eq!(response.ret, Some(Value::from(3)));
}

#[test]
fn rule_7_a_failure_carries_its_traceback_and_no_return_value() {
    let mut c = Cluster::new(1);
    let ids = c.submit("1/0", &[]).unwrap();
    c.fail(
        1,
        "Traceback (most recent call last):\nZeroDivisionError: division by zero",
    );
    let response = c.response(ids[0]);
    assert!(!response.successful);
    assert!(response.ret.as_ref().unwrap().is_none());
    assert!(response.traceback().contains("ZeroDivisionError"));
    assert_eq!(response.status(), CommandStatus::ResponseReceived);
}

#[test]
fn rule_9_a_response_record_has_every_field() {
    let mut c = Cluster::new(2);
    c.advance(Duration::from_millis(1500));
    let ids = c.submit("1+1", &[2]).unwrap();
    c.finish(2, 2.into());
    let r = c.response(ids[0]);
    assert_eq!(
        (r.id, r.command.as_str(), r.server, r.status(), r.successful),
        (ids[0], "1+1", 2, CommandStatus::ResponseReceived, true)
    );
    assert_eq!(r.mode(), CommandMode::Eval);
    assert_eq!(r.traceback, None);
    assert!(r.command_start_time >= EPOCH + 1.5 && r.command_stop_time >= r.command_start_time);
}

#[test]
fn rule_11_ids_are_unique_and_increasing() {
    let mut c = Cluster::new(3);
    let mut all = Vec::new();
    for targets in [&[][..], &[1, 2, 3], &[2], &[]] {
        all.extend(c.submit("1", targets).unwrap());
    }
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());
}

#[test]
fn rule_12_untargeted_requests_go_to_the_first_available_server_oldest_first() {
    let mut c = Cluster::new(2);
    let first = c.submit("a", &[]).unwrap()[0];
    let second = c.submit("b", &[]).unwrap()[0];
    let third = c.submit("c", &[]).unwrap()[0];
    let fourth = c.submit("d", &[]).unwrap()[0];
    assert_eq!(c.executed, vec![(1, first), (2, second)]);
    // Server 2 frees first: it takes the oldest waiting request.
    c.finish(2, Value::none());
    assert_eq!(c.executed.last(), Some(&(2, third)));
    c.finish(1, Value::none());
    assert_eq!(c.executed.last(), Some(&(1, fourth)));
}

#[test]
fn rule_13_one_request_per_target_in_list_order_and_fifo_per_server() {
    let mut c = Cluster::new(3);
    let ids = c.submit("x", &[3, 1]).unwrap();
    assert_eq!(ids.len(), 2);
    assert!(c.executed.contains(&(3, ids[0])) && c.executed.contains(&(1, ids[1])));
    assert_eq!(c.executed.len(), 2);
    // Server 3 is busy: its next two requests wait, then run in order.
    let later = [
        c.submit("y", &[3]).unwrap()[0],
        c.submit("z", &[3]).unwrap()[0],
    ];
    assert_eq!(c.executed.len(), 2);
    c.finish(3, Value::none());
    assert_eq!(c.executed.last(), Some(&(3, later[0])));
    c.finish(3, Value::none());
    assert_eq!(c.executed.last(), Some(&(3, later[1])));
}

#[test]
fn rule_13_a_server_takes_the_older_of_its_own_and_the_shared_queue() {
    let mut c = Cluster::new(1);
    c.submit("busy", &[1]).unwrap();
    let shared = c.submit("shared", &[]).unwrap()[0];
    let own = c.submit("own", &[1]).unwrap()[0];
    c.finish(1, Value::none());
    assert_eq!(c.executed.last(), Some(&(1, shared)));
    c.finish(1, Value::none());
    assert_eq!(c.executed.last(), Some(&(1, own)));
}

#[test]
fn rule_14_a_bad_target_rejects_the_whole_push() {
    let mut c = Cluster::new(2);
    for bad in [&[1, 3][..], &[0], &[-1, 1]] {
        let sent = c.sent.len();
        assert_eq!(c.submit("x", bad), Err(RejectReason::UnknownTarget));
        assert_eq!(c.sent.len(), sent, "a rejected push sent nothing");
        assert_eq!(c.head.pending(), 0, "a rejected push queued nothing");
    }
    let rejection = c
        .head
        .submit(
            DRIVER,
            SubmitRequest {
                command: "x".into(),
                targets: vec![9],
                ..SubmitRequest::default()
            },
        )
        .unwrap_err();
    let SubmitError::Rejected(rejection) = rejection else {
        panic!("a rejection, not {rejection:?}");
    };
    assert!(rejection.message.contains("9"), "{}", rejection.message);
    assert!(rejection.message.contains("1-2"), "{}", rejection.message);
    // The next accepted push takes the next id: rejections use none.
    assert_eq!(c.submit("x", &[1]), Ok(vec![1]));
}

#[test]
fn rule_14_a_timed_out_target_rejects_the_push() {
    let mut c = Cluster::new(2);
    c.stall(2);
    c.advance(Duration::from_secs(7));
    assert_eq!(c.submit("x", &[1, 2]), Err(RejectReason::TargetTimedOut));
    assert_eq!(c.head.pending(), 0);
}

#[test]
fn rule_15_a_busy_target_runs_after_its_first_command() {
    let mut c = Cluster::new(2);
    let first = c.submit("time.sleep(5); test_bs=1", &[1]).unwrap()[0];
    let pair = c.submit("test_bs+1", &[1, 2]).unwrap();
    // B runs at once and fails; A runs after its first command.
    assert_eq!(c.executed, vec![(1, first), (2, pair[1])]);
    c.fail(2, "NameError: name 'test_bs' is not defined");
    c.advance(Duration::from_secs(5));
    c.finish(1, Value::none());
    assert_eq!(c.executed.last(), Some(&(1, pair[0])));
    c.finish(1, 2.into());
    assert_eq!(c.response(pair[0]).ret, Some(Value::from(2)));
    assert!(c.response(pair[1]).traceback().contains("NameError"));
}

#[test]
fn rule_17_tracking_tells_queued_sent_done_and_unknown_apart() {
    let mut c = Cluster::new(1);
    let running = c.submit("a", &[]).unwrap()[0];
    let queued = c.submit("b", &[]).unwrap()[0];
    let states = c.head.track(&[running, queued, 99]).states;
    let view: Vec<_> = states.iter().map(|s| (s.status(), s.server)).collect();
    assert_eq!(
        view,
        vec![
            (CommandStatus::RequestSent, 1),
            (CommandStatus::HoldingQueue, 0),
            (CommandStatus::Unspecified, 0)
        ]
    );
    c.finish(1, Value::none());
    assert_eq!(
        c.head.track(&[running]).states[0].status(),
        CommandStatus::ResponseReceived
    );
}

#[test]
fn rule_19_every_server_is_pinged_every_heartbeat_and_answers_with_its_state() {
    let mut c = Cluster::new(3);
    let pings = |c: &Cluster| {
        c.sent
            .iter()
            .filter(|(_, e)| matches!(e.body, Some(Body::PingRequest(_))))
            .count()
    };
    // The first round goes out at the first tick.
    c.advance(Duration::from_millis(100));
    assert_eq!(pings(&c), 3);
    let at_start = pings(&c);
    c.advance(Duration::from_millis(3950));
    assert_eq!(
        pings(&c) - at_start,
        3 * 4,
        "one ping per server per heartbeat"
    );
    c.servers.get_mut(&2).unwrap().set_resources(4242, 123_456);
    c.submit("work()", &[2]).unwrap();
    c.advance(Duration::from_secs(1));
    let status = c.head.status(Some(2)).unwrap().servers.remove(0);
    assert_eq!(
        (status.worker_pid, status.rss, status.pid),
        (4242, 123_456, 102)
    );
    assert!(status.busy && status.command == "work()");
    assert!(status.command_start_time >= EPOCH + 4.0);
}

#[test]
fn rule_20_a_silent_server_is_timed_out_and_its_requests_answered() {
    let mut c = Cluster::new(2);
    let running = c.submit("long()", &[2]).unwrap()[0];
    let waiting = c.submit("next()", &[2]).unwrap()[0];
    let shared = c.submit("any()", &[]).unwrap()[0];
    c.stall(2);
    c.advance(Duration::from_millis(4900));
    assert!(!c.has_response(running), "not before the timeout");
    c.advance(Duration::from_millis(200));
    let r = c.response(running);
    assert_eq!(
        (r.status(), r.successful, r.server),
        (CommandStatus::Timeout, false, 2)
    );
    assert!(r.traceback().contains("Timeout"));
    assert_eq!(c.response(waiting).status(), CommandStatus::Timeout);
    // The untargeted request went to server 1 and is untouched.
    assert_eq!(
        c.executed.iter().find(|(_, id)| *id == shared),
        Some(&(1, shared))
    );
    let status = c.head.status(Some(2)).unwrap().servers.remove(0);
    assert!(status.timeout && !status.online);
    // Nothing new goes to the timed-out server.
    c.finish(1, Value::none());
    let more = c.submit("more()", &[]).unwrap()[0];
    assert_eq!(c.executed.last(), Some(&(1, more)));
}

#[test]
fn rule_20_once_every_server_has_left_for_good_untargeted_requests_are_answered() {
    let mut c = Cluster::new(2);
    let one = c.submit("long()", &[1]).unwrap()[0];
    let two = c.submit("long()", &[2]).unwrap()[0];
    // Sent ahead to server 1 (prefetch), then one waiting at the head node.
    let shared: Vec<RequestId> = (0..8).map(|_| c.submit("any()", &[]).unwrap()[0]).collect();
    // Server 1 is lost, but may still join again: its untargeted requests
    // wait for server 2.
    c.head.server_lost(1);
    c.pump();
    assert_eq!(c.response(one).status(), CommandStatus::Timeout);
    assert!(shared.iter().all(|&id| !c.has_response(id)));
    c.head.server_gone_for_good(1);
    c.pump();
    assert!(shared.iter().all(|&id| !c.has_response(id)));
    // Server 2 will not be started again, and its link closes.
    c.head.server_gone_for_good(2);
    c.pump();
    assert!(!c.has_response(two), "its running command is still its own");
    c.head.server_lost(2);
    c.pump();
    assert_eq!(c.response(two).status(), CommandStatus::Timeout);
    for &id in &shared {
        let r = c.response(id);
        assert_eq!((r.status(), r.server), (CommandStatus::Timeout, 0), "{r:?}");
        assert!(
            r.traceback().contains("no server is left"),
            "{}",
            r.traceback()
        );
    }
    assert!(
        c.log_lines()
            .iter()
            .any(|l| l.starts_with("No server is left: every server (n# 1-2)")),
        "{:?}",
        c.log_lines()
    );
    // New untargeted pushes are refused rather than left waiting.
    assert_eq!(c.submit("any()", &[]), Err(RejectReason::NoServers));
    assert_eq!(c.submit("any()", &[2]), Err(RejectReason::TargetTimedOut));
    // A server that joins with the rank after all counts again.
    let now = c.now;
    c.head.add_server(2, now).unwrap();
    c.servers.insert(
        2,
        ServerCore::new(
            ServerConfig {
                rank: 2,
                host: "node2".into(),
                pid: 202,
                kill_grace: GRACE,
                patience: None,
            },
            WallClock::new(c.t0, EPOCH),
            now,
        ),
    );
    c.pump();
    let again = c.submit("any()", &[]).unwrap()[0];
    assert_eq!(c.executed.last(), Some(&(2, again)));
}

#[test]
fn rule_20_the_head_nodes_own_stall_is_not_its_servers_silence() {
    let mut c = Cluster::new(2);
    let running = c.submit("long()", &[2]).unwrap()[0];
    c.advance(Duration::from_secs(1));
    // The head node does not run for 8 s (SIGSTOP, a debugger, swapping):
    // no tick, nothing read. Its servers ran and had nothing to say.
    c.now += Duration::from_secs(8);
    let now = c.now;
    c.head.tick(now);
    c.pump();
    assert!(
        !c.has_response(running),
        "no timeout for the node's own stall"
    );
    for server in c.head.status(None).unwrap().servers {
        assert!(server.online && !server.timeout, "{server:?}");
    }
    assert!(
        c.log_lines()
            .iter()
            .any(|l| l.starts_with("The head node did not run for 8.0 s")),
        "{:?}",
        c.log_lines()
    );
    // Silence after the stall still counts: a server that stays silent
    // times out a timeout later.
    c.stall(2);
    c.advance(Duration::from_millis(4800));
    assert!(!c.has_response(running));
    c.advance(Duration::from_millis(400));
    assert_eq!(c.response(running).status(), CommandStatus::Timeout);
    // A stall of two heartbeats or less is ordinary lateness.
    let mut c = Cluster::new(1);
    c.advance(Duration::from_secs(1));
    c.now += Duration::from_secs(2);
    let now = c.now;
    c.head.tick(now);
    c.pump();
    assert!(
        !c.log_lines().iter().any(|l| l.contains("did not run")),
        "{:?}",
        c.log_lines()
    );
}

#[test]
fn rule_21_a_recovered_server_is_online_again_and_its_real_response_replaces_the_timeout() {
    let mut c = Cluster::new(1);
    let id = c.submit("long()", &[1]).unwrap()[0];
    c.stall(1);
    c.advance(Duration::from_secs(7));
    assert_eq!(c.response(id).status(), CommandStatus::Timeout);
    assert_eq!(
        c.head.track(&[id]).states[0].status(),
        CommandStatus::Timeout
    );
    c.resume(1);
    assert!(c.head.status(Some(1)).unwrap().servers[0].online);
    assert!(
        c.log_lines()
            .iter()
            .any(|l| l == "Server n# 1 recovered from timeout")
    );
    c.finish(1, 42.into());
    let replacement = c
        .deliveries
        .iter()
        .find(|(_, d)| d.replaces_timeout)
        .and_then(|(_, d)| d.response.as_ref())
        .expect("a replacement");
    assert_eq!(
        (
            replacement.id,
            replacement.status(),
            replacement.ret.clone()
        ),
        (id, CommandStatus::ResponseReceived, Some(Value::from(42)))
    );
    // The server takes new work again.
    let next = c.submit("next()", &[1]).unwrap()[0];
    assert_eq!(c.executed.last(), Some(&(1, next)));
}

#[test]
fn rule_21_a_recovered_server_that_lost_its_command_is_freed_by_its_ping() {
    let mut c = Cluster::new(1);
    let id = c.submit("long()", &[1]).unwrap()[0];
    c.stall(1);
    c.advance(Duration::from_secs(7));
    // While stalled the worker died and the command vanished with it; the
    // server answers pings as idle once it resumes.
    c.running.remove(&1);
    let server = c.servers.get_mut(&1).unwrap();
    let outcome = ExecOutcome {
        id,
        successful: false,
        traceback: Some("worker killed".into()),
        worker_restarted: true,
        ..ExecOutcome::default()
    };
    server.finished(outcome, c.now).unwrap();
    c.resume(1);
    c.advance(Duration::from_secs(2));
    let replacement = c
        .deliveries
        .iter()
        .find(|(_, d)| d.replaces_timeout)
        .unwrap();
    assert!(replacement.1.response.as_ref().unwrap().worker_restarted);
    let next = c.submit("next()", &[1]).unwrap()[0];
    assert_eq!(c.executed.last(), Some(&(1, next)));
}

/// Rule 7: every failure says its kind, set by whichever core answered:
/// the command raised, was cancelled (queued or running), ran past its
/// deadline, lost its worker or its server, was too large to send, was
/// refused, or has no server left; a success says none.
#[test]
fn rule_7_every_failure_says_its_kind() {
    let kind = |c: &Cluster, id: RequestId| c.response(id).failure();
    let mut c = Cluster::new(3);
    let ok = c.submit("fine()", &[1]).unwrap()[0];
    c.finish(1, Value::from(1));
    assert_eq!(kind(&c, ok), FailureKind::None);
    let raised = c.submit("1/0", &[1]).unwrap()[0];
    c.fail(1, "ZeroDivisionError");
    assert_eq!(kind(&c, raised), FailureKind::Raised);
    // Cancelled while running, and while queued behind it.
    let running = c.submit("long()", &[1]).unwrap()[0];
    let queued = c.submit("next()", &[1]).unwrap()[0];
    c.head.cancel(&[running, queued]);
    c.pump();
    c.fail(1, "KeyboardInterrupt");
    assert_eq!(kind(&c, running), FailureKind::Cancelled);
    assert_eq!(kind(&c, queued), FailureKind::Cancelled);
    // Past its deadline.
    let late = c
        .submit_request(SubmitRequest {
            command: "while True: pass".into(),
            targets: vec![1],
            deadline_seconds: Some(1.0),
            ..SubmitRequest::default()
        })
        .unwrap()[0];
    c.advance(Duration::from_millis(1100));
    c.fail(1, "KeyboardInterrupt");
    assert_eq!(kind(&c, late), FailureKind::Deadline);
    // Its worker died: the executor says so, with the signal.
    let killed = c.submit("np.zeros(10**12)", &[2]).unwrap()[0];
    c.running.remove(&2);
    let outcome = ExecOutcome {
        id: killed,
        traceback: Some("Python worker died: killed by signal 9".into()),
        worker_restarted: true,
        failure: FailureKind::WorkerDied,
        worker_signal: Some(9),
        ..ExecOutcome::default()
    };
    let now = c.now;
    c.servers
        .get_mut(&2)
        .unwrap()
        .finished(outcome, now)
        .unwrap();
    c.pump();
    let r = c.response(killed);
    assert_eq!(
        (r.failure(), r.worker_signal, r.worker_exit_code),
        (FailureKind::WorkerDied, Some(9), None)
    );
    // Too large for the transport.
    c.unsendable.insert(3);
    let huge = c.submit("f(x)", &[3]).unwrap()[0];
    assert_eq!(kind(&c, huge), FailureKind::TooLarge);
    c.unsendable.remove(&3);
    // Refused at submission, with leased ids: the record says so.
    let lease = c.lease(DRIVER, 1);
    c.submit_as(DRIVER, pipelined("f()", &[7], &[lease.start]))
        .unwrap_err();
    assert_eq!(kind(&c, lease.start), FailureKind::Rejected);
    // Its server went silent.
    let silent = c.submit("long()", &[3]).unwrap()[0];
    c.stall(3);
    c.advance(Duration::from_secs(6));
    assert_eq!(kind(&c, silent), FailureKind::ServerLost);
    // No server left for an untargeted request.
    let waiting: Vec<RequestId> = (0..12)
        .map(|_| c.submit("any()", &[]).unwrap()[0])
        .collect();
    for rank in 1..=3 {
        c.head.server_gone_for_good(rank);
        c.head.server_lost(rank);
    }
    c.pump();
    let never_sent: Vec<RequestId> = waiting
        .iter()
        .copied()
        .filter(|&id| c.response(id).server == 0)
        .collect();
    assert!(!never_sent.is_empty());
    assert!(
        never_sent
            .iter()
            .all(|&id| kind(&c, id) == FailureKind::NoServer)
    );
}

#[test]
fn rule_22_debugging_mode_keeps_silent_servers_online() {
    let mut c = Cluster::new(1);
    let id = c.submit("pdb.set_trace()", &[1]).unwrap()[0];
    c.head.set_debugging(true, c.now);
    c.stall(1);
    c.advance(Duration::from_secs(30));
    assert!(!c.has_response(id));
    assert!(c.head.status(None).unwrap().servers[0].online);
    assert!(c.head.cluster_info().debugging);
    c.head.set_debugging(false, c.now);
    c.advance(Duration::from_millis(200));
    assert_eq!(c.response(id).status(), CommandStatus::Timeout);
}

#[test]
fn rule_23_status_lists_every_server_in_rank_order() {
    let mut c = Cluster::new(3);
    c.advance(Duration::from_secs(1));
    let reply = c.head.status(None).unwrap();
    let ranks: Vec<Rank> = reply.servers.iter().map(|s| s.rank).collect();
    assert_eq!(ranks, vec![1, 2, 3]);
    let s = &reply.servers[1];
    assert_eq!(
        (s.processor.as_str(), s.pid, s.busy, s.online, s.timeout),
        ("node2", 102, false, true, false)
    );
    assert!(s.last_ping >= EPOCH + 1.0);
    let cluster = reply.cluster.unwrap();
    assert_eq!(
        (cluster.world_size, cluster.server_ranks.clone()),
        (4, vec![1, 2, 3])
    );
    assert_eq!(
        (cluster.heartbeat_seconds, cluster.timeout_seconds),
        (1.0, 5.0)
    );
    assert!(c.head.status(Some(4)).is_err());
}

#[test]
fn rule_24_cancel_answers_queued_requests_and_interrupts_running_ones() {
    let mut c = Cluster::new(1);
    let running = c.submit("long()", &[1]).unwrap()[0];
    let queued = c.submit("next()", &[1]).unwrap()[0];
    let reply = c.head.cancel(&[running, queued, 99]);
    c.pump();
    assert_eq!(
        (reply.interrupting, reply.dequeued, reply.not_pending),
        (vec![running], vec![queued], vec![99])
    );
    assert_eq!(c.response(queued).status(), CommandStatus::Cancelled);
    assert!(c.server_actions.contains(&(
        1,
        ServerAction::Interrupt {
            id: running,
            reason: Interruption::Cancel
        }
    )));
    c.fail(1, "KeyboardInterrupt");
    let r = c.response(running);
    assert_eq!(r.status(), CommandStatus::Cancelled);
    assert!(r.traceback().starts_with("Cancelled"), "{}", r.traceback());
}

#[test]
fn rule_24_a_deadline_interrupts_then_kills_after_the_grace_period() {
    let mut c = Cluster::new(1);
    let id = c
        .submit_request(SubmitRequest {
            command: "while True: pass".into(),
            targets: vec![1],
            deadline_seconds: Some(3.0),
            ..SubmitRequest::default()
        })
        .unwrap()[0];
    c.server_actions.clear();
    c.advance(Duration::from_millis(2900));
    assert!(c.server_actions.is_empty());
    c.advance(Duration::from_millis(200));
    assert_eq!(
        c.server_actions,
        vec![(
            1,
            ServerAction::Interrupt {
                id,
                reason: Interruption::Deadline
            }
        )]
    );
    // The command ignores the interrupt: after the grace period, a kill.
    c.advance(GRACE);
    assert_eq!(
        c.server_actions.last(),
        Some(&(1, ServerAction::Kill { id }))
    );
    c.end(1, false, None, Some("worker killed by signal 9".into()));
    let r = c.response(id);
    assert_eq!(r.status(), CommandStatus::Timeout);
    assert!(
        r.traceback().contains("deadline of 3 s"),
        "{}",
        r.traceback()
    );
    // The server stays online: pings were answered all along.
    assert!(c.head.status(Some(1)).unwrap().servers[0].online);
}

#[test]
fn rule_24_the_cluster_default_deadline_applies_to_requests_without_one() {
    let config = HeadConfig {
        default_deadline: Some(Duration::from_secs(60)),
        ..HeadConfig::default()
    };
    let mut c = Cluster::with_config(1, config);
    c.submit("x", &[1]).unwrap();
    assert_eq!(c.running[&1].deadline_seconds, Some(60.0));
    let rejected = c.submit_request(SubmitRequest {
        command: "x".into(),
        deadline_seconds: Some(-1.0),
        ..SubmitRequest::default()
    });
    assert_eq!(rejected, Err(RejectReason::InvalidDeadline));
}

#[test]
fn rule_24_a_long_command_keeps_its_server_busy_but_online() {
    let mut c = Cluster::new(1);
    c.submit("tclean()", &[1]).unwrap();
    c.advance(Duration::from_secs(3600));
    let s = c.head.status(Some(1)).unwrap().servers.remove(0);
    assert!(s.busy && s.online && !s.timeout);
}

#[test]
fn rule_26_start_reaches_every_server_with_the_heads_settings() {
    let config = HeadConfig {
        start: Start {
            working_directory: "/data/run1".into(),
            log_level: LogLevel::Debug.into(),
            ..Start::default()
        },
        ..HeadConfig::default()
    };
    let c = Cluster::with_config(2, config);
    let configured: Vec<_> = c
        .server_actions
        .iter()
        .filter_map(|(rank, a)| match a {
            ServerAction::Configure(start) => Some((*rank, start.working_directory.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(configured.len(), 2);
    assert!(configured.iter().all(|(_, dir)| dir == "/data/run1"));
    let lines = c.log_lines();
    assert!(lines.contains(&"Server with rank 1 started at node1 with PID 101".to_owned()));
    assert!(lines.contains(&"Server with rank 2 started at node2 with PID 102".to_owned()));
    assert_eq!(c.servers[&1].log_level(), LogLevel::Debug);
}

#[test]
fn rule_26_requests_wait_for_servers_that_have_not_started() {
    let t0 = Instant::now();
    let mut head = HeadCore::new(HeadConfig::default(), WallClock::new(t0, EPOCH));
    head.add_server(1, t0).unwrap();
    head.start(t0);
    let id = head
        .submit(
            DRIVER,
            SubmitRequest {
                command: "x".into(),
                ..SubmitRequest::default()
            },
        )
        .unwrap()[0];
    let mut actions = Vec::new();
    head.drain_actions(&mut actions);
    assert!(actions.iter().all(|a| !matches!(a, Action::Send { envelope, .. } if matches!(envelope.body, Some(Body::CommandRequest(_))))));
    assert_eq!(
        head.track(&[id]).states[0].status(),
        CommandStatus::HoldingQueue
    );
}

#[test]
fn rule_27_graceful_stop_finishes_running_commands_and_refuses_new_ones() {
    let mut c = Cluster::new(2);
    let running = c.submit("long()", &[1]).unwrap()[0];
    let queued = c.submit("next()", &[1]).unwrap()[0];
    c.head.stop(false);
    c.pump();
    assert_eq!(c.response(queued).status(), CommandStatus::Cancelled);
    assert!(!c.head.is_stopped(), "server 1 still runs its command");
    assert!(c.servers[&2].is_stopped());
    assert_eq!(c.submit("x", &[]), Err(RejectReason::Stopped));
    c.finish(1, 1.into());
    assert_eq!(
        c.response(running).status(),
        CommandStatus::ResponseReceived
    );
    assert!(c.servers[&1].is_stopped());
    assert!(c.head.is_stopped());
    assert!(c.server_actions.contains(&(1, ServerAction::Exit)));
}

#[test]
fn rule_27_forced_stop_interrupts_running_commands() {
    let mut c = Cluster::new(1);
    let running = c.submit("long()", &[1]).unwrap()[0];
    c.head.stop(true);
    c.pump();
    assert!(c.server_actions.contains(&(
        1,
        ServerAction::Interrupt {
            id: running,
            reason: Interruption::Stop
        }
    )));
    c.fail(1, "KeyboardInterrupt");
    assert_eq!(c.response(running).status(), CommandStatus::Cancelled);
    assert!(c.head.is_stopped());
}

#[test]
fn rule_27_stop_does_not_wait_for_a_timed_out_server() {
    let mut c = Cluster::new(2);
    c.stall(2);
    c.advance(Duration::from_secs(7));
    c.head.stop(false);
    c.pump();
    assert!(c.head.is_stopped());
}

#[test]
fn rule_31_server_logs_carry_their_origin_and_obey_the_log_level() {
    let t0 = Instant::now();
    let config = ServerConfig {
        rank: 3,
        host: "almahpc02".into(),
        pid: 1,
        kill_grace: GRACE,
        patience: None,
    };
    let mut server = ServerCore::new(config, WallClock::new(t0, EPOCH), t0);
    let start = control_request::Action::Start(Start {
        log_level: LogLevel::Warning.into(),
        ..Start::default()
    });
    let envelope = Envelope::correlated(
        1,
        Body::ControlRequest(casa_node_protocol::pb::ControlRequest {
            action: Some(start),
        }),
    );
    server.handle(0, envelope, t0).unwrap();
    while server.poll_action().is_some() {}
    server.log(LogLevel::Info, "dropped", t0);
    server.log(LogLevel::Error, "kept", t0 + Duration::from_secs(2));
    let records: Vec<_> = std::iter::from_fn(|| server.poll_action())
        .filter_map(|a| match a {
            ServerAction::Send(Envelope {
                body: Some(Body::LogRecord(r)),
                ..
            }) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (
            records[0].origin.as_str(),
            records[0].rank,
            records[0].message.as_str()
        ),
        ("almahpc02:server-3", 3, "kept")
    );
    assert_eq!(records[0].time, EPOCH + 2.0);
}

#[test]
fn rule_31_the_log_level_changes_at_run_time() {
    let mut c = Cluster::new(2);
    c.head.set_log_level(LogLevel::Debug, &[2]).unwrap();
    c.pump();
    assert_eq!(c.servers[&2].log_level(), LogLevel::Debug);
    assert_eq!(c.servers[&1].log_level(), LogLevel::Info);
    assert!(c.head.set_log_level(LogLevel::Debug, &[5]).is_err());
}

#[test]
fn rule_32_the_head_logs_each_requests_life() {
    let mut c = Cluster::new(1);
    c.submit("a+b", &[1]).unwrap();
    c.finish(1, 3.into());
    c.submit("1/0", &[1]).unwrap();
    c.fail(1, "ZeroDivisionError: division by zero");
    let lines = c.log_lines();
    for expected in [
        "Command request with id# 1 sent to server n# 1",
        "Command request with id 1 successfully handled by server n# 1",
        "Command request with id# 2 sent to server n# 1",
        "Command request with id 2 failed in server n# 1 with traceback ZeroDivisionError: division by zero",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "no {expected:?} in {lines:#?}"
        );
    }
}

#[test]
fn a_server_answering_a_request_it_does_not_run_is_an_error_not_a_panic() {
    let mut c = Cluster::new(1);
    let bogus = Envelope::new(Body::CommandResponse(Box::new(CommandResponse {
        id: 5,
        ..CommandResponse::default()
    })));
    assert!(c.head.handle(1, bogus.clone(), c.now).is_err());
    assert!(c.head.handle(9, bogus, c.now).is_err());
    let mut old = Envelope::new(Body::PingRequest(Default::default()));
    old.protocol_version = 2;
    assert!(c.head.handle(1, old.clone(), c.now).is_err());
    assert!(
        c.servers
            .get_mut(&1)
            .unwrap()
            .handle(0, old, c.now)
            .is_err()
    );
}

#[test]
fn a_request_pending_while_many_others_pass_is_still_found() {
    // More requests than the ring holds go by while one runs for long.
    let mut c = Cluster::new(2);
    let long = c.submit("tclean()", &[1]).unwrap()[0];
    for _ in 0..70_000 {
        c.submit("1+1", &[2]).unwrap();
        c.finish(2, 2.into());
    }
    assert_eq!(
        c.head.track(&[long]).states[0].status(),
        CommandStatus::RequestSent
    );
    c.finish(1, Value::none());
    assert_eq!(c.response(long).command, "tclean()");
    assert_eq!(c.head.pending(), 0);
}

/// A pipelined submission of `command` to `targets` with leased `ids`.
fn pipelined(command: &str, targets: &[Rank], ids: &[RequestId]) -> SubmitRequest {
    SubmitRequest {
        command: command.into(),
        targets: targets.to_vec(),
        ids: ids.to_vec(),
        pipelined: true,
        ..SubmitRequest::default()
    }
}

impl Cluster {
    fn lease(&mut self, driver: DriverId, count: u32) -> std::ops::Range<RequestId> {
        let lease = self.head.lease(driver, count).expect("leased");
        lease.first..lease.first + RequestId::from(lease.count)
    }

    fn submit_as(
        &mut self,
        driver: DriverId,
        request: SubmitRequest,
    ) -> Result<Vec<RequestId>, SubmitError> {
        let result = self.head.submit(driver, request);
        self.pump();
        result
    }

    fn delivered_to(&self, driver: DriverId) -> Vec<&ResponseDelivery> {
        self.deliveries
            .iter()
            .filter(|(d, _)| *d == driver)
            .map(|(_, delivery)| delivery)
            .collect()
    }
}

const OTHER: DriverId = DriverId(8);

#[test]
fn rule_11_leases_are_disjoint_across_drivers_and_later_ones_are_higher() {
    let mut c = Cluster::new(2);
    let given = c.submit("1", &[]).unwrap()[0];
    let a = c.lease(DRIVER, 10);
    let b = c.lease(OTHER, 10);
    let a2 = c.lease(DRIVER, 10);
    assert!(given < a.start, "{given} then {a:?}");
    assert!(a.end <= b.start && b.end <= a2.start, "{a:?} {b:?} {a2:?}");
    // Ids the node gives itself come after every lease.
    let after = c.submit("1", &[]).unwrap()[0];
    assert!(after >= a2.end, "{after} after {a2:?}");
    // Each driver's leased ids are accepted in its pushes, as given.
    let ids = c
        .submit_as(DRIVER, pipelined("1", &[1, 2], &[a.start, a.start + 1]))
        .unwrap();
    assert_eq!(ids, vec![a.start, a.start + 1]);
    let ids = c.submit_as(OTHER, pipelined("1", &[], &[b.start])).unwrap();
    assert_eq!(ids, vec![b.start]);
    // A lease gives at least one id and at most MAX_LEASE.
    assert_eq!(c.lease(DRIVER, 0).count(), 1);
    assert_eq!(c.lease(OTHER, u32::MAX).count(), MAX_LEASE as usize);
}

#[test]
fn rule_11_foreign_used_and_unleased_ids_are_protocol_errors_answered_as_failures() {
    let mut c = Cluster::new(2);
    let mine = c.lease(DRIVER, 4);
    let theirs = c.lease(OTHER, 4);
    c.submit_as(DRIVER, pipelined("1", &[], &[mine.start]))
        .unwrap();
    let sent = c.sent.len();
    let pending = c.head.pending();
    let cases: Vec<(SubmitRequest, LeaseError)> = vec![
        // Another driver's id.
        (
            pipelined("2", &[], &[theirs.start]),
            LeaseError::NotLeased(theirs.start),
        ),
        // An id already used.
        (
            pipelined("2", &[], &[mine.start]),
            LeaseError::NotLeased(mine.start),
        ),
        // An id never leased.
        (pipelined("2", &[], &[1000]), LeaseError::NotLeased(1000)),
        // Two ids for one request.
        (
            pipelined("2", &[], &[mine.start + 1, mine.start + 2]),
            LeaseError::WrongCount {
                given: 2,
                needed: 1,
            },
        ),
        // Ids out of order.
        (
            pipelined("2", &[1, 2], &[mine.start + 3, mine.start + 2]),
            LeaseError::NotIncreasing {
                earlier: mine.start + 3,
                later: mine.start + 2,
            },
        ),
    ];
    for (request, expected) in cases {
        let ids = request.ids.clone();
        let before = c.delivered_to(DRIVER).len();
        assert_eq!(
            c.submit_as(DRIVER, request),
            Err(SubmitError::Lease(expected))
        );
        // Each id is answered with a failure record, to this driver only.
        let delivered = &c.delivered_to(DRIVER)[before..];
        let answered: Vec<_> = delivered
            .iter()
            .map(|d| d.response.as_ref().unwrap().id)
            .collect();
        assert_eq!(answered, ids);
        for d in delivered {
            let r = d.response.as_ref().unwrap();
            assert!(!r.successful && r.status() == CommandStatus::ResponseReceived);
            assert!(
                r.traceback().starts_with("casa-node: protocol error:"),
                "{:?}",
                r.traceback
            );
            assert!(d.rejected.is_none());
        }
    }
    assert!(
        c.delivered_to(OTHER).is_empty(),
        "the other driver saw nothing"
    );
    assert_eq!(c.sent.len(), sent, "no violation sent anything");
    assert_eq!(c.head.pending(), pending, "no violation queued anything");
    // A pipelined push without ids is refused too.
    assert_eq!(
        c.submit_as(DRIVER, pipelined("2", &[], &[])),
        Err(SubmitError::Lease(LeaseError::NoIds))
    );
    // The other driver's id was not touched: it can still use it.
    assert_eq!(
        c.submit_as(OTHER, pipelined("3", &[], &[theirs.start])),
        Ok(vec![theirs.start])
    );
    // The ids of the out-of-order push were leased to the driver: they are
    // used up, never to be accepted.
    assert_eq!(
        c.submit_as(DRIVER, pipelined("4", &[], &[mine.start + 3])),
        Err(SubmitError::Lease(LeaseError::NotLeased(mine.start + 3)))
    );
}

#[test]
fn rule_14_a_rejected_pipelined_push_ends_as_a_failure_response_per_id() {
    let mut c = Cluster::new(2);
    let lease = c.lease(DRIVER, 8);
    let ids = [lease.start, lease.start + 1];
    let sent = c.sent.len();
    let result = c.submit_as(DRIVER, pipelined("x", &[1, 9], &ids));
    let Err(SubmitError::Rejected(rejection)) = result else {
        panic!("rejected, not {result:?}");
    };
    assert_eq!(rejection.reason, RejectReason::UnknownTarget);
    assert_eq!(c.sent.len(), sent, "nothing was sent");
    assert_eq!(c.head.pending(), 0, "nothing was queued");
    let delivered = c.delivered_to(DRIVER);
    assert_eq!(delivered.len(), 2);
    for (d, &id) in delivered.iter().zip(&ids) {
        let r = d.response.as_ref().unwrap();
        assert_eq!(r.id, id);
        assert_eq!(r.command, "x");
        assert_eq!(r.status(), CommandStatus::ResponseReceived);
        assert!(!r.successful);
        assert_eq!(
            r.traceback(),
            "rejected (UNKNOWN_TARGET): target 9 is not a server rank (server ranks: 1-2)"
        );
        let rejected = d.rejected.as_ref().expect("the rejection travels along");
        assert_eq!(rejected.reason(), RejectReason::UnknownTarget);
        assert_eq!(rejected.message, rejection.message);
    }
    // The ids are used: their tracking says answered, and they cannot be
    // used again.
    for state in c.head.track(&ids).states {
        assert_eq!(state.status(), CommandStatus::ResponseReceived);
    }
    assert_eq!(
        c.submit_as(DRIVER, pipelined("1", &[], &[ids[1]])),
        Err(SubmitError::Lease(LeaseError::NotLeased(ids[1])))
    );
    // A rejection decided outside the core (rule 2's syntax check) is
    // delivered the same way.
    let id = lease.start + 2;
    let before = c.delivered_to(DRIVER).len();
    let refused = c.head.refuse(
        DRIVER,
        pipelined("1 +* 2", &[], &[id]),
        Rejection {
            reason: RejectReason::InvalidCommand,
            message: "SyntaxError".into(),
        },
    );
    c.pump();
    assert!(matches!(refused, SubmitError::Rejected(_)), "{refused:?}");
    let delivered = &c.delivered_to(DRIVER)[before..];
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].response.as_ref().unwrap().id, id);
    assert_eq!(
        delivered[0].response.as_ref().unwrap().traceback(),
        "rejected (INVALID_COMMAND): SyntaxError"
    );
    // Not pipelined: the rejection goes back as a SubmitReply, so nothing
    // is delivered.
    let before = c.delivered_to(DRIVER).len();
    let mut request = pipelined("x", &[9], &[lease.start + 3]);
    request.pipelined = false;
    assert!(matches!(
        c.submit_as(DRIVER, request),
        Err(SubmitError::Rejected(_))
    ));
    assert_eq!(c.delivered_to(DRIVER).len(), before);
}

#[test]
fn rule_17_leased_ids_left_unused_are_unknown_to_tracking_and_die_with_the_driver() {
    let mut c = Cluster::new(1);
    let lease = c.lease(DRIVER, 4);
    // The first id is skipped: gaps are allowed.
    let used = lease.start + 1;
    c.submit_as(DRIVER, pipelined("1", &[], &[used])).unwrap();
    let view = |c: &Cluster| -> Vec<CommandStatus> {
        c.head
            .track(&[lease.start, used, lease.start + 2])
            .states
            .iter()
            .map(|s| s.status())
            .collect()
    };
    assert_eq!(
        view(&c),
        [
            CommandStatus::Unspecified,
            CommandStatus::RequestSent,
            CommandStatus::Unspecified
        ]
    );
    c.finish(1, Value::none());
    c.head.driver_gone(DRIVER);
    assert_eq!(
        view(&c),
        [
            CommandStatus::Unspecified,
            CommandStatus::ResponseReceived,
            CommandStatus::Unspecified
        ]
    );
    // The unused ids died with the connection.
    assert_eq!(
        c.submit_as(DRIVER, pipelined("1", &[], &[lease.start + 2])),
        Err(SubmitError::Lease(LeaseError::NotLeased(lease.start + 2)))
    );
}

#[test]
fn rule_11_a_driver_holds_a_bounded_number_of_leases() {
    let mut c = Cluster::new(1);
    for _ in 0..MAX_LEASES {
        c.lease(DRIVER, 1);
    }
    assert_eq!(c.head.lease(DRIVER, 1), Err(LeaseError::TooManyLeases));
    // Using a lease up frees its place.
    let lease = c.lease(OTHER, 1);
    c.submit_as(OTHER, pipelined("1", &[], &[lease.start]))
        .unwrap();
    for _ in 0..MAX_LEASES {
        c.lease(OTHER, 1);
    }
}

#[test]
fn rule_12_oldest_first_goes_by_arrival_not_by_id() {
    let mut c = Cluster::new(1);
    let low = c.lease(DRIVER, 4);
    let high = c.lease(OTHER, 4);
    c.submit("busy", &[1]).unwrap();
    // The higher id arrives first, then a lower one, shared and targeted.
    c.submit_as(OTHER, pipelined("first", &[], &[high.start]))
        .unwrap();
    c.submit_as(DRIVER, pipelined("second", &[1], &[low.start]))
        .unwrap();
    c.submit_as(DRIVER, pipelined("third", &[], &[low.start + 1]))
        .unwrap();
    c.finish(1, Value::none());
    assert_eq!(c.executed.last(), Some(&(1, high.start)));
    c.finish(1, Value::none());
    assert_eq!(c.executed.last(), Some(&(1, low.start)));
    c.finish(1, Value::none());
    assert_eq!(c.executed.last(), Some(&(1, low.start + 1)));
}

#[test]
fn an_unsendable_request_fails_without_vouching_for_its_server() {
    let mut c = Cluster::new(1);
    c.stall(1);
    c.unsendable.insert(1);
    c.advance(Duration::from_millis(4800));
    let unsent = c.submit("f(huge)", &[1]).unwrap()[0];
    let r = c.response(unsent);
    assert_eq!(
        (r.status(), r.successful),
        (CommandStatus::ResponseReceived, false)
    );
    assert!(
        r.traceback()
            .contains("could not be sent to server n# 1: frame too large")
    );
    // The failure is no sign of life: the silent server still times out.
    c.unsendable.clear();
    let held = c.submit("g()", &[1]).unwrap()[0];
    c.advance(Duration::from_millis(300));
    assert_eq!(c.response(held).status(), CommandStatus::Timeout);
    // A send failure to a timed-out server does not recover it.
    c.head
        .send_failed(held, FailureKind::TooLarge, "frame too large");
    c.pump();
    let lines = c.log_lines();
    assert!(!lines.iter().any(|l| l.contains("recovered")), "{lines:#?}");
    let status = c.head.status(Some(1)).unwrap().servers.remove(0);
    assert!(status.timeout && !status.online);
    assert_eq!(c.response(held).status(), CommandStatus::Timeout);
}

/// A head core expecting `expected` servers, with those of `ranks`
/// joined and services started; START requests are left in its actions.
fn starting_head(expected: usize, ranks: &[Rank]) -> (HeadCore, Instant) {
    let t0 = Instant::now();
    let config = HeadConfig {
        expected_servers: expected,
        ..HeadConfig::default()
    };
    let mut head = HeadCore::new(config, WallClock::new(t0, EPOCH));
    for &rank in ranks {
        head.add_server(rank, t0).unwrap();
    }
    head.start(t0);
    (head, t0)
}

/// Answers every START among the head node's actions from the servers in
/// `answering`; returns the events the head node emitted meanwhile.
fn answer_starts(head: &mut HeadCore, answering: &[Rank], now: Instant) -> Vec<Event> {
    let mut actions = Vec::new();
    head.drain_actions(&mut actions);
    let mut events = Vec::new();
    for action in actions {
        match action {
            Action::Send { to, envelope } if answering.contains(&to) => {
                if let Some(Body::ControlRequest(ControlRequest {
                    action: Some(control_request::Action::Start(_)),
                })) = envelope.body
                {
                    let reply = Envelope::correlated(
                        envelope.correlation,
                        Body::ControlResponse(ControlResponse {
                            ok: true,
                            rank: to,
                            ..ControlResponse::default()
                        }),
                    );
                    head.handle(to, reply, now).unwrap();
                }
            }
            Action::Event(event) => events.push(event),
            _ => {}
        }
    }
    while let Some(action) = head.poll_action() {
        if let Action::Event(event) = action {
            events.push(event);
        }
    }
    events
}

fn readiness(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| **e == Event::AllServersStarted)
        .count()
}

#[test]
fn rule_26_the_cluster_is_ready_once_the_expected_servers_joined_and_started() {
    let (mut head, t0) = starting_head(2, &[1]);
    let events = answer_starts(&mut head, &[1], t0);
    assert_eq!(readiness(&events), 0, "one of two servers: {events:?}");
    assert!(!head.is_ready());
    head.add_server(2, t0).unwrap();
    let events = answer_starts(&mut head, &[2], t0);
    assert_eq!(readiness(&events), 1, "{events:?}");
    assert!(head.is_ready());
    // A server joining later starts, but readiness is not announced again.
    head.add_server(3, t0).unwrap();
    let events = answer_starts(&mut head, &[3], t0);
    assert_eq!(readiness(&events), 0, "{events:?}");
}

#[test]
fn rule_26_a_server_lost_before_starting_does_not_block_readiness() {
    let (mut head, t0) = starting_head(2, &[1, 2]);
    let events = answer_starts(&mut head, &[1], t0);
    assert_eq!(
        readiness(&events),
        0,
        "server 2 has not answered: {events:?}"
    );
    head.server_lost(2);
    let events = answer_starts(&mut head, &[], t0);
    assert_eq!(readiness(&events), 1, "{events:?}");
    assert!(head.is_ready());
}

/// A lone server core, started at `t0` (START taken, its answer drained).
fn started_server(patience: Option<Duration>) -> (ServerCore, Instant) {
    let t0 = Instant::now();
    let config = ServerConfig {
        rank: 1,
        host: "node1".into(),
        pid: 101,
        kill_grace: GRACE,
        patience,
    };
    let mut server = ServerCore::new(config, WallClock::new(t0, EPOCH), t0);
    let start = Envelope::correlated(
        1,
        Body::ControlRequest(ControlRequest {
            action: Some(control_request::Action::Start(Start::default())),
        }),
    );
    server.handle(0, start, t0).unwrap();
    while server.poll_action().is_some() {}
    (server, t0)
}

fn server_actions(server: &mut ServerCore) -> Vec<ServerAction> {
    std::iter::from_fn(|| server.poll_action()).collect()
}

#[test]
fn rule_24_a_deadline_counts_from_when_the_worker_takes_the_command_not_during_its_init() {
    let (mut server, t0) = started_server(None);
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let request = CommandRequest {
        id: 1,
        command: "time.sleep(0.5)".into(),
        deadline_seconds: Some(1.0),
        ..CommandRequest::default()
    };
    server
        .handle(0, Envelope::new(Body::CommandRequest(request)), t0)
        .unwrap();
    // The init script runs for 2 s: the command waits, its deadline not
    // counting, and pings say the server holds it.
    for ms in (100..2000).step_by(100) {
        server.tick(at(ms));
    }
    let ping = Envelope::new(Body::PingRequest(casa_node_protocol::pb::PingRequest {
        sequence: 1,
    }));
    server.handle(0, ping, at(1900)).unwrap();
    let actions = server_actions(&mut server);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, ServerAction::Execute(_) | ServerAction::Interrupt { .. })),
        "{actions:?}"
    );
    match actions.as_slice() {
        [
            ServerAction::Send(Envelope {
                body: Some(Body::PingResponse(pong)),
                ..
            }),
        ] => assert!(pong.busy && pong.command_id == 1, "{pong:?}"),
        other => panic!("expected a ping answer, got {other:?}"),
    }
    server.worker_ready(at(2000));
    let actions = server_actions(&mut server);
    assert!(
        matches!(actions.as_slice(), [ServerAction::Execute(r)] if r.id == 1),
        "{actions:?}"
    );
    // It runs 0.5 s of its 1 s.
    for ms in (2100..=2500).step_by(100) {
        server.tick(at(ms));
    }
    let outcome = ExecOutcome {
        id: 1,
        successful: true,
        ..ExecOutcome::default()
    };
    server.finished(outcome, at(2500)).unwrap();
    let actions = server_actions(&mut server);
    match actions.as_slice() {
        [
            ServerAction::Send(Envelope {
                body: Some(Body::CommandResponse(response)),
                ..
            }),
        ] => assert_eq!(
            (response.status(), response.successful),
            (CommandStatus::ResponseReceived, true)
        ),
        other => panic!("expected only the response, got {other:?}"),
    }
}

#[test]
fn rule_30_a_server_gives_up_on_a_silent_head_node_after_its_patience_and_a_last_chance() {
    let limit = Duration::from_secs(5);
    let (mut server, t0) = started_server(Some(limit));
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    assert_eq!(server.poll_timeout(), Some(t0 + limit));
    server.tick(at(4900));
    server.tick(at(5000));
    assert!(server_actions(&mut server).is_empty());
    // A message during the last chance keeps the server.
    assert_eq!(server.poll_timeout(), Some(at(5000) + LAST_CHANCE));
    let ping = Envelope::new(Body::PingRequest(casa_node_protocol::pb::PingRequest {
        sequence: 1,
    }));
    server.handle(0, ping, at(5500)).unwrap();
    server_actions(&mut server);
    server.tick(at(6500));
    assert!(server_actions(&mut server).is_empty());
    // Silence for the limit and the last chance: the server gives up, once.
    server.tick(at(10_500));
    assert!(server_actions(&mut server).is_empty());
    server.tick(at(11_500));
    server.tick(at(12_000));
    assert_eq!(
        server_actions(&mut server),
        vec![ServerAction::HeadGone {
            silent_for: Duration::from_secs(6)
        }]
    );
    assert_eq!(server.poll_timeout(), None);
}

#[test]
fn rule_27_a_graceful_stop_lets_a_command_held_for_a_starting_worker_run() {
    let (mut server, t0) = started_server(None);
    let request = CommandRequest {
        id: 1,
        command: "x".into(),
        ..CommandRequest::default()
    };
    server
        .handle(0, Envelope::new(Body::CommandRequest(request)), t0)
        .unwrap();
    let stop = Envelope::correlated(
        2,
        Body::ControlRequest(ControlRequest {
            action: Some(control_request::Action::Stop(
                casa_node_protocol::pb::control_request::Stop { force: false },
            )),
        }),
    );
    server.handle(0, stop, t0).unwrap();
    assert!(
        server_actions(&mut server).is_empty(),
        "nothing before the worker is ready"
    );
    server.worker_ready(t0);
    let actions = server_actions(&mut server);
    assert!(
        matches!(actions.as_slice(), [ServerAction::Execute(r)] if r.id == 1),
        "{actions:?}"
    );
    let outcome = ExecOutcome {
        id: 1,
        successful: true,
        ..ExecOutcome::default()
    };
    server.finished(outcome, t0).unwrap();
    let actions = server_actions(&mut server);
    assert!(
        matches!(
            actions.as_slice(),
            [
                ServerAction::Send(Envelope { body: Some(Body::CommandResponse(r)), .. }),
                ServerAction::Send(Envelope { body: Some(Body::ControlResponse(ack)), .. }),
                ServerAction::Exit,
            ] if r.successful && ack.ok
        ),
        "{actions:?}"
    );
}

#[test]
fn rule_8_and_23_a_server_answers_start_with_its_workers_pid_saying_whether_it_reads_shared_memory()
{
    let t0 = Instant::now();
    let answer = |environment: Vec<casa_node_protocol::pb::EnvironmentVariable>| {
        let config = ServerConfig {
            rank: 1,
            host: "h".into(),
            pid: 1,
            kill_grace: GRACE,
            patience: None,
        };
        let mut server = ServerCore::new(config, WallClock::new(t0, EPOCH), t0);
        let start = control_request::Action::Start(Start {
            environment,
            ..Start::default()
        });
        let envelope = Envelope::correlated(
            7,
            Body::ControlRequest(casa_node_protocol::pb::ControlRequest {
                action: Some(start),
            }),
        );
        server.handle(0, envelope, t0).unwrap();
        // START is answered once the node has started the worker, with
        // its pid (rule 23).
        let before: Vec<_> = std::iter::from_fn(|| server.poll_action()).collect();
        assert!(
            matches!(before.as_slice(), [ServerAction::Configure(_)]),
            "{before:?}"
        );
        server.configured(Some(4242), t0);
        std::iter::from_fn(|| server.poll_action())
            .find_map(|a| match a {
                ServerAction::Send(Envelope {
                    correlation: 7,
                    body: Some(Body::ControlResponse(r)),
                    ..
                }) => Some(r),
                _ => None,
            })
            .expect("START is answered")
    };
    let var = |name: &str, value: &str| casa_node_protocol::pb::EnvironmentVariable {
        name: name.into(),
        value: value.into(),
    };
    // The server node leaves the directory in START only when it checked.
    let with = answer(vec![
        var(casa_node_protocol::SHM_DIR_VAR, "/dev/shm/casa-node-0-1-ab"),
        var(casa_node_protocol::SHM_TAG_VAR, "t"),
    ]);
    assert!(with.ok && with.shared_memory && with.worker_pid == 4242);
    let without = answer(vec![var("OTHER", "1")]);
    assert!(without.ok && !without.shared_memory && without.worker_pid == 4242);
}

fn prefetching(n: Rank, prefetch: usize) -> Cluster {
    Cluster::with_config(
        n,
        HeadConfig {
            prefetch,
            ..HeadConfig::default()
        },
    )
}

/// The servers `ids` were sent to, in order of sending.
fn sent_to(c: &Cluster, ids: &[RequestId]) -> Vec<(RequestId, Rank)> {
    c.sent
        .iter()
        .filter_map(|(to, e)| match &e.body {
            Some(Body::CommandRequest(r)) if ids.contains(&r.id) => Some((r.id, *to)),
            _ => None,
        })
        .collect()
}

fn status_of(c: &Cluster, id: RequestId) -> CommandStatus {
    c.head.track(&[id]).states[0].status()
}

fn recalls(c: &Cluster) -> Vec<(Rank, RequestId)> {
    c.sent
        .iter()
        .filter_map(|(to, e)| match &e.body {
            Some(Body::ControlRequest(ControlRequest {
                action: Some(control_request::Action::Recall(r)),
            })) => Some((*to, r.request_id)),
            _ => None,
        })
        .collect()
}

#[test]
fn rule_12_busy_servers_are_sent_requests_ahead_up_to_the_prefetch() {
    let mut c = prefetching(2, 3);
    let ids: Vec<RequestId> = (0..7)
        .map(|i| c.submit(&format!("c{i}"), &[]).unwrap()[0])
        .collect();
    // Idle servers first, then ahead to the one with the fewest in flight,
    // lowest rank first; the seventh waits at the head node.
    assert_eq!(
        sent_to(&c, &ids),
        vec![
            (ids[0], 1),
            (ids[1], 2),
            (ids[2], 1),
            (ids[3], 2),
            (ids[4], 1),
            (ids[5], 2)
        ]
    );
    assert_eq!(status_of(&c, ids[0]), CommandStatus::RequestSent);
    assert_eq!(status_of(&c, ids[2]), CommandStatus::HoldingQueue);
    assert_eq!(status_of(&c, ids[6]), CommandStatus::HoldingQueue);
    assert_eq!(c.head.status(None).unwrap().queued, 5);
    // The server runs what it was sent in order, one at a time, and the
    // head node refills it as each ends.
    assert_eq!(c.finish(1, Value::none()), ids[0]);
    assert_eq!(c.running[&1].id, ids[2]);
    assert_eq!(sent_to(&c, &ids[6..]), vec![(ids[6], 1)]);
    let status = c.head.status(Some(1)).unwrap();
    assert_eq!(status.servers[0].command_id, ids[2]);
    for _ in 0..3 {
        c.finish(1, Value::none());
        c.finish(2, Value::none());
    }
    for &id in &ids {
        assert!(c.response(id).successful, "request {id}");
    }
    assert_eq!(c.head.pending(), 0);
}

#[test]
fn rule_13_targeted_requests_go_ahead_in_order_behind_older_shared_ones() {
    let mut c = prefetching(1, 3);
    let a = c.submit("a", &[1]).unwrap()[0];
    let b = c.submit("b", &[]).unwrap()[0];
    let d = c.submit("d", &[1]).unwrap()[0];
    let e = c.submit("e", &[1]).unwrap()[0];
    assert_eq!(sent_to(&c, &[a, b, d, e]), vec![(a, 1), (b, 1), (d, 1)]);
    for expected in [a, b, d, e] {
        assert_eq!(c.finish(1, Value::none()), expected);
    }
}

#[test]
fn rule_12_a_request_sent_ahead_is_recalled_for_a_server_that_falls_idle() {
    let mut c = prefetching(2, 2);
    let long = c.submit("long()", &[]).unwrap()[0];
    let short = c.submit("short()", &[]).unwrap()[0];
    let ahead = c.submit("next()", &[]).unwrap()[0];
    assert_eq!(sent_to(&c, &[ahead]), vec![(ahead, 1)]);
    // Server 2 falls idle at once: the request has not waited a ping
    // round, so it stays where it is.
    assert_eq!(c.finish(2, Value::none()), short);
    assert!(recalls(&c).is_empty());
    // Once it has waited since before a round went out, it is taken back.
    c.advance(Duration::from_millis(1100));
    assert_eq!(recalls(&c), vec![(1, ahead)]);
    assert_eq!(sent_to(&c, &[ahead]), vec![(ahead, 1), (ahead, 2)]);
    assert_eq!(status_of(&c, ahead), CommandStatus::RequestSent);
    assert!(
        c.log_lines()
            .iter()
            .any(|l| l.contains(&format!("id# {ahead} taken back from server n# 1")))
    );
    assert_eq!(c.finish(2, Value::none()), ahead);
    // Server 1 never ran it; its long command ends normally.
    assert_eq!(c.finish(1, Value::none()), long);
    assert!(!c.executed.contains(&(1, ahead)));
    assert_eq!(c.response(ahead).server, 2);
    assert_eq!(c.head.pending(), 0);
}

/// Two servers, prefetch 2: server 1 runs `long` with `ahead` sent after
/// it; server 2 fell idle, and the recall of `ahead` is on its way to
/// server 1, which reads nothing (stalled). Returns (cluster, long, ahead).
fn recall_on_its_way() -> (Cluster, RequestId, RequestId) {
    let mut c = prefetching(2, 2);
    let long = c.submit("long()", &[]).unwrap()[0];
    let short = c.submit("short()", &[]).unwrap()[0];
    let ahead = c.submit("next()", &[]).unwrap()[0];
    assert_eq!(c.finish(2, Value::none()), short);
    c.stall(1);
    c.advance(Duration::from_millis(1100));
    assert_eq!(recalls(&c), vec![(1, ahead)]);
    (c, long, ahead)
}

#[test]
fn rule_12_a_recall_that_comes_too_late_leaves_the_request_where_it_runs() {
    // Server 1 finishes its command and starts the one sent ahead before
    // it reads the recall.
    let (mut c, long, ahead) = recall_on_its_way();
    assert_eq!(c.finish(1, Value::none()), long);
    c.resume(1);
    assert_eq!(c.running[&1].id, ahead);
    assert_eq!(c.finish(1, Value::none()), ahead);
    assert_eq!(c.response(ahead).server, 1);
    assert_eq!(sent_to(&c, &[ahead]), vec![(ahead, 1)]);
    assert_eq!(c.head.pending(), 0);
}

#[test]
fn rule_24_cancelling_a_request_sent_ahead_answers_it_at_once() {
    let mut c = prefetching(1, 3);
    let running = c.submit("long()", &[1]).unwrap()[0];
    let ahead = c.submit("next()", &[1]).unwrap()[0];
    let reply = c.head.cancel(&[ahead]);
    assert_eq!(
        (reply.dequeued, reply.interrupting),
        (vec![ahead], Vec::<RequestId>::new())
    );
    c.pump();
    let r = c.response(ahead);
    assert_eq!(r.status(), CommandStatus::Cancelled);
    assert!(
        r.traceback().starts_with("Cancelled before"),
        "{}",
        r.traceback()
    );
    // The server dropped it too, and its answer was not passed on twice.
    assert_eq!(c.finish(1, Value::none()), running);
    assert!(!c.executed.contains(&(1, ahead)));
    assert_eq!(c.head.pending(), 0);
}

#[test]
fn rule_20_requests_sent_ahead_to_a_timed_out_server_go_elsewhere_or_time_out() {
    let mut c = prefetching(2, 3);
    let first = c.submit("long()", &[1]).unwrap()[0];
    let other = c.submit("long()", &[2]).unwrap()[0];
    let shared = c.submit("any()", &[]).unwrap()[0];
    let targeted = c.submit("mine()", &[1]).unwrap()[0];
    assert_eq!(
        sent_to(&c, &[shared, targeted]),
        vec![(shared, 1), (targeted, 1)]
    );
    c.stall(1);
    c.advance(Duration::from_secs(6));
    assert_eq!(c.response(first).status(), CommandStatus::Timeout);
    let t = c.response(targeted);
    assert_eq!((t.status(), t.server), (CommandStatus::Timeout, 0));
    assert!(
        t.traceback()
            .contains("timed out before the command was started")
    );
    // The shared one waits for a server with room: server 2.
    assert_eq!(sent_to(&c, &[shared]), vec![(shared, 1), (shared, 2)]);
    assert!(recalls(&c).contains(&(1, shared)) && recalls(&c).contains(&(1, targeted)));
    assert_eq!(c.finish(2, Value::none()), other);
    assert_eq!(c.finish(2, Value::none()), shared);
    // Server 1 resumes and drops both; its long command's answer replaces
    // the timeout record (rule 21).
    c.resume(1);
    c.finish(1, Value::none());
    assert!(!c.executed.contains(&(1, shared)) && !c.executed.contains(&(1, targeted)));
    assert_eq!(c.response(shared).server, 2);
    assert_eq!(c.head.pending(), 0);
}

#[test]
fn rule_12_server_drops_a_recalled_request_only_while_it_waits() {
    let mut c = prefetching(1, 2);
    let running = c.submit("long()", &[]).unwrap()[0];
    let ahead = c.submit("next()", &[]).unwrap()[0];
    let recall = |c: &mut Cluster, id: RequestId| {
        let now = c.now;
        let server = c.servers.get_mut(&1).unwrap();
        server
            .handle(
                0,
                Envelope::correlated(
                    99,
                    Body::ControlRequest(ControlRequest {
                        action: Some(control_request::Action::Recall(control_request::Recall {
                            request_id: id,
                        })),
                    }),
                ),
                now,
            )
            .unwrap();
        let mut replies = Vec::new();
        while let Some(action) = server.poll_action() {
            if let ServerAction::Send(Envelope {
                body: Some(Body::ControlResponse(r)),
                ..
            }) = action
            {
                replies.push(r);
            }
        }
        replies
    };
    let refused = recall(&mut c, running);
    assert!(!refused[0].ok && refused[0].error.contains("not waiting"));
    let taken = recall(&mut c, ahead);
    assert!(taken[0].ok);
    assert!(recall(&mut c, ahead)[0].error.contains("not waiting"));
}

#[test]
fn rule_12_requests_with_large_parameters_are_not_sent_ahead() {
    let mut c = prefetching(1, 4);
    let heavy = |name: &str| SubmitRequest {
        command: "len(x)".into(),
        parameters: vec![Parameter {
            name: name.into(),
            value: Some(Value::bytes(vec![
                7;
                casa_node_protocol::PREFETCH_MAX_BYTES
            ])),
        }],
        ..SubmitRequest::default()
    };
    let first = c.submit_request(heavy("x")).unwrap()[0];
    let second = c.submit_request(heavy("x")).unwrap()[0];
    let small = c.submit("1", &[]).unwrap()[0];
    // The second waits for the first to end, and the small one, younger,
    // waits behind it (oldest first).
    assert_eq!(sent_to(&c, &[first, second, small]), vec![(first, 1)]);
    assert_eq!(c.finish(1, Value::none()), first);
    assert_eq!(sent_to(&c, &[second, small]), vec![(second, 1), (small, 1)]);
    assert_eq!(c.finish(1, Value::none()), second);
    assert_eq!(c.finish(1, Value::none()), small);
}

#[test]
fn rule_27_a_request_recalled_while_services_stop_is_answered() {
    // Server 1 reads the recall only after STOP was sent.
    let (mut c, _, ahead) = recall_on_its_way();
    c.head.stop(false);
    c.pump();
    c.resume(1);
    let r = c.response(ahead);
    assert_eq!(r.status(), CommandStatus::Cancelled);
    assert!(
        r.traceback().contains("services were stopped"),
        "{}",
        r.traceback()
    );
    c.finish(1, Value::none());
    assert_eq!(c.head.pending(), 0);
    assert!(c.head.is_stopped());
}

#[test]
fn rule_33_a_request_queued_again_after_a_restart_takes_the_answer_of_the_server_that_ran_it() {
    let mut c = Cluster::new(1);
    let busy = c.submit("long()", &[]).unwrap()[0];
    // Queued again from the journal while server 1 is busy: it waits.
    c.head.continue_ids_from(100);
    let request = SubmitRequest {
        command: "again()".into(),
        ..SubmitRequest::default()
    };
    c.head.resubmit(DriverId(0), 50, request).unwrap();
    c.pump();
    assert!(!c.has_response(50));
    // Server 1 ran it for the head node before, and answers it now.
    let answer = CommandResponse {
        id: 50,
        ret: Some(Value::from(99)),
        successful: true,
        status: CommandStatus::ResponseReceived.into(),
        ..CommandResponse::default()
    };
    let now = c.now;
    c.head
        .handle(
            1,
            Envelope::new(Body::CommandResponse(Box::new(answer))),
            now,
        )
        .unwrap();
    c.pump();
    let r = c.response(50);
    assert_eq!((r.ret.clone(), r.server), (Some(Value::from(99)), 1));
    // It does not run again: server 1 goes from `long()` to nothing.
    c.finish(1, Value::none());
    assert_eq!(c.executed.iter().filter(|(_, id)| *id == 50).count(), 0);
    assert_eq!(c.executed, vec![(1, busy)]);
    // And ids go on above the journal's.
    assert!(c.submit("next()", &[]).unwrap()[0] >= 100);
}
