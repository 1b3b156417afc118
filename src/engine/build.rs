//! From `--model` / `--device` to a running generator and the shards' text codec.
//!
//! The model is always loaded into a [`Transformer`] first (checkpoint or synthetic weights, by
//! the checkpoint's tensor names). On the CPU it runs as is; with a CUDA device it is uploaded
//! once into a [`DeviceModel`] (weights, KV cache and workspaces on the GPU) and the host copy is
//! dropped. The slice-based `CudaBackend` bridge is not used here: it panics on a driver error and
//! stays for the op-level tests (`tests/cuda_ops.rs`).

use std::path::Path;
use std::sync::Arc;

use super::forward::Forward;
use super::runner::ModelRunner;
use super::scheduler::SchedulerConfig;
use super::thread::Generator;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::device::{select, Selected};
use crate::backend::cuda::model::{DeviceConfig, DeviceModel};
use crate::config::{Device, EngineConfig};
use crate::engine::kv::KvConfig;
use crate::metrics::EngineMetrics;
use crate::model::gguf_checkpoint::GgufCheckpoint;
use crate::model::synthetic;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::Transformer;
use crate::session::codec::{Codec, HfText};

/// The engine side (runs on the engine thread) and the text side (shared by the shards).
pub struct Built {
    pub generator: Box<dyn Generator>,
    pub codec: Codec,
    /// Whether the engine thread may be pinned (the null model: one busy thread, no pool).
    pub pin_engine: bool,
    /// Prompt plus generated tokens a sequence may hold (`None`: the null model, no limit).
    pub max_model_len: Option<usize>,
}

/// Loads `spec` (a checkpoint directory, a `.gguf` file or `synthetic:<shape>`) on a CPU backend
/// of `cpu_threads` threads, with its tokenizer.
pub fn load_model(
    spec: &str,
    seed: u64,
    cpu_threads: usize,
) -> Result<(Transformer, Tokenizer), String> {
    let backend = Box::new(CpuBackend::new(cpu_threads));
    if synthetic::is_synthetic(spec) {
        let s = synthetic::build(spec, seed, backend).map_err(|e| e.to_string())?;
        tracing::warn!(shape = %s.shape, "synthetic model: the weights are RANDOM, output is gibberish by design");
        let tok = Tokenizer::from_dir(&s.tokenizer_dir).map_err(|e| e.to_string())?;
        return Ok((s.model, tok));
    }
    let path = Path::new(spec);
    if path.is_file() && spec.ends_with(".gguf") {
        let ck = GgufCheckpoint::open(path).map_err(|e| e.to_string())?;
        let tok = Tokenizer::from_gguf(&ck.gguf, path).map_err(|e| e.to_string())?;
        let model = Transformer::from_source(ck.config().clone(), &ck, backend)
            .map_err(|e| e.to_string())?;
        tracing::info!(
            file = spec,
            weights = %model.weight_formats(),
            weights_mib = model.weight_bytes() >> 20,
            "GGUF checkpoint (quantized matrices stay quantized on the CPU)"
        );
        return Ok((model, tok));
    }
    if !path.is_dir() {
        return Err(format!(
            "{spec}: not a directory or a .gguf file (expected a Hugging Face checkpoint directory, a GGUF file or synthetic:<shape>)"
        ));
    }
    let model = Transformer::load(path, backend).map_err(|e| e.to_string())?;
    let tok = Tokenizer::from_dir(path).map_err(|e| e.to_string())?;
    Ok((model, tok))
}

/// The tokenizer of `spec` alone (no weights read).
pub fn load_tokenizer(spec: &str) -> Result<Tokenizer, String> {
    let path = Path::new(spec);
    if path.is_file() && spec.ends_with(".gguf") {
        let ck = GgufCheckpoint::open(path).map_err(|e| e.to_string())?;
        return Tokenizer::from_gguf(&ck.gguf, path).map_err(|e| e.to_string());
    }
    let dir = if synthetic::is_synthetic(spec) {
        synthetic::tokenizer_dir().map_err(|e| e.to_string())?
    } else {
        path.to_path_buf()
    };
    Tokenizer::from_dir(&dir).map_err(|e| e.to_string())
}

