//! listener: one actor per listening address.
//!
//! It reads requests from the well-known port, answers the ones it must refuse with the
//! error the RFCs ask for, asks `file_cache` for the file, negotiates options and starts a
//! `session` on a session arbiter with a fresh transfer socket bound to the address the
//! request was sent to. Only requests ever get an answer on this port: DATA, ACK and OACK
//! sent here are dropped, since answering strays from spoofed sources would make the server
//! an amplifier.
//!
//! In single-port mode (`server.single_port`) no transfer socket is opened: the listener
//! demultiplexes by the client's address and port. A packet that is not a request goes to the
//! session of its sender (one mailbox hop), or, from a multicast member, to the coordinator,
//! which knows every group's members; from anyone else it is dropped without an answer.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tftpcast_proto::flow;
use tftpcast_proto::multicast;
use tftpcast_proto::options::{self, Limits as NegotiationLimits};
use tftpcast_proto::packet::{self, DecodeError, ErrorCode, Mode, Packet, Request};
use tftpcast_proto::{Sender, SenderConfig, Source};
use tracing::{debug, info, info_span, warn};

use crate::node::admission::{self, Admitted, Decision, SharedAdmission, Ticket};
use crate::cluster::coordinator::{Coordinator, GroupKey, MemberPacket, MulticastRequest, UseSocket};
use crate::fs::file_cache::{FileCache, FileError, FileReady, FileRequest};
use crate::metrics::m;
use crate::flow::pacing::{Advice, Pacing};
use crate::node::session::{Session, SessionAnswered, SessionEnded, SessionSpec};
use crate::state::DumpState;
use crate::net::transport::{Endpoint, Routed, SharedSend};
use crate::net::udp::{self, Datagram, DatagramStream, SharedSocket};
use crate::node::upload::{SharedUploadPolicy, Upload, UploadSpec};

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// Retransmissions of a transfer's first packet while the client has acknowledged nothing.
/// A request may come from a spoofed source or be a stale duplicate of a finished transfer;
/// either way the server sends at most 1 + 2 packets for it (anti-amplification; tftpd-hpa
/// sends 5). The first retransmission comes after the transfer's starting timeout
/// (`transfer.timeout_ms`, 1 s by default, or the client's RFC 2349 timeout), the second 2 s
/// later: a client that lost the first DATA or OACK starts after a second, well before its
/// own request timer (several seconds for tftp-hpa, atftp and PXE ROMs) would fire, and a
/// path with a long round trip still gets no spurious duplicate.
const INITIAL_RETRIES: u32 = 2;

/// Settings the listener applies to every request.
#[derive(Debug, Clone)]
pub struct RequestPolicy {
    pub negotiation: NegotiationLimits,
    pub max_timeout: Duration,
    pub min_timeout: Duration,
    /// Active transfers on the node beyond which the timer floor grows.
    pub load_knee: u32,
    pub max_retries: u32,
    /// A read transfer whose client answered at least once is abandoned only this long after
    /// its last progress, even when `max_retries` ran out earlier (`transfer.min_give_up_s`).
    pub min_give_up: Duration,
    pub tid_port_range: Option<(u16, u16)>,
    /// Serve every transfer from the listening port (see the module doc).
    pub single_port: bool,
    pub lease_every: Duration,
    /// `[mapping]`: client names to paths under the root.
    pub mapper: std::sync::Arc<crate::fs::mapping::Mapper>,
    /// Client option rules (`[[policy]]`).
    pub rules: Arc<crate::config::policy::Policy>,
}

/// Stop reading requests (shutdown); active transfers go on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAccepting;

/// How many transfers this listener has running.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ActiveSessions;

#[derive(Default, Debug, Clone, Copy)]
struct Counters {
    requests: u64,
    started: u64,
    duplicates: u64,
    not_found: u64,
    denied: u64,
    malformed: u64,
    option_refused: u64,
    write_refused: u64,
    busy: u64,
    strays: u64,
    /// Single-port mode: datagrams handed to sessions, and those dropped on a full mailbox.
    routed: u64,
    routed_drops: u64,
    multicast_joins: u64,
    multicast_fallbacks: u64,
    completed: u64,
    failed: u64,
}

