//! mapping: turns the file name a client sent into the name looked up under the root.
//!
//! Boot loaders do not agree on how to spell a path: Windows ones send `boot\x64\wdsnbp.com`,
//! PXE ROMs send `/pxelinux.0`, pxelinux probes `pxelinux.cfg/01-<mac>` before `default`. The
//! `[mapping]` settings let an operator serve them all from one tree without symlink farms:
//!
//! 1. `backslash_to_slash`: every `\` becomes `/`.
//! 2. `[[mapping.rewrite]]` rules, in order, like tftpd-hpa's remap file: the first match of
//!    `match` (a `regex` crate pattern) is replaced by `replace` (`$1`, `${name}`; every match
//!    with `global = true`); a rule with `last = true` that matched ends the list.
//! 3. **Per-client files** (dnsmasq's `tftp-unique-root`, tftpd-hpa's `\i`, pxelinux's lookup
//!    by hex IP): a replacement may use `${ip}` (the client's address), `${hexip}` (its IPv4
//!    address as 8 upper-case hex digits, as pxelinux asks) and `${mac}` (its MAC from the
//!    neighbour table, `aa-bb-cc-dd-ee-ff`; pxelinux's name is `01-${mac}`). A rule whose
//!    variable is unknown for this client (no neighbour entry, `hexip` of an IPv6 client) does
//!    not match; `clients = ["10.1.0.0/16", ...]` limits a rule to those addresses. A name a
//!    per-client rule produced that does not exist falls through: the request is served as if
//!    that rule had not matched (the next rules, or the name itself).
//!
//! Mapping runs before root confinement, never instead of it: the mapped name goes through
//! `file_cache`'s normalisation and `openat2(RESOLVE_BENEATH)` like any client name, so a rule
//! can at worst name another file inside the root. Rules are compiled once, when the
//! configuration is loaded (a bad pattern is a configuration error, never a runtime panic),
//! the regex engine runs in time linear in the name, and every intermediate name is capped at
//! [`MAX_MAPPED_BYTES`], so a client cannot make a rule list do unbounded work.

use std::net::SocketAddr;

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};


/// Longest name a mapping may produce (the longest name `file_cache` accepts).
pub const MAX_MAPPED_BYTES: usize = 1024;
/// Compiled size cap of one pattern: generous for any file-name rule, and keeps a typo like
/// `a{100000}` from eating memory at start-up.
const MAX_PATTERN_SIZE: usize = 1 << 20;
/// Longest replacement template accepted.
const MAX_REPLACE_BYTES: usize = 1024;

/// One `[[mapping.rewrite]]` entry as written in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteRule {
    /// Regular expression matched against the name (after `backslash_to_slash`).
    #[serde(rename = "match")]
    pub pattern: String,
    /// Replacement for the match: `$1`, `${1}`, `${name}` insert groups, `$$` is a `$`.
    pub replace: String,
    /// Stop after this rule when it matched.
    #[serde(default)]
    pub last: bool,
    /// Replace every match instead of the first.
    #[serde(default)]
    pub global: bool,
    /// Client address ranges the rule applies to (`ADDR/LEN` or an address); empty: every
    /// client.
    #[serde(default)]
    pub clients: Vec<String>,
}

/// The `[mapping]` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSettings {
    pub backslash_to_slash: bool,
    pub case_insensitive: bool,
    #[serde(default)]
    pub rewrite: Vec<RewriteRule>,
}

#[derive(Debug, Clone)]
struct Rule {
    re: Regex,
    replace: String,
    last: bool,
    global: bool,
    clients: Vec<crate::net::Cidr>,
    /// The replacement uses `${ip}`, `${hexip}` or `${mac}`: its result is only a candidate.
    per_client: bool,
}

/// The variables a replacement may take from the client.
const CLIENT_VARS: [&str; 3] = ["ip", "hexip", "mac"];
/// Names tried for one request at most: a per-client result, its fall-backs.
pub const MAX_CANDIDATES: usize = 8;

/// What per-client rules know of the client that asked.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    /// Its address; `None`: nothing is known of the client.
    pub ip: Option<std::net::IpAddr>,
    /// Its hardware address, when known (see [`neighbour_mac`]).
    pub mac: Option<[u8; 6]>,
}

