//! A single-threaded notify: the shard's dispatcher (or timer) wakes one connection's writer.
//! No atomics, no lock: everything runs on the shard's own thread.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Notify {
    notified: Cell<bool>,
    waiter: Cell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.notified.set(true);
        if let Some(w) = self.waiter.take() {
            w.wake();
        }
    }

    /// Resolves once `notify` was called since the last wait returned.
    pub fn notified(&self) -> Notified<'_> {
        Notified { n: self }
    }
}

pub struct Notified<'a> {
    n: &'a Notify,
}

impl Future for Notified<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.n.notified.replace(false) {
            return Poll::Ready(());
        }
        self.n.waiter.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}
