//! The Llama-family decoder (Llama 2/3/3.x, Qwen2, Mistral, Phi-3), read like the checkpoint:
//! config → rotary → MLP → attention → decoder layer → model.
//!
//! Variants are data, not code paths: q|k|v and gate|up are always stored fused (Llama-style
//! checkpoints are concatenated at load, Phi-3 ships them fused), Qwen2's QKV bias is an optional
//! bias, tied embeddings reuse `embed_tokens` as lm_head.
//!
//! # Batched forward
//! One [`Transformer::forward`] call runs a continuous-batching step: several sequences, each
//! contributing a span of new tokens (a prefill chunk of any length, or one decode token) that
//! starts at `start_pos`, with the sequence's [`BlockTable`]. All new tokens of all sequences are
//! stacked into one `(n, hidden)` activation so every weight matrix is read once per step. Each
//! layer writes the new tokens' K/V into the paged cache before attention, so a token attends to
//! the sequence's cached positions and, causally, to the chunk's earlier tokens. The caller must
//! have reserved cache slots for `0..start_pos + tokens.len()`. Logits come back only for the rows
//! asked for ([`Logits`]): `(n_wanted, vocab)`, in sequence order.

use super::config::{Arch, ModelConfig, RopeScaling};
use super::loader::Checkpoint;
use super::ModelError;
use crate::backend::{AttnSeq, AttnShape, Backend, RopeFreqs, Weight};
use crate::engine::kv::{BlockTable, KvCache, KvConfig};
use std::path::Path;

/// Where weights come from: a safetensors checkpoint, or the synthetic generator.
pub trait WeightSource {
    /// The `(rows, cols)` matrix `name`, as F16.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight, ModelError>;
    /// The vector `name` of length `len` (norm weights, biases), as F32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError>;
}

impl WeightSource for Checkpoint {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight, ModelError> {
        Ok(Weight::new(rows, cols, self.f16(name, &[rows, cols])?))
    }
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        self.f32(name, &[len])
    }
}

// ---------------------------------------------------------------- rotary

/// Inverse frequencies as transformers computes them (f32), with llama3 scaling applied.
pub fn rope_freqs(cfg: &ModelConfig) -> RopeFreqs {
    let dim = cfg.rotary_dim;
    let mut inv_freq: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / dim as f32))
        .collect();
    if let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old,
    } = cfg.rope_scaling
    {
        let low_wavelen = old / low_freq_factor;
        let high_wavelen = old / high_freq_factor;
        for f in &mut inv_freq {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            if wavelen > low_wavelen {
                *f /= factor;
            } else if wavelen >= high_wavelen {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                *f = (1.0 - smooth) * *f / factor + smooth * *f;
            }
        }
    }
    if let Some(factors) = &cfg.rope_factors {
        for (f, d) in inv_freq.iter_mut().zip(factors) {
            *f /= d;
        }
    }
    RopeFreqs {
        inv_freq,
        rotary_dim: dim,
        attention_scaling: 1.0,
    }
}

// ---------------------------------------------------------------- MLP

/// SwiGLU: down(silu(gate(x)) · up(x)).
struct Mlp {
    /// (2·inter, hidden): gate rows then up rows.
    gate_up: Weight,
    /// (hidden, inter)
    down: Weight,
}

impl Mlp {
    fn load(src: &dyn WeightSource, cfg: &ModelConfig, p: &str) -> Result<Self, ModelError> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let gate_up = match cfg.arch {
            Arch::Phi3 => src.matrix(&format!("{p}.gate_up_proj.weight"), 2 * i, h)?,
            _ => Weight::concat_rows(vec![
                src.matrix(&format!("{p}.gate_proj.weight"), i, h)?,
                src.matrix(&format!("{p}.up_proj.weight"), i, h)?,
            ]),
        };
        Ok(Self {
            gate_up,
            down: src.matrix(&format!("{p}.down_proj.weight"), h, i)?,
        })
    }

    /// x (n, hidden) → out (n, hidden)
    fn forward(&self, be: &dyn Backend, x: &[f32], s: &mut Scratch, out: &mut [f32]) {
        let n = x.len() / self.gate_up.cols;
        let inter = self.down.cols;
        let gu = &mut s.gate_up[..n * 2 * inter]; // (n, 2·inter)
        be.matmul(x, &self.gate_up, gu);
        let act = &mut s.act[..n * inter]; // (n, inter)
        be.silu_mul(gu, inter, act);
        be.matmul(act, &self.down, out);
    }
}

// ---------------------------------------------------------------- attention

