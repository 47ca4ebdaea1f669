//! tftpcast-proto: the TFTP protocol without I/O.
//!
//! Everything a TFTP server decides that can be decided without a socket or a clock lives
//! here: packet encoding ([`packet`]), option negotiation ([`options`]), netascii
//! ([`netascii`]) and the sender state machine ([`transfer`]). Callers feed packets and
//! `Instant`s in and pull datagrams and deadlines out, so every rule is testable with a
//! virtual clock.

pub mod cluster;
pub mod flow;
pub mod multicast;
pub mod netascii;
pub mod options;
pub mod pacing;
pub mod rto;
pub mod packet;
pub mod mcast_receiver;
pub mod receiver;
pub mod transfer;
pub mod upload;

pub use packet::{decode, DecodeError, ErrorCode, Mode, Packet, Request};
pub use receiver::{Receiver, ReceiverConfig, ReceiverOutcome, ReceiverStats};
pub use transfer::{Outcome, Sender, SenderConfig, Source, Transmit};
