//! Real clients against a real server on loopback: every download is compared by SHA-256 with
//! the original, every error by its TFTP code, and every test ends by checking that the server
//! still serves a new request and exits 0 on SIGTERM ([`Server::finish`]).
//!
//! Run against tftpd-hpa instead of tftpcast with `TFTPCAST_TEST_SERVER=<path of in.tftpd>`.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const BIG_LIMIT: Duration = Duration::from_secs(120);

/// A file of `fx` fetched by every client in `clients`, each of `files`.
fn fetch_all(fx: &Fixture, server: &Server, clients: &[Client], files: &[(&str, usize)]) {
    for c in clients {
        for &(name, _) in files {
            fetch_and_check(fx, c, server.addr(), name, CLIENT_LIMIT);
        }
    }
}

/// A raw WRQ for `name` must be answered with ERROR 2 (the server is read-only) within 5 s.
fn assert_wrq_refused(server: SocketAddr, name: &[u8]) {
    let (reply, _) = raw::exchange(server, &raw::wrq(name, "octet", &[]), Duration::from_secs(5))
        .expect("no answer to a WRQ");
    assert_eq!(
        raw::parse_error(&reply).map(|e| e.0),
        Some(2),
        "a WRQ to a read-only server must get ERROR 2, got {reply:?}"
    );
}

#[test]
fn listening_event_reports_the_bound_port() {
    let ready = only_tftpcast("the listening event is tftpcast's contract");
    let two = ["--listen", "127.0.0.1:0", "--listen", "127.0.0.2:0"];
    let Some((fx, server)) = serve_if(ready, &two) else { return };
    assert_eq!(server.addrs.len(), 2);
    for (addr, ip) in server.addrs.iter().zip(["127.0.0.1", "127.0.0.2"]) {
        assert_eq!(addr.ip().to_string(), ip, "listening addr {addr}");
        assert_ne!(
            addr.port(),
            0,
            "the `addr` field must show the port the kernel picked"
        );
        let r = raw::get(*addr, "b512.bin", "octet", &[], CLIENT_LIMIT);
        assert_eq!(
            r.data,
            fs::read(fx.path("b512.bin")).unwrap(),
            "via {addr}: {r}"
        );
        assert!(r.complete, "via {addr}: {r}");
    }
    server.finish(&fx);
}

#[test]
fn tftp_hpa_fetches_every_size() {
    let Some((fx, server)) = serve_if(require_tool("tftp"), &[]) else { return };
    fetch_all(&fx, &server, &[Client::hpa()], SIZES);
    fetch_and_check(&fx, &Client::hpa(), server.addr(), NESTED, CLIENT_LIMIT);
    server.finish(&fx);
}

#[test]
fn tftp_hpa_fetches_40_mib_across_block_number_rollover() {
    if !require_tool("tftp") {
        return;
    }
    let fx = Fixture::new().with_big();
    let server = Server::start(&fx.root, &[]);
    // Default blksize 512: 81920 blocks, so block 65535 is followed by block 0.
    let r = fetch_and_check(&fx, &Client::hpa(), server.addr(), BIG, BIG_LIMIT);
    eprintln!("tftp-hpa 40 MiB at blksize 512: {:.2?}", r.elapsed);
    server.finish(&fx);
}

#[test]
fn atftp_fetches_with_option_combinations() {
    let Some((fx, server)) = serve_if(require_tool("atftp"), &[]) else { return };
    let combos: Vec<Vec<&'static str>> = vec![
        vec![],
        vec!["blksize 1428"],
        vec!["tsize 0"],
        vec!["timeout 1"],
        vec!["windowsize 8"],
        vec!["blksize 1428", "windowsize 8"],
        vec!["blksize 1428", "tsize 0", "timeout 1", "windowsize 8"],
    ];
    let clients: Vec<Client> = combos
        .into_iter()
        .map(|options| Client::Atftp { options })
        .collect();
    fetch_all(&fx, &server, &clients, SIZES);
    server.finish(&fx);
}

#[test]
fn curl_fetches_with_default_options_blksize_and_no_options() {
    let Some((fx, server)) = serve_if(require_tool("curl"), &[]) else { return };
    // curl 7.88 rejects an OACK with `tsize 0` (DESIGN.md section 7): the empty file is
    // fetched with --tftp-no-options only.
    let with_options = [
        Client::Curl { args: vec![] },
        Client::Curl {
            args: vec!["--tftp-blksize", "1428"],
        },
    ];
    fetch_all(&fx, &server, &with_options, NONEMPTY);
    fetch_all(
        &fx,
        &server,
        &[Client::Curl {
            args: vec!["--tftp-no-options"],
        }],
        SIZES,
    );
    server.finish(&fx);
}

