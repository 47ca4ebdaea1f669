//! Cluster membership: one actor running foca (SWIM) over the authenticated cluster socket.
//!
//! The actor owns the node's cluster UDP socket (`--cluster-listen`). Every datagram in or out
//! is a [`cluster::Envelope`] sealed with the shared key by [`cluster::encode`]; anything that
//! fails [`cluster::decode`] is dropped and counted before foca or a subscriber sees a byte, so
//! a node without the key can neither join nor inject messages. `Envelope::Swim` carries
//! foca's own packets (encoded with bincode 2, see [`BincodeCodec`]); `Envelope::App` carries
//! coordinator [`cluster::Message`]s, delivered to the subscriber as
//! [`ClusterEvent::Message`] with the sender's node id taken from the authenticated envelope.
//!
//! Failure detection is tuned for a LAN (see [`MembershipConfig`]): with the defaults a node
//! that stops answering is declared down about 1-1.5 s after its death; a node that stops
//! cleanly ([`Leave`], or the actor stopping) tells its peers at once.
//!
//! Foca's timers live in one deadline-ordered queue behind a single re-armed `run_later`
//! (events due at the same instant fire in foca's `Timer` order, as foca requires).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use bytes::{Buf, BufMut};
use foca::{AccumulatingRuntime, Foca, Header, Member, NoCustomBroadcast, OwnedNotification, PeriodicParams, State};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tftpcast_proto::cluster::{self, ClusterError, Envelope, NodeId};
use tftpcast_proto::transmit;
use tracing::{debug, info, warn};

use crate::state::DumpState;
use crate::net::timer::Timer;
use crate::net::udp::{self, Datagram, DatagramStream, SharedSocket};

/// Largest foca packet: keeps a sealed SWIM datagram (foca bytes + envelope header, length
/// prefix and tag) under 1400 bytes, so membership traffic never fragments.
const SWIM_MAX_PACKET: usize = 1400 - 64;
/// At most one "rejected datagram" warning per this interval (the rest are counted).
const REJECT_WARN_EVERY: Duration = Duration::from_secs(10);

/// How this node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// This node's unique name (`--node-id`).
    pub node_id: NodeId,
    /// Address the cluster socket binds (`--cluster-listen`).
    pub listen: SocketAddr,
    /// Address peers reach this node at (`--advertise`); port 0 means "the bound port".
    pub advertise: SocketAddr,
    /// Peers to announce to on start (`--peer`); any one live member is enough to join.
    pub seeds: Vec<SocketAddr>,
    /// Shared cluster key authenticating every datagram; must not be empty.
    pub key: Vec<u8>,
    /// How often a random member is probed (SWIM protocol period).
    pub probe_period: Duration,
    /// How long to wait for a direct ack before asking others to probe indirectly; must be
    /// shorter than `probe_period`.
    pub probe_rtt: Duration,
    /// How long a suspected member has to refute the suspicion before it is declared down.
    pub suspect_to_down_after: Duration,
    /// While the node knows no member, it announces itself to every seed this often, so the
    /// order in which nodes start does not matter.
    pub seed_retry: Duration,
}

impl MembershipConfig {
    /// A LAN configuration: probe every 300 ms, 150 ms for a direct ack, 600 ms to refute a
    /// suspicion. A dead node is suspected within one or two probe periods and declared down
    /// 600 ms later: about 1-1.5 s in a small cluster.
    pub fn new(node_id: impl Into<NodeId>, listen: SocketAddr, key: impl Into<Vec<u8>>) -> Self {
        MembershipConfig {
            node_id: node_id.into(),
            listen,
            advertise: listen,
            seeds: Vec::new(),
            key: key.into(),
            probe_period: Duration::from_millis(300),
            probe_rtt: Duration::from_millis(150),
            suspect_to_down_after: Duration::from_millis(600),
            seed_retry: Duration::from_secs(2),
        }
    }

    /// The foca configuration derived from these settings.
    pub fn swim_config(&self) -> foca::Config {
        foca::Config {
            probe_period: self.probe_period,
            probe_rtt: self.probe_rtt,
            num_indirect_probes: NonZeroUsize::new(3).unwrap(),
            // Enough rounds to reach every member of a cluster of a few dozen nodes.
            max_transmissions: NonZeroU8::new(8).unwrap(),
            suspect_to_down_after: self.suspect_to_down_after,
            // Identities renew themselves (see `NodeIdentity::renew`), so remembering the
            // down ones for a day costs nothing and blocks no rejoin.
            remove_down_after: Some(Duration::from_secs(24 * 3600)),
            max_packet_size: NonZeroUsize::new(SWIM_MAX_PACKET).unwrap(),
            // A node wrongly declared down learns it and rejoins with a renewed identity.
            notify_down_members: true,
            // Ask one member for its member list now and then: a node seeded with a single
            // peer learns the whole roster quickly.
            periodic_announce: Some(PeriodicParams {
                frequency: Duration::from_secs(5),
                num_members: NonZeroUsize::new(1).unwrap(),
            }),
            // Heals partitions: keep knocking on members believed down.
            periodic_announce_to_down_members: Some(PeriodicParams {
                frequency: Duration::from_secs(10),
                num_members: NonZeroUsize::new(2).unwrap(),
            }),
            // Spread updates (suspicions, deaths, joins) faster than the probe cycle alone.
            periodic_gossip: Some(PeriodicParams {
                frequency: Duration::from_millis(200),
                num_members: NonZeroUsize::new(3).unwrap(),
            }),
        }
    }

