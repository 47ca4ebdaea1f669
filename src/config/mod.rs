//! Configuration: embedded defaults (`config/default.toml`) < `--config FILE` < environment
//! `TFTPCAST_<SECTION>__<KEY>` < command-line flags. A bad value becomes a one-line
//! [`ConfigError`] naming the setting; `main` exits 2 with it.

pub mod check;
pub mod identity;
pub mod policy;


use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The defaults, compiled in so `tftpcast serve --root DIR` needs no file.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Environment: TFTPCAST_SECTION__KEY, as (setting, value). Parsed by hand so values keep
/// their case and lists (server.listen, cluster.peers) can be given comma-separated.
fn env_values(env: impl IntoIterator<Item = (String, String)>) -> Result<Vec<(String, config::Value)>, ConfigError> {
    let mut out = Vec::new();
    for (k, v) in env {
        let Some(rest) = k.strip_prefix("TFTPCAST_") else { continue };
        let Some((section, key)) = rest.split_once("__") else { continue };
        let path = format!("{}.{}", section.to_ascii_lowercase(), key.to_ascii_lowercase());
        if !is_known_key(&path) {
            return Err(ConfigError(format!("setting {path}: unknown key (environment variable {k})")));
        }
        if path == "mapping.rewrite" {
            return Err(ConfigError(format!("setting {path}: rewrite rules can only be given in a file (environment variable {k})")));
        }
        let value: config::Value = if path == "server.listen" || path == "cluster.peers" {
            v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect::<Vec<String>>().into()
        } else if bool_keys().contains(&path) {
            // Only true or false: the config crate would also read yes/on/1 as true, and a
            // typo such as "ture" should not silently mean something.
            match v.as_str() {
                "true" => true.into(),
                "false" => false.into(),
                _ => return Err(ConfigError(format!("setting {path}: {v:?} is not true or false (environment variable {k})"))),
            }
        } else {
            v.into()
        };
        out.push((path, value));
    }
    Ok(out)
}

