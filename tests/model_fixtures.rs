//! Logits and greedy continuations of every reference checkpoint against transformers.
//!
//! Fixtures: `tests/fixtures/models/<name>/`, made by `scripts/fixtures/make_model_fixtures.py`
//! (transformers, float32 forward, eager attention). Weights there are exactly F16-representable,
//! so our F16 weight storage loses nothing; what differs is activation rounding, dominated by the
//! KV cache being stored in F16 (relative error ≤ 2⁻¹¹ per K/V element). These random tiny models
//! have large attention scores (init std 0.15), which amplify that rounding: running transformers
//! itself with k_proj/v_proj outputs rounded to F16 (forward hooks) moves its logits by up to
//! 4.2e-3 (|logits| ≤ 5) on these fixtures. FP32 summation-order differences (SIMD lanes, online
//! softmax) are ~1e-6 and negligible. So
//!
//!     |ours − ref| ≤ ATOL + RTOL·|ref|,  ATOL = 1e-2, RTOL = 2e-3
//!
//! gives ~2.5× headroom over that measured effect while any real bug (a wrong RoPE pair, a
//! missing bias or norm, a wrong GQA head mapping) moves logits by 1e-1 or more. Greedy tokens are
//! compared teacher-forced (each step fed the reference's token) at every step whose reference
//! top1−top2 margin is at least NEAR_TIE = 1e-2 (twice the largest measured per-logit shift, since
//! top1 and top2 may move in opposite directions): at a near-tie either choice is correct.

use seedance::backend::cpu::CpuBackend;
use seedance::engine::kv::{BlockAllocator, BlockTable, KvCache};
use seedance::model::transformer::{rope_freqs, Logits, Scratch, SeqInput, Transformer};
use serde_json::Value;
use std::path::PathBuf;

const ATOL: f32 = 1e-2;
const RTOL: f32 = 2e-3;
const NEAR_TIE: f32 = 1e-2;
const BLOCK: usize = 16;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_fixture(name: &str) {
    let model = Transformer::load(&dir(name), Box::new(CpuBackend::new(2)))
        .unwrap_or_else(|e| panic!("{e}"));
    check_model(name, &model);
}

/// One comparison: the reference's logits (`prompts` key) and greedy continuations (`greedy`)
/// within |ours − ref| ≤ atol + rtol·|ref|, greedy steps compared up to the first reference
/// margin below near_tie.
struct Tol {
    atol: f32,
    rtol: f32,
    near_tie: f32,
    prompts: &'static str,
    /// None: logits only.
    greedy: Option<&'static str>,
}

const F16_TOL: Tol = Tol {
    atol: ATOL,
    rtol: RTOL,
    near_tie: NEAR_TIE,
    prompts: "prompts",
    greedy: Some("greedy"),
};

fn check_model(name: &str, model: &Transformer) {
    check_against(name, model, &dir(name).join("expected.json"), &F16_TOL);
}

