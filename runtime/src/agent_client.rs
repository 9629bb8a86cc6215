//! Host side of the agent protocol over hybrid vsock.
//!
//! The VM's vsock device listens on a Unix socket; a host client connects,
//! writes `CONNECT <port>\n` and reads `OK <host port>\n` once the guest
//! accepted. From then on the stream carries the agent protocol frames.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jevm_protocol::{read_frame, write_frame, FrameError, Request, Response, AGENT_PORT};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent socket {path}: the guest refused vsock port {port} (answer {answer:?})")]
    Refused {
        path: PathBuf,
        port: u32,
        answer: String,
    },
    #[error("agent request {request}: {source}")]
    Frame {
        request: &'static str,
        source: FrameError,
    },
    #[error("agent request {request}: the guest answered {answer}")]
    Guest {
        request: &'static str,
        answer: String,
    },
}

/// One connection to the agent.
pub struct AgentClient {
    stream: BufReader<UnixStream>,
    /// A request sent ahead ([`AgentClient::send_ahead`]) whose answer is
    /// still unread: its name and the answer that means it succeeded.
    owed: Option<(&'static str, Response)>,
}

/// How long an unanswered connect request waits in the vsock device before
/// it is dropped (`vmm::devices::vsock`: 2 s); a guest that refuses (nobody
/// listening) answers at once. An empty answer that took at least half the
/// window is a drop.
const DROPPED_AFTER: Duration = Duration::from_secs(1);

/// Opens a hybrid-vsock stream to `port` in the guest behind `uds`. A
/// request the device dropped because the guest did not get to answer it
/// within the device's window (a guest that was just resumed, or starved
/// on a loaded host) is made again until `timeout`; a refusal is final.
pub fn connect_vsock(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, AgentError> {
    let deadline = Instant::now() + timeout;
    loop {
        let t0 = Instant::now();
        match connect_vsock_once(uds, port, timeout) {
            Err(AgentError::Refused { answer, .. })
                if answer.is_empty()
                    && t0.elapsed() >= DROPPED_AFTER
                    && Instant::now() + DROPPED_AFTER < deadline =>
            {
                log::debug!(
                    "{}: the guest did not answer the connect request to port {port} in time; asking again",
                    uds.display()
                );
            }
            other => return other,
        }
    }
}

fn connect_vsock_once(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, AgentError> {
    let err = |source| AgentError::Connect {
        path: uds.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(uds).map_err(err)?;
    s.set_read_timeout(Some(timeout)).map_err(err)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(err)?;
    // Read the answer byte by byte: anything after the newline belongs to
    // the guest's stream, not to the handshake.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(err(e)),
        }
    }
    let answer = String::from_utf8_lossy(&line).into_owned();
    if !answer.starts_with("OK ") {
        return Err(AgentError::Refused {
            path: uds.to_owned(),
            port,
            answer,
        });
    }
    Ok(s)
}

impl AgentClient {
    /// Connects to the agent; `timeout` bounds the handshake and every
    /// later answer, so a dead guest is an error, never a hang.
    pub fn connect(uds: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let s = connect_vsock(uds, AGENT_PORT, timeout)?;
        Ok(Self {
            stream: BufReader::new(s),
            owed: None,
        })
    }

    /// Sends one request and reads its response. A `Response::Error` from the
    /// guest is returned as `Ok`: the caller decides whether it is expected.
    /// Settles a request sent ahead first (its failure is this call's
    /// error, naming that request).
    pub fn call(&mut self, req: &Request) -> Result<Response, AgentError> {
        self.settle()?;
        self.send_behind(req)?;
        self.read_answer(req)
    }

    /// Writes `req` even while a request sent ahead is still unanswered;
    /// its own answer is read with [`AgentClient::read_answer`] after
    /// [`AgentClient::settle`]. Only for a request sent ahead whose failure
    /// makes the agent close the connection (the identity): otherwise `req`
    /// would run after that failure.
    pub fn send_behind(&mut self, req: &Request) -> Result<(), AgentError> {
        write_frame(self.stream.get_mut(), req).map_err(|source| AgentError::Frame {
            request: request_name(req),
            source,
        })
    }

    /// Reads the answer to `req`, the request last sent.
    pub fn read_answer(&mut self, req: &Request) -> Result<Response, AgentError> {
        read_frame(&mut self.stream).map_err(|source| AgentError::Frame {
            request: request_name(req),
            source,
        })
    }

    /// Sends `req` without waiting for its answer, which must be `success`:
    /// the caller goes on with its own work while the guest handles it, and
    /// the answer is read by [`AgentClient::settle`] or the next
    /// [`AgentClient::call`]. The agent serves one connection's requests in
    /// order, so whatever is sent on this connection later runs after it.
    pub fn send_ahead(&mut self, req: &Request, success: Response) -> Result<(), AgentError> {
        self.settle()?;
        let name = request_name(req);
        write_frame(self.stream.get_mut(), req).map_err(|source| AgentError::Frame {
            request: name,
            source,
        })?;
        self.owed = Some((name, success));
        Ok(())
    }

    /// Reads the answer of the request sent ahead, if one is owed: Ok if it
    /// is the success answer. After an error the connection is out of step
    /// and must be dropped.
    pub fn settle(&mut self) -> Result<(), AgentError> {
        let Some((name, success)) = self.owed.take() else {
            return Ok(());
        };
        let answer: Response =
            read_frame(&mut self.stream).map_err(|source| AgentError::Frame {
                request: name,
                source,
            })?;
        if answer != success {
            let answer = match answer {
                Response::Error { message, .. } => message,
                other => format!("{other:?}"),
            };
            return Err(AgentError::Guest {
                request: name,
                answer,
            });
        }
        Ok(())
    }

    pub fn set_timeout(&mut self, t: Option<Duration>) -> std::io::Result<()> {
        self.stream.get_ref().set_read_timeout(t)
    }

    /// Version handshake: returns the agent's version, refusing an agent
    /// that speaks another protocol.
    pub fn version(&mut self) -> Result<String, AgentError> {
        match self.call(&Request::Version)? {
            Response::Version {
                agent_version,
                protocol_version,
            } if protocol_version == jevm_protocol::PROTOCOL_VERSION => Ok(agent_version),
            other => Err(AgentError::Guest {
                request: "Version",
                answer: format!("{other:?}"),
            }),
        }
    }

    /// Sends `req` (`Events` or `AttachStdio`) on a new connection and,
    /// once the agent answered `Done`, hands back the raw stream: event
    /// frames or stdio bytes follow on it. No buffered reader sits in
    /// between, so nothing the guest sent after the answer is lost. The
    /// returned stream has no read timeout.
    pub fn open_stream(
        uds: &Path,
        req: &Request,
        timeout: Duration,
    ) -> Result<UnixStream, AgentError> {
        stream_over(connect_vsock(uds, AGENT_PORT, timeout)?, req)
    }

    /// [`AgentClient::open_stream`] on this connection (one opened ahead,
    /// or one whose last exchange completed): the connection becomes the
    /// stream.
    pub fn into_stream(mut self, req: &Request) -> Result<UnixStream, AgentError> {
        self.settle()?;
        if !self.stream.buffer().is_empty() {
            // Bytes nobody asked for: the connection is out of step.
            return Err(AgentError::Frame {
                request: request_name(req),
                source: FrameError::Io(std::io::Error::other(
                    "unread bytes on a pooled agent connection",
                )),
            });
        }
        stream_over(self.stream.into_inner(), req)
    }

    pub fn ping(&mut self, nonce: u64) -> Result<(), AgentError> {
        match self.call(&Request::Ping { nonce })? {
            Response::Pong { nonce: n } if n == nonce => Ok(()),
            other => Err(AgentError::Guest {
                request: "Ping",
                answer: format!("{other:?}"),
            }),
        }
    }
}

/// Sends a stream request on `s`, unbuffered, and returns `s` once the
/// agent answered `Done`.
fn stream_over(mut s: UnixStream, req: &Request) -> Result<UnixStream, AgentError> {
    let name = request_name(req);
    let frame = |source| AgentError::Frame {
        request: name,
        source,
    };
    write_frame(&mut s, req).map_err(frame)?;
    match read_frame::<_, Response>(&mut s).map_err(frame)? {
        Response::Done => {}
        other => {
            return Err(AgentError::Guest {
                request: name,
                answer: format!("{other:?}"),
            })
        }
    }
    s.set_read_timeout(None)
        .map_err(|e| frame(FrameError::Io(e)))?;
    Ok(s)
}

pub(crate) fn request_name(req: &Request) -> &'static str {
    match req {
        Request::Version => "Version",
        Request::Ping { .. } => "Ping",
        Request::Shutdown => "Shutdown",
        Request::Diag(_) => "Diag",
        Request::Identity(_) => "Identity",
        Request::MountShare => "MountShare",
        Request::CreateContainer(_) => "CreateContainer",
        Request::StartContainer { .. } => "StartContainer",
        Request::Exec(_) => "Exec",
        Request::StartExec { .. } => "StartExec",
        Request::Signal { .. } => "Signal",
        Request::CloseStdin { .. } => "CloseStdin",
        Request::ResizePty { .. } => "ResizePty",
        Request::Pause { .. } => "Pause",
        Request::Resume { .. } => "Resume",
        Request::Pids { .. } => "Pids",
        Request::Stats { .. } => "Stats",
        Request::Update { .. } => "Update",
        Request::DeleteExec { .. } => "DeleteExec",
        Request::DeleteContainer { .. } => "DeleteContainer",
        Request::Events => "Events",
        Request::AttachStdio { .. } => "AttachStdio",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A stand-in for the vsock device's socket: answers each connection
    /// as `answers` says (after a pause, or by closing it), in order.
    fn device(dir: &Path, answers: Vec<(Duration, Option<&'static str>)>) -> PathBuf {
        let uds = dir.join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        std::thread::spawn(move || {
            for (pause, answer) in answers {
                let (mut s, _) = listener.accept().unwrap();
                let mut line = [0u8; 64];
                let _ = s.read(&mut line);
                std::thread::sleep(pause);
                if let Some(a) = answer {
                    s.write_all(a.as_bytes()).unwrap();
                    // Keep it open for the client to read.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
        uds
    }

    /// A client on one end of a socket pair and, on the other, an agent
    /// that reads each request and sends the next of `answers`.
    fn with_agent(answers: Vec<Response>) -> (AgentClient, std::thread::JoinHandle<Vec<Request>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            let mut theirs = BufReader::new(theirs);
            let mut seen = Vec::new();
            for answer in answers {
                seen.push(read_frame::<_, Request>(&mut theirs).unwrap());
                write_frame(theirs.get_mut(), &answer).unwrap();
            }
            seen
        });
        let client = AgentClient {
            stream: BufReader::new(ours),
            owed: None,
        };
        (client, agent)
    }

    #[test]
    fn a_request_sent_ahead_is_settled_before_the_next_call_on_its_connection() {
        let (mut c, agent) = with_agent(vec![
            Response::Pong { nonce: 1 },
            Response::Pong { nonce: 2 },
        ]);
        c.send_ahead(&Request::Ping { nonce: 1 }, Response::Pong { nonce: 1 })
            .unwrap();
        // The next call's answer is its own, not the one owed.
        assert_eq!(
            c.call(&Request::Ping { nonce: 2 }).unwrap(),
            Response::Pong { nonce: 2 }
        );
        assert_eq!(
            agent.join().unwrap(),
            vec![Request::Ping { nonce: 1 }, Request::Ping { nonce: 2 }]
        );
        c.settle().expect("nothing owed any more");
    }

    #[test]
    fn a_used_connection_becomes_a_stream_and_loses_nothing_sent_after_the_answer() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            let mut theirs = BufReader::new(theirs);
            let ping = read_frame::<_, Request>(&mut theirs).unwrap();
            write_frame(theirs.get_mut(), &Response::Pong { nonce: 7 }).unwrap();
            let attach = read_frame::<_, Request>(&mut theirs).unwrap();
            // The answer and the first stream bytes in one write, as a
            // process that writes at once may make them arrive.
            let mut out = Vec::new();
            write_frame(&mut out, &Response::Done).unwrap();
            out.extend_from_slice(b"first bytes");
            theirs.get_mut().write_all(&out).unwrap();
            (ping, attach)
        });
        let mut c = AgentClient {
            stream: BufReader::new(ours),
            owed: None,
        };
        assert_eq!(
            c.call(&Request::Ping { nonce: 7 }).unwrap(),
            Response::Pong { nonce: 7 }
        );
        let attach = Request::AttachStdio {
            container_id: "c1".into(),
            exec_id: None,
            stream: jevm_protocol::StdioStream::Stdout,
        };
        let mut s = c.into_stream(&attach).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"first bytes");
        assert_eq!(agent.join().unwrap(), (Request::Ping { nonce: 7 }, attach));
    }

    #[test]
    fn a_request_sent_behind_one_owed_goes_out_before_the_owed_answer_is_read() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Reads both requests before it answers either: a client that
        // waited for the first answer before sending the second would time out.
        let agent = std::thread::spawn(move || {
            let mut theirs = BufReader::new(theirs);
            let first = read_frame::<_, Request>(&mut theirs).unwrap();
            let second = read_frame::<_, Request>(&mut theirs).unwrap();
            write_frame(theirs.get_mut(), &Response::IdentityApplied).unwrap();
            write_frame(theirs.get_mut(), &Response::Pong { nonce: 2 }).unwrap();
            (first, second)
        });
        let mut c = AgentClient {
            stream: BufReader::new(ours),
            owed: None,
        };
        c.send_ahead(&Request::Ping { nonce: 1 }, Response::IdentityApplied)
            .unwrap();
        let behind = Request::Ping { nonce: 2 };
        c.send_behind(&behind).unwrap();
        c.settle().unwrap();
        assert_eq!(c.read_answer(&behind).unwrap(), Response::Pong { nonce: 2 });
        assert_eq!(
            agent.join().unwrap(),
            (Request::Ping { nonce: 1 }, Request::Ping { nonce: 2 })
        );
    }

