//! identity: the user and group a node switches to after binding (`server.user`,
//! `server.group`), looked up when the configuration is validated so that a typo is an error
//! naming the setting before anything is bound.

use std::ffi::CString;

/// The identity to switch to after binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: Option<(String, libc::uid_t, libc::gid_t)>,
    pub group: Option<(String, libc::gid_t)>,
}

/// A user by name or number: (name as given, uid, primary gid).
pub fn lookup_user(name: &str) -> Option<(String, libc::uid_t, libc::gid_t)> {
    let c = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwnam_r/getpwuid_r fill `pw` and `buf` (of the length given) and set `out`.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let r = match name.parse::<libc::uid_t>() {
            Ok(uid) => libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out),
            Err(_) => libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out),
        };
        (r == 0 && !out.is_null()).then(|| (name.to_string(), pw.pw_uid, pw.pw_gid))
    }
}

/// A group by name or number: (name as given, gid).
pub fn lookup_group(name: &str) -> Option<(String, libc::gid_t)> {
    let c = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: as in lookup_user.
    unsafe {
        let mut gr: libc::group = std::mem::zeroed();
        let mut out: *mut libc::group = std::ptr::null_mut();
        let r = match name.parse::<libc::gid_t>() {
            Ok(gid) => libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut out),
            Err(_) => libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out),
        };
        (r == 0 && !out.is_null()).then(|| (name.to_string(), gr.gr_gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_and_number() {
        assert_eq!(lookup_user("root"), Some(("root".into(), 0, 0)));
        assert_eq!(lookup_user("0"), Some(("0".into(), 0, 0)));
        assert_eq!(lookup_group("0"), Some(("0".into(), 0)));
        assert_eq!(lookup_group("root"), Some(("root".into(), 0)));
        assert_eq!(lookup_user("no-such-user-here"), None);
        assert_eq!(lookup_group("no-such-group-here"), None);
        assert_eq!(lookup_user("bad\0name"), None);
    }
}
