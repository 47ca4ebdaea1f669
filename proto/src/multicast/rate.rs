//! A group's send rate, driven by what its receivers lose.
//!
//! Passive members never answer, so a group learns what they lose only when one of them
//! leads: the holes a newly promoted master asks for (after a probe, a re-master, a
//! demotion) are blocks it lost while listening. (The master's own losses narrow the window
//! instead, see `window`: the master clocks the group, so it cannot fall behind.) Each
//! sample is a count of blocks lost out of blocks sent while that member listened. Part of
//! that is the link's: masters, which clock the group and so never fall behind, lose blocks
//! too, and slowing down cures none of that. What a member lost beyond one and a half times
//! the masters' loss is what it could not keep up with. Members lose independently, and
//! every block any of them lost goes out again, so the share that matters is that excess
//! times the members listening: the share of the first pass the group will send twice. A
//! group slows down when that is above `loss_threshold_pct` (and the excess is at least two
//! blocks: one is no evidence):
//!
//! - **Decrease**: to the smaller of `decrease_pct` of the achieved rate and the rate the
//!   sampled receiver evidently kept up with (achieved x (1 - its own share), a little below
//!   it): receivers that cannot keep up lose less when the group sends slower.
//! - **Verdict**: if the next sample after a decrease loses as much (three quarters of the
//!   share or more), slowing down did not help: the loss is the link's, not the rate's. The
//!   previous rate comes back and that share becomes the noise floor, which later samples
//!   must exceed by half to count (it fades by a twentieth per sample).
//! - **Increase**: a clean sample raises the rate by an eighth; a clean sample from the very
//!   member whose loss caused the last decrease raises it halfway back to the rate at which
//!   that loss was seen (a binary search for the highest rate the slow receivers keep up
//!   with: a fast receiver's clean sample says nothing about them). Once the rate is twice
//!   what the group achieves it is lifted (the window and the master's ACKs clock the group
//!   again).
//!
//! Pure: instants come in, a rate (bytes per second, `None` for unlimited) comes out.

use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateConfig {
    /// Off: the group is clocked by its window and the master's ACKs only.
    pub enabled: bool,
    /// Slowest the group is ever made, bytes per second.
    pub floor: u64,
    /// Share of blocks lost (percent) above which the group slows down.
    pub loss_threshold_pct: u32,
    /// On loss the rate becomes at most this percentage of the rate achieved.
    pub decrease_pct: u32,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig { enabled: true, floor: 32_000, loss_threshold_pct: 3, decrease_pct: 75 }
    }
}

/// What a judgement did, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateChange {
    /// Loss above the threshold: slower. `loss_permille` is the sample's share.
    Slowed { from: Option<u64>, to: u64, loss_permille: u32 },
    /// The decrease did not reduce the loss: the previous rate is back, the share is noise.
    Restored { to: Option<u64>, loss_permille: u32 },
    /// A clean sample from a passive member: faster (`None`: unlimited).
    Raised { from: u64, to: Option<u64> },
}

#[derive(Debug, Clone)]
pub struct GroupRate {
    cfg: RateConfig,
    rate: Option<u64>,
    /// Bytes sent since the last judgement, and since when.
    bytes: u64,
    since: Option<Instant>,
    /// The last decrease, judged by the next sample: (rate before it, share that caused it).
    verdict: Option<(Option<u64>, f64)>,
    noise: f64,
    changes: u64,
    /// The rate achieved over the last judged period that sent anything.
    last_achieved: Option<u64>,
    /// The rate achieved when receivers last lost too much.
    last_bad: Option<u64>,
}

impl GroupRate {
    pub fn new(cfg: RateConfig) -> Self {
        GroupRate { cfg, rate: None, bytes: 0, since: None, verdict: None, noise: 0.0, changes: 0, last_achieved: None, last_bad: None }
    }

    /// Bytes per second; `None`: unlimited.
    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The loss share taken for noise, in tenths of a percent.
    pub fn noise_permille(&self) -> u32 {
        (self.noise * 1000.0).round() as u32
    }

    pub fn on_sent(&mut self, now: Instant, bytes: u64) {
        self.since.get_or_insert(now);
        self.bytes += bytes;
    }

