//! How many blocks a group sends ahead of its master's request.
//!
//! Two limits, for two situations:
//!
//! - **At the frontier** (blocks nobody has had yet) the window follows the master's measured
//!   loss. RFC 2090 clients store blocks in any order, but the reference client (atftp) *as
//!   master* keeps only the block it asked for next: every block after one it lost is dropped
//!   and has to go out again. With `w` blocks in flight each block such a master loses costs
//!   up to `w - 1` more, so the window is `1 + WASTE_BUDGET / loss`: full while the master
//!   loses nothing, one block (lock-step) on a lossy link, and back to full as blocks arrive
//!   clean. A master seen keeping blocks that arrived after a hole (a bitmap client such as
//!   `tftpcast get` or iPXE) wastes nothing that way and keeps the full window.
//! - **Below the frontier** (repairs: the master may hold any of these blocks already) the
//!   group sends one block at a time and learns from the ACK: an ACK that jumps past what
//!   was sent means the master's holes are scattered (keep sending them one by one, exactly
//!   the holes); from the second ACK in a row for the very block sent it lacks a run (a
//!   burst it lost while listening), and the repair window grows by one per such ACK, as
//!   TCP's slow start, up to the frontier window. Waiting for the second keeps a master with
//!   scattered holes from being sent the block after each pair. Runs the group knows of (the
//!   blocks before a member joined, the blocks an in-order master dropped after a hole) go
//!   with the frontier window at once: see `Group`.

/// A master's loss per block, as an exponentially weighted average over the blocks it
/// acknowledged (each block counts 1/64).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossEstimate(f64);

const ALPHA: f64 = 1.0 / 64.0;

/// Share of the blocks an in-order master may cost twice because of the window (2%).
pub const WASTE_BUDGET: f64 = 0.02;

impl LossEstimate {
    /// An estimate that starts at `share`.
    pub fn with_share(share: f64) -> Self {
        LossEstimate(share.clamp(0.0, 1.0))
    }

    /// `k` blocks arrived in order.
    pub fn delivered(&mut self, k: u64) {
        self.0 *= (1.0 - ALPHA).powi(k.min(100_000) as i32);
    }

    /// One block was lost.
    pub fn lost(&mut self) {
        self.0 += ALPHA * (1.0 - self.0);
    }

    pub fn share(&self) -> f64 {
        self.0
    }

    /// In tenths of a percent, for logs.
    pub fn permille(&self) -> u32 {
        (self.0 * 1000.0).round() as u32
    }
}

#[derive(Debug, Clone)]
pub struct Window {
    max: u32,
    /// ACKs in a row for the very block sent below the frontier.
    streak: u32,
}

impl Window {
    pub fn new(max: u16) -> Self {
        Window { max: (max as u32).max(1), streak: 0 }
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// Blocks in flight at the frontier for a master with this loss that does (`keeps`) or
    /// may not keep blocks after a hole.
    pub fn frontier(&self, loss: LossEstimate, keeps: bool) -> u32 {
        if keeps || loss.share() <= 0.0 {
            return self.max;
        }
        let w = 1.0 + WASTE_BUDGET / loss.share();
        (w.min(self.max as f64) as u32).clamp(1, self.max)
    }

    /// Blocks in flight below the frontier.
    pub fn repair(&self, frontier: u32) -> u32 {
        if self.streak < 2 {
            return 1;
        }
        self.streak.min(frontier).max(1)
    }

    /// Back to one block at a time: a new master, a hole, or an ACK that skipped blocks.
    pub fn reset_repair(&mut self) {
        self.streak = 0;
    }

    /// The master acknowledged the very block sent and lacks the next: maybe a run.
    pub fn grow_repair(&mut self) {
        self.streak = (self.streak + 1).min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_follows_the_masters_loss() {
        let w = Window::new(8);
        let mut loss = LossEstimate::default();
        assert_eq!(w.frontier(loss, false), 8);
        loss.lost();
        // One loss: 1/64 -> 1 + 0.02 * 64 = 2.28 blocks.
        assert_eq!(w.frontier(loss, false), 2);
        assert_eq!(w.frontier(loss, true), 8, "a bitmap master keeps the full window");
        loss.delivered(200);
        assert_eq!(w.frontier(loss, false), 8, "clean blocks bring the window back");
        // A steady 5% loss: lock-step.
        let mut l = LossEstimate::default();
        for _ in 0..100 {
            l.delivered(19);
            l.lost();
        }
        assert!((l.share() - 0.05).abs() < 0.02, "{}", l.share());
        assert_eq!(w.frontier(l, false), 1);
        // 1%: a window of about three.
        let mut l = LossEstimate::default();
        for _ in 0..100 {
            l.delivered(99);
            l.lost();
        }
        assert!((2..=4).contains(&w.frontier(l, false)), "{}", w.frontier(l, false));
    }

    #[test]
    fn repair_window_grows_on_runs_and_resets() {
        let mut w = Window::new(8);
        assert_eq!(w.repair(8), 1);
        w.grow_repair();
        assert_eq!(w.repair(8), 1, "one ACK for the block sent is not a run yet");
        w.grow_repair();
        assert_eq!(w.repair(8), 2);
        for _ in 0..20 {
            w.grow_repair();
        }
        assert_eq!(w.repair(8), 8);
        assert_eq!(w.repair(3), 3, "never beyond the frontier window");
        w.reset_repair();
        assert_eq!(w.repair(8), 1);
    }
}
