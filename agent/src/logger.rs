//! Log lines go to the console (fd 2), one `write` per line so concurrent
//! threads never interleave halfway through a line.
//!
//! The boot console is an emulated serial port where every byte costs a VM
//! exit, so the default level is `info` and the success path logs one line.
//! `JEVM_AGENT_LOG=debug` on the kernel command line (the kernel hands unknown
//! `key=value` words to init as environment) turns on more.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

struct ConsoleLogger;

static LOGGER: ConsoleLogger = ConsoleLogger;

impl Log for ConsoleLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = match record.level() {
            Level::Error => format!("jevm-agent: error: {}\n", record.args()),
            Level::Warn => format!("jevm-agent: warning: {}\n", record.args()),
            _ => format!("jevm-agent: {}\n", record.args()),
        };
        // Nothing useful can be done if the console itself fails.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the console logger and a panic hook that logs through it.
pub fn init() {
    let level = std::env::var("JEVM_AGENT_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Info);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
    // The default hook's text lacks the prefix that lets a reader of a mixed
    // kernel/agent console log find agent failures.
    std::panic::set_hook(Box::new(|info| log::error!("panic: {info}")));
}
