//! The host side of one device step, with no CUDA in it (so CI tests it): which row goes where,
//! what the step uploads, and whether it replays a CUDA graph; and, once at upload, whether the
//! kernels take the model's shapes ([`check_model`]).
//!
//! **Row order.** Rows of a step are independent once every new token's K/V is in the cache
//! (`rope_qkv_cache` writes them all before attention reads), so the device model orders rows
//! to suit the LM head instead of following the batch: first the sampling rows (the last token
//! of each sequence that samples) — those the GPU samples, then those the host samples — then
//! every other row. The final norm and the LM head run on the first `m` rows only; GPU-sampled
//! ids are rows `0..m_gpu` of the sampler's output and host-sampled logits are one contiguous
//! block, `m_gpu..m`, copied back in one go.
//!
//! **Metadata.** Everything a step needs besides weights and the cache is packed into one `u32`
//! array ([`MetaLayout`]) in pinned host memory and copied with one async `memcpy` on the
//! compute stream: token ids, positions, cache slots, each row's sequence, the block tables
//! (one row of `stride` ids per sequence) and the per-row sampling parameters (F32 as bits, the
//! seed as two words at an even offset so it reads as a `u64`).
//!
//! **Graphs.** A decode-only step (one new token per sequence, every one sampling) of at most
//! the largest [`BATCH_BUCKETS`] entry replays a CUDA graph keyed by (batch bucket, context
//! bucket): the batch is padded to its bucket (padding rows write to and read from a scratch
//! block no sequence owns), the table stride and the attention's split-KV shape follow the
//! context bucket (a power of two ≥ [`SPLIT_LEN`]), and the layout is a function of the key
//! alone, so every replay finds its inputs at the same device addresses. Other steps run eagerly
//! with a layout cut to their exact sizes.

use super::graph::{bucket, GraphKey, BATCH_BUCKETS};
use super::ops::{GEMV_MAX_ROWS, MAX_HEAD_DIM, SPLIT_LEN};
use super::CudaError;
use crate::model::config::ModelConfig;
use crate::model::transformer::{Logits, SeqInput};
use std::ops::Range;

/// Sampling the GPU does itself (`kernels/sampling.cu`): temperature, top-k, top-p and a seeded
/// Philox draw. Requests needing anything else are sampled on the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSampling {
    /// ≤ 0: greedy (argmax).
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1: off.
    pub top_p: f32,
    pub seed: u64,
    /// Philox counter: the number of tokens the sequence generated before this one, so the
    /// same seed gives the same tokens whatever else shares the batch.
    pub step: u32,
}

impl DeviceSampling {
    /// Greedy; also what host-sampled and padding rows get (their device result is unused).
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        step: 0,
    };
}

/// Offsets (in `u32` words) of each region of the step metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaLayout {
    /// Rows (tokens) of the step, padding included.
    pub n: usize,
    /// Sequences (block-table rows), padding included.
    pub seqs: usize,
    /// Block ids per table row.
    pub stride: usize,
    /// Rows that get logits and a device sample, padding included.
    pub m: usize,
    pub tokens: Range<usize>,
    pub positions: Range<usize>,
    pub slots: Range<usize>,
    pub tok_seq: Range<usize>,
    pub tables: Range<usize>,
    pub temperature: Range<usize>,
    pub top_k: Range<usize>,
    pub top_p: Range<usize>,
    pub step: Range<usize>,
    /// Two words per row, starting at an even word (8-byte aligned on the device).
    pub seed: Range<usize>,
    /// Words in all.
    pub len: usize,
}

impl MetaLayout {
    pub fn new(n: usize, seqs: usize, stride: usize, m: usize) -> Self {
        let mut at = 0;
        let mut take = |len: usize| {
            let r = at..at + len;
            at += len;
            r
        };
        let tokens = take(n);
        let positions = take(n);
        let slots = take(n);
        let tok_seq = take(n);
        let tables = take(seqs * stride);
        let temperature = take(m);
        let top_k = take(m);
        let top_p = take(m);
        let step = take(m);
        at += at % 2;
        let seed = at..at + 2 * m;
        let len = seed.end;
        Self {
            n,
            seqs,
            stride,
            m,
            tokens,
            positions,
            slots,
            tok_seq,
            tables,
            temperature,
            top_k,
            top_p,
            step,
            seed,
            len,
        }
    }
}

