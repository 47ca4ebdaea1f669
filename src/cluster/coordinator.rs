//! coordinator: drives this node's multicast group table (`tftpcast_proto::cluster::table`).
//!
//! Every multicast request goes through here, so "is this file already being multicast?"
//! and "start a group" happen in one step of one actor: two requests for the same file can
//! never start two groups on a node. A group is keyed by the content identity of its stream
//! (SHA-256, size, block size, mode): a file changed on disk is a different key and never
//! mixes into a running group, and the key is equal on every node holding the same bytes.
//!
//! The decisions (which slot, who wins a start race or a collision, who takes over a dead
//! node's groups) are the table's; this actor feeds it requests, group reports, peers'
//! messages and membership changes, and carries out its actions with sockets and actors:
//! it opens group sessions (owner or relay), gives them clients, sends messages to peers
//! through the membership layer, hands groups over and takes them over.
//!
//! # Cluster
//! Coordinators tell each other, through the membership layer, the complete list of groups
//! they own (on every change and every second). With that table:
//! - a request that reaches this node for a stream another node is multicasting is
//!   **enrolled** there: the owner adds the member and sends its OACK from the group's
//!   transfer socket (the shared service address and the group's port);
//! - every node binds the transfer socket of every group it knows of and **relays** what
//!   clients send to it to the owner, since the router may hash a member to any node;
//! - a new group's slot is **claimed** (announced) for a moment before its first member is
//!   answered, so two nodes starting different streams on one slot settle it before any
//!   client hears of it; the same stream started on two nodes meets on one slot, and the
//!   node with the larger id **hands its members over** and becomes a relay;
//! - when a node dies, the alive node with the smallest id **takes over** its groups: same
//!   address and port, members as last announced; the oldest is made master and asks for
//!   what it lacks.
//!
//! # Single-port mode
//! Groups send from the listening port and bind no socket; members' packets reach the
//! listener, which hands those of peers without a unicast session here (`MemberPacket`). The
//! table's members by address (from joins, enrollments, progress reports and peers'
//! announcements) say which group a packet is for: an owned group gets it, a group owned by
//! another node gets it relayed there (the same `Relay` message, named by the group's tid,
//! which is then only an identity), and a stranger's packet is dropped unanswered.
//! Unicast transfers are not announced: the router's ECMP hash covers addresses only, so
//! every packet of a client, from any of its ports, reaches the node that took its request;
//! only a route change moves a client mid-transfer, and then (as when a node dies) its
//! packets are dropped unanswered at the new node, the transfer times out and the client (or
//! its boot firmware) asks again, which the new node serves.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use bytes::Bytes;
use tftpcast_proto::cluster::table::{self, Action, GroupId, Placed, Table, TableConfig};
use tftpcast_proto::cluster::{GroupInfo, Message as ClusterMessage, NodeId, StreamKey};
use tftpcast_proto::multicast::{GroupConfig, RateConfig};
use tracing::{debug, info, info_span, warn};

use crate::cluster::group::{BecomeRelay, EndGroup, GroupIdle, GroupNotices, GroupProgress, GroupSession, GroupSpec, Incoming, Join, RelayOut, TakeOver};
use crate::cluster::membership::{ClusterEvent, Outbound};
use crate::flow::pacing::Pacing;
use crate::fs::file_cache::{FileCache, FileRequest};
use crate::net::transport::{Endpoint, SharedSend};
use crate::state::DumpState;

/// Identity of a stream: same key, same bytes in the same blocks, on every node (content
/// hash, not modification time).
pub type GroupKey = StreamKey;

/// How long a new group's slot is claimed before its first member is answered: a claim goes
/// out at once and changes within a 50 ms tick, so two claims that crossed in flight are both
/// known on both sides well within this (two ticks and a round trip on a LAN).
const CLAIM_SETTLE: Duration = Duration::from_millis(200);

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

/// A group session of this node and what it needs besides the table's entry.
struct Session {
    addr: Addr<GroupSession>,
    created: Instant,
}

pub struct Coordinator {
    policy: MulticastPolicy,
    pacing: Addr<Pacing>,
    files: Addr<FileCache>,
    cluster: Option<ClusterLink>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    table: Table,
    sessions: HashMap<GroupId, Session>,
    /// The bytes (and, in single-port mode, the listening socket) of each stream this node
    /// started a group for: a group that moves to another slot starts again from them.
    streams: HashMap<GroupKey, (Bytes, Option<SharedSend>)>,
    /// Single-port mode: the listening sockets.
    shared: Vec<SharedSend>,
    /// Packets from peers that are neither in a transfer nor a member (dropped unanswered),
    /// and members' packets dropped on a full group mailbox.
    strays: u64,
    member_drops: u64,
    fallbacks: u64,
    enrolled_remote: u64,
    relayed: u64,
}

