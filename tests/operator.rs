//! What an operator relies on beyond the protocol: file-name mapping (Windows names,
//! case-insensitive lookup, rewrite rules, none of which may leave the root), `tftpcast
//! check-config`, and the deployment files in `deploy/` (the PXE sample, the systemd unit,
//! the container image). Real clients and real sockets on loopback only.
//!
//! Mapping is tftpcast's own feature: with `TFTPCAST_TEST_SERVER` pointing at in.tftpd these
//! tests are skipped.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// The repository root (where Cargo.toml is).
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pxe_lab() -> PathBuf {
    repo().join("deploy/pxe-lab.toml")
}

fn only_tftpcast() -> bool {
    common::only_tftpcast("file-name mapping and check-config are tftpcast's own features")
}

/// Writes each `(name, len)` file (pseudo-random bytes) at `root/name`, creating
/// directories; returns the contents, in order.
fn put<const N: usize>(root: &Path, files: [(&str, usize); N]) -> [Vec<u8>; N] {
    files.map(|(name, len)| {
        let data = pseudo_random(len, seed_of(name));
        let p = root.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &data).unwrap();
        data
    })
}

/// A raw RRQ for `name` (bytes as sent), expecting the whole file `want`.
fn assert_raw_serves(server: &Server, name: &[u8], want: &[u8]) {
    let o = raw::get_with(server.addr(), name, "octet", &[], CLIENT_LIMIT, |_| {});
    assert!(
        o.complete && o.error.is_none() && o.data == want,
        "raw RRQ {:?}: {o}\n{}",
        String::from_utf8_lossy(name),
        server.log_tail(20)
    );
}

/// A raw RRQ for `name` that must fail with an ERROR; returns (code, message).
fn raw_error(server: &Server, fx: &Fixture, name: &[u8]) -> (u16, String) {
    let o = raw::get_with(server.addr(), name, "octet", &[], CLIENT_LIMIT, |_| {});
    fx.assert_no_canary(&o.data, &format!("RRQ {:?}", String::from_utf8_lossy(name)));
    o.error.clone().unwrap_or_else(|| {
        panic!(
            "RRQ {:?} should have been refused: {o}\n{}",
            String::from_utf8_lossy(name),
            server.log_tail(20)
        )
    })
}

/// A config file in the fixture's directory.
fn config_file(fx: &Fixture, name: &str, text: &str) -> PathBuf {
    let p = fx.base().join(name);
    fs::write(&p, text).unwrap();
    p
}

#[test]
fn windows_backslash_names_are_served() {
    let Some(fx) = fixture_if(only_tftpcast()) else { return };
    let [data] = put(&fx.root, [("boot/x64/wdsnbp.com", 3000)]);
    let server = Server::start(&fx.root, &[]);
    let win = r"boot\x64\wdsnbp.com";
    for client in [Client::hpa(), Client::Atftp { options: vec![] }] {
        if !client.available() {
            continue;
        }
        let out = fx.out(&format!("{}-wdsnbp", client.tool()));
        let r = client.fetch(None, server.addr(), win, &out, CLIENT_LIMIT);
        assert_fetched(&client, &r, &out, &sha256(&data), data.len(), "Windows-style name");
    }
    assert_raw_serves(&server, win.as_bytes(), &data);
    // WDS clients also send a leading backslash: it is the root, like a leading slash.
    assert_raw_serves(&server, br"\boot\x64\wdsnbp.com", &data);
    // `..` spelled with backslashes is still refused.
    let (code, _) = raw_error(&server, &fx, br"boot\..\..\canary.txt");
    assert_eq!(code, 2, "backslash traversal");
    server.finish(&fx);

    // Off, a backslash is an ordinary character and the name does not exist.
    let server = Server::start_in_env(None, &fx.root, &[], &[("TFTPCAST_MAPPING__BACKSLASH_TO_SLASH", "false")]);
    assert_eq!(raw_error(&server, &fx, win.as_bytes()).0, 1, "backslash_to_slash = false");
    server.finish(&fx);
}

