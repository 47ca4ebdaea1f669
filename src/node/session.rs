//! session: one actor per unicast transfer.
//!
//! The session owns its transfer socket (the server's TID, RFC 1350) — or, in single-port
//! mode, sends from the listening port and is handed its peer's packets by the listener
//! (`transport`) — and a `tftpcast_proto::Sender`; it turns datagrams and timer expiries into calls on the state
//! machine and sends what the machine wants sent, paced by its lease from `pacing`. It is the
//! only actor on the per-packet path of its transfer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tftpcast_proto::pacing::TokenBucket;
use tftpcast_proto::packet::{self, ErrorCode};
use tftpcast_proto::{Outcome, Sender};
use tracing::{info, warn, Span};

use crate::flow::lease::{self, Leased};
use crate::flow::pacing::{Pacing, Report};
use crate::state::DumpState;
use crate::net::timer::{earliest, Timer};
use crate::net::transport::{Endpoint, Routed, Strangers, Transport};
use crate::net::udp::Datagram;

/// Sent by a session to its listener when it stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionEnded {
    pub peer: SocketAddr,
    pub id: u64,
    pub ok: bool,
}

/// Sent by a session to its listener when its client first answers (acknowledges the OACK
/// or DATA 1): the transfer is no longer half-open (see `admission`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionAnswered {
    pub id: u64,
}

/// Tells a session the node is shutting down: finish if possible (nothing changes for the
/// transfer itself; the listener waits for `SessionEnded`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Abort {
    pub reason: &'static str,
}

/// Everything a session needs to start; built by the listener.
pub struct SessionSpec {
    pub id: u64,
    pub peer: SocketAddr,
    pub endpoint: Endpoint,
    pub sender: Sender,
    pub span: Span,
    pub pacing: Addr<Pacing>,
    pub ended: Recipient<SessionEnded>,
    pub answered: Recipient<SessionAnswered>,
    pub lease_every: Duration,
}

pub struct Session {
    id: u64,
    peer: SocketAddr,
    sock: Option<Transport>,
    raw: Option<Endpoint>,
    sender: Sender,
    span: Span,
    pacing: Addr<Pacing>,
    ended: Recipient<SessionEnded>,
    /// Told once, at the client's first answer; None after.
    answered: Option<Recipient<SessionAnswered>>,
    lease_every: Duration,
    bucket: TokenBucket,
    started: Instant,
    timer: Timer,
    /// A datagram waiting for socket buffer space.
    blocked: bool,
    /// Datagrams polled from the sender, not yet sent (reused between flushes).
    batch: Vec<tftpcast_proto::transmit::Datagram>,
    /// The path takes segmented sends (cleared the first time the kernel refuses one).
    gso: bool,
    reported: Report,
    /// Times the socket's send queue was full.
    backpressure: u64,
    /// Packets from other TIDs, and the budget for answering them.
    strangers: Strangers,
}

impl Session {
    pub fn new(spec: SessionSpec) -> Self {
        let now = Instant::now();
        Session {
            id: spec.id,
            peer: spec.peer,
            sock: None,
            raw: Some(spec.endpoint),
            sender: spec.sender,
            span: spec.span,
            pacing: spec.pacing,
            ended: spec.ended,
            answered: Some(spec.answered),
            lease_every: spec.lease_every,
            // Burst: one window of the largest datagrams, so a window leaves back to back.
            bucket: TokenBucket::new(now, None, 64 * 1024),
            started: now,
            timer: Timer::default(),
            blocked: false,
            batch: Vec::new(),
            gso: true,
            reported: Report::default(),
            backpressure: 0,
            strangers: Strangers::new(now),
        }
    }