struct Attention {
    /// (qkv_dim, hidden): q rows (heads·head_dim), then k, then v (kv_heads·head_dim each).
    qkv: Weight,
    /// (qkv_dim,) Qwen2 / Llama attention_bias.
    qkv_bias: Option<Vec<f32>>,
    /// (hidden, heads·head_dim)
    o_proj: Weight,
    /// (hidden,)
    o_bias: Option<Vec<f32>>,
}

impl Attention {
    fn load(src: &dyn WeightSource, cfg: &ModelConfig, p: &str) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let (qd, kvd) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let qkv = match cfg.arch {
            Arch::Phi3 => src.matrix(&format!("{p}.qkv_proj.weight"), cfg.qkv_dim(), h)?,
            _ => Weight::concat_rows(vec![
                src.matrix(&format!("{p}.q_proj.weight"), qd, h)?,
                src.matrix(&format!("{p}.k_proj.weight"), kvd, h)?,
                src.matrix(&format!("{p}.v_proj.weight"), kvd, h)?,
            ]),
        };
        let qkv_bias = if cfg.qkv_bias {
            let mut b = src.vector(&format!("{p}.q_proj.bias"), qd)?;
            b.extend(src.vector(&format!("{p}.k_proj.bias"), kvd)?);
            b.extend(src.vector(&format!("{p}.v_proj.bias"), kvd)?);
            Some(b)
        } else {
            None
        };
        let o_bias = if cfg.o_bias {
            Some(src.vector(&format!("{p}.o_proj.bias"), h)?)
        } else {
            None
        };
        Ok(Self {
            qkv,
            qkv_bias,
            o_proj: src.matrix(&format!("{p}.o_proj.weight"), h, qd)?,
            o_bias,
        })
    }

    /// x (n, hidden) → out (n, hidden); writes the new tokens' K/V into `kv` layer `layer`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        m: &Transformer,
        layer: usize,
        x: &[f32],
        seqs: &[SeqInput<'_>],
        aseqs: &[AttnSeq<'_>],
        kv: &mut KvCache,
        s: &mut Scratch,
        out: &mut [f32],
    ) {
        let c = &m.cfg;
        let be = m.backend.as_ref();
        let n = s.positions.len();
        let (qd, kvd, qkvd) = (
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.qkv_dim(),
        );
        let qkv = &mut s.qkv[..n * qkvd]; // (n, qkv_dim)
        be.matmul(x, &self.qkv, qkv);
        let q = &mut s.q[..n * qd]; // (n, heads, head_dim)
        let k = &mut s.k[..n * kvd]; // (n, kv_heads, head_dim)
        let v = &mut s.v[..n * kvd]; // (n, kv_heads, head_dim)
        for t in 0..n {
            let row = &mut qkv[t * qkvd..(t + 1) * qkvd];
            if let Some(b) = &self.qkv_bias {
                row.iter_mut().zip(b).for_each(|(r, b)| *r += b);
            }
            q[t * qd..(t + 1) * qd].copy_from_slice(&row[..qd]);
            k[t * kvd..(t + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
            v[t * kvd..(t + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
        }
        be.rope(q, &s.positions, c.num_heads, c.head_dim, &m.rope);
        be.rope(k, &s.positions, c.num_kv_heads, c.head_dim, &m.rope);
        let mut row = 0;
        for sq in seqs {
            for i in 0..sq.tokens.len() {
                let (kr, vr) = (&k[(row + i) * kvd..][..kvd], &v[(row + i) * kvd..][..kvd]);
                kv.write(layer, sq.blocks, sq.start_pos + i, kr, vr);
            }
            row += sq.tokens.len();
        }
        let shape = AttnShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size: kv.block_size(),
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            sliding_window: c.sliding_window,
        };
        let (kc, vc) = kv.layer(layer);
        let attn = &mut s.attn[..n * qd]; // (n, heads, head_dim)
        be.attention(q, kc, vc, aseqs, &shape, attn);
        be.matmul(attn, &self.o_proj, out);
        if let Some(b) = &self.o_bias {
            out.chunks_exact_mut(b.len())
                .for_each(|r| r.iter_mut().zip(b).for_each(|(o, b)| *o += b));
        }
    }
}

// ---------------------------------------------------------------- decoder layer

struct DecoderLayer {
    /// (hidden,)
    input_layernorm: Vec<f32>,
    self_attn: Attention,
    /// (hidden,)
    post_attention_layernorm: Vec<f32>,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(src: &dyn WeightSource, cfg: &ModelConfig, i: usize) -> Result<Self, ModelError> {
        let p = format!("model.layers.{i}");
        let h = cfg.hidden_size;
        Ok(Self {
            input_layernorm: src.vector(&format!("{p}.input_layernorm.weight"), h)?,
            self_attn: Attention::load(src, cfg, &format!("{p}.self_attn"))?,
            post_attention_layernorm: src
                .vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            mlp: Mlp::load(src, cfg, &format!("{p}.mlp"))?,
        })
    }

    /// x (n, hidden) updated in place: x += attn(norm(x)); x += mlp(norm(x)).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        m: &Transformer,
        layer: usize,
        x: &mut [f32],
        seqs: &[SeqInput<'_>],
        aseqs: &[AttnSeq<'_>],
        kv: &mut KvCache,
        s: &mut Scratch,
    ) {
        let be = m.backend.as_ref();
        let eps = m.cfg.rms_norm_eps;
        let n = s.positions.len();
        let h = m.cfg.hidden_size;
        let mut normed = std::mem::take(&mut s.normed); // (n, hidden)
        let mut delta = std::mem::take(&mut s.delta); // (n, hidden)
        be.rmsnorm(x, &self.input_layernorm, eps, &mut normed[..n * h]);
        self.self_attn.forward(
            m,
            layer,
            &normed[..n * h],
            seqs,
            aseqs,
            kv,
            s,
            &mut delta[..n * h],
        );
        x.iter_mut().zip(&delta[..n * h]).for_each(|(a, d)| *a += d);
        be.rmsnorm(x, &self.post_attention_layernorm, eps, &mut normed[..n * h]);
        self.mlp
            .forward(be, &normed[..n * h], s, &mut delta[..n * h]);
        x.iter_mut().zip(&delta[..n * h]).for_each(|(a, d)| *a += d);
        s.normed = normed;
        s.delta = delta;
    }
}

// ---------------------------------------------------------------- model

/// One decoder layer's weights, borrowed (see [`Transformer::layer_weights`]).
pub struct LayerWeights<'a> {
    /// (hidden,)
    pub input_layernorm: &'a [f32],
    /// (qkv_dim, hidden): q rows, then k, then v.
    pub qkv: &'a Weight,
    /// (qkv_dim,)
    pub qkv_bias: Option<&'a [f32]>,
    /// (hidden, heads·head_dim)
    pub o_proj: &'a Weight,
    /// (hidden,)
    pub o_bias: Option<&'a [f32]>,
    /// (hidden,)
    pub post_attention_layernorm: &'a [f32],
    /// (2·inter, hidden): gate rows then up rows.
    pub gate_up: &'a Weight,
    /// (hidden, inter)
    pub down: &'a Weight,
}

/// Which logits rows a sequence wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (an intermediate prefill chunk).
    None,
    /// The last new token's row (the usual case: sample the next token).
    Last,
    /// Every new token's row (tests, prompt logprobs).
    All,
}

/// One sequence's part of a batched step.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// New tokens (prefill chunk or one decode token); non-empty.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions `0..start_pos` are already in the cache.
    pub start_pos: usize,
    /// The sequence's blocks, reserved for at least `start_pos + tokens.len()` positions.
    pub blocks: &'a BlockTable,
    pub logits: Logits,
}

/// Reusable activation buffers; grown on demand, never shrunk, so steady-state steps allocate
/// nothing.
#[derive(Default)]
pub struct Scratch {
    positions: Vec<u32>,
    x: Vec<f32>,
    normed: Vec<f32>,
    delta: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    last: Vec<f32>,
    logits: Vec<f32>,
}

impl Scratch {
    fn ensure(&mut self, c: &ModelConfig, n: usize, n_logits: usize) {
        let grow = |v: &mut Vec<f32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        };
        let (h, qd, kvd) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        grow(&mut self.x, n * h);
        grow(&mut self.normed, n * h);
        grow(&mut self.delta, n * h);
        grow(&mut self.qkv, n * c.qkv_dim());
        grow(&mut self.q, n * qd);
        grow(&mut self.k, n * kvd);
        grow(&mut self.v, n * kvd);
        grow(&mut self.attn, n * qd);
        grow(&mut self.gate_up, n * 2 * c.intermediate_size);
        grow(&mut self.act, n * c.intermediate_size);
        grow(&mut self.last, n_logits * h);
        grow(&mut self.logits, n_logits * c.vocab_size);
    }
}

