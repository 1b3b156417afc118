//! From `--model` / `--device` to a running generator and the shards' text codec.

use std::path::Path;
use std::sync::Arc;

use super::runner::ModelRunner;
use super::scheduler::SchedulerConfig;
use super::thread::Generator;
use crate::backend::cpu::CpuBackend;
use crate::config::{Device, EngineConfig};
use crate::engine::kv::KvConfig;
use crate::metrics::EngineMetrics;
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
}

/// The compute backend for `--device`: `auto` picks CUDA when the driver library is present and
/// a device answers, else the CPU (one log line says which). The CUDA backend behind the
/// `Backend` trait copies activations over PCIe per call (a correctness bridge; see
/// `backend/cuda/mod.rs`), and has not yet run on a GPU in this project.
pub fn backend(
    requested: Device,
    cpu_threads: usize,
) -> Result<Box<dyn crate::backend::Backend>, String> {
    use crate::backend::cuda::device::{select, Selected};
    Ok(match select(requested)? {
        Selected::Cpu => Box::new(CpuBackend::new(cpu_threads)),
        Selected::Cuda(d) => Box::new(
            crate::backend::cuda::backend::CudaBackend::new(d.ordinal)
                .map_err(|e| e.to_string())?,
        ),
    })
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
        });
    }
    let backend = backend(cfg.device, cfg.cpu_threads)?;
    let (model, tok_dir) = if synthetic::is_synthetic(&cfg.model) {
        let s =
            synthetic::build(&cfg.model, cfg.synthetic_seed, backend).map_err(|e| e.to_string())?;
        tracing::warn!(shape = %s.shape, "synthetic model: the weights are RANDOM, output is gibberish by design");
        (s.model, s.tokenizer_dir)
    } else {
        let dir = Path::new(&cfg.model);
        if !dir.is_dir() {
            return Err(format!(
                "{}: not a directory (expected a Hugging Face checkpoint)",
                cfg.model
            ));
        }
        (
            Transformer::load(dir, backend).map_err(|e| e.to_string())?,
            dir.to_path_buf(),
        )
    };
    let tokenizer = Tokenizer::from_dir(&tok_dir).map_err(|e| e.to_string())?;
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
    let eos = tokenizer.eos_ids().to_vec();
    let generator = Box::new(ModelRunner::new(model, num_blocks, sched, eos, metrics));
    let codec = Codec::Hf(Arc::new(HfText::new(tokenizer)));
    Ok(Built {
        generator,
        codec,
        pin_engine: false,
    })
}

/// One sequence on its own KV cache: the engine-alone path of `seedance-server generate`.
pub struct SingleSequence {
    model: Transformer,
    kv: crate::engine::kv::KvCache,
    alloc: crate::engine::kv::BlockAllocator,
    table: crate::engine::kv::BlockTable,
    scratch: crate::model::transformer::Scratch,
    pos: usize,
    block_size: usize,
}

impl SingleSequence {
    pub fn new(model: Transformer, max_len: usize) -> Self {
        let block_size = 16;
        let blocks = max_len.div_ceil(block_size) + 1;
        let kv = crate::engine::kv::KvCache::new(model.kv_config(blocks, block_size));
        Self {
            model,
            kv,
            alloc: crate::engine::kv::BlockAllocator::new(blocks),
            table: crate::engine::kv::BlockTable::new(),
            scratch: Default::default(),
            pos: 0,
            block_size,
        }
    }
}

impl crate::model::generate::LanguageModel for SingleSequence {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, crate::model::generate::GenerateError> {
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
        let logits = self
            .model
            .forward(&[input], &mut self.kv, &mut self.scratch)
            .map_err(|e| GenerateError::Model(e.to_string()))?;
        self.pos = end;
        Ok(logits.to_vec())
    }
}

/// Loads `--model` (directory or `synthetic:<shape>`) for the engine-alone CLI.
pub fn load_for_cli(
    spec: &str,
    device_flag: &str,
    seed: u64,
) -> Result<(Transformer, Tokenizer), String> {
    let dev = match device_flag {
        "auto" => Device::Auto,
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda,
        other => return Err(format!("--device {other}: expected auto, cpu or cuda")),
    };
    let backend = backend(dev, 0)?;
    if synthetic::is_synthetic(spec) {
        let s = synthetic::build(spec, seed, backend).map_err(|e| e.to_string())?;
        eprintln!("synthetic model {}: the weights are RANDOM", s.shape);
        let tok = Tokenizer::from_dir(&s.tokenizer_dir).map_err(|e| e.to_string())?;
        return Ok((s.model, tok));
    }
    let dir = Path::new(spec);
    if !dir.is_dir() {
        return Err(format!(
            "{spec}: not a directory (expected a Hugging Face checkpoint)"
        ));
    }
    let model = Transformer::load(dir, backend).map_err(|e| e.to_string())?;
    let tok = Tokenizer::from_dir(dir).map_err(|e| e.to_string())?;
    Ok((model, tok))
}