impl Overrides {
    /// The settings the flags give, as (setting, value).
    fn values(&self) -> Vec<(String, config::Value)> {
        let mut out: Vec<(&str, config::Value)> = Vec::new();
        let o = self;
        if let Some(r) = &o.root {
            out.push(("server.root", r.to_string_lossy().into_owned().into()));
        }
        if !o.listen.is_empty() {
            out.push(("server.listen", o.listen.clone().into()));
        }
        if o.single_port {
            out.push(("server.single_port", true.into()));
        }
        let strings = [
            ("server.tid_port_range", &o.tid_port_range),
            ("log.format", &o.log_format),
            ("log.level", &o.log_level),
            ("multicast.range", &o.multicast_range),
            ("multicast.interface", &o.multicast_interface),
            ("cluster.node_id", &o.node_id),
            ("cluster.listen", &o.cluster_listen),
            ("cluster.advertise", &o.advertise),
            ("server.metrics_listen", &o.metrics_listen),
            ("server.user", &o.user),
            ("server.group", &o.group),
        ];
        out.extend(strings.into_iter().filter_map(|(k, v)| v.clone().map(|v| (k, v.into()))));
        let numbers = [
            ("pacing.max_rate_mbps", o.max_rate_mbps),
            ("log.state_interval_s", o.state_interval_s),
            ("multicast.port", o.multicast_port.map(u64::from)),
            ("multicast.start_delay_ms", o.start_delay_ms),
        ];
        out.extend(numbers.into_iter().filter_map(|(k, v)| v.map(|v| (k, v.into()))));
        if !o.peers.is_empty() {
            out.push(("cluster.peers", o.peers.clone().into()));
        }
        if let Some(v) = o.allow_write {
            out.push(("uploads.enabled", v.into()));
        }
        out.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

/// An error naming the setting: `setting KEY: WHY`.
fn bad<T>(key: &str, why: String) -> Result<T, ConfigError> {
    Err(ConfigError(format!("setting {key}: {why}")))
}

/// [`bad`] with `why` unless `ok`: one line for each rule a setting's value must keep.
fn ensure(ok: bool, key: &str, why: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        bad(key, why.into())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: Server,
    pub transfer: Transfer,
    pub limits: Limits,
    pub files: Files,
    pub uploads: Uploads,
    pub pacing: Pacing,
    pub multicast: Multicast,
    pub cluster: Cluster,
    pub log: Log,
    pub mapping: crate::fs::mapping::MappingSettings,
    /// Client option rules (`[[policy]]`), first match applies.
    #[serde(default)]
    pub policy: Vec<crate::config::policy::RuleConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub node_id: String,
    pub listen: String,
    pub advertise: String,
    pub peers: Vec<String>,
    pub key: String,
    pub key_file: String,
}

/// The cluster settings, parsed; present only when `cluster.listen` is set.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub node_id: String,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub peers: Vec<SocketAddr>,
    pub key: Vec<u8>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Multicast {
    pub enabled: bool,
    pub range: String,
    pub port: u16,
    pub tid_port_base: u16,
    pub interface: String,
    pub ttl: u32,
    pub start_delay_ms: u64,
    pub start_min_clients: usize,
    pub window: u16,
    pub master_retries: u32,
    pub slow_master_repairs: u32,
    pub lone_member_unicast: bool,
    pub probe_blocks: u32,
    pub rate_control: bool,
    pub rate_floor_kbps: u64,
    pub rate_loss_threshold_pct: u32,
    pub rate_decrease_pct: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub root: PathBuf,
    pub listen: Vec<String>,
    pub tid_port_range: String,
    pub single_port: bool,
    pub shutdown_grace_s: u64,
    /// `ADDR:PORT` of the Prometheus `/metrics` endpoint; empty: none.
    #[serde(default)]
    pub metrics_listen: String,
    /// User (name or number) to switch to after binding, when started as root; empty: stay.
    #[serde(default)]
    pub user: String,
    /// Group to switch to after binding; empty: the user's primary group.
    #[serde(default)]
    pub group: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    pub timeout_ms: u64,
    pub min_timeout_ms: u64,
    pub max_timeout_ms: u64,
    pub load_knee_per_core: u32,
    pub max_retries: u32,
    pub min_give_up_s: u64,
    pub max_blksize: u16,
    pub max_windowsize: u16,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_sessions_per_client: usize,
    pub max_half_open_per_client: usize,
    pub max_requests_per_s: u32,
    pub max_requests_per_s_per_client: u32,
    pub defer_queue: usize,
    pub defer_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Files {
    pub cache_max_bytes: u64,
    pub max_file_bytes: u64,
}

/// `[uploads]`: write requests (see `upload_store`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Uploads {
    pub enabled: bool,
    pub overwrite: bool,
    pub max_bytes: u64,
    pub dir: String,
    #[serde(deserialize_with = "file_mode")]
    pub file_mode: u32,
}

/// A permission mode: a TOML integer (`0o640`) or, from the environment, a string read as
/// octal (`"0o640"`, `"0640"`, `"640"`).
fn file_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Int(u32),
        Text(String),
    }
    match Mode::deserialize(d)? {
        Mode::Int(v) => Ok(v),
        Mode::Text(t) => {
            let t = t.trim();
            let digits = t.strip_prefix("0o").unwrap_or(t);
            u32::from_str_radix(digits, 8).map_err(|_| serde::de::Error::custom(format!("file_mode {t:?} is not an octal mode")))
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pacing {
    pub max_rate_mbps: u64,
    pub session_max_rate_mbps: u64,
    pub lease_ms: u64,
    pub adaptive: bool,
    pub floor_kbps: u64,
    pub ceiling_mbps: u64,
    pub increase_mbps: u64,
    pub decrease_pct: u64,
    pub loss_threshold_pct: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub format: String,
    pub level: String,
    pub state_interval_s: u64,
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub root: Option<PathBuf>,
    pub listen: Vec<String>,
    pub tid_port_range: Option<String>,
    /// `--single-port`: only ever true (the flag cannot turn the setting off).
    pub single_port: bool,
    pub max_rate_mbps: Option<u64>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub state_interval_s: Option<u64>,
    pub multicast_range: Option<String>,
    pub multicast_port: Option<u16>,
    pub multicast_interface: Option<String>,
    pub start_delay_ms: Option<u64>,
    pub node_id: Option<String>,
    pub cluster_listen: Option<String>,
    pub advertise: Option<String>,
    pub peers: Vec<String>,
    /// `--allow-write` (true) / `--read-only` (false) [uploads.enabled].
    pub allow_write: Option<bool>,
    pub metrics_listen: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
}

/// Everything checked and parsed, ready for the node.
#[derive(Debug, Clone)]
pub struct Validated {
    pub settings: Settings,
    pub listen: Vec<SocketAddr>,
    pub tid_port_range: Option<(u16, u16)>,
    /// First address and size of the multicast range.
    pub multicast_pool: (std::net::Ipv4Addr, u32),
    pub multicast_interface: Option<std::net::Ipv4Addr>,
    pub cluster: Option<ClusterSettings>,
    /// `uploads.dir`, normalised ("" = the whole root).
    pub upload_dir: String,
    /// The compiled `[mapping]` rules.
    pub mapper: crate::fs::mapping::Mapper,
    pub policy: crate::config::policy::Policy,
    pub metrics_listen: Option<SocketAddr>,
    /// Whom to switch to after binding (`server.user`, `server.group`).
    pub run_as: Option<identity::RunAs>,
}

impl Settings {
    /// Builds the layered configuration. `env` is the process environment (passed in so
    /// tests can supply their own).
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>, o: &Overrides) -> Result<Validated, ConfigError> {
        use config::{Config, File, FileFormat};
        let mut b = Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ConfigError(format!("config file {}: not found or not a file", f.display())));
            }
            check_file_keys(f)?;
            b = b.add_source(File::from(f).format(FileFormat::Toml));
        }
        for (path, v) in env_values(env)?.into_iter().chain(o.values()) {
            b = b.set_override(path, v).map_err(|e| ConfigError(e.to_string()))?;
        }
        let cfg = b.build().map_err(|e| ConfigError(format!("configuration: {e}")))?;
        let settings: Settings = cfg.try_deserialize().map_err(|e| ConfigError(format!("configuration: {e}")))?;
        settings.validate()
    }

    fn validate(self) -> Result<Validated, ConfigError> {
        let (listen, tid_port_range, metrics_listen) = self.server_addresses()?;
        self.check_transfer()?;
        self.check_limits()?;
        self.check_pacing()?;
        let (multicast_pool, multicast_interface) = self.multicast_addresses(tid_port_range)?;
        let policy = crate::config::policy::Policy::compile(&self.policy).map_err(ConfigError)?;
        let cluster = self.cluster_settings()?;
        let upload_dir = self.upload_dir()?;
        self.check_log()?;
        let mapper = crate::fs::mapping::Mapper::new(&self.mapping).map_err(ConfigError)?;
        let run_as = self.run_as()?;
        Ok(Validated { settings: self, listen, tid_port_range, multicast_pool, multicast_interface, cluster, upload_dir, mapper, policy, metrics_listen, run_as })
    }

    /// The user and group to switch to after binding, looked up now: a name that does not
    /// exist is an error naming its setting.
    fn run_as(&self) -> Result<Option<identity::RunAs>, ConfigError> {
        let (u, g) = (self.server.user.trim(), self.server.group.trim());
        if u.is_empty() && g.is_empty() {
            return Ok(None);
        }
        let user = match u {
            "" => None,
            u => Some(identity::lookup_user(u).ok_or_else(|| ConfigError(format!("setting server.user: no such user {u:?}")))?),
        };
        let group = match g {
            "" => None,
            g => Some(identity::lookup_group(g).ok_or_else(|| ConfigError(format!("setting server.group: no such group {g:?}")))?),
        };
        Ok(Some(identity::RunAs { user, group }))
    }

    /// The root, the listening addresses, the transfer port range and the metrics address.
    #[allow(clippy::type_complexity)]
    fn server_addresses(&self) -> Result<(Vec<SocketAddr>, Option<(u16, u16)>, Option<SocketAddr>), ConfigError> {
        if !self.server.root.is_dir() {
            return bad("server.root", format!("{} is not a directory", self.server.root.display()));
        }
        if self.server.listen.is_empty() {
            return bad("server.listen", "at least one address is needed".into());
        }
        let mut listen = Vec::new();
        for a in &self.server.listen {
            match parse_listen(a) {
                Some(sa) => listen.push(sa),
                None => return bad("server.listen", format!("{a:?} is not ADDR:PORT or an address")),
            }
        }
        let tid_port_range = match self.server.tid_port_range.trim() {
            "" => None,
            r => Some(crate::net::parse_port_range(r).or_else(|e| bad("server.tid_port_range", e))?),
        };
        let metrics_listen = match self.server.metrics_listen.trim() {
            "" => None,
            a => Some(a.parse::<SocketAddr>().or_else(|_| bad("server.metrics_listen", format!("{a:?} is not ADDR:PORT")))?),
        };
        Ok((listen, tid_port_range, metrics_listen))
    }

    fn check_transfer(&self) -> Result<(), ConfigError> {
        let t = &self.transfer;
        ensure((1..=255_000).contains(&t.timeout_ms), "transfer.timeout_ms", "must be 1..=255000")?;
        ensure((1..=t.max_timeout_ms).contains(&t.min_timeout_ms), "transfer.min_timeout_ms", "must be 1..=transfer.max_timeout_ms")?;
        ensure(t.max_timeout_ms >= t.timeout_ms, "transfer.max_timeout_ms", "must be at least transfer.timeout_ms")?;
        ensure((1..=100).contains(&t.max_retries), "transfer.max_retries", "must be 1..=100")?;
        ensure(t.min_give_up_s <= 3600, "transfer.min_give_up_s", "must be 0..=3600")?;
        ensure((8..=65464).contains(&t.max_blksize), "transfer.max_blksize", "must be 8..=65464 (RFC 2348)")?;
        ensure((1..=32767).contains(&t.max_windowsize), "transfer.max_windowsize", "must be 1..=32767 (RFC 7440 allows more, but 16-bit block numbers then alias)")
    }

    fn check_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        ensure(l.max_sessions != 0, "limits.max_sessions", "must be at least 1")?;
        ensure(l.max_half_open_per_client != 0, "limits.max_half_open_per_client", "must be at least 1")?;
        ensure(l.defer_max_ms <= 60_000, "limits.defer_max_ms", "must be 0..=60000")?;
        ensure(l.defer_queue <= 100_000, "limits.defer_queue", "must be 0..=100000")
    }

    fn check_pacing(&self) -> Result<(), ConfigError> {
        let p = &self.pacing;
        let floor_max = p.ceiling_mbps.saturating_mul(1000);
        ensure((1..=floor_max).contains(&p.floor_kbps), "pacing.floor_kbps", "must be 1..=pacing.ceiling_mbps*1000")?;
        ensure(p.increase_mbps != 0, "pacing.increase_mbps", "must be at least 1")?;
        ensure(p.loss_threshold_pct <= 100, "pacing.loss_threshold_pct", "must be 0..=100")?;
        ensure((1..=99).contains(&p.decrease_pct), "pacing.decrease_pct", "must be 1..=99")?;
        ensure((1..=10_000).contains(&p.lease_ms), "pacing.lease_ms", "must be 1..=10000")
    }

    /// The group address pool and the interface; group ports must not meet the transfer
    /// ports or the group DATA port.
    fn multicast_addresses(&self, tid_port_range: Option<(u16, u16)>) -> Result<((Ipv4Addr, u32), Option<Ipv4Addr>), ConfigError> {
        let m = &self.multicast;
        let pool = match crate::net::parse_v4_cidr(&m.range) {
            Ok((base, size)) if base.is_multicast() && size >= 1 => (base, size),
            Ok(_) => return bad("multicast.range", format!("{:?} is not an IPv4 multicast range", m.range)),
            Err(e) => return bad("multicast.range", e),
        };
        if m.port == 0 {
            return bad("multicast.port", "must be 1..=65535".into());
        }
        let group_ports = (m.tid_port_base as u32, m.tid_port_base as u32 + pool.1.saturating_sub(1));
        if m.tid_port_base == 0 || group_ports.1 > 65535 {
            return bad("multicast.tid_port_base", format!("ports {}..={} do not fit", group_ports.0, group_ports.1));
        }
        if let Some((lo, hi)) = tid_port_range {
            if (lo as u32) <= group_ports.1 && group_ports.0 <= hi as u32 {
                return bad("multicast.tid_port_base", format!("group ports {}..={} overlap server.tid_port_range {lo}-{hi}", group_ports.0, group_ports.1));
            }
        }
        if (group_ports.0..=group_ports.1).contains(&(m.port as u32)) {
            return bad("multicast.tid_port_base", format!("group ports {}..={} include multicast.port {}", group_ports.0, group_ports.1, m.port));
        }
        let interface = match m.interface.trim() {
            "" => None,
            i => Some(i.parse().or_else(|_| bad("multicast.interface", format!("{:?} is not an IPv4 address", m.interface)))?),
        };
        self.check_multicast_numbers()?;
        Ok((pool, interface))
    }

    fn check_multicast_numbers(&self) -> Result<(), ConfigError> {
        let m = &self.multicast;
        if m.ttl == 0 || m.ttl > 255 {
            return bad("multicast.ttl", "must be 1..=255".into());
        }
        if m.window == 0 {
            return bad("multicast.window", "must be at least 1".into());
        }
        if m.master_retries == 0 {
            return bad("multicast.master_retries", "must be at least 1".into());
        }
        if m.rate_floor_kbps == 0 {
            return bad("multicast.rate_floor_kbps", "must be at least 1".into());
        }
        if m.rate_loss_threshold_pct == 0 || m.rate_loss_threshold_pct > 100 {
            return bad("multicast.rate_loss_threshold_pct", "must be 1..=100".into());
        }
        if m.rate_decrease_pct == 0 || m.rate_decrease_pct > 99 {
            return bad("multicast.rate_decrease_pct", "must be 1..=99".into());
        }
        Ok(())
    }

    fn check_log(&self) -> Result<(), ConfigError> {
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format", format!("{:?} is not text or json", self.log.format));
        }
        check_log_level(&self.log.level).or_else(|why| bad("log.level", format!("{:?}: {why}", self.log.level)))
    }

    fn upload_dir(&self) -> Result<String, ConfigError> {
        let u = &self.uploads;
        if u.file_mode > 0o777 {
            return bad("uploads.file_mode", format!("{:#o} is not a mode within 0o777 (no setuid, setgid or sticky bits)", u.file_mode));
        }
        let dir = match crate::fs::names::normalize_name(u.dir.as_bytes()) {
            Ok(d) => d,
            Err(e) => return bad("uploads.dir", format!("{:?}: {e}", u.dir)),
        };
        if u.enabled && !dir.is_empty() && !self.server.root.join(&dir).is_dir() {
            return bad("uploads.dir", format!("{dir:?} is not a directory under server.root"));
        }
        Ok(dir)
    }
}

