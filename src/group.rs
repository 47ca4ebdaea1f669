//! group: the session actor of one multicast group (RFC 2090).
//!
//! Like a unicast session it owns a socket and a proto state machine
//! (`tftpcast_proto::multicast::Group`): OACKs to members and DATA to the group both leave
//! from this one socket, as RFC 2090 clients require. It paces itself with a lease from
//! `pacing`, reports progress to the `coordinator`, and tells it when no member is left; the
//! coordinator decides when the group ends (a join may be on its way).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use tftpcast_proto::multicast::{Event, Group, GroupConfig, Output};
use tftpcast_proto::pacing::TokenBucket;
use tftpcast_proto::packet;
use tracing::{info, warn, Span};

use crate::coordinator::{Coordinator, GroupIdle, GroupProgress};
use crate::pacing::{self, Pacing, Report};
use crate::state::DumpState;
use crate::timer::{earliest, Timer};
use crate::udp::{self, Datagram, DatagramStream, SharedSocket};

/// A client joins (or asks again to join) the group.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub client: SocketAddr,
    pub options: Vec<(String, String)>,
}

/// The coordinator ends the group.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EndGroup;

pub struct GroupSpec {
    pub id: u64,
    pub socket: UdpSocket,
    pub cfg: GroupConfig,
    pub data: Bytes,
    pub span: Span,
    pub pacing: Addr<Pacing>,
    pub coordinator: Addr<Coordinator>,
    pub lease_every: Duration,
}

pub struct GroupSession {
    id: u64,
    group: Group<SocketAddr>,
    dest: SocketAddr,
    file_len: u64,
    raw: Option<UdpSocket>,
    sock: Option<SharedSocket>,
    span: Span,
    pacing: Addr<Pacing>,
    coordinator: Addr<Coordinator>,
    lease_every: Duration,
    bucket: TokenBucket,
    timer: Timer,
    blocked: bool,
    created: Instant,
    started_at: Option<Instant>,
    reported: Report,
    unicast_bytes: u64,
    backpressure: u64,
}

impl GroupSession {
    pub fn new(spec: GroupSpec) -> Self {
        let dest = SocketAddr::V4(spec.cfg.group);
        let file_len = spec.data.len() as u64;
        GroupSession {
            id: spec.id,
            group: Group::new(spec.cfg, spec.data),
            dest,
            file_len,
            raw: Some(spec.socket),
            sock: None,
            span: spec.span,
            pacing: spec.pacing,
            coordinator: spec.coordinator,
            lease_every: spec.lease_every,
            bucket: TokenBucket::new(Instant::now(), None, 64 * 1024),
            timer: Timer::default(),
            blocked: false,
            created: Instant::now(),
            started_at: None,
            reported: Report::default(),
            unicast_bytes: 0,
            backpressure: 0,
        }
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        let Some(sock) = self.sock.clone() else { return };
        while !self.blocked {
            let now = Instant::now();
            if self.bucket.ready_at(now).is_some() {
                break;
            }
            let Some(out) = self.group.poll_transmit(now) else { break };
            match out {
                Output::ToClient { to, packet } => {
                    self.unicast_bytes += packet.len() as u64;
                    self.bucket.consume(packet.len() as u64);
                    if let Err(e) = sock.get_ref().send_to(&packet, to) {
                        let _g = self.span.enter();
                        warn!(client = %to, error = %e, "cannot send to member");
                    }
                }
                Output::ToGroup(t) => {
                    self.bucket.consume(t.len() as u64);
                    match udp::send_transmit(sock.get_ref(), &t, self.dest) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            self.blocked = true;
                            self.backpressure += 1;
                            ctx.spawn(udp::send_when_writable(sock.clone(), t, self.dest).into_actor(self).map(|_, act, ctx| {
                                act.blocked = false;
                                act.flush(ctx);
                            }));
                        }
                        Err(e) => {
                            let _g = self.span.enter();
                            warn!(error = %e, "cannot send to group");
                        }
                    }
                }
            }
        }
        self.log_events();
        self.rearm(ctx);
    }

    fn log_events(&mut self) {
        let _g = self.span.enter();
        while let Some(ev) = self.group.poll_event() {
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
                Event::MasterChanged { from, to, .. } => {
                    info!(from = ?from, to = %to, block = self.group.current_block(), members = self.group.members(), "master changed")
                }
                Event::MemberDone { client } => info!(client = %client, members_left = self.group.members(), "member finished"),
                Event::MemberLost { client, reason } => warn!(client = %client, reason, members_left = self.group.members(), "member dropped"),
                Event::Empty => {
                    self.coordinator.do_send(GroupIdle { id: self.id, joins: self.group.stats().joins });
                }
            }
        }
    }

    fn rearm(&mut self, ctx: &mut Context<Self>) {
        let pace = self.bucket.ready_at(Instant::now());
        if let Some(want) = earliest(self.group.poll_timeout(), pace) {
            self.timer.arm(ctx, want, |act, ctx| {
                act.group.handle_timeout(Instant::now());
                act.flush(ctx);
            });
        }
    }

    /// What happened since the previous report: repairs and re-masters count as loss.
    fn report(&mut self) -> Report {
        let st = self.group.stats();
        let now = Report {
            bytes: st.data_bytes + self.unicast_bytes,
            retransmits: st.retransmits,
            timeouts: st.timeouts,
            backpressure: self.backpressure,
            repairs: st.remasters,
        };
        let report = now.since(&self.reported);
        self.reported = now;
        report
    }

    fn renew(&mut self, ctx: &mut Context<Self>) {
        let report = self.report();
        self.coordinator.do_send(GroupProgress { id: self.id, block: self.group.current_block(), members: self.group.members() });
        self.pacing
            .send(pacing::Renew { id: self.id | GROUP_ID_BIT, report })
            .into_actor(self)
            .map(|res, act, ctx| {
                if let Ok(lease) = res {
                    if lease.rate != act.bucket.rate() {
                        act.bucket.set_rate(Instant::now(), lease.rate);
                        act.rearm(ctx);
                    }
                }
            })
            .spawn(ctx);
    }
}