/// What the planner needs to know about the model and the device buffers.
#[derive(Debug, Clone, Copy)]
pub struct PlanConfig {
    pub vocab: usize,
    pub block_size: usize,
    /// Blocks the scheduler hands out; block `num_blocks` is the device's scratch block.
    pub num_blocks: usize,
    /// Row capacity of the activation workspaces.
    pub max_tokens: usize,
    /// Row capacity of the logits / sampling buffers.
    pub max_sample_rows: usize,
    /// Words of the metadata buffers.
    pub meta_words: usize,
    /// Replay decode steps as CUDA graphs.
    pub graphs: bool,
}

impl PlanConfig {
    /// The scratch block padding rows use.
    pub fn scratch_block(&self) -> u32 {
        self.num_blocks as u32
    }

    /// Metadata words enough for any step within the row capacities, sequences of up to
    /// `max_context` tokens and at most `max_seqs` sequences per step.
    pub fn meta_words_for(
        max_tokens: usize,
        max_seqs: usize,
        max_sample_rows: usize,
        max_context: usize,
        block_size: usize,
    ) -> usize {
        let stride = ctx_bucket(max_context).div_ceil(block_size.max(1));
        let graph_rows = BATCH_BUCKETS[BATCH_BUCKETS.len() - 1];
        let seqs = max_seqs.max(graph_rows);
        MetaLayout::new(
            max_tokens.max(graph_rows),
            seqs,
            stride,
            max_sample_rows.max(graph_rows),
        )
        .len
    }
}

/// Whether the kernels take `cfg`'s shapes, checked once when the model is uploaded so an
/// unsupported checkpoint is a start-up error naming the dimension, not a failure of every step.
/// `max_rows` is the most token rows a matmul sees (GEMV up to [`GEMV_MAX_ROWS`], else GEMM).
pub fn check_model(cfg: &ModelConfig, max_rows: usize) -> Result<(), CudaError> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let need = |ok: bool, what: String| if ok { Ok(()) } else { Err(bad(what)) };
    need(
        h > 0 && h.is_multiple_of(8),
        format!("hidden_size {h}: embedding needs % 8"),
    )?;
    // K of every matmul: the GEMV needs K % 8, the tensor-core GEMM K % 32.
    let k_align = if max_rows > GEMV_MAX_ROWS { 32 } else { 8 };
    for (what, k) in [
        ("hidden_size", h),
        ("num_heads·head_dim", cfg.num_heads * hd),
        ("intermediate_size", cfg.intermediate_size),
    ] {
        need(
            k > 0 && k.is_multiple_of(k_align),
            format!("{what} {k}: matmul needs K % {k_align}"),
        )?;
    }
    need(
        hd > 0 && hd <= MAX_HEAD_DIM && hd.is_multiple_of(8),
        format!("head_dim {hd}: attention needs % 8 and <= {MAX_HEAD_DIM}"),
    )?;
    need(
        cfg.num_kv_heads > 0
            && cfg.num_heads >= cfg.num_kv_heads
            && cfg.num_heads.is_multiple_of(cfg.num_kv_heads),
        format!("{} heads over {} kv heads", cfg.num_heads, cfg.num_kv_heads),
    )?;
    need(
        cfg.rotary_dim.is_multiple_of(2) && cfg.rotary_dim <= hd,
        format!("rotary_dim {} with head_dim {hd}", cfg.rotary_dim),
    )
}

/// The context bucket of a decode graph: the next power of two, at least [`SPLIT_LEN`].
pub fn ctx_bucket(max_context: usize) -> usize {
    max_context.max(SPLIT_LEN).next_power_of_two()
}

/// One planned step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    pub layout: MetaLayout,
    /// Every sequence brings one new token (the split-KV decode kernel); else prefill.
    pub decode: bool,
    /// Longest context the attention covers (the context bucket for graphs).
    pub max_context: usize,
    pub graph: Option<GraphKey>,
    /// Device rows `0..m_gpu` are sampled on the GPU, `m_gpu..m_real` on the host.
    pub m_gpu: usize,
    /// Sampling rows that belong to a request (the rest of `layout.m` is padding).
    pub m_real: usize,
    /// For each sampling sequence, in input order: its device row.
    pub sample_row: Vec<usize>,
}

fn bad(msg: String) -> CudaError {
    CudaError::Shape(msg)
}

