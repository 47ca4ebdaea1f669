//! multicast_group: a `tftpcast_proto::multicast::Group<u8>` driven by arbitrary joins and
//! packets from arbitrary clients (members, strangers, masters and passive members), clock
//! jumps, timer expiries and stretches of well-behaved RFC 2090 clients, on a virtual clock.
//!
//! Invariants checked after every step:
//! - membership: members <= joins (and <= distinct clients that joined); a non-empty group
//!   always has exactly one master; an OACK with `mc=1` goes to the master, `mc=0` to a
//!   passive member, and every OACK names the group; a new member's request gets exactly one
//!   OACK, a member's repeated request at most one, and at most once per `min_timeout`;
//! - strangers get exactly one ERROR 5 per packet (none for their ERROR, none for the final
//!   ACK of a member that just finished), and cause no DATA;
//! - DATA: only once started (start delay passed or enough clients), block index in
//!   1..=last and <= master's request + window, payload = that block of the file, only the
//!   last block short;
//! - amplification: one event sends at most one window of DATA; a packet from a member that
//!   is not the master sends at most one DATA; unexpected-packet retransmissions happen at
//!   most once per `min_timeout` of virtual time;
//! - timers: a group with members always has a deadline, never in the past;
//! - take-over (cluster failover): the drained group falls silent, the new one has the same
//!   members, starts at once and is led by the oldest;
//! - liveness: silent clients make the group empty within members x (master_retries + 2)
//!   timeouts (plus the start delay); well-behaved clients all complete with every block
//!   (except those the ops made acknowledge blocks they never had: a master's ACK below its
//!   previous one is not a repair request, so such a client may be dropped).
#![no_main]

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tftpcast_proto::multicast::{fits_without_rollover, oack_value, Group, GroupConfig, GroupDest, RateConfig};
use tftpcast_proto::packet::{decode, ErrorCode, Mode, Packet, Request};
use tftpcast_proto::{Block, Datagram, Transmit};

const CLIENTS: u8 = 8;

#[derive(Debug, Arbitrary)]
enum Op {
    Join(u8),
    Ack(u8, u16),
    /// ACK for the master's current request + k.
    AckRel(u8, i8),
    Error(u8),
    Data(u8),
    Oack(u8),
    Request(u8),
    Advance(u16),
    Timeout,
    Pump(u8),
    /// Another node takes the group over (cluster failover): a fresh group gets the members.
    TakeOver,
}

#[derive(Debug, Arbitrary)]
struct Input {
    len: u16,
    seed: u8,
    blksize: u16,
    window: u8,
    timeout_ms: u16,
    min_timeout_ms: u16,
    max_timeout_ms: u16,
    master_retries: u8,
    start_delay_ms: u16,
    start_min_clients: u8,
    slow_master_repairs: u8,
    lone_member_unicast: bool,
    give_up_ms: u16,
    probe_blocks: u8,
    rate_control: bool,
    finish_well: bool,
    ops: Vec<Op>,
}

struct Sim {
    have: Vec<bool>,
}

struct Harness {
    g: Group<u8>,
    cfg: GroupConfig,
    data: Vec<u8>,
    now: Instant,
    t0: Instant,
    joined: [bool; CLIENTS as usize],
    /// When a request of each client was last answered with an OACK.
    request_oack: [Option<Instant>; CLIENTS as usize],
    /// Clients that acknowledged blocks they never received (the ops can make them lie):
    /// the group cannot be expected to repair what it was told is there.
    lied: [bool; CLIENTS as usize],
    sims: BTreeMap<u8, Sim>,
    last_unexpected: Option<Instant>,
    unexpected_retransmits: u64,
    /// Members handed over by `take_over` (they count as joined).
    carried: u64,
    pump_budget: u32,
}

impl Harness {
    fn total(&self) -> u64 {
        self.g.total_blocks()
    }

    fn block_bytes(&self, index: u64) -> &[u8] {
        let blk = self.cfg.blksize as u64;
        let len = self.data.len() as u64;
        let start = ((index - 1) * blk).min(len);
        let end = (start + blk).min(len);
        &self.data[start as usize..end as usize]
    }

