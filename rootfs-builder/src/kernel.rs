//! The guest kernel: Debian's linux-source-6.12 + tinyconfig + the project's
//! fragment, built once per set of inputs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::cache;

/// Embedded so the binary is self-contained and the key cannot disagree
/// with the fragment actually built.
pub const FRAGMENT: &[u8] = include_bytes!("../config/guest-kernel.fragment");

/// Bump whenever the build steps or their environment change (anything in
/// `build_tree` that can change vmlinux without changing the package or the
/// fragment).
const RECIPE_VERSION: &str = "kernel-1: ARCH=x86_64 tinyconfig + merge_config.sh -n + make vmlinux, KBUILD_BUILD_{TIMESTAMP,USER,HOST,VERSION} pinned";

const PACKAGE: &str = "linux-source-6.12";
const TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
const INSTALL_HINT: &str =
    "apt-get install linux-source-6.12 build-essential bc bison flex libelf-dev libssl-dev";

/// Pinned so that the same inputs give the same vmlinux on any host and on
/// every rebuild (kbuild otherwise stamps date, user, host and a build counter
/// into the version string).
const KBUILD_ENV: [(&str, &str); 4] = [
    ("KBUILD_BUILD_TIMESTAMP", "1970-01-01 00:00:00 UTC"),
    ("KBUILD_BUILD_USER", "jevm"),
    ("KBUILD_BUILD_HOST", "jevm"),
    ("KBUILD_BUILD_VERSION", "1"),
];

pub fn key(package_version: &str, fragment: &[u8]) -> String {
    cache::key(&[
        ("recipe", RECIPE_VERSION.as_bytes()),
        (PACKAGE, package_version.as_bytes()),
        ("fragment", fragment),
    ])
}

pub fn output_path(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join(format!("kernel-{key}")).join("vmlinux")
}

fn package_version() -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", PACKAGE])
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (is this a Debian system?)")?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || version.is_empty() || !Path::new(TARBALL).exists() {
        bail!("{PACKAGE} is not installed ({TARBALL} missing); run: {INSTALL_HINT}");
    }
    Ok(version)
}

/// Builds (or finds) the guest vmlinux and returns its path.
pub fn build(cache_dir: &Path) -> Result<PathBuf> {
    let version = package_version()?;
    let key = key(&version, FRAGMENT);
    let out = output_path(cache_dir, &key);
    if out.exists() {
        eprintln!("jevm-rootfs-builder: kernel is cached");
        return Ok(out);
    }
    let _lock = cache::Lock::acquire(&cache_dir.join("kernel.lock"))?;
    // Whoever held the lock before us may have built exactly this.
    if out.exists() {
        return Ok(out);
    }
    let src_dir = cache_dir.join("src");
    let tree = prepare_tree(&src_dir, &version)?;
    let fragment = src_dir.join("guest-kernel.fragment");
    fs::write(&fragment, FRAGMENT).with_context(|| format!("writing {}", fragment.display()))?;
    build_tree(&tree, &fragment)?;

    let key_dir = out.parent().expect("output path has a parent");
    let inputs = format!(
        "key={key}\nrecipe={RECIPE_VERSION}\n{PACKAGE}={version}\nfragment_sha256={}\ntree={}\n",
        cache::sha256_hex(FRAGMENT),
        tree.display()
    );
    cache::publish_bytes(&key_dir.join("inputs.txt"), inputs.as_bytes())?;
    // vmlinux last: its existence is what marks the build as done.
    cache::publish_copy(&tree.join("vmlinux"), &out)?;
    Ok(out)
}

