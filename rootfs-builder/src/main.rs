//! jevm-rootfs-builder: builds what the guest boots (kernel and initramfs)
//! from Debian packages alone, cached outside the repo by its inputs.
//!
//! stdout carries only `kernel=<path>` / `initramfs=<path>` lines so scripts
//! can capture them; everything else (including make's output) goes to stderr.

mod cache;
mod cpio;
mod initramfs;
mod kernel;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Cache directory [default: $JEVM_CACHE_DIR, else /var/cache/jevm]
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the guest kernel (ELF vmlinux) from linux-source-6.12 + the embedded fragment
    Kernel,
    /// Build the initramfs with the agent as /init
    Initramfs {
        /// Statically linked jevm-agent binary
        #[arg(long)]
        agent: PathBuf,
    },
    /// Build both
    All {
        /// Statically linked jevm-agent binary
        #[arg(long)]
        agent: PathBuf,
    },
}

fn main() -> ExitCode {
    // Printed by hand rather than returned from main: anyhow's Debug output
    // adds a backtrace under RUST_BACKTRACE, which buries the one line
    // (file + cause) a user needs.
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jevm-rootfs-builder: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let cache_dir = cli
        .cache_dir
        .or_else(|| {
            std::env::var_os("JEVM_CACHE_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/var/cache/jevm"));
    let cache_dir = cache::absolute_dir(&cache_dir)?;
    match cli.cmd {
        Cmd::Kernel => println!("kernel={}", kernel::build(&cache_dir)?.display()),
        Cmd::Initramfs { agent } => {
            println!(
                "initramfs={}",
                initramfs::build(&cache_dir, &agent)?.display()
            );
        }
        Cmd::All { agent } => {
            // Initramfs first: it takes a moment and refuses a bad agent
            // before minutes go into a kernel build.
            let initramfs = initramfs::build(&cache_dir, &agent)?;
            let kernel = kernel::build(&cache_dir)?;
            println!("kernel={}", kernel.display());
            println!("initramfs={}", initramfs.display());
        }
    }
    Ok(())
}
