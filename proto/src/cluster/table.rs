//! table: the cluster's multicast group table as a state machine without I/O.
//!
//! Every coordinator keeps one. Inputs are the local requests (a client asks for a stream by
//! multicast, a group reports progress or has no member left), what peers say (their group
//! tables, enrolments) and what the membership layer says (a node up or down), each with the
//! current time. Outputs are [`Action`]s, drained with [`Table::poll_action`]: open a group
//! session (owner or relay), give a client to a local group, send a message to a peer, hand a
//! group over, take one over, end one. The caller owns the sockets and the sessions.
//!
//! # Decisions
//! - **Slots.** A stream's group address and transfer port follow from its preferred slot (a
//!   hash of its identity), so nodes that start the same stream meet; the next free slot is
//!   taken when another stream holds it anywhere in the cluster.
//! - **Claims.** A node with live peers does not answer a new group's first member at once:
//!   it claims the slot, announces the claim, and only after [`TableConfig::settle`] (room for
//!   a peer's claim made before ours arrived to reach us) gives the members to the group. So
//!   two *different* streams started on two nodes at once never reach a client under one
//!   address and port.
//! - **Start races** (the same stream on two nodes): the smaller node id keeps the group; the
//!   other hands its members over and relays.
//! - **Collisions** (different streams, one slot): a group that answered members keeps its
//!   slot against a claim; between equals the smaller node id keeps it. The other moves to a
//!   free slot: a claim simply claims again; a group that had answered members (possible
//!   only when announcements were lost) re-OACKs them from the new slot (RFC 2090 lets the
//!   server send a new OACK).
//! - **Deaths.** The alive node with the smallest id takes the dead node's groups over (same
//!   address and port, members as last announced); the others relay to it.
//! - **Late or repeated announcements.** Tables are state, not deltas: a repeated one changes
//!   nothing; one older than the last seen from its node is ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::wire::{GroupInfo, MemberInfo, Message, NodeId, StreamKey};

/// A group's handle in one node's table (never on the wire).
pub type GroupId = u64;

/// Options of a member's OACK besides `multicast`.
pub type Options = Vec<(String, String)>;

/// How often the whole table goes to every peer, to cover lost datagrams.
pub const FULL_ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

/// The pool slot a stream prefers: a hash of its identity, so every node that starts the same
/// stream picks the same group address and transfer port (the path does not count).
pub fn preferred_slot(key: &StreamKey, slots: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = key.sha256.iter().copied().chain(key.size.to_be_bytes()).chain(key.blksize.to_be_bytes()).chain([key.netascii as u8]);
    for b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % slots.max(1) as u64) as u32
}

/// Which of two nodes keeps a group both started: the smaller id, on every node alike.
pub fn wins(a: &str, b: &str) -> bool {
    a < b
}

#[derive(Debug, Clone)]
pub struct TableConfig {
    /// This node's id ("" outside a cluster).
    pub node_id: NodeId,
    /// First address of the multicast range and its size.
    pub pool_base: Ipv4Addr,
    pub pool_size: u32,
    /// Destination port of group DATA.
    pub port: u16,
    /// A group's transfer port is `tid_port_base + slot`.
    pub tid_port_base: u16,
    /// How long a new group's slot is claimed before its first member is answered (only with
    /// live peers).
    pub settle: Duration,
    /// First sequence number of this node's announcements: peers ignore tables older than the
    /// last they saw, so a restarted node must not start below its former self.
    pub first_seq: u64,
}

/// What the caller does for the table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Action {
    /// Open the group's transfer socket and start its session: the owner of a new group
    /// (`relay_for` None), or a relay that forwards what members send to `relay_for`.
    Spawn { id: GroupId, key: StreamKey, group: SocketAddrV4, tid: SocketAddr, relay_for: Option<NodeId> },
    /// Give a client to the local group's session, which sends its OACK.
    Join { id: GroupId, client: SocketAddr, options: Options },
    /// Send a message to one peer, or to every peer (`to` None).
    Send { to: Option<NodeId>, msg: Message },
    /// Another node keeps this stream: stop sending, enrol the session's members at `winner`.
    HandOver { id: GroupId, winner: NodeId },
    /// The owner (`dead`) died: continue the group with the members it announced.
    TakeOver { id: GroupId, dead: NodeId, info: GroupInfo },
    /// Another stream keeps this group's slot: the group continues as `to` (already spawned
    /// on a free slot); stop the session of `from`.
    Move { from: GroupId, to: GroupId },
    /// Stop the session.
    End { id: GroupId },
}

