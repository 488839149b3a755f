// cosine_topk_tc.cuh: the tensor-core path of cosine_topk for large batches (included by
// cosine_topk.cu). A GEMM on the tensor cores (WMMA) fused with a per-query threshold filter:
// the B x M score matrix never reaches global memory, and the answer is EXACT: candidates
// are rescored with the bandwidth kernel's f32 arithmetic.
//
// Op: src/retrieve/cosine_topk/ (plan and device path in tensor_core.rs, the dispatch rule in
// kernel.rs). Arguments: CosineTopkTcArgs; the unit queries before the pass and the exact
// rescoring after it are shared with the GEMM + select path (cosine_topk_rescore.cuh:
// cosine_topk_prep_<dt>, cosine_topk_rescore_<dt>, the fallback and finish kernels).
// The argument for exactness (why the margin is safe) is in docs/DESIGN.md.
//
// cosine_topk_tc_<dt>: grid (query tiles, bank chunks), R2_TC_THREADS threads. Block (x, y)
//   keeps query tile x and streams its chunk of the bank through shared memory in k-slices
//   of R2_TC_SLICE_BYTES per row (cp.async, two stages: the next slice loads while the
//   tensor cores multiply this one; query slices come from L2, where all of qhat fits). Each
//   warp owns a 32 x 32 quarter of the R2_TC_BQ x R2_TC_BK score tile (2 x 2 WMMA
//   accumulators). After a tile's last slice the accumulators go to a shared score tile,
//   and each warp scans the rows of its queries: approximate score
//   s~ = a / (|k| + COS_EPS / |q|) (a = qhat . k), which beats the query's running n-th best
//   -> a warp-parallel insertion into its threshold list (scores only); then every s~ at
//   or above max(list n-th, published threshold) - margin is appended to the query's
//   candidate list in global memory (one atomicAdd per query per tile). The list's n-th best
//   is published through an atomicMax on an order-preserving u32 key, so every block's
//   threshold rises with the best any block has seen.
// Errors (the no-sync contract of the bandwidth kernel, kernel.rs "NaN contract"): the pass
// shares the call's error word with the prep, rescoring and finish kernels (the prep checks
// `exclude`; the pass never matches an invalid entry). An approximate NaN score (the excluded
// row's too) reports R2_ERR_NAN_SCORE with (query, row). Nothing here reads the word.
#pragma once
#include "topk.cuh"

#ifdef __CUDACC__
#include <cuda_pipeline_primitives.h>
#include <mma.h>
#endif

#define R2_TC_WARPS (R2_TC_THREADS / 32)
#define R2_TC_STAGE_ROWS (R2_TC_BQ + R2_TC_BK)
#define R2_TC_STAGE_BYTES (R2_TC_STAGE_ROWS * R2_TC_ROW_BYTES)
#define R2_TC_FULL 0xffffffffu

// Operand type and k of one WMMA step per storage type.
template <class T>
struct CosineTcOperand;
template <>
struct CosineTcOperand<__nv_bfloat16> {
    using frag = __nv_bfloat16;
    static constexpr int k = 16;
};
template <>
struct CosineTcOperand<__half> {
    using frag = __half;
    static constexpr int k = 16;
};
template <>
struct CosineTcOperand<float> {
    using frag = nvcuda::wmma::precision::tf32;
    static constexpr int k = 8;
};

// tf32 operands are rounded to nearest (cvt.rna) after loading; 16-bit ones are exact.
template <class F>
__device__ __forceinline__ void cosine_topk_tc_round(F&, __nv_bfloat16*) {}
template <class F>
__device__ __forceinline__ void cosine_topk_tc_round(F&, __half*) {}
template <class F>
__device__ __forceinline__ void cosine_topk_tc_round(F& f, float*) {
#pragma unroll
    for (int e = 0; e < f.num_elements; ++e) f.x[e] = nvcuda::wmma::__float_to_tf32(f.x[e]);
}

