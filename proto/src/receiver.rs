//! The unicast receiver: one download (a read request) from the client's side, as a value
//! fed packets and instants.
//!
//! It mirrors [`crate::transfer::Sender`]: input arrives through [`Receiver::handle`] (or
//! [`Receiver::handle_datagram`], which keeps DATA payloads zero-copy) and
//! [`Receiver::handle_timeout`]; output is pulled with [`Receiver::poll_transmit`] (datagrams
//! for the server) and [`Receiver::take_data`] (file contents, in order, in local form) until
//! both return `None`; [`Receiver::poll_timeout`] says when to call `handle_timeout` next.
//! No socket, no clock: the caller supplies `now`.
//!
//! # Contract with the I/O layer
//!
//! The receiver is address-agnostic. The first datagram, the RRQ, goes to the server's
//! well-known address; the server answers from a transfer ID (TID) of its own, usually
//! another port. The I/O layer locks onto the source address of the first valid reply (and
//! may refuse a first reply from another host), sends every later datagram there, feeds the
//! receiver only what comes from there, and answers a datagram from any other source with
//! ERROR 5 (Unknown transfer ID) to that source without disturbing the transfer (RFC 1350,
//! section 4).
//!
//! # Protocol
//!
//! - The RRQ carries only the options configured; an OACK is accepted when it carries only
//!   options that were asked for, each at most once, with a value within what was asked
//!   (`blksize` 8..=asked, `windowsize` 1..=asked, `timeout` 1..=asked, any `tsize`).
//!   Anything else is refused with ERROR 8 and ends the transfer (RFC 2347). An accepted
//!   OACK is answered with ACK 0; options missing from it keep their RFC 1350 defaults.
//! - DATA as first reply means the server ignored the options: 512-byte blocks, window 1.
//! - Blocks are counted as a 64-bit index (1 = first block), so block numbers roll over from
//!   65535 to 0 without limiting the file size; a 16-bit number is placed relative to the next
//!   expected block by serial-number arithmetic (RFC 1982).
//! - Only in-order blocks are kept (the sender resends everything after the last ACK, so
//!   buffering out-of-order blocks would buy nothing). An ACK goes out every `windowsize`
//!   in-order blocks and for the final block (RFC 7440; lock-step when the window is 1).
//! - A block beyond a gap is answered at once with an ACK of the last in-order block (the
//!   sender restarts after it), once until the transfer progresses or the timer fires.
//! - A duplicate is answered only when it is the block we acknowledged last: then the server
//!   is resending the window that ACK closed, so the ACK was lost. Any other duplicate comes
//!   from a window the server restarted while later blocks were still in flight (say, our
//!   timeout ACK crossed its retransmission); acknowledging it would make the server restart
//!   once more, and each restart breeds the next duplicates. So a whole window of
//!   duplicates costs at most one ACK (the receiver's half of the Sorcerer's Apprentice rule,
//!   RFC 1123 4.2.3.1), and in lock-step every repeated block is acknowledged again.
//! - The final block is the first one shorter than the block size: it is acknowledged and the
//!   transfer is complete. A retransmission of it arriving later (our final ACK was lost) is
//!   acknowledged again, so a caller that lingers ("dallies") lets the server finish cleanly.
//! - On timeout the last packet is sent again (the RRQ, or the ACK of the last in-order
//!   block); the timeout doubles on each consecutive timeout up to `max_timeout`, and after
//!   `max_retries` timeouts without progress the transfer ends as timed out. A duplicate
//!   does not count as progress.
//! - An ERROR from the server ends the transfer; ERRORs are never answered.
//!
//! # The server's side of a write request
//!
//! [`crate::upload::accept`] builds the same machine for the receiving end of a WRQ: the
//! first datagram is the server's answer (OACK, or ACK 0 without options) instead of an RRQ,
//! resent on timeout like the RRQ (at most `initial_retries` times before the client's first
//! DATA, since a WRQ may come from a spoofed address). The final block is not acknowledged
//! at once: the machine waits in [`Receiver::awaiting_commit`] until the caller has made the
//! file durable and calls [`Receiver::commit`] (which sends the final ACK) or
//! [`Receiver::abort`] (which sends an ERROR instead), so a client is never told a file was
//! stored that was not. Received bytes beyond `max_bytes` end the upload with ERROR 3.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::block::Block;
use crate::netascii;
use crate::oack::{self, Asked, Multicast, Tsize};
use crate::packet::{self, DecodeError, ErrorCode, Mode, Packet, Request, DEFAULT_BLKSIZE, MAX_BLKSIZE, MIN_BLKSIZE};
use crate::retry::Retry;
use crate::transmit::{Datagram, Transmit};

/// Parameters of one download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Remote file name, sent as is.
    pub filename: Vec<u8>,
    /// `Octet` delivers the bytes as sent; `Netascii` (and the obsolete `Mail`) delivers
    /// them decoded to local text (LF line ends).
    pub mode: Mode,
    /// `blksize` to ask for (RFC 2348); clamped to 8..=65464.
    pub blksize: Option<u16>,
    /// `windowsize` to ask for (RFC 7440); 0 is treated as 1.
    pub windowsize: Option<u16>,
    /// Local retransmission timeout. Replaced by the server's answer when a `timeout`
    /// option is agreed.
    pub timeout: Duration,
    /// Cap of the exponential backoff (never below `timeout`).
    pub max_timeout: Duration,
    /// `timeout` option to ask for, in seconds (RFC 2349); `Some(0)` asks for nothing.
    pub request_timeout_option: Option<u8>,
    /// Ask for the transfer size (RFC 2349, `tsize 0`).
    pub tsize: bool,
    /// Put the RFC 2090 `multicast` option in the request. This machine does not receive
    /// multicast: an OACK granting it is refused with ERROR 8 (the
    /// [`crate::mcast_receiver::McastReceiver`] does, and sets it itself).
    pub multicast: bool,
    /// Consecutive timeouts without progress before giving up.
    pub max_retries: u32,
}

impl ReceiverConfig {
    /// A plain RFC 1350 request: no options, 1 s timeout backing off to 4 s, 5 retries.
    pub fn new(filename: impl Into<Vec<u8>>, mode: Mode) -> Self {
        ReceiverConfig {
            filename: filename.into(),
            mode,
            blksize: None,
            windowsize: None,
            timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(4),
            request_timeout_option: None,
            tsize: false,
            multicast: false,
            max_retries: 5,
        }
    }

    /// The configuration with its option values in range.
    pub(crate) fn normalized(mut self) -> Self {
        self.blksize = self.blksize.map(|b| b.clamp(MIN_BLKSIZE, MAX_BLKSIZE));
        self.windowsize = self.windowsize.map(|w| w.max(1));
        self.request_timeout_option = self.request_timeout_option.filter(|&t| t > 0);
        self
    }

    /// The encoded RRQ with the configured options.
    pub(crate) fn rrq(&self) -> Vec<u8> {
        let mut options = Vec::new();
        if let Some(b) = self.blksize {
            options.push(("blksize".to_string(), b.to_string()));
        }
        if let Some(w) = self.windowsize {
            options.push(("windowsize".to_string(), w.to_string()));
        }
        if let Some(t) = self.request_timeout_option {
            options.push(("timeout".to_string(), t.to_string()));
        }
        if self.tsize {
            options.push(("tsize".to_string(), "0".to_string()));
        }
        if self.multicast {
            options.push(("multicast".to_string(), String::new()));
        }
        Packet::Rrq(Request { filename: self.filename.clone(), mode: self.mode, options }).to_vec()
    }

