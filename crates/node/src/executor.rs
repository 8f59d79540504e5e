//! Runs commands in a Python worker process and supervises it
//! (ARCHITECTURE "Processes" and "Python worker protocol"; SEMANTICS rules
//! 2-8, 24, 25 and 31).
//!
//! The worker (`worker.py`, shipped inside the binary) is started as
//! `PYTHON -u -c SOURCE` in its own process group, so a Ctrl-C in the
//! terminal does not reach it. It speaks length-prefixed `Envelope` frames
//! over three pipes mapped onto its descriptors 3, 4 and 5 (named in
//! `CASA_NODE_WORKER_FDS`); stdin, stdout and stderr stay free for user
//! code:
//!
//! - fd 3, commands: `CommandRequest`s, and `ControlRequest` Start and
//!   SetLogLevel, read by the worker's main thread between commands;
//! - fd 4, results: the ready `ControlResponse` (with the init script's
//!   traceback if it raised), `CommandResponse`s and `LogRecord`s (Python's
//!   `sys.stdout`, `sys.stderr` and `logging`);
//! - fd 5, control: `ControlRequest` Cancel, read by a thread of the worker
//!   that raises KeyboardInterrupt in the command if it is still running
//!   (or about to run), and that makes the worker exit when the pipe
//!   closes, even in the middle of a command.
//!
//! Output written straight to descriptors 1 and 2 (C code, subprocesses)
//! is read here line by line. When the worker dies, its process group is
//! killed, a fresh worker is started, and the running command ends as
//! failed once that worker is ready (rule 25).
//!
//! All I/O happens inside [`Executor::next_event`], which the owner polls
//! all the time (it is cancel-safe): that is also what writes a large
//! command into the pipe and keeps the worker's output flowing.

use std::collections::VecDeque;
use std::fs::File;
use std::future::{Future, poll_fn};
use std::io::{self, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use casa_node_protocol::pb::control_request;
use casa_node_protocol::pb::envelope::Body;
use casa_node_protocol::pb::{
    CommandMode, CommandRequest, CommandResponse, ControlRequest, Envelope, FailureKind, LogLevel,
    LogRecord,
};
use casa_node_protocol::{
    ExecOutcome, FrameError, Framing, LENGTH_PREFIX, OFFLOAD_THRESHOLD, Rank, RequestId,
};
use command_fds::{CommandFdExt, FdMapping};
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, SysconfVar, pipe2, sysconf};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::net::unix::pipe;
use tokio::process::Child;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;

/// The worker's source, passed to the interpreter with `-c`.
pub const WORKER_SOURCE: &str = include_str!("worker.py");

// One argument to exec may not exceed 32 pages (Linux's MAX_ARG_STRLEN).
const _: () = assert!(WORKER_SOURCE.len() < 128 * 1024);

/// The worker's descriptors for the commands, results and control pipes.
const WORKER_FDS: [i32; 3] = [3, 4, 5];

/// How long a dead worker's output may take to reach its end once the
/// worker is gone (a process that escaped its group may hold a pipe open).
const STRAGGLER_WAIT: Duration = Duration::from_secs(1);

/// Workers in a row that may be killed by a signal before they are ready
/// and be replaced. A signal from outside (the out-of-memory killer, an
/// operator) is no reason to leave the server without a worker for good;
/// an interpreter that crashes every time it starts is, after a few tries.
const STARTUP_KILLS: u32 = 5;

/// How long `shutdown` waits for the worker to exit before killing it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Lines of stderr kept to explain a worker's death.
const TAIL_LINES: usize = 20;

/// Longest line of output passed on whole; longer ones are cut.
const MAX_LINE: usize = 64 * 1024;

/// How to start the Python worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorConfig {
    /// The Python interpreter (`--python`): a CASA installation's own works.
    pub python: PathBuf,
    /// A script run in the worker's namespace before its first command
    /// (`--init`, rule 5); relative paths are taken from the current
    /// directory when the executor starts.
    pub init: Option<PathBuf>,
    /// The worker's working directory; the server node's own when `None`.
    pub working_directory: Option<PathBuf>,
    /// Variables added to the worker's environment.
    pub environment: Vec<(String, String)>,
    /// The server's rank, given to the worker as `CASA_NODE_RANK`.
    pub rank: Rank,
    /// `--casa`: the directory holding casa-node's `casampi`. The worker
    /// puts it first on `PYTHONPATH` and starts with the namespace casampi's
    /// servers have (`casalog`, `from casatasks import *`) before the init
    /// script.
    pub casa: Option<PathBuf>,
}