impl Client {
    /// The client at `peer`; its MAC is looked up only when `with_mac`.
    pub fn at(peer: SocketAddr, with_mac: bool) -> Client {
        let ip = peer.ip().to_canonical();
        let mac = match ip {
            std::net::IpAddr::V4(v4) if with_mac => neighbour_mac(v4),
            _ => None,
        };
        Client { ip: Some(ip), mac }
    }

    fn var(&self, name: &str) -> Option<String> {
        match (name, self.ip?) {
            ("ip", ip) => Some(ip.to_string()),
            ("hexip", std::net::IpAddr::V4(v4)) => Some(format!("{:08X}", u32::from(v4))),
            ("mac", _) => self.mac.map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join("-")),
            _ => None,
        }
    }

    fn is_in(&self, ranges: &[crate::net::Cidr]) -> bool {
        ranges.is_empty() || self.ip.is_some_and(|ip| ranges.iter().any(|c| c.contains(ip)))
    }
}

/// The hardware address of an IPv4 neighbour, from the kernel's ARP table (`/proc/net/arp`,
/// of this process's network namespace). Entries still resolving (all zeros) are unknown.
pub fn neighbour_mac(ip: std::net::Ipv4Addr) -> Option<[u8; 6]> {
    let table = std::fs::read_to_string("/proc/net/arp").ok()?;
    let want = ip.to_string();
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 || f[0] != want {
            return None;
        }
        let bytes: Vec<u8> = f[3].split(':').filter_map(|h| u8::from_str_radix(h, 16).ok()).collect();
        let mac: [u8; 6] = bytes.try_into().ok()?;
        (mac != [0; 6]).then_some(mac)
    })
}

/// Why a name cannot be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("name too long after mapping")]
    TooLong,
}

/// The compiled `[mapping]` rules. Cheap to clone (patterns are reference counted).
#[derive(Debug, Clone, Default)]
pub struct Mapper {
    backslash_to_slash: bool,
    rules: Vec<Rule>,
}

impl Mapper {
    /// Compiles the rules. A bad pattern or replacement is an error naming the rule
    /// (`mapping.rewrite[N]`, counted from 1 as in the file), for the configuration to report.
    pub fn new(s: &MappingSettings) -> Result<Mapper, String> {
        let mut rules = Vec::with_capacity(s.rewrite.len());
        for (i, r) in s.rewrite.iter().enumerate() {
            let bad = |field: &str, why: String| format!("setting mapping.rewrite[{}].{field}: {why}", i + 1);
            let re = RegexBuilder::new(&r.pattern)
                .size_limit(MAX_PATTERN_SIZE)
                .build()
                .map_err(|e| bad("match", format!("invalid regex {:?}: {}", r.pattern, one_line(&e))))?;
            if r.replace.len() > MAX_REPLACE_BYTES {
                return Err(bad("replace", format!("longer than {MAX_REPLACE_BYTES} bytes")));
            }
            if let Some(v) = re.capture_names().flatten().find(|n| CLIENT_VARS.contains(n)) {
                return Err(bad("match", format!("a group may not be named {v:?}: ${{{v}}} is the client's")));
            }
            let per_client = check_references(&re, &r.replace).map_err(|why| bad("replace", why))?;
            let clients = r.clients.iter().map(|c| crate::net::Cidr::parse(c)).collect::<Result<Vec<_>, _>>().map_err(|why| bad("clients", why))?;
            rules.push(Rule { re, replace: r.replace.clone(), last: r.last, global: r.global, clients, per_client });
        }
        Ok(Mapper { backslash_to_slash: s.backslash_to_slash, rules })
    }

    /// Whether some rule needs the client's MAC address.
    pub fn uses_mac(&self) -> bool {
        self.rules.iter().any(|r| r.replace.contains("${mac}"))
    }

