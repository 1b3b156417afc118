// gemv.cu — decode matmul for a few token rows: y (nt, N) = x (nt, K) · Wᵀ, W (N, K).
//
// Math:    y[t, r] = sum_k float(x[t, k]) * float(W[r, k])   (+ bias[r] when bias != null)
// Types:   W F16 (N, K) row-major as in the checkpoint; x F16 (nt, K); y F32 (nt, N); F32 accumulate.
// Launch:  gemv_f16_t<NT> for NT = 1..8 token rows (one weight read serves all NT rows).
//          block = 128 threads = 4 warps, one output row per warp; grid = (ceil(N / 4), splits).
//          Each lane issues 16-byte loads (8 halfs) of W and x; a warp covers 256 columns per step,
//          the loop is unrolled x2 so two weight loads per lane are in flight.
//          Split-K (gridDim.y = splits > 1) for narrow outputs (few rows -> too few blocks to fill
//          the GPU): split s covers columns [s*K/splits, (s+1)*K/splits) and writes F32 partials
//          to `partial` (splits, nt, N); gemv_reduce sums them (+bias) into y. Deterministic: no
//          atomics. Requires K % (256 * splits) == 0 (checked by the launcher; 256 = 32 lanes x 8).
//          Reductions: warp shuffles (xor butterfly) only, no shared memory.
// CPU twin: backend::cpu::matmul (x rounded to F16 first, as the CUDA path stores it).
// v1: one row per warp, x re-read from L1/L2 by every warp (x is tiny: nt*K*2 bytes).
#include <cuda_fp16.h>

// Two halfs packed in a 32-bit word -> float2, in registers (no local-memory reinterpret).
__device__ __forceinline__ float2 unpack_h2(unsigned int u) {
    return __half22float2(__halves2half2(__ushort_as_half((unsigned short)(u & 0xffffu)),
                                         __ushort_as_half((unsigned short)(u >> 16))));
}

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
    const unsigned int wa[4] = {a.x, a.y, a.z, a.w};
    const unsigned int wb[4] = {b.x, b.y, b.z, b.w};
    float s = 0.f;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 fa = unpack_h2(wa[i]);
        const float2 fb = unpack_h2(wb[i]);
        s = fmaf(fa.x, fb.x, s);
        s = fmaf(fa.y, fb.y, s);
    }
    return s;
}

template <int NT>
__device__ __forceinline__ void gemv_body(const __half* __restrict__ x, const __half* __restrict__ w,
                                          const float* __restrict__ bias, float* __restrict__ out,
                                          unsigned int N, unsigned int K) {
    const unsigned int lane = threadIdx.x % 32;
    const unsigned int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    const unsigned int splits = gridDim.y;
    const unsigned int kc = K / splits;
    const unsigned int k0 = blockIdx.y * kc;
    const __half* wr = w + (size_t)row * K;
    float acc[NT];
    #pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = 0.f;
    unsigned int k = k0 + lane * 8;
    const unsigned int kend = k0 + kc;
    for (; k + 256 < kend; k += 512) {
        const uint4 wa = __ldg(reinterpret_cast<const uint4*>(wr + k));
        const uint4 wb = __ldg(reinterpret_cast<const uint4*>(wr + k + 256));
        #pragma unroll
        for (int t = 0; t < NT; ++t) {
            const uint4 xa = __ldg(reinterpret_cast<const uint4*>(x + (size_t)t * K + k));
            const uint4 xb = __ldg(reinterpret_cast<const uint4*>(x + (size_t)t * K + k + 256));
            acc[t] += dot8(wa, xa) + dot8(wb, xb);
        }
    }
    if (k < kend) {
        const uint4 wa = __ldg(reinterpret_cast<const uint4*>(wr + k));
        #pragma unroll
        for (int t = 0; t < NT; ++t) {
            const uint4 xa = __ldg(reinterpret_cast<const uint4*>(x + (size_t)t * K + k));
            acc[t] += dot8(wa, xa);
        }
    }
    #pragma unroll
    for (int t = 0; t < NT; ++t) {
        const float v = warp_sum(acc[t]);
        if (lane == 0) {
            if (splits == 1) {
                out[(size_t)t * N + row] = v + (bias != nullptr ? bias[row] : 0.f);
            } else {
                out[((size_t)blockIdx.y * NT + t) * N + row] = v;
            }
        }
    }
}

#define GEMV_INSTANCE(NT)                                                                        \
    extern "C" __global__ void __launch_bounds__(128) gemv_f16_t##NT(                            \
        const __half* __restrict__ x, const __half* __restrict__ w,                              \
        const float* __restrict__ bias, float* __restrict__ out, unsigned int N,                 \
        unsigned int K) {                                                                        \
        gemv_body<NT>(x, w, bias, out, N, K);                                                    \
    }
GEMV_INSTANCE(1)
GEMV_INSTANCE(2)
GEMV_INSTANCE(3)
GEMV_INSTANCE(4)
GEMV_INSTANCE(5)
GEMV_INSTANCE(6)
GEMV_INSTANCE(7)
GEMV_INSTANCE(8)

// y[t, r] = sum_s partial[s, t, r] (+ bias[r]).  grid = ceil(nt * N / 256), block = 256.
extern "C" __global__ void gemv_reduce(const float* __restrict__ partial,
                                       const float* __restrict__ bias, float* __restrict__ y,
                                       unsigned int nt, unsigned int N, unsigned int splits) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)nt * N) return;
    float s = bias != nullptr ? bias[idx % N] : 0.f;
    for (unsigned int p = 0; p < splits; ++p) s += partial[(size_t)p * nt * N + idx];
    y[idx] = s;
}
