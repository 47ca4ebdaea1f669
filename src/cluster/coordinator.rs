//! coordinator: the table of active multicast groups, on this node and across the cluster.
//!
//! Every multicast request goes through here, so "is this file already being multicast?"
//! and "start a group" happen in one step of one actor: two requests for the same file can
//! never start two groups on a node. A group is keyed by the content identity of its stream
//! (SHA-256, size, block size, mode): a file changed on disk is a different key and never
//! mixes into a running group, and the key is equal on every node holding the same bytes.
//! The coordinator owns the pool of group addresses, so concurrent groups never share one.
//!
//! # Cluster
//! Coordinators tell each other, through the membership layer, the complete list of groups
//! they own (on every change and every second). With that table:
//! - a request that reaches this node for a stream another node is multicasting is
//!   **enrolled** there: the owner adds the member and sends its OACK from the group's
//!   transfer socket (the shared service address and the group's port);
//! - every node binds the transfer socket of every group it knows of and **relays** what
//!   clients send to it to the owner, since the router may hash a member to any node;
//! - a group's address and port follow from a hash of its key, so two nodes starting the same
//!   stream at the same moment create the same group; when they learn of each other the
//!   node with the larger id **hands its members over** and becomes a relay;
//! - when a node dies, the alive node with the smallest id **takes over** its groups: same
//!   address and port, members as last announced; the oldest is made master and asks for
//!   what it lacks.
//!
//! # Single-port mode
//! Groups send from the listening port and bind no socket; members' packets reach the
//! listener, which hands those of peers without a unicast session here (`MemberPacket`). The
//! table of members by address (`by_member`, from joins, enrollments, progress reports and
//! peers' announcements) says which group a packet is for: an owned group gets it, a group
//! owned by another node gets it relayed there (the same `Relay` message, named by the
//! group's tid, which is then only an identity), and a stranger's packet is dropped unanswered.
//! Unicast transfers are not announced: the router's ECMP hash covers addresses only, so
//! every packet of a client, from any of its ports, reaches the node that took its request;
//! only a route change moves a client mid-transfer, and then (as when a node dies) its
//! packets are dropped unanswered at the new node, the transfer times out and the client (or
//! its boot firmware) asks again, which the new node serves.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use tftpcast_proto::cluster::{GroupInfo, MemberInfo, Message as ClusterMessage, NodeId, StreamKey};
use tftpcast_proto::multicast::{GroupConfig, RateConfig};
use tracing::{debug, info, info_span, warn};

use crate::fs::file_cache::{FileCache, FileRequest};
use crate::cluster::membership::{ClusterEvent, Outbound};
use crate::cluster::group::{BecomeRelay, EndGroup, GroupIdle, GroupNotices, GroupProgress, GroupSession, GroupSpec, Incoming, Join, RelayOut, TakeOver};
use crate::flow::pacing::Pacing;
use crate::state::DumpState;
use crate::net::transport::{Endpoint, SharedSend};

/// Identity of a stream: same key, same bytes in the same blocks, on every node (content
/// hash, not modification time).
pub type GroupKey = StreamKey;

/// The pool slot a stream prefers: a hash of its identity, so every node that starts the same
/// stream picks the same group address and transfer port.
fn preferred_slot(key: &GroupKey, slots: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = key.sha256.iter().copied().chain(key.size.to_be_bytes()).chain(key.blksize.to_be_bytes()).chain([key.netascii as u8]);
    for b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % slots.max(1) as u64) as u32
}

/// Which of two nodes keeps a group both started: the smaller id, on every node alike.
fn wins(a: &str, b: &str) -> bool {
    a < b
}

/// Multicast settings, validated.
#[derive(Debug, Clone)]
pub struct MulticastPolicy {
    pub pool_base: Ipv4Addr,
    pub pool_size: u32,
    pub port: u16,
    /// Group transfer sockets use port `tid_port_base + slot` (slot: the address's index in
    /// the pool), so a group's identity follows from its address.
    pub tid_port_base: u16,
    pub interface: Option<Ipv4Addr>,
    pub ttl: u32,
    pub start_delay: Duration,
    pub start_min_clients: usize,
    pub window: u16,
    pub timeout: Duration,
    pub min_timeout: Duration,
    pub max_timeout: Duration,
    pub master_retries: u32,
    /// A master that answered before is kept this long after its last progress.
    pub give_up_after: Duration,
    pub slow_master_repairs: u32,
    pub lone_member_unicast: bool,
    pub probe_blocks: u32,
    pub rate: RateConfig,
    pub lease_every: Duration,
    /// Groups send from the listening socket (`UseSocket`) instead of their own.
    pub single_port: bool,
}

