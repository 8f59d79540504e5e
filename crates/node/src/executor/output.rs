//! The worker's standard output and error: read line by line, forwarded
//! as log records (stderr at WARNING, or at the priority of a line in CASA's
//! log format), the last lines kept for a death report (rule 25).

use super::*;

/// A worker's stdout or stderr, with the line being read.
pub(super) struct OutputStream {
    pub(super) generation: u64,
    pub(super) level: LogLevel,
    pub(super) reader: Pin<Box<dyn AsyncRead + Send>>,
    pub(super) chunk: Box<[u8]>,
    pub(super) line: Vec<u8>,
}

impl std::fmt::Debug for OutputStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputStream")
            .field("generation", &self.generation)
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

impl OutputStream {
    pub(super) fn new(
        generation: u64,
        level: LogLevel,
        reader: Pin<Box<dyn AsyncRead + Send>>,
    ) -> Self {
        OutputStream {
            generation,
            level,
            reader,
            chunk: vec![0; 16 * 1024].into_boxed_slice(),
            line: Vec::new(),
        }
    }
}

/// The first stream with data or at its end: (index, bytes read into its
/// chunk, 0 at the end).
pub(super) fn poll_streams(
    streams: &mut [OutputStream],
    cx: &mut Context<'_>,
) -> Poll<(usize, io::Result<usize>)> {
    for (i, stream) in streams.iter_mut().enumerate() {
        let mut buf = ReadBuf::new(&mut stream.chunk);
        match stream.reader.as_mut().poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => return Poll::Ready((i, Ok(buf.filled().len()))),
            Poll::Ready(Err(error)) => return Poll::Ready((i, Err(error))),
            Poll::Pending => {}
        }
    }
    Poll::Pending
}

impl Executor {
    pub(super) fn stream_data(&mut self, i: usize, n: usize) {
        let stream = &mut self.streams[i];
        let (generation, level) = (stream.generation, stream.level);
        let mut lines = Vec::new();
        for &byte in &stream.chunk[..n] {
            if byte == b'\n' {
                lines.push(std::mem::take(&mut stream.line));
            } else if stream.line.len() < MAX_LINE {
                stream.line.push(byte);
            }
        }
        for line in lines {
            self.output_line(generation, level, &line);
        }
    }

    pub(super) fn output_line(&mut self, generation: u64, level: LogLevel, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let message = String::from_utf8_lossy(line).into_owned();
        if level == LogLevel::Warning {
            self.remember_stderr(generation, &message);
        }
        let level = casa_line_level(&message).unwrap_or(level);
        self.events.push_back(ExecutorEvent::Log { level, message });
    }

    pub(super) fn remember_stderr(&mut self, generation: u64, message: &str) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back((generation, message.to_owned()));
    }
}

/// The level of a line in the format of CASA's log on the console
/// (`2026-12-04 23:01:07<TAB>WARN<TAB>origin<TAB>message`), which the workers
/// of `--casa` write on stderr: its priority, not stderr's WARNING.
pub(super) fn casa_line_level(line: &str) -> Option<LogLevel> {
    let mut fields = line.splitn(3, '\t');
    let stamp = fields.next()?.as_bytes();
    let priority = fields.next()?;
    fields.next()?;
    let shaped = stamp.len() == 19
        && stamp.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            10 => *b == b' ',
            13 | 16 => *b == b':',
            _ => b.is_ascii_digit(),
        });
    if !shaped {
        return None;
    }
    match priority.trim_end_matches(|c: char| c.is_ascii_digit()) {
        "DEBUG" | "DEBUGGING" => Some(LogLevel::Debug),
        "INFO" | "NORMAL" => Some(LogLevel::Info),
        "WARN" => Some(LogLevel::Warning),
        "SEVERE" => Some(LogLevel::Error),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CASA's console lines keep their priority in the unified log; other
    /// lines keep their stream's level.
    #[test]
    fn casa_console_lines_keep_their_priority() {
        let line = |p: &str| format!("2026-12-04 23:01:07\t{p}\tflagdata::::MPIServer-2\tdone");
        assert_eq!(casa_line_level(&line("INFO")), Some(LogLevel::Info));
        assert_eq!(casa_line_level(&line("INFO3")), Some(LogLevel::Info));
        assert_eq!(casa_line_level(&line("DEBUG1")), Some(LogLevel::Debug));
        assert_eq!(casa_line_level(&line("WARN")), Some(LogLevel::Warning));
        assert_eq!(casa_line_level(&line("SEVERE")), Some(LogLevel::Error));
        assert_eq!(casa_line_level(&line("LOUD")), None);
        assert_eq!(casa_line_level("Traceback (most recent call last):"), None);
        assert_eq!(casa_line_level("2026-12-04 23:01:07 INFO not tabs"), None);
        assert_eq!(casa_line_level("2026-12-04T23:01:07\tINFO\tx\ty"), None);
    }
}
