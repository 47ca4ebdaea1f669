//! The seeded loss model every simulator in this crate shares: a xorshift generator, so a
//! failing seed reproduces, and the few draws the simulators make from it.

/// A seeded source of losses (xorshift64, shifts 13/7/17).
#[derive(Debug, Clone)]
pub(crate) struct Loss(u64);

impl Loss {
    /// A generator starting from `state` (any value but 0).
    pub fn new(state: u64) -> Loss {
        Loss(state | (state == 0) as u64)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// True with probability `pct` percent.
    pub fn pct(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }

    /// A uniform draw in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}
