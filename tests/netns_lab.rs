//! Real clients in their own network namespaces fetch from a server in another one, over a
//! bridge (DESIGN.md section 6), without and with 5% random loss on the clients' input.
//! Needs root: fails in CI without it, is skipped locally.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

/// Each client fetches [`ONE_MIB`] from its own namespace, all at once; returns the runs.
fn fetch_in_lab(
    lab: &Lab,
    fx: &Arc<Fixture>,
    server: SocketAddr,
    clients: &[Client],
    limit: Duration,
) -> Vec<Run> {
    let handles: Vec<_> = clients
        .iter()
        .zip(&lab.clients)
        .map(|(client, ns)| {
            let (client, ns, fx) = (client.clone(), ns.clone(), fx.clone());
            thread::spawn(move || {
                let out = fx.out("lab");
                let run = client.fetch(Some(&ns), server, ONE_MIB, &out, limit);
                let want = fx.sha(ONE_MIB);
                let len = std::fs::metadata(fx.path(ONE_MIB)).unwrap().len() as usize;
                let ok = std::panic::catch_unwind(|| {
                    assert_fetched(
                        &client,
                        &run,
                        &out,
                        &want,
                        len,
                        &format!("in namespace {ns}"),
                    )
                });
                (client, run, ok.err())
            })
        })
        .collect();
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for h in handles {
        let (client, run, err) = h.join().unwrap();
        eprintln!("{client:?}: {:.2?}", run.elapsed);
        if let Some(e) = err {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| format!("{run}"));
            failures.push(msg);
        }
        runs.push(run);
    }
    assert!(
        failures.is_empty(),
        "{} lab fetch(es) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    runs
}

fn start_lab_server(lab: &Lab, fx: &Fixture) -> Server {
    let listen = SocketAddr::from((lab.server_ip(), 69)).to_string();
    let server = Server::start_in(Some(&lab.server), &fx.root, &["--listen", &listen]);
    assert_eq!(
        server.addr().to_string(),
        listen,
        "the listening event must name the bound address"
    );
    server
}

#[test]
fn lab_real_clients_fetch_over_a_bridge() {
    if !require_netns() || !require_tools(&["tftp", "atftp", "curl"]) {
        return;
    }
    let fx = Arc::new(Fixture::new());
    let lab = Lab::new("ok", 4);
    let server = start_lab_server(&lab, &fx);
    let clients = [
        Client::hpa(),
        Client::Atftp {
            options: vec!["blksize 1428", "tsize 0"],
        },
        Client::Curl { args: vec![] },
        Client::Tftpcast {
            args: vec!["--blksize", "1428"],
        },
    ];
    fetch_in_lab(&lab, &fx, server.addr(), &clients, Duration::from_secs(60));
    server.finish_in_lab();
}

#[test]
fn lab_real_clients_fetch_under_5_percent_loss() {
    if !require_netns() || !require_tools(&["tftp", "atftp", "curl"]) {
        return;
    }
    let fx = Arc::new(Fixture::new());
    let lab = Lab::new("loss", 3);
    for ns in &lab.clients {
        lab.add_loss(ns, 5);
    }
    let server = start_lab_server(&lab, &fx);
    let clients = [
        Client::hpa(),
        Client::Atftp {
            options: vec!["timeout 1"],
        },
        Client::Curl { args: vec![] },
    ];
    fetch_in_lab(&lab, &fx, server.addr(), &clients, Duration::from_secs(60));
    for ns in &lab.clients {
        // 1 MiB at blksize 512 is 2049 DATA packets: 5% loss must have dropped some.
        let dropped = lab.dropped(ns);
        assert!(
            dropped > 0,
            "the loss rule in {ns} dropped nothing: the test proved nothing"
        );
        eprintln!("{ns}: {dropped} packets dropped");
    }
    server.finish_in_lab();
}
