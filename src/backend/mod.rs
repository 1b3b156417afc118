//! The compute ops the transformer is written in, behind one trait so that the CPU reference
//! ([`cpu::CpuBackend`]) and the CUDA backend implement the same contract and are tested against
//! each other with one test body.
//!
//! Conventions: activations are F32, row-major, one row per token; weight matrices are F16 or
//! quantized (GGUF Q8_0 / Q4_0 / Q4_1, see [`quant`]), `(out, in)` as in the checkpoint (`y = x · Wᵀ`); the KV cache is F16 in the layout documented in
//! [`crate::engine::kv`]. Ops never allocate on the hot path; callers pass output buffers.

pub mod cpu;
pub mod cuda;
pub mod quant;

use half::f16;

/// Rows per panel of [`Weight`]'s storage.
pub const PANEL: usize = 16;

/// An `(rows, cols)` weight matrix: `rows` outputs, each a dot product over `cols` inputs.
///
/// F16 matrices are stored panel-major for the matmul kernels: rows are grouped in panels of
/// [`PANEL`] (the last one zero-padded) and a panel is stored column by column, so element (r, k)
/// sits at `((r / 16) · cols + k) · 16 + r % 16`. One 32-byte load gives column k of 16 output
/// rows, which the kernel multiplies by a broadcast activation: no horizontal sums, and the output
/// of a panel is 16 contiguous floats. Quantized matrices (GGUF Q8_0 / Q4_0 / Q4_1) stay
/// quantized, in the layout of [`quant`]. [`Weight::to_row_major`] and [`Weight::row_f32`] give
/// the checkpoint's `(rows, cols)` view of either.
#[derive(Debug, Clone)]
pub struct Weight {
    pub rows: usize,
    pub cols: usize,
    store: Store,
}

/// A borrowed view of a [`Weight`]'s storage, for the kernels.
#[derive(Debug, Clone, Copy)]
pub enum WeightData<'a> {
    /// (rows.div_ceil(16), cols, 16)
    F16(&'a [f16]),
    Quant(&'a quant::QuantMatrix),
}

#[derive(Debug, Clone)]
enum Store {
    /// (rows.div_ceil(16), cols, 16)
    F16(Vec<f16>),
    Quant(quant::QuantMatrix),
}

impl Weight {
    /// Packs a row-major `(rows, cols)` matrix.
    pub fn new(rows: usize, cols: usize, row_major: Vec<f16>) -> Self {
        assert_eq!(
            row_major.len(),
            rows * cols,
            "Weight::new: data is not rows × cols"
        );
        let panels = rows.div_ceil(PANEL);
        let mut data = vec![f16::ZERO; panels * cols * PANEL];
        for (p, panel) in data.chunks_exact_mut(cols * PANEL).enumerate() {
            for i in 0..PANEL.min(rows - p * PANEL) {
                let src = &row_major[(p * PANEL + i) * cols..][..cols];
                for (k, v) in src.iter().enumerate() {
                    panel[k * PANEL + i] = *v;
                }
            }
        }
        Self {
            rows,
            cols,
            store: Store::F16(data),
        }
    }

    /// A quantized matrix (kept quantized; see [`quant`]).
    pub fn quantized(m: quant::QuantMatrix) -> Self {
        Self {
            rows: m.rows,
            cols: m.cols,
            store: Store::Quant(m),
        }
    }

    /// The storage, for the kernels.
    pub fn data(&self) -> WeightData<'_> {
        match &self.store {
            Store::F16(d) => WeightData::F16(d),
            Store::Quant(m) => WeightData::Quant(m),
        }
    }

    /// Identifies the storage (address, bytes): a device backend's key for its uploaded copy,
    /// valid while the weight lives unmoved.
    pub fn storage_id(&self) -> (usize, usize) {
        match &self.store {
            Store::F16(d) => (d.as_ptr() as usize, d.len() * 2),
            Store::Quant(m) => (m.as_bytes().as_ptr() as usize, m.bytes()),
        }
    }

    /// The quantized storage; None for an F16 matrix.
    pub fn quant(&self) -> Option<&quant::QuantMatrix> {
        match &self.store {
            Store::Quant(m) => Some(m),
            Store::F16(_) => None,
        }
    }

    /// The storage format's name ("F16", "Q4_1", …).
    pub fn format(&self) -> &'static str {
        match &self.store {
            Store::F16(_) => "F16",
            Store::Quant(m) => m.kind.name(),
        }
    }

    /// Row `r` as F32 (embedding lookup). `out`: (cols,).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match &self.store {
            Store::F16(data) => {
                let base = (r / PANEL) * self.cols * PANEL + r % PANEL;
                for (k, o) in out.iter_mut().enumerate().take(self.cols) {
                    *o = data[base + k * PANEL].to_f32();
                }
            }
            Store::Quant(m) => m.row_f32(r, &mut out[..self.cols]),
        }
    }

    /// The `(rows, cols)` row-major matrix (a quantized one dequantized to F16).
    pub fn to_row_major(&self) -> Vec<f16> {
        let mut out = vec![f16::ZERO; self.rows * self.cols];
        match &self.store {
            Store::F16(data) => {
                for r in 0..self.rows {
                    let base = (r / PANEL) * self.cols * PANEL + r % PANEL;
                    for k in 0..self.cols {
                        out[r * self.cols + k] = data[base + k * PANEL];
                    }
                }
            }
            Store::Quant(m) => {
                let mut row = vec![0f32; self.cols];
                for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
                    m.row_f32(r, &mut row);
                    for (o, v) in o.iter_mut().zip(&row) {
                        *o = f16::from_f32(*v);
                    }
                }
            }
        }
        out
    }

    /// Stacks matrices with equal `cols` row-wise (q|k|v, gate|up fusion). Quantized parts of
    /// one format stay quantized; parts of mixed formats are dequantized to F16.
    pub fn concat_rows(parts: Vec<Weight>) -> Self {
        let cols = parts.first().map_or(0, |p| p.cols);
        let rows = parts.iter().map(|p| p.rows).sum();
        for p in &parts {
            assert_eq!(p.cols, cols, "concat_rows: column mismatch");
        }
        let kind = parts.first().and_then(|p| p.quant()).map(|m| m.kind);
        if let Some(kind) =
            kind.filter(|k| parts.iter().all(|p| p.quant().map(|m| m.kind) == Some(*k)))
        {
            let blocks: Vec<u8> = parts
                .iter()
                .filter_map(Weight::quant)
                .flat_map(|m| m.to_gguf())
                .collect();
            // The parts were valid matrices of this format with these cols, so their rows are.
            let m = quant::QuantMatrix::from_gguf(kind, rows, cols, &blocks)
                .unwrap_or_else(|e| panic!("concat_rows: {e}"));
            return Self::quantized(m);
        }
        let mut data = Vec::with_capacity(rows * cols);
        for p in parts {
            data.extend_from_slice(&p.to_row_major());
        }
        Self::new(rows, cols, data)
    }

    /// Bytes of weight data a matmul streams.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::F16(d) => d.len() * 2,
            Store::Quant(m) => m.bytes(),
        }
    }
}

