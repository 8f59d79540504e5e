//! What the dashboard shows, kept by the head node's loop as requests
//! are accepted and answered: recent commands for the task stream,
//! counts over time for the progress chart, worker restarts, and the
//! Prometheus metrics. Everything is bounded: the page of a cluster that
//! ran a million commands shows the latest [`TASKS_KEPT`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use casa_node_protocol::pb::{CommandResponse, CommandStatus, LogRecord, StatusReply, Value};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use prost::Message;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::log::LogSink;

/// Answered commands kept for the task stream.
pub const TASKS_KEPT: usize = 20_000;
/// Of those, how many a page opening gets at once.
const TASKS_IN_SNAPSHOT: usize = 5_000;
/// Answered commands whose record (or traceback) a click can show.
pub const DETAILS_KEPT: usize = 2_000;
/// Progress samples kept, one a second: an hour.
const SAMPLES_KEPT: usize = 3_600;
/// Log records a page opening gets at once.
const LOGS_IN_SNAPSHOT: usize = 1_000;
/// Log records an update carries at most: the latest; a page shows 500.
const LOGS_PER_UPDATE: u64 = 250;
/// Characters of a command shown on its bar.
const COMMAND_CHARS: usize = 200;
/// Bytes of a traceback kept for a click.
const TRACEBACK_BYTES: usize = 16 * 1024;
/// A return value larger than this (encoded) is not kept for a click.
const RET_BYTES: usize = 2 * 1024;

/// How a command ended, as its bar is coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It ran and raised nothing.
    Success,
    /// It raised, its worker died, or it could not run.
    Failure,
    /// Its server timed out, or it ran past its deadline.
    Timeout,
    /// Cancelled, or services stopped before it ran.
    Cancelled,
}

