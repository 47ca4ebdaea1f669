//! `tftpcast bench`: a load generator for TFTP servers (tftpcast or any other).
//!
//! N clients run at once, each fetching the file again and again (`--rounds` times, or until
//! `--duration` has passed), each transfer on a fresh socket as a real client would. Every
//! download is hashed as it arrives (SHA-256, incrementally: nothing is kept in memory) and
//! checked against `--expect-sha256` or `--expect-file`; without either, all downloads must at
//! least agree with each other. The report gives transfers ok and failed (by reason),
//! aggregate goodput, per-transfer latency p50/p99, and server datagrams per delivered block
//! (1.0 is a perfect server: no retransmission, no duplicate).
//!
//! # How it scales
//! Clients are spread over `--threads` worker threads (default: the cores this process may
//! run on). A worker drives its clients' [`tftpcast_proto::Receiver`]s over nonblocking
//! sockets with one epoll instance and a coarse timer wheel (a scan every few milliseconds),
//! so 1000 clients on two cores cost little more than their datagrams. A worker with a single
//! client uses a blocking socket instead: one `recvfrom` and one `sendto` per block, which is
//! as close to the lock-step limit as a client gets.
//!
//! # Raw ping-pong
//! `--raw-echo ADDR:PORT` runs a minimal UDP echo server; `--raw-pingpong --server ADDR:PORT`
//! runs the same clients against it, exchanging a 4-byte request for `windowsize` replies of
//! `blksize + 4` bytes, just as TFTP exchanges an ACK for a window of DATA. That measures the
//! ceiling of the path (kernel, loopback, scheduling, this client) with no TFTP server work.
//!
//! # Multicast
//! `--multicast` makes every client an RFC 2090 client
//! ([`tftpcast_proto::mcast_receiver::McastReceiver`]): a unicast socket for the request and
//! ACKs, and a socket bound to the group's port (`SO_REUSEADDR`, so the clients of one host
//! share it as separate machines would) joined on the interface that routes to the server.
//! Blocks may arrive out of order: the in-order prefix is hashed as it grows and blocks
//! beyond a gap wait (copied) until it fills, so memory stays near zero when the group
//! streams in order. A server that answers without multicast is followed by unicast; the
//! report counts such fallbacks. Run multicast only inside a network namespace.
//!
//! # Source addresses
//! `--source-base 127.1.0.1` gives client `i` the source address 127.1.0.1 + i, as the
//! machines of a lab have distinct addresses; servers with a per-address transfer limit then
//! see N clients rather than one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, IsTerminal, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tftpcast_proto::mcast_receiver::{McastReceiver, McastReceiverConfig, Via};
use tftpcast_proto::addr;
use tftpcast_proto::packet::{self, ErrorCode, Mode, MAX_BLKSIZE, MAX_DATAGRAM, MIN_BLKSIZE};
use tftpcast_proto::{Receiver, ReceiverConfig, ReceiverOutcome};

/// Datagrams are received into slices of buffers this large.
const RECV_CHUNK: usize = 1 << 20;
/// How often a worker scans its transfers for expired timers.
const TICK: Duration = Duration::from_millis(5);
/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Receive buffer of a multicast group socket: the group sends at the server's pace.
const GROUP_RECV_BUFFER: usize = 4 << 20;
/// Datagrams read from a group socket per readiness event.
const GROUP_BURST: usize = 64;
/// Magic of a raw ping-pong request.
const RAW_MAGIC: &[u8; 2] = b"PP";

/// Arguments of `tftpcast bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Server to load (with --raw-pingpong: a `tftpcast bench --raw-echo` server).
    #[arg(long, value_name = "ADDR:PORT", required_unless_present = "raw_echo")]
    pub server: Option<SocketAddr>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=60000))]
    pub clients: u32,
    /// Remote file to fetch.
    #[arg(long, value_name = "NAME", required_unless_present_any = ["raw_echo", "raw_pingpong"])]
    pub file: Option<String>,
    /// Block size to ask for (RFC 2348); none: RFC 1350's 512 without the option.
    #[arg(long, value_parser = clap::value_parser!(u16).range(MIN_BLKSIZE as i64..=MAX_BLKSIZE as i64))]
    pub blksize: Option<u16>,
    /// Window size to ask for (RFC 7440).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub windowsize: Option<u16>,
    /// Retransmission timeout in seconds to ask for (RFC 2349), also the clients' own.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u8).range(1..))]
    pub timeout: Option<u8>,
    /// Ask for the transfer size (RFC 2349), as PXE clients do.
    #[arg(long)]
    pub tsize: bool,
    /// Fetch by RFC 2090 multicast (run it inside a network namespace, never on a shared
    /// host's loopback).
    #[arg(long, conflicts_with = "raw_pingpong")]
    pub multicast: bool,
    /// SHA-256 every download must have, in hex.
    #[arg(long, value_name = "HEX", conflicts_with = "expect_file")]
    pub expect_sha256: Option<String>,
    /// A local copy of the file: every download must equal it (digest and size).
    #[arg(long, value_name = "LOCAL_PATH")]
    pub expect_file: Option<PathBuf>,
    /// Keep starting transfers for this many seconds (each client fetches back to back).
    #[arg(long, value_name = "S", conflicts_with = "rounds")]
    pub duration: Option<f64>,
    /// Transfers per client, back to back [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: Option<u32>,
    /// Print one JSON object with the results on stdout.
    #[arg(long)]
    pub json: bool,
    /// Worker threads [default: the cores this process may run on].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Consecutive timeouts without progress before a transfer fails.
    #[arg(long, default_value_t = 6)]
    pub retries: u32,
    /// A transfer still running after this many seconds fails ("deadline").
    #[arg(long, value_name = "S", default_value_t = 600.0)]
    pub transfer_limit: f64,
    /// Source address of client 0; client i uses this address + i (IPv4 only).
    #[arg(long, value_name = "ADDR")]
    pub source_base: Option<Ipv4Addr>,
    /// Spread the clients' first requests evenly over this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub ramp_ms: u64,
    /// Raw UDP ping-pong against a `--raw-echo` server instead of TFTP: the path's ceiling.
    #[arg(long, requires = "server")]
    pub raw_pingpong: bool,
    /// Bytes per raw ping-pong "transfer" [default: the size of --expect-file, else 1 MiB].
    #[arg(long, value_name = "BYTES")]
    pub raw_size: Option<u64>,
    /// Run the raw ping-pong echo server on ADDR:PORT until killed.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["server", "raw_pingpong", "multicast"])]
    pub raw_echo: Option<SocketAddr>,
    /// No progress line on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Runs `tftpcast bench`; the exit code is 0 when every transfer succeeded, 1 when any
