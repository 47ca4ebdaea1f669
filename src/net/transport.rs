//! transport: the way a transfer's packets leave and arrive, chosen once per session.
//!
//! - `Own`: the transfer has its own socket (the server's TID port, RFC 1350), registered
//!   with the arbiter the session runs on; it reads its peer's packets itself.
//! - `Shared` (single-port mode): the transfer is served from the listening port. The
//!   listener reads every datagram and hands the ones of a transfer to its session (one
//!   mailbox hop per ACK); the session sends on a duplicate of the listening socket with the
//!   request's destination address as source (`IP_PKTINFO`), so the client sees one
//!   (address, port) for the whole transfer and NAT, a Kubernetes Service or a load balancer
//!   need no TFTP helper.
//!
//! Why a plain duplicate and no registration on the session's arbiter: a shared UDP socket
//! registered for write readiness in several epoll sets would wake every arbiter thread each
//! time any transfer's datagram leaves the send queue. Sessions only ever send on it, and a
//! nonblocking `sendmsg` on one socket from several threads is safe, so the duplicate is
//! never registered; when the kernel queue is full (`WouldBlock`, back-pressure shared by all
//! transfers of the port) the datagram is retried after a millisecond instead of being lost.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use tftpcast_proto::packet;
use tftpcast_proto::transmit;

use crate::net::udp::{self, Datagram, SharedSocket};

/// How long a datagram waits before it is offered again to a full shared send queue.
const SHARED_RETRY: Duration = Duration::from_millis(1);

/// The listening socket as seen by the transfers served from it (single-port mode).
#[derive(Clone, Debug)]
pub struct SharedSend {
    sock: Arc<UdpSocket>,
    /// Source address of what is sent: the address the request was sent to.
    local: Option<IpAddr>,
    /// The socket is IPv6 (dual stack): IPv4 peers are addressed as mapped addresses.
    v6: bool,
}

impl SharedSend {
    /// Wraps a duplicate of the listening socket.
    pub fn new(sock: UdpSocket) -> io::Result<Self> {
        let v6 = sock.local_addr()?.is_ipv6();
        Ok(SharedSend { sock: Arc::new(sock), local: None, v6 })
    }

    /// The same socket, sending from `local`.
    pub fn sending_from(&self, local: IpAddr) -> Self {
        SharedSend { sock: self.sock.clone(), local: Some(local), v6: self.v6 }
    }

    /// The port every transfer of this socket is served from.
    pub fn port(&self) -> u16 {
        self.sock.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The address the socket is bound to (often a wildcard).
    pub fn bound(&self) -> Option<SocketAddr> {
        self.sock.local_addr().ok().map(crate::net::unmap)
    }

    fn send(&self, head: &[u8], body: &[u8], to: SocketAddr) -> io::Result<()> {
        crate::net::send_parts_from(&self.sock, head, body, to, self.local, self.v6).map(|_| ())
    }
}

/// What a session is given before it starts.
pub enum Endpoint {
    /// A transfer socket of its own, not yet registered with any reactor.
    Own(UdpSocket),
    Shared(SharedSend),
}

impl Endpoint {
    /// Readies the endpoint on the session's arbiter: an own socket is registered and its
    /// datagrams fed to the actor's `StreamHandler<Datagram>`; a shared one needs nothing.
    pub fn attach<A>(self, ctx: &mut actix::Context<A>) -> io::Result<Transport>
    where
        A: actix::Actor<Context = actix::Context<A>> + actix::StreamHandler<Datagram>,
    {
        match self {
            Endpoint::Own(raw) => udp::attach(ctx, raw).map(Transport::Own),
            Endpoint::Shared(s) => Ok(Transport::Shared(s)),
        }
    }

    /// The server's port the client talks to for this transfer.
    pub fn port(&self) -> u16 {
        match self {
            Endpoint::Own(s) => s.local_addr().map(|a| a.port()).unwrap_or(0),
            Endpoint::Shared(s) => s.port(),
        }
    }
}

/// A session's way out.
#[derive(Clone)]
pub enum Transport {
    Own(SharedSocket),
    Shared(SharedSend),
}

impl Transport {
    /// Sends one datagram the state machines produced: DATA as header + shared payload
    /// without copying them together.
    pub fn send_datagram(&self, t: &transmit::Datagram, to: SocketAddr) -> io::Result<()> {
        match self {
            Transport::Own(s) => udp::send_datagram(s.get_ref(), t, to),
            Transport::Shared(s) => match t {
                transmit::Datagram::Data { block, payload } => s.send(&packet::data_header(*block), payload, to),
                transmit::Datagram::Control(v) => s.send(v, &[], to),
            },
        }
    }