    fn validate(&self) -> Result<(), MembershipError> {
        let bad = |why: &str| Err(MembershipError::Config(why.to_string()));
        if self.node_id.is_empty() {
            return bad("node id is empty");
        }
        if self.key.is_empty() {
            return bad("cluster key is empty");
        }
        if self.probe_period.is_zero() || self.probe_rtt.is_zero() || self.suspect_to_down_after.is_zero() {
            return bad("probe period, probe rtt and suspect timeout must be positive");
        }
        if self.probe_rtt >= self.probe_period {
            return bad("probe rtt must be shorter than the probe period");
        }
        if self.seed_retry.is_zero() {
            return bad("seed retry interval must be positive");
        }
        Ok(())
    }
}

/// A member as foca knows it: node id, advertised address, and a bump that makes a restarted
/// (or wrongly declared dead) node a new identity that wins over its old self.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub node: NodeId,
    pub addr: SocketAddr,
    pub bump: u64,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}#{}", self.node, self.addr, self.bump)
    }
}

impl foca::Identity for NodeIdentity {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeIdentity { node: self.node.clone(), addr: self.addr, bump: self.bump.wrapping_add(1) })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// Foca's packets in bincode 2 (standard config, decode limited to [`cluster::MAX_MESSAGE`]).
/// Foca's packets travel inside an authenticated envelope, so this codec only ever parses
/// bytes a key holder produced.
#[derive(Debug, Clone, Copy, Default)]
pub struct BincodeCodec;

impl BincodeCodec {
    fn put<V: Serialize>(v: &V, mut buf: impl BufMut) -> Result<(), ClusterError> {
        let bytes = bincode::serde::encode_to_vec(v, bincode::config::standard())?;
        if buf.remaining_mut() < bytes.len() {
            return Err(ClusterError::TooLarge(bytes.len()));
        }
        buf.put_slice(&bytes);
        Ok(())
    }

    fn take<V: DeserializeOwned>(mut buf: impl Buf) -> Result<V, ClusterError> {
        // Foca always hands a contiguous buffer, so the first chunk is all of it.
        let config = bincode::config::standard().with_limit::<{ cluster::MAX_MESSAGE }>();
        let (v, used) = bincode::serde::decode_from_slice(buf.chunk(), config)?;
        buf.advance(used);
        Ok(v)
    }
}

impl<T: Serialize + DeserializeOwned> foca::Codec<T> for BincodeCodec {
    type Error = ClusterError;

    fn encode_header(&mut self, header: &Header<T>, buf: impl BufMut) -> Result<(), ClusterError> {
        Self::put(header, buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<T>, ClusterError> {
        Self::take(buf)
    }

    fn encode_member(&mut self, member: &Member<T>, buf: impl BufMut) -> Result<(), ClusterError> {
        Self::put(member, buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<T>, ClusterError> {
        Self::take(buf)
    }
}

/// Why the membership actor could not start or send.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    #[error("cluster socket: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Codec(#[from] ClusterError),
    #[error("no live member named {0}")]
    UnknownNode(NodeId),
    #[error("membership is not running")]
    NotRunning,
}

/// What the membership actor tells its subscriber.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum ClusterEvent {
    /// A node joined (or is back, or moved to a new address).
    Up { node: NodeId, addr: SocketAddr },
    /// A node left or was declared dead.
    Down { node: NodeId },
    /// An application message from a key holder; `from` is the node id it sealed.
    Message { from: NodeId, msg: cluster::Message },
}

/// Send `msg` to one live member.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(), MembershipError>")]
pub struct SendTo {
    pub node: NodeId,
    pub msg: cluster::Message,
}

/// Send `msg` to every live member; answers how many it was sent to.
#[derive(Message, Debug, Clone)]
#[rtype(result = "usize")]
pub struct Broadcast {
    pub msg: cluster::Message,
}

/// Test only: the live members other than this node, by node id (the state dump lists them
/// itself).
#[cfg(test)]
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Vec<(NodeId, SocketAddr)>")]
pub struct GetMembers;

/// Test only: the counters (the state dump logs them itself).
#[cfg(test)]
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "MembershipStats")]
pub struct GetMembershipStats;

