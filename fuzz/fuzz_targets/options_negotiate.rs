//! options_negotiate: arbitrary option lists through `options::parse`, then
//! `options::negotiate` against arbitrary (valid) server limits.
//!
//! Invariants:
//! - `parse` accepts exactly what a small reference model accepts (no known name twice; every
//!   known numeric option is plain decimal digits, at most 20 of them, within its range);
//! - negotiated blksize is 8..=max_blksize and never more than asked (512 when not asked);
//!   windowsize is 1..=max_windowsize and never more than asked (1 when not asked); the
//!   timeout is the one asked, else the server default;
//! - the OACK holds only options the client sent, each once, in the client's order, only
//!   known ones (never `multicast`, which the multicast layer adds), and its values are
//!   exactly the negotiated ones; no OACK entry for `tsize` on a read of unknown size;
//! - `lower_blksize` only lowers a block size the client asked for, to no less than 8, and
//!   keeps the OACK in step.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tftpcast_proto::options::{negotiate, parse, Limits};

const KNOWN: [&str; 5] = ["blksize", "tsize", "timeout", "windowsize", "multicast"];

#[derive(Debug, Arbitrary)]
enum Name {
    Known(u8),
    /// A known name in odd case (the decoder lower-cases names; parse expects that).
    Shouted(u8),
    Other(String),
}

#[derive(Debug, Arbitrary)]
enum Value {
    Number(u64),
    Small(u16),
    Padded(u8, u16),
    Text(String),
}

#[derive(Debug, Arbitrary)]
struct Input {
    options: Vec<(Name, Value)>,
    max_blksize: u16,
    max_windowsize: u16,
    default_timeout_ms: u32,
    file_size: Option<u64>,
    is_write: bool,
    /// Flow control lowering the block size after negotiation.
    lower: Option<u16>,
}

fn name(n: &Name) -> String {
    match n {
        Name::Known(i) => KNOWN[*i as usize % KNOWN.len()].to_string(),
        Name::Shouted(i) => KNOWN[*i as usize % KNOWN.len()].to_ascii_uppercase(),
        Name::Other(s) => s.clone(),
    }
    // As the packet decoder hands them over.
    .to_ascii_lowercase()
}

fn value(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::Small(n) => n.to_string(),
        Value::Padded(zeros, n) => format!("{}{n}", "0".repeat(*zeros as usize % 24)),
        Value::Text(s) => s.clone(),
    }
}

