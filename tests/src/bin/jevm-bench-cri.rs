//! `hack/bench cri`: pods through Kubernetes' CRI, runc against jevm, in one
//! run, against the private containerd of `hack/containerd-env` (CRI plugin,
//! bridge CNI, this process in the node's network namespace).
//!
//! What is measured, and between which points (all clocks are this
//! process's monotonic clock unless said otherwise):
//!
//! 1. **Pod start to first byte.** A pod whose one container is a busybox
//!    listener that answers every connection with a word
//!    (`nc -ll -p 8080 -e echo jevm-bench`). Stages, each from just before
//!    the call to its answer: `RunPodSandbox` (followed by the verbose
//!    `PodSandboxStatus` that gives the pod IP: that call is timed again on
//!    its own afterwards and reported, it is a few ms), `CreateContainer`,
//!    `StartContainer`; then *first byte*: from `StartContainer`'s answer to
//!    the first byte of the answer read by this process over TCP from the
//!    pod IP (connect attempts of at most 250 ms each, 2 ms apart while
//!    refused; when the first refusal came is reported: the pod IP answers
//!    then, only the listener is not up yet). Total: from just before
//!    `RunPodSandbox` to that byte. One warm-up pod per runtime first
//!    (jevm's builds the template), reported apart; then RUNS rounds, each
//!    round one pod per runtime, the order flipped every round. Every pod
//!    is removed (not timed) before the next.
//! 2. **Throughput over the pod's network.** One pod per runtime listening
//!    on two ports. Pod→node: this process listens on the bridge's address
//!    (the gateway, in the node netns); it connects to the pod's trigger
//!    port, whose handler runs `nc GATEWAY PORT -e dd if=/dev/zero bs=64k
//!    count=...` (dd writes straight into the TCP socket); timed by this
//!    receiver from the first byte it reads to EOF, the count checked.
//!    Node→pod: this process connects to the pod's sink port (`nc -ll -e sh
//!    -c 'wc -c'`), writes the bytes in 1 MiB writes, shuts its side down
//!    and waits for the pod's `wc -c` answer (the pod has read everything);
//!    timed from just before the first write to that answer, the count
//!    checked. One warm-up transfer each way per runtime, then TPUT_RUNS
//!    rounds, order flipped every round. The node-side veth's counters
//!    give the bytes per frame (whole 64 KiB segments or MTU-sized frames).
//! 3. **Idle pods' host memory.** IDLE_PODS pods of one runtime at once
//!    (`sleep` each), then SETTLE seconds idle; per pod the shim process
//!    (found by `-id <sandbox id>` on its command line) and all its
//!    descendants (runc: pause and sleep; jevm: none, the VMM and guest RAM
//!    are the shim), `/proc/<pid>/smaps_rollup` summed. MemAvailable
//!    (median of three reads a second apart) read SETTLE seconds after the
//!    previous set was removed, before the first pod, and again after the
//!    settle; its drop divided by the pods. runc's set first, removed, then
//!    jevm's.
//! 4. **The shim's own breakdown** of every measured jevm pod from
//!    part 1: the `jevm timings:` lines the shim logs (containerd copies
//!    them into its log), for the sandbox's create→start (shim start,
//!    template lookup, network, clone) and the container's.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use jevm_tests::cri::{ContainerSpec, Cri, CriEnv, Pod, PodSpec, JEVM, RUNC};

const ANSWER_PORT: u16 = 8080;
const ANSWER: &str = "jevm-bench";
const SINK_PORT: u16 = 8081;
const SOURCE_PORT: u16 = 8083;
const MIB: f64 = 1024.0 * 1024.0;

struct Args {
    runs: usize,
    tput_runs: usize,
    mib: u64,
    idle_pods: usize,
    settle: Duration,
    only: Vec<String>,
}

