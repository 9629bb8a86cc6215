//! SHA-256 helpers: streamed file hashing (hole-aware for sparse memory
//! images), an in-memory cache for the kernel and initramfs digests, hex.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

const CHUNK: usize = 1 << 20;

/// Zeros fed to the hash for the holes of a sparse file.
static ZEROS: [u8; CHUNK] = [0; CHUNK];

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

/// Streams `reader` through SHA-256.
pub(crate) fn sha256_reader(mut reader: impl Read) -> io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(h.finalize().into())
}

/// SHA-256 of the whole file (as if read from offset 0 to its length),
/// reading only its data extents: holes found with `SEEK_DATA`/`SEEK_HOLE`
/// are hashed as zeros without touching the disk or the page cache. Falls
/// back to reading everything where the file system does not support them.
/// Uses positional reads and `lseek`, so it moves the file's offset.
/// Returns the digest and the length hashed.
pub(crate) fn sha256_file_sparse(file: &File) -> io::Result<([u8; 32], u64)> {
    let len = file.metadata()?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    let mut seek_supported = true;
    while pos < len {
        let data = if seek_supported {
            match lseek(file, pos, libc::SEEK_DATA) {
                Ok(d) => d.min(len),
                // No data at or after `pos`: the rest is one hole.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => len,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    seek_supported = false;
                    pos
                }
                Err(e) => return Err(e),
            }
        } else {
            pos
        };
        feed_zeros(&mut h, data - pos);
        if data >= len {
            pos = len;
            break;
        }
        let hole = if seek_supported {
            lseek(file, data, libc::SEEK_HOLE)?.min(len)
        } else {
            len
        };
        let mut off = data;
        while off < hole {
            let want = usize::try_from(hole - off).unwrap_or(CHUNK).min(CHUNK);
            match file.read_at(&mut buf[..want], off) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the file shrank while it was hashed (at byte {off} of {len})"),
                    ))
                }
                Ok(n) => {
                    h.update(&buf[..n]);
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        pos = hole;
    }
    Ok((h.finalize().into(), pos))
}

