//! file_cache: root confinement, open/stat, and shared immutable file contents.
//!
//! Every file a transfer sends comes from here, so this module owns two promises:
//!
//! - **Nothing outside the root is ever opened.** Client names are normalised in
//!   [`normalize_name`] (NUL, `..`, over-long names refused) and then opened with Linux
//!   `openat2(2)` relative to a descriptor of the root with `RESOLVE_BENEATH |
//!   RESOLVE_NO_MAGICLINKS`, so the kernel itself refuses every symlink or `..` that would
//!   leave the root, with no check-then-open race. Kernels (or seccomp filters) without
//!   `openat2` get a canonicalise-and-compare fallback.
//! - **One copy of each file version in memory.** Contents are read once into [`Bytes`] and
//!   shared by every transfer of that version; a lab booting hundreds of machines from one
//!   kernel image holds one allocation. Concurrent requests for a file not yet loaded wait
//!   on the same load. Every request re-stats the file, so a file replaced on disk is served
//!   fresh while running transfers keep the old contents. Cached contents are capped at
//!   `max_bytes`, least recently used first out.
//!
//! All filesystem work runs on tokio's blocking pool; the actor only keeps the table.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::fut::LocalBoxActorFuture;
use actix::prelude::*;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tftpcast_proto::ErrorCode;
use tokio::sync::oneshot;

use crate::fs::names::{is_temp_name, normalize_name};

/// How often a read is retried when the file changes while being read.
const READ_ATTEMPTS: usize = 3;
/// How often `openat2` is retried when it reports a rename race (`EAGAIN`).
const OPEN_ATTEMPTS: usize = 3;
/// Case-insensitive lookup reads at most this many entries of one directory, and gives up
/// on larger ones: a client asking for names that do not exist costs bounded work.
pub const MAX_CASE_SCAN: usize = 10_000;

/// Settings of the file cache (section `[files]` of the configuration).
#[derive(Debug, Clone)]
pub struct FileCacheConfig {
    /// Directory served; nothing outside it is ever opened.
    pub root: PathBuf,
    /// Memory cap for contents kept in the cache. Transfers hold their own reference, so
    /// contents evicted while still being sent stay alive until those transfers end.
    pub max_bytes: u64,
    /// Largest file served.
    pub max_file_bytes: u64,
    /// `mapping.case_insensitive`: a name not found as spelled is looked up ignoring case.
    pub case_insensitive: bool,
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

/// Counters of the cache, for state dumps, metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Files currently cached.
    pub entries: u64,
    /// Bytes of cached contents.
    pub bytes: u64,
    /// Requests answered from the cache.
    pub hits: u64,
    /// Requests that had to wait for a load (their own or one already running).
    pub misses: u64,
    /// Reads of a file's contents from disk.
    pub loads: u64,
    /// Entries dropped to stay under `max_bytes`.
    pub evictions: u64,
    /// Entries dropped because the file changed on disk.
    pub invalidations: u64,
}

/// Ask the cache for its counters.
#[derive(Message)]
#[rtype(result = "CacheStats")]
pub struct GetStats;

/// What a file looked like when opened: if any of this differs between two opens, the
/// contents may differ too. `ctime` catches rewrites that restore the old mtime; `dev`/`ino`
/// catch a file replaced by rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Version {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Version {
    fn of(meta: &std::fs::Metadata) -> Version {
        Version {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }
}

/// The served directory: a descriptor for `openat2` plus the canonical path for the fallback.
#[derive(Debug)]
struct Root {
    path: PathBuf,
    fd: OwnedFd,
    /// Cleared once the kernel says it has no `openat2`, so later opens skip straight to the
    /// fallback.
    openat2: AtomicBool,
}

