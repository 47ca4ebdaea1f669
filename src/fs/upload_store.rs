//! upload_store: where an upload's bytes go on disk, and the promise that a failed upload
//! leaves nothing.
//!
//! - **Confinement.** A WRQ name is normalised like a read ([`crate::fs::file_cache`]'s rules:
//!   no `..`, no NUL, UTF-8, bounded length), must lie under the configured upload
//!   directory, and its parent directory is opened with `openat2(2)` relative to the root
//!   with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: no symlink is followed at all on the way
//!   to an upload (stricter than reads, since a write through a link would change a file
//!   the link points at). Kernels without `openat2` get a canonicalise-and-compare fallback.
//! - **Nothing half-written is ever visible under the real name.** Bytes go to a hidden
//!   temporary file (`.NAME.PID-N.upload`, created with `O_EXCL` in the target directory, so
//!   it is on the same filesystem), which is fsync'd and renamed into place only when the last
//!   block has arrived. Create-only mode renames with `RENAME_NOREPLACE`, so a file that
//!   appeared meanwhile (another upload racing this one) is never overwritten: that upload
//!   ends with ERROR 6. A temporary file dropped before its commit is unlinked. Reads never
//!   serve a temporary name ([`is_temp_name`]; the file cache answers ERROR 1), and at startup
//!   [`UploadRoot::remove_stale_temps`] removes those a dead process left in the upload
//!   directory.
//!
//! Everything here blocks; the upload actor calls it on tokio's blocking pool.

use std::ffi::CString;
#[cfg(test)]
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tftpcast_proto::upload::Refusal;
use tftpcast_proto::ErrorCode;

use crate::fs::names::{normalize_name, temp_name_pid};
#[cfg(test)]
use crate::fs::names::is_temp_name;

static TEMP_IDS: AtomicU64 = AtomicU64::new(1);

/// Entries of the upload directory looked at by the startup cleanup, at most.
pub const STALE_SCAN_LIMIT: usize = 100_000;

/// Whether process `pid` is gone, so its temporary files can go too. Our own pid counts as
/// gone at startup (a restarted container often gets the same pid, and this process has no
/// upload yet); a pid we may not signal (EPERM) is alive.
fn process_gone(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let Ok(p) = libc::pid_t::try_from(pid) else { return true };
    if p <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks whether the process exists.
    let r = unsafe { libc::kill(p, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Settings of uploads (section `[uploads]` of the configuration).
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Replace an existing file (otherwise an existing name gets ERROR 6).
    pub overwrite: bool,
    /// Normalised directory under the root that uploads are confined to ("" = the root).
    pub dir: String,
    /// Permission bits of stored files.
    pub file_mode: u32,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into() }
}

fn denied(why: &str) -> Refusal {
    refuse(ErrorCode::AccessViolation, format!("Access violation: {why}"))
}

/// Maps a filesystem error to what the client is told.
fn io_refusal(e: &std::io::Error) -> Refusal {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => refuse(ErrorCode::FileNotFound, "Directory not found"),
        Some(libc::EXDEV) => denied("path leaves the root"),
        Some(libc::ELOOP) => denied("symlinks are not followed for uploads"),
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => denied("permission denied"),
        Some(libc::ENAMETOOLONG) => denied("name too long"),
        Some(libc::EISDIR) => denied("a directory has this name"),
        Some(libc::EEXIST) => refuse(ErrorCode::FileExists, ErrorCode::FileExists.default_message()),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => refuse(ErrorCode::DiskFull, ErrorCode::DiskFull.default_message()),
        _ => refuse(ErrorCode::NotDefined, format!("Server error: {e}")),
    }
}

fn cstr(b: &[u8]) -> std::io::Result<CString> {
    CString::new(b).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL byte in name"))
}

/// The served root, for writing.
#[derive(Debug)]
pub struct UploadRoot {
    path: PathBuf,
    fd: OwnedFd,
    openat2: AtomicBool,
}

impl UploadRoot {
    pub fn open(root: &Path) -> std::io::Result<UploadRoot> {
        let path = root.canonicalize()?;
        let c = cstr(path.as_os_str().as_bytes())?;
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(UploadRoot { path, fd, openat2: AtomicBool::new(true) })
    }

