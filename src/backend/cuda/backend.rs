//! [`CudaBackend`]: the slice-based [`Backend`] trait on the CUDA kernels.
//!
//! A correctness bridge (see the module docs of [`super`]): weights are uploaded once and stay
//! on the device, keyed by the address and length of the host buffer (valid because a model's
//! `Weight`s live, unmoved, as long as the model); activations and the layer's KV cache are copied
//! per call. Every output buffer is filled with NaN before the launch, so an element a kernel
//! forgets to write shows up in the comparison instead of passing as a stale value.
//!
//! The trait is infallible, so a driver failure here panics with the op and the driver's error
//! (the device-resident path returns `Result<_, CudaError>` instead); shape preconditions are
//! asserted exactly as the CPU backend asserts them.

use super::ops::{CudaOps, DevAttn};
use super::CudaError;
use crate::backend::{AttnSeq, AttnShape, Backend, RopeFreqs, Weight};
use cudarc::driver::{CudaSlice, DeviceRepr};
use half::f16;
use std::collections::HashMap;
use std::sync::Mutex;

pub struct CudaBackend {
    ops: Mutex<CudaOps>,
    /// Device copies of weights, by (host address, element count).
    weights: Mutex<HashMap<(usize, usize), CudaSlice<f16>>>,
}

fn fail(op: &str, e: CudaError) -> ! {
    panic!("cuda backend: {op}: {e}")
}

