//! [`DeviceModel`]: the transformer resident on the GPU, the serving path of `--device cuda`.
//!
//! Built once from a loaded [`Transformer`] (same checkpoint names, same synthetic weights):
//! matrices are uploaded as row-major F16 `(out, in)` (the layout `gemv.cu` / `gemm.cu` read),
//! norm weights, biases and RoPE frequencies as F32; the paged KV cache is one K and one V
//! buffer per layer in `engine::kv`'s `(num_blocks, kv_heads, block_size, head_dim)` layout with
//! the scheduler's block ids, plus one scratch block for graph padding rows. Activation
//! workspaces are allocated for the largest step (`max_num_batched_tokens` rows) and cut to each
//! step's row count with views, so nothing is allocated per step.
//!
//! A step ([`DeviceModel::forward`]): plan the rows and pack the metadata into pinned host memory
//! (`plan.rs`), one async copy, then the layer chain on the compute stream —
//! embedding → per layer rmsnorm(+residual) → qkv matmul(+bias) → rope + KV write → attention
//! (split-KV decode kernel, or the causal prefill kernel when any sequence brings several tokens)
//! → o matmul(+bias) → rmsnorm(+residual) → gate_up matmul → swiglu → down matmul; then the final
//! norm and the LM head on the sampling rows only, the vocabulary mask, and `sample_rows` — and
//! back come 4 bytes per GPU-sampled row plus the logits rows the host must sample. Decode steps
//! replay a CUDA graph per (batch bucket, context bucket) (`graph.rs`).
//!
//! Every call returns `Result<_, CudaError>`; after an error the stream is drained so the pinned
//! buffers are free again, and the caller ends the step's sequences.

use super::graph::DecodeGraphs;
use super::ops::{CudaOps, DevAttn};
use super::plan::{self, DeviceSampling, MetaLayout, PlanConfig};
use super::CudaError;
use crate::backend::Weight;
use crate::model::config::ModelConfig;
use crate::model::transformer::{SeqInput, Transformer};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, PinnedHostSlice};
use half::f16;
use std::ops::Range;

/// What the engine decides about the device model (from `EngineConfig` and the KV budget).
#[derive(Debug, Clone, Copy)]
pub struct DeviceConfig {
    pub ordinal: usize,
    /// KV blocks the scheduler hands out.
    pub num_blocks: usize,
    pub block_size: usize,
    /// Token rows per step (`max_num_batched_tokens`).
    pub max_tokens: usize,
    /// Sequences per step (`max_running`).
    pub max_seqs: usize,
    /// Longest sequence (sizes the block-table rows).
    pub max_model_len: usize,
    /// Replay decode steps as CUDA graphs (off: every step eager, for comparisons).
    pub graphs: bool,
}

/// One sampled row of a step, in the order the sequences were given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowOut<'a> {
    /// The token the GPU drew.
    Token(u32),
    /// The row's logits (vocab,), for the host sampler.
    Logits(&'a [f32]),
}

/// Where each sampling sequence's result is.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Token(u32),
    /// Row of `host_logits`.
    Host(usize),
}

/// The result of the last step.
#[derive(Default)]
pub struct DeviceOutput {
    slots: Vec<Slot>,
    /// (host-sampled rows, vocab)
    host_logits: Vec<f32>,
    vocab: usize,
}

