//! coordinator: the node's table of active multicast groups.
//!
//! Every multicast request goes through here, so "is this file already being multicast?"
//! and "start a group" happen in one step of one actor: two requests for the same file can
//! never start two groups. A group is keyed by the file's identity (path, size, mtime and
//! content hash: a file changed on disk is a different key and never mixes into a running
//! group) plus block size and mode. The coordinator owns the pool of group addresses, so two
//! concurrent groups never share one. The cluster issue feeds the same table from peers.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use tftpcast_proto::multicast::GroupConfig;
use tftpcast_proto::cluster::StreamKey;
use tracing::{info, info_span, warn};

use crate::group::{EndGroup, GroupSession, GroupSpec, Join};
use crate::pacing::Pacing;
use crate::state::DumpState;

/// Identity of a stream: same key, same bytes in the same blocks, on every node (content
/// hash, not modification time).
pub type GroupKey = StreamKey;

/// Where a group is looked up: the stream and the address clients sent their requests to
/// (RFC 2090 clients accept the group's packets only from that address).
type Lookup = (GroupKey, IpAddr);

/// The pool slot a stream prefers: a hash of its identity, so every node that starts the same
/// stream picks the same group address and transfer port, and two nodes that start it at the
/// same moment create the same group (see the cluster issue).
fn preferred_slot(key: &GroupKey, slots: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = key.sha256.iter().copied().chain(key.size.to_be_bytes()).chain(key.blksize.to_be_bytes()).chain([key.netascii as u8]);
    for b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % slots.max(1) as u64) as u32
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
    pub lease_every: Duration,
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
}

#[derive(Debug, Clone, Copy)]
pub struct Joined {
    pub group: SocketAddrV4,
    pub tid: SocketAddr,
    pub new_group: bool,
}

/// A group has no member left. `joins` is how many joins it had seen, so a join already on
/// its way keeps it alive.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GroupIdle {
    pub id: u64,
    pub joins: u64,
}

/// Periodic progress of a group, for the table and the state dump.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GroupProgress {
    pub id: u64,
    pub block: u64,
    pub members: usize,
}

struct Entry {
    key: GroupKey,
    local: IpAddr,
    session: Addr<GroupSession>,
    group: SocketAddrV4,
    tid: SocketAddr,
    joins: u64,
    started: Instant,
    block: u64,
    members: usize,
}

pub struct Coordinator {
    policy: MulticastPolicy,
    pacing: Addr<Pacing>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    next_id: u64,
    groups: HashMap<u64, Entry>,
    by_key: HashMap<Lookup, u64>,
    in_use: HashSet<Ipv4Addr>,
    started_total: u64,
    fallbacks: u64,
}

