//! `tftpcast get` and `tftpcast put`: a TFTP client for humans and tests.
//!
//! `put` (a write request) drives the server-side sender machine from the other end:
//! [`tftpcast_proto::Sender`] started with the WRQ as its first control packet, resent
//! until the server answers; an OACK answer is checked
//! ([`tftpcast_proto::upload::check_oack`]) and a sender with the agreed options takes
//! over, block 1 first. The file is read whole before the WRQ leaves (`-` reads standard
//! input), so `--tsize` can announce its size.
//!
//! A thin blocking driver around [`tftpcast_proto::Receiver`]: one UDP socket bound to an
//! ephemeral port, the RRQ sent to `--server`, the transfer locked onto the address of the
//! first reply (the server's TID), anything from elsewhere answered with ERROR 5. Every
//! protocol decision (options, windows, retransmission, netascii) is the receiver's.
//!
//! With `--multicast` it is an RFC 2090 client around
//! [`tftpcast_proto::mcast_receiver::McastReceiver`] instead: the same unicast socket sends
//! the request and the ACKs; once the server's OACK names a group, a second socket bound to
//! the group's port (with `SO_REUSEADDR`, so several clients can share a host) joins it on
//! the interface that routes to the server. Both sockets are waited on with `poll(2)`; the
//! receiver decides what to keep (only the server's TID counts). Blocks arrive in any order
//! and are written at their offsets. If the server answers without multicast, the same
//! receiver carries on as a unicast download.
//!
//! The file is written to a temporary file next to the destination and renamed over it
//! only when the transfer completed, so a failed download leaves nothing half-written;
//! `-o -` writes to standard output instead (a multicast download goes through an unnamed
//! temporary file first, since blocks arrive out of order). On a terminal, stderr shows a
//! progress line.

pub mod bench;


use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, IsTerminal, Seek, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tftpcast_proto::mcast_receiver::{Dest, Kind, McastReceiver, McastReceiverConfig, Via};
use tftpcast_proto::addr;
use tftpcast_proto::packet::{self, ErrorCode, Mode, MAX_BLKSIZE, MAX_DATAGRAM, MIN_BLKSIZE};
use tftpcast_proto::upload::{self, WriteOptions};
use tftpcast_proto::{Outcome, Packet, Receiver, ReceiverConfig, ReceiverOutcome, Sender, SenderConfig, Source};

/// Local retransmission timeout when `--timeout` is not given.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Cap of the retransmission backoff (the server's default cap, so we outlast its retries).
const MAX_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams are received into slices of buffers this large, handed on without copies.
const RECV_CHUNK: usize = 1 << 20;
/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Receive buffer asked for the multicast socket: a group sends a window at the server's
/// pace, whoever the master is.
const GROUP_RECV_BUFFER: usize = 4 << 20;
/// Datagrams read from one socket before the receiver's output is sent and written.
const RECV_BATCH: usize = 32;

/// Transfer mode of `tftpcast get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransferMode {
    /// Bytes as they are.
    Octet,
    /// Text: line ends converted from the wire's CR LF to LF.
    Netascii,
}

impl TransferMode {
    /// The mode as the protocol names it.
    fn wire(self) -> Mode {
        match self {
            TransferMode::Octet => Mode::Octet,
            TransferMode::Netascii => Mode::Netascii,
        }
    }
}

/// What `get` and `put` share: the server, the options to ask it for, the mode, retries
/// and quietness.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:69")]
    pub server: SocketAddr,
    /// Block size to ask for (RFC 2348).
    #[arg(long, value_parser = clap::value_parser!(u16).range(MIN_BLKSIZE as i64..=MAX_BLKSIZE as i64))]
    pub blksize: Option<u16>,
    /// Window size to ask for (RFC 7440).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub windowsize: Option<u16>,
    /// Retransmission timeout in seconds to ask for (RFC 2349).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
    pub timeout: Option<u8>,
    /// Transfer mode.
    #[arg(long, value_enum, default_value_t = TransferMode::Octet)]
    pub mode: TransferMode,
    /// Consecutive timeouts without progress before giving up.
    #[arg(long, default_value_t = 6)]
    pub retries: u32,
    /// No progress line or notices on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Arguments of `tftpcast get`.
#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub common: Common,
    /// Join the server's multicast group for this file (RFC 2090); octet mode only. A
    /// server that answers without multicast is followed by unicast.
    #[arg(long)]
    pub multicast: bool,
    /// Ask the server for the file size (RFC 2349), shown in the progress line.
    #[arg(long)]
    pub tsize: bool,
    /// File to fetch.
    pub remote_file: String,
    /// Where to write it (default: the remote file's last component; `-` for stdout).
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
}

