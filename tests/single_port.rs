//! Single-port mode (`serve --single-port`): every transfer is served from the listening port.
//!
//! The lab puts clients behind a NAT router: client namespaces on private networks, a router
//! namespace that masquerades them onto the lab's bridge, and the server namespace, which sees
//! only the router's address. nftables counters in the server namespace prove that no UDP
//! port other than the listening one sends or receives anything.

mod common;

use std::fs;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const PORT: u16 = 69;
const FETCH_LIMIT: Duration = Duration::from_secs(60);

/// A lab whose client 0 is a NAT router with `inner` client namespaces behind it.
struct NatLab {
    lab: Lab,
    inner: Vec<String>,
}

impl NatLab {
    /// `extra` plain clients sit on the bridge next to the router (for multicast).
    fn new(prefix: &str, inner: usize, extra: usize) -> NatLab {
        let lab = Lab::new(prefix, 1 + extra);
        let router = lab.clients[0].clone();
        let mut nat = NatLab { lab, inner: Vec::new() };
        let ip = tool("ip");
        run_ok(&mut nat.lab.exec(&router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]));
        for i in 0..inner {
            // Named like the lab's namespaces (tcl-PREFIX-PID-N-ROLE) so a killed test's
            // leftovers are reaped the same way.
            let name = format!("{}-in{i}", nat.lab.server.trim_end_matches("-srv"));
            run_ok(Command::new(&ip).args(["netns", "add", &name]));
            nat.inner.push(name.clone());
            let (gw, addr) = (format!("192.168.{}.1", 70 + i), format!("192.168.{}.2", 70 + i));
            let rif = format!("r{i}");
            run_ok(Command::new(&ip).args(["-n", &router, "link", "add", &rif, "type", "veth", "peer", "name", "v0", "netns", &name]));
            run_ok(Command::new(&ip).args(["-n", &router, "addr", "add", &format!("{gw}/24"), "dev", &rif]));
            run_ok(Command::new(&ip).args(["-n", &router, "link", "set", &rif, "up"]));
            run_ok(Command::new(&ip).args(["-n", &name, "addr", "add", &format!("{addr}/24"), "dev", "v0"]));
            run_ok(Command::new(&ip).args(["-n", &name, "link", "set", "v0", "up"]));
            run_ok(Command::new(&ip).args(["-n", &name, "link", "set", "lo", "up"]));
            run_ok(Command::new(&ip).args(["-n", &name, "route", "add", "default", "via", &gw]));
        }
        let nft = tool("nft");
        for args in [
            &["add", "table", "ip", "spnat"][..],
            &["add", "chain", "ip", "spnat", "post", "{ type nat hook postrouting priority 100 ; }"][..],
            &["add", "rule", "ip", "spnat", "post", "oifname", "v0", "masquerade"][..],
        ] {
            run_ok(&mut nat.lab.exec(&router, &nft, args));
        }
        // Server side: UDP on any other port than the listening one is counted.
        let srv = nat.lab.server.clone();
        let port = PORT.to_string();
        for args in [
            &["add", "table", "inet", "spcount"][..],
            &["add", "chain", "inet", "spcount", "out", "{ type filter hook output priority 0 ; }"][..],
            &["add", "chain", "inet", "spcount", "in", "{ type filter hook input priority 0 ; }"][..],
            &["add", "rule", "inet", "spcount", "out", "udp", "sport", "!=", &port, "counter"][..],
            &["add", "rule", "inet", "spcount", "out", "udp", "sport", &port, "counter"][..],
            &["add", "rule", "inet", "spcount", "in", "udp", "dport", "!=", &port, "counter"][..],
            &["add", "rule", "inet", "spcount", "in", "udp", "dport", &port, "counter"][..],
        ] {
            run_ok(&mut nat.lab.exec(&srv, &nft, args));
        }
        nat
    }

    /// The address the server sees every NATed client as.
    fn nat_ip(&self) -> IpAddr {
        self.lab.client_ip(0).into()
    }

    /// Packets counted in the server namespace: (out other, out listening, in other, in listening).
    fn counters(&self) -> [u64; 4] {
        let mut v = Vec::new();
        for chain in ["out", "in"] {
            let r = run_ok(&mut self.lab.exec(&self.lab.server, tool("nft"), &["list", "chain", "inet", "spcount", chain]));
            let words: Vec<&str> = r.stdout.split_whitespace().collect();
            v.extend(words.windows(2).filter(|w| w[0] == "packets").map(|w| w[1].parse::<u64>().unwrap()));
        }
        assert_eq!(v.len(), 4, "four counters expected");
        [v[0], v[1], v[2], v[3]]
    }

    /// Asserts that the server used no UDP port but the listening one, and that its listening
    /// port did carry the transfers; `min_out`: packets it must at least have sent.
    fn assert_only_listening_port(&self, min_out: u64) {
        let [out_other, out_port, in_other, in_port] = self.counters();
        eprintln!("server namespace UDP: out {out_port} from port {PORT}, {out_other} from others; in {in_port} to port {PORT}, {in_other} to others");
        assert_eq!((out_other, in_other), (0, 0), "the server sent or received UDP on a port other than {PORT}");
        assert!(out_port >= min_out && in_port > 0, "too little traffic on port {PORT}: out {out_port}, in {in_port}");
        let r = run_ok(&mut self.lab.exec(&self.lab.server, tool("ss"), &["-Huan"]));
        let sockets: Vec<&str> = r.stdout.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(sockets.len(), 1, "one UDP socket expected in the server namespace:\n{}", r.stdout);
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for ns in &self.inner {
            let _ = run(Command::new(tool("ip")).args(["netns", "del", ns]), CMD_LIMIT);
        }
    }
}

