// paged_attention.cu — decode attention over the paged KV cache, one query token per row.
//
// Math:    for query head h of token t at position p (kv head g = h / G, G = heads / kv_heads):
//            s_j = scale * <q[t, h], K[j, g]>   for j in [max(0, p + 1 - window), p]
//            out[t, h] = sum_j softmax(s)_j * V[j, g]
//          Key j lives in block table[seq(t)][j / block_size], slot j % block_size; cache layout
//          (num_blocks, kv_heads, block_size, hd) F16 as in engine::kv.
// Types:   q F16 (n, heads, hd); caches F16; out F16 (n, heads, hd); scores, softmax, sums in F32.
// Launch:  paged_attn_decode_g<G> (G = heads / kv_heads, 1..8, a compile-time group size): grid = (n, kv_heads, splits); block = 128 threads.
//          The whole GQA group (G <= 8 query heads sharing one kv head) is in one block, so each
//          K/V row is read from memory once per group, not once per query head.
//          Split-KV: split s handles keys [lo + s*split_len, lo + (s+1)*split_len); with splits > 1
//          each writes (max, sum, unnormalised acc) partials and paged_attn_reduce merges them
//          (the flash-decoding rescale). split_len <= 512 (shared score buffer), multiple of 8.
//          Phase 1: 8 groups of 16 lanes, one key per group, 16-byte K loads, 16-lane shuffle sum.
//          Phase 2: one warp per head: max / exp / sum over the split's scores (warp shuffles).
//          Phase 3: one thread per output dim accumulates p_j * V[j, d] (coalesced V rows).
// Requires: heads % kv_heads == 0, G <= 8, hd % 8 == 0, hd <= 256 (launcher checks; decode steps
//          with a wider group run prefill_attention.cu, see ops::attention_kernel).
// CPU twin: backend::cpu::attention with one new token per sequence.
#include <cuda_fp16.h>

// Two halfs packed in a 32-bit word -> float2, in registers (no local-memory reinterpret).
__device__ __forceinline__ float2 unpack_h2(unsigned int u) {
    return __half22float2(__halves2half2(__ushort_as_half((unsigned short)(u & 0xffffu)),
                                         __ushort_as_half((unsigned short)(u >> 16))));
}

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define MAX_G 8
#define MAX_HD 256
#define MAX_SPLIT 512
#define NTHREADS 128

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

template <int G>
__device__ __forceinline__ void decode_body(
    const __half* __restrict__ q, const __half* __restrict__ k_cache,
    const __half* __restrict__ v_cache, const unsigned int* __restrict__ block_tables,
    const unsigned int* __restrict__ tok_seq, const unsigned int* __restrict__ positions,
    __half* __restrict__ out, float* __restrict__ part_acc, float* __restrict__ part_ml,
    unsigned int heads, unsigned int kv_heads, unsigned int hd, unsigned int block_size,
    unsigned int max_blocks, unsigned int window, unsigned int split_len, float scale) {
    __shared__ float q_s[MAX_G][MAX_HD];
    __shared__ float sc[MAX_G][MAX_SPLIT];
    __shared__ float m_s[MAX_G], l_s[MAX_G];

    const unsigned int t = blockIdx.x, g = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const unsigned int pos = positions[t];
    const unsigned int lo_all = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const unsigned int lo = lo_all + split * split_len;
    const unsigned int hi = min(pos + 1, lo + split_len);  // keys [lo, hi)
    const unsigned int* table = block_tables + (size_t)tok_seq[t] * max_blocks;

    for (unsigned int i = threadIdx.x; i < G * hd; i += NTHREADS) {
        const unsigned int hg = i / hd, d = i % hd;
        q_s[hg][d] = __half2float(q[((size_t)t * heads + g * G + hg) * hd + d]);
    }
    __syncthreads();

    // Phase 1: scores.
    const unsigned int grp = threadIdx.x / 16, l16 = threadIdx.x % 16;
    // The loop bound is block-uniform (jb), so both 16-lane groups of a warp always reach the
    // full-mask shuffles together; a group past the end contributes zeros and writes nothing.
    for (unsigned int jb = lo; jb < hi; jb += NTHREADS / 16) {
        const unsigned int j = jb + grp;
        const bool valid = j < hi;
        const size_t row =
            valid ? ((size_t)table[j / block_size] * kv_heads + g) * block_size + j % block_size : 0;
        const __half* kr = k_cache + row * hd;
        float acc[G];
        #pragma unroll
        for (int hg = 0; hg < G; ++hg) acc[hg] = 0.f;
        for (unsigned int c = l16; valid && c < hd / 8; c += 16) {
            const uint4 raw = *reinterpret_cast<const uint4*>(kr + c * 8);
            const unsigned int w4[4] = {raw.x, raw.y, raw.z, raw.w};
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 f = unpack_h2(w4[e]);
                #pragma unroll
                for (int hg = 0; hg < G; ++hg) {
                    acc[hg] = fmaf(f.x, q_s[hg][c * 8 + 2 * e], acc[hg]);
                    acc[hg] = fmaf(f.y, q_s[hg][c * 8 + 2 * e + 1], acc[hg]);
                }
            }
        }
        #pragma unroll
        for (int hg = 0; hg < G; ++hg) {
            float v = acc[hg];
            #pragma unroll
            for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (valid && l16 == 0) sc[hg][j - lo] = v * scale;
        }
    }
    __syncthreads();

    // Phase 2: softmax statistics per head (one warp per head).
    const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned int nk = hi > lo ? hi - lo : 0;
    for (unsigned int hg = warp; hg < G; hg += NTHREADS / 32) {
        float m = -INFINITY;
        for (unsigned int j = lane; j < nk; j += 32) m = fmaxf(m, sc[hg][j]);
        m = warp_max(m);
        float l = 0.f;
        for (unsigned int j = lane; j < nk; j += 32) {
            const float p = __expf(sc[hg][j] - m);
            sc[hg][j] = p;
            l += p;
        }
        l = warp_sum(l);
        if (lane == 0) {
            m_s[hg] = m;
            l_s[hg] = l;
        }
    }
    __syncthreads();

    // Phase 3: weighted sum of V rows.
    for (unsigned int d = threadIdx.x; d < hd; d += NTHREADS) {
        float acc[G];
        #pragma unroll
        for (int hg = 0; hg < G; ++hg) acc[hg] = 0.f;
        for (unsigned int j = lo; j < hi; ++j) {
            const size_t row = ((size_t)table[j / block_size] * kv_heads + g) * block_size + j % block_size;
            const float v = __half2float(v_cache[row * hd + d]);
            #pragma unroll
            for (int hg = 0; hg < G; ++hg) acc[hg] = fmaf(sc[hg][j - lo], v, acc[hg]);
        }
        #pragma unroll
        for (int hg = 0; hg < G; ++hg) {
            const unsigned int h = g * G + hg;
            if (splits == 1) {
                const float inv = l_s[hg] > 0.f ? 1.f / l_s[hg] : 0.f;
                out[((size_t)t * heads + h) * hd + d] = __float2half(acc[hg] * inv);
            } else {
                part_acc[(((size_t)t * heads + h) * splits + split) * hd + d] = acc[hg];
            }
        }
    }
    if (splits > 1 && threadIdx.x < G) {
        const size_t i = ((size_t)t * heads + g * G + threadIdx.x) * splits + split;
        part_ml[2 * i] = nk > 0 ? m_s[threadIdx.x] : -INFINITY;
        part_ml[2 * i + 1] = nk > 0 ? l_s[threadIdx.x] : 0.f;
    }
}

