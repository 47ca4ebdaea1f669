//! RFC 2090 multicast TFTP, server side: one value per group, fed packets and instants.
//!
//! The RFC in brief: a client asks with the `multicast` option; the server's OACK names the
//! group (`addr,port,mc`) and whether this client is the master (`mc=1`). DATA goes to the
//! group. Only the master acknowledges, and its `ACK n` means "send me block n+1": a client
//! acknowledges the block before its first missing one, so the same message clocks the
//! stream and requests repairs. When the master has the whole file (it ACKs the last block)
//! or stops answering, the server sends an OACK with `mc=1` to the oldest other member, which
//! then asks for what it missed. A client that joins late simply receives from the current
//! block on and fills its holes when it becomes master.
//!
//! What the RFC leaves open, and this module decides so that the file crosses the wire about
//! once however many receivers listen and whatever they lose:
//! - **Delayed start**: no DATA before `start_at` unless `start_min_clients` have joined, so
//!   more clients catch the first pass.
//! - **Selective repair** ([`window`]): below the frontier (blocks sent before) the group sends
//!   what the master lacks, one block at a time while its holes are scattered and a growing
//!   run when it lacks consecutive blocks; never the window it may already hold. A hole the
//!   master reports twice within a round trip is repaired once; a repair that is lost is sent
//!   again by the timer.
//! - **Window by loss** ([`window`]): at the frontier up to `window` blocks go ahead of the
//!   master's request, fewer while the master loses blocks (the reference client as master
//!   drops every block after a hole, so a wide window costs a lossy master that much again).
//! - **Rate by the receivers** ([`rate`]): every `probe_blocks` first-pass blocks (sooner at
//!   the start) the next member leads for a while; the holes it asks for are what passive
//!   members lose. Repaired at once, they reach every member that lacks them, and their share
//!   of the blocks sets the group's rate: receivers that cannot keep up make it slower, clean
//!   samples make it faster again, loss that slowing down does not cure is left alone.
//! - **Retransmit on an unexpected packet**: an old ACK from the master, an ACK from a
//!   passive member or a repeated request makes the group send its most recent DATA again,
//!   when that went out at least a round trip ago (the stream is stalled) and at most once
//!   per round-trip estimate, so a flood of such packets cannot multiply traffic. Nothing is
//!   sent back to the member itself; the OACK that makes a member passive goes twice, since a
//!   passive member never answers and a lost one goes unnoticed.
//! - **Liveness**: a master that stays silent for `master_retries` timeouts is dropped and
//!   the next member promoted; a promoted member that never answers is dropped the same way.
//!   A master that keeps losing blocks (`slow_master_repairs` in one tenure) moves to the back
//!   of the queue; the last member left gets its blocks by unicast (`lone_member_unicast`).
//!
//! Block numbers do not roll over in multicast mode (the reference client keeps a bitmap of
//! 65536 blocks), so a group is only formed when the file fits in 65535 blocks: see
//! [`fits_without_rollover`].

mod group;
pub mod rate;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
pub mod window;

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

pub use group::Group;
pub use rate::RateConfig;

/// True when a file of `len` bytes at `blksize` needs no block number above 65535.
pub fn fits_without_rollover(len: u64, blksize: u16) -> bool {
    len / (blksize as u64) < 65535
}

/// The value of the `multicast` option in an OACK.
pub fn oack_value(group: SocketAddrV4, master: bool) -> String {
    format!("{},{},{}", group.ip(), group.port(), if master { 1 } else { 0 })
}

#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub group: SocketAddrV4,
    pub blksize: u16,
    /// Most blocks in flight beyond the master's request (fewer while the master loses).
    pub window: u16,
    /// Initial retransmission timeout, then adapted to the master's round trips.
    pub timeout: Duration,
    pub min_timeout: Duration,
    pub max_timeout: Duration,
    /// Timeouts without an answer before a master is given up...
    pub master_retries: u32,
    /// ...and, for a master that has answered, this long without progress: a lossy master
    /// (often the last member, alone) loses several repairs in a row now and then.
    pub give_up_after: Duration,
    /// Delayed start: no DATA before this instant...
    pub start_at: Instant,
    /// ...unless this many clients have joined (0: wait for `start_at`).
    pub start_min_clients: usize,
    /// A master that loses this many blocks in one tenure hands the lead to the next member
    /// and goes to the back of the queue (0: never).
    pub slow_master_repairs: u32,
    /// When one member is left, send it DATA by unicast instead of flooding the group.
    pub lone_member_unicast: bool,
    /// First-pass blocks between probes, when the next member leads to report what it lost
    /// (0: never). The first probes come sooner (after 64, 128, ... blocks), and one comes
    /// at least every [`PROBE_INTERVAL`] (once 64 blocks went out since the last).
    pub probe_blocks: u32,
    /// The group's own rate control.
    pub rate: RateConfig,
}