impl Outcome {
    fn of(response: &CommandResponse) -> Outcome {
        match response.status() {
            CommandStatus::Timeout => Outcome::Timeout,
            CommandStatus::Cancelled => Outcome::Cancelled,
            _ if response.successful => Outcome::Success,
            _ => Outcome::Failure,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// One answered command, as the task stream draws it.
#[derive(Debug, Clone, Serialize)]
struct Task {
    /// Its place in the order answers arrived (the page skips what it
    /// has).
    seq: u64,
    id: u64,
    server: i32,
    /// Start and end, seconds since the epoch; 0 when it never ran.
    start: f64,
    stop: f64,
    outcome: Outcome,
    /// Shared by commands with the same text, as a map's are.
    command: Arc<str>,
}

/// The counts at one moment, for the progress chart.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    time: f64,
    submitted: u64,
    queued: u64,
    running: u64,
    done: u64,
    failed: u64,
}

/// A row of the server table.
#[derive(Debug, Serialize)]
struct ServerRow {
    rank: i32,
    host: String,
    state: &'static str,
    pid: u32,
    worker_pid: Option<u32>,
    command: Option<String>,
    command_id: Option<u64>,
    command_start: Option<f64>,
    rss: u64,
    restarts: u64,
    last_ping: f64,
}

#[derive(Debug, Serialize)]
struct LogLine {
    seq: u64,
    time: f64,
    level: &'static str,
    origin: String,
    rank: i32,
    message: String,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Totals {
    submitted: u64,
    success: u64,
    failure: u64,
    timeout: u64,
    cancelled: u64,
    queued: u64,
    running: u64,
    restarts: u64,
}

/// The page's view: a whole snapshot, or what changed since the last.
#[derive(Serialize)]
struct View {
    kind: &'static str,
    now: f64,
    servers: Vec<ServerRow>,
    tasks: Vec<Task>,
    samples: Vec<Sample>,
    logs: Vec<LogLine>,
    /// Records logged since the last update and left out of this one.
    logs_skipped: u64,
    totals: Totals,
}

/// Updates waiting for the thread that writes them out; one more is
/// skipped (its contents go with the next).
const UPDATES_WAITING: usize = 2;

/// Bytes and connections through the front door, counted where frames
/// are read and written.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes read from drivers.
    pub received: AtomicU64,
    /// Bytes written to drivers.
    pub sent: AtomicU64,
}

/// The metrics, registered once; counters move as commands are answered.
struct Metrics {
    registry: Registry,
    submitted: Counter,
    commands: Family<Vec<(String, String)>, Counter>,
    /// `commands`' counter of each outcome, found once.
    by_outcome: [Counter; 4],
    replaced: Counter,
    duration: Histogram,
    restarts: Counter,
    servers: Family<Vec<(String, String)>, Gauge>,
    queued: Gauge,
    running: Gauge,
    connections: Gauge,
    received: Counter,
    sent: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("casa_node");
        let m = Metrics {
            submitted: Counter::default(),
            commands: Family::default(),
            by_outcome: Default::default(),
            replaced: Counter::default(),
            duration: Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
                3600.0,
            ]),
            restarts: Counter::default(),
            servers: Family::default(),
            queued: Gauge::default(),
            running: Gauge::default(),
            connections: Gauge::default(),
            received: Counter::default(),
            sent: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "commands_submitted",
            "Requests accepted (one per id)",
            m.submitted.clone(),
        );
        registry.register(
            "commands",
            "Requests answered, by outcome (success, failure, timeout, cancelled)",
            m.commands.clone(),
        );
        registry.register(
            "timeouts_replaced",
            "Timeout records replaced by a recovered server's real answer (rule 21)",
            m.replaced.clone(),
        );
        registry.register_with_unit(
            "command_duration",
            "How long commands ran on their servers",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register(
            "worker_restarts",
            "Python workers started again after one died or was killed",
            m.restarts.clone(),
        );
        registry.register(
            "servers",
            "Servers by state (idle, busy, restarting, timed_out, offline)",
            m.servers.clone(),
        );
        registry.register(
            "queued_requests",
            "Requests accepted and not yet running",
            m.queued.clone(),
        );
        registry.register(
            "running_commands",
            "Commands running on servers",
            m.running.clone(),
        );
        registry.register(
            "front_door_connections",
            "Drivers connected to the front door",
            m.connections.clone(),
        );
        registry.register_with_unit(
            "front_door_received",
            "Bytes read from drivers",
            Unit::Bytes,
            m.received.clone(),
        );
        registry.register_with_unit(
            "front_door_sent",
            "Bytes written to drivers",
            Unit::Bytes,
            m.sent.clone(),
        );
        let by_outcome = [
            Outcome::Success,
            Outcome::Failure,
            Outcome::Timeout,
            Outcome::Cancelled,
        ]
        .map(|o| {
            m.commands
                .get_or_create_owned(&vec![("outcome".to_owned(), o.label().to_owned())])
        });
        Metrics {
            registry,
            by_outcome,
            ..m
        }
    }
}

/// The dashboard's state; see the module documentation.
pub struct Board {
    tasks: VecDeque<Task>,
    next_seq: u64,
    /// Trimmed records of the latest answers, for a click.
    details: HashMap<u64, CommandResponse>,
    detail_order: VecDeque<u64>,
    samples: VecDeque<Sample>,
    totals: Totals,
    /// Each server's (node pid, worker pid) when last seen, and its
    /// worker restarts.
    workers: HashMap<i32, (u32, u32, u64)>,
    metrics: Metrics,
    traffic: Arc<Traffic>,
    /// Live updates for the pages open.
    updates: broadcast::Sender<Arc<str>>,
    /// To the thread that turns updates into JSON, off the loop's thread.
    writer: std::sync::mpsc::SyncSender<View>,
    /// Tasks answered (or replaced) since the last update.
    fresh: Vec<Task>,
    /// The text of the last command answered, shared with the next one
    /// that has the same.
    last_command: Option<Arc<str>>,
    /// The first log record and sample not yet sent as an update.
    sent_log: u64,
    sent_sample: usize,
}

/// Seconds since the epoch, now.
fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn level_name(record: &LogRecord) -> &'static str {
    use casa_node_protocol::pb::LogLevel;
    match record.level() {
        LogLevel::Debug => "DEBUG",
        LogLevel::Info => "INFO",
        LogLevel::Warning => "WARNING",
        LogLevel::Error => "ERROR",
        LogLevel::Critical => "CRITICAL",
        LogLevel::Unspecified => "INFO",
    }
}

