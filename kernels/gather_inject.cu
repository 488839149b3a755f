// gather_inject.cu: CAP phase 3 (paper Eq. 8-9), out of place, and its backward.
//
// Op: src/cap/gather_inject/ (plan and launches in kernel.rs, shared by the CUDA device and
// the emulator). Arguments: GatherInjectArgs (r2_abi.h), one struct for the three entries.
//
// One warp per output row, R2_GI_ROWS_PER_BLOCK rows per block (grid = ceil(rows /
// rows_per_block)). Indices were validated on the host (range, distinct noise indices per
// batch row) before any launch. With vec16 = 1 (every row 16-byte aligned: D * sizeof(T) % 16
// == 0 and the base addresses aligned) a lane moves 16-byte vectors, R2_GI_UNROLL loads in
// flight before its stores; otherwise it moves elements.
//   gather_inject_fwd_*:   out[b, i] = src[b, sal[b, j]] if i == noise[b, j], else h[b, i].
//   gather_inject_zero_*:  grad_h[b, i] = 0 if i is a noise row, else grad[b, i].
//   gather_inject_scatter_*: grad_src[b, s] = sum over j with sal[b, j] == s (in j order) of
//                          grad[b, noise[b, j]], accumulated in f32; 0 when s is unused.
//                          Deterministic: no atomics, each output row has one writer.
#include "common.cuh"

// 16-byte vectors a lane loads before its first store.
#define R2_GI_UNROLL 4

// The j with noise[b, j] == i, or -1.
__device__ __forceinline__ int cap_noise_slot(const unsigned* noise, unsigned b, unsigned k, unsigned i) {
    int slot = -1;
    for (unsigned j = 0; j < k; ++j)
        if (noise[(size_t)b * k + j] == i) slot = (int)j;
    return slot;
}

// One warp copies a row of D elements (`from` null: writes zeros).
template <class T>
__device__ __forceinline__ void cap_copy_row(T* o, const T* from, unsigned D, unsigned vec, unsigned lane) {
    if (vec) {
        constexpr unsigned V = 16 / sizeof(T), U = R2_GI_UNROLL;
        const unsigned nv = D / V;
        for (unsigned c0 = lane; c0 < nv; c0 += 32 * U) {
            uint4 v[U];
#pragma unroll
            for (unsigned u = 0; u < U; ++u) {
                const unsigned c = c0 + u * 32;
                v[u] = from && c < nv ? r2_load16(from + c * V) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (unsigned u = 0; u < U; ++u)
                if (c0 + u * 32 < nv) r2_store16(o + (c0 + u * 32) * V, v[u]);
        }
    } else if (from) {
        for (unsigned d = lane; d < D; d += 32) o[d] = from[d];
    } else {
        for (unsigned d = lane; d < D; d += 32) o[d] = r2_from_f32<T>(0.f);
    }
}

// fwd (zero = 0) and zero (zero = 1): one warp per row of out [B, L, D].
template <class T>
__device__ __forceinline__ void cap_inject_rows(const GatherInjectArgs& a, unsigned zero) {
    const T* __restrict__ h = static_cast<const T*>(a.h);
    const T* __restrict__ src = static_cast<const T*>(a.src);
    T* __restrict__ out = static_cast<T*>(a.out);
    const unsigned B = a.b, L = a.l, Ls = a.ls, D = a.d, k = a.k;
    const unsigned lane = threadIdx.x & 31u;
    const unsigned row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= B * L) return;  // warp-uniform, no barrier below
    const unsigned b = row / L, i = row % L;
    const int slot = cap_noise_slot(a.noise, b, k, i);
    const T* from = slot < 0 ? h + (size_t)row * D
                    : zero   ? nullptr
                             : src + ((size_t)b * Ls + a.sal[(size_t)b * k + slot]) * D;
    cap_copy_row<T>(out + (size_t)row * D, from, D, a.vec16, lane);
}

// scatter: one warp per row of out [B, Ls, D].
template <class T>
__device__ __forceinline__ void cap_scatter_rows(const GatherInjectArgs& a) {
    const T* __restrict__ grad = static_cast<const T*>(a.h);
    T* __restrict__ out = static_cast<T*>(a.out);
    const unsigned B = a.b, L = a.l, Ls = a.ls, D = a.d, k = a.k;
    const unsigned lane = threadIdx.x & 31u;
    const unsigned row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= B * Ls) return;
    const unsigned b = row / Ls, s = row % Ls;
    T* o = out + (size_t)row * D;
    if (a.vec16) {
        constexpr unsigned V = 16 / sizeof(T);
        for (unsigned c = lane; c < D / V; c += 32) {
            float acc[V], x[V];
#pragma unroll
            for (unsigned e = 0; e < V; ++e) acc[e] = 0.f;
            for (unsigned j = 0; j < k; ++j) {
                if (a.sal[(size_t)b * k + j] != s) continue;
                r2_unpack16<T>(r2_load16(grad + ((size_t)b * L + a.noise[(size_t)b * k + j]) * D + c * V), x);
#pragma unroll
                for (unsigned e = 0; e < V; ++e) acc[e] += x[e];
            }
            r2_store16(o + c * V, r2_pack16<T>(acc));
        }
        return;
    }
    for (unsigned d = lane; d < D; d += 32) {
        float acc = 0.f;
        for (unsigned j = 0; j < k; ++j) {
            if (a.sal[(size_t)b * k + j] != s) continue;
            acc += r2_to_f32(grad[((size_t)b * L + a.noise[(size_t)b * k + j]) * D + d]);
        }
        o[d] = r2_from_f32<T>(acc);
    }
}

#define R2_GI_THREADS (32 * R2_GI_ROWS_PER_BLOCK)
#define R2_CAP_INJECT(SUFFIX, T)                                                                         \
    R2_ENTRY(gather_inject_fwd_##SUFFIX, GatherInjectArgs, R2_GI_THREADS) { cap_inject_rows<T>(a, 0u); } \
    R2_ENTRY(gather_inject_zero_##SUFFIX, GatherInjectArgs, R2_GI_THREADS) { cap_inject_rows<T>(a, 1u); } \
    R2_ENTRY(gather_inject_scatter_##SUFFIX, GatherInjectArgs, R2_GI_THREADS) { cap_scatter_rows<T>(a); }

R2_CAP_INJECT(f32, float)
R2_CAP_INJECT(f16, __half)
R2_CAP_INJECT(bf16, __nv_bfloat16)
