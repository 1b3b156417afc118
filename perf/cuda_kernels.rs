//! Kernel timings and a device-resident decode step on a GPU host (`perf/cuda_check.sh` runs it:
//! `cargo bench --bench cuda_kernels`). Without a device it prints why and exits 0.
//!
//! Correctness is checked separately (`tests/cuda_ops.rs`, every op against its CPU twin with
//! NaN-poisoned outputs); this file only times. Each row: median of 5 runs of `iters` launches
//! between two CUDA events; GB/s counts the bytes a kernel must move at least once (weights,
//! KV, activations), compared with the measured device-to-device copy bandwidth
//! (2 × bytes / time of a 1 GiB `memcpy_dtod`). TFLOP/s = 2·M·N·K / time for matmuls.
//! Weights and caches are zero-filled: none of these kernels has a value-dependent path.
//!
//! The decode step chains the launchers exactly as the device path in `backend::cuda` describes
//! (embedding → per layer rmsnorm, qkv, rope+KV write, paged attention, o, rmsnorm, gate_up,
//! swiglu, down → norm, LM head, argmax) for `synthetic:llama3.2-1b` and `synthetic:qwen2-7b`
//! shapes at batch 1 and 64, context 512, eagerly and replayed as a CUDA graph
//! (`backend::cuda::graph`): tokens/s = batch / step time, and the fraction of copy bandwidth
//! the weight bytes reach (weight bytes / step time / copy bandwidth).

use cudarc::driver::{sys::CUevent_flags, CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};
use half::f16;
use seedance::backend::cuda::graph::{DecodeGraphs, GraphKey};
use seedance::backend::cuda::ops::{CudaOps, DevAttn};
use seedance::backend::cuda::{probe, CudaBackend, CudaError};

struct Row {
    name: String,
    us: f64,
    gbs: Option<f64>,
    tflops: Option<f64>,
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    o: &CudaOps,
    n: usize,
) -> Result<CudaSlice<T>, CudaError> {
    Ok(o.stream.alloc_zeros::<T>(n.max(1))?)
}

/// Median microseconds per call of `f` over 5 runs of `iters` calls.
fn time(
    o: &mut CudaOps,
    iters: usize,
    mut f: impl FnMut(&mut CudaOps) -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    for _ in 0..3 {
        f(o)?;
    }
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut runs = Vec::new();
    for _ in 0..5 {
        let (a, b) = (o.ctx.new_event(flags)?, o.ctx.new_event(flags)?);
        a.record(&o.stream)?;
        for _ in 0..iters {
            f(o)?;
        }
        b.record(&o.stream)?;
        b.synchronize()?;
        runs.push(a.elapsed_ms(&b)? as f64 * 1e3 / iters as f64);
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[2])
}

struct Model {
    name: &'static str,
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
}

const MODELS: [Model; 2] = [
    Model {
        name: "llama3.2-1b",
        vocab: 128256,
        hidden: 2048,
        inter: 8192,
        layers: 16,
        heads: 32,
        kv_heads: 8,
    },
    Model {
        name: "qwen2-7b",
        vocab: 152064,
        hidden: 3584,
        inter: 18944,
        layers: 28,
        heads: 28,
        kv_heads: 4,
    },
];

