// dissonance_topk.cu: CAP phase 1 (paper Eq. 2-5) in two launches.
//
// Op: src/cap/dissonance_topk/ (plan and launches in kernel.rs, shared by the CUDA device and
// the emulator). Arguments: DissonanceTopkArgs (r2_abi.h), one struct for both entries.
//
// dissonance_topk_anchor_{f32,f16,bf16} (tokens context only): the pooled anchor
//   g[b] = sum_t m_t ctx[b, t] / sum_t m_t (0 when the weights sum to 0) into a [B, D] f32
//   scratch. Block (b, c) owns 32 * V columns of row b (V = 16 / sizeof(T): one 16-byte
//   vector per lane), its R2_DIS_ANCHOR_THREADS / 32 warps split the La tokens, 4 tokens
//   loaded per warp before the first add; warps 1.. hand their sums to warp 0 in warp order.
//   Zero-weight tokens are skipped (a padded token holding NaN does not reach the anchor).
// dissonance_topk_{f32,f16,bf16}: block (b, c) of the flat grid B * chunks:
//   1. the anchor row (the scratch above, or ctx[b] for an anchor context) into shared memory,
//      |g| by a block reduction (the same order in every block of row b, so every block of
//      the row uses the same |g|),
//   2. each warp scores R2_DIS_ROWS_PER_WARP tokens together:
//      delta[b, i] = 1 - <p_i, g> / (|p_i| |g| + R2_COS_EPS); each lane loads 16-byte vectors
//      (vec16 = 1) or the same elements one at a time (vec16 = 0: D * sizeof(T) % 16 != 0 or
//      a base address not 16-byte aligned), R2_DIS_UNROLL vectors per token before the first
//      FMA,
//   3. the LAST block of row b to finish (a per-row counter, `done`, after a __threadfence)
//      selects the top-k of delta[b] and writes the indices and the noise mask: its warp 0
//      alone by r2_warp_topk (warp_select = 1: L <= R2_TOPK_WARP_MAX_L, k <=
//      R2_TOPK_WARP_MAX_K), else the whole block through topk.cuh's top-kp lists (R2Stream).
//   One pass over P and the context; delta is an output of the op.
//
// Ordering: larger first, ties to the lower index (r2_better); NaN keys rank as -inf.
// Shared memory of dissonance_topk_* (4-byte words): g[D] | red[32] | cnt[3 * R2_TOPK_MAXQ] |
// R2Stream(nq = 1, kp, T) with kp = next_pow2(k) and T a power of two >= kp
// (src/cap/dissonance_topk/kernel.rs plans it).
#include "topk.cuh"

#define R2_DIS_ANCHOR_WARPS (R2_DIS_ANCHOR_THREADS / 32)
#define R2_DIS_WARPS (R2_DIS_THREADS / 32)
// Tokens a warp of the anchor pass loads before its first add.
#define R2_DIS_ANCHOR_UNROLL 4

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

// Elements e .. e + V - 1 of `row` as f32, V = 16 / sizeof(T). vec: one 16-byte load (`row + e`
// 16-byte aligned, e + V <= D); otherwise element loads, 0 past D.
template <class T>
__device__ __forceinline__ void cap_load_vec(const T* row, unsigned e, unsigned D, unsigned vec, float* x) {
    constexpr unsigned V = 16 / sizeof(T);
    if (vec) {
        r2_unpack16<T>(r2_load16(row + e), x);
    } else {
#pragma unroll
        for (unsigned u = 0; u < V; ++u) x[u] = e + u < D ? r2_to_f32(row[e + u]) : 0.f;
    }
}

