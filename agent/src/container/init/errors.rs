//! Error wording: the kernel's reason in the lower-case form runc (Go)
//! prints, e.g. `no such device` rather than `ENODEV: No such device`.

use nix::errno::Errno;

pub fn errno_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => errno_desc(Errno::from_raw(code)),
        None => e.to_string(),
    }
}

pub fn errno_desc(e: Errno) -> String {
    let desc = e.desc();
    let mut chars = desc.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("errno {}", e as i32),
    }
}

/// `anyhow` error `"<what>: <errno text>"`.
pub fn os_err(what: impl std::fmt::Display, e: Errno) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", errno_desc(e))
}

pub fn io_err(what: impl std::fmt::Display, e: &std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", errno_text(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_like_runc() {
        assert_eq!(errno_desc(Errno::ENODEV), "no such device");
        assert_eq!(errno_desc(Errno::EINVAL), "invalid argument");
        let e = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(errno_text(&e), "no such file or directory");
    }
}