/// Why a request gets no group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoGroup {
    /// A join-only request and no group to join.
    NothingToJoin,
    /// Every address of the range is in use.
    PoolExhausted,
    /// The slot's transfer port is beyond 65535.
    PortOutOfRange,
}

impl NoGroup {
    pub fn as_str(self) -> &'static str {
        match self {
            NoGroup::NothingToJoin => "no group to join",
            NoGroup::PoolExhausted => "multicast address pool exhausted",
            NoGroup::PortOutOfRange => "group port out of range",
        }
    }
}

/// Where a request went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub id: GroupId,
    pub group: SocketAddrV4,
    pub tid: SocketAddr,
    pub new_group: bool,
    /// The node that owns the group (None: this node).
    pub owner: Option<NodeId>,
}

/// A request for a stream by multicast, as the table needs it.
#[derive(Debug, Clone)]
pub struct Request {
    pub key: StreamKey,
    pub client: SocketAddr,
    /// The address the request was sent to: the group's transfer socket is on it.
    pub local: IpAddr,
    pub options: Options,
    /// Only join a running group, never start one.
    pub join_only: bool,
}

/// One group this node owns or relays for.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: StreamKey,
    pub group: SocketAddrV4,
    pub tid: SocketAddr,
    /// None: this node owns the group; Some: it relays for that node.
    pub owner: Option<NodeId>,
    /// Some while the slot is claimed: when the claim settles, and the members waiting for it.
    claim: Option<(Instant, Vec<(SocketAddr, Options)>)>,
    /// Join actions given to the session (matched against its idle report).
    pub joins: u64,
    pub block: u64,
    pub started: bool,
    pub members: Vec<MemberInfo>,
}

impl Entry {
    fn info(&self) -> GroupInfo {
        GroupInfo { key: self.key.clone(), group: self.group, tid: self.tid, block: self.block, members: self.members.clone(), started: self.started, claim: self.claim.is_some() }
    }

    pub fn is_claim(&self) -> bool {
        self.claim.is_some()
    }
}

/// Counters for the state dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    pub started: u64,
    pub takeovers: u64,
    pub handovers: u64,
    /// Groups moved to another slot after a collision with a different stream.
    pub moves: u64,
}

pub struct Table {
    cfg: TableConfig,
    next_id: GroupId,
    groups: BTreeMap<GroupId, Entry>,
    by_tid: HashMap<SocketAddr, GroupId>,
    by_member: HashMap<SocketAddr, GroupId>,
    /// The last table each peer announced, and its sequence number.
    remote: HashMap<NodeId, (u64, Vec<GroupInfo>)>,
    alive: BTreeSet<NodeId>,
    seq: u64,
    dirty: bool,
    last_full: Option<Instant>,
    actions: VecDeque<Action>,
    stats: TableStats,
}

impl Table {
    pub fn new(cfg: TableConfig) -> Table {
        let seq = cfg.first_seq;
        Table {
            cfg,
            next_id: 1,
            groups: BTreeMap::new(),
            by_tid: HashMap::new(),
            by_member: HashMap::new(),
            remote: HashMap::new(),
            alive: BTreeSet::new(),
            seq,
            dirty: false,
            last_full: None,
            actions: VecDeque::new(),
            stats: TableStats::default(),
        }
    }

