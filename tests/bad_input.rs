//! The bad-input suite (issue 6): malformed, truncated, hostile and out-of-order packets sent
//! to a real server on real loopback sockets.
//!
//! Every case asserts the exact reply (an ERROR with a given code, an OACK with given values,
//! or silence for [`SILENCE`]) and then that the server still serves a normal request
//! byte-exact. The traversal cases also watch the files outside the served root with inotify:
//! the server must never even open them, and no reply may carry their bytes.
//!
//! The expected behaviour, as the server documents it:
//! - on the listening port, requests that cannot be parsed and unknown opcodes get a short ERROR 4
//!   (RFC 1350's "Illegal TFTP operation"; the reason is logged); DATA, ACK, OACK and ERROR
//!   get no answer (answering spoofed strays would make the server a reflector); a known
//!   option with a bad value gets ERROR 8; unknown options are ignored, however many fit in
//!   a request, and options that do not fit get ERROR 8;
//! - every ERROR 1-7 carries RFC 1350's text for its code, nothing else;
//! - file names: `..` in any spelling and anything leaving the root is ERROR 2 (access
//!   violation), a name that does not exist or is not a regular file is ERROR 1;
//! - on a transfer port (TID): ACKs that do not move the window are ignored without any
//!   retransmission, a client ERROR ends the transfer silently, a client DATA gets ERROR 4
//!   and ends it, a packet from another port gets ERROR 5 and changes nothing.

mod common;

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::raw::{self, ACK, DATA, ERROR, OACK};
use common::*;

/// How long "no reply" is waited for.
const SILENCE: Duration = Duration::from_millis(300);
/// How long a reply may take.
const REPLY: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

/// These cases assert tftpcast's own replies; in.tftpd differs on purpose in many of them.
fn tftpcast_only() -> bool {
    if testing_tftpcast() {
        return true;
    }
    eprintln!("SKIPPED: the bad-input suite asserts tftpcast's exact replies");
    false
}

fn client_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    s
}

/// The next datagram on `sock` within `wait`.
fn recv(sock: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 70000];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => return Some((buf[..n].to_vec(), from)),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            // An ICMP port unreachable surfaces as ECONNREFUSED on Linux: not a datagram.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Every datagram on `sock` during `wait`.
fn collect(sock: &UdpSocket, wait: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match recv(sock, left) {
            Some(p) => got.push(p),
            None => break,
        }
    }
    got
}

fn show(p: &[u8]) -> String {
    match raw::opcode(p) {
        Some(ERROR) => format!("ERROR {:?}", raw::parse_error(p)),
        Some(OACK) => format!("OACK {:?}", raw::parse_oack(p)),
        Some(DATA) if p.len() >= 4 => format!("DATA block {} ({} bytes)", u16::from_be_bytes([p[2], p[3]]), p.len() - 4),
        Some(ACK) if p.len() >= 4 => format!("ACK {}", u16::from_be_bytes([p[2], p[3]])),
        _ => format!("{} bytes {:?}", p.len(), &p[..p.len().min(32)]),
    }
}

fn short(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(&p[..p.len().min(80)]).into_owned();
    if p.len() > 80 {
        format!("{s:?}... ({} bytes)", p.len())
    } else {
        format!("{s:?}")
    }
}

/// Sends `pkt` to the server from a fresh socket and asserts an ERROR with `code` as the only
/// reply; returns the message.
fn expect_error(server: &Server, pkt: &[u8], code: u16, what: &str) -> String {
    let sock = client_socket();
    sock.send_to(pkt, server.addr()).unwrap();
    let Some((reply, from)) = recv(&sock, REPLY) else {
        panic!("{what}: no reply within {REPLY:?}, want ERROR {code}\n  sent {}\n{}", short(pkt), server.log_tail(20));
    };
    let got = raw::parse_error(&reply);
    assert!(
        matches!(&got, Some((c, _)) if *c == code),
        "{what}: got {} from {from}, want ERROR {code}\n  sent {}",
        show(&reply),
        short(pkt)
    );
    // Codes 1-7 carry RFC 1350's texts, which scripts and client wrappers match on.
    let msg = got.clone().unwrap().1;
    if let Some(text) = RFC_1350_TEXTS.get(code as usize).filter(|_| code > 0) {
        assert_eq!(&msg, text, "{what}: ERROR {code} with another text than RFC 1350's");
    }
    // Exactly one packet: no retransmitted error, no transfer behind it.
    let more = collect(&sock, SILENCE);
    assert!(more.is_empty(), "{what}: more than one reply: {:?}", more.iter().map(|(p, _)| show(p)).collect::<Vec<_>>());
    msg
}

/// RFC 1350's error texts by code (0 has none: its message says what happened).
const RFC_1350_TEXTS: [&str; 8] = [
    "",
    "File not found",
    "Access violation",
    "Disk full or allocation exceeded",
    "Illegal TFTP operation",
    "Unknown transfer ID",
    "File already exists",
    "No such user",
];

/// Asserts that the ERROR with `msg` answering `pkt` is ERROR 4's fixed RFC 1350 text (27
/// bytes, 13.5x a bare `00 01`): a spoofed malformed request buys a short reply that never
/// grows with the request; the detailed reason is only logged.
fn assert_small_reply(pkt: &[u8], msg: &str, what: &str) {
    let reply = 4 + msg.len() + 1;
    assert_eq!(msg, "Illegal TFTP operation", "{what}: ERROR 4 must carry RFC 1350's text");
    assert!(reply * 2 <= pkt.len().max(1) * 27, "{what}: a {reply}-byte ERROR ({msg:?}) for a {}-byte request amplifies more than 13.5x", pkt.len());
}

/// Sends `pkt` to `to` from a fresh socket and asserts that nothing comes back within
/// [`SILENCE`].
fn expect_silence_to(server: &Server, to: SocketAddr, pkt: &[u8], what: &str) {
    let sock = client_socket();
    sock.send_to(pkt, to).unwrap();
    if let Some((reply, from)) = recv(&sock, SILENCE) {
        panic!("{what}: want silence, got {} from {from}\n  sent {}\n{}", show(&reply), short(pkt), server.log_tail(10));
    }
}

fn expect_silence(server: &Server, pkt: &[u8], what: &str) {
    expect_silence_to(server, server.addr(), pkt, what)
}

/// Sends an RRQ and returns the first reply (from the transfer port).
fn first_reply(server: &Server, pkt: &[u8], what: &str) -> (Vec<u8>, SocketAddr) {
    let sock = client_socket();
    sock.send_to(pkt, server.addr()).unwrap();
    let r = recv(&sock, REPLY).unwrap_or_else(|| panic!("{what}: no reply within {REPLY:?}\n  sent {}\n{}", short(pkt), server.log_tail(20)));
    // Stop the transfer cleanly: the server must not keep retransmitting to this socket.
    let mut e = ERROR.to_be_bytes().to_vec();
    e.extend_from_slice(&0u16.to_be_bytes());
    e.extend_from_slice(b"test done\0");
    let _ = sock.send_to(&e, r.1);
    r
}

/// Asserts that `pkt` starts a transfer answered with an OACK holding exactly `want`.
fn expect_oack(server: &Server, pkt: &[u8], want: &[(&str, &str)], what: &str) {
    let (reply, _) = first_reply(server, pkt, what);
    assert_eq!(raw::opcode(&reply), Some(OACK), "{what}: got {}, want an OACK", show(&reply));
    let got = raw::parse_oack(&reply);
    let want: Vec<(String, String)> = want.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(got, want, "{what}: OACK contents");
}

/// Asserts that `pkt` starts a transfer with no OACK: DATA block 1 comes first.
fn expect_data1(server: &Server, pkt: &[u8], what: &str) {
    let (reply, _) = first_reply(server, pkt, what);
    assert!(
        raw::opcode(&reply) == Some(DATA) && reply.len() >= 4 && reply[2..4] == [0, 1],
        "{what}: got {}, want DATA block 1 (no OACK)",
        show(&reply)
    );
}

/// A request built by hand: opcode, then fields each followed by NUL.
fn request(op: u16, fields: &[&[u8]]) -> Vec<u8> {
    let mut p = op.to_be_bytes().to_vec();
    for f in fields {
        p.extend_from_slice(f);
        p.push(0);
    }
    p
}

