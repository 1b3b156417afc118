//! The CPU backend: the numerical reference and the fallback device. FP16 weights (or GGUF
//! quantized ones, multiplied in integers), FP32 math, SIMD matmul on a private rayon pool of a configurable size.

pub mod attention;
pub mod matmul;
pub mod ops;
pub mod qmatmul;

use super::{AttnSeq, AttnShape, Backend, RopeFreqs, Weight};
use half::f16;
pub use matmul::Isa;

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    isa: Isa,
}

impl CpuBackend {
    /// `threads` = 0 means one per available core.
    pub fn new(threads: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("seedance-cpu-{i}"))
            .build()
            .unwrap_or_else(|_| {
                // Building a pool only fails when threads cannot be spawned at all; fall back to
                // running on the caller's thread rather than failing the model load.
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .use_current_thread()
                    .build()
                    .unwrap_or_else(|e| panic!("rayon: {e}"))
            });
        Self {
            pool,
            threads,
            isa: Isa::detect(),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Forces an instruction set (tests compare the SIMD kernels with the portable one).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }
}

impl CpuBackend {
    /// Runs an op on the pool (inline when called from a pool thread, as inside
    /// [`Backend::scope`]), or inline with one thread: handing each op to a lone pool thread
    /// would cost two context switches per op (hundreds per decoded token).
    fn run(&self, op: impl FnOnce() + Send) {
        if self.threads <= 1 {
            op()
        } else {
            self.pool.install(op)
        }
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
        self.run(f)
    }

    fn matmul(&self, x: &[f32], w: &Weight, y: &mut [f32]) {
        self.run(|| matmul::matmul(self.isa, self.threads, x, w, y));
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
        self.run(|| {
            attention::attention(
                self.isa,
                self.threads,
                q,
                k_cache,
                v_cache,
                seqs,
                shape,
                out,
            )
        });
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
            let isas = match Isa::detect() {
                Isa::Portable => vec![Isa::Portable],
                Isa::Avx2 => vec![Isa::Avx2, Isa::Portable],
                Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Portable],
            };
            for isa in isas {
                for threads in [1, 2] {
                    let be = CpuBackend::new(threads).with_isa(isa);
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
                                "{isa:?} {rows}x{cols} n={n} t={t} r={r}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
