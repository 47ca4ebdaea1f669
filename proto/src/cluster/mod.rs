//! The cluster: what nodes tell each other ([`wire`]) and the group table every coordinator
//! keeps ([`table`]), the pure decisions of slot choice, start races, collisions, hand-over and
//! take-over.

pub mod table;
pub mod wire;

pub use wire::*;