fn error_packet(code: u16, msg: &str) -> Vec<u8> {
    let mut e = ERROR.to_be_bytes().to_vec();
    e.extend_from_slice(&code.to_be_bytes());
    e.extend_from_slice(msg.as_bytes());
    e.push(0);
    e
}

fn data_packet(block: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = DATA.to_be_bytes().to_vec();
    p.extend_from_slice(&block.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// The server still answers a new client quickly and byte-exact.
fn assert_still_serves(server: &Server, fx: &Fixture, what: &str) {
    let t = Instant::now();
    let r = raw::get(server.addr(), "b513.bin", "octet", &[], Duration::from_secs(10));
    assert!(
        r.complete && r.error.is_none() && r.data == fs::read(fx.path("b513.bin")).unwrap(),
        "after {what}: the server no longer serves a new request byte-exact: {r}\n{}",
        server.log_tail(30)
    );
    assert!(t.elapsed() < Duration::from_secs(3), "after {what}: a small file took {:?}", t.elapsed());
}

/// A file of the fixture, by name.
fn file(fx: &Fixture, name: &str) -> Vec<u8> {
    fs::read(fx.path(name)).unwrap()
}

/// Writes a configuration file into the fixture's temporary tree and returns its path.
fn config_file(fx: &Fixture, toml: &str) -> String {
    let p = fx.base().join(format!("config-{}.toml", next_id()));
    fs::write(&p, toml).unwrap();
    p.to_str().unwrap().to_string()
}

/// A lock-step transfer driven packet by packet from one client socket.
struct Xfer {
    sock: UdpSocket,
    tid: SocketAddr,
    blksize: usize,
    data: Vec<u8>,
    /// Last in-order block received.
    block: u16,
    last_len: usize,
    /// DATA received again (timer retransmissions of a block already held).
    repeats: u64,
}

impl Xfer {
    /// Sends an RRQ for `name` and receives DATA block 1 (acknowledging an OACK first).
    fn start(server: &Server, name: &str, opts: &[(&str, &str)]) -> Xfer {
        let sock = client_socket();
        sock.send_to(&raw::rrq(name.as_bytes(), "octet", opts), server.addr()).unwrap();
        let (p, tid) = recv(&sock, REPLY).unwrap_or_else(|| panic!("no reply to RRQ {name}\n{}", server.log_tail(20)));
        assert_ne!(tid, server.addr(), "the transfer must come from a new port (TID)");
        let mut x = Xfer { sock, tid, blksize: 512, data: Vec::new(), block: 0, last_len: 0, repeats: 0 };
        match raw::opcode(&p) {
            Some(OACK) => {
                for (k, v) in raw::parse_oack(&p) {
                    if k == "blksize" {
                        x.blksize = v.parse().unwrap();
                    }
                }
                x.ack(0);
                x.expect_data(1);
            }
            Some(DATA) => x.take(&p, 1),
            _ => panic!("RRQ {name}: got {}", show(&p)),
        }
        x
    }

    fn take(&mut self, p: &[u8], want: u16) {
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), want);
        self.data.extend_from_slice(&p[4..]);
        self.last_len = p.len() - 4;
        self.block = want;
    }

    fn send(&self, pkt: &[u8]) {
        self.sock.send_to(pkt, self.tid).unwrap();
    }

    fn ack(&self, block: u16) {
        self.send(&raw::ack(block));
    }

    /// Waits for DATA `want`; repeats of blocks already held (timer retransmissions) are
    /// counted and skipped; anything else fails.
    fn expect_data(&mut self, want: u16) {
        let deadline = Instant::now() + REPLY;
        loop {
            let left = deadline.checked_duration_since(Instant::now()).unwrap_or_default();
            let (p, from) = recv(&self.sock, left).unwrap_or_else(|| panic!("DATA {want} did not come within {REPLY:?}"));
            assert_eq!(from, self.tid, "a packet from another port than the transfer's: {}", show(&p));
            assert_eq!(raw::opcode(&p), Some(DATA), "waiting for DATA {want}: got {}", show(&p));
            let b = u16::from_be_bytes([p[2], p[3]]);
            if b == want {
                self.take(&p, want);
                return;
            }
            assert!(b.wrapping_sub(self.block) > 0x8000 || b == self.block, "waiting for DATA {want} (held {}): got DATA {b}", self.block);
            self.repeats += 1;
        }
    }

    /// ACKs and receives blocks until `block` is held.
    fn advance_to(&mut self, block: u16) {
        while self.block < block {
            self.ack(self.block);
            let next = self.block + 1;
            self.expect_data(next);
        }
    }

    /// Finishes the transfer in lock step and returns the file's bytes.
    fn finish(mut self) -> Vec<u8> {
        while self.last_len == self.blksize {
            self.ack(self.block);
            let next = self.block.wrapping_add(1);
            self.expect_data(next);
        }
        self.ack(self.block);
        self.data
    }

    /// Every datagram on the client socket during `wait`.
    fn collect(&self, wait: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
        collect(&self.sock, wait)
    }
}

/// DATA blocks among `got`, asserting that everything came from `tid`.
fn data_blocks(got: &[(Vec<u8>, SocketAddr)], tid: SocketAddr, what: &str) -> Vec<u16> {
    got.iter()
        .map(|(p, from)| {
            assert_eq!(*from, tid, "{what}: packet from {from}, not the transfer's port: {}", show(p));
            assert_eq!(raw::opcode(p), Some(DATA), "{what}: unexpected {}", show(p));
            u16::from_be_bytes([p[2], p[3]])
        })
        .collect()
}

/// Fails if the server logged no line containing every one of `needles` within `wait`.
fn wait_for_log(server: &Server, needles: &[&str], wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        if server.logs().iter().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(Instant::now() < deadline, "no log line with {needles:?} within {wait:?}\n{}", server.log_tail(30));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Watches files with inotify and counts every open or read of them.
struct OpenWatch {
    fd: libc::c_int,
}

impl OpenWatch {
    fn new(paths: &[&Path]) -> OpenWatch {
        // SAFETY: plain syscalls; the descriptor is owned by the value and closed on drop.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
        for p in paths {
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
            // SAFETY: valid descriptor and NUL-terminated path.
            let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS) };
            assert!(wd >= 0, "inotify_add_watch {}: {}", p.display(), std::io::Error::last_os_error());
        }
        OpenWatch { fd }
    }

    /// Opens and reads seen since the previous call.
    fn events(&self) -> usize {
        let mut n = 0;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a buffer we own, of the length given.
            let r = unsafe { libc::read(self.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if r <= 0 {
                return n;
            }
            let mut off = 0usize;
            while off + 16 <= r as usize {
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
                n += 1;
                off += 16 + len;
            }
        }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

// ---------------------------------------------------------------------------------------------
// The listening port.
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_requests_get_error_4() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let long_name = vec![b'a'; 2100];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("RRQ without NUL after the file name", b"\x00\x01b513.bin".to_vec()),
        ("RRQ without a mode", b"\x00\x01b513.bin\x00".to_vec()),
        ("RRQ with a mode but no NUL after it", b"\x00\x01b513.bin\x00octet".to_vec()),
        ("RRQ with an empty file name", request(1, &[b"", b"octet"])),
        ("RRQ with an empty mode", request(1, &[b"b513.bin", b""])),
        ("RRQ with unknown mode `binary`", request(1, &[b"b513.bin", b"binary"])),
        ("RRQ with mode `mail`", request(1, &[b"b513.bin", b"mail"])),
        ("RRQ with mode `MAIL`", request(1, &[b"b513.bin", b"MAIL"])),
        ("RRQ with an option without value", request(1, &[b"b513.bin", b"octet", b"blksize"])),
        ("RRQ with an option whose value lacks its NUL", b"\x00\x01b513.bin\x00octet\x00blksize\x001024".to_vec()),
        ("RRQ with a 2100-byte file name", request(1, &[&long_name, b"octet"])),
        ("RRQ with a NUL inside the name (the rest becomes the mode)", request(1, &[b"b513.bin", b"../canary.txt", b"octet"])),
        ("WRQ without a mode", b"\x00\x02up.bin\x00".to_vec()),
        ("WRQ of 2049 bytes", {
            let mut w = raw::wrq(&vec![b'w'; 2100], "octet", &[]);
            w.truncate(2049);
            w
        }),
    ];
    for (what, pkt) in &cases {
        let msg = expect_error(&server, pkt, 4, what);
        assert_small_reply(pkt, &msg, what);
    }
    assert_still_serves(&server, &fx, "malformed requests");
    server.finish(&fx);
}

