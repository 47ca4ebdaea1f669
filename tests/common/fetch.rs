//! Client fetches running in the background inside lab namespaces, each in its own process
//! group (so it can be killed as a whole: `ip netns exec` execs the client, and the group
//! covers anything it forks), with every exit timed when it happens.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::{assert_fetched, spawn_reader, ChildGuard, Client, Fixture, Lab, Run};

/// A lab whose client namespaces can be named by index.
pub trait ClientNamespaces {
    /// The namespace of client `i` (the lab's own numbering).
    fn client_ns(&self, i: usize) -> String;
}

impl ClientNamespaces for Lab {
    fn client_ns(&self, i: usize) -> String {
        self.clients[i].clone()
    }
}

/// A client fetch in its own process group, killed (group-wide) on drop.
pub struct Fetch {
    /// `c<i>`: the client's index in the lab.
    pub label: String,
    pub ns: String,
    pub client: Client,
    pub out: PathBuf,
    what: String,
    child: Option<ChildGuard>,
    stdout: Option<mpsc::Receiver<Vec<u8>>>,
    stderr: Option<mpsc::Receiver<Vec<u8>>>,
    started: Instant,
    /// Exit status, when it was noticed, and whether the time limit killed it.
    exited: Option<(Option<ExitStatus>, Instant, bool)>,
    /// The run, once collected by `wait`.
    run: Option<Run>,
}

impl Fetch {
    /// Starts `client` in client namespace `i` of `lab`, fetching `remote` into a fresh file.
    pub fn start(
        lab: &impl ClientNamespaces,
        fx: &Fixture,
        i: usize,
        client: &Client,
        server: SocketAddr,
        remote: &str,
    ) -> Fetch {
        let ns = lab.client_ns(i);
        let out = fx.out(&format!("c{i}-{remote}"));
        let mut cmd = client.command(Some(&ns), server, remote, &out);
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("{cmd:?}");
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = spawn_reader(child.stdout.take().unwrap());
        let stderr = spawn_reader(child.stderr.take().unwrap());
        Fetch {
            label: format!("c{i}"),
            ns,
            client: client.clone(),
            out,
            what,
            child: Some(ChildGuard(child)),
            stdout: Some(stdout),
            stderr: Some(stderr),
            started,
            exited: None,
            run: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").0.id() as i32
    }

    pub fn running(&mut self) -> bool {
        !self.poll()
    }

    /// When the client was seen to have exited.
    pub fn ended(&self) -> Option<Instant> {
        self.exited.map(|(_, at, _)| at)
    }

    /// Bytes written to the output file so far.
    pub fn written(&self) -> u64 {
        fs::metadata(&self.out).map(|m| m.len()).unwrap_or(0)
    }

    /// For failure messages: the run so far if the client has exited, else how far it got.
    pub fn describe(&mut self) -> String {
        if self.poll() {
            let r = self.wait(Instant::now());
            format!("{} exited early after {:.2?}:\n{r}", self.label, r.elapsed)
        } else {
            format!(
                "{} is running, {} bytes written",
                self.label,
                self.written()
            )
        }
    }

    /// SIGKILLs the process group (only while its leader, our child, has not been reaped, so
    /// the group id cannot have been reused).
    pub fn kill_group(&mut self) {
        if self.running() {
            // SAFETY: kill(2) on the process group our own live child leads.
            unsafe {
                libc::kill(-self.pid(), libc::SIGKILL);
            }
        }
    }

    /// Notes the exit (and its instant) if the client has exited; true once it has.
    pub fn poll(&mut self) -> bool {
        if self.exited.is_some() {
            return true;
        }
        let Some(guard) = self.child.as_mut() else {
            return true;
        };
        match guard.0.try_wait() {
            Ok(Some(st)) => {
                self.exited = Some((Some(st), Instant::now(), false));
                true
            }
            Ok(None) => false,
            Err(e) => panic!("waiting for {}: {e}", self.what),
        }
    }

    /// Waits until the client exits or `deadline` passes (then kills it); returns the run.
    pub fn wait(&mut self, deadline: Instant) -> Run {
        if let Some(r) = &self.run {
            return r.clone();
        }
        while !self.poll() {
            if Instant::now() > deadline {
                let guard = self.child.as_mut().expect("not reaped");
                // SAFETY: our child is alive (not reaped), so it still leads its process group.
                unsafe {
                    libc::kill(-(guard.0.id() as i32), libc::SIGKILL);
                }
                let st = guard.0.wait().ok();
                self.exited = Some((st, Instant::now(), true));
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.child = None;
        let (status, at, timed_out) = self.exited.expect("exited");
        // A grandchild could keep a pipe open: never wait for the readers without a bound.
        let grab = |rx: Option<mpsc::Receiver<Vec<u8>>>| {
            let bytes = rx
                .and_then(|rx| rx.recv_timeout(Duration::from_secs(3)).ok())
                .unwrap_or_default();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        let run = Run {
            what: self.what.clone(),
            status,
            stdout: grab(self.stdout.take()),
            stderr: grab(self.stderr.take()),
            elapsed: at.saturating_duration_since(self.started),
            timed_out,
        };
        self.run = Some(run.clone());
        run
    }
}

impl Drop for Fetch {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// Waits for every fetch (bounded by `limit` from now) and checks each got `remote`
/// byte-exact. Panics listing every failure. Returns the runs in order.
pub fn finish_all(fetches: &mut [Fetch], fx: &Fixture, remote: &str, limit: Duration) -> Vec<Run> {
    let deadline = Instant::now() + limit;
    // Poll them all, so that each exit is timed when it happens (hashing the file first
    // would delay that).
    while Instant::now() < deadline {
        let mut all = true;
        for f in fetches.iter_mut() {
            all &= f.poll();
        }
        if all {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    let want = fx.sha(remote);
    let len = fs::metadata(fx.path(remote)).unwrap().len() as usize;
    let mut failures = Vec::new();
    let mut runs = Vec::new();
    for f in fetches.iter_mut() {
        let r = f.wait(deadline);
        let ctx = format!("{} (namespace {}) fetching {remote}", f.label, f.ns);
        let (client, out) = (f.client.clone(), f.out.clone());
        let check =
            std::panic::catch_unwind(|| assert_fetched(&client, &r, &out, &want, len, &ctx));
        if let Err(e) = check {
            failures.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| format!("{ctx}: {r}")),
            );
        }
        runs.push(r);
    }
    assert!(
        failures.is_empty(),
        "{} of {} fetch(es) failed:\n{}",
        failures.len(),
        fetches.len(),
        failures.join("\n\n")
    );
    runs
}

/// When the last of `fetches` exited (all must have been waited for).
pub fn last_exit(fetches: &[Fetch]) -> Instant {
    fetches
        .iter()
        .map(|f| f.ended().expect("waited for"))
        .max()
        .expect("some fetches")
}