fn kernels(o: &mut CudaOps, rows: &mut Vec<Row>) -> Result<(), CudaError> {
    for m in &MODELS {
        let hd = m.hidden / m.heads;
        let qkv = (m.heads + 2 * m.kv_heads) * hd;
        for (what, n, k) in [
            ("qkv", qkv, m.hidden),
            ("gate_up", 2 * m.inter, m.hidden),
            ("down", m.hidden, m.inter),
            ("lm_head", m.vocab, m.hidden),
        ] {
            let w = zeros::<f16>(o, n * k)?;
            for batch in [1usize, 8, 64, 512] {
                let x = zeros::<f16>(o, batch * k)?;
                let mut y = zeros::<f32>(o, batch * n)?;
                let us = time(o, 20, |o| o.matmul(&x, batch, &w, n, k, None, &mut y))?;
                let bytes = (n * k * 2 + batch * (k * 2 + n * 4)) as f64;
                rows.push(Row {
                    name: format!("{} {what} matmul {n}x{k} rows={batch}", m.name),
                    us,
                    gbs: Some(bytes / us / 1e3),
                    tflops: Some(2.0 * (batch * n * k) as f64 / us / 1e6),
                });
            }
        }
        // Decode attention, batch 64, contexts 512 and 4096.
        for ctx in [512usize, 4096] {
            let batch = 64;
            let (bs, per_seq) = (16, ctx.div_ceil(16));
            let nblocks = batch * per_seq;
            let kc = zeros::<f16>(o, nblocks * m.kv_heads * bs * hd)?;
            let vc = zeros::<f16>(o, nblocks * m.kv_heads * bs * hd)?;
            let tables: Vec<u32> = (0..nblocks as u32).collect();
            let td = o.stream.clone_htod(&tables)?;
            let sd = o
                .stream
                .clone_htod(&(0..batch as u32).collect::<Vec<_>>())?;
            let pd = o.stream.clone_htod(&vec![ctx as u32 - 1; batch])?;
            let q = zeros::<f16>(o, batch * m.heads * hd)?;
            let mut out = zeros::<f16>(o, batch * m.heads * hd)?;
            let a = DevAttn {
                heads: m.heads,
                kv_heads: m.kv_heads,
                head_dim: hd,
                block_size: bs,
                max_blocks: per_seq,
                max_context: ctx,
                window: 0,
                scale: 0.1,
            };
            let us = time(o, 20, |o| {
                o.attention(&q, &kc, &vc, &td, &sd, &pd, &a, true, &mut out)
            })?;
            let bytes = (2 * batch * ctx * m.kv_heads * hd * 2) as f64;
            rows.push(Row {
                name: format!("{} decode attention batch={batch} ctx={ctx}", m.name),
                us,
                gbs: Some(bytes / us / 1e3),
                tflops: None,
            });
        }
        // Element-wise ops and sampling at batch 64.
        let batch = 64;
        let mut res = zeros::<f32>(o, batch * m.hidden)?;
        let add = zeros::<f32>(o, batch * m.hidden)?;
        let nw = zeros::<f32>(o, m.hidden)?;
        let mut normed = zeros::<f16>(o, batch * m.hidden)?;
        let us = time(o, 50, |o| {
            o.rmsnorm_residual(&mut res, Some(&add), &nw, 1e-5, &mut normed)
        })?;
        rows.push(Row {
            name: format!("{} rmsnorm+residual batch={batch}", m.name),
            us,
            gbs: Some((batch * m.hidden * (4 * 3 + 2)) as f64 / us / 1e3),
            tflops: None,
        });
        let gu = zeros::<f32>(o, batch * 2 * m.inter)?;
        let mut act = zeros::<f16>(o, batch * m.inter)?;
        let us = time(o, 50, |o| o.swiglu(&gu, m.inter, &mut act))?;
        rows.push(Row {
            name: format!("{} swiglu batch={batch}", m.name),
            us,
            gbs: Some((batch * m.inter * (8 + 2)) as f64 / us / 1e3),
            tflops: None,
        });
        let logits = zeros::<f32>(o, batch * m.vocab)?;
        let mut ids = zeros::<u32>(o, batch)?;
        let us = time(o, 20, |o| o.argmax(&logits, m.vocab, &mut ids))?;
        rows.push(Row {
            name: format!("{} argmax batch={batch}", m.name),
            us,
            gbs: Some((batch * m.vocab * 4) as f64 / us / 1e3),
            tflops: None,
        });
        let t = o.stream.clone_htod(&vec![0.8f32; batch])?;
        let k = o.stream.clone_htod(&vec![50u32; batch])?;
        let p = o.stream.clone_htod(&vec![0.9f32; batch])?;
        let s = o.stream.clone_htod(&vec![7u64; batch])?;
        let st = zeros::<u32>(o, batch)?;
        let us = time(o, 5, |o| {
            o.sample(&logits, m.vocab, &t, &k, &p, &s, &st, &mut ids)
        })?;
        rows.push(Row {
            name: format!("{} sample top-k 50 top-p 0.9 batch={batch}", m.name),
            us,
            gbs: None,
            tflops: None,
        });
    }
    Ok(())
}

