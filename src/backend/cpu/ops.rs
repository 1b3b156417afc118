//! Element-wise ops: RMSNorm, RoPE, SiLU·mul. Cheap next to matmul; plain loops the compiler
//! vectorises.

use crate::backend::RopeFreqs;

/// out (n, dim) = x / sqrt(mean(x²) + eps) · weight.
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    assert_eq!(x.len(), out.len(), "rmsnorm: x/out size");
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

/// Rotates x (n, heads, head_dim) in place: for i < rotary_dim/2, with θ = pos · inv_freq[i],
/// (x[i], x[i+half]) ← (x[i]·cos θ − x[i+half]·sin θ, x[i+half]·cos θ + x[i]·sin θ)
/// — transformers' `rotate_half` convention. Dims ≥ rotary_dim pass through.
pub fn rope(x: &mut [f32], positions: &[u32], heads: usize, head_dim: usize, f: &RopeFreqs) {
    let half = f.rotary_dim / 2;
    let mut cos = vec![0f32; half];
    let mut sin = vec![0f32; half];
    for (row, &pos) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
        for i in 0..half {
            // transformers computes the angle as an f32 product, then cos/sin of it.
            let theta = f.inv_freq[i] * pos as f32;
            cos[i] = theta.cos() * f.attention_scaling;
            sin[i] = theta.sin() * f.attention_scaling;
        }
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/// out (n, inter) = silu(gate) · up; gate_up (n, 2·inter) is [gate | up] per row.
pub fn silu_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    for (gu, o) in gate_up
        .chunks_exact(2 * inter)
        .zip(out.chunks_exact_mut(inter))
    {
        let (g, u) = gu.split_at(inter);
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_unit_rows() {
        let x = [3.0, 4.0, 0.0, 0.0];
        let mut o = [0.0; 4];
        rmsnorm(&x, &[1.0, 1.0, 2.0, 2.0], 0.0, &mut o);
        let r = (25.0f32 / 4.0).sqrt();
        assert!((o[0] - 3.0 / r).abs() < 1e-6 && (o[1] - 4.0 / r).abs() < 1e-6);
    }

    #[test]
    fn rope_position_zero_is_identity_and_preserves_norm() {
        let f = RopeFreqs {
            inv_freq: vec![1.0, 0.1],
            rotary_dim: 4,
            attention_scaling: 1.0,
        };
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        rope(&mut x, &[0, 7], 1, 4, &f);
        assert_eq!(&x[..4], &[1.0, 2.0, 3.0, 4.0]);
        let n0: f32 = x[..4].iter().map(|v| v * v).sum();
        let n1: f32 = x[4..].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }
}