/// Where a group's datagram goes; everything leaves from the group's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupDest<C> {
    /// The multicast group (DATA).
    Group,
    /// One client by unicast: OACK and ERROR, or DATA to the last member left.
    Client(C),
}

/// Why the master changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// The master finished, left, or stopped answering.
    Remaster,
    /// The master kept losing blocks and went to the back of the queue.
    Demotion,
    /// A probe: the next member leads to report what it lost while listening.
    Probe,
}

impl Handover {
    pub fn as_str(self) -> &'static str {
        match self {
            Handover::Remaster => "remaster",
            Handover::Demotion => "demotion",
            Handover::Probe => "probe",
        }
    }
}

/// Something worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<C> {
    Joined { client: C, master: bool, members: usize },
    Started { members: usize, early: bool },
    MasterChanged { from: Option<C>, to: C, why: Handover },
    MemberDone { client: C },
    MemberLost { client: C, reason: &'static str },
    /// A master that kept losing blocks was moved to the back of the queue.
    MasterDemoted { client: C, repairs: u32 },
    /// The group's rate changed ([`rate::RateChange`]) on a sample: a member that listened
    /// to `of` first-pass blocks lacked `lost` of them, in a group of `members`.
    Rate { change: rate::RateChange, lost: u64, of: u64, members: usize },
    /// The window at the frontier changed with the master's measured loss (tenths of a
    /// percent).
    Window { from: u32, to: u32, master_loss_permille: u32 },
    /// No member left: the group may end.
    Empty,
}

/// DATA sent again, by what caused it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Repairs {
    /// The master reported a hole (a duplicate ACK), and the blocks after it that an
    /// in-order master dropped.
    pub hole: u64,
    /// No answer from the master within the timeout.
    pub timeout: u64,
    /// Holes of a newly promoted master (probe, re-master, demotion): blocks it lost while
    /// listening.
    pub remaster: u64,
    /// Blocks sent before a member joined, which it asks for when it leads: not loss.
    pub late_join: u64,
    /// The most recent DATA again on an unexpected packet.
    pub unexpected: u64,
}

impl Repairs {
    /// Repairs caused by loss somewhere on the path (not late joins, not unexpected packets).
    pub fn loss(&self) -> u64 {
        self.hole + self.timeout + self.remaster
    }

    pub fn total(&self) -> u64 {
        self.hole + self.timeout + self.remaster + self.late_join + self.unexpected
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    pub data_packets: u64,
    pub data_bytes: u64,
    /// Blocks sent for the first time (the first pass).
    pub first_pass: u64,
    /// DATA packets for blocks sent before ([`Repairs`] by cause), and their bytes.
    pub retransmits: u64,
    pub retransmitted_bytes: u64,
    pub repairs: Repairs,
    /// Packets the group did not expect (see the module docs).
    pub unexpected: u64,
    pub unexpected_retransmits: u64,
    /// Duplicate ACKs for a hole already being repaired, or echoes (no packet sent for them).
    pub duplicate_acks: u64,
    pub timeouts: u64,
    pub remasters: u64,
    pub probes: u64,
    pub members_done: u64,
    pub members_lost: u64,
    pub joins: u64,
    pub demotions: u64,
    pub rate_changes: u64,
    /// DATA packets sent by unicast to a lone member.
    pub unicast_data_packets: u64,
}

/// Longest time between probes while the first pass goes on: a group slowed down learns
/// soon enough that it may speed up again.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// How many members that finished a group remembers (see `Group::finished_recently`).
pub const RECENTLY_DONE: usize = 256;
