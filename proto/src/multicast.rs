//! RFC 2090 multicast TFTP, server side: one value per group, fed packets and instants.
//!
//! The RFC in brief: a client asks with the `multicast` option; the server's OACK names the
//! group (`addr,port,mc`) and whether this client is the master (`mc=1`). DATA goes to the
//! group. Only the master acknowledges, and its `ACK n` means "send me block n+1": a client
//! acknowledges the block before its first missing one, so the same message clocks the
//! stream and requests repairs. When the master has the whole file (it ACKs the last block)
//! or stops answering, the server sends an OACK with `mc=1` to the oldest other member, which
//! then asks for what it missed. A client that joins late simply receives from the current
//! block on and fills its holes when it becomes master.
//!
//! What the RFC leaves open, and this module decides:
//! - **Delayed start**: no DATA before `start_at` unless `start_min_clients` have joined, so
//!   more clients catch the first pass.
//! - **Sliding window**: up to `window` blocks beyond the master's request are in flight; a
//!   master ACK slides the window (clients accept blocks in any order).
//! - **Retransmit on an unexpected packet**: a duplicate master ACK (a hole), an ACK from a
//!   member that is not master, or a repeated request makes the group send its most recent
//!   DATA again, at most once per round-trip estimate, so a flood of such packets cannot
//!   multiply traffic.
//! - **Liveness**: a master that stays silent for `master_retries` timeouts is dropped and
//!   the next member promoted; a promoted member that never answers is dropped the same way.
//!
//! Block numbers do not roll over in multicast mode (the reference client keeps a bitmap of
//! 65536 blocks), so a group is only formed when the file fits in 65535 blocks: see
//! [`fits_without_rollover`].

use std::collections::VecDeque;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::packet::{self, ErrorCode, Packet};
use crate::rto::Rto;
use crate::transfer::Transmit;

/// True when a file of `len` bytes at `blksize` needs no block number above 65535.
pub fn fits_without_rollover(len: u64, blksize: u16) -> bool {
    len / blksize as u64 + 1 <= 65535
}

/// The value of the `multicast` option in an OACK.
pub fn oack_value(group: SocketAddrV4, master: bool) -> String {
    format!("{},{},{}", group.ip(), group.port(), if master { 1 } else { 0 })
}

#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub group: SocketAddrV4,
    pub blksize: u16,
    /// Blocks in flight beyond the master's request.
    pub window: u16,
    /// Initial retransmission timeout, then adapted to the master's round trips.
    pub timeout: Duration,
    pub min_timeout: Duration,
    pub max_timeout: Duration,
    /// Timeouts without an answer before a master is given up.
    pub master_retries: u32,
    /// Delayed start: no DATA before this instant...
    pub start_at: Instant,
    /// ...unless this many clients have joined (0: wait for `start_at`).
    pub start_min_clients: usize,
    /// A master that loses this many blocks in one tenure hands the lead to the next member
    /// and goes to the back of the queue (0: never).
    pub slow_master_repairs: u32,
    /// When one member is left, send it DATA by unicast instead of flooding the group.
    pub lone_member_unicast: bool,
}

/// A datagram the group wants sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<C> {
    /// Unicast to one client (OACK, ERROR), from the group's socket.
    ToClient { to: C, packet: Vec<u8> },
    /// DATA to the multicast group, from the group's socket.
    ToGroup(Transmit),
    /// DATA to one member by unicast, from the group's socket (the last member left).
    ToMember { to: C, data: Transmit },
}

/// Something worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<C> {
    Joined { client: C, master: bool, members: usize },
    Started { members: usize, early: bool },
    MasterChanged { from: Option<C>, to: C, resend_oack: bool },
    MemberDone { client: C },
    MemberLost { client: C, reason: &'static str },
    /// A master that kept losing blocks was moved to the back of the queue.
    MasterDemoted { client: C, repairs: u32 },
    /// No member left: the group may end.
    Empty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Passive,
    Master,
}

#[derive(Debug, Clone)]
struct Member<C> {
    id: C,
    role: Role,
    /// Blocks lost while master, this tenure.
    repairs: u32,
    /// Demoted for losing too much: led only when no one else can.
    slow: bool,
    /// Options of this member's OACK, without `multicast`.
    options: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    pub data_packets: u64,
    pub data_bytes: u64,
    /// DATA packets for blocks sent before (repairs, timeouts, unexpected packets).
    pub retransmits: u64,
    pub retransmitted_bytes: u64,
    /// The part of `retransmits` caused by loss (timeouts, holes the master reports), as
    /// opposed to blocks a late joiner asks for.
    pub loss_retransmits: u64,
    pub unexpected: u64,
    pub unexpected_retransmits: u64,
    pub timeouts: u64,
    pub remasters: u64,
    pub members_done: u64,
    pub members_lost: u64,
    pub joins: u64,
    pub demotions: u64,
    /// DATA packets sent by unicast to a lone member.
    pub unicast_data_packets: u64,
}