/// The forward pass on the selected device: the CPU transformer, or `model` uploaded to the GPU
/// (a start-up error names the CUDA failure).
pub fn forward(model: Transformer, device: &Selected, dc: DeviceConfig) -> Result<Forward, String> {
    match device {
        Selected::Cpu => Ok(Forward::cpu(model, dc.num_blocks, dc.block_size)),
        Selected::Cuda(d) => {
            let dc = DeviceConfig {
                ordinal: d.ordinal,
                ..dc
            };
            if model.has_quantized_weights() {
                tracing::info!(
                    weights = %model.weight_formats(),
                    "cuda: quantized weights are dequantized to F16 at upload (no quantized CUDA kernels yet)"
                );
            }
            let dm = DeviceModel::new(&model, &dc)
                .map_err(|e| format!("--device cuda: uploading the model: {e}"))?;
            tracing::info!(
                weights_mib = dm.weight_bytes() >> 20,
                kv_blocks = dc.num_blocks,
                graphs = dc.graphs,
                "model resident on cuda:{} ({})",
                d.ordinal,
                d.name
            );
            Ok(Forward::Cuda(dm))
        }
    }
}

pub fn build(cfg: &EngineConfig, metrics: Arc<EngineMetrics>) -> Result<Built, String> {
    if cfg.model == "null" {
        let generator = Box::new(super::null::NullModel::new(
            cfg.null_tokens_per_s,
            cfg.max_running,
            cfg.max_waiting,
        ));
        return Ok(Built {
            generator,
            codec: Codec::Null,
            pin_engine: true,
            max_model_len: None,
        });
    }
    if let Some(note) = &cfg.model_note {
        if cfg.model.starts_with("synthetic:") {
            tracing::warn!("{note}");
        } else {
            tracing::info!("{note}");
        }
    }
    let device = select(cfg.device)?;
    // On the GPU the host model only feeds the upload: one CPU thread is enough.
    let threads = match device {
        Selected::Cpu => cfg.cpu_threads,
        Selected::Cuda(_) => 1,
    };
    let (model, tokenizer) = load_model(&cfg.model, cfg.synthetic_seed, threads)?;
    let mc = model.config();
    let max_model_len = match cfg.max_model_len {
        0 => mc.max_position_embeddings.max(1),
        n => n.min(mc.max_position_embeddings.max(1)),
    };
    let num_blocks = KvConfig::blocks_for_bytes(
        cfg.kv_cache_bytes,
        mc.num_layers,
        cfg.kv_block_size,
        mc.num_kv_heads,
        mc.head_dim,
    );
    if num_blocks < 2 {
        return Err(format!(
            "kv_cache_mb: {} MiB holds fewer than 2 KV blocks",
            cfg.kv_cache_bytes >> 20
        ));
    }
    let sched = SchedulerConfig {
        max_running: cfg.max_running,
        max_waiting: cfg.max_waiting,
        step_token_budget: cfg.max_num_batched_tokens,
        block_size: cfg.kv_block_size,
        max_model_len,
    };
    tracing::info!(
        layers = mc.num_layers,
        hidden = mc.hidden_size,
        vocab = mc.vocab_size,
        kv_blocks = num_blocks,
        max_model_len,
        "model loaded: {}",
        cfg.model
    );
    let dc = DeviceConfig {
        ordinal: 0,
        num_blocks,
        block_size: cfg.kv_block_size,
        max_tokens: cfg.max_num_batched_tokens,
        max_seqs: cfg.max_running,
        max_model_len,
        graphs: true,
    };
    let fwd = forward(model, &device, dc)?;
    let eos = tokenizer.eos_ids().to_vec();
    let generator = Box::new(ModelRunner::new(fwd, num_blocks, sched, eos, metrics));
    let codec = Codec::Hf(Arc::new(HfText::new(tokenizer)));
    Ok(Built {
        generator,
        codec,
        pin_engine: false,
        max_model_len: Some(max_model_len),
    })
}

