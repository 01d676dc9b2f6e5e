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
        sqlx::query(
            "DELETE FROM submission_outcomes WHERE queue_id IN \
             (SELECT queue_id FROM submissions WHERE received_at < $1)",
        )
        .bind(cutoff)
        .execute(self.pool())
        .await?;
        let done = sqlx::query("DELETE FROM submissions WHERE received_at < $1")
            .bind(cutoff)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }
}

/// Most requests written in one statement.
const MAX_BATCH: usize = 64;

/// A request to the trace writer.
enum Write {
    /// A submission; its sender waits for the result before answering `250`.
    Submission(TraceRecord, oneshot::Sender<Result<(), String>>),
    /// A final outcome; nobody waits for it.
    Outcome(Outcome),
    /// Write what came before, then stop.
    Stop,
}

/// Writes trace records and outcomes in batches: whatever arrived while the previous
/// statement ran goes into the next one, so concurrent sessions share one round trip to the
/// database (on SQLite, one write transaction) instead of queueing for the writer lock one by
/// one. A submission's record is still written before its `250`.
#[derive(Debug, Clone)]
pub struct TraceWriter {
    requests: mpsc::UnboundedSender<Write>,
}

impl TraceWriter {
    /// Starts the writer task; it ends after [`TraceWriter::stop`] (or when every
    /// `TraceWriter` is gone), once the requests sent before have been written.
    pub fn start(store: Store) -> (Self, tokio::task::JoinHandle<()>) {
        let (requests, queue) = mpsc::unbounded_channel();
        (Self { requests }, tokio::spawn(write_batches(store, queue)))
    }

    /// Records a submission; returns once it is written.
    pub async fn insert(&self, record: TraceRecord) -> Result<(), StoreError> {
        let (done, result) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the trace writer has stopped".into());
        self.requests
            .send(Write::Submission(record, done))
            .map_err(|_| stopped())?;
        result
            .await
            .map_err(|_| stopped())?
            .map_err(StoreError::Unavailable)
    }

    /// Asks the writer to finish: requests sent before are written, later ones refused.
    pub fn stop(&self) {
        let _ = self.requests.send(Write::Stop);
    }

    /// Records a recipient's final outcome, in the background.
    pub fn outcome(&self, outcome: Outcome) {
        if self.requests.send(Write::Outcome(outcome)).is_err() {
            tracing::warn!("trace writer stopped; delivery outcome not recorded");
        }
    }
}

async fn write_batches(store: Store, mut queue: mpsc::UnboundedReceiver<Write>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stopping = false;
    while !stopping && queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut records = Vec::new();
        let mut waiting = Vec::new();
        let mut outcomes = Vec::new();
        for write in batch.drain(..) {
            match write {
                Write::Submission(record, done) => {
                    records.push(record);
                    waiting.push(done);
                }
                Write::Outcome(o) => outcomes.push(o),
                Write::Stop => stopping = true,
            }
        }
        if !records.is_empty() {
            let result = store
                .insert_traces(&records)
                .await
                .map_err(|e| e.to_string());
            for done in waiting {
                let _ = done.send(result.clone());
            }
        }
        if let Err(e) = store.record_outcomes(&outcomes).await {
            tracing::warn!(error = %e, count = outcomes.len(), "cannot record delivery outcomes");
        }
    }
}
