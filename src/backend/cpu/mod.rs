//! The CPU backend: the numerical reference and the fallback device. FP16 weights (or GGUF
//! quantized ones, multiplied in integers), FP32 math, SIMD matmul on a private
//! team of threads of a configurable size ([`team`]), tiled as the start-up autotune chose ([`tune`]).

pub mod attention;
pub mod matmul;
pub mod ops;
pub mod qmatmul;
pub mod team;
pub mod tune;

use super::{AttnSeq, AttnShape, Backend, RopeFreqs, Weight};
use half::f16;
pub use matmul::{F16Kernel, Isa};

pub struct CpuBackend {
    team: team::Team,
    isa: Isa,
    /// The F16 kernels' tiling, tuned at start-up for this CPU ([`tune`]).
    f16: F16Kernel,
}

impl CpuBackend {
    /// `threads` = 0 means one per available core.
    pub fn new(threads: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let team = team::Team::new(threads);
        let isa = Isa::detect();
        let f16 = tune::f16_kernel(isa, &team);
        Self { team, isa, f16 }
    }

    pub fn threads(&self) -> usize {
        self.team.threads()
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn f16_kernel(&self) -> F16Kernel {
        self.f16
    }

    /// Forces an instruction set (tests compare the SIMD kernels with the portable one), with
    /// its default F16 tiling.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self.f16 = F16Kernel::default_for(isa);
        self
    }

    /// Forces an F16 tiling (tests run every candidate the autotune may pick).
    pub fn with_f16_kernel(mut self, k: F16Kernel) -> Self {
        self.f16 = k;
        self
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn scope(&self, f: &mut (dyn FnMut() + Send)) {
        // Ops run on the calling thread, which leads the team in every parallel loop.
        f()
    }

    fn matmul(&self, x: &[f32], w: &Weight, y: &mut [f32]) {
        matmul::matmul(self.isa, self.f16, &self.team, x, w, y);
    }

    fn rmsnorm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        ops::rmsnorm(x, weight, eps, out);
    }

    fn rope(
        &self,
        x: &mut [f32],
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        freqs: &RopeFreqs,
    ) {
        ops::rope(x, positions, heads, head_dim, freqs);
    }

    fn silu_mul(&self, gate_up: &[f32], inter: usize, out: &mut [f32]) {
        ops::silu_mul(gate_up, inter, out);
    }

    fn attention(
        &self,
        q: &[f32],
        k_cache: &[f16],
        v_cache: &[f16],
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut [f32],
    ) {
        attention::attention(self.isa, &self.team, q, k_cache, v_cache, seqs, shape, out);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Pseudo-random values in [-0.5, 0.5) (xorshift), for the kernel tests.
    pub(crate) fn rand_vec(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    /// Every F16 tiling the autotune may choose on this machine, and the portable one.
    fn every_f16_kernel() -> Vec<F16Kernel> {
        let mut v = vec![F16Kernel::default_for(Isa::Portable)];
        let isa = Isa::detect();
        if isa.rank() >= Isa::Avx2.rank() {
            for p in 1..=8 {
                v.push(F16Kernel {
                    decode_panels: p,
                    ..F16Kernel::default_for(Isa::Avx2)
                });
            }
        }
        if isa == Isa::Avx512 {
            for p in 1..=8 {
                for s in [(2, 8), (3, 8), (4, 4), (1, 8)] {
                    for l in [(2, 12), (3, 8), (4, 6)] {
                        v.push(F16Kernel {
                            isa,
                            decode_panels: p,
                            small: s,
                            large: l,
                        });
                    }
                }
            }
        }
        assert!(v.iter().all(F16Kernel::is_supported));
        v
    }

    /// Every tiling gives bit-identical results: each output sums over k in the same order.
    #[test]
    fn every_f16_tiling_gives_the_same_bits() {
        let (rows, cols) = (200, 96);
        let w: Vec<f16> = rand_vec(rows * cols, 3)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let wt = Weight::new(rows, cols, w);
        for n in [1, 3, 8, 13, 40] {
            let x = rand_vec(n * cols, 4);
            let mut first: Option<Vec<f32>> = None;
            for k in every_f16_kernel()
                .into_iter()
                .filter(|k| k.isa != Isa::Portable)
            {
                let be = CpuBackend::new(2).with_isa(k.isa).with_f16_kernel(k);
                let mut y = vec![0f32; n * rows];
                be.matmul(&x, &wt, &mut y);
                match &first {
                    None => first = Some(y),
                    Some(f) => assert!(f == &y, "{k:?} n={n} differs from the first tiling"),
                }
            }
        }
    }

    #[test]
    fn simd_matmul_matches_f64_reference() {
        for &(rows, cols, n) in &[
            (7, 40, 1),
            (13, 67, 3),
            (64, 64, 9),
            (33, 896, 5),
            (8, 16, 70),
        ] {
            let w: Vec<f16> = rand_vec(rows * cols, 1)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            let x = rand_vec(n * cols, 2);
            let wt = Weight::new(rows, cols, w.clone());
            assert_eq!(wt.to_row_major(), w);
            for k in every_f16_kernel() {
                for threads in [1, 2] {
                    let be = CpuBackend::new(threads).with_isa(k.isa).with_f16_kernel(k);
                    let mut y = vec![0f32; n * rows];
                    be.matmul(&x, &wt, &mut y);
                    for t in 0..n {
                        for r in 0..rows {
                            let want: f64 = (0..cols)
                                .map(|i| w[r * cols + i].to_f64() * x[t * cols + i] as f64)
                                .sum();
                            let got = y[t * rows + r] as f64;
                            assert!(
                                (got - want).abs() < 1e-4 + 1e-4 * want.abs(),
                                "{k:?} {rows}x{cols} n={n} t={t} r={r}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