    /// Opens directory `rel` ("" = the root) for creating files in it, refusing any symlink
    /// and anything outside the root.
    fn open_dir(&self, rel: &str) -> std::io::Result<OwnedFd> {
        let rel = if rel.is_empty() { "." } else { rel };
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
        if self.openat2.load(Ordering::Relaxed) {
            let c = cstr(rel.as_bytes())?;
            // `open_how` is non-exhaustive in libc: zero it and fill the fields we use.
            let mut how: libc::open_how = unsafe { std::mem::zeroed() };
            how.flags = flags as u64;
            how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
            for _ in 0..3 {
                // SAFETY: valid descriptor, NUL-terminated path and a zero-padded open_how of
                // the size passed.
                let fd = unsafe {
                    libc::syscall(libc::SYS_openat2, self.fd.as_raw_fd(), c.as_ptr(), &how as *const libc::open_how, std::mem::size_of::<libc::open_how>())
                };
                if fd >= 0 {
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
                }
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => continue,
                    Some(libc::ENOSYS) | Some(libc::EPERM) => {
                        tracing::warn!(error = %e, "openat2 unavailable; confining uploads by canonical path checks");
                        self.openat2.store(false, Ordering::Relaxed);
                        break;
                    }
                    _ => return Err(e),
                }
            }
            if self.openat2.load(Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
            }
        }
        // Fallback: no symlink anywhere on the way (checked per component), then the same
        // directory opened without following a final symlink.
        let mut p = self.path.clone();
        for comp in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
            p.push(comp);
            if std::fs::symlink_metadata(&p)?.file_type().is_symlink() {
                return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
            }
        }
        let c = cstr(p.as_os_str().as_bytes())?;
        let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_NOFOLLOW) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Startup cleanup: removes the upload temporary files of dead processes (a crash or a
    /// kill left them) from directory `dir` ("" = the root) itself, not its subdirectories,
    /// looking at no more than `limit` entries. Only regular files with a temporary name go.
    /// Returns the names removed. Blocking; call before uploads are accepted.
    pub fn remove_stale_temps(&self, dir: &str, limit: usize) -> std::io::Result<Vec<String>> {
        /// Closes the directory stream (and with it the descriptor) on every path out.
        struct Stream(*mut libc::DIR);
        impl Drop for Stream {
            fn drop(&mut self) {
                unsafe { libc::closedir(self.0) };
            }
        }
        use std::os::fd::IntoRawFd;
        let list = self.open_dir(dir)?.into_raw_fd();
        // SAFETY: `list` is an open directory descriptor that the stream now owns.
        let dirp = unsafe { libc::fdopendir(list) };
        if dirp.is_null() {
            let e = std::io::Error::last_os_error();
            unsafe { libc::close(list) };
            return Err(e);
        }
        let stream = Stream(dirp);
        let mut stale = Vec::new();
        for _ in 0..limit {
            // SAFETY: a valid stream; the entry stays valid until the next readdir.
            let ent = unsafe { libc::readdir(stream.0) };
            if ent.is_null() {
                break;
            }
            let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
            if let Some(pid) = name.to_str().ok().and_then(temp_name_pid) {
                if process_gone(pid) {
                    stale.push(name.to_owned());
                }
            }
        }
        drop(stream);
        let d = self.open_dir(dir)?;
        let mut removed = Vec::new();
        for c in stale {
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid descriptor, NUL-terminated name, writable stat buffer.
            let regular = unsafe { libc::fstatat(d.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG;
            if regular && unsafe { libc::unlinkat(d.as_raw_fd(), c.as_ptr(), 0) } == 0 {
                removed.push(c.to_string_lossy().into_owned());
            }
        }
        Ok(removed)
    }

    /// Checks a WRQ name and creates the temporary file its bytes go to. `Err` is the ERROR
    /// to answer the WRQ with.
    pub fn create(&self, cfg: &StoreConfig, name: &[u8]) -> Result<TempFile, Refusal> {
        let rel = normalize_name(name).map_err(denied)?;
        if rel.is_empty() {
            return Err(denied("no file name"));
        }
        if !cfg.dir.is_empty() && !rel.starts_with(&format!("{}/", cfg.dir)) {
            return Err(denied(&format!("uploads are confined to {}/", cfg.dir)));
        }
        let (parent, base) = match rel.rsplit_once('/') {
            Some((p, b)) => (p, b),
            None => ("", rel.as_str()),
        };
        let dir = self.open_dir(parent).map_err(|e| io_refusal(&e))?;
        let c_base = cstr(base.as_bytes()).map_err(|e| io_refusal(&e))?;
        // What is there now: create-only refuses an existing name at once (ERROR 6); an
        // overwrite may only replace a regular file.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, NUL-terminated name, `st` is a writable stat buffer.
        let r = unsafe { libc::fstatat(dir.as_raw_fd(), c_base.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        if r == 0 {
            if !cfg.overwrite {
                return Err(refuse(ErrorCode::FileExists, ErrorCode::FileExists.default_message()));
            }
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(denied("not a regular file"));
            }
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(io_refusal(&e));
            }
        }
        // Hidden, unique, and short enough for NAME_MAX whatever the base name's length.
        let short: String = base.chars().scan(0usize, |n, c| {
            *n += c.len_utf8();
            (*n <= 200).then_some(c)
        }).collect();
        for _ in 0..16 {
            let tmp = format!(".{short}.{}-{}.upload", std::process::id(), TEMP_IDS.fetch_add(1, Ordering::Relaxed));
            let c_tmp = cstr(tmp.as_bytes()).map_err(|e| io_refusal(&e))?;
            // O_EXCL: never an existing file, never through a symlink.
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            // SAFETY: valid descriptor and NUL-terminated name.
            let fd = unsafe { libc::openat(dir.as_raw_fd(), c_tmp.as_ptr(), flags, cfg.file_mode as libc::c_uint) };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EEXIST) {
                    continue;
                }
                return Err(io_refusal(&e));
            }
            let file = unsafe { File::from_raw_fd(fd) };
            let t = TempFile { dir, tmp: c_tmp, name: c_base, rel: rel.clone(), file: Some(file), bytes: 0 };
            // The umask must not decide what the operator configured.
            if let Err(e) = t.file.as_ref().expect("open").set_permissions(std::fs::Permissions::from_mode(cfg.file_mode)) {
                return Err(io_refusal(&e)); // `t` drops: the temporary file goes
            }
            return Ok(t);
        }
        Err(refuse(ErrorCode::NotDefined, "Server error: no unique temporary name"))
    }
}