/// Leave the cluster (peers learn it at once instead of detecting a failure) and stop.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Leave;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MembershipStats {
    /// Members that came up (a node seen again after being down counts again).
    pub joins: u64,
    /// Members that went down without having been suspected here: a clean leave.
    pub leaves: u64,
    /// Members declared down after a suspicion: a failure.
    pub failures: u64,
    /// Datagrams dropped by the envelope check (wrong key, corrupt, oversized, foreign).
    pub rejected: u64,
    /// Authenticated SWIM packets foca refused (stale, from ourselves, malformed).
    pub swim_errors: u64,
    /// Application messages received from key holders.
    pub app_received: u64,
    /// Application messages dropped because the subscriber's mailbox was full.
    pub events_dropped: u64,
    /// Datagrams the socket refused to send.
    pub send_errors: u64,
}

type Swim = Foca<NodeIdentity, BincodeCodec, SmallRng, NoCustomBroadcast>;

/// The membership actor. Create it with [`Membership::new`] (binds `listen`) or
/// [`Membership::with_socket`] (a socket bound by the caller), then start it.
pub struct Membership {
    cfg: MembershipConfig,
    events: Recipient<ClusterEvent>,
    foca: Swim,
    runtime: AccumulatingRuntime<NodeIdentity>,
    timers: BinaryHeap<Reverse<(Instant, foca::Timer<NodeIdentity>)>>,
    timer: Timer,
    /// The bound socket until `started` registers it with the reactor.
    raw: Option<UdpSocket>,
    sock: Option<SharedSocket>,
    /// Live members by node id (never this node).
    live: BTreeMap<NodeId, NodeIdentity>,
    /// Members foca held as suspect after the last input: a later down is a failure.
    suspected: HashSet<NodeIdentity>,
    stats: MembershipStats,
    /// Start of the current warning window and how many rejections it has swallowed.
    reject_window: Option<(Instant, u64)>,
    left: bool,
    #[cfg(test)]
    crashed: bool,
}

impl AsMut<Timer> for Membership {
    fn as_mut(&mut self) -> &mut Timer {
        &mut self.timer
    }
}

impl Membership {
    /// Binds `cfg.listen` and prepares the actor.
    pub fn new(cfg: MembershipConfig, events: Recipient<ClusterEvent>) -> Result<Self, MembershipError> {
        cfg.validate()?;
        let sock = UdpSocket::bind(cfg.listen)?;
        Self::with_socket(cfg, sock, events)
    }

