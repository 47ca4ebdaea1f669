//! Deterministic tests of the group table: several tables wired by a simulated network that
//! delivers each node's messages when the test says so.

use super::*;

const SETTLE: Duration = Duration::from_millis(200);

fn cfg(node: &str) -> TableConfig {
    TableConfig {
        node_id: node.into(),
        pool_base: Ipv4Addr::new(239, 255, 68, 0),
        pool_size: 256,
        port: 1758,
        tid_port_base: 1760,
        settle: SETTLE,
        first_seq: 0,
    }
}

fn key(b: u8) -> StreamKey {
    StreamKey { sha256: [b; 32], size: 1000, blksize: 1428, netascii: false, path: format!("f{b}") }
}

/// Two keys of different streams whose preferred slots collide.
fn colliding_keys() -> (StreamKey, StreamKey) {
    let k0 = key(0);
    let s0 = preferred_slot(&k0, 254);
    let other = (1..=255).map(key).find(|k| preferred_slot(k, 254) == s0).expect("a colliding key among 255");
    (k0, other)
}

fn vip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100))
}

fn client(n: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, n)), 40000)
}

fn request(k: &StreamKey, c: SocketAddr) -> Request {
    Request { key: k.clone(), client: c, local: vip(), options: vec![("blksize".into(), "1428".into())], join_only: false }
}

/// Nodes by id, the messages in flight, and every other action each node took.
struct Cluster {
    t0: Instant,
    nodes: BTreeMap<NodeId, Table>,
    in_flight: Vec<(NodeId, Option<NodeId>, Message)>,
    done: Vec<(NodeId, Action)>,
}