/// Single-port mode: a listener's socket, for the groups served from its address.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UseSocket(pub SharedSend);

/// Single-port mode: a packet that reached a listener from a peer without a unicast session,
/// perhaps a multicast group's member.
#[derive(Message)]
#[rtype(result = "()")]
pub struct MemberPacket {
    pub client: SocketAddr,
    pub packet: Bytes,
}

/// This node's identity in the cluster and the way out to its peers.
#[derive(Clone)]
pub struct ClusterLink {
    pub node_id: NodeId,
    pub out: Recipient<Outbound>,
}

/// A client asks for a file with the `multicast` option.
#[derive(Message)]
#[rtype(result = "Result<Joined, String>")]
pub struct MulticastRequest {
    pub key: GroupKey,
    /// The file in wire form (netascii already encoded).
    pub data: Bytes,
    pub client: SocketAddr,
    /// The address the request was sent to: the group's socket is bound to it.
    pub local: IpAddr,
    /// Options of this client's OACK besides `multicast`.
    pub options: Vec<(String, String)>,
    /// Only join a group already running or starting (admission control let the request in
    /// at the session limit because joining costs nothing); never start one.
    pub join_only: bool,
    /// Single-port mode: the listening socket the request came through.
    pub shared: Option<SharedSend>,
}

#[derive(Debug, Clone)]
pub struct Joined {
    pub group: SocketAddrV4,
    pub tid: SocketAddr,
    pub new_group: bool,
    /// The node that owns the group (None: this node).
    pub owner: Option<NodeId>,
}

/// How many groups this node owns (shutdown waits for them).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct OwnedGroups;

struct Entry {
    key: GroupKey,
    session: Addr<GroupSession>,
    group: SocketAddrV4,
    tid: SocketAddr,
    /// None: this node owns the group; Some: it relays for that node.
    owner: Option<NodeId>,
    joins: u64,
    created: Instant,
    block: u64,
    started: bool,
    members: Vec<MemberInfo>,
}

pub struct Coordinator {
    policy: MulticastPolicy,
    pacing: Addr<Pacing>,
    files: Addr<FileCache>,
    cluster: Option<ClusterLink>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    next_id: u64,
    groups: HashMap<u64, Entry>,
    by_tid: HashMap<SocketAddr, u64>,
    /// Single-port mode: the listening sockets, and which group each member belongs to.
    shared: Vec<SharedSend>,
    by_member: HashMap<SocketAddr, u64>,
    /// Packets from peers that are neither in a transfer nor a member (dropped unanswered),
    /// and members' packets dropped on a full group mailbox.
    strays: u64,
    member_drops: u64,
    /// The last table each peer announced.
    remote: HashMap<NodeId, Vec<GroupInfo>>,
    alive: BTreeSet<NodeId>,
    seq: u64,
    dirty: bool,
    started_total: u64,
    fallbacks: u64,
    enrolled_remote: u64,
    relayed: u64,
    takeovers: u64,
    handovers: u64,
}

impl Coordinator {
    pub fn new(policy: MulticastPolicy, pacing: Addr<Pacing>, files: Addr<FileCache>, cluster: Option<ClusterLink>, arbiters: Vec<ArbiterHandle>) -> Self {
        Coordinator {
            policy,
            pacing,
            files,
            cluster,
            arbiters,
            next_arbiter: 0,
            next_id: 1,
            groups: HashMap::new(),
            by_tid: HashMap::new(),
            shared: Vec::new(),
            by_member: HashMap::new(),
            strays: 0,
            member_drops: 0,
            remote: HashMap::new(),
            alive: BTreeSet::new(),
            seq: 0,
            dirty: false,
            started_total: 0,
            fallbacks: 0,
            enrolled_remote: 0,
            relayed: 0,
            takeovers: 0,
            handovers: 0,
        }
    }