fn start_server(nat: &NatLab, fx: &Fixture, extra: &[&str]) -> Server {
    start_server_with(nat, fx, true, "0.0.0.0", extra)
}

/// `wildcard`: "0.0.0.0", or "[::]" for the default dual-stack socket.
fn start_server_with(nat: &NatLab, fx: &Fixture, single_port: bool, wildcard: &str, extra: &[&str]) -> Server {
    let listen = format!("{wildcard}:{PORT}");
    let mut args = vec!["--listen", listen.as_str()];
    if single_port {
        args.push("--single-port");
    }
    args.extend_from_slice(extra);
    Server::start_in(Some(&nat.lab.server), &fx.root, &args)
}

fn peers_started(server: &Server) -> Vec<SocketAddr> {
    events(server, "transfer started").iter().filter_map(|e| field_str(e, "peer").parse().ok()).collect()
}

fn server_addr(nat: &NatLab) -> SocketAddr {
    SocketAddr::from((nat.lab.server_ip(), PORT))
}

/// Fetches `name` from inside namespace `ns` and checks the bytes.
fn fetch_in(ns: &str, fx: &Fixture, client: &Client, server: SocketAddr, name: &str) {
    let out = fx.out(name);
    let r = client.fetch(Some(ns), server, name, &out, FETCH_LIMIT);
    let len = fs::metadata(fx.path(name)).unwrap().len() as usize;
    assert_fetched(client, &r, &out, &fx.sha(name), len, &format!("{name} from behind the NAT"));
}

/// The lab turn and a fixture for a test of single-port mode (tftpcast's own) in a NAT lab
/// that needs `tools`; None when the test is skipped.
fn nat_test(tools: &[&str]) -> Option<(std::sync::MutexGuard<'static, ()>, Fixture)> {
    if !testing_tftpcast() {
        return None;
    }
    let turn = lab_turn(tools)?;
    Some((turn, Fixture::new()))
}

/// Every `event` (one for each of the `count` transfers) shows the peer as the NAT address
/// and the transfer served from the listening port; returns those events.
fn assert_all_from_nat_on_port(server: &Server, nat: &NatLab, event: &str, count: usize) -> Vec<serde_json::Value> {
    let started = events(server, event);
    assert_eq!(started.len(), count, "one {event} per transfer\n{}", server.log_tail(40));
    for e in &started {
        let peer: SocketAddr = field_str(e, "peer").parse().unwrap();
        assert_eq!(peer.ip(), nat.nat_ip(), "the server must see the NAT address: {e}");
        assert_eq!(field_str(e, "tid"), PORT.to_string(), "transfers must be served from the listening port: {e}");
    }
    started
}

