//! file_cache: root confinement, open/stat, and shared immutable file contents.
//! (Interface first; the implementation is being written.)

use std::path::PathBuf;

use actix::prelude::*;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tftpcast_proto::ErrorCode;

/// Settings of the file cache (section `[files]` of the configuration).
#[derive(Debug, Clone)]
pub struct FileCacheConfig {
    /// Directory served; nothing outside it is ever opened.
    pub root: PathBuf,
    /// Memory cap for cached contents that no transfer is using.
    pub max_bytes: u64,
    /// Largest file served.
    pub max_file_bytes: u64,
}

/// Identity of a file version: two requests with equal keys get the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileKey {
    /// Path relative to the root, `/`-separated, normalised (no `.`/`..`, no leading `/`).
    pub path: String,
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// SHA-256 of the contents: equal on every node that holds the same bytes.
    pub sha256: [u8; 32],
}

/// A file ready to be sent: its identity and its contents (shared, never copied per transfer).
#[derive(Debug, Clone)]
pub struct FileReady {
    pub key: FileKey,
    pub data: Bytes,
}

/// Why a request cannot be served, with the TFTP error it maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("file not found")]
    NotFound,
    #[error("access violation: {0}")]
    Denied(&'static str),
    #[error("not a regular file")]
    NotRegular,
    #[error("file larger than the configured maximum")]
    TooLarge,
    #[error("I/O error: {0}")]
    Io(String),
}

impl FileError {
    pub fn error_code(&self) -> ErrorCode {
        match self {
            FileError::NotFound | FileError::NotRegular => ErrorCode::FileNotFound,
            FileError::Denied(_) | FileError::TooLarge | FileError::Io(_) => ErrorCode::AccessViolation,
        }
    }
}

/// Ask for a file by the name a client sent.
#[derive(Message)]
#[rtype(result = "Result<FileReady, FileError>")]
pub struct FileRequest {
    pub name: Vec<u8>,
}

pub struct FileCache {
    cfg: FileCacheConfig,
}

impl FileCache {
    pub fn new(cfg: FileCacheConfig) -> std::io::Result<FileCache> {
        Ok(FileCache { cfg })
    }
}

impl Actor for FileCache {
    type Context = Context<Self>;
}

impl Handler<FileRequest> for FileCache {
    type Result = ResponseFuture<Result<FileReady, FileError>>;
    fn handle(&mut self, _msg: FileRequest, _ctx: &mut Self::Context) -> Self::Result {
        let _ = &self.cfg;
        Box::pin(async { Err(FileError::NotFound) })
    }
}

impl Handler<crate::state::DumpState> for FileCache {
    type Result = ();
    fn handle(&mut self, _msg: crate::state::DumpState, _ctx: &mut Self::Context) {
        tracing::info!(target: "state", actor = "file_cache", "state");
    }
}
