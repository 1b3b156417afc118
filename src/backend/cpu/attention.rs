//! Causal GQA attention over the paged KV cache, one pass with an online softmax.
//!
//! One task per (sequence, KV head): it walks the sequence's blocks in order, converts each
//! block's `block_size × head_dim` K and V tiles to F32 once, and updates every query that reads
//! them — all new tokens of the sequence × the query heads of this KV head's group (scores as
//! per-key dot products when they are few, as in decode; over the K tile transposed when many). Per query it
//! keeps the running max `m`, normaliser `l` and weighted sum `acc` (flash-attention style), so
//! memory is O(queries × head_dim) whatever the context length. Tasks write disjoint output
//! elements (their own rows × their own heads).

use super::matmul::Isa;
use super::team::Team;
use crate::backend::{AttnSeq, AttnShape};
use half::f16;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only out[rows of its sequence][heads of its KV group], disjoint from
// every other task's elements; the pointer outlives the parallel scope.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

#[allow(clippy::too_many_arguments)]
pub fn attention(
    isa: Isa,
    team: &Team,
    q: &[f32],
    k_cache: &[f16],
    v_cache: &[f16],
    seqs: &[AttnSeq<'_>],
    s: &AttnShape,
    out: &mut [f32],
) {
    assert_eq!(q.len(), out.len(), "attention: q/out size");
    let rows = q.len() / (s.num_heads * s.head_dim);
    for sq in seqs {
        assert!(sq.row + sq.len <= rows, "attention: seq rows out of range");
        let need = (sq.start_pos + sq.len).div_ceil(s.block_size);
        assert!(sq.blocks.len() >= need, "attention: block table too short");
    }
    // One task per (sequence, KV head), numbered i · kv_heads + g.
    let tasks = seqs.len() * s.num_kv_heads;
    let o = OutPtr(out.as_mut_ptr());
    let run = |task: usize| {
        let (i, g) = (task / s.num_kv_heads, task % s.num_kv_heads);
        // SAFETY: see OutPtr; bounds checked above (rows, block tables) and by slice indexing.
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => one_avx512(q, k_cache, v_cache, &seqs[i], g, s, o),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => one_avx2(q, k_cache, v_cache, &seqs[i], g, s, o),
                _ => one::<false>(q, k_cache, v_cache, &seqs[i], g, s, o),
            }
        }
    };
    team.for_each(tasks, &run);
}

/// `one` compiled for AVX-512 (the compiler vectorises the dot products and AXPYs 16 wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn one_avx512(
    q: &[f32],
    kc: &[f16],
    vc: &[f16],
    sq: &AttnSeq<'_>,
    g: usize,
    s: &AttnShape,
    o: OutPtr,
) {
    one::<true>(q, kc, vc, sq, g, s, o)
}

/// `one` compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_avx2(
    q: &[f32],
    kc: &[f16],
    vc: &[f16],
    sq: &AttnSeq<'_>,
    g: usize,
    s: &AttnShape,
    o: OutPtr,
) {
    one::<true>(q, kc, vc, sq, g, s, o)
}

/// F16 → F32; `F16C`: the caller is compiled with F16C (8 per `vcvtph2ps`, inlined, where
/// `half`'s slice conversion would dispatch at run time per call).
#[inline(always)]
unsafe fn to_f32<const F16C: bool>(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if F16C {
        use std::arch::x86_64::*;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
    }
    for j in i..n {
        dst[j] = src[j].to_f32();
    }
}