impl Settings {
    fn cluster_settings(&self) -> Result<Option<ClusterSettings>, ConfigError> {
        let c = &self.cluster;
        if c.listen.trim().is_empty() {
            return Ok(None);
        }
        let Ok(listen) = c.listen.trim().parse::<SocketAddr>() else { return bad("cluster.listen", format!("{:?} is not ADDR:PORT", c.listen)) };
        let advertise = if c.advertise.trim().is_empty() {
            if listen.ip().is_unspecified() {
                return bad("cluster.advertise", "needed when cluster.listen is a wildcard address".into());
            }
            listen
        } else {
            match c.advertise.trim().parse() {
                Ok(a) => a,
                Err(_) => return bad("cluster.advertise", format!("{:?} is not ADDR:PORT", c.advertise)),
            }
        };
        let mut peers = Vec::new();
        for p in &c.peers {
            match p.trim().parse() {
                Ok(a) => peers.push(a),
                Err(_) => return bad("cluster.peers", format!("{p:?} is not ADDR:PORT")),
            }
        }
        let key = if !c.key_file.trim().is_empty() {
            match std::fs::read(c.key_file.trim()) {
                Ok(k) => k.trim_ascii().to_vec(),
                Err(e) => return bad("cluster.key_file", format!("cannot read {}: {e}", c.key_file)),
            }
        } else {
            c.key.as_bytes().to_vec()
        };
        if key.len() < 16 {
            return bad("cluster.key", "a cluster needs a shared key of at least 16 bytes (TFTPCAST_CLUSTER__KEY or cluster.key_file)".into());
        }
        let node_id = if c.node_id.trim().is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
        } else {
            c.node_id.trim().to_string()
        };
        if node_id.is_empty() || node_id.len() > 64 {
            return bad("cluster.node_id", "must be 1 to 64 characters".into());
        }
        Ok(Some(ClusterSettings { node_id, listen, advertise, peers, key }))
    }
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A log filter: comma-separated directives, each a level or `target=level`. A bare word that
/// is no level ("warning", "verbose") would be read by tracing as a target name, silently
/// logging nothing of what was meant: refused here.
fn check_log_level(filter: &str) -> Result<(), String> {
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = d.rsplit_once('=').map_or(d, |(_, l)| l);
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(format!("{level:?} is not a level (one of {})", LEVELS.join(", ")));
        }
    }
    if filter.trim().is_empty() || tracing_subscriber::EnvFilter::try_new(filter).is_err() {
        return Err("not a valid filter (a level, or target=level, comma-separated)".into());
    }
    Ok(())
}