    fn sim_ack(&self, c: u8) -> u16 {
        let s = &self.sims[&c];
        let hole = s.have.iter().skip(1).position(|h| !h).map(|p| p as u64 + 1);
        match hole {
            Some(h) => Block(h - 1).wire(),
            None => Block(self.total()).wire(),
        }
    }

    /// Drains the group after an event and checks everything it sent.
    /// `max_data`: DATA allowed for this event. `stranger`: the event was a packet from a
    /// non-member (`Some(is_error)`). Returns (DATA count, packets to clients).
    fn drain(&mut self, max_data: u64, stranger: Option<(u8, bool)>, what: &str) -> (u64, u64) {
        let was_started = self.g.started();
        let mut data = 0u64;
        let mut to_clients = 0u64;
        let mut errors_to_stranger = 0u64;
        let window = self.cfg.window.max(1) as u64;
        while let Some(o) = self.g.poll_transmit(self.now) {
            let (only, t) = match o {
                Transmit { to: GroupDest::Group, datagram } => (None, datagram),
                Transmit { to: GroupDest::Client(to), datagram: data @ Datagram::Data { .. } } => {
                    assert!(self.cfg.lone_member_unicast, "{what}: unicast DATA although lone_member_unicast is off");
                    assert!(self.g.is_member(&to) && self.g.members() == 1, "{what}: unicast DATA to {to} with {} members", self.g.members());
                    (Some(to), data)
                }
                Transmit { to: GroupDest::Client(to), datagram: Datagram::Control(packet) } => {
                    to_clients += 1;
                    match decode(&packet) {
                        Ok(Packet::Error { code, .. }) => {
                            assert_eq!(code, ErrorCode::UnknownTid, "{what}: ERROR {code:?} to {to}");
                            assert_eq!(stranger.map(|s| s.0), Some(to), "{what}: ERROR 5 to {to}, which sent nothing as a stranger");
                            errors_to_stranger += 1;
                        }
                        Ok(Packet::Oack(opts)) => {
                            assert!(self.g.is_member(&to), "{what}: OACK to non-member {to}");
                            let mc: Vec<&String> = opts.iter().filter(|(k, _)| k == "multicast").map(|(_, v)| v).collect();
                            assert_eq!(mc.len(), 1, "{what}: OACK without exactly one multicast option: {opts:?}");
                            let is_master = self.g.master() == Some(to);
                            assert_eq!(mc[0], &oack_value(self.cfg.group, is_master), "{what}: OACK to {to} (master {:?})", self.g.master());
                        }
                        other => panic!("{what}: unexpected packet to client {to}: {other:?}"),
                    }
                    continue;
                }
            };
            match t {
                Datagram::Data { block, payload } => {
                    data += 1;
                    assert!(self.g.started(), "{what}: DATA before the group started");
                    let index = Block::unrolled(block).0;
                    assert!(index >= 1 && index <= self.total(), "{what}: DATA block {index} outside 1..={}", self.total());
                    assert!(
                        index <= self.g.current_block() + window,
                        "{what}: DATA block {index} beyond the master's request {} + window {window}",
                        self.g.current_block()
                    );
                    assert_eq!(&payload[..], self.block_bytes(index), "{what}: wrong payload for block {index}");
                    if index < self.total() {
                        assert_eq!(payload.len(), self.cfg.blksize as usize);
                    } else {
                        assert!(payload.len() < self.cfg.blksize as usize);
                    }
                    for (c, s) in self.sims.iter_mut() {
                        if self.g.is_member(c) && only.is_none_or(|o| o == *c) {
                            s.have[index as usize] = true;
                        }
                    }
                }
                other => panic!("{what}: non-DATA sent as DATA: {other:?}"),
            }
        }
        while self.g.poll_event().is_some() {}
        assert!(data <= max_data, "{what}: {data} DATA packets for one event (allowed {max_data})");
        if let Some((_, is_error)) = stranger {
            assert_eq!(errors_to_stranger, if is_error { 0 } else { 1 }, "{what}: replies to a stranger");
            assert_eq!(data, 0, "{what}: a stranger's packet caused DATA");
        }
        // Rate limit of retransmissions on unexpected packets.
        let st = self.g.stats();
        if st.unexpected_retransmits > self.unexpected_retransmits {
            assert_eq!(st.unexpected_retransmits, self.unexpected_retransmits + 1, "{what}: several unexpected retransmissions at once");
            if let Some(t) = self.last_unexpected {
                assert!(
                    self.now - t >= self.cfg.min_timeout,
                    "{what}: unexpected retransmissions {:?} apart, min_timeout {:?}",
                    self.now - t,
                    self.cfg.min_timeout
                );
            }
            self.last_unexpected = Some(self.now);
            self.unexpected_retransmits = st.unexpected_retransmits;
        }
        let elapsed = self.now - self.t0;
        assert!(
            (st.unexpected_retransmits as u128) <= 1 + elapsed.as_nanos() / self.cfg.min_timeout.as_nanos(),
            "{what}: {} unexpected retransmissions in {elapsed:?}",
            st.unexpected_retransmits
        );
        // Membership.
        let distinct = self.joined.iter().filter(|j| **j).count();
        assert!(self.g.members() <= distinct && self.g.members() as u64 <= st.joins + self.carried, "{what}: {} members", self.g.members());
        assert_eq!(self.g.members() > 0, self.g.master().is_some(), "{what}: members {} master {:?}", self.g.members(), self.g.master());
        if let Some(m) = self.g.master() {
            assert!(self.g.is_member(&m));
        }
        if !was_started && self.g.started() {
            assert!(
                self.now >= self.cfg.start_at || (self.cfg.start_min_clients > 0 && self.g.members() >= self.cfg.start_min_clients),
                "{what}: started early"
            );
        }
        // Timer.
        match self.g.poll_timeout() {
            Some(d) => assert!(d >= self.now, "{what}: deadline in the past"),
            None => assert!(self.g.is_empty(), "{what}: a group with members and no deadline"),
        }
        (data, to_clients)
    }