// The pooled anchor, 32 * V columns of one batch row per block.
template <class T>
__device__ __forceinline__ void cap_dissonance_anchor(const DissonanceTopkArgs& a) {
    constexpr unsigned V = 16 / sizeof(T), U = R2_DIS_ANCHOR_UNROLL, NW = R2_DIS_ANCHOR_WARPS;
    const T* __restrict__ ctx = static_cast<const T*>(a.ctx);
    const float* __restrict__ mask = a.mask;
    float* __restrict__ gout = a.g;
    const unsigned La = a.la, D = a.d, vec = a.vec16, has_mask = a.has_mask;
    const unsigned per_row = (D + 32 * V - 1) / (32 * V);
    const unsigned b = blockIdx.x / per_row, c = blockIdx.x % per_row;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned e = (c * 32 + lane) * V;  // this lane's first column
    const float* m = has_mask ? mask + (size_t)b * La : mask;
    const T* base = ctx + (size_t)b * La * D;
    __shared__ float part[NW][32 * V];
    float acc[V];
#pragma unroll
    for (unsigned j = 0; j < V; ++j) acc[j] = 0.f;
    if (e < D) {
        for (unsigned t0 = warp; t0 < La; t0 += NW * U) {
            float w[U], x[U][V];
#pragma unroll
            for (unsigned u = 0; u < U; ++u) {
                const unsigned t = t0 + u * NW;
                w[u] = t < La ? (has_mask ? m[t] : 1.f) : 0.f;
                if (w[u] != 0.f) {
                    cap_load_vec<T>(base + (size_t)t * D, e, D, vec, x[u]);
                } else {
#pragma unroll
                    for (unsigned j = 0; j < V; ++j) x[u][j] = 0.f;
                }
            }
#pragma unroll
            for (unsigned u = 0; u < U; ++u)
                if (w[u] != 0.f) {
#pragma unroll
                    for (unsigned j = 0; j < V; ++j) acc[j] += w[u] * x[u][j];
                }
        }
    }
    if (warp > 0) {
#pragma unroll
        for (unsigned j = 0; j < V; ++j) part[warp][lane * V + j] = acc[j];
    }
    __syncthreads();
    if (warp == 0 && e < D) {
        for (unsigned w = 1; w < NW; ++w) {
#pragma unroll
            for (unsigned j = 0; j < V; ++j) acc[j] += part[w][lane * V + j];
        }
        float cnt = 0.f;
        for (unsigned t = 0; t < La; ++t) cnt += has_mask ? m[t] : 1.f;
#pragma unroll
        for (unsigned j = 0; j < V; ++j)
            if (e + j < D) gout[(size_t)b * D + e + j] = cnt != 0.f ? acc[j] / cnt : 0.f;
    }
}