    fn node_id(&self) -> &str {
        self.cluster.as_ref().map(|c| c.node_id.as_str()).unwrap_or("")
    }

    fn send(&self, to: Option<NodeId>, msg: ClusterMessage) {
        if let Some(c) = &self.cluster {
            c.out.do_send(Outbound { to, msg });
        }
    }

    /// Usable pool slots: the network and broadcast addresses of a range are skipped.
    fn slots(&self) -> (u32, u32) {
        let size = self.policy.pool_size;
        if size > 2 {
            (1, size - 2)
        } else {
            (0, size)
        }
    }

    /// Addresses in use by groups anywhere in the cluster, other than those of `key`.
    fn taken(&self, key: &GroupKey) -> HashSet<Ipv4Addr> {
        let local = self.groups.values().filter(|e| &e.key != key).map(|e| *e.group.ip());
        let remote = self.remote.values().flatten().filter(|g| &g.key != key).map(|g| *g.group.ip());
        local.chain(remote).collect()
    }

    /// The group address and slot for `key`: its preferred slot, or the next free one.
    fn allocate(&self, key: &GroupKey) -> Option<(Ipv4Addr, u32)> {
        let (first, count) = self.slots();
        let base = u32::from(self.policy.pool_base);
        let start = preferred_slot(key, count);
        let taken = self.taken(key);
        (0..count).map(|i| first + (start + i) % count).map(|slot| (Ipv4Addr::from(base + slot), slot)).find(|(a, _)| !taken.contains(a))
    }

    fn group_config(&self, group: SocketAddrV4, blksize: u16, start_at: Instant) -> GroupConfig {
        GroupConfig {
            group,
            blksize,
            window: self.policy.window,
            timeout: self.policy.timeout,
            min_timeout: self.policy.min_timeout,
            max_timeout: self.policy.max_timeout,
            master_retries: self.policy.master_retries,
            give_up_after: self.policy.give_up_after,
            start_at,
            start_min_clients: self.policy.start_min_clients,
            slow_master_repairs: self.policy.slow_master_repairs,
            lone_member_unicast: self.policy.lone_member_unicast,
            probe_blocks: self.policy.probe_blocks,
            rate: self.policy.rate.clone(),
        }
    }

    /// The listening socket a group on `local` sends from (single-port mode): one bound to
    /// that address, else a wildcard one.
    fn shared_for(&self, local: IpAddr) -> Option<SharedSend> {
        let exact = self.shared.iter().find(|s| s.bound().map(|b| b.ip()) == Some(local));
        let wild = || self.shared.iter().find(|s| s.bound().is_some_and(|b| b.ip().is_unspecified()));
        exact.or_else(wild).map(|s| s.sending_from(local))
    }

    /// Where a group on `tid` sends from: its own socket bound to `tid`, or in single-port
    /// mode the listening socket (`given`: the one the request came through).
    fn endpoint_for(&self, tid: SocketAddr, given: Option<&SharedSend>) -> Result<(Endpoint, SocketAddr), String> {
        let IpAddr::V4(local) = tid.ip() else { return Err("multicast needs IPv4".into()) };
        if self.policy.single_port {
            let s = given.map(|s| s.sending_from(tid.ip())).or_else(|| self.shared_for(tid.ip())).ok_or_else(|| format!("no listening socket for {}", tid.ip()))?;
            return Ok((Endpoint::Shared(s), tid));
        }
        let socket = crate::net::bind_group(local, Some((tid.port(), tid.port())), self.policy.interface, self.policy.ttl)
            .map_err(|e| format!("cannot open group socket {tid}: {e}"))?;
        let tid = socket.local_addr().map_err(|e| e.to_string())?;
        Ok((Endpoint::Own(socket), tid))
    }

