//! The template store: booted-and-saved VMs that every later VM is cloned
//! from (see "The clone, concretely" in the design notes).
//!
//! A template is identified by a [`TemplateKey`], a SHA-256 over everything
//! that decides what the saved VM looks like: the kernel's and the
//! initramfs's bytes, the kernel command line, the vCPU count, the memory
//! size, the jevm version and [`TEMPLATE_FORMAT_VERSION`]. Change any of them
//! and the key changes, so a stale template is never found under a new key;
//! a template whose manifest disagrees with the running jevm is
//! [`TemplateError::Foreign`] and is rebuilt, never trusted.
//!
//! On-disk layout under the store's root (default [`DEFAULT_ROOT`]):
//!
//! ```text
//! <root>/<key>/manifest.json   versions, key, spec, sizes and SHA-256s (0444)
//! <root>/<key>/state.json      the saved VM state, opaque here (0444, immutable)
//! <root>/<key>/memory          the guest RAM image, maybe sparse (0444, immutable)
//! <root>/<key>.lock            flock(2) target serialising builders and removers
//! <root>/.staging-<key>.*      a build in progress (renamed to <key> when done)
//! <root>/.trash-<key>.*        a template being removed
//! ```
//!
//! "Immutable" is the inode flag `FS_IMMUTABLE_FL` (`chattr +i`), set where
//! the file system and our privileges allow it; the mode is 0444 either way.
//!
//! The store itself is in [`store`]; the hashing helpers in `hash`, the lock
//! in `lock`.

mod fsutil;
#[cfg(test)]
mod fuzz;
mod hash;
mod lock;
pub mod store;
#[cfg(test)]
mod store_tests;

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use store::{Template, TemplateInfo, TemplateStatus, TemplateStore};

/// The layout version of a template directory and its manifest. Bump it
/// whenever the meaning of `manifest.json`, `state.json` or `memory` changes:
/// templates written with another value are refused and rebuilt.
/// 2: every VM carries a virtio-fs device, so `state.json` has one more.
/// 3: and a virtio-net device.
/// 4: and a virtio-balloon device (free page reporting).
/// 5: the guest has the share mounted; virtio-fs saves its FUSE session.
pub const TEMPLATE_FORMAT_VERSION: u32 = 5;

/// The jevm version written into (and required of) every manifest.
pub const JEVM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where templates live unless the caller says otherwise.
pub const DEFAULT_ROOT: &str = "/var/lib/jevm/templates";

/// File names inside a template directory.
pub const MANIFEST_FILE: &str = "manifest.json";
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory";

/// Everything a template is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateSpec {
    /// The guest kernel (ELF vmlinux). Its bytes, not its path, go into the key.
    pub kernel: PathBuf,
    /// The initramfs. Its bytes, not its path, go into the key.
    pub initrd: PathBuf,
    /// The full kernel command line the template is booted with.
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u32,
}

impl fmt::Display for TemplateSpec {
    /// A one-line summary: `kernel K, initramfs I, N vCPUs, M MiB, cmdline "…"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kernel {}, initramfs {}, {} vCPU{}, {} MiB, cmdline {:?}",
            self.kernel.display(),
            self.initrd.display(),
            self.vcpus,
            if self.vcpus == 1 { "" } else { "s" },
            self.mem_mib,
            self.cmdline
        )
    }
}

/// A template's identity: the first 32 hex digits (128 bits) of the SHA-256
/// over the spec's inputs (see the module docs). Also the name of the
/// template's directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TemplateKey(String);

/// Number of hex digits in a key's string form.
pub const KEY_HEX_LEN: usize = 32;

impl TemplateKey {
    /// Hashes the kernel and the initramfs (streamed; the digests are cached
    /// in memory per path while the file's inode, size, mtime and ctime stay
    /// the same) and derives the key. Errors name the file that could not be
    /// read.
    pub fn compute(spec: &TemplateSpec) -> io::Result<TemplateKey> {
        Ok(KeyMaterial::compute(spec)?.key)
    }

