//! Retransmission timeout from measured round trips (RFC 6298, as TCP does it): smoothed RTT
//! plus four times its variance, clamped to a floor and a ceiling. A fixed TFTP timer of one
//! to five seconds wastes whole seconds per lost packet on a LAN whose round trip is well
//! under a millisecond; an estimate recovers in a fraction of that. When the client fixed the
//! timeout with RFC 2349 the estimator is not used at all.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Rto {
    srtt: Option<Duration>,
    rttvar: Duration,
    min: Duration,
    max: Duration,
    initial: Duration,
}

impl Rto {
    /// `initial` applies until the first sample.
    pub fn new(initial: Duration, min: Duration, max: Duration) -> Self {
        Rto { srtt: None, rttvar: Duration::ZERO, min, max: max.max(min), initial }
    }

    pub fn on_sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let diff = if srtt > rtt { srtt - rtt } else { rtt - srtt };
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The timeout to arm now.
    pub fn timeout(&self) -> Duration {
        match self.srtt {
            None => self.initial.clamp(self.min, self.max),
            Some(s) => (s + self.rttvar * 4).clamp(self.min, self.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn converges_to_floor_on_fast_links() {
        let mut r = Rto::new(Duration::from_secs(1), Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(r.timeout(), Duration::from_secs(1));
        for _ in 0..20 {
            r.on_sample(Duration::from_micros(80));
        }
        assert_eq!(r.timeout(), Duration::from_millis(100));
    }

    #[test]
    fn follows_slow_links() {
        let mut r = Rto::new(Duration::from_secs(1), Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..50 {
            r.on_sample(Duration::from_millis(300));
        }
        let t = r.timeout();
        assert!(t >= Duration::from_millis(300) && t < Duration::from_millis(400), "{t:?}");
    }

    proptest! {
        #[test]
        fn always_within_bounds(samples in proptest::collection::vec(0u64..20_000_000, 0..50), min in 1u64..1000, max in 1u64..10_000) {
            let (min, max) = (Duration::from_millis(min), Duration::from_millis(max));
            let mut r = Rto::new(Duration::from_secs(1), min, max);
            for s in samples {
                r.on_sample(Duration::from_micros(s));
                let t = r.timeout();
                prop_assert!(t >= min && t <= max.max(min));
            }
        }
    }
}