/// Arguments of `tftpcast put`.
#[derive(Debug, Clone, clap::Args)]
pub struct PutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Announce the file size (RFC 2349), so a server with a size limit can refuse at once.
    #[arg(long)]
    pub tsize: bool,
    /// File to send (`-` for standard input).
    pub local_file: PathBuf,
    /// Name on the server (default: the local file's name).
    pub remote_file: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an ERROR packet.
    #[error("server error {}: {message}", .code.code())]
    Server { code: ErrorCode, message: String },
    #[error("no answer from {server} after {retries} retransmissions")]
    TimedOut { server: SocketAddr, retries: u32 },
    /// We ended the transfer (bad OACK, protocol violation, local write failure).
    #[error("transfer aborted: {reason}")]
    Aborted { code: ErrorCode, reason: String },
    #[error("cannot name a local file after {0:?}; use -o FILE")]
    NoLocalName(String),
    /// Options that do not go together.
    #[error("{0}")]
    Usage(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClientError {
    let context = context.into();
    move |source| ClientError::Io { context, source }
}

/// Fetches `args.remote_file`; returns the number of bytes written.
pub fn run_get(args: &GetArgs) -> Result<u64, ClientError> {
    let notices = !args.common.quiet;
    if args.multicast && args.common.mode != TransferMode::Octet {
        return Err(ClientError::Usage("--multicast works in octet mode only".into()));
    }
    // Open the destination first: a directory we cannot write to should fail before the
    // server is bothered.
    let out = Output::open(args)?;
    if args.multicast {
        return run_multicast(args, out, notices);
    }
    run_unicast(args, out, notices)
}

/// A UDP socket on an ephemeral port of the server's address family.
fn client_socket(server: SocketAddr) -> Result<UdpSocket, ClientError> {
    let bind: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    UdpSocket::bind(bind).map_err(io_err(format!("binding a UDP socket on {bind}")))
}

/// Sends what the sender has to send to `to`; a full socket buffer loses the datagram as
/// the wire would (the sender's timer recovers it).
fn send_pending(tx: &mut Sender, sock: &UdpSocket, to: SocketAddr, out: &mut Vec<u8>) -> Result<(), ClientError> {
    while let Some(t) = tx.poll_transmit(Instant::now()) {
        t.datagram.write_to(out);
        match sock.send_to(out, to) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ClientError::Io { context: format!("sending to {to}"), source: e }),
        }
    }
    Ok(())
}

/// A plain download (no `multicast` option) through [`Receiver`].
fn run_unicast(args: &GetArgs, mut out: Output, notices: bool) -> Result<u64, ClientError> {
    let sock = client_socket(args.common.server)?;
    grow_receive_buffer(&sock, args);

    let mode = args.common.mode.wire();
    let start = Instant::now();
    let mut rx = Receiver::new(start, receiver_config(args, mode));
    let mut progress = Progress::new(notices && io::stderr().is_terminal(), start);

    let result = drive(&sock, args.common.server, &mut rx, &mut out, &mut progress);
    progress.finish(rx.bytes_received(), rx.tsize());
    let written = result?;
    match rx.outcome() {
        Some(ReceiverOutcome::Complete) => {}
        Some(ReceiverOutcome::PeerError { code, message }) => {
            return Err(ClientError::Server { code: *code, message: message.clone() })
        }
        Some(ReceiverOutcome::TimedOut { retries }) => {
            return Err(ClientError::TimedOut { server: args.common.server, retries: *retries })
        }
        Some(ReceiverOutcome::Aborted { code, reason }) => {
            return Err(ClientError::Aborted { code: *code, reason: reason.clone() })
        }
        None => unreachable!("drive returns only when the transfer has ended"),
    }
    out.commit()?;
    Ok(written)
}

