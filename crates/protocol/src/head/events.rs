//! What happens in the head node, as its log tells it (rule 32).

use std::fmt;
use std::time::Duration;

use crate::pb::LogLevel;
use crate::{Rank, RequestId};

/// What happened in the head node, for its log. Cheap to create: the
/// text is made only when it is written.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A server acknowledged START (rule 26).
    ServerStarted {
        /// Its rank.
        rank: Rank,
        /// Its host.
        host: String,
        /// Its process id.
        pid: u32,
    },
    /// A server refused START.
    ServerStartFailed {
        /// Its rank.
        rank: Rank,
        /// Its reason.
        error: String,
    },
    /// The cluster is ready: the expected number of servers joined, and
    /// every one still there acknowledged START. Emitted once.
    AllServersStarted,
    /// A request went to a server (rule 32).
    RequestSent {
        /// The request.
        id: RequestId,
        /// The server.
        server: Rank,
    },
    /// A request sent ahead to a busy server was taken back from it, not
    /// started, for a server that fell idle (rule 12).
    RequestRecalled {
        /// The request.
        id: RequestId,
        /// The server it was taken back from.
        server: Rank,
    },
    /// A request's command succeeded (rule 32).
    RequestSucceeded {
        /// The request.
        id: RequestId,
        /// The server.
        server: Rank,
    },
    /// A request's command failed (rule 32).
    RequestFailed {
        /// The request.
        id: RequestId,
        /// The server.
        server: Rank,
        /// The traceback or reason.
        traceback: String,
    },
    /// A request was answered with status timeout because its server timed
    /// out or was lost (rule 20).
    RequestTimedOut {
        /// The request.
        id: RequestId,
        /// The server.
        server: Rank,
    },
    /// A server's real response replaced its timeout record (rule 21).
    ResponseRecovered {
        /// The request.
        id: RequestId,
        /// The server.
        server: Rank,
    },
    /// A server did not answer within the timeout (rule 20).
    ServerTimedOut {
        /// Its rank.
        rank: Rank,
        /// How long it had been silent.
        silent_for: Duration,
    },
    /// A timed-out server answered again (rule 21).
    ServerRecovered {
        /// Its rank.
        rank: Rank,
    },
    /// A server's link closed for good.
    ServerLost {
        /// Its rank.
        rank: Rank,
    },
    /// Stop services began (rule 27).
    StoppingServices {
        /// Whether running commands are interrupted.
        force: bool,
    },
    /// A server acknowledged STOP.
    ServerStopped {
        /// Its rank.
        rank: Rank,
    },
    /// Debugging mode was switched (rule 22).
    DebuggingMode {
        /// On or off.
        enabled: bool,
    },
    /// The head node itself did not run for a while (stopped, starved or
    /// swapping): the servers' silence in that time is not counted against
    /// them (rule 20).
    Stalled {
        /// How long it did not run.
        stalled_for: Duration,
    },
    /// Every server has left for good: requests without a target can
    /// never run, and are answered (rule 20).
    NoServerLeft {
        /// The servers' ranks, as "1-4".
        ranks: String,
    },
}

impl Event {
    /// The level the event is logged at.
    pub fn level(&self) -> LogLevel {
        match self {
            Event::ServerStartFailed { .. }
            | Event::RequestTimedOut { .. }
            | Event::ServerTimedOut { .. }
            | Event::ServerLost { .. }
            | Event::Stalled { .. } => LogLevel::Warning,
            Event::NoServerLeft { .. } => LogLevel::Error,
            _ => LogLevel::Info,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::ServerStarted { rank, host, pid } => {
                write!(
                    f,
                    "Server with rank {rank} started at {host} with PID {pid}"
                )
            }
            Event::ServerStartFailed { rank, error } => {
                write!(f, "Server with rank {rank} failed to start: {error}")
            }
            Event::AllServersStarted => {
                f.write_str("Received response from all servers to start service signal")
            }
            Event::RequestSent { id, server } => {
                write!(
                    f,
                    "Command request with id# {id} sent to server n# {server}"
                )
            }
            Event::RequestRecalled { id, server } => {
                write!(
                    f,
                    "Command request with id# {id} taken back from server n# {server}, where it waited, for an idle server"
                )
            }
            Event::RequestSucceeded { id, server } => {
                write!(
                    f,
                    "Command request with id {id} successfully handled by server n# {server}"
                )
            }
            Event::RequestFailed {
                id,
                server,
                traceback,
            } => write!(
                f,
                "Command request with id {id} failed in server n# {server} with traceback {traceback}"
            ),
            Event::RequestTimedOut { id, server } => {
                write!(
                    f,
                    "Command request with id {id} timed out: server n# {server} is not responding"
                )
            }
            Event::ResponseRecovered { id, server } => write!(
                f,
                "Command request with id {id} answered by recovered server n# {server}; the response replaces the timeout"
            ),
            Event::ServerTimedOut { rank, silent_for } => write!(
                f,
                "Server n# {rank} timed out: no answer for {:.1} s",
                silent_for.as_secs_f64()
            ),
            Event::ServerRecovered { rank } => write!(f, "Server n# {rank} recovered from timeout"),
            Event::ServerLost { rank } => write!(f, "Server n# {rank} disconnected"),
            Event::NoServerLeft { ranks } => write!(
                f,
                "No server is left: every server (n# {ranks}) has left for good; requests without a target are answered as failed, and new ones refused"
            ),
            Event::StoppingServices { force: false } => {
                f.write_str("Sending stop service signal to all servers")
            }
            Event::StoppingServices { force: true } => {
                f.write_str("Sending forced stop service signal to all servers")
            }
            Event::ServerStopped { rank } => write!(f, "Server n# {rank} stopped"),
            Event::DebuggingMode { enabled: true } => {
                f.write_str("Debugging mode on: servers will not be marked timed out")
            }
            Event::DebuggingMode { enabled: false } => f.write_str("Debugging mode off"),
            Event::Stalled { stalled_for } => write!(
                f,
                "The head node did not run for {:.1} s (stopped, starved or swapping); the servers' silence in that time is not counted",
                stalled_for.as_secs_f64()
            ),
        }
    }
}
