//! The forward pass the runner drives, on the CPU or on the GPU, and where each row is sampled.
//!
//! [`Forward::Cpu`] is the reference: the [`Transformer`] over the host KV cache; every sampled
//! row comes back as logits for the sequence's own [`Sampler`](super::sampler::Sampler).
//! [`Forward::Cuda`] is the device-resident [`DeviceModel`] (weights, KV cache and activations on
//! the GPU): rows whose request needs only what `kernels/sampling.cu` does — greedy, temperature,
//! top-k, top-p, a seed — are sampled on the GPU and come back as token ids (4 bytes per row);
//! rows that need repetition / presence / frequency penalties, min-p or logprobs come back as
//! logits and use the host sampler exactly as on the CPU path ([`device_sampling`] decides, once
//! per request). The KV block accounting stays in the scheduler for both: the device cache is
//! indexed by the same block ids.
//!
//! GPU draws are Philox keyed by the request seed with the number of tokens generated so far as
//! the counter, so a seeded request repeats on the GPU; it does not reproduce the host sampler's
//! ChaCha stream (greedy rows are identical up to near-ties of the logits).

use super::kv::KvCache;
use super::sampler::SamplingParams;
use crate::backend::cuda::model::{DeviceModel, DeviceOutput};
use crate::backend::cuda::plan::DeviceSampling;
use crate::backend::cuda::CudaError;
use crate::model::transformer::{Scratch, SeqInput, Transformer};
use crate::model::ModelError;

pub use crate::backend::cuda::model::RowOut;

/// A failed step; the runner ends the step's sequences with `error` and keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cuda: {0}")]
    Cuda(#[from] CudaError),
}

// One value per engine, built once and never moved on the hot path: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Forward {
    Cpu {
        model: Transformer,
        kv: KvCache,
        scratch: Scratch,
    },
    Cuda(DeviceModel),
}

/// The sampled rows of one step, in the order of the sequences that sample.
pub enum StepOut<'a> {
    /// (rows, vocab) logits.
    Host {
        logits: &'a [f32],
        vocab: usize,
    },
    Device(&'a DeviceOutput),
}

impl StepOut<'_> {
    /// The `i`-th sampling sequence's token or logits; `None` past the last.
    pub fn row(&self, i: usize) -> Option<RowOut<'_>> {
        match self {
            StepOut::Host { logits, vocab } => {
                logits.get(i * vocab..(i + 1) * vocab).map(RowOut::Logits)
            }
            StepOut::Device(out) => out.row(i),
        }
    }
}

impl Forward {
    /// The CPU transformer over a host KV cache of `kv_blocks` blocks.
    pub fn cpu(model: Transformer, kv_blocks: usize, block_size: usize) -> Self {
        let kv = KvCache::new(model.kv_config(kv_blocks, block_size));
        Forward::Cpu {
            model,
            kv,
            scratch: Scratch::default(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Forward::Cpu { model, .. } => model.config().vocab_size,
            Forward::Cuda(d) => d.config().vocab_size,
        }
    }

    /// Whether rows may be sampled on the device (see [`device_sampling`]).
    pub fn samples_on_device(&self) -> bool {
        matches!(self, Forward::Cuda(_))
    }

    /// One batched step. `device` has one entry per sequence with `Logits::Last`, in order:
    /// `Some` asks the device to sample that row (ignored on the CPU, which returns logits).
    pub fn run(
        &mut self,
        inputs: &[SeqInput<'_>],
        device: &[Option<DeviceSampling>],
    ) -> Result<StepOut<'_>, ForwardError> {
        match self {
            Forward::Cpu { model, kv, scratch } => {
                let vocab = model.config().vocab_size;
                let logits = model.forward(inputs, kv, scratch)?;
                Ok(StepOut::Host { logits, vocab })
            }
            Forward::Cuda(d) => Ok(StepOut::Device(d.forward(inputs, device)?)),
        }
    }
}

/// The GPU sampling of a request, or `None` when it needs the host sampler (penalties, min-p,
/// logprobs). Unseeded requests get a random seed here, once.
pub fn device_sampling(p: &SamplingParams) -> Option<DeviceSampling> {
    let host_only = p.repetition_penalty != 1.0
        || p.presence_penalty != 0.0
        || p.frequency_penalty != 0.0
        || p.min_p > 0.0
        || p.logprobs.is_some();
    if host_only {
        return None;
    }
    // Greedy exactly where the host sampler is greedy (temperature 0 or top-k 1).
    let greedy = p.temperature == 0.0 || p.top_k == 1;
    Some(DeviceSampling {
        temperature: if greedy { 0.0 } else { p.temperature },
        top_k: u32::try_from(p.top_k).unwrap_or(0),
        top_p: p.top_p,
        seed: p.seed.unwrap_or_else(rand::random),
        step: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn plain_sampling_goes_to_the_gpu_and_the_rest_to_the_host() {
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            seed: Some(5),
            ..params()
        };
        assert_eq!(
            device_sampling(&p),
            Some(DeviceSampling {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
                seed: 5,
                step: 0
            })
        );
        for host in [
            SamplingParams {
                repetition_penalty: 1.1,
                ..p.clone()
            },
            SamplingParams {
                presence_penalty: 0.5,
                ..p.clone()
            },
            SamplingParams {
                frequency_penalty: -0.5,
                ..p.clone()
            },
            SamplingParams {
                min_p: 0.05,
                ..p.clone()
            },
            SamplingParams {
                logprobs: Some(0),
                ..p.clone()
            },
        ] {
            assert_eq!(device_sampling(&host), None, "{host:?}");
        }
    }

    #[test]
    fn greedy_matches_the_host_rule_and_top_k_off_is_zero() {
        let g = |temperature, top_k| {
            device_sampling(&SamplingParams {
                temperature,
                top_k,
                ..params()
            })
            .map(|d| (d.temperature, d.top_k))
        };
        assert_eq!(g(0.0, 0), Some((0.0, 0)));
        assert_eq!(g(0.8, 1), Some((0.0, 1)));
        assert_eq!(g(0.8, -1), Some((0.8, 0)));
        assert_eq!(g(0.8, 0), Some((0.8, 0)));
    }

    #[test]
    fn unseeded_requests_get_a_seed_once() {
        let a = device_sampling(&params()).map(|d| d.seed);
        let b = device_sampling(&params()).map(|d| d.seed);
        assert!(a.is_some() && b.is_some());
        assert_ne!(a, b, "two unseeded requests drew the same seed");
    }
}
