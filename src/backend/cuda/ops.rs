//! Launchers: one method per kernel, on device buffers. Each checks its shape preconditions
//! (returning [`CudaError::Shape`]), launches on the compute stream and checks the result; every
//! launch names, in a `// SAFETY:` comment, the buffer sizes the kernel reads and writes.
//!
//! Conventions (FP16 storage, FP32 accumulation): weights, KV cache, matmul inputs and attention
//! in/out are F16; matmul outputs, the residual stream, norm weights, RoPE tables and logits are
//! F32. Nothing here allocates except the split-K / split-KV workspaces, which grow to the largest
//! shape seen and are then reused; each growth bumps [`CudaOps::workspace_epoch`], so captured
//! CUDA graphs (which hold the old addresses) know to re-capture.
//!
//! Buffers are anything cudarc can give a device address for (`CudaSlice`, `CudaView`,
//! `CudaViewMut`): the device-resident model passes views of fixed-size workspaces cut to the
//! step's row count, and a launcher derives the row count from those lengths.

use super::nvrtc::{self, KERNELS};
use super::CudaError;
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use half::f16;
use std::collections::HashMap;
use std::sync::Arc;

/// Largest GQA group the decode kernel instantiates (paged_attention.cu MAX_G).
pub const MAX_GROUP: usize = 8;
/// Largest head_dim the attention kernels support (MAX_HD).
pub const MAX_HEAD_DIM: usize = 256;
/// Keys per split of the decode kernel (<= MAX_SPLIT = 512 in paged_attention.cu).
pub const SPLIT_LEN: usize = 512;
/// Token rows up to which matmul uses the GEMV kernels (gemv_f16_t1..t8).
pub const GEMV_MAX_ROWS: usize = 8;

/// A device, its compute stream and every kernel, loaded.
pub struct CudaOps {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    sm_count: usize,
    /// gemv split-K partials, (splits, rows, N) F32.
    gemv_ws: Option<CudaSlice<f32>>,
    /// decode split-KV partials: accumulators (n, heads, splits, hd) and (max, sum) pairs.
    attn_acc: Option<CudaSlice<f32>>,
    attn_ml: Option<CudaSlice<f32>>,
    /// Bumped whenever a workspace is reallocated (see the module doc).
    epoch: u64,
}

/// Shape of an attention call on device buffers (the metadata arrays are on the device too).
#[derive(Debug, Clone, Copy)]
pub struct DevAttn {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Row length of `block_tables` (num_seqs, max_blocks).
    pub max_blocks: usize,
    /// Longest context among the rows, to size split-KV.
    pub max_context: usize,
    /// 0 = no sliding window.
    pub window: usize,
    pub scale: f32,
}

fn shape(cond: bool, msg: impl FnOnce() -> String) -> Result<(), CudaError> {
    if cond {
        Ok(())
    } else {
        Err(CudaError::Shape(msg()))
    }
}

/// The device address of `x` as a kernel argument. cudarc's guard (the second value) records
/// events only when event tracking is on; [`CudaOps::new`] turns it off for the context (one
/// stream orders every access), so dropping the guard at once is sound.
fn dptr<T>(x: &(impl DevicePtr<T> + ?Sized), s: &CudaStream) -> u64 {
    x.device_ptr(s).0
}

/// [`dptr`] for a buffer the kernel writes.
fn dptr_mut<T>(x: &mut (impl DevicePtrMut<T> + ?Sized), s: &CudaStream) -> u64 {
    x.device_ptr_mut(s).0
}

/// `Some(x)` → its address, `None` → the null pointer the kernels test for.
fn opt_ptr<T>(x: Option<&dyn DevicePtr<T>>, s: &CudaStream) -> u64 {
    x.map_or(0, |x| x.device_ptr(s).0)
}

fn u32_of(v: usize, what: &str) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::Shape(format!("{what} = {v} does not fit in u32")))
}

fn grid(x: usize, y: usize, z: usize, block: u32) -> Result<LaunchConfig, CudaError> {
    Ok(LaunchConfig {
        grid_dim: (
            u32_of(x, "grid.x")?,
            u32_of(y, "grid.y")?,
            u32_of(z, "grid.z")?,
        ),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    })
}

