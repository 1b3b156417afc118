//! Quantized-weight matmul: y (n, rows) = x (n, cols) · Wᵀ with W a [`QuantMatrix`] (Q8_0, Q4_0,
//! Q4_1) and x quantized per row to 8-bit blocks first ([`QuantActs`], llama.cpp's Q8_1), so the
//! inner loop is integer multiply-adds and the weights are never widened to floats in memory.
//!
//! Per block b of 32 weights, row r and token t:
//!
//! ```text
//!   Σ w·x ≈ d_w[r] · d_x[t] · Σ q_w·q_x  +  m[r] · s_x[t]        (s_x = d_x · Σ q_x)
//! ```
//!
//! with m = 0 for Q8_0 and m = −8·d_w for Q4_0 (its codes are stored unsigned, q − 8). The
//! integer sum is exact; the only rounding beyond the weights' own is the activations' 8-bit
//! quantization (relative error ≤ 1/254 per element, as in llama.cpp).
//!
//! AVX2 micro-kernel (one 8-row panel × T ≤ 4 tokens): a 32-byte code vector holds 4 weights of
//! each of the 8 rows; `vpmaddubsw` multiplies it byte by byte with 4 activation bytes broadcast
//! to every row and adds pairs (i16), and the block's 8 (Q4: 4 vectors × 2 nibble halves) or 8
//! (Q8) products are summed per row with no horizontal adds. Q4 codes are 0..15, so the i16 lanes
//! hold 16 products of ≤ 15·127 each (≤ 30,480, no overflow) and one `vpmaddwd` per block widens
//! them; Q8 codes are signed, so the sign moves onto the activation (`vpsignb`) and each
//! vector's pairs are widened at once (2·127·127 fits i16, two of them would not). The block's
//! i32 sums become floats and are scaled into 8 F32 accumulators per token. Decode (n = 1)
//! streams each panel once; multi-token calls reuse a panel (L1-resident: ≤ 8 KiB for 1536
//! columns) for every 4-token tile.
//!
//! AVX-512 machines with VNNI run the same kernels with `vpdpbusd` (256-bit, AVX512-VL): one
//! instruction multiplies the bytes and adds each row's four products straight into i32, where
//! AVX2 needs `vpmaddubsw` + `vpmaddwd` + `vpaddd` (and Q4 its i16 stage). Other AVX-512
//! machines run the AVX2 kernels; other machines a portable loop with the same arithmetic.
//! `SEEDANCE_NO_VNNI=1` forces the AVX2 kernels (for comparisons).

// Kernels index fixed-size register tiles by token; index loops read clearer there.
#![allow(clippy::needless_range_loop)]

use super::matmul::{Isa, OutPtr};
use super::team::Team;
use crate::backend::quant::{QuantActs, QuantKind, QuantMatrix, QK, QROWS};

/// Largest tokens per micro-kernel tile.
const TT: usize = 4;

thread_local! {
    /// Quantized activations, reused across calls so steady-state steps do not allocate.
    static XQ: std::cell::RefCell<QuantActs> = std::cell::RefCell::new(QuantActs::default());
}

/// y (n, w.rows) = x (n, w.cols) · wᵀ across `team`.
pub fn matmul(isa: Isa, team: &Team, x: &[f32], w: &QuantMatrix, y: &mut [f32]) {
    let threads = team.threads();
    let (rows, cols) = (w.rows, w.cols);
    assert!(
        cols > 0 && x.len().is_multiple_of(cols),
        "qmatmul: x has {} elems, cols {}",
        x.len(),
        cols
    );
    let n = x.len() / cols;
    assert_eq!(y.len(), n * rows, "qmatmul: y size");
    let panels = w.panels();
    let tasks = (threads * 4).max(1);
    let chunk = panels.div_ceil(tasks).max(1);
    let nchunks = panels.div_ceil(chunk);
    let out = OutPtr(y.as_mut_ptr());
    XQ.with(|xq| {
        let mut xq = xq.borrow_mut();
        xq.quantize(x, cols);
        let xq: &QuantActs = &xq;
        let run = |c: usize| {
            let p0 = c * chunk;
            let p1 = (p0 + chunk).min(panels);
            for p in p0..p1 {
                // SAFETY: p < panels; xq holds n rows of cols codes and n·cols/32 scales; this
                // task alone writes rows p·8..(p+1)·8 ∩ 0..rows of every token's output, and y
                // has n·rows elements (checked above).
                unsafe { panel(isa, w, p, xq, n, out) }
            }
        };
        team.for_each(nchunks, &run);
    });
}

