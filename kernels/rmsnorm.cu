// rmsnorm.cu — residual add fused with RMSNorm.
//
// Math:    if add != null: residual[t, :] += add[t, :]            (F32, in place)
//          out[t, i] = half(residual[t, i] / sqrt(mean_i(residual[t, :]^2) + eps) * weight[i])
// Types:   residual F32 (n, dim) in/out; add F32 (n, dim) or null (first layer); weight F32 (dim,);
//          out F16 (n, dim) — the input of the next matmul. Accumulation in F32.
// Launch:  grid = n rows; block = 256 threads (8 warps); warp-shuffle + shared-memory reduction of
//          the sum of squares. The row is read twice (second read hits L1/L2).
// CPU twin: backend::cpu::ops::rmsnorm (after adding `add` to the residual).
#include <cuda_fp16.h>

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void rmsnorm_residual(float* __restrict__ residual,
                                            const float* __restrict__ add,
                                            const float* __restrict__ weight,
                                            __half* __restrict__ out,
                                            unsigned int dim, float eps) {
    __shared__ float partial[32];
    const size_t base = (size_t)blockIdx.x * dim;
    float ss = 0.f;
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = residual[base + i];
        if (add != nullptr) {
            v += add[base + i];
            residual[base + i] = v;
        }
        ss += v * v;
    }
    ss = warp_sum(ss);
    const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        float v = lane < (blockDim.x + 31) / 32 ? partial[lane] : 0.f;
        v = warp_sum(v);
        if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(partial[0] / (float)dim + eps);
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) {
        out[base + i] = __float2half(residual[base + i] * inv * weight[i]);
    }
}
