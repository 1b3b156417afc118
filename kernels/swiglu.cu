// swiglu.cu — SwiGLU activation of the MLP.
//
// Math:    out[t, i] = silu(g) * u = g / (1 + exp(-g)) * u,  g = gate_up[t, i], u = gate_up[t, inter + i]
// Types:   gate_up F32 (n, 2*inter) — the fused gate|up matmul output; out F16 (n, inter), the
//          input of down_proj. Math in F32.
// Launch:  grid = ceil(n * inter / 256); block = 256; one element per thread (memory bound).
// CPU twin: backend::cpu::ops::silu_mul.
#include <cuda_fp16.h>

extern "C" __global__ void swiglu(const float* __restrict__ gate_up, __half* __restrict__ out,
                                  unsigned int n, unsigned int inter) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * inter) return;
    const size_t t = idx / inter, i = idx % inter;
    const float g = gate_up[t * 2 * inter + i];
    const float u = gate_up[t * 2 * inter + inter + i];
    out[idx] = __float2half(g / (1.f + __expf(-g)) * u);
}
