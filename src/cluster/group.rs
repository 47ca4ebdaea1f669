//! group: the session actor of one multicast group transfer socket (RFC 2090).
//!
//! In **owner** mode it holds the group's state machine (`tftpcast_proto::multicast::Group`):
//! OACKs to members and DATA to the group both leave from its one socket, as RFC 2090 clients
//! require; it paces itself with a lease from `pacing`, reports progress to the
//! `coordinator`, and says when no member is left (the coordinator ends the group, since a
//! join may be on its way).
//!
//! In a cluster every node binds the transfer socket of every group it knows of, because the
//! router may hash a member's packets to any node. On a node that does not own the group the
//! actor is in **relay** mode: it hands each packet to the coordinator, which forwards it to
//! the owner. A relay becomes the owner when the owner dies (`TakeOver`), and an owner hands
//! its members over and becomes a relay when it loses a start race (`BecomeRelay`).
//!
//! In single-port mode the group has no socket of its own: OACKs, unicast repairs and the
//! DATA to the group leave from the listening port (`transport::Transport::Shared`), and the
//! members' packets reach it from the listener through the coordinator (`Incoming`). Its
//! `tid` is then only the group's name in the cluster table.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use tftpcast_proto::cluster::MemberInfo;
use tftpcast_proto::multicast::rate::RateChange;
use tftpcast_proto::multicast::{Event, Group, GroupConfig, GroupDest, GroupStats};
use tftpcast_proto::pacing::TokenBucket;
use tftpcast_proto::packet;
use tftpcast_proto::transmit::{self, Transmit};
use tracing::{debug, info, warn, Span};

use crate::flow::lease::{self, Leased};
use crate::flow::pacing::{Pacing, Report};
use crate::state::DumpState;
use crate::net::timer::{earliest, Timer};
use crate::net::transport::{Endpoint, Strangers, Transport};
use crate::net::udp::Datagram;

/// Options of a member's OACK besides `multicast`.
pub type Options = Vec<(String, String)>;

/// A client joins (or asks again to join) the group.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub client: SocketAddr,
    pub options: Options,
}

/// A packet a member sent to this group's socket on another node, relayed here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Incoming {
    pub client: SocketAddr,
    pub packet: Bytes,
}

/// A group has no member left. `joins` is how many join messages it had received (repeated
/// requests included), so a join already on its way keeps it alive.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GroupIdle {
    pub id: u64,
    pub joins: u64,
}

/// Periodic progress of an owned group, for the table, the announcements and the dump.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GroupProgress {
    pub id: u64,
    pub block: u64,
    pub started: bool,
    pub members: Vec<MemberInfo>,
}

/// A client packet reached a relay socket: forward it to the group's owner.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RelayOut {
    pub tid: SocketAddr,
    pub client: SocketAddr,
    pub packet: Vec<u8>,
}

/// Where a group's notices go (the coordinator, which depends on this module: the notices
/// are this actor's interface, not the coordinator's).
pub struct GroupNotices {
    pub idle: Recipient<GroupIdle>,
    pub progress: Recipient<GroupProgress>,
    pub relay: Recipient<RelayOut>,
}

/// The coordinator ends the group.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EndGroup;

/// Another node owns this group now: stop sending, return the members for it to enroll.
#[derive(Message)]
#[rtype(result = "Vec<(SocketAddr, Options)>")]
pub struct BecomeRelay;

/// The owner died: this node continues the group with the members it announced.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TakeOver {
    pub cfg: GroupConfig,
    pub data: Bytes,
    pub members: Vec<(SocketAddr, Options)>,
}

pub struct GroupSpec {
    pub id: u64,
    pub endpoint: Endpoint,
    /// The group's transfer address: where its own socket is bound, or (single-port mode)
    /// only its identity in the cluster table.
    pub tid: SocketAddr,
    /// Some: owner of a new group with this configuration and data. None: relay.
    pub owner: Option<(GroupConfig, Bytes)>,
    pub span: Span,
    pub pacing: Addr<Pacing>,
    pub notices: GroupNotices,
    pub lease_every: Duration,
}

