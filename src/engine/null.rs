//! The `null` model (SPEC 8): no weights; every request streams a fixed English text, one
//! whitespace-separated word per token, at `--null-tokens-per-s` (0 = as fast as possible),
//! starting the text over as often as its `max_tokens` asks (it ends with `length`, never
//! `stop`, so a benchmark asking for N tokens gets N).
//! It exercises the whole serving path — queues, wake-ups, detokenizing on the shard, framing,
//! backpressure — with the model's cost taken out.

use std::collections::{HashMap, VecDeque};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::thread::{EventSink, Generator, StepOutcome};
use super::{EngineMsg, EventKind, FinishReason, RejectReason, SeqKey, TokenEvent};

/// The text the null model streams (written for this project).
const NULL_TEXT: &str = "The river town woke slowly that autumn morning, and the baker was the \
first to open his shutters. Steam rose from the loaves he set on the sill, and the smell drifted \
down the lane toward the harbour where the fishing boats were coming in. A boy ran along the quay \
with a basket of rope, calling to his father, who waved from the deck of a blue boat with a patched \
sail. Up the hill, the schoolteacher unlocked the door of the single classroom and opened every \
window, because the stove had smoked all night and the room still smelled of ash. She wrote the \
date on the board in careful letters, then a question for the older children: why does a river \
always find the sea? By nine the market square was full. Farmers had brought apples, late plums, \
cheese wrapped in cloth, and jars of honey that glowed in the low sun. An old woman sold knitted \
hats from a folding table and told anyone who stopped that winter would come early this year. \
Nobody argued with her; she had been right for forty years. At noon the church bell rang twice, \
once for the hour and once, people said, for the sailors who had not come home. The fishermen \
took off their caps when they heard it. In the afternoon clouds gathered over the western hills, \
grey at first and then nearly purple, and the wind turned cold. Shopkeepers carried their \
baskets inside. The schoolteacher closed the windows one by one and told the children to hurry \
home before the rain. The boy with the rope basket helped his father tie the blue boat to the \
iron rings of the quay, doubling every knot. When the first drops fell, the whole town seemed to \
pause and listen. Then the rain came properly, drumming on roofs and rushing down the gutters \
into the river, which carried it patiently, as it always had, all the way to the sea.";

/// The null model's vocabulary: token `i` is word `i` of the text with a leading space (except
/// word 0), then one more token: word 0 with a leading space (the text starting over).
pub fn vocab() -> &'static [String] {
    static VOCAB: OnceLock<Vec<String>> = OnceLock::new();
    VOCAB.get_or_init(|| {
        let mut v: Vec<String> = NULL_TEXT
            .split_whitespace()
            .enumerate()
            .map(|(i, w)| {
                if i == 0 {
                    w.to_string()
                } else {
                    format!(" {w}")
                }
            })
            .collect();
        let again = format!(" {}", v.first().map_or("", |w| w.as_str()));
        v.push(again);
        v
    })
}

/// The token at position `p` of a generation: the text's words in order, over and over.
pub fn token_at(p: u32) -> u32 {
    let words = vocab().len() as u32 - 1;
    match p % words {
        0 if p > 0 => words,
        i => i,
    }
}

/// Text of a null-model token (empty for an id outside the vocabulary).
pub fn piece(id: u32) -> &'static str {
    vocab().get(id as usize).map_or("", String::as_str)
}

/// Prompt "tokens" of the null model: one per whitespace-separated word (ids are arbitrary).
pub fn tokenize(text: &str) -> Vec<u32> {
    text.split_whitespace().map(|_| 0).collect()
}

struct NullSeq {
    key: SeqKey,
    next: u32,
    max_tokens: u32,
    /// The request asked for logprobs with this many alternatives. The null model's next word
    /// is certain: logprob 0 for it, and it is the only alternative with a finite logprob.
    logprobs: Option<u8>,
    paused: bool,
    due: Instant,
}

