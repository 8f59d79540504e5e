//! The Python packages that ship inside the binary: `casanode`, the
//! driver, and `casampi`, casa-node's face of CASA's casampi 0.6 (`--casa`).
//! They are unpacked into the private runtime directory and put first on
//! `PYTHONPATH`, so a driver or worker imports them without an install.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::endpoint::{self, EndpointError};

/// Files of a package: (path under the `PYTHONPATH` entry, text).
pub type Files = &'static [(&'static str, &'static str)];

macro_rules! files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../../../python/", $path)))),*]
    };
}

/// The `casanode` package.
pub const CASANODE: Files = files!(
    "casanode/__init__.py",
    "casanode/client.py",
    "casanode/connection.py",
    "casanode/discovery.py",
    "casanode/errors.py",
    "casanode/failures.py",
    "casanode/progressbar.py",
    "casanode/seed.py",
    "casanode/shm.py",
    "casanode/values.py",
    "casanode/wire.py",
    "casanode/_pb/__init__.py",
    "casanode/_pb/casa/__init__.py",
    "casanode/_pb/casa/node/__init__.py",
    "casanode/_pb/casa/node/v1/__init__.py",
    "casanode/_pb/casa/node/v1/driver_pb2.py",
    "casanode/_pb/casa/node/v1/envelope_pb2.py",
    "casanode/_pb/casa/node/v1/journal_pb2.py",
    "casanode/_pb/casa/node/v1/node_pb2.py",
    "casanode/_pb/casa/node/v1/value_pb2.py",
);

/// The `casampi` package: CASA's casampi 0.6 over casa-node.
pub const CASAMPI: Files = files!(
    "casampi/__init__.py",
    "casampi/MPIEnvironment.py",
    "casampi/MPICommandClient.py",
    "casampi/MPIInterface.py",
    "casampi/private/__init__.py",
    "casampi/private/start_mpi.py",
    "casampi/private/MPIMonitorClient.py",
    "casampi/private/MPICommandServer.py",
);

/// What a driver imports: `casanode`, and with `--casa` casampi too,
/// unpacked for this process's lifetime.
pub fn for_driver(casa: bool) -> Result<Unpacked, UnpackError> {
    if casa {
        Unpacked::new("python", &[CASANODE, CASAMPI])
    } else {
        Unpacked::new("python", &[CASANODE])
    }
}

/// Packages unpacked into a directory of their own, removed on drop.
#[derive(Debug)]
pub struct Unpacked {
    dir: PathBuf,
}

impl Unpacked {
    /// Writes `packages` into a fresh directory under the private runtime
    /// directory, named `name` and this process's id.
    pub fn new(name: &str, packages: &[Files]) -> Result<Self, UnpackError> {
        let dir = endpoint::runtime_dir()?.join(format!("{name}-{}", std::process::id()));
        let unpacked = Unpacked { dir };
        for (path, text) in packages.iter().flat_map(|files| files.iter()) {
            let file = unpacked.dir.join(path);
            let written = file
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&file, text));
            written.map_err(|source| UnpackError::Write { file, source })?;
        }
        Ok(unpacked)
    }

    /// The directory: the `PYTHONPATH` entry.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The packages could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The private runtime directory is unusable.
    #[error(transparent)]
    RuntimeDir(#[from] EndpointError),
    /// A file could not be written.
    #[error("writing {}: {source}", file.display())]
    Write {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// `PYTHONPATH` with `entry` first, keeping what this process has.
pub fn python_path(entry: &Path) -> OsString {
    let mut value = entry.as_os_str().to_owned();
    if let Some(existing) = std::env::var_os("PYTHONPATH").filter(|v| !v.is_empty()) {
        value.push(":");
        value.push(existing);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_disk(package: &str) -> Vec<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python");
        let mut found = Vec::new();
        let mut dirs = vec![root.join(package)];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "py") {
                    found.push(path.strip_prefix(&root).unwrap().display().to_string());
                }
            }
        }
        found.sort();
        found
    }

    fn embedded(files: Files) -> Vec<String> {
        let mut paths: Vec<String> = files.iter().map(|(p, _)| p.to_string()).collect();
        paths.sort();
        paths
    }

    /// Every module of both packages ships, so drivers and workers can
    /// import all of them.
    #[test]
    fn every_file_of_the_packages_is_embedded() {
        assert_eq!(embedded(CASANODE), on_disk("casanode"));
        assert_eq!(embedded(CASAMPI), on_disk("casampi"));
    }
}
