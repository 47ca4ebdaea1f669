//! A node started in this process through the library (`node::run_until`), on a loopback
//! port the test picks, serves a file byte-exact to a raw RFC 1350 client with options, logs
//! its state on request, and stops when told, with exit code 0; a node that cannot start
//! returns its exit code instead of exiting the process.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::raw;
use tftpcast::config::{Overrides, Settings};
use tftpcast::node;
use tokio::sync::{mpsc, oneshot};

/// A loopback port free a moment ago.
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts a node on its own thread and actix system; returns its address, the way to stop it,
/// the way to ask for a state dump, and its exit code when it ends.
fn start(root: &std::path::Path, listen: SocketAddr) -> (oneshot::Sender<()>, mpsc::Sender<()>, std::thread::JoinHandle<u8>) {
    let overrides = Overrides { root: Some(root.to_path_buf()), listen: vec![listen.to_string()], ..Default::default() };
    let env: Vec<(String, String)> = Vec::new();
    let v = Settings::load(None, env, &overrides).expect("settings");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (dump_tx, dumps) = mpsc::channel(4);
    let node = std::thread::spawn(move || {
        actix::System::new().block_on(node::run_until(v, async move { stop_rx.await.ok(); }, std::future::pending(), dumps))
    });
    (stop_tx, dump_tx, node)
}

#[test]
fn a_node_runs_in_process_until_told_to_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(dir.path().join("f.bin"), &data).unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (stop, dump, node) = start(dir.path(), listen);
    // Ready once it answers.
    let mut got = None;
    for _ in 0..50 {
        let r = raw::get(listen, "f.bin", "octet", &[("blksize", "1428"), ("windowsize", "4")], Duration::from_secs(5));
        if r.complete {
            got = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = got.expect("the in-process node never served the file");
    assert!(r.data == data, "served {} bytes, want {}", r.data.len(), data.len());
    dump.try_send(()).expect("state dump request");
    stop.send(()).unwrap();
    assert_eq!(node.join().unwrap(), 0, "a clean stop is exit code 0");
}

#[test]
fn a_node_that_cannot_start_returns_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    // The port is taken: the listener cannot bind.
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (stop, _dump, node) = start(dir.path(), taken.local_addr().unwrap());
    assert_eq!(node.join().unwrap(), 1, "a port in use is exit code 1");
    drop(stop);
}
