//! policy: per-client option rules (`[[policy]]` in the configuration).
//!
//! Some clients ask for options their firmware then mishandles (a PXE ROM that asks for a
//! block size its NIC driver cannot reassemble, a loader that breaks on windows, a switch
//! segment where multicast floods). A rule matches requests by client address range, by the
//! set of options asked and by file name, and clamps or removes options before negotiation,
//! or denies the request (ERROR 2). The first rule that matches applies; later rules are not
//! looked at, so an action-less rule early in the list exempts its clients.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use tftpcast_proto::options::Requested;

use crate::net::Cidr;

/// Options a rule can remove from a request (so they are absent from the OACK).
const REFUSABLE: [&str; 5] = ["blksize", "windowsize", "timeout", "multicast", "tsize"];

/// One `[[policy]]` table as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name in logs (default: the rule's index).
    #[serde(default)]
    pub name: String,
    /// Client ranges (CIDR or single addresses, IPv4 or IPv6); empty matches every client.
    #[serde(default)]
    pub clients: Vec<String>,
    /// The exact set of option names the request carries (order does not matter).
    #[serde(default)]
    pub options: Option<Vec<String>>,
    /// Option names the request must carry (others may be present too).
    #[serde(default)]
    pub has: Vec<String>,
    /// Regular expression the requested file name must match (unanchored).
    #[serde(default)]
    pub file: String,
    pub blksize_max: Option<u64>,
    pub windowsize_max: Option<u64>,
    /// Bounds of a timeout the client asks for, in seconds.
    pub timeout_min: Option<u64>,
    pub timeout_max: Option<u64>,
    /// Options to ignore (absent from the OACK): blksize, windowsize, timeout, multicast, tsize.
    #[serde(default)]
    pub refuse: Vec<String>,
    /// Refuse the request with ERROR 2 (access violation).
    #[serde(default)]
    pub deny: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    label: String,
    clients: Vec<Cidr>,
    options: Option<BTreeSet<String>>,
    has: Vec<String>,
    file: Option<regex::Regex>,
    blksize_max: Option<u16>,
    windowsize_max: Option<u16>,
    timeout: (u8, u8),
    refuse: Vec<String>,
    deny: bool,
}

/// The compiled rules, in configuration order.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// What a matching rule did to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The rule's name, or `#N` (its index from 0).
    pub rule: String,
    pub deny: bool,
    /// One entry per change, e.g. `blksize 1468->1024`, `multicast refused`.
    pub changes: Vec<String>,
}

impl Applied {
    pub fn summary(&self) -> String {
        if self.deny {
            "denied".into()
        } else if self.changes.is_empty() {
            "no change".into()
        } else {
            self.changes.join(", ")
        }
    }
}

