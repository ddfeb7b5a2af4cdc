//! The in-process fan-out: one ring of the latest events and one waker per subscriber.
//!
//! Publishing writes the event into the ring under its write lock, advances the head and wakes
//! every subscriber that is waiting. A subscriber reads the events it has not seen from the
//! ring under its read lock and, when it has seen them all, leaves its waker in its own slot:
//! waiting takes no lock any other subscriber or the publisher needs. (Until issue #23's third
//! pass this was a `tokio::sync::broadcast` channel, whose receivers register as waiters in one
//! list under one mutex, the tail lock the sender also holds while it pops them: with 1,000
//! subscribers on two workers that was 1,000 acquisitions of a contended lock per
//! notification, beside the wakes themselves.)
//!
//! A subscriber that falls more than the ring's capacity behind gets [`Event::Resync`] in place
//! of what it missed, then the newer events.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};

use futures_util::task::AtomicWaker;

use super::Event;

/// Wakers taken per hold of the slots' read lock when publishing.
const WAKE_BATCH: usize = 32;

/// The ring, the subscribers' wakers and whether the hub is closed.
pub(super) struct Hub {
    /// Events `head - capacity .. head` at index `seq % capacity`.
    ring: RwLock<Box<[Option<Event>]>>,
    /// Sequence number of the next event published.
    head: AtomicU64,
    /// The subscribers' waker slots; `None` where a subscriber has gone (its index is reused).
    slots: RwLock<Slots>,
    /// Live subscribers.
    count: AtomicUsize,
    /// No more events will come (every publishing handle is gone).
    closed: AtomicBool,
}

#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Arc<AtomicWaker>>>,
    free: Vec<usize>,
}