    /// Starts a group session (owner with `owner_of`, else relay) on the group's socket.
    fn spawn_session(&mut self, key: &GroupKey, group: SocketAddrV4, tid: SocketAddr, owner_of: Option<(GroupConfig, Bytes)>, relay_for: Option<NodeId>, ctx: &mut Context<Self>) -> Result<u64, String> {
        self.spawn_session_via(key, group, tid, owner_of, relay_for, None, ctx)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_session_via(&mut self, key: &GroupKey, group: SocketAddrV4, tid: SocketAddr, owner_of: Option<(GroupConfig, Bytes)>, relay_for: Option<NodeId>, given: Option<&SharedSend>, ctx: &mut Context<Self>) -> Result<u64, String> {
        let (endpoint, tid) = self.endpoint_for(tid, given)?;
        let id = self.next_id;
        self.next_id += 1;
        let span = info_span!(
            "group",
            group = %group,
            file = %key.path,
            tid = tid.port(),
            mode = if key.netascii { "netascii" } else { "octet" },
            blksize = key.blksize,
        );
        let spec = GroupSpec {
            id,
            endpoint,
            tid,
            owner: owner_of,
            span,
            pacing: self.pacing.clone(),
            notices: GroupNotices { idle: ctx.address().recipient(), progress: ctx.address().recipient(), relay: ctx.address().recipient() },
            lease_every: self.policy.lease_every,
        };
        let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
        self.next_arbiter = self.next_arbiter.wrapping_add(1);
        let session = GroupSession::start_in_arbiter(arbiter, move |_| GroupSession::new(spec));
        self.groups.insert(
            id,
            Entry { key: key.clone(), session, group, tid, owner: relay_for, joins: 0, created: Instant::now(), block: 0, started: false, members: Vec::new() },
        );
        self.by_tid.insert(tid, id);
        Ok(id)
    }

    fn start_group(&mut self, m: &MulticastRequest, ctx: &mut Context<Self>) -> Result<u64, String> {
        let (addr, slot) = self.allocate(&m.key).ok_or("multicast address pool exhausted")?;
        let port = self.policy.tid_port_base.checked_add(slot as u16).ok_or("group port out of range")?;
        let group = SocketAddrV4::new(addr, self.policy.port);
        let cfg = self.group_config(group, m.key.blksize, Instant::now() + self.policy.start_delay);
        let id = self.spawn_session_via(&m.key, group, SocketAddr::new(m.local, port), Some((cfg, m.data.clone())), None, m.shared.as_ref(), ctx)?;
        let _g = info_span!("group", group = %group, file = %m.key.path, tid = port).entered();
        info!(
            size = m.data.len(),
            start_delay_ms = self.policy.start_delay.as_millis() as u64,
            start_min_clients = self.policy.start_min_clients,
            window = self.policy.window,
            "group created: waiting for the start delay"
        );
        self.started_total += 1;
        self.dirty = true;
        Ok(id)
    }

    fn end(&mut self, id: u64) {
        if let Some(e) = self.groups.remove(&id) {
            self.by_tid.remove(&e.tid);
            self.by_member.retain(|_, g| *g != id);
            e.session.do_send(EndGroup);
            if e.owner.is_none() {
                self.dirty = true;
            }
        }
    }

    /// Records group `id`'s members as last reported: members that left are forgotten, the
    /// others (and members who joined since) map to the group.
    fn set_members(&mut self, id: u64, members: Vec<MemberInfo>) {
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

    fn owned_table(&self) -> Vec<GroupInfo> {
        self.groups
            .values()
            .filter(|e| e.owner.is_none())
            .map(|e| GroupInfo { key: e.key.clone(), group: e.group, tid: e.tid, block: e.block, members: e.members.clone(), started: e.started })
            .collect()
    }

    fn announce(&mut self, to: Option<NodeId>) {
        if self.cluster.is_none() {
            return;
        }
        self.seq += 1;
        self.dirty = false;
        self.send(to, ClusterMessage::Groups { seq: self.seq, groups: self.owned_table() });
    }

    /// Brings this node's groups in line with what `from` announced.
    fn reconcile(&mut self, from: &NodeId, ctx: &mut Context<Self>) {
        let me = self.node_id().to_string();
        let theirs = self.remote.get(from).cloned().unwrap_or_default();
        for g in &theirs {
            match self.by_tid.get(&g.tid).copied() {
                Some(id) => {
                    let e = self.groups.get_mut(&id).expect("indexed");
                    match &e.owner {
                        None if e.key == g.key && wins(from, &me) => {
                            // Both started this stream at once; the other node keeps it.
                            e.owner = Some(from.clone());
                            self.handovers += 1;
                            info!(group = %g.group, file = %g.key.path, winner = %from, "start race lost: handing members over");
                            let (session, key, winner) = (e.session.clone(), g.key.clone(), from.clone());
                            session
                                .send(BecomeRelay)
                                .into_actor(self)
                                .map(move |res, act, _| {
                                    for (client, options) in res.unwrap_or_default() {
                                        act.send(Some(winner.clone()), ClusterMessage::Enroll { key: key.clone(), client, options });
                                    }
                                })
                                .spawn(ctx);
                            self.dirty = true;
                        }
                        None => {} // we keep it; the other node hands over to us
                        Some(owner) if owner != from => e.owner = Some(from.clone()),
                        Some(_) => {}
                    }
                    if self.groups.get(&id).is_some_and(|e| e.owner.as_ref() == Some(from)) {
                        // Members of a peer's group: their packets are relayed there.
                        self.set_members(id, g.members.clone());
                    }
                }
                None => {
                    // Relay for it: the router may send its members' packets here.
                    match self.spawn_session(&g.key, g.group, g.tid, None, Some(from.clone()), ctx) {
                        Ok(id) => {
                            self.set_members(id, g.members.clone());
                            debug!(group = %g.group, tid = %g.tid, owner = %from, "relaying for a peer's group")
                        }
                        Err(e) => debug!(group = %g.group, tid = %g.tid, error = %e, "cannot relay for a peer's group"),
                    }
                }
            }
        }
        // Relays for groups the peer no longer announces end with them.
        let gone: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, e)| e.owner.as_ref() == Some(from) && !theirs.iter().any(|g| g.tid == e.tid))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.end(id);
        }
    }

    /// `node` died: the alive node with the smallest id continues its groups.
    fn node_down(&mut self, node: &NodeId, ctx: &mut Context<Self>) {
        let groups = self.remote.remove(node).unwrap_or_default();
        let me = self.node_id().to_string();
        let successor = self.alive.iter().next().filter(|n| wins(n, &me)).cloned().unwrap_or(me.clone());
        for g in groups {
            if successor != me {
                if let Some(id) = self.by_tid.get(&g.tid) {
                    if let Some(e) = self.groups.get_mut(id) {
                        e.owner = Some(successor.clone());
                    }
                }
                continue;
            }
            self.take_over(node, g, ctx);
        }
    }

    fn take_over(&mut self, dead: &NodeId, g: GroupInfo, ctx: &mut Context<Self>) {
        self.takeovers += 1;
        warn!(group = %g.group, file = %g.key.path, dead = %dead, members = g.members.len(), block = g.block, "owner died: taking the group over");
        let dead = dead.clone();
        self.files
            .send(FileRequest { name: g.key.path.clone().into_bytes() })
            .into_actor(self)
            .map(move |res, act, ctx| {
                let data = match res {
                    Ok(Ok(ready)) if ready.key.sha256 == g.key.sha256 => {
                        if g.key.netascii {
                            Bytes::from(tftpcast_proto::netascii::encode(&ready.data))
                        } else {
                            ready.data
                        }
                    }
                    _ => {
                        warn!(group = %g.group, file = %g.key.path, "cannot take over: this node lacks the same file");
                        return;
                    }
                };
                let cfg = act.group_config(g.group, g.key.blksize, Instant::now());
                let members: Vec<(SocketAddr, Vec<(String, String)>)> = g.members.iter().map(|m| (m.client, m.options.clone())).collect();
                let id = match act.by_tid.get(&g.tid).copied() {
                    Some(id) => id,
                    None => match act.spawn_session(&g.key, g.group, g.tid, None, Some(dead.clone()), ctx) {
                        Ok(id) => id,
                        Err(e) => {
                            warn!(group = %g.group, error = %e, "cannot take over");
                            return;
                        }
                    },
                };
                let e = act.groups.get_mut(&id).expect("just found");
                e.owner = None;
                act.set_members(id, g.members.clone());
                let e = act.groups.get_mut(&id).expect("just found");
                e.session.do_send(TakeOver { cfg, data, members });
                act.dirty = true;
            })
            .spawn(ctx);
    }
}