impl DeviceOutput {
    /// Sampling sequence `i`'s result; `None` past the last.
    pub fn row(&self, i: usize) -> Option<RowOut<'_>> {
        match *self.slots.get(i)? {
            Slot::Token(t) => Some(RowOut::Token(t)),
            Slot::Host(r) => self
                .host_logits
                .get(r * self.vocab..(r + 1) * self.vocab)
                .map(RowOut::Logits),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

struct Layer {
    /// (hidden,)
    input_norm: CudaSlice<f32>,
    /// (qkv_dim, hidden)
    qkv: CudaSlice<f16>,
    /// (qkv_dim,)
    qkv_bias: Option<CudaSlice<f32>>,
    /// (hidden, heads·head_dim)
    o_proj: CudaSlice<f16>,
    /// (hidden,)
    o_bias: Option<CudaSlice<f32>>,
    /// (hidden,)
    post_norm: CudaSlice<f32>,
    /// (2·inter, hidden)
    gate_up: CudaSlice<f16>,
    /// (hidden, inter)
    down: CudaSlice<f16>,
}

struct Weights {
    /// (vocab, hidden)
    embed: CudaSlice<f16>,
    layers: Vec<Layer>,
    /// (hidden,)
    norm: CudaSlice<f32>,
    /// (vocab, hidden); None when tied to `embed`.
    lm_head: Option<CudaSlice<f16>>,
    /// (rotary_dim / 2,)
    inv_freq: CudaSlice<f32>,
    rotary_dim: usize,
    rope_scaling: f32,
    vocab_limit: Option<usize>,
}

/// One layer's cache, (num_blocks + 1, kv_heads, block_size, head_dim) each; the last block is
/// the scratch block of graph padding rows.
struct LayerCache {
    k: CudaSlice<f16>,
    v: CudaSlice<f16>,
}

/// Activation workspaces for `max_tokens` rows (`max_sample_rows` for logits).
struct Work {
    /// (rows, hidden) the F32 residual stream
    resid: CudaSlice<f32>,
    /// (rows, max(hidden, inter)) F16 matmul inputs: normed activations, swiglu output
    xh: CudaSlice<f16>,
    /// (rows, qkv_dim)
    qkv: CudaSlice<f32>,
    /// (rows, heads·head_dim)
    q: CudaSlice<f16>,
    /// (rows, heads·head_dim)
    attn: CudaSlice<f16>,
    /// (rows, hidden) attention / MLP output before the residual add
    branch: CudaSlice<f32>,
    /// (rows, 2·inter)
    gate_up: CudaSlice<f32>,
    /// (sample rows, vocab)
    logits: CudaSlice<f32>,
    /// (sample rows,)
    sampled: CudaSlice<u32>,
}

/// The launch-relevant part of a plan (a graph replays the shapes it was captured with).
struct Launch {
    layout: MetaLayout,
    decode: bool,
    max_context: usize,
    block_size: usize,
}

pub struct DeviceModel {
    cfg: ModelConfig,
    ops: CudaOps,
    w: Weights,
    kv: Vec<LayerCache>,
    work: Work,
    /// Step metadata on the device; regions at the offsets of the step's `MetaLayout`.
    meta_dev: CudaSlice<u32>,
    /// Its pinned host twin, written by the planner. Free to write whenever the stream is idle,
    /// which every `forward` guarantees on return (success or error).
    meta_host: PinnedHostSlice<u32>,
    /// GPU-sampled token ids, read back (pinned, not write-combined: the host reads it).
    ids_host: PinnedHostSlice<u32>,
    plan_cfg: PlanConfig,
    graphs: DecodeGraphs,
    out: DeviceOutput,
}

fn upload_matrix(ops: &CudaOps, w: &Weight) -> Result<CudaSlice<f16>, CudaError> {
    Ok(ops.stream.clone_htod(&w.to_row_major())?)
}

fn upload_vec(ops: &CudaOps, v: &[f32]) -> Result<CudaSlice<f32>, CudaError> {
    Ok(ops.stream.clone_htod(v)?)
}

fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    ops: &CudaOps,
    n: usize,
) -> Result<CudaSlice<T>, CudaError> {
    Ok(ops.stream.alloc_zeros::<T>(n.max(1))?)
}

/// The first `len` elements of a workspace.
fn head<T>(s: &CudaSlice<T>, len: usize) -> Result<CudaView<'_, T>, CudaError> {
    s.try_slice(0..len)
        .ok_or_else(|| CudaError::Shape(format!("workspace of {} < {len}", s.len())))
}