#[test]
fn unknown_opcodes_get_error_4() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    for op in [0u16, 7, 8, 9, 255, 256, 257, 0x0300, 65535] {
        let msg = expect_error(&server, &op.to_be_bytes(), 4, &format!("bare opcode {op}"));
        assert_small_reply(&op.to_be_bytes(), &msg, &format!("bare opcode {op}"));
        let mut p = op.to_be_bytes().to_vec();
        p.extend_from_slice(b"b513.bin\0octet\0");
        expect_error(&server, &p, 4, &format!("opcode {op} with a request body"));
    }
    assert_still_serves(&server, &fx, "unknown opcodes");
    server.finish(&fx);
}

#[test]
fn non_requests_and_truncated_packets_to_the_listener() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let silent: Vec<(&str, Vec<u8>)> = vec![
        ("empty datagram", vec![]),
        ("1 byte 0x00", vec![0]),
        ("1 byte 0x01", vec![1]),
        ("1 byte 0x02", vec![2]),
        ("DATA opcode only", vec![0, 3]),
        ("DATA, 3 bytes", vec![0, 3, 0]),
        ("DATA block 1", data_packet(1, b"hello")),
        ("DATA block 0, empty", data_packet(0, b"")),
        ("DATA of 65468 bytes", data_packet(1, &vec![0u8; 65464])),
        ("ACK opcode only", vec![0, 4]),
        ("ACK, 3 bytes", vec![0, 4, 0]),
        ("ACK 0", raw::ack(0)),
        ("ACK 1", raw::ack(1)),
        ("ACK 65535", raw::ack(65535)),
        ("ACK with trailing bytes", vec![0, 4, 0, 1, 9, 9, 9]),
        ("ERROR opcode only", vec![0, 5]),
        ("ERROR, 3 bytes", vec![0, 5, 0]),
        ("ERROR 0", error_packet(0, "go away")),
        ("ERROR 5 without NUL", vec![0, 5, 0, 5, b'x']),
        ("ERROR with code 999", error_packet(999, "?")),
        ("OACK opcode only", vec![0, 6]),
        ("OACK blksize", request(6, &[b"blksize", b"1024"])),
        ("OACK without terminator", b"\x00\x06blksize\x001024".to_vec()),
    ];
    for (what, pkt) in &silent {
        expect_silence(&server, pkt, what);
    }
    // Truncated requests are requests: a short ERROR 4.
    let truncated: [(&str, &[u8]); 4] = [("RRQ opcode only", &[0, 1]), ("WRQ opcode only", &[0, 2]), ("RRQ, 3 bytes", &[0, 1, b'f']), ("WRQ, 3 bytes", &[0, 2, 0])];
    for (what, pkt) in truncated {
        let msg = expect_error(&server, pkt, 4, what);
        assert_small_reply(pkt, &msg, what);
    }
    assert_still_serves(&server, &fx, "strays and truncated packets");
    server.finish(&fx);
}

#[test]
fn bad_option_values_get_error_8() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let cases: &[&[(&str, &str)]] = &[
        &[("blksize", "7")],
        &[("blksize", "0")],
        &[("blksize", "abc")],
        &[("blksize", "")],
        &[("blksize", "-1")],
        &[("blksize", "+512")],
        &[("blksize", " 512")],
        &[("blksize", "512 ")],
        &[("blksize", "0x200")],
        &[("blksize", "1e3")],
        &[("blksize", "99999999999999999999999")],
        &[("timeout", "0")],
        &[("timeout", "256")],
        &[("timeout", "-1")],
        &[("timeout", "1.5")],
        &[("timeout", "")],
        &[("windowsize", "0")],
        &[("windowsize", "x")],
        &[("windowsize", "")],
        &[("tsize", "x")],
        &[("tsize", "-1")],
        &[("tsize", "")],
        &[("blksize", "512"), ("blksize", "1024")],
        &[("blksize", "512"), ("BLKSIZE", "512")],
        &[("tsize", "0"), ("tsize", "0")],
        &[("timeout", "1"), ("windowsize", "4"), ("timeout", "2")],
        &[("foo", "bar"), ("windowsize", "0")],
    ];
    for opts in cases {
        let msg = expect_error(&server, &raw::rrq(b"b513.bin", "octet", opts), 8, &format!("options {opts:?}"));
        assert!(!msg.is_empty(), "options {opts:?}: ERROR 8 without a message");
    }
    assert_still_serves(&server, &fx, "bad option values");
    server.finish(&fx);
}

#[test]
fn option_negotiation_edges() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let size = file(&fx, "one_mib.bin").len().to_string();
    let rrq = |opts: &[(&str, &str)]| raw::rrq(b"one_mib.bin", "octet", opts);
    // Larger than allowed: the largest allowed (65464 on loopback, whose MTU is 65536).
    expect_oack(&server, &rrq(&[("blksize", "100000")]), &[("blksize", "65464")], "blksize 100000");
    expect_oack(&server, &rrq(&[("blksize", "65465")]), &[("blksize", "65464")], "blksize 65465");
    expect_oack(&server, &rrq(&[("blksize", "8")]), &[("blksize", "8")], "blksize 8");
    expect_oack(&server, &rrq(&[("blksize", "0001024")]), &[("blksize", "1024")], "blksize with leading zeros");
    expect_oack(&server, &rrq(&[("windowsize", "100000")]), &[("windowsize", "64")], "windowsize 100000");
    expect_oack(&server, &rrq(&[("timeout", "255")]), &[("timeout", "255")], "timeout 255");
    expect_oack(&server, &rrq(&[("tsize", "0")]), &[("tsize", &size)], "tsize 0 on a read");
    expect_oack(&server, &rrq(&[("tsize", "12345")]), &[("tsize", &size)], "tsize 12345 on a read: the real size");
    // Names are case-insensitive and the OACK keeps the client's order.
    expect_oack(
        &server,
        &rrq(&[("TSize", "0"), ("BLKSIZE", "1432"), ("WindowSize", "4")]),
        &[("tsize", &size), ("blksize", "1432"), ("windowsize", "4")],
        "mixed-case option names",
    );
    // Unknown options are ignored: the OACK omits them...
    expect_oack(&server, &rrq(&[("foo", "bar"), ("blksize", "1024"), ("rollover", "1")]), &[("blksize", "1024")], "unknown + blksize");
    // ... and with only unknown ones there is no OACK at all.
    expect_data1(&server, &rrq(&[("foo", "bar")]), "only an unknown option");
    expect_data1(&server, &rrq(&[("", "")]), "an empty option pair");
    // RFC 2347: however many unknown options a request carries, within the request limit,
    // they are ignored (each sent twice here), and the known ones are still negotiated.
    let many: Vec<(String, String)> = (0..200).map(|i| (format!("x{}", i % 100), "1".to_string())).collect();
    let mut many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert!(rrq(&many).len() <= 2048);
    expect_data1(&server, &rrq(&many), "200 unknown options");
    many.insert(100, ("blksize", "1024"));
    expect_oack(&server, &rrq(&many), &[("blksize", "1024")], "200 unknown options and blksize");
    // Options past the request limit: refused as a negotiation (ERROR 8), not as malformed.
    let mut over = raw::rrq(b"one_mib.bin", "octet", &[]);
    over.extend_from_slice(b"pad\0");
    over.extend(std::iter::repeat_n(b'v', 2049 - over.len() - 1));
    over.push(0);
    assert_eq!(over.len(), 2049);
    expect_error(&server, &over, 8, "a request of 2049 bytes by its options");
    let lots: Vec<(String, String)> = (0..500).map(|i| (format!("x{i}"), "1".to_string())).collect();
    let lots: Vec<(&str, &str)> = lots.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    expect_error(&server, &rrq(&lots), 8, "500 unknown options, past the request limit");
    // A request of exactly 2048 bytes (the limit) is served.
    let mut exact = raw::rrq(b"one_mib.bin", "octet", &[]);
    exact.extend_from_slice(b"pad\0");
    exact.extend(std::iter::repeat_n(b'v', 2048 - exact.len() - 1));
    exact.push(0);
    assert_eq!(exact.len(), 2048);
    expect_data1(&server, &exact, "a request of exactly 2048 bytes");
    // Modes are case-insensitive; trailing NUL padding is tolerated.
    expect_data1(&server, &raw::rrq(b"one_mib.bin", "OcTeT", &[]), "mode OcTeT");
    expect_data1(&server, &raw::rrq(b"one_mib.bin", "NETASCII", &[]), "mode NETASCII");
    let mut padded = raw::rrq(b"one_mib.bin", "octet", &[]);
    padded.push(0);
    expect_data1(&server, &padded, "request padded with a NUL");
    padded.push(0);
    expect_data1(&server, &padded, "request padded with two NULs");
    assert_still_serves(&server, &fx, "option edges");
    server.finish(&fx);
}

