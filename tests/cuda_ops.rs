//! The CUDA kernels against their CPU twins (STYLE: "the CPU backend is the reference").
//!
//! One body, [`compare_backends`], runs every `Backend` op on the CPU reference and on the
//! device under test with the same inputs and checks |got − want| <= ATOL + RTOL·|want| per
//! element. Tolerance: inputs are generated F16-representable (the CUDA path stores matmul and
//! attention inputs as F16), so the remaining differences are F32 summation order (≈ K·2⁻²⁴·Σ|terms|,
//! < 3e-4 for K = 4096 and |terms| ≤ 0.25) and the F16 rounding of F16 outputs (rmsnorm, rope,
//! swiglu, attention: relative 2⁻¹¹ ≈ 4.9e-4). ATOL = RTOL = 2e-3 covers both with margin and is
//! still ~100x below the error of a wrong index, a missed key or an unscaled row.
//!
//! Without a driver every GPU test prints why it skipped and passes; `probe()` itself is tested
//! to be an `Err`, not a panic, on such machines.

use half::f16;
use seedance::backend::cpu::CpuBackend;
use seedance::backend::cuda::{probe, CudaBackend};
use seedance::backend::{AttnSeq, AttnShape, Backend, RopeFreqs, Weight};

const ATOL: f32 = 2e-3;
const RTOL: f32 = 2e-3;

fn gpu() -> Option<CudaBackend> {
    if let Err(e) = probe() {
        eprintln!("skipped: {e}");
        return None;
    }
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => panic!("a device answers but the CUDA backend failed to start: {e}"),
    }
}

/// Inputs are fixed by default; `SEEDANCE_CHECK_SEED=<n>` draws fresh ones (perf/cuda_check.sh).
fn seed_base() -> u64 {
    std::env::var("SEEDANCE_CHECK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Uniform values in [-scale, scale], rounded to F16-representable F32.
fn rand_h(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let seed = seed ^ seed_base().wrapping_mul(0xD6E8_FEB8_6659_FD93);
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            f16::from_f32((2.0 * u - 1.0) * scale).to_f32()
        })
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{i}]: {g} (output not written?)");
        let err = (g - w).abs();
        assert!(
            err <= ATOL + RTOL * w.abs(),
            "{what}[{i}]: got {g}, want {w} (|err| {err} > {ATOL} + {RTOL}·|want|)"
        );
        worst = worst.max(err);
    }
    eprintln!("{what}: max |err| {worst:.2e} over {} elements", got.len());
}

fn weight(rows: usize, cols: usize, seed: u64) -> Weight {
    let data = rand_h(rows * cols, seed, 0.5)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    Weight::new(rows, cols, data)
}

