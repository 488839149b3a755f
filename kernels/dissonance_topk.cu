// dissonance_topk.cu: CAP phase 1 (paper Eq. 2-5) in one kernel.
//
// Op: src/cap/dissonance_topk/ (plan and launch in kernel.rs, shared by the CUDA device and
// the emulator). Arguments: DissonanceTopkArgs (r2_abi.h).
//
// dissonance_topk_{f32,f16,bf16}: ONE block per batch row b, one kernel for the whole op:
//   1. the anchor g (masked mean of ctx[b], or the given anchor row) into shared memory,
//   2. |g| by a block reduction,
//   3. one warp per retrieved token i: delta[b, i] = 1 - <p_i, g> / (|p_i| |g| + R2_COS_EPS),
//      written to the delta output and into a shared tile of (key, i),
//   4. the tile offered to the streaming top-kp lists of topk.cuh (R2Stream).
//   No intermediate tensor reaches global memory: delta is an output of the op.
//
// Ordering: larger first, ties to the lower index (r2_better); NaN keys rank as -inf.
// Shared memory (4-byte words): g[D] | red[32] | cnt[3 * R2_TOPK_MAXQ] | R2Stream(nq = 1, kp, T)
// with kp = next_pow2(k) and T a power of two >= kp (src/cap/dissonance_topk/kernel.rs plans it).
#include "topk.cuh"

// Block-wide sum; every thread gets the total (same order on every thread). Callable by all
// threads only; reuses `red` (32 floats).
__device__ __forceinline__ float cap_block_sum(float v, float* red) {
    v = r2_warp_sum(v);
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (unsigned w = 0; w < nw; ++w) t += red[w];
    __syncthreads();
    return t;
}

template <class T>
__device__ __forceinline__ void cap_dissonance(const DissonanceTopkArgs& a) {
    const T* __restrict__ p = static_cast<const T*>(a.p);
    const T* __restrict__ ctx = static_cast<const T*>(a.ctx);
    const float* __restrict__ mask = a.mask;
    const unsigned has_mask = a.has_mask, anchor = a.anchor;
    const unsigned L = a.l, La = a.la, D = a.d, k = a.k, kp = a.kp, tile = a.tile;
    float* __restrict__ delta = a.delta;
    unsigned* __restrict__ idx = a.idx;
    float* __restrict__ nmask = a.noise_mask;
    const unsigned b = blockIdx.x;
    const unsigned nt = blockDim.x, tid = threadIdx.x;
    const unsigned lane = tid & 31u, warp = tid >> 5, nw = nt >> 5;
    R2_DYN_SMEM(float, smem);
    float* g = smem;
    float* red = g + D;
    unsigned* cnt = reinterpret_cast<unsigned*>(red + 32);
    R2Stream st;
    r2_stream_carve(st, reinterpret_cast<unsigned char*>(cnt + 3 * R2_TOPK_MAXQ), 1, kp, tile, cnt);

    // 1. anchor (Eq. 2)
    if (anchor) {
        for (unsigned d = tid; d < D; d += nt) g[d] = r2_to_f32(ctx[(size_t)b * D + d]);
    } else {
        float cnt = 0.f;
        for (unsigned t = 0; t < La; ++t) cnt += has_mask ? mask[(size_t)b * La + t] : 1.f;
        for (unsigned d = tid; d < D; d += nt) {
            float s = 0.f;
            for (unsigned t = 0; t < La; ++t) {
                const float w = has_mask ? mask[(size_t)b * La + t] : 1.f;
                if (w != 0.f) s += w * r2_to_f32(ctx[((size_t)b * La + t) * D + d]);
            }
            g[d] = cnt != 0.f ? s / cnt : 0.f;
        }
    }
    __syncthreads();
    // 2. |g|
    float ss = 0.f;
    for (unsigned d = tid; d < D; d += nt) ss += g[d] * g[d];
    const float ng = sqrtf(cap_block_sum(ss, red));

    // 3 + 4. cosines, one warp per token, streamed through the top-k
    r2_stream_topk(st, L, [&](unsigned t, unsigned t0) {
        for (unsigned r = warp; r < tile; r += nw) {
            const unsigned i = t0 + r;
            float key = -R2_INF;
            unsigned id = R2_PAD_INDEX;
            if (i < L) {  // warp-uniform
                const T* row = p + ((size_t)b * L + i) * D;
                float s = 0.f, n2 = 0.f;
                for (unsigned d = lane; d < D; d += 32) {
                    const float x = r2_to_f32(row[d]);
                    s += x * g[d];
                    n2 += x * x;
                }
                s = r2_warp_sum(s);
                n2 = r2_warp_sum(n2);
                const float dl = 1.f - s / (sqrtf(n2) * ng + R2_COS_EPS);
                if (lane == 0) delta[(size_t)b * L + i] = dl;
                key = r2_nan_last(dl);
                id = i;
            }
            if (lane == 0) r2_stream_offer(st, t, 0, r, key, id);
        }
    });

    // outputs: indices (best first) and the 0/1 noise mask
    for (unsigned i = tid; i < L; i += nt) nmask[(size_t)b * L + i] = 0.f;
    __syncthreads();
    for (unsigned j = tid; j < k; j += nt) {
        const unsigned i = st.run_i[j];
        idx[(size_t)b * k + j] = i;
        nmask[(size_t)b * L + i] = 1.f;
    }
}

#define R2_CAP_DISSONANCE(SUFFIX, T) \
    R2_ENTRY(dissonance_topk_##SUFFIX, DissonanceTopkArgs, R2_CAP_TOPK_THREADS) { cap_dissonance<T>(a); }

R2_CAP_DISSONANCE(f32, float)
R2_CAP_DISSONANCE(f16, __half)
R2_CAP_DISSONANCE(bf16, __nv_bfloat16)