// Order-preserving u32 key of a float (larger float, larger key); key 0 means "none".
__device__ __forceinline__ unsigned cosine_topk_tc_key(float f) {
    const unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float cosine_topk_tc_unkey(unsigned k) {
    if (k == 0u) return -R2_INF;
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Warp-parallel insertion of v (warp-uniform, above L[n-1]) into the descending list L of
// n scores (nl = n rounded up to 32). Called by all 32 lanes.
__device__ __forceinline__ void cosine_topk_tc_insert(float* L, unsigned n, unsigned nl, float v, unsigned lane) {
    float old[R2_TC_NL_MAX / 32];
    unsigned pos = 0;
#pragma unroll
    for (unsigned c = 0; c < R2_TC_NL_MAX / 32; ++c) {
        if (c * 32 < nl) {  // warp-uniform
            const unsigned i = c * 32 + lane;
            old[c] = L[i];
            pos += __popc(__ballot_sync(R2_TC_FULL, i < n && old[c] >= v));
        }
    }
    __syncwarp();  // every lane has read its entries before any is overwritten
#pragma unroll
    for (unsigned c = 0; c < R2_TC_NL_MAX / 32; ++c) {
        if (c * 32 < nl) {
            const unsigned i = c * 32 + lane;
            if (i >= pos && i + 1 < n) L[i + 1] = old[c];
            if (i == pos) L[i] = v;
        }
    }
    __syncwarp();
}

template <class T>
__device__ __forceinline__ void cosine_topk_tc_pass(const CosineTopkTcArgs& a) {
    using namespace nvcuda;
    using Frag = typename CosineTcOperand<T>::frag;
    constexpr int KS = CosineTcOperand<T>::k;
    constexpr unsigned LDM = R2_TC_ROW_BYTES / sizeof(T);       // stage row stride, elements
    constexpr unsigned SLICE = R2_TC_SLICE_BYTES / sizeof(T);   // k-slice, elements
    constexpr unsigned CHUNK = 16 / sizeof(T);                  // elements per 16-byte copy
    constexpr unsigned CHUNKS = R2_TC_SLICE_BYTES / 16;         // copies per stage row
    const T* __restrict__ qhat = static_cast<const T*>(a.qhat);
    const T* __restrict__ keys = static_cast<const T*>(a.keys);
    const float* __restrict__ kn = a.key_norms;
    const float* __restrict__ qeps = a.qeps;
    const unsigned* __restrict__ excl = a.exclude;
    const unsigned B = a.b, M = a.m, D = a.d, Dp = a.d_pad, n = a.n, nl = a.nl, capq = a.capq;
    const float margin = a.margin;

    // Dynamic shared memory, 128-byte aligned: two stages [R2_TC_STAGE_ROWS][R2_TC_ROW_BYTES]
    // (query rows, then bank rows), the score tile [R2_TC_BQ][R2_TC_SCORE_LD] f32, then the
    // threshold lists [R2_TC_BQ][nl] (src/retrieve/cosine_topk/tensor_core.rs `pass_smem`).
    R2_DYN_SMEM(unsigned char, smem_raw);
    unsigned char* smem = smem_raw + ((128u - (unsigned)(reinterpret_cast<size_t>(smem_raw) & 127u)) & 127u);
    float* score = reinterpret_cast<float*>(smem + 2 * R2_TC_STAGE_BYTES);
    float* lists = score + R2_TC_BQ * R2_TC_SCORE_LD;

    const unsigned tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const unsigned q0 = blockIdx.x * R2_TC_BQ;
    const unsigned row0 = blockIdx.y * a.chunk_rows;
    const unsigned row1 = min(M, row0 + a.chunk_rows);
    const unsigned slices = Dp / SLICE;
    const unsigned steps = (row1 - row0 + R2_TC_BK - 1) / R2_TC_BK * slices;

    for (unsigned t = tid; t < R2_TC_BQ * nl; t += blockDim.x) lists[t] = -R2_INF;

    // Step s = (tile s / slices, k-slice s % slices) into stage s & 1: 16-byte cp.async
    // copies; bank rows past the chunk and columns past D are zero-filled (the query side is
    // zero there, and stale stage bytes could be NaN).
    auto issue = [&](unsigned s) {
        const unsigned tile = s / slices, col0 = (s % slices) * SLICE;
        unsigned char* st = smem + (s & 1u) * R2_TC_STAGE_BYTES;
        for (unsigned i = tid; i < R2_TC_STAGE_ROWS * CHUNKS; i += R2_TC_THREADS) {
            const unsigned row = i / CHUNKS, col = col0 + (i % CHUNKS) * CHUNK;
            unsigned char* dst = st + row * R2_TC_ROW_BYTES + (i % CHUNKS) * 16;
            const T* src = nullptr;
            if (row < R2_TC_BQ) {
                src = qhat + (size_t)(q0 + row) * Dp + col;
            } else {
                const unsigned r = row0 + tile * R2_TC_BK + (row - R2_TC_BQ);
                if (r < row1 && col < D) src = keys + (size_t)r * D + col;
            }
            if (src) {
                __pipeline_memcpy_async(dst, src, 16);
            } else {
                unsigned* z = reinterpret_cast<unsigned*>(dst);
                z[0] = z[1] = z[2] = z[3] = 0u;
            }
        }
        __pipeline_commit();
    };

    const unsigned wr = warp >> 1, wc = warp & 1u;  // this warp's 32 x 32 quarter
    wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    issue(0);
    for (unsigned s = 0; s < steps; ++s) {
        __pipeline_wait_prior(0);
        // Stage s & 1 is complete for every thread, and stage (s + 1) & 1 was last read in
        // step s - 1, before this barrier: the next copies may start.
        __syncthreads();
        if (s + 1 < steps) issue(s + 1);
        const T* sq = reinterpret_cast<const T*>(smem + (s & 1u) * R2_TC_STAGE_BYTES);
        const T* sk = sq + R2_TC_BQ * LDM;
#pragma unroll
        for (unsigned kk = 0; kk < SLICE; kk += KS) {
            wmma::fragment<wmma::matrix_a, 16, 16, KS, Frag, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, KS, Frag, wmma::col_major> fb[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                wmma::load_matrix_sync(fa[i], sq + (wr * 32 + i * 16) * LDM + kk, LDM);
                cosine_topk_tc_round(fa[i], static_cast<T*>(nullptr));
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                wmma::load_matrix_sync(fb[j], sk + (wc * 32 + j * 16) * LDM + kk, LDM);
                cosine_topk_tc_round(fb[j], static_cast<T*>(nullptr));
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        if ((s + 1) % slices != 0) continue;

        // ---- Epilogue of tile s / slices: filter the R2_TC_BQ x R2_TC_BK scores. ----
        // The previous epilogue's reads of `score` precede this step's first barrier.
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                wmma::store_matrix_sync(score + (wr * 32 + i * 16) * R2_TC_SCORE_LD + wc * 32 + j * 16, acc[i][j],
                                        R2_TC_SCORE_LD, wmma::mem_row_major);
                wmma::fill_fragment(acc[i][j], 0.0f);
            }
        __syncthreads();
        const unsigned base = row0 + (s / slices) * R2_TC_BK;
        const unsigned ra = base + lane, rb = base + 32 + lane;  // this lane's two rows
        const bool la = ra < row1, lb = rb < row1;
        const float kna = la ? kn[ra] : 0.f, knb = lb ? kn[rb] : 0.f;
        for (unsigned j = warp; j < R2_TC_BQ; j += R2_TC_WARPS) {
            const unsigned qg = q0 + j;
            if (qg >= B) break;  // warp-uniform
            const float eq = qeps[qg];
            const unsigned ex = excl != nullptr ? excl[qg] : R2_PAD_INDEX;
            const float sa = score[j * R2_TC_SCORE_LD + lane] * __frcp_rn(kna + eq);
            const float sb = score[j * R2_TC_SCORE_LD + 32 + lane] * __frcp_rn(knb + eq);
            if (la && isnan(sa)) r2_report(a.err, R2_ERR_NAN_SCORE, qg, ra);
            if (lb && isnan(sb)) r2_report(a.err, R2_ERR_NAN_SCORE, qg, rb);
            const bool va = la && !isnan(sa) && ra != ex;
            const bool vb = lb && !isnan(sb) && rb != ex;
            float* L = lists + j * nl;
            // Scores beating the list's n-th entry enter the list, lower rows first.
            const float worst = L[n - 1];
            unsigned ha = __ballot_sync(R2_TC_FULL, va && sa > worst);
            unsigned hb = __ballot_sync(R2_TC_FULL, vb && sb > worst);
            while (ha) {
                const int src = __ffs(ha) - 1;
                ha &= ha - 1;
                const float v = __shfl_sync(R2_TC_FULL, sa, src);
                if (v > L[n - 1]) cosine_topk_tc_insert(L, n, nl, v, lane);
            }
            while (hb) {
                const int src = __ffs(hb) - 1;
                hb &= hb - 1;
                const float v = __shfl_sync(R2_TC_FULL, sb, src);
                if (v > L[n - 1]) cosine_topk_tc_insert(L, n, nl, v, lane);
            }
            // Candidates: at or above the best known lower bound of the n-th best, less margin.
            const float local = L[n - 1];
            const float published = cosine_topk_tc_unkey(*reinterpret_cast<volatile const unsigned*>(a.theta + qg));
            const float th = fmaxf(local, published) - margin;
            const bool ea = va && sa >= th, eb = vb && sb >= th;
            const unsigned ma = __ballot_sync(R2_TC_FULL, ea);
            const unsigned mb = __ballot_sync(R2_TC_FULL, eb);
            const unsigned k = __popc(ma) + __popc(mb);
            if (k) {
                unsigned first = 0;
                if (lane == 0) first = atomicAdd(a.count + qg, k);
                first = __shfl_sync(R2_TC_FULL, first, 0);
                const unsigned below = (1u << lane) - 1u;
                const size_t o = (size_t)qg * capq;
                if (ea) {
                    const unsigned slot = first + __popc(ma & below);
                    if (slot < capq) {
                        a.cand_s[o + slot] = sa;
                        a.cand_i[o + slot] = ra;
                    }
                }
                if (eb) {
                    const unsigned slot = first + __popc(ma) + __popc(mb & below);
                    if (slot < capq) {
                        a.cand_s[o + slot] = sb;
                        a.cand_i[o + slot] = rb;
                    }
                }
            }
            if (lane == 0 && local > published) atomicMax(a.theta + qg, cosine_topk_tc_key(local));
        }
    }
}

#define R2_TC_ENTRIES(SUFFIX, T) \
    R2_ENTRY(cosine_topk_tc_##SUFFIX, CosineTopkTcArgs, R2_TC_THREADS) { cosine_topk_tc_pass<T>(a); }

R2_TC_ENTRIES(f32, float)
R2_TC_ENTRIES(f16, __half)
R2_TC_ENTRIES(bf16, __nv_bfloat16)