#define DECODE_INSTANCE(G)                                                                       \
    extern "C" __global__ void __launch_bounds__(NTHREADS) paged_attn_decode_g##G(               \
        const __half* __restrict__ q, const __half* __restrict__ k_cache,                        \
        const __half* __restrict__ v_cache, const unsigned int* __restrict__ block_tables,        \
        const unsigned int* __restrict__ tok_seq, const unsigned int* __restrict__ positions,     \
        __half* __restrict__ out, float* __restrict__ part_acc, float* __restrict__ part_ml,      \
        unsigned int heads, unsigned int kv_heads, unsigned int hd, unsigned int block_size,      \
        unsigned int max_blocks, unsigned int window, unsigned int split_len, float scale) {      \
        decode_body<G>(q, k_cache, v_cache, block_tables, tok_seq, positions, out, part_acc,      \
                       part_ml, heads, kv_heads, hd, block_size, max_blocks, window, split_len,  \
                       scale);                                                                   \
    }
DECODE_INSTANCE(1)
DECODE_INSTANCE(2)
DECODE_INSTANCE(3)
DECODE_INSTANCE(4)
DECODE_INSTANCE(5)
DECODE_INSTANCE(6)
DECODE_INSTANCE(7)
DECODE_INSTANCE(8)

// Merges split partials: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M = max_s m_s.
// grid = (n, heads); block = 128; loops over hd.
extern "C" __global__ void paged_attn_reduce(const float* __restrict__ part_acc,
                                             const float* __restrict__ part_ml,
                                             __half* __restrict__ out, unsigned int heads,
                                             unsigned int hd, unsigned int splits) {
    const size_t th = (size_t)blockIdx.x * heads + blockIdx.y;
    float M = -INFINITY;
    for (unsigned int s = 0; s < splits; ++s) M = fmaxf(M, part_ml[2 * (th * splits + s)]);
    float L = 0.f;
    for (unsigned int s = 0; s < splits; ++s) {
        const float m = part_ml[2 * (th * splits + s)];
        if (m != -INFINITY) L += __expf(m - M) * part_ml[2 * (th * splits + s) + 1];
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    for (unsigned int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (unsigned int s = 0; s < splits; ++s) {
            const float m = part_ml[2 * (th * splits + s)];
            if (m != -INFINITY) a += __expf(m - M) * part_acc[(th * splits + s) * hd + d];
        }
        out[th * hd + d] = __float2half(a * inv);
    }
}