#[test]
fn clients_behind_nat_are_served_from_the_listening_port_only() {
    let Some((_serial, fx)) = nat_test(&["tftp", "atftp", "curl", "busybox", "ss", "sysctl"]) else { return };
    let nat = NatLab::new("spnat", 1, 0);
    let mut server = start_server(&nat, &fx, &[]);
    let ns = nat.inner[0].clone();
    let addr = server_addr(&nat);
    let clients = [
        (Client::hpa(), SIZES),
        (Client::Curl { args: vec![] }, NONEMPTY),
        (Client::Curl { args: vec!["--tftp-blksize", "1428"] }, NONEMPTY),
        (Client::Atftp { options: vec![] }, SIZES),
        (Client::Atftp { options: vec!["blksize 1428", "windowsize 8"] }, SIZES),
        (Client::Busybox { blksize: Some(1024) }, SIZES),
        (Client::Tftpcast { args: vec!["--blksize", "1428", "--windowsize", "16"] }, SIZES),
    ];
    let mut fetched = 0;
    for (client, files) in &clients {
        for &(name, _) in *files {
            fetch_in(&ns, &fx, client, addr, name);
            fetched += 1;
        }
    }
    fetch_in(&ns, &fx, &Client::hpa(), addr, NESTED);
    fetched += 1;

    // The server saw only the NAT address, and served every transfer on its own port.
    let started = assert_all_from_nat_on_port(&server, &nat, "transfer started", fetched);
    let windowed = started.iter().filter(|e| field_str(e, "windowsize") == "16" || field_str(e, "windowsize") == "8").count();
    assert!(windowed >= SIZES.len(), "windowsize must be negotiated: {windowed} windowed transfers");
    // 1 MiB at 512 bytes is 2048 DATA packets for tftp-hpa alone.
    nat.assert_only_listening_port(2048);
    assert!(server.is_running(), "{}", server.log_tail(40));
    server.stop_clean();
    server.assert_logs_are_json();
}