fn check_against(name: &str, model: &Transformer, expected: &std::path::Path, tol: &Tol) {
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(expected).unwrap()).unwrap();
    let vocab = model.config().vocab_size;
    let mut kv = KvCache::new(model.kv_config(64, BLOCK));
    let mut alloc = BlockAllocator::new(64);
    let mut scratch = Scratch::default();
    let mut worst = 0f32;
    for p in exp[tol.prompts].as_array().unwrap() {
        let toks = ids(&p["ids"]);
        let mut table = BlockTable::new();
        table.reserve(&mut alloc, toks.len(), BLOCK).unwrap();
        let seq = SeqInput {
            tokens: &toks,
            start_pos: 0,
            blocks: &table,
            logits: Logits::All,
        };
        let logits = model.forward(&[seq], &mut kv, &mut scratch).unwrap();
        for (pos, want) in ids(&p["positions"])
            .iter()
            .zip(p["logits"].as_array().unwrap())
        {
            let got = &logits[*pos as usize * vocab..][..vocab];
            for (i, w) in want.as_array().unwrap().iter().enumerate() {
                let w = w.as_f64().unwrap() as f32;
                let err = (got[i] - w).abs();
                worst = worst.max(err / (tol.atol + tol.rtol * w.abs()));
                assert!(
                    err <= tol.atol + tol.rtol * w.abs(),
                    "{name}: prompt {:?} pos {pos} id {i}: {} vs {w}",
                    p["text"],
                    got[i]
                );
            }
        }
        table.release(&mut alloc);
    }
    let (mut compared, mut near_ties) = (0, 0);
    let Some(greedy) = tol.greedy else {
        eprintln!("{name}: worst error = {worst:.3} of the tolerance (logits only)");
        return;
    };
    for g in exp[greedy].as_array().unwrap() {
        let prompt = ids(&g["prompt_ids"]);
        let want = ids(&g["generated"]);
        let margins: Vec<f32> = g["margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap() as f32)
            .collect();
        let mut table = BlockTable::new();
        table
            .reserve(&mut alloc, prompt.len() + want.len(), BLOCK)
            .unwrap();
        let mut last = {
            let seq = SeqInput {
                tokens: &prompt,
                start_pos: 0,
                blocks: &table,
                logits: Logits::Last,
            };
            argmax(model.forward(&[seq], &mut kv, &mut scratch).unwrap())
        };
        // Teacher-forced: every step is fed the reference's token, so each step's prefix is the
        // reference's and its argmax is compared wherever the reference was not at a near-tie
        // (past a near-tie a free-running continuation may legitimately take the other branch).
        for (step, &w) in want.iter().enumerate() {
            let (tok, _) = last;
            if margins[step] < tol.near_tie {
                near_ties += 1;
            } else {
                assert_eq!(tok, w, "{name}: greedy step {step}");
                compared += 1;
            }
            let t = [w];
            let seq = SeqInput {
                tokens: &t,
                start_pos: prompt.len() + step,
                blocks: &table,
                logits: Logits::Last,
            };
            last = argmax(model.forward(&[seq], &mut kv, &mut scratch).unwrap());
        }
        table.release(&mut alloc);
    }
    assert!(
        compared >= 16,
        "{name}: only {compared} greedy steps away from near-ties"
    );
    assert_eq!(alloc.num_free(), 64);
    eprintln!(
        "{name}: worst error = {worst:.3} of the tolerance; {compared} greedy steps compared, {near_ties} near-ties skipped"
    );
}

fn argmax(row: &[f32]) -> (u32, f32) {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            best = (i as u32, v);
        }
    }
    best
}

#[test]
fn llama_classic_f16() {
    check_fixture("llama");
}

#[test]
fn llama3_rope_scaling() {
    check_fixture("llama3-rope");
}

#[test]
fn llama_transformers5_rope_parameters() {
    check_fixture("llama-v5");
}

#[test]
fn qwen2_bias_tied() {
    check_fixture("qwen2");
}

#[test]
fn qwen2_bf16_checkpoint() {
    check_fixture("qwen2-bf16");
}

#[test]
fn mistral() {
    check_fixture("mistral");
}

#[test]
fn phi3_fused_projections() {
    check_fixture("phi3");
}

#[test]
fn llama_sharded() {
    check_fixture("llama-sharded");
}

#[test]
fn llama_f32_checkpoint() {
    check_fixture("llama-f32");
}

#[test]
fn mistral_sliding_window() {
    check_fixture("mistral-swa");
}

#[test]
fn phi3_partial_rotary() {
    check_fixture("phi3-partial");
}

