//! admission: how many requests the node takes on, and what happens to the others.
//!
//! A request is admitted when the node and its client are under their session limits
//! (`limits.max_sessions`, `limits.max_sessions_per_client`), its client under its half-open
//! budget (`limits.max_half_open_per_client`) and both under the request rates
//! (`limits.max_requests_per_s`, `limits.max_requests_per_s_per_client`, token buckets of one
//! second's burst). Admission reserves a session slot with a [`Ticket`] while the file is
//! looked up; the slot goes back when the ticket is dropped (a refusal, a multicast join) or,
//! once committed to a session, when the listener releases it at the session's end.
//!
//! Half-open sessions (no answer from the client yet) cost little: a flood of requests that
//! are never acknowledged, from one address, must not starve a real client behind the same
//! address (a NAT: a whole lab). So an unanswered session holds a place in its client's
//! half-open budget only for [`HALF_OPEN_HOLD`] (a real client answers within a round trip;
//! the session itself keeps its usual retransmissions), and only answered sessions plus the
//! ones still in that budget count against `limits.max_sessions_per_client`. Every session
//! counts against `limits.max_sessions`.
//!
//! A request over a limit is not refused: it waits in a bounded FIFO queue and is started as
//! soon as a slot and a token free up (the client is still waiting for its answer); the
//! client's own retransmission of a queued request refreshes it and keeps its place. A
//! request whose client has been silent for longer than `limits.defer_max_ms` (its patience:
//! clients repeat their request every few seconds while they wait) is not started: its client
//! has given up. Such a request is forgotten when a new one needs its room in the queue or
//! after twice that time; a live request is never dropped while the queue has room. Requests
//! that do not fit are dropped silently: an error reply would let a spoofed flood turn the
//! server into an amplifier. Every decision is counted (metrics) and summarized in at most
//! one log line a second.
//!
//! Everything here runs on the system arbiter with the listeners; the state is behind a
//! mutex only because admitted requests travel to their listener in a message.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::warn;

use crate::metrics::m;
use crate::net::udp::Datagram;

/// How long an unanswered session holds a place in its client's half-open budget. A real
/// client answers the first DATA or OACK within a round trip; beyond that the session is
/// probably talking to a spoofed or vanished source, and new requests from the same address
/// must not wait for its retransmissions to run out.
pub const HALF_OPEN_HOLD: Duration = Duration::from_millis(250);

/// Clients whose request-rate buckets are remembered. Beyond it, buckets that have refilled
/// (idle clients: forgetting them loses nothing) are evicted first, then the least recent.
pub const SOURCE_TABLE_CAP: usize = 4096;

#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    pub max_sessions: usize,
    pub max_sessions_per_client: usize,
    /// Unanswered sessions from one client address admitted within [`HALF_OPEN_HOLD`].
    pub max_half_open_per_client: usize,
    /// Requests a second, node-wide; 0 is no limit.
    pub max_requests_per_s: u32,
    /// Requests a second from one client address; 0 is no limit.
    pub max_requests_per_s_per_client: u32,
    /// Requests that may wait for a slot; 0 drops at the limit.
    pub defer_queue: usize,
    /// How long after its last (re)transmission a queued request's client is still assumed
    /// to wait for it.
    pub defer_max: Duration,
}

/// Which limit held a request back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Sessions,
    ClientSessions,
    Rate,
    ClientRate,
    HalfOpen,
}

impl Limit {
    fn index(self) -> usize {
        self as usize
    }
}

/// A token bucket of request credits: `rate` a second, burst one second's worth.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(rate: u32, now: Instant) -> Bucket {
        Bucket { tokens: burst(rate), last: now }
    }

    fn refill(&mut self, rate: u32, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate as f64).min(burst(rate));
        self.last = now;
    }

    /// Whether the bucket would be full by `now` (its client has been idle).
    fn idle(&self, rate: u32, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate as f64 >= burst(rate)
    }
}

fn burst(rate: u32) -> f64 {
    (rate as f64).max(1.0)
}

/// Per-client buckets in a bounded map.
#[derive(Debug, Default)]
struct Sources {
    map: HashMap<IpAddr, Bucket>,
}

