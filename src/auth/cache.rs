//! A short-lived memory of successful password verifications, so that a client logging in
//! again and again (a phone polling, a script sending one message per connection) does not
//! pay the argon2id cost every time.
//!
//! What is kept per user: an HMAC-SHA256 of the password under a key drawn at start and never
//! stored, the password hash (PHC string) it was verified against, and an expiry. Never the
//! password. The user row is still read from the database on every AUTH, so a password change
//! (a new salted hash) or a disable on any node takes effect at once everywhere. What the cache gives up: someone able to read this process's memory could test
//! password guesses against an entry at HMAC speed instead of argon2 speed, for at most the
//! TTL; that attacker could also read passwords as they arrive, so the trade is small.
//! `[auth] cache_ttl = "0s"` turns it off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type Tag = [u8; 32];

#[derive(Debug, Clone)]
struct Verified {
    tag: Tag,
    /// The PHC string verified against; any password change replaces it (new salt).
    phc: String,
    expires: Instant,
}

/// Verified (user, password) pairs, by user id.
#[derive(Debug)]
pub struct VerifiedCache {
    key: [u8; 32],
    ttl: Duration,
    entries: Mutex<HashMap<i64, Verified>>,
}

/// Entries kept at most; a full cache just stops remembering until entries expire.
const MAX_ENTRIES: usize = 100_000;

impl VerifiedCache {
    /// An empty cache; `ttl` zero disables it.
    pub fn new(ttl: Duration) -> Self {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        Self {
            key,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn mac(&self, password: &str) -> Hmac<Sha256> {
        // HMAC takes keys of any length; 32 bytes cannot fail.
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(password.as_bytes());
        mac
    }

    /// True if this password was verified for this user against this hash, within the TTL.
    pub fn matches(&self, user_id: i64, phc: &str, password: &str, now: Instant) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = entries.get(&user_id) else {
            return false;
        };
        // Constant-time tag comparison.
        entry.phc == phc
            && entry.expires > now
            && self.mac(password).verify_slice(&entry.tag).is_ok()
    }

    /// Remembers a successful verification.
    pub fn remember(&self, user_id: i64, phc: &str, password: &str, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let tag: Tag = self.mac(password).finalize().into_bytes().into();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(
            user_id,
            Verified {
                tag,
                phc: phc.to_owned(),
                expires: now + self.ttl,
            },
        );
    }

    /// Forgets a user (their password failed to verify).
    pub fn forget(&self, user_id: i64) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&user_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_same_password_version_and_time() {
        let cache = VerifiedCache::new(Duration::from_secs(60));
        let now = Instant::now();
        assert!(!cache.matches(1, "$h1", "pw", now));
        cache.remember(1, "$h1", "pw", now);
        assert!(cache.matches(1, "$h1", "pw", now));
        assert!(!cache.matches(1, "$h1", "other", now), "another password");
        assert!(
            !cache.matches(1, "$h2", "pw", now),
            "password changed or user disabled since"
        );
        assert!(!cache.matches(2, "$h1", "pw", now), "another user");
        assert!(
            !cache.matches(1, "$h1", "pw", now + Duration::from_secs(61)),
            "expired"
        );
        cache.forget(1);
        assert!(!cache.matches(1, "$h1", "pw", now));
    }

    #[test]
    fn zero_ttl_disables() {
        let cache = VerifiedCache::new(Duration::ZERO);
        let now = Instant::now();
        cache.remember(1, "$h1", "pw", now);
        assert!(!cache.matches(1, "$h1", "pw", now));
    }

    #[test]
    fn never_holds_the_password() {
        let cache = VerifiedCache::new(Duration::from_secs(60));
        cache.remember(1, "$h1", "hunter2-secret", Instant::now());
        assert!(!format!("{cache:?}").contains("hunter2"));
    }
}
