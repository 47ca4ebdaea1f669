//! The rules for the names clients send, shared by the file cache, the upload store and the
//! configuration: a name is normalised to a path relative to the root (or refused) before
//! anything is opened, and the temporary names of uploads in progress are recognised so they
//! are never served.

/// Longest client name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Longest single path component accepted (NAME_MAX on Linux).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Turns the name a client sent into a path relative to the root, or refuses it.
///
/// Leading `/` means the root (PXE clients ask for `/pxelinux.0`); `.` and empty components
/// are dropped; `..` is refused outright rather than resolved, also inside a component
/// split on `\`, so that a later Windows-style name mapping cannot turn it into an escape.
/// The result is `/`-separated with no leading `/`, and is the cache key.
pub fn normalize_name(name: &[u8]) -> Result<String, &'static str> {
    if name.contains(&0) {
        return Err("NUL byte in name");
    }
    if name.len() > MAX_NAME_BYTES {
        return Err("name too long");
    }
    let name = std::str::from_utf8(name).map_err(|_| "name is not UTF-8")?;
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        if part.len() > MAX_COMPONENT_BYTES {
            return Err("path component too long");
        }
        if part.is_empty() || part == "." {
            continue;
        }
        if part.split('\\').any(|p| p == "..") {
            return Err("`..` in name");
        }
        parts.push(part);
    }
    Ok(parts.join("/"))
}

/// The process id in an upload temporary name (`.NAME.PID-N.upload`), if `base` (one path
/// component) is one.
pub fn temp_name_pid(base: &str) -> Option<u32> {
    let rest = base.strip_prefix('.')?.strip_suffix(".upload")?;
    let (name, ids) = rest.rsplit_once('.')?;
    let (pid, n) = ids.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if name.is_empty() || !digits(pid) || !digits(n) {
        return None;
    }
    pid.parse().ok()
}

/// Whether the last component of `rel` names an upload in progress: such a file is
/// half-written and must not be served.
pub fn is_temp_name(rel: &str) -> bool {
    temp_name_pid(rel.rsplit('/').next().unwrap_or(rel)).is_some()
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_name_rules() {
        assert_eq!(normalize_name(b"pxelinux.0").unwrap(), "pxelinux.0");
        assert_eq!(normalize_name(b"/pxelinux.0").unwrap(), "pxelinux.0");
        assert_eq!(normalize_name(b"//a/./b//c").unwrap(), "a/b/c");
        assert_eq!(normalize_name(b"/etc/passwd").unwrap(), "etc/passwd");
        // Backslashes stay ordinary characters unless they hide a `..`.
        assert_eq!(normalize_name(b"a\\b").unwrap(), "a\\b");
        assert_eq!(normalize_name(b"a..b/..c").unwrap(), "a..b/..c");
        for bad in [&b".."[..], b"a/../../x", b"a/..", b"..\\x", b"..\\..\\etc\\passwd", b"a\\..\\b", b"a\0b"] {
            assert!(matches!(normalize_name(bad), Err(_)), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(normalize_name(b"\xff\xfe"), Err(_)));
        assert!(matches!(normalize_name(&[b'a'; 1025]), Err(_)));
        assert!(normalize_name(&[b'a'; 255]).is_ok());
        assert!(matches!(normalize_name(&[b'a'; 256]), Err(_)));
    }
}