fn head_mut<T>(s: &mut CudaSlice<T>, len: usize) -> Result<CudaViewMut<'_, T>, CudaError> {
    let have = s.len();
    s.try_slice_mut(0..len)
        .ok_or_else(|| CudaError::Shape(format!("workspace of {have} < {len}")))
}

/// A region of the metadata as `u32`.
fn words<'a>(meta: &'a CudaSlice<u32>, r: &Range<usize>) -> Result<CudaView<'a, u32>, CudaError> {
    meta.try_slice(r.clone())
        .ok_or_else(|| CudaError::Shape(format!("metadata region {r:?} past the buffer")))
}

/// A region of the metadata as F32 (the planner stores F32 as bits).
fn words_f32<'a>(
    meta: &'a CudaSlice<u32>,
    r: &Range<usize>,
) -> Result<CudaView<'a, f32>, CudaError> {
    let v = words(meta, r)?;
    // SAFETY: f32 and u32 have the same size and alignment and every bit pattern is a valid f32.
    unsafe { v.transmute::<f32>(r.len()) }
        .ok_or_else(|| CudaError::Shape("metadata f32 view".into()))
}

/// The seed region as `u64` (two words per row, starting at an even word).
fn words_u64<'a>(
    meta: &'a CudaSlice<u32>,
    r: &Range<usize>,
) -> Result<CudaView<'a, u64>, CudaError> {
    let v = words(meta, r)?;
    // SAFETY: the region starts at an even word of a cuMemAlloc'd buffer (256-byte aligned), so
    // it is 8-byte aligned; it holds r.len() / 2 little-endian u64 values written as word pairs.
    unsafe { v.transmute::<u64>(r.len() / 2) }
        .ok_or_else(|| CudaError::Shape("metadata u64 view".into()))
}

