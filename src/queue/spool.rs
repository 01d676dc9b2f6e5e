//! The on-disk spool: one immutable message file and one small JSON entry per message.
//!
//! ```text
//! <dir>/tmp/        files being written; anything left here after a crash is garbage
//! <dir>/messages/   ID.eml: the message bytes, exactly as they will be relayed
//! <dir>/entries/    ID.json: envelope, per-recipient state, attempts, next attempt
//! ```
//!
//! A message is committed when its entry appears in `entries/`: the message file is written,
//! fsync'ed and renamed first, its directory fsync'ed, and only then the entry renamed into
//! place and `entries/` fsync'ed. So a crash at any moment leaves either a committed message
//! or garbage that [`Spool::recover`] removes, never an entry without its bytes. Entry updates
//! are the same write-temp, fsync, rename, fsync-dir dance.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::message::QueueId;

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt queue entry {path}: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no queued message {0}")]
    NotFound(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where one recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    /// Not yet tried, or deferred (4xx, network or TLS failure).
    Pending,
    /// The smart host accepted it (2xx after DATA).
    Delivered,
    /// Refused for good (5xx), or still pending at `max_age`; a DSN was queued if one is due.
    Failed,
}

/// One recipient of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    pub status: RecipientStatus,
    /// The smart host's last reply (or the local error) for this recipient.
    #[serde(default)]
    pub last_reply: Option<String>,
}

/// The mutable half of a queued message: everything but its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: QueueId,
    /// Envelope sender; empty for a bounce.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// Login of the submitting user; empty for bounces.
    pub user: String,
    pub client_ip: String,
    pub ehlo: String,
    pub tls: String,
    /// Seconds since the epoch.
    pub received_at: i64,
    pub attempts: u32,
    /// Seconds since the epoch.
    pub next_attempt: i64,
    #[serde(default)]
    pub last_error: Option<String>,
    /// True for DSNs we generated: they are never bounced themselves.
    #[serde(default)]
    pub is_bounce: bool,
}

impl Entry {
    /// Recipients still to be delivered.
    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Pending)
    }

    /// True when every recipient has a final state.
    pub fn is_done(&self) -> bool {
        self.pending().next().is_none()
    }
}

