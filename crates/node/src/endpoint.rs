//! Where the front door listens, where the ZeroMQ transport binds, and the
//! private runtime directory that holds both by default.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

/// Overrides the recorded front door endpoint for `submit`, `status`,
/// `stop` and scripts started by `run`.
pub const ENDPOINT_VAR: &str = "CASA_NODE_ENDPOINT";

/// An endpoint given on the command line or in the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontDoorEndpoint {
    /// `unix://PATH`: a Unix stream socket.
    Unix(PathBuf),
    /// `tcp://HOST:PORT`: TCP, which the front door accepts only with TLS.
    Tcp(String),
}

/// A malformed or unusable endpoint.
#[derive(Debug, Error)]
pub enum EndpointError {
    /// Not `unix://PATH` or `tcp://HOST:PORT`.
    #[error("invalid endpoint {0:?}: expected unix://PATH or tcp://HOST:PORT")]
    Invalid(String),
    /// No endpoint given and none recorded.
    #[error(
        "no casa-node cluster found: start one with `casa-node up`, or give --endpoint or {ENDPOINT_VAR}"
    )]
    NoneRecorded,
    /// The runtime directory is not private to this user.
    #[error("{path}: {problem}")]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl FromStr for FrontDoorEndpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, EndpointError> {
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(EndpointError::Invalid(s.into()));
            }
            return Ok(FrontDoorEndpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            if addr
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                return Err(EndpointError::Invalid(s.into()));
            }
            return Ok(FrontDoorEndpoint::Tcp(addr.into()));
        }
        Err(EndpointError::Invalid(s.into()))
    }
}

impl fmt::Display for FrontDoorEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrontDoorEndpoint::Unix(path) => write!(f, "unix://{}", path.display()),
            FrontDoorEndpoint::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

/// This user's private directory for sockets and the endpoint record:
/// `$XDG_RUNTIME_DIR/casa-node`, else `/tmp/casa-node-UID`. Created with
/// mode 0700; refused when it belongs to someone else or others can enter.
pub fn runtime_dir() -> Result<PathBuf, EndpointError> {
    let uid = nix::unistd::getuid().as_raw();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(base) if !base.is_empty() => PathBuf::from(base).join("casa-node"),
        _ => std::env::temp_dir().join(format!("casa-node-{uid}")),
    };
    private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` with mode 0700 if missing, and checks it is this user's
/// and closed to others.
pub fn private_dir(dir: &Path) -> Result<(), EndpointError> {
    let io_err = |source| EndpointError::Io {
        path: dir.to_owned(),
        source,
    };
    match fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(io_err)?;
    let unsafe_dir = |problem: &str| EndpointError::UnsafeDirectory {
        path: dir.to_owned(),
        problem: problem.into(),
    };
    if !meta.is_dir() {
        return Err(unsafe_dir("not a directory"));
    }
    if meta.uid() != nix::unistd::getuid().as_raw() {
        return Err(unsafe_dir("belongs to another user"));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
    }
    Ok(())
}

/// The file recording the front door of the cluster `up` started last.
fn record_path() -> Result<PathBuf, EndpointError> {
    Ok(runtime_dir()?.join("endpoint"))
}

/// What `up` recorded of the cluster it started last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its front door.
    pub endpoint: FrontDoorEndpoint,
    /// The connection file of a `tcp://` front door.
    pub connection_file: Option<PathBuf>,
}

/// Records `endpoint` (and the connection file of a `tcp://` one) for
/// commands run without `--endpoint`: the endpoint on the first line, then
/// `pid N` (the process serving it), then the connection file's absolute
/// path.
pub fn record(
    endpoint: &FrontDoorEndpoint,
    connection_file: Option<&Path>,
) -> Result<(), EndpointError> {
    let path = record_path()?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let io_err = |source| EndpointError::Io {
        path: path.clone(),
        source,
    };
    let mut text = format!("{endpoint}\npid {}\n", std::process::id());
    if let Some(file) = connection_file {
        let file = std::path::absolute(file).map_err(io_err)?;
        text.push_str(&format!("{}\n", file.display()));
    }
    fs::write(&tmp, text).map_err(io_err)?;
    fs::rename(&tmp, &path).map_err(io_err)
}

/// The record left by `up`, if any. A record whose process is gone (it
/// was killed, or its machine rebooted, before it could remove it) is
/// removed, with the run directories of dead processes, and not returned.
pub fn recorded() -> Result<Option<Record>, EndpointError> {
    let path = record_path()?;
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(EndpointError::Io { path, source }),
    };
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let endpoint = lines.next().unwrap_or_default().parse()?;
    let mut record = Record {
        endpoint,
        connection_file: None,
    };
    for line in lines {
        match line.strip_prefix("pid ").map(str::parse::<i32>) {
            Some(Ok(pid)) if !crate::shm::alive(pid) => {
                let _ = fs::remove_file(&path);
                sweep_runs();
                return Ok(None);
            }
            Some(_) => {}
            None => record.connection_file = Some(PathBuf::from(line)),
        }
    }
    Ok(Some(record))
}

/// Removes the run directories (`RUNTIME_DIR/PID`) of processes that are
/// gone: a head node killed before it could remove its own.
pub fn sweep_runs() {
    let Ok(dir) = runtime_dir() else {
        return;
    };
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let is_dir = fs::symlink_metadata(entry.path()).is_ok_and(|m| m.is_dir());
        if is_dir && !crate::shm::alive(pid) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Removes the record if it still names `endpoint`.
pub fn forget(endpoint: &FrontDoorEndpoint) {
    if recorded().is_ok_and(|r| r.is_some_and(|r| r.endpoint == *endpoint)) {
        if let Ok(path) = record_path() {
            let _ = fs::remove_file(path);
        }
    }
}

/// The endpoint to use: the flag, else `CASA_NODE_ENDPOINT`, else the
/// record left by `up`.
pub fn resolve(flag: Option<&str>) -> Result<FrontDoorEndpoint, EndpointError> {
    if let Some(endpoint) = flag {
        return endpoint.parse();
    }
    if let Ok(endpoint) = std::env::var(ENDPOINT_VAR) {
        if !endpoint.is_empty() {
            return endpoint.parse();
        }
    }
    match recorded()? {
        Some(record) => Ok(record.endpoint),
        None => Err(EndpointError::NoneRecorded),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_back() {
        for s in [
            "unix:///tmp/x/front.sock",
            "tcp://127.0.0.1:7000",
            "tcp://[::1]:1",
        ] {
            assert_eq!(s.parse::<FrontDoorEndpoint>().unwrap().to_string(), s);
        }
        for bad in [
            "",
            "unix://",
            "tcp://host",
            "tcp://:80",
            "http://x:1",
            "/tmp/sock",
        ] {
            assert!(bad.parse::<FrontDoorEndpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_private_dir_is_made_0700_and_tightened_if_open() {
        let base = std::env::temp_dir().join(format!("casa-node-test-{}", std::process::id()));
        let dir = base.join("run");
        private_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::remove_dir_all(&base).unwrap();
    }
}
