// cosine_topk_gemm_select.cuh: the select half of cosine_topk's GEMM + select path (included
// by cosine_topk.cu). cuBLAS (cublasGemmEx; the emulator: candle's CPU matmul) writes one
// chunk's approximate dot products S[b][r] = qhat_b . k_(r0 + r) ([B, ld] f32, L2-sized, in a
// reused workspace); this kernel reads them once, in the same order the GEMM wrote them, and
// keeps what the exact rescoring (cosine_topk_rescore.cuh) needs. The B x M scores never exist.
//
// Op: src/retrieve/cosine_topk/ (plan and device path in gemm_select.rs). Arguments:
// CosineTopkGemmSelectArgs.
//
// cosine_topk_gemm_select: grid (ceil(B / R2_GS_WARPS) x splits), R2_GS_THREADS threads; warp w
//   of block (g, s) is the unit (query b = g * R2_GS_WARPS + w, split s): it owns columns
//   [s * span, (s + 1) * span) of every chunk (the warps of a block share their columns, so the
//   key norms they read come from L1). Per unit a running list of the n best approximate
//   scores with their rows lives in shared memory during a launch and in `list_*` between the
//   chunks' launches (empty at the first chunk).
//   Approximate score: s~ = S * rcp(|k| + COS_EPS / |q|), the tensor-core pass's algebra. The
//   hot loop compares S >= thp * (|k| + COS_EPS / |q|) (no division; a NaN or an infinite norm
//   passes), four columns
//   per lane from 16-byte loads, one ballot per 128 columns; thp = th - |th| 2^-20 lies below
//   the candidate threshold th = max(list n-th, published n-th) - margin by more than the f32
//   rounding of either comparison (docs/DESIGN.md, "GEMM + select path"), so the prefilter
//   drops only rows whose s~ < th. Rows that pass go through the slow path one at a time: s~
//   exactly, NaN reported (R2_ERR_NAN_SCORE, query, row; the excluded row's too), the excluded
//   row skipped; a score above the list's n-th enters the list (a warp-parallel insertion) and
//   the entry it pushes out is appended to the query's candidates if it is still within the
//   margin of the raised threshold; any other score >= th is appended. At the last chunk the
//   list entries >= max(list n-th, published) - margin are appended. Each unit publishes its
//   n-th at the end of a launch (atomicMax on an order-preserving key, theta), and reads the
//   best published one at the start of a launch and before the last flush: every row within
//   the margin of the final n-th best approximate score ends in the candidates (the argument
//   is in docs/DESIGN.md); the candidates of a query may exceed capq (counted, not stored: the
//   rescoring then flags the query for the exact fallback).
#pragma once
#include "topk.cuh"

#define R2_GS_WARPS (R2_GS_THREADS / 32)
#define R2_GS_FULL 0xffffffffu

