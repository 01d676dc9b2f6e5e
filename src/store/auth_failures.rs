//! Failed logins, counted in the database so that every node sharing it throttles alike.

use sqlx::Row;

use super::{Store, StoreError};

/// Recent failures against one account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureCounts {
    /// From the client address asking now.
    pub from_ip: i64,
    /// From anywhere.
    pub total: i64,
}

impl Store {
    /// Records a failed login of `account` from `client_ip` at `now` (seconds).
    pub async fn record_auth_failure(
        &self,
        account: &str,
        client_ip: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO auth_failures (account, client_ip, failed_at) VALUES ($1, $2, $3)",
        )
        .bind(account)
        .bind(client_ip)
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Failures of `account` since `since` (seconds), from `client_ip` and in total.
    pub async fn auth_failure_counts(
        &self,
        account: &str,
        client_ip: &str,
        since: i64,
    ) -> Result<FailureCounts, StoreError> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(CASE WHEN client_ip = $2 THEN 1 ELSE 0 END), 0), COUNT(*) \
             FROM auth_failures WHERE account = $1 AND failed_at >= $3",
        )
        .bind(account)
        .bind(client_ip)
        .bind(since)
        .fetch_one(self.pool())
        .await?;
        Ok(FailureCounts {
            from_ip: row.try_get(0)?,
            total: row.try_get(1)?,
        })
    }

    /// A successful login forgets that account's failures from that address.
    pub async fn clear_auth_failures(
        &self,
        account: &str,
        client_ip: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM auth_failures WHERE account = $1 AND client_ip = $2")
            .bind(account)
            .bind(client_ip)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Deletes failures older than `before` (seconds); returns how many went.
    pub async fn prune_auth_failures(&self, before: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM auth_failures WHERE failed_at < $1")
            .bind(before)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }
}
