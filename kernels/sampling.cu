// sampling.cu — next-token choice on the GPU, so a batch's logits never cross PCIe.
//
// argmax_rows:  out[r] = argmax_i logits[r, i] (lowest index on ties, NaN never wins).
// sample_rows:  per row r with temperature T[r] > 0, top_k[r] (0 = off), top_p[r] (1 = off):
//   x_i = logits[r, i] / T; keep K = {i : x_i >= tau_k} where tau_k is the k-th largest x
//   (ties at the threshold are all kept); then keep P = {i in K : x_i >= tau_p} with tau_p the
//   largest threshold whose kept mass sum_{P} e^(x_i - max) >= top_p * sum_{K} e^(x_i - max)
//   (the smallest nucleus, ties kept); draw u ~ U[0, 1) from Philox4x32-10 with
//   key = seed[r], counter = (step[r], r-independent 0, 0, 0), and return the first index (in
//   vocabulary order) where the running kept mass exceeds u * mass(P).
//   Same (seed, step, logits) -> same token. Rows with T <= 0 are greedy (argmax).
//   Thresholds are found by bisection on the order-preserving 32-bit key of the float (32
//   counting passes for top-k, 32 mass passes for top-p) — exact, sort-free, no extra memory.
// Types:   logits F32 (rows, vocab); out U32 (rows,); per-row params F32 / U32 / U64.
// Launch:  grid = rows; block = 1024 threads; block reductions through shared memory.
// CPU twin: engine::sampler (same distribution; the CPU draws its uniform from a different RNG,
//           so seeded CUDA and CPU outputs differ token-for-token while both are deterministic).
#include <cuda_fp16.h>

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define THREADS 1024

__device__ __forceinline__ unsigned int fkey(float f) {  // monotone float -> uint32
    const unsigned int b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

template <typename T>
__device__ T block_sum(T v, T* sh) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    T r = 0;
    for (int i = 0; i < THREADS / 32; ++i) r += sh[i];
    return r;
}

