//! [`TemplateStore`]: find, validate, build, list and remove templates.
//!
//! Concurrency: every operation on one key runs under the key's lock
//! (`<root>/<key>.lock`, see `lock.rs`): opening and validating under a
//! shared lock, building and removing under an exclusive one. Two processes
//! asking for the same missing template: one builds, the other waits on the
//! lock and then opens what the first published.
//!
//! Atomicity: a template is built in `<root>/.staging-<key>.<unique>`, sealed
//! there (files hashed, made read-only and immutable, manifest written last,
//! everything fsynced) and then renamed to `<root>/<key>`; removal renames
//! `<root>/<key>` to `<root>/.trash-<key>.<unique>` before deleting it. A
//! crash leaves at worst a dot-directory, which the next exclusive holder of
//! that key deletes, never a half-written `<root>/<key>`.
//!
//! Lock files: left in place after a successful build (the next user needs
//! one anyway); removed, by the exclusive holder as its last act, after a
//! failed build and after `remove`. That is safe because every locker checks
//! that the path still names the inode it locked and otherwise retries.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::fsutil;
use super::hash;
use super::lock::{KeyLock, LockMode};
use super::{
    KeyMaterial, Manifest, ManifestVersions, TemplateError, TemplateKey, TemplateSpec,
    DEFAULT_ROOT, JEVM_VERSION, MANIFEST_FILE, MEMORY_FILE, STATE_FILE, TEMPLATE_FORMAT_VERSION,
};

/// The largest manifest or state file read into memory. Both are small
/// JSON; anything bigger is corrupt, not something to allocate for.
const MAX_SMALL_FILE: u64 = 64 << 20;

/// A directory of templates, one subdirectory per [`TemplateKey`].
#[derive(Debug, Clone)]
pub struct TemplateStore {
    root: PathBuf,
}

impl Default for TemplateStore {
    /// A store at [`DEFAULT_ROOT`].
    fn default() -> Self {
        TemplateStore::new(DEFAULT_ROOT)
    }
}

/// A valid template, opened and checked (see [`TemplateStore::open`]).
#[derive(Debug)]
pub struct Template {
    /// `<root>/<key>`.
    pub dir: PathBuf,
    pub key: TemplateKey,
    pub manifest: Manifest,
    /// The contents of `state.json`, length and SHA-256 checked against the
    /// manifest.
    pub state: Vec<u8>,
    /// `memory`, opened read-only while the key's lock was held and checked
    /// to have the manifest's length.
    memory: File,
}

/// One entry of [`TemplateStore::list`].
#[derive(Debug, Clone)]
pub struct TemplateInfo {
    /// The directory name (a key, unless the status says otherwise).
    pub key: String,
    pub dir: PathBuf,
    /// From the manifest, if it could be read (also for invalid templates
    /// when the manifest still parses).
    pub spec: Option<TemplateSpec>,
    pub jevm_version: Option<String>,
    pub created_unix_secs: Option<u64>,
    /// `memory`'s length (`st_size`).
    pub memory_apparent_bytes: Option<u64>,
    /// `memory`'s allocated size on disk (`st_blocks * 512`): smaller than
    /// the apparent size when the image is sparse.
    pub memory_disk_bytes: Option<u64>,
    pub status: TemplateStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateStatus {
    /// Passes the same checks as [`TemplateStore::open`].
    Valid,
    /// Would be refused (and rebuilt by `get_or_create`); the reason is the
    /// error `open` would return.
    Invalid { reason: String },
    /// Being built or removed right now (its lock is held exclusively).
    Busy,
}

impl TemplateStatus {
    pub fn is_valid(&self) -> bool {
        matches!(self, TemplateStatus::Valid)
    }
}

impl std::fmt::Display for TemplateStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateStatus::Valid => f.write_str("valid"),
            TemplateStatus::Invalid { reason } => write!(f, "INVALID ({reason})"),
            TemplateStatus::Busy => f.write_str("busy (being built or removed)"),
        }
    }
}