#[test]
fn busybox_fetches_every_size() {
    let Some((fx, server)) = serve_if(require_tool("busybox"), &[]) else { return };
    let clients = [
        Client::Busybox { blksize: None },
        Client::Busybox {
            blksize: Some(1428),
        },
    ];
    fetch_all(&fx, &server, &clients, SIZES);
    server.finish(&fx);
}

#[test]
fn tftpcast_get_fetches_every_size() {
    let fx = Fixture::new().with_big();
    let server = Server::start(&fx.root, &[]);
    let clients = [
        Client::Tftpcast { args: vec![] },
        Client::Tftpcast {
            args: vec!["--blksize", "1428"],
        },
        Client::Tftpcast {
            args: vec!["--blksize", "8192", "--windowsize", "16"],
        },
    ];
    fetch_all(&fx, &server, &clients, SIZES);
    let r = fetch_and_check(&fx, &clients[2], server.addr(), BIG, BIG_LIMIT);
    eprintln!(
        "tftpcast get 40 MiB at blksize 8192 windowsize 16: {:.2?}",
        r.elapsed
    );
    server.finish(&fx);
}

#[test]
fn raw_client_sees_negotiated_options_in_oack() {
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    for &(name, size) in SIZES {
        let opts = [("blksize", "1428"), ("tsize", "0"), ("timeout", "1")];
        let r = raw::get(server.addr(), name, "octet", &opts, CLIENT_LIMIT);
        assert!(r.complete && r.error.is_none(), "{name}: {r}");
        assert_eq!(r.data, fs::read(fx.path(name)).unwrap(), "{name}: {r}");
        assert_eq!(
            r.oack_value("tsize"),
            Some(size.to_string().as_str()),
            "{name}: tsize must be the size: {r}"
        );
        assert_eq!(r.oack_value("blksize"), Some("1428"), "{name}: {r}");
        assert_eq!(r.oack_value("timeout"), Some("1"), "{name}: {r}");
        assert_eq!(
            r.blocks,
            size as u64 / 1428 + 1,
            "{name}: block count at blksize 1428: {r}"
        );
    }
    // An option the server does not know is left out of the OACK, not echoed.
    let r = raw::get(
        server.addr(),
        "b513.bin",
        "octet",
        &[("blksize", "1024"), ("x-unknown", "7")],
        CLIENT_LIMIT,
    );
    assert!(r.complete, "{r}");
    assert_eq!(r.oack_value("x-unknown"), None, "{r}");
    assert_eq!(r.oack_value("blksize"), Some("1024"), "{r}");
    if server.is_tftpcast() {
        // tftpd-hpa ignores windowsize (DESIGN.md section 7); tftpcast implements RFC 7440.
        let windowed = [("blksize", "1428"), ("windowsize", "8")];
        let r = raw::get(server.addr(), ONE_MIB, "octet", &windowed, CLIENT_LIMIT);
        assert_eq!(r.oack_value("windowsize"), Some("8"), "{r}");
        assert_eq!(r.data, fs::read(fx.path(ONE_MIB)).unwrap(), "{r}");
    }
    server.finish(&fx);
}

#[test]
fn netascii_round_trip_with_tftp_hpa() {
    let Some((fx, server)) = serve_if(require_tool("tftp"), &[]) else { return };
    let local = fs::read(fx.path(TEXT)).unwrap();
    // On the wire: LF -> CR LF and CR -> CR NUL, across block boundaries too.
    let r = raw::get(server.addr(), TEXT, "netascii", &[], CLIENT_LIMIT);
    assert!(r.complete && r.error.is_none(), "{r}");
    let wire = netascii_encode(&local);
    assert_eq!(r.data.len(), wire.len(), "netascii wire length: {r}");
    assert!(
        r.data == wire,
        "netascii wire bytes differ from the RFC 764 encoding of the file"
    );
    // tftp-hpa decodes it back to the local form, byte for byte.
    for mode in ["netascii", "ascii"] {
        let client = Client::Hpa { mode };
        let out = fx.out(TEXT);
        let run = client.fetch(None, server.addr(), TEXT, &out, CLIENT_LIMIT);
        assert_fetched(
            &client,
            &run,
            &out,
            &sha256(&local),
            local.len(),
            "netascii round trip",
        );
    }
    server.finish(&fx);
}

