//! The device-resident model (`backend::cuda::model::DeviceModel`, the `--device cuda` serving
//! path) against the CPU reference, on every reference checkpoint in `tests/fixtures/models/`.
//!
//! Greedy equality: the fixture prompts run as one batch (a mixed-length prefill step, then
//! decode steps of 3 sequences: batch bucket 4, one padding row) through `Forward::Cpu` and
//! `Forward::Cuda`, 32 generated tokens each. Two sequences are sampled greedily on the GPU, one
//! comes back as logits and is argmaxed on the host (the host-sampling path). Tokens must be
//! identical up to the first step whose CPU top1 − top2 logit gap is below NEAR_TIE = 2e-2:
//! past a near-tie either choice is right and the continuations may diverge. 2e-2 is twice the
//! fixtures' own 1e-2 (tests/model_fixtures.rs: F16 KV rounding moves logits by ≤ 4.2e-3)
//! because the GPU also stores the query and the attention output in F16 (≤ 2⁻¹¹ relative each).
//! It runs with CUDA graphs (decode steps replayed) and without (every step eager).
//!
//! Without a driver or device every test prints a `skipped:` line and passes;
//! `perf/cuda_check.sh` fails when it sees one on a GPU host.

use seedance::backend::cpu::CpuBackend;
use seedance::backend::cuda::model::{DeviceConfig, DeviceModel};
use seedance::backend::cuda::plan::DeviceSampling;
use seedance::backend::cuda::probe;
use seedance::engine::forward::{Forward, RowOut};
use seedance::engine::kv::{BlockAllocator, BlockTable};
use seedance::engine::sampler::argmax;
use seedance::model::transformer::{Logits, SeqInput, Transformer};
use serde_json::Value;
use std::path::{Path, PathBuf};

const NEAR_TIE: f32 = 2e-2;
const TOKENS: usize = 32;
const BLOCK: usize = 4;
const BLOCKS: usize = 256;

