//! Harness shared by the integration tests in `tests/`.
//!
//! # What it owns
//! - [`Fixture`]: a temporary tree with a served root (files of edge sizes, pseudo-random
//!   bytes, a netascii text file) and a canary file *outside* the root that must never leak.
//! - [`Server`]: the server under test as a child process. It starts `tftpcast serve
//!   --log-format json`, waits (bounded) for the `listening` event of DESIGN.md section 4 to learn
//!   the bound port, keeps every log line for assertions, and is stopped with SIGTERM (then
//!   SIGKILL after a grace) when dropped. With `TFTPCAST_TEST_SERVER=<path of tftpd-hpa's
//!   in.tftpd>` in the environment the same tests run against in.tftpd instead, which is how
//!   the tests themselves are validated against a known-good peer.
//! - [`run`]: every client process runs under a time limit and is killed when it overruns.
//! - [`raw`]: a tiny TFTP client on a plain UDP socket, for assertions on exact error codes,
//!   OACK contents and wire bytes that real clients do not expose.
//! - [`Lab`]: the network-namespace lab of DESIGN.md section 6 (bridge, server and client
//!   namespaces on a private /24), deleted on drop even when a test panics; `add_loss` adds
//!   random input loss with nftables. Every namespace routes 224.0.0.0/4 through its veth, so
//!   multicast stays in the lab; `in_ns`/`spawn_in_ns` run test code (sockets) inside one.
//! - `logs`: the server's JSON log as events (`events`, `field_str`, `field_u64`, ...) and
//!   `wait_until`; `fetch`: [`Fetch`], a client fetch in the background inside a lab namespace,
//!   and `finish_all`; `wire`: [`Wire`], nftables counters of what a namespace sent.
//!
//! Traffic goes only to 127.0.0.0/8 or, inside lab namespaces, to their addresses and to
//! multicast groups routed through the lab's veths.
#![allow(dead_code)]

use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

mod fetch;
mod logs;
mod wire;
// Not every test binary uses every module.
#[allow(unused_imports)]
pub use {fetch::*, logs::*, wire::*};

/// How long a server may take to log its `listening` event.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to exit after SIGTERM/SIGINT before the test fails.
pub const STOP_GRACE: Duration = Duration::from_secs(15);
/// Default time limit of one small client transfer.
pub const CLIENT_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Environment: CI detection, tools, root.
// ---------------------------------------------------------------------------------------------

/// True when the `CI` environment variable is set to something other than empty/0/false.
pub fn in_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false")),
        Err(_) => false,
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds an executable on `PATH` (and in the sbin directories, which a non-root `PATH` may lack).
pub fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(PathBuf::from),
    );
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// Absolute path of a tool, panicking if it is missing (call [`require_tool`] first).
pub fn tool(name: &str) -> PathBuf {
    which(name).unwrap_or_else(|| panic!("tool `{name}` not found"))
}

/// Returns true when `name` is installed. When it is not: panics in CI (the CI script must
/// install it), otherwise prints why the test is skipped and returns false.
pub fn require_tool(name: &str) -> bool {
    if which(name).is_some() {
        return true;
    }
    if in_ci() {
        panic!("required tool `{name}` is not installed; CI must install it (see .ci/run)");
    }
    eprintln!("SKIPPED: tool `{name}` is not installed (CI installs it; with CI=1 this fails)");
    false
}

/// [`require_tool`] for several tools.
pub fn require_tools(names: &[&str]) -> bool {
    names.iter().all(|n| require_tool(n))
}

