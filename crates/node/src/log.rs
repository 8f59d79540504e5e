//! The unified log (rules 31-32): one line per record, from every server
//! and the head node, to a file and, if asked, the terminal.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use casa_node_protocol::pb::{LogLevel, LogRecord};

/// Records that may wait for the log's thread; past this, the oldest are
/// dropped, and a line in the log says how many.
pub const QUEUE_RECORDS: usize = 16_384;

/// Bytes of records (their text) that may wait for the log's thread: long
/// lines (a worker printing megabytes) are bounded too.
pub const QUEUE_BYTES: usize = 64 << 20;

/// Bytes of records the dashboard's recent ring holds at most.
const RECENT_BYTES: usize = 16 << 20;

/// The bytes a record takes while it waits: its text and a little more.
fn weight(record: &LogRecord) -> usize {
    record.message.len() + record.origin.len() + 48
}

/// How long the log's thread lets records gather after writing a batch:
/// a busy node wakes it a few dozen times a second, not once per record,
/// and a line reaches the file at most this much later.
const GATHER: Duration = Duration::from_millis(20);

/// The log file's buffer: a batch of records reaches the file in a few
/// writes, which may each take long on a network file system.
const FILE_BUFFER: usize = 64 << 10;

/// When the log file is started afresh: past `max_size` bytes, the file
/// becomes `FILE.1` (an older `FILE.1` becomes `FILE.2`, and so on), and
/// `keep` such files are kept, as logrotate and Python's
/// `RotatingFileHandler` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The most bytes a file takes (a single record larger than this goes
    /// alone into a file); 0 never starts a new file.
    pub max_size: u64,
    /// Older files kept, `FILE.1` to `FILE.keep`; 0 counts as 1.
    pub keep: u32,
}

impl Rotation {
    /// `--log-max-size` unless given: 100 MiB.
    pub const DEFAULT_MAX_SIZE: u64 = 100 << 20;
    /// `--log-keep` unless given.
    pub const DEFAULT_KEEP: u32 = 5;
    /// The file grows without bound.
    pub const OFF: Rotation = Rotation {
        max_size: 0,
        keep: Rotation::DEFAULT_KEEP,
    };
}

impl Default for Rotation {
    fn default() -> Rotation {
        Rotation {
            max_size: Rotation::DEFAULT_MAX_SIZE,
            keep: Rotation::DEFAULT_KEEP,
        }
    }
}

/// A size in bytes: a whole number, optionally followed by `K`, `M` or `G`
/// (KiB, MiB, GiB), as `--log-max-size` takes it.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text:?} is not a size in bytes (a whole number, optionally followed by K, M or G)"
        )
    };
    let (digits, shift) = match text.char_indices().last() {
        Some((at, 'K' | 'k')) => (&text[..at], 10),
        Some((at, 'M' | 'm')) => (&text[..at], 20),
        Some((at, 'G' | 'g')) => (&text[..at], 30),
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(bad)
}

/// Writes log records as lines: `TIME LEVEL ORIGIN MESSAGE`. A message of
/// several lines (a traceback) gives several lines with the same prefix.
///
/// The lines are written by a thread of the sink's own: the log file is
/// often on a network file system, whose writes may take seconds, and the
/// event loop writing records must go on answering pings. Records wait for
/// that thread in a bounded queue; when it is full, the oldest go, and the
/// log says how many went. Dropping the sink writes what is queued. That
/// thread also starts the file afresh as [`Rotation`] says.
pub struct LogSink {
    min_level: LogLevel,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// The latest records, for the dashboard, when kept.
    recent: Option<Mutex<Recent>>,
}

/// The latest records written, numbered from 0 in the order written.
struct Recent {
    records: VecDeque<LogRecord>,
    /// The [`weight`] of `records`.
    bytes: usize,
    /// The number of the next record.
    next: u64,
    capacity: usize,
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
    /// The [`weight`] of `records`, and the most it may be.
    bytes: usize,
    max_bytes: usize,
    closed: bool,
    /// The thread waits for records and must be woken for the next one.
    waiting: bool,
}

impl LogSink {
    /// A sink appending to `file` (if any), rotated as `rotation` says, and
    /// echoing to standard error when `terminal`; records below `min_level`
    /// are dropped.
    pub fn open(
        file: Option<&Path>,
        terminal: bool,
        min_level: LogLevel,
        rotation: Rotation,
    ) -> io::Result<LogSink> {
        Self::open_with_bounds(
            file,
            terminal,
            min_level,
            rotation,
            (QUEUE_RECORDS, QUEUE_BYTES),
        )
    }

