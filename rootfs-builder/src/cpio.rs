//! A writer for the "newc" cpio format, the one the kernel unpacks an
//! initramfs from (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Output is a pure function of the entries: mtime, uid and gid are 0, entries
//! are written sorted by path, inode numbers are assigned in that order.
//! Whoever adds entries in whatever order, the same set gives the same bytes,
//! so the initramfs (and the template VM keyed by its hash) is reproducible.

use std::io::{self, Write};

use anyhow::{bail, Result};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    CharDev { major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
struct Entry {
    path: String,
    perm: u32,
    kind: Kind,
}

/// The entries of an archive, written out by [`Archive::write_to`].
#[derive(Debug, Default)]
pub struct Archive {
    entries: Vec<Entry>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> Result<&mut Self> {
        self.push(path, perm, Kind::Dir)
    }

    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<&mut Self> {
        self.push(path, perm, Kind::File(data))
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<&mut Self> {
        self.push(path, perm, Kind::CharDev { major, minor })
    }

    fn push(&mut self, path: &str, perm: u32, kind: Kind) -> Result<&mut Self> {
        // Paths are relative to the initramfs root, as the kernel expects;
        // "." and ".." components would let an entry land outside its parent.
        if path.is_empty()
            || path.starts_with('/')
            || path.ends_with('/')
            || path.contains('\0')
            || path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            || path == TRAILER
        {
            bail!("cpio entry path {path:?} is not a plain relative path");
        }
        if perm & !0o7777 != 0 {
            bail!("cpio entry {path}: permission bits {perm:#o} carry a file type");
        }
        if self.entries.iter().any(|e| e.path == path) {
            bail!("cpio entry {path} added twice");
        }
        self.entries.push(Entry {
            path: path.to_owned(),
            perm,
            kind,
        });
        Ok(self)
    }

    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut entries: Vec<&Entry> = self.entries.iter().collect();
        // Sorting by bytes also puts every directory before what it contains
        // (a path sorts before any path it is a prefix of), which the kernel
        // needs: it does not create missing parents.
        entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        let mut w = Counting { out, written: 0 };
        for (i, e) in entries.iter().enumerate() {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &e.kind {
                Kind::Dir => (S_IFDIR | e.perm, 2, &[], (0, 0)),
                Kind::File(d) => (S_IFREG | e.perm, 1, d, (0, 0)),
                Kind::CharDev { major, minor } => (S_IFCHR | e.perm, 1, &[], (*major, *minor)),
            };
            let ino = u32::try_from(i + 1).map_err(|_| too_big("entry count"))?;
            write_entry(&mut w, ino, mode, nlink, rdev, &e.path, data)?;
        }
        write_entry(&mut w, 0, 0, 1, (0, 0), TRAILER, &[])
    }

    #[cfg(test)]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v).expect("writing to a Vec cannot fail");
        v
    }
}

struct Counting<'a, W: Write> {
    out: &'a mut W,
    written: usize,
}

impl<W: Write> Counting<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    /// Headers and file data both start on 4-byte boundaries in newc.
    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..pad])
    }
}

fn too_big(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("cpio: {what} does not fit the 32-bit newc field"),
    )
}

