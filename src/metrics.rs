//! metrics: node-wide counters and gauges in Prometheus text format at `/metrics`.
//!
//! Every figure is an atomic in one process-wide [`Metrics`] updated where its event happens
//! (the listener, a session's end, a group, pacing's lease rounds, membership changes), so no
//! message crosses actors for them and nothing is counted per packet. `serve` is a tiny
//! HTTP/1.0 responder on a tokio TCP listener: the crate has no server, and a scrape is one
//! GET.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info};

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Mutex<Registry>,
    /// Read requests by what became of them (admitted, not_found, denied, ...).
    requests: Family<Labels, Counter>,
    /// Admission decisions: admitted, deferred, admitted_after_defer, folded, refreshed,
    /// dropped_queue_full, dropped_expired.
    admission: Family<Labels, Counter>,
    pub admission_queue: Gauge<i64, AtomicI64>,
    transfers_started: Family<Labels, Counter>,
    pub transfers_finished: Counter,
    transfers_failed: Family<Labels, Counter>,
    /// File bytes the clients acknowledged, at each unicast transfer's end.
    pub transfer_bytes: Counter,
    /// Bytes on the wire (unicast and multicast, retransmissions included), from pacing reports.
    pub bytes_sent: Counter,
    pub retransmitted_bytes: Counter,
    pub policy_applied: Counter,
    pub sessions_active: Gauge<i64, AtomicI64>,
    pub groups_active: Gauge<i64, AtomicI64>,
    pub pacing_senders: Gauge<i64, AtomicI64>,
    pub pacing_rate_bps: Gauge<f64, AtomicU64>,
    pub pacing_lease_min_bps: Gauge<i64, AtomicI64>,
    pub pacing_lease_max_bps: Gauge<i64, AtomicI64>,
    pub cluster_members: Gauge<i64, AtomicI64>,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The node's metrics.
pub fn m() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("tftpcast")),
            requests: Family::default(),
            admission: Family::default(),
            admission_queue: Gauge::default(),
            transfers_started: Family::default(),
            transfers_finished: Counter::default(),
            transfers_failed: Family::default(),
            transfer_bytes: Counter::default(),
            bytes_sent: Counter::default(),
            retransmitted_bytes: Counter::default(),
            policy_applied: Counter::default(),
            sessions_active: Gauge::default(),
            groups_active: Gauge::default(),
            pacing_senders: Gauge::default(),
            pacing_rate_bps: Gauge::default(),
            pacing_lease_min_bps: Gauge::default(),
            pacing_lease_max_bps: Gauge::default(),
            cluster_members: Gauge::default(),
        };
        {
            let mut r = m.registry.lock().expect("metrics registry");
            r.register("requests", "Read requests by result", m.requests.clone());
            r.register("admission", "Admission control decisions by event", m.admission.clone());
            r.register("admission_queue", "Requests waiting in the defer queue", m.admission_queue.clone());
            r.register("transfers_started", "Transfers started, by kind (unicast, multicast join)", m.transfers_started.clone());
            r.register("transfers_finished", "Unicast transfers completed", m.transfers_finished.clone());
            r.register("transfers_failed", "Unicast transfers failed, by reason", m.transfers_failed.clone());
            r.register("transfer_bytes", "File bytes acknowledged by clients of unicast transfers (counted at each transfer's end)", m.transfer_bytes.clone());
            r.register("sent_bytes", "Bytes sent on the wire by transfers and groups, retransmissions included", m.bytes_sent.clone());
            r.register("retransmitted_bytes", "Bytes sent again", m.retransmitted_bytes.clone());
            r.register("policy_applied", "Requests a client option policy rule changed or denied", m.policy_applied.clone());
            r.register("sessions_active", "Unicast transfers running", m.sessions_active.clone());
            r.register("multicast_groups_active", "Multicast groups this node sends or relays", m.groups_active.clone());
            r.register("pacing_senders", "Transfers and groups holding a pacing lease", m.pacing_senders.clone());
            r.register("pacing_rate_bps", "Node-wide send rate over the last second, bit/s", m.pacing_rate_bps.clone());
            r.register("pacing_lease_min_bps", "Smallest rate lease granted, bit/s (0: none or unlimited)", m.pacing_lease_min_bps.clone());
            r.register("pacing_lease_max_bps", "Largest rate lease granted, bit/s (0: none or unlimited)", m.pacing_lease_max_bps.clone());
            r.register("cluster_members", "Live cluster members besides this node", m.cluster_members.clone());
        }
        m
    }

    pub fn request(&self, result: &'static str) {
        self.requests.get_or_create(&vec![("result", result)]).inc();
    }

    pub fn admission(&self, event: &'static str) {
        self.admission.get_or_create(&vec![("event", event)]).inc();
    }

    pub fn transfer_started(&self, kind: &'static str) {
        self.transfers_started.get_or_create(&vec![("kind", kind)]).inc();
    }

    pub fn transfer_failed(&self, reason: &'static str) {
        self.transfers_failed.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// The exposition in Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().expect("metrics registry");
        let _ = prometheus_text::encode(&mut out, &r);
        out
    }
}

/// Connections answered at once; further ones wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 16;
/// A connection that has not sent its request and read its answer by then is closed.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the process ends. Each connection is answered on
/// its own task, at most [`MAX_CONNECTIONS`] at once, so a silent or slow peer holds only its
/// own connection (for at most [`CONNECTION_TIMEOUT`]) and never delays another scrape.
pub async fn serve(listener: tokio::net::TcpListener) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics endpoint listening");
    }
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        actix_rt::spawn(async move {
            if tokio::time::timeout(CONNECTION_TIMEOUT, answer(conn)).await.is_err() {
                debug!(peer = %peer, "metrics client too slow");
            }
            drop(permit);
        });
    }
}

/// Reads one HTTP request (the request line is all that matters; headers up to a small cap)
/// and writes the answer.
async fn answer(mut conn: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && !buf[..n].windows(2).any(|w| w == b"\n\n") {
        match conn.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let line = buf[..n].split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") | ("HEAD", "/metrics") => ("200 OK", prometheus_text::CONTENT_TYPE, m().render()),
        ("GET", _) | ("HEAD", _) => ("404 Not Found", "text/plain", "not found: try /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_string()),
    };
    let head = format!("HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = conn.write_all(head.as_bytes()).await;
    if method != "HEAD" {
        let _ = conn.write_all(body.as_bytes()).await;
    }
    let _ = conn.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_the_counters() {
        m().request("test_only");
        m().admission("deferred");
        let t = m().render();
        assert!(t.contains("tftpcast_requests_total{result=\"test_only\"} 1"), "{t}");
        assert!(t.contains("# TYPE tftpcast_sessions_active gauge"), "{t}");
    }
}