    /// Prepares the actor on a socket the caller bound (`cfg.listen` is then informational).
    pub fn with_socket(
        mut cfg: MembershipConfig,
        sock: UdpSocket,
        events: Recipient<ClusterEvent>,
    ) -> Result<Self, MembershipError> {
        cfg.validate()?;
        sock.set_nonblocking(true)?;
        let local = sock.local_addr()?;
        cfg.listen = local;
        if cfg.advertise.port() == 0 {
            cfg.advertise.set_port(local.port());
        }
        if cfg.advertise.ip().is_unspecified() {
            return Err(MembershipError::Config(format!(
                "advertise address {} is unspecified: peers need a routable address",
                cfg.advertise
            )));
        }
        // A restarted node must win over its old identity: start from the wall clock.
        let bump = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1);
        let identity = NodeIdentity { node: cfg.node_id.clone(), addr: cfg.advertise, bump };
        let rng = SmallRng::seed_from_u64(fastrand::u64(..));
        let foca = Foca::new(identity, cfg.swim_config(), rng, BincodeCodec);
        Ok(Membership {
            cfg,
            events,
            foca,
            runtime: AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            timer: Timer::default(),
            raw: Some(sock),
            sock: None,
            live: BTreeMap::new(),
            suspected: HashSet::new(),
            stats: MembershipStats::default(),
            reject_window: None,
            left: false,
            #[cfg(test)]
            crashed: false,
        })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.cfg.listen
    }

    /// The address peers reach this node at.
    pub fn advertise(&self) -> SocketAddr {
        self.cfg.advertise
    }

    fn announce_seeds(&mut self, ctx: &mut Context<Self>) {
        if self.left {
            return;
        }
        let me = (self.cfg.advertise, self.cfg.listen);
        for seed in self.cfg.seeds.clone() {
            if seed == me.0 || seed == me.1 {
                continue;
            }
            // Foca accepts an announce addressed to any identity with its address, so a
            // placeholder identity is enough to reach a seed whose name we do not know yet.
            let dst = NodeIdentity { node: NodeId::new(), addr: seed, bump: 0 };
            if let Err(e) = self.foca.announce(dst, &mut self.runtime) {
                debug!(seed = %seed, error = %e, "announce failed");
            }
        }
        self.drain(ctx);
    }

    /// Acts on everything foca produced: datagrams, timers, notifications.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        while let Some((to, data)) = self.runtime.to_send() {
            let env = Envelope::Swim(data.to_vec());
            if let Err(e) = self.send_envelope(&env, to.addr, ctx) {
                debug!(to = %to.addr, error = %e, "cannot send SWIM packet");
            }
        }
        let now = Instant::now();
        while let Some((after, t)) = self.runtime.to_schedule() {
            self.timers.push(Reverse((now + after, t)));
        }
        if let Some(Reverse((at, _))) = self.timers.peek() {
            let at = *at;
            self.timer.arm(ctx, at, Self::fire_timers);
        }
        while let Some(n) = self.runtime.to_notify() {
            self.notification(n);
        }
        self.suspected.clear();
        for m in self.foca.iter_membership_state() {
            if m.state() == State::Suspect {
                self.suspected.insert(m.id().clone());
            }
        }
    }

    fn fire_timers(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, t))) = self.timers.pop() else { break };
            if let Err(e) = self.foca.handle_timer(t, &mut self.runtime) {
                debug!(error = %e, "SWIM timer");
            }
        }
        self.drain(ctx);
    }

    fn notification(&mut self, n: OwnedNotification<NodeIdentity>) {
        match n {
            OwnedNotification::MemberUp(id) => self.member_up(id),
            OwnedNotification::MemberDown(id) => self.member_down(&id),
            OwnedNotification::Rename(old, new) => {
                if self.live.get(&old.node) == Some(&old) {
                    if old.node == new.node {
                        self.live.insert(new.node.clone(), new.clone());
                        if old.addr != new.addr {
                            self.member_up(new);
                        }
                    } else {
                        self.member_down(&old);
                        self.member_up(new);
                    }
                }
            }
            OwnedNotification::Active => info!(node = %self.cfg.node_id, "joined the cluster"),
            OwnedNotification::Idle => info!(node = %self.cfg.node_id, "no live cluster members"),
            OwnedNotification::Defunct => {
                if !self.left {
                    warn!(node = %self.cfg.node_id, "the cluster declared this node down")
                }
            }
            OwnedNotification::Rejoin(id) => info!(identity = ?id, "rejoining the cluster"),
        }
        crate::metrics::m().cluster_members.set(self.live.len() as i64);
    }

    fn member_up(&mut self, id: NodeIdentity) {
        if id.node == self.cfg.node_id {
            warn!(node = %id.node, addr = %id.addr, "another member uses this node's id; ignored");
            return;
        }
        let addr = id.addr;
        let node = id.node.clone();
        if self.live.insert(node.clone(), id).is_none() {
            self.stats.joins += 1;
        }
        info!(node = %node, addr = %addr, "member up");
        self.events.do_send(ClusterEvent::Up { node, addr });
    }

    fn member_down(&mut self, id: &NodeIdentity) {
        if self.live.get(&id.node) != Some(id) {
            // An identity that was already replaced (restart, new address): nothing changes.
            debug!(identity = ?id, "stale identity down");
            return;
        }
        self.live.remove(&id.node);
        let reason = if self.suspected.remove(id) {
            self.stats.failures += 1;
            "failed"
        } else {
            self.stats.leaves += 1;
            "left"
        };
        info!(node = %id.node, addr = %id.addr, reason, "member down");
        self.events.do_send(ClusterEvent::Down { node: id.node.clone() });
    }

    fn send_envelope(
        &mut self,
        env: &Envelope,
        to: SocketAddr,
        ctx: &mut Context<Self>,
    ) -> Result<(), MembershipError> {
        let bytes = cluster::encode(env, &self.cfg.key)?;
        let Some(sock) = &self.sock else { return Err(MembershipError::NotRunning) };
        match sock.get_ref().send_to(&bytes, to) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A full socket buffer is back-pressure, not loss: send when writable.
                ctx.spawn(udp::send_when_writable(sock.clone(), transmit::Datagram::Control(bytes), to).into_actor(self));
                Ok(())
            }
            Err(e) => {
                self.stats.send_errors += 1;
                Err(e.into())
            }
        }
    }

    fn reject(&mut self, from: SocketAddr, why: &ClusterError) {
        self.stats.rejected += 1;
        let now = Instant::now();
        match &mut self.reject_window {
            Some((start, swallowed)) if now.duration_since(*start) < REJECT_WARN_EVERY => *swallowed += 1,
            window => {
                let suppressed = window.map_or(0, |(_, n)| n);
                *window = Some((now, 0));
                warn!(from = %from, error = %why, suppressed, total = self.stats.rejected, "rejected cluster datagram");
            }
        }
    }

    fn leave(&mut self) {
        if self.left || self.sock.is_none() {
            return;
        }
        self.left = true;
        if self.foca.num_members() == 0 {
            return;
        }
        if let Err(e) = self.foca.leave_cluster(&mut self.runtime) {
            debug!(error = %e, "leave");
        }
        // Send now: the actor is stopping, so nothing spawned would run.
        while let Some((to, data)) = self.runtime.to_send() {
            if let (Ok(bytes), Some(sock)) =
                (cluster::encode(&Envelope::Swim(data.to_vec()), &self.cfg.key), &self.sock)
            {
                let _ = sock.get_ref().send_to(&bytes, to.addr);
            }
        }
        info!(node = %self.cfg.node_id, "left the cluster");
    }
}

