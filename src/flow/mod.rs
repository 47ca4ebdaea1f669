//! Flow control the node applies to what it sends: the pacing actor's rate leases and a
//! sender's side of them.

pub mod lease;
pub mod pacing;
