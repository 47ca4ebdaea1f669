//! pacing: the node's flow-control authority.
//!
//! Sessions and groups do not ask pacing per packet: each holds a rate lease and paces itself
//! with a local token bucket, renewing the lease every `lease_ms` with a report of what
//! happened (bytes, retransmissions, timeouts, full send queues, multicast repairs). Pacing
//! feeds each report to that sender's AIMD controller (`tftpcast_proto::flow::Aimd`), so a
//! sender that sees loss slows down and one that does not speeds back up, and grants the
//! smaller of that rate, an equal share of the node cap and the per-session cap.
//!
//! From the same reports it keeps the node's recent loss rate and, with the file cache's
//! memory use, pushes [`Advice`] to the listeners, which pick block sizes and timer floors
//! for new transfers from it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tftpcast_proto::flow::{Aimd, Change, Signals};
use tftpcast_proto::pacing::{mbps, session_share, Rate};
use tracing::{debug, info};

use crate::fs::file_cache::{FileCache, GetStats};
use crate::state::DumpState;

/// A sender's budget until its next renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Bytes per second; `None` is unlimited.
    pub rate: Rate,
}

/// What a sender saw since its previous report.
pub type Report = Signals;

/// A sender starts: returns its first lease.
#[derive(Message)]
#[rtype(result = "Lease")]
pub struct Register {
    pub id: u64,
    /// The sender controls its rate from its own receivers' reports (a multicast group):
    /// pacing grants it the caps only, and counts its reports for the node's advice.
    pub own_rate_control: bool,
}

/// A sender renews its lease and reports.
#[derive(Message)]
#[rtype(result = "Lease")]
pub struct Renew {
    pub id: u64,
    pub report: Report,
}

/// A sender ended, with what it sent since its last report.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub id: u64,
    pub report: Report,
}

/// Conditions new transfers adapt to, pushed to listeners.
#[derive(Message, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct Advice {
    /// Node-wide share of packets sent again, recent, in percent.
    pub loss_pct: u32,
    /// File cache memory in use, percent of its cap.
    pub memory_pct: u32,
    /// Active senders.
    pub senders: u32,
}

/// Who wants [`Advice`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe(pub Recipient<Advice>);

/// Settings of the pacing actor.
#[derive(Debug, Clone)]
pub struct PacingPolicy {
    pub node_cap_mbps: u64,
    pub session_cap_mbps: u64,
    /// AIMD on (false: only the caps apply).
    pub adaptive: bool,
    pub floor_kbps: u64,
    pub ceiling_mbps: u64,
    pub increase_mbps: u64,
    pub decrease_pct: u64,
    pub loss_threshold_pct: u64,
    pub cache_cap_bytes: u64,
}

struct Entry {
    aimd: Aimd,
    /// AIMD applies (false: the sender has its own rate control).
    adaptive: bool,
    last_report: Instant,
    bytes: u64,
    retransmits: u64,
}

pub struct Pacing {
    policy: PacingPolicy,
    node_cap: Rate,
    session_cap: Rate,
    senders: HashMap<u64, Entry>,
    files: Option<Addr<FileCache>>,
    subscribers: Vec<Recipient<Advice>>,
    advice: Advice,
    /// Packets and retransmissions since the advice was last computed.
    window_packets: u64,
    window_retransmits: u64,
    loss_ewma: f64,
    bytes_total: u64,
    retransmits_total: u64,
    decreases: u64,
    bytes_at_last_dump: u64,
    last_dump: Instant,
    /// When the metrics gauges were last set, and bytes_total then.
    metrics_mark: (Instant, u64),
}

impl Pacing {
    pub fn new(policy: PacingPolicy, files: Option<Addr<FileCache>>) -> Self {
        Pacing {
            node_cap: mbps(policy.node_cap_mbps),
            session_cap: mbps(policy.session_cap_mbps),
            policy,
            senders: HashMap::new(),
            files,
            subscribers: Vec::new(),
            advice: Advice::default(),
            window_packets: 0,
            window_retransmits: 0,
            loss_ewma: 0.0,
            bytes_total: 0,
            retransmits_total: 0,
            decreases: 0,
            bytes_at_last_dump: 0,
            last_dump: Instant::now(),
            metrics_mark: (Instant::now(), 0),
        }
    }

    fn new_aimd(&self) -> Aimd {
        let p = &self.policy;
        Aimd::new(
            p.floor_kbps * 1000 / 8,
            p.ceiling_mbps * 1_000_000 / 8,
            p.increase_mbps * 1_000_000 / 8,
            100 - p.decrease_pct.min(99),
            Duration::from_millis(100),
        )
        .with_loss_threshold(p.loss_threshold_pct)
    }

    fn lease(&self, id: u64) -> Lease {
        let share = session_share(self.node_cap, self.senders.len(), self.session_cap);
        let adaptive = self.policy.adaptive.then(|| self.senders.get(&id).filter(|e| e.adaptive).map(|e| e.aimd.rate())).flatten();
        let rate = match (share, adaptive) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Lease { rate }
    }

    fn account(&mut self, r: &Report) {
        crate::metrics::m().bytes_sent.inc_by(r.bytes);
        self.bytes_total += r.bytes;
        self.retransmits_total += r.retransmits;
        self.window_retransmits += r.retransmits;
        // Packets are not reported separately; a block-sized estimate is enough for a
        // loss percentage, so count retransmissions against bytes in 1 KiB units.
        self.window_packets += (r.bytes / 1024).max(1);
    }

