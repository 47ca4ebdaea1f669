//! TFTP packet codec (RFC 1350, RFC 2347 OACK).
//!
//! Decoding borrows from the datagram so the per-packet path allocates nothing for DATA and
//! ACK; requests, errors and OACKs are rare and own their strings. Every length is checked
//! before it is read: a truncated or garbage datagram becomes a [`DecodeError`], never a panic.

use std::fmt;

/// Largest block size RFC 2348 allows.
pub const MAX_BLKSIZE: u16 = 65464;
/// Smallest block size RFC 2348 allows.
pub const MIN_BLKSIZE: u16 = 8;
/// RFC 1350's block size, used when no `blksize` option was agreed.
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Upper bound of any TFTP datagram: a DATA header plus the largest block.
pub const MAX_DATAGRAM: usize = 4 + MAX_BLKSIZE as usize;
/// Longest request we accept. RFC 1350 requests fit in 512 bytes; options add a few dozen
/// bytes. Anything much larger is abuse, and bounding it bounds what a request can cost us.
pub const MAX_REQUEST: usize = 2048;
/// Most options one OACK may carry (a real client sends at most five or six). A request may
/// carry any number within `MAX_REQUEST`: options a server does not know are ignored (RFC 2347).
pub const MAX_OPTIONS: usize = 16;

/// The opcodes of RFC 1350 and RFC 2347.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Opcode {
    Rrq = 1,
    Wrq = 2,
    Data = 3,
    Ack = 4,
    Error = 5,
    Oack = 6,
}

impl Opcode {
    pub fn from_u16(v: u16) -> Option<Opcode> {
        Some(match v {
            1 => Opcode::Rrq,
            2 => Opcode::Wrq,
            3 => Opcode::Data,
            4 => Opcode::Ack,
            5 => Opcode::Error,
            6 => Opcode::Oack,
            _ => return None,
        })
    }
}

/// The TFTP error codes (RFC 1350 codes 0-7, RFC 2347 code 8), declared once with their
/// default messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTid,
    FileExists,
    NoSuchUser,
    OptionRefused,
    /// A code outside 0..=8 received from a peer; kept so it can be logged as sent.
    Other(u16),
}

impl ErrorCode {
    const TABLE: [(ErrorCode, u16, &'static str); 9] = [
        (ErrorCode::NotDefined, 0, "Not defined"),
        (ErrorCode::FileNotFound, 1, "File not found"),
        (ErrorCode::AccessViolation, 2, "Access violation"),
        (ErrorCode::DiskFull, 3, "Disk full or allocation exceeded"),
        (ErrorCode::IllegalOperation, 4, "Illegal TFTP operation"),
        (ErrorCode::UnknownTid, 5, "Unknown transfer ID"),
        (ErrorCode::FileExists, 6, "File already exists"),
        (ErrorCode::NoSuchUser, 7, "No such user"),
        (ErrorCode::OptionRefused, 8, "Option negotiation refused"),
    ];

    pub fn code(self) -> u16 {
        match self {
            ErrorCode::Other(c) => c,
            known => Self::TABLE.iter().find(|(e, _, _)| *e == known).map(|t| t.1).unwrap_or(0),
        }
    }

    pub fn from_code(code: u16) -> ErrorCode {
        Self::TABLE.iter().find(|t| t.1 == code).map(|t| t.0).unwrap_or(ErrorCode::Other(code))
    }

    pub fn default_message(self) -> &'static str {
        Self::TABLE.iter().find(|(e, _, _)| *e == self).map(|t| t.2).unwrap_or("Unknown error")
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.default_message(), self.code())
    }
}

/// Transfer mode of a request. `mail` is obsolete (RFC 1350) and refused by servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Octet,
    Netascii,
    Mail,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Octet => "octet",
            Mode::Netascii => "netascii",
            Mode::Mail => "mail",
        }
    }
}

/// A read or write request. Option names are lower-cased (RFC 2347 says they are case
/// insensitive); values are kept as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The file name exactly as the client sent it (not necessarily UTF-8).
    pub filename: Vec<u8>,
    pub mode: Mode,
    pub options: Vec<(String, String)>,
}

impl Request {
    pub fn filename_lossy(&self) -> String {
        String::from_utf8_lossy(&self.filename).into_owned()
    }
}

