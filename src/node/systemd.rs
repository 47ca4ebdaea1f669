//! systemd: the service manager's side of a node, done the native way.
//!
//! - **Readiness** (`Type=notify`): `READY=1` once every socket is bound, `STATUS=` with the
//!   running transfers and groups while serving, `STOPPING=1` while draining. Sent to
//!   `$NOTIFY_SOCKET` when it is set; without it nothing is sent.
//! - **Socket activation**: the UDP sockets the manager passes (`LISTEN_PID`, `LISTEN_FDS`,
//!   fds from 3) replace binding `server.listen`, so the unit needs no capability to use
//!   port 69.
//! - **Privilege drop**: `server.user` / `server.group` (`--user`, `--group`) switch a node
//!   started as root to that user once every socket is bound.

use std::io;
use std::net::UdpSocket;
use std::os::fd::{FromRawFd, RawFd};

use tracing::{debug, info};

use crate::config::identity::RunAs;

/// The first descriptor the service manager passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager, when one asked
/// for notifications. Failures are logged at debug: the node serves either way.
pub fn notify(state: &str) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else { return };
    if let Err(e) = send_notify(&path, state) {
        debug!(socket = %path, error = %e, "cannot notify the service manager");
    }
}

fn send_notify(path: &str, state: &str) -> io::Result<()> {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let sock = UnixDatagram::unbound()?;
    let addr = match path.strip_prefix('@') {
        // An abstract socket (Linux): the name after the '@'.
        Some(name) => <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(path)?,
    };
    sock.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

/// The UDP sockets passed by the service manager, if any were passed to this process. The
/// variables are removed so that nothing this process starts takes them too.
pub fn listen_sockets() -> Result<Vec<UdpSocket>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // Removed so that no process this node starts takes the sockets as its own.
        std::env::remove_var(k);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(Vec::new()) };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new()); // meant for another process (a parent that exec'ed us)
    }
    let n: RawFd = fds.parse().map_err(|_| format!("LISTEN_FDS={fds:?} is not a number"))?;
    (LISTEN_FDS_START..LISTEN_FDS_START + n).map(udp_socket_from).collect()
}

/// Takes ownership of a passed descriptor after checking it is a UDP (datagram) socket, and
/// enables the packet info the listener needs (the manager cannot set it).
fn udp_socket_from(fd: RawFd) -> Result<UdpSocket, String> {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `kind`.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, &mut kind as *mut _ as *mut libc::c_void, &mut len) };
    if r != 0 || kind != libc::SOCK_DGRAM {
        return Err(format!("passed descriptor {fd} is not a datagram socket (use ListenDatagram= in the .socket unit)"));
    }
    // SAFETY: the service manager handed this descriptor to this process; nothing else owns it.
    let sock = unsafe { socket2::Socket::from_raw_fd(fd) };
    let local = sock.local_addr().and_then(|a| a.as_socket().ok_or_else(|| io::Error::other("not an IP socket")));
    let local = local.map_err(|e| format!("passed descriptor {fd}: {e}"))?;
    let sock = crate::net::adopt_listener(sock, local.is_ipv6()).map_err(|e| format!("passed socket {local}: {e}"))?;
    info!(addr = %local, fd, "using a socket passed by the service manager");
    Ok(sock)
}

/// Switches to `run_as`: supplementary groups dropped, then the group, then the user (in this
/// order: after setuid the process could no longer change its groups). glibc applies each
/// call to every thread of the process.
pub fn drop_privileges(run_as: &RunAs) -> Result<(), String> {
    let gid = run_as.group.as_ref().map(|g| g.1).or(run_as.user.as_ref().map(|u| u.2));
    let os = |what: &str| format!("cannot {what}: {}", io::Error::last_os_error());
    // SAFETY: plain credential system calls with values looked up above.
    unsafe {
        if let Some(gid) = gid {
            if libc::setgroups(0, std::ptr::null()) != 0 && libc::geteuid() == 0 {
                return Err(os("drop supplementary groups"));
            }
            if libc::setgid(gid) != 0 {
                return Err(os(&format!("switch to group {gid}")));
            }
        }
        if let Some((name, uid, _)) = &run_as.user {
            if libc::setuid(*uid) != 0 {
                return Err(os(&format!("switch to user {name}")));
            }
        }
    }
    info!(user = run_as.user.as_ref().map(|u| u.0.as_str()), group = run_as.group.as_ref().map(|g| g.0.as_str()), "dropped privileges after binding");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send_notify(path.to_str().unwrap(), "READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");
    }
}
