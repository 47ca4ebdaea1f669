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

/// A lab with a namespace for each of `clients`, each dropping `loss` percent of its input
/// (none at 0), and a server in the lab's server namespace; the clients fetch at once
/// ([`fetch_in_lab`]). None when root or a client is missing (the checks said why, and the
/// test is skipped).
fn lab_fetch(prefix: &str, loss: u8, clients: &[Client]) -> Option<(Arc<Fixture>, Lab, Server)> {
    if !require_netns() || !require_tools(&["tftp", "atftp", "curl"]) {
        return None;
    }
    let fx = Arc::new(Fixture::new());
    let lab = Lab::new(prefix, clients.len());
    if loss > 0 {
        for ns in &lab.clients {
            lab.add_loss(ns, loss);
        }
    }
    let server = start_lab_server(&lab, &fx);
    fetch_in_lab(&lab, &fx, server.addr(), clients, Duration::from_secs(60));
    Some((fx, lab, server))
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
    let Some((_fx, _lab, server)) = lab_fetch("ok", 0, &clients) else { return };
    server.finish_in_lab();
}

#[test]
fn lab_real_clients_fetch_under_5_percent_loss() {
    let clients = [
        Client::hpa(),
        Client::Atftp {
            options: vec!["timeout 1"],
        },
        Client::Curl { args: vec![] },
    ];
    let Some((_fx, lab, server)) = lab_fetch("loss", 5, &clients) else { return };
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