impl Root {
    fn open(root: &Path) -> std::io::Result<Root> {
        let path = root.canonicalize()?;
        if !path.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("file root {} is not a directory", path.display()),
            ));
        }
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL byte in file root"))?;
        // O_PATH: the descriptor only anchors lookups, it needs no read permission.
        let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let root = Root { path, fd, openat2: AtomicBool::new(true) };
        // Probe once: old kernels say ENOSYS, and some container seccomp profiles answer
        // EPERM for syscalls they do not know, which would otherwise deny every request.
        match root.openat2(".", libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
                tracing::warn!(root = %root.path.display(), error = %e,
                    "openat2 unavailable; confining to the root by canonical path checks");
                root.openat2.store(false, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
        Ok(root)
    }

    /// `openat2(root, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
    fn openat2(&self, rel: &str, flags: libc::c_int) -> std::io::Result<OwnedFd> {
        let c_rel = CString::new(rel)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL byte in name"))?;
        // `open_how` is non-exhaustive in libc: zero it (the kernel requires unused bytes to be
        // zero anyway) and fill the fields we use.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = flags as u64;
        how.mode = 0;
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
        let mut attempt = 0;
        loop {
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.fd.as_raw_fd(),
                    c_rel.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            if fd >= 0 {
                return Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
            }
            let err = std::io::Error::last_os_error();
            // EAGAIN: a concurrent rename made the kernel unsure `..` stayed beneath the root.
            attempt += 1;
            if err.raw_os_error() == Some(libc::EAGAIN) && attempt < OPEN_ATTEMPTS {
                continue;
            }
            return Err(err);
        }
    }

    /// Opens `rel` (a name from [`normalize_name`]) for reading, confined to the root, and
    /// checks that it is a regular file no larger than `max_file_bytes`. Blocking.
    fn open_file(&self, rel: &str, max_file_bytes: u64) -> Result<(File, Version), FileError> {
        let rel = if rel.is_empty() { "." } else { rel };
        // O_NONBLOCK: opening a FIFO must not wait for a writer. O_NOCTTY: a terminal device
        // in the root must never become our controlling terminal.
        let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
        let file = if self.openat2.load(Ordering::Relaxed) {
            match self.openat2(rel, flags) {
                Ok(fd) => File::from(fd),
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    self.openat2.store(false, Ordering::Relaxed);
                    self.open_fallback(rel)?
                }
                Err(e) => return Err(open_error(&e)),
            }
        } else {
            self.open_fallback(rel)?
        };
        let meta = file.metadata().map_err(|e| FileError::Io(e.to_string()))?;
        if !meta.file_type().is_file() {
            return Err(FileError::NotRegular);
        }
        if meta.size() > max_file_bytes {
            return Err(FileError::TooLarge);
        }
        Ok((file, Version::of(&meta)))
    }

    /// Confinement without `openat2`: resolve every symlink, require the result to be inside
    /// the root, then open it without following a symlink in its last component. A rename
    /// of a parent directory between the check and the open can still escape; that race is
    /// the reason `openat2` is preferred.
    fn open_fallback(&self, rel: &str) -> Result<File, FileError> {
        let canonical = self.path.join(rel).canonicalize().map_err(|e| open_error(&e))?;
        if !canonical.starts_with(&self.path) {
            return Err(FileError::Denied("path leaves the root"));
        }
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(&canonical)
            .map_err(|e| open_error(&e))
    }
}

impl Root {
    /// `open_file`, and with `case_insensitive`, when the name does not exist as spelled,
    /// each of its components matched ignoring case. Returns the path actually opened (the
    /// cache key, so every spelling of a file shares one entry). Blocking.
    fn open_lookup(&self, rel: &str, max_file_bytes: u64, case_insensitive: bool) -> Result<(File, Version, String), FileError> {
        match self.open_file(rel, max_file_bytes) {
            Err(FileError::NotFound) if case_insensitive && !rel.is_empty() => match self.resolve_case(rel, MAX_CASE_SCAN)? {
                Some(real) if real != rel => {
                    let (file, version) = self.open_file(&real, max_file_bytes)?;
                    Ok((file, version, real))
                }
                _ => Err(FileError::NotFound),
            },
            r => r.map(|(file, version)| (file, version, rel.to_owned())),
        }
    }

    /// The spelling on disk of `rel`: component by component, the exact name if it exists,
    /// else the entry equal to it ignoring case (the smallest, if several). `None` when a
    /// component has no match or its directory has more than `limit` entries. Every
    /// directory is opened confined to the root like a file, so a symlink leaving the root
    /// is refused here too.
    fn resolve_case(&self, rel: &str, limit: usize) -> Result<Option<String>, FileError> {
        let mut resolved = String::new();
        for comp in rel.split('/') {
            let dir = self.open_dir(&resolved).map_err(|e| open_error(&e))?;
            let Some(found) = find_ignoring_case(dir, comp, limit)? else { return Ok(None) };
            if !resolved.is_empty() {
                resolved.push('/');
            }
            resolved.push_str(&found);
        }
        Ok(Some(resolved))
    }

