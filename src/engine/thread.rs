//! The engine thread's loop: drain shard queues, run one step of the generator, hand events
//! back (waking each shard once per step), sleep when there is nothing to do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::queue::{EngineLink, EngineParker};
use super::{EngineMsg, TokenEvent};

/// Where a generator puts its events; knows how much room each shard's queue has so that a
/// full queue pauses generation for that shard instead of dropping tokens.
pub struct EventSink<'a> {
    links: &'a mut [EngineLink],
}

impl EventSink<'_> {
    /// Free slots in the event queue of `shard`.
    pub fn room(&self, shard: u16) -> usize {
        self.links
            .get(shard as usize)
            .map_or(0, |l| l.events.slots())
    }

    /// Size of the event queue of `shard` (a sequence never needs more slots than this).
    pub fn capacity(&self, shard: u16) -> usize {
        self.links
            .get(shard as usize)
            .map_or(0, |l| l.events.buffer().capacity())
    }

    /// Pushes an event in order after `pending` events of the same shard: appends it to
    /// `pending` instead when that shard already has events waiting or its queue is full, so a
    /// sequence's events never overtake each other.
    pub fn push_ordered(&mut self, pending: &mut Vec<TokenEvent>, ev: TokenEvent) {
        if pending.iter().any(|p| p.key.shard == ev.key.shard) || !self.push(ev) {
            pending.push(ev);
        }
    }

    /// Retries `pending` events in order (see [`EventSink::push_ordered`]).
    pub fn flush_pending(&mut self, pending: &mut Vec<TokenEvent>) {
        for ev in std::mem::take(pending) {
            self.push_ordered(pending, ev);
        }
    }

    /// Pushes an event; returns false when the shard's queue is full (the caller keeps the
    /// sequence's state and retries on a later step).
    pub fn push(&mut self, ev: TokenEvent) -> bool {
        let Some(link) = self.links.get_mut(ev.key.shard as usize) else {
            return false;
        };
        if link.events.push(ev).is_ok() {
            link.dirty = true;
            true
        } else {
            false
        }
    }
}

/// What a step did, telling the loop whether to spin, wait or sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// Work remains; step again at once.
    Busy,
    /// Nothing can run before this instant (paced generation).
    WaitUntil(Instant),
    /// No runnable sequence: sleep until a shard sends something.
    Idle,
}

/// The model side of the engine: the null model now, scheduler + transformer for real models.
pub trait Generator: Send {
    fn handle(&mut self, msg: EngineMsg, sink: &mut EventSink<'_>);
    fn step(&mut self, sink: &mut EventSink<'_>) -> StepOutcome;
}

/// Runs the engine loop until `stop` is set. The server sets it once every shard has drained and
/// exited: nobody reads the events of what still runs (a generation that lost its client and
/// runs on for a resume, adopted during the drain), so it is dropped rather than finished.
pub fn run(
    mut gen: Box<dyn Generator>,
    mut links: Vec<EngineLink>,
    parker: Arc<EngineParker>,
    stop: Arc<AtomicBool>,
) {
    parker.register_current();
    loop {
        let mut sink = EventSink { links: &mut links };
        drain(&mut *gen, &mut sink);
        let outcome = gen.step(&mut sink);
        for link in links.iter_mut() {
            link.flush();
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        match outcome {
            StepOutcome::Busy => {}
            StepOutcome::WaitUntil(t) => sleep_until(&parker, &links, Some(t)),
            StepOutcome::Idle => sleep_until(&parker, &links, None),
        }
    }
}

fn drain(gen: &mut dyn Generator, sink: &mut EventSink<'_>) {
    for i in 0..sink.links.len() {
        while let Ok(msg) = sink.links[i].requests.pop() {
            gen.handle(msg, sink);
        }
    }
}

fn sleep_until(parker: &EngineParker, links: &[EngineLink], until: Option<Instant>) {
    parker.begin_sleep();
    let empty = links.iter().all(|l| l.requests.is_empty());
    if empty {
        match until {
            Some(t) => {
                let now = Instant::now();
                if t > now {
                    std::thread::park_timeout(t - now);
                }
            }
            // Woken by a shard's push; the timeout only bounds a missed wake-up.
            None => std::thread::park_timeout(std::time::Duration::from_millis(100)),
        }
    }
    parker.end_sleep();
}

#[cfg(test)]
impl<'a> EventSink<'a> {
    pub(crate) fn for_tests(links: &'a mut [EngineLink]) -> Self {
        EventSink { links }
    }
}