impl Coordinator {
    pub fn new(policy: MulticastPolicy, pacing: Addr<Pacing>, arbiters: Vec<ArbiterHandle>) -> Self {
        Coordinator {
            policy,
            pacing,
            arbiters,
            next_arbiter: 0,
            next_id: 1,
            groups: HashMap::new(),
            by_key: HashMap::new(),
            in_use: HashSet::new(),
            started_total: 0,
            fallbacks: 0,
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

    /// The group address and slot for `key`: its preferred slot, or the next free one.
    fn allocate(&self, key: &GroupKey) -> Option<(Ipv4Addr, u32)> {
        let (first, count) = self.slots();
        let base = u32::from(self.policy.pool_base);
        let start = preferred_slot(key, count);
        (0..count).map(|i| first + (start + i) % count).map(|slot| (Ipv4Addr::from(base + slot), slot)).find(|(a, _)| !self.in_use.contains(a))
    }

    fn start_group(&mut self, m: &MulticastRequest, ctx: &mut Context<Self>) -> Result<u64, String> {
        let IpAddr::V4(local) = m.local else { return Err("multicast needs IPv4".into()) };
        let (addr, slot) = self.allocate(&m.key).ok_or("multicast address pool exhausted")?;
        let port = self.policy.tid_port_base.checked_add(slot as u16).ok_or("group port out of range")?;
        let socket = crate::net::bind_group(local, Some((port, port)), self.policy.interface, self.policy.ttl)
            .map_err(|e| format!("cannot open group socket on port {port}: {e}"))?;
        let tid = socket.local_addr().map_err(|e| e.to_string())?;
        let group = SocketAddrV4::new(addr, self.policy.port);
        let id = self.next_id;
        self.next_id += 1;
        let now = Instant::now();
        let cfg = GroupConfig {
            group,
            blksize: m.key.blksize,
            window: self.policy.window,
            timeout: self.policy.timeout,
            min_timeout: self.policy.min_timeout,
            max_timeout: self.policy.max_timeout,
            master_retries: self.policy.master_retries,
            start_at: now + self.policy.start_delay,
            start_min_clients: self.policy.start_min_clients,
        };
        let span = info_span!(
            "group",
            group = %group,
            file = %m.key.path,
            tid = tid.port(),
            mode = if m.key.netascii { "netascii" } else { "octet" },
            blksize = m.key.blksize,
        );
        span.in_scope(|| {
            info!(
                size = m.data.len(),
                start_delay_ms = self.policy.start_delay.as_millis() as u64,
                start_min_clients = self.policy.start_min_clients,
                window = self.policy.window,
                "group created: waiting for the start delay"
            )
        });
        let spec = GroupSpec {
            id,
            socket,
            cfg,
            data: m.data.clone(),
            span,
            pacing: self.pacing.clone(),
            coordinator: ctx.address(),
            lease_every: self.policy.lease_every,
        };
        let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
        self.next_arbiter = self.next_arbiter.wrapping_add(1);
        let session = GroupSession::start_in_arbiter(arbiter, move |_| GroupSession::new(spec));
        self.in_use.insert(addr);
        self.groups.insert(id, Entry { key: m.key.clone(), local: m.local, session, group, tid, joins: 0, started: now, block: 0, members: 0 });
        self.by_key.insert((m.key.clone(), m.local), id);
        self.started_total += 1;
        Ok(id)
    }

    fn end(&mut self, id: u64) {
        if let Some(e) = self.groups.remove(&id) {
            self.by_key.remove(&(e.key, e.local));
            self.in_use.remove(e.group.ip());
            e.session.do_send(EndGroup);
        }
    }
}

impl Actor for Coordinator {
    type Context = Context<Self>;
}

impl Handler<MulticastRequest> for Coordinator {
    type Result = Result<Joined, String>;
    fn handle(&mut self, m: MulticastRequest, ctx: &mut Context<Self>) -> Self::Result {
        let existing = self.by_key.get(&(m.key.clone(), m.local)).copied();
        let (id, new_group) = match existing {
            Some(id) => (id, false),
            None => match self.start_group(&m, ctx) {
                Ok(id) => (id, true),
                Err(e) => {
                    self.fallbacks += 1;
                    warn!(client = %m.client, file = %m.key.path, reason = %e, "multicast not possible: serving by unicast");
                    return Err(e);
                }
            },
        };
        let e = self.groups.get_mut(&id).expect("group in table");
        e.joins += 1;
        e.session.do_send(Join { client: m.client, options: m.options });
        Ok(Joined { group: e.group, tid: e.tid, new_group })
    }
}

impl Handler<GroupIdle> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: GroupIdle, _: &mut Context<Self>) {
        if matches!(self.groups.get(&m.id), Some(e) if e.joins == m.joins) {
            self.end(m.id);
        }
    }
}

impl Handler<GroupProgress> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: GroupProgress, _: &mut Context<Self>) {
        if let Some(e) = self.groups.get_mut(&m.id) {
            e.block = m.block;
            e.members = m.members;
        }
    }
}

impl Handler<DumpState> for Coordinator {
    type Result = ();
    fn handle(&mut self, m: DumpState, _: &mut Context<Self>) {
        let groups: Vec<String> = self
            .groups
            .values()
            .map(|e| format!("{}:{}@{} block={} members={} age_s={}", e.key.path, e.group, e.tid, e.block, e.members, e.started.elapsed().as_secs()))
            .collect();
        info!(
            target: "state",
            actor = "coordinator",
            members = 1,
            groups_active = self.groups.len(),
            groups_started = self.started_total,
            fallbacks = self.fallbacks,
            addresses_in_use = self.in_use.len(),
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
}
