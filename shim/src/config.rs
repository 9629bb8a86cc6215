//! The jevm configuration file (`/etc/jevm/config.toml`): where the guest
//! kernel, initramfs, template store and run directory are, and VM size.
//!
//! Which file: the runtime option `ConfigPath` of the CRI runtime entry
//! (containerd's `runtimeoptions.v1.Options`, as Kata reads it) or `ctr run
//! --runtime-config-path`, else the environment variable `JEVM_CONFIG`, else
//! [`DEFAULT_PATH`]. The default file may be missing (all defaults); a file
//! named explicitly must exist. Unknown keys are errors, so a typo does not
//! silently fall back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/jevm/config.toml";
/// The smallest VM a pod gets (the guest kernel and agent need about
/// 40 MiB before any container runs).
pub const MIN_MEMORY_MIB: u32 = 64;
pub const ENV_PATH: &str = "JEVM_CONFIG";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JevmConfig {
    /// Guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The template store's root.
    pub template_dir: PathBuf,
    /// Pods (`<run_dir>/pods/<pod id>`) and VM sockets (`<run_dir>/vms`).
    pub run_dir: PathBuf,
    /// Every pod's VM size, unless the pod asks for another (see
    /// `sizing.rs`).
    pub vcpus: u8,
    pub memory_mib: u32,
    /// The largest VM a pod may ask for: by default the host's online CPUs
    /// and the most guest memory the VMM's layout has room for.
    pub max_vcpus: Option<u8>,
    pub max_memory_mib: Option<u32>,
    /// Extra guest kernel command line (part of the template key).
    pub kernel_params: String,
    /// `error`, `warn`, `info`, `debug` or `trace`; None keeps the shim's
    /// default (`info`, or `RUST_LOG`).
    pub log_level: Option<String>,
    /// A guest whose agent answers no ping for this long is declared hung:
    /// its VM is stopped and its tasks exit. 0 turns the check off.
    pub liveness_timeout_secs: u64,
    /// What a VMM thread meets when it makes a syscall outside its
    /// allow-list (docs/security.md): `kill` (report it, end the VMM),
    /// `log` (let it through, the kernel logs it: for updating the lists)
    /// or `off`.
    pub seccomp: String,
}

impl Default for JevmConfig {
    fn default() -> Self {
        JevmConfig {
            kernel: "/usr/share/jevm/vmlinux".into(),
            initramfs: "/usr/share/jevm/initramfs.cpio.gz".into(),
            template_dir: jevm_runtime::template::DEFAULT_ROOT.into(),
            run_dir: "/run/jevm".into(),
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: None,
            max_memory_mib: None,
            kernel_params: String::new(),
            log_level: None,
            liveness_timeout_secs: 10,
            seccomp: "kill".into(),
        }
    }
}

/// Where a configuration came from; error messages name it so the user
/// knows which file to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file (explicit: missing is an error).
    File { path: PathBuf, explicit: bool },
    /// A TOML body passed inline in the runtime options (containerd 1.7+
    /// `ConfigBody`).
    Inline,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File { path, .. } => write!(f, "{}", path.display()),
            Source::Inline => f.write_str("the runtime options' ConfigBody"),
        }
    }
}

/// Picks the configuration source: runtime option path, then body, then
/// `$JEVM_CONFIG`, then the default path.
pub fn choose_source(option_path: Option<&str>, option_body: bool, env: Option<&str>) -> Source {
    if let Some(p) = option_path.filter(|p| !p.is_empty()) {
        return Source::File {
            path: p.into(),
            explicit: true,
        };
    }
    if option_body {
        return Source::Inline;
    }
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return Source::File {
            path: p.into(),
            explicit: true,
        };
    }
    Source::File {
        path: DEFAULT_PATH.into(),
        explicit: false,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("jevm: config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("jevm: config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("jevm: {what} {path}: {cause} (set \"{key}\" in {config})")]
    GuestFile {
        what: &'static str,
        key: &'static str,
        path: String,
        cause: String,
        config: String,
    },
}

