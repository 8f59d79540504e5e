//! The unified log (rules 31-32): one line per record, from every server
//! and the client node, to a file and, if asked, the terminal.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use casa_node_protocol::pb::{LogLevel, LogRecord};

/// Records that may wait for the log's thread; past this, the oldest are
/// dropped, and a line in the log says how many.
pub const QUEUE_RECORDS: usize = 16_384;

/// How long the log's thread lets records gather after writing a batch:
/// a busy node wakes it a few dozen times a second, not once per record,
/// and a line reaches the file at most this much later.
const GATHER: Duration = Duration::from_millis(20);

/// Writes log records as lines: `TIME LEVEL ORIGIN MESSAGE`. A message of
/// several lines (a traceback) gives several lines with the same prefix.
///
/// The lines are written by a thread of the sink's own: the log file is
/// often on a network file system, whose writes may take seconds, and the
/// event loop writing records must go on answering pings. Records wait for
/// that thread in a bounded queue; when it is full, the oldest go, and the
/// log says how many went. Dropping the sink writes what is queued.
pub struct LogSink {
    min_level: LogLevel,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    records: VecDeque<LogRecord>,
    /// Records dropped since the thread last looked.
    dropped: u64,
    capacity: usize,
    closed: bool,
    /// The thread waits for records and must be woken for the next one.
    waiting: bool,
}

impl LogSink {
    /// A sink appending to `file` (if any) and echoing to standard error
    /// when `terminal`; records below `min_level` are dropped.
    pub fn open(file: Option<&Path>, terminal: bool, min_level: LogLevel) -> io::Result<LogSink> {
        Self::open_with_capacity(file, terminal, min_level, QUEUE_RECORDS)
    }

