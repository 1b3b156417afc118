//! The real-model generator: continuous batching ([`Scheduler`]) over the transformer's batched
//! forward pass on a paged KV cache ([`Forward`]: CPU, or device-resident on the GPU), sampling
//! each sequence with its own [`Sampler`] or, on the GPU, in the forward pass itself.
//!
//! One `step` = one forward call: decode tokens of running sequences plus prefill chunks
//! within the token budget. Only token ids leave this thread; shards detokenize.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::forward::{device_sampling, Forward, RowOut};
use super::sampler::{Sampled, Sampler};
use super::scheduler::{AdmitError, BatchItem, Scheduler, SchedulerConfig, Seq};
use super::thread::{EventSink, Generator, StepOutcome};
use super::{EngineMsg, EventKind, FinishReason, RejectReason, SeqKey, TokenEvent};
use crate::backend::cuda::plan::DeviceSampling;
use crate::metrics::EngineMetrics;
use crate::model::transformer::{Logits, SeqInput};

/// What the engine keeps per sequence beside its tokens.
pub struct SeqState {
    sampler: Sampler,
    max_tokens: usize,
    stop_ids: Vec<u32>,
    ignore_eos: bool,
    /// Set when the GPU samples this sequence (see `engine::forward`).
    device: Option<DeviceSampling>,
}

pub struct ModelRunner {
    fwd: Forward,
    sched: Scheduler<SeqState>,
    /// One logits row, copied out so the sampler may modify it.
    row: Vec<f32>,
    eos: Vec<u32>,
    metrics: Arc<EngineMetrics>,
    /// Events that found their shard's queue full, in order (see `EventSink::push_ordered`).
    pending: Vec<TokenEvent>,
    /// Event slots promised per shard while planning a step.
    reserved: Vec<usize>,
}

impl SeqState {
    /// Event slots one step of this sequence may use: its token, its terminal event and, when
    /// logprobs were asked for, one per reported logprob.
    fn event_slots(&self) -> usize {
        2 + self.sampler.logprobs().map_or(0, |n| n + 1)
    }
}

impl ModelRunner {
    /// `fwd` holds (or, on the GPU, mirrors) a KV cache of `kv_blocks` blocks of
    /// `cfg.block_size`.
    pub fn new(
        fwd: Forward,
        kv_blocks: usize,
        cfg: SchedulerConfig,
        eos: Vec<u32>,
        metrics: Arc<EngineMetrics>,
    ) -> Self {
        let vocab = fwd.vocab_size();
        Self {
            fwd,
            sched: Scheduler::new(cfg, kv_blocks),
            row: vec![0.0; vocab],
            eos,
            metrics,
            pending: Vec::new(),
            reserved: Vec::new(),
        }
    }

    fn emit(&mut self, sink: &mut EventSink<'_>, key: SeqKey, kind: EventKind) {
        sink.push_ordered(&mut self.pending, TokenEvent { key, kind });
    }

    fn publish_metrics(&self, batch: usize) {
        let m = &self.metrics;
        m.batch_size.set(batch as u64);
        m.running.set(self.sched.running.len() as u64);
        m.queue_depth.set(self.sched.waiting.len() as u64);
        m.kv_usage_permille
            .set((self.sched.alloc.usage_ratio() * 1000.0).round() as u64);
        m.steps.inc();
    }

