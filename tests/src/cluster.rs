//! A real cluster for the tests that need one (Linux): `casa-node up`, over
//! ZeroMQ or, when `CASA_NODE_TEST_TRANSPORT=mpi`, as an `mpirun` job of
//! servers + 1 ranks ([`Launch`]); its start-up lines read; every process
//! in its tree stopped by PID when it is dropped, passed or failed
//! ([`Cluster`]).
//!
//! The cluster lives in a directory of its own ([`scratch`]), removed with
//! it: its front door is the Unix socket `front.sock` there unless told
//! otherwise, its log `casa-node.log`, its runtime directory
//! (`XDG_RUNTIME_DIR`) `runtime/`, and its working directory the directory
//! itself. Its heartbeat is 0.2 s and its timeout 3 s unless told
//! otherwise. What `up` (or `mpirun`) writes on standard error is kept,
//! and echoed on the test's own standard error prefixed with `up: `.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::process::{ChildGuard, ProcessSet, descendants, lines, mpirun_in};

/// The longest any one wait of a test may take before the test fails (the
/// fault suite calls it a hang).
pub const WAIT: Duration = Duration::from_secs(60);

/// How long the processes of a cluster may take to end once it has
/// stopped, or once its head node is gone (its links close, or under MPI
/// mpirun ends the job), with room for a loaded machine.
pub const EXIT_BOUND: Duration = Duration::from_secs(20);

/// How long a cluster is given to end on SIGTERM when dropped before it is
/// killed.
const TERM_GRACE: Duration = Duration::from_secs(20);

/// How a cluster's nodes talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `casa-node up --servers N`: the servers attach over ZeroMQ.
    Zmq,
    /// `mpirun -n N+1 casa-node --transport mpi up`.
    Mpi,
}

impl Transport {
    /// The transport the tests run over: MPI when
    /// `CASA_NODE_TEST_TRANSPORT=mpi`, else ZeroMQ.
    pub fn from_env() -> Transport {
        if std::env::var("CASA_NODE_TEST_TRANSPORT").is_ok_and(|t| t == "mpi") {
            Transport::Mpi
        } else {
            Transport::Zmq
        }
    }

    /// `zmq` or `mpi`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Zmq => "zmq",
            Transport::Mpi => "mpi",
        }
    }
}

/// True when the tests run over MPI (`CASA_NODE_TEST_TRANSPORT=mpi`).
pub fn over_mpi() -> bool {
    Transport::from_env() == Transport::Mpi
}

/// A fresh, empty directory `casa-node-NAME-PID-N` in the temporary
/// directory, N counting up within this process.
pub fn scratch(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "casa-node-{name}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
    dir
}

/// How to start a cluster; [`start`](Launch::start) starts it.
#[derive(Debug)]
pub struct Launch {
    bin: PathBuf,
    servers: usize,
    transport: Transport,
    dir: Option<PathBuf>,
    endpoint: Option<String>,
    timeout: String,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    launcher: Option<Command>,
}

impl Launch {
    /// `casa-node up` (the binary `bin`) with `servers` servers, over the
    /// transport the tests run on ([`Transport::from_env`]).
    pub fn new(bin: impl Into<PathBuf>, servers: usize) -> Launch {
        Launch {
            bin: bin.into(),
            servers,
            transport: Transport::from_env(),
            dir: None,
            endpoint: None,
            timeout: "3".into(),
            args: Vec::new(),
            envs: Vec::new(),
            launcher: None,
        }
    }

    /// Over `transport`, whatever the tests run on.
    pub fn transport(mut self, transport: Transport) -> Launch {
        self.transport = transport;
        self
    }

