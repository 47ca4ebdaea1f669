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
//!
//! Mapping runs before root confinement, never instead of it: the mapped name goes through
//! `file_cache`'s normalisation and `openat2(RESOLVE_BENEATH)` like any client name, so a rule
//! can at worst name another file inside the root. Rules are compiled once, when the
//! configuration is loaded (a bad pattern is a configuration error, never a runtime panic),
//! the regex engine runs in time linear in the name, and every intermediate name is capped at
//! [`MAX_MAPPED_BYTES`], so a client cannot make a rule list do unbounded work.

use std::borrow::Cow;
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
            check_references(&re, &r.replace).map_err(|why| bad("replace", why))?;
            rules.push(Rule { re, replace: r.replace.clone(), last: r.last, global: r.global });
        }
        Ok(Mapper { backslash_to_slash: s.backslash_to_slash, rules })
    }

    /// True when no setting changes any name.
    pub fn is_identity(&self) -> bool {
        !self.backslash_to_slash && self.rules.is_empty()
    }

    /// Maps `name`; `on_rewrite(rule, before, after)` is called for each rule that changed it.
    fn map_with<'a>(&self, name: &'a str, mut on_rewrite: impl FnMut(usize, &str, &str)) -> Result<Cow<'a, str>, MapError> {
        let mut cur: Cow<'a, str> = Cow::Borrowed(name);
        if self.backslash_to_slash && cur.contains('\\') {
            cur = Cow::Owned(cur.replace('\\', "/"));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if cur.len() > MAX_MAPPED_BYTES {
                return Err(MapError::TooLong);
            }
            if !rule.re.is_match(&cur) {
                continue;
            }
            let next = rule.re.replacen(&cur, if rule.global { 0 } else { 1 }, rule.replace.as_str()).into_owned();
            on_rewrite(i + 1, &cur, &next);
            cur = Cow::Owned(next);
            if rule.last {
                break;
            }
        }
        if cur.len() > MAX_MAPPED_BYTES {
            return Err(MapError::TooLong);
        }
        Ok(cur)
    }

    /// The name `name` maps to (no logging).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn map<'a>(&self, name: &'a str) -> Result<Cow<'a, str>, MapError> {
        self.map_with(name, |_, _, _| {})
    }

    /// What the request handlers (RRQ, and WRQ) call with the raw name from the wire: maps it
    /// and logs each rewrite at info with the peer. A name that is not UTF-8 is left alone
    /// (the file cache refuses it).
    pub fn map_request<'a>(&self, name: &'a [u8], peer: SocketAddr) -> Result<Cow<'a, [u8]>, MapError> {
        if self.is_identity() {
            return Ok(Cow::Borrowed(name));
        }
        let Ok(s) = std::str::from_utf8(name) else { return Ok(Cow::Borrowed(name)) };
        let mapped = self
            .map_with(s, |rule, before, after| tracing::info!(peer = %peer, rule, original = %before, mapped = %after, "file name rewritten"))
            .inspect_err(|e| tracing::info!(peer = %peer, original = %s, error = %e, "file name not mapped"))?;
        Ok(match mapped {
            Cow::Borrowed(_) => Cow::Borrowed(name),
            Cow::Owned(m) => {
                if m != s {
                    tracing::debug!(peer = %peer, original = %s, mapped = %m, "file name mapped");
                }
                Cow::Owned(m.into_bytes())
            }
        })
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
                _ => return Err(format!("setting mapping.rewrite[{n}].{k}: unknown key (known: match, replace, last, global)")),
            };
            if !ok {
                return Err(format!("setting mapping.rewrite[{n}].{k}: must be a {}", if matches!(k.as_str(), "last" | "global") { "boolean" } else { "string" }));
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
fn check_references(re: &Regex, template: &str) -> Result<(), String> {
    let b = template.as_bytes();
    let mut i = 0;
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(m: &str, r: &str) -> RewriteRule {
        RewriteRule { pattern: m.into(), replace: r.into(), last: false, global: false }
    }

    fn mapper(backslash: bool, rules: Vec<RewriteRule>) -> Mapper {
        Mapper::new(&MappingSettings { backslash_to_slash: backslash, case_insensitive: false, rewrite: rules }).unwrap()
    }

    #[test]
    fn backslashes_become_slashes() {
        let m = mapper(true, vec![]);
        assert_eq!(m.map("boot\\x64\\wdsnbp.com").unwrap(), "boot/x64/wdsnbp.com");
        assert!(matches!(m.map("plain/name").unwrap(), Cow::Borrowed(_)));
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
        assert_eq!(&*m.map_request(b"\xff\\a", peer).unwrap(), b"\xff\\a");
        assert_eq!(&*m.map_request(b"x\\a", peer).unwrap(), b"x/b");
    }
}
