//! A GGUF file as a weight source and a model config (`--model FILE.gguf`).
//!
//! The config comes from the `<arch>.*` metadata keys, written as the equivalent `config.json`
//! fields and validated by [`ModelConfig::from_value`], so a GGUF and a Hugging Face checkpoint
//! of one model give the same config. Tensors are found by llama.cpp's names
//! (`blk.N.attn_q.weight` …). Q8_0 / Q4_0 / Q4_1 matrices stay quantized (repacked for the CPU
//! integer kernels, [`crate::backend::quant`]) unless [`GgufCheckpoint::dequantize`] is set;
//! F32 / F16 / BF16 matrices become F16, vectors F32.
//!
//! llama.cpp's converter reorders the rows of each head of `attn_q` / `attn_k` for the `llama`
//! architecture (its RoPE rotates adjacent pairs; Hugging Face's rotates the two halves of a
//! head): GGUF row `2i + j` of a head is Hugging Face row `j·d/2 + i`. The loader undoes that, so
//! the transformer sees Hugging Face's layout. `qwen2` and `phi3` are converted unpermuted.

use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use serde_json::json;

use super::config::{Arch, ModelConfig};
use super::gguf::{dequantize, Gguf, TensorInfo, TensorType, Value};
use super::transformer::WeightSource;
use super::ModelError;
use crate::backend::quant::{QuantKind, QuantMatrix};
use crate::backend::Weight;

pub struct GgufCheckpoint {
    path: PathBuf,
    mmap: Mmap,
    pub gguf: Gguf,
    /// From the metadata; decides tensor names and the q/k row order.
    cfg: ModelConfig,
    /// Load quantized matrices as F16 instead (numerics comparisons; devices without kernels).
    pub dequantize: bool,
}