impl Actor for Coordinator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.policy.single_port {
            // Listeners hand members' packets over with try_send: room for bursts.
            ctx.set_mailbox_capacity(1024);
        }
        if self.cluster.is_some() {
            // Changes go out within 50 ms; the whole table every second covers lost datagrams.
            ctx.run_interval(Duration::from_millis(50), |act, _| {
                if act.dirty {
                    act.announce(None);
                }
            });
            ctx.run_interval(Duration::from_secs(1), |act, _| act.announce(None));
        }
    }
}

impl Handler<MulticastRequest> for Coordinator {
    type Result = Result<Joined, String>;
    fn handle(&mut self, m: MulticastRequest, ctx: &mut Context<Self>) -> Self::Result {
        // A group for this stream on this address, owned here or relayed for a peer.
        let existing = self.groups.iter().find(|(_, e)| e.key == m.key && e.tid.ip() == m.local).map(|(id, _)| *id);
        let existing = existing.or_else(|| {
            // A peer's group we do not relay yet (its socket could not be bound earlier).
            let (owner, g) = self.remote.iter().flat_map(|(n, gs)| gs.iter().map(move |g| (n.clone(), g.clone()))).find(|(_, g)| g.key == m.key && g.tid.ip() == m.local)?;
            self.spawn_session(&g.key, g.group, g.tid, None, Some(owner), ctx).ok()
        });
        let (id, new_group) = match existing {
            Some(id) => (id, false),
            None if m.join_only => return Err("no group to join".into()),
            None => match self.start_group(&m, ctx) {
                Ok(id) => (id, true),
                Err(e) => {
                    self.fallbacks += 1;
                    warn!(client = %m.client, file = %m.key.path, reason = %e, "multicast not possible: serving by unicast");
                    return Err(e);
                }
            },
        };
        self.by_member.insert(m.client, id);
        let e = self.groups.get_mut(&id).expect("group in table");
        e.joins += 1;
        let joined = Joined { group: e.group, tid: e.tid, new_group, owner: e.owner.clone() };
        match e.owner.clone() {
            None => e.session.do_send(Join { client: m.client, options: m.options }),
            Some(owner) => {
                self.enrolled_remote += 1;
                self.send(Some(owner), ClusterMessage::Enroll { key: m.key, client: m.client, options: m.options });
            }
        }
        Ok(joined)
    }
}