const USAGE: &str = "usage: jevm-bench-cri [--runs N] [--tput-runs N] [--mib MiB] [--idle-pods N] \
                     [--settle SECS] [--only start,tput,mem]   (under hack/containerd-env)";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        runs: 10,
        tput_runs: 3,
        mib: 256,
        idle_pods: 5,
        settle: Duration::from_secs(10),
        only: vec!["start".into(), "tput".into(), "mem".into()],
    };
    let mut a = std::env::args().skip(1);
    while let Some(k) = a.next() {
        let mut v = || a.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--runs" => args.runs = v()?.parse()?,
            "--tput-runs" => args.tput_runs = v()?.parse()?,
            "--mib" => args.mib = v()?.parse()?,
            "--idle-pods" => args.idle_pods = v()?.parse()?,
            "--settle" => args.settle = Duration::from_secs(v()?.parse()?),
            "--only" => args.only = v()?.split(',').map(str::to_string).collect(),
            _ => bail!("{USAGE}"),
        }
    }
    ensure!(
        args.runs >= 1 && args.tput_runs >= 1 && args.idle_pods >= 1,
        "{USAGE}"
    );
    Ok(args)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median, p90 (nearest rank), min, max.
#[derive(Debug, Clone, Copy)]
struct Summary {
    median: f64,
    p90: f64,
    min: f64,
    max: f64,
}

fn summary(v: &[f64]) -> Summary {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        let nan = f64::NAN;
        return Summary {
            median: nan,
            p90: nan,
            min: nan,
            max: nan,
        };
    }
    s.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    let rank = ((0.9 * n as f64).ceil() as usize).clamp(1, n);
    Summary {
        median,
        p90: s[rank - 1],
        min: s[0],
        max: s[n - 1],
    }
}

fn median(v: &[f64]) -> f64 {
    summary(v).median
}

/// Round r's order of the runtimes: runc first in even rounds.
fn order(round: usize) -> [&'static str; 2] {
    if round.is_multiple_of(2) {
        [RUNC, JEVM]
    } else {
        [JEVM, RUNC]
    }
}

fn pod_ip(pod: &Pod<'_>) -> Result<Ipv4Addr> {
    let ip = pod
        .ip
        .as_deref()
        .with_context(|| format!("{}: pod {} has no IP", pod.handler, pod.spec.name))?;
    Ok(ip.parse()?)
}

fn remove(pod: Pod<'_>) {
    let what = format!("{} pod {}", pod.handler, pod.spec.name);
    let left = pod.remove();
    if !left.is_empty() {
        eprintln!("!!! {what} left behind: {}", left.join("; "));
    }
}

// ---------------------------------------------------------------- part 1

#[derive(Debug, Clone)]
struct StartRun {
    handler: &'static str,
    sandbox: String,
    container: String,
    run_pod: Duration,
    create: Duration,
    start: Duration,
    first_byte: Duration,
    total: Duration,
    /// The verbose PodSandboxStatus call alone, timed after the run.
    status_call: Duration,
    /// From StartContainer's answer to the first refused connect (the pod
    /// IP answers, nothing listens yet), if any was refused.
    first_refused: Option<Duration>,
    refused: usize,
    timeouts: usize,
}