/// `ADDR:PORT`, or an address alone (`10.0.0.1`, `[::]`, `::`) meaning TFTP's port 69.
pub fn parse_listen(a: &str) -> Option<SocketAddr> {
    let a = a.trim();
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return Some(sa);
    }
    let ip = a.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(a);
    ip.parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, 69))
}

/// The embedded defaults, parsed once.
fn defaults() -> &'static toml::Table {
    static TABLE: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| DEFAULT_TOML.parse().expect("embedded default.toml parses"))
}

/// The `section.key` names of the embedded defaults whose value passes `keep`.
fn keys_where(keep: fn(&toml::Value) -> bool) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (section, v) in defaults() {
        for (k, value) in v.as_table().into_iter().flatten() {
            if keep(value) {
                out.insert(format!("{section}.{k}"));
            }
        }
    }
    out
}

/// The keys of the embedded defaults, `section.key`: every key that exists.
fn default_keys() -> &'static std::collections::BTreeSet<String> {
    static KEYS: std::sync::OnceLock<std::collections::BTreeSet<String>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| keys_where(|_| true))
}

/// The keys whose default is a boolean.
fn bool_keys() -> &'static std::collections::BTreeSet<String> {
    static KEYS: std::sync::OnceLock<std::collections::BTreeSet<String>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| keys_where(toml::Value::is_bool))
}

