//! Quantized weight matrices kept quantized in memory: GGUF's Q8_0, Q4_0 and Q4_1, repacked for
//! the CPU integer kernels ([`crate::backend::cpu::qmatmul`]).
//!
//! GGUF stores a matrix row by row, each row as blocks of 32 weights: a F16 scale `d` (Q4_1 also
//! a F16 offset `m`) and the 32 codes (Q8_0: one signed byte each, `w = d·q`; Q4_0: nibbles,
//! `w = d·(q − 8)`; Q4_1: nibbles, `w = d·q + m`; byte j of a 4-bit block holds weight j in its
//! low nibble and weight j + 16 in its high one).
//!
//! Packed layout: rows are grouped in panels of [`QROWS`] = 8 (the last one padded with zero
//! rows), a panel is stored block by block, and a panel block is
//!
//! ```text
//!   d[8]  (F16 per row)                       16 bytes
//!   m[8]  (F16 per row; Q4_1 only)            16 bytes
//!   codes: Q8_0 8 vectors, Q4_* 4 vectors     32 bytes each
//! ```
//!
//! Code vector v holds, for each row r of the panel, 4 consecutive bytes at offset 4r: Q8_0 the
//! codes of weights 4v..4v+3, Q4_* GGUF bytes 4v..4v+3 (so weights 4v.. in the low nibbles and
//! 16+4v.. in the high ones). One 32-byte vector is thus 4 weights of 8 rows: multiplied byte by
//! byte with 4 activation bytes broadcast to all 8 lanes and summed in groups of 4, it gives 8
//! row partial sums with no horizontal adds (see the kernels). Same bits per weight as GGUF
//! (Q4_0 4.5, Q4_1 5, Q8_0 8.5), so decode streams 4–5 bits per weight, not 16.

use half::f16;

/// Rows per panel.
pub const QROWS: usize = 8;
/// Weights per block (all supported formats).
pub const QK: usize = 32;

/// A supported quantized format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl QuantKind {
    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q8_0 => "Q8_0",
            QuantKind::Q4_0 => "Q4_0",
            QuantKind::Q4_1 => "Q4_1",
        }
    }

    /// Bytes of one GGUF block (32 weights of one row).
    pub fn gguf_block_bytes(self) -> usize {
        match self {
            QuantKind::Q8_0 => 34,
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
        }
    }

    /// Bytes of the scales at the start of a panel block (d, and m for Q4_1).
    pub const fn scale_bytes(self) -> usize {
        match self {
            QuantKind::Q4_1 => 32,
            _ => 16,
        }
    }

    /// Bytes of codes of a panel block (8 rows × 32 weights).
    pub const fn code_bytes(self) -> usize {
        match self {
            QuantKind::Q8_0 => 256,
            _ => 128,
        }
    }

    /// Bytes of one panel block.
    pub const fn panel_block_bytes(self) -> usize {
        self.scale_bytes() + self.code_bytes()
    }

    /// Bytes of GGUF codes in one block (after the scales).
    fn gguf_code_bytes(self) -> usize {
        match self {
            QuantKind::Q8_0 => 32,
            _ => 16,
        }
    }

    /// Bytes of GGUF scales at the start of one block.
    fn gguf_scale_bytes(self) -> usize {
        self.gguf_block_bytes() - self.gguf_code_bytes()
    }
}

/// A `(rows, cols)` quantized matrix in the packed layout of the module doc.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub kind: QuantKind,
    pub rows: usize,
    pub cols: usize,
    /// (rows.div_ceil(8), cols / 32, panel_block_bytes)
    data: Vec<u8>,
}

impl QuantMatrix {
    /// Repacks GGUF row-major blocks (`rows · cols / 32` blocks of `kind`).
    pub fn from_gguf(
        kind: QuantKind,
        rows: usize,
        cols: usize,
        blocks: &[u8],
    ) -> Result<Self, String> {
        if cols == 0 || !cols.is_multiple_of(QK) {
            return Err(format!(
                "{} rows of {cols} weights are not whole blocks of {QK}",
                kind.name()
            ));
        }
        let nb = cols / QK;
        let gb = kind.gguf_block_bytes();
        if blocks.len() != rows * nb * gb {
            return Err(format!(
                "{} data of {} bytes does not hold {rows} × {cols} weights",
                kind.name(),
                blocks.len()
            ));
        }
        let panels = rows.div_ceil(QROWS);
        let pb = kind.panel_block_bytes();
        let mut data = vec![0u8; panels * nb * pb];
        let (gs, gc, ps) = (
            kind.gguf_scale_bytes(),
            kind.gguf_code_bytes(),
            kind.scale_bytes(),
        );
        for (row, src_row) in blocks.chunks_exact(nb * gb).enumerate() {
            let (p, r) = (row / QROWS, row % QROWS);
            for (b, src) in src_row.chunks_exact(gb).enumerate() {
                let dst = &mut data[(p * nb + b) * pb..][..pb];
                dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                if gs == 4 {
                    dst[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&src[2..4]);
                }
                for (v, four) in src[gs..gs + gc].chunks_exact(4).enumerate() {
                    dst[ps + 32 * v + 4 * r..][..4].copy_from_slice(four);
                }
            }
        }
        Ok(Self {
            kind,
            rows,
            cols,
            data,
        })
    }