    fn open_with_capacity(
        file: Option<&Path>,
        terminal: bool,
        min_level: LogLevel,
        capacity: usize,
    ) -> io::Result<LogSink> {
        let file = match file {
            Some(path) => Some(BufWriter::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            )),
            None => None,
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                capacity: capacity.max(1),
                ..Queue::default()
            }),
            wake: Condvar::new(),
        });
        let thread = if file.is_some() || terminal {
            let shared = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("casa-node-log".into())
                    .spawn(move || write_lines(&shared, file, terminal))?,
            )
        } else {
            None
        };
        Ok(LogSink {
            min_level,
            shared,
            thread,
        })
    }

    /// Queues one record for the log's thread; never waits for it.
    pub fn write(&self, record: &LogRecord) {
        if record.level() < self.min_level && record.level() != LogLevel::Unspecified {
            return;
        }
        if self.thread.is_none() {
            return;
        }
        let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.records.len() >= queue.capacity {
            queue.records.pop_front();
            queue.dropped += 1;
        }
        queue.records.push_back(record.clone());
        let waiting = std::mem::take(&mut queue.waiting);
        drop(queue);
        if waiting {
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for LogSink {
    fn drop(&mut self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The log's thread: writes what is queued, in batches, until the sink is
/// dropped and the queue empty.
fn write_lines(shared: &Shared, mut file: Option<BufWriter<File>>, terminal: bool) {
    loop {
        let (records, dropped, closed) = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            while queue.records.is_empty() && queue.dropped == 0 && !queue.closed {
                queue.waiting = true;
                queue = shared.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
            queue.waiting = false;
            let dropped = std::mem::take(&mut queue.dropped);
            (std::mem::take(&mut queue.records), dropped, queue.closed)
        };
        let mut text = String::new();
        if dropped > 0 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            text.push_str(&format_record(&LogRecord {
                time: now,
                level: LogLevel::Warning.into(),
                origin: "casa-node".into(),
                rank: 0,
                message: format!(
                    "{dropped} log records dropped: the log could not be written as fast as they came"
                ),
            }));
        }
        for record in &records {
            text.push_str(&format_record(record));
        }
        if let Some(out) = &mut file {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        if terminal {
            let _ = io::stderr().write_all(text.as_bytes());
        }
        if closed && records.is_empty() && dropped == 0 {
            return;
        }
        if !closed {
            // Let the next records gather (the sink wakes the thread only
            // while it waits, and a closing sink ends the pause).
            let queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            let _ = shared
                .wake
                .wait_timeout_while(queue, GATHER, |q| !q.closed)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The name a level is written with.
pub fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Debug => "DEBUG",
        LogLevel::Info | LogLevel::Unspecified => "INFO",
        LogLevel::Warning => "WARNING",
        LogLevel::Error => "ERROR",
        LogLevel::Critical => "CRITICAL",
    }
}

/// A time in seconds since the epoch as `YYYY-MM-DD HH:MM:SS.mmm` (UTC).
pub fn format_time(epoch: f64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs_f64(epoch.max(0.0));
    let text = humantime::format_rfc3339_millis(time).to_string();
    text.trim_end_matches('Z').replacen('T', " ", 1)
}

/// The lines of one record, each ending in a newline.
pub fn format_record(record: &LogRecord) -> String {
    let prefix = format!(
        "{} {:<8} {}",
        format_time(record.time),
        level_name(record.level()),
        record.origin
    );
    let mut out = String::new();
    for line in record.message.lines() {
        out.push_str(&prefix);
        out.push(' ');
        out.push_str(line);
        out.push('\n');
    }
    if record.message.is_empty() {
        out.push_str(&prefix);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> LogRecord {
        LogRecord {
            time: 1_400_252_301.5,
            level: LogLevel::Info.into(),
            origin: "node:client".into(),
            rank: 0,
            message: format!("record {i} {}", "x".repeat(4000)),
        }
    }

    #[test]
    fn a_stuck_log_file_never_blocks_the_writer_and_the_log_says_what_was_dropped() {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        // A FIFO nobody reads yet stands for a file system that hangs:
        // the log's thread blocks once the pipe's buffer is full.
        let dir = std::env::temp_dir().join(format!("casa-node-log-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stuck.log");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        const CAPACITY: usize = 8;
        const RECORDS: usize = 2000;
        let sink =
            LogSink::open_with_capacity(Some(&path), false, LogLevel::Info, CAPACITY).unwrap();
        // 8 MB of records against a 64 KiB pipe: most cannot be written,
        // and none of these calls waits for the file.
        let (done, writes) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let sink = sink;
            for i in 0..RECORDS {
                sink.write(&record(i));
            }
            let _ = done.send(sink);
        });
        let sink = writes
            .recv_timeout(Duration::from_secs(20))
            .expect("writing records waited for the stuck log file");
        let queued = sink.shared.queue.lock().unwrap().records.len();
        assert!(queued <= CAPACITY, "{queued} records queued");
        // The reader drains the pipe while the sink, dropped, writes the rest.
        let flags = nix::fcntl::fcntl(&reader, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        let blocking =
            nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&reader, nix::fcntl::FcntlArg::F_SETFL(blocking)).unwrap();
        let closing = std::thread::spawn(move || drop(sink));
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        closing.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let written = text.lines().filter(|l| l.contains(" record ")).count();
        let dropped: u64 = text
            .lines()
            .filter_map(|l| l.split(" casa-node ").nth(1))
            .filter_map(|m| {
                m.strip_suffix(
                    " log records dropped: the log could not be written as fast as they came",
                )
            })
            .map(|n| n.parse::<u64>().unwrap())
            .sum();
        assert!(dropped > 0, "nothing dropped");
        assert_eq!(written as u64 + dropped, RECORDS as u64);
        // The newest records are kept.
        assert!(
            text.lines()
                .last()
                .unwrap()
                .contains(&format!("record {} ", RECORDS - 1))
        );
    }

    #[test]
    fn rule_31_a_record_is_time_level_origin_message_line_by_line() {
        let record = LogRecord {
            time: 1_400_252_301.5,
            level: LogLevel::Error.into(),
            origin: "almahpc02:server-1".into(),
            rank: 1,
            message: "Traceback (most recent call last):\nNameError: x".into(),
        };
        assert_eq!(
            format_record(&record),
            "2014-05-16 14:58:21.500 ERROR    almahpc02:server-1 Traceback (most recent call last):\n\
             2014-05-16 14:58:21.500 ERROR    almahpc02:server-1 NameError: x\n"
        );
    }
}