/// The null generator: each step emits the next word of every runnable sequence.
pub struct NullModel {
    seqs: Vec<NullSeq>,
    index: HashMap<SeqKey, usize>,
    /// Time between two tokens of one sequence; `None` = as fast as possible.
    interval: Option<Duration>,
    max_running: usize,
    /// Sequences beyond `max_running`, admitted FCFS as others finish.
    waiting: VecDeque<NullSeq>,
    max_waiting: usize,
    /// Terminal events that found their shard's queue full, retried first on the next step.
    pending: Vec<TokenEvent>,
}

impl NullModel {
    pub fn new(tokens_per_s: f64, max_running: usize, max_waiting: usize) -> Self {
        let interval = (tokens_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / tokens_per_s));
        Self {
            seqs: Vec::new(),
            index: HashMap::new(),
            interval,
            max_running,
            waiting: VecDeque::new(),
            max_waiting,
            pending: Vec::new(),
        }
    }

    fn start(&mut self, s: NullSeq) {
        self.index.insert(s.key, self.seqs.len());
        self.seqs.push(s);
    }

    fn emit_final(&mut self, sink: &mut EventSink<'_>, key: SeqKey, kind: EventKind) {
        sink.push_ordered(&mut self.pending, TokenEvent { key, kind });
    }

    fn remove(&mut self, key: SeqKey) -> bool {
        let Some(i) = self.index.remove(&key) else {
            return false;
        };
        self.seqs.swap_remove(i);
        if let Some(moved) = self.seqs.get(i) {
            self.index.insert(moved.key, i);
        }
        true
    }
}

impl Generator for NullModel {
    fn handle(&mut self, msg: EngineMsg, sink: &mut EventSink<'_>) {
        match msg {
            EngineMsg::Generate(req) => {
                let seq = NullSeq {
                    key: req.key,
                    next: req.generated.len() as u32,
                    max_tokens: req.params.max_tokens.unwrap_or(256),
                    logprobs: req.params.logprobs,
                    paused: false,
                    due: Instant::now(),
                };
                if self.index.contains_key(&req.key) {
                    self.emit_final(sink, req.key, EventKind::Rejected(RejectReason::Overloaded));
                } else if self.seqs.len() < self.max_running {
                    self.start(seq);
                } else if self.waiting.len() < self.max_waiting {
                    self.waiting.push_back(seq);
                } else {
                    self.emit_final(sink, req.key, EventKind::Rejected(RejectReason::Overloaded));
                }
            }
            EngineMsg::Cancel(key) => {
                let queued = self.waiting.len();
                self.waiting.retain(|s| s.key != key);
                if self.remove(key) || self.waiting.len() < queued {
                    self.emit_final(sink, key, EventKind::Done(FinishReason::Cancelled));
                }
            }
            EngineMsg::Pause(key) | EngineMsg::Resume(key) => {
                let paused = matches!(msg, EngineMsg::Pause(_));
                if let Some(&i) = self.index.get(&key) {
                    self.seqs[i].paused = paused;
                } else if let Some(s) = self.waiting.iter_mut().find(|s| s.key == key) {
                    s.paused = paused;
                }
            }
        }
    }

