//! A process's standard streams: what the stage gets as fds 0-2, what the
//! agent keeps, and the threads that pump bytes between the agent's ends and
//! the host's vsock connections.
//!
//! Every pump is a thread doing blocking reads and writes: a stream costs a
//! thread while it is attached, and no stream is ever polled.

use jevm_protocol::Stdio;
use nix::fcntl::OFlag;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

const PUMP_BUFFER: usize = 64 << 10;

/// The process's side: fds 0, 1, 2 of the stage, in that order. Dropped by
/// the agent right after the fork, so EOF on a pipe means the process (and
/// whatever inherited the pipe) is done with it.
pub struct ChildStdio {
    fds: [OwnedFd; 3],
}

impl ChildStdio {
    pub fn raw(&self) -> [RawFd; 3] {
        [
            self.fds[0].as_raw_fd(),
            self.fds[1].as_raw_fd(),
            self.fds[2].as_raw_fd(),
        ]
    }
}

/// The agent's side, waiting for the host to attach a connection.
pub struct AgentStdio {
    /// Write end of the stdin pipe (or the terminal master).
    pub stdin: Option<File>,
    /// Read end of the stdout pipe (or the terminal master).
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    /// The terminal master, for resizing.
    pub master: Option<OwnedFd>,
}

/// Builds the streams `stdio` asks for; the others are `/dev/null`.
pub fn make(stdio: &Stdio) -> io::Result<(ChildStdio, AgentStdio)> {
    if stdio.terminal {
        return make_terminal();
    }
    let (child_in, agent_in) = if stdio.stdin {
        let (r, w) = pipe()?;
        (r, Some(File::from(w)))
    } else {
        (dev_null()?, None)
    };
    let (child_out, agent_out) = output(stdio.stdout)?;
    let (child_err, agent_err) = output(stdio.stderr)?;
    Ok((
        ChildStdio {
            fds: [child_in, child_out, child_err],
        },
        AgentStdio {
            stdin: agent_in,
            stdout: agent_out,
            stderr: agent_err,
            master: None,
        },
    ))
}

fn output(wanted: bool) -> io::Result<(OwnedFd, Option<File>)> {
    if wanted {
        let (r, w) = pipe()?;
        Ok((w, Some(File::from(r))))
    } else {
        Ok((dev_null()?, None))
    }
}

/// With a terminal the stage allocates it in the container; until then its
/// fds 0-2 are `/dev/null` and the agent has no ends (see [`Terminal`]).
fn make_terminal() -> io::Result<(ChildStdio, AgentStdio)> {
    Ok((
        ChildStdio {
            fds: [dev_null()?, dev_null()?, dev_null()?],
        },
        AgentStdio {
            stdin: None,
            stdout: None,
            stderr: None,
            master: None,
        },
    ))
}

/// The master of the pseudo-terminal the stage allocated in the container,
/// with the copies the pumps take, made as soon as it arrives so that
/// running out of fds fails the create, not a later attach.
pub struct Terminal {
    master: OwnedFd,
    input: File,
    output: File,
}

impl Terminal {
    pub fn new(master: OwnedFd) -> io::Result<Terminal> {
        // try_clone dups close-on-exec: no later stage inherits them.
        let input = File::from(master.try_clone()?);
        let output = File::from(master.try_clone()?);
        Ok(Terminal {
            master,
            input,
            output,
        })
    }