impl GgufCheckpoint {
    /// Maps and parses `path` and reads the model config from its metadata.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let mmap = super::loader::map_file(path)?;
        let gguf = Gguf::parse(&mmap).map_err(|e| ModelError::BadGguf {
            path: path.into(),
            reason: e.to_string(),
        })?;
        let cfg = read_config(&gguf, path)?;
        let mut ck = Self {
            path: path.into(),
            mmap,
            gguf,
            cfg,
            dequantize: false,
        };
        ck.cfg.rope_factors = ck.rope_factors()?;
        Ok(ck)
    }

    /// `rope_freqs.weight`, the divisor of each RoPE frequency (Llama 3.1 files; None where
    /// absent): one positive number per frequency.
    fn rope_factors(&self) -> Result<Option<Vec<f32>>, ModelError> {
        const NAME: &str = "rope_freqs.weight";
        let Some(t) = self.gguf.tensor(NAME) else {
            return Ok(None);
        };
        let n = self.cfg.rotary_dim / 2;
        if t.dims.len() != 1 || t.dims[0] as usize != n {
            return Err(ModelError::WrongShape {
                path: self.path.clone(),
                tensor: NAME.into(),
                found: t.dims.iter().rev().map(|&d| d as usize).collect(),
                expected: vec![n],
            });
        }
        if !matches!(t.ty, TensorType::F32 | TensorType::F16 | TensorType::BF16) {
            return Err(ModelError::WrongDtype {
                path: self.path.clone(),
                tensor: NAME.into(),
                dtype: format!("{} (F32, F16 or BF16 read)", t.ty.name()),
            });
        }
        let mut out = vec![0f32; n];
        dequantize(t.ty, &self.mmap[t.start..t.start + t.len], &mut out).map_err(|reason| {
            ModelError::BadGguf {
                path: self.path.clone(),
                reason: format!("{NAME}: {reason}"),
            }
        })?;
        if let Some(bad) = out.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            return Err(ModelError::BadGguf {
                path: self.path.clone(),
                reason: format!("{NAME}: factor {bad} is not a positive number"),
            });
        }
        Ok(Some(out))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn info(&self, name: &str) -> Result<(&TensorInfo, String), ModelError> {
        let g = gguf_name(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.path.clone(),
            tensor: name.into(),
        })?;
        let t = self
            .gguf
            .tensor(&g)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                tensor: format!("{g} ({name})"),
            })?;
        Ok((t, g))
    }

    /// Tensor `name` (Hugging Face naming), checked to have `shape` (row-major) and a type read.
    fn checked(&self, name: &str, shape: &[usize]) -> Result<(&TensorInfo, String), ModelError> {
        let (t, g) = self.info(name)?;
        let ggml: Vec<usize> = shape.iter().rev().copied().collect();
        if t.dims.iter().map(|&d| d as usize).ne(ggml.iter().copied()) {
            return Err(ModelError::WrongShape {
                path: self.path.clone(),
                tensor: g,
                found: t.dims.iter().rev().map(|&d| d as usize).collect(),
                expected: shape.to_vec(),
            });
        }
        if !t.ty.supported() {
            return Err(ModelError::WrongDtype {
                path: self.path.clone(),
                tensor: g,
                dtype: format!(
                    "{} (GGUF types read: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                    t.ty.name()
                ),
            });
        }
        Ok((t, g))
    }

    /// Whether `g`'s rows are in llama.cpp's pairwise-RoPE order (and how many heads it has).
    fn permuted_heads(&self, g: &str) -> Option<usize> {
        if self.cfg.arch != Arch::Llama {
            None
        } else if g.contains(".attn_q.") {
            Some(self.cfg.num_heads)
        } else if g.contains(".attn_k.") {
            Some(self.cfg.num_kv_heads)
        } else {
            None
        }
    }

    /// Tensor `name` (Hugging Face naming) as f32, checked to have `shape` (row-major).
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (t, g) = self.checked(name, shape)?;
        let mut out = vec![0f32; shape.iter().product()];
        dequantize(t.ty, &self.mmap[t.start..t.start + t.len], &mut out).map_err(|reason| {
            ModelError::BadGguf {
                path: self.path.clone(),
                reason: format!("{g}: {reason}"),
            }
        })?;
        if let Some(heads) = self.permuted_heads(&g) {
            out = unpermute(&out, heads, shape[0]);
        }
        Ok(out)
    }

    /// Matrix `name` kept quantized, or None when its type is not a quantized one (or
    /// [`Self::dequantize`] is set).
    fn quantized(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Weight>, ModelError> {
        let (t, g) = self.checked(name, &[rows, cols])?;
        let kind = match t.ty {
            _ if self.dequantize => return Ok(None),
            TensorType::Q8_0 => QuantKind::Q8_0,
            TensorType::Q4_0 => QuantKind::Q4_0,
            TensorType::Q4_1 => QuantKind::Q4_1,
            _ => return Ok(None),
        };
        let mut bytes = &self.mmap[t.start..t.start + t.len];
        let permuted;
        if let Some(heads) = self.permuted_heads(&g) {
            permuted = unpermute(bytes, heads, rows);
            bytes = &permuted;
        }
        let m = QuantMatrix::from_gguf(kind, rows, cols, bytes).map_err(|reason| {
            ModelError::BadGguf {
                path: self.path.clone(),
                reason: format!("{g}: {reason}"),
            }
        })?;
        Ok(Some(Weight::quantized(m)))
    }
}

/// Reads a file's metadata into a [`ModelConfig`]; errors name the file and the key.
struct Meta<'a> {
    gguf: &'a Gguf,
    path: &'a Path,
}

fn read_config(gguf: &Gguf, path: &Path) -> Result<ModelConfig, ModelError> {
    Meta { gguf, path }.config()
}

