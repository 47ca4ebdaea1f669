//! An actix-friendly stream of datagrams over a nonblocking socket registered with the
//! current arbiter's reactor, and a send helper that waits for buffer space instead of
//! dropping when the kernel queue is full.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tftpcast_proto::packet;
use tftpcast_proto::transmit;
use tokio::io::unix::AsyncFd;

use crate::net::{self, RecvMeta};

/// A socket shared between an actor and its read stream (same thread).
pub type SharedSocket = Rc<AsyncFd<UdpSocket>>;

pub fn register(sock: UdpSocket) -> io::Result<SharedSocket> {
    // SAFETY: the AsyncFd takes ownership of the socket, so the fd stays open exactly as
    // long as it is registered and is closed only after deregistration on drop.
    Ok(Rc::new(unsafe { AsyncFd::register(sock) }?))
}

/// Registers a transfer socket with the current arbiter and feeds its datagrams (up to the
/// largest TFTP datagram) to the actor's `StreamHandler<Datagram>`.
pub fn attach<A>(ctx: &mut actix::Context<A>, raw: UdpSocket) -> io::Result<SharedSocket>
where
    A: actix::Actor<Context = actix::Context<A>> + actix::StreamHandler<Datagram>,
{
    let s = register(raw)?;
    actix::AsyncContext::add_stream(ctx, DatagramStream::new(s.clone(), packet::MAX_DATAGRAM, false));
    Ok(s)
}

/// One datagram and where it came from / was sent to.
#[derive(Debug)]
pub struct Datagram {
    pub meta: RecvMeta,
    pub data: Bytes,
}

/// Reads datagrams until the socket fails. Buffers are carved out of one larger allocation so
/// a stream of small ACKs does not allocate per packet.
pub struct DatagramStream {
    sock: SharedSocket,
    buf: BytesMut,
    max: usize,
    with_dst: bool,
}

impl DatagramStream {
    /// `max` is the largest datagram accepted whole (longer ones are truncated by the kernel
    /// and then rejected by the decoder). `with_dst` asks for the destination address too.
    pub fn new(sock: SharedSocket, max: usize, with_dst: bool) -> Self {
        DatagramStream { sock, buf: BytesMut::new(), max, with_dst }
    }
}

