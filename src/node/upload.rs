//! upload: one actor per write request (WRQ).
//!
//! The listener checks the request ([`prepare`]: options, announced size, name, an existing
//! file) and starts an [`Upload`] on a session arbiter with its own transfer socket (the
//! server's TID) and the temporary file from [`crate::fs::upload_store`]. The actor drives the
//! sans-IO receiving machine ([`tftpcast_proto::upload::accept`]): datagrams and timer
//! expiries in, ACKs and file bytes out. It is the only actor on its transfer's packet path.
//!
//! File writes never run on the arbiter thread: received bytes are gathered into batches of
//! [`WRITE_BATCH`] and each batch is written by a task on tokio's blocking pool
//! (`spawn_blocking`), one batch at a time, the file handle moving into the task and back.
//! A write to the page cache is usually short, but under writeback pressure (or on a slow
//! or network filesystem) it can take long, and a session arbiter serves many transfers.
//! While a batch is being written the next one fills; when more than [`MAX_BUFFERED`] bytes
//! wait, ACKs are held back, so the client stops at the end of its window and memory stays
//! bounded. The final fsync and rename run on the blocking pool too, before the final ACK:
//! a client is told the upload succeeded only once the file is durable under its name.
//!
//! After the final ACK the actor lingers for a while ("dallies", RFC 1350) to acknowledge
//! the final block again if that ACK was lost; the listener is told at the commit, so a
//! lingering upload holds no admission slot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tftpcast_proto::packet::{ErrorCode, Mode};
use tftpcast_proto::upload::{self, Refusal, UploadConfig};
use tftpcast_proto::{Receiver, ReceiverOutcome};
use tracing::{info, warn, Span};

use crate::node::session::SessionEnded;
use crate::state::DumpState;
use crate::net::timer::Timer;
use crate::net::transport::{Endpoint, Routed, Strangers, Transport};
use crate::net::udp::Datagram;
use crate::fs::upload_store::{StoreConfig, TempFile, UploadRoot};

/// Received bytes gathered before a write is handed to the blocking pool.
const WRITE_BATCH: usize = 256 << 10;
/// Bytes waiting for the disk beyond which ACKs are held back.
const MAX_BUFFERED: usize = 8 << 20;
/// Longest linger after the final ACK.
const MAX_DALLY: Duration = Duration::from_secs(3);

/// Everything the listener needs to accept uploads; `None` in the listener when they are off.
#[derive(Debug)]
pub struct UploadPolicy {
    pub root: UploadRoot,
    pub store: StoreConfig,
    /// Largest upload (None: no limit).
    pub max_bytes: Option<u64>,
}

/// A WRQ checked and its temporary file created: ready to start.
pub struct Prepared {
    pub file: TempFile,
}

/// The blocking part of accepting a WRQ: name, confinement, existing file, temporary file.
/// Run it on the blocking pool.
pub fn prepare(policy: &UploadPolicy, name: &[u8]) -> Result<Prepared, Refusal> {
    policy.root.create(&policy.store, name).map(|file| Prepared { file })
}

/// Everything an upload needs to start; built by the listener.
pub struct UploadSpec {
    pub id: u64,
    pub peer: SocketAddr,
    pub endpoint: Endpoint,
    pub cfg: UploadConfig,
    pub file: TempFile,
    pub overwrite: bool,
    pub span: Span,
    pub ended: Recipient<SessionEnded>,
}

pub struct Upload {
    id: u64,
    peer: SocketAddr,
    sock: Option<Transport>,
    raw: Option<Endpoint>,
    rx: Receiver,
    mode: Mode,
    /// `None` while a write or the commit has it.
    file: Option<TempFile>,
    overwrite: bool,
    /// Received bytes not yet handed to a write.
    buffered: Vec<u8>,
    /// A write or the commit is running on the blocking pool.
    busy: bool,
    /// The file is stored under its name.
    committed: bool,
    /// Why the upload failed on our side (write error, commit refused).
    local_error: Option<String>,
    dally: Duration,
    lingering: bool,
    /// The listener was told the upload ended (at the commit: a lingering upload holds no
    /// admission slot and does not delay shutdown).
    ended_sent: bool,
    span: Span,
    ended: Recipient<SessionEnded>,
    started: Instant,
    timer: Timer,
    /// Packets from other TIDs, and the budget for answering them.
    strangers: Strangers,
}

