//! The file system side: names clients send, the files they map to under the root, shared
//! contents, and uploads.

pub mod file_cache;
pub mod mapping;
pub mod names;
pub mod upload_store;
