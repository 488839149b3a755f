// cosine_topk_rescore.cuh: what the two approximate paths of cosine_topk share (the
// tensor-core pass, cosine_topk_tc.cuh, and the cuBLAS GEMM + select path,
// cosine_topk_gemm_select.cuh): the unit queries before the approximate scores, and after them
// the exact answer, with no host round trip. Included by cosine_topk.cu after the bandwidth
// kernel (it uses cosine_topk_qnorm_slice / cosine_topk_qnorm, the canonical |q|).
//
// Op: src/retrieve/cosine_topk/ (host side in rescore.rs). Arguments: CosineTopkPrepArgs,
// CosineTopkRescoreArgs, CosineTopkFallbackArgs, CosineTopkFinishArgs.
//
// cosine_topk_prep_<dt>: one warp per row of the unit-query buffer (4 rows per block): for a
//   query b < B the canonical |q| (lane s sums slice s, coalesced across lanes), COS_EPS / |q|,
//   the unit query q / |q| in the operand type (bf16, f16, or f32: tf32 or plain f32 GEMM
//   operands) zero-padded to d_pad columns, the exclusion check (R2_ERR_BAD_EXCLUDE,
//   R2_ERR_FEW_ROWS), and the reset of the query's per-call counters (threshold key, candidate
//   count); rows B..rows are zero (the tensor-core pass reads whole query tiles). Block 0 resets
//   the flagged-query list.
// cosine_topk_rescore_<dt>: one block per query: the n-th best approximate score A_n among its
//   candidates (topk.cuh's streaming top-kp), the exact f32 score of every candidate at or above
//   A_n - margin (cosine_topk_exact_dot: the bandwidth kernel's fmaf chain over d ascending,
//   16-byte loads when rows allow, the canonical |q|, the same division), and the top n of
//   those (ties to the lower row). A query whose candidates overflowed (more than capq in the
//   pass, more than cap within the margin) is appended to the flagged list instead.
// cosine_topk_fallback_<dt>: grid (slots, gy): the exact top-kp of each flagged query over bank
//   rows [y * chunk_rows, (y + 1) * chunk_rows) (one thread per row in tiles of `tile` rows, the
//   same exact arithmetic),
//   flagged query f in block x = f % slots; nothing to do (the common case) exits at once.
// cosine_topk_finish: grid (slots): merges each flagged query's gy * kp exact candidates into
//   its output row, then, if the call's error word is set, writes every score of the call as
//   NaN (so an unchecked caller sees the failure, as the bandwidth merge does).
// Errors: the shared 3-word error word (first reporter wins): exact NaN scores report
// R2_ERR_NAN_SCORE (query, row). The word is never read on the host by these kernels' callers.
#pragma once
#include "topk.cuh"

#define R2_RS_FULL 0xffffffffu

// The exact score's dot product q . k (q f32, k in T): fmaf(k[d], q[d], acc) for d = 0, 1, ...
// in order, the arithmetic of cosine_topk_partial, so the bits equal the bandwidth kernel's.
// vec: both rows start 16-byte aligned and D * sizeof(T) % 16 == 0 (16-byte loads, same order).
template <class T>
__device__ __forceinline__ float cosine_topk_exact_dot(const T* __restrict__ k, const float* __restrict__ q,
                                                       unsigned D, bool vec) {
    float acc = 0.f;
    if (vec) {
        constexpr unsigned E = 16 / sizeof(T);
#pragma unroll 4
        for (unsigned v = 0; v < D / E; ++v) {
            float kf[E], qf[E];
            r2_unpack16<T>(r2_load16(k + v * E), kf);
#pragma unroll
            for (unsigned h = 0; h < E / 4; ++h) r2_unpack16<float>(r2_load16(q + v * E + 4 * h), qf + 4 * h);
#pragma unroll
            for (unsigned e = 0; e < E; ++e) acc = fmaf(kf[e], qf[e], acc);
        }
    } else {
        for (unsigned d = 0; d < D; ++d) acc = fmaf(r2_to_f32(k[d]), q[d], acc);
    }
    return acc;
}