/// The attention view of a batch: each sequence's rows, positions and blocks.
fn attn_seqs<'a>(seqs: &[SeqInput<'a>]) -> Vec<AttnSeq<'a>> {
    let mut row = 0;
    seqs.iter()
        .map(|s| {
            let a = AttnSeq {
                row,
                len: s.tokens.len(),
                start_pos: s.start_pos,
                blocks: s.blocks.blocks(),
            };
            row += s.tokens.len();
            a
        })
        .collect()
}

pub struct Transformer {
    cfg: ModelConfig,
    /// (vocab, hidden)
    embed_tokens: Weight,
    layers: Vec<DecoderLayer>,
    /// (hidden,)
    norm: Vec<f32>,
    /// (vocab, hidden); None when tied to `embed_tokens`.
    lm_head: Option<Weight>,
    rope: RopeFreqs,
    backend: Box<dyn Backend>,
    /// Logit columns at or past this id are set to −∞ (synthetic models whose real-shaped vocab is
    /// larger than their small tokenizer).
    vocab_limit: Option<usize>,
}

impl Transformer {
    /// Loads a Hugging Face checkpoint directory (config.json + safetensors).
    pub fn load(dir: &Path, backend: Box<dyn Backend>) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?;
        Self::from_source(cfg, &ck, backend)
    }

    /// Loads a GGUF file (config from its metadata; quantized matrices stay quantized unless
    /// `dequantize`, which loads them as F16).
    pub fn load_gguf(
        path: &Path,
        backend: Box<dyn Backend>,
        dequantize: bool,
    ) -> Result<Self, ModelError> {
        let mut ck = super::gguf_checkpoint::GgufCheckpoint::open(path)?;
        ck.dequantize = dequantize;
        Self::from_source(ck.config().clone(), &ck, backend)
    }

    /// Builds the model from any weight source, by the checkpoint's tensor names.
    pub fn from_source(
        cfg: ModelConfig,
        src: &dyn WeightSource,
        backend: Box<dyn Backend>,
    ) -> Result<Self, ModelError> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = src.matrix("model.embed_tokens.weight", v, h)?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(src, &cfg, i))
            .collect::<Result<_, _>>()?;
        let norm = src.vector("model.norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(src.matrix("lm_head.weight", v, h)?)
        };
        let rope = rope_freqs(&cfg);
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            backend,
            vocab_limit: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Masks logits of ids ≥ `limit` (see the field doc).
    pub fn set_vocab_limit(&mut self, limit: Option<usize>) {
        self.vocab_limit = limit;
    }

    /// The input embedding, (vocab, hidden).
    pub fn embed_tokens(&self) -> &Weight {
        &self.embed_tokens
    }

    /// Every decoder layer's weights, in order (for uploading to a device).
    pub fn layer_weights(&self) -> impl Iterator<Item = LayerWeights<'_>> {
        self.layers.iter().map(|l| LayerWeights {
            input_layernorm: &l.input_layernorm,
            qkv: &l.self_attn.qkv,
            qkv_bias: l.self_attn.qkv_bias.as_deref(),
            o_proj: &l.self_attn.o_proj,
            o_bias: l.self_attn.o_bias.as_deref(),
            post_attention_layernorm: &l.post_attention_layernorm,
            gate_up: &l.mlp.gate_up,
            down: &l.mlp.down,
        })
    }

    /// The final norm weight, (hidden,).
    pub fn final_norm(&self) -> &[f32] {
        &self.norm
    }

    /// The LM head, (vocab, hidden): its own matrix or the tied embedding.
    pub fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Whether the LM head is the embedding matrix (tied).
    pub fn tied_lm_head(&self) -> bool {
        self.lm_head.is_none()
    }

    pub fn rope(&self) -> &RopeFreqs {
        &self.rope
    }

    /// See [`Transformer::set_vocab_limit`].
    pub fn vocab_limit(&self) -> Option<usize> {
        self.vocab_limit
    }

    /// A KV cache config for this model with `num_blocks` blocks of `block_size`.
    pub fn kv_config(&self, num_blocks: usize, block_size: usize) -> KvConfig {
        KvConfig {
            num_layers: self.cfg.num_layers,
            num_blocks,
            block_size,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Every weight matrix once (a tied lm_head is the embedding).
    fn matrices(&self) -> impl Iterator<Item = &Weight> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.self_attn.qkv,
                    &l.self_attn.o_proj,
                    &l.mlp.gate_up,
                    &l.mlp.down,
                ]
            })
            .chain(std::iter::once(&self.embed_tokens))
            .chain(self.lm_head.as_ref())
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        self.matrices().map(Weight::bytes).sum()
    }

    /// The storage formats of the weight matrices with their counts, e.g. "Q4_1 ×120, Q8_0 ×1".
    pub fn weight_formats(&self) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for w in self.matrices() {
            match counts.iter_mut().find(|(f, _)| *f == w.format()) {
                Some((_, n)) => *n += 1,
                None => counts.push((w.format(), 1)),
            }
        }
        counts
            .iter()
            .map(|(f, n)| format!("{f} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether any weight matrix is kept quantized.
    pub fn has_quantized_weights(&self) -> bool {
        self.matrices().any(|w| w.quant().is_some())
    }

    /// One batched step; see the module doc. Returns (n_wanted, vocab) logits.
    pub fn forward<'s>(
        &self,
        seqs: &[SeqInput<'_>],
        kv: &mut KvCache,
        s: &'s mut Scratch,
    ) -> Result<&'s [f32], ModelError> {
        let mut out = Ok(0);
        self.backend
            .scope(&mut || out = self.forward_in_scope(seqs, kv, s));
        let len = out?;
        Ok(&s.logits[..len])
    }

    /// [`Self::forward`] inside the backend's scope; returns the logits' length in `s.logits`.
    fn forward_in_scope(
        &self,
        seqs: &[SeqInput<'_>],
        kv: &mut KvCache,
        s: &mut Scratch,
    ) -> Result<usize, ModelError> {
        let c = &self.cfg;
        self.check(seqs, kv)?;
        let n: usize = seqs.iter().map(|q| q.tokens.len()).sum();
        let n_logits: usize = seqs
            .iter()
            .map(|q| match q.logits {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => q.tokens.len(),
            })
            .sum();
        s.ensure(c, n, n_logits);
        s.positions.clear();
        for q in seqs {
            s.positions
                .extend((0..q.tokens.len()).map(|i| (q.start_pos + i) as u32));
        }
        let h = c.hidden_size;
        let mut x = std::mem::take(&mut s.x); // (n, hidden)
        let toks = seqs.iter().flat_map(|q| q.tokens.iter());
        for (row, &t) in x.chunks_exact_mut(h).zip(toks) {
            self.embed_tokens.row_f32(t as usize, row);
        }
        // The attention view of the batch, once per step (every layer reads the same).
        let aseqs = attn_seqs(seqs);
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward(self, i, &mut x[..n * h], seqs, &aseqs, kv, s);
        }
        // Gather the wanted rows, then final norm + lm_head on those only.
        let mut row = 0;
        let mut k = 0;
        for q in seqs {
            let rows = match q.logits {
                Logits::None => 0..0,
                Logits::Last => row + q.tokens.len() - 1..row + q.tokens.len(),
                Logits::All => row..row + q.tokens.len(),
            };
            for r in rows {
                s.last[k * h..(k + 1) * h].copy_from_slice(&x[r * h..(r + 1) * h]);
                k += 1;
            }
            row += q.tokens.len();
        }
        s.x = x;
        let normed = &mut s.normed[..n_logits * h]; // (n_wanted, hidden)
        self.backend
            .rmsnorm(&s.last[..n_logits * h], &self.norm, c.rms_norm_eps, normed);
        let logits = &mut s.logits[..n_logits * c.vocab_size]; // (n_wanted, vocab)
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        self.backend.matmul(normed, head, logits);
        if let Some(lim) = self.vocab_limit {
            for r in logits.chunks_exact_mut(c.vocab_size) {
                r.iter_mut().skip(lim).for_each(|v| *v = f32::NEG_INFINITY);
            }
        }
        Ok(n_logits * c.vocab_size)
    }

    fn check(&self, seqs: &[SeqInput<'_>], kv: &KvCache) -> Result<(), ModelError> {
        let c = &self.cfg;
        let kc = kv.config();
        if kc.num_layers != c.num_layers
            || kc.kv_heads != c.num_kv_heads
            || kc.head_dim != c.head_dim
        {
            return Err(ModelError::Forward(format!(
                "KV cache shape {kc:?} does not fit the model"
            )));
        }
        for (i, q) in seqs.iter().enumerate() {
            if q.tokens.is_empty() {
                return Err(ModelError::Forward(format!("sequence {i}: no tokens")));
            }
            if let Some(&t) = q.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::Forward(format!(
                    "sequence {i}: token id {t} ≥ vocab {}",
                    c.vocab_size
                )));
            }
            let end = q.start_pos + q.tokens.len();
            if q.blocks.capacity(kc.block_size) < end {
                return Err(ModelError::Forward(format!(
                    "sequence {i}: block table holds {} positions, needs {end}",
                    q.blocks.capacity(kc.block_size)
                )));
            }
            if q.blocks
                .blocks()
                .iter()
                .any(|&b| b as usize >= kc.num_blocks)
            {
                return Err(ModelError::Forward(format!(
                    "sequence {i}: block id out of range"
                )));
            }
        }
        Ok(())
    }
}