/// Returns the kernel tree for `version`, extracting the tarball if needed.
///
/// A tree is reused across fragment changes (make rebuilds only what the new
/// config touches), but never across package versions: a stamp file records
/// which version the tree came from.
fn prepare_tree(src_dir: &Path, version: &str) -> Result<PathBuf> {
    let tree = src_dir.join(PACKAGE);
    let stamp = src_dir.join(format!("{PACKAGE}.version"));
    if tree.join("Makefile").exists() {
        match fs::read_to_string(&stamp) {
            Ok(s) if s.trim() == version => return Ok(tree),
            Ok(s) => eprintln!(
                "jevm-rootfs-builder: {} is from {PACKAGE} {}, installed is {version}; extracting again",
                tree.display(),
                s.trim()
            ),
            // A tree extracted by hand (as the README describes) has no stamp;
            // adopt it if its upstream version matches the package's, rather
            // than throw away a compiled tree.
            Err(_) if tree_upstream_version(&tree)? == upstream_version(version) => {
                fs::write(&stamp, version)
                    .with_context(|| format!("writing {}", stamp.display()))?;
                return Ok(tree);
            }
            Err(_) => eprintln!(
                "jevm-rootfs-builder: {} does not match {PACKAGE} {version}; extracting again",
                tree.display()
            ),
        }
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    // Extract beside the final place and rename, so an interrupted tar never
    // leaves a half tree that a later run would take for a good one.
    let tmp = src_dir.join(format!(".extract-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    eprintln!(
        "jevm-rootfs-builder: extracting {TARBALL} into {}",
        src_dir.display()
    );
    run(Command::new("tar")
        .arg("-C")
        .arg(&tmp)
        .args(["-xf", TARBALL]))?;
    fs::rename(tmp.join(PACKAGE), &tree).with_context(|| {
        format!(
            "moving extracted {PACKAGE} to {} (unexpected tarball layout?)",
            tree.display()
        )
    })?;
    let _ = fs::remove_dir_all(&tmp);
    fs::write(&stamp, version).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(tree)
}

/// "6.12.117-1~deb12u1" -> "6.12.117".
fn upstream_version(package_version: &str) -> &str {
    let v = package_version
        .split_once(':')
        .map_or(package_version, |(_, v)| v);
    v.split_once('-').map_or(v, |(u, _)| u)
}

/// VERSION.PATCHLEVEL.SUBLEVEL from the tree's top Makefile.
fn tree_upstream_version(tree: &Path) -> Result<String> {
    let path = tree.join("Makefile");
    let makefile =
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let var = |name: &str| {
        makefile.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    Ok(format!(
        "{}.{}.{}",
        var("VERSION").unwrap_or_default(),
        var("PATCHLEVEL").unwrap_or_default(),
        var("SUBLEVEL").unwrap_or_default()
    ))
}

fn build_tree(tree: &Path, fragment: &Path) -> Result<()> {
    // ARCH=x86_64 everywhere: with the default ARCH=x86, tinyconfig answers
    // "no" to 64BIT and gives a 32-bit kernel.
    eprintln!("jevm-rootfs-builder: configuring {}", tree.display());
    run(make(tree).arg("tinyconfig"))?;
    run(Command::new("scripts/kconfig/merge_config.sh")
        .current_dir(tree)
        .env("ARCH", "x86_64")
        .args(["-n", ".config"])
        .arg(fragment))?;
    let config_path = tree.join(".config");
    let config = fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let checked = verify_config(FRAGMENT, &config)
        .with_context(|| format!("checking {} against the fragment", config_path.display()))?;
    eprintln!("jevm-rootfs-builder: all {checked} options of the fragment are in .config");

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("jevm-rootfs-builder: make -j{jobs} vmlinux (minutes when not incremental)");
    run(make(tree).arg(format!("-j{jobs}")).arg("vmlinux"))
}

fn make(tree: &Path) -> Command {
    let mut c = Command::new("make");
    c.current_dir(tree).arg("ARCH=x86_64").envs(KBUILD_ENV);
    c
}

/// Runs a build step with its output on our stderr, keeping stdout for the
/// paths that scripts capture.
fn run(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("starting {desc}"))?;
    if !status.success() {
        bail!("{desc} failed ({status})");
    }
    Ok(())
}

/// Checks that every option the fragment sets is in the merged config as
/// asked, returning how many were checked.
///
/// merge_config.sh only warns when Kconfig drops an option whose
/// dependencies are off (erofs was lost that way once); this makes it fatal.
/// `# CONFIG_X is not set` counts as honoured when X is absent altogether:
/// Kconfig omits symbols whose dependencies are off, and those are not set
/// either.
pub fn verify_config(fragment: &[u8], config: &str) -> Result<usize> {
    let fragment = std::str::from_utf8(fragment).context("fragment is not UTF-8")?;
    let mut values = std::collections::HashMap::new();
    for line in config.lines() {
        if let Some((k, v)) = line
            .split_once('=')
            .filter(|(k, _)| k.starts_with("CONFIG_"))
        {
            values.insert(k, v);
        }
    }
    let mut missing = Vec::new();
    let mut checked = 0;
    for line in fragment.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
            .filter(|n| n.starts_with("CONFIG_"))
        {
            checked += 1;
            if let Some(v) = values.get(name) {
                missing.push(format!("{name} is not set (got {name}={v})"));
            }
        } else if let Some((name, want)) = line
            .split_once('=')
            .filter(|(k, _)| k.starts_with("CONFIG_"))
        {
            checked += 1;
            match values.get(name) {
                Some(v) if *v == want => {}
                Some(v) => missing.push(format!("{name}={want} (got {name}={v})")),
                None => missing.push(format!("{name}={want} (absent: a dependency is off?)")),
            }
        }
    }
    if !missing.is_empty() {
        bail!(
            "merge_config.sh dropped {} option(s) of the fragment: {}",
            missing.len(),
            missing.join("; ")
        );
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_fragment_and_package_version() {
        let k = key("6.12.117-1~deb12u1", FRAGMENT);
        assert_eq!(k, key("6.12.117-1~deb12u1", FRAGMENT));
        let mut edited = FRAGMENT.to_vec();
        edited.extend_from_slice(b"CONFIG_EXTRA=y\n");
        assert_ne!(k, key("6.12.117-1~deb12u1", &edited));
        assert_ne!(k, key("6.12.117-1~deb12u2", FRAGMENT));
    }

    #[test]
    fn output_is_vmlinux_in_a_key_directory() {
        let p = output_path(Path::new("/c"), "0123456789abcdef");
        assert_eq!(p, Path::new("/c/kernel-0123456789abcdef/vmlinux"));
    }

    #[test]
    fn embedded_fragment_sets_what_the_guest_depends_on() {
        let f = std::str::from_utf8(FRAGMENT).unwrap();
        for opt in [
            "CONFIG_64BIT=y",
            "CONFIG_PVH=y",
            "CONFIG_KVM_GUEST=y",
            "CONFIG_EROFS_FS=y",
        ] {
            assert!(f.lines().any(|l| l == opt), "{opt}");
        }
    }

    #[test]
    fn verify_accepts_a_config_with_every_option() {
        let frag =
            b"# comment\nCONFIG_A=y\nCONFIG_NR=64\n# CONFIG_B is not set\n# CONFIG_C is not set\n";
        let config = "CONFIG_A=y\nCONFIG_NR=64\n# CONFIG_B is not set\nCONFIG_D=y\n";
        assert_eq!(verify_config(frag, config).unwrap(), 4);
    }

    #[test]
    fn verify_names_dropped_and_changed_options() {
        let frag =
            b"CONFIG_MISC_FILESYSTEMS=y\nCONFIG_EROFS_FS=y\nCONFIG_NR=64\n# CONFIG_MODULES is not set\n";
        let config = "CONFIG_MISC_FILESYSTEMS=y\nCONFIG_NR=8\nCONFIG_MODULES=y\n";
        let err = verify_config(frag, config).unwrap_err().to_string();
        assert!(err.contains("CONFIG_EROFS_FS=y"), "{err}");
        assert!(err.contains("CONFIG_NR=64 (got CONFIG_NR=8)"), "{err}");
        assert!(err.contains("CONFIG_MODULES is not set"), "{err}");
        assert!(!err.contains("MISC_FILESYSTEMS"), "{err}");
    }

    #[test]
    fn upstream_version_strips_epoch_and_debian_revision() {
        assert_eq!(upstream_version("6.12.117-1~deb12u1"), "6.12.117");
        assert_eq!(upstream_version("1:6.12.117-1"), "6.12.117");
        assert_eq!(upstream_version("6.12.117"), "6.12.117");
    }
}
