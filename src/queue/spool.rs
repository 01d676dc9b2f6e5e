//! The on-disk spool: one file per queued message, plus a small state file once an attempt
//! has left some recipients pending.
//!
//! ```text
//! <dir>/tmp/        files being written; anything left here after a crash is garbage
//! <dir>/queued/     ID.msg: line 1 the envelope (JSON), then the message bytes exactly as
//!                   they will be relayed; written once, never changed
//! <dir>/state/      ID.json: the envelope as it stands after an attempt or `queue retry`;
//!                   when present it supersedes line 1 of the message file
//! ```
//!
//! A message is committed when its file appears in `queued/`: it is written to `tmp/`,
//! fdatasync'ed, renamed into place, and `queued/` fsync'ed. Envelope and bytes share one
//! file because every fsync is a flush of the disk's cache: one file per message is half the
//! flushes of a separate envelope, and the spool writer commits concurrent messages as one
//! batch so they also share the directory fsync. State updates are the same write-temp,
//! fsync, rename, fsync-directory dance, in `state/`.
//!
//! Removal after delivery unlinks the message file, then its state file, without an fsync:
//! if a crash loses the unlinks, the message comes back with its last durable envelope (or,
//! should only the state file's unlink survive, with line 1) and is delivered again, maybe
//! with a second DSN: at least once, never lost, for one flush less per delivered message. A
//! state file whose message is gone is a removal cut short, and [`Spool::recover`] finishes it.
//!
//! The directory is `queued/`, not the `messages/` of the earlier two-file layout, because
//! that version's start-up deletes any `messages/` file without an entry: going back to it
//! leaves today's queue untouched (and undelivered) instead of deleting it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
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

/// The longest envelope line read back; an entry is a few hundred bytes per recipient.
const MAX_ENVELOPE: u64 = 4 << 20;