const PREFILL_ATTN: &str = "prefill_attn";

/// The kernel an attention call launches: the split-KV decode kernel instantiated for the GQA
/// group, or the causal prefill kernel — for prefill, and for decode steps whose group is wider
/// than [`MAX_GROUP`] (it is exact for one-token rows too; e.g. 128 heads over 8 kv heads).
pub fn attention_kernel(decode: bool, group: usize) -> &'static str {
    const DECODE: [&str; MAX_GROUP] = [
        "paged_attn_decode_g1",
        "paged_attn_decode_g2",
        "paged_attn_decode_g3",
        "paged_attn_decode_g4",
        "paged_attn_decode_g5",
        "paged_attn_decode_g6",
        "paged_attn_decode_g7",
        "paged_attn_decode_g8",
    ];
    match group.checked_sub(1).and_then(|g| DECODE.get(g)) {
        Some(name) if decode => name,
        _ => PREFILL_ATTN,
    }
}

/// See [`CudaOps::decode_splits`]; aims at two blocks per SM.
pub fn decode_splits(sm_count: usize, n: usize, kv_heads: usize, ctx_len: usize) -> usize {
    let min_splits = ctx_len.div_ceil(SPLIT_LEN).max(1);
    let want = (2 * sm_count).div_ceil((n * kv_heads).max(1));
    let cap = (ctx_len / 64).max(1);
    min_splits.max(want.min(cap))
}

