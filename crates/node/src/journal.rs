//! The head node's journal (`--journal PATH`, rule 33): an append-only
//! file of what the head node accepted and answered, so that a head
//! node started again with the same file loses no acknowledged request.
//!
//! # What it holds
//!
//! A header ([`JournalHeader`]: format, owner), then records
//! ([`JournalRecord`]): how far ids may have been given out, each request
//! accepted (before its acknowledgement is sent), and each final response
//! (and each response that replaces a timeout record). On disk every record
//! is a 4-byte big-endian length, a 4-byte big-endian CRC-32C of the
//! record's bytes, and the record; a record cut short or damaged by a crash
//! fails its length or checksum, and the journal is cut after the last
//! whole record (the log says how many bytes went).
//!
//! # Durability
//!
//! Each record is written to the file (one `write`) before the head node
//! acts on it: a request's record before its acknowledgement goes out, a
//! response's before it is delivered. So when the head node's process
//! dies (SIGKILL, out of memory, a crash) nothing acknowledged is lost: the
//! operating system has the bytes. A thread forces them to the disk every
//! [`SYNC_EVERY`] (100 ms) when there are new ones: on power loss or a
//! kernel crash, at most that much acknowledged work is at risk.
//!
//! # Size
//!
//! The journal is rewritten (compacted) to what is still needed when it
//! has grown past four times that and 64 MiB: the requests not yet
//! answered, and the latest [`KEEP_RESPONSES`] responses (at most
//! [`KEEP_BYTES`] of them), which drivers may still claim.
//!
//! # Ownership
//!
//! The head node holds an exclusive lock on the file while it runs: a
//! second head node given the same journal is refused ("in use"), as is
//! a journal of another user or of a newer format.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use casa_node_protocol::RequestId;
use casa_node_protocol::pb::journal_record::Entry;
use casa_node_protocol::pb::{
    CommandResponse, JournalAccepted, JournalHeader, JournalRecord, SubmitRequest,
};
use nix::fcntl::{Flock, FlockArg};
use prost::Message;

/// The record format this casa-node writes and reads.
pub const FORMAT: u32 = 1;

/// The header's `magic`.
const MAGIC: &str = "casa-node journal";

/// Length and checksum in front of every record.
const RECORD_HEAD: usize = 8;

/// The longest record read back: a request or response as large as a
/// frame (1 GiB), with room for the record around it.
const MAX_RECORD: usize = (1 << 30) + (1 << 16);

/// Ids reserved at a time: one record covers this many ids given out.
const RESERVE: u64 = 4096;

/// How often new records are forced to the disk.
pub const SYNC_EVERY: Duration = Duration::from_millis(100);

/// Responses kept for claims after they were delivered, at most.
pub const KEEP_RESPONSES: usize = 100_000;

/// Bytes of responses kept for claims, at most.
pub const KEEP_BYTES: usize = 256 << 20;

/// The journal is compacted once it is larger than this and four times
/// what it holds that is still needed.
const COMPACT_FROM: u64 = 64 << 20;

/// Why a journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing it failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// Another head node holds it.
    #[error("journal {path} is in use by another head node")]
    InUse {
        /// The journal.
        path: PathBuf,
    },
    /// It does not start with a journal header.
    #[error("{path} is not a casa-node journal")]
    NotAJournal {
        /// The file.
        path: PathBuf,
    },
    /// Another user's.
    #[error("journal {path} belongs to user {owner}, not to this user ({uid})")]
    OtherUser {
        /// The journal.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's user.
        uid: u32,
    },
    /// Written by a newer casa-node.
    #[error(
        "journal {path} has format {found}, newer than this casa-node's {FORMAT}: use the casa-node that wrote it or a newer one"
    )]
    Newer {
        /// The journal.
        path: PathBuf,
        /// Its format.
        found: u32,
    },
}

/// What a journal held when it was opened.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Ids from here on were never given out.
    pub next_id: RequestId,
    /// Requests accepted and not answered, in id order.
    pub pending: Vec<JournalAccepted>,
    /// Responses kept, which drivers may claim.
    pub answered: usize,
    /// Bytes after the last whole record, cut off (a crash mid-write).
    pub dropped_bytes: u64,
    /// Whether the file was new (empty or absent).
    pub created: bool,
}

/// An open journal, locked for this head node.
pub struct Journal {
    path: PathBuf,
    file: Flock<File>,
    /// Bytes in the file.
    len: u64,
    /// Bytes in the file after the last compaction.
    live_len: u64,
    /// Ids below this may have been given out.
    reserved_until: RequestId,
    /// Requests accepted and not answered, for compaction.
    pending: HashMap<RequestId, JournalAccepted>,
    /// Responses kept, oldest first, and their total size.
    kept: VecDeque<RequestId>,
    responses: HashMap<RequestId, CommandResponse>,
    kept_bytes: usize,
    syncer: Syncer,
}

