//! Uploads (write requests, issue #7): real clients (tftp-hpa, atftp, curl, `tftpcast put`)
//! and a raw socket for exact error codes, against `tftpcast serve --allow-write` on
//! loopback. Every stored file is compared byte for byte, and every failure case checks that
//! nothing (no file, no hidden temporary file) is left behind.

mod common;

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);
const BIG_LIMIT: Duration = Duration::from_secs(180);

/// A file to upload, outside the root.
fn source(fx: &Fixture, name: &str, len: usize) -> PathBuf {
    let p = fx.out(&format!("src-{name}"));
    fs::write(&p, pseudo_random(len, seed_of(name))).unwrap();
    p
}

/// Every name in `dir` (hidden temporary files included), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn temp_files(dir: &Path) -> Vec<String> {
    listing(dir).into_iter().filter(|n| n.ends_with(".upload")).collect()
}

/// `client` with its `options` uploads `src` as `remote` within `limit`: the client must
/// report success, and the root must then hold the exact bytes of `src` as `remote`.
fn assert_put(fx: &Fixture, server: &Server, (client, options): (&str, &[&str]), src: &Path, remote: &str, limit: Duration) {
    let r = run(&mut put_command(client, server.addr(), src, remote, options), limit);
    let ctx = format!("{client} {options:?} put of {remote}");
    assert!(put_ok(&r), "{ctx}: {r}\n{}", server.log_tail(20));
    assert_stored(fx, remote, src, &r, &ctx);
}

fn assert_stored(fx: &Fixture, remote: &str, src: &Path, r: &Run, ctx: &str) {
    let want = fs::read(src).unwrap();
    let got = fs::read(fx.path(remote)).unwrap_or_else(|e| panic!("{ctx}: {remote} not stored: {e}\n{r}"));
    assert!(got.len() == want.len() && sha256(&got) == sha256(&want), "{ctx}: stored {} bytes, sent {} (or content differs)\n{r}", got.len(), want.len());
}

/// The command uploading `local` as `remote` with one of the real clients.
fn put_command(client: &str, server: SocketAddr, local: &Path, remote: &str, extra: &[&str]) -> Command {
    let (host, port) = (server.ip().to_string(), server.port().to_string());
    match client {
        "tftp" => {
            let mut c = Command::new(tool("tftp"));
            let mode = if extra.contains(&"netascii") { "netascii" } else { "binary" };
            c.args([&host, &port, "-m", mode, "-c", "put"]).arg(local).arg(remote);
            c
        }
        "atftp" => {
            let mut c = Command::new(tool("atftp"));
            for o in extra {
                c.args(["--option", o]);
            }
            c.args(["--put", "-l"]).arg(local).args(["-r", remote, &host, &port]);
            c
        }
        "curl" => {
            let mut c = Command::new(tool("curl"));
            c.args(["-sS", "--path-as-is"]).args(extra).arg("-T").arg(local).arg(format!("tftp://{server}/{remote}"));
            c
        }
        "tftpcast" => {
            let mut c = Command::new(tftpcast_bin());
            c.args(["put", "--server", &server.to_string()]).args(extra).arg(local).arg(remote);
            c
        }
        other => panic!("no client {other}"),
    }
}

/// Success as each client reports it (tftp-hpa exits 0 after an error and says so).
fn put_ok(r: &Run) -> bool {
    r.success() && !r.output().contains("Error code") && !r.output().contains("timed out")
}

/// Raw WRQ: the first reply's (code, message) if it is an ERROR.
fn wrq_error(server: SocketAddr, name: &[u8], opts: &[(&str, &str)]) -> Option<(u16, String)> {
    let (reply, _) = raw::exchange(server, &raw::wrq(name, "octet", opts), Duration::from_secs(3)).expect("an answer to the WRQ");
    raw::parse_error(&reply)
}

fn data(block: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = raw::DATA.to_be_bytes().to_vec();
    p.extend_from_slice(&block.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 70000];
    let (n, from) = s.recv_from(&mut buf).expect("a reply within the timeout");
    (buf[..n].to_vec(), from)
}

/// A raw WRQ for `name` from a new port: the socket, the first reply, and the port it came
/// from (the transfer's TID).
fn raw_wrq(server: SocketAddr, name: &[u8], opts: &[(&str, &str)]) -> (UdpSocket, Vec<u8>, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.send_to(&raw::wrq(name, "octet", opts), server).unwrap();
    let (reply, tid) = recv(&s);
    (s, reply, tid)
}

