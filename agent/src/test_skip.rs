//! Says a test did not run: on stderr, and in `$JEVM_SKIP_LOG`, which
//! `hack/test` lists in its summary (a skip must not pass for a pass).
//! One file, included by the agent's unit and integration tests, the shim's
//! tests and the end-to-end tests.
//!
//! Each skip is a file of its own in the directory `$JEVM_SKIP_LOG.d`, not a
//! line appended to one file: the end-to-end tests run in the KVM test host,
//! which writes the log over 9p, where appends from parallel tests were
//! seen to overwrite each other.

pub fn skipped(reason: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let test = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("JEVM_SKIP_LOG") {
        let mut dir = log;
        dir.push(".d");
        let dir = std::path::PathBuf::from(dir);
        let name = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let line = format!("{test}: {reason}\n");
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join(name), line.as_bytes()));
        if let Err(e) = written {
            eprintln!("cannot record the skip in {}: {e}", dir.display());
        }
    }
}
