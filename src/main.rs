//! tftpcast: a TFTP server for labs that boot hundreds of machines at once.
//!
//! # Layout
//! - `listener`: owns the listening sockets, parses requests, starts sessions.
//! - `session`: one actor per transfer, with its own TID socket, driving `tftpcast_proto`.
//! - `pacing`: the node-wide send budget.
//! - `file_cache`: root confinement and shared file contents.
//! - `coordinator`: the table of active multicast groups.
//! - `state`: state dumps on SIGUSR1 and on a timer.
//! - `client`: `tftpcast get`.

mod client;
mod file_cache;
mod state;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "tftpcast", version, about = "TFTP server with multicast, flow control and clustering")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fetch a file from a TFTP server.
    Get(client::GetArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Get(args) => match client::run_get(&args) {
            Ok(_) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tftpcast get: {e}");
                std::process::ExitCode::from(1)
            }
        },
    }
}