    /// Recomputes the advice once a second and pushes it when it changed.
    fn refresh_advice(&mut self, ctx: &mut Context<Self>) {
        self.publish_metrics();
        let sample = if self.window_packets > 0 { 100.0 * self.window_retransmits as f64 / self.window_packets as f64 } else { 0.0 };
        self.loss_ewma = 0.7 * self.loss_ewma + 0.3 * sample.min(100.0);
        self.window_packets = 0;
        self.window_retransmits = 0;
        let Some(files) = self.files.clone() else { return self.publish() };
        files
            .send(GetStats)
            .into_actor(self)
            .map(|res, act, _| {
                if let Ok(stats) = res {
                    act.advice.memory_pct = (stats.bytes.saturating_mul(100) / act.policy.cache_cap_bytes.max(1)).min(100) as u32;
                }
                act.publish();
            })
            .spawn(ctx);
    }

    /// The gauges of the metrics endpoint, once a second.
    fn publish_metrics(&mut self) {
        let now = Instant::now();
        let secs = now.duration_since(self.metrics_mark.0).as_secs_f64().max(1e-3);
        let metrics = crate::metrics::m();
        metrics.pacing_rate_bps.set((self.bytes_total - self.metrics_mark.1) as f64 * 8.0 / secs);
        self.metrics_mark = (now, self.bytes_total);
        metrics.pacing_senders.set(self.senders.len() as i64);
        let rates: Vec<u64> = self.senders.keys().filter_map(|id| self.lease(*id).rate.map(|r| r * 8)).collect();
        metrics.pacing_lease_min_bps.set(rates.iter().min().copied().unwrap_or(0) as i64);
        metrics.pacing_lease_max_bps.set(rates.iter().max().copied().unwrap_or(0) as i64);
    }

    fn publish(&mut self) {
        let next = Advice { loss_pct: self.loss_ewma.round() as u32, memory_pct: self.advice.memory_pct, senders: self.senders.len() as u32 };
        if next != self.advice {
            if next.loss_pct != self.advice.loss_pct {
                info!(old_loss_pct = self.advice.loss_pct, new_loss_pct = next.loss_pct, signal = "retransmissions", "pacing advice changed");
            }
            self.advice = next;
            for s in &self.subscribers {
                s.do_send(next);
            }
        }
    }
}

impl Actor for Pacing {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(Duration::from_secs(1), |act, ctx| act.refresh_advice(ctx));
    }
}

impl Handler<Register> for Pacing {
    type Result = MessageResult<Register>;
    fn handle(&mut self, m: Register, _: &mut Context<Self>) -> Self::Result {
        let e = Entry { aimd: self.new_aimd(), adaptive: !m.own_rate_control, last_report: Instant::now(), bytes: 0, retransmits: 0 };
        self.senders.insert(m.id, e);
        MessageResult(self.lease(m.id))
    }
}

impl Handler<Renew> for Pacing {
    type Result = MessageResult<Renew>;
    fn handle(&mut self, m: Renew, _: &mut Context<Self>) -> Self::Result {
        self.account(&m.report);
        let now = Instant::now();
        if let Some(e) = self.senders.get_mut(&m.id) {
            e.bytes += m.report.bytes;
            e.retransmits += m.report.retransmits;
            let interval = now.saturating_duration_since(e.last_report);
            e.last_report = now;
            if self.policy.adaptive && e.adaptive {
                match e.aimd.on_report(now, interval, &m.report) {
                    Change::Decreased { from, to } => {
                        self.decreases += 1;
                        info!(
                            sender = m.id,
                            old_bps = from * 8,
                            new_bps = to * 8,
                            retransmits = m.report.retransmits,
                            timeouts = m.report.timeouts,
                            backpressure = m.report.backpressure,
                            repairs = m.report.repairs,
                            "rate decreased on loss"
                        );
                    }
                    Change::Increased { from, to } => debug!(sender = m.id, old_bps = from * 8, new_bps = to * 8, "rate increased after a clean round"),
                    Change::Unchanged => {}
                }
            }
        }
        MessageResult(self.lease(m.id))
    }
}

impl Handler<Unregister> for Pacing {
    type Result = ();
    fn handle(&mut self, m: Unregister, _: &mut Context<Self>) {
        self.account(&m.report);
        self.senders.remove(&m.id);
    }
}

impl Handler<Subscribe> for Pacing {
    type Result = ();
    fn handle(&mut self, m: Subscribe, _: &mut Context<Self>) {
        m.0.do_send(self.advice);
        self.subscribers.push(m.0);
    }
}

impl Handler<DumpState> for Pacing {
    type Result = ();
    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let now = Instant::now();
        let secs = now.duration_since(self.last_dump).as_secs_f64().max(1e-3);
        let rate_mbps = (self.bytes_total - self.bytes_at_last_dump) as f64 * 8.0 / secs / 1e6;
        self.bytes_at_last_dump = self.bytes_total;
        self.last_dump = now;
        let rates: Vec<u64> = self.senders.keys().filter_map(|id| self.lease(*id).rate.map(|r| r * 8)).collect();
        let (min_bps, max_bps) = (rates.iter().min().copied(), rates.iter().max().copied());
        info!(
            target: "state",
            actor = "pacing",
            senders = self.senders.len(),
            adaptive = self.policy.adaptive,
            node_cap_bps = self.node_cap.map(|r| r * 8),
            session_cap_bps = self.session_cap.map(|r| r * 8),
            lease_min_bps = min_bps,
            lease_max_bps = max_bps,
            rate_mbps = format!("{rate_mbps:.1}"),
            bytes_total = self.bytes_total,
            retransmits_total = self.retransmits_total,
            decreases = self.decreases,
            loss_pct = self.advice.loss_pct,
            memory_pct = self.advice.memory_pct,
            "state"
        );
    }
}
