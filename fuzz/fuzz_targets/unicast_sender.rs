//! unicast_sender: a `tftpcast_proto::Sender` driven by an arbitrary sequence of client
//! packets (ACKs for any block, ERROR, DATA, OACK, requests), clock jumps, timer expiries,
//! flow-control changes and stretches of a well-behaved receiver, on a virtual clock.
//!
//! Invariants checked after every step:
//! - no DATA before the client acknowledged the OACK (ACK 0), none after the transfer ended;
//! - every DATA block lies in the window: acked < index <= acked + window, index <= last
//!   block (block numbers mapped through 16-bit rollover), and carries exactly the bytes of
//!   that block of the file (octet) or of its netascii encoding; only the last one is short;
//! - anti-amplification: an event that is neither progress (an ACK that moves the window, the
//!   OACK's ACK 0), nor a timer expiry, nor a window change makes the sender send no DATA at
//!   all (duplicate, stray, ancient and future ACKs included: no Sorcerer's Apprentice); one
//!   of those events sends at most one window; so DATA bytes are bounded by
//!   window x (blksize + 4) x (1 + progress events + timeouts + window changes);
//! - a client ERROR ends the transfer without a reply; a client DATA gets exactly one ERROR 4;
//! - timers: a live transfer always has a deadline; after every step it is not in the past
//!   and not further than the longest timeout that can be in force; `handle_timeout` before
//!   the deadline does nothing; the transfer ends with `TimedOut` exactly at the timeout
//!   that finds the retries used up (`initial_retries` before the client answered anything,
//!   `max_retries` after) and, once the client answered, `give_up_after` passed since the
//!   last progress (so an unanswered first packet goes out at most 1 + `initial_retries`
//!   times whatever the floor);
//! - liveness: a silent client makes the transfer end within the retries plus the timeouts
//!   the floor adds (the backoff reaches `max_timeout` after at most 17 doublings); a client
//!   that starts ACKing properly again completes the transfer with `Complete`;
//! - the statistics count exactly the datagrams and bytes that were handed out.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tftpcast_proto::packet::{decode, ErrorCode, Mode, Packet, Request};
use tftpcast_proto::transfer::{Outcome, Sender, SenderConfig, Source};
use tftpcast_proto::{Block, Datagram};

#[derive(Debug, Arbitrary)]
enum Op {
    /// An ACK with this exact block number.
    Ack(u16),
    /// ACK for (acked + k) on the wire: near the window.
    AckRel(i8),
    Error(u16),
    Data(u16),
    Oack,
    Request,
    /// Let this many milliseconds pass; the timer fires if its deadline passed.
    Advance(u16),
    /// Jump to the deadline and fire the timer.
    Timeout,
    /// A well-behaved lossless receiver for this many rounds.
    Pump(u8),
    SetWindow(u16),
    SetTimeout(u16),
}

#[derive(Debug, Arbitrary)]
struct Input {
    len: u16,
    /// One input in 64: a large file (rollover past block 65535 at small block sizes).
    big: u8,
    seed: u8,
    blksize: u16,
    windowsize: u8,
    timeout_ms: u16,
    max_timeout_ms: u16,
    max_retries: u8,
    initial_retries: u8,
    /// `give_up_after` in tenths of a second (below 64: none).
    give_up: u8,
    adaptive: Option<(u16, u16)>,
    oack: bool,
    netascii: bool,
    /// At the end: keep ACKing properly (true) or go silent (false).
    finish_well: bool,
    ops: Vec<Op>,
}

fn content(len: usize, seed: u8, netascii: bool) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed as u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = (x >> 32) as u8;
            if netascii {
                match b % 8 {
                    0 => b'\n',
                    1 => b'\r',
                    _ => b,
                }
            } else {
                b
            }
        })
        .collect()
}


