//! When to try a message again: exponential backoff between `first_retry` and `max_retry`,
//! until the message is `max_age` old. Pure arithmetic over seconds.

use std::time::Duration;

/// The retry settings of `[queue]`.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first_retry: Duration,
    pub max_retry: Duration,
    pub max_age: Duration,
}

impl RetryPolicy {
    /// Delay before the attempt after `attempts` failed ones (1 → `first_retry`, doubling).
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30);
        self.first_retry
            .saturating_mul(1u32 << doublings)
            .min(self.max_retry)
    }

    /// True once a message received at `received_at` may no longer be retried at `now`.
    pub fn expired(&self, received_at: i64, now: i64) -> bool {
        now.saturating_sub(received_at) >= i64::try_from(self.max_age.as_secs()).unwrap_or(i64::MAX)
    }

    /// The next attempt time after `attempts` failures, never past the expiry moment (so the
    /// last try happens at `max_age` and the bounce follows right away).
    pub fn next_attempt(&self, attempts: u32, received_at: i64, now: i64) -> i64 {
        let delay = i64::try_from(self.delay_after(attempts).as_secs()).unwrap_or(i64::MAX);
        let expiry =
            received_at.saturating_add(i64::try_from(self.max_age.as_secs()).unwrap_or(i64::MAX));
        now.saturating_add(delay.max(1)).min(expiry.max(now + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            first_retry: Duration::from_secs(60),
            max_retry: Duration::from_secs(3600),
            max_age: Duration::from_secs(5 * 86400),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = policy();
        let delays: Vec<u64> = (1..=9).map(|a| p.delay_after(a).as_secs()).collect();
        assert_eq!(delays, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(p.delay_after(u32::MAX).as_secs(), 3600);
    }

    #[test]
    fn expiry_and_last_attempt() {
        let p = policy();
        let t0 = 1_000_000;
        assert!(!p.expired(t0, t0 + 5 * 86400 - 1));
        assert!(p.expired(t0, t0 + 5 * 86400));
        assert_eq!(p.next_attempt(1, t0, t0), t0 + 60);
        // Close to expiry the next attempt is the expiry itself.
        assert_eq!(p.next_attempt(20, t0, t0 + 5 * 86400 - 10), t0 + 5 * 86400);
    }
}
