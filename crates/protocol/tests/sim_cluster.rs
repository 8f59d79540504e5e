//! A simulated cluster: one `HeadCore` and up to 10 000 `ServerCore`s in
//! one process, joined by an in-memory network with random per-message
//! delay (links stay FIFO, as transports guarantee), servers that stall
//! (like SIGSTOP) and recover, commands that succeed, fail or get
//! cancelled, and drivers that submit good and bad pushes.
//!
//! Properties checked after every run (SEMANTICS rule numbers):
//! - every accepted request gets exactly one final response (11, 20);
//! - requests to one server run in submission order, and untargeted ones
//!   are first sent oldest first, with 1 to 4 in flight per server (12,
//!   13);
//! - nothing is sent to a server while it is marked timed out (20);
//! - a recovered server's real response replaces its timeout record (21);
//! - a rejected push queues nothing (14);
//! - stop services, at the end or mid-stream, ends with every server
//!   stopped or timed out (27).

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{CommandMode, CommandStatus, Envelope, Parameter, SubmitRequest};
use casa_node_protocol::{
    Action, DriverId, Event, ExecOutcome, HeadConfig, HeadCore, Rank, RequestId, ServerAction,
    ServerConfig, ServerCore, WallClock,
};
use proptest::prelude::*;

const HEARTBEAT: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(5);
/// A run that has not settled by then has hung.
const HORIZON: Duration = Duration::from_secs(900);

/// SplitMix64: a small deterministic generator seeded by proptest.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.below(max + 1))
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    servers: usize,
    drivers: u64,
    submissions: usize,
    stalls: usize,
    max_delay_ms: u64,
    seed: u64,
    /// Requests in flight per server (rule 12's prefetch).
    prefetch: usize,
    /// When services are stopped, in ms, if before the run settles.
    stop_at_ms: Option<u64>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let servers = prop_oneof![
        12 => 1usize..=6,
        4 => 7usize..=64,
        1 => 65usize..=10_000,
    ];
    (
        servers,
        1u64..=3,
        1usize..=60,
        0usize..=4,
        0u64..=300,
        any::<u64>(),
        1usize..=4,
        prop::option::weighted(0.3, 0u64..=40_000),
    )
        .prop_map(
            |(servers, drivers, submissions, stalls, max_delay_ms, seed, prefetch, stop_at_ms)| {
                Scenario {
                    servers,
                    drivers,
                    submissions,
                    stalls,
                    max_delay_ms,
                    seed,
                    prefetch,
                    stop_at_ms,
                }
            },
        )
}

// Messages are most of the events, so they are not boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum SimEvent {
    /// An envelope arrives at `to`.
    Message {
        from: Rank,
        to: Rank,
        envelope: Envelope,
    },
    /// The worker of `rank` finishes the command it runs (`generation`
    /// tells a stale completion from the current one).
    ExecDone {
        rank: Rank,
        generation: u64,
    },
    HeadTick,
    /// The driver script's next operation.
    DriverOp(usize),
    /// Services are stopped, mid-stream (rule 27).
    Stop,
}

#[derive(Debug, Clone)]
enum DriverOp {
    Submit {
        driver: DriverId,
        targets: Vec<Rank>,
        work_ms: u64,
        fails: bool,
    },
    /// Cancel the request with this position among the accepted ones.
    Cancel(usize),
}

struct SimServer {
    core: ServerCore,
    /// Intervals during which the server neither reads nor runs.
    stalls: Vec<(Duration, Duration)>,
    /// The command its worker runs: id, generation, whether interrupted.
    running: Option<(RequestId, u64, bool)>,
    generation: u64,
}

#[derive(Default)]
struct Record {
    accepted: HashMap<RequestId, (DriverId, Option<Rank>, String)>,
    accepted_order: Vec<RequestId>,
    finals: HashMap<RequestId, Vec<(DriverId, casa_node_protocol::pb::CommandResponse)>>,
    replacements: HashMap<RequestId, Vec<casa_node_protocol::pb::CommandResponse>>,
    /// Ids of CommandRequests the head node sent, per server, in order.
    sent: HashMap<Rank, Vec<RequestId>>,
    untargeted_sent: Vec<RequestId>,
    /// (id, server) of responses the head node received from servers.
    responses_received: HashSet<(RequestId, Rank)>,
    /// Servers the head node had marked timed out, as it reported.
    timed_out: BTreeSet<Rank>,
    rejections: usize,
    stopped: bool,
}

