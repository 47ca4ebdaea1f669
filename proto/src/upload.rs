//! Write requests (uploads), both ends, without I/O.
//!
//! The server's end is the [`Receiver`] state machine in its server form ([`accept`]): the
//! rules for windows, gaps, duplicates, rollover and netascii are the download's, so they live
//! in one place. What differs is decided here: whether an announced size is acceptable
//! ([`check_size`]), the first answer (OACK or ACK 0), the final ACK held back until the file
//! is stored, and the size limit.
//!
//! The client's end is the [`crate::Sender`] started with the WRQ as its first control
//! packet (resent until the server answers, like an OACK awaiting ACK 0): an ACK 0 answer is
//! fed to it as is; an OACK answer is checked with [`check_oack`] and a fresh sender is
//! started with the agreed options, block 1 first.

use std::time::{Duration, Instant};

use crate::oack::{self, Asked, Multicast, Tsize};
use crate::options::Negotiated;
use crate::packet::{self, ErrorCode, Mode, Packet, Request, MAX_BLKSIZE, MIN_BLKSIZE};
use crate::receiver::{Receiver, ReceiverConfig, ServerSide};

/// Parameters of the receiving end of one upload, from the negotiation.
#[derive(Debug, Clone)]
pub struct UploadConfig {
    /// `Netascii` uploads are decoded to local text (LF line ends) before they are stored.
    pub mode: Mode,
    /// What the WRQ's options agreed on: block and window size, the base timeout of the
    /// server's ACKs, and the OACK (empty: answer with ACK 0).
    pub negotiated: Negotiated,
    /// Cap of the ACKs' backoff (never below the negotiated timeout).
    pub max_timeout: Duration,
    /// Consecutive timeouts without progress before the upload is abandoned, and before the
    /// client's first DATA (anti-amplification: a WRQ may be spoofed).
    pub max_retries: u32,
    pub initial_retries: u32,
    /// Largest file stored; more data ends the upload with ERROR 3.
    pub max_bytes: Option<u64>,
}

impl UploadConfig {
    /// The parameters a negotiation agreed on.
    pub fn from_negotiated(n: &Negotiated, mode: Mode, max_timeout: Duration, max_retries: u32, initial_retries: u32, max_bytes: Option<u64>) -> Self {
        UploadConfig { mode, negotiated: n.clone(), max_timeout: max_timeout.max(n.timeout), max_retries, initial_retries, max_bytes }
    }
}

/// An upload the server refuses before answering (the ERROR to send).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

/// RFC 2349: a WRQ's `tsize` announces the upload's size, so a file larger than the limit is
/// refused with ERROR 3 before a single block is sent.
pub fn check_size(n: &Negotiated, max_bytes: Option<u64>) -> Result<(), Refusal> {
    match (n.tsize, max_bytes) {
        (Some(t), Some(max)) if t > max => Err(Refusal {
            code: ErrorCode::DiskFull,
            message: format!("{} (announced {t} bytes, limit {max})", ErrorCode::DiskFull.default_message()),
        }),
        _ => Ok(()),
    }
}

/// Starts the receiving end of a write request: the first datagram
/// [`Receiver::poll_transmit`] returns is the OACK, or ACK 0 when no option was accepted.
/// Data comes out of [`Receiver::take_data`]; once [`Receiver::awaiting_commit`] is true the
/// caller stores the file and calls [`Receiver::commit`] (or [`Receiver::abort`]).
pub fn accept(now: Instant, cfg: UploadConfig) -> Receiver {
    let n = &cfg.negotiated;
    let answer = if n.oack.is_empty() {
        packet::ack(0).to_vec()
    } else {
        let mut v = Vec::new();
        packet::encode_oack(&n.oack, &mut v);
        v
    };
    let mut rc = ReceiverConfig::new(Vec::new(), cfg.mode);
    rc.timeout = n.timeout;
    rc.max_timeout = cfg.max_timeout.max(n.timeout);
    rc.max_retries = cfg.max_retries;
    let side = ServerSide { initial_retries: cfg.initial_retries, max_bytes: cfg.max_bytes };
    Receiver::new_server(now, rc, answer, n.blksize, n.windowsize, side)
}