pub struct Listener {
    raw: Option<UdpSocket>,
    sock: Option<SharedSocket>,
    /// Single-port mode: the listening socket as the sessions send on it.
    shared: Option<SharedSend>,
    /// False after StopAccepting; in single-port mode the socket stays open for the
    /// transfers still running.
    accepting: bool,
    addr: SocketAddr,
    stream: Option<SpawnHandle>,
    policy: RequestPolicy,
    admission: SharedAdmission,
    files: Addr<FileCache>,
    pacing: Addr<Pacing>,
    /// None when multicast is disabled.
    coordinator: Option<Addr<Coordinator>>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    sessions: HashMap<SocketAddr, (u64, Addr<Session>)>,
    /// Running uploads (write requests); `None` policy: uploads are off.
    uploads: HashMap<SocketAddr, (u64, Addr<Upload>)>,
    upload_policy: Option<SharedUploadPolicy>,
    pending: HashSet<SocketAddr>,
    /// The admission slot of every running session and upload, by session id.
    slots: HashMap<u64, u64>,
    counters: Counters,
    last_dump: (Instant, u64),
    advice: Advice,
}

impl Listener {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        socket: UdpSocket,
        policy: RequestPolicy,
        admission: SharedAdmission,
        files: Addr<FileCache>,
        pacing: Addr<Pacing>,
        coordinator: Option<Addr<Coordinator>>,
        arbiters: Vec<ArbiterHandle>,
    ) -> std::io::Result<Self> {
        let addr = socket.local_addr()?;
        Ok(Listener {
            raw: Some(socket),
            sock: None,
            shared: None,
            accepting: true,
            addr,
            stream: None,
            policy,
            admission,
            files,
            pacing,
            coordinator,
            arbiters,
            next_arbiter: 0,
            sessions: HashMap::new(),
            uploads: HashMap::new(),
            upload_policy: None,
            pending: HashSet::new(),
            slots: HashMap::new(),
            counters: Counters::default(),
            last_dump: (Instant::now(), 0),
            advice: Advice::default(),
        })
    }

    /// Accepts write requests under `policy` (they are refused without it).
    pub fn with_uploads(mut self, policy: Option<SharedUploadPolicy>) -> Self {
        self.upload_policy = policy;
        self
    }

    /// Answers a request with an ERROR from the address it was sent to. Codes 1-7 go out
    /// with RFC 1350's text (see `packet::error_packet`): `msg` is logged.
    fn reply_error(&self, d: &Datagram, code: ErrorCode, msg: &str) {
        debug!(peer = %d.meta.from, code = code.code(), detail = msg, "request answered with an error");
        if let Some(s) = &self.sock {
            let pkt = packet::error_packet(code, msg);
            if let Err(e) = crate::net::send_from(s.get_ref(), &pkt, d.meta.from, d.meta.dst, self.addr.is_ipv6()) {
                debug!(peer = %d.meta.from, error = %e, "cannot send error reply");
            }
        }
    }

    /// Single-port mode: hands a packet that is not a request to whoever it belongs to.
    /// Returns the datagram back when it is a request (or garbage) for the usual path.
    fn route(&mut self, d: Datagram) -> Option<Datagram> {
        let opcode = match d.data.get(..2) {
            Some(&[0, op]) => op,
            _ => 0,
        };
        if opcode == 1 || opcode == 2 {
            return Some(d);
        }
        if let Some((_, s)) = self.sessions.get(&d.meta.from) {
            self.counters.routed += 1;
            if s.try_send(Routed(d)).is_err() {
                self.counters.routed_drops += 1;
            }
            return None;
        }
        if let Some((_, u)) = self.uploads.get(&d.meta.from) {
            self.counters.routed += 1;
            if u.try_send(Routed(d)).is_err() {
                self.counters.routed_drops += 1;
            }
            return None;
        }
        if !(3..=6).contains(&opcode) {
            return Some(d);
        }
        match &self.coordinator {
            // Members of multicast groups: the coordinator knows them (and drops strays).
            Some(c) => {
                self.counters.routed += 1;
                if c.try_send(MemberPacket { client: d.meta.from, packet: d.data }).is_err() {
                    self.counters.routed_drops += 1;
                }
            }
            // A stranger's DATA/ACK/ERROR/OACK: no answer (anti-amplification).
            None => self.counters.strays += 1,
        }
        None
    }

    fn on_datagram(&mut self, d: Datagram, ctx: &mut Context<Self>) {
        let d = if self.shared.is_some() {
            match self.route(d) {
                Some(d) => d,
                None => return,
            }
        } else {
            d
        };
        if !self.accepting {
            return;
        }
        match packet::decode(&d.data) {
            Ok(Packet::Rrq(req)) => self.on_read_request(d, req, None, ctx),
            Ok(Packet::Wrq(req)) if self.upload_policy.is_some() => self.on_write_request(d, req, None, ctx),
            Ok(Packet::Wrq(req)) => {
                self.counters.requests += 1;
                self.counters.write_refused += 1;
                m().request("write_refused");
                info!(peer = %d.meta.from, file = %req.filename_lossy(), "write request refused: server is read-only");
                self.reply_error(&d, ErrorCode::AccessViolation, "Server is read-only");
            }
            Ok(_) => self.counters.strays += 1,
            Err(e) => self.on_undecodable(&d, e),
        }
    }

    /// A datagram that does not decode. Requests that cannot be parsed and unknown opcodes
    /// are illegal operations (RFC 1350); anything else is dropped. The reply is short: a
    /// 2-byte `00 01` from a spoofed source buys the 27-byte ERROR 4 with RFC 1350's text
    /// (that text is what clients and scripts match on); the reason goes to the log. A
    /// request whose options do not fit the request limit is refused as a negotiation
    /// (RFC 2347, error 8), not as a malformed packet.
    fn on_undecodable(&mut self, d: &Datagram, e: DecodeError) {
        if e == DecodeError::OptionsTooLong {
            self.counters.requests += 1;
            self.counters.option_refused += 1;
            m().request("options_refused");
            info!(peer = %d.meta.from, error = %e, "options refused");
            self.reply_error(d, ErrorCode::OptionRefused, "Too many options");
            return;
        }
        self.counters.malformed += 1;
        m().request("malformed");
        let is_request = matches!(d.data.get(..2), Some([0, 1]) | Some([0, 2]));
        if is_request || matches!(e, DecodeError::UnknownOpcode(_)) {
            debug!(peer = %d.meta.from, error = %e, "malformed packet");
            self.reply_error(d, ErrorCode::IllegalOperation, "Illegal TFTP operation");
        }
    }

    /// What read and write requests share before their own handling: counting, duplicates
    /// (a repeated request of a running or queued transfer), mail mode and option parsing.
    /// `fresh`: a new datagram, not one admitted from the defer queue. None: answered or
    /// dropped here.
    fn check_request(&mut self, d: &Datagram, req: &Request, fresh: bool) -> Option<options::Requested> {
        let peer = d.meta.from;
        if fresh {
            self.counters.requests += 1;
        }
        if self.sessions.contains_key(&peer) || self.uploads.contains_key(&peer) || self.pending.contains(&peer) || (fresh && admission::refresh(&self.admission, d)) {
            // The client repeated its request because our first answer was lost or slow:
            // the transfer's own timer retransmits, so a second transfer must not start (a
            // queued request keeps its place).
            self.counters.duplicates += 1;
            m().request("duplicate");
            return None;
        }
        if req.mode == Mode::Mail {
            self.counters.malformed += 1;
            m().request("malformed");
            self.reply_error(d, ErrorCode::IllegalOperation, "Mail mode is not supported");
            return None;
        }
        match options::parse(&req.options) {
            Ok(r) => Some(r),
            Err(e) => {
                self.counters.option_refused += 1;
                m().request("options_refused");
                info!(peer = %peer, file = %req.filename_lossy(), error = %e, "options refused");
                self.reply_error(d, ErrorCode::OptionRefused, &e.to_string());
                None
            }
        }
    }

    /// A read request, new (`ticket` None) or deferred and now admitted (`ticket` holds its
    /// session slot).
    fn on_read_request(&mut self, d: Datagram, req: Request, ticket: Option<Ticket>, ctx: &mut Context<Self>) {
        let peer = d.meta.from;
        let Some(mut requested) = self.check_request(&d, &req, ticket.is_none()) else { return };
        let Some((ticket, applied)) = self.admit(&d, &req, &mut requested, ticket, ctx) else { return };
        let names = match self.policy.mapper.map_request(&req.filename, peer) {
            Ok(n) => n,
            Err(e) => {
                self.counters.denied += 1;
                self.reply_error(&d, ErrorCode::AccessViolation, &e.to_string());
                return;
            }
        };
        self.pending.insert(peer);
        first_found(self.files.clone(), names)
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.pending.remove(&peer);
                match res {
                    Ok(Ok(ready)) => {
                        if let Some(a) = applied {
                            info!(peer = %peer, file = %ready.key.path, rule = %a.rule, changes = %a.summary(), "client option policy applied");
                        }
                        if requested.multicast && act.coordinator.is_some() {
                            act.join_group(d, req, requested, ready, ticket, ctx)
                        } else {
                            act.start_session(d, req, requested, ready, ticket, ctx)
                        }
                    }
                    Ok(Err(e)) => {
                        match e {
                            FileError::NotFound | FileError::NotRegular => {
                                act.counters.not_found += 1;
                                m().request("not_found");
                            }
                            _ => {
                                act.counters.denied += 1;
                                m().request("denied");
                            }
                        }
                        info!(peer = %peer, file = %req.filename_lossy(), error = %e, "request refused");
                        act.reply_error(&d, e.error_code(), &e.to_string());
                    }
                    Err(e) => {
                        m().request("server_error");
                        warn!(peer = %peer, error = %e, "file cache unavailable");
                        act.reply_error(&d, ErrorCode::NotDefined, "Server error");
                    }
                }
            })
            .spawn(ctx);
    }

    /// A write request with uploads on: options and announced size checked here, name and
    /// file on the blocking pool (`upload::prepare`), then an `Upload` actor on a session
    /// arbiter with its own transfer socket.
    fn on_write_request(&mut self, d: Datagram, req: Request, ticket: Option<Ticket>, ctx: &mut Context<Self>) {
        let peer = d.meta.from;
        let Some(mut requested) = self.check_request(&d, &req, ticket.is_none()) else { return };
        // Uploads go through the same client option policy and admission control as reads;
        // a WRQ has no multicast.
        requested.multicast = false;
        let Some((Some(ticket), applied)) = self.admit(&d, &req, &mut requested, ticket, ctx) else { return };
        if let Some(a) = applied {
            info!(peer = %peer, file = %req.filename_lossy(), rule = %a.rule, changes = %a.summary(), "client option policy applied");
        }
        let policy = self.upload_policy.clone().expect("uploads on");
        let local = d.meta.dst.unwrap_or(self.addr.ip());
        let mut n = options::negotiate(&requested, &self.policy.negotiation, None, true);
        self.adapt_blksize(&mut n, local, peer);
        if let Err(r) = tftpcast_proto::upload::check_size(&n, policy.max_bytes) {
            self.counters.write_refused += 1;
            info!(peer = %peer, file = %req.filename_lossy(), tsize = n.tsize, error = %r, "upload refused");
            self.reply_error(&d, r.code, &r.message);
            return;
        }
        // The same name mapping as reads (backslashes, rewrite rules), so a device that reads
        // `cfg\x` also writes it where it will be read back.
        // Of the names a per-client rule offers, an upload takes the first (the client's own).
        let name = match self.policy.mapper.map_request(&req.filename, peer) {
            Ok(mut n) => n.swap_remove(0),
            Err(e) => {
                self.counters.write_refused += 1;
                self.reply_error(&d, ErrorCode::AccessViolation, &e.to_string());
                return;
            }
        };
        self.pending.insert(peer);
        let p = policy.clone();
        let task = tokio::task::spawn_blocking(move || crate::node::upload::prepare(&p, &name));
        actix::fut::wrap_future::<_, Self>(task)
            .map(move |res, act, ctx| {
                act.pending.remove(&peer);
                let prepared = match res {
                    Ok(Ok(p)) => p,
                    Ok(Err(r)) => {
                        act.counters.write_refused += 1;
                        info!(peer = %peer, file = %req.filename_lossy(), code = r.code.code(), error = %r, "upload refused");
                        return act.reply_error(&d, r.code, &r.message);
                    }
                    Err(e) => {
                        warn!(peer = %peer, error = %e, "upload preparation failed");
                        return act.reply_error(&d, ErrorCode::NotDefined, "Server error");
                    }
                };
                let Some(endpoint) = act.endpoint(&d, local) else { return };
                let tid = endpoint.port();
                let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
                let span = info_span!(
                    "upload",
                    peer = %peer,
                    file = %prepared.file.rel(),
                    tid,
                    mode = req.mode.as_str(),
                    blksize = n.blksize,
                    windowsize = n.windowsize,
                    group = tracing::field::Empty,
                );
                span.in_scope(|| {
                    info!(tsize = n.tsize, options = ?requested.names, oack = !n.oack.is_empty(), timeout_ms = n.timeout.as_millis() as u64, overwrite = policy.store.overwrite, "upload started")
                });
                let cfg = tftpcast_proto::upload::UploadConfig::from_negotiated(&n, req.mode, act.policy.max_timeout, act.policy.max_retries, INITIAL_RETRIES, policy.max_bytes);
                let spec = UploadSpec { id, peer, endpoint, cfg, file: prepared.file, overwrite: policy.store.overwrite, span, ended: ctx.address().recipient() };
                let addr = Upload::start_in_arbiter(&act.pick_arbiter(), move |_| Upload::new(spec));
                act.uploads.insert(peer, (id, addr));
                // Not a half-open read: the client answers with DATA (uploads are off unless
                // asked for).
                act.hold_slot(id, ticket, true);
                act.count_started("upload");
            })
            .spawn(ctx);
    }

    /// The hooks between parsing a request and serving it: the client option policy (which
    /// may change the options or deny the request) and admission control (which may defer or
    /// drop it). `ticket` is the slot of a request admitted from the defer queue. None: the
    /// request is done with (answered, queued or dropped).
    fn admit(&mut self, d: &Datagram, req: &Request, requested: &mut options::Requested, ticket: Option<Ticket>, ctx: &mut Context<Self>) -> Option<(Option<Ticket>, Option<crate::config::policy::Applied>)> {
        let peer = d.meta.from;
        let applied = if self.policy.rules.is_empty() { None } else { self.policy.rules.apply(peer.ip(), &req.filename_lossy(), requested) };
        if let Some(a) = applied.as_ref().filter(|a| a.deny) {
            self.counters.denied += 1;
            m().request("policy_denied");
            m().policy_applied.inc();
            info!(peer = %peer, file = %req.filename_lossy(), rule = %a.rule, "request denied by client option policy");
            self.reply_error(d, ErrorCode::AccessViolation, "Access denied by policy");
            return None;
        }
        let ticket = match ticket {
            Some(t) => Some(t),
            None => match admission::admit(&self.admission, d, &ctx.address().recipient(), requested.multicast && self.coordinator.is_some()) {
                Decision::Admit(t) => Some(t),
                Decision::Fold => None,
                Decision::Deferred | Decision::Dropped => {
                    self.counters.busy += 1;
                    return None;
                }
            },
        };
        if applied.is_some() {
            m().policy_applied.inc();
        }
        Some((ticket, applied))
    }

    /// Flow control at negotiation: the block size the conditions allow (path MTU, loss,
    /// memory), logged when it differs from what the client would otherwise get.
    fn adapt_blksize(&self, n: &mut options::Negotiated, local: IpAddr, peer: SocketAddr) {
        let c = flow::Conditions {
            mtu: crate::net::path_mtu(local, peer),
            ipv6: peer.is_ipv6(),
            loss_pct: self.advice.loss_pct,
            memory_pct: self.advice.memory_pct,
        };
        let (b, why) = flow::advise_blksize(n.blksize, self.policy.negotiation.max_blksize, &c);
        if b < n.blksize && n.oack.iter().any(|(k, _)| k == "blksize") {
            info!(peer = %peer, old = n.blksize, new = b, reason = why, mtu = c.mtu, loss_pct = c.loss_pct, memory_pct = c.memory_pct, "block size adapted");
            n.lower_blksize(b);
        }
    }

    /// The socket a new transfer sends from: the listening one in single-port mode, else a
    /// fresh one (None: there is none free, and the client was told).
    fn endpoint(&self, d: &Datagram, local: IpAddr) -> Option<Endpoint> {
        match &self.shared {
            Some(s) => Some(Endpoint::Shared(s.sending_from(local))),
            None => match crate::net::bind_transfer(local, self.policy.tid_port_range) {
                Ok(s) => Some(Endpoint::Own(s)),
                Err(e) => {
                    warn!(peer = %d.meta.from, error = %e, "cannot open a transfer socket");
                    self.reply_error(d, ErrorCode::NotDefined, "Server busy: no transfer port");
                    None
                }
            },
        }
    }

    /// Hands a ticket's admission slot to transfer `id` (released at its end); `answered`:
    /// its client has answered already.
    fn hold_slot(&mut self, id: u64, ticket: Ticket, answered: bool) {
        let slot = ticket.commit();
        if answered {
            admission::answered(&self.admission, slot);
        }
        self.slots.insert(id, slot);
    }

    /// The retransmission timer floor under the node's current load.
    fn timer_floor(&self) -> Duration {
        let active = admission::active(&self.admission) as u32;
        flow::timeout_floor(self.policy.min_timeout, active, self.policy.load_knee)
    }

    /// RFC 2090: hands the client to the coordinator, which joins it to the group already
    /// sending this file or starts one. Whatever cannot be multicast is served by unicast.
    fn join_group(&mut self, d: Datagram, req: Request, requested: options::Requested, ready: FileReady, ticket: Option<Ticket>, ctx: &mut Context<Self>) {
        let peer = d.meta.from;
        let local = d.meta.dst.unwrap_or(self.addr.ip());
        let data = match req.mode {
            Mode::Netascii => bytes::Bytes::from(tftpcast_proto::netascii::encode(&ready.data)),
            _ => ready.data.clone(),
        };
        let mut n = options::negotiate(&requested, &self.policy.negotiation, Some(data.len() as u64), false);
        self.adapt_blksize(&mut n, local, peer);
        let why_not = if !peer.is_ipv4() || !local.is_ipv4() {
            Some("multicast groups are IPv4 only")
        } else if !multicast::fits_without_rollover(data.len() as u64, n.blksize) {
            Some("file needs more than 65535 blocks at this block size")
        } else {
            None
        };
        if let Some(why) = why_not {
            self.counters.multicast_fallbacks += 1;
            info!(peer = %peer, file = %ready.key.path, blksize = n.blksize, reason = why, "multicast not possible: serving by unicast");
            return self.start_session(d, req, requested, ready, ticket, ctx);
        }
        // The group's window is the server's; a windowsize asked for does not apply to it.
        let options: Vec<(String, String)> = n.oack.iter().filter(|(k, _)| k != "windowsize").cloned().collect();
        let key = GroupKey { sha256: ready.key.sha256, size: data.len() as u64, blksize: n.blksize, netascii: req.mode == Mode::Netascii, path: ready.key.path.clone() };
        let coordinator = self.coordinator.clone().expect("multicast enabled");
        self.pending.insert(peer);
        coordinator
            .send(MulticastRequest { key, data, client: peer, local, options, join_only: ticket.is_none(), shared: self.shared.as_ref().map(|s| s.sending_from(local)) })
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.pending.remove(&peer);
                match res {
                    Ok(Ok(j)) => {
                        act.counters.multicast_joins += 1;
                        m().transfer_started("multicast_join");
                        info!(peer = %peer, file = %ready.key.path, group = %j.group, tid = %j.tid, new_group = j.new_group, owner = j.owner.as_deref().unwrap_or("self"), "multicast request joined group");
                    }
                    // Admitted at the session limit to join a running group, and there is none:
                    // it waits for a slot like any other request.
                    _ if ticket.is_none() => admission::requeue(&act.admission, d, &ctx.address().recipient()),
                    _ => {
                        act.counters.multicast_fallbacks += 1;
                        act.start_session(d, req, requested, ready, ticket, ctx);
                    }
                }
            })
            .spawn(ctx);
    }

    fn start_session(&mut self, d: Datagram, req: Request, requested: options::Requested, ready: FileReady, ticket: Option<Ticket>, ctx: &mut Context<Self>) {
        let Some(ticket) = ticket else { return admission::requeue(&self.admission, d, &ctx.address().recipient()) };
        let peer = d.meta.from;
        let source = match req.mode {
            Mode::Netascii => Source::netascii(ready.data.clone()),
            _ => Source::octet(ready.data.clone()),
        };
        let local = d.meta.dst.unwrap_or(self.addr.ip());
        let mut n = options::negotiate(&requested, &self.policy.negotiation, Some(source.wire_len()), false);
        self.adapt_blksize(&mut n, local, peer);
        let floor = self.timer_floor();
        let oack = (!n.oack.is_empty()).then(|| {
            let mut v = Vec::new();
            packet::encode_oack(&n.oack, &mut v);
            v
        });
        let cfg = SenderConfig {
            blksize: n.blksize,
            windowsize: n.windowsize,
            timeout: n.timeout,
            // A timeout the client chose (RFC 2349) is honoured as the longest the server
            // waits: below it the timer follows the measured round trip, so a lost packet on a
            // LAN costs a fraction of a second instead of the client's whole seconds.
            max_timeout: if n.timeout_negotiated { n.timeout } else { self.policy.max_timeout },
            max_retries: self.policy.max_retries,
            initial_retries: INITIAL_RETRIES,
            give_up_after: self.policy.min_give_up,
            adaptive: Some((floor.min(n.timeout), if n.timeout_negotiated { n.timeout } else { self.policy.max_timeout })),
        };
        let Some(endpoint) = self.endpoint(&d, local) else { return };
        let tid = endpoint.port();
        let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
        let span = info_span!(
            "transfer",
            peer = %peer,
            file = %ready.key.path,
            tid,
            mode = req.mode.as_str(),
            blksize = n.blksize,
            windowsize = n.windowsize,
            group = tracing::field::Empty,
        );
        span.in_scope(|| {
            info!(size = source.wire_len(), options = ?requested.names, oack = oack.is_some(), timeout_ms = n.timeout.as_millis() as u64, "transfer started")
        });
        let sender = Sender::new(Instant::now(), cfg, source, oack);
        let spec = SessionSpec {
            id,
            peer,
            endpoint,
            sender,
            span,
            pacing: self.pacing.clone(),
            ended: ctx.address().recipient(),
            answered: ctx.address().recipient(),
            lease_every: self.policy.lease_every,
        };
        let addr = Session::start_in_arbiter(&self.pick_arbiter(), move |_| Session::new(spec));
        self.sessions.insert(peer, (id, addr));
        self.hold_slot(id, ticket, false);
        self.count_started("unicast");
    }

    /// The session arbiter the next transfer runs on, round robin.
    fn pick_arbiter(&mut self) -> ArbiterHandle {
        let arbiter = self.arbiters[self.next_arbiter % self.arbiters.len()].clone();
        self.next_arbiter = self.next_arbiter.wrapping_add(1);
        arbiter
    }

    /// A transfer of `kind` started: metrics and the listener's own count.
    fn count_started(&mut self, kind: &'static str) {
        m().transfer_started(kind);
        m().sessions_active.inc();
        self.counters.started += 1;
    }
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let raw = self.raw.take().expect("socket");
        if self.policy.single_port {
            match raw.try_clone().and_then(SharedSend::new) {
                Ok(s) => {
                    if let Some(c) = &self.coordinator {
                        c.do_send(UseSocket(s.clone()));
                    }
                    self.shared = Some(s);
                }
                Err(e) => {
                    warn!(addr = %self.addr, error = %e, "cannot share the listening socket");
                    ctx.stop();
                    return;
                }
            }
        }
        match udp::register(raw) {
            Ok(s) => {
                self.stream = Some(ctx.add_stream(DatagramStream::new(s.clone(), packet::MAX_REQUEST, true)));
                self.sock = Some(s);
                info!(addr = %self.addr, single_port = self.policy.single_port, "listening");
                // Deferred requests start when tokens refill and expire when forgotten.
                ctx.run_interval(Duration::from_millis(25), |act, _| admission::pump(&act.admission));
            }
            Err(e) => {
                warn!(addr = %self.addr, error = %e, "cannot register listening socket");
                ctx.stop();
            }
        }
    }
}