impl Upload {
    pub fn new(spec: UploadSpec) -> Self {
        let now = Instant::now();
        // Linger about one client timeout for a resent final block; at most a few seconds,
        // since the upload is already stored and a client that misses its final ACK only
        // reports an error about a file that arrived.
        let dally = spec.cfg.negotiated.timeout.clamp(Duration::from_millis(500), MAX_DALLY);
        let mode = spec.cfg.mode;
        Upload {
            id: spec.id,
            peer: spec.peer,
            sock: None,
            raw: Some(spec.endpoint),
            rx: upload::accept(now, spec.cfg),
            mode,
            file: Some(spec.file),
            overwrite: spec.overwrite,
            buffered: Vec::new(),
            busy: false,
            committed: false,
            local_error: None,
            dally,
            lingering: false,
            ended_sent: false,
            span: spec.span,
            ended: spec.ended,
            started: now,
            timer: Timer::default(),
            strangers: Strangers::new(now),
        }
    }

    /// Moves file bytes to the disk, datagrams to the socket, and decides what comes next.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        while let Some(chunk) = self.rx.take_data() {
            self.buffered.extend_from_slice(&chunk);
        }
        let finishing = self.rx.awaiting_commit();
        if !self.busy && self.file.is_some() && self.rx.outcome().is_none() {
            if self.buffered.len() >= WRITE_BATCH || (finishing && !self.buffered.is_empty()) {
                self.start_write(ctx);
            } else if finishing {
                self.start_commit(ctx);
            }
        }
        // Backpressure: the disk is behind; the client waits at the end of its window.
        let hold = self.busy && self.buffered.len() > MAX_BUFFERED && self.rx.outcome().is_none();
        if !hold {
            if let Some(sock) = &self.sock {
                while let Some(t) = self.rx.poll_transmit(Instant::now()) {
                    if let Err(e) = sock.send_bytes(&t.datagram.into_vec(), self.peer) {
                        let _g = self.span.enter();
                        warn!(error = %e, "send failed");
                    }
                }
            }
        }
        if let Some(outcome) = self.rx.outcome() {
            if !self.lingering {
                self.lingering = true;
                if matches!(outcome, ReceiverOutcome::Complete) {
                    ctx.run_later(self.dally, |_, ctx| ctx.stop());
                } else {
                    ctx.stop();
                }
            }
            return;
        }
        if let Some(want) = self.rx.poll_timeout() {
            self.timer.arm(ctx, want, |act, ctx| {
                act.rx.handle_timeout(Instant::now());
                act.drive(ctx);
            });
        }
    }

    fn start_write(&mut self, ctx: &mut Context<Self>) {
        let mut file = self.file.take().expect("file present");
        let batch = std::mem::take(&mut self.buffered);
        self.busy = true;
        let task = tokio::task::spawn_blocking(move || {
            let r = file.write(&batch);
            (file, r)
        });
        ctx.spawn(actix::fut::wrap_future(task).map(|res, act: &mut Upload, ctx| {
            act.busy = false;
            match res {
                Ok((file, Ok(()))) => act.file = Some(file),
                Ok((_, Err(r))) => act.fail(r.code, &r.message, format!("write failed: {}", r.message)),
                Err(e) => act.fail(ErrorCode::NotDefined, "Server error", format!("write task failed: {e}")),
            }
            act.drive(ctx);
        }));
    }

    fn start_commit(&mut self, ctx: &mut Context<Self>) {
        let file = self.file.take().expect("file present");
        let overwrite = self.overwrite;
        self.busy = true;
        let task = tokio::task::spawn_blocking(move || file.commit(overwrite));
        ctx.spawn(actix::fut::wrap_future(task).map(|res, act: &mut Upload, ctx| {
            act.busy = false;
            match res {
                Ok(Ok(bytes)) => {
                    act.committed = true;
                    act.rx.commit();
                    act.ended_sent = true;
                    act.ended.do_send(SessionEnded { peer: act.peer, id: act.id, ok: true });
                    let elapsed = act.started.elapsed();
                    let mbps = bytes as f64 * 8.0 / elapsed.as_secs_f64().max(1e-6) / 1e6;
                    let st = act.rx.stats();
                    let _g = act.span.enter();
                    info!(
                        bytes,
                        duration_ms = elapsed.as_millis() as u64,
                        mbps = format!("{mbps:.1}"),
                        blocks = st.blocks,
                        duplicates = st.duplicates,
                        retransmits = st.retransmits,
                        "upload finished"
                    );
                }
                Ok(Err(r)) => act.fail(r.code, &r.message, format!("cannot store the file: {}", r.message)),
                Err(e) => act.fail(ErrorCode::NotDefined, "Server error", format!("commit task failed: {e}")),
            }
            act.drive(ctx);
        }));
    }

    /// Ends the upload from our side: the client gets an ERROR, the temporary file goes.
    fn fail(&mut self, code: ErrorCode, message: &str, reason: String) {
        self.rx.abort(code, message);
        self.local_error = Some(reason);
        self.discard();
    }

    /// Removes the temporary file off the arbiter thread.
    fn discard(&mut self) {
        self.buffered = Vec::new();
        if let Some(f) = self.file.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => drop(h.spawn_blocking(move || drop(f))),
                // The arbiter is being torn down (shutdown): one unlink inline is fine.
                Err(_) => drop(f),
            }
        }
    }
}

