//! Users and the sender addresses they may use.

use std::time::SystemTime;

use sqlx::Row;

use super::{Store, StoreError};
use crate::config::ReceivedPolicy;
use crate::message::unix_seconds;

/// One row of the users table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: i64,
    pub email: String,
    /// argon2id PHC string.
    pub password_hash: String,
    pub disabled: bool,
    pub received: Option<ReceivedPolicy>,
    /// Seconds since the epoch of the last change (password, state); caches key on it.
    pub updated_at: i64,
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl Store {
    /// Adds a user; `email` must already be normalised.
    pub async fn add_user(&self, email: &str, password_hash: &str) -> Result<i64, StoreError> {
        let now = unix_seconds(SystemTime::now());
        let row = sqlx::query(
            "INSERT INTO users (email, password_hash, disabled, created_at, updated_at) \
             VALUES ($1, $2, 0, $3, $3) RETURNING id",
        )
        .bind(email)
        .bind(password_hash)
        .bind(now)
        .fetch_one(self.pool())
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::DuplicateUser(email.to_owned())
            } else {
                e.into()
            }
        })?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// Looks a user up by normalised email.
    pub async fn find_user(&self, email: &str) -> Result<Option<UserRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, email, password_hash, disabled, received_policy, updated_at \
             FROM users WHERE email = $1",
        )
        .bind(email)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| user_from_row(&r)).transpose()
    }

    /// All users, ordered by email.
    pub async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, email, password_hash, disabled, received_policy, updated_at \
             FROM users ORDER BY email",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(user_from_row).collect()
    }

    /// Replaces a user's password hash.
    pub async fn set_password(&self, email: &str, password_hash: &str) -> Result<(), StoreError> {
        self.update_user(
            email,
            "UPDATE users SET password_hash = $1, updated_at = $2 WHERE email = $3",
            password_hash.to_owned(),
        )
        .await
    }

    /// Disables or enables a user.
    pub async fn set_disabled(&self, email: &str, disabled: bool) -> Result<(), StoreError> {
        let now = unix_seconds(SystemTime::now());
        let done = sqlx::query("UPDATE users SET disabled = $1, updated_at = $2 WHERE email = $3")
            .bind(i64::from(disabled))
            .bind(now)
            .bind(email)
            .execute(self.pool())
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownUser(email.to_owned()));
        }
        Ok(())
    }

    /// Sets or clears a user's Received-header policy override.
    pub async fn set_received_policy(
        &self,
        email: &str,
        policy: Option<ReceivedPolicy>,
    ) -> Result<(), StoreError> {
        let now = unix_seconds(SystemTime::now());
        let done =
            sqlx::query("UPDATE users SET received_policy = $1, updated_at = $2 WHERE email = $3")
                .bind(policy.map(|p| p.as_str().to_owned()))
                .bind(now)
                .bind(email)
                .execute(self.pool())
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownUser(email.to_owned()));
        }
        Ok(())
    }

    async fn update_user(&self, email: &str, sql: &str, value: String) -> Result<(), StoreError> {
        let now = unix_seconds(SystemTime::now());
        let done = sqlx::query(sql)
            .bind(value)
            .bind(now)
            .bind(email)
            .execute(self.pool())
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UnknownUser(email.to_owned()));
        }
        Ok(())
    }

    /// Deletes a user and their allowed addresses.
    pub async fn delete_user(&self, email: &str) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        let id = user_id(&mut tx, email).await?;
        sqlx::query("DELETE FROM allowed_senders WHERE user_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Lets a user send as `address` (`local@domain`, or `@domain` for a whole domain).
    pub async fn allow_sender(&self, email: &str, address: &str) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        let id = user_id(&mut tx, email).await?;
        let result = sqlx::query("INSERT INTO allowed_senders (user_id, address) VALUES ($1, $2)")
            .bind(id)
            .bind(address)
            .execute(&mut *tx)
            .await;
        match result {
            Ok(_) => {}
            // Allowing twice is not an error.
            Err(e) if is_unique_violation(&e) => {}
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        Ok(())
    }

    /// Withdraws an address given with [`Store::allow_sender`]; true if it was there.
    pub async fn deny_sender(&self, email: &str, address: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        let id = user_id(&mut tx, email).await?;
        let done = sqlx::query("DELETE FROM allowed_senders WHERE user_id = $1 AND address = $2")
            .bind(id)
            .bind(address)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// The extra addresses a user may send as.
    pub async fn allowed_senders(&self, user_id: i64) -> Result<Vec<String>, StoreError> {
        let rows =
            sqlx::query("SELECT address FROM allowed_senders WHERE user_id = $1 ORDER BY address")
                .bind(user_id)
                .fetch_all(self.pool())
                .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
            .collect()
    }
}

async fn user_id(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    email: &str,
) -> Result<i64, StoreError> {
    let row = sqlx::query("SELECT id FROM users WHERE email = $1")
        .bind(email)
        .fetch_optional(&mut **tx)
        .await?;
    match row {
        Some(r) => Ok(r.try_get::<i64, _>(0)?),
        None => Err(StoreError::UnknownUser(email.to_owned())),
    }
}

fn user_from_row(row: &sqlx::any::AnyRow) -> Result<UserRecord, StoreError> {
    let policy: Option<String> = row.try_get(4)?;
    Ok(UserRecord {
        id: row.try_get(0)?,
        email: row.try_get(1)?,
        password_hash: row.try_get(2)?,
        disabled: row.try_get::<i64, _>(3)? != 0,
        received: policy.as_deref().and_then(ReceivedPolicy::parse),
        updated_at: row.try_get(5)?,
    })
}
