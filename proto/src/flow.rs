//! Flow control that TFTP does not define, as pure policies with an injected clock.
//!
//! - [`Aimd`]: a send rate that backs off multiplicatively on loss and recovers additively
//!   on clean rounds, like TCP's congestion avoidance (RFC 5681 §3.1): halving on loss drains
//!   a queue that is overflowing, while adding a fixed amount per round probes for spare
//!   capacity slowly enough not to cause the next overflow at once. It is bounded by a floor
//!   (so a transfer always progresses) and a ceiling.
//! - [`advise_blksize`]: block size within what the client asked, bounded by the path MTU (no
//!   IP fragmentation: a lost fragment loses the whole block) and reduced under loss or memory
//!   pressure.
//! - [`timeout_floor`]: the retransmission timer floor, lengthened under load so a busy node
//!   does not retransmit what it merely has not had time to receive.

use std::time::{Duration, Instant};

/// What a sender saw since its previous report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signals {
    /// Bytes sent in the interval.
    pub bytes: u64,
    /// Datagrams sent in the interval.
    pub packets: u64,
    /// Datagrams sent again because the path lost something: after a timeout, for the rest
    /// of a window the client did not get, for a hole a multicast master reports. Blocks a
    /// late multicast joiner asks for are not loss and are not counted here.
    pub retransmits: u64,
    pub timeouts: u64,
    /// Times the socket's send queue was full (EAGAIN/ENOBUFS).
    pub backpressure: u64,
    /// Multicast: masters replaced (informational).
    pub repairs: u64,
}

/// Datagrams a round needs before its retransmission share says anything.
pub const MIN_SAMPLE: u64 = 16;

impl Signals {
    /// What happened between the cumulative counts `earlier` and `self`.
    pub fn since(&self, earlier: &Signals) -> Signals {
        Signals {
            bytes: self.bytes.saturating_sub(earlier.bytes),
            packets: self.packets.saturating_sub(earlier.packets),
            retransmits: self.retransmits.saturating_sub(earlier.retransmits),
            timeouts: self.timeouts.saturating_sub(earlier.timeouts),
            backpressure: self.backpressure.saturating_sub(earlier.backpressure),
            repairs: self.repairs.saturating_sub(earlier.repairs),
        }
    }

    /// Congestion, as opposed to the random loss of a noisy link: a full send queue, or more
    /// than `threshold_pct` of the interval's datagrams sent again. Slowing down does not help
    /// against random loss (it only makes each loss cost more time), so a few percent of
    /// retransmissions leave the rate alone; a queue overflowing drops whole bursts.
    /// A round with fewer than [`MIN_SAMPLE`] datagrams is not judged: a sender that sends
    /// that little is waiting on timeouts, not limited by its rate, and slowing it would not
    /// help.
    pub fn lossy(&self, threshold_pct: u64) -> bool {
        self.backpressure > 0 || (self.packets >= MIN_SAMPLE && self.retransmits * 100 >= threshold_pct.max(1) * self.packets)
    }
}

/// AIMD rate in bytes per second.
#[derive(Debug, Clone)]
pub struct Aimd {
    rate: u64,
    floor: u64,
    ceiling: u64,
    /// Added per clean round.
    step: u64,
    /// Multiplier on loss, in percent (50 = halve).
    beta_pct: u64,
    /// Share of datagrams sent again above which an interval counts as congested.
    loss_threshold_pct: u64,
    /// No second decrease within this long of the first: one loss event per round trip.
    hold: Duration,
    last_decrease: Option<Instant>,
}

/// Why the rate changed, for the tracing event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Decreased { from: u64, to: u64 },
    Increased { from: u64, to: u64 },
    Unchanged,
}

impl Aimd {
    /// Starts at `ceiling`: TFTP senders are clocked by acknowledgements, so the rate only
    /// matters once loss shows the path is saturated.
    pub fn new(floor: u64, ceiling: u64, step: u64, beta_pct: u64, hold: Duration) -> Self {
        let floor = floor.max(1);
        let ceiling = ceiling.max(floor);
        Aimd { rate: ceiling, floor, ceiling, step: step.max(1), beta_pct: beta_pct.clamp(1, 99), loss_threshold_pct: 0, hold, last_decrease: None }
    }

