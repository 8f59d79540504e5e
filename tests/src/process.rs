//! Processes, for the tests and benchmarks that start real ones (Linux):
//!
//! - the MPI launcher ([`mpirun`]), set up to keep a job on this machine;
//! - what `/proc` says about a process ([`stat`]), so that everything a
//!   test started can be found ([`descendants`], [`children`]) and stopped
//!   by PID, telling a process from a later one given the same PID by its
//!   start time ([`alive`]);
//! - a child's pipes, read to the end in the background ([`drain`],
//!   [`collect`], or line by line: [`lines`]), so that a chatty child never
//!   blocks on a full pipe.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// The MPI launcher: `mpirun`, else `mpiexec`, from `PATH`.
pub fn mpi_launcher() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["mpirun", "mpiexec"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err("neither mpirun nor mpiexec is on PATH: install an MPI (Debian: openmpi-bin)".into())
}

/// True when `launcher` is Open MPI's.
fn is_open_mpi(launcher: &Path) -> bool {
    Command::new(launcher)
        .arg("--version")
        .output()
        .map(|out| {
            let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
            text.contains("Open MPI") || text.contains("OpenRTE")
        })
        .unwrap_or(false)
}

/// `mpirun -n RANKS` (the [`mpi_launcher`]), for the caller to add the
/// program and its arguments to.
///
/// Under Open MPI, the job stays on this machine and runs anywhere: shared
/// memory between the ranks, loopback for the runtime, no binding to
/// cores, more ranks than cores allowed, and `--allow-run-as-root` when
/// run as root. The launcher is looked for, and asked whether it is Open
/// MPI, once per process.
pub fn mpirun(ranks: usize) -> Result<Command, String> {
    static FOUND: OnceLock<Result<(PathBuf, bool), String>> = OnceLock::new();
    let (launcher, open_mpi) = FOUND
        .get_or_init(|| {
            let launcher = mpi_launcher()?;
            let open_mpi = is_open_mpi(&launcher);
            Ok((launcher, open_mpi))
        })
        .clone()?;
    let mut command = Command::new(launcher);
    if open_mpi {
        if nix::unistd::geteuid().is_root() {
            command.arg("--allow-run-as-root");
        }
        command
            .arg("--oversubscribe")
            // Shared memory within the machine, loopback for the runtime.
            .env("OMPI_MCA_pml", "ob1")
            .env("OMPI_MCA_btl", "self,vader")
            .env("OMPI_MCA_btl_tcp_if_include", "lo")
            .env("OMPI_MCA_oob_tcp_if_include", "lo")
            .env("OMPI_MCA_hwloc_base_binding_policy", "none");
    }
    command.arg("-n").arg(ranks.to_string());
    Ok(command)
}

/// [`mpirun`] for a job that may start while others do. Open MPI 4 makes
/// its shared session directory (`/tmp/ompi.HOST.UID`) racily: two jobs
/// starting at once can fail with "mkdir: File exists". The job keeps its
/// session under `dir` instead, a directory of the caller's, which the
/// caller removes.
pub fn mpirun_in(ranks: usize, dir: &Path) -> Result<Command, String> {
    let mut command = mpirun(ranks)?;
    command.env("OMPI_MCA_orte_tmpdir_base", dir);
    Ok(command)
}

/// A process as `/proc/PID/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Its parent.
    pub ppid: Pid,
    /// Its state: `R`, `S`, `D`, `T`, `Z` (a zombie), ….
    pub state: char,
    /// When it started, in clock ticks since boot: with the PID, this
    /// tells it from a later process given the same PID.
    pub started: u64,
}

/// What `/proc` shows of `pid`; `None` once it is gone (reaped).
pub fn stat(pid: Pid) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses,
    // and the start time is the 22nd field of the line.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let started = fields.get(19)?.parse().ok()?;
    Some(ProcStat {
        ppid: Pid::from_raw(ppid),
        state,
        started,
    })
}

/// True while `pid` is the process that started at `started` and is not
/// a zombie.
pub fn alive(pid: Pid, started: u64) -> bool {
    stat(pid).is_some_and(|s| s.started == started && s.state != 'Z')
}

/// Every process, with what `/proc` shows of it.
pub fn processes() -> Vec<(Pid, ProcStat)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let pid = Pid::from_raw(pid);
            Some((pid, stat(pid)?))
        })
        .collect()
}

/// The processes whose parent is `parent`.
pub fn children(parent: Pid) -> Vec<Pid> {
    processes()
        .into_iter()
        .filter(|(_, stat)| stat.ppid == parent)
        .map(|(pid, _)| pid)
        .collect()
}