    fn open_with_bounds(
        file: Option<&Path>,
        terminal: bool,
        min_level: LogLevel,
        rotation: Rotation,
        (capacity, max_bytes): (usize, usize),
    ) -> io::Result<LogSink> {
        let file = file.map(|path| LogFile::open(path, rotation)).transpose()?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                capacity: capacity.max(1),
                max_bytes,
                ..Queue::default()
            }),
            wake: Condvar::new(),
        });
        let thread = if file.is_some() || terminal {
            let shared = shared.clone();
            // Warnings about the file go where the opener's would.
            let dispatch = tracing::dispatcher::get_default(Clone::clone);
            Some(
                std::thread::Builder::new()
                    .name("casa-node-log".into())
                    .spawn(move || {
                        tracing::dispatcher::with_default(&dispatch, || {
                            write_lines(&shared, file, terminal);
                        });
                    })?,
            )
        } else {
            None
        };
        Ok(LogSink {
            min_level,
            shared,
            thread,
            recent: None,
        })
    }

    /// Keeps the latest `capacity` records written, for
    /// [`LogSink::recent_since`].
    #[must_use]
    pub fn keeping_recent(mut self, capacity: usize) -> LogSink {
        self.recent = Some(Mutex::new(Recent {
            records: VecDeque::with_capacity(capacity.min(4096)),
            bytes: 0,
            next: 0,
            capacity: capacity.max(1),
        }));
        self
    }

    /// The number the next record written will have (0 when none are
    /// kept).
    pub fn recent_next(&self) -> u64 {
        self.recent
            .as_ref()
            .map_or(0, |r| r.lock().unwrap_or_else(|e| e.into_inner()).next)
    }

    /// The records kept that were written as number `from` or later, and
    /// the number of the next record; empty when none are kept.
    pub fn recent_since(&self, from: u64) -> (Vec<LogRecord>, u64) {
        let Some(recent) = &self.recent else {
            return (Vec::new(), 0);
        };
        let recent = recent.lock().unwrap_or_else(|e| e.into_inner());
        let first = recent.next - recent.records.len() as u64;
        let skip = from.saturating_sub(first) as usize;
        let records = recent.records.iter().skip(skip).cloned().collect();
        (records, recent.next)
    }

    /// Queues one record for the log's thread; never waits for it.
    pub fn write(&self, record: &LogRecord) {
        if record.level() < self.min_level && record.level() != LogLevel::Unspecified {
            return;
        }
        if let Some(recent) = &self.recent {
            let mut recent = recent.lock().unwrap_or_else(|e| e.into_inner());
            let size = weight(record);
            while !recent.records.is_empty()
                && (recent.records.len() >= recent.capacity || recent.bytes + size > RECENT_BYTES)
            {
                if let Some(old) = recent.records.pop_front() {
                    recent.bytes -= weight(&old);
                }
            }
            recent.records.push_back(record.clone());
            recent.bytes += size;
            recent.next += 1;
        }
        if self.thread.is_none() {
            return;
        }
        let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        let size = weight(record);
        while !queue.records.is_empty()
            && (queue.records.len() >= queue.capacity || queue.bytes + size > queue.max_bytes)
        {
            if let Some(old) = queue.records.pop_front() {
                queue.bytes -= weight(&old);
                queue.dropped += 1;
            }
        }
        queue.records.push_back(record.clone());
        queue.bytes += size;
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
fn write_lines(shared: &Shared, mut file: Option<LogFile>, terminal: bool) {
    loop {
        let (records, dropped, closed) = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            while queue.records.is_empty() && queue.dropped == 0 && !queue.closed {
                queue.waiting = true;
                queue = shared.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
            queue.waiting = false;
            let dropped = std::mem::take(&mut queue.dropped);
            queue.bytes = 0;
            (std::mem::take(&mut queue.records), dropped, queue.closed)
        };
        let mut text = String::new();
        let mut write = |lines: &str| {
            if let Some(out) = &mut file {
                out.write_record(lines);
            }
            if terminal {
                text.push_str(lines);
            }
        };
        if dropped > 0 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            write(&format_record(&LogRecord {
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
            write(&format_record(record));
        }
        if let Some(out) = &mut file {
            out.flush();
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

/// The log file, with what rotating it needs.
struct LogFile {
    path: PathBuf,
    out: BufWriter<File>,
    /// Bytes in the file: its size when opened, and all written since.
    size: u64,
    /// `None` when rotation is off, or the file is not a regular file (a
    /// FIFO, `/dev/null`), which is never renamed.
    rotation: Option<Rotation>,
    /// The last rotation failed (and said so).
    failing: bool,
}

impl LogFile {
    fn open(path: &Path, rotation: Rotation) -> io::Result<LogFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let metadata = file.metadata()?;
        Ok(LogFile {
            path: path.to_owned(),
            out: BufWriter::with_capacity(FILE_BUFFER, file),
            size: metadata.len(),
            rotation: (rotation.max_size > 0 && metadata.is_file()).then_some(rotation),
            failing: false,
        })
    }

    /// Writes the lines of one record, in a fresh file if they would take
    /// this one past the limit.
    fn write_record(&mut self, lines: &str) {
        let len = lines.len() as u64;
        if let Some(rotation) = self.rotation {
            if self.size > 0 && self.size.saturating_add(len) > rotation.max_size {
                self.rotate(rotation.keep.max(1));
            }
        }
        let _ = self.out.write_all(lines.as_bytes());
        self.size = self.size.saturating_add(len);
    }

    fn flush(&mut self) {
        let _ = self.out.flush();
    }

    /// `FILE.N` for N > 0, else `FILE`.
    fn numbered(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        if n > 0 {
            name.push(format!(".{n}"));
        }
        PathBuf::from(name)
    }

    /// Renames `FILE.(keep-1)` to `FILE.keep`, ..., `FILE` to `FILE.1`, and
    /// opens a fresh `FILE`. The file stays open until then: when a rename
    /// fails, writing goes on in it, the failure is reported once, and the
    /// next attempt comes after another `max_size` bytes.
    fn rotate(&mut self, keep: u32) {
        self.flush();
        match self.shift(keep) {
            Ok(file) => {
                self.out = BufWriter::with_capacity(FILE_BUFFER, file);
                self.size = 0;
                if std::mem::take(&mut self.failing) {
                    tracing::warn!("log rotation of {} works again", self.path.display());
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(
                        "log rotation of {}: {e}; the log goes on in the same file",
                        self.path.display()
                    );
                }
                self.size = 0;
            }
        }
    }

    fn shift(&self, keep: u32) -> io::Result<File> {
        let context =
            |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
        // Left by a run that kept more.
        for n in keep.saturating_add(1).. {
            if std::fs::remove_file(self.numbered(n)).is_err() {
                break;
            }
        }
        for n in (0..keep).rev() {
            let (from, to) = (self.numbered(n), self.numbered(n + 1));
            match std::fs::rename(&from, &to) {
                Ok(()) => {}
                // A gap, or (for FILE itself) moved away by someone else:
                // FILE is started afresh all the same.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(context(format!(
                        "renaming {} to {}",
                        from.display(),
                        to.display()
                    ))(e));
                }
            }
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(context(format!("opening {}", self.path.display())))
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
            origin: "node:head".into(),
            rank: 0,
            message: format!("record {i} {}", "x".repeat(4000)),
        }
    }

    /// What a sink with these bounds did with 2 000 records of 4 KB while
    /// its file (a FIFO nobody reads yet, standing for a file system that
    /// hangs) was stuck: the most records and bytes that waited at once
    /// (after the writes), the records written once the file was read, and
    /// those the log says were dropped.
    fn stuck_log(name: &str, bounds: (usize, usize)) -> (usize, usize, u64, u64) {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let dir =
            std::env::temp_dir().join(format!("casa-node-log-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stuck.log");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let sink = LogSink::open_with_bounds(
            Some(&path),
            false,
            LogLevel::Info,
            Rotation::default(),
            bounds,
        )
        .unwrap();
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
        let (queued, bytes) = {
            let queue = sink.shared.queue.lock().unwrap();
            (queue.records.len(), queue.bytes)
        };
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
        // The newest records are kept.
        assert!(
            text.lines()
                .last()
                .unwrap()
                .contains(&format!("record {} ", RECORDS - 1))
        );
        (queued, bytes, written as u64, dropped)
    }

    const RECORDS: usize = 2000;

    #[test]
    fn a_stuck_log_file_never_blocks_the_writer_and_the_log_says_what_was_dropped() {
        const CAPACITY: usize = 8;
        let (queued, _, written, dropped) = stuck_log("records", (CAPACITY, QUEUE_BYTES));
        assert!(queued <= CAPACITY, "{queued} records queued");
        assert!(dropped > 0, "nothing dropped");
        assert_eq!(written + dropped, RECORDS as u64);
    }

    /// Long records are bounded in bytes, whatever their number.
    #[test]
    fn records_waiting_for_a_stuck_log_are_bounded_in_bytes_too() {
        const BYTES: usize = 20_000;
        let (queued, bytes, written, dropped) = stuck_log("bytes", (QUEUE_RECORDS, BYTES));
        assert!(
            bytes <= BYTES && queued <= 5,
            "{queued} records, {bytes} bytes"
        );
        assert!(dropped > 0, "nothing dropped");
        assert_eq!(written + dropped, RECORDS as u64);
    }

    /// A directory of its own for one test, removed at the end.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("casa-node-log-test-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn log(&self) -> PathBuf {
            self.0.join("casa-node.log")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Record `i`: `lines` lines of about `width` bytes, each saying
    /// `record I line J/LINES`.
    fn lines_record(i: usize, lines: usize, width: usize) -> LogRecord {
        let message: Vec<String> = (0..lines)
            .map(|j| format!("record {i} line {j}/{lines} {}", "x".repeat(width)))
            .collect();
        LogRecord {
            message: message.join("\n"),
            ..record(i)
        }
    }

    /// Writes `records` through a sink with this rotation; they are all in
    /// the files once it returns (dropping the sink waits for its thread).
    fn write_through(path: &Path, rotation: Rotation, records: &[LogRecord]) {
        let sink = LogSink::open(Some(path), false, LogLevel::Info, rotation).unwrap();
        for record in records {
            sink.write(record);
        }
    }

    /// `FILE.N` ... `FILE.1`, `FILE`: those that exist, oldest first.
    fn log_files(path: &Path) -> Vec<(PathBuf, String)> {
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
        let mut files: Vec<_> = (1..).map(numbered).take_while(|p| p.exists()).collect();
        files.reverse();
        files.push(path.to_owned());
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap();
                (p, text)
            })
            .collect()
    }

    /// (record, line, lines) of a line written from [`lines_record`].
    fn line_of(line: &str) -> (usize, usize, usize) {
        let words: Vec<&str> = line.split(" record ").nth(1).unwrap().split(' ').collect();
        let (j, n) = words[2].split_once('/').unwrap();
        (
            words[0].parse().unwrap(),
            j.parse().unwrap(),
            n.parse().unwrap(),
        )
    }

    /// Checks the rotated files of `records` written with `max_size`:
    /// each file holds whole records, in order, within the limit unless it
    /// holds one record alone, and was started afresh only when the next
    /// record did not fit; the newest records are all there. Returns the
    /// first record kept.
    fn check_rotated(files: &[(PathBuf, String)], max_size: u64, records: usize) -> usize {
        let mut next = None;
        let mut first_sizes = Vec::new();
        for (path, text) in files {
            assert!(text.ends_with('\n'), "{} ends mid-line", path.display());
            let mut in_file = Vec::new();
            let mut lines = text.lines().map(line_of).peekable();
            while let Some((i, j, n)) = lines.next() {
                assert_eq!(j, 0, "{}: record {i} starts at line {j}", path.display());
                for k in 1..n {
                    assert_eq!(
                        lines.next(),
                        Some((i, k, n)),
                        "{}: record {i} is split",
                        path.display()
                    );
                }
                assert!(next.is_none_or(|next| i == next), "record {i} out of order");
                next = Some(i + 1);
                in_file.push(i);
            }
            let size = text.len() as u64;
            assert!(
                size <= max_size || in_file.len() == 1,
                "{} has {size} bytes in {} records",
                path.display(),
                in_file.len()
            );
            first_sizes.push((size, text.lines().next().map(line_of)));
        }
        assert_eq!(next, Some(records), "the newest records are missing");
        // A file was started afresh only when the next record did not fit.
        for pair in files.windows(2) {
            let (older, newer) = (&pair[0].1, &pair[1].1);
            let (first, _, n) = line_of(newer.lines().next().unwrap());
            let first_len: usize = newer.lines().take(n).map(|l| l.len() + 1).sum();
            assert!(
                (older.len() + first_len) as u64 > max_size,
                "record {first} ({first_len} bytes) would have fit after {} bytes",
                older.len()
            );
        }
        line_of(files[0].1.lines().next().unwrap()).0
    }

    /// Records of 1 to 3 lines of varied width, every 50th too large for
    /// a file of 1 KiB, the first among them.
    fn varied_records(count: usize) -> Vec<LogRecord> {
        (0..count)
            .map(|i| {
                if i % 50 == 0 {
                    lines_record(i, 8, 200)
                } else {
                    lines_record(i, 1 + i % 3, 10 + (i * 37) % 170)
                }
            })
            .collect()
    }

    #[test]
    fn rotation_keeps_n_old_files_each_within_the_limit_and_splits_no_record() {
        const RECORDS: usize = 400;
        let records = varied_records(RECORDS);
        let rotation = Rotation {
            max_size: 1024,
            keep: 3,
        };
        let dir = TempDir::new("rotation");
        write_through(&dir.log(), rotation, &records);
        let files = log_files(&dir.log());
        assert_eq!(
            files.len(),
            4,
            "{:?}",
            files.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
        assert!(!PathBuf::from(format!("{}.4", dir.log().display())).exists());
        check_rotated(&files, rotation.max_size, RECORDS);
    }

    #[test]
    fn rotation_loses_no_line_while_it_keeps_every_file() {
        const RECORDS: usize = 400;
        let records = varied_records(RECORDS);
        let rotation = Rotation {
            max_size: 1024,
            keep: 1000,
        };
        let dir = TempDir::new("keep-all");
        write_through(&dir.log(), rotation, &records);
        let files = log_files(&dir.log());
        assert!(files.len() > 20, "only {} files", files.len());
        assert_eq!(check_rotated(&files, rotation.max_size, RECORDS), 0);
        // The records too large for a file are alone in theirs.
        let alone = files.iter().filter(|(_, text)| text.len() > 1024).count();
        assert_eq!(alone, RECORDS / 50);
    }

    #[test]
    fn rotation_counts_the_bytes_already_in_the_file() {
        let dir = TempDir::new("append");
        let old = "an earlier run\n".repeat(60);
        std::fs::write(dir.log(), &old).unwrap();
        let records = [lines_record(0, 1, 40), lines_record(1, 1, 40)];
        let first = format_record(&records[0]);
        assert!(old.len() + first.len() <= 1024);
        assert!(old.len() + 2 * first.len() > 1024);
        let rotation = Rotation {
            max_size: 1024,
            keep: 5,
        };
        write_through(&dir.log(), rotation, &records);
        let files = log_files(&dir.log());
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].1, old + &first);
        assert_eq!(files[1].1, format_record(&records[1]));
    }

    #[test]
    fn a_max_size_of_0_never_rotates() {
        let dir = TempDir::new("off");
        let records = varied_records(400);
        write_through(&dir.log(), Rotation::OFF, &records);
        let files = log_files(&dir.log());
        assert_eq!(files.len(), 1);
        let expected: String = records.iter().map(format_record).collect();
        assert_eq!(files[0].1, expected);
    }

    #[test]
    fn a_failed_rename_is_reported_once_and_the_log_goes_on() {
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl Write for Captured {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let dir = TempDir::new("rename-fails");
        // FILE cannot become FILE.1, a directory that is not empty.
        let blocker = PathBuf::from(format!("{}.1", dir.log().display()));
        std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
        let records = varied_records(100);
        let stderr = Captured::default();
        let writer = stderr.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            write_through(
                &dir.log(),
                Rotation {
                    max_size: 1024,
                    keep: 1,
                },
                &records,
            );
        });
        let text = std::fs::read_to_string(dir.log()).unwrap();
        let expected: String = records.iter().map(format_record).collect();
        assert_eq!(text, expected);
        assert!(blocker.join("in-the-way").is_dir());
        let stderr = String::from_utf8(stderr.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            stderr.matches("log rotation of").count(),
            1,
            "stderr: {stderr}"
        );
        assert!(
            stderr.contains("the log goes on in the same file"),
            "{stderr}"
        );
    }

    #[test]
    fn a_log_that_is_not_a_regular_file_is_never_renamed() {
        use std::io::Read;
        let dir = TempDir::new("fifo");
        nix::unistd::mkfifo(&dir.log(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let path = dir.log();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            File::open(path).unwrap().read_to_string(&mut text).unwrap();
            text
        });
        let records = varied_records(40);
        write_through(
            &dir.log(),
            Rotation {
                max_size: 256,
                keep: 2,
            },
            &records,
        );
        let text = reader.join().unwrap();
        let expected: String = records.iter().map(format_record).collect();
        assert_eq!(text, expected);
        assert!(dir.log().exists(), "the FIFO was renamed");
        assert!(!PathBuf::from(format!("{}.1", dir.log().display())).exists());
    }

    #[test]
    fn sizes_are_bytes_or_kib_mib_gib() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("2048"), Ok(2048));
        assert_eq!(parse_size("2K"), Ok(2048));
        assert_eq!(parse_size("100M"), Ok(Rotation::DEFAULT_MAX_SIZE));
        assert_eq!(parse_size("3g"), Ok(3 << 30));
        for bad in [
            "",
            "K",
            "-1",
            "1.5M",
            "10X",
            "1 M",
            "+5",
            "99999999999999999999",
            "17179869184G",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("is not a size in bytes"), "{bad:?}: {e}");
        }
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
