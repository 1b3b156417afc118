//! The engine alone, one prompt, one sequence: `seedance-server generate --model DIR --prompt
//! TEXT`. Tokenize the prompt as-is (the tokenizer's post-processor adds BOS where the
//! checkpoint does; no chat template), feed it, then sample → detokenize → stop-match → write
//! until EOS, a stop id, a stop string or `max_tokens`. Output is the generated text only, or
//! with `--ids` the generated ids separated by spaces (and a final newline).
//!
//! Written against [`LanguageModel`], so any forward pass (CPU, CUDA, a test table) plugs in.

use std::io::Write;
use std::time::{Duration, Instant};

use super::detok::{DetokTable, Detokenizer};
use super::stop::{StopMatcher, StopState};
use super::tokenizer::{Tokenizer, TokenizerError};
use crate::engine::sampler::{ParamError, Sampler, SamplingParams};

/// A causal language model as the generation loop sees it.
pub trait LanguageModel {
    fn vocab_size(&self) -> usize;
    /// Feed tokens (the prompt, or one new token) and return the logits of the last one.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError>;
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Params(#[from] ParamError),
    #[error("the prompt is empty after tokenization")]
    EmptyPrompt,
    #[error("model: {0}")]
    Model(String),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    /// Generated-token cap (the smaller of this and `sampling.max_tokens` applies).
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    /// Print ids instead of text.
    pub ids: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

#[derive(Debug, Clone)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub finish_reason: FinishReason,
    /// Time to feed the prompt (and so to the first logits).
    pub prefill: Duration,
    /// Time of the rest.
    pub decode: Duration,
}

/// Runs one generation, writing output to `out` as it is produced.
pub fn generate(
    model: &mut dyn LanguageModel,
    tok: &Tokenizer,
    opts: &GenerateOptions,
    out: &mut dyn Write,
) -> Result<GenerateStats, GenerateError> {
    opts.sampling.validate()?;
    let prompt = tok.encode(&opts.prompt, true)?;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let max_tokens = opts
        .sampling
        .max_tokens
        .map_or(opts.max_tokens, |m| m.min(opts.max_tokens));
    let mut sampler = Sampler::new(&opts.sampling, model.vocab_size());
    sampler.set_prompt_len(prompt.len());
    let mut detok = Detokenizer::new(DetokTable::new(tok));
    let mut stop = StopMatcher::new(&opts.sampling.stop);
    let eos: &[u32] = if opts.sampling.ignore_eos {
        &[]
    } else {
        tok.eos_ids()
    };
    let is_stop_id = |t: u32| eos.contains(&t) || opts.sampling.stop_token_ids.contains(&t);

    let start = Instant::now();
    let mut history = prompt.clone();
    let mut logits = model.feed(&prompt)?;
    let prefill = start.elapsed();
    let (mut piece, mut text) = (String::new(), String::new());
    let mut finish = FinishReason::Length;
    let mut stopped_by_string = false;
    for _ in 0..max_tokens {
        let token = sampler.sample(&mut logits, &history).token;
        if is_stop_id(token) {
            finish = FinishReason::Stop;
            break;
        }
        history.push(token);
        piece.clear();
        text.clear();
        detok.push(token, &mut piece);
        let state = stop.push(&piece, &mut text);
        if opts.ids {
            let sep = if history.len() > prompt.len() + 1 {
                " "
            } else {
                ""
            };
            write!(out, "{sep}{token}")?;
        } else {
            out.write_all(text.as_bytes())?;
        }
        out.flush()?;
        if let StopState::Stopped { .. } = state {
            finish = FinishReason::Stop;
            stopped_by_string = true;
            break;
        }
        if history.len() - prompt.len() == max_tokens as usize {
            break;
        }
        logits = model.feed(&[token])?;
    }
    if !stopped_by_string {
        piece.clear();
        text.clear();
        detok.finish(&mut piece);
        if let StopState::Stopped { .. } = stop.push(&piece, &mut text) {
            finish = FinishReason::Stop;
        }
        stop.finish(&mut text);
        if !opts.ids {
            out.write_all(text.as_bytes())?;
        }
    }
    if opts.ids {
        writeln!(out)?;
    }
    out.flush()?;
    Ok(GenerateStats {
        prompt_tokens: prompt.len(),
        generated_tokens: history.len() - prompt.len(),
        finish_reason: finish,
        prefill,
        decode: start.elapsed().saturating_sub(prefill),
    })
}

/// Flags of `seedance-server generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer files) or synthetic:<shape>.
    #[arg(long)]
    pub model: String,
    /// Prompt text, tokenized as-is (no chat template).
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// 0 is greedy (the default, so that runs are reproducible without a seed).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: i32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed for sampling (absent: OS entropy).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep going past EOS.
    #[arg(long)]
    pub ignore_eos: bool,
    /// auto | cpu | cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print generated token ids separated by spaces instead of text.
    #[arg(long)]
    pub ids: bool,
    /// Generate for N copies of the prompt together: prefilled one after another, then one
    /// batched decode step advances all N (a benchmark of batched decode, what llama.cpp's
    /// `llama-batched-bench -npl N` times). Each sequence generates exactly --max-tokens (EOS and
    /// --stop do not end it); its tokens are printed as one line of ids per sequence with --ids,
    /// else nothing but the stats.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: Option<u16>,
}

impl GenerateArgs {
    /// The loop's options, validated.
    pub fn options(&self) -> Result<GenerateOptions, ParamError> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            max_tokens: Some(self.max_tokens),
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            ..SamplingParams::default()
        };
        sampling.validate()?;
        Ok(GenerateOptions {
            prompt: self.prompt.clone(),
            max_tokens: self.max_tokens,
            sampling,
            ids: self.ids,
        })
    }
}

#[cfg(test)]
mod tests;
