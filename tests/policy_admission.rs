//! Client option policy (`[[policy]]`) and admission control (session limits, request rates,
//! the defer queue) on real sockets: OACKs seen from two client addresses (127.0.0.1 and
//! 127.0.0.2, both loopback), real clients in bursts, and the server's own log lines.

mod common;

use std::fs;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Sum of a counter over every admission summary line.
fn admission_sum(server: &Server, k: &str) -> u64 {
    events(server, "admission: requests deferred at a session limit or rate limit").iter().map(|e| field_u64(e, k).unwrap_or(0)).sum()
}

fn write_config(fx: &Fixture, name: &str, text: &str) -> PathBuf {
    let p = fx.out(name);
    fs::write(&p, text).unwrap();
    p
}

/// What a transfer from a chosen local address saw.
#[derive(Debug, Default)]
struct Got {
    oack: Option<Vec<(String, String)>>,
    error: Option<(u16, String)>,
    data: Vec<u8>,
    complete: bool,
}

impl Got {
    fn opt(&self, k: &str) -> Option<&str> {
        self.oack.as_ref()?.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
}

/// A read request from `local` (any loopback address) with windowed ACKs, retransmitting the
/// request or the last ACK every 500 ms, until done or `limit`. With `only_oack`, stops at
/// the first answer and cancels the transfer with an ERROR.
fn get_from(local: IpAddr, server: SocketAddr, file: &str, opts: &[(&str, &str)], only_oack: bool, limit: Duration) -> Got {
    let sock = UdpSocket::bind((local, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut got = Got::default();
    let mut last = raw::rrq(file.as_bytes(), "octet", opts);
    let mut dest = server;
    sock.send_to(&last, dest).unwrap();
    let (mut blksize, mut window, mut expected, mut in_window) = (512usize, 1u32, 1u16, 0u32);
    let mut peer: Option<SocketAddr> = None;
    let mut buf = vec![0u8; 70000];
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            let _ = sock.send_to(&last, dest);
            continue;
        };
        if peer.is_some_and(|p| p != from) {
            continue;
        }
        peer = Some(from);
        dest = from;
        let p = &buf[..n];
        match raw::opcode(p) {
            Some(raw::OACK) if got.data.is_empty() => {
                let o = raw::parse_oack(p);
                for (k, v) in &o {
                    match k.as_str() {
                        "blksize" => blksize = v.parse().unwrap(),
                        "windowsize" => window = v.parse().unwrap(),
                        _ => {}
                    }
                }
                got.oack = Some(o);
                if only_oack {
                    let _ = sock.send_to(b"\x00\x05\x00\x00cancelled\x00", dest);
                    return got;
                }
                last = raw::ack(0);
                sock.send_to(&last, dest).unwrap();
            }
            Some(raw::DATA) if n >= 4 => {
                if only_oack {
                    let _ = sock.send_to(b"\x00\x05\x00\x00cancelled\x00", dest);
                    return got;
                }
                let block = u16::from_be_bytes([p[2], p[3]]);
                if block != expected {
                    last = raw::ack(expected.wrapping_sub(1));
                    in_window = 0;
                    sock.send_to(&last, dest).unwrap();
                    continue;
                }
                got.data.extend_from_slice(&p[4..]);
                expected = expected.wrapping_add(1);
                in_window += 1;
                let done = p.len() - 4 < blksize;
                if done || in_window >= window {
                    last = raw::ack(block);
                    in_window = 0;
                    sock.send_to(&last, dest).unwrap();
                }
                if done {
                    got.complete = true;
                    return got;
                }
            }
            Some(raw::ERROR) => {
                got.error = raw::parse_error(p);
                return got;
            }
            _ => {}
        }
    }
    got
}

const LO1: &str = "127.0.0.1";
const LO2: &str = "127.0.0.2";

#[test]
fn policy_rules_clamp_refuse_and_deny_by_client_and_fingerprint() {
    if !testing_tftpcast() {
        eprintln!("SKIPPED: client option policy is tftpcast's");
        return;
    }
    let fx = Fixture::new();
    fs::write(fx.root.join("secret.bin"), b"not for anyone").unwrap();
    let cfg = write_config(
        &fx,
        "policy.toml",
        r#"
[[policy]]
name = "narrow-lab"
clients = ["127.0.0.2/32", "fd00:99::/64"]
blksize_max = 1024
windowsize_max = 1

[[policy]]
name = "no-multicast"
has = ["multicast"]
refuse = ["multicast"]

[[policy]]
name = "no-secrets"
file = "^secret"
deny = true
"#,
    );
    // Multicast stays on (so only the rule can remove the option) but confined to loopback
    // on a range of this test's own, in case the rule ever failed.
    let server = Server::start(
        &fx.root,
        &["--config", cfg.to_str().unwrap(), "--multicast-interface", LO1, "--multicast-range", "239.255.211.0/28", "--multicast-port", "1790"],
    );
    let addr = server.addr();
    let opts = [("blksize", "1468"), ("windowsize", "4"), ("tsize", "0")];
    let want = fs::read(fx.path(ONE_MIB)).unwrap();

    // 127.0.0.1 is in no rule's range: it gets what it asks for, byte-exact.
    let a = get_from(LO1.parse().unwrap(), addr, ONE_MIB, &opts, false, CLIENT_LIMIT);
    assert_eq!((a.opt("blksize"), a.opt("windowsize")), (Some("1468"), Some("4")), "{a:?}");
    assert!(a.complete && a.data == want, "127.0.0.1 transfer: {:?} {} bytes", a.error, a.data.len());
    // 127.0.0.2 is clamped by `narrow-lab`, and its transfer runs at the clamped sizes.
    let b = get_from(LO2.parse().unwrap(), addr, ONE_MIB, &opts, false, CLIENT_LIMIT);
    assert_eq!((b.opt("blksize"), b.opt("windowsize"), b.opt("tsize")), (Some("1024"), Some("1"), Some("1048576")), "{b:?}");
    assert!(b.complete && b.data == want, "127.0.0.2 transfer: {:?} {} bytes", b.error, b.data.len());

    // `no-multicast` removes the option from 127.0.0.1's OACK (no group, unicast).
    let m = get_from(LO1.parse().unwrap(), addr, "b513.bin", &[("multicast", ""), ("blksize", "1024")], true, CLIENT_LIMIT);
    assert!(m.oack.is_some(), "no OACK: {m:?}");
    assert_eq!(m.opt("multicast"), None, "multicast refused by rule: {m:?}");
    assert_eq!(m.opt("blksize"), Some("1024"), "{m:?}");

    // `no-secrets` denies with ERROR 2... except for 127.0.0.2, whose first matching rule is
    // `narrow-lab`: the first match applies, later rules are not consulted.
    let d = get_from(LO1.parse().unwrap(), addr, "secret.bin", &[], false, CLIENT_LIMIT);
    assert_eq!(d.error.as_ref().map(|e| e.0), Some(2), "{d:?}");
    let s2 = get_from(LO2.parse().unwrap(), addr, "secret.bin", &[], false, CLIENT_LIMIT);
    assert!(s2.complete && s2.data == b"not for anyone", "{s2:?}");

    // Every applied rule is logged with what it changed.
    let applied = events(&server, "client option policy applied");
    let rules: Vec<(String, String)> =
        applied.iter().map(|e| (e["fields"]["rule"].as_str().unwrap_or("").to_string(), e["fields"]["changes"].as_str().unwrap_or("").to_string())).collect();
    assert_eq!(
        rules,
        vec![
            ("narrow-lab".to_string(), "blksize 1468->1024, windowsize 4->1".to_string()),
            ("no-multicast".into(), "multicast refused".into()),
            ("narrow-lab".into(), "no change".into()),
        ],
        "127.0.0.1's plain request matched no rule"
    );
    let denied = events(&server, "request denied by client option policy");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["fields"]["rule"], "no-secrets");
    server.finish(&fx);
}

