//! Pods through Kubernetes' CRI, as the kubelet makes them: containerd's
//! own CRI plugin with a real CNI network (bridge + host-local + loopback in
//! the node's network namespace of `hack/containerd-env`). Every scenario
//! runs under the runc handler and under the jevm handler as two tests,
//! `SCENARIO::runc` and `SCENARIO::jevm`, so a failure names its runtime;
//! with `JEVM_E2E_RUNC_ONLY=1` the jevm ones report themselves SKIPPED.
//! Every pod is removed at the end of its test and must leave nothing: not
//! listed, no IP held by host-local, no pinned network namespace, no shim
//! (`cri_after_all` checks the whole run).

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use jevm_tests::api::CallError;
use jevm_tests::cri::{remove_clean, run_pod, Cri, ExecOutput, PodNetwork, PodSpec, JEVM, RUNC};
use jevm_tests::cri_env_or_skip;

/// CRI's own time limit for one exec (the command is killed after it).
const EXEC: Duration = Duration::from_secs(120);
/// How long a listener in a pod may take to be up, and a connection to go
/// through. Generous: in the emulated KVM test host a jevm pod has taken
/// seconds to start, and its first one builds the template.
const NET_WAIT: Duration = Duration::from_secs(90);
/// A container that does nothing until killed.
const SLEEP: &[&str] = &["sleep", "1000000"];
/// Port of the listeners inside pods.
const PORT: u16 = 8080;

/// `SCENARIO::runc` and `SCENARIO::jevm` for `fn SCENARIO(handler)`.
macro_rules! under_runc_and_jevm {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            fn runc() {
                jevm_tests::cri::timed(stringify!($scenario), jevm_tests::cri::RUNC, super::$scenario);
            }
            #[test]
            fn jevm() {
                if jevm_tests::cri::skip_jevm() {
                    return;
                }
                jevm_tests::cri::timed(stringify!($scenario), jevm_tests::cri::JEVM, super::$scenario);
            }
        }
    )*};
}

under_runc_and_jevm!(
    containers_of_a_pod_share_localhost_and_hostname,
    pod_ip_answers_from_the_node,
    pods_reach_each_other_by_pod_ip,
    pod_reaches_a_listener_on_the_node_gateway,
    containers_see_each_other_only_with_shared_process_namespace,
);

/// A listener that answers every connection with `word` and a newline
/// (busybox nc: `-ll` keeps listening, `-e` runs a program per connection).
fn answering(word: &str) -> Vec<String> {
    ["nc", "-ll", "-p", &PORT.to_string(), "-e", "echo", word]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A shell loop that runs `cmd` until it succeeds with some output, for up
/// to NET_WAIT: the other side may not be listening yet.
fn retrying(cmd: &str) -> String {
    format!(
        "end=$(( $(date +%s) + {} )); \
         while [ $(date +%s) -lt $end ]; do out=$({cmd}) && [ -n \"$out\" ] && {{ echo \"$out\"; exit 0; }}; sleep 1; done; \
         echo \"no answer from: {cmd}\" >&2; exit 1",
        NET_WAIT.as_secs()
    )
}

/// Connects from the node (this process) to `addr` until it answers, and
/// returns what it sent before closing.
fn read_from(addr: SocketAddr) -> Result<String, String> {
    let deadline = Instant::now() + NET_WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("read timeout");
                let mut got = String::new();
                match s.read_to_string(&mut got) {
                    Ok(_) if !got.is_empty() => return Ok(got),
                    Ok(_) => last = "connected, but nothing was sent".into(),
                    Err(e) => last = format!("read: {e}"),
                }
            }
            Err(e) => last = format!("connect: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(format!(
        "{addr} did not answer within {NET_WAIT:?} ({last})"
    ))
}

/// In a thread: accepts connections on `listener` until one sends a line,
/// then closes it (busybox nc, the client, waits for that close) and
/// returns (the line, where it came from).
fn accept_line(listener: TcpListener) -> JoinHandle<Result<(String, SocketAddr), String>> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("non-blocking");
        let deadline = Instant::now() + NET_WAIT + EXEC;
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(Duration::from_secs(30)))
                        .expect("read timeout");
                    let mut got = Vec::new();
                    let mut buf = [0u8; 256];
                    while !got.contains(&b'\n') {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    if !got.is_empty() {
                        return Ok((String::from_utf8_lossy(&got).into_owned(), peer));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        }
        Err("nothing connected and sent a line in time".to_string())
    })
}

fn assert_ok(handler: &str, what: &str, o: &ExecOutput) {
    assert_eq!(o.code, 0, "{handler}: {what}: {o:?}");
}