impl std::fmt::Display for TemplateInfo {
    /// One line: key, status, creation time, memory sizes, spec.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MIB: f64 = (1u64 << 20) as f64;
        write!(f, "{}  {}", self.key, self.status)?;
        if let Some(t) = self.created_unix_secs {
            write!(f, "  created {t} (unix)")?;
        }
        if let (Some(a), Some(d)) = (self.memory_apparent_bytes, self.memory_disk_bytes) {
            write!(
                f,
                "  memory {:.1} MiB ({:.1} MiB on disk)",
                a as f64 / MIB,
                d as f64 / MIB
            )?;
        }
        if let Some(spec) = &self.spec {
            write!(f, "  {spec}")?;
        }
        Ok(())
    }
}

impl Template {
    /// `<dir>/memory`: the guest RAM image. Map it `MAP_PRIVATE` for a clone.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    /// `<dir>/state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// `<dir>/manifest.json`.
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST_FILE)
    }

    /// The memory file as it was validated: a read-only descriptor opened
    /// under the key's lock. Mapping this (rather than opening
    /// [`memory_path`](Self::memory_path) again) guarantees the clone uses
    /// the checked inode even if the template is removed or rebuilt
    /// meanwhile. Use positional I/O or mmap: its file offset is shared and
    /// [`verify_memory`](Self::verify_memory) moves it.
    pub fn memory_file(&self) -> &File {
        &self.memory
    }

    /// Length of the memory image in bytes (as checked against the manifest).
    pub fn memory_len(&self) -> u64 {
        self.manifest.memory_len
    }

    /// Hashes the whole memory image and compares it with the SHA-256 the
    /// manifest recorded at creation. Reads every data extent (holes are
    /// hashed as zeros without reading): for `jevm template verify` and
    /// tests, not for every clone.
    pub fn verify_memory(&self) -> Result<(), TemplateError> {
        let path = self.memory_path();
        let (digest, len) = hash::sha256_file_sparse(&self.memory)
            .map_err(|e| TemplateError::io("hashing", &path, e))?;
        check_memory_len(&path, len, self.manifest.memory_len)?;
        let found = hash::to_hex(&digest);
        if found != self.manifest.memory_sha256 {
            return Err(TemplateError::corrupt(
                path,
                format!(
                    "sha256 {found}, expected {} (the image changed after it was published)",
                    self.manifest.memory_sha256
                ),
            ));
        }
        Ok(())
    }
}