/// Writes a Hugging Face fixture as a GGUF file the way llama.cpp's `convert_hf_to_gguf.py`
/// does for these architectures: `<arch>.*` metadata from config.json, llama.cpp tensor names,
/// dims in ggml order, 1-D tensors as F32, matrices in the checkpoint's F16 / BF16 / F32, and
/// (for `llama`) the rows of each q/k head reordered for llama.cpp's pairwise RoPE.
fn fixture_as_gguf(name: &str) -> std::path::PathBuf {
    use seedance::model::gguf::write::{file, Tensor};
    use seedance::model::gguf::Value as G;
    use seedance::model::gguf_checkpoint::gguf_name;
    let d = dir(name);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    let arch = match cfg["architectures"][0].as_str().unwrap() {
        "LlamaForCausalLM" | "MistralForCausalLM" => "llama",
        "Qwen2ForCausalLM" => "qwen2",
        a => panic!("no GGUF conversion for {a}"),
    };
    let u = |k: &str| G::U32(cfg[k].as_u64().unwrap() as u32);
    let heads = cfg["num_attention_heads"].as_u64().unwrap() as usize;
    let kv_heads = cfg["num_key_value_heads"].as_u64().unwrap() as usize;
    let hidden = cfg["hidden_size"].as_u64().unwrap() as usize;
    let head_dim = cfg["head_dim"]
        .as_u64()
        .map_or(hidden / heads, |v| v as usize);
    let meta = vec![
        ("general.architecture", G::Str(arch.into())),
        ("x.block_count", u("num_hidden_layers")),
        ("x.context_length", u("max_position_embeddings")),
        ("x.embedding_length", u("hidden_size")),
        ("x.feed_forward_length", u("intermediate_size")),
        ("x.attention.head_count", u("num_attention_heads")),
        ("x.attention.head_count_kv", u("num_key_value_heads")),
        ("x.attention.key_length", G::U32(head_dim as u32)),
        ("x.attention.value_length", G::U32(head_dim as u32)),
        ("x.rope.dimension_count", G::U32(head_dim as u32)),
        (
            "x.attention.layer_norm_rms_epsilon",
            G::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (
            "x.rope.freq_base",
            G::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        ),
        ("x.vocab_size", u("vocab_size")),
    ];
    let keys: Vec<String> = meta
        .iter()
        .map(|(k, _)| k.replacen("x.", &format!("{arch}."), 1))
        .collect();
    let meta: Vec<(&str, G)> = keys
        .iter()
        .map(String::as_str)
        .zip(meta.into_iter().map(|(_, v)| v))
        .collect();
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    for (hf, view) in st.tensors() {
        let g = gguf_name(&hf).unwrap_or_else(|| panic!("no GGUF name for {hf}"));
        let shape = view.shape().to_vec();
        let mut ty = match view.dtype() {
            safetensors::Dtype::F16 => 1,
            safetensors::Dtype::BF16 => 30,
            safetensors::Dtype::F32 => 0,
            t => panic!("{hf}: {t:?}"),
        };
        let mut data = view.data().to_vec();
        if shape.len() == 1 && ty != 0 {
            // llama.cpp keeps norms and biases in F32.
            data = data
                .chunks_exact(2)
                .flat_map(|c| {
                    let x = if ty == 1 {
                        half::f16::from_le_bytes([c[0], c[1]]).to_f32()
                    } else {
                        half::bf16::from_le_bytes([c[0], c[1]]).to_f32()
                    };
                    x.to_le_bytes()
                })
                .collect();
            ty = 0;
        }
        let n_heads = if g.contains(".attn_q.") {
            heads
        } else {
            kv_heads
        };
        if arch == "llama" && (g.contains(".attn_q.") || g.contains(".attn_k.")) {
            // HF row j·d/2 + i of a head goes to row 2i + j.
            let row = data.len() / shape[0];
            let half = head_dim / 2;
            let mut p = vec![0u8; data.len()];
            for h in 0..n_heads {
                for i in 0..half {
                    for j in 0..2 {
                        let src = h * head_dim + j * half + i;
                        let dst = h * head_dim + 2 * i + j;
                        p[dst * row..][..row].copy_from_slice(&data[src * row..][..row]);
                    }
                }
            }
            data = p;
        }
        let dims: Vec<u64> = shape.iter().rev().map(|&x| x as u64).collect();
        owned.push((g, dims, ty, data));
    }
    let tensors: Vec<Tensor<'_>> = owned
        .iter()
        .map(|(n, dims, ty, data)| Tensor {
            name: n,
            dims,
            type_id: *ty,
            data,
        })
        .collect();
    let out = std::env::temp_dir().join(format!(
        "seedance-fixture-{name}-{}.gguf",
        std::process::id()
    ));
    std::fs::write(&out, file(&meta, &tensors)).unwrap();
    out
}

fn check_gguf(name: &str) {
    let path = fixture_as_gguf(name);
    let model = Transformer::load_gguf(&path, Box::new(CpuBackend::new(2)), false);
    let _ = std::fs::remove_file(&path);
    let model = model.unwrap_or_else(|e| panic!("{e}"));
    let hf = Transformer::load(&dir(name), Box::new(CpuBackend::new(2))).unwrap();
    // `dtype` is informative; llama.cpp converts Mistral as `llama` (same layout; a sliding
    // window would come as its own key).
    let (mut got, mut want) = (model.config().clone(), hf.config().clone());
    (got.dtype, want.dtype) = (None, None);
    if want.arch == seedance::model::config::Arch::Mistral {
        want.arch = seedance::model::config::Arch::Llama;
    }
    assert_eq!(got, want, "{name}: GGUF config differs");
    check_model(name, &model);
}

/// The same fixtures through a GGUF file (F16 weights): the same config and, against
/// transformers, the same tolerance as the safetensors load — any wrong name, shape order or
/// q/k row order moves logits far past it.
#[test]
fn gguf_llama_f16() {
    check_gguf("llama");
}

#[test]
fn gguf_qwen2_bias_tied() {
    check_gguf("qwen2");
}

#[test]
fn gguf_mistral() {
    check_gguf("mistral");
}

/// Quantized GGUF fixtures (tests/fixtures/gguf, written by scripts/fixtures/make_gguf_fixtures.py
/// with llama.cpp's own `gguf` quantizers) through the integer kernels, against transformers'
/// float32 forward on the same weights dequantized, twice:
///
/// - with the CPU backend's roundings simulated in transformers (`*_q8act`: Linear inputs
///   quantized to 8 bits per block of 32 as the kernels do, K after RoPE and V rounded to F16 as
///   the cache stores them): what is left is F32 summation order, ~1e-5 on these logits, except
///   where such a difference flips an 8-bit code sitting on a rounding tie (seen: 0.02 at one
///   position of qwen2 Q4_0/Q4_1, up to 0.07). ATOL_Q8ACT = 0.15, RTOL_Q8ACT = 1e-2 (2× that);
///   greedy steps compared where the reference margin is at least 0.3 (twice the bound);
/// - plain, logits only: the kernels' activation rounding (relative ≤ 1/254 per element) adds to
///   the F16 error, which these random models amplify (see the top): measured up to 0.12 on
///   |logits| ≤ 5, so ATOL_Q = 0.25, RTOL_Q = 2e-2. (Their greedy margins are mostly below
///   that: the simulated reference is where greedy tokens are compared.)
///
/// A wrong nibble order, scale or block layout moves logits by ~1 or more.
fn check_quantized(name: &str, ty: &str) {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let model = Transformer::load_gguf(
        &base.join(format!("{name}-{ty}.gguf")),
        Box::new(CpuBackend::new(2)),
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(model.has_quantized_weights(), "{}", model.weight_formats());
    // The GGUF metadata gives the checkpoint's config (llama.cpp converts Mistral as `llama`).
    let hf =
        seedance::model::config::ModelConfig::from_file(&dir(name).join("config.json")).unwrap();
    let (mut got, mut want) = (model.config().clone(), hf);
    (got.dtype, want.dtype) = (None, None);
    if got.rope_factors.is_some() {
        // Llama 3.1 scaling comes as llama.cpp's per-frequency divisors: the same frequencies
        // as transformers computes from the config's `rope_scaling` (f32 rounding apart).
        let (a, b) = (rope_freqs(&got).inv_freq, rope_freqs(&want).inv_freq);
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-6 * y.abs(),
                "{name}-{ty}: inv_freq[{i}] {x} vs {y}"
            );
        }
        (got.rope_factors, got.rope_scaling) = (None, want.rope_scaling);
    }
    assert_eq!(got, want, "{name}-{ty}: GGUF config differs");
    let expected = base.join(format!("{name}-{ty}.json"));
    let q8act = Tol {
        atol: ATOL_Q8ACT,
        rtol: RTOL_Q8ACT,
        near_tie: NEAR_TIE_Q8ACT,
        prompts: "prompts_q8act",
        greedy: Some("greedy_q8act"),
    };
    check_against(
        &format!("{name}-{ty} (8-bit acts)"),
        &model,
        &expected,
        &q8act,
    );
    let plain = Tol {
        atol: ATOL_Q,
        rtol: RTOL_Q,
        near_tie: 0.0,
        prompts: "prompts",
        greedy: None,
    };
    check_against(&format!("{name}-{ty}"), &model, &expected, &plain);
}

