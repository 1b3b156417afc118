//! F16-weight × F32-activation matmul: y (n, rows) = x (n, cols) · Wᵀ, W (rows, cols) F16.
//!
//! Work split: output rows are cut into chunks (a multiple of 4 rows), one rayon task each, so
//! threads never share an output element. Inside a chunk, tokens are taken in blocks of
//! [`TOKEN_BLOCK`] (their activations stay in L2) and, for each 4-row weight tile, the micro-kernel
//! computes the 4 × T dot products of that tile with T ≤ 4 tokens at once: each weight vector is
//! converted F16→F32 once per T tokens, so prefill reads each weight byte from memory once per
//! token block instead of once per token. Decode (n = 1) degenerates to 4 rows × 1 token, streaming
//! the weights once — it is bound by memory bandwidth.
//!
//! ISA: AVX-512F (16 lanes, `vcvtph2ps zmm`), else AVX2 + FMA + F16C (8 lanes), else a portable
//! loop; chosen once at start-up with `is_x86_feature_detected!`.

// Kernels index fixed-size register tiles by (row, token); index loops read clearer there.
#![allow(clippy::needless_range_loop)]

use crate::backend::Weight;
use half::f16;
use rayon::prelude::*;

/// Tokens whose activations are kept hot while a chunk of weight rows streams past.
const TOKEN_BLOCK: usize = 64;
/// Weight rows per micro-kernel tile.
const ROWS: usize = 4;
/// Tokens per micro-kernel tile.
const TOKS: usize = 4;

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
            if std::env::var_os("SEEDANCE_NO_AVX512").is_none()
                && is_x86_feature_detected!("avx512f")
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
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (each owns a distinct row range of W, i.e. a distinct
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
    assert_eq!(w.data.len(), rows * cols, "matmul: weight size");
    // Enough chunks to balance threads; each a multiple of ROWS.
    let tasks = (threads * 4).max(1);
    let chunk = rows.div_ceil(tasks).div_ceil(ROWS) * ROWS;
    let chunk = chunk.max(ROWS);
    let out = OutPtr(y.as_mut_ptr());
    let nchunks = rows.div_ceil(chunk);
    let run = |c: usize| {
        let r0 = c * chunk;
        let r1 = (r0 + chunk).min(rows);
        // SAFETY: r0..r1 ⊂ 0..rows; x has n·cols elements, w has rows·cols, y has n·rows (checked
        // above); this task alone writes columns r0..r1 of y.
        unsafe { rows_range(isa, x, n, w, r0, r1, out) }
    };
    if nchunks == 1 || threads <= 1 {
        (0..nchunks).for_each(run);
    } else {
        (0..nchunks).into_par_iter().for_each(run);
    }
}

/// Computes columns r0..r1 of y for all n tokens.
unsafe fn rows_range(isa: Isa, x: &[f32], n: usize, w: &Weight, r0: usize, r1: usize, out: OutPtr) {
    let (rows, cols) = (w.rows, w.cols);
    let wp = w.data.as_ptr();
    let xp = x.as_ptr();
    let mut tb = 0;
    while tb < n {
        let te = (tb + TOKEN_BLOCK).min(n);
        let mut r = r0;
        while r < r1 {
            let nr = (r1 - r).min(ROWS);
            let mut t = tb;
            while t < te {
                let nt = (te - t).min(TOKS);
                let mut acc = [[0f32; TOKS]; ROWS];
                tile(
                    isa,
                    wp.add(r * cols),
                    cols,
                    xp.add(t * cols),
                    nr,
                    nt,
                    &mut acc,
                );
                for (ri, acc_r) in acc.iter().enumerate().take(nr) {
                    for (ti, v) in acc_r.iter().enumerate().take(nt) {
                        *out.0.add((t + ti) * rows + r + ri) = *v;
                    }
                }
                t += nt;
            }
            r += nr;
        }
        tb = te;
    }
}

