//! The driver commands of the CLI: `submit`, `get`, `status`, `stop`. Each
//! connects to the front door with the [`Client`], does one thing, and
//! prints for people or for scripts.

use casa_node_protocol::pb::{ServerStatus, StatusReply};
use casa_node_protocol::{Rank, RequestId};
use std::io::Write;
use std::time::Duration;

use crate::client::{Client, ClientError, Submit, Target};
use crate::json;
use crate::log::format_time;

/// How a command ended, for the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything succeeded: exit 0.
    Success,
    /// A command ran and failed, timed out or was cancelled: exit 1.
    Failed,
}

/// `casa-node submit`: pushes `submit`, then prints each response record
/// as one JSON line in id order, or with `no_wait` the ids, one per line.
/// Should the client node go away while the responses are awaited, and
/// its cluster keep a journal (rule 33), it is looked for again through
/// `find` for up to `patience`, and the requests claimed from the one that
/// took its place.
pub async fn submit(
    find: impl Fn() -> Result<Target, ClientError>,
    submit: Submit,
    no_wait: bool,
    patience: Duration,
) -> Result<Outcome, ClientError> {
    let mut client = Client::connect_to(&find()?).await?;
    // Without the wait, the refusal must still be reported (exit 2) before
    // exiting: ask for the client node's answer.
    let ids = if no_wait {
        client.submit_confirmed(submit).await?
    } else {
        client.submit(submit).await?
    };
    let mut out = std::io::stdout().lock();
    if no_wait {
        for id in &ids {
            let _ = writeln!(out, "{id}");
        }
        return Ok(Outcome::Success);
    }
    drop(out);
    let responses = loop {
        match client.wait(&ids).await {
            Err(ClientError::Disconnected) if client.cluster().journal && !patience.is_zero() => {
                client = reconnect(&find, patience).await?;
                let reply = client.claim(&ids).await?;
                if !reply.unknown.is_empty() {
                    return Err(ClientError::UnknownIds(reply.unknown));
                }
            }
            other => break other?,
        }
    };
    let mut out = std::io::stdout().lock();
    let mut outcome = Outcome::Success;
    for response in &responses {
        if !response.successful {
            outcome = Outcome::Failed;
        }
        let _ = writeln!(out, "{}", json::response(response));
    }
    Ok(outcome)
}