/// One decode step of `m` at `batch` rows, context `ctx`, on device buffers; returns µs/step.
fn decode_step(
    o: &mut CudaOps,
    m: &Model,
    batch: usize,
    ctx: usize,
) -> Result<(f64, f64, usize), CudaError> {
    let hd = m.hidden / m.heads;
    let qkv_n = (m.heads + 2 * m.kv_heads) * hd;
    let (bs, per_seq) = (16usize, (ctx + 1).div_ceil(16));
    let nblocks = batch * per_seq;
    struct Layer {
        qkv: CudaSlice<f16>,
        o: CudaSlice<f16>,
        gu: CudaSlice<f16>,
        down: CudaSlice<f16>,
        n1: CudaSlice<f32>,
        n2: CudaSlice<f32>,
        kc: CudaSlice<f16>,
        vc: CudaSlice<f16>,
    }
    let mut layers = Vec::new();
    for _ in 0..m.layers {
        layers.push(Layer {
            qkv: zeros(o, qkv_n * m.hidden)?,
            o: zeros(o, m.hidden * m.hidden)?,
            gu: zeros(o, 2 * m.inter * m.hidden)?,
            down: zeros(o, m.hidden * m.inter)?,
            n1: zeros(o, m.hidden)?,
            n2: zeros(o, m.hidden)?,
            kc: zeros(o, nblocks * m.kv_heads * bs * hd)?,
            vc: zeros(o, nblocks * m.kv_heads * bs * hd)?,
        });
    }
    let weight_bytes =
        2 * (m.layers * (qkv_n + m.hidden + 3 * m.inter) * m.hidden + 2 * m.vocab * m.hidden);
    let embed = zeros::<f16>(o, m.vocab * m.hidden)?;
    let head = zeros::<f16>(o, m.vocab * m.hidden)?;
    let fnorm = zeros::<f32>(o, m.hidden)?;
    let inv_freq = zeros::<f32>(o, hd / 2)?;
    let tokens = zeros::<u32>(o, batch)?;
    let pos = o.stream.clone_htod(&vec![ctx as u32; batch])?;
    let slots: Vec<u32> = (0..batch)
        .map(|b| ((b * per_seq) * bs + ctx) as u32)
        .collect();
    let slots = o.stream.clone_htod(&slots)?;
    let tables = o
        .stream
        .clone_htod(&(0..nblocks as u32).collect::<Vec<_>>())?;
    let tok_seq = o
        .stream
        .clone_htod(&(0..batch as u32).collect::<Vec<_>>())?;
    let mut resid = zeros::<f32>(o, batch * m.hidden)?;
    let mut xh = zeros::<f16>(o, batch * m.hidden.max(m.inter))?;
    let mut qkv = zeros::<f32>(o, batch * qkv_n)?;
    let mut q = zeros::<f16>(o, batch * m.heads * hd)?;
    let mut attn = zeros::<f16>(o, batch * m.heads * hd)?;
    let mut branch = zeros::<f32>(o, batch * m.hidden)?;
    let mut gu = zeros::<f32>(o, batch * 2 * m.inter)?;
    let mut logits = zeros::<f32>(o, batch * m.vocab)?;
    let mut ids = zeros::<u32>(o, batch)?;
    let a = DevAttn {
        heads: m.heads,
        kv_heads: m.kv_heads,
        head_dim: hd,
        block_size: bs,
        max_blocks: per_seq,
        max_context: ctx + 1,
        window: 0,
        scale: 0.1,
    };
    let mut step = |o: &mut CudaOps| -> Result<(), CudaError> {
        o.embedding(&tokens, &embed, m.vocab, m.hidden, &mut resid)?;
        let mut first = true;
        for l in layers.iter_mut() {
            let add: Option<&dyn DevicePtr<f32>> = if first { None } else { Some(&branch) };
            first = false;
            o.rmsnorm_residual(&mut resid, add, &l.n1, 1e-5, &mut xh)?;
            o.matmul(&xh, batch, &l.qkv, qkv_n, m.hidden, None, &mut qkv)?;
            o.rope_qkv_cache(
                &qkv, None, &pos, &slots, &inv_freq, &mut q, &mut l.kc, &mut l.vc, &a, hd, 1.0,
            )?;
            o.attention(
                &q, &l.kc, &l.vc, &tables, &tok_seq, &pos, &a, true, &mut attn,
            )?;
            o.matmul(&attn, batch, &l.o, m.hidden, m.hidden, None, &mut branch)?;
            o.rmsnorm_residual(&mut resid, Some(&branch), &l.n2, 1e-5, &mut xh)?;
            o.matmul(&xh, batch, &l.gu, 2 * m.inter, m.hidden, None, &mut gu)?;
            o.swiglu(&gu, m.inter, &mut xh)?;
            o.matmul(&xh, batch, &l.down, m.hidden, m.inter, None, &mut branch)?;
        }
        o.rmsnorm_residual(&mut resid, Some(&branch), &fnorm, 1e-5, &mut xh)?;
        o.matmul(&xh, batch, &head, m.vocab, m.hidden, None, &mut logits)?;
        o.argmax(&logits, m.vocab, &mut ids)
    };
    let eager = time(o, 3, &mut step)?;
    let key = GraphKey {
        batch_bucket: batch,
        ctx_bucket: ctx + 1,
    };
    let mut graphs = DecodeGraphs::default();
    let graphed = time(o, 3, |o| graphs.run(o, key, &mut step))?;
    Ok((eager, graphed, weight_bytes))
}

