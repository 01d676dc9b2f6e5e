//! Submission trace records: who sent which queued message, from where.
//!
//! The recipient of a message never sees the client's address; an abuse desk holding the
//! message quotes the queue id from our Received header, and `submitd trace ID` finds it here.

use std::time::SystemTime;

use serde::Serialize;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use super::{Store, StoreError};
use crate::message::unix_seconds;

/// One submission as remembered for abuse handling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceRecord {
    pub queue_id: String,
    pub user: String,
    pub client_ip: String,
    pub ehlo: String,
    pub tls_version: String,
    pub received_at: i64,
    pub sender: String,
    pub recipients: Vec<String>,
    /// Final outcome per recipient, filled in by delivery (`delivered`, `failed: ...`).
    pub outcome: std::collections::BTreeMap<String, String>,
}

/// One recipient's final outcome, as delivery reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub queue_id: String,
    pub recipient: String,
    /// `delivered`, or `failed: <reply>`.
    pub outcome: String,
}

/// Columns bound per row by [`Store::insert_traces`].
const TRACE_COLUMNS: usize = 9;

/// `($1, $2, ...), ($n, ...)`: placeholders for `rows` rows of `columns` values. Built by
/// hand because sqlx's `QueryBuilder` emits `?` for the `Any` driver, which PostgreSQL
/// rejects.
fn value_rows(rows: usize, columns: usize) -> String {
    let mut sql = String::new();
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", row * columns + column + 1));
        }
        sql.push(')');
    }
    sql
}

impl Store {
    /// Records a submission at the moment it is queued.
    pub async fn insert_trace(&self, record: &TraceRecord) -> Result<(), StoreError> {
        self.insert_traces(std::slice::from_ref(record)).await
    }

    /// Records several submissions in one statement (see [`TraceWriter`]).
    pub async fn insert_traces(&self, records: &[TraceRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO submissions (queue_id, user_email, client_ip, ehlo, tls_version, \
             received_at, sender, recipients, outcome) VALUES {}",
            value_rows(records.len(), TRACE_COLUMNS)
        );
        let mut query = sqlx::query(&sql);
        for record in records {
            query = query
                .bind(&record.queue_id)
                .bind(&record.user)
                .bind(&record.client_ip)
                .bind(&record.ehlo)
                .bind(&record.tls_version)
                .bind(record.received_at)
                .bind(&record.sender)
                .bind(serde_json::to_string(&record.recipients).unwrap_or_default())
                .bind(serde_json::to_string(&record.outcome).unwrap_or_default());
        }
        query.execute(self.pool()).await?;
        Ok(())
    }

    /// Records the final outcome of one recipient.
    pub async fn record_outcome(
        &self,
        queue_id: &str,
        recipient: &str,
        outcome: &str,
    ) -> Result<(), StoreError> {
        self.record_outcomes(&[Outcome {
            queue_id: queue_id.to_owned(),
            recipient: recipient.to_owned(),
            outcome: outcome.to_owned(),
        }])
        .await
    }

    /// Records several outcomes in one statement; a later outcome for the same recipient
    /// replaces an earlier one.
    pub async fn record_outcomes(&self, outcomes: &[Outcome]) -> Result<(), StoreError> {
        // One row per key: PostgreSQL refuses to update the same row twice in one statement.
        let mut latest = std::collections::BTreeMap::new();
        for o in outcomes {
            latest.insert(
                (o.queue_id.as_str(), o.recipient.as_str()),
                o.outcome.as_str(),
            );
        }
        if latest.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO submission_outcomes (queue_id, recipient, outcome) VALUES {} \
             ON CONFLICT (queue_id, recipient) DO UPDATE SET outcome = excluded.outcome",
            value_rows(latest.len(), 3)
        );
        let mut query = sqlx::query(&sql);
        for ((queue_id, recipient), outcome) in latest {
            query = query.bind(queue_id).bind(recipient).bind(outcome);
        }
        query.execute(self.pool()).await?;
        Ok(())
    }

    /// Finds the record of one queue id.
    pub async fn find_trace(&self, queue_id: &str) -> Result<Option<TraceRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT queue_id, user_email, client_ip, ehlo, tls_version, received_at, sender, \
             recipients, outcome FROM submissions WHERE queue_id = $1",
        )
        .bind(queue_id)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let recipients: String = row.try_get(7)?;
        let legacy_outcome: String = row.try_get(8)?;
        let mut outcome: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&legacy_outcome).unwrap_or_default();
        let rows =
            sqlx::query("SELECT recipient, outcome FROM submission_outcomes WHERE queue_id = $1")
                .bind(queue_id)
                .fetch_all(self.pool())
                .await?;
        for r in rows {
            outcome.insert(r.try_get(0)?, r.try_get(1)?);
        }
        Ok(Some(TraceRecord {
            queue_id: row.try_get(0)?,
            user: row.try_get(1)?,
            client_ip: row.try_get(2)?,
            ehlo: row.try_get(3)?,
            tls_version: row.try_get(4)?,
            received_at: row.try_get(5)?,
            sender: row.try_get(6)?,
            recipients: serde_json::from_str(&recipients).unwrap_or_default(),
            outcome,
        }))
    }

    /// Deletes records (and their outcomes) older than `retention`; returns how many went.
    pub async fn prune_traces(
        &self,
        retention: std::time::Duration,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        let cutoff = unix_seconds(now) - i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        let done = sqlx::query("DELETE FROM submissions WHERE received_at < $1")
            .bind(cutoff)
            .execute(self.pool())
            .await?;
        // Outcomes whose submission is gone: pruned just now, or never recorded. A record is
        // written before its message is queued, so no live outcome is without one.
        sqlx::query(
            "DELETE FROM submission_outcomes WHERE NOT EXISTS \
             (SELECT 1 FROM submissions s WHERE s.queue_id = submission_outcomes.queue_id)",
        )
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }
}

