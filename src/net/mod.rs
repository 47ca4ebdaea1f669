//! Socket plumbing shared by the listener and the sessions.
//!
//! Everything here is about one rule of multi-homed TFTP: a reply must leave from the address
//! the request was sent to (clients, NAT and a shared cluster service address depend on it).
//! The listening socket is usually bound to a wildcard address, so it asks the kernel for each
//! datagram's destination (`IP_PKTINFO` / `IPV6_RECVPKTINFO`); replies sent from the listening
//! socket carry that address back in a `sendmsg` control message, and each transfer socket is
//! bound to it.

pub mod timer;
pub mod transport;
pub mod udp;


use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Kernel buffer sizes asked for every socket (the kernel may cap them at `rmem_max`).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// IPv4-mapped IPv6 addresses (from a dual-stack socket) become plain IPv4.
pub use tftpcast_proto::addr::{unmap, unmap_ip};

fn new_socket(addr: &SocketAddr) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(*addr), Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // One socket for both families: IPv4 clients arrive as ::ffff:a.b.c.d.
        sock.set_only_v6(false)?;
    }
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// A listening socket bound by someone else (the service manager): set up as
/// [`bind_listener`] sets up its own (non-blocking, close-on-exec, buffers, packet info).
pub fn adopt_listener(sock: Socket, v6: bool) -> io::Result<UdpSocket> {
    sock.set_nonblocking(true)?;
    sock.set_cloexec(true)?;
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    enable_pktinfo(&sock, v6)?;
    Ok(sock.into())
}

/// A listening socket: reusable address, destination-address reporting on.
pub fn bind_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<UdpSocket> {
    let sock = new_socket(&addr)?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    enable_pktinfo(&sock, addr.is_ipv6())?;
    sock.bind(&SockAddr::from(addr))?;
    Ok(sock.into())
}

fn setsockopt_int(sock: &Socket, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid fd and a pointer to a live c_int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn enable_pktinfo(sock: &Socket, v6: bool) -> io::Result<()> {
    if v6 {
        setsockopt_int(sock, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        // IPv4 datagrams on a dual-stack socket report through IP_PKTINFO; not fatal if refused.
        let _ = setsockopt_int(sock, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
    } else {
        setsockopt_int(sock, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    }
    Ok(())
}

/// A transfer socket bound to `local` (the address the request came to), on a port from
/// `range` when one is configured (each cluster node owns a disjoint range), else ephemeral.
pub fn bind_transfer(local: IpAddr, range: Option<(u16, u16)>) -> io::Result<UdpSocket> {
    let local = unmap_ip(local);
    let Some((lo, hi)) = range else {
        let sock = new_socket(&SocketAddr::new(local, 0))?;
        sock.bind(&SockAddr::from(SocketAddr::new(local, 0)))?;
        return Ok(sock.into());
    };
    let span = (hi - lo) as u32 + 1;
    let start = fastrand::u32(0..span);
    // Probe from a random point so concurrent sessions do not all fight over the low ports.
    for i in 0..span.min(4096) {
        let port = lo + ((start + i) % span) as u16;
        let addr = SocketAddr::new(local, port);
        let sock = new_socket(&addr)?;
        match sock.bind(&SockAddr::from(addr)) {
            Ok(()) => return Ok(sock.into()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, format!("no free port in {lo}-{hi}")))
}

/// One received datagram's addresses.
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    pub len: usize,
    pub from: SocketAddr,
    /// The address the datagram was sent to, when the kernel reported it.
    pub dst: Option<IpAddr>,
}

const CMSG_SPACE: usize = 128;

/// `recvmsg` that also returns the datagram's destination address.
pub fn recv_with_dst(sock: &UdpSocket, buf: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<RecvMeta> {
    // SAFETY: all pointers refer to live stack or caller buffers of the sizes given; the
    // kernel fills at most those sizes; cmsg parsing uses the libc CMSG_* macros.
    unsafe {
        let mut storage: libc::sockaddr_storage = zeroed();
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
        let mut cbuf = [0u64; CMSG_SPACE / 8];
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = &mut storage as *mut _ as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = CMSG_SPACE as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let from = sockaddr_to_std(&storage).ok_or_else(|| io::Error::other("unknown address family"))?;
        let mut dst = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_PKTINFO {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::in_pktinfo);
                dst = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))));
            } else if c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_PKTINFO {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::in6_pktinfo);
                dst = Some(unmap_ip(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr))));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok(RecvMeta { len: n as usize, from: unmap(from), dst })
    }
}

fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the family field says which struct the storage holds.
    unsafe {
        match s.ss_family as libc::c_int {
            libc::AF_INET => {
                let a = &*(s as *const _ as *const libc::sockaddr_in);
                Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 => {
                let a = &*(s as *const _ as *const libc::sockaddr_in6);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// Sends `data` to `to` from `sock`, with `src` as the source address when given (the
/// destination of the request being answered). `sock_is_v6` says the socket's family:
/// IPv4 peers of a dual-stack socket must be addressed as mapped IPv6.
pub fn send_from(sock: &UdpSocket, data: &[u8], to: SocketAddr, src: Option<IpAddr>, sock_is_v6: bool) -> io::Result<usize> {
    send_parts_from(sock, data, &[], to, src, sock_is_v6)
}

/// `send_from` for a datagram made of a header and a payload, without copying them together
/// (single-port mode sends DATA from the listening socket this way).
pub fn send_parts_from(sock: &UdpSocket, head: &[u8], body: &[u8], to: SocketAddr, src: Option<IpAddr>, sock_is_v6: bool) -> io::Result<usize> {
    let to_sa = match (to, sock_is_v6) {
        (SocketAddr::V4(v4), true) => SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0)),
        _ => to,
    };
    let to_sa = SockAddr::from(to_sa);
    // SAFETY: as in recv_with_dst; the control buffer is large enough for one pktinfo.
    unsafe {
        let mut iov = [
            libc::iovec { iov_base: head.as_ptr() as *mut libc::c_void, iov_len: head.len() },
            libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() },
        ];
        let mut cbuf = [0u64; CMSG_SPACE / 8];
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = to_sa.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = to_sa.len();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = if body.is_empty() { 1 } else { 2 };
        if let Some(src) = src {
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            match (src, to) {
                (IpAddr::V4(s), SocketAddr::V4(_)) => {
                    let mut info: libc::in_pktinfo = zeroed();
                    info.ipi_spec_dst.s_addr = u32::from(s).to_be();
                    put_cmsg(&mut msg, libc::IPPROTO_IP, libc::IP_PKTINFO, info);
                }
                (IpAddr::V6(s), SocketAddr::V6(_)) => {
                    let mut info: libc::in6_pktinfo = zeroed();
                    info.ipi6_addr.s6_addr = s.octets();
                    put_cmsg(&mut msg, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info);
                }
                _ => {
                    msg.msg_control = std::ptr::null_mut();
                }
            }
        }
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, 0);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Makes `data` the one control message (`level`, `ty`) of `msg`.
///
/// # Safety
/// `msg.msg_control` must point at a writable buffer of at least `CMSG_SPACE(size_of::<T>())`
/// bytes, aligned for a `cmsghdr`.
unsafe fn put_cmsg<T>(msg: &mut libc::msghdr, level: libc::c_int, ty: libc::c_int, data: T) {
    msg.msg_controllen = libc::CMSG_SPACE(size_of::<T>() as u32) as _;
    let c = libc::CMSG_FIRSTHDR(msg);
    (*c).cmsg_level = level;
    (*c).cmsg_type = ty;
    (*c).cmsg_len = libc::CMSG_LEN(size_of::<T>() as u32) as _;
    // The data after the header need not be aligned for T.
    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut T, data);
}

/// Sends one datagram made of a header and a payload without copying them together.
pub fn send_vectored(sock: &UdpSocket, head: &[u8], body: &[u8], to: SocketAddr) -> io::Result<usize> {
    let to = SockAddr::from(to);
    // SAFETY: two live slices described by iovecs; the address outlives the call.
    unsafe {
        let mut iov = [
            libc::iovec { iov_base: head.as_ptr() as *mut libc::c_void, iov_len: head.len() },
            libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() },
        ];
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = to.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = to.len();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = if body.is_empty() { 1 } else { 2 };
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, 0);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Parses `LO-HI` into a port range.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s.split_once('-').ok_or_else(|| format!("{s:?} is not LO-HI"))?;
    let lo: u16 = lo.trim().parse().map_err(|_| format!("{lo:?} is not a port"))?;
    let hi: u16 = hi.trim().parse().map_err(|_| format!("{hi:?} is not a port"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?} is not a range of non-zero ports LO<=HI"));
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pktinfo_reports_destination_and_send_from_uses_it() {
        let l = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let laddr = l.local_addr().unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.send_to(b"hello", laddr).unwrap();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        let meta = loop {
            match recv_with_dst(&l, &mut buf) {
                Ok(m) => break m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(std::time::Duration::from_millis(5)),
                Err(e) => panic!("{e}"),
            }
        };
        // SAFETY: recvmsg initialised the first `len` bytes.
        let got: Vec<u8> = buf[..meta.len].iter().map(|b| unsafe { b.assume_init() }).collect();
        assert_eq!(got, b"hello");
        assert_eq!(meta.from, c.local_addr().unwrap());
        assert_eq!(meta.dst, Some("127.0.0.1".parse().unwrap()));
        send_from(&l, b"back", meta.from, meta.dst, false).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let mut back = [0u8; 64];
        let (n, from) = c.recv_from(&mut back).unwrap();
        assert_eq!((&back[..n], from), (&b"back"[..], laddr));
    }

    #[test]
    fn parts_leave_as_one_datagram_from_the_given_source() {
        // A dual-stack socket, as `[::]:69` is, answering an IPv4 client from 127.0.0.1.
        let Ok(l) = bind_listener("[::]:0".parse().unwrap(), false) else { return };
        let port = l.local_addr().unwrap().port();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        send_parts_from(&l, &[0, 3, 0, 1], b"payload", c.local_addr().unwrap(), Some("127.0.0.1".parse().unwrap()), true).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"\0\x03\0\x01payload");
        assert_eq!(from, SocketAddr::from(([127, 0, 0, 1], port)));
    }

    #[test]
    fn an_ipv6_client_is_answered_from_the_given_ipv6_source() {
        // The IPv6 control message (in6_pktinfo); skipped where the host has no ::1.
        let Ok(l) = bind_listener("[::]:0".parse().unwrap(), false) else { return };
        let Ok(c) = UdpSocket::bind("[::1]:0") else { return };
        let port = l.local_addr().unwrap().port();
        send_parts_from(&l, &[0, 5], b"v6", c.local_addr().unwrap(), Some("::1".parse().unwrap()), true).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"\0\x05v6");
        assert_eq!(from, SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
    }

    #[test]
    fn transfer_socket_takes_a_port_from_the_range() {
        let s = bind_transfer("127.0.0.1".parse().unwrap(), Some((47000, 47010))).unwrap();
        let p = s.local_addr().unwrap().port();
        assert!((47000..=47010).contains(&p));
    }

    #[test]
    fn loopback_path_mtu_is_known() {
        let mtu = path_mtu("127.0.0.1".parse().unwrap(), "127.0.0.1:9".parse().unwrap());
        assert!(matches!(mtu, Some(m) if m >= 1500), "{mtu:?}");
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(parse_v4_cidr("239.255.68.0/24"), Ok(("239.255.68.0".parse().unwrap(), 256)));
        assert_eq!(parse_v4_cidr("239.255.68.7/30"), Ok(("239.255.68.4".parse().unwrap(), 4)));
        assert!(parse_v4_cidr("239.255.68.0").is_err());
        assert!(parse_v4_cidr("x/24").is_err());
    }

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_port_range("1000-2000"), Ok((1000, 2000)));
        assert!(parse_port_range("2000-1000").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("x").is_err());
    }

    #[test]
    fn mapped_addresses_are_unmapped() {
        let m: SocketAddr = "[::ffff:10.0.0.1]:69".parse().unwrap();
        assert_eq!(unmap(m), "10.0.0.1:69".parse().unwrap());
    }
}

