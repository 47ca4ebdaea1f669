//! The Prometheus endpoint (`serve --metrics-listen`): scraped with curl after a known
//! workload, its counters must match what the clients did.

mod common;

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The address from the `metrics endpoint listening` log event.
fn metrics_addr(server: &Server) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for l in server.logs() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) else { continue };
            if v["fields"]["message"] == "metrics endpoint listening" {
                return v["fields"]["addr"].as_str().unwrap().parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "no `metrics endpoint listening` event\n{}", server.log_tail(20));
        thread::sleep(Duration::from_millis(50));
    }
}

/// `curl` the URL: (HTTP status, body).
fn curl(url: &str) -> (u32, String) {
    let r = run(Command::new(tool("curl")).args(["-sS", "-o", "-", "-w", "\n%{http_code}", url]), Duration::from_secs(10));
    assert!(r.success(), "curl {url}: {r}");
    let out = r.stdout.clone();
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

/// Samples of a Prometheus text exposition: `name{labels}` -> value.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn get(m: &HashMap<String, f64>, k: &str) -> f64 {
    m.get(k).copied().unwrap_or(0.0)
}

/// The server's arguments that turn the endpoint on, on a port the kernel picks.
const METRICS_ON: &[&str] = &["--metrics-listen", "127.0.0.1:0"];

