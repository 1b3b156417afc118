//! The engine thread: owns the model, the scheduler and (for real models) the KV cache.
//!
//! Shards talk to it only through [`queue`]: they push [`EngineMsg`]s (token-level requests,
//! cancels, pause/resume for backpressure) and receive [`TokenEvent`]s (one generated token id,
//! or the end of a sequence). Text never crosses this boundary: shards tokenize and detokenize.

pub mod build;
pub mod forward;
pub mod kv;
pub mod null;
pub mod queue;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod thread;

/// Identifies one sequence: the shard that owns it, the shard's request slot and that slot's
/// generation (so a late event for a reused slot is recognised and dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqKey {
    pub shard: u16,
    pub slot: u32,
    pub gen: u32,
}

/// A token-level generation request, built on a shard.
#[derive(Debug)]
pub struct GenerateRequest {
    pub key: SeqKey,
    /// Prompt token ids (already templated and tokenized on the shard).
    pub prompt: Vec<u32>,
    /// Sampling, stop ids and `max_tokens` (always set by the shard); stop strings are
    /// matched on the shard.
    pub params: sampler::SamplingParams,
    /// Tokens an earlier owner already generated (a takeover, SPEC 4 "Resume"): re-prefilled
    /// after the prompt, counted against `max_tokens`, seen by the penalties, and the sampler's
    /// random stream is advanced past them. Empty for a new request.
    pub generated: Vec<u32>,
}

/// Shard → engine.
#[derive(Debug)]
pub enum EngineMsg {
    Generate(Box<GenerateRequest>),
    /// Stop the sequence and free its KV blocks; the engine answers with `Done(Cancelled)`.
    Cancel(SeqKey),
    /// The client cannot take more output: skip the sequence in decode steps, keep its KV.
    Pause(SeqKey),
    Resume(SeqKey),
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

/// What the engine reports for a sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EventKind {
    Token(u32),
    /// Only for requests that asked for logprobs, sent just before the `Token` event they
    /// describe: rank 0 is the sampled token's own log-probability, ranks 1..=n the n most
    /// likely tokens of that step, best first (OpenAI's `top_logprobs`). Several small `Copy`
    /// events instead of one boxed list keep the queue allocation-free.
    Logprob {
        rank: u8,
        token: u32,
        logprob: f32,
    },
    Done(FinishReason),
    /// The request was refused (queue full, prompt too long); the sequence is gone.
    Rejected(RejectReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    Overloaded,
    PromptTooLong,
}

impl RejectReason {
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::Overloaded => "overloaded",
            RejectReason::PromptTooLong => "prompt_too_long",
        }
    }
}

/// Engine → shard, 24 bytes, `Copy`: no allocation per token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenEvent {
    pub key: SeqKey,
    pub kind: EventKind,
}