/// Something the executor reports; see [`Executor::next_event`].
#[derive(Debug, Clone, PartialEq)]
pub enum ExecutorEvent {
    /// The running command ended, with its outcome for
    /// [`ServerCore::finished`](casa_node_protocol::ServerCore::finished).
    Finished(ExecOutcome),
    /// A line the worker wrote (stdout at INFO, stderr at WARNING) or a
    /// Python `logging` record (rule 31).
    Log {
        /// Its severity.
        level: LogLevel,
        /// The text, without its trailing newline.
        message: String,
    },
    /// The worker died while idle and a fresh one was started: the
    /// globals of earlier commands are gone (rule 25).
    WorkerRestarted {
        /// What happened, for the log.
        reason: String,
    },
}

/// Why the executor cannot do what it was asked.
#[derive(Debug, Error)]
pub enum ExecutorError {
    /// The interpreter could not be started (missing, not executable, or
    /// a working directory that does not exist).
    #[error("cannot start the Python worker {}: {source}", python.display())]
    Spawn {
        /// The interpreter.
        python: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The pipes to the worker could not be made.
    #[error("cannot create the Python worker's pipes: {0}")]
    Pipe(#[source] io::Error),
    /// The worker ended before it was ready to take commands.
    #[error("the Python worker {} {status} before it was ready{}", python.display(), stderr_note(stderr))]
    StartupExit {
        /// The interpreter.
        python: PathBuf,
        /// How it ended: "exited with status 1", "killed by signal 11 ...".
        status: String,
        /// Its last lines on stderr.
        stderr: Vec<String>,
    },
    /// The init script raised an exception (rule 5).
    #[error("{} raised an exception:\n{traceback}", start_up(path))]
    Init {
        /// The script.
        path: PathBuf,
        /// Its Python traceback.
        traceback: String,
    },
    /// A command is running: the worker runs one at a time.
    #[error("command {0} is still running; the worker runs one command at a time")]
    Busy(RequestId),
    /// The worker died and no new one could be started.
    #[error("no Python worker is running: {0}")]
    NoWorker(String),
    /// The command does not fit in a frame.
    #[error("cannot send the command to the worker: {0}")]
    Frame(#[from] FrameError),
}

fn stderr_note(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; its last lines on stderr:\n{}", lines.join("\n"))
    }
}

/// Runs commands, one at a time, in a supervised Python worker.
#[derive(Debug)]
pub struct Executor {
    config: ExecutorConfig,
    log_level: LogLevel,
    framing: Framing,
    generation: u64,
    worker: Option<Worker>,
    /// The stdout and stderr pipes of the worker and of dead workers whose
    /// output has not ended yet.
    streams: Vec<OutputStream>,
    running: Option<Running>,
    /// A death waiting for its replacement worker to be ready.
    restart: Option<Restart>,
    events: VecDeque<ExecutorEvent>,
    /// The latest stderr lines, with the generation of the worker that
    /// wrote them; cleared when a command starts.
    tail: VecDeque<(u64, String)>,
    /// Set when no worker could be started after a death.
    no_worker: Option<String>,
    /// Set when the first worker fails before it is ready.
    start_failure: Option<ExecutorError>,
    /// Workers killed by a signal before they were ready since the last
    /// one that was (see [`STARTUP_KILLS`]).
    startup_kills: u32,
    page_size: u64,
}

#[derive(Debug)]
struct Worker {
    generation: u64,
    child: Child,
    pid: u32,
    commands: pipe::Sender,
    /// Bytes for the commands pipe not written yet.
    out: BytesMut,
    /// A large command being encoded on a blocking thread; until it is
    /// appended to `out`, later messages wait in `held`.
    encoding: Option<JoinHandle<Result<BytesMut, FrameError>>>,
    held: BytesMut,
    /// A large result being decoded on a blocking thread; what the worker
    /// sent after it waits in `inbox`.
    decoding: Option<JoinHandle<Result<Envelope, FrameError>>>,
    control: File,
    results: pipe::Receiver,
    inbox: BytesMut,
    results_closed: bool,
    results_closed_at: Option<Instant>,
    ready: bool,
    init_error: Option<String>,
    /// How the process ended, once it has.
    exit: Option<String>,
    exit_signal: Option<i32>,
    exit_code: Option<i32>,
    died_at: Option<Instant>,
    /// Why this side killed it, if it did.
    killed_because: Option<KillReason>,
}

#[derive(Debug, Clone, Copy)]
struct Running {
    id: RequestId,
    mode: CommandMode,
    start_time: f64,
}

/// Why the executor killed a worker itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum KillReason {
    /// The server node ordered it: a command ignored its interrupt for
    /// the grace period (rule 24).
    #[error("sent by the server node")]
    Ordered,
    /// It closed its results pipe while still running.
    #[error("because it closed its results pipe")]
    ResultsClosed,
    /// It broke the framing of its results pipe.
    #[error("because it sent a malformed frame")]
    MalformedFrame,
}

#[derive(Debug)]
struct Restart {
    lost: Option<Running>,
    reason: String,
    death: Death,
}

/// How a worker ended: the signal that killed it, or its exit status.
#[derive(Debug, Clone, Copy, Default)]
struct Death {
    signal: Option<i32>,
    exit_code: Option<i32>,
}

struct OutputStream {
    generation: u64,
    level: LogLevel,
    reader: Pin<Box<dyn AsyncRead + Send>>,
    chunk: Box<[u8]>,
    line: Vec<u8>,
}

impl std::fmt::Debug for OutputStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputStream")
            .field("generation", &self.generation)
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

/// What woke the executor up.
enum Io {
    Stream(usize, io::Result<usize>),
    Results(io::Result<usize>),
    Exited(io::Result<ExitStatus>),
    Writable(io::Result<()>),
    /// A large command was encoded.
    Encoded(Result<Result<BytesMut, FrameError>, JoinError>),
    /// A large result was decoded.
    Decoded(Result<Result<Envelope, FrameError>, JoinError>),
    /// A dead worker's output had its time, or a live worker closed its
    /// results pipe a while ago.
    Due,
}

impl Executor {
    /// Starts a worker and waits until it is ready: its namespace holds
    /// `os`, `sys` and `time` and its init script has run (rule 5).
    ///
    /// Fails with a clear error when the interpreter cannot be started,
    /// exits before it is ready (its stderr is in the error), or the init
    /// script raises (its traceback is in the error).
    pub async fn start(config: ExecutorConfig) -> Result<Executor, ExecutorError> {
        let executor = Executor::spawn(config)?;
        executor.ready().await
    }