/// Reads and parses the configuration from `source` (`body` is the inline
/// TOML for [`Source::Inline`]).
pub fn load(source: &Source, body: Option<&[u8]>) -> Result<JevmConfig, ConfigError> {
    let text = match source {
        Source::File { path, explicit } => match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(JevmConfig::default())
            }
            Err(e) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source: e,
                })
            }
        },
        Source::Inline => String::from_utf8_lossy(body.unwrap_or_default()).into_owned(),
    };
    parse(&text).map_err(|message| ConfigError::Parse {
        path: source.to_string(),
        message,
    })
}

/// The most guest memory the VMM's memory layout has room for.
const MAX_MEMORY_MIB: u32 = jevm_runtime::vmm::layout::MAX_MEM_MIB;

impl JevmConfig {
    pub fn jail_mode(&self) -> Result<jevm_runtime::jail::Mode, String> {
        self.seccomp.parse()
    }

    /// The most vCPUs a pod may ask for.
    pub fn max_vcpus(&self) -> u8 {
        self.max_vcpus.unwrap_or_else(|| {
            let online = std::thread::available_parallelism().map_or(1, |n| n.get());
            u8::try_from(online)
                .unwrap_or(u8::MAX)
                .clamp(self.vcpus, jevm_runtime::vmm::vm::MAX_VCPUS)
        })
    }

    /// The most memory a pod may ask for, in MiB.
    pub fn max_memory_mib(&self) -> u32 {
        self.max_memory_mib.unwrap_or(MAX_MEMORY_MIB)
    }
}

/// Parses TOML text into a configuration and checks its values.
pub fn parse(text: &str) -> Result<JevmConfig, String> {
    let cfg: JevmConfig = toml::from_str(text).map_err(|e| e.message().to_string())?;
    if cfg.vcpus == 0 || cfg.vcpus > jevm_runtime::vmm::vm::MAX_VCPUS {
        return Err(format!(
            "vcpus = {} is out of range (1..={})",
            cfg.vcpus,
            jevm_runtime::vmm::vm::MAX_VCPUS
        ));
    }
    if cfg.memory_mib < MIN_MEMORY_MIB || cfg.memory_mib > MAX_MEMORY_MIB {
        return Err(format!(
            "memory_mib = {} is out of range ({MIN_MEMORY_MIB}..={MAX_MEMORY_MIB})",
            cfg.memory_mib
        ));
    }
    if let Some(m) = cfg.max_vcpus {
        if m < cfg.vcpus || m > jevm_runtime::vmm::vm::MAX_VCPUS {
            return Err(format!(
                "max_vcpus = {m} is out of range (vcpus = {}..={})",
                cfg.vcpus,
                jevm_runtime::vmm::vm::MAX_VCPUS
            ));
        }
    }
    if let Some(m) = cfg.max_memory_mib {
        if m < cfg.memory_mib || m > MAX_MEMORY_MIB {
            return Err(format!(
                "max_memory_mib = {m} is out of range (memory_mib = {}..={MAX_MEMORY_MIB})",
                cfg.memory_mib
            ));
        }
    }
    if let Some(l) = &cfg.log_level {
        l.parse::<log::LevelFilter>().map_err(|_| {
            format!("log_level = {l:?} is not one of error, warn, info, debug, trace, off")
        })?;
    }
    cfg.jail_mode().map_err(|e| format!("seccomp = {e}"))?;
    // Beyond a day the check is off in all but name; a typo is likelier.
    if cfg.liveness_timeout_secs > 86_400 {
        return Err(format!(
            "liveness_timeout_secs = {} is too large (at most 86400; 0 turns the check off)",
            cfg.liveness_timeout_secs
        ));
    }
    for (key, p) in [
        ("kernel", &cfg.kernel),
        ("initramfs", &cfg.initramfs),
        ("template_dir", &cfg.template_dir),
        ("run_dir", &cfg.run_dir),
    ] {
        if !p.is_absolute() {
            return Err(format!(
                "{key} = {:?} must be an absolute path",
                p.display()
            ));
        }
    }
    Ok(cfg)
}

impl JevmConfig {
    /// How long a guest may leave pings unanswered; None: never declared hung.
    pub fn liveness_timeout(&self) -> Option<std::time::Duration> {
        (self.liveness_timeout_secs > 0)
            .then(|| std::time::Duration::from_secs(self.liveness_timeout_secs))
    }