/// The uid of a user named in the password database (`id -u NAME`).
pub fn uid_of(name: &str) -> u32 {
    let out = Command::new("id").args(["-u", name]).output().expect("run id");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("no user {name}"))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Returns true when this process can build a namespace lab (root, `ip`, `nft`, and a probe
/// namespace can actually be created). Otherwise panics in CI, or prints why and returns false.
pub fn require_netns() -> bool {
    if !is_root() {
        let msg = "network-namespace tests need root (CI runs them as root)";
        if in_ci() {
            panic!("{msg}; this CI run is not root");
        }
        eprintln!("SKIPPED: {msg}; run the tests as root to include them");
        return false;
    }
    if !require_tools(&["ip", "nft"]) {
        return false;
    }
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        let name = format!("tcl-probe-{}-{}", std::process::id(), next_id());
        let add = run(
            Command::new(tool("ip")).args(["netns", "add", &name]),
            CMD_LIMIT,
        );
        let _ = run(
            Command::new(tool("ip")).args(["netns", "del", &name]),
            CMD_LIMIT,
        );
        if add.success() {
            Ok(())
        } else {
            Err(format!(
                "`ip netns add` fails here: {}",
                add.output().trim()
            ))
        }
    });
    match probe {
        Ok(()) => true,
        Err(e) if in_ci() => panic!("network namespaces are unavailable: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: network namespaces are unavailable: {e}");
            false
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique within this test process.
pub fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Processes with time limits.
// ---------------------------------------------------------------------------------------------

/// Time limit of one setup command (`ip`, `nft`).
pub const CMD_LIMIT: Duration = Duration::from_secs(20);

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The outcome of a process run under a time limit.
#[derive(Debug, Clone)]
pub struct Run {
    pub what: String,
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Run {
    /// Exited by itself with status 0.
    pub fn success(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    /// Exit code, if it exited by itself.
    pub fn code(&self) -> Option<i32> {
        if self.timed_out {
            None
        } else {
            self.status.and_then(|s| s.code())
        }
    }

    /// stdout and stderr together.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n  status: {}{}, after {:.2?}\n  stdout: {}\n  stderr: {}",
            self.what,
            self.status.map_or("none".to_string(), |s| s.to_string()),
            if self.timed_out {
                " (KILLED: time limit exceeded)"
            } else {
                ""
            },
            self.elapsed,
            tail(&self.stdout, 2000).trim_end(),
            tail(&self.stderr, 2000).trim_end(),
        )
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Reads `r` to its end on a thread; the receiver gets everything once it closes.
pub fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `cmd` with no stdin, capturing its output; kills it when it runs past `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Run {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = ChildGuard(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}")),
    );
    let out = spawn_reader(child.0.stdout.take().expect("stdout piped"));
    let err = spawn_reader(child.0.stderr.take().expect("stderr piped"));
    let mut timed_out = false;
    let status = loop {
        match child.0.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if start.elapsed() > limit => {
                let _ = child.0.kill();
                timed_out = true;
                break child.0.wait().ok();
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    let elapsed = start.elapsed();
    // A grandchild could keep a pipe open: never wait for the readers without a bound.
    let grab = |rx: mpsc::Receiver<Vec<u8>>| {
        String::from_utf8_lossy(&rx.recv_timeout(Duration::from_secs(3)).unwrap_or_default())
            .into_owned()
    };
    Run {
        what,
        status,
        stdout: grab(out),
        stderr: grab(err),
        elapsed,
        timed_out,
    }
}

/// Runs a setup command and panics with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> Run {
    let r = run(cmd, CMD_LIMIT);
    assert!(r.success(), "setup command failed:\n{r}");
    r
}

// ---------------------------------------------------------------------------------------------
// Fixture files.
// ---------------------------------------------------------------------------------------------

/// The binary files every fixture has, with their sizes: the block-size edges and 1 MiB.
pub const SIZES: &[(&str, usize)] = &[
    ("empty.bin", 0),
    ("one.bin", 1),
    ("b511.bin", 511),
    ("b512.bin", 512),
    ("b513.bin", 513),
    ("one_mib.bin", 1 << 20),
];
/// Every size except the empty file (for clients that cannot take a `tsize 0` OACK).
pub const NONEMPTY: &[(&str, usize)] = &[
    ("one.bin", 1),
    ("b511.bin", 511),
    ("b512.bin", 512),
    ("b513.bin", 513),
    ("one_mib.bin", 1 << 20),
];
pub const ONE_MIB: &str = "one_mib.bin";
/// 40 MiB: at blksize 512 that is 81920 blocks, so the block number rolls over past 65535.
pub const BIG: &str = "forty_mib.bin";
pub const BIG_SIZE: usize = 40 << 20;
/// A text file with LF, CR LF and lone CR line ends, for netascii.
pub const TEXT: &str = "text.txt";
/// A file in a subdirectory of the root.
pub const NESTED: &str = "sub/dir/nested.bin";
/// The canary's name, next to (outside) the root directory.
pub const CANARY: &str = "canary.txt";

/// A temporary tree: `root/` (served) and `canary.txt` beside it, plus `out/` for downloads.
pub struct Fixture {
    dir: tempfile::TempDir,
    pub root: PathBuf,
    pub canary: PathBuf,
    /// A marker that only the canary file contains.
    pub canary_marker: Vec<u8>,
    out: PathBuf,
}

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The seed of a fixture file's pseudo-random contents.
pub fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The netascii test text in local (Unix) form. On the wire (`netascii_encode`) a CR LF pair
/// straddles the first 512-byte block boundary and a CR NUL pair the second one.
pub fn netascii_text() -> Vec<u8> {
    let mut v = Vec::new();
    // Wire bytes 0..511 are letters, 511 is CR, 512 is LF.
    v.extend_from_slice(&[b'a'; 511]);
    v.push(b'\n');
    // Wire is now 513 bytes; 510 letters then a lone CR put CR at 1023 and NUL at 1024.
    v.extend_from_slice(&[b'b'; 510]);
    v.push(b'\r');
    let words = pseudo_random(400, 7);
    for (i, &w) in words.iter().enumerate() {
        let len = (i * 37) % 90;
        v.extend((0..len).map(|j| b"abcdefghij klmnopqrstuvwxyz0123456789"[(w as usize + j) % 37]));
        match i % 7 {
            0 => v.extend_from_slice(b"\r\n"),
            1 => v.push(b'\r'),
            2 => v.extend_from_slice(b"\n\n"),
            _ => v.push(b'\n'),
        }
    }
    v.extend_from_slice(b"last line ends with a lone CR\r");
    v
}

/// Netascii wire form of local text (RFC 764 via RFC 1350): LF -> CR LF, CR -> CR NUL.
pub fn netascii_encode(local: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(local.len() * 2);
    for &b in local {
        match b {
            b'\n' => w.extend_from_slice(b"\r\n"),
            b'\r' => w.extend_from_slice(b"\r\0"),
            _ => w.push(b),
        }
    }
    w
}

impl Fixture {
    /// Root with every file of [`SIZES`], [`TEXT`] and [`NESTED`]; canary beside the root.
    pub fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("tftpcast-test-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("root");
        let out = dir.path().join("out");
        fs::create_dir_all(root.join("sub/dir")).unwrap();
        fs::create_dir_all(&out).unwrap();
        for &(name, size) in SIZES {
            fs::write(root.join(name), pseudo_random(size, seed_of(name))).unwrap();
        }
        fs::write(root.join(TEXT), netascii_text()).unwrap();
        fs::write(root.join(NESTED), pseudo_random(700, seed_of(NESTED))).unwrap();
        let canary_marker = format!(
            "CANARY-{}-{}-must-never-leave-the-server",
            std::process::id(),
            next_id()
        )
        .into_bytes();
        let canary = dir.path().join(CANARY);
        let mut content = canary_marker.clone();
        content.extend_from_slice(b"\nthis file is outside the served root\n");
        fs::write(&canary, content).unwrap();
        Fixture {
            dir,
            root,
            canary,
            canary_marker,
            out,
        }
    }

    /// Adds the 40 MiB file [`BIG`].
    pub fn with_big(self) -> Fixture {
        fs::write(self.root.join(BIG), pseudo_random(BIG_SIZE, seed_of(BIG))).unwrap();
        self
    }

    /// Path of a served file.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// SHA-256 of a served file.
    pub fn sha(&self, name: &str) -> [u8; 32] {
        sha256_file(&self.path(name))
    }

    /// A fresh path for a download (nothing exists there yet).
    pub fn out(&self, hint: &str) -> PathBuf {
        let clean: String = hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.out.join(format!("{}-{}", next_id(), clean))
    }

    /// The temporary directory holding root, canary and downloads.
    pub fn base(&self) -> &Path {
        self.dir.path()
    }

    /// Panics if `data` contains the canary's marker.
    pub fn assert_no_canary(&self, data: &[u8], context: &str) {
        assert!(
            !contains(data, &self.canary_marker),
            "{context}: received bytes of the canary file that lies OUTSIDE the served root"
        );
    }
}

/// True if `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub fn sha256_file(path: &Path) -> [u8; 32] {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().into()
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// The server under test.
// ---------------------------------------------------------------------------------------------

/// Which server the tests drive.
#[derive(Debug, Clone)]
pub enum ServerKind {
    /// The `tftpcast` binary of this workspace (the default).
    Tftpcast,
    /// tftpd-hpa's `in.tftpd` at this path (`TFTPCAST_TEST_SERVER=<path>`), for validating the
    /// tests themselves against a known-good server.
    Hpa(PathBuf),
}

pub fn server_kind() -> ServerKind {
    match std::env::var_os("TFTPCAST_TEST_SERVER") {
        None => ServerKind::Tftpcast,
        Some(v) if v.is_empty() || v == "tftpcast" => ServerKind::Tftpcast,
        Some(v) => ServerKind::Hpa(PathBuf::from(v)),
    }
}

pub fn testing_tftpcast() -> bool {
    matches!(server_kind(), ServerKind::Tftpcast)
}

/// True when the server under test is tftpcast; otherwise prints `SKIPPED: {why}` (why the
/// test is tftpcast's alone) and the caller skips the test.
pub fn only_tftpcast(why: &str) -> bool {
    if !testing_tftpcast() {
        eprintln!("SKIPPED: {why}");
        return false;
    }
    true
}

/// A fresh [`Fixture`], or None when `ready` is false: the caller's prerequisite checks
/// ([`require_tool`], [`testing_tftpcast`] and the like) failed, and the test is skipped.
pub fn fixture_if(ready: bool) -> Option<Fixture> {
    ready.then(Fixture::new)
}

/// A server started with `args` on a [`fixture_if`] `ready`.
pub fn serve_if(ready: bool, args: &[&str]) -> Option<(Fixture, Server)> {
    let fx = fixture_if(ready)?;
    let server = Server::start(&fx.root, args);
    Some((fx, server))
}

/// Path of the `tftpcast` binary built for these tests.
pub fn tftpcast_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tftpcast")
}

/// Parses a `listening` event (DESIGN.md section 4) from one JSON log line.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if fields.get("message")?.as_str()? != "listening" {
        return None;
    }
    fields.get("addr")?.as_str()?.parse().ok()
}

/// A running server. Dropping it sends SIGTERM, then SIGKILL after a grace.
pub struct Server {
    child: Option<Child>,
    /// The bound listening addresses, in the order the `listening` events came.
    pub addrs: Vec<SocketAddr>,
    stderr_lines: Arc<Mutex<Vec<String>>>,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    kind: ServerKind,
    what: String,
}

fn line_reader<R: Read + Send + 'static>(
    r: R,
    store: Arc<Mutex<Vec<String>>>,
    tx: Option<mpsc::Sender<String>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            store.lock().unwrap().push(line.clone());
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
    })
}