pub struct GroupSession {
    id: u64,
    /// None while relaying for another node.
    group: Option<Group<SocketAddr>>,
    dest: Option<SocketAddr>,
    tid: SocketAddr,
    file_len: u64,
    raw: Option<Endpoint>,
    sock: Option<Transport>,
    span: Span,
    pacing: Addr<Pacing>,
    notices: GroupNotices,
    lease_every: Duration,
    bucket: TokenBucket,
    timer: Timer,
    blocked: bool,
    created: Instant,
    started_at: Option<Instant>,
    reported: Report,
    unicast_bytes: u64,
    backpressure: u64,
    relayed: u64,
    /// Join messages received (repeats included), matched by the coordinator's count.
    join_requests: u64,
    /// The group sets its own rate (`multicast.rate_control`): pacing applies the caps only.
    own_rate: bool,
    /// `multicast.window`: the widest window.
    window_max: u16,
    /// The path takes segmented sends (cleared when the kernel refuses one).
    gso: bool,
    /// Packets from non-members and the budget of ERROR 5 answers to them.
    strangers: Strangers,
}

/// Group ids share the pacing table with session ids; this bit keeps them apart.
const GROUP_ID_BIT: u64 = 1 << 63;

impl GroupSession {
    pub fn new(spec: GroupSpec) -> Self {
        let tid = spec.tid;
        let (group, dest, file_len, own_rate, window_max) = match spec.owner {
            Some((cfg, data)) => {
                let dest = SocketAddr::V4(cfg.group);
                let len = data.len() as u64;
                let (own, window) = (cfg.rate.enabled, cfg.window);
                (Some(Group::new(cfg, data)), Some(dest), len, own, window)
            }
            None => (None, None, 0, false, 0),
        };
        GroupSession {
            id: spec.id,
            group,
            dest,
            tid,
            file_len,
            raw: Some(spec.endpoint),
            sock: None,
            span: spec.span,
            pacing: spec.pacing,
            notices: spec.notices,
            lease_every: spec.lease_every,
            bucket: TokenBucket::new(Instant::now(), None, 64 * 1024),
            timer: Timer::default(),
            blocked: false,
            created: Instant::now(),
            started_at: None,
            reported: Report::default(),
            unicast_bytes: 0,
            backpressure: 0,
            relayed: 0,
            join_requests: 0,
            own_rate,
            window_max,
            gso: true,
            strangers: Strangers::new(Instant::now()),
        }
    }

    /// Sends what the group has, as far as the pacing budget allows. Consecutive DATA to
    /// one destination leaves as one segmented send (UDP GSO) when the path takes it: one
    /// system call, and one packet through the bridge or switch queue to each receiver,
    /// which wakes once for the run (the budget is still charged per datagram).
    fn flush(&mut self, ctx: &mut Context<Self>) {
        let (Some(sock), Some(group_dest)) = (self.sock.clone(), self.dest) else { return };
        let mut batch: Vec<transmit::Datagram> = Vec::new();
        let mut batch_dest = group_dest;
        while !self.blocked {
            let now = Instant::now();
            let out = if self.bucket.ready_at(now).is_some() { None } else { self.group.as_mut().and_then(|g| g.poll_transmit(now)) };
            let (data, dest) = match &out {
                Some(Transmit { to: GroupDest::Group, datagram: d @ transmit::Datagram::Data { .. } }) => (Some(d), group_dest),
                Some(Transmit { to: GroupDest::Client(to), datagram: d @ transmit::Datagram::Data { .. } }) => (Some(d), *to),
                _ => (None, group_dest),
            };
            let joins = data.is_some_and(|t| dest == batch_dest && crate::net::udp::batchable(&batch, t));
            if !batch.is_empty() && !joins {
                self.send_batch(&sock, &mut batch, batch_dest, ctx);
            }
            match out {
                None => break,
                Some(Transmit { to: GroupDest::Client(to), datagram: transmit::Datagram::Control(packet) }) => {
                    // The group answers a stranger with ERROR 5: within the same budget as
                    // unicast transfers, so a spray at a group port is not reflected.
                    if packet.get(..2) == Some(&[0, 5][..]) && !self.strangers.allow() {
                        continue;
                    }
                    self.unicast_bytes += packet.len() as u64;
                    self.bucket.consume(packet.len() as u64);
                    if let Err(e) = sock.send_bytes(&packet, to) {
                        let _g = self.span.enter();
                        warn!(client = %to, error = %e, "cannot send to member");
                    }
                }
                Some(Transmit { datagram: t, .. }) => {
                    self.bucket.consume(t.len() as u64);
                    batch_dest = dest;
                    batch.push(t);
                }
            }
        }
        if !batch.is_empty() && !self.blocked {
            self.send_batch(&sock, &mut batch, batch_dest, ctx);
        }
        self.log_events();
        self.rearm(ctx);
    }

