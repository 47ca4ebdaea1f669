//! The unicast sender: one read transfer as a value fed packets and instants.
//!
//! Input comes through [`Sender::handle`] (a packet from the client) and
//! [`Sender::handle_timeout`]; output is pulled with [`Sender::poll_transmit`] until it
//! returns `None`, and [`Sender::poll_timeout`] says when to call `handle_timeout` next.
//! No socket, no clock: the caller supplies `now`.
//!
//! Blocks are counted internally as a 64-bit index (1 = first DATA block) so files of any
//! size work; on the wire the index is truncated to 16 bits, i.e. the block number rolls over
//! from 65535 to 0. An ACK's 16-bit number is mapped back to the unique index inside the
//! window in flight, so rollover cannot confuse old and new blocks.
//!
//! Retransmission follows RFC 1123 4.2.3.1: only our own timer retransmits. A duplicate ACK
//! never triggers a retransmission, which is what keeps the Sorcerer's Apprentice syndrome
//! (RFC 1785) from doubling the traffic. With a window (RFC 7440), an ACK for a block in the
//! middle of the window means the rest was lost: the next window starts right after it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::block::Block;
use crate::netascii;
use crate::packet::{self, ErrorCode, Packet};
use crate::retry::Retry;
use crate::rto::Rto;
use crate::transmit::{Datagram, Transmit};

/// Where the blocks of a transfer come from.
#[derive(Debug)]
pub enum Source {
    /// The file as is: block `i` is a slice of the shared contents (no copy).
    Octet(Bytes),
    /// The file converted to netascii on the fly; blocks still in flight are kept so they
    /// can be sent again.
    Netascii(NetasciiBlocks),
}

#[derive(Debug)]
pub struct NetasciiBlocks {
    input: Bytes,
    encoder: netascii::Encoder,
    cache: VecDeque<Bytes>,
    cache_first: u64,
    last: Option<u64>,
}

impl Source {
    pub fn octet(data: Bytes) -> Source {
        Source::Octet(data)
    }

    pub fn netascii(data: Bytes) -> Source {
        Source::Netascii(NetasciiBlocks {
            input: data,
            encoder: netascii::Encoder::new(),
            cache: VecDeque::new(),
            cache_first: 1,
            last: None,
        })
    }

    /// Bytes on the wire for the whole transfer (the `tsize` to report).
    pub fn wire_len(&self) -> u64 {
        match self {
            Source::Octet(d) => d.len() as u64,
            Source::Netascii(n) => netascii::encoded_len(&n.input),
        }
    }

    /// Index of the final block, which is the first one shorter than `blksize`.
    pub fn last_block(&self, blksize: u16) -> u64 {
        self.wire_len() / blksize as u64 + 1
    }

    /// Payload of block `index` (1-based). Netascii blocks must be asked for at or after the
    /// oldest block not yet released.
    fn block(&mut self, index: u64, blksize: u16) -> Bytes {
        let blk = blksize as u64;
        match self {
            Source::Octet(d) => {
                let len = d.len() as u64;
                let start = ((index - 1) * blk).min(len);
                let end = (start + blk).min(len);
                d.slice(start as usize..end as usize)
            }
            Source::Netascii(n) => {
                while n.cache_first + n.cache.len() as u64 <= index && n.last.is_none() {
                    let mut buf = Vec::with_capacity(blksize as usize);
                    n.encoder.fill(&n.input, &mut buf, blksize as usize);
                    let produced = n.cache_first + n.cache.len() as u64;
                    if buf.len() < blksize as usize {
                        n.last = Some(produced);
                    }
                    n.cache.push_back(Bytes::from(buf));
                }
                let i = index.checked_sub(n.cache_first).expect("netascii block released too early");
                n.cache.get(i as usize).cloned().unwrap_or_default()
            }
        }
    }