pub fn is_known_key(path: &str) -> bool {
    default_keys().contains(path)
}

/// Refuses a file with a key the defaults do not have, naming it as `section.key` (serde's
/// own message names only the field, not where it is).
fn check_file_keys(f: &Path) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(f).map_err(|e| ConfigError(format!("config file {}: {e}", f.display())))?;
    let t: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ConfigError(format!("config file {}: {}", f.display(), e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")))
    })?;
    for (section, v) in &t {
        if section == "policy" {
            continue; // an array of rule tables, checked rule by rule by `policy::Policy::compile`
        }
        let Some(keys) = v.as_table() else {
            return Err(ConfigError(format!("setting {section}: not a section (config file {})", f.display())));
        };
        if keys.is_empty() && !default_keys().iter().any(|k| k.starts_with(&format!("{section}."))) {
            return Err(ConfigError(format!("setting {section}: unknown section (config file {})", f.display())));
        }
        for (k, value) in keys {
            let path = format!("{section}.{k}");
            if !is_known_key(&path) {
                return Err(ConfigError(format!("setting {path}: unknown key (config file {})", f.display())));
            }
            if bool_keys().contains(&path) && !value.is_bool() {
                return Err(ConfigError(format!("setting {path}: {value} is not true or false (config file {})", f.display())));
            }
        }
    }
    if let Some(rules) = t.get("mapping").and_then(|m| m.get("rewrite")) {
        crate::fs::mapping::check_rule_tables(rules).map_err(|e| ConfigError(format!("{e} (config file {})", f.display())))?;
    }
    Ok(())
}