#[test]
fn case_insensitive_lookup_only_when_enabled() {
    let Some(fx) = fixture_if(only_tftpcast()) else { return };
    let [bcd, sdi] = put(&fx.root, [("Boot/BCD", 2000), ("Boot/x64/Boot.SDI", 700)]);
    // A symlink leaving the root, reachable only through a case-insensitive match.
    std::os::unix::fs::symlink(fx.base(), fx.root.join("Outside")).unwrap();

    let server = Server::start(&fx.root, &[]);
    assert_eq!(raw_error(&server, &fx, b"boot/bcd").0, 1, "case_insensitive is off by default");
    assert_raw_serves(&server, b"Boot/BCD", &bcd);
    server.finish(&fx);

    let server = Server::start_in_env(None, &fx.root, &[], &[("TFTPCAST_MAPPING__CASE_INSENSITIVE", "true")]);
    assert_raw_serves(&server, b"boot/bcd", &bcd);
    assert_raw_serves(&server, br"\BOOT\X64\boot.sdi", &sdi);
    if Client::hpa().available() {
        let out = fx.out("bcd");
        let r = Client::hpa().fetch(None, server.addr(), "BOOT/bcd", &out, CLIENT_LIMIT);
        assert_fetched(&Client::hpa(), &r, &out, &sha256(&bcd), bcd.len(), "case-insensitive tftp-hpa");
    }
    assert_eq!(raw_error(&server, &fx, b"boot/missing").0, 1);
    let (code, msg) = raw_error(&server, &fx, b"outside/canary.txt");
    assert_eq!(code, 2, "symlink out of the root found by a case-insensitive match: {msg}");
    server.finish(&fx);
}

