//! `config.json` of a Hugging Face Llama-family checkpoint → [`ModelConfig`].
//!
//! Both layouts in circulation are read: the classic one (`rope_theta` and `rope_scaling` at the
//! top level) and the transformers-5 one (`rope_parameters`, a dict holding `rope_theta`,
//! `rope_type` and the scaling fields). Fields are read from a `serde_json::Value` rather than a
//! derived struct so that every error names the exact field.

use super::ModelError;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Which checkpoint family; decides tensor names and the few architectural differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM`: Llama 2, 3, 3.1, 3.2.
    Llama,
    /// `Qwen2ForCausalLM`: bias on q/k/v, usually tied embeddings.
    Qwen2,
    /// `MistralForCausalLM`: Llama layout plus an optional sliding window.
    Mistral,
    /// `Phi3ForCausalLM`: fused `qkv_proj` and `gate_up_proj`.
    Phi3,
}

impl Arch {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "MistralForCausalLM" => Some(Self::Mistral),
            "Phi3ForCausalLM" => Some(Self::Phi3),
            _ => None,
        }
    }

    pub fn hf_name(&self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Phi3 => "Phi3ForCausalLM",
        }
    }
}

/// RoPE frequency scaling; only the kinds implemented here parse, others are rejected by name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type` "default" or no scaling).
    None,
    /// Llama 3.1 / 3.2 wavelength-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
}

/// Everything the forward pass needs to know about a checkpoint's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// GQA: each KV head serves `num_heads / num_kv_heads` query heads.
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// Per-frequency divisors of the inverse frequencies (`rotary_dim / 2` of them): a GGUF
    /// file's `rope_freqs.weight`, where llama.cpp's converter bakes Llama 3.1's scaling in.
    pub rope_factors: Option<Vec<f32>>,
    /// Leading dims of each head that get rotated (Phi-3's `partial_rotary_factor`; 1.0 elsewhere).
    pub rotary_dim: usize,
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix (no `lm_head.weight` in the checkpoint).
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Mistral / Qwen2 sliding-window attention: a query at `i` sees keys `j` with `i - j < w`.
    pub sliding_window: Option<usize>,
    /// `torch_dtype` / `dtype` as written; informative only (storage is always F16).
    pub dtype: Option<String>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_value(&v, path)
    }

    /// Parses an already-read config; `path` is only used in error messages.
    pub fn from_value(v: &Value, path: &Path) -> Result<Self, ModelError> {
        let f = Fields { v, path };
        let arch_name = match v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
        {
            Some(a) => a.to_string(),
            None => f.str("model_type")?,
        };
        let arch = Arch::from_hf(&arch_name).or(match arch_name.as_str() {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "mistral" => Some(Arch::Mistral),
            "phi3" => Some(Arch::Phi3),
            _ => None,
        });
        let Some(arch) = arch else {
            return Err(ModelError::UnknownArchitecture {
                path: path.into(),
                arch: arch_name,
            });
        };
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => hidden_size / num_heads.max(1),
        };
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(f.bad("num_key_value_heads", "must divide num_attention_heads"));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.bad("head_dim", "must be even and non-zero"));
        }
        let (rope_theta, rope_scaling, partial) = f.rope()?;
        let rotary_dim = ((head_dim as f64 * partial) as usize) & !1;
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        if f.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(f.bad("mlp_bias", "MLP bias is not supported"));
        }
        let sliding_window = f.sliding_window(arch)?;
        Ok(Self {
            arch,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.f64("rms_norm_eps")? as f32,
            rope_theta,
            rope_scaling,
            rope_factors: None,
            rotary_dim,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            sliding_window,
            dtype: f.opt_str("torch_dtype").or_else(|| f.opt_str("dtype")),
        })
    }

    /// Width of the fused q|k|v projection output.
    pub fn qkv_dim(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    /// Number of parameters (embedding counted once when tied).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let layer = self.qkv_dim() * h
            + self.num_heads * self.head_dim * h
            + 3 * self.intermediate_size * h
            + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}

