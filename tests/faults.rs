//! Faults (issue 6): real clients against a real server while the network loses, duplicates
//! and reorders packets; the server killed with SIGKILL mid-transfer and restarted on the same
//! port; resources released after thousands of transfers that end every possible way; a flood
//! of requests from spoofed sources that never answer.
//!
//! The network faults are built without netem (unavailable here):
//! - loss: nftables `numgen random mod 100 < 20 drop` on input, in the server's namespace and
//!   in every client's ([`Lab::add_loss`]), so each direction loses 20%;
//! - duplication: nftables `dup to` in the netdev egress hook, on the server's veth (server to
//!   clients, multicast included) and on the bridge port towards the server (clients to server);
//! - reordering: on the same two interfaces an HTB qdisc with a fast and a slow class; 20% of
//!   the packets are sent to the slow one (`meta priority set 1:20`), a token bucket that a
//!   filler stream (a burst every 100 ms to an address nobody has) keeps queued for 0 to about
//!   50 ms, so even a lone packet in the slow band is overtaken by the ones after it.
//! Each fault is first measured with numbered probe datagrams, so a test cannot pass on a
//! network that does not actually misbehave.
//!
//! A client may give up under loss (its own retry limits); then it must say so (exit status or
//! message) — a download that claims success must be byte-exact. Needs root: fails in CI
//! without it, is skipped locally. With `FAULTS_TRACE=1` the output of every client that
//! failed (atftp with `--trace`) and the server's whole log are printed.

mod common;

use std::collections::HashSet;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The file most fault tests fetch: 400 blocks at blksize 512, 144 at 1428.
const FILE: &str = "faults_200k.bin";
const FILE_SIZE: usize = 200 << 10;
/// Time limit of one client under faults.
/// atftp 512 under 20% loss each way took 39 to 82 s in six runs (see `unicast_clients`).
const FETCH_LIMIT: Duration = Duration::from_secs(120);

fn fixture() -> Arc<Fixture> {
    let fx = Fixture::new();
    fs::write(fx.path(FILE), pseudo_random(FILE_SIZE, seed_of(FILE))).unwrap();
    Arc::new(fx)
}

// ---------------------------------------------------------------------------------------------
// Server state from its logs and /proc.
// ---------------------------------------------------------------------------------------------

/// (active, pending) sessions of the listener, from the `state` event SIGUSR1 makes it log.
fn sessions(server: &Server) -> (u64, u64) {
    let before = server.logs().len();
    server.signal(libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = server.logs();
        let found = logs[before.min(logs.len())..]
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["fields"]["message"] == "state" && v["fields"]["actor"] == "listener")
            .map(|v| (v["fields"]["active"].as_u64().unwrap_or(u64::MAX), v["fields"]["pending"].as_u64().unwrap_or(u64::MAX)));
        if let Some(s) = found {
            return s;
        }
        assert!(Instant::now() < deadline, "no listener state event after SIGUSR1\n{}", server.log_tail(20));
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `limit` for the server to have no session left; panics otherwise.
fn wait_no_sessions(server: &Server, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    loop {
        let s = sessions(server);
        if s == (0, 0) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: sessions (active, pending) still {s:?} after {limit:?}\n{}", server.log_tail(30));
        thread::sleep(Duration::from_millis(250));
    }
}

/// Open file descriptors and sockets among them.
fn fds(pid: i32) -> (usize, usize) {
    let mut n = 0;
    let mut socks = 0;
    for e in fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/PID/fd").flatten() {
        n += 1;
        if fs::read_link(e.path()).map(|t| t.to_string_lossy().starts_with("socket:")).unwrap_or(false) {
            socks += 1;
        }
    }
    (n, socks)
}

/// Resident memory in KiB.
fn rss_kib(pid: i32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Samples the RSS of `pid` every 50 ms until dropped; `max()` is the peak seen.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<u64>>,
}