/// Runs the transfer to its end; returns the bytes written. `Err` only for local I/O
/// failures; how the transfer ended is `rx.outcome()`.
fn drive(
    sock: &UdpSocket,
    server: SocketAddr,
    rx: &mut Receiver,
    out: &mut Output,
    progress: &mut Progress,
) -> Result<u64, ClientError> {
    let mut peer: Option<SocketAddr> = None;
    let mut buf = BytesMut::new();
    let mut written = 0u64;
    let mut read_timeout: Option<Duration> = None;
    loop {
        written += write_data(rx, out, sock, peer.unwrap_or(server))?;
        while let Some(t) = rx.poll_transmit(Instant::now()) {
            let to = peer.unwrap_or(server);
            sock.send_to(&t.datagram.into_vec(), to).map_err(io_err(format!("sending to {to}")))?;
        }
        if rx.is_done() {
            return Ok(written);
        }
        progress.update(rx.bytes_received(), rx.tsize());

        let now = Instant::now();
        let deadline = rx.poll_timeout().expect("a running transfer always has a deadline");
        if deadline <= now {
            rx.handle_timeout(now);
            continue;
        }
        rearm(sock, &mut read_timeout, (deadline - now).max(Duration::from_millis(1)))?;
        if buf.len() <= MAX_DATAGRAM {
            buf = BytesMut::zeroed(RECV_CHUNK);
        }
        match sock.recv_from(&mut buf[..]) {
            Ok((n, from)) => {
                let datagram = buf.split_to(n).freeze();
                // The first reply must be TFTP at all to fix the server's TID.
                let is_error = datagram.get(..2) == Some(&[0, 5][..]);
                if (peer.is_some() || packet::decode(&datagram).is_ok()) && accept_from(&mut peer, from, is_error, server, sock) {
                    let _ = rx.handle_datagram(Instant::now(), datagram);
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                rx.handle_timeout(Instant::now());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ClientError::Io { context: "receiving from the server".into(), source: e }),
        }
    }
}

/// Writes what the receiver has delivered; returns the bytes written. A write that fails
/// turns the pending ACK into an ERROR to `to` (disk full when it is one).
fn write_data(rx: &mut Receiver, out: &mut Output, sock: &UdpSocket, to: SocketAddr) -> Result<u64, ClientError> {
    let mut written = 0;
    while let Some(chunk) = rx.take_data() {
        if let Err(e) = out.write_all(&chunk) {
            let code = match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorCode::DiskFull,
                _ => ErrorCode::NotDefined,
            };
            rx.abort(code, "the client could not write the file");
            while let Some(t) = rx.poll_transmit(Instant::now()) {
                let _ = sock.send_to(&t.datagram.into_vec(), to);
            }
            return Err(ClientError::Io { context: format!("writing {}", out.name()), source: e });
        }
        written += chunk.len() as u64;
    }
    Ok(written)
}

/// Sets the socket's read timeout to `wait`, but only when it is off by more than an eighth:
/// waking a little late costs nothing, a system call per datagram does.
fn rearm(sock: &UdpSocket, current: &mut Option<Duration>, wait: Duration) -> Result<(), ClientError> {
    let stale = match *current {
        None => true,
        Some(t) => t.max(wait) - t.min(wait) > wait / 8,
    };
    if stale {
        sock.set_read_timeout(Some(wait)).map_err(io_err("setting the socket timeout"))?;
        *current = Some(wait);
    }
    Ok(())
}

/// What `put` sends and under which name: the local file (or standard input) and the remote
/// name (the local file's name when not given).
fn put_input(args: &PutArgs) -> Result<(bytes::Bytes, String), ClientError> {
    let local = args.local_file.display().to_string();
    let data = if args.local_file.as_os_str() == "-" {
        let mut v = Vec::new();
        io::Read::read_to_end(&mut io::stdin().lock(), &mut v).map_err(io_err("reading standard input"))?;
        v
    } else {
        fs::read(&args.local_file).map_err(io_err(format!("reading {local}")))?
    };
    let remote = match &args.remote_file {
        Some(r) => r.clone(),
        None => args
            .local_file
            .file_name()
            .filter(|_| args.local_file.as_os_str() != "-")
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| ClientError::Usage("name the remote file: tftpcast put LOCAL REMOTE".into()))?,
    };
    Ok((bytes::Bytes::from(data), remote))
}

/// Whether a packet from `from` belongs to the transfer: the first reply fixes the server's
/// TID (it must come from the host asked); a stranger later gets ERROR 5 (RFC 1350) and the
/// transfer goes on.
fn accept_from(peer: &mut Option<SocketAddr>, from: SocketAddr, is_error: bool, server: SocketAddr, sock: &UdpSocket) -> bool {
    match *peer {
        Some(p) if addr::same(p, from) => true,
        Some(_) => {
            if !is_error {
                let _ = sock.send_to(&packet::error_packet(ErrorCode::UnknownTid, "Unknown transfer ID"), from);
            }
            false
        }
        None if addr::unmap_ip(from.ip()) == addr::unmap_ip(server.ip()) => {
            *peer = Some(from);
            true
        }
        None => false,
    }
}

/// The upload's sender: the client's own `--retries` decide, with no time floor.
fn put_sender_config(retries: u32, blksize: u16, windowsize: u16, timeout: Duration) -> SenderConfig {
    SenderConfig {
        blksize,
        windowsize,
        timeout,
        max_timeout: MAX_TIMEOUT.max(timeout),
        max_retries: retries,
        initial_retries: retries,
        give_up_after: Duration::ZERO,
        adaptive: None,
    }
}