    /// Lets go of blocks up to and including `acked`: they will not be sent again.
    fn release_through(&mut self, acked: u64) {
        if let Source::Netascii(n) = self {
            while n.cache_first <= acked && !n.cache.is_empty() {
                n.cache.pop_front();
                n.cache_first += 1;
            }
        }
    }
}

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The final block was acknowledged.
    Complete,
    /// No progress within the allowed number of retransmissions.
    TimedOut { retries: u32 },
    /// The peer sent an ERROR packet.
    PeerError { code: ErrorCode, message: String },
    /// The peer broke the protocol; we answered with an ERROR.
    ProtocolViolation(&'static str),
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Complete)
    }
}

/// Parameters of one sender.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub blksize: u16,
    pub windowsize: u16,
    /// First retransmission timeout; doubles on each consecutive timeout up to `max_timeout`.
    pub timeout: Duration,
    pub max_timeout: Duration,
    /// Consecutive timeouts without progress before giving up.
    pub max_retries: u32,
    /// The same, until the peer has acknowledged anything: a request may come from a spoofed
    /// source or be a stale duplicate, so an unanswered first packet is sent only this many
    /// more times (anti-amplification).
    pub initial_retries: u32,
    /// Once the peer has answered, `max_retries` consecutive timeouts end the transfer only
    /// if this long has also passed since the last progress (zero: no floor). The adaptive
    /// timer can exhaust the retries within a few seconds on a fast path, while clients like
    /// atftp ignore duplicate DATA and re-ACK on their own 1 s timer, so a short burst of lost
    /// ACKs would end a live transfer. The backoff stays capped at `max_timeout`, so the floor
    /// costs at most `give_up_after / max_timeout` more windows, and only to a proven peer.
    pub give_up_after: Duration,
    /// Adapt `timeout` to measured round trips (floor, ceiling). `None` keeps it fixed, as
    /// it must stay when the client negotiated a timeout (RFC 2349).
    pub adaptive: Option<(Duration, Duration)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// An OACK was sent; waiting for ACK 0.
    AwaitOptionAck,
    Sending,
    Done,
}

/// Counters kept for logs and flow control.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderStats {
    pub packets_sent: u64,
    pub bytes_sent: u64,
    /// DATA/OACK packets sent more than once.
    pub retransmits: u64,
    /// Bytes of those packets.
    pub retransmitted_bytes: u64,
    pub timeouts: u64,
    pub duplicate_acks: u64,
    /// ACKs for blocks never sent or long acknowledged: ignored.
    pub stray_acks: u64,
}

/// One read transfer, from the server's side.
#[derive(Debug)]
pub struct Sender {
    cfg: SenderConfig,
    source: Source,
    state: State,
    oack: Option<Vec<u8>>,
    /// Highest block index acknowledged (0: none).
    acked: u64,
    /// Next block index to transmit.
    next: u64,
    /// Highest block index ever transmitted (to tell retransmissions apart).
    high_water: u64,
    last: u64,
    /// Effective window: starts at `cfg.windowsize`; flow control may shrink it.
    window: u16,
    /// Retransmission timer; its base is `cfg.timeout` (adaptive or fixed).
    retry: Retry,
    control: VecDeque<Vec<u8>>,
    outcome: Option<Outcome>,
    stats: SenderStats,
    /// When the oldest unacknowledged block was first sent and whether it was sent again
    /// (Karn's rule: only clean samples measure the round trip).
    rtt_probe: Option<(u64, Instant, bool)>,
    last_rtt: Option<Duration>,
    rto: Option<Rto>,
    /// The peer acknowledged something (ACK 0 of an OACK or a block): its address is real.
    peer_answered: bool,
    /// When the transfer last moved forward (start, ACK 0, a new ACK): `give_up_after` counts
    /// from here.
    last_progress: Instant,
}