impl Cluster {
    /// Nodes that all know each other are up.
    fn new(ids: &[&str]) -> Cluster {
        let mut nodes = BTreeMap::new();
        for id in ids {
            let mut t = Table::new(cfg(id));
            for other in ids.iter().filter(|o| *o != id) {
                t.handle_node_up(other.to_string());
            }
            nodes.insert(id.to_string(), t);
        }
        let mut c = Cluster { t0: Instant::now(), nodes, in_flight: Vec::new(), done: Vec::new() };
        c.collect();
        c.deliver_all();
        c.done.clear();
        c
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn node(&mut self, id: &str) -> &mut Table {
        self.nodes.get_mut(id).unwrap()
    }

    /// Moves every node's actions out: messages in flight, the rest done.
    fn collect(&mut self) {
        for (id, t) in self.nodes.iter_mut() {
            while let Some(a) = t.poll_action() {
                match a {
                    Action::Send { to, msg } => self.in_flight.push((id.clone(), to, msg)),
                    other => self.done.push((id.clone(), other)),
                }
            }
        }
    }

    fn request(&mut self, node: &str, ms: u64, k: &StreamKey, c: SocketAddr) -> Placed {
        let now = self.at(ms);
        let placed = self.node(node).handle_request(now, request(k, c)).unwrap();
        self.collect();
        placed
    }

    /// Delivers what is in flight (and what that causes) until the network is quiet.
    fn deliver_all(&mut self) {
        while !self.in_flight.is_empty() {
            let now = self.t0;
            for (from, to, msg) in std::mem::take(&mut self.in_flight) {
                let targets: Vec<NodeId> = self.nodes.keys().filter(|n| **n != from && to.as_ref().is_none_or(|t| t == *n)).cloned().collect();
                for n in targets {
                    self.nodes.get_mut(&n).unwrap().handle_message(now, &from, msg.clone());
                }
            }
            self.collect();
        }
    }

    fn tick(&mut self, ms: u64) {
        let now = self.at(ms);
        for t in self.nodes.values_mut() {
            t.handle_timeout(now);
        }
        self.collect();
    }

    fn joins(&self, node: &str) -> Vec<(GroupId, SocketAddr)> {
        self.done.iter().filter(|(n, _)| n == node).filter_map(|(_, a)| match a {
            Action::Join { id, client, .. } => Some((*id, *client)),
            _ => None,
        }).collect()
    }

    /// The groups `node` owns (claims included): (stream, group address).
    fn owned(&self, node: &str) -> Vec<(StreamKey, SocketAddrV4, bool)> {
        self.nodes[node].groups().filter(|(_, e)| e.owner.is_none()).map(|(_, e)| (e.key.clone(), e.group, e.is_claim())).collect()
    }
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

#[test]
fn a_lone_node_answers_at_once() {
    let mut t = Table::new(cfg(""));
    let now = Instant::now();
    let p = t.handle_request(now, request(&key(1), client(1))).unwrap();
    assert!(p.new_group && p.owner.is_none());
    assert!(matches!(t.poll_action(), Some(Action::Spawn { relay_for: None, .. })));
    assert!(matches!(t.poll_action(), Some(Action::Join { client: c, .. }) if c == client(1)));
    assert_eq!(t.poll_action(), None, "no announcement outside a cluster");
    let again = t.handle_request(now, request(&key(1), client(2))).unwrap();
    assert_eq!((again.id, again.new_group), (p.id, false));
}

/// Issue 16 item 1: two nodes start different streams whose slots collide within the
/// announcement window. Exactly one keeps the slot (the smaller id, both being claims), the
/// other moves before answering any client, and no client is ever given a group whose
/// address another stream uses.
#[test]
fn different_streams_started_at_once_end_on_different_slots() {
    let (k1, k2) = colliding_keys();
    let mut c = Cluster::new(&["n1", "n2"]);
    let p1 = c.request("n1", 0, &k1, client(1));
    let p2 = c.request("n2", 10, &k2, client(2));
    assert_eq!(p1.group, p2.group, "the test needs the slots to collide");
    assert!(c.joins("n1").is_empty() && c.joins("n2").is_empty(), "nobody is answered while the slot is claimed");
    c.deliver_all();
    c.tick(SETTLE.as_millis() as u64 + 20);
    c.deliver_all();

    let (a, b) = (c.owned("n1"), c.owned("n2"));
    assert_eq!(a.len(), 1);
    assert_eq!(b.len(), 1);
    assert_eq!(a[0].1, p1.group, "n1 (smaller id) keeps the slot");
    assert_ne!(b[0].1, p1.group, "n2 moves to another slot");
    assert!(!a[0].2 && !b[0].2, "both claims settled");
    assert_eq!(c.nodes["n1"].stats().moves, 0);
    assert_eq!(c.nodes["n2"].stats().moves, 1);
    let moved = c.done.iter().find_map(|(n, a)| match a {
        Action::Move { from, to } if n == "n2" => Some((*from, *to)),
        _ => None,
    });
    assert_eq!(moved.map(|(from, _)| from), Some(p2.id), "n2's group moves: {:?}", c.done);
    assert_eq!(c.nodes["n2"].group(moved.unwrap().1).unwrap().group, b[0].1);
    // Each client is answered once, by its own stream's group.
    let j1 = c.joins("n1");
    let j2 = c.joins("n2");
    assert_eq!(j1.len(), 1);
    assert_eq!(j2.len(), 1);
    assert_eq!(c.nodes["n1"].group(j1[0].0).unwrap().key, k1);
    let g2 = c.nodes["n2"].group(j2[0].0).unwrap();
    assert_eq!((g2.key.clone(), g2.group), (k2.clone(), b[0].1));
    assert_eq!(g2.tid.port(), 1760 + (u32::from(*g2.group.ip()) - u32::from(Ipv4Addr::new(239, 255, 68, 0))) as u16);
    // Each node relays the other's group, at its own slot.
    for (node, peer_group) in [("n1", b[0].1), ("n2", a[0].1)] {
        let relays: Vec<SocketAddrV4> = c.nodes[node].groups().filter(|(_, e)| e.owner.is_some()).map(|(_, e)| e.group).collect();
        assert_eq!(relays, vec![peer_group], "{node} relays the peer's group");
    }
}

/// The same decision whatever the order the two claims are made and heard in.
#[test]
fn the_collision_is_decided_the_same_whatever_the_order() {
    let (k1, k2) = colliding_keys();
    let mut c = Cluster::new(&["n1", "n2"]);
    let first = c.request("n2", 0, &k2, client(2));
    c.request("n1", 30, &k1, client(1));
    c.deliver_all();
    c.tick(250);
    c.deliver_all();
    assert_eq!(c.owned("n1")[0].1, first.group, "n1 keeps the slot although n2 claimed first");
    assert_ne!(c.owned("n2")[0].1, first.group);
}

/// A group that answered members keeps its slot against a claim of another stream, even
/// from a node with a smaller id (the claim's node missed the group's announcement).
#[test]
fn a_group_with_answered_members_keeps_its_slot_against_a_claim() {
    let (k1, k2) = colliding_keys();
    let mut c = Cluster::new(&["n1", "n2"]);
    let live = c.request("n2", 0, &k2, client(2));
    c.in_flight.clear(); // n2's claim is lost
    c.tick(250); // n2 answers its client
    c.in_flight.clear(); // and that announcement is lost too
    assert_eq!(c.joins("n2").len(), 1);
    c.request("n1", 260, &k1, client(1));
    c.deliver_all();
    c.tick(500);
    c.deliver_all();
    assert_eq!(c.owned("n2")[0].1, live.group, "the group that answered members keeps its slot");
    assert_ne!(c.owned("n1")[0].1, live.group, "the claim moves");
    assert_eq!(c.joins("n2").len(), 1, "n2's member is not answered again");
}

/// A group that answered members and loses its slot (both sides answered: announcements
/// were lost) moves, and its members get a new OACK from the new slot.
#[test]
fn a_moved_group_answers_its_members_again() {
    let (k1, k2) = colliding_keys();
    let mut c = Cluster::new(&["n1", "n2"]);
    c.request("n1", 0, &k1, client(1));
    c.request("n2", 0, &k2, client(2));
    c.in_flight.clear();
    c.tick(250);
    c.in_flight.clear();
    let first = c.joins("n2");
    assert_eq!(first.len(), 1);
    // n2's session reports its member.
    let member = MemberInfo { client: client(2), master: true, options: vec![] };
    c.node("n2").handle_progress(first[0].0, 1, false, vec![member]);
    c.tick(300);
    c.deliver_all();
    c.tick(600);
    c.deliver_all();
    let moved = c.owned("n2");
    assert_ne!(moved[0].1, c.owned("n1")[0].1);
    let again = c.joins("n2");
    assert_eq!(again.len(), 2, "n2's member is answered again from the new slot: {again:?}");
    assert_eq!(c.nodes["n2"].group(again[1].0).unwrap().group, moved[0].1);
    assert_eq!(c.nodes["n2"].route_member(client(2)).map(|(id, ..)| id), Some(again[1].0));
}

/// Both nodes start the same stream at once: they meet on one slot, the smaller id keeps it,
/// the other hands its session over and passes the clients it had not answered yet.
#[test]
fn start_race_of_one_stream_has_one_winner() {
    let mut c = Cluster::new(&["n1", "n2"]);
    let p1 = c.request("n1", 0, &key(7), client(1));
    let p2 = c.request("n2", 5, &key(7), client(2));
    assert_eq!((p1.group, p1.tid), (p2.group, p2.tid), "the same stream meets on one slot");
    c.deliver_all();
    c.tick(250);
    c.deliver_all();
    assert!(c.done.contains(&("n2".into(), Action::HandOver { id: p2.id, winner: "n1".into() })));
    assert!(!c.done.iter().any(|(n, a)| n == "n1" && matches!(a, Action::HandOver { .. })), "the winner keeps it");
    let mut answered: Vec<SocketAddr> = c.joins("n1").into_iter().map(|(_, cl)| cl).collect();
    answered.sort();
    assert_eq!(answered, vec![client(1), client(2)], "the winner answers both clients");
    assert!(c.joins("n2").is_empty(), "the loser answers nobody");
    assert_eq!(c.nodes["n2"].route_tid(p2.tid).map(|(_, o)| o.cloned()), Some(Some("n1".to_string())));
}

/// The owner dies: the alive node with the smallest id takes over with the announced
/// members; the other relays to it.
#[test]
fn a_dead_owners_group_goes_to_the_smallest_alive_id() {
    let mut c = Cluster::new(&["n1", "n2", "n3"]);
    let p = c.request("n1", 0, &key(3), client(1));
    c.tick(250);
    let member = MemberInfo { client: client(1), master: true, options: vec![] };
    c.node("n1").handle_progress(p.id, 42, true, vec![member.clone()]);
    c.tick(260);
    c.deliver_all();
    c.nodes.remove("n1");
    c.done.clear();
    // n3 hears of the death first: the decision does not depend on the order.
    c.node("n3").handle_node_down(&"n1".into());
    c.node("n2").handle_node_down(&"n1".into());
    c.collect();
    let takeovers: Vec<&(NodeId, Action)> = c.done.iter().filter(|(_, a)| matches!(a, Action::TakeOver { .. })).collect();
    assert_eq!(takeovers.len(), 1, "exactly one take-over: {:?}", c.done);
    let (node, Action::TakeOver { info, .. }) = takeovers[0] else { unreachable!() };
    assert_eq!(node, "n2");
    assert_eq!((info.block, info.members.clone(), info.tid), (42, vec![member], p.tid));
    assert_eq!(c.nodes["n3"].route_tid(p.tid).map(|(_, o)| o.cloned()), Some(Some("n2".to_string())));
    assert_eq!(c.nodes["n2"].route_tid(p.tid).map(|(_, o)| o.cloned()), Some(None));
    // n2 announces the group as its own; n3 keeps relaying to n2.
    c.tick(300);
    c.deliver_all();
    assert_eq!(c.nodes["n3"].route_tid(p.tid).map(|(_, o)| o.cloned()), Some(Some("n2".to_string())));
}

/// Tables are state: a repeated announcement changes nothing, a late one (older than the
/// last seen) does not bring back a group that ended.
#[test]
fn late_and_repeated_announcements_are_harmless() {
    let mut c = Cluster::new(&["n1", "n2"]);
    let p = c.request("n1", 0, &key(5), client(1));
    c.tick(250);
    let with_group = c.in_flight.clone();
    c.deliver_all();
    assert!(c.nodes["n2"].route_tid(p.tid).is_some(), "n2 relays the group");
    c.node("n1").handle_idle(p.id, 1);
    c.tick(300);
    let without = c.in_flight.clone();
    c.deliver_all();
    assert!(c.nodes["n2"].route_tid(p.tid).is_none(), "the relay ends with the group");
    c.done.clear();
    // Late, then repeated.
    c.in_flight = with_group;
    c.deliver_all();
    assert!(c.nodes["n2"].route_tid(p.tid).is_none(), "a late announcement is ignored");
    c.in_flight = without.clone();
    c.deliver_all();
    c.in_flight = without;
    c.deliver_all();
    assert!(c.done.is_empty(), "nothing to do: {:?}", c.done);
}

#[test]
fn a_join_only_request_never_starts_a_group() {
    let mut t = Table::new(cfg("n1"));
    let mut r = request(&key(1), client(1));
    r.join_only = true;
    assert_eq!(t.handle_request(Instant::now(), r), Err(NoGroup::NothingToJoin));
    assert_eq!(t.poll_action(), None);
}

#[test]
fn an_exhausted_pool_refuses() {
    let mut t = Table::new(TableConfig { pool_size: 1, ..cfg("") });
    let now = Instant::now();
    t.handle_request(now, request(&key(1), client(1))).unwrap();
    assert_eq!(t.handle_request(now, request(&key(2), client(2))), Err(NoGroup::PoolExhausted));
}
