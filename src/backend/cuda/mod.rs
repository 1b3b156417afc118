//! The CUDA backend: our own FP16 kernels (`kernels/*.cu`), compiled at start-up with NVRTC,
//! driven through `cudarc` with dynamic loading — the crate builds, and the server runs, on
//! machines with no CUDA toolkit and no driver.
//!
//! Layout, in the order a step uses it:
//! - [`device`]: `probe()` (never panics without a driver) and `select()` for `--device`.
//! - [`nvrtc`]: the kernel sources, CUBIN compilation for the device's `sm_XY`, the on-disk cache.
//! - [`model`]: [`model::DeviceModel`], the serving path: the transformer resident on the GPU
//!   (weights, paged KV cache, workspaces), one step = one metadata upload + the layer chain +
//!   GPU sampling; every call returns `Result<_, CudaError>`.
//! - [`plan`]: the host side of a step, CUDA-free and unit-tested: row order, the pinned
//!   metadata layout, which rows the GPU samples, the decode-graph key.
//! - [`graph`]: decode steps captured as CUDA graphs per (batch bucket, context bucket).
//! - [`ops`]: one launcher per kernel on device buffers or views (shape checks, `// SAFETY:` per
//!   launch).
//! - [`backend`]: [`CudaBackend`], the slice-based [`crate::backend::Backend`] trait on the
//!   launchers — a correctness bridge for the op-level CPU-vs-CUDA tests (`tests/cuda_ops.rs`):
//!   it copies activations and the KV cache over PCIe per call and panics on a driver error
//!   (the trait is infallible), so the engine never uses it.
//!
//! ## The serving path
//! `engine::build` loads the model into a host `Transformer`, uploads it into a `DeviceModel`
//! and drops the host copy; `engine::forward::Forward::Cuda` drives it from the runner.
//! - **Residency.** Matrices as row-major F16 `(out, in)`, norms / biases / RoPE tables F32, one
//!   K and one V buffer per layer in `engine::kv`'s layout with the scheduler's block ids (plus
//!   a scratch block for graph padding), activation workspaces for `max_num_batched_tokens`
//!   rows, logits for `max_running` rows. A step uploads only token ids, positions, cache slots,
//!   row → sequence, block tables and sampling parameters: one `u32` array in pinned host
//!   memory, one async copy on the compute stream.
//! - **Rows.** Sampling rows first (GPU-sampled, then host-sampled), then the rest, so the final
//!   norm and the LM head run on the first `m` rows only and host rows come back in one copy.
//! - **Sampling.** Rows whose request needs only greedy / temperature / top-k / top-p / seed are
//!   sampled by `sampling.cu` (Philox keyed by the request seed, counter = tokens generated so
//!   far): 4 bytes per row come back. Penalties, min-p and logprobs are not in the kernel: those
//!   rows' logits are copied back and the CPU `Sampler` runs as on the CPU path.
//! - **Graphs.** Decode-only steps of ≤ 256 sequences are padded to their batch bucket and
//!   replayed from a graph per (batch bucket, context bucket); prefill and mixed steps run
//!   eagerly.
//! - **Errors.** A failed call drains the stream and returns the error; the runner ends the
//!   step's sequences with `error` and keeps serving. A sticky device error (e.g. an illegal
//!   address) fails every later step the same way; the engine thread stays up.

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