impl StreamHandler<Datagram> for Listener {
    fn handle(&mut self, d: Datagram, ctx: &mut Context<Self>) {
        self.on_datagram(d, ctx);
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // The socket was closed: keep the actor so running transfers can still report back.
    }
}

impl Handler<SessionEnded> for Listener {
    type Result = ();
    fn handle(&mut self, m: SessionEnded, _: &mut Context<Self>) {
        let upload = matches!(self.uploads.get(&m.peer), Some((id, _)) if *id == m.id);
        if upload || matches!(self.sessions.get(&m.peer), Some((id, _)) if *id == m.id) {
            if upload {
                self.uploads.remove(&m.peer);
            } else {
                self.sessions.remove(&m.peer);
            }
            crate::metrics::m().sessions_active.dec();
            if let Some(slot) = self.slots.remove(&m.id) {
                admission::release(&self.admission, slot);
            }
        }
        if m.ok {
            self.counters.completed += 1;
        } else {
            self.counters.failed += 1;
        }
    }
}

impl Handler<SessionAnswered> for Listener {
    type Result = ();
    fn handle(&mut self, m: SessionAnswered, _: &mut Context<Self>) {
        if let Some(slot) = self.slots.get(&m.id) {
            admission::answered(&self.admission, *slot);
        }
    }
}