    /// The names to try for `name` asked by `client`, best first: what every rule that
    /// applies makes of it, then, for each per-client rule that matched, the name as if it had
    /// not (at most [`MAX_CANDIDATES`]). `on_rewrite(rule, before, after)` sees each rewrite.
    fn candidates(&self, name: &str, client: &Client, on_rewrite: &mut dyn FnMut(usize, &str, &str)) -> Result<Vec<String>, MapError> {
        let mut cur = name.to_string();
        if self.backslash_to_slash && cur.contains('\\') {
            cur = cur.replace('\\', "/");
        }
        // The name without any per-client rule is always the last resort, whatever the cap.
        let mut plain = Vec::new();
        self.expand(0, cur.clone(), client, &mut plain, &mut |_, _, _| {}, false);
        let Some(plain) = plain.pop() else { return Err(MapError::TooLong) };
        let mut out = Vec::new();
        self.expand(0, cur, client, &mut out, on_rewrite, true);
        out.retain(|n| *n != plain);
        out.truncate(MAX_CANDIDATES - 1);
        out.push(plain);
        Ok(out)
    }

    /// Applies rules `start..` to `cur`, pushing the results to `out`; with `fork`, a
    /// per-client rule that matches forks (first the name with it applied, then without),
    /// without it per-client rules are skipped.
    fn expand(&self, start: usize, mut cur: String, client: &Client, out: &mut Vec<String>, on_rewrite: &mut dyn FnMut(usize, &str, &str), fork: bool) {
        for (i, rule) in self.rules.iter().enumerate().skip(start) {
            if cur.len() > MAX_MAPPED_BYTES {
                return; // this branch names nothing servable
            }
            if !client.is_in(&rule.clients) || (rule.per_client && !fork) {
                continue;
            }
            if !rule.re.is_match(&cur) {
                continue;
            }
            let Some(template) = rule.template_for(client) else { continue };
            let next = rule.re.replacen(&cur, if rule.global { 0 } else { 1 }, template.as_str()).into_owned();
            on_rewrite(i + 1, &cur, &next);
            if rule.per_client {
                if out.len() + 1 >= MAX_CANDIDATES {
                    continue;
                }
                if rule.last {
                    push_within(out, next);
                } else {
                    self.expand(i + 1, next, client, out, on_rewrite, true);
                }
                continue; // and the fall-back: as if this rule had not matched
            }
            cur = next;
            if rule.last {
                break;
            }
        }
        push_within(out, cur);
    }

    /// True when no setting changes any name.
    pub fn is_identity(&self) -> bool {
        !self.backslash_to_slash && self.rules.is_empty()
    }

    /// The name `name` maps to for a client nothing is known of (rules for given clients and
    /// per-client rules do not match); no logging.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn map(&self, name: &str) -> Result<String, MapError> {
        let nobody = Client { ip: None, mac: None };
        self.candidates(name, &nobody, &mut |_, _, _| {}).map(|mut c| c.swap_remove(0))
    }

    /// What the request handlers (RRQ, and WRQ) call with the raw name from the wire: maps it
    /// and logs each rewrite at info with the peer. A name that is not UTF-8 is left alone
    /// (the file cache refuses it).
    pub fn map_request(&self, name: &[u8], peer: SocketAddr) -> Result<Vec<Vec<u8>>, MapError> {
        if self.is_identity() {
            return Ok(vec![name.to_vec()]);
        }
        let Ok(s) = std::str::from_utf8(name) else { return Ok(vec![name.to_vec()]) };
        let client = Client::at(peer, self.uses_mac());
        let mut log = |rule, before: &str, after: &str| tracing::info!(peer = %peer, rule, original = %before, mapped = %after, "file name rewritten");
        let names = self.candidates(s, &client, &mut log).inspect_err(|e| tracing::info!(peer = %peer, original = %s, error = %e, "file name not mapped"))?;
        if names.len() > 1 || names[0] != s {
            tracing::debug!(peer = %peer, original = %s, mapped = ?names, "file name mapped");
        }
        Ok(names.into_iter().map(String::into_bytes).collect())
    }
}

impl Rule {
    /// The replacement with the client's variables filled in; `None` when one is unknown for
    /// this client (the rule then does not match).
    fn template_for(&self, client: &Client) -> Option<String> {
        if !self.per_client {
            return Some(self.replace.clone());
        }
        let mut t = self.replace.clone();
        for v in CLIENT_VARS {
            let key = format!("${{{v}}}");
            if t.contains(&key) {
                t = t.replace(&key, &client.var(v)?);
            }
        }
        Some(t)
    }
}

/// Adds a candidate name unless it is too long or already there.
fn push_within(out: &mut Vec<String>, name: String) {
    if name.len() <= MAX_MAPPED_BYTES && !out.contains(&name) && out.len() < MAX_CANDIDATES {
        out.push(name);
    }
}