    /// The agent's ends: one output stream (the terminal merges stderr
    /// into it), stdin if asked for, and the master for resizing.
    pub fn ends(self, wanted: &Stdio) -> AgentStdio {
        AgentStdio {
            stdin: wanted.stdin.then_some(self.input),
            stdout: wanted.stdout.then_some(self.output),
            stderr: None,
            master: Some(self.master),
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

fn dev_null() -> io::Result<OwnedFd> {
    // std opens close-on-exec.
    Ok(OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

/// Sets the terminal size on a pseudo-terminal master.
pub fn resize(master: &OwnedFd, width: u32, height: u32) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: u16::try_from(height).unwrap_or(u16::MAX),
        ws_col: u16::try_from(width).unwrap_or(u16::MAX),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives
    // across the call; the fd is owned by the caller.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads like `read`, with the end of a terminal (EIO once every slave fd is
/// closed) reported as EOF.
fn read_source(src: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match src.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            other => return other,
        }
    }
}

/// Process -> host: copies `src` to `conn` until the process side reaches
/// EOF, then shuts the connection down. If the host goes away the rest is
/// read and dropped, so the process is not blocked on a full pipe and its
/// exit is still reported.
pub fn pump_output(mut src: File, mut conn: UnixStream) {
    let mut buf = vec![0u8; PUMP_BUFFER];
    let mut host_gone = false;
    loop {
        let n = match read_source(&mut src, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                log::debug!("reading process output: {e}");
                break;
            }
        };
        if !host_gone {
            if let Err(e) = conn.write_all(&buf[..n]) {
                log::debug!("writing process output to the host: {e}");
                host_gone = true;
            }
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

/// Host -> process: copies `conn` to `dst` until the host's EOF (or until
/// the connection is shut down for reading by `CloseStdin`), then drops
/// `dst`, so the process reads EOF.
pub fn pump_input(mut conn: UnixStream, mut dst: File) {
    let mut buf = vec![0u8; PUMP_BUFFER];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("reading stdin from the host: {e}");
                break;
            }
        };
        if let Err(e) = dst.write_all(&buf[..n]) {
            // EPIPE: the process closed its stdin; the rest has no reader.
            log::debug!("writing stdin to the process: {e}");
            break;
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stdio(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> Stdio {
        Stdio {
            stdin,
            stdout,
            stderr,
            terminal,
        }
    }

    #[test]
    fn streams_not_asked_for_are_dev_null_and_have_no_agent_end() {
        let (child, agent) = make(&stdio(false, true, false, false)).unwrap();
        assert!(agent.stdin.is_none() && agent.stderr.is_none() && agent.master.is_none());
        let link = |fd: RawFd| std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let [i, o, e] = child.raw();
        assert_eq!(link(i), std::path::Path::new("/dev/null"));
        assert_eq!(link(e), std::path::Path::new("/dev/null"));
        assert!(link(o).to_string_lossy().starts_with("pipe:"));
    }

    #[test]
    fn eight_mib_through_the_output_pump_arrive_complete() {
        let (child, agent) = make(&stdio(false, true, false, false)).unwrap();
        let (host, agent_conn) = UnixStream::pair().unwrap();
        let pump = std::thread::spawn(move || pump_output(agent.stdout.unwrap(), agent_conn));
        let payload: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let writer = {
            let payload = payload.clone();
            let fd = child.fds[1].try_clone().unwrap();
            std::thread::spawn(move || File::from(fd).write_all(&payload).unwrap())
        };
        drop(child);
        let mut got = Vec::new();
        (&host).read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        pump.join().unwrap();
        assert_eq!(got.len(), payload.len());
        assert!(got == payload, "bytes differ");
    }

    #[test]
    fn input_pump_closes_the_pipe_at_the_host_eof() {
        let (child, agent) = make(&stdio(true, false, false, false)).unwrap();
        let (host, agent_conn) = UnixStream::pair().unwrap();
        let pump = std::thread::spawn(move || pump_input(agent_conn, agent.stdin.unwrap()));
        (&host).write_all(b"hello\n").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = String::new();
        File::from(child.fds[0].try_clone().unwrap())
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "hello\n");
        pump.join().unwrap();
    }

    #[test]
    fn input_pump_ends_when_its_connection_is_shut_down_for_reading() {
        let (_child, agent) = make(&stdio(true, false, false, false)).unwrap();
        let (_host, agent_conn) = UnixStream::pair().unwrap();
        let handle = agent_conn.try_clone().unwrap();
        let pump = std::thread::spawn(move || pump_input(agent_conn, agent.stdin.unwrap()));
        std::thread::sleep(Duration::from_millis(50));
        handle.shutdown(std::net::Shutdown::Read).unwrap();
        pump.join().unwrap();
    }

    #[test]
    fn a_terminal_leaves_the_stage_dev_null_until_it_allocates_one() {
        let (child, agent) = make(&stdio(true, true, false, true)).unwrap();
        assert!(agent.stdin.is_none() && agent.stdout.is_none() && agent.master.is_none());
        for fd in child.raw() {
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            assert_eq!(link, std::path::Path::new("/dev/null"));
        }
    }

    #[test]
    fn terminal_output_ends_with_the_last_slave_and_resize_is_seen_by_the_slave() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let terminal = Terminal::new(pty.master).unwrap();
        let agent = terminal.ends(&stdio(false, true, true, true));
        assert!(agent.stdin.is_none() && agent.stderr.is_none());
        let master = agent.master.as_ref().unwrap();
        resize(master, 120, 40).unwrap();
        let mut ws = nix::pty::Winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which outlives the call.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_col, ws.ws_row), (120, 40));

        let (host, agent_conn) = UnixStream::pair().unwrap();
        let out = agent.stdout.unwrap();
        let pump = std::thread::spawn(move || pump_output(out, agent_conn));
        File::from(pty.slave).write_all(b"tty").unwrap();
        let mut got = Vec::new();
        (&host).read_to_end(&mut got).unwrap();
        pump.join().unwrap();
        assert_eq!(got, b"tty");
    }
}
