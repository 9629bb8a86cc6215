//! A process's stdio: containerd's FIFOs on the host, one agent stream per
//! FIFO, and the copies between them.
//!
//! Output FIFOs are opened read-write, as containerd's own shims keep a
//! reader on them: opening never blocks on a missing reader and a client
//! that goes away does not break the copy with EPIPE. A FIFO is closed only
//! when its stream reached EOF, so every byte the process wrote arrives.
//! Stdin is opened read-write too (no EOF before the client connects);
//! its end comes from `CloseIO`, after which what is still buffered in the
//! FIFO is drained and the stream is shut down for writing.

use std::sync::Arc;
use std::time::Duration;

use jevm_protocol::{Request, StdioStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::agent::Guest;

/// The stdio containerd asked for (paths empty when not wanted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// How many agent streams the process's stdio takes.
    pub fn streams(&self) -> usize {
        let p = self.protocol();
        [p.stdin, p.stdout, p.stderr].iter().filter(|&&b| b).count()
    }

    /// What the agent is told: with a terminal there is one output stream.
    pub fn protocol(&self) -> jevm_protocol::Stdio {
        jevm_protocol::Stdio {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
            terminal: self.terminal,
        }
    }
}

/// The running copies of one process.
#[derive(Default)]
pub struct Copies {
    close_stdin: Option<oneshot::Sender<()>>,
    stdin: Option<JoinHandle<()>>,
    outputs: Vec<JoinHandle<()>>,
    order: InputOrder,
}

/// Keeps a terminal's resizes and its input in the order the shim got
/// them. They reach the guest over different connections (a request, the
/// stdin stream), so a size a client sends just before a line of input
/// could otherwise be applied after the process has read the line: `kubectl
/// exec -it` sends the size first, and the command run then sees none. A
/// resize holds the write side until the guest applied it; the stdin pump
/// holds the read side while it sends a chunk.
#[derive(Clone, Default)]
pub struct InputOrder(Arc<tokio::sync::RwLock<()>>);

impl InputOrder {
    pub async fn resize<T>(&self, apply: impl std::future::Future<Output = T>) -> T {
        let _held = self.0.write().await;
        apply.await
    }
}

type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// A `file://` URI is a plain file (containerd's log-to-file); anything
/// else without a scheme is a FIFO path.
fn output_path(uri: &str) -> Result<(&str, bool), String> {
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok((p, false));
    }
    if uri.contains("://") {
        return Err(format!(
            "stdio {uri:?}: only FIFO paths and file:// are supported"
        ));
    }
    Ok((uri, true))
}

async fn open_output(uri: &str) -> Result<Writer, String> {
    let (path, fifo) = output_path(uri)?;
    if fifo {
        let is_fifo = std::fs::metadata(path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))
            .unwrap_or(false);
        if is_fifo {
            let s = pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(path)
                .map_err(|e| format!("stdio FIFO {path}: {e}"))?;
            return Ok(Box::new(s));
        }
    }
    let f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| format!("stdio file {path}: {e}"))?;
    Ok(Box::new(f))
}

fn open_stdin(uri: &str) -> Result<pipe::Receiver, String> {
    let (path, _) = output_path(uri)?;
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .map_err(|e| format!("stdin FIFO {path}: {e}"))
}

/// Opens the FIFOs and the agent streams of a created process and starts
/// copying. Must run before the process is started. On error nothing is
/// left open.
pub async fn attach(
    agent: &dyn Guest,
    container_id: &str,
    exec_id: Option<&str>,
    paths: &StdioPaths,
) -> Result<Copies, String> {
    let want = paths.protocol();
    let stream = |s: StdioStream| Request::AttachStdio {
        container_id: container_id.to_string(),
        exec_id: exec_id.map(str::to_string),
        stream: s,
    };
    let what = |s: StdioStream| match exec_id {
        Some(e) => format!("container {container_id:?} exec {e:?}: attaching {s:?}"),
        None => format!("container {container_id:?}: attaching {s:?}"),
    };
    // The streams are opened at once: each is a vsock connection to the
    // agent, and their handshakes overlap. Any failure drops what the
    // others opened.
    let output = |which: StdioStream, uri: &str, wanted: bool| {
        let uri = uri.to_string();
        let req = stream(which);
        async move {
            if !wanted {
                return Ok(None);
            }
            let w = open_output(&uri)
                .await
                .map_err(|e| format!("{}: {e}", what(which)))?;
            let s = agent
                .stream("AttachStdio", req)
                .await
                .map_err(|e| format!("{}: {e}", what(which)))?;
            Ok::<_, String>(Some((w, s)))
        }
    };
    let input = async {
        if !want.stdin {
            return Ok(None);
        }
        let r =
            open_stdin(&paths.stdin).map_err(|e| format!("{}: {e}", what(StdioStream::Stdin)))?;
        let s = agent
            .stream("AttachStdio", stream(StdioStream::Stdin))
            .await
            .map_err(|e| format!("{}: {e}", what(StdioStream::Stdin)))?;
        Ok::<_, String>(Some((r, s)))
    };
    let (stdout, stderr, stdin) = tokio::join!(
        output(StdioStream::Stdout, &paths.stdout, want.stdout),
        output(StdioStream::Stderr, &paths.stderr, want.stderr),
        input
    );
    let (stdout, stderr, stdin) = (stdout?, stderr?, stdin?);
    let mut copies = Copies::default();
    for (w, s) in [stdout, stderr].into_iter().flatten() {
        copies.outputs.push(tokio::spawn(copy_out(s, w)));
    }
    if let Some((r, s)) = stdin {
        let (tx, rx) = oneshot::channel();
        copies.close_stdin = Some(tx);
        copies.stdin = Some(tokio::spawn(pump_stdin(r, s, rx, copies.order.clone())));
    }
    Ok(copies)
}

