//! Block numbers: a 64-bit index inside the machines, 16 bits on the wire.
//!
//! Every machine counts blocks as an absolute index (1 = first DATA block) so a file of any
//! size works; the wire carries the index truncated to 16 bits, rolling over from 65535 to 0.
//! This is the one place where the two are converted: [`Block::wire`] truncates, and
//! [`Block::ahead`] / [`Block::near`] place a 16-bit number back relative to a known index
//! by serial-number arithmetic (RFC 1982), so rollover never confuses old and new blocks.

/// An absolute block index (1 = the first DATA block, 0 = "none yet", as in ACK 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block(pub u64);

impl Block {
    /// The number carried on the wire: the index modulo 65536.
    pub fn wire(self) -> u16 {
        (self.0 & 0xFFFF) as u16
    }

    /// The index with wire number `n` at or after `self` (0..=65535 blocks ahead).
    pub fn ahead(self, n: u16) -> Block {
        Block(self.0 + n.wrapping_sub(self.wire()) as u64)
    }

    /// The index with wire number `n` nearest to `self`: up to 32767 blocks ahead or 32768
    /// behind (RFC 1982). `None` when that would lie before index 0.
    pub fn near(self, n: u16) -> Option<Block> {
        let d = n.wrapping_sub(self.wire());
        if d < 0x8000 {
            Some(Block(self.0 + d as u64))
        } else {
            self.0.checked_sub(d.wrapping_neg() as u64).map(Block)
        }
    }

    /// A wire number taken as an index without rollover (multicast mode never rolls over).
    pub fn unrolled(n: u16) -> Block {
        Block(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_numbers_roll_over_and_come_back() {
        assert_eq!(Block(65535).wire(), 65535);
        assert_eq!(Block(65536).wire(), 0);
        assert_eq!(Block(65537).wire(), 1);
        assert_eq!(Block(65530).ahead(2), Block(65538));
        assert_eq!(Block(65530).ahead(65530), Block(65530));
        assert_eq!(Block(70000).near(Block(70005).wire()), Some(Block(70005)));
        assert_eq!(Block(70000).near(Block(69990).wire()), Some(Block(69990)));
        assert_eq!(Block(3).near(65535), None);
        assert_eq!(Block(3).near(1), Some(Block(1)));
        assert_eq!(Block(40000).near(Block(40000 - 32768).wire()), Some(Block(40000 - 32768)));
        assert_eq!(Block(40000).near(Block(40000 + 32767).wire()), Some(Block(40000 + 32767)));
    }
}
