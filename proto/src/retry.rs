//! The retransmission timer every machine shares: a deadline, a base timeout, and an
//! exponential backoff that progress resets.

use std::time::{Duration, Instant};

/// A timer that doubles on each consecutive timeout, up to a cap, and counts them.
#[derive(Debug, Clone)]
pub(crate) struct Retry {
    /// Timeout armed after progress (an agreed option or the adaptive estimate may change it).
    base: Duration,
    /// Cap of the backoff (never below `base`).
    max: Duration,
    current: Duration,
    retries: u32,
    deadline: Option<Instant>,
}

impl Retry {
    /// A timer armed to fire `base` after `now`.
    pub fn new(now: Instant, base: Duration, max: Duration) -> Retry {
        Retry { base, max, current: base, retries: 0, deadline: Some(now + base) }
    }

    pub fn base(&self) -> Duration {
        self.base
    }

    /// Changes the base timeout; it applies at once unless the timer is backing off.
    pub fn set_base(&mut self, base: Duration) {
        self.base = base;
        if self.retries == 0 {
            self.current = base;
        }
    }

    /// Consecutive timeouts since the last progress.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the deadline has passed.
    pub fn due(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// Arms the timer with the current (backed-off) timeout.
    pub fn arm(&mut self, now: Instant) {
        self.deadline = Some(now + self.current);
    }

    pub fn stop(&mut self) {
        self.deadline = None;
    }

    /// The transfer moved forward: no retries, base timeout, armed from `now`.
    pub fn progress(&mut self, now: Instant) {
        self.retries = 0;
        self.current = self.base;
        self.arm(now);
    }

    /// A timeout that is retried: count it, double the timeout (up to the cap), re-arm.
    pub fn back_off(&mut self, now: Instant) {
        self.retries = self.retries.saturating_add(1);
        self.current = (self.current * 2).min(self.max.max(self.base));
        self.arm(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_progress_resets_it() {
        let t0 = Instant::now();
        let mut r = Retry::new(t0, Duration::from_secs(1), Duration::from_secs(3));
        assert_eq!(r.deadline(), Some(t0 + Duration::from_secs(1)));
        assert!(!r.due(t0) && r.due(t0 + Duration::from_secs(1)));
        r.back_off(t0);
        assert_eq!(r.deadline(), Some(t0 + Duration::from_secs(2)));
        r.back_off(t0);
        assert_eq!((r.retries(), r.deadline()), (2, Some(t0 + Duration::from_secs(3))));
        r.progress(t0);
        assert_eq!((r.retries(), r.deadline()), (0, Some(t0 + Duration::from_secs(1))));
        r.stop();
        assert!(!r.due(t0 + Duration::from_secs(9)));
    }
}
