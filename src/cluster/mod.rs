//! Multicast groups and the nodes that share them: the coordinator's group table, the group
//! actors, and the membership of the cluster.

pub mod coordinator;
pub mod group;
pub mod membership;