fn feed_zeros(h: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(CHUNK as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

fn lseek(file: &File, off: u64, whence: libc::c_int) -> io::Result<u64> {
    let off = libc::off_t::try_from(off)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek on a file descriptor we own (borrowed from `file`, open
    // for the duration of the call) touches no memory of ours.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// What identifies one version of a file's contents cheaply: if any of these
/// change the cached digest is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

type Cache = Mutex<HashMap<PathBuf, (Stamp, [u8; 32])>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

static DISK_CACHE: OnceLock<PathBuf> = OnceLock::new();

/// Also keeps digests in `dir` (the template store's `.digests`), so a new
/// process (every shim is one) does not hash a 10 MiB kernel again just to
/// find its template: that was a third of a container start. The first
/// store opened in a process decides.
pub(crate) fn set_disk_cache(dir: PathBuf) {
    let _ = DISK_CACHE.set(dir);
}

/// Name of the on-disk entry for `path` in the state `stamp`: any change of
/// the stamp is another name, so a stale entry is never read.
fn disk_entry(dir: &Path, path: &Path, stamp: &Stamp) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut key = path.as_os_str().as_bytes().to_vec();
    key.extend(format!("\0{stamp:?}").as_bytes());
    dir.join(sha256_hex(&key))
}

fn disk_lookup(path: &Path, stamp: &Stamp) -> Option<[u8; 32]> {
    disk_lookup_in(DISK_CACHE.get()?, path, stamp)
}

fn disk_lookup_in(dir: &Path, path: &Path, stamp: &Stamp) -> Option<[u8; 32]> {
    let text = std::fs::read_to_string(disk_entry(dir, path, stamp)).ok()?;
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(d)
}

/// Best effort: a cache that cannot be written only costs time.
fn disk_store(path: &Path, stamp: &Stamp, digest: &[u8; 32]) {
    if let Some(dir) = DISK_CACHE.get() {
        disk_store_in(dir, path, stamp, digest);
    }
}

fn disk_store_in(dir: &Path, path: &Path, stamp: &Stamp, digest: &[u8; 32]) {
    let entry = disk_entry(dir, path, stamp);
    let tmp = entry.with_extension(format!("tmp{}", std::process::id()));
    let ok = std::fs::create_dir_all(dir).is_ok()
        && std::fs::write(&tmp, to_hex(digest)).is_ok()
        && std::fs::rename(&tmp, &entry).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// SHA-256 of a (kernel or initramfs) file's bytes, cached per path (in this
/// process, and on disk once a store set [`set_disk_cache`]) while the
/// file's device, inode, length, mtime and ctime stay the same (any write
/// or replacement changes ctime or the inode).
pub(crate) fn file_sha256_cached(path: &Path) -> io::Result<[u8; 32]> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let stamp = Stamp::of(&meta);
    if let Some((s, d)) = cache().lock().unwrap_or_else(|e| e.into_inner()).get(path) {
        if *s == stamp {
            return Ok(*d);
        }
    }
    if let Some(d) = disk_lookup(path, &stamp) {
        cache()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_owned(), (stamp, d));
        return Ok(d);
    }
    let digest = sha256_reader(&file)?;
    // If the file changed while it was read, do not cache what may be a mix.
    if Stamp::of(&file.metadata()?) == stamp {
        disk_store(path, &stamp, &digest);
        cache()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_owned(), (stamp, digest));
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_cache_answers_only_for_the_same_file_state() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kernel");
        std::fs::write(&f, b"one").unwrap();
        let cache = dir.path().join(".digests");
        let stamp = Stamp::of(&std::fs::metadata(&f).unwrap());
        assert_eq!(disk_lookup_in(&cache, &f, &stamp), None);
        let digest = sha256_reader(File::open(&f).unwrap()).unwrap();
        disk_store_in(&cache, &f, &stamp, &digest);
        assert_eq!(disk_lookup_in(&cache, &f, &stamp), Some(digest));
        // Rewritten: another length (and ctime), so the entry is not used.
        std::fs::write(&f, b"other").unwrap();
        let stamp2 = Stamp::of(&std::fs::metadata(&f).unwrap());
        assert_ne!(stamp, stamp2);
        assert_eq!(disk_lookup_in(&cache, &f, &stamp2), None);
    }
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }

    #[test]
    fn sparse_hash_equals_hash_of_all_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let mut f = File::create(&path).unwrap();
        // hole, data, hole, data across chunk boundaries, trailing hole
        f.seek(SeekFrom::Start(3 * CHUNK as u64 + 17)).unwrap();
        f.write_all(&[0xab; 5000]).unwrap();
        f.seek(SeekFrom::Start(5 * CHUNK as u64)).unwrap();
        f.write_all(&vec![0x5a; CHUNK + 3]).unwrap();
        f.set_len(9 * CHUNK as u64 + 1).unwrap();
        drop(f);
        let all = std::fs::read(&path).unwrap();
        let f = File::open(&path).unwrap();
        let (d, len) = sha256_file_sparse(&f).unwrap();
        assert_eq!(len, all.len() as u64);
        assert_eq!(d, <[u8; 32]>::from(Sha256::digest(&all)));
        assert_eq!(sha256_reader(File::open(&path).unwrap()).unwrap(), d);

        let empty = dir.path().join("empty");
        File::create(&empty).unwrap();
        let (d, len) = sha256_file_sparse(&File::open(&empty).unwrap()).unwrap();
        assert_eq!((d, len), (<[u8; 32]>::from(Sha256::digest(b"")), 0));
    }

    #[test]
    fn cached_file_hash_follows_content_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel");
        std::fs::write(&path, b"one").unwrap();
        let a = file_sha256_cached(&path).unwrap();
        assert_eq!(a, <[u8; 32]>::from(Sha256::digest(b"one")));
        assert_eq!(file_sha256_cached(&path).unwrap(), a);
        std::fs::write(&path, b"two!").unwrap();
        assert_eq!(
            file_sha256_cached(&path).unwrap(),
            <[u8; 32]>::from(Sha256::digest(b"two!"))
        );
    }
}