#[inline(always)]
unsafe fn one<const F16C: bool>(
    q: &[f32],
    kc: &[f16],
    vc: &[f16],
    sq: &AttnSeq<'_>,
    g: usize,
    s: &AttnShape,
    o: OutPtr,
) {
    let hd = s.head_dim;
    let bs = s.block_size;
    let group = s.num_heads / s.num_kv_heads;
    let nq = sq.len * group;
    let total = sq.start_pos + sq.len;
    // SAFETY: the thread's own scratch, borrowed by this call alone (tasks do not nest).
    let sc = &mut *SCRATCH.with(|c| c.as_ptr());
    sc.prepare(nq, hd, bs);
    let Scratch {
        m,
        l,
        acc,
        kraw,
        kt,
        vt,
        p,
    } = sc;
    // Few queries per block (decode: the heads of one KV group): a dot product per key beats
    // transposing the block's K tile first, which only pays off over many queries.
    let few = nq <= FEW_QUERIES;
    let nblocks = total.div_ceil(bs);
    let first_block = match s.sliding_window {
        Some(w) => (sq.start_pos + 1).saturating_sub(w) / bs,
        None => 0,
    };
    for b in first_block..nblocks {
        let base = b * bs;
        let valid = (total - base).min(bs);
        let off = ((sq.blocks[b] as usize * s.num_kv_heads + g) * bs) * hd;
        to_f32::<F16C>(&kc[off..off + valid * hd], &mut kraw[..valid * hd]);
        if !few {
            for j in 0..valid {
                for d in 0..hd {
                    kt[d * bs + j] = kraw[j * hd + d];
                }
            }
        }
        to_f32::<F16C>(&vc[off..off + valid * hd], &mut vt[..valid * hd]);
        for t in 0..sq.len {
            let pos = sq.start_pos + t;
            if base > pos {
                continue;
            }
            let hi = (pos - base + 1).min(valid);
            let lo = match s.sliding_window {
                Some(w) => (pos + 1).saturating_sub(w).saturating_sub(base).min(hi),
                None => 0,
            };
            if lo >= hi {
                continue;
            }
            for hg in 0..group {
                let h = g * group + hg;
                let qi = t * group + hg;
                let qrow = &q[((sq.row + t) * s.num_heads + h) * hd..][..hd];
                let mut mx = f32::NEG_INFINITY;
                if few {
                    for j in lo..hi {
                        p[j] = dot(qrow, &kraw[j * hd..(j + 1) * hd]);
                    }
                } else if bs == 16 {
                    // The default block size: a 16-float accumulator the compiler keeps in
                    // one register.
                    let mut a = [0f32; 16];
                    for (qd, kr) in qrow.iter().zip(kt.chunks_exact(16)) {
                        for j in 0..16 {
                            a[j] += qd * kr[j];
                        }
                    }
                    p[..16].copy_from_slice(&a);
                } else {
                    p.fill(0.0);
                    for (d, &qd) in qrow.iter().enumerate() {
                        for (pj, kj) in p.iter_mut().zip(&kt[d * bs..(d + 1) * bs]) {
                            *pj += qd * kj;
                        }
                    }
                }
                for pj in &mut p[lo..hi] {
                    *pj *= s.scale;
                    mx = mx.max(*pj);
                }
                let m_new = m[qi].max(mx);
                let corr = (m[qi] - m_new).exp();
                let a = &mut acc[qi * hd..(qi + 1) * hd];
                if corr != 1.0 {
                    a.iter_mut().for_each(|x| *x *= corr);
                }
                let mut lsum = l[qi] * corr;
                for j in lo..hi {
                    let e = (p[j] - m_new).exp();
                    lsum += e;
                    axpy(e, &vt[j * hd..(j + 1) * hd], a);
                }
                l[qi] = lsum;
                m[qi] = m_new;
            }
        }
    }
    for t in 0..sq.len {
        for hg in 0..group {
            let h = g * group + hg;
            let qi = t * group + hg;
            let inv = if l[qi] > 0.0 { 1.0 / l[qi] } else { 0.0 };
            let dst = o.0.add(((sq.row + t) * s.num_heads + h) * hd);
            for d in 0..hd {
                *dst.add(d) = acc[qi * hd + d] * inv;
            }
        }
    }
}

/// One task's buffers, per pool thread and reused across calls so decode steps do not allocate:
/// per query (t, h) the running max `m`, normaliser `l` and weighted V sum `acc` (head_dim); one
/// block's K (`kraw`), K transposed (`kt`, (head_dim, block_size): scores of one query against
/// the whole block are then head_dim vector FMAs across its keys, with no horizontal sums), V
/// (`vt`) and scores (`p`).
#[derive(Default)]
struct Scratch {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
    kraw: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    p: Vec<f32>,
}

impl Scratch {
    fn prepare(&mut self, nq: usize, hd: usize, bs: usize) {
        let set = |v: &mut Vec<f32>, len: usize, x: f32| {
            v.clear();
            v.resize(len, x);
        };
        set(&mut self.m, nq, f32::NEG_INFINITY);
        set(&mut self.l, nq, 0.0);
        set(&mut self.acc, nq * hd, 0.0);
        set(&mut self.kraw, bs * hd, 0.0);
        set(&mut self.kt, hd * bs, 0.0);
        set(&mut self.vt, bs * hd, 0.0);
        set(&mut self.p, bs, 0.0);
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Queries per (sequence, KV head) up to which scores are per-key dot products: beyond, the
/// block's K is transposed once for all of them (decode of a GQA model reads a group of 4–7
/// query heads per KV head; transposing won there on the AMD EPYC, docs/benchmarks.md).
const FEW_QUERIES: usize = 2;

/// Σ a·b with 8 independent lanes (the compiler vectorises it), summed at the end.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}