/// Connects to `addr` until it answers with a byte; returns when that byte
/// was read, when the first attempt was refused, and how many attempts were
/// refused / timed out.
fn first_byte(
    addr: SocketAddr,
    deadline: Instant,
) -> Result<(Instant, Option<Instant>, usize, usize)> {
    let (mut refused, mut timeouts) = (0, 0);
    let mut first_refused = None;
    let mut last = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(250)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut b = [0u8; 1];
                match s.read(&mut b) {
                    Ok(1) if b[0] == ANSWER.as_bytes()[0] => {
                        return Ok((Instant::now(), first_refused, refused, timeouts))
                    }
                    Ok(1) => bail!("{addr} answered {:?}, not {ANSWER:?}", b[0] as char),
                    Ok(_) => last = "connected, closed without a byte".into(),
                    Err(e) => last = format!("read: {e}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                timeouts += 1;
                last = format!("connect: {e}");
                continue;
            }
            Err(e) => {
                if e.kind() == std::io::ErrorKind::ConnectionRefused && first_refused.is_none() {
                    first_refused = Some(Instant::now());
                }
                refused += 1;
                last = format!("connect: {e}");
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("{addr} sent no byte in time ({last})")
}

fn start_run(cri: &Cri, handler: &'static str) -> Result<StartRun> {
    let spec = PodSpec::new("bench-fb", handler);
    let cmd = [
        "nc",
        "-ll",
        "-p",
        &ANSWER_PORT.to_string(),
        "-e",
        "echo",
        ANSWER,
    ]
    .map(str::to_string)
    .to_vec();
    let container = ContainerSpec {
        name: "answer".into(),
        command: cmd,
        ..Default::default()
    };
    let t0 = Instant::now();
    let pod = cri
        .run_pod(handler, &spec)
        .map_err(|e| anyhow!("{handler}: RunPodSandbox: {e:?}"))?;
    let t1 = Instant::now();
    let cid = pod
        .create(&container)
        .map_err(|e| anyhow!("{handler}: CreateContainer: {e:?}"))?;
    let t2 = Instant::now();
    pod.start(&cid)
        .map_err(|e| anyhow!("{handler}: StartContainer: {e:?}"))?;
    let t3 = Instant::now();
    let addr = SocketAddr::from((pod_ip(&pod)?, ANSWER_PORT));
    let (t4, first_refused, refused, timeouts) = first_byte(addr, t3 + Duration::from_secs(120))
        .with_context(|| format!("{handler}: first byte"))?;
    let ts = Instant::now();
    cri.pod_status(&pod.id)
        .map_err(|e| anyhow!("{handler}: PodSandboxStatus: {e:?}"))?;
    let status_call = ts.elapsed();
    let sandbox = pod.id.clone();
    remove(pod);
    Ok(StartRun {
        handler,
        sandbox,
        container: cid,
        run_pod: t1 - t0,
        create: t2 - t1,
        start: t3 - t2,
        first_byte: t4 - t3,
        total: t4 - t0,
        status_call,
        first_refused: first_refused.map(|t| t - t3),
        refused,
        timeouts,
    })
}

fn print_run(label: &str, r: &StartRun) {
    println!(
        "  {label:8} {:4}: RunPodSandbox {:8.1}  Create {:8.1}  Start {:8.1}  first byte {:8.1}  total {:8.1} ms   (status call {:.1} ms; first refused connect at Start+{:.0} ms; connects refused {}, timed out {})",
        r.handler,
        ms(r.run_pod),
        ms(r.create),
        ms(r.start),
        ms(r.first_byte),
        ms(r.total),
        ms(r.status_call),
        r.first_refused.map_or(f64::NAN, ms),
        r.refused,
        r.timeouts
    );
}

fn bench_start(cri: &Cri, a: &Args) -> Result<(Vec<StartRun>, Vec<StartRun>)> {
    println!("## 1. pod start to first byte");
    println!("raw (ms):");
    let mut warm = Vec::new();
    for h in [RUNC, JEVM] {
        let r = start_run(cri, h)?;
        print_run("warm-up", &r);
        warm.push(r);
    }
    let mut runs = Vec::new();
    for round in 0..a.runs {
        for h in order(round) {
            let r = start_run(cri, h)?;
            print_run(&format!("run {}", round + 1), &r);
            runs.push(r);
        }
    }
    Ok((warm, runs))
}

/// One stage of a [`StartRun`].
type Stage = fn(&StartRun) -> Duration;

fn report_start(a: &Args, warm: &[StartRun], runs: &[StartRun]) {
    println!();
    println!(
        "pod start to first byte: {} pods per runtime, alternated (order flipped each round), after one warm-up each",
        a.runs
    );
    let col = |h: &str, f: Stage| -> Vec<f64> {
        runs.iter()
            .filter(|r| r.handler == h)
            .map(|r| ms(f(r)))
            .collect()
    };
    println!("| stage (median ms) | runc | jevm | jevm/runc |");
    println!("|---|---|---|---|");
    let stages: [(&str, Stage); 5] = [
        ("RunPodSandbox (+status)", |r| r.run_pod),
        ("CreateContainer", |r| r.create),
        ("StartContainer", |r| r.start),
        ("StartContainer → first byte", |r| r.first_byte),
        ("verbose PodSandboxStatus alone", |r| r.status_call),
    ];
    for (name, f) in stages {
        let (r, j) = (median(&col(RUNC, f)), median(&col(JEVM, f)));
        println!("| {name} | {r:.1} | {j:.1} | {:.2} |", j / r);
    }
    let (r, j) = (
        summary(&col(RUNC, |r| r.total)),
        summary(&col(JEVM, |r| r.total)),
    );
    println!(
        "| **total** RunPodSandbox → first byte | {:.1} | {:.1} | **{:.2}** |",
        r.median,
        j.median,
        j.median / r.median
    );
    for (h, s) in [(RUNC, r), (JEVM, j)] {
        println!(
            "total {h}: median {:.1}  p90 {:.1}  min {:.1}  max {:.1} ms",
            s.median, s.p90, s.min, s.max
        );
    }
    for h in [RUNC, JEVM] {
        let rs: Vec<&StartRun> = runs.iter().filter(|r| r.handler == h).collect();
        let v: Vec<f64> = rs.iter().filter_map(|r| r.first_refused).map(ms).collect();
        println!(
            "{h}: {} of {} pods refused a connect before answering; the first refusal (the pod IP answers, nothing listens yet) came {:.0} ms (median) after StartContainer answered",
            v.len(),
            rs.len(),
            median(&v)
        );
    }
    for w in warm {
        println!(
            "warm-up {} (not counted{}): total {:.1} ms, RunPodSandbox {:.1} ms",
            w.handler,
            if w.handler == JEVM {
                "; builds the template"
            } else {
                ""
            },
            ms(w.total),
            ms(w.run_pod)
        );
    }
}

// ---------------------------------------------------------------- part 2

fn connect_retry(addr: SocketAddr, within: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + within;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => bail!("connect {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

struct TputPod<'a> {
    pod: Pod<'a>,
    ip: Ipv4Addr,
    listener: TcpListener,
}

fn tput_pod<'a>(cri: &'a Cri, handler: &str, bytes: u64) -> Result<TputPod<'a>> {
    let pod = cri
        .run_pod(handler, &PodSpec::new("bench-tput", handler))
        .map_err(|e| anyhow!("{handler}: RunPodSandbox: {e:?}"))?;
    let ip = pod_ip(&pod)?;
    // The bridge (and its address) exists once CNI ran for a pod.
    let gw = cri.env.gateway;
    let listener = TcpListener::bind((gw, 0)).with_context(|| format!("listen on {gw}"))?;
    let port = listener.local_addr()?.port();
    let count = bytes / 65536;
    let script = format!(
        "nc -ll -p {SINK_PORT} -e sh -c 'wc -c' & \
         exec nc -ll -p {SOURCE_PORT} -e sh -c 'exec nc {gw} {port} -e dd if=/dev/zero bs=65536 count={count} 2>/dev/null'"
    );
    let c = ContainerSpec::new("tput", &["sh", "-c", &script]);
    pod.run(&c)
        .map_err(|e| anyhow!("{handler}: container: {e:?}"))?;
    Ok(TputPod { pod, ip, listener })
}

/// Pod→node: MiB/s from the first byte received to EOF.
fn pod_to_node(t: &TputPod<'_>, bytes: u64) -> Result<f64> {
    let _trigger = connect_retry(
        SocketAddr::from((t.ip, SOURCE_PORT)),
        Duration::from_secs(60),
    )?;
    t.listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn = loop {
        match t.listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => bail!("the pod did not connect to the node: {e}"),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut buf = vec![0u8; 1 << 20];
    let first = conn.read(&mut buf)?;
    let t0 = Instant::now();
    ensure!(first > 0, "the pod sent nothing");
    let mut total = first as u64;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let dt = t0.elapsed();
    ensure!(total == bytes, "received {total} bytes, expected {bytes}");
    Ok((total - first as u64) as f64 / MIB / dt.as_secs_f64())
}

/// Node→pod: MiB/s from just before the first write to the pod's count.
fn node_to_pod(t: &TputPod<'_>, bytes: u64) -> Result<f64> {
    let mut s = connect_retry(SocketAddr::from((t.ip, SINK_PORT)), Duration::from_secs(60))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let buf = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let dt = t0.elapsed();
    let got: u64 = reply
        .trim()
        .parse()
        .with_context(|| format!("the pod's count: {reply:?}"))?;
    ensure!(
        got == bytes,
        "the pod counted {got} bytes, expected {bytes}"
    );
    Ok(bytes as f64 / MIB / dt.as_secs_f64())
}

type Rates = HashMap<(&'static str, &'static str), Vec<f64>>;

/// Counters of the node-side veths, from `/proc/net/dev` (this process's
/// netns, the node's; /sys/class/net shows the netns sysfs was mounted in):
/// name → [rx_bytes, rx_packets, tx_bytes, tx_packets].
fn veth_counters() -> HashMap<String, [u64; 4]> {
    let text = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let name = name.trim();
            if !name.starts_with("veth") {
                return None;
            }
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets ...
            (f.len() >= 10).then(|| (name.to_string(), [f[0], f[1], f[8], f[9]]))
        })
        .collect()
}

