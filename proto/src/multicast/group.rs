//! One RFC 2090 group: joins, the master's ACKs and timer expiries in; OACKs, DATA, events
//! and deadlines out. The policies it applies are described in the module docs above.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::rate::{GroupRate, RateChange};
use super::window::{LossEstimate, Window};
use super::{oack_value, Event, GroupConfig, GroupDest, GroupStats, Handover, PROBE_INTERVAL, RECENTLY_DONE};
use crate::packet::{self, ErrorCode, Packet};
use crate::pacing::{burst_for, TokenBucket};
use crate::rto::Rto;
use crate::block::Block;
use crate::transmit::{Datagram, Transmit};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Passive,
    Master,
}

#[derive(Debug, Clone)]
struct Member<C> {
    id: C,
    role: Role,
    /// Blocks lost while leading, this tenure (holes it reported, timeouts).
    lost: u32,
    /// Demoted for losing too much: led only when no one else can.
    slow: bool,
    /// Options of this member's OACK, without `multicast`.
    options: Vec<(String, String)>,
    /// The frontier when it joined: blocks up to here went out before it listened.
    joined_at: u64,
    /// The frontier when it last stopped leading (or joined): it has listened since.
    listened_from: u64,
    /// Its loss per block while leading, for the window.
    loss: LossEstimate,
    /// Seen keeping blocks that arrived after a hole (a bitmap client).
    keeps_out_of_order: bool,
    /// What it lost while listening made the group slow down.
    held_back: bool,
    /// It has led before: `loss` is its own.
    led: bool,
    /// When its request (first or repeated) last got an OACK: a repeat gets it again at most
    /// once per round trip.
    oack_at: Option<Instant>,
}

impl<C> Member<C> {
    fn new(id: C, options: Vec<(String, String)>, frontier: u64) -> Self {
        Member {
            id,
            role: Role::Passive,
            lost: 0,
            slow: false,
            options,
            joined_at: frontier,
            listened_from: frontier,
            loss: LossEstimate::default(),
            keeps_out_of_order: false,
            held_back: false,
            led: false,
            oack_at: None,
        }
    }
}

/// Why blocks below the frontier are being sent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Hole,
    Timeout,
    Remaster,
}

/// A hole being repaired: the block, when, and how far the sweep had gone before (to learn
/// whether the master kept what came after it).
#[derive(Debug, Clone, Copy)]
struct Hole {
    block: u64,
    sent_upto: u64,
    /// When the repair went out.
    repaired_at: Option<Instant>,
    /// The blocks sent after it were new to the master (it was past its own sweep), so the
    /// answer tells whether it kept them.
    telling: bool,
}

/// The repair sweep of a newly promoted master, counted for the rate.
#[derive(Debug, Clone, Copy)]
struct Sweep {
    /// Blocks it lacked that went out while it listened.
    lost: u64,
    /// First-pass blocks that went out while it listened.
    of: u64,
    joined_at: u64,
    /// The frontier when it was promoted: the sweep ends when it has everything up to here.
    until: u64,
    /// The highest block sent for it so far: a block sent again is not a new hole.
    counted_upto: u64,
}

