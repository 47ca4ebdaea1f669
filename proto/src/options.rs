//! Option parsing and negotiation: blksize (RFC 2348), tsize and timeout (RFC 2349),
//! windowsize (RFC 7440) and multicast (RFC 2090).
//!
//! The server's side of RFC 2347: options it does not know are ignored; a known option with
//! a malformed or out-of-range value is refused with error 8 (RFC 2347: "the server may
//! respond with an error packet, error code 8"), as is the same option sent twice; a
//! `blksize` or `windowsize` larger than this server allows is answered with the smaller
//! value, which both RFCs permit. When no option is accepted no OACK is sent and the
//! transfer runs with RFC 1350 defaults.

use std::time::Duration;

use crate::packet::{MAX_BLKSIZE, MIN_BLKSIZE, DEFAULT_BLKSIZE};

/// What a client asked for, after syntax checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requested {
    pub blksize: Option<u16>,
    /// `tsize` value: 0 in a read request, the upload size in a write request.
    pub tsize: Option<u64>,
    pub timeout: Option<u8>,
    pub windowsize: Option<u16>,
    /// RFC 2090: the option's value is empty in a request.
    pub multicast: bool,
    /// Names of every option the client sent, lower-cased, in order (for logs and policy).
    pub names: Vec<String>,
}

/// Why a request's options are refused with error 8.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("option {0} sent twice")]
    Duplicate(String),
    #[error("option {name} has invalid value {value:?}")]
    Invalid { name: String, value: String },
}

/// A plain decimal number of at most 20 digits: `+5`, ` 5` and `5 ` are not what the RFCs
/// describe. Every option value (ours to parse or a server's answer) goes through here.
pub(crate) fn parse_number(value: &str) -> Option<u64> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn number(name: &str, value: &str) -> Result<u64, OptionError> {
    parse_number(value).ok_or_else(|| OptionError::Invalid { name: name.into(), value: value.chars().take(32).collect() })
}

/// The options this server negotiates; any other is ignored (RFC 2347).
const KNOWN: [&str; 5] = ["blksize", "tsize", "timeout", "windowsize", "multicast"];

/// Parses the options of a request. `names` are expected lower-cased (the decoder does it).
pub fn parse(options: &[(String, String)]) -> Result<Requested, OptionError> {
    let mut req = Requested::default();
    for (name, value) in options {
        // Only a known option sent twice is ambiguous; unknown ones are ignored however often.
        if KNOWN.contains(&name.as_str()) && req.names.iter().any(|n| n == name) {
            return Err(OptionError::Duplicate(name.clone()));
        }
        req.names.push(name.clone());
        let invalid = || OptionError::Invalid { name: name.clone(), value: value.chars().take(32).collect() };
        match name.as_str() {
            "blksize" => {
                // Values above the RFC maximum are clamped like any large value; below 8 is invalid.
                let v = number(name, value)?;
                if v < MIN_BLKSIZE as u64 {
                    return Err(invalid());
                }
                req.blksize = Some(v.min(MAX_BLKSIZE as u64) as u16);
            }
            "tsize" => req.tsize = Some(number(name, value)?),
            "timeout" => {
                let v = number(name, value)?;
                if !(1..=255).contains(&v) {
                    return Err(invalid());
                }
                req.timeout = Some(v as u8);
            }
            "windowsize" => {
                let v = number(name, value)?;
                if v == 0 {
                    return Err(invalid());
                }
                req.windowsize = Some(v.min(65535) as u16);
            }
            "multicast" => req.multicast = true,
            _ => {} // RFC 2347: unknown options are ignored.
        }
    }
    Ok(req)
}

/// What this server is willing to grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_blksize: u16,
    pub max_windowsize: u16,
    /// Retransmission timeout when the client negotiates none.
    pub default_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_blksize: MAX_BLKSIZE, max_windowsize: 64, default_timeout: Duration::from_secs(1) }
    }
}

/// The agreed parameters of a transfer and the OACK that announces them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    /// Retransmission timeout: the client's, when it negotiated one, else the server default.
    pub timeout: Duration,
    /// Whether the client fixed the timeout with RFC 2349 (then adaptive timers must honour it).
    pub timeout_negotiated: bool,
    /// For a write request, the size the client announced.
    pub tsize: Option<u64>,
    /// Accepted options in the client's order: empty means "send no OACK".
    pub oack: Vec<(String, String)>,
}