    /// Opens a directory under the root for listing, confined like [`Root::open_file`].
    fn open_dir(&self, rel: &str) -> std::io::Result<OwnedFd> {
        let rel = if rel.is_empty() { "." } else { rel };
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NONBLOCK;
        if self.openat2.load(Ordering::Relaxed) {
            return self.openat2(rel, flags);
        }
        let canonical = self.path.join(rel).canonicalize()?;
        if !canonical.starts_with(&self.path) {
            return Err(std::io::Error::from_raw_os_error(libc::EXDEV));
        }
        let c = CString::new(canonical.as_os_str().as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_NOFOLLOW) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Reads the directory `dir` for `name` (see [`Root::resolve_case`]). Blocking.
fn find_ignoring_case(dir: OwnedFd, name: &str, limit: usize) -> Result<Option<String>, FileError> {
    /// Closes the directory stream (and with it the descriptor) on every path out.
    struct Stream(*mut libc::DIR);
    impl Drop for Stream {
        fn drop(&mut self) {
            unsafe { libc::closedir(self.0) };
        }
    }
    use std::os::fd::IntoRawFd;
    let fd = dir.into_raw_fd();
    let dirp = unsafe { libc::fdopendir(fd) };
    if dirp.is_null() {
        let e = std::io::Error::last_os_error();
        unsafe { libc::close(fd) };
        return Err(FileError::Io(e.to_string()));
    }
    let stream = Stream(dirp);
    let want = name.to_lowercase();
    let (mut exact, mut best): (bool, Option<String>) = (false, None);
    let mut seen = 0usize;
    loop {
        let ent = unsafe { libc::readdir(stream.0) };
        if ent.is_null() {
            break;
        }
        seen += 1;
        if seen > limit {
            tracing::debug!(name, limit, "directory too large for a case-insensitive lookup");
            return Ok(None);
        }
        // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated; it stays
        // valid until the next readdir on this stream.
        let entry = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        let Ok(entry) = entry.to_str() else { continue };
        if entry == name {
            exact = true;
        } else if !exact && equal_ignoring_case(entry, name, &want) && best.as_deref().is_none_or(|b| entry < b) {
            best = Some(entry.to_owned());
        }
    }
    Ok(if exact { Some(name.to_owned()) } else { best })
}

/// `entry` equals `name` ignoring case (`want` is `name` lowercased). ASCII names, nearly all
/// boot files, compare without allocating.
fn equal_ignoring_case(entry: &str, name: &str, want: &str) -> bool {
    if name.is_ascii() {
        entry.eq_ignore_ascii_case(name)
    } else {
        entry.to_lowercase() == want
    }
}

/// Maps an open error to what the client is told.
fn open_error(e: &std::io::Error) -> FileError {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => FileError::NotFound,
        // EXDEV is openat2's answer to a path that would leave the root.
        Some(libc::EXDEV) => FileError::Denied("path leaves the root"),
        Some(libc::ELOOP) => FileError::Denied("symlink refused"),
        Some(libc::EACCES) | Some(libc::EPERM) => FileError::Denied("permission denied"),
        Some(libc::ENAMETOOLONG) => FileError::Denied("name too long"),
        Some(libc::EAGAIN) => FileError::Denied("root changed during lookup"),
        // A socket, or a device without a driver: nothing we could send anyway.
        Some(libc::ENXIO) | Some(libc::ENODEV) => FileError::NotRegular,
        _ => FileError::Io(e.to_string()),
    }
}

/// Reads the whole file and hashes it. Blocking. The file is stat'ed before and after the
/// read so a file being rewritten is never cached as a torn mix of old and new bytes.
fn read_contents(file: &File, path: &str, max_file_bytes: u64) -> Result<(FileReady, Version), FileError> {
    let io = |e: std::io::Error| FileError::Io(e.to_string());
    for _ in 0..READ_ATTEMPTS {
        let before = Version::of(&file.metadata().map_err(io)?);
        if before.size > max_file_bytes {
            return Err(FileError::TooLarge);
        }
        let mut buf = Vec::new();
        // One byte more than the size, so a file that grew is noticed without reading it all.
        let limit = before.size + 1;
        buf.try_reserve_exact(limit as usize)
            .map_err(|_| FileError::Io(format!("cannot allocate {} bytes", before.size)))?;
        let mut reader = file;
        reader.seek(SeekFrom::Start(0)).map_err(io)?;
        reader.take(limit).read_to_end(&mut buf).map_err(io)?;
        let after = Version::of(&file.metadata().map_err(io)?);
        if before != after || buf.len() as u64 != before.size {
            continue;
        }
        let sha256: [u8; 32] = Sha256::digest(&buf).into();
        let key = FileKey { path: path.to_owned(), size: before.size, mtime_ns: before.mtime_ns, sha256 };
        return Ok((FileReady { key, data: Bytes::from(buf) }, before));
    }
    Err(FileError::Io("file kept changing while being read".into()))
}

/// Runs blocking filesystem work off the actor thread.
async fn blocking<T, F>(f: F) -> Result<T, FileError>
where
    F: FnOnce() -> Result<T, FileError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FileError::Io(format!("file task failed: {e}")))?
}

struct Entry {
    version: Version,
    ready: FileReady,
    /// Position in `FileCache::lru`.
    last_used: u64,
}