/// Two containers of one pod: one listens on a port, the other connects to
/// 127.0.0.1 and its message arrives (one network namespace, loopback up);
/// `hostname` in both is the sandbox's configured hostname.
fn containers_of_a_pod_share_localhost_and_hostname(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let spec = PodSpec::new("localhost", handler);
    let pod = run_pod(&cri, handler, &spec);
    let listener = pod.must_start(
        "listener",
        &[
            "sh",
            "-c",
            "nc -l -p 7070 >/tmp/got </dev/null; echo received; exec sleep 1000000",
        ],
    );
    let talker = pod.must_start("talker", SLEEP);
    let msg = format!("over-localhost-{}", spec.name);
    let send = pod.exec(
        &talker,
        &[
            "sh",
            "-c",
            &retrying(&format!("echo {msg} | nc -w 5 127.0.0.1 7070 && echo sent")),
        ],
        EXEC,
    );
    assert_ok(
        handler,
        "talker connects to 127.0.0.1:7070 (the listener container's port)",
        &send,
    );
    // nc -l writes what it got and exits when the talker closes.
    let deadline = Instant::now() + NET_WAIT;
    let got = loop {
        let got = pod.exec(&listener, &["cat", "/tmp/got"], EXEC);
        if got.stdout == format!("{msg}\n") || Instant::now() >= deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        got.stdout,
        format!("{msg}\n"),
        "{handler}: what the listener container received over localhost: {got:?} (listener log: {:?})",
        pod.log("listener")
    );
    for (name, cid) in [("listener", &listener), ("talker", &talker)] {
        let h = pod.exec(cid, &["hostname"], EXEC);
        assert_ok(handler, "hostname", &h);
        assert_eq!(
            h.stdout.trim(),
            spec.hostname,
            "{handler}: hostname in container {name} is not the pod's: {h:?}"
        );
    }
    remove_clean(pod);
}