#[test]
fn policy_config_errors_exit_2_naming_the_rule() {
    let fx = Fixture::new();
    for (text, want) in [
        ("[[policy]]\nname = \"fine\"\n[[policy]]\nname = \"bad-range\"\nclients = [\"10.0.0.0/40\"]\nblksize_max = 512\n", "bad-range"),
        ("[[policy]]\nrefuse = [\"rollover\"]\n", "policy[0]"),
        ("[[policy]]\nfile = \"(unclosed\"\ndeny = true\n", "file"),
        ("[[policy]]\nblksize_maximum = 512\n", "blksize_maximum"),
    ] {
        let cfg = write_config(&fx, "bad.toml", text);
        let r = run(
            std::process::Command::new(tftpcast_bin()).args(["serve", "--listen", "127.0.0.1:0", "--root"]).arg(&fx.root).arg("--config").arg(&cfg),
            Duration::from_secs(10),
        );
        assert_eq!(r.code(), Some(2), "{text}: {r}");
        assert!(r.output().contains(want), "{text}: error should name {want}: {r}");
    }
}

/// Starts `n` real clients at once, each fetching `file`, and returns (client, run) pairs.
fn burst(fx: &Fixture, addr: SocketAddr, clients: &[Client], n: usize, file: &str) -> Vec<(Client, Run, PathBuf)> {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let c = clients[i % clients.len()].clone();
            let out = fx.out(&format!("burst-{i}"));
            let f = file.to_string();
            thread::spawn(move || {
                let r = c.fetch(None, addr, &f, &out, CLIENT_LIMIT);
                (c, r, out)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn session_limit_defers_a_burst_of_real_clients_instead_of_dropping() {
    if !testing_tftpcast() || !require_tool("tftp") {
        return;
    }
    let fx = Fixture::new();
    let mut clients = vec![Client::hpa()];
    if which("curl").is_some() {
        clients.push(Client::Curl { args: vec![] });
    }
    if which("busybox").is_some() {
        clients.push(Client::Busybox { blksize: None });
    }
    // A queue wait longer than tftp-hpa's 5 s retransmission: no client has to retransmit
    // for its request to stay queued, so nothing may expire.
    let server = Server::start_in_env(
        None,
        &fx.root,
        &[],
        &[("TFTPCAST_LIMITS__MAX_SESSIONS", "2"), ("TFTPCAST_LIMITS__DEFER_MAX_MS", "10000")],
    );
    let t0 = Instant::now();
    let runs = burst(&fx, server.addr(), &clients, 10, ONE_MIB);
    let took = t0.elapsed();
    for (c, r, out) in &runs {
        assert_fetched(c, r, out, &fx.sha(ONE_MIB), 1 << 20, "burst of 10 at max_sessions=2");
    }
    eprintln!("10 clients ({} kinds), max_sessions=2: all done in {took:.2?}", clients.len());
    // Let the last summary line out (once a second).
    thread::sleep(Duration::from_millis(1300));
    let deferred = admission_sum(&server, "deferred");
    let admitted = admission_sum(&server, "admitted_after_defer");
    assert!(deferred >= 1, "a burst of 10 at a limit of 2 must defer some requests\n{}", server.log_tail(40));
    assert!(admitted >= deferred, "every deferred request is admitted later: {admitted} < {deferred}");
    assert_eq!(admission_sum(&server, "dropped_queue_full") + admission_sum(&server, "dropped_expired"), 0, "{}", server.log_tail(40));
    assert!(admission_sum(&server, "by_sessions") >= 1);
    let starts = events(&server, "transfer started").len();
    assert_eq!(starts, 10, "one transfer per client (no duplicate sessions from retransmitted requests)");
    // Never more than two transfers at once.
    let mut active = 0i32;
    let mut peak = 0;
    for l in server.logs() {
        if l.contains("\"transfer started\"") {
            active += 1;
            peak = peak.max(active);
        } else if l.contains("\"transfer complete\"") || l.contains("\"transfer failed\"") {
            active -= 1;
        }
    }
    assert!(peak <= 2, "{peak} transfers ran at once with max_sessions=2");
    server.finish(&fx);
}

#[test]
fn request_rate_limits_defer_and_log() {
    if !testing_tftpcast() {
        return;
    }
    let fx = Fixture::new();
    // Node-wide: 2 requests a second (burst 2). 8 requests at once cannot all start within
    // 2.5 s, but all are served (the raw clients retransmit every 500 ms, refreshing them).
    let server = Server::start_in_env(None, &fx.root, &[], &[("TFTPCAST_LIMITS__MAX_REQUESTS_PER_S", "2")]);
    let addr = server.addr();
    let want = fs::read(fx.path("b513.bin")).unwrap();
    let t0 = Instant::now();
    let hs: Vec<_> = (0..8).map(|_| thread::spawn(move || (get_from(LO1.parse().unwrap(), addr, "b513.bin", &[], false, CLIENT_LIMIT), t0.elapsed()))).collect();
    let res: Vec<(Got, Duration)> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    for (g, _) in &res {
        assert!(g.complete && g.data == want, "rate-limited request not served: {g:?}");
    }
    let last = res.iter().map(|r| r.1).max().unwrap();
    eprintln!("8 requests at 2/s: last done after {last:.2?}");
    assert!(last >= Duration::from_millis(2400), "8 requests at 2/s (burst 2) finished in {last:?}");
    thread::sleep(Duration::from_millis(1300));
    assert!(admission_sum(&server, "by_rate") >= 5, "rate limit not logged\n{}", server.log_tail(30));
    assert!(events(&server, "admission: requests deferred at a session limit or rate limit").len() <= 6, "summary lines are once a second at most");
    server.finish(&fx);

    // Per client: 1 a second from 127.0.0.1 does not slow 127.0.0.2 down.
    let server = Server::start_in_env(None, &fx.root, &[], &[("TFTPCAST_LIMITS__MAX_REQUESTS_PER_S_PER_CLIENT", "1")]);
    let addr = server.addr();
    let t0 = Instant::now();
    let hs: Vec<_> = (0..3).map(|_| thread::spawn(move || (get_from(LO1.parse().unwrap(), addr, "b513.bin", &[], false, CLIENT_LIMIT), t0.elapsed()))).collect();
    thread::sleep(Duration::from_millis(100));
    let other = get_from(LO2.parse().unwrap(), addr, "b513.bin", &[], false, CLIENT_LIMIT);
    let other_took = t0.elapsed();
    let res: Vec<(Got, Duration)> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(other.complete, "{other:?}");
    assert!(res.iter().all(|(g, _)| g.complete));
    let last = res.iter().map(|r| r.1).max().unwrap();
    assert!(last >= Duration::from_millis(1900), "3 requests at 1/s from one client done in {last:?}");
    assert!(other_took < Duration::from_millis(1500), "another client waited {other_took:?}");
    thread::sleep(Duration::from_millis(1300));
    assert!(admission_sum(&server, "by_client_rate") >= 1, "{}", server.log_tail(30));
    server.finish(&fx);
}

#[test]
fn full_defer_queue_drops_silently() {
    if !testing_tftpcast() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start_in_env(
        None,
        &fx.root,
        &[],
        &[("TFTPCAST_LIMITS__MAX_SESSIONS", "1"), ("TFTPCAST_LIMITS__DEFER_QUEUE", "1"), ("TFTPCAST_LIMITS__DEFER_MAX_MS", "1000")],
    );
    let addr = server.addr();
    // Occupy the only slot: a request whose DATA is never acknowledged.
    let holder = UdpSocket::bind((LO1, 0)).unwrap();
    holder.send_to(&raw::rrq(b"b513.bin", "octet", &[]), addr).unwrap();
    holder.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 1024];
    let (_, _) = holder.recv_from(&mut buf).expect("first request answered");
    // One more waits in the queue; the next ones do not fit and get no answer at all.
    let socks: Vec<UdpSocket> = (0..4).map(|_| UdpSocket::bind((LO1, 0)).unwrap()).collect();
    for s in &socks {
        s.send_to(&raw::rrq(b"b513.bin", "octet", &[]), addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    }
    for s in &socks[1..] {
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            panic!("a request over a full queue was answered: {:?}", &buf[..n.min(40)]);
        }
    }
    thread::sleep(Duration::from_millis(1300));
    assert!(admission_sum(&server, "dropped_queue_full") >= 3, "{}", server.log_tail(30));
    assert_eq!(admission_sum(&server, "deferred"), 1);
    drop(holder);
    // The server still works once the held transfer gives up.
    server.finish(&fx);
}

/// At the session limit, a multicast request for a file whose group is already waiting to
/// start joins that group at once (members cost no session), while a new unicast request
/// waits. Runs in a namespace lab: multicast never leaves it.
#[test]
fn multicast_requests_fold_into_a_running_group_at_the_session_limit() {
    if !testing_tftpcast() || !require_netns() || !require_tools(&["atftp"]) {
        return;
    }
    let _serial = serial_lab();
    let fx = Fixture::new();
    let lab = Lab::new("polfold", 4);
    let listen = SocketAddr::from((lab.server_ip(), 69)).to_string();
    let server = Server::start_in_env(
        Some(&lab.server),
        &fx.root,
        &["--listen", &listen, "--start-delay-ms", "3000"],
        &[("TFTPCAST_LIMITS__MAX_SESSIONS", "1")],
    );
    let addr = server.addr();
    let mc = Client::Atftp { options: vec!["multicast", "blksize 1428"] };
    let spawn_mc = |i: usize| {
        let out = fx.out(&format!("mc-{i}"));
        let mut cmd = mc.command(Some(&lab.clients[i]), addr, ONE_MIB, &out);
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        (ChildGuard(cmd.spawn().expect("atftp")), out)
    };
    let wait_log = |msg: &str, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while events(&server, msg).len() < n {
            assert!(Instant::now() < deadline, "no {n} x `{msg}`\n{}", server.log_tail(40));
            thread::sleep(Duration::from_millis(20));
        }
    };
    // 1. The first multicast client creates the group (a free slot), which waits 3 s.
    let mut first = spawn_mc(1);
    wait_log("multicast request joined group", 1);
    // 2. A slow unicast client takes the only session slot (it ACKs every 50 ms).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let holder = lab.spawn_in_ns(&lab.clients[0], move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        s.send_to(&raw::rrq(ONE_MIB.as_bytes(), "octet", &[]), addr).unwrap();
        let mut buf = [0u8; 600];
        let mut blocks = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                if raw::opcode(&buf[..n]) == Some(raw::DATA) {
                    thread::sleep(Duration::from_millis(50));
                    let _ = s.send_to(&raw::ack(u16::from_be_bytes([buf[2], buf[3]])), from);
                    blocks += 1;
                }
            }
        }
        blocks
    });
    wait_log("transfer started", 1);
    // 3. Two more multicast clients at the limit: folded into the group, not queued.
    let mut more: Vec<_> = (2..4).map(spawn_mc).collect();
    wait_log("multicast request joined group", 3);
    let joined = events(&server, "multicast request joined group");
    assert_eq!(joined.iter().filter(|e| e["fields"]["new_group"] == true).count(), 1, "{joined:?}");
    assert_eq!(events(&server, "transfer started").len(), 1, "the slot holder is still the only session");
    let want = fs::read(fx.path(ONE_MIB)).unwrap();
    for (child, out) in std::iter::once(&mut first).chain(more.iter_mut()) {
        let deadline = Instant::now() + CLIENT_LIMIT;
        loop {
            if let Some(st) = child.0.try_wait().unwrap() {
                assert!(st.success(), "atftp multicast client failed\n{}", server.log_tail(40));
                break;
            }
            assert!(Instant::now() < deadline, "atftp multicast client did not finish\n{}", server.log_tail(40));
            thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(fs::read(&out).unwrap(), want, "multicast download differs");
    }
    assert!(!stop.load(std::sync::atomic::Ordering::Relaxed));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let blocks = holder.join().unwrap();
    assert!(blocks > 10 && blocks < 2048, "the holder kept its slot for the whole test ({blocks} blocks)");
    thread::sleep(Duration::from_millis(1100));
    assert!(admission_sum(&server, "folded_into_groups") >= 2, "{}", server.log_tail(40));
    let mut server = server;
    assert!(server.is_running());
    server.stop_clean();
}