type Reply = Result<FileReady, FileError>;

pub struct FileCache {
    cfg: FileCacheConfig,
    root: Arc<Root>,
    /// Cached contents by normalised path.
    entries: HashMap<String, Entry>,
    /// Use tick -> path, oldest first: the eviction order.
    lru: BTreeMap<u64, String>,
    tick: u64,
    /// Sum of the cached contents' lengths.
    bytes: u64,
    /// Loads running, with the requests waiting for each. Keyed by version as well as path so
    /// that a request that opened a newer version never receives older contents.
    inflight: HashMap<(String, Version), Vec<oneshot::Sender<Reply>>>,
    stats: CacheStats,
    /// Lets a test hold a load until its requests have all joined it.
    #[cfg(test)]
    load_gate: Option<Arc<std::sync::Mutex<std::sync::mpsc::Receiver<()>>>>,
}

impl FileCache {
    pub fn new(cfg: FileCacheConfig) -> std::io::Result<FileCache> {
        let root = Arc::new(Root::open(&cfg.root)?);
        Ok(FileCache {
            cfg,
            root,
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            inflight: HashMap::new(),
            stats: CacheStats::default(),
            #[cfg(test)]
            load_gate: None,
        })
    }

    fn stats(&self) -> CacheStats {
        CacheStats { entries: self.entries.len() as u64, bytes: self.bytes, ..self.stats }
    }

    /// Answers a request whose file is open: from the cache if the cached version is the one
    /// on disk, else by joining or starting a load.
    fn serve(
        &mut self,
        path: String,
        file: File,
        version: Version,
        ctx: &mut Context<Self>,
    ) -> LocalBoxActorFuture<Self, Reply> {
        if let Some(entry) = self.entries.get(&path) {
            if entry.version == version {
                self.stats.hits += 1;
                let ready = entry.ready.clone();
                self.touch(&path);
                return Box::pin(fut::ready(Ok(ready)));
            }
            self.stats.invalidations += 1;
            tracing::debug!(path = %path, "file changed on disk, dropping cached contents");
            self.remove(&path);
        }
        self.stats.misses += 1;
        let (tx, rx) = oneshot::channel();
        let key = (path, version);
        if let Some(waiters) = self.inflight.get_mut(&key) {
            waiters.push(tx);
        } else {
            self.inflight.insert(key.clone(), vec![tx]);
            self.start_load(key, file, ctx);
        }
        Box::pin(fut::wrap_future(async move {
            rx.await.unwrap_or_else(|_| Err(FileError::Io("file load abandoned".into())))
        }))
    }

    /// Reads the file on the blocking pool. Spawned on the actor's context rather than tied
    /// to the first request, so the waiters still get an answer if that request goes away.
    fn start_load(&mut self, key: (String, Version), file: File, ctx: &mut Context<Self>) {
        self.stats.loads += 1;
        let max_file_bytes = self.cfg.max_file_bytes;
        let path = key.0.clone();
        #[cfg(test)]
        let gate = self.load_gate.clone();
        let load = blocking(move || {
            #[cfg(test)]
            if let Some(gate) = gate {
                let _ = gate.lock().unwrap().recv();
            }
            read_contents(&file, &path, max_file_bytes)
        });
        ctx.spawn(load.into_actor(self).map(move |res, act, _| act.finish_load(key, res)));
    }

    fn finish_load(&mut self, key: (String, Version), res: Result<(FileReady, Version), FileError>) {
        let waiters = self.inflight.remove(&key).unwrap_or_default();
        let reply = match res {
            Ok((ready, version)) => {
                tracing::debug!(path = %key.0, size = ready.data.len(), "loaded file");
                self.insert(key.0, version, ready.clone());
                Ok(ready)
            }
            Err(e) => {
                tracing::debug!(path = %key.0, error = %e, "file load failed");
                Err(e)
            }
        };
        for tx in waiters {
            let _ = tx.send(reply.clone());
        }
    }

    fn insert(&mut self, path: String, version: Version, ready: FileReady) {
        // A load of another version may have finished first; the newest load wins, and the
        // next request's stat corrects it if that was the older version.
        self.remove(&path);
        let size = ready.data.len() as u64;
        if size > self.cfg.max_bytes {
            tracing::debug!(path = %path, size, "file larger than the cache, served uncached");
            return;
        }
        while self.bytes + size > self.cfg.max_bytes {
            let Some((_, victim)) = self.lru.pop_first() else { break };
            if let Some(entry) = self.entries.remove(&victim) {
                self.bytes -= entry.ready.data.len() as u64;
                self.stats.evictions += 1;
                tracing::debug!(path = %victim, size = entry.ready.data.len(), "evicted file");
            }
        }
        self.tick += 1;
        self.lru.insert(self.tick, path.clone());
        self.bytes += size;
        self.entries.insert(path, Entry { version, ready, last_used: self.tick });
    }