impl Handler<Admitted> for Listener {
    type Result = ();
    fn handle(&mut self, m: Admitted, ctx: &mut Context<Self>) {
        if self.sock.is_none() {
            return; // shutting down: the ticket gives the slot back
        }
        match packet::decode(&m.d.data) {
            Ok(Packet::Rrq(req)) => {
                debug!(peer = %m.d.meta.from, waited_ms = m.waited.as_millis() as u64, "deferred request admitted");
                self.on_read_request(m.d, req, Some(m.ticket), ctx);
            }
            Ok(Packet::Wrq(req)) if self.upload_policy.is_some() => {
                debug!(peer = %m.d.meta.from, waited_ms = m.waited.as_millis() as u64, "deferred write request admitted");
                self.on_write_request(m.d, req, Some(m.ticket), ctx);
            }
            _ => {}
        }
    }
}

impl Handler<Advice> for Listener {
    type Result = ();
    fn handle(&mut self, m: Advice, _: &mut Context<Self>) {
        self.advice = m;
    }
}

impl Handler<StopAccepting> for Listener {
    type Result = ();
    fn handle(&mut self, _: StopAccepting, ctx: &mut Context<Self>) {
        self.accepting = false;
        // In single-port mode the running transfers' packets still arrive here.
        if self.shared.is_none() {
            if let Some(h) = self.stream.take() {
                ctx.cancel_future(h);
            }
            self.sock = None;
        }
        info!(addr = %self.addr, active = self.sessions.len(), "stopped accepting requests");
    }
}

