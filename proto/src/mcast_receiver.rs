//! RFC 2090 multicast TFTP, client side: one download as a value fed datagrams and instants.
//!
//! The counterpart of [`crate::multicast::Group`]. Like [`crate::receiver::Receiver`] it does
//! no I/O: datagrams go in through [`McastReceiver::handle_datagram`] (with the address they
//! came from and the socket they arrived on) and [`McastReceiver::handle_timeout`]; out come
//! datagrams ([`McastReceiver::poll_transmit`], each saying where it goes), file contents as
//! `(offset, bytes)` pieces ([`McastReceiver::take_block`]) and the next deadline
//! ([`McastReceiver::poll_timeout`]).
//!
//! # Contract with the I/O layer
//!
//! The caller owns two sockets: the **unicast** one, an ephemeral port that sends the request
//! and everything else, and — once [`McastReceiver::group`] names a group — the **group**
//! one, bound to the group's port and joined to the group on the interface that leads to the
//! server. Every datagram from either socket is handed over with its source address; the
//! receiver decides what to keep (the I/O layer does no filtering). When `group()` changes
//! (a new group after a re-request), the caller leaves the old group and joins the new one;
//! it should join before sending what `poll_transmit` returns, so the first DATA after the
//! master's ACK is not missed. Pieces from `take_block` are written at their offsets (blocks
//! arrive in any order); when the download is complete, [`McastReceiver::file_len`] is the
//! file's length. Memory stays bounded: the receiver keeps a bitmap of blocks, not blocks.
//!
//! # Protocol
//!
//! - The request is an octet-mode RRQ with `multicast` (empty value) and the configured
//!   options; it goes to the server's listening address ([`Dest::Listener`]), and again on
//!   each timeout until a reply comes. The first reply must come from the server's host; its
//!   source address and port become the server's transfer ID (TID).
//! - An OACK carrying `multicast` = `addr,port,mc` starts a multicast download. Its other
//!   options must be ones we asked for, within what we asked (as in the unicast receiver);
//!   otherwise ERROR 8. A later OACK (promotion to master, or an answer to a re-request) may
//!   leave `addr` and `port` empty (RFC 2090): the group we have is kept.
//! - An OACK without `multicast`, or DATA as the first reply, means the server chose
//!   unicast: the download continues as a unicast [`Receiver`] transfer, delivered through
//!   the same `take_block` interface (in order, at increasing offsets).
//! - DATA counts only when its source is the TID, whichever socket it arrived on (the
//!   reference client, atftp, does the same); anything else on the group socket is dropped
//!   silently, and a stranger on the unicast socket gets ERROR 5 (RFC 1350). Blocks are kept
//!   at any position; the first block shorter than the block size is the last one and fixes
//!   the file's length. Block numbers do not roll over in multicast mode.
//! - **Master** (`mc=1`): after the OACK, on every DATA, and on every timeout, the client
//!   sends `ACK (first missing block - 1)`, which asks the server for that block (RFC 2090).
//!   An OACK with `mc=0` makes it passive again.
//! - **Passive** (`mc=0`): it only receives. When no DATA comes for a timeout it sends its
//!   request again to the listening address, as the reference client does; the server
//!   answers a member's repeated request with its OACK. An answer from a new port of the
//!   server's host (the group ended and the server started another for us) is adopted as
//!   the new TID: its group replaces the old one, or a unicast transfer starts.
//! - When every block up to the last is in, the client sends `ACK last` to the TID (RFC 2090:
//!   every client ends its transfer by acknowledging the last packet, master or not) and
//!   is done. Should the server promote it again afterwards (that ACK was lost), the
//!   promotion is answered with `ACK last` again, for a caller that lingers.
//! - ERROR from the TID (or from the listening address, refusing a re-request) ends the
//!   download. Timeouts back off exponentially up to `max_timeout`; after `max_retries`
//!   consecutive timeouts without progress the download ends as timed out. For a passive
//!   client any DATA from the group counts as progress (the group is alive, even when it
//!   repairs someone else's holes); for the master only new blocks do.

use std::collections::VecDeque;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::addr::{same, unmap_ip};
use crate::block::Block;
use crate::oack::{self, Agreed, Multicast};
use crate::options::parse_number;
use crate::packet::{self, DecodeError, ErrorCode, Mode, Packet, DEFAULT_BLKSIZE};
use crate::receiver::{payload_of, Receiver, ReceiverConfig, ReceiverOutcome};
use crate::retry::Retry;
use crate::transmit::{Datagram, Transmit};

/// Highest block number of a multicast download (no rollover).
pub const MAX_BLOCKS: u64 = 65535;

/// Parameters of one download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McastReceiverConfig {
    /// The server's listening address: requests go there.
    pub server: SocketAddr,
    /// The request, as for a unicast download (file name, options, timeouts, retries). The
    /// mode is always octet and `multicast` is always asked for. A multicast group uses the
    /// server's window: `windowsize` only matters when the server answers by unicast.
    pub request: ReceiverConfig,
}

impl McastReceiverConfig {
    /// A request with no option but `multicast`: 1 s timeout backing off to 4 s, 5 retries.
    pub fn new(server: SocketAddr, filename: impl Into<Vec<u8>>) -> Self {
        McastReceiverConfig { server, request: ReceiverConfig::new(filename, Mode::Octet) }
    }
}

/// The socket a datagram arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The client's own (ephemeral) port.
    Unicast,
    /// The socket bound to the group's port.
    Group,
}

/// Where a datagram goes; always sent from the unicast socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// The server's transfer ID (the source of its OACK or first DATA).
    Server(SocketAddr),
    /// The server's listening address (requests, first and repeated).
    Listener(SocketAddr),
    /// A stranger that sent us something (ERROR 5).
    Stranger(SocketAddr),
}

impl Dest {
    pub fn addr(self) -> SocketAddr {
        match self {
            Dest::Server(a) | Dest::Listener(a) | Dest::Stranger(a) => a,
        }
    }
}

/// How the server is serving us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No reply yet.
    Requesting,
    /// The server chose unicast.
    Unicast,
    /// RFC 2090 group member.
    Multicast,
}

/// Counters for logs and tests. In unicast mode see also [`McastReceiver::unicast_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct McastStats {
    /// Every datagram handed in.
    pub packets_received: u64,
    /// Multicast DATA accepted from the group socket / from the unicast socket.
    pub data_via_group: u64,
    pub data_via_unicast: u64,
    /// Distinct blocks stored, and their payload bytes.
    pub blocks: u64,
    pub bytes_received: u64,
    pub duplicates: u64,
    /// Datagrams dropped: wrong source, block 0, blocks that contradict the file's end.
    pub ignored: u64,
    /// ERROR 5 sent to strangers.
    pub strangers: u64,
    pub acks_sent: u64,
    /// Requests sent again by a passive member whose group went quiet.
    pub rerequests: u64,
    pub timeouts: u64,
    /// Times this client was made master (the first OACK included).
    pub promotions: u64,
    /// Times the server answered a re-request from a new transfer ID.
    pub tid_changes: u64,
}

