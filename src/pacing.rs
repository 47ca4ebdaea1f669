//! pacing: the node-wide send budget.
//!
//! Sessions do not ask pacing per packet: each holds a rate lease (bytes per second) and
//! paces itself locally with a token bucket; it renews the lease every `lease_ms` with a
//! report of what it sent. Pacing splits the node cap among active sessions and bounds each by
//! the per-session cap (`tftpcast_proto::pacing::session_share`). The flow-control issue
//! makes the split adaptive; the lease protocol stays the same.

use std::collections::HashMap;

use actix::prelude::*;
use tftpcast_proto::pacing::{mbps, session_share, Rate};

use crate::state::DumpState;

/// A session's budget until its next renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Bytes per second; `None` is unlimited.
    pub rate: Rate,
}

/// What a session sent since its previous report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Report {
    pub bytes: u64,
    pub retransmits: u64,
    pub timeouts: u64,
}

/// A session starts: returns its first lease.
#[derive(Message)]
#[rtype(result = "Lease")]
pub struct Register {
    pub id: u64,
}

/// A session renews its lease and reports.
#[derive(Message)]
#[rtype(result = "Lease")]
pub struct Renew {
    pub id: u64,
    pub report: Report,
}

/// A session ended, with what it sent since its last report.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub id: u64,
    pub report: Report,
}

#[derive(Default)]
struct Entry {
    bytes: u64,
    retransmits: u64,
    timeouts: u64,
}

pub struct Pacing {
    node_cap: Rate,
    session_cap: Rate,
    sessions: HashMap<u64, Entry>,
    /// Totals since start, for the state dump.
    bytes_total: u64,
    retransmits_total: u64,
    bytes_at_last_dump: u64,
    last_dump: std::time::Instant,
}

impl Pacing {
    pub fn new(node_cap_mbps: u64, session_cap_mbps: u64) -> Self {
        Pacing {
            node_cap: mbps(node_cap_mbps),
            session_cap: mbps(session_cap_mbps),
            sessions: HashMap::new(),
            bytes_total: 0,
            retransmits_total: 0,
            bytes_at_last_dump: 0,
            last_dump: std::time::Instant::now(),
        }
    }

    fn lease(&self) -> Lease {
        Lease { rate: session_share(self.node_cap, self.sessions.len(), self.session_cap) }
    }
}

impl Actor for Pacing {
    type Context = Context<Self>;
}

impl Handler<Register> for Pacing {
    type Result = MessageResult<Register>;
    fn handle(&mut self, m: Register, _: &mut Context<Self>) -> Self::Result {
        self.sessions.insert(m.id, Entry::default());
        MessageResult(self.lease())
    }
}

impl Handler<Renew> for Pacing {
    type Result = MessageResult<Renew>;
    fn handle(&mut self, m: Renew, _: &mut Context<Self>) -> Self::Result {
        let e = self.sessions.entry(m.id).or_default();
        e.bytes += m.report.bytes;
        e.retransmits += m.report.retransmits;
        e.timeouts += m.report.timeouts;
        self.bytes_total += m.report.bytes;
        self.retransmits_total += m.report.retransmits;
        MessageResult(self.lease())
    }
}

impl Handler<Unregister> for Pacing {
    type Result = ();
    fn handle(&mut self, m: Unregister, _: &mut Context<Self>) {
        self.sessions.remove(&m.id);
        self.bytes_total += m.report.bytes;
        self.retransmits_total += m.report.retransmits;
    }
}

impl Handler<DumpState> for Pacing {
    type Result = ();
    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let now = std::time::Instant::now();
        let secs = now.duration_since(self.last_dump).as_secs_f64().max(1e-3);
        let rate_mbps = (self.bytes_total - self.bytes_at_last_dump) as f64 * 8.0 / secs / 1e6;
        self.bytes_at_last_dump = self.bytes_total;
        self.last_dump = now;
        let lease = self.lease();
        tracing::info!(
            target: "state",
            actor = "pacing",
            sessions = self.sessions.len(),
            node_cap_bps = self.node_cap.map(|r| r * 8),
            session_cap_bps = self.session_cap.map(|r| r * 8),
            lease_bps = lease.rate.map(|r| r * 8),
            rate_mbps = format!("{rate_mbps:.1}"),
            bytes_total = self.bytes_total,
            retransmits_total = self.retransmits_total,
            "state"
        );
    }
}