/// Group ids share the pacing table with session ids; this bit keeps them apart.
const GROUP_ID_BIT: u64 = 1 << 63;

impl AsMut<Timer> for GroupSession {
    fn as_mut(&mut self) -> &mut Timer {
        &mut self.timer
    }
}

impl Actor for GroupSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let raw = self.raw.take().expect("socket");
        match udp::register(raw) {
            Ok(s) => {
                ctx.add_stream(DatagramStream::new(s.clone(), packet::MAX_DATAGRAM, false));
                self.sock = Some(s);
            }
            Err(e) => {
                let _g = self.span.enter();
                warn!(error = %e, "cannot register group socket");
                ctx.stop();
                return;
            }
        }
        self.pacing
            .send(pacing::Register { id: self.id | GROUP_ID_BIT })
            .into_actor(self)
            .map(|res, act, ctx| {
                if let Ok(lease) = res {
                    act.bucket.set_rate(Instant::now(), lease.rate);
                }
                act.flush(ctx);
            })
            .wait(ctx);
        ctx.run_interval(self.lease_every, |act, ctx| act.renew(ctx));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        let span = self.span.clone();
        let _g = span.enter();
        let st = self.group.stats();
        let ratio = st.data_bytes as f64 / self.file_len.max(1) as f64;
        info!(
            duration_ms = self.created.elapsed().as_millis() as u64,
            sending_ms = self.started_at.map(|t| t.elapsed().as_millis() as u64),
            data_bytes = st.data_bytes,
            wire_ratio = format!("{ratio:.3}"),
            data_packets = st.data_packets,
            retransmits = st.retransmits,
            unexpected = st.unexpected,
            unexpected_retransmits = st.unexpected_retransmits,
            remasters = st.remasters,
            members_done = st.members_done,
            members_lost = st.members_lost,
            "group ended"
        );
        let report = self.report();
        self.pacing.do_send(pacing::Unregister { id: self.id | GROUP_ID_BIT, report });
    }
}

impl StreamHandler<Datagram> for GroupSession {
    fn handle(&mut self, d: Datagram, ctx: &mut Context<Self>) {
        if let Ok(p) = packet::decode(&d.data) {
            self.group.handle(Instant::now(), d.meta.from, &p);
            self.flush(ctx);
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Join> for GroupSession {
    type Result = ();
    fn handle(&mut self, m: Join, ctx: &mut Context<Self>) {
        self.group.join(Instant::now(), m.client, m.options);
        self.flush(ctx);
    }
}

impl Handler<EndGroup> for GroupSession {
    type Result = ();
    fn handle(&mut self, _: EndGroup, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<DumpState> for GroupSession {
    type Result = ();
    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let _g = self.span.enter();
        let st = self.group.stats();
        info!(
            target: "state",
            actor = "group",
            started = self.group.started(),
            block = self.group.current_block(),
            blocks = self.group.total_blocks(),
            members = self.group.members(),
            master = ?self.group.master(),
            timeout_ms = self.group.timeout().as_millis() as u64,
            data_bytes = st.data_bytes,
            retransmits = st.retransmits,
            unexpected = st.unexpected,
            rate_bps = self.bucket.rate().map(|r| r * 8),
            "state"
        );
    }
}