/// A decoded packet. DATA borrows its payload from the datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request),
    Wrq(Request),
    Data { block: u16, data: &'a [u8] },
    Ack(u16),
    Error { code: ErrorCode, message: String },
    Oack(Vec<(String, String)>),
}

impl Packet<'_> {
    pub fn opcode(&self) -> Opcode {
        match self {
            Packet::Rrq(_) => Opcode::Rrq,
            Packet::Wrq(_) => Opcode::Wrq,
            Packet::Data { .. } => Opcode::Data,
            Packet::Ack(_) => Opcode::Ack,
            Packet::Error { .. } => Opcode::Error,
            Packet::Oack(_) => Opcode::Oack,
        }
    }

    /// Appends the wire form of this packet to `buf`.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        match self {
            Packet::Rrq(r) => encode_request(Opcode::Rrq, r, buf),
            Packet::Wrq(r) => encode_request(Opcode::Wrq, r, buf),
            Packet::Data { block, data } => {
                buf.extend_from_slice(&data_header(*block));
                buf.extend_from_slice(data);
            }
            Packet::Ack(block) => buf.extend_from_slice(&ack(*block)),
            Packet::Error { code, message } => encode_error(*code, message, buf),
            Packet::Oack(opts) => encode_oack(opts, buf),
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// Why a datagram is not a valid TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram shorter than its opcode requires")]
    Truncated,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("string field not terminated by NUL")]
    Unterminated,
    #[error("empty file name")]
    EmptyFilename,
    #[error("unknown transfer mode")]
    BadMode,
    #[error("option without a value")]
    OptionWithoutValue,
    #[error("too many options")]
    TooManyOptions,
    #[error("request longer than {MAX_REQUEST} bytes")]
    RequestTooLong,
    /// A request whose name and mode fit in `MAX_REQUEST` bytes but whose options do not: an
    /// option negotiation problem (error 8), not a malformed packet.
    #[error("options make the request longer than {MAX_REQUEST} bytes")]
    OptionsTooLong,
    #[error("DATA payload larger than the largest block size")]
    DataTooLong,
    #[error("trailing bytes after the packet")]
    TrailingBytes,
    #[error("option name or value is not UTF-8")]
    NotUtf8,
}

/// The 4-byte header of DATA packet `block`.
#[inline]
pub fn data_header(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, Opcode::Data as u8, b[0], b[1]]
}

/// An ACK packet for `block`.
#[inline]
pub fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, Opcode::Ack as u8, b[0], b[1]]
}

fn push_cstr(buf: &mut Vec<u8>, s: &[u8]) {
    // A NUL inside a field would end it early on the peer's side; drop it instead.
    buf.extend(s.iter().copied().filter(|&b| b != 0));
    buf.push(0);
}

pub fn encode_request(op: Opcode, r: &Request, buf: &mut Vec<u8>) {
    buf.extend_from_slice(&(op as u16).to_be_bytes());
    push_cstr(buf, &r.filename);
    push_cstr(buf, r.mode.as_str().as_bytes());
    for (k, v) in &r.options {
        push_cstr(buf, k.as_bytes());
        push_cstr(buf, v.as_bytes());
    }
}

/// Appends an ERROR packet. Messages are cut at 255 bytes: they are for humans, and a long
/// message would make an error reply an amplifier.
pub fn encode_error(code: ErrorCode, message: &str, buf: &mut Vec<u8>) {
    buf.extend_from_slice(&(Opcode::Error as u16).to_be_bytes());
    buf.extend_from_slice(&code.code().to_be_bytes());
    let mut end = message.len().min(255);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    push_cstr(buf, message[..end].as_bytes());
}

/// An ERROR to send. Codes 1-7 always carry RFC 1350's text (`default_message`), whatever
/// `message` says: scripts and client wrappers match on those texts, as tftpd-hpa and atftpd
/// send them, and details belong in the log. Codes 0 and 8 carry `message`.
pub fn error_packet(code: ErrorCode, message: &str) -> Vec<u8> {
    let message = if (1..=7).contains(&code.code()) { code.default_message() } else { message };
    let mut v = Vec::with_capacity(5 + message.len().min(255));
    encode_error(code, message, &mut v);
    v
}

pub fn encode_oack(opts: &[(String, String)], buf: &mut Vec<u8>) {
    buf.extend_from_slice(&(Opcode::Oack as u16).to_be_bytes());
    for (k, v) in opts {
        push_cstr(buf, k.as_bytes());
        push_cstr(buf, v.as_bytes());
    }
}