impl Sources {
    fn has_token(&mut self, ip: IpAddr, rate: u32, now: Instant) -> bool {
        match self.map.get_mut(&ip) {
            Some(b) => {
                b.refill(rate, now);
                b.tokens >= 1.0
            }
            None => true,
        }
    }

    fn take(&mut self, ip: IpAddr, rate: u32, now: Instant) {
        if !self.map.contains_key(&ip) && self.map.len() >= SOURCE_TABLE_CAP {
            self.map.retain(|_, b| !b.idle(rate, now));
            if self.map.len() >= SOURCE_TABLE_CAP {
                if let Some(oldest) = self.map.iter().min_by_key(|(_, b)| b.last).map(|(ip, _)| *ip) {
                    self.map.remove(&oldest);
                }
            }
        }
        let b = self.map.entry(ip).or_insert_with(|| Bucket::full(rate, now));
        b.tokens -= 1.0;
    }
}

/// Counts since the last summary line.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    deferred: u64,
    admitted_after_defer: u64,
    folded: u64,
    refreshed: u64,
    dropped_queue_full: u64,
    dropped_expired: u64,
    /// Defers and drops by the limit that held the request: sessions, client sessions,
    /// rate, client rate, half-open budget.
    by_limit: [u64; 5],
    longest_wait: Duration,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.deferred += o.deferred;
        self.admitted_after_defer += o.admitted_after_defer;
        self.folded += o.folded;
        self.refreshed += o.refreshed;
        self.dropped_queue_full += o.dropped_queue_full;
        self.dropped_expired += o.dropped_expired;
        for (a, b) in self.by_limit.iter_mut().zip(o.by_limit) {
            *a += b;
        }
        self.longest_wait = self.longest_wait.max(o.longest_wait);
    }

    fn bites(&self) -> bool {
        self.deferred + self.admitted_after_defer + self.folded + self.dropped_queue_full + self.dropped_expired > 0
    }
}

struct Entry {
    d: Datagram,
    to: Recipient<Admitted>,
    since: Instant,
    /// The last (re)transmission of the request.
    seen: Instant,
}

/// The sessions of one client address that count against its limits.
#[derive(Debug, Default)]
struct ClientLoad {
    /// Sessions whose client answered.
    answered: usize,
    /// Unanswered sessions still in the half-open budget: (slot, admitted at), oldest first.
    opening: VecDeque<(u64, Instant)>,
}

impl ClientLoad {
    /// Lets unanswered sessions older than [`HALF_OPEN_HOLD`] out of the budget.
    fn expire(&mut self, now: Instant) {
        while self.opening.front().is_some_and(|(_, at)| *at + HALF_OPEN_HOLD <= now) {
            self.opening.pop_front();
        }
    }

    fn forget(&mut self, slot: u64) {
        if let Some(i) = self.opening.iter().position(|(s, _)| *s == slot) {
            self.opening.remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.answered == 0 && self.opening.is_empty()
    }
}

/// A session slot in use: its client, and whether the client answered.
#[derive(Debug, Clone, Copy)]
struct Slot {
    ip: IpAddr,
    answered: bool,
}

pub struct Admission {
    cfg: AdmissionConfig,
    active: usize,
    per_client: HashMap<IpAddr, ClientLoad>,
    slots: HashMap<u64, Slot>,
    next_slot: u64,
    global: Bucket,
    sources: Sources,
    queue: VecDeque<Entry>,
    /// The senders in `queue`, so telling a retransmission from a new request costs no scan.
    queued_peers: HashSet<SocketAddr>,
    tally: Tally,
    /// Everything summarized so far (the state dump adds `tally`).
    totals: Tally,
    last_log: Option<Instant>,
}

pub type SharedAdmission = Arc<Mutex<Admission>>;

/// What to do with a new request.
pub enum Decision {
    /// Serve it; the ticket holds its session slot.
    Admit(Ticket),
    /// Over a session limit, but a multicast request: it may join a running group (which
    /// costs no session); if there is none it must come back through [`requeue`].
    Fold,
    /// Queued: an [`Admitted`] message brings it back.
    Deferred,
    /// Not served, no reply.
    Dropped,
}

/// A reserved session slot. Dropping it gives the slot back; [`Ticket::commit`] hands it to
/// a session, whose end the listener reports with [`release`].
pub struct Ticket {
    adm: SharedAdmission,
    slot: u64,
    live: bool,
}

impl Ticket {
    /// Hands the slot to a session; the listener reports with [`answered`] and [`release`].
    pub fn commit(mut self) -> u64 {
        self.live = false;
        self.slot
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.live {
            release(&self.adm, self.slot);
        }
    }
}

/// A deferred request whose turn came, sent to the listener that received it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Admitted {
    pub d: Datagram,
    pub ticket: Ticket,
    pub waited: Duration,
}

