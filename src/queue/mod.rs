//! The durable queue: the spool on disk plus an in-memory schedule of when each message is
//! due. Delivery workers wait on the schedule (a timer to the earliest due message, woken
//! early by new mail), so nothing polls message files in a loop.

pub mod schedule;
pub mod spool;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::message::{unix_seconds, Assembled, QueueId};
pub use schedule::RetryPolicy;
pub use spool::{Entry, Recipient, RecipientStatus, Spool, SpoolError};

/// When each message is due, and which are being attempted right now. Each id is in at
/// most one of `due` (with its time in `at`) and `busy`.
#[derive(Debug, Default)]
struct Schedule {
    due: BTreeSet<(i64, QueueId)>,
    at: HashMap<QueueId, i64>,
    busy: HashSet<QueueId>,
}

impl Schedule {
    /// Schedules `id` at `when`, replacing an earlier time; ignored while it is being tried.
    fn put(&mut self, when: i64, id: QueueId) {
        if self.busy.contains(&id) {
            return;
        }
        if let Some(old) = self.at.insert(id.clone(), when) {
            self.due.remove(&(old, id.clone()));
        }
        self.due.insert((when, id));
    }

    /// Takes the earliest entry off the schedule.
    fn pop_first(&mut self) -> Option<(i64, QueueId)> {
        let first = self.due.pop_first()?;
        self.at.remove(&first.1);
        Some(first)
    }
}

/// One message waiting for the spool writer.
struct Commit {
    entry: Entry,
    message: Assembled,
    done: tokio::sync::oneshot::Sender<Result<Entry, SpoolError>>,
}

/// Most messages committed in one batch.
const MAX_BATCH: usize = 64;

/// The spool writer: a thread that commits whatever messages are waiting, as one batch, so
/// concurrent submissions share directory fsyncs instead of contending for the directories.
fn spool_writer(spool: Spool, queue: std::sync::mpsc::Receiver<Commit>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let items: Vec<(&Entry, Vec<&[u8]>)> = batch
            .iter()
            .map(|c| (&c.entry, c.message.slices()))
            .collect();
        let results = spool.commit_batch(&items);
        drop(items);
        for (commit, result) in batch.into_iter().zip(results) {
            let _ = commit.done.send(result.map(|()| commit.entry));
        }
    }
}

