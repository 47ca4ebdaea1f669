//! Smoke test of `tftpcast bench` (the benchmark itself, `bench/compare.sh`, is not part of the
//! test suite): a few concurrent clients against the server under test on loopback, results
//! read from `--json`, and a wrong expected digest must show as failures and a non-zero exit.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn bench(server: &Server, extra: &[&str]) -> (Run, serde_json::Value) {
    let addr = server.addr().to_string();
    let mut cmd = Command::new(tftpcast_bin());
    cmd.args(["bench", "--server", &addr, "--file", ONE_MIB, "--clients", "4", "--rounds", "2", "--json"])
        .args(["--timeout", "1", "--retries", "4"])
        .args(extra);
    let r = run(&mut cmd, LIMIT);
    assert!(!r.timed_out, "bench overran its time limit:\n{r}");
    let line = r.stdout.lines().last().unwrap_or_default().to_string();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bench --json printed no JSON object ({e}):\n{r}"));
    (r, v)
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("no number {key} in {v}"))
}

#[test]
fn bench_fetches_verifies_and_reports() {
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let digest = hex(&fx.sha(ONE_MIB));

    let (r, v) = bench(&server, &["--expect-sha256", &digest, "--blksize", "1428"]);
    assert!(r.success(), "bench failed:\n{r}");
    assert_eq!(num(&v, "transfers"), 8.0, "{v}");
    assert_eq!(num(&v, "ok"), 8.0, "{v}");
    assert_eq!(num(&v, "failed"), 0.0, "{v}");
    assert_eq!(num(&v, "bytes"), 8.0 * (1 << 20) as f64, "{v}");
    assert!(num(&v, "goodput_mib_s") > 0.0, "{v}");
    assert!(v["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["latency_ms"]["p99"].as_f64().unwrap() >= v["latency_ms"]["p50"].as_f64().unwrap(), "{v}");
    // Every delivered block came in at least one datagram from the server.
    assert!(num(&v, "server_packets_per_block") >= 1.0, "{v}");
    assert_eq!(num(&v, "blocks"), 8.0 * ((1 << 20) / 1428 + 1) as f64, "{v}");

    // The same file given as a local copy.
    let path = fx.path(ONE_MIB);
    let (r, v) = bench(&server, &["--expect-file", path.to_str().unwrap(), "--windowsize", "4", "--blksize", "1024"]);
    assert!(r.success(), "bench --expect-file failed:\n{r}");
    assert_eq!((num(&v, "ok"), num(&v, "failed")), (8.0, 0.0), "{v}");

    // A wrong digest: every transfer fails verification, and the exit code says so.
    let mut wrong = fx.sha(ONE_MIB);
    wrong[0] ^= 1;
    let (r, v) = bench(&server, &["--expect-sha256", &hex(&wrong)]);
    assert!(!r.success() && r.code().is_some(), "bench must exit non-zero on failures:\n{r}");
    assert_eq!((num(&v, "ok"), num(&v, "failed")), (0.0, 8.0), "{v}");
    assert_eq!(v["failures"]["sha256-mismatch"].as_f64(), Some(8.0), "{v}");

    server.finish(&fx);
}

#[test]
fn bench_reports_a_missing_file_as_failures() {
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let addr = server.addr().to_string();
    let mut cmd = Command::new(tftpcast_bin());
    cmd.args(["bench", "--server", &addr, "--file", "no-such-file", "--clients", "2", "--json"]);
    let r = run(&mut cmd, LIMIT);
    assert!(!r.success() && r.code() == Some(1), "{r}");
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("JSON");
    assert_eq!((num(&v, "ok"), num(&v, "failed")), (0.0, 2.0), "{v}");
    assert_eq!(v["failures"]["server-error-1"].as_f64(), Some(2.0), "{v}");
    server.finish(&fx);
}

/// `--multicast` against tftpcast's RFC 2090 groups, inside the namespace lab (multicast never
/// touches the host's own namespace): every client is served by the group, byte-exact.
#[test]
fn bench_multicast_clients_share_a_group() {
    if !testing_tftpcast() {
        eprintln!("SKIPPED: in.tftpd has no multicast");
        return;
    }
    if !require_netns() {
        return;
    }
    let fx = Fixture::new();
    let lab = Lab::new("bench", 1);
    let listen = format!("{}:69", lab.server_ip());
    let server = Server::start_in(Some(&lab.server), &fx.root, &["--listen", &listen, "--start-delay-ms", "300"]);
    let digest = hex(&fx.sha(ONE_MIB));
    let mut cmd = lab.exec(&lab.clients[0], tftpcast_bin(), &[]);
    cmd.args(["bench", "--server", &listen, "--multicast", "--file", ONE_MIB, "--clients", "4", "--blksize", "1428"])
        .args(["--timeout", "1", "--json", "--expect-sha256", &digest]);
    let r = run(&mut cmd, LIMIT);
    assert!(r.success(), "bench --multicast failed:\n{r}");
    let v: serde_json::Value = serde_json::from_str(r.stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no JSON ({e}):\n{r}"));
    assert_eq!((num(&v, "ok"), num(&v, "failed")), (4.0, 0.0), "{v}");
    assert_eq!(num(&v, "by_group"), 4.0, "every client must be served by the group: {v}");
    assert_eq!(v["mode"].as_str(), Some("tftp-multicast"), "{v}");
    drop(server);
}
