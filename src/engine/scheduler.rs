//! Continuous batching (SPEC 3): which tokens of which sequences go into the next engine step.
//!
//! A plain struct that tests drive directly. Every step: decode tokens of running sequences
//! first (one each), then prefill chunks of running sequences, then new sequences from the FCFS
//! queue — all within a per-step token budget, so a long prompt is cut into chunks and never
//! stalls running streams. Admission needs free KV blocks for the first chunk; a decode that
//! finds no free block preempts the most recently admitted sequence (its blocks are freed and it
//! goes back to the front of the queue to be recomputed from its prompt + generated tokens).

use std::collections::VecDeque;

use super::kv::{BlockAllocator, BlockTable};
use super::SeqKey;

/// Scheduler limits (from `EngineConfig`).
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    pub max_running: usize,
    pub max_waiting: usize,
    /// Tokens per step (decode tokens + prefill chunk tokens).
    pub step_token_budget: usize,
    pub block_size: usize,
    /// Longest sequence (prompt + generated) the model takes.
    pub max_model_len: usize,
}

/// One sequence; `T` is what the engine keeps beside it (its sampler, limits).
#[derive(Debug)]
pub struct Seq<T> {
    pub key: SeqKey,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose K/V are in the cache.
    pub computed: usize,
    pub table: BlockTable,
    pub paused: bool,
    pub data: T,
}

