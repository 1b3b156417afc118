//! `synthetic:<shape>`: random F16 weights in the exact shape of a real checkpoint, for
//! benchmarks and tests that need sizes no one can download here, plus a small real byte-level BPE
//! tokenizer (806 tokens, ~550 merges, trained by `scripts/fixtures/make_model_fixtures.py`, committed under
//! `assets/synthetic/` and compiled into the binary).
//!
//! Weights are a pure function of (seed, tensor name, element index): each tensor is generated in
//! parallel 64 Ki-element chunks from a SplitMix64 stream, uniform in ±√3·σ with σ = 1/√cols · 0.5
//! for matrices (activations stay O(1) through the residual stream), norms ≈ 1, biases small.
//! The model's vocabulary keeps the real shape's size (so lm_head costs what it really costs) and
//! logits past the tokenizer's size are masked to −∞, so every sampled id decodes.

use super::config::{Arch, ModelConfig, RopeScaling};
use super::transformer::{Transformer, WeightSource};
use super::ModelError;
use crate::backend::{Backend, Weight};
use half::f16;
use rayon::prelude::*;
use std::path::PathBuf;

/// The committed tokenizer of synthetic models.
pub const TOKENIZER_JSON: &str = include_str!("../../assets/synthetic/tokenizer.json");
/// Its `tokenizer_config.json` (chat template, special tokens).
pub const TOKENIZER_CONFIG_JSON: &str =
    include_str!("../../assets/synthetic/tokenizer_config.json");

/// Shapes `synthetic:` knows.
pub const SHAPES: &[&str] = &[
    "tiny",
    "qwen2.5-0.5b",
    "llama3.2-1b",
    "qwen2-7b",
    "phi3-mini",
];

/// A built synthetic model.
pub struct Synthetic {
    pub model: Transformer,
    /// Directory holding `tokenizer.json` and `tokenizer_config.json`.
    pub tokenizer_dir: PathBuf,
    pub shape: String,
}

/// `synthetic` or `synthetic:<anything>`.
pub fn is_synthetic(spec: &str) -> bool {
    spec == "synthetic" || spec.starts_with("synthetic:")
}

/// Number of tokens of the committed tokenizer (vocab + added tokens).
pub fn tokenizer_vocab_size() -> usize {
    let v: serde_json::Value = match serde_json::from_str(TOKENIZER_JSON) {
        Ok(v) => v,
        Err(_) => return 0,
    };
    let base = v["model"]["vocab"].as_object().map_or(0, |m| m.len());
    let max_added = v["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["id"].as_u64())
        .map(|id| id as usize + 1)
        .max()
        .unwrap_or(0);
    base.max(max_added)
}

/// The HF config of a known shape.
pub fn shape_config(shape: &str) -> Result<ModelConfig, ModelError> {
    #[allow(clippy::too_many_arguments)]
    fn cfg(
        arch: Arch,
        v: usize,
        h: usize,
        i: usize,
        l: usize,
        heads: usize,
        kv: usize,
        theta: f32,
        eps: f32,
        tied: bool,
    ) -> ModelConfig {
        ModelConfig {
            arch,
            vocab_size: v,
            hidden_size: h,
            intermediate_size: i,
            num_layers: l,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: h / heads,
            rms_norm_eps: eps,
            rope_theta: theta,
            rope_scaling: RopeScaling::None,
            rope_factors: None,
            rotary_dim: h / heads,
            max_position_embeddings: 32768,
            tie_word_embeddings: tied,
            qkv_bias: arch == Arch::Qwen2,
            o_bias: false,
            sliding_window: None,
            dtype: Some("float16".into()),
        }
    }
    Ok(match shape {
        "tiny" => cfg(
            Arch::Llama,
            tokenizer_vocab_size(),
            64,
            128,
            2,
            4,
            2,
            10000.0,
            1e-5,
            true,
        ),
        "qwen2.5-0.5b" => cfg(Arch::Qwen2, 151936, 896, 4864, 24, 14, 2, 1e6, 1e-6, true),
        "llama3.2-1b" => {
            let mut c = cfg(
                Arch::Llama,
                128256,
                2048,
                8192,
                16,
                32,
                8,
                500000.0,
                1e-5,
                true,
            );
            c.rope_scaling = RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            };
            c.max_position_embeddings = 131072;
            c
        }
        "qwen2-7b" => cfg(
            Arch::Qwen2,
            152064,
            3584,
            18944,
            28,
            28,
            4,
            1e6,
            1e-6,
            false,
        ),
        "phi3-mini" => {
            let mut c = cfg(
                Arch::Phi3,
                32064,
                3072,
                8192,
                32,
                32,
                32,
                10000.0,
                1e-5,
                false,
            );
            c.max_position_embeddings = 4096;
            c
        }
        other => return Err(ModelError::UnknownSynthetic(other.to_string())),
    })
}