/// Bytes per frame on the busiest veth between two snapshots, received
/// from the pod (`from_pod`) or sent to it: shows whether 64 KiB TCP
/// segments crossed whole (GSO/TSO) or as MTU-sized frames.
fn bytes_per_frame(
    before: &HashMap<String, [u64; 4]>,
    after: &HashMap<String, [u64; 4]>,
    from_pod: bool,
) -> Option<f64> {
    let i = if from_pod { 0 } else { 2 };
    after
        .iter()
        .filter_map(|(n, a)| {
            let b = before.get(n)?;
            Some((a[i] - b[i], a[i + 1] - b[i + 1]))
        })
        .max_by_key(|(bytes, _)| *bytes)
        .filter(|(_, frames)| *frames > 0)
        .map(|(bytes, frames)| bytes as f64 / frames as f64)
}

fn bench_tput(cri: &Cri, a: &Args) -> Result<Rates> {
    println!();
    println!("## 2. throughput, {} MiB per transfer", a.mib);
    let bytes = a.mib * 1024 * 1024;
    let pods = [
        (RUNC, tput_pod(cri, RUNC, bytes)?),
        (JEVM, tput_pod(cri, JEVM, bytes)?),
    ];
    let get = |h: &str| &pods.iter().find(|(n, _)| *n == h).expect("pod").1;
    let mut rates: Rates = HashMap::new();
    println!("raw (MiB/s):");
    for round in 0..=a.tput_runs {
        let label = if round == 0 {
            "warm-up".to_string()
        } else {
            format!("run {round}")
        };
        for h in order(round) {
            let t = get(h);
            let c0 = veth_counters();
            let up = pod_to_node(t, bytes).with_context(|| format!("{h}: pod→node"))?;
            let c1 = veth_counters();
            let down = node_to_pod(t, bytes).with_context(|| format!("{h}: node→pod"))?;
            let c2 = veth_counters();
            let (fu, fd) = (
                bytes_per_frame(&c0, &c1, true).unwrap_or(f64::NAN),
                bytes_per_frame(&c1, &c2, false).unwrap_or(f64::NAN),
            );
            println!(
                "  {label:8} {h:4}: pod→node {up:8.1}   node→pod {down:8.1}   (bytes per frame on the node-side veth: {fu:.0} / {fd:.0})"
            );
            if round > 0 {
                rates.entry((h, "pod→node")).or_default().push(up);
                rates.entry((h, "node→pod")).or_default().push(down);
                rates.entry((h, "pod→node frame")).or_default().push(fu);
                rates.entry((h, "node→pod frame")).or_default().push(fd);
            }
        }
    }
    for (_, t) in pods {
        remove(t.pod);
    }
    Ok(rates)
}

