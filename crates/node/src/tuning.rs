//! Transparent huge pages for large buffers.
//!
//! A large parameter crosses every process of the cluster (driver, head
//! node, server node, worker and back), and each hop writes it into memory
//! freshly taken from the kernel. On a virtual machine each 4 KiB page of
//! that memory costs a fault of several microseconds, which made page
//! faults, not copies, most of the time of a 256 MiB round trip. Backing
//! large allocations with 2 MiB pages takes 512 times fewer faults.
//!
//! Kernels commonly run transparent huge pages in `madvise` mode, where
//! memory gets them only when asked. glibc asks for every allocation it
//! maps when its tunable `glibc.malloc.hugetlb` is 1, and reads tunables
//! only at start. So a node that runs a cluster starts itself again once
//! with the tunable added to `GLIBC_TUNABLES` (same process, same
//! arguments, through `exec`); the processes it starts, servers, workers
//! and the script of `casa-node run`, inherit it. Small allocations are
//! untouched: an idle node's resident memory grows by about 0.3 MiB.
//!
//! A `GLIBC_TUNABLES` that already sets `glibc.malloc.hugetlb`, to any
//! value, is left as it is: `glibc.malloc.hugetlb=0` turns this off.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// The environment variable glibc reads its tunables from.
pub const VARIABLE: &str = "GLIBC_TUNABLES";

/// The tunable, set to 1.
const HUGE_PAGES: &str = "glibc.malloc.hugetlb=1";

/// The `GLIBC_TUNABLES` value that asks for huge pages, given the current
/// one; `None` when nothing needs to change (the current value already
/// sets `glibc.malloc.hugetlb`, whatever its value).
pub fn with_huge_pages(current: Option<&OsStr>) -> Option<OsString> {
    let current = current.map(OsStr::as_bytes).unwrap_or_default();
    let already = current
        .split(|&b| b == b':')
        .any(|item| item.split(|&b| b == b'=').next() == Some(b"glibc.malloc.hugetlb"));
    if already {
        return None;
    }
    let mut value = current.to_vec();
    if !value.is_empty() {
        value.push(b':');
    }
    value.extend_from_slice(HUGE_PAGES.as_bytes());
    Some(OsString::from_vec(value))
}

/// Starts this program again in this process with huge pages asked for,
/// unless they already are. Returns only when that is not needed or not
/// possible (the program then runs as it is, with 4 KiB pages); call it
/// before anything else has started, threads and MPI above all.
pub fn restart_with_huge_pages() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let Some(value) = with_huge_pages(std::env::var_os(VARIABLE).as_deref()) else {
        return;
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(name) = args.next() {
        std::os::unix::process::CommandExt::arg0(&mut command, name);
    }
    command.args(args).env(VARIABLE, value);
    // `exec` returns only on failure, and then nothing has changed.
    let _ = std::os::unix::process::CommandExt::exec(&mut command);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(current: Option<&str>) -> Option<String> {
        with_huge_pages(current.map(OsStr::new)).map(|v| v.into_string().unwrap())
    }

    #[test]
    fn added_when_absent() {
        assert_eq!(value(None).as_deref(), Some("glibc.malloc.hugetlb=1"));
        assert_eq!(value(Some("")).as_deref(), Some("glibc.malloc.hugetlb=1"));
    }

    #[test]
    fn appended_to_other_tunables() {
        assert_eq!(
            value(Some("glibc.malloc.arena_max=2")).as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
        );
    }

    #[test]
    fn left_alone_when_set_either_way() {
        assert_eq!(value(Some("glibc.malloc.hugetlb=1")), None);
        assert_eq!(value(Some("glibc.malloc.hugetlb=0")), None);
        assert_eq!(
            value(Some("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0")),
            None
        );
        // Another tunable whose name only starts the same is not it.
        assert_eq!(
            value(Some("glibc.malloc.hugetlbx=0")).as_deref(),
            Some("glibc.malloc.hugetlbx=0:glibc.malloc.hugetlb=1")
        );
    }
}
