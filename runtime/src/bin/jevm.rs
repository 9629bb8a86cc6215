//! `jevm`: boot a microVM by hand, and check whether this host can.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use jevm_runtime::clone::{build_template, clone_from, prepare_threads, prepare_vm, CloneOptions};
use jevm_runtime::microvm::{BootConfig, MicroVm};
use jevm_runtime::template::{TemplateKey, TemplateSpec, TemplateStore};
use jevm_runtime::vmm::check::check_host;

#[derive(Parser)]
#[command(name = "jevm", version, about = "jevm microVM runtime tool")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// What a VM is booted from, for `boot` and `template create`.
#[derive(clap::Args)]
struct GuestArgs {
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
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a microVM, wait for its agent, print the agent version and the
    /// boot-to-agent-ready time, and shut it down.
    Boot {
        #[command(flatten)]
        guest: GuestArgs,
        /// Seconds to wait for the agent.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Tell whether this host's /dev/kvm can run jevm guests, and if not, why.
    Check,
    /// Manage templates: booted-and-saved VMs that clones start from.
    Template {
        #[command(subcommand)]
        cmd: TemplateCmd,
        /// Where templates live.
        #[arg(long, global = true, default_value = jevm_runtime::template::DEFAULT_ROOT)]
        state_dir: PathBuf,
    },
    /// Start clones of a template, print each one's clone-to-agent-ready
    /// time, and shut them down.
    Clone {
        /// The template's key (see `jevm template list`).
        #[arg(long)]
        template: String,
        #[arg(long, default_value = jevm_runtime::template::DEFAULT_ROOT)]
        state_dir: PathBuf,
        #[arg(long, default_value = "/run/jevm")]
        run_dir: PathBuf,
        /// How many clones, one after the other.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Keep each clone running this many milliseconds before shutting it
        /// down (to look at its memory).
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// A host directory each clone's virtio-fs device serves; the agent
        /// mounts it at /run/jevm/shared.
        #[arg(long)]
        share: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Create the template for this kernel/initramfs/size (or find it) and
    /// print its key.
    Create {
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// List templates and whether each is usable.
    List,
    /// Remove a template.
    Rm { key: String },
    /// Check a template's memory file against the checksum taken when it was made.
    Verify { key: String },
}

fn main() -> ExitCode {
    let started = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Cli::parse(), started) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("jevm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `started`: when `main` began, for the phases of `jevm clone`'s start.
fn run(cli: Cli, started: Instant) -> anyhow::Result<ExitCode> {
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
        Cmd::Template { cmd, state_dir } => template(cmd, &state_dir),
        Cmd::Clone {
            template,
            state_dir,
            run_dir,
            count,
            hold_ms,
            share,
        } => {
            let store = TemplateStore::new(&state_dir);
            let key = TemplateKey::parse(&template)?;
            // As a shim does before its create: the KVM VM is made on a
            // thread while the template is opened, the jailed threads
            // while the clone is set up.
            prepare_vm();
            let t = store.open(&key)?;
            let opened = started.elapsed();
            for i in 0..count {
                if i > 0 {
                    prepare_vm();
                }
                prepare_threads(usize::from(t.manifest.spec.vcpus))?;
                let cloning = started.elapsed();
                let vm = clone_from(
                    &t,
                    &run_dir,
                    &CloneOptions {
                        hostname: format!("jevm-clone-{i}"),
                        share: share.clone(),
                        network: None,
                        ..Default::default()
                    },
                )?;
                // From `main`: where a process's own start goes, which a
                // shim has behind it when its create arrives.
                println!(
                    "clone {i}: clone-to-agent-ready {:.2} ms (VM restored in {:.2} ms; \
                     from main: template opened {:.2} ms, clone started {:.2} ms)",
                    vm.times.agent_ready.as_secs_f64() * 1e3,
                    vm.times.vm_started.as_secs_f64() * 1e3,
                    opened.as_secs_f64() * 1e3,
                    cloning.as_secs_f64() * 1e3,
                );
                if hold_ms > 0 {
                    println!("{}", vmm_memory());
                    std::thread::sleep(Duration::from_millis(hold_ms));
                }
                vm.shutdown(Duration::from_secs(10));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Boot {
            guest:
                GuestArgs {
                    kernel,
                    initrd,
                    vcpus,
                    mem,
                    cmdline,
                    run_dir,
                },
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

fn template(cmd: TemplateCmd, state_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let store = TemplateStore::new(state_dir);
    match cmd {
        TemplateCmd::Create {
            guest:
                GuestArgs {
                    kernel,
                    initrd,
                    vcpus,
                    mem,
                    cmdline,
                    run_dir,
                },
        } => {
            let spec = TemplateSpec {
                kernel,
                initrd,
                cmdline,
                vcpus,
                mem_mib: mem,
            };
            let t0 = std::time::Instant::now();
            let t = store.get_or_create(&spec, |staging| {
                build_template(&spec, &run_dir, staging, |_| Ok(()))
            })?;
            println!("{}", t.key.as_str());
            eprintln!(
                "template {} ready in {:.0} ms at {}",
                t.key.as_str(),
                t0.elapsed().as_secs_f64() * 1e3,
                t.dir.display()
            );
        }
        TemplateCmd::List => {
            for info in store.list()? {
                println!("{info}");
            }
        }
        TemplateCmd::Rm { key } => store.remove(&key)?,
        TemplateCmd::Verify { key } => {
            store.open(&TemplateKey::parse(&key)?)?.verify_memory()?;
            println!("template {key}: memory checksum ok");
        }
    }
    Ok(ExitCode::SUCCESS)
}
