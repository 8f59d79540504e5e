//! The unified log (rules 31-32): one line per record, from every server
//! and the client node, to a file and, if asked, the terminal.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

use casa_node_protocol::pb::{LogLevel, LogRecord};

/// Writes log records as lines: `TIME LEVEL ORIGIN MESSAGE`. A message of
/// several lines (a traceback) gives several lines with the same prefix.
pub struct LogSink {
    file: Option<BufWriter<File>>,
    terminal: bool,
    min_level: LogLevel,
    /// When the oldest line not yet flushed to the file was written.
    unflushed_since: Option<Instant>,
}

/// How long a line may wait in the buffer before it reaches the file: a
/// busy node writes many lines per flush, and an operator tailing the log
/// still sees each line within a fraction of a second.
pub const FLUSH_DELAY: Duration = Duration::from_millis(20);

impl LogSink {
    /// A sink appending to `file` (if any) and echoing to standard error
    /// when `terminal`; records below `min_level` are dropped.
    pub fn open(file: Option<&Path>, terminal: bool, min_level: LogLevel) -> io::Result<LogSink> {
        let file = match file {
            Some(path) => Some(BufWriter::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            )),
            None => None,
        };
        Ok(LogSink {
            file,
            terminal,
            min_level,
            unflushed_since: None,
        })
    }

    /// Writes one record.
    pub fn write(&mut self, record: &LogRecord) {
        if record.level() < self.min_level && record.level() != LogLevel::Unspecified {
            return;
        }
        let text = format_record(record);
        if let Some(file) = &mut self.file {
            let _ = file.write_all(text.as_bytes());
            self.unflushed_since.get_or_insert_with(Instant::now);
        }
        if self.terminal {
            let _ = io::stderr().write_all(text.as_bytes());
        }
    }

    /// When the buffered lines are due in the file ([`FLUSH_DELAY`] after
    /// the oldest of them), or `None` when nothing waits.
    pub fn flush_due(&self) -> Option<Instant> {
        self.unflushed_since.map(|since| since + FLUSH_DELAY)
    }

    /// Pushes buffered lines to the file.
    pub fn flush(&mut self) {
        self.unflushed_since = None;
        if let Some(file) = &mut self.file {
            let _ = file.flush();
        }
    }
}

impl Drop for LogSink {
    fn drop(&mut self) {
        self.flush();
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