    /// In `dir` (made if missing, removed with the cluster), rather than a
    /// fresh [`scratch`] directory.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Launch {
        self.dir = Some(dir.into());
        self
    }

    /// With the front door at `endpoint` (`up --endpoint`), rather than
    /// `unix://DIR/front.sock`.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Launch {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// With a server timeout of `seconds` (`up --timeout`), rather than 3.
    pub fn timeout(mut self, seconds: impl ToString) -> Launch {
        self.timeout = seconds.to_string();
        self
    }

    /// With `args` after `up`'s own.
    pub fn args<I, S>(mut self, args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// With the environment variable `name` set to `value`.
    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Launch {
        self.envs
            .push((name.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Run by `launcher`, with the `casa-node` binary and its arguments
    /// added to it: `ip netns exec NAME`, or an `mpirun` of the test's own
    /// making (over MPI, the default is [`mpirun_in`] with servers + 1
    /// ranks and the cluster's directory).
    pub fn launcher(mut self, launcher: Command) -> Launch {
        self.launcher = Some(launcher);
        self
    }

    /// Starts the cluster and reads its start-up lines: `front door: `,
    /// then `nodes: ` over ZeroMQ and `dashboard: ` unless it is off. A
    /// cluster that does not print them within [`WAIT`] fails the test,
    /// with its log and standard error.
    pub fn start(self) -> Cluster {
        let dir = self.dir.unwrap_or_else(|| scratch("cluster"));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
        let endpoint = self
            .endpoint
            .unwrap_or_else(|| format!("unix://{}", dir.join("front.sock").display()));
        let dashboard = !dashboard_off(&self.args, &self.envs);
        let mut command = match self.launcher {
            Some(mut launcher) => {
                launcher.arg(&self.bin);
                launcher
            }
            None if self.transport == Transport::Mpi => {
                // Clusters start side by side: each job keeps its own
                // session.
                let mut mpirun =
                    mpirun_in(self.servers + 1, &dir).unwrap_or_else(|why| panic!("{why}"));
                mpirun.arg(&self.bin);
                mpirun
            }
            None => Command::new(&self.bin),
        };
        if self.transport == Transport::Mpi {
            command.args(["--transport", "mpi"]);
        }
        command.arg("up");
        if self.transport == Transport::Zmq {
            command.args(["--servers", &self.servers.to_string()]);
        }
        command
            .args(["--endpoint", &endpoint])
            .arg("--log-file")
            .arg(dir.join("casa-node.log"))
            .args(["--heartbeat", "0.2", "--timeout", &self.timeout])
            .args(&self.args)
            .env("XDG_RUNTIME_DIR", dir.join("runtime"));
        for name in CLEARED {
            command.env_remove(name);
        }
        let mut child = command
            .envs(self.envs)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{command:?} does not start: {e}"));
        let stdout = lines(child.stdout.take().expect("piped"));
        let stderr = keep(child.stderr.take().expect("piped"));
        let launcher = ChildGuard(child);
        let procs = Arc::new(ProcessSet::new());
        procs.note(launcher.pid());
        // Made before anything can fail, so that its drop stops whatever
        // started.
        let mut cluster = Cluster {
            launcher,
            transport: self.transport,
            dir,
            front_door: String::new(),
            nodes: None,
            dashboard: None,
            procs,
            stdout: Mutex::new(stdout),
            stderr,
        };
        cluster.front_door = cluster.line("front door: ");
        if cluster.transport == Transport::Zmq {
            cluster.nodes = Some(cluster.line("nodes: "));
        }
        if dashboard {
            cluster.dashboard = Some(cluster.line("dashboard: "));
        }
        cluster.note_tree();
        cluster
    }
}

/// Variables of the test's environment that would change where the
/// cluster listens or what it prints: the launch says so itself.
const CLEARED: [&str; 4] = [
    "CASA_NODE_CONNECTION_FILE",
    "CASA_NODE_ENDPOINT",
    "CASA_NODE_NODES",
    "CASA_NODE_DASHBOARD",
];

/// True when `args` or `envs` turn the dashboard off.
fn dashboard_off(args: &[OsString], envs: &[(OsString, OsString)]) -> bool {
    let flag = args
        .windows(2)
        .any(|pair| pair[0] == "--dashboard" && pair[1] == "off")
        || args.iter().any(|a| a == "--dashboard=off");
    flag || envs
        .iter()
        .any(|(name, value)| name == "CASA_NODE_DASHBOARD" && value == "off")
}

/// What a process wrote on a pipe so far, and a signal for each new line.
type Kept = Arc<(Mutex<String>, Condvar)>;

/// Keeps what `pipe` says, line by line, and echoes it on the test's
/// standard error (captured with the test's output).
fn keep(pipe: impl Read + Send + 'static) -> Kept {
    let kept: Kept = Arc::default();
    let shared = kept.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            eprintln!("up: {line}");
            let (text, arrived) = &*shared;
            let mut text = text.lock().unwrap_or_else(|e| e.into_inner());
            text.push_str(&line);
            text.push('\n');
            arrived.notify_all();
        }
    });
    kept
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running cluster ([`Launch::start`]). Dropped, it is stopped: SIGCONT
/// to every process seen in its tree (a stopped process cannot act on
/// what follows), SIGTERM to its launcher, SIGKILL if that has not ended
/// within 20 s, then SIGKILL to every process seen that still runs 10 s
/// later, all by PID; and its directory is removed.
#[derive(Debug)]
pub struct Cluster {
    launcher: ChildGuard,
    transport: Transport,
    dir: PathBuf,
    front_door: String,
    nodes: Option<String>,
    dashboard: Option<String>,
    procs: Arc<ProcessSet>,
    /// The launcher's standard output, line by line (in a mutex: a
    /// cluster is shared by the threads of a test).
    stdout: Mutex<mpsc::Receiver<String>>,
    stderr: Kept,
}

impl Cluster {
    /// The launcher's next line of standard output, which must start with
    /// `prefix`; the rest of it.
    fn line(&self, prefix: &str) -> String {
        let next = self
            .stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recv_timeout(WAIT);
        match next {
            Ok(line) if line.starts_with(prefix) => line[prefix.len()..].trim().to_owned(),
            other => panic!(
                "the cluster did not print {prefix:?}: {other:?}\n{}",
                self.diagnostics()
            ),
        }
    }

    /// Its transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its runtime directory (`XDG_RUNTIME_DIR`), where `up` records its
    /// endpoint for the CLI.
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.join("runtime")
    }

    /// Its front door, as `up` printed it (`unix://…`, `tcp://…`).
    pub fn front_door(&self) -> &str {
        &self.front_door
    }

    /// The path of a `unix://` front door's socket.
    pub fn socket(&self) -> PathBuf {
        let path = self
            .front_door
            .strip_prefix("unix://")
            .unwrap_or_else(|| panic!("the front door {} is not unix://", self.front_door));
        PathBuf::from(path)
    }

    /// Where more server nodes attach (`nodes: `): over ZeroMQ only.
    pub fn nodes(&self) -> Option<&str> {
        self.nodes.as_deref()
    }

    /// The dashboard's URL (`dashboard: `), unless it is off.
    pub fn dashboard(&self) -> Option<&str> {
        self.dashboard.as_deref()
    }

    /// The launcher's PID: `up`'s, or `mpirun`'s.
    pub fn pid(&self) -> Pid {
        self.launcher.pid()
    }

    /// The head node's PID: the launcher's over ZeroMQ; under MPI, rank
    /// 0, the process below the launcher with the command line of the
    /// server nodes `servers` that is none of them.
    pub fn head_node(&self, servers: &[Pid]) -> Pid {
        if self.transport == Transport::Zmq {
            return self.pid();
        }
        let cmdline = |pid: Pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok();
        let rank = servers.first().and_then(|&pid| cmdline(pid));
        descendants(self.pid())
            .into_iter()
            .map(|(pid, _)| pid)
            .find(|&pid| !servers.contains(&pid) && rank.is_some() && cmdline(pid) == rank)
            .unwrap_or_else(|| panic!("rank 0 among mpirun's descendants\n{}", self.diagnostics()))
    }

    /// Every process seen in the cluster so far.
    pub fn procs(&self) -> &Arc<ProcessSet> {
        &self.procs
    }

    /// Adds the launcher and every process below it, as they are now, to
    /// the processes seen.
    pub fn note_tree(&self) {
        self.procs.note_tree(self.pid());
    }

    /// Adds `pid` (a server attached by hand, a worker the status names)
    /// to the processes seen.
    pub fn note(&self, pid: Pid) {
        self.procs.note(pid);
    }

    /// The cluster's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("casa-node.log")).unwrap_or_default()
    }

    /// Waits up to [`WAIT`] for a line of the log that `wanted` accepts;
    /// the line, or `None`.
    pub fn wait_log(&self, wanted: impl Fn(&str) -> bool) -> Option<String> {
        let end = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.log().lines().find(|l| wanted(l)) {
                return Some(line.to_owned());
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the launcher wrote on standard error so far.
    pub fn stderr(&self) -> String {
        let (text, _) = &*self.stderr;
        text.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits up to [`WAIT`] for a line on the launcher's standard error
    /// that `wanted` accepts; true if it came.
    pub fn wait_stderr(&self, wanted: impl Fn(&str) -> bool) -> bool {
        let (text, arrived) = &*self.stderr;
        let text = text.lock().unwrap_or_else(|e| e.into_inner());
        let (text, _) = arrived
            .wait_timeout_while(text, WAIT, |text| !text.lines().any(&wanted))
            .unwrap_or_else(|e| e.into_inner());
        text.lines().any(wanted)
    }

    /// The tails of the log and of the launcher's standard error, for
    /// failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- casa-node.log (tail):\n{}\n--- the launcher's stderr (tail):\n{}",
            tail(&self.log(), 40),
            tail(&self.stderr(), 40)
        )
    }

    /// `bin` (the `casa-node` CLI) with this cluster's runtime directory,
    /// and none of the test's own endpoint or connection file: it finds
    /// the cluster as a user's shell would.
    pub fn cli_command(&self, bin: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(bin);
        command
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .env_remove("CASA_NODE_CONNECTION_FILE")
            .env_remove("CASA_NODE_ENDPOINT")
            .stdin(Stdio::null());
        command
    }

    /// Waits up to `limit` for the launcher to end; its status if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.launcher.wait_timeout(limit)
    }

    /// Sends `signal` to the launcher.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal)
            .unwrap_or_else(|e| panic!("{signal} to the cluster's launcher: {e}"));
    }

    /// Kills the launcher (SIGKILL) and reaps it; what it started is left
    /// to end on its own.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        self.launcher
            .wait_timeout(WAIT)
            .expect("a killed launcher ends");
    }

    /// The processes seen that still run after waiting up to `limit` for
    /// all of them to end, with their command lines.
    pub fn left_behind(&self, limit: Duration) -> Vec<String> {
        self.procs
            .survivors(limit)
            .iter()
            .map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                format!("{pid} ({})", cmdline.chars().take(80).collect::<String>())
            })
            .collect()
    }

    /// Every process seen is gone within [`EXIT_BOUND`] (rule 30).
    pub fn assert_nothing_left(&self) {
        let left = self.left_behind(EXIT_BOUND);
        assert!(
            left.is_empty(),
            "processes left behind {EXIT_BOUND:?} after the cluster ended: {left:?}\n{}",
            self.diagnostics()
        );
    }

    /// Waits up to `limit` for the launcher to end, then checks that every
    /// process seen is gone ([`assert_nothing_left`](Self::assert_nothing_left));
    /// the launcher's status.
    pub fn assert_ends(&mut self, limit: Duration) -> ExitStatus {
        let Some(status) = self.wait_exit(limit) else {
            panic!(
                "the cluster did not end within {limit:?}\n{}",
                self.diagnostics()
            );
        };
        self.assert_nothing_left();
        status
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.note_tree();
        self.procs.signal_all(Signal::SIGCONT);
        if self.launcher.wait_timeout(Duration::ZERO).is_none() {
            let _ = kill(self.pid(), Signal::SIGTERM);
            if self.launcher.wait_timeout(TERM_GRACE).is_none() {
                let _ = kill(self.pid(), Signal::SIGKILL);
                let _ = self.launcher.0.wait();
            }
        }
        if !self.procs.survivors(Duration::from_secs(10)).is_empty() {
            self.procs.kill_all();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