/// Socket of a multicast group: bound to the address the first request came to, on a
/// transfer port, sending to the group through `interface` (default: the bound address) with
/// `ttl`. Loopback delivery stays on so clients on the server host receive too. DATA and the
/// OACKs must both leave from this socket: RFC 2090 clients drop multicast DATA whose source
/// address and port differ from those of the OACK that enrolled them.
pub fn bind_group(local: Ipv4Addr, range: Option<(u16, u16)>, interface: Option<Ipv4Addr>, ttl: u32) -> io::Result<UdpSocket> {
    let sock = bind_transfer(IpAddr::V4(local), range)?;
    let s2 = socket2::SockRef::from(&sock);
    s2.set_multicast_ttl_v4(ttl)?;
    s2.set_multicast_loop_v4(true)?;
    let ifaddr = interface.unwrap_or(local);
    if !ifaddr.is_unspecified() {
        s2.set_multicast_if_v4(&ifaddr)?;
    }
    Ok(sock)
}

/// Single-port mode: the listening socket also sends multicast groups' DATA, so it gets the
/// group sockets' settings. Without a configured interface, a listener bound to one IPv4
/// address sends through it, and a wildcard one follows the multicast route.
pub fn prepare_multicast_sender(sock: &UdpSocket, interface: Option<Ipv4Addr>, ttl: u32) -> io::Result<()> {
    let s2 = socket2::SockRef::from(sock);
    // IPv4 options apply to a dual-stack socket's IPv4 traffic too.
    s2.set_multicast_ttl_v4(ttl)?;
    s2.set_multicast_loop_v4(true)?;
    let bound = match sock.local_addr()? {
        SocketAddr::V4(a) => Some(*a.ip()),
        SocketAddr::V6(_) => None,
    };
    if let Some(ifaddr) = interface.or(bound).filter(|a| !a.is_unspecified()) {
        s2.set_multicast_if_v4(&ifaddr)?;
    }
    Ok(())
}

