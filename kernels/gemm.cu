// gemm.cu — tensor-core GEMM for prefill and large decode batches: C (M, N) = A (M, K) · Bᵀ.
//
// Math:    C[m, n] = sum_k float(A[m, k]) * float(B[n, k])   (+ bias[n] when bias != null)
// Types:   A F16 (M, K) activations; B F16 (N, K) the weight as stored in the checkpoint (so both
//          operands are K-contiguous: mma "row.col"); C F32 (M, N); F32 accumulation in mma.sync.
// Launch:  grid = (ceil(N / 128), ceil(M / 128)); block = 256 threads = 8 warps as 2 (M) x 4 (N);
//          block tile 128 x 128 x 32, warp tile 64 x 32 = 4 x 4 mma.sync.m16n8k16 per k16 step,
//          64 F32 accumulators per thread. Requires K % 32 == 0 (launcher checks); M and N edges
//          are predicated (cp.async zero-fill for loads, guarded stores).
// Memory:  3-stage cp.async pipeline (cp.async.cg 16 B, commit/wait_group), 16 KiB of shared
//          memory per stage (A and B tiles 128 x 32 halfs each) = 48 KiB static.
//          Shared rows are 64 B = 4 chunks of 16 B; chunk c of row r is stored at c ^ ((r >> 1) & 3)
//          so the 8 row addresses of one ldmatrix phase fall in 8 distinct 16-byte bank groups
//          (conflict-free ldmatrix and cp.async stores).
//          Fragments: ldmatrix.x4 for A (16 x 16) and for two n8 tiles of B at a time.
// CPU twin: backend::cpu::matmul (A rounded to F16 first).
// v1: plain 128x128 tile; a 64-row variant for M <= 64 and a split-K variant are the next steps.
#include <cuda_fp16.h>

#define BM 128
#define BN 128
#define BK 32
#define STAGES 3
#define THREADS 256

__device__ __forceinline__ unsigned int smem_u32(const void* p) {
    return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}

// Offset (in halfs) of 16-byte chunk `c` (0..3) of tile row `r`, swizzled.
__device__ __forceinline__ int swz(int r, int c) { return r * BK + ((c ^ ((r >> 1) & 3)) << 3); }

__device__ __forceinline__ void cp_async16(unsigned int dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;  // src-size 0 -> the 16 bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void load_tile(__half* sA, __half* sB, const __half* A, const __half* B,
                                          int M, int N, int K, int m0, int n0, int k0) {
    // 128 rows x 4 chunks = 512 chunks per operand; 256 threads -> 2 each.
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int idx = threadIdx.x + i * THREADS;
        const int r = idx >> 2, c = idx & 3;
        const int gm = m0 + r, gn = n0 + r;
        const __half* srcA = A + (size_t)(gm < M ? gm : 0) * K + k0 + c * 8;
        const __half* srcB = B + (size_t)(gn < N ? gn : 0) * K + k0 + c * 8;
        cp_async16(smem_u32(sA + swz(r, c)), srcA, gm < M);
        cp_async16(smem_u32(sB + swz(r, c)), srcB, gn < N);
    }
}

__device__ __forceinline__ void ldmatrix_x4(unsigned int* r, unsigned int addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void mma16816(float* c, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

extern "C" __global__ void __launch_bounds__(THREADS) gemm_f16_mma(
    const __half* __restrict__ A, const __half* __restrict__ B, const float* __restrict__ bias,
    float* __restrict__ C, int M, int N, int K) {
    __shared__ __align__(128) __half smA[STAGES][BM * BK];
    __shared__ __align__(128) __half smB[STAGES][BN * BK];
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;  // warp tile origin in the block tile

    float acc[4][4][4];
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int ktiles = K / BK;
    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_tile(smA[s], smB[s], A, B, M, N, K, m0, n0, s * BK);
        asm volatile("cp.async.commit_group;\n" ::);
    }

    for (int kt = 0; kt < ktiles; ++kt) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
        __syncthreads();  // stage kt landed for every thread; stage kt-1 is free to overwrite
        const int next = kt + STAGES - 1;
        if (next < ktiles) {
            const int s = next % STAGES;
            load_tile(smA[s], smB[s], A, B, M, N, K, m0, n0, next * BK);
        }
        asm volatile("cp.async.commit_group;\n" ::);

        const __half* sA = smA[kt % STAGES];
        const __half* sB = smB[kt % STAGES];
        #pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned int af[4][4], bf[4][2];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                // lanes 0-15: rows 0-15 at k 0; lanes 16-31: rows 0-15 at k 8 -> a0..a3
                const int r = wm + i * 16 + (lane & 15);
                const int c = kk * 2 + (lane >> 4);
                ldmatrix_x4(af[i], smem_u32(sA + swz(r, c)));
            }
            #pragma unroll
            for (int j = 0; j < 4; j += 2) {
                // lanes 0-7: n 0-7 k0; 8-15: n 0-7 k8; 16-23: n 8-15 k0; 24-31: n 8-15 k8
                const int r = wn + j * 8 + (lane & 7) + ((lane >> 4) << 3);
                const int c = kk * 2 + ((lane >> 3) & 1);
                unsigned int t[4];
                ldmatrix_x4(t, smem_u32(sB + swz(r, c)));
                bf[j][0] = t[0];
                bf[j][1] = t[1];
                bf[j + 1][0] = t[2];
                bf[j + 1][1] = t[3];
            }
            #pragma unroll
            for (int i = 0; i < 4; ++i)
                #pragma unroll
                for (int j = 0; j < 4; ++j) mma16816(acc[i][j], af[i], bf[j]);
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::);

    // c0,c1: row lane/4, cols 2*(lane%4)+{0,1}; c2,c3: row lane/4 + 8.
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + wn + j * 8 + (lane & 3) * 2;
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + wm + i * 16 + (lane >> 2) + h * 8;
                if (row >= M) continue;
                #pragma unroll
                for (int e = 0; e < 2; ++e) {
                    if (col + e < N) {
                        const float b = bias != nullptr ? bias[col + e] : 0.f;
                        C[(size_t)row * N + col + e] = acc[i][j][h * 2 + e] + b;
                    }
                }
            }
        }
    }
}
