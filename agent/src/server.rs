//! The vsock side: telling the host we are ready, accepting its
//! connections, and the frame loop on each.

use crate::container::{self, Outcome, Service};
use crate::handler::{agent_version, handle};
use crate::system::{uptime_ms, System};
use crate::vsock::{VsockListener, VsockStream, HOST_CID};
use crate::workers::Workers;
use jevm_protocol::{
    read_frame, write_frame, FrameError, Ready, Request, Response, AGENT_PORT, PROTOCOL_VERSION,
    READY_PORT,
};
use log::{debug, error, info, warn};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

const READY_ATTEMPTS: u32 = 5;
const READY_BACKOFF: Duration = Duration::from_millis(20);

/// How long a shutdown waits for the host to close the connection, which
/// proves the `ShuttingDown` reply left the guest (see `serve_connection`).
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(1);

pub fn listen() -> io::Result<VsockListener> {
    VsockListener::bind(AGENT_PORT)
}

/// Dials the host's READY port once the listener is up, so the host may
/// connect as soon as it hears from us. A failure is logged, not fatal: the
/// host can still find the agent by connecting.
pub fn announce_ready() {
    let ready = Ready {
        agent_version: agent_version(),
        protocol_version: PROTOCOL_VERSION,
        guest_uptime_ms: uptime_ms(),
    };
    let mut last_err = None;
    for attempt in 1..=READY_ATTEMPTS {
        match send_ready(&ready) {
            Ok(()) => {
                info!(
                    "ready, {} ms after boot (agent {}, protocol {})",
                    ready.guest_uptime_ms, ready.agent_version, ready.protocol_version
                );
                return;
            }
            Err(e) => last_err = Some(e),
        }
        if attempt < READY_ATTEMPTS {
            std::thread::sleep(READY_BACKOFF * attempt);
        }
    }
    if let Some(e) = last_err {
        error!(
            "telling the host we are ready (vsock cid {HOST_CID} port {READY_PORT}) \
             failed {READY_ATTEMPTS} times, last: {e}; serving anyway"
        );
    }
}

fn send_ready(ready: &Ready) -> io::Result<()> {
    let mut stream = VsockStream::connect(HOST_CID, READY_PORT)?;
    write_frame(&mut stream, ready).map_err(io::Error::other)
}

/// Threads parked for host connections when the agent starts
/// (crate::workers). The template's own connection (the share's mount)
/// takes one and, done, exits; the other five are parked at the snapshot,
/// one for each of a clone's first connections: identity, events, stdout
/// and stderr opened ahead, and one the shim holds ready.
const PRESTARTED_WORKERS: usize = 6;
/// Parked threads kept once connections close; more exit.
const KEPT_WORKERS: usize = 2;

/// Accepts connections forever, each on a thread of its own while it lasts.
pub fn serve(listener: VsockListener, system: Arc<System>, containers: Arc<Service>) -> ! {
    let workers = Workers::new("conn", KEPT_WORKERS, move |stream: VsockStream| {
        serve_connection(stream, &system, &containers)
    });
    if let Err(e) = workers.prestart(PRESTARTED_WORKERS) {
        // Not fatal: connections then get threads as they come.
        warn!("starting threads for host connections ahead: {e}");
    }
    loop {
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(e) if is_transient_accept_error(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: spinning would not help, a
                // pause lets running connections finish and free some.
                error!("accepting on vsock port {AGENT_PORT}: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Err(e) = workers.run(stream) {
            error!("starting a thread for a host connection: {e}");
        }
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::ECONNABORTED | libc::EAGAIN)
    )
}

/// What the frame loop needs from a host connection besides bytes; a trait
/// so tests can drive the loop over a Unix socket pair.
pub trait Connection: Read + Write + Into<OwnedFd> {
    fn shutdown_write(&self) -> io::Result<()>;
    fn set_timeout(&self, timeout: Duration) -> io::Result<()>;
}

impl Connection for VsockStream {
    fn shutdown_write(&self) -> io::Result<()> {
        VsockStream::shutdown_write(self)
    }

    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        VsockStream::set_timeout(self, timeout)
    }
}