impl Server {
    /// Starts the server on a loopback port chosen by the kernel (unless `args` has
    /// `--listen`), serving `root`. `args` are extra `tftpcast serve` flags.
    pub fn start(root: &Path, args: &[&str]) -> Server {
        Server::start_in(None, root, args)
    }

    /// Like [`Server::start`], inside network namespace `netns` when given.
    pub fn start_in(netns: Option<&str>, root: &Path, args: &[&str]) -> Server {
        Server::start_in_env(netns, root, args, &[])
    }

    /// Like [`Server::start_in`], with environment variables `env` set for the server (the
    /// test's own `TFTPCAST_*` variables are still removed; these are added after). in.tftpd
    /// ignores them.
    pub fn start_in_env(
        netns: Option<&str>,
        root: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        match server_kind() {
            ServerKind::Tftpcast => {
                let cmd = Server::command(netns, Path::new(tftpcast_bin()));
                Server::start_tftpcast(cmd, root, args, env)
            }
            ServerKind::Hpa(path) => Server::start_hpa(&path, netns, root, args),
        }
    }

    fn command(netns: Option<&str>, program: &Path) -> Command {
        match netns {
            Some(ns) => {
                let mut c = Command::new(tool("ip"));
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn spawn(
        mut cmd: Command,
        kind: ServerKind,
        env: &[(&str, &str)],
    ) -> (Server, mpsc::Receiver<String>) {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TFTPCAST_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env("RUST_BACKTRACE", "1");
        let what = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start server {what}: {e}"));
        let (tx, rx) = mpsc::channel();
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            line_reader(child.stderr.take().unwrap(), stderr_lines.clone(), Some(tx)),
            line_reader(child.stdout.take().unwrap(), stdout_lines.clone(), None),
        ];
        let server = Server {
            child: Some(child),
            addrs: Vec::new(),
            stderr_lines,
            stdout_lines,
            readers,
            kind,
            what,
        };
        (server, rx)
    }

    /// Starts tftpcast under a wrapper command (`wrapper` then the binary), e.g. `prlimit
    /// --nofile=1024:4096 --` to start it with given resource limits. tftpcast only.
    pub fn start_wrapped(wrapper: &[&str], root: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..]).arg(tftpcast_bin());
        Server::start_tftpcast(cmd, root, args, env)
    }