#[test]
fn configured_limits_cap_the_oack() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let cfg = config_file(&fx, "[transfer]\nmax_blksize = 1468\nmax_windowsize = 8\n");
    let server = Server::start(&fx.root, &["--config", &cfg]);
    let rrq = |opts: &[(&str, &str)]| raw::rrq(b"one_mib.bin", "octet", opts);
    expect_oack(&server, &rrq(&[("blksize", "100000")]), &[("blksize", "1468")], "blksize 100000, max 1468");
    expect_oack(&server, &rrq(&[("blksize", "1469")]), &[("blksize", "1468")], "blksize 1469, max 1468");
    expect_oack(&server, &rrq(&[("blksize", "1024")]), &[("blksize", "1024")], "blksize 1024, max 1468");
    expect_oack(&server, &rrq(&[("windowsize", "9")]), &[("windowsize", "8")], "windowsize 9, max 8");
    assert_still_serves(&server, &fx, "capped options");
    server.finish(&fx);
}

#[test]
fn write_requests_are_refused_when_read_only() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    for (what, pkt) in [
        ("WRQ new file", raw::wrq(b"upload.bin", "octet", &[])),
        ("WRQ existing file", raw::wrq(b"b513.bin", "octet", &[])),
        ("WRQ with options", raw::wrq(b"upload.bin", "octet", &[("blksize", "1024"), ("tsize", "100")])),
        ("WRQ netascii", raw::wrq(b"upload.txt", "netascii", &[])),
        ("WRQ outside the root", raw::wrq(b"../canary.txt", "octet", &[])),
        ("WRQ with mode `mail`", request(2, &[b"root", b"mail"])),
    ] {
        expect_error(&server, &pkt, 2, what);
    }
    assert!(!fx.root.join("upload.bin").exists() && !fx.root.join("upload.txt").exists());
    assert_still_serves(&server, &fx, "write requests");
    server.finish(&fx);
}

// ---------------------------------------------------------------------------------------------
// File names: traversal, links, special files.
// ---------------------------------------------------------------------------------------------

#[test]
fn traversal_in_every_spelling_is_refused_and_nothing_outside_is_opened() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let outside = fx.base().join("outside");
    fs::create_dir(&outside).unwrap();
    let secret = outside.join("secret.txt");
    fs::write(&secret, &fx.canary_marker).unwrap();
    // The watch itself works: reading a watched file is seen.
    let probe = fx.base().join("probe.txt");
    fs::write(&probe, b"probe").unwrap();
    let probe_watch = OpenWatch::new(&[&probe]);
    let _ = fs::read(&probe).unwrap();
    assert!(probe_watch.events() > 0, "inotify saw no open of a file just read");
    let server = Server::start(&fx.root, &[]);
    let watch = OpenWatch::new(&[&fx.canary, &secret]);
    let canary_abs = fx.canary.to_str().unwrap().to_string();
    let secret_abs = secret.to_str().unwrap().to_string();
    let cases: Vec<(String, u16)> = vec![
        ("../canary.txt".into(), 2),
        ("..".into(), 2),
        ("../".into(), 2),
        ("..\\canary.txt".into(), 2),
        ("sub\\..\\..\\canary.txt".into(), 2),
        ("a/../../canary.txt".into(), 2),
        ("sub/../b513.bin".into(), 2),
        ("sub/dir/../../../canary.txt".into(), 2),
        ("./../canary.txt".into(), 2),
        ("/../canary.txt".into(), 2),
        ("/../../etc/passwd".into(), 2),
        ("../../../../../../../../etc/passwd".into(), 2),
        ("../outside/secret.txt".into(), 2),
        ("....//canary.txt".into(), 1),
        ("%2e%2e/canary.txt".into(), 1),
        // Absolute names are taken relative to the root.
        ("//etc/passwd".into(), 1),
        ("/etc/passwd".into(), 1),
        (canary_abs.clone(), 1),
        (secret_abs.clone(), 1),
        (format!("/{canary_abs}"), 1),
        ("~/canary.txt".into(), 1),
        ("~root/.bashrc".into(), 1),
    ];
    for (name, code) in &cases {
        let msg = expect_error(&server, &raw::rrq(name.as_bytes(), "octet", &[]), *code, &format!("RRQ {name:?}"));
        fx.assert_no_canary(msg.as_bytes(), name);
    }
    // A NUL cannot be inside a name on the wire: it ends the field, and what follows is read
    // as the mode, which is then not one.
    expect_error(&server, &request(1, &[b"b513.bin", b"/../canary.txt", b"octet"]), 4, "NUL inside the name, valid prefix");
    expect_error(&server, &request(1, &[b"../canary.txt", b"b513.bin", b"octet"]), 4, "NUL inside the name, .. prefix");
    // Names that are not UTF-8: refused (they cannot be mapped to a path safely).
    expect_error(&server, &raw::rrq(b"\xff\xfe/../canary.txt", "octet", &[]), 2, "non-UTF-8 name with ..");
    expect_error(&server, &raw::rrq(b"b513\xff.bin", "octet", &[]), 2, "non-UTF-8 name");
    // The same names through a real transfer attempt with options.
    for name in ["../canary.txt", "..\\canary.txt", "/../canary.txt"] {
        let r = raw::get(server.addr(), name, "octet", &[("tsize", "0"), ("blksize", "1024")], Duration::from_secs(5));
        assert_eq!(r.error.as_ref().map(|e| e.0), Some(2), "get {name:?}: {r}");
        fx.assert_no_canary(&r.data, name);
    }
    assert_still_serves(&server, &fx, "traversal attempts");
    assert_eq!(watch.events(), 0, "the server opened or read a file OUTSIDE the served root");
    server.finish(&fx);
}

#[test]
fn symlinks_leaving_the_root_are_refused() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let base = fx.base().to_path_buf();
    let link = |name: &str, target: &Path| std::os::unix::fs::symlink(target, fx.root.join(name)).unwrap();
    link("abs_link", &fx.canary);
    link("rel_link", Path::new("../canary.txt"));
    link("deep_rel_link", Path::new("sub/../../canary.txt"));
    link("outdir", &base);
    link("outdir_rel", Path::new(".."));
    link("devnull", Path::new("/dev/null"));
    link("devzero_rel", Path::new("../../../../../../../../dev/zero"));
    link("procself", Path::new("/proc/self/root/etc/passwd"));
    link("loop_a", Path::new("loop_b"));
    link("loop_b", Path::new("loop_a"));
    link("dangling", Path::new("does-not-exist"));
    // Links that stay inside the root are followed.
    link("inside_link", Path::new("b513.bin"));
    link("inside_dir", Path::new("sub/dir"));
    std::os::unix::fs::symlink("../../b513.bin", fx.root.join("sub/dir/up_link")).unwrap();
    let server = Server::start(&fx.root, &[]);
    let watch = OpenWatch::new(&[&fx.canary]);
    for (name, code) in [
        ("abs_link", 2),
        ("rel_link", 2),
        ("deep_rel_link", 2),
        ("outdir/canary.txt", 2),
        ("outdir_rel/canary.txt", 2),
        ("outdir/root/b513.bin", 2),
        ("devnull", 2),
        ("devzero_rel", 2),
        ("procself", 2),
        ("loop_a", 2),
        ("dangling", 1),
    ] {
        let msg = expect_error(&server, &raw::rrq(name.as_bytes(), "octet", &[]), code, &format!("RRQ {name:?}"));
        fx.assert_no_canary(msg.as_bytes(), name);
    }
    for (name, want) in [("inside_link", "b513.bin"), ("inside_dir/nested.bin", "sub/dir/nested.bin"), ("sub/dir/up_link", "b513.bin")] {
        let r = raw::get(server.addr(), name, "octet", &[], Duration::from_secs(10));
        assert!(r.complete && r.data == file(&fx, want), "symlink {name:?} inside the root should be served: {r}");
    }
    assert_still_serves(&server, &fx, "symlink attempts");
    assert_eq!(watch.events(), 0, "the server opened or read the canary OUTSIDE the served root");
    server.finish(&fx);
}