    fn join(&mut self, c: u8, what: &str) {
        let was_member = self.g.is_member(&c);
        let joins = self.g.stats().joins;
        self.joined[c as usize] = true;
        self.sims.entry(c).or_insert_with(|| Sim { have: vec![false; self.g.total_blocks() as usize + 1] });
        self.g.join(self.now, c, vec![("blksize".into(), self.cfg.blksize.to_string())]);
        let window = self.cfg.window.max(1) as u64;
        let (data, to_clients) = self.drain(if was_member { 0 } else { window }, None, what);
        let last = self.request_oack[c as usize];
        if was_member {
            // A repeated request: its OACK again, at most once per round trip (>= min_timeout).
            assert!(to_clients <= 1, "{what}: a repeated request got {to_clients} OACKs");
            assert!(
                to_clients == 0 || last.is_none_or(|t| self.now - t >= self.cfg.min_timeout),
                "{what}: repeated requests answered {:?} apart, min_timeout {:?}",
                last.map(|t| self.now - t),
                self.cfg.min_timeout
            );
            assert_eq!(data, 0);
        } else {
            assert_eq!(to_clients, 1, "{what}: a join must be answered with exactly one OACK");
        }
        if to_clients == 1 {
            self.request_oack[c as usize] = Some(self.now);
        }
        assert_eq!(self.g.stats().joins, joins + u64::from(!was_member));
    }

    fn packet(&mut self, c: u8, pkt: Packet<'_>, what: &str) {
        let member = self.g.is_member(&c);
        if let (Packet::Ack(n), true) = (&pkt, member) {
            if *n > self.sim_ack(c) {
                self.lied[c as usize] = true;
            }
        }
        let master = self.g.master() == Some(c);
        let is_error = matches!(pkt, Packet::Error { .. });
        // A finished member's final ACK again is not answered (no ERROR 5): like an ERROR here.
        let final_ack_again = !member && self.g.finished_recently(&c) && matches!(pkt, Packet::Ack(n) if n as u64 >= self.g.total_blocks());
        self.g.handle(self.now, c, &pkt);
        let window = self.cfg.window.max(1) as u64;
        let max = if master { window } else { 1 };
        let stranger = (!member).then_some((c, is_error || final_ack_again));
        self.drain(max, stranger, what);
        if is_error && member {
            assert!(!self.g.is_member(&c), "{what}: a member's ERROR did not remove it");
        }
    }

