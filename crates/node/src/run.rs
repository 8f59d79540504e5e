//! `casa-node run`: a cluster as `up` starts it, for the length of one
//! Python script. The script runs under the cluster's Python with the
//! `casanode` package importable (it ships inside this binary) and the front
//! door in `CASA_NODE_ENDPOINT` (and a `tcp://` one's connection file in
//! `CASA_NODE_CONNECTION_FILE`); when it ends, services stop and `run`
//! exits with the script's status. With `--casa` the script also imports
//! casa-node's `casampi` first, and CASA's site configuration names the
//! log file the workers write (see [`crate::casa`]).

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};

use tokio::process::Command;
use tokio::sync::watch;

use casa_node_protocol::Transport;

use crate::casa;
use crate::cluster::{self, Servers, UpError, UpOptions};
use crate::connection_file::CONNECTION_FILE_VAR;
use crate::endpoint::{self, ENDPOINT_VAR};
use crate::packages::{self, UnpackError};

/// What the Python driver needs besides the standard library.
const PROTOBUF_REQUIREMENT: &str = "protobuf>=6.31.1,<7";

/// `run` could not run the script.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The cluster failed.
    #[error(transparent)]
    Up(#[from] UpError),
    /// The script's Python cannot import `google.protobuf`.
    #[error(
        "{python} cannot import google.protobuf, which casanode needs; install it with: {python} -m pip install '{PROTOBUF_REQUIREMENT}'"
    )]
    NoProtobuf {
        /// The interpreter.
        python: String,
    },
    /// The packages could not be unpacked.
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// A file or process could not be made.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Runs `script` with `args` against a cluster started with `options`;
/// returns the script's exit status.
pub async fn run<T: Transport + 'static>(
    how: Servers<T>,
    options: UpOptions,
    script: PathBuf,
    args: Vec<String>,
    signals: watch::Receiver<u32>,
) -> Result<ExitStatus, RunError> {
    check_protobuf(&options.python).await?;
    // With --casa, casa-node's casampi comes first, and CASA's site
    // configuration names the log file the workers share.
    let package = packages::for_driver(options.casa.is_some())?;
    let site_config = options
        .casa
        .as_ref()
        .map(|casa| casa::write_site_config(package.dir(), casa))
        .transpose()
        .map_err(|source| RunError::Io {
            context: "writing CASA's site configuration".into(),
            source,
        })?;
    // The cluster stops when the script ends or on the signals `run` gets.
    let (stop_tx, stop_rx) = watch::channel(0u32);
    let forward = stop_tx.clone();
    // SIGTERM, which unlike a terminal's Ctrl-C reaches `run` alone, is
    // passed on to the script.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| RunError::Io {
        context: "watching for SIGTERM".into(),
        source,
    })?;
    let mut outside = signals;
    tokio::spawn(async move {
        while outside.changed().await.is_ok() {
            let count = *outside.borrow_and_update();
            forward.send_modify(|c| *c = (*c).max(count));
        }
    });
    let status: Arc<Mutex<Option<std::io::Result<ExitStatus>>>> = Arc::default();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let python = options.python.clone();
    let path_entry = package.dir().to_owned();
    let casa_log = options.casa.as_ref().map(|casa| casa.log_file.clone());
    let record = status.clone();
    let connection_file = options
        .connection_file
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .map_err(|source| RunError::Io {
            context: "the connection file's path".into(),
            source,
        })?;
    let on_ready = move |ready: &cluster::Ready<'_>| {
        let front = ready.front;
        if let Some(url) = ready.dashboard {
            eprintln!("dashboard: {url}");
        }
        let mut command = Command::new(&python);
        command
            .arg(&script)
            .args(&args)
            .env(ENDPOINT_VAR, front.to_string())
            .env("PYTHONPATH", packages::python_path(&path_entry));
        if let (Some(log), Some(site)) = (&casa_log, &site_config) {
            command
                .env(casa::LOG_FILE_VAR, log)
                .env("CASASITECONFIG", site);
        }
        if let (endpoint::FrontDoorEndpoint::Tcp(_), Some(file)) = (front, &connection_file) {
            command.env(CONNECTION_FILE_VAR, file);
        }
        tokio::spawn(async move {
            let result = match command.spawn() {
                Ok(mut child) => loop {
                    tokio::select! {
                        status = child.wait() => break status,
                        Some(()) = terminate.recv() => {
                            // `run` is told to stop: so is its script, which
                            // may be waiting on anything but the cluster.
                            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                                let _ = nix::sys::signal::kill(
                                    nix::unistd::Pid::from_raw(pid),
                                    nix::sys::signal::Signal::SIGTERM,
                                );
                            }
                        }
                    }
                },
                Err(e) => Err(e),
            };
            *record.lock().expect("status") = Some(result);
            stop_tx.send_modify(|c| *c = (*c).max(1));
            let _ = done_tx.send(());
        });
    };
    let result = cluster::start(how, options, stop_rx, on_ready).await;
    let _ = done_rx.await;
    drop(package);
    result?;
    let outcome = status.lock().expect("status").take();
    match outcome {
        Some(Ok(status)) => Ok(status),
        Some(Err(source)) => Err(RunError::Io {
            context: "starting the script".into(),
            source,
        }),
        None => Err(RunError::Io {
            context: "the script".into(),
            source: std::io::Error::other("never started"),
        }),
    }
}

async fn check_protobuf(python: &Path) -> Result<(), RunError> {
    let probe = Command::new(python)
        .args(["-c", "import google.protobuf"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .map_err(|source| RunError::Io {
            context: format!("running {}", python.display()),
            source,
        })?;
    if probe.success() {
        Ok(())
    } else {
        Err(RunError::NoProtobuf {
            python: python.display().to_string(),
        })
    }
}