#[test]
fn directories_fifos_and_devices_are_not_served() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let fifo = fx.root.join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo on a path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo: {}", std::io::Error::last_os_error());
    let mut devices = Vec::new();
    if is_root() {
        // Character devices inside the root: /dev/null (1,3) and /dev/zero (1,5) doubles.
        for (name, minor) in [("null_dev", 3), ("zero_dev", 5)] {
            let c = std::ffi::CString::new(fx.root.join(name).as_os_str().as_bytes()).unwrap();
            // SAFETY: mknod on a path we own.
            let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, minor)) };
            if rc == 0 {
                devices.push(name);
            } else {
                eprintln!("note: mknod {name}: {} (device case skipped)", std::io::Error::last_os_error());
            }
        }
    } else {
        eprintln!("note: not root, device-node cases skipped");
    }
    let server = Server::start(&fx.root, &[]);
    for name in [".", "./", "/", "sub", "sub/", "sub/dir", "/sub/dir/", "sub/./dir"] {
        expect_error(&server, &raw::rrq(name.as_bytes(), "octet", &[]), 1, &format!("directory {name:?}"));
    }
    // A FIFO with no writer must neither hang the server nor be served.
    let t = Instant::now();
    expect_error(&server, &raw::rrq(b"fifo", "octet", &[]), 1, "FIFO");
    assert_still_serves(&server, &fx, "a FIFO request");
    assert!(t.elapsed() < Duration::from_secs(3), "FIFO request slowed the server: {:?}", t.elapsed());
    // Two FIFO requests at once from different ports, then a normal request.
    let a = client_socket();
    let b = client_socket();
    a.send_to(&raw::rrq(b"fifo", "octet", &[]), server.addr()).unwrap();
    b.send_to(&raw::rrq(b"fifo", "octet", &[("tsize", "0")]), server.addr()).unwrap();
    for s in [&a, &b] {
        let (p, _) = recv(s, REPLY).expect("FIFO: no reply");
        assert_eq!(raw::parse_error(&p).map(|e| e.0), Some(1), "FIFO: got {}", show(&p));
    }
    for name in &devices {
        // Not a regular file: 1. Where the file system is mounted `nodev`, opening the node
        // fails with EACCES and the server says 2; both refuse, but the code must match.
        let openable = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fx.root.join(name))
            .is_ok();
        let code = if openable { 1 } else { 2 };
        expect_error(&server, &raw::rrq(name.as_bytes(), "octet", &[]), code, &format!("device node {name}"));
    }
    assert_still_serves(&server, &fx, "directories, FIFOs and devices");
    server.finish(&fx);
}

#[test]
fn over_long_names_are_refused() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let name_1500 = "a".repeat(1500);
    let component_300 = "b".repeat(300);
    let deep_1100 = "d/".repeat(550);
    // Within the request limit: refused by the name checks (access violation).
    expect_error(&server, &raw::rrq(name_1500.as_bytes(), "octet", &[]), 2, "1500-byte name");
    expect_error(&server, &raw::rrq(component_300.as_bytes(), "octet", &[]), 2, "300-byte path component");
    expect_error(&server, &raw::rrq(format!("sub/{component_300}").as_bytes(), "octet", &[]), 2, "300-byte inner component");
    expect_error(&server, &raw::rrq(deep_1100.as_bytes(), "octet", &[]), 2, "1100-byte name of short components");
    // A long name of short components that fits is only "not found".
    expect_error(&server, &raw::rrq("c/".repeat(400).as_bytes(), "octet", &[]), 1, "800-byte name of short components");
    // Over the request limit: malformed request.
    expect_error(&server, &raw::rrq("a".repeat(2100).as_bytes(), "octet", &[]), 4, "2100-byte name");
    assert_still_serves(&server, &fx, "over-long names");
    server.finish(&fx);
}

// ---------------------------------------------------------------------------------------------
// The transfer port (TID).
// ---------------------------------------------------------------------------------------------

#[test]
fn future_acks_are_ignored_and_the_transfer_continues() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let mut x = Xfer::start(&server, ONE_MIB, &[]);
    x.advance_to(3);
    for b in [4u16, 5, 50, 2047, 2049, 30000, 65535] {
        x.ack(b);
    }
    // Only the timer may resend block 3; nothing beyond it may go out.
    let got = x.collect(SILENCE);
    let blocks = data_blocks(&got, x.tid, "after future ACKs");
    assert!(blocks.iter().all(|&b| b == 3) && blocks.len() <= 3, "future ACKs were not ignored: DATA {blocks:?}");
    let data = x.finish();
    assert!(data == file(&fx, ONE_MIB), "transfer after future ACKs is not byte-exact ({} bytes)", data.len());
    server.finish(&fx);
}

#[test]
fn ancient_acks_cause_no_retransmission_storm() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let mut x = Xfer::start(&server, ONE_MIB, &[]);
    x.advance_to(10);
    // 50 ACKs for old blocks (duplicates of acknowledged ones): a sender answering each with
    // DATA would send 50 packets (the Sorcerer's Apprentice); the right answer is none.
    for i in 0..50u16 {
        x.ack(1 + i % 9);
    }
    let got = x.collect(SILENCE);
    let blocks = data_blocks(&got, x.tid, "after ancient ACKs");
    assert!(blocks.iter().all(|&b| b == 10) && blocks.len() <= 3, "ancient ACKs caused DATA {blocks:?}");
    x.advance_to(20);
    // Same with a window: ACKs from before the window.
    let data = x.finish();
    assert!(data == file(&fx, ONE_MIB), "transfer after ancient ACKs is not byte-exact");
    // Duplicate ACKs of the block in flight, windowed transfer.
    let w = Xfer::start(&server, "b513.bin", &[("windowsize", "4")]);
    for _ in 0..20 {
        w.ack(0);
    }
    let got = w.collect(SILENCE);
    let blocks = data_blocks(&got, w.tid, "windowed, after duplicate ACK 0");
    // Block 2 is the rest of the first window; then nothing but timer copies of 1..2.
    assert!(blocks.iter().all(|&b| b <= 2) && blocks.len() <= 4, "duplicate ACK 0 caused DATA {blocks:?}");
    server.finish(&fx);
}

#[test]
fn client_error_ends_the_transfer_silently() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let mut x = Xfer::start(&server, ONE_MIB, &[]);
    x.advance_to(3);
    x.send(&error_packet(0, "user cancelled"));
    // A live transfer would keep resending block 3 with backoff; an ended one sends nothing.
    let got = x.collect(Duration::from_millis(1500));
    let blocks = data_blocks(&got, x.tid, "after the client's ERROR");
    assert!(blocks.len() <= 1, "the transfer went on after the client's ERROR: DATA {blocks:?}");
    wait_for_log(&server, &["transfer failed"], Duration::from_secs(2));
    // The session is gone: its port is closed, so an ACK gets no answer.
    x.ack(3);
    let got = x.collect(SILENCE);
    assert!(got.is_empty(), "ACK after the end answered: {:?}", got.iter().map(|(p, _)| show(p)).collect::<Vec<_>>());
    assert_still_serves(&server, &fx, "a client ERROR");
    server.finish(&fx);
}

#[test]
fn client_data_mid_transfer_gets_error_4_and_ends_it() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let mut x = Xfer::start(&server, ONE_MIB, &[]);
    x.advance_to(3);
    x.send(&data_packet(1, b"not yours"));
    let got = x.collect(Duration::from_millis(1500));
    let mut errors = 0;
    for (p, from) in &got {
        assert_eq!(*from, x.tid, "reply from another port: {}", show(p));
        match raw::opcode(p) {
            Some(ERROR) => {
                assert_eq!(raw::parse_error(p).map(|e| e.0), Some(4), "got {}", show(p));
                errors += 1;
            }
            Some(DATA) => assert!(errors == 0 && p[2..4] == [0, 3], "DATA after the ERROR: {}", show(p)),
            _ => panic!("unexpected {}", show(p)),
        }
    }
    assert_eq!(errors, 1, "want exactly one ERROR 4, got {:?}", got.iter().map(|(p, _)| show(p)).collect::<Vec<_>>());
    x.ack(3);
    assert!(x.collect(SILENCE).is_empty(), "transfer still answering after its ERROR 4");
    assert_still_serves(&server, &fx, "a client DATA");
    server.finish(&fx);
}

