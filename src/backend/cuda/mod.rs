//! The CUDA backend: our own FP16 kernels (`kernels/*.cu`), compiled at start-up with NVRTC,
//! driven through `cudarc` with dynamic loading — the crate builds, and the server runs, on
//! machines with no CUDA toolkit and no driver.
//!
//! Layout:
//! - [`device`]: `probe()` (never panics without a driver) and `select()` for `--device`.
//! - [`nvrtc`]: the kernel sources, CUBIN compilation for the device's `sm_XY`, the on-disk cache.
//! - [`graph`]: decode steps captured as CUDA graphs per batch-size bucket.
//! - [`ops`]: one launcher per kernel on device buffers (shape checks, `// SAFETY:` per launch).
//! - [`backend`]: [`CudaBackend`], the [`crate::backend::Backend`] trait on top of the launchers.
//!
//! ## How the transformer moves onto the GPU
//! The `Backend` trait is slice-based (host `&[f32]` activations, host `&[f16]` KV cache), so
//! [`CudaBackend`] is a *correctness bridge*: it keeps weights resident on the device (uploaded
//! once, keyed by the host buffer) but copies activations and the current layer's KV cache over
//! PCIe on every call. It runs the real kernels and is what the CPU-vs-CUDA tests compare, but it
//! is not the serving path. The serving path needs the transformer to hold device buffers:
//! 1. `Transformer` gets a `DeviceModel` variant: weights as `CudaSlice<f16>`, norm weights and
//!    biases as `CudaSlice<f32>`, the KV cache as one `CudaSlice<f16>` pair per layer (same
//!    `(num_blocks, kv_heads, block_size, head_dim)` layout as `engine::kv::KvCache`).
//! 2. A step uploads only token ids, positions, slot ids and block tables (pinned host buffers,
//!    one async copy each), then per layer: `rmsnorm_residual` → `matmul`(qkv) →
//!    `rope_qkv_cache` (writes K/V into the cache) → `attention` → `matmul`(o) →
//!    `rmsnorm_residual` → `matmul`(gate_up) → `swiglu` → `matmul`(down); then the final norm,
//!    the LM head, and `sample`/`argmax`: only the sampled ids (4 bytes per row) come back.
//! 3. Decode steps are captured as CUDA graphs per batch-size bucket (1, 2, 4, 8, 16, 32, 64, …):
//!    pad the batch to the bucket, keep every per-step input in fixed device buffers (the
//!    launchers' workspaces already grow once and stay put), `stream.begin_capture` / `end_capture`
//!    once per bucket, then each step is one `memcpy_htod` of the metadata + `graph.launch()`.
//!    The split-KV count depends on the longest context, so it is part of the graph key
//!    (bucketed by 512-token steps) or fixed at the maximum for the captured graph.
//! 4. `engine::build::device()` calls [`device::select`] and boxes `CudaBackend` or `CpuBackend`.

pub mod backend;
pub mod device;
pub mod graph;
pub mod model;
pub mod nvrtc;
pub mod ops;
pub mod plan;

pub use backend::CudaBackend;
pub use device::{probe, select, DeviceInfo, Selected};

use thiserror::Error;

/// Everything that can go wrong on the CUDA path; a launcher never panics on bad input.
#[derive(Debug, Error)]
pub enum CudaError {
    #[error("no usable CUDA device: {0}")]
    NoDevice(String),
    #[error("CUDA driver: {0:?}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("shape: {0}")]
    Shape(String),
}
