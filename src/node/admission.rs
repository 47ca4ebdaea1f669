//! admission: how many requests the node takes on, and what happens to the others.
//!
//! A request is admitted when the node and its client are under their session limits
//! (`limits.max_sessions`, `limits.max_sessions_per_client`) and under the request rates
//! (`limits.max_requests_per_s`, `limits.max_requests_per_s_per_client`, token buckets of one
//! second's burst). Admission reserves a session slot with a [`Ticket`] while the file is
//! looked up; the slot goes back when the ticket is dropped (a refusal, a multicast join) or,
//! once committed to a session, when the listener releases it at the session's end.
//!
//! A request over a limit is not refused: it waits in a bounded FIFO queue and is started as
//! soon as a slot and a token free up (the client is still waiting for its answer); the
//! client's own retransmission of a queued request only refreshes its place. Requests that do
//! not fit in the queue, or wait longer than `limits.defer_max_ms` without a retransmission,
//! are dropped silently: an error reply would let a spoofed flood turn the server into an
//! amplifier. Every decision is counted (metrics) and summarized in at most one log line a
//! second.
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

/// Clients whose request-rate buckets are remembered. Beyond it, buckets that have refilled
/// (idle clients: forgetting them loses nothing) are evicted first, then the least recent.
pub const SOURCE_TABLE_CAP: usize = 4096;

#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    pub max_sessions: usize,
    pub max_sessions_per_client: usize,
    /// Requests a second, node-wide; 0 is no limit.
    pub max_requests_per_s: u32,
    /// Requests a second from one client address; 0 is no limit.
    pub max_requests_per_s_per_client: u32,
    /// Requests that may wait for a slot; 0 drops at the limit.
    pub defer_queue: usize,
    /// Longest a request waits after its last (re)transmission.
    pub defer_max: Duration,
}

/// Which limit held a request back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Sessions,
    ClientSessions,
    Rate,
    ClientRate,
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
    /// rate, client rate.
    by_limit: [u64; 4],
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
    deadline: Instant,
}

pub struct Admission {
    cfg: AdmissionConfig,
    active: usize,
    per_client: HashMap<IpAddr, usize>,
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
    ip: IpAddr,
    live: bool,
}

impl Ticket {
    pub fn commit(mut self) {
        self.live = false;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.live {
            release(&self.adm, self.ip);
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
        if self.per_client.get(&ip).copied().unwrap_or(0) >= self.cfg.max_sessions_per_client {
            return Some(Limit::ClientSessions);
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

    fn take(&mut self, ip: IpAddr, now: Instant) {
        self.active += 1;
        *self.per_client.entry(ip).or_insert(0) += 1;
        if self.cfg.max_requests_per_s > 0 {
            self.global.tokens -= 1.0;
        }
        if self.cfg.max_requests_per_s_per_client > 0 {
            self.sources.take(ip, self.cfg.max_requests_per_s_per_client, now);
        }
        m().admission("admitted");
    }

    fn defer(&mut self, d: &Datagram, to: &Recipient<Admitted>, limit: Limit, now: Instant) -> Decision {
        self.tally.by_limit[limit.index()] += 1;
        if self.queue.len() >= self.cfg.defer_queue {
            self.tally.dropped_queue_full += 1;
            m().admission("dropped_queue_full");
            return Decision::Dropped;
        }
        // A copy: the received datagram shares a large receive buffer.
        let d = Datagram { meta: d.meta, data: bytes::Bytes::copy_from_slice(&d.data) };
        self.queued_peers.insert(d.meta.from);
        self.queue.push_back(Entry { d, to: to.clone(), since: now, deadline: now + self.cfg.defer_max });
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
            a.take(ip, now);
            Decision::Admit(Ticket { adm: shared.clone(), ip, live: true })
        }
        Some(Limit::Sessions | Limit::ClientSessions) if foldable => {
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

/// A retransmission of a queued request refreshes its deadline and keeps its place. Returns
/// whether the request was queued.
pub fn refresh(shared: &SharedAdmission, d: &Datagram) -> bool {
    let mut a = lock(shared);
    if !a.queued_peers.contains(&d.meta.from) {
        return false;
    }
    let defer_max = a.cfg.defer_max;
    let Some(e) = a.queue.iter_mut().find(|e| e.d.meta.from == d.meta.from) else { return false };
    e.deadline = Instant::now() + defer_max;
    if e.d.data != d.data {
        // Same port, another request: the newest one is what the client waits for.
        e.d = Datagram { meta: d.meta, data: bytes::Bytes::copy_from_slice(&d.data) };
    }
    a.tally.refreshed += 1;
    m().admission("refreshed");
    true
}

/// Drops expired requests and starts the waiting ones that fit now. Called on a short
/// interval (token refill) and whenever a slot frees.
pub fn pump(shared: &SharedAdmission) {
    let mut out = Vec::new();
    {
        let mut a = lock(shared);
        let now = Instant::now();
        if a.queue.is_empty() {
            a.maybe_log(now);
            return;
        }
        let before = a.queue.len();
        let Admission { queue, queued_peers, .. } = &mut *a;
        queue.retain(|e| {
            let keep = e.deadline > now;
            if !keep {
                queued_peers.remove(&e.d.meta.from);
            }
            keep
        });
        let expired = (before - a.queue.len()) as u64;
        if expired > 0 {
            a.tally.dropped_expired += expired;
            for _ in 0..expired {
                m().admission("dropped_expired");
            }
        }
        let mut i = 0;
        while i < a.queue.len() {
            let ip = key(a.queue[i].d.meta.from.ip());
            match a.blocked(ip, now) {
                None => {
                    a.take(ip, now);
                    let e = a.queue.remove(i).expect("index in queue");
                    a.queued_peers.remove(&e.d.meta.from);
                    let waited = now.saturating_duration_since(e.since);
                    a.tally.admitted_after_defer += 1;
                    a.tally.longest_wait = a.tally.longest_wait.max(waited);
                    m().admission("admitted_after_defer");
                    out.push((e, ip, waited));
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
    for (e, ip, waited) in out {
        e.to.do_send(Admitted { d: e.d, ticket: Ticket { adm: shared.clone(), ip, live: true }, waited });
    }
}

/// A committed session ended: its slot is free for the next request.
pub fn release(shared: &SharedAdmission, ip: IpAddr) {
    {
        let ip = key(ip);
        let mut a = lock(shared);
        a.active = a.active.saturating_sub(1);
        if let Some(c) = a.per_client.get_mut(&ip) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                a.per_client.remove(&ip);
            }
        }
    }
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
        "state"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdmissionConfig {
        AdmissionConfig { max_sessions: 2, max_sessions_per_client: 2, max_requests_per_s: 0, max_requests_per_s_per_client: 0, defer_queue: 3, defer_max: Duration::from_secs(2) }
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