impl Board {
    /// An empty board; `traffic` is the front door's count of bytes.
    pub fn new(traffic: Arc<Traffic>) -> Board {
        let (updates, _) = broadcast::channel(64);
        let (writer, views) = std::sync::mpsc::sync_channel::<View>(UPDATES_WAITING);
        let out = updates.clone();
        // Ends when the board, and so `writer`, is dropped.
        let _ = std::thread::Builder::new()
            .name("casa-node-dashboard".into())
            .spawn(move || {
                for view in views {
                    let text = serde_json::to_string(&view).unwrap_or_default();
                    let _ = out.send(Arc::from(text));
                }
            });
        Board {
            tasks: VecDeque::new(),
            next_seq: 0,
            details: HashMap::new(),
            detail_order: VecDeque::new(),
            samples: VecDeque::new(),
            totals: Totals::default(),
            workers: HashMap::new(),
            metrics: Metrics::new(),
            traffic,
            updates,
            writer,
            fresh: Vec::new(),
            last_command: None,
            sent_log: 0,
            sent_sample: 0,
        }
    }

    /// Where live updates go, for each page that opens.
    pub fn updates(&self) -> broadcast::Sender<Arc<str>> {
        self.updates.clone()
    }

    /// `count` requests were accepted.
    pub fn submitted(&mut self, count: u64) {
        self.totals.submitted += count;
        self.metrics.submitted.inc_by(count);
    }

    /// A final response (or, with `replaces_timeout`, a recovered server's
    /// answer replacing a timeout record) went out.
    pub fn answered(&mut self, response: &CommandResponse, replaces_timeout: bool) {
        let outcome = Outcome::of(response);
        let ran = response.command_start_time > 0.0
            && response.command_stop_time >= response.command_start_time;
        if ran {
            self.metrics
                .duration
                .observe(response.command_stop_time - response.command_start_time);
        }
        if replaces_timeout {
            self.metrics.replaced.inc();
            if let Some(task) = self.tasks.iter_mut().rev().find(|t| t.id == response.id) {
                task.outcome = outcome;
                task.start = response.command_start_time;
                task.stop = response.command_stop_time;
                // Sent again with the next update.
                task.seq = self.next_seq;
                self.next_seq += 1;
                self.fresh.push(task.clone());
            }
        } else {
            match outcome {
                Outcome::Success => self.totals.success += 1,
                Outcome::Failure => self.totals.failure += 1,
                Outcome::Timeout => self.totals.timeout += 1,
                Outcome::Cancelled => self.totals.cancelled += 1,
            }
            self.metrics.by_outcome[outcome as usize].inc();
            if self.tasks.len() >= TASKS_KEPT {
                self.tasks.pop_front();
            }
            let task = Task {
                seq: self.next_seq,
                id: response.id,
                server: response.server,
                start: response.command_start_time,
                stop: response.command_stop_time,
                outcome,
                command: self.shared_command(&response.command),
            };
            self.fresh.push(task.clone());
            self.tasks.push_back(task);
            self.next_seq += 1;
        }
        self.keep_detail(response);
    }

    /// `command` as a bar shows it (cut to [`COMMAND_CHARS`]), shared with
    /// the last command answered when the two are the same.
    fn shared_command(&mut self, command: &str) -> Arc<str> {
        let end = command
            .char_indices()
            .nth(COMMAND_CHARS)
            .map_or(command.len(), |(at, _)| at);
        let shown = &command[..end];
        match &self.last_command {
            Some(last) if **last == *shown => last.clone(),
            _ => {
                let fresh: Arc<str> = Arc::from(shown);
                self.last_command = Some(fresh.clone());
                fresh
            }
        }
    }