/// A finished upload's outcome as the command's result.
fn put_outcome(outcome: Option<&Outcome>, server: SocketAddr) -> Result<(), ClientError> {
    match outcome {
        Some(Outcome::Complete) => Ok(()),
        Some(Outcome::PeerError { code, message }) => Err(ClientError::Server { code: *code, message: message.clone() }),
        Some(Outcome::TimedOut { retries }) => Err(ClientError::TimedOut { server, retries: *retries }),
        Some(Outcome::ProtocolViolation(why)) => Err(ClientError::Aborted { code: ErrorCode::IllegalOperation, reason: why.to_string() }),
        None => Err(ClientError::Aborted { code: ErrorCode::NotDefined, reason: "send failed".into() }),
    }
}

/// Sends `args.local_file`; returns the number of bytes the server acknowledged (as on the
/// wire: netascii encoded).
pub fn run_put(args: &PutArgs) -> Result<u64, ClientError> {
    let notices = !args.common.quiet;
    let (data, remote) = put_input(args)?;
    let mode = args.common.mode.wire();
    let source = || match mode {
        Mode::Octet => Source::octet(data.clone()),
        _ => Source::netascii(data.clone()),
    };
    let wire_len = source().wire_len();
    let asked = WriteOptions { blksize: args.common.blksize, windowsize: args.common.windowsize, timeout: args.common.timeout, tsize: args.tsize.then_some(wire_len) };
    let wrq = upload::write_request(remote.as_bytes(), mode, &asked);

    let sock = client_socket(args.common.server)?;
    let base = args.common.timeout.map_or(DEFAULT_TIMEOUT, |t| Duration::from_secs(t as u64));
    let sender_cfg = |blksize, windowsize, timeout| put_sender_config(args.common.retries, blksize, windowsize, timeout);
    let start = Instant::now();
    // Until the server answers, the "control packet" the sender resends is the WRQ.
    let mut tx = Sender::new(start, sender_cfg(packet::DEFAULT_BLKSIZE, 1, base), source(), Some(wrq));
    let mut progress = Progress::new(notices && io::stderr().is_terminal(), start);
    let mut peer: Option<SocketAddr> = None;
    let mut answered = false;
    let mut out = Vec::with_capacity(MAX_DATAGRAM);
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let result = loop {
        if let Err(e) = send_pending(&mut tx, &sock, peer.unwrap_or(args.common.server), &mut out) {
            break Err(e);
        }
        if tx.is_done() {
            break Ok(());
        }
        progress.update(tx.bytes_acked(), Some(wire_len));
        let now = Instant::now();
        let deadline = tx.poll_timeout().expect("a running transfer always has a deadline");
        if deadline <= now {
            tx.handle_timeout(now);
            continue;
        }
        sock.set_read_timeout(Some((deadline - now).max(Duration::from_millis(1)))).map_err(io_err("setting the socket timeout"))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => continue,
            Err(e) => break Err(ClientError::Io { context: "receiving from the server".into(), source: e }),
        };
        let Ok(pkt) = packet::decode(&buf[..n]) else { continue };
        if !accept_from(&mut peer, from, matches!(pkt, Packet::Error { .. }), args.common.server, &sock) {
            continue;
        }
        let now = Instant::now();
        match pkt {
            Packet::Oack(ref opts) if !answered => {
                answered = true;
                match upload::check_oack(&asked, opts) {
                    Ok(a) => {
                        let t = a.timeout.map_or(base, |t| Duration::from_secs(t as u64));
                        tx = Sender::new(now, sender_cfg(a.blksize, a.windowsize, t), source(), None);
                    }
                    Err(reason) => {
                        let _ = sock.send_to(&packet::error_packet(ErrorCode::OptionRefused, &reason), from);
                        break Err(ClientError::Aborted { code: ErrorCode::OptionRefused, reason });
                    }
                }
            }
            ref p => {
                answered |= matches!(p, Packet::Ack(0) | Packet::Error { .. });
                tx.handle(now, p);
            }
        }
    };
    progress.finish(tx.bytes_acked(), Some(wire_len));
    result?;
    put_outcome(tx.outcome(), peer.unwrap_or(args.common.server))?;
    if notices && io::stderr().is_terminal() {
        eprintln!("tftpcast put: {wire_len} bytes in {:.2} s to {remote}", start.elapsed().as_secs_f64());
    }
    Ok(wire_len)
}