    /// A member that listened to `of` first-pass blocks lacked `lost` of them, in a group of
    /// `listeners` receivers whose masters lose `link_loss` of the blocks on their own path.
    /// `held_back`: this member's loss caused the last decrease.
    pub fn passive_sample(&mut self, now: Instant, lost: u64, of: u64, listeners: usize, link_loss: f64, held_back: bool) -> Option<RateChange> {
        if !self.cfg.enabled || of == 0 {
            return None;
        }
        let excess = (lost as f64 - 1.5 * link_loss * of as f64).max(0.0);
        let own = (excess / of as f64).min(1.0);
        let share = (own * listeners.max(1) as f64).min(1.0);
        self.judge(now, share, own, excess >= 2.0, held_back)
    }

    fn achieved(&self, now: Instant) -> Option<u64> {
        let since = self.since?;
        let secs = now.saturating_duration_since(since).as_secs_f64();
        (secs > 0.0 && self.bytes > 0).then(|| (self.bytes as f64 / secs) as u64)
    }

    /// `share`: of the first pass, what the group will send again (the threshold's measure);
    /// `own`: what the sampled receiver lost (how far below the rate it kept up).
    fn judge(&mut self, now: Instant, share: f64, own: f64, evidence: bool, held_back: bool) -> Option<RateChange> {
        let achieved = self.achieved(now).or(self.last_achieved);
        self.last_achieved = achieved;
        self.bytes = 0;
        self.since = Some(now);
        let threshold = (self.cfg.loss_threshold_pct as f64 / 100.0).max(self.noise * 1.5);
        self.noise *= 0.95;
        let permille = (share * 1000.0).round() as u32;
        let change = if share > threshold && evidence {
            match self.verdict.take() {
                Some((before, cause)) if share >= 0.75 * cause => {
                    self.noise = self.noise.max(share);
                    self.rate = before;
                    self.last_bad = None;
                    Some(RateChange::Restored { to: before, loss_permille: permille })
                }
                _ => {
                    let achieved = achieved.or(self.rate)?;
                    self.last_bad = Some(achieved);
                    let base = self.rate.map_or(achieved, |r| r.min(achieved));
                    let by_pct = base as f64 * self.cfg.decrease_pct.clamp(1, 99) as f64 / 100.0;
                    let kept_up = achieved as f64 * (1.0 - own) * 0.9;
                    let to = (by_pct.min(kept_up) as u64).max(self.cfg.floor);
                    self.verdict = Some((self.rate, share));
                    let from = self.rate;
                    self.rate = Some(to);
                    Some(RateChange::Slowed { from, to, loss_permille: permille })
                }
            }
        } else {
            self.verdict = None;
            match (self.rate, share <= threshold) {
                (Some(r), true) => {
                    let step = match self.last_bad {
                        Some(bad) if held_back && r < bad - bad / 8 => (bad - r) / 2,
                        _ => r / 8,
                    };
                    let up = r + step.max(1);
                    // A limit twice what the group achieves does not bind: lift it.
                    let to = match achieved {
                        Some(a) if r >= a.saturating_mul(2) => None,
                        _ => Some(up),
                    };
                    self.rate = to;
                    Some(RateChange::Raised { from: r, to })
                }
                _ => None,
            }
        };
        if change.is_some() {
            self.changes += 1;
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    /// `bps` bytes per second for `ms` milliseconds.
    fn send(r: &mut GroupRate, now: &mut Instant, bps: u64, ms: u64) {
        r.on_sent(*now, 0);
        *now += MS * ms as u32;
        r.on_sent(*now, bps * ms / 1000);
    }

    #[test]
    fn receivers_falling_behind_slow_the_group_then_it_probes_upward() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut r = GroupRate::new(RateConfig::default());
        send(&mut r, &mut now, 10_000_000, 100);
        // A passive member kept up with a fifth of the blocks: cut to below a fifth.
        let Some(RateChange::Slowed { from: None, to, loss_permille: 800 }) = r.passive_sample(now, 800, 1000, 1, 0.0, false) else { panic!() };
        assert!(to < 2_000_000 && to > 1_500_000, "{to}");
        // At that rate it keeps up: the decrease stands. A clean sample from another member
        // raises by an eighth; from the one that lost, halfway back to where the loss was seen
        // (10 MB/s), then by an eighth.
        send(&mut r, &mut now, to, 100);
        let Some(RateChange::Raised { from, to: Some(up) }) = r.passive_sample(now, 0, 1000, 1, 0.0, false) else { panic!() };
        assert_eq!(up, from + from / 8);
        send(&mut r, &mut now, up, 100);
        let Some(RateChange::Raised { from, to: Some(up) }) = r.passive_sample(now, 0, 1000, 1, 0.0, true) else { panic!() };
        assert_eq!(up, from + (10_000_000 - from) / 2);
        let mut rate = up;
        for _ in 0..4 {
            send(&mut r, &mut now, rate, 100);
            r.passive_sample(now, 0, 1000, 1, 0.0, true);
            rate = r.rate().unwrap();
        }
        assert!(rate > 9_000_000 && rate < 12_000_000, "{rate}");
        // A receiver loses again just above: down, and the search goes on below that.
        send(&mut r, &mut now, rate, 100);
        assert!(matches!(r.passive_sample(now, 100, 1000, 1, 0.0, false), Some(RateChange::Slowed { .. })));
        // When the group achieves far less than the limit (the window clocks it), it is lifted.
        for _ in 0..40 {
            send(&mut r, &mut now, 1_000_000, 100);
            r.passive_sample(now, 0, 1000, 1, 0.0, false);
            if r.rate().is_none() {
                break;
            }
        }
        assert_eq!(r.rate(), None, "the limit is lifted once it no longer binds");
    }

    #[test]
    fn the_share_that_counts_is_what_the_group_sends_again() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut r = GroupRate::new(RateConfig::default());
        send(&mut r, &mut now, 10_000_000, 100);
        // 0.2% lost by one member of 8: 1.6% of the pass goes again, under the 3% threshold.
        assert_eq!(r.passive_sample(now, 2, 1000, 8, 0.0, false), None);
        // The same loss in a group of 32: 6.4%, too much.
        assert!(matches!(r.passive_sample(now, 2, 1000, 32, 0.0, false), Some(RateChange::Slowed { loss_permille: 64, .. })));
        // One lost block is no evidence, whatever the group's size.
        let mut r = GroupRate::new(RateConfig::default());
        send(&mut r, &mut now, 10_000_000, 100);
        assert_eq!(r.passive_sample(now, 1, 100, 32, 0.0, false), None);
    }