template <class T>
__device__ __forceinline__ void cap_dissonance(const DissonanceTopkArgs& a) {
    constexpr unsigned V = 16 / sizeof(T), U = R2_DIS_UNROLL, R = R2_DIS_ROWS_PER_WARP;
    const T* __restrict__ p = static_cast<const T*>(a.p);
    const unsigned anchor = a.anchor, vec = a.vec16;
    const unsigned L = a.l, D = a.d, k = a.k, kp = a.kp, tile = a.tile, chunks = a.chunks;
    float* __restrict__ delta = a.delta;
    unsigned* __restrict__ idx = a.idx;
    float* __restrict__ nmask = a.noise_mask;
    const unsigned b = blockIdx.x / chunks, c = blockIdx.x % chunks;
    const unsigned nt = blockDim.x, tid = threadIdx.x;
    const unsigned lane = tid & 31u, warp = tid >> 5;
    R2_DYN_SMEM(float, smem);
    float* g = smem;
    float* red = g + D;
    unsigned* cnt = reinterpret_cast<unsigned*>(red + 32);
    __shared__ unsigned last;

    // 1. the anchor row and |g|
    if (anchor) {
        const T* ctx = static_cast<const T*>(a.ctx) + (size_t)b * D;
        for (unsigned d = tid; d < D; d += nt) g[d] = r2_to_f32(ctx[d]);
    } else {
        const float* gin = a.g + (size_t)b * D;
        for (unsigned d = tid; d < D; d += nt) g[d] = gin[d];
    }
    __syncthreads();
    float ss = 0.f;
    for (unsigned d = tid; d < D; d += nt) ss += g[d] * g[d];
    const float ng = sqrtf(cap_block_sum(ss, red));

    // 2. R tokens per warp: rows i0 .. i0 + R - 1 (clamped to L - 1 for the loads; only live
    // rows are written)
    const unsigned i0 = (c * R2_DIS_WARPS + warp) * R;
    if (i0 < L) {  // warp-uniform
        const T* rows[R];
        float s[R], n2[R];
#pragma unroll
        for (unsigned r = 0; r < R; ++r) {
            rows[r] = p + ((size_t)b * L + min(i0 + r, L - 1)) * D;
            s[r] = 0.f;
            n2[r] = 0.f;
        }
        for (unsigned e0 = lane * V; e0 < D; e0 += 32 * V * U) {
            float x[R][U][V];
#pragma unroll
            for (unsigned r = 0; r < R; ++r)
#pragma unroll
                for (unsigned u = 0; u < U; ++u) {
                    const unsigned e = e0 + u * 32 * V;
                    if (e < D) {
                        cap_load_vec<T>(rows[r], e, D, vec, x[r][u]);
                    } else {
#pragma unroll
                        for (unsigned j = 0; j < V; ++j) x[r][u][j] = 0.f;
                    }
                }
#pragma unroll
            for (unsigned u = 0; u < U; ++u) {
                const unsigned e = e0 + u * 32 * V;
                if (e < D) {
#pragma unroll
                    for (unsigned j = 0; j < V; ++j) {
                        const float gj = e + j < D ? g[e + j] : 0.f;
#pragma unroll
                        for (unsigned r = 0; r < R; ++r) {
                            s[r] += x[r][u][j] * gj;
                            n2[r] += x[r][u][j] * x[r][u][j];
                        }
                    }
                }
            }
        }
#pragma unroll
        for (unsigned r = 0; r < R; ++r) {
            const float sr = r2_warp_sum(s[r]), nr = r2_warp_sum(n2[r]);
            if (lane == 0 && i0 + r < L) delta[(size_t)b * L + i0 + r] = 1.f - sr / (sqrtf(nr) * ng + R2_COS_EPS);
        }
        // this lane's delta stores before the row counter below (the last block reads them)
        if (lane == 0) __threadfence();
    }

    // 3. the last block of row b selects the top-k
    __syncthreads();
    if (tid == 0) last = atomicAdd(a.done + b, 1u) == chunks - 1 ? 1u : 0u;
    __syncthreads();
    if (!last) return;  // block-uniform
    __threadfence();
    const volatile float* drow = delta + (size_t)b * L;  // other blocks' stores: not via L1
    if (a.warp_select) {  // short row, small k: warp 0 alone, no block barrier
        if (warp == 0) {
            for (unsigned i = lane; i < L; i += 32) nmask[(size_t)b * L + i] = 0.f;
            __syncwarp();
            r2_warp_topk<R2_TOPK_WARP_MAX_L / 32>(
                L, k, [&](unsigned i) { return r2_nan_last(drow[i]); },
                [&](unsigned j, unsigned i) {
                    idx[(size_t)b * k + j] = i;
                    nmask[(size_t)b * L + i] = 1.f;
                });
        }
        return;
    }
    R2Stream st;
    r2_stream_carve(st, reinterpret_cast<unsigned char*>(cnt + 3 * R2_TOPK_MAXQ), 1, kp, tile, cnt);
    r2_stream_topk(st, L, [&](unsigned t, unsigned t0) {
        for (unsigned r = tid; r < tile; r += nt) {
            const unsigned i = t0 + r;
            r2_stream_offer(st, t, 0, r, i < L ? r2_nan_last(drow[i]) : -R2_INF, i < L ? i : R2_PAD_INDEX);
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

#define R2_CAP_DISSONANCE(SUFFIX, T)                                                          \
    R2_ENTRY(dissonance_topk_anchor_##SUFFIX, DissonanceTopkArgs, R2_DIS_ANCHOR_THREADS) {    \
        cap_dissonance_anchor<T>(a);                                                          \
    }                                                                                         \
    R2_ENTRY(dissonance_topk_##SUFFIX, DissonanceTopkArgs, R2_DIS_THREADS) { cap_dissonance<T>(a); }

R2_CAP_DISSONANCE(f32, float)
R2_CAP_DISSONANCE(f16, __half)
R2_CAP_DISSONANCE(bf16, __nv_bfloat16)
