//! Netascii (RFC 764 via RFC 1350): on the wire every line ends in CR LF and a bare CR is
//! sent as CR NUL. The encoder streams, so a CR LF pair or a CR NUL pair may straddle two
//! blocks; the decoder likewise keeps a pending CR across calls.

/// Size of `data` once netascii-encoded (what `tsize` reports for a netascii read).
pub fn encoded_len(data: &[u8]) -> u64 {
    data.len() as u64 + data.iter().filter(|&&b| b == b'\n' || b == b'\r').count() as u64
}

/// The whole of `data` in netascii, at once (multicast groups serve blocks in any order, so
/// they need the encoded file, not a stream).
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(data) as usize);
    Encoder::new().fill(data, &mut out, usize::MAX);
    out
}

/// Streaming encoder: pulls local bytes from `input` and fills blocks of netascii.
#[derive(Debug, Clone)]
pub struct Encoder {
    pos: usize,
    /// The second byte of an expansion that did not fit in the previous block.
    pending: Option<u8>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Self {
        Encoder { pos: 0, pending: None }
    }

    /// True when every byte of `input` has been encoded and emitted.
    pub fn finished(&self, input: &[u8]) -> bool {
        self.pending.is_none() && self.pos >= input.len()
    }

    /// Appends up to `max` encoded bytes of `input` to `out`; returns how many were appended.
    /// `input` must be the same slice on every call.
    pub fn fill(&mut self, input: &[u8], out: &mut Vec<u8>, max: usize) -> usize {
        let start = out.len();
        let limit = start.saturating_add(max);
        if let Some(b) = self.pending {
            if out.len() < limit {
                out.push(b);
                self.pending = None;
            }
        }
        while out.len() < limit && self.pos < input.len() {
            let b = input[self.pos];
            self.pos += 1;
            let (first, second) = match b {
                b'\n' => (b'\r', Some(b'\n')),
                b'\r' => (b'\r', Some(0)),
                other => (other, None),
            };
            out.push(first);
            if let Some(s) = second {
                if out.len() < limit {
                    out.push(s);
                } else {
                    self.pending = Some(s);
                }
            }
        }
        out.len() - start
    }
}

/// Streaming decoder: netascii in, local text (LF line ends) out.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    cr_pending: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Decoder::default()
    }

    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if self.cr_pending {
                self.cr_pending = false;
                match b {
                    b'\n' => {
                        out.push(b'\n');
                        continue;
                    }
                    0 => {
                        out.push(b'\r');
                        continue;
                    }
                    // A CR followed by anything else is not valid netascii; keep the CR.
                    _ => out.push(b'\r'),
                }
            }
            if b == b'\r' {
                self.cr_pending = true;
            } else {
                out.push(b);
            }
        }
    }

    /// Flushes a CR left dangling at the very end of the stream.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.cr_pending) {
            out.push(b'\r');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode_blocks(input: &[u8], blk: usize) -> Vec<Vec<u8>> {
        let mut enc = Encoder::new();
        let mut blocks = Vec::new();
        loop {
            let mut b = Vec::new();
            enc.fill(input, &mut b, blk);
            let last = b.len() < blk;
            blocks.push(b);
            if last {
                break;
            }
        }
        blocks
    }

    #[test]
    fn line_ends_and_bare_cr() {
        let blocks = encode_blocks(b"a\nb\rc", 512);
        assert_eq!(blocks, vec![b"a\r\nb\r\0c".to_vec()]);
    }

    #[test]
    fn whole_file_encoding_into_a_non_empty_buffer() {
        assert_eq!(encode(b"a\nb\r"), b"a\r\nb\r\0");
        let mut out = b"prefix".to_vec();
        Encoder::new().fill(b"x\n", &mut out, usize::MAX);
        assert_eq!(out, b"prefixx\r\n");
    }

    #[test]
    fn pair_straddles_block_boundary() {
        let blocks = encode_blocks(b"abc\n", 4);
        assert_eq!(blocks, vec![b"abc\r".to_vec(), b"\n".to_vec()]);
    }

    proptest! {
        #[test]
        fn round_trip_across_blocks(input in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), Just(0u8), any::<u8>()], 0..3000), blk in 1usize..600) {
            let blocks = encode_blocks(&input, blk);
            let total: usize = blocks.iter().map(|b| b.len()).sum();
            prop_assert_eq!(total as u64, encoded_len(&input));
            for b in &blocks[..blocks.len() - 1] {
                prop_assert_eq!(b.len(), blk);
            }
            prop_assert!(blocks.last().unwrap().len() < blk);
            let mut dec = Decoder::new();
            let mut out = Vec::new();
            for b in &blocks {
                dec.decode(b, &mut out);
            }
            dec.finish(&mut out);
            prop_assert_eq!(out, input);
        }
    }
}