/// A lock-step client on a fixed local port; returns the file and every address that answered.
fn raw_fetch_from_port(port: u16, server: SocketAddr, file: &str, pause: Duration) -> Result<Vec<u8>, String> {
    let s = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("bind {port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let rrq = raw::rrq(file.as_bytes(), "octet", &[]);
    let mut last = rrq.clone();
    s.send_to(&rrq, server).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut expect: u16 = 1;
    let mut timeouts = 0;
    let mut buf = vec![0u8; 70000];
    let deadline = Instant::now() + FETCH_LIMIT;
    while Instant::now() < deadline {
        let (n, from) = match s.recv_from(&mut buf) {
            Ok(v) => v,
            Err(_) => {
                timeouts += 1;
                if timeouts > 8 {
                    return Err(format!("{file}: timed out waiting for block {expect}"));
                }
                s.send_to(&last, server).map_err(|e| e.to_string())?;
                continue;
            }
        };
        let p = &buf[..n];
        if from != server {
            return Err(format!("{file}: packet from {from}, not from the listening address {server}"));
        }
        if let Some((code, msg)) = raw::parse_error(p) {
            return Err(format!("{file}: error {code} {msg}"));
        }
        if raw::opcode(p) != Some(raw::DATA) || n < 4 {
            return Err(format!("{file}: unexpected packet {:?}", &p[..n.min(8)]));
        }
        let block = u16::from_be_bytes([p[2], p[3]]);
        if block == expect {
            out.extend_from_slice(&p[4..]);
            last = raw::ack(block);
            s.send_to(&last, server).map_err(|e| e.to_string())?;
            expect = expect.wrapping_add(1);
            if n < 516 {
                return Ok(out);
            }
            thread::sleep(pause);
        } else {
            s.send_to(&last, server).map_err(|e| e.to_string())?;
        }
    }
    Err(format!("{file}: not done within {FETCH_LIMIT:?}"))
}

#[test]
fn two_clients_behind_one_nat_address_get_independent_transfers() {
    let Some((_serial, fx)) = nat_test(&["tftp", "atftp", "ss", "sysctl"]) else { return };
    // Two different files, long enough (at a few ms per block) to overlap in time.
    let files = ["spa.bin", "spb.bin"];
    for (i, f) in files.iter().enumerate() {
        fs::write(fx.path(f), pseudo_random(300 * 512 + 100 * (i + 1), seed_of(f))).unwrap();
    }
    let nat = NatLab::new("spsame", 2, 0);
    let mut server = start_server(&nat, &fx, &[]);
    let addr = server_addr(&nat);

    // 1. Both private clients use the same source port: the NAT has to give one of them
    //    another port, and the server sees one address with two ports.
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let (b, file) = (barrier.clone(), files[i].to_string());
            nat.lab.spawn_in_ns(&nat.inner[i], move || {
                b.wait();
                raw_fetch_from_port(40000, addr, &file, Duration::from_millis(2))
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.join().unwrap().unwrap_or_else(|e| panic!("client {i}: {e}\n{}", server.log_tail(40)));
        let want = fs::read(fx.path(files[i])).unwrap();
        assert!(got == want, "client {i} got {} bytes of {}, not the exact file", got.len(), files[i]);
    }
    let peers = peers_started(&server);
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert!(peers.iter().all(|p| p.ip() == nat.nat_ip()), "both from the NAT address: {peers:?}");
    assert_ne!(peers[0].port(), peers[1].port(), "two ports of one address are two transfers: {peers:?}");
    // The server logs completion when the last ACK arrives, just after the client is done.
    let t0 = Instant::now();
    while events(&server, "transfer complete").len() < 2 && t0.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(events(&server, "transfer complete").len(), 2, "{}", server.log_tail(40));

    // 2. Real clients at once, one behind each private network, different files and options.
    let t = [(Client::Atftp { options: vec!["blksize 1024", "windowsize 4"] }, files[0]), (Client::hpa(), files[1])];
    let mut children: Vec<(ChildGuard, std::path::PathBuf, &str, &Client)> = Vec::new();
    for (i, (client, file)) in t.iter().enumerate() {
        let out = fx.out(file);
        let mut cmd = client.command(Some(&nat.inner[i]), addr, file, &out);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        children.push((ChildGuard(cmd.spawn().unwrap()), out, file, client));
    }
    let deadline = Instant::now() + FETCH_LIMIT;
    for (mut child, out, file, client) in children {
        let st = loop {
            if let Some(st) = child.0.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "{client:?} did not finish {file}");
            thread::sleep(Duration::from_millis(20));
        };
        assert!(st.success(), "{client:?} failed on {file}");
        assert_eq!(sha256_file(&out), fx.sha(file), "{client:?}: {file} not byte-exact");
    }
    let peers = peers_started(&server);
    assert_eq!(peers.len(), 4, "{peers:?}");
    nat.assert_only_listening_port(600);
    server.stop_clean();
}

#[test]
fn multicast_clients_complete_in_single_port_mode() {
    let Some((_serial, fx)) = nat_test(&["atftp", "ss", "sysctl"]) else { return };
    // Three multicast clients on the bridge (multicast does not cross the NAT router), and a
    // unicast one behind the NAT at the same time.
    let nat = NatLab::new("spmc", 1, 3);
    let srv = nat.lab.server.clone();
    let nft = tool("nft");
    run_ok(&mut nat.lab.exec(&srv, &nft, &["add", "chain", "inet", "spcount", "mc", "{ type filter hook output priority 1 ; }"]));
    run_ok(&mut nat.lab.exec(&srv, &nft, &["add", "rule", "inet", "spcount", "mc", "ip", "daddr", "224.0.0.0/4", "counter"]));
    // The default dual-stack socket: IPv4 multicast options and mapped addresses on it.
    let mut server = start_server_with(&nat, &fx, true, "[::]", &["--start-delay-ms", "500"]);
    let addr = server_addr(&nat);
    let mc = [
        Client::Atftp { options: vec!["multicast", "blksize 1428"] },
        Client::Atftp { options: vec!["multicast", "blksize 1428", "timeout 1"] },
        Client::Tftpcast { args: vec!["--multicast", "--blksize", "1428"] },
    ];
    let mut children = Vec::new();
    for (i, client) in mc.iter().enumerate() {
        let out = fx.out(ONE_MIB);
        let mut cmd = client.command(Some(&nat.lab.clients[1 + i]), addr, ONE_MIB, &out);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        children.push((ChildGuard(cmd.spawn().unwrap()), out, client));
    }
    fetch_in(&nat.inner[0], &fx, &Client::hpa(), addr, "b513.bin");
    let deadline = Instant::now() + FETCH_LIMIT;
    for (mut child, out, client) in children {
        let st = loop {
            if let Some(st) = child.0.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "{client:?} did not finish\n{}", server.log_tail(60));
            thread::sleep(Duration::from_millis(20));
        };
        assert!(st.success(), "{client:?} failed\n{}", server.log_tail(60));
        assert_eq!(sha256_file(&out), fx.sha(ONE_MIB), "{client:?}: not byte-exact");
    }
    let joins = events(&server, "multicast request joined group");
    let peers: std::collections::HashSet<String> = joins.iter().map(|e| field_str(e, "peer")).collect();
    assert_eq!(peers.len(), 3, "three clients joined a group: {joins:?}");
    // The group's DATA went to the group address, from the listening port like everything else.
    let r = run_ok(&mut nat.lab.exec(&srv, &nft, &["list", "chain", "inet", "spcount", "mc"]));
    let words: Vec<&str> = r.stdout.split_whitespace().collect();
    let mc_packets: u64 = words.windows(2).find(|w| w[0] == "packets").and_then(|w| w[1].parse().ok()).unwrap();
    let blocks = (1u64 << 20) / 1428;
    eprintln!("multicast packets sent: {mc_packets} (file: {blocks} blocks)");
    assert!(mc_packets >= blocks, "the file must have been multicast: {mc_packets} packets to groups");
    assert!(mc_packets < blocks * 2, "one stream for three clients, not one each: {mc_packets} packets");
    nat.assert_only_listening_port(blocks);
    server.stop_clean();
    server.assert_logs_are_json();
}