/// Options of a member's OACK besides `multicast`.
pub type Options = Vec<(String, String)>;

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
    /// The next block of the current sweep.
    next: u64,
    /// The highest block ever sent: above it is the first pass (the frontier).
    high_water: u64,
    /// The most recent DATA and when it went out.
    last_sent: Option<(u64, Instant)>,
    /// The latest DATA sends (block, when), at most [`RECENT`], to tell a report of a hole
    /// from an echo (see `reports_hole`).
    recent: VecDeque<(u64, Instant)>,
    /// The shortest round trip measured.
    min_rtt: Option<Duration>,
    deadline: Option<Instant>,
    retries: u32,
    /// When the master's request last moved forward.
    last_progress: Instant,
    current_timeout: Duration,
    rto: Rto,
    rtt_probe: Option<(u64, Instant)>,
    cause: Cause,
    hole: Option<Hole>,
    /// The current master surely lacks every block from its request up to here: the blocks
    /// before it joined, or those an in-order master dropped after a hole.
    missing_upto: u64,
    sweep: Option<Sweep>,
    /// The master before the current one, and when it stopped leading: its ACKs still on
    /// the way are not unexpected.
    former: Option<(C, Instant)>,
    window: Window,
    /// The frontier window last used, to report changes.
    last_window: u32,
    /// What masters lost at the frontier, and what they got there, all masters together:
    /// the link's loss, which slowing down does not cure.
    link_lost: u64,
    link_delivered: u64,
    rate: GroupRate,
    pacer: TokenBucket,
    /// When the pacer allows the next DATA, if it is holding one back.
    pace_at: Option<Instant>,
    /// First-pass blocks since the last probe, and how many the next probe waits for.
    since_probe: u64,
    probe_after: u64,
    /// When the last probe (or the first pass) began.
    probe_at: Option<Instant>,
    last_unexpected_retransmit: Option<Instant>,
    out: VecDeque<Transmit<GroupDest<C>>>,
    events: VecDeque<Event<C>>,
    stats: GroupStats,
}

/// Sends remembered for `reports_hole`.
const RECENT: usize = 64;

/// The first probe comes after this many first-pass blocks, the next after twice as many, up
/// to `probe_blocks`: the rate needs a sample early, before a fast start overruns anyone
/// for long.
const FIRST_PROBE: u64 = 64;

impl<C: Copy + Eq + std::fmt::Debug> Group<C> {
    /// A group for `data` (already in wire form: netascii groups pass encoded bytes).
    pub fn new(cfg: GroupConfig, data: Bytes) -> Self {
        let last = data.len() as u64 / cfg.blksize as u64 + 1;
        let rto = Rto::new(cfg.timeout, cfg.min_timeout, cfg.max_timeout);
        let now = cfg.start_at;
        Group {
            current_timeout: cfg.timeout,
            rto,
            window: Window::new(cfg.window),
            last_window: cfg.window.max(1) as u32,
            link_lost: 0,
            link_delivered: 0,
            rate: GroupRate::new(cfg.rate.clone()),
            // Unlimited until the rate control sets a limit (see `apply_rate`).
            pacer: TokenBucket::new(now, None, burst_for(None)),
            probe_after: FIRST_PROBE.min(cfg.probe_blocks as u64),
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
            recent: VecDeque::new(),
            min_rtt: None,
            deadline: None,
            retries: 0,
            last_progress: now,
            rtt_probe: None,
            cause: Cause::Remaster,
            hole: None,
            missing_upto: 0,
            sweep: None,
            former: None,
            pace_at: None,
            since_probe: 0,
            probe_at: None,
            last_unexpected_retransmit: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: GroupStats::default(),
        }
    }