/// The queue shared by the submission pipeline, the delivery workers and the CLI rescan.
pub struct Queue {
    spool: Spool,
    /// New messages go to the spool writer thread; it stops when the queue is dropped.
    writer: std::sync::mpsc::Sender<Commit>,
    retry: RetryPolicy,
    schedule: Mutex<Schedule>,
    wake: Notify,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("spool", &self.spool)
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// Opens the spool, cleans up after a crash and schedules every committed message.
    pub fn open(dir: &Path, retry: RetryPolicy) -> Result<Arc<Self>, SpoolError> {
        let spool = Spool::open(dir)?;
        let removed = spool.recover()?;
        if removed > 0 {
            tracing::info!(removed, "removed incomplete files from the spool");
        }
        let (writer, commits) = std::sync::mpsc::channel();
        let writer_spool = spool.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || spool_writer(writer_spool, commits))
            .map_err(|source| SpoolError::Io {
                path: dir.to_owned(),
                source,
            })?;
        let queue = Arc::new(Self {
            spool,
            writer,
            retry,
            schedule: Mutex::new(Schedule::default()),
            wake: Notify::new(),
        });
        queue.rescan()?;
        Ok(queue)
    }

    /// The spool underneath.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// The retry settings.
    pub fn retry(&self) -> RetryPolicy {
        self.retry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuilds the schedule from the entries on disk (at start, and when `queue retry` asks).
    pub fn rescan(&self) -> Result<usize, SpoolError> {
        let (entries, errors) = self.spool.entries()?;
        for e in errors {
            tracing::error!(error = %e, "unreadable queue entry left in place");
        }
        // Merged into the schedule, not replacing it: a message queued while the directory
        // was being read is not in this snapshot and must stay scheduled.
        let mut schedule = self.lock();
        for e in &entries {
            schedule.put(e.next_attempt, e.id.clone());
        }
        let count = entries.len();
        drop(schedule);
        self.wake.notify_waiters();
        Ok(count)
    }

    /// Commits a new message durably, then schedules it. Only after this returns may the
    /// client be told `250`. Messages submitted at the same time are committed together by
    /// the spool writer (group commit); none is acknowledged before its own files and their
    /// directory entries are on stable storage.
    pub async fn enqueue(&self, entry: Entry, message: Assembled) -> Result<(), SpoolError> {
        let (done, result) = tokio::sync::oneshot::channel();
        let writer_gone = || SpoolError::Io {
            path: "spool writer".into(),
            source: std::io::Error::other("the spool writer has stopped"),
        };
        self.writer
            .send(Commit {
                entry,
                message,
                done,
            })
            .map_err(|_| writer_gone())?;
        let entry = result.await.map_err(|_| writer_gone())??;
        self.lock()
            .due
            .insert((entry.next_attempt, entry.id.clone()));
        self.wake.notify_one();
        Ok(())
    }

    /// Waits for the next due message and claims it (until [`Queue::finish`] or
    /// [`Queue::release`]); `None` once `stop` is cancelled.
    pub async fn next_due(&self, stop: &CancellationToken) -> Option<QueueId> {
        loop {
            let wait = {
                let mut schedule = self.lock();
                let now = unix_seconds(SystemTime::now());
                match schedule.due.first().cloned() {
                    Some((at, _)) if at <= now => {
                        let Some((_, id)) = schedule.pop_first() else {
                            continue;
                        };
                        schedule.busy.insert(id.clone());
                        return Some(id);
                    }
                    Some((at, _)) => Duration::from_secs(u64::try_from(at - now).unwrap_or(1)),
                    None => Duration::from_secs(3600),
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Reads a claimed message for its attempt, off the reactor (see [`Spool::load`]).
    pub async fn load(
        &self,
        id: &QueueId,
    ) -> Result<(Entry, Result<Vec<u8>, SpoolError>), SpoolError> {
        let spool = self.spool.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || spool.load(&id))
            .await
            .map_err(|e| SpoolError::Io {
                path: "spool reader".into(),
                source: std::io::Error::other(e),
            })?
    }

    /// Gives up a claimed message without an attempt: deleted since it was scheduled, or
    /// unreadable (left in the spool for the operator; a rescan schedules it again).
    pub fn release(&self, id: &QueueId) {
        self.lock().busy.remove(id);
    }

    /// Stores the outcome of an attempt: removes a finished message, or writes its entry and
    /// schedules the next attempt. A message deleted (`queue delete`) during the attempt
    /// stays deleted.
    pub async fn finish(&self, entry: Entry) -> Result<(), SpoolError> {
        let spool = self.spool.clone();
        let id = entry.id.clone();
        let next = entry.next_attempt;
        let done = entry.is_done();
        let result = tokio::task::spawn_blocking(move || spool.settle(&entry, done))
            .await
            .map_err(|e| SpoolError::Io {
                path: "spool writer".into(),
                source: std::io::Error::other(e),
            })?;
        let deleted = matches!(result, Ok(false));
        if deleted {
            tracing::info!(queue_id = %id, "message was deleted from the queue during its attempt");
        }
        let mut schedule = self.lock();
        schedule.busy.remove(&id);
        if !done && !deleted {
            schedule.put(next, id);
        }
        drop(schedule);
        self.wake.notify_one();
        result.map(|_| ())
    }

    /// Messages in the queue, and the receive time (seconds) of the oldest. Queue ids start
    /// with their creation time, so the oldest message is the smallest id.
    pub fn stats(&self) -> (usize, Option<i64>) {
        let schedule = self.lock();
        let oldest = schedule
            .due
            .iter()
            .map(|(_, id)| id)
            .chain(schedule.busy.iter())
            .min()
            .and_then(QueueId::created_millis);
        (
            schedule.due.len() + schedule.busy.len(),
            oldest.map(|ms| ms / 1000),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> QueueId {
        QueueId::parse(s).unwrap()
    }

    #[test]
    fn schedule_keeps_one_time_per_message_and_skips_busy_ones() {
        let mut s = Schedule::default();
        s.put(50, id("A"));
        s.put(10, id("A"));
        s.put(20, id("B"));
        assert_eq!(s.due.len(), 2, "A once, at its latest time");
        assert_eq!(s.pop_first(), Some((10, id("A"))));
        s.busy.insert(id("A"));
        s.put(5, id("A"));
        assert_eq!(
            s.pop_first(),
            Some((20, id("B"))),
            "a busy message is not scheduled again"
        );
        assert_eq!(s.pop_first(), None);
        assert!(s.at.is_empty());
    }
}
