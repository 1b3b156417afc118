//! F16-weight × F32-activation matmul (quantized weights go to [`super::qmatmul`]): y (n, rows) = x (n, cols) · Wᵀ, W packed in 16-row panels
//! (see [`Weight`]).
//!
//! Micro-kernel (outer-product form): for each k, load column k of P panels (P × 16 F16 →
//! F32, one `vcvtph2ps` each), broadcast x[t][k] for T tokens, and do P × T FMAs into P × T
//! accumulators of 16 output rows each. With P = 2, T = 12 on AVX-512 that is 24 FMAs per 2
//! conversions and 14 loads, so prefill is FMA-bound; each weight byte is read from memory once
//! per call (the panel pair stays in L2 while all token tiles pass over it). Decode (n = 1) is
//! P × 1: it streams the weights once and is bound by memory bandwidth.
//!
//! Activations of a multi-token call are first packed as (tiles of 12 tokens, cols, 12), so the
//! kernel's broadcasts come from constant offsets of one pointer.
//!
//! Work split: panels are cut into chunks, one rayon task each, so threads never share an output
//! element. ISA: AVX-512F, else AVX2 + FMA + F16C (each panel as two 8-lane halves), else a
//! portable loop; chosen once with `is_x86_feature_detected!`.

// Kernels index fixed-size register tiles by (panel, token); index loops read clearer there.
#![allow(clippy::needless_range_loop)]

use crate::backend::{Weight, WeightData, PANEL};
use half::f16;
use rayon::prelude::*;

/// Instruction set used by the matmul kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // The quantized kernels run their AVX2 variant under Avx512 too.
            if std::env::var_os("SEEDANCE_NO_AVX512").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// Raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: tasks write disjoint elements (each owns a distinct panel range of W, i.e. a distinct
// column range of y), and the pointer outlives the parallel scope that uses it.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// y (n, w.rows) = x (n, w.cols) · wᵀ on the current rayon pool.
pub fn matmul(isa: Isa, threads: usize, x: &[f32], w: &Weight, y: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    assert!(
        cols > 0 && x.len().is_multiple_of(cols),
        "matmul: x has {} elems, cols {}",
        x.len(),
        cols
    );
    let n = x.len() / cols;
    assert_eq!(y.len(), n * rows, "matmul: y size");
    let panels = rows.div_ceil(PANEL);
    let wpanels = match w.data() {
        WeightData::F16(p) => p,
        WeightData::Quant(q) => return super::qmatmul::matmul(isa, threads, x, q, y),
    };
    assert_eq!(wpanels.len(), panels * cols * PANEL, "matmul: weight size");
    // Enough chunks to balance threads; each an even number of panels (the kernel takes pairs).
    let tasks = (threads * 4).max(1);
    let chunk = (panels.div_ceil(tasks).div_ceil(2) * 2).max(2);
    let out = OutPtr(y.as_mut_ptr());
    let nchunks = panels.div_ceil(chunk);
    XPACK.with(|buf| {
        let mut buf = buf.borrow_mut();
        let tt = token_tile(n);
        let xs: &[f32] = if n == 1 {
            x
        } else {
            pack_x(x, n, cols, tt, &mut buf)
        };
        let run = |c: usize| {
            let p0 = c * chunk;
            let p1 = (p0 + chunk).min(panels);
            // SAFETY: p0..p1 ⊂ 0..panels; x has n·cols elements, the packed weight panels·cols·16,
            // y n·rows (all checked above); this task alone writes rows p0·16..p1·16 ∩ 0..rows of
            // every token's output.
            unsafe { panels_range(isa, xs, n, tt, w, wpanels, p0, p1, out) }
        };
        if nchunks == 1 || threads <= 1 {
            (0..nchunks).for_each(run);
        } else {
            (0..nchunks).into_par_iter().for_each(run);
        }
    });
}

/// How many k steps (32 bytes of one panel each) ahead multi-token tiles prefetch weights.
const PREFETCH_K: usize = 64;

/// Largest tokens per micro-kernel tile.
const TT: usize = 12;

/// Tokens per tile for an n-token call: 1, 4, 8 or 12 (small batches are not padded to 12).
fn token_tile(n: usize) -> usize {
    match n {
        1 => 1,
        2..=4 => 4,
        5..=8 => 8,
        _ => TT,
    }
}

thread_local! {
    /// Packed activations, reused across calls so steady-state steps do not allocate.
    static XPACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Packs x (n, cols) as (n.div_ceil(tt), cols, tt), zero-padding the last tile, so the kernel
/// broadcasts x[t][k] from constant offsets of one pointer.
fn pack_x<'b>(x: &[f32], n: usize, cols: usize, tt: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
    let tiles = n.div_ceil(tt);
    buf.clear();
    buf.resize(tiles * cols * tt, 0.0);
    for (t, row) in x.chunks_exact(cols).enumerate() {
        let tile = &mut buf[(t / tt) * cols * tt..][..cols * tt];
        for (k, v) in row.iter().enumerate() {
            tile[k * tt + t % tt] = *v;
        }
    }
    buf
}

