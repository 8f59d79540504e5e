//! The driver commands of the CLI: `submit`, `get`, `status`, `stop`. Each
//! connects to the front door with the [`Client`], does one thing, and
//! prints for people or for scripts; `status --watch` goes on printing
//! until it is interrupted.

use casa_node_protocol::pb::{ServerStatus, StatusReply};
use casa_node_protocol::{Rank, RequestId};
use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

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
/// Should the head node go away while the responses are awaited, and
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
    // exiting: ask for the head node's answer.
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

/// A client of the head node that `find` finds, tried again and again
/// (every 200 ms, then less often, up to a second) for up to `patience`:
/// a head node restarted from its journal takes a moment to open its
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

/// What `casa-node status --watch` shows, and how often.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// Only this server.
    pub server: Option<Rank>,
    /// One JSON object per snapshot and line (NDJSON) instead of a table.
    pub json: bool,
    /// The time between snapshots.
    pub interval: Duration,
}

/// `casa-node status --watch`: the server table (rule 23) every
/// `interval`, under a line with the time and the servers counted by
/// state, until SIGINT or SIGTERM (counted by `signals`, see
/// [`crate::signals`]), which end it with success. On a terminal the table
/// is redrawn in place, cut to the terminal's size, its states coloured
/// unless `NO_COLOR` is set; otherwise each snapshot is a block of lines
/// followed by a blank line, and with `json` a JSON object on one line.
/// Should the head node go away, it fails with [`ClientError::Gone`].
pub async fn status_watch(
    target: &Target,
    options: WatchOptions,
    mut signals: watch::Receiver<u32>,
) -> Result<Outcome, ClientError> {
    let client = Client::connect_to(target).await?;
    let gone = || ClientError::Gone(target.endpoint.to_string());
    let terminal = std::io::stdout().is_terminal();
    let mut screen = Screen {
        terminal: terminal && !options.json,
        colour: colour_wanted(terminal) && !options.json,
        drawn: false,
    };
    let mut ticks = tokio::time::interval(options.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = interrupted(&mut signals) => return Ok(Outcome::Success),
            () = client.closed() => return Err(gone()),
            _ = ticks.tick() => {}
        }
        let reply = tokio::select! {
            biased;
            () = interrupted(&mut signals) => return Ok(Outcome::Success),
            reply = client.status(options.server) => match reply {
                Err(ClientError::Disconnected) => return Err(gone()),
                other => other?,
            },
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let shown = if options.json {
            let mut snapshot = status_json(&reply);
            snapshot["time"] = now.into();
            screen.lines(&[snapshot.to_string()])
        } else {
            let mut lines = vec![snapshot_header(&reply, now, options.interval)];
            lines.extend(status_lines(&reply, screen.colour));
            screen.frame(lines)
        };
        // A closed stdout (a pager or `head` that has ended) ends the watch.
        if shown.is_err() {
            return Ok(Outcome::Success);
        }
    }
}

/// Completes when a SIGINT or SIGTERM arrives; never if they cannot be
/// watched.
async fn interrupted(signals: &mut watch::Receiver<u32>) {
    if signals.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Whether to colour what goes to a stream: only a terminal, and never
/// with `NO_COLOR` set to anything but the empty string (no-color.org).
pub fn colour_wanted(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Standard output as `status --watch` writes it.
struct Screen {
    /// Redraw in place (cursor home, clear to the end), cut to the
    /// terminal's size.
    terminal: bool,
    /// The states in colour (on a terminal, without `NO_COLOR`).
    colour: bool,
    /// A frame was drawn, and the cursor hidden.
    drawn: bool,
}

impl Screen {
    /// A snapshot of lines: on a terminal drawn over the last one, else
    /// followed by a blank line.
    fn frame(&mut self, mut lines: Vec<String>) -> std::io::Result<()> {
        if !self.terminal {
            lines.push(String::new());
            return self.lines(&lines);
        }
        let size = rustix::termios::tcgetwinsize(std::io::stdout()).ok();
        let (rows, columns) =
            size.map_or((0, 0), |s| (usize::from(s.ws_row), usize::from(s.ws_col)));
        // The cursor rests on the line below the last: one more would
        // scroll the screen, and the next frame would start too low.
        if rows > 1 && lines.len() > rows - 1 {
            // The header line, the column heads, the first servers, a line
            // for the rest, the footer.
            let footer = lines.pop().unwrap_or_default();
            let keep = (rows - 1).saturating_sub(2).max(2);
            let hidden = lines.len().saturating_sub(keep);
            lines.truncate(keep);
            lines.push(format!(
                "… {hidden} more server{}: a taller terminal shows them",
                if hidden == 1 { "" } else { "s" }
            ));
            lines.push(footer);
            lines.truncate(rows - 1);
        }
        // Writing the last column would leave the cursor there, where the
        // clear to the end of the line would erase it.
        let width = columns.saturating_sub(1);
        let mut text = String::from(if self.drawn {
            CURSOR_HOME
        } else {
            // Hide the cursor and start on a clear screen.
            "\x1b[?25l\x1b[H\x1b[2J"
        });
        for line in &lines {
            if width > 0 {
                text.push_str(&clip(line, width));
            } else {
                text.push_str(line);
            }
            text.push_str(CLEAR_LINE);
            text.push('\n');
        }
        text.push_str(CLEAR_BELOW);
        self.drawn = true;
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    }

    /// Lines as they are, each ending in a newline.
    fn lines(&self, lines: &[String]) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        for line in lines {
            writeln!(out, "{line}")?;
        }
        out.flush()
    }
}

impl Drop for Screen {
    /// The cursor shown again: the terminal is left as it was found.
    fn drop(&mut self) {
        if self.terminal && self.drawn {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(SHOW_CURSOR.as_bytes());
            let _ = out.flush();
        }
    }
}

const CURSOR_HOME: &str = "\x1b[H";
const CLEAR_LINE: &str = "\x1b[K";
const CLEAR_BELOW: &str = "\x1b[J";
const SHOW_CURSOR: &str = "\x1b[?25h";
const RESET: &str = "\x1b[0m";

/// `line` cut to `width` columns, the last shown as `…`; escape sequences
/// take no column, and colour is reset after a cut.
fn clip(line: &str, width: usize) -> String {
    if visible(line).count() <= width {
        return line.to_owned();
    }
    let mut out = String::new();
    let mut shown = 0;
    let mut chars = line.chars();
    while shown + 1 < width {
        let Some(c) = chars.next() else { break };
        out.push(c);
        if c == '\x1b' {
            out.extend(escape_sequence(&mut chars));
        } else {
            shown += 1;
        }
    }
    out.push('…');
    if line.contains('\x1b') {
        out.push_str(RESET);
    }
    out
}

/// The characters of `line` that take a column: all but its escape
/// sequences.
fn visible(line: &str) -> impl Iterator<Item = char> + '_ {
    let mut chars = line.chars();
    std::iter::from_fn(move || {
        loop {
            match chars.next()? {
                '\x1b' => escape_sequence(&mut chars).for_each(drop),
                c => return Some(c),
            }
        }
    })
}

