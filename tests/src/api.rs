//! containerd's own gRPC API, driven the way its Go client drives it, for
//! the steps `ctr` cannot say: an exec with a terminal whose `Wait` must
//! return, `ResizePty` on a process without one, exit times checked
//! against the start, an exec created and never started. Blocking calls
//! over a private tokio runtime, so tests stay plain `#[test]` functions.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::{
    DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest, GetRequest, KillRequest,
    ResizePtyRequest, StartRequest, SubscribeRequest, WaitRequest,
};
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::{with_namespace, Client};
use prost_types::{Any, Timestamp};

use crate::ctr::Env;

/// What one call may take before the test calls it hung.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A gRPC failure or a call that did not answer in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    Status { code: Code, message: String },
    TimedOut(&'static str),
}

impl From<Status> for CallError {
    fn from(s: Status) -> Self {
        CallError::Status {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

pub type CallResult<T> = Result<T, CallError>;

/// A process's end as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: Option<SystemTime>,
}

pub fn to_time(t: &Option<Timestamp>) -> Option<SystemTime> {
    let t = t.as_ref()?;
    if t.seconds <= 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos.max(0) as u32))
}

pub struct Api {
    rt: tokio::runtime::Runtime,
    client: Client,
    ns: String,
    address: String,
}

impl Api {
    pub fn connect(env: &Env) -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = rt
            .block_on(Client::from_path(&env.address))
            .unwrap_or_else(|e| panic!("containerd API at {}: {e}", env.address));
        Api {
            rt,
            client,
            ns: env.namespace.clone(),
            address: env.address.clone(),
        }
    }

    /// A new connection (after containerd restarted, say).
    pub fn reconnect(&mut self) {
        self.client = self
            .rt
            .block_on(Client::from_path(&self.address))
            .unwrap_or_else(|e| panic!("containerd API at {}: {e}", self.address));
    }

    fn run<T>(
        &self,
        what: &'static str,
        timeout: Duration,
        f: impl std::future::Future<Output = Result<T, Status>>,
    ) -> CallResult<T> {
        self.rt.block_on(async {
            match tokio::time::timeout(timeout, f).await {
                Ok(r) => r.map_err(CallError::from),
                Err(_) => Err(CallError::TimedOut(what)),
            }
        })
    }

    /// `Tasks.Exec` with a process spec (JSON) and stdio FIFO paths.
    pub fn exec(
        &self,
        cid: &str,
        exec_id: &str,
        process: &serde_json::Value,
        stdio: &Stdio,
    ) -> CallResult<()> {
        let req = ExecProcessRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            stdin: stdio.stdin.clone(),
            stdout: stdio.stdout.clone(),
            stderr: stdio.stderr.clone(),
            terminal: stdio.terminal,
            spec: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                value: serde_json::to_vec(process).expect("process spec"),
            }),
        };
        let mut c = self.client.tasks();
        self.run("Exec", CALL_TIMEOUT, async move {
            c.exec(with_namespace!(req, self.ns)).await.map(|_| ())
        })
    }

    pub fn start(&self, cid: &str, exec_id: &str) -> CallResult<u32> {
        let req = StartRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
        };
        let mut c = self.client.tasks();
        self.run("Start", CALL_TIMEOUT, async move {
            c.start(with_namespace!(req, self.ns))
                .await
                .map(|r| r.into_inner().pid)
        })
    }

    /// `Tasks.Wait`, as the Go client's `process.Wait` calls it.
    pub fn wait(&self, cid: &str, exec_id: &str, timeout: Duration) -> CallResult<Exit> {
        let req = WaitRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
        };
        let mut c = self.client.tasks();
        self.run("Wait", timeout, async move {
            c.wait(with_namespace!(req, self.ns)).await.map(|r| {
                let r = r.into_inner();
                Exit {
                    status: r.exit_status,
                    at: to_time(&r.exited_at),
                }
            })
        })
    }

    pub fn kill(&self, cid: &str, exec_id: &str, signal: u32) -> CallResult<()> {
        let req = KillRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            signal,
            all: false,
        };
        let mut c = self.client.tasks();
        self.run("Kill", CALL_TIMEOUT, async move {
            c.kill(with_namespace!(req, self.ns)).await.map(|_| ())
        })
    }

    pub fn resize_pty(&self, cid: &str, exec_id: &str, width: u32, height: u32) -> CallResult<()> {
        let req = ResizePtyRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            width,
            height,
        };
        let mut c = self.client.tasks();
        self.run("ResizePty", CALL_TIMEOUT, async move {
            c.resize_pty(with_namespace!(req, self.ns))
                .await
                .map(|_| ())
        })
    }

    /// `Tasks.DeleteProcess` of an exec'd process.
    pub fn delete_process(&self, cid: &str, exec_id: &str) -> CallResult<Exit> {
        let req = DeleteProcessRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
        };
        let mut c = self.client.tasks();
        self.run("DeleteProcess", CALL_TIMEOUT, async move {
            c.delete_process(with_namespace!(req, self.ns))
                .await
                .map(|r| {
                    let r = r.into_inner();
                    Exit {
                        status: r.exit_status,
                        at: to_time(&r.exited_at),
                    }
                })
        })
    }

    /// `Tasks.Delete` of the task (its init process).
    pub fn delete_task(&self, cid: &str) -> CallResult<Exit> {
        let req = DeleteTaskRequest {
            container_id: cid.into(),
        };
        let mut c = self.client.tasks();
        self.run("Delete", CALL_TIMEOUT, async move {
            c.delete(with_namespace!(req, self.ns)).await.map(|r| {
                let r = r.into_inner();
                Exit {
                    status: r.exit_status,
                    at: to_time(&r.exited_at),
                }
            })
        })
    }

    /// `Tasks.Get`: status (containerd's enum number) and exit of a task
    /// or of one of its exec'd processes.
    pub fn get(&self, cid: &str, exec_id: &str) -> CallResult<(i32, Exit)> {
        let req = GetRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
        };
        let mut c = self.client.tasks();
        self.run("Get", Duration::from_secs(30), async move {
            c.get(with_namespace!(req, self.ns)).await.map(|r| {
                let p = r.into_inner().process.unwrap_or_default();
                (
                    p.status,
                    Exit {
                        status: p.exit_status,
                        at: to_time(&p.exited_at),
                    },
                )
            })
        })
    }

    /// Subscribes to task events of `cid`; they collect until dropped.
    pub fn subscribe(&self, cid: &str) -> Events {
        self.try_subscribe(cid)
            .unwrap_or_else(|e| panic!("events: subscribing: {e:?}"))
    }

    fn try_subscribe(&self, cid: &str) -> CallResult<Events> {
        let req = SubscribeRequest {
            filters: vec!["topic~=\"/tasks/\"".into()],
        };
        let mut c = self.client.events();
        let got: Arc<Mutex<Vec<Envelope>>> = Arc::default();
        let subscribed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sink = Arc::clone(&got);
        let seen = Arc::clone(&subscribed);
        let ns = self.ns.clone();
        let cid = cid.to_string();
        // containerd answers Subscribe's headers only with the first
        // event, so the call must not be awaited here: it runs on its own
        // task.
        let task = self.rt.spawn({
            let cid = cid.clone();
            async move {
                let Ok(stream) = c.subscribe(with_namespace!(req, ns)).await else {
                    return;
                };
                let mut stream = stream.into_inner();
                while let Ok(Some(e)) = stream.message().await {
                    let Some(ev) = e.event else { continue };
                    if container_of(&ev) != cid {
                        continue;
                    }
                    if e.topic == SUBSCRIBED_PROBE {
                        seen.store(true, std::sync::atomic::Ordering::Release);
                        continue;
                    }
                    sink.lock().unwrap().push(Envelope {
                        topic: e.topic,
                        at: to_time(&e.timestamp),
                        event: ev,
                    });
                }
            }
        });
        // Until containerd has the subscription, an event the test causes
        // next would be lost (a fixed wait was too short once on a loaded
        // test host: an exit never seen). So an event of our own is
        // published until it comes back through the subscription.
        let deadline = std::time::Instant::now() + CALL_TIMEOUT;
        let probe = Any {
            type_url: "types.containerd.io/containerd.events.TaskPaused".into(),
            value: prost::Message::encode_to_vec(&ContainerOf {
                container_id: cid.clone(),
            }),
        };
        while !subscribed.load(std::sync::atomic::Ordering::Acquire) {
            if std::time::Instant::now() >= deadline || task.is_finished() {
                task.abort();
                return Err(CallError::TimedOut("events: subscribing"));
            }
            let req = containerd_client::services::v1::PublishRequest {
                topic: SUBSCRIBED_PROBE.into(),
                event: Some(probe.clone()),
            };
            let mut c = self.client.events();
            self.run(
                "events: publishing the subscription probe",
                CALL_TIMEOUT,
                c.publish(with_namespace!(req, self.ns.clone())),
            )?;
            let wait = std::time::Instant::now() + Duration::from_millis(500);
            while !subscribed.load(std::sync::atomic::Ordering::Acquire)
                && std::time::Instant::now() < wait
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(Events { got, task })
    }
}