/// How many members that finished a group remembers (see `Group::done`).
pub const RECENTLY_DONE: usize = 256;

/// One multicast group.
#[derive(Debug)]
pub struct Group<C: Copy + Eq + std::fmt::Debug> {
    cfg: GroupConfig,
    data: Bytes,
    last: u64,
    members: VecDeque<Member<C>>,
    /// The latest members that acknowledged the last block (at most [`RECENTLY_DONE`]): a
    /// duplicate or retransmission of their final ACK is not a stranger's packet, and an
    /// ERROR 5 for it would turn their completed download into a failure (atftp aborts).
    done: VecDeque<C>,
    started: bool,
    /// The master has been sent its OACK and has not answered yet.
    master_pending: bool,
    /// The master's latest request: it has blocks 1..=base.
    base: u64,
    next: u64,
    high_water: u64,
    /// Blocks sent in the current pass from the master's request on; below this a send is a
    /// repair.
    last_sent: Option<u64>,
    deadline: Option<Instant>,
    retries: u32,
    current_timeout: Duration,
    rto: Rto,
    rtt_probe: Option<(u64, Instant)>,
    last_unexpected_retransmit: Option<Instant>,
    /// Blocks up to here, sent again after a timeout, are loss retransmissions.
    loss_resend_until: u64,
    out: VecDeque<Output<C>>,
    events: VecDeque<Event<C>>,
    stats: GroupStats,
}

impl<C: Copy + Eq + std::fmt::Debug> Group<C> {
    /// A group for `data` (already in wire form: netascii groups pass encoded bytes).
    pub fn new(cfg: GroupConfig, data: Bytes) -> Self {
        let last = data.len() as u64 / cfg.blksize as u64 + 1;
        let rto = Rto::new(cfg.timeout, cfg.min_timeout, cfg.max_timeout);
        Group {
            current_timeout: cfg.timeout,
            rto,
            cfg,
            data,
            last,
            members: VecDeque::new(),
            done: VecDeque::new(),
            started: false,
            master_pending: false,
            base: 0,
            next: 1,
            high_water: 0,
            last_sent: None,
            deadline: None,
            retries: 0,
            rtt_probe: None,
            last_unexpected_retransmit: None,
            loss_resend_until: 0,
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: GroupStats::default(),
        }
    }

    pub fn stats(&self) -> GroupStats {
        self.stats
    }
    pub fn members(&self) -> usize {
        self.members.len()
    }
    pub fn master(&self) -> Option<C> {
        self.members.iter().find(|m| m.role == Role::Master).map(|m| m.id)
    }
    pub fn is_member(&self, c: &C) -> bool {
        self.members.iter().any(|m| m.id == *c)
    }
    /// Whether `c` is one of the latest members to acknowledge the last block.
    pub fn finished_recently(&self, c: &C) -> bool {
        self.done.contains(c)
    }
    pub fn started(&self) -> bool {
        self.started
    }
    /// The block the master asked for last (its contiguous prefix).
    pub fn current_block(&self) -> u64 {
        self.base
    }
    pub fn total_blocks(&self) -> u64 {
        self.last
    }
    pub fn group(&self) -> SocketAddrV4 {
        self.cfg.group
    }
    pub fn timeout(&self) -> Duration {
        self.rto.timeout()
    }
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Members in join order: (client, is master, OACK options), for announcements.
    pub fn member_list(&self) -> Vec<(C, bool, Vec<(String, String)>)> {
        self.members.iter().map(|m| (m.id, m.role == Role::Master, m.options.clone())).collect()
    }

    /// Hands every member over (to another node's group) and leaves this group empty and
    /// silent: it sends nothing more.
    pub fn drain_members(&mut self) -> Vec<(C, Vec<(String, String)>)> {
        self.deadline = None;
        self.out.clear();
        self.master_pending = false;
        self.members.drain(..).map(|m| (m.id, m.options)).collect()
    }

