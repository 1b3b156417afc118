//! seedance: a streaming LLM inference server.
//!
//! Layout (data-path order):
//! - `engine`: the engine thread's state — `kv` (paged KV cache).
//! - `model`: checkpoint config and loading, the Llama-family transformer, synthetic models.
//! - `backend`: the compute ops behind the transformer (`Backend` trait; `cpu` implementation).

pub mod backend;
pub mod engine;
pub mod model;