fn report_tput(a: &Args, rates: &Rates) {
    println!();
    println!(
        "throughput, {} MiB per transfer, median of {} per runtime and direction (after one warm-up)",
        a.mib, a.tput_runs
    );
    println!("| direction | runc MiB/s | jevm MiB/s | jevm/runc |");
    println!("|---|---|---|---|");
    for dir in ["pod→node", "node→pod"] {
        let r = median(&rates[&(RUNC, dir)]);
        let j = median(&rates[&(JEVM, dir)]);
        println!("| {dir} | {r:.1} | {j:.1} | **{:.2}** |", j / r);
    }
    for dir in ["pod→node frame", "node→pod frame"] {
        println!(
            "{dir}: bytes per frame on the node-side veth, median: runc {:.0}, jevm {:.0}",
            median(&rates[&(RUNC, dir)]),
            median(&rates[&(JEVM, dir)])
        );
    }
}

// ---------------------------------------------------------------- part 3

fn mem_available_kib() -> Result<u64> {
    let m = std::fs::read_to_string("/proc/meminfo")?;
    m.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("MemAvailable in /proc/meminfo")
}

fn ppid_and_comm(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, tail) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let ppid = tail.split_whitespace().nth(1)?.parse().ok()?;
    Some((ppid, comm))
}

