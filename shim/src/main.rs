//! `containerd-shim-jevm-v2`: containerd's task API v2 for pods that run
//! in jevm microVMs (one VM per pod, cloned from a template).

mod agent;
mod config;
mod events;
mod layout;
mod mounts;
mod pod;
mod record;
mod runtime_options;
mod service;
mod spec;
mod stdio;
mod task;
mod timings;

use std::sync::OnceLock;
use std::time::SystemTime;

use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};

const RUNTIME_ID: &str = "io.containerd.jevm.v2";

static PROCESS_START: OnceLock<SystemTime> = OnceLock::new();

/// When this process started (for the shim-start timing).
pub fn process_start() -> SystemTime {
    *PROCESS_START.get_or_init(SystemTime::now)
}

/// `-info` (containerd 2.x introspection): the runtime's name and version
/// as a protobuf `RuntimeInfo` on stdout.
fn print_info() -> std::io::Result<()> {
    use std::io::Write;
    let info = RuntimeInfo {
        name: "containerd-shim-jevm-v2".into(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = info.write_to_bytes().map_err(std::io::Error::other)?;
    std::io::stdout().write_all(&bytes)
}

/// The log level from the jevm config file, if it sets one; the runtime
/// options (read at create) may still change it.
fn configured_log_level() -> Option<String> {
    let env = std::env::var(config::ENV_PATH).ok();
    let source = config::choose_source(None, false, env.as_deref());
    config::load(&source, None).ok()?.log_level
}

#[tokio::main]
async fn main() {
    process_start();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!("containerd-shim-jevm-v2 {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if args.iter().any(|a| a == "-info" || a == "--info") {
        if let Err(e) = print_info() {
            eprintln!("containerd-shim-jevm-v2: -info: {e}");
            std::process::exit(1);
        }
        return;
    }
    let mut cfg = containerd_shim::Config::default();
    if let Some(level) = configured_log_level() {
        cfg.default_log_level = level;
    }
    containerd_shim::asynchronous::run::<service::Service>(RUNTIME_ID, Some(cfg)).await;
}