/// Runs every op on `dut` and on the CPU reference.
fn compare_backends(dut: &dyn Backend, cpu: &dyn Backend) {
    // matmul: GEMV sizes (1..8 rows, split-K for narrow outputs) and GEMM sizes (edges of tiles).
    for &(n, rows, cols) in &[
        (1, 2048, 2048),
        (3, 512, 4096),
        (8, 3072, 2048),
        (1, 896, 896),
        (9, 640, 224),
        (64, 4608, 3584),
        (130, 200, 96),
    ] {
        let w = weight(rows, cols, (n * rows + cols) as u64);
        let x = rand_h(n * cols, 7, 1.0);
        let (mut y0, mut y1) = (vec![0f32; n * rows], vec![0f32; n * rows]);
        cpu.matmul(&x, &w, &mut y0);
        dut.matmul(&x, &w, &mut y1);
        assert_close(&format!("matmul n={n} {rows}x{cols}"), &y1, &y0);
    }
    // rmsnorm
    for &(n, dim) in &[(1, 2048), (5, 896), (3, 3584)] {
        let x = rand_h(n * dim, 3, 2.0);
        let wt = rand_h(dim, 4, 1.5);
        let (mut o0, mut o1) = (vec![0f32; n * dim], vec![0f32; n * dim]);
        cpu.rmsnorm(&x, &wt, 1e-5, &mut o0);
        dut.rmsnorm(&x, &wt, 1e-5, &mut o1);
        assert_close(&format!("rmsnorm {n}x{dim}"), &o1, &o0);
    }
    // rope: full and partial rotary, positions up to 128k (llama3 tables are just inv_freq).
    for &(heads, hd, rot) in &[(8, 128, 128), (4, 64, 64), (3, 96, 48)] {
        let inv_freq: Vec<f32> = (0..rot / 2)
            .map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / rot as f32))
            .collect();
        let f = RopeFreqs {
            inv_freq,
            rotary_dim: rot,
            attention_scaling: 1.0,
        };
        let positions = [0u32, 1, 17, 4095, 131071];
        let x = rand_h(positions.len() * heads * hd, 5, 1.0);
        let (mut a, mut b) = (x.clone(), x);
        cpu.rope(&mut a, &positions, heads, hd, &f);
        dut.rope(&mut b, &positions, heads, hd, &f);
        assert_close(&format!("rope h={heads} hd={hd} rot={rot}"), &b, &a);
    }
    // silu_mul
    let (n, inter) = (4, 8192);
    let gu = rand_h(n * 2 * inter, 6, 4.0);
    let (mut o0, mut o1) = (vec![0f32; n * inter], vec![0f32; n * inter]);
    cpu.silu_mul(&gu, inter, &mut o0);
    dut.silu_mul(&gu, inter, &mut o1);
    assert_close("silu_mul", &o1, &o0);
    // attention: decode (one row per sequence; long contexts use split-KV) and chunked prefill.
    for &(heads, kv_heads, hd, window) in &[
        (32, 8, 64, None),
        (28, 4, 128, None),
        (8, 8, 128, None),
        (16, 2, 64, Some(100)),
    ] {
        attention_case(dut, cpu, heads, kv_heads, hd, window);
    }
}

