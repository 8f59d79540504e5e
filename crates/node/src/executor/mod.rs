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

mod death;
mod output;
mod spawn;
mod state;
mod supervisor;

use death::{Death, KillReason, Restart};
use output::{OutputStream, poll_streams};
use spawn::start_up;
use state::{Exit, WorkerState};
use supervisor::Supervisor;

/// The worker's source, passed to the interpreter with `-c`.
pub const WORKER_SOURCE: &str = include_str!("../worker.py");

// One argument to exec may not exceed 32 pages (Linux's MAX_ARG_STRLEN).
const _: () = assert!(WORKER_SOURCE.len() < 128 * 1024);

/// The worker's descriptors for the commands, results and control pipes.
const WORKER_FDS: [i32; 3] = [3, 4, 5];

/// How long a dead worker's output may take to reach its end once the
/// worker is gone (a process that escaped its group may hold a pipe open).
const STRAGGLER_WAIT: Duration = Duration::from_secs(1);

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
    /// The worker died while idle and the one started in its place died
    /// too before it was ready: no worker is left, and later commands
    /// fail with [`ExecutorError::NoWorker`].
    NoWorkerLeft {
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
    /// Set when the first start fails: its worker ended before it was
    /// ready, or its init script raised.
    start_failure: Option<ExecutorError>,
    /// Decides what follows a worker's death.
    supervisor: Supervisor,
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
    /// When the results pipe reached its end, or was given up on after a
    /// malformed frame; nothing more is read from it after that.
    results_closed: Option<Instant>,
    /// Where it is in its life.
    state: WorkerState,
}

#[derive(Debug, Clone, Copy)]
struct Running {
    id: RequestId,
    mode: CommandMode,
    start_time: f64,
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
            supervisor: Supervisor::default(),
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
                executor.shutdown().await;
                return Err(error);
            }
            if executor
                .worker
                .as_ref()
                .is_some_and(|w| w.state.has_been_ready())
            {
                return Ok(executor);
            }
            executor.step().await;
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
            // One killed already for another reason is killed again, and
            // the order becomes the reason.
            if matches!(
                worker.state,
                WorkerState::Ready | WorkerState::Killed { ready: true, .. }
            ) {
                worker.state.on_kill(KillReason::Ordered);
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
            .filter(|w| w.state.is_alive())
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
            state,
            ..
        } = worker;
        drop((commands, control, results));
        if state.is_alive()
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
            r = w.results.read_buf(&mut w.inbox), if w.results_closed.is_none() => Io::Results(r),
            s = w.child.wait(), if w.state.is_alive() => Io::Exited(s),
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
                    w.results_closed.get_or_insert_with(Instant::now);
                }
            }
            Io::Exited(status) => {
                let Some(w) = self.worker.as_mut() else {
                    return;
                };
                let (description, death) = match status {
                    Ok(status) => (
                        describe_exit(status),
                        Death {
                            signal: status.signal(),
                            exit_code: status.code(),
                        },
                    ),
                    Err(error) => (
                        format!("ended in a way that could not be read ({error})"),
                        Death::default(),
                    ),
                };
                tracing::debug!(pid = w.pid, %description, "the Python worker ended");
                w.state.on_exit(Instant::now(), description, death);
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
                        .results_closed
                        .is_some_and(|t| Instant::now() >= t + STRAGGLER_WAIT);
                    let alive_unkilled =
                        matches!(w.state, WorkerState::Starting | WorkerState::Ready);
                    if alive_unkilled && closed_long_ago {
                        w.broken(KillReason::ResultsClosed);
                    }
                }
            }
        }
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
        w.results_closed.get_or_insert_with(Instant::now);
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
                w.state.on_ready();
                self.supervisor.worker_ready();
                tracing::debug!(pid = w.pid, "the Python worker is ready");
                let init_error = (!ready.ok).then_some(ready.error);
                match self.restart.take() {
                    Some(restart) => {
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
                    // No death waits for this worker: it is the first one
                    // (or one started in place of a first one killed while
                    // starting), and `ready` reports the failure.
                    None => {
                        if let Some(traceback) = init_error {
                            let path = self.config.init.clone().unwrap_or_default();
                            self.start_failure = Some(ExecutorError::Init { path, traceback });
                        }
                    }
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
        match &self.state {
            WorkerState::Exited(exit) => Some(exit.at + STRAGGLER_WAIT),
            WorkerState::Starting | WorkerState::Ready => {
                self.results_closed.map(|closed| closed + STRAGGLER_WAIT)
            }
            WorkerState::Killed { .. } => None,
        }
    }

    fn broken(&mut self, why: KillReason) {
        tracing::warn!(pid = self.pid, %why, "killing the Python worker");
        self.state.on_kill(why);
        self.kill_group();
    }

    fn kill_group(&self) {
        kill_group(self.pid);
    }
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