    /// Starts the worker process and returns at once: its pid is known
    /// from here on, and [`Executor::ready`] waits for its init script.
    pub fn spawn(mut config: ExecutorConfig) -> Result<Executor, ExecutorError> {
        if let Some(init) = &config.init {
            let absolute = std::path::absolute(init).map_err(|source| ExecutorError::Spawn {
                python: config.python.clone(),
                source,
            })?;
            config.init = Some(absolute);
        }
        let page_size = sysconf(SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |n| n as u64);
        let mut executor = Executor {
            config,
            log_level: LogLevel::Info,
            framing: Framing::default(),
            generation: 0,
            worker: None,
            streams: Vec::new(),
            running: None,
            restart: None,
            events: VecDeque::new(),
            tail: VecDeque::new(),
            no_worker: None,
            start_failure: None,
            startup_kills: 0,
            page_size,
        };
        executor.spawn_worker()?;
        Ok(executor)
    }

    /// Waits until the worker spawned by [`Executor::spawn`] has run its
    /// init script; the executor takes commands from then on.
    pub async fn ready(self) -> Result<Executor, ExecutorError> {
        let mut executor = self;
        loop {
            if let Some(error) = executor.start_failure.take() {
                return Err(error);
            }
            let init_error = match &executor.worker {
                Some(w) if w.ready => w.init_error.clone(),
                _ => {
                    executor.step().await;
                    continue;
                }
            };
            return match init_error {
                None => Ok(executor),
                Some(traceback) => {
                    let path = executor.config.init.clone().unwrap_or_default();
                    executor.shutdown().await;
                    Err(ExecutorError::Init { path, traceback })
                }
            };
        }
    }

    /// Hands `request` to the worker; its outcome comes back as
    /// [`ExecutorEvent::Finished`]. One command at a time.
    pub fn execute(&mut self, request: CommandRequest) -> Result<(), ExecutorError> {
        if let Some(running) = &self.running {
            return Err(ExecutorError::Busy(running.id));
        }
        let Some(worker) = self.worker.as_mut() else {
            let reason = self.no_worker.clone().unwrap_or_default();
            return Err(ExecutorError::NoWorker(reason));
        };
        let running = Running {
            id: request.id,
            mode: match request.mode() {
                CommandMode::Unspecified => CommandMode::Auto,
                mode => mode,
            },
            start_time: epoch_now(),
        };
        let envelope = Envelope::new(Body::CommandRequest(request));
        let len = self.framing.encoded_len(&envelope)?;
        if len >= OFFLOAD_THRESHOLD && worker.encoding.is_none() {
            // Copying hundreds of MiB into fresh memory takes long enough
            // to delay pings: done on a blocking thread.
            let framing = self.framing;
            worker.encoding = Some(tokio::task::spawn_blocking(move || {
                let mut frame = BytesMut::new();
                framing.encode(&envelope, &mut frame).map(|()| frame)
            }));
        } else {
            worker.write(&self.framing, &envelope)?;
        }
        self.running = Some(running);
        self.tail.clear();
        Ok(())
    }