impl AsMut<Timer> for Upload {
    fn as_mut(&mut self) -> &mut Timer {
        &mut self.timer
    }
}

impl Actor for Upload {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let raw = self.raw.take().expect("socket");
        match raw.attach(ctx) {
            Ok(s) => self.sock = Some(s),
            Err(e) => {
                self.fail(ErrorCode::NotDefined, "Server error", format!("cannot register transfer socket: {e}"));
                ctx.stop();
                return;
            }
        }
        self.drive(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Whatever was not committed is removed (a write still running drops its file, and
        // with it the temporary file, when it returns).
        self.discard();
        let span = self.span.clone();
        let _g = span.enter();
        let elapsed = self.started.elapsed();
        let bytes = self.rx.stats().bytes_delivered;
        let ok = self.committed;
        if !ok {
            let reason = match (&self.local_error, self.rx.outcome()) {
                (Some(r), _) => r.clone(),
                (None, Some(ReceiverOutcome::TimedOut { retries })) => format!("timed out after {retries} retransmissions"),
                (None, Some(ReceiverOutcome::PeerError { code, message })) => format!("client sent error {}: {message}", code.code()),
                (None, Some(ReceiverOutcome::Aborted { code, reason })) => format!("aborted with error {}: {reason}", code.code()),
                (None, _) => "aborted".to_string(),
            };
            warn!(bytes, duration_ms = elapsed.as_millis() as u64, reason, "upload failed");
        }
        if !self.ended_sent {
            self.ended.do_send(SessionEnded { peer: self.peer, id: self.id, ok });
        }
    }
}

/// Single-port mode: the listener only routes the peer's own packets here.
impl Handler<Routed> for Upload {
    type Result = ();
    fn handle(&mut self, m: Routed, ctx: &mut Context<Self>) {
        StreamHandler::handle(self, m.0, ctx);
    }
}

impl StreamHandler<Datagram> for Upload {
    fn handle(&mut self, d: Datagram, ctx: &mut Context<Self>) {
        if d.meta.from != self.peer {
            self.strangers.answer(self.sock.as_ref(), &d);
            return;
        }
        // Garbage from our own peer is ignored: the transfer recovers or times out.
        if self.rx.handle_datagram(Instant::now(), d.data).is_ok() {
            self.drive(ctx);
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<DumpState> for Upload {
    type Result = ();
    fn handle(&mut self, _: DumpState, _: &mut Context<Self>) {
        let _g = self.span.enter();
        let s = self.rx.stats();
        info!(
            target: "state",
            actor = "upload",
            block = self.rx.blocks_received(),
            bytes = s.bytes_delivered,
            buffered = self.buffered.len(),
            mode = self.mode.as_str(),
            duplicates = s.duplicates,
            retransmits = s.retransmits,
            unknown_tid_packets = self.strangers.packets,
            "state"
        );
    }
}

/// Shared by every listener of a node.
pub type SharedUploadPolicy = Arc<UploadPolicy>;