    #[test]
    fn a_request_sent_ahead_that_failed_fails_the_next_call_naming_it() {
        let (mut c, _agent) = with_agent(vec![Response::failed("no entropy".to_string())]);
        c.send_ahead(&Request::Ping { nonce: 1 }, Response::Pong { nonce: 1 })
            .unwrap();
        match c.call(&Request::Version) {
            Err(AgentError::Guest { request, answer }) => {
                assert_eq!(request, "Ping");
                assert!(answer.contains("no entropy"), "{answer}");
            }
            other => panic!("want the owed request's failure, got {other:?}"),
        }
    }

    #[test]
    fn a_connect_request_dropped_for_want_of_an_answer_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let uds = device(
            dir.path(),
            vec![
                (DROPPED_AFTER + Duration::from_millis(100), None),
                (Duration::ZERO, Some("OK 1073741824\n")),
            ],
        );
        connect_vsock(&uds, AGENT_PORT, Duration::from_secs(10)).expect("the second request");
    }

    #[test]
    fn a_refusal_is_final_and_comes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let uds = device(
            dir.path(),
            vec![(Duration::ZERO, None), (Duration::ZERO, Some("OK 1\n"))],
        );
        let t0 = Instant::now();
        match connect_vsock(&uds, AGENT_PORT, Duration::from_secs(10)) {
            Err(AgentError::Refused { answer, .. }) => assert_eq!(answer, ""),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(t0.elapsed() < DROPPED_AFTER);
    }
}
