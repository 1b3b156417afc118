//! Sampling (SPEC 2): the request's [`SamplingParams`] (OpenAI field names, validated once) and
//! the per-sequence [`Sampler`] that turns one row of logits into the next token.
//!
//! Order, as in vLLM: penalties (repetition over prompt + generated tokens, then frequency and
//! presence over generated tokens) → temperature → top-k → top-p → min-p → draw. Temperature 0
//! is greedy: exactly the argmax, ties to the lowest id. Draws come from a per-request ChaCha20
//! stream, seeded by `seed` (same seed and logits, same tokens) or from OS entropy.
//!
//! No full-vocabulary sort: top-k keeps the elements at or above the smallest of k chunk maxima
//! (at least k of them, usually few more) and runs `select_nth_unstable_by` on those; top-p
//! computes every weight once, buckets the vocabulary by log-probability distance from the
//! maximum (1/16 nat per bucket) in the same pass, takes whole buckets until the mass is reached
//! and sorts only the boundary bucket.
//!
//! Per-sequence state is small (parameters, the ChaCha stream); the vocabulary-sized scratch
//! lives once per thread (the engine thread samples every sequence).

use std::cell::RefCell;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

mod params;

pub use params::{ParamError, SamplingParams};

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` under the penalized logits at temperature 1 (before
    /// temperature and truncation, as OpenAI reports it); `None` unless logprobs were asked for.
    pub logprob: Option<f32>,
    /// The `logprobs` most likely tokens and their log-probabilities, best first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Buckets per nat of log-probability distance from the top token (top-p bucketing).
const BUCKETS_PER_NAT: f32 = 16.0;
const BUCKETS: usize = 16 * 40;

/// Vocabulary-sized work buffers, one set per thread.
#[derive(Default)]
struct Scratch {
    /// Weight `exp((l - max) / T)` of every id (full-vocabulary paths).
    w: Vec<f32>,
    /// Candidate ids after truncation.
    cands: Vec<u32>,
    /// Top-k candidates, or the top-p boundary bucket: (logit, id).
    pairs: Vec<(f32, u32)>,
    mass: Vec<f64>,
    /// One bit per id: "already penalized this step"; all clear between calls.
    seen: Vec<u64>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch (a fresh one if it is somehow in use).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Per-sequence sampler: parameters and random stream.
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    logprobs: Option<usize>,
    rng: ChaCha20Rng,
    /// Tokens of `history` that are the prompt (penalties treat them differently).
    prompt_len: usize,
}

impl Sampler {
    /// `vocab` is the logits row length (kept for API stability; rows may differ per call).
    pub fn new(params: &SamplingParams, _vocab: usize) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => ChaCha20Rng::from_os_rng(),
        };
        Self {
            temperature: params.temperature,
            top_k: usize::try_from(params.top_k).unwrap_or(0),
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            logprobs: params.logprobs.map(usize::from),
            rng,
            prompt_len: 0,
        }
    }

    /// How many leading tokens of every `history` are prompt (default 0: all are generated).
    pub fn set_prompt_len(&mut self, n: usize) {
        self.prompt_len = n;
    }

    /// Picks the next token. `logits` (one per vocabulary id) is modified in place by the
    /// penalties; `history` is the sequence so far, prompt first.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Sampled {
        let token = with_scratch(|s| {
            self.apply_penalties(logits, history, s);
            if self.temperature == 0.0 || self.top_k == 1 {
                argmax(logits)
            } else {
                self.draw(logits, s)
            }
        });
        let (logprob, top_logprobs) = match self.logprobs {
            Some(n) => logprobs_of(logits, token, n),
            None => (None, Vec::new()),
        };
        Sampled {
            token,
            logprob,
            top_logprobs,
        }
    }

    fn apply_penalties(&self, logits: &mut [f32], history: &[u32], s: &mut Scratch) {
        let (r, f, p) = (
            self.repetition_penalty,
            self.frequency_penalty,
            self.presence_penalty,
        );
        if r == 1.0 && f == 0.0 && p == 0.0 {
            return;
        }
        if s.seen.len() * 64 < logits.len() {
            s.seen.resize(logits.len().div_ceil(64), 0);
        }
        let generated = &history[self.prompt_len.min(history.len())..];
        if r != 1.0 {
            for &t in history {
                if let Some(l) = logits.get_mut(t as usize) {
                    if test_and_set(&mut s.seen, t) {
                        *l = if *l > 0.0 { *l / r } else { *l * r };
                    }
                }
            }
            clear_bits(&mut s.seen, history);
        }
        if f != 0.0 || p != 0.0 {
            for &t in generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= f;
                    if test_and_set(&mut s.seen, t) {
                        *l -= p;
                    }
                }
            }
            clear_bits(&mut s.seen, generated);
        }
    }

    /// Temperature, top-k, top-p, min-p, then one draw.
    fn draw(&mut self, logits: &[f32], s: &mut Scratch) -> u32 {
        let inv_t = 1.0 / self.temperature;
        let max = max_of(logits);
        if !max.is_finite() {
            return argmax(logits);
        }
        if self.top_k > 0 && self.top_k < logits.len() {
            return self.draw_top_k(logits, max, inv_t, s);
        }
        let total = weights(logits, max, inv_t, &mut s.w);
        if self.top_p >= 1.0 && self.min_p <= 0.0 {
            let u = self.rng.random::<f64>() * total;
            return pick(s.w.iter().enumerate().map(|(i, &w)| (i as u32, w)), u);
        }
        if self.top_p < 1.0 {
            nucleus(logits, max, inv_t, self.top_p, total, s);
        } else {
            s.cands.clear();
            s.cands
                .extend((0..logits.len() as u32).filter(|&i| s.w[i as usize] > 0.0));
        }
        if self.min_p > 0.0 {
            let (w, floor) = (&s.w, self.min_p);
            s.cands.retain(|&i| w[i as usize] >= floor);
        }
        let total: f64 = s.cands.iter().map(|&i| f64::from(s.w[i as usize])).sum();
        let u = self.rng.random::<f64>() * total;
        pick(s.cands.iter().map(|&i| (i, s.w[i as usize])), u)
    }

    /// Top-k (then top-p and min-p over the k, renormalized) and a draw.
    fn draw_top_k(&mut self, logits: &[f32], max: f32, inv_t: f32, s: &mut Scratch) -> u32 {
        top_k(logits, self.top_k, &mut s.pairs);
        let w = |l: f32| weight(l, max, inv_t);
        if self.top_p < 1.0 {
            s.pairs.sort_unstable_by(order);
            let total: f64 = s.pairs.iter().map(|&(l, _)| f64::from(w(l))).sum();
            let target = f64::from(self.top_p) * total;
            let mut cum = 0.0;
            let keep = s
                .pairs
                .iter()
                .position(|&(l, _)| {
                    cum += f64::from(w(l));
                    cum >= target
                })
                .map_or(s.pairs.len(), |i| i + 1);
            s.pairs.truncate(keep);
        }
        if self.min_p > 0.0 {
            let floor = self.min_p;
            s.pairs.retain(|&(l, _)| w(l) >= floor);
        }
        let total: f64 = s.pairs.iter().map(|&(l, _)| f64::from(w(l))).sum();
        let u = self.rng.random::<f64>() * total;
        pick(s.pairs.iter().map(|&(l, i)| (i, w(l))), u)
    }
}

/// Inverse-CDF pick: the first id whose cumulative weight passes `u` (the last positive one if
/// rounding leaves `u` beyond the total).
fn pick(it: impl Iterator<Item = (u32, f32)>, mut u: f64) -> u32 {
    let mut last = 0;
    for (id, w) in it {
        if w > 0.0 {
            let w = f64::from(w);
            last = id;
            if u < w {
                return id;
            }
            u -= w;
        }
    }
    last
}

/// Fills `w` with every id's weight; returns their sum.
fn weights(logits: &[f32], max: f32, inv_t: f32, w: &mut Vec<f32>) -> f64 {
    w.clear();
    w.extend(logits.iter().map(|&l| weight(l, max, inv_t)));
    w.iter().map(|&x| f64::from(x)).sum()
}

/// The smallest set of most likely ids whose probability reaches `top_p`, into `s.cands`
/// (weights already in `s.w`). Buckets by distance from `max`; sorts only the crossing bucket.
fn nucleus(logits: &[f32], max: f32, inv_t: f32, top_p: f32, total: f64, s: &mut Scratch) {
    s.mass.clear();
    s.mass.resize(BUCKETS, 0.0);
    for (&l, &w) in logits.iter().zip(&s.w) {
        if w > 0.0 {
            s.mass[bucket(l, max, inv_t)] += f64::from(w);
        }
    }
    let target = f64::from(top_p) * total;
    let mut cum = 0.0;
    let mut cut = BUCKETS - 1;
    for (b, m) in s.mass.iter().enumerate() {
        if cum + m >= target {
            cut = b;
            break;
        }
        cum += m;
    }
    s.cands.clear();
    s.pairs.clear();
    for (i, (&l, &w)) in logits.iter().zip(&s.w).enumerate() {
        if w > 0.0 {
            match bucket(l, max, inv_t) {
                b if b < cut => s.cands.push(i as u32),
                b if b == cut => s.pairs.push((l, i as u32)),
                _ => {}
            }
        }
    }
    s.pairs.sort_unstable_by(order);
    for &(l, id) in &s.pairs {
        s.cands.push(id);
        cum += f64::from(weight(l, max, inv_t));
        if cum >= target {
            break;
        }
    }
}

/// The `k` best (logit, id) pairs, unordered. Every one of `n / k` (or more) chunks holds its
/// own maximum, so at least `k` elements reach the smallest chunk maximum; only those are kept
/// for the selection.
fn top_k(logits: &[f32], k: usize, out: &mut Vec<(f32, u32)>) {
    out.clear();
    let chunk = (logits.len() / k).max(1);
    let threshold = logits
        .chunks(chunk)
        .map(max_of)
        .fold(f32::INFINITY, f32::min);
    out.extend(
        logits
            .iter()
            .enumerate()
            .filter(|(_, &l)| l >= threshold)
            .map(|(i, &l)| (l, i as u32)),
    );
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, order);
        out.truncate(k);
    }
}

/// Log-softmax of `token` and of the `n` best tokens, over the penalized logits.
fn logprobs_of(logits: &[f32], token: u32, n: usize) -> (Option<f32>, Vec<(u32, f32)>) {
    let max = max_of(logits);
    if !max.is_finite() {
        return (None, Vec::new());
    }
    let sum: f64 = logits.iter().map(|&l| f64::from(weight(l, max, 1.0))).sum();
    let lse = max + sum.ln() as f32;
    let mut best = Vec::new();
    if n > 0 {
        top_k(logits, n.min(logits.len()), &mut best);
        best.sort_unstable_by(order);
    }
    let chosen = logits.get(token as usize).map(|l| l - lse);
    (
        chosen,
        best.into_iter().map(|(l, id)| (id, l - lse)).collect(),
    )
}

/// Descending by logit, ties by ascending id; NaN last.
fn order(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Largest non-NaN value (-inf if none).
fn max_of(xs: &[f32]) -> f32 {
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Exactly the argmax; ties go to the lowest id; NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = max_of(logits);
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

#[inline]
fn weight(l: f32, max: f32, inv_t: f32) -> f32 {
    if l.is_nan() {
        0.0
    } else {
        ((l - max) * inv_t).exp()
    }
}

#[inline]
fn bucket(l: f32, max: f32, inv_t: f32) -> usize {
    let d = (max - l) * inv_t * BUCKETS_PER_NAT;
    // `as` saturates (+inf → usize::MAX); the min clamps it to the last bucket.
    (d as usize).min(BUCKETS - 1)
}

/// Sets `t`'s bit; true if it was clear.
#[inline]
fn test_and_set(bits: &mut [u64], t: u32) -> bool {
    let (w, b) = ((t / 64) as usize, t % 64);
    match bits.get_mut(w) {
        Some(word) if *word & (1 << b) == 0 => {
            *word |= 1 << b;
            true
        }
        _ => false,
    }
}

fn clear_bits(bits: &mut [u64], tokens: &[u32]) {
    for &t in tokens {
        if let Some(word) = bits.get_mut((t / 64) as usize) {
            *word = 0;
        }
    }
}

#[cfg(test)]
mod tests;