    /// Runs the planned batch; returns the finished sequences with their reasons.
    fn run_batch(
        &mut self,
        items: &[BatchItem],
        sink: &mut EventSink<'_>,
    ) -> Vec<(SeqKey, FinishReason)> {
        let inputs: Vec<SeqInput<'_>> = items
            .iter()
            .map(|it| {
                let s = &self.sched.running[it.index];
                SeqInput {
                    tokens: &s.tokens[it.start..it.start + it.len],
                    start_pos: it.start,
                    blocks: &s.table,
                    logits: if it.sample {
                        Logits::Last
                    } else {
                        Logits::None
                    },
                }
            })
            .collect();
        let device: Vec<Option<DeviceSampling>> = items
            .iter()
            .filter(|it| it.sample)
            .map(|it| {
                let s = &self.sched.running[it.index];
                let step = u32::try_from(s.generated()).unwrap_or(u32::MAX);
                s.data.device.map(|d| DeviceSampling { step, ..d })
            })
            .collect();
        let step = match self.fwd.run(&inputs, &device) {
            Ok(out) => out,
            Err(e) => {
                tracing::error!("forward failed: {e}");
                return items
                    .iter()
                    .map(|it| (self.sched.running[it.index].key, FinishReason::Error))
                    .collect();
            }
        };
        let mut finished = Vec::new();
        let mut r = 0;
        for it in items {
            self.sched.advance(it);
            if !it.sample {
                continue;
            }
            let Some(row) = step.row(r) else {
                break;
            };
            r += 1;
            let s: &mut Seq<SeqState> = &mut self.sched.running[it.index];
            let out = match row {
                RowOut::Token(token) => Sampled {
                    token,
                    logprob: None,
                    top_logprobs: Vec::new(),
                },
                RowOut::Logits(row) => {
                    self.row.copy_from_slice(row);
                    s.data.sampler.sample(&mut self.row, &s.tokens)
                }
            };
            let tok = out.token;
            s.tokens.push(tok);
            self.metrics.tokens.inc();
            let key = s.key;
            let is_eos =
                !s.data.ignore_eos && self.eos.contains(&tok) || s.data.stop_ids.contains(&tok);
            let reason = if is_eos {
                Some(FinishReason::Stop)
            } else if s.generated() >= s.data.max_tokens
                || s.tokens.len() >= self.sched.config().max_model_len
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if !is_eos {
                if let Some(logprob) = out.logprob {
                    let lp = |rank: usize, token: u32, logprob: f32| TokenEvent {
                        key,
                        kind: EventKind::Logprob {
                            rank: rank as u8,
                            token,
                            logprob,
                        },
                    };
                    sink.push_ordered(&mut self.pending, lp(0, tok, logprob));
                    for (i, &(id, l)) in out.top_logprobs.iter().enumerate() {
                        sink.push_ordered(&mut self.pending, lp(i + 1, id, l));
                    }
                }
                let ev = TokenEvent {
                    key,
                    kind: EventKind::Token(tok),
                };
                sink.push_ordered(&mut self.pending, ev);
            }
            if let Some(reason) = reason {
                finished.push((key, reason));
            }
        }
        finished
    }
}

impl Generator for ModelRunner {
    fn handle(&mut self, msg: EngineMsg, sink: &mut EventSink<'_>) {
        match msg {
            EngineMsg::Generate(req) => {
                let p = &req.params;
                let mut sampler = Sampler::new(p, self.row.len());
                sampler.set_prompt_len(req.prompt.len());
                sampler.skip_draws(req.generated.len());
                let state = SeqState {
                    sampler,
                    max_tokens: p.max_tokens.unwrap_or(u32::MAX) as usize,
                    stop_ids: p.stop_token_ids.clone(),
                    ignore_eos: p.ignore_eos,
                    device: if self.fwd.samples_on_device() {
                        device_sampling(p)
                    } else {
                        None
                    },
                };
                let key = req.key;
                let req = *req;
                let prompt_len = req.prompt.len();
                let mut tokens = req.prompt;
                tokens.extend_from_slice(&req.generated);
                let mut seq = Seq::new(key, tokens, state);
                seq.prompt_len = prompt_len;
                if let Err((_, why)) = self.sched.admit(seq) {
                    let reason = match why {
                        AdmitError::QueueFull => RejectReason::Overloaded,
                        AdmitError::PromptTooLong => RejectReason::PromptTooLong,
                    };
                    self.emit(sink, key, EventKind::Rejected(reason));
                }
            }
            EngineMsg::Cancel(key) => {
                if self.sched.retire(key).is_some() {
                    self.emit(sink, key, EventKind::Done(FinishReason::Cancelled));
                }
            }
            EngineMsg::Pause(key) => self.sched.set_paused(key, true),
            EngineMsg::Resume(key) => self.sched.set_paused(key, false),
        }
    }

