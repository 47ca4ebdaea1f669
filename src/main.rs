//! The `tftpcast` command: parses the command line and runs the library's `serve`, `get`,
//! `put`, `bench` or `check-config` (see `lib.rs` for the layout).

use tftpcast::client::{self, bench};
use tftpcast::config::{self, check as check_config};
use tftpcast::{logging, node};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Send a file to a TFTP server (a write request).
    Put(client::PutArgs),
    /// Load a TFTP server with concurrent clients and report goodput, latency and failures.
    Bench(bench::BenchArgs),
    /// Validate a configuration (the same layers and flags as `serve`) and print every
    /// effective setting with where it came from; exit 2 naming the first bad setting.
    CheckConfig(ServeArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (tftpcast.1 and one per subcommand) into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
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
    /// Address to listen on, repeatable; an address alone (10.0.0.1, [::]) means port 69
    /// [server.listen].
    #[arg(long = "listen", value_name = "ADDR[:PORT]")]
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
    /// Accept uploads (write requests) [uploads.enabled = true].
    #[arg(long, conflicts_with = "read_only")]
    allow_write: bool,
    /// Refuse uploads [uploads.enabled = false].
    #[arg(long)]
    read_only: bool,
    /// Log format: text or json [log.format].
    #[arg(long, value_name = "text|json")]
    log_format: Option<String>,
    /// Log filter: a level (error, warn, info, debug, trace) or target=level, comma-separated
    /// [log.level].
    #[arg(long, value_name = "LEVEL", conflicts_with = "verbose")]
    log_level: Option<String>,
    /// More log: -v is debug, -vv trace [log.level].
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Seconds between state dumps, 0 for none [log.state_interval_s].
    #[arg(long, value_name = "N")]
    state_interval_s: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics [server.metrics_listen].
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<String>,
    /// Switch to this user after binding, when started as root [server.user].
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Switch to this group after binding (default: the user's) [server.group].
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
}

/// Runs `serve`, or with `check` (the matches of `check-config`) only validates and reports.
fn serve(args: ServeArgs, check: Option<&clap::ArgMatches>) -> ExitCode {
    let overrides = config::Overrides {
        root: args.root,
        listen: args.listen,
        tid_port_range: args.tid_port_range,
        single_port: args.single_port,
        max_rate_mbps: args.max_rate_mbps,
        log_format: args.log_format,
        log_level: match args.verbose {
            0 => args.log_level,
            1 => Some("debug".into()),
            _ => Some("trace".into()),
        },
        state_interval_s: args.state_interval_s,
        multicast_range: args.multicast_range,
        multicast_port: args.multicast_port,
        multicast_interface: args.multicast_interface,
        start_delay_ms: args.start_delay_ms,
        node_id: args.node_id,
        cluster_listen: args.cluster_listen,
        advertise: args.advertise,
        peers: args.peers,
        allow_write: if args.allow_write {
            Some(true)
        } else if args.read_only {
            Some(false)
        } else {
            None
        },
        metrics_listen: args.metrics_listen,
        user: args.user,
        group: args.group,
    };
    let validated = match config::Settings::load(args.config.as_deref(), std::env::vars(), &overrides) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("tftpcast: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(m) = check {
        let cmd = Cli::command();
        let flags = cmd.find_subcommand("check-config").map(|c| check_config::flags_given(c, m)).unwrap_or_default();
        let env: Vec<(String, String)> = std::env::vars().collect();
        return match check_config::report(&validated, args.config.as_deref(), &env, &flags) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tftpcast: {e}");
                ExitCode::from(2)
            }
        };
    }
    logging::init(&validated.settings.log.format, &validated.settings.log.level);
    ExitCode::from(node::run(validated))
}

fn main() -> ExitCode {
    // Parsed in two steps so `check-config` can ask which flags were given.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Serve(args) => serve(args, None),
        Command::CheckConfig(args) => serve(args, matches.subcommand_matches("check-config")),
        Command::Bench(args) => bench::run(&args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tftpcast", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { dir } => match std::fs::create_dir_all(&dir).and_then(|_| clap_mangen::generate_to(Cli::command(), &dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tftpcast man: {}: {e}", dir.display());
                ExitCode::from(1)
            }
        },
        Command::Get(args) => match client::run_get(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tftpcast get: {e}");
                ExitCode::from(1)
            }
        },
        Command::Put(args) => match client::run_put(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tftpcast put: {e}");
                ExitCode::from(1)
            }
        },
    }
}