#[test]
fn missing_file_is_tftp_error_1() {
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let missing = "no-such-file.bin";
    let r = raw::get(server.addr(), missing, "octet", &[], CLIENT_LIMIT);
    // RFC 1350's text, which scripts and client wrappers match on (as from tftpd-hpa and
    // atftpd); the details are in the server's log.
    assert_eq!(
        r.error.as_ref().map(|e| (e.0, e.1.as_str())),
        Some((1, "File not found")),
        "raw RRQ for a missing file: {r}"
    );
    assert!(r.data.is_empty() && r.blocks == 0, "{r}");
    let r = raw::get(
        server.addr(),
        missing,
        "octet",
        &[("blksize", "1428"), ("tsize", "0")],
        CLIENT_LIMIT,
    );
    assert_eq!(
        r.error.as_ref().map(|e| e.0),
        Some(1),
        "raw RRQ with options for a missing file: {r}"
    );

    let no_bytes = |out: &std::path::Path, who: &str| {
        let n = fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        assert_eq!(n, 0, "{who} wrote {n} bytes for a missing file");
    };
    if require_tool("tftp") {
        let out = fx.out("missing");
        let run = Client::hpa().fetch(None, server.addr(), missing, &out, CLIENT_LIMIT);
        // tftp-hpa prints the server's text.
        assert!(
            run.output().contains("Error code 1: File not found"),
            "tftp-hpa must report `Error code 1: File not found`:\n{run}"
        );
        no_bytes(&out, "tftp-hpa");
        // The same for an access violation (a name leaving the root).
        let run = Client::hpa().fetch(None, server.addr(), "../etc/passwd", &out, CLIENT_LIMIT);
        assert!(
            run.output().contains("Error code 2: Access violation"),
            "tftp-hpa must report `Error code 2: Access violation`:\n{run}"
        );
    }
    if require_tool("curl") {
        for args in [vec![], vec!["--tftp-no-options"]] {
            let out = fx.out("missing");
            let run = Client::Curl { args }.fetch(None, server.addr(), missing, &out, CLIENT_LIMIT);
            // curl maps TFTP error 1 to its exit code 68 (CURLE_TFTP_NOTFOUND).
            assert_eq!(
                run.code(),
                Some(68),
                "curl must exit 68 (TFTP file not found):\n{run}"
            );
            no_bytes(&out, "curl");
        }
    }
    if require_tool("atftp") {
        let out = fx.out("missing");
        let run = Client::Atftp {
            options: vec!["blksize 1428"],
        }
        .fetch(None, server.addr(), missing, &out, CLIENT_LIMIT);
        assert!(!run.success(), "atftp must fail on a missing file:\n{run}");
        assert!(
            run.output().contains("error received from server"),
            "atftp must report the server's error:\n{run}"
        );
        no_bytes(&out, "atftp");
    }
    if require_tool("busybox") {
        let out = fx.out("missing");
        let run = Client::Busybox { blksize: None }.fetch(
            None,
            server.addr(),
            missing,
            &out,
            CLIENT_LIMIT,
        );
        assert!(
            !run.success(),
            "busybox tftp must fail on a missing file:\n{run}"
        );
        assert!(
            run.output().contains("(1)"),
            "busybox tftp must report server error (1):\n{run}"
        );
        no_bytes(&out, "busybox");
    }
    let out = fx.out("missing");
    let run =
        Client::Tftpcast { args: vec![] }.fetch(None, server.addr(), missing, &out, CLIENT_LIMIT);
    assert!(
        !run.success() && !run.timed_out,
        "tftpcast get must fail promptly on a missing file:\n{run}"
    );
    no_bytes(&out, "tftpcast get");
    server.finish(&fx);
}