/// failed (or none ran), 2 for bad arguments.
pub fn run(args: &BenchArgs) -> ExitCode {
    if let Some(addr) = args.raw_echo {
        return match raw_echo(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tftpcast bench: echo server on {addr}: {e}");
                ExitCode::from(1)
            }
        };
    }
    let plan = match Plan::new(args) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("tftpcast bench: {e}");
            return ExitCode::from(2);
        }
    };
    raise_fd_limit(plan.clients as u64 * 2 + 64);
    let report = execute(&plan, args.quiet || !io::stderr().is_terminal());
    if args.json {
        println!("{}", report.json(&plan));
    } else {
        print!("{}", report.human(&plan));
    }
    if report.failed == 0 && report.ok > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

// ---------------------------------------------------------------------------------------------
// The plan: what every client does.
// ---------------------------------------------------------------------------------------------

/// When clients stop starting transfers.
#[derive(Debug, Clone, Copy)]
enum End {
    Rounds(u32),
    Duration(Duration),
}

#[derive(Debug)]
enum Kind {
    Tftp { template: ReceiverConfig },
    Mcast { template: McastReceiverConfig },
    Raw { size: u64, blksize: u16, window: u16, timeout: Duration },
}

#[derive(Debug)]
struct Plan {
    server: SocketAddr,
    label: String,
    kind: Kind,
    clients: u32,
    threads: u32,
    end: End,
    expect_digest: Option<[u8; 32]>,
    expect_size: Option<u64>,
    retries: u32,
    transfer_limit: Duration,
    source_base: Option<Ipv4Addr>,
    ramp: Duration,
    blksize: Option<u16>,
    windowsize: Option<u16>,
    rcvbuf: usize,
}

