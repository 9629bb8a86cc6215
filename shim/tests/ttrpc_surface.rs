//! The shim binary's containerd-facing surface without a VM: `start`
//! launches (and reuses) a shim, the task service answers with the right
//! codes, a create with a missing kernel fails with the clear error and
//! leaves nothing, `shutdown` ends the shim and removes its socket, and
//! `delete` answers like runc's shim. The events endpoint containerd would
//! provide is a small ttrpc server here that records what is published.
//! Needs root (the shim's socket lives in /run/containerd/s).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    ConnectRequest, CreateTaskRequest, DeleteResponse, Empty, ForwardRequest, KillRequest,
    ShutdownRequest, StateRequest, WaitRequest,
};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim_async::{create_events, Client, Events, TaskClient};
use containerd_shim_protos::ttrpc::asynchronous::{transport::Listener, Server};
use containerd_shim_protos::ttrpc::{self, context, r#async::TtrpcContext, Code};

const BIN: &str = env!("CARGO_BIN_EXE_containerd-shim-jevm-v2");

struct Recorder(Arc<Mutex<Vec<String>>>);

#[async_trait]
impl Events for Recorder {
    async fn forward(&self, _ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        self.0.lock().unwrap().push(req.envelope.topic.clone());
        Ok(Empty::default())
    }
}

fn code(e: &ttrpc::Error) -> Option<Code> {
    match e {
        ttrpc::Error::RpcStatus(s) => Some(s.code()),
        _ => None,
    }
}

fn shim(dir: &Path, bundle: &Path, id: &str, action: &str, events: &Path) -> std::process::Output {
    Command::new(BIN)
        .current_dir(bundle)
        .env("TTRPC_ADDRESS", events)
        .env("JEVM_CONFIG", dir.join("jevm.toml"))
        .args(["-namespace", "jevmtest", "-id", id, "-address"])
        .arg(dir.join("containerd.sock"))
        .args(["-publish-binary", "/bin/true", action])
        .output()
        .unwrap()
}

fn bundle(dir: &Path, name: &str, annotations: &str) -> PathBuf {
    let b = dir.join(name);
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(
        b.join("config.json"),
        format!(r#"{{"ociVersion":"1.0.2","process":{{"args":["true"]}},"root":{{"path":"rootfs"}},"linux":{{"namespaces":[{{"type":"network"}},{{"type":"pid"}},{{"type":"ipc"}}]}},"annotations":{{{annotations}}}}}"#),
    )
    .unwrap();
    // containerd's log FIFO; a plain file keeps the shim's log readable.
    std::fs::write(b.join("log"), b"").unwrap();
    b
}

#[tokio::test]
async fn shim_lifecycle_without_a_vm() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("jevm-shim-surface-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let run_dir = dir.join("run");
    std::fs::write(
        dir.join("jevm.toml"),
        format!(
            "kernel = \"/nope/vmlinux\"\nrun_dir = \"{}\"\ntemplate_dir = \"{}\"\n",
            run_dir.display(),
            dir.join("templates").display()
        ),
    )
    .unwrap();

    // containerd's event endpoint.
    let topics = Arc::new(Mutex::new(Vec::new()));
    let events_sock = dir.join("events.sock");
    let listener = std::os::unix::net::UnixListener::bind(&events_sock).unwrap();
    let mut server = Server::new()
        .add_listener(Listener::try_from(listener).unwrap())
        .register_service(create_events(Arc::new(Recorder(Arc::clone(&topics)))));
    server.start().await.unwrap();

    // Two containers of one CRI pod share one shim.
    let sb = bundle(
        &dir,
        "sandbox",
        r#""io.kubernetes.cri.sandbox-id":"pod1","io.kubernetes.cri.container-type":"sandbox""#,
    );
    let c2 = bundle(
        &dir,
        "c2",
        r#""io.kubernetes.cri.sandbox-id":"pod1","io.kubernetes.cri.container-type":"container""#,
    );
    let out = shim(&dir, &sb, "pod1", "start", &events_sock);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let addr = String::from_utf8(out.stdout).unwrap();
    assert!(addr.starts_with("unix:///run/containerd/s/"), "{addr}");
    assert_eq!(std::fs::read_to_string(sb.join("address")).unwrap(), addr);
    let out = shim(&dir, &c2, "c2", "start", &events_sock);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        addr,
        "same pod, same shim"
    );

    let client = TaskClient::new(Client::connect(&addr).await.unwrap());
    let ctx = || context::with_timeout(Duration::from_secs(10).as_nanos() as i64);

    let c = client
        .connect(
            ctx(),
            &ConnectRequest {
                id: "pod1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(c.shim_pid > 0);
    assert_eq!(c.task_pid, 0);

    for e in [
        client
            .state(
                ctx(),
                &StateRequest {
                    id: "nope".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
        client
            .kill(
                ctx(),
                &KillRequest {
                    id: "nope".into(),
                    signal: 9,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
        client
            .wait(
                ctx(),
                &WaitRequest {
                    id: "nope".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err(),
    ] {
        assert_eq!(code(&e), Some(Code::NOT_FOUND), "{e:?}");
    }

    // A missing kernel: one clear error, nothing left on the host.
    let e = client
        .create(
            ctx(),
            &CreateTaskRequest {
                id: "pod1".into(),
                bundle: sb.display().to_string(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::FAILED_PRECONDITION), "{e:?}");
    let msg = format!("{e:?}");
    assert!(
        msg.contains(
            "jevm: kernel /nope/vmlinux: No such file or directory (set \\\"kernel\\\" in "
        ),
        "{msg}"
    );
    assert!(!run_dir.join("pods/pod1").exists());
    assert!(!sb.join("jevm-shim.json").exists());

    // A bad id never reaches the file system.
    let e = client
        .create(
            ctx(),
            &CreateTaskRequest {
                id: "../x".into(),
                bundle: sb.display().to_string(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::INVALID_ARGUMENT), "{e:?}");

    // No task left: shutdown ends the shim and removes its socket.
    client
        .shutdown(ctx(), &ShutdownRequest::default())
        .await
        .unwrap();
    let sock = PathBuf::from(addr.trim_start_matches("unix://"));
    for _ in 0..100 {
        if !sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!sock.exists(), "shim socket left behind");
    assert!(topics.lock().unwrap().is_empty(), "no task, no event");

    // `delete` after a dead shim answers like runc: SIGKILL, exited now.
    let out = shim(&dir, &sb, "pod1", "delete", &events_sock);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = DeleteResponse::parse_from_bytes(&out.stdout).unwrap();
    assert_eq!(r.exit_status, 137);
    assert!(r.exited_at.seconds > 0);

    server.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