/// The path MTU towards `peer` from `local`, as the kernel knows it (interface MTU or a
/// learned smaller path MTU). A throwaway connected socket asks; nothing is sent.
pub fn path_mtu(local: IpAddr, peer: SocketAddr) -> Option<u32> {
    let local = unmap_ip(local);
    let sock = Socket::new(Domain::for_address(peer), Type::DGRAM.cloexec(), Some(Protocol::UDP)).ok()?;
    if local.is_ipv4() == peer.is_ipv4() {
        let _ = sock.bind(&SockAddr::from(SocketAddr::new(local, 0)));
    }
    sock.connect(&SockAddr::from(peer)).ok()?;
    let (level, name) = if peer.is_ipv6() { (libc::IPPROTO_IPV6, libc::IPV6_MTU) } else { (libc::IPPROTO_IP, libc::IP_MTU) };
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid fd, and a c_int out-parameter of the size given.
    let rc = unsafe { libc::getsockopt(sock.as_raw_fd(), level, name, &mut mtu as *mut libc::c_int as *mut libc::c_void, &mut len) };
    (rc == 0 && mtu > 0).then_some(mtu as u32)
}

/// Parses an IPv4 CIDR such as `239.255.68.0/24` into its first address and size.
pub fn parse_v4_cidr(s: &str) -> Result<(Ipv4Addr, u32), String> {
    let (a, len) = s.split_once('/').ok_or_else(|| format!("{s:?} is not ADDR/LEN"))?;
    let a: Ipv4Addr = a.trim().parse().map_err(|_| format!("{a:?} is not an IPv4 address"))?;
    let len: u32 = len.trim().parse().map_err(|_| format!("{len:?} is not a prefix length"))?;
    if len > 32 {
        return Err(format!("prefix length {len} > 32"));
    }
    let size = 1u64 << (32 - len);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let base = Ipv4Addr::from(u32::from(a) & mask);
    Ok((base, size.min(u32::MAX as u64) as u32))
}