    fn touch(&mut self, path: &str) {
        if let Some(entry) = self.entries.get_mut(path) {
            self.lru.remove(&entry.last_used);
            self.tick += 1;
            entry.last_used = self.tick;
            self.lru.insert(self.tick, path.to_owned());
        }
    }

    fn remove(&mut self, path: &str) {
        if let Some(entry) = self.entries.remove(path) {
            self.lru.remove(&entry.last_used);
            self.bytes -= entry.ready.data.len() as u64;
        }
    }
}

impl Actor for FileCache {
    type Context = Context<Self>;
}

impl Handler<FileRequest> for FileCache {
    type Result = ResponseActFuture<Self, Reply>;

    fn handle(&mut self, msg: FileRequest, _ctx: &mut Self::Context) -> Self::Result {
        let path = match normalize_name(&msg.name).map_err(FileError::Denied) {
            Ok(path) => path,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        // An upload in progress is half-written: its temporary file is not there for reads
        // (checked again on the spelling a case-insensitive lookup found).
        if is_temp_name(&path) {
            return Box::pin(fut::ready(Err(FileError::NotFound)));
        }
        // Open and stat on every request, even for cached files: that is how a file changed
        // on disk is noticed.
        let root = self.root.clone();
        let max_file_bytes = self.cfg.max_file_bytes;
        let case_insensitive = self.cfg.case_insensitive;
        let open = blocking(move || root.open_lookup(&path, max_file_bytes, case_insensitive));
        Box::pin(open.into_actor(self).then(move |opened, act, ctx| match opened {
            Ok((_, _, path)) if is_temp_name(&path) => Box::pin(fut::ready(Err(FileError::NotFound))),
            Ok((file, version, path)) => act.serve(path, file, version, ctx),
            Err(e) => Box::pin(fut::ready(Err(e))),
        }))
    }
}

impl Handler<GetStats> for FileCache {
    type Result = MessageResult<GetStats>;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.stats())
    }
}

impl Handler<crate::state::DumpState> for FileCache {
    type Result = ();

    fn handle(&mut self, _msg: crate::state::DumpState, _ctx: &mut Self::Context) {
        let s = self.stats();
        tracing::info!(
            target: "state",
            actor = "file_cache",
            entries = s.entries,
            bytes = s.bytes,
            hits = s.hits,
            misses = s.misses,
            evictions = s.evictions,
            invalidations = s.invalidations,
            "state"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::time::{Duration, SystemTime};

    /// A temporary directory holding `root/` (served) and `outside/secret` (must never be).
    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        Fixture { _dir: dir, root, outside }
    }

    impl Fixture {
        /// Writes each `(name, contents)` below the root, creating its directories.
        fn put(&self, files: &[(&str, &[u8])]) {
            for (name, contents) in files {
                let p = self.root.join(name);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, contents).unwrap();
            }
        }
    }

    fn config(root: &Path) -> FileCacheConfig {
        FileCacheConfig { root: root.to_owned(), max_bytes: 1 << 20, max_file_bytes: 1 << 20, case_insensitive: false }
    }

    fn start(cfg: FileCacheConfig) -> Addr<FileCache> {
        FileCache::new(cfg).unwrap().start()
    }

    async fn get(addr: &Addr<FileCache>, name: &[u8]) -> Reply {
        // A hang is a failure, not a stuck test run.
        tokio::time::timeout(Duration::from_secs(10), addr.send(FileRequest { name: name.to_vec() }))
            .await
            .expect("file request timed out")
            .expect("file cache mailbox closed")
    }

    async fn stats(addr: &Addr<FileCache>) -> CacheStats {
        addr.send(GetStats).await.unwrap()
    }

    #[test]
    fn new_rejects_missing_or_non_directory_root() {
        let f = fixture();
        assert!(FileCache::new(config(&f.root.join("missing"))).is_err());
        assert!(FileCache::new(config(&f.outside.join("secret"))).is_err());
        assert!(FileCache::new(config(&f.root)).is_ok());
    }