template <class T>
__device__ __forceinline__ void cosine_topk_prep(const CosineTopkPrepArgs& a) {
    const float* __restrict__ q = a.q;
    T* __restrict__ qhat = static_cast<T*>(a.qhat);
    const unsigned B = a.b, D = a.d, Dp = a.d_pad;
    __shared__ float slices[4][R2_CT_QN_SLICES];
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned b = blockIdx.x * (blockDim.x >> 5) + warp;
    if (blockIdx.x == 0 && threadIdx.x == 0) a.flagged[0] = 0u;
    if (b >= a.rows) return;  // warp-uniform; no block barrier below
    float scale = 0.f;
    if (b < B) {
        const float* qb = q + (size_t)b * D;
        slices[warp][lane] = cosine_topk_qnorm_slice(qb, D, lane);
        __syncwarp();
        float qn = 0.f;
        if (lane == 0) {
            qn = cosine_topk_qnorm(slices[warp]);
            a.qeps[b] = R2_COS_EPS / qn;
            a.theta[b] = 0u;
            a.count[b] = 0u;
            if (a.exclude != nullptr) {
                const unsigned e = a.exclude[b];
                if (e != R2_PAD_INDEX && e >= a.m) r2_report(a.err, R2_ERR_BAD_EXCLUDE, b, e);
                else if (e != R2_PAD_INDEX && a.n >= a.m) r2_report(a.err, R2_ERR_FEW_ROWS, b, e);
            }
        }
        qn = __shfl_sync(R2_RS_FULL, qn, 0);
        // A zero, overflowing or NaN norm scales by 0: scores 0, or NaN from a NaN/inf input.
        scale = qn > 0.f && qn < R2_INF ? 1.f / qn : 0.f;
    }
    T* out = qhat + (size_t)b * Dp;
    for (unsigned d = lane; d < Dp; d += 32) {
        const float v = b < B && d < D ? q[(size_t)b * D + d] * scale : 0.f;
        out[d] = r2_from_f32<T>(v);
    }
}