async fn copy_out<R: AsyncRead + Unpin>(mut from: R, mut to: Writer) {
    if let Err(e) = tokio::io::copy(&mut from, &mut to).await {
        log::warn!("stdio copy ended early: {e}");
    }
    let _ = to.flush().await;
    // Dropping the writer closes the FIFO: the client sees EOF.
}

/// The most of a client's stdin read and sent on at once.
const STDIN_CHUNK: usize = 64 * 1024;

async fn pump_stdin<W: AsyncWrite + Unpin>(
    mut fifo: pipe::Receiver,
    mut to: W,
    mut close: oneshot::Receiver<()>,
    order: InputOrder,
) {
    // Made at the first byte: most containers never read their stdin, and
    // a buffer made up front would be heap every idle pod keeps.
    let mut buf = Vec::new();
    loop {
        tokio::select! {
            r = fifo.readable() => {
                if r.is_err() {
                    break;
                }
                if buf.is_empty() {
                    buf = vec![0u8; STDIN_CHUNK];
                }
                match fifo.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let _ordered = order.0.read().await;
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            // CloseIO, or the process went away (sender dropped).
            _ = &mut close => {
                buf.resize(STDIN_CHUNK, 0);
                let _ordered = order.0.read().await;
                drain(&mut fifo, &mut to, &mut buf).await;
                break;
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Writes what is still buffered in the FIFO: the client closed its end
/// before sending CloseIO, so everything it wrote is already there.
async fn drain<W: AsyncWrite + Unpin>(fifo: &mut pipe::Receiver, to: &mut W, buf: &mut [u8]) {
    use std::os::fd::AsRawFd;
    loop {
        // A plain non-blocking read: tokio's try_read trusts its cached
        // readiness, which may not know about data that is already there.
        match nix::unistd::read(fifo.as_raw_fd(), buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

impl Copies {
    /// What a resize of this process's terminal goes through.
    pub fn input_order(&self) -> InputOrder {
        self.order.clone()
    }

    /// EOF for the process's stdin once the FIFO is drained.
    pub fn close_stdin(&mut self) {
        if let Some(tx) = self.close_stdin.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the output copies to finish (their streams reached EOF),
    /// at most `timeout`, then stops whatever is left.
    pub async fn finish(mut self, timeout: Duration) {
        self.close_stdin();
        let outputs = std::mem::take(&mut self.outputs);
        let aborts: Vec<_> = outputs.iter().map(|h| h.abort_handle()).collect();
        if tokio::time::timeout(timeout, futures_join(outputs))
            .await
            .is_err()
        {
            log::warn!("stdio copies still running after {timeout:?}; closing them");
            for a in aborts {
                a.abort();
            }
        }
        if let Some(h) = self.stdin.take() {
            h.abort();
        }
    }
}

impl Drop for Copies {
    fn drop(&mut self) {
        for h in &self.outputs {
            h.abort();
        }
        if let Some(h) = &self.stdin {
            h.abort();
        }
    }
}

async fn futures_join(hs: Vec<JoinHandle<()>>) {
    for h in hs {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn terminal_means_one_output_stream() {
        let p = StdioPaths {
            stdin: "/f/in".into(),
            stdout: "/f/out".into(),
            stderr: "/f/err".into(),
            terminal: true,
        };
        let s = p.protocol();
        assert!(s.stdin && s.stdout && !s.stderr && s.terminal);
        let p = StdioPaths {
            terminal: false,
            ..p
        };
        assert!(p.protocol().stderr);
        assert_eq!(
            StdioPaths::default().protocol(),
            jevm_protocol::Stdio::default()
        );
    }

    #[test]
    fn uris_other_than_fifo_and_file_are_refused() {
        assert_eq!(
            output_path("/run/x/stdout").unwrap(),
            ("/run/x/stdout", true)
        );
        assert_eq!(
            output_path("file:///var/log/c.log").unwrap(),
            ("/var/log/c.log", false)
        );
        assert!(output_path("binary:///usr/bin/logger?x=1").is_err());
    }

    fn fifo(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p
    }

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("jevm-stdio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn output_arrives_complete_and_the_fifo_closes_at_stream_eof() {
        let d = tempdir("out");
        let path = fifo(&d, "stdout");
        // The client's reader, as containerd opens it before Create.
        let mut reader = pipe::OpenOptions::new().open_receiver(&path).unwrap();
        let w = open_output(path.to_str().unwrap()).await.unwrap();
        let (mut guest, host) = tokio::net::UnixStream::pair().unwrap();
        let copy = tokio::spawn(copy_out(host, w));
        let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            guest.write_all(&sent).await.unwrap();
            guest.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        copy.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A stdin FIFO in `d` pumped to the guest end of a socket pair: the
    /// FIFO's path, the guest end, the CloseIO sender, the pump and the
    /// input order its resizes go through.
    fn stdin_pump(
        d: &std::path::Path,
    ) -> (
        std::path::PathBuf,
        tokio::net::UnixStream,
        oneshot::Sender<()>,
        JoinHandle<()>,
        InputOrder,
    ) {
        let path = fifo(d, "stdin");
        let r = open_stdin(path.to_str().unwrap()).unwrap();
        let (host, guest) = tokio::net::UnixStream::pair().unwrap();
        let (tx, rx) = oneshot::channel();
        let order = InputOrder::default();
        let pump = tokio::spawn(pump_stdin(r, host, rx, order.clone()));
        (path, guest, tx, pump, order)
    }

    #[tokio::test]
    async fn input_that_follows_a_resize_reaches_the_guest_after_it_is_applied() {
        let d = tempdir("in-resize");
        let (path, mut guest, tx, pump, order) = stdin_pump(&d);
        let applied = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A resize in flight: the guest takes 200 ms to apply it.
        let resize = tokio::spawn({
            let (order, applied) = (order.clone(), Arc::clone(&applied));
            async move {
                order
                    .resize(async {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        applied.store(true, std::sync::atomic::Ordering::SeqCst);
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut w = pipe::OpenOptions::new().open_sender(&path).unwrap();
        w.write_all(b"go\n").await.unwrap();
        let mut got = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(10), guest.read_exact(&mut got))
            .await
            .expect("stdin not relayed after the resize")
            .unwrap();
        assert!(
            applied.load(std::sync::atomic::Ordering::SeqCst),
            "input reached the guest before the resize sent ahead of it was applied"
        );
        assert_eq!(&got, b"go\n");
        resize.await.unwrap();
        drop(w);
        tx.send(()).unwrap();
        pump.await.unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn close_io_drains_the_fifo_then_sends_eof() {
        let d = tempdir("in");
        let (path, mut guest, tx, pump, _) = stdin_pump(&d);
        {
            // The client writes and closes before it sends CloseIO.
            let mut w = pipe::OpenOptions::new().open_sender(&path).unwrap();
            w.write_all(b"hello\nworld\n").await.unwrap();
        }
        tx.send(()).unwrap();
        let mut got = Vec::new();
        guest.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello\nworld\n");
        pump.await.unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn stdin_is_relayed_while_open_in_chunks_of_any_size() {
        let d = tempdir("in-open");
        let (path, mut guest, tx, pump, _) = stdin_pump(&d);
        let mut w = pipe::OpenOptions::new().open_sender(&path).unwrap();
        // More than one chunk, and the writer stays open: nothing waits
        // for CloseIO.
        let data: Vec<u8> = (0..STDIN_CHUNK * 3 + 17).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            (w, data)
        });
        let mut got = vec![0u8; STDIN_CHUNK * 3 + 17];
        tokio::time::timeout(Duration::from_secs(10), guest.read_exact(&mut got))
            .await
            .expect("stdin not relayed while the client kept it open")
            .unwrap();
        let (w, data) = writer.await.unwrap();
        assert!(got == data, "stdin arrived changed");
        drop(w);
        tx.send(()).unwrap();
        pump.await.unwrap();
        let mut rest = Vec::new();
        guest.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