/// The spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// Opens (creating if needed) the spool at `dir`.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        for sub in ["tmp", "messages", "entries"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io_err(&path))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn tmp(&self, name: &str) -> PathBuf {
        self.dir.join("tmp").join(name)
    }

    fn message_path(&self, id: &QueueId) -> PathBuf {
        self.dir.join("messages").join(format!("{id}.eml"))
    }

    fn entry_path(&self, id: &QueueId) -> PathBuf {
        self.dir.join("entries").join(format!("{id}.json"))
    }

    /// The file a running server watches to rescan the spool (written by `queue retry`).
    pub fn wakeup_path(&self) -> PathBuf {
        self.dir.join("wakeup")
    }

    /// Writes a new message (its parts in order) and its entry, durably: a batch of one.
    pub fn commit(&self, entry: &Entry, parts: &[&[u8]]) -> Result<(), SpoolError> {
        let mut results = self.commit_batch(&[(entry, parts.to_vec())]);
        results.pop().unwrap_or(Ok(()))
    }

    /// Commits several new messages at once (group commit): every message file is written
    /// to a temp name, fsync'ed and renamed, and `messages/` fsync'ed once; only then every
    /// entry (the commit point) likewise, with one fsync of `entries/`. So a crash leaves
    /// either a committed message or garbage that [`Spool::recover`] removes. One result per
    /// message, in order.
    pub fn commit_batch(&self, batch: &[(&Entry, Vec<&[u8]>)]) -> Vec<Result<(), SpoolError>> {
        let mut results: Vec<Result<(), SpoolError>> = batch
            .iter()
            .map(|(entry, parts)| {
                let tmp = self.tmp(&format!("{}.eml", entry.id));
                write_synced(&tmp, |f| parts.iter().try_for_each(|p| f.write_all(p)))?;
                let path = self.message_path(&entry.id);
                fs::rename(&tmp, &path).map_err(io_err(&path))
            })
            .collect();
        if let Err(e) = sync_dir(&self.dir.join("messages")) {
            return batch.iter().map(|_| Err(clone_error(&e))).collect();
        }
        for ((entry, _), result) in batch.iter().zip(results.iter_mut()) {
            if result.is_ok() {
                *result = self.stage_entry(entry);
            }
        }
        if let Err(e) = sync_dir(&self.dir.join("entries")) {
            return batch.iter().map(|_| Err(clone_error(&e))).collect();
        }
        results
    }

    /// Writes an entry to its temp name, fsyncs it and renames it into place, without the
    /// directory fsync that makes the rename durable.
    fn stage_entry(&self, entry: &Entry) -> Result<(), SpoolError> {
        let tmp = self.tmp(&format!("{}.json", entry.id));
        let json = serde_json::to_vec_pretty(entry).map_err(|source| SpoolError::Corrupt {
            path: tmp.clone(),
            source,
        })?;
        write_synced(&tmp, |f| f.write_all(&json))?;
        let path = self.entry_path(&entry.id);
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Replaces a message's entry durably.
    pub fn write_entry(&self, entry: &Entry) -> Result<(), SpoolError> {
        self.stage_entry(entry)?;
        sync_dir(&self.dir.join("entries"))
    }

    /// Takes the spool lock, held until the returned file is dropped: shared for the
    /// server's results of delivery attempts, exclusive for the operator's changes
    /// (`queue retry`, `queue delete`). So an operator's change and an attempt's result never
    /// interleave: a message deleted during an attempt is not written back by it, and a
    /// message removed after delivery is not written back by a retry.
    pub fn lock(&self, exclusive: bool) -> Result<File, SpoolError> {
        let path = self.dir.join("lock");
        // Read-only when it exists (flock needs no write access), so a lock file that
        // `queue` run as root created does not lock the server out.
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?,
            Err(e) => return Err(io_err(&path)(e)),
        };
        if exclusive {
            file.lock()
        } else {
            file.lock_shared()
        }
        .map_err(io_err(&path))?;
        Ok(file)
    }

    /// Stores the result of a delivery attempt under the shared lock: removes a finished
    /// message, or replaces the entry of one still queued. `Ok(false)` when the message was
    /// deleted meanwhile, in which case nothing is written.
    pub fn settle(&self, entry: &Entry, done: bool) -> Result<bool, SpoolError> {
        let _lock = self.lock(false)?;
        if done {
            return match self.remove(&entry.id) {
                Ok(()) => Ok(true),
                Err(SpoolError::NotFound(_)) => Ok(false),
                Err(e) => Err(e),
            };
        }
        let path = self.entry_path(&entry.id);
        if !path.try_exists().map_err(io_err(&path))? {
            return Ok(false);
        }
        self.write_entry(entry)?;
        Ok(true)
    }

    /// Reads one entry.
    pub fn read_entry(&self, id: &QueueId) -> Result<Entry, SpoolError> {
        let path = self.entry_path(id);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => SpoolError::NotFound(id.to_string()),
            _ => SpoolError::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        serde_json::from_slice(&bytes).map_err(|source| SpoolError::Corrupt { path, source })
    }

    /// Reads a message's bytes.
    pub fn read_message(&self, id: &QueueId) -> Result<Vec<u8>, SpoolError> {
        let path = self.message_path(id);
        fs::read(&path).map_err(io_err(&path))
    }

    /// Removes a message: the entry first (un-committing it), then the bytes.
    pub fn remove(&self, id: &QueueId) -> Result<(), SpoolError> {
        let entry = self.entry_path(id);
        match fs::remove_file(&entry) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SpoolError::NotFound(id.to_string()))
            }
            Err(e) => return Err(io_err(&entry)(e)),
        }
        sync_dir(&self.dir.join("entries"))?;
        let message = self.message_path(id);
        let _ = fs::remove_file(&message);
        Ok(())
    }

    /// All committed entries, oldest id first. Unreadable entries are reported, not fatal.
    pub fn entries(&self) -> Result<(Vec<Entry>, Vec<SpoolError>), SpoolError> {
        let dir = self.dir.join("entries");
        let mut entries = Vec::new();
        let mut errors = Vec::new();
        for item in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let item = item.map_err(io_err(&dir))?;
            let name = item.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(QueueId::parse)
            else {
                continue;
            };
            match self.read_entry(&id) {
                Ok(entry) => entries.push(entry),
                Err(e) => errors.push(e),
            }
        }
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((entries, errors))
    }

    /// Start-up cleanup: empties `tmp/` and removes message files that never got an entry.
    /// Returns how many files were removed.
    pub fn recover(&self) -> Result<usize, SpoolError> {
        let mut removed = 0;
        let tmp = self.dir.join("tmp");
        for item in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let path = item.map_err(io_err(&tmp))?.path();
            if fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        let messages = self.dir.join("messages");
        for item in fs::read_dir(&messages).map_err(io_err(&messages))? {
            let path = item.map_err(io_err(&messages))?.path();
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(QueueId::parse);
            let orphan = id.is_none_or(|id| !self.entry_path(&id).exists());
            if orphan && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Creates `path`, lets `fill` write it, and fsyncs it before returning.
fn write_synced(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), SpoolError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path))?;
    fill(&mut file).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// A copy of an error for every message of a batch that it failed.