/// Most requests written in one statement.
const MAX_BATCH: usize = 64;

/// A submission's record and the session waiting for it to be written.
type Pending = (TraceRecord, oneshot::Sender<Result<(), String>>);

/// A request to one of the trace writer's two loops; `None` asks it to stop.
type Request<T> = Option<T>;

/// Writes trace records and outcomes in batches: whatever arrived while the previous
/// statement ran goes into the next one, so concurrent sessions share one round trip to the
/// database (on SQLite, one write transaction) instead of queueing for the writer lock one by
/// one. A submission's record is still written before its `250`. Records and outcomes have
/// loops of their own, so a slow outcome write never holds up a session's answer.
#[derive(Debug, Clone)]
pub struct TraceWriter {
    submissions: mpsc::UnboundedSender<Request<Pending>>,
    outcomes: mpsc::UnboundedSender<Request<Outcome>>,
}

impl TraceWriter {
    /// Starts the writer task; it ends after [`TraceWriter::stop`] (or when every
    /// `TraceWriter` is gone), once the requests sent before have been written.
    pub fn start(store: Store) -> (Self, tokio::task::JoinHandle<()>) {
        let (submissions, submission_queue) = mpsc::unbounded_channel();
        let (outcomes, outcome_queue) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            tokio::join!(
                write_submissions(&store, submission_queue),
                write_outcomes(&store, outcome_queue)
            );
        });
        (
            Self {
                submissions,
                outcomes,
            },
            task,
        )
    }

    /// Records a submission; returns once it is written.
    pub async fn insert(&self, record: TraceRecord) -> Result<(), StoreError> {
        let (done, result) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the trace writer has stopped".into());
        self.submissions
            .send(Some((record, done)))
            .map_err(|_| stopped())?;
        result
            .await
            .map_err(|_| stopped())?
            .map_err(StoreError::Unavailable)
    }

    /// Asks the writer to finish: what was sent before is written; what comes later is
    /// refused, at the latest once the batch in hand is done.
    pub fn stop(&self) {
        let _ = self.submissions.send(None);
        let _ = self.outcomes.send(None);
    }

    /// Records a recipient's final outcome, in the background.
    pub fn outcome(&self, outcome: Outcome) {
        if self.outcomes.send(Some(outcome)).is_err() {
            tracing::warn!("trace writer stopped; delivery outcome not recorded");
        }
    }
}

/// Takes the next batch: `None` once stopped or every sender is gone.
async fn next_batch<T>(queue: &mut mpsc::UnboundedReceiver<Request<T>>) -> Option<(Vec<T>, bool)> {
    let mut requests = Vec::with_capacity(MAX_BATCH);
    if queue.recv_many(&mut requests, MAX_BATCH).await == 0 {
        return None;
    }
    let stop = requests.iter().any(Option::is_none);
    Some((requests.into_iter().flatten().collect(), stop))
}

async fn write_submissions(store: &Store, mut queue: mpsc::UnboundedReceiver<Request<Pending>>) {
    while let Some((batch, stop)) = next_batch(&mut queue).await {
        let (records, waiting): (Vec<TraceRecord>, Vec<_>) = batch.into_iter().unzip();
        let mut results = vec![store
            .insert_traces(&records)
            .await
            .map_err(|e| e.to_string())];
        if results[0].is_err() && records.len() > 1 {
            // One bad record must not fail every session of the batch: try each alone.
            results.clear();
            for record in &records {
                let result = store.insert_trace(record).await;
                results.push(result.map_err(|e| e.to_string()));
            }
        }
        for (n, done) in waiting.into_iter().enumerate() {
            let result = results.get(n).unwrap_or(&results[0]).clone();
            let _ = done.send(result);
        }
        if stop {
            return;
        }
    }
}

async fn write_outcomes(store: &Store, mut queue: mpsc::UnboundedReceiver<Request<Outcome>>) {
    while let Some((outcomes, stop)) = next_batch(&mut queue).await {
        if let Err(e) = store.record_outcomes(&outcomes).await {
            tracing::warn!(error = %e, count = outcomes.len(), "cannot record delivery outcomes");
        }
        if stop {
            return;
        }
    }
}
