//! fd_limit: raises the open-file limit at start.
//!
//! Every transfer holds a socket of its own (its TID), so a node serving `limits.max_sessions`
//! transfers needs about that many descriptors. Shells and many service managers start
//! processes with a soft limit of 1024 while the hard limit is far higher; a node that kept the
//! soft limit would answer "server busy" near 1000 transfers whatever `max_sessions` says.

use tracing::{info, warn};

/// Descriptors the node needs besides its transfers: listening sockets, the cluster and
/// metrics sockets, group sockets, files being read, the log, the runtime's own.
const BASE_FDS: u64 = 256;

/// What [`raise`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub before: u64,
    pub now: u64,
    pub hard: u64,
    pub needed: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, logs it, and warns (naming the setting)
/// when even the hard limit cannot cover `max_sessions`. Errors are logged, never fatal: a
/// node with a low limit still serves, it only turns clients away sooner.
pub fn raise(max_sessions: usize) -> Option<FdLimit> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read or write the struct passed by reference.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return None;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            warn!(error = %std::io::Error::last_os_error(), soft = before, hard = lim.rlim_max, "cannot raise the open-file limit");
        }
    }
    let r = FdLimit { before, now: lim.rlim_cur, hard: lim.rlim_max, needed: max_sessions as u64 + BASE_FDS };
    if r.now != r.before {
        info!(from = r.before, to = r.now, "raised the open-file limit (RLIMIT_NOFILE) to its hard limit");
    }
    if r.now < r.needed {
        warn!(
            limit = r.now,
            needed = r.needed,
            setting = "limits.max_sessions",
            max_sessions,
            "the open-file limit cannot cover limits.max_sessions: clients will be turned away with \"server busy\" sooner; raise the hard limit (LimitNOFILE= in the unit, ulimit -Hn) or lower limits.max_sessions"
        );
    }
    Some(r)
}