impl Journal {
    /// Opens (or creates) the journal at `path`, locks it, reads what it
    /// holds (cutting a damaged tail), and rewrites it compactly.
    pub fn open(path: &Path) -> Result<(Journal, Recovered), JournalError> {
        let io_error = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_error)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => file,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(JournalError::InUse {
                    path: path.to_owned(),
                });
            }
            Err((_, errno)) => return Err(io_error(io::Error::from(errno))),
        };
        let uid = nix::unistd::getuid().as_raw();
        let owner = file.metadata().map_err(io_error)?.uid();
        if owner != uid {
            return Err(JournalError::OtherUser {
                path: path.to_owned(),
                owner,
                uid,
            });
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_error)?;
        let mut journal = Journal {
            path: path.to_owned(),
            file,
            len: 0,
            live_len: 0,
            reserved_until: 1,
            pending: HashMap::new(),
            kept: VecDeque::new(),
            responses: HashMap::new(),
            kept_bytes: 0,
            syncer: Syncer::start(None),
        };
        let mut recovered = Recovered {
            created: bytes.is_empty(),
            ..Recovered::default()
        };
        if !bytes.is_empty() {
            let whole = journal.replay(&bytes, uid)?;
            recovered.dropped_bytes = (bytes.len() - whole) as u64;
        }
        drop(bytes);
        recovered.next_id = journal.reserved_until;
        let mut pending: Vec<JournalAccepted> = journal.pending.values().cloned().collect();
        pending.sort_by_key(|a| a.id);
        recovered.pending = pending;
        recovered.answered = journal.responses.len();
        journal.compact().map_err(io_error)?;
        Ok((journal, recovered))
    }

    /// Reads the header and the records of `bytes` into this journal's
    /// state; returns how many bytes hold whole records.
    fn replay(&mut self, bytes: &[u8], uid: u32) -> Result<usize, JournalError> {
        let not_a_journal = || JournalError::NotAJournal {
            path: self.path.clone(),
        };
        let Some((header, mut at)) = read_record(bytes, 0) else {
            return Err(not_a_journal());
        };
        let header = JournalHeader::decode(header).map_err(|_| not_a_journal())?;
        if header.magic != MAGIC {
            return Err(not_a_journal());
        }
        if header.format > FORMAT {
            return Err(JournalError::Newer {
                path: self.path.clone(),
                found: header.format,
            });
        }
        if header.uid != uid {
            return Err(JournalError::OtherUser {
                path: self.path.clone(),
                owner: header.uid,
                uid,
            });
        }
        while let Some((record, next)) = read_record(bytes, at) {
            let Ok(record) = JournalRecord::decode(record) else {
                break;
            };
            match record.entry {
                Some(Entry::IdsReservedUntil(until)) => {
                    self.reserved_until = self.reserved_until.max(until);
                }
                Some(Entry::Accepted(accepted)) => {
                    self.reserved_until = self.reserved_until.max(accepted.id + 1);
                    self.pending.insert(accepted.id, accepted);
                }
                Some(Entry::Answered(response)) => {
                    self.pending.remove(&response.id);
                    self.keep(response);
                }
                None => {}
            }
            at = next;
        }
        Ok(at)
    }

    /// Ids up to `next_id` (exclusive) are about to be given out: records
    /// that (with room for more) before they are.
    pub fn reserve(&mut self, next_id: RequestId) -> io::Result<()> {
        if next_id <= self.reserved_until {
            return Ok(());
        }
        let until = next_id + RESERVE;
        self.append(&JournalRecord {
            entry: Some(Entry::IdsReservedUntil(until)),
        })?;
        self.reserved_until = until;
        Ok(())
    }

    /// Request `id` was accepted: `request` is its submission narrowed to
    /// it (one target or none, no ids).
    pub fn accepted(&mut self, id: RequestId, request: SubmitRequest) -> io::Result<()> {
        let accepted = JournalAccepted {
            id,
            request: Some(request),
        };
        self.reserved_until = self.reserved_until.max(id + 1);
        self.append(&JournalRecord {
            entry: Some(Entry::Accepted(accepted.clone())),
        })?;
        self.pending.insert(id, accepted);
        Ok(())
    }

    /// A final response (or one that replaces a timeout record).
    pub fn answered(&mut self, response: &CommandResponse) -> io::Result<()> {
        self.append(&JournalRecord {
            entry: Some(Entry::Answered(response.clone())),
        })?;
        self.pending.remove(&response.id);
        self.keep(response.clone());
        self.compact_if_due()
    }

    /// The latest response kept for `id`.
    pub fn response(&self, id: RequestId) -> Option<&CommandResponse> {
        self.responses.get(&id)
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn keep(&mut self, response: CommandResponse) {
        let id = response.id;
        self.kept_bytes += response.encoded_len();
        if let Some(old) = self.responses.insert(id, response) {
            self.kept_bytes -= old.encoded_len();
        } else {
            self.kept.push_back(id);
        }
        while self.kept.len() > KEEP_RESPONSES || self.kept_bytes > KEEP_BYTES {
            let Some(oldest) = self.kept.pop_front() else {
                break;
            };
            if let Some(old) = self.responses.remove(&oldest) {
                self.kept_bytes -= old.encoded_len();
            }
        }
    }

    fn append(&mut self, record: &JournalRecord) -> io::Result<()> {
        let framed = frame(&record.encode_to_vec());
        self.file.write_all(&framed)?;
        self.len += framed.len() as u64;
        self.syncer.dirty();
        Ok(())
    }

    fn compact_if_due(&mut self) -> io::Result<()> {
        if self.len > COMPACT_FROM && self.len > 4 * self.live_len {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the journal as what is still needed, into a new file that
    /// replaces it (written and forced to disk first, so that a crash
    /// leaves one or the other whole).
    fn compact(&mut self) -> io::Result<()> {
        let mut fresh = self.path.clone().into_os_string();
        fresh.push(".compacting");
        let fresh = PathBuf::from(fresh);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&fresh)?;
        let mut file = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| io::Error::from(errno))?;
        let mut out = io::BufWriter::new(&mut *file);
        let header = JournalHeader {
            magic: MAGIC.into(),
            format: FORMAT,
            uid: nix::unistd::getuid().as_raw(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        };
        let mut len = 0u64;
        let mut put = |bytes: Vec<u8>, out: &mut io::BufWriter<&mut File>| -> io::Result<()> {
            let framed = frame(&bytes);
            len += framed.len() as u64;
            out.write_all(&framed)
        };
        put(header.encode_to_vec(), &mut out)?;
        put(
            JournalRecord {
                entry: Some(Entry::IdsReservedUntil(self.reserved_until)),
            }
            .encode_to_vec(),
            &mut out,
        )?;
        let mut pending: Vec<&JournalAccepted> = self.pending.values().collect();
        pending.sort_by_key(|a| a.id);
        for accepted in pending {
            put(
                JournalRecord {
                    entry: Some(Entry::Accepted(accepted.clone())),
                }
                .encode_to_vec(),
                &mut out,
            )?;
        }
        for id in &self.kept {
            if let Some(response) = self.responses.get(id) {
                put(
                    JournalRecord {
                        entry: Some(Entry::Answered(response.clone())),
                    }
                    .encode_to_vec(),
                    &mut out,
                )?;
            }
        }
        out.flush()?;
        drop(out);
        file.sync_all()?;
        std::fs::rename(&fresh, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.syncer = Syncer::start(Some(file.try_clone()?));
        self.file = file;
        self.len = len;
        self.live_len = len;
        Ok(())
    }
}

/// One record framed for the file: length, checksum, bytes.
fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(RECORD_HEAD + bytes.len());
    framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    framed.extend_from_slice(&crc32c::crc32c(bytes).to_be_bytes());
    framed.extend_from_slice(bytes);
    framed
}

/// The whole record at `at` in `bytes` and where the next one starts;
/// `None` at the end or at a record cut short or damaged.
fn read_record(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let head = bytes.get(at..at + RECORD_HEAD)?;
    let len = u32::from_be_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(head[4..].try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let start = at + RECORD_HEAD;
    let record = bytes.get(start..start + len)?;
    (crc32c::crc32c(record) == crc).then_some((record, start + len))
}

/// Forces the journal's new records to the disk every [`SYNC_EVERY`], on
/// a thread of its own; a last time when dropped.
struct Syncer {
    dirty: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    fn start(file: Option<File>) -> Syncer {
        let dirty = Arc::new(AtomicBool::new(false));
        let Some(file) = file else {
            return Syncer {
                dirty,
                stop: None,
                thread: None,
            };
        };
        let (stop, stopped) = mpsc::channel::<()>();
        let flag = dirty.clone();
        let file = Mutex::new(file);
        let thread = std::thread::Builder::new()
            .name("casa-node-journal".into())
            .spawn(move || {
                loop {
                    let last = !matches!(
                        stopped.recv_timeout(SYNC_EVERY),
                        Err(RecvTimeoutError::Timeout)
                    );
                    if flag.swap(false, Ordering::AcqRel) {
                        let file = file.lock().unwrap_or_else(|e| e.into_inner());
                        if let Err(e) = file.sync_data() {
                            tracing::warn!("the journal could not be forced to disk: {e}");
                        }
                    }
                    if last {
                        return;
                    }
                }
            })
            .ok();
        Syncer {
            dirty,
            stop: Some(stop),
            thread,
        }
    }

    fn dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use casa_node_protocol::pb::{CommandStatus, Value};
    use proptest::prelude::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "casa-node-journal-{}-{name}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("journal")
    }

    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn submission(command: &str, target: Option<i32>) -> SubmitRequest {
        SubmitRequest {
            command: command.into(),
            targets: target.into_iter().collect(),
            ..SubmitRequest::default()
        }
    }

    fn response(id: RequestId, ret: i64) -> CommandResponse {
        CommandResponse {
            id,
            command: format!("command {id}"),
            ret: Some(Value::from(ret)),
            status: CommandStatus::ResponseReceived.into(),
            successful: true,
            server: 1,
            ..CommandResponse::default()
        }
    }

    /// What a journal holds, as a driver would see it.
    fn state(recovered: &Recovered, journal: &Journal, ids: RequestId) -> String {
        let pending: Vec<String> = recovered
            .pending
            .iter()
            .map(|a| {
                let r = a.request.as_ref().unwrap();
                format!("{}:{}:{:?}", a.id, r.command, r.targets)
            })
            .collect();
        let answered: Vec<String> = (1..ids)
            .filter_map(|id| journal.response(id))
            .map(|r| format!("{}={:?}", r.id, r.ret))
            .collect();
        format!("pending {pending:?} answered {answered:?}")
    }

    #[test]
    fn a_journal_reopened_gives_back_what_it_was_told() {
        let path = temp("reopen");
        {
            let (mut journal, recovered) = Journal::open(&path).unwrap();
            assert!(recovered.created);
            assert_eq!(recovered.next_id, 1);
            journal.reserve(4).unwrap();
            journal.accepted(1, submission("a", None)).unwrap();
            journal.accepted(2, submission("b", Some(2))).unwrap();
            journal.accepted(3, submission("c", None)).unwrap();
            journal.answered(&response(2, 20)).unwrap();
        }
        let (journal, recovered) = Journal::open(&path).unwrap();
        assert!(!recovered.created);
        assert_eq!(recovered.dropped_bytes, 0);
        // Ids up to 4 were about to be given, and 4096 more reserved.
        assert_eq!(recovered.next_id, 4 + RESERVE);
        assert_eq!(
            state(&recovered, &journal, 10),
            r#"pending ["1:a:[]", "3:c:[]"] answered ["2=Some(Value { kind: Some(IntValue(20)) })"]"#
        );
        assert_eq!(recovered.answered, 1);
    }

    #[test]
    fn a_journal_in_use_another_users_or_of_a_newer_format_is_refused() {
        let path = temp("refused");
        let (journal, _) = Journal::open(&path).unwrap();
        let err = Journal::open(&path).err().expect("in use");
        assert!(matches!(err, JournalError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("in use by another head node"));
        drop(journal);

        let newer = temp("newer");
        let header = JournalHeader {
            magic: MAGIC.into(),
            format: FORMAT + 1,
            uid: nix::unistd::getuid().as_raw(),
            created: 0.0,
        };
        std::fs::write(&newer, frame(&header.encode_to_vec())).unwrap();
        let err = Journal::open(&newer).err().expect("newer");
        assert!(
            matches!(err, JournalError::Newer { found, .. } if found == FORMAT + 1),
            "{err}"
        );

        let other = temp("other");
        let header = JournalHeader {
            uid: nix::unistd::getuid().as_raw() + 1,
            format: FORMAT,
            ..header
        };
        std::fs::write(&other, frame(&header.encode_to_vec())).unwrap();
        let err = Journal::open(&other).err().expect("another user's");
        assert!(matches!(err, JournalError::OtherUser { .. }), "{err}");

        let garbage = temp("garbage");
        std::fs::write(&garbage, b"print('not a journal')\n").unwrap();
        let err = Journal::open(&garbage).err().expect("not a journal");
        assert!(
            err.to_string().ends_with("is not a casa-node journal"),
            "{err}"
        );
        // Refusing it left it as it was.
        assert_eq!(
            std::fs::read(&garbage).unwrap(),
            b"print('not a journal')\n"
        );
    }

    #[test]
    fn compaction_keeps_what_is_still_needed_and_the_latest_responses() {
        let path = temp("compact");
        let (mut journal, _) = Journal::open(&path).unwrap();
        let big = "x".repeat(4096);
        let count = (COMPACT_FROM as usize / big.len()) * 2;
        for id in 1..=count as RequestId {
            journal.reserve(id + 1).unwrap();
            journal.accepted(id, submission(&big, None)).unwrap();
            if id != 7 {
                journal.answered(&response(id, id as i64)).unwrap();
            }
        }
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 2 * COMPACT_FROM, "not compacted: {size} bytes");
        drop(journal);
        let (journal, recovered) = Journal::open(&path).unwrap();
        let pending: Vec<RequestId> = recovered.pending.iter().map(|a| a.id).collect();
        assert_eq!(pending, vec![7]);
        let last = count as RequestId;
        assert_eq!(
            journal.response(last).and_then(|r| r.ret.clone()),
            Some(Value::from(last as i64))
        );
        assert!(recovered.next_id > last);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A crash mid-write leaves the journal cut at any byte: it opens,
        /// holds exactly the records written whole before the cut, and says
        /// how many bytes it dropped.
        #[test]
        fn a_journal_cut_anywhere_opens_with_every_whole_record(cut in 0.0f64..1.0) {
            let path = temp("cut");
            let mut ends = Vec::new();
            {
                let (mut journal, _) = Journal::open(&path).unwrap();
                ends.push(journal.len);
                for id in 1..=20 {
                    journal.accepted(id, submission(&format!("c{id}"), None)).unwrap();
                    ends.push(journal.len);
                    if id % 3 == 0 {
                        journal.answered(&response(id, 1)).unwrap();
                        ends.push(journal.len);
                    }
                }
            }
            let bytes = std::fs::read(&path).unwrap();
            let header = ends[0] as usize;
            let at = header + ((bytes.len() - header) as f64 * cut) as usize;
            std::fs::write(&path, &bytes[..at]).unwrap();
            let whole = ends.iter().copied().filter(|&e| e as usize <= at).max().unwrap();
            let (journal, recovered) = Journal::open(&path).unwrap();
            prop_assert_eq!(recovered.dropped_bytes, at as u64 - whole);
            // What a journal cut at `whole` holds: replay the same
            // operations up to there.
            let pending: Vec<RequestId> = recovered.pending.iter().map(|a| a.id).collect();
            let mut expected_pending = Vec::new();
            let mut expected_answered = Vec::new();
            let mut i = 1;
            for id in 1..=20u64 {
                if ends[i] > whole { break; }
                i += 1;
                expected_pending.push(id);
                if id % 3 == 0 {
                    if ends[i] > whole { break; }
                    i += 1;
                    expected_pending.retain(|&p| p != id);
                    expected_answered.push(id);
                }
            }
            prop_assert_eq!(pending, expected_pending);
            let answered: Vec<RequestId> = (1..=20).filter(|&id| journal.response(id).is_some()).collect();
            prop_assert_eq!(answered, expected_answered);
            // Reopened once more: cut already, nothing more dropped.
            drop(journal);
            let (_, again) = Journal::open(&path).unwrap();
            prop_assert_eq!(again.dropped_bytes, 0);
        }

        /// A byte flipped inside a record ends the journal before that
        /// record: its checksum fails.
        #[test]
        fn a_damaged_record_ends_the_journal_there(flip in 0.0f64..1.0) {
            let path = temp("flip");
            let mut ends = Vec::new();
            {
                let (mut journal, _) = Journal::open(&path).unwrap();
                ends.push(journal.len);
                for id in 1..=10 {
                    journal.accepted(id, submission(&format!("c{id}"), None)).unwrap();
                    ends.push(journal.len);
                }
            }
            let mut bytes = std::fs::read(&path).unwrap();
            let header = ends[0] as usize;
            let at = header + ((bytes.len() - header - 1) as f64 * flip) as usize;
            bytes[at] ^= 0x40;
            std::fs::write(&path, &bytes).unwrap();
            let (_, recovered) = Journal::open(&path).unwrap();
            let before = ends.iter().filter(|&&e| e as usize <= at).count() - 1;
            let pending: Vec<RequestId> = recovered.pending.iter().map(|a| a.id).collect();
            prop_assert_eq!(pending, (1..=before as RequestId).collect::<Vec<_>>());
            prop_assert!(recovered.dropped_bytes > 0);
        }
    }
}
