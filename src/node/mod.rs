//! node: builds the actors of one tftpcast node and runs them until a signal ends it
//! ([`run`]), or until a future the caller holds completes ([`run_until`], for tests and
//! embedding).
//!
//! Start-up order: file cache and pacing first, then one listener per address. SIGUSR1 and
//! the `log.state_interval_s` timer make every actor log its `state` event. SIGINT/SIGTERM
//! close the listening sockets, wait up to `server.shutdown_grace_s` for running transfers,
//! then stop the system.

pub mod admission;
pub mod fd_limit;
pub mod listener;
pub mod session;
pub mod systemd;
pub mod upload;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tftpcast_proto::options::Limits as NegotiationLimits;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, Notify};
use tracing::{error, info, warn};

use crate::config::Validated;
use crate::cluster::coordinator::{ClusterLink, Coordinator, MulticastPolicy, OwnedGroups};
use crate::cluster::membership::{Leave, Membership, MembershipConfig};
use crate::fs::file_cache::{FileCache, FileCacheConfig};
use crate::node::admission::{Admission, AdmissionConfig};
use crate::node::listener::{ActiveSessions, Listener, RequestPolicy, StopAccepting};
use crate::flow::pacing::{Pacing, PacingPolicy, Subscribe};
use crate::state::DumpState;

/// The sockets the service manager passed (socket activation), else those of
/// `server.listen`, bound now.
fn listening_sockets(v: &Validated) -> Result<Vec<std::net::UdpSocket>, String> {
    let passed = systemd::listen_sockets()?;
    if passed.is_empty() {
        bind_all(&v.listen)
    } else {
        Ok(passed)
    }
}

/// Binds every listening socket. A dual-stack wildcard on a host without IPv6 falls back to
/// the IPv4 wildcard.
fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<std::net::UdpSocket>, String> {
    let mut out = Vec::new();
    for a in addrs {
        match crate::net::bind_listener(*a, false) {
            Ok(s) => out.push(s),
            Err(e) if a.is_ipv6() && a.ip().is_unspecified() => {
                let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), a.port());
                warn!(addr = %a, error = %e, fallback = %v4, "no IPv6: listening on IPv4 only");
                out.push(crate::net::bind_listener(v4, false).map_err(|e| format!("cannot listen on {v4}: {e}"))?);
            }
            Err(e) => return Err(format!("cannot listen on {a}: {e}")),
        }
    }
    Ok(out)
}

/// The upload settings, with the root opened for writing; `None` when uploads are off.
fn upload_policy(v: &Validated) -> Result<Option<crate::node::upload::SharedUploadPolicy>, String> {
    let u = &v.settings.uploads;
    if !u.enabled {
        return Ok(None);
    }
    let root = crate::fs::upload_store::UploadRoot::open(&v.settings.server.root)
        .map_err(|e| format!("cannot open {} for uploads: {e}", v.settings.server.root.display()))?;
    // Temporary files a crashed or killed run left behind: in the upload directory only.
    match root.remove_stale_temps(&v.upload_dir, crate::fs::upload_store::STALE_SCAN_LIMIT) {
        Ok(removed) if !removed.is_empty() => info!(dir = %v.upload_dir, count = removed.len(), first = ?&removed[..removed.len().min(10)], "removed stale upload temporary files"),
        Ok(_) => {}
        Err(e) => warn!(dir = %v.upload_dir, error = %e, "cannot scan the upload directory for stale temporary files"),
    }
    let store = crate::fs::upload_store::StoreConfig { overwrite: u.overwrite, dir: v.upload_dir.clone(), file_mode: u.file_mode };
    info!(overwrite = u.overwrite, dir = %v.upload_dir, max_bytes = u.max_bytes, file_mode = format!("{:#o}", u.file_mode), "uploads enabled");
    Ok(Some(std::sync::Arc::new(crate::node::upload::UploadPolicy { root, store, max_bytes: (u.max_bytes > 0).then_some(u.max_bytes) })))
}