    /// What the RRQ asked for, to check the OACK against; `multicast` says what to make of
    /// a granted `multicast` option.
    pub(crate) fn asked(&self, multicast: Multicast) -> Asked {
        Asked {
            blksize: self.blksize,
            windowsize: self.windowsize,
            timeout: self.request_timeout_option,
            tsize: if self.tsize { Tsize::Query } else { Tsize::NotAsked },
            multicast: if self.multicast { multicast } else { Multicast::NotAsked },
        }
    }

    /// The retransmission timer a download starts with.
    pub(crate) fn retry(&self, now: Instant) -> Retry {
        Retry::new(now, self.timeout, self.max_timeout)
    }
}

/// How a download ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverOutcome {
    /// The final block was received and acknowledged.
    Complete,
    /// No progress within the allowed number of retransmissions.
    TimedOut { retries: u32 },
    /// The server sent an ERROR packet.
    PeerError { code: ErrorCode, message: String },
    /// We ended the transfer and told the server with an ERROR `code`: an OACK we could not
    /// accept (code 8), a packet that breaks the protocol (code 4), or [`Receiver::abort`].
    Aborted { code: ErrorCode, reason: String },
}

impl ReceiverOutcome {
    pub fn is_success(&self) -> bool {
        matches!(self, ReceiverOutcome::Complete)
    }
}

/// Counters kept for logs and progress displays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Every packet handed to the receiver.
    pub packets_received: u64,
    /// In-order DATA blocks accepted.
    pub blocks: u64,
    /// Payload bytes of those blocks, as on the wire (netascii still encoded).
    pub bytes_received: u64,
    /// Bytes handed out by `take_data` or waiting there (after netascii decoding).
    pub bytes_delivered: u64,
    /// DATA blocks received again.
    pub duplicates: u64,
    /// DATA blocks beyond a gap (discarded; the server will send them again).
    pub out_of_order: u64,
    /// ACKs queued, retransmissions included.
    pub acks_sent: u64,
    /// RRQs and ACKs sent again because the timer fired.
    pub retransmits: u64,
    pub timeouts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// RRQ sent (server side: OACK or ACK 0 sent); waiting for the first reply.
    Requesting,
    Receiving,
    /// Server side: the final block arrived; its ACK waits for [`Receiver::commit`].
    Committing,
    Done,
}

/// What the server's side of a write request adds (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerSide {
    /// Retransmissions of the first answer before the client has sent any DATA.
    pub initial_retries: u32,
    /// Largest number of bytes stored (after netascii decoding); beyond, ERROR 3.
    pub max_bytes: Option<u64>,
}

/// The payload of a DATA packet as a slice of its datagram, when the datagram is at hand
/// (the payload is the datagram minus its 4-byte header).
pub(crate) fn payload_of(datagram: Option<&Bytes>, data: &[u8]) -> Option<Bytes> {
    datagram.filter(|d| d.len() == data.len() + 4).map(|d| d.slice(4..))
}

/// One download, from the client's side. See the module documentation.
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    state: State,
    rrq: Vec<u8>,
    blksize: u16,
    windowsize: u16,
    tsize: Option<u64>,
    oack: bool,
    /// Highest block index received in order (0: none).
    received: Block,
    /// Highest block index we acknowledged.
    last_ack: Block,
    /// Whether a duplicate or out-of-order block may trigger an immediate ACK.
    reack_armed: bool,
    decoder: Option<netascii::Decoder>,
    data: VecDeque<Bytes>,
    transmits: VecDeque<Vec<u8>>,
    /// Retransmission timer; its base is the agreed timeout once an OACK set one.
    retry: Retry,
    outcome: Option<ReceiverOutcome>,
    stats: ReceiverStats,
    /// Set when this is the receiving end of a write request.
    server: Option<ServerSide>,
}

impl Receiver {
    /// Starts a download: the RRQ is the first datagram [`Self::poll_transmit`] returns.
    pub fn new(now: Instant, cfg: ReceiverConfig) -> Receiver {
        let cfg = cfg.normalized();
        let rrq = cfg.rrq();
        Receiver {
            state: State::Requesting,
            rrq: rrq.clone(),
            blksize: DEFAULT_BLKSIZE,
            windowsize: 1,
            tsize: None,
            oack: false,
            received: Block(0),
            last_ack: Block(0),
            reack_armed: true,
            decoder: (cfg.mode != Mode::Octet).then(netascii::Decoder::new),
            data: VecDeque::new(),
            transmits: VecDeque::from([rrq]),
            retry: cfg.retry(now),
            outcome: None,
            stats: ReceiverStats::default(),
            server: None,
            cfg,
        }
    }