/// One sequence on its own KV cache: the engine-alone path of `seedance-server generate`.
/// Every row comes back as logits (the CLI samples on the host), on either device.
pub struct SingleSequence {
    fwd: Forward,
    alloc: crate::engine::kv::BlockAllocator,
    table: crate::engine::kv::BlockTable,
    pos: usize,
    block_size: usize,
}

impl SingleSequence {
    pub fn new(model: Transformer, max_len: usize, device: &Selected) -> Result<Self, String> {
        let block_size = 16;
        let blocks = max_len.div_ceil(block_size) + 1;
        let dc = DeviceConfig {
            ordinal: 0,
            num_blocks: blocks,
            block_size,
            max_tokens: max_len.max(1),
            max_seqs: 1,
            max_model_len: max_len.max(1),
            graphs: false,
        };
        Ok(Self {
            fwd: forward(model, device, dc)?,
            alloc: crate::engine::kv::BlockAllocator::new(blocks),
            table: crate::engine::kv::BlockTable::new(),
            pos: 0,
            block_size,
        })
    }
}

impl crate::model::generate::LanguageModel for SingleSequence {
    fn vocab_size(&self) -> usize {
        self.fwd.vocab_size()
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, crate::model::generate::GenerateError> {
        use super::forward::RowOut;
        use crate::model::generate::GenerateError;
        use crate::model::transformer::{Logits, SeqInput};
        let end = self.pos + tokens.len();
        self.table
            .reserve(&mut self.alloc, end, self.block_size)
            .map_err(|e| GenerateError::Model(e.to_string()))?;
        let input = SeqInput {
            tokens,
            start_pos: self.pos,
            blocks: &self.table,
            logits: Logits::Last,
        };
        let out = self
            .fwd
            .run(&[input], &[None])
            .map_err(|e| GenerateError::Model(e.to_string()))?;
        let logits = match out.row(0) {
            Some(RowOut::Logits(l)) => l.to_vec(),
            _ => return Err(GenerateError::Model("no logits came back".into())),
        };
        self.pos = end;
        Ok(logits)
    }
}

/// Loads `--model` (directory or `synthetic:<shape>`) for the engine-alone CLI, and picks the
/// device for `--device`.
pub fn load_for_cli(
    spec: &str,
    device_flag: &str,
    seed: u64,
) -> Result<(Transformer, Tokenizer, Selected), String> {
    let dev = match device_flag {
        "auto" => Device::Auto,
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda,
        other => return Err(format!("--device {other}: expected auto, cpu or cuda")),
    };
    let device = select(dev)?;
    if synthetic::is_synthetic(spec) {
        eprintln!("synthetic model {spec}: the weights are RANDOM");
    }
    let (model, tok) = load_model(spec, seed, 0)?;
    Ok((model, tok, device))
}

/// What [`generate_parallel`] did.
#[derive(Debug)]
pub struct ParallelStats {
    pub sequences: usize,
    /// Prompt tokens of each sequence.
    pub prompt_tokens: usize,
    /// Tokens generated by all sequences together.
    pub generated_tokens: usize,
    /// Prefill of every sequence, one after another (each one call over its whole prompt).
    pub prefill: std::time::Duration,
    /// The decode steps, each advancing every sequence by one token.
    pub decode: std::time::Duration,
}

/// `seedance-server generate --parallel N`: N copies of `prompt` on one KV cache, prefilled one
/// after another, then decoded together — each step one batched forward over N rows, the way the
/// server's continuous batching runs N streams (and what llama.cpp's `llama-batched-bench -npl N`
/// times). Every sequence samples with its own sampler and generates exactly `max_tokens`
/// (EOS and stop strings do not end it, so every step has N rows); `on_token(seq, token)` sees
/// each token as it is sampled.
pub fn generate_parallel(
    model: Transformer,
    device: &Selected,
    prompt: &[u32],
    n: usize,
    sampling: &crate::engine::sampler::SamplingParams,
    max_tokens: usize,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<ParallelStats, String> {
    use crate::engine::kv::{BlockAllocator, BlockTable};
    use crate::engine::sampler::Sampler;
    use crate::model::transformer::{Logits, SeqInput};
    use std::time::Instant;
    if prompt.is_empty() || n == 0 || max_tokens == 0 {
        return Err(
            "generate --parallel: needs a prompt, a sequence and a token to generate".into(),
        );
    }
    let block_size = 16;
    let len = prompt.len() + max_tokens;
    let blocks = len.div_ceil(block_size) * n + 1;
    let vocab = model.config().vocab_size;
    let dc = DeviceConfig {
        ordinal: 0,
        num_blocks: blocks,
        block_size,
        max_tokens: prompt.len().max(n),
        max_seqs: n,
        max_model_len: len,
        graphs: false,
    };
    let mut fwd = forward(model, device, dc)?;
    let mut alloc = BlockAllocator::new(blocks);
    let mut tables: Vec<BlockTable> = (0..n).map(|_| BlockTable::new()).collect();
    for t in &mut tables {
        t.reserve(&mut alloc, len, block_size)
            .map_err(|e| e.to_string())?;
    }
    let mut samplers: Vec<Sampler> = (0..n)
        .map(|_| {
            let mut s = Sampler::new(sampling, vocab);
            s.set_prompt_len(prompt.len());
            s
        })
        .collect();
    let mut histories: Vec<Vec<u32>> = vec![prompt.to_vec(); n];
    let mut row = vec![0f32; vocab];
    let start = Instant::now();
    let mut next = vec![0u32; n];
    for seq in 0..n {
        let input = SeqInput {
            tokens: prompt,
            start_pos: 0,
            blocks: &tables[seq],
            logits: Logits::Last,
        };
        let out = fwd.run(&[input], &[None]).map_err(|e| e.to_string())?;
        next[seq] = sample_row(&out, 0, &mut row, &mut samplers[seq], &histories[seq])?;
    }
    let prefill = start.elapsed();
    let device_rows = vec![None; n];
    let mut sampled = vec![0u32; n];
    for step in 0..max_tokens {
        for (seq, &t) in next.iter().enumerate() {
            histories[seq].push(t);
            on_token(seq, t);
        }
        if step + 1 == max_tokens {
            break;
        }
        let inputs: Vec<SeqInput<'_>> = (0..n)
            .map(|seq| SeqInput {
                tokens: std::slice::from_ref(&next[seq]),
                start_pos: prompt.len() + step,
                blocks: &tables[seq],
                logits: Logits::Last,
            })
            .collect();
        let out = fwd.run(&inputs, &device_rows).map_err(|e| e.to_string())?;
        for (seq, t) in sampled.iter_mut().enumerate() {
            *t = sample_row(&out, seq, &mut row, &mut samplers[seq], &histories[seq])?;
        }
        drop(inputs);
        std::mem::swap(&mut next, &mut sampled);
    }
    Ok(ParallelStats {
        sequences: n,
        prompt_tokens: prompt.len(),
        generated_tokens: n * max_tokens,
        prefill,
        decode: start.elapsed().saturating_sub(prefill),
    })
}

/// Samples row `i` of a step: its logits copied into `row` (penalties modify them in place).
fn sample_row(
    out: &super::forward::StepOut<'_>,
    i: usize,
    row: &mut [f32],
    sampler: &mut crate::engine::sampler::Sampler,
    history: &[u32],
) -> Result<u32, String> {
    match out.row(i) {
        Some(super::forward::RowOut::Logits(l)) => row.copy_from_slice(l),
        _ => return Err("no logits came back".to_string()),
    }
    Ok(sampler.sample(row, history).token)
}
