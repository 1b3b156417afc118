//! F16-weight × F32-activation matmul (quantized weights go to [`super::qmatmul`]): y (n, rows) = x (n, cols) · Wᵀ, W packed in 16-row panels
//! (see [`Weight`]).
//!
//! Micro-kernel (outer-product form): for each k, load column k of P panels (P × 16 F16 →
//! F32, one `vcvtph2ps` each), broadcast x[t][k] for T tokens, and do P × T FMAs into P × T
//! accumulators of 16 output rows each. With P = 3, T = 8 on AVX-512 that is 24 FMAs per 3
//! conversions and 11 loads, so prefill is FMA-bound; each weight byte is read from memory once
//! per call (the panel group stays in L2 while all token tiles pass over it). Decode (n = 1) is
//! P × 1 with P up to 8: it streams the weights once, P streams per thread, and is bound by
//! memory bandwidth. P and T per call size come from [`F16Kernel`], measured at start-up
//! ([`super::tune`]).
//!
//! Activations of a multi-token call are first packed as (tiles of T tokens, cols, T), so the
//! kernel's broadcasts come from constant offsets of one pointer.
//!
//! Work split: panels are cut into chunks, one task each on the backend's [`Team`], so threads
//! never share an output element. ISA: AVX-512F, else AVX2 + FMA + F16C (each panel as two 8-lane
//! halves), else a portable loop; detected once with `is_x86_feature_detected!`, and the F16
//! kernels may run AVX2 on an AVX-512 machine where the autotune found it faster.

// Kernels index fixed-size register tiles by (panel, token); index loops read clearer there.
#![allow(clippy::needless_range_loop)]

use super::team::Team;
use crate::backend::{Weight, WeightData, PANEL};
use half::f16;

/// Instruction set used by the matmul kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// Portable 0 < AVX2 1 < AVX-512 2: a kernel may use an ISA of at most the machine's rank.
    pub fn rank(self) -> u8 {
        match self {
            Isa::Portable => 0,
            Isa::Avx2 => 1,
            Isa::Avx512 => 2,
        }
    }

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

/// How the F16 kernels tile a call: the start-up autotune's choice ([`super::tune`]), or the
/// defaults of [`F16Kernel::default_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct F16Kernel {
    /// Instruction set of the F16 kernels (AVX2 may win on CPUs that split 512-bit operations
    /// in two); never above what [`Isa::detect`] found.
    pub isa: Isa,
    /// Weight panels a one-token (decode) call reads side by side: 1–8 independent weight
    /// streams and accumulator chains per thread.
    pub decode_panels: usize,
    /// Multi-token tile for calls of 2–8 tokens (batched decode): panels × tokens.
    pub small: (usize, usize),
    /// Multi-token tile for calls of more than 8 tokens (prefill): panels × tokens.
    pub large: (usize, usize),
}

impl F16Kernel {
    /// The kernels as tuned on the Intel Xeon where they were first measured
    /// (docs/benchmarks.md): two panels side by side, 2×8 and 2×12 tiles.
    pub fn default_for(isa: Isa) -> Self {
        match isa {
            Isa::Avx512 => Self {
                isa,
                decode_panels: 2,
                small: (2, 8),
                large: (2, 12),
            },
            Isa::Avx2 | Isa::Portable => Self {
                isa,
                decode_panels: 2,
                small: (1, 6),
                large: (1, 6),
            },
        }
    }

    /// `ISA,DECODE_PANELS,PxT,PxT` (e.g. `avx512,8,3x8,4x6`; ISA avx512, avx2 or portable).
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split(',');
        let isa = match it.next()? {
            "avx512" => Isa::Avx512,
            "avx2" => Isa::Avx2,
            "portable" => Isa::Portable,
            _ => return None,
        };
        let decode_panels = it.next()?.parse().ok()?;
        let mut tile = || -> Option<(usize, usize)> {
            let (p, t) = it.next()?.split_once('x')?;
            Some((p.parse().ok()?, t.parse().ok()?))
        };
        let (small, large) = (tile()?, tile()?);
        Some(Self {
            isa,
            decode_panels,
            small,
            large,
        })
    }

    /// Whether the kernels have an instantiation for this choice (a cached or hand-written
    /// tuning is checked before use).
    pub fn is_supported(&self) -> bool {
        let tile_ok = |(p, t): (usize, usize)| match self.isa {
            Isa::Avx512 => matches!(
                (p, t),
                (1..=2, 4 | 6 | 8 | 12) | (3, 4 | 6 | 8) | (4, 4 | 6)
            ),
            Isa::Avx2 | Isa::Portable => (p, t) == (1, 6),
        };
        (1..=8).contains(&self.decode_panels)
            && (self.isa != Isa::Portable || self.decode_panels <= 2)
            && tile_ok(self.small)
            && tile_ok(self.large)
            && self.small.1 <= 8
    }

    /// (panels, tokens) of the tile that runs an n-token call; the token count is one the
    /// kernels are instantiated for (the last tile of a call is zero-padded).
    fn tile_for(&self, n: usize) -> (usize, usize) {
        if n == 1 {
            return (self.decode_panels, 1);
        }
        let (p, t) = if n <= 8 { self.small } else { self.large };
        if self.isa != Isa::Avx512 {
            return (p, t);
        }
        let tt = [4, 6, 8, 12]
            .into_iter()
            .find(|&c| c >= n && c <= t)
            .unwrap_or(t);
        (p, tt)
    }
}

