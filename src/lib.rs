//! tftpcast: a TFTP server for labs that boot hundreds of machines at once.
//!
//! The protocol itself (packets, options, the unicast and multicast state machines, flow
//! control decisions) is the sans-IO crate `tftpcast_proto`; this crate is the node that runs
//! it: actors that own sockets, timers and files, and translate between the network and the
//! protocol. `main.rs` only parses the command line.
//!
//! # Layout
//! Dependencies point down this list: a module uses only modules below it (and `proto`).
//! An actor's messages sit beside it; a notification an actor sends upward (to an actor
//! that depends on it) is part of the sender's interface and sits beside the sender, so
//! no two modules import each other.
//!
//! - [`node`]: `run`, which wires the actors together, handles signals, state dumps and
//!   shutdown; [`node::listener`] (the listening sockets: requests, checks, admission,
//!   policy, mapping), [`node::session`] (one actor per read transfer), [`node::upload`]
//!   (one actor per write request), [`node::admission`] (session and request-rate limits,
//!   the defer queue), [`node::fd_limit`] (the open-file limit raised at start), [`node::systemd`] (readiness
//!   notification, socket activation, the privilege drop).
//! - [`cluster`]: [`cluster::coordinator`] (the table of multicast groups; joins, starts,
//!   cluster-wide agreement), [`cluster::group`] (one actor per multicast group),
//!   [`cluster::membership`] (SWIM membership and authenticated messages between nodes).
//! - [`flow`]: [`flow::pacing`] (the node's send budget as rate leases, advice for new
//!   transfers), [`flow::lease`] (a sender's side of its lease).
//! - [`config`]: settings layers and validation, [`config::check`] (`check-config`),
//!   [`config::policy`] (per-client option rules), [`config::identity`] (users and groups).
//! - [`fs`]: [`fs::file_cache`] (root confinement, shared file contents),
//!   [`fs::upload_store`] (temporary files renamed into place), [`fs::mapping`] (client file
//!   names to paths), [`fs::names`] (the name rules all of them share).
//! - [`net`]: sockets (packet info, GSO, multicast), [`net::udp`] (datagram streams),
//!   [`net::transport`] (own socket or the shared port), [`net::timer`].
//! - [`client`]: `tftpcast get` and `put`, [`client::bench`] (the load generator).
//! - [`metrics`] (the Prometheus endpoint), [`logging`] (tracing setup), [`state`] (the
//!   state-dump message every actor handles).

pub mod client;
pub mod cluster;
pub mod config;
pub mod flow;
pub mod fs;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod node;
pub mod state;