    /// Checks the kernel and initramfs before anything is built from them,
    /// so a wrong path is one clear error naming the file and the key.
    pub fn check_guest_files(&self, source: &Source) -> Result<(), ConfigError> {
        let err = |what, key, path: &Path, cause: String| ConfigError::GuestFile {
            what,
            key,
            path: path.display().to_string(),
            cause,
            config: source.to_string(),
        };
        check_file(&self.kernel, Some(b"\x7fELF"), "not an ELF vmlinux")
            .map_err(|c| err("kernel", "kernel", &self.kernel, c))?;
        check_file(&self.initramfs, None, "")
            .map_err(|c| err("initramfs", "initramfs", &self.initramfs, c))?;
        Ok(())
    }
}

/// Opens `path`, requires a non-empty regular file, and when `magic` is
/// given, that the file starts with it.
fn check_file(path: &Path, magic: Option<&[u8]>, not_magic: &str) -> Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io_cause)?;
    let md = f.metadata().map_err(io_cause)?;
    if !md.is_file() {
        return Err("not a regular file".into());
    }
    if md.len() == 0 {
        return Err("empty file".into());
    }
    if let Some(magic) = magic {
        let mut head = vec![0u8; magic.len()];
        if f.read_exact(&mut head).is_err() || head != magic {
            return Err(not_magic.into());
        }
    }
    Ok(())
}