    /// Sends a run of DATA; on a full send queue the rest goes when the socket has room.
    fn send_batch(&mut self, sock: &Transport, batch: &mut Vec<transmit::Datagram>, dest: SocketAddr, ctx: &mut Context<Self>) {
        match sock.send_batch(batch, dest, &mut self.gso) {
            Ok(()) => batch.clear(),
            Err((sent, e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.blocked = true;
                self.backpressure += 1;
                let rest: Vec<_> = batch.drain(sent..).collect();
                batch.clear();
                ctx.spawn(sock.clone().send_batch_when_writable(rest, dest).into_actor(self).map(|_, act, ctx| {
                    act.blocked = false;
                    act.flush(ctx);
                }));
            }
            Err((_, e)) => {
                batch.clear();
                let _g = self.span.enter();
                warn!(error = %e, "cannot send to group");
            }
        }
    }

    fn log_events(&mut self) {
        let _g = self.span.enter();
        let Some(g) = self.group.as_mut() else { return };
        while let Some(ev) = g.poll_event() {
            match ev {
                Event::Joined { client, master, members } => info!(client = %client, master, members, "member joined"),
                Event::Started { members, early } => {
                    self.started_at = Some(Instant::now());
                    if early {
                        info!(members, "group started early: enough clients joined")
                    } else {
                        info!(members, waited_ms = self.created.elapsed().as_millis() as u64, "group started after the start delay")
                    }
                }
                Event::MasterChanged { from, to, why } => {
                    info!(from = ?from, to = %to, why = why.as_str(), block = g.current_block(), frontier = g.frontier(), members = g.members(), "master changed")
                }
                Event::Rate { change, lost, of, members } => {
                    let bps = |r: Option<u64>| r.map(|r| r * 8);
                    let frontier = g.frontier();
                    match change {
                        RateChange::Slowed { from, to, loss_permille } => info!(
                            old_bps = bps(from),
                            new_bps = to * 8,
                            repair_pct = loss_permille as f64 / 10.0,
                            lost,
                            of,
                            members,
                            frontier,
                            "group rate lowered: a probed member lost blocks"
                        ),
                        RateChange::Restored { to, loss_permille } => info!(
                            new_bps = bps(to),
                            repair_pct = loss_permille as f64 / 10.0,
                            lost,
                            of,
                            members,
                            frontier,
                            "group rate restored: slowing down did not reduce the loss (taken for the link's)"
                        ),
                        RateChange::Raised { from, to } => {
                            debug!(old_bps = from * 8, new_bps = bps(to), lost, of, frontier, "group rate raised after a clean probe")
                        }
                    }
                }
                Event::Window { from, to, master_loss_permille } => {
                    let loss_pct = master_loss_permille as f64 / 10.0;
                    // The extremes at info (lock-step on a lossy master, back to full), the
                    // steps between at debug.
                    if to == 1 || to as u16 == self.window_max {
                        info!(old = from, new = to, master_loss_pct = loss_pct, "group window changed with the master's loss");
                    } else {
                        debug!(old = from, new = to, master_loss_pct = loss_pct, "group window changed with the master's loss");
                    }
                }
                Event::MemberDone { client } => info!(client = %client, members_left = g.members(), "member finished"),
                Event::MemberLost { client, reason } => warn!(client = %client, reason, members_left = g.members(), "member dropped"),
                Event::MasterDemoted { client, repairs } => {
                    info!(client = %client, repairs, block = g.current_block(), "slow master moved to the back of the queue")
                }
                Event::Empty => self.notices.idle.do_send(GroupIdle { id: self.id, joins: self.join_requests }),
            }
        }
    }

    fn rearm(&mut self, ctx: &mut Context<Self>) {
        let pace = self.bucket.ready_at(Instant::now());
        if let Some(want) = earliest(self.group.as_ref().and_then(|g| g.poll_timeout()), pace) {
            self.timer.arm(ctx, want, |act, ctx| {
                if let Some(g) = act.group.as_mut() {
                    g.handle_timeout(Instant::now());
                }
                act.flush(ctx);
            });
        }
    }

    /// What happened since the previous report: repairs and re-masters count as loss.
    fn report(&mut self) -> Report {
        let Some(g) = self.group.as_ref() else { return Report::default() };
        let st = g.stats();
        let now = Report {
            bytes: st.data_bytes + self.unicast_bytes,
            packets: st.data_packets,
            // Blocks a late joiner asks for are not loss; only what the path lost counts.
            retransmits: st.repairs.loss(),
            timeouts: st.timeouts,
            backpressure: self.backpressure,
            repairs: st.remasters + st.probes,
        };
        let report = now.since(&self.reported);
        self.reported = now;
        report
    }

    fn renew(&mut self, ctx: &mut Context<Self>) {
        let Some(g) = self.group.as_ref() else { return };
        let members = g.member_list().into_iter().map(|(client, master, options)| MemberInfo { client, master, options }).collect();
        self.notices.progress.do_send(GroupProgress { id: self.id, block: g.current_block(), started: g.started(), members });
        lease::renew(self, ctx);
    }

    fn log_end(&mut self, why: &'static str) {
        let span = self.span.clone();
        let _g = span.enter();
        let Some(g) = self.group.as_ref() else { return };
        let st = g.stats();
        let ratio = st.data_bytes as f64 / self.file_len.max(1) as f64;
        let payload_ratio = payload_ratio(&st, self.file_len);
        info!(
            duration_ms = self.created.elapsed().as_millis() as u64,
            sending_ms = self.started_at.map(|t| t.elapsed().as_millis() as u64),
            data_bytes = st.data_bytes,
            wire_ratio = format!("{ratio:.3}"),
            payload_ratio = format!("{payload_ratio:.3}"),
            data_packets = st.data_packets,
            first_pass = st.first_pass,
            retransmits = st.retransmits,
            retransmitted_bytes = st.retransmitted_bytes,
            repairs_hole = st.repairs.hole,
            repairs_timeout = st.repairs.timeout,
            repairs_remaster = st.repairs.remaster,
            repairs_late_join = st.repairs.late_join,
            repairs_unexpected = st.repairs.unexpected,
            unexpected = st.unexpected,
            unexpected_retransmits = st.unexpected_retransmits,
            duplicate_acks = st.duplicate_acks,
            timeouts = st.timeouts,
            remasters = st.remasters,
            probes = st.probes,
            rate_changes = st.rate_changes,
            rate_bps = g.rate().map(|r| r * 8),
            members_done = st.members_done,
            members_lost = st.members_lost,
            demotions = st.demotions,
            unicast_data_packets = st.unicast_data_packets,
            why,
            "group ended"
        );
        lease::unregister(self);
    }
}

/// DATA payload sent (first pass and repairs) per byte of the file: 1.0 when the file
/// crossed the wire exactly once.
fn payload_ratio(st: &GroupStats, file_len: u64) -> f64 {
    let payload = st.data_bytes.saturating_sub(4 * st.data_packets);
    payload as f64 / file_len.max(1) as f64
}

impl Leased for GroupSession {
    fn lease_id(&self) -> u64 {
        self.id | GROUP_ID_BIT
    }
    fn own_rate_control(&self) -> bool {
        self.own_rate
    }
    fn pacing(&self) -> &Addr<Pacing> {
        &self.pacing
    }
    fn bucket(&mut self) -> &mut TokenBucket {
        &mut self.bucket
    }
    fn report(&mut self) -> Report {
        GroupSession::report(self)
    }
    fn flush(&mut self, ctx: &mut Context<Self>) {
        GroupSession::flush(self, ctx)
    }
    fn rearm(&mut self, ctx: &mut Context<Self>) {
        GroupSession::rearm(self, ctx)
    }
}

impl AsMut<Timer> for GroupSession {
    fn as_mut(&mut self) -> &mut Timer {
        &mut self.timer
    }
}

impl Actor for GroupSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        crate::metrics::m().groups_active.inc();
        let raw = self.raw.take().expect("socket");
        match raw.attach(ctx) {
            Ok(s) => {
                if s.is_shared() {
                    // Members' packets arrive as messages (try_send from the coordinator).
                    ctx.set_mailbox_capacity(256);
                }
                self.sock = Some(s)
            }
            Err(e) => {
                let _g = self.span.enter();
                warn!(error = %e, "cannot register group socket");
                ctx.stop();
                return;
            }
        }
        lease::register(self, ctx);
        ctx.run_interval(self.lease_every, |act, ctx| act.renew(ctx));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        crate::metrics::m().groups_active.dec();
        if let Some(g) = self.group.as_ref() {
            crate::metrics::m().retransmitted_bytes.inc_by(g.stats().retransmitted_bytes);
        }
        if self.group.is_some() {
            self.log_end("ended");
        } else {
            // Never started: nothing was sent (the report is empty).
            lease::unregister(self);
        }
    }
}