/// The rest of an escape sequence whose ESC was just taken from `chars`:
/// for a CSI, `[`, its parameters and its final byte (`@` to `~`).
fn escape_sequence(chars: &mut std::str::Chars<'_>) -> impl Iterator<Item = char> {
    let mut rest = Vec::new();
    if chars.as_str().starts_with('[') {
        for c in chars.by_ref() {
            rest.push(c);
            if rest.len() > 1 && ('@'..='~').contains(&c) {
                break;
            }
        }
    }
    rest.into_iter()
}

/// The line above a snapshot: the time, and the servers by state.
fn snapshot_header(reply: &StatusReply, now: f64, interval: Duration) -> String {
    let mut counts = [0usize; 4];
    for s in &reply.servers {
        let i = match state(s) {
            "idle" => 0,
            "busy" => 1,
            "timeout" => 2,
            _ => 3,
        };
        counts[i] += 1;
    }
    let [idle, busy, timed_out, offline] = counts;
    let time = UNIX_EPOCH + Duration::from_secs_f64(now.max(0.0));
    let time = humantime::format_rfc3339_seconds(time).to_string();
    format!(
        "{}  servers: {idle} idle, {busy} busy, {timed_out} timed out, {offline} offline; every {}",
        time.trim_end_matches('Z').replacen('T', " ", 1),
        humantime::format_duration(interval)
    )
}

/// `casa-node stop`: stops services and waits until the head node has
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
    let mut out = String::new();
    for line in status_lines(reply, false) {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The table's lines (column heads, a row per server, a summary), without
/// newlines; with `colour`, each state in its colour.
fn status_lines(reply: &StatusReply, colour: bool) -> Vec<String> {
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
    let line = |cells: &[&str], colour: bool| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
                continue;
            }
            let padded = format!("{cell:<w$}  ", w = widths[i]);
            match state_colour(cell).filter(|_| colour && i == STATE_COLUMN) {
                Some(sgr) => {
                    text.push_str(sgr);
                    text.push_str(cell);
                    text.push_str(RESET);
                    text.push_str(&padded[cell.len()..]);
                }
                None => text.push_str(&padded),
            }
        }
        text.trim_end().to_owned()
    };
    let mut out = vec![line(&header, false)];
    for r in &rows {
        out.push(line(
            &r.iter().map(String::as_str).collect::<Vec<_>>(),
            colour,
        ));
    }
    let cluster = reply.cluster.clone().unwrap_or_default();
    out.push(format!(
        "{} servers, {} queued; transport {}, heartbeat {} s, timeout {} s{}",
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

/// Where a row's state is.
const STATE_COLUMN: usize = 4;

/// The colour (an SGR sequence) of a state: idle green, busy yellow,
/// timeout red, offline dim.
fn state_colour(state: &str) -> Option<&'static str> {
    match state {
        "idle" => Some("\x1b[32m"),
        "busy" => Some("\x1b[33m"),
        "timeout" => Some("\x1b[31m"),
        "offline" => Some("\x1b[2m"),
        _ => None,
    }
}

/// A server's state in the table: `idle`, `busy`, `timeout` or `offline`.
fn state(s: &ServerStatus) -> &'static str {
    match (s.online, s.timeout, s.busy) {
        (_, true, _) => "timeout",
        (false, _, _) => "offline",
        (true, _, true) => "busy",
        (true, _, false) => "idle",
    }
}

fn row(s: &ServerStatus) -> [String; 8] {
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
        state(s).to_owned(),
        format!("{:.1} MiB", s.rss as f64 / (1024.0 * 1024.0)),
        if s.last_ping > 0.0 {
            format_time(s.last_ping)
        } else {
            "never".into()
        },
        command,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_counts_only_what_takes_a_column() {
        let line = "1  \x1b[32midle\x1b[0m  35.1 MiB";
        assert_eq!(clip(line, 40), line);
        assert_eq!(visible(line).collect::<String>(), "1  idle  35.1 MiB");
        // Cut inside the coloured state: the colour is reset after it.
        assert_eq!(clip(line, 6), "1  \x1b[32mid…\x1b[0m");
        assert_eq!(clip("RANK  HOST", 5), "RANK…");
        assert_eq!(clip("RANK", 4), "RANK");
    }
}