#[test]
fn wrong_tid_gets_error_5_and_the_transfer_completes() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let mut x = Xfer::start(&server, ONE_MIB, &[]);
    x.advance_to(3);
    let stranger = client_socket();
    // An ACK that would move the window, a DATA, a request and garbage: each gets ERROR 5.
    // (Spaced out, though these fit in the burst the rate limit allows: see the spray test.)
    for pkt in [raw::ack(3), raw::ack(4), data_packet(4, b"x"), raw::rrq(b"b513.bin", "octet", &[]), vec![0, 99, 1]] {
        std::thread::sleep(Duration::from_millis(150));
        stranger.send_to(&pkt, x.tid).unwrap();
        let (p, from) = recv(&stranger, REPLY).unwrap_or_else(|| panic!("no ERROR 5 for {} from another port", show(&pkt)));
        assert_eq!(from, x.tid);
        assert_eq!(raw::parse_error(&p).map(|e| e.0), Some(5), "stranger's {}: got {}", show(&pkt), show(&p));
        assert!(collect(&stranger, Duration::from_millis(50)).is_empty(), "more than one reply to the stranger");
    }
    // The stranger's ACK 3 must not have moved the transfer: block 4 is not sent yet.
    let got = x.collect(SILENCE);
    let blocks = data_blocks(&got, x.tid, "after the stranger's packets");
    assert!(blocks.iter().all(|&b| b == 3), "a packet from another port moved the transfer: DATA {blocks:?}");
    let data = x.finish();
    assert!(data == file(&fx, ONE_MIB), "transfer with a stranger is not byte-exact");
    server.finish(&fx);
}

/// A spray of packets from strangers at a transfer port must not be reflected one for one:
/// the port answers strangers at a bounded rate, and the transfer itself goes on.
#[test]
fn a_spray_at_a_tid_is_not_reflected_one_for_one() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let mut x = Xfer::start(&server, ONE_MIB, &[]);
    x.advance_to(3);
    let stranger = client_socket();
    let t = Instant::now();
    let mut sent = 0u32;
    while t.elapsed() < Duration::from_millis(300) {
        for pkt in [raw::ack(3), vec![0, 99], data_packet(1, b"x")] {
            stranger.send_to(&pkt, x.tid).unwrap();
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let got = collect(&stranger, Duration::from_millis(100));
    let elapsed = t.elapsed();
    for (p, from) in &got {
        assert_eq!((*from, raw::parse_error(p).map(|e| e.0)), (x.tid, Some(5)), "stranger got {}", show(p));
    }
    // The server documents a burst of 10 replies, then at most 10 a second per transfer port.
    let allowed = 10 + (elapsed.as_millis() / 100) as usize + 1;
    assert!((sent as usize) > 4 * allowed, "the spray was too small to show a bound");
    assert!(
        got.len() <= allowed,
        "{sent} packets from a stranger in {elapsed:?} were answered with {} ERROR 5 (allowed {allowed}): the transfer port is a reflector",
        got.len()
    );
    let blocks = data_blocks(&x.collect(Duration::from_millis(50)), x.tid, "during the spray");
    assert!(blocks.iter().all(|&b| b == 3), "the spray moved the transfer: DATA {blocks:?}");
    let data = x.finish();
    assert!(data == file(&fx, ONE_MIB), "transfer under a spray is not byte-exact");
    server.finish(&fx);
}

/// RFC 1350: an ERROR is never answered. A transfer port that answers a stranger's ERROR with
/// ERROR 5 lets one spoofed datagram start an endless ERROR ping-pong between two transfer
/// ports (of this server, or of any two servers that do the same).
#[test]
fn a_strangers_error_to_a_tid_is_not_answered() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let mut x = Xfer::start(&server, ONE_MIB, &[]);
    x.advance_to(2);
    let stranger = client_socket();
    stranger.send_to(&error_packet(5, "Unknown transfer ID"), x.tid).unwrap();
    let got = collect(&stranger, SILENCE);
    assert!(
        got.is_empty(),
        "the transfer port answered a stranger's ERROR with {:?}: two such ports bounce errors forever",
        got.iter().map(|(p, _)| show(p)).collect::<Vec<_>>()
    );
    let data = x.finish();
    assert!(data == file(&fx, ONE_MIB));
    server.finish(&fx);
}

/// The consequence of the case above, end to end: one spoofed ERROR from transfer port A to
/// transfer port B of the same server must not start a loop. Root only (raw socket).
#[test]
fn one_spoofed_error_starts_no_loop_between_two_transfers() {
    if !tftpcast_only() {
        return;
    }
    if !is_root() {
        if in_ci() {
            panic!("this test needs root for a raw socket; CI runs as root");
        }
        eprintln!("SKIPPED: needs root (raw socket)");
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let mut a = Xfer::start(&server, ONE_MIB, &[]);
    let mut b = Xfer::start(&server, ONE_MIB, &[]);
    a.advance_to(2);
    b.advance_to(2);
    send_spoofed_udp(a.tid.port(), b.tid, &error_packet(5, "spoofed"));
    std::thread::sleep(Duration::from_millis(500));
    // Each session counts packets from strangers; ask for a state dump.
    server.signal(libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut counts: Vec<u64> = Vec::new();
    while Instant::now() < deadline {
        counts = server
            .logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("fields")?.get("unknown_tid_packets")?.as_u64())
            .collect();
        if counts.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(counts.len() >= 2, "no session state dump with unknown_tid_packets\n{}", server.log_tail(30));
    let total: u64 = counts.iter().sum();
    assert!(total <= 2, "one spoofed ERROR made the two transfer ports exchange {total} packets in 0.5 s (an ERROR ping-pong loop)");
    drop((a, b));
    drop(server);
}

/// Sends one UDP datagram to `to` whose source port is `src_port` (same address), through a
/// raw socket. Root only. Loopback only.
fn send_spoofed_udp(src_port: u16, to: SocketAddr, payload: &[u8]) {
    let SocketAddr::V4(to4) = to else { panic!("IPv4 only") };
    assert!(to4.ip().is_loopback(), "spoofing is only ever done on loopback");
    // SAFETY: a raw socket we own and close; sendto with a buffer and sockaddr_in we built.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut pkt = Vec::with_capacity(8 + payload.len());
        pkt.extend_from_slice(&src_port.to_be_bytes());
        pkt.extend_from_slice(&to4.port().to_be_bytes());
        pkt.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        pkt.extend_from_slice(&[0, 0]); // no checksum (allowed for UDP over IPv4)
        pkt.extend_from_slice(payload);
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from(*to4.ip()).to_be();
        let rc = libc::sendto(
            fd,
            pkt.as_ptr() as *const libc::c_void,
            pkt.len(),
            0,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert!(rc >= 0, "raw sendto: {err}");
    }
}

#[test]
fn garbage_and_requests_from_the_peer_to_its_tid_are_ignored() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let mut x = Xfer::start(&server, ONE_MIB, &[]);
    x.advance_to(3);
    for pkt in [vec![], vec![0], vec![0, 4], vec![0, 99, 1, 2], raw::rrq(b"b513.bin", "octet", &[]), request(6, &[b"blksize", b"8"])] {
        x.send(&pkt);
    }
    let got = x.collect(SILENCE);
    let blocks = data_blocks(&got, x.tid, "after garbage from the peer");
    assert!(blocks.iter().all(|&b| b == 3) && blocks.len() <= 3, "garbage moved or stormed the transfer: {blocks:?}");
    let data = x.finish();
    assert!(data == file(&fx, ONE_MIB), "transfer after garbage is not byte-exact");
    server.finish(&fx);
}

/// A request whose first answer is never acknowledged (a spoofed source, a client that went
/// away) gets 1 + 2 packets: the first answer, a retransmission after the starting timeout
/// (1 s, so a client that lost the first DATA or OACK still starts within a second), another
/// 2 s later, then nothing. Checked for a first DATA and a first OACK.
#[test]
fn an_unacknowledged_first_answer_goes_at_most_three_times() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let watch = |opts: &'static [(&'static str, &'static str)]| {
        let to = server.addr();
        std::thread::spawn(move || {
            let sock = client_socket();
            sock.send_to(&raw::rrq(ONE_MIB.as_bytes(), "octet", opts), to).unwrap();
            let t = Instant::now();
            let mut got = Vec::new();
            // Past where a fourth packet would come with three retransmissions (7 s).
            while let Some(left) = Duration::from_millis(8500).checked_sub(t.elapsed()) {
                match recv(&sock, left) {
                    Some((p, _)) => got.push((t.elapsed(), show(&p))),
                    None => break,
                }
            }
            got
        })
    };
    let (data, oack) = (watch(&[]), watch(&[("blksize", "1024")]));
    for (got, want) in [(data.join().unwrap(), "DATA block 1 ("), (oack.join().unwrap(), "OACK")] {
        eprintln!("unanswered {want}: {got:?}");
        assert_eq!(got.len(), 3, "an unanswered first {want} went {} times, want 1 + 2: {got:?}", got.len());
        assert!(got.iter().all(|(_, p)| p.starts_with(want)), "not all {want}: {got:?}");
        let gap = got[1].0 - got[0].0;
        assert!(gap >= Duration::from_millis(800) && gap <= Duration::from_millis(1600), "first retransmission of {want} after {gap:?}, want about 1 s");
    }
    assert_still_serves(&server, &fx, "unanswered first packets");
    server.finish(&fx);
}