/// The multicast part of the state.
#[derive(Debug)]
struct Mc {
    group: SocketAddrV4,
    master: bool,
    /// One bit per block number (bit 0 unused).
    have: Vec<u64>,
    /// Lowest block number not received (1 when none).
    first_missing: u64,
    /// Highest block number received.
    max_seen: u64,
    /// The last block's number and payload length, once its short DATA arrived.
    last: Option<(u64, usize)>,
}

impl Mc {
    fn new(group: SocketAddrV4, master: bool) -> Mc {
        Mc { group, master, have: vec![0; (MAX_BLOCKS as usize + 1).div_ceil(64)], first_missing: 1, max_seen: 0, last: None }
    }

    fn has(&self, b: u64) -> bool {
        self.have[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn set(&mut self, b: u64) {
        self.have[(b / 64) as usize] |= 1 << (b % 64);
        if b == self.first_missing {
            let mut m = b + 1;
            while m <= MAX_BLOCKS && self.has(m) {
                // Skip whole words when they are full.
                if m.is_multiple_of(64) && m + 63 <= MAX_BLOCKS && self.have[(m / 64) as usize] == u64::MAX {
                    m += 64;
                } else {
                    m += 1;
                }
            }
            self.first_missing = m;
        }
    }

    fn complete(&self) -> bool {
        self.last.is_some_and(|(l, _)| self.first_missing > l)
    }

    /// What an ACK says: the block before the first one missing, or the last block.
    fn ack_block(&self) -> Block {
        match self.last {
            Some((l, _)) if self.first_missing > l => Block(l),
            _ => Block(self.first_missing - 1),
        }
    }
}

#[derive(Debug)]
enum State {
    Requesting,
    Unicast { rx: Box<Receiver>, offset: u64 },
    Multicast(Mc),
}

/// One multicast-capable download. See the module documentation.
#[derive(Debug)]
pub struct McastReceiver {
    cfg: McastReceiverConfig,
    rrq: Vec<u8>,
    state: State,
    tid: Option<SocketAddr>,
    /// A request was sent again during the transfer: the server's host may answer from a
    /// new port.
    rerequested: bool,
    blksize: u16,
    tsize: Option<u64>,
    out: VecDeque<Transmit<Dest>>,
    blocks: VecDeque<(u64, Bytes)>,
    /// Retransmission timer; its base is the agreed timeout once an OACK set one.
    retry: Retry,
    outcome: Option<ReceiverOutcome>,
    /// The file's length, once complete.
    len: Option<u64>,
    stats: McastStats,
}

fn mc_value_of(opts: &[(String, String)]) -> Option<&str> {
    opts.iter().find(|(k, _)| k.eq_ignore_ascii_case("multicast")).map(|(_, v)| v.as_str())
}

impl McastReceiver {
    /// Starts a download: the RRQ is the first datagram [`Self::poll_transmit`] returns.
    pub fn new(now: Instant, mut cfg: McastReceiverConfig) -> McastReceiver {
        cfg.request.mode = Mode::Octet;
        cfg.request.multicast = true;
        cfg.request = cfg.request.normalized();
        let rrq = cfg.request.rrq();
        McastReceiver {
            state: State::Requesting,
            tid: None,
            rerequested: false,
            blksize: DEFAULT_BLKSIZE,
            tsize: None,
            out: VecDeque::from([Transmit { to: Dest::Listener(cfg.server), datagram: Datagram::Control(rrq.clone()) }]),
            blocks: VecDeque::new(),
            retry: cfg.request.retry(now),
            outcome: None,
            len: None,
            stats: McastStats::default(),
            rrq,
            cfg,
        }
    }

    /// Queues a datagram.
    fn send(&mut self, to: Dest, packet: Vec<u8>) {
        self.out.push_back(Transmit { to, datagram: Datagram::Control(packet) });
    }

    /// Where an answer goes: the server's TID once known, else its listener.
    fn server_dest(&self) -> Dest {
        self.tid.map_or(Dest::Listener(self.cfg.server), Dest::Server)
    }

    /// The encoded RRQ (as first sent and as sent again).
    pub fn request(&self) -> &[u8] {
        &self.rrq
    }

    pub fn kind(&self) -> Kind {
        match self.state {
            State::Requesting => Kind::Requesting,
            State::Unicast { .. } => Kind::Unicast,
            State::Multicast(_) => Kind::Multicast,
        }
    }

    /// The group to be a member of, while a multicast download runs.
    pub fn group(&self) -> Option<SocketAddrV4> {
        match &self.state {
            State::Multicast(mc) if self.outcome.is_none() => Some(mc.group),
            _ => None,
        }
    }

    /// The group of a multicast download, also after it ended (for reports).
    pub fn group_address(&self) -> Option<SocketAddrV4> {
        match &self.state {
            State::Multicast(mc) => Some(mc.group),
            _ => None,
        }
    }

    /// Whether this client is the master client now.
    pub fn is_master(&self) -> bool {
        matches!(&self.state, State::Multicast(mc) if mc.master)
    }

    /// The server's transfer ID, once it answered.
    pub fn server_tid(&self) -> Option<SocketAddr> {
        self.tid
    }

    pub fn stats(&self) -> McastStats {
        self.stats
    }

    /// The unicast receiver's counters, when the server chose unicast.
    pub fn unicast_stats(&self) -> Option<crate::receiver::ReceiverStats> {
        match &self.state {
            State::Unicast { rx, .. } => Some(rx.stats()),
            _ => None,
        }
    }

    pub fn outcome(&self) -> Option<&ReceiverOutcome> {
        self.outcome.as_ref()
    }

    /// True when the download has ended and every datagram and block has been pulled out.
    pub fn is_done(&self) -> bool {
        self.outcome.is_some() && self.out.is_empty() && self.blocks.is_empty()
    }

    /// The server's answer to `tsize`, when it gave one.
    pub fn tsize(&self) -> Option<u64> {
        match &self.state {
            State::Unicast { rx, .. } => rx.tsize(),
            _ => self.tsize,
        }
    }

    /// Block size in use.
    pub fn blksize(&self) -> u16 {
        match &self.state {
            State::Unicast { rx, .. } => rx.blksize(),
            _ => self.blksize,
        }
    }

    /// Distinct payload bytes received so far.
    pub fn bytes_received(&self) -> u64 {
        match &self.state {
            State::Unicast { rx, .. } => rx.bytes_received(),
            _ => self.stats.bytes_received,
        }
    }

    /// The file's length, once the download is complete.
    pub fn file_len(&self) -> Option<u64> {
        self.len
    }

    /// The next piece of the file: its offset and bytes. Call until `None` after every
    /// `handle*` call. Payloads fed through [`Self::handle_datagram`] are not copied.
    #[must_use]
    pub fn take_block(&mut self) -> Option<(u64, Bytes)> {
        self.blocks.pop_front()
    }

    /// The next datagram to send, if any, and where it goes. Call until it returns `None`.
    /// (`now` is not needed here; every machine is polled the same way.)
    #[must_use]
    pub fn poll_transmit(&mut self, _now: Instant) -> Option<Transmit<Dest>> {
        self.out.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Unicast { rx, .. } => rx.poll_timeout(),
            _ => self.retry.deadline(),
        }
    }

    /// Ends the download from the local side (say, the disk is full), telling the server
    /// with an ERROR `code`. Datagrams not yet sent are dropped in favour of the ERROR.
    pub fn abort(&mut self, code: ErrorCode, message: &str) {
        if self.outcome.is_some() {
            return;
        }
        if let State::Unicast { rx, .. } = &mut self.state {
            rx.abort(code, message);
            self.out.clear();
            self.pump_unicast();
            return;
        }
        self.out.clear();
        self.send(self.server_dest(), packet::error_packet(code, message));
        self.finish(ReceiverOutcome::Aborted { code, reason: message.to_string() });
    }

    /// Decodes and feeds one datagram that arrived on `via` from `from`. A DATA payload is
    /// kept as a slice of `datagram`. A datagram that is not TFTP is ignored and its decode
    /// error returned for the caller to log.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, via: Via, datagram: Bytes) -> Result<(), DecodeError> {
        let pkt = match packet::decode(&datagram) {
            Ok(p) => p,
            Err(e) => {
                self.stats.packets_received += 1;
                self.stats.ignored += 1;
                return Err(e);
            }
        };
        self.on_packet(now, from, via, &pkt, Some(&datagram));
        Ok(())
    }