/// Checks the shape of `[[mapping.rewrite]]` in a file, naming the rule and key, before serde
/// (whose messages name neither).
pub fn check_rule_tables(rules: &toml::Value) -> Result<(), String> {
    let Some(rules) = rules.as_array() else { return Err("setting mapping.rewrite: must be a list of [[mapping.rewrite]] tables".into()) };
    for (i, r) in rules.iter().enumerate() {
        let n = i + 1;
        let Some(r) = r.as_table() else { return Err(format!("setting mapping.rewrite[{n}]: must be a table with match and replace")) };
        for (k, v) in r {
            let ok = match k.as_str() {
                "match" | "replace" => v.is_str(),
                "last" | "global" => v.is_bool(),
                "clients" => v.as_array().is_some_and(|a| a.iter().all(|c| c.is_str())),
                _ => return Err(format!("setting mapping.rewrite[{n}].{k}: unknown key (known: match, replace, last, global, clients)")),
            };
            if !ok {
                let want = match k.as_str() {
                    "last" | "global" => "boolean",
                    "clients" => "list of address ranges",
                    _ => "string",
                };
                return Err(format!("setting mapping.rewrite[{n}].{k}: must be a {want}"));
            }
        }
        for k in ["match", "replace"] {
            if !r.contains_key(k) {
                return Err(format!("setting mapping.rewrite[{n}].{k}: missing"));
            }
        }
    }
    Ok(())
}