impl Actor for Membership {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let raw = self.raw.take().expect("socket");
        match udp::register(raw) {
            Ok(s) => {
                ctx.add_stream(DatagramStream::new(s.clone(), cluster::MAX_MESSAGE, false));
                self.sock = Some(s);
            }
            Err(e) => {
                warn!(error = %e, "cannot register the cluster socket");
                ctx.stop();
                return;
            }
        }
        info!(
            node = %self.cfg.node_id,
            listen = %self.cfg.listen,
            advertise = %self.cfg.advertise,
            seeds = ?self.cfg.seeds,
            "cluster membership started"
        );
        self.announce_seeds(ctx);
        ctx.run_interval(self.cfg.seed_retry, |act, ctx| {
            if act.foca.num_members() == 0 {
                act.announce_seeds(ctx);
            }
        });
    }

    fn stopping(&mut self, _: &mut Context<Self>) -> Running {
        #[cfg(test)]
        if self.crashed {
            return Running::Stop;
        }
        self.leave();
        Running::Stop
    }
}

impl StreamHandler<Datagram> for Membership {
    fn handle(&mut self, d: Datagram, ctx: &mut Context<Self>) {
        match cluster::decode(&d.data, &self.cfg.key) {
            Err(e) => self.reject(d.meta.from, &e),
            Ok(Envelope::Swim(bytes)) => {
                if let Err(e) = self.foca.handle_data(&bytes, &mut self.runtime) {
                    self.stats.swim_errors += 1;
                    debug!(from = %d.meta.from, error = %e, "SWIM packet refused");
                }
                self.drain(ctx);
            }
            Ok(Envelope::App { from, msg }) => {
                // The key proves the sender is a cluster member; the address proves which one:
                // a message claiming another member's id from elsewhere is dropped.
                if self.live.get(&from).map(|id| id.addr.ip()) != Some(d.meta.from.ip()) {
                    self.stats.rejected += 1;
                    debug!(from = %d.meta.from, claimed = %from, "application message from an address that is not the claimed member's");
                    return;
                }
                self.stats.app_received += 1;
                // The per-datagram path must not queue without bound: count what is dropped.
                if self.events.try_send(ClusterEvent::Message { from, msg }).is_err() {
                    self.stats.events_dropped += 1;
                }
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        warn!(node = %self.cfg.node_id, "cluster socket failed; membership stops");
        ctx.stop();
    }
}

/// The coordinator's way out: `to: None` broadcasts to every live member.
/// A message for peer coordinators; `to: None` is every live member.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Outbound {
    pub to: Option<NodeId>,
    pub msg: tftpcast_proto::cluster::Message,
}

impl Handler<Outbound> for Membership {
    type Result = ();
    fn handle(&mut self, m: Outbound, ctx: &mut Self::Context) {
        match m.to {
            Some(node) => {
                let _ = Handler::<SendTo>::handle(self, SendTo { node, msg: m.msg }, ctx);
            }
            None => {
                let _ = Handler::<Broadcast>::handle(self, Broadcast { msg: m.msg }, ctx);
            }
        }
    }
}

impl Handler<SendTo> for Membership {
    type Result = Result<(), MembershipError>;
    fn handle(&mut self, m: SendTo, ctx: &mut Context<Self>) -> Self::Result {
        let addr = self.live.get(&m.node).map(|id| id.addr).ok_or(MembershipError::UnknownNode(m.node))?;
        let env = Envelope::App { from: self.cfg.node_id.clone(), msg: m.msg };
        self.send_envelope(&env, addr, ctx)
    }
}

impl Handler<Broadcast> for Membership {
    type Result = usize;
    fn handle(&mut self, m: Broadcast, ctx: &mut Context<Self>) -> usize {
        let env = Envelope::App { from: self.cfg.node_id.clone(), msg: m.msg };
        let addrs: Vec<SocketAddr> = self.live.values().map(|id| id.addr).collect();
        let mut sent = 0;
        for addr in addrs {
            match self.send_envelope(&env, addr, ctx) {
                Ok(()) => sent += 1,
                Err(e) => debug!(to = %addr, error = %e, "broadcast send failed"),
            }
        }
        sent
    }
}

#[cfg(test)]
impl Handler<GetMembers> for Membership {
    type Result = MessageResult<GetMembers>;
    fn handle(&mut self, _: GetMembers, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.live.iter().map(|(n, id)| (n.clone(), id.addr)).collect())
    }
}

#[cfg(test)]
impl Handler<GetMembershipStats> for Membership {
    type Result = MessageResult<GetMembershipStats>;
    fn handle(&mut self, _: GetMembershipStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.stats)
    }
}

impl Handler<Leave> for Membership {
    type Result = ();
    fn handle(&mut self, _: Leave, ctx: &mut Context<Self>) {
        self.leave();
        ctx.stop();
    }
}

impl Handler<DumpState> for Membership {
    type Result = ();
    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let members: Vec<String> = self.live.values().map(|id| format!("{}@{}", id.node, id.addr)).collect();
        let s = self.stats;
        info!(
            target: "state",
            actor = "membership",
            node = %self.cfg.node_id,
            advertise = %self.cfg.advertise,
            members = ?members,
            live = members.len(),
            suspected = self.suspected.len(),
            joins = s.joins,
            leaves = s.leaves,
            failures = s.failures,
            rejected = s.rejected,
            swim_errors = s.swim_errors,
            app_received = s.app_received,
            events_dropped = s.events_dropped,
            send_errors = s.send_errors,
            "state"
        );
    }
}