impl RssSampler {
    fn start(pid: i32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = thread::spawn(move || {
            let mut peak = 0;
            while !s.load(Ordering::Relaxed) {
                if let Ok(st) = fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(v) = st.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()) {
                        peak = peak.max(v);
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        RssSampler { stop, handle: Some(handle) }
    }

    fn max(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Stops a server running in a lab namespace (the harness's own final check sends a request
/// from the root namespace, which cannot reach the lab).
fn stop(server: Server) {
    if std::env::var_os("FAULTS_TRACE").is_some() {
        eprintln!("{}", server.log_tail(100000));
    }
    server.finish_in_lab();
}

// ---------------------------------------------------------------------------------------------
// Faults.
// ---------------------------------------------------------------------------------------------

fn nft_apply(lab: &Lab, ns: &str, fx: &Fixture, ruleset: &str) {
    let path = fx.base().join(format!("nft-{}.rules", next_id()));
    fs::write(&path, ruleset).unwrap();
    run_ok(&mut lab.exec(ns, tool("nft"), &["-f", path.to_str().unwrap()]));
}

fn mac_of(lab: &Lab, ns: &str, dev: &str) -> String {
    let r = run_ok(&mut lab.exec(ns, tool("ip"), &["link", "show", dev]));
    let w: Vec<&str> = r.stdout.split_whitespace().collect();
    w.windows(2).find(|p| p[0] == "link/ether").map(|p| p[1].to_string()).unwrap_or_else(|| panic!("no MAC in {r}"))
}

/// The address the filler stream of `dev` goes to (no host has it).
fn filler_ip(lab: &Lab, toward_server: bool) -> Ipv4Addr {
    Ipv4Addr::new(lab.net[0], lab.net[1], lab.net[2], if toward_server { 251 } else { 250 })
}

/// Duplicates 20% of the UDP packets leaving `dev` in `ns` and sends 20% through the slow band
/// of an HTB qdisc there. The filler stream's own packets go to the slow band and are never
/// duplicated.
fn add_dup_reorder(lab: &Lab, ns: &str, dev: &str, filler: Ipv4Addr, fx: &Fixture) {
    let tc = |args: &[&str]| run_ok(&mut lab.exec(ns, tool("tc"), args));
    // HTB (prio, netem and most other qdiscs are not in this kernel): class 1:10 is the fast
    // band, 1:20 the slow one at 8 Mbit/s, where the filler's 40 x 1400 bytes every 100 ms
    // take about 56 ms to drain.
    tc(&["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"]);
    tc(&["class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit"]);
    tc(&["class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb", "rate", "8mbit", "ceil", "8mbit", "burst", "3000", "cburst", "3000"]);
    tc(&["qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:", "bfifo", "limit", "400000"]);
    nft_apply(
        lab,
        ns,
        fx,
        &format!(
            "table netdev tcfault {{
                chain egress {{
                    type filter hook egress device \"{dev}\" priority 0; policy accept;
                    ip daddr {filler} meta priority set 1:20 counter accept
                    ip protocol udp numgen random mod 100 < 20 counter dup to \"{dev}\"
                    ip protocol udp numgen random mod 100 < 20 counter meta priority set 1:20
                    ip daddr 224.0.0.0/4 counter
                }}
            }}"
        ),
    );
}

/// The filler stream: every 100 ms a burst of 40 datagrams of 1400 bytes from `ns` to `to`
/// (an address with a static neighbour entry for `mac`, so nothing resolves it), until dropped.
struct Filler {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Filler {
    fn start(lab: &Lab, ns: &str, to: Ipv4Addr, mac: &str) -> Filler {
        run_ok(&mut lab.exec(ns, tool("ip"), &["neigh", "replace", &to.to_string(), "lladdr", mac, "dev", "v0", "nud", "permanent"]));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = lab.spawn_in_ns(ns, move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            let payload = [0x55u8; 1400];
            while !s.load(Ordering::Relaxed) {
                for _ in 0..40 {
                    let _ = sock.send_to(&payload, (to, 9));
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        Filler { stop, handle: Some(handle) }
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Duplication and reordering in both directions between the server and every client.
/// Returns the two filler streams (stopped when dropped).
fn hostile_network(lab: &Lab, fx: &Fixture) -> (Filler, Filler) {
    // Server to clients: on the server's own veth.
    let to_clients = filler_ip(lab, false);
    add_dup_reorder(lab, &lab.server, "v0", to_clients, fx);
    let f1 = Filler::start(lab, &lab.server, to_clients, "02:00:5e:10:00:fa");
    // Clients to server: on the bridge port towards the server. The filler comes from client 0
    // and is addressed to the server's MAC, which drops it (not its address, no forwarding).
    let to_server = filler_ip(lab, true);
    add_dup_reorder(lab, &lab.bridge, "p-srv", to_server, fx);
    let f2 = Filler::start(lab, &lab.clients[0], to_server, &mac_of(lab, &lab.server, "v0"));
    (f1, f2)
}

/// What numbered probe datagrams went through.
#[derive(Debug)]
#[allow(dead_code)] // printed
struct Probe {
    sent: u32,
    received: usize,
    unique: usize,
    duplicates: usize,
    /// Datagrams that arrived after one with a higher number.
    overtaken: usize,
}

/// Sends `count` numbered datagrams from `from` to `to_ip` in `to`, one every `gap`, and
/// reports what arrived.
fn probe(lab: &Lab, from: &str, to: &str, to_ip: Ipv4Addr, count: u32, gap: Duration) -> Probe {
    const PORT: u16 = 47001;
    let rx = lab.spawn_in_ns(to, move || {
        let sock = UdpSocket::bind(("0.0.0.0", PORT)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut seqs = Vec::new();
        let mut buf = [0u8; 2048];
        let mut idle = Instant::now();
        while idle.elapsed() < Duration::from_millis(1500) {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if n >= 4 {
                    seqs.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                    idle = Instant::now();
                }
            }
        }
        seqs
    });
    thread::sleep(Duration::from_millis(200));
    lab.in_ns(from, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut p = vec![0u8; 600];
        for i in 0..count {
            p[..4].copy_from_slice(&i.to_be_bytes());
            let _ = sock.send_to(&p, (to_ip, PORT));
            thread::sleep(gap);
        }
    });
    let seqs = rx.join().expect("probe receiver");
    let mut seen = HashSet::new();
    let (mut duplicates, mut overtaken, mut high) = (0, 0, None::<u32>);
    for &s in &seqs {
        if !seen.insert(s) {
            duplicates += 1;
            continue;
        }
        if high.is_some_and(|h| s < h) {
            overtaken += 1;
        }
        high = Some(high.map_or(s, |h| h.max(s)));
    }
    Probe { sent: count, received: seqs.len(), unique: seen.len(), duplicates, overtaken }
}

// ---------------------------------------------------------------------------------------------
// Clients under faults.
// ---------------------------------------------------------------------------------------------

/// atftp aborts when an OACK arrives after it sent ACK 0 ("tftp: unexpected OACK"): a
/// retransmitted OACK whose ACK 0 was lost, or a duplicate of it. RFC 2347 wants the OACK
/// retransmitted until ACK 0 arrives, so under loss or duplication atftp may give up.
const ATFTP_REPEATED_OACK: &str = "atftp aborts on a repeated OACK";
/// curl (7.88) goes back to block 0 when an OACK arrives again after DATA began, then waits
/// for a block 1 the server is long past ("Received unexpected DATA packet block N, expecting
/// block 1") until its own time limit.
const CURL_REPEATED_OACK: &str = "curl restarts at block 1 on a repeated OACK";

/// How one client's fetch ended.
#[derive(Debug)]
#[allow(dead_code)] // printed
enum Ending {
    /// Claimed success, and the bytes are exact.
    Exact(Duration),
    /// Reported a failure (exit status or message) by itself; the known client limit its
    /// output shows, if any.
    GaveUp(String, Option<&'static str>),
    /// Still running at the time limit (killed).
    Killed,
}

/// Runs `client` in `ns` and judges the result. A claimed success with wrong bytes panics.
fn fetch_judged(client: &Client, ns: &str, fx: &Fixture, server: SocketAddr, file: &str, limit: Duration) -> Ending {
    let out = fx.out(file);
    let mut cmd = client.command(Some(ns), server, file, &out);
    if std::env::var_os("FAULTS_TRACE").is_some() {
        if let Client::Atftp { .. } = client { cmd.arg("--trace"); }
    }
    let r = run(&mut cmd, limit);
    if std::env::var_os("FAULTS_TRACE").is_some() && !(r.success() && !client.reported_error(&r)) {
        eprintln!("=== {client:?} in {ns}:\n{}", r.output());
    }
    if r.timed_out {
        return Ending::Killed;
    }
    if r.success() && !client.reported_error(&r) {
        let want = fs::read(fx.path(file)).unwrap();
        let got = fs::read(&out).unwrap_or_else(|e| panic!("{client:?} claimed success but wrote no file: {e}\n{r}"));
        assert!(
            got == want,
            "CORRUPTED: {client:?} claimed success with {} bytes (sha256 {}), want {} bytes (sha256 {})\n{r}",
            got.len(),
            hex(&sha256(&got)),
            want.len(),
            hex(&sha256(&want))
        );
        return Ending::Exact(r.elapsed);
    }
    let o = r.output();
    let last: Vec<&str> = o.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let limit = match client {
        Client::Atftp { .. } if o.contains("unexpected OACK") => Some(ATFTP_REPEATED_OACK),
        Client::Curl { .. } if o.contains("Received unexpected DATA packet block") => Some(CURL_REPEATED_OACK),
        _ => None,
    };
    Ending::GaveUp(format!("exit {:?}: {}", r.code(), last[last.len().saturating_sub(3)..].join(" | ")), limit)
}

/// Fetches `file` with each client from its own namespace, all at once.
fn fetch_concurrently(lab: &Lab, fx: &Arc<Fixture>, server: SocketAddr, clients: &[(&'static str, Client)], file: &'static str) -> Vec<(&'static str, Ending)> {
    assert!(clients.len() <= lab.clients.len());
    let handles: Vec<_> = clients
        .iter()
        .cloned()
        .zip(lab.clients.clone())
        .map(|((name, client), ns)| {
            let fx = fx.clone();
            thread::spawn(move || (name, fetch_judged(&client, &ns, &fx, server, file, FETCH_LIMIT)))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a client check panicked")).collect()
}

/// tftp-hpa, curl, busybox, atftp and tftpcast get at blksize 512 and 1428, windowsize 1 and 8.
fn unicast_clients() -> Vec<(&'static str, Client)> {
    vec![
        ("tftp-hpa 512", Client::hpa()),
        // -v shows why curl gave up; --max-time bounds its wait (CURL_REPEATED_OACK).
        ("curl 512", Client::Curl { args: vec!["-v", "--max-time", "45"] }),
        ("curl 1428", Client::Curl { args: vec!["-v", "--max-time", "45", "--tftp-blksize", "1428"] }),
        ("busybox 512", Client::Busybox { blksize: None }),
        ("busybox 1428", Client::Busybox { blksize: Some(1428) }),
        // atftp 0.8.0 sends one ACK per DATA block and one extra ACK on the first duplicate
        // of it, then ignores ("got wrong block, ignoring") every further duplicate of that
        // block until its own timer fires: --tftp-timeout, 5 s by default, restarted by every
        // packet it receives, ignored ones included. If both ACKs are lost (4% of the blocks
        // at 20% each way, so in nearly every 200 KiB run) the server retransmits every
        // second (timeout 1) for transfer.min_give_up_s and gives up, atftp's 5 s of silence
        // only begin then; its re-ACK meets a closed port, ICMP port unreachable, "tftp:
        // unknown error". The server is right to retransmit and is never answered.
        // --tftp-timeout=1 makes atftp re-ACK whenever one of those retransmissions is lost.
        ("atftp 512", Client::Atftp { options: vec!["--tftp-timeout=1", "timeout 1"] }),
        ("atftp 1428 w8", Client::Atftp { options: vec!["--tftp-timeout=1", "blksize 1428", "windowsize 8", "timeout 1"] }),
        ("tftpcast 512", Client::Tftpcast { args: vec![] }),
        ("tftpcast 512 w8", Client::Tftpcast { args: vec!["--windowsize", "8"] }),
        ("tftpcast 1428 w8", Client::Tftpcast { args: vec!["--blksize", "1428", "--windowsize", "8"] }),
    ]
}

fn report(what: &str, endings: &[(&str, Ending)]) {
    eprintln!("{what}:");
    for (name, e) in endings {
        eprintln!("  {name:18} {e:?}");
    }
}

fn tools_for(clients: &[(&'static str, Client)]) -> bool {
    clients.iter().all(|(_, c)| c.available())
}

fn start_server(lab: &Lab, fx: &Fixture, extra: &[&str]) -> Server {
    let listen = SocketAddr::from((lab.server_ip(), 69)).to_string();
    let mut args = vec!["--listen", listen.as_str()];
    args.extend_from_slice(extra);
    Server::start_in(Some(&lab.server), &fx.root, &args)
}

/// 20% loss each way: every download that completes is exact, the ones that give up say so,
/// none hangs, at least 6 of the 10 complete, and tftpcast's own client always does.
#[test]
fn unicast_clients_under_20_percent_loss() {
    let _serial = serial_lab();
    let clients = unicast_clients();
    if !require_netns() || !tools_for(&clients) {
        return;
    }
    let fx = fixture();
    let lab = Lab::new("hardloss", clients.len());
    lab.add_loss(&lab.server, 20);
    for ns in &lab.clients {
        lab.add_loss(ns, 20);
    }
    let p = probe(&lab, &lab.server, &lab.clients[0], lab.client_ip(0), 1000, Duration::from_micros(200));
    eprintln!("loss probe: {p:?}");
    assert!((650..=900).contains(&p.unique), "20% loss should leave about 800 of 1000 probes: {p:?}");
    let server = start_server(&lab, &fx, &[]);
    let endings = fetch_concurrently(&lab, &fx, server.addr(), &clients, FILE);
    report("under 20% loss each way", &endings);
    for (name, e) in &endings {
        assert!(!matches!(e, Ending::Killed), "{name} neither finished nor gave up within {FETCH_LIMIT:?}\n{}", server.log_tail(30));
    }
    // Under 20% loss each way the server keeps a client that answered for at least
    // transfer.min_give_up_s (10 s) after its last progress, but tftp-hpa and curl have their
    // own limits. atftp completes with --tftp-timeout=1 (without it, it stalled on one block in
    // nearly every run, see `unicast_clients`) unless its ACK 0 is lost (ATFTP_REPEATED_OACK).
    // Measured over twelve runs before that change: 7 to 9 of the 10 complete, tftpcast's own
    // client every time.
    let exact = endings.iter().filter(|(_, e)| matches!(e, Ending::Exact(_))).count();
    assert!(exact >= 6, "only {exact} of {} clients completed", endings.len());
    for (name, e) in &endings {
        if name.starts_with("tftpcast") {
            assert!(matches!(e, Ending::Exact(_)), "{name} did not complete: {e:?}\n{}", server.log_tail(30));
        }
        if name.starts_with("atftp") {
            assert!(matches!(e, Ending::Exact(_) | Ending::GaveUp(_, Some(_))), "{name} gave up for an unknown reason: {e:?}\n{}", server.log_tail(30));
        }
    }
    assert!(lab.dropped(&lab.server) > 0 && lab.dropped(&lab.clients[1]) > 0, "the loss rules dropped nothing");
    wait_no_sessions(&server, Duration::from_secs(30), "after the lossy transfers");
    stop(server);
}

/// Duplication and reordering (20% each) both ways: every client completes, byte-exact.
#[test]
fn unicast_clients_under_duplication_and_reordering() {
    let _serial = serial_lab();
    let clients = unicast_clients();
    if !require_netns() || !tools_for(&clients) || !require_tool("tc") {
        return;
    }
    let fx = fixture();
    let lab = Lab::new("harddup", clients.len());
    let _fillers = hostile_network(&lab, &fx);
    for (from, to, ip, dir) in [(&lab.server, &lab.clients[1], lab.client_ip(1), "server to client"), (&lab.clients[1], &lab.server, lab.server_ip(), "client to server")] {
        let p = probe(&lab, from, to, ip, 500, Duration::from_millis(1));
        eprintln!("{dir} probe: {p:?}");
        assert!(p.unique >= 490, "{dir}: no loss configured, yet probes were lost: {p:?}");
        assert!(p.duplicates >= 40, "{dir}: 20% duplication should duplicate about 100 of 500 probes: {p:?}");
        assert!(p.overtaken >= 20, "{dir}: the network does not reorder: {p:?}");
    }
    let server = start_server(&lab, &fx, &[]);
    let endings = fetch_concurrently(&lab, &fx, server.addr(), &clients, FILE);
    report("under 20% duplication and reordering", &endings);
    for (name, e) in &endings {
        // A repeated OACK is the one thing some clients cannot take (see the constants).
        assert!(matches!(e, Ending::Exact(_) | Ending::GaveUp(_, Some(_))), "{name} must complete under duplication and reordering: {e:?}\n{}", server.log_tail(30));
    }
    wait_no_sessions(&server, Duration::from_secs(30), "after the transfers");
    stop(server);
}

/// RFC 2090 multicast (atftp and `tftpcast get --multicast`) under 20% loss at each client,
/// with duplication and reordering: completed downloads are exact, the file went by multicast.
#[test]
fn multicast_clients_under_loss_duplication_and_reordering() {
    let _serial = serial_lab();
    let clients: Vec<(&'static str, Client)> = vec![
        ("atftp mc", Client::Atftp { options: vec!["multicast", "blksize 1428", "timeout 1"] }),
        ("atftp mc", Client::Atftp { options: vec!["multicast", "blksize 1428", "timeout 1"] }),
        ("atftp mc", Client::Atftp { options: vec!["multicast", "blksize 1428", "timeout 1"] }),
        ("tftpcast mc", Client::Tftpcast { args: vec!["--multicast", "--blksize", "1428"] }),
        ("tftpcast mc", Client::Tftpcast { args: vec!["--multicast", "--blksize", "1428"] }),
    ];
    if !require_netns() || !tools_for(&clients) || !require_tool("tc") {
        return;
    }
    let fx = fixture();
    let lab = Lab::new("hardmc", clients.len());
    let _fillers = hostile_network(&lab, &fx);
    for ns in &lab.clients {
        lab.add_loss(ns, 20);
    }
    let server = start_server(&lab, &fx, &["--start-delay-ms", "500"]);
    let endings = fetch_concurrently(&lab, &fx, server.addr(), &clients, FILE);
    report("multicast under 20% loss, duplication and reordering", &endings);
    for (name, e) in &endings {
        assert!(!matches!(e, Ending::Killed), "{name} neither finished nor gave up within {FETCH_LIMIT:?}\n{}", server.log_tail(30));
    }
    let exact = endings.iter().filter(|(_, e)| matches!(e, Ending::Exact(_))).count();
    assert!(exact >= 3, "only {exact} of {} multicast clients completed", endings.len());
    // Multicast DATA leaving the server (counted by the egress chain of the fault table).
    let r = run_ok(&mut lab.exec(&lab.server, tool("nft"), &["list", "chain", "netdev", "tcfault", "egress"]));
    let mc_bytes: u64 = r
        .stdout
        .lines()
        .find(|l| l.contains("224.0.0.0/4"))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.windows(2).find(|p| p[0] == "bytes").and_then(|p| p[1].parse().ok())
        })
        .unwrap_or(0);
    assert!(mc_bytes >= FILE_SIZE as u64, "only {mc_bytes} bytes of multicast left the server: the file did not go by multicast\n{r}");
    wait_no_sessions(&server, Duration::from_secs(30), "after the multicast transfers");
    stop(server);
}

// ---------------------------------------------------------------------------------------------
// SIGKILL and restart.
// ---------------------------------------------------------------------------------------------

/// The server is killed with SIGKILL in the middle of large transfers and started again on the
/// same port: the interrupted clients report failure (none claims a partial file), a tftp-hpa
/// started while no server ran gets its answer from the new one through its own request
/// retransmission, and new invocations of tftp-hpa, curl and tftpcast get are byte-exact.
#[test]
fn sigkill_mid_transfer_then_restart_on_the_same_port() {
    let clients = [Client::hpa(), Client::Curl { args: vec!["--max-time", "20"] }, Client::Tftpcast { args: vec![] }];
    if !clients.iter().all(|c| c.available()) {
        return;
    }
    let fx = Fixture::new().with_big();
    // A port below the ephemeral range (32768..): while the server is dead, the transfer
    // sockets of tests running beside this one (ephemeral ports) cannot take it.
    let port = (20000..32000u16)
        .cycle()
        .skip(std::process::id() as usize % 12000)
        .take(12000)
        .find(|p| std::net::UdpSocket::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range");
    let mut first = Server::start(&fx.root, &["--listen", &format!("127.0.0.1:{port}")]);
    let addr = first.addr();
    // Lock-step at 512 bytes: 81920 blocks, several seconds on loopback.
    let interrupted: Vec<_> = clients
        .iter()
        .map(|c| {
            let out = fx.out("killed");
            let child = ChildGuard(c.command(None, addr, BIG, &out).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("client"));
            (c.clone(), out, child)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while first.logs().iter().filter(|l| l.contains("\"transfer started\"")).count() < clients.len() {
        assert!(Instant::now() < deadline, "the transfers did not start\n{}", first.log_tail(20));
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(700));
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(5)).expect("the server survived SIGKILL");
    let big = fs::read(fx.path(BIG)).unwrap();
    // A client started now finds no server; tftp-hpa retransmits its request by itself.
    let late_out = fx.out("late");
    let late = {
        let mut cmd = Client::hpa().command(None, addr, ONE_MIB, &late_out);
        thread::spawn(move || run(&mut cmd, Duration::from_secs(60)))
    };
    thread::sleep(Duration::from_secs(1));
    let second = Server::start(&fx.root, &["--listen", &addr.to_string()]);
    assert_eq!(second.addr(), addr, "the new server must take the same port");
    let late = late.join().unwrap();
    assert_fetched(&Client::hpa(), &late, &late_out, &fx.sha(ONE_MIB), 1 << 20, "tftp-hpa started while no server ran");
    for (client, out, mut child) in interrupted {
        // Wait (bounded) for the interrupted client to notice; then judge its claim.
        let deadline = Instant::now() + Duration::from_secs(70);
        let status = loop {
            if let Some(st) = child.0.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                break None;
            }
            thread::sleep(Duration::from_millis(50));
        };
        let mut text = String::new();
        if status.is_some() {
            use std::io::Read;
            let _ = child.0.stdout.take().unwrap().read_to_string(&mut text);
            let _ = child.0.stderr.take().unwrap().read_to_string(&mut text);
        }
        let claimed = status.is_some_and(|s| s.success()) && !(matches!(client, Client::Hpa { .. }) && (text.contains("Error code") || text.contains("timed out")));
        if claimed {
            let got = fs::read(&out).unwrap_or_default();
            assert!(got == big, "{client:?} claimed success after the server was killed, with {} of {} bytes: {text}", got.len(), big.len());
        }
        eprintln!("interrupted {client:?}: exit {status:?}, claimed success: {claimed}; {}", text.lines().last().unwrap_or(""));
    }
    for client in &clients {
        fetch_and_check(&fx, client, addr, ONE_MIB, Duration::from_secs(60));
    }
    let tail = fetch_and_check(&fx, &Client::Tftpcast { args: vec!["--blksize", "1428", "--windowsize", "8"] }, addr, BIG, Duration::from_secs(120));
    eprintln!("after the restart: 40 MiB in {:.2?}", tail.elapsed);
    wait_no_sessions(&second, Duration::from_secs(30), "after the restart");
    second.finish(&fx);
}

// ---------------------------------------------------------------------------------------------
// Resources.
// ---------------------------------------------------------------------------------------------

fn bench(server: SocketAddr, file: &str, sha: &[u8; 32], clients: u32, rounds: u32) -> Run {
    let r = run(
        Command::new(tftpcast_bin()).args(["bench", "--server", &server.to_string(), "--file", file, "--expect-sha256", &hex(sha), "--clients", &clients.to_string(), "--rounds", &rounds.to_string(), "--json", "-q"]),
        Duration::from_secs(120),
    );
    assert!(r.success(), "bench failed:\n{r}");
    r
}

/// 2000 transfers that end every way there is — completed, file not found, aborted by the
/// client's ERROR, clients that vanish (socket closed, or open and silent) before or after
/// their first ACK — and then the server's open file descriptors and sockets are back at the
/// baseline, no session is left, and the RSS stayed bounded.
#[test]
fn resources_return_to_baseline_after_2000_transfers_of_every_ending() {
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let addr = server.addr();
    let pid = server.pid();
    // Warm up (arbiters, file cache), then take the baseline.
    bench(addr, "b513.bin", &fx.sha("b513.bin"), 4, 5);
    wait_no_sessions(&server, Duration::from_secs(10), "after the warm-up");
    let (fd0, sock0) = fds(pid);
    let rss0 = rss_kib(pid);
    let sampler = RssSampler::start(pid);

    // 1000 completed, 20 at a time.
    bench(addr, "b513.bin", &fx.sha("b513.bin"), 20, 25);
    bench(addr, ONE_MIB, &fx.sha(ONE_MIB), 20, 25);
    // 400 not found.
    for i in 0..400 {
        let (reply, _) = raw::exchange(addr, &raw::rrq(format!("missing-{i}.bin").as_bytes(), "octet", &[]), Duration::from_secs(3)).expect("no reply to a request for a missing file");
        assert_eq!(raw::parse_error(&reply).map(|e| e.0), Some(1), "missing file: want ERROR 1");
    }
    // 600 that do not complete: ERROR from the client after DATA 1 or 2, or the client
    // vanishes; half of the vanished ones close their socket (the server gets ICMP port
    // unreachable), half keep it open and say nothing (the server times out).
    // Each from its own address: the silent ones hold their sessions for a while, and 64 per
    // client address is the limit (limits.max_sessions_per_client).
    let mut silent = Vec::new();
    for i in 0..600 {
        let s = UdpSocket::bind((Ipv4Addr::new(127, 2, (i / 250) as u8, (i % 250) as u8 + 1), 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(&raw::rrq(ONE_MIB.as_bytes(), "octet", &[]), addr).unwrap();
        let mut buf = [0u8; 1024];
        let (_, tid) = s.recv_from(&mut buf).expect("no DATA 1");
        if i % 2 == 1 {
            s.send_to(&raw::ack(1), tid).unwrap();
            s.recv_from(&mut buf).expect("no DATA 2");
        }
        match i % 6 {
            0 | 1 => {
                let mut e = vec![0, 5, 0, 0];
                e.extend_from_slice(b"client gives up\0");
                s.send_to(&e, tid).unwrap();
            }
            2 | 3 => drop(s),
            _ => silent.push(s),
        }
    }
    wait_no_sessions(&server, Duration::from_secs(60), "after 2000 transfers");
    drop(silent);
    thread::sleep(Duration::from_millis(300));
    let peak = sampler.max();
    let (fd1, sock1) = fds(pid);
    eprintln!("baseline {fd0} fds ({sock0} sockets), RSS {rss0} KiB; after 2000 transfers {fd1} fds ({sock1} sockets), RSS {} KiB, peak {peak} KiB", rss_kib(pid));
    assert_eq!((fd1, sock1), (fd0, sock0), "open fds (sockets) did not return to the baseline");
    assert!(peak < rss0 + 64 * 1024, "RSS grew from {rss0} KiB to a peak of {peak} KiB");
    server.finish(&fx);
}

// ---------------------------------------------------------------------------------------------
// A flood from spoofed sources.
// ---------------------------------------------------------------------------------------------

/// The 1000 spoofed sources: 172.31.0.1 .. 172.31.3.250.
fn spoofed(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, (i / 250) as u8, (i % 250) as u8 + 1)
}

/// 1000 requests for the 1 MiB file from 1000 source addresses that never answer (their
/// replies are dropped and counted per address), while a legitimate client downloads: the
/// client succeeds, the server's RSS stays bounded, no spoofed address receives more than
/// 1 + 2 packets (the first answer and INITIAL_RETRIES retransmissions), and the sessions
/// are all gone afterwards.
#[test]
fn spoofed_request_flood() {
    let _serial = serial_lab();
    if !require_netns() {
        return;
    }
    const N: usize = 1000;
    let fx = fixture();
    let lab = Lab::new("hardflood", 2);
    let (legit, flooder) = (&lab.clients[0], &lab.clients[1]);
    // The spoofed addresses live in the flooder's namespace; the server routes them there.
    let batch: String = (0..N).map(|i| format!("address add {}/32 dev v0\n", spoofed(i))).collect();
    let path = fx.base().join("spoofed.batch");
    fs::write(&path, batch).unwrap();
    run_ok(Command::new(tool("ip")).args(["-n", flooder, "-batch", path.to_str().unwrap()]));
    run_ok(&mut lab.exec(&lab.server, tool("ip"), &["route", "add", "172.31.0.0/22", "via", &lab.client_ip(1).to_string()]));
    let server_ip = lab.server_ip();
    nft_apply(
        &lab,
        flooder,
        &fx,
        &format!(
            "table inet flood {{
                set got {{ type ipv4_addr; size 4096; flags dynamic; counter; }}
                chain input {{ type filter hook input priority 0; policy accept;
                    ip saddr {server_ip} ip daddr 172.31.0.0/22 update @got {{ ip daddr }} counter drop
                }}
                chain output {{ type filter hook output priority 0; policy accept;
                    ip saddr 172.31.0.0/22 ip daddr {server_ip} udp dport 69 counter
                }}
            }}"
        ),
    );
    let server = start_server(&lab, &fx, &[]);
    let pid = server.pid();
    let rss0 = rss_kib(pid);
    let sampler = RssSampler::start(pid);
    let client = Client::Tftpcast { args: vec![] };
    let legit_run = {
        let (fx, ns, addr, client) = (fx.clone(), legit.clone(), server.addr(), client.clone());
        thread::spawn(move || {
            let out = fx.out("legit");
            let r = client.fetch(Some(&ns), addr, ONE_MIB, &out, Duration::from_secs(60));
            (r, out)
        })
    };
    let to = server.addr();
    lab.in_ns(flooder, move || {
        let rrq = raw::rrq(ONE_MIB.as_bytes(), "octet", &[]);
        for i in 0..N {
            let s = UdpSocket::bind((spoofed(i), 0)).expect("bind a spoofed address");
            s.send_to(&rrq, to).unwrap();
            if i % 50 == 49 {
                thread::sleep(Duration::from_millis(5));
            }
        }
    });
    let (r, out) = legit_run.join().unwrap();
    assert_fetched(&client, &r, &out, &fx.sha(ONE_MIB), 1 << 20, "the legitimate client during the flood");
    wait_no_sessions(&server, Duration::from_secs(60), "after the flood");
    let peak = sampler.max();
    thread::sleep(Duration::from_millis(500));
    let set = run_ok(&mut lab.exec(flooder, tool("nft"), &["list", "set", "inet", "flood", "got"]));
    // Elements look like `172.31.0.1 counter packets 4 bytes 2176`.
    let words: Vec<&str> = set.stdout.split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}').filter(|w| !w.is_empty()).collect();
    let mut per_source = Vec::new();
    for w in words.windows(4) {
        if w[0].starts_with("172.31.") && w[1] == "counter" && w[2] == "packets" {
            per_source.push((w[0].to_string(), w[3].parse::<u64>().unwrap()));
        }
    }
    let out_rules = run_ok(&mut lab.exec(flooder, tool("nft"), &["list", "chain", "inet", "flood", "output"]));
    let sent: u64 = out_rules.stdout.split_whitespace().collect::<Vec<_>>().windows(2).find(|p| p[0] == "packets").and_then(|p| p[1].parse().ok()).unwrap();
    let total: u64 = per_source.iter().map(|p| p.1).sum();
    let worst = per_source.iter().max_by_key(|p| p.1).cloned();
    eprintln!(
        "flood: {sent} spoofed requests; {} sources answered, {total} packets to them, worst {worst:?}; RSS {rss0} KiB before, peak {peak} KiB; legitimate client in {:.2?}",
        per_source.len(),
        r.elapsed
    );
    assert_eq!(sent, N as u64, "the flooder did not send every request");
    assert!(!per_source.is_empty(), "no spoofed source got anything: the counting proves nothing\n{set}");
    assert!(worst.as_ref().is_some_and(|w| w.1 <= 3), "a spoofed source got more than 1 + 2 packets: {worst:?}");
    assert!(peak < rss0 + 128 * 1024, "RSS grew from {rss0} KiB to a peak of {peak} KiB during the flood");
    stop(server);
}