impl CudaOps {
    /// Opens device `ordinal` and loads every kernel (compiled or from the CUBIN cache).
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        let info = super::device::probe_ordinal(ordinal).map_err(CudaError::NoDevice)?;
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        // SAFETY: every buffer of this backend is used on this one stream, whose order already
        // serialises the accesses; cudarc's per-slice events (made for multi-stream use) would
        // only add event records and waits, and a wait on an event recorded before a graph
        // capture invalidates the capture.
        unsafe { ctx.disable_event_tracking() };
        let arch = info.arch();
        let mut funcs = HashMap::new();
        for k in KERNELS {
            let bin = nvrtc::cubin(k, &arch)?;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin))?;
            for &f in k.functions {
                funcs.insert(f, module.load_function(f)?);
            }
        }
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map(|v| v.max(1) as usize)?;
        Ok(Self {
            ctx,
            stream,
            funcs,
            sm_count,
            gemv_ws: None,
            attn_acc: None,
            attn_ml: None,
            epoch: 0,
        })
    }

    /// Changes whenever a workspace moved; a graph captured under another epoch is stale.
    pub fn workspace_epoch(&self) -> u64 {
        self.epoch
    }

    /// Streaming multiprocessors of the device (split-K / split-KV choices).
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    fn f(&self, name: &'static str) -> Result<&CudaFunction, CudaError> {
        self.funcs
            .get(name)
            .ok_or_else(|| CudaError::Nvrtc(format!("kernel {name} not loaded")))
    }

    /// Grows a workspace to at least `n` elements (bumping `epoch` when it moves).
    fn ensure(
        stream: &Arc<CudaStream>,
        epoch: &mut u64,
        ws: &mut Option<CudaSlice<f32>>,
        n: usize,
    ) -> Result<(), CudaError> {
        if ws.as_ref().is_none_or(|w| w.len() < n) {
            *ws = Some(stream.alloc_zeros::<f32>(n.max(1))?);
            *epoch += 1;
        }
        Ok(())
    }

    /// out (n, hidden) F32 = table[tokens]; tokens >= vocab give zero rows.
    pub fn embedding(
        &self,
        tokens: &impl DevicePtr<u32>,
        table: &impl DevicePtr<f16>,
        vocab: usize,
        hidden: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), CudaError> {
        let n = tokens.len();
        shape(hidden.is_multiple_of(8), || {
            format!("embedding: hidden {hidden} % 8")
        })?;
        shape(table.len() >= vocab * hidden, || {
            "embedding: table size".into()
        })?;
        shape(out.len() >= n * hidden, || "embedding: out size".into())?;
        if n == 0 {
            return Ok(());
        }
        let (v, h) = (u32_of(vocab, "vocab")?, u32_of(hidden, "hidden")?);
        let s = &self.stream;
        let (tp, wp, op) = (dptr(tokens, s), dptr(table, s), dptr_mut(out, s));
        let mut b = s.launch_builder(self.f("embedding_f16")?);
        b.arg(&tp).arg(&wp).arg(&op).arg(&v).arg(&h);
        // SAFETY: tokens has n entries; table >= vocab*hidden halfs (rows read only for tok < vocab);
        // out >= n*hidden floats; hidden % 8 == 0 keeps the 16-byte loads in the row.
        unsafe { b.launch(grid(n, 1, 1, 256)?) }?;
        Ok(())
    }

    /// residual (n, dim) += add; out (n, dim) F16 = rmsnorm(residual) · weight.
    pub fn rmsnorm_residual(
        &self,
        residual: &mut impl DevicePtrMut<f32>,
        add: Option<&dyn DevicePtr<f32>>,
        weight: &impl DevicePtr<f32>,
        eps: f32,
        out: &mut impl DevicePtrMut<f16>,
    ) -> Result<(), CudaError> {
        let dim = weight.len();
        shape(dim > 0 && residual.len().is_multiple_of(dim), || {
            "rmsnorm: residual not (n, dim)".into()
        })?;
        let n = residual.len() / dim;
        shape(add.is_none_or(|a| a.len() == residual.len()), || {
            "rmsnorm: add size".into()
        })?;
        shape(out.len() >= n * dim, || "rmsnorm: out size".into())?;
        if n == 0 {
            return Ok(());
        }
        let d = u32_of(dim, "dim")?;
        let s = &self.stream;
        let (rp, ap, wp, op) = (
            dptr_mut(residual, s),
            opt_ptr(add, s),
            dptr(weight, s),
            dptr_mut(out, s),
        );
        let mut b = s.launch_builder(self.f("rmsnorm_residual")?);
        b.arg(&rp).arg(&ap).arg(&wp).arg(&op).arg(&d).arg(&eps);
        // SAFETY: residual (and add, if any) hold n*dim floats, weight dim floats, out >= n*dim
        // halfs; one block per row reads/writes only its row.
        unsafe { b.launch(grid(n, 1, 1, 256)?) }?;
        Ok(())
    }

    /// Splits qkv (n, (heads + 2·kv_heads)·hd) F32 (+bias), rotates q and k by their positions,
    /// writes q (n, heads, hd) F16 and K/V into cache slot `slots[t]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qkv_cache(
        &self,
        qkv: &impl DevicePtr<f32>,
        bias: Option<&dyn DevicePtr<f32>>,
        positions: &impl DevicePtr<u32>,
        slots: &impl DevicePtr<u32>,
        inv_freq: &impl DevicePtr<f32>,
        q_out: &mut impl DevicePtrMut<f16>,
        k_cache: &mut impl DevicePtrMut<f16>,
        v_cache: &mut impl DevicePtrMut<f16>,
        a: &DevAttn,
        rotary_dim: usize,
        scaling: f32,
    ) -> Result<(), CudaError> {
        let n = positions.len();
        let cols = a.heads + 2 * a.kv_heads;
        shape(slots.len() == n, || "rope: slots/positions length".into())?;
        shape(qkv.len() == n * cols * a.head_dim, || {
            "rope: qkv size".into()
        })?;
        shape(bias.is_none_or(|b| b.len() == cols * a.head_dim), || {
            "rope: bias size".into()
        })?;
        shape(
            rotary_dim.is_multiple_of(2) && rotary_dim <= a.head_dim,
            || "rope: rotary_dim".into(),
        )?;
        shape(inv_freq.len() >= rotary_dim / 2, || {
            "rope: inv_freq length".into()
        })?;
        shape(q_out.len() >= n * a.heads * a.head_dim, || {
            "rope: q_out size".into()
        })?;
        shape(k_cache.len() == v_cache.len(), || {
            "rope: k/v cache sizes".into()
        })?;
        shape(
            k_cache
                .len()
                .is_multiple_of(a.kv_heads.max(1) * a.block_size * a.head_dim),
            || "rope: cache not (blocks, kv_heads, block_size, hd)".into(),
        )?;
        if n == 0 {
            return Ok(());
        }
        let (h, kv, hd, rd, bs) = (
            u32_of(a.heads, "heads")?,
            u32_of(a.kv_heads, "kv_heads")?,
            u32_of(a.head_dim, "head_dim")?,
            u32_of(rotary_dim, "rotary_dim")?,
            u32_of(a.block_size, "block_size")?,
        );
        let s = &self.stream;
        let (xp, bp, pp, sp, fp) = (
            dptr(qkv, s),
            opt_ptr(bias, s),
            dptr(positions, s),
            dptr(slots, s),
            dptr(inv_freq, s),
        );
        let (qp, kp, vp) = (
            dptr_mut(q_out, s),
            dptr_mut(k_cache, s),
            dptr_mut(v_cache, s),
        );
        let mut b = s.launch_builder(self.f("rope_qkv_cache")?);
        b.arg(&xp).arg(&bp).arg(&pp).arg(&sp).arg(&fp);
        b.arg(&qp).arg(&kp).arg(&vp);
        b.arg(&h).arg(&kv).arg(&hd).arg(&rd).arg(&bs).arg(&scaling);
        // SAFETY: qkv = n*cols*hd floats, q_out >= n*heads*hd halfs, inv_freq >= rotary_dim/2;
        // slots[t] must be < num_blocks*block_size: the callers build slots from block tables of
        // this cache (CudaBackend asserts it, the device model's planner checks every block id),
        // so K/V writes stay in the cache.
        unsafe { b.launch(grid(n, cols, 1, 64)?) }?;
        Ok(())
    }

    /// out (n, inter) F16 = silu(gate) · up, gate_up (n, 2·inter) F32.
    pub fn swiglu(
        &self,
        gate_up: &impl DevicePtr<f32>,
        inter: usize,
        out: &mut impl DevicePtrMut<f16>,
    ) -> Result<(), CudaError> {
        shape(inter > 0 && gate_up.len().is_multiple_of(2 * inter), || {
            "swiglu: gate_up size".into()
        })?;
        let n = gate_up.len() / (2 * inter);
        shape(out.len() >= n * inter, || "swiglu: out size".into())?;
        if n == 0 {
            return Ok(());
        }
        let (nn, i) = (u32_of(n, "n")?, u32_of(inter, "inter")?);
        let s = &self.stream;
        let (gp, op) = (dptr(gate_up, s), dptr_mut(out, s));
        let mut b = s.launch_builder(self.f("swiglu")?);
        b.arg(&gp).arg(&op).arg(&nn).arg(&i);
        // SAFETY: gate_up n*2*inter floats, out >= n*inter halfs; threads past n*inter return.
        unsafe { b.launch(grid((n * inter).div_ceil(256), 1, 1, 256)?) }?;
        Ok(())
    }

    /// y (rows, n_out) F32 = x (rows, k) F16 · wᵀ (+bias); GEMV for rows <= 8, else the mma GEMM.
    /// `w` is row-major `(n_out, k)` as in the checkpoint.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &mut self,
        x: &impl DevicePtr<f16>,
        rows: usize,
        w: &impl DevicePtr<f16>,
        n_out: usize,
        k: usize,
        bias: Option<&dyn DevicePtr<f32>>,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), CudaError> {
        shape(x.len() >= rows * k, || "matmul: x size".into())?;
        shape(w.len() == n_out * k, || "matmul: w size".into())?;
        shape(y.len() >= rows * n_out, || "matmul: y size".into())?;
        shape(bias.is_none_or(|b| b.len() == n_out), || {
            "matmul: bias size".into()
        })?;
        if rows == 0 {
            return Ok(());
        }
        let s = self.stream.clone();
        let (xp, wp, bp, yp) = (dptr(x, &s), dptr(w, &s), opt_ptr(bias, &s), dptr_mut(y, &s));
        if rows <= GEMV_MAX_ROWS && k.is_multiple_of(8) {
            self.gemv(xp, rows, wp, n_out, k, bp, yp)
        } else {
            self.gemm(xp, rows, wp, n_out, k, bp, yp)
        }
    }

    /// Split-KV count of a decode call: at least ceil(ctx / SPLIT_LEN) (the shared score buffer
    /// holds SPLIT_LEN keys), more when n·kv_heads blocks would leave SMs idle (batch 1 has
    /// only kv_heads blocks), but never under 64 keys per split. Part of a decode graph's key.
    pub fn decode_splits(&self, n: usize, kv_heads: usize, ctx_len: usize) -> usize {
        decode_splits(self.sm_count, n, kv_heads, ctx_len)
    }

    /// Split-K factor: enough blocks for ~2 waves of 4-row blocks, K split in 256-column units.
    fn gemv_splits(&self, n_out: usize, k: usize) -> usize {
        let blocks = n_out.div_ceil(4);
        let mut s = 1;
        while blocks * s < 2 * self.sm_count * 4 && k.is_multiple_of(256 * s * 2) && s < 16 {
            s *= 2;
        }
        s
    }

    /// Pointers checked by [`CudaOps::matmul`]: x (rows, K) F16, w (N, K) F16, bias (N,) F32 or
    /// 0, y (rows, N) F32.
    #[allow(clippy::too_many_arguments)]
    fn gemv(
        &mut self,
        x: u64,
        rows: usize,
        w: u64,
        n_out: usize,
        k: usize,
        bias: u64,
        y: u64,
    ) -> Result<(), CudaError> {
        shape(
            k.is_multiple_of(8) && (1..=GEMV_MAX_ROWS).contains(&rows),
            || format!("gemv: K = {k} must be a multiple of 8, rows {rows} in 1..=8"),
        )?;
        const NAMES: [&str; 8] = [
            "gemv_f16_t1",
            "gemv_f16_t2",
            "gemv_f16_t3",
            "gemv_f16_t4",
            "gemv_f16_t5",
            "gemv_f16_t6",
            "gemv_f16_t7",
            "gemv_f16_t8",
        ];
        let splits = self.gemv_splits(n_out, k);
        let (n32, k32, s32, r32) = (
            u32_of(n_out, "N")?,
            u32_of(k, "K")?,
            u32_of(splits, "splits")?,
            u32_of(rows, "rows")?,
        );
        let cfg = grid(n_out.div_ceil(4), splits, 1, 128)?;
        let f = self.f(NAMES[rows - 1])?.clone();
        if splits == 1 {
            let mut b = self.stream.launch_builder(&f);
            b.arg(&x).arg(&w).arg(&bias).arg(&y).arg(&n32).arg(&k32);
            // SAFETY: x >= rows*K halfs, w = N*K halfs, y >= rows*N floats, bias N floats
            // (checked by matmul); K % 8 == 0 so every 16-byte load is inside its row.
            unsafe { b.launch(cfg) }?;
            return Ok(());
        }
        let red = self.f("gemv_reduce")?.clone();
        Self::ensure(
            &self.stream,
            &mut self.epoch,
            &mut self.gemv_ws,
            splits * rows * n_out,
        )?;
        let ws = self
            .gemv_ws
            .as_mut()
            .ok_or(CudaError::Shape("gemv workspace".into()))?;
        let wsp = dptr_mut(ws, &self.stream);
        let null = 0u64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&x).arg(&w).arg(&null).arg(&wsp).arg(&n32).arg(&k32);
        // SAFETY: as above; partials go to ws >= splits*rows*N floats; K % (256*splits) == 0
        // (gemv_splits only doubles while that holds).
        unsafe { b.launch(cfg) }?;
        let mut b = self.stream.launch_builder(&red);
        b.arg(&wsp).arg(&bias).arg(&y).arg(&r32).arg(&n32).arg(&s32);
        // SAFETY: ws holds splits*rows*N partials, y >= rows*N floats.
        unsafe { b.launch(grid((rows * n_out).div_ceil(256), 1, 1, 256)?) }?;
        Ok(())
    }

    /// Pointers as for [`CudaOps::gemv`].
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        x: u64,
        rows: usize,
        w: u64,
        n_out: usize,
        k: usize,
        bias: u64,
        y: u64,
    ) -> Result<(), CudaError> {
        shape(k.is_multiple_of(32), || {
            format!("gemm: K = {k} must be a multiple of 32")
        })?;
        let to_i32 = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| CudaError::Shape(format!("gemm: {what} = {v} > i32")))
        };
        let (m, n, kk) = (to_i32(rows, "M")?, to_i32(n_out, "N")?, to_i32(k, "K")?);
        let mut b = self.stream.launch_builder(self.f("gemm_f16_mma")?);
        b.arg(&x)
            .arg(&w)
            .arg(&bias)
            .arg(&y)
            .arg(&m)
            .arg(&n)
            .arg(&kk);
        // SAFETY: A = x >= M*K halfs, B = w = N*K halfs, C = y >= M*N floats (checked by
        // matmul); K % 32 == 0; rows past M / N are zero-filled on load and skipped on store.
        unsafe { b.launch(grid(n_out.div_ceil(128), rows.div_ceil(128), 1, 256)?) }?;
        Ok(())
    }

    /// Attention for n query rows over the paged cache. `decode` = every row is its sequence's
    /// only new token (the split-KV GQA kernel, for GQA groups up to [`MAX_GROUP`]); otherwise
    /// the causal prefill kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        q: &impl DevicePtr<f16>,
        k_cache: &impl DevicePtr<f16>,
        v_cache: &impl DevicePtr<f16>,
        block_tables: &impl DevicePtr<u32>,
        tok_seq: &impl DevicePtr<u32>,
        positions: &impl DevicePtr<u32>,
        a: &DevAttn,
        decode: bool,
        out: &mut impl DevicePtrMut<f16>,
    ) -> Result<(), CudaError> {
        let n = positions.len();
        shape(
            a.kv_heads > 0 && a.heads >= a.kv_heads && a.heads.is_multiple_of(a.kv_heads),
            || "attention: heads % kv_heads".into(),
        )?;
        shape(
            a.head_dim > 0 && a.head_dim <= MAX_HEAD_DIM && a.head_dim.is_multiple_of(8),
            || {
                format!(
                    "attention: head_dim {} must be a multiple of 8, <= 256",
                    a.head_dim
                )
            },
        )?;
        shape(tok_seq.len() == n, || "attention: tok_seq length".into())?;
        shape(q.len() >= n * a.heads * a.head_dim, || {
            "attention: q size".into()
        })?;
        shape(out.len() >= n * a.heads * a.head_dim, || {
            "attention: out size".into()
        })?;
        shape(k_cache.len() == v_cache.len(), || {
            "attention: cache sizes".into()
        })?;
        shape(a.max_blocks * a.block_size >= a.max_context, || {
            "attention: max_blocks".into()
        })?;
        if n == 0 {
            return Ok(());
        }
        let (h, kv, hd, bs, mb, win) = (
            u32_of(a.heads, "heads")?,
            u32_of(a.kv_heads, "kv_heads")?,
            u32_of(a.head_dim, "head_dim")?,
            u32_of(a.block_size, "block_size")?,
            u32_of(a.max_blocks, "max_blocks")?,
            u32_of(a.window, "window")?,
        );
        let scale = a.scale;
        let s = self.stream.clone();
        let (qp, kp, vp, tp, sp, pp, op) = (
            dptr(q, &s),
            dptr(k_cache, &s),
            dptr(v_cache, &s),
            dptr(block_tables, &s),
            dptr(tok_seq, &s),
            dptr(positions, &s),
            dptr_mut(out, &s),
        );
        let kernel = attention_kernel(decode, a.heads / a.kv_heads);
        if kernel == PREFILL_ATTN {
            let mut b = s.launch_builder(self.f(PREFILL_ATTN)?);
            b.arg(&qp)
                .arg(&kp)
                .arg(&vp)
                .arg(&tp)
                .arg(&sp)
                .arg(&pp)
                .arg(&op);
            b.arg(&h)
                .arg(&kv)
                .arg(&hd)
                .arg(&bs)
                .arg(&mb)
                .arg(&win)
                .arg(&scale);
            // SAFETY: q/out >= n*heads*hd halfs; block_tables (seqs, max_blocks) with every
            // entry < num_blocks and positions[t] < max_blocks*block_size (caller's contract,
            // asserted by CudaBackend, checked by the device model's planner), so cache reads
            // stay inside the cache.
            unsafe { b.launch(grid(n, a.heads.div_ceil(4), 1, 128)?) }?;
            return Ok(());
        }
        let ctx_len = if a.window > 0 {
            a.max_context.min(a.window)
        } else {
            a.max_context
        };
        let splits = self.decode_splits(n, a.kv_heads, ctx_len);
        let split_len = u32_of(ctx_len.div_ceil(splits).max(1), "split_len")?;
        let f = self.f(kernel)?.clone();
        let reduce = self.f("paged_attn_reduce")?.clone();
        let parts = n * a.heads * splits;
        Self::ensure(&s, &mut self.epoch, &mut self.attn_acc, parts * a.head_dim)?;
        Self::ensure(&s, &mut self.epoch, &mut self.attn_ml, parts * 2)?;
        let (Some(acc), Some(ml)) = (self.attn_acc.as_mut(), self.attn_ml.as_mut()) else {
            return Err(CudaError::Shape("attention workspace".into()));
        };
        let (accp, mlp) = (dptr_mut(acc, &s), dptr_mut(ml, &s));
        let mut b = s.launch_builder(&f);
        b.arg(&qp).arg(&kp).arg(&vp).arg(&tp).arg(&sp).arg(&pp);
        b.arg(&op).arg(&accp).arg(&mlp);
        b.arg(&h)
            .arg(&kv)
            .arg(&hd)
            .arg(&bs)
            .arg(&mb)
            .arg(&win)
            .arg(&split_len)
            .arg(&scale);
        // SAFETY: as for prefill; splits*split_len >= context so every key is covered and
        // split_len <= SPLIT_LEN fits the kernel's score buffer;
        // acc >= n*heads*splits*hd and ml >= n*heads*splits*2 floats.
        unsafe { b.launch(grid(n, a.kv_heads, splits, 128)?) }?;
        if splits > 1 {
            let s32 = u32_of(splits, "splits")?;
            let mut b = s.launch_builder(&reduce);
            b.arg(&accp).arg(&mlp).arg(&op).arg(&h).arg(&hd).arg(&s32);
            // SAFETY: reads the partials written above, writes out n*heads*hd halfs.
            unsafe { b.launch(grid(n, a.heads, 1, 128)?) }?;
        }
        Ok(())
    }

    /// out[r] = argmax of logits row r, (rows, vocab) F32.
    pub fn argmax(
        &self,
        logits: &impl DevicePtr<f32>,
        vocab: usize,
        out: &mut impl DevicePtrMut<u32>,
    ) -> Result<(), CudaError> {
        shape(vocab > 0 && logits.len().is_multiple_of(vocab), || {
            "argmax: logits not (rows, vocab)".into()
        })?;
        let rows = logits.len() / vocab;
        shape(out.len() >= rows, || "argmax: out size".into())?;
        if rows == 0 {
            return Ok(());
        }
        let v = u32_of(vocab, "vocab")?;
        let s = &self.stream;
        let (lp, op) = (dptr(logits, s), dptr_mut(out, s));
        let mut b = s.launch_builder(self.f("argmax_rows")?);
        b.arg(&lp).arg(&op).arg(&v);
        // SAFETY: logits rows*vocab floats, out >= rows.
        unsafe { b.launch(grid(rows, 1, 1, 1024)?) }?;
        Ok(())
    }

    /// Samples one token per row with per-row temperature / top-k / top-p / seed / step.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        logits: &impl DevicePtr<f32>,
        vocab: usize,
        temperature: &impl DevicePtr<f32>,
        top_k: &impl DevicePtr<u32>,
        top_p: &impl DevicePtr<f32>,
        seed: &impl DevicePtr<u64>,
        step: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<u32>,
    ) -> Result<(), CudaError> {
        shape(vocab > 0 && logits.len().is_multiple_of(vocab), || {
            "sample: logits not (rows, vocab)".into()
        })?;
        let rows = logits.len() / vocab;
        for (len, what) in [
            (temperature.len(), "temperature"),
            (top_k.len(), "top_k"),
            (top_p.len(), "top_p"),
            (seed.len(), "seed"),
            (step.len(), "step"),
        ] {
            shape(len >= rows, || {
                format!("sample: {what} has {len} < {rows} rows")
            })?;
        }
        shape(out.len() >= rows, || "sample: out size".into())?;
        if rows == 0 {
            return Ok(());
        }
        let v = u32_of(vocab, "vocab")?;
        let s = &self.stream;
        let (lp, op, tp, kp, pp, sp, stp) = (
            dptr(logits, s),
            dptr_mut(out, s),
            dptr(temperature, s),
            dptr(top_k, s),
            dptr(top_p, s),
            dptr(seed, s),
            dptr(step, s),
        );
        let mut b = s.launch_builder(self.f("sample_rows")?);
        b.arg(&lp)
            .arg(&op)
            .arg(&tp)
            .arg(&kp)
            .arg(&pp)
            .arg(&sp)
            .arg(&stp)
            .arg(&v);
        // SAFETY: logits rows*vocab floats; every parameter array and out >= rows entries.
        unsafe { b.launch(grid(rows, 1, 1, 1024)?) }?;
        Ok(())
    }

    /// Sets columns `from..cols` of every row of `x` (rows, cols) F32 to `value`: one strided
    /// memset (a graph node when captured), used to mask logits past a model's real vocabulary.
    pub fn fill_cols(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        cols: usize,
        from: usize,
        value: f32,
    ) -> Result<(), CudaError> {
        shape(cols > 0 && x.len().is_multiple_of(cols), || {
            "fill_cols: x not (rows, cols)".into()
        })?;
        let rows = x.len() / cols;
        if rows == 0 || from >= cols {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        let base = dptr_mut(x, &self.stream);
        // SAFETY: x holds rows*cols floats at `base`; the memset writes columns from..cols of
        // each row (pitch cols*4 bytes), all inside x; the stream is this context's.
        unsafe {
            sys::cuMemsetD2D32Async(
                base + (from * 4) as u64,
                cols * 4,
                value.to_bits(),
                cols - from,
                rows,
                self.stream.cu_stream(),
            )
        }
        .result()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gqa_groups_past_the_decode_instances_fall_back_to_the_prefill_kernel() {
        assert_eq!(attention_kernel(true, 1), "paged_attn_decode_g1");
        assert_eq!(attention_kernel(true, 8), "paged_attn_decode_g8");
        assert_eq!(attention_kernel(true, 16), PREFILL_ATTN);
        assert_eq!(attention_kernel(true, 0), PREFILL_ATTN);
        assert_eq!(attention_kernel(false, 4), PREFILL_ATTN);
        // Every name is a loaded entry point.
        let loaded: Vec<&str> = KERNELS
            .iter()
            .flat_map(|k| k.functions.iter().copied())
            .collect();
        for g in 0..=MAX_GROUP + 1 {
            for decode in [false, true] {
                assert!(loaded.contains(&attention_kernel(decode, g)));
            }
        }
    }

    #[test]
    fn decode_splits_cover_the_context_within_the_score_buffer() {
        for sm in [1, 108, 132] {
            for n in [1, 8, 64, 256] {
                for kv in [1, 4, 8] {
                    for ctx in [1, 63, 64, 65, 511, 512, 513, 4096, 131072] {
                        let s = decode_splits(sm, n, kv, ctx);
                        let len = ctx.div_ceil(s);
                        assert!(
                            s >= 1 && len <= SPLIT_LEN,
                            "sm={sm} n={n} kv={kv} ctx={ctx}: {s}"
                        );
                        assert!(s * len >= ctx);
                        assert!(s == ctx.div_ceil(SPLIT_LEN).max(1) || len >= 64 || ctx < 64);
                    }
                }
            }
        }
        // Batch 1 on an H100 (132 SMs), kv_heads 8, 4k context: ~33 splits of 128 keys.
        assert_eq!(decode_splits(132, 1, 8, 4096), 33);
    }
}
