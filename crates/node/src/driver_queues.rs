//! One driver's queues between the head node's loop and the tasks of its
//! connection, all bounded, so that a driver that reads slowly or not at
//! all costs the head node a bounded amount of memory and never holds up
//! its loop:
//!
//! - **Replies** (everything but log records: the answers to its
//!   requests, the responses to its commands, protocol errors) are never
//!   dropped (rule 11). The loop queues them without waiting; while
//!   [`REPLY_FRAMES`] of them or [`REPLY_BYTES`] wait to be written, the
//!   connection reads nothing more from the driver, so its own writes
//!   block once the socket's buffers are full.
//! - **Requests** read from the driver and not yet taken care of by the
//!   loop (on their way to it, or in the syntax check's line) hold a
//!   [`Credit`]; while [`REQUEST_FRAMES`] of them or [`REQUEST_BYTES`] are
//!   out, the connection reads nothing more either. Once stopped, it reads
//!   again when half of what held it is gone.
//! - **Log records** of a subscription (rule 31) wait in a ring of
//!   [`LOG_RECORDS`] records or [`LOG_BYTES`]: when it is full the oldest
//!   is dropped, and the driver is sent, where the dropped ones would have
//!   been, one record saying how many.
//!
//! The writer takes replies and records in the order they were queued.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{Envelope, LogLevel, LogRecord};
use prost::Message;
use tokio::sync::Notify;

/// Replies waiting to be written to a driver beyond which it is not read.
pub const REPLY_FRAMES: usize = 1024;
/// Bytes of replies waiting to be written to a driver beyond which it is
/// not read (one larger reply waits alone).
pub const REPLY_BYTES: usize = 16 << 20;
/// Requests of a driver read and not yet taken care of beyond which it is
/// not read.
pub const REQUEST_FRAMES: usize = 1024;
/// Bytes of requests of a driver read and not yet taken care of beyond
/// which it is not read (one larger request goes alone).
pub const REQUEST_BYTES: usize = 16 << 20;
/// Log records kept for a driver that reads them slower than they come.
pub const LOG_RECORDS: usize = 4096;
/// Bytes of log records kept for a driver that reads them slower than
/// they come (one larger record is kept alone).
pub const LOG_BYTES: usize = 4 << 20;

/// An envelope waiting to be written, with its place in line and its
/// encoded length.
struct Queued {
    order: u64,
    envelope: Envelope,
    len: usize,
}

#[derive(Default)]
struct State {
    replies: VecDeque<Queued>,
    reply_bytes: usize,
    logs: VecDeque<Queued>,
    log_bytes: usize,
    /// Log records dropped since the writer last took one.
    dropped: u64,
    /// The place in line of the next envelope queued.
    next: u64,
    requests: usize,
    request_bytes: usize,
    /// The loop let go of the driver: what is queued is written, then the
    /// connection closes.
    closed: bool,
    /// The connection can no longer be written: nothing more is kept.
    broken: bool,
    writer_waits: bool,
    reader_waits: bool,
}

impl State {
    /// True when the driver must not be read; once it is, it is read again
    /// when half of what was out is gone ([`State::drained`]), so that a
    /// driver at a bound is read in runs of frames, not one by one.
    fn full(&self) -> bool {
        self.over(1)
    }

    fn drained(&self) -> bool {
        !self.over(2)
    }

    /// True while more than a `1/part` of a bound is out, and the loop
    /// still holds the driver and the connection can be written.
    fn over(&self, part: usize) -> bool {
        !self.closed
            && !self.broken
            && (self.replies.len() >= REPLY_FRAMES / part
                || self.reply_bytes >= REPLY_BYTES / part
                || self.requests >= REQUEST_FRAMES / part
                || self.request_bytes >= REQUEST_BYTES / part)
    }
}

/// One driver's queues, shared by the loop's [`Outbox`], the connection's
/// reader (which waits for [`DriverQueues::room_to_read`] before each
/// frame) and its writer (which takes [`DriverQueues::next`]).
pub struct DriverQueues {
    state: Mutex<State>,
    /// Wakes the writer: something was queued, or the loop let go.
    to_write: Notify,
    /// Wakes the reader: a reply was written or a request taken care of.
    to_read: Notify,
    /// The origin of the record saying how many records were dropped.
    origin: Arc<str>,
}