template <class T>
__device__ __forceinline__ void cosine_topk_rescore(const CosineTopkRescoreArgs& a) {
    const float* __restrict__ q = a.q;
    const T* __restrict__ keys = static_cast<const T*>(a.keys);
    const float* __restrict__ kn = a.key_norms;
    const unsigned D = a.d, n = a.n, cap = a.cap;
    const bool vec = a.vec16 != 0;
    R2_DYN_SMEM(unsigned char, smem);
    __shared__ unsigned cnt[3 * R2_TOPK_MAXQ];
    __shared__ unsigned nsel;
    __shared__ float qn;
    __shared__ float qslice[R2_CT_QN_SLICES];
    const unsigned tid = threadIdx.x;
    const size_t b = blockIdx.x;
    const unsigned total = a.count[b];
    float* out_s = a.out_s + b * n;
    unsigned* out_i = a.out_i + b * n;
    const float* cs = a.cand_s + b * a.capq;
    const unsigned* ci = a.cand_i + b * a.capq;
    const float* qb = q + b * D;

    R2Stream st;
    unsigned char* end = r2_stream_carve(st, smem, 1, a.kp, R2_TC_RESCORE_TILE, cnt);
    float* sel_s = reinterpret_cast<float*>(end);
    unsigned* sel_i = reinterpret_cast<unsigned*>(sel_s + cap);

    bool overflow = total > a.capq;  // block-uniform
    if (!overflow) {
        // The n-th best approximate score: every row of the approximate top n is a candidate.
        r2_stream_init(st);
        unsigned tile = 0;
        for (unsigned base = 0; base < total; base += R2_TC_RESCORE_TILE, ++tile) {
            for (unsigned e = tid; e < R2_TC_RESCORE_TILE; e += blockDim.x) {
                const unsigned c = base + e;
                r2_stream_offer(st, tile, 0, e, c < total ? cs[c] : -R2_INF, c < total ? ci[c] : R2_PAD_INDEX);
            }
            r2_stream_flush(st, tile);
        }
        const float th = st.run_s[n - 1] - a.margin;
        if (tid < R2_CT_QN_SLICES) qslice[tid] = cosine_topk_qnorm_slice(qb, D, tid);
        __syncthreads();
        if (tid == 0) {
            nsel = 0;
            qn = cosine_topk_qnorm(qslice);
        }
        __syncthreads();
        for (unsigned c = tid; c < total; c += blockDim.x) {
            if (cs[c] >= th) {
                const unsigned slot = atomicAdd(&nsel, 1u);
                if (slot < cap) sel_i[slot] = ci[c];
            }
        }
        __syncthreads();
        overflow = nsel > cap;
    }
    if (overflow) {
        // The exact answer comes from cosine_topk_fallback / cosine_topk_finish.
        if (tid == 0) a.flagged[1 + atomicAdd(a.flagged, 1u)] = (unsigned)b;
        return;
    }
    const unsigned ns = nsel;
    unsigned len = 2;
    while (len < ns) len <<= 1;
    for (unsigned t = tid; t < len; t += blockDim.x) {
        if (t < ns) {
            const unsigned r = sel_i[t];
            const float v = cosine_topk_exact_dot(keys + (size_t)r * D, qb, D, vec) / (qn * kn[r] + R2_COS_EPS);
            if (isnan(v)) r2_report(a.err, R2_ERR_NAN_SCORE, (unsigned)b, r);
            sel_s[t] = isnan(v) ? -R2_INF : v;
        } else {
            sel_s[t] = -R2_INF;
            sel_i[t] = R2_PAD_INDEX;
        }
    }
    __syncthreads();
    r2_block_sort(sel_s, sel_i, len, 1, len, 1u);
    for (unsigned i = tid; i < n; i += blockDim.x) {
        out_s[i] = sel_s[i];
        out_i[i] = sel_i[i];
    }
}

template <class T>
__device__ __forceinline__ void cosine_topk_fallback(const CosineTopkFallbackArgs& a) {
    const unsigned nflag = a.flagged[0];  // block-uniform
    if (blockIdx.x >= nflag) return;
    const T* __restrict__ keys = static_cast<const T*>(a.keys);
    const float* __restrict__ kn = a.key_norms;
    const unsigned M = a.m, D = a.d, kp = a.kp, TL = a.tile;
    const bool vec = a.vec16 != 0;
    R2_DYN_SMEM(unsigned char, smem);
    __shared__ unsigned cnt[3 * R2_TOPK_MAXQ];
    __shared__ float qslice[R2_CT_QN_SLICES];
    __shared__ float qn;
    const unsigned tid = threadIdx.x;
    const unsigned row0 = blockIdx.y * a.chunk_rows, row1 = min(M, row0 + a.chunk_rows);
    R2Stream st;
    r2_stream_carve(st, smem, 1, kp, TL, cnt);
    for (unsigned f = blockIdx.x; f < nflag; f += gridDim.x) {
        const unsigned b = a.flagged[1 + f];
        const float* qb = a.q + (size_t)b * D;
        const unsigned ex = a.exclude != nullptr ? a.exclude[b] : R2_PAD_INDEX;
        if (tid < R2_CT_QN_SLICES) qslice[tid] = cosine_topk_qnorm_slice(qb, D, tid);
        __syncthreads();
        if (tid == 0) qn = cosine_topk_qnorm(qslice);
        r2_stream_init(st);  // ends with a barrier: qn is visible
        unsigned tile = 0;
        for (unsigned base = row0; base < row1; base += TL, ++tile) {
            for (unsigned e = tid; e < TL; e += blockDim.x) {
                const unsigned r = base + e;
                float s = -R2_INF;
                unsigned i = R2_PAD_INDEX;
                if (r < row1) {
                    const float v =
                        cosine_topk_exact_dot(keys + (size_t)r * D, qb, D, vec) / (qn * kn[r] + R2_COS_EPS);
                    if (isnan(v)) r2_report(a.err, R2_ERR_NAN_SCORE, b, r);
                    else if (r != ex) {
                        s = v;
                        i = r;
                    }
                }
                r2_stream_offer(st, tile, 0, e, s, i);
            }
            r2_stream_flush(st, tile);
        }
        const size_t o = ((size_t)f * gridDim.y + blockIdx.y) * kp;
        for (unsigned t = tid; t < kp; t += blockDim.x) {
            a.fb_s[o + t] = st.run_s[t];
            a.fb_i[o + t] = st.run_i[t];
        }
        __syncthreads();  // the list is read before the next query resets it
    }
}