/// The reference: the number an option value stands for, if it is one the RFCs describe.
fn digits(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

fn model_accepts(opts: &[(String, String)]) -> bool {
    let mut seen = Vec::new();
    for (k, v) in opts {
        // A known option sent twice is ambiguous; unknown ones are ignored however often
        // (RFC 2347).
        if KNOWN.contains(&k.as_str()) && seen.contains(&k) {
            return false;
        }
        seen.push(k);
        let ok = match k.as_str() {
            "blksize" => digits(v).is_some_and(|n| n >= 8),
            "tsize" => digits(v).is_some(),
            "timeout" => digits(v).is_some_and(|n| (1..=255).contains(&n)),
            "windowsize" => digits(v).is_some_and(|n| n >= 1),
            _ => true,
        };
        if !ok {
            return false;
        }
    }
    true
}

fuzz_target!(|input: Input| {
    let opts: Vec<(String, String)> = input.options.iter().map(|(n, v)| (name(n), value(v))).collect();
    let parsed = parse(&opts);
    assert_eq!(parsed.is_ok(), model_accepts(&opts), "parse disagrees with the reference on {opts:?}: {parsed:?}");
    let Ok(req) = parsed else { return };
    let asked = |k: &str| opts.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(req.names, opts.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
    assert_eq!(req.multicast, asked("multicast").is_some());

    // Limits as the configuration validates them (max_blksize 8..=65464, max_windowsize >= 1,
    // timeout 1..=255000 ms).
    let limits = Limits {
        max_blksize: 8 + input.max_blksize % (65464 - 8 + 1),
        max_windowsize: input.max_windowsize.max(1),
        default_timeout: Duration::from_millis(1 + input.default_timeout_ms as u64 % 255_000),
    };
    let n = negotiate(&req, &limits, input.file_size, input.is_write);

    match asked("blksize").and_then(digits) {
        Some(b) => {
            assert!(n.blksize >= 8 && n.blksize <= limits.max_blksize, "blksize {} outside 8..={}", n.blksize, limits.max_blksize);
            assert!(n.blksize as u64 <= b, "blksize {} granted, {b} asked", n.blksize);
            assert_eq!(n.blksize as u64, b.min(limits.max_blksize as u64), "blksize not the largest allowed");
        }
        None => assert_eq!(n.blksize, 512),
    }
    match asked("windowsize").and_then(digits) {
        Some(w) => {
            assert!(n.windowsize >= 1 && n.windowsize <= limits.max_windowsize);
            assert!(n.windowsize as u64 <= w);
            assert_eq!(n.windowsize as u64, w.min(limits.max_windowsize as u64));
        }
        None => assert_eq!(n.windowsize, 1),
    }
    match asked("timeout").and_then(digits) {
        Some(t) => {
            assert_eq!(n.timeout, Duration::from_secs(t));
            assert!(n.timeout_negotiated);
        }
        None => {
            assert_eq!(n.timeout, limits.default_timeout);
            assert!(!n.timeout_negotiated);
        }
    }
    if input.is_write {
        assert_eq!(n.tsize, asked("tsize").and_then(digits));
    }

    // The OACK: a subsequence of the client's options, each once, known ones only.
    let mut last_pos = None;
    for (k, v) in &n.oack {
        let pos = opts.iter().position(|(n, _)| n == k).unwrap_or_else(|| panic!("OACK names {k:?}, which the client did not send"));
        assert!(last_pos.is_none_or(|p| p < pos), "OACK not in the client's order / duplicate {k:?}: {:?}", n.oack);
        last_pos = Some(pos);
        let want = match k.as_str() {
            "blksize" => n.blksize.to_string(),
            "windowsize" => n.windowsize.to_string(),
            "timeout" => n.timeout.as_secs().to_string(),
            "tsize" if input.is_write => n.tsize.expect("tsize in a write OACK").to_string(),
            "tsize" => input.file_size.expect("tsize acknowledged for a read of unknown size").to_string(),
            other => panic!("OACK acknowledges {other:?}, which negotiate does not handle"),
        };
        assert_eq!(v, &want, "OACK value of {k}");
    }
    for k in ["blksize", "windowsize", "timeout"] {
        assert_eq!(asked(k).is_some(), n.oack.iter().any(|(n, _)| n == k), "{k} asked but not acknowledged (or the reverse)");
    }
    let tsize_acked = n.oack.iter().any(|(n, _)| n == "tsize");
    assert_eq!(tsize_acked, asked("tsize").is_some() && (input.is_write || input.file_size.is_some()));

    // `lower_blksize`: only a block size the client asked for changes, never up, never below
    // 8, and the OACK follows.
    if let Some(b) = input.lower {
        let mut m = n.clone();
        m.lower_blksize(b);
        if asked("blksize").is_some() {
            assert_eq!(m.blksize, b.clamp(8, n.blksize), "lower_blksize({b}) from {}", n.blksize);
            let entry = m.oack.iter().find(|(k, _)| k == "blksize").map(|(_, v)| v.clone());
            assert_eq!(entry, Some(m.blksize.to_string()), "OACK out of step after lower_blksize");
            let others = |o: &[(String, String)]| o.iter().filter(|(k, _)| k != "blksize").cloned().collect::<Vec<_>>();
            assert_eq!(others(&m.oack), others(&n.oack));
        } else {
            assert_eq!((m.blksize, &m.oack), (n.blksize, &n.oack), "lower_blksize changed a transfer without blksize");
        }
    }
});