/// Output rows of panel p for all n tokens.
unsafe fn panel(isa: Isa, w: &QuantMatrix, p: usize, xq: &QuantActs, n: usize, out: OutPtr) {
    let (rows, cols, nb) = (w.rows, w.cols, w.blocks());
    let wp = w.panel(p).as_ptr();
    let valid = (rows - p * QROWS).min(QROWS);
    let mut t = 0;
    while t < n {
        let nt = (n - t).min(TT);
        let x = Acts {
            q: xq.q.as_ptr().add(t * cols),
            d: xq.d.as_ptr().add(t * nb),
            s: xq.s.as_ptr().add(t * nb),
            qstride: cols,
            dstride: nb,
        };
        let mut tmp = [0f32; QROWS * TT];
        tile(isa, w.kind, wp, nb, &x, nt, tmp.as_mut_ptr());
        for ti in 0..nt {
            let dst = out.0.add((t + ti) * rows + p * QROWS);
            std::ptr::copy_nonoverlapping(tmp.as_ptr().add(ti * QROWS), dst, valid);
        }
        t += nt;
    }
}

/// A tile's quantized activations: token t's codes at `q + t·qstride`, its block scales and sums
/// at `d + t·dstride`, `s + t·dstride`.
struct Acts {
    q: *const i8,
    d: *const f32,
    s: *const f32,
    qstride: usize,
    dstride: usize,
}

/// Dispatches one panel × nt-token tile; y: (nt, 8).
#[inline]
unsafe fn tile(
    isa: Isa,
    kind: QuantKind,
    w: *const u8,
    nb: usize,
    x: &Acts,
    nt: usize,
    y: *mut f32,
) {
    macro_rules! go {
        ($f:ident $(, $k:expr)?) => {
            match nt {
                1 => $f::<1 $(, $k)?>(w, nb, x, y),
                2 => $f::<2 $(, $k)?>(w, nb, x, y),
                3 => $f::<3 $(, $k)?>(w, nb, x, y),
                _ => $f::<TT $(, $k)?>(w, nb, x, y),
            }
        };
    }
    match (isa, kind) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, QuantKind::Q8_0) if vnni() => go!(q8_vnni),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, QuantKind::Q4_0) if vnni() => go!(q4_vnni, false),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, QuantKind::Q4_1) if vnni() => go!(q4_vnni, true),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512 | Isa::Avx2, QuantKind::Q8_0) => go!(q8_avx2),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512 | Isa::Avx2, QuantKind::Q4_0) => go!(q4_avx2, false),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512 | Isa::Avx2, QuantKind::Q4_1) => go!(q4_avx2, true),
        (_, kind) => tile_portable(kind, w, nb, x, nt, y),
    }
}

/// Whether the VNNI kernels may run: AVX512-VNNI and AVX512-VL, not disabled by
/// `SEEDANCE_NO_VNNI`.
#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        std::env::var_os("SEEDANCE_NO_VNNI").is_none()
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
    })
}

/// Portable reference kernel: the same integer sums and scaling as the SIMD ones.
unsafe fn tile_portable(
    kind: QuantKind,
    w: *const u8,
    nb: usize,
    x: &Acts,
    nt: usize,
    y: *mut f32,
) {
    let pb = kind.panel_block_bytes();
    let ps = kind.scale_bytes();
    let f16_at = |p: *const u8| half::f16::from_le_bytes([*p, *p.add(1)]).to_f32();
    for t in 0..nt {
        let xq = std::slice::from_raw_parts(x.q.add(t * x.qstride), nb * QK);
        for r in 0..QROWS {
            let mut acc = 0f32;
            for b in 0..nb {
                let blk = w.add(b * pb);
                let d = f16_at(blk.add(2 * r));
                let codes = blk.add(ps);
                let xb = &xq[b * QK..][..QK];
                let mut sum = 0i32;
                let m = match kind {
                    QuantKind::Q8_0 => {
                        for j in 0..QK {
                            let c = *codes.add(32 * (j / 4) + 4 * r + j % 4) as i8;
                            sum += i32::from(c) * i32::from(xb[j]);
                        }
                        0.0
                    }
                    QuantKind::Q4_0 | QuantKind::Q4_1 => {
                        for j in 0..QK / 2 {
                            let byte = *codes.add(32 * (j / 4) + 4 * r + j % 4);
                            sum += i32::from(byte & 0x0f) * i32::from(xb[j]);
                            sum += i32::from(byte >> 4) * i32::from(xb[j + 16]);
                        }
                        if kind == QuantKind::Q4_1 {
                            f16_at(blk.add(16 + 2 * r))
                        } else {
                            -8.0 * d
                        }
                    }
                };
                let (dx, sx) = (*x.d.add(t * x.dstride + b), *x.s.add(t * x.dstride + b));
                acc += d * (sum as f32 * dx) + m * sx;
            }
            *y.add(t * QROWS + r) = acc;
        }
    }
}

