//! tftpcast: a TFTP server for labs that boot hundreds of machines at once.
//!
//! # Layout
//! - `listener`: owns the listening sockets, parses requests, starts sessions.
//! - `session`: one actor per transfer, with its own TID socket, driving `tftpcast_proto`.
//! - `pacing`: the node-wide send budget handed to sessions as rate leases.
//! - `group`: one actor per multicast group (RFC 2090).
//! - `coordinator`: the table of active multicast groups; every multicast request joins or
//!   starts a group here.
//! - `file_cache`: root confinement and shared file contents.
//! - `node`: wires the actors together, signals, state dumps, shutdown.
//! - `config`, `logging`, `net`, `udp`: configuration layers, tracing setup, socket plumbing.
//! - `client`: `tftpcast get`.

mod bench;
mod client;
mod config;
mod coordinator;
mod file_cache;
mod group;
mod listener;
mod logging;
mod membership;
mod net;
mod node;
mod pacing;
mod session;
mod state;
mod timer;
mod transport;
mod udp;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "tftpcast", version, about = "TFTP server with multicast, flow control and clustering")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve files over TFTP.
    Serve(ServeArgs),
    /// Fetch a file from a TFTP server.
    Get(client::GetArgs),
    /// Load a TFTP server with concurrent clients and report goodput, latency and failures.
    Bench(bench::BenchArgs),
}

/// Flags of `tftpcast serve`; each overrides the configuration key named in its help.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// TOML configuration file (see config/default.toml for every key).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory to serve [server.root].
    #[arg(long)]
    root: Option<PathBuf>,
    /// Address to listen on, repeatable [server.listen].
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    listen: Vec<String>,
    /// Ports for transfer sockets, LO-HI [server.tid_port_range].
    #[arg(long, value_name = "LO-HI")]
    tid_port_range: Option<String>,
    /// Serve every transfer from the listening port (NAT, Kubernetes) [server.single_port].
    #[arg(long)]
    single_port: bool,
    /// Node-wide send rate cap in Mbit/s, 0 for none [pacing.max_rate_mbps].
    #[arg(long)]
    max_rate_mbps: Option<u64>,
    /// IPv4 range of multicast group addresses, CIDR [multicast.range].
    #[arg(long, value_name = "CIDR")]
    multicast_range: Option<String>,
    /// Destination port of multicast DATA [multicast.port].
    #[arg(long, value_name = "PORT")]
    multicast_port: Option<u16>,
    /// IPv4 address of the interface multicast leaves through [multicast.interface].
    #[arg(long, value_name = "ADDR")]
    multicast_interface: Option<String>,
    /// Delay before a new multicast group sends, in ms [multicast.start_delay_ms].
    #[arg(long, value_name = "N")]
    start_delay_ms: Option<u64>,
    /// This node's name in the cluster [cluster.node_id].
    #[arg(long, value_name = "NAME")]
    node_id: Option<String>,
    /// UDP address for cluster traffic; enables the cluster [cluster.listen].
    #[arg(long, value_name = "ADDR:PORT")]
    cluster_listen: Option<String>,
    /// Address peers reach this node at [cluster.advertise].
    #[arg(long, value_name = "ADDR:PORT")]
    advertise: Option<String>,
    /// A seed peer, repeatable [cluster.peers]. The key comes from TFTPCAST_CLUSTER__KEY or
    /// cluster.key_file, never from a flag.
    #[arg(long = "peer", value_name = "ADDR:PORT")]
    peers: Vec<String>,
    /// Log format: text or json [log.format].
    #[arg(long, value_name = "text|json")]
    log_format: Option<String>,
    /// Seconds between state dumps, 0 for none [log.state_interval_s].
    #[arg(long, value_name = "N")]
    state_interval_s: Option<u64>,
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides = config::Overrides {
        root: args.root,
        listen: args.listen,
        tid_port_range: args.tid_port_range,
        single_port: args.single_port,
        max_rate_mbps: args.max_rate_mbps,
        log_format: args.log_format,
        state_interval_s: args.state_interval_s,
        multicast_range: args.multicast_range,
        multicast_port: args.multicast_port,
        multicast_interface: args.multicast_interface,
        start_delay_ms: args.start_delay_ms,
        node_id: args.node_id,
        cluster_listen: args.cluster_listen,
        advertise: args.advertise,
        peers: args.peers,
    };
    let validated = match config::Settings::load(args.config.as_deref(), std::env::vars(), &overrides) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("tftpcast: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(&validated.settings.log.format, &validated.settings.log.level);
    ExitCode::from(node::run(validated))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => bench::run(&args),
        Command::Get(args) => match client::run_get(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tftpcast get: {e}");
                ExitCode::from(1)
            }
        },
    }
}
