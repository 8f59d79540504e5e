//! `--transport mpi`: every process of an `mpirun` (or `mpiexec`, `srun`)
//! job runs the same `casa-node` command; rank 0 becomes the head node,
//! with the front door (and, under `run`, the script), and ranks 1.. serve.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use casa_node_protocol::Transport;
use casa_node_transport_mpi::{IdlePolicy, MpiConfig, MpiError, MpiTransport};
use tokio::sync::watch;

use crate::cluster::{self, Links, Ready, Servers, UpError, UpOptions};
use crate::packages::{self, UnpackError, Unpacked};
use crate::run::{self, RunError};
use crate::server_node::{self, ServerNodeConfig, ServerNodeError};

/// Why an MPI rank could not do its part.
#[derive(Debug, thiserror::Error)]
pub enum MpiNodeError {
    /// MPI could not start, or the world is too small.
    #[error("--transport mpi: {0}")]
    Start(#[from] MpiError),
    /// The head node (rank 0) failed.
    #[error(transparent)]
    Up(#[from] UpError),
    /// `run` failed on rank 0.
    #[error(transparent)]
    Run(#[from] RunError),
    /// A server rank failed.
    #[error(transparent)]
    Server(#[from] ServerNodeError),
    /// casa-node's casampi could not be unpacked.
    #[error(transparent)]
    Unpack(#[from] UnpackError),
}

/// What this process turned out to be.
#[derive(Debug)]
pub enum Outcome {
    /// Rank 0 ran the cluster until stop services.
    Head,
    /// Rank 0 ran the script, which exited with this status.
    Script(ExitStatus),
    /// A server rank served until stop services.
    Server,
}

/// Initialises MPI. Blocks for as long as `MPI_Init` takes.
///
/// Rank 0 shuts the transport down only after every server that was still
/// answering has stopped, so what remains to wait for at that point are
/// servers that hang: the goodbye and `MPI_Finalize` waits are kept short
/// for them (Open MPI's `MPI_Finalize` waits for every rank; past the limit
/// rank 0 exits and mpirun ends the job).
///
/// `spin`, `yield_for` and `idle_sleep` say how a rank waits for messages
/// while idle: probing back to back, then yielding its core between probes,
/// then sleeping at most `idle_sleep` between them (see [`IdlePolicy`]).
pub fn init(
    spin: Duration,
    yield_for: Duration,
    idle_sleep: Duration,
) -> Result<MpiTransport, MpiNodeError> {
    let defaults = MpiConfig::default();
    let idle = IdlePolicy {
        spin,
        yield_for,
        max_sleep: idle_sleep,
        first_sleep: defaults.idle.first_sleep.min(idle_sleep),
    };
    Ok(MpiTransport::init_with(MpiConfig {
        linger: Duration::from_secs(2),
        finalize_timeout: Duration::from_secs(10),
        idle,
        ..defaults
    })?)
}

/// `up` or `run` (with `script`) on this rank of an MPI job: rank 0 runs
/// the head node, the others serve. `on_ready` is called on rank 0 once
/// every server has started.
pub async fn launch(
    transport: MpiTransport,
    options: UpOptions,
    script: Option<(PathBuf, Vec<String>)>,
    signals: watch::Receiver<u32>,
    on_ready: impl FnOnce(&Ready<'_>),
) -> Result<Outcome, MpiNodeError> {
    if transport.rank() != 0 {
        let casampi = options
            .casa
            .as_ref()
            .map(|_| Unpacked::new("casampi", &[packages::CASAMPI]))
            .transpose()?;
        let config = ServerNodeConfig {
            python: options.python,
            init: options.init,
            casa: casampi.as_ref().map(|u| u.dir().to_owned()),
            kill_grace: options.kill_grace,
            // A quiet link never ends the job: if rank 0 dies, mpirun
            // ends every rank.
            patience: None,
        };
        server_node::run(transport, config, None).await?;
        return Ok(Outcome::Server);
    }
    let info = transport.info().clone();
    let links = Links {
        transport: "mpi",
        description: format!("transport mpi: {info}"),
        nodes: String::new(),
        servers: usize::try_from(info.world_size - 1).unwrap_or(0),
    };
    let servers = Servers::Launched(transport, links);
    match script {
        None => {
            cluster::start(servers, options, signals, on_ready).await?;
            Ok(Outcome::Head)
        }
        Some((script, args)) => {
            let status = run::run(servers, options, script, args, signals).await?;
            Ok(Outcome::Script(status))
        }
    }
}