impl Negotiated {
    /// RFC 1350 parameters, used when the client sent no option we accept.
    pub fn defaults(limits: &Limits) -> Self {
        Negotiated {
            blksize: DEFAULT_BLKSIZE,
            windowsize: 1,
            timeout: limits.default_timeout,
            timeout_negotiated: false,
            tsize: None,
            oack: Vec::new(),
        }
    }
}

impl Negotiated {
    /// Lowers the block size after negotiation (flow control: path MTU, loss, memory) and
    /// keeps the OACK in step. Only a block size the client asked for can change: without
    /// the option the transfer is RFC 1350's 512 bytes.
    pub fn lower_blksize(&mut self, b: u16) {
        if let Some(entry) = self.oack.iter_mut().find(|(k, _)| k == "blksize") {
            self.blksize = b.clamp(MIN_BLKSIZE, self.blksize);
            entry.1 = self.blksize.to_string();
        }
    }
}

/// Negotiates the options of a request against the server's limits. `file_size` is the size
/// reported for `tsize` in a read request (None when it is unknown, then `tsize` is not
/// acknowledged). The `multicast` option is not handled here: the multicast layer adds its
/// own OACK entry when it accepts the client into a group.
pub fn negotiate(req: &Requested, limits: &Limits, file_size: Option<u64>, is_write: bool) -> Negotiated {
    let mut n = Negotiated::defaults(limits);
    for name in &req.names {
        match name.as_str() {
            "blksize" => {
                if let Some(b) = req.blksize {
                    n.blksize = b.min(limits.max_blksize).max(MIN_BLKSIZE);
                    n.oack.push((name.clone(), n.blksize.to_string()));
                }
            }
            "tsize" => {
                if is_write {
                    n.tsize = req.tsize;
                    if let Some(t) = req.tsize {
                        n.oack.push((name.clone(), t.to_string()));
                    }
                } else if let Some(size) = file_size {
                    n.oack.push((name.clone(), size.to_string()));
                }
            }
            "timeout" => {
                if let Some(t) = req.timeout {
                    n.timeout = Duration::from_secs(t as u64);
                    n.timeout_negotiated = true;
                    n.oack.push((name.clone(), t.to_string()));
                }
            }
            "windowsize" => {
                if let Some(w) = req.windowsize {
                    n.windowsize = w.min(limits.max_windowsize).max(1);
                    n.oack.push((name.clone(), n.windowsize.to_string()));
                }
            }
            _ => {}
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opts(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn typical_pxe_request() {
        let r = parse(&opts(&[("tsize", "0"), ("blksize", "1432")])).unwrap();
        let n = negotiate(&r, &Limits::default(), Some(12345), false);
        assert_eq!(n.blksize, 1432);
        assert_eq!(n.oack, opts(&[("tsize", "12345"), ("blksize", "1432")]));
    }

    #[test]
    fn unknown_options_are_ignored_and_no_oack_when_nothing_accepted() {
        let r = parse(&opts(&[("foo", "bar"), ("rollover", "0")])).unwrap();
        let n = negotiate(&r, &Limits::default(), Some(1), false);
        assert!(n.oack.is_empty());
        assert_eq!(n.blksize, 512);
        assert_eq!(n.windowsize, 1);
        // However many, and however often: a duplicate unknown option is not refused.
        let many: Vec<(String, String)> = (0..200).map(|i| (format!("x{}", i % 150), "1".to_string())).chain([("blksize".to_string(), "1024".to_string())]).collect();
        let n = negotiate(&parse(&many).unwrap(), &Limits::default(), Some(1), false);
        assert_eq!(n.oack, opts(&[("blksize", "1024")]));
    }

    #[test]
    fn out_of_range_and_malformed_values_are_refused() {
        for (k, v) in [("blksize", "7"), ("blksize", "abc"), ("blksize", ""), ("blksize", "-1"), ("timeout", "0"),
            ("timeout", "256"), ("windowsize", "0"), ("tsize", "x"), ("blksize", "99999999999999999999999")]
        {
            assert!(parse(&opts(&[(k, v)])).is_err(), "{k}={v} accepted");
        }
        assert_eq!(parse(&opts(&[("blksize", "512"), ("blksize", "1024")])), Err(OptionError::Duplicate("blksize".into())));
    }

    #[test]
    fn large_values_are_clamped() {
        let r = parse(&opts(&[("blksize", "70000"), ("windowsize", "100000")])).unwrap();
        let limits = Limits { max_blksize: 1468, max_windowsize: 32, ..Limits::default() };
        let n = negotiate(&r, &limits, None, false);
        assert_eq!((n.blksize, n.windowsize), (1468, 32));
        assert_eq!(n.oack, opts(&[("blksize", "1468"), ("windowsize", "32")]));
    }

    #[test]
    fn tsize_without_known_size_is_not_acknowledged() {
        let r = parse(&opts(&[("tsize", "0")])).unwrap();
        assert!(negotiate(&r, &Limits::default(), None, false).oack.is_empty());
        let w = negotiate(&parse(&opts(&[("tsize", "777")])).unwrap(), &Limits::default(), None, true);
        assert_eq!(w.tsize, Some(777));
        assert_eq!(w.oack, opts(&[("tsize", "777")]));
    }

    #[test]
    fn lowering_blksize_updates_the_oack_only_when_asked() {
        let mut n = negotiate(&parse(&opts(&[("blksize", "8192")])).unwrap(), &Limits::default(), None, false);
        n.lower_blksize(1468);
        assert_eq!((n.blksize, n.oack.clone()), (1468, opts(&[("blksize", "1468")])));
        n.lower_blksize(9000);
        assert_eq!(n.blksize, 1468);
        let mut d = negotiate(&parse(&[]).unwrap(), &Limits::default(), None, false);
        d.lower_blksize(100);
        assert_eq!((d.blksize, d.oack.len()), (512, 0));
    }

    #[test]
    fn timeout_is_honoured() {
        let n = negotiate(&parse(&opts(&[("timeout", "3")])).unwrap(), &Limits::default(), None, false);
        assert_eq!(n.timeout, Duration::from_secs(3));
        assert!(n.timeout_negotiated);
    }

    proptest! {
        #[test]
        fn negotiated_values_stay_in_range(b in 8u64..200000, w in 1u64..200000, maxb in 8u16..=65464, maxw in 1u16..=1000) {
            let r = parse(&opts(&[("blksize", &b.to_string()), ("windowsize", &w.to_string())])).unwrap();
            let n = negotiate(&r, &Limits { max_blksize: maxb, max_windowsize: maxw, ..Limits::default() }, None, false);
            prop_assert!(n.blksize >= 8 && n.blksize <= maxb && n.blksize as u64 <= b);
            prop_assert!(n.windowsize >= 1 && n.windowsize <= maxw && n.windowsize as u64 <= w);
        }

        #[test]
        fn parse_never_panics(list in proptest::collection::vec((prop_oneof!["[a-z]{1,12}", proptest::sample::select(KNOWN.to_vec()).prop_map(String::from)], prop_oneof![".{0,24}", "[0-9]{1,6}"]), 0..10)) {
            match parse(&list) {
                // Every name is kept in order; values accepted are within the RFCs' ranges.
                Ok(r) => {
                    prop_assert_eq!(&r.names, &list.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>());
                    prop_assert!(r.blksize.is_none_or(|b| (MIN_BLKSIZE..=MAX_BLKSIZE).contains(&b)));
                    prop_assert!(r.timeout.is_none_or(|t| t >= 1));
                    prop_assert!(r.windowsize.is_none_or(|w| w >= 1));
                    prop_assert_eq!(r.multicast, list.iter().any(|(k, _)| k == "multicast"));
                }
                // Only a known option can be refused: unknown ones are ignored (RFC 2347).
                Err(OptionError::Duplicate(n)) | Err(OptionError::Invalid { name: n, .. }) => {
                    prop_assert!(KNOWN.contains(&n.as_str()), "unknown option {} refused", n);
                }
            }
        }
    }
}