impl Coordinator {
    pub fn new(policy: MulticastPolicy, pacing: Addr<Pacing>, files: Addr<FileCache>, cluster: Option<ClusterLink>, arbiters: Vec<ArbiterHandle>) -> Self {
        // A restarted node's announcements must not look older than its former self's.
        let first_seq = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        let table = Table::new(TableConfig {
            node_id: cluster.as_ref().map(|c| c.node_id.clone()).unwrap_or_default(),
            pool_base: policy.pool_base,
            pool_size: policy.pool_size,
            port: policy.port,
            tid_port_base: policy.tid_port_base,
            settle: CLAIM_SETTLE,
            first_seq,
        });
        Coordinator {
            policy,
            pacing,
            files,
            cluster,
            arbiters,
            next_arbiter: 0,
            table,
            sessions: HashMap::new(),
            streams: HashMap::new(),
            shared: Vec::new(),
            strays: 0,
            member_drops: 0,
            fallbacks: 0,
            enrolled_remote: 0,
            relayed: 0,
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

    /// Starts the session of table entry `id`: the owner of a new group (with the stream's
    /// bytes), or a relay for `relay_for`.
    fn spawn(&mut self, id: GroupId, key: &GroupKey, group: SocketAddrV4, tid: SocketAddr, relay_for: Option<NodeId>, ctx: &mut Context<Self>) -> Result<(), String> {
        let stream = if relay_for.is_none() { Some(self.streams.get(key).cloned().ok_or("the stream's bytes are gone")?) } else { None };
        let given = stream.as_ref().and_then(|(_, s)| s.as_ref());
        let (endpoint, tid) = self.endpoint_for(tid, given)?;
        let start_at = Instant::now() + self.policy.start_delay;
        let owner = stream.map(|(data, _)| (self.group_config(group, key.blksize, start_at), data));
        if let Some((_, data)) = &owner {
            let _g = info_span!("group", group = %group, file = %key.path, tid = tid.port()).entered();
            info!(
                size = data.len(),
                start_delay_ms = self.policy.start_delay.as_millis() as u64,
                start_min_clients = self.policy.start_min_clients,
                window = self.policy.window,
                "group created: waiting for the start delay"
            );
        }
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
            owner,
            span,
            pacing: self.pacing.clone(),
            notices: GroupNotices { idle: ctx.address().recipient(), progress: ctx.address().recipient(), relay: ctx.address().recipient() },
            lease_every: self.policy.lease_every,
        };
        let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
        self.next_arbiter = self.next_arbiter.wrapping_add(1);
        let addr = GroupSession::start_in_arbiter(arbiter, move |_| GroupSession::new(spec));
        self.sessions.insert(id, Session { addr, created: Instant::now() });
        Ok(())
    }

    /// Carries out what the table asks for. Returns the ids whose session could not start.
    fn drive(&mut self, ctx: &mut Context<Self>) -> Vec<GroupId> {
        let mut failed = Vec::new();
        while let Some(action) = self.table.poll_action() {
            match action {
                Action::Spawn { id, key, group, tid, relay_for } => {
                    let relay = relay_for.clone();
                    if let Err(e) = self.spawn(id, &key, group, tid, relay_for, ctx) {
                        match relay {
                            Some(owner) => debug!(group = %group, tid = %tid, owner = %owner, error = %e, "cannot relay for a peer's group"),
                            None => warn!(group = %group, file = %key.path, error = %e, "cannot open a group"),
                        }
                        failed.push(id);
                        self.table.handle_failed(id);
                    } else if let Some(owner) = relay {
                        debug!(group = %group, tid = %tid, owner = %owner, "relaying for a peer's group");
                    }
                }
                Action::Join { id, client, options } => {
                    if let Some(s) = self.sessions.get(&id) {
                        s.addr.do_send(Join { client, options });
                    }
                }
                Action::Send { to, msg } => self.send(to, msg),
                Action::HandOver { id, winner } => self.hand_over(id, winner, ctx),
                Action::TakeOver { id, dead, info } => self.take_over(id, dead, info, ctx),
                Action::Move { from, to } => self.moved(from, to),
                Action::End { id } => self.end(id),
            }
        }
        failed
    }

    fn end(&mut self, id: GroupId) {
        if let Some(s) = self.sessions.remove(&id) {
            s.addr.do_send(EndGroup);
        }
        // The bytes stay while a group of this node may still need them.
        let owned: Vec<GroupKey> = self.table.groups().filter(|(_, e)| e.owner.is_none()).map(|(_, e)| e.key.clone()).collect();
        self.streams.retain(|k, _| owned.contains(k));
    }

    /// Another stream keeps the slot of group `from`, which goes on as `to` on a free slot.
    fn moved(&mut self, from: GroupId, to: GroupId) {
        if let (Some(s), Some(e)) = (self.sessions.get(&from), self.table.group(to)) {
            let answered = s.created.elapsed();
            info!(file = %e.key.path, group = %e.group, tid = %e.tid, session_age_ms = answered.as_millis() as u64, "slot taken by another stream: group moved");
        }
        self.end(from);
    }

    /// Lost a start race: the session stops sending and its members are enrolled at `winner`.
    fn hand_over(&mut self, id: GroupId, winner: NodeId, ctx: &mut Context<Self>) {
        let (Some(s), Some(e)) = (self.sessions.get(&id), self.table.group(id)) else { return };
        info!(group = %e.group, file = %e.key.path, winner = %winner, "start race lost: handing members over");
        let key = e.key.clone();
        s.addr
            .send(BecomeRelay)
            .into_actor(self)
            .map(move |res, act, _| {
                for (client, options) in res.unwrap_or_default() {
                    act.send(Some(winner.clone()), ClusterMessage::Enroll { key: key.clone(), client, options });
                }
            })
            .spawn(ctx);
    }

    /// The owner died and this node continues its group, if it holds the same bytes.
    fn take_over(&mut self, id: GroupId, dead: NodeId, g: GroupInfo, ctx: &mut Context<Self>) {
        warn!(group = %g.group, file = %g.key.path, dead = %dead, members = g.members.len(), block = g.block, "owner died: taking the group over");
        self.files
            .send(FileRequest { name: g.key.path.clone().into_bytes() })
            .into_actor(self)
            .map(move |res, act, ctx| {
                let data = match res {
                    Ok(Ok(ready)) if ready.key.sha256 == g.key.sha256 && g.key.netascii => Bytes::from(tftpcast_proto::netascii::encode(&ready.data)),
                    Ok(Ok(ready)) if ready.key.sha256 == g.key.sha256 => ready.data,
                    _ => {
                        warn!(group = %g.group, file = %g.key.path, "cannot take over: this node lacks the same file");
                        act.table.handle_failed(id);
                        act.drive(ctx);
                        return;
                    }
                };
                act.streams.insert(g.key.clone(), (data.clone(), None));
                let cfg = act.group_config(g.group, g.key.blksize, Instant::now());
                let members = g.members.iter().map(|m| (m.client, m.options.clone())).collect();
                if let Some(s) = act.sessions.get(&id) {
                    s.addr.do_send(TakeOver { cfg, data, members });
                }
            })
            .spawn(ctx);
    }

    /// A multicast request, placed by the table; its new group's session opened.
    fn place(&mut self, m: MulticastRequest, ctx: &mut Context<Self>) -> Result<Placed, String> {
        let key = m.key.clone();
        self.streams.entry(key.clone()).or_insert_with(|| (m.data.clone(), m.shared.clone()));
        let req = table::Request { key: m.key, client: m.client, local: m.local, options: m.options, join_only: m.join_only };
        let placed = self.table.handle_request(Instant::now(), req);
        let failed = self.drive(ctx);
        let placed = placed.map_err(|e| e.as_str().to_string());
        let placed = match placed {
            Ok(p) if failed.contains(&p.id) => Err("cannot open the group's socket".to_string()),
            other => other,
        };
        self.end_stream_if_unused(&key);
        placed
    }

    fn end_stream_if_unused(&mut self, key: &GroupKey) {
        if !self.table.groups().any(|(_, e)| &e.key == key && e.owner.is_none()) {
            self.streams.remove(key);
        }
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
            // Claims settle and changes go out within 50 ms; the table itself announces the
            // whole table every second, which covers lost datagrams.
            ctx.run_interval(Duration::from_millis(50), |act, ctx| {
                act.table.handle_timeout(Instant::now());
                act.drive(ctx);
            });
        }
    }
}