/// The shim serving `sandbox` in our containerd and all its descendants:
/// (pid, comm).
fn pod_processes(env: &CriEnv, sandbox: &str) -> Result<Vec<(u32, String)>> {
    let all = jevm_tests::ctr::processes();
    let shim = all
        .iter()
        .find(|(_, a)| {
            let has = |f: &str, v: &str| a.windows(2).any(|w| w[0] == f && w[1] == v);
            a.first().is_some_and(|p| p.contains("containerd-shim"))
                && has("-address", &env.address)
                && has("-id", sandbox)
        })
        .map(|(p, _)| *p)
        .with_context(|| format!("no shim for sandbox {sandbox}"))?;
    let out = jevm_tests::ctr::process_tree(shim)
        .into_iter()
        .map(|p| (p, ppid_and_comm(p).map(|x| x.1).unwrap_or_default()))
        .collect();
    Ok(out)
}

#[derive(Debug, Default, Clone)]
struct PodMem {
    procs: Vec<String>,
    pss: f64,
    rss: f64,
    private_dirty: f64,
    private_clean: f64,
    shared: f64,
}

impl PodMem {
    fn private(&self) -> f64 {
        self.private_dirty + self.private_clean
    }
    /// The PSS of the shared pages: PSS minus the private pages.
    fn pss_shared(&self) -> f64 {
        self.pss - self.private()
    }
}

struct MemResult {
    pods: Vec<PodMem>,
    avail_drop_per_pod_mib: f64,
}

/// MemAvailable, the median of three reads a second apart.
fn mem_available_settled() -> Result<f64> {
    let mut v = Vec::new();
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        v.push(mem_available_kib()? as f64);
    }
    Ok(median(&v))
}