/// Computes output rows of panels p0..p1 for all n tokens; `x` is packed when n > 1.
#[allow(clippy::too_many_arguments)]
unsafe fn panels_range(
    isa: Isa,
    x: &[f32],
    n: usize,
    tt: usize,
    w: &Weight,
    wpanels: &[f16],
    p0: usize,
    p1: usize,
    out: OutPtr,
) {
    let (rows, cols) = (w.rows, w.cols);
    let mut p = p0;
    while p < p1 {
        let np = (p1 - p).min(2);
        let wp = wpanels.as_ptr().add(p * cols * PANEL);
        // A panel pair's rows that exist (the last panel may be padding beyond `rows`).
        let valid = (rows - p * PANEL).min(np * PANEL);
        let mut t = 0;
        while t < n {
            let nt = (n - t).min(tt);
            let xp = if n == 1 {
                x.as_ptr()
            } else {
                x.as_ptr().add(t * cols)
            };
            let mut tmp = [0f32; 2 * PANEL * TT];
            // The kernel writes np·16 rows × tt tokens into tmp; copy out the real ones.
            tile(isa, wp, cols, xp, np, tt, tmp.as_mut_ptr());
            for ti in 0..nt {
                let dst = out.0.add((t + ti) * rows + p * PANEL);
                std::ptr::copy_nonoverlapping(tmp.as_ptr().add(ti * 2 * PANEL), dst, valid);
            }
            t += nt;
        }
        p += np;
    }
}

/// Dispatches an np-panel × tt-token tile (x packed with stride tt; contiguous for tt = 1).
/// y: (tt, 32).
#[inline]
unsafe fn tile(
    isa: Isa,
    w: *const f16,
    k: usize,
    x: *const f32,
    np: usize,
    tt: usize,
    y: *mut f32,
) {
    macro_rules! go {
        ($f:ident) => {
            match (np, tt) {
                (2, 1) => $f::<2, 1>(w, k, x, y),
                (2, 4) => $f::<2, 4>(w, k, x, y),
                (2, 8) => $f::<2, 8>(w, k, x, y),
                (2, _) => $f::<2, TT>(w, k, x, y),
                (_, 1) => $f::<1, 1>(w, k, x, y),
                (_, 4) => $f::<1, 4>(w, k, x, y),
                (_, 8) => $f::<1, 8>(w, k, x, y),
                (_, _) => $f::<1, TT>(w, k, x, y),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => go!(tile_avx512),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => go!(tile_avx2),
        _ => go!(tile_portable),
    }
}

/// Portable reference kernel.
unsafe fn tile_portable<const P: usize, const T: usize>(
    w: *const f16,
    k: usize,
    x: *const f32,
    y: *mut f32,
) {
    let mut acc = [[[0f32; PANEL]; T]; P];
    for kk in 0..k {
        for p in 0..P {
            let col = std::slice::from_raw_parts(w.add((p * k + kk) * PANEL), PANEL);
            let mut wv = [0f32; PANEL];
            for (d, s) in wv.iter_mut().zip(col) {
                *d = s.to_f32();
            }
            for t in 0..T {
                let xv = *x.add(kk * T + t);
                for i in 0..PANEL {
                    acc[p][t][i] += wv[i] * xv;
                }
            }
        }
    }
    for p in 0..P {
        for t in 0..T {
            std::ptr::copy_nonoverlapping(
                acc[p][t].as_ptr(),
                y.add(t * 2 * PANEL + p * PANEL),
                PANEL,
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const P: usize, const T: usize>(
    w: *const f16,
    k: usize,
    x: *const f32,
    y: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut a = [[_mm512_setzero_ps(); T]; P];
    for kk in 0..k {
        if T > 1 && kk % 2 == 0 {
            // Multi-token tiles are FMA-bound: fetch the weights a few hundred bytes ahead so
            // memory and compute overlap (the hardware streamer alone lags behind here).
            for p in 0..P {
                // A hint, never a fault: past the last panel it reads nothing, hence `wrapping_add`.
                _mm_prefetch::<_MM_HINT_T0>(
                    w.wrapping_add((p * k + kk + PREFETCH_K) * PANEL) as *const i8
                );
            }
        }
        let mut wv = [_mm512_setzero_ps(); P];
        for p in 0..P {
            wv[p] = _mm512_cvtph_ps(_mm256_loadu_si256(
                w.add((p * k + kk) * PANEL) as *const __m256i
            ));
        }
        for t in 0..T {
            let xb = _mm512_set1_ps(*x.add(kk * T + t));
            for p in 0..P {
                a[p][t] = _mm512_fmadd_ps(wv[p], xb, a[p][t]);
            }
        }
    }
    for p in 0..P {
        for t in 0..T {
            _mm512_storeu_ps(y.add(t * 2 * PANEL + p * PANEL), a[p][t]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const P: usize, const T: usize>(
    w: *const f16,
    k: usize,
    x: *const f32,
    y: *mut f32,
) {
    use std::arch::x86_64::*;
    // 16 ymm registers: tile at most 1 panel (2 halves) × 6 tokens per pass.
    let mut t0 = 0;
    while t0 < T {
        let tn = (T - t0).min(6);
        for p in 0..P {
            let mut a = [[_mm256_setzero_ps(); 2]; 6];
            let wpan = w.add(p * k * PANEL);
            for kk in 0..k {
                let lo = _mm256_cvtph_ps(_mm_loadu_si128(wpan.add(kk * PANEL) as *const __m128i));
                let hi =
                    _mm256_cvtph_ps(_mm_loadu_si128(wpan.add(kk * PANEL + 8) as *const __m128i));
                for t in 0..tn {
                    let xb = _mm256_set1_ps(*x.add(kk * T + t0 + t));
                    a[t][0] = _mm256_fmadd_ps(lo, xb, a[t][0]);
                    a[t][1] = _mm256_fmadd_ps(hi, xb, a[t][1]);
                }
            }
            for t in 0..tn {
                let dst = y.add((t0 + t) * 2 * PANEL + p * PANEL);
                _mm256_storeu_ps(dst, a[t][0]);
                _mm256_storeu_ps(dst.add(8), a[t][1]);
            }
        }
        t0 += tn;
    }
}
