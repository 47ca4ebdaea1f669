//! tftpcast-proto: the TFTP protocol without I/O.
//!
//! Everything a TFTP server decides that can be decided without a socket or a clock lives
//! here: packet encoding ([`packet`]), option negotiation ([`options`], and the client's check
//! of an OACK in `oack`), netascii ([`netascii`]), block numbers ([`block`]) and four state
//! machines: the sender ([`transfer`]), the receiver ([`receiver`], also the server's end of
//! an upload, [`upload`]), the multicast group ([`multicast`]) and the multicast receiver
//! ([`mcast_receiver`]). Callers feed packets and `Instant`s in and pull [`Transmit`]s and
//! deadlines out — every machine answers `poll_transmit(now)` and `poll_timeout()` — so
//! every rule is testable with a virtual clock.

pub mod addr;
pub mod block;
pub mod cluster;
pub mod flow;
#[cfg(test)]
mod loss;
pub mod mcast_receiver;
pub mod multicast;
pub mod netascii;
mod oack;
pub mod options;
pub mod pacing;
pub mod packet;
pub mod receiver;
mod retry;
pub mod rto;
pub mod transfer;
pub mod transmit;
pub mod upload;

pub use block::Block;
pub use packet::{decode, DecodeError, ErrorCode, Mode, Packet, Request};
pub use receiver::{Receiver, ReceiverConfig, ReceiverOutcome, ReceiverStats};
pub use transfer::{Outcome, Sender, SenderConfig, Source};
pub use transmit::{Datagram, Peer, Transmit};