/// `tftpcast get --multicast`: see the module documentation.
fn run_multicast(args: &GetArgs, mut out: Output, notices: bool) -> Result<u64, ClientError> {
    out.make_positional()?;
    let sock = client_socket(args.common.server)?;
    sock.set_nonblocking(true).map_err(io_err("making the socket non-blocking"))?;
    grow_receive_buffer(&sock, args);

    let cfg = McastReceiverConfig { server: args.common.server, request: receiver_config(args, Mode::Octet) };
    let start = Instant::now();
    let mut rx = McastReceiver::new(start, cfg);
    let mut progress = Progress::new(notices && io::stderr().is_terminal(), start);

    let mut group: Option<GroupSocket> = None;
    let result = drive_multicast(&sock, &mut group, &mut rx, &mut out, &mut progress);
    progress.finish(rx.bytes_received(), rx.tsize());
    if let Some(why) = result? {
        // We told the server we leave (ERROR); ask again without `multicast`.
        if notices {
            eprintln!("tftpcast get: {why}; fetching by unicast instead");
        }
        out.restart()?;
        return run_unicast(args, out, notices);
    }
    match rx.outcome() {
        Some(ReceiverOutcome::Complete) => {}
        Some(ReceiverOutcome::PeerError { code, message }) => {
            return Err(ClientError::Server { code: *code, message: message.clone() })
        }
        Some(ReceiverOutcome::TimedOut { retries }) => {
            return Err(ClientError::TimedOut { server: rx.server_tid().unwrap_or(args.common.server), retries: *retries })
        }
        Some(ReceiverOutcome::Aborted { code, reason }) => {
            return Err(ClientError::Aborted { code: *code, reason: reason.clone() })
        }
        None => unreachable!("drive_multicast returns only when the transfer has ended"),
    }
    let len = rx.file_len().expect("a complete download knows its length");
    out.set_len(len)?;
    out.commit()?;
    if notices {
        let st = rx.stats();
        let secs = start.elapsed().as_secs_f64();
        match (rx.kind(), rx.group_address()) {
            (Kind::Multicast, g) => eprintln!(
                "tftpcast get: {len} bytes in {secs:.2} s from group {} (server {}): {} blocks, {} from the group, {} by unicast, {} duplicates, master {} time(s), {} re-request(s)",
                g.map_or("?".to_string(), |g| g.to_string()),
                rx.server_tid().map_or("?".to_string(), |t| t.to_string()),
                st.blocks,
                st.data_via_group,
                st.data_via_unicast,
                st.duplicates,
                st.promotions,
                st.rerequests,
            ),
            _ => eprintln!("tftpcast get: {len} bytes in {secs:.2} s; the server chose unicast"),
        }
    }
    Ok(len)
}

/// The socket bound to a group's port and joined to it.
struct GroupSocket {
    group: SocketAddrV4,
    sock: UdpSocket,
}

impl GroupSocket {
    /// Binds `0.0.0.0:port` (shared with other clients on this host) and joins `group` on
    /// the interface whose address is `iface`. Dropping the socket leaves the group.
    fn open(group: SocketAddrV4, iface: Ipv4Addr) -> io::Result<GroupSocket> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, group.port())).into())?;
        s.join_multicast_v4(group.ip(), &iface)?;
        // Without this Linux delivers every group joined on this host to any socket bound
        // to the port, another client's groups included.
        #[cfg(target_os = "linux")]
        s.set_multicast_all_v4(false)?;
        let _ = s.set_recv_buffer_size(GROUP_RECV_BUFFER);
        s.set_nonblocking(true)?;
        Ok(GroupSocket { group, sock: s.into() })
    }
}