fn key(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn lock(s: &SharedAdmission) -> MutexGuard<'_, Admission> {
    // A panic elsewhere while holding the lock leaves counts that are still usable.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl Admission {
    pub fn new(cfg: AdmissionConfig) -> Admission {
        let now = Instant::now();
        Admission {
            global: Bucket::full(cfg.max_requests_per_s, now),
            cfg,
            active: 0,
            per_client: HashMap::new(),
            slots: HashMap::new(),
            next_slot: 1,
            sources: Sources::default(),
            queue: VecDeque::new(),
            queued_peers: HashSet::new(),
            tally: Tally::default(),
            totals: Tally::default(),
            last_log: None,
        }
    }

    pub fn shared(cfg: AdmissionConfig) -> SharedAdmission {
        Arc::new(Mutex::new(Admission::new(cfg)))
    }

    /// The first limit that holds a request from `ip` back now, if any. Consumes nothing.
    fn blocked(&mut self, ip: IpAddr, now: Instant) -> Option<Limit> {
        if self.active >= self.cfg.max_sessions {
            return Some(Limit::Sessions);
        }
        if let Some(c) = self.per_client.get_mut(&ip) {
            c.expire(now);
            if c.opening.len() >= self.cfg.max_half_open_per_client {
                return Some(Limit::HalfOpen);
            }
            if c.answered + c.opening.len() >= self.cfg.max_sessions_per_client {
                return Some(Limit::ClientSessions);
            }
            if c.is_empty() {
                self.per_client.remove(&ip);
            }
        }
        let rate = self.cfg.max_requests_per_s;
        if rate > 0 {
            self.global.refill(rate, now);
            if self.global.tokens < 1.0 {
                return Some(Limit::Rate);
            }
        }
        let rate = self.cfg.max_requests_per_s_per_client;
        if rate > 0 && !self.sources.has_token(ip, rate, now) {
            return Some(Limit::ClientRate);
        }
        None
    }

    /// Takes a slot for a request from `ip`; returns the slot's number.
    fn take(&mut self, ip: IpAddr, now: Instant) -> u64 {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.active += 1;
        self.slots.insert(slot, Slot { ip, answered: false });
        self.per_client.entry(ip).or_default().opening.push_back((slot, now));
        if self.cfg.max_requests_per_s > 0 {
            self.global.tokens -= 1.0;
        }
        if self.cfg.max_requests_per_s_per_client > 0 {
            self.sources.take(ip, self.cfg.max_requests_per_s_per_client, now);
        }
        m().admission("admitted");
        slot
    }

    /// Frees a slot (its session ended, or its ticket was dropped).
    fn free(&mut self, slot: u64) {
        let Some(s) = self.slots.remove(&slot) else { return };
        self.active = self.active.saturating_sub(1);
        if let Some(c) = self.per_client.get_mut(&s.ip) {
            if s.answered {
                c.answered = c.answered.saturating_sub(1);
            } else {
                c.forget(slot);
            }
            if c.is_empty() {
                self.per_client.remove(&s.ip);
            }
        }
    }

    /// The client of `slot` answered: its session leaves the half-open budget.
    fn mark_answered(&mut self, slot: u64) {
        let Some(s) = self.slots.get_mut(&slot) else { return };
        if s.answered {
            return;
        }
        s.answered = true;
        let c = self.per_client.entry(s.ip).or_default();
        c.forget(slot);
        c.answered += 1;
    }

    /// Makes room in a full queue by forgetting the request whose client has been silent
    /// the longest, if that client has given up. Returns whether there is room now.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.queue.len() < self.cfg.defer_queue {
            return true;
        }
        let patience = self.cfg.defer_max;
        let stalest = self.queue.iter().enumerate().filter(|(_, e)| e.seen + patience <= now).min_by_key(|(_, e)| e.seen).map(|(i, _)| i);
        let Some(i) = stalest else { return false };
        let e = self.queue.remove(i).expect("index in queue");
        self.queued_peers.remove(&e.d.meta.from);
        self.tally.dropped_expired += 1;
        m().admission("dropped_expired");
        self.queue.len() < self.cfg.defer_queue
    }

    /// Forgets requests whose clients have been silent for twice their patience.
    fn forget_abandoned(&mut self, now: Instant) {
        let forget_after = self.cfg.defer_max * 2;
        let before = self.queue.len();
        let Admission { queue, queued_peers, .. } = self;
        queue.retain(|e| {
            let keep = e.seen + forget_after > now;
            if !keep {
                queued_peers.remove(&e.d.meta.from);
            }
            keep
        });
        let expired = (before - self.queue.len()) as u64;
        self.tally.dropped_expired += expired;
        for _ in 0..expired {
            m().admission("dropped_expired");
        }
    }

    fn defer(&mut self, d: &Datagram, to: &Recipient<Admitted>, limit: Limit, now: Instant) -> Decision {
        self.tally.by_limit[limit.index()] += 1;
        if !self.make_room(now) {
            self.tally.dropped_queue_full += 1;
            m().admission("dropped_queue_full");
            return Decision::Dropped;
        }
        // A copy: the received datagram shares a large receive buffer.
        let d = Datagram { meta: d.meta, data: bytes::Bytes::copy_from_slice(&d.data) };
        self.queued_peers.insert(d.meta.from);
        self.queue.push_back(Entry { d, to: to.clone(), since: now, seen: now });
        self.tally.deferred += 1;
        m().admission("deferred");
        m().admission_queue.set(self.queue.len() as i64);
        Decision::Deferred
    }

    /// One summary line a second at most, and only when a limit bit.
    fn maybe_log(&mut self, now: Instant) {
        let t = self.tally;
        if !t.bites() || self.last_log.is_some_and(|l| now.saturating_duration_since(l) < Duration::from_secs(1)) {
            return;
        }
        warn!(
            deferred = t.deferred,
            admitted_after_defer = t.admitted_after_defer,
            folded_into_groups = t.folded,
            refreshed = t.refreshed,
            dropped_queue_full = t.dropped_queue_full,
            dropped_expired = t.dropped_expired,
            by_sessions = t.by_limit[0],
            by_client_sessions = t.by_limit[1],
            by_rate = t.by_limit[2],
            by_client_rate = t.by_limit[3],
            by_half_open = t.by_limit[4],
            longest_wait_ms = t.longest_wait.as_millis() as u64,
            queued = self.queue.len(),
            active = self.active,
            "admission: requests deferred at a session limit or rate limit"
        );
        self.totals.add(&t);
        self.tally = Tally::default();
        self.last_log = Some(now);
    }
}

