//! A single-consumer queue budgeted in bytes, into which the connection's
//! reader pushes without ever waiting. The reader is the only task that hears
//! libvirtd: if it waited for a slow consumer (a console whose stdout nobody
//! reads), replies, PINGs and events would stop with it and a healthy daemon
//! would be declared dead. So a consumer that falls behind loses items — and
//! is told how many — instead of stalling the connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// What a consumer receives.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Popped<T> {
    /// The next item.
    Item(T),
    /// Items were dropped here because the consumer fell behind: how many
    /// units (bytes for a stream, events for a listener) were lost.
    Lost(u64),
    /// The producer is gone and everything queued has been received.
    Closed,
}

/// Whether a push was kept.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// Over budget: dropped and counted.
    Dropped,
    /// The consumer is gone: the producer should forget this queue.
    ReceiverGone,
}

enum Entry<T> {
    Item(T, usize),
    /// Where items were dropped, and how many units.
    Lost(u64),
}

struct State<T> {
    /// Items and loss markers in arrival order, so a consumer learns of a
    /// gap exactly where it is.
    items: VecDeque<Entry<T>>,
    bytes: usize,
    budget: usize,
    closed: bool,
    receiver_gone: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    notify: Notify,
}

impl<T> Shared<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section is a few field updates that cannot panic half-way.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The producing end, held by the reader.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            shared: self.shared.clone(),
        }
    }
}

/// The consuming end.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.state();
        f.debug_struct("Receiver")
            .field("queued", &state.items.len())
            .field("bytes", &state.bytes)
            .field("budget", &state.budget)
            .finish()
    }
}

/// A queue that holds at most `budget` bytes of items (an item larger than
/// the budget is still accepted into an empty queue, so progress is always
/// possible).
pub(crate) fn queue<T>(budget: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            bytes: 0,
            budget,
            closed: false,
            receiver_gone: false,
        }),
        notify: Notify::new(),
    });
    (Sender { shared: shared.clone() }, Receiver { shared })
}

impl<T> Sender<T> {
    /// Queues `item`, which costs `cost` bytes of the budget, or drops it and
    /// counts `lost` units. Never waits.
    pub(crate) fn push(&self, item: T, cost: usize, lost: u64) -> Pushed {
        let mut state = self.shared.state();
        if state.receiver_gone {
            return Pushed::ReceiverGone;
        }
        if state.bytes > 0 && state.bytes.saturating_add(cost) > state.budget {
            match state.items.back_mut() {
                Some(Entry::Lost(n)) => *n = n.saturating_add(lost),
                _ => state.items.push_back(Entry::Lost(lost)),
            }
            return Pushed::Dropped;
        }
        state.bytes += cost;
        state.items.push_back(Entry::Item(item, cost));
        drop(state);
        self.shared.notify.notify_one();
        Pushed::Queued
    }

    /// Queues an item outside the budget: the end of a stream must always
    /// reach its consumer.
    pub(crate) fn push_final(&self, item: T) {
        let mut state = self.shared.state();
        state.items.push_back(Entry::Item(item, 0));
        state.closed = true;
        drop(state);
        self.shared.notify.notify_one();
    }

    /// Ends the queue without a final item.
    pub(crate) fn close(&self) {
        self.shared.state().closed = true;
        self.shared.notify.notify_one();
    }
}

impl<T> Receiver<T> {
    /// The next item, a report of what was lost before it, or the end.
    pub(crate) async fn pop(&mut self) -> Popped<T> {
        loop {
            {
                let mut state = self.shared.state();
                match state.items.pop_front() {
                    Some(Entry::Item(item, cost)) => {
                        state.bytes -= cost;
                        return Popped::Item(item);
                    }
                    Some(Entry::Lost(n)) => return Popped::Lost(n),
                    None => {}
                }
                if state.closed {
                    return Popped::Closed;
                }
            }
            self.shared.notify.notified().await;
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        state.receiver_gone = true;
        state.items.clear();
        state.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let (tx, mut rx) = queue::<Vec<u8>>(10);
        assert_eq!(tx.push(vec![1; 6], 6, 6), Pushed::Queued);
        assert_eq!(tx.push(vec![2; 4], 4, 4), Pushed::Queued);
        assert_eq!(tx.push(vec![3; 5], 5, 5), Pushed::Dropped);
        assert_eq!(tx.push(vec![4; 1], 1, 1), Pushed::Dropped);
        assert_eq!(rx.pop().await, Popped::Item(vec![1; 6]));
        // Room again: the next item is queued after the loss marker.
        assert_eq!(tx.push(vec![5; 3], 3, 3), Pushed::Queued);
        assert_eq!(rx.pop().await, Popped::Item(vec![2; 4]));
        assert_eq!(rx.pop().await, Popped::Lost(6), "the gap is reported where it was");
        assert_eq!(rx.pop().await, Popped::Item(vec![5; 3]));
    }

    #[tokio::test]
    async fn an_item_larger_than_the_budget_passes_an_empty_queue() {
        let (tx, mut rx) = queue::<u8>(4);
        assert_eq!(tx.push(1, 100, 100), Pushed::Queued);
        assert_eq!(tx.push(2, 1, 1), Pushed::Dropped);
        assert_eq!(rx.pop().await, Popped::Item(1));
    }

    #[tokio::test]
    async fn the_final_item_ignores_the_budget_and_ends_the_queue() {
        let (tx, mut rx) = queue::<u8>(1);
        tx.push(1, 1, 1);
        tx.push_final(9);
        assert_eq!(rx.pop().await, Popped::Item(1));
        assert_eq!(rx.pop().await, Popped::Item(9));
        assert_eq!(rx.pop().await, Popped::Closed);
    }

    #[tokio::test]
    async fn a_consumer_waits_for_the_next_item() {
        let (tx, mut rx) = queue::<u8>(8);
        let consumer = tokio::spawn(async move { rx.pop().await });
        tokio::task::yield_now().await;
        tx.push(7, 1, 1);
        assert_eq!(consumer.await.unwrap_or(Popped::Closed), Popped::Item(7));
    }

    #[test]
    fn a_dropped_receiver_is_reported_to_the_producer() {
        let (tx, rx) = queue::<u8>(8);
        drop(rx);
        assert_eq!(tx.push(1, 1, 1), Pushed::ReceiverGone);
    }
}
