// embedding.cu — token embedding gather.
//
// Math:    out[t, :] = float(table[tokens[t], :])          (tokens[t] >= vocab -> zeros)
// Types:   table F16 (vocab, hidden); out F32 (n, hidden) — the F32 residual stream.
// Launch:  grid = n tokens; block = 256 threads; each thread copies 8 halfs (one 16-byte load)
//          per iteration; requires hidden % 8 == 0 (checked by the launcher).
#include <cuda_fp16.h>

// Two halfs packed in a 32-bit word -> float2, in registers (no local-memory reinterpret).
__device__ __forceinline__ float2 unpack_h2(unsigned int u) {
    return __half22float2(__halves2half2(__ushort_as_half((unsigned short)(u & 0xffffu)),
                                         __ushort_as_half((unsigned short)(u >> 16))));
}

extern "C" __global__ void embedding_f16(const unsigned int* __restrict__ tokens,
                                         const __half* __restrict__ table,
                                         float* __restrict__ out,
                                         unsigned int vocab, unsigned int hidden) {
    const unsigned int t = blockIdx.x;
    const unsigned int tok = tokens[t];
    float* dst = out + (size_t)t * hidden;
    for (unsigned int c = threadIdx.x * 8; c < hidden; c += blockDim.x * 8) {
        if (tok >= vocab) {
            #pragma unroll
            for (int i = 0; i < 8; ++i) dst[c + i] = 0.f;
            continue;
        }
        const uint4 raw = *reinterpret_cast<const uint4*>(table + (size_t)tok * hidden + c);
        const unsigned int w4[4] = {raw.x, raw.y, raw.z, raw.w};
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = unpack_h2(w4[i]);
            dst[c + 2 * i] = f.x;
            dst[c + 2 * i + 1] = f.y;
        }
    }
}
