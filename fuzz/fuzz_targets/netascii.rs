//! netascii: the streaming encoder over arbitrary text and block sizes, and the decoder.
//!
//! Invariants:
//! - blocks of a fixed size: the total is `encoded_len`, every block but the last is full,
//!   the last is shorter (possibly empty), and the concatenation is the reference encoding
//!   (LF -> CR LF, CR -> CR NUL), whatever pair straddles a boundary;
//! - with an arbitrary size per call the output is still the reference encoding and no call
//!   returns more than asked;
//! - decoding the blocks one by one gives back the input;
//! - the decoder never panics on arbitrary (not necessarily valid) netascii, never grows its
//!   input, and is independent of how the input is split.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tftpcast_proto::netascii::{encoded_len, Decoder, Encoder};

#[derive(Debug, Arbitrary)]
struct Input {
    text: Vec<u8>,
    blksize: u16,
    /// Sizes for the variable-size pass (cycled).
    chunks: Vec<u8>,
    /// Split points for the decoder-only pass.
    split: u16,
}

fn reference(local: &[u8]) -> Vec<u8> {
    let mut w = Vec::new();
    for &b in local {
        match b {
            b'\n' => w.extend_from_slice(b"\r\n"),
            b'\r' => w.extend_from_slice(b"\r\0"),
            _ => w.push(b),
        }
    }
    w
}

fn decode_all(parts: &[&[u8]]) -> Vec<u8> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    for p in parts {
        d.decode(p, &mut out);
    }
    d.finish(&mut out);
    out
}

fuzz_target!(|input: Input| {
    let text = &input.text;
    let wire = reference(text);
    assert_eq!(encoded_len(text), wire.len() as u64, "encoded_len");

    // Fixed block size, as a transfer uses it.
    let blk = 1 + input.blksize as usize % 1024;
    let mut enc = Encoder::new();
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut b = Vec::new();
        let n = enc.fill(text, &mut b, blk);
        assert_eq!(n, b.len(), "fill's return value");
        let last = b.len() < blk;
        blocks.push(b);
        if last {
            break;
        }
        assert!(blocks.len() <= wire.len() / blk + 1, "encoder keeps producing full blocks");
    }
    assert!(enc.finished(text), "encoder not finished after a short block");
    let total: usize = blocks.iter().map(|b| b.len()).sum();
    assert_eq!(total as u64, encoded_len(text), "blocks add up to encoded_len");
    for b in &blocks[..blocks.len() - 1] {
        assert_eq!(b.len(), blk, "a block before the last one is not full");
    }
    assert!(blocks.last().unwrap().len() < blk);
    assert_eq!(blocks.concat(), wire, "block encoding differs from the reference");
    let parts: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    assert_eq!(&decode_all(&parts), text, "decoding the blocks does not give the input back");

    // Arbitrary sizes per call (0 included), appending to one buffer.
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    let mut i = 0;
    let mut calls = 0;
    while !enc.finished(text) {
        let max = input.chunks.get(i % input.chunks.len().max(1)).map_or(7, |&c| c as usize);
        i += 1;
        let before = out.len();
        let n = enc.fill(text, &mut out, max);
        assert!(n <= max && out.len() - before == n, "fill appended {n} bytes for max {max}");
        calls += 1;
        if i > input.chunks.len() && input.chunks.iter().all(|&c| c == 0) {
            // Only zero sizes: nothing can progress; one full call finishes the job.
            enc.fill(text, &mut out, wire.len() + 2);
        }
        assert!(calls <= wire.len() * 300 + 300, "encoder does not progress");
    }
    assert_eq!(out, wire, "variable-size encoding differs from the reference");

    // The decoder on arbitrary bytes: no panic, no growth, split-independent.
    let cut = if text.is_empty() { 0 } else { input.split as usize % (text.len() + 1) };
    let whole = decode_all(&[text]);
    assert!(whole.len() <= text.len(), "decoder output longer than its input");
    assert_eq!(decode_all(&[&text[..cut], &text[cut..]]), whole, "decoder depends on the split at {cut}");
});