impl StreamHandler<Datagram> for GroupSession {
    fn handle(&mut self, d: Datagram, ctx: &mut Context<Self>) {
        match self.group.as_mut() {
            Some(g) => {
                if let Ok(p) = packet::decode(&d.data) {
                    g.handle(Instant::now(), d.meta.from, &p);
                    self.flush(ctx);
                }
            }
            None => {
                self.relayed += 1;
                self.notices.relay.do_send(RelayOut { tid: self.tid, client: d.meta.from, packet: d.data.to_vec() });
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Join> for GroupSession {
    type Result = ();
    fn handle(&mut self, m: Join, ctx: &mut Context<Self>) {
        self.join_requests += 1;
        if let Some(g) = self.group.as_mut() {
            g.join(Instant::now(), m.client, m.options);
            self.flush(ctx);
        }
    }
}

impl Handler<Incoming> for GroupSession {
    type Result = ();
    fn handle(&mut self, m: Incoming, ctx: &mut Context<Self>) {
        if let (Some(g), Ok(p)) = (self.group.as_mut(), packet::decode(&m.packet)) {
            g.handle(Instant::now(), m.client, &p);
            self.flush(ctx);
        }
    }
}

impl Handler<EndGroup> for GroupSession {
    type Result = ();
    fn handle(&mut self, _: EndGroup, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<BecomeRelay> for GroupSession {
    type Result = MessageResult<BecomeRelay>;
    fn handle(&mut self, _: BecomeRelay, _: &mut Context<Self>) -> Self::Result {
        let members = self.group.as_mut().map(|g| g.drain_members()).unwrap_or_default();
        self.log_end("handed over to the node that won the start race");
        self.group = None;
        self.dest = None;
        MessageResult(members)
    }
}

impl Handler<TakeOver> for GroupSession {
    type Result = ();
    fn handle(&mut self, m: TakeOver, ctx: &mut Context<Self>) {
        self.dest = Some(SocketAddr::V4(m.cfg.group));
        self.file_len = m.data.len() as u64;
        self.reported = Report::default();
        self.unicast_bytes = 0;
        self.window_max = m.cfg.window;
        let mut g = Group::new(m.cfg, m.data);
        g.take_over(Instant::now(), m.members);
        self.group = Some(g);
        self.started_at = Some(Instant::now());
        self.flush(ctx);
    }
}

impl Handler<DumpState> for GroupSession {
    type Result = ();
    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let _g = self.span.enter();
        let Some(g) = self.group.as_ref() else {
            info!(target: "state", actor = "group", role = "relay", relayed = self.relayed, "state");
            return;
        };
        let st = g.stats();
        info!(
            target: "state",
            actor = "group",
            role = "owner",
            started = g.started(),
            block = g.current_block(),
            frontier = g.frontier(),
            blocks = g.total_blocks(),
            members = g.members(),
            master = ?g.master(),
            timeout_ms = g.timeout().as_millis() as u64,
            window = g.window(),
            master_loss_pct = g.master_loss_permille() as f64 / 10.0,
            data_bytes = st.data_bytes,
            first_pass = st.first_pass,
            retransmits = st.retransmits,
            repairs_hole = st.repairs.hole,
            repairs_timeout = st.repairs.timeout,
            repairs_remaster = st.repairs.remaster,
            repairs_late_join = st.repairs.late_join,
            repairs_unexpected = st.repairs.unexpected,
            unexpected = st.unexpected,
            probes = st.probes,
            rate_changes = st.rate_changes,
            payload_ratio = format!("{:.3}", payload_ratio(&st, self.file_len)),
            group_rate_bps = g.rate().map(|r| r * 8),
            lease_rate_bps = self.bucket.rate().map(|r| r * 8),
            "state"
        );
    }
}
