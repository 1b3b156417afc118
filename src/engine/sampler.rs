//! Sampling (SPEC 2): the request's [`SamplingParams`] (OpenAI field names, validated once) and
//! the per-sequence [`Sampler`] that turns one row of logits into the next token.
//!
//! Order, as in vLLM: penalties (repetition over prompt + generated tokens, then frequency and
//! presence over generated tokens) → temperature → top-k → top-p → min-p → draw. Temperature 0
//! is greedy: exactly the argmax, ties to the lowest id. Draws come from a per-request ChaCha20
//! stream, seeded by `seed` (same seed and logits, same tokens) or from OS entropy.
//!
//! No full-vocabulary sort: top-k is `select_nth_unstable_by`; top-p buckets the vocabulary by
//! log-probability distance from the maximum (1/16 nat per bucket) in one pass, takes whole
//! buckets until the mass is reached and sorts only the boundary bucket.

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

/// Per-sequence sampler: parameters, random stream and reusable scratch.
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
    /// One bit per vocabulary id: "already penalized this step" (only with penalties).
    seen: Vec<u64>,
    cands: Vec<(f32, u32)>,
    boundary: Vec<(f32, u32)>,
    mass: Vec<f64>,
}

impl Sampler {
    pub fn new(params: &SamplingParams, vocab: usize) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => ChaCha20Rng::from_os_rng(),
        };
        let top_k = match params.top_k {
            k if k <= 0 => 0,
            k => usize::try_from(k).unwrap_or(0),
        };
        let penalties = params.repetition_penalty != 1.0
            || params.presence_penalty != 0.0
            || params.frequency_penalty != 0.0;
        Self {
            temperature: params.temperature,
            top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            logprobs: params.logprobs.map(usize::from),
            rng,
            prompt_len: 0,
            seen: if penalties {
                vec![0; vocab.div_ceil(64)]
            } else {
                Vec::new()
            },
            cands: Vec::new(),
            boundary: Vec::new(),
            mass: Vec::new(),
        }
    }

    /// How many leading tokens of every `history` are prompt (default 0: all are generated).
    pub fn set_prompt_len(&mut self, n: usize) {
        self.prompt_len = n;
    }

    /// Picks the next token. `logits` (one per vocabulary id) is modified in place by the
    /// penalties; `history` is the sequence so far, prompt first.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Sampled {
        self.apply_penalties(logits, history);
        let token = if self.temperature == 0.0 || self.top_k == 1 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        let (logprob, top_logprobs) = if let Some(n) = self.logprobs {
            logprobs_of(logits, token, n)
        } else {
            (None, Vec::new())
        };
        Sampled {
            token,
            logprob,
            top_logprobs,
        }
    }

    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        if self.seen.is_empty() {
            return;
        }
        let generated = &history[self.prompt_len.min(history.len())..];
        let r = self.repetition_penalty;
        if r != 1.0 {
            for &t in history {
                if let Some(l) = logits.get_mut(t as usize) {
                    if test_and_set(&mut self.seen, t) {
                        *l = if *l > 0.0 { *l / r } else { *l * r };
                    }
                }
            }
            clear_bits(&mut self.seen, history);
        }
        let (f, p) = (self.frequency_penalty, self.presence_penalty);
        if f != 0.0 || p != 0.0 {
            for &t in generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= f;
                    if test_and_set(&mut self.seen, t) {
                        *l -= p;
                    }
                }
            }
            clear_bits(&mut self.seen, generated);
        }
    }

    /// Temperature, top-k, top-p, min-p, then one draw.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / self.temperature;
        let Some(max) = logits
            .iter()
            .copied()
            .filter(|l| !l.is_nan())
            .reduce(f32::max)
        else {
            return 0;
        };
        if max == f32::NEG_INFINITY {
            return argmax(logits);
        }
        let min_p_floor = if self.min_p > 0.0 {
            self.min_p.ln()
        } else {
            f32::NEG_INFINITY
        };
        let k = self.top_k;
        let mut cands = std::mem::take(&mut self.cands);
        cands.clear();
        if k > 0 && k < logits.len() {
            cands.extend(
                logits
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| !l.is_nan())
                    .map(|(i, &l)| (l, i as u32)),
            );
            if cands.len() > k {
                cands.select_nth_unstable_by(k - 1, order);
                cands.truncate(k);
            }
            if self.top_p < 1.0 {
                // k entries: a plain sort is cheap here.
                cands.sort_unstable_by(order);
                let total: f64 = cands.iter().map(|&(l, _)| weight(l, max, inv_t)).sum();
                let target = f64::from(self.top_p) * total;
                let mut cum = 0.0;
                let keep = cands
                    .iter()
                    .position(|&(l, _)| {
                        cum += weight(l, max, inv_t);
                        cum >= target
                    })
                    .map_or(cands.len(), |i| i + 1);
                cands.truncate(keep);
            }
        } else if self.top_p < 1.0 {
            let all = logits.iter().enumerate().map(|(i, &l)| (l, i as u32));
            self.nucleus(all, max, inv_t, &mut cands);
        } else if self.min_p > 0.0 {
            cands.extend(
                logits
                    .iter()
                    .enumerate()
                    .filter(|(_, &l)| (l - max) * inv_t >= min_p_floor)
                    .map(|(i, &l)| (l, i as u32)),
            );
        } else {
            // No truncation: draw straight from the full row.
            let token = self.draw_from(
                logits.iter().enumerate().map(|(i, &l)| (l, i as u32)),
                max,
                inv_t,
            );
            self.cands = cands;
            return token;
        }
        if self.min_p > 0.0 {
            cands.retain(|&(l, _)| (l - max) * inv_t >= min_p_floor);
        }
        let token = self.draw_from(cands.iter().copied(), max, inv_t);
        self.cands = cands;
        token
    }

    /// Inverse-CDF draw over `(logit, id)` with weights `exp((l - max) / T)`.
    fn draw_from<I: Iterator<Item = (f32, u32)> + Clone>(
        &mut self,
        it: I,
        max: f32,
        inv_t: f32,
    ) -> u32 {
        let total: f64 = it.clone().map(|(l, _)| weight(l, max, inv_t)).sum();
        let mut u = self.rng.random::<f64>() * total;
        let mut last = None;
        for (l, id) in it {
            let w = weight(l, max, inv_t);
            if w > 0.0 {
                last = Some(id);
                if u < w {
                    return id;
                }
                u -= w;
            }
        }
        last.unwrap_or(0)
    }

    /// The smallest set of most likely tokens whose probability reaches `top_p` (normalized over
    /// `it`), into `out`. Buckets by distance from `max`; sorts only the bucket that crosses.
    fn nucleus<I: Iterator<Item = (f32, u32)> + Clone>(
        &mut self,
        it: I,
        max: f32,
        inv_t: f32,
        out: &mut Vec<(f32, u32)>,
    ) {
        self.mass.clear();
        self.mass.resize(BUCKETS, 0.0);
        let mut total = 0.0f64;
        for (l, _) in it.clone() {
            let w = weight(l, max, inv_t);
            if w > 0.0 {
                self.mass[bucket(l, max, inv_t)] += w;
                total += w;
            }
        }
        let target = f64::from(self.top_p) * total;
        let mut cum = 0.0;
        let mut cut = BUCKETS - 1;
        for (b, m) in self.mass.iter().enumerate() {
            if cum + m >= target {
                cut = b;
                break;
            }
            cum += m;
        }
        self.boundary.clear();
        for (l, id) in it {
            if weight(l, max, inv_t) <= 0.0 {
                continue;
            }
            match bucket(l, max, inv_t) {
                b if b < cut => out.push((l, id)),
                b if b == cut => self.boundary.push((l, id)),
                _ => {}
            }
        }
        self.boundary.sort_unstable_by(order);
        for &(l, id) in &self.boundary {
            out.push((l, id));
            cum += weight(l, max, inv_t);
            if cum >= target {
                break;
            }
        }
    }
}