impl<T> Seq<T> {
    pub fn new(key: SeqKey, prompt: Vec<u32>, data: T) -> Self {
        let prompt_len = prompt.len();
        Self {
            key,
            tokens: prompt,
            prompt_len,
            computed: 0,
            table: BlockTable::new(),
            paused: false,
            data,
        }
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// One sequence's share of a step: tokens `start..start + len` of `running[index]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchItem {
    pub index: usize,
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the last token: sample the next one from its logits.
    pub sample: bool,
}

pub struct Scheduler<T> {
    cfg: SchedulerConfig,
    pub alloc: BlockAllocator,
    pub waiting: VecDeque<Seq<T>>,
    pub running: Vec<Seq<T>>,
    /// Sequences preempted since the last call (for metrics).
    pub preempted: u64,
}

impl<T> Scheduler<T> {
    pub fn new(cfg: SchedulerConfig, num_blocks: usize) -> Self {
        Self {
            cfg,
            alloc: BlockAllocator::new(num_blocks),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preempted: 0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a sequence (FCFS). A full queue, or a prompt that can never fit, gives it back.
    pub fn admit(&mut self, seq: Seq<T>) -> Result<(), (Seq<T>, AdmitError)> {
        if seq.tokens.is_empty() || seq.tokens.len() >= self.cfg.max_model_len {
            return Err((seq, AdmitError::PromptTooLong));
        }
        let blocks = seq.tokens.len().div_ceil(self.cfg.block_size) + 1;
        if blocks > self.alloc.num_blocks() {
            return Err((seq, AdmitError::PromptTooLong));
        }
        // Requests the next step can start (free running slots) are not waiting for capacity:
        // several arriving within one engine step must not fill `max_waiting` between them.
        let startable = self.cfg.max_running.saturating_sub(self.running.len());
        if self.waiting.len() >= self.cfg.max_waiting + startable {
            return Err((seq, AdmitError::QueueFull));
        }
        self.waiting.push_back(seq);
        Ok(())
    }

    /// Plans the next step. `can_emit(seq)` says whether the sequence's shard can take its events
    /// now (a sequence that cannot is skipped this step, like a paused one).
    pub fn next_batch(&mut self, mut can_emit: impl FnMut(&Seq<T>) -> bool) -> Vec<BatchItem> {
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.step_token_budget;
        let mut items = Vec::new();
        // 1. Decodes: one token each; preempt the newest sequence when blocks run out.
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.paused || s.tokens.len() - s.computed != 1 || budget == 0 || !can_emit(s) {
                i += 1;
                continue;
            }
            let need = s.computed + 1;
            loop {
                let s = &mut self.running[i];
                if s.table.reserve(&mut self.alloc, need, bs).is_ok() {
                    items.push(BatchItem {
                        index: i,
                        start: s.computed,
                        len: 1,
                        sample: true,
                    });
                    budget -= 1;
                    break;
                }
                // Out of blocks: free a paused sequence (its client is not reading; it is
                // recomputed when it resumes), else the most recently admitted other one.
                let victim = self
                    .running
                    .iter()
                    .rposition(|s| s.paused)
                    .filter(|&v| v != i)
                    .unwrap_or(self.running.len() - 1);
                if victim == i {
                    self.preempt(i);
                    items.retain(|it| it.index < i);
                    return items;
                }
                self.preempt(victim);
                items.retain(|it| it.index != victim);
                if victim < i {
                    // Everything after the victim moved down one place.
                    for it in items.iter_mut().filter(|it| it.index > victim) {
                        it.index -= 1;
                    }
                    i -= 1;
                }
            }
            i += 1;
        }
        // 2. Prefill chunks of running sequences, then 3. new sequences, FCFS.
        for i in 0..self.running.len() {
            if budget == 0 {
                return items;
            }
            let s = &mut self.running[i];
            let pending = s.tokens.len() - s.computed;
            if s.paused || pending <= 1 && s.computed > 0 || pending == 0 || !can_emit(s) {
                continue;
            }
            if items.iter().any(|it| it.index == i) {
                continue;
            }
            let len = pending.min(budget);
            if s.table
                .reserve(&mut self.alloc, s.computed + len, bs)
                .is_err()
            {
                break;
            }
            items.push(BatchItem {
                index: i,
                start: s.computed,
                len,
                sample: s.computed + len == s.tokens.len(),
            });
            budget -= len;
        }
        while budget > 0 && self.running.len() < self.cfg.max_running {
            // FCFS among sequences that may run: a paused one (preempted while its client was
            // not reading) waits without holding up the queue.
            let Some(w) = self.waiting.iter().position(|s| !s.paused) else {
                break;
            };
            if w > 0 {
                if let Some(s) = self.waiting.remove(w) {
                    self.waiting.push_front(s);
                }
            }
            let Some(front) = self.waiting.front() else {
                break;
            };
            if !can_emit(front) {
                break;
            }
            let len = front.tokens.len().min(budget);
            let mut table = BlockTable::new();
            if table.reserve(&mut self.alloc, len, bs).is_err() {
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            s.table = table;
            let sample = len == s.tokens.len();
            self.running.push(s);
            items.push(BatchItem {
                index: self.running.len() - 1,
                start: 0,
                len,
                sample,
            });
            budget -= len;
        }
        items
    }

    /// Frees a running sequence's blocks and puts it back at the front of the queue.
    fn preempt(&mut self, index: usize) {
        let mut s = self.running.remove(index);
        s.table.release(&mut self.alloc);
        s.computed = 0;
        self.preempted += 1;
        self.waiting.push_front(s);
    }

    /// After the step ran: the planned tokens are in the cache.
    pub fn advance(&mut self, item: &BatchItem) {
        if let Some(s) = self.running.get_mut(item.index) {
            s.computed = s.computed.max(item.start + item.len);
        }
    }

    /// Removes a sequence wherever it is and frees its blocks.
    pub fn retire(&mut self, key: SeqKey) -> Option<Seq<T>> {
        if let Some(i) = self.running.iter().position(|s| s.key == key) {
            let mut s = self.running.remove(i);
            s.table.release(&mut self.alloc);
            return Some(s);
        }
        let i = self.waiting.iter().position(|s| s.key == key)?;
        let mut s = self.waiting.remove(i)?;
        s.table.release(&mut self.alloc);
        Some(s)
    }

    pub fn set_paused(&mut self, key: SeqKey, paused: bool) {
        if let Some(s) = self
            .running
            .iter_mut()
            .chain(self.waiting.iter_mut())
            .find(|s| s.key == key)
        {
            s.paused = paused;
        }
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Whether some sequence could run if its shard had room / it were resumed.
    pub fn has_work(&self) -> bool {
        self.running.iter().chain(&self.waiting).any(|s| !s.paused)
    }
}

/// Why a sequence was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdmitError {
    QueueFull,
    PromptTooLong,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(budget: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_running: 8,
            max_waiting: 8,
            step_token_budget: budget,
            block_size: 4,
            max_model_len: 1000,
        }
    }

    fn key(slot: u32) -> SeqKey {
        SeqKey {
            shard: 0,
            slot,
            gen: 1,
        }
    }

    fn seq(slot: u32, prompt_len: usize) -> Seq<()> {
        Seq::new(key(slot), (0..prompt_len as u32).collect(), ())
    }

    /// Runs the plan as the engine would: advance, then "sample" token 7 where asked.
    fn run(s: &mut Scheduler<()>, items: &[BatchItem]) {
        for it in items {
            s.advance(it);
        }
        for it in items {
            if it.sample {
                s.running[it.index].tokens.push(7);
            }
        }
    }

    #[test]
    fn long_prompt_is_chunked_and_does_not_stall_decodes() {
        let mut s = Scheduler::new(cfg(8), 64);
        s.admit(seq(1, 3)).expect("admit");
        let b = s.next_batch(|_| true);
        assert_eq!(
            b,
            vec![BatchItem {
                index: 0,
                start: 0,
                len: 3,
                sample: true
            }]
        );
        run(&mut s, &b);
        s.admit(seq(2, 20)).expect("admit");
        let b = s.next_batch(|_| true);
        // The running sequence decodes; the new prompt gets the rest of the budget.
        assert_eq!(
            b[0],
            BatchItem {
                index: 0,
                start: 3,
                len: 1,
                sample: true
            }
        );
        assert_eq!(
            b[1],
            BatchItem {
                index: 1,
                start: 0,
                len: 7,
                sample: false
            }
        );
        run(&mut s, &b);
        let b = s.next_batch(|_| true);
        assert_eq!(b[0].len, 1, "decode keeps going every step");
        assert_eq!(
            b[1],
            BatchItem {
                index: 1,
                start: 7,
                len: 7,
                sample: false
            }
        );
        run(&mut s, &b);
        let b = s.next_batch(|_| true);
        assert_eq!(
            b[1],
            BatchItem {
                index: 1,
                start: 14,
                len: 6,
                sample: true
            }
        );
    }

    #[test]
    fn admission_waits_for_blocks_and_retire_frees_them() {
        let mut s = Scheduler::new(cfg(64), 4); // 16 token slots
        s.admit(seq(1, 12)).expect("admit");
        s.admit(seq(2, 12)).expect("admit");
        let b = s.next_batch(|_| true);
        assert_eq!(b.len(), 1, "second prompt needs blocks the first holds");
        assert_eq!(s.alloc.num_free(), 1);
        s.retire(key(1)).expect("retired");
        let b = s.next_batch(|_| true);
        assert_eq!(
            b,
            vec![BatchItem {
                index: 0,
                start: 0,
                len: 12,
                sample: true
            }]
        );
        s.retire(key(2)).expect("retired");
        assert_eq!(s.alloc.num_free(), 4, "no block leaks");
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_recomputes_it() {
        let mut s = Scheduler::new(cfg(64), 4);
        s.admit(seq(1, 8)).expect("admit");
        s.admit(seq(2, 8)).expect("admit");
        let b = s.next_batch(|_| true);
        assert_eq!(b.len(), 2);
        run(&mut s, &b); // both at 9 tokens, 8 computed, all 4 blocks used
        let b = s.next_batch(|_| true);
        // seq 1 needs a 3rd block: seq 2 (newest) is preempted back to the queue.
        assert_eq!(
            b,
            vec![BatchItem {
                index: 0,
                start: 8,
                len: 1,
                sample: true
            }]
        );
        assert_eq!(s.preempted, 1);
        assert_eq!(
            s.waiting
                .front()
                .map(|q| (q.key, q.computed, q.tokens.len())),
            Some((key(2), 0, 9))
        );
        s.retire(key(1));
        let b = s.next_batch(|_| true);
        assert_eq!(
            b,
            vec![BatchItem {
                index: 0,
                start: 0,
                len: 9,
                sample: true
            }],
            "recompute prompt + generated"
        );
    }

    #[test]
    fn a_paused_sequence_is_preempted_first_and_waits_without_blocking_the_queue() {
        let mut s = Scheduler::new(cfg(64), 4);
        s.admit(seq(1, 8)).expect("admit");
        s.admit(seq(2, 8)).expect("admit");
        let b = s.next_batch(|_| true);
        run(&mut s, &b); // both at 9 tokens, all 4 blocks used
        s.set_paused(key(1), true);
        // seq 2 needs a block: the paused seq 1 gives its blocks up, though it is older.
        let b = s.next_batch(|_| true);
        assert_eq!(
            b,
            vec![BatchItem {
                index: 0,
                start: 8,
                len: 1,
                sample: true
            }]
        );
        assert_eq!(s.running[0].key, key(2));
        assert_eq!(s.waiting.front().map(|q| q.key), Some(key(1)));
        run(&mut s, &b);
        // Paused in the queue: not admitted, and not work that keeps the engine spinning.
        s.admit(seq(3, 2)).expect("admit");
        let b = s.next_batch(|_| true);
        assert_eq!(
            b.len(),
            2,
            "seq 2 decodes and seq 3 starts past the paused seq 1"
        );
        assert!(s.running.iter().all(|q| q.key != key(1)));
        s.retire(key(2));
        s.retire(key(3));
        assert!(!s.has_work());
        s.set_paused(key(1), false);
        assert!(s.has_work());
        let b = s.next_batch(|_| true);
        assert_eq!(b[0].len, 9, "recomputed from prompt + generated");
    }

    #[test]
    fn paused_and_blocked_sequences_are_skipped() {
        let mut s = Scheduler::new(cfg(64), 64);
        s.admit(seq(1, 2)).expect("admit");
        s.admit(seq(2, 2)).expect("admit");
        let b = s.next_batch(|_| true);
        run(&mut s, &b);
        s.set_paused(key(1), true);
        let b = s.next_batch(|q| q.key.slot != 2);
        assert!(b.is_empty());
        s.set_paused(key(1), false);
        assert_eq!(s.next_batch(|_| true).len(), 2);
    }

    #[test]
    fn queue_limits() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_running: 1,
                max_waiting: 1,
                ..cfg(8)
            },
            64,
        );
        // Within one step: one request the next step starts, one that waits, then full.
        s.admit(seq(1, 2)).expect("startable");
        s.admit(seq(2, 2)).expect("waiting");
        assert_eq!(
            s.admit(seq(3, 2)).err().map(|e| e.1),
            Some(AdmitError::QueueFull)
        );
        // Once the first runs, the second still waits: nothing more fits.
        assert_eq!(s.next_batch(|_| true).len(), 1);
        assert_eq!(
            s.admit(seq(4, 2)).err().map(|e| e.1),
            Some(AdmitError::QueueFull)
        );
        assert_eq!(
            s.admit(seq(3, 1000)).err().map(|e| e.1),
            Some(AdmitError::PromptTooLong)
        );
    }
}