    /// Keeps a trimmed copy of `response` for a click: large values and
    /// parameters are left out, saying so.
    fn keep_detail(&mut self, response: &CommandResponse) {
        let small = |v: &Option<Value>| v.as_ref().is_none_or(|v| v.encoded_len() <= RET_BYTES);
        let mut trimmed = CommandResponse {
            id: response.id,
            command: response.command.clone(),
            mode: response.mode,
            parameters: Vec::new(),
            ret: None,
            server: response.server,
            status: response.status,
            successful: response.successful,
            traceback: None,
            command_start_time: response.command_start_time,
            command_stop_time: response.command_stop_time,
            worker_restarted: response.worker_restarted,
            failure: response.failure,
            worker_signal: response.worker_signal,
            worker_exit_code: response.worker_exit_code,
        };
        if small(&response.ret) {
            trimmed.ret.clone_from(&response.ret);
        }
        if response.parameters.iter().all(|p| {
            p.value
                .as_ref()
                .is_none_or(|v| v.encoded_len() <= RET_BYTES)
        }) && response.parameters.len() <= 16
        {
            trimmed.parameters.clone_from(&response.parameters);
        }
        if let Some(tb) = &response.traceback {
            let mut end = tb.len().min(TRACEBACK_BYTES);
            while !tb.is_char_boundary(end) {
                end -= 1;
            }
            trimmed.traceback = Some(tb[..end].to_owned());
        }
        if self.details.insert(response.id, trimmed).is_none() {
            self.detail_order.push_back(response.id);
        }
        while self.detail_order.len() > DETAILS_KEPT {
            if let Some(old) = self.detail_order.pop_front() {
                self.details.remove(&old);
            }
        }
    }

    /// The kept record of request `id`, as JSON, if it is still kept.
    pub fn detail(&self, id: u64) -> Option<String> {
        let record = self.details.get(&id)?;
        let mut json = crate::json::response(record);
        if let Some(object) = json.as_object_mut() {
            if record.ret.is_none() {
                object.insert(
                    "ret".into(),
                    serde_json::Value::String(format!(
                        "(not kept here: larger than {RET_BYTES} bytes; `casa-node get {id}` with a journal)"
                    )),
                );
            }
        }
        Some(json.to_string())
    }

    /// Takes stock once a tick: worker restarts from the status, a
    /// progress sample when `sample`, and, when a page is open, an update
    /// with what changed.
    pub fn tick(&mut self, status: &StatusReply, log: &LogSink, drivers: usize, sample: bool) {
        self.watch_workers(status);
        let running = status.servers.iter().filter(|s| s.busy).count() as u64;
        self.totals.running = running;
        self.totals.queued = status.queued;
        if sample {
            if self.samples.len() >= SAMPLES_KEPT {
                self.samples.pop_front();
                self.sent_sample = self.sent_sample.saturating_sub(1);
            }
            let t = &self.totals;
            let finished = t.success + t.failure + t.timeout + t.cancelled;
            self.samples.push_back(Sample {
                time: epoch_now(),
                submitted: t.submitted,
                queued: t.submitted.saturating_sub(finished + running),
                running,
                done: t.success,
                failed: t.failure + t.timeout + t.cancelled,
            });
        }
        self.metrics
            .connections
            .set(i64::try_from(drivers).unwrap_or(i64::MAX));
        if self.updates.receiver_count() == 0 {
            self.fresh.clear();
            self.sent_log = log.recent_next();
            self.sent_sample = self.samples.len();
            return;
        }
        // A busy cluster logs thousands of records a second: a page gets
        // the latest, and the number it did not get.
        let newest = log.recent_next();
        let from = self.sent_log.max(newest.saturating_sub(LOGS_PER_UPDATE));
        let logs_skipped = from - self.sent_log;
        let (records, next_log) = log.recent_since(from);
        let first_log = next_log - records.len() as u64;
        let view = View {
            kind: "update",
            now: epoch_now(),
            servers: self.rows(status),
            tasks: std::mem::take(&mut self.fresh),
            samples: self
                .samples
                .iter()
                .skip(self.sent_sample)
                .copied()
                .collect(),
            logs: log_lines(records, first_log),
            logs_skipped,
            totals: self.totals,
        };
        match self.writer.try_send(view) {
            Ok(()) => {
                self.sent_log = next_log;
                self.sent_sample = self.samples.len();
            }
            // The writer is behind: this update's tasks go with the next.
            Err(std::sync::mpsc::TrySendError::Full(view)) => self.fresh = view.tasks,
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {}
        }
    }

    /// Everything a page opening draws, as JSON.
    pub fn snapshot(&self, status: &StatusReply, log: &LogSink) -> String {
        let (records, next_log) =
            log.recent_since(log.recent_next().saturating_sub(LOGS_IN_SNAPSHOT as u64));
        let first_log = next_log - records.len() as u64;
        let skip = self.tasks.len().saturating_sub(TASKS_IN_SNAPSHOT);
        let view = View {
            kind: "snapshot",
            now: epoch_now(),
            servers: self.rows(status),
            tasks: self.tasks.iter().skip(skip).cloned().collect(),
            samples: self.samples.iter().copied().collect(),
            logs: log_lines(records, first_log),
            logs_skipped: 0,
            totals: self.totals,
        };
        serde_json::to_string(&view).unwrap_or_default()
    }

