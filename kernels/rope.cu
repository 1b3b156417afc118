// rope.cu — QKV split + bias + rotary embedding + paged KV-cache write, in one pass.
//
// Math:    row = qkv[t] (+ bias), split into q (heads, hd), k (kv_heads, hd), v (kv_heads, hd).
//          For q and k heads, for i < rotary_dim/2 with theta = pos[t] * inv_freq[i] (F32 product,
//          as transformers computes it), c = cos(theta) * scaling, s = sin(theta) * scaling:
//            (x[i], x[i+half]) <- (x[i]*c - x[i+half]*s, x[i+half]*c + x[i]*s)   (rotate_half)
//          dims >= rotary_dim pass through (Phi-3 partial rotary). inv_freq is precomputed on the
//          host, so llama3 / linear / default scaling are all just a different table.
//          q -> q_out (n, heads, hd) F16; k, v -> cache slot `slot[t]` = block * block_size + s,
//          cache layout (num_blocks, kv_heads, block_size, hd) F16 (engine::kv).
// Types:   qkv F32 (n, (heads + 2*kv_heads) * hd) — the qkv matmul output; bias F32 or null.
// Launch:  grid = (n, heads + 2*kv_heads); block = 64 threads; thread i < half handles pair i,
//          threads loop so any hd works. sincosf in full precision (no fast-math intrinsics) to
//          match the CPU reference at large positions.
// CPU twin: backend::cpu::ops::rope on q and k, then KvCache::write.
#include <cuda_fp16.h>

extern "C" __global__ void rope_qkv_cache(const float* __restrict__ qkv,
                                          const float* __restrict__ bias,
                                          const unsigned int* __restrict__ positions,
                                          const unsigned int* __restrict__ slots,
                                          const float* __restrict__ inv_freq,
                                          __half* __restrict__ q_out,
                                          __half* __restrict__ k_cache,
                                          __half* __restrict__ v_cache,
                                          unsigned int heads, unsigned int kv_heads,
                                          unsigned int hd, unsigned int rotary_dim,
                                          unsigned int block_size, float scaling) {
    const unsigned int t = blockIdx.x, h = blockIdx.y;
    const unsigned int qkv_dim = (heads + 2 * kv_heads) * hd;
    const float* src = qkv + (size_t)t * qkv_dim + (size_t)h * hd;
    const float* b = bias != nullptr ? bias + (size_t)h * hd : nullptr;
    __half* dst;
    bool rotate = true;
    const unsigned int slot = slots[t];
    const size_t blk = slot / block_size, s = slot % block_size;
    if (h < heads) {
        dst = q_out + ((size_t)t * heads + h) * hd;
    } else if (h < heads + kv_heads) {
        dst = k_cache + ((blk * kv_heads + (h - heads)) * block_size + s) * hd;
    } else {
        dst = v_cache + ((blk * kv_heads + (h - heads - kv_heads)) * block_size + s) * hd;
        rotate = false;
    }
    const unsigned int half_rot = rotate ? rotary_dim / 2 : 0;
    const float pos = (float)positions[t];
    for (unsigned int i = threadIdx.x; i < hd; i += blockDim.x) {
        if (i < half_rot) {
            const float a = src[i] + (b ? b[i] : 0.f);
            const float c2 = src[i + half_rot] + (b ? b[i + half_rot] : 0.f);
            float sn, cs;
            sincosf(inv_freq[i] * pos, &sn, &cs);
            cs *= scaling;
            sn *= scaling;
            dst[i] = __float2half(a * cs - c2 * sn);
            dst[i + half_rot] = __float2half(c2 * cs + a * sn);
        } else if (i >= 2 * half_rot) {
            dst[i] = __float2half(src[i] + (b ? b[i] : 0.f));
        }
    }
}