    fn step(&mut self, sink: &mut EventSink<'_>) -> StepOutcome {
        sink.flush_pending(&mut self.pending);
        while self.seqs.len() < self.max_running {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            s.due = Instant::now();
            self.start(s);
        }
        let now = self.interval.map(|_| Instant::now());
        let mut earliest: Option<Instant> = None;
        let mut emitted = false;
        let mut blocked = false;
        let mut i = 0;
        while i < self.seqs.len() {
            let s = &mut self.seqs[i];
            if s.paused {
                i += 1;
                continue;
            }
            if let (Some(now), Some(iv)) = (now, self.interval) {
                if s.due > now {
                    earliest = Some(earliest.map_or(s.due, |e| e.min(s.due)));
                    i += 1;
                    continue;
                }
                s.due += iv;
                if s.due < now {
                    s.due = now;
                }
            }
            // Keep one slot for the terminal event so a sequence never ends half-reported.
            let lp_slots = s.logprobs.map_or(0, |n| 1 + usize::from(n.min(1)));
            if sink.room(s.key.shard) < 2 + lp_slots {
                blocked = true;
                i += 1;
                continue;
            }
            let key = s.key;
            if s.next >= s.max_tokens {
                sink.push(TokenEvent {
                    key,
                    kind: EventKind::Done(FinishReason::Length),
                });
                self.remove(key);
                continue;
            }
            let token = token_at(s.next);
            for rank in 0..lp_slots {
                sink.push(TokenEvent {
                    key,
                    kind: EventKind::Logprob {
                        rank: rank as u8,
                        token,
                        logprob: 0.0,
                    },
                });
            }
            sink.push(TokenEvent {
                key,
                kind: EventKind::Token(token),
            });
            s.next += 1;
            emitted = true;
            i += 1;
        }
        if emitted && self.interval.is_none() {
            StepOutcome::Busy
        } else if let Some(t) = earliest {
            StepOutcome::WaitUntil(t)
        } else if blocked || !self.pending.is_empty() {
            StepOutcome::WaitUntil(Instant::now() + Duration::from_micros(200))
        } else if self.seqs.iter().any(|s| !s.paused) || !self.waiting.is_empty() {
            StepOutcome::Busy
        } else {
            StepOutcome::Idle
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::queue::links;
    use crate::engine::sampler::SamplingParams as GenParams;
    use crate::engine::GenerateRequest;

    fn key(slot: u32) -> SeqKey {
        SeqKey {
            shard: 0,
            slot,
            gen: 1,
        }
    }

    fn run_until_idle(model: &mut NullModel, sink: &mut EventSink<'_>) {
        for _ in 0..10_000 {
            if model.step(sink) == StepOutcome::Idle {
                return;
            }
        }
        panic!("null model never went idle");
    }

    #[test]
    fn vocab_rebuilds_the_text() {
        let words = vocab().len() - 1;
        let joined: String = vocab()[..words].concat();
        let normalized = NULL_TEXT.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(joined, normalized);
        assert!(
            vocab().len() > 256,
            "benchmarks stream 256-token generations"
        );
    }

    #[test]
    fn streams_max_tokens_then_length() {
        let (mut shard, mut engine, _) = links(1, 16, 1024);
        let mut model = NullModel::new(0.0, 8, 0);
        let mut sink = EventSink::for_tests(&mut engine);
        let params = GenParams {
            max_tokens: Some(5),
            ..GenParams::default()
        };
        let req = GenerateRequest {
            key: key(3),
            prompt: vec![0; 4],
            params,
            generated: Vec::new(),
        };
        model.handle(EngineMsg::Generate(Box::new(req)), &mut sink);
        run_until_idle(&mut model, &mut sink);
        let mut got = Vec::new();
        while let Ok(ev) = shard[0].events.pop() {
            got.push(ev.kind);
        }
        let expected: Vec<EventKind> = (0..5)
            .map(EventKind::Token)
            .chain([EventKind::Done(FinishReason::Length)])
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn any_max_tokens_gets_the_text_over_and_over() {
        let words = (vocab().len() - 1) as u32;
        let n = 2 * words + 7;
        let (mut shard, mut engine, _) = links(1, 4096, 4096);
        let mut model = NullModel::new(0.0, 8, 0);
        let mut sink = EventSink::for_tests(&mut engine);
        let req = GenerateRequest {
            key: key(2),
            prompt: vec![0],
            params: GenParams {
                max_tokens: Some(n),
                ..GenParams::default()
            },
            generated: Vec::new(),
        };
        model.handle(EngineMsg::Generate(Box::new(req)), &mut sink);
        let mut text = String::new();
        let mut end = None;
        for _ in 0..100_000 {
            model.step(&mut sink);
            while let Ok(ev) = shard[0].events.pop() {
                match ev.kind {
                    EventKind::Token(t) => text.push_str(piece(t)),
                    EventKind::Done(r) => end = Some(r),
                    other => panic!("unexpected {other:?}"),
                }
            }
            if end.is_some() {
                break;
            }
        }
        assert_eq!(end, Some(FinishReason::Length));
        let once = NULL_TEXT.split_whitespace().collect::<Vec<_>>().join(" ");
        let head: Vec<&str> = once.split(' ').take(7).collect();
        assert_eq!(text, format!("{once} {once} {}", head.join(" ")));
        assert_eq!(text.split(' ').count() as u32, n);
    }

    #[test]
    fn cancel_confirms_and_forgets_the_sequence() {
        let (mut shard, mut engine, _) = links(1, 16, 1024);
        let mut model = NullModel::new(0.0, 8, 0);
        let mut sink = EventSink::for_tests(&mut engine);
        let req = GenerateRequest {
            key: key(1),
            prompt: vec![],
            params: GenParams::default(),
            generated: Vec::new(),
        };
        model.handle(EngineMsg::Generate(Box::new(req)), &mut sink);
        model.step(&mut sink);
        model.handle(EngineMsg::Cancel(key(1)), &mut sink);
        assert_eq!(model.step(&mut sink), StepOutcome::Idle);
        let kinds: Vec<_> =
            std::iter::from_fn(|| shard[0].events.pop().ok().map(|e| e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::Token(0),
                EventKind::Done(FinishReason::Cancelled)
            ]
        );
    }

    #[test]
    fn full_event_queue_pauses_instead_of_dropping() {
        let (mut shard, mut engine, _) = links(1, 16, 4);
        let mut model = NullModel::new(0.0, 8, 0);
        let mut sink = EventSink::for_tests(&mut engine);
        let params = GenParams {
            max_tokens: Some(10),
            ..GenParams::default()
        };
        let req = GenerateRequest {
            key: key(1),
            prompt: vec![],
            params,
            generated: Vec::new(),
        };
        model.handle(EngineMsg::Generate(Box::new(req)), &mut sink);
        let mut seen = Vec::new();
        for _ in 0..100 {
            model.step(&mut sink);
            while let Ok(ev) = shard[0].events.pop() {
                seen.push(ev.kind);
            }
        }
        assert_eq!(seen.len(), 11);
        assert_eq!(seen[10], EventKind::Done(FinishReason::Length));
    }

    #[test]
    fn beyond_max_running_sequences_wait_their_turn() {
        let (mut shard, mut engine, _) = links(1, 16, 1024);
        let mut model = NullModel::new(0.0, 1, 4);
        let mut sink = EventSink::for_tests(&mut engine);
        for slot in 0..3 {
            let params = GenParams {
                max_tokens: Some(2),
                ..GenParams::default()
            };
            let req = GenerateRequest {
                key: key(slot),
                prompt: vec![],
                params,
                generated: Vec::new(),
            };
            model.handle(EngineMsg::Generate(Box::new(req)), &mut sink);
        }
        run_until_idle(&mut model, &mut sink);
        let done: Vec<u32> = std::iter::from_fn(|| shard[0].events.pop().ok())
            .filter(|e| e.kind == EventKind::Done(FinishReason::Length))
            .map(|e| e.key.slot)
            .collect();
        assert_eq!(done, vec![0, 1, 2], "all served, in arrival order");
    }

    #[test]
    fn over_capacity_is_rejected_as_overloaded() {
        let (mut shard, mut engine, _) = links(1, 16, 64);
        let mut model = NullModel::new(0.0, 1, 0);
        let mut sink = EventSink::for_tests(&mut engine);
        for slot in 0..2 {
            let req = GenerateRequest {
                key: key(slot),
                prompt: vec![],
                params: GenParams::default(),
                generated: Vec::new(),
            };
            model.handle(EngineMsg::Generate(Box::new(req)), &mut sink);
        }
        let ev = shard[0].events.pop().expect("a rejection");
        assert_eq!(ev.key, key(1));
        assert_eq!(ev.kind, EventKind::Rejected(RejectReason::Overloaded));
    }
}