    #[actix_rt::test]
    async fn serves_file_with_key() {
        let f = fixture();
        std::fs::write(f.root.join("hello.txt"), b"hello world").unwrap();
        let addr = start(config(&f.root));
        let ready = get(&addr, b"hello.txt").await.unwrap();
        assert_eq!(&ready.data[..], b"hello world");
        assert_eq!(ready.key.path, "hello.txt");
        assert_eq!(ready.key.size, 11);
        let expected: [u8; 32] = Sha256::digest(b"hello world").into();
        assert_eq!(ready.key.sha256, expected);
        let mtime = std::fs::metadata(f.root.join("hello.txt")).unwrap().modified().unwrap();
        let mtime_ns = mtime.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as i128;
        assert_eq!(ready.key.mtime_ns, mtime_ns);
        assert_eq!(get(&addr, b"missing").await.unwrap_err(), FileError::NotFound);
        assert_eq!(get(&addr, b"hello.txt/x").await.unwrap_err(), FileError::NotFound);
    }

    #[actix_rt::test]
    async fn leading_slash_is_root_relative_and_shares_entry() {
        let f = fixture();
        f.put(&[("boot/pxelinux.0", b"pxe")]);
        let addr = start(config(&f.root));
        let a = get(&addr, b"/boot/pxelinux.0").await.unwrap();
        let b = get(&addr, b"boot//./pxelinux.0").await.unwrap();
        assert_eq!(&a.data[..], b"pxe");
        assert_eq!(a.key, b.key);
        assert_eq!(a.key.path, "boot/pxelinux.0");
        let s = stats(&addr).await;
        assert_eq!((s.loads, s.hits, s.entries), (1, 1, 1));
        // Absolute names never reach the real filesystem root.
        assert_eq!(get(&addr, b"/etc/passwd").await.unwrap_err(), FileError::NotFound);
    }

