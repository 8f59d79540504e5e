//! `--casa`: CASA's own parallel tasks on casa-node, unmodified. The
//! driver and every worker import casa-node's `casampi` (see
//! [`packages::CASAMPI`](crate::packages::CASAMPI)) ahead of any installed
//! one, workers start with the namespace casampi's servers have
//! (`casalog`, `from casatasks import *`), and the driver and the workers
//! write one CASA log file.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tokio::process::Command;

/// The environment variable that names the shared CASA log file, for the
/// workers (through START, rule 26) and for `run`'s script.
pub const LOG_FILE_VAR: &str = "CASA_NODE_CASA_LOG";

/// What a `--casa` cluster shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Casa {
    /// The CASA log file the driver and the workers write: named as CASA
    /// names its own (`casa-YYYYMMDD-HHMMSS.log`, UTC) in the working
    /// directory.
    pub log_file: PathBuf,
}

impl Casa {
    /// The settings of a cluster starting now in `dir`.
    pub fn starting_in(dir: &Path, now: SystemTime) -> Self {
        // "2026-12-04T23:01:04Z" -> "20261204-230104"
        let stamp: String = humantime::format_rfc3339_seconds(now)
            .to_string()
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == 'T')
            .map(|c| if c == 'T' { '-' } else { c })
            .collect();
        Casa {
            log_file: dir.join(format!("casa-{stamp}.log")),
        }
    }
}

/// The workers' Python cannot run CASA.
#[derive(Debug, thiserror::Error)]
pub enum CasaError {
    /// casatools or casatasks is missing.
    #[error(
        "--casa needs CASA in the workers' Python, and {python} cannot import {missing}: install casatools, casatasks and casadata into it (python3 -m pip install casatasks casadata) or give --python a CASA installation's python3"
    )]
    Missing {
        /// The interpreter.
        python: String,
        /// The modules it lacks.
        missing: String,
    },
    /// The interpreter could not be run.
    #[error("running {python}: {source}")]
    Run {
        /// The interpreter.
        python: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `python` finds casatools and casatasks (without importing
/// them, which takes seconds), so that a cluster without CASA fails at
/// start-up in one line rather than once per command.
pub async fn check_python(python: &Path) -> Result<(), CasaError> {
    const PROBE: &str = "import importlib.util as u, sys\n\
        missing = [m for m in ('casatools', 'casatasks') if u.find_spec(m) is None]\n\
        print(' and '.join(missing))\n\
        sys.exit(1 if missing else 0)";
    let name = || python.display().to_string();
    let output = Command::new(python)
        .args(["-c", PROBE])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| CasaError::Run {
            python: name(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let missing = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Err(CasaError::Missing {
        python: name(),
        missing: if missing.is_empty() {
            "casatools and casatasks".into()
        } else {
            missing
        },
    })
}

/// Writes `casasiteconfig.py` into `dir` for `run`'s script (named by
/// `CASASITECONFIG`): it reads the site configuration CASA would have read
/// and then names the shared log file, so that the driver logs where the
/// workers do unless the user's own `~/.casa/config.py` says otherwise
/// (CASA reads that after the site's). Returns the file's path.
pub fn write_site_config(dir: &Path, casa: &Casa) -> std::io::Result<PathBuf> {
    let site = std::env::var("CASASITECONFIG").unwrap_or_default();
    let text = format!(
        "# Written by casa-node run --casa: CASA's site configuration, then the\n\
         # log file this cluster's driver and servers share.\n\
         import os as _casa_node_os\n\
         for _casa_node_site in ({site:?}, '/opt/casa/casasiteconfig.py', '/home/casa/casasiteconfig.py'):\n\
         \x20   if _casa_node_site and _casa_node_os.path.isfile(_casa_node_site):\n\
         \x20       with open(_casa_node_site) as _casa_node_file:\n\
         \x20           exec(_casa_node_file.read())\n\
         \x20       break\n\
         logfile = {log:?}\n",
        log = casa.log_file.display().to_string(),
    );
    let file = dir.join("casasiteconfig.py");
    std::fs::write(&file, text)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The log file is named as casaconfig names CASA's own.
    #[test]
    fn the_log_file_is_named_as_casa_names_it() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_425_264);
        let casa = Casa::starting_in(Path::new("/work"), at);
        assert_eq!(
            casa.log_file,
            Path::new("/work/casa-20261204-230104.log"),
            "{casa:?}"
        );
    }
}