fn clone_error(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::Io { path, source } => SpoolError::Io {
            path: path.clone(),
            source: io::Error::new(source.kind(), source.to_string()),
        },
        other => SpoolError::Io {
            path: PathBuf::new(),
            source: io::Error::other(other.to_string()),
        },
    }
}

/// Fsyncs a directory so that a rename inside it is durable.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Entry {
        Entry {
            id: QueueId::parse(id).unwrap(),
            sender: "a@example.org".into(),
            recipients: vec![Recipient {
                address: "b@example.net".into(),
                status: RecipientStatus::Pending,
                last_reply: None,
            }],
            user: "a@example.org".into(),
            client_ip: "192.0.2.1".into(),
            ehlo: "client".into(),
            tls: "TLSv1.3".into(),
            received_at: 1,
            attempts: 0,
            next_attempt: 1,
            last_error: None,
            is_bounce: false,
        }
    }

    #[test]
    fn commit_read_update_remove() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let e = entry("ID1");
        spool
            .commit(&e, &[b"Subject: x\r\n", b"\r\nbody\r\n"])
            .unwrap();
        assert_eq!(
            spool.read_message(&e.id).unwrap(),
            b"Subject: x\r\n\r\nbody\r\n"
        );
        let mut e2 = spool.read_entry(&e.id).unwrap();
        assert_eq!(e2, e);
        e2.attempts = 3;
        spool.write_entry(&e2).unwrap();
        assert_eq!(spool.entries().unwrap().0, vec![e2]);
        spool.remove(&e.id).unwrap();
        assert!(matches!(
            spool.read_entry(&e.id),
            Err(SpoolError::NotFound(_))
        ));
        assert!(spool.entries().unwrap().0.is_empty());
    }

    #[test]
    fn settle_does_not_bring_back_a_deleted_message() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut e = entry("GONE");
        spool.commit(&e, &[b"x\r\n"]).unwrap();
        e.attempts = 1;
        assert!(spool.settle(&e, false).unwrap());
        assert_eq!(spool.read_entry(&e.id).unwrap().attempts, 1);
        // `queue delete` while the attempt was in flight.
        {
            let _lock = spool.lock(true).unwrap();
            spool.remove(&e.id).unwrap();
        }
        e.attempts = 2;
        assert!(!spool.settle(&e, false).unwrap());
        assert!(!spool.settle(&e, true).unwrap());
        assert!(spool.entries().unwrap().0.is_empty());
    }

    #[test]
    fn batch_commit_writes_every_message() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let (a, b) = (entry("A1"), entry("B2"));
        let results = spool.commit_batch(&[(&a, vec![b"one\r\n"]), (&b, vec![b"two", b"\r\n"])]);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(spool.read_message(&b.id).unwrap(), b"two\r\n");
        assert_eq!(spool.entries().unwrap().0, vec![a, b]);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn recover_removes_garbage_but_keeps_committed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.commit(&entry("KEEP"), &[b"x\r\n"]).unwrap();
        // A crash after the message rename but before the entry rename, and one mid-write.
        fs::write(dir.path().join("messages/ORPHAN.eml"), b"half").unwrap();
        fs::write(dir.path().join("tmp/NEW.eml"), b"partial").unwrap();
        assert_eq!(spool.recover().unwrap(), 2);
        let (entries, errors) = spool.entries().unwrap();
        assert_eq!(entries.len(), 1);
        assert!(errors.is_empty());
        assert!(spool.read_message(&QueueId::parse("KEEP").unwrap()).is_ok());
    }
}