/// The topic of the event [`Api::subscribe`] publishes to know that its
/// subscription is in place (a task topic: the subscription's filter).
const SUBSCRIBED_PROBE: &str = "/tasks/jevm-test-subscribed";

/// Every task event carries the container id as its field 1.
#[derive(Clone, PartialEq, prost::Message)]
struct ContainerOf {
    #[prost(string, tag = "1")]
    container_id: String,
}

fn container_of(any: &Any) -> String {
    use prost::Message;
    ContainerOf::decode(any.value.as_slice())
        .map(|c| c.container_id)
        .unwrap_or_default()
}

/// The exit status in a TaskExit event.
pub fn exit_status_of(any: &Any) -> Option<u32> {
    use prost::Message;
    containerd_client::events::TaskExit::decode(any.value.as_slice())
        .ok()
        .map(|e| e.exit_status)
}

/// One event as containerd published it.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub topic: String,
    /// When the publisher stamped it.
    pub at: Option<SystemTime>,
    pub event: Any,
}

pub struct Events {
    got: Arc<Mutex<Vec<Envelope>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Events {
    pub fn all(&self) -> Vec<Envelope> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until an event on `topic` arrived (or `timeout` passed).
    pub fn wait_for(&self, topic: &str, timeout: Duration) -> Option<Envelope> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.all().into_iter().find(|e| e.topic == topic) {
                return Some(e);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn topics(&self) -> Vec<String> {
        self.all().into_iter().map(|e| e.topic).collect()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// stdio FIFOs for a process, in a directory of their own, as the Go
/// client's `cio` makes them. The output readers run on threads.
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
    dir: tempfile::TempDir,
    readers: Vec<(PathBuf, JoinHandle<Vec<u8>>)>,
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

impl Stdio {
    /// stdout only (and no stderr with a terminal, as with a TTY there is
    /// one stream); no stdin.
    pub fn output(terminal: bool) -> Stdio {
        let dir = tempfile::Builder::new()
            .prefix("jevm-e2e-io")
            .tempdir()
            .expect("fifo dir");
        let mut s = Stdio {
            stdin: String::new(),
            stdout: String::new(),
            stderr: String::new(),
            terminal,
            dir,
            readers: Vec::new(),
        };
        s.stdout = s.reader("stdout");
        if !terminal {
            s.stderr = s.reader("stderr");
        }
        s
    }

    /// A FIFO whose reader opens it (blocking until the shim opens the
    /// write side) and reads to EOF.
    fn reader(&mut self, name: &str) -> String {
        let p = self.dir.path().join(name);
        mkfifo(&p);
        let path = p.clone();
        let h = std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Ok(mut f) = File::open(&path) {
                let _ = f.read_to_end(&mut out);
            }
            out
        });
        self.readers.push((p.clone(), h));
        p.display().to_string()
    }

    /// Everything read from stdout once the writer closed it, or None
    /// when it did not close within `timeout`.
    pub fn stdout(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        let i = self
            .readers
            .iter()
            .position(|(p, _)| p.ends_with("stdout"))?;
        while !self.readers[i].1.is_finished() {
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (_, h) = self.readers.remove(i);
        h.join().ok()
    }
}

impl Drop for Stdio {
    fn drop(&mut self) {
        // Readers still blocked in open() or read() are released by a
        // writer that opens and closes at once.
        for (p, h) in self.readers.drain(..) {
            if !h.is_finished() {
                use std::os::unix::fs::OpenOptionsExt;
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&p);
            }
        }
    }
}

/// A process spec for an exec in the busybox test image.
pub fn process(args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
    })
}
