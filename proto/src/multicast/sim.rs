//! A deterministic lab for groups (test-only): simulated RFC 2090 clients on a simulated
//! network with a one-way delay, seeded independent loss per client, and optionally a
//! receiver that cannot keep up (a receive queue of some datagrams drained at a fixed pace;
//! what overflows is dropped, as a socket buffer does).
//!
//! Two client behaviours, the two found in the field:
//! - [`Kind::InOrder`], the reference client (atftp): as master it keeps only the block it
//!   asks for next; on the first block out of order it sends one extra ACK and then ignores
//!   such blocks; it ACKs every block it keeps. Passive, it stores any block. It finishes only
//!   as master, by acknowledging the last block.
//! - [`Kind::Bitmap`] (`tftpcast get`, iPXE): keeps any block; as master it ACKs (first
//!   missing block - 1) on every DATA; it sends `ACK last` as soon as it has everything.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Event, Group, GroupConfig, GroupDest, RateConfig};
use crate::packet::{decode, Packet};
use crate::block::Block;
use crate::loss::Loss;
use crate::transmit::{Datagram, Transmit};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    InOrder,
    Bitmap,
}

#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub kind: Kind,
    /// Share of the datagrams to this client lost on the way (0..1), independently.
    pub loss: f64,
    /// Joins once this many first-pass blocks went out (None: at the start).
    pub join_after: Option<u64>,
    /// Goes silent once this many DATA packets went out.
    pub dies_after: Option<u64>,
    /// A receive queue of this many datagrams, drained one per this long.
    pub capacity: Option<(usize, Duration)>,
    /// The first copy of these blocks never arrives (a deterministic hole pattern).
    pub drop_first: Option<fn(u64) -> bool>,
}

impl ClientSpec {
    pub fn new(kind: Kind) -> Self {
        ClientSpec { kind, loss: 0.0, join_after: None, dies_after: None, capacity: None, drop_first: None }
    }
    pub fn loss(mut self, p: f64) -> Self {
        self.loss = p;
        self
    }
}

#[derive(Debug)]
pub struct SimClient {
    pub spec: ClientSpec,
    have: Vec<bool>,
    /// Copies of each block that arrived (for `drop_first`).
    seen: Vec<u32>,
    missing: u64,
    last: Option<u64>,
    master: bool,
    pub joined: bool,
    pub alive: bool,
    /// In-order master: the block it acknowledged last.
    expect: u64,
    extra_ack: bool,
    queue: VecDeque<Instant>,
    /// When it had every block.
    pub complete_at: Option<Instant>,
    /// It acknowledged the last block (and left).
    pub finished: bool,
    pub overruns: u64,
    pub lost: u64,
}

impl SimClient {
    pub fn complete(&self) -> bool {
        self.missing == 0
    }

    fn first_hole(&self) -> u64 {
        (1..self.have.len()).find(|b| !self.have[*b]).unwrap_or(self.have.len()) as u64
    }

    /// What it acknowledges: the block before its first hole, or the last block.
    fn ack(&self) -> u64 {
        self.first_hole() - 1
    }