/// Decides on a new request (not a retransmission of a queued one: see [`refresh`]).
/// `foldable`: a multicast request, which may join a running group at the session limit.
pub fn admit(shared: &SharedAdmission, d: &Datagram, to: &Recipient<Admitted>, foldable: bool) -> Decision {
    // Waiting requests go first.
    pump(shared);
    let now = Instant::now();
    let ip = key(d.meta.from.ip());
    let mut a = lock(shared);
    let decision = match a.blocked(ip, now) {
        None => {
            let slot = a.take(ip, now);
            Decision::Admit(Ticket { adm: shared.clone(), slot, live: true })
        }
        Some(Limit::Sessions | Limit::ClientSessions | Limit::HalfOpen) if foldable => {
            a.tally.folded += 1;
            m().admission("folded");
            Decision::Fold
        }
        Some(limit) => a.defer(d, to, limit, now),
    };
    a.maybe_log(now);
    decision
}

/// A request that was let through by [`Decision::Fold`] but found no group to join: it
/// queues (or is admitted at once) like any other.
pub fn requeue(shared: &SharedAdmission, d: Datagram, to: &Recipient<Admitted>) {
    if let Decision::Admit(ticket) = admit(shared, &d, to, false) {
        to.do_send(Admitted { d, ticket, waited: Duration::ZERO });
    }
}