/// Scrapes `url` until sample `k` reaches `at_least` or `within` has passed (counters are
/// reported when a transfer ends, a little after the client sees its end); the last scrape.
fn scrape_until(url: &str, k: &str, at_least: f64, within: Duration) -> HashMap<String, f64> {
    let deadline = Instant::now() + within;
    loop {
        let m = parse(&curl(url).1);
        if get(&m, k) >= at_least || Instant::now() > deadline {
            return m;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_match_a_known_workload() {
    let Some((fx, server)) = serve_if(testing_tftpcast() && require_tools(&["curl", "tftp"]), METRICS_ON) else { return };
    let maddr = metrics_addr(&server);
    let url = format!("http://{maddr}/metrics");

    let (code, body) = curl(&url);
    assert_eq!(code, 200, "{body}");
    let before = parse(&body);
    assert!(body.contains("# TYPE tftpcast_sessions_active gauge"), "{body}");
    assert_eq!(get(&before, "tftpcast_transfers_finished_total"), 0.0);

    // The workload: 5 successful gets by tftp-hpa, 2 requests for missing files.
    let size = fs::metadata(fx.path(ONE_MIB)).unwrap().len();
    for _ in 0..5 {
        fetch_and_check(&fx, &Client::hpa(), server.addr(), ONE_MIB, CLIENT_LIMIT);
    }
    for name in ["missing-1.bin", "missing-2.bin"] {
        let r = raw::get(server.addr(), name, "octet", &[], CLIENT_LIMIT);
        assert_eq!(r.error.as_ref().map(|e| e.0), Some(1), "{r}");
    }

    // Transfers report at their end, which follows the client's last ACK.
    let m = scrape_until(&url, "tftpcast_transfers_finished_total", 5.0, Duration::from_secs(10));
    let show = format!("{m:#?}");
    assert_eq!(get(&m, "tftpcast_transfers_finished_total"), 5.0, "{show}");
    assert_eq!(get(&m, "tftpcast_transfers_started_total{kind=\"unicast\"}"), 5.0, "{show}");
    assert_eq!(get(&m, "tftpcast_requests_total{result=\"not_found\"}"), 2.0, "{show}");
    assert_eq!(get(&m, "tftpcast_admission_total{event=\"admitted\"}"), 7.0, "{show}");
    assert_eq!(get(&m, "tftpcast_admission_total{event=\"deferred\"}"), 0.0, "{show}");
    assert_eq!(get(&m, "tftpcast_transfer_bytes_total"), (5 * size) as f64, "{show}");
    assert_eq!(m.keys().filter(|k| k.starts_with("tftpcast_transfers_failed_total")).count(), 0, "{show}");
    assert_eq!(get(&m, "tftpcast_sessions_active"), 0.0, "{show}");
    assert_eq!(get(&m, "tftpcast_multicast_groups_active"), 0.0, "{show}");
    assert_eq!(get(&m, "tftpcast_cluster_members"), 0.0, "{show}");
    // Wire bytes: every DATA header and payload, so a little more than the file bytes
    // (pacing reports come every lease, the last one at each transfer's end).
    let wire = get(&m, "tftpcast_sent_bytes_total");
    assert!(wire >= (5 * size) as f64 && wire < (5 * size) as f64 * 1.1, "wire bytes {wire}\n{show}");

    // Other paths are 404; the endpoint keeps answering.
    assert_eq!(curl(&format!("http://{maddr}/")).0, 404);
    assert_eq!(curl(&url).0, 200);
    server.finish(&fx);
}

#[test]
fn metrics_count_defers_and_failures() {
    let Some(fx) = fixture_if(testing_tftpcast() && require_tool("curl")) else { return };
    let server = Server::start_in_env(None, &fx.root, METRICS_ON, &[("TFTPCAST_LIMITS__MAX_SESSIONS", "1")]);
    let url = format!("http://{}/metrics", metrics_addr(&server));
    let addr = server.addr();
    // Two raw clients at once at a limit of one: one of them waits in the queue.
    let hs: Vec<_> = (0..2).map(|_| thread::spawn(move || raw::get(addr, ONE_MIB, "octet", &[], CLIENT_LIMIT))).collect();
    for h in hs {
        let r = h.join().unwrap();
        assert!(r.complete, "{r}");
    }
    // A transfer the client abandons: it acknowledges nothing and the server gives up.
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(&raw::rrq(b"b513.bin", "octet", &[]), addr).unwrap();
    let m = scrape_until(&url, "tftpcast_transfers_failed_total{reason=\"timeout\"}", 1.0, Duration::from_secs(30));
    let show = format!("{m:#?}");
    assert_eq!(get(&m, "tftpcast_transfers_failed_total{reason=\"timeout\"}"), 1.0, "{show}");
    assert_eq!(get(&m, "tftpcast_transfers_finished_total"), 2.0, "{show}");
    assert!(get(&m, "tftpcast_admission_total{event=\"deferred\"}") >= 1.0, "{show}");
    assert_eq!(get(&m, "tftpcast_admission_total{event=\"admitted_after_defer\"}"), get(&m, "tftpcast_admission_total{event=\"deferred\"}"), "{show}");
    assert!(get(&m, "tftpcast_retransmitted_bytes_total") >= 516.0, "the abandoned transfer's DATA was sent again: {show}");
    assert_eq!(get(&m, "tftpcast_sessions_active"), 0.0, "{show}");
    // The same figures in the `state` event (SIGUSR1).
    server.signal(libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let state = loop {
        let found = server.logs().iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|v| v["fields"]["actor"] == "admission");
        if let Some(v) = found {
            break v["fields"].clone();
        }
        assert!(Instant::now() < deadline, "no admission state event\n{}", server.log_tail(20));
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(state["deferred"].as_u64().map(|v| v as f64), Some(get(&m, "tftpcast_admission_total{event=\"deferred\"}")), "{state}");
    assert_eq!(state["active"], 0, "{state}");
    server.finish(&fx);
}

/// A connection that connects and sends nothing (or sends half a request) must not hold up
/// other scrapes: each connection is answered on its own. With the old one-at-a-time
/// responder, a scrape behind a silent connection waited its 5 s timeout.
#[test]
fn a_silent_connection_does_not_stall_a_scrape() {
    let Some((_fx, server)) = serve_if(testing_tftpcast() && require_tools(&["curl"]), METRICS_ON) else { return };
    let maddr = metrics_addr(&server);
    let url = format!("http://{maddr}/metrics");
    let (code, _) = curl(&url); // the endpoint is up
    assert_eq!(code, 200);

    let silent: Vec<std::net::TcpStream> = (0..3).map(|_| std::net::TcpStream::connect(maddr).expect("connect")).collect();
    let mut half = std::net::TcpStream::connect(maddr).expect("connect");
    std::io::Write::write_all(&mut half, b"GET /metr").unwrap();
    thread::sleep(Duration::from_millis(200)); // they are accepted first
    for _ in 0..3 {
        let t = Instant::now();
        let (code, body) = curl(&url);
        let took = t.elapsed();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("tftpcast_sessions_active"), "{body}");
        assert!(took < Duration::from_secs(2), "a scrape waited {took:?} behind silent connections");
    }
    drop((silent, half));
}

/// deploy/grafana-dashboard.json queries only metrics this server exports, and groups only by
/// labels those metrics carry (checked on a scrape after a transfer and a missing file).
#[test]
fn the_grafana_dashboard_queries_exported_metrics() {
    if !testing_tftpcast() || !require_tools(&["curl", "tftp"]) {
        return;
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dash: serde_json::Value = serde_json::from_str(&fs::read_to_string(repo.join("deploy/grafana-dashboard.json")).unwrap()).expect("the dashboard is JSON");
    let exprs: Vec<String> = dash["panels"].as_array().expect("panels").iter().flat_map(|p| p["targets"].as_array().expect("targets").iter().map(|t| t["expr"].as_str().expect("expr").to_string())).collect();
    assert!(exprs.len() >= 8, "{exprs:?}");

    let fx = Fixture::new();
    let server = Server::start(&fx.root, &["--metrics-listen", "127.0.0.1:0"]);
    fetch_and_check(&fx, &Client::hpa(), server.addr(), ONE_MIB, CLIENT_LIMIT);
    let _ = raw::get(server.addr(), "missing.bin", "octet", &[], CLIENT_LIMIT);
    // A client that aborts with an ERROR after the first DATA: a failed transfer.
    let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.send_to(&raw::rrq(ONE_MIB.as_bytes(), "octet", &[]), server.addr()).unwrap();
    let mut buf = [0u8; 1024];
    let (_, tid) = c.recv_from(&mut buf).expect("DATA 1");
    c.send_to(b"\x00\x05\x00\x00abort\x00", tid).unwrap();
    thread::sleep(Duration::from_millis(300));
    let (_, body) = curl(&format!("http://{}/metrics", metrics_addr(&server)));
    // Exported names: every sample's, and each declared counter's `_total` (a labelled family
    // without samples yet still declares its type).
    let mut exported: HashMap<String, Vec<String>> = HashMap::new();
    for l in body.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            let (name, kind) = (w.next().unwrap(), w.next().unwrap_or(""));
            let name = if kind == "counter" && !name.ends_with("_total") { format!("{name}_total") } else { name.to_string() };
            exported.entry(name).or_default();
        } else if !l.starts_with('#') && !l.is_empty() {
            let name = l.split(['{', ' ']).next().unwrap();
            let labels: Vec<String> = l.split_once('{').map(|(_, r)| r.split('}').next().unwrap().split(',').filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_string())).collect()).unwrap_or_default();
            exported.entry(name.to_string()).or_default().extend(labels);
        }
    }
    for e in &exprs {
        let names: Vec<&str> = e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("tftpcast_")).collect();
        assert!(!names.is_empty(), "{e}");
        for n in &names {
            assert!(exported.contains_key(*n), "the dashboard queries {n}, which the server does not export\n{body}");
        }
        // `by (label)` must be a label of the queried metric when it has samples.
        if let Some((_, rest)) = e.split_once("by (") {
            let label = rest.split(')').next().unwrap().trim();
            let labels = &exported[names[0]];
            assert!(label == "instance" || labels.is_empty() || labels.iter().any(|l| l == label), "{e}: {} has labels {labels:?}", names[0]);
        }
    }
}
