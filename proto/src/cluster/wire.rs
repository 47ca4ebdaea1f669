//! wire: what cluster nodes tell each other about multicast groups, and its codec.
//!
//! Every datagram between nodes is an [`Envelope`]: a SWIM membership payload (opaque here,
//! produced by the membership layer) or an application [`Message`]. The envelope is encoded
//! with bincode 2 (serde), decoded with a hard size limit, and authenticated with
//! HMAC-SHA256 under the shared cluster key: a node without the key can neither join nor
//! inject groups. The envelope codec is [`encode`] / [`decode`] at the bottom of this file.
//!
//! # Wire format
//! ```text
//! magic "TFCL" (4) | version (1) | bincode 2 (standard config) Envelope | HMAC-SHA256 tag (32)
//! ```
//! The tag covers every byte before it. [`decode`] checks the size, the magic and the version,
//! verifies the tag in constant time, and only then parses the payload, with bincode's
//! allocation limit set to [`MAX_MESSAGE`]; the payload must be consumed exactly.

use std::net::{SocketAddr, SocketAddrV4};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// A node's name (`--node-id`), unique in the cluster.
pub type NodeId = String;

/// Largest datagram a node sends or accepts; a decoder never allocates more than this.
pub const MAX_MESSAGE: usize = 60 * 1024;

/// Identity of a stream, equal on every node that holds the same bytes: content hash and
/// size, plus the block size and mode that fix the blocks.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamKey {
    pub sha256: [u8; 32],
    pub size: u64,
    pub blksize: u16,
    /// true: netascii, false: octet.
    pub netascii: bool,
    /// The file's path relative to the root (for logs and to find the file on a takeover).
    pub path: String,
}

/// One active multicast group as its owner announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub key: StreamKey,
    /// Multicast destination of the group's DATA.
    pub group: SocketAddrV4,
    /// The group's transfer socket: DATA and OACKs leave from here, clients ACK to here.
    pub tid: SocketAddr,
    /// Block the master asked for last.
    pub block: u64,
    /// Members in join order (the oldest is promoted first) with their OACK options.
    pub members: Vec<MemberInfo>,
    /// DATA has started flowing.
    pub started: bool,
    /// The owner claims the address and port but has answered no member yet: a group that
    /// has answered members keeps its slot against a claim (see the table's collisions).
    pub claim: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub client: SocketAddr,
    pub master: bool,
    pub options: Vec<(String, String)>,
}

/// Application messages between coordinators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// The complete list of groups the sender owns (state, not deltas: a group missing from
    /// the list has ended). Sent on every change and periodically.
    Groups { seq: u64, groups: Vec<GroupInfo> },
    /// A client whose request reached the sender wants to join the receiver's group.
    Enroll { key: StreamKey, client: SocketAddr, options: Vec<(String, String)> },
    /// A packet a client sent to a group's transfer socket reached the sender (the router
    /// hashed the client to it); the receiver owns the group.
    Relay { tid: SocketAddr, client: SocketAddr, packet: Vec<u8> },
}

/// What travels in one datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Envelope {
    /// SWIM membership traffic (foca's own encoding), opaque to this module.
    Swim(Vec<u8>),
    App { from: NodeId, msg: Message },
}

/// First bytes of every cluster datagram.
pub const MAGIC: [u8; 4] = *b"TFCL";
/// Wire format version; a node drops datagrams of any other version.
pub const VERSION: u8 = 2;
/// Length of the HMAC-SHA256 tag that ends every datagram.
pub const TAG_LEN: usize = 32;
const HEADER_LEN: usize = MAGIC.len() + 1;

type HmacSha256 = Hmac<Sha256>;

/// Why a cluster datagram could not be built or was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster key is empty")]
    EmptyKey,
    #[error("datagram of {0} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("datagram of {0} bytes is shorter than header and tag")]
    Truncated(usize),
    #[error("not a tftpcast cluster datagram (bad magic)")]
    BadMagic,
    #[error("unsupported cluster wire version {0}")]
    BadVersion(u8),
    #[error("authentication tag mismatch (wrong cluster key or corrupted datagram)")]
    BadTag,
    #[error("cannot encode envelope: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("malformed envelope: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("{0} bytes left over after the envelope")]
    TrailingBytes(usize),
}

fn mac(key: &[u8]) -> Result<HmacSha256, ClusterError> {
    if key.is_empty() {
        return Err(ClusterError::EmptyKey);
    }
    // HMAC takes keys of any length; the error case is unreachable for Hmac<Sha256>.
    HmacSha256::new_from_slice(key).map_err(|_| ClusterError::EmptyKey)
}