impl Meta<'_> {
    fn bad(&self, field: &str, reason: impl Into<String>) -> ModelError {
        ModelError::BadField {
            path: self.path.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Key `key` converted by `conv` (None: absent); an error names the key when it does not
    /// convert.
    fn meta<T>(
        &self,
        key: &str,
        conv: fn(&Value) -> Option<T>,
        what: &str,
    ) -> Result<Option<T>, ModelError> {
        match self.gguf.get(key) {
            None => Ok(None),
            Some(v) => conv(v).map(Some).ok_or_else(|| self.bad(key, what)),
        }
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>, ModelError> {
        self.meta(key, Value::as_u64, "not an unsigned integer")
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.meta(key, Value::as_f64, "not a number")
    }

    fn need_u64(&self, key: &str) -> Result<u64, ModelError> {
        self.meta_u64(key)?.ok_or_else(|| ModelError::MissingField {
            path: self.path.into(),
            field: key.into(),
        })
    }

    /// The model config from the metadata.
    fn config(&self) -> Result<ModelConfig, ModelError> {
        let name = self
            .gguf
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::MissingField {
                path: self.path.into(),
                field: "general.architecture".into(),
            })?
            .to_string();
        let hf = match name.as_str() {
            "llama" => "LlamaForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            "phi3" => "Phi3ForCausalLM",
            _ => {
                return Err(ModelError::UnknownArchitecture {
                    path: self.path.into(),
                    arch: format!("{name} (GGUF; supported: llama, qwen2, phi3)"),
                })
            }
        };
        let k = |s: &str| format!("{name}.{s}");
        if let Some(t) = self
            .gguf
            .get(&k("rope.scaling.type"))
            .and_then(Value::as_str)
            .filter(|t| *t != "none")
        {
            return Err(self.bad(&k("rope.scaling.type"), format!("`{t}` is not supported")));
        }
        let hidden = self.need_u64(&k("embedding_length"))?;
        let heads = self.need_u64(&k("attention.head_count"))?;
        let kv_heads = self
            .meta_u64(&k("attention.head_count_kv"))?
            .unwrap_or(heads);
        let head_dim = match self.meta_u64(&k("attention.key_length"))? {
            Some(d) => d,
            None => hidden / heads.max(1),
        };
        let vocab = match self.meta_u64(&k("vocab_size"))? {
            Some(v) => v,
            None => match self
                .gguf
                .get("tokenizer.ggml.tokens")
                .and_then(Value::array_len)
            {
                Some(n) => n as u64,
                None => self
                    .gguf
                    .tensor("token_embd.weight")
                    .and_then(|t| t.dims.get(1).copied())
                    .ok_or_else(|| self.bad(&k("vocab_size"), "missing"))?,
            },
        };
        let rotary = self
            .meta_u64(&k("rope.dimension_count"))?
            .unwrap_or(head_dim);
        let mut cfg = json!({
            "architectures": [hf],
            "hidden_size": hidden,
            "intermediate_size": self.need_u64(&k("feed_forward_length"))?,
            "num_hidden_layers": self.need_u64(&k("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": self.meta_f64(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            "rope_theta": self.meta_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            "max_position_embeddings": self.meta_u64(&k("context_length"))?.unwrap_or(4096),
            "vocab_size": vocab,
            "tie_word_embeddings": self.gguf.tensor("output.weight").is_none(),
            "attention_bias": name == "llama" && self.gguf.tensor("blk.0.attn_q.bias").is_some(),
            "torch_dtype": "gguf",
        });
        if head_dim > 0 && rotary != head_dim {
            cfg["partial_rotary_factor"] = json!(rotary as f64 / head_dim as f64);
        }
        if let Some(w) = self.meta_u64(&k("attention.sliding_window"))? {
            cfg["sliding_window"] = json!(w);
        }
        ModelConfig::from_value(&cfg, self.path)
    }
}

/// Undoes llama.cpp's per-head row order of q/k (`heads` heads of a matrix, or a bias, of `rows`
/// rows; a row is any run of elements: floats, or the blocks of a quantized row).
fn unpermute<T: Copy + Default>(w: &[T], heads: usize, rows: usize) -> Vec<T> {
    let cols = w.len() / rows.max(1);
    let d = rows / heads.max(1);
    let half = d / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * half + i;
                out[dst * cols..][..cols].copy_from_slice(&w[src * cols..][..cols]);
            }
        }
    }
    out
}

/// llama.cpp's name for a Hugging Face tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (n, part) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{n}.{g}.{kind}"))
}

impl WeightSource for GgufCheckpoint {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight, ModelError> {
        if let Some(w) = self.quantized(name, rows, cols)? {
            return Ok(w);
        }
        let w = self.read(name, &[rows, cols])?;
        Ok(Weight::new(
            rows,
            cols,
            w.into_iter().map(f16::from_f32).collect(),
        ))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        self.read(name, &[len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.k_proj.bias").as_deref(),
            Some("blk.3.attn_k.bias")
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
    }

    #[test]
    fn unpermute_restores_halves() {
        // One head of 4 rows (1 column): llama.cpp order is HF rows 0, 2, 1, 3.
        let out = unpermute(&[0.0, 2.0, 1.0, 3.0], 1, 4);
        assert_eq!(out, [0.0, 1.0, 2.0, 3.0]);
    }
}