    /// Sends a run of datagrams (see [`udp::send_batch`]): one segmented send on an own
    /// socket when the path takes it; datagram by datagram on the shared port. On an error,
    /// says how many left before it.
    pub fn send_batch(&self, batch: &[transmit::Datagram], to: SocketAddr, gso: &mut bool) -> Result<(), (usize, io::Error)> {
        match self {
            Transport::Own(s) => udp::send_batch(s.get_ref(), batch, to, gso),
            Transport::Shared(_) => {
                for (i, t) in batch.iter().enumerate() {
                    self.send_datagram(t, to).map_err(|e| (i, e))?;
                }
                Ok(())
            }
        }
    }

    /// Sends what is left of a batch once the kernel queue has room again.
    pub async fn send_batch_when_writable(self, rest: Vec<transmit::Datagram>, to: SocketAddr) {
        match self {
            Transport::Own(s) => udp::send_batch_when_writable(s, rest, to).await,
            Transport::Shared(_) => {
                for t in rest {
                    self.clone().send_when_writable(t, to).await;
                }
            }
        }
    }

    /// Sends an already encoded datagram.
    pub fn send_bytes(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        match self {
            Transport::Own(s) => s.get_ref().send_to(data, to).map(|_| ()),
            Transport::Shared(s) => s.send(data, &[], to),
        }
    }

    /// Sends `t` once the kernel queue has room again (after a `WouldBlock`): back-pressure,
    /// not loss. An own socket waits for write readiness; the shared one retries on a short
    /// timer (see the module doc).
    pub async fn send_when_writable(self, t: transmit::Datagram, to: SocketAddr) {
        match self {
            Transport::Own(s) => udp::send_when_writable(s, t, to).await,
            Transport::Shared(_) => loop {
                tokio::time::sleep(SHARED_RETRY).await;
                match self.send_datagram(&t, to) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    _ => return,
                }
            },
        }
    }

    /// True when the listener routes this transfer's packets to the session.
    pub fn is_shared(&self) -> bool {
        matches!(self, Transport::Shared(_))
    }
}

/// A datagram the listener read on the shared port for a session (single-port mode).
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct Routed(pub Datagram);

/// Packets from another TID than the transfer's peer (RFC 1350: answered with error 5, the
/// transfer goes on). An ERROR is never answered (two ports would bounce errors forever), and
/// the answers are rate-limited (bursts of 10, then 10 a second) so a spray at a transfer
/// port cannot turn the server into a reflector. One per session, per upload and per
/// multicast group.
pub struct Strangers {
    pub packets: u64,
    bucket: tftpcast_proto::pacing::TokenBucket,
}

impl Strangers {
    pub fn new(now: std::time::Instant) -> Self {
        Strangers { packets: 0, bucket: tftpcast_proto::pacing::TokenBucket::new(now, Some(10), 10) }
    }

    /// Counts a stranger's datagram and answers it when the budget allows.
    pub fn answer(&mut self, sock: Option<&Transport>, d: &Datagram) {
        if self.admit(&d.data) {
            if let Some(s) = sock {
                let _ = s.send_bytes(&packet::error_packet(packet::ErrorCode::UnknownTid, "Unknown transfer ID"), d.meta.from);
            }
        }
    }

    /// Counts a stranger's datagram `data`; true when it may be answered (never an ERROR,
    /// and only within the budget).
    pub fn admit(&mut self, data: &[u8]) -> bool {
        if data.get(..2) == Some(&[0, 5][..]) {
            self.packets += 1;
            return false;
        }
        self.allow()
    }

    /// Counts a stranger's datagram that a state machine already chose to answer (it never
    /// answers an ERROR); true when the budget allows the answer.
    pub fn allow(&mut self) -> bool {
        self.packets += 1;
        let now = std::time::Instant::now();
        self.bucket.set_rate(now, Some(10));
        if self.bucket.ready_at(now).is_some() {
            return false;
        }
        self.bucket.consume(1);
        true
    }
}