/// The options a client asks for in a WRQ.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    pub blksize: Option<u16>,
    pub windowsize: Option<u16>,
    /// RFC 2349 `timeout`, seconds.
    pub timeout: Option<u8>,
    /// RFC 2349 `tsize`: the size of the upload as sent on the wire.
    pub tsize: Option<u64>,
}

/// What a server's OACK to a WRQ agreed on; options it left out keep RFC 1350 defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAgreed {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Option<u8>,
}

/// Encodes a WRQ.
pub fn write_request(filename: &[u8], mode: Mode, o: &WriteOptions) -> Vec<u8> {
    let mut options = Vec::new();
    if let Some(b) = o.blksize {
        options.push(("blksize".to_string(), b.clamp(MIN_BLKSIZE, MAX_BLKSIZE).to_string()));
    }
    if let Some(w) = o.windowsize {
        options.push(("windowsize".to_string(), w.max(1).to_string()));
    }
    if let Some(t) = o.timeout.filter(|&t| t > 0) {
        options.push(("timeout".to_string(), t.to_string()));
    }
    if let Some(t) = o.tsize {
        options.push(("tsize".to_string(), t.to_string()));
    }
    Packet::Wrq(Request { filename: filename.to_vec(), mode, options }).to_vec()
}

/// Checks a server's OACK to our WRQ (RFC 2347): only options we asked for, each once, with
/// values within what we asked (`blksize` 8..=asked, `windowsize` 1..=asked, `timeout`
/// 1..=asked, `tsize` equal to what we announced). The error is the reason to send with
/// ERROR 8.
pub fn check_oack(asked: &WriteOptions, opts: &[(String, String)]) -> Result<WriteAgreed, String> {
    let asked = Asked {
        blksize: asked.blksize.map(|b| b.clamp(MIN_BLKSIZE, MAX_BLKSIZE)),
        windowsize: asked.windowsize.map(|w| w.max(1)),
        timeout: asked.timeout.filter(|&t| t > 0),
        tsize: asked.tsize.map_or(Tsize::NotAsked, Tsize::Announced),
        multicast: Multicast::NotAsked,
    };
    let a = oack::check(&asked, opts)?;
    Ok(WriteAgreed { blksize: a.blksize, windowsize: a.windowsize, timeout: a.timeout })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{self, Limits};
    use crate::packet::decode;
    use crate::transfer::{Outcome, Sender, Source};
    use crate::{Receiver, Transmit};
    use crate::ReceiverOutcome;
    use bytes::Bytes;

    fn server_cfg(n: &Negotiated, mode: Mode, max_bytes: Option<u64>) -> UploadConfig {
        UploadConfig::from_negotiated(n, mode, Duration::from_secs(4), 5, 3, max_bytes)
    }


    fn wire(t: Transmit) -> Vec<u8> {
        t.datagram.into_vec()
    }

    fn next(r: &mut Receiver) -> Option<Vec<u8>> {
        r.poll_transmit(Instant::now()).map(wire)
    }

    /// Result of one simulated upload.
    struct Run {
        stored: Vec<u8>,
        client: Option<Outcome>,
        server: Option<ReceiverOutcome>,
        /// Datagrams the server sent.
        from_server: Vec<Vec<u8>>,
    }

    /// Runs a whole upload between the client's end (a `Sender` started with the WRQ) and the
    /// server's end on a virtual clock. `drop(n, to_server)` loses the n-th datagram of a
    /// direction. The server commits whenever asked. Bounded: a livelock fails the test.
    fn run(data: &[u8], mode: Mode, asked: WriteOptions, max_bytes: Option<u64>, drop: impl Fn(usize, bool) -> bool) -> Run {
        let mut now = Instant::now();
        let source = |d: &[u8]| match mode {
            Mode::Octet => Source::octet(Bytes::copy_from_slice(d)),
            _ => Source::netascii(Bytes::copy_from_slice(d)),
        };
        let wrq = write_request(b"up.bin", mode, &asked);
        let Ok(Packet::Wrq(req)) = decode(&wrq) else { panic!("not a WRQ") };
        let requested = options::parse(&req.options).unwrap();
        let n = options::negotiate(&requested, &Limits::default(), None, true);
        let mut client = Sender::new(now, crate::transfer::tests::cfg(512, 1), source(data), Some(wrq));
        // The WRQ reaches the listener (not lost in these tests); the server answers.
        let first = client.poll_transmit(now).unwrap();
        assert!(matches!(decode(&wire(first)), Ok(Packet::Wrq(_))));
        let mut server = accept(now, server_cfg(&n, mode, max_bytes));
        let mut stored = Vec::new();
        let mut from_server = Vec::new();
        let (mut up, mut down) = (0usize, 0usize);
        let mut options_done = false;
        for _ in 0..200_000 {
            let mut moved = false;
            while let Some(t) = client.poll_transmit(now) {
                moved = true;
                up += 1;
                if !drop(up, true) {
                    let d = wire(t);
                    server.handle_datagram(now, Bytes::from(d)).unwrap();
                }
            }
            while let Some(c) = server.take_data() {
                stored.extend_from_slice(&c);
            }
            if server.awaiting_commit() {
                server.commit();
            }
            while let Some(d) = next(&mut server) {
                moved = true;
                down += 1;
                from_server.push(d.clone());
                if drop(down, false) {
                    continue;
                }
                let pkt = decode(&d).unwrap();
                match pkt {
                    Packet::Oack(ref opts) if !options_done => {
                        options_done = true;
                        let a = check_oack(&asked, opts).expect("server OACK acceptable");
                        let mut c = crate::transfer::tests::cfg(a.blksize, a.windowsize);
                        if let Some(t) = a.timeout {
                            c.timeout = Duration::from_secs(t as u64);
                        }
                        client = Sender::new(now, c, source(data), None);
                    }
                    ref p => {
                        if matches!(p, Packet::Ack(0)) {
                            options_done = true;
                        }
                        client.handle(now, p)
                    }
                }
            }
            if client.is_done() && (server.is_done() || server.outcome().is_some()) {
                break;
            }
            if !moved {
                let next = [client.poll_timeout(), server.poll_timeout()].into_iter().flatten().min();
                let Some(next) = next else { break };
                now = now.max(next);
                client.handle_timeout(now);
                server.handle_timeout(now);
            }
        }
        Run { stored, client: client.outcome().cloned(), server: server.outcome().cloned(), from_server }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 513) as u8).collect()
    }

    #[test]
    fn lock_step_uploads_of_edge_sizes_are_byte_exact() {
        for len in [0, 1, 511, 512, 513, 1024, 5000] {
            let data = pattern(len);
            let r = run(&data, Mode::Octet, WriteOptions::default(), None, |_, _| false);
            assert_eq!(r.client, Some(Outcome::Complete), "len {len}");
            assert_eq!(r.server, Some(ReceiverOutcome::Complete), "len {len}");
            assert_eq!(r.stored, data, "len {len}");
            assert_eq!(decode(&r.from_server[0]).unwrap(), Packet::Ack(0), "no options: ACK 0 first");
        }
    }

    #[test]
    fn options_are_answered_with_an_oack_echoing_tsize() {
        let data = pattern(100_000);
        let asked = WriteOptions { blksize: Some(1428), windowsize: Some(8), timeout: Some(2), tsize: Some(100_000) };
        let r = run(&data, Mode::Octet, asked, None, |_, _| false);
        assert_eq!(r.stored, data);
        let Ok(Packet::Oack(o)) = decode(&r.from_server[0]) else { panic!("OACK first") };
        let o: Vec<String> = o.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(o, ["blksize=1428", "windowsize=8", "timeout=2", "tsize=100000"]);
        // One ACK per window of 8 blocks (71 blocks: 8 full windows, then the final block).
        let acks = r.from_server.iter().filter(|d| matches!(decode(d), Ok(Packet::Ack(_)))).count();
        assert_eq!(acks, 100_000 / 1428 / 8 + 1);
    }

    #[test]
    fn loss_in_both_directions_still_stores_every_byte() {
        let data = pattern(300_000);
        for (blk, win) in [(512u16, 1u16), (1024, 4), (8192, 16)] {
            let asked = WriteOptions { blksize: Some(blk), windowsize: Some(win), timeout: None, tsize: Some(data.len() as u64) };
            // Deterministic loss: every 7th datagram to the server, every 5th back.
            let r = run(&data, Mode::Octet, asked, None, |n, up| if up { n % 7 == 3 } else { n % 5 == 4 && n > 1 });
            assert_eq!(r.client, Some(Outcome::Complete), "blksize {blk} window {win}");
            assert_eq!(r.stored, data, "blksize {blk} window {win}");
        }
    }

    #[test]
    fn rollover_past_65535_blocks() {
        let data = pattern(70_000 * 8 + 3);
        let asked = WriteOptions { blksize: Some(8), windowsize: Some(32), ..Default::default() };
        let r = run(&data, Mode::Octet, asked, None, |_, _| false);
        assert_eq!(r.client, Some(Outcome::Complete));
        assert_eq!(r.stored, data);
    }

    #[test]
    fn netascii_uploads_are_decoded() {
        let text = b"line one\nline two\r\nbare\rcr\n".repeat(50);
        let r = run(&text, Mode::Netascii, WriteOptions { blksize: Some(64), ..Default::default() }, None, |_, _| false);
        assert_eq!(r.server, Some(ReceiverOutcome::Complete));
        assert_eq!(r.stored, text);
    }

    #[test]
    fn data_beyond_the_limit_ends_with_error_3() {
        let data = pattern(10_000);
        let r = run(&data, Mode::Octet, WriteOptions::default(), Some(4096), |_, _| false);
        assert!(matches!(r.server, Some(ReceiverOutcome::Aborted { code: ErrorCode::DiskFull, .. })), "{:?}", r.server);
        assert!(matches!(r.client, Some(Outcome::PeerError { code: ErrorCode::DiskFull, .. })), "{:?}", r.client);
        assert!(r.stored.len() <= 4096);
        // Exactly at the limit is fine.
        let data = pattern(4096);
        let r = run(&data, Mode::Octet, WriteOptions::default(), Some(4096), |_, _| false);
        assert_eq!(r.stored, data);
    }

    #[test]
    fn announced_size_over_the_limit_is_refused_before_answering() {
        let req = options::parse(&[("tsize".into(), "5000".into())]).unwrap();
        let n = options::negotiate(&req, &Limits::default(), None, true);
        assert_eq!(check_size(&n, Some(4999)).unwrap_err().code, ErrorCode::DiskFull);
        assert!(check_size(&n, Some(5000)).is_ok());
        assert!(check_size(&n, None).is_ok());
    }

    #[test]
    fn final_ack_waits_for_the_commit_and_abort_replaces_it() {
        let now = Instant::now();
        let n = Negotiated::defaults(&Limits::default());
        let mut s = accept(now, server_cfg(&n, Mode::Octet, None));
        assert_eq!(next(&mut s), Some(packet::ack(0).to_vec()));
        s.handle(now, &Packet::Data { block: 1, data: b"tail" });
        assert_eq!(s.take_data().as_deref(), Some(&b"tail"[..]));
        assert!(s.awaiting_commit());
        assert_eq!(next(&mut s), None, "no ACK before the file is stored");
        assert_eq!(s.poll_timeout(), None);
        // The client resends while we store: still nothing.
        s.handle(now, &Packet::Data { block: 1, data: b"tail" });
        assert_eq!(next(&mut s), None);
        s.abort(ErrorCode::FileExists, "File already exists");
        let d = next(&mut s).unwrap();
        assert!(matches!(decode(&d), Ok(Packet::Error { code: ErrorCode::FileExists, .. })));
        assert!(s.is_done());

        let mut s = accept(now, server_cfg(&n, Mode::Octet, None));
        let _ = next(&mut s);
        s.handle(now, &Packet::Data { block: 1, data: b"x" });
        let _ = s.take_data();
        s.commit();
        assert_eq!(next(&mut s), Some(packet::ack(1).to_vec()));
        assert_eq!(s.outcome(), Some(&ReceiverOutcome::Complete));
        // Our final ACK was lost: the repeated final block is acknowledged again (dally).
        s.handle(now, &Packet::Data { block: 1, data: b"x" });
        assert_eq!(next(&mut s), Some(packet::ack(1).to_vec()));
    }

    #[test]
    fn duplicates_are_reacked_and_a_gap_acks_the_last_in_order_block() {
        let now = Instant::now();
        let req = options::parse(&[("windowsize".into(), "4".into())]).unwrap();
        let n = options::negotiate(&req, &Limits::default(), None, true);
        let mut s = accept(now, server_cfg(&n, Mode::Octet, None));
        assert!(matches!(decode(&next(&mut s).unwrap()), Ok(Packet::Oack(_))));
        let full = [0u8; 512];
        s.handle(now, &Packet::Data { block: 1, data: &full });
        s.handle(now, &Packet::Data { block: 3, data: &full });
        assert_eq!(next(&mut s), Some(packet::ack(1).to_vec()), "gap: ACK the last in-order block");
        s.handle(now, &Packet::Data { block: 4, data: &full });
        assert_eq!(next(&mut s), None, "one re-ACK per gap");
        for b in 2..=5 {
            s.handle(now, &Packet::Data { block: b, data: &full });
        }
        assert_eq!(next(&mut s), Some(packet::ack(5).to_vec()), "ACK after windowsize blocks");
        // The window's last block again: our ACK was lost, say so again.
        s.handle(now, &Packet::Data { block: 5, data: &full });
        assert_eq!(next(&mut s), Some(packet::ack(5).to_vec()));
    }

    #[test]
    fn unanswered_first_reply_is_resent_a_few_times_then_given_up() {
        let mut now = Instant::now();
        let req = options::parse(&[("blksize".into(), "1024".into())]).unwrap();
        let n = options::negotiate(&req, &Limits::default(), None, true);
        let mut s = accept(now, server_cfg(&n, Mode::Octet, None));
        let oack = next(&mut s).unwrap();
        let mut resent = 0;
        while let Some(t) = s.poll_timeout() {
            now = t;
            s.handle_timeout(now);
            while let Some(d) = next(&mut s) {
                assert_eq!(d, oack, "the OACK is what is resent");
                resent += 1;
            }
        }
        assert_eq!(resent, 3, "initial_retries");
        assert!(matches!(s.outcome(), Some(ReceiverOutcome::TimedOut { .. })));
    }

    #[test]
    fn ack_or_oack_from_the_client_is_handled() {
        let now = Instant::now();
        let n = Negotiated::defaults(&Limits::default());
        let mut s = accept(now, server_cfg(&n, Mode::Octet, None));
        let _ = next(&mut s);
        s.handle(now, &Packet::Oack(vec![("blksize".into(), "8".into())]));
        assert_eq!(next(&mut s), None, "an OACK from a client is ignored");
        s.handle(now, &Packet::Ack(0));
        assert!(matches!(decode(&next(&mut s).unwrap()), Ok(Packet::Error { code: ErrorCode::IllegalOperation, .. })));
    }

    #[test]
    fn client_checks_the_oack() {
        let asked = WriteOptions { blksize: Some(1428), windowsize: Some(8), timeout: Some(3), tsize: Some(77) };
        let o = |l: &[(&str, &str)]| l.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        let a = check_oack(&asked, &o(&[("blksize", "1024"), ("windowsize", "4"), ("tsize", "77")])).unwrap();
        assert_eq!(a, WriteAgreed { blksize: 1024, windowsize: 4, timeout: None });
        assert!(check_oack(&asked, &o(&[("blksize", "2000")])).is_err());
        assert!(check_oack(&asked, &o(&[("tsize", "78")])).is_err());
        assert!(check_oack(&asked, &o(&[("timeout", "4")])).is_err());
        assert!(check_oack(&asked, &o(&[("multicast", "")])).is_err());
        assert!(check_oack(&asked, &o(&[("blksize", "512"), ("blksize", "512")])).is_err());
        assert!(check_oack(&WriteOptions::default(), &o(&[("blksize", "512")])).is_err());
    }
}