impl Spool {
    /// Opens (creating if needed) the spool at `dir`.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        for sub in ["tmp", "queued", "state"] {
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
        self.dir.join("queued").join(format!("{id}.msg"))
    }

    fn state_path(&self, id: &QueueId) -> PathBuf {
        self.dir.join("state").join(format!("{id}.json"))
    }

    /// The file a running server watches to rescan the spool (written by `queue retry`).
    pub fn wakeup_path(&self) -> PathBuf {
        self.dir.join("wakeup")
    }

    /// Writes a new message (its parts in order) with its envelope, durably: a batch of one.
    pub fn commit(&self, entry: &Entry, parts: &[&[u8]]) -> Result<(), SpoolError> {
        let mut results = self.commit_batch(&[(entry, parts.to_vec())]);
        results.pop().unwrap_or(Ok(()))
    }

    /// Commits several new messages at once (group commit): every message file is written to
    /// a temp name first, then each is fdatasync'ed, renamed into `queued/`, and the directory
    /// fsync'ed once; only then may the clients hear 250. A crash before the renames leaves
    /// garbage in `tmp/` that [`Spool::recover`] removes, never a partial message; a crash
    /// between the renames and the directory fsync may keep complete messages whose clients
    /// heard nothing and send them again (a duplicate, never a loss). One result per message,
    /// in order.
    pub fn commit_batch(&self, batch: &[(&Entry, Vec<&[u8]>)]) -> Vec<Result<(), SpoolError>> {
        let written: Vec<Result<(File, PathBuf), SpoolError>> = batch
            .iter()
            .map(|(entry, parts)| self.write_message(entry, parts))
            .collect();
        let mut results: Vec<Result<(), SpoolError>> = written
            .into_iter()
            .zip(batch)
            .map(|(written, (entry, _))| {
                let (file, tmp) = written?;
                let path = self.message_path(&entry.id);
                let placed = file
                    .sync_data()
                    .map_err(io_err(&tmp))
                    .and_then(|()| fs::rename(&tmp, &path).map_err(io_err(&path)));
                if placed.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                placed
            })
            .collect();
        if results.iter().any(Result::is_ok) {
            if let Err(e) = sync_dir(&self.dir.join("queued")) {
                // The client hears 451 and sends again: take the files back, so that the
                // message is not also delivered from a copy found at the next start.
                for ((entry, _), result) in batch.iter().zip(&results) {
                    if result.is_ok() {
                        let _ = fs::remove_file(self.message_path(&entry.id));
                    }
                }
                results = batch.iter().map(|_| Err(clone_error(&e))).collect();
            }
        }
        results
    }

    /// Writes the envelope line and the message to a temp file, left open for the fsync.
    fn write_message(&self, entry: &Entry, parts: &[&[u8]]) -> Result<(File, PathBuf), SpoolError> {
        let tmp = self.tmp(&format!("{}.msg", entry.id));
        // Compact JSON has no raw newline (serde_json escapes control characters), so the
        // envelope is exactly the first line.
        let mut envelope = serde_json::to_vec(entry).map_err(|source| SpoolError::Corrupt {
            path: tmp.clone(),
            source,
        })?;
        envelope.push(b'\n');
        let mut file = create(&tmp)?;
        let written = std::iter::once(envelope.as_slice())
            .chain(parts.iter().copied())
            .try_for_each(|part| file.write_all(part));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&tmp)(e));
        }
        Ok((file, tmp))
    }

    /// Replaces a message's envelope durably (in `state/`; the message file never changes).
    pub fn write_entry(&self, entry: &Entry) -> Result<(), SpoolError> {
        let tmp = self.tmp(&format!("{}.json", entry.id));
        let json = serde_json::to_vec_pretty(entry).map_err(|source| SpoolError::Corrupt {
            path: tmp.clone(),
            source,
        })?;
        let mut file = create(&tmp)?;
        file.write_all(&json).map_err(io_err(&tmp))?;
        file.sync_data().map_err(io_err(&tmp))?;
        let path = self.state_path(&entry.id);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.dir.join("state"))
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
    /// message, or replaces the envelope of one still queued. `Ok(false)` when the message
    /// was deleted meanwhile, in which case nothing is written.
    pub fn settle(&self, entry: &Entry, done: bool) -> Result<bool, SpoolError> {
        let _lock = self.lock(false)?;
        if done {
            return match self.remove(&entry.id) {
                Ok(()) => Ok(true),
                Err(SpoolError::NotFound(_)) => Ok(false),
                Err(e) => Err(e),
            };
        }
        let path = self.message_path(&entry.id);
        if !path.try_exists().map_err(io_err(&path))? {
            return Ok(false);
        }
        self.write_entry(entry)?;
        Ok(true)
    }

    /// Reads one envelope: the state file when there is one, else line 1 of the message.
    pub fn read_entry(&self, id: &QueueId) -> Result<Entry, SpoolError> {
        let path = self.message_path(id);
        let file = open_message(&path, id)?;
        match self.read_state(id)? {
            Some(entry) => Ok(entry),
            None => read_envelope(&mut BufReader::new(file), &path),
        }
    }

    /// Reads a message's bytes (without the envelope line).
    pub fn read_message(&self, id: &QueueId) -> Result<Vec<u8>, SpoolError> {
        let path = self.message_path(id);
        let file = open_message(&path, id)?;
        let size = file.metadata().map_err(io_err(&path))?.len();
        let mut reader = BufReader::new(file);
        skip_line(&mut reader, &path)?;
        read_rest(reader, size, &path)
    }

    /// Reads what a delivery attempt needs from one open of the message file: the envelope
    /// (the state file's when there is one) and the bytes. The bytes have their own result,
    /// so that a message whose envelope is readable but whose bytes are not can still be
    /// retried, expired and reported.
    pub fn load(&self, id: &QueueId) -> Result<(Entry, Result<Vec<u8>, SpoolError>), SpoolError> {
        let path = self.message_path(id);
        let file = open_message(&path, id)?;
        let size = file.metadata().map_err(io_err(&path))?.len();
        let mut reader = BufReader::new(file);
        let line_one = read_envelope(&mut reader, &path);
        let entry = match self.read_state(id)? {
            Some(entry) => entry,
            None => line_one?,
        };
        Ok((entry, read_rest(reader, size, &path)))
    }

    /// The envelope in `state/`, if an attempt or `queue retry` has written one.
    fn read_state(&self, id: &QueueId) -> Result<Option<Entry>, SpoolError> {
        let state = self.state_path(id);
        match fs::read(&state) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| SpoolError::Corrupt {
                        path: state,
                        source,
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&state)(e)),
        }
    }

    /// Removes a message: the message file first (un-committing it), then its state file.
    /// Not fsync'ed: see the module documentation; [`Spool::sync_removals`] makes it durable.
    pub fn remove(&self, id: &QueueId) -> Result<(), SpoolError> {
        let message = self.message_path(id);
        match fs::remove_file(&message) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SpoolError::NotFound(id.to_string()))
            }
            Err(e) => return Err(io_err(&message)(e)),
        }
        let state = self.state_path(id);
        match fs::remove_file(&state) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&state)(e)),
            _ => Ok(()),
        }
    }

    /// Makes earlier removals durable (for the operator's `queue delete`, which must stick).
    pub fn sync_removals(&self) -> Result<(), SpoolError> {
        sync_dir(&self.dir.join("queued"))?;
        sync_dir(&self.dir.join("state"))
    }

    /// All committed messages' envelopes, oldest id first. Unreadable ones are reported, not
    /// fatal.
    pub fn entries(&self) -> Result<(Vec<Entry>, Vec<SpoolError>), SpoolError> {
        let dir = self.dir.join("queued");
        let mut entries = Vec::new();
        let mut errors = Vec::new();
        for item in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let item = item.map_err(io_err(&dir))?;
            let name = item.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".msg"))
                .and_then(QueueId::parse)
            else {
                continue;
            };
            match self.read_entry(&id) {
                Ok(entry) => entries.push(entry),
                // Delivered and removed while the directory was being read.
                Err(SpoolError::NotFound(_)) => {}
                Err(e) => errors.push(e),
            }
        }
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((entries, errors))
    }

    /// Start-up cleanup: empties `tmp/`, converts messages queued by the earlier two-file
    /// layout, and removes state files whose message is gone (a removal cut short). Returns
    /// how many files were removed.
    pub fn recover(&self) -> Result<usize, SpoolError> {
        let mut removed = 0;
        let tmp = self.dir.join("tmp");
        for item in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let path = item.map_err(io_err(&tmp))?.path();
            if fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        removed += self.convert_two_file_layout()?;
        let state = self.dir.join("state");
        for item in fs::read_dir(&state).map_err(io_err(&state))? {
            let path = item.map_err(io_err(&state))?.path();
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(QueueId::parse);
            let orphan = id.is_none_or(|id| !self.message_path(&id).exists());
            if orphan && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Spool {
    /// Rewrites messages queued by the layout before the one-file spool (`entries/ID.json`
    /// beside `messages/ID.eml`) as one file each in `queued/`, so that upgrading loses no
    /// queued mail. Each new file is committed before the old pair is removed, and a pair
    /// whose new file exists already (a conversion cut short) is only removed. An entry that
    /// cannot be read is left in place and logged at every start. Returns how many leftover
    /// files of interrupted commits were removed.
    fn convert_two_file_layout(&self) -> Result<usize, SpoolError> {
        let entries = self.dir.join("entries");
        if !entries.is_dir() {
            return Ok(0);
        }
        let messages = self.dir.join("messages");
        for item in fs::read_dir(&entries).map_err(io_err(&entries))? {
            let path = item.map_err(io_err(&entries))?.path();
            let Some(id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(QueueId::parse)
            else {
                continue;
            };
            let old_message = messages.join(format!("{id}.eml"));
            let converted = if self.message_path(&id).exists() {
                Ok(())
            } else {
                self.convert_one(&path, &old_message)
            };
            match converted {
                Ok(()) => {
                    let _ = fs::remove_file(&old_message);
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    tracing::info!(queue_id = %id, "converted to the one-file spool");
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "queued message of the old layout not converted; left in entries/ and messages/"
                ),
            }
        }
        // A message file without its entry is an old commit that never completed.
        let mut removed = 0;
        if messages.is_dir() {
            for item in fs::read_dir(&messages).map_err(io_err(&messages))? {
                let path = item.map_err(io_err(&messages))?.path();
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                let orphan = path.extension().is_some_and(|e| e == "eml")
                    && !entries.join(format!("{stem}.json")).exists();
                if orphan && fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
            sync_dir(&messages)?;
        }
        sync_dir(&entries)?;
        // Both go once empty; kept with what could not be converted otherwise.
        let _ = fs::remove_dir(&entries);
        let _ = fs::remove_dir(&messages);
        Ok(removed)
    }

    /// Commits one message of the old layout from its entry and message files.
    fn convert_one(&self, entry_path: &Path, message_path: &Path) -> Result<(), SpoolError> {
        let json = fs::read(entry_path).map_err(io_err(entry_path))?;
        let entry: Entry = serde_json::from_slice(&json).map_err(|source| SpoolError::Corrupt {
            path: entry_path.to_owned(),
            source,
        })?;
        let bytes = fs::read(message_path).map_err(io_err(message_path))?;
        self.commit(&entry, &[&bytes])
    }
}

/// Creates (or truncates) a file for writing.
fn create(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path))
}

/// Opens a committed message file; a missing one is [`SpoolError::NotFound`].
fn open_message(path: &Path, id: &QueueId) -> Result<File, SpoolError> {
    File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => SpoolError::NotFound(id.to_string()),
        _ => io_err(path)(e),
    })
}

