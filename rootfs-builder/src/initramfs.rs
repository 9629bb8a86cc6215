//! The guest's initramfs: the agent as /init plus the few nodes the kernel
//! and the agent need before anything is mounted.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flate2::{Compression, GzBuilder};

use crate::cache;
use crate::cpio::Archive;

/// Bump whenever the archive's layout or encoding changes: the key must
/// change with anything that changes the output bytes.
const RECIPE_VERSION: &str = "initramfs-1: newc, gzip level 9 (flate2/miniz_oxide), dev proc sys tmp run etc, console+null, /init";

pub fn key(agent: &[u8]) -> String {
    cache::key(&[("recipe", RECIPE_VERSION.as_bytes()), ("agent", agent)])
}

pub fn output_path(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join(format!("initramfs-{key}.cpio.gz"))
}

/// Builds (or finds) the initramfs for `agent_path` and returns its path.
pub fn build(cache_dir: &Path, agent_path: &Path) -> Result<PathBuf> {
    let agent = std::fs::read(agent_path)
        .with_context(|| format!("reading agent binary {}", agent_path.display()))?;
    check_static_elf(&agent).with_context(|| {
        format!(
            "agent {} cannot be the guest's /init (the initramfs has no libraries)",
            agent_path.display()
        )
    })?;
    let out = output_path(cache_dir, &key(&agent));
    if out.exists() {
        eprintln!("jevm-rootfs-builder: initramfs is cached");
        return Ok(out);
    }
    eprintln!(
        "jevm-rootfs-builder: writing initramfs with /init = {}",
        agent_path.display()
    );
    // No lock: the bytes are a pure function of the key, so concurrent
    // builders each publish identical content under the same name.
    cache::publish_bytes(&out, &archive_gz(agent)?)?;
    Ok(out)
}

pub fn archive(agent: Vec<u8>) -> Result<Archive> {
    let mut a = Archive::new();
    for (dir, perm) in [
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("run", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
    ] {
        a.dir(dir, perm)?;
    }
    // The kernel opens /dev/console for init's stdin/out/err before init runs,
    // long before devtmpfs is mounted; without the node init starts with no
    // fds 0-2 ("Warning: unable to open an initial console").
    a.char_dev("dev/console", 0o600, 5, 1)?;
    a.char_dev("dev/null", 0o666, 1, 3)?;
    a.file("init", 0o755, agent)?;
    Ok(a)
}

pub fn archive_gz(agent: Vec<u8>) -> Result<Vec<u8>> {
    // GzBuilder writes mtime 0 and no file name unless told, so the gzip
    // header adds nothing host-specific.
    let mut gz = GzBuilder::new().write(Vec::new(), Compression::best());
    archive(agent)?
        .write_to(&mut gz)
        .context("writing cpio archive")?;
    let bytes = gz.finish().context("finishing gzip stream")?;
    Ok(bytes)
}

const PT_INTERP: u32 = 3;
const EM_X86_64: u16 = 62;

/// Refuses anything but a static x86_64 ELF executable.
///
/// A dynamically linked /init fails only at boot, with the kernel's bare
/// "No working init found"; catching it here names the file and the cause.
/// Static-PIE binaries (ET_DYN without PT_INTERP) are fine.
pub fn check_static_elf(bytes: &[u8]) -> Result<()> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        bail!("not an ELF file");
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        bail!(
            "not a 64-bit little-endian ELF (EI_CLASS {}, EI_DATA {})",
            bytes[4],
            bytes[5]
        );
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let (e_type, e_machine) = (u16_at(16), u16_at(18));
    if e_machine != EM_X86_64 {
        bail!("built for ELF machine {e_machine}, not x86_64 ({EM_X86_64})");
    }
    // ET_EXEC or ET_DYN (static-pie); relocatable objects and cores cannot run.
    if e_type != 2 && e_type != 3 {
        bail!("ELF type {e_type} is not an executable");
    }
    let phoff = usize::try_from(u64_at(0x20)).context("program header offset")?;
    let phentsize = usize::from(u16_at(0x36));
    let phnum = usize::from(u16_at(0x38));
    if phnum == 0 {
        bail!("ELF has no program headers");
    }
    if phentsize < 56 {
        bail!("ELF program header size {phentsize} is smaller than Elf64_Phdr");
    }
    let end = phnum
        .checked_mul(phentsize)
        .and_then(|n| n.checked_add(phoff))
        .filter(|&end| end <= bytes.len());
    if end.is_none() {
        bail!("ELF program headers lie outside the file (truncated?)");
    }
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph) == PT_INTERP {
            let interp = interp_name(bytes, u64_at(ph + 8), u64_at(ph + 32));
            bail!("dynamically linked (PT_INTERP {interp}); build it static, e.g. for x86_64-unknown-linux-musl or with -C target-feature=+crt-static");
        }
    }
    Ok(())
}

