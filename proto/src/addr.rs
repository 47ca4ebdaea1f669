//! Socket addresses as TFTP compares them: an IPv4-mapped IPv6 address is its IPv4 address
//! (a dual-stack socket reports IPv4 peers that way), so TIDs and hosts match either form.

use std::net::{IpAddr, SocketAddr};

/// `ip` with an IPv4-mapped IPv6 address turned into the IPv4 address it maps.
pub fn unmap_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `addr` with an IPv4-mapped IPv6 address turned into the IPv4 address it maps.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Whether two addresses name the same host and port (flow labels and scope ids aside).
pub fn same(a: SocketAddr, b: SocketAddr) -> bool {
    unmap_ip(a.ip()) == unmap_ip(b.ip()) && a.port() == b.port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_compare_as_ipv4() {
        let m: SocketAddr = "[::ffff:10.0.0.1]:69".parse().unwrap();
        assert_eq!(unmap(m), "10.0.0.1:69".parse().unwrap());
        assert_eq!(unmap_ip(m.ip()), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert!(same(m, "10.0.0.1:69".parse().unwrap()));
        assert!(!same(m, "10.0.0.1:70".parse().unwrap()));
        let v6: SocketAddr = "[fe80::1]:69".parse().unwrap();
        assert_eq!(unmap(v6), v6);
    }
}