/// Largest number of datagrams the kernel accepts in one UDP_SEGMENT send (UDP_MAX_SEGMENTS).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload one segmented send may carry (an IPv4 datagram's limit, with margin).
pub const GSO_MAX_BYTES: usize = 65000;

/// Sends the concatenation of `iov` as datagrams of `seg` bytes each (the last may be
/// shorter) with one `sendmsg`, by UDP generic segmentation offload: one trip through the
/// stack for a whole window instead of one per datagram. The kernel refuses (EINVAL, EIO)
/// when a segment does not fit the path MTU or the device cannot offload checksums; callers
/// then send datagram by datagram.
pub fn send_segments(sock: &UdpSocket, iov: &[io::IoSlice<'_>], seg: u16, to: SocketAddr) -> io::Result<usize> {
    let to = SockAddr::from(to);
    // SAFETY: the iovecs describe live slices (IoSlice is ABI-compatible with iovec); the
    // control buffer is large enough for one u16 cmsg; the address outlives the call.
    unsafe {
        let mut cbuf = [0u64; CMSG_SPACE / 8];
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = to.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = to.len();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, 0);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// A client address range for rules: `ADDR/LEN` (IPv4 or IPv6) or a single address. The
/// address is masked to its prefix (`10.1.2.3/8` means `10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    base: IpAddr,
    len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a.trim(), Some(l.trim())),
            None => (s, None),
        };
        let ip: IpAddr = a.parse().map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len {
            Some(l) => l.parse().ok().filter(|n| *n <= max).ok_or_else(|| format!("{l:?} is not a prefix length 0..={max}"))?,
            None => max,
        };
        if let IpAddr::V4(v4) = ip {
            // The same check as the multicast range's parser.
            let (base, _) = parse_v4_cidr(&format!("{v4}/{len}"))?;
            return Ok(Cidr { base: IpAddr::V4(base), len });
        }
        Ok(Cidr { base: IpAddr::V6(mask_v6(ip_v6(ip), len)), len })
    }

    /// Whether `ip` is in the range; an IPv4-mapped IPv6 address (dual-stack socket) counts
    /// as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.base, ip.to_canonical()) {
            (IpAddr::V4(b), IpAddr::V4(a)) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - self.len as u32) };
                u32::from(a) & mask == u32::from(b)
            }
            (IpAddr::V6(b), IpAddr::V6(a)) => mask_v6(a, self.len) == b,
            _ => false,
        }
    }
}

fn ip_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

fn mask_v6(a: std::net::Ipv6Addr, len: u8) -> std::net::Ipv6Addr {
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - len as u32) };
    std::net::Ipv6Addr::from(u128::from(a) & mask)
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.len)
    }
}

#[cfg(test)]
mod cidr_tests {
    use super::Cidr;

    #[test]
    fn v4_v6_and_mapped_addresses() {
        let c = Cidr::parse("127.0.0.1/32").unwrap();
        assert!(c.contains("127.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.contains("127.0.0.2".parse().unwrap()));
        let n = Cidr::parse("10.1.2.3/8").unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert!(n.contains("10.200.0.1".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("192.0.2.9".parse().unwrap()));
        for bad in ["10.0.0.0/33", "fd00::/129", "host/8", "10.0.0.0/x", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }
}