impl Hub {
    /// A hub keeping the latest `capacity` events (at least 1).
    pub(super) fn new(capacity: usize) -> Hub {
        Hub {
            ring: RwLock::new((0..capacity.max(1)).map(|_| None).collect()),
            head: AtomicU64::new(0),
            slots: RwLock::new(Slots::default()),
            count: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Publish `event` to every subscriber.
    pub(super) fn publish(&self, event: Event) {
        {
            let mut ring = self.ring.write().unwrap_or_else(PoisonError::into_inner);
            let seq = self.head.load(Ordering::Relaxed);
            let at = (seq % ring.len() as u64) as usize;
            ring[at] = Some(event);
            self.head.store(seq + 1, Ordering::Release);
        }
        self.wake_all();
    }

    /// No event will be published any more: subscribers end once they have read the rest.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake_all();
    }

    /// Wake every waiting subscriber. The wakers are taken under the slots' read lock
    /// [`WAKE_BATCH`] at a time and called with it released, so a waker that subscribes or
    /// unsubscribes as it runs (the slots' write lock) cannot deadlock against this.
    fn wake_all(&self) {
        let mut next = 0;
        loop {
            let mut batch: [Option<Waker>; WAKE_BATCH] = Default::default();
            let mut taken = 0;
            let more = {
                let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
                while taken < WAKE_BATCH && next < slots.wakers.len() {
                    if let Some(w) = slots.wakers[next].as_ref().and_then(|w| w.take()) {
                        batch[taken] = Some(w);
                        taken += 1;
                    }
                    next += 1;
                }
                next < slots.wakers.len()
            };
            for w in batch.into_iter().flatten() {
                w.wake();
            }
            if !more {
                return;
            }
        }
    }

    /// Live subscribers.
    pub(super) fn subscribers(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// A new subscriber's cursor: it sees the events published from now on.
    pub(super) fn subscribe(self: &Arc<Self>) -> Cursor {
        let waker = Arc::new(AtomicWaker::new());
        let key = {
            let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
            match slots.free.pop() {
                Some(k) => {
                    slots.wakers[k] = Some(waker.clone());
                    k
                }
                None => {
                    slots.wakers.push(Some(waker.clone()));
                    slots.wakers.len() - 1
                }
            }
        };
        self.count.fetch_add(1, Ordering::Relaxed);
        Cursor {
            hub: self.clone(),
            next: self.head.load(Ordering::Acquire),
            key,
            waker,
        }
    }
}

/// One subscriber's place in the hub; dropping it unsubscribes.
pub(super) struct Cursor {
    hub: Arc<Hub>,
    /// Sequence number of the next event this subscriber reads.
    next: u64,
    key: usize,
    waker: Arc<AtomicWaker>,
}

impl Cursor {
    /// The next event (`Resync` in place of events lost to lag), `None` once the hub is closed
    /// and read to its end, or pending (the waker is left in this subscriber's slot).
    pub(super) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if let Some(ev) = self.try_recv() {
            return Poll::Ready(Some(ev));
        }
        if self.hub.closed.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        self.waker.register(cx.waker());
        // Published (or closed) between the first look and the registration: its wake may
        // have found no waker, so look again.
        if let Some(ev) = self.try_recv() {
            return Poll::Ready(Some(ev));
        }
        if self.hub.closed.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// The next event if one has been published since this subscriber's last.
    fn try_recv(&mut self) -> Option<Event> {
        if self.hub.head.load(Ordering::Acquire) == self.next {
            return None;
        }
        let ring = self.hub.ring.read().unwrap_or_else(PoisonError::into_inner);
        let head = self.hub.head.load(Ordering::Acquire);
        let capacity = ring.len() as u64;
        if head - self.next > capacity {
            // Overwritten before this subscriber read them: it re-reads instead.
            tracing::debug!(
                missed = head - capacity - self.next,
                "subscriber lagged; resync"
            );
            self.next = head - capacity;
            return Some(Event::Resync);
        }
        let ev = ring[(self.next % capacity) as usize].clone();
        self.next += 1;
        ev
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        let mut slots = self
            .hub
            .slots
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = slots.wakers.get_mut(self.key) {
            *w = None;
            slots.free.push(self.key);
        }
        self.hub.count.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;

    use crate::coord::notify::{Event, EventKind, Notifier};
    use crate::ids::RunId;

    fn ev(run_id: RunId, seq: i64) -> Event {
        Event::RunEvent { run_id, seq }
    }

    /// Subscribers on two workers, each event published the moment the last subscriber has
    /// read the one before (so every publish races subscribers between their last look and
    /// the registration of their waker): each sees every event, in order, none lost. A lost
    /// wake-up leaves its subscriber waiting for an event that never comes. (The window is a
    /// few instructions wide: without the second look after registering, this failed one run
    /// in four here.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_waiting_subscriber_sees_every_event_in_order() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let (subscribers, events) = (4, 50_000);
        let notifier = Notifier::new(16);
        let run = RunId::new();
        let read = Arc::new(AtomicUsize::new(0));
        let all_read = Arc::new(tokio::sync::Notify::new());
        let tasks: Vec<_> = (0..subscribers)
            .map(|_| {
                let mut sub = notifier.subscribe(&[EventKind::RunEvent]);
                let (read, all_read) = (read.clone(), all_read.clone());
                tokio::spawn(async move {
                    for want in 0..events {
                        let got = tokio::time::timeout(Duration::from_secs(10), sub.next()).await;
                        assert_eq!(got, Ok(Some(ev(run, want))), "event {want}");
                        if read.fetch_add(1, Ordering::AcqRel) + 1 == subscribers {
                            read.store(0, Ordering::Release);
                            all_read.notify_one();
                        }
                    }
                })
            })
            .collect();
        for seq in 0..events {
            notifier.publish(ev(run, seq));
            let all = tokio::time::timeout(Duration::from_secs(10), all_read.notified()).await;
            assert!(all.is_ok(), "event {seq} not read by every subscriber");
        }
        for t in tasks {
            assert!(t.await.is_ok());
        }
    }

    /// When the last handle that can publish is gone, a subscriber reads what is left, then
    /// ends; one that was waiting is woken to end.
    #[tokio::test]
    async fn subscribers_end_after_the_rest_once_the_notifier_is_gone() {
        let notifier = Notifier::new(16);
        let run = RunId::new();
        let mut behind = notifier.subscribe(&[]);
        let mut waiting = notifier.subscribe(&[]);
        notifier.publish(ev(run, 1));
        assert_eq!(waiting.next().await, Some(ev(run, 1)));
        let waiter = tokio::spawn(async move { waiting.next().await });
        tokio::task::yield_now().await;
        drop(notifier);
        assert_eq!(behind.next().await, Some(ev(run, 1)));
        assert_eq!(behind.next().await, None);
        let ended = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(ended, Ok(Ok(None))), "{ended:?}");
    }

    /// A waker that, as it is woken, drops the subscription it holds (unsubscribes).
    struct Unsubscribes(std::sync::Mutex<Option<crate::coord::notify::Subscription>>);

    impl std::task::Wake for Unsubscribes {
        fn wake(self: std::sync::Arc<Self>) {
            if let Ok(mut held) = self.0.lock() {
                held.take();
            }
        }
    }

    /// Wakers are called with the slots' lock released: one that unsubscribes as it is woken
    /// (taking that lock to write) does not deadlock the publisher.
    #[test]
    fn a_waker_that_unsubscribes_as_it_is_woken_does_not_block_the_publisher() {
        use std::pin::Pin;
        use std::sync::{Arc, Mutex};
        use std::task::{Context, Waker};

        use futures_util::Stream;

        let notifier = Notifier::new(16);
        let mut waiting = notifier.subscribe(&[]);
        let held = notifier.subscribe(&[]);
        let waker = Waker::from(Arc::new(Unsubscribes(Mutex::new(Some(held)))));
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut waiting).poll_next(&mut cx).is_pending());
        let (done, published) = std::sync::mpsc::channel();
        let publisher = notifier.clone();
        std::thread::spawn(move || {
            publisher.publish(ev(RunId::new(), 1));
            let _ = done.send(());
        });
        if published.recv_timeout(Duration::from_secs(5)).is_err() {
            // The publisher is stuck holding the slots' lock: leave alone what would take it,
            // so the test fails rather than hangs.
            std::mem::forget(waiting);
            std::mem::forget(notifier);
            panic!("publish did not return within 5 s: a waker ran under the slots' lock");
        }
        assert_eq!(notifier.subscriber_count(), 1);
    }

    /// A dropped subscription leaves: the count falls and its slot is taken by the next one,
    /// which sees only what is published after it subscribed.
    #[tokio::test]
    async fn a_dropped_subscription_frees_its_slot() {
        let notifier = Notifier::new(16);
        let run = RunId::new();
        let a = notifier.subscribe(&[]);
        let b = notifier.subscribe(&[]);
        assert_eq!(notifier.subscriber_count(), 2);
        drop(a);
        assert_eq!(notifier.subscriber_count(), 1);
        notifier.publish(ev(run, 1));
        let mut c = notifier.subscribe(&[]);
        assert_eq!(notifier.subscriber_count(), 2);
        assert_eq!(
            notifier
                .shared
                .hub
                .slots
                .read()
                .map(|s| s.wakers.len())
                .ok(),
            Some(2)
        );
        notifier.publish(ev(run, 2));
        assert_eq!(c.next().await, Some(ev(run, 2)));
        drop((b, c));
        assert_eq!(notifier.subscriber_count(), 0);
    }
}