/// The processes below `root` (its children, theirs, …), with their start
/// times.
pub fn descendants(root: Pid) -> Vec<(Pid, u64)> {
    let all = processes();
    let mut found = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for &(pid, stat) in &all {
            if stat.ppid == parent {
                found.push((pid, stat.started));
                parents.push(pid);
            }
        }
    }
    found
}

/// Waits up to `limit` for `pid` to be gone (or a zombie, which another
/// process has to reap); true if it is.
pub fn wait_gone(pid: Pid, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        if stat(pid).is_none_or(|s| s.state == 'Z') {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads `pipe` to its end on a thread of its own, and sends what it read
/// (as UTF-8, lossily); see [`collect`].
pub fn drain(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = pipe.read_to_end(&mut text);
        let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
    });
    rx
}

/// `pipe`'s lines, read on a thread of their own until it closes, so that
/// a child never blocks on a full pipe however few of them are taken.
pub fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// What [`drain`] read. A pipe still held open after the child's end (by a
/// process it left behind) gives up after 10 s, with
/// `(output not closed)`.
pub fn collect(rx: mpsc::Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| "(output not closed)\n".to_owned())
}

/// Waits up to `limit` for `child` to exit; its status, or `None` if it
/// still runs.
pub fn wait_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `command` to its end, its standard input closed and its standard
/// error captured, killed by PID (and reaped) should it still run after
/// `limit`: its exit status (`None` if it had to be killed) and what it
/// wrote on standard error.
pub fn run_to_end(
    command: &mut Command,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?} does not start: {e}"));
    let stderr = drain(child.stderr.take().expect("piped"));
    let status = wait_exit(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (status, collect(stderr))
}

/// Every process seen below some roots, by PID and start time, so that a
/// test can tell which of them are still running after it has stopped
/// them, and stop by PID whatever is left, without ever touching a later
/// process that was given one of the same PIDs.
#[derive(Debug, Default)]
pub struct ProcessSet {
    seen: std::sync::Mutex<std::collections::BTreeMap<i32, u64>>,
}

impl ProcessSet {
    /// An empty set.
    pub fn new() -> Self {
        ProcessSet::default()
    }

    /// Adds `pid` as it is now; false if it is already gone.
    pub fn note(&self, pid: Pid) -> bool {
        match stat(pid) {
            Some(s) if s.state != 'Z' => {
                self.seen
                    .lock()
                    .expect("process set")
                    .insert(pid.as_raw(), s.started);
                true
            }
            _ => false,
        }
    }

    /// Adds `root` and every process below it as they are now.
    pub fn note_tree(&self, root: Pid) {
        self.note(root);
        let found = descendants(root);
        let mut seen = self.seen.lock().expect("process set");
        for (pid, started) in found {
            seen.insert(pid.as_raw(), started);
        }
    }

    /// The processes seen so far, with their start times.
    pub fn seen(&self) -> Vec<(Pid, u64)> {
        self.seen
            .lock()
            .expect("process set")
            .iter()
            .map(|(&pid, &started)| (Pid::from_raw(pid), started))
            .collect()
    }

    /// The processes seen that are still running after waiting up to
    /// `limit` for all of them to end.
    pub fn survivors(&self, limit: Duration) -> Vec<Pid> {
        let end = Instant::now() + limit;
        loop {
            let left: Vec<Pid> = self
                .seen()
                .into_iter()
                .filter(|&(pid, started)| alive(pid, started))
                .map(|(pid, _)| pid)
                .collect();
            if left.is_empty() || Instant::now() >= end {
                return left;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to every process seen that still runs.
    pub fn signal_all(&self, signal: nix::sys::signal::Signal) {
        for (pid, started) in self.seen() {
            if alive(pid, started) {
                let _ = nix::sys::signal::kill(pid, signal);
            }
        }
    }

    /// Stops what is left: SIGCONT (a stopped process cannot act on what
    /// follows), then SIGKILL to each that still runs.
    pub fn kill_all(&self) {
        self.signal_all(nix::sys::signal::Signal::SIGCONT);
        self.signal_all(nix::sys::signal::Signal::SIGKILL);
    }
}

/// A child process that is killed (SIGCONT then SIGKILL, by PID) and
/// reaped when dropped, unless it has ended by then.
#[derive(Debug)]
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    /// Waits up to `limit` for the child to end; its status if it did.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.0, limit)
    }

    /// The child's PID.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.0.id() as i32)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGCONT);
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