/// Dispatches the nr × nt tile to a monomorphised kernel.
#[inline]
unsafe fn tile(
    isa: Isa,
    w: *const f16,
    k: usize,
    x: *const f32,
    nr: usize,
    nt: usize,
    acc: &mut [[f32; TOKS]; ROWS],
) {
    macro_rules! go {
        ($f:ident) => {
            match (nr, nt) {
                (4, 4) => $f::<4, 4>(w, k, x, acc),
                (4, 3) => $f::<4, 3>(w, k, x, acc),
                (4, 2) => $f::<4, 2>(w, k, x, acc),
                (4, 1) => $f::<4, 1>(w, k, x, acc),
                (nr, nt) => {
                    for ri in 0..nr {
                        for ti in 0..nt {
                            let mut one = [[0f32; TOKS]; ROWS];
                            $f::<1, 1>(w.add(ri * k), k, x.add(ti * k), &mut one);
                            acc[ri][ti] = one[0][0];
                        }
                    }
                }
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

/// Portable reference kernel (also the tail of the SIMD ones).
unsafe fn tile_portable<const R: usize, const T: usize>(
    w: *const f16,
    k: usize,
    x: *const f32,
    acc: &mut [[f32; TOKS]; ROWS],
) {
    for r in 0..R {
        let wr = std::slice::from_raw_parts(w.add(r * k), k);
        for t in 0..T {
            let xt = std::slice::from_raw_parts(x.add(t * k), k);
            let mut s = [0f32; 8];
            let mut i = 0;
            while i + 8 <= k {
                for l in 0..8 {
                    s[l] += wr[i + l].to_f32() * xt[i + l];
                }
                i += 8;
            }
            let mut sum: f32 = s.iter().sum();
            while i < k {
                sum += wr[i].to_f32() * xt[i];
                i += 1;
            }
            acc[r][t] = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize, const T: usize>(
    w: *const f16,
    k: usize,
    x: *const f32,
    acc: &mut [[f32; TOKS]; ROWS],
) {
    use std::arch::x86_64::*;
    let mut a = [[_mm512_setzero_ps(); T]; R];
    let mut i = 0;
    while i + 16 <= k {
        let mut wv = [_mm512_setzero_ps(); R];
        for (r, v) in wv.iter_mut().enumerate() {
            *v = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(r * k + i) as *const __m256i));
        }
        for t in 0..T {
            let xv = _mm512_loadu_ps(x.add(t * k + i));
            for r in 0..R {
                a[r][t] = _mm512_fmadd_ps(wv[r], xv, a[r][t]);
            }
        }
        i += 16;
    }
    for r in 0..R {
        for t in 0..T {
            let mut s = _mm512_reduce_add_ps(a[r][t]);
            for j in i..k {
                s += (*w.add(r * k + j)).to_f32() * *x.add(t * k + j);
            }
            acc[r][t] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const R: usize, const T: usize>(
    w: *const f16,
    k: usize,
    x: *const f32,
    acc: &mut [[f32; TOKS]; ROWS],
) {
    use std::arch::x86_64::*;
    let mut a = [[_mm256_setzero_ps(); T]; R];
    let mut i = 0;
    while i + 8 <= k {
        let mut wv = [_mm256_setzero_ps(); R];
        for (r, v) in wv.iter_mut().enumerate() {
            *v = _mm256_cvtph_ps(_mm_loadu_si128(w.add(r * k + i) as *const __m128i));
        }
        for t in 0..T {
            let xv = _mm256_loadu_ps(x.add(t * k + i));
            for r in 0..R {
                a[r][t] = _mm256_fmadd_ps(wv[r], xv, a[r][t]);
            }
        }
        i += 8;
    }
    for r in 0..R {
        for t in 0..T {
            let v = a[r][t];
            let hi = _mm256_extractf128_ps(v, 1);
            let q = _mm_add_ps(_mm256_castps256_ps128(v), hi);
            let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
            let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
            let mut s = _mm_cvtss_f32(q);
            for j in i..k {
                s += (*w.add(r * k + j)).to_f32() * *x.add(t * k + j);
            }
            acc[r][t] = s;
        }
    }
}
