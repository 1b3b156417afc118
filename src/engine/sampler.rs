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

pub use params::{ParamError, SamplingDefaults, SamplingParams};

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
    /// Top-k candidates, or the top-p boundary bucket: (logit, id).
    pairs: Vec<(f32, u32)>,
    mass: Vec<f64>,
    /// Each id's top-p bucket.
    buckets: Vec<u16>,
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

    /// `Some(n)` when the request asked for logprobs with `n` alternatives per token.
    pub fn logprobs(&self) -> Option<usize> {
        self.logprobs
    }

    /// How many leading tokens of every `history` are prompt (default 0: all are generated).
    pub fn set_prompt_len(&mut self, n: usize) {
        self.prompt_len = n;
    }

    /// Advances the random stream past `n` tokens sampled earlier (a takeover re-creates the
    /// sampler of a generation another instance started): every non-greedy `sample` draws
    /// exactly one number, so the same seed then continues with the same draws.
    pub fn skip_draws(&mut self, n: usize) {
        if self.temperature == 0.0 || self.top_k == 1 {
            return;
        }
        for _ in 0..n {
            let _ = self.rng.random::<f64>();
        }
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
        let mut total = weights(logits, max, inv_t, &mut s.w);
        // Membership in the nucleus is a threshold in `order`: everything up to `last`.
        let last = if self.top_p < 1.0 {
            let (last, mass) = nucleus(logits, max, inv_t, self.top_p, total, s);
            total = mass;
            Some(last)
        } else {
            None
        };
        let member =
            |i: usize, l: f32| last.is_none_or(|(ll, li)| l > ll || (l == ll && i as u32 <= li));
        if self.min_p > 0.0 {
            let floor = self.min_p;
            for (i, (w, &l)) in s.w.iter_mut().zip(logits).enumerate() {
                if *w < floor || !member(i, l) {
                    *w = 0.0;
                }
            }
            total = s.w.iter().map(|&w| f64::from(w)).sum();
        }
        let u = self.rng.random::<f64>() * total;
        let it = s.w.iter().zip(logits).enumerate();
        pick(
            it.filter(|&(i, (_, &l))| member(i, l))
                .map(|(i, (&w, _))| (i as u32, w)),
            u,
        )
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

/// Fills `w` with every id's weight; returns their sum. Sixteen f32 lanes so the loop
/// vectorizes (each lane sums under 10^4 terms of at most 1: ample precision for a draw).
fn weights(logits: &[f32], max: f32, inv_t: f32, w: &mut Vec<f32>) -> f64 {
    const LANES: usize = 16;
    w.clear();
    w.resize(logits.len(), 0.0);
    let mut acc = [0f32; LANES];
    let mut wc = w.chunks_exact_mut(LANES);
    let mut lc = logits.chunks_exact(LANES);
    for (wc, lc) in (&mut wc).zip(&mut lc) {
        for j in 0..LANES {
            let x = weight(lc[j], max, inv_t);
            wc[j] = x;
            acc[j] += x;
        }
    }
    let mut total: f64 = acc.iter().map(|&a| f64::from(a)).sum();
    for (x, &l) in wc.into_remainder().iter_mut().zip(lc.remainder()) {
        *x = weight(l, max, inv_t);
        total += f64::from(*x);
    }
    total
}

/// The smallest set of most likely ids whose probability reaches `top_p` is every id up to a
/// threshold in `order`; returns that last (logit, id) and the set's mass (weights already in
/// `s.w`). Buckets by distance from `max`; sorts only the bucket where the mass is crossed.
fn nucleus(
    logits: &[f32],
    max: f32,
    inv_t: f32,
    top_p: f32,
    total: f64,
    s: &mut Scratch,
) -> ((f32, u32), f64) {
    // Four interleaved histograms so that neighbours landing in one bucket do not serialize
    // on the same memory cell; each id's bucket is kept for the collection pass.
    s.mass.clear();
    s.mass.resize(4 * BUCKETS, 0.0);
    s.buckets.clear();
    s.buckets
        .extend(logits.iter().map(|&l| bucket(l, max, inv_t) as u16));
    for (i, (&b, &w)) in s.buckets.iter().zip(&s.w).enumerate() {
        s.mass[(i & 3) * BUCKETS + b as usize] += f64::from(w);
    }
    let target = f64::from(top_p) * total;
    let mut cum = 0.0;
    let mut cut = BUCKETS - 1;
    for b in 0..BUCKETS {
        let m: f64 = (0..4).map(|h| s.mass[h * BUCKETS + b]).sum();
        if cum + m >= target {
            cut = b;
            break;
        }
        cum += m;
    }
    s.pairs.clear();
    let cut16 = cut as u16;
    for (i, (&b, &w)) in s.buckets.iter().zip(&s.w).enumerate() {
        if b == cut16 && w > 0.0 {
            s.pairs.push((logits[i], i as u32));
        }
    }
    s.pairs.sort_unstable_by(order);
    let mut last = (max, 0);
    for (j, &(l, id)) in s.pairs.iter().enumerate() {
        last = (l, id);
        cum += f64::from(s.w[id as usize]);
        if cum >= target || j + 1 == s.pairs.len() {
            break;
        }
    }
    (last, cum)
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

/// `exp((l - max) / T)`; 0 for NaN and for anything below e^-87 (masked `-inf` logits).
#[inline]
fn weight(l: f32, max: f32, inv_t: f32) -> f32 {
    let x = (l - max) * inv_t;
    if x >= -87.0 {
        exp_neg(x)
    } else {
        0.0
    }
}

/// e^x for x in [-87, 0] (Cephes `expf`: x = n ln 2 + r, degree-6 polynomial for e^r, 2^n
/// from the exponent bits; relative error ~1e-7). Branch-free so the weight loop vectorizes.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n is in [-126, 0], so n + 127 is a normal exponent.
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
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