    pub fn stats(&self) -> GroupStats {
        let mut s = self.stats;
        s.rate_changes = self.rate.changes();
        s
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
    /// The highest block sent so far (the first pass has reached it).
    pub fn frontier(&self) -> u64 {
        self.high_water
    }
    pub fn total_blocks(&self) -> u64 {
        self.last
    }
    pub fn group(&self) -> std::net::SocketAddrV4 {
        self.cfg.group
    }
    pub fn timeout(&self) -> Duration {
        self.rto.timeout()
    }
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
    /// The group's own rate limit, bytes per second (`None`: clocked by the window).
    pub fn rate(&self) -> Option<u64> {
        self.rate.rate()
    }
    /// Blocks the group may send ahead of the master's request at the frontier now.
    pub fn window(&self) -> u32 {
        self.master_member().map_or(self.window.max(), |m| self.window.frontier(m.loss, m.keeps_out_of_order))
    }
    /// The current master's loss per block, in tenths of a percent.
    pub fn master_loss_permille(&self) -> u32 {
        self.master_member().map_or(0, |m| m.loss.permille())
    }

    /// Members in join order: (client, is master, OACK options), for announcements.
    pub fn member_list(&self) -> Vec<(C, bool, Options)> {
        self.members.iter().map(|m| (m.id, m.role == Role::Master, m.options.clone())).collect()
    }

    /// Hands every member over (to another node's group) and leaves this group empty and
    /// silent: it sends nothing more.
    pub fn drain_members(&mut self) -> Vec<(C, Vec<(String, String)>)> {
        self.deadline = None;
        self.pace_at = None;
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
                self.members.push_back(Member::new(id, options, 0));
            }
        }
        self.started = true;
        if let Some(first) = self.members.front().map(|m| m.id) {
            if self.master().is_none() {
                self.promote(now, first, None);
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<Event<C>> {
        self.events.pop_front()
    }

    fn master_member(&self) -> Option<&Member<C>> {
        self.members.iter().find(|m| m.role == Role::Master)
    }

    fn master_mut(&mut self) -> Option<&mut Member<C>> {
        self.members.iter_mut().find(|m| m.role == Role::Master)
    }

    fn oack(&self, m: &Member<C>, master: bool) -> Vec<u8> {
        let mut opts = m.options.clone();
        opts.push(("multicast".to_string(), oack_value(self.cfg.group, master)));
        packet::Packet::Oack(opts).to_vec()
    }

    /// Tells a member it is passive now: an OACK with `multicast` alone, twice. Passive
    /// members never answer, so a lost copy goes unnoticed, and the reference client that
    /// believes it still leads drops every block but the one it asks for (and, after one
    /// extra ACK, stays silent until its own timer, seconds later).
    fn tell_passive(&mut self, to: C) {
        let pkt = packet::Packet::Oack(vec![("multicast".to_string(), oack_value(self.cfg.group, false))]).to_vec();
        self.send(to, pkt.clone());
        self.send(to, pkt);
    }

    fn arm(&mut self, now: Instant) {
        self.deadline = Some(now + self.current_timeout);
    }

    /// Blocks sent in this sweep beyond the master's request.
    fn outstanding(&self) -> u64 {
        self.next.saturating_sub(self.base + 1)
    }

    /// One round trip, as far as the group knows.
    fn round_trip(&self) -> Duration {
        self.rto.srtt().unwrap_or(self.cfg.min_timeout).max(self.cfg.min_timeout)
    }

    /// A client asks to join (its RRQ carried `multicast`). `options` are the other options
    /// its OACK acknowledges (tsize, blksize, ...). A client already in the group gets its
    /// OACK again (its first was lost, so it asked again), at most once per round trip: a
    /// burst of repeated (or spoofed) requests must not multiply OACKs.
    pub fn join(&mut self, now: Instant, client: C, options: Vec<(String, String)>) {
        let rt = self.round_trip();
        if let Some(m) = self.members.iter_mut().find(|m| m.id == client) {
            if m.oack_at.is_some_and(|at| now.saturating_duration_since(at) < rt) {
                self.stats.unexpected += 1;
                return;
            }
            m.oack_at = Some(now);
            let m = self.members.iter().find(|m| m.id == client).expect("found above");
            let pkt = self.oack(m, m.role == Role::Master);
            self.send(client, pkt);
            return;
        }
        self.stats.joins += 1;
        let mut m = Member::new(client, options, self.high_water);
        m.oack_at = Some(now);
        self.members.push_back(m);
        if self.master().is_none() {
            self.promote(now, client, None);
        } else {
            let m = self.members.back().expect("just pushed");
            let pkt = self.oack(m, false);
            self.send(client, pkt);
        }
        self.events.push_back(Event::Joined { client, master: self.master() == Some(client), members: self.members.len() });
        if !self.started && self.cfg.start_min_clients > 0 && self.members.len() >= self.cfg.start_min_clients {
            self.started = true;
            self.events.push_back(Event::Started { members: self.members.len(), early: true });
        }
    }

    /// Makes `client` the master and sends it an OACK with mc=1. `from`: the master being
    /// replaced and why.
    fn promote(&mut self, now: Instant, client: C, from: Option<(Option<C>, Handover)>) {
        let frontier = self.high_water;
        for m in self.members.iter_mut() {
            if m.role == Role::Master && m.id != client {
                m.listened_from = frontier;
            }
            m.role = if m.id == client { Role::Master } else { Role::Passive };
        }
        let link = self.link_loss();
        let m = self.members.iter_mut().find(|m| m.id == client).expect("promoting a member");
        m.lost = 0;
        if !m.led {
            // What it will lose as master is not known yet: what masters lose is the best
            // guess (a full window at a lossy master costs its discarded run at once).
            m.led = true;
            m.loss = LossEstimate::with_share(link);
        }
        let heard = frontier.saturating_sub(m.listened_from.max(m.joined_at));
        self.sweep = Some(Sweep { lost: 0, of: heard, joined_at: m.joined_at, until: frontier, counted_upto: 0 });
        self.missing_upto = m.joined_at;
        let m = self.members.iter().find(|m| m.id == client).expect("promoting a member");
        // The full options even for a member that joined long ago: passive members never
        // acknowledge their OACK, so a member whose first OACK was lost learns the block size
        // from this one (with `multicast` alone it would take the default 512 and refuse the
        // group's DATA).
        let pkt = self.oack(m, true);
        self.send(client, pkt);
        self.master_pending = true;
        self.retries = 0;
        self.current_timeout = self.rto.timeout();
        // The promotion OACK and the first ACK are a round trip: a sample before any DATA
        // (unless the OACK has to go again, see `handle_timeout`).
        self.rtt_probe = Some((0, now));
        self.hole = None;
        self.cause = Cause::Remaster;
        self.window.reset_repair();
        self.arm(now);
        if let Some((from, why)) = from {
            match why {
                Handover::Probe => self.stats.probes += 1,
                _ => self.stats.remasters += 1,
            }
            self.events.push_back(Event::MasterChanged { from, to: client, why });
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
            self.former = None;
            if let Some(next) = self.next_master() {
                self.promote(now, next, Some((Some(client), Handover::Remaster)));
            } else {
                self.deadline = None;
            }
        }
        if self.members.is_empty() {
            self.deadline = None;
            self.pace_at = None;
            self.events.push_back(Event::Empty);
        }
    }

    /// The member to lead next: the oldest one not demoted, else the oldest.
    fn next_master(&self) -> Option<C> {
        self.members.iter().find(|m| m.role == Role::Passive && !m.slow).or_else(|| self.members.iter().find(|m| m.role == Role::Passive)).map(|m| m.id)
    }

    /// Hands the lead from the master to the oldest other member (not demoted): the master
    /// goes to the back of the queue, told it is passive now.
    fn hand_over(&mut self, now: Instant, why: Handover) -> bool {
        let Some(pos) = self.members.iter().position(|m| m.role == Role::Master) else { return false };
        if !self.members.iter().any(|m| m.role == Role::Passive && !m.slow) {
            // Every other member was demoted once: none is known to be better than another
            // any more (loss everywhere, or receivers that were all busy at some point). A
            // fresh round, rather than no probes and no demotions for the rest of the group.
            for m in self.members.iter_mut() {
                m.slow = false;
            }
        }
        let Some(next) = self.members.iter().find(|m| m.role == Role::Passive && !m.slow).map(|m| m.id) else { return false };
        let mut m = self.members.remove(pos).expect("position");
        m.role = Role::Passive;
        m.listened_from = self.high_water;
        if why == Handover::Demotion {
            m.slow = true;
            self.stats.demotions += 1;
            self.events.push_back(Event::MasterDemoted { client: m.id, repairs: m.lost });
        }
        let id = m.id;
        self.members.push_back(m);
        self.tell_passive(id);
        self.former = Some((id, now));
        self.promote(now, next, Some((Some(id), why)));
        true
    }

    /// The master lost a block. A master on a bad link clocks the whole group at its pace;
    /// past `slow_master_repairs` losses in one tenure it goes to the back of the queue (it
    /// gets its holes later, when it leads again or is alone) and the next member leads.
    /// Only losses past its own repair sweep count: a receiver that fell behind while
    /// listening still has a full queue when it is promoted and loses its first repairs,
    /// but keeps up once its ACKs clock the group (letting it lead is what slows the group
    /// to its pace). Returns whether the master changed.
    fn master_lost(&mut self, now: Instant) -> bool {
        let limit = self.cfg.slow_master_repairs;
        let in_sweep = self.sweep.is_some();
        let Some(m) = self.master_mut() else { return false };
        m.loss.lost();
        if in_sweep {
            return false;
        }
        m.lost += 1;
        let lost = m.lost;
        self.link_lost += 1;
        limit > 0 && lost >= limit && self.hand_over(now, Handover::Demotion)
    }

    /// Where DATA goes: the group, or the last member by unicast.
    fn data_output(&mut self, datagram: Datagram) -> Transmit<GroupDest<C>> {
        if self.cfg.lone_member_unicast && self.members.len() == 1 {
            self.stats.unicast_data_packets += 1;
            return Transmit { to: GroupDest::Client(self.members[0].id), datagram };
        }
        Transmit { to: GroupDest::Group, datagram }
    }

    /// Queues a control packet (OACK, ERROR) for one client.
    fn send(&mut self, to: C, packet: Vec<u8>) {
        self.out.push_back(Transmit { to: GroupDest::Client(to), datagram: Datagram::Control(packet) });
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
                self.send(from, packet::error_packet(ErrorCode::UnknownTid, "Unknown transfer ID"));
            }
            return;
        };
        match (pkt, role) {
            (Packet::Error { .. }, _) => self.remove(now, from, false, "client sent an error"),
            (Packet::Ack(n), _) if *n as u64 >= self.last => self.remove(now, from, true, ""),
            (Packet::Ack(n), Role::Master) => self.on_master_ack(now, *n as u64),
            (Packet::Ack(_), Role::Passive) => self.on_passive_ack(now, from),
            _ => self.unexpected(now),
        }
    }

