//! CPU model benchmarks: matmul bandwidth, one decode step and a 512-token prefill on
//! `synthetic:qwen2.5-0.5b` (more shapes with SEEDANCE_BENCH_SHAPES), and the machine's read
//! bandwidth for context.
//!
//! `cargo bench --bench model` (SEEDANCE_BENCH_THREADS sets the thread count, default 2).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use rayon::prelude::*;
use seedance::backend::cpu::CpuBackend;
use seedance::backend::{Backend, Weight};
use seedance::engine::kv::{BlockAllocator, BlockTable, KvCache};
use seedance::model::synthetic;
use seedance::model::transformer::{Logits, Scratch, SeqInput};
use std::hint::black_box;
use std::time::Duration;

fn threads() -> usize {
    std::env::var("SEEDANCE_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
}

fn read_bandwidth(c: &mut Criterion) {
    let n: usize = 1 << 30; // bytes
    let data: Vec<u64> = (0..n as u64 / 8).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads())
        .build()
        .unwrap();
    let mut g = c.benchmark_group("read_bandwidth");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes(n as u64));
    g.bench_function(format!("xor_1GiB_{}threads", threads()), |b| {
        b.iter(|| {
            pool.install(|| {
                data.par_chunks(1 << 17)
                    .map(xor_reduce)
                    .reduce(|| 0, |a, b| a ^ b)
            })
        })
    });
    g.finish();
}

/// XOR-reduce: associative integer ops, so the loop vectorises freely and is bound by memory.
fn xor_reduce(c: &[u64]) -> u64 {
    c.iter().fold(0, |a, &b| a ^ b)
}

fn matmul(c: &mut Criterion) {
    let be = CpuBackend::new(threads());
    let mut g = c.benchmark_group("matmul_f16");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    // qwen2.5-0.5b: MLP up (cache-resident), MLP down, fused gate|up and the LM head (DRAM).
    for (rows, cols) in [
        (4864usize, 896usize),
        (896, 4864),
        (9728, 896),
        (151_936, 896),
    ] {
        let w = Weight::new(
            rows,
            cols,
            (0..rows * cols)
                .map(|i| f16::from_f32(((i % 17) as f32 - 8.0) * 1e-3))
                .collect(),
        );
        for n in [1usize, 8] {
            let x = vec![0.5f32; n * cols];
            let mut y = vec![0f32; n * rows];
            g.throughput(Throughput::Bytes(w.bytes() as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("{rows}x{cols}"), format!("{n}tok")),
                &n,
                |b, _| b.iter(|| be.matmul(black_box(&x), &w, &mut y)),
            );
        }
    }
    g.finish();
}

/// Decode and prefill on each shape in SEEDANCE_BENCH_SHAPES (comma-separated; default
/// `qwen2.5-0.5b`; e.g. `qwen2.5-0.5b,llama3.2-1b`).
fn shapes(c: &mut Criterion) {
    let list = std::env::var("SEEDANCE_BENCH_SHAPES").unwrap_or_else(|_| "qwen2.5-0.5b".into());
    for shape in list.split(',').filter(|s| !s.is_empty()) {
        shape_bench(c, shape);
    }
}

fn shape_bench(c: &mut Criterion, shape: &str) {
    let backend = Box::new(CpuBackend::new(threads()));
    let syn = synthetic::build(&format!("synthetic:{shape}"), 1, backend).unwrap();
    let m = syn.model;
    let mut g = c.benchmark_group(shape);
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let blocks = 128;
    let mut kv = KvCache::new(m.kv_config(blocks, 16));
    let mut alloc = BlockAllocator::new(blocks);
    let mut s = Scratch::default();
    // Decode at batch 1 and 8, each sequence with a 128-token context.
    for batch in [1usize, 8] {
        let mut tables: Vec<BlockTable> = (0..batch).map(|_| BlockTable::new()).collect();
        for t in &mut tables {
            t.reserve(&mut alloc, 129, 16).unwrap();
        }
        let toks = [42u32];
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("decode_step_batch{batch}_ctx128"), |b| {
            b.iter(|| {
                let seqs: Vec<SeqInput> = tables
                    .iter()
                    .map(|t| SeqInput {
                        tokens: &toks,
                        start_pos: 128,
                        blocks: t,
                        logits: Logits::Last,
                    })
                    .collect();
                black_box(m.forward(&seqs, &mut kv, &mut s).unwrap().len())
            })
        });
        for t in &mut tables {
            t.release(&mut alloc);
        }
    }
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 7) % 800).collect();
    let mut t = BlockTable::new();
    t.reserve(&mut alloc, 512, 16).unwrap();
    g.throughput(Throughput::Elements(512));
    g.sample_size(10).measurement_time(Duration::from_secs(30));
    g.bench_function("prefill_512", |b| {
        b.iter(|| {
            let seq = SeqInput {
                tokens: &prompt,
                start_pos: 0,
                blocks: &t,
                logits: Logits::Last,
            };
            black_box(m.forward(&[seq], &mut kv, &mut s).unwrap().len())
        })
    });
    g.finish();
}

criterion_group!(benches, read_bandwidth, matmul, shapes);
criterion_main!(benches);