/// The lab's NAT is the problem single-port mode solves: without it, the server's first DATA
/// comes from a new port, which the masquerading router does not map back to the client.
#[test]
fn without_single_port_the_nat_drops_the_transfer() {
    let Some((_serial, fx)) = nat_test(&["sysctl"]) else { return };
    let nat = NatLab::new("spnone", 1, 0);
    let mut server = start_server_with(&nat, &fx, false, "0.0.0.0", &[]);
    let addr = server_addr(&nat);
    let r = nat.lab.in_ns(&nat.inner[0], move || raw_fetch_from_port(0, addr, "b513.bin", Duration::ZERO));
    assert!(r.is_err(), "a transfer port answered through the NAT: the lab is no NAT");
    let started = events(&server, "transfer started");
    assert!(!started.is_empty() && field_str(&started[0], "tid") != PORT.to_string(), "{}", server.log_tail(20));
    server.stop_clean();
}

/// Waits up to `wait` for any datagram on `s`.
fn any_reply(s: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0u8; 70000];
    s.recv_from(&mut buf).ok().map(|(n, from)| (buf[..n].to_vec(), from))
}

/// On loopback: packets that are not requests, from peers without a transfer, get no answer
/// (anti-amplification); a stranger's ACKs, even from the same address, do not touch a
/// running transfer; a repeated request starts no second transfer.
#[test]
fn strangers_get_no_answer_on_the_shared_port() {
    let Some((fx, server)) = serve_if(testing_tftpcast(), &["--single-port"]) else { return };
    let addr = server.addr();
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    for p in [raw::ack(1), raw::ack(0), vec![0, 3, 0, 1, b'x'], vec![0, 5, 0, 0, 0], vec![0, 6, b'a', 0, b'1', 0]] {
        stranger.send_to(&p, addr).unwrap();
        assert_eq!(any_reply(&stranger, Duration::from_millis(300)), None, "the server answered {p:?} from a stranger");
    }

    // A transfer in lock step, with a stranger spraying ACKs for its blocks meanwhile.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(&raw::rrq(b"one_mib.bin", "octet", &[]), addr).unwrap();
    let mut data = Vec::new();
    let mut expect: u16 = 1;
    loop {
        let (p, from) = any_reply(&client, Duration::from_secs(5)).expect("the transfer stalled");
        assert_eq!(from, addr, "every packet of the transfer comes from the listening port");
        assert_eq!(raw::opcode(&p), Some(raw::DATA), "{:?}", raw::parse_error(&p));
        let block = u16::from_be_bytes([p[2], p[3]]);
        if block != expect {
            continue;
        }
        if expect == 3 {
            // The client repeats its request: a duplicate, not a second transfer.
            client.send_to(&raw::rrq(b"one_mib.bin", "octet", &[]), addr).unwrap();
        }
        data.extend_from_slice(&p[4..]);
        // The stranger acknowledges ahead of the client: it must not move the transfer on.
        stranger.send_to(&raw::ack(block.wrapping_add(5)), addr).unwrap();
        client.send_to(&raw::ack(block), addr).unwrap();
        expect = expect.wrapping_add(1);
        if p.len() < 516 {
            break;
        }
    }
    assert!(data == fs::read(fx.path(ONE_MIB)).unwrap(), "not byte-exact: {} bytes", data.len());
    assert_eq!(any_reply(&stranger, Duration::from_millis(200)), None, "the stranger got an answer");
    assert_eq!(events(&server, "transfer started").len(), 1, "a repeated request started a transfer\n{}", server.log_tail(20));
    server.finish(&fx);
}

