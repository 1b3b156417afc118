//! Sampler, detokenizer and chunker hot paths: one token per iteration.
//!
//! `cargo bench --bench sampler`

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use seedance::engine::sampler::{Sampler, SamplingParams};
use seedance::model::detok::{DetokTable, Detokenizer};
use seedance::model::tokenizer::Tokenizer;
use seedance::session::chunker::Chunker;

/// Qwen2's vocabulary size.
const VOCAB: usize = 151_936;

/// Logits shaped like a model's: a few strong candidates over a broad low floor.
fn logits() -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut l: Vec<f32> = (0..VOCAB)
        .map(|_| rng.random::<f32>() * 6.0 - 8.0)
        .collect();
    for i in 0..64 {
        l[rng.random_range(0..VOCAB)] = 4.0 - i as f32 * 0.1;
    }
    l
}

fn sampler(c: &mut Criterion) {
    let base = logits();
    let mut g = c.benchmark_group("sampler_151936");
    g.throughput(Throughput::Elements(1));
    let cases = [
        ("greedy", SamplingParams::greedy()),
        (
            "temp0.8_top_p0.9",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                seed: Some(1),
                ..SamplingParams::default()
            },
        ),
        (
            "temp0.8_top_k50_top_p0.9",
            SamplingParams {
                temperature: 0.8,
                top_k: 50,
                top_p: 0.9,
                seed: Some(1),
                ..SamplingParams::default()
            },
        ),
        (
            "temp1_plain",
            SamplingParams {
                seed: Some(1),
                ..SamplingParams::default()
            },
        ),
    ];
    let mut row = base.clone();
    for (name, p) in cases {
        let mut s = Sampler::new(&p, VOCAB);
        g.bench_function(name, |b| {
            b.iter(|| {
                row.copy_from_slice(&base);
                black_box(s.sample(&mut row, &[]).token)
            })
        });
    }
    g.finish();
}

fn detok(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text");
    let text = "Streaming inference servers send tokens to clients as soon as they are sampled. 你好，世界！😀 ".repeat(20);
    let mut g = c.benchmark_group("detok");
    for kind in ["llama3", "llama2"] {
        let Ok(tok) = Tokenizer::from_dir(&root.join(kind)) else {
            continue;
        };
        let Ok(ids) = tok.encode(&text, false) else {
            continue;
        };
        let table = DetokTable::new(&tok);
        let mut d = Detokenizer::new(table);
        let mut out = String::with_capacity(text.len() * 2);
        g.throughput(Throughput::Elements(ids.len() as u64));
        g.bench_function(format!("{kind}_per_token"), |b| {
            b.iter(|| {
                d.reset();
                out.clear();
                for &id in &ids {
                    d.push(id, &mut out);
                }
                d.finish(&mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

/// `stream_mode: chunk` on the shard: each token's text into the chunker, a chunk handed out at
/// every boundary (what `session::request` does per token).
fn chunker(c: &mut Criterion) {
    let text = "Streaming inference servers send tokens to clients as soon as they are sampled, \
                and a chunk ends at a clause. 你好，世界！Then the next sentence starts; it goes on: ";
    let pieces: Vec<String> = text
        .split_inclusive(' ')
        .flat_map(|w| {
            // CJK runs arrive a character per token.
            if w.is_ascii() {
                vec![w.to_string()]
            } else {
                w.chars().map(String::from).collect()
            }
        })
        .collect();
    let mut g = c.benchmark_group("chunker");
    g.throughput(Throughput::Elements(pieces.len() as u64));
    let now = std::time::Instant::now();
    let mut ch = Chunker::default();
    g.bench_function("push_per_token", |b| {
        b.iter(|| {
            let mut out = 0usize;
            for p in &pieces {
                if ch.push(black_box(p), now) {
                    out += ch.pending.len();
                    ch.clear();
                }
            }
            ch.clear();
            black_box(out)
        })
    });
    g.finish();
}

criterion_group!(benches, sampler, detok, chunker);
criterion_main!(benches);