    /// The metrics in the OpenMetrics text format, which Prometheus reads.
    pub fn metrics(&mut self, status: &StatusReply) -> String {
        let m = &self.metrics;
        // The label of each state the table shows.
        for (label, state) in [
            ("idle", "idle"),
            ("busy", "busy"),
            ("restarting", "restarting"),
            ("timed_out", "timed out"),
            ("offline", "offline"),
        ] {
            let count = status
                .servers
                .iter()
                .filter(|s| server_state(s) == state)
                .count();
            m.servers
                .get_or_create(&vec![("state".to_owned(), label.to_owned())])
                .set(count as i64);
        }
        m.queued
            .set(i64::try_from(status.queued).unwrap_or(i64::MAX));
        m.running
            .set(status.servers.iter().filter(|s| s.busy).count() as i64);
        let mirror = |counter: &Counter, total: &AtomicU64| {
            let now = total.load(Ordering::Relaxed);
            counter.inc_by(now.saturating_sub(counter.get()));
        };
        mirror(&m.received, &self.traffic.received);
        mirror(&m.sent, &self.traffic.sent);
        let mut text = String::new();
        let _ = encode(&mut text, &m.registry);
        text
    }

    /// Counts worker restarts: a server whose worker pid changed while its
    /// node's did not.
    fn watch_workers(&mut self, status: &StatusReply) {
        for s in &status.servers {
            if s.worker_pid == 0 {
                continue;
            }
            let seen = self
                .workers
                .entry(s.rank)
                .or_insert((s.pid, s.worker_pid, 0));
            if seen.0 != s.pid {
                // A new server node with this rank: its worker is its own.
                *seen = (s.pid, s.worker_pid, seen.2);
            } else if seen.1 != s.worker_pid {
                seen.1 = s.worker_pid;
                seen.2 += 1;
                self.totals.restarts += 1;
                self.metrics.restarts.inc();
            }
        }
    }

    fn rows(&self, status: &StatusReply) -> Vec<ServerRow> {
        status
            .servers
            .iter()
            .map(|s| ServerRow {
                rank: s.rank,
                host: s.processor.clone(),
                state: server_state(s),
                pid: s.pid,
                worker_pid: (s.worker_pid != 0).then_some(s.worker_pid),
                command: s.busy.then(|| s.command.clone()),
                command_id: s.busy.then_some(s.command_id),
                command_start: (s.busy && s.command_start_time > 0.0)
                    .then_some(s.command_start_time),
                rss: s.rss,
                restarts: self.workers.get(&s.rank).map_or(0, |w| w.2),
                last_ping: s.last_ping,
            })
            .collect()
    }
}

/// A server's state as the table shows it.
fn server_state(s: &casa_node_protocol::pb::ServerStatus) -> &'static str {
    if s.timeout {
        "timed out"
    } else if !s.online {
        "offline"
    } else if s.worker_pid == 0 {
        "restarting"
    } else if s.busy {
        "busy"
    } else {
        "idle"
    }
}