    fn store(&mut self, b: u64) {
        if !self.have[b as usize] {
            self.have[b as usize] = true;
            self.missing -= 1;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Pkt {
    Data { block: u64, short: bool },
    Oack { master: bool },
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    Arrive(usize, Pkt),
    Process(usize, Pkt),
    Ack(usize, u64),
}

pub struct Lab {
    pub g: Group<u32>,
    pub clients: Vec<SimClient>,
    pub t0: Instant,
    pub now: Instant,
    owd: Duration,
    loss: Loss,
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    evs: Vec<Option<Ev>>,
    pub data_sent: u64,
    pub blocks: u64,
    blksize: u16,
    data: Vec<u8>,
    steps: u64,
    pub events: Vec<(Duration, Event<u32>)>,
}

/// A group configuration for the lab: blksize 512, window 8, 1 s initial timeout adapting
/// down to 50 ms, start 200 ms after `t0`, probes every 1024 blocks, rate control on.
pub fn config(t0: Instant) -> GroupConfig {
    GroupConfig {
        group: "239.255.0.1:1758".parse().unwrap(),
        blksize: 512,
        window: 8,
        timeout: Duration::from_millis(1000),
        min_timeout: Duration::from_millis(50),
        max_timeout: Duration::from_secs(2),
        master_retries: 4,
        give_up_after: Duration::from_secs(10),
        start_at: t0 + Duration::from_millis(200),
        start_min_clients: 0,
        slow_master_repairs: 4,
        lone_member_unicast: true,
        probe_blocks: 1024,
        rate: RateConfig::default(),
    }
}

pub fn file(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// The expected transmissions per block when `n` members each lose a share `p` of the
/// packets independently and every block goes out until all have it: E[max of n geometric
/// variables] = sum over k >= 0 of 1 - (1 - p^k)^n.
pub fn floor(p: f64, n: u32) -> f64 {
    (0..64).map(|k| 1.0 - (1.0 - p.powi(k)).powi(n as i32)).sum()
}

impl Lab {
    pub fn new(cfg: GroupConfig, data: &[u8], specs: Vec<ClientSpec>, seed: u64) -> Lab {
        let t0 = cfg.start_at - Duration::from_millis(200);
        let blksize = cfg.blksize;
        let g = Group::new(cfg, Bytes::copy_from_slice(data));
        let blocks = g.total_blocks();
        let clients = specs
            .into_iter()
            .map(|spec| SimClient {
                spec,
                have: vec![false; blocks as usize + 1],
                seen: vec![0; blocks as usize + 1],
                missing: blocks,
                last: None,
                master: false,
                joined: false,
                alive: true,
                expect: 0,
                extra_ack: false,
                queue: VecDeque::new(),
                complete_at: None,
                finished: false,
                overruns: 0,
                lost: 0,
            })
            .collect();
        Lab {
            g,
            clients,
            t0,
            now: t0,
            owd: Duration::from_micros(100),
            loss: Loss::new(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D)),
            heap: BinaryHeap::new(),
            evs: Vec::new(),
            data_sent: 0,
            blocks,
            blksize,
            data: data.to_vec(),
            steps: 0,
            events: Vec::new(),
        }
    }

    /// DATA packets per block of the file.
    pub fn ratio(&self) -> f64 {
        self.data_sent as f64 / self.blocks as f64
    }

    fn random(&mut self) -> f64 {
        self.loss.unit()
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        let id = self.evs.len() as u64;
        self.evs.push(Some(ev));
        self.heap.push(Reverse((at, id)));
    }

    fn joins(&mut self) {
        let first_pass = self.g.stats().first_pass;
        for c in 0..self.clients.len() {
            let cl = &self.clients[c];
            if cl.joined || !cl.alive || cl.spec.join_after.is_some_and(|n| first_pass < n) {
                continue;
            }
            self.clients[c].joined = true;
            self.g.join(self.now, c as u32, vec![("blksize".into(), self.blksize.to_string())]);
        }
    }

    fn drain(&mut self) {
        while let Some(o) = self.g.poll_transmit(self.now) {
            let at = self.now + self.owd;
            let (only, block, payload) = match o {
                Transmit { to: GroupDest::Client(to), datagram: Datagram::Control(packet) } => {
                    if let Ok(Packet::Oack(opts)) = decode(&packet) {
                        let master = opts.iter().any(|(k, v)| k == "multicast" && v.ends_with(",1"));
                        self.schedule(at, Ev::Arrive(to as usize, Pkt::Oack { master }));
                    }
                    continue;
                }
                Transmit { to: GroupDest::Group, datagram: Datagram::Data { block, payload } } => (None, block, payload),
                Transmit { to: GroupDest::Client(to), datagram: Datagram::Data { block, payload } } => (Some(to), block, payload),
                other => panic!("not DATA: {other:?}"),
            };
            self.data_sent += 1;
            let start = ((block as usize - 1) * self.blksize as usize).min(self.data.len());
            let end = (start + self.blksize as usize).min(self.data.len());
            assert_eq!(&payload[..], &self.data[start..end], "payload of block {block}");
            let pkt = Pkt::Data { block: block as u64, short: payload.len() < self.blksize as usize };
            for c in 0..self.clients.len() {
                if only.is_some_and(|o| o as usize != c) || !self.g.is_member(&(c as u32)) {
                    continue;
                }
                self.schedule(at, Ev::Arrive(c, pkt));
            }
            for c in self.clients.iter_mut() {
                if c.spec.dies_after.is_some_and(|n| self.data_sent >= n) {
                    c.alive = false;
                }
            }
        }
    }

    fn arrive(&mut self, c: usize, pkt: Pkt) {
        if !self.clients[c].alive {
            return;
        }
        let p = self.clients[c].spec.loss;
        if p > 0.0 && self.random() < p {
            self.clients[c].lost += 1;
            return;
        }
        if let Pkt::Data { block, .. } = pkt {
            let cl = &mut self.clients[c];
            cl.seen[block as usize] += 1;
            if cl.seen[block as usize] == 1 && cl.spec.drop_first.is_some_and(|f| f(block)) {
                return;
            }
        }
        let now = self.now;
        let cl = &mut self.clients[c];
        match cl.spec.capacity {
            None => self.process(c, pkt),
            Some((cap, service)) => {
                while cl.queue.front().is_some_and(|t| *t <= now) {
                    cl.queue.pop_front();
                }
                if cl.queue.len() >= cap {
                    cl.overruns += 1;
                    return;
                }
                let done = cl.queue.back().copied().unwrap_or(now).max(now) + service;
                cl.queue.push_back(done);
                self.schedule(done, Ev::Process(c, pkt));
            }
        }
    }

    fn send_ack(&mut self, c: usize, n: u64) {
        let at = self.now + self.owd;
        self.schedule(at, Ev::Ack(c, n));
    }

    fn process(&mut self, c: usize, pkt: Pkt) {
        let now = self.now;
        let cl = &mut self.clients[c];
        if !cl.alive || cl.finished {
            return;
        }
        let reply = match pkt {
            Pkt::Oack { master } => {
                cl.master = master;
                cl.extra_ack = false;
                if master {
                    cl.expect = cl.ack();
                    Some(cl.expect)
                } else {
                    None
                }
            }
            Pkt::Data { block, short } => {
                if short {
                    cl.last = Some(block);
                }
                match (cl.spec.kind, cl.master) {
                    (Kind::InOrder, true) => {
                        if block == cl.expect + 1 {
                            cl.store(block);
                            cl.extra_ack = false;
                            cl.expect = cl.ack();
                            Some(cl.expect)
                        } else if !cl.extra_ack {
                            cl.extra_ack = true;
                            Some(cl.expect)
                        } else {
                            None
                        }
                    }
                    (Kind::InOrder, false) => {
                        cl.store(block);
                        None
                    }
                    (Kind::Bitmap, master) => {
                        cl.store(block);
                        (master || cl.complete()).then(|| cl.ack())
                    }
                }
            }
        };
        if cl.complete() && cl.complete_at.is_none() {
            cl.complete_at = Some(now);
        }
        if let Some(n) = reply {
            if cl.last.is_some_and(|l| n >= l) {
                cl.finished = true;
            }
            self.send_ack(c, n);
        }
    }

    /// Runs until the group is empty (every member finished or was dropped).
    pub fn run(&mut self) -> &mut Self {
        loop {
            self.steps += 1;
            assert!(self.steps < 20_000_000, "livelock at {:?}", self.now - self.t0);
            self.joins();
            self.drain();
            let pending_joins = self.clients.iter().any(|c| !c.joined && c.alive);
            if self.g.is_empty() && self.heap.is_empty() && !pending_joins {
                break;
            }
            let ev = self.heap.peek().map(|r| r.0 .0);
            let gt = self.g.poll_timeout();
            let event_first = match (ev, gt) {
                (Some(e), Some(t)) => e <= t,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => {
                    if pending_joins && self.g.is_empty() {
                        // Everyone else is gone: a late joiner that never got its cue joins now.
                        for c in self.clients.iter_mut() {
                            c.spec.join_after = None;
                        }
                        continue;
                    }
                    break;
                }
            };
            if event_first {
                let Reverse((at, id)) = self.heap.pop().expect("peeked");
                self.now = self.now.max(at);
                match self.evs[id as usize].take().expect("event once") {
                    Ev::Arrive(c, p) => self.arrive(c, p),
                    Ev::Process(c, p) => self.process(c, p),
                    Ev::Ack(c, n) => {
                        if self.clients[c].alive {
                            self.g.handle(self.now, c as u32, &Packet::Ack(Block(n).wire()));
                        }
                    }
                }
            } else {
                self.now = self.now.max(gt.expect("a deadline"));
                self.g.handle_timeout(self.now);
            }
            while let Some(e) = self.g.poll_event() {
                self.events.push((self.now - self.t0, e));
            }
        }
        self
    }

    /// When the last of `clients` had the whole file, from the start.
    pub fn completed_by(&self, clients: impl IntoIterator<Item = usize>) -> Duration {
        clients.into_iter().map(|c| self.clients[c].complete_at.expect("complete") - self.t0).max().unwrap_or_default()
    }

    pub fn all_complete(&self) -> bool {
        self.clients.iter().all(|c| c.complete())
    }
}