    /// Raises KeyboardInterrupt in the running command (rule 24); it then
    /// ends as failed, with a KeyboardInterrupt traceback, and the worker
    /// keeps its globals. Does nothing when no command runs. A command
    /// that ignores it is stopped with [`kill`](Self::kill).
    pub fn interrupt(&mut self) {
        let (Some(running), Some(worker)) = (&self.running, self.worker.as_mut()) else {
            return;
        };
        let cancel = ControlRequest {
            action: Some(control_request::Action::Cancel(control_request::Cancel {
                request_id: running.id,
            })),
        };
        let frame = self
            .framing
            .encode_to_bytes(&Envelope::new(Body::ControlRequest(cancel)))
            .expect("a cancel frame is small");
        // A few bytes into a pipe that is read all the time: this does not
        // block. If the worker is gone, its death is reported anyway.
        if let Err(error) = worker.control.write_all(&frame) {
            tracing::debug!(%error, "could not send an interrupt to the Python worker");
        }
    }

    /// Kills the worker and everything it started (SIGKILL to its process
    /// group). The running command ends as failed once a fresh worker is
    /// ready; when idle, [`ExecutorEvent::WorkerRestarted`] follows.
    pub fn kill(&mut self) {
        if let Some(worker) = self.worker.as_mut() {
            // A worker still starting is a replacement already: leave it.
            if worker.ready && worker.exit.is_none() {
                worker.killed_because = Some(KillReason::Ordered);
                worker.kill_group();
            }
        }
    }

    /// Changes the lowest level of Python `logging` record the worker
    /// sends; it applies between commands and to later workers.
    pub fn set_log_level(&mut self, level: LogLevel) {
        self.log_level = level;
        let request = ControlRequest {
            action: Some(control_request::Action::SetLogLevel(
                control_request::SetLogLevel {
                    log_level: level.into(),
                },
            )),
        };
        self.send_control(request);
    }

    fn send_control(&mut self, request: ControlRequest) {
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        let envelope = Envelope::new(Body::ControlRequest(request));
        if let Err(error) = worker.write(&self.framing, &envelope) {
            tracing::warn!(%error, "cannot send settings to the Python worker");
        }
    }

    /// The next thing to report. Cancel-safe: a call dropped before it
    /// returns loses nothing. It must be polled for commands to progress.
    pub async fn next_event(&mut self) -> ExecutorEvent {
        loop {
            if let Some(event) = self.events.pop_front() {
                return event;
            }
            self.step().await;
        }
    }

    /// The worker's process id, while one runs.
    pub fn worker_pid(&self) -> Option<u32> {
        self.worker
            .as_ref()
            .filter(|w| w.exit.is_none())
            .map(|w| w.pid)
    }