/// Answers requests until the host closes the connection. Anything the agent
/// cannot parse ends this connection, never the agent. Container requests go
/// to the container service; `Events` and `AttachStdio` take the connection
/// over after their answer, and this thread then carries the stream.
fn serve_connection(mut stream: impl Connection, system: &System, containers: &Service) {
    loop {
        let request: Request = match read_frame(&mut stream) {
            Ok(request) => request,
            Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return,
            Err(FrameError::Io(e)) => {
                debug!("host connection: {e}");
                return;
            }
            Err(e @ (FrameError::Decode(_) | FrameError::TooLarge(_))) => {
                warn!("closing a host connection: {e}");
                // Best effort: tells a host that sent, say, a request from a
                // newer protocol why the connection is going away.
                let message = e.to_string();
                let _ = write_frame(
                    &mut stream,
                    &Response::Error {
                        message,
                        kind: jevm_protocol::ErrorKind::InvalidArgument,
                    },
                );
                return;
            }
        };
        // A host may send its first container request behind the identity
        // without waiting for the answer: after a failed identity nothing
        // queued on this connection may run, since it would run with the
        // template's RNG, clock and share.
        let identity = matches!(request, Request::Identity(_));
        let response = if container::is_container_request(&request) {
            match containers.handle(request) {
                Outcome::Reply(response) => response,
                Outcome::TakeOver(response, attachment) => {
                    match write_frame(&mut stream, &response) {
                        // The socket outlives its wrapper type: only fd
                        // operations (read, write, shutdown) are used on it.
                        Ok(()) => attachment(UnixStream::from(stream.into())),
                        Err(e) => debug!("answering the host: {e}"),
                    }
                    return;
                }
            }
        } else {
            handle(system, request)
        };
        if response == Response::ShuttingDown {
            // Before the answer: the host may stop the VM as soon as it has
            // it (see `Request::Shutdown`).
            system.sync();
        }
        if let Err(e) = write_frame(&mut stream, &response) {
            debug!("answering the host: {e}");
            return;
        }
        if identity && matches!(response, Response::Error { .. }) {
            return;
        }
        if response == Response::ShuttingDown {
            wait_for_host_close(&mut stream);
            system.power_off();
        }
    }
}

