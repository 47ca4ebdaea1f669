//! The client's side of RFC 2347: checking a server's OACK against what we asked for.
//!
//! One check serves downloads ([`crate::receiver`]), multicast downloads
//! ([`crate::mcast_receiver`]) and uploads ([`crate::upload::check_oack`]): an OACK may carry
//! only options we asked for, each once, with a value within what we asked (`blksize`
//! 8..=asked, `windowsize` 1..=asked, `timeout` 1..=asked, `tsize` as asked). The error is the
//! reason sent with ERROR 8.

use std::net::Ipv4Addr;

use crate::options::parse_number;
use crate::packet::{DEFAULT_BLKSIZE, MIN_BLKSIZE};

/// What our request asked for (values already normalised: blksize clamped, windowsize and
/// timeout at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Asked {
    pub blksize: Option<u16>,
    pub windowsize: Option<u16>,
    pub timeout: Option<u8>,
    pub tsize: Tsize,
    pub multicast: Multicast,
}

/// The `tsize` we sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tsize {
    NotAsked,
    /// `tsize 0` in a read request: any size may come back.
    Query,
    /// The size a write request announced: it must come back unchanged.
    Announced(u64),
}

/// What to make of a `multicast` option in the OACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Multicast {
    NotAsked,
    /// Asked for, but this machine cannot receive multicast: refuse it.
    Refused,
    /// Parse it (RFC 2090 `addr,port,mc`).
    Accepted,
}

/// Values an OACK agreed on; options it left out keep their RFC 1350 defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Agreed {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Option<u8>,
    pub tsize: Option<u64>,
    pub multicast: Option<McValue>,
}

/// A parsed `multicast` option value: address and port may be empty in later OACKs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct McValue {
    pub addr: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub master: bool,
}

/// Checks an OACK's options (see the module documentation).
pub(crate) fn check(asked: &Asked, opts: &[(String, String)]) -> Result<Agreed, String> {
    let mut a = Agreed { blksize: DEFAULT_BLKSIZE, windowsize: 1, timeout: None, tsize: None, multicast: None };
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in opts {
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return Err(format!("OACK carries option {name} twice"));
        }
        let unrequested = || format!("OACK carries option {name}, which was not requested");
        let bad = |range: String| format!("OACK {name} {value:?} is outside {range}");
        let within = |asked: u64, low: u64| parse_number(value).filter(|v| (low..=asked).contains(v));
        match name.as_str() {
            "blksize" => {
                let asked = asked.blksize.ok_or_else(unrequested)?;
                let v = within(asked as u64, MIN_BLKSIZE as u64).ok_or_else(|| bad(format!("{MIN_BLKSIZE}..={asked}")))?;
                a.blksize = v as u16;
            }
            "windowsize" => {
                let asked = asked.windowsize.ok_or_else(unrequested)?;
                a.windowsize = within(asked as u64, 1).ok_or_else(|| bad(format!("1..={asked}")))? as u16;
            }
            "timeout" => {
                let asked = asked.timeout.ok_or_else(unrequested)?;
                a.timeout = Some(within(asked as u64, 1).ok_or_else(|| bad(format!("1..={asked}")))? as u8);
            }
            "tsize" => match asked.tsize {
                Tsize::NotAsked => return Err(unrequested()),
                Tsize::Query => a.tsize = Some(parse_number(value).ok_or_else(|| bad("0..=2^64-1".to_string()))?),
                Tsize::Announced(n) if parse_number(value) == Some(n) => a.tsize = Some(n),
                Tsize::Announced(n) => return Err(bad(format!("{n}..={n}"))),
            },
            "multicast" => match asked.multicast {
                Multicast::NotAsked => return Err(unrequested()),
                Multicast::Refused => return Err("multicast reception is not supported by this client".to_string()),
                Multicast::Accepted => a.multicast = Some(parse_multicast(value)?),
            },
            _ => return Err(unrequested()),
        }
        seen.push(name);
    }
    Ok(a)
}

/// Parses an RFC 2090 `multicast` value, `addr,port,mc` (address and port may be empty).
pub(crate) fn parse_multicast(value: &str) -> Result<McValue, String> {
    let parts: Vec<&str> = value.split(',').map(str::trim).collect();
    let [addr, port, mc] = parts[..] else {
        return Err(format!("OACK multicast {value:?} is not addr,port,mc"));
    };
    let addr = match addr {
        "" => None,
        a => match a.parse::<Ipv4Addr>() {
            Ok(ip) if ip.is_multicast() => Some(ip),
            _ => return Err(format!("OACK multicast address {a:?} is not an IPv4 multicast address")),
        },
    };
    let port = match port {
        "" => None,
        p => match parse_number(p) {
            Some(n) if (1..=65535).contains(&n) => Some(n as u16),
            _ => return Err(format!("OACK multicast port {p:?} is not a port")),
        },
    };
    let master = match mc {
        "1" => true,
        "0" => false,
        m => return Err(format!("OACK multicast flag {m:?} is neither 0 nor 1")),
    };
    Ok(McValue { addr, port, master })
}