impl fmt::Debug for DriverQueues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("DriverQueues")
            .field("replies", &state.replies.len())
            .field("logs", &state.logs.len())
            .field("requests", &state.requests)
            .finish_non_exhaustive()
    }
}

impl DriverQueues {
    /// Empty queues; `origin` names the head node in the record saying
    /// how many records were dropped.
    pub fn new(origin: Arc<str>) -> Arc<DriverQueues> {
        Arc::new(DriverQueues {
            state: Mutex::default(),
            to_write: Notify::new(),
            to_read: Notify::new(),
            origin,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loop's handle: dropping it lets go of the driver.
    pub fn outbox(self: &Arc<Self>) -> Outbox {
        Outbox(self.clone())
    }

    /// Queues a reply of the connection itself (a malformed frame's
    /// error), unless the loop has let go of the driver.
    pub fn reply_if_open(&self, envelope: Envelope) {
        if !self.lock().closed {
            self.reply(envelope);
        }
    }

    fn reply(&self, envelope: Envelope) {
        let len = envelope.encoded_len();
        let mut state = self.lock();
        if state.broken {
            return;
        }
        let order = state.next;
        state.next += 1;
        state.reply_bytes += len;
        state.replies.push_back(Queued {
            order,
            envelope,
            len,
        });
        self.wake_writer(state);
    }

    fn log(&self, record: LogRecord) {
        let envelope = Envelope::new(Body::LogRecord(record));
        let len = envelope.encoded_len();
        let mut state = self.lock();
        if state.broken {
            return;
        }
        while state.logs.len() >= LOG_RECORDS
            || (!state.logs.is_empty() && state.log_bytes + len > LOG_BYTES)
        {
            let Some(oldest) = state.logs.pop_front() else {
                break;
            };
            state.log_bytes -= oldest.len;
            state.dropped += 1;
        }
        let order = state.next;
        state.next += 1;
        state.log_bytes += len;
        state.logs.push_back(Queued {
            order,
            envelope,
            len,
        });
        self.wake_writer(state);
    }

    fn wake_writer(&self, mut state: MutexGuard<'_, State>) {
        let waits = std::mem::take(&mut state.writer_waits);
        drop(state);
        if waits {
            self.to_write.notify_one();
        }
    }

    fn wake_reader(&self, mut state: MutexGuard<'_, State>) {
        if !state.reader_waits || !state.drained() {
            return;
        }
        state.reader_waits = false;
        drop(state);
        self.to_read.notify_one();
    }

    /// Counts a request of `bytes` read from the driver until the credit
    /// is dropped.
    pub fn credit(self: &Arc<Self>, bytes: usize) -> Credit {
        let mut state = self.lock();
        state.requests += 1;
        state.request_bytes += bytes;
        Credit {
            queues: self.clone(),
            bytes,
        }
    }

    /// Returns at once while fewer replies wait to be written and fewer
    /// requests are out than the bounds; once a bound is reached, waits
    /// until half of it is free.
    pub async fn room_to_read(&self) {
        if !self.lock().full() {
            return;
        }
        loop {
            {
                let mut state = self.lock();
                if state.drained() {
                    return;
                }
                state.reader_waits = true;
            }
            self.to_read.notified().await;
        }
    }

    /// The next envelope to write and its encoded length, once there is
    /// one; `None` once the loop has let go and everything is written, or
    /// the connection is broken.
    pub async fn next(&self) -> Option<(Envelope, usize)> {
        loop {
            {
                let mut state = self.lock();
                if state.broken {
                    return None;
                }
                if let Some(next) = self.take(&mut state) {
                    self.wake_reader(state);
                    return Some(next);
                }
                if state.closed {
                    return None;
                }
                state.writer_waits = true;
            }
            self.to_write.notified().await;
        }
    }

    /// The next envelope to write, if one is queued.
    pub fn try_next(&self) -> Option<(Envelope, usize)> {
        let mut state = self.lock();
        if state.broken {
            return None;
        }
        let next = self.take(&mut state)?;
        self.wake_reader(state);
        Some(next)
    }

    /// Takes the envelope queued first; before the first record after
    /// some were dropped, the record saying how many.
    fn take(&self, state: &mut State) -> Option<(Envelope, usize)> {
        let reply_first = match (state.replies.front(), state.logs.front()) {
            (None, None) => return None,
            (Some(reply), Some(record)) => reply.order < record.order,
            (reply, _) => reply.is_some(),
        };
        if reply_first {
            let reply = state.replies.pop_front()?;
            state.reply_bytes -= reply.len;
            return Some((reply.envelope, reply.len));
        }
        if state.dropped > 0 {
            let dropped = std::mem::take(&mut state.dropped);
            let notice = Envelope::new(Body::LogRecord(LogRecord {
                time: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64(),
                level: LogLevel::Warning.into(),
                origin: self.origin.to_string(),
                rank: 0,
                message: format!("{dropped} log records dropped: this driver read too slowly"),
            }));
            let len = notice.encoded_len();
            return Some((notice, len));
        }
        let record = state.logs.pop_front()?;
        state.log_bytes -= record.len;
        Some((record.envelope, record.len))
    }

    /// The connection can no longer be written: what is queued goes, and
    /// nothing more is kept.
    pub fn broken(&self) {
        let mut state = self.lock();
        state.broken = true;
        state.replies.clear();
        state.logs.clear();
        state.reply_bytes = 0;
        state.log_bytes = 0;
        self.wake_reader(state);
    }
}

/// The head node's loop's handle on a driver's queues: it queues without
/// ever waiting. Dropping it closes the connection once what was queued is
/// written.
#[derive(Debug)]
pub struct Outbox(Arc<DriverQueues>);

impl Outbox {
    /// Queues a reply; replies are never dropped while the connection
    /// lasts.
    pub fn reply(&self, envelope: Envelope) {
        self.0.reply(envelope);
    }

    /// Queues a log record of the driver's subscription; when the driver
    /// reads too slowly, the oldest are dropped, and it is told how many.
    pub fn log(&self, record: LogRecord) {
        self.0.log(record);
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        // The writer finishes; a reader waiting for room goes on, to find
        // the end of the connection.
        self.0.to_write.notify_one();
        self.0.to_read.notify_one();
    }
}

/// A request read from a driver and not yet taken care of by the head
/// node: while too many are out, the driver is not read.
pub struct Credit {
    queues: Arc<DriverQueues>,
    bytes: usize,
}

impl fmt::Debug for Credit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credit")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        let mut state = self.queues.lock();
        state.requests -= 1;
        state.request_bytes -= self.bytes;
        self.queues.wake_reader(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use casa_node_protocol::pb::{Ack, ProtocolErrorCode};

    fn record(message: &str) -> LogRecord {
        LogRecord {
            message: message.into(),
            ..LogRecord::default()
        }
    }

    fn ack() -> Envelope {
        Envelope::new(Body::Ack(Ack {
            ok: true,
            error: String::new(),
        }))
    }

    fn taken(queues: &DriverQueues) -> Vec<Envelope> {
        std::iter::from_fn(|| queues.try_next().map(|(e, _)| e)).collect()
    }

    fn message(envelope: &Envelope) -> &str {
        match &envelope.body {
            Some(Body::LogRecord(r)) => &r.message,
            _ => "",
        }
    }

    #[test]
    fn replies_and_records_are_written_in_the_order_they_were_queued() {
        let queues = DriverQueues::new("h:head".into());
        let outbox = queues.outbox();
        outbox.log(record("1"));
        outbox.reply(ack());
        outbox.log(record("2"));
        outbox.reply(Envelope::error(0, ProtocolErrorCode::Malformed, "3"));
        let kinds: Vec<_> = taken(&queues).iter().map(|e| e.kind()).collect();
        assert_eq!(kinds, ["LogRecord", "Ack", "LogRecord", "ProtocolError"]);
    }

    #[test]
    fn a_slow_reader_loses_its_oldest_records_and_is_told_how_many_never_a_reply() {
        let queues = DriverQueues::new("h:head".into());
        let outbox = queues.outbox();
        let extra = 10;
        for n in 0..LOG_RECORDS + extra {
            outbox.reply(ack());
            outbox.log(record(&n.to_string()));
        }
        let all = taken(&queues);
        assert_eq!(
            all.iter().filter(|e| e.kind() == "Ack").count(),
            LOG_RECORDS + extra
        );
        let logs: Vec<_> = all.iter().filter(|e| e.kind() == "LogRecord").collect();
        assert_eq!(logs.len(), LOG_RECORDS + 1);
        assert_eq!(
            message(logs[0]),
            format!("{extra} log records dropped: this driver read too slowly")
        );
        let Some(Body::LogRecord(notice)) = &logs[0].body else {
            unreachable!()
        };
        assert_eq!(
            (notice.origin.as_str(), notice.level()),
            ("h:head", LogLevel::Warning)
        );
        assert_eq!(message(logs[1]), extra.to_string());
        assert_eq!(
            message(logs[LOG_RECORDS]),
            (LOG_RECORDS + extra - 1).to_string()
        );
        // The notice comes where the first record kept was: after the
        // replies queued before it.
        let first = all.iter().position(|e| e.kind() == "LogRecord").unwrap();
        assert_eq!(first, extra + 1);
    }

    #[test]
    fn records_are_kept_up_to_a_byte_bound_and_a_larger_one_alone() {
        let queues = DriverQueues::new("h:head".into());
        let outbox = queues.outbox();
        let big = "x".repeat(LOG_BYTES / 4);
        for _ in 0..8 {
            outbox.log(record(&big));
        }
        let kept = taken(&queues);
        // Three of a quarter of the bound (plus their framing) fit.
        assert_eq!(kept.len(), 1 + 3);
        assert_eq!(
            message(&kept[0]),
            "5 log records dropped: this driver read too slowly"
        );
        outbox.log(record(&"y".repeat(LOG_BYTES + 1)));
        outbox.log(record(&"z".repeat(LOG_BYTES + 1)));
        let kept = taken(&queues);
        assert_eq!(kept.len(), 2);
        assert!(message(&kept[1]).starts_with('z'));
    }

    #[tokio::test]
    async fn the_reader_waits_while_too_many_replies_or_requests_are_out() {
        let queues = DriverQueues::new("h:head".into());
        let outbox = queues.outbox();
        use futures::FutureExt;
        let room = |queues: &Arc<DriverQueues>| {
            let queues = queues.clone();
            async move { queues.room_to_read().now_or_never().is_some() }
        };
        assert!(room(&queues).await);
        for _ in 0..REPLY_FRAMES {
            outbox.reply(ack());
        }
        assert!(!room(&queues).await, "a full queue of replies");
        let waiting = tokio::spawn({
            let queues = queues.clone();
            async move { queues.room_to_read().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // Read again once half the bound is free, not at the first reply
        // written.
        for _ in 0..REPLY_FRAMES / 2 {
            assert!(queues.next().await.is_some());
            tokio::task::yield_now().await;
            assert!(!waiting.is_finished());
        }
        assert!(queues.next().await.is_some());
        waiting.await.unwrap();
        taken(&queues);
        // Records never hold the reader up.
        for n in 0..2 * LOG_RECORDS {
            outbox.log(record(&n.to_string()));
        }
        assert!(room(&queues).await);
        let credits: Vec<_> = (0..REQUEST_FRAMES).map(|_| queues.credit(1)).collect();
        assert!(!room(&queues).await, "too many requests out");
        drop(credits);
        assert!(room(&queues).await);
        let credit = queues.credit(REQUEST_BYTES + 1);
        assert!(!room(&queues).await, "too many bytes of requests out");
        drop(credit);
        assert!(room(&queues).await);
        outbox.reply(Envelope::error(
            0,
            ProtocolErrorCode::TooLarge,
            "r".repeat(REPLY_BYTES),
        ));
        assert!(!room(&queues).await, "too many bytes of replies");
        // Once the loop lets go, nothing holds the reader.
        drop(outbox);
        assert!(room(&queues).await);
    }

    #[tokio::test]
    async fn the_writer_ends_once_the_loop_lets_go_and_all_is_written() {
        let queues = DriverQueues::new("h:head".into());
        let outbox = queues.outbox();
        outbox.reply(ack());
        let writer = tokio::spawn({
            let queues = queues.clone();
            async move {
                let mut written = 0;
                while queues.next().await.is_some() {
                    written += 1;
                }
                written
            }
        });
        tokio::task::yield_now().await;
        outbox.reply(ack());
        drop(outbox);
        assert_eq!(writer.await.unwrap(), 2);
        // A connection's own error after that is not queued.
        queues.reply_if_open(ack());
        assert!(queues.try_next().is_none());
    }

    #[tokio::test]
    async fn a_broken_connection_keeps_nothing_and_frees_the_reader() {
        let queues = DriverQueues::new("h:head".into());
        let outbox = queues.outbox();
        for _ in 0..REPLY_FRAMES {
            outbox.reply(ack());
        }
        queues.broken();
        queues.room_to_read().await;
        outbox.reply(ack());
        outbox.log(record("gone"));
        assert!(queues.next().await.is_none());
    }
}