fn idle_memory(cri: &Cri, handler: &str, a: &Args) -> Result<MemResult> {
    std::thread::sleep(a.settle);
    let before = mem_available_settled()?;
    let mut pods = Vec::new();
    for _ in 0..a.idle_pods {
        let pod = cri
            .run_pod(handler, &PodSpec::new("bench-idle", handler))
            .map_err(|e| anyhow!("{handler}: RunPodSandbox: {e:?}"))?;
        pod.run(&ContainerSpec::new("idle", &["sleep", "1000000"]))
            .map_err(|e| anyhow!("{handler}: container: {e:?}"))?;
        pods.push(pod);
    }
    std::thread::sleep(a.settle);
    let mut out = Vec::new();
    for pod in &pods {
        let mut m = PodMem::default();
        for (pid, comm) in pod_processes(&cri.env, &pod.id)? {
            let s =
                jevm_tests::smaps_rollup(pid).with_context(|| format!("smaps_rollup of {pid}"))?;
            let f = |k: &str| s.get(k).copied().unwrap_or(0) as f64 / 1024.0;
            m.pss += f("Pss");
            m.rss += f("Rss");
            m.private_dirty += f("Private_Dirty");
            m.private_clean += f("Private_Clean");
            m.shared += f("Shared_Clean") + f("Shared_Dirty");
            m.procs.push(comm);
        }
        out.push(m);
    }
    let after = mem_available_settled()?;
    for pod in pods {
        remove(pod);
    }
    Ok(MemResult {
        pods: out,
        avail_drop_per_pod_mib: (before - after) / 1024.0 / a.idle_pods as f64,
    })
}

fn bench_mem(cri: &Cri, a: &Args) -> Result<Vec<(&'static str, MemResult)>> {
    println!();
    println!(
        "## 3. idle pods' host memory, {} pods per runtime at once, {} s idle",
        a.idle_pods,
        a.settle.as_secs()
    );
    println!("raw (MiB, per pod):");
    let mut res = Vec::new();
    for h in [RUNC, JEVM] {
        let r = idle_memory(cri, h, a)?;
        for (i, p) in r.pods.iter().enumerate() {
            println!(
                "  {h:4} pod {i}: PSS {:6.1}  RSS {:6.1}  Private_Dirty {:6.1}  Private_Clean {:5.1}  Shared (RSS) {:6.1}  PSS of shared {:5.1}   [{}]",
                p.pss,
                p.rss,
                p.private_dirty,
                p.private_clean,
                p.shared,
                p.pss_shared(),
                p.procs.join(", ")
            );
        }
        println!(
            "  {h:4} MemAvailable drop per pod: {:.1}",
            r.avail_drop_per_pod_mib
        );
        res.push((h, r));
    }
    Ok(res)
}

/// One figure of a [`PodMem`].
type MemField = fn(&PodMem) -> f64;

fn report_mem(a: &Args, res: &[(&'static str, MemResult)]) {
    println!();
    println!(
        "idle per-pod host memory, {} pods per runtime at once (median over the pods, MiB)",
        a.idle_pods
    );
    let rows: [(&str, MemField); 6] = [
        ("PSS", |p| p.pss),
        ("Private_Dirty", |p| p.private_dirty),
        ("private (Private_Dirty + Private_Clean)", |p| p.private()),
        ("shared pages, RSS", |p| p.shared),
        ("shared pages, PSS (PSS − private)", |p| p.pss_shared()),
        ("RSS", |p| p.rss),
    ];
    println!("| per pod | runc | jevm | jevm/runc |");
    println!("|---|---|---|---|");
    let get = |h: &str| &res.iter().find(|(n, _)| *n == h).expect("result").1;
    for (name, f) in rows {
        let r = median(&get(RUNC).pods.iter().map(f).collect::<Vec<_>>());
        let j = median(&get(JEVM).pods.iter().map(f).collect::<Vec<_>>());
        println!("| {name} | {r:.1} | {j:.1} | {:.2} |", j / r);
    }
    let (r, j) = (
        get(RUNC).avail_drop_per_pod_mib,
        get(JEVM).avail_drop_per_pod_mib,
    );
    println!(
        "| MemAvailable drop / pods | {r:.1} | {j:.1} | {:.2} |",
        j / r
    );
    for (h, m) in res {
        if let Some(p) = m.pods.first() {
            println!("{h}: processes per pod: {}", p.procs.join(", "));
        }
    }
}

// ---------------------------------------------------------------- part 4

/// `jevm timings:` lines of the shim log: container id → phase → ms.
fn shim_timings(log: &PathBuf) -> HashMap<String, HashMap<String, f64>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(i) = line.find("jevm timings:") else {
            continue;
        };
        let mut cid = None;
        let mut phases = HashMap::new();
        for word in line[i..].split_whitespace() {
            let Some((k, v)) = word.trim_end_matches('"').split_once('=') else {
                continue;
            };
            if k == "container" {
                cid = Some(v.to_string());
            } else if let (Some(k), Ok(v)) = (k.strip_suffix("_ms"), v.parse::<f64>()) {
                phases.insert(k.to_string(), v);
            }
        }
        if let Some(c) = cid {
            out.insert(c, phases);
        }
    }
    out
}

