//! cluster_decode: the cluster envelope decoder facing arbitrary datagrams.
//!
//! Invariants:
//! - `decode` never panics, whatever the bytes and the key;
//! - anything it accepts under a key re-encodes under that key to a datagram that decodes to
//!   the same envelope and fits `MAX_MESSAGE`;
//! - a datagram sealed with one key is never accepted under another.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tftpcast_proto::cluster::{decode, encode, MAX_MESSAGE};

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (key, datagram) = input;
    if let Ok(env) = decode(&datagram, &key) {
        let again = encode(&env, &key).expect("an accepted envelope re-encodes");
        assert!(again.len() <= MAX_MESSAGE);
        assert_eq!(decode(&again, &key).expect("re-encoded envelope decodes"), env);
        let mut other = key.clone();
        other.push(0x55);
        assert!(decode(&again, &other).is_err(), "accepted under a different key");
    }
});