/// With `shareProcessNamespace`, a container sees its sibling's process
/// (one PID namespace for the pod: the sandbox's); without, it sees only
/// its own.
fn containers_see_each_other_only_with_shared_process_namespace(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    for share in [true, false] {
        let mut spec = PodSpec::new("sharepid", handler);
        spec.share_pid = share;
        let pod = run_pod(&cri, handler, &spec);
        // A sleep whose argument names it, to find in the other container.
        let marker = "4242424";
        pod.must_start("sleeper", &["sleep", marker]);
        let looker = pod.must_start("looker", SLEEP);
        let deadline = Instant::now() + NET_WAIT;
        let seen = loop {
            let ps = pod.exec(
                &looker,
                &["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"],
                EXEC,
            );
            assert_ok(handler, "listing processes", &ps);
            let seen = ps.stdout.contains(&format!("sleep {marker}"));
            if seen || !share || Instant::now() >= deadline {
                break seen;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_eq!(
            seen, share,
            "{handler}: shareProcessNamespace={share}: the sibling's process seen: {seen}"
        );
        remove_clean(pod);
    }
}

/// The pod IP of PodSandboxStatus is in the CNI subnet and answers from the
/// node: this process connects to a listener in the pod and reads its word.
fn pod_ip_answers_from_the_node(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let spec = PodSpec::new("podip", handler);
    let pod = run_pod(&cri, handler, &spec);
    let ip = pod.ip();
    let prefix = env.subnet.trim_end_matches(".0/24");
    assert!(
        ip.to_string().starts_with(&format!("{prefix}.")) && ip != env.gateway,
        "{handler}: pod IP {ip} is not a host address of the CNI subnet {}",
        env.subnet
    );
    assert!(
        env.allocated_ips().contains(&ip.to_string()),
        "{handler}: pod IP {ip} is not one host-local allocated: {:?}",
        env.allocated_ips()
    );
    // What the leak checks of remove_clean look for is there while it runs.
    let netns = pod.netns.as_ref().unwrap_or_else(|| {
        panic!("{handler}: PodSandboxStatus (verbose) names no network namespace")
    });
    assert!(
        netns.starts_with(&env.netns_dir) && netns.exists(),
        "{handler}: the pod's network namespace {} is not pinned in {}",
        netns.display(),
        env.netns_dir.display()
    );
    assert!(
        !env.shims(Some(&pod.id)).is_empty(),
        "{handler}: no shim process found for pod {}",
        pod.id
    );
    let word = format!("pod-ip-{}", spec.name);
    pod.must_start("web", &strs(&answering(&word)));
    let got = read_from(SocketAddr::from((ip, PORT)))
        .unwrap_or_else(|e| panic!("{handler}: the node reaching the pod IP: {e}"));
    assert_eq!(
        got,
        format!("{word}\n"),
        "{handler}: answer from {ip}:{PORT}"
    );
    remove_clean(pod);
}

/// Two pods of one runtime reach each other by pod IP, both ways.
fn pods_reach_each_other_by_pod_ip(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let mut pods = Vec::new();
    for side in ["a", "b"] {
        let spec = PodSpec::new(&format!("pod2pod-{side}"), handler);
        let pod = run_pod(&cri, handler, &spec);
        let word = format!("hello-from-{}", spec.name);
        let cid = pod.must_start("web", &strs(&answering(&word)));
        pods.push((pod, cid, word));
    }
    assert_ne!(
        pods[0].0.ip(),
        pods[1].0.ip(),
        "{handler}: two pods, one IP"
    );
    for (from, to) in [(0, 1), (1, 0)] {
        let (pod, cid, _) = &pods[from];
        let (target, _, word) = &pods[to];
        let o = pod.exec(
            cid,
            &[
                "sh",
                "-c",
                &retrying(&format!("nc -w 5 {} {PORT} </dev/null", target.ip())),
            ],
            EXEC,
        );
        assert_ok(
            handler,
            &format!(
                "pod {} connects to pod {} at {}",
                pod.spec.name,
                target.spec.name,
                target.ip()
            ),
            &o,
        );
        assert_eq!(
            o.stdout,
            format!("{word}\n"),
            "{handler}: answer of the other pod"
        );
    }
    for (pod, _, _) in pods {
        remove_clean(pod);
    }
}

/// A pod reaches a listener this process opens on the node, at the bridge's
/// address (the pod's gateway), and the connection comes from the pod IP.
fn pod_reaches_a_listener_on_the_node_gateway(handler: &str) {
    let env = cri_env_or_skip!();
    let cri = Cri::connect(&env);
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("listener on the node");
    let port = listener.local_addr().expect("local address").port();
    let accepted = accept_line(listener);
    let spec = PodSpec::new("togateway", handler);
    let pod = run_pod(&cri, handler, &spec);
    let cid = pod.must_start("client", SLEEP);
    let msg = format!("from-pod-{}", spec.name);
    let o = pod.exec(
        &cid,
        &[
            "sh",
            "-c",
            &retrying(&format!(
                "echo {msg} | nc -w 5 {} {port} && echo sent",
                env.gateway
            )),
        ],
        EXEC,
    );
    assert_ok(
        handler,
        &format!("pod connects to the node at {}:{port}", env.gateway),
        &o,
    );
    let (got, peer) = accepted
        .join()
        .expect("accepting thread")
        .unwrap_or_else(|e| panic!("{handler}: listener on the node: {e}"));
    assert_eq!(got, format!("{msg}\n"), "{handler}: what the node received");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(pod.ip()),
        "{handler}: the connection does not come from the pod IP"
    );
    remove_clean(pod);
}

/// Under runc a host-network pod (NamespaceOption network = NODE) shares the
/// node's network namespace: its container reaches a listener this process
/// opens on the node's 127.0.0.1. This is what jevm cannot give (below).
#[test]
fn host_network_pod_uses_the_node_network_under_runc() {
    let env = cri_env_or_skip!();
    let t = Instant::now();
    let cri = Cri::connect(&env);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listener on the node");
    let port = listener.local_addr().expect("local address").port();
    let accepted = accept_line(listener);
    let mut spec = PodSpec::new("hostnet", RUNC);
    spec.network = PodNetwork::Node;
    let pod = run_pod(&cri, RUNC, &spec);
    let cid = pod.must_start("client", SLEEP);
    let msg = format!("from-host-network-{}", spec.name);
    let o = pod.exec(
        &cid,
        &[
            "sh",
            "-c",
            &retrying(&format!(
                "echo {msg} | nc -w 5 127.0.0.1 {port} && echo sent"
            )),
        ],
        EXEC,
    );
    assert_ok(
        RUNC,
        "host-network container connects to the node's 127.0.0.1",
        &o,
    );
    let (got, _) = accepted
        .join()
        .expect("accepting thread")
        .unwrap_or_else(|e| panic!("runc: listener on the node: {e}"));
    assert_eq!(got, format!("{msg}\n"), "runc: what the node received");
    remove_clean(pod);
    eprintln!(
        "host_network_pod_uses_the_node_network_under_runc: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// Under jevm a host-network pod is refused, with an error that names the
/// cause: a VM has its own kernel and cannot share the node's network
/// namespace. Refusing at RunPodSandbox or at its first container both
/// count; running it is the failure.
#[test]
fn host_network_pod_is_refused_under_jevm() {
    if jevm_tests::cri::skip_jevm() {
        return;
    }
    let env = cri_env_or_skip!();
    let t = Instant::now();
    let cri = Cri::connect(&env);
    let mut spec = PodSpec::new("hostnet", JEVM);
    spec.network = PodNetwork::Node;
    let err = match cri.run_pod(JEVM, &spec) {
        Err(e) => e,
        Ok(pod) => match pod.start_container("client", SLEEP) {
            Err(e) => {
                remove_clean(pod);
                e
            }
            Ok(_) => panic!(
                "jevm: a host-network pod ran (RunPodSandbox and its container started); a VM cannot share the node's network namespace, so it must be refused"
            ),
        },
    };
    let message = match &err {
        CallError::Status { message, .. } => message.clone(),
        CallError::TimedOut(what) => {
            panic!("jevm: {what} timed out instead of refusing a host-network pod")
        }
    };
    let m = message.to_lowercase();
    assert!(
        ["host network", "hostnetwork", "host-network", "node's network", "node network"]
            .iter()
            .any(|s| m.contains(s)),
        "jevm: a host-network pod was refused, but the error does not name the cause (host network): {message:?}"
    );
    eprintln!(
        "host_network_pod_is_refused_under_jevm: {:.1} s, error: {message}",
        t.elapsed().as_secs_f64()
    );
}
