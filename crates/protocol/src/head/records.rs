//! Response records the head core makes: a server's answer completed
//! with what the request carried, and the failures it answers itself.

use crate::pb::{CommandMode, CommandResponse, CommandStatus, FailureKind, Parameter, Value};
use crate::{Rank, RequestId};

/// The response record (rule 9) of a request (its `command`, `mode` and
/// `parameters`) that server `from` answered with `answer`: the mode the
/// command ran in when the answer names it, `ret` None when absent, and the
/// answer's own status, or `response received`.
pub fn response_record(
    command: String,
    mode: CommandMode,
    parameters: Vec<Parameter>,
    from: Rank,
    answer: CommandResponse,
) -> CommandResponse {
    let status = match answer.status() {
        CommandStatus::Unspecified | CommandStatus::HoldingQueue | CommandStatus::RequestSent => {
            CommandStatus::ResponseReceived
        }
        status => status,
    };
    let mode = match answer.mode() {
        CommandMode::Unspecified => mode,
        mode => mode,
    };
    // A failure from a server that does not say which kind raised.
    let failure = match answer.failure() {
        FailureKind::None if !answer.successful => FailureKind::Raised.into(),
        _ => answer.failure,
    };
    CommandResponse {
        id: answer.id,
        command,
        mode: mode.into(),
        parameters,
        ret: Some(answer.ret.unwrap_or_else(Value::none)),
        server: from,
        status: status.into(),
        successful: answer.successful,
        traceback: answer.traceback,
        command_start_time: answer.command_start_time,
        command_stop_time: answer.command_stop_time,
        worker_restarted: answer.worker_restarted,
        failure,
        worker_signal: answer.worker_signal,
        worker_exit_code: answer.worker_exit_code,
    }
}

/// The record of a request answered here rather than by its server:
/// failed, `ret` None, no times, `failure` saying what kind and
/// `traceback` why.
#[allow(clippy::too_many_arguments)]
pub(super) fn failure_record(
    id: RequestId,
    command: String,
    mode: CommandMode,
    parameters: Vec<Parameter>,
    server: Rank,
    status: CommandStatus,
    failure: FailureKind,
    traceback: String,
) -> CommandResponse {
    CommandResponse {
        id,
        command,
        mode: mode.into(),
        parameters,
        ret: Some(Value::none()),
        server,
        status: status.into(),
        successful: false,
        traceback: Some(traceback),
        failure: failure.into(),
        ..CommandResponse::default()
    }
}