    /// An ACK from a passive member: unexpected, unless it comes from the master it replaced
    /// within about a round trip (ACKs it sent before its OACK reached it). Nothing is sent
    /// back to the member: a group port must not answer a member's stray packets (the OACK
    /// that makes a member passive went twice, see `tell_passive`).
    fn on_passive_ack(&mut self, now: Instant, from: C) {
        // Its ACKs sent before the OACK reached it arrive within about a round trip.
        let grace = self.rto.srtt().map_or(self.cfg.min_timeout, |s| s * 3);
        if let Some((former, at)) = self.former {
            if former == from && now.saturating_duration_since(at) < grace {
                self.stats.duplicate_acks += 1;
                return;
            }
        }
        self.unexpected(now);
    }

    fn on_master_ack(&mut self, now: Instant, n: u64) {
        if self.master_pending {
            // The (new) master's first request: serve from whatever it lacks.
            if let Some((0, at)) = self.rtt_probe.take() {
                self.rtt_sample(now.saturating_duration_since(at));
            }
            self.master_pending = false;
            self.base = n;
            self.next = n + 1;
            self.retries = 0;
            self.last_progress = now;
            self.current_timeout = self.rto.timeout();
            self.deadline = None;
            self.after_progress(now);
            return;
        }
        if n > self.base {
            if let Some((probe, at)) = self.rtt_probe {
                if n >= probe {
                    self.rtt_sample(now.saturating_duration_since(at));
                    self.rtt_probe = None;
                }
            }
            let sent_upto = self.next - 1;
            if let Some(h) = self.hole.take().filter(|h| h.telling) {
                // The first answer after repairing a hole the master met past its own sweep
                // tells what kind of client leads: past the repaired block, it kept what came
                // after the hole; exactly at it, it dropped those (the reference client
                // does), and they go again at once.
                let keeps = n > h.block;
                if let Some(m) = self.master_mut() {
                    m.keeps_out_of_order = keeps;
                }
                if !keeps {
                    self.missing_upto = self.missing_upto.max(h.sent_upto);
                }
            }
            let joined_at = self.master_member().map_or(0, |m| m.joined_at);
            if n > sent_upto {
                // The master had blocks this sweep did not send: its holes are scattered.
                self.window.reset_repair();
                self.next = n + 1;
            } else if n > joined_at.max(self.missing_upto) {
                // It lacked what was sent, among blocks it may have had: maybe a run.
                self.window.grow_repair();
            }
            // Blocks it got from this sweep (not those it had already), for its loss.
            let delivered = n.min(sent_upto).saturating_sub(self.base);
            if let Some(m) = self.master_mut() {
                m.loss.delivered(delivered);
            }
            if self.sweep.is_none() {
                self.link_delivered += delivered;
            }
            self.base = n;
            self.retries = 0;
            self.last_progress = now;
            self.current_timeout = self.rto.timeout();
            if self.outstanding() > 0 {
                self.arm(now);
            } else {
                self.deadline = None;
            }
            self.after_progress(now);
        } else if n == self.base && self.outstanding() > 0 {
            // A master that keeps reporting the same hole, however often it is repaired, is
            // not silent, and each repair restarts the timer: it is dropped when it has made
            // no progress for as long as a silent one would have been kept.
            let stall = self.cfg.give_up_after.max(self.rto.timeout() * (self.cfg.master_retries + 1));
            if now.saturating_duration_since(self.last_progress) >= stall {
                if let Some(m) = self.master() {
                    self.remove(now, m, false, "master makes no progress");
                }
                return;
            }
            // The master still lacks block n+1 although it went out (and maybe later ones):
            // a hole. Unless that hole was repaired less than two round trips ago: then the
            // report answers blocks sent before the repair (a bitmap client ACKs every block
            // after a hole), and the repair is on its way (the timer resends it if lost).
            let rtt = self.rto.srtt().unwrap_or(self.cfg.min_timeout);
            let repairing = self.hole.is_some_and(|h| h.block == n + 1 && h.repaired_at.is_some_and(|t| now.saturating_duration_since(t) < rtt * 2));
            if repairing || !self.reports_hole(n + 1, now) {
                self.stats.duplicate_acks += 1;
                return;
            }
            self.on_hole(now, n + 1, Cause::Hole);
        } else {
            self.unexpected(now);
        }
    }