/// A write request that arrives while the session limit is taken waits in the defer queue
/// like a read and, once the slot frees, is admitted and stored byte-exact (tftp-hpa `put`).
#[test]
fn a_write_request_deferred_at_the_session_limit_completes() {
    if !testing_tftpcast() || !require_tool("tftp") {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start_in_env(
        None,
        &fx.root,
        &["--allow-write"],
        &[("TFTPCAST_LIMITS__MAX_SESSIONS", "1"), ("TFTPCAST_LIMITS__DEFER_MAX_MS", "10000")],
    );
    // The only slot: a read whose DATA 1 we hold without acknowledging.
    let holder = UdpSocket::bind("127.0.0.1:0").unwrap();
    holder.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    holder.send_to(&raw::rrq(ONE_MIB.as_bytes(), "octet", &[]), server.addr()).unwrap();
    let mut buf = vec![0u8; 2048];
    let (_, tid) = holder.recv_from(&mut buf).expect("DATA 1 of the held read");
    assert_eq!(raw::opcode(&buf), Some(raw::DATA));
    // The upload, started while the slot is taken.
    let src = fx.out("deferred-src");
    let want = pseudo_random(200_000, 77);
    fs::write(&src, &want).unwrap();
    let (host, port) = (server.addr().ip().to_string(), server.addr().port().to_string());
    let mut cmd = std::process::Command::new(tool("tftp"));
    cmd.args([&host, &port, "-m", "binary", "-c", "put"]).arg(&src).arg("deferred.bin");
    let put = thread::spawn(move || run(&mut cmd, CLIENT_LIMIT));
    // Deferred, not started and not refused, while the read holds the slot (tftp-hpa does not
    // retransmit its WRQ within 5 s, so only the queue keeps it).
    let queued = Instant::now() + Duration::from_secs(10);
    while admission_sum(&server, "deferred") == 0 {
        assert!(Instant::now() < queued, "the WRQ was not deferred\n{}", server.log_tail(30));
        thread::sleep(Duration::from_millis(100));
    }
    assert!(events(&server, "upload started").is_empty(), "an upload started beyond max_sessions=1\n{}", server.log_tail(30));
    // Free the slot: the client cancels its read.
    let mut e = raw::ERROR.to_be_bytes().to_vec();
    e.extend_from_slice(&[0, 0]);
    e.extend_from_slice(b"cancel\0");
    holder.send_to(&e, tid).unwrap();
    let r = put.join().unwrap();
    assert!(r.success() && !r.output().contains("Error code") && !r.output().contains("timed out"), "tftp put: {r}\n{}", server.log_tail(30));
    assert_eq!(fs::read(fx.path("deferred.bin")).ok().map(|g| sha256(&g)), Some(sha256(&want)), "stored upload differs\n{r}");
    assert_eq!(events(&server, "upload started").len(), 1, "one upload (no duplicate from a retransmitted WRQ)");
    thread::sleep(Duration::from_millis(1300)); // the next admission summary line
    assert!(admission_sum(&server, "admitted_after_defer") >= 1, "{}", server.log_tail(30));
    assert_eq!(admission_sum(&server, "dropped_queue_full") + admission_sum(&server, "dropped_expired"), 0);
    server.finish(&fx);
}
