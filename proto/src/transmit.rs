//! What every machine hands to its I/O layer: one datagram and where it goes.
//!
//! The four machines (sender, receiver, multicast group, multicast receiver) all answer
//! `poll_transmit(now)` with a [`Transmit`]; they differ only in the destinations they know:
//! a unicast transfer talks to its one peer ([`Peer`]), a group to the group or one client,
//! a multicast receiver to the server's TID, its listener or a stranger.

use bytes::Bytes;

use crate::packet;

/// One datagram, DATA kept apart so its payload is sent without a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram {
    /// A DATA packet: `packet::data_header(block)` followed by `payload`.
    Data { block: u16, payload: Bytes },
    /// Any other packet (OACK, ACK, ERROR, a request), already encoded.
    Control(Vec<u8>),
}

impl Datagram {
    /// Total size on the wire (UDP payload).
    pub fn len(&self) -> usize {
        match self {
            Datagram::Data { payload, .. } => 4 + payload.len(),
            Datagram::Control(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the whole datagram into `buf` (cleared first).
    pub fn write_to(&self, buf: &mut Vec<u8>) {
        buf.clear();
        match self {
            Datagram::Data { block, payload } => {
                buf.extend_from_slice(&packet::data_header(*block));
                buf.extend_from_slice(payload);
            }
            Datagram::Control(v) => buf.extend_from_slice(v),
        }
    }

    /// The whole datagram as one buffer (a copy for DATA).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Datagram::Control(v) => v,
            data => {
                let mut buf = Vec::with_capacity(data.len());
                data.write_to(&mut buf);
                buf
            }
        }
    }
}

/// The one peer of a unicast transfer: the address the I/O layer locked onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer;

/// A datagram a machine wants sent, and to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a transmit that is not sent is lost"]
pub struct Transmit<To = Peer> {
    pub to: To,
    pub datagram: Datagram,
}

impl Transmit {
    /// A datagram for the transfer's peer.
    pub fn to_peer(datagram: Datagram) -> Transmit {
        Transmit { to: Peer, datagram }
    }
}