    /// Intervals with fewer retransmissions than this percentage of datagrams are not
    /// congestion (default 0: any retransmission is).
    pub fn with_loss_threshold(mut self, pct: u64) -> Self {
        self.loss_threshold_pct = pct;
        self
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn set_ceiling(&mut self, ceiling: u64) {
        self.ceiling = ceiling.max(self.floor);
        self.rate = self.rate.min(self.ceiling);
    }

    /// Applies one report covering `interval`. On loss the rate drops to `beta` times the
    /// smaller of the current rate and the rate actually achieved (a sender limited by its
    /// acknowledgements may be far below its allowance, and halving an allowance it does not
    /// use would change nothing).
    pub fn on_report(&mut self, now: Instant, interval: Duration, s: &Signals) -> Change {
        let from = self.rate;
        if s.lossy(self.loss_threshold_pct) {
            if let Some(t) = self.last_decrease {
                if now.saturating_duration_since(t) < self.hold {
                    return Change::Unchanged;
                }
            }
            let achieved = if interval.is_zero() { from } else { (s.bytes as u128 * 1_000_000_000 / interval.as_nanos().max(1)) as u64 };
            let base = from.min(achieved.max(self.floor));
            self.rate = (base * self.beta_pct / 100).clamp(self.floor, self.ceiling);
            self.last_decrease = Some(now);
            if self.rate != from {
                return Change::Decreased { from, to: self.rate };
            }
            return Change::Unchanged;
        }
        if s.bytes > 0 && self.rate < self.ceiling {
            // The additive step, but never more than an eighth of the current rate: on a slow
            // path a fixed step of several Mbit/s would overshoot its capacity in one round.
            let step = self.step.min(self.rate / 8).max(1);
            self.rate = (self.rate.saturating_add(step)).min(self.ceiling);
            return Change::Increased { from, to: self.rate };
        }
        Change::Unchanged
    }
}

/// Largest TFTP block that fits one IP datagram on a path with this MTU.
pub fn blksize_for_mtu(mtu: u32, ipv6: bool) -> u16 {
    let overhead = if ipv6 { 40 + 8 + 4 } else { 20 + 8 + 4 };
    (mtu.saturating_sub(overhead)).clamp(8, 65464) as u16
}

/// Conditions the block size adapts to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conditions {
    /// Path MTU to the client, when known.
    pub mtu: Option<u32>,
    pub ipv6: bool,
    /// Recent node-wide loss, in percent of packets sent.
    pub loss_pct: u32,
    /// File cache and session memory in use, in percent of its cap.
    pub memory_pct: u32,
}

/// Under this much loss (percent), blocks are kept at a size a retransmission costs little.
pub const LOSSY_PCT: u32 = 5;
/// Block size used under loss: one Ethernet frame.
pub const LOSSY_BLKSIZE: u16 = 1432;
/// Under memory pressure blocks are capped so windows stay small.
pub const PRESSURE_PCT: u32 = 90;
pub const PRESSURE_BLKSIZE: u16 = 8192;

/// The block size to grant: never more than `asked` or the server's `max`, never more than
/// the path MTU allows, smaller under loss or memory pressure; never below 8 (RFC 2348).
pub fn advise_blksize(asked: u16, max: u16, c: &Conditions) -> (u16, &'static str) {
    let mut b = asked.min(max);
    let mut why = "requested";
    if b < asked {
        why = "server maximum";
    }
    if let Some(mtu) = c.mtu {
        let cap = blksize_for_mtu(mtu, c.ipv6);
        if cap < b {
            b = cap;
            why = "path MTU";
        }
    }
    if c.loss_pct >= LOSSY_PCT && b > LOSSY_BLKSIZE {
        b = LOSSY_BLKSIZE;
        why = "loss";
    }
    if c.memory_pct >= PRESSURE_PCT && b > PRESSURE_BLKSIZE {
        b = PRESSURE_BLKSIZE;
        why = "memory pressure";
    }
    (b.max(8), why)
}