/// Builds `synthetic:<shape>` (`synthetic` alone is `tiny`) with weights from `seed`.
pub fn build(spec: &str, seed: u64, backend: Box<dyn Backend>) -> Result<Synthetic, ModelError> {
    let shape = spec.strip_prefix("synthetic:").unwrap_or("tiny");
    let shape = if shape.is_empty() || spec == "synthetic" {
        "tiny"
    } else {
        shape
    };
    let cfg = shape_config(shape)?;
    let src = Generator { seed };
    let mut model = Transformer::from_source(cfg, &src, backend)?;
    model.set_vocab_limit(Some(tokenizer_vocab_size()));
    Ok(Synthetic {
        model,
        tokenizer_dir: tokenizer_dir()?,
        shape: shape.to_string(),
    })
}

/// Writes the committed tokenizer files to a per-user temp directory (once) and returns it.
pub fn tokenizer_dir() -> Result<PathBuf, ModelError> {
    let dir = std::env::temp_dir().join(format!(
        "seedance-synthetic-tokenizer-{:016x}",
        fnv(TOKENIZER_JSON)
    ));
    for (name, text) in [
        ("tokenizer.json", TOKENIZER_JSON),
        ("tokenizer_config.json", TOKENIZER_CONFIG_JSON),
    ] {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
            std::fs::create_dir_all(&dir).map_err(|source| ModelError::Io {
                path: dir.clone(),
                source,
            })?;
            let tmp = dir.join(format!("{name}.{}", std::process::id()));
            std::fs::write(&tmp, text).map_err(|source| ModelError::Io {
                path: tmp.clone(),
                source,
            })?;
            std::fs::rename(&tmp, &path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(dir)
}

/// Deterministic weight generator keyed by tensor name.
struct Generator {
    seed: u64,
}

const CHUNK: usize = 1 << 16;

impl Generator {
    fn fill(&self, name: &str, len: usize, f: impl Fn(f32) -> f16 + Sync) -> Vec<f16> {
        let key = self.seed ^ fnv(name);
        let mut out = vec![f16::ZERO; len];
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut s = splitmix(key.wrapping_add(c as u64));
                for v in chunk {
                    s = splitmix(s);
                    // Top 24 bits → uniform in [-1, 1).
                    let u = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                    *v = f(u);
                }
            });
        out
    }
}

impl WeightSource for Generator {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight, ModelError> {
        let a = 3f32.sqrt() * 0.5 / (cols as f32).sqrt();
        let a = if name.contains("embed_tokens") {
            0.5
        } else {
            a
        };
        Ok(Weight::new(
            rows,
            cols,
            self.fill(name, rows * cols, |u| f16::from_f32(u * a)),
        ))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let norm = name.ends_with("norm.weight");
        let v = self.fill(name, len, |u| {
            f16::from_f32(if norm { 1.0 + 0.1 * u } else { 0.05 * u })
        });
        Ok(v.into_iter().map(f16::to_f32).collect())
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn specs_and_shapes() {
        assert!(
            is_synthetic("synthetic:tiny")
                && is_synthetic("synthetic")
                && !is_synthetic("/models/x")
        );
        assert!(tokenizer_vocab_size() > 512, "{}", tokenizer_vocab_size());
        let q = shape_config("qwen2.5-0.5b").unwrap();
        assert_eq!((q.hidden_size, q.head_dim, q.qkv_dim()), (896, 64, 1152));
        assert!(
            q.num_params() > 490_000_000 && q.num_params() < 500_000_000,
            "{}",
            q.num_params()
        );
        let l = shape_config("llama3.2-1b").unwrap();
        assert!(
            l.num_params() > 1_230_000_000 && l.num_params() < 1_240_000_000,
            "{}",
            l.num_params()
        );
        let p = shape_config("phi3-mini").unwrap();
        assert!(
            p.num_params() > 3_800_000_000 && p.num_params() < 3_830_000_000,
            "{}",
            p.num_params()
        );
        assert!(shape_config("gpt5").is_err());
    }

    #[test]
    fn tiny_is_deterministic_and_writes_its_tokenizer() {
        let a = build("synthetic:tiny", 7, Box::new(CpuBackend::new(1))).unwrap();
        let b = build("synthetic", 7, Box::new(CpuBackend::new(1))).unwrap();
        assert!(a.tokenizer_dir.join("tokenizer.json").exists());
        assert_eq!(a.model.weight_bytes(), b.model.weight_bytes());
        assert_eq!(a.shape, "tiny");
    }
}