    #[test]
    fn what_the_masters_lose_too_is_the_links() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut r = GroupRate::new(RateConfig::default());
        send(&mut r, &mut now, 10_000_000, 100);
        // 5% lost by a passive member where masters lose 5%: the link's, nothing to slow for.
        assert_eq!(r.passive_sample(now, 50, 1000, 4, 0.05, false), None);
        // 20% where masters lose 5%: it fell behind.
        assert!(matches!(r.passive_sample(now, 200, 1000, 4, 0.05, false), Some(RateChange::Slowed { .. })));
    }

    #[test]
    fn loss_that_slowing_does_not_cure_is_noise() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut r = GroupRate::new(RateConfig::default());
        send(&mut r, &mut now, 10_000_000, 100);
        assert!(matches!(r.passive_sample(now, 50, 1000, 1, 0.0, false), Some(RateChange::Slowed { from: None, .. })));
        send(&mut r, &mut now, 7_000_000, 100);
        // Still 5%: the decrease did not help. The rate comes back, 5% is the noise floor.
        assert_eq!(r.passive_sample(now, 50, 1000, 1, 0.0, false), Some(RateChange::Restored { to: None, loss_permille: 50 }));
        assert_eq!(r.rate(), None);
        assert!(r.noise_permille() >= 45);
        // 5% again is under the floor (x1.5): nothing changes.
        send(&mut r, &mut now, 10_000_000, 100);
        assert_eq!(r.passive_sample(now, 50, 1000, 1, 0.0, false), None);
        // Much more than the noise counts again.
        send(&mut r, &mut now, 10_000_000, 100);
        assert!(matches!(r.passive_sample(now, 300, 1000, 1, 0.0, false), Some(RateChange::Slowed { .. })));
    }

    #[test]
    fn never_below_the_floor_and_off_means_off() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut r = GroupRate::new(RateConfig { floor: 100_000, ..Default::default() });
        // Each decrease helps a little (the share falls by a third), never enough.
        let mut lost = 900.0;
        for _ in 0..10 {
            send(&mut r, &mut now, 200_000, 100);
            r.passive_sample(now, lost as u64, 1000, 1, 0.0, false);
            lost *= 0.7;
        }
        assert_eq!(r.rate(), Some(100_000));
        let mut off = GroupRate::new(RateConfig { enabled: false, ..Default::default() });
        send(&mut off, &mut now, 200_000, 100);
        assert_eq!(off.passive_sample(now, 999, 1000, 1, 0.0, false), None);
        assert_eq!(off.rate(), None);
    }
}