impl Handler<MulticastRequest> for Coordinator {
    type Result = Result<Joined, String>;
    fn handle(&mut self, m: MulticastRequest, ctx: &mut Context<Self>) -> Self::Result {
        let (client, path, join_only) = (m.client, m.key.path.clone(), m.join_only);
        match self.place(m, ctx) {
            Ok(p) => {
                if p.owner.is_some() {
                    self.enrolled_remote += 1;
                }
                Ok(Joined { group: p.group, tid: p.tid, new_group: p.new_group, owner: p.owner })
            }
            Err(e) => {
                if !join_only {
                    self.fallbacks += 1;
                    warn!(client = %client, file = %path, reason = %e, "multicast not possible: serving by unicast");
                }
                Err(e)
            }
        }
    }
}

impl Handler<GroupIdle> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: GroupIdle, ctx: &mut Context<Self>) {
        self.table.handle_idle(m.id, m.joins);
        self.drive(ctx);
    }
}

impl Handler<GroupProgress> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: GroupProgress, ctx: &mut Context<Self>) {
        self.table.handle_progress(m.id, m.block, m.started, m.members);
        self.drive(ctx);
    }
}

impl Handler<OwnedGroups> for Coordinator {
    type Result = usize;
    fn handle(&mut self, _: OwnedGroups, _: &mut Context<Self>) -> usize {
        self.table.groups().filter(|(_, e)| e.owner.is_none()).count()
    }
}