/// Names that try to leave the root. Each must be refused with TFTP error 2 or 1.
fn traversal_names(fx: &Fixture) -> Vec<String> {
    let mut names: Vec<String> = [
        "../canary.txt",
        "/../canary.txt",
        "../../canary.txt",
        "sub/../../canary.txt",
        "sub/dir/../../../canary.txt",
        "./../canary.txt",
        "../etc/passwd",
        "/../../etc/passwd",
        "../../../../../../../../etc/passwd",
        "/../../../../../../../../etc/passwd",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The canary's absolute path: served relative to the root or refused, never followed.
    names.push(fx.canary.to_string_lossy().into_owned());
    names
}

fn assert_refused_no_leak(fx: &Fixture, r: &raw::Outcome, name: &str) {
    fx.assert_no_canary(&r.data, name);
    assert!(
        !contains(&r.data, b"root:"),
        "{name}: received what looks like the system's passwd file: {r}"
    );
    assert!(
        r.blocks == 0 && r.data.is_empty(),
        "{name}: the server sent DATA for a path outside the root: {r}"
    );
    let code = r.error.as_ref().map(|e| e.0);
    assert!(
        matches!(code, Some(1) | Some(2)),
        "{name}: want TFTP error 2 (or 1), got {r}"
    );
}

#[test]
fn path_traversal_is_refused_and_the_canary_never_leaves() {
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    for name in traversal_names(&fx) {
        let r = raw::get(server.addr(), &name, "octet", &[], CLIENT_LIMIT);
        assert_refused_no_leak(&fx, &r, &name);
        let r = raw::get(
            server.addr(),
            &name,
            "octet",
            &[("tsize", "0"), ("blksize", "1428")],
            CLIENT_LIMIT,
        );
        assert_refused_no_leak(&fx, &r, &format!("{name} (with options)"));
        assert!(
            r.oack.is_none(),
            "{name}: an OACK (e.g. tsize of a file outside the root) leaks: {r}"
        );
        let r = raw::get(server.addr(), &name, "netascii", &[], CLIENT_LIMIT);
        assert_refused_no_leak(&fx, &r, &format!("{name} (netascii)"));
    }
    if require_tool("tftp") {
        for name in [
            "../canary.txt",
            "/../canary.txt",
            "../etc/passwd",
            "/../../etc/passwd",
        ] {
            let out = fx.out("traversal");
            let run = Client::hpa().fetch(None, server.addr(), name, &out, CLIENT_LIMIT);
            let got = fs::read(&out).unwrap_or_default();
            fx.assert_no_canary(&got, name);
            assert!(
                got.is_empty(),
                "tftp-hpa received {} bytes for {name}",
                got.len()
            );
            let o = run.output();
            assert!(
                o.contains("Error code 2") || o.contains("Error code 1"),
                "tftp-hpa {name}: want error 2 or 1:\n{run}"
            );
        }
    }
    if require_tool("curl") {
        for name in ["../canary.txt", "/../canary.txt"] {
            let out = fx.out("traversal");
            let run = Client::Curl {
                args: vec!["--tftp-no-options"],
            }
            .fetch(None, server.addr(), name, &out, CLIENT_LIMIT);
            fx.assert_no_canary(&fs::read(&out).unwrap_or_default(), name);
            // 69 = TFTP access violation, 68 = TFTP file not found.
            assert!(
                matches!(run.code(), Some(69) | Some(68)),
                "curl {name}: want exit 69 or 68:\n{run}"
            );
        }
    }
    server.finish(&fx);
}

#[test]
fn symlink_out_of_the_root_is_refused() {
    // file_cache's contract: "nothing outside [the root] is ever opened".
    let fx = Fixture::new();
    std::os::unix::fs::symlink(format!("../{CANARY}"), fx.root.join("escape.txt")).unwrap();
    std::os::unix::fs::symlink(&fx.canary, fx.root.join("escape-abs.txt")).unwrap();
    let server = Server::start(&fx.root, &[]);
    for name in ["escape.txt", "escape-abs.txt"] {
        let r = raw::get(server.addr(), name, "octet", &[], CLIENT_LIMIT);
        assert_refused_no_leak(&fx, &r, name);
    }
    server.finish(&fx);
}

#[test]
fn write_request_is_refused_when_read_only() {
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    assert_wrq_refused(server.addr(), b"upload.bin");
    // Also for a file that exists: no overwrite.
    assert_wrq_refused(server.addr(), b"b512.bin");
    if require_tool("tftp") {
        let local = fx.base().join("to-upload.bin");
        fs::write(&local, pseudo_random(3000, 99)).unwrap();
        let mut cmd = std::process::Command::new(tool("tftp"));
        cmd.args([
            &server.addr().ip().to_string(),
            &server.port().to_string(),
            "-m",
            "binary",
            "-c",
            "put",
        ])
        .arg(&local)
        .arg("put-by-hpa.bin");
        let run = run(&mut cmd, CLIENT_LIMIT);
        assert!(
            run.output().contains("Error code 2"),
            "tftp-hpa put must report `Error code 2`:\n{run}"
        );
        assert!(
            !fx.root.join("put-by-hpa.bin").exists(),
            "a read-only server created an uploaded file"
        );
    }
    if require_tool("curl") {
        let local = fx.base().join("to-upload-curl.bin");
        fs::write(&local, pseudo_random(3000, 98)).unwrap();
        let mut cmd = std::process::Command::new(tool("curl"));
        cmd.args(["-sS", "-T"])
            .arg(&local)
            .arg(format!("tftp://{}/put-by-curl.bin", server.addr()));
        let run = run(&mut cmd, CLIENT_LIMIT);
        assert_eq!(
            run.code(),
            Some(69),
            "curl upload must exit 69 (TFTP access violation):\n{run}"
        );
        assert!(
            !fx.root.join("put-by-curl.bin").exists(),
            "a read-only server created an uploaded file"
        );
    }
    assert_eq!(
        sha256_file(&fx.path("b512.bin")),
        sha256(&pseudo_random(512, seed_of("b512.bin")))
    );
    server.finish(&fx);
}

/// 50 clients at once (tftp-hpa and curl alternating), each fetching 1 MiB.
fn fifty_concurrent(fx: &Arc<Fixture>, server: &Server) -> Duration {
    let have_hpa = require_tool("tftp");
    let have_curl = require_tool("curl");
    let mut kinds = Vec::new();
    if have_hpa {
        kinds.push(Client::hpa());
    }
    if have_curl {
        kinds.push(Client::Curl { args: vec![] });
    }
    kinds.push(Client::Tftpcast { args: vec![] });
    let want = fx.sha(ONE_MIB);
    let start = Instant::now();
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let client = kinds[i % kinds.len().min(2)].clone();
            let fx = fx.clone();
            let addr = server.addr();
            thread::spawn(move || {
                let out = fx.out("concurrent");
                let run = client.fetch(None, addr, ONE_MIB, &out, Duration::from_secs(120));
                (client, run, out)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for h in handles {
        let (client, run, out) = h.join().unwrap();
        let ok = run.success()
            && !client.reported_error(&run)
            && out.exists()
            && sha256_file(&out) == want;
        if !ok {
            failures.push(format!("{client:?}: {run}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 50 concurrent fetches failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    start.elapsed()
}

#[test]
fn fifty_concurrent_clients_get_exact_bytes() {
    let fx = Arc::new(Fixture::new());
    let server = Server::start(&fx.root, &[]);
    let took = fifty_concurrent(&fx, &server);
    eprintln!("50 concurrent 1 MiB fetches: {took:.2?}");
    server.finish(&fx);
}

#[test]
fn malformed_packets_and_errors_do_not_hurt_the_server() {
    let fx = Arc::new(Fixture::new());
    let server = Server::start(&fx.root, &[]);
    let addr = server.addr();
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0, 1],
        vec![0, 1, b'x'],                 // RRQ without terminators
        b"\x00\x01b512.bin\x00".to_vec(), // RRQ without mode
        b"\x00\x01b512.bin\x00bogusmode\x00".to_vec(),
        b"\x00\x01b512.bin\x00octet\x00blksize\x00".to_vec(), // option without value
        b"\x00\x01b512.bin\x00octet\x00blksize\x000\x00".to_vec(),
        b"\x00\x01b512.bin\x00octet\x00blksize\x0099999999999999999999\x00".to_vec(),
        b"\x00\x01b512.bin\x00octet\x00windowsize\x000\x00".to_vec(),
        b"\x00\x01b512.bin\x00octet\x00tsize\x00-1\x00".to_vec(),
        b"\x00\x01b512.bin\x00octet\x00timeout\x00999\x00".to_vec(),
        vec![0, 3, 0, 1, 1, 2, 3],    // DATA to the listening port
        vec![0, 4, 0, 1],             // ACK to the listening port
        vec![0, 5, 0, 1, b'x', 0],    // ERROR to the listening port
        vec![0, 6, b'a', 0, b'b', 0], // OACK to the listening port
        vec![0, 9, 1, 2, 3],          // unknown opcode
        vec![0xff; 600],
        pseudo_random(1500, 5),
    ];
    for g in &garbage {
        if let Some((reply, _)) = raw::exchange(addr, g, Duration::from_millis(300)) {
            let op = raw::opcode(&reply);
            // A garbled request may be refused (ERROR) or, when it is a valid RRQ after all,
            // served: never anything else.
            assert!(
                matches!(op, Some(raw::ERROR) | Some(raw::DATA) | Some(raw::OACK)),
                "reply {reply:?} to {g:?}"
            );
        }
    }
    // Errors of every kind on the same server.
    assert_eq!(
        raw::get(addr, "missing", "octet", &[], CLIENT_LIMIT)
            .error
            .map(|e| e.0),
        Some(1)
    );
    for name in traversal_names(&fx) {
        assert_refused_no_leak(
            &fx,
            &raw::get(addr, &name, "octet", &[], CLIENT_LIMIT),
            &name,
        );
    }
    assert_wrq_refused(addr, b"upload.bin");
    // An abandoned transfer: take a few blocks, then vanish.
    let _ = raw::get(addr, ONE_MIB, "octet", &[], Duration::from_millis(50));
    // Then real clients, at once, and a new request after all of that.
    fifty_concurrent(&fx, &server);
    for client in [Client::hpa(), Client::Curl { args: vec![] }] {
        if client.available() {
            fetch_and_check(&fx, &client, addr, ONE_MIB, CLIENT_LIMIT);
        }
    }
    server.finish(&fx);
}

#[test]
fn sigterm_drains_an_active_transfer_then_exits_0() {
    let fx = Fixture::new();
    let mut server = Server::start(&fx.root, &[]);
    let pid = server.pid();
    let mut signalled = false;
    // Slow lock-step reader: SIGTERM arrives after block 200 of 2049.
    let r = raw::get_with(
        server.addr(),
        ONE_MIB.as_bytes(),
        "octet",
        &[],
        Duration::from_secs(60),
        |n| {
            if n == 200 {
                // SAFETY: kill(2) on the server child's pid.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                signalled = true;
            }
        },
    );
    assert!(signalled, "the transfer never reached block 200: {r}");
    assert!(
        r.complete && r.error.is_none(),
        "a transfer active at SIGTERM must be drained, not cut: {r}"
    );
    assert_eq!(sha256(&r.data), fx.sha(ONE_MIB), "{r}");
    let st = server
        .wait_exit(STOP_GRACE)
        .unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", server.log_tail(40)));
    if server.is_tftpcast() {
        assert_eq!(
            st.code(),
            Some(0),
            "exit status after draining: {st}\n{}",
            server.log_tail(40)
        );
        server.assert_logs_are_json();
    }
}

#[test]
fn sigint_exits_0() {
    let fx = Fixture::new();
    let mut server = Server::start(&fx.root, &[]);
    let r = raw::get(server.addr(), "b513.bin", "octet", &[], CLIENT_LIMIT);
    assert!(r.complete, "{r}");
    server.stop_clean_with(libc::SIGINT, "SIGINT");
}

/// A new request from a client port that just finished a transfer (ports are reused quickly)
/// is a new transfer, served at once.
#[test]
fn a_new_request_from_a_reused_port_is_served_at_once() {
    let fx = Fixture::new();
    let server = Server::start(&fx.root, &[]);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let want = fs::read(fx.path("b513.bin")).unwrap();
    let request = raw::rrq(b"b513.bin", "octet", &[]);
    let fetch = |sock: &std::net::UdpSocket| -> Vec<u8> {
        let mut buf = vec![0u8; 2048];
        sock.send_to(&request, server.addr()).unwrap();
        let mut got = Vec::new();
        loop {
            let (n, from) = sock.recv_from(&mut buf).expect("DATA from the server within 500 ms");
            assert_eq!(raw::opcode(&buf[..n]), Some(3), "expected DATA");
            got.extend_from_slice(&buf[4..n]);
            sock.send_to(&raw::ack(u16::from_be_bytes([buf[2], buf[3]])), from).unwrap();
            if n - 4 < 512 {
                return got;
            }
        }
    };
    assert_eq!(fetch(&sock), want);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(fetch(&sock), want, "the second request from the same port was not served at once");
    server.finish(&fx);
}