/// A retransmission of a queued request shows its client still waits: it keeps its place.
/// Returns whether the request was queued.
pub fn refresh(shared: &SharedAdmission, d: &Datagram) -> bool {
    let mut a = lock(shared);
    if !a.queued_peers.contains(&d.meta.from) {
        return false;
    }
    let Some(e) = a.queue.iter_mut().find(|e| e.d.meta.from == d.meta.from) else { return false };
    e.seen = Instant::now();
    if e.d.data != d.data {
        // Same port, another request: the newest one is what the client waits for.
        e.d = Datagram { meta: d.meta, data: bytes::Bytes::copy_from_slice(&d.data) };
    }
    a.tally.refreshed += 1;
    m().admission("refreshed");
    true
}

/// Starts the waiting requests that fit now, in arrival order, skipping those whose client
/// has given up; forgets the abandoned ones. Called on a short interval (token refill, the
/// half-open budget) and whenever a slot frees.
pub fn pump(shared: &SharedAdmission) {
    let mut out = Vec::new();
    {
        let mut a = lock(shared);
        let now = Instant::now();
        if a.queue.is_empty() {
            a.maybe_log(now);
            return;
        }
        a.forget_abandoned(now);
        let patience = a.cfg.defer_max;
        let mut i = 0;
        while i < a.queue.len() {
            if a.queue[i].seen + patience <= now {
                i += 1; // its client stopped asking: no session for it
                continue;
            }
            let ip = key(a.queue[i].d.meta.from.ip());
            match a.blocked(ip, now) {
                None => {
                    let slot = a.take(ip, now);
                    let e = a.queue.remove(i).expect("index in queue");
                    a.queued_peers.remove(&e.d.meta.from);
                    let waited = now.saturating_duration_since(e.since);
                    a.tally.admitted_after_defer += 1;
                    a.tally.longest_wait = a.tally.longest_wait.max(waited);
                    m().admission("admitted_after_defer");
                    out.push((e, slot, waited));
                }
                // Node-wide limits hold everyone back: stop looking.
                Some(Limit::Sessions | Limit::Rate) => break,
                Some(_) => i += 1,
            }
        }
        m().admission_queue.set(a.queue.len() as i64);
        a.maybe_log(now);
    }
    // Sent with the lock released: a message that cannot be delivered drops its ticket,
    // which locks to give the slot back.
    for (e, slot, waited) in out {
        e.to.do_send(Admitted { d: e.d, ticket: Ticket { adm: shared.clone(), slot, live: true }, waited });
    }
}

/// The client of a committed session answered (acknowledged its first packet): the session
/// leaves its client's half-open budget, which may let a waiting request in.
pub fn answered(shared: &SharedAdmission, slot: u64) {
    lock(shared).mark_answered(slot);
    pump(shared);
}

/// A committed session ended: its slot is free for the next request.
pub fn release(shared: &SharedAdmission, slot: u64) {
    lock(shared).free(slot);
    pump(shared);
}

/// Slots in use (sessions and requests being set up), for the load-dependent timer floor.
pub fn active(shared: &SharedAdmission) -> usize {
    lock(shared).active
}

/// Requests waiting.
pub fn queued(shared: &SharedAdmission) -> usize {
    lock(shared).queue.len()
}

