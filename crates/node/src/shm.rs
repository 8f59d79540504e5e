//! The cluster's shared-memory directory (`SharedBytes` in value.proto):
//! large values pass between processes of one host as files in it, written
//! once by their producer and mapped by their consumer, while the nodes in
//! between forward the reference.
//!
//! The head node makes the directory (`/dev/shm/casa-node-UID-PID-RANDOM`,
//! mode 0700) with a file `tag` holding a random tag, carries both to the
//! servers in START and to unix:// drivers in the Welcome, and removes the
//! directory with everything in it when it exits. A process uses the
//! directory only after reading the tag back from it: then it is on the
//! head node's host.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use casa_node_protocol::pb::value::Kind;
use casa_node_protocol::pb::{NdArray, Parameter, SharedBytes, Value};
use thiserror::Error;

pub use casa_node_protocol::{SHM_DIR_VAR, SHM_TAG_VAR};

/// Where the directories go.
pub const BASE: &str = "/dev/shm";
/// The prefix of the directories' names.
const PREFIX: &str = "casa-node-";
/// The file holding the tag.
pub const TAG_FILE: &str = "tag";
/// The variable that sets the size from which values travel through
/// shared memory, in bytes; 0 turns shared memory off in that process.
pub const THRESHOLD_VAR: &str = "CASA_NODE_SHM_THRESHOLD";