/// A raw upload of `name` under way: its WRQ answered by ACK 0, then a full first block of
/// `fill` bytes answered by ACK 1. Returns the socket, the TID and that block.
fn raw_upload_started(server: SocketAddr, name: &[u8], fill: u8) -> (UdpSocket, SocketAddr, Vec<u8>) {
    let (s, reply, tid) = raw_wrq(server, name, &[]);
    assert_eq!(reply, raw::ack(0));
    let block1 = vec![fill; 512];
    s.send_to(&data(1, &block1), tid).unwrap();
    assert_eq!(recv(&s).0, raw::ack(1));
    (s, tid, block1)
}

#[test]
fn every_client_uploads_edge_sizes_byte_exact() {
    let Some((fx, server)) = serve_if(testing_tftpcast(), &["--allow-write"]) else { return };
    for client in ["tftp", "atftp", "curl", "tftpcast"] {
        if client != "tftpcast" && !require_tool(client) {
            continue;
        }
        for (len, label) in [(0usize, "0"), (511, "511"), (512, "512"), (1 << 20, "1m")] {
            let remote = format!("up-{client}-{label}.bin");
            let src = source(&fx, &remote, len);
            assert_put(&fx, &server, (client, &[]), &src, &remote, LIMIT);
        }
    }
    assert!(temp_files(&fx.root).is_empty(), "temporary files left: {:?}", listing(&fx.root));
    // The logs tell the story with the transfer's span fields.
    let done = events(&server, "upload finished");
    assert!(done.len() >= 4, "upload finished events: {}", done.len());
    let ev = done.iter().find(|e| e["span"]["file"] == "up-tftpcast-1m.bin").expect("finished event for up-tftpcast-1m.bin");
    assert_eq!(ev["fields"]["bytes"], 1 << 20);
    for key in ["peer", "tid", "mode", "blksize", "windowsize"] {
        assert!(!ev["span"][key].is_null(), "span field {key} missing: {ev}");
    }
    assert!(ev["fields"]["duration_ms"].is_u64());
    assert!(!events(&server, "upload started").is_empty());
    server.finish(&fx);
}

#[test]
fn forty_mib_uploads_with_rollover_and_windows() {
    let Some((fx, server)) = serve_if(testing_tftpcast(), &["--allow-write"]) else { return };
    let src = source(&fx, "big", BIG_SIZE);
    // tftpcast put with a window and large blocks, announcing its size.
    assert_put(&fx, &server, ("tftpcast", &["--blksize", "8192", "--windowsize", "16", "--tsize"]), &src, "big-window.bin", BIG_LIMIT);
    // 512-byte lock-step: 81920 blocks, so the block number rolls over.
    assert_put(&fx, &server, ("tftpcast", &[]), &src, "big-lockstep.bin", BIG_LIMIT);
    if require_tool("tftp") {
        assert_put(&fx, &server, ("tftp", &[]), &src, "big-hpa.bin", BIG_LIMIT);
    }
    server.finish(&fx);
}