    /// After the master's request moved: the end of a new master's repair sweep feeds the
    /// rate, and at the frontier a probe may be due.
    fn after_progress(&mut self, now: Instant) {
        if let Some(s) = self.sweep {
            if self.base < s.until {
                return;
            }
            self.sweep = None;
            // Only while the first pass goes on: the rate is for the receivers listening to it.
            if s.of > 0 && self.high_water < self.last {
                let members = self.members.len();
                let held_back = self.master_member().is_some_and(|m| m.held_back);
                if let Some(change) = self.rate.passive_sample(now, s.lost, s.of, members, self.link_loss(), held_back) {
                    let slowed = matches!(change, RateChange::Slowed { .. });
                    if let Some(m) = self.master_mut() {
                        m.held_back = slowed || (m.held_back && !matches!(change, RateChange::Raised { .. }));
                    }
                    self.apply_rate(now);
                    self.events.push_back(Event::Rate { change, lost: s.lost, of: s.of, members });
                }
            }
        }
        // A probe only while the master is at the frontier (no repair of its own under way).
        let probes = self.cfg.probe_blocks as u64;
        let due = self.since_probe >= self.probe_after
            || (self.since_probe >= FIRST_PROBE && self.probe_at.is_some_and(|t| now.saturating_duration_since(t) >= PROBE_INTERVAL));
        if probes > 0
            && due
            && self.next > self.high_water
            && self.hole.is_none()
            && self.base < self.last
            && self.hand_over(now, Handover::Probe)
        {
            self.since_probe = 0;
            self.probe_at = Some(now);
            self.probe_after = (self.probe_after * 2).min(probes);
        }
    }