/// Many transfers at once on one port, with windows: every one byte-exact.
#[test]
fn many_concurrent_transfers_share_the_port() {
    let Some((fx, server)) = serve_if(testing_tftpcast(), &["--single-port"]) else { return };
    let addr = server.addr();
    let clients: Vec<Client> = (0..12)
        .map(|i| match i % 3 {
            0 => Client::Tftpcast { args: vec!["--blksize", "1428", "--windowsize", "16"] },
            1 => Client::Tftpcast { args: vec!["--blksize", "512", "--windowsize", "4"] },
            _ => Client::Tftpcast { args: vec![] },
        })
        .collect();
    let mut children = Vec::new();
    for c in &clients {
        let out = fx.out(ONE_MIB);
        let mut cmd = c.command(None, addr, ONE_MIB, &out);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        children.push((ChildGuard(cmd.spawn().unwrap()), out, c));
    }
    let deadline = Instant::now() + FETCH_LIMIT;
    for (mut child, out, c) in children {
        let st = loop {
            if let Some(st) = child.0.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "{c:?} did not finish");
            thread::sleep(Duration::from_millis(20));
        };
        assert!(st.success(), "{c:?} failed\n{}", server.log_tail(30));
        assert_eq!(sha256_file(&out), fx.sha(ONE_MIB), "{c:?}: not byte-exact");
    }
    let started = events(&server, "transfer started");
    assert_eq!(started.len(), clients.len());
    assert!(started.iter().all(|e| field_str(e, "tid") == server.port().to_string()), "all from the listening port");
    server.finish(&fx);
}

/// Uploads from behind the NAT in single-port mode (tftp-hpa `put`, curl -T at 512 and 1428
/// bytes): stored byte-exact, each served from the listening port, and no other UDP port used.
#[test]
fn uploads_behind_nat_use_the_listening_port_only() {
    let Some((_serial, fx)) = nat_test(&["tftp", "curl", "ss", "sysctl"]) else { return };
    let nat = NatLab::new("spup", 1, 0);
    let mut server = start_server(&nat, &fx, &["--allow-write"]);
    let ns = nat.inner[0].clone();
    let addr = server_addr(&nat);
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let mut uploads = 0;
    for client in ["tftp", "curl", "curl 1428"] {
        for len in [0usize, 511, 512, 513, 70_000, 1 << 20] {
            let remote = format!("up-{}-{len}.bin", client.replace(' ', "-"));
            let src = fx.out(&format!("src-{remote}"));
            let want = pseudo_random(len, seed_of(&remote));
            fs::write(&src, &want).unwrap();
            let local = src.to_str().unwrap();
            let url = format!("tftp://{addr}/{remote}");
            let mut cmd = match client {
                "tftp" => nat.lab.exec(&ns, tool("tftp"), &[&host, &port, "-m", "binary", "-c", "put", local, &remote]),
                "curl" => nat.lab.exec(&ns, tool("curl"), &["-sS", "-T", local, &url]),
                _ => nat.lab.exec(&ns, tool("curl"), &["-sS", "--tftp-blksize", "1428", "-T", local, &url]),
            };
            let r = run(&mut cmd, FETCH_LIMIT);
            assert!(r.success() && !r.output().contains("Error code") && !r.output().contains("timed out"), "{client} put of {len} bytes: {r}\n{}", server.log_tail(20));
            let got = fs::read(fx.path(&remote)).unwrap_or_else(|e| panic!("{client}: {remote} not stored: {e}\n{r}"));
            assert!(got.len() == len && sha256(&got) == sha256(&want), "{client}: stored {} bytes, sent {len} (or content differs)", got.len());
            uploads += 1;
        }
    }
    assert_all_from_nat_on_port(&server, &nat, "upload started", uploads);
    assert_eq!(events(&server, "upload finished").len(), uploads, "{}", server.log_tail(40));
    // 1 MiB from tftp-hpa at 512 bytes alone is 2049 ACKs from the listening port.
    nat.assert_only_listening_port(2048);
    assert!(server.is_running(), "{}", server.log_tail(40));
    server.stop_clean();
    server.assert_logs_are_json();
}