impl DeviceModel {
    /// Uploads `model` to device `dc.ordinal` and allocates the cache and workspaces.
    pub fn new(model: &Transformer, dc: &DeviceConfig) -> Result<Self, CudaError> {
        let cfg = model.config().clone();
        let max_sample_rows = super::graph::bucket(dc.max_seqs).unwrap_or(dc.max_seqs);
        let rows = dc.max_tokens.max(max_sample_rows);
        plan::check_model(&cfg, rows)?;
        let ops = CudaOps::new(dc.ordinal)?;
        let layers = model
            .layer_weights()
            .map(|l| {
                Ok(Layer {
                    input_norm: upload_vec(&ops, l.input_layernorm)?,
                    qkv: upload_matrix(&ops, l.qkv)?,
                    qkv_bias: l.qkv_bias.map(|b| upload_vec(&ops, b)).transpose()?,
                    o_proj: upload_matrix(&ops, l.o_proj)?,
                    o_bias: l.o_bias.map(|b| upload_vec(&ops, b)).transpose()?,
                    post_norm: upload_vec(&ops, l.post_attention_layernorm)?,
                    gate_up: upload_matrix(&ops, l.gate_up)?,
                    down: upload_matrix(&ops, l.down)?,
                })
            })
            .collect::<Result<Vec<_>, CudaError>>()?;
        let rope = model.rope();
        let w = Weights {
            embed: upload_matrix(&ops, model.embed_tokens())?,
            layers,
            norm: upload_vec(&ops, model.final_norm())?,
            lm_head: if model.tied_lm_head() {
                None
            } else {
                Some(upload_matrix(&ops, model.lm_head())?)
            },
            inv_freq: upload_vec(&ops, &rope.inv_freq)?,
            rotary_dim: rope.rotary_dim,
            rope_scaling: rope.attention_scaling,
            vocab_limit: model.vocab_limit(),
        };
        let bs = dc.block_size.max(1);
        let per_layer = (dc.num_blocks + 1) * cfg.num_kv_heads * bs * cfg.head_dim;
        let kv = (0..cfg.num_layers)
            .map(|_| {
                Ok(LayerCache {
                    k: zeros(&ops, per_layer)?,
                    v: zeros(&ops, per_layer)?,
                })
            })
            .collect::<Result<Vec<_>, CudaError>>()?;
        let (h, qd, inter) = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        let work = Work {
            resid: zeros(&ops, rows * h)?,
            xh: zeros(&ops, rows * h.max(inter))?,
            qkv: zeros(&ops, rows * cfg.qkv_dim())?,
            q: zeros(&ops, rows * qd)?,
            attn: zeros(&ops, rows * qd)?,
            branch: zeros(&ops, rows * h)?,
            gate_up: zeros(&ops, rows * 2 * inter)?,
            logits: zeros(&ops, max_sample_rows * cfg.vocab_size)?,
            sampled: zeros(&ops, max_sample_rows)?,
        };
        let meta_words =
            PlanConfig::meta_words_for(rows, dc.max_seqs, max_sample_rows, dc.max_model_len, bs);
        let meta_dev = zeros(&ops, meta_words)?;
        // SAFETY (both): the contents are unset until written; the planner writes every word a
        // step copies, and ids_host is read only after a copy into it completed.
        // Plain pinned memory, not write-combined: the planner reads back what it wrote.
        let meta_host = unsafe { ops.ctx.alloc_pinned_with_flags::<u32>(meta_words, 0) }?;
        let ids_host = unsafe { ops.ctx.alloc_pinned_with_flags::<u32>(max_sample_rows, 0) }?;
        ops.stream.synchronize()?;
        let plan_cfg = PlanConfig {
            vocab: cfg.vocab_size,
            block_size: bs,
            num_blocks: dc.num_blocks,
            max_tokens: rows,
            max_sample_rows,
            meta_words,
            graphs: dc.graphs,
        };
        Ok(Self {
            out: DeviceOutput {
                vocab: cfg.vocab_size,
                ..Default::default()
            },
            cfg,
            ops,
            w,
            kv,
            work,
            meta_dev,
            meta_host,
            ids_host,
            plan_cfg,
            graphs: DecodeGraphs::default(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes of weights one decode step streams (every layer matrix and the LM head).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .w
            .layers
            .iter()
            .map(|l| l.qkv.len() + l.o_proj.len() + l.gate_up.len() + l.down.len())
            .sum();
        2 * (layers + self.cfg.vocab_size * self.cfg.hidden_size)
    }

    /// Decode graphs captured so far.
    pub fn graphs_captured(&self) -> usize {
        self.graphs.len()
    }

    /// One batched step (see the module doc). `sampling` has one entry per sequence with
    /// `Logits::Last`, in order: `Some` when the GPU samples it. The result's row `i` belongs to
    /// the `i`-th sampling sequence.
    pub fn forward(
        &mut self,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSampling>],
    ) -> Result<&DeviceOutput, CudaError> {
        let r = self.step(seqs, sampling);
        if r.is_err() {
            // Drain whatever was queued before the error, so the pinned buffers are free again.
            let _ = self.ops.stream.synchronize();
        }
        r?;
        Ok(&self.out)
    }

    fn step(
        &mut self,
        seqs: &[SeqInput<'_>],
        sampling: &[Option<DeviceSampling>],
    ) -> Result<(), CudaError> {
        self.out.slots.clear();
        let p = plan::plan(
            seqs,
            sampling,
            &self.plan_cfg,
            self.meta_host.as_mut_slice()?,
        )?;
        let words = p.layout.len;
        // The stream is idle (see `meta_host`), so the host copy may be read by an async DMA
        // that finishes before the end-of-step synchronize; nothing writes it before then.
        let src = self
            .meta_host
            .as_slice()?
            .get(..words)
            .ok_or_else(|| CudaError::Shape("pinned metadata".into()))?;
        let mut dst = head_mut(&mut self.meta_dev, words)?;
        self.ops.stream.memcpy_htod(src, &mut dst)?;
        let launch = Launch {
            layout: p.layout.clone(),
            decode: p.decode,
            max_context: p.max_context,
            block_size: self.plan_cfg.block_size,
        };
        let (w, work, kv, meta, cfg) = (
            &self.w,
            &mut self.work,
            &mut self.kv,
            &self.meta_dev,
            &self.cfg,
        );
        match p.graph {
            Some(key) => self.graphs.run(&mut self.ops, key, |ops| {
                run_chain(ops, w, work, kv, meta, &launch, cfg)
            })?,
            None => run_chain(&mut self.ops, w, work, kv, meta, &launch, cfg)?,
        }
        let vocab = self.cfg.vocab_size;
        let ids = self.ids_host.as_mut_slice()?;
        let ids = ids
            .get_mut(..p.m_gpu)
            .ok_or_else(|| CudaError::Shape("pinned ids".into()))?;
        if p.m_gpu > 0 {
            self.ops
                .stream
                .memcpy_dtoh(&head(&self.work.sampled, p.m_gpu)?, ids)?;
        }
        let host_rows = p.m_real - p.m_gpu;
        self.out.host_logits.resize(host_rows * vocab, 0.0);
        if host_rows > 0 {
            let rows = self
                .work
                .logits
                .try_slice(p.m_gpu * vocab..p.m_real * vocab)
                .ok_or_else(|| CudaError::Shape("logits rows".into()))?;
            self.ops
                .stream
                .memcpy_dtoh(&rows, &mut self.out.host_logits[..])?;
        }
        self.ops.stream.synchronize()?;
        let ids = self.ids_host.as_slice()?;
        for &row in &p.sample_row {
            let slot = match row.checked_sub(p.m_gpu) {
                Some(host_row) => Slot::Host(host_row),
                None => Slot::Token(
                    *ids.get(row)
                        .ok_or_else(|| CudaError::Shape(format!("sampled row {row}")))?,
                ),
            };
            self.out.slots.push(slot);
        }
        Ok(())
    }
}

/// The layer chain of one step on `launch.layout.n` rows (see the module doc).
fn run_chain(
    ops: &mut CudaOps,
    w: &Weights,
    work: &mut Work,
    kv: &mut [LayerCache],
    meta: &CudaSlice<u32>,
    launch: &Launch,
    c: &ModelConfig,
) -> Result<(), CudaError> {
    let l = &launch.layout;
    let (n, m) = (l.n, l.m);
    let (h, inter, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (qd, qkvd) = (c.num_heads * c.head_dim, c.qkv_dim());
    let eps = c.rms_norm_eps;
    let a = DevAttn {
        heads: c.num_heads,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        block_size: launch.block_size,
        max_blocks: l.stride,
        max_context: launch.max_context,
        window: c.sliding_window.unwrap_or(0),
        scale: 1.0 / (c.head_dim as f32).sqrt(),
    };
    let tokens = words(meta, &l.tokens)?;
    let positions = words(meta, &l.positions)?;
    let slots = words(meta, &l.slots)?;
    let tok_seq = words(meta, &l.tok_seq)?;
    let tables = words(meta, &l.tables)?;
    ops.embedding(
        &tokens,
        &w.embed,
        vocab,
        h,
        &mut head_mut(&mut work.resid, n * h)?,
    )?;
    for (i, (lw, cache)) in w.layers.iter().zip(kv.iter_mut()).enumerate() {
        {
            let branch = head(&work.branch, n * h)?;
            let add: Option<&dyn DevicePtr<f32>> = if i == 0 { None } else { Some(&branch) };
            let mut resid = head_mut(&mut work.resid, n * h)?;
            let mut xh = head_mut(&mut work.xh, n * h)?;
            ops.rmsnorm_residual(&mut resid, add, &lw.input_norm, eps, &mut xh)?;
        }
        let qkv_bias = lw.qkv_bias.as_ref().map(|b| b as &dyn DevicePtr<f32>);
        let mut qkv = head_mut(&mut work.qkv, n * qkvd)?;
        ops.matmul(
            &head(&work.xh, n * h)?,
            n,
            &lw.qkv,
            qkvd,
            h,
            qkv_bias,
            &mut qkv,
        )?;
        ops.rope_qkv_cache(
            &head(&work.qkv, n * qkvd)?,
            None,
            &positions,
            &slots,
            &w.inv_freq,
            &mut head_mut(&mut work.q, n * qd)?,
            &mut cache.k,
            &mut cache.v,
            &a,
            w.rotary_dim,
            w.rope_scaling,
        )?;
        ops.attention(
            &head(&work.q, n * qd)?,
            &cache.k,
            &cache.v,
            &tables,
            &tok_seq,
            &positions,
            &a,
            launch.decode,
            &mut head_mut(&mut work.attn, n * qd)?,
        )?;
        let o_bias = lw.o_bias.as_ref().map(|b| b as &dyn DevicePtr<f32>);
        let mut branch = head_mut(&mut work.branch, n * h)?;
        ops.matmul(
            &head(&work.attn, n * qd)?,
            n,
            &lw.o_proj,
            h,
            qd,
            o_bias,
            &mut branch,
        )?;
        {
            let branch = head(&work.branch, n * h)?;
            let mut resid = head_mut(&mut work.resid, n * h)?;
            let mut xh = head_mut(&mut work.xh, n * h)?;
            ops.rmsnorm_residual(&mut resid, Some(&branch), &lw.post_norm, eps, &mut xh)?;
        }
        let mut gu = head_mut(&mut work.gate_up, n * 2 * inter)?;
        ops.matmul(
            &head(&work.xh, n * h)?,
            n,
            &lw.gate_up,
            2 * inter,
            h,
            None,
            &mut gu,
        )?;
        let mut act = head_mut(&mut work.xh, n * inter)?;
        ops.swiglu(&head(&work.gate_up, n * 2 * inter)?, inter, &mut act)?;
        let mut branch = head_mut(&mut work.branch, n * h)?;
        ops.matmul(
            &head(&work.xh, n * inter)?,
            n,
            &lw.down,
            h,
            inter,
            None,
            &mut branch,
        )?;
    }
    if m == 0 {
        return Ok(());
    }
    // Final norm and LM head on the sampling rows (the first m), then mask and sample.
    {
        let branch = head(&work.branch, m * h)?;
        let add: Option<&dyn DevicePtr<f32>> = if w.layers.is_empty() {
            None
        } else {
            Some(&branch)
        };
        let mut resid = head_mut(&mut work.resid, m * h)?;
        let mut xh = head_mut(&mut work.xh, m * h)?;
        ops.rmsnorm_residual(&mut resid, add, &w.norm, eps, &mut xh)?;
    }
    let lm_head = w.lm_head.as_ref().unwrap_or(&w.embed);
    let mut logits = head_mut(&mut work.logits, m * vocab)?;
    ops.matmul(
        &head(&work.xh, m * h)?,
        m,
        lm_head,
        vocab,
        h,
        None,
        &mut logits,
    )?;
    if let Some(limit) = w.vocab_limit {
        ops.fill_cols(&mut logits, vocab, limit, f32::NEG_INFINITY)?;
    }
    ops.sample(
        &head(&work.logits, m * vocab)?,
        vocab,
        &words_f32(meta, &l.temperature)?,
        &words(meta, &l.top_k)?,
        &words_f32(meta, &l.top_p)?,
        &words_u64(meta, &l.seed)?,
        &words(meta, &l.step)?,
        &mut head_mut(&mut work.sampled, m)?,
    )
}