// Order-preserving u32 key of a float (larger float, larger key); key 0 means "none".
__device__ __forceinline__ unsigned cosine_topk_gs_key(float f) {
    const unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float cosine_topk_gs_unkey(unsigned k) {
    if (k == 0u) return -R2_INF;
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The prefilter's threshold: below th by |th| 2^-20, or -inf.
__device__ __forceinline__ float cosine_topk_gs_prefilter(float th) {
    return th > -R2_INF ? th - fabsf(th) * 0x1p-20f : -R2_INF;
}

// The approximate score S / d (d = |k| + COS_EPS / |q| > 0) by the fast division (at most
// 2 ulp off in the normal range, no subroutine; the error bound's slack covers it), a huge d
// scaled down first so that the fast division does not return 0; an infinite or NaN d gives
// NaN for a non-finite S, 0 for a finite one (the exact score's behaviour).
__device__ __forceinline__ float cosine_topk_gs_score(float S, float d) {
    const float sc = d >= 0x1p126f ? 0x1p-64f : 1.f;
    return __fdividef(S * sc, d * sc);
}

// Warp-parallel insertion of (v, r) (warp-uniform) into the list (L, R) of n entries, scores
// descending, nl = n rounded up to 32; the entry at n - 1 falls out. Called by all 32 lanes.
__device__ __forceinline__ void cosine_topk_gs_insert(float* L, unsigned* R, unsigned n, unsigned nl, float v,
                                                      unsigned r, unsigned lane) {
    float os[R2_GS_NL_MAX / 32];
    unsigned orow[R2_GS_NL_MAX / 32];
    unsigned pos = 0;
#pragma unroll
    for (unsigned c = 0; c < R2_GS_NL_MAX / 32; ++c) {
        if (c * 32 < nl) {  // warp-uniform
            const unsigned i = c * 32 + lane;
            os[c] = L[i];
            orow[c] = R[i];
            pos += __popc(__ballot_sync(R2_GS_FULL, i < n && os[c] >= v));
        }
    }
    __syncwarp();  // every lane has read its entries before any is overwritten
#pragma unroll
    for (unsigned c = 0; c < R2_GS_NL_MAX / 32; ++c) {
        if (c * 32 < nl) {
            const unsigned i = c * 32 + lane;
            if (i >= pos && i + 1 < n) {
                L[i + 1] = os[c];
                R[i + 1] = orow[c];
            }
            if (i == pos) {
                L[i] = v;
                R[i] = r;
            }
        }
    }
    __syncwarp();
}

// Appends (v, r) (warp-uniform) to query b's candidates; one lane writes.
__device__ __forceinline__ void cosine_topk_gs_append(const CosineTopkGemmSelectArgs& a, unsigned b, float v,
                                                      unsigned r, unsigned lane) {
    if (lane == 0) {
        const unsigned slot = atomicAdd(a.count + b, 1u);
        if (slot < a.capq) {
            a.cand_s[(size_t)b * a.capq + slot] = v;
            a.cand_i[(size_t)b * a.capq + slot] = r;
        }
    }
}

__device__ __forceinline__ void cosine_topk_gemm_select_impl(const CosineTopkGemmSelectArgs& a) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned B = a.b, n = a.n, nl = a.nl;
    const unsigned groups = (B + R2_GS_WARPS - 1) / R2_GS_WARPS;
    const unsigned g = blockIdx.x % groups, s = blockIdx.x / groups;
    const unsigned b = g * R2_GS_WARPS + warp;
    if (b >= B) return;  // warp-uniform; the kernel has no block barrier
    R2_DYN_SMEM(unsigned char, smem);
    float* L = reinterpret_cast<float*>(smem) + warp * 2 * nl;
    unsigned* R = reinterpret_cast<unsigned*>(L + nl);
    const size_t unit = ((size_t)b * a.splits + s) * nl;
    for (unsigned i = lane; i < nl; i += 32) {
        L[i] = a.first ? -R2_INF : a.list_s[unit + i];
        R[i] = a.first ? R2_PAD_INDEX : a.list_i[unit + i];
    }
    __syncwarp();

    const float margin = a.margin, qe = a.qeps[b];
    const unsigned ex = a.exclude != nullptr ? a.exclude[b] : R2_PAD_INDEX;
    float pub = cosine_topk_gs_unkey(*reinterpret_cast<volatile const unsigned*>(a.theta + b));
    float th = fmaxf(L[n - 1], pub) - margin;
    float thp = cosine_topk_gs_prefilter(th);

    const float* __restrict__ S = a.scores + (size_t)b * a.ld;
    const float* __restrict__ K = a.key_norms + a.r0;
    const unsigned c0 = s * a.span, c1 = min(a.rows, c0 + a.span);

    // One row through the slow path (v = s~, r its bank row; warp-uniform).
    auto offer = [&](float v, unsigned r) {
        if (isnan(v)) {
            if (lane == 0) r2_report(a.err, R2_ERR_NAN_SCORE, b, r);
            return;
        }
        if (r == ex) return;
        const float worst = L[n - 1];
        if (v > worst) {
            const unsigned out_r = R[n - 1];
            cosine_topk_gs_insert(L, R, n, nl, v, r, lane);
            th = fmaxf(L[n - 1], pub) - margin;
            thp = cosine_topk_gs_prefilter(th);
            if (out_r != R2_PAD_INDEX && worst >= th) cosine_topk_gs_append(a, b, worst, out_r, lane);
        } else if (v >= th) {
            cosine_topk_gs_append(a, b, v, r, lane);
        }
    };

    // Steps of 128 columns (4 per lane): `full` of them with every column inside the unit's
    // range, then at most one ragged step, whose missing columns load as zero and are masked
    // out (`tail`), so the full steps carry no per-column guard.
    const unsigned width = c1 > c0 ? c1 - c0 : 0;
    const unsigned full = width / 128, steps = (width + 127) / 128;
    const unsigned cl = c0 + full * 128 + 4 * lane;  // this lane's first column of the ragged step
    const unsigned tail = (1u << min(4u, c1 > cl ? c1 - cl : 0u)) - 1u;
    // This lane's next columns (running pointers: no 64-bit index arithmetic per step; both
    // rows are 16-byte aligned, the host sees to the norms').
    const float* __restrict__ ns = S + c0 + 4 * lane;
    const float* __restrict__ nk = K + c0 + 4 * lane;
    auto load = [&](unsigned t, float* sv, float* kv) {
        if (t < full) {
            r2_unpack16<float>(r2_load16(ns), sv);
            r2_unpack16<float>(r2_load16(nk), kv);
        } else {
#pragma unroll
            for (unsigned e = 0; e < 4; ++e) {
                sv[e] = (tail >> e) & 1u ? ns[e] : 0.f;
                kv[e] = (tail >> e) & 1u ? nk[e] : 0.f;
            }
        }
        ns += 128;
        nk += 128;
    };
    // The next step's loads are issued before this step is compared: two steps in flight.
    float nsv[4], nkv[4];
    if (steps > 0) load(0, nsv, nkv);
    for (unsigned t = 0; t < steps; ++t) {  // warp-uniform trip count
        float sv[4], kv[4];
#pragma unroll
        for (unsigned e = 0; e < 4; ++e) {
            sv[e] = nsv[e];
            kv[e] = nkv[e];
        }
        if (t + 1 < steps) load(t + 1, nsv, nkv);
        // Bit e: column e of the step passes the prefilter. A NaN passes, and so does an
        // infinite norm (s~ may then be NaN: inf / inf).
        unsigned pend = 0;
#pragma unroll
        for (unsigned e = 0; e < 4; ++e)
            pend |= (unsigned)(!(sv[e] < thp * (kv[e] + qe)) || !(kv[e] < R2_INF)) << e;
        pend &= t < full ? 15u : tail;
        unsigned lanes = __ballot_sync(R2_GS_FULL, pend != 0);
        if (lanes == 0) continue;
        // The rare rows that pass: s~ for the lane's four columns, then one row at a time,
        // lowest lane first (one call site of the slow path: inlined, no spills).
        const unsigned c = c0 + t * 128 + 4 * lane;
        float rv[4];
#pragma unroll
        for (unsigned e = 0; e < 4; ++e) rv[e] = cosine_topk_gs_score(sv[e], kv[e] + qe);
        for (; lanes != 0; lanes = __ballot_sync(R2_GS_FULL, pend != 0)) {
            const int src = __ffs(lanes) - 1;
            const unsigned e = __ffs(pend) - 1;  // meaningful on lane src
            const float ve = e == 0 ? rv[0] : e == 1 ? rv[1] : e == 2 ? rv[2] : rv[3];
            const float v = __shfl_sync(R2_GS_FULL, ve, src);
            const unsigned col = __shfl_sync(R2_GS_FULL, c + e, src);
            if (lane == (unsigned)src) pend &= pend - 1;
            offer(v, a.r0 + col);
        }
    }

    if (!a.last) {
        for (unsigned i = lane; i < nl; i += 32) {
            a.list_s[unit + i] = L[i];
            a.list_i[unit + i] = R[i];
        }
        const float mine = L[n - 1];
        if (lane == 0 && mine > pub) atomicMax(a.theta + b, cosine_topk_gs_key(mine));
        return;
    }
    // Last chunk: the list's entries still within the margin of the best known n-th.
    pub = fmaxf(pub, cosine_topk_gs_unkey(*reinterpret_cast<volatile const unsigned*>(a.theta + b)));
    th = fmaxf(L[n - 1], pub) - margin;
    const unsigned below = (1u << lane) - 1u;
    for (unsigned base = 0; base < n; base += 32) {
        const unsigned i = base + lane;
        const bool e = i < n && R[i] != R2_PAD_INDEX && L[i] >= th;
        const unsigned m = __ballot_sync(R2_GS_FULL, e);
        if (!m) continue;
        unsigned first = 0;
        if (lane == 0) first = atomicAdd(a.count + b, (unsigned)__popc(m));
        first = __shfl_sync(R2_GS_FULL, first, 0);
        const unsigned slot = first + __popc(m & below);
        if (e && slot < a.capq) {
            a.cand_s[(size_t)b * a.capq + slot] = L[i];
            a.cand_i[(size_t)b * a.capq + slot] = R[i];
        }
    }
}

R2_ENTRY(cosine_topk_gemm_select, CosineTopkGemmSelectArgs, R2_GS_THREADS) { cosine_topk_gemm_select_impl(a); }
