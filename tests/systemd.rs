//! The service manager's side: `Type=notify` readiness, socket activation and the privilege
//! drop after binding (`--user`), each with a real server process and a real client. The
//! notify socket and the passed socket are what systemd would provide, made by the test.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};
use std::{fs, thread};

use common::*;

/// The datagrams the server sends to the notify socket within `limit`, until one contains
/// `until`.
fn notifications_until(sock: &UnixDatagram, until: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            if got.last().unwrap().contains(until) {
                break;
            }
        }
    }
    got
}

#[test]
fn notify_socket_hears_ready_status_and_stopping() {
    if !testing_tftpcast() || !require_tool("tftp") {
        return;
    }
    let fx = Fixture::new();
    let path = fx.base().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    let mut server = Server::start_in_env(None, &fx.root, &[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let ready = notifications_until(&sock, "READY=1", Duration::from_secs(5));
    assert!(ready.iter().any(|m| m.lines().any(|l| l == "READY=1")), "no READY=1: {ready:?}");
    // Ready means bound: a client is served at once.
    fetch_and_check(&fx, &Client::hpa(), server.addr(), ONE_MIB, CLIENT_LIMIT);
    let status = notifications_until(&sock, "STATUS=serving:", Duration::from_secs(8));
    let line = status.iter().flat_map(|m| m.lines()).find(|l| l.starts_with("STATUS=serving:"));
    assert!(line.is_some_and(|l| l.contains("transfers") && l.contains("groups")), "{status:?}");
    server.signal(libc::SIGTERM);
    let stopping = notifications_until(&sock, "STOPPING=1", Duration::from_secs(5));
    assert!(stopping.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")), "no STOPPING=1: {stopping:?}");
    assert!(server.wait_exit(Duration::from_secs(15)).is_some_and(|s| s.success()));
}

#[test]
fn a_socket_passed_as_fd_3_is_served() {
    if !testing_tftpcast() || !require_tool("tftp") {
        return;
    }
    let fx = Fixture::new();
    // What a .socket unit does: bind, then start the service with the socket as fd 3,
    // LISTEN_FDS=1 and LISTEN_PID set to the service's own pid ($$ of the shell that execs).
    let passed = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = passed.local_addr().unwrap();
    let fd = passed.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"", tftpcast_bin()]);
    // SAFETY: dup2 and fcntl are async-signal-safe; this runs in the child between fork and
    // exec. dup2 onto another number clears close-on-exec; a socket that already is fd 3
    // needs it cleared by hand.
    unsafe {
        cmd.pre_exec(move || {
            let ok = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) == 0 } else { libc::dup2(fd, 3) == 3 };
            if ok { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        });
    }
    let server = Server::start_command(cmd, &fx.root, &[], &[]);
    drop(passed);
    assert_eq!(server.addr(), addr, "the node listens on the passed socket, not on --listen");
    assert!(server.logs().iter().any(|l| l.contains("using a socket passed by the service manager")), "{}", server.log_tail(20));
    fetch_and_check(&fx, &Client::hpa(), addr, ONE_MIB, CLIENT_LIMIT);
    server.finish(&fx);
}

/// The effective, real, saved and filesystem uids of a process.
fn uids(pid: i32) -> Vec<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid line");
    line.split_whitespace().skip(1).map(|w| w.parse().unwrap()).collect()
}

#[test]
fn user_nobody_after_binding_still_serves() {
    if !testing_tftpcast() || !require_tool("tftp") {
        return;
    }
    if !is_root() {
        assert!(!in_ci(), "CI runs as root");
        return;
    }
    let fx = Fixture::new();
    // The served tree must be readable by nobody (the temporary directory is 0700).
    fs::set_permissions(fx.base(), fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start(&fx.root, &["--user", "nobody"]);
    let nobody = common::uid_of("nobody");
    let deadline = Instant::now() + Duration::from_secs(5);
    while uids(server.pid()) != vec![nobody; 4] && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(uids(server.pid()), vec![nobody; 4], "every uid is nobody's");
    assert!(server.logs().iter().any(|l| l.contains("dropped privileges after binding")), "{}", server.log_tail(20));
    fetch_and_check(&fx, &Client::hpa(), server.addr(), ONE_MIB, CLIENT_LIMIT);
    server.finish(&fx);

    // A user that does not exist is refused before anything is bound, naming the setting.
    let r = run(Command::new(tftpcast_bin()).args(["check-config", "--root"]).arg(&fx.root).args(["--user", "no-such-user-here"]), Duration::from_secs(10));
    assert_eq!(r.code(), Some(2), "{r}");
    assert!(r.output().contains("server.user"), "{r}");
}

/// deploy/tftpcast.socket passes one datagram socket on port 69 to tftpcast.service, and
/// `systemd-analyze verify` accepts the pair (when systemd-analyze is installed).
#[test]
fn the_socket_unit_passes_port_69_to_the_service() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let socket = fs::read_to_string(repo.join("deploy/tftpcast.socket")).unwrap();
    let lines: Vec<&str> = socket.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    for want in ["ListenDatagram=69", "Service=tftpcast.service", "WantedBy=sockets.target"] {
        assert!(lines.contains(&want), "{want} in deploy/tftpcast.socket");
    }
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("SKIPPED part: systemd-analyze is not installed; the unit was checked by reading only");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let service = fs::read_to_string(repo.join("deploy/tftpcast.service")).unwrap();
    fs::write(dir.path().join("tftpcast.service"), service.replace("/usr/bin/tftpcast", tftpcast_bin())).unwrap();
    fs::write(dir.path().join("tftpcast.socket"), &socket).unwrap();
    let r = run(Command::new(analyze).arg("verify").arg(dir.path().join("tftpcast.socket")).arg(dir.path().join("tftpcast.service")), Duration::from_secs(60));
    let output = r.output();
    let ours: Vec<&str> = output.lines().filter(|l| l.contains("tftpcast.s")).map(str::trim).collect();
    assert!(r.success() && ours.is_empty(), "systemd-analyze verify deploy/tftpcast.socket:\n{r}");
}