    /// The GGUF row-major blocks this matrix was packed from (exact inverse of [`Self::from_gguf`]).
    pub fn to_gguf(&self) -> Vec<u8> {
        let nb = self.cols / QK;
        let kind = self.kind;
        let (gb, pb) = (kind.gguf_block_bytes(), kind.panel_block_bytes());
        let (gs, gc, ps) = (
            kind.gguf_scale_bytes(),
            kind.gguf_code_bytes(),
            kind.scale_bytes(),
        );
        let mut out = vec![0u8; self.rows * nb * gb];
        for (row, dst_row) in out.chunks_exact_mut(nb * gb).enumerate() {
            let (p, r) = (row / QROWS, row % QROWS);
            for (b, dst) in dst_row.chunks_exact_mut(gb).enumerate() {
                let src = &self.data[(p * nb + b) * pb..][..pb];
                dst[0..2].copy_from_slice(&src[2 * r..2 * r + 2]);
                if gs == 4 {
                    dst[2..4].copy_from_slice(&src[16 + 2 * r..16 + 2 * r + 2]);
                }
                for (v, four) in dst[gs..gs + gc].chunks_exact_mut(4).enumerate() {
                    four.copy_from_slice(&src[ps + 32 * v + 4 * r..][..4]);
                }
            }
        }
        out
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.cols / QK
    }

    /// Panels of 8 rows.
    pub fn panels(&self) -> usize {
        self.rows.div_ceil(QROWS)
    }

    /// The packed bytes of panel `p` (blocks × panel_block_bytes).
    pub fn panel(&self, p: usize) -> &[u8] {
        let len = self.blocks() * self.kind.panel_block_bytes();
        &self.data[p * len..][..len]
    }

    /// All packed bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// Bytes a matmul streams.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Row `r` dequantized. `out`: (cols,).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let kind = self.kind;
        let (p, lane) = (r / QROWS, r % QROWS);
        let ps = kind.scale_bytes();
        let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        for (blk, o) in self
            .panel(p)
            .chunks_exact(kind.panel_block_bytes())
            .zip(out.chunks_exact_mut(QK))
        {
            let d = f16_at(blk, 2 * lane);
            let codes = &blk[ps..];
            match kind {
                QuantKind::Q8_0 => {
                    for (j, o) in o.iter_mut().enumerate() {
                        *o = d * f32::from(codes[32 * (j / 4) + 4 * lane + j % 4] as i8);
                    }
                }
                QuantKind::Q4_0 | QuantKind::Q4_1 => {
                    let (m, off) = match kind {
                        QuantKind::Q4_1 => (f16_at(blk, 16 + 2 * lane), 0.0),
                        _ => (0.0, 8.0),
                    };
                    for j in 0..QK / 2 {
                        let byte = codes[32 * (j / 4) + 4 * lane + j % 4];
                        o[j] = d * (f32::from(byte & 0x0f) - off) + m;
                        o[j + 16] = d * (f32::from(byte >> 4) - off) + m;
                    }
                }
            }
        }
    }
}

/// Activations quantized per row in blocks of 32, the integer kernels' other operand (llama.cpp's
/// Q8_1): for block b of row t, `q` the codes (|q| ≤ 127), `d` the scale (`x ≈ d·q`) and
/// `s = d·Σq` (for the Q4 offsets: Σ w·x = d_w·Σ q_w·q_x·d_x + m·s).
#[derive(Debug, Default)]
pub struct QuantActs {
    /// (n, cols)
    pub q: Vec<i8>,
    /// (n, cols / 32)
    pub d: Vec<f32>,
    /// (n, cols / 32)
    pub s: Vec<f32>,
}

