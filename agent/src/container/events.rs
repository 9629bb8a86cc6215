//! The event stream: one subscriber connection at a time, events queued
//! while there is none. One writer thread sends them in order, so a slow
//! host never blocks the code that reports an event.

use jevm_protocol::{write_frame, Event};
use std::collections::VecDeque;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct Inner {
    queue: VecDeque<Event>,
    subscriber: Option<(u64, Arc<UnixStream>)>,
    generation: u64,
}

#[derive(Default)]
pub struct Events {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Events {
    /// A hub with its writer thread.
    pub fn start() -> std::io::Result<Arc<Events>> {
        let events = Arc::new(Events::default());
        let writer = Arc::clone(&events);
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || writer.write_forever())?;
        Ok(events)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, event: Event) {
        log::debug!("event {event:?}");
        self.lock().queue.push_back(event);
        self.changed.notify_all();
    }

    /// Makes `conn` the subscriber; the previous one is shut down. Events
    /// not yet written go to the new one.
    pub fn subscribe(&self, conn: UnixStream) {
        let mut inner = self.lock();
        inner.generation += 1;
        let generation = inner.generation;
        if let Some((_, old)) = inner.subscriber.replace((generation, Arc::new(conn))) {
            let _ = old.shutdown(Shutdown::Both);
        }
        drop(inner);
        self.changed.notify_all();
    }

    fn write_forever(&self) {
        loop {
            let (generation, conn, event) = {
                let mut inner = self.lock();
                loop {
                    if let (Some((generation, conn)), Some(event)) =
                        (&inner.subscriber, inner.queue.front())
                    {
                        break (*generation, Arc::clone(conn), event.clone());
                    }
                    inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
                }
            };
            let written = write_frame(&mut &*conn, &event);
            let mut inner = self.lock();
            match written {
                // Only this thread pops, so the front is still `event`.
                Ok(()) => {
                    inner.queue.pop_front();
                }
                Err(e) => {
                    log::debug!("event subscriber gone: {e}; keeping events for the next");
                    if inner.subscriber.as_ref().map(|s| s.0) == Some(generation) {
                        inner.subscriber = None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jevm_protocol::read_frame;
    use std::time::Duration;

    fn oom(id: &str) -> Event {
        Event::Oom {
            container_id: id.into(),
        }
    }

    #[test]
    fn events_before_a_subscriber_are_queued_and_delivered_in_order() {
        let events = Events::start().unwrap();
        events.push(oom("a"));
        events.push(oom("b"));
        let (mut host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        events.subscribe(agent);
        events.push(oom("c"));
        for id in ["a", "b", "c"] {
            assert_eq!(read_frame::<_, Event>(&mut host).unwrap(), oom(id));
        }
    }

    #[test]
    fn a_new_subscriber_replaces_the_old_one_and_gets_what_follows() {
        let events = Events::start().unwrap();
        let (mut first, agent) = UnixStream::pair().unwrap();
        first
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        events.subscribe(agent);
        events.push(oom("a"));
        assert_eq!(read_frame::<_, Event>(&mut first).unwrap(), oom("a"));

        let (mut second, agent) = UnixStream::pair().unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        events.subscribe(agent);
        events.push(oom("b"));
        assert_eq!(read_frame::<_, Event>(&mut second).unwrap(), oom("b"));
        // The old connection was shut down.
        assert!(read_frame::<_, Event>(&mut first).is_err());
    }
}
