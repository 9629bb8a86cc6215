//! The agent of one pod VM, from async code: blocking [`AgentClient`]
//! calls run on tokio's blocking pool, over pooled connections so requests
//! for different containers do not queue behind each other. A pooled
//! connection also carries a stream request (the connection becomes the
//! stream), and connections can be opened ahead of the streams that will
//! need them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jevm_protocol::{CreateTimes, ErrorKind, Request, Response};
use jevm_runtime::agent_client::{AgentClient, AgentError};

/// How long one agent answer may take. Container creation in a loaded,
/// nested-virtualised test host takes seconds; a dead guest is still an
/// error after this, not a hang.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// What the task service asks of a pod's guest: requests and streams. The
/// real one is [`Agent`] (vsock to the in-guest agent); the task service's
/// tests answer with a fake.
#[async_trait]
pub trait Guest: Send + Sync {
    /// Sends one request; a guest `Error` answer is [`CallError::Guest`].
    async fn call(&self, name: &'static str, req: Request) -> Result<Response, CallError>;

    /// Opens an `Events` or `AttachStdio` stream.
    async fn stream(
        &self,
        name: &'static str,
        req: Request,
    ) -> Result<tokio::net::UnixStream, CallError>;

    /// Opens `n` connections ahead for the requests and streams that
    /// follow; a guest without connections ignores it.
    fn open_ahead(&self, _n: usize) {}

    /// A request whose only good answer is `Done`.
    async fn done(&self, name: &'static str, req: Request) -> Result<(), CallError> {
        match self.call(name, req).await? {
            Response::Done => Ok(()),
            other => Err(CallError::Unexpected {
                request: name,
                answer: format!("{other:?}"),
            }),
        }
    }

    /// A request answered with a process id (`Created` or `Started`).
    async fn pid(&self, name: &'static str, req: Request) -> Result<u32, CallError> {
        Ok(self.created(name, req).await?.0)
    }

    /// A request answered with `Created` (or `Started`): the process id
    /// and, for a container's create, where the guest's time went.
    async fn created(
        &self,
        name: &'static str,
        req: Request,
    ) -> Result<(u32, Option<CreateTimes>), CallError> {
        created(name, self.call(name, req).await)
    }
}

/// `answer` read as `Created` (or `Started`): see [`Guest::created`].
pub fn created(
    name: &'static str,
    answer: Result<Response, CallError>,
) -> Result<(u32, Option<CreateTimes>), CallError> {
    match answer? {
        Response::Created { pid, times } => Ok((pid, times)),
        Response::Started { pid } => Ok((pid, None)),
        other => Err(CallError::Unexpected {
            request: name,
            answer: format!("{other:?}"),
        }),
    }
}

/// An agent's answer, its `Error` as [`CallError::Guest`].
pub fn answer(r: Result<Response, AgentError>) -> Result<Response, CallError> {
    match r? {
        Response::Error { message, kind } => Err(CallError::Guest { kind, message }),
        other => Ok(other),
    }
}

/// The in-guest agent of one pod VM, over its vsock socket.
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    uds: PathBuf,
    idle: Mutex<Vec<AgentClient>>,
    /// The VM is gone: fail at once instead of waiting out a timeout.
    dead: AtomicBool,
}

/// A request that failed: the transport, or the guest's own refusal.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Transport(#[from] AgentError),
    /// The guest's answer: a message naming the object and cause, and
    /// what kind of failure it is.
    #[error("{message}")]
    Guest { kind: ErrorKind, message: String },
    #[error("agent stream {name}: {source}")]
    Stream {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("agent request {request}: unexpected answer {answer}")]
    Unexpected {
        request: &'static str,
        answer: String,
    },
    #[error("agent request {0}: the blocking call was lost")]
    Join(&'static str),
    #[error("agent request {0}: the pod's VM is gone")]
    Dead(&'static str),
}

impl Agent {
    pub fn new(uds: PathBuf) -> Arc<Agent> {
        Arc::new(Agent {
            inner: Arc::new(Inner {
                uds,
                idle: Mutex::new(Vec::new()),
                dead: AtomicBool::new(false),
            }),
        })
    }

    pub fn mark_dead(&self) {
        self.inner.mark_dead();
    }

    /// Keeps an open connection (the one the clone's identity went over)
    /// for the next request.
    pub fn adopt(&self, conn: AgentClient) {
        self.inner.put_idle(conn);
    }
}

impl Inner {
    fn mark_dead(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn check_alive(&self, name: &'static str) -> Result<(), CallError> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(CallError::Dead(name));
        }
        Ok(())
    }

    fn take_idle(&self) -> Option<AgentClient> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_idle(&self, c: AgentClient) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < 4 {
            idle.push(c);
        }
    }
}

#[async_trait]
impl Guest for Agent {
    async fn call(&self, name: &'static str, req: Request) -> Result<Response, CallError> {
        self.inner.check_alive(name)?;
        let this = Arc::clone(&self.inner);
        let pooled = this.take_idle();
        let r = tokio::task::spawn_blocking(move || {
            let mut c = match pooled {
                Some(c) => c,
                None => AgentClient::connect(&this.uds, ANSWER_TIMEOUT)?,
            };
            let resp = c.call(&req)?;
            // Only a connection whose last exchange completed is reusable.
            this.put_idle(c);
            Ok::<_, AgentError>(resp)
        })
        .await
        .map_err(|_| CallError::Join(name))?;
        answer(r)
    }

    /// Opens `n` connections in the background for the requests and
    /// streams that follow (a container's stdio right after its create):
    /// their vsock handshakes, and the agent's accepting them, overlap
    /// with the request the guest is busy with instead of following it.
    /// Best effort: a connection that cannot be opened is opened again
    /// when it is needed, and reports its error then.
    fn open_ahead(&self, n: usize) {
        for _ in 0..n {
            if self.inner.dead.load(Ordering::SeqCst) {
                return;
            }
            let this = Arc::clone(&self.inner);
            tokio::task::spawn_blocking(move || {
                match AgentClient::connect(&this.uds, ANSWER_TIMEOUT) {
                    Ok(c) => this.put_idle(c),
                    Err(e) => log::debug!("opening an agent connection ahead: {e}"),
                }
            });
        }
    }

    async fn stream(
        &self,
        name: &'static str,
        req: Request,
    ) -> Result<tokio::net::UnixStream, CallError> {
        self.inner.check_alive(name)?;
        let this = Arc::clone(&self.inner);
        let pooled = this.take_idle();
        let s = tokio::task::spawn_blocking(move || {
            if let Some(c) = pooled {
                match c.into_stream(&req) {
                    // The guest's answer stands; only a connection that
                    // broke is replaced by a new one.
                    Err(AgentError::Frame { source, .. }) => {
                        log::debug!("a pooled agent connection failed ({source}); opening another")
                    }
                    done => return done,
                }
            }
            AgentClient::open_stream(&this.uds, &req, ANSWER_TIMEOUT)
        })
        .await
        .map_err(|_| CallError::Join(name))??;
        let to_tokio = |s: std::os::unix::net::UnixStream| {
            s.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(s)
        };
        to_tokio(s).map_err(|source| CallError::Stream { name, source })
    }
}
