//! The shard ⇄ engine boundary: bounded lock-free SPSC queues and one wake-up per batch.
//!
//! Every shard owns one producer of [`EngineMsg`] (shard → engine) and one consumer of
//! [`TokenEvent`] (engine → shard). The engine owns the other ends. Nothing here takes a lock:
//! the queues are `rtrb` ring buffers, the engine is woken with `Thread::unpark` only when it
//! announced that it sleeps, and a shard is woken through an [`AtomicWaker`] at most once per
//! batch (the `pending` flag collapses all pushes of one engine step into one wake-up).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::thread::Thread;

use atomic_waker::AtomicWaker;

use super::{EngineMsg, TokenEvent};

/// Wakes a shard's dispatcher task from the engine thread.
#[derive(Default)]
pub struct ShardWake {
    waker: AtomicWaker,
    /// Set by the engine when it pushed events; cleared by the shard before it drains.
    pending: AtomicBool,
}

impl ShardWake {
    /// Called by the engine after it pushed a batch of events for this shard.
    pub fn notify(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Resolves when the engine has pushed events since the last call.
    pub fn wait(&self) -> WakeWait<'_> {
        WakeWait { wake: self }
    }
}

/// Future returned by [`ShardWake::wait`].
pub struct WakeWait<'a> {
    wake: &'a ShardWake,
}

impl Future for WakeWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.wake.pending.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.wake.waker.register(cx.waker());
        if self.wake.pending.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Lets shards wake the engine thread when it sleeps for lack of work.
#[derive(Default)]
pub struct EngineParker {
    sleeping: AtomicBool,
    thread: OnceLock<Thread>,
}

impl EngineParker {
    /// Called by a shard after it pushed a message.
    pub fn unpark(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
    }

    /// Called once on the engine thread before its loop starts.
    pub fn register_current(&self) {
        let _ = self.thread.set(std::thread::current());
    }

    /// Marks the engine asleep; the caller must re-check its queues before parking.
    pub fn begin_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    pub fn end_sleep(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// The registered thread (to wake it unconditionally, e.g. to stop it).
    pub fn thread(&self) -> Option<Thread> {
        self.thread.get().cloned()
    }
}

/// The shard's ends of its two queues.
pub struct ShardLink {
    pub shard: u16,
    pub to_engine: rtrb::Producer<EngineMsg>,
    pub events: rtrb::Consumer<TokenEvent>,
    pub wake: Arc<ShardWake>,
    pub parker: Arc<EngineParker>,
}

impl ShardLink {
    /// Pushes a message to the engine; on a full queue the message comes back (the caller
    /// answers `overloaded` for a new request, or retries a control message later).
    pub fn send(&mut self, msg: EngineMsg) -> Result<(), EngineMsg> {
        match self.to_engine.push(msg) {
            Ok(()) => {
                self.parker.unpark();
                Ok(())
            }
            Err(rtrb::PushError::Full(m)) => Err(m),
        }
    }
}

/// The engine's ends of one shard's queues.
pub struct EngineLink {
    pub requests: rtrb::Consumer<EngineMsg>,
    pub events: rtrb::Producer<TokenEvent>,
    pub wake: Arc<ShardWake>,
    /// Events pushed since the last `flush`, to wake the shard once per batch.
    pub dirty: bool,
}

impl EngineLink {
    /// Wakes the shard if this step pushed anything to it.
    pub fn flush(&mut self) {
        if self.dirty {
            self.dirty = false;
            self.wake.notify();
        }
    }
}

/// Builds the queues for `shards` shards.
pub fn links(
    shards: usize,
    request_capacity: usize,
    event_capacity: usize,
) -> (Vec<ShardLink>, Vec<EngineLink>, Arc<EngineParker>) {
    let parker = Arc::new(EngineParker::default());
    let mut shard_side = Vec::with_capacity(shards);
    let mut engine_side = Vec::with_capacity(shards);
    for i in 0..shards {
        let (req_tx, req_rx) = rtrb::RingBuffer::new(request_capacity);
        let (ev_tx, ev_rx) = rtrb::RingBuffer::new(event_capacity);
        let wake = Arc::new(ShardWake::default());
        shard_side.push(ShardLink {
            shard: i as u16,
            to_engine: req_tx,
            events: ev_rx,
            wake: wake.clone(),
            parker: parker.clone(),
        });
        engine_side.push(EngineLink {
            requests: req_rx,
            events: ev_tx,
            wake,
            dirty: false,
        });
    }
    (shard_side, engine_side, parker)
}