fn copy_bandwidth(o: &mut CudaOps) -> Result<f64, CudaError> {
    let n = 1usize << 30;
    let src = zeros::<u8>(o, n)?;
    let mut dst = zeros::<u8>(o, n)?;
    let us = time(o, 10, |o| Ok(o.stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * n as f64 / us / 1e3)
}

fn run() -> Result<(), CudaError> {
    let dev = match probe() {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: {e}");
            return Ok(());
        }
    };
    let be = CudaBackend::new(dev.ordinal)?;
    be.with_ops(|o| {
        let bw = copy_bandwidth(o)?;
        println!(
            "device: {} ({}), copy bandwidth {bw:.0} GB/s (device-to-device, read+write)",
            dev.name,
            dev.arch()
        );
        let mut rows = Vec::new();
        kernels(o, &mut rows)?;
        println!(
            "\n{:<58} {:>10} {:>9} {:>7} {:>9}",
            "kernel", "us", "GB/s", "%copy", "TFLOP/s"
        );
        for r in &rows {
            let gbs = r.gbs.map_or("-".into(), |g| format!("{g:.0}"));
            let pct = r
                .gbs
                .map_or("-".into(), |g| format!("{:.0}%", 100.0 * g / bw));
            let tf = r.tflops.map_or("-".into(), |t| format!("{t:.1}"));
            println!(
                "{:<58} {:>10.1} {:>9} {:>7} {:>9}",
                r.name, r.us, gbs, pct, tf
            );
        }
        println!(
            "\n{:<40} {:>6} {:>13} {:>13} {:>10} {:>12}",
            "decode step (device-resident, ctx 512)",
            "batch",
            "eager ms",
            "graph ms",
            "tokens/s",
            "weights %bw"
        );
        for m in &MODELS {
            for batch in [1usize, 64] {
                let (eager, graphed, wbytes) = decode_step(o, m, batch, 512)?;
                let best = eager.min(graphed);
                let pct = 100.0 * wbytes as f64 / best / 1e3 / bw;
                println!(
                    "{:<40} {:>6} {:>13.3} {:>13.3} {:>10.0} {:>11.0}%",
                    m.name,
                    batch,
                    eager / 1e3,
                    graphed / 1e3,
                    batch as f64 * 1e6 / best,
                    pct
                );
            }
        }
        Ok(())
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("cuda_kernels: {e}");
        std::process::exit(1);
    }
}