/// The local IPv4 address the kernel would use to reach `to` (the interface to join the
/// group on); unspecified (the kernel's choice) if there is none.
fn route_source(to: SocketAddr) -> Ipv4Addr {
    let probe = || -> io::Result<IpAddr> {
        let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
        let to = match addr::unmap(to) {
            SocketAddr::V6(_) => return Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            v4 => v4,
        };
        s.connect(to)?;
        Ok(s.local_addr()?.ip())
    };
    match probe() {
        Ok(IpAddr::V4(ip)) => ip,
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

/// Runs a `--multicast` download to its end. `Err` only for local I/O failures; how the
/// transfer ended is `rx.outcome()`. `Some(reason)` when the group could not be joined (say,
/// another program holds its port without `SO_REUSEADDR`): the server has been told with an
/// ERROR and the caller may fetch by unicast.
fn drive_multicast(
    sock: &UdpSocket,
    group: &mut Option<GroupSocket>,
    rx: &mut McastReceiver,
    out: &mut Output,
    progress: &mut Progress,
) -> Result<Option<String>, ClientError> {
    let mut buf = BytesMut::new();
    loop {
        // Data first: a write that fails turns the pending ACK into an ERROR.
        while let Some((offset, chunk)) = rx.take_block() {
            if let Err(e) = out.write_at(&chunk, offset) {
                let code = match e.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorCode::DiskFull,
                    _ => ErrorCode::NotDefined,
                };
                rx.abort(code, "the client could not write the file");
                while let Some(t) = rx.poll_transmit(Instant::now()) {
                    let _ = sock.send_to(&t.datagram.into_vec(), t.to.addr());
                }
                return Err(ClientError::Io { context: format!("writing {}", out.name()), source: e });
            }
        }
        // Join (or move to) the group before anything is sent: the master's ACK makes the
        // server send at once.
        if let Some(why) = follow_group(sock, group, rx) {
            return Ok(Some(why));
        }
        while let Some(t) = rx.poll_transmit(Instant::now()) {
            let to = t.to.addr();
            match (sock.send_to(&t.datagram.into_vec(), to), t.to) {
                (Ok(_), _) | (Err(_), Dest::Stranger(_)) => {}
                (Err(e), _) if e.kind() == io::ErrorKind::WouldBlock => {} // lost like on the wire
                (Err(e), _) => return Err(ClientError::Io { context: format!("sending to {to}"), source: e }),
            }
        }
        if rx.is_done() {
            return Ok(None);
        }
        progress.update(rx.bytes_received(), rx.tsize());

        // Read what is there; wait only when both sockets are empty.
        let mut got = 0;
        got += recv_batch(sock, Via::Unicast, rx, &mut buf)?;
        if let Some(g) = group.as_ref() {
            got += recv_batch(&g.sock, Via::Group, rx, &mut buf)?;
        }
        if got > 0 {
            continue;
        }
        let now = Instant::now();
        let deadline = rx.poll_timeout().expect("a running transfer always has a deadline");
        if deadline <= now {
            rx.handle_timeout(now);
            continue;
        }
        wait_readable(sock, group.as_ref(), deadline - now)?;
    }
}

/// Joins the group the receiver was told to listen to (or leaves the old one). `Some(reason)`
/// when it cannot be joined: the server has then been told with an ERROR.
fn follow_group(sock: &UdpSocket, group: &mut Option<GroupSocket>, rx: &mut McastReceiver) -> Option<String> {
    let want = rx.group();
    if want == group.as_ref().map(|g| g.group) {
        return None;
    }
    *group = None;
    let g = want?;
    let iface = route_source(rx.server_tid().expect("a group comes from the server"));
    match GroupSocket::open(g, iface) {
        Ok(joined) => {
            *group = Some(joined);
            None
        }
        Err(e) => {
            rx.abort(ErrorCode::NotDefined, "the client cannot join the multicast group");
            while let Some(t) = rx.poll_transmit(Instant::now()) {
                let _ = sock.send_to(&t.datagram.into_vec(), t.to.addr());
            }
            Some(format!("cannot join multicast group {g} on {iface}: {e}"))
        }
    }
}

/// Waits up to `wait` until the unicast socket or the group socket has a datagram.
fn wait_readable(sock: &UdpSocket, group: Option<&GroupSocket>, wait: Duration) -> Result<(), ClientError> {
    let ms = (wait.as_micros().div_ceil(1000)).min(i32::MAX as u128) as libc::c_int;
    let mut fds = [libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 }; 2];
    let mut n = 1;
    if let Some(g) = group {
        fds[1].fd = g.sock.as_raw_fd();
        n = 2;
    }
    // SAFETY: `fds` holds `n` initialised pollfd structs that outlive the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(ClientError::Io { context: "waiting for datagrams".into(), source: e });
        }
    }
    Ok(())
}