    /// Starts tftpcast through `cmd`, a command that ends up executing the tftpcast binary
    /// with the arguments appended here (`serve --root ROOT ...`). tftpcast only.
    pub fn start_command(cmd: Command, root: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_tftpcast(cmd, root, args, env)
    }

    fn start_tftpcast(
        mut cmd: Command,
        root: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        cmd.arg("serve")
            .arg("--root")
            .arg(root)
            .args(["--log-format", "json"]);
        let mut want = args.iter().filter(|a| **a == "--listen").count();
        if want == 0 {
            cmd.args(["--listen", "127.0.0.1:0"]);
            want = 1;
        }
        cmd.args(args);
        let (mut server, rx) = Server::spawn(cmd, ServerKind::Tftpcast, env);
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while server.addrs.len() < want {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    if let Some(a) = parse_listening(&line) {
                        server.addrs.push(a);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    thread::sleep(Duration::from_millis(50))
                }
            }
            if let Some(st) = server.child.as_mut().unwrap().try_wait().unwrap() {
                thread::sleep(Duration::from_millis(100)); // let the readers drain
                panic!(
                    "server exited with {st} before logging {want} `listening` event(s) \
                     (DESIGN.md section 4: message `listening`, field `addr`)\n{}\n{}",
                    server.what,
                    server.log_tail(60)
                );
            }
            if Instant::now() > deadline {
                let _ = server.kill_hard();
                panic!(
                    "server did not log {want} `listening` event(s) as JSON \
                     ({{\"fields\":{{\"message\":\"listening\",\"addr\":\"IP:PORT\"}}}}) within {:?}; \
                     found {:?}\n{}\n{}",
                    LISTEN_TIMEOUT,
                    server.addrs,
                    server.what,
                    server.log_tail(60)
                );
            }
        }
        server
    }

    fn start_hpa(path: &Path, netns: Option<&str>, root: &Path, args: &[&str]) -> Server {
        let mut listen: Vec<String> = Vec::new();
        let mut write = false;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match *a {
                "--listen" => listen.push(it.next().expect("--listen needs a value").to_string()),
                "--allow-write" => write = true,
                other => eprintln!("note: in.tftpd has no equivalent of `{other}`; ignored"),
            }
        }
        assert!(listen.len() <= 1, "in.tftpd listens on one address only");
        let mut addr: SocketAddr = listen
            .first()
            .map_or("127.0.0.1:0", |s| s.as_str())
            .parse()
            .unwrap();
        if addr.port() == 0 {
            assert!(
                netns.is_none(),
                "pass an explicit port for in.tftpd in a namespace"
            );
            addr.set_port(
                UdpSocket::bind((addr.ip(), 0))
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port(),
            );
        }
        let mut cmd = Server::command(netns, path);
        cmd.args(["-L", "-s"]);
        if is_root() {
            cmd.args(["-u", "root"]);
        }
        if write {
            cmd.arg("-c");
        }
        cmd.arg("-a").arg(addr.to_string()).arg(root);
        let (mut server, _rx) = Server::spawn(cmd, ServerKind::Hpa(path.to_path_buf()), &[]);
        server.addrs.push(addr);
        // in.tftpd logs nothing useful to stderr: probe it (loopback) or give it a moment.
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            if let Some(st) = server.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "in.tftpd exited with {st}: {}\n{}",
                    server.what,
                    server.log_tail(20)
                );
            }
            if netns.is_some() {
                thread::sleep(Duration::from_millis(500));
                break;
            }
            let reply = raw::exchange(
                addr,
                &raw::rrq(b"tftpcast-probe-missing", "octet", &[]),
                Duration::from_millis(200),
            );
            if reply.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "in.tftpd never answered on {addr}"
            );
        }
        server
    }

    /// The first listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("server running").id() as i32
    }

    pub fn is_tftpcast(&self) -> bool {
        matches!(self.kind, ServerKind::Tftpcast)
    }

    /// Every stderr line so far.
    pub fn logs(&self) -> Vec<String> {
        self.stderr_lines.lock().unwrap().clone()
    }

    /// Every stdout line so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout_lines.lock().unwrap().clone()
    }

    /// The last `n` log lines, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let logs = self.logs();
        let start = logs.len().saturating_sub(n);
        let mut s = format!(
            "--- server stderr (last {} of {} lines) ---\n",
            logs.len() - start,
            logs.len()
        );
        for l in &logs[start..] {
            s.push_str(l);
            s.push('\n');
        }
        let out = self.stdout();
        if !out.is_empty() {
            s.push_str("--- server stdout ---\n");
            for l in out.iter().rev().take(20).rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends a signal to the server process.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Waits up to `limit` for the server to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill_hard(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = child.kill();
        child.wait().ok()
    }

    fn join_readers(&mut self) {
        // The pipes close when the process exits; a bounded wait covers leaked descendants.
        let deadline = Instant::now() + Duration::from_secs(2);
        for r in std::mem::take(&mut self.readers) {
            while !r.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }

    /// Sends `sig` and waits for the exit (SIGKILL and panic after [`STOP_GRACE`]).
    pub fn stop_with(&mut self, sig: i32) -> ExitStatus {
        self.signal(sig);
        match self.wait_exit(STOP_GRACE) {
            Some(st) => {
                self.join_readers();
                st
            }
            None => {
                self.kill_hard();
                self.join_readers();
                panic!(
                    "server did not exit within {STOP_GRACE:?} of signal {sig}\n{}",
                    self.log_tail(40)
                );
            }
        }
    }

    /// Sends SIGTERM and asserts a clean exit (status 0) for tftpcast (DESIGN.md section 3).
    /// in.tftpd dies of the signal; for it only the exit itself is checked.
    pub fn stop_clean(&mut self) -> ExitStatus {
        self.stop_clean_with(libc::SIGTERM, "SIGTERM")
    }

    /// [`Server::stop_clean`] with signal `sig` (named `name` in the message).
    pub fn stop_clean_with(&mut self, sig: i32, name: &str) -> ExitStatus {
        let st = self.stop_with(sig);
        if self.is_tftpcast() {
            assert_eq!(
                st.code(),
                Some(0),
                "tftpcast must exit 0 on {name}, got {st}\n{}",
                self.log_tail(40)
            );
        }
        st
    }

    /// Asserts that every stderr line is one JSON object (`--log-format json`, DESIGN.md §4).
    pub fn assert_logs_are_json(&self) {
        if !self.is_tftpcast() {
            return;
        }
        let logs = self.logs();
        assert!(!logs.is_empty(), "tftpcast logged nothing");
        for (i, l) in logs.iter().enumerate() {
            let v: Result<serde_json::Value, _> = serde_json::from_str(l);
            assert!(
                matches!(v, Ok(serde_json::Value::Object(_))),
                "stderr line {i} is not a JSON object under --log-format json: {l:?}\n{}",
                self.log_tail(40)
            );
        }
    }

    /// The end of every loopback test: the server still serves a new request byte-exact,
    /// then exits 0 on SIGTERM, and its logs were JSON lines all along.
    pub fn finish(mut self, fx: &Fixture) {
        assert!(
            self.is_running(),
            "server died during the test\n{}",
            self.log_tail(60)
        );
        let r = raw::get(self.addr(), "b513.bin", "octet", &[], CLIENT_LIMIT);
        assert!(
            r.error.is_none() && !r.timed_out && r.data == fs::read(fx.path("b513.bin")).unwrap(),
            "after the test the server no longer serves a new request byte-exact: {r}\n{}",
            self.log_tail(60)
        );
        self.stop_clean();
        self.assert_logs_are_json();
    }

    /// [`Server::finish`] for a server in a lab namespace, which the root namespace cannot
    /// reach: checks it is alive, stops it and checks its log.
    pub fn finish_in_lab(mut self) {
        assert!(self.is_running(), "the server died\n{}", self.log_tail(60));
        self.stop_clean();
        self.assert_logs_are_json();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if self.is_running() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(3)).is_none() {
                self.kill_hard();
            }
        }
        self.join_readers();
        if thread::panicking() {
            eprintln!("server was: {}\n{}", self.what, self.log_tail(80));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Real clients.
// ---------------------------------------------------------------------------------------------

/// A real TFTP client and its options.
#[derive(Debug, Clone)]
pub enum Client {
    /// tftp-hpa `tftp HOST PORT -m MODE -c get FILE OUT`; MODE `binary` or `netascii`.
    Hpa { mode: &'static str },
    /// `atftp [--option "..."]... -g -r FILE -l OUT HOST PORT`; an entry starting with `--`
    /// is passed as it is (e.g. `--tftp-timeout=1`, atftp's own retransmission timeout).
    Atftp { options: Vec<&'static str> },
    /// `curl -sS [ARGS] tftp://HOST:PORT/FILE -o OUT` (with `--path-as-is`).
    Curl { args: Vec<&'static str> },
    /// `busybox tftp [-b SIZE] -g -r FILE -l OUT HOST PORT`.
    Busybox { blksize: Option<u16> },
    /// `tftpcast get --server HOST:PORT -o OUT [ARGS] FILE`.
    Tftpcast { args: Vec<&'static str> },
}

impl Client {
    pub fn hpa() -> Client {
        Client::Hpa { mode: "binary" }
    }

    /// The external tool this client needs.
    pub fn tool(&self) -> &'static str {
        match self {
            Client::Hpa { .. } => "tftp",
            Client::Atftp { .. } => "atftp",
            Client::Curl { .. } => "curl",
            Client::Busybox { .. } => "busybox",
            Client::Tftpcast { .. } => "tftpcast",
        }
    }

    /// [`require_tool`] for this client (tftpcast's own client is always there).
    pub fn available(&self) -> bool {
        matches!(self, Client::Tftpcast { .. }) || require_tool(self.tool())
    }

    /// The command that fetches `remote` from `server` into `out`.
    pub fn command(
        &self,
        netns: Option<&str>,
        server: SocketAddr,
        remote: &str,
        out: &Path,
    ) -> Command {
        let program: PathBuf = if let Client::Tftpcast { .. } = self {
            PathBuf::from(tftpcast_bin())
        } else {
            tool(self.tool())
        };
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new(tool("ip"));
                c.args(["netns", "exec", ns]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let host = server.ip().to_string();
        let port = server.port().to_string();
        match self {
            Client::Hpa { mode } => {
                cmd.args([&host, &port, "-m", mode, "-c", "get", remote])
                    .arg(out);
            }
            Client::Atftp { options } => {
                for o in options {
                    if o.starts_with("--") {
                        cmd.arg(o);
                    } else {
                        cmd.args(["--option", o]);
                    }
                }
                cmd.args(["-g", "-r", remote, "-l"])
                    .arg(out)
                    .args([&host, &port]);
            }
            Client::Curl { args } => {
                cmd.args(["-sS", "--path-as-is"]).args(args);
                cmd.arg(format!("tftp://{server}/{remote}"))
                    .arg("-o")
                    .arg(out);
            }
            Client::Busybox { blksize } => {
                cmd.arg("tftp");
                if let Some(b) = blksize {
                    cmd.args(["-b", &b.to_string()]);
                }
                cmd.args(["-g", "-r", remote, "-l"])
                    .arg(out)
                    .args([&host, &port]);
            }
            Client::Tftpcast { args } => {
                cmd.args(["get", "--server", &server.to_string(), "-o"])
                    .arg(out)
                    .args(args)
                    .arg(remote);
            }
        }
        cmd
    }

    /// Runs the fetch under `limit`.
    pub fn fetch(
        &self,
        netns: Option<&str>,
        server: SocketAddr,
        remote: &str,
        out: &Path,
        limit: Duration,
    ) -> Run {
        run(&mut self.command(netns, server, remote, out), limit)
    }

    /// Whether the client reported a failure although it exited 0 (tftp-hpa does that).
    pub fn reported_error(&self, r: &Run) -> bool {
        let o = r.output();
        match self {
            Client::Hpa { .. } => o.contains("Error code") || o.contains("Transfer timed out"),
            _ => false,
        }
    }
}

/// Asserts that `r` succeeded and `out` holds exactly the bytes of the file whose SHA-256 is
/// `want` and whose length is `len`.
pub fn assert_fetched(
    client: &Client,
    r: &Run,
    out: &Path,
    want: &[u8; 32],
    len: usize,
    ctx: &str,
) {
    assert!(
        r.success() && !client.reported_error(r),
        "{ctx}: {client:?} failed:\n{r}"
    );
    let got_len = fs::metadata(out).map(|m| m.len()).unwrap_or_else(|e| {
        panic!(
            "{ctx}: {client:?} exited 0 but wrote no file {}: {e}\n{r}",
            out.display()
        )
    });
    let got = sha256_file(out);
    assert!(
        got_len == len as u64 && &got == want,
        "{ctx}: {client:?} got {got_len} bytes with sha256 {}, want {len} bytes with sha256 {}\n{r}",
        hex(&got),
        hex(want)
    );
}

/// Fetches `name` from `server` with `client` and checks the bytes. Returns the run.
pub fn fetch_and_check(
    fx: &Fixture,
    client: &Client,
    server: SocketAddr,
    name: &str,
    limit: Duration,
) -> Run {
    let out = fx.out(name);
    let r = client.fetch(None, server, name, &out, limit);
    let len = fs::metadata(fx.path(name)).unwrap().len() as usize;
    assert_fetched(
        client,
        &r,
        &out,
        &fx.sha(name),
        len,
        &format!("fetching {name}"),
    );
    r
}

// ---------------------------------------------------------------------------------------------
// A raw TFTP client for exact assertions.
// ---------------------------------------------------------------------------------------------

pub mod raw {
    use super::*;

    pub const RRQ: u16 = 1;
    pub const WRQ: u16 = 2;
    pub const DATA: u16 = 3;
    pub const ACK: u16 = 4;
    pub const ERROR: u16 = 5;
    pub const OACK: u16 = 6;

    fn request(op: u16, file: &[u8], mode: &str, opts: &[(&str, &str)]) -> Vec<u8> {
        let mut p = op.to_be_bytes().to_vec();
        p.extend_from_slice(file);
        p.push(0);
        p.extend_from_slice(mode.as_bytes());
        p.push(0);
        for (k, v) in opts {
            p.extend_from_slice(k.as_bytes());
            p.push(0);
            p.extend_from_slice(v.as_bytes());
            p.push(0);
        }
        p
    }

    pub fn rrq(file: &[u8], mode: &str, opts: &[(&str, &str)]) -> Vec<u8> {
        request(RRQ, file, mode, opts)
    }

    pub fn wrq(file: &[u8], mode: &str, opts: &[(&str, &str)]) -> Vec<u8> {
        request(WRQ, file, mode, opts)
    }

    pub fn ack(block: u16) -> Vec<u8> {
        let mut p = ACK.to_be_bytes().to_vec();
        p.extend_from_slice(&block.to_be_bytes());
        p
    }

    pub fn opcode(p: &[u8]) -> Option<u16> {
        (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]))
    }

    /// (code, message) of an ERROR packet.
    pub fn parse_error(p: &[u8]) -> Option<(u16, String)> {
        if opcode(p)? != ERROR || p.len() < 4 {
            return None;
        }
        let msg = &p[4..];
        let msg = &msg[..msg.iter().position(|&b| b == 0).unwrap_or(msg.len())];
        Some((
            u16::from_be_bytes([p[2], p[3]]),
            String::from_utf8_lossy(msg).into_owned(),
        ))
    }

    /// Options of an OACK packet.
    pub fn parse_oack(p: &[u8]) -> Vec<(String, String)> {
        let parts: Vec<String> = p[2..]
            .split(|&b| b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        parts
            .chunks(2)
            .filter(|c| c.len() == 2 && !c[0].is_empty())
            .map(|c| (c[0].to_lowercase(), c[1].clone()))
            .collect()
    }

    fn socket_for(server: SocketAddr) -> UdpSocket {
        let local: SocketAddr = match server.ip() {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => "[::]:0".parse().unwrap(),
        };
        UdpSocket::bind(local).expect("bind udp")
    }

    /// Sends one packet and returns the first reply (from any port) within `wait`.
    pub fn exchange(
        server: SocketAddr,
        packet: &[u8],
        wait: Duration,
    ) -> Option<(Vec<u8>, SocketAddr)> {
        let s = socket_for(server);
        s.set_read_timeout(Some(wait)).unwrap();
        s.send_to(packet, server).ok()?;
        let mut buf = vec![0u8; 70000];
        let (n, from) = s.recv_from(&mut buf).ok()?;
        Some((buf[..n].to_vec(), from))
    }

    /// What a raw transfer saw.
    #[derive(Debug, Default, Clone)]
    pub struct Outcome {
        pub data: Vec<u8>,
        pub oack: Option<Vec<(String, String)>>,
        pub error: Option<(u16, String)>,
        /// DATA packets received in order.
        pub blocks: u64,
        /// DATA packets received that were duplicates or out of order.
        pub stray_data: u64,
        pub timed_out: bool,
        pub complete: bool,
    }

    impl Outcome {
        pub fn oack_value(&self, key: &str) -> Option<&str> {
            self.oack
                .as_ref()?
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    impl fmt::Display for Outcome {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "raw transfer: {} bytes in {} blocks (+{} stray), oack {:?}, error {:?}, timed_out {}, complete {}",
                self.data.len(),
                self.blocks,
                self.stray_data,
                self.oack,
                self.error,
                self.timed_out,
                self.complete
            )
        }
    }

    /// Fetches `file` (RFC 1350 + options, windowsize honoured) within `limit`.
    pub fn get(
        server: SocketAddr,
        file: &str,
        mode: &str,
        opts: &[(&str, &str)],
        limit: Duration,
    ) -> Outcome {
        get_with(server, file.as_bytes(), mode, opts, limit, |_| {})
    }

    /// [`get`] calling `on_block(n)` after the n-th in-order DATA block.
    pub fn get_with(
        server: SocketAddr,
        file: &[u8],
        mode: &str,
        opts: &[(&str, &str)],
        limit: Duration,
        mut on_block: impl FnMut(u64),
    ) -> Outcome {
        let sock = socket_for(server);
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let deadline = Instant::now() + limit;
        let mut o = Outcome::default();
        let mut last = rrq(file, mode, opts);
        let mut dest = server;
        sock.send_to(&last, dest).unwrap();
        let mut peer: Option<SocketAddr> = None;
        let (mut blksize, mut window) = (512usize, 1u64);
        let mut expected: u16 = 1;
        let mut in_window = 0u64;
        let mut buf = vec![0u8; 70000];
        loop {
            if Instant::now() > deadline {
                o.timed_out = true;
                return o;
            }
            let (n, from) = match sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(_) => {
                    let _ = sock.send_to(&last, dest);
                    continue;
                }
            };
            match peer {
                Some(p) if p != from => {
                    let mut e = ERROR.to_be_bytes().to_vec();
                    e.extend_from_slice(&5u16.to_be_bytes());
                    e.extend_from_slice(b"Unknown transfer ID\0");
                    let _ = sock.send_to(&e, from);
                    continue;
                }
                Some(_) => {}
                None => {
                    if from.ip() != server.ip() {
                        continue;
                    }
                    peer = Some(from);
                    dest = from;
                }
            }
            let p = &buf[..n];
            match opcode(p) {
                Some(OACK) if o.blocks == 0 => {
                    let oack = parse_oack(p);
                    for (k, v) in &oack {
                        match k.as_str() {
                            "blksize" => blksize = v.parse().unwrap_or(512),
                            "windowsize" => window = v.parse().unwrap_or(1),
                            _ => {}
                        }
                    }
                    o.oack = Some(oack);
                    last = ack(0);
                    sock.send_to(&last, dest).unwrap();
                }
                Some(DATA) if n >= 4 => {
                    let block = u16::from_be_bytes([p[2], p[3]]);
                    if block != expected {
                        o.stray_data += 1;
                        last = ack(expected.wrapping_sub(1));
                        in_window = 0;
                        sock.send_to(&last, dest).unwrap();
                        continue;
                    }
                    let payload = &p[4..];
                    o.data.extend_from_slice(payload);
                    o.blocks += 1;
                    expected = expected.wrapping_add(1);
                    in_window += 1;
                    on_block(o.blocks);
                    let done = payload.len() < blksize;
                    if done || in_window >= window {
                        last = ack(block);
                        in_window = 0;
                        sock.send_to(&last, dest).unwrap();
                    }
                    if done {
                        o.complete = true;
                        return o;
                    }
                }
                Some(ERROR) => {
                    o.error = parse_error(p);
                    return o;
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Network-namespace lab (DESIGN.md section 6).
// ---------------------------------------------------------------------------------------------

/// A bridge namespace, a server namespace and client namespaces on a private /24.
/// Every namespace it made is deleted on drop, even when the test panics.
pub struct Lab {
    /// Namespace holding the bridge `br0`.
    pub bridge: String,
    /// The server's namespace (address `.1`).
    pub server: String,
    /// Client namespaces (addresses `.11`, `.12`, ...).
    pub clients: Vec<String>,
    /// The first three octets of the lab's /24.
    pub net: [u8; 3],
    created: Vec<String>,
}

const LAB_TAG: &str = "tcl";

fn ip_cmd() -> Command {
    Command::new(tool("ip"))
}

/// Deletes lab namespaces left behind by test processes that no longer exist (e.g. SIGKILLed).
fn reap_stale_namespaces() {
    let r = run(ip_cmd().args(["netns", "list"]), CMD_LIMIT);
    for line in r.stdout.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let parts: Vec<&str> = name.split('-').collect();
        // tcl-<prefix>-<pid>-<n>-<role>
        if parts.len() == 5 && parts[0] == LAB_TAG {
            if let Ok(pid) = parts[2].parse::<u32>() {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = run(ip_cmd().args(["netns", "del", name]), CMD_LIMIT);
                }
            }
        }
    }
}

impl Lab {
    /// Builds a lab with `n_clients` client namespaces. `prefix` (letters/digits) names it.
    pub fn new(prefix: &str, n_clients: usize) -> Lab {
        assert!(
            prefix.chars().all(|c| c.is_ascii_alphanumeric()),
            "lab prefix must be alphanumeric"
        );
        assert!(n_clients <= 200);
        static REAPED: OnceLock<()> = OnceLock::new();
        REAPED.get_or_init(reap_stale_namespaces);
        let pid = std::process::id();
        let n = next_id();
        let name = |role: &str| format!("{LAB_TAG}-{prefix}-{pid}-{n}-{role}");
        // A /24 unique per lab of this process (and, short of pid reuse mod 800, per machine):
        // 10.20.0.0 .. 10.219.255.0. The namespaces are isolated anyway.
        let k = (pid as u64 * 64 + n as u64) % (200 * 256);
        let net = [10, 20 + (k / 256) as u8, (k % 256) as u8];
        let mut lab = Lab {
            bridge: name("br"),
            server: name("srv"),
            clients: (0..n_clients).map(|i| name(&format!("c{i}"))).collect(),
            net,
            created: Vec::new(),
        };
        let all: Vec<String> = [lab.bridge.clone(), lab.server.clone()]
            .into_iter()
            .chain(lab.clients.iter().cloned())
            .collect();
        for ns in &all {
            run_ok(ip_cmd().args(["netns", "add", ns]));
            lab.created.push(ns.clone());
        }
        let br = lab.bridge.clone();
        run_ok(ip_cmd().args(["-n", &br, "link", "add", "br0", "type", "bridge"]));
        run_ok(ip_cmd().args([
            "-n",
            &br,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]));
        run_ok(ip_cmd().args(["-n", &br, "link", "set", "lo", "up"]));
        run_ok(ip_cmd().args(["-n", &br, "link", "set", "br0", "up"]));
        let mut hosts = vec![(lab.server.clone(), "p-srv".to_string(), lab.server_ip())];
        for (i, c) in lab.clients.iter().enumerate() {
            hosts.push((c.clone(), format!("p-c{i}"), lab.client_ip(i)));
        }
        for (ns, port, ip) in &hosts {
            // Created inside the namespaces: interface names never meet in the root namespace.
            run_ok(ip_cmd().args([
                "-n", &br, "link", "add", port, "type", "veth", "peer", "name", "v0", "netns", ns,
            ]));
            run_ok(ip_cmd().args(["-n", &br, "link", "set", port, "master", "br0"]));
            run_ok(ip_cmd().args(["-n", &br, "link", "set", port, "up"]));
            run_ok(ip_cmd().args(["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "v0"]));
            run_ok(ip_cmd().args(["-n", ns, "link", "set", "v0", "up"]));
            run_ok(ip_cmd().args(["-n", ns, "link", "set", "lo", "up"]));
        }
        // Multicast leaves (server) and is received (clients) through the lab's veth.
        for ns in std::iter::once(&lab.server).chain(&lab.clients) {
            run_ok(ip_cmd().args(["-n", ns, "route", "add", "224.0.0.0/4", "dev", "v0"]));
        }
        lab
    }

    pub fn server_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 1)
    }

    pub fn client_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 11 + i as u8)
    }

    /// A command running `program args...` inside namespace `ns`.
    pub fn exec(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        ns_command(ns, program, args)
    }

    /// Runs `f` on a new thread that first enters network namespace `ns` (`setns(2)` acts on
    /// the calling thread only), so sockets it opens live in that namespace. Returns the thread;
    /// a panic in `f` (or a failed `setns`) surfaces from `join`.
    pub fn spawn_in_ns<T, F>(&self, ns: &str, f: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        spawn_in_netns(ns, f)
    }

    /// [`Lab::spawn_in_ns`] and wait for the result (panics in `f` propagate).
    pub fn in_ns<T, F>(&self, ns: &str, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        match self.spawn_in_ns(ns, f).join() {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e),
        }
    }

    /// Drops `percent`% of the UDP packets arriving in `ns` (nftables, input hook), counting them.
    pub fn add_loss(&self, ns: &str, percent: u8) {
        let nft = tool("nft");
        run_ok(&mut self.exec(ns, &nft, &["add", "table", "inet", "tcloss"]));
        run_ok(&mut self.exec(
            ns,
            &nft,
            &[
                "add",
                "chain",
                "inet",
                "tcloss",
                "input",
                "{ type filter hook input priority 0 ; }",
            ],
        ));
        let n = percent.to_string();
        run_ok(&mut self.exec(
            ns,
            &nft,
            &[
                "add", "rule", "inet", "tcloss", "input", "udp", "sport", "!=", "53", "numgen",
                "random", "mod", "100", "<", &n, "counter", "drop",
            ],
        ));
    }

    /// Packets dropped so far by [`Lab::add_loss`] in `ns`.
    pub fn dropped(&self, ns: &str) -> u64 {
        let r = run_ok(&mut self.exec(
            ns,
            tool("nft"),
            &["list", "chain", "inet", "tcloss", "input"],
        ));
        let words: Vec<&str> = r.stdout.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "packets")
            .and_then(|w| w[1].parse().ok())
            .unwrap_or_else(|| panic!("no counter in nft output:\n{r}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let r = run(ip_cmd().args(["netns", "del", ns]), CMD_LIMIT);
            if !r.success() {
                eprintln!("warning: could not delete namespace {ns}:\n{r}");
            }
        }
    }
}

/// Runs lab tests of one test binary one at a time: they measure times, rates and bytes on
/// the wire, and two of them sharing two cores disturb each other's numbers.
pub fn serial_lab() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The [`serial_lab`] turn of a lab test that needs network namespaces and `tools`; None
/// (the checks said why, and the test is skipped) when they are missing.
pub fn lab_turn(tools: &[&str]) -> Option<std::sync::MutexGuard<'static, ()>> {
    let turn = serial_lab();
    (require_netns() && require_tools(tools)).then_some(turn)
}

/// Runs `f` on a new thread that first enters network namespace `ns` (`setns(2)` acts on the
/// calling thread only), so sockets it opens live in that namespace. Returns the thread; a
/// panic in `f` (or a failed `setns`) surfaces from `join`.
pub fn spawn_in_netns<T, F>(ns: &str, f: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    use std::os::fd::AsRawFd;
    let path = Path::new("/var/run/netns").join(ns);
    thread::Builder::new()
        .name(format!("in-ns-{ns}"))
        .spawn(move || {
            let file = fs::File::open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            drop(file);
            f()
        })
        .expect("spawn thread")
}
