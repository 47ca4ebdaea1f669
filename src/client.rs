//! `tftpcast get`: a TFTP client for humans and tests.
//!
//! A thin blocking driver around [`tftpcast_proto::Receiver`]: one UDP socket bound to an
//! ephemeral port, the RRQ sent to `--server`, the transfer locked onto the address of the
//! first reply (the server's TID), anything from elsewhere answered with ERROR 5. Every
//! protocol decision (options, windows, retransmission, netascii) is the receiver's.
//!
//! The file is written to a temporary file next to the destination and renamed over it
//! only when the transfer completed, so a failed download leaves nothing half-written;
//! `-o -` writes to standard output instead. On a terminal, stderr shows a progress line.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tftpcast_proto::packet::{self, ErrorCode, Mode, MAX_BLKSIZE, MAX_DATAGRAM, MIN_BLKSIZE};
use tftpcast_proto::{Receiver, ReceiverConfig, ReceiverOutcome};

/// Local retransmission timeout when `--timeout` is not given.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Cap of the retransmission backoff (the server's default cap, so we outlast its retries).
const MAX_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams are received into slices of buffers this large, handed on without copies.
const RECV_CHUNK: usize = 1 << 20;
/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Transfer mode of `tftpcast get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransferMode {
    /// Bytes as they are.
    Octet,
    /// Text: line ends converted from the wire's CR LF to LF.
    Netascii,
}

/// Arguments of `tftpcast get`.
#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
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
    /// Join the server's multicast group for this file (RFC 2090). Not implemented yet: the
    /// file is fetched by unicast.
    #[arg(long)]
    pub multicast: bool,
    /// Transfer mode.
    #[arg(long, value_enum, default_value_t = TransferMode::Octet)]
    pub mode: TransferMode,
    /// Ask the server for the file size (RFC 2349), shown in the progress line.
    #[arg(long)]
    pub tsize: bool,
    /// Consecutive timeouts without progress before giving up.
    #[arg(long, default_value_t = 6)]
    pub retries: u32,
    /// No progress line or notices on stderr.
    #[arg(short, long)]
    pub quiet: bool,
    /// File to fetch.
    pub remote_file: String,
    /// Where to write it (default: the remote file's last component; `-` for stdout).
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
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
    let notices = !args.quiet;
    if args.multicast && notices {
        eprintln!("tftpcast get: multicast reception is not implemented yet; fetching by unicast");
    }
    // Open the destination first: a directory we cannot write to should fail before the
    // server is bothered.
    let mut out = Output::open(args)?;

    let bind: SocketAddr = match args.server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(bind).map_err(io_err(format!("binding a UDP socket on {bind}")))?;
    grow_receive_buffer(&sock, args);

    let base = args.timeout.map_or(DEFAULT_TIMEOUT, |t| Duration::from_secs(t as u64));
    let mut cfg = ReceiverConfig::new(
        args.remote_file.as_bytes(),
        match args.mode {
            TransferMode::Octet => Mode::Octet,
            TransferMode::Netascii => Mode::Netascii,
        },
    );
    cfg.blksize = args.blksize;
    cfg.windowsize = args.windowsize;
    cfg.timeout = base;
    cfg.max_timeout = MAX_TIMEOUT.max(base);
    cfg.request_timeout_option = args.timeout;
    cfg.tsize = args.tsize;
    cfg.max_retries = args.retries;
    let start = Instant::now();
    let mut rx = Receiver::new(start, cfg);
    let mut progress = Progress::new(notices && io::stderr().is_terminal(), start);

    let result = drive(&sock, args.server, &mut rx, &mut out, &mut progress);
    progress.finish(rx.bytes_received(), rx.tsize());
    let written = result?;
    match rx.outcome() {
        Some(ReceiverOutcome::Complete) => {}
        Some(ReceiverOutcome::PeerError { code, message }) => {
            return Err(ClientError::Server { code: *code, message: message.clone() })
        }
        Some(ReceiverOutcome::TimedOut { retries }) => {
            return Err(ClientError::TimedOut { server: args.server, retries: *retries })
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
        // Data first: a write that fails turns the pending ACK into an ERROR.
        while let Some(chunk) = rx.take_data() {
            if let Err(e) = out.write_all(&chunk) {
                let code = match e.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorCode::DiskFull,
                    _ => ErrorCode::NotDefined,
                };
                rx.abort(code, "the client could not write the file");
                while let Some(d) = rx.poll_transmit() {
                    let _ = sock.send_to(&d, peer.unwrap_or(server));
                }
                return Err(ClientError::Io { context: format!("writing {}", out.name()), source: e });
            }
            written += chunk.len() as u64;
        }
        while let Some(d) = rx.poll_transmit() {
            let to = peer.unwrap_or(server);
            sock.send_to(&d, to).map_err(io_err(format!("sending to {to}")))?;
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
        let wait = (deadline - now).max(Duration::from_millis(1));
        // Re-arm the socket timeout only when it is off by more than an eighth: waking a
        // little late costs nothing, a system call per datagram does.
        let stale = match read_timeout {
            None => true,
            Some(t) => t.max(wait) - t.min(wait) > wait / 8,
        };
        if stale {
            sock.set_read_timeout(Some(wait)).map_err(io_err("setting the socket timeout"))?;
            read_timeout = Some(wait);
        }
        if buf.len() <= MAX_DATAGRAM {
            buf = BytesMut::zeroed(RECV_CHUNK);
        }
        match sock.recv_from(&mut buf[..]) {
            Ok((n, from)) => {
                let datagram = buf.split_to(n).freeze();
                let now = Instant::now();
                match peer {
                    Some(p) if same_endpoint(p, from) => {
                        let _ = rx.handle_datagram(now, datagram);
                    }
                    Some(_) => {
                        // RFC 1350: a packet from a stranger gets ERROR 5; our transfer goes on.
                        let e = packet::error_packet(ErrorCode::UnknownTid, "Unknown transfer ID");
                        let _ = sock.send_to(&e, from);
                    }
                    None => {
                        // The first reply fixes the server's TID; it must come from the host
                        // we asked and be TFTP at all.
                        if canonical(from.ip()) == canonical(server.ip()) && packet::decode(&datagram).is_ok() {
                            peer = Some(from);
                            let _ = rx.handle_datagram(now, datagram);
                        }
                    }
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

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Same address and port (ignoring IPv6 flow labels and scope ids the kernel fills in).
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

/// A window of large blocks can outrun the default socket buffer; ask for room for two
/// windows (best effort: the kernel caps it).
fn grow_receive_buffer(sock: &UdpSocket, args: &GetArgs) {
    let block = args.blksize.unwrap_or(packet::DEFAULT_BLKSIZE) as usize + 4;
    let want = (2 * args.windowsize.unwrap_or(1) as usize * block).clamp(256 << 10, 16 << 20);
    let _ = socket2::SockRef::from(sock).set_recv_buffer_size(want);
}

/// Where the file goes.
enum Output {
    Stdout(BufWriter<io::StdoutLock<'static>>),
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
            Output::Stdout(_) => "standard output".into(),
            Output::File(p) => p.dest.display().to_string(),
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Output::Stdout(w) => w.write_all(data),
            Output::File(p) => p.file.as_mut().expect("written after commit").write_all(data),
        }
    }

    /// Makes the download visible: flushes stdout, or syncs the temporary file and renames
    /// it over the destination.
    fn commit(self) -> Result<(), ClientError> {
        match self {
            Output::Stdout(mut w) => w.flush().map_err(io_err("writing standard output")),
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
        assert!(same_endpoint(a, b));
        assert!(!same_endpoint(a, "127.0.0.1:6971".parse().unwrap()));
    }

    #[test]
    fn human_units() {
        assert_eq!(human(512.0), "512 B");
        assert_eq!(human(1536.0), "1.5 KiB");
        assert_eq!(human(3.0 * 1024.0 * 1024.0), "3.0 MiB");
    }
}