impl Handler<GroupIdle> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: GroupIdle, _: &mut Context<Self>) {
        if matches!(self.groups.get(&m.id), Some(e) if e.joins == m.joins && e.owner.is_none()) {
            self.end(m.id);
        }
    }
}

impl Handler<GroupProgress> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: GroupProgress, _: &mut Context<Self>) {
        if let Some(e) = self.groups.get_mut(&m.id) {
            if e.members != m.members || e.started != m.started {
                self.dirty = true;
            }
            e.block = m.block;
            e.started = m.started;
            self.set_members(m.id, m.members);
        }
    }
}

impl Handler<OwnedGroups> for Coordinator {
    type Result = usize;
    fn handle(&mut self, _: OwnedGroups, _: &mut Context<Self>) -> usize {
        self.groups.values().filter(|e| e.owner.is_none()).count()
    }
}

impl Handler<RelayOut> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: RelayOut, _: &mut Context<Self>) {
        let owner = self.by_tid.get(&m.tid).and_then(|id| self.groups.get(id)).and_then(|e| e.owner.clone());
        if let Some(owner) = owner {
            self.relayed += 1;
            self.send(Some(owner), ClusterMessage::Relay { tid: m.tid, client: m.client, packet: m.packet });
        }
    }
}

impl Handler<UseSocket> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: UseSocket, _: &mut Context<Self>) {
        self.shared.push(m.0);
    }
}

impl Handler<MemberPacket> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: MemberPacket, _: &mut Context<Self>) {
        let Some(e) = self.by_member.get(&m.client).and_then(|id| self.groups.get(id)) else {
            // Not a member of any group: dropped without an answer (anti-amplification).
            self.strays += 1;
            return;
        };
        match e.owner.clone() {
            None => {
                if e.session.try_send(Incoming { client: m.client, packet: m.packet }).is_err() {
                    self.member_drops += 1;
                }
            }
            Some(owner) => {
                // A member of a group another node owns: the same hand-over as the relay sockets.
                self.relayed += 1;
                let tid = e.tid;
                self.send(Some(owner), ClusterMessage::Relay { tid, client: m.client, packet: m.packet.to_vec() });
            }
        }
    }
}