#[test]
fn a_repeated_request_starts_no_second_transfer() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let sock = client_socket();
    let rrq = raw::rrq(ONE_MIB.as_bytes(), "octet", &[]);
    for _ in 0..10 {
        sock.send_to(&rrq, server.addr()).unwrap();
    }
    let got = collect(&sock, SILENCE);
    assert!(!got.is_empty(), "no reply to 10 identical requests");
    let tids: std::collections::BTreeSet<SocketAddr> = got.iter().map(|(_, f)| *f).collect();
    assert_eq!(tids.len(), 1, "10 identical requests from one port started {} transfers", tids.len());
    let tid = *tids.iter().next().unwrap();
    let blocks = data_blocks(&got, tid, "after 10 identical requests");
    assert!(blocks.iter().all(|&b| b == 1) && blocks.len() <= 3, "10 requests caused DATA {blocks:?}");
    let _ = sock.send_to(&error_packet(0, "done"), tid);
    assert_still_serves(&server, &fx, "repeated requests");
    server.finish(&fx);
}

#[test]
fn per_client_session_limit_defers_requests_silently() {
    if !tftpcast_only() {
        return;
    }
    let fx = Fixture::new();
    let cfg = config_file(&fx, "[limits]\nmax_sessions_per_client = 1\n");
    let server = Server::start(&fx.root, &["--config", &cfg]);
    let mut x = Xfer::start(&server, ONE_MIB, &[]);
    // The client answers (an unanswered transfer holds the limit only briefly: it is half-open).
    x.advance_to(2);
    // A second request from the same address (another port) while the first transfer runs:
    // no answer while it waits in the defer queue...
    let second = client_socket();
    second.send_to(&raw::rrq(b"b513.bin", "octet", &[]), server.addr()).unwrap();
    if let Some((reply, from)) = recv(&second, SILENCE) {
        panic!("second request at the per-client limit: want silence, got {} from {from}\n{}", show(&reply), server.log_tail(10));
    }
    wait_for_log(&server, &["session limit"], Duration::from_secs(2));
    let data = x.finish();
    assert!(data == file(&fx, ONE_MIB));
    // ...and it is served, without a retransmission, once the first transfer ended.
    let mut got = Vec::new();
    while got.len() < 513 {
        let (p, from) = recv(&second, REPLY).unwrap_or_else(|| panic!("the deferred request was never served\n{}", server.log_tail(20)));
        assert_eq!(raw::opcode(&p), Some(raw::DATA), "deferred request: {}", show(&p));
        if u16::from_be_bytes([p[2], p[3]]) as usize == got.len() / 512 + 1 {
            got.extend_from_slice(&p[4..]);
        }
        second.send_to(&raw::ack(u16::from_be_bytes([p[2], p[3]])), from).unwrap();
    }
    assert!(got == file(&fx, "b513.bin"), "deferred request not byte-exact");
    // The slot is free again once the first transfer ended.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = raw::get(server.addr(), "b513.bin", "octet", &[], Duration::from_secs(5));
        if r.complete && r.data == file(&fx, "b513.bin") {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was not released after the first transfer: {r}");
    }
    server.finish(&fx);
}

// ---------------------------------------------------------------------------------------------
// Regressions found by fuzzing (fuzz/regressions/), through the public API of the proto crate.
// ---------------------------------------------------------------------------------------------

/// fuzz/regressions/packet_decode: a request or OACK accepted by `decode` must re-encode to
/// something `decode` accepts again. Option names and values that are not UTF-8 are turned
/// into U+FFFD (3 bytes per bad byte), so 700 such bytes re-encode past `MAX_REQUEST`.
#[test]
fn fuzz_regression_decoded_packets_reencode_within_the_request_limit() {
    use tftpcast_proto::packet::{decode, MAX_REQUEST};
    let mut oack = b"\x00\x06".to_vec();
    oack.extend(std::iter::repeat_n(0xff, 700));
    oack.extend_from_slice(b"\x00\x00");
    let mut rrq = b"\x00\x01f\x00octet\x00".to_vec();
    rrq.extend(std::iter::repeat_n(0xff, 700));
    rrq.extend_from_slice(b"\x00x\x00");
    for (what, input) in [("OACK", oack), ("RRQ", rrq)] {
        let Ok(p) = decode(&input) else { continue };
        let encoded = p.to_vec();
        assert!(
            encoded.len() <= MAX_REQUEST,
            "{what} decoded from {} bytes re-encodes to {} bytes (> MAX_REQUEST {MAX_REQUEST})",
            input.len(),
            encoded.len()
        );
        assert_eq!(decode(&encoded).as_ref().ok(), Some(&p), "{what}: re-encoding does not decode to the same packet");
    }
}

// ---------------------------------------------------------------------------------------------
// Multicast (RFC 2090): packets from members that are not the master. Needs a namespace lab
// (multicast never leaves the lab).
// ---------------------------------------------------------------------------------------------

/// The `multicast` value of an OACK: (group, port, master).
fn mc_value(oack: &[u8]) -> (std::net::Ipv4Addr, u16, bool) {
    let opts = raw::parse_oack(oack);
    let v = opts.iter().find(|(k, _)| k == "multicast").map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("OACK without multicast: {opts:?}"));
    let parts: Vec<&str> = v.split(',').collect();
    assert_eq!(parts.len(), 3, "multicast value {v:?}");
    (parts[0].parse().unwrap(), parts[1].parse().unwrap(), parts[2] == "1")
}

/// A server in a lab of two clients, listening on the lab's address, groups starting at once.
/// The rate limit of what unexpected packets cause is the timer floor: fixed at 100 ms.
fn group_lab(name: &str) -> (Fixture, Lab, SocketAddr, Server) {
    let fx = Fixture::new();
    let lab = Lab::new(name, 2);
    let listen = SocketAddr::from((lab.server_ip(), 69));
    let cfg = config_file(&fx, "[transfer]\nmin_timeout_ms = 100\n");
    let server = Server::start_in(Some(&lab.server), &fx.root, &["--config", &cfg, "--listen", &listen.to_string(), "--start-delay-ms", "0"]);
    (fx, lab, listen, server)
}