const ATOL_Q8ACT: f32 = 0.15;
const RTOL_Q8ACT: f32 = 1e-2;
const NEAR_TIE_Q8ACT: f32 = 0.3;
const ATOL_Q: f32 = 0.25;
const RTOL_Q: f32 = 2e-2;

#[test]
fn gguf_llama_q8_0() {
    check_quantized("llama", "q8_0");
}

#[test]
fn gguf_llama_q4_0() {
    check_quantized("llama", "q4_0");
}

#[test]
fn gguf_llama_q4_1() {
    check_quantized("llama", "q4_1");
}

#[test]
fn gguf_qwen2_q8_0_tied() {
    check_quantized("qwen2", "q8_0");
}

#[test]
fn gguf_qwen2_q4_0_tied() {
    check_quantized("qwen2", "q4_0");
}

#[test]
fn gguf_qwen2_q4_1_tied() {
    check_quantized("qwen2", "q4_1");
}

#[test]
fn gguf_phi3_q8_0_fused() {
    check_quantized("phi3", "q8_0");
}

#[test]
fn gguf_phi3_partial_rotary_q8_0() {
    check_quantized("phi3-partial", "q8_0");
}

#[test]
fn gguf_llama3_rope_freqs_q8_0() {
    check_quantized("llama3-rope", "q8_0");
}