/// Splits `bytes` into NUL-terminated fields, at most `max_fields`. Fails if the last field
/// is not terminated.
fn cstrings(bytes: &[u8], max_fields: usize) -> Result<Vec<&[u8]>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let nul = rest.iter().position(|&b| b == 0).ok_or(DecodeError::Unterminated)?;
        out.push(&rest[..nul]);
        rest = &rest[nul + 1..];
        if out.len() > max_fields {
            return Err(DecodeError::TooManyOptions);
        }
    }
    Ok(out)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Options are ASCII text (RFC 2347). Anything that is not UTF-8 is refused rather than
/// replaced: a replacement character is three bytes, so a lossy conversion would turn a
/// request within the size limit into a larger one that no longer round-trips.
fn decode_options(fields: &[&[u8]]) -> Result<Vec<(String, String)>, DecodeError> {
    if fields.len() % 2 != 0 {
        return Err(DecodeError::OptionWithoutValue);
    }
    let text = |b: &[u8]| std::str::from_utf8(b).map(str::to_owned).map_err(|_| DecodeError::NotUtf8);
    fields.chunks(2).map(|kv| Ok((text(kv[0])?.to_ascii_lowercase(), text(kv[1])?))).collect()
}

fn decode_request(body: &[u8]) -> Result<Request, DecodeError> {
    if body.len() + 2 > MAX_REQUEST {
        // Name and mode within the limit: what does not fit are options.
        let head = &body[..MAX_REQUEST - 2];
        let name_and_mode = head.iter().filter(|&&b| b == 0).nth(1).is_some();
        return Err(if name_and_mode { DecodeError::OptionsTooLong } else { DecodeError::RequestTooLong });
    }
    // No count limit beyond the size: unknown options are ignored, not refused (RFC 2347).
    let fields = cstrings(body, usize::MAX)?;
    if fields.len() < 2 {
        return Err(DecodeError::Unterminated);
    }
    if fields[0].is_empty() {
        return Err(DecodeError::EmptyFilename);
    }
    let mode = match lossy(fields[1]).to_ascii_lowercase().as_str() {
        "octet" => Mode::Octet,
        "netascii" => Mode::Netascii,
        "mail" => Mode::Mail,
        _ => return Err(DecodeError::BadMode),
    };
    // Some clients pad requests with extra NULs; an empty trailing field pair is tolerated.
    let mut opt_fields = &fields[2..];
    while let Some((last, init)) = opt_fields.split_last() {
        if last.is_empty() && init.len() % 2 == 0 {
            opt_fields = init;
        } else {
            break;
        }
    }
    Ok(Request { filename: fields[0].to_vec(), mode, options: decode_options(opt_fields)? })
}