/// Field access with errors that name the field.
struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn p(&self) -> PathBuf {
        self.path.to_path_buf()
    }
    fn missing(&self, field: &str) -> ModelError {
        ModelError::MissingField {
            path: self.p(),
            field: field.into(),
        }
    }
    fn bad(&self, field: &str, reason: &str) -> ModelError {
        ModelError::BadField {
            path: self.p(),
            field: field.into(),
            reason: reason.into(),
        }
    }
    fn get(&self, field: &str) -> Option<&Value> {
        self.v.get(field).filter(|x| !x.is_null())
    }
    fn opt_usize(&self, field: &str) -> Result<Option<usize>, ModelError> {
        match self.get(field) {
            None => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.bad(field, "expected a non-negative integer")),
        }
    }
    fn usize(&self, field: &str) -> Result<usize, ModelError> {
        self.opt_usize(field)?.ok_or_else(|| self.missing(field))
    }
    fn f64(&self, field: &str) -> Result<f64, ModelError> {
        let x = self.get(field).ok_or_else(|| self.missing(field))?;
        x.as_f64()
            .ok_or_else(|| self.bad(field, "expected a number"))
    }
    fn opt_bool(&self, field: &str) -> Result<Option<bool>, ModelError> {
        match self.get(field) {
            None => Ok(None),
            Some(x) => x
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(field, "expected a boolean")),
        }
    }
    fn opt_str(&self, field: &str) -> Option<String> {
        self.get(field).and_then(Value::as_str).map(str::to_string)
    }
    fn str(&self, field: &str) -> Result<String, ModelError> {
        self.opt_str(field).ok_or_else(|| self.missing(field))
    }

    /// The attention window, when every layer uses one. transformers 5 lists `layer_types`;
    /// older Qwen2 configs slide only layers ≥ `max_window_layers` when `use_sliding_window`.
    /// A mix of sliding and full layers is rejected rather than computed wrongly.
    fn sliding_window(&self, arch: Arch) -> Result<Option<usize>, ModelError> {
        let window = self.opt_usize("sliding_window")?;
        let layers = self.usize("num_hidden_layers")?;
        let sliding_layers = if let Some(types) = self.get("layer_types").and_then(Value::as_array)
        {
            types
                .iter()
                .filter(|t| t.as_str() == Some("sliding_attention"))
                .count()
        } else {
            match arch {
                Arch::Mistral => layers,
                Arch::Qwen2 if self.opt_bool("use_sliding_window")?.unwrap_or(false) => {
                    let first = self
                        .opt_usize("max_window_layers")?
                        .unwrap_or(0)
                        .min(layers);
                    layers - first
                }
                _ => 0,
            }
        };
        match (window, sliding_layers) {
            (None, _) | (_, 0) => Ok(None),
            (Some(w), n) if n == layers => Ok(Some(w)),
            _ => Err(self.bad(
                "layer_types",
                "a mix of sliding-window and full-attention layers is not supported",
            )),
        }
    }

    /// (theta, scaling, partial_rotary_factor) from either layout.
    fn rope(&self) -> Result<(f32, RopeScaling, f64), ModelError> {
        // transformers 5: everything under `rope_parameters`; classic: top level + `rope_scaling`.
        let (theta_field, theta, scaling, scaling_field) = match self.get("rope_parameters") {
            Some(rp) => {
                let theta = rp.get("rope_theta").and_then(Value::as_f64);
                let theta = match theta {
                    Some(t) => t,
                    None => self
                        .get("rope_theta")
                        .and_then(Value::as_f64)
                        .unwrap_or(10000.0),
                };
                (
                    "rope_parameters.rope_theta",
                    theta,
                    Some(rp),
                    "rope_parameters",
                )
            }
            None => {
                let theta = match self.get("rope_theta") {
                    Some(t) => t
                        .as_f64()
                        .ok_or_else(|| self.bad("rope_theta", "expected a number"))?,
                    None => 10000.0,
                };
                (
                    "rope_theta",
                    theta,
                    self.get("rope_scaling"),
                    "rope_scaling",
                )
            }
        };
        if theta.is_nan() || theta <= 0.0 {
            return Err(self.bad(theta_field, "must be positive"));
        }
        let mut partial = match self.get("partial_rotary_factor") {
            Some(x) => x
                .as_f64()
                .ok_or_else(|| self.bad("partial_rotary_factor", "expected a number"))?,
            None => 1.0,
        };
        let mut kind = RopeScaling::None;
        if let Some(s) = scaling {
            if let Some(p) = s.get("partial_rotary_factor").and_then(Value::as_f64) {
                partial = p;
            }
            let ty = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str);
            let num = |k: &str| -> Result<f32, ModelError> {
                s.get(k)
                    .and_then(Value::as_f64)
                    .map(|x| x as f32)
                    .ok_or_else(|| self.missing(&format!("{scaling_field}.{k}")))
            };
            match ty {
                None | Some("default") => {}
                Some("llama3") => {
                    kind = RopeScaling::Llama3 {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    };
                }
                Some(other) => {
                    return Err(self.bad(
                        &format!("{scaling_field}.rope_type"),
                        &format!(
                            "rope type `{other}` is not supported (supported: default, llama3)"
                        ),
                    ))
                }
            }
        }
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(self.bad("partial_rotary_factor", "must be in (0, 1]"));
        }
        Ok((theta as f32, kind, partial))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "torch_dtype": "bfloat16"
        })
    }

    fn parse(v: &Value) -> Result<ModelConfig, ModelError> {
        ModelConfig::from_value(v, Path::new("x/config.json"))
    }

    #[test]
    fn classic_llama() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rotary_dim, 16);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert!(!c.qkv_bias && !c.tie_word_embeddings);
    }

    #[test]
    fn llama3_scaling_both_layouts() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let a = parse(&v).unwrap();
        let mut w = base();
        w.as_object_mut().unwrap().remove("rope_theta");
        w["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let b = parse(&w).unwrap();
        assert_eq!(a, b);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
    }

    #[test]
    fn unsupported_rope_type_is_named() {
        let mut v = base();
        v["rope_scaling"] = json!({"type": "longrope", "short_factor": [1.0]});
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("x/config.json")
                && e.contains("rope_scaling.rope_type")
                && e.contains("longrope"),
            "{e}"
        );
    }

    #[test]
    fn missing_field_and_unknown_arch_are_named() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("`hidden_size`"), "{e}");
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("GPT2LMHeadModel"), "{e}");
    }

    #[test]
    fn qwen2_and_phi3_specifics() {
        let mut v = base();
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        v["tie_word_embeddings"] = json!(true);
        v["sliding_window"] = json!(32);
        v["use_sliding_window"] = json!(false);
        let c = parse(&v).unwrap();
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
        assert_eq!(c.sliding_window, None);
        v["use_sliding_window"] = json!(true);
        v["max_window_layers"] = json!(28);
        assert_eq!(parse(&v).unwrap().sliding_window, None);
        v["max_window_layers"] = json!(0);
        assert_eq!(parse(&v).unwrap().sliding_window, Some(32));
        v["max_window_layers"] = json!(1);
        assert!(parse(&v).unwrap_err().to_string().contains("layer_types"));
        let mut v = base();
        v["architectures"] = json!(["Phi3ForCausalLM"]);
        v["partial_rotary_factor"] = json!(0.5);
        v["rope_scaling"] = Value::Null;
        let c = parse(&v).unwrap();
        assert_eq!(c.arch, Arch::Phi3);
        assert_eq!(c.rotary_dim, 8);
    }
}