/// Test only: stop without telling anyone, as a crashed node would.
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
struct Crash;

#[cfg(test)]
impl Handler<Crash> for Membership {
    type Result = ();
    fn handle(&mut self, _: Crash, ctx: &mut Context<Self>) {
        self.crashed = true;
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tftpcast_proto::cluster::{GroupInfo, Message as AppMessage, StreamKey};
    use tokio::sync::mpsc;

    const KEY: &[u8] = b"test cluster key";

    /// Forwards a node's events into a channel the test reads.
    struct Sink(mpsc::UnboundedSender<ClusterEvent>);
    impl Actor for Sink {
        type Context = Context<Self>;
    }
    impl Handler<ClusterEvent> for Sink {
        type Result = ();
        fn handle(&mut self, e: ClusterEvent, _: &mut Context<Self>) {
            let _ = self.0.send(e);
        }
    }

    struct Node {
        name: String,
        addr: Addr<Membership>,
        at: SocketAddr,
        rx: mpsc::UnboundedReceiver<ClusterEvent>,
        seen: Vec<ClusterEvent>,
    }

    impl Node {
        /// Collects events until `f` holds or `within` passes; true if it held.
        async fn until(&mut self, within: Duration, f: impl Fn(&[ClusterEvent]) -> bool) -> bool {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                if f(&self.seen) {
                    return true;
                }
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(e)) => self.seen.push(e),
                    Ok(None) | Err(_) => return f(&self.seen),
                }
            }
        }

        /// Collects whatever arrives during `d`.
        async fn settle(&mut self, d: Duration) {
            self.until(d, |_| false).await;
        }

        fn messages(&self) -> Vec<(String, AppMessage)> {
            self.seen
                .iter()
                .filter_map(|e| match e {
                    ClusterEvent::Message { from, msg } => Some((from.clone(), msg.clone())),
                    _ => None,
                })
                .collect()
        }
    }

    /// Nodes up according to an event history.
    fn up(events: &[ClusterEvent]) -> HashSet<String> {
        let mut up = HashSet::new();
        for e in events {
            match e {
                ClusterEvent::Up { node, .. } => {
                    up.insert(node.clone());
                }
                ClusterEvent::Down { node } => {
                    up.remove(node);
                }
                ClusterEvent::Message { .. } => {}
            }
        }
        up
    }

    fn names(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn is_down(events: &[ClusterEvent], who: &str) -> bool {
        events.iter().any(|e| matches!(e, ClusterEvent::Down { node } if node == who))
    }

    fn got(events: &[ClusterEvent], from: &str, msg: &AppMessage) -> bool {
        events.iter().any(|e| matches!(e, ClusterEvent::Message { from: f, msg: m } if f == from && m == msg))
    }

    fn bind() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").unwrap()
    }

    fn start(name: &str, sock: UdpSocket, seeds: Vec<SocketAddr>, key: &[u8]) -> Node {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Sink(tx).start();
        let at = sock.local_addr().unwrap();
        let mut cfg = MembershipConfig::new(name, "127.0.0.1:0".parse().unwrap(), key);
        cfg.seeds = seeds;
        cfg.seed_retry = Duration::from_millis(300);
        let m = Membership::with_socket(cfg, sock, sink.recipient()).unwrap();
        assert_eq!((m.local_addr(), m.advertise()), (at, at));
        Node { name: name.to_string(), addr: m.start(), at, rx, seen: Vec::new() }
    }

    /// Nodes each seeded with every address (its own included: it must skip it).
    fn cluster(list: &[&str]) -> Vec<Node> {
        let socks: Vec<UdpSocket> = list.iter().map(|_| bind()).collect();
        let addrs: Vec<SocketAddr> = socks.iter().map(|s| s.local_addr().unwrap()).collect();
        list.iter().zip(socks).map(|(n, s)| start(n, s, addrs.clone(), KEY)).collect()
    }

    /// Waits until every node sees exactly the others up.
    async fn converge(nodes: &mut [&mut Node], within: Duration) {
        let all: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        for n in nodes.iter_mut() {
            let want: HashSet<String> = all.iter().filter(|x| **x != n.name).cloned().collect();
            let ok = n.until(within, |s| up(s) == want).await;
            assert!(ok, "{} sees {:?}, wants {want:?}", n.name, n.seen);
        }
    }

    fn groups(seq: u64) -> AppMessage {
        let key = StreamKey { sha256: [1; 32], size: 1 << 20, blksize: 1428, netascii: false, path: "img".into() };
        AppMessage::Groups {
            seq,
            groups: vec![GroupInfo {
                key,
                group: "239.255.0.1:1758".parse().unwrap(),
                tid: "127.0.0.1:50000".parse().unwrap(),
                block: 3,
                members: vec![],
                started: true,
                claim: false,
            }],
        }
    }

    #[actix_rt::test]
    async fn membership_three_nodes_join_exchange_and_detect_failure() {
        let t0 = Instant::now();
        let mut nodes = cluster(&["a", "b", "c"]);
        {
            let [a, b, c] = &mut nodes[..] else { unreachable!() };
            converge(&mut [a, b, c], Duration::from_secs(5)).await;
        }
        eprintln!("three nodes converged after {:?}", t0.elapsed());
        for n in &nodes {
            let mut members = n.addr.send(GetMembers).await.unwrap();
            members.sort();
            let mut want: Vec<(String, SocketAddr)> =
                nodes.iter().filter(|o| o.name != n.name).map(|o| (o.name.clone(), o.at)).collect();
            want.sort();
            assert_eq!(members, want);
        }

        // A broadcast from a reaches b and c, with a's node id as the sender.
        let msg = groups(1);
        assert_eq!(nodes[0].addr.send(Broadcast { msg: msg.clone() }).await.unwrap(), 2);
        for n in &mut nodes[1..] {
            assert!(n.until(Duration::from_secs(2), |s| got(s, "a", &msg)).await, "{}: {:?}", n.name, n.seen);
        }

        // A unicast from c reaches b only.
        let uni = AppMessage::Relay {
            tid: "127.0.0.1:50000".parse().unwrap(),
            client: "127.0.0.1:40000".parse().unwrap(),
            packet: vec![0, 4, 0, 7],
        };
        nodes[2].addr.send(SendTo { node: "b".into(), msg: uni.clone() }).await.unwrap().unwrap();
        assert!(nodes[1].until(Duration::from_secs(2), |s| got(s, "c", &uni)).await);
        nodes[0].settle(Duration::from_millis(100)).await;
        assert!(nodes[0].messages().is_empty(), "{:?}", nodes[0].seen);
        let err = nodes[2].addr.send(SendTo { node: "nobody".into(), msg: uni }).await.unwrap();
        assert!(matches!(err, Err(MembershipError::UnknownNode(_))));

        // c crashes (no goodbye): a and b declare it down by failure detection alone.
        let t0 = Instant::now();
        nodes[2].addr.send(Crash).await.unwrap();
        let mut detected = Vec::new();
        for n in &mut nodes[..2] {
            let down = n.until(Duration::from_secs(3), |s| is_down(s, "c")).await;
            assert!(down, "{} did not see c down within 3 s: {:?}", n.name, n.seen);
            detected.push(t0.elapsed());
        }
        eprintln!("crash of c detected by a and b after {detected:?}");
        for n in &nodes[..2] {
            let s = n.addr.send(GetMembershipStats).await.unwrap();
            assert_eq!((s.joins, s.failures, s.leaves, s.rejected), (2, 1, 0, 0), "{}: {s:?}", n.name);
            n.addr.do_send(DumpState);
        }
        assert_eq!(nodes[0].addr.send(GetMembers).await.unwrap(), vec![("b".to_string(), nodes[1].at)]);
        assert_eq!(nodes[1].addr.send(GetMembers).await.unwrap(), vec![("a".to_string(), nodes[0].at)]);
    }

    #[actix_rt::test]
    async fn membership_start_order_does_not_matter_and_leave_is_seen_at_once() {
        // a starts alone, seeded with b, which is not there yet.
        let (sa, sb, sc) = (bind(), bind(), bind());
        let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
        let mut a = start("a", sa, vec![ab], KEY);
        a.settle(Duration::from_millis(700)).await;
        assert!(a.seen.is_empty());
        // b comes up seeded with nobody: a's retries find it. c knows only b and learns a.
        let mut b = start("b", sb, vec![], KEY);
        let mut c = start("c", sc, vec![ab], KEY);
        converge(&mut [&mut a, &mut b, &mut c], Duration::from_secs(5)).await;
        let _ = aa;

        let t0 = Instant::now();
        b.addr.send(Leave).await.unwrap();
        for n in [&mut a, &mut c] {
            assert!(
                n.until(Duration::from_millis(500), |s| is_down(s, "b")).await,
                "{} did not see b leave: {:?}",
                n.name,
                n.seen
            );
            let s = n.addr.send(GetMembershipStats).await.unwrap();
            assert_eq!((s.leaves, s.failures), (1, 0), "{}: {s:?}", n.name);
        }
        eprintln!("leave of b seen by a and c after {:?}", t0.elapsed());
        assert_eq!(up(&a.seen), names(&["c"]));
        assert_eq!(up(&c.seen), names(&["a"]));
    }

    #[actix_rt::test]
    async fn membership_wrong_key_is_never_admitted() {
        let mut nodes = cluster(&["a", "b"]);
        let seeds: Vec<SocketAddr> = nodes.iter().map(|n| n.at).collect();
        let mut x = start("x", bind(), seeds, b"not the cluster key");
        {
            let [a, b] = &mut nodes[..] else { unreachable!() };
            converge(&mut [a, b], Duration::from_secs(5)).await;
        }
        // x keeps announcing (every 300 ms here); give it time to try a few times.
        tokio::time::sleep(Duration::from_secs(1)).await;

        // A forged application message, sealed with the wrong key, sent straight at a, and
        // plain garbage.
        let raw = bind();
        let forged =
            cluster::encode(&Envelope::App { from: "b".into(), msg: groups(666) }, b"not the cluster key").unwrap();
        raw.send_to(&forged, nodes[0].at).unwrap();
        raw.send_to(b"garbage", nodes[0].at).unwrap();
        // With the key but claiming a node that is not a member: dropped too.
        let stranger = cluster::encode(&Envelope::App { from: "tool".into(), msg: groups(8) }, KEY).unwrap();
        raw.send_to(&stranger, nodes[0].at).unwrap();
        // A genuine one, from a member's address (all nodes share 127.0.0.1 here), is
        // delivered: the path works, so the silence above means rejection.
        let genuine = cluster::encode(&Envelope::App { from: "b".into(), msg: groups(7) }, KEY).unwrap();
        raw.send_to(&genuine, nodes[0].at).unwrap();
        assert!(nodes[0].until(Duration::from_secs(2), |s| got(s, "b", &groups(7))).await);
        assert!(!nodes[0].messages().iter().any(|(_, m)| m == &groups(8)), "a non-member's message was delivered");

        for n in &mut nodes {
            n.settle(Duration::from_millis(200)).await;
            let others: Vec<String> = up(&n.seen).into_iter().collect();
            assert_eq!(others.len(), 1, "{}: {:?}", n.name, n.seen);
            assert!(!n.seen.iter().any(|e| matches!(e, ClusterEvent::Up { node, .. } if node == "x")));
            assert!(!n.messages().iter().any(|(_, m)| m == &groups(666)));
            assert_eq!(n.addr.send(GetMembers).await.unwrap().len(), 1);
            let s = n.addr.send(GetMembershipStats).await.unwrap();
            assert!(s.rejected >= 2, "{}: {s:?}", n.name);
            assert_eq!(s.joins, 1);
        }
        let s = nodes[0].addr.send(GetMembershipStats).await.unwrap();
        assert!(s.rejected >= 4, "{s:?}");
        eprintln!("a rejected {} datagrams", s.rejected);
        // x never admitted anyone either, and has no one to talk to.
        x.settle(Duration::from_millis(100)).await;
        assert!(x.seen.is_empty(), "{:?}", x.seen);
        assert!(x.addr.send(GetMembers).await.unwrap().is_empty());
        assert_eq!(x.addr.send(Broadcast { msg: groups(1) }).await.unwrap(), 0);
    }

    #[test]
    fn config_is_validated() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let sys = actix::System::new();
        sys.block_on(async move {
            let sink = Sink(tx).start().recipient();
            let base = MembershipConfig::new("n", "127.0.0.1:0".parse().unwrap(), KEY);
            let mut c = base.clone();
            c.key.clear();
            assert!(matches!(Membership::with_socket(c, bind(), sink.clone()), Err(MembershipError::Config(_))));
            let mut c = base.clone();
            c.probe_rtt = c.probe_period;
            assert!(matches!(Membership::with_socket(c, bind(), sink.clone()), Err(MembershipError::Config(_))));
            let mut c = base.clone();
            c.advertise = "0.0.0.0:0".parse().unwrap();
            assert!(matches!(Membership::with_socket(c, bind(), sink.clone()), Err(MembershipError::Config(_))));
            let m = Membership::new(base, sink).unwrap();
            assert_ne!(m.local_addr().port(), 0);
            assert_eq!(m.advertise(), m.local_addr());
        });
    }

    #[test]
    fn swim_codec_round_trips_and_bounds() {
        use foca::Codec;
        let id = NodeIdentity { node: "a".into(), addr: "127.0.0.1:7000".parse().unwrap(), bump: 42 };
        let header = Header { src: id.clone(), src_incarnation: 3, dst: id.clone(), message: foca::Message::Ping(9) };
        let mut buf = Vec::new();
        BincodeCodec.encode_header(&header, &mut buf).unwrap();
        let member = Member::new(id.clone(), 5, State::Suspect);
        BincodeCodec.encode_member(&member, &mut buf).unwrap();
        let mut rd = &buf[..];
        assert_eq!(Codec::<NodeIdentity>::decode_header(&mut BincodeCodec, &mut rd).unwrap(), header);
        assert_eq!(Codec::<NodeIdentity>::decode_member(&mut BincodeCodec, &mut rd).unwrap(), member);
        assert!(rd.is_empty());
        // A full buffer is an error, not a panic.
        let mut small = [0u8; 4];
        assert!(BincodeCodec.encode_header(&header, &mut small[..]).is_err());
        // Truncated input is an error.
        let mut cut = &buf[..3];
        assert!(Codec::<NodeIdentity>::decode_header(&mut BincodeCodec, &mut cut).is_err());
    }
}