impl Policy {
    /// Checks and compiles the rules. The error names the rule (`policy[N] "name"`).
    pub fn compile(rules: &[RuleConfig]) -> Result<Policy, String> {
        let mut out = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let label = if r.name.trim().is_empty() { format!("#{i}") } else { r.name.trim().to_string() };
            let bad = |why: String| format!("setting policy[{i}] ({label:?}): {why}");
            let clients = r.clients.iter().map(|c| Cidr::parse(c).map_err(|e| bad(format!("clients: {e}")))).collect::<Result<Vec<_>, _>>()?;
            let lower = |v: &[String]| v.iter().map(|s| s.trim().to_ascii_lowercase()).collect::<Vec<_>>();
            let options = r.options.as_deref().map(|o| lower(o).into_iter().collect::<BTreeSet<_>>());
            let file = if r.file.is_empty() {
                None
            } else {
                Some(regex::RegexBuilder::new(&r.file).size_limit(1 << 20).build().map_err(|e| bad(format!("file: {}", e.to_string().lines().last().unwrap_or("bad regex"))))?)
            };
            let blksize_max = match r.blksize_max {
                Some(b) if (8..=65464).contains(&b) => Some(b as u16),
                Some(_) => return Err(bad("blksize_max must be 8..=65464".into())),
                None => None,
            };
            let windowsize_max = match r.windowsize_max {
                Some(w) if (1..=32767).contains(&w) => Some(w as u16),
                Some(_) => return Err(bad("windowsize_max must be 1..=32767".into())),
                None => None,
            };
            let tmin = r.timeout_min.unwrap_or(1);
            let tmax = r.timeout_max.unwrap_or(255);
            if !(1..=255).contains(&tmin) || !(1..=255).contains(&tmax) || tmin > tmax {
                return Err(bad("timeout_min and timeout_max must be 1..=255 seconds, min <= max".into()));
            }
            let refuse = lower(&r.refuse);
            if let Some(x) = refuse.iter().find(|x| !REFUSABLE.contains(&x.as_str())) {
                return Err(bad(format!("refuse: {x:?} is not one of {}", REFUSABLE.join(", "))));
            }
            let acts = blksize_max.is_some() || windowsize_max.is_some() || r.timeout_min.is_some() || r.timeout_max.is_some() || !refuse.is_empty();
            if r.deny && acts {
                return Err(bad("deny = true cannot be combined with clamps or refuse".into()));
            }
            out.push(Rule { label, clients, options, has: lower(&r.has), file, blksize_max, windowsize_max, timeout: (tmin as u8, tmax as u8), refuse, deny: r.deny });
        }
        Ok(Policy { rules: out })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Applies the first rule matching the request to its options. None: no rule matched.
    pub fn apply(&self, client: IpAddr, file: &str, req: &mut Requested) -> Option<Applied> {
        let rule = self.rules.iter().find(|r| r.matches(client, file, req))?;
        let mut changes = Vec::new();
        if rule.deny {
            return Some(Applied { rule: rule.label.clone(), deny: true, changes });
        }
        for name in &rule.refuse {
            if req.names.iter().any(|n| n == name) {
                req.names.retain(|n| n != name);
                match name.as_str() {
                    "blksize" => req.blksize = None,
                    "windowsize" => req.windowsize = None,
                    "timeout" => req.timeout = None,
                    "multicast" => req.multicast = false,
                    _ => req.tsize = None,
                }
                changes.push(format!("{name} refused"));
            }
        }
        if let (Some(max), Some(b)) = (rule.blksize_max, req.blksize) {
            if b > max {
                req.blksize = Some(max);
                changes.push(format!("blksize {b}->{max}"));
            }
        }
        if let (Some(max), Some(w)) = (rule.windowsize_max, req.windowsize) {
            if w > max {
                req.windowsize = Some(max);
                changes.push(format!("windowsize {w}->{max}"));
            }
        }
        if let Some(t) = req.timeout {
            let c = t.clamp(rule.timeout.0, rule.timeout.1);
            if c != t {
                req.timeout = Some(c);
                changes.push(format!("timeout {t}->{c}"));
            }
        }
        Some(Applied { rule: rule.label.clone(), deny: false, changes })
    }
}