#[test]
fn rewrite_rule_applies_and_is_logged() {
    let Some(fx) = fixture_if(only_tftpcast()) else { return };
    let [host, default] = put(&fx.root, [("pxelinux.cfg/hosts/aa-bb-cc-dd-ee-ff", 900), ("pxelinux.cfg/default", 300)]);
    let cfg = config_file(
        &fx,
        "rewrite.toml",
        r#"
[[mapping.rewrite]]
match = '^pxelinux\.cfg/01-(.*)$'
replace = 'pxelinux.cfg/hosts/$1'
last = true

# Never reached for a name the first rule matched (`last`).
[[mapping.rewrite]]
match = '^pxelinux\.cfg/hosts/'
replace = 'nowhere/'
"#,
    );
    let server = Server::start(&fx.root, &["--config", cfg.to_str().unwrap()]);
    let name = "pxelinux.cfg/01-aa-bb-cc-dd-ee-ff";
    if Client::hpa().available() {
        let out = fx.out("mac");
        let r = Client::hpa().fetch(None, server.addr(), name, &out, CLIENT_LIMIT);
        assert_fetched(&Client::hpa(), &r, &out, &sha256(&host), host.len(), "rewritten name");
    } else {
        assert_raw_serves(&server, name.as_bytes(), &host);
    }
    // A name no rule matches is served as it is.
    assert_raw_serves(&server, b"pxelinux.cfg/default", &default);
    let ev = events(&server, "file name rewritten");
    assert_eq!(ev.len(), 1, "one rewrite logged: {ev:?}\n{}", server.log_tail(20));
    let f = &ev[0]["fields"];
    assert_eq!(f["original"], name, "{f}");
    assert_eq!(f["mapped"], "pxelinux.cfg/hosts/aa-bb-cc-dd-ee-ff", "{f}");
    assert_eq!(f["rule"], 1, "{f}");
    assert_eq!(ev[0]["level"], "INFO");
    assert!(f["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "peer logged: {f}");
    server.finish(&fx);
}

#[test]
fn rewrite_rules_cannot_escape_the_root() {
    let Some(fx) = fixture_if(only_tftpcast()) else { return };
    std::os::unix::fs::symlink(fx.base(), fx.root.join("out")).unwrap();
    let canary = fx.canary.to_str().unwrap();
    let grown = "x".repeat(1000);
    let rules = [
        ("^up/(.*)$", "../$1"),
        ("^bs/(.*)$", r"..\..\$1"),
        ("^abs$", canary),
        ("^link/(.*)$", "out/$1"),
        ("^grow$", grown.as_str()),
        ("^(x+)$", "${1}${1}"),
    ];
    let toml: String = rules.iter().map(|(m, r)| format!("[[mapping.rewrite]]\nmatch = '{m}'\nreplace = '{r}'\n")).collect();
    let cfg = config_file(&fx, "escape.toml", &toml);
    let server = Server::start(&fx.root, &["--config", cfg.to_str().unwrap()]);
    for (name, want) in [
        (&b"up/canary.txt"[..], 2),
        (b"bs/canary.txt", 2),
        // An absolute path is relative to the root like any client name: not there.
        (b"abs", 1),
        (b"link/canary.txt", 2),
        // 2000 bytes after the second rule: refused, not truncated.
        (b"grow", 2),
    ] {
        let (code, msg) = raw_error(&server, &fx, name);
        assert_eq!(code, want, "{:?}: {msg}", String::from_utf8_lossy(name));
    }
    assert!(!events(&server, "file name rewritten").is_empty());
    server.finish(&fx);
}

/// Runs `tftpcast ARGS` with only the `TFTPCAST_*` variables in `env`.
fn tftpcast(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(tftpcast_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("TFTPCAST_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).envs(env.iter().copied());
    run(&mut cmd, Duration::from_secs(30))
}

#[test]
fn check_config_rejects_bad_files_naming_the_setting() {
    let Some(fx) = fixture_if(only_tftpcast()) else { return };
    let root = fx.root.to_str().unwrap();
    let cases = [
        ("bad value", "[transfer]\nmax_blksize = 7\n", "transfer.max_blksize"),
        ("bad type", "[multicast]\nport = \"tftp\"\n", "multicast.port"),
        ("unknown key", "[server]\nrooot = \"/srv/tftp\"\n", "server.rooot"),
        ("unknown section", "[bogus]\nenabled = true\n", "bogus.enabled"),
        (
            "bad regex",
            "[[mapping.rewrite]]\nmatch = 'ok'\nreplace = 'x'\n[[mapping.rewrite]]\nmatch = '(unclosed'\nreplace = 'x'\n",
            "mapping.rewrite[2].match",
        ),
        ("missing group", "[[mapping.rewrite]]\nmatch = 'a'\nreplace = '$1'\n", "mapping.rewrite[1].replace"),
        ("unknown rule key", "[[mapping.rewrite]]\nmatch = 'a'\nreplace = 'b'\nlast_ = true\n", "mapping.rewrite[1].last_"),
        ("no half-open budget", "[limits]\nmax_half_open_per_client = 0\n", "limits.max_half_open_per_client"),
    ];
    for (what, text, setting) in cases {
        let file = config_file(&fx, "bad.toml", text);
        let r = tftpcast(&["check-config", "--config", file.to_str().unwrap(), "--root", root], &[]);
        assert_eq!(r.code(), Some(2), "{what}: exit 2 expected\n{r}");
        let err = r.stderr.trim();
        assert!(err.contains(setting), "{what}: the message must name {setting}: {err:?}");
        assert_eq!(err.lines().count(), 1, "{what}: one line: {err:?}");
        assert!(r.stdout.is_empty(), "{what}: nothing printed on stdout for a bad configuration\n{r}");
    }
    // A bad environment value, and the same loader behind `serve`.
    let r = tftpcast(&["check-config", "--root", root], &[("TFTPCAST_LOG__FORMAT", "xml")]);
    assert_eq!(r.code(), Some(2), "{r}");
    assert!(r.stderr.contains("log.format"), "{r}");
    let file = config_file(&fx, "bad.toml", "[transfer]\nmax_blksize = 7\n");
    let r = tftpcast(&["serve", "--config", file.to_str().unwrap(), "--root", root, "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(r.code(), Some(2), "serve refuses the same file\n{r}");
    assert!(r.stderr.contains("transfer.max_blksize"), "{r}");
}

#[test]
fn check_config_accepts_the_pxe_sample_and_shows_provenance() {
    let Some(fx) = fixture_if(only_tftpcast()) else { return };
    let root = fx.root.to_str().unwrap();
    let sample = pxe_lab();
    let secret = "not-for-your-eyes-0123456789";
    let r = tftpcast(
        &["check-config", "--config", sample.to_str().unwrap(), "--max-rate-mbps", "500"],
        &[("TFTPCAST_SERVER__ROOT", root), ("TFTPCAST_CLUSTER__KEY", secret)],
    );
    assert!(r.success(), "deploy/pxe-lab.toml must pass check-config\n{r}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    let has = |want: &str| assert!(lines.contains(&want), "missing line {want:?} in:\n{}", r.stdout);
    has(&format!("server.root = \"{root}\"   (env TFTPCAST_SERVER__ROOT)"));
    has(&format!("multicast.start_delay_ms = 3000   (file {})", sample.display()));
    has(&format!("mapping.case_insensitive = true   (file {})", sample.display()));
    has("pacing.max_rate_mbps = 500   (flag --max-rate-mbps)");
    has("transfer.timeout_ms = 1000   (default)");
    // One address may be a whole lab: no per-address limit by default, a half-open budget.
    has("limits.max_half_open_per_client = 128   (default)");
    has("limits.defer_max_ms = 6000   (default)");
    has(&format!("limits.max_sessions_per_client = 16   (file {})", sample.display()));
    let r = tftpcast(&["check-config", "--root", root], &[]);
    assert!(r.stdout.lines().any(|l| l == "limits.max_sessions_per_client = 0   (default)"), "{r}");
    has("cluster.key = \"********\"   (env TFTPCAST_CLUSTER__KEY)");
    assert!(!r.stdout.contains(secret) && !r.stderr.contains(secret), "the cluster key leaked:\n{r}");
    let rules = lines.iter().find(|l| l.starts_with("mapping.rewrite = ")).expect("rewrite rules printed");
    assert!(rules.contains("pxelinux.cfg/hosts/$1"), "{rules}");
    // One line per setting, every one of them, each with its layer.
    let defaults = fs::read_to_string(repo().join("config/default.toml")).unwrap();
    let keys = defaults.lines().filter(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))).count();
    assert_eq!(lines.len(), keys, "one line per key of config/default.toml:\n{}", r.stdout);
    for l in &lines {
        let (_, from) = l.rsplit_once("   (").unwrap_or_else(|| panic!("no provenance in {l:?}"));
        assert!(
            from == "default)" || from.starts_with("file ") || from.starts_with("env TFTPCAST_") || from.starts_with("flag --"),
            "{l:?}"
        );
    }
}

#[test]
fn pxe_sample_serves_bios_uefi_and_windows_names() {
    let Some(fx) = fixture_if(only_tftpcast()) else { return };
    let [wds, host, default] = put(
        &fx.root,
        [("Boot/x64/wdsnbp.com", 1500), ("pxelinux.cfg/hosts/aa-bb-cc-dd-ee-ff", 400), ("pxelinux.cfg/default", 200)],
    );
    // The sample's listen address and port range are for a real lab: the test listens on
    // loopback and lets the kernel pick transfer ports.
    let server = Server::start_in_env(
        None,
        &fx.root,
        &["--config", pxe_lab().to_str().unwrap()],
        &[("TFTPCAST_SERVER__TID_PORT_RANGE", "")],
    );
    assert_raw_serves(&server, br"\boot\x64\WDSNBP.COM", &wds);
    assert_raw_serves(&server, b"/pxelinux.cfg/01-aa-bb-cc-dd-ee-ff", &host);
    // syslinux.efi's names: its own directory maps to the shared tree, then to the host file.
    assert_raw_serves(&server, b"efi64/pxelinux.cfg/01-aa-bb-cc-dd-ee-ff", &host);
    assert_raw_serves(&server, b"efi64/pxelinux.cfg/default", &default);
    assert_eq!(raw_error(&server, &fx, b"pxelinux.cfg/01-11-22-33-44-55-66").0, 1);
    server.finish(&fx);
}

/// `Key=value` lines of a unit or Dockerfile-like text, comments dropped.
fn directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect()
}

#[test]
fn systemd_unit_is_hardened_and_verifies() {
    if !only_tftpcast() {
        return;
    }
    let unit = fs::read_to_string(repo().join("deploy/tftpcast.service")).unwrap();
    let d = directives(&unit);
    let get = |k: &str| d.iter().filter(|(key, _)| key == k).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    for (k, v) in [
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateDevices", "yes"),
        ("Type", "notify"),
    ] {
        assert_eq!(get(k), vec![v], "{k}= in deploy/tftpcast.service");
    }
    // ExecStart's arguments are a valid configuration (check-config takes serve's flags).
    let exec = get("ExecStart");
    let args: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!((args[0], args[1]), ("/usr/bin/tftpcast", "serve"), "{exec:?}");
    // The configuration it names is the one the package installs: config/default.toml (with
    // a root that exists here).
    let default_toml = repo().join("config/default.toml");
    let mut check: Vec<&str> = vec!["check-config", "--root", "/"];
    let mut rest = args[2..].iter();
    while let Some(a) = rest.next() {
        if *a == "--config" {
            assert_eq!(rest.next(), Some(&"/etc/tftpcast/tftpcast.toml"));
            check.extend(["--config", default_toml.to_str().unwrap()]);
        } else {
            check.push(a);
        }
    }
    let r = tftpcast(&check, &[]);
    assert!(r.success(), "ExecStart's flags must form a valid configuration\n{r}");

    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("SKIPPED part: systemd-analyze is not installed; the unit was checked by reading only");
        return;
    };
    // verify wants ExecStart's binary to exist: point it at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("tftpcast.service");
    fs::write(&copy, unit.replace("/usr/bin/tftpcast", tftpcast_bin())).unwrap();
    let r = run(Command::new(analyze).arg("verify").arg(&copy), Duration::from_secs(60));
    let output = r.output();
    let ours: Vec<&str> = output.lines().filter(|l| l.contains("tftpcast.service")).map(str::trim).collect::<Vec<_>>();
    assert!(r.success() && ours.is_empty(), "systemd-analyze verify deploy/tftpcast.service:\n{r}");
}

#[test]
fn container_image_is_sane_and_builds_when_an_engine_is_available() {
    if !only_tftpcast() {
        return;
    }
    // By reading: multi-stage, non-root runtime, and every file it copies is in the context
    // its .dockerignore lets through.
    let dockerfile = fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage build expected: {froms:?}");
    assert!(lines.iter().any(|l| l.starts_with("COPY --from=")), "the runtime stage copies the binary from the build stage");
    let user = lines.iter().rev().find(|l| l.starts_with("USER ")).expect("a USER in the runtime stage");
    assert!(!user.contains("root") && !user.contains(" 0"), "runtime user must not be root: {user}");
    let ignore = fs::read_to_string(repo().join("deploy/Dockerfile.dockerignore")).unwrap();
    let allowed: Vec<&str> = ignore.lines().filter_map(|l| l.trim().strip_prefix('!')).collect();
    for l in lines.iter().filter(|l| l.starts_with("COPY ") && !l.starts_with("COPY --")) {
        let parts: Vec<&str> = l.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo().join(src).exists(), "Dockerfile copies {src}, which does not exist");
            assert!(allowed.contains(src), "{src} is copied but not let through by deploy/Dockerfile.dockerignore");
        }
    }

    let Some(docker) = which("docker") else {
        eprintln!("SKIPPED part: no docker client; the image was checked by reading only (CI={})", in_ci());
        return;
    };
    let info = run(Command::new(&docker).arg("info"), Duration::from_secs(30));
    if !info.success() {
        eprintln!(
            "SKIPPED part: no container engine (`docker info` fails){}; the image was checked by reading only",
            if in_ci() { ", and CI machines have none either" } else { "" }
        );
        return;
    }
    let tag = format!("tftpcast-operator-test:{}", std::process::id());
    let r = run(
        Command::new(&docker).args(["build", "-f", "deploy/Dockerfile", "-t", &tag, "."]).current_dir(repo()).env("DOCKER_BUILDKIT", "1"),
        Duration::from_secs(3600),
    );
    assert!(r.success(), "docker build failed\n{r}");
    let r2 = run(Command::new(&docker).args(["run", "--rm", "--entrypoint", "tftpcast", &tag, "check-config", "--root", "/srv/tftp"]), Duration::from_secs(120));
    let who = run(Command::new(&docker).args(["run", "--rm", "--entrypoint", "id", &tag, "-u"]), Duration::from_secs(120));
    let _ = run(Command::new(&docker).args(["rmi", "-f", &tag]), Duration::from_secs(120));
    assert!(r2.success(), "check-config inside the image\n{r2}");
    assert!(who.success() && who.stdout.trim() != "0", "the image must run as a non-root user\n{who}");
}

/// A listening address already taken: `serve` says so in one error line and exits 1, without
/// a panic from the actors it had started.
#[test]
fn serve_exits_cleanly_when_the_port_is_taken() {
    let fx = Fixture::new();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = Command::new(tftpcast_bin())
        .args(["serve", "--root"])
        .arg(&fx.root)
        .args(["--listen", &addr.to_string()])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The soft and hard open-file limits of a running process, from /proc.
fn nofile_limits(pid: i32) -> (u64, u64) {
    let text = fs::read_to_string(format!("/proc/{pid}/limits")).expect("read /proc/PID/limits");
    let line = text.lines().find(|l| l.starts_with("Max open files")).expect("Max open files line");
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (nums[0], nums[1])
}

/// Raises this test process's open-file limits to at least 8192 (the test opens more client
/// sockets than the usual 1024; as root the hard limit may be raised too). Returns the soft
/// limit now in force.
fn raise_own_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on local structs.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let want = libc::rlimit { rlim_cur: lim.rlim_max.max(8192), rlim_max: lim.rlim_max.max(8192) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Started from a shell with the usual soft limit of 1024, the node raises it to the hard
/// limit, logs it, and serves more concurrent transfers than 1024 descriptors would allow; a
/// hard limit too low for `limits.max_sessions` is warned about, naming the setting.
#[test]
fn serve_raises_the_open_file_limit_and_serves_beyond_1024() {
    if !only_tftpcast() || !require_tool("prlimit") {
        return;
    }
    let own = raise_own_nofile();
    assert!(own >= 4000, "the test needs 1500 client sockets: open-file limit {own}");
    let fx = Fixture::new();
    let [want] = put(fx.base(), [("fd.bin", 500)]);
    let args = ["--listen", "127.0.0.1:0"];
    let mut server = Server::start_wrapped(&["prlimit", "--nofile=1024:4096", "--"], fx.base(), &args, &[]);
    assert_eq!(nofile_limits(server.pid()), (4096, 4096), "soft limit raised to the hard limit");
    let logs = server.logs().join("\n");
    assert!(logs.contains("raised the open-file limit"), "{logs}");
    assert!(logs.contains("limits.max_sessions"), "the default max_sessions (10000) exceeds 4096: warned\n{logs}");

    // 1500 clients, each from its own loopback address (as machines in a lab), ask and never
    // acknowledge: every one must get DATA 1 from a transfer socket of its own, none "Server
    // busy". One deadline for all, not one per client.
    let to = server.addr();
    let clients: Vec<std::net::UdpSocket> = (0..1500u32)
        .map(|i| std::net::UdpSocket::bind((std::net::Ipv4Addr::new(127, 1, (i / 200) as u8, (i % 200 + 1) as u8), 0)).expect("bind"))
        .collect();
    let rrq = raw::rrq(b"fd.bin", "octet", &[]);
    for c in &clients {
        c.send_to(&rrq, to).expect("send RRQ");
    }
    let (mut data, mut errors) = (0, Vec::new());
    let mut buf = [0u8; 2048];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for c in &clients {
        let left = deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_millis(10));
        c.set_read_timeout(Some(left)).unwrap();
        match c.recv_from(&mut buf) {
            Ok((n, _)) if raw::opcode(&buf[..n]) == Some(3) && buf[4..n] == want[..] => data += 1,
            Ok((n, _)) => errors.push(raw::parse_error(&buf[..n])),
            Err(e) => errors.push(Some((0, format!("no answer: {e}")))),
        }
    }
    assert_eq!(data, 1500, "every client served; the others got {:?}", &errors[..errors.len().min(5)]);
    drop(clients);
    server.stop_clean();

    // A hard limit that covers max_sessions: raised, no warning.
    let env = [("TFTPCAST_LIMITS__MAX_SESSIONS", "1000")];
    let mut server = Server::start_wrapped(&["prlimit", "--nofile=1024:4096", "--"], fx.base(), &args, &env);
    assert_eq!(nofile_limits(server.pid()).0, 4096);
    let logs = server.logs().join("\n");
    assert!(!logs.contains("cannot cover limits.max_sessions"), "{logs}");
    server.stop_clean();
}

/// `tftpcast completions SHELL` and `tftpcast man DIR` come from the command-line definition:
/// every subcommand has a page naming its flags, and the bash script parses and completes
/// serve's flags.
#[test]
fn completions_and_man_pages_cover_every_subcommand() {
    if !only_tftpcast() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let r = tftpcast(&["man", dir.path().to_str().unwrap()], &[]);
    assert!(r.success(), "{r}");
    for sub in ["serve", "get", "put", "bench", "check-config", "completions", "man"] {
        let page = fs::read_to_string(dir.path().join(format!("tftpcast-{sub}.1"))).unwrap_or_else(|e| panic!("tftpcast-{sub}.1: {e}"));
        assert!(page.contains(&format!(".TH tftpcast-{sub} 1")), "{sub}: {page}");
        // Every long flag the subcommand's --help shows is on its page.
        let help = tftpcast(&[sub, "--help"], &[]);
        for flag in help.stdout.split_whitespace().filter(|w| w.starts_with("--")).map(|w| w.trim_end_matches(',')) {
            let name = flag.split(['=', '<', '[', '.']).next().unwrap().replace('-', "\\-");
            assert!(page.contains(&name), "{sub}: {flag} missing from its man page");
        }
    }
    assert!(dir.path().join("tftpcast.1").exists());

    for shell in ["bash", "zsh", "fish"] {
        let r = tftpcast(&["completions", shell], &[]);
        assert!(r.success() && r.stdout.contains("metrics-listen") && r.stdout.contains("check-config"), "{shell}: {r}");
    }
    let script = dir.path().join("tftpcast.bash");
    fs::write(&script, tftpcast(&["completions", "bash"], &[]).stdout).unwrap();
    let r = run(Command::new("bash").arg("-n").arg(&script), Duration::from_secs(10));
    assert!(r.success(), "the bash completion script does not parse: {r}");
    let r = tftpcast(&["completions", "tcsh"], &[]);
    assert_eq!(r.code(), Some(2), "an unknown shell is a usage error: {r}");
}

/// The MAC address of interface `v0` in namespace `ns`, as pxelinux spells it (aa-bb-...).
fn lab_mac(ns: &str) -> String {
    let r = run_ok(Command::new(tool("ip")).args(["-n", ns, "link", "show", "v0"]));
    let mac = r.stdout.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).expect("link/ether in ip link output");
    mac.replace(':', "-").to_ascii_lowercase()
}

/// Per-client files: two clients, each in its own namespace with its own address and MAC, ask
/// the same names. `${mac}`, `${hexip}` and `${ip}` give each its own file; a per-client file
/// that does not exist falls through to the next rule or to the plain name; a rule limited by
/// `clients` applies to those clients only.
#[test]
fn per_client_rules_give_each_client_its_own_file() {
    if !only_tftpcast() || !require_netns() || !require_tool("tftp") {
        return;
    }
    let fx = Fixture::new();
    let lab = Lab::new("perclient", 2);
    let (ip0, ip1) = (lab.client_ip(0), lab.client_ip(1));
    let hexip = |ip: std::net::Ipv4Addr| format!("{:08X}", u32::from(ip));
    let mac0 = lab_mac(&lab.clients[0]);
    let files = [
        ("pxelinux.cfg/default".to_string(), "default menu\n"),
        (format!("pxelinux.cfg/01-{mac0}"), "menu of client 0, by MAC\n"),
        (format!("pxelinux.cfg/{}", hexip(ip1)), "menu of client 1, by hex IP\n"),
        (format!("hosts/{ip0}/boot.ipxe"), "boot script of client 0\n"),
        ("boot.ipxe".to_string(), "everyone's boot script\n"),
        ("c1-only.txt".to_string(), "for client 1\n"),
    ];
    for (name, text) in &files {
        let p = fx.root.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    let cfg = config_file(
        &fx,
        "perclient.toml",
        &format!(
            "[[mapping.rewrite]]\nmatch = '^pxelinux.cfg/default$'\nreplace = 'pxelinux.cfg/01-${{mac}}'\n\n\
             [[mapping.rewrite]]\nmatch = '^pxelinux.cfg/default$'\nreplace = 'pxelinux.cfg/${{hexip}}'\n\n\
             [[mapping.rewrite]]\nmatch = '^(boot.ipxe)$'\nreplace = 'hosts/${{ip}}/$1'\n\n\
             [[mapping.rewrite]]\nclients = ['{ip1}/32']\nmatch = '^only-c1$'\nreplace = 'c1-only.txt'\n"
        ),
    );
    let listen = format!("{}:69", lab.server_ip());
    let server = Server::start_in(Some(&lab.server), &fx.root, &["--config", cfg.to_str().unwrap(), "--listen", &listen]);
    let get = |i: usize, name: &str| -> Result<String, String> {
        let out = fx.out(&format!("c{i}-{}", name.replace('/', "_")));
        let _ = fs::remove_file(&out);
        let r = Client::hpa().fetch(Some(&lab.clients[i]), server.addr(), name, &out, CLIENT_LIMIT);
        if !r.success() || Client::hpa().reported_error(&r) {
            return Err(r.output());
        }
        Ok(fs::read_to_string(&out).unwrap())
    };
    assert_eq!(get(0, "pxelinux.cfg/default").unwrap(), "menu of client 0, by MAC\n", "{}", server.log_tail(20));
    // Client 1 has no MAC file: the next rule (hex IP) gives its file.
    assert_eq!(get(1, "pxelinux.cfg/default").unwrap(), "menu of client 1, by hex IP\n", "{}", server.log_tail(20));
    assert_eq!(get(0, "boot.ipxe").unwrap(), "boot script of client 0\n");
    // No hosts/<ip1>/ file: the plain name.
    assert_eq!(get(1, "boot.ipxe").unwrap(), "everyone's boot script\n");
    assert_eq!(get(1, "only-c1").unwrap(), "for client 1\n");
    let e = get(0, "only-c1").unwrap_err();
    assert!(e.contains("File not found") || e.contains("not found"), "client 0 is not in the rule's clients: {e}");
    let logs = server.logs().join("\n");
    assert!(logs.contains(&mac0), "the rewrite to the MAC file is logged\n{logs}");
    server.finish_in_lab();
}