impl Plan {
    fn new(a: &BenchArgs) -> Result<Plan, String> {
        let server = a.server.ok_or("--server is required")?;
        if a.multicast && !server.is_ipv4() {
            return Err("--multicast needs an IPv4 --server (RFC 2090 groups are IPv4 here)".into());
        }
        let (expect_digest, expect_size) = match (&a.expect_sha256, &a.expect_file) {
            (Some(hex), _) => (Some(parse_hex32(hex).ok_or_else(|| format!("--expect-sha256 {hex:?} is not 64 hex digits"))?), None),
            (None, Some(path)) => {
                let (d, n) = hash_file(path).map_err(|e| format!("--expect-file {}: {e}", path.display()))?;
                (Some(d), Some(n))
            }
            (None, None) => (None, None),
        };
        if a.source_base.is_some() && !server.is_ipv4() {
            return Err("--source-base needs an IPv4 --server".into());
        }
        if let Some(base) = a.source_base {
            if u32::from(base).checked_add(a.clients - 1).is_none() {
                return Err("--source-base + --clients runs past 255.255.255.255".into());
            }
        }
        let end = match (a.duration, a.rounds) {
            (Some(s), _) if !(s > 0.0 && s.is_finite()) => return Err(format!("--duration {s} must be positive")),
            (Some(s), _) => End::Duration(Duration::from_secs_f64(s)),
            (None, r) => End::Rounds(r.unwrap_or(1)),
        };
        if !(a.transfer_limit > 0.0 && a.transfer_limit.is_finite()) {
            return Err("--transfer-limit must be positive".into());
        }
        let base = a.timeout.map_or(super::DEFAULT_TIMEOUT, |t| Duration::from_secs(t as u64));
        let (kind, label) = if a.raw_pingpong {
            let size = a.raw_size.or(expect_size).unwrap_or(1 << 20);
            let blksize = a.blksize.unwrap_or(packet::DEFAULT_BLKSIZE);
            let window = a.windowsize.unwrap_or(1);
            (Kind::Raw { size, blksize, window, timeout: base }, format!("raw ping-pong of {size} bytes"))
        } else {
            let file = a.file.clone().ok_or("--file is required")?;
            let cfg = super::download(&file, Mode::Octet, a.blksize, a.windowsize, a.timeout, a.tsize, a.retries);
            match a.multicast {
                true => (Kind::Mcast { template: McastReceiverConfig { server, request: cfg } }, format!("{file} (multicast)")),
                false => (Kind::Tftp { template: cfg }, file),
            }
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let threads = a.threads.unwrap_or(cores).min(a.clients).max(1);
        let block = a.blksize.unwrap_or(packet::DEFAULT_BLKSIZE) as usize + 4;
        let rcvbuf = (2 * a.windowsize.unwrap_or(1) as usize * block).clamp(64 << 10, 16 << 20);
        Ok(Plan {
            server,
            label,
            kind,
            clients: a.clients,
            threads,
            end,
            expect_digest,
            expect_size,
            retries: a.retries,
            transfer_limit: Duration::from_secs_f64(a.transfer_limit),
            source_base: a.source_base,
            ramp: Duration::from_millis(a.ramp_ms),
            blksize: a.blksize,
            windowsize: a.windowsize,
            rcvbuf,
        })
    }

    fn bind_addr(&self, client: u32) -> SocketAddr {
        match (self.source_base, self.server) {
            (Some(b), _) => (Ipv4Addr::from(u32::from(b) + client), 0).into(),
            (None, SocketAddr::V4(_)) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            (None, SocketAddr::V6(_)) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        }
    }

    fn is_raw(&self) -> bool {
        matches!(self.kind, Kind::Raw { .. })
    }

    fn is_mcast(&self) -> bool {
        matches!(self.kind, Kind::Mcast { .. })
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(d: &[u8]) -> String {
    d.iter().fold(String::with_capacity(d.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn hash_file(path: &std::path::Path) -> io::Result<([u8; 32], u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((h.finalize().into(), n))
}

/// 1000 clients need 1000 sockets: lift the soft descriptor limit to what is needed (best
/// effort, never above the hard limit).
fn raise_fd_limit(want: u64) {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < want as libc::rlim_t {
            r.rlim_cur = (want as libc::rlim_t).min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One transfer.
// ---------------------------------------------------------------------------------------------

/// How one transfer ended.
#[derive(Debug, Clone)]
struct TransferResult {
    /// None: success (digest still to be checked when no expectation was given).
    failure: Option<(String, String)>,
    bytes: u64,
    latency: Duration,
    server_datagrams: u64,
    blocks: u64,
    retransmits: u64,
    digest: Option<[u8; 32]>,
    /// Multicast runs: whether the server served this transfer by a group.
    multicast: Option<bool>,
}

/// The protocol half of a transfer.
#[allow(clippy::large_enum_variant)] // one per client, never moved on the packet path
enum Job {
    Tftp {
        rx: Receiver,
        hasher: Sha256,
    },
    Mcast {
        rx: McastReceiver,
        /// The group joined, and its socket.
        group: Option<(SocketAddrV4, UdpSocket)>,
        /// A new group socket waits to be registered with the worker's epoll.
        group_changed: bool,
        hasher: Sha256,
        /// Bytes hashed: the in-order prefix of the file.
        hashed: u64,
        /// Pieces beyond the prefix, by offset, until the gap before them fills.
        pending: BTreeMap<u64, Bytes>,
    },
    Raw {
        /// Replies still to come, in total.
        remaining_blocks: u64,
        /// Payload bytes still to come.
        remaining_bytes: u64,
        blksize: u16,
        window: u16,
        /// Sequence number of the current request, and replies to it still expected.
        seq: u32,
        pending: u16,
        deadline: Instant,
        timeout: Duration,
        retries: u32,
        max_retries: u32,
        request: Option<[u8; 12]>,
        outcome: Option<Result<(), (String, String)>>,
    },
}

struct Transfer {
    sock: UdpSocket,
    job: Job,
    server: SocketAddr,
    /// The server's transfer ID, once its first reply came.
    peer: Option<SocketAddr>,
    started: Instant,
    limit: Instant,
    bytes: u64,
    server_datagrams: u64,
    raw_blocks: u64,
    raw_retransmits: u64,
    io_error: Option<String>,
}



impl Transfer {
    fn start(plan: &Plan, client: u32, now: Instant, blocking: bool) -> io::Result<Transfer> {
        let sock = UdpSocket::bind(plan.bind_addr(client))?;
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(plan.rcvbuf);
        sock.set_nonblocking(!blocking)?;
        let job = match &plan.kind {
            Kind::Tftp { template } => Job::Tftp { rx: Receiver::new(now, template.clone()), hasher: Sha256::new() },
            Kind::Mcast { template } => Job::Mcast {
                rx: McastReceiver::new(now, template.clone()),
                group: None,
                group_changed: false,
                hasher: Sha256::new(),
                hashed: 0,
                pending: BTreeMap::new(),
            },
            &Kind::Raw { size, blksize, window, timeout } => {
                let blocks = size / blksize as u64 + 1;
                Job::Raw {
                    remaining_blocks: blocks,
                    remaining_bytes: size,
                    blksize,
                    window: window.max(1),
                    seq: 0,
                    pending: 0,
                    deadline: now + timeout,
                    timeout,
                    retries: 0,
                    max_retries: plan.retries,
                    request: None,
                    outcome: None,
                }
            }
        };
        let mut t = Transfer {
            sock,
            job,
            server: plan.server,
            peer: None,
            started: now,
            limit: now + plan.transfer_limit,
            bytes: 0,
            server_datagrams: 0,
            raw_blocks: 0,
            raw_retransmits: 0,
            io_error: None,
        };
        if let Job::Raw { .. } = t.job {
            t.raw_next_request(now);
        }
        t.flush();
        Ok(t)
    }

    /// Adds a newly joined group socket to the worker's epoll set.
    fn register_group(&mut self, ep: &Epoll, i: usize) -> io::Result<()> {
        if let Job::Mcast { group: Some((_, g)), group_changed, .. } = &mut self.job {
            if *group_changed {
                *group_changed = false;
                ep.add(g.as_raw_fd(), ((i as u64) << 1) | 1)?;
            }
        }
        Ok(())
    }

    /// Datagrams worth reading per readiness event: a window's worth.
    fn burst(&self) -> usize {
        match &self.job {
            Job::Tftp { rx, .. } => rx.windowsize().max(1) as usize + 1,
            Job::Mcast { .. } => GROUP_BURST,
            Job::Raw { window, .. } => *window as usize + 1,
        }
    }

    fn deadline(&self) -> Instant {
        let d = match &self.job {
            Job::Tftp { rx, .. } => rx.poll_timeout(),
            Job::Mcast { rx, .. } => rx.poll_timeout(),
            Job::Raw { deadline, outcome: None, .. } => Some(*deadline),
            Job::Raw { .. } => None,
        };
        d.map_or(self.limit, |d| d.min(self.limit))
    }

    fn finished(&self) -> bool {
        self.io_error.is_some()
            || match &self.job {
                Job::Tftp { rx, .. } => rx.is_done(),
                Job::Mcast { rx, .. } => rx.is_done(),
                Job::Raw { outcome, .. } => outcome.is_some(),
            }
    }

    /// Sends whatever the protocol has queued.
    fn flush(&mut self) {
        let to = self.peer.unwrap_or(self.server);
        match &mut self.job {
            Job::Tftp { rx, hasher } => {
                while let Some(chunk) = rx.take_data() {
                    hasher.update(&chunk);
                    self.bytes += chunk.len() as u64;
                }
                while let Some(t) = rx.poll_transmit(Instant::now()) {
                    if let Err(e) = send(&self.sock, &t.datagram.into_vec(), to) {
                        self.io_error.get_or_insert(format!("sending to {to}: {e}"));
                    }
                }
            }
            Job::Mcast { rx, group, group_changed, hasher, hashed, pending } => {
                while let Some((offset, chunk)) = rx.take_block() {
                    absorb(hasher, hashed, pending, offset, chunk);
                }
                // Join (or move to) the group before anything is sent: the master's ACK
                // makes the server send at once.
                let want = rx.group();
                if want != group.as_ref().map(|g| g.0) {
                    *group = None;
                    if let Some(g) = want {
                        let iface = route_source(rx.server_tid().unwrap_or(self.server));
                        match open_group_socket(g, iface) {
                            Ok(s) => {
                                *group = Some((g, s));
                                *group_changed = true;
                            }
                            Err(e) => {
                                self.io_error.get_or_insert(format!("joining {g} on {iface}: {e}"));
                            }
                        }
                    }
                }
                while let Some(t) = rx.poll_transmit(Instant::now()) {
                    let to = t.to.addr();
                    if let Err(e) = send(&self.sock, &t.datagram.into_vec(), to) {
                        if !matches!(t.to, tftpcast_proto::mcast_receiver::Dest::Stranger(_)) {
                            self.io_error.get_or_insert(format!("sending to {to}: {e}"));
                        }
                    }
                }
                self.bytes = *hashed;
            }
            Job::Raw { request, .. } => {
                if let Some(r) = request.take() {
                    if let Err(e) = send(&self.sock, &r, to) {
                        self.io_error.get_or_insert(format!("sending to {to}: {e}"));
                    }
                }
            }
        }
    }

    fn on_datagram(&mut self, now: Instant, from: SocketAddr, via: Via, datagram: Bytes) {
        if let Job::Mcast { rx, .. } = &mut self.job {
            // The receiver filters by the server's TID itself.
            if addr::unmap_ip(from.ip()) == addr::unmap_ip(self.server.ip()) {
                self.server_datagrams += 1;
            }
            let _ = rx.handle_datagram(now, from, via, datagram);
            self.flush();
            return;
        }
        match self.peer {
            Some(p) if addr::same(p, from) => {}
            Some(_) => {
                // RFC 1350: a stranger gets ERROR 5 and the transfer goes on.
                if !matches!(self.job, Job::Raw { .. }) {
                    let e = packet::error_packet(ErrorCode::UnknownTid, "Unknown transfer ID");
                    let _ = send(&self.sock, &e, from);
                }
                return;
            }
            None => {
                let plausible = match &self.job {
                    Job::Tftp { .. } | Job::Mcast { .. } => packet::decode(&datagram).is_ok(),
                    Job::Raw { .. } => true,
                };
                if addr::unmap_ip(from.ip()) != addr::unmap_ip(self.server.ip()) || !plausible {
                    return;
                }
                self.peer = Some(from);
            }
        }
        self.server_datagrams += 1;
        match &mut self.job {
            Job::Tftp { rx, .. } => {
                let _ = rx.handle_datagram(now, datagram);
            }
            Job::Mcast { .. } => {}
            Job::Raw { .. } => self.raw_reply(now, &datagram),
        }
        self.flush();
    }

    fn on_tick(&mut self, now: Instant) {
        if now >= self.limit && !self.finished() {
            match &mut self.job {
                Job::Tftp { rx, .. } => rx.abort(ErrorCode::NotDefined, "transfer time limit"),
                Job::Mcast { rx, .. } => rx.abort(ErrorCode::NotDefined, "transfer time limit"),
                Job::Raw { outcome, .. } => {
                    *outcome = Some(Err(("deadline".into(), "transfer time limit".into())));
                }
            }
            self.flush();
            return;
        }
        match &mut self.job {
            Job::Tftp { rx, .. } => rx.handle_timeout(now),
            Job::Mcast { rx, .. } => rx.handle_timeout(now),
            Job::Raw { deadline, outcome: None, .. } if now >= *deadline => self.raw_timeout(now),
            Job::Raw { .. } => {}
        }
        self.flush();
    }

    fn raw_next_request(&mut self, now: Instant) {
        if let Job::Raw { remaining_blocks, blksize, window, seq, pending, deadline, timeout, retries, request, outcome, .. } =
            &mut self.job
        {
            if *remaining_blocks == 0 {
                *outcome = Some(Ok(()));
                return;
            }
            *seq = seq.wrapping_add(1);
            *pending = (*window as u64).min(*remaining_blocks) as u16;
            *retries = 0;
            *deadline = now + *timeout;
            *request = Some(raw_request(*blksize + 4, *pending, *seq));
        }
    }

    fn raw_reply(&mut self, now: Instant, d: &[u8]) {
        let Job::Raw { remaining_blocks, remaining_bytes, blksize, seq, pending, .. } = &mut self.job else { return };
        if d.len() < 4 || u32::from_be_bytes([d[0], d[1], d[2], d[3]]) != *seq || *pending == 0 {
            return; // a reply to an older request
        }
        let payload = (*blksize as u64).min(*remaining_bytes);
        *remaining_bytes -= payload;
        *remaining_blocks -= 1;
        *pending -= 1;
        self.bytes += payload;
        self.raw_blocks += 1;
        if *pending == 0 {
            self.raw_next_request(now);
        }
    }

    fn raw_timeout(&mut self, now: Instant) {
        let Job::Raw { blksize, seq, pending, deadline, timeout, retries, max_retries, request, outcome, .. } =
            &mut self.job
        else {
            return;
        };
        if *retries >= *max_retries {
            *outcome = Some(Err(("timeout".into(), format!("no echo after {retries} retransmissions"))));
            return;
        }
        *retries += 1;
        self.raw_retransmits += 1;
        *deadline = now + *timeout * 2u32.pow((*retries).min(3));
        *request = Some(raw_request(*blksize + 4, *pending, *seq));
    }

    fn result(self, now: Instant) -> TransferResult {
        let latency = now - self.started;
        let mut multicast = None;
        let (failure, blocks, retransmits, digest) = match self.job {
            Job::Tftp { rx, hasher } => {
                let st = rx.stats();
                let failure = failure_of(self.io_error.as_deref(), rx.outcome());
                let digest = failure.is_none().then(|| hasher.finalize().into());
                (failure, st.blocks, st.retransmits, digest)
            }
            Job::Mcast { rx, hasher, hashed, pending, .. } => {
                let mut failure = failure_of(self.io_error.as_deref(), rx.outcome());
                if failure.is_none() && (!pending.is_empty() || rx.file_len() != Some(hashed)) {
                    let why = format!("{hashed} bytes in order, file length {:?}, {} pieces beyond a gap", rx.file_len(), pending.len());
                    failure = Some(("incomplete".to_string(), why));
                }
                multicast = Some(rx.group_address().is_some());
                let (blocks, retransmits) = match rx.unicast_stats() {
                    Some(u) => (u.blocks, u.retransmits),
                    None => (rx.stats().blocks, rx.stats().timeouts),
                };
                let digest = failure.is_none().then(|| hasher.finalize().into());
                (failure, blocks, retransmits, digest)
            }
            Job::Raw { outcome, .. } => {
                let failure = match (&self.io_error, outcome) {
                    (Some(e), _) => Some(("io".to_string(), e.clone())),
                    (None, Some(Ok(()))) => None,
                    (None, Some(Err(f))) => Some(f),
                    (None, None) => Some(("unfinished".to_string(), String::new())),
                };
                (failure, self.raw_blocks, self.raw_retransmits, None)
            }
        };
        TransferResult {
            failure,
            bytes: self.bytes,
            latency,
            server_datagrams: self.server_datagrams,
            blocks,
            retransmits,
            digest,
            multicast,
        }
    }
}

fn failure_of(io_error: Option<&str>, outcome: Option<&ReceiverOutcome>) -> Option<(String, String)> {
    match (io_error, outcome) {
        (Some(e), _) => Some(("io".to_string(), e.to_string())),
        (None, Some(ReceiverOutcome::Complete)) => None,
        (None, Some(ReceiverOutcome::TimedOut { retries })) => {
            Some(("timeout".to_string(), format!("no answer after {retries} retransmissions")))
        }
        (None, Some(ReceiverOutcome::PeerError { code, message })) => {
            Some((format!("server-error-{}", code.code()), message.clone()))
        }
        (None, Some(ReceiverOutcome::Aborted { reason, .. })) if reason == "transfer time limit" => {
            Some(("deadline".to_string(), reason.clone()))
        }
        (None, Some(ReceiverOutcome::Aborted { code, reason })) => Some((format!("aborted-{}", code.code()), reason.clone())),
        (None, None) => Some(("unfinished".to_string(), String::new())),
    }
}

/// Hashes a piece of a multicast download: at once when it extends the in-order prefix
/// (then whatever waited behind it), else kept (copied, so the receive buffer it came in is
/// freed) until the gap before it fills. Pieces already hashed are duplicates and dropped.
fn absorb(hasher: &mut Sha256, hashed: &mut u64, pending: &mut BTreeMap<u64, Bytes>, offset: u64, chunk: Bytes) {
    if offset > *hashed {
        pending.entry(offset).or_insert_with(|| Bytes::copy_from_slice(&chunk));
        return;
    }
    if offset + chunk.len() as u64 <= *hashed {
        return;
    }
    let skip = (*hashed - offset) as usize;
    hasher.update(&chunk[skip..]);
    *hashed += (chunk.len() - skip) as u64;
    while let Some(entry) = pending.first_entry() {
        if *entry.key() > *hashed {
            break;
        }
        let (off, piece) = entry.remove_entry();
        if off + piece.len() as u64 > *hashed {
            let skip = (*hashed - off) as usize;
            hasher.update(&piece[skip..]);
            *hashed += (piece.len() - skip) as u64;
        }
    }
}

/// Binds `0.0.0.0:port` of a group (shared with the other clients of this host, as separate
/// machines would each have it) and joins the group on the interface whose address is
/// `iface`. Dropping the socket leaves the group.
fn open_group_socket(group: SocketAddrV4, iface: Ipv4Addr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, group.port())).into())?;
    s.join_multicast_v4(group.ip(), &iface)?;
    // Otherwise Linux hands this socket every group joined on the host on that port.
    s.set_multicast_all_v4(false)?;
    let _ = s.set_recv_buffer_size(GROUP_RECV_BUFFER);
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The local IPv4 address the kernel would use to reach `to`: the interface to join on.
fn route_source(to: SocketAddr) -> Ipv4Addr {
    let probe = || -> io::Result<IpAddr> {
        let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
        s.connect(SocketAddr::from((addr::unmap_ip(to.ip()), to.port())))?;
        Ok(s.local_addr()?.ip())
    };
    match probe() {
        Ok(IpAddr::V4(ip)) => ip,
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

fn send(sock: &UdpSocket, d: &[u8], to: SocketAddr) -> io::Result<()> {
    loop {
        match sock.send_to(d, to) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A full send buffer on loopback: the datagram is lost, the protocol's timer
            // recovers it, as on a real network.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// A raw ping-pong request: sequence number, reply size, reply count.
fn raw_request(size: u16, count: u16, seq: u32) -> [u8; 12] {
    let mut r = [0u8; 12];
    r[0..4].copy_from_slice(&seq.to_be_bytes());
    r[4..6].copy_from_slice(RAW_MAGIC);
    r[6..8].copy_from_slice(&size.to_be_bytes());
    r[8..10].copy_from_slice(&count.to_be_bytes());
    r
}

/// The raw ping-pong echo server: answers each request with `count` datagrams of `size` bytes
/// starting with the request's sequence number. One blocking socket, one thread, no state.
fn raw_echo(addr: SocketAddr) -> io::Result<()> {
    let sock = UdpSocket::bind(addr)?;
    eprintln!("tftpcast bench: raw echo listening on {}", sock.local_addr()?);
    let mut buf = [0u8; 64];
    let mut out = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n < 10 || &buf[4..6] != RAW_MAGIC {
            continue;
        }
        let size = (u16::from_be_bytes([buf[6], buf[7]]) as usize).clamp(4, MAX_DATAGRAM);
        let count = u16::from_be_bytes([buf[8], buf[9]]).min(1024);
        out[..4].copy_from_slice(&buf[..4]);
        for _ in 0..count {
            let _ = sock.send_to(&out[..size], from);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workers.
// ---------------------------------------------------------------------------------------------

/// Counters the progress line reads while workers run.
#[derive(Default)]
struct Live {
    ok: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
}

struct Client {
    id: u32,
    rounds: u32,
    next_start: Instant,
    current: Option<Transfer>,
    done: bool,
}

struct Worker<'a> {
    plan: &'a Plan,
    live: &'a Live,
    start: Instant,
    clients: Vec<Client>,
    results: Vec<TransferResult>,
    buf: BytesMut,
}

impl<'a> Worker<'a> {
    fn new(plan: &'a Plan, live: &'a Live, start: Instant, ids: Vec<u32>) -> Worker<'a> {
        let clients = ids
            .into_iter()
            .map(|id| {
                let offset = if plan.clients > 1 { plan.ramp * id / (plan.clients - 1) } else { Duration::ZERO };
                Client { id, rounds: 0, next_start: start + offset, current: None, done: false }
            })
            .collect();
        Worker { plan, live, start, clients, results: Vec::new(), buf: BytesMut::new() }
    }

    /// Whether client `i` may start another transfer at `now`.
    fn may_start(&self, c: &Client, now: Instant) -> bool {
        match self.plan.end {
            End::Rounds(n) => c.rounds < n,
            End::Duration(d) => c.rounds == 0 || now < self.start + d,
        }
    }

    fn record(&mut self, r: TransferResult) {
        if r.failure.is_none() {
            self.live.ok.fetch_add(1, Ordering::Relaxed);
            self.live.bytes.fetch_add(r.bytes, Ordering::Relaxed);
        } else {
            self.live.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.results.push(r);
    }

    /// Ends client `i`'s transfer if it is over; schedules its next one.
    fn reap(&mut self, i: usize, now: Instant) -> bool {
        let over = self.clients[i].current.as_ref().is_some_and(|t| t.finished());
        if over {
            let t = self.clients[i].current.take().unwrap();
            self.record(t.result(now));
            let c = &mut self.clients[i];
            c.rounds += 1;
            c.next_start = now;
        }
        over
    }

    /// Starts transfers for idle clients whose time has come; marks clients that are done.
    /// Returns the indices started.
    fn start_due(&mut self, now: Instant, blocking: bool, started: &mut Vec<usize>) {
        for i in 0..self.clients.len() {
            let c = &self.clients[i];
            if c.done || c.current.is_some() || c.next_start > now {
                continue;
            }
            if !self.may_start(c, now) {
                self.clients[i].done = true;
                continue;
            }
            match Transfer::start(self.plan, c.id, now, blocking) {
                Ok(t) => {
                    self.clients[i].current = Some(t);
                    started.push(i);
                }
                Err(e) => {
                    let r = TransferResult {
                        failure: Some(("io".into(), format!("opening a socket: {e}"))),
                        bytes: 0,
                        latency: Duration::ZERO,
                        server_datagrams: 0,
                        blocks: 0,
                        retransmits: 0,
                        digest: None,
                        multicast: None,
                    };
                    self.record(r);
                    let c = &mut self.clients[i];
                    c.rounds += 1;
                    // Out of sockets or ports: back off instead of spinning.
                    c.next_start = now + Duration::from_millis(100);
                }
            }
        }
    }

    fn all_done(&self) -> bool {
        self.clients.iter().all(|c| c.done)
    }

    fn recv_into(&mut self, sock: &UdpSocket) -> io::Result<(Bytes, SocketAddr)> {
        if self.buf.len() <= MAX_DATAGRAM {
            self.buf = BytesMut::zeroed(RECV_CHUNK);
        }
        let (n, from) = sock.recv_from(&mut self.buf[..])?;
        Ok((self.buf.split_to(n).freeze(), from))
    }

    /// One client on this worker: blocking socket, one system call per datagram each way.
    fn run_blocking(&mut self) {
        let mut started = Vec::new();
        loop {
            let now = Instant::now();
            started.clear();
            self.start_due(now, true, &mut started);
            if self.all_done() {
                return;
            }
            let Some(mut t) = self.clients[0].current.take() else {
                let wait = self.clients[0].next_start.saturating_duration_since(now);
                std::thread::sleep(wait.max(Duration::from_micros(100)));
                continue;
            };
            let mut read_timeout: Option<Duration> = None;
            while !t.finished() {
                let now = Instant::now();
                let deadline = t.deadline();
                if deadline <= now {
                    t.on_tick(now);
                    continue;
                }
                let wait = (deadline - now).max(Duration::from_millis(1));
                let stale = read_timeout.is_none_or(|r| r.max(wait) - r.min(wait) > wait / 8);
                if stale {
                    if let Err(e) = t.sock.set_read_timeout(Some(wait)) {
                        t.io_error = Some(format!("setting the socket timeout: {e}"));
                        break;
                    }
                    read_timeout = Some(wait);
                }
                match self.recv_into(&t.sock) {
                    Ok((d, from)) => t.on_datagram(Instant::now(), from, Via::Unicast, d),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                        t.on_tick(Instant::now())
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => t.io_error = Some(format!("receiving: {e}")),
                }
            }
            self.clients[0].current = Some(t);
            self.reap(0, Instant::now());
        }
    }

    /// Many clients: nonblocking sockets on one epoll instance, timers scanned every TICK.
    fn run_epoll(&mut self) -> io::Result<()> {
        let ep = Epoll::new()?;
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        let mut started = Vec::new();
        let mut next_tick = Instant::now();
        loop {
            let now = Instant::now();
            started.clear();
            self.start_due(now, false, &mut started);
            for &i in &started {
                let t = self.clients[i].current.as_mut().unwrap();
                ep.add(t.sock.as_raw_fd(), (i as u64) << 1)?;
                t.register_group(&ep, i)?;
            }
            // A transfer can end at its start (a send error).
            for &i in &started {
                self.reap(i, now);
            }
            if self.all_done() {
                return Ok(());
            }
            let next_start = self
                .clients
                .iter()
                .filter(|c| !c.done && c.current.is_none())
                .map(|c| c.next_start)
                .min();
            let wake = next_start.map_or(next_tick, |s| s.min(next_tick));
            let wait_ms = wake.saturating_duration_since(now).as_millis().min(1000) as i32;
            let n = ep.wait(&mut events, wait_ms)?;
            for ev in &events[..n] {
                let i = (ev.u64 >> 1) as usize;
                let via = if ev.u64 & 1 == 1 { Via::Group } else { Via::Unicast };
                let Some(mut t) = self.clients[i].current.take() else { continue };
                for _ in 0..t.burst() {
                    let got = match (via, &t.job) {
                        (Via::Unicast, _) => self.recv_into(&t.sock),
                        (Via::Group, Job::Mcast { group: Some((_, g)), .. }) => self.recv_into(g),
                        // A stale event of a group socket since closed.
                        (Via::Group, _) => break,
                    };
                    match got {
                        Ok((d, from)) => t.on_datagram(Instant::now(), from, via, d),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // An ICMP error queued on the socket: nothing to read.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                        Err(e) => {
                            t.io_error = Some(format!("receiving: {e}"));
                            break;
                        }
                    }
                    if t.finished() {
                        break;
                    }
                }
                t.register_group(&ep, i)?;
                self.clients[i].current = Some(t);
                // Dropping the transfer closes its socket, which leaves the epoll set.
                self.reap(i, Instant::now());
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                for i in 0..self.clients.len() {
                    if let Some(t) = self.clients[i].current.as_mut() {
                        if t.deadline() <= now {
                            t.on_tick(now);
                            t.register_group(&ep, i)?;
                            self.reap(i, now);
                        }
                    }
                }
            }
        }
    }
}

struct Epoll(RawFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: plain system call; the descriptor is owned by the returned value.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll(fd))
    }

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: `ev` is a valid epoll_event; both descriptors are open.
        if unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: the buffer holds `events.len()` writable entries.
        let n = unsafe { libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
        }
        Ok(n as usize)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

// ---------------------------------------------------------------------------------------------
// Running and reporting.
// ---------------------------------------------------------------------------------------------

struct Report {
    transfers: u64,
    ok: u64,
    failed: u64,
    failures: BTreeMap<String, (u64, String)>,
    bytes: u64,
    wall: Duration,
    latencies: Vec<Duration>,
    server_datagrams: u64,
    blocks: u64,
    retransmits: u64,
    verified: &'static str,
    /// Multicast runs: successful transfers served by a group, and by unicast instead.
    by_group: u64,
    by_unicast: u64,
}

fn execute(plan: &Arc<Plan>, quiet: bool) -> Report {
    let live = Arc::new(Live::default());
    let start = Instant::now();
    let mut handles = Vec::new();
    for w in 0..plan.threads {
        let ids: Vec<u32> = (0..plan.clients).filter(|c| c % plan.threads == w).collect();
        let (plan, live) = (plan.clone(), live.clone());
        let h = std::thread::Builder::new()
            .name(format!("bench-{w}"))
            .spawn(move || {
                let single = ids.len() == 1 && !plan.is_mcast();
                let mut worker = Worker::new(&plan, &live, start, ids);
                if single {
                    worker.run_blocking();
                } else if let Err(e) = worker.run_epoll() {
                    eprintln!("tftpcast bench: worker {w}: {e}");
                    // Whatever is still running counts as failed.
                    let now = Instant::now();
                    for c in &mut worker.clients {
                        if let Some(mut t) = c.current.take() {
                            t.io_error.get_or_insert_with(|| e.to_string());
                            worker.results.push(t.result(now));
                        }
                    }
                }
                worker.results
            })
            .expect("spawning a bench worker");
        handles.push(h);
    }
    let mut progress = Progress { enabled: !quiet, width: 0, drawn: false };
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(if progress.enabled { PROGRESS_EVERY } else { Duration::from_millis(20) });
        progress.draw(plan, &live, start);
    }
    let results: Vec<TransferResult> = handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect();
    let wall = start.elapsed();
    progress.finish(plan, &live, start);
    summarize(plan, results, wall)
}

fn summarize(plan: &Plan, mut results: Vec<TransferResult>, wall: Duration) -> Report {
    // Without an expected digest, downloads must at least agree: the most common digest is
    // taken as the file's.
    let (reference, verified) = match plan.expect_digest {
        Some(d) => (Some(d), "sha256"),
        None if plan.is_raw() => (None, "none (raw ping-pong)"),
        None => {
            let mut counts: BTreeMap<[u8; 32], u64> = BTreeMap::new();
            for r in &results {
                if let Some(d) = r.digest {
                    *counts.entry(d).or_default() += 1;
                }
            }
            (counts.into_iter().max_by_key(|&(_, n)| n).map(|(d, _)| d), "consistent (no expected digest)")
        }
    };
    for r in &mut results {
        if r.failure.is_some() {
            continue;
        }
        if let Some(size) = plan.expect_size {
            if r.bytes != size {
                r.failure = Some(("size-mismatch".into(), format!("{} bytes, expected {size}", r.bytes)));
                continue;
            }
        }
        if let (Some(want), Some(got)) = (reference, r.digest) {
            if want != got {
                r.failure = Some(("sha256-mismatch".into(), format!("got {}, expected {}", hex(&got), hex(&want))));
            }
        }
    }
    let mut rep = Report {
        transfers: results.len() as u64,
        ok: 0,
        failed: 0,
        failures: BTreeMap::new(),
        bytes: 0,
        wall,
        latencies: Vec::new(),
        server_datagrams: 0,
        blocks: 0,
        retransmits: 0,
        verified,
        by_group: 0,
        by_unicast: 0,
    };
    for r in results {
        rep.server_datagrams += r.server_datagrams;
        rep.blocks += r.blocks;
        rep.retransmits += r.retransmits;
        match r.failure {
            None => {
                rep.ok += 1;
                rep.bytes += r.bytes;
                rep.latencies.push(r.latency);
                match r.multicast {
                    Some(true) => rep.by_group += 1,
                    Some(false) => rep.by_unicast += 1,
                    None => {}
                }
            }
            Some((reason, detail)) => {
                rep.failed += 1;
                rep.failures.entry(reason).or_insert((0, detail)).0 += 1;
            }
        }
    }
    rep.latencies.sort();
    rep
}

impl Report {
    fn goodput_mib_s(&self) -> f64 {
        let s = self.wall.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / (1 << 20) as f64
        } else {
            0.0
        }
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1].as_secs_f64() * 1000.0
    }

    fn packets_per_block(&self) -> f64 {
        if self.blocks == 0 {
            0.0
        } else {
            self.server_datagrams as f64 / self.blocks as f64
        }
    }

    fn human(&self, plan: &Plan) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "tftpcast bench: {} from {}: {} clients on {} threads, blksize {}, windowsize {}",
            plan.label,
            plan.server,
            plan.clients,
            plan.threads,
            plan.blksize.map_or("512 (none asked)".into(), |b| b.to_string()),
            plan.windowsize.map_or("1 (none asked)".into(), |w| w.to_string()),
        );
        let _ = writeln!(s, "  transfers  {} ok, {} failed (verified: {})", self.ok, self.failed, self.verified);
        if plan.is_mcast() {
            let _ = writeln!(s, "  multicast  {} served by a group, {} by unicast instead", self.by_group, self.by_unicast);
        }
        for (reason, (n, detail)) in &self.failures {
            let _ = writeln!(s, "    {n:>6} {reason}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") });
        }
        let _ = writeln!(
            s,
            "  goodput    {:.2} MiB/s ({:.1} MiB in {:.3} s)",
            self.goodput_mib_s(),
            self.bytes as f64 / (1 << 20) as f64,
            self.wall.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "  latency    p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.percentile_ms(50.0),
            self.percentile_ms(99.0),
            self.percentile_ms(100.0)
        );
        let _ = writeln!(
            s,
            "  server     {:.4} datagrams per delivered block ({} datagrams, {} blocks); {} client retransmissions",
            self.packets_per_block(),
            self.server_datagrams,
            self.blocks,
            self.retransmits
        );
        s
    }

    fn json(&self, plan: &Plan) -> String {
        let mut failures = String::from("{");
        let mut samples = String::from("{");
        for (i, (reason, (n, detail))) in self.failures.iter().enumerate() {
            let sep = if i > 0 { "," } else { "" };
            let _ = write!(failures, "{sep}{}:{n}", json_str(reason));
            let _ = write!(samples, "{sep}{}:{}", json_str(reason), json_str(detail));
        }
        failures.push('}');
        samples.push('}');
        let (rounds, duration) = match plan.end {
            End::Rounds(n) => (n.to_string(), "null".to_string()),
            End::Duration(d) => ("null".to_string(), format!("{}", d.as_secs_f64())),
        };
        let opt = |v: Option<u16>| v.map_or("null".to_string(), |v| v.to_string());
        format!(
            concat!(
                "{{\"mode\":{},\"server\":{},\"file\":{},\"clients\":{},\"threads\":{},\"blksize\":{},",
                "\"windowsize\":{},\"rounds\":{},\"duration_s\":{},\"verified\":{},\"transfers\":{},",
                "\"ok\":{},\"failed\":{},\"failures\":{},\"failure_samples\":{},\"bytes\":{},\"wall_s\":{:.6},",
                "\"goodput_mib_s\":{:.3},\"latency_ms\":{{\"p50\":{:.3},\"p99\":{:.3},\"max\":{:.3}}},",
                "\"server_datagrams\":{},\"blocks\":{},\"server_packets_per_block\":{:.5},\"retransmits\":{},",
                "\"multicast\":{},\"by_group\":{},\"by_unicast\":{}}}"
            ),
            json_str(if plan.is_raw() {
                "raw-pingpong"
            } else if plan.is_mcast() {
                "tftp-multicast"
            } else {
                "tftp"
            }),
            json_str(&plan.server.to_string()),
            json_str(&plan.label),
            plan.clients,
            plan.threads,
            opt(plan.blksize),
            opt(plan.windowsize),
            rounds,
            duration,
            json_str(self.verified),
            self.transfers,
            self.ok,
            self.failed,
            failures,
            samples,
            self.bytes,
            self.wall.as_secs_f64(),
            self.goodput_mib_s(),
            self.percentile_ms(50.0),
            self.percentile_ms(99.0),
            self.percentile_ms(100.0),
            self.server_datagrams,
            self.blocks,
            self.packets_per_block(),
            self.retransmits,
            plan.is_mcast(),
            self.by_group,
            self.by_unicast,
        )
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The progress line on a terminal's stderr.
struct Progress {
    enabled: bool,
    width: usize,
    drawn: bool,
}

impl Progress {
    fn line(plan: &Plan, live: &Live, start: Instant) -> String {
        let ok = live.ok.load(Ordering::Relaxed);
        let failed = live.failed.load(Ordering::Relaxed);
        let bytes = live.bytes.load(Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { bytes as f64 / secs / (1 << 20) as f64 } else { 0.0 };
        let what = match plan.end {
            End::Rounds(n) => {
                let total = plan.clients as u64 * n as u64;
                let done = ok + failed;
                let width = 30usize;
                let filled = if total == 0 { width } else { (done as usize * width / total as usize).min(width) };
                format!("[{}{}] {done}/{total}", "#".repeat(filled), "-".repeat(width - filled))
            }
            End::Duration(d) => format!("{secs:.0}/{:.0} s", d.as_secs_f64()),
        };
        format!("{what}  ok {ok}  failed {failed}  {rate:.1} MiB/s  {secs:.1} s")
    }

    fn draw(&mut self, plan: &Plan, live: &Live, start: Instant) {
        if !self.enabled {
            return;
        }
        let line = Progress::line(plan, live, start);
        self.width = self.width.max(line.len());
        eprint!("\r{line:<w$}", w = self.width);
        self.drawn = true;
    }

    fn finish(&mut self, plan: &Plan, live: &Live, start: Instant) {
        if self.enabled {
            self.draw(plan, live, start);
            if self.drawn {
                eprintln!();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d: [u8; 32] = Sha256::digest(b"abc").into();
        assert_eq!(parse_hex32(&hex(&d)), Some(d));
        assert_eq!(parse_hex32(&hex(&d).to_uppercase()), Some(d));
        assert_eq!(parse_hex32("00"), None);
        assert_eq!(parse_hex32(&"zz".repeat(32)), None);
    }

    #[test]
    fn out_of_order_pieces_hash_as_the_file() {
        let file: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let piece = |i: usize| (i as u64 * 1000, Bytes::copy_from_slice(&file[i * 1000..(i + 1) * 1000]));
        let (mut h, mut hashed, mut pending) = (Sha256::new(), 0u64, BTreeMap::new());
        for i in [3, 1, 2, 2, 0, 9, 5, 4, 0, 6, 8, 7, 3] {
            let (off, b) = piece(i);
            absorb(&mut h, &mut hashed, &mut pending, off, b);
        }
        assert_eq!(hashed, 10_000);
        assert!(pending.is_empty());
        assert_eq!(<[u8; 32]>::from(h.finalize()), <[u8; 32]>::from(Sha256::digest(&file)));
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut rep = summarize_empty();
        rep.latencies = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(rep.percentile_ms(50.0), 50.0);
        assert_eq!(rep.percentile_ms(99.0), 99.0);
        assert_eq!(rep.percentile_ms(100.0), 100.0);
    }

    fn summarize_empty() -> Report {
        Report {
            transfers: 0,
            ok: 0,
            failed: 0,
            failures: BTreeMap::new(),
            bytes: 0,
            wall: Duration::ZERO,
            latencies: Vec::new(),
            server_datagrams: 0,
            blocks: 0,
            retransmits: 0,
            verified: "sha256",
            by_group: 0,
            by_unicast: 0,
        }
    }

    #[test]
    fn raw_ping_pong_against_the_echo_server() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = echo.local_addr().unwrap();
        drop(echo);
        std::thread::spawn(move || raw_echo(addr));
        std::thread::sleep(Duration::from_millis(50));
        for window in [1u16, 4] {
            let args = BenchArgs {
                server: Some(addr),
                clients: 3,
                file: None,
                blksize: Some(1000),
                windowsize: Some(window),
                timeout: None,
                tsize: false,
                multicast: false,
                expect_sha256: None,
                expect_file: None,
                duration: None,
                rounds: Some(2),
                json: false,
                threads: Some(2),
                retries: 6,
                transfer_limit: 30.0,
                source_base: None,
                ramp_ms: 0,
                raw_pingpong: true,
                raw_size: Some(10_500),
                raw_echo: None,
                quiet: true,
            };
            let plan = Arc::new(Plan::new(&args).unwrap());
            let rep = execute(&plan, true);
            assert_eq!((rep.ok, rep.failed), (6, 0), "{}", rep.human(&plan));
            assert_eq!(rep.bytes, 6 * 10_500);
            assert_eq!(rep.blocks, 6 * 11);
            assert_eq!(rep.server_datagrams, 6 * 11);
        }
    }
}
