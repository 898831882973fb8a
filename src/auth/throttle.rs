//! Slows down guessing: after a few failures for one key (a user name, a client address),
//! further attempts are refused until a delay that doubles with each failure has passed.
//! Pure bookkeeping with time passed in; must not sleep (callers answer "try again in N s"
//! at once, so a guesser cannot hold connections open either).

use std::collections::HashMap;
use std::time::Duration;

use crate::ids::Timestamp;

#[derive(Clone, Debug)]
pub struct ThrottleConfig {
    /// Failures allowed before any delay.
    pub free_failures: u32,
    /// The first delay; each further failure doubles it.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Keys remembered at most (expired ones are dropped first).
    pub max_keys: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            free_failures: 5,
            first_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(15 * 60),
            max_keys: 10_000,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    blocked_until: Timestamp,
    last_failure: Timestamp,
}

#[derive(Debug)]
pub struct Throttle {
    config: ThrottleConfig,
    entries: HashMap<String, Entry>,
}

impl Throttle {
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            entries: HashMap::new(),
        }
    }

    /// `Err(wait)` if `key` must wait before trying again.
    pub fn check(&self, key: &str, now: Timestamp) -> Result<(), Duration> {
        match self.entries.get(key) {
            Some(e) if e.blocked_until > now => Err(e.blocked_until.since(now)),
            _ => Ok(()),
        }
    }

    /// Checks `key` and counts this attempt as a failure at once: concurrent attempts cannot
    /// all pass the check before the first of them fails. A success clears the count
    /// ([`Throttle::succeeded`]).
    pub fn attempt(&mut self, key: &str, now: Timestamp) -> Result<(), Duration> {
        self.check(key, now)?;
        self.failed(key, now);
        Ok(())
    }

    pub fn failed(&mut self, key: &str, now: Timestamp) {
        if self.entries.len() >= self.config.max_keys && !self.entries.contains_key(key) {
            self.prune(now);
        }
        let config = &self.config;
        let e = self.entries.entry(key.to_string()).or_insert(Entry {
            failures: 0,
            blocked_until: now,
            last_failure: now,
        });
        // Old failures are forgotten: a typo a month ago does not count against today.
        if now.since(e.last_failure) >= config.max_delay {
            e.failures = 0;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_failure = now;
        if e.failures > config.free_failures {
            let doublings = (e.failures - config.free_failures - 1).min(20);
            let delay = config
                .first_delay
                .saturating_mul(1 << doublings)
                .min(config.max_delay);
            e.blocked_until = now.saturating_add(delay);
        }
    }

    pub fn succeeded(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// Forgets keys whose last failure is older than the longest delay; if that is not
    /// enough, the oldest half.
    fn prune(&mut self, now: Timestamp) {
        let horizon = self.config.max_delay;
        self.entries
            .retain(|_, e| now.since(e.last_failure) < horizon);
        if self.entries.len() >= self.config.max_keys {
            let mut ages: Vec<(Timestamp, String)> = self
                .entries
                .iter()
                .map(|(k, e)| (e.last_failure, k.clone()))
                .collect();
            ages.sort();
            for (_, k) in ages.into_iter().take(self.config.max_keys / 2) {
                self.entries.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Timestamp {
        Timestamp::from_millis(s * 1000)
    }

    #[test]
    fn failures_beyond_the_free_ones_wait_longer_and_longer() {
        let mut t = Throttle::new(ThrottleConfig::default());
        for _ in 0..5 {
            assert!(t.check("amy", at(0)).is_ok());
            t.failed("amy", at(0));
        }
        assert!(t.check("amy", at(0)).is_ok(), "five failures are free");
        t.failed("amy", at(0));
        assert_eq!(t.check("amy", at(0)), Err(Duration::from_secs(2)));
        assert!(t.check("amy", at(2)).is_ok());
        t.failed("amy", at(2));
        assert_eq!(t.check("amy", at(2)), Err(Duration::from_secs(4)));
        assert!(t.check("ben", at(2)).is_ok(), "other keys are not affected");
        t.succeeded("amy");
        assert!(t.check("amy", at(2)).is_ok());
    }

    #[test]
    fn concurrent_attempts_are_counted_before_they_finish() {
        let mut t = Throttle::new(ThrottleConfig::default());
        // Six attempts in flight at once: the sixth is refused before any of them finished.
        for _ in 0..5 {
            assert!(t.attempt("amy", at(0)).is_ok());
        }
        assert!(
            t.attempt("amy", at(0)).is_ok(),
            "the sixth starts the delay"
        );
        assert!(t.attempt("amy", at(0)).is_err());
        // Long after, the count starts again.
        assert!(t.attempt("amy", at(100_000)).is_ok());
        assert_eq!(t.entries["amy"].failures, 1);
    }

    #[test]
    fn memory_stays_bounded() {
        let mut t = Throttle::new(ThrottleConfig {
            max_keys: 100,
            ..ThrottleConfig::default()
        });
        for i in 0..1000 {
            t.failed(&format!("k{i}"), at(i));
        }
        assert!(t.entries.len() <= 100);
    }
}