    fn fire(&mut self, what: &str) {
        self.g.handle_timeout(self.now);
        let window = self.cfg.window.max(1) as u64;
        let (_, to_clients) = self.drain(window, None, what);
        // The master's OACK again, or a demotion (mc=0 twice to the old master, mc=1 to the
        // new).
        assert!(to_clients <= 3, "{what}: {to_clients} packets to clients on one timeout");
    }

    /// A fresh group takes the members over; the old one must fall silent.
    fn take_over(&mut self, what: &str) {
        let before: Vec<u8> = (0..CLIENTS).filter(|c| self.g.is_member(c)).collect();
        let members = self.g.drain_members();
        let mut ids: Vec<u8> = members.iter().map(|m| m.0).collect();
        let first = ids.first().copied();
        ids.sort();
        assert_eq!(ids, before, "{what}: drain_members did not hand over exactly the members");
        assert!(self.g.is_empty() && self.g.poll_timeout().is_none(), "{what}: drained group still has a timer");
        assert!(self.g.poll_transmit(self.now).is_none(), "{what}: drained group still sends");
        while self.g.poll_event().is_some() {}
        let mut fresh = Group::new(self.cfg.clone(), Bytes::from(self.data.clone()));
        let n = members.len() as u64;
        fresh.take_over(self.now, members);
        self.g = fresh;
        self.carried = n;
        self.last_unexpected = None;
        self.unexpected_retransmits = 0;
        // The new owner has answered none of their requests yet.
        self.request_oack = [None; CLIENTS as usize];
        self.t0 = self.now;
        let (_, to_clients) = self.drain(0, None, what);
        assert_eq!(self.g.members(), before.len(), "{what}: members after take_over");
        if first.is_some() {
            assert!(self.g.started(), "{what}: a group taken over must start at once");
            assert_eq!(self.g.master(), first, "{what}: the oldest member must lead after take_over");
            assert_eq!(to_clients, 1, "{what}: take_over must send exactly the new master's OACK");
        }
    }