/// An upload in progress: the hidden temporary file and the name it will get.
#[derive(Debug)]
pub struct TempFile {
    dir: OwnedFd,
    tmp: CString,
    name: CString,
    rel: String,
    /// `None` once committed or discarded.
    file: Option<File>,
    bytes: u64,
}

impl TempFile {
    /// Path relative to the root the upload will have.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// Name of the temporary file.
    #[cfg(test)]
    pub fn temp_name(&self) -> &OsStr {
        OsStr::from_bytes(self.tmp.as_bytes())
    }

    /// Appends `data`. Blocking.
    pub fn write(&mut self, data: &[u8]) -> Result<(), Refusal> {
        let f = self.file.as_mut().ok_or_else(|| refuse(ErrorCode::NotDefined, "Server error: upload already closed"))?;
        f.write_all(data).map_err(|e| io_refusal(&e))?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Makes the upload durable and visible under its name: fsync the file, rename it into
    /// place (without replacing anything unless `overwrite`), fsync the directory. On error
    /// the temporary file is removed. Blocking.
    pub fn commit(mut self, overwrite: bool) -> Result<u64, Refusal> {
        let f = self.file.as_ref().ok_or_else(|| refuse(ErrorCode::NotDefined, "Server error: upload already closed"))?;
        f.sync_all().map_err(|e| io_refusal(&e))?;
        let flags = if overwrite { 0 } else { libc::RENAME_NOREPLACE };
        // SAFETY: valid descriptors and NUL-terminated names.
        let r = unsafe { libc::renameat2(self.dir.as_raw_fd(), self.tmp.as_ptr(), self.dir.as_raw_fd(), self.name.as_ptr(), flags) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // Filesystems without RENAME_NOREPLACE: link(2) refuses an existing name too.
            if !overwrite && e.raw_os_error() == Some(libc::EINVAL) {
                let r = unsafe { libc::linkat(self.dir.as_raw_fd(), self.tmp.as_ptr(), self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
                if r != 0 {
                    return Err(io_refusal(&std::io::Error::last_os_error()));
                }
            } else {
                return Err(io_refusal(&e));
            }
            // Linked: the temporary name is removed by drop below.
        } else {
            self.file = None; // renamed: nothing left to remove
        }
        // The rename itself must survive a crash too.
        let _ = unsafe { libc::fsync(self.dir.as_raw_fd()) };
        Ok(self.bytes)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // SAFETY: valid descriptor and NUL-terminated name.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.tmp.as_ptr(), 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(overwrite: bool, dir: &str) -> StoreConfig {
        StoreConfig { overwrite, dir: dir.into(), file_mode: 0o640 }
    }

    fn entries(p: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn commit_creates_and_drop_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let root = UploadRoot::open(t.path()).unwrap();
        let mut f = root.create(&cfg(false, ""), b"/a.bin").unwrap();
        f.write(b"hello ").unwrap();
        f.write(b"world").unwrap();
        assert_eq!(entries(t.path()).len(), 1, "only the hidden temporary file");
        assert!(entries(t.path())[0].starts_with(".a.bin."));
        assert_eq!(f.commit(false).unwrap(), 11);
        assert_eq!(std::fs::read(t.path().join("a.bin")).unwrap(), b"hello world");
        assert_eq!(entries(t.path()), ["a.bin"]);
        let mode = std::fs::metadata(t.path().join("a.bin")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);

        let mut f = root.create(&cfg(false, ""), b"b.bin").unwrap();
        f.write(b"partial").unwrap();
        drop(f);
        assert_eq!(entries(t.path()), ["a.bin"]);
    }

    #[test]
    fn create_only_refuses_existing_names_and_races() {
        let t = tempfile::tempdir().unwrap();
        let root = UploadRoot::open(t.path()).unwrap();
        std::fs::write(t.path().join("x"), b"old").unwrap();
        assert_eq!(root.create(&cfg(false, ""), b"x").unwrap_err().code, ErrorCode::FileExists);
        // Two uploads of one new name: the second commit must not replace the first.
        let mut a = root.create(&cfg(false, ""), b"y").unwrap();
        let mut b = root.create(&cfg(false, ""), b"y").unwrap();
        a.write(b"first").unwrap();
        b.write(b"second").unwrap();
        a.commit(false).unwrap();
        assert_eq!(b.commit(false).unwrap_err().code, ErrorCode::FileExists);
        assert_eq!(std::fs::read(t.path().join("y")).unwrap(), b"first");
        assert_eq!(entries(t.path()), ["x", "y"]);
        // Overwrite mode replaces.
        let mut c = root.create(&cfg(true, ""), b"x").unwrap();
        c.write(b"new").unwrap();
        c.commit(true).unwrap();
        assert_eq!(std::fs::read(t.path().join("x")).unwrap(), b"new");
    }

    #[test]
    fn confinement_traversal_and_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("in")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("link")).unwrap();
        std::os::unix::fs::symlink(t.path().join("in"), t.path().join("inlink")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("f"), t.path().join("dangling")).unwrap();
        let root = UploadRoot::open(t.path()).unwrap();
        let code = |c: &StoreConfig, n: &[u8]| root.create(c, n).map(|_| ()).unwrap_err().code;
        for bad in [&b"../x"[..], b"a/../../x", b"link/x", b"inlink/x", b"", b"/", b"in\\..\\x"] {
            assert_eq!(code(&cfg(false, ""), bad), ErrorCode::AccessViolation, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(code(&cfg(true, ""), b"dangling"), ErrorCode::AccessViolation, "never write through a symlink");
        assert_eq!(code(&cfg(false, ""), b"nodir/x"), ErrorCode::FileNotFound);
        assert_eq!(code(&cfg(false, "in"), b"x"), ErrorCode::AccessViolation);
        assert_eq!(code(&cfg(false, "in"), b"inx/y"), ErrorCode::AccessViolation);
        let f = root.create(&cfg(false, "in"), b"in/ok").unwrap();
        f.commit(false).unwrap();
        assert!(t.path().join("in/ok").is_file());
        assert!(entries(outside.path()).is_empty());
        root.openat2.store(false, Ordering::Relaxed);
        assert_eq!(code(&cfg(false, ""), b"link/x"), ErrorCode::AccessViolation, "fallback refuses symlinks too");
        assert!(root.create(&cfg(false, ""), b"in/ok2").is_ok());
    }

    #[test]
    fn temporary_names_are_recognised() {
        let t = tempfile::tempdir().unwrap();
        let root = UploadRoot::open(t.path()).unwrap();
        let f = root.create(&cfg(false, ""), b"fw.v1.2.bin").unwrap();
        let tmp = f.temp_name().to_str().unwrap().to_owned();
        assert_eq!(temp_name_pid(&tmp), Some(std::process::id()), "{tmp}");
        assert!(is_temp_name(&format!("dir/sub/{tmp}")));
        for ok in [".a.1-2.upload", "x/.a.b.c.12-0.upload"] {
            assert!(is_temp_name(ok), "{ok}");
        }
        for not in ["a.1-2.upload", ".a.1-2.uploadx", "..1-2.upload", ".a.1-.upload", ".a.-2.upload", ".a.12.upload", ".a.1-2x.upload", ".a.upload", ".upload", "fw.bin", ".a.1-2.upload/x", ".a.1-2.UPLOAD"] {
            assert!(!is_temp_name(not), "{not}");
        }
    }

    #[test]
    fn stale_temporary_files_of_dead_processes_are_removed() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("up/sub")).unwrap();
        // A pid that cannot exist (above pid_max's ceiling) is dead; pid 1 is alive.
        let dead = ".a.bin.4194305-1.upload";
        let alive = ".b.bin.1-1.upload";
        let ours = format!(".c.bin.{}-7.upload", std::process::id());
        for n in [dead, alive, ours.as_str(), "keep.bin", ".hidden"] {
            std::fs::write(t.path().join("up").join(n), b"x").unwrap();
        }
        std::fs::write(t.path().join("up/sub").join(dead), b"x").unwrap(); // not recursive
        std::fs::write(t.path().join(dead), b"x").unwrap(); // outside the upload directory
        std::fs::create_dir(t.path().join("up/.d.bin.4194305-2.upload")).unwrap(); // not a file
        let root = UploadRoot::open(t.path()).unwrap();
        let mut removed = root.remove_stale_temps("up", STALE_SCAN_LIMIT).unwrap();
        removed.sort();
        assert_eq!(removed, vec![dead.to_string(), ours.clone()]);
        assert_eq!(entries(&t.path().join("up")), vec![".b.bin.1-1.upload", ".d.bin.4194305-2.upload", ".hidden", "keep.bin", "sub"]);
        assert!(t.path().join("up/sub").join(dead).exists() && t.path().join(dead).exists());
        // Bounded: a limit of 0 entries looks at nothing.
        std::fs::write(t.path().join("up").join(dead), b"x").unwrap();
        assert!(root.remove_stale_temps("up", 0).unwrap().is_empty());
        assert_eq!(root.remove_stale_temps("", STALE_SCAN_LIMIT).unwrap(), vec![dead.to_string()]);
    }

    #[test]
    fn long_names_get_a_short_temporary_name() {
        let t = tempfile::tempdir().unwrap();
        let root = UploadRoot::open(t.path()).unwrap();
        let name = "é".repeat(127); // 254 bytes, within NAME_MAX
        let f = root.create(&cfg(false, ""), name.as_bytes()).unwrap();
        assert!(f.temp_name().len() <= 255);
        f.commit(false).unwrap();
        assert!(t.path().join(&name).is_file());
    }
}
