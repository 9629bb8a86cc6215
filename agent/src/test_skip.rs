//! Says a test did not run: on stderr, and in `$JEVM_SKIP_LOG`, which
//! `hack/test` lists in its summary (a skip must not pass for a pass).
//! One file, included by the agent's unit and integration tests and by the
//! end-to-end tests.

pub fn skipped(reason: &str) {
    let test = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("JEVM_SKIP_LOG") {
        use std::io::Write;
        let line = format!("{test}: {reason}\n");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log);
        let _ = f.and_then(|mut f| f.write_all(line.as_bytes()));
    }
}
