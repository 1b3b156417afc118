//! The model: checkpoint config, safetensors loading, the Llama-family transformer, the
//! synthetic random-weight models used for benchmarks and as the default; and its text side:
//! tokenizer, chat templates, incremental detokenization, stop strings, the engine-alone
//! generation loop.

pub mod config;
pub mod detok;
pub mod generate;
pub mod gguf;
pub mod gguf_checkpoint;
pub mod loader;
pub mod stop;
pub mod synthetic;
pub mod template;
pub mod tokenizer;
pub mod transformer;

use std::path::PathBuf;
use thiserror::Error;

/// Everything that can go wrong building or running a model. Each message is one line naming the
/// file and the tensor or field at fault.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: missing config field `{field}`")]
    MissingField { path: PathBuf, field: String },
    #[error("{path}: bad config field `{field}`: {reason}")]
    BadField {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{path}: unsupported architecture `{arch}` (supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, Phi3ForCausalLM)")]
    UnknownArchitecture { path: PathBuf, arch: String },
    #[error("{path}: invalid safetensors file (truncated or corrupt): {reason}")]
    BadSafetensors { path: PathBuf, reason: String },
    #[error("{path}: invalid GGUF file: {reason}")]
    BadGguf { path: PathBuf, reason: String },
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor `{tensor}` has dtype {dtype}, expected F16, BF16 or F32")]
    WrongDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("unknown synthetic shape `{0}` (known: tiny, qwen2.5-0.5b, llama3.2-1b, qwen2-7b, phi3-mini)")]
    UnknownSynthetic(String),
    #[error("forward: {0}")]
    Forward(String),
    #[error(transparent)]
    Kv(#[from] crate::engine::kv::KvError),
}