#[test]
fn option_variants_and_the_oack() {
    let Some((fx, server)) = serve_if(testing_tftpcast(), &["--allow-write"]) else { return };
    let src = source(&fx, "variants", 300_000);
    let variants: &[&[&str]] = &[
        &["--blksize", "1428"],
        &["--blksize", "8"],
        &["--windowsize", "8"],
        &["--blksize", "1024", "--windowsize", "4", "--tsize"],
        &["--tsize", "--timeout", "2"],
        &["--blksize", "65464", "--windowsize", "2"],
    ];
    for (i, v) in variants.iter().enumerate() {
        let remote = format!("variant-{i}.bin");
        assert_put(&fx, &server, ("tftpcast", v), &src, &remote, LIMIT);
    }
    if require_tool("atftp") {
        assert_put(&fx, &server, ("atftp", &["blksize 1428", "tsize", "windowsize 4"]), &src, "atftp-opts.bin", LIMIT);
    }
    if require_tool("curl") {
        assert_put(&fx, &server, ("curl", &["--tftp-blksize", "1024"]), &src, "curl-opts.bin", LIMIT);
    }
    // The OACK echoes the announced tsize and the granted options, from a transfer port.
    let (s, reply, tid) = raw_wrq(server.addr(), b"oack.bin", &[("blksize", "1024"), ("tsize", "1234"), ("windowsize", "4")]);
    assert_eq!(raw::opcode(&reply), Some(raw::OACK), "{reply:?}");
    assert_ne!(tid.port(), server.port(), "answers come from a transfer port (TID)");
    let oack = raw::parse_oack(&reply);
    let get = |k: &str| oack.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!((get("blksize"), get("tsize"), get("windowsize")), (Some("1024"), Some("1234"), Some("4")), "{oack:?}");
    // The client gives up: the upload ends at once and leaves nothing.
    let mut err = raw::ERROR.to_be_bytes().to_vec();
    err.extend_from_slice(&[0, 0]);
    err.extend_from_slice(b"changed my mind\0");
    s.send_to(&err, tid).unwrap();
    // Without options: ACK 0 (a new transfer comes from a new port).
    let (s, reply, tid) = raw_wrq(server.addr(), b"ack0.bin", &[]);
    assert_eq!(reply, raw::ack(0));
    s.send_to(&data(1, b"short"), tid).unwrap();
    assert_eq!(recv(&s).0, raw::ack(1));
    assert_eq!(fs::read(fx.path("ack0.bin")).unwrap(), b"short");
    assert!(wait_until(Duration::from_secs(3), || !fx.path("oack.bin").exists() && temp_files(&fx.root).is_empty()), "{:?}", listing(&fx.root));
    assert!(events(&server, "upload failed").iter().any(|e| e["fields"]["reason"].as_str().unwrap_or("").contains("changed my mind")));
    server.finish(&fx);
}

#[test]
fn netascii_uploads_are_stored_as_local_text() {
    let Some((fx, server)) = serve_if(testing_tftpcast(), &["--allow-write"]) else { return };
    let src = fx.out("text-src.txt");
    fs::write(&src, netascii_text()).unwrap();
    assert_put(&fx, &server, ("tftpcast", &["--mode", "netascii", "--blksize", "64"]), &src, "text-tftpcast.txt", LIMIT);
    if require_tool("tftp") {
        assert_put(&fx, &server, ("tftp", &["netascii"]), &src, "text-hpa.txt", LIMIT);
    }
    server.finish(&fx);
}

#[test]
fn create_only_refuses_an_existing_name_with_error_6() {
    let Some((fx, server)) = serve_if(testing_tftpcast(), &["--allow-write"]) else { return };
    let before = fs::read(fx.path("b512.bin")).unwrap();
    let (code, msg) = wrq_error(server.addr(), b"b512.bin", &[]).expect("an ERROR");
    assert_eq!(code, 6, "{msg}");
    assert!(msg.contains("File already exists"), "{msg}");
    if server.is_tftpcast() {
        let src = source(&fx, "clobber", 1000);
        let r = run(&mut put_command("tftpcast", server.addr(), &src, "b512.bin", &[]), LIMIT);
        assert_eq!(r.code(), Some(1), "{r}");
        assert!(r.stderr.contains("tftpcast put: server error 6: File already exists"), "{r}");
        assert_eq!(fs::read(fx.path("b512.bin")).unwrap(), before, "the existing file is untouched");
        assert!(temp_files(&fx.root).is_empty());
        server.finish(&fx);
    }
}

#[test]
fn overwrite_mode_replaces_an_existing_file() {
    let Some(fx) = fixture_if(testing_tftpcast()) else { return };
    let server = Server::start_in_env(None, &fx.root, &["--allow-write"], &[("TFTPCAST_UPLOADS__OVERWRITE", "true")]);
    let src = source(&fx, "replacement", 70_000);
    for client in ["tftpcast", "curl"] {
        if client == "curl" && !require_tool("curl") {
            continue;
        }
        assert_put(&fx, &server, (client, &[]), &src, ONE_MIB, LIMIT);
    }
    // Downloads see the new contents (the cache notices the replaced file).
    let got = raw::get(server.addr(), ONE_MIB, "octet", &[], LIMIT);
    assert_eq!(got.data, fs::read(&src).unwrap(), "{got}");
    // A directory is never replaced.
    assert_eq!(wrq_error(server.addr(), b"sub", &[]).map(|e| e.0), Some(2));
    assert!(temp_files(&fx.root).is_empty());
    server.finish(&fx);
}