/// Reads and parses the envelope line at the start of a message file.
fn read_envelope(reader: &mut impl BufRead, path: &Path) -> Result<Entry, SpoolError> {
    let mut line = Vec::new();
    reader
        .take(MAX_ENVELOPE)
        .read_until(b'\n', &mut line)
        .map_err(io_err(path))?;
    serde_json::from_slice(&line).map_err(|source| SpoolError::Corrupt {
        path: path.to_owned(),
        source,
    })
}

/// Reads the message bytes that follow the envelope line; `size` (the file's) bounds them.
fn read_rest(mut reader: BufReader<File>, size: u64, path: &Path) -> Result<Vec<u8>, SpoolError> {
    let mut message = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    reader.read_to_end(&mut message).map_err(io_err(path))?;
    Ok(message)
}

/// Skips the envelope line at the start of a message file.
fn skip_line(reader: &mut impl BufRead, path: &Path) -> Result<(), SpoolError> {
    loop {
        let buffer = reader.fill_buf().map_err(io_err(path))?;
        if buffer.is_empty() {
            return Err(io_err(path)(io::ErrorKind::UnexpectedEof.into()));
        }
        match memchr::memchr(b'\n', buffer) {
            Some(end) => {
                reader.consume(end + 1);
                return Ok(());
            }
            None => {
                let all = buffer.len();
                reader.consume(all);
            }
        }
    }
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
    fn state_file_supersedes_the_envelope_line_until_removal() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut e = entry("ST1");
        e.last_error = Some("line one\nline two".into());
        spool.commit(&e, &[b"x\r\n"]).unwrap();
        let file = fs::read(dir.path().join("queued/ST1.msg")).unwrap();
        assert_eq!(
            file.iter().filter(|&&b| b == b'\n').count(),
            2,
            "the envelope is one line even when a field holds a newline"
        );
        assert_eq!(spool.read_entry(&e.id).unwrap(), e);
        e.attempts = 2;
        spool.write_entry(&e).unwrap();
        assert_eq!(spool.read_entry(&e.id).unwrap().attempts, 2);
        assert_eq!(spool.read_message(&e.id).unwrap(), b"x\r\n");
        spool.remove(&e.id).unwrap();
        assert!(!dir.path().join("state/ST1.json").exists());
        assert!(matches!(spool.remove(&e.id), Err(SpoolError::NotFound(_))));
    }

    #[test]
    fn load_reads_envelope_and_bytes_from_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut e = entry("LD1");
        spool
            .commit(&e, &[b"Subject: x\r\n", b"\r\nbody\r\n"])
            .unwrap();
        let (loaded, bytes) = spool.load(&e.id).unwrap();
        assert_eq!(loaded, e);
        assert_eq!(bytes.unwrap(), b"Subject: x\r\n\r\nbody\r\n");
        e.attempts = 7;
        spool.write_entry(&e).unwrap();
        assert_eq!(
            spool.load(&e.id).unwrap().0.attempts,
            7,
            "the state file wins"
        );
        // A first line that is no envelope.
        fs::write(dir.path().join("queued/LD2.msg"), b"{}").unwrap();
        assert!(matches!(
            spool.load(&QueueId::parse("LD2").unwrap()),
            Err(SpoolError::Corrupt { .. })
        ));
        spool.remove(&e.id).unwrap();
        assert!(matches!(spool.load(&e.id), Err(SpoolError::NotFound(_))));
    }

    #[test]
    fn recover_removes_garbage_but_keeps_committed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.commit(&entry("KEEP"), &[b"x\r\n"]).unwrap();
        spool.write_entry(&entry("KEEP")).unwrap();
        // A crash mid-write, and one between the two unlinks of a removal.
        fs::write(dir.path().join("tmp/NEW.msg"), b"partial").unwrap();
        fs::write(dir.path().join("state/GONE.json"), b"{}").unwrap();
        assert_eq!(spool.recover().unwrap(), 2);
        let (entries, errors) = spool.entries().unwrap();
        assert_eq!(entries.len(), 1);
        assert!(errors.is_empty());
        assert!(dir.path().join("state/KEEP.json").exists());
        assert!(spool.read_message(&QueueId::parse("KEEP").unwrap()).is_ok());
    }

    #[test]
    fn messages_of_the_two_file_layout_are_converted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let old = entry("OLD1");
        fs::create_dir_all(dir.path().join("entries")).unwrap();
        fs::create_dir_all(dir.path().join("messages")).unwrap();
        fs::write(
            dir.path().join("entries/OLD1.json"),
            serde_json::to_vec_pretty(&old).unwrap(),
        )
        .unwrap();
        fs::write(
            dir.path().join("messages/OLD1.eml"),
            b"Subject: old\r\n\r\nx\r\n",
        )
        .unwrap();
        fs::write(dir.path().join("messages/HALF.eml"), b"never committed").unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(
            spool.recover().unwrap(),
            1,
            "the uncommitted old message file"
        );
        assert_eq!(spool.entries().unwrap().0, vec![old.clone()]);
        assert_eq!(
            spool.read_message(&old.id).unwrap(),
            b"Subject: old\r\n\r\nx\r\n"
        );
        assert!(!dir.path().join("entries").exists());
        assert!(!dir.path().join("messages").exists());
        assert_eq!(spool.recover().unwrap(), 0, "nothing more to do");
    }

    #[test]
    fn a_conversion_cut_short_is_finished_without_duplicating() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut e = entry("CUT1");
        spool.commit(&e, &[b"new\r\n"]).unwrap();
        e.attempts = 4;
        spool.write_entry(&e).unwrap();
        // The crash came after the new file, before the old pair was removed (here with only
        // the entry left), and the server has since recorded an attempt.
        fs::create_dir_all(dir.path().join("entries")).unwrap();
        fs::write(
            dir.path().join("entries/CUT1.json"),
            serde_json::to_vec(&entry("CUT1")).unwrap(),
        )
        .unwrap();
        spool.recover().unwrap();
        assert_eq!(
            spool.read_entry(&e.id).unwrap().attempts,
            4,
            "not converted again"
        );
        assert_eq!(spool.read_message(&e.id).unwrap(), b"new\r\n");
        assert!(!dir.path().join("entries").exists());
    }

    #[test]
    fn the_old_layout_never_sees_the_new_files() {
        // The earlier version deletes `messages/*` without an entry at start; going back to it
        // must not find today's queue there.
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.commit(&entry("NEW1"), &[b"x\r\n"]).unwrap();
        assert!(!dir.path().join("messages").exists());
        assert!(dir.path().join("queued/NEW1.msg").exists());
    }

    #[test]
    fn a_corrupt_envelope_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool.commit(&entry("GOOD"), &[b"x\r\n"]).unwrap();
        fs::write(dir.path().join("queued/BAD.msg"), b"not json\nbody").unwrap();
        let (entries, errors) = spool.entries().unwrap();
        assert_eq!(entries.len(), 1);
        assert!(matches!(errors.as_slice(), [SpoolError::Corrupt { .. }]));
    }
}