/// Runs a node in this process until SIGINT/SIGTERM (a second one cuts the drain short);
/// SIGUSR1 makes every actor log its state. Returns the process exit code.
pub fn run(v: Validated) -> u8 {
    let sys = actix::System::new();
    let code = sys.block_on(async move {
        let (Ok(mut term), Ok(mut int), Ok(mut usr1)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::user_defined1()))
        else {
            error!("cannot install signal handlers");
            return 1;
        };
        let (stop, hurry) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (dump_tx, dumps) = mpsc::channel(4);
        let (s, h) = (stop.clone(), hurry.clone());
        actix_rt::spawn(async move {
            let mut signalled = false;
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                    _ = usr1.recv() => { let _ = dump_tx.try_send(()); continue; }
                };
                if signalled {
                    h.notify_one();
                } else {
                    info!(signal = name, "shutting down");
                    signalled = true;
                    s.notify_one();
                }
            }
        });
        run_until(v, async move { stop.notified().await }, async move { hurry.notified().await }, dumps).await
    });
    if code != 0 {
        // A node that failed to start (a port in use, say) has actors running already; actix
        // timers dropped with the runtime outside its context panic, so leave at once with
        // the error already logged.
        std::process::exit(code.into());
    }
    code
}

/// How often `STATUS=` is sent to the service manager.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Runs a node until `shutdown` completes (inside an actix system: the process's, or a
/// test's), then drains it: running transfers get up to `server.shutdown_grace_s`, or until
/// `hurry` completes. Each message on `dumps`, and every `log.state_interval_s`, makes every
/// actor log its state. Returns the exit code: 0, or that of a failed start (logged).
pub async fn run_until(v: Validated, shutdown: impl Future<Output = ()>, hurry: impl Future<Output = ()>, mut dumps: mpsc::Receiver<()>) -> u8 {
    let node = match Node::start(&v).await {
        Ok(n) => n,
        Err(code) => return code,
    };
    let interval = v.settings.log.state_interval_s;
    let mut tick = tokio::time::interval(Duration::from_secs(interval.max(1)));
    tick.tick().await;
    // The service manager shows STATUS= in `systemctl status`: refreshed every few seconds.
    let notifying = std::env::var_os("NOTIFY_SOCKET").is_some();
    let mut status = tokio::time::interval(STATUS_INTERVAL);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = dumps.recv() => node.dump_state(),
            _ = tick.tick(), if interval > 0 => node.dump_state(),
            _ = status.tick(), if notifying => node.notify_status().await,
        }
    }
    node.stop(hurry).await;
    0
}

/// The actors of a running node.
pub struct Node {
    files: Addr<FileCache>,
    pacing: Addr<Pacing>,
    coordinator: Option<Addr<Coordinator>>,
    membership: Option<Addr<Membership>>,
    listeners: Vec<Addr<Listener>>,
    arbiters: Vec<Arbiter>,
    grace: Duration,
}

