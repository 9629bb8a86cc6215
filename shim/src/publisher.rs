//! Task events to containerd, in order and none lost.
//!
//! containerd can restart under a running shim (upgrades, the CRI tests).
//! The shim crate's publisher retries an event a few times over ~20 s and
//! then drops it; an exit dropped that way leaves a client's `Wait` to
//! containerd's own recovery. Here an event that could not be delivered is
//! retried, ahead of every later one, until containerd takes it: the
//! connection is dialled again with a capped backoff. An event containerd
//! answered with an error is not retried (it would refuse it again) but
//! logged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::context::with_duration;
use tokio::sync::mpsc;

use crate::events::Outgoing;

/// How long containerd may take to take one event.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Whether a failed forward may succeed on a new connection.
pub fn is_transport_error(e: &ttrpc::Error) -> bool {
    !matches!(e, ttrpc::Error::RpcStatus(_))
}

fn sockaddr(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("unix://{address}")
    }
}

/// Publishes what arrives on `rx` to containerd's ttrpc `address`;
/// `unpublished` counts down as containerd takes each event.
pub async fn run(
    address: String,
    namespace: String,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    unpublished: Arc<AtomicUsize>,
) {
    let mut client: Option<EventsClient> = None;
    while let Some(o) = rx.recv().await {
        let any = match o.event {
            Ok(a) => a,
            Err(e) => {
                log::error!("event {}: {e}", o.topic);
                unpublished.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
        };
        let mut req = ForwardRequest::new();
        req.set_envelope(Envelope {
            timestamp: Some(o.at).into(),
            namespace: namespace.clone(),
            topic: o.topic.clone(),
            event: Some(any).into(),
            ..Default::default()
        });
        let mut backoff = BACKOFF_FIRST;
        let mut failures = 0u32;
        loop {
            let c = match &client {
                Some(c) => c,
                None => match Client::connect(&sockaddr(&address)).await {
                    Ok(c) => client.insert(EventsClient::new(c)),
                    Err(e) => {
                        failures += 1;
                        if failures == 1 {
                            log::warn!(
                                "event {}: containerd at {address} unreachable ({e}); retrying until it is back",
                                o.topic
                            );
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                },
            };
            match c.forward(with_duration(FORWARD_TIMEOUT), &req).await {
                Ok(_) => {
                    if failures > 0 {
                        log::info!("event {}: published after {failures} failed tries", o.topic);
                    }
                    break;
                }
                Err(e) if is_transport_error(&e) => {
                    failures += 1;
                    if failures == 1 {
                        log::warn!("event {}: {e}; retrying on a new connection", o.topic);
                    }
                    client = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(e) => {
                    log::error!("event {}: containerd refused it: {e}", o.topic);
                    break;
                }
            }
        }
        unpublished.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{outgoing, task_exit};
    use containerd_shim_protos::api::Empty;
    use containerd_shim_protos::shim_async::{create_events, Events};
    use containerd_shim_protos::ttrpc::r#async::{Server, TtrpcContext};
    use std::sync::Mutex;

    #[derive(Default, Clone)]
    struct Sink(Arc<Mutex<Vec<(String, i64)>>>);

    #[async_trait::async_trait]
    impl Events for Sink {
        async fn forward(&self, _ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
            let e = req.envelope();
            self.0
                .lock()
                .unwrap()
                .push((e.topic.clone(), e.timestamp.seconds));
            Ok(Empty::default())
        }
    }

    async fn serve(path: &std::path::Path, sink: &Sink) -> Server {
        let svc = create_events(Arc::new(sink.clone()));
        let mut s = Server::new()
            .bind(&sockaddr(&path.display().to_string()))
            .unwrap()
            .register_service(svc);
        s.start().await.unwrap();
        s
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_made_while_containerd_is_down_arrive_in_order_once_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("containerd.sock.ttrpc");
        let (tx, rx) = mpsc::unbounded_channel();
        let unpublished = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(run(
            sock.display().to_string(),
            "ns".into(),
            rx,
            Arc::clone(&unpublished),
        ));
        // Nobody listens yet: containerd is down.
        for i in 0..3 {
            unpublished.fetch_add(1, Ordering::SeqCst);
            let mut o = outgoing(task_exit("c", None, i, i, crate::events::now()));
            o.at.seconds = i64::from(i) + 1;
            tx.send(o).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(unpublished.load(Ordering::SeqCst), 3);

        let sink = Sink::default();
        let mut server = serve(&sock, &sink).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while unpublished.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = sink.0.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                ("/tasks/exit".to_string(), 1),
                ("/tasks/exit".to_string(), 2),
                ("/tasks/exit".to_string(), 3)
            ]
        );

        // containerd restarts: the old connection is dead, a new one is dialled.
        server.shutdown().await.unwrap();
        drop(server);
        let _ = std::fs::remove_file(&sock);
        let sink2 = Sink::default();
        let _server2 = serve(&sock, &sink2).await;
        unpublished.fetch_add(1, Ordering::SeqCst);
        tx.send(outgoing(task_exit("c", None, 9, 9, crate::events::now())))
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while unpublished.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(sink2.0.lock().unwrap().len(), 1, "event after the restart");
        drop(tx);
        task.await.unwrap();
    }
}