/// `write` only queues the reply: virtio-vsock transmits from a kernel
/// worker, and a reboot right away could lose it. The host's close arrives
/// after our data has been taken off the queue, so waiting for it (bounded,
/// in case the host keeps the connection open) makes the reply reliable.
fn wait_for_host_close(stream: &mut impl Connection) {
    let _ = stream.shutdown_write();
    if stream.set_timeout(SHUTDOWN_ACK_WAIT).is_err() {
        return;
    }
    let mut buf = [0u8; 512];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    impl Connection for UnixStream {
        fn shutdown_write(&self) -> io::Result<()> {
            self.shutdown(std::net::Shutdown::Write)
        }

        fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
            self.set_read_timeout(Some(timeout))?;
            self.set_write_timeout(Some(timeout))
        }
    }

    /// Runs the frame loop on one end of a socket pair; the test is the host.
    fn agent_connection() -> (UnixStream, std::thread::JoinHandle<()>) {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let system = System::new(false);
        let containers = Service::guest().unwrap();
        let thread = std::thread::spawn(move || serve_connection(agent, &system, &containers));
        (host, thread)
    }

    fn assert_closed(mut host: UnixStream, thread: std::thread::JoinHandle<()>) {
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "unexpected bytes after the last frame");
        thread.join().unwrap();
    }

    #[test]
    fn serves_several_requests_on_one_connection_until_the_host_closes() {
        let (mut host, thread) = agent_connection();
        for nonce in [1, 2, 3] {
            write_frame(&mut host, &Request::Ping { nonce }).unwrap();
            let answer: Response = read_frame(&mut host).unwrap();
            assert_eq!(answer, Response::Pong { nonce });
        }
        write_frame(&mut host, &Request::Version).unwrap();
        assert!(matches!(
            read_frame::<_, Response>(&mut host).unwrap(),
            Response::Version {
                protocol_version: PROTOCOL_VERSION,
                ..
            }
        ));
        host.shutdown(std::net::Shutdown::Write).unwrap();
        assert_closed(host, thread);
    }

    #[test]
    fn malformed_frame_gets_an_error_and_closes_only_that_connection() {
        let (mut host, thread) = agent_connection();
        let body = br#"{"NoSuchRequest":{}}"#;
        host.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
        host.write_all(body).unwrap();
        match read_frame::<_, Response>(&mut host).unwrap() {
            Response::Error { message, .. } => {
                assert!(message.contains("NoSuchRequest"), "{message}")
            }
            other => panic!("expected an error, got {other:?}"),
        }
        assert_closed(host, thread);

        // A fresh connection is served as before.
        let (mut host, thread) = agent_connection();
        write_frame(&mut host, &Request::Ping { nonce: 7 }).unwrap();
        assert_eq!(
            read_frame::<_, Response>(&mut host).unwrap(),
            Response::Pong { nonce: 7 }
        );
        drop(host);
        thread.join().unwrap();
    }

    #[test]
    fn oversized_length_prefix_closes_the_connection_without_reading_the_body() {
        let (mut host, thread) = agent_connection();
        host.write_all(&(jevm_protocol::MAX_FRAME + 1).to_be_bytes())
            .unwrap();
        assert!(matches!(
            read_frame::<_, Response>(&mut host).unwrap(),
            Response::Error { .. }
        ));
        assert_closed(host, thread);
    }

    /// Serves one connection of `containers`; the test is the host.
    fn connect(containers: &Arc<Service>) -> UnixStream {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let containers = Arc::clone(containers);
        std::thread::spawn(move || serve_connection(agent, &System::new(false), &containers));
        host
    }

    fn ask(host: &mut UnixStream, request: Request) -> Response {
        write_frame(host, &request).unwrap();
        read_frame(host).unwrap()
    }

    #[test]
    fn container_errors_are_answered_and_the_connection_goes_on() {
        let (mut host, thread) = agent_connection();
        assert_eq!(
            ask(
                &mut host,
                Request::Pids {
                    container_id: "nope".into()
                }
            ),
            Response::Error {
                message: "container \"nope\" not found".into(),
                kind: jevm_protocol::ErrorKind::NotFound,
            }
        );
        let attach = Request::AttachStdio {
            container_id: "nope".into(),
            exec_id: None,
            stream: jevm_protocol::StdioStream::Stdout,
        };
        assert!(matches!(ask(&mut host, attach), Response::Error { .. }));
        assert_eq!(
            ask(&mut host, Request::Ping { nonce: 9 }),
            Response::Pong { nonce: 9 }
        );
        drop(host);
        thread.join().unwrap();
    }

    #[test]
    fn events_and_stdio_connections_are_taken_over_after_their_done() {
        use jevm_protocol::{CreateContainer, Event, Stdio, StdioStream};
        let containers = Arc::new(crate::container::tests::fake_service());
        let mut events = connect(&containers);
        assert_eq!(ask(&mut events, Request::Events), Response::Done);

        let mut control = connect(&containers);
        let create = Request::CreateContainer(CreateContainer {
            container_id: "srv".into(),
            spec: crate::container::tests::spec(&["sh", "-c", "echo hi; exit 5"]),
            stdio: Stdio {
                stdout: true,
                ..Stdio::default()
            },
        });
        let Response::Created { pid, .. } = ask(&mut control, create) else {
            panic!("not created")
        };
        let mut stdout = connect(&containers);
        let attach = Request::AttachStdio {
            container_id: "srv".into(),
            exec_id: None,
            stream: StdioStream::Stdout,
        };
        assert_eq!(ask(&mut stdout, attach), Response::Done);
        let start = Request::StartContainer {
            container_id: "srv".into(),
        };
        assert_eq!(ask(&mut control, start), Response::Started { pid });

        let mut out = Vec::new();
        stdout.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hi\n");
        match read_frame::<_, Event>(&mut events).unwrap() {
            Event::Exited {
                container_id,
                exec_id: None,
                pid: p,
                exit_status: 5,
                ..
            } if container_id == "srv" && p == pid => {}
            other => panic!("{other:?}"),
        }
        let delete = Request::DeleteContainer {
            container_id: "srv".into(),
        };
        assert_eq!(ask(&mut control, delete), Response::Done);
    }

    #[test]
    fn a_failed_identity_closes_its_connection_before_what_was_sent_behind_it() {
        let (mut host, thread) = agent_connection();
        // Refused before it changes anything: this is the test's host.
        let identity = Request::Identity(jevm_protocol::Identity {
            entropy: vec![7; crate::identity::MIN_ENTROPY - 1],
            realtime_ns: 0,
            hostname: "clone".into(),
            mount_share: false,
            network: None,
        });
        write_frame(&mut host, &identity).unwrap();
        write_frame(&mut host, &Request::Ping { nonce: 3 }).unwrap();
        match read_frame::<_, Response>(&mut host).unwrap() {
            Response::Error { message, .. } => assert!(message.contains("entropy"), "{message}"),
            other => panic!("expected the identity refused, got {other:?}"),
        }
        // Closed with the ping unread, which a socket reports as a reset.
        let mut rest = Vec::new();
        match host.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "the ping was answered"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
        thread.join().unwrap();
    }

    #[test]
    fn truncated_frame_ends_the_connection_quietly() {
        let (mut host, thread) = agent_connection();
        host.write_all(&100u32.to_be_bytes()).unwrap();
        host.write_all(b"{\"Pi").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        assert_closed(host, thread);
    }
}
