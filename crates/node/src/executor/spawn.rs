//! Starting a worker: its interpreter with the worker's source, its pipes
//! on fds 3-5, its environment, its own process group.

use super::*;

impl Executor {
    /// Starts a worker (not yet ready) as the current one.
    pub(super) fn spawn_worker(&mut self) -> Result<(), ExecutorError> {
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
            results_closed: None,
            state: WorkerState::Starting,
        };
        tracing::debug!(pid, generation, python = %self.config.python.display(), "started a Python worker");
        self.worker = Some(worker);
        Ok(())
    }
}

/// What ran before the first command: the init script, or without one
/// CASA's namespace (`--casa`).
pub(super) fn start_up(init: &Path) -> String {
    if init.as_os_str().is_empty() {
        "taking CASA's namespace (--casa)".into()
    } else {
        format!("the init script {}", init.display())
    }
}