    /// Feeds a decoded packet that arrived on `via` from `from`. A DATA payload is copied.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, via: Via, pkt: &Packet<'_>) {
        self.on_packet(now, from, via, pkt, None);
    }

    fn on_packet(&mut self, now: Instant, from: SocketAddr, via: Via, pkt: &Packet<'_>, datagram: Option<&Bytes>) {
        self.stats.packets_received += 1;
        let server_host = unmap_ip(self.cfg.server.ip());
        match self.tid {
            Some(t) if same(t, from) => {}
            None if via == Via::Unicast
                && unmap_ip(from.ip()) == server_host
                && self.outcome.is_none()
                && matches!(pkt, Packet::Oack(_) | Packet::Data { .. } | Packet::Error { .. }) =>
            {
                // The first reply fixes the server's TID.
                self.tid = Some(from);
                return self.first_reply(now, pkt, datagram);
            }
            Some(_)
                if via == Via::Unicast
                    && self.outcome.is_none()
                    && self.rerequested
                    && unmap_ip(from.ip()) == server_host
                    && matches!(pkt, Packet::Oack(_) | Packet::Data { .. }) =>
            {
                // Our repeated request was answered from a new port: the server started
                // over for us (a new group, or unicast).
                self.stats.tid_changes += 1;
                self.tid = Some(from);
                self.rerequested = false;
                return self.first_reply(now, pkt, datagram);
            }
            _ => {
                if via == Via::Unicast && same(from, self.cfg.server) {
                    if let Packet::Error { code, message } = pkt {
                        // The listener refused a (repeated) request.
                        if self.outcome.is_none() && !matches!(self.state, State::Unicast { .. }) {
                            self.out.clear();
                            self.finish(ReceiverOutcome::PeerError { code: *code, message: message.clone() });
                        }
                        return;
                    }
                }
                self.stats.ignored += 1;
                if via == Via::Unicast && self.tid.is_some() && !matches!(pkt, Packet::Error { .. }) {
                    // RFC 1350: a packet from a stranger gets ERROR 5; our transfer goes on.
                    self.stats.strangers += 1;
                    self.send(Dest::Stranger(from), packet::error_packet(ErrorCode::UnknownTid, "Unknown transfer ID"));
                }
                return;
            }
        }
        // From the TID.
        match &mut self.state {
            State::Unicast { rx, .. } => {
                match datagram {
                    Some(d) => {
                        let _ = rx.handle_datagram(now, d.clone());
                    }
                    None => rx.handle(now, pkt),
                }
                self.pump_unicast();
            }
            State::Requesting => self.first_reply(now, pkt, datagram),
            State::Multicast(_) => match pkt {
                Packet::Data { block, data } => self.on_data(now, via, *block, data, payload_of(datagram, data)),
                Packet::Oack(opts) => self.on_later_oack(now, opts),
                Packet::Error { code, message } => {
                    if self.outcome.is_none() {
                        self.out.clear();
                        self.finish(ReceiverOutcome::PeerError { code: *code, message: message.clone() });
                    }
                }
                _ => self.stats.ignored += 1,
            },
        }
    }

    /// The first reply from a (new) TID.
    fn first_reply(&mut self, now: Instant, pkt: &Packet<'_>, datagram: Option<&Bytes>) {
        match pkt {
            Packet::Oack(opts) if mc_value_of(opts).is_some() => match self.check_oack(opts) {
                Ok(a) => self.start_multicast(now, a),
                Err(reason) => self.abort(ErrorCode::OptionRefused, &reason),
            },
            Packet::Oack(_) | Packet::Data { .. } => self.start_unicast(now, pkt, datagram),
            Packet::Error { code, message } => {
                self.out.clear();
                self.finish(ReceiverOutcome::PeerError { code: *code, message: message.clone() });
            }
            _ => self.stats.ignored += 1,
        }
    }

    fn start_unicast(&mut self, now: Instant, pkt: &Packet<'_>, datagram: Option<&Bytes>) {
        let mut rx = Receiver::new(now, self.cfg.request.clone());
        let _rrq = rx.pop_transmit(); // already sent by us
        match datagram {
            Some(d) => {
                let _ = rx.handle_datagram(now, d.clone());
            }
            None => rx.handle(now, pkt),
        }
        self.retry.stop();
        self.state = State::Unicast { rx: Box::new(rx), offset: 0 };
        self.pump_unicast();
    }

    /// Moves the unicast receiver's output into ours.
    fn pump_unicast(&mut self) {
        let State::Unicast { rx, offset } = &mut self.state else { return };
        let to = self.tid.map_or(Dest::Listener(self.cfg.server), Dest::Server);
        while let Some(t) = rx.pop_transmit() {
            self.out.push_back(Transmit { to, datagram: t.datagram });
        }
        while let Some(d) = rx.take_data() {
            let n = d.len() as u64;
            self.blocks.push_back((*offset, d));
            *offset += n;
        }
        if self.outcome.is_none() {
            if let Some(o) = rx.outcome() {
                if o.is_success() {
                    self.len = Some(*offset);
                }
                self.outcome = Some(o.clone());
            }
        }
    }

    /// Checks a first multicast OACK: the options as for a unicast download, then a group
    /// to join and a file that fits without rollover.
    fn check_oack(&self, opts: &[(String, String)]) -> Result<Agreed, String> {
        let a = oack::check(&self.cfg.request.asked(Multicast::Accepted), opts)?;
        let mc = a.multicast.expect("checked by the caller");
        if mc.addr.is_none() || mc.port.is_none() {
            return Err("the first multicast OACK names no group address and port".to_string());
        }
        if let Some(t) = a.tsize {
            if t / a.blksize as u64 + 1 > MAX_BLOCKS {
                return Err(format!("a file of {t} bytes needs more than {MAX_BLOCKS} blocks of {}", a.blksize));
            }
        }
        Ok(a)
    }

    fn start_multicast(&mut self, now: Instant, a: Agreed) {
        let same_blocks = self.blksize == a.blksize;
        self.blksize = a.blksize;
        self.tsize = a.tsize;
        if let Some(t) = a.timeout {
            self.retry.set_base(Duration::from_secs(t as u64));
        }
        let mc_value = a.multicast.expect("checked");
        let group = SocketAddrV4::new(mc_value.addr.unwrap(), mc_value.port.unwrap());
        match &mut self.state {
            // A new group after a re-request: the blocks we have stay valid (same file,
            // same block size); otherwise start over.
            State::Multicast(mc) if same_blocks => {
                mc.group = group;
                mc.master = false;
            }
            _ => self.state = State::Multicast(Mc::new(group, false)),
        }
        self.retry.progress(now);
        self.set_master(now, mc_value.master);
    }

    /// Applies the `mc` flag of an OACK; a master (new or confirmed) asks for its block.
    fn set_master(&mut self, now: Instant, master: bool) {
        let State::Multicast(mc) = &mut self.state else { return };
        if master && !mc.master {
            self.stats.promotions += 1;
        }
        mc.master = master;
        if master {
            self.send_ack();
            self.retry.arm(now);
        }
    }

    fn on_later_oack(&mut self, now: Instant, opts: &[(String, String)]) {
        let Some(value) = mc_value_of(opts) else {
            self.stats.ignored += 1;
            return;
        };
        let Ok(v) = oack::parse_multicast(value) else {
            self.stats.ignored += 1;
            return;
        };
        if let Some(b) = opts.iter().find(|(k, _)| k.eq_ignore_ascii_case("blksize")) {
            if parse_number(&b.1) != Some(self.blksize as u64) {
                self.stats.ignored += 1;
                return;
            }
        }
        if self.outcome.is_some() {
            // Promoted after we finished: our final ACK was lost. Say it again.
            if v.master && self.outcome == Some(ReceiverOutcome::Complete) {
                self.send_ack();
            }
            return;
        }
        self.rerequested = false;
        let State::Multicast(mc) = &mut self.state else { return };
        if let (Some(ip), Some(port)) = (v.addr, v.port) {
            mc.group = SocketAddrV4::new(ip, port);
        } else if let Some(ip) = v.addr {
            mc.group.set_ip(ip);
        } else if let Some(port) = v.port {
            mc.group.set_port(port);
        }
        if v.master && !mc.master {
            // A promotion is progress: the server is alive and wants us.
            self.retry.progress(now);
        }
        self.set_master(now, v.master);
    }

    fn on_data(&mut self, now: Instant, via: Via, block: u16, data: &[u8], owned: Option<Bytes>) {
        let blksize = self.blksize;
        let State::Multicast(mc) = &mut self.state else { return };
        if self.outcome.is_some() {
            return;
        }
        if data.len() > blksize as usize {
            let why = format!("DATA block {block} carries {} bytes, more than the block size {blksize}", data.len());
            self.abort(ErrorCode::IllegalOperation, &why);
            return;
        }
        let b = Block::unrolled(block).0;
        let short = data.len() < blksize as usize;
        let contradicts = b == 0
            || match mc.last {
                Some((l, _)) => b > l || (b == l && !short) || (b < l && short),
                None => short && b < mc.max_seen,
            };
        if contradicts {
            self.stats.ignored += 1;
            return;
        }
        match via {
            Via::Group => self.stats.data_via_group += 1,
            Via::Unicast => self.stats.data_via_unicast += 1,
        }
        let new = !mc.has(b);
        if new {
            mc.set(b);
            mc.max_seen = mc.max_seen.max(b);
            if short {
                mc.last = Some((b, data.len()));
            }
            self.stats.blocks += 1;
            self.stats.bytes_received += data.len() as u64;
            if !data.is_empty() {
                let payload = owned.unwrap_or_else(|| Bytes::copy_from_slice(data));
                self.blocks.push_back(((b - 1) * blksize as u64, payload));
            }
        } else {
            self.stats.duplicates += 1;
        }
        let master = mc.master;
        if mc.complete() {
            let (l, n) = mc.last.unwrap();
            self.len = Some((l - 1) * blksize as u64 + n as u64);
            // RFC 2090: every client ends by acknowledging the last block.
            self.send_ack();
            self.finish(ReceiverOutcome::Complete);
            return;
        }
        if master {
            self.send_ack();
            if new {
                self.retry.progress(now);
            }
        } else {
            // Passive: any DATA says the group is alive.
            self.retry.progress(now);
        }
    }

    /// Queues `ACK (first missing - 1)` (or `ACK last` when complete) to the TID.
    fn send_ack(&mut self) {
        let (State::Multicast(mc), Some(tid)) = (&self.state, self.tid) else { return };
        let ack = packet::ack(mc.ack_block().wire()).to_vec();
        self.send(Dest::Server(tid), ack);
        self.stats.acks_sent += 1;
    }

    fn finish(&mut self, outcome: ReceiverOutcome) {
        self.retry.stop();
        self.outcome = Some(outcome);
    }

    /// Call when `poll_timeout`'s instant has passed (calling earlier does nothing).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let State::Unicast { rx, .. } = &mut self.state {
            rx.handle_timeout(now);
            self.pump_unicast();
            return;
        }
        if !self.retry.due(now) || self.outcome.is_some() {
            return;
        }
        self.stats.timeouts += 1;
        if self.retry.retries() >= self.cfg.request.max_retries {
            self.finish(ReceiverOutcome::TimedOut { retries: self.retry.retries() });
            return;
        }
        self.retry.back_off(now);
        match &self.state {
            State::Multicast(mc) if mc.master => self.send_ack(),
            State::Multicast(_) => {
                self.stats.rerequests += 1;
                self.rerequested = true;
                self.send(Dest::Listener(self.cfg.server), self.rrq.clone());
            }
            _ => self.send(Dest::Listener(self.cfg.server), self.rrq.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::Loss;
    use crate::multicast::{Group, GroupConfig, GroupDest};
    use crate::packet::decode;
    use std::cmp::Reverse;
    use std::collections::{BTreeMap, BinaryHeap};

    const SERVER: &str = "10.0.0.1:69";
    const TID: &str = "10.0.0.1:50000";
    const GROUP: &str = "239.255.0.1:1758";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn cfg() -> McastReceiverConfig {
        let mut c = McastReceiverConfig::new(addr(SERVER), "f");
        c.request.blksize = Some(512);
        c.request.tsize = true;
        c
    }

    fn drain(r: &mut McastReceiver) -> Vec<Transmit<Dest>> {
        std::iter::from_fn(|| r.poll_transmit(Instant::now())).collect()
    }

    /// The ACK numbers among `t`, all of which must go to the TID.
    fn acks(t: &[Transmit<Dest>]) -> Vec<u16> {
        t.iter()
            .map(|m| {
                assert_eq!(m.to, Dest::Server(addr(TID)), "{m:?}");
                match decode(&bytes(m)) {
                    Ok(Packet::Ack(b)) => b,
                    other => panic!("not an ACK: {other:?}"),
                }
            })
            .collect()
    }

    fn bytes(t: &Transmit<Dest>) -> Vec<u8> {
        t.datagram.clone().into_vec()
    }

    fn oack(list: &[(&str, &str)]) -> Vec<u8> {
        Packet::Oack(list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()).to_vec()
    }

    fn dat(block: u16, payload: &[u8]) -> Vec<u8> {
        Packet::Data { block, data: payload }.to_vec()
    }

    fn feed(r: &mut McastReceiver, now: Instant, from: &str, via: Via, d: Vec<u8>) {
        r.handle_datagram(now, addr(from), via, Bytes::from(d)).unwrap();
    }

    /// Writes every delivered piece into `file` at its offset.
    fn collect(r: &mut McastReceiver, file: &mut Vec<u8>) {
        while let Some((off, b)) = r.take_block() {
            let end = off as usize + b.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[off as usize..end].copy_from_slice(&b);
        }
    }

    fn joined(now: Instant, master: bool) -> McastReceiver {
        let mut r = McastReceiver::new(now, cfg());
        drain(&mut r);
        let mc = format!("{},{}", GROUP.replace(':', ","), master as u8);
        feed(&mut r, now, TID, Via::Unicast, oack(&[("blksize", "512"), ("tsize", "1300"), ("multicast", &mc)]));
        r
    }

    #[test]
    fn request_carries_multicast_and_goes_to_the_listener() {
        let now = Instant::now();
        let mut c = cfg();
        c.request.request_timeout_option = Some(2);
        let mut r = McastReceiver::new(now, c);
        let t = drain(&mut r);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, Dest::Listener(addr(SERVER)));
        let Ok(Packet::Rrq(req)) = decode(&bytes(&t[0])) else { panic!("not an RRQ") };
        assert_eq!(req.mode, Mode::Octet);
        let names: Vec<_> = req.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(names, ["blksize=512", "timeout=2", "tsize=0", "multicast="]);
        assert_eq!(r.kind(), Kind::Requesting);
        // No answer: the request again, then give up.
        for _ in 0..5 {
            r.handle_timeout(r.poll_timeout().unwrap());
            assert_eq!(drain(&mut r)[0].to, Dest::Listener(addr(SERVER)));
        }
        r.handle_timeout(r.poll_timeout().unwrap());
        assert_eq!(r.outcome(), Some(&ReceiverOutcome::TimedOut { retries: 5 }));
    }

    #[test]
    fn passive_member_stores_blocks_in_any_order_and_acks_the_last() {
        let now = Instant::now();
        let mut r = joined(now, false);
        assert!(drain(&mut r).is_empty(), "a passive member sends nothing after the OACK");
        assert_eq!(r.kind(), Kind::Multicast);
        assert_eq!(r.group(), Some(GROUP.parse().unwrap()));
        assert_eq!(r.tsize(), Some(1300));
        let data: Vec<u8> = (0..1300u32).map(|i| (i % 251) as u8).collect();
        let mut file = Vec::new();
        feed(&mut r, now, TID, Via::Group, dat(3, &data[1024..]));
        feed(&mut r, now, TID, Via::Group, dat(1, &data[..512]));
        feed(&mut r, now, TID, Via::Group, dat(1, &data[..512]));
        assert!(drain(&mut r).is_empty());
        collect(&mut r, &mut file);
        assert!(r.outcome().is_none());
        // Block 2 by unicast from the TID counts too.
        feed(&mut r, now, TID, Via::Unicast, dat(2, &data[512..1024]));
        assert_eq!(acks(&drain(&mut r)), [3]);
        collect(&mut r, &mut file);
        assert_eq!(file, data);
        assert_eq!(r.outcome(), Some(&ReceiverOutcome::Complete));
        assert_eq!(r.file_len(), Some(1300));
        assert!(r.is_done());
        assert_eq!(r.group(), None);
        let st = r.stats();
        assert_eq!((st.blocks, st.duplicates, st.data_via_group, st.data_via_unicast), (3, 1, 3, 1));
    }

    #[test]
    fn master_acks_the_block_before_its_first_hole() {
        let now = Instant::now();
        let mut r = joined(now, true);
        assert!(r.is_master());
        assert_eq!(acks(&drain(&mut r)), [0]);
        feed(&mut r, now, TID, Via::Group, dat(2, &[2; 512]));
        assert_eq!(acks(&drain(&mut r)), [0]);
        feed(&mut r, now, TID, Via::Group, dat(1, &[1; 512]));
        assert_eq!(acks(&drain(&mut r)), [2]);
        // Timeout: the same request again, with backoff.
        let t1 = r.poll_timeout().unwrap();
        r.handle_timeout(t1);
        assert_eq!(acks(&drain(&mut r)), [2]);
        assert!(r.poll_timeout().unwrap() - t1 > Duration::from_millis(1500));
        feed(&mut r, t1, TID, Via::Group, dat(3, &[3; 276]));
        assert_eq!(acks(&drain(&mut r)), [3]);
        assert_eq!(r.file_len(), Some(1300));
    }

    #[test]
    fn empty_file_and_exact_multiple_of_the_block_size() {
        let now = Instant::now();
        let mut r = joined(now, false);
        feed(&mut r, now, TID, Via::Group, dat(1, b""));
        assert_eq!(acks(&drain(&mut r)), [1]);
        assert!(r.take_block().is_none());
        assert_eq!(r.file_len(), Some(0));

        let mut r = joined(now, false);
        feed(&mut r, now, TID, Via::Group, dat(3, b""));
        feed(&mut r, now, TID, Via::Group, dat(2, &[2; 512]));
        feed(&mut r, now, TID, Via::Group, dat(1, &[1; 512]));
        assert_eq!(acks(&drain(&mut r)), [3]);
        assert_eq!(r.file_len(), Some(1024));
    }

    #[test]
    fn only_the_tid_is_listened_to() {
        let now = Instant::now();
        let mut r = joined(now, false);
        // Another server on the same group port, or the same host from another port.
        feed(&mut r, now, "10.0.0.9:50000", Via::Group, dat(1, &[9; 512]));
        feed(&mut r, now, "10.0.0.1:50001", Via::Group, dat(1, &[9; 512]));
        assert!(drain(&mut r).is_empty(), "nothing is ever answered on the group socket");
        // A stranger on the unicast socket gets ERROR 5.
        feed(&mut r, now, "10.0.0.7:4000", Via::Unicast, dat(1, &[9; 512]));
        let t = drain(&mut r);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, Dest::Stranger(addr("10.0.0.7:4000")));
        assert!(matches!(decode(&bytes(&t[0])), Ok(Packet::Error { code: ErrorCode::UnknownTid, .. })));
        assert!(r.take_block().is_none());
        assert_eq!(r.stats().ignored, 3);
        assert_eq!(r.stats().blocks, 0);
        // The first reply must come from the server's host.
        let mut r = McastReceiver::new(now, cfg());
        drain(&mut r);
        feed(&mut r, now, "10.0.0.2:50000", Via::Unicast, oack(&[("multicast", "239.1.1.1,1758,1")]));
        assert_eq!(r.kind(), Kind::Requesting);
        assert!(drain(&mut r).is_empty());
    }

    #[test]
    fn promotion_without_address_keeps_the_group_and_a_new_address_moves_it() {
        let now = Instant::now();
        let mut r = joined(now, false);
        feed(&mut r, now, TID, Via::Group, dat(2, &[2; 512]));
        feed(&mut r, now, TID, Via::Unicast, oack(&[("multicast", ",,1")]));
        assert!(r.is_master());
        assert_eq!(r.group(), Some(GROUP.parse().unwrap()));
        assert_eq!(acks(&drain(&mut r)), [0]);
        assert_eq!(r.stats().promotions, 1);
        // Promotion OACK sent again (our ACK was lost): ACK again.
        feed(&mut r, now, TID, Via::Unicast, oack(&[("multicast", ",,1")]));
        assert_eq!(acks(&drain(&mut r)), [0]);
        feed(&mut r, now, TID, Via::Unicast, oack(&[("multicast", "239.255.0.2,1759,0")]));
        assert!(!r.is_master());
        assert_eq!(r.group(), Some("239.255.0.2:1759".parse().unwrap()));
        assert!(drain(&mut r).is_empty());
    }

    #[test]
    fn passive_member_asks_again_when_the_group_is_quiet_and_gives_up() {
        let t0 = Instant::now();
        let mut r = joined(t0, false);
        let mut now = t0;
        for i in 0..5 {
            now = r.poll_timeout().unwrap();
            r.handle_timeout(now);
            let t = drain(&mut r);
            assert_eq!(t.len(), 1, "round {i}");
            assert_eq!(t[0].to, Dest::Listener(addr(SERVER)));
            assert_eq!(bytes(&t[0]), r.request());
            // The server answers a member's repeated request with its OACK: not progress.
            feed(&mut r, now, TID, Via::Unicast, oack(&[("blksize", "512"), ("tsize", "1300"), ("multicast", "239.255.0.1,1758,0")]));
            assert!(drain(&mut r).is_empty());
        }
        // DATA, even a duplicate, shows the group is alive.
        feed(&mut r, now, TID, Via::Group, dat(1, &[1; 512]));
        feed(&mut r, now, TID, Via::Group, dat(1, &[1; 512]));
        for _ in 0..5 {
            r.handle_timeout(r.poll_timeout().unwrap());
        }
        assert!(r.outcome().is_none());
        r.handle_timeout(r.poll_timeout().unwrap());
        assert_eq!(r.outcome(), Some(&ReceiverOutcome::TimedOut { retries: 5 }));
        assert_eq!(r.stats().rerequests, 10);
    }

    #[test]
    fn an_answer_from_a_new_port_after_a_re_request_is_a_new_group() {
        let t0 = Instant::now();
        let mut r = joined(t0, false);
        feed(&mut r, t0, TID, Via::Group, dat(1, &[1; 512]));
        // Without a re-request, another port of the server is a stranger.
        feed(&mut r, t0, "10.0.0.1:50002", Via::Unicast, oack(&[("multicast", "239.255.0.9,1758,1")]));
        assert_eq!(drain(&mut r)[0].to, Dest::Stranger(addr("10.0.0.1:50002")));
        let now = r.poll_timeout().unwrap();
        r.handle_timeout(now);
        drain(&mut r);
        feed(&mut r, now, "10.0.0.1:50002", Via::Unicast, oack(&[("blksize", "512"), ("multicast", "239.255.0.9,1758,1")]));
        assert_eq!(r.server_tid(), Some(addr("10.0.0.1:50002")));
        assert_eq!(r.group(), Some("239.255.0.9:1758".parse().unwrap()));
        let t = drain(&mut r);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, Dest::Server(addr("10.0.0.1:50002")));
        assert_eq!(bytes(&t[0]), packet::ack(1), "block 1 is kept");
        assert_eq!(r.stats().tid_changes, 1);
    }

    #[test]
    fn an_oack_without_multicast_means_unicast() {
        let now = Instant::now();
        let mut c = cfg();
        c.request.windowsize = Some(2);
        let mut r = McastReceiver::new(now, c);
        drain(&mut r);
        feed(&mut r, now, TID, Via::Unicast, oack(&[("blksize", "512"), ("windowsize", "2"), ("tsize", "700")]));
        assert_eq!(r.kind(), Kind::Unicast);
        assert_eq!(r.group(), None);
        assert_eq!(acks(&drain(&mut r)), [0]);
        feed(&mut r, now, TID, Via::Unicast, dat(1, &[1; 512]));
        assert!(drain(&mut r).is_empty(), "window of 2");
        feed(&mut r, now, TID, Via::Unicast, dat(2, &[2; 188]));
        assert_eq!(acks(&drain(&mut r)), [2]);
        let mut file = Vec::new();
        collect(&mut r, &mut file);
        assert_eq!(file.len(), 700);
        assert_eq!(&file[512..], &[2; 188]);
        assert_eq!(r.file_len(), Some(700));
        assert_eq!(r.tsize(), Some(700));
        assert!(r.is_done());
        // DATA as first reply: the server ignored the options.
        let mut r = McastReceiver::new(now, cfg());
        drain(&mut r);
        feed(&mut r, now, TID, Via::Unicast, dat(1, b"tiny"));
        assert_eq!(acks(&drain(&mut r)), [1]);
        assert_eq!(r.file_len(), Some(4));
    }

    #[test]
    fn bad_oacks_are_refused_and_errors_end_the_download() {
        let now = Instant::now();
        for (opts, why) in [
            (vec![("multicast", "239.1.1.1,1758")], "not addr,port,mc"),
            (vec![("multicast", "10.1.1.1,1758,1")], "not an IPv4 multicast"),
            (vec![("multicast", ",,1")], "names no group"),
            (vec![("multicast", "239.1.1.1,1758,1"), ("blksize", "1024")], "outside"),
            (vec![("multicast", "239.1.1.1,1758,1"), ("windowsize", "4")], "not requested"),
            (vec![("multicast", "239.1.1.1,1758,1"), ("blksize", "8"), ("tsize", "600000")], "65535 blocks"),
        ] {
            let mut r = McastReceiver::new(now, cfg());
            drain(&mut r);
            feed(&mut r, now, TID, Via::Unicast, oack(&opts));
            let t = drain(&mut r);
            assert!(matches!(decode(&bytes(&t[0])), Ok(Packet::Error { code: ErrorCode::OptionRefused, .. })));
            match r.outcome() {
                Some(ReceiverOutcome::Aborted { reason, .. }) => assert!(reason.contains(why), "{reason}"),
                o => panic!("{o:?}"),
            }
        }
        let mut r = joined(now, true);
        drain(&mut r);
        feed(&mut r, now, TID, Via::Unicast, Packet::Error { code: ErrorCode::FileNotFound, message: "gone".into() }.to_vec());
        assert_eq!(r.outcome(), Some(&ReceiverOutcome::PeerError { code: ErrorCode::FileNotFound, message: "gone".into() }));
        assert!(drain(&mut r).is_empty(), "an ERROR is not answered");
        // The listener refusing a repeated request ends it too.
        let mut r = joined(now, false);
        r.handle_timeout(r.poll_timeout().unwrap());
        drain(&mut r);
        feed(&mut r, now, SERVER, Via::Unicast, packet::error_packet(ErrorCode::AccessViolation, "no"));
        assert!(matches!(r.outcome(), Some(ReceiverOutcome::PeerError { .. })));
        // Contradicting blocks are ignored; oversized ones abort.
        let mut r = joined(now, false);
        feed(&mut r, now, TID, Via::Group, dat(2, &[0; 100]));
        feed(&mut r, now, TID, Via::Group, dat(5, &[0; 512]));
        feed(&mut r, now, TID, Via::Group, dat(0, &[0; 512]));
        assert_eq!(r.stats().ignored, 2);
        feed(&mut r, now, TID, Via::Group, dat(1, &[0; 513]));
        assert!(matches!(r.outcome(), Some(ReceiverOutcome::Aborted { code: ErrorCode::IllegalOperation, .. })));
    }

    #[test]
    fn bitmap_first_missing_skips_full_words() {
        let mut mc = Mc::new(GROUP.parse().unwrap(), false);
        for b in (2..=300).rev() {
            mc.set(b);
        }
        assert_eq!(mc.first_missing, 1);
        mc.set(1);
        assert_eq!(mc.first_missing, 301);
        for b in 301..=MAX_BLOCKS {
            mc.set(b);
        }
        assert_eq!(mc.first_missing, MAX_BLOCKS + 1);
    }

    // ---- A simulated network: several receivers, one server-side `Group`. ----

    #[derive(Debug)]
    enum Ev {
        ToClient { client: usize, from: SocketAddr, via: Via, data: Bytes },
        ToServer { client: usize, to_listener: bool, data: Vec<u8> },
    }

    struct Client {
        start: Duration,
        kill: Option<Duration>,
        rx: Option<McastReceiver>,
        file: Vec<u8>,
        dead: bool,
    }

    struct Scenario {
        len: usize,
        clients: usize,
        window: u16,
        /// Percent of datagrams lost on the way to each client.
        loss: u64,
        late: Option<(usize, Duration)>,
        kill: Option<(usize, Duration)>,
        /// Garbage DATA on the group port from another source, now and then.
        spoof: bool,
        /// The server demotes lossy masters and serves a lone member by unicast.
        server_tricks: bool,
    }

    struct Result {
        data: Vec<u8>,
        clients: Vec<Client>,
        group: Group<usize>,
    }

    fn file(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9u32;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn simulate(sc: Scenario) -> Result {
        let data = file(sc.len);
        let t0 = Instant::now();
        let latency = Duration::from_millis(1);
        let gcfg = GroupConfig {
            group: GROUP.parse().unwrap(),
            blksize: 512,
            window: sc.window,
            timeout: Duration::from_millis(100),
            min_timeout: Duration::from_millis(20),
            max_timeout: Duration::from_secs(1),
            master_retries: 3,
            give_up_after: Duration::ZERO,
            start_at: t0 + Duration::from_millis(50),
            start_min_clients: 0,
            slow_master_repairs: if sc.server_tricks { 8 } else { 0 },
            lone_member_unicast: sc.server_tricks,
            probe_blocks: if sc.server_tricks { 256 } else { 0 },
            rate: crate::multicast::RateConfig::default(),
        };
        let mut group: Group<usize> = Group::new(gcfg, Bytes::from(data.clone()));
        let mut clients: Vec<Client> = (0..sc.clients)
            .map(|i| Client {
                start: match sc.late {
                    Some((c, at)) if c == i => at,
                    _ => Duration::ZERO,
                },
                kill: sc.kill.filter(|k| k.0 == i).map(|k| k.1),
                rx: None,
                file: Vec::new(),
                dead: false,
            })
            .collect();
        let mut queue: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
        let mut events: BTreeMap<u64, Ev> = BTreeMap::new();
        let mut seq = 0u64;
        let mut loss = Loss::new(0x2545_F491_4F6C_DD1D);
        let mut lost = move || loss.pct(sc.loss);
        let mut push = |queue: &mut BinaryHeap<_>, events: &mut BTreeMap<u64, Ev>, at: Instant, ev: Ev| {
            seq += 1;
            queue.push(Reverse((at, seq)));
            events.insert(seq, ev);
        };
        let tid = addr(TID);
        let mut now = t0;
        let mut next_spoof = t0 + Duration::from_millis(60);
        for step in 0.. {
            assert!(step < 2_000_000, "livelock");
            // Start and kill clients.
            for c in clients.iter_mut() {
                if c.rx.is_none() && !c.dead && now >= t0 + c.start {
                    let mut cc = McastReceiverConfig::new(addr(SERVER), "f");
                    cc.request.blksize = Some(512);
                    cc.request.tsize = true;
                    cc.request.timeout = Duration::from_millis(200);
                    cc.request.max_timeout = Duration::from_secs(1);
                    cc.request.max_retries = 8;
                    c.rx = Some(McastReceiver::new(now, cc));
                }
                if c.kill.is_some_and(|k| now >= t0 + k) {
                    c.dead = true;
                }
            }
            // Client output.
            for (i, c) in clients.iter_mut().enumerate() {
                let (Some(rx), false) = (c.rx.as_mut(), c.dead) else { continue };
                while let Some(t) = rx.poll_transmit(now) {
                    let to_listener = match t.to {
                        Dest::Listener(a) => {
                            assert_eq!(a, addr(SERVER));
                            true
                        }
                        Dest::Server(a) => {
                            assert_eq!(a, tid);
                            false
                        }
                        Dest::Stranger(_) => continue,
                    };
                    push(&mut queue, &mut events, now + latency, Ev::ToServer { client: i, to_listener, data: t.datagram.into_vec() });
                }
                collect(rx, &mut c.file);
            }
            // Server output.
            while let Some(o) = group.poll_transmit(now) {
                match o {
                    Transmit { to: GroupDest::Client(to), datagram } => {
                        if !lost() {
                            let ev = Ev::ToClient { client: to, from: tid, via: Via::Unicast, data: Bytes::from(datagram.into_vec()) };
                            push(&mut queue, &mut events, now + latency, ev);
                        }
                    }
                    Transmit { to: GroupDest::Group, datagram } => {
                        let d = Bytes::from(datagram.into_vec());
                        for (i, c) in clients.iter().enumerate() {
                            let member = c.rx.as_ref().is_some_and(|r| r.group() == Some(GROUP.parse().unwrap()));
                            if member && !c.dead && !lost() {
                                let ev = Ev::ToClient { client: i, from: tid, via: Via::Group, data: d.clone() };
                                push(&mut queue, &mut events, now + latency, ev);
                            }
                        }
                    }
                }
            }
            let running = clients.iter().any(|c| !c.dead && c.rx.as_ref().is_none_or(|r| !r.is_done()));
            if !running && queue.is_empty() {
                break;
            }
            // Next instant.
            let mut next = queue.peek().map(|r| r.0 .0);
            let mut consider = |t: Option<Instant>| {
                if let Some(t) = t {
                    next = Some(next.map_or(t, |n: Instant| n.min(t)));
                }
            };
            consider(group.poll_timeout());
            for c in &clients {
                if c.dead {
                    continue;
                }
                match &c.rx {
                    Some(rx) => consider(rx.poll_timeout()),
                    None => consider(Some(t0 + c.start)),
                }
                consider(c.kill.map(|k| t0 + k).filter(|_| !c.dead));
            }
            if sc.spoof {
                consider(Some(next_spoof));
            }
            now = next.expect("something is always pending while clients run").max(now);
            if sc.spoof && now >= next_spoof {
                next_spoof = now + Duration::from_millis(7);
                for i in 0..clients.len() {
                    let bogus = Bytes::from(dat(1 + (i as u16 % 3), &[0xEE; 512]));
                    for from in ["10.0.0.1:50001", "10.0.0.66:50000"] {
                        let ev = Ev::ToClient { client: i, from: addr(from), via: Via::Group, data: bogus.clone() };
                        push(&mut queue, &mut events, now, ev);
                    }
                }
            }
            while queue.peek().is_some_and(|r| r.0 .0 <= now) {
                let Reverse((_, id)) = queue.pop().unwrap();
                match events.remove(&id).unwrap() {
                    Ev::ToClient { client, from, via, data } => {
                        let c = &mut clients[client];
                        if let (Some(rx), false) = (c.rx.as_mut(), c.dead) {
                            rx.handle_datagram(now, from, via, data).unwrap();
                        }
                    }
                    Ev::ToServer { client, to_listener, data } => {
                        if clients[client].dead {
                            continue;
                        }
                        let pkt = decode(&data).unwrap();
                        if to_listener {
                            let Packet::Rrq(req) = pkt else { panic!("not a request") };
                            assert!(req.options.iter().any(|(k, _)| k == "multicast"));
                            let opts = vec![("blksize".to_string(), "512".to_string()), ("tsize".to_string(), data_len(sc.len))];
                            group.join(now, client, opts);
                        } else {
                            group.handle(now, client, &pkt);
                        }
                    }
                }
            }
            group.handle_timeout(now);
            for c in clients.iter_mut() {
                if let (Some(rx), false) = (c.rx.as_mut(), c.dead) {
                    rx.handle_timeout(now);
                }
            }
        }
        Result { data, clients, group }
    }

    fn data_len(n: usize) -> String {
        n.to_string()
    }

    fn assert_all_complete(r: &Result, except: Option<usize>) {
        for (i, c) in r.clients.iter().enumerate() {
            if Some(i) == except {
                continue;
            }
            let rx = c.rx.as_ref().unwrap();
            assert_eq!(rx.outcome(), Some(&ReceiverOutcome::Complete), "client {i}: {:?}; group {:?}", rx.stats(), r.group.stats());
            assert_eq!(rx.file_len(), Some(r.data.len() as u64));
            assert!(c.file == r.data, "client {i}: file differs");
        }
    }

    #[test]
    fn simulated_group_without_loss_sends_the_file_once() {
        let r = simulate(Scenario { len: 300_000, clients: 4, window: 8, loss: 0, late: None, kill: None, spoof: false, server_tricks: false });
        assert_all_complete(&r, None);
        let st = r.group.stats();
        assert_eq!(st.members_done, 4);
        assert_eq!(st.members_lost, 0);
        assert_eq!(st.data_packets, 300_000 / 512 + 1, "{st:?}");
        assert!(r.group.is_empty());
        let masters: u64 = r.clients.iter().map(|c| c.rx.as_ref().unwrap().stats().promotions).sum();
        assert_eq!(masters, 1, "every member ends with ACK last itself: nobody needs promoting to say so");
    }

    #[test]
    fn simulated_group_with_loss_late_joiner_and_a_dying_master() {
        let r = simulate(Scenario {
            len: 250_000,
            clients: 5,
            window: 8,
            loss: 5,
            late: Some((4, Duration::from_millis(120))),
            kill: Some((0, Duration::from_millis(90))),
            spoof: true,
            server_tricks: false,
        });
        assert_all_complete(&r, Some(0));
        let dead = r.clients[0].rx.as_ref().unwrap();
        assert!(dead.outcome().is_none(), "the killed master never finished");
        let late = r.clients[4].rx.as_ref().unwrap().stats();
        assert!(late.promotions >= 1, "the late joiner had to ask for what it missed");
        let st = r.group.stats();
        assert_eq!(st.members_done, 4, "{st:?}");
        assert_eq!(st.members_lost, 1, "{st:?}");
        assert!(st.remasters >= 4, "{st:?}");
        let ratio = st.data_bytes as f64 / r.data.len() as f64;
        assert!(ratio < 2.5, "wire ratio {ratio:.2}: {st:?}");
        let ignored: u64 = r.clients.iter().map(|c| c.rx.as_ref().unwrap().stats().ignored).sum();
        assert!(ignored > 100, "spoofed DATA was seen and dropped ({ignored})");
    }

    #[test]
    fn simulated_group_with_heavy_loss_and_lock_step() {
        let r = simulate(Scenario { len: 60_000, clients: 3, window: 1, loss: 20, late: None, kill: None, spoof: false, server_tricks: false });
        assert_all_complete(&r, None);
        assert_eq!(r.group.stats().members_done, 3);
    }

    #[test]
    fn simulated_group_with_demotions_and_unicast_to_the_last_member() {
        let r = simulate(Scenario {
            len: 300_000,
            clients: 4,
            window: 8,
            loss: 8,
            late: Some((3, Duration::from_millis(200))),
            kill: None,
            spoof: false,
            server_tricks: true,
        });
        assert_all_complete(&r, None);
        let via_unicast: u64 = r.clients.iter().map(|c| c.rx.as_ref().unwrap().stats().data_via_unicast).sum();
        assert!(via_unicast > 0, "the last member got DATA by unicast");
    }

    #[test]
    fn simulated_late_joiner_after_the_first_pass_gets_everything() {
        // Joins when the others are nearly done: almost everything comes as repairs for it.
        let r = simulate(Scenario { len: 100_000, clients: 3, window: 8, loss: 0, late: Some((2, Duration::from_millis(150))), kill: None, spoof: false, server_tricks: false });
        assert_all_complete(&r, None);
        let late = r.clients[2].rx.as_ref().unwrap().stats();
        assert!(late.promotions >= 1);
    }
}
