//! check_config: `tftpcast check-config`, which validates a configuration exactly as `serve`
//! would (same layers, same checks, same exit status 2 with one line naming the setting) and
//! then prints every effective setting with the layer it came from:
//!
//! ```text
//! pacing.max_rate_mbps = 800   (env TFTPCAST_PACING__MAX_RATE_MBPS)
//! server.root = "/srv/tftp"   (file /etc/tftpcast.toml)
//! ```
//!
//! Provenance is worked out from the layers themselves (the flags given on the command line,
//! the `TFTPCAST_*` variables, the keys present in the file), the strongest one winning as in
//! [`crate::config::Settings::load`]. Flags are tied to their key by the `[section.key]` their
//! help text ends with, so a new flag documented that way is covered without a table here.
//! Secrets (`cluster.key`) are printed masked.

use std::path::Path;

use clap::parser::ValueSource;

use crate::config::Validated;

/// Settings whose value is never printed.
const SECRETS: &[&str] = &["cluster.key"];

/// For each flag given on the command line, the setting it overrides and its spelling.
pub fn flags_given(cmd: &clap::Command, m: &clap::ArgMatches) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        if m.value_source(arg.get_id().as_str()) != Some(ValueSource::CommandLine) {
            continue;
        }
        let Some(help) = arg.get_help().map(|h| h.to_string()) else { continue };
        let Some(key) = help.rsplit_once('[').and_then(|(_, rest)| rest.split_once(']')).map(|(k, _)| k.trim().to_string()) else { continue };
        if crate::config::is_known_key(&key) {
            let flag = arg.get_long().map(|l| format!("--{l}")).unwrap_or_else(|| arg.get_id().to_string());
            out.push((key, flag));
        }
    }
    out
}

/// Where the effective value of `key` came from.
fn provenance(key: &str, file: Option<(&Path, &toml::Table)>, env: &[(String, String)], flags: &[(String, String)]) -> String {
    if let Some((_, flag)) = flags.iter().find(|(k, _)| k == key) {
        return format!("flag {flag}");
    }
    let from_env = env.iter().rev().find(|(var, _)| {
        var.strip_prefix("TFTPCAST_")
            .and_then(|rest| rest.split_once("__"))
            .is_some_and(|(s, k)| format!("{}.{}", s.to_ascii_lowercase(), k.to_ascii_lowercase()) == key)
    });
    if let Some((var, _)) = from_env {
        return format!("env {var}");
    }
    if let Some((path, table)) = file {
        let (section, k) = key.split_once('.').unwrap_or((key, ""));
        if table.get(section).and_then(|s| s.as_table()).is_some_and(|s| s.contains_key(k)) {
            return format!("file {}", path.display());
        }
    }
    "default".into()
}

/// The report, one line per setting, in the order of the configuration file's sections.
pub fn report(v: &Validated, file: Option<&Path>, env: &[(String, String)], flags: &[(String, String)]) -> Result<String, String> {
    let table = match toml::Value::try_from(&v.settings) {
        Ok(toml::Value::Table(t)) => t,
        Ok(_) => return Err("settings are not a table".into()),
        Err(e) => return Err(format!("cannot print the settings: {e}")),
    };
    // The file parsed already when the configuration loaded; read it again for its keys.
    let file_table = match file {
        Some(p) => Some((p, std::fs::read_to_string(p).map_err(|e| e.to_string())?.parse::<toml::Table>().map_err(|e| e.to_string())?)),
        None => None,
    };
    let mut out = String::new();
    for (section, keys) in &table {
        if let (toml::Value::Array(rules), "policy") = (keys, section.as_str()) {
            // `[[policy]]` rules come only from the file; one line each, in order.
            for (i, r) in rules.iter().enumerate() {
                let inline = toml::to_string(r).unwrap_or_default().lines().collect::<Vec<_>>().join(", ");
                let from = file.map(|p| format!("file {}", p.display())).unwrap_or_else(|| "default".into());
                out.push_str(&format!("policy[{}] = {{ {inline} }}   ({from})\n", i + 1));
            }
            continue;
        }
        let Some(keys) = keys.as_table() else { continue };
        for (k, value) in keys {
            let key = format!("{section}.{k}");
            let shown = match value {
                toml::Value::String(s) if SECRETS.contains(&key.as_str()) && !s.is_empty() => "\"********\"".to_string(),
                toml::Value::Integer(m) if key == "uploads.file_mode" => format!("0o{m:o}"),
                other => other.to_string(),
            };
            let from = provenance(&key, file_table.as_ref().map(|(p, t)| (*p, t)), env, flags);
            out.push_str(&format!("{key} = {shown}   ({from})\n"));
        }
    }
    Ok(out)
}
