//! containerd-shim-jevm-v2. The task service arrives with the containerd
//! issue; until then the binary only answers `--version`, so nothing can
//! mistake it for a working runtime.

fn main() {
    let arg = std::env::args().nth(1);
    if arg.as_deref() == Some("--version") || arg.as_deref() == Some("-v") {
        println!("containerd-shim-jevm-v2 {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    eprintln!("containerd-shim-jevm-v2: the containerd task service is not implemented yet");
    std::process::exit(2);
}