fn interp_name(bytes: &[u8], offset: u64, size: u64) -> String {
    let slice = usize::try_from(offset)
        .ok()
        .zip(usize::try_from(size).ok())
        .and_then(|(o, s)| bytes.get(o..o.checked_add(s)?));
    match slice {
        Some(s) => String::from_utf8_lossy(s.split(|&b| b == 0).next().unwrap_or(s)).into_owned(),
        None => "<outside the file>".to_owned(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cpio::tests::parse;
    use std::io::Read;

    /// A minimal ELF64 x86_64 executable image: header plus one program
    /// header, PT_LOAD or (for a dynamic one) PT_INTERP pointing at a path.
    pub fn fake_elf(interp: bool) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56 + 32];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // ELFDATA2LSB
        b[6] = 1; // EV_CURRENT
        b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let p_type: u32 = if interp { PT_INTERP } else { 1 };
        b[64..68].copy_from_slice(&p_type.to_le_bytes());
        let path = b"/lib64/ld-linux-x86-64.so.2\0";
        b[64 + 8..64 + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        b[64 + 32..64 + 40].copy_from_slice(&(path.len() as u64).to_le_bytes()); // p_filesz
        b[120..120 + path.len()].copy_from_slice(path);
        b
    }

    #[test]
    fn static_elf_is_accepted() {
        check_static_elf(&fake_elf(false)).unwrap();
    }

    #[test]
    fn dynamic_elf_is_refused_naming_its_interpreter() {
        let err = check_static_elf(&fake_elf(true)).unwrap_err().to_string();
        assert!(err.contains("dynamically linked"), "{err}");
        assert!(err.contains("/lib64/ld-linux-x86-64.so.2"), "{err}");
    }

    #[test]
    fn host_dynamic_binary_is_refused() {
        // Debian's coreutils are dynamically linked; skip where they are not.
        let Ok(bytes) = std::fs::read("/bin/ls") else {
            return;
        };
        if bytes.windows(12).any(|w| w == b"ld-linux-x86") {
            assert!(check_static_elf(&bytes).is_err());
        }
    }

    #[test]
    fn non_elf_truncated_and_foreign_binaries_are_refused() {
        assert!(check_static_elf(b"#!/bin/sh\necho hi\n").is_err());
        let elf = fake_elf(false);
        assert!(check_static_elf(&elf[..100]).is_err());
        let mut arm = elf.clone();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        assert!(check_static_elf(&arm).is_err());
        let mut elf32 = elf;
        elf32[4] = 1;
        assert!(check_static_elf(&elf32).is_err());
    }

    #[test]
    fn archive_has_init_device_nodes_and_directories() {
        let agent = fake_elf(false);
        let gz = archive_gz(agent.clone()).unwrap();
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut cpio)
            .unwrap();
        let entries = parse(&cpio);
        let find = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(find("init").mode, 0o100755);
        assert_eq!(find("init").data, agent);
        assert_eq!(find("dev/console").mode, 0o020600);
        assert_eq!(find("dev/console").rdev, (5, 1));
        assert_eq!(find("dev/null").mode, 0o020666);
        assert_eq!(find("dev/null").rdev, (1, 3));
        for d in ["dev", "proc", "sys", "tmp", "run", "etc"] {
            assert_eq!(find(d).mode & 0o170000, 0o040000, "{d}");
        }
        assert_eq!(find("tmp").mode, 0o041777);
    }

    #[test]
    fn two_builds_are_byte_identical() {
        let a = archive_gz(fake_elf(false)).unwrap();
        let b = archive_gz(fake_elf(false)).unwrap();
        assert_eq!(a, b);
        // gzip header: no FNAME flag and MTIME 0
        assert_eq!(a[3], 0);
        assert_eq!(&a[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn key_changes_with_the_agent() {
        let a = fake_elf(false);
        let mut b = a.clone();
        *b.last_mut().unwrap() ^= 1;
        assert_eq!(key(&a), key(&a.clone()));
        assert_ne!(key(&a), key(&b));
    }

    #[test]
    fn build_publishes_once_then_reuses_and_refuses_dynamic_agents() {
        let dir = cache::test_dir("initramfs");
        let agent = dir.join("agent");
        std::fs::write(&agent, fake_elf(false)).unwrap();
        let out = build(&dir, &agent).unwrap();
        assert_eq!(out, output_path(&dir, &key(&fake_elf(false))));
        let first = std::fs::metadata(&out).unwrap().modified().unwrap();
        assert_eq!(build(&dir, &agent).unwrap(), out);
        assert_eq!(std::fs::metadata(&out).unwrap().modified().unwrap(), first);

        std::fs::write(&agent, fake_elf(true)).unwrap();
        let err = format!("{:#}", build(&dir, &agent).unwrap_err());
        assert!(err.contains("dynamically linked"), "{err}");
        assert!(err.contains(&agent.display().to_string()), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