impl TemplateStore {
    /// A store rooted at `root` (created on the first build).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        super::hash::set_disk_cache(root.join(".digests"));
        TemplateStore { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<key>`, whether or not it exists.
    pub fn template_dir(&self, key: &TemplateKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    fn lock_path(&self, key: &TemplateKey) -> PathBuf {
        self.root.join(format!("{key}.lock"))
    }

    fn lock(&self, key: &TemplateKey, mode: LockMode) -> Result<KeyLock, TemplateError> {
        let path = self.lock_path(key);
        KeyLock::acquire(&path, mode).map_err(|e| TemplateError::io("locking", path, e))
    }

    /// Returns the valid template for `spec`, building it with `build` if it
    /// is missing or invalid.
    ///
    /// `build` gets an empty staging directory and must write [`STATE_FILE`]
    /// (the saved VM state, opaque here) and [`MEMORY_FILE`] (the guest RAM
    /// image, may be sparse) into it; it may leave other files, which are
    /// published unchecked. It runs with the key's lock held exclusively, so
    /// for one key at most one build runs at a time across all processes
    /// using this root; the others wait and then open the result.
    ///
    /// An existing template that is foreign (another jevm or format),
    /// corrupt, or describes another spec is logged (`warn`), removed and
    /// rebuilt. If `build` fails its staging directory is removed, and so
    /// is the lock file; the error is [`TemplateError::Build`]. A waiter of
    /// that failed build then runs its own build. If `build` panics, the
    /// staging directory is removed while unwinding (and by the next build
    /// of that key otherwise); the empty lock file stays.
    ///
    /// `build` must not use this store for the same key: it would wait for
    /// its own lock.
    pub fn get_or_create(
        &self,
        spec: &TemplateSpec,
        build: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> Result<Template, TemplateError> {
        let km = KeyMaterial::compute(spec).map_err(TemplateError::Spec)?;
        let key = &km.key;
        std::fs::create_dir_all(&self.root)
            .map_err(|e| TemplateError::io("creating template root", &self.root, e))?;

        // Fast path, the common case: the template exists and is valid.
        // Shared, so clones starting together validate in parallel.
        {
            let _shared = self.lock(key, LockMode::Shared)?;
            match self.open_for_spec(&km, spec) {
                Ok(t) => return Ok(t),
                Err(e) if is_missing_or_invalid(&e) => {}
                Err(e) => return Err(e),
            }
        }

        let lock = self.lock(key, LockMode::Exclusive)?;
        // Someone may have built (or repaired) it between the two locks.
        match self.open_for_spec(&km, spec) {
            Ok(t) => return Ok(t),
            Err(TemplateError::NotFound { .. }) => {}
            Err(e) if e.is_invalid_template() => {
                log::warn!("template {key}: {e}; removing it and building a new one");
                match self.remove_locked(key) {
                    Ok(()) | Err(TemplateError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
        self.sweep_leftovers(key);
        match self.build_locked(&km, spec, build) {
            Ok(t) => Ok(t),
            Err(e) => {
                // Nothing of this build is left; the lock file goes too, as
                // the last thing done under the lock.
                lock.unlink_and_release();
                Err(e)
            }
        }
    }

    /// Opens and validates the template for `key` without building it.
    ///
    /// Cheap enough for every clone: reads and parses the manifest (format
    /// and jevm version must be ours, else [`TemplateError::Foreign`]; the
    /// key must match), reads `state.json` and checks its length and SHA-256,
    /// opens `memory` and checks its length. The memory image is not hashed
    /// (see [`Template::verify_memory`]). Waits while the template is being
    /// built or removed.
    pub fn open(&self, key: &TemplateKey) -> Result<Template, TemplateError> {
        // Do not create a lock file (or the root) for a key that is not here.
        if !exists(&self.template_dir(key))? {
            return Err(self.not_found(key));
        }
        let _shared = self.lock(key, LockMode::Shared)?;
        self.open_locked(key)
    }

    /// Every template directory under the root (sorted by key) with its
    /// spec, creation time, memory sizes and validity. Does not wait for
    /// templates being built or removed: those are [`TemplateStatus::Busy`].
    /// Staging and trash directories and lock files are not listed.
    pub fn list(&self) -> Result<Vec<TemplateInfo>, TemplateError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(TemplateError::io("listing", &self.root, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| TemplateError::io("listing", &self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".lock") {
                continue;
            }
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if !is_dir {
                continue;
            }
            if let Some(info) = self.info(&name)? {
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// One entry of `list`, or `None` if the directory vanished meanwhile.
    fn info(&self, name: &str) -> Result<Option<TemplateInfo>, TemplateError> {
        let dir = self.root.join(name);
        let mut info = TemplateInfo {
            key: name.to_owned(),
            dir: dir.clone(),
            spec: None,
            jevm_version: None,
            created_unix_secs: None,
            memory_apparent_bytes: None,
            memory_disk_bytes: None,
            status: TemplateStatus::Busy,
        };
        let mut manifest = None;
        match TemplateKey::parse(name) {
            Err(e) => {
                info.status = TemplateStatus::Invalid {
                    reason: format!("{}: {e}", dir.display()),
                }
            }
            Ok(key) => {
                let path = self.lock_path(&key);
                let lock = match KeyLock::try_acquire(&path, LockMode::Shared) {
                    Ok(lock) => lock.map(Ok),
                    // Cannot lock (no write access to the root, say): look
                    // anyway; a build or removal in progress may then show
                    // as invalid for a moment.
                    Err(e) => {
                        log::debug!("{}: cannot lock: {e}", path.display());
                        Some(Err(e))
                    }
                };
                if lock.is_some() {
                    match self.open_locked(&key) {
                        Ok(t) => {
                            info.status = TemplateStatus::Valid;
                            manifest = Some(t.manifest);
                        }
                        Err(TemplateError::NotFound { .. }) => return Ok(None),
                        Err(e) => {
                            info.status = TemplateStatus::Invalid {
                                reason: e.to_string(),
                            }
                        }
                    }
                }
            }
        }
        // Best effort for invalid or busy ones: whatever still parses.
        let manifest = manifest.or_else(|| {
            let bytes = std::fs::read(dir.join(MANIFEST_FILE)).ok()?;
            serde_json::from_slice::<Manifest>(&bytes).ok()
        });
        if let Some(m) = manifest {
            info.spec = Some(m.spec);
            info.jevm_version = Some(m.jevm_version);
            info.created_unix_secs = Some(m.created_unix_secs);
        }
        if let Ok(m) = std::fs::symlink_metadata(dir.join(MEMORY_FILE)) {
            info.memory_apparent_bytes = Some(m.len());
            info.memory_disk_bytes = Some(m.blocks() * 512);
        }
        Ok(Some(info))
    }

    /// Removes the template for `key` (a key's string form), under the key's
    /// exclusive lock: waits for a build in progress. Clears the immutable
    /// flag first. VMs already cloned from it keep their mappings (the inode
    /// lives on until they unmap it). Removes the lock file as well.
    pub fn remove(&self, key: &str) -> Result<(), TemplateError> {
        let key = TemplateKey::parse(key)?;
        if !exists(&self.template_dir(&key))? {
            return Err(self.not_found(&key));
        }
        let lock = self.lock(&key, LockMode::Exclusive)?;
        let result = self.remove_locked(&key);
        self.sweep_leftovers(&key);
        lock.unlink_and_release();
        result
    }

    fn not_found(&self, key: &TemplateKey) -> TemplateError {
        TemplateError::NotFound {
            key: key.clone(),
            root: self.root.clone(),
        }
    }

    /// `open_locked`, plus: the manifest must describe `spec` (same inputs
    /// as the key; a mismatch means a key collision or tampering).
    fn open_for_spec(
        &self,
        km: &KeyMaterial,
        spec: &TemplateSpec,
    ) -> Result<Template, TemplateError> {
        let t = self.open_locked(&km.key)?;
        let m = &t.manifest;
        let mut diffs = Vec::new();
        if m.kernel_sha256 != km.kernel_sha256 {
            diffs.push("kernel");
        }
        if m.initrd_sha256 != km.initrd_sha256 {
            diffs.push("initramfs");
        }
        if m.spec.cmdline != spec.cmdline {
            diffs.push("command line");
        }
        if m.spec.vcpus != spec.vcpus {
            diffs.push("vCPUs");
        }
        if m.spec.mem_mib != spec.mem_mib {
            diffs.push("memory size");
        }
        if diffs.is_empty() {
            Ok(t)
        } else {
            Err(TemplateError::corrupt(
                t.manifest_path(),
                format!(
                    "describes a different template than its key (differs in: {})",
                    diffs.join(", ")
                ),
            ))
        }
    }

    /// Opens and validates `<root>/<key>`; the caller holds the key's lock.
    fn open_locked(&self, key: &TemplateKey) -> Result<Template, TemplateError> {
        let dir = self.template_dir(key);
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_bytes = match open_member(&manifest_path) {
            Ok(f) => read_small(f, &manifest_path)?,
            Err(e @ TemplateError::Corrupt { .. }) => {
                return Err(if exists(&dir)? {
                    e
                } else {
                    self.not_found(key)
                })
            }
            Err(e) => return Err(e),
        };
        let manifest = parse_manifest(&manifest_path, &manifest_bytes)?;
        if manifest.key != *key {
            return Err(TemplateError::corrupt(
                &manifest_path,
                format!(
                    "written for template {}, found in the directory of template {key}",
                    manifest.key
                ),
            ));
        }

        let state_path = dir.join(STATE_FILE);
        let state = read_small(open_member(&state_path)?, &state_path)?;
        if state.len() as u64 != manifest.state_len {
            return Err(TemplateError::corrupt(
                &state_path,
                format!("{} bytes, expected {}", state.len(), manifest.state_len),
            ));
        }
        let sum = hash::sha256_hex(&state);
        if sum != manifest.state_sha256 {
            return Err(TemplateError::corrupt(
                &state_path,
                format!("sha256 {sum}, expected {}", manifest.state_sha256),
            ));
        }

        let memory_path = dir.join(MEMORY_FILE);
        let memory = open_member(&memory_path)?;
        let len = memory
            .metadata()
            .map_err(|e| TemplateError::io("reading metadata of", &memory_path, e))?
            .len();
        check_memory_len(&memory_path, len, manifest.memory_len)?;

        Ok(Template {
            dir,
            key: key.clone(),
            manifest,
            state,
            memory,
        })
    }

    /// Runs `build` in a fresh staging directory, seals and publishes the
    /// result; the caller holds the key's lock exclusively and has made sure
    /// `<root>/<key>` does not exist.
    fn build_locked(
        &self,
        km: &KeyMaterial,
        spec: &TemplateSpec,
        build: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> Result<Template, TemplateError> {
        let key = &km.key;
        let staging = self
            .root
            .join(format!(".staging-{key}.{}", unique_suffix()));
        std::fs::create_dir(&staging)
            .map_err(|e| TemplateError::io("creating staging directory", &staging, e))?;
        // Removes the staging directory on every early return and on panic.
        let guard = RemoveOnDrop(Some(staging.clone()));

        log::info!("template {key}: building ({spec})");
        let started = Instant::now();
        build(&staging).map_err(|cause| TemplateError::Build {
            key: key.clone(),
            cause,
        })?;
        let manifest = seal(&staging, km, spec)?;

        let dir = self.template_dir(key);
        std::fs::rename(&staging, &dir)
            .map_err(|e| TemplateError::io("publishing template as", &dir, e))?;
        guard.disarm();
        if let Err(e) = fsutil::sync_dir(&self.root) {
            log::warn!("template {key}: cannot fsync {}: {e}", self.root.display());
        }
        log::info!(
            "template {key}: built in {:.2?}, memory {} bytes",
            started.elapsed(),
            manifest.memory_len
        );
        // Reopen what was published, through the same checks as every clone.
        self.open_locked(key).inspect_err(|_| {
            if let Err(e) = self.remove_locked(key) {
                log::warn!("template {key}: cannot remove what was just published: {e}");
            }
        })
    }

    /// Moves `<root>/<key>` aside and deletes it; the caller holds the key's
    /// lock exclusively.
    fn remove_locked(&self, key: &TemplateKey) -> Result<(), TemplateError> {
        let dir = self.template_dir(key);
        let trash = self.root.join(format!(".trash-{key}.{}", unique_suffix()));
        match std::fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(key)),
            Err(e) => return Err(TemplateError::io("moving aside for removal", &dir, e)),
        }
        if let Err(e) = fsutil::sync_dir(&self.root) {
            log::warn!("template {key}: cannot fsync {}: {e}", self.root.display());
        }
        fsutil::remove_tree(&trash).map_err(|e| TemplateError::io("removing", &trash, e))?;
        log::info!("template {key}: removed {}", dir.display());
        Ok(())
    }

    /// Deletes `.staging-<key>.*` and `.trash-<key>.*` left by a process
    /// that died mid-build or mid-removal. Only under the key's exclusive
    /// lock: then no live process is using them.
    fn sweep_leftovers(&self, key: &TemplateKey) {
        let staging = format!(".staging-{key}.");
        let trash = format!(".trash-{key}.");
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&staging) || name.starts_with(&trash) {
                let path = entry.path();
                log::info!("template {key}: removing leftover {}", path.display());
                if let Err(e) = fsutil::remove_tree(&path) {
                    log::warn!("template {key}: cannot remove {}: {e}", path.display());
                }
            }
        }
    }
}

/// Hashes what `build` left in `staging`, makes it read-only (mode 0444 and,
/// where possible, the immutable flag), writes the manifest last and fsyncs
/// everything.
fn seal(staging: &Path, km: &KeyMaterial, spec: &TemplateSpec) -> Result<Manifest, TemplateError> {
    let build_error = |cause: String| TemplateError::Build {
        key: km.key.clone(),
        cause: anyhow::anyhow!(cause),
    };
    let state_path = staging.join(STATE_FILE);
    let memory_path = staging.join(MEMORY_FILE);
    for path in [&state_path, &memory_path] {
        let is_file = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
        if !is_file {
            return Err(build_error(format!(
                "it left no regular file at {}",
                path.display()
            )));
        }
    }

    let state_file = open_member(&state_path)?;
    let state = read_small(
        state_file
            .try_clone()
            .map_err(|e| TemplateError::io("reading", &state_path, e))?,
        &state_path,
    )?;
    let memory = open_member(&memory_path)?;
    let (memory_digest, memory_len) = hash::sha256_file_sparse(&memory)
        .map_err(|e| TemplateError::io("hashing", &memory_path, e))?;

    let created_unix_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let manifest = Manifest {
        format_version: TEMPLATE_FORMAT_VERSION,
        jevm_version: JEVM_VERSION.to_owned(),
        key: km.key.clone(),
        spec: spec.clone(),
        kernel_sha256: km.kernel_sha256.clone(),
        initrd_sha256: km.initrd_sha256.clone(),
        created_unix_secs,
        memory_len,
        memory_sha256: hash::to_hex(&memory_digest),
        state_len: state.len() as u64,
        state_sha256: hash::sha256_hex(&state),
    };

    let manifest_path = staging.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest always serialises");
    let mut manifest_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&manifest_path)
        .map_err(|e| TemplateError::io("creating", &manifest_path, e))?;
    manifest_file
        .write_all(&json)
        .and_then(|()| manifest_file.write_all(b"\n"))
        .map_err(|e| TemplateError::io("writing", &manifest_path, e))?;

    for (file, path) in [
        (&state_file, &state_path),
        (&memory, &memory_path),
        (&manifest_file, &manifest_path),
    ] {
        file.set_permissions(std::fs::Permissions::from_mode(0o444))
            .map_err(|e| TemplateError::io("making read-only", path, e))?;
        file.sync_all()
            .map_err(|e| TemplateError::io("syncing", path, e))?;
    }
    // The flag goes on last: after it nothing (not even chmod) may change.
    for path in [&state_path, &memory_path, &manifest_path] {
        let f = open_member(path)?;
        let set = fsutil::set_immutable(&f, true)
            .map_err(|e| TemplateError::io("setting the immutable flag on", path, e))?;
        if !set {
            log::debug!(
                "{}: immutable flag not supported or not permitted here; mode 0444 only",
                path.display()
            );
        }
    }
    fsutil::sync_dir(staging).map_err(|e| TemplateError::io("syncing", staging, e))?;
    Ok(manifest)
}

pub(crate) fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, TemplateError> {
    let versions: ManifestVersions = serde_json::from_slice(bytes)
        .map_err(|e| TemplateError::corrupt(path, format!("not a jevm template manifest: {e}")))?;
    if versions.format_version != TEMPLATE_FORMAT_VERSION || versions.jevm_version != JEVM_VERSION {
        return Err(TemplateError::Foreign {
            path: path.to_owned(),
            found_format: versions.format_version,
            found_jevm: versions.jevm_version,
        });
    }
    serde_json::from_slice(bytes)
        .map_err(|e| TemplateError::corrupt(path, format!("does not parse: {e}")))
}

fn check_memory_len(path: &Path, len: u64, expected: u64) -> Result<(), TemplateError> {
    if len < expected {
        Err(TemplateError::corrupt(
            path,
            format!("truncated: {len} bytes, expected {expected}"),
        ))
    } else if len > expected {
        Err(TemplateError::corrupt(
            path,
            format!("too long: {len} bytes, expected {expected}"),
        ))
    } else {
        Ok(())
    }
}

/// Opens a file of a template read-only, refusing symlinks. A missing file
/// or a symlink is [`TemplateError::Corrupt`], anything else `Io`.
fn open_member(path: &Path) -> Result<File, TemplateError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => TemplateError::corrupt(path, "missing"),
            Some(libc::ELOOP) => TemplateError::corrupt(path, "is a symbolic link"),
            Some(libc::ENOTDIR) => TemplateError::corrupt(path, "its directory is not a directory"),
            _ => TemplateError::io("opening", path, e),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| TemplateError::io("reading metadata of", path, e))?;
    if !meta.is_file() {
        return Err(TemplateError::corrupt(path, "not a regular file"));
    }
    Ok(file)
}

/// Reads a small (manifest, state) file whole.
fn read_small(file: File, path: &Path) -> Result<Vec<u8>, TemplateError> {
    let mut bytes = Vec::new();
    file.take(MAX_SMALL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| TemplateError::io("reading", path, e))?;
    if bytes.len() as u64 > MAX_SMALL_FILE {
        return Err(TemplateError::corrupt(
            path,
            format!("larger than {MAX_SMALL_FILE} bytes"),
        ));
    }
    Ok(bytes)
}

fn exists(path: &Path) -> Result<bool, TemplateError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(TemplateError::io("looking up", path, e)),
    }
}

fn is_missing_or_invalid(e: &TemplateError) -> bool {
    matches!(e, TemplateError::NotFound { .. }) || e.is_invalid_template()
}

/// `<pid>.<nanoseconds>.<counter>`: unique per process and call.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}.{nanos}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes a directory tree when dropped, unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            if let Err(e) = fsutil::remove_tree(&path) {
                log::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}
