//! Counting failed logins fairly behind NAT.
//!
//! A hotel's shared address must not let one attacker lock everybody out, so lockouts count
//! failures per (account, client address) and per account, never per address alone: after
//! `max_failures_per_ip` failures one account cools off *for that address*, after
//! `max_failures_per_account` failures from anywhere it cools off everywhere, and other
//! users behind the same address keep logging in. Those counts live in the database (see
//! `store::auth_failures`) so that every node sharing it sees the same attempts. Failures per
//! address only slow that address's answers down, counted here per node.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::auth_failures::FailureCounts;

/// Addresses remembered before old ones are swept, bounding memory under a spraying attack.
const MAX_ADDRESSES: usize = 100_000;

/// Throttle thresholds.
#[derive(Debug, Clone)]
pub struct ThrottleSettings {
    pub max_failures_per_ip: u32,
    pub max_failures_per_account: u32,
    /// The counting window and the cooling-off period.
    pub lockout: Duration,
}

impl ThrottleSettings {
    /// True if an account with these recent failures must cool off.
    pub fn is_locked(&self, counts: FailureCounts) -> bool {
        counts.from_ip >= i64::from(self.max_failures_per_ip)
            || counts.total >= i64::from(self.max_failures_per_account)
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    failures: u32,
    started: Instant,
}

/// Recent failures per client address on this node, to slow failing clients down.
#[derive(Debug)]
pub struct Slowdown {
    window: Duration,
    addresses: Mutex<HashMap<IpAddr, Window>>,
}

impl Slowdown {
    /// Counts failures within `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            addresses: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a failure from `ip`; returns the failures from it within the window.
    pub fn record(&self, ip: IpAddr, now: Instant) -> u32 {
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        if addresses.len() >= MAX_ADDRESSES {
            let window = self.window;
            addresses.retain(|_, w| now.duration_since(w.started) < window);
        }
        let w = addresses.entry(ip).or_insert(Window {
            failures: 0,
            started: now,
        });
        if now.duration_since(w.started) >= self.window {
            *w = Window {
                failures: 0,
                started: now,
            };
        }
        w.failures = w.failures.saturating_add(1);
        w.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOTEL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));

    #[test]
    fn lock_decision_table() {
        let s = ThrottleSettings {
            max_failures_per_ip: 3,
            max_failures_per_account: 5,
            lockout: Duration::from_secs(60),
        };
        for (from_ip, total, locked) in [
            (0, 0, false),
            (2, 2, false),
            (3, 3, true),
            (2, 4, false),
            (0, 5, true),
            (1, 9, true),
        ] {
            assert_eq!(
                s.is_locked(FailureCounts { from_ip, total }),
                locked,
                "{from_ip} {total}"
            );
        }
    }

    #[test]
    fn slowdown_counts_within_the_window() {
        let s = Slowdown::new(Duration::from_secs(60));
        let now = Instant::now();
        assert_eq!(s.record(HOTEL, now), 1);
        assert_eq!(s.record(HOTEL, now), 2);
        assert_eq!(s.record(HOTEL, now + Duration::from_secs(61)), 1);
    }
}