    fn rtt_sample(&mut self, rtt: Duration) {
        self.rto.on_sample(rtt);
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
    }

    /// Whether the master's repeated ACK can report block `k` missing: it says so when a
    /// later block arrived first, so some block after `k` must have left after `k` did, long
    /// enough ago (half the shortest round trip) for its arrival to be what the ACK answers.
    /// Otherwise the ACK is an echo: the reference client ACKs once more on any block it
    /// already has, and treating that as a hole would resend a block still on its way, whose
    /// second copy draws the next echo, and so on. (In lock-step no block follows `k`: its
    /// loss shows by the timer.)
    fn reports_hole(&self, k: u64, now: Instant) -> bool {
        let settle = self.min_rtt.unwrap_or_default() / 2;
        let after = self.recent.iter().rposition(|(b, _)| *b == k).map_or(0, |p| p + 1);
        self.recent.iter().skip(after).any(|(b, t)| *b > k && now.saturating_duration_since(*t) >= settle)
    }

    /// What masters lose at the frontier, a share of the blocks.
    fn link_loss(&self) -> f64 {
        let all = self.link_lost + self.link_delivered;
        if all == 0 {
            0.0
        } else {
            self.link_lost as f64 / all as f64
        }
    }

    /// Paces DATA at the rate the rate control set.
    fn apply_rate(&mut self, now: Instant) {
        let rate = self.rate.rate();
        if self.pacer.rate().is_none() {
            // The first limit: a fresh bucket, its clock from now.
            self.pacer = TokenBucket::new(now, rate, burst_for(rate));
        } else {
            self.pacer.set_rate_auto(now, rate);
        }
    }