impl QuantActs {
    /// Quantizes x (n, cols), reusing the buffers. `cols` is a multiple of 32.
    pub fn quantize(&mut self, x: &[f32], cols: usize) {
        let nb = cols / QK;
        let n = x.len() / cols;
        self.q.resize(n * cols, 0);
        self.d.resize(n * nb, 0.0);
        self.s.resize(n * nb, 0.0);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 checked; q has x.len() codes, d and s x.len() / 32 entries (resized above).
            unsafe { self.quantize_avx2(x) };
            return;
        }
        for (i, blk) in x.chunks_exact(QK).enumerate() {
            let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut self.q[i * QK..][..QK];
            let mut sum = 0i32;
            for (o, v) in q.iter_mut().zip(blk) {
                // |v·id| ≤ 127 up to rounding; the clamp keeps the kernels' i16 sums in range.
                let c = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
                *o = c;
                sum += i32::from(c);
            }
            self.d[i] = d;
            self.s[i] = d * sum as f32;
        }
    }

    /// [`Self::quantize`] for AVX2: the same codes (round half to even, clamped to ±127).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(&mut self, x: &[f32]) {
        use std::arch::x86_64::*;
        let sign = _mm256_set1_ps(-0.0);
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        for (i, blk) in x.chunks_exact(QK).enumerate() {
            let p = blk.as_ptr();
            let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(p.add(8 * j)));
            let mut m = _mm256_andnot_ps(sign, v[0]);
            for vj in &v[1..] {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vj));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let c: [__m256i; 4] = std::array::from_fn(|j| {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(v[j], id),
                );
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
            let s4 = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256::<1>(sum),
            );
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let s1 = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)));
            // packs interleave 128-bit lanes; the permute puts the 32 codes back in order.
            let w = _mm256_packs_epi16(
                _mm256_packs_epi32(c[0], c[1]),
                _mm256_packs_epi32(c[2], c[3]),
            );
            let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(self.q.as_mut_ptr().add(i * QK) as *mut __m256i, w);
            self.d[i] = d;
            self.s[i] = d * s1 as f32;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::gguf::{dequantize, TensorType};

    /// GGUF blocks of `kind` with pseudo-random scales and codes.
    pub(crate) fn random_blocks(kind: QuantKind, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.wrapping_mul(2654435761) | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        let gb = kind.gguf_block_bytes();
        let mut out = Vec::with_capacity(rows * cols / QK * gb);
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            out.extend_from_slice(&d.to_le_bytes());
            if kind == QuantKind::Q4_1 {
                let m = f16::from_f32(-0.01 * (next() % 100) as f32 / 100.0);
                out.extend_from_slice(&m.to_le_bytes());
            }
            for _ in 0..gb - kind.gguf_scale_bytes() {
                let b = next() as u8;
                // Q8_0 codes stay in −127..=127, as llama.cpp's quantizer writes them.
                out.push(if kind == QuantKind::Q8_0 && b == 0x80 {
                    0x81
                } else {
                    b
                });
            }
        }
        out
    }

    fn tensor_type(kind: QuantKind) -> TensorType {
        match kind {
            QuantKind::Q8_0 => TensorType::Q8_0,
            QuantKind::Q4_0 => TensorType::Q4_0,
            QuantKind::Q4_1 => TensorType::Q4_1,
        }
    }

    #[test]
    fn packing_round_trips_and_rows_dequantize_like_gguf() {
        for kind in [QuantKind::Q8_0, QuantKind::Q4_0, QuantKind::Q4_1] {
            for (rows, cols) in [(1, 32), (8, 64), (13, 96), (17, 32)] {
                let blocks = random_blocks(kind, rows, cols, 7);
                let m = QuantMatrix::from_gguf(kind, rows, cols, &blocks).unwrap();
                assert_eq!(m.to_gguf(), blocks, "{kind:?} {rows}x{cols}");
                let mut want = vec![0f32; rows * cols];
                dequantize(tensor_type(kind), &blocks, &mut want).unwrap();
                let mut got = vec![0f32; cols];
                for r in 0..rows {
                    m.row_f32(r, &mut got);
                    assert_eq!(got, want[r * cols..][..cols], "{kind:?} row {r}");
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let b = random_blocks(QuantKind::Q4_1, 2, 32, 1);
        assert!(QuantMatrix::from_gguf(QuantKind::Q4_1, 2, 33, &b).is_err());
        assert!(QuantMatrix::from_gguf(QuantKind::Q4_1, 3, 32, &b).is_err());
        assert!(QuantMatrix::from_gguf(QuantKind::Q4_1, 2, 0, &b).is_err());
    }

    #[test]
    fn activations_quantize_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut a = QuantActs::default();
        a.quantize(&x, 64);
        for (i, v) in x.iter().enumerate() {
            let d = a.d[i / QK];
            assert!((f32::from(a.q[i]) * d - v).abs() <= 0.5 * d + 1e-6);
        }
        let sum: i32 = a.q[..32].iter().map(|&q| i32::from(q)).sum();
        assert_eq!(a.s[0], a.d[0] * sum as f32);
        a.quantize(&[0.0; 32], 32);
        assert_eq!((a.d[0], a.s[0]), (0.0, 0.0));
    }

    /// The SIMD quantizer writes exactly the portable one's codes, in order (the packs shuffle
    /// lanes), for values at rounding ties too.
    #[test]
    fn simd_activation_codes_equal_the_portable_ones() {
        let mut x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.731)
            .collect();
        x[5] = 127.0; // block 0's max: its other codes are the values rounded, ties included
        x[6] = 2.5;
        x[7] = -3.5;
        let mut a = QuantActs::default();
        a.quantize(&x, 256);
        for (i, blk) in x.chunks_exact(QK).enumerate() {
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            assert_eq!(a.d[i], d);
            let mut sum = 0;
            for (j, v) in blk.iter().enumerate() {
                let c = (v * (1.0 / d)).round_ties_even().clamp(-127.0, 127.0) as i8;
                assert_eq!(a.q[i * QK + j], c, "block {i} elem {j}");
                sum += i32::from(c);
            }
            assert_eq!(a.s[i], d * sum as f32);
        }
        assert_eq!((a.q[6], a.q[7]), (2, -4));
    }
}
