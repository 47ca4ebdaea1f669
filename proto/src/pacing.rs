//! Pacing as a pure function of time: a token bucket that sessions consult before each
//! datagram, and the rule that splits a node-wide rate among sessions.
//!
//! The bucket allows a bounded debt: a datagram may be sent whenever the balance is not
//! negative, and its size is then subtracted. That sends whole datagrams without needing to
//! know their size in advance, and the long-run rate is still exactly `rate`.

use std::time::{Duration, Instant};

/// Bytes per second; `None` means unlimited.
pub type Rate = Option<u64>;

/// Converts Mbit/s (0 = unlimited) into bytes per second.
pub fn mbps(m: u64) -> Rate {
    (m > 0).then(|| m * 1_000_000 / 8)
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    burst: u64,
    balance: i64,
    last: Instant,
}

impl TokenBucket {
    /// `burst` is how many bytes may leave back to back after an idle period.
    pub fn new(now: Instant, rate: Rate, burst: u64) -> Self {
        TokenBucket { rate, burst, balance: burst as i64, last: now }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    pub fn set_rate(&mut self, now: Instant, rate: Rate) {
        self.refill(now);
        self.rate = rate;
    }

    /// Sets the rate with the burst that suits it (see [`burst_for`]).
    pub fn set_rate_auto(&mut self, now: Instant, rate: Rate) {
        self.set_rate(now, rate);
        self.burst = burst_for(rate);
        self.balance = self.balance.min(self.burst as i64);
    }

    fn refill(&mut self, now: Instant) {
        // A bucket made with an instant still to come (a group's start time) counts from its
        // first use instead: otherwise it would not refill until then.
        if now < self.last {
            self.last = now;
        }
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        if let Some(r) = self.rate {
            // u64 arithmetic on the per-packet path (a u128 division costs ~100 instructions);
            // u128 only when the product would overflow (long idle at a high rate).
            let nanos = elapsed.as_nanos().min(u64::MAX as u128) as u64;
            let add = match r.checked_mul(nanos) {
                Some(p) => p / 1_000_000_000,
                None => (r as u128 * nanos as u128 / 1_000_000_000) as u64,
            }
            .min(i64::MAX as u64) as i64;
            self.balance = (self.balance.saturating_add(add)).min(self.burst as i64);
        }
    }

    /// `None` if a datagram may be sent now, else the instant from which it may.
    pub fn ready_at(&mut self, now: Instant) -> Option<Instant> {
        let Some(r) = self.rate else { return None };
        self.refill(now);
        if self.balance >= 0 {
            return None;
        }
        let deficit = (-self.balance) as u128;
        let nanos = (deficit * 1_000_000_000).div_ceil(r.max(1) as u128);
        Some(now + Duration::from_nanos(nanos.min(u64::MAX as u128) as u64))
    }

    /// Charges a datagram of `bytes` that was just sent.
    pub fn consume(&mut self, bytes: u64) {
        if self.rate.is_some() {
            self.balance = self.balance.saturating_sub(bytes as i64);
        }
    }

    /// Current balance in bytes (negative: debt), for state dumps.
    pub fn balance(&self) -> i64 {
        self.balance
    }
}

/// The burst a rate allows: 2 ms worth of it, at least a few datagrams and at most 1 MiB.
/// Small enough that a window of blocks is spread out when the rate was cut after loss, large
/// enough that a timer wheel with millisecond resolution does not itself cap the rate.
pub fn burst_for(rate: Rate) -> u64 {
    rate.map(|r| (r / 500).clamp(4096, 1 << 20)).unwrap_or(1 << 20)
}

/// The rate one session may use: an equal share of the node cap, bounded by the per-session
/// cap. Unused shares are not redistributed here; sessions that cannot use their share
/// simply send less, and the node total stays under the cap.
pub fn session_share(node_cap: Rate, sessions: usize, session_cap: Rate) -> Rate {
    let share = node_cap.map(|c| c / sessions.max(1) as u64);
    match (share, session_cap) {
        (Some(a), Some(b)) => Some(a.min(b).max(1)),
        (Some(a), None) => Some(a.max(1)),
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unlimited_never_waits() {
        let now = Instant::now();
        let mut b = TokenBucket::new(now, None, 0);
        for _ in 0..1000 {
            assert_eq!(b.ready_at(now), None);
            b.consume(65000);
        }
    }

    #[test]
    fn burst_follows_rate() {
        assert_eq!(burst_for(Some(2_500_000)), 5000);
        assert_eq!(burst_for(Some(100_000)), 4096);
        assert_eq!(burst_for(Some(10_000_000_000)), 1 << 20);
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, None, 1 << 20);
        b.set_rate_auto(t0, Some(2_500_000));
        b.consume(1432 * 16);
        // A 16-block window at 20 Mbit/s leaves over about 9 ms, not at once.
        let wait = b.ready_at(t0).unwrap() - t0;
        assert!(wait > Duration::from_millis(5) && wait < Duration::from_millis(10), "{wait:?}");
    }

    #[test]
    fn a_bucket_made_for_a_later_instant_refills_from_its_first_use() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0 + Duration::from_secs(5), Some(1_000_000), 1000);
        b.consume(2000);
        let t = b.ready_at(t0).expect("in debt");
        assert!(t <= t0 + Duration::from_millis(2), "{:?}", t - t0);
        assert_eq!(b.ready_at(t0 + Duration::from_millis(2)), None);
    }

    #[test]
    fn shares() {
        assert_eq!(session_share(mbps(80), 4, None), Some(2_500_000));
        assert_eq!(session_share(mbps(80), 4, mbps(8)), Some(1_000_000));
        assert_eq!(session_share(None, 4, mbps(8)), Some(1_000_000));
        assert_eq!(session_share(None, 4, None), None);
    }

    proptest! {
        /// Over any run, bytes sent never exceed burst + rate * elapsed + one datagram.
        #[test]
        fn long_run_rate_is_respected(rate in 1_000u64..100_000_000, burst in 0u64..100_000, sizes in proptest::collection::vec(1u64..65_000, 1..400)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut b = TokenBucket::new(t0, Some(rate), burst);
            let mut sent = 0u64;
            for s in &sizes {
                if let Some(t) = b.ready_at(now) {
                    prop_assert!(t > now);
                    now = t;
                    prop_assert_eq!(b.ready_at(now), None);
                }
                b.consume(*s);
                sent += s;
            }
            let elapsed = now - t0;
            let allowed = burst as u128 + rate as u128 * elapsed.as_nanos() / 1_000_000_000 + *sizes.last().unwrap() as u128 + 1;
            prop_assert!(sent as u128 <= allowed, "sent {} allowed {}", sent, allowed);
        }
    }
}