struct Harness {
    s: Sender,
    now: Instant,
    wire: Vec<u8>,
    blksize: u16,
    windowsize: u16,
    oack: Option<Vec<u8>>,
    awaiting_oack_ack: bool,
    /// Longest timeout that can be in force.
    longest: Duration,
    max_retries: u32,
    initial_retries: u32,
    give_up_after: Duration,
    max_timeout: Duration,
    /// The client made progress at least once (the sender's `peer_answered`).
    answered: bool,
    last_progress: Instant,
    acked: u64,
    /// Contiguous blocks the simulated receiver holds.
    rx_have: u64,
    timeouts_without_progress: u32,
    packets: u64,
    bytes: u64,
    pump_budget: u32,
    ended: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Allowance {
    /// The event may open (or reopen) one window.
    Window,
    /// The event must not produce any DATA.
    None,
}

impl Harness {
    fn block_bytes(&self, index: u64) -> &[u8] {
        let blk = self.blksize as u64;
        let len = self.wire.len() as u64;
        let start = ((index - 1) * blk).min(len);
        let end = (start + blk).min(len);
        &self.wire[start as usize..end as usize]
    }

    fn total(&self) -> u64 {
        self.wire.len() as u64 / self.blksize as u64 + 1
    }

    /// Drains the sender after an event and checks what it sent. Returns the control packets.
    fn drain(&mut self, allowance: Allowance, what: &str) -> Vec<Vec<u8>> {
        let was_done = self.s.is_done();
        let mut data_packets = 0u64;
        let mut controls = Vec::new();
        while let Some(t) = self.s.poll_transmit(self.now) {
            assert!(!was_done, "{what}: transmit after the transfer ended: {t:?}");
            self.packets += 1;
            self.bytes += t.datagram.len() as u64;
            match t.datagram {
                Datagram::Control(c) => controls.push(c),
                Datagram::Data { block, payload } => {
                    data_packets += 1;
                    assert!(!self.awaiting_oack_ack, "{what}: DATA block {block} before the OACK was acknowledged");
                    assert!(!self.ended, "{what}: DATA after the transfer ended");
                    let d = Block(self.acked).ahead(block).0 - self.acked;
                    let window = self.s.window() as u64;
                    assert!(d >= 1 && d <= window, "{what}: DATA block {block} outside the window (acked {}, window {window})", self.acked);
                    let index = self.acked + d;
                    assert!(index <= self.total(), "{what}: DATA block index {index} beyond the last block {}", self.total());
                    assert_eq!(&payload[..], self.block_bytes(index), "{what}: wrong payload for block index {index}");
                    if index < self.total() {
                        assert_eq!(payload.len(), self.blksize as usize);
                    } else {
                        assert!(payload.len() < self.blksize as usize);
                    }
                    if index == self.rx_have + 1 {
                        self.rx_have = index;
                    }
                }
            }
        }
        let limit = match allowance {
            Allowance::Window => self.windowsize.max(1) as u64,
            Allowance::None => 0,
        };
        assert!(data_packets <= limit, "{what}: {data_packets} DATA packets for one event (allowed {limit})");
        for c in &controls {
            match decode(c) {
                Ok(Packet::Oack(_)) => {
                    assert_eq!(Some(c), self.oack.as_ref(), "{what}: an OACK that is not ours");
                    assert!(self.awaiting_oack_ack, "{what}: OACK sent after ACK 0");
                }
                Ok(Packet::Error { .. }) => {}
                other => panic!("{what}: unexpected control packet {other:?}"),
            }
        }
        let st = self.s.stats();
        assert_eq!((st.packets_sent, st.bytes_sent), (self.packets, self.bytes), "{what}: stats disagree with what was sent");
        self.check_timer(what);
        controls
    }

    fn check_timer(&mut self, what: &str) {
        if self.s.is_done() {
            self.ended = true;
            assert!(self.s.outcome().is_some(), "{what}: done without an outcome");
            return;
        }
        let deadline = self.s.poll_timeout().unwrap_or_else(|| panic!("{what}: live transfer without a deadline"));
        assert!(deadline >= self.now, "{what}: deadline in the past");
        assert!(deadline - self.now <= self.longest, "{what}: deadline {:?} ahead, longest timeout {:?}", deadline - self.now, self.longest);
    }

    /// Feeds a packet; `allowance` for the DATA it may cause is derived from its effect.
    fn feed(&mut self, pkt: Packet<'_>, what: &str) -> Vec<Vec<u8>> {
        let before = self.s.acked_blocks();
        let awaiting = self.awaiting_oack_ack;
        self.s.handle(self.now, &pkt);
        let after = self.s.acked_blocks();
        assert!(after >= before, "{what}: acked went back from {before} to {after}");
        assert!(after <= self.total());
        let mut progress = after > before;
        if awaiting && pkt == Packet::Ack(0) && !self.ended {
            self.awaiting_oack_ack = false;
            progress = true;
        }
        if progress {
            self.timeouts_without_progress = 0;
            self.answered = true;
            self.last_progress = self.now;
        }
        self.acked = after;
        self.rx_have = self.rx_have.max(after);
        if after == self.total() {
            assert_eq!(self.s.outcome(), Some(&Outcome::Complete), "{what}: last block acknowledged but not complete");
        }
        self.drain(if progress { Allowance::Window } else { Allowance::None }, what)
    }