/// Log-softmax of `token` and of the `n` best tokens, over the penalized logits.
fn logprobs_of(logits: &[f32], token: u32, n: usize) -> (Option<f32>, Vec<(u32, f32)>) {
    let Some(max) = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .reduce(f32::max)
    else {
        return (None, Vec::new());
    };
    let sum: f64 = logits.iter().map(|&l| weight(l, max, 1.0)).sum();
    let lse = max + sum.ln() as f32;
    let n = n.min(logits.len());
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    for (i, &l) in logits.iter().enumerate().filter(|_| n > 0) {
        if l.is_nan() || (best.len() == n && order(&(l, i as u32), &best[n - 1]).is_ge()) {
            continue;
        }
        let pos = best.partition_point(|b| order(b, &(l, i as u32)).is_lt());
        best.insert(pos, (l, i as u32));
        best.truncate(n);
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

/// Exactly the argmax; ties go to the lowest id; NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_l = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_l || (!found && !l.is_nan()) {
            best = i;
            best_l = l;
            found = true;
        }
    }
    best as u32
}

#[inline]
fn weight(l: f32, max: f32, inv_t: f32) -> f64 {
    if l.is_nan() {
        0.0
    } else {
        f64::from((l - max) * inv_t).exp()
    }
}

#[inline]
fn bucket(l: f32, max: f32, inv_t: f32) -> usize {
    let d = (max - l) * inv_t * BUCKETS_PER_NAT;
    // `as` saturates: NaN → 0 is excluded by the callers, +inf → usize::MAX is clamped.
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
