//! packet_decode: arbitrary datagrams through `packet::decode`.
//!
//! Invariants, beyond "never panics":
//! - what decode accepts respects the limits it promises (request size, OACK option count,
//!   DATA payload size, no NUL inside a field, option names lower-cased); a request's options
//!   are bounded by its size only (unknown options are ignored, RFC 2347);
//! - round trip: an accepted packet re-encodes to a datagram that decodes to an equal packet
//!   (ERROR messages excepted only by the documented cut at 255 bytes), and that encoding is a
//!   fixed point (encode . decode is the identity on it);
//! - a request or OACK accepted from at most `MAX_REQUEST` bytes re-encodes within
//!   `MAX_REQUEST` bytes, so what the server echoes can never be refused as too long.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tftpcast_proto::packet::{decode, Packet, Request, MAX_BLKSIZE, MAX_OPTIONS, MAX_REQUEST};

/// The cut `encode_error` applies: at most 255 bytes, at a char boundary.
fn cut_message(m: &str) -> String {
    let mut end = m.len().min(255);
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    m[..end].to_string()
}

fn check_fields(what: &str, opts: &[(String, String)], max: usize) {
    assert!(opts.len() <= max, "{what}: {} options accepted (max {max})", opts.len());
    for (k, v) in opts {
        assert!(!k.contains('\0') && !v.contains('\0'), "{what}: NUL inside an option field");
        assert_eq!(k, &k.to_ascii_lowercase(), "{what}: option name not lower-cased");
    }
}

fn check_request(r: &Request, input_len: usize) {
    assert!(input_len <= MAX_REQUEST, "request of {input_len} bytes accepted (max {MAX_REQUEST})");
    assert!(!r.filename.is_empty(), "empty file name accepted");
    assert!(!r.filename.contains(&0), "NUL inside the file name");
    // Bounded by the request size alone: a pair takes at least 2 bytes (two empty fields).
    check_fields("request", &r.options, MAX_REQUEST / 2);
}

fuzz_target!(|data: &[u8]| {
    let Ok(p) = decode(data) else { return };
    match &p {
        Packet::Rrq(r) | Packet::Wrq(r) => check_request(r, data.len()),
        Packet::Data { data: d, .. } => {
            assert!(d.len() <= MAX_BLKSIZE as usize, "DATA payload of {} bytes accepted", d.len());
            assert_eq!(d.len() + 4, data.len(), "DATA payload is not the rest of the datagram");
        }
        Packet::Ack(_) => assert!(data.len() >= 4),
        Packet::Error { message, .. } => assert!(!message.contains('\0'), "NUL inside an ERROR message"),
        Packet::Oack(opts) => {
            assert!(data.len() <= MAX_REQUEST + 2, "OACK of {} bytes accepted", data.len());
            check_fields("OACK", opts, MAX_OPTIONS);
        }
    }

    let encoded = p.to_vec();
    if matches!(p, Packet::Rrq(_) | Packet::Wrq(_) | Packet::Oack(_)) {
        assert!(
            encoded.len() <= MAX_REQUEST,
            "{:?} decoded from {} bytes re-encodes to {} bytes, more than MAX_REQUEST ({MAX_REQUEST}): \
             decode would refuse its own output",
            p.opcode(),
            data.len(),
            encoded.len()
        );
    }
    let again = match decode(&encoded) {
        Ok(q) => q,
        Err(e) => panic!("re-encoded {:?} does not decode: {e}\n  input   {data:?}\n  encoded {encoded:?}", p.opcode()),
    };
    let expected = match &p {
        Packet::Error { code, message } => Packet::Error { code: *code, message: cut_message(message) },
        other => other.clone(),
    };
    assert_eq!(again, expected, "round trip changed the packet\n  input   {data:?}\n  encoded {encoded:?}");
    // The encoding is canonical: encoding the re-decoded packet gives the same bytes.
    assert_eq!(again.to_vec(), encoded, "encoding is not a fixed point");
});