impl Transfer {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
    pub fn max_timeout(&self) -> Duration {
        Duration::from_millis(self.max_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn load_with(env: &[(&str, &str)], o: Overrides) -> Result<Validated, ConfigError> {
        let r = root();
        let o = Overrides { root: Some(r.path().into()), ..o };
        Settings::load(None, env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>(), &o)
    }

    #[test]
    fn listen_without_a_port_means_69() {
        let v = load_with(&[], Overrides { listen: vec!["10.0.0.1".into(), "[::]".into(), "::1".into(), "127.0.0.1:6969".into()], ..Default::default() }).unwrap();
        let want: Vec<SocketAddr> = ["10.0.0.1:69", "[::]:69", "[::1]:69", "127.0.0.1:6969"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(v.listen, want);
        let e = load_with(&[], Overrides { listen: vec!["host:69".into()], ..Default::default() }).unwrap_err();
        assert!(e.0.starts_with("setting server.listen:"), "{e}");
    }

    #[test]
    fn log_levels_that_tracing_would_read_as_targets_are_refused() {
        for good in ["info", "DEBUG", "warn,tftpcast=trace", "tftpcast::node=debug", "off"] {
            assert!(load_with(&[], Overrides { log_level: Some(good.into()), ..Default::default() }).is_ok(), "{good}");
        }
        for bad in ["warning", "verbose", "info,loud", "tftpcast=chatty", ""] {
            let e = load_with(&[], Overrides { log_level: Some(bad.into()), ..Default::default() }).unwrap_err();
            assert!(e.0.starts_with("setting log.level:"), "{bad}: {e}");
        }
    }

    #[test]
    fn booleans_are_only_true_or_false() {
        let v = load_with(&[("TFTPCAST_SERVER__SINGLE_PORT", "true")], Overrides::default()).unwrap();
        assert!(v.settings.server.single_port);
        for bad in ["yes", "1", "on", "True", "ture"] {
            let e = load_with(&[("TFTPCAST_SERVER__SINGLE_PORT", bad)], Overrides::default()).unwrap_err();
            assert!(e.0.starts_with("setting server.single_port:") && e.0.contains("not true or false"), "{bad}: {e}");
        }
        let r = root();
        let f = r.path().join("c.toml");
        std::fs::write(&f, "[server]\nsingle_port = \"yes\"\n").unwrap();
        let o = Overrides { root: Some(r.path().into()), ..Default::default() };
        let e = Settings::load(Some(&f), vec![], &o).unwrap_err();
        assert!(e.0.contains("single_port"), "a string in a file is no boolean either: {e}");
    }

    #[test]
    fn defaults_load_with_only_a_root() {
        let r = root();
        let o = Overrides { root: Some(r.path().into()), ..Default::default() };
        let v = Settings::load(None, vec![], &o).unwrap();
        assert_eq!(v.listen, vec!["[::]:69".parse().unwrap()]);
        assert_eq!(v.tid_port_range, None);
    }

    #[test]
    fn precedence_flags_over_env_over_file() {
        let r = root();
        let file = r.path().join("c.toml");
        std::fs::write(&file, "[pacing]\nmax_rate_mbps = 10\nsession_max_rate_mbps = 3\n[log]\nformat = \"json\"\n").unwrap();
        let env = vec![("TFTPCAST_PACING__MAX_RATE_MBPS".to_string(), "20".to_string()), ("TFTPCAST_SERVER__LISTEN".into(), "127.0.0.1:1069, [::1]:1069".into())];
        let o = Overrides { root: Some(r.path().into()), max_rate_mbps: Some(30), ..Default::default() };
        let v = Settings::load(Some(&file), env.clone(), &o).unwrap();
        assert_eq!(v.settings.pacing.max_rate_mbps, 30);
        assert_eq!(v.settings.pacing.session_max_rate_mbps, 3);
        assert_eq!(v.settings.log.format, "json");
        assert_eq!(v.listen.len(), 2);
        let o = Overrides { root: Some(r.path().into()), ..Default::default() };
        assert_eq!(Settings::load(Some(&file), env, &o).unwrap().settings.pacing.max_rate_mbps, 20);
    }

    #[test]
    fn single_port_from_flag_env_and_default() {
        let r = root();
        let o = Overrides { root: Some(r.path().into()), ..Default::default() };
        assert!(!Settings::load(None, vec![], &o).unwrap().settings.server.single_port);
        let env = vec![("TFTPCAST_SERVER__SINGLE_PORT".to_string(), "true".to_string())];
        assert!(Settings::load(None, env, &o).unwrap().settings.server.single_port);
        let o = Overrides { root: Some(r.path().into()), single_port: true, ..Default::default() };
        assert!(Settings::load(None, vec![], &o).unwrap().settings.server.single_port);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let r = root();
        let o = Overrides { root: Some(r.path().into()), ..Default::default() };
        let cases = [
            ("TFTPCAST_TRANSFER__MAX_BLKSIZE", "7", "transfer.max_blksize"),
            ("TFTPCAST_TRANSFER__MAX_BLKSIZE", "abc", "max_blksize"),
            ("TFTPCAST_SERVER__TID_PORT_RANGE", "9-1", "server.tid_port_range"),
            ("TFTPCAST_LOG__FORMAT", "xml", "log.format"),
            ("TFTPCAST_SERVER__LISTEN", "nowhere", "server.listen"),
            ("TFTPCAST_MULTICAST__RANGE", "10.0.0.0/24", "multicast.range"),
            ("TFTPCAST_MULTICAST__INTERFACE", "eth0", "multicast.interface"),
            // The range rules, word for word, just outside each end.
            ("TFTPCAST_TRANSFER__TIMEOUT_MS", "0", "transfer.timeout_ms: must be 1..=255000"),
            ("TFTPCAST_TRANSFER__TIMEOUT_MS", "255001", "transfer.timeout_ms: must be 1..=255000"),
            ("TFTPCAST_TRANSFER__MIN_TIMEOUT_MS", "0", "transfer.min_timeout_ms: must be 1..=transfer.max_timeout_ms"),
            ("TFTPCAST_TRANSFER__MAX_RETRIES", "0", "transfer.max_retries: must be 1..=100"),
            ("TFTPCAST_TRANSFER__MAX_RETRIES", "101", "transfer.max_retries: must be 1..=100"),
            ("TFTPCAST_TRANSFER__MIN_GIVE_UP_S", "3601", "transfer.min_give_up_s: must be 0..=3600"),
            ("TFTPCAST_TRANSFER__MAX_BLKSIZE", "7", "transfer.max_blksize: must be 8..=65464 (RFC 2348)"),
            ("TFTPCAST_TRANSFER__MAX_BLKSIZE", "65465", "transfer.max_blksize: must be 8..=65464 (RFC 2348)"),
            ("TFTPCAST_TRANSFER__MAX_WINDOWSIZE", "0", "transfer.max_windowsize: must be 1..=32767 (RFC 7440"),
            ("TFTPCAST_TRANSFER__MAX_WINDOWSIZE", "32768", "transfer.max_windowsize: must be 1..=32767 (RFC 7440"),
            ("TFTPCAST_LIMITS__MAX_SESSIONS", "0", "limits.max_sessions: must be at least 1"),
            ("TFTPCAST_LIMITS__MAX_HALF_OPEN_PER_CLIENT", "0", "limits.max_half_open_per_client: must be at least 1"),
            ("TFTPCAST_LIMITS__DEFER_MAX_MS", "60001", "limits.defer_max_ms: must be 0..=60000"),
            ("TFTPCAST_LIMITS__DEFER_QUEUE", "100001", "limits.defer_queue: must be 0..=100000"),
            ("TFTPCAST_PACING__FLOOR_KBPS", "0", "pacing.floor_kbps: must be 1..=pacing.ceiling_mbps*1000"),
            ("TFTPCAST_PACING__INCREASE_MBPS", "0", "pacing.increase_mbps: must be at least 1"),
            ("TFTPCAST_PACING__LOSS_THRESHOLD_PCT", "101", "pacing.loss_threshold_pct: must be 0..=100"),
            ("TFTPCAST_PACING__DECREASE_PCT", "0", "pacing.decrease_pct: must be 1..=99"),
            ("TFTPCAST_PACING__DECREASE_PCT", "100", "pacing.decrease_pct: must be 1..=99"),
            ("TFTPCAST_PACING__LEASE_MS", "0", "pacing.lease_ms: must be 1..=10000"),
            ("TFTPCAST_PACING__LEASE_MS", "10001", "pacing.lease_ms: must be 1..=10000"),
        ];
        for (k, v, want) in cases {
            let e = Settings::load(None, vec![(k.to_string(), v.to_string())], &o).unwrap_err().to_string();
            assert!(e.contains(want), "{k}={v}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // The edges of the range rules load.
        let edges = [
            ("TRANSFER__MAX_RETRIES", "100"),
            ("TRANSFER__MAX_RETRIES", "1"),
            ("TRANSFER__MIN_GIVE_UP_S", "3600"),
            ("TRANSFER__MAX_BLKSIZE", "8"),
            ("TRANSFER__MAX_BLKSIZE", "65464"),
            ("TRANSFER__MAX_WINDOWSIZE", "32767"),
            ("LIMITS__MAX_SESSIONS", "1"),
            ("LIMITS__MAX_SESSIONS_PER_CLIENT", "0"),
            ("LIMITS__MAX_HALF_OPEN_PER_CLIENT", "1"),
            ("LIMITS__DEFER_MAX_MS", "60000"),
            ("LIMITS__DEFER_QUEUE", "100000"),
            ("PACING__LOSS_THRESHOLD_PCT", "100"),
            ("PACING__DECREASE_PCT", "99"),
            ("PACING__LEASE_MS", "10000"),
        ];
        for (k, v) in edges {
            let got = Settings::load(None, vec![(format!("TFTPCAST_{k}"), v.to_string())], &o);
            assert!(got.is_ok(), "{k}={v}: {:?}", got.err());
        }
        let two = vec![("TFTPCAST_TRANSFER__MAX_TIMEOUT_MS".into(), "1".into()), ("TFTPCAST_TRANSFER__MIN_TIMEOUT_MS".into(), "1".into())];
        let e = Settings::load(None, two, &o).unwrap_err().to_string();
        assert!(e.contains("transfer.max_timeout_ms: must be at least transfer.timeout_ms"), "{e}");
        let o = Overrides { root: Some(r.path().join("missing")), ..Default::default() };
        assert!(Settings::load(None, vec![], &o).unwrap_err().to_string().contains("server.root"));
    }

    #[test]
    fn cluster_needs_a_key_and_parses_peers() {
        let r = root();
        let o = Overrides { root: Some(r.path().into()), cluster_listen: Some("127.0.0.1:7946".into()), peers: vec!["127.0.0.1:7947".into()], ..Default::default() };
        let e = Settings::load(None, vec![], &o).unwrap_err().to_string();
        assert!(e.contains("cluster.key"), "{e}");
        let env = vec![("TFTPCAST_CLUSTER__KEY".to_string(), "0123456789abcdef-secret".to_string())];
        let v = Settings::load(None, env, &o).unwrap();
        let c = v.cluster.unwrap();
        assert_eq!(c.peers, vec!["127.0.0.1:7947".parse().unwrap()]);
        assert_eq!(c.advertise, c.listen);
        assert!(Settings::load(None, vec![], &Overrides { root: Some(r.path().into()), ..Default::default() }).unwrap().cluster.is_none());
    }

    #[test]
    fn uploads_layer_and_validate() {
        let r = root();
        std::fs::create_dir(r.path().join("incoming")).unwrap();
        let o = Overrides { root: Some(r.path().into()), ..Default::default() };
        let v = Settings::load(None, vec![], &o).unwrap();
        assert!(!v.settings.uploads.enabled, "off by default");
        assert_eq!((v.settings.uploads.file_mode, v.upload_dir.as_str()), (0o640, ""));
        let env = vec![
            ("TFTPCAST_UPLOADS__ENABLED".to_string(), "true".to_string()),
            ("TFTPCAST_UPLOADS__FILE_MODE".into(), "0o600".into()),
            ("TFTPCAST_UPLOADS__DIR".into(), "/incoming/".into()),
        ];
        let v = Settings::load(None, env.clone(), &o).unwrap();
        assert!(v.settings.uploads.enabled);
        assert_eq!((v.settings.uploads.file_mode, v.upload_dir.as_str()), (0o600, "incoming"));
        let ro = Overrides { allow_write: Some(false), ..o.clone() };
        assert!(!Settings::load(None, env, &ro).unwrap().settings.uploads.enabled, "flag over env");
        let rw = Overrides { allow_write: Some(true), ..o.clone() };
        assert!(Settings::load(None, vec![], &rw).unwrap().settings.uploads.enabled);
        for (k, v, want) in [
            ("TFTPCAST_UPLOADS__FILE_MODE", "0o4755", "uploads.file_mode"),
            ("TFTPCAST_UPLOADS__FILE_MODE", "rw", "file_mode"),
            ("TFTPCAST_UPLOADS__DIR", "../up", "uploads.dir"),
            ("TFTPCAST_UPLOADS__DIR", "missing", "uploads.dir"),
        ] {
            let e = Settings::load(None, vec![(k.to_string(), v.to_string())], &rw).unwrap_err().to_string();
            assert!(e.contains(want), "{k}={v}: {e}");
        }
    }

    #[test]
    fn policy_rules_and_limits_load_and_errors_name_the_rule() {
        let r = root();
        let file = r.path().join("c.toml");
        std::fs::write(
            &file,
            "[limits]\nmax_requests_per_s = 50\ndefer_queue = 8\n[server]\nmetrics_listen = \"127.0.0.1:9469\"\n\n[[policy]]\nname = \"lab\"\nclients = [\"10.0.0.0/8\", \"fd00::/8\"]\noptions = []\nblksize_max = 1024\n\n[[policy]]\nhas = [\"multicast\"]\nrefuse = [\"multicast\"]\n",
        )
        .unwrap();
        let o = Overrides { root: Some(r.path().into()), ..Default::default() };
        let v = Settings::load(Some(&file), vec![], &o).unwrap();
        assert_eq!(v.policy.len(), 2);
        assert_eq!(v.settings.policy[0].options, Some(vec![]));
        assert_eq!(v.settings.limits.max_requests_per_s, 50);
        assert_eq!(v.metrics_listen, Some("127.0.0.1:9469".parse().unwrap()));
        std::fs::write(&file, "[[policy]]\nname = \"ok\"\n[[policy]]\nname = \"broken\"\nclients = [\"10.0.0.0/99\"]\n").unwrap();
        let e = Settings::load(Some(&file), vec![], &o).unwrap_err().to_string();
        assert!(e.contains("policy[1]") && e.contains("broken") && !e.contains('\n'), "{e}");
        std::fs::write(&file, "[[policy]]\nblksize_mx = 10\n").unwrap();
        assert!(Settings::load(Some(&file), vec![], &o).unwrap_err().to_string().contains("blksize_mx"));
        let e = Settings::load(None, vec![("TFTPCAST_SERVER__METRICS_LISTEN".into(), "nowhere".into())], &o).unwrap_err().to_string();
        assert!(e.contains("server.metrics_listen"), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let r = root();
        let file = r.path().join("c.toml");
        std::fs::write(&file, "[server]\nrooot = \"/x\"\n").unwrap();
        let o = Overrides { root: Some(r.path().into()), ..Default::default() };
        let e = Settings::load(Some(&file), vec![], &o).unwrap_err().to_string();
        assert!(e.contains("rooot"), "{e}");
    }
}