    fn fire(&mut self, what: &str) {
        let before = self.s.stats().timeouts;
        let deadline = self.s.poll_timeout();
        self.s.handle_timeout(self.now);
        let fired = self.s.stats().timeouts > before;
        assert_eq!(fired, !self.ended && deadline.is_some_and(|d| self.now >= d), "{what}: timer fired at the wrong time");
        if fired {
            self.timeouts_without_progress += 1;
            let limit = if self.answered { self.max_retries } else { self.max_retries.min(self.initial_retries) };
            let floor_passed = !self.answered || self.now - self.last_progress >= self.give_up_after;
            let should_end = self.timeouts_without_progress > limit && floor_passed;
            assert_eq!(
                matches!(self.s.outcome(), Some(Outcome::TimedOut { .. })),
                should_end,
                "{what}: {} timeouts without progress (retries {limit}, answered {}), {:?} since the last progress (floor {:?})",
                self.timeouts_without_progress,
                self.answered,
                self.now - self.last_progress,
                self.give_up_after
            );
        }
        self.drain(if fired { Allowance::Window } else { Allowance::None }, what);
    }

    fn pump(&mut self, rounds: u32) {
        for _ in 0..rounds {
            if self.ended || self.pump_budget == 0 {
                return;
            }
            self.pump_budget -= 1;
            if self.awaiting_oack_ack {
                self.feed(Packet::Ack(0), "pump ACK 0");
            } else if self.rx_have > self.acked {
                let b = Block(self.rx_have).wire();
                self.feed(Packet::Ack(b), "pump ACK");
            } else if let Some(d) = self.s.poll_timeout() {
                self.now = d;
                self.fire("pump timeout");
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let big = input.big % 64 == 63;
    let blksize = if big { 8 + input.blksize % 64 } else { 8 + input.blksize % 1500 };
    let len = if big {
        // Up to ~70000 blocks at blksize 8..71: past the 16-bit rollover.
        520_000 + (input.big as usize / 64) * 256 + input.len as usize % 256
    } else {
        input.len as usize % 8192
    };
    let data = content(len, input.seed, input.netascii);
    let wire = if input.netascii { tftpcast_proto::netascii::encode(&data) } else { data.clone() };
    let windowsize = (input.windowsize % 65) as u16; // 0 is treated as 1
    let timeout = Duration::from_millis(1 + input.timeout_ms as u64 % 10_000);
    let max_timeout = timeout.max(Duration::from_millis(input.max_timeout_ms as u64 % 20_000));
    let adaptive = input.adaptive.map(|(a, b)| {
        let min = Duration::from_millis(1 + a as u64 % 1000).min(timeout);
        (min, min.max(Duration::from_millis(b as u64 % 20_000)))
    });
    let max_retries = 1 + input.max_retries as u32 % 10;
    let initial_retries = input.initial_retries as u32 % 11;
    // Bounded in timeouts at max_timeout, so the silent tail below stays short.
    let give_up_after = if input.give_up < 64 { Duration::ZERO } else { Duration::from_millis(input.give_up as u64 * 100).min(max_timeout * 200) };
    let cfg = SenderConfig { blksize, windowsize, timeout, max_timeout, max_retries, initial_retries, give_up_after, adaptive };
    let t0 = Instant::now();
    let source = if input.netascii { Source::netascii(Bytes::from(data)) } else { Source::octet(Bytes::from(data)) };
    assert_eq!(source.wire_len(), wire.len() as u64);
    let oack = input.oack.then(|| Packet::Oack(vec![("blksize".into(), blksize.to_string())]).to_vec());
    let s = Sender::new(t0, cfg, source, oack.clone());
    let mut longest = timeout.max(max_timeout);
    if let Some((a, b)) = adaptive {
        longest = longest.max(a).max(b);
    }
    let mut h = Harness {
        s,
        now: t0,
        wire,
        blksize,
        windowsize: windowsize.max(1),
        awaiting_oack_ack: oack.is_some(),
        oack,
        longest,
        max_retries,
        initial_retries,
        give_up_after,
        max_timeout,
        answered: false,
        last_progress: t0,
        acked: 0,
        rx_have: 0,
        timeouts_without_progress: 0,
        packets: 0,
        bytes: 0,
        pump_budget: 300_000,
        ended: false,
    };
    assert_eq!(h.s.total_blocks(), h.total());
    let first = h.drain(Allowance::Window, "start");
    if h.oack.is_some() {
        assert_eq!(first.len(), 1, "the OACK must go out first, alone");
    }

    for op in input.ops.iter().take(2000) {
        let what = format!("{op:?}");
        match *op {
            Op::Ack(b) => {
                h.feed(Packet::Ack(b), &what);
            }
            Op::AckRel(k) => {
                let b = Block(h.acked).wire().wrapping_add(k as i16 as u16);
                h.feed(Packet::Ack(b), &what);
            }
            Op::Error(code) => {
                let was_ended = h.ended;
                let c = h.feed(Packet::Error { code: ErrorCode::from_code(code), message: "fuzz".into() }, &what);
                assert!(c.is_empty(), "{what}: a client ERROR was answered");
                assert!(h.s.is_done(), "{what}: a client ERROR did not end the transfer");
                if !was_ended {
                    assert!(matches!(h.s.outcome(), Some(Outcome::PeerError { .. })));
                }
            }
            Op::Data(b) => {
                let was_ended = h.ended;
                let c = h.feed(Packet::Data { block: b, data: b"fuzz" }, &what);
                if was_ended {
                    assert!(c.is_empty(), "{what}: answered after the end");
                } else {
                    assert_eq!(c.len(), 1, "{what}: a client DATA must get exactly one ERROR");
                    assert!(matches!(decode(&c[0]), Ok(Packet::Error { code: ErrorCode::IllegalOperation, .. })));
                    assert!(h.s.is_done());
                }
            }
            Op::Oack => {
                let c = h.feed(Packet::Oack(vec![("blksize".into(), "512".into())]), &what);
                assert!(c.is_empty(), "{what}: answered");
            }
            Op::Request => {
                let r = Request { filename: b"x".to_vec(), mode: Mode::Octet, options: vec![] };
                let c = h.feed(Packet::Rrq(r), &what);
                assert!(c.is_empty(), "{what}: answered");
            }
            Op::Advance(ms) => {
                h.now += Duration::from_millis(ms as u64);
                h.fire(&what);
            }
            Op::Timeout => {
                if let Some(d) = h.s.poll_timeout() {
                    h.now = d;
                }
                h.fire(&what);
            }
            Op::Pump(n) => h.pump(n as u32),
            Op::SetWindow(w) => {
                h.s.set_window(w);
                assert!(h.s.window() >= 1 && h.s.window() <= h.windowsize, "{what}: window {} outside 1..={}", h.s.window(), h.windowsize);
                h.drain(Allowance::Window, &what);
            }
            Op::SetTimeout(ms) => {
                let t = Duration::from_millis(1 + ms as u64 % 10_000);
                h.longest = h.longest.max(t);
                h.s.set_timeout(t);
                h.drain(Allowance::None, &what);
            }
        }
    }

    if input.finish_well && !h.ended {
        h.pump_budget = u32::MAX;
        let bound = 3 * h.total() + 2 * (h.max_retries as u64 + 2) + 10;
        h.pump(bound as u32);
        assert!(h.ended, "a well-behaved receiver could not finish the transfer in {bound} rounds");
        assert_eq!(h.s.outcome(), Some(&Outcome::Complete), "well-behaved receiver, outcome {:?}", h.s.outcome());
    } else {
        // Silent client: the transfer must give up by itself after the retries and the floor;
        // past 17 doublings from >= 1 ms every timeout waits at least max_timeout.
        let floor = (h.give_up_after.as_nanos() / h.max_timeout.as_nanos().max(1)) as u32;
        let bound = h.max_retries + 1 + 17 + floor + 1;
        for _ in 0..=bound {
            if h.ended {
                break;
            }
            let d = h.s.poll_timeout().expect("live transfer without a deadline");
            h.now = d;
            h.fire("silent client");
        }
        assert!(h.ended, "transfer to a silent client did not end after {bound} timeouts");
    }
});