/// A Q4_0 (`Q41 = false`) / Q4_1 panel × T-token tile; `$step(acc, codes, acts)` adds one
/// vector of u8 codes × i8 activations into the per-row accumulator, `$widen(acc)` turns the
/// block's accumulator into i32 per row.
macro_rules! q4_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, $step:expr, $widen:expr) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: usize, const Q41: bool>(
            w: *const u8,
            nb: usize,
            x: &Acts,
            y: *mut f32,
        ) {
            use std::arch::x86_64::*;
            let kind = if Q41 {
                QuantKind::Q4_1
            } else {
                QuantKind::Q4_0
            };
            let (pb, ps) = (kind.panel_block_bytes(), kind.scale_bytes());
            let mask = _mm256_set1_epi8(0x0f);
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                let blk = w.add(b * pb);
                let mut sums = [_mm256_setzero_si256(); T];
                for v in 0..4 {
                    let raw = _mm256_loadu_si256(blk.add(ps + 32 * v) as *const __m256i);
                    let lo = _mm256_and_si256(raw, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                    for t in 0..T {
                        let xp = x.q.add(t * x.qstride + b * QK + 4 * v);
                        let xl = _mm256_set1_epi32((xp as *const i32).read_unaligned());
                        let xh = _mm256_set1_epi32((xp.add(16) as *const i32).read_unaligned());
                        sums[t] = $step(sums[t], lo, xl);
                        sums[t] = $step(sums[t], hi, xh);
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                let m = if Q41 {
                    _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i))
                } else {
                    _mm256_setzero_ps()
                };
                for t in 0..T {
                    let f = _mm256_cvtepi32_ps($widen(sums[t]));
                    let dx = _mm256_set1_ps(*x.d.add(t * x.dstride + b));
                    let sx = *x.s.add(t * x.dstride + b);
                    if Q41 {
                        acc[t] = _mm256_fmadd_ps(d, _mm256_mul_ps(f, dx), acc[t]);
                        acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(sx), acc[t]);
                    } else {
                        let c = _mm256_set1_ps(-8.0 * sx);
                        acc[t] = _mm256_fmadd_ps(d, _mm256_fmadd_ps(f, dx, c), acc[t]);
                    }
                }
            }
            for t in 0..T {
                _mm256_storeu_ps(y.add(t * QROWS), acc[t]);
            }
        }
    };
}

/// A Q8_0 panel × T-token tile; `$dot(acc, |w|, x with w's sign)` adds each row's four byte
/// products into its i32 lane.
macro_rules! q8_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, $dot:expr) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: usize>(w: *const u8, nb: usize, x: &Acts, y: *mut f32) {
            use std::arch::x86_64::*;
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                let blk = w.add(b * QuantKind::Q8_0.panel_block_bytes());
                let mut s32 = [_mm256_setzero_si256(); T];
                for v in 0..8 {
                    let wv = _mm256_loadu_si256(
                        blk.add(QuantKind::Q8_0.scale_bytes() + 32 * v) as *const __m256i
                    );
                    let aw = _mm256_abs_epi8(wv);
                    for t in 0..T {
                        let xp = x.q.add(t * x.qstride + b * QK + 4 * v);
                        let xb = _mm256_set1_epi32((xp as *const i32).read_unaligned());
                        s32[t] = $dot(s32[t], aw, _mm256_sign_epi8(xb, wv));
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                for t in 0..T {
                    let f = _mm256_cvtepi32_ps(s32[t]);
                    let dx = _mm256_set1_ps(*x.d.add(t * x.dstride + b));
                    acc[t] = _mm256_fmadd_ps(d, _mm256_mul_ps(f, dx), acc[t]);
                }
            }
            for t in 0..T {
                _mm256_storeu_ps(y.add(t * QROWS), acc[t]);
            }
        }
    };
}

