//! Counting failed logins fairly behind NAT.
//!
//! A hotel's shared address must not let one attacker lock everybody out, so failures are
//! counted per (account, client address) and per account, never per address alone: after
//! `max_failures_per_ip` failures one account is cooled off *for that address*, after
//! `max_failures_per_account` failures from anywhere it is cooled off everywhere, and other
//! users behind the same address keep logging in. Failures per address only slow that
//! address's answers down. Pure logic: the caller passes `now`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept before old ones are swept, bounding memory under a spraying attack.
const MAX_ENTRIES: usize = 100_000;

/// Throttle thresholds.
#[derive(Debug, Clone)]
pub struct ThrottleSettings {
    pub max_failures_per_ip: u32,
    pub max_failures_per_account: u32,
    /// The counting window and the cooling-off period.
    pub lockout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    AccountFromIp(String, IpAddr),
    Account(String),
    Ip(IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Window {
    failures: u32,
    started: Instant,
}

/// Failure counters shared by all sessions of this node.
#[derive(Debug)]
pub struct Throttle {
    settings: ThrottleSettings,
    windows: Mutex<HashMap<Key, Window>>,
}

impl Throttle {
    /// An empty throttle.
    pub fn new(settings: ThrottleSettings) -> Self {
        Self {
            settings,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// True if `account` may not try to log in from `ip` right now.
    pub fn is_throttled(&self, account: &str, ip: IpAddr, now: Instant) -> bool {
        let windows = self.lock();
        let over = |key: Key, max: u32| {
            windows.get(&key).is_some_and(|w| {
                now.duration_since(w.started) < self.settings.lockout && w.failures >= max
            })
        };
        over(
            Key::AccountFromIp(account.to_owned(), ip),
            self.settings.max_failures_per_ip,
        ) || over(
            Key::Account(account.to_owned()),
            self.settings.max_failures_per_account,
        )
    }

    /// Counts a failure; returns the recent failures from this address (for slowing it down).
    pub fn record_failure(&self, account: &str, ip: IpAddr, now: Instant) -> u32 {
        let mut windows = self.lock();
        if windows.len() >= MAX_ENTRIES {
            let lockout = self.settings.lockout;
            windows.retain(|_, w| now.duration_since(w.started) < lockout);
        }
        let mut bump = |key: Key| {
            let w = windows.entry(key).or_insert(Window {
                failures: 0,
                started: now,
            });
            if now.duration_since(w.started) >= self.settings.lockout {
                *w = Window {
                    failures: 0,
                    started: now,
                };
            }
            w.failures = w.failures.saturating_add(1);
            w.failures
        };
        bump(Key::AccountFromIp(account.to_owned(), ip));
        bump(Key::Account(account.to_owned()));
        bump(Key::Ip(ip))
    }

    /// A successful login clears that account's failures from that address.
    pub fn record_success(&self, account: &str, ip: IpAddr) {
        self.lock()
            .remove(&Key::AccountFromIp(account.to_owned(), ip));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Window>> {
        // A poisoned lock only means another session panicked mid-update; the counts are
        // still usable.
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle::new(ThrottleSettings {
            max_failures_per_ip: 3,
            max_failures_per_account: 5,
            lockout: Duration::from_secs(60),
        })
    }

    const HOTEL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));
    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9));

    #[test]
    fn locks_the_account_from_that_address_only() {
        let t = throttle();
        let now = Instant::now();
        for _ in 0..3 {
            assert!(!t.is_throttled("alice@x", HOTEL, now));
            t.record_failure("alice@x", HOTEL, now);
        }
        assert!(t.is_throttled("alice@x", HOTEL, now));
        // Another user behind the same NAT is unaffected, and so is alice from home.
        assert!(!t.is_throttled("bob@x", HOTEL, now));
        assert!(!t.is_throttled("alice@x", HOME, now));
        // The cooling-off period ends.
        assert!(!t.is_throttled("alice@x", HOTEL, now + Duration::from_secs(61)));
    }

    #[test]
    fn many_addresses_lock_the_account_everywhere() {
        let t = throttle();
        let now = Instant::now();
        for i in 0..5u8 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, i));
            t.record_failure("alice@x", ip, now);
        }
        assert!(t.is_throttled("alice@x", HOME, now));
        assert!(!t.is_throttled("bob@x", HOME, now));
    }

    #[test]
    fn success_clears_and_address_count_grows() {
        let t = throttle();
        let now = Instant::now();
        t.record_failure("alice@x", HOTEL, now);
        t.record_failure("alice@x", HOTEL, now);
        t.record_success("alice@x", HOTEL);
        t.record_failure("alice@x", HOTEL, now);
        t.record_failure("alice@x", HOTEL, now);
        assert!(!t.is_throttled("alice@x", HOTEL, now));
        assert_eq!(t.record_failure("carol@x", HOTEL, now), 5);
    }
}