    /// Sends everything the state machine has, as far as the pacing budget allows.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        let Some(sock) = self.sock.clone() else { return };
        if self.blocked {
            return;
        }
        // A window leaves as one segmented send when the path allows (UDP GSO): the pacing
        // budget is still charged per datagram, so a batch never exceeds the lease.
        let mut batch = std::mem::take(&mut self.batch);
        loop {
            let now = Instant::now();
            let next = if self.bucket.ready_at(now).is_some() { None } else { self.sender.poll_transmit(now).map(|t| t.datagram) };
            let full = match &next {
                Some(t) => !batch.is_empty() && !crate::net::udp::batchable(&batch, t),
                None => !batch.is_empty(),
            };
            if full {
                match sock.send_batch(&batch, self.peer, &mut self.gso) {
                    Ok(()) => batch.clear(),
                    Err((sent, e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.blocked = true;
                        self.backpressure += 1;
                        let mut rest: Vec<_> = batch.drain(sent..).collect();
                        if let Some(t) = next {
                            self.bucket.consume(t.len() as u64);
                            rest.push(t);
                        }
                        batch.clear();
                        self.batch = batch;
                        ctx.spawn(sock.send_batch_when_writable(rest, self.peer).into_actor(self).map(|_, act, ctx| {
                            act.blocked = false;
                            act.flush(ctx);
                        }));
                        return;
                    }
                    Err((_, e)) => {
                        batch.clear();
                        let _g = self.span.enter();
                        warn!(error = %e, "send failed");
                    }
                }
            }
            let Some(t) = next else { break };
            self.bucket.consume(t.len() as u64);
            batch.push(t);
        }
        self.batch = batch;
        self.finish_if_done(ctx);
        self.rearm(ctx);
    }

    /// Arms the timer for the earliest of the retransmission deadline and the pacing wake-up.
    fn rearm(&mut self, ctx: &mut Context<Self>) {
        let pace = self.bucket.ready_at(Instant::now());
        if let Some(want) = earliest(self.sender.poll_timeout(), pace) {
            self.timer.arm(ctx, want, |act, ctx| {
                act.sender.handle_timeout(Instant::now());
                act.flush(ctx);
            });
        }
    }

    fn finish_if_done(&mut self, ctx: &mut Context<Self>) {
        if self.sender.is_done() {
            ctx.stop();
        }
    }

    /// What happened since the previous report.
    fn report(&mut self) -> Report {
        let st = self.sender.stats();
        let now = Report { bytes: st.bytes_sent, packets: st.packets_sent, retransmits: st.retransmits, timeouts: st.timeouts, backpressure: self.backpressure, repairs: 0 };
        let report = now.since(&self.reported);
        self.reported = now;
        report
    }
}

impl Leased for Session {
    fn lease_id(&self) -> u64 {
        self.id
    }
    fn pacing(&self) -> &Addr<Pacing> {
        &self.pacing
    }
    fn bucket(&mut self) -> &mut TokenBucket {
        &mut self.bucket
    }
    fn report(&mut self) -> Report {
        Session::report(self)
    }
    fn flush(&mut self, ctx: &mut Context<Self>) {
        Session::flush(self, ctx)
    }
    fn rearm(&mut self, ctx: &mut Context<Self>) {
        Session::rearm(self, ctx)
    }
}