#[test]
fn a_killed_upload_leaves_no_file_and_no_temporary_file() {
    let Some(fx) = fixture_if(testing_tftpcast() && require_tool("tftp")) else { return };
    // A short timeout and few retries, so the server gives up within a second or two.
    let env = [("TFTPCAST_TRANSFER__TIMEOUT_MS", "200"), ("TFTPCAST_TRANSFER__MAX_TIMEOUT_MS", "400"), ("TFTPCAST_TRANSFER__MAX_RETRIES", "3")];
    let server = Server::start_in_env(None, &fx.root, &["--allow-write"], &env);
    let src = source(&fx, "killed", BIG_SIZE);
    let before = listing(&fx.root);
    // tftp-hpa uploads in 512-byte lock-step: seconds for 40 MiB, time to kill it.
    let mut cmd = put_command("tftp", server.addr(), &src, "killed.bin", &[]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = ChildGuard(cmd.spawn().unwrap());
    let started = wait_until(Duration::from_secs(20), || {
        temp_files(&fx.root).iter().any(|t| fs::metadata(fx.path(t)).map(|m| m.len() > 1 << 20).unwrap_or(false))
    });
    assert!(started, "no temporary file grew past 1 MiB: {:?}\n{}", listing(&fx.root), server.log_tail(20));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGKILL) };
    let _ = child.0.wait();
    let failed = wait_until(Duration::from_secs(20), || !events(&server, "upload failed").is_empty());
    assert!(failed, "no `upload failed` event\n{}", server.log_tail(20));
    assert!(wait_until(Duration::from_secs(5), || listing(&fx.root) == before), "left behind: {:?}", listing(&fx.root));
    let ev = &events(&server, "upload failed")[0];
    assert!(ev["fields"]["reason"].as_str().unwrap_or("").contains("timed out"), "{ev}");
    assert_eq!(ev["span"]["file"], "killed.bin");
    server.finish(&fx);
}

#[test]
fn size_limit_refuses_with_error_3() {
    let Some(fx) = fixture_if(testing_tftpcast()) else { return };
    let server = Server::start_in_env(None, &fx.root, &["--allow-write"], &[("TFTPCAST_UPLOADS__MAX_BYTES", "100000")]);
    let before = listing(&fx.root);
    // Announced too large: refused before any data.
    let (code, msg) = wrq_error(server.addr(), b"big.bin", &[("tsize", "100001")]).expect("an ERROR");
    assert_eq!(code, 3, "{msg}");
    assert!(msg.contains("Disk full or allocation exceeded"), "{msg}");
    // Not announced: aborted when the data passes the limit.
    let src = source(&fx, "over", 1 << 20);
    let r = run(&mut put_command("tftpcast", server.addr(), &src, "over.bin", &[]), LIMIT);
    assert_eq!(r.code(), Some(1), "{r}");
    assert!(r.stderr.contains("server error 3"), "{r}");
    // curl announces its size.
    if require_tool("curl") {
        let r = run(&mut put_command("curl", server.addr(), &src, "over-curl.bin", &[]), LIMIT);
        assert!(!r.success(), "{r}");
    }
    assert!(wait_until(Duration::from_secs(3), || listing(&fx.root) == before), "left behind: {:?}", listing(&fx.root));
    // Exactly the limit is fine.
    let src = source(&fx, "exact", 100_000);
    assert_put(&fx, &server, ("tftpcast", &["--tsize"]), &src, "exact.bin", LIMIT);
    server.finish(&fx);
}

#[test]
fn traversal_and_symlinks_in_wrq_names_are_refused() {
    let Some(fx) = fixture_if(testing_tftpcast()) else { return };
    std::os::unix::fs::symlink(fx.base(), fx.root.join("up")).unwrap();
    let server = Server::start(&fx.root, &["--allow-write"]);
    let outside = listing(fx.base());
    for name in [&b"../escape.bin"[..], b"/../escape.bin", b"sub/../../escape.bin", b"..\\escape.bin", b"up/escape.bin", b"up/root/x.bin"] {
        let got = wrq_error(server.addr(), name, &[]);
        assert_eq!(got.as_ref().map(|e| e.0), Some(2), "{:?}: {got:?}", String::from_utf8_lossy(name));
    }
    // A directory that does not exist is not created.
    assert_eq!(wrq_error(server.addr(), b"no/such/dir.bin", &[]).map(|e| e.0), Some(1));
    assert_eq!(listing(fx.base()), outside, "nothing written beside the root");
    assert!(temp_files(&fx.root).is_empty());
    server.finish(&fx);
}

