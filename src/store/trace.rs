//! Submission trace records: who sent which queued message, from where.
//!
//! The recipient of a message never sees the client's address; an abuse desk holding the
//! message quotes the queue id from our Received header, and `submitd trace ID` finds it here.

use std::time::SystemTime;

use serde::Serialize;
use sqlx::Row;

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

impl Store {
    /// Records a submission at the moment it is queued.
    pub async fn insert_trace(&self, record: &TraceRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO submissions (queue_id, user_email, client_ip, ehlo, tls_version, \
             received_at, sender, recipients, outcome) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&record.queue_id)
        .bind(&record.user)
        .bind(&record.client_ip)
        .bind(&record.ehlo)
        .bind(&record.tls_version)
        .bind(record.received_at)
        .bind(&record.sender)
        .bind(serde_json::to_string(&record.recipients).unwrap_or_default())
        .bind(serde_json::to_string(&record.outcome).unwrap_or_default())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records the final outcome of one recipient.
    pub async fn record_outcome(
        &self,
        queue_id: &str,
        recipient: &str,
        outcome: &str,
    ) -> Result<(), StoreError> {
        let Some(mut record) = self.find_trace(queue_id).await? else {
            return Ok(());
        };
        record
            .outcome
            .insert(recipient.to_owned(), outcome.to_owned());
        sqlx::query("UPDATE submissions SET outcome = $1 WHERE queue_id = $2")
            .bind(serde_json::to_string(&record.outcome).unwrap_or_default())
            .bind(queue_id)
            .execute(self.pool())
            .await?;
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
        let outcome: String = row.try_get(8)?;
        Ok(Some(TraceRecord {
            queue_id: row.try_get(0)?,
            user: row.try_get(1)?,
            client_ip: row.try_get(2)?,
            ehlo: row.try_get(3)?,
            tls_version: row.try_get(4)?,
            received_at: row.try_get(5)?,
            sender: row.try_get(6)?,
            recipients: serde_json::from_str(&recipients).unwrap_or_default(),
            outcome: serde_json::from_str(&outcome).unwrap_or_default(),
        }))
    }

    /// Deletes records older than `retention`; returns how many went.
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
        Ok(done.rows_affected())
    }
}
