//! `jevm`: boot a microVM by hand, and check whether this host can.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use jevm_runtime::microvm::{BootConfig, MicroVm};
use jevm_runtime::vmm::check::check_host;

#[derive(Parser)]
#[command(name = "jevm", version, about = "jevm microVM runtime tool")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a microVM, wait for its agent, print the agent version and the
    /// boot-to-agent-ready time, and shut it down.
    Boot {
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: PathBuf,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        mem: u32,
        /// Extra kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Directory for the VM's sockets and console log.
        #[arg(long, default_value = "/run/jevm")]
        run_dir: PathBuf,
        /// Seconds to wait for the agent.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Tell whether this host's /dev/kvm can run jevm guests, and if not, why.
    Check,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("jevm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Check => {
            let findings = check_host();
            let ok = findings.iter().all(|f| f.ok);
            for f in &findings {
                println!("{} {}", if f.ok { "ok  " } else { "FAIL" }, f.what);
            }
            println!(
                "{}",
                if ok {
                    "this host can run jevm guests"
                } else {
                    "this host cannot run jevm guests"
                }
            );
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Boot {
            kernel,
            initrd,
            vcpus,
            mem,
            cmdline,
            run_dir,
            timeout,
        } => {
            let mut cfg = BootConfig::new(kernel, initrd);
            cfg.vcpus = vcpus;
            cfg.mem_mib = mem;
            cfg.extra_cmdline = cmdline;
            cfg.ready_timeout = Duration::from_secs(timeout);
            let vm = MicroVm::boot(&cfg, &run_dir).context("boot failed")?;
            println!("agent ready");
            let mem = vmm_memory();
            let version = vm.agent()?.version()?;
            println!("agent version: {version}");
            println!(
                "boot-to-agent-ready: {:.1} ms (VM built in {:.1} ms; guest uptime at ready {} ms)",
                vm.times.agent_ready.as_secs_f64() * 1e3,
                vm.times.vm_started.as_secs_f64() * 1e3,
                vm.times.guest_uptime.as_millis()
            );
            println!("{mem}");
            let reason = vm.shutdown(Duration::from_secs(10));
            println!("shut down: {reason:?}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// This process's resident memory split into the VMM's own pages and guest
/// RAM (the memfd, which /proc counts as shared memory).
fn vmm_memory() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let (rss, anon, file, shmem) = (
        field("VmRSS:"),
        field("RssAnon:"),
        field("RssFile:"),
        field("RssShmem:"),
    );
    format!(
        "vmm memory: rss={rss}KiB vmm={}KiB guest={shmem}KiB",
        anon + file
    )
}
