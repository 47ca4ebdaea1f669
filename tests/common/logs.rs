//! The server's JSON log as events: lookups by message, fields of an event or of its span, and
//! bounded polling until something shows up.

use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Server;

/// Every log line of `server` that parses as JSON, in order.
pub fn parse_events(server: &Server) -> Vec<Value> {
    server
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Every JSON log event whose message is `msg`.
pub fn events(server: &Server, msg: &str) -> Vec<Value> {
    parse_events(server)
        .into_iter()
        .filter(|v| v["fields"]["message"].as_str() == Some(msg))
        .collect()
}

/// A field of an event, or of the span it was logged in.
pub fn field<'a>(ev: &'a Value, key: &str) -> &'a Value {
    let f = &ev["fields"][key];
    if f.is_null() {
        &ev["span"][key]
    } else {
        f
    }
}

/// [`field`] as text: strings as they are, other values in JSON, absent ones empty.
pub fn field_str(ev: &Value, key: &str) -> String {
    match field(ev, key) {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// [`field`] as a number (spans record some numbers as text).
pub fn field_u64(ev: &Value, key: &str) -> Option<u64> {
    let f = field(ev, key);
    f.as_u64()
        .or_else(|| f.as_str().and_then(|s| s.parse().ok()))
}

/// [`field_u64`] of a field the event must have: panics naming the event otherwise.
pub fn expect_u64(ev: &Value, key: &str) -> u64 {
    field_u64(ev, key).unwrap_or_else(|| panic!("event has no numeric field `{key}`: {ev}"))
}

/// The IP address a `peer`/`client` field names (`IP:PORT`, or a bare IP).
pub fn ip_of(ev: &Value, key: &str) -> Option<IpAddr> {
    let s = field_str(ev, key);
    s.parse::<SocketAddr>()
        .map(|a| a.ip())
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok())
}

/// `file` fields name the served path; compare by file name.
pub fn names_file(ev: &Value, remote: &str) -> bool {
    let f = field_str(ev, "file");
    f == remote || f.ends_with(&format!("/{remote}"))
}

/// The events `msg` about file `remote`.
pub fn events_for(server: &Server, msg: &str, remote: &str) -> Vec<Value> {
    events(server, msg)
        .into_iter()
        .filter(|e| names_file(e, remote))
        .collect()
}

/// Polls until `cond` holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded) for the first event `msg` that satisfies `pred`; panics with the log's
/// tail when none comes.
pub fn wait_event(server: &Server, msg: &str, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    let ok = wait_until(limit, || {
        found = events(server, msg).into_iter().find(|e| pred(e));
        found.is_some()
    });
    assert!(
        ok,
        "the server did not log `{msg}` within {limit:?}\n{}",
        server.log_tail(80)
    );
    found.unwrap()
}