#[test]
fn uploads_disabled_keep_error_2() {
    let Some(fx) = fixture_if(testing_tftpcast()) else { return };
    let server = Server::start(&fx.root, &[]);
    let (code, _) = wrq_error(server.addr(), b"new.bin", &[]).expect("an ERROR");
    assert_eq!(code, 2);
    if server.is_tftpcast() {
        let src = source(&fx, "disabled", 10);
        let r = run(&mut put_command("tftpcast", server.addr(), &src, "new.bin", &[]), LIMIT);
        assert_eq!(r.code(), Some(1), "{r}");
        assert!(r.stderr.contains("server error 2"), "{r}");
        assert!(!fx.path("new.bin").exists());
        server.finish(&fx);
        // --read-only wins over the environment.
        let server = Server::start_in_env(None, &fx.root, &["--read-only"], &[("TFTPCAST_UPLOADS__ENABLED", "true")]);
        assert_eq!(wrq_error(server.addr(), b"new.bin", &[]).map(|e| e.0), Some(2));
        server.finish(&fx);
    }
}

#[test]
fn upload_dir_confines_uploads() {
    let Some(fx) = fixture_if(testing_tftpcast()) else { return };
    fs::create_dir(fx.root.join("incoming")).unwrap();
    let server = Server::start_in_env(None, &fx.root, &["--allow-write"], &[("TFTPCAST_UPLOADS__DIR", "incoming")]);
    for name in [&b"x.bin"[..], b"sub/x.bin", b"incoming/../x.bin", b"incomingx/y.bin"] {
        assert_eq!(wrq_error(server.addr(), name, &[]).map(|e| e.0), Some(2), "{}", String::from_utf8_lossy(name));
    }
    let src = source(&fx, "confined", 5000);
    assert_put(&fx, &server, ("tftpcast", &[]), &src, "incoming/ok.bin", LIMIT);
    // And it can be read back under the same name.
    let got = raw::get(server.addr(), "incoming/ok.bin", "octet", &[], LIMIT);
    assert_eq!(got.data, fs::read(&src).unwrap(), "{got}");
    server.finish(&fx);
}

#[test]
fn raw_protocol_duplicates_wrong_tid_and_final_ack() {
    let Some((fx, server)) = serve_if(testing_tftpcast(), &["--allow-write"]) else { return };
    let (s, tid, block1) = raw_upload_started(server.addr(), b"raw.bin", 0xA5);
    // A duplicate is acknowledged again (our ACK may have been lost).
    s.send_to(&data(1, &block1), tid).unwrap();
    assert_eq!(recv(&s).0, raw::ack(1));
    // DATA from a stranger gets ERROR 5 and does not disturb the transfer.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    stranger.send_to(&data(2, b"intruder"), tid).unwrap();
    let (e, _) = recv(&stranger);
    assert_eq!(raw::parse_error(&e).map(|e| e.0), Some(5), "{e:?}");
    s.send_to(&data(2, b"tail"), tid).unwrap();
    assert_eq!(recv(&s).0, raw::ack(2));
    let mut want = block1.clone();
    want.extend_from_slice(b"tail");
    assert_eq!(fs::read(fx.path("raw.bin")).unwrap(), want, "stored before the final ACK");
    // The final block again (our final ACK lost): acknowledged again while the server dallies.
    s.send_to(&data(2, b"tail"), tid).unwrap();
    assert_eq!(recv(&s).0, raw::ack(2));
    if server.is_tftpcast() {
        server.finish(&fx);
    }
}