__device__ __forceinline__ void cosine_topk_finish_impl(const CosineTopkFinishArgs& a) {
    const unsigned nflag = a.flagged[0], n = a.n, kp = a.kp, TL = a.tile, ncand = a.gy * kp;
    const bool failed = a.err[0] != 0u;
    R2_DYN_SMEM(unsigned char, smem);
    __shared__ unsigned cnt[3 * R2_TOPK_MAXQ];
    const unsigned tid = threadIdx.x;
    const float nan = __int_as_float(0x7fc00000);
    R2Stream st;
    r2_stream_carve(st, smem, 1, kp, TL, cnt);
    for (unsigned f = blockIdx.x; f < nflag; f += gridDim.x) {
        const unsigned b = a.flagged[1 + f];
        const float* cs = a.fb_s + (size_t)f * ncand;
        const unsigned* ci = a.fb_i + (size_t)f * ncand;
        r2_stream_init(st);
        unsigned tile = 0;
        for (unsigned base = 0; base < ncand; base += TL, ++tile) {
            for (unsigned e = tid; e < TL; e += blockDim.x) {
                const unsigned c = base + e;
                r2_stream_offer(st, tile, 0, e, c < ncand ? cs[c] : -R2_INF, c < ncand ? ci[c] : R2_PAD_INDEX);
            }
            r2_stream_flush(st, tile);
        }
        for (unsigned i = tid; i < n; i += blockDim.x) {
            a.out_s[(size_t)b * n + i] = failed ? nan : st.run_s[i];
            a.out_i[(size_t)b * n + i] = st.run_i[i];
        }
        __syncthreads();
    }
    // A failed call: every score NaN (rows of flagged queries too; all writers write NaN).
    if (failed)
        for (size_t i = (size_t)blockIdx.x * blockDim.x + tid; i < (size_t)a.b * n; i += (size_t)gridDim.x * blockDim.x)
            a.out_s[i] = nan;
}

#define R2_RS_ENTRIES(SUFFIX, T)                                                                       \
    R2_ENTRY(cosine_topk_prep_##SUFFIX, CosineTopkPrepArgs, R2_RS_THREADS) { cosine_topk_prep<T>(a); } \
    R2_ENTRY(cosine_topk_rescore_##SUFFIX, CosineTopkRescoreArgs, R2_CT_THREADS) {                     \
        cosine_topk_rescore<T>(a);                                                                     \
    }                                                                                                  \
    R2_ENTRY(cosine_topk_fallback_##SUFFIX, CosineTopkFallbackArgs, R2_CT_THREADS) {                   \
        cosine_topk_fallback<T>(a);                                                                    \
    }

R2_RS_ENTRIES(f32, float)
R2_RS_ENTRIES(f16, __half)
R2_RS_ENTRIES(bf16, __nv_bfloat16)

R2_ENTRY(cosine_topk_finish, CosineTopkFinishArgs, R2_CT_THREADS) { cosine_topk_finish_impl(a); }
