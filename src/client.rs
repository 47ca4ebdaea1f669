//! `tftpcast get`: a TFTP client for humans and tests. (Being written.)

use std::net::SocketAddr;
use std::path::PathBuf;

/// Arguments of `tftpcast get`.
#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:69")]
    pub server: SocketAddr,
    /// Block size to ask for (RFC 2348).
    #[arg(long)]
    pub blksize: Option<u16>,
    /// Window size to ask for (RFC 7440).
    #[arg(long)]
    pub windowsize: Option<u16>,
    /// Retransmission timeout in seconds to ask for (RFC 2349).
    #[arg(long)]
    pub timeout: Option<u8>,
    /// Join the server's multicast group for this file (RFC 2090).
    #[arg(long)]
    pub multicast: bool,
    /// File to fetch.
    pub remote_file: String,
    /// Where to write it (default: the remote file's last component; `-` for stdout).
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("not implemented yet")]
    Unimplemented,
}

pub fn run_get(_args: &GetArgs) -> Result<u64, ClientError> {
    Err(ClientError::Unimplemented)
}