/// The retransmission timer floor under `load` (active transfers per core): unchanged up
/// to `knee`, then growing linearly, at most 10 times the base.
pub fn timeout_floor(base: Duration, load: u32, knee: u32) -> Duration {
    if load <= knee || knee == 0 {
        return base;
    }
    let factor = (load as f64 / knee as f64).min(10.0);
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn aimd() -> Aimd {
        Aimd::new(100_000, 100_000_000, 1_000_000, 50, 100 * MS)
    }

    #[test]
    fn loss_decreases_clean_rounds_recover() {
        let t0 = Instant::now();
        let mut a = aimd();
        let lossy = Signals { bytes: 2_000_000, packets: 40, retransmits: 3, ..Default::default() };
        // Achieved 20 MB/s over 100 ms: the rate falls to half of that.
        assert_eq!(a.on_report(t0, 100 * MS, &lossy), Change::Decreased { from: 100_000_000, to: 10_000_000 });
        // A second loss within the hold time does not compound.
        assert_eq!(a.on_report(t0 + 50 * MS, 100 * MS, &lossy), Change::Unchanged);
        let clean = Signals { bytes: 1_000_000, ..Default::default() };
        let mut now = t0 + 200 * MS;
        for _ in 0..5 {
            now += 100 * MS;
            a.on_report(now, 100 * MS, &clean);
        }
        assert_eq!(a.rate(), 15_000_000);
        // From a low rate the step is an eighth of the rate, not the full step.
        let mut slow = Aimd::new(100_000, 100_000_000, 1_000_000, 50, 100 * MS);
        slow.on_report(t0, 100 * MS, &Signals { bytes: 40_000, packets: 40, retransmits: 10, ..Default::default() });
        assert_eq!(slow.rate(), 200_000);
        slow.on_report(t0 + 200 * MS, 100 * MS, &clean);
        assert_eq!(slow.rate(), 225_000);
    }

    #[test]
    fn random_loss_under_the_threshold_leaves_the_rate_alone() {
        let t0 = Instant::now();
        let mut a = aimd().with_loss_threshold(10);
        let noisy = Signals { bytes: 1_000_000, packets: 700, retransmits: 35, ..Default::default() };
        assert!(!matches!(a.on_report(t0, 100 * MS, &noisy), Change::Decreased { .. }));
        let burst = Signals { bytes: 1_000_000, packets: 700, retransmits: 140, ..Default::default() };
        assert!(matches!(a.on_report(t0 + 200 * MS, 100 * MS, &burst), Change::Decreased { .. }));
        let full_queue = Signals { bytes: 1_000_000, packets: 700, backpressure: 1, ..Default::default() };
        assert!(matches!(a.on_report(t0 + 400 * MS, 100 * MS, &full_queue), Change::Decreased { .. }));
    }

    #[test]
    fn blksize_respects_mtu_loss_and_memory() {
        let c = Conditions { mtu: Some(1500), ..Default::default() };
        assert_eq!(advise_blksize(8192, 65464, &c), (1468, "path MTU"));
        assert_eq!(advise_blksize(512, 65464, &c), (512, "requested"));
        let c = Conditions { mtu: Some(65536), loss_pct: 12, ..Default::default() };
        assert_eq!(advise_blksize(8192, 65464, &c), (1432, "loss"));
        let c = Conditions { mtu: Some(65536), memory_pct: 95, ..Default::default() };
        assert_eq!(advise_blksize(65464, 65464, &c), (8192, "memory pressure"));
        assert_eq!(blksize_for_mtu(1500, true), 1448);
    }

    #[test]
    fn timeout_floor_grows_with_load() {
        assert_eq!(timeout_floor(100 * MS, 10, 100), 100 * MS);
        assert_eq!(timeout_floor(100 * MS, 300, 100), 300 * MS);
        assert_eq!(timeout_floor(100 * MS, 100_000, 100), 1000 * MS);
    }

    proptest! {
        #[test]
        fn rate_stays_within_floor_and_ceiling(reports in proptest::collection::vec((0u64..50_000_000, 0u64..5, 0u64..400), 1..200), floor in 1u64..1_000_000, ceil in 1u64..1_000_000_000) {
            let t0 = Instant::now();
            let mut a = Aimd::new(floor, ceil, 100_000, 50, 100 * MS);
            let (lo, hi) = (floor.max(1), ceil.max(floor.max(1)));
            let mut now = t0;
            for (bytes, rtx, dt) in reports {
                now += Duration::from_millis(dt);
                a.on_report(now, Duration::from_millis(dt), &Signals { bytes, retransmits: rtx, ..Default::default() });
                prop_assert!(a.rate() >= lo && a.rate() <= hi);
            }
        }

        #[test]
        fn loss_never_increases_and_clean_never_decreases(rate_bytes in 1u64..10_000_000, rtx in 0u64..3) {
            let t0 = Instant::now();
            let mut a = aimd();
            let before = a.rate();
            a.on_report(t0, 100 * MS, &Signals { bytes: rate_bytes, retransmits: rtx, ..Default::default() });
            if rtx > 0 { prop_assert!(a.rate() <= before); } else { prop_assert!(a.rate() >= before); }
        let mut b = aimd();
        b.on_report(t0, 100 * MS, &Signals { bytes: rate_bytes, packets: 5, retransmits: 5, ..Default::default() });
        prop_assert_eq!(b.rate(), before, "a round of 5 datagrams is too small to judge");
        }

        #[test]
        fn blksize_never_exceeds_request_mtu_or_max(asked in 8u16..=65464, max in 8u16..=65464, mtu in 68u32..70000, loss in 0u32..100, mem in 0u32..100, v6: bool) {
            let c = Conditions { mtu: Some(mtu), ipv6: v6, loss_pct: loss, memory_pct: mem };
            let (b, _) = advise_blksize(asked, max, &c);
            prop_assert!(b >= 8 && b <= asked && b <= max);
            prop_assert!(b <= blksize_for_mtu(mtu, v6).max(8));
        }
    }
}