    /// Resident memory of this process and the worker together, in bytes
    /// (rule 19).
    pub fn rss_bytes(&self) -> u64 {
        let pages = |path: &str| -> u64 {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|statm| statm.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        let mut total = pages("/proc/self/statm");
        if let Some(pid) = self.worker_pid() {
            total += pages(&format!("/proc/{pid}/statm"));
        }
        total * self.page_size
    }

    /// Stops the worker: closes its pipes (it exits even in the middle of
    /// a command), waits for it, and kills its process group after 2 s or
    /// when processes it started are left.
    pub async fn shutdown(mut self) {
        self.streams.clear();
        let Some(worker) = self.worker.take() else {
            return;
        };
        let Worker {
            mut child,
            pid,
            commands,
            control,
            results,
            exit,
            ..
        } = worker;
        drop((commands, control, results));
        if exit.is_none()
            && tokio::time::timeout(SHUTDOWN_GRACE, child.wait())
                .await
                .is_err()
        {
            tracing::warn!(pid, "the Python worker did not exit; killing it");
            kill_group(pid);
            let _ = child.wait().await;
        }
        // Whatever the worker started and left behind goes with it.
        kill_group(pid);
    }

    /// Waits for I/O and handles it.
    async fn step(&mut self) {
        let io = self.wait_io().await;
        self.handle_io(io);
        self.check_death();
    }

    async fn wait_io(&mut self) -> Io {
        let Executor {
            worker, streams, ..
        } = self;
        let streams_ready = poll_fn(|cx| poll_streams(streams, cx));
        let Some(w) = worker.as_mut() else {
            let (i, r) = streams_ready.await;
            return Io::Stream(i, r);
        };
        if w.inbox.capacity() - w.inbox.len() < 4096 {
            w.inbox.reserve(64 * 1024);
        }
        let due = w.deadline();
        tokio::select! {
            biased;
            (i, r) = streams_ready => Io::Stream(i, r),
            r = w.results.read_buf(&mut w.inbox), if !w.results_closed => Io::Results(r),
            s = w.child.wait(), if w.exit.is_none() => Io::Exited(s),
            r = w.commands.writable(), if !w.out.is_empty() => Io::Writable(r),
            r = encoded(&mut w.encoding), if w.encoding.is_some() => Io::Encoded(r),
            r = encoded(&mut w.decoding), if w.decoding.is_some() => Io::Decoded(r),
            () = sleep_until(due) => Io::Due,
        }
    }

    fn handle_io(&mut self, io: Io) {
        match io {
            Io::Stream(i, Ok(n)) if n > 0 => self.stream_data(i, n),
            Io::Stream(i, end) => {
                if let Err(error) = end {
                    tracing::debug!(%error, "reading the Python worker's output failed");
                }
                let mut stream = self.streams.swap_remove(i);
                if !stream.line.is_empty() {
                    let line = std::mem::take(&mut stream.line);
                    self.output_line(stream.generation, stream.level, &line);
                }
            }
            Io::Results(Ok(n)) if n > 0 => self.results_data(),
            Io::Results(end) => {
                if let Err(error) = end {
                    tracing::warn!(%error, "reading the Python worker's results failed");
                }
                if let Some(w) = self.worker.as_mut() {
                    // A dying process closes its pipes before it can be
                    // waited for: give it a moment before calling it broken.
                    w.results_closed = true;
                    w.results_closed_at = Some(Instant::now());
                }
            }
            Io::Exited(status) => {
                let Some(w) = self.worker.as_mut() else {
                    return;
                };
                let description = match status {
                    Ok(status) => {
                        w.exit_signal = status.signal();
                        w.exit_code = status.code();
                        describe_exit(status)
                    }
                    Err(error) => format!("ended in a way that could not be read ({error})"),
                };
                tracing::debug!(pid = w.pid, %description, "the Python worker ended");
                w.exit = Some(description);
                w.died_at = Some(Instant::now());
                // Leave nothing it started behind, and let its pipes close.
                kill_group(w.pid);
            }
            Io::Decoded(result) => {
                let Some(w) = self.worker.as_mut() else {
                    return;
                };
                w.decoding = None;
                let generation = w.generation;
                match result {
                    Ok(Ok(envelope)) => {
                        self.worker_message(generation, envelope);
                        self.results_data();
                    }
                    Ok(Err(error)) => self.malformed(&error.to_string()),
                    Err(error) => self.malformed(&error.to_string()),
                }
            }
            Io::Encoded(result) => {
                let Some(w) = self.worker.as_mut() else {
                    return;
                };
                w.encoding = None;
                let frame = match result {
                    Ok(Ok(frame)) => Ok(frame),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match frame {
                    Ok(frame) => {
                        if w.out.is_empty() {
                            w.out = frame;
                        } else {
                            w.out.extend_from_slice(&frame);
                        }
                        let held = w.held.split();
                        w.out.extend_from_slice(&held);
                        w.flush_out();
                    }
                    Err(why) => {
                        let held = w.held.split();
                        w.out.extend_from_slice(&held);
                        w.flush_out();
                        if let Some(running) = self.running.take() {
                            self.events.push_back(ExecutorEvent::Finished(ExecOutcome {
                                id: running.id,
                                mode: running.mode,
                                traceback: Some(format!(
                                    "the command could not be sent to the Python worker: {why}"
                                )),
                                start_time: running.start_time,
                                stop_time: epoch_now(),
                                failure: FailureKind::NotSent,
                                ..ExecOutcome::default()
                            }));
                        }
                    }
                }
            }
            Io::Writable(result) => {
                if let Some(w) = self.worker.as_mut() {
                    match result {
                        Ok(()) => w.flush_out(),
                        Err(_) => w.out.clear(),
                    }
                }
            }
            Io::Due => {
                // check_death gives up on a dead worker's open pipes.
                if let Some(w) = self.worker.as_mut() {
                    let closed_long_ago = w
                        .results_closed_at
                        .is_some_and(|t| Instant::now() >= t + STRAGGLER_WAIT);
                    if w.exit.is_none() && w.killed_because.is_none() && closed_long_ago {
                        w.broken(KillReason::ResultsClosed);
                    }
                }
            }
        }
    }

    fn stream_data(&mut self, i: usize, n: usize) {
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

    fn output_line(&mut self, generation: u64, level: LogLevel, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let message = String::from_utf8_lossy(line).into_owned();
        if level == LogLevel::Warning {
            self.remember_stderr(generation, &message);
        }
        let level = casa_line_level(&message).unwrap_or(level);
        self.events.push_back(ExecutorEvent::Log { level, message });
    }

    fn remember_stderr(&mut self, generation: u64, message: &str) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back((generation, message.to_owned()));
    }

    fn results_data(&mut self) {
        loop {
            let Some(w) = self.worker.as_mut() else {
                return;
            };
            if w.decoding.is_some() {
                return;
            }
            let generation = w.generation;
            if let Ok(Some(len)) = self.framing.next_len(&w.inbox) {
                if len >= OFFLOAD_THRESHOLD {
                    let whole = LENGTH_PREFIX + len;
                    if w.inbox.len() < whole {
                        // Room for the rest at once: growing the buffer
                        // step by step would copy what it holds each time.
                        w.inbox.reserve(whole - w.inbox.len());
                        return;
                    }
                    w.inbox.advance(LENGTH_PREFIX);
                    let body = w.inbox.split_to(len).freeze();
                    let framing = self.framing;
                    w.decoding = Some(tokio::task::spawn_blocking(move || {
                        framing.decode_body(body)
                    }));
                    return;
                }
            }
            match self.framing.decode(&mut w.inbox) {
                Ok(Some(envelope)) => self.worker_message(generation, envelope),
                Ok(None) => return,
                Err(error) => {
                    self.malformed(&error.to_string());
                    return;
                }
            }
        }
    }

    /// The worker sent a frame that does not decode: it is out of step.
    fn malformed(&mut self, error: &str) {
        let Some(w) = self.worker.as_mut() else {
            return;
        };
        tracing::warn!(%error, "the Python worker sent a malformed frame");
        w.inbox.clear();
        w.results_closed = true;
        w.broken(KillReason::MalformedFrame);
    }

    fn worker_message(&mut self, generation: u64, envelope: Envelope) {
        match envelope.body {
            Some(Body::CommandResponse(response)) => self.command_finished(*response),
            Some(Body::LogRecord(record)) => self.log_record(generation, record),
            Some(Body::ControlResponse(ready)) => {
                let Some(w) = self.worker.as_mut() else {
                    return;
                };
                w.ready = true;
                w.init_error = (!ready.ok).then_some(ready.error);
                self.startup_kills = 0;
                tracing::debug!(pid = w.pid, "the Python worker is ready");
                let init_error = w.init_error.clone();
                if let Some(restart) = self.restart.take() {
                    let mut reason = restart.reason.clone();
                    if let Some(traceback) = init_error {
                        let note =
                            format!("The init script failed in the new worker:\n{traceback}");
                        self.events.push_back(ExecutorEvent::Log {
                            level: LogLevel::Error,
                            message: note.clone(),
                        });
                        reason = format!("{reason}\n{note}");
                    }
                    self.report_restart(restart.lost, reason, true, restart.death);
                }
            }
            other => {
                let kind = other.as_ref().map_or("empty envelope", Body::name);
                tracing::warn!(kind, "unexpected message from the Python worker");
            }
        }
    }

    fn command_finished(&mut self, response: CommandResponse) {
        if self.running.map(|r| r.id) != Some(response.id) {
            tracing::warn!(
                id = response.id,
                "the Python worker answered a command that is not running"
            );
            return;
        }
        self.running = None;
        let mode = response.mode();
        self.events.push_back(ExecutorEvent::Finished(ExecOutcome {
            id: response.id,
            mode,
            ret: response.ret,
            successful: response.successful,
            traceback: response.traceback,
            start_time: response.command_start_time,
            stop_time: response.command_stop_time,
            ..ExecOutcome::default()
        }));
    }

    fn log_record(&mut self, generation: u64, record: LogRecord) {
        let level = match LogLevel::try_from(record.level) {
            Ok(LogLevel::Unspecified) | Err(_) => LogLevel::Info,
            Ok(level) => level,
        };
        if record.origin == "stderr" {
            self.remember_stderr(generation, &record.message);
        }
        self.events.push_back(ExecutorEvent::Log {
            level,
            message: record.message,
        });
    }

    /// Handles a worker whose process has ended, once its results are read
    /// and its output has ended (or had its time).
    fn check_death(&mut self) {
        let Some(w) = &self.worker else {
            return;
        };
        let Some(died_at) = w.died_at else {
            return;
        };
        if w.decoding.is_some() {
            // Its last result first.
            return;
        }
        let generation = w.generation;
        let output_open = self.streams.iter().any(|s| s.generation == generation);
        if (!w.results_closed || output_open) && Instant::now() < died_at + STRAGGLER_WAIT {
            return;
        }
        let dead = self.worker.take().expect("checked above");
        // Values it was writing into shared memory when it died.
        if let Some((_, dir)) = self
            .config
            .environment
            .iter()
            .find(|(name, _)| name == crate::shm::SHM_DIR_VAR)
        {
            crate::shm::sweep_tmp(std::path::Path::new(dir), dead.pid);
        }
        self.streams.retain(|s| s.generation != generation);
        self.on_death(dead);
    }

    fn on_death(&mut self, dead: Worker) {
        let death = Death {
            signal: dead.exit_signal,
            exit_code: dead.exit_code,
        };
        let mut what = dead.exit.clone().unwrap_or_default();
        match dead.killed_because {
            Some(why) => what = format!("{what}, {why}"),
            None if dead.exit_signal == Some(Signal::SIGKILL as i32) => {
                what.push_str(" (the system's out-of-memory killer sends this signal)");
            }
            None => {}
        }
        let stderr: Vec<String> = self
            .tail
            .iter()
            .filter(|(generation, _)| *generation == dead.generation)
            .map(|(_, line)| line.clone())
            .collect();
        if !dead.ready {
            let killed = dead.killed_because.is_none() && dead.exit_signal.is_some();
            if killed && self.startup_kills < STARTUP_KILLS {
                self.startup_kills += 1;
                let note = format!("A worker {what} before it was ready; starting another.");
                tracing::warn!(pid = dead.pid, "{note}");
                let spawned = self.spawn_worker();
                if let Some(restart) = &mut self.restart {
                    restart.reason = format!("{}\n{note}", restart.reason);
                }
                match spawned {
                    Ok(()) => return,
                    Err(error) => what = format!("{what}, and no other could be started: {error}"),
                }
            }
            match self.restart.take() {
                None => {
                    self.start_failure = Some(ExecutorError::StartupExit {
                        python: self.config.python.clone(),
                        status: what,
                        stderr,
                    });
                }
                Some(restart) => {
                    let reason = format!(
                        "{}\nThe new worker {what} before it was ready{}; no worker is left.",
                        restart.reason,
                        stderr_note(&stderr)
                    );
                    self.no_worker = Some(reason.clone());
                    self.report_restart(restart.lost, reason, false, restart.death);
                }
            }
            return;
        }
        let lost = self.running.take();
        let mut reason = format!("Python worker died: {what}");
        reason.push_str(match lost {
            Some(_) => " while running this command.",
            None => " while idle.",
        });
        if !stderr.is_empty() {
            reason.push_str("\nIts last lines on stderr:");
            for line in &stderr {
                reason.push_str("\n    ");
                reason.push_str(line);
            }
        }
        tracing::warn!(pid = dead.pid, %reason, "restarting the Python worker");
        match self.spawn_worker() {
            Ok(()) => {
                reason.push_str(
                    "\nA fresh Python worker was started (its init script run again): \
                     the globals of earlier commands are lost.",
                );
                self.restart = Some(Restart {
                    lost,
                    reason,
                    death,
                });
            }
            Err(error) => {
                reason.push_str(&format!("\nNo new worker could be started: {error}"));
                self.no_worker = Some(reason.clone());
                self.report_restart(lost, reason, false, death);
            }
        }
    }

    fn report_restart(
        &mut self,
        lost: Option<Running>,
        reason: String,
        restarted: bool,
        death: Death,
    ) {
        let event = match lost {
            Some(running) => ExecutorEvent::Finished(ExecOutcome {
                id: running.id,
                mode: running.mode,
                ret: None,
                successful: false,
                traceback: Some(reason),
                start_time: running.start_time,
                stop_time: epoch_now(),
                worker_restarted: restarted,
                failure: FailureKind::WorkerDied,
                worker_signal: death.signal,
                worker_exit_code: death.exit_code,
            }),
            None => ExecutorEvent::WorkerRestarted { reason },
        };
        self.events.push_back(event);
    }

    /// Starts a worker (not yet ready) as the current one.
    fn spawn_worker(&mut self) -> Result<(), ExecutorError> {
        let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|e| ExecutorError::Pipe(e.into()));
        let (commands_read, commands_write) = pipe()?;
        let (results_read, results_write) = pipe()?;
        let (control_read, control_write) = pipe()?;

        let config = &self.config;
        let mut command = std::process::Command::new(&config.python);
        command
            .arg("-u")
            .arg("-c")
            .arg(WORKER_SOURCE)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .envs(config.environment.iter().map(|(k, v)| (k, v)))
            .env(
                "CASA_NODE_WORKER_FDS",
                WORKER_FDS.map(|fd| fd.to_string()).join(","),
            )
            .env(
                "CASA_NODE_WORKER_LOG_LEVEL",
                (self.log_level as i32).to_string(),
            )
            .env("CASA_NODE_RANK", config.rank.to_string());
        if let Some(init) = &config.init {
            command.env("CASA_NODE_WORKER_INIT", init);
        }
        if let Some(casa) = &config.casa {
            command
                .env("CASA_NODE_WORKER_CASA", "1")
                .env("PYTHONPATH", crate::packages::python_path(casa));
            // casatools tags each line of the CASA log with the server's
            // rank, as casampi's are tagged, from Open MPI's variable; under
            // mpirun the worker has it from its server already.
            if std::env::var_os("OMPI_COMM_WORLD_RANK").is_none() {
                command.env("OMPI_COMM_WORLD_RANK", config.rank.to_string());
            }
        }
        if let Some(directory) = &config.working_directory {
            command.current_dir(directory);
        }
        command
            .fd_mappings(vec![
                FdMapping {
                    parent_fd: commands_read,
                    child_fd: WORKER_FDS[0],
                },
                FdMapping {
                    parent_fd: results_write,
                    child_fd: WORKER_FDS[1],
                },
                FdMapping {
                    parent_fd: control_read,
                    child_fd: WORKER_FDS[2],
                },
            ])
            .expect("the worker's descriptors are distinct");
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);
        let spawned = command.spawn();
        // The command holds the child's ends of the pipes: closing them
        // here is what lets each side see the other's end.
        drop(command);
        let mut child = spawned.map_err(|source| ExecutorError::Spawn {
            python: self.config.python.clone(),
            source,
        })?;
        let pid = child.id().expect("a process just spawned has an id");

        self.generation += 1;
        let generation = self.generation;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        self.streams.push(OutputStream::new(
            generation,
            LogLevel::Info,
            Box::pin(stdout),
        ));
        self.streams.push(OutputStream::new(
            generation,
            LogLevel::Warning,
            Box::pin(stderr),
        ));
        let worker = Worker {
            generation,
            child,
            pid,
            commands: pipe::Sender::from_owned_fd(commands_write).map_err(ExecutorError::Pipe)?,
            out: BytesMut::new(),
            encoding: None,
            held: BytesMut::new(),
            decoding: None,
            control: File::from(control_write),
            results: pipe::Receiver::from_owned_fd(results_read).map_err(ExecutorError::Pipe)?,
            inbox: BytesMut::with_capacity(64 * 1024),
            results_closed: false,
            results_closed_at: None,
            ready: false,
            init_error: None,
            exit: None,
            exit_signal: None,
            exit_code: None,
            died_at: None,
            killed_because: None,
        };
        tracing::debug!(pid, generation, python = %self.config.python.display(), "started a Python worker");
        self.worker = Some(worker);
        Ok(())
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Some(worker) = &self.worker {
            kill_group(worker.pid);
        }
    }
}

/// The outcome of a blocking task (a large frame's encoding or decoding);
/// pending while there is none.
async fn encoded<T>(
    task: &mut Option<JoinHandle<Result<T, FrameError>>>,
) -> Result<Result<T, FrameError>, JoinError> {
    match task {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

impl Worker {
    /// Queues `envelope` for the commands pipe, after a large command
    /// still being encoded, and writes what the pipe takes now.
    fn write(&mut self, framing: &Framing, envelope: &Envelope) -> Result<(), FrameError> {
        if self.encoding.is_some() {
            return framing.encode(envelope, &mut self.held);
        }
        framing.encode(envelope, &mut self.out)?;
        self.flush_out();
        Ok(())
    }

    /// Writes what the commands pipe takes now; the rest waits for it to
    /// be writable.
    fn flush_out(&mut self) {
        while !self.out.is_empty() {
            match self.commands.try_write(&self.out) {
                Ok(n) => self.out.advance(n),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // The worker is gone; its death is reported when seen.
                    self.out.clear();
                    return;
                }
            }
        }
    }

    /// When the worker next needs looking at without I/O.
    fn deadline(&self) -> Option<Instant> {
        match (self.died_at, self.results_closed_at) {
            (Some(died), _) => Some(died + STRAGGLER_WAIT),
            (None, Some(closed)) if self.killed_because.is_none() => Some(closed + STRAGGLER_WAIT),
            _ => None,
        }
    }

    fn broken(&mut self, why: KillReason) {
        tracing::warn!(pid = self.pid, %why, "killing the Python worker");
        self.killed_because = Some(why);
        self.kill_group();
    }

    fn kill_group(&self) {
        kill_group(self.pid);
    }
}

impl OutputStream {
    fn new(generation: u64, level: LogLevel, reader: Pin<Box<dyn AsyncRead + Send>>) -> Self {
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
fn poll_streams(
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

/// Sleeps until `at`, or forever.
fn sleep_until(at: Option<Instant>) -> impl Future<Output = ()> {
    let sleep = at.map(tokio::time::sleep_until);
    async move {
        match sleep {
            Some(sleep) => sleep.await,
            None => std::future::pending().await,
        }
    }
}

/// SIGKILL to a worker's process group; gone already is fine.
fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// How a process ended, in words: "killed by signal 11 (SIGSEGV)".
pub(crate) fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    let Some(number) = status.signal() else {
        return format!("ended ({status})");
    };
    let name = Signal::try_from(number).map_or("unknown signal", Signal::as_str);
    let mut text = format!("killed by signal {number} ({name})");
    if status.core_dumped() {
        text.push_str(", core dumped");
    }
    text
}

/// What ran before the first command: the init script, or without one
/// CASA's namespace (`--casa`).
fn start_up(init: &Path) -> String {
    if init.as_os_str().is_empty() {
        "taking CASA's namespace (--casa)".into()
    } else {
        format!("the init script {}", init.display())
    }
}

/// The level of a line in the format of CASA's log on the console
/// (`2026-12-04 23:01:07<TAB>WARN<TAB>origin<TAB>message`), which the workers
/// of `--casa` write on stderr: its priority, not stderr's WARNING.
fn casa_line_level(line: &str) -> Option<LogLevel> {
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

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl ExecutorConfig {
    /// A configuration running `python` with no init script, in the
    /// server's working directory and environment.
    pub fn new(python: impl AsRef<Path>, rank: Rank) -> Self {
        ExecutorConfig {
            python: python.as_ref().to_path_buf(),
            init: None,
            casa: None,
            working_directory: None,
            environment: Vec::new(),
            rank,
        }
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