    /// The master lacks block `k`: it lost it (a hole it reported, or a timeout). Repairs go
    /// one block at a time from `k` (the window grows again if the master turns out to lack
    /// a run after it).
    fn on_hole(&mut self, now: Instant, k: u64, cause: Cause) {
        if self.master_lost(now) {
            return;
        }
        let sent_upto = self.next - 1;
        self.hole = Some(Hole { block: k, sent_upto, repaired_at: None, telling: self.sweep.is_none() && sent_upto > k });
        self.next = k;
        self.cause = cause;
        self.window.reset_repair();
        self.rtt_probe = None;
    }

    /// Retransmits the most recent DATA when it went out at least a round trip ago (the
    /// stream is stalled), at most once per round trip.
    fn unexpected(&mut self, now: Instant) {
        self.stats.unexpected += 1;
        let Some((last, at)) = self.last_sent else { return };
        // A new master asks for blocks below the most recent one: its request is what helps.
        let block = if self.base + 1 < last && self.base < self.high_water { self.base + 1 } else { last };
        let rt = self.round_trip();
        if now.saturating_duration_since(at) < rt || self.last_unexpected_retransmit.is_some_and(|t| now.saturating_duration_since(t) < rt) {
            return;
        }
        self.last_unexpected_retransmit = Some(now);
        self.stats.unexpected_retransmits += 1;
        self.stats.repairs.unexpected += 1;
        self.stats.retransmits += 1;
        let t = self.data_packet(block);
        self.stats.retransmitted_bytes += t.len() as u64;
        self.last_sent = Some((block, now));
        let o = self.data_output(t);
        self.out.push_back(o);
    }