impl Rule {
    fn matches(&self, client: IpAddr, file: &str, req: &Requested) -> bool {
        (self.clients.is_empty() || self.clients.iter().any(|c| c.contains(client)))
            && self.options.as_ref().is_none_or(|want| want.len() == req.names.len() && req.names.iter().all(|n| want.contains(n)))
            && self.has.iter().all(|h| req.names.iter().any(|n| n == h))
            && self.file.as_ref().is_none_or(|re| re.is_match(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tftpcast_proto::options::parse;

    fn req(list: &[(&str, &str)]) -> Requested {
        parse(&list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>()).unwrap()
    }

    fn rule(f: impl FnOnce(&mut RuleConfig)) -> RuleConfig {
        let mut r = RuleConfig::default();
        f(&mut r);
        r
    }

    #[test]
    fn first_matching_rule_clamps_and_later_rules_are_ignored() {
        let p = Policy::compile(&[
            rule(|r| {
                r.name = "lab".into();
                r.clients = vec!["10.0.0.0/8".into(), "fd00::/8".into()];
                r.blksize_max = Some(1024);
                r.windowsize_max = Some(1);
            }),
            rule(|r| r.deny = true),
        ])
        .unwrap();
        let mut q = req(&[("blksize", "1468"), ("windowsize", "16"), ("tsize", "0")]);
        let a = p.apply("10.1.1.1".parse().unwrap(), "f", &mut q).unwrap();
        assert_eq!(a.rule, "lab");
        assert_eq!(a.changes, vec!["blksize 1468->1024", "windowsize 16->1"]);
        assert_eq!((q.blksize, q.windowsize), (Some(1024), Some(1)));
        let mut q = req(&[("blksize", "512")]);
        assert!(p.apply("fd00::5".parse().unwrap(), "f", &mut q).unwrap().changes.is_empty());
        let a = p.apply("192.0.2.1".parse().unwrap(), "f", &mut req(&[])).unwrap();
        assert_eq!((a.rule.as_str(), a.deny), ("#1", true));
    }

    #[test]
    fn fingerprints_exact_set_has_and_file() {
        let p = Policy::compile(&[rule(|r| {
            r.options = Some(vec!["tsize".into(), "BLKSIZE".into()]);
            r.file = "^pxelinux".into();
            r.refuse = vec!["blksize".into()];
        })])
        .unwrap();
        let mut q = req(&[("blksize", "1468"), ("tsize", "0")]);
        assert_eq!(p.apply("127.0.0.1".parse().unwrap(), "pxelinux.0", &mut q).unwrap().changes, vec!["blksize refused"]);
        assert_eq!((q.blksize, q.names.clone()), (None, vec!["tsize".to_string()]));
        assert!(p.apply("127.0.0.1".parse().unwrap(), "other", &mut req(&[("blksize", "1468"), ("tsize", "0")])).is_none());
        assert!(p.apply("127.0.0.1".parse().unwrap(), "pxelinux.0", &mut req(&[("blksize", "1468")])).is_none());
        let h = Policy::compile(&[rule(|r| {
            r.has = vec!["multicast".into()];
            r.refuse = vec!["multicast".into()];
        })])
        .unwrap();
        let mut q = req(&[("multicast", ""), ("blksize", "1024")]);
        assert_eq!(h.apply("::ffff:10.0.0.1".parse().unwrap(), "x", &mut q).unwrap().changes, vec!["multicast refused"]);
        assert!(!q.multicast);
        assert!(h.apply("10.0.0.1".parse().unwrap(), "x", &mut req(&[("blksize", "1024")])).is_none());
    }

    #[test]
    fn timeout_bounds() {
        let p = Policy::compile(&[rule(|r| {
            r.timeout_min = Some(2);
            r.timeout_max = Some(5);
        })])
        .unwrap();
        let mut q = req(&[("timeout", "1")]);
        assert_eq!(p.apply("127.0.0.1".parse().unwrap(), "x", &mut q).unwrap().changes, vec!["timeout 1->2"]);
        let mut q = req(&[("timeout", "30")]);
        p.apply("127.0.0.1".parse().unwrap(), "x", &mut q);
        assert_eq!(q.timeout, Some(5));
    }

    #[test]
    fn errors_name_the_rule() {
        let cases: Vec<(RuleConfig, &str)> = vec![
            (rule(|r| r.clients = vec!["10.0.0.0/40".into()]), "clients"),
            (rule(|r| r.blksize_max = Some(4)), "blksize_max"),
            (rule(|r| r.windowsize_max = Some(0)), "windowsize_max"),
            (rule(|r| r.refuse = vec!["rollover".into()]), "refuse"),
            (rule(|r| r.file = "(".into()), "file"),
            (rule(|r| { r.deny = true; r.blksize_max = Some(512); }), "deny"),
            (rule(|r| { r.timeout_min = Some(9); r.timeout_max = Some(3); }), "timeout"),
        ];
        for (mut r, want) in cases {
            r.name = "bad-one".into();
            let e = Policy::compile(&[RuleConfig::default(), r]).unwrap_err();
            assert!(e.contains("policy[1]") && e.contains("bad-one") && e.contains(want), "{e}");
        }
    }
}