/// Encode and authenticate one envelope as a datagram of at most [`MAX_MESSAGE`] bytes.
pub fn encode(env: &Envelope, key: &[u8]) -> Result<Vec<u8>, ClusterError> {
    let mut mac = mac(key)?;
    let payload = bincode::serde::encode_to_vec(env, bincode::config::standard())?;
    let len = HEADER_LEN + payload.len() + TAG_LEN;
    if len > MAX_MESSAGE {
        return Err(ClusterError::TooLarge(len));
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&payload);
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());
    Ok(out)
}

/// Check and decode one datagram. Nothing is parsed before the tag is verified, and the
/// parser never allocates more than [`MAX_MESSAGE`] bytes.
pub fn decode(datagram: &[u8], key: &[u8]) -> Result<Envelope, ClusterError> {
    if datagram.len() > MAX_MESSAGE {
        return Err(ClusterError::TooLarge(datagram.len()));
    }
    let mut mac = mac(key)?;
    if datagram.len() < HEADER_LEN + TAG_LEN {
        return Err(ClusterError::Truncated(datagram.len()));
    }
    if datagram[..MAGIC.len()] != MAGIC {
        return Err(ClusterError::BadMagic);
    }
    if datagram[MAGIC.len()] != VERSION {
        return Err(ClusterError::BadVersion(datagram[MAGIC.len()]));
    }
    let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
    mac.update(signed);
    mac.verify_slice(tag).map_err(|_| ClusterError::BadTag)?;
    let payload = &signed[HEADER_LEN..];
    let config = bincode::config::standard().with_limit::<MAX_MESSAGE>();
    let (env, used): (Envelope, usize) = bincode::serde::decode_from_slice(payload, config)?;
    if used != payload.len() {
        return Err(ClusterError::TrailingBytes(payload.len() - used));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};

    const KEY: &[u8] = b"cluster secret";

    fn addr4() -> impl Strategy<Value = SocketAddrV4> {
        (any::<u32>(), any::<u16>()).prop_map(|(ip, port)| SocketAddrV4::new(Ipv4Addr::from(ip), port))
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            addr4().prop_map(SocketAddr::V4),
            (any::<u128>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0))),
        ]
    }

    fn options() -> impl Strategy<Value = Vec<(String, String)>> {
        prop::collection::vec(("[a-z]{1,10}", "[0-9a-z]{0,8}"), 0..5)
    }

    fn stream_key() -> impl Strategy<Value = StreamKey> {
        (any::<[u8; 32]>(), any::<u64>(), any::<u16>(), any::<bool>(), "\\PC{0,40}").prop_map(
            |(sha256, size, blksize, netascii, path)| StreamKey { sha256, size, blksize, netascii, path },
        )
    }

    fn group_info() -> impl Strategy<Value = GroupInfo> {
        let member = (addr(), any::<bool>(), options()).prop_map(|(client, master, options)| MemberInfo {
            client,
            master,
            options,
        });
        (stream_key(), addr4(), addr(), any::<u64>(), prop::collection::vec(member, 0..6), any::<bool>(), any::<bool>()).prop_map(
            |(key, group, tid, block, members, started, claim)| GroupInfo { key, group, tid, block, members, started, claim },
        )
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u64>(), prop::collection::vec(group_info(), 0..4))
                .prop_map(|(seq, groups)| Message::Groups { seq, groups }),
            (stream_key(), addr(), options()).prop_map(|(key, client, options)| Message::Enroll {
                key,
                client,
                options
            }),
            (addr(), addr(), prop::collection::vec(any::<u8>(), 0..600))
                .prop_map(|(tid, client, packet)| Message::Relay { tid, client, packet }),
        ]
    }

    fn envelope() -> impl Strategy<Value = Envelope> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..1400).prop_map(Envelope::Swim),
            ("[a-z0-9-]{1,16}", message()).prop_map(|(from, msg)| Envelope::App { from, msg }),
        ]
    }

    fn sample_key() -> StreamKey {
        StreamKey { sha256: [7; 32], size: 40 << 20, blksize: 1428, netascii: false, path: "boot/vmlinuz".into() }
    }

    /// One envelope of every kind.
    fn every_kind() -> Vec<Envelope> {
        let client: SocketAddr = "10.0.0.9:40000".parse().unwrap();
        let tid: SocketAddr = "10.0.0.1:50001".parse().unwrap();
        let group = GroupInfo {
            key: sample_key(),
            group: "239.255.0.1:1758".parse().unwrap(),
            tid,
            block: 1234,
            members: vec![MemberInfo { client, master: true, options: vec![("blksize".into(), "1428".into())] }],
            started: true,
            claim: false,
        };
        vec![
            Envelope::Swim(vec![]),
            Envelope::Swim((0..=255).collect()),
            Envelope::App { from: "a".into(), msg: Message::Groups { seq: 0, groups: vec![] } },
            Envelope::App { from: "node-b".into(), msg: Message::Groups { seq: u64::MAX, groups: vec![group] } },
            Envelope::App {
                from: "node-c".into(),
                msg: Message::Enroll { key: sample_key(), client, options: vec![("tsize".into(), "0".into())] },
            },
            Envelope::App {
                from: "node-d".into(),
                msg: Message::Relay {
                    tid,
                    client: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 9),
                    packet: vec![0, 4, 0, 1],
                },
            },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for env in every_kind() {
            let wire = encode(&env, KEY).unwrap();
            assert_eq!(&wire[..4], b"TFCL");
            assert_eq!(wire[4], VERSION);
            assert!(wire.len() <= MAX_MESSAGE);
            assert_eq!(decode(&wire, KEY).unwrap(), env);
        }
    }

    #[test]
    fn wrong_key_is_rejected() {
        for env in every_kind() {
            let wire = encode(&env, KEY).unwrap();
            assert!(matches!(decode(&wire, b"cluster secreT"), Err(ClusterError::BadTag)));
            assert!(matches!(decode(&wire, b"x"), Err(ClusterError::BadTag)));
        }
    }

    #[test]
    fn forged_message_is_rejected() {
        // An outsider with its own key builds a perfectly well-formed announcement.
        let forged = Envelope::App { from: "node-a".into(), msg: Message::Groups { seq: 99, groups: vec![] } };
        let wire = encode(&forged, b"attacker key").unwrap();
        assert!(matches!(decode(&wire, KEY), Err(ClusterError::BadTag)));
        // Re-tagging is impossible without the key; a tag copied from a genuine datagram does
        // not fit another payload.
        let genuine = encode(&Envelope::Swim(vec![1, 2, 3]), KEY).unwrap();
        let mut spliced = wire.clone();
        let n = spliced.len();
        spliced[n - TAG_LEN..].copy_from_slice(&genuine[genuine.len() - TAG_LEN..]);
        assert!(matches!(decode(&spliced, KEY), Err(ClusterError::BadTag)));
    }

    #[test]
    fn empty_key_is_refused() {
        let env = Envelope::Swim(vec![1]);
        assert!(matches!(encode(&env, b""), Err(ClusterError::EmptyKey)));
        let wire = encode(&env, KEY).unwrap();
        assert!(matches!(decode(&wire, b""), Err(ClusterError::EmptyKey)));
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        for env in every_kind() {
            let wire = encode(&env, KEY).unwrap();
            for i in 0..wire.len() * 8 {
                let mut bad = wire.clone();
                bad[i / 8] ^= 1 << (i % 8);
                assert!(decode(&bad, KEY).is_err(), "bit {i} of {env:?}");
            }
        }
    }

    #[test]
    fn truncated_and_extended_datagrams_are_rejected() {
        for env in every_kind() {
            let wire = encode(&env, KEY).unwrap();
            for len in 0..wire.len() {
                assert!(decode(&wire[..len], KEY).is_err(), "truncated to {len}");
            }
            let mut long = wire.clone();
            long.push(0);
            assert!(matches!(decode(&long, KEY), Err(ClusterError::BadTag)));
        }
    }

    /// Trailing bytes inside the authenticated part (a sender bug or a different encoder)
    /// are rejected even though the tag is valid.
    #[test]
    fn trailing_garbage_under_a_valid_tag_is_rejected() {
        let wire = encode(&Envelope::Swim(vec![9; 10]), KEY).unwrap();
        let mut signed = wire[..wire.len() - TAG_LEN].to_vec();
        signed.extend_from_slice(b"junk");
        let mut mac = HmacSha256::new_from_slice(KEY).unwrap();
        mac.update(&signed);
        signed.extend_from_slice(&mac.finalize().into_bytes());
        assert!(matches!(decode(&signed, KEY), Err(ClusterError::TrailingBytes(4))));
    }

    /// A validly tagged payload that claims a huge length is refused by the limit, not
    /// allocated.
    #[test]
    fn huge_length_prefix_under_a_valid_tag_is_rejected() {
        let mut signed = MAGIC.to_vec();
        signed.push(VERSION);
        signed.push(0); // Envelope::Swim
        signed.push(253); // u64 varint follows
        signed.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        let mut mac = HmacSha256::new_from_slice(KEY).unwrap();
        mac.update(&signed);
        signed.extend_from_slice(&mac.finalize().into_bytes());
        assert!(matches!(decode(&signed, KEY), Err(ClusterError::Decode(_))));
    }

    #[test]
    fn oversized_datagrams_are_rejected() {
        // Refused before anything else is looked at, even with a perfect header.
        let mut big = encode(&Envelope::Swim(vec![0; 100]), KEY).unwrap();
        big.resize(MAX_MESSAGE + 1, 0);
        assert!(matches!(decode(&big, KEY), Err(ClusterError::TooLarge(n)) if n == MAX_MESSAGE + 1));
        // And never produced.
        let huge = Envelope::Swim(vec![0; MAX_MESSAGE]);
        assert!(matches!(encode(&huge, KEY), Err(ClusterError::TooLarge(_))));
        // The largest envelope that fits is accepted.
        let overhead = encode(&Envelope::Swim(vec![]), KEY).unwrap().len();
        let mut n = MAX_MESSAGE - overhead;
        let fit = loop {
            match encode(&Envelope::Swim(vec![1; n]), KEY) {
                Ok(w) => break w,
                Err(_) => n -= 1,
            }
        };
        assert_eq!(fit.len(), MAX_MESSAGE);
        assert_eq!(decode(&fit, KEY).unwrap(), Envelope::Swim(vec![1; n]));
    }

    #[test]
    fn bad_magic_and_version_are_rejected() {
        let wire = encode(&Envelope::Swim(vec![1]), KEY).unwrap();
        let mut m = wire.clone();
        m[0] = b'X';
        assert!(matches!(decode(&m, KEY), Err(ClusterError::BadMagic)));
        let mut v = wire.clone();
        v[4] = VERSION + 1;
        assert!(matches!(decode(&v, KEY), Err(ClusterError::BadVersion(_))));
    }

    proptest! {
        #[test]
        fn prop_round_trip(env in envelope()) {
            let wire = encode(&env, KEY).unwrap();
            prop_assert!(wire.len() <= MAX_MESSAGE);
            prop_assert_eq!(decode(&wire, KEY).unwrap(), env);
        }

        #[test]
        fn prop_any_corruption_is_rejected(env in envelope(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut wire = encode(&env, KEY).unwrap();
            let i = pos.index(wire.len());
            wire[i] ^= 1 << bit;
            prop_assert!(decode(&wire, KEY).is_err());
        }

        #[test]
        fn prop_other_key_is_rejected(env in envelope(), other in prop::collection::vec(any::<u8>(), 1..64)) {
            prop_assume!(other.as_slice() != KEY);
            let wire = encode(&env, &other).unwrap();
            prop_assert!(matches!(decode(&wire, KEY), Err(ClusterError::BadTag)));
        }

        #[test]
        fn prop_truncation_is_rejected(env in envelope(), cut in any::<prop::sample::Index>()) {
            let wire = encode(&env, KEY).unwrap();
            let len = cut.index(wire.len());
            prop_assert!(decode(&wire[..len], KEY).is_err());
        }

        #[test]
        fn prop_trailing_garbage_is_rejected(env in envelope(), junk in prop::collection::vec(any::<u8>(), 1..64)) {
            let mut wire = encode(&env, KEY).unwrap();
            wire.extend_from_slice(&junk);
            prop_assert!(decode(&wire, KEY).is_err());
        }

        #[test]
        fn prop_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), magic: bool) {
            // Random bytes carry no valid tag (a 2^-256 chance): refused by the header or tag
            // checks, before the parser sees a byte, whether or not they start like a message.
            let mut bytes = bytes;
            if magic {
                bytes.splice(0..0, MAGIC.iter().copied().chain([VERSION]));
            }
            let r = decode(&bytes, KEY);
            prop_assert!(
                matches!(r, Err(ClusterError::Truncated(_) | ClusterError::BadMagic | ClusterError::BadVersion(_) | ClusterError::BadTag)),
                "random bytes got past the header and tag checks: {:?}",
                r
            );
        }

        /// Random payloads behind a valid header and a valid tag: this exercises the bincode
        /// parser itself (as if the key had leaked), which must fail cleanly, never panic or
        /// over-allocate.
        #[test]
        fn prop_random_payload_with_valid_tag_never_panics(payload in prop::collection::vec(any::<u8>(), 0..2048)) {
            let mut signed = MAGIC.to_vec();
            signed.push(VERSION);
            signed.extend_from_slice(&payload);
            let mut mac = HmacSha256::new_from_slice(KEY).unwrap();
            mac.update(&signed);
            signed.extend_from_slice(&mac.finalize().into_bytes());
            if let Ok(env) = decode(&signed, KEY) {
                // Whatever decodes is a valid envelope that survives a round trip.
                let again = encode(&env, KEY).unwrap();
                prop_assert_eq!(decode(&again, KEY).unwrap(), env);
            }
        }
    }
}