/// The regex crate's messages span several lines (pattern, caret, reason): keep the reason.
fn one_line(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error: ").map(str::to_owned))
        .unwrap_or_else(|| text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Refuses group references that do not exist. The regex crate silently expands them to
/// nothing, and reads `$1a` as a group named `1a`: both are typos worth a start-up error.
/// Returns whether the template uses a client variable (`${ip}`, `${hexip}`, `${mac}`).
fn check_references(re: &Regex, template: &str) -> Result<bool, String> {
    let b = template.as_bytes();
    let mut i = 0;
    let mut per_client = false;
    while i < b.len() {
        if b[i] != b'$' {
            i += 1;
            continue;
        }
        i += 1;
        let name = match b.get(i) {
            Some(b'$') => {
                i += 1;
                continue;
            }
            Some(b'{') => {
                let Some(end) = template[i..].find('}') else { return Err("unclosed `${` (write `$$` for a literal `$`)".into()) };
                let n = &template[i + 1..i + end];
                i += end + 1;
                if CLIENT_VARS.contains(&n) {
                    per_client = true;
                    continue;
                }
                n
            }
            _ => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                if start == i {
                    continue; // a lone `$` is literal
                }
                &template[start..i]
            }
        };
        let exists = match name.parse::<usize>() {
            Ok(n) => n < re.captures_len(),
            Err(_) => re.capture_names().flatten().any(|c| c == name),
        };
        if !exists {
            let digits: String = name.chars().take_while(|c| c.is_ascii_digit()).collect();
            let hint = if !digits.is_empty() && digits.len() < name.len() {
                format!(" (write `${{{digits}}}` to insert group {digits} before other characters)")
            } else {
                String::new()
            };
            return Err(format!("{:?} refers to group {name:?}, which the pattern does not have{hint}", template));
        }
    }
    Ok(per_client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(m: &str, r: &str) -> RewriteRule {
        RewriteRule { pattern: m.into(), replace: r.into(), last: false, global: false, clients: vec![] }
    }

    fn mapper(backslash: bool, rules: Vec<RewriteRule>) -> Mapper {
        Mapper::new(&MappingSettings { backslash_to_slash: backslash, case_insensitive: false, rewrite: rules }).unwrap()
    }

    #[test]
    fn backslashes_become_slashes() {
        let m = mapper(true, vec![]);
        assert_eq!(m.map("boot\\x64\\wdsnbp.com").unwrap(), "boot/x64/wdsnbp.com");
        assert_eq!(m.map("plain/name").unwrap(), "plain/name");
        let off = mapper(false, vec![]);
        assert_eq!(off.map("boot\\x64\\wdsnbp.com").unwrap(), "boot\\x64\\wdsnbp.com");
        assert!(off.is_identity());
    }

    #[test]
    fn rules_apply_in_order_and_last_stops() {
        let m = mapper(true, vec![rule(r"^pxelinux\.cfg/01-(.*)$", "pxelinux.cfg/mac/$1"), rule("^pxelinux.cfg/mac/", "cfg/")]);
        assert_eq!(m.map("pxelinux.cfg/01-aa-bb").unwrap(), "cfg/aa-bb");
        let mut first = rule(r"^pxelinux\.cfg/01-(.*)$", "pxelinux.cfg/mac/$1");
        first.last = true;
        let m = mapper(true, vec![first, rule("^pxelinux.cfg/mac/", "cfg/")]);
        assert_eq!(m.map("pxelinux.cfg/01-aa-bb").unwrap(), "pxelinux.cfg/mac/aa-bb");
        // `last` only stops when its rule matched.
        assert_eq!(m.map("pxelinux.cfg/mac/x").unwrap(), "cfg/x");
        // Rules see the name after backslash conversion.
        assert_eq!(m.map("pxelinux.cfg\\01-cc").unwrap(), "pxelinux.cfg/mac/cc");
    }

    #[test]
    fn first_match_unless_global_and_named_groups() {
        let m = mapper(false, vec![rule("a", "b")]);
        assert_eq!(m.map("aaa").unwrap(), "baa");
        let mut g = rule("a", "b");
        g.global = true;
        assert_eq!(mapper(false, vec![g]).map("aaa").unwrap(), "bbb");
        let m = mapper(false, vec![rule(r"^(?P<arch>x64|x86)/(?P<f>.*)$", "boot/${arch}/${f}$$")]);
        assert_eq!(m.map("x64/wdsnbp.com").unwrap(), "boot/x64/wdsnbp.com$");
    }

    #[test]
    fn bad_rules_are_config_errors_naming_the_rule() {
        let e = Mapper::new(&MappingSettings { backslash_to_slash: true, case_insensitive: false, rewrite: vec![rule("ok", "x"), rule("(unclosed", "x")] }).unwrap_err().to_string();
        assert!(e.starts_with("setting mapping.rewrite[2].match: invalid regex \"(unclosed\""), "{e}");
        assert!(!e.contains('\n'), "{e}");
        for (m, r) in [("(a)", "$2"), ("(a)", "$1a"), ("(a)", "${nope}"), ("(a)", "${1")] {
            let e = Mapper::new(&MappingSettings { backslash_to_slash: true, case_insensitive: false, rewrite: vec![rule(m, r)] }).unwrap_err().to_string();
            assert!(e.starts_with("setting mapping.rewrite[1].replace: "), "{m} -> {r}: {e}");
        }
        for (m, r) in [("(a)", "$1"), ("(a)", "${1}a"), ("a", "$"), ("a", "cost $$5"), ("(?P<x>a)", "$x")] {
            assert!(Mapper::new(&MappingSettings { backslash_to_slash: true, case_insensitive: false, rewrite: vec![rule(m, r)] }).is_ok(), "{m} -> {r}");
        }
        let e = Mapper::new(&MappingSettings { backslash_to_slash: true, case_insensitive: false, rewrite: vec![rule("a{1000}{1000}{1000}", "x")] }).unwrap_err().to_string();
        assert!(e.contains("mapping.rewrite[1].match"), "{e}");
    }

    #[test]
    fn growth_is_capped() {
        let mut g = rule("", "xxxxxxxx");
        g.global = true;
        let m = mapper(false, vec![g.clone(), g.clone(), g]);
        assert_eq!(m.map("abc").unwrap_err(), MapError::TooLong);
        let m = mapper(false, vec![rule("^", "y")]);
        assert_eq!(m.map(&"a".repeat(MAX_MAPPED_BYTES - 1)).unwrap().len(), MAX_MAPPED_BYTES);
        assert_eq!(m.map(&"a".repeat(MAX_MAPPED_BYTES)).unwrap_err(), MapError::TooLong);
    }

    #[test]
    fn map_request_leaves_non_utf8_alone() {
        let m = mapper(true, vec![rule("a", "b")]);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(m.map_request(b"\xff\\a", peer).unwrap(), vec![b"\xff\\a".to_vec()]);
        assert_eq!(m.map_request(b"x\\a", peer).unwrap(), vec![b"x/b".to_vec()]);
    }

    fn client(ip: &str, mac: Option<[u8; 6]>) -> Client {
        Client { ip: Some(ip.parse().unwrap()), mac }
    }

    fn names(m: &Mapper, name: &str, c: &Client) -> Vec<String> {
        m.candidates(name, c, &mut |_, _, _| {}).unwrap()
    }

    #[test]
    fn per_client_variables_give_a_candidate_and_its_fall_back() {
        let m = mapper(true, vec![rule("^pxelinux.cfg/default$", "pxelinux.cfg/${hexip}"), rule("^(.*)$", "hosts/${ip}/$1")]);
        let c = client("192.168.0.10", None);
        // Both per-client rules apply, then each fall-back in order, the plain name last.
        assert_eq!(
            names(&m, "pxelinux.cfg/default", &c),
            ["hosts/192.168.0.10/pxelinux.cfg/C0A8000A", "pxelinux.cfg/C0A8000A", "hosts/192.168.0.10/pxelinux.cfg/default", "pxelinux.cfg/default"]
        );
        // hexip is unknown for IPv6: that rule does not match.
        assert_eq!(names(&m, "pxelinux.cfg/default", &client("fd00::1", None)), ["hosts/fd00::1/pxelinux.cfg/default", "pxelinux.cfg/default"]);
        // A client nothing is known of never matches a per-client rule.
        assert_eq!(m.map("pxelinux.cfg/default").unwrap(), "pxelinux.cfg/default");
    }

    #[test]
    fn mac_rules_match_only_known_neighbours_and_clients_limit_rules() {
        let mut r = rule("^pxelinux.cfg/default$", "pxelinux.cfg/01-${mac}");
        r.last = true;
        let mut lab = rule("^boot.ipxe$", "lab/boot.ipxe");
        lab.clients = vec!["10.1.0.0/16".into(), "fd00::/8".into()];
        let m = mapper(false, vec![r, lab]);
        assert!(m.uses_mac());
        let known = client("10.1.2.3", Some([0xaa, 0xbb, 0xcc, 0, 1, 0xff]));
        assert_eq!(names(&m, "pxelinux.cfg/default", &known), ["pxelinux.cfg/01-aa-bb-cc-00-01-ff", "pxelinux.cfg/default"]);
        assert_eq!(names(&m, "pxelinux.cfg/default", &client("10.1.2.3", None)), ["pxelinux.cfg/default"]);
        assert_eq!(names(&m, "boot.ipxe", &known), ["lab/boot.ipxe"]);
        assert_eq!(names(&m, "boot.ipxe", &client("::ffff:10.1.9.9".parse::<std::net::Ipv6Addr>().unwrap().to_canonical().to_string().as_str(), None)), ["lab/boot.ipxe"]);
        assert_eq!(names(&m, "boot.ipxe", &client("10.2.0.1", None)), ["boot.ipxe"]);
        assert_eq!(m.map("boot.ipxe").unwrap(), "boot.ipxe");
    }

    #[test]
    fn client_variables_are_checked_at_load() {
        let bad_group = Mapper::new(&MappingSettings { backslash_to_slash: true, case_insensitive: false, rewrite: vec![rule("(?P<ip>.*)", "${ip}")] }).unwrap_err();
        assert!(bad_group.contains("mapping.rewrite[1].match"), "{bad_group}");
        let unbraced = Mapper::new(&MappingSettings { backslash_to_slash: true, case_insensitive: false, rewrite: vec![rule("a", "$ip")] }).unwrap_err();
        assert!(unbraced.contains("mapping.rewrite[1].replace"), "{unbraced}");
        let mut r = rule("a", "b");
        r.clients = vec!["10.0.0.0/33".into()];
        let e = Mapper::new(&MappingSettings { backslash_to_slash: true, case_insensitive: false, rewrite: vec![r] }).unwrap_err();
        assert!(e.starts_with("setting mapping.rewrite[1].clients:"), "{e}");
    }

    #[test]
    fn candidates_are_bounded() {
        let rules = (0..20).map(|i| rule("^(.*)$", &format!("{i}/${{ip}}/$1"))).collect();
        let m = mapper(false, rules);
        let c = names(&m, "f", &client("10.0.0.1", None));
        assert!(c.len() <= MAX_CANDIDATES && c.last().unwrap() == "f", "{c:?}");
    }
}