/// Logs the admission state as part of the listener's `state` event fields.
pub fn log_state(shared: &SharedAdmission, addr: std::net::SocketAddr) {
    let a = lock(shared);
    let mut t = a.totals;
    t.add(&a.tally);
    tracing::info!(
        target: "state",
        actor = "admission",
        listener = %addr,
        active = a.active,
        clients = a.per_client.len(),
        queued = a.queue.len(),
        rate_sources = a.sources.map.len(),
        deferred = t.deferred,
        admitted_after_defer = t.admitted_after_defer,
        folded_into_groups = t.folded,
        refreshed = t.refreshed,
        dropped_queue_full = t.dropped_queue_full,
        dropped_expired = t.dropped_expired,
        by_sessions = t.by_limit[0],
        by_client_sessions = t.by_limit[1],
        by_rate = t.by_limit[2],
        by_client_rate = t.by_limit[3],
        by_half_open = t.by_limit[4],
        "state"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdmissionConfig {
        AdmissionConfig { max_sessions: 2, max_sessions_per_client: 2, max_half_open_per_client: 100, max_requests_per_s: 0, max_requests_per_s_per_client: 0, defer_queue: 3, defer_max: Duration::from_secs(2) }
    }

    #[test]
    fn half_open_sessions_hold_their_clients_budget_only_briefly() {
        let mut a = Admission::new(AdmissionConfig { max_sessions: 100, max_sessions_per_client: 3, max_half_open_per_client: 2, ..cfg() });
        let now = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let first = a.take(ip, now);
        let second = a.take(ip, now);
        assert_eq!(a.blocked(ip, now), Some(Limit::HalfOpen));
        assert_eq!(a.blocked(other, now), None, "another address has its own budget");
        // An answer frees the budget at once (and the session counts as the client's).
        a.mark_answered(first);
        assert_eq!(a.blocked(ip, now), None);
        a.take(ip, now);
        assert_eq!(a.blocked(ip, now), Some(Limit::HalfOpen));
        // Unanswered sessions leave the budget after the hold, and stop counting against
        // the per-client limit (they still count node-wide).
        let later = now + HALF_OPEN_HOLD;
        assert_eq!(a.blocked(ip, later), None);
        a.take(ip, later);
        assert_eq!(a.blocked(ip, later), None, "1 answered + 1 half-open of 3; the stale ones do not count");
        // A late answer counts again.
        a.mark_answered(second);
        assert_eq!(a.blocked(ip, later), Some(Limit::ClientSessions), "2 answered + 1 half-open of 3");
        assert_eq!(a.active, 4);
        a.free(first);
        assert_eq!(a.blocked(ip, later), None);
        assert_eq!(a.active, 3);
    }

    #[test]
    fn per_client_sessions_are_counted_for_every_address() {
        // However many addresses there are (more than the rate table holds), each one's
        // sessions count: the per-client accounting never stops.
        let n = SOURCE_TABLE_CAP as u32 + 1000;
        let mut a = Admission::new(AdmissionConfig { max_sessions: usize::MAX, max_sessions_per_client: 1, max_half_open_per_client: 1, max_requests_per_s_per_client: 5, ..cfg() });
        let now = Instant::now();
        let ips: Vec<IpAddr> = (0..n).map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))).collect();
        let slots: Vec<u64> = ips.iter().map(|ip| a.take(*ip, now)).collect();
        for (ip, slot) in ips.iter().zip(&slots) {
            a.mark_answered(*slot);
            assert_eq!(a.blocked(*ip, now), Some(Limit::ClientSessions), "{ip}");
        }
        for slot in slots {
            a.free(slot);
        }
        assert!(a.per_client.is_empty() && a.slots.is_empty() && a.active == 0);
    }

    #[test]
    fn per_client_rate_table_stays_bounded() {
        let now = Instant::now();
        let mut s = Sources::default();
        for i in 0..(SOURCE_TABLE_CAP as u32 * 3) {
            s.take(IpAddr::from(std::net::Ipv4Addr::from(i)), 5, now);
        }
        assert!(s.map.len() <= SOURCE_TABLE_CAP);
        // Idle entries go first: a later sweep frees them all.
        s.take("10.0.0.1".parse().unwrap(), 5, now + Duration::from_secs(2));
        assert_eq!(s.map.len(), 1);
    }

    #[test]
    fn session_limit_then_rate_limit() {
        let mut a = Admission::new(cfg());
        let now = Instant::now();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(a.blocked(ip, now), None);
        a.take(ip, now);
        a.take(ip, now);
        assert_eq!(a.blocked(ip, now), Some(Limit::Sessions));
        let mut r = Admission::new(AdmissionConfig { max_sessions: 100, max_sessions_per_client: 100, max_requests_per_s: 2, ..cfg() });
        r.take(ip, now);
        r.take(ip, now);
        assert_eq!(r.blocked(ip, now), Some(Limit::Rate));
        assert_eq!(r.blocked(ip, now + Duration::from_millis(600)), None);
        let mut c = Admission::new(AdmissionConfig { max_sessions: 100, max_sessions_per_client: 100, max_requests_per_s_per_client: 1, ..cfg() });
        c.take(ip, now);
        assert_eq!(c.blocked(ip, now), Some(Limit::ClientRate));
        assert_eq!(c.blocked("127.0.0.2".parse().unwrap(), now), None);
    }
}