fn log_lines(records: Vec<LogRecord>, first: u64) -> Vec<LogLine> {
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| LogLine {
            seq: first + i as u64,
            time: r.time,
            level: level_name(&r),
            origin: r.origin,
            rank: r.rank,
            message: r.message,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use casa_node_protocol::pb::ServerStatus;

    fn answer(id: u64, server: i32, ok: bool) -> CommandResponse {
        CommandResponse {
            id,
            command: format!("work({id})"),
            server,
            status: CommandStatus::ResponseReceived.into(),
            successful: ok,
            traceback: (!ok).then(|| "Traceback ...\nValueError: no".to_owned()),
            ret: Some(Value::none()),
            command_start_time: 1000.0 + id as f64,
            command_stop_time: 1000.5 + id as f64,
            ..CommandResponse::default()
        }
    }

    fn servers(n: i32) -> StatusReply {
        StatusReply {
            servers: (1..=n)
                .map(|rank| ServerStatus {
                    rank,
                    processor: "node".into(),
                    pid: 100 + rank as u32,
                    worker_pid: 1000 + rank as u32,
                    online: true,
                    ..ServerStatus::default()
                })
                .collect(),
            ..StatusReply::default()
        }
    }

    fn quiet_log() -> LogSink {
        LogSink::open(
            None,
            false,
            casa_node_protocol::pb::LogLevel::Info,
            Default::default(),
        )
        .unwrap()
        .keeping_recent(10)
    }

    /// 100 000 commands on 256 servers: what is kept, and what a page
    /// opening is sent, stay bounded; the counts cover them all.
    #[test]
    fn a_long_run_on_many_servers_stays_bounded() {
        let mut board = Board::new(Arc::default());
        let status = servers(256);
        let log = quiet_log();
        board.submitted(100_000);
        for id in 1..=100_000u64 {
            board.answered(&answer(id, (id % 256) as i32 + 1, id % 10 != 0), false);
        }
        board.tick(&status, &log, 1, true);
        assert_eq!(board.tasks.len(), TASKS_KEPT);
        assert_eq!(board.details.len(), DETAILS_KEPT);
        assert_eq!(board.tasks.back().map(|t| t.id), Some(100_000));
        assert_eq!(
            (board.totals.success, board.totals.failure),
            (90_000, 10_000)
        );
        let snapshot: serde_json::Value =
            serde_json::from_str(&board.snapshot(&status, &log)).unwrap();
        assert_eq!(snapshot["servers"].as_array().unwrap().len(), 256);
        assert_eq!(
            snapshot["tasks"].as_array().unwrap().len(),
            TASKS_IN_SNAPSHOT
        );
        // The oldest kept record is gone; a recent failure shows its
        // traceback.
        assert!(board.detail(1).is_none());
        let detail: serde_json::Value =
            serde_json::from_str(&board.detail(99_990).unwrap()).unwrap();
        assert!(detail["traceback"].as_str().unwrap().contains("ValueError"));
    }

    /// A worker whose pid changes under the same server node counts as a
    /// restart; a new server node with that rank does not.
    #[test]
    fn worker_restarts_are_counted_from_the_status() {
        let mut board = Board::new(Arc::default());
        let log = quiet_log();
        let mut status = servers(2);
        board.tick(&status, &log, 0, false);
        status.servers[0].worker_pid = 5000;
        board.tick(&status, &log, 0, false);
        status.servers[1].pid = 9999;
        status.servers[1].worker_pid = 6000;
        board.tick(&status, &log, 0, false);
        assert_eq!(board.totals.restarts, 1);
        let snapshot: serde_json::Value =
            serde_json::from_str(&board.snapshot(&status, &log)).unwrap();
        assert_eq!(snapshot["servers"][0]["restarts"], 1);
        assert_eq!(snapshot["servers"][1]["restarts"], 0);
        assert!(
            board
                .metrics(&status)
                .contains("casa_node_worker_restarts_total 1")
        );
    }

    /// A recovered server's answer replaces the timeout on its bar, and is
    /// sent again to open pages; the outcome counters keep the first.
    #[test]
    fn a_replaced_timeout_updates_its_bar() {
        let mut board = Board::new(Arc::default());
        let log = quiet_log();
        let status = servers(1);
        let mut receiver = board.updates().subscribe();
        let mut timed_out = answer(7, 1, false);
        timed_out.status = CommandStatus::Timeout.into();
        board.answered(&timed_out, false);
        board.tick(&status, &log, 1, false);
        let first: serde_json::Value =
            serde_json::from_str(&receiver.blocking_recv().unwrap()).unwrap();
        assert_eq!(first["tasks"][0]["outcome"], "timeout");
        board.answered(&answer(7, 1, true), true);
        board.tick(&status, &log, 1, false);
        let second: serde_json::Value =
            serde_json::from_str(&receiver.blocking_recv().unwrap()).unwrap();
        assert_eq!(second["tasks"][0]["outcome"], "success");
        assert_eq!(board.tasks.len(), 1);
        assert_eq!(board.totals.timeout, 1);
        let metrics = board.metrics(&status);
        assert!(
            metrics.contains("casa_node_timeouts_replaced_total 1"),
            "{metrics}"
        );
    }
}