    #[actix_rt::test]
    async fn traversal_and_bad_names_denied() {
        let f = fixture();
        std::fs::write(f.root.join("x"), b"x").unwrap();
        let addr = start(config(&f.root));
        let long = vec![b'a'; 1025];
        let long_component = vec![b'b'; 256];
        let names: [&[u8]; 8] = [
            b"..",
            b"../outside/secret",
            b"a/../../x",
            b"..\\x",
            b"..\\..\\etc\\passwd",
            b"x\0",
            &long,
            &long_component,
        ];
        for name in names {
            assert!(
                matches!(get(&addr, name).await, Err(FileError::Denied(_))),
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
        assert_eq!(get(&addr, b"/").await.unwrap_err(), FileError::NotRegular);
    }

    #[actix_rt::test]
    async fn symlinks_inside_served_outside_denied() {
        let f = fixture();
        std::fs::create_dir(f.root.join("sub")).unwrap();
        std::fs::write(f.root.join("real.txt"), b"inside").unwrap();
        symlink("../real.txt", f.root.join("sub/link")).unwrap();
        symlink("sub", f.root.join("dirlink")).unwrap();
        symlink(f.outside.join("secret"), f.root.join("abs_out")).unwrap();
        symlink("../outside/secret", f.root.join("rel_out")).unwrap();
        symlink("../outside", f.root.join("dir_out")).unwrap();
        let addr = start(config(&f.root));
        assert_eq!(&get(&addr, b"sub/link").await.unwrap().data[..], b"inside");
        assert_eq!(&get(&addr, b"dirlink/link").await.unwrap().data[..], b"inside");
        for name in [&b"abs_out"[..], b"rel_out", b"dir_out/secret"] {
            assert!(
                matches!(get(&addr, name).await, Err(FileError::Denied(_))),
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[actix_rt::test]
    async fn upload_temporary_files_are_never_served() {
        let f = fixture();
        f.put(&[("up/.fw.bin.4242-1.upload", b"half"), ("up/.fw.bin.upload", b"not a temp name")]);
        for cfg in [config(&f.root), FileCacheConfig { case_insensitive: true, ..config(&f.root) }] {
            let addr = start(cfg);
            for name in [&b"up/.fw.bin.4242-1.upload"[..], b"/up//./.fw.bin.4242-1.upload", b"UP/.FW.BIN.4242-1.UPLOAD"] {
                assert_eq!(get(&addr, name).await.unwrap_err(), FileError::NotFound, "{:?}", String::from_utf8_lossy(name));
            }
            assert_eq!(&get(&addr, b"up/.fw.bin.upload").await.unwrap().data[..], b"not a temp name");
            assert_eq!(stats(&addr).await.loads, 1, "a temporary file was read");
        }
    }

    #[actix_rt::test]
    async fn case_insensitive_lookup_only_when_enabled_and_confined() {
        let f = fixture();
        f.put(&[("Boot/EFI/BCD", b"bcd"), ("Boot/EFI/bcd", b"lower"), ("Boot/PXELinux.0", b"pxe")]);
        symlink("../outside", f.root.join("Out")).unwrap();
        let off = start(config(&f.root));
        assert_eq!(get(&off, b"boot/pxelinux.0").await.unwrap_err(), FileError::NotFound);
        let on = start(FileCacheConfig { case_insensitive: true, ..config(&f.root) });
        let a = get(&on, b"boot/pxelinux.0").await.unwrap();
        assert_eq!(&a.data[..], b"pxe");
        // The cache key is the spelling on disk, so every spelling shares one entry.
        assert_eq!(a.key.path, "Boot/PXELinux.0");
        assert_eq!(get(&on, b"BOOT/PXELINUX.0").await.unwrap().key, a.key);
        assert_eq!(stats(&on).await.loads, 1);
        // An exact component wins; otherwise the smallest of several equal ignoring case.
        assert_eq!(&get(&on, b"boot/efi/bcd").await.unwrap().data[..], b"lower");
        assert_eq!(&get(&on, b"boot/efi/Bcd").await.unwrap().data[..], b"bcd");
        assert_eq!(get(&on, b"boot/nothing").await.unwrap_err(), FileError::NotFound);
        // A symlink leaving the root stays refused whatever the spelling.
        assert!(matches!(get(&on, b"out/secret").await, Err(FileError::Denied(_))));
        assert!(matches!(get(&on, b"OUT/SECRET").await, Err(FileError::Denied(_))));
    }

    #[test]
    fn case_insensitive_scan_is_bounded() {
        let f = fixture();
        for i in 0..20 {
            std::fs::write(f.root.join(format!("f{i:02}")), b"x").unwrap();
        }
        let root = Root::open(&f.root).unwrap();
        // 20 files plus `.` and `..`.
        assert_eq!(root.resolve_case("F07", 22).unwrap().as_deref(), Some("f07"));
        assert_eq!(root.resolve_case("F07", 21).unwrap(), None);
        root.openat2.store(false, Ordering::Relaxed);
        assert_eq!(root.resolve_case("F07", 22).unwrap().as_deref(), Some("f07"));
    }

    #[test]
    fn fallback_confines_to_root() {
        let f = fixture();
        std::fs::write(f.root.join("real.txt"), b"inside").unwrap();
        symlink("real.txt", f.root.join("link")).unwrap();
        symlink(f.outside.join("secret"), f.root.join("abs_out")).unwrap();
        symlink("../outside/secret", f.root.join("rel_out")).unwrap();
        let root = Root::open(&f.root).unwrap();
        root.openat2.store(false, Ordering::Relaxed);
        let (mut file, _) = root.open_file("link", 1 << 20).unwrap();
        let mut s = String::new();
        file.read_to_string(&mut s).unwrap();
        assert_eq!(s, "inside");
        assert_eq!(root.open_file("abs_out", 1 << 20).unwrap_err(), FileError::Denied("path leaves the root"));
        assert_eq!(root.open_file("rel_out", 1 << 20).unwrap_err(), FileError::Denied("path leaves the root"));
        assert_eq!(root.open_file("missing", 1 << 20).unwrap_err(), FileError::NotFound);
    }

    #[actix_rt::test]
    async fn directory_and_fifo_not_regular() {
        let f = fixture();
        std::fs::create_dir(f.root.join("dir")).unwrap();
        let fifo = CString::new(f.root.join("fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let addr = start(config(&f.root));
        assert_eq!(get(&addr, b"dir").await.unwrap_err(), FileError::NotRegular);
        // `get` times out rather than hangs if opening the FIFO waited for a writer.
        assert_eq!(get(&addr, b"fifo").await.unwrap_err(), FileError::NotRegular);
    }

    #[actix_rt::test]
    async fn file_over_max_file_bytes_too_large() {
        let f = fixture();
        std::fs::write(f.root.join("big"), b"123456").unwrap();
        std::fs::write(f.root.join("ok"), b"12345").unwrap();
        let addr = start(FileCacheConfig { max_file_bytes: 5, ..config(&f.root) });
        assert_eq!(get(&addr, b"big").await.unwrap_err(), FileError::TooLarge);
        assert_eq!(&get(&addr, b"ok").await.unwrap().data[..], b"12345");
    }

    #[actix_rt::test]
    async fn changed_file_reloaded_old_bytes_kept() {
        let f = fixture();
        let path = f.root.join("kernel");
        std::fs::write(&path, b"version one").unwrap();
        let addr = start(config(&f.root));
        let old = get(&addr, b"kernel").await.unwrap();
        assert_eq!(&old.data[..], b"version one");

        // Same length, and an explicit new mtime so coarse timestamps cannot hide the change.
        std::fs::write(&path, b"version two").unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)).unwrap();
        drop(file);

        let new = get(&addr, b"kernel").await.unwrap();
        assert_eq!(&new.data[..], b"version two");
        assert_ne!(old.key, new.key);
        assert_eq!(new.key.mtime_ns, 1_000_000 * 1_000_000_000);
        // A transfer already running keeps the contents it started with.
        assert_eq!(&old.data[..], b"version one");
        let s = stats(&addr).await;
        assert_eq!((s.loads, s.invalidations, s.entries, s.bytes), (2, 1, 1, 11));

        // Replacing the file by rename (new inode) is noticed too.
        let tmp = f.root.join("kernel.tmp");
        std::fs::write(&tmp, b"version 3!!").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(&get(&addr, b"kernel").await.unwrap().data[..], b"version 3!!");
        assert_eq!(stats(&addr).await.invalidations, 2);
    }

    #[actix_rt::test]
    async fn concurrent_requests_share_one_load() {
        let f = fixture();
        std::fs::write(f.root.join("image"), vec![7u8; 64 * 1024]).unwrap();
        let mut cache = FileCache::new(config(&f.root)).unwrap();
        let (release, gate) = std::sync::mpsc::channel();
        cache.load_gate = Some(Arc::new(std::sync::Mutex::new(gate)));
        let addr = cache.start();

        let a = addr.send(FileRequest { name: b"image".to_vec() });
        let b = addr.send(FileRequest { name: b"/image".to_vec() });
        // Hold the load until both requests are waiting on it, so neither can be a hit.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stats(&addr).await.misses < 2 {
            assert!(tokio::time::Instant::now() < deadline, "requests never reached the cache");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        release.send(()).unwrap();
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert_eq!(a.data.len(), 64 * 1024);
        // One allocation shared by both transfers.
        assert_eq!(a.data.as_ptr(), b.data.as_ptr());
        let s = stats(&addr).await;
        assert_eq!((s.loads, s.misses, s.hits, s.entries), (1, 2, 0, 1));

        // And a later request is served from the cache, still the same allocation.
        let c = get(&addr, b"image").await.unwrap();
        assert_eq!(c.data.as_ptr(), a.data.as_ptr());
        assert_eq!(stats(&addr).await.loads, 1);
    }

    #[actix_rt::test]
    async fn cap_evicts_least_recently_used() {
        let f = fixture();
        for name in ["a", "b", "c"] {
            std::fs::write(f.root.join(name), name.repeat(4)).unwrap();
        }
        std::fs::write(f.root.join("huge"), [0u8; 20]).unwrap();
        let addr = start(FileCacheConfig { max_bytes: 10, ..config(&f.root) });
        get(&addr, b"a").await.unwrap();
        get(&addr, b"b").await.unwrap();
        get(&addr, b"a").await.unwrap(); // a is now more recent than b
        get(&addr, b"c").await.unwrap(); // 12 bytes > 10: b goes
        let s = stats(&addr).await;
        assert_eq!((s.entries, s.bytes, s.evictions, s.loads, s.hits), (2, 8, 1, 3, 1));
        get(&addr, b"a").await.unwrap();
        assert_eq!(stats(&addr).await.loads, 3, "a should still be cached");
        get(&addr, b"b").await.unwrap();
        assert_eq!(stats(&addr).await.loads, 4, "b should have been evicted");

        // Larger than the whole cache: served, but not kept, and nothing evicted for it.
        let before = stats(&addr).await;
        assert_eq!(get(&addr, b"huge").await.unwrap().data.len(), 20);
        get(&addr, b"huge").await.unwrap();
        let after = stats(&addr).await;
        assert_eq!(after.loads, before.loads + 2);
        assert_eq!((after.entries, after.bytes, after.evictions), (before.entries, before.bytes, before.evictions));
        assert!(after.bytes <= 10);
    }

    /// Collects formatted log lines so a test can read what was logged.
    #[derive(Clone, Default)]
    struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for LogBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[actix_rt::test]
    async fn dump_state_logs_one_state_event() {
        let f = fixture();
        std::fs::write(f.root.join("a"), b"abc").unwrap();
        let logs = LogBuf::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        // The test runtime is single-threaded, so the actor logs on this thread.
        let _guard = tracing::subscriber::set_default(subscriber);
        let addr = start(config(&f.root));
        get(&addr, b"a").await.unwrap();
        get(&addr, b"a").await.unwrap();
        addr.send(crate::state::DumpState).await.unwrap();
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("\"target\":\"state\"")).collect();
        assert_eq!(lines.len(), 1, "{text}");
        for field in [
            "\"actor\":\"file_cache\"",
            "\"entries\":1",
            "\"bytes\":3",
            "\"hits\":1",
            "\"misses\":1",
            "\"evictions\":0",
            "\"invalidations\":0",
        ] {
            assert!(lines[0].contains(field), "{field} missing in {}", lines[0]);
        }
    }
}