    /// Well-behaved clients: the master acknowledges its first missing block - 1.
    fn pump(&mut self, rounds: u32) {
        for _ in 0..rounds {
            if self.g.is_empty() || self.pump_budget == 0 {
                return;
            }
            self.pump_budget -= 1;
            let before = (self.g.stats(), self.g.current_block(), self.g.master());
            if let Some(m) = self.g.master() {
                let a = self.sim_ack(m);
                self.packet(m, Packet::Ack(a), "pump ACK");
            }
            let after = (self.g.stats(), self.g.current_block(), self.g.master());
            if before.0.data_packets == after.0.data_packets && before.1 == after.1 && before.2 == after.2 && before.0.members_done == after.0.members_done {
                if let Some(d) = self.g.poll_timeout() {
                    self.now = self.now.max(d);
                    self.fire("pump timeout");
                }
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let blksize = 8 + input.blksize % 1500;
    let mut len = input.len as usize % 16384;
    if !fits_without_rollover(len as u64, blksize) {
        len = 65534 * blksize as usize;
    }
    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ input.seed as u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as u8
        })
        .collect();
    // The configuration space the node's validation allows.
    let timeout = Duration::from_millis(1 + input.timeout_ms as u64 % 10_000);
    let max_timeout = timeout.max(Duration::from_millis(input.max_timeout_ms as u64 % 20_000));
    let min_timeout = Duration::from_millis(1 + input.min_timeout_ms as u64 % 1000).min(max_timeout);
    let t0 = Instant::now();
    let cfg = GroupConfig {
        group: SocketAddrV4::new([239, 255, 68, 1].into(), 1758),
        blksize,
        window: 1 + (input.window % 16) as u16,
        timeout,
        min_timeout,
        max_timeout,
        master_retries: 1 + input.master_retries as u32 % 6,
        give_up_after: Duration::from_millis(input.give_up_ms as u64 % 2000),
        start_at: t0 + Duration::from_millis(input.start_delay_ms as u64 % 5000),
        start_min_clients: input.start_min_clients as usize % 5,
        slow_master_repairs: input.slow_master_repairs as u32 % 5,
        lone_member_unicast: input.lone_member_unicast,
        probe_blocks: input.probe_blocks as u32 % 128,
        rate: RateConfig { enabled: input.rate_control, floor: 1_000, ..Default::default() },
    };
    let g = Group::new(cfg.clone(), Bytes::from(data.clone()));
    let mut h = Harness {
        g,
        cfg,
        data,
        now: t0,
        t0,
        joined: [false; CLIENTS as usize],
        request_oack: [None; CLIENTS as usize],
        lied: [false; CLIENTS as usize],
        sims: BTreeMap::new(),
        last_unexpected: None,
        unexpected_retransmits: 0,
        carried: 0,
        pump_budget: 200_000,
    };
    assert_eq!(h.total(), h.data.len() as u64 / blksize as u64 + 1);

    for op in input.ops.iter().take(2000) {
        let what = format!("{op:?}");
        let c = |c: u8| c % CLIENTS;
        match *op {
            Op::Join(k) => h.join(c(k), &what),
            Op::Ack(k, b) => h.packet(c(k), Packet::Ack(b), &what),
            Op::AckRel(k, d) => {
                let b = Block(h.g.current_block()).wire().wrapping_add(d as i16 as u16);
                h.packet(c(k), Packet::Ack(b), &what)
            }
            Op::Error(k) => h.packet(c(k), Packet::Error { code: ErrorCode::NotDefined, message: "bye".into() }, &what),
            Op::Data(k) => h.packet(c(k), Packet::Data { block: 1, data: b"fuzz" }, &what),
            Op::Oack(k) => h.packet(c(k), Packet::Oack(vec![]), &what),
            Op::Request(k) => {
                let r = Request { filename: b"f".to_vec(), mode: Mode::Octet, options: vec![("multicast".into(), String::new())] };
                h.packet(c(k), Packet::Rrq(r), &what)
            }
            Op::Advance(ms) => {
                h.now += Duration::from_millis(ms as u64);
                h.fire(&what);
            }
            Op::Timeout => {
                if let Some(d) = h.g.poll_timeout() {
                    h.now = h.now.max(d);
                }
                h.fire(&what);
            }
            Op::Pump(n) => h.pump(n as u32),
            Op::TakeOver => h.take_over(&what),
        }
    }

    let members: Vec<u8> = (0..CLIENTS).filter(|c| h.g.is_member(c)).collect();
    // Timer rounds that may pass waiting for the delayed start (each at least min_timeout).
    let start_wait = if h.g.started() {
        0
    } else {
        (h.cfg.start_at.saturating_duration_since(h.now).as_nanos() / h.cfg.min_timeout.as_nanos()) as u32 + 2
    };
    // A master that answered before is kept `give_up_after` since its last progress: at most
    // that many more timeouts (each at least min_timeout) per member (a client that lied
    // about its blocks stalls its group that long).
    let patience = (h.cfg.give_up_after.as_nanos() / h.cfg.min_timeout.as_nanos()) as u32 + 1;
    if input.finish_well {
        h.pump_budget = u32::MAX;
        let bound = (h.total() as u32 + 10) * (members.len() as u32 + 1) * 4 + 100 + 2 * start_wait + 2 * patience * members.len() as u32;
        h.pump(bound);
        assert!(
            h.g.is_empty(),
            "well-behaved clients {members:?} did not finish within {bound} rounds: {:?}, rate {:?}, window {}, master {:?} at {} of {}, lied {:?}, {:?} of virtual time",
            h.g.stats(),
            h.g.rate(),
            h.g.window(),
            h.g.master(),
            h.g.current_block(),
            h.total(),
            h.lied,
            h.now - h.t0
        );
        for c in members.iter().filter(|c| !h.lied[**c as usize]) {
            let s = &h.sims[c];
            assert!(s.have[1..].iter().all(|x| *x), "client {c} left the group without every block");
        }
    } else {
        let bound = members.len() as u32 * (h.cfg.master_retries + 2 + patience) + 3 + start_wait;
        for _ in 0..bound {
            if h.g.is_empty() {
                break;
            }
            let d = h.g.poll_timeout().expect("group with members and no deadline");
            h.now = h.now.max(d);
            h.fire("silent clients");
        }
        assert!(h.g.is_empty(), "silent clients {members:?}: group not empty after {bound} timeouts");
    }
});
