//! Quantized GGUF weights kept quantized against the same weights dequantized to F16.
//!
//! On the real default model (`SEEDANCE_TEST_GGUF`, set by scripts/test.sh to the SmolLM2
//! Q4_1 file its deps stage fetched): the integer kernels quantize activations to 8 bits per
//! block of 32 (relative rounding ≤ 1/254 per element), which the F16 path does not, so logits
//! move a little. Bounds: per prompt, the RMS of the logit difference ≤ 3 % of the RMS of the
//! logits, and the argmax agrees wherever the F16 path's top1 − top2 margin exceeds NEAR_TIE.

use seedance::backend::cpu::CpuBackend;
use seedance::engine::kv::{BlockAllocator, BlockTable, KvCache};
use seedance::model::transformer::{Logits, Scratch, SeqInput, Transformer};

const BLOCK: usize = 16;
const NEAR_TIE: f32 = 0.5;
const REL_RMS: f64 = 0.03;

fn logits(model: &Transformer, tokens: &[u32]) -> Vec<f32> {
    let mut kv = KvCache::new(model.kv_config(64, BLOCK));
    let mut alloc = BlockAllocator::new(64);
    let mut scratch = Scratch::default();
    let mut table = BlockTable::new();
    table.reserve(&mut alloc, tokens.len(), BLOCK).unwrap();
    let seq = SeqInput {
        tokens,
        start_pos: 0,
        blocks: &table,
        logits: Logits::All,
    };
    model
        .forward(&[seq], &mut kv, &mut scratch)
        .unwrap()
        .to_vec()
}

fn top2(row: &[f32]) -> (usize, f32) {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    (idx[0], row[idx[0]] - row[idx[1]])
}

#[test]
fn quantized_kernels_track_the_dequantized_model() {
    let Some(path) = std::env::var_os("SEEDANCE_TEST_GGUF") else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    let q = Transformer::load_gguf(&path, Box::new(CpuBackend::new(2)), false).unwrap();
    let f = Transformer::load_gguf(&path, Box::new(CpuBackend::new(2)), true).unwrap();
    assert!(q.has_quantized_weights(), "{}", q.weight_formats());
    assert!(!f.has_quantized_weights(), "{}", f.weight_formats());
    let vocab = q.config().vocab_size;
    let prompts: [&[u32]; 3] = [
        &[504, 3575, 282, 4649, 314],
        &[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365],
        &[
            28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47,
        ],
    ];
    for toks in prompts {
        let (lq, lf) = (logits(&q, toks), logits(&f, toks));
        for pos in 0..toks.len() {
            let (a, b) = (&lq[pos * vocab..][..vocab], &lf[pos * vocab..][..vocab]);
            let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            let mag: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
            let rel = (diff / mag).sqrt();
            let (top_f, margin) = top2(b);
            let (top_q, _) = top2(a);
            eprintln!("pos {pos}: rel rms {rel:.4}, top {top_f}/{top_q}, margin {margin:.3}");
            if std::env::var_os("NOASSERT").is_none() {
                assert!(rel <= REL_RMS, "{toks:?} pos {pos}: relative RMS {rel}");
            }
            if margin > NEAR_TIE {
                assert_eq!(top_q, top_f, "{toks:?} pos {pos}: margin {margin}");
            }
        }
    }
}