impl CudaBackend {
    /// Opens device `ordinal` and compiles/loads every kernel.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        Ok(Self {
            ops: Mutex::new(CudaOps::new(ordinal)?),
            weights: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `f` with the launchers (the lock is never held across a panic-free return path
    /// that could poison it; a poisoned lock means an earlier op panicked, so we keep going).
    pub fn with_ops<R>(&self, f: impl FnOnce(&mut CudaOps) -> R) -> R {
        let mut g = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    fn up<T: DeviceRepr>(ops: &CudaOps, v: &[T]) -> Result<CudaSlice<T>, CudaError> {
        Ok(ops.stream.clone_htod(v)?)
    }

    fn down<T: DeviceRepr + Default + Clone>(
        ops: &CudaOps,
        d: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>, CudaError> {
        let mut v = vec![T::default(); d.len()];
        ops.stream.memcpy_dtoh(d, &mut v)?;
        v.truncate(n);
        Ok(v)
    }

    fn weight(&self, ops: &CudaOps, w: &Weight) -> Result<CudaSlice<f16>, CudaError> {
        let key = w.storage_id();
        let mut cache = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = cache.get(&key) {
            return Ok(d.clone());
        }
        // The kernels read the checkpoint's row-major (rows, cols) layout, not the CPU panels.
        let d = Self::up(ops, &w.to_row_major())?;
        cache.insert(key, d.clone());
        Ok(d)
    }

    fn matmul_impl(&self, x: &[f32], w: &Weight, y: &mut [f32]) -> Result<(), CudaError> {
        let n = x.len() / w.cols.max(1);
        assert_eq!(x.len(), n * w.cols, "matmul: x not (n, cols)");
        assert_eq!(y.len(), n * w.rows, "matmul: y not (n, rows)");
        self.with_ops(|ops| {
            let wd = self.weight(ops, w)?;
            let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let xd = Self::up(ops, &xh)?;
            let mut yd = Self::up(ops, &vec![f32::NAN; y.len()])?;
            ops.matmul(&xd, n, &wd, w.rows, w.cols, None, &mut yd)?;
            y.copy_from_slice(&Self::down(ops, &yd, y.len())?);
            Ok(())
        })
    }

    fn rmsnorm_impl(
        &self,
        x: &[f32],
        weight: &[f32],
        eps: f32,
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        assert_eq!(x.len(), out.len(), "rmsnorm: x/out size");
        self.with_ops(|ops| {
            let mut res = Self::up(ops, x)?;
            let wd = Self::up(ops, weight)?;
            let mut od = Self::up(ops, &vec![f16::NAN; out.len()])?;
            ops.rmsnorm_residual(&mut res, None, &wd, eps, &mut od)?;
            let o = Self::down(ops, &od, out.len())?;
            out.iter_mut().zip(o).for_each(|(d, s)| *d = s.to_f32());
            Ok(())
        })
    }

    fn rope_impl(
        &self,
        x: &mut [f32],
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        f: &RopeFreqs,
    ) -> Result<(), CudaError> {
        let n = positions.len();
        assert_eq!(
            x.len(),
            n * heads * head_dim,
            "rope: x not (n, heads, head_dim)"
        );
        self.with_ops(|ops| {
            // q-only call of the fused kernel: kv_heads = 0, so the caches are never touched.
            let xd = Self::up(ops, x)?;
            let pd = Self::up(ops, positions)?;
            let slots = Self::up(ops, &vec![0u32; n])?;
            let fd = Self::up(ops, &f.inv_freq)?;
            let mut qd = Self::up(ops, &vec![f16::NAN; x.len()])?;
            let mut kc = Self::up(ops, &vec![f16::ZERO; head_dim])?;
            let mut vc = Self::up(ops, &vec![f16::ZERO; head_dim])?;
            let a = DevAttn {
                heads,
                kv_heads: 0,
                head_dim,
                block_size: 1,
                max_blocks: 0,
                max_context: 0,
                window: 0,
                scale: 1.0,
            };
            ops.rope_qkv_cache(
                &xd,
                None,
                &pd,
                &slots,
                &fd,
                &mut qd,
                &mut kc,
                &mut vc,
                &a,
                f.rotary_dim,
                f.attention_scaling,
            )?;
            let q = Self::down(ops, &qd, x.len())?;
            x.iter_mut().zip(q).for_each(|(d, s)| *d = s.to_f32());
            Ok(())
        })
    }

    fn silu_mul_impl(
        &self,
        gate_up: &[f32],
        inter: usize,
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        assert_eq!(gate_up.len() / 2, out.len(), "silu_mul: sizes");
        self.with_ops(|ops| {
            let gd = Self::up(ops, gate_up)?;
            let mut od = Self::up(ops, &vec![f16::NAN; out.len()])?;
            ops.swiglu(&gd, inter, &mut od)?;
            let o = Self::down(ops, &od, out.len())?;
            out.iter_mut().zip(o).for_each(|(d, s)| *d = s.to_f32());
            Ok(())
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_impl(
        &self,
        q: &[f32],
        k_cache: &[f16],
        v_cache: &[f16],
        seqs: &[AttnSeq<'_>],
        s: &AttnShape,
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        assert_eq!(q.len(), out.len(), "attention: q/out size");
        let row_len = s.num_heads * s.head_dim;
        let rows = q.len() / row_len.max(1);
        let tile = s.num_kv_heads * s.block_size * s.head_dim;
        let num_blocks = k_cache.len() / tile.max(1);
        let max_blocks = seqs
            .iter()
            .map(|q| q.blocks.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut tables = vec![0u32; seqs.len() * max_blocks];
        let mut tok_seq = vec![0u32; rows];
        let mut positions = vec![0u32; rows];
        let mut covered = vec![false; rows];
        let mut max_context = 0;
        for (i, sq) in seqs.iter().enumerate() {
            assert!(sq.row + sq.len <= rows, "attention: seq rows out of range");
            let need = (sq.start_pos + sq.len).div_ceil(s.block_size);
            assert!(sq.blocks.len() >= need, "attention: block table too short");
            assert!(
                sq.blocks.iter().all(|&b| (b as usize) < num_blocks),
                "attention: block id beyond the cache"
            );
            tables[i * max_blocks..i * max_blocks + sq.blocks.len()].copy_from_slice(sq.blocks);
            for t in 0..sq.len {
                tok_seq[sq.row + t] = i as u32;
                positions[sq.row + t] = (sq.start_pos + t) as u32;
                covered[sq.row + t] = true;
            }
            max_context = max_context.max(sq.start_pos + sq.len);
        }
        let decode = seqs.iter().all(|q| q.len == 1);
        let a = DevAttn {
            heads: s.num_heads,
            kv_heads: s.num_kv_heads,
            head_dim: s.head_dim,
            block_size: s.block_size,
            max_blocks,
            max_context,
            window: s.sliding_window.unwrap_or(0),
            scale: s.scale,
        };
        self.with_ops(|ops| {
            let qh: Vec<f16> = q.iter().map(|&v| f16::from_f32(v)).collect();
            let qd = Self::up(ops, &qh)?;
            let kd = Self::up(ops, k_cache)?;
            let vd = Self::up(ops, v_cache)?;
            let td = Self::up(ops, &tables)?;
            let sd = Self::up(ops, &tok_seq)?;
            let pd = Self::up(ops, &positions)?;
            let mut od = Self::up(ops, &vec![f16::NAN; q.len()])?;
            ops.attention(&qd, &kd, &vd, &td, &sd, &pd, &a, decode, &mut od)?;
            let o = Self::down(ops, &od, q.len())?;
            for (r, c) in covered.iter().enumerate() {
                if *c {
                    let (dst, src) = (
                        &mut out[r * row_len..][..row_len],
                        &o[r * row_len..][..row_len],
                    );
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
                }
            }
            Ok(())
        })
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn matmul(&self, x: &[f32], w: &Weight, y: &mut [f32]) {
        self.matmul_impl(x, w, y)
            .unwrap_or_else(|e| fail("matmul", e))
    }

    fn rmsnorm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        self.rmsnorm_impl(x, weight, eps, out)
            .unwrap_or_else(|e| fail("rmsnorm", e))
    }

    fn rope(
        &self,
        x: &mut [f32],
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        freqs: &RopeFreqs,
    ) {
        self.rope_impl(x, positions, heads, head_dim, freqs)
            .unwrap_or_else(|e| fail("rope", e))
    }

    fn silu_mul(&self, gate_up: &[f32], inter: usize, out: &mut [f32]) {
        self.silu_mul_impl(gate_up, inter, out)
            .unwrap_or_else(|e| fail("silu_mul", e))
    }

    fn attention(
        &self,
        q: &[f32],
        k_cache: &[f16],
        v_cache: &[f16],
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut [f32],
    ) {
        self.attention_impl(q, k_cache, v_cache, seqs, shape, out)
            .unwrap_or_else(|e| fail("attention", e))
    }
}