fn write_entry<W: Write>(
    w: &mut Counting<'_, W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    (rdev_major, rdev_minor): (u32, u32),
    name: &str,
    data: &[u8],
) -> io::Result<()> {
    let filesize = u32::try_from(data.len()).map_err(|_| too_big("file size"))?;
    let namesize = u32::try_from(name.len() + 1).map_err(|_| too_big("name length"))?;
    // Everything that would vary between build hosts is pinned to 0; `check`
    // is only used by the "crc" variant (magic 070702).
    let (uid, gid, mtime, dev_major, dev_minor, check) = (0, 0, 0, 0, 0, 0);
    let fields = [
        ino, mode, uid, gid, nlink, mtime, filesize, dev_major, dev_minor, rdev_major, rdev_minor,
        namesize, check,
    ];
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    for f in fields {
        header.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    debug_assert_eq!(header.len(), HEADER_LEN);
    w.put(&header)?;
    w.put(name.as_bytes())?;
    w.put(&[0])?;
    w.pad4()?;
    w.put(data)?;
    w.pad4()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One parsed newc record; the parser is independent of the writer so a
    /// shared misunderstanding of the format cannot hide in both.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Parsed {
        pub name: String,
        pub ino: u32,
        pub mode: u32,
        pub uid: u32,
        pub gid: u32,
        pub nlink: u32,
        pub mtime: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
    }

    pub fn parse(buf: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            assert_eq!(pos % 4, 0, "header at {pos} not 4-byte aligned");
            assert_eq!(&buf[pos..pos + 6], b"070701", "bad magic at {pos}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[pos + 6 + 8 * i..pos + 14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let namesize = field(11) as usize;
            let filesize = field(6) as usize;
            assert_eq!(field(12), 0, "check field");
            let name_start = pos + 110;
            let name = &buf[name_start..name_start + namesize];
            assert_eq!(name.last(), Some(&0), "name not NUL-terminated");
            let name = String::from_utf8(name[..namesize - 1].to_vec()).unwrap();
            let data_start = (name_start + namesize).next_multiple_of(4);
            assert!(buf[name_start + namesize..data_start]
                .iter()
                .all(|&b| b == 0));
            let data = buf[data_start..data_start + filesize].to_vec();
            let next = (data_start + filesize).next_multiple_of(4);
            assert!(buf[data_start + filesize..next].iter().all(|&b| b == 0));
            let done = name == "TRAILER!!!";
            out.push(Parsed {
                name,
                ino: field(0),
                mode: field(1),
                uid: field(2),
                gid: field(3),
                nlink: field(4),
                mtime: field(5),
                rdev: (field(9), field(10)),
                data,
            });
            pos = next;
            if done {
                assert_eq!(pos, buf.len(), "bytes after the trailer");
                return out;
            }
        }
    }

    #[test]
    fn round_trip_parses_back_every_header_and_payload() {
        let mut a = Archive::new();
        a.file("init", 0o755, b"hello".to_vec()).unwrap();
        a.dir("dev", 0o755).unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        a.file("etc/empty", 0o644, Vec::new()).unwrap();
        a.dir("etc", 0o755).unwrap();
        let bytes = a.to_bytes();
        let p = parse(&bytes);
        let names: Vec<&str> = p.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "etc",
                "etc/empty",
                "init",
                "TRAILER!!!"
            ]
        );
        assert_eq!(p[0].mode, 0o040755);
        assert_eq!(p[0].nlink, 2);
        assert_eq!(p[1].mode, 0o020600);
        assert_eq!(p[1].rdev, (5, 1));
        assert_eq!(p[3].mode, 0o100644);
        assert!(p[3].data.is_empty());
        assert_eq!(p[4].mode, 0o100755);
        assert_eq!(p[4].data, b"hello");
        for (i, e) in p[..5].iter().enumerate() {
            assert_eq!(e.ino, i as u32 + 1);
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0));
        }
    }

    #[test]
    fn insertion_order_does_not_change_the_bytes() {
        let mut a = Archive::new();
        a.dir("b", 0o755).unwrap();
        a.file("a", 0o644, b"x".to_vec()).unwrap();
        let mut b = Archive::new();
        b.file("a", 0o644, b"x".to_vec()).unwrap();
        b.dir("b", 0o755).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
    }

    #[test]
    fn unsafe_or_duplicate_paths_are_refused() {
        let mut a = Archive::new();
        for bad in ["", "/init", "dev/", "a//b", "../x", "a/./b", "TRAILER!!!"] {
            assert!(a.dir(bad, 0o755).is_err(), "{bad:?} accepted");
        }
        a.dir("dev", 0o755).unwrap();
        assert!(a.dir("dev", 0o755).is_err());
        assert!(a.file("x", 0o100644, Vec::new()).is_err());
    }
}