impl Handler<ClusterEvent> for Coordinator {
    type Result = ();
    fn handle(&mut self, ev: ClusterEvent, ctx: &mut Context<Self>) {
        match ev {
            ClusterEvent::Up { node, .. } => {
                self.alive.insert(node.clone());
                self.announce(Some(node));
            }
            ClusterEvent::Down { node } => {
                self.alive.remove(&node);
                self.node_down(&node, ctx);
            }
            ClusterEvent::Message { from, msg } => match msg {
                ClusterMessage::Groups { groups, .. } => {
                    self.alive.insert(from.clone());
                    self.remote.insert(from.clone(), groups);
                    self.reconcile(&from, ctx);
                }
                ClusterMessage::Enroll { key, client, options } => {
                    let entry = self.groups.iter_mut().filter(|(_, e)| e.key == key).min_by_key(|(_, e)| e.owner.is_some());
                    match entry {
                        Some((id, e)) if e.owner.is_none() => {
                            self.by_member.insert(client, *id);
                            e.joins += 1;
                            e.session.do_send(Join { client, options });
                        }
                        // This node handed the group over meanwhile: pass the member on.
                        Some((_, e)) => {
                            let owner = e.owner.clone();
                            if owner.as_ref() != Some(&from) {
                                self.send(owner, ClusterMessage::Enroll { key, client, options });
                            }
                        }
                        None => debug!(from = %from, client = %client, file = %key.path, "enrollment for a group this node does not know"),
                    }
                }
                ClusterMessage::Relay { tid, client, packet } => {
                    if let Some(e) = self.by_tid.get(&tid).and_then(|id| self.groups.get(id)) {
                        if e.owner.is_none() {
                            e.session.do_send(Incoming { client, packet: Bytes::from(packet) });
                        }
                    }
                }
            },
        }
    }
}

impl Handler<DumpState> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: DumpState, _: &mut Context<Self>) {
        let groups: Vec<String> = self
            .groups
            .values()
            .map(|e| {
                format!(
                    "{} {}@{} owner={} block={} members={} age_s={}",
                    e.key.path,
                    e.group,
                    e.tid,
                    e.owner.as_deref().unwrap_or("self"),
                    e.block,
                    e.members.len(),
                    e.created.elapsed().as_secs()
                )
            })
            .collect();
        let remote: usize = self.remote.values().map(|g| g.len()).sum();
        info!(
            target: "state",
            actor = "coordinator",
            node = self.node_id(),
            members = ?self.alive,
            groups_owned = self.groups.values().filter(|e| e.owner.is_none()).count(),
            groups_relayed = self.groups.values().filter(|e| e.owner.is_some()).count(),
            groups_remote = remote,
            groups_started = self.started_total,
            fallbacks = self.fallbacks,
            enrolled_remote = self.enrolled_remote,
            relayed = self.relayed,
            members_known = self.by_member.len(),
            strays = self.strays,
            member_drops = self.member_drops,
            takeovers = self.takeovers,
            handovers = self.handovers,
            groups = ?groups,
            "state"
        );
        for e in self.groups.values() {
            e.session.do_send(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> GroupKey {
        GroupKey { sha256: [b; 32], size: 1000, blksize: 1428, netascii: false, path: format!("f{b}") }
    }

    #[test]
    fn preferred_slot_is_stable_and_spread() {
        assert_eq!(preferred_slot(&key(1), 254), preferred_slot(&key(1), 254));
        let distinct: HashSet<u32> = (0..50).map(|b| preferred_slot(&key(b), 254)).collect();
        assert!(distinct.len() > 30, "{} distinct slots for 50 keys", distinct.len());
        let mut k = key(1);
        k.path = "elsewhere".into();
        assert_eq!(preferred_slot(&k, 254), preferred_slot(&key(1), 254), "the path does not change the slot");
    }

    #[test]
    fn the_smaller_id_wins_on_every_node() {
        assert!(wins("node-a", "node-b"));
        assert!(!wins("node-b", "node-a"));
    }
}