    /// The receiving end of a write request (see [`crate::upload::accept`]): `answer` is
    /// the first datagram (OACK or ACK 0), the transfer runs with the agreed `blksize`,
    /// `windowsize` and `cfg.timeout`; `cfg`'s option fields are not used.
    pub(crate) fn new_server(now: Instant, cfg: ReceiverConfig, answer: Vec<u8>, blksize: u16, windowsize: u16, side: ServerSide) -> Receiver {
        let oack = matches!(packet::decode(&answer), Ok(Packet::Oack(_)));
        let mut r = Receiver::new(now, cfg);
        r.rrq = answer.clone();
        r.transmits = VecDeque::from([answer]);
        r.blksize = blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE);
        r.windowsize = windowsize.max(1);
        r.oack = oack;
        r.server = Some(side);
        r
    }

    /// Server side: the final block has arrived and every byte has been handed out by
    /// [`Self::take_data`]; make the file durable, then call [`Self::commit`] or
    /// [`Self::abort`].
    pub fn awaiting_commit(&self) -> bool {
        self.state == State::Committing && self.data.is_empty()
    }

    /// Server side: the file is stored; acknowledge the final block and complete.
    pub fn commit(&mut self) {
        if self.state == State::Committing {
            self.send_ack();
            self.finish(ReceiverOutcome::Complete);
        }
    }

    /// The encoded RRQ (as first sent and as resent on timeout).
    pub fn request(&self) -> &[u8] {
        &self.rrq
    }

    pub fn stats(&self) -> ReceiverStats {
        self.stats
    }

    pub fn outcome(&self) -> Option<&ReceiverOutcome> {
        self.outcome.as_ref()
    }

    /// True when the transfer has ended and every datagram and every byte of data has been
    /// pulled out.
    pub fn is_done(&self) -> bool {
        self.state == State::Done && self.transmits.is_empty() && self.data.is_empty()
    }

    /// The server's answer to `tsize`, when it gave one.
    pub fn tsize(&self) -> Option<u64> {
        self.tsize
    }

    /// Whether the server answered with an OACK.
    pub fn options_acknowledged(&self) -> bool {
        self.oack
    }

    /// Block size in use (512 until an OACK says otherwise).
    pub fn blksize(&self) -> u16 {
        self.blksize
    }

    /// Window size in use (1 until an OACK says otherwise).
    pub fn windowsize(&self) -> u16 {
        self.windowsize
    }

    /// Base retransmission timeout in use.
    pub fn timeout(&self) -> Duration {
        self.retry.base()
    }

    /// In-order payload bytes received so far, as on the wire.
    pub fn bytes_received(&self) -> u64 {
        self.stats.bytes_received
    }

    /// Blocks received in order so far.
    pub fn blocks_received(&self) -> u64 {
        self.received.0
    }

    /// The next piece of the file, in order and in local form. Call until it returns `None`
    /// after every `handle*` call. Octet payloads fed through [`Self::handle_datagram`] are
    /// slices of the datagram, not copies.
    #[must_use]
    pub fn take_data(&mut self) -> Option<Bytes> {
        self.data.pop_front()
    }

    /// The next datagram to send to the server, if any. Call until it returns `None`.
    /// (`now` is not needed here; every machine is polled the same way.)
    #[must_use]
    pub fn poll_transmit(&mut self, _now: Instant) -> Option<Transmit> {
        self.pop_transmit()
    }

    pub(crate) fn pop_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front().map(|d| Transmit::to_peer(Datagram::Control(d)))
    }

    /// When [`Self::handle_timeout`] must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.retry.deadline()
    }

    /// Ends the transfer from the local side (say, the disk is full), telling the server
    /// with an ERROR `code`. Datagrams not yet sent are dropped in favour of the ERROR.
    pub fn abort(&mut self, code: ErrorCode, message: &str) {
        if self.state == State::Done {
            return;
        }
        self.transmits.clear();
        self.transmits.push_back(packet::error_packet(code, message));
        self.finish(ReceiverOutcome::Aborted { code, reason: message.to_string() });
    }

    /// Decodes and feeds one datagram from the server's TID. A DATA payload is delivered as
    /// a slice of `datagram` (no copy in octet mode). A datagram that is not TFTP is
    /// ignored and its decode error returned for the caller to log.
    pub fn handle_datagram(&mut self, now: Instant, datagram: Bytes) -> Result<(), DecodeError> {
        let pkt = packet::decode(&datagram)?;
        self.on_packet(now, &pkt, Some(&datagram));
        Ok(())
    }

    /// Feeds a decoded packet from the server's TID. A DATA payload is copied if kept.
    pub fn handle(&mut self, now: Instant, pkt: &Packet<'_>) {
        self.on_packet(now, pkt, None);
    }

    fn on_packet(&mut self, now: Instant, pkt: &Packet<'_>, datagram: Option<&Bytes>) {
        self.stats.packets_received += 1;
        match pkt {
            Packet::Data { block, data } => self.on_data(now, *block, data, payload_of(datagram, data)),
            Packet::Oack(opts) => self.on_oack(now, opts),
            Packet::Error { code, message } => {
                if self.state != State::Done {
                    // RFC 1350: an ERROR is never acknowledged or answered.
                    self.transmits.clear();
                    self.finish(ReceiverOutcome::PeerError { code: *code, message: message.clone() });
                }
            }
            Packet::Ack(_) => {
                if self.state != State::Done {
                    let why = if self.server.is_some() { "ACK sent to a write transfer" } else { "ACK sent to a read transfer" };
                    self.abort(ErrorCode::IllegalOperation, why);
                }
            }
            Packet::Rrq(_) | Packet::Wrq(_) => {} // a request from the server's TID: stray, ignore
        }
    }

    fn on_oack(&mut self, now: Instant, opts: &[(String, String)]) {
        if self.server.is_some() {
            return; // an OACK means nothing coming from the client
        }
        match self.state {
            State::Requesting => match oack::check(&self.cfg.asked(Multicast::Refused), opts) {
                Ok(a) => {
                    self.oack = true;
                    self.blksize = a.blksize;
                    self.windowsize = a.windowsize;
                    self.tsize = a.tsize;
                    if let Some(t) = a.timeout {
                        self.retry.set_base(Duration::from_secs(t as u64));
                    }
                    self.state = State::Receiving;
                    self.send_ack();
                    self.retry.progress(now);
                }
                Err(reason) => self.abort(ErrorCode::OptionRefused, &reason),
            },
            // The server did not see our ACK 0 and sent its OACK again.
            State::Receiving if self.oack && self.received == Block(0) => self.send_ack(),
            _ => {}
        }
    }

    fn on_data(&mut self, now: Instant, block: u16, data: &[u8], owned: Option<Bytes>) {
        match self.state {
            State::Done => {
                // Our final ACK was lost and the server sent the final block again.
                if self.outcome == Some(ReceiverOutcome::Complete) && block == self.received.wire() {
                    self.stats.duplicates += 1;
                    self.send_ack();
                }
                return;
            }
            // DATA as first reply: the server ignored our options (or we sent none).
            State::Requesting => self.state = State::Receiving,
            State::Receiving => {}
            // The client resends the final block while the file is being stored: the ACK
            // follows the commit.
            State::Committing => {
                self.stats.duplicates += 1;
                return;
            }
        }
        if data.len() > self.blksize as usize {
            let why =
                format!("DATA block {block} carries {} bytes, more than the block size {}", data.len(), self.blksize);
            self.abort(ErrorCode::IllegalOperation, &why);
            return;
        }
        let expected = Block(self.received.0 + 1);
        match expected.near(block) {
            Some(b) if b == expected => self.accept(now, data, owned),
            Some(b) if b > expected => {
                // A gap: something before this block was lost. Say where to restart, once.
                self.stats.out_of_order += 1;
                if self.reack_armed {
                    self.reack_armed = false;
                    self.send_ack();
                }
            }
            b => {
                self.stats.duplicates += 1;
                // Only the block we last acknowledged coming again says that ACK was lost.
                // Any other duplicate comes from a window the server restarted while more
                // was in flight: acknowledging it would make it restart again, and again.
                if b == Some(self.last_ack) {
                    self.send_ack();
                }
            }
        }
    }

    /// The next block in order: deliver it, and acknowledge it when the window is full or
    /// it is the last.
    fn accept(&mut self, now: Instant, data: &[u8], owned: Option<Bytes>) {
        self.received.0 += 1;
        self.stats.blocks += 1;
        self.stats.bytes_received += data.len() as u64;
        let last = data.len() < self.blksize as usize;
        let chunk = match self.decoder.as_mut() {
            Some(dec) => {
                let mut out = Vec::with_capacity(data.len() + 1);
                dec.decode(data, &mut out);
                if last {
                    dec.finish(&mut out);
                }
                Bytes::from(out)
            }
            None => owned.unwrap_or_else(|| Bytes::copy_from_slice(data)),
        };
        if let Some(max) = self.server.and_then(|s| s.max_bytes) {
            if self.stats.bytes_delivered + chunk.len() as u64 > max {
                self.abort(ErrorCode::DiskFull, ErrorCode::DiskFull.default_message());
                return;
            }
        }
        if !chunk.is_empty() {
            self.stats.bytes_delivered += chunk.len() as u64;
            self.data.push_back(chunk);
        }
        self.reack_armed = true;
        if last && self.server.is_some() {
            self.state = State::Committing;
            self.retry.stop();
            return;
        }
        if last {
            self.send_ack();
            self.finish(ReceiverOutcome::Complete);
            return;
        }
        if self.received.0 - self.last_ack.0 >= self.windowsize as u64 {
            self.send_ack();
        }
        self.retry.progress(now);
    }

    /// Queues an ACK of the last in-order block.
    fn send_ack(&mut self) {
        self.transmits.push_back(packet::ack(self.received.wire()).to_vec());
        self.last_ack = self.received;
        self.stats.acks_sent += 1;
    }

    fn finish(&mut self, outcome: ReceiverOutcome) {
        self.state = State::Done;
        self.retry.stop();
        self.outcome = Some(outcome);
    }

    /// Call when `poll_timeout`'s instant has passed (calling earlier does nothing).
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.retry.due(now) || matches!(self.state, State::Done | State::Committing) {
            return;
        }
        self.stats.timeouts += 1;
        let limit = match (self.server, self.state) {
            (Some(s), State::Requesting) => self.cfg.max_retries.min(s.initial_retries),
            _ => self.cfg.max_retries,
        };
        if self.retry.retries() >= limit {
            self.finish(ReceiverOutcome::TimedOut { retries: self.retry.retries() });
            return;
        }
        self.retry.back_off(now);
        self.stats.retransmits += 1;
        match self.state {
            State::Requesting => self.transmits.push_back(self.rrq.clone()),
            State::Receiving => self.send_ack(),
            State::Done | State::Committing => {}
        }
        self.reack_armed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::Loss;
    use crate::options::{self, Limits};
    use crate::packet::decode;
    use crate::transfer::{Outcome, Sender, SenderConfig, Source};
    use proptest::prelude::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    fn cfg() -> ReceiverConfig {
        ReceiverConfig::new("f", Mode::Octet)
    }

    fn drain(r: &mut Receiver) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| r.poll_transmit(Instant::now()).map(|t| t.datagram.into_vec())).collect()
    }

    fn data(r: &mut Receiver) -> Vec<u8> {
        let mut v = Vec::new();
        while let Some(b) = r.take_data() {
            v.extend_from_slice(&b);
        }
        v
    }

    fn acks(t: &[Vec<u8>]) -> Vec<u16> {
        t.iter()
            .map(|d| match decode(d) {
                Ok(Packet::Ack(b)) => b,
                other => panic!("not an ACK: {other:?}"),
            })
            .collect()
    }

    fn dat(block: u16, payload: &[u8]) -> Vec<u8> {
        Packet::Data { block, data: payload }.to_vec()
    }

    fn feed(r: &mut Receiver, now: Instant, datagram: Vec<u8>) {
        r.handle_datagram(now, Bytes::from(datagram)).unwrap();
    }

    fn oack(list: &[(&str, &str)]) -> Vec<u8> {
        Packet::Oack(list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()).to_vec()
    }

    /// A receiver whose request asked for `opts` and whose server agreed to all of them
    /// (RRQ and ACK 0 already drained).
    fn agreed(now: Instant, opts: &[(&str, &str)]) -> Receiver {
        let mut c = cfg();
        for (name, value) in opts {
            match *name {
                "blksize" => c.blksize = value.parse().ok(),
                "windowsize" => c.windowsize = value.parse().ok(),
                other => panic!("agreed() does not ask for {other}"),
            }
        }
        let mut r = Receiver::new(now, c);
        drain(&mut r);
        feed(&mut r, now, oack(opts));
        drain(&mut r);
        r
    }

    /// Feeds full 512-byte blocks `blocks`.
    fn full_blocks(r: &mut Receiver, now: Instant, blocks: std::ops::RangeInclusive<u16>) {
        for b in blocks {
            feed(r, now, dat(b, &[0; 512]));
        }
    }

    fn error_code(d: &[u8]) -> ErrorCode {
        match decode(d) {
            Ok(Packet::Error { code, .. }) => code,
            other => panic!("not an ERROR: {other:?}"),
        }
    }

    #[test]
    fn rrq_carries_the_requested_options() {
        let now = Instant::now();
        let mut c = ReceiverConfig::new("boot/pxelinux.0", Mode::Netascii);
        c.blksize = Some(1428);
        c.windowsize = Some(8);
        c.request_timeout_option = Some(3);
        c.tsize = true;
        let mut r = Receiver::new(now, c);
        let t = drain(&mut r);
        assert_eq!(t.len(), 1);
        let Ok(Packet::Rrq(req)) = decode(&t[0]) else { panic!("not an RRQ") };
        assert_eq!(req.filename, b"boot/pxelinux.0");
        assert_eq!(req.mode, Mode::Netascii);
        let names: Vec<_> = req.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(names, ["blksize=1428", "windowsize=8", "timeout=3", "tsize=0"]);

        let mut r = Receiver::new(now, cfg());
        let Ok(Packet::Rrq(req)) = decode(&drain(&mut r)[0]) else { panic!("not an RRQ") };
        assert!(req.options.is_empty());

        let mut c = cfg();
        c.multicast = true;
        c.blksize = Some(1);
        let r = Receiver::new(now, c);
        let Ok(Packet::Rrq(req)) = decode(r.request()) else { panic!("not an RRQ") };
        assert_eq!(req.options, vec![("blksize".into(), "8".into()), ("multicast".into(), String::new())]);
    }

    #[test]
    fn lock_step_without_options() {
        let now = Instant::now();
        let mut r = Receiver::new(now, cfg());
        drain(&mut r);
        feed(&mut r, now, dat(1, &[1; 512]));
        assert_eq!(acks(&drain(&mut r)), [1]);
        feed(&mut r, now, dat(2, &[2; 100]));
        assert_eq!(acks(&drain(&mut r)), [2]);
        let mut want = vec![1u8; 512];
        want.extend([2u8; 100]);
        assert_eq!(data(&mut r), want);
        assert_eq!(r.outcome(), Some(&ReceiverOutcome::Complete));
        assert!(r.is_done());
        assert!(!r.options_acknowledged());
        assert_eq!((r.bytes_received(), r.stats().bytes_delivered), (612, 612));
    }

    #[test]
    fn octet_payloads_are_slices_of_the_datagram() {
        let now = Instant::now();
        let mut r = Receiver::new(now, cfg());
        let d = Bytes::from(dat(1, b"hello"));
        r.handle_datagram(now, d.clone()).unwrap();
        let got = r.take_data().unwrap();
        assert_eq!(&got[..], b"hello");
        assert_eq!(got.as_ptr(), d[4..].as_ptr());
    }

    #[test]
    fn empty_file_and_exact_multiple() {
        let now = Instant::now();
        let mut r = Receiver::new(now, cfg());
        feed(&mut r, now, dat(1, b""));
        assert_eq!(acks(&drain(&mut r)[1..]), [1]);
        assert!(r.take_data().is_none());
        assert!(r.is_done());

        let mut r = Receiver::new(now, cfg());
        drain(&mut r);
        feed(&mut r, now, dat(1, &[0; 512]));
        feed(&mut r, now, dat(2, b""));
        assert_eq!(acks(&drain(&mut r)), [1, 2]);
        assert_eq!(data(&mut r).len(), 512);
        assert!(r.is_done());
    }

    #[test]
    fn oack_is_accepted_and_answered_with_ack_zero() {
        let now = Instant::now();
        let mut c = cfg();
        c.blksize = Some(1428);
        c.windowsize = Some(8);
        c.request_timeout_option = Some(3);
        c.tsize = true;
        let mut r = Receiver::new(now, c);
        drain(&mut r);
        feed(&mut r, now, oack(&[("tsize", "5000"), ("BLKSIZE", "1024"), ("windowsize", "4")]));
        assert_eq!(acks(&drain(&mut r)), [0]);
        assert_eq!((r.blksize(), r.windowsize(), r.tsize()), (1024, 4, Some(5000)));
        // timeout was not acknowledged: the local one stays.
        assert_eq!(r.timeout(), Duration::from_secs(1));
        assert!(r.options_acknowledged());
        // The server lost our ACK 0 and repeats its OACK.
        feed(&mut r, now, oack(&[("tsize", "5000"), ("blksize", "1024"), ("windowsize", "4")]));
        assert_eq!(acks(&drain(&mut r)), [0]);
        for b in 1..=4u16 {
            feed(&mut r, now, dat(b, &[b as u8; 1024]));
        }
        assert_eq!(acks(&drain(&mut r)), [4]);
        feed(&mut r, now, dat(5, &[5; 904]));
        assert_eq!(acks(&drain(&mut r)), [5]);
        assert_eq!(data(&mut r).len(), 5000);
        assert!(r.is_done());
    }

    #[test]
    fn agreed_timeout_replaces_the_local_one() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.request_timeout_option = Some(3);
        let mut r = Receiver::new(t0, c);
        drain(&mut r);
        feed(&mut r, t0, oack(&[("timeout", "3")]));
        assert_eq!(r.timeout(), Duration::from_secs(3));
        assert_eq!(r.poll_timeout(), Some(t0 + Duration::from_secs(3)));
    }

    #[test]
    fn bad_oacks_are_refused_with_error_8() {
        let now = Instant::now();
        let cases: &[&[(&str, &str)]] = &[
            &[("blksize", "2000")],
            &[("blksize", "7")],
            &[("blksize", "x")],
            &[("windowsize", "9")],
            &[("windowsize", "0")],
            &[("timeout", "4")],
            &[("foo", "1")],
            &[("blksize", "512"), ("blksize", "512")],
            &[("multicast", "224.1.1.1,1758,1")],
        ];
        for case in cases {
            let mut c = cfg();
            c.blksize = Some(1428);
            c.windowsize = Some(8);
            c.request_timeout_option = Some(3);
            let mut r = Receiver::new(now, c);
            drain(&mut r);
            feed(&mut r, now, oack(case));
            let t = drain(&mut r);
            assert_eq!(t.len(), 1, "{case:?}");
            assert_eq!(error_code(&t[0]), ErrorCode::OptionRefused, "{case:?}");
            assert!(
                matches!(r.outcome(), Some(ReceiverOutcome::Aborted { code: ErrorCode::OptionRefused, .. })),
                "{case:?}"
            );
            assert!(r.is_done());
        }
        // An OACK to a request without options is refused as well.
        let mut r = Receiver::new(now, cfg());
        drain(&mut r);
        feed(&mut r, now, oack(&[("tsize", "1")]));
        assert_eq!(error_code(&drain(&mut r)[0]), ErrorCode::OptionRefused);
        // And multicast is refused even when asked for: not implemented.
        let mut c = cfg();
        c.multicast = true;
        let mut r = Receiver::new(now, c);
        drain(&mut r);
        feed(&mut r, now, oack(&[("multicast", "224.1.1.1,1758,1")]));
        assert_eq!(error_code(&drain(&mut r)[0]), ErrorCode::OptionRefused);
    }

    #[test]
    fn server_ignoring_options_means_rfc1350_defaults() {
        let now = Instant::now();
        let mut c = cfg();
        c.blksize = Some(1428);
        c.windowsize = Some(8);
        c.tsize = true;
        let mut r = Receiver::new(now, c);
        drain(&mut r);
        feed(&mut r, now, dat(1, &[1; 512]));
        assert_eq!(acks(&drain(&mut r)), [1]);
        assert_eq!((r.blksize(), r.windowsize(), r.tsize()), (512, 1, None));
        // A block larger than 512 now breaks the protocol.
        feed(&mut r, now, dat(2, &[1; 600]));
        assert_eq!(error_code(&drain(&mut r)[0]), ErrorCode::IllegalOperation);
        assert!(matches!(r.outcome(), Some(ReceiverOutcome::Aborted { code: ErrorCode::IllegalOperation, .. })));
    }

    #[test]
    fn only_a_repeat_of_the_last_acked_block_is_reacked() {
        let now = Instant::now();
        let mut r = agreed(now, &[("windowsize", "4")]);
        full_blocks(&mut r, now, 1..=4);
        assert_eq!(acks(&drain(&mut r)), [4]);
        // The ACK was lost; the server resends the window: one ACK answers it all.
        full_blocks(&mut r, now, 1..=4);
        assert_eq!(acks(&drain(&mut r)), [4]);
        assert_eq!(r.stats().duplicates, 4);
        feed(&mut r, now, dat(5, &[0; 512]));
        feed(&mut r, now, dat(3, &[0; 512]));
        assert!(drain(&mut r).is_empty());
        assert_eq!(data(&mut r).len(), 5 * 512);
    }

    #[test]
    fn duplicates_from_a_restarted_window_are_not_acked() {
        // Both timers fire at once: our timeout ACK crosses the server's retransmission.
        // Acknowledging the duplicates would restart the server's window again and again.
        let t0 = Instant::now();
        let mut r = agreed(t0, &[("windowsize", "4")]);
        for b in 1..=3u16 {
            feed(&mut r, t0, dat(b, &[0; 512])); // 4 is lost
        }
        assert!(drain(&mut r).is_empty());
        let t1 = r.poll_timeout().unwrap();
        r.handle_timeout(t1);
        assert_eq!(acks(&drain(&mut r)), [3]);
        // The server's timeout resends 1..=4: only the repeat of 3 (acknowledged last) is answered.
        full_blocks(&mut r, t1, 1..=4);
        assert_eq!(acks(&drain(&mut r)), [3]);
        // Our ACK 3 makes it restart at 4: window 4..=7, with 4 a duplicate by now.
        full_blocks(&mut r, t1, 4..=7);
        assert_eq!(acks(&drain(&mut r)), [7]);
    }

    #[test]
    fn gap_is_acked_at_once_and_window_realigns() {
        let now = Instant::now();
        let mut r = agreed(now, &[("windowsize", "4")]);
        feed(&mut r, now, dat(1, &[0; 512]));
        feed(&mut r, now, dat(3, &[0; 512])); // 2 lost
        assert_eq!(acks(&drain(&mut r)), [1]);
        feed(&mut r, now, dat(4, &[0; 512]));
        assert!(drain(&mut r).is_empty());
        assert_eq!(r.stats().out_of_order, 2);
        // The server restarts after ACK 1: the window is 2..=5.
        full_blocks(&mut r, now, 2..=5);
        assert_eq!(acks(&drain(&mut r)), [5]);
    }

    #[test]
    fn block_numbers_roll_over() {
        let now = Instant::now();
        let mut r = agreed(now, &[("blksize", "8")]);
        for i in 1..=70_000u64 {
            feed(&mut r, now, dat(Block(i).wire(), &i.to_be_bytes()));
            assert_eq!(acks(&drain(&mut r)), [Block(i).wire()]);
            // A stale block from one rollover ago is a duplicate, not new data.
            if i == 65_540 {
                feed(&mut r, now, dat(65_535, &[9; 8]));
                assert!(drain(&mut r).is_empty());
                assert_eq!(r.stats().duplicates, 1);
                // The block just acknowledged, repeated, is answered.
                feed(&mut r, now, dat(Block(i).wire(), &i.to_be_bytes()));
                assert_eq!(acks(&drain(&mut r)), [Block(i).wire()]);
            }
        }
        feed(&mut r, now, dat(Block(70_001).wire(), b""));
        assert_eq!(acks(&drain(&mut r)), [Block(70_001).wire()]);
        let got = data(&mut r);
        let want: Vec<u8> = (1..=70_000u64).flat_map(|i| i.to_be_bytes()).collect();
        assert_eq!(got, want);
        assert_eq!(r.blocks_received(), 70_001);
    }

    #[test]
    fn netascii_is_decoded_across_blocks() {
        let now = Instant::now();
        let mut c = ReceiverConfig::new("f", Mode::Netascii);
        c.blksize = Some(8);
        let mut r = Receiver::new(now, c);
        feed(&mut r, now, oack(&[("blksize", "8")]));
        // "abcdefg\nx\ry\rz\r" encodes to "abcdefg\r" "\nx\r\0y\r\0z" "\r\0": pairs straddle blocks.
        feed(&mut r, now, dat(1, b"abcdefg\r"));
        feed(&mut r, now, dat(2, b"\nx\r\0y\r\0z"));
        feed(&mut r, now, dat(3, b"\r\0"));
        assert_eq!(data(&mut r), b"abcdefg\nx\ry\rz\r");
        assert_eq!(r.outcome(), Some(&ReceiverOutcome::Complete));
        assert_eq!(r.bytes_received(), 18);
    }

    #[test]
    fn server_error_ends_silently() {
        let now = Instant::now();
        let mut r = Receiver::new(now, cfg());
        drain(&mut r);
        feed(&mut r, now, Packet::Error { code: ErrorCode::FileNotFound, message: "no such file: f".into() }.to_vec());
        assert!(drain(&mut r).is_empty());
        assert_eq!(
            r.outcome(),
            Some(&ReceiverOutcome::PeerError { code: ErrorCode::FileNotFound, message: "no such file: f".into() })
        );
        assert!(r.is_done());
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn ack_from_the_server_is_illegal() {
        let now = Instant::now();
        let mut r = Receiver::new(now, cfg());
        drain(&mut r);
        feed(&mut r, now, packet::ack(0).to_vec());
        assert_eq!(error_code(&drain(&mut r)[0]), ErrorCode::IllegalOperation);
    }

    #[test]
    fn abort_replaces_pending_datagrams() {
        let now = Instant::now();
        let mut r = Receiver::new(now, cfg());
        feed(&mut r, now, dat(1, &[0; 512]));
        r.abort(ErrorCode::DiskFull, "disk full");
        let t = drain(&mut r);
        assert_eq!(t.len(), 1);
        assert_eq!(error_code(&t[0]), ErrorCode::DiskFull);
        assert_eq!(data(&mut r).len(), 512);
        assert!(r.is_done());
    }

    #[test]
    fn timeouts_resend_rrq_then_last_ack_then_give_up() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.max_retries = 3;
        let mut r = Receiver::new(t0, c.clone());
        let rrq = drain(&mut r);
        // Calling early does nothing.
        r.handle_timeout(t0);
        assert!(drain(&mut r).is_empty());
        let mut now = t0;
        while let Some(d) = r.poll_timeout() {
            now = d;
            r.handle_timeout(now);
            let t = drain(&mut r);
            if r.is_done() {
                assert!(t.is_empty());
                break;
            }
            assert_eq!(t, rrq);
        }
        assert_eq!(r.outcome(), Some(&ReceiverOutcome::TimedOut { retries: 3 }));
        // 1 + 2 + 4 + 4 seconds: doubling, capped at max_timeout.
        assert_eq!(now - t0, Duration::from_secs(11));
        assert_eq!(r.stats().retransmits, 3);

        let mut r = Receiver::new(t0, c);
        drain(&mut r);
        feed(&mut r, t0, dat(1, &[0; 512]));
        drain(&mut r);
        let deadline = r.poll_timeout().unwrap();
        assert_eq!(deadline, t0 + Duration::from_secs(1));
        r.handle_timeout(deadline);
        assert_eq!(acks(&drain(&mut r)), [1]);
        // Duplicates are not progress: the backoff goes on.
        feed(&mut r, deadline, dat(1, &[0; 512]));
        assert_eq!(acks(&drain(&mut r)), [1]);
        assert_eq!(r.poll_timeout(), Some(deadline + Duration::from_secs(2)));
        // New data is: the timeout is back to its base.
        let t2 = deadline + Duration::from_millis(10);
        feed(&mut r, t2, dat(2, &[0; 512]));
        assert_eq!(r.poll_timeout(), Some(t2 + Duration::from_secs(1)));
    }

    #[test]
    fn final_block_is_reacked_after_completion() {
        let now = Instant::now();
        let mut r = Receiver::new(now, cfg());
        drain(&mut r);
        feed(&mut r, now, dat(1, b"x"));
        assert_eq!(acks(&drain(&mut r)), [1]);
        data(&mut r);
        assert!(r.is_done());
        feed(&mut r, now, dat(1, b"x"));
        assert_eq!(acks(&drain(&mut r)), [1]);
        assert!(r.take_data().is_none());
        feed(&mut r, now, packet::error_packet(ErrorCode::NotDefined, "late"));
        assert_eq!(r.outcome(), Some(&ReceiverOutcome::Complete));
    }

    // ---- Loopback: Receiver <-> Sender through a seeded lossy link, virtual clock ----

    /// The shared seeded loss model, seeded per test.
    fn rng(seed: u64) -> Loss {
        Loss::new(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// Impairments of one direction of the link, in percent.
    #[derive(Debug, Clone, Copy, Default)]
    struct Netem {
        loss: u32,
        duplicate: u32,
        /// Share of packets delayed by a few extra link delays, so later ones overtake them.
        reorder: u32,
    }

    /// One direction: datagrams in flight, delivered in (time, sequence) order.
    struct Path {
        netem: Netem,
        delay: Duration,
        rng: Loss,
        seq: u64,
        in_flight: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    }

    impl Path {
        fn new(netem: Netem, seed: u64) -> Path {
            Path { netem, delay: Duration::from_millis(5), rng: rng(seed), seq: 0, in_flight: BinaryHeap::new() }
        }

        fn send(&mut self, now: Instant, d: Vec<u8>) {
            if self.rng.pct(self.netem.loss as u64) {
                return;
            }
            let copies = if self.rng.pct(self.netem.duplicate as u64) { 2 } else { 1 };
            for _ in 0..copies {
                let mut at = now + self.delay;
                if self.rng.pct(self.netem.reorder as u64) {
                    at += self.delay * (1 + (self.rng.next() % 4) as u32);
                }
                self.seq += 1;
                self.in_flight.push(Reverse((at, self.seq, d.clone())));
            }
        }

        fn next_at(&self) -> Option<Instant> {
            self.in_flight.peek().map(|Reverse((at, _, _))| *at)
        }

        fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
            if self.next_at()? <= now {
                self.in_flight.pop().map(|Reverse((_, _, d))| d)
            } else {
                None
            }
        }
    }

    /// The server half: turns the first RRQ into a `Sender`, like the session actor would.
    struct Server {
        file: Bytes,
        limits: Limits,
        /// Option names the server pretends not to know (tftpd-hpa ignores windowsize).
        ignores: &'static [&'static str],
        sender: Option<Sender>,
        /// The sender's adaptive timeout bounds (None: fixed timeout).
        adaptive: Option<(Duration, Duration)>,
    }

    impl Server {
        fn on_datagram(&mut self, now: Instant, d: &[u8]) {
            match decode(d) {
                Ok(Packet::Rrq(req)) => {
                    if self.sender.is_some() {
                        return; // a retransmitted RRQ; the transfer is already running
                    }
                    let opts: Vec<_> =
                        req.options.into_iter().filter(|(k, _)| !self.ignores.contains(&k.as_str())).collect();
                    let asked = options::parse(&opts).expect("receiver sent invalid options");
                    let source = match req.mode {
                        Mode::Octet => Source::octet(self.file.clone()),
                        _ => Source::netascii(self.file.clone()),
                    };
                    let n = options::negotiate(&asked, &self.limits, Some(source.wire_len()), false);
                    let oack = (!n.oack.is_empty()).then(|| Packet::Oack(n.oack.clone()).to_vec());
                    let cfg = SenderConfig {
                        blksize: n.blksize,
                        windowsize: n.windowsize,
                        timeout: n.timeout,
                        max_timeout: n.timeout * 4,
                        max_retries: 50,
                        initial_retries: 50,
                        give_up_after: Duration::ZERO,
                        adaptive: self.adaptive,
                    };
                    self.sender = Some(Sender::new(now, cfg, source, oack));
                }
                Ok(p) => {
                    if let Some(s) = self.sender.as_mut() {
                        s.handle(now, &p);
                    }
                }
                Err(e) => panic!("receiver sent garbage: {e}"),
            }
        }
    }

    /// How the server half behaves.
    #[derive(Debug, Clone, Copy, Default)]
    struct ServerKind {
        ignores: &'static [&'static str],
        adaptive: Option<(Duration, Duration)>,
    }

    const PLAIN: ServerKind = ServerKind { ignores: &[], adaptive: None };

    struct Run {
        got: Vec<u8>,
        receiver: Receiver,
        sender_outcome: Option<Outcome>,
        elapsed: Duration,
        steps: u64,
    }

    /// Runs a download until both sides are done or nothing is left to happen; panics with
    /// "livelock" after `max_steps` events instead of hanging.
    fn drive_bounded(
        rcfg: ReceiverConfig,
        file: &[u8],
        server: ServerKind,
        c2s: Netem,
        s2c: Netem,
        seed: u64,
        max_steps: u64,
    ) -> Run {
        let t0 = Instant::now();
        let mut now = t0;
        let mut rx = Receiver::new(now, rcfg);
        let mut srv = Server {
            file: Bytes::copy_from_slice(file),
            limits: Limits::default(),
            ignores: server.ignores,
            sender: None,
            adaptive: server.adaptive,
        };
        let mut up = Path::new(c2s, seed);
        let mut down = Path::new(s2c, seed.wrapping_mul(31).wrapping_add(7));
        let mut got = Vec::new();
        let mut buf = Vec::new();
        let mut steps = 0u64;
        loop {
            steps += 1;
            assert!(steps <= max_steps, "livelock: {steps} steps, {:?} of virtual time, {:?}", now - t0, rx.stats());
            while let Some(t) = rx.poll_transmit(now) {
                up.send(now, t.datagram.into_vec());
            }
            while let Some(b) = rx.take_data() {
                got.extend_from_slice(&b);
            }
            if let Some(s) = srv.sender.as_mut() {
                while let Some(t) = s.poll_transmit(now) {
                    t.datagram.write_to(&mut buf);
                    down.send(now, buf.clone());
                }
            }
            let sender_done = match &srv.sender {
                Some(s) => s.is_done(),
                None => true,
            };
            let rx_ok = rx.outcome().is_some_and(|o| o.is_success());
            // A failed receiver stops at once; a complete one lingers while the sender may
            // still retransmit the final block.
            if rx.is_done() && (!rx_ok || sender_done) {
                break;
            }
            let next =
                [up.next_at(), down.next_at(), rx.poll_timeout(), srv.sender.as_ref().and_then(|s| s.poll_timeout())]
                    .into_iter()
                    .flatten()
                    .min();
            let Some(next) = next else { break };
            now = now.max(next);
            while let Some(d) = down.pop_due(now) {
                let _ = rx.handle_datagram(now, Bytes::from(d));
            }
            while let Some(d) = up.pop_due(now) {
                srv.on_datagram(now, &d);
            }
            rx.handle_timeout(now);
            if let Some(s) = srv.sender.as_mut() {
                s.handle_timeout(now);
            }
        }
        let sender_outcome = srv.sender.as_ref().and_then(|s| s.outcome().cloned());
        Run { got, receiver: rx, sender_outcome, elapsed: now - t0, steps }
    }

    fn rcfg(mode: Mode, blksize: Option<u16>, windowsize: Option<u16>) -> ReceiverConfig {
        let mut c = ReceiverConfig::new("file", mode);
        c.blksize = blksize;
        c.windowsize = windowsize;
        c.tsize = true;
        c.max_retries = 50;
        c
    }

    fn step_budget(len: usize, blksize: u16) -> u64 {
        200 * (len as u64 / blksize as u64 + 1) + 100_000
    }

    fn assert_delivered(run: &Run, file: &[u8]) {
        assert_eq!(run.receiver.outcome(), Some(&ReceiverOutcome::Complete));
        assert_eq!(run.sender_outcome, Some(Outcome::Complete));
        assert!(
            run.got == file,
            "delivered {} bytes, want {} (first difference at {:?})",
            run.got.len(),
            file.len(),
            run.got.iter().zip(file).position(|(a, b)| a != b)
        );
        assert_eq!(run.receiver.stats().bytes_delivered, file.len() as u64);
    }

    fn text(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = rng(seed);
        (0..len)
            .map(|_| match rng.next() % 16 {
                0 => b'\n',
                1 => b'\r',
                2 => 0,
                _ => b'a' + (rng.next() % 26) as u8,
            })
            .collect()
    }

    const LOSSY: Netem = Netem { loss: 10, duplicate: 5, reorder: 10 };

    #[test]
    fn loopback_clean_link() {
        for (len, blk, win) in [
            (0, None, None),
            (1, None, None),
            (511, None, None),
            (512, None, None),
            (513, None, None),
            (100_000, Some(1428), Some(8)),
            (100_000, Some(1024), None),
        ] {
            let file = text(len, len as u64);
            for mode in [Mode::Octet, Mode::Netascii] {
                let run = drive_bounded(
                    rcfg(mode, blk, win),
                    &file,
                    PLAIN,
                    Netem::default(),
                    Netem::default(),
                    1,
                    step_budget(len, 8),
                );
                assert_delivered(&run, &file);
                assert_eq!(run.receiver.stats().retransmits, 0);
                let wire = if mode == Mode::Octet { len as u64 } else { crate::netascii::encoded_len(&file) };
                assert_eq!(run.receiver.tsize(), Some(wire));
            }
        }
    }

    #[test]
    fn loopback_lossy_link_octet_and_netascii() {
        for seed in 0..8u64 {
            let file = text(50_000 + seed as usize * 777, seed);
            for (mode, blk, win) in [
                (Mode::Octet, Some(512), Some(1)),
                (Mode::Octet, Some(1428), Some(8)),
                (Mode::Netascii, None, None),
                (Mode::Netascii, Some(700), Some(16)),
            ] {
                let run =
                    drive_bounded(rcfg(mode, blk, win), &file, PLAIN, LOSSY, LOSSY, seed, step_budget(file.len(), 8));
                assert_delivered(&run, &file);
            }
        }
    }

    #[test]
    fn loopback_server_ignoring_windowsize_or_everything() {
        let file = text(20_000, 3);
        let run = drive_bounded(
            rcfg(Mode::Octet, Some(1428), Some(8)),
            &file,
            ServerKind { ignores: &["windowsize"], adaptive: None },
            LOSSY,
            LOSSY,
            3,
            1_000_000,
        );
        assert_delivered(&run, &file);
        assert_eq!((run.receiver.blksize(), run.receiver.windowsize()), (1428, 1));
        let all = &["windowsize", "blksize", "tsize", "timeout"];
        let run = drive_bounded(
            rcfg(Mode::Octet, Some(1428), Some(8)),
            &file,
            ServerKind { ignores: all, adaptive: None },
            LOSSY,
            LOSSY,
            3,
            1_000_000,
        );
        assert_delivered(&run, &file);
        assert!(!run.receiver.options_acknowledged());
        assert_eq!(run.receiver.tsize(), None);
    }

    #[test]
    fn loopback_past_65535_blocks() {
        let file: Vec<u8> = (0..(70_000u32 * 8 + 3)).map(|i| (i % 251) as u8).collect();
        let budget = step_budget(file.len(), 8);
        for win in [1u16, 16] {
            let run = drive_bounded(
                rcfg(Mode::Octet, Some(8), Some(win)),
                &file,
                PLAIN,
                Netem::default(),
                Netem::default(),
                1,
                budget,
            );
            assert_delivered(&run, &file);
            assert_eq!(run.receiver.blocks_received(), 70_001);
            let lossy = Netem { loss: 2, duplicate: 2, reorder: 2 };
            let run = drive_bounded(rcfg(Mode::Octet, Some(8), Some(win)), &file, PLAIN, lossy, lossy, 9, budget);
            assert_delivered(&run, &file);
        }
        let text = text(560_000, 5);
        let run = drive_bounded(
            rcfg(Mode::Netascii, Some(8), Some(4)),
            &text,
            PLAIN,
            Netem::default(),
            Netem::default(),
            1,
            budget,
        );
        assert!(run.receiver.blocks_received() > 65_536);
        assert_delivered(&run, &text);
    }

    #[test]
    fn loopback_window_recovery_stays_efficient() {
        let file = text(1_000_000, 1);
        let clean = drive_bounded(
            rcfg(Mode::Octet, Some(1428), Some(32)),
            &file,
            PLAIN,
            Netem::default(),
            Netem::default(),
            1,
            1_000_000,
        );
        assert_delivered(&clean, &file);
        // 23 windows of 32 blocks, 10 ms round trips, plus the request and option exchange.
        assert_eq!(clean.elapsed, Duration::from_millis(235));
        assert_eq!(clean.receiver.stats().acks_sent, 23);
        let lossy = Netem { loss: 1, ..Netem::default() };
        let run = drive_bounded(rcfg(Mode::Octet, Some(1428), Some(32)), &file, PLAIN, lossy, lossy, 1, 1_000_000);
        assert_delivered(&run, &file);
        // Losses cost a window or a timeout each; they must not start a cascade of restarts
        // (which showed as ten times as many duplicates and twice the time).
        let st = run.receiver.stats();
        assert!(st.duplicates < 100 && run.elapsed < Duration::from_secs(2), "{:?} {st:?}", run.elapsed);
    }

    #[test]
    fn loopback_dead_link_times_out_instead_of_hanging() {
        let dead = Netem { loss: 100, ..Netem::default() };
        let mut c = rcfg(Mode::Octet, None, None);
        c.max_retries = 4;
        let run = drive_bounded(c, b"abc", PLAIN, dead, Netem::default(), 1, 10_000);
        assert_eq!(run.receiver.outcome(), Some(&ReceiverOutcome::TimedOut { retries: 4 }));
        assert_eq!(run.elapsed, Duration::from_secs(1 + 2 + 4 + 4 + 4));
        // Replies lost instead: the sender exists, the receiver still gives up.
        let mut c = rcfg(Mode::Octet, None, None);
        c.max_retries = 4;
        let run = drive_bounded(c, b"abc", PLAIN, Netem::default(), dead, 1, 10_000);
        assert!(matches!(run.receiver.outcome(), Some(ReceiverOutcome::TimedOut { .. })));
    }

    #[test]
    #[should_panic(expected = "livelock")]
    fn drive_bounded_reports_livelock() {
        let file = vec![0u8; 100_000];
        drive_bounded(rcfg(Mode::Octet, None, None), &file, PLAIN, Netem::default(), Netem::default(), 1, 50);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn loopback_delivers_byte_exact(
            file in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), Just(0u8), any::<u8>()], 0..12_000),
            blk in prop_oneof![Just(None), (8u16..1500).prop_map(Some)],
            win in prop_oneof![Just(None), (1u16..12).prop_map(Some)],
            loss in prop_oneof![Just(0u32), 1u32..30],
            duplicate in 0u32..15,
            reorder in 0u32..25,
            netascii: bool,
            ignore_window: bool,
            adaptive: bool,
            seed: u64,
        ) {
            let mode = if netascii { Mode::Netascii } else { Mode::Octet };
            let netem = Netem { loss, duplicate, reorder };
            let ignores: &'static [&'static str] = if ignore_window { &["windowsize"] } else { &[] };
            let adaptive = adaptive.then_some((Duration::from_millis(10), Duration::from_secs(4)));
            let server = ServerKind { ignores, adaptive };
            let budget = step_budget(file.len(), 8);
            let run = drive_bounded(rcfg(mode, blk, win), &file, server, netem, netem, seed, budget);
            prop_assert_eq!(run.receiver.outcome(), Some(&ReceiverOutcome::Complete));
            prop_assert_eq!(&run.got, &file);
            prop_assert!(run.steps < budget);
        }

        #[test]
        fn arbitrary_packets_never_panic(
            packets in proptest::collection::vec(prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..80),
                (0u16..6, proptest::collection::vec(any::<u8>(), 0..70)).prop_map(|(b, d)| Packet::Data { block: b, data: &d }.to_vec()),
                Just(packet::error_packet(ErrorCode::NotDefined, "stop")),
            ], 0..40),
            blk in 8u16..64,
            win in 1u16..8,
        ) {
            let now = Instant::now();
            let mut c = rcfg(Mode::Netascii, Some(blk), Some(win));
            c.request_timeout_option = Some(2);
            let mut r = Receiver::new(now, c);
            // Blocks that arrived as DATA (0: the OACK's ACK), payload bytes fed and delivered.
            let mut blocks = std::collections::BTreeSet::from([0u16]);
            let (mut fed, mut delivered) = (0usize, 0usize);
            let check = |r: &mut Receiver, blocks: &std::collections::BTreeSet<u16>, after_error: bool| -> Result<(), TestCaseError> {
                while let Some(t) = r.poll_transmit(now) {
                    let t = t.datagram.into_vec();
                    prop_assert!(!after_error, "an ERROR was answered with {:?}", decode(&t));
                    match decode(&t) {
                        Ok(Packet::Ack(n)) => prop_assert!(blocks.contains(&n), "ACK {} for a block never received", n),
                        Ok(Packet::Rrq(_) | Packet::Error { .. }) => {}
                        other => prop_assert!(false, "the receiver sent {:?}", other),
                    }
                }
                Ok(())
            };
            check(&mut r, &blocks, false)?; // the request
            for p in packets {
                let decoded = decode(&p).ok();
                if let Some(Packet::Data { block, data }) = &decoded {
                    blocks.insert(*block);
                    fed += data.len();
                }
                let is_error = matches!(decoded, Some(Packet::Error { .. }));
                let _ = r.handle_datagram(now, Bytes::from(p));
                check(&mut r, &blocks, is_error)?;
                while let Some(d) = r.take_data() {
                    delivered += d.len();
                }
            }
            r.handle_timeout(now + Duration::from_secs(10));
            check(&mut r, &blocks, false)?;
            while let Some(d) = r.take_data() {
                delivered += d.len();
            }
            // Netascii decoding only ever shrinks what arrived.
            prop_assert!(delivered <= fed, "{} bytes delivered from {} received", delivered, fed);
        }
    }
}