struct Sim {
    base: Instant,
    now: Duration,
    rng: Rng,
    max_delay: u64,
    head: HeadCore,
    servers: Vec<SimServer>,
    heap: BinaryHeap<Reverse<(Duration, u64)>>,
    events: HashMap<u64, SimEvent>,
    seq: u64,
    link_clock: HashMap<(Rank, Rank), Duration>,
    next_head_tick: Option<Duration>,
    ops: Vec<(Duration, DriverOp)>,
    ops_done: usize,
    record: Record,
}

impl Sim {
    fn new(s: &Scenario) -> Sim {
        let base = Instant::now();
        let mut rng = Rng(s.seed);
        let clock = WallClock::new(base, 1_700_000_000.0);
        let config = HeadConfig {
            heartbeat: HEARTBEAT,
            timeout: TIMEOUT,
            prefetch: s.prefetch,
            ..HeadConfig::default()
        };
        let mut head = HeadCore::new(config, clock);
        let mut servers = Vec::with_capacity(s.servers + 1);
        servers.push(SimServer {
            core: ServerCore::new(server_config(0), clock, base),
            stalls: Vec::new(),
            running: None,
            generation: 0,
        });
        for rank in 1..=s.servers as Rank {
            head.add_server(rank, base).unwrap();
            servers.push(SimServer {
                core: ServerCore::new(server_config(rank), clock, base),
                stalls: Vec::new(),
                running: None,
                generation: 0,
            });
        }
        for _ in 0..s.stalls {
            let rank = 1 + rng.below(s.servers as u64) as usize;
            let start = rng.millis(40_000);
            let length = rng.millis(12_000);
            servers[rank].stalls.push((start, start + length));
        }
        let mut ops = Vec::new();
        let mut at = Duration::ZERO;
        for _ in 0..s.submissions {
            at += rng.millis(2_000);
            let driver = DriverId(rng.below(s.drivers));
            let targets = match rng.below(10) {
                0..=4 => Vec::new(),
                5..=8 => (0..1 + rng.below(3))
                    .map(|_| 1 + rng.below(s.servers.min(8) as u64) as Rank)
                    .collect(),
                // A bad target somewhere in the list: the whole push is refused.
                _ => vec![1, [0, -1, s.servers as Rank + 1][rng.below(3) as usize]],
            };
            let work_ms = rng.below(4_000);
            let fails = rng.chance(20);
            ops.push((
                at,
                DriverOp::Submit {
                    driver,
                    targets,
                    work_ms,
                    fails,
                },
            ));
            if rng.chance(10) {
                ops.push((
                    at + rng.millis(1_000),
                    DriverOp::Cancel(rng.below(64) as usize),
                ));
            }
        }
        ops.sort_by_key(|(at, _)| *at);
        let mut sim = Sim {
            base,
            now: Duration::ZERO,
            rng,
            max_delay: s.max_delay_ms,
            head,
            servers,
            heap: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            link_clock: HashMap::new(),
            next_head_tick: None,
            ops,
            ops_done: 0,
            record: Record::default(),
        };
        for i in 0..sim.ops.len() {
            let at = sim.ops[i].0;
            sim.schedule(at, SimEvent::DriverOp(i));
        }
        if let Some(ms) = s.stop_at_ms {
            sim.schedule(Duration::from_millis(ms), SimEvent::Stop);
        }
        sim
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn schedule(&mut self, at: Duration, event: SimEvent) {
        self.seq += 1;
        self.events.insert(self.seq, event);
        self.heap.push(Reverse((at, self.seq)));
    }

    /// Sends over a FIFO link with random delay.
    fn transmit(&mut self, from: Rank, to: Rank, envelope: Envelope) {
        let delay = self.rng.millis(self.max_delay);
        let last = self.link_clock.entry((from, to)).or_default();
        let at = (self.now + delay).max(*last);
        *last = at;
        self.schedule(at, SimEvent::Message { from, to, envelope });
    }

    /// The end of the stall `rank` is in at time `at`, if any.
    fn stalled_until(&self, rank: Rank, at: Duration) -> Option<Duration> {
        self.servers[rank as usize]
            .stalls
            .iter()
            .filter(|(a, b)| *a <= at && at < *b)
            .map(|(_, b)| *b)
            .max()
    }

    fn run(&mut self) {
        self.head.start(self.instant());
        self.pump_head();
        while let Some(Reverse((at, seq))) = self.heap.pop() {
            assert!(
                at <= HORIZON,
                "the simulation did not settle within {HORIZON:?}"
            );
            let event = self.events.remove(&seq).expect("scheduled");
            // A stalled server handles nothing until it resumes.
            let target = match &event {
                SimEvent::Message { to, .. } if *to != 0 => Some(*to),
                SimEvent::ExecDone { rank, .. } => Some(*rank),
                _ => None,
            };
            if let Some(rank) = target {
                if let Some(until) = self.stalled_until(rank, at) {
                    // Keeping the sequence number keeps the link's order
                    // among everything else that arrives at `until`.
                    self.events.insert(seq, event);
                    self.heap.push(Reverse((until, seq)));
                    continue;
                }
            }
            self.now = at;
            match event {
                SimEvent::Message {
                    from,
                    to: 0,
                    envelope,
                } => self.head_receives(from, envelope),
                SimEvent::Message { to, envelope, .. } => {
                    let now = self.instant();
                    self.servers[to as usize]
                        .core
                        .handle(0, envelope, now)
                        .unwrap();
                    self.pump_server(to);
                }
                SimEvent::ExecDone { rank, generation } => self.exec_done(rank, generation),
                SimEvent::HeadTick => {
                    if self.next_head_tick == Some(at) {
                        self.next_head_tick = None;
                    }
                    self.head.tick(self.instant());
                }
                SimEvent::DriverOp(i) => self.driver_op(i),
                SimEvent::Stop => {
                    if !self.head.is_stopped() && !self.stopping() {
                        self.head.stop(false);
                    }
                }
            }
            self.pump_head();
            if self.settled() && !self.head.is_stopped() && !self.stopping() {
                self.head.stop(false);
                self.pump_head();
            }
        }
    }

    fn stopping(&self) -> bool {
        self.record.stopped
    }

    /// Every driver operation done and every request answered.
    fn settled(&self) -> bool {
        self.ops_done == self.ops.len() && self.head.pending() == 0
    }

    fn head_receives(&mut self, from: Rank, envelope: Envelope) {
        if let Some(Body::CommandResponse(r)) = &envelope.body {
            self.record.responses_received.insert((r.id, from));
        }
        let now = self.instant();
        self.head.handle(from, envelope, now).unwrap();
    }

    fn driver_op(&mut self, i: usize) {
        self.ops_done += 1;
        match self.ops[i].1.clone() {
            DriverOp::Submit {
                driver,
                targets,
                work_ms,
                fails,
            } => {
                let command = format!(
                    "work({work_ms}, fails={})",
                    if fails { "True" } else { "False" }
                );
                let request = SubmitRequest {
                    command: command.clone(),
                    mode: CommandMode::Eval.into(),
                    parameters: vec![Parameter::new("ms", work_ms as i64)],
                    targets: targets.clone(),
                    deadline_seconds: None,
                    ..SubmitRequest::default()
                };
                let before = (self.head.pending(), self.head.status(None).unwrap().queued);
                match self.head.submit(driver, request) {
                    Ok(ids) => {
                        let expected = if targets.is_empty() { 1 } else { targets.len() };
                        assert_eq!(ids.len(), expected, "rule 13: one request per target");
                        for (k, id) in ids.iter().enumerate() {
                            let target = targets.get(k).copied();
                            self.record
                                .accepted
                                .insert(*id, (driver, target, command.clone()));
                            self.record.accepted_order.push(*id);
                        }
                    }
                    Err(_) => {
                        self.record.rejections += 1;
                        // Rule 14: nothing was queued and nothing was sent.
                        let after = (self.head.pending(), self.head.status(None).unwrap().queued);
                        assert_eq!(before, after, "rule 14: a rejected push queued something");
                        assert_eq!(
                            self.head.poll_action(),
                            None,
                            "rule 14: a rejected push acted"
                        );
                    }
                }
            }
            DriverOp::Cancel(k) => {
                if let Some(&id) = self.record.accepted_order.get(k) {
                    self.head.cancel(&[id]);
                }
            }
        }
    }

    fn exec_done(&mut self, rank: Rank, generation: u64) {
        let server = &mut self.servers[rank as usize];
        let Some((id, current, interrupted)) = server.running else {
            return;
        };
        if current != generation {
            return;
        }
        server.running = None;
        let command = self
            .record
            .accepted
            .get(&id)
            .map(|a| a.2.clone())
            .unwrap_or_default();
        let successful = !interrupted && !command.contains("fails=True");
        let epoch = 1_700_000_000.0 + self.now.as_secs_f64();
        let outcome = ExecOutcome {
            id,
            mode: CommandMode::Eval,
            ret: Some(if successful { 2.into() } else { ().into() }),
            successful,
            traceback: (!successful).then(|| {
                if interrupted {
                    "KeyboardInterrupt".to_owned()
                } else {
                    "Traceback (most recent call last):\nZeroDivisionError: division by zero"
                        .to_owned()
                }
            }),
            start_time: epoch,
            stop_time: epoch,
            ..ExecOutcome::default()
        };
        let now = self.instant();
        self.servers[rank as usize]
            .core
            .finished(outcome, now)
            .unwrap();
        self.pump_server(rank);
    }

    fn pump_server(&mut self, rank: Rank) {
        while let Some(action) = self.servers[rank as usize].core.poll_action() {
            match action {
                ServerAction::Send(envelope) => self.transmit(rank, 0, envelope),
                ServerAction::Execute(request) => {
                    let work = request
                        .parameters
                        .iter()
                        .find(|p| p.name == "ms")
                        .and_then(|p| p.value.as_ref())
                        .and_then(|v| i64::try_from(v).ok())
                        .unwrap_or(0);
                    let server = &mut self.servers[rank as usize];
                    server.generation += 1;
                    let generation = server.generation;
                    server.running = Some((request.id, generation, false));
                    let at = self.now + Duration::from_millis(work as u64);
                    self.schedule(at, SimEvent::ExecDone { rank, generation });
                }
                ServerAction::Interrupt { id, .. } => {
                    let server = &mut self.servers[rank as usize];
                    if let Some((running, _, _)) = server.running {
                        assert_eq!(running, id, "interrupt for a command not running");
                        server.generation += 1;
                        let generation = server.generation;
                        server.running = Some((id, generation, true));
                        let at = self.now + Duration::from_millis(50);
                        self.schedule(at, SimEvent::ExecDone { rank, generation });
                    }
                }
                ServerAction::Kill { .. } => panic!("interrupts finish within the grace period"),
                ServerAction::Configure(_) => {
                    let now = self.instant();
                    let core = &mut self.servers[rank as usize].core;
                    core.configured(Some(1000 + rank as u32), now);
                    core.worker_ready(now);
                }
                ServerAction::SetLogLevel(_) | ServerAction::Exit => {}
                ServerAction::HeadGone { .. } => panic!("the head node pings every heartbeat"),
            }
        }
    }

    fn pump_head(&mut self) {
        while let Some(action) = self.head.poll_action() {
            match action {
                Action::Send { to, envelope } => {
                    if let Some(Body::CommandRequest(request)) = &envelope.body {
                        assert!(
                            !self.record.timed_out.contains(&to),
                            "rule 20: request {} sent to timed-out server {to}",
                            request.id
                        );
                        self.record.sent.entry(to).or_default().push(request.id);
                        if self
                            .record
                            .accepted
                            .get(&request.id)
                            .is_some_and(|a| a.1.is_none())
                        {
                            self.record.untargeted_sent.push(request.id);
                        }
                    }
                    self.transmit(0, to, envelope);
                }
                Action::Deliver { driver, delivery } => {
                    let response = delivery.response.expect("deliveries carry a response");
                    if delivery.replaces_timeout {
                        self.record
                            .replacements
                            .entry(response.id)
                            .or_default()
                            .push(response);
                    } else {
                        self.record
                            .finals
                            .entry(response.id)
                            .or_default()
                            .push((driver, response));
                    }
                }
                Action::Event(Event::ServerTimedOut { rank, .. }) => {
                    self.record.timed_out.insert(rank);
                }
                Action::Event(Event::ServerRecovered { rank }) => {
                    self.record.timed_out.remove(&rank);
                }
                Action::Event(Event::StoppingServices { .. }) => self.record.stopped = true,
                Action::Event(e) if std::env::var("SIM_TRACE").is_ok() => {
                    eprintln!("{:?} {e}", self.now)
                }
                Action::Event(_) | Action::Forward(_) => {}
                Action::Stopped => {}
            }
        }
        if let Some(at) = self.head.poll_timeout() {
            let at = at.saturating_duration_since(self.base).max(self.now);
            if self.next_head_tick.is_none_or(|t| at < t) {
                self.next_head_tick = Some(at);
                self.schedule(at, SimEvent::HeadTick);
            }
        }
    }

    fn check(&self) {
        let r = &self.record;
        // Rule 11: exactly one final response per accepted request, to the
        // driver that submitted it, for the command submitted.
        for (id, (driver, target, command)) in &r.accepted {
            let finals = r.finals.get(id).map_or(&[][..], Vec::as_slice);
            assert_eq!(
                finals.len(),
                1,
                "rule 11: request {id} got {} final responses",
                finals.len()
            );
            let (to, response) = &finals[0];
            assert_eq!(to, driver, "request {id} answered to the wrong driver");
            assert_eq!(&response.command, command);
            if let Some(target) = target {
                if response.server != 0 {
                    assert_eq!(
                        response.server, *target,
                        "rule 13: request {id} ran elsewhere"
                    );
                }
            }
        }
        assert_eq!(
            r.finals.len(),
            r.accepted.len(),
            "responses for ids never accepted"
        );
        // Rule 21: a timed-out record whose real answer reached the head node
        // was replaced, once, by that answer.
        for (id, finals) in &r.finals {
            let response = &finals[0].1;
            let replacements = r.replacements.get(id).map_or(0, Vec::len);
            let timed_out_running =
                response.status() == CommandStatus::Timeout && response.server != 0;
            if timed_out_running && r.responses_received.contains(&(*id, response.server)) {
                assert_eq!(
                    replacements, 1,
                    "rule 21: request {id}'s real response did not replace its timeout"
                );
                let replacement = &r.replacements[id][0];
                assert_ne!(replacement.status(), CommandStatus::Timeout);
                assert_eq!(replacement.server, response.server);
            } else {
                assert_eq!(
                    replacements, 0,
                    "request {id} was replaced without a timeout record"
                );
            }
        }
        // Rules 12-13: per-server FIFO for targeted requests, oldest first
        // for untargeted ones.
        for (rank, ids) in &r.sent {
            let targeted: Vec<RequestId> = ids
                .iter()
                .copied()
                .filter(|id| r.accepted.get(id).is_some_and(|a| a.1 == Some(*rank)))
                .collect();
            assert!(
                targeted.is_sorted(),
                "rule 13: server {rank} got {targeted:?}"
            );
        }
        // A request sent ahead and taken back is sent again later: the
        // order is that of first sends.
        let mut seen = HashSet::new();
        let first_sends: Vec<RequestId> = r
            .untargeted_sent
            .iter()
            .copied()
            .filter(|id| seen.insert(*id))
            .collect();
        assert!(
            first_sends.is_sorted(),
            "rule 12: untargeted order {first_sends:?}"
        );
        // Rule 27: services stopped.
        assert!(self.head.is_stopped(), "stop services did not complete");
    }
}

fn server_config(rank: Rank) -> ServerConfig {
    ServerConfig {
        rank,
        host: format!("node{rank}"),
        pid: 1000 + rank as u32,
        kill_grace: Duration::from_secs(5),
        patience: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn simulated_cluster_keeps_its_promises(s in scenario()) {
        let mut sim = Sim::new(&s);
        sim.run();
        sim.check();
    }
}

/// Rule 21 end to end: a server stalled past the timeout while running a
/// command is marked timed out, its request answered with status timeout,
/// and when it resumes its real response replaces the timeout record.
#[test]
fn rule_21_stalled_server_recovers_with_its_real_response() {
    let s = Scenario {
        servers: 1,
        drivers: 1,
        submissions: 0,
        stalls: 0,
        max_delay_ms: 0,
        seed: 1,
        prefetch: 1,
        stop_at_ms: None,
    };
    let mut sim = Sim::new(&s);
    sim.ops.push((
        Duration::from_millis(100),
        DriverOp::Submit {
            driver: DriverId(0),
            targets: vec![1],
            work_ms: 3_000,
            fails: false,
        },
    ));
    sim.schedule(Duration::from_millis(100), SimEvent::DriverOp(0));
    sim.servers[1]
        .stalls
        .push((Duration::from_millis(500), Duration::from_secs(15)));
    sim.run();
    sim.check();
    let finals = &sim.record.finals[&1];
    assert_eq!(finals[0].1.status(), CommandStatus::Timeout);
    assert!(finals[0].1.traceback().contains("Timeout"));
    let replacement = &sim.record.replacements[&1][0];
    assert_eq!(replacement.status(), CommandStatus::ResponseReceived);
    assert!(replacement.successful);
}

/// Rules 11 and 20 with requests sent ahead: request 42 is sent ahead to
/// server 4, taken off it as it times out, sent ahead to server 2, taken
/// off that one as it times out too, and run by server 1; server 4, on
/// resuming, starts it before it reads the recall. Its answer is dropped,
/// not refused as unknown, and 42 has one final response.
#[test]
fn a_request_taken_off_two_servers_in_turn_keeps_one_final_response() {
    let s = Scenario {
        servers: 4,
        drivers: 1,
        submissions: 37,
        stalls: 3,
        max_delay_ms: 0,
        seed: 15691771293347591500,
        prefetch: 3,
        stop_at_ms: None,
    };
    let mut sim = Sim::new(&s);
    sim.run();
    sim.check();
}