/// "No such file or directory", without the "(os error 2)" suffix.
fn io_cause(e: std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

/// Hostile config text (a runtime config file, or the body containerd
/// passes in the runtime options): parsed or refused with a message, never
/// a panic; what parses keeps the documented limits.
#[cfg(test)]
mod fuzz {
    use jevm_protocol::fuzzing::mutated;
    use proptest::prelude::*;

    use super::*;

    const SEED: &str = "kernel = \"/usr/share/jevm/vmlinux\"\nvcpus = 2\nmemory_mib = 512\n\
        max_vcpus = 4\nmax_memory_mib = 2048\nliveness_timeout_secs = 10\nlog_level = \"info\"\n";

    proptest! {
        #[test]
        fn fuzz_config_text_is_parsed_or_refused(bytes in mutated(vec![SEED.as_bytes().to_vec()], 256)) {
            let Ok(text) = std::str::from_utf8(&bytes) else {
                return Ok(());
            };
            if let Ok(c) = parse(text) {
                prop_assert!((1..=jevm_runtime::vmm::vm::MAX_VCPUS).contains(&c.vcpus));
                prop_assert!((MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&c.memory_mib));
                prop_assert!(c.max_vcpus.is_none_or(|m| m >= c.vcpus));
                prop_assert!(c.max_memory_mib.is_none_or(|m| m >= c.memory_mib));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, JevmConfig::default());
        assert_eq!(c.kernel, Path::new("/usr/share/jevm/vmlinux"));
        assert_eq!(c.initramfs, Path::new("/usr/share/jevm/initramfs.cpio.gz"));
        assert_eq!(c.template_dir, Path::new("/var/lib/jevm/templates"));
        assert_eq!(c.run_dir, Path::new("/run/jevm"));
        assert_eq!((c.vcpus, c.memory_mib), (1, 256));
        assert_eq!(c.liveness_timeout_secs, 10);
        assert_eq!(
            c.liveness_timeout(),
            Some(std::time::Duration::from_secs(10))
        );
    }

    #[test]
    fn liveness_timeout_zero_turns_the_check_off() {
        let c = parse("liveness_timeout_secs = 0").unwrap();
        assert_eq!(c.liveness_timeout(), None);
        let c = parse("liveness_timeout_secs = 3").unwrap();
        assert_eq!(
            c.liveness_timeout(),
            Some(std::time::Duration::from_secs(3))
        );
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            r#"
            kernel = "/k"
            initramfs = "/i"
            template_dir = "/t"
            run_dir = "/r"
            vcpus = 2
            memory_mib = 512
            kernel_params = "loglevel=7"
            log_level = "debug"
            liveness_timeout_secs = 30
            "#,
        )
        .unwrap();
        assert_eq!(c.kernel, Path::new("/k"));
        assert_eq!(c.initramfs, Path::new("/i"));
        assert_eq!(c.template_dir, Path::new("/t"));
        assert_eq!(c.run_dir, Path::new("/r"));
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
        assert_eq!(c.kernel_params, "loglevel=7");
        assert_eq!(c.log_level.as_deref(), Some("debug"));
        assert_eq!(c.liveness_timeout_secs, 30);
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        for (text, needle) in [
            ("kernal = \"/k\"", "kernal"),
            ("vcpus = 0", "vcpus"),
            ("vcpus = 65", "vcpus"),
            ("memory_mib = 8", "memory_mib"),
            ("memory_mib = 4096", "memory_mib"),
            ("max_vcpus = 65", "max_vcpus"),
            ("vcpus = 2\nmax_vcpus = 1", "max_vcpus"),
            ("max_memory_mib = 128", "max_memory_mib"),
            ("kernel = \"rel/vmlinux\"", "kernel"),
            ("log_level = \"loud\"", "log_level"),
            ("vcpus = \"two\"", "string"),
            ("liveness_timeout_secs = -1", "expected u64"),
            ("liveness_timeout_secs = 100000", "liveness_timeout_secs"),
            (
                "seccomp = \"strict\"",
                "seccomp = \"strict\" is not one of kill, log, off",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn source_precedence_is_option_then_body_then_env_then_default() {
        assert_eq!(
            choose_source(Some("/o.toml"), true, Some("/e.toml")),
            Source::File {
                path: "/o.toml".into(),
                explicit: true
            }
        );
        assert_eq!(choose_source(None, true, Some("/e.toml")), Source::Inline);
        assert_eq!(
            choose_source(Some(""), false, Some("/e.toml")),
            Source::File {
                path: "/e.toml".into(),
                explicit: true
            }
        );
        assert_eq!(
            choose_source(None, false, None),
            Source::File {
                path: DEFAULT_PATH.into(),
                explicit: false
            }
        );
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_named_file_is_an_error() {
        let gone = Path::new("/nonexistent-jevm-test/config.toml");
        let implicit = Source::File {
            path: gone.into(),
            explicit: false,
        };
        assert_eq!(load(&implicit, None).unwrap(), JevmConfig::default());
        let explicit = Source::File {
            path: gone.into(),
            explicit: true,
        };
        let e = load(&explicit, None).unwrap_err().to_string();
        assert!(e.contains("/nonexistent-jevm-test/config.toml"), "{e}");
        let e = load(&Source::Inline, Some(b"vcpus = 0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ConfigBody") && e.contains("vcpus"), "{e}");
    }

    #[test]
    fn missing_kernel_is_one_clear_error_naming_file_and_key() {
        let c = JevmConfig {
            kernel: "/nope/vmlinux".into(),
            ..JevmConfig::default()
        };
        let src = Source::File {
            path: DEFAULT_PATH.into(),
            explicit: false,
        };
        let e = c.check_guest_files(&src).unwrap_err().to_string();
        assert_eq!(
            e,
            "jevm: kernel /nope/vmlinux: No such file or directory \
             (set \"kernel\" in /etc/jevm/config.toml)"
        );
    }

    #[test]
    fn a_kernel_that_is_not_elf_is_refused() {
        let dir = std::env::temp_dir().join(format!("jevm-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("vmlinux");
        let i = dir.join("initramfs");
        std::fs::write(&k, b"MZ not elf").unwrap();
        std::fs::write(&i, b"0707").unwrap();
        let mut c = JevmConfig {
            kernel: k.clone(),
            initramfs: i.clone(),
            ..JevmConfig::default()
        };
        let e = c
            .check_guest_files(&Source::Inline)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an ELF vmlinux"), "{e}");
        std::fs::write(&k, b"\x7fELF....").unwrap();
        c.check_guest_files(&Source::Inline).unwrap();
        c.initramfs = dir.clone();
        let e = c
            .check_guest_files(&Source::Inline)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("initramfs") && e.contains("not a regular file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