    /// The next thing to do, in order.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Table::handle_timeout`] has something to do (a claim settles, a full
    /// announcement is due).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let claims = self.groups.values().filter_map(|e| e.claim.as_ref().map(|(at, _)| *at));
        let full = (!self.alive.is_empty()).then(|| self.last_full.map(|t| t + FULL_ANNOUNCE_EVERY)).flatten();
        claims.chain(full).min()
    }

    pub fn group(&self, id: GroupId) -> Option<&Entry> {
        self.groups.get(&id)
    }

    pub fn groups(&self) -> impl Iterator<Item = (GroupId, &Entry)> {
        self.groups.iter().map(|(id, e)| (*id, e))
    }

    pub fn alive(&self) -> &BTreeSet<NodeId> {
        &self.alive
    }

    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// How many groups peers announced.
    pub fn remote_groups(&self) -> usize {
        self.remote.values().map(|(_, g)| g.len()).sum()
    }

    pub fn members_known(&self) -> usize {
        self.by_member.len()
    }

    /// The group whose transfer socket is `tid`, and its owner (None: this node).
    pub fn route_tid(&self, tid: SocketAddr) -> Option<(GroupId, Option<&NodeId>)> {
        let id = *self.by_tid.get(&tid)?;
        Some((id, self.groups.get(&id)?.owner.as_ref()))
    }

    /// The group `client` is a member of (single-port mode routes by member), and its owner.
    pub fn route_member(&self, client: SocketAddr) -> Option<(GroupId, SocketAddr, Option<&NodeId>)> {
        let id = *self.by_member.get(&client)?;
        let e = self.groups.get(&id)?;
        Some((id, e.tid, e.owner.as_ref()))
    }

    // -----------------------------------------------------------------------------------
    // Local inputs.
    // -----------------------------------------------------------------------------------

    /// A client asks for `req.key` by multicast: it joins the group of that stream on that
    /// address (owned here or relayed for a peer), or a new group is started.
    pub fn handle_request(&mut self, now: Instant, req: Request) -> Result<Placed, NoGroup> {
        let (id, new_group) = match self.find_for(&req) {
            Some(id) => (id, false),
            None if req.join_only => return Err(NoGroup::NothingToJoin),
            None => (self.start(now, &req)?, true),
        };
        self.by_member.insert(req.client, id);
        self.admit(id, req.client, req.options);
        let e = &self.groups[&id];
        Ok(Placed { id, group: e.group, tid: e.tid, new_group, owner: e.owner.clone() })
    }

    /// A group session reports its progress.
    pub fn handle_progress(&mut self, id: GroupId, block: u64, started: bool, members: Vec<MemberInfo>) {
        let Some(e) = self.groups.get_mut(&id) else { return };
        if e.members != members || e.started != started {
            self.dirty = true;
        }
        e.block = block;
        e.started = started;
        self.set_members(id, members);
    }

    /// A group session has no member left after `joins` joins: it ends unless a join is on
    /// its way (or it is a peer's group).
    pub fn handle_idle(&mut self, id: GroupId, joins: u64) {
        if matches!(self.groups.get(&id), Some(e) if e.joins == joins && e.owner.is_none() && e.claim.is_none()) {
            self.end(id);
        }
    }

    /// The caller could not do a `Spawn` or `TakeOver` for `id`: the group is forgotten.
    pub fn handle_failed(&mut self, id: GroupId) {
        self.end(id);
    }

    /// Claims that settled give their members to their group; changes (and every
    /// [`FULL_ANNOUNCE_EVERY`] the whole table) go to the peers.
    pub fn handle_timeout(&mut self, now: Instant) {
        let settled: Vec<GroupId> = self.groups.iter().filter(|(_, e)| e.claim.as_ref().is_some_and(|(at, _)| *at <= now)).map(|(id, _)| *id).collect();
        for id in settled {
            let e = self.groups.get_mut(&id).expect("listed");
            let (_, waiting) = e.claim.take().expect("a claim");
            self.dirty = true;
            for (client, options) in waiting {
                self.admit(id, client, options);
            }
        }
        let full_due = self.last_full.is_none_or(|t| now >= t + FULL_ANNOUNCE_EVERY);
        if self.dirty || (full_due && !self.alive.is_empty()) {
            self.announce(None);
            if full_due {
                self.last_full = Some(now);
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Peers.
    // -----------------------------------------------------------------------------------

    pub fn handle_node_up(&mut self, node: NodeId) {
        self.alive.insert(node.clone());
        self.announce(Some(node));
    }

    /// `node` died: the alive node with the smallest id continues its groups.
    pub fn handle_node_down(&mut self, node: &NodeId) {
        self.alive.remove(node);
        let groups = self.remote.remove(node).map(|(_, g)| g).unwrap_or_default();
        let me = self.cfg.node_id.clone();
        let successor = self.alive.iter().next().filter(|n| wins(n, &me)).cloned().unwrap_or(me.clone());
        for g in groups {
            let id = self.by_tid.get(&g.tid).copied();
            if successor != me {
                if let Some(e) = id.and_then(|id| self.groups.get_mut(&id)) {
                    e.owner = Some(successor.clone());
                }
                continue;
            }
            let id = match id {
                Some(id) => id,
                None => self.insert(&g.key, g.group, g.tid, Some(node.clone())),
            };
            self.stats.takeovers += 1;
            let e = self.groups.get_mut(&id).expect("present");
            e.owner = None;
            self.set_members(id, g.members.clone());
            self.dirty = true;
            self.actions.push_back(Action::TakeOver { id, dead: node.clone(), info: g });
        }
    }

    /// A message from a peer.
    pub fn handle_message(&mut self, now: Instant, from: &NodeId, msg: Message) {
        match msg {
            Message::Groups { seq, groups } => self.handle_groups(now, from, seq, groups),
            Message::Enroll { key, client, options } => self.handle_enroll(from, key, client, options),
            // Packets are routed by the caller (`route_tid`): the table holds no data path.
            Message::Relay { .. } => {}
        }
    }

    fn handle_groups(&mut self, now: Instant, from: &NodeId, seq: u64, groups: Vec<GroupInfo>) {
        if self.remote.get(from).is_some_and(|(last, _)| seq < *last) {
            return; // a late datagram: the peer has said something newer since
        }
        self.alive.insert(from.clone());
        self.remote.insert(from.clone(), (seq, groups.clone()));
        for g in &groups {
            self.reconcile(now, from, g);
        }
        // Relays for groups the peer no longer announces end with them.
        let gone: Vec<GroupId> = self.groups.iter().filter(|(_, e)| e.owner.as_ref() == Some(from) && !groups.iter().any(|g| g.tid == e.tid)).map(|(id, _)| *id).collect();
        for id in gone {
            self.end(id);
        }
    }

    /// A client whose request reached `from` joins the group of `key` here.
    fn handle_enroll(&mut self, from: &NodeId, key: StreamKey, client: SocketAddr, options: Options) {
        let entry = self.groups.iter().filter(|(_, e)| e.key == key).min_by_key(|(_, e)| e.owner.is_some()).map(|(id, e)| (*id, e.owner.clone()));
        match entry {
            Some((id, None)) => {
                self.by_member.insert(client, id);
                self.admit(id, client, options);
            }
            // This node handed the group over meanwhile: pass the member on.
            Some((_, Some(owner))) if &owner != from => self.send(Some(owner), Message::Enroll { key, client, options }),
            _ => {}
        }
    }

    // -----------------------------------------------------------------------------------
    // Decisions.
    // -----------------------------------------------------------------------------------

    /// Brings this node's groups in line with one group `from` announced.
    fn reconcile(&mut self, now: Instant, from: &NodeId, g: &GroupInfo) {
        let Some(id) = self.same_slot(g) else {
            // Relay for it: the router may send its members' packets here.
            let id = self.insert(&g.key, g.group, g.tid, Some(from.clone()));
            self.set_members(id, g.members.clone());
            return;
        };
        let e = &self.groups[&id];
        let same_key = e.key == g.key;
        match e.owner.clone() {
            None if same_key && wins(from, &self.cfg.node_id) => self.hand_over(id, from),
            None if !same_key && !self.keeps_slot(e, from, g) => self.relocate(now, id),
            // We keep it: the other node moves, and hears so now, before its claim settles.
            None if !same_key => self.announce(Some(from.clone())),
            None => {} // we keep it; the other node hands over
            Some(owner) if same_key => {
                if owner != *from {
                    self.groups.get_mut(&id).expect("present").owner = Some(from.clone());
                }
                self.set_members(id, g.members.clone());
            }
            Some(_) => {} // two peers collide: they settle it between them
        }
    }

    /// Whether our group `e` keeps its slot against `from`'s group `g` of another stream: a
    /// group that answered members beats a claim, else the smaller node id.
    fn keeps_slot(&self, e: &Entry, from: &NodeId, g: &GroupInfo) -> bool {
        match (e.claim.is_some(), g.claim) {
            (false, true) => true,
            (true, false) => false,
            _ => wins(&self.cfg.node_id, from),
        }
    }

    /// Both nodes started this stream at once; `winner` keeps it: members that were waiting
    /// for the claim go straight there, the session hands over those it answered.
    fn hand_over(&mut self, id: GroupId, winner: &NodeId) {
        self.stats.handovers += 1;
        let e = self.groups.get_mut(&id).expect("present");
        e.owner = Some(winner.clone());
        let key = e.key.clone();
        for (client, options) in e.claim.take().map(|(_, w)| w).unwrap_or_default() {
            self.send(Some(winner.clone()), Message::Enroll { key: key.clone(), client, options });
        }
        self.actions.push_back(Action::HandOver { id, winner: winner.clone() });
        self.dirty = true;
    }

    /// Our group lost its slot to another stream: it moves to a free slot, with a fresh
    /// claim, and its members (if it had answered some) are answered again from there.
    fn relocate(&mut self, now: Instant, id: GroupId) {
        let old = self.groups.remove(&id).expect("present");
        self.by_tid.remove(&old.tid);
        self.dirty = true;
        let mut waiting: Vec<(SocketAddr, Options)> = old.members.iter().map(|m| (m.client, m.options.clone())).collect();
        waiting.extend(old.claim.map(|(_, w)| w).unwrap_or_default());
        let Ok((group, tid)) = self.allocate(&old.key, old.tid.ip()) else {
            // Nowhere to go: its clients ask again and are served by unicast.
            self.by_member.retain(|_, g| *g != id);
            self.actions.push_back(Action::End { id });
            return;
        };
        self.stats.moves += 1;
        let new = self.insert(&old.key, group, tid, None);
        self.actions.push_back(Action::Move { from: id, to: new });
        self.by_member.retain(|_, g| *g != id);
        for (client, _) in &waiting {
            self.by_member.insert(*client, new);
        }
        self.groups.get_mut(&new).expect("present").claim = Some((now + self.cfg.settle, waiting));
    }

    /// The group of this stream on this address: one of ours or a relay, else a peer's group
    /// this node does not relay yet.
    fn find_for(&mut self, req: &Request) -> Option<GroupId> {
        let local = self.groups.iter().find(|(_, e)| e.key == req.key && e.tid.ip() == req.local).map(|(id, _)| *id);
        local.or_else(|| {
            let (owner, g) = self.remote.iter().flat_map(|(n, (_, gs))| gs.iter().map(move |g| (n, g))).find(|(_, g)| g.key == req.key && g.tid.ip() == req.local)?;
            let (owner, g) = (owner.clone(), g.clone());
            let id = self.insert(&g.key, g.group, g.tid, Some(owner));
            self.set_members(id, g.members);
            Some(id)
        })
    }

    /// A new group owned here: a claim first when peers might start another stream on the
    /// same slot.
    fn start(&mut self, now: Instant, req: &Request) -> Result<GroupId, NoGroup> {
        let (group, tid) = self.allocate(&req.key, req.local)?;
        let id = self.insert(&req.key, group, tid, None);
        if !self.alive.is_empty() {
            self.groups.get_mut(&id).expect("present").claim = Some((now + self.cfg.settle, Vec::new()));
        }
        self.stats.started += 1;
        self.dirty = true;
        // Peers learn of the claim now, not at the next tick.
        self.announce(None);
        Ok(id)
    }

    /// Gives `client` to group `id`: to the session when it is ours (after its claim), else
    /// to its owner.
    fn admit(&mut self, id: GroupId, client: SocketAddr, options: Options) {
        let e = self.groups.get_mut(&id).expect("present");
        match (&e.owner, &mut e.claim) {
            (None, Some((_, waiting))) => {
                waiting.retain(|(c, _)| *c != client);
                waiting.push((client, options));
            }
            (None, None) => {
                e.joins += 1;
                self.actions.push_back(Action::Join { id, client, options });
            }
            (Some(owner), _) => {
                let msg = Message::Enroll { key: e.key.clone(), client, options };
                let to = Some(owner.clone());
                self.send(to, msg);
            }
        }
    }

    /// Usable pool slots: the network and broadcast addresses of a range are skipped.
    fn slots(&self) -> (u32, u32) {
        let size = self.cfg.pool_size;
        if size > 2 {
            (1, size - 2)
        } else {
            (0, size)
        }
    }

    /// Group addresses in use anywhere in the cluster by streams other than `key`.
    fn taken(&self, key: &StreamKey) -> HashSet<Ipv4Addr> {
        let local = self.groups.values().filter(|e| &e.key != key).map(|e| *e.group.ip());
        let remote = self.remote.values().flat_map(|(_, g)| g).filter(|g| &g.key != key).map(|g| *g.group.ip());
        local.chain(remote).collect()
    }

    /// The group address and transfer socket for `key` on `local`: its preferred slot, or the
    /// next free one.
    fn allocate(&self, key: &StreamKey, local: IpAddr) -> Result<(SocketAddrV4, SocketAddr), NoGroup> {
        let (first, count) = self.slots();
        let base = u32::from(self.cfg.pool_base);
        let start = preferred_slot(key, count);
        let taken = self.taken(key);
        let slot = (0..count).map(|i| first + (start + i) % count).find(|slot| !taken.contains(&Ipv4Addr::from(base + slot))).ok_or(NoGroup::PoolExhausted)?;
        let port = u16::try_from(slot).ok().and_then(|s| self.cfg.tid_port_base.checked_add(s)).ok_or(NoGroup::PortOutOfRange)?;
        Ok((SocketAddrV4::new(Ipv4Addr::from(base + slot), self.cfg.port), SocketAddr::new(local, port)))
    }

    /// Our group at the slot of `g`: same transfer socket or same group address.
    fn same_slot(&self, g: &GroupInfo) -> Option<GroupId> {
        self.by_tid.get(&g.tid).copied().or_else(|| self.groups.iter().find(|(_, e)| e.group.ip() == g.group.ip() && e.tid.port() == g.tid.port()).map(|(id, _)| *id))
    }

    // -----------------------------------------------------------------------------------
    // Bookkeeping.
    // -----------------------------------------------------------------------------------

    fn insert(&mut self, key: &StreamKey, group: SocketAddrV4, tid: SocketAddr, relay_for: Option<NodeId>) -> GroupId {
        let id = self.next_id;
        self.next_id += 1;
        let entry = Entry { key: key.clone(), group, tid, owner: relay_for.clone(), claim: None, joins: 0, block: 0, started: false, members: Vec::new() };
        self.groups.insert(id, entry);
        self.by_tid.insert(tid, id);
        self.actions.push_back(Action::Spawn { id, key: key.clone(), group, tid, relay_for });
        id
    }

    fn end(&mut self, id: GroupId) {
        if let Some(e) = self.groups.remove(&id) {
            if self.by_tid.get(&e.tid) == Some(&id) {
                self.by_tid.remove(&e.tid);
            }
            self.by_member.retain(|_, g| *g != id);
            self.actions.push_back(Action::End { id });
            if e.owner.is_none() {
                self.dirty = true;
            }
        }
    }

    /// Records group `id`'s members as last reported: members that left are forgotten, the
    /// others (and members who joined since) map to the group.
    fn set_members(&mut self, id: GroupId, members: Vec<MemberInfo>) {
        let Some(e) = self.groups.get_mut(&id) else { return };
        for old in &e.members {
            if !members.iter().any(|m| m.client == old.client) && self.by_member.get(&old.client) == Some(&id) {
                self.by_member.remove(&old.client);
            }
        }
        for m in &members {
            self.by_member.insert(m.client, id);
        }
        e.members = members;
    }

    fn send(&mut self, to: Option<NodeId>, msg: Message) {
        if !self.cfg.node_id.is_empty() {
            self.actions.push_back(Action::Send { to, msg });
        }
    }

    /// This node's groups (claims included) to one peer or all.
    fn announce(&mut self, to: Option<NodeId>) {
        if self.cfg.node_id.is_empty() {
            return;
        }
        self.seq += 1;
        if to.is_none() {
            self.dirty = false;
        }
        let groups = self.groups.values().filter(|e| e.owner.is_none()).map(Entry::info).collect();
        self.send(to, Message::Groups { seq: self.seq, groups });
    }
}

#[cfg(test)]
mod tests;
