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

#[test]
fn metrics_match_a_known_workload() {
    if !testing_tftpcast() || !require_tools(&["curl", "tftp"]) {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &["--metrics-listen", "127.0.0.1:0"]);
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
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = parse(&curl(&url).1);
        if get(&m, "tftpcast_transfers_finished_total") >= 5.0 || Instant::now() > deadline {
            break m;
        }
        thread::sleep(Duration::from_millis(100));
    };
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
    if !testing_tftpcast() || !require_tool("curl") {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start_in_env(None, &fx.root, &["--metrics-listen", "127.0.0.1:0"], &[("TFTPCAST_LIMITS__MAX_SESSIONS", "1")]);
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
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = parse(&curl(&url).1);
        if get(&m, "tftpcast_transfers_failed_total{reason=\"timeout\"}") >= 1.0 || Instant::now() > deadline {
            break m;
        }
        thread::sleep(Duration::from_millis(200));
    };
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
    if !testing_tftpcast() || !require_tools(&["curl"]) {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &["--metrics-listen", "127.0.0.1:0"]);
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