q4_kernel!(
    /// Q4 with AVX2: `vpmaddubsw` into i16 (16 products ≤ 15·127 each fit), widened once per
    /// block by `vpmaddwd`.
    q4_avx2,
    "avx2,fma,f16c",
    |s, c, a| _mm256_add_epi16(s, _mm256_maddubs_epi16(c, a)),
    |s| _mm256_madd_epi16(s, _mm256_set1_epi16(1))
);
q4_kernel!(
    /// Q4 with VNNI: `vpdpbusd` straight into i32.
    q4_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    |s, c, a| _mm256_dpbusd_epi32(s, c, a),
    |s| s
);
q8_kernel!(
    /// Q8 with AVX2: each vector's pairs widened at once (two i16 sums of 127·127 would not fit).
    q8_avx2,
    "avx2,fma,f16c",
    |s, aw, x| _mm256_add_epi32(
        s,
        _mm256_madd_epi16(_mm256_maddubs_epi16(aw, x), _mm256_set1_epi16(1))
    )
);
q8_kernel!(
    /// Q8 with VNNI: `vpdpbusd`.
    q8_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    |s, aw, x| _mm256_dpbusd_epi32(s, aw, x)
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::tests::rand_vec;
    use crate::backend::quant::tests::random_blocks;

    /// Against an f64 dot product of the dequantized weights with the *quantized* activations
    /// (the kernels' integer sums are exact, so only F32 accumulation order differs: 1e-5), and
    /// with the original activations (the 8-bit activation rounding: ≤ |w|·|x|/254 per term,
    /// far less on random signs; bounded here by 1e-2 of Σ|w·x|).
    #[test]
    fn kernels_match_reference_on_every_kind_and_tile() {
        // Avx512 runs the VNNI kernels where the CPU has VNNI, the AVX2 ones otherwise.
        let isas = match Isa::detect() {
            Isa::Portable => vec![Isa::Portable],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Portable],
            Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Portable],
        };
        for kind in [QuantKind::Q8_0, QuantKind::Q4_0, QuantKind::Q4_1] {
            for &(rows, cols, n) in &[
                (8, 32, 1),
                (13, 64, 3),
                (24, 96, 5),
                (40, 576, 9),
                (3, 32, 4),
            ] {
                let blocks = random_blocks(kind, rows, cols, 3);
                let w = QuantMatrix::from_gguf(kind, rows, cols, &blocks).unwrap();
                let x = rand_vec(n * cols, 9);
                let mut xq = QuantActs::default();
                xq.quantize(&x, cols);
                let mut wr = vec![0f32; cols];
                for isa in &isas {
                    for threads in [1, 2] {
                        let team = Team::new(threads);
                        let mut y = vec![0f32; n * rows];
                        matmul(*isa, &team, &x, &w, &mut y);
                        for r in 0..rows {
                            w.row_f32(r, &mut wr);
                            for t in 0..n {
                                let (mut exact, mut quant, mut mag) = (0f64, 0f64, 0f64);
                                for k in 0..cols {
                                    let xk = x[t * cols + k] as f64;
                                    let qk = f64::from(xq.q[t * cols + k])
                                        * f64::from(xq.d[(t * cols + k) / QK]);
                                    exact += wr[k] as f64 * xk;
                                    quant += wr[k] as f64 * qk;
                                    mag += (wr[k] as f64 * xk).abs();
                                }
                                let got = y[t * rows + r] as f64;
                                let ctx =
                                    format!("{isa:?} {kind:?} {rows}x{cols} n={n} t={t} r={r}");
                                assert!(
                                    (got - quant).abs() < 1e-5 + 1e-5 * mag,
                                    "{ctx}: {got} vs {quant}"
                                );
                                assert!(
                                    (got - exact).abs() < 1e-2 * mag + 1e-6,
                                    "{ctx}: {got} vs {exact}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