/// Rotary embedding frequencies of one model (already scaled, e.g. llama3).
#[derive(Debug, Clone)]
pub struct RopeFreqs {
    /// (rotary_dim / 2,) angle per position for each rotated pair.
    pub inv_freq: Vec<f32>,
    /// Leading dims of each head that rotate; the rest pass through (Phi-3 partial rotary).
    pub rotary_dim: usize,
    /// Multiplier on cos/sin (1.0 for default and llama3 RoPE).
    pub attention_scaling: f32,
}

/// One sequence's slice of a batched attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    /// First row of this sequence's queries in the batch.
    pub row: usize,
    /// Number of query rows (new tokens) of this sequence.
    pub len: usize,
    /// Position of its first new token; keys `0..start_pos + len` are in the cache.
    pub start_pos: usize,
    /// Block ids in position order.
    pub blocks: &'a [u32],
}

/// Shape of an attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Softmax scale, normally 1/sqrt(head_dim).
    pub scale: f32,
    /// A query at position i sees keys j with i - j < window.
    pub sliding_window: Option<usize>,
}

/// The ops of one forward pass. `n` is the number of token rows in the batch.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    /// Runs `f`, one forward pass's ops, where they are cheapest to issue. The CPU backend runs
    /// it on one of its pool's threads, so every op's fork-join happens between pool threads
    /// (the others still spinning from the last op) instead of waking the pool from outside
    /// and sleeping until it is done, which costs two context switches per op.
    fn scope(&self, f: &mut (dyn FnMut() + Send)) {
        f()
    }

    /// y (n, w.rows) = x (n, w.cols) · wᵀ.
    fn matmul(&self, x: &[f32], w: &Weight, y: &mut [f32]);

    /// out (n, dim) = x / sqrt(mean(x²) + eps) · weight, per row; `weight`: (dim,).
    fn rmsnorm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]);

    /// Rotates each head of x (n, heads, head_dim) in place by its row's position
    /// (HF rotate_half convention: pairs (i, i + rotary_dim/2)).
    fn rope(
        &self,
        x: &mut [f32],
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        freqs: &RopeFreqs,
    );

    /// out (n, inter) = silu(gate) · up, with gate_up (n, 2·inter) holding [gate | up] per row.
    fn silu_mul(&self, gate_up: &[f32], inter: usize, out: &mut [f32]);

    /// Causal GQA attention over the paged cache of one layer.
    /// q: (n, num_heads, head_dim); k_cache, v_cache: (num_blocks, kv_heads, block_size, head_dim);
    /// out: (n, num_heads, head_dim).
    fn attention(
        &self,
        q: &[f32],
        k_cache: &[f16],
        v_cache: &[f16],
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut [f32],
    );
}