impl Node {
    /// Starts every actor: file cache and pacing first, the coordinator (and membership),
    /// then one listener per address. A failure is logged; the error is the exit code.
    pub async fn start(v: &Validated) -> Result<Node, u8> {
        let s = &v.settings;
        fd_limit::raise(s.limits.max_sessions);
        let files = start_files(v)?;
        let pacing = start_pacing(v, &files);
        let sockets = listening_sockets(v).map_err(|e| {
            error!("{e}");
            1u8
        })?;
        if s.server.single_port && s.multicast.enabled {
            // Groups send their DATA from the listening socket too (RFC 2090 clients accept
            // DATA only from the address and port of their OACK).
            for sock in &sockets {
                crate::net::prepare_multicast_sender(sock, v.multicast_interface, s.multicast.ttl).map_err(|e| {
                    error!(error = %e, "cannot set up multicast on the listening socket");
                    1u8
                })?;
            }
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let arbiters: Vec<Arbiter> = (0..cores).map(|_| Arbiter::new()).collect();
        let handles: Vec<ArbiterHandle> = arbiters.iter().map(|a| a.handle()).collect();
        let policy = request_policy(v, cores);
        if !v.policy.is_empty() {
            info!(rules = v.policy.len(), "client option policy loaded");
        }
        start_metrics(v).await?;
        let (coordinator, membership) = start_coordinator(v, &pacing, &files, &handles)?;
        let uploads = upload_policy(v).map_err(|e| {
            error!("{e}");
            2u8
        })?;
        if let Some(run_as) = &v.run_as {
            systemd::drop_privileges(run_as).map_err(|e| {
                error!("{e}");
                1u8
            })?;
        }
        let admission = Admission::shared(admission_config(v));
        let mut listeners = Vec::new();
        for sock in sockets {
            let l = Listener::new(sock, policy.clone(), admission.clone(), files.clone(), pacing.clone(), coordinator.clone(), handles.clone()).map_err(|e| {
                error!(error = %e, "cannot start listener");
                1u8
            })?;
            let l = l.with_uploads(uploads.clone()).start();
            pacing.do_send(Subscribe(l.clone().recipient()));
            listeners.push(l);
        }
        info!(root = %s.server.root.display(), session_arbiters = cores, version = env!("CARGO_PKG_VERSION"), "tftpcast serving");
        systemd::notify("READY=1\nSTATUS=serving");
        Ok(Node { files, pacing, coordinator, membership, listeners, arbiters, grace: Duration::from_secs(s.server.shutdown_grace_s) })
    }

    /// Every actor logs its `state` event.
    pub fn dump_state(&self) {
        if let Some(c) = &self.coordinator {
            c.do_send(DumpState);
        }
        if let Some(m) = &self.membership {
            m.do_send(DumpState);
        }
        for l in &self.listeners {
            l.do_send(DumpState);
        }
        self.files.do_send(DumpState);
        self.pacing.do_send(DumpState);
    }

    /// Closes the listening sockets, waits for running transfers and the groups this node
    /// sends (up to the grace period, or until `hurry`), leaves the cluster and stops.
    pub async fn stop(self, hurry: impl Future<Output = ()>) {
        systemd::notify("STOPPING=1\nSTATUS=draining");
        for l in &self.listeners {
            l.do_send(StopAccepting);
        }
        let deadline = Instant::now() + self.grace;
        tokio::pin!(hurry);
        loop {
            let active = self.active().await;
            if active == 0 {
                info!("all transfers finished");
                break;
            }
            if Instant::now() >= deadline {
                warn!(active, grace_s = self.grace.as_secs(), "grace period over: exiting with transfers still running");
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = &mut hurry => { warn!(active, "second signal: exiting now"); break; }
            }
        }
        if let Some(m) = &self.membership {
            // Peers learn at once that this node is gone, instead of detecting a failure.
            let _ = m.send(Leave).await;
        }
        for a in self.arbiters {
            a.stop();
        }
    }

    /// Transfers still running, and multicast groups this node sends (in a cluster, peers
    /// take over what is left when this node leaves).
    async fn active(&self) -> usize {
        let (transfers, groups) = self.counts().await;
        transfers + groups
    }

    /// (transfers running, multicast groups this node sends).
    async fn counts(&self) -> (usize, usize) {
        let mut transfers = 0;
        for l in &self.listeners {
            transfers += l.send(ActiveSessions).await.unwrap_or(0);
        }
        let groups = match &self.coordinator {
            Some(c) => c.send(OwnedGroups).await.unwrap_or(0),
            None => 0,
        };
        (transfers, groups)
    }

    /// Tells the service manager how busy the node is.
    pub async fn notify_status(&self) {
        let (transfers, groups) = self.counts().await;
        systemd::notify(&format!("STATUS=serving: {transfers} transfers, {groups} multicast groups"));
    }
}

fn start_files(v: &Validated) -> Result<Addr<FileCache>, u8> {
    let s = &v.settings;
    let cfg = FileCacheConfig {
        root: s.server.root.clone(),
        max_bytes: s.files.cache_max_bytes,
        max_file_bytes: s.files.max_file_bytes,
        case_insensitive: s.mapping.case_insensitive,
    };
    match FileCache::new(cfg) {
        Ok(f) => Ok(f.start()),
        Err(e) => {
            error!(root = %s.server.root.display(), error = %e, "cannot serve the root directory");
            Err(2)
        }
    }
}

fn start_pacing(v: &Validated, files: &Addr<FileCache>) -> Addr<Pacing> {
    let p = &v.settings.pacing;
    let policy = PacingPolicy {
        node_cap_mbps: p.max_rate_mbps,
        session_cap_mbps: p.session_max_rate_mbps,
        adaptive: p.adaptive,
        floor_kbps: p.floor_kbps,
        ceiling_mbps: p.ceiling_mbps,
        increase_mbps: p.increase_mbps,
        decrease_pct: p.decrease_pct,
        loss_threshold_pct: p.loss_threshold_pct,
        cache_cap_bytes: v.settings.files.cache_max_bytes,
    };
    Pacing::new(policy, Some(files.clone())).start()
}

fn request_policy(v: &Validated, cores: usize) -> RequestPolicy {
    let s = &v.settings;
    RequestPolicy {
        negotiation: NegotiationLimits { max_blksize: s.transfer.max_blksize, max_windowsize: s.transfer.max_windowsize, default_timeout: s.transfer.timeout() },
        max_timeout: s.transfer.max_timeout(),
        min_timeout: Duration::from_millis(s.transfer.min_timeout_ms),
        load_knee: s.transfer.load_knee_per_core.saturating_mul(cores as u32),
        max_retries: s.transfer.max_retries,
        min_give_up: Duration::from_secs(s.transfer.min_give_up_s),
        tid_port_range: v.tid_port_range,
        single_port: s.server.single_port,
        lease_every: Duration::from_millis(s.pacing.lease_ms),
        mapper: Arc::new(v.mapper.clone()),
        rules: Arc::new(v.policy.clone()),
    }
}

fn admission_config(v: &Validated) -> AdmissionConfig {
    let l = &v.settings.limits;
    AdmissionConfig {
        max_sessions: l.max_sessions,
        // 0: no per-address limit (one address may be a whole lab behind a NAT).
        max_sessions_per_client: if l.max_sessions_per_client == 0 { usize::MAX } else { l.max_sessions_per_client },
        max_half_open_per_client: l.max_half_open_per_client,
        max_requests_per_s: l.max_requests_per_s,
        max_requests_per_s_per_client: l.max_requests_per_s_per_client,
        defer_queue: l.defer_queue,
        defer_max: Duration::from_millis(l.defer_max_ms),
    }
}

async fn start_metrics(v: &Validated) -> Result<(), u8> {
    let Some(a) = v.metrics_listen else { return Ok(()) };
    match tokio::net::TcpListener::bind(a).await {
        Ok(l) => {
            actix_rt::spawn(crate::metrics::serve(l));
            Ok(())
        }
        Err(e) => {
            error!("cannot serve metrics on {a}: {e}");
            Err(1)
        }
    }
}

fn multicast_policy(v: &Validated) -> MulticastPolicy {
    let (s, m) = (&v.settings, &v.settings.multicast);
    MulticastPolicy {
        pool_base: v.multicast_pool.0,
        pool_size: v.multicast_pool.1,
        port: m.port,
        tid_port_base: m.tid_port_base,
        interface: v.multicast_interface,
        ttl: m.ttl,
        start_delay: Duration::from_millis(m.start_delay_ms),
        start_min_clients: m.start_min_clients,
        window: m.window,
        timeout: s.transfer.timeout(),
        min_timeout: Duration::from_millis(s.transfer.min_timeout_ms),
        max_timeout: s.transfer.max_timeout(),
        master_retries: m.master_retries,
        give_up_after: Duration::from_secs(s.transfer.min_give_up_s),
        slow_master_repairs: m.slow_master_repairs,
        lone_member_unicast: m.lone_member_unicast,
        probe_blocks: m.probe_blocks,
        rate: tftpcast_proto::multicast::RateConfig {
            enabled: m.rate_control,
            floor: m.rate_floor_kbps * 1000 / 8,
            loss_threshold_pct: m.rate_loss_threshold_pct,
            decrease_pct: m.rate_decrease_pct,
        },
        lease_every: Duration::from_millis(s.pacing.lease_ms),
        single_port: s.server.single_port,
    }
}

/// The coordinator, with the cluster membership when a cluster is configured; none when
/// multicast is off.
type Coordination = (Option<Addr<Coordinator>>, Option<Addr<Membership>>);

fn start_coordinator(v: &Validated, pacing: &Addr<Pacing>, files: &Addr<FileCache>, handles: &[ArbiterHandle]) -> Result<Coordination, u8> {
    if !v.settings.multicast.enabled {
        if v.cluster.is_some() {
            warn!("cluster settings ignored: the cluster shares multicast groups and multicast.enabled is false");
        }
        return Ok((None, None));
    }
    let policy = multicast_policy(v);
    let (pacing, files, handles) = (pacing.clone(), files.clone(), handles.to_vec());
    let mut membership = None;
    let mut failed = None;
    let addr = Coordinator::create(|ctx| {
        let link = v.cluster.as_ref().and_then(|c| {
            let mut mc = MembershipConfig::new(c.node_id.clone(), c.listen, c.key.clone());
            mc.advertise = c.advertise;
            mc.seeds = c.peers.clone();
            match Membership::new(mc, ctx.address().recipient()) {
                Ok(mem) => {
                    info!(node = %c.node_id, listen = %mem.local_addr(), advertise = %mem.advertise(), peers = ?c.peers, "joining the cluster");
                    let mem = mem.start();
                    membership = Some(mem.clone());
                    Some(ClusterLink { node_id: c.node_id.clone(), out: mem.recipient() })
                }
                Err(e) => {
                    failed = Some(format!("cannot join the cluster on {}: {e}", c.listen));
                    None
                }
            }
        });
        Coordinator::new(policy, pacing, files, link, handles)
    });
    if let Some(e) = failed {
        error!("{e}");
        return Err(1);
    }
    Ok((Some(addr), membership))
}