    fn step(&mut self, sink: &mut EventSink<'_>) -> StepOutcome {
        sink.flush_pending(&mut self.pending);
        // A sequence runs only if its shard's queue has room for everything it may emit this
        // step, counting what the step already promised to that shard's other sequences.
        let reserved = &mut self.reserved;
        reserved.clear();
        let items = self.sched.next_batch(|s| {
            let shard = s.key.shard as usize;
            if reserved.len() <= shard {
                reserved.resize(shard + 1, 0);
            }
            let need = s.data.event_slots().min(sink.capacity(s.key.shard));
            let ok = sink.room(s.key.shard) >= reserved[shard] + need;
            if ok {
                reserved[shard] += need;
            }
            ok
        });
        if items.is_empty() {
            self.publish_metrics(0);
            return if self.sched.has_work() || !self.pending.is_empty() {
                StepOutcome::WaitUntil(Instant::now() + Duration::from_millis(1))
            } else {
                StepOutcome::Idle
            };
        }
        let finished = self.run_batch(&items, sink);
        for (key, reason) in finished {
            self.sched.retire(key);
            self.emit(sink, key, EventKind::Done(reason));
        }
        self.publish_metrics(items.len());
        StepOutcome::Busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::engine::queue::links;
    use crate::engine::sampler::SamplingParams;
    use crate::engine::GenerateRequest;
    use crate::model::synthetic;

    fn runner() -> ModelRunner {
        let s = synthetic::build("synthetic:tiny", 7, Box::new(CpuBackend::new(1))).expect("tiny");
        let cfg = SchedulerConfig {
            max_running: 8,
            max_waiting: 8,
            step_token_budget: 64,
            block_size: 16,
            max_model_len: 256,
        };
        ModelRunner::new(
            Forward::cpu(s.model, 64, 16),
            64,
            cfg,
            Vec::new(),
            Arc::default(),
        )
    }

    fn request(slot: u32, logprobs: Option<u8>) -> EngineMsg {
        let params = SamplingParams {
            max_tokens: Some(6),
            temperature: 0.0,
            logprobs,
            ..SamplingParams::default()
        };
        EngineMsg::Generate(Box::new(GenerateRequest {
            key: SeqKey {
                shard: 0,
                slot,
                gen: 1,
            },
            prompt: vec![1, 2, 3, 4, 5],
            params,
            generated: Vec::new(),
        }))
    }

    /// An event queue just big enough for one logprob-reporting token: every report arrives
    /// complete and in order (ranks 0..=n, then the token), nothing is lost, both sequences end.
    #[test]
    fn logprob_reports_fit_a_tight_queue_in_order() {
        const TOP: u8 = 5;
        let (mut shard, mut engine, _) = links(1, 16, 2 + usize::from(TOP) + 1);
        let mut r = runner();
        let mut per_seq: [Vec<EventKind>; 2] = [Vec::new(), Vec::new()];
        {
            let mut sink = EventSink::for_tests(&mut engine);
            r.handle(request(0, Some(TOP)), &mut sink);
            r.handle(request(1, None), &mut sink);
        }
        for _ in 0..500 {
            let mut sink = EventSink::for_tests(&mut engine);
            r.step(&mut sink);
            while let Ok(ev) = shard[0].events.pop() {
                per_seq[ev.key.slot as usize].push(ev.kind);
            }
            if per_seq
                .iter()
                .all(|evs| matches!(evs.last(), Some(EventKind::Done(_))))
            {
                break;
            }
        }
        let [with, without] = per_seq;
        assert_eq!(without.len(), 7, "6 tokens and done: {without:?}");
        assert!(without
            .iter()
            .all(|k| !matches!(k, EventKind::Logprob { .. })));
        let per_token = usize::from(TOP) + 2;
        assert_eq!(with.len(), 6 * per_token + 1, "{with:?}");
        assert_eq!(with.last(), Some(&EventKind::Done(FinishReason::Length)));
        for (t, group) in with.chunks(per_token).take(6).enumerate() {
            let EventKind::Token(tok) = group[per_token - 1] else {
                panic!("token {t}: group does not end with its token: {group:?}");
            };
            let mut best = f32::INFINITY;
            for (rank, k) in group[..per_token - 1].iter().enumerate() {
                let EventKind::Logprob {
                    rank: r,
                    token,
                    logprob,
                } = *k
                else {
                    panic!("token {t}: expected a logprob report, got {k:?}");
                };
                assert_eq!(usize::from(r), rank);
                assert!(logprob <= 0.0 && logprob <= best, "token {t}: {group:?}");
                if rank == 0 {
                    assert_eq!(token, tok, "rank 0 reports the sampled token");
                } else {
                    best = logprob;
                }
                if rank == 1 {
                    // Greedy: the sampled token is the most likely one.
                    assert_eq!(token, tok);
                }
            }
        }
        // The report does not change what is generated.
        let tokens = |evs: &[EventKind]| -> Vec<u32> {
            evs.iter()
                .filter_map(|k| match k {
                    EventKind::Token(t) => Some(*t),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(tokens(&with), tokens(&without));
    }
}