/// y (n, w.rows) = x (n, w.cols) · wᵀ across `team`.
/// `isa` is the machine's (the quantized kernels use it), `k` the F16 kernels' choice.
pub fn matmul(isa: Isa, k: F16Kernel, team: &Team, x: &[f32], w: &Weight, y: &mut [f32]) {
    let threads = team.threads();
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
        WeightData::Quant(q) => return super::qmatmul::matmul(isa, team, x, q, y),
    };
    assert_eq!(wpanels.len(), panels * cols * PANEL, "matmul: weight size");
    let (tp, tt) = k.tile_for(n);
    // Enough chunks to balance threads, cut evenly whatever the tile's panel count (a chunk
    // ends with a narrower tile where it is not a multiple: rounding chunks up to whole tiles
    // leaves fewer chunks than threads × 4 on small matrices, and threads idle).
    let tasks = (threads * 4).max(1);
    let chunk = panels.div_ceil(tasks).max(1);
    let out = OutPtr(y.as_mut_ptr());
    let nchunks = panels.div_ceil(chunk);
    XPACK.with(|buf| {
        let mut buf = buf.borrow_mut();
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
            unsafe { panels_range(k.isa, xs, n, (tp, tt), w, wpanels, p0, p1, out) }
        };
        team.for_each(nchunks, &run);
    });
}

/// How many k steps (32 bytes of one panel each) ahead multi-token tiles prefetch weights.
const PREFETCH_K: usize = 64;

/// Largest tile, in panels × tokens (accumulator registers).
const MAX_TILE: usize = 24;

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

/// Computes output rows of panels p0..p1 for all n tokens in (tp panels × tt tokens) tiles; `x`
/// is packed with tile width tt when n > 1.
#[allow(clippy::too_many_arguments)]
unsafe fn panels_range(
    isa: Isa,
    x: &[f32],
    n: usize,
    (tp, tt): (usize, usize),
    w: &Weight,
    wpanels: &[f16],
    p0: usize,
    p1: usize,
    out: OutPtr,
) {
    let (rows, cols) = (w.rows, w.cols);
    let mut p = p0;
    while p < p1 {
        let np = (p1 - p).min(tp);
        let wp = wpanels.as_ptr().add(p * cols * PANEL);
        // The tile's rows that exist (the last panel may be padding beyond `rows`).
        let valid = (rows - p * PANEL).min(np * PANEL);
        let mut t = 0;
        while t < n {
            let nt = (n - t).min(tt);
            let xp = if n == 1 {
                x.as_ptr()
            } else {
                x.as_ptr().add(t * cols)
            };
            let mut tmp = [0f32; MAX_TILE * PANEL];
            // The kernel writes tt tokens × np·16 rows into tmp; copy out the real ones.
            tile(isa, wp, cols, xp, np, tt, tmp.as_mut_ptr());
            for ti in 0..nt {
                let dst = out.0.add((t + ti) * rows + p * PANEL);
                std::ptr::copy_nonoverlapping(tmp.as_ptr().add(ti * np * PANEL), dst, valid);
            }
            t += nt;
        }
        p += np;
    }
}

/// Dispatches an np-panel × tt-token tile (x packed with stride tt; contiguous for tt = 1).
/// y: (tt, np·16).
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
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            macro_rules! go {
                ($(($p:literal, $t:literal)),*) => {
                    match (np, tt) {
                        $(($p, $t) => tile_avx512::<$p, $t>(w, k, x, y),)*
                        _ => unreachable!("no AVX-512 tile {np}x{tt}"),
                    }
                };
            }
            #[rustfmt::skip]
            go!((1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1),
                (1, 4), (2, 4), (3, 4), (4, 4), (1, 6), (2, 6), (3, 6), (4, 6),
                (1, 8), (2, 8), (3, 8), (1, 12), (2, 12));
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            macro_rules! go {
                ($(($p:literal, $t:literal)),*) => {
                    match (np, tt) {
                        $(($p, $t) => tile_avx2::<$p, $t>(w, k, x, y),)*
                        (_, 1) => unreachable!("no AVX2 decode tile of {np} panels"),
                        (_, _) => tile_avx2::<1, 6>(w, k, x, y),
                    }
                };
            }
            #[rustfmt::skip]
            go!((1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1));
        }
        _ => match (np, tt) {
            (1, 1) => tile_portable::<1, 1>(w, k, x, y),
            (2, 1) => tile_portable::<2, 1>(w, k, x, y),
            (_, _) => tile_portable::<1, 6>(w, k, x, y),
        },
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
                y.add(t * P * PANEL + p * PANEL),
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
            _mm512_storeu_ps(y.add(t * P * PANEL + p * PANEL), a[p][t]);
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
    if T == 1 {
        // Decode: P panels side by side (2·P accumulators, P weight streams).
        let mut a = [[_mm256_setzero_ps(); 2]; P];
        for kk in 0..k {
            let xb = _mm256_set1_ps(*x.add(kk));
            for p in 0..P {
                let col = w.add((p * k + kk) * PANEL);
                let lo = _mm256_cvtph_ps(_mm_loadu_si128(col as *const __m128i));
                let hi = _mm256_cvtph_ps(_mm_loadu_si128(col.add(8) as *const __m128i));
                a[p][0] = _mm256_fmadd_ps(lo, xb, a[p][0]);
                a[p][1] = _mm256_fmadd_ps(hi, xb, a[p][1]);
            }
        }
        for p in 0..P {
            _mm256_storeu_ps(y.add(p * PANEL), a[p][0]);
            _mm256_storeu_ps(y.add(p * PANEL + 8), a[p][1]);
        }
        return;
    }
    // 16 ymm registers: one panel (2 halves) × up to 6 tokens per pass.
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
                let dst = y.add((t0 + t) * P * PANEL + p * PANEL);
                _mm256_storeu_ps(dst, a[t][0]);
                _mm256_storeu_ps(dst.add(8), a[t][1]);
            }
        }
        t0 += tn;
    }
}