impl Handler<ActiveSessions> for Listener {
    type Result = usize;
    fn handle(&mut self, _: ActiveSessions, _: &mut Context<Self>) -> usize {
        self.sessions.len() + self.uploads.len() + self.pending.len()
    }
}

impl Handler<DumpState> for Listener {
    type Result = ();
    fn handle(&mut self, m: DumpState, _: &mut Context<Self>) {
        let now = Instant::now();
        let secs = now.duration_since(self.last_dump.0).as_secs_f64().max(1e-3);
        let rps = (self.counters.requests - self.last_dump.1) as f64 / secs;
        self.last_dump = (now, self.counters.requests);
        let c = self.counters;
        info!(
            target: "state",
            actor = "listener",
            addr = %self.addr,
            requests_per_s = format!("{rps:.1}"),
            requests = c.requests,
            started = c.started,
            completed = c.completed,
            failed = c.failed,
            active = self.sessions.len(),
            pending = self.pending.len(),
            duplicates = c.duplicates,
            rejects_not_found = c.not_found,
            rejects_denied = c.denied,
            rejects_malformed = c.malformed,
            rejects_options = c.option_refused,
            rejects_write = c.write_refused,
            rejects_busy = c.busy,
            deferred_queue = admission::queued(&self.admission),
            strays = c.strays,
            routed = c.routed,
            routed_drops = c.routed_drops,
            multicast_joins = c.multicast_joins,
            multicast_fallbacks = c.multicast_fallbacks,
            "state"
        );
        admission::log_state(&self.admission, self.addr);
        for (_, s) in self.sessions.values() {
            s.do_send(m);
        }
        for (_, u) in self.uploads.values() {
            u.do_send(m);
        }
    }
}

/// Asks the file cache for each name in turn (a per-client name first, then its fall-backs)
/// and answers with the first that exists, or with the last answer.
async fn first_found(files: Addr<FileCache>, names: Vec<Vec<u8>>) -> Result<Result<FileReady, FileError>, MailboxError> {
    let last = names.len().saturating_sub(1);
    for (i, name) in names.into_iter().enumerate() {
        match files.send(FileRequest { name }).await {
            Ok(Err(FileError::NotFound)) if i < last => continue,
            other => return other,
        }
    }
    Ok(Err(FileError::NotFound))
}