/// Checks the batch, orders its rows and packs the metadata into `meta` (see the module doc).
/// `sampling` has one entry per sequence with `Logits::Last`, in order: `Some` when the GPU
/// samples it.
pub fn plan(
    seqs: &[SeqInput<'_>],
    sampling: &[Option<DeviceSampling>],
    cfg: &PlanConfig,
    meta: &mut [u32],
) -> Result<StepPlan, CudaError> {
    let bs = cfg.block_size.max(1);
    let mut n = 0;
    let mut max_context = 0;
    let mut max_blocks = 1;
    let mut samplers = Vec::new(); // input index of each sampling sequence
    for (i, q) in seqs.iter().enumerate() {
        if q.tokens.is_empty() {
            return Err(bad(format!("sequence {i}: no tokens")));
        }
        if let Some(&t) = q.tokens.iter().find(|&&t| t as usize >= cfg.vocab) {
            return Err(bad(format!(
                "sequence {i}: token id {t} ≥ vocab {}",
                cfg.vocab
            )));
        }
        let end = q.start_pos + q.tokens.len();
        let blocks = q.blocks.blocks();
        if blocks.len() * bs < end {
            return Err(bad(format!(
                "sequence {i}: block table holds {} positions, needs {end}",
                blocks.len() * bs
            )));
        }
        if blocks.iter().any(|&b| b as usize >= cfg.num_blocks) {
            return Err(bad(format!("sequence {i}: block id out of range")));
        }
        match q.logits {
            Logits::None => {}
            Logits::Last => samplers.push(i),
            Logits::All => {
                return Err(bad(format!(
                    "sequence {i}: the device model returns the last row's logits only"
                )))
            }
        }
        n += q.tokens.len();
        max_context = max_context.max(end);
        max_blocks = max_blocks.max(end.div_ceil(bs));
    }
    if sampling.len() != samplers.len() {
        return Err(bad(format!(
            "{} sampling entries for {} sampling sequences",
            sampling.len(),
            samplers.len()
        )));
    }
    let m_real = samplers.len();
    let decode = n == seqs.len();
    let graph_bucket = bucket(n).filter(|&b| {
        let all_sample = m_real == n;
        cfg.graphs
            && decode
            && all_sample
            && n > 0
            && b <= cfg.max_tokens
            && b <= cfg.max_sample_rows
    });
    let (layout, max_context, graph) = match graph_bucket {
        Some(b) => {
            let ctx = ctx_bucket(max_context);
            let key = GraphKey {
                batch_bucket: b,
                ctx_bucket: ctx,
            };
            (MetaLayout::new(b, b, ctx.div_ceil(bs), b), ctx, Some(key))
        }
        None => (
            MetaLayout::new(n, seqs.len(), max_blocks, m_real),
            max_context,
            None,
        ),
    };
    if layout.n > cfg.max_tokens || layout.m > cfg.max_sample_rows {
        return Err(bad(format!(
            "step of {} rows / {} sampled exceeds the workspaces ({} / {})",
            layout.n, layout.m, cfg.max_tokens, cfg.max_sample_rows
        )));
    }
    if layout.len > meta.len().min(cfg.meta_words) {
        return Err(bad(format!(
            "step metadata needs {} words, the buffers hold {}",
            layout.len,
            meta.len().min(cfg.meta_words)
        )));
    }

    // Sampling sequences in device-row order: GPU-sampled first, then host-sampled.
    let on_gpu = |k: &usize| sampling[*k].is_some();
    let order = (0..m_real)
        .filter(on_gpu)
        .chain((0..m_real).filter(|k| !on_gpu(k)));
    let m_gpu = (0..m_real).filter(on_gpu).count();
    let mut sample_row = vec![0; m_real];
    let mut row = 0;
    for k in order {
        let i = samplers[k];
        let q = &seqs[i];
        put_row(meta, &layout, row, q, i, q.tokens.len() - 1, cfg);
        put_sampling(
            meta,
            &layout,
            row,
            sampling[k].unwrap_or(DeviceSampling::GREEDY),
        );
        sample_row[k] = row;
        row += 1;
    }
    for (i, q) in seqs.iter().enumerate() {
        let skip_last = matches!(q.logits, Logits::Last);
        let count = q.tokens.len() - usize::from(skip_last);
        for t in 0..count {
            put_row(meta, &layout, row, q, i, t, cfg);
            row += 1;
        }
    }
    // Padding rows (graphs): token 0 at position 0 of the scratch block, own table row.
    let scratch = cfg.scratch_block();
    for r in row..layout.n {
        meta[layout.tokens.start + r] = 0;
        meta[layout.positions.start + r] = 0;
        meta[layout.slots.start + r] = scratch * bs as u32;
        meta[layout.tok_seq.start + r] = r as u32;
    }
    for r in m_real..layout.m {
        put_sampling(meta, &layout, r, DeviceSampling::GREEDY);
    }
    // Block tables: row `i` is sequence `i` (eager), or device row `i`'s sequence (graphs, where
    // every row is its own sequence); unused entries and padding rows point at the scratch block.
    meta[layout.tables.clone()].fill(scratch);
    let put_table = |meta: &mut [u32], dst: usize, blocks: &[u32]| {
        let at = layout.tables.start + dst * layout.stride;
        let len = blocks.len().min(layout.stride);
        meta[at..at + len].copy_from_slice(&blocks[..len]);
    };
    if graph.is_some() {
        for r in 0..row {
            let seq = meta[layout.tok_seq.start + r] as usize;
            put_table(meta, r, seqs[seq].blocks.blocks());
        }
        for r in 0..row {
            meta[layout.tok_seq.start + r] = r as u32;
        }
    } else {
        for (i, q) in seqs.iter().enumerate() {
            put_table(meta, i, q.blocks.blocks());
        }
    }
    Ok(StepPlan {
        layout,
        decode,
        max_context,
        graph,
        m_gpu,
        m_real,
        sample_row,
    })
}

/// Token `t` of sequence `i` at device row `row`.
fn put_row(
    meta: &mut [u32],
    l: &MetaLayout,
    row: usize,
    q: &SeqInput<'_>,
    i: usize,
    t: usize,
    cfg: &PlanConfig,
) {
    let bs = cfg.block_size.max(1);
    let pos = q.start_pos + t;
    // In range: plan() checked the table covers start_pos + len positions.
    let block = q.blocks.blocks()[pos / bs];
    meta[l.tokens.start + row] = q.tokens[t];
    meta[l.positions.start + row] = pos as u32;
    meta[l.slots.start + row] = block * bs as u32 + (pos % bs) as u32;
    meta[l.tok_seq.start + row] = i as u32;
}

fn put_sampling(meta: &mut [u32], l: &MetaLayout, row: usize, s: DeviceSampling) {
    meta[l.temperature.start + row] = s.temperature.to_bits();
    meta[l.top_k.start + row] = s.top_k;
    meta[l.top_p.start + row] = s.top_p.to_bits();
    meta[l.step.start + row] = s.step;
    meta[l.seed.start + 2 * row] = s.seed as u32;
    meta[l.seed.start + 2 * row + 1] = (s.seed >> 32) as u32;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv::{BlockAllocator, BlockTable};

    fn cfg() -> PlanConfig {
        PlanConfig {
            vocab: 100,
            block_size: 4,
            num_blocks: 32,
            max_tokens: 64,
            max_sample_rows: 16,
            meta_words: 1 << 16,
            graphs: true,
        }
    }

    fn table(alloc: &mut BlockAllocator, tokens: usize) -> BlockTable {
        let mut t = BlockTable::new();
        t.reserve(alloc, tokens, 4).unwrap();
        t
    }

    fn greedy_with_seed(seed: u64) -> Option<DeviceSampling> {
        Some(DeviceSampling {
            seed,
            step: seed as u32,
            ..DeviceSampling::GREEDY
        })
    }

    #[test]
    fn layout_regions_are_disjoint_and_the_seed_is_8_byte_aligned() {
        for (n, seqs, stride, m) in [(1, 1, 1, 1), (3, 2, 5, 1), (7, 3, 2, 3), (0, 0, 0, 0)] {
            let l = MetaLayout::new(n, seqs, stride, m);
            let regions = [
                &l.tokens,
                &l.positions,
                &l.slots,
                &l.tok_seq,
                &l.tables,
                &l.temperature,
                &l.top_k,
                &l.top_p,
                &l.step,
                &l.seed,
            ];
            for w in regions.windows(2) {
                assert!(w[0].end <= w[1].start, "{l:?}");
            }
            assert_eq!(l.seed.start % 2, 0);
            assert_eq!(l.seed.len(), 2 * m);
            assert_eq!(l.tables.len(), seqs * stride);
            assert_eq!(l.len, l.seed.end);
        }
    }

    #[test]
    fn mixed_step_puts_gpu_rows_then_host_rows_then_the_rest() {
        let mut a = BlockAllocator::new(32);
        let (t0, t1, t2) = (table(&mut a, 6), table(&mut a, 9), table(&mut a, 3));
        let prompt = [5u32, 6, 7];
        let seqs = [
            // decode token at position 5, sampled on the host
            SeqInput {
                tokens: &[9],
                start_pos: 5,
                blocks: &t0,
                logits: Logits::Last,
            },
            // prefill chunk that samples on the GPU
            SeqInput {
                tokens: &prompt,
                start_pos: 6,
                blocks: &t1,
                logits: Logits::Last,
            },
            // intermediate prefill chunk
            SeqInput {
                tokens: &prompt,
                start_pos: 0,
                blocks: &t2,
                logits: Logits::None,
            },
        ];
        let mut meta = vec![u32::MAX; 4096];
        let p = plan(&seqs, &[None, greedy_with_seed(7)], &cfg(), &mut meta).unwrap();
        assert!(!p.decode && p.graph.is_none());
        assert_eq!((p.m_gpu, p.m_real, p.layout.m, p.layout.n), (1, 2, 2, 7));
        assert_eq!(p.sample_row, vec![1, 0]);
        let l = &p.layout;
        let col = |r: &Range<usize>| meta[r.clone()].to_vec();
        // rows: seq1 last, seq0 last, seq1 first two, seq2 all three
        assert_eq!(col(&l.tokens), vec![7, 9, 5, 6, 5, 6, 7]);
        assert_eq!(col(&l.positions), vec![8, 5, 6, 7, 0, 1, 2]);
        assert_eq!(col(&l.tok_seq), vec![1, 0, 1, 1, 2, 2, 2]);
        let slot = |t: &BlockTable, pos: usize| t.blocks()[pos / 4] * 4 + (pos % 4) as u32;
        assert_eq!(meta[l.slots.start], slot(&t1, 8));
        assert_eq!(meta[l.slots.start + 1], slot(&t0, 5));
        assert_eq!(meta[l.slots.start + 6], slot(&t2, 2));
        // tables: one row per sequence, stride = most blocks (3), unused entries scratch
        assert_eq!(l.stride, 3);
        let row = |s: usize| meta[l.tables.start + s * 3..][..3].to_vec();
        assert_eq!(row(0), vec![t0.blocks()[0], t0.blocks()[1], 32]);
        assert_eq!(row(1), t1.blocks().to_vec());
        assert_eq!(row(2), vec![t2.blocks()[0], 32, 32]);
        // sampling: GPU row carries the seed, the host row is greedy
        assert_eq!(meta[l.seed.start], 7);
        assert_eq!(meta[l.step.start], 7);
        assert_eq!(f32::from_bits(meta[l.temperature.start + 1]), 0.0);
    }

    #[test]
    fn decode_steps_pad_to_the_bucket_and_key_on_the_context_bucket() {
        let mut a = BlockAllocator::new(32);
        let tables: Vec<BlockTable> = (0..3).map(|i| table(&mut a, 10 + i)).collect();
        let seqs: Vec<SeqInput<'_>> = tables
            .iter()
            .enumerate()
            .map(|(i, t)| SeqInput {
                tokens: &[3],
                start_pos: 9 + i,
                blocks: t,
                logits: Logits::Last,
            })
            .collect();
        let mut meta = vec![u32::MAX; 4096];
        let s = [greedy_with_seed(1), None, greedy_with_seed(u64::MAX)];
        let p = plan(&seqs, &s, &cfg(), &mut meta).unwrap();
        assert!(p.decode);
        assert_eq!(
            p.graph,
            Some(GraphKey {
                batch_bucket: 4,
                ctx_bucket: 512
            })
        );
        assert_eq!(p.max_context, 512);
        let l = &p.layout;
        assert_eq!((l.n, l.seqs, l.m, l.stride), (4, 4, 4, 128));
        // The layout depends on the key only: another batch of the same key gets the same one.
        assert_eq!(*l, MetaLayout::new(4, 4, 128, 4));
        assert_eq!(p.sample_row, vec![0, 2, 1]);
        assert_eq!(meta[l.tok_seq.clone()].to_vec(), vec![0, 1, 2, 3]);
        // The padding row writes to the scratch block and reads a scratch-only table.
        assert_eq!(meta[l.slots.start + 3], 32 * 4);
        assert!(meta[l.tables.start + 3 * 128..][..128]
            .iter()
            .all(|&b| b == 32));
        // Row 1 is sequence 2 (GPU-sampled), its table is in row 1.
        assert_eq!(meta[l.tables.start + 128], tables[2].blocks()[0]);
        assert_eq!(meta[l.seed.start + 2], u32::MAX);
        assert_eq!(meta[l.seed.start + 3], u32::MAX);
        // Without graphs the same batch runs eagerly with exact sizes.
        let eager = PlanConfig {
            graphs: false,
            ..cfg()
        };
        let p = plan(&seqs, &s, &eager, &mut meta).unwrap();
        assert_eq!(p.graph, None);
        assert_eq!((p.layout.n, p.layout.stride, p.max_context), (3, 3, 12));
    }

    #[test]
    fn context_buckets_are_powers_of_two_from_the_split_length() {
        assert_eq!(ctx_bucket(1), SPLIT_LEN);
        assert_eq!(ctx_bucket(SPLIT_LEN), SPLIT_LEN);
        assert_eq!(ctx_bucket(SPLIT_LEN + 1), 2 * SPLIT_LEN);
        assert_eq!(ctx_bucket(100_000), 131_072);
    }

    #[test]
    fn bad_batches_are_errors_not_panics() {
        let mut a = BlockAllocator::new(32);
        let t = table(&mut a, 4);
        let mut meta = vec![0; 4096];
        let one = |tokens: &'static [u32], start_pos, logits| SeqInput {
            tokens,
            start_pos,
            blocks: &t,
            logits,
        };
        let c = cfg();
        // token out of vocabulary, table too short, logits of every row, missing sampling entry
        assert!(plan(&[one(&[100], 0, Logits::Last)], &[None], &c, &mut meta).is_err());
        assert!(plan(&[one(&[1], 4, Logits::Last)], &[None], &c, &mut meta).is_err());
        assert!(plan(&[one(&[1], 0, Logits::All)], &[], &c, &mut meta).is_err());
        assert!(plan(&[one(&[1], 0, Logits::Last)], &[], &c, &mut meta).is_err());
        assert!(plan(&[one(&[], 0, Logits::None)], &[], &c, &mut meta).is_err());
        // metadata buffer too small
        assert!(plan(&[one(&[1], 0, Logits::Last)], &[None], &c, &mut meta[..3]).is_err());
        // more rows than the workspaces hold
        let small = PlanConfig { max_tokens: 2, ..c };
        assert!(plan(
            &[one(&[1, 2, 3], 0, Logits::Last)],
            &[None],
            &small,
            &mut meta
        )
        .is_err());
    }

    #[test]
    fn every_reference_checkpoint_and_synthetic_shape_fits_the_kernels() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
        let mut seen = 0;
        for e in std::fs::read_dir(root).unwrap().flatten() {
            let f = e.path().join("config.json");
            if f.is_file() {
                let c = ModelConfig::from_file(&f).unwrap();
                check_model(&c, 512).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                seen += 1;
            }
        }
        assert!(seen >= 10, "{seen} fixtures");
        for s in [
            "tiny",
            "qwen2.5-0.5b",
            "llama3.2-1b",
            "qwen2-7b",
            "phi3-mini",
        ] {
            let c = crate::model::synthetic::shape_config(s).unwrap();
            check_model(&c, 512).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    #[test]
    fn unsupported_shapes_are_start_up_errors() {
        let base = crate::model::synthetic::shape_config("tiny").unwrap();
        let bad = [
            ModelConfig {
                hidden_size: 60,
                ..base.clone()
            },
            ModelConfig {
                intermediate_size: 104, // % 8 but not % 32: fine for the GEMV only
                ..base.clone()
            },
            ModelConfig {
                head_dim: 12,
                ..base.clone()
            },
            ModelConfig {
                head_dim: 512,
                ..base.clone()
            },
            ModelConfig {
                num_kv_heads: 3,
                ..base.clone()
            },
            ModelConfig {
                rotary_dim: 2 * base.head_dim,
                ..base.clone()
            },
        ];
        for c in &bad {
            assert!(check_model(c, 512).is_err(), "{c:?}");
        }
        // Decode-only shapes (at most GEMV_MAX_ROWS rows) need K % 8 only.
        assert!(check_model(&bad[1], GEMV_MAX_ROWS).is_ok());
    }

    #[test]
    fn meta_capacity_covers_the_largest_graph_and_eager_steps() {
        let words = PlanConfig::meta_words_for(512, 256, 256, 4096, 16);
        assert!(words >= MetaLayout::new(256, 256, 4096 / 16, 256).len);
        assert!(words >= MetaLayout::new(512, 256, 4096 / 16, 256).len);
    }
}