fn fixtures() -> Vec<PathBuf> {
    // A prebuilt executable (perf/gpu_bundle.sh) runs from another checkout: SEEDANCE_REPO.
    let repo = std::env::var_os("SEEDANCE_REPO")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let root = repo.join("tests/fixtures/models");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn prompts(dir: &Path) -> Vec<Vec<u32>> {
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let mut out: Vec<Vec<u32>> = exp["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    // Three sequences of different lengths.
    while out.len() < 3 {
        let mut p = out[0].clone();
        p.truncate(p.len().div_ceil(2));
        out.push(p);
    }
    out.truncate(3);
    out
}

fn load(dir: &Path) -> Transformer {
    Transformer::load(dir, Box::new(CpuBackend::new(1))).unwrap_or_else(|e| panic!("{e}"))
}

fn gpu_ordinal() -> Option<usize> {
    match probe() {
        Ok(d) => Some(d.ordinal),
        Err(e) => {
            println!("skipped: {e}");
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn device(model: &Transformer, ordinal: usize, graphs: bool) -> Forward {
    let dc = DeviceConfig {
        ordinal,
        num_blocks: BLOCKS,
        block_size: BLOCK,
        max_tokens: 512,
        max_seqs: 8,
        max_model_len: 1024,
        graphs,
    };
    Forward::Cuda(DeviceModel::new(model, &dc).unwrap_or_else(|e| panic!("{e}")))
}

/// One generated step per sequence: the token and, when the logits came back, its top-2 gap.
struct Pick {
    token: u32,
    gap: Option<f32>,
}

fn top2_gap(logits: &[f32]) -> f32 {
    let mut v: Vec<f32> = logits.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    v[0] - v.get(1).copied().unwrap_or(f32::NEG_INFINITY)
}

/// Greedy generation of `TOKENS` tokens for every prompt, batched; `gpu_rows[i]` asks the
/// device to sample sequence i (ignored on the CPU).
fn generate(fwd: &mut Forward, prompts: &[Vec<u32>], gpu_rows: &[bool]) -> Vec<Vec<Pick>> {
    let mut alloc = BlockAllocator::new(BLOCKS);
    let mut tables: Vec<BlockTable> = prompts.iter().map(|_| BlockTable::new()).collect();
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut fed = vec![0usize; prompts.len()];
    let mut picks: Vec<Vec<Pick>> = prompts.iter().map(|_| Vec::new()).collect();
    for step in 0..TOKENS {
        for (t, s) in tables.iter_mut().zip(&seqs) {
            t.reserve(&mut alloc, s.len(), BLOCK).unwrap();
        }
        let inputs: Vec<SeqInput<'_>> = seqs
            .iter()
            .zip(&tables)
            .zip(&fed)
            .map(|((s, t), &f)| SeqInput {
                tokens: &s[f..],
                start_pos: f,
                blocks: t,
                logits: Logits::Last,
            })
            .collect();
        let sampling: Vec<Option<DeviceSampling>> = gpu_rows
            .iter()
            .map(|&g| {
                g.then_some(DeviceSampling {
                    step: step as u32,
                    ..DeviceSampling::GREEDY
                })
            })
            .collect();
        let out = fwd
            .run(&inputs, &sampling)
            .unwrap_or_else(|e| panic!("step {step}: {e}"));
        let step_picks: Vec<Pick> = (0..prompts.len())
            .map(|i| match out.row(i).expect("one row per sequence") {
                RowOut::Token(token) => Pick { token, gap: None },
                RowOut::Logits(l) => Pick {
                    token: argmax(l),
                    gap: Some(top2_gap(l)),
                },
            })
            .collect();
        for (i, p) in step_picks.into_iter().enumerate() {
            fed[i] = seqs[i].len();
            seqs[i].push(p.token);
            picks[i].push(p);
        }
    }
    picks
}

/// CPU vs device tokens, up to the first CPU near-tie; returns how many were compared.
fn compare(name: &str, cpu: &[Vec<Pick>], gpu: &[Vec<Pick>]) -> usize {
    let mut compared = 0;
    for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        for (k, (cp, gp)) in c.iter().zip(g).enumerate() {
            let gap = cp.gap.expect("the CPU returns logits");
            if cp.token != gp.token {
                assert!(
                    gap < NEAR_TIE,
                    "{name} seq {i} token {k}: cpu {} vs cuda {} with top-2 gap {gap} ≥ {NEAR_TIE}",
                    cp.token,
                    gp.token
                );
                break;
            }
            compared += 1;
            if gap < NEAR_TIE {
                break;
            }
        }
    }
    compared
}

#[test]
fn greedy_32_tokens_match_the_cpu_on_every_reference_checkpoint() {
    let Some(ordinal) = gpu_ordinal() else { return };
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let prompts = prompts(&dir);
        let rows = [true, false, true];
        let mut cpu = Forward::cpu(load(&dir), BLOCKS, BLOCK);
        let want = generate(&mut cpu, &prompts, &rows);
        for graphs in [true, false] {
            let mut gpu = device(&load(&dir), ordinal, graphs);
            let got = generate(&mut gpu, &prompts, &rows);
            let n = compare(&name, &want, &got);
            eprintln!("{name} (graphs {graphs}): {n} tokens identical before any near-tie");
        }
    }
}

#[test]
fn seeded_gpu_sampling_repeats_and_device_errors_are_results() {
    let Some(ordinal) = gpu_ordinal() else { return };
    let dir = fixtures().remove(0);
    let mut gpu = device(&load(&dir), ordinal, true);
    let mut alloc = BlockAllocator::new(BLOCKS);
    let mut table = BlockTable::new();
    table.reserve(&mut alloc, 64, BLOCK).unwrap();
    let mut run = |seed: u64| -> Vec<u32> {
        let mut toks = vec![1u32, 2, 3, 4, 5];
        let mut fed = 0;
        for step in 0..16u32 {
            let input = SeqInput {
                tokens: &toks[fed..],
                start_pos: fed,
                blocks: &table,
                logits: Logits::Last,
            };
            let s = DeviceSampling {
                temperature: 1.0,
                top_k: 50,
                top_p: 0.95,
                seed,
                step,
            };
            let out = gpu.run(&[input], &[Some(s)]).unwrap();
            let Some(RowOut::Token(t)) = out.row(0) else {
                panic!("a GPU-sampled row came back as logits")
            };
            fed = toks.len();
            toks.push(t);
        }
        toks
    };
    assert_eq!(run(7), run(7), "same seed, same tokens");
    // A bad batch is an error value, and the model serves the next step.
    let bad = SeqInput {
        tokens: &[u32::MAX],
        start_pos: 0,
        blocks: &table,
        logits: Logits::Last,
    };
    assert!(gpu.run(&[bad], &[None]).is_err());
    let good = SeqInput {
        tokens: &[1],
        start_pos: 0,
        blocks: &table,
        logits: Logits::Last,
    };
    assert!(gpu.run(&[good], &[None]).is_ok());
}

#[test]
fn probe_is_an_error_not_a_panic_without_a_device() {
    match probe() {
        Ok(d) => eprintln!("CUDA device: {} ({})", d.name, d.arch()),
        Err(e) => eprintln!("no CUDA device: {e}"),
    }
}