impl AsMut<Timer> for Session {
    fn as_mut(&mut self) -> &mut Timer {
        &mut self.timer
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let raw = self.raw.take().expect("socket");
        match raw.attach(ctx) {
            Ok(s) => {
                if s.is_shared() {
                    // The listener hands over datagrams with try_send: room for a burst of
                    // repeated ACKs so none is dropped while this arbiter is busy.
                    ctx.set_mailbox_capacity(64);
                }
                self.sock = Some(s)
            }
            Err(e) => {
                let _g = self.span.enter();
                warn!(error = %e, "cannot register transfer socket");
                ctx.stop();
                return;
            }
        }
        // The first lease decides whether block 1 may leave at full speed.
        lease::register(self, ctx);
        ctx.run_interval(self.lease_every, lease::renew);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        let span = self.span.clone();
        let _g = span.enter();
        let elapsed = self.started.elapsed();
        let stats = self.sender.stats();
        let bytes = self.sender.bytes_acked();
        let mbps = bytes as f64 * 8.0 / elapsed.as_secs_f64().max(1e-6) / 1e6;
        let ok = matches!(self.sender.outcome(), Some(Outcome::Complete));
        let metrics = crate::metrics::m();
        metrics.transfer_bytes.inc_by(bytes);
        metrics.retransmitted_bytes.inc_by(stats.retransmitted_bytes);
        match self.sender.outcome() {
            Some(Outcome::Complete) => {
                metrics.transfers_finished.inc();
            }
            Some(Outcome::TimedOut { .. }) => metrics.transfer_failed("timeout"),
            Some(Outcome::PeerError { .. }) => metrics.transfer_failed("client_error"),
            Some(Outcome::ProtocolViolation(_)) => metrics.transfer_failed("protocol_violation"),
            None => metrics.transfer_failed("aborted"),
        };
        match self.sender.outcome() {
            Some(Outcome::Complete) => info!(
                bytes,
                duration_ms = elapsed.as_millis() as u64,
                mbps = format!("{mbps:.1}"),
                retransmits = stats.retransmits,
                retransmitted_bytes = stats.retransmitted_bytes,
                packets = stats.packets_sent,
                "transfer complete"
            ),
            other => {
                let reason = match other {
                    Some(Outcome::TimedOut { retries }) => format!("timed out after {retries} retransmissions"),
                    Some(Outcome::PeerError { code, message }) => format!("client sent error {}: {message}", code.code()),
                    Some(Outcome::ProtocolViolation(why)) => format!("protocol violation: {why}"),
                    Some(Outcome::Complete) => unreachable!(),
                    None => "aborted".to_string(),
                };
                warn!(bytes, duration_ms = elapsed.as_millis() as u64, retransmits = stats.retransmits, reason, "transfer failed")
            }
        }
        lease::unregister(self);
        self.ended.do_send(SessionEnded { peer: self.peer, id: self.id, ok });
    }
}

impl StreamHandler<Datagram> for Session {
    fn handle(&mut self, d: Datagram, ctx: &mut Context<Self>) {
        if d.meta.from != self.peer {
            self.strangers.answer(self.sock.as_ref(), &d);
            return;
        }
        match packet::decode(&d.data) {
            Ok(p) => self.sender.handle(Instant::now(), &p),
            Err(_) => {
                // Garbage from our own peer: ignore it; the transfer recovers or times out.
                return;
            }
        }
        if self.sender.peer_answered() {
            if let Some(to) = self.answered.take() {
                to.do_send(SessionAnswered { id: self.id });
            }
        }
        self.flush(ctx);
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Single-port mode: the listener only routes the peer's own packets here.
impl Handler<Routed> for Session {
    type Result = ();
    fn handle(&mut self, m: Routed, ctx: &mut Context<Self>) {
        StreamHandler::handle(self, m.0, ctx);
    }
}

impl Handler<DumpState> for Session {
    type Result = ();
    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let _g = self.span.enter();
        let s = self.sender.stats();
        info!(
            target: "state",
            actor = "session",
            block = self.sender.acked_blocks(),
            blocks = self.sender.total_blocks(),
            window = self.sender.window(),
            timeout_ms = self.sender.timeout().as_millis() as u64,
            retransmits = s.retransmits,
            rate_bps = self.bucket.rate().map(|r| r * 8),
            unknown_tid_packets = self.strangers.packets,
            "state"
        );
    }
}

impl Handler<Abort> for Session {
    type Result = ();
    fn handle(&mut self, m: Abort, ctx: &mut Context<Self>) {
        if let Some(s) = &self.sock {
            let _ = s.send_bytes(&packet::error_packet(ErrorCode::NotDefined, m.reason), self.peer);
        }
        ctx.stop();
    }
}