fn attention_case(
    dut: &dyn Backend,
    cpu: &dyn Backend,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    window: Option<usize>,
) {
    let bs = 16;
    let num_blocks = 300;
    let cache_len = num_blocks * kv_heads * bs * hd;
    let kc: Vec<f16> = rand_h(cache_len, 11, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let vc: Vec<f16> = rand_h(cache_len, 12, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    // Block tables: a scrambled permutation, so position order != block id order.
    let perm: Vec<u32> = (0..num_blocks as u32)
        .map(|i| (i * 7 + 3) % num_blocks as u32)
        .collect();
    let shape = AttnShape {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hd,
        block_size: bs,
        scale: 1.0 / (hd as f32).sqrt(),
        sliding_window: window,
    };
    // (start_pos, len): decode batch with contexts 1 .. 1300 (1300 > 2 splits of 512).
    let decode = [(0usize, 1usize), (40, 1), (511, 1), (1299, 1)];
    let prefill = [(0usize, 37usize), (96, 20), (5, 1)];
    for (name, spec) in [("decode", &decode[..]), ("prefill", &prefill[..])] {
        let mut seqs = Vec::new();
        let (mut row, mut next_block) = (0, 0);
        let mut tables = Vec::new();
        for &(start, len) in spec {
            let nb = (start + len).div_ceil(bs);
            tables.push(perm[next_block..next_block + nb].to_vec());
            next_block += nb;
            seqs.push((row, len, start));
            row += len;
        }
        let attn: Vec<AttnSeq<'_>> = seqs
            .iter()
            .zip(&tables)
            .map(|(&(row, len, start_pos), blocks)| AttnSeq {
                row,
                len,
                start_pos,
                blocks,
            })
            .collect();
        let q = rand_h(row * heads * hd, 13, 1.0);
        let (mut o0, mut o1) = (vec![0f32; q.len()], vec![0f32; q.len()]);
        cpu.attention(&q, &kc, &vc, &attn, &shape, &mut o0);
        dut.attention(&q, &kc, &vc, &attn, &shape, &mut o1);
        assert_close(
            &format!("attention {name} h={heads} kv={kv_heads} hd={hd} window={window:?}"),
            &o1,
            &o0,
        );
    }
}

#[test]
fn probe_without_a_driver_is_an_error_not_a_panic() {
    // Passes on both kinds of machine; the point is that it returns.
    match probe() {
        Ok(d) => eprintln!("CUDA device: {} ({})", d.name, d.arch()),
        Err(e) => eprintln!("no CUDA device: {e}"),
    }
}

#[test]
fn cpu_reference_agrees_with_itself() {
    // The comparison body is exercised on every machine: CPU against CPU (1 vs 2 threads).
    compare_backends(&CpuBackend::new(2), &CpuBackend::new(1));
}

#[test]
fn cuda_ops_match_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    compare_backends(&gpu, &CpuBackend::new(0));
}

#[test]
fn cuda_embedding_argmax_and_sampling() {
    let Some(gpu) = gpu() else { return };
    gpu.with_ops(|ops| {
        let s = ops.stream.clone();
        // embedding: out-of-range ids give zero rows.
        let (vocab, hidden) = (1000, 256);
        let table: Vec<f16> = rand_h(vocab * hidden, 21, 1.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let toks = [0u32, 999, 5, 1000];
        let td = s.clone_htod(&table).unwrap();
        let kd = s.clone_htod(&toks).unwrap();
        let mut od = s.clone_htod(&vec![f32::NAN; toks.len() * hidden]).unwrap();
        ops.embedding(&kd, &td, vocab, hidden, &mut od).unwrap();
        let got = s.clone_dtoh(&od).unwrap();
        for (r, &t) in toks.iter().enumerate() {
            for c in 0..hidden {
                let want = if (t as usize) < vocab {
                    table[t as usize * hidden + c].to_f32()
                } else {
                    0.0
                };
                assert_eq!(got[r * hidden + c], want, "embedding row {r} col {c}");
            }
        }
        // argmax and sampling on a 150k vocabulary.
        let vocab = 151_936;
        let rows = 4;
        let mut logits = rand_h(rows * vocab, 22, 3.0);
        let peaks = [7usize, 151_935, 80_000, 123];
        for (r, &p) in peaks.iter().enumerate() {
            logits[r * vocab + p] = 20.0;
        }
        let ld = s.clone_htod(&logits).unwrap();
        let mut out = s.clone_htod(&vec![u32::MAX; rows]).unwrap();
        ops.argmax(&ld, vocab, &mut out).unwrap();
        let am = s.clone_dtoh(&out).unwrap();
        assert_eq!(am, peaks.iter().map(|&p| p as u32).collect::<Vec<_>>());
        // top_k = 1 is the argmax whatever the seed; same seed + step -> same token.
        let temp = s.clone_htod(&[0.7f32; 4]).unwrap();
        let topp = s.clone_htod(&[0.9f32; 4]).unwrap();
        let step = s.clone_htod(&[0u32, 1, 2, 3]).unwrap();
        let seed = s.clone_htod(&[42u64, 43, 44, 45]).unwrap();
        let k1 = s.clone_htod(&[1u32; 4]).unwrap();
        ops.sample(&ld, vocab, &temp, &k1, &topp, &seed, &step, &mut out)
            .unwrap();
        assert_eq!(s.clone_dtoh(&out).unwrap(), am);
        let k50 = s.clone_htod(&[50u32; 4]).unwrap();
        let flat = rand_h(rows * vocab, 23, 1.0);
        let fd = s.clone_htod(&flat).unwrap();
        ops.sample(&fd, vocab, &temp, &k50, &topp, &seed, &step, &mut out)
            .unwrap();
        let a = s.clone_dtoh(&out).unwrap();
        ops.sample(&fd, vocab, &temp, &k50, &topp, &seed, &step, &mut out)
            .unwrap();
        assert_eq!(a, s.clone_dtoh(&out).unwrap(), "same seed, same tokens");
        for (r, &t) in a.iter().enumerate() {
            // The sampled token must be among the row's 50 largest logits.
            let row = &flat[r * vocab..(r + 1) * vocab];
            let above = row.iter().filter(|&&v| v > row[t as usize]).count();
            assert!(above < 50, "row {r}: token {t} has {above} larger logits");
        }
    });
}
