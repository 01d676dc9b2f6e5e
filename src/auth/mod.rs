//! Authentication: SASL decoding, password verification against the store, throttling.
//!
//! Verifying an argon2id hash costs tens of milliseconds and about 19 MiB by design, so it
//! runs on the blocking pool behind a semaphore: a flood of AUTH commands queues up instead of
//! exhausting memory or stalling the reactor.

pub mod argon;
pub mod cache;
pub mod sasl;
pub mod throttle;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::Argon2;
use tokio::sync::Semaphore;

use crate::message::{unix_seconds, Address, Identity};
use crate::store::Store;
use argon::BlockPool;
use cache::VerifiedCache;
use sasl::Credentials;
use throttle::{Slowdown, ThrottleSettings};

/// Why a login did not succeed, as far as the client may know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// Unknown user, wrong password or disabled account: one answer for all three.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// Too many recent failures for this account.
    #[error("throttled")]
    Throttled,
    /// The store could not be asked; the client should retry.
    #[error("store unavailable")]
    Unavailable,
}

/// Hashes a password as argon2id with the crate's default cost, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// The normalised form of a login: an address with its domain lowercased.
pub fn normalize_login(login: &str) -> Option<String> {
    Address::parse(login).ok().map(|a| a.to_string())
}

/// Checks credentials for the sessions of one node.
#[derive(Debug)]
pub struct Authenticator {
    store: Store,
    throttle: ThrottleSettings,
    slowdown: Slowdown,
    cache: VerifiedCache,
    verifications: Semaphore,
    /// argon2 working memory, one buffer per concurrent verification.
    blocks: BlockPool,
    failure_delay: Duration,
    /// Verified against for unknown users, so that their answer takes as long as a real one.
    decoy_hash: String,
}

impl Authenticator {
    /// An authenticator over `store`.
    pub fn new(store: Store, settings: &crate::config::AuthConfig) -> Arc<Self> {
        Arc::new(Self {
            store,
            throttle: ThrottleSettings {
                max_failures_per_ip: settings.max_failures_per_ip,
                max_failures_per_account: settings.max_failures_per_account,
                lockout: settings.lockout,
            },
            slowdown: Slowdown::new(settings.lockout),
            cache: VerifiedCache::new(settings.cache_ttl),
            verifications: Semaphore::new(settings.verify_concurrency),
            blocks: BlockPool::default(),
            failure_delay: settings.failure_delay,
            decoy_hash: hash_password("decoy password for unknown users").unwrap_or_default(),
        })
    }

    /// Checks a login and password from `ip`; on success returns who the user is.
    pub async fn authenticate(
        &self,
        credentials: &Credentials,
        ip: IpAddr,
    ) -> Result<Identity, AuthFailure> {
        let Some(login) = normalize_login(credentials.login()) else {
            return self.fail(credentials.login(), ip, None).await;
        };
        let now = unix_seconds(SystemTime::now());
        let window = i64::try_from(self.throttle.lockout.as_secs()).unwrap_or(i64::MAX);
        let counts = self
            .store
            .auth_failure_counts(&login, &ip.to_string(), now.saturating_sub(window))
            .await
            .map_err(unavailable)?;
        if self.throttle.is_locked(counts) {
            tracing::warn!(%ip, user = %login, "authentication throttled");
            return Err(AuthFailure::Throttled);
        }
        let user = self.store.find_user(&login).await.map_err(unavailable)?;
        let password = credentials.password();
        let cached = user.as_ref().is_some_and(|u| {
            !u.disabled
                && self
                    .cache
                    .matches(u.id, &u.password_hash, password, Instant::now())
        });
        let verified = cached || {
            let hash = user
                .as_ref()
                .map_or(self.decoy_hash.clone(), |u| u.password_hash.clone());
            self.verify(password.to_owned(), hash).await?
        };
        let Some(user) = user.filter(|u| verified && !u.disabled) else {
            return self.fail(&login, ip, Some(now)).await;
        };
        if !cached {
            self.cache
                .remember(user.id, &user.password_hash, password, Instant::now());
        }
        if counts.from_ip > 0 {
            self.store
                .clear_auth_failures(&login, &ip.to_string())
                .await
                .map_err(unavailable)?;
        }
        let allowed = self
            .store
            .allowed_senders(user.id)
            .await
            .map_err(unavailable)?;
        let Some(address) = Address::parse(&user.email).ok() else {
            return Err(AuthFailure::InvalidCredentials);
        };
        Ok(Identity {
            user_id: user.id,
            login: address,
            allowed,
            received: user.received,
        })
    }

    async fn verify(&self, password: String, hash: String) -> Result<bool, AuthFailure> {
        let _permit = self
            .verifications
            .acquire()
            .await
            .map_err(|_| AuthFailure::Unavailable)?;
        let blocks = self.blocks.clone();
        tokio::task::spawn_blocking(move || blocks.verify(&password, &hash))
            .await
            .map_err(|_| AuthFailure::Unavailable)
    }

    /// Counts the failure (in the database, for every node) and slows the answer down as
    /// failures from this address pile up.
    async fn fail(
        &self,
        login: &str,
        ip: IpAddr,
        now: Option<i64>,
    ) -> Result<Identity, AuthFailure> {
        if let Some(now) = now {
            self.store
                .record_auth_failure(login, &ip.to_string(), now)
                .await
                .map_err(unavailable)?;
        }
        let recent = self.slowdown.record(ip, Instant::now());
        // Debug formatting escapes control characters: the login is the client's text.
        tracing::warn!(%ip, user = ?login, recent, "authentication failed");
        tokio::time::sleep(self.failure_delay * recent.min(5)).await;
        Err(AuthFailure::InvalidCredentials)
    }

    /// Drops failure records older than the lockout window; returns how many went.
    pub async fn prune_failures(&self) -> Result<u64, crate::store::StoreError> {
        let window = i64::try_from(self.throttle.lockout.as_secs()).unwrap_or(i64::MAX);
        self.store
            .prune_auth_failures(unix_seconds(SystemTime::now()).saturating_sub(window))
            .await
    }
}

fn unavailable(e: crate::store::StoreError) -> AuthFailure {
    tracing::error!(error = %e, "authentication store unavailable");
    AuthFailure::Unavailable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_and_verify() {
        let phc = hash_password("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        let pool = BlockPool::default();
        assert!(pool.verify("correct horse", &phc));
        assert!(!pool.verify("wrong", &phc));
    }

    #[test]
    fn logins_are_normalised_on_the_domain_only() {
        assert_eq!(
            normalize_login("Alice@Example.ORG").as_deref(),
            Some("Alice@example.org")
        );
        assert_eq!(normalize_login("nodomain"), None);
    }
}