impl Handler<RelayOut> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: RelayOut, _: &mut Context<Self>) {
        if let Some((_, Some(owner))) = self.table.route_tid(m.tid) {
            let owner = owner.clone();
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
        match self.table.route_member(m.client) {
            // Not a member of any group: dropped without an answer (anti-amplification).
            None => self.strays += 1,
            Some((id, _, None)) => {
                let sent = self.sessions.get(&id).map(|s| s.addr.try_send(Incoming { client: m.client, packet: m.packet }).is_ok());
                if sent != Some(true) {
                    self.member_drops += 1;
                }
            }
            Some((_, tid, Some(owner))) => {
                // A member of a group another node owns: the same hand-over as the relay sockets.
                let owner = owner.clone();
                self.relayed += 1;
                self.send(Some(owner), ClusterMessage::Relay { tid, client: m.client, packet: m.packet.to_vec() });
            }
        }
    }
}

impl Handler<ClusterEvent> for Coordinator {
    type Result = ();
    fn handle(&mut self, ev: ClusterEvent, ctx: &mut Context<Self>) {
        match ev {
            ClusterEvent::Up { node, .. } => self.table.handle_node_up(node),
            ClusterEvent::Down { node } => self.table.handle_node_down(&node),
            ClusterEvent::Message { msg: ClusterMessage::Relay { tid, client, packet }, .. } => {
                if let Some((id, None)) = self.table.route_tid(tid) {
                    if let Some(s) = self.sessions.get(&id) {
                        s.addr.do_send(Incoming { client, packet: Bytes::from(packet) });
                    }
                }
            }
            ClusterEvent::Message { from, msg } => self.table.handle_message(Instant::now(), &from, msg),
        }
        self.drive(ctx);
    }
}

impl Handler<DumpState> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: DumpState, _: &mut Context<Self>) {
        let groups: Vec<String> = self
            .table
            .groups()
            .map(|(id, e)| {
                let age = self.sessions.get(&id).map(|s| s.created.elapsed().as_secs()).unwrap_or(0);
                let claim = if e.is_claim() { " claim" } else { "" };
                format!("{} {}@{} owner={} block={} members={} age_s={age}{claim}", e.key.path, e.group, e.tid, e.owner.as_deref().unwrap_or("self"), e.block, e.members.len())
            })
            .collect();
        let stats = self.table.stats();
        let owned = self.table.groups().filter(|(_, e)| e.owner.is_none()).count();
        info!(
            target: "state",
            actor = "coordinator",
            node = self.node_id(),
            members = ?self.table.alive(),
            groups_owned = owned,
            groups_relayed = self.table.groups().count() - owned,
            groups_remote = self.table.remote_groups(),
            groups_started = stats.started,
            fallbacks = self.fallbacks,
            enrolled_remote = self.enrolled_remote,
            relayed = self.relayed,
            members_known = self.table.members_known(),
            strays = self.strays,
            member_drops = self.member_drops,
            takeovers = stats.takeovers,
            handovers = stats.handovers,
            moves = stats.moves,
            groups = ?groups,
            "state"
        );
        for s in self.sessions.values() {
            s.addr.do_send(m);
        }
    }
}