#[test]
fn uploads_and_downloads_at_once() {
    if !testing_tftpcast() {
        return;
    }
    let fx = Fixture::new().with_big();
    let server = Server::start(&fx.root, &["--allow-write"]);
    let addr = server.addr();
    let src = source(&fx, "concurrent", BIG_SIZE);
    let mut handles = Vec::new();
    for i in 0..2 {
        let src = src.clone();
        handles.push(thread::spawn(move || run(&mut put_command("tftpcast", addr, &src, &format!("concurrent-{i}.bin"), &["--blksize", "1428", "--windowsize", "8"]), BIG_LIMIT)));
    }
    let downloads: Vec<_> = (0..2)
        .map(|i| {
            let out = fx.out(&format!("down-{i}"));
            let o = out.clone();
            (out, thread::spawn(move || Client::Tftpcast { args: vec!["--blksize", "1428", "--windowsize", "8"] }.fetch(None, addr, BIG, &o, BIG_LIMIT)))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.join().unwrap();
        assert!(put_ok(&r), "{r}");
        assert_stored(&fx, &format!("concurrent-{i}.bin"), &src, &r, "concurrent upload");
    }
    for (out, h) in downloads {
        let r = h.join().unwrap();
        assert_fetched(&Client::Tftpcast { args: vec![] }, &r, &out, &fx.sha(BIG), BIG_SIZE, "download during uploads");
    }
    server.finish(&fx);
}

/// An upload in progress is written to a hidden temporary file next to its target: a read of
/// that name gets ERROR 1 like a missing file (it is half-written), and so does the target
/// name until the last block arrived.
#[test]
fn a_temporary_upload_file_cannot_be_downloaded() {
    let Some((fx, server)) = serve_if(testing_tftpcast(), &["--allow-write"]) else { return };
    let (s, tid, block1) = raw_upload_started(server.addr(), b"half.bin", 0x5A);
    let temps = temp_files(&fx.root);
    assert_eq!(temps.len(), 1, "{:?}", listing(&fx.root));
    for name in [temps[0].clone(), format!("/{}", temps[0]), "half.bin".to_string()] {
        let r = raw::get(server.addr(), &name, "octet", &[], LIMIT);
        assert_eq!(r.error.as_ref().map(|e| e.0), Some(1), "RRQ {name}: {r}");
        assert!(r.data.is_empty(), "RRQ {name}: {r}");
    }
    // The upload itself goes on and is readable once complete.
    s.send_to(&data(2, b"end"), tid).unwrap();
    assert_eq!(recv(&s).0, raw::ack(2));
    let mut want = block1;
    want.extend_from_slice(b"end");
    let got = raw::get(server.addr(), "half.bin", "octet", &[], LIMIT);
    assert_eq!(got.data, want, "{got}");
    server.finish(&fx);
}

/// Temporary files of a run that was killed (a dead process id in the name) are removed at
/// startup, in the upload directory only: not those of a live process, not in
/// subdirectories, not elsewhere in the root, and not when uploads are off.
#[test]
fn stale_temporary_files_are_removed_at_startup() {
    let Some(fx) = fixture_if(testing_tftpcast()) else { return };
    fs::create_dir_all(fx.root.join("incoming/sub")).unwrap();
    // No pid exceeds 4194304 (PID_MAX_LIMIT); pid 1 is always alive.
    let dead = ".fw.bin.4194305-9.upload";
    let alive = ".fw.bin.1-9.upload";
    let stale = [format!("incoming/{dead}"), "incoming/.b.img.4194399-1.upload".into()];
    let kept = [format!("incoming/{alive}"), format!("incoming/sub/{dead}"), dead.to_string(), "incoming/fw.bin".into()];
    for p in stale.iter().chain(&kept) {
        fs::write(fx.path(p), b"stale").unwrap();
    }
    let off = Server::start_in_env(None, &fx.root, &[], &[("TFTPCAST_UPLOADS__DIR", "incoming")]);
    off.finish(&fx);
    assert!(stale.iter().all(|p| fx.path(p).exists()), "uploads off: nothing may be removed");
    let server = Server::start_in_env(None, &fx.root, &["--allow-write"], &[("TFTPCAST_UPLOADS__DIR", "incoming")]);
    for p in &stale {
        assert!(!fx.path(p).exists(), "{p} left behind: {:?}", listing(&fx.root.join("incoming")));
    }
    for p in &kept {
        assert!(fx.path(p).exists(), "{p} removed");
    }
    let ev = events(&server, "removed stale upload temporary files");
    assert_eq!(ev.len(), 1, "{}", server.log_tail(20));
    assert_eq!(ev[0]["fields"]["count"], 2, "{}", ev[0]);
    server.finish(&fx);
}