    /// Accepts a key's string form: exactly [`KEY_HEX_LEN`] lowercase hex
    /// digits. Anything else (including anything that could name another
    /// path) is refused.
    pub fn parse(s: &str) -> Result<TemplateKey, TemplateError> {
        if s.len() == KEY_HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(TemplateKey(s.to_owned()))
        } else {
            Err(TemplateError::InvalidKey(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TemplateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TemplateKey {
    type Error = TemplateError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TemplateKey::parse(&s)
    }
}

impl From<TemplateKey> for String {
    fn from(k: TemplateKey) -> String {
        k.0
    }
}

/// The key and the input digests it was made from (the digests go into the
/// manifest too).
#[derive(Debug, Clone)]
pub(crate) struct KeyMaterial {
    pub key: TemplateKey,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
}

impl KeyMaterial {
    pub fn compute(spec: &TemplateSpec) -> io::Result<KeyMaterial> {
        let kernel = hash::file_sha256_cached(&spec.kernel)
            .map_err(|e| annotate(e, "guest kernel", &spec.kernel))?;
        let initrd = hash::file_sha256_cached(&spec.initrd)
            .map_err(|e| annotate(e, "initramfs", &spec.initrd))?;
        let digest = key_digest(
            &kernel,
            &initrd,
            spec,
            JEVM_VERSION,
            TEMPLATE_FORMAT_VERSION,
        );
        let hex = hash::to_hex(&digest);
        Ok(KeyMaterial {
            key: TemplateKey(hex[..KEY_HEX_LEN].to_owned()),
            kernel_sha256: hash::to_hex(&kernel),
            initrd_sha256: hash::to_hex(&initrd),
        })
    }
}

fn annotate(e: io::Error, what: &str, path: &std::path::Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// The key's SHA-256. Every variable-length field is length-prefixed so no
/// two different inputs encode to the same byte string.
fn key_digest(
    kernel_sha256: &[u8; 32],
    initrd_sha256: &[u8; 32],
    spec: &TemplateSpec,
    jevm_version: &str,
    format_version: u32,
) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"jevm-template-key\0");
    h.update(format_version.to_le_bytes());
    h.update((jevm_version.len() as u64).to_le_bytes());
    h.update(jevm_version.as_bytes());
    h.update(kernel_sha256);
    h.update(initrd_sha256);
    h.update((spec.cmdline.len() as u64).to_le_bytes());
    h.update(spec.cmdline.as_bytes());
    h.update([spec.vcpus]);
    h.update(spec.mem_mib.to_le_bytes());
    h.finalize().into()
}

/// `manifest.json`: what the template was built from and what its files must
/// look like. Written last during a build; checked on every open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`TEMPLATE_FORMAT_VERSION`] of the jevm that wrote it.
    pub format_version: u32,
    /// [`JEVM_VERSION`] of the jevm that wrote it.
    pub jevm_version: String,
    pub key: TemplateKey,
    pub spec: TemplateSpec,
    /// Hex SHA-256 of the kernel and initramfs bytes the key was made from.
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_secs: u64,
    /// Apparent length of `memory` in bytes.
    pub memory_len: u64,
    /// Hex SHA-256 of `memory`, computed at creation (checked only by
    /// [`Template::verify_memory`]: too big to hash on every clone).
    pub memory_sha256: String,
    /// Length and hex SHA-256 of `state.json` (checked on every open).
    pub state_len: u64,
    pub state_sha256: String,
}

/// The two fields read before anything else, so a manifest from another
/// format version is reported as foreign even if the rest no longer parses.
#[derive(Debug, Deserialize)]
pub(crate) struct ManifestVersions {
    pub format_version: u32,
    pub jevm_version: String,
}

/// Why a template could not be used. Every message names the file (or
/// directory) and the reason.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// No template directory for this key.
    #[error("template {key} not found in {root}")]
    NotFound { key: TemplateKey, root: PathBuf },
    /// Written by another jevm or another template format.
    #[error(
        "{path}: template from another jevm: format version {found_format}, jevm {found_jevm}; \
         this jevm uses format version {TEMPLATE_FORMAT_VERSION}, jevm {JEVM_VERSION}"
    )]
    Foreign {
        path: PathBuf,
        found_format: u32,
        found_jevm: String,
    },
    /// A file is missing, has the wrong size or checksum, or does not parse.
    #[error("{path}: corrupt template: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The caller's build closure failed (or left no state/memory file).
    #[error("template {key}: build failed: {cause:#}")]
    Build {
        key: TemplateKey,
        cause: anyhow::Error,
    },
    /// A key string that is not 32 lowercase hex digits.
    #[error("{0:?} is not a template key (expected {KEY_HEX_LEN} lowercase hex digits)")]
    InvalidKey(String),
    /// The kernel or initramfs could not be read to compute the key.
    #[error("template spec: {0}")]
    Spec(#[source] io::Error),
    /// Any other I/O failure, with what was being done and to which path.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl TemplateError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        TemplateError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        TemplateError::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// True for the errors that mean "this template must not be used and
    /// may be rebuilt": [`Foreign`](Self::Foreign) and
    /// [`Corrupt`](Self::Corrupt).
    pub fn is_invalid_template(&self) -> bool {
        matches!(
            self,
            TemplateError::Foreign { .. } | TemplateError::Corrupt { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TemplateSpec {
        TemplateSpec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            mem_mib: 256,
        }
    }

    #[test]
    fn key_digest_changes_with_every_input() {
        let k = [1u8; 32];
        let i = [2u8; 32];
        let base = key_digest(&k, &i, &spec(), "0.1.0", 1);
        let mut others = vec![
            key_digest(&[3u8; 32], &i, &spec(), "0.1.0", 1),
            key_digest(&k, &[3u8; 32], &spec(), "0.1.0", 1),
            key_digest(&k, &i, &spec(), "0.1.1", 1),
            key_digest(&k, &i, &spec(), "0.1.0", 2),
        ];
        let mut s = spec();
        s.cmdline.push(' ');
        others.push(key_digest(&k, &i, &s, "0.1.0", 1));
        let mut s = spec();
        s.vcpus = 1;
        others.push(key_digest(&k, &i, &s, "0.1.0", 1));
        let mut s = spec();
        s.mem_mib = 512;
        others.push(key_digest(&k, &i, &s, "0.1.0", 1));
        // Paths are not part of the key: same bytes elsewhere, same key.
        let mut s = spec();
        s.kernel = "/elsewhere".into();
        assert_eq!(key_digest(&k, &i, &s, "0.1.0", 1), base);
        for (n, o) in others.iter().enumerate() {
            assert_ne!(*o, base, "variant {n} collided");
        }
    }

    #[test]
    fn key_parse_accepts_only_32_lowercase_hex_digits() {
        assert!(TemplateKey::parse("0123456789abcdef0123456789abcdef").is_ok());
        for bad in [
            "",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "0123456789ABCDEF0123456789abcdef",
            "../../../../../../../../etc/pass",
            "0123456789abcdef0123456789abcdeg",
        ] {
            let e = TemplateKey::parse(bad).unwrap_err();
            assert!(e.to_string().contains("is not a template key"), "{e}");
        }
    }
}