/// Decodes one datagram.
pub fn decode(datagram: &[u8]) -> Result<Packet<'_>, DecodeError> {
    if datagram.len() < 2 {
        return Err(DecodeError::Truncated);
    }
    let raw = u16::from_be_bytes([datagram[0], datagram[1]]);
    let op = Opcode::from_u16(raw).ok_or(DecodeError::UnknownOpcode(raw))?;
    let body = &datagram[2..];
    Ok(match op {
        Opcode::Rrq => Packet::Rrq(decode_request(body)?),
        Opcode::Wrq => Packet::Wrq(decode_request(body)?),
        Opcode::Data => {
            if body.len() < 2 {
                return Err(DecodeError::Truncated);
            }
            if body.len() - 2 > MAX_BLKSIZE as usize {
                return Err(DecodeError::DataTooLong);
            }
            Packet::Data { block: u16::from_be_bytes([body[0], body[1]]), data: &body[2..] }
        }
        Opcode::Ack => {
            if body.len() < 2 {
                return Err(DecodeError::Truncated);
            }
            // RFC 1350 ACKs are exactly 4 bytes, but some stacks pad small datagrams; extra
            // bytes carry no meaning, so they are ignored rather than refused.
            Packet::Ack(u16::from_be_bytes([body[0], body[1]]))
        }
        Opcode::Error => {
            if body.len() < 2 {
                return Err(DecodeError::Truncated);
            }
            let code = ErrorCode::from_code(u16::from_be_bytes([body[0], body[1]]));
            // The message should be NUL-terminated; a missing NUL is forgiven since the packet
            // only ends the transfer anyway.
            let msg = &body[2..];
            let msg = &msg[..msg.iter().position(|&b| b == 0).unwrap_or(msg.len())];
            let msg = &msg[..msg.len().min(512)];
            Packet::Error { code, message: lossy(msg) }
        }
        Opcode::Oack => {
            if body.len() > MAX_REQUEST {
                return Err(DecodeError::RequestTooLong);
            }
            let fields = cstrings(body, 2 * MAX_OPTIONS)?;
            Packet::Oack(decode_options(&fields)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rrq_with_options_round_trips() {
        let raw = b"\x00\x01pxelinux.0\x00OCTET\x00BlkSize\x001428\x00tsize\x000\x00";
        let p = decode(raw).unwrap();
        let Packet::Rrq(r) = &p else { panic!("not an RRQ: {p:?}") };
        assert_eq!(r.filename, b"pxelinux.0");
        assert_eq!(r.mode, Mode::Octet);
        assert_eq!(r.options, vec![("blksize".into(), "1428".into()), ("tsize".into(), "0".into())]);
    }

    #[test]
    fn malformed_requests_are_errors() {
        assert_eq!(decode(b"\x00\x01file"), Err(DecodeError::Unterminated));
        assert_eq!(decode(b"\x00\x01file\x00"), Err(DecodeError::Unterminated));
        assert_eq!(decode(b"\x00\x01\x00octet\x00"), Err(DecodeError::EmptyFilename));
        assert_eq!(decode(b"\x00\x01f\x00binary\x00"), Err(DecodeError::BadMode));
        assert_eq!(decode(b"\x00\x01f\x00octet\x00blksize\x00"), Err(DecodeError::OptionWithoutValue));
        assert_eq!(decode(b"\x00\x09"), Err(DecodeError::UnknownOpcode(9)));
        assert_eq!(decode(b"\x00"), Err(DecodeError::Truncated));
        assert_eq!(decode(b"\x00\x04\x00"), Err(DecodeError::Truncated));
        assert_eq!(decode(b"\x00\x03\x00"), Err(DecodeError::Truncated));
        let mut long = b"\x00\x01".to_vec();
        long.extend(std::iter::repeat(b'a').take(MAX_REQUEST));
        long.extend_from_slice(b"\x00octet\x00");
        assert_eq!(decode(&long), Err(DecodeError::RequestTooLong));
    }

    #[test]
    fn non_utf8_options_are_refused() {
        let mut rrq = b"\x00\x01f\x00octet\x00".to_vec();
        rrq.extend(std::iter::repeat_n(0xff, 700));
        rrq.extend_from_slice(b"\x00x\x00");
        assert_eq!(decode(&rrq), Err(DecodeError::NotUtf8));
        assert_eq!(decode(b"\x00\x06\xff\x00\x00"), Err(DecodeError::NotUtf8));
    }

    #[test]
    fn error_code_table_round_trips() {
        for c in 0..=8u16 {
            assert_eq!(ErrorCode::from_code(c).code(), c);
        }
        assert_eq!(ErrorCode::from_code(42), ErrorCode::Other(42));
        assert_eq!(ErrorCode::OptionRefused.code(), 8);
    }

    #[test]
    fn errors_1_to_7_carry_rfc_1350_texts() {
        let text = |p: Vec<u8>| match decode(&p) {
            Ok(Packet::Error { message, .. }) => message,
            other => panic!("not an ERROR: {other:?}"),
        };
        let rfc = ["File not found", "Access violation", "Disk full or allocation exceeded", "Illegal TFTP operation", "Unknown transfer ID", "File already exists", "No such user"];
        for (code, want) in (1..=7).zip(rfc) {
            assert_eq!(text(error_packet(ErrorCode::from_code(code), "details: /srv/x is missing")), want);
        }
        // Codes 0 and 8 have no fixed text: the message says what happened.
        assert_eq!(text(error_packet(ErrorCode::NotDefined, "Server busy")), "Server busy");
        assert_eq!(text(error_packet(ErrorCode::OptionRefused, "option blksize has invalid value")), "option blksize has invalid value");
    }

    #[test]
    fn a_request_may_carry_any_number_of_options_within_the_size_limit() {
        let mut rrq = b"\x00\x01f\x00octet\x00".to_vec();
        for i in 0..200 {
            rrq.extend_from_slice(format!("x{i}\x001\x00").as_bytes());
        }
        assert!(rrq.len() <= MAX_REQUEST);
        let Ok(Packet::Rrq(r)) = decode(&rrq) else { panic!("200 small options refused: {:?}", decode(&rrq)) };
        assert_eq!(r.options.len(), 200);
        // Options that do not fit: an option negotiation problem, not a malformed request.
        rrq.extend(std::iter::repeat_n(b'y', MAX_REQUEST));
        rrq.extend_from_slice(b"\x001\x00");
        assert_eq!(decode(&rrq), Err(DecodeError::OptionsTooLong));
        // An OACK still carries at most MAX_OPTIONS.
        let oack = Packet::Oack((0..=MAX_OPTIONS).map(|i| (format!("x{i}"), "1".to_string())).collect()).to_vec();
        assert_eq!(decode(&oack), Err(DecodeError::TooManyOptions));
    }

    #[test]
    fn error_message_is_bounded() {
        let p = error_packet(ErrorCode::NotDefined, &"é".repeat(1000));
        assert!(p.len() <= 4 + 255 + 1);
        assert!(decode(&p).is_ok());
    }

    fn option_strategy() -> impl Strategy<Value = (String, String)> {
        ("[a-z]{1,10}", "[a-zA-Z0-9,.]{0,12}")
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600),
            // Mostly valid opcodes, so that something decodes and the round trip is checked.
            (0u8..8, proptest::collection::vec(any::<u8>(), 0..600)).prop_map(|(op, rest)| [vec![0, op], rest].concat()),
            // Requests and OACKs: NUL-separated fields from words a request is made of.
            (prop_oneof![Just(1u8), Just(2), Just(6)], proptest::collection::vec(prop_oneof![
                Just("f".to_string()), Just("OCTET".to_string()), Just("netascii".to_string()), Just("BlkSize".to_string()),
                Just("1024".to_string()), Just(String::new()), "[ -~]{0,12}",
            ], 0..12), any::<bool>()).prop_map(|(op, fields, nul)| {
                let mut v = vec![0, op];
                v.extend(fields.join("\0").into_bytes());
                if nul { v.push(0) }
                v
            }),
        ]) {
            // Whatever decodes survives a round trip (ERROR messages up to the 255-byte cut)
            // and its encoding is a fixed point.
            if let Ok(p) = decode(&data) {
                let encoded = p.to_vec();
                let again = decode(&encoded).expect("a decoded packet re-encodes to something that decodes");
                match (&p, &again) {
                    (Packet::Error { code, message }, Packet::Error { code: c2, message: m2 }) => {
                        prop_assert_eq!(code, c2);
                        prop_assert!(message.starts_with(m2.as_str()) && m2.len() <= 255);
                    }
                    _ => prop_assert_eq!(&again, &p),
                }
                prop_assert_eq!(again.to_vec(), encoded);
            }
        }

        #[test]
        fn request_round_trip(name in "[a-zA-Z0-9/._-]{1,100}", opts in proptest::collection::vec(option_strategy(), 0..8), wrq: bool, net: bool) {
            let req = Request { filename: name.into_bytes(), mode: if net { Mode::Netascii } else { Mode::Octet }, options: opts };
            let p = if wrq { Packet::Wrq(req) } else { Packet::Rrq(req) };
            let bytes = p.to_vec();
            prop_assert_eq!(decode(&bytes).unwrap(), p);
        }

        #[test]
        fn data_ack_error_round_trip(block: u16, data in proptest::collection::vec(any::<u8>(), 0..2000), code in 0u16..9, msg in "[ -~]{0,100}") {
            let d = Packet::Data { block, data: &data };
            let dv = d.to_vec();
            prop_assert_eq!(decode(&dv).unwrap(), d);
            let a = Packet::Ack(block);
            let av = a.to_vec();
            prop_assert_eq!(decode(&av).unwrap(), a);
            let e = Packet::Error { code: ErrorCode::from_code(code), message: msg };
            let ev = e.to_vec();
            prop_assert_eq!(decode(&ev).unwrap(), e);
        }

        #[test]
        fn oack_round_trip(opts in proptest::collection::vec(option_strategy(), 0..8)) {
            let p = Packet::Oack(opts);
            let v = p.to_vec();
            prop_assert_eq!(decode(&v).unwrap(), p);
        }
    }
}