#[test]
fn multicast_acks_from_non_masters_cause_no_retransmission_storm() {
    if !tftpcast_only() || !require_netns() {
        return;
    }
    let (fx, lab, listen, server) = group_lab("bimc");
    let bind_in = |i: usize, port: u16| {
        let ip = lab.client_ip(i);
        lab.in_ns(&lab.clients[i], move || UdpSocket::bind((ip, port)).expect("bind in namespace"))
    };
    let master = bind_in(0, 0);
    let member = bind_in(1, 0);
    let rrq = raw::rrq(ONE_MIB.as_bytes(), "octet", &[("multicast", ""), ("blksize", "1024")]);

    // Client 0 asks first: it is the master.
    master.send_to(&rrq, listen).unwrap();
    let (oack, tid) = recv(&master, REPLY).unwrap_or_else(|| panic!("no OACK to the master\n{}", server.log_tail(30)));
    assert_eq!(raw::opcode(&oack), Some(OACK), "master got {}", show(&oack));
    let (group, port, is_master) = mc_value(&oack);
    assert!(is_master, "the first client must be the master");
    // Client 1 listens to the group, then joins it: a passive member.
    let ip1 = lab.client_ip(1);
    let stream = lab.in_ns(&lab.clients[1], move || {
        let s = UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).expect("bind group port");
        s.join_multicast_v4(&group, &ip1).expect("join group");
        s
    });
    member.send_to(&rrq, listen).unwrap();
    let (oack1, tid1) = recv(&member, REPLY).expect("no OACK to the second client");
    assert_eq!(tid1, tid, "the group's OACKs must come from one port");
    assert!(!mc_value(&oack1).2, "the second client must not be master");

    // The master asks for block 1: one window goes to the group.
    master.send_to(&raw::ack(0), tid).unwrap();
    let first = collect(&stream, Duration::from_millis(300));
    assert!(!first.is_empty(), "no DATA reached the group\n{}", server.log_tail(30));
    let block_of = |p: &[u8]| (raw::opcode(p) == Some(DATA)).then(|| u16::from_be_bytes([p[2], p[3]]));
    let mut seen: std::collections::BTreeSet<u16> = first.iter().filter_map(|(p, _)| block_of(p)).collect();
    // A flood of packets from the passive member: ACKs (as if it were master), a repeated
    // request on the group port, garbage.
    let t = Instant::now();
    let flooder = member.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let mut sent = 0;
        while t.elapsed() < Duration::from_millis(250) {
            for pkt in [raw::ack(3), raw::ack(0), vec![0, 99]] {
                flooder.send_to(&pkt, tid).unwrap();
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        sent
    });
    let mut got = Vec::new();
    while let Some(left) = Duration::from_millis(350).checked_sub(t.elapsed()) {
        match recv(&stream, left) {
            Some((p, _)) => got.push((t.elapsed(), p)),
            None => break,
        }
    }
    let sent = flood.join().unwrap();
    let window = t.elapsed();
    // Blocks not seen before are the rest of the first window (pacing may spread it out);
    // every block seen again is a retransmission caused by the flood.
    let mut data = 0;
    let mut resent = Vec::new();
    for (at, b) in got.iter().filter_map(|(at, p)| Some((at, block_of(p)?))) {
        if !seen.insert(b) {
            data += 1;
            resent.push((b, at.as_millis()));
        }
    }
    // At most one retransmission per timer floor (100 ms here), plus one.
    let allowed = (window.as_millis() / 100) as usize + 1;
    eprintln!("retransmissions during the flood (block, ms): {resent:?}");
    eprintln!("non-master flood: {sent} packets in {window:?}, {data} DATA retransmissions (allowed {allowed}), first window {}", first.len());
    assert!(
        data <= allowed,
        "{sent} packets from a non-master member in {window:?} made the group send {data} DATA retransmissions (allowed {allowed})"
    );
    // Nothing is sent back to the member for them.
    let back = collect(&member, Duration::from_millis(50));
    assert!(back.is_empty(), "replies to a member's stray packets: {:?}", back.iter().map(|(p, _)| show(p)).collect::<Vec<_>>());
    // A stranger (not a member) on the group port gets ERROR 5, once.
    let stranger = bind_in(1, 0);
    stranger.send_to(&raw::ack(1), tid).unwrap();
    let (p, from) = recv(&stranger, REPLY).expect("no ERROR 5 for a stranger on the group port");
    assert_eq!((from, raw::parse_error(&p).map(|e| e.0)), (tid, Some(5)), "stranger got {}", show(&p));
    // Both members leave; the server still serves a unicast client in the lab.
    for s in [&master, &member] {
        s.send_to(&error_packet(0, "done"), tid).unwrap();
    }
    let srv = listen;
    let want = file(&fx, "b513.bin");
    let r = lab.in_ns(&lab.clients[0], move || raw::get(srv, "b513.bin", "octet", &[], Duration::from_secs(10)));
    assert!(r.complete && r.data == want, "after the flood the server no longer serves: {r}\n{}", server.log_tail(30));
    drop(server);
}

/// A group's transfer port and its request path against floods (issue 16, items 2 and 3): a
/// spray of ACKs from a non-member at the group port gets ERROR 5 within the budget unicast
/// transfers use (bursts of 10, then 10 a second), counted on the server's wire; a member that
/// repeats its request in a burst gets its OACK again at most once per round-trip estimate
/// (the timer floor, 100 ms here), not once per request.
#[test]
fn group_ports_and_repeated_group_requests_are_not_reflected() {
    if !tftpcast_only() || !require_netns() {
        return;
    }
    let (_fx, lab, listen, server) = group_lab("bimcref");
    Wire::install(&lab.server);
    let bind_in = |i: usize| {
        let ip = lab.client_ip(i);
        lab.in_ns(&lab.clients[i], move || {
            let s = UdpSocket::bind((ip, 0)).expect("bind in namespace");
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            s
        })
    };
    let rrq = raw::rrq(ONE_MIB.as_bytes(), "octet", &[("multicast", ""), ("blksize", "1024")]);
    // The master asks, gets its OACK and stays silent: the group waits for its ACK.
    let master = bind_in(0);
    master.send_to(&rrq, listen).unwrap();
    let (oack, tid) = recv(&master, REPLY).unwrap_or_else(|| panic!("no OACK to the master\n{}", server.log_tail(30)));
    assert_eq!(raw::opcode(&oack), Some(OACK), "master got {}", show(&oack));

    // A stranger sprays ACKs at the group port for 400 ms.
    let stranger = bind_in(1);
    let before = Wire::read(&lab.server);
    let t = Instant::now();
    let mut sent = 0;
    while t.elapsed() < Duration::from_millis(400) {
        stranger.send_to(&raw::ack(1), tid).unwrap();
        sent += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    let spray = t.elapsed();
    let answers = collect(&stranger, Duration::from_millis(300));
    let wire = Wire::read(&lab.server).since(before);
    let allowed = 10 + (spray.as_millis() as usize * 10).div_ceil(1000) + 1;
    eprintln!("group port spray: {sent} ACKs in {spray:?}, {} answers (allowed {allowed}), server sent {} unicast packets", answers.len(), wire.uc_packets);
    assert!(!answers.is_empty(), "the stranger got no ERROR 5 at all: the spray proved nothing");
    assert!(answers.iter().all(|(p, from)| *from == tid && raw::parse_error(p).map(|e| e.0) == Some(5)), "not all ERROR 5 from the group port");
    assert!(answers.len() <= allowed, "{sent} packets of a non-member bought {} ERROR 5 (allowed {allowed})", answers.len());
    // On the wire: the answers, and at most a few OACKs to the waiting master.
    assert!(wire.uc_packets as usize <= allowed + 3, "the server sent {} unicast packets during the spray (allowed {allowed} + 3)", wire.uc_packets);

    // A member repeats its request 100 times within 200 ms.
    let member = bind_in(1);
    member.send_to(&rrq, listen).unwrap();
    let t = Instant::now();
    for _ in 0..99 {
        std::thread::sleep(Duration::from_millis(2));
        member.send_to(&rrq, listen).unwrap();
    }
    let burst = t.elapsed();
    let oacks: Vec<_> = collect(&member, Duration::from_millis(300)).into_iter().filter(|(p, _)| raw::opcode(p) == Some(OACK)).collect();
    let allowed = 1 + (burst.as_millis() as usize).div_ceil(100) + 1;
    eprintln!("repeated group request: 100 in {burst:?}, {} OACKs (allowed {allowed})", oacks.len());
    assert!(!oacks.is_empty(), "no OACK for the member\n{}", server.log_tail(30));
    assert!(oacks.len() <= allowed, "100 repeated requests in {burst:?} bought {} OACKs (allowed {allowed})", oacks.len());
    for s in [&master, &member] {
        s.send_to(&error_packet(0, "done"), tid).unwrap();
    }
    drop(server);
}
