// prefill_attention.cu — causal attention for prefill / chunked prefill over the paged cache.
//
// Math:    for query head h of token t at position p: out[t, h] = sum_j softmax_j(scale *
//          <q[t, h], K[j, h / G]>) V[j, h / G], j in [max(0, p + 1 - window), p] (causal, optional
//          sliding window). The new tokens' K/V are already in the cache (rope_qkv_cache), so a
//          chunk of a long prompt attends to the earlier chunks the same way.
// Types:   q F16 (n, heads, hd); caches F16 (num_blocks, kv_heads, block_size, hd); out F16;
//          F32 online softmax (running max m, normaliser l, accumulator) — flash-attention style,
//          so memory is O(hd) per query whatever the context.
// Launch:  grid = (n, ceil(heads / 4)); block = 128 = 4 warps, one query head per warp.
//          Keys in chunks of 32: lane i scores key base + i (16-byte K loads), warp-shuffle max
//          and sum; lane owns dims lane + 32k (< hd) of the accumulator and reads V rows coalesced.
// Requires: hd % 8 == 0, hd <= 256 (launcher checks).
// v2: hd % 8 instead of hd % 32 (lanes past hd idle), so head_dim 16 test checkpoints run.
// v1: CUDA cores only; a tensor-core (mma.sync) tile version for long prompts is the next step.
// CPU twin: backend::cpu::attention.
#include <cuda_fp16.h>

// Two halfs packed in a 32-bit word -> float2, in registers (no local-memory reinterpret).
__device__ __forceinline__ float2 unpack_h2(unsigned int u) {
    return __half22float2(__halves2half2(__ushort_as_half((unsigned short)(u & 0xffffu)),
                                         __ushort_as_half((unsigned short)(u >> 16))));
}

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define MAX_HD 256
#define WARPS 4

__device__ __forceinline__ float warp_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) prefill_attn(
    const __half* __restrict__ q, const __half* __restrict__ k_cache,
    const __half* __restrict__ v_cache, const unsigned int* __restrict__ block_tables,
    const unsigned int* __restrict__ tok_seq, const unsigned int* __restrict__ positions,
    __half* __restrict__ out, unsigned int heads, unsigned int kv_heads, unsigned int hd,
    unsigned int block_size, unsigned int max_blocks, unsigned int window, float scale) {
    __shared__ float q_s[WARPS][MAX_HD];
    const unsigned int t = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned int h = blockIdx.y * WARPS + warp;
    if (h >= heads) return;  // whole warp exits; no block-wide barrier below
    const unsigned int g = h / (heads / kv_heads);
    const unsigned int pos = positions[t];
    const unsigned int lo = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const unsigned int* table = block_tables + (size_t)tok_seq[t] * max_blocks;
    for (unsigned int d = lane; d < hd; d += 32)
        q_s[warp][d] = __half2float(q[((size_t)t * heads + h) * hd + d]);
    __syncwarp();

    const unsigned int nd = (hd + 31) / 32;
    float acc[MAX_HD / 32];
    #pragma unroll
    for (int i = 0; i < MAX_HD / 32; ++i) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;
    for (unsigned int base = lo; base <= pos; base += 32) {
        const unsigned int j = base + lane;
        float s = -INFINITY;
        size_t row = 0;
        if (j <= pos) {
            row = ((size_t)table[j / block_size] * kv_heads + g) * block_size + j % block_size;
            const __half* kr = k_cache + row * hd;
            float dot = 0.f;
            for (unsigned int c = 0; c < hd; c += 8) {
                const uint4 raw = *reinterpret_cast<const uint4*>(kr + c);
                const unsigned int w4[4] = {raw.x, raw.y, raw.z, raw.w};
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = unpack_h2(w4[e]);
                    dot = fmaf(f.x, q_s[warp][c + 2 * e], dot);
                    dot = fmaf(f.y, q_s[warp][c + 2 * e + 1], dot);
                }
            }
            s = dot * scale;
        }
        const float m_new = fmaxf(m, warp_max(s));  // finite: key `base` <= pos is valid
        const float corr = __expf(m - m_new);
        const float p = j <= pos ? __expf(s - m_new) : 0.f;
        l = l * corr + warp_sum(p);
        m = m_new;
        #pragma unroll
        for (int i = 0; i < MAX_HD / 32; ++i) acc[i] *= corr;
        const unsigned int nvalid = min(32u, pos + 1 - base);
        for (unsigned int jj = 0; jj < nvalid; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            const size_t rj = __shfl_sync(0xffffffffu, row, jj);
            const __half* vr = v_cache + rj * hd;
            #pragma unroll
            for (int i = 0; i < MAX_HD / 32; ++i)
                if (i < (int)nd && lane + 32 * i < hd)
                    acc[i] = fmaf(pj, __half2float(vr[lane + 32 * i]), acc[i]);
        }
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    #pragma unroll
    for (int i = 0; i < MAX_HD / 32; ++i)
        if (i < (int)nd && lane + 32 * i < hd)
            out[((size_t)t * heads + h) * hd + lane + 32 * i] = __float2half(acc[i] * inv);
}