/// A reference that cannot be read.
#[derive(Debug, Error)]
pub enum ShmError {
    /// The name is not one a reference may carry.
    #[error("invalid shared-memory file name {0:?}")]
    BadName(String),
    /// The file could not be opened or read.
    #[error("shared-memory file {name:?}: {source}")]
    Io {
        /// The file's name.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// The file is not what a reference may point at.
    #[error("shared-memory file {name:?}: {problem}")]
    Refused {
        /// The file's name.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// True for a name a reference may carry: `[A-Za-z0-9_.-]{1,100}`, no
/// leading dot.
pub fn valid_name(name: &str) -> bool {
    (1..=100).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether shared memory is on in this process (the threshold is not 0).
pub fn enabled() -> bool {
    std::env::var(THRESHOLD_VAR).map_or(true, |v| v.trim() != "0")
}

/// The cluster's directory, removed with its content when dropped.
#[derive(Debug)]
pub struct SharedDir {
    path: PathBuf,
    tag: String,
}

impl SharedDir {
    /// Makes a fresh directory under [`BASE`] after removing those left by
    /// dead head nodes of this user. Fails when /dev/shm is missing or
    /// unusable; shared memory is then off.
    pub fn create() -> io::Result<Self> {
        let uid = nix::unistd::getuid().as_raw();
        sweep_stale(Path::new(BASE), uid);
        let random = crate::connection_file::random().map_err(io::Error::other)?;
        let suffix: String = random[..8].iter().map(|b| format!("{b:02x}")).collect();
        let tag: String = random[8..24].iter().map(|b| format!("{b:02x}")).collect();
        let path = Path::new(BASE).join(format!("{PREFIX}{uid}-{}-{suffix}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        let dir = SharedDir { path, tag };
        let meta = fs::symlink_metadata(&dir.path)?;
        if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o777 != 0o700 {
            return Err(io::Error::other(format!(
                "{} is not a private directory of this user",
                dir.path.display()
            )));
        }
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.path.join(TAG_FILE))
            .and_then(|mut file| io::Write::write_all(&mut file, dir.tag.as_bytes()))?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tag its file `tag` holds.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes the directories under `base` that head nodes of `uid` left
/// behind: those whose pid is no longer running.
fn sweep_stale(base: &Path, uid: u32) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    let mine = format!("{PREFIX}{uid}-");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&mine)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let owned = fs::symlink_metadata(entry.path()).is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if owned && !alive(pid) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether process `pid` exists (as far as this user can tell).
pub(crate) fn alive(pid: i32) -> bool {
    pid > 0
        && !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
}

/// True when `dir` is a directory of this user, closed to others, whose
/// file `tag` holds `tag`: the head node's directory, on this host.
pub fn usable(dir: &Path, tag: &str) -> bool {
    if tag.is_empty() || !enabled() {
        return false;
    }
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return false;
    };
    if !meta.is_dir()
        || meta.uid() != nix::unistd::getuid().as_raw()
        || meta.permissions().mode() & 0o077 != 0
    {
        return false;
    }
    let mut text = String::new();
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(dir.join(TAG_FILE))
        .and_then(|mut f| f.read_to_string(&mut text))
        .is_ok()
        && text == tag
}

/// Removes the file `name` from `dir`; a missing file is fine.
pub fn unlink(dir: &Path, name: &str) {
    if valid_name(name) {
        let _ = fs::remove_file(dir.join(name));
    }
}

/// Removes the `tmp-PID-*` files of process `pid` (which has died or
/// gone): values it was writing and never sent.
pub fn sweep_tmp(dir: &Path, pid: u32) {
    let prefix = format!("tmp-{pid}-");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Reads the `length` bytes of the file a reference names, checked as
/// value.proto says, and unlinks it.
pub fn read(dir: &Path, shared: &SharedBytes) -> Result<Bytes, ShmError> {
    let name = &shared.name;
    if !valid_name(name) {
        return Err(ShmError::BadName(name.clone()));
    }
    let io_err = |source| ShmError::Io {
        name: name.clone(),
        source,
    };
    let refused = |problem: String| ShmError::Refused {
        name: name.clone(),
        problem,
    };
    let path = dir.join(name);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(refused("not a regular file".into()));
    }
    if meta.uid() != nix::unistd::getuid().as_raw() {
        return Err(refused("belongs to another user".into()));
    }
    if meta.len() < shared.length {
        return Err(refused(format!(
            "{} bytes, shorter than the {} of the value",
            meta.len(),
            shared.length
        )));
    }
    let length = usize::try_from(shared.length).map_err(|_| refused("too long".into()))?;
    let mut data = vec![0u8; length];
    file.read_exact(&mut data).map_err(io_err)?;
    let _ = fs::remove_file(&path);
    Ok(Bytes::from(data))
}

/// Calls `f` on every array of `value` that is a shared-memory reference.
pub fn for_each_shared<'a>(value: &'a Value, f: &mut impl FnMut(&'a SharedBytes)) {
    match &value.kind {
        Some(Kind::NdarrayValue(NdArray {
            shared: Some(shared),
            ..
        })) => f(shared),
        Some(Kind::ListValue(list) | Kind::TupleValue(list)) => {
            for item in &list.items {
                for_each_shared(item, f);
            }
        }
        Some(Kind::DictValue(dict)) => {
            for entry in &dict.entries {
                for value in entry.key.iter().chain(entry.value.iter()) {
                    for_each_shared(value, f);
                }
            }
        }
        _ => {}
    }
}

/// Gives the file `name` of `dir` a second name of its own for request `id`
/// (`NAME.ID`): several requests made from one submission (a list of
/// targets) each map and unlink a file of their own, while the kernel keeps
/// one copy of the bytes. Returns the new name.
pub fn link_for(dir: &Path, name: &str, id: u64) -> Result<String, ShmError> {
    let linked = format!("{name}.{id}");
    if !valid_name(name) || !valid_name(&linked) {
        return Err(ShmError::BadName(name.to_owned()));
    }
    fs::hard_link(dir.join(name), dir.join(&linked)).map_err(|source| ShmError::Io {
        name: name.to_owned(),
        source,
    })?;
    Ok(linked)
}

/// Renames, in `value`, every reference to a file `from` into one to `to`
/// (a name given by [`link_for`]).
pub fn rename(value: &mut Value, renames: &[(String, String)]) {
    match &mut value.kind {
        Some(Kind::NdarrayValue(NdArray {
            shared: Some(shared),
            ..
        })) => {
            if let Some((_, to)) = renames.iter().find(|(from, _)| *from == shared.name) {
                shared.name.clone_from(to);
            }
        }
        Some(Kind::ListValue(list) | Kind::TupleValue(list)) => {
            for item in &mut list.items {
                rename(item, renames);
            }
        }
        Some(Kind::DictValue(dict)) => {
            for entry in &mut dict.entries {
                for value in entry.key.iter_mut().chain(entry.value.iter_mut()) {
                    rename(value, renames);
                }
            }
        }
        _ => {}
    }
}

/// The names of the files `parameters` reference.
pub fn parameter_names(parameters: &[Parameter]) -> Vec<String> {
    let mut names = Vec::new();
    for value in parameters.iter().filter_map(|p| p.value.as_ref()) {
        for_each_shared(value, &mut |s| names.push(s.name.clone()));
    }
    names
}

/// Whether `value` holds any shared-memory reference.
pub fn has_shared(value: &Value) -> bool {
    let mut any = false;
    for_each_shared(value, &mut |_| any = true);
    any
}

/// Puts the bytes of every reference in `value` inline (reading and
/// unlinking their files), for a process that cannot read the directory.
pub fn inline(dir: &Path, value: &mut Value) -> Result<(), ShmError> {
    match &mut value.kind {
        Some(Kind::NdarrayValue(array)) => {
            if let Some(shared) = array.shared.take() {
                array.data = read(dir, &shared)?;
            }
        }
        Some(Kind::ListValue(list) | Kind::TupleValue(list)) => {
            for item in &mut list.items {
                inline(dir, item)?;
            }
        }
        Some(Kind::DictValue(dict)) => {
            for entry in &mut dict.entries {
                for value in entry.key.iter_mut().chain(entry.value.iter_mut()) {
                    inline(dir, value)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_file_names() {
        for good in ["v-0a1b", "tmp-12-ab", "a", "A_b.c-d", &"x".repeat(100)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "/etc/passwd",
            "a b",
            "é",
            &"x".repeat(101),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "casa-node-shm-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        dir
    }

    #[test]
    fn reading_a_reference_checks_the_file_and_unlinks_it() {
        let dir = scratch();
        fs::write(dir.join("v-1"), b"0123456789").unwrap();
        let shared = |name: &str, length| SharedBytes {
            name: name.into(),
            length,
        };
        assert_eq!(&read(&dir, &shared("v-1", 4)).unwrap()[..], b"0123");
        assert!(!dir.join("v-1").exists(), "the file is unlinked once read");
        assert!(matches!(
            read(&dir, &shared("v-1", 4)),
            Err(ShmError::Io { .. })
        ));
        fs::write(dir.join("v-2"), b"01").unwrap();
        let short = read(&dir, &shared("v-2", 3)).unwrap_err().to_string();
        assert!(short.contains("shorter"), "{short}");
        std::os::unix::fs::symlink(dir.join("v-2"), dir.join("v-3")).unwrap();
        assert!(
            read(&dir, &shared("v-3", 1)).is_err(),
            "symlinks are refused"
        );
        fs::create_dir(dir.join("v-4")).unwrap();
        let not_file = read(&dir, &shared("v-4", 0)).unwrap_err().to_string();
        assert!(not_file.contains("not a regular file"), "{not_file}");
        assert!(matches!(
            read(&dir, &shared("../v-2", 1)),
            Err(ShmError::BadName(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn inlining_replaces_references_inside_containers() {
        let dir = scratch();
        fs::write(dir.join("v-a"), [1u8, 2, 3, 4]).unwrap();
        let mut array = Value::ndarray("|u1", vec![4], Bytes::new(), false);
        if let Some(Kind::NdarrayValue(a)) = &mut array.kind {
            a.shared = Some(SharedBytes {
                name: "v-a".into(),
                length: 4,
            });
        }
        let mut value = Value::list([Value::from(1i64), Value::tuple([array])]);
        assert!(has_shared(&value));
        let params = [Parameter::new("x", value.clone())];
        assert_eq!(parameter_names(&params), vec!["v-a".to_owned()]);
        inline(&dir, &mut value).unwrap();
        assert!(!has_shared(&value));
        let expected = Value::list([
            Value::from(1i64),
            Value::tuple([Value::ndarray(
                "|u1",
                vec![4],
                Bytes::from_static(&[1, 2, 3, 4]),
                false,
            )]),
        ]);
        assert_eq!(value, expected);
        assert!(!dir.join("v-a").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_tag_proves_the_directory() {
        let dir = SharedDir::create().expect("/dev/shm is usable here");
        assert!(usable(dir.path(), dir.tag()));
        assert!(!usable(dir.path(), "another tag"));
        assert!(!usable(&dir.path().join("missing"), dir.tag()));
        let path = dir.path().to_owned();
        fs::write(path.join("tmp-4242-x"), b"").unwrap();
        fs::write(path.join("tmp-42-x"), b"").unwrap();
        sweep_tmp(&path, 42);
        assert!(path.join("tmp-4242-x").exists() && !path.join("tmp-42-x").exists());
        drop(dir);
        assert!(!path.exists(), "dropping the directory removes it");
    }
}