__device__ void block_argmax(const float* x, unsigned int n, float* best_v, unsigned int* best_i) {
    __shared__ float sv[THREADS / 32];
    __shared__ unsigned int si[THREADS / 32];
    float bv = -INFINITY;
    unsigned int bi = 0xffffffffu;
    for (unsigned int i = threadIdx.x; i < n; i += THREADS) {
        const float v = x[i];
        if (v > bv || (bi == 0xffffffffu && v == v)) { bv = v; bi = i; }
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const unsigned int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    __syncthreads();
    if (l == 0) { sv[w] = bv; si[w] = bi; }
    __syncthreads();
    bv = sv[0];
    bi = si[0];
    for (int i = 1; i < THREADS / 32; ++i)
        if (sv[i] > bv || (sv[i] == bv && si[i] < bi)) { bv = sv[i]; bi = si[i]; }
    *best_v = bv;
    *best_i = bi == 0xffffffffu ? 0 : bi;
}

extern "C" __global__ void __launch_bounds__(THREADS) argmax_rows(const float* __restrict__ logits,
                                                                  unsigned int* __restrict__ out,
                                                                  unsigned int vocab) {
    float v;
    unsigned int i;
    block_argmax(logits + (size_t)blockIdx.x * vocab, vocab, &v, &i);
    if (threadIdx.x == 0) out[blockIdx.x] = i;
}

// Philox4x32-10 (Salmon et al., SC'11), first output word as a uniform in [0, 1).
__device__ float philox_uniform(unsigned long long seed, unsigned int ctr0) {
    unsigned int c0 = ctr0, c1 = 0, c2 = 0, c3 = 0;
    unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
    #pragma unroll
    for (int r = 0; r < 10; ++r) {
        const unsigned int hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const unsigned int hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return (c0 >> 8) * (1.0f / 16777216.0f);
}

extern "C" __global__ void __launch_bounds__(THREADS) sample_rows(
    const float* __restrict__ logits, unsigned int* __restrict__ out,
    const float* __restrict__ temperature, const unsigned int* __restrict__ top_k,
    const float* __restrict__ top_p, const unsigned long long* __restrict__ seed,
    const unsigned int* __restrict__ step, unsigned int vocab) {
    __shared__ float shf[THREADS / 32];
    __shared__ unsigned int shu[THREADS / 32];
    __shared__ float scan[THREADS];
    const unsigned int r = blockIdx.x;
    const float* x = logits + (size_t)r * vocab;
    float mx;
    unsigned int amax;
    block_argmax(x, vocab, &mx, &amax);
    const float T = temperature[r];
    if (!(T > 0.f)) {
        if (threadIdx.x == 0) out[r] = amax;
        return;
    }
    const float invT = 1.f / T;
    // top-k threshold: largest key K with count(key >= K) >= k.
    unsigned int kth = 0;
    const unsigned int k = top_k[r];
    if (k > 0 && k < vocab) {
        unsigned int lo = 0, hi = 0xffffffffu;  // invariant: count(>= lo) >= k
        while (lo < hi) {
            // 64-bit midpoint: hi - lo + 1 overflows 32 bits on the first step.
            const unsigned int mid = (unsigned int)(((unsigned long long)lo + hi + 1) / 2);
            unsigned int c = 0;
            for (unsigned int i = threadIdx.x; i < vocab; i += THREADS) c += fkey(x[i]) >= mid;
            if (block_sum<unsigned int>(c, shu) >= k) lo = mid; else hi = mid - 1;
        }
        kth = lo;
    }
    // Mass of the top-k set, relative to the max.
    float z = 0.f;
    for (unsigned int i = threadIdx.x; i < vocab; i += THREADS)
        if (fkey(x[i]) >= kth) z += __expf((x[i] - mx) * invT);
    const float zk = block_sum<float>(z, shf);
    unsigned int pth = kth;
    const float p = top_p[r];
    if (p < 1.f) {
        unsigned int lo = kth, hi = fkey(mx);  // invariant: mass(>= lo) >= p * zk
        while (lo < hi) {
            const unsigned int mid = (unsigned int)(((unsigned long long)lo + hi + 1) / 2);
            float s = 0.f;
            for (unsigned int i = threadIdx.x; i < vocab; i += THREADS)
                if (fkey(x[i]) >= mid) s += __expf((x[i] - mx) * invT);
            if (block_sum<float>(s, shf) >= p * zk) lo = mid; else hi = mid - 1;
        }
        pth = lo;
    }
    // Kept mass per contiguous chunk of the vocabulary, then an inclusive scan over chunks.
    const unsigned int chunk = (vocab + THREADS - 1) / THREADS;
    const unsigned int b = threadIdx.x * chunk, e = min(vocab, b + chunk);
    float mine = 0.f;
    for (unsigned int i = b; i < e; ++i)
        if (fkey(x[i]) >= pth) mine += __expf((x[i] - mx) * invT);
    scan[threadIdx.x] = mine;
    __syncthreads();
    for (unsigned int o = 1; o < THREADS; o <<= 1) {  // Hillis-Steele inclusive scan
        const float add = threadIdx.x >= o ? scan[threadIdx.x - o] : 0.f;
        __syncthreads();
        scan[threadIdx.x] += add;
        __syncthreads();
    }
    const float total = scan[THREADS - 1];
    const float u = philox_uniform(seed[r], step[r]) * total;
    const float before = threadIdx.x > 0 ? scan[threadIdx.x - 1] : 0.f;
    __shared__ unsigned int pick;
    if (threadIdx.x == 0) pick = amax;  // fallback if rounding leaves u beyond the last token
    __syncthreads();
    if (u >= before && u < scan[threadIdx.x]) {
        float run = before;
        unsigned int last = b;
        for (unsigned int i = b; i < e; ++i) {
            if (fkey(x[i]) < pth) continue;
            last = i;
            run += __expf((x[i] - mx) * invT);
            if (u < run) break;
        }
        pick = last;
    }
    __syncthreads();
    if (threadIdx.x == 0) out[r] = pick;
}