impl futures_core::Stream for DatagramStream {
    type Item = Datagram;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Datagram>> {
        let this = &mut *self;
        loop {
            if this.buf.capacity() < this.max + 1 {
                this.buf = BytesMut::with_capacity((this.max + 1).max(64 * 1024));
            }
            let mut guard = match this.sock.poll_read_ready(cx) {
                Poll::Ready(Ok(g)) => g,
                Poll::Ready(Err(_)) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            let with_dst = this.with_dst;
            let max = this.max;
            // The kernel writes into the buffer's spare (uninitialised) capacity through
            // MaybeUninit slices; only the bytes it reports are then marked initialised.
            let spare = &mut this.buf.spare_capacity_mut()[..max + 1];
            let res = guard.try_io(|s| {
                if with_dst {
                    net::recv_with_dst(s.get_ref(), spare)
                } else {
                    let (len, from) = socket2::SockRef::from(s.get_ref()).recv_from(spare)?;
                    let from = from.as_socket().ok_or_else(|| io::Error::other("unknown address family"))?;
                    Ok(RecvMeta { len, from: net::unmap(from), dst: None })
                }
            });
            match res {
                Ok(Ok(meta)) => {
                    // SAFETY: recv initialised exactly `meta.len` bytes of the spare capacity.
                    unsafe { this.buf.set_len(meta.len) };
                    let data = this.buf.split_to(meta.len).freeze();
                    return Poll::Ready(Some(Datagram { meta, data }));
                }
                // Transient errors (ICMP-reported refusals, interrupted calls): keep reading.
                Ok(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => continue,
                Ok(Err(_)) | Err(_) => continue, // not ready after all: poll again
            }
        }
    }
}

/// Sends one datagram the state machines produced: DATA as header + shared payload without
/// copying them together, anything else as is.
pub fn send_datagram(sock: &UdpSocket, t: &transmit::Datagram, to: SocketAddr) -> io::Result<()> {
    match t {
        transmit::Datagram::Data { block, payload } => net::send_vectored(sock, &packet::data_header(*block), payload, to),
        transmit::Datagram::Control(v) => sock.send_to(v, to),
    }
    .map(|_| ())
}

/// Sends `t` once the socket has buffer space again (after a `WouldBlock`): the kernel queue
/// being full is back-pressure, not loss, so the datagram waits instead of being dropped.
pub async fn send_when_writable(sock: SharedSocket, t: transmit::Datagram, to: SocketAddr) {
    loop {
        let Ok(mut guard) = sock.writable().await else { return };
        match guard.try_io(|s| send_datagram(s.get_ref(), &t, to)) {
            Ok(_) => return,
            Err(_would_block) => continue,
        }
    }
}

/// Whether `next` may join `batch` in one segmented send: DATA datagrams of one size, of which
/// only the last may be shorter, within the kernel's limits.
pub fn batchable(batch: &[transmit::Datagram], next: &transmit::Datagram) -> bool {
    let Some(first) = batch.first() else { return matches!(next, transmit::Datagram::Data { .. }) };
    let (transmit::Datagram::Data { .. }, transmit::Datagram::Data { .. }) = (first, next) else { return false };
    let seg = first.len();
    let last = batch.last().map(|t| t.len()).unwrap_or(seg);
    last == seg
        && next.len() <= seg
        && batch.len() < net::GSO_MAX_SEGMENTS
        && seg * (batch.len() + 1) <= net::GSO_MAX_BYTES
}

/// Sends `batch` to `to`: one segmented send (UDP GSO) when it holds several datagrams and
/// `gso` still says the path takes it, else datagram by datagram. A refused segmented send
/// clears `gso` (for the caller to remember) and falls back. On an error, says how many
/// datagrams left before it; the caller keeps the rest (a `WouldBlock` is back-pressure).
pub fn send_batch(sock: &UdpSocket, batch: &[transmit::Datagram], to: SocketAddr, gso: &mut bool) -> Result<(), (usize, io::Error)> {
    if batch.len() > 1 && *gso {
        let headers: Vec<[u8; 4]> = batch
            .iter()
            .map(|t| match t {
                transmit::Datagram::Data { block, .. } => packet::data_header(*block),
                transmit::Datagram::Control(_) => unreachable!("batchable() admits DATA only"),
            })
            .collect();
        let mut iov = Vec::with_capacity(batch.len() * 2);
        for (t, h) in batch.iter().zip(&headers) {
            iov.push(io::IoSlice::new(h));
            if let transmit::Datagram::Data { payload, .. } = t {
                if !payload.is_empty() {
                    iov.push(io::IoSlice::new(payload));
                }
            }
        }
        match net::send_segments(sock, &iov, batch[0].len() as u16, to) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err((0, e)),
            Err(e) => {
                // EINVAL (a segment larger than the path MTU), EIO (no checksum offload),
                // ENOPROTOOPT (an old kernel): this path cannot segment; stop trying.
                tracing::debug!(error = %e, "segmented send refused: sending datagram by datagram");
                *gso = false;
            }
        }
    }
    for (i, t) in batch.iter().enumerate() {
        send_datagram(sock, t, to).map_err(|e| (i, e))?;
    }
    Ok(())
}

/// Sends what is left of a batch once the socket has buffer space again.
pub async fn send_batch_when_writable(sock: SharedSocket, mut rest: Vec<transmit::Datagram>, to: SocketAddr) {
    let mut gso = false;
    while !rest.is_empty() {
        let Ok(mut guard) = sock.writable().await else { return };
        match guard.try_io(|s| send_batch(s.get_ref(), &rest, to, &mut gso).map_err(|(n, e)| {
            let _ = rest.drain(..n);
            e
        })) {
            Ok(Ok(())) => return,
            Ok(Err(_)) => return, // a hard error: the retransmission timer recovers
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_core::Stream;

    async fn next(s: &mut DatagramStream) -> Datagram {
        std::future::poll_fn(|cx| Pin::new(&mut *s).poll_next(cx)).await.expect("stream ended")
    }

    /// Datagrams of every size up to the limit arrive whole and byte-exact, longer ones are
    /// cut at `max + 1` (so the decoder can tell), and the destination address is reported
    /// when asked for. The bytes come from the buffer's spare capacity, which the kernel
    /// fills: what a datagram exposes is exactly what was sent, never stale buffer content.
    #[test]
    fn datagrams_arrive_whole_and_long_ones_are_cut() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            for with_dst in [false, true] {
                let raw = net::bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
                raw.set_nonblocking(true).unwrap();
                let to = raw.local_addr().unwrap();
                let mut stream = DatagramStream::new(register(raw).unwrap(), 600, with_dst);
                let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
                let sizes = [0usize, 1, 4, 599, 600, 601, 700, 65_000, 3];
                for (i, &n) in sizes.iter().enumerate() {
                    let sent: Vec<u8> = (0..n).map(|k| (k * 7 + i) as u8).collect();
                    peer.send_to(&sent, to).unwrap();
                    let d = next(&mut stream).await;
                    let kept = n.min(601);
                    assert_eq!(d.meta.len, kept, "size {n}");
                    assert_eq!(&d.data[..], &sent[..kept], "size {n}");
                    assert_eq!(d.meta.from, peer.local_addr().unwrap());
                    assert_eq!(d.meta.dst, with_dst.then(|| "127.0.0.1".parse().unwrap()));
                }
            }
        });
    }
}