impl Sender {
    /// Starts a transfer. With `oack` (the encoded OACK) the sender first waits for ACK 0;
    /// without, block 1 goes out at once.
    pub fn new(now: Instant, cfg: SenderConfig, source: Source, oack: Option<Vec<u8>>) -> Sender {
        let last = source.last_block(cfg.blksize);
        let window = cfg.windowsize.max(1);
        let rto = cfg.adaptive.map(|(min, max)| Rto::new(cfg.timeout, min, max));
        let mut s = Sender {
            rto,
            peer_answered: false,
            retry: Retry::new(now, cfg.timeout, cfg.max_timeout),
            cfg,
            source,
            state: State::Sending,
            oack: None,
            acked: 0,
            next: 1,
            high_water: 0,
            last,
            window,
            control: VecDeque::new(),
            outcome: None,
            stats: SenderStats::default(),
            rtt_probe: None,
            last_rtt: None,
            last_progress: now,
        };
        if let Some(o) = oack {
            s.state = State::AwaitOptionAck;
            s.control.push_back(o.clone());
            s.oack = Some(o);
        }
        s
    }

    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done && self.control.is_empty()
    }

    /// Whether the peer has acknowledged anything yet (before that, the request may have
    /// come from a spoofed source).
    pub fn peer_answered(&self) -> bool {
        self.peer_answered
    }

    /// Highest block acknowledged so far.
    pub fn acked_blocks(&self) -> u64 {
        self.acked
    }

    pub fn total_blocks(&self) -> u64 {
        self.last
    }

    pub fn blksize(&self) -> u16 {
        self.cfg.blksize
    }

    pub fn window(&self) -> u16 {
        self.window
    }

    /// Most recent clean round-trip sample.
    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    /// Flow control: shrink or regrow the window, within what was negotiated.
    pub fn set_window(&mut self, w: u16) {
        self.window = w.clamp(1, self.cfg.windowsize.max(1));
    }

    /// The timeout armed after the next progress (adaptive or fixed).
    pub fn timeout(&self) -> Duration {
        self.cfg.timeout
    }

    /// Flow control: the retransmission timeout for the next arming.
    pub fn set_timeout(&mut self, t: Duration) {
        self.cfg.timeout = t;
        self.retry.set_base(t);
    }

    /// Bytes acknowledged by the peer so far.
    pub fn bytes_acked(&self) -> u64 {
        (self.acked * self.cfg.blksize as u64).min(self.source.wire_len())
    }

    fn finish(&mut self, outcome: Outcome) {
        self.state = State::Done;
        self.retry.stop();
        self.outcome = Some(outcome);
    }

    fn violation(&mut self, code: ErrorCode, why: &'static str) {
        self.control.push_back(packet::error_packet(code, why));
        self.finish(Outcome::ProtocolViolation(why));
    }

    /// Feeds a packet received from the peer's TID.
    pub fn handle(&mut self, now: Instant, pkt: &Packet<'_>) {
        if self.state == State::Done {
            return;
        }
        match pkt {
            Packet::Ack(block) => self.on_ack(now, *block),
            Packet::Error { code, message } => {
                // RFC 1350: an ERROR is never acknowledged or answered.
                self.control.clear();
                self.finish(Outcome::PeerError { code: *code, message: message.clone() });
            }
            Packet::Oack(_) => {} // meaningless towards a server; ignore
            Packet::Data { .. } => self.violation(ErrorCode::IllegalOperation, "DATA sent to a read transfer"),
            Packet::Rrq(_) | Packet::Wrq(_) => {} // a request on the transfer port: stray, ignore
        }
    }

    fn on_ack(&mut self, now: Instant, block: u16) {
        if self.state == State::AwaitOptionAck {
            if block == 0 {
                self.peer_answered = true;
                self.state = State::Sending;
                self.progress(now);
            } else {
                self.stats.stray_acks += 1;
            }
            return;
        }
        let index = Block(self.acked).ahead(block).0;
        if index == self.acked {
            self.stats.duplicate_acks += 1;
            return;
        }
        if index > self.high_water {
            self.stats.stray_acks += 1; // an ACK for a block never sent
            return;
        }
        if let Some((probe, sent_at, clean)) = self.rtt_probe {
            if index >= probe && clean {
                let rtt = now.saturating_duration_since(sent_at);
                self.last_rtt = Some(rtt);
                if let Some(r) = self.rto.as_mut() {
                    r.on_sample(rtt);
                    self.cfg.timeout = r.timeout();
                    self.retry.set_base(r.timeout());
                }
            }
            if index >= probe {
                self.rtt_probe = None;
            }
        }
        self.acked = index;
        self.peer_answered = true;
        self.source.release_through(index);
        if index >= self.last {
            self.finish(Outcome::Complete);
            return;
        }
        if self.next <= index {
            self.next = index + 1;
        } else if index + 1 < self.next && index + 1 <= self.high_water {
            // RFC 7440: the peer acknowledged part of the window; what follows was lost.
            self.next = index + 1;
        }
        self.progress(now);
    }

    fn progress(&mut self, now: Instant) {
        self.last_progress = now;
        self.retry.progress(now);
    }

    /// Call when `poll_timeout`'s instant has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.retry.due(now) || self.state == State::Done {
            return;
        }
        self.stats.timeouts += 1;
        let limit = if self.peer_answered { self.cfg.max_retries } else { self.cfg.max_retries.min(self.cfg.initial_retries) };
        // Before the peer answered, `initial_retries` alone decides (anti-amplification).
        let floor_pending = self.peer_answered && now.saturating_duration_since(self.last_progress) < self.cfg.give_up_after;
        if self.retry.retries() >= limit && !floor_pending {
            self.finish(Outcome::TimedOut { retries: self.retry.retries() });
            return;
        }
        self.retry.back_off(now);
        match self.state {
            State::AwaitOptionAck => {
                if let Some(o) = &self.oack {
                    self.control.push_back(o.clone());
                    self.stats.retransmits += 1;
                }
            }
            State::Sending => {
                self.next = self.acked + 1;
                if let Some(p) = self.rtt_probe.as_mut() {
                    p.2 = false;
                }
            }
            State::Done => {}
        }
    }

    /// When `handle_timeout` must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.retry.deadline()
    }

    /// The next datagram to send, if any. Call until it returns `None`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(c) = self.control.pop_front() {
            self.count(c.len());
            return Some(Transmit::to_peer(Datagram::Control(c)));
        }
        if self.state != State::Sending {
            return None;
        }
        let window_end = (self.acked + self.window as u64).min(self.last);
        if self.next > window_end {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let payload = self.source.block(index, self.cfg.blksize);
        // The timer runs from the last transmission: when pacing spreads a window out, its
        // tail must not be declared lost before it has even left.
        self.retry.arm(now);
        if index <= self.high_water {
            self.stats.retransmits += 1;
            self.stats.retransmitted_bytes += 4 + payload.len() as u64;
        } else {
            self.high_water = index;
            if self.rtt_probe.is_none() {
                self.rtt_probe = Some((index, now, true));
            }
        }
        self.count(4 + payload.len());
        Some(Transmit::to_peer(Datagram::Data { block: Block(index).wire(), payload }))
    }

    fn count(&mut self, len: usize) {
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += len as u64;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::packet::decode;
    use crate::loss::Loss;

    pub(crate) fn cfg(blksize: u16, windowsize: u16) -> SenderConfig {
        SenderConfig {
            blksize,
            windowsize,
            timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(4),
            max_retries: 5,
            initial_retries: 5,
            give_up_after: Duration::ZERO,
            adaptive: None,
        }
    }

    fn drain(s: &mut Sender, now: Instant) -> Vec<Datagram> {
        std::iter::from_fn(|| s.poll_transmit(now).map(|t| t.datagram)).collect()
    }

    fn blocks(t: &[Datagram]) -> Vec<u16> {
        t.iter()
            .filter_map(|t| match t {
                Datagram::Data { block, .. } => Some(*block),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn lock_step_without_options() {
        let now = Instant::now();
        let mut s = Sender::new(now, cfg(512, 1), Source::octet(Bytes::from(vec![7u8; 1000])), None);
        let t = drain(&mut s, now);
        assert_eq!(blocks(&t), vec![1]);
        s.handle(now, &Packet::Ack(1));
        let t = drain(&mut s, now);
        assert_eq!(blocks(&t), vec![2]);
        assert!(matches!(&t[0], Datagram::Data { payload, .. } if payload.len() == 488));
        s.handle(now, &Packet::Ack(2));
        assert_eq!(s.outcome(), Some(&Outcome::Complete));
        assert!(s.is_done());
    }

    #[test]
    fn exact_multiple_ends_with_empty_block() {
        let now = Instant::now();
        let mut s = Sender::new(now, cfg(512, 4), Source::octet(Bytes::from(vec![1u8; 1024])), None);
        let t = drain(&mut s, now);
        assert_eq!(blocks(&t), vec![1, 2, 3]);
        assert!(matches!(&t[2], Datagram::Data { payload, .. } if payload.is_empty()));
        s.handle(now, &Packet::Ack(3));
        assert!(s.is_done());
    }

    #[test]
    fn empty_file_is_one_empty_block() {
        let now = Instant::now();
        let mut s = Sender::new(now, cfg(512, 1), Source::octet(Bytes::new()), None);
        let t = drain(&mut s, now);
        assert_eq!(t, vec![Datagram::Data { block: 1, payload: Bytes::new() }]);
        s.handle(now, &Packet::Ack(1));
        assert!(s.is_done());
    }

    #[test]
    fn oack_waits_for_ack_zero() {
        let now = Instant::now();
        let oack = packet::Packet::Oack(vec![("blksize".into(), "1024".into())]).to_vec();
        let mut s = Sender::new(now, cfg(1024, 1), Source::octet(Bytes::from(vec![0u8; 3000])), Some(oack.clone()));
        assert_eq!(drain(&mut s, now), vec![Datagram::Control(oack)]);
        s.handle(now, &Packet::Ack(5));
        assert!(drain(&mut s, now).is_empty());
        s.handle(now, &Packet::Ack(0));
        assert_eq!(blocks(&drain(&mut s, now)), vec![1]);
    }

    #[test]
    fn duplicate_acks_never_cause_retransmission() {
        // Sorcerer's Apprentice: a delayed DATA makes the client ACK twice; we must not
        // answer each ACK with a DATA, or every later block goes out twice.
        let now = Instant::now();
        let mut s = Sender::new(now, cfg(512, 1), Source::octet(Bytes::from(vec![0u8; 512 * 10])), None);
        let mut sent = drain(&mut s, now).len();
        for b in 1..=11u16 {
            s.handle(now, &Packet::Ack(b));
            s.handle(now, &Packet::Ack(b));
            sent += drain(&mut s, now).len();
        }
        assert!(s.is_done());
        assert_eq!(sent, 11);
        assert_eq!(s.stats().retransmits, 0);
        assert_eq!(s.stats().duplicate_acks, 10);
    }

    #[test]
    fn timeout_resends_window_then_gives_up() {
        let t0 = Instant::now();
        let mut s = Sender::new(t0, cfg(512, 2), Source::octet(Bytes::from(vec![0u8; 5000])), None);
        assert_eq!(blocks(&drain(&mut s, t0)), vec![1, 2]);
        let mut now = t0;
        let mut rounds = 0;
        while let Some(deadline) = s.poll_timeout() {
            assert!(deadline > now);
            now = deadline;
            s.handle_timeout(now);
            let b = blocks(&drain(&mut s, now));
            if s.is_done() {
                assert!(b.is_empty());
                break;
            }
            assert_eq!(b, vec![1, 2]);
            rounds += 1;
        }
        assert_eq!(rounds, 5);
        assert_eq!(s.outcome(), Some(&Outcome::TimedOut { retries: 5 }));
        // Exponential backoff, capped: 1 + 2 + 4 + 4 + 4 + 4 seconds.
        assert_eq!(now - t0, Duration::from_secs(19));
    }

    #[test]
    fn an_unanswered_first_packet_is_retried_only_initial_retries_times() {
        let t0 = Instant::now();
        let mut c = cfg(512, 1);
        c.initial_retries = 2;
        let mut s = Sender::new(t0, c, Source::octet(Bytes::from(vec![0u8; 5000])), None);
        let mut sent = blocks(&drain(&mut s, t0)).len();
        while let Some(now) = s.poll_timeout() {
            s.handle_timeout(now);
            sent += blocks(&drain(&mut s, now)).len();
        }
        assert_eq!(sent, 3, "one packet and two retransmissions");
        assert_eq!(s.outcome(), Some(&Outcome::TimedOut { retries: 2 }));
    }

    /// Drives a silent peer's timeouts to the end; returns the instants of the timeouts that
    /// retransmitted and how long after `from` the transfer ended.
    fn run_silent(s: &mut Sender, from: Instant) -> (Vec<Duration>, Duration) {
        let mut resent = Vec::new();
        let mut now = from;
        while let Some(d) = s.poll_timeout() {
            now = d;
            s.handle_timeout(now);
            if !drain(s, now).is_empty() {
                resent.push(now - from);
            }
        }
        (resent, now - from)
    }

    /// A 5000-byte lock-step transfer with a 100 ms timeout backing off to 2 s, 3 retries
    /// and a 10 s floor.
    fn floor_sender(t0: Instant) -> Sender {
        let mut c = cfg(512, 1);
        c.timeout = Duration::from_millis(100);
        c.max_timeout = Duration::from_secs(2);
        c.max_retries = 3;
        c.give_up_after = Duration::from_secs(10);
        Sender::new(t0, c, Source::octet(Bytes::from(vec![0u8; 5000])), None)
    }

    #[test]
    fn give_up_after_keeps_a_proven_peer_until_the_floor() {
        let t0 = Instant::now();
        let mut s = floor_sender(t0);
        drain(&mut s, t0);
        let t1 = t0 + Duration::from_millis(5);
        s.handle(t1, &Packet::Ack(1));
        assert_eq!(blocks(&drain(&mut s, t1)), vec![2]);
        let (resent, ended) = run_silent(&mut s, t1);
        // 0.1, 0.2, 0.4 s (3 retries, 0.7 s in all) would have ended it at 1.5 s; the floor
        // keeps it at 0.8, 1.6, 2 s... until 10 s after the last progress.
        let ms: Vec<u128> = resent.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![100, 300, 700, 1500, 3100, 5100, 7100, 9100], "retransmissions, ms after the last progress");
        assert_eq!(ended, Duration::from_millis(11_100), "ends at the first timeout past the floor");
        assert_eq!(s.outcome(), Some(&Outcome::TimedOut { retries: 8 }));
        // The backoff stayed capped: no gap longer than max_timeout.
        assert!(resent.windows(2).all(|w| w[1] - w[0] <= Duration::from_secs(2)));
    }

    #[test]
    fn give_up_after_counts_from_the_last_progress() {
        let t0 = Instant::now();
        let mut s = floor_sender(t0);
        drain(&mut s, t0);
        s.handle(t0, &Packet::Ack(1));
        drain(&mut s, t0);
        // Eight seconds of silence, then the client acknowledges block 2: the clock restarts.
        let mut now = t0;
        while now < t0 + Duration::from_secs(8) {
            now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
            drain(&mut s, now);
        }
        assert!(s.outcome().is_none());
        s.handle(now, &Packet::Ack(2));
        assert_eq!(blocks(&drain(&mut s, now)), vec![3]);
        let (_, ended) = run_silent(&mut s, now);
        assert_eq!(ended, Duration::from_millis(11_100));
        // A duplicate ACK is not progress.
        let mut s = Sender::new(t0, s.cfg.clone(), Source::octet(Bytes::from(vec![0u8; 5000])), None);
        drain(&mut s, t0);
        s.handle(t0, &Packet::Ack(1));
        drain(&mut s, t0);
        let t = t0 + Duration::from_secs(9);
        while s.poll_timeout().unwrap() < t {
            let d = s.poll_timeout().unwrap();
            s.handle_timeout(d);
            s.handle(d, &Packet::Ack(1));
            drain(&mut s, d);
        }
        let (_, ended) = run_silent(&mut s, t0);
        assert_eq!(ended, Duration::from_millis(11_100));
    }

    #[test]
    fn give_up_after_does_not_extend_an_unanswered_first_packet() {
        // Anti-amplification: before the peer answered, 1 + initial_retries packets whatever
        // the floor, with and without an OACK.
        for oack in [false, true] {
            let t0 = Instant::now();
            let mut c = cfg(512, 1);
            c.timeout = Duration::from_millis(100);
            c.max_retries = 6;
            c.initial_retries = 3;
            c.give_up_after = Duration::from_secs(60);
            let o = oack.then(|| b"\x00\x06tsize\x005000\x00".to_vec());
            let mut s = Sender::new(t0, c, Source::octet(Bytes::from(vec![0u8; 5000])), o);
            assert_eq!(drain(&mut s, t0).len(), 1);
            let (resent, ended) = run_silent(&mut s, t0);
            assert_eq!(resent.len(), 3, "oack {oack}");
            assert!(ended < Duration::from_secs(2), "oack {oack}: ended after {ended:?}");
            assert_eq!(s.outcome(), Some(&Outcome::TimedOut { retries: 3 }));
        }
    }

    #[test]
    fn give_up_after_zero_keeps_the_retry_count_alone() {
        let t0 = Instant::now();
        let mut c = cfg(512, 1);
        c.timeout = Duration::from_millis(100);
        c.max_retries = 3;
        let mut s = Sender::new(t0, c, Source::octet(Bytes::from(vec![0u8; 5000])), None);
        drain(&mut s, t0);
        s.handle(t0, &Packet::Ack(1));
        drain(&mut s, t0);
        let (resent, ended) = run_silent(&mut s, t0);
        assert_eq!(resent.len(), 3);
        assert_eq!(ended, Duration::from_millis(1500));
    }

    #[test]
    fn partial_window_ack_restarts_after_it() {
        let now = Instant::now();
        let mut s = Sender::new(now, cfg(512, 4), Source::octet(Bytes::from(vec![0u8; 512 * 20])), None);
        assert_eq!(blocks(&drain(&mut s, now)), vec![1, 2, 3, 4]);
        s.handle(now, &Packet::Ack(2));
        assert_eq!(blocks(&drain(&mut s, now)), vec![3, 4, 5, 6]);
        assert_eq!(s.stats().retransmits, 2);
    }

    #[test]
    fn future_ack_is_ignored() {
        let now = Instant::now();
        let mut s = Sender::new(now, cfg(512, 1), Source::octet(Bytes::from(vec![0u8; 5000])), None);
        drain(&mut s, now);
        s.handle(now, &Packet::Ack(7));
        assert_eq!(s.acked_blocks(), 0);
        assert!(drain(&mut s, now).is_empty());
        assert_eq!(s.stats().stray_acks, 1);
    }

    #[test]
    fn peer_error_ends_silently_and_data_is_refused() {
        let now = Instant::now();
        let mut s = Sender::new(now, cfg(512, 1), Source::octet(Bytes::from(vec![0u8; 5000])), None);
        drain(&mut s, now);
        s.handle(now, &Packet::Error { code: ErrorCode::DiskFull, message: "full".into() });
        assert!(drain(&mut s, now).is_empty());
        assert!(s.is_done());

        let mut s = Sender::new(now, cfg(512, 1), Source::octet(Bytes::from(vec![0u8; 5000])), None);
        drain(&mut s, now);
        s.handle(now, &Packet::Data { block: 1, data: b"x" });
        let t = drain(&mut s, now);
        let Datagram::Control(bytes) = &t[0] else { panic!() };
        assert!(matches!(decode(bytes), Ok(Packet::Error { code: ErrorCode::IllegalOperation, .. })));
    }

    /// Runs a whole transfer with a receiver that ACKs every block in order, dropping
    /// `loss_pct` percent of DATA packets (seeded, so failures reproduce), and returns the
    /// reassembled bytes.
    fn run(data: &[u8], blksize: u16, window: u16, loss_pct: u64, netascii: bool) -> Vec<u8> {
        let mut loss = Loss::new(0x9E37_79B9_7F4A_7C15 ^ data.len() as u64);
        let mut lose = move || loss.pct(loss_pct);
        let mut now = Instant::now();
        let src = if netascii { Source::netascii(Bytes::copy_from_slice(data)) } else { Source::octet(Bytes::copy_from_slice(data)) };
        let mut c = cfg(blksize, window);
        // Delivery under loss is the point here, not the give-up rules: at 37% loss the
        // first DATA alone is lost six times in a row now and then.
        c.max_retries = 50;
        c.initial_retries = 50;
        let mut s = Sender::new(now, c, src, None);
        let mut got = Vec::new();
        let mut expected: u64 = 1;
        let mut steps = 0;
        while !s.is_done() {
            steps += 1;
            assert!(steps < 10_000_000, "livelock");
            let mut acks = Vec::new();
            let mut progressed = false;
            while let Some(t) = s.poll_transmit(now) {
                if lose() {
                    continue;
                }
                if let Datagram::Data { block, payload } = t.datagram {
                    if block == Block(expected).wire() {
                        got.extend_from_slice(&payload);
                        expected += 1;
                        progressed = true;
                        if payload.len() < blksize as usize || acks.len() + 1 == window as usize {
                            acks.push(Block(expected - 1).wire());
                        }
                    }
                }
            }
            if progressed && acks.is_empty() {
                acks.push(Block(expected - 1).wire());
            }
            if acks.is_empty() {
                now = s.poll_timeout().unwrap_or(now);
                s.handle_timeout(now);
            }
            for a in acks {
                s.handle(now, &Packet::Ack(a));
            }
        }
        assert_eq!(s.outcome(), Some(&Outcome::Complete));
        got
    }

    #[test]
    fn rollover_past_65535_blocks() {
        let data: Vec<u8> = (0..(70_000u32 * 8 + 3)).map(|i| (i % 251) as u8).collect();
        assert_eq!(run(&data, 8, 1, 0, false), data);
        assert_eq!(run(&data, 8, 16, 0, false), data);
    }

    use proptest::prelude::*;
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn delivers_every_byte_under_loss(data in proptest::collection::vec(any::<u8>(), 0..20_000), blk in 8u16..1500, window in 1u16..12, loss in prop_oneof![Just(0u64), 1u64..40], net: bool) {
            let got = run(&data, blk, window, loss, net);
            if net {
                let mut d = crate::netascii::Decoder::new();
                let mut out = Vec::new();
                d.decode(&got, &mut out);
                d.finish(&mut out);
                prop_assert_eq!(out, data);
            } else {
                prop_assert_eq!(got, data);
            }
        }
    }
}

#[cfg(test)]
mod adaptive_tests {
    use super::*;

    #[test]
    fn adaptive_timeout_follows_round_trips_and_fixed_one_does_not() {
        let t0 = Instant::now();
        let mk = |adaptive| SenderConfig {
            blksize: 512,
            windowsize: 1,
            timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(4),
            max_retries: 5,
            initial_retries: 5,
            give_up_after: Duration::ZERO,
            adaptive,
        };
        for (adaptive, want) in [(Some((Duration::from_millis(100), Duration::from_secs(4))), Duration::from_millis(100)), (None, Duration::from_secs(1))] {
            let mut s = Sender::new(t0, mk(adaptive), Source::octet(Bytes::from(vec![0u8; 512 * 50])), None);
            let mut now = t0;
            for b in 1..=20u16 {
                while s.poll_transmit(now).is_some() {}
                now += Duration::from_micros(200);
                s.handle(now, &Packet::Ack(b));
            }
            assert_eq!(s.timeout(), want);
            while s.poll_transmit(now).is_some() {}
            assert_eq!(s.poll_timeout(), Some(now + want));
        }
    }
}