/// Reads up to [`RECV_BATCH`] datagrams from a non-blocking socket into the receiver;
/// returns how many.
fn recv_batch(sock: &UdpSocket, via: Via, rx: &mut McastReceiver, buf: &mut BytesMut) -> Result<usize, ClientError> {
    for got in 0..RECV_BATCH {
        if buf.len() <= MAX_DATAGRAM {
            *buf = BytesMut::zeroed(RECV_CHUNK);
        }
        match sock.recv_from(&mut buf[..]) {
            Ok((n, from)) => {
                let datagram = buf.split_to(n).freeze();
                let _ = rx.handle_datagram(Instant::now(), from, via, datagram);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(got),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // An ICMP error reported on the socket (say, port unreachable for a datagram
            // to a stranger): nothing to receive.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(got),
            Err(e) => return Err(ClientError::Io { context: "receiving".into(), source: e }),
        }
    }
    Ok(RECV_BATCH)
}



/// A window of large blocks can outrun the default socket buffer; ask for room for two
/// windows (best effort: the kernel caps it).
/// The download `args` ask for, by unicast or (as the request inside) multicast.
fn receiver_config(args: &GetArgs, mode: Mode) -> ReceiverConfig {
    download(&args.remote_file, mode, args.common.blksize, args.common.windowsize, args.common.timeout, args.tsize, args.common.retries)
}

/// A download with the options `get` and `bench` share; `timeout` is asked for (RFC 2349)
/// and used locally, else [`DEFAULT_TIMEOUT`].
pub(crate) fn download(
    file: &str,
    mode: Mode,
    blksize: Option<u16>,
    windowsize: Option<u16>,
    timeout: Option<u8>,
    tsize: bool,
    retries: u32,
) -> ReceiverConfig {
    let base = timeout.map_or(DEFAULT_TIMEOUT, |t| Duration::from_secs(t as u64));
    let mut cfg = ReceiverConfig::new(file.as_bytes(), mode);
    cfg.blksize = blksize;
    cfg.windowsize = windowsize;
    cfg.timeout = base;
    cfg.max_timeout = MAX_TIMEOUT.max(base);
    cfg.request_timeout_option = timeout;
    cfg.tsize = tsize;
    cfg.max_retries = retries;
    cfg
}

fn grow_receive_buffer(sock: &UdpSocket, args: &GetArgs) {
    let block = args.common.blksize.unwrap_or(packet::DEFAULT_BLKSIZE) as usize + 4;
    let want = (2 * args.common.windowsize.unwrap_or(1) as usize * block).clamp(256 << 10, 16 << 20);
    let _ = socket2::SockRef::from(sock).set_recv_buffer_size(want);
}

/// Where the file goes.
enum Output {
    Stdout(BufWriter<io::StdoutLock<'static>>),
    /// Standard output for a download written at offsets: an unnamed temporary file,
    /// copied out when complete.
    Spool { stdout: BufWriter<io::StdoutLock<'static>>, file: File },
    File(PartFile),
}

/// A temporary file beside `dest`, renamed over it by `commit` and removed if dropped
/// before.
struct PartFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<BufWriter<File>>,
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The last component of a remote name, if it makes a file name.
fn local_name(remote: &str) -> Option<&str> {
    let name = remote.rsplit(['/', '\\']).next()?;
    (!name.is_empty() && name != "." && name != "..").then_some(name)
}

impl Output {
    fn open(args: &GetArgs) -> Result<Output, ClientError> {
        let from_remote =
            || local_name(&args.remote_file).ok_or_else(|| ClientError::NoLocalName(args.remote_file.clone()));
        let dest = match &args.output {
            Some(p) if p.as_os_str() == "-" => {
                return Ok(Output::Stdout(BufWriter::with_capacity(64 << 10, io::stdout().lock())))
            }
            Some(p) if p.is_dir() => p.join(from_remote()?),
            Some(p) => p.clone(),
            None => PathBuf::from(from_remote()?),
        };
        let file_name = dest.file_name().ok_or_else(|| ClientError::NoLocalName(dest.display().to_string()))?;
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let pid = std::process::id();
        let mut attempt = 0u32;
        loop {
            let mut name = std::ffi::OsString::from(".");
            name.push(file_name);
            name.push(format!(".{pid}-{attempt}.part"));
            let tmp = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => {
                    return Ok(Output::File(PartFile { tmp, dest, file: Some(BufWriter::with_capacity(256 << 10, f)) }))
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
                Err(e) => {
                    let context = format!("creating a temporary file for {} in {}", dest.display(), dir.display());
                    return Err(ClientError::Io { context, source: e });
                }
            }
        }
    }

    fn name(&self) -> String {
        match self {
            Output::Stdout(_) | Output::Spool { .. } => "standard output".into(),
            Output::File(p) => p.dest.display().to_string(),
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Output::Stdout(w) => w.write_all(data),
            Output::Spool { file, .. } => file.write_all(data),
            Output::File(p) => p.file.as_mut().expect("written after commit").write_all(data),
        }
    }

    /// Prepares for [`Self::write_at`]: standard output gets a spool file.
    fn make_positional(&mut self) -> Result<(), ClientError> {
        if !matches!(self, Output::Stdout(_)) {
            return Ok(());
        }
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let mut attempt = 0u32;
        let file = loop {
            let path = dir.join(format!(".tftpcast-{pid}-{attempt}.spool"));
            match OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
                Ok(f) => {
                    // Unnamed from now on: it goes away with the process.
                    let _ = fs::remove_file(&path);
                    break f;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
                Err(e) => return Err(ClientError::Io { context: format!("creating a spool file in {}", dir.display()), source: e }),
            }
        };
        let Output::Stdout(stdout) = std::mem::replace(self, Output::Stdout(BufWriter::new(io::stdout().lock()))) else {
            unreachable!()
        };
        *self = Output::Spool { stdout, file };
        Ok(())
    }

    /// The file to write at offsets (after [`Self::make_positional`]).
    fn positional(&self) -> &File {
        match self {
            Output::Spool { file, .. } => file,
            // Nothing goes through the buffer of a file written at offsets.
            Output::File(p) => p.file.as_ref().expect("written after commit").get_ref(),
            Output::Stdout(_) => unreachable!("make_positional first"),
        }
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        self.positional().write_all_at(data, offset)
    }

    /// Empties the output for a download that starts over (sequential writes from offset 0).
    fn restart(&mut self) -> Result<(), ClientError> {
        let name = self.name();
        let f = match self {
            Output::Stdout(_) => return Ok(()),
            Output::Spool { file, .. } => file,
            Output::File(p) => p.file.as_mut().expect("restarted after commit").get_mut(),
        };
        f.set_len(0).and_then(|_| f.rewind()).map_err(io_err(format!("writing {name}")))
    }

    /// Fixes the length of a file written at offsets.
    fn set_len(&mut self, len: u64) -> Result<(), ClientError> {
        let name = self.name();
        self.positional().set_len(len).map_err(io_err(format!("writing {name}")))
    }

    /// Makes the download visible: flushes stdout, or syncs the temporary file and renames
    /// it over the destination.
    fn commit(self) -> Result<(), ClientError> {
        match self {
            Output::Stdout(mut w) => w.flush().map_err(io_err("writing standard output")),
            Output::Spool { mut stdout, mut file } => {
                file.rewind().map_err(io_err("reading the spool file"))?;
                io::copy(&mut file, &mut stdout).map_err(io_err("writing standard output"))?;
                stdout.flush().map_err(io_err("writing standard output"))
            }
            Output::File(mut p) => {
                let dest = p.dest.display().to_string();
                let file = p.file.as_mut().expect("committed twice");
                file.flush().map_err(io_err(format!("writing {dest}")))?;
                file.get_ref().sync_all().map_err(io_err(format!("writing {dest}")))?;
                fs::rename(&p.tmp, &p.dest).map_err(io_err(format!("renaming {} to {dest}", p.tmp.display())))?;
                p.file = None; // renamed: nothing left to clean up
                Ok(())
            }
        }
    }
}

/// The progress line on a terminal's stderr.
struct Progress {
    enabled: bool,
    start: Instant,
    last: Option<Instant>,
    width: usize,
}

impl Progress {
    fn new(enabled: bool, start: Instant) -> Progress {
        Progress { enabled, start, last: None, width: 0 }
    }

    fn update(&mut self, bytes: u64, total: Option<u64>) {
        let now = Instant::now();
        if !self.enabled || self.last.is_some_and(|l| now - l < PROGRESS_EVERY) {
            return;
        }
        self.last = Some(now);
        self.draw(now, bytes, total);
    }

    fn finish(&mut self, bytes: u64, total: Option<u64>) {
        if self.enabled && self.last.is_some() {
            self.draw(Instant::now(), bytes, total);
            eprintln!();
        }
    }

    fn draw(&mut self, now: Instant, bytes: u64, total: Option<u64>) {
        let secs = (now - self.start).as_secs_f64();
        let rate = if secs > 0.0 { bytes as f64 / secs } else { 0.0 };
        let mut line = human(bytes as f64);
        if let Some(t) = total {
            let pct = if t == 0 { 100.0 } else { bytes as f64 * 100.0 / t as f64 };
            line.push_str(&format!(" / {} ({pct:.0}%)", human(t as f64)));
        }
        line.push_str(&format!("  {}/s  {secs:.1} s", human(rate)));
        self.width = self.width.max(line.len());
        eprint!("\r{line:<w$}", w = self.width);
    }
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[0])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names() {
        assert_eq!(local_name("boot/pxelinux.0"), Some("pxelinux.0"));
        assert_eq!(local_name("C:\\tftp\\x.img"), Some("x.img"));
        assert_eq!(local_name("plain"), Some("plain"));
        for bad in ["", "dir/", "..", "a/..", "."] {
            assert_eq!(local_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn server_error_display_carries_the_message() {
        let e = ClientError::Server { code: ErrorCode::FileNotFound, message: "no such file: x".into() };
        assert_eq!(e.to_string(), "server error 1: no such file: x");
    }

    #[test]
    fn endpoints_compare_without_v4_mapping_noise() {
        let a: SocketAddr = "127.0.0.1:6970".parse().unwrap();
        let b: SocketAddr = "[::ffff:127.0.0.1]:6970".parse().unwrap();
        assert!(addr::same(a, b));
        assert!(!addr::same(a, "127.0.0.1:6971".parse().unwrap()));
    }

    #[test]
    fn human_units() {
        assert_eq!(human(512.0), "512 B");
        assert_eq!(human(1536.0), "1.5 KiB");
        assert_eq!(human(3.0 * 1024.0 * 1024.0), "3.0 MiB");
    }
}