    /// Takes over a group whose owner died: the members (in join order) already know the
    /// group, since its address and transfer port are unchanged. Sending starts at once: the
    /// oldest member is made master and asks for what it lacks.
    pub fn take_over(&mut self, now: Instant, members: Vec<(C, Vec<(String, String)>)>) {
        for (id, options) in members {
            if !self.is_member(&id) {
                self.members.push_back(Member { id, role: Role::Passive, repairs: 0, slow: false, options });
            }
        }
        self.started = true;
        if let Some(first) = self.members.front().map(|m| m.id) {
            if self.master().is_none() {
                self.promote(now, first, true, None);
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<Event<C>> {
        self.events.pop_front()
    }

    fn oack(&self, m: &Member<C>, master: bool) -> Vec<u8> {
        let mut opts = m.options.clone();
        opts.push(("multicast".to_string(), oack_value(self.cfg.group, master)));
        packet::Packet::Oack(opts).to_vec()
    }

    fn arm(&mut self, now: Instant) {
        self.deadline = Some(now + self.current_timeout);
    }

    /// A client asks to join (its RRQ carried `multicast`). `options` are the other options
    /// its OACK acknowledges (tsize, blksize, ...). A client already in the group gets its
    /// OACK again (its first was lost, so it asked again).
    pub fn join(&mut self, now: Instant, client: C, options: Vec<(String, String)>) {
        if let Some(m) = self.members.iter().find(|m| m.id == client) {
            let pkt = self.oack(m, m.role == Role::Master);
            self.out.push_back(Output::ToClient { to: client, packet: pkt });
            return;
        }
        self.stats.joins += 1;
        let m = Member { id: client, role: Role::Passive, repairs: 0, slow: false, options };
        self.members.push_back(m);
        if self.master().is_none() {
            self.promote(now, client, false, None);
        } else {
            let m = self.members.back().unwrap();
            let pkt = self.oack(m, false);
            self.out.push_back(Output::ToClient { to: client, packet: pkt });
        }
        self.events.push_back(Event::Joined { client, master: self.master() == Some(client), members: self.members.len() });
        if !self.started && self.cfg.start_min_clients > 0 && self.members.len() >= self.cfg.start_min_clients {
            self.started = true;
            self.events.push_back(Event::Started { members: self.members.len(), early: true });
        }
    }

    /// Makes `client` the master and sends it an OACK with mc=1. `from` is the master being
    /// replaced, for the event.
    fn promote(&mut self, now: Instant, client: C, remaster: bool, from: Option<C>) {
        for m in self.members.iter_mut() {
            m.role = if m.id == client { Role::Master } else { Role::Passive };
            if m.id == client {
                m.repairs = 0;
            }
        }
        let m = self.members.iter().find(|m| m.id == client).unwrap();
        // The full options even for a member that joined long ago: passive members never
        // acknowledge their OACK, so a member whose first OACK was lost learns the block size
        // from this one (with `multicast` alone it would take the default 512 and refuse the
        // group's DATA).
        let pkt = self.oack(m, true);
        self.out.push_back(Output::ToClient { to: client, packet: pkt });
        self.master_pending = true;
        self.retries = 0;
        self.current_timeout = self.rto.timeout();
        self.rtt_probe = None;
        // What the new master asks for is a repair, not a loss of the previous master's.
        self.loss_resend_until = 0;
        self.arm(now);
        if remaster {
            self.stats.remasters += 1;
            self.events.push_back(Event::MasterChanged { from, to: client, resend_oack: true });
        }
    }

    /// Removes a member; a departing master hands over to the oldest member left.
    fn remove(&mut self, now: Instant, client: C, done: bool, reason: &'static str) {
        let Some(pos) = self.members.iter().position(|m| m.id == client) else { return };
        let was_master = self.members[pos].role == Role::Master;
        self.members.remove(pos);
        if done {
            if self.done.len() == RECENTLY_DONE {
                self.done.pop_front();
            }
            self.done.push_back(client);
            self.stats.members_done += 1;
            self.events.push_back(Event::MemberDone { client });
        } else {
            self.stats.members_lost += 1;
            self.events.push_back(Event::MemberLost { client, reason });
        }
        if was_master {
            self.master_pending = false;
            if let Some(next) = self.next_master() {
                self.promote(now, next, true, Some(client));
            } else {
                self.deadline = None;
            }
        }
        if self.members.is_empty() {
            self.deadline = None;
            self.events.push_back(Event::Empty);
        }
    }

    /// The member to lead next: the oldest one not demoted, else the oldest.
    fn next_master(&self) -> Option<C> {
        self.members.iter().find(|m| m.role == Role::Passive && !m.slow).or_else(|| self.members.iter().find(|m| m.role == Role::Passive)).map(|m| m.id)
    }

    /// The master lost another block. A master on a bad link clocks the whole group at its
    /// pace; past `slow_master_repairs` losses in one tenure it goes to the back of the
    /// queue (it gets its holes later, when it leads again or is alone) and the next member
    /// leads. Returns whether the master changed.
    fn master_struggles(&mut self, now: Instant) -> bool {
        let limit = self.cfg.slow_master_repairs;
        let Some(pos) = self.members.iter().position(|m| m.role == Role::Master) else { return false };
        self.members[pos].repairs += 1;
        if limit == 0 || self.members[pos].repairs < limit {
            return false;
        }
        let Some(next) = self.members.iter().find(|m| m.role == Role::Passive && !m.slow).map(|m| m.id) else { return false };
        let mut m = self.members.remove(pos).expect("position");
        m.slow = true;
        m.role = Role::Passive;
        let id = m.id;
        self.members.push_back(m);
        let demote = packet::Packet::Oack(vec![("multicast".to_string(), oack_value(self.cfg.group, false))]).to_vec();
        self.out.push_back(Output::ToClient { to: id, packet: demote });
        self.stats.demotions += 1;
        self.events.push_back(Event::MasterDemoted { client: id, repairs: limit });
        self.promote(now, next, true, Some(id));
        true
    }

    /// Where DATA goes: the group, or the last member by unicast.
    fn data_output(&mut self, t: Transmit) -> Output<C> {
        if self.cfg.lone_member_unicast && self.members.len() == 1 {
            self.stats.unicast_data_packets += 1;
            return Output::ToMember { to: self.members[0].id, data: t };
        }
        Output::ToGroup(t)
    }

    /// Feeds a packet that arrived on the group's socket from `from`.
    pub fn handle(&mut self, now: Instant, from: C, pkt: &Packet<'_>) {
        let Some(role) = self.members.iter().find(|m| m.id == from).map(|m| m.role) else {
            // A finished member's final ACK again (duplicated, or retransmitted while it
            // dallies): nothing to answer.
            if matches!(pkt, Packet::Ack(n) if *n as u64 >= self.last) && self.finished_recently(&from) {
                return;
            }
            // Not a member: RFC 1350 answers a stranger's packet with error 5.
            if !matches!(pkt, Packet::Error { .. }) {
                self.out.push_back(Output::ToClient { to: from, packet: packet::error_packet(ErrorCode::UnknownTid, "Unknown transfer ID") });
            }
            return;
        };
        match (pkt, role) {
            (Packet::Error { .. }, _) => self.remove(now, from, false, "client sent an error"),
            (Packet::Ack(n), _) if *n as u64 >= self.last => self.remove(now, from, true, ""),
            (Packet::Ack(n), Role::Master) => self.on_master_ack(now, *n as u64),
            _ => {
                self.unexpected(now);
            }
        }
    }

    fn on_master_ack(&mut self, now: Instant, n: u64) {
        if self.master_pending {
            // The (new) master's first request: serve from whatever it lacks.
            self.master_pending = false;
            self.base = n;
            self.next = n + 1;
            self.retries = 0;
            self.current_timeout = self.rto.timeout();
            self.arm(now);
            return;
        }
        if n > self.base {
            if let Some((probe, at)) = self.rtt_probe {
                if n >= probe {
                    self.rto.on_sample(now.saturating_duration_since(at));
                    self.rtt_probe = None;
                }
            }
            self.base = n;
            self.next = self.next.max(n + 1);
            self.retries = 0;
            self.current_timeout = self.rto.timeout();
            self.arm(now);
        } else if n == self.base && self.next > n + 1 {
            // The master still lacks block n+1 although later ones went out: a hole.
            if !self.master_struggles(now) && self.unexpected(now) {
                self.stats.loss_retransmits += 1;
            }
        } else {
            self.stats.unexpected += 1;
        }
    }

    /// Retransmits the most recent DATA, at most once per round-trip estimate. Returns
    /// whether it did.
    fn unexpected(&mut self, now: Instant) -> bool {
        self.stats.unexpected += 1;
        let Some(block) = self.last_sent.map(|b| if self.base + 1 < b && self.base < self.high_water { self.base + 1 } else { b }) else { return false };
        let interval = self.rto.srtt().unwrap_or(self.cfg.min_timeout).max(self.cfg.min_timeout);
        if let Some(t) = self.last_unexpected_retransmit {
            if now.saturating_duration_since(t) < interval {
                return false;
            }
        }
        self.last_unexpected_retransmit = Some(now);
        self.stats.unexpected_retransmits += 1;
        self.stats.retransmits += 1;
        let t = self.data_packet(block);
        self.stats.retransmitted_bytes += t.len() as u64;
        let o = self.data_output(t);
        self.out.push_back(o);
        true
    }

    fn data_packet(&mut self, index: u64) -> Transmit {
        let blk = self.cfg.blksize as u64;
        let len = self.data.len() as u64;
        let start = ((index - 1) * blk).min(len);
        let end = (start + blk).min(len);
        let payload = self.data.slice(start as usize..end as usize);
        self.stats.data_packets += 1;
        self.stats.data_bytes += 4 + payload.len() as u64;
        Transmit::Data { block: index as u16, payload }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.started && now >= self.cfg.start_at {
            self.started = true;
            self.events.push_back(Event::Started { members: self.members.len(), early: false });
        }
        let Some(deadline) = self.deadline else { return };
        if now < deadline {
            return;
        }
        let Some(master) = self.master() else {
            self.deadline = None;
            return;
        };
        if !self.started && !self.master_pending {
            // Waiting for the delayed start is not the master's fault.
            self.arm(now);
            return;
        }
        self.stats.timeouts += 1;
        self.retries += 1;
        if self.retries > self.cfg.master_retries {
            self.remove(now, master, false, "master stopped answering");
            return;
        }
        self.current_timeout = (self.current_timeout * 2).min(self.cfg.max_timeout);
        if self.master_pending {
            let m = self.members.iter().find(|m| m.id == master).unwrap();
            // The promotion OACK again, with the full options (see `promote`).
            let pkt = self.oack(m, true);
            self.out.push_back(Output::ToClient { to: master, packet: pkt });
        } else {
            if self.master_struggles(now) {
                return;
            }
            // Go back to the master's request and resend the window.
            self.next = self.base + 1;
            self.loss_resend_until = self.high_water.min(self.base + self.cfg.window.max(1) as u64);
            self.rtt_probe = None;
        }
        self.arm(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let start = (!self.started && !self.members.is_empty()).then_some(self.cfg.start_at);
        match (self.deadline, start) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Output<C>> {
        if let Some(o) = self.out.pop_front() {
            return Some(o);
        }
        if !self.started || self.master_pending || self.master().is_none() {
            return None;
        }
        let end = (self.base + self.cfg.window.max(1) as u64).min(self.last);
        if self.next > end {
            return None;
        }
        let index = self.next;
        self.next += 1;
        // The timer runs from the last transmission (pacing may spread a window out).
        self.arm(now);
        if index <= self.high_water {
            self.stats.retransmits += 1;
            if index <= self.loss_resend_until {
                self.stats.loss_retransmits += 1;
            }
            let blk = self.cfg.blksize as u64;
            self.stats.retransmitted_bytes += 4 + (self.data.len() as u64).saturating_sub((index - 1) * blk).min(blk);
        } else {
            self.high_water = index;
            if self.rtt_probe.is_none() {
                self.rtt_probe = Some((index, now));
            }
        }
        self.last_sent = Some(index);
        let t = self.data_packet(index);
        Some(self.data_output(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::decode;
    use std::collections::BTreeMap;

    type Client = u32;

    fn cfg(start_at: Instant, window: u16) -> GroupConfig {
        GroupConfig {
            group: "239.255.0.1:1758".parse().unwrap(),
            blksize: 512,
            window,
            timeout: Duration::from_millis(500),
            min_timeout: Duration::from_millis(50),
            max_timeout: Duration::from_secs(2),
            master_retries: 3,
            start_at,
            start_min_clients: 0,
            slow_master_repairs: 0,
            lone_member_unicast: false,
        }
    }

    fn mc_flag(pkt: &[u8]) -> Option<bool> {
        match decode(pkt).ok()? {
            Packet::Oack(opts) => opts.iter().find(|(k, _)| k == "multicast").map(|(_, v)| v.ends_with(",1")),
            _ => None,
        }
    }

    /// A simulated RFC 2090 client, behaving like the reference one: it stores any block,
    /// and as master ACKs (first missing block - 1) for every packet it gets.
    #[derive(Default)]
    struct Sim {
        blocks: BTreeMap<u64, Bytes>,
        master: bool,
        last: Option<u64>,
        alive: bool,
        done_at: Option<Instant>,
        elapsed: Option<Duration>,
    }

    impl Sim {
        fn first_hole(&self) -> u64 {
            let mut b = 1;
            while self.blocks.contains_key(&b) {
                b += 1;
            }
            b
        }
        fn ack(&self) -> u16 {
            let h = self.first_hole();
            match self.last {
                Some(l) if h > l => l as u16,
                _ => (h - 1) as u16,
            }
        }
        fn complete(&self, data: &[u8], blk: usize) -> bool {
            let mut v = Vec::new();
            for b in self.blocks.values() {
                v.extend_from_slice(b);
            }
            self.last.is_some() && self.first_hole() > self.last.unwrap() && v == data && self.blocks.len() == data.len() / blk + 1
        }
    }

    /// A simulated run. `loss` gives each client's DATA loss in percent (seeded, so runs
    /// repeat), `kill` makes a client go silent once that many DATA packets were sent,
    /// `late` joins a client after that many.
    struct Scenario {
        clients: u32,
        window: u16,
        loss: fn(Client) -> u64,
        kill: Option<(Client, u64)>,
        late: Option<(Client, u64)>,
        slow_master_repairs: u32,
        lone_member_unicast: bool,
    }

    impl Default for Scenario {
        fn default() -> Self {
            Scenario { clients: 4, window: 4, loss: |_| 0, kill: None, late: None, slow_master_repairs: 0, lone_member_unicast: false }
        }
    }

    /// Drives a group with simulated clients until it is empty; returns the group and the
    /// clients, each with the virtual time it had the whole file.
    fn drive(data: &[u8], sc: Scenario) -> (Group<Client>, Vec<Sim>) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut c = cfg(t0 + Duration::from_millis(200), sc.window);
        c.slow_master_repairs = sc.slow_master_repairs;
        c.lone_member_unicast = sc.lone_member_unicast;
        let mut g = Group::new(c, Bytes::copy_from_slice(data));
        let mut sims: Vec<Sim> = (0..sc.clients).map(|_| Sim { alive: true, ..Default::default() }).collect();
        for c in 0..sc.clients {
            if sc.late.map(|l| l.0) != Some(c) {
                g.join(now, c, vec![("blksize".into(), "512".into())]);
            }
        }
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut sent = 0u64;
        let mut steps = 0;
        while !g.is_empty() {
            steps += 1;
            assert!(steps < 1_000_000, "livelock");
            let mut acks: Vec<(Client, u16)> = Vec::new();
            while let Some(o) = g.poll_transmit(now) {
                let (only, block, payload) = match o {
                    Output::ToClient { to, packet } => {
                        if let Some(m) = mc_flag(&packet) {
                            let s = &mut sims[to as usize];
                            s.master = m;
                            if m && s.alive {
                                acks.push((to, s.ack()));
                            }
                        }
                        continue;
                    }
                    Output::ToGroup(Transmit::Data { block, payload }) => (None, block, payload),
                    Output::ToMember { to, data: Transmit::Data { block, payload } } => (Some(to), block, payload),
                    _ => unreachable!(),
                };
                sent += 1;
                for (c, s) in sims.iter_mut().enumerate() {
                    let c = c as u32;
                    if !s.alive || !g.is_member(&c) || only.is_some_and(|o| o != c) {
                        continue;
                    }
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if rng % 100 < (sc.loss)(c) {
                        continue;
                    }
                    if payload.len() < 512 {
                        s.last = Some(block as u64);
                    }
                    s.blocks.insert(block as u64, payload.clone());
                    if s.done_at.is_none() && s.last.is_some_and(|l| s.first_hole() > l) {
                        s.done_at = Some(now);
                    }
                    if s.master {
                        acks.push((c, s.ack()));
                    }
                }
            }
            if let Some((c, at)) = sc.kill {
                if sent >= at {
                    sims[c as usize].alive = false;
                }
            }
            if let Some((c, at)) = sc.late {
                if sent >= at && !g.is_member(&c) && sims[c as usize].blocks.is_empty() {
                    g.join(now, c, vec![]);
                    continue;
                }
            }
            if acks.is_empty() {
                now = g.poll_timeout().expect("a group with members always has a deadline");
                g.handle_timeout(now);
            }
            for (c, a) in acks {
                if sims[c as usize].alive {
                    g.handle(now, c, &Packet::Ack(a));
                }
            }
        }
        for s in sims.iter_mut() {
            s.elapsed = s.done_at.map(|t| t - t0);
        }
        (g, sims)
    }

    fn file(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn eight_clients_get_the_file_sent_once() {
        let data = file(300_000);
        let (g, sims) = drive(&data, Scenario { clients: 8, window: 8, ..Default::default() });
        assert!(sims.iter().all(|s| s.complete(&data, 512)));
        let st = g.stats();
        assert_eq!(st.members_done, 8);
        assert_eq!(st.retransmits, 0);
        assert_eq!(st.data_packets, data.len() as u64 / 512 + 1);
        assert_eq!(st.remasters, 7);
    }

    #[test]
    fn late_joiner_gets_the_blocks_it_missed() {
        let data = file(200_000);
        let (g, sims) = drive(&data, Scenario { late: Some((3, 200)), ..Default::default() });
        assert!(sims.iter().all(|s| s.complete(&data, 512)));
        let repairs = g.stats().retransmits;
        assert!((190..=260).contains(&repairs), "{repairs} repairs for ~200 missed blocks");
    }

    #[test]
    fn killed_master_is_replaced_and_others_finish() {
        let data = file(200_000);
        let (g, sims) = drive(&data, Scenario { kill: Some((0, 150)), ..Default::default() });
        assert!(sims[1..].iter().all(|s| s.complete(&data, 512)));
        assert!(!sims[0].complete(&data, 512));
        assert_eq!(g.stats().members_lost, 1);
        assert_eq!(g.stats().members_done, 3);
    }

    #[test]
    fn everyone_finishes_under_loss() {
        let data = file(150_000);
        let (g, sims) = drive(&data, Scenario { clients: 6, window: 8, loss: |_| 10, ..Default::default() });
        assert!(sims.iter().all(|s| s.complete(&data, 512)));
        assert_eq!(g.stats().members_done, 6);
    }

    /// One client behind 10% loss leads first. Without the slow-master rule the group moves
    /// at its pace; with it the client is demoted and the others finish much sooner, while it
    /// still gets everything (alone at the end, by unicast).
    #[test]
    fn a_lossy_master_is_demoted_and_does_not_hold_the_others_back() {
        let data = file(400_000);
        let lossy = |c: Client| if c == 0 { 10 } else { 0 };
        let run = |repairs: u32| drive(&data, Scenario { clients: 5, window: 8, loss: lossy, slow_master_repairs: repairs, lone_member_unicast: true, ..Default::default() });
        let (g_off, off) = run(0);
        let (g_on, on) = run(8);
        assert!(off.iter().chain(on.iter()).all(|s| s.complete(&data, 512)));
        let others = |sims: &[Sim]| sims[1..].iter().map(|s| s.elapsed.unwrap()).max().unwrap();
        let clean = drive(&data, Scenario { clients: 4, window: 8, ..Default::default() }).1.iter().map(|s| s.elapsed.unwrap()).max().unwrap();
        assert!(g_on.stats().demotions >= 1);
        assert_eq!(g_off.stats().demotions, 0);
        assert!(others(&on) < others(&off), "demotion must help: {:?} vs {:?}", others(&on), others(&off));
        // The bound: the others finish within the loss-free time plus the demotion cost
        // (8 losses, each at most one timeout) plus slack for the first RTT estimates.
        let bound = clean + Duration::from_millis(500) * 8 + Duration::from_secs(1);
        assert!(others(&on) <= bound, "others took {:?}, bound {:?} (clean run {:?})", others(&on), bound, clean);
        assert!(g_on.stats().unicast_data_packets > 0, "the lossy client's repairs went by unicast once it was alone");
    }

    #[test]
    fn delayed_start_then_early_start_with_enough_clients() {
        let t0 = Instant::now();
        let mut g: Group<Client> = Group::new(cfg(t0 + Duration::from_secs(5), 4), Bytes::from(file(5000)));
        g.join(t0, 1, vec![]);
        while g.poll_transmit(t0).is_some() {}
        g.handle(t0, 1, &Packet::Ack(0));
        assert!(g.poll_transmit(t0).is_none(), "no DATA before the start delay");
        assert!(g.poll_timeout().unwrap() <= t0 + Duration::from_secs(5));
        let mut c = cfg(t0 + Duration::from_secs(5), 4);
        c.start_min_clients = 2;
        let mut g: Group<Client> = Group::new(c, Bytes::from(file(5000)));
        g.join(t0, 1, vec![]);
        g.handle(t0, 1, &Packet::Ack(0));
        while g.poll_transmit(t0).is_some() {}
        g.join(t0, 2, vec![]);
        let outs: Vec<_> = std::iter::from_fn(|| g.poll_transmit(t0)).collect();
        assert_eq!(outs.iter().filter(|o| matches!(o, Output::ToGroup(_))).count(), 4);
        assert!(std::iter::from_fn(|| g.poll_event()).any(|e| e == Event::Started { members: 2, early: true }));
    }

    #[test]
    fn unexpected_packet_flood_is_bounded() {
        let t0 = Instant::now();
        let mut g: Group<Client> = Group::new(cfg(t0, 1), Bytes::from(file(50_000)));
        g.join(t0, 1, vec![]);
        g.join(t0, 2, vec![]);
        g.handle_timeout(t0);
        while g.poll_transmit(t0).is_some() {}
        g.handle(t0, 1, &Packet::Ack(0));
        while g.poll_transmit(t0).is_some() {}
        let before = g.stats().data_packets;
        // 1000 ACKs from a member that is not master, within 10 ms.
        for i in 0..1000u32 {
            let now = t0 + Duration::from_micros(i as u64 * 10);
            g.handle(now, 2, &Packet::Ack(3));
            while g.poll_transmit(now).is_some() {}
        }
        let extra = g.stats().data_packets - before;
        assert!(extra <= 1, "{extra} retransmissions for 1000 unexpected ACKs");
        assert_eq!(g.stats().unexpected, 1000);
    }

    #[test]
    fn stranger_gets_error_5_and_oack_is_resent_on_repeat_request() {
        let t0 = Instant::now();
        let mut g: Group<Client> = Group::new(cfg(t0, 1), Bytes::from(file(5000)));
        g.join(t0, 1, vec![("tsize".into(), "5000".into())]);
        let first = g.poll_transmit(t0).unwrap();
        g.join(t0, 1, vec![("tsize".into(), "5000".into())]);
        assert_eq!(g.poll_transmit(t0).unwrap(), first);
        g.handle(t0, 9, &Packet::Ack(1));
        let Some(Output::ToClient { to: 9, packet }) = g.poll_transmit(t0) else { panic!() };
        assert!(matches!(decode(&packet), Ok(Packet::Error { code: ErrorCode::UnknownTid, .. })));
        assert_eq!(g.members(), 1);
    }

    #[test]
    fn a_finished_members_repeated_final_ack_gets_no_error() {
        let t0 = Instant::now();
        let mut g: Group<Client> = Group::new(cfg(t0, 1), Bytes::from(file(1000)));
        g.join(t0, 1, vec![]);
        g.join(t0, 2, vec![]);
        while g.poll_transmit(t0).is_some() {}
        let last = g.total_blocks() as u16;
        g.handle(t0, 1, &Packet::Ack(last));
        assert!(!g.is_member(&1) && g.finished_recently(&1));
        while g.poll_transmit(t0).is_some() {}
        // Its final ACK again: silence. Anything else from it, or any stranger: ERROR 5.
        g.handle(t0, 1, &Packet::Ack(last));
        assert!(g.poll_transmit(t0).is_none(), "a finished member's repeated final ACK was answered");
        g.handle(t0, 1, &Packet::Ack(0));
        assert!(matches!(g.poll_transmit(t0), Some(Output::ToClient { to: 1, .. })));
        g.handle(t0, 9, &Packet::Ack(last));
        assert!(matches!(g.poll_transmit(t0), Some(Output::ToClient { to: 9, .. })));
    }

    #[test]
    fn take_over_promotes_the_oldest_member_which_gets_its_holes() {
        let t0 = Instant::now();
        let data = file(20_000);
        let mut g: Group<Client> = Group::new(cfg(t0 + Duration::from_secs(5), 4), Bytes::from(data.clone()));
        g.take_over(t0, vec![(7, vec![]), (8, vec![])]);
        assert!(g.started());
        let Some(Output::ToClient { to: 7, packet }) = g.poll_transmit(t0) else { panic!("OACK to the oldest member") };
        assert_eq!(mc_flag(&packet), Some(true));
        // Member 7 had blocks 1..=10: it asks for 11, and DATA resumes there without delay.
        g.handle(t0, 7, &Packet::Ack(10));
        let Some(Output::ToGroup(Transmit::Data { block: 11, .. })) = g.poll_transmit(t0) else { panic!("block 11") };
        let drained = g.drain_members();
        assert_eq!(drained.iter().map(|m| m.0).collect::<Vec<_>>(), vec![7, 8]);
        assert!(g.poll_transmit(t0).is_none());
        assert_eq!(g.poll_timeout(), None);
    }

    #[test]
    fn rollover_limit() {
        assert!(fits_without_rollover(65534 * 512, 512));
        assert!(!fits_without_rollover(65535 * 512, 512));
        assert!(fits_without_rollover(40 << 20, 1428));
    }
}