    fn data_packet(&mut self, index: u64) -> Datagram {
        let blk = self.cfg.blksize as u64;
        let len = self.data.len() as u64;
        let start = ((index - 1) * blk).min(len);
        let end = (start + blk).min(len);
        let payload = self.data.slice(start as usize..end as usize);
        self.stats.data_packets += 1;
        self.stats.data_bytes += 4 + payload.len() as u64;
        Datagram::Data { block: Block(index).wire(), payload }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.started && now >= self.cfg.start_at {
            self.started = true;
            self.events.push_back(Event::Started { members: self.members.len(), early: false });
        }
        if self.pace_at.is_some_and(|t| now >= t) {
            self.pace_at = None;
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
        if !self.master_pending && self.outstanding() == 0 {
            // Nothing unanswered (the pacer holds the next block back): no loss.
            self.deadline = None;
            return;
        }
        self.stats.timeouts += 1;
        self.retries += 1;
        let patience = !self.master_pending && now.saturating_duration_since(self.last_progress) < self.cfg.give_up_after;
        if self.retries > self.cfg.master_retries && !patience {
            self.remove(now, master, false, "master stopped answering");
            return;
        }
        self.current_timeout = (self.current_timeout * 2).min(self.cfg.max_timeout);
        if self.master_pending {
            // Which OACK an answer will be for is unknown now (Karn): no sample from it.
            self.rtt_probe = None;
            let m = self.members.iter().find(|m| m.id == master).expect("master is a member");
            // The promotion OACK again, with the full options (see `promote`).
            let pkt = self.oack(m, true);
            self.send(master, pkt);
        } else {
            self.on_hole(now, self.base + 1, Cause::Timeout);
        }
        self.arm(now);
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let start = (!self.started && !self.members.is_empty()).then_some(self.cfg.start_at);
        [self.deadline, start, self.pace_at].into_iter().flatten().min()
    }

    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit<GroupDest<C>>> {
        if let Some(o) = self.out.pop_front() {
            return Some(o);
        }
        if !self.started || self.master_pending {
            return None;
        }
        let master = self.master_member()?;
        let (loss, frontier) = (master.loss, self.window.frontier(master.loss, master.keeps_out_of_order));
        if frontier != self.last_window {
            self.events.push_back(Event::Window { from: self.last_window, to: frontier, master_loss_permille: loss.permille() });
            self.last_window = frontier;
        }
        let end = if self.next <= self.missing_upto {
            // Blocks it surely lacks: the frontier window, up to the end of that run.
            (self.base + frontier as u64).min(self.missing_upto)
        } else if self.next <= self.high_water {
            // It may have any of these: as many as its ACKs show it lacks.
            self.base + self.window.repair(frontier) as u64
        } else {
            self.base + frontier as u64
        }
        .min(self.last);
        if self.next > end {
            return None;
        }
        if let Some(t) = self.pacer.ready_at(now) {
            self.pace_at = Some(t);
            return None;
        }
        self.pace_at = None;
        let index = self.next;
        self.next += 1;
        // The timer runs from the last transmission (pacing may spread a window out).
        self.arm(now);
        if index <= self.high_water {
            self.count_repair(index);
        } else {
            self.high_water = index;
            self.stats.first_pass += 1;
            self.probe_at.get_or_insert(now);
            self.since_probe += 1;
            if self.rtt_probe.is_none() {
                self.rtt_probe = Some((index, now));
            }
        }
        self.last_sent = Some((index, now));
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((index, now));
        if let Some(h) = self.hole.as_mut().filter(|h| h.block == index) {
            h.repaired_at = Some(now);
        }
        let t = self.data_packet(index);
        self.pacer.consume(t.len() as u64);
        self.rate.on_sent(now, t.len() as u64);
        Some(self.data_output(t))
    }

    /// Accounts a block sent again, by its cause.
    fn count_repair(&mut self, index: u64) {
        let blk = self.cfg.blksize as u64;
        self.stats.retransmits += 1;
        self.stats.retransmitted_bytes += 4 + (self.data.len() as u64).saturating_sub((index - 1) * blk).min(blk);
        let r = &mut self.stats.repairs;
        if let Some(s) = self.sweep.as_mut() {
            // The first time a new master's sweep asks for this block: it lost it while
            // listening (or joined after it went out).
            if index > s.counted_upto {
                s.counted_upto = index;
                if index > s.joined_at {
                    s.lost += 1;
                    r.remaster += 1;
                } else {
                    r.late_join += 1;
                }
                return;
            }
        }
        match self.cause {
            Cause::Hole => r.hole += 1,
            Cause::Timeout => r.timeout += 1,
            Cause::Remaster => r.remaster += 1,
        }
    }
}