fn report_timings(warm: &[StartRun], runs: &[StartRun]) {
    println!();
    let base = std::env::var("JEVM_CTR_BASE").unwrap_or_default();
    let log = PathBuf::from(base).join("containerd.log");
    let t = shim_timings(&log);
    let jevm: Vec<&StartRun> = runs.iter().filter(|r| r.handler == JEVM).collect();
    const PHASES: [&str; 9] = [
        "shim_start",
        "template_lookup",
        "network",
        "clone",
        "virtiofs_share",
        "agent_create",
        "stdio",
        "process_running",
        "total",
    ];
    for (what, ids) in [
        (
            "sandbox (pause) create→start",
            jevm.iter().map(|r| r.sandbox.as_str()).collect::<Vec<_>>(),
        ),
        (
            "container create→start",
            jevm.iter().map(|r| r.container.as_str()).collect(),
        ),
    ] {
        let found: Vec<&HashMap<String, f64>> = ids.iter().filter_map(|id| t.get(*id)).collect();
        println!(
            "jevm shim timings, {what}: {} of {} pods have a line in {}",
            found.len(),
            ids.len(),
            log.display()
        );
        if found.is_empty() {
            continue;
        }
        println!("| phase | median ms | min | max |");
        println!("|---|---|---|---|");
        for p in PHASES {
            let v: Vec<f64> = found.iter().filter_map(|m| m.get(p).copied()).collect();
            if v.is_empty() {
                continue;
            }
            let s = summary(&v);
            println!("| {p} | {:.1} | {:.1} | {:.1} |", s.median, s.min, s.max);
        }
        println!(
            "raw {what} (clone_ms, network_ms): {}",
            found
                .iter()
                .map(|m| format!(
                    "({}, {})",
                    m.get("clone").map_or("-".into(), |v| format!("{v:.1}")),
                    m.get("network").map_or("-".into(), |v| format!("{v:.1}"))
                ))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    for w in warm.iter().filter(|w| w.handler == JEVM) {
        if let Some(m) = t.get(&w.sandbox) {
            let g = |k: &str| m.get(k).map_or("-".into(), |v| format!("{v:.1}"));
            println!(
                "jevm warm-up sandbox (template built): template_lookup_ms={} clone_ms={} network_ms={} total_ms={}",
                g("template_lookup"),
                g("clone"),
                g("network"),
                g("total")
            );
        }
    }
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let env = CriEnv::from_env().context(
        "no CRI environment (JEVM_CTR_*/JEVM_CRI_* unset): run under hack/containerd-env (hack/bench cri)",
    )?;
    let cri = Cri::connect(&env);
    println!(
        "# jevm-bench-cri: runc vs jevm through containerd's CRI, node netns {}, pod subnet {}",
        env.node_netns, env.subnet
    );
    if a.only.iter().any(|o| o == "start") {
        let (warm, runs) = bench_start(&cri, &a)?;
        report_start(&a, &warm, &runs);
        report_timings(&warm, &runs);
    }
    if a.only.iter().any(|o| o == "tput") {
        let rates = bench_tput(&cri, &a)?;
        report_tput(&a, &rates);
    }
    if a.only.iter().any(|o| o == "mem") {
        let res = bench_mem(&cri, &a)?;
        report_mem(&a, &res);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_nearest_rank() {
        let s = summary(&[5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
        assert_eq!((s.median, s.p90, s.min, s.max), (5.5, 9.0, 1.0, 10.0));
    }
}