/// A client of the client node that `find` finds, tried again and again
/// (every 200 ms, then less often, up to a second) for up to `patience`:
/// a client node restarted from its journal takes a moment to open its
/// front door, and records where.
async fn reconnect(
    find: &impl Fn() -> Result<Target, ClientError>,
    patience: Duration,
) -> Result<Client, ClientError> {
    let end = tokio::time::Instant::now() + patience;
    let mut pause = Duration::from_millis(200);
    loop {
        let tried = match find() {
            Ok(target) => Client::connect_to(&target).await,
            Err(e) => Err(e),
        };
        match tried {
            Ok(client) => return Ok(client),
            Err(e) if tokio::time::Instant::now() + pause >= end => return Err(e),
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// `casa-node get`: the response records of `ids`, whoever submitted them
/// (rule 33), one JSON line each in id order. With `wait`, pending ones
/// are waited for; without, each is a line `{"id": N, "status":
/// "pending"}`, and the exit status says not all succeeded.
pub async fn get(target: &Target, ids: &[RequestId], wait: bool) -> Result<Outcome, ClientError> {
    let client = Client::connect_to(target).await?;
    let reply = client.claim(ids).await?;
    if !reply.unknown.is_empty() {
        return Err(ClientError::UnknownIds(reply.unknown));
    }
    let wanted = if wait { ids } else { &reply.answered[..] };
    let responses = client.wait(wanted).await?;
    let mut outcome = Outcome::Success;
    let mut lines: Vec<(RequestId, String)> = responses
        .iter()
        .map(|response| {
            if !response.successful {
                outcome = Outcome::Failed;
            }
            (response.id, json::response(response).to_string())
        })
        .collect();
    if !wait {
        for &id in &reply.pending {
            outcome = Outcome::Failed;
            lines.push((
                id,
                serde_json::json!({"id": id, "status": "pending"}).to_string(),
            ));
        }
    }
    lines.sort_by_key(|(id, _)| *id);
    lines.dedup_by_key(|(id, _)| *id);
    let mut out = std::io::stdout().lock();
    for (_, line) in lines {
        let _ = writeln!(out, "{line}");
    }
    Ok(outcome)
}

/// `casa-node status`: the server table (rule 23), as text or JSON.
pub async fn status(
    target: &Target,
    server: Option<Rank>,
    as_json: bool,
) -> Result<Outcome, ClientError> {
    let client = Client::connect_to(target).await?;
    let reply = client.status(server).await?;
    let text = if as_json {
        status_json(&reply).to_string() + "\n"
    } else {
        status_table(&reply)
    };
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(Outcome::Success)
}

/// `casa-node stop`: stops services and waits until the client node has
/// gone (running commands finish first unless `force`).
pub async fn stop(target: &Target, force: bool) -> Result<Outcome, ClientError> {
    let client = Client::connect_to(target).await?;
    client.stop(force).await?;
    client.closed().await;
    Ok(Outcome::Success)
}

fn status_json(reply: &StatusReply) -> serde_json::Value {
    let servers: Vec<serde_json::Value> = reply
        .servers
        .iter()
        .map(|s| {
            serde_json::json!({
                "rank": s.rank,
                "processor": s.processor,
                "pid": s.pid,
                "worker_pid": (s.worker_pid != 0).then_some(s.worker_pid),
                "busy": s.busy,
                "command": if s.busy { Some(&s.command) } else { None },
                "command_id": if s.busy { Some(s.command_id) } else { None },
                "command_start_time": if s.busy { Some(s.command_start_time) } else { None },
                "timeout": s.timeout,
                "online": s.online,
                "last_ping": s.last_ping,
                "rss": s.rss,
            })
        })
        .collect();
    let cluster = reply.cluster.clone().unwrap_or_default();
    serde_json::json!({
        "servers": servers,
        "queued": reply.queued,
        "transport": cluster.transport,
        "host": cluster.host,
        "heartbeat": cluster.heartbeat_seconds,
        "timeout": cluster.timeout_seconds,
        "debugging": cluster.debugging,
    })
}

fn status_table(reply: &StatusReply) -> String {
    let header = [
        "RANK",
        "HOST",
        "PID",
        "WORKER",
        "STATE",
        "RSS",
        "LAST PING",
        "COMMAND",
    ];
    let rows: Vec<[String; 8]> = reply.servers.iter().map(row).collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for r in &rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let cluster = reply.cluster.clone().unwrap_or_default();
    out.push_str(&format!(
        "{} servers, {} queued; transport {}, heartbeat {} s, timeout {} s{}\n",
        reply.servers.len(),
        reply.queued,
        cluster.transport,
        cluster.heartbeat_seconds,
        cluster.timeout_seconds,
        if cluster.debugging {
            ", debugging mode"
        } else {
            ""
        }
    ));
    out
}

fn row(s: &ServerStatus) -> [String; 8] {
    let state = match (s.online, s.timeout, s.busy) {
        (_, true, _) => "timeout",
        (false, _, _) => "offline",
        (true, _, true) => "busy",
        (true, _, false) => "idle",
    };
    let command = if s.busy {
        let mut c: String = s
            .command
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(60)
            .collect();
        if c.len() < s.command.len() {
            c.push('…');
        }
        format!("#{} {c}", s.command_id)
    } else {
        String::new()
    };
    [
        s.rank.to_string(),
        s.processor.clone(),
        s.pid.to_string(),
        if s.worker_pid != 0 {
            s.worker_pid.to_string()
        } else {
            "-".into()
        },
        state.to_owned(),
        format!("{:.1} MiB", s.rss as f64 / (1024.0 * 1024.0)),
        if s.last_ping > 0.0 {
            format_time(s.last_ping)
        } else {
            "never".into()
        },
        command,
    ]
}
