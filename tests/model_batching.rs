//! The batched, chunked and paged paths compute the same function as one whole-prompt forward.
//!
//! All comparisons are between two runs of our own code whose only difference is how work is
//! split; the KV cache stores the same F16-rounded K/V either way, so results agree to FP32
//! summation-order noise. Tolerance: 1e-4 + 1e-4·|ref| (logits are O(1–5)).

use seedance::backend::cpu::CpuBackend;
use seedance::engine::kv::{BlockAllocator, BlockTable, KvCache};
use seedance::model::transformer::{Logits, Scratch, SeqInput, Transformer};
use seedance::model::ModelError;
use std::path::PathBuf;

const BLOCK: usize = 16;

fn fixture(name: &str) -> Transformer {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name);
    Transformer::load(&d, Box::new(CpuBackend::new(2))).unwrap_or_else(|e| panic!("{e}"))
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 + 1e-4 * y.abs(),
            "{what}: [{i}] {x} vs {y}"
        );
    }
}

fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    [37usize, 5, 20, 1]
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((i * 31 + s * 7 + 3) as u32) % vocab)
                .collect()
        })
        .collect()
}

/// Whole-prompt forward of one sequence on a fresh cache: (len, vocab) logits.
fn whole(m: &Transformer, toks: &[u32]) -> Vec<f32> {
    let mut kv = KvCache::new(m.kv_config(32, BLOCK));
    let mut a = BlockAllocator::new(32);
    let mut t = BlockTable::new();
    t.reserve(&mut a, toks.len(), BLOCK).unwrap();
    let mut s = Scratch::default();
    let seq = SeqInput {
        tokens: toks,
        start_pos: 0,
        blocks: &t,
        logits: Logits::All,
    };
    m.forward(&[seq], &mut kv, &mut s).unwrap().to_vec()
}

#[test]
fn batched_prefill_equals_sequential() {
    for name in ["llama3-rope", "qwen2", "phi3-partial"] {
        let m = fixture(name);
        let v = m.config().vocab_size;
        let ps = prompts(v as u32);
        let mut kv = KvCache::new(m.kv_config(64, BLOCK));
        let mut a = BlockAllocator::new(64);
        // Interleave block ids between sequences so tables are not contiguous.
        let mut tables: Vec<BlockTable> = ps.iter().map(|_| BlockTable::new()).collect();
        for step in 1..=3 {
            for (t, p) in tables.iter_mut().zip(&ps) {
                t.reserve(&mut a, (p.len() * step).div_ceil(3), BLOCK)
                    .unwrap();
            }
        }
        let seqs: Vec<SeqInput> = ps
            .iter()
            .zip(&tables)
            .map(|(p, t)| SeqInput {
                tokens: p,
                start_pos: 0,
                blocks: t,
                logits: Logits::Last,
            })
            .collect();
        let mut s = Scratch::default();
        let got = m.forward(&seqs, &mut kv, &mut s).unwrap().to_vec();
        for (i, p) in ps.iter().enumerate() {
            let want = whole(&m, p);
            close(
                &got[i * v..(i + 1) * v],
                &want[(p.len() - 1) * v..],
                &format!("{name} seq {i}"),
            );
        }
    }
}

#[test]
fn chunked_prefill_equals_whole_and_decode_over_paged_kv_equals_prefill() {
    for name in ["llama", "mistral-swa", "qwen2-bf16"] {
        let m = fixture(name);
        let v = m.config().vocab_size;
        let toks: Vec<u32> = (0..45).map(|i| (i * 13 + 5) % v as u32).collect();
        let want = whole(&m, &toks);
        // Chunks of 7, 16, 1, 21 tokens (crossing block boundaries), then decode the rest.
        let mut kv = KvCache::new(m.kv_config(16, BLOCK));
        let mut a = BlockAllocator::new(16);
        let mut t = BlockTable::new();
        let mut s = Scratch::default();
        let mut pos = 0;
        for len in [7usize, 16, 1, 11, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1] {
            t.reserve(&mut a, pos + len, BLOCK).unwrap();
            let seq = SeqInput {
                tokens: &toks[pos..pos + len],
                start_pos: pos,
                blocks: &t,
                logits: Logits::All,
            };
            let got = m.forward(&[seq], &mut kv, &mut s).unwrap();
            close(
                got,
                &want[pos * v..(pos + len) * v],
                &format!("{name} chunk at {pos}"),
            );
            pos += len;
        }
        assert_eq!(pos, toks.len());
        t.release(&mut a);
        assert_eq!(a.num_free(), 16);
    }
}

#[test]
fn mixed_prefill_and_decode_batch() {
    let m = fixture("llama-v5");
    let v = m.config().vocab_size;
    let a_toks: Vec<u32> = (0..30).map(|i| (i * 5 + 1) % v as u32).collect();
    let b_toks: Vec<u32> = (0..18).map(|i| (i * 11 + 2) % v as u32).collect();
    let (wa, wb) = (whole(&m, &a_toks), whole(&m, &b_toks));
    let mut kv = KvCache::new(m.kv_config(16, BLOCK));
    let mut al = BlockAllocator::new(16);
    let (mut ta, mut tb) = (BlockTable::new(), BlockTable::new());
    let mut s = Scratch::default();
    ta.reserve(&mut al, 29, BLOCK).unwrap();
    let seq = SeqInput {
        tokens: &a_toks[..29],
        start_pos: 0,
        blocks: &ta,
        logits: Logits::None,
    };
    assert!(m.forward(&[seq], &mut kv, &mut s).unwrap().is_empty());
    // One step: A decodes its 30th token while B prefills all 18.
    ta.reserve(&mut al, 30, BLOCK).unwrap();
    tb.reserve(&mut al, 18, BLOCK).unwrap();
    let seqs = [
        SeqInput {
            tokens: &a_toks[29..],
            start_pos: 29,
            blocks: &ta,
            logits: Logits::Last,
        },
        SeqInput {
            tokens: &b_toks,
            start_pos: 0,
            blocks: &tb,
            logits: Logits::Last,
        },
    ];
    let got = m.forward(&seqs, &mut kv, &mut s).unwrap();
    close(&got[..v], &wa[29 * v..], "decode row");
    close(&got[v..], &wb[17 * v..], "prefill row");
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let m = fixture("llama");
    let mut kv = KvCache::new(m.kv_config(4, BLOCK));
    let mut s = Scratch::default();
    let t = BlockTable::new();
    let seq = SeqInput {
        tokens: &[1, 2],
        start_pos: 0,
        blocks: &t,
        logits: Logits::Last,
    };
    assert!(matches!(
        m.forward(&[seq], &mut kv, &mut s),
        Err(ModelError::Forward(_))
    ));
    let mut a = BlockAllocator::new(4);
    let mut t = BlockTable::new();
    t.reserve(&mut a, 2, BLOCK).unwrap();
    let seq = SeqInput {
        tokens: &[1, 100_000],
        start_pos: 0,
        blocks: &t,
        logits: Logits::Last,
    };
    let e = m.forward(&[seq], &mut kv, &mut s).unwrap_err().to_string();
    assert!(e.contains("100000"), "{e}");
}
