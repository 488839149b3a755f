// cosine_topk_tc.cuh: the tensor-core path of cosine_topk for large batches (included by
// cosine_topk.cu). A GEMM on the tensor cores (ldmatrix + mma.sync in inline PTX, mma.cuh)
// fused with a per-query threshold filter: the B x M score matrix never reaches global
// memory, and the answer is EXACT: candidates are rescored with the bandwidth kernel's f32
// arithmetic.
//
// Op: src/retrieve/cosine_topk/ (plan and device path in tensor_core.rs, the dispatch rule in
// kernel.rs). Arguments: CosineTopkTcArgs; the unit queries before the pass and the exact
// rescoring after it are shared with the GEMM + select path (cosine_topk_rescore.cuh:
// cosine_topk_prep_<dt>, cosine_topk_rescore_<dt>, the fallback and finish kernels).
// The argument for exactness (why the margin is safe) is in docs/DESIGN.md.
//
// cosine_topk_tc_<dt>: grid (query tiles, bank chunks), R2_TC_THREADS threads (8 warps). Block
//   (x, y) keeps query tile x (R2_TC_BQ queries) and streams its chunk of the bank in tiles of
//   R2_TC_BK rows and k-slices of R2_TC_SLICE_BYTES per row through R2_TC_STAGES shared-memory
//   stages (16-byte cp.async, two slices in flight while one is multiplied; query slices come
//   from L2, where all of qhat fits). Rows are 64 bytes with the 16-byte chunks XOR-swizzled
//   by row (chunk ^ (row >> 1) % 4), so the 8 rows of every ldmatrix phase hit distinct banks.
//   Warp w owns queries (w / 2) * 32 .. + 32 and keys (w % 2) * 64 .. + 64 of the 128 x 128
//   score tile: 2 x 8 m16n8 accumulators (64 f32 registers), fed per 32-byte k-step by 2 + 4
//   ldmatrix.x4 and 16 mma.sync (m16n8k16 bf16/f16, m16n8k8 tf32; f32 stages are rounded to
//   tf32 with cvt.rna by the threads that copied them). Warps whose 32 queries are all past B
//   skip the matrix work.
//   Filter, per tile, from the accumulators in registers: approximate score
//   s~ = a / (|k| + COS_EPS / |q|) (a = qhat . k, s~ = a * rcp_rn(|k| + eps/|q|)), kept when
//   s~ >= T_q = max(local_q, published_q) - margin. local_q is the n-th best of the query's
//   threshold list in shared memory (the n best approximate scores of rows this block offered
//   it); published_q the best n-th any block has published (atomicMax on an order-preserving
//   u32 key, read once per tile per query by one thread, ld.relaxed, a tile ahead of its use).
//   The per-score test is one FFMA and one FSETP against per-query constants in shared memory
//   (cosine_topk_tc_threshold: a conservative form of s~ >= T_q, no division); a thread with any
//   pass (or NaN, or an infinite key norm among its 16 keys) takes the exact test for its 64
//   scores, appends the rows that pass to the
//   query's candidate list in global memory and offers those above local_q to the list (a
//   per-query buffer of R2_TC_HITS, merged by one warp per query after a block vote).
//   Seed: after the chunk's first tile each of the 8 threads holding a query's 128 scores puts
//   its best ceil(n / 8) into the list, which is then sorted: local_q starts at the n-th best
//   of those (a lower bound of the tile's n-th best) instead of every row of the first tile
//   being inserted one by one.
// Errors (the no-sync contract of the bandwidth kernel, kernel.rs "NaN contract"): the pass
// shares the call's error word with the prep, rescoring and finish kernels (the prep checks
// `exclude`; the pass never matches an invalid entry). An approximate NaN score (the excluded
// row's too) reports R2_ERR_NAN_SCORE with (query, row). Nothing here reads the word.
#pragma once
#include "mma.cuh"
#include "topk.cuh"

#define R2_TC_WARPS (R2_TC_THREADS / 32)
// Bytes of one stage: (R2_TC_BQ + R2_TC_BK) swizzled rows of one k-slice, then the tile's
// R2_TC_BK key norms (f32; copied with the tile's last slice).
#define R2_TC_OPERAND_BYTES ((R2_TC_BQ + R2_TC_BK) * R2_TC_SLICE_BYTES)
#define R2_TC_STAGE_BYTES (R2_TC_OPERAND_BYTES + R2_TC_BK * 4)
#define R2_TC_FULL 0xffffffffu

// Byte offset of 16-byte chunk `chunk` (0..3) of stage row `row`: rows of R2_TC_SLICE_BYTES,
// chunks XOR-swizzled by bits 1-2 of the row. An ldmatrix phase reads one chunk of 8
// consecutive rows: two rows per 128-byte line, the four line pairs at four different chunk
// positions, so 32 distinct banks.
__device__ __forceinline__ unsigned cosine_topk_tc_swizzle(unsigned row, unsigned chunk) {
    return row * R2_TC_SLICE_BYTES + ((chunk ^ ((row >> 1) & 3u)) << 4);
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
// n scores (nl >= n, a multiple of 32). Called by all 32 lanes.
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

// Sorts the nq lists [nq][nl] (nl a power of two) descending: bitonic, one barrier per stage.
// Called by every thread of the block; ends with a barrier.
__device__ __forceinline__ void cosine_topk_tc_sort_lists(float* L, unsigned nl, unsigned nq) {
    const unsigned half = nl / 2;
    for (unsigned k = 2; k <= nl; k <<= 1) {
        for (unsigned j = k >> 1; j > 0; j >>= 1) {
            for (unsigned u = threadIdx.x; u < half * nq; u += blockDim.x) {
                const unsigned q = u / half, p = u % half;
                const unsigned i = 2 * j * (p / j) + (p % j);
                float* l = L + q * nl;
                const float x = l[i], y = l[i + j];
                if ((i & k) == 0 ? y > x : x > y) {
                    l[i] = y;
                    l[i + j] = x;
                }
            }
            __syncthreads();
        }
    }
}

// The constants of one query's filter for threshold t = T_q: the exact test is
// s~ = a * rcp_rn(den) >= t with den = fl(|k| + eps/|q|) > 0; the fast test passes when
// NOT (a < fma(tk, |k|, te)) (a NaN passes too), with tk = t (1 - sign(t) 2^-16) and
// te = fl(tk eps/|q|) (1 - 2^-16) - 2^-100 (slack only where finite). Why every a with s~ >= t
// passes: s~ >= t gives a >= t den (1 + h) with |h| <= 3.1 u (u = 2^-24: den's, the reciprocal's
// and the product's rounding), and fma(tk, |k|, te) <= t den (1 - 2^-16 + 3u), below that
// bound (t < 0: the same with the signs turned). A NaN |k| or eps/|q| makes the right side
// NaN, which passes; an infinite |k| does not always (a -inf dot product, whose score
// -inf / inf is NaN, fails it), so the pass sends a thread with one to the exact test.
// Underflow: t = fl(theta - margin) is 0 or at least 2^-37 in magnitude (margin
// >= 2^-11), so the relative slack covers the absolute error of a subnormal s~, and 2^-100
// that of te.
__device__ __forceinline__ void cosine_topk_tc_threshold(float theta, float margin, float eq, float* tq,
                                                         float* tk, float* te) {
    const float t = theta - margin;
    const float k = isinf(t) ? t : t - fabsf(t) * 0x1p-16f;
    float e = k * eq;
    if (!isinf(e) && !isnan(e)) e = e - fabsf(e) * 0x1p-16f - 0x1p-100f;
    *tq = t;
    *tk = k;
    *te = e;
}

template <class T>
__device__ __forceinline__ void cosine_topk_tc_pass(const CosineTopkTcArgs& a) {
    constexpr unsigned NT = R2_TC_THREADS, NW = R2_TC_WARPS, BQ = R2_TC_BQ, BK = R2_TC_BK;
    constexpr unsigned NS = R2_TC_STAGES, HQ = R2_TC_HITS, SB = R2_TC_SLICE_BYTES;
    constexpr unsigned CH = 16 / sizeof(T);   // elements per 16-byte chunk
    constexpr unsigned SL = SB / sizeof(T);   // elements per k-slice (two 32-byte k-steps)
    constexpr unsigned OPB = R2_TC_OPERAND_BYTES, STAGE = R2_TC_STAGE_BYTES;
    static_assert(NT == 256 && BQ == 128 && BK == 128 && SB == 64, "the warp layout below");
    const T* __restrict__ keys = static_cast<const T*>(a.keys);
    const float* __restrict__ kn = a.key_norms;
    const float* __restrict__ qeps = a.qeps;
    const unsigned* __restrict__ excl = a.exclude;
    const unsigned B = a.b, M = a.m, D = a.d, Dp = a.d_pad, n = a.n, nl = a.nl, capq = a.capq;
    const float margin = a.margin;

    // Dynamic shared memory, 128-byte aligned: NS stages, the threshold lists [BQ][nl], the
    // filter constants tq, tk, te [BQ] each, the hit buffers [BQ][HQ], their counts [BQ] and
    // eps / |q| [BQ] (src/retrieve/cosine_topk/tensor_core.rs `pass_smem`).
    R2_DYN_SMEM(unsigned char, smem_raw);
    const unsigned pad = (128u - (r2_smem_addr(smem_raw) & 127u)) & 127u;
    unsigned char* smem = smem_raw + pad;
    const unsigned sbase = r2_smem_addr(smem_raw) + pad;  // the same address as .shared
    float* lists = reinterpret_cast<float*>(smem + NS * STAGE);
    float* th_t = lists + BQ * nl;
    float* th_k = th_t + BQ;
    float* th_e = th_k + BQ;
    float* hit_s = th_e + BQ;
    unsigned* hit_n = reinterpret_cast<unsigned*>(hit_s + BQ * HQ);

    const unsigned tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const unsigned wr = warp >> 1, wc = warp & 1u;  // queries wr * 32 .., keys wc * 64 ..
    const unsigned g = lane >> 2, t4 = lane & 3u;   // the mma fragments' groupID, thread in group
    const unsigned q0 = blockIdx.x * BQ, nq = min(BQ, B - q0);
    const bool wactive = wr * 32 < nq;              // warp-uniform
    const unsigned row0 = blockIdx.y * a.chunk_rows, row1 = min(M, row0 + a.chunk_rows);
    const unsigned slices = Dp / SL, tiles = (row1 - row0 + BK - 1) / BK, steps = tiles * slices;

    for (unsigned i = tid; i < BQ * nl; i += NT) lists[i] = -R2_INF;
    // Thread tid < BQ owns query tid's filter constants, hit count, published threshold (the
    // key last read, in a register: its load is in flight during a whole tile) and eps / |q|
    // (th_eq). Queries past B never pass (slope 0, offset +inf).
    float* th_eq = reinterpret_cast<float*>(hit_n + BQ);
    unsigned pub = 0u;
    if (tid < BQ) {
        hit_n[tid] = 0u;
        if (tid < nq) {
            pub = r2_load_relaxed(a.theta + q0 + tid);
            th_eq[tid] = qeps[q0 + tid];
        } else {
            th_t[tid] = R2_INF;
            th_k[tid] = 0.f;
            th_e[tid] = R2_INF;
        }
    }
    // The thresholds for the next tile's filter from the lists (after a barrier), publishing
    // a raised local n-th; then the next published value is read, a tile ahead of its use.
    auto thresholds = [&]() {
        if (tid < nq) {
            const float local = lists[tid * nl + n - 1];
            const float published = cosine_topk_tc_unkey(pub);
            if (local > published) atomicMax(a.theta + q0 + tid, cosine_topk_tc_key(local));
            cosine_topk_tc_threshold(fmaxf(local, published), margin, th_eq[tid], th_t + tid, th_k + tid,
                                     th_e + tid);
            pub = r2_load_relaxed(a.theta + q0 + tid);
        }
    };

    // Copies: thread tid moves 16-byte chunk tid % 4 of stage rows tid / 4 + 64 c, c = 0..3,
    // so that each cp.async instruction of a warp fills 8 whole 64-byte row slices (rows
    // below BQ are query rows of qhat, which has whole tiles of rows and d_pad columns; bank
    // rows past the chunk and columns past D are zero-filled). Rows 64 apart share the
    // swizzle: chunk c lands at cdst + c * 4 KiB.
    const unsigned crow = tid >> 2, cch = tid & 3u;
    const unsigned cdst = cosine_topk_tc_swizzle(crow, cch);
    auto issue = [&](unsigned tile, unsigned sl, unsigned stage) {
        const unsigned st = sbase + stage * STAGE + cdst;
        const unsigned col = sl * SL + cch * CH;
        const T* q = static_cast<const T*>(a.qhat) + (size_t)(q0 + crow) * Dp + col;
        r2_cp_async16(st, q, 16);
        r2_cp_async16(st + 64 * SB, q + (size_t)64 * Dp, 16);
        const unsigned r = row0 + tile * BK + crow;
        const T* k = keys + (size_t)r * D + col;
        r2_cp_async16(st + 128 * SB, k, r < row1 && col < D ? 16 : 0);
        r2_cp_async16(st + 192 * SB, k + (size_t)64 * D, r + 64 < row1 && col < D ? 16 : 0);
        if (sl + 1 == slices && tid < BK) {
            // The tile's key norms travel with its last slice.
            const unsigned rr = row0 + tile * BK + tid;
            r2_cp_async4(sbase + stage * STAGE + OPB + 4 * tid, kn + rr, rr < row1 ? 4 : 0);
        }
        __pipeline_commit();
    };

    // ldmatrix row addresses of this lane in stage 0, k-step 0: A (queries) matrices (rows
    // 0-7, 8-15) x (bytes 0-15, 16-31), B (keys) n-tiles (0-7, 8-15) x (bytes 0-15, 16-31).
    // The m-tile and the n-tile pair (16 rows) add 1 KiB, a stage STAGE bytes (a multiple of
    // 128), and k-step 1 (chunks + 2) flips address bit 5: none of them moves the swizzle.
    const unsigned arow = wr * 32 + ((lane >> 3) & 1u) * 8 + (lane & 7u);
    const unsigned brow = BQ + wc * 64 + (lane >> 4) * 8 + (lane & 7u);
    const unsigned abase = sbase + cosine_topk_tc_swizzle(arow, lane >> 4);
    const unsigned bbase = sbase + cosine_topk_tc_swizzle(brow, (lane >> 3) & 1u);


    unsigned it = 0, is = 0;  // (tile, slice) of the next step to issue
    auto advance = [&]() {
        if (++is == slices) {
            is = 0;
            ++it;
        }
    };
#pragma unroll
    for (unsigned s = 0; s < NS - 1; ++s) {
        if (s < steps) {
            issue(it, is, s);
            advance();
        } else {
            __pipeline_commit();  // empty group: the waits count groups
        }
    }

    float acc[2][8][4];
    unsigned stage = 0, done = 0;  // stage of the next step, steps consumed
    for (unsigned tile = 0; tile < tiles; ++tile) {
#pragma unroll
        for (unsigned i = 0; i < 2; ++i)
#pragma unroll
            for (unsigned j = 0; j < 8; ++j)
#pragma unroll
                for (unsigned e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
        unsigned cur = stage;
        // ---- Main loop: one k-slice per step.
        for (unsigned sl = 0; sl < slices; ++sl, ++done) {
            __pipeline_wait_prior(NS - 2);  // this thread's copies of this step have landed
            if constexpr (sizeof(T) == 4) {
                // tf32 operands: cvt.rna of the chunks this thread copied (queries too: qhat is f32).
#pragma unroll
                for (unsigned c = 0; c < 4; ++c) {
                    unsigned char* p = smem + stage * STAGE + cdst + c * 64 * SB;
                    uint4 v = r2_load16(p);
                    v.x = r2_tf32_rna(__uint_as_float(v.x));
                    v.y = r2_tf32_rna(__uint_as_float(v.y));
                    v.z = r2_tf32_rna(__uint_as_float(v.z));
                    v.w = r2_tf32_rna(__uint_as_float(v.w));
                    r2_store16(p, v);
                }
            }
            // Every thread's copies of this step are in; every warp is done with the previous
            // step, whose stage the next issue overwrites.
            __syncthreads();
            if (done + NS - 1 < steps) {
                issue(it, is, stage == 0 ? NS - 1 : stage - 1);
                advance();
            } else {
                __pipeline_commit();
            }
            if (wactive) {
#pragma unroll
                for (unsigned ks = 0; ks < 2; ++ks) {
                    const unsigned ao = (abase + stage * STAGE) ^ (ks * 32), bo = (bbase + stage * STAGE) ^ (ks * 32);
                    unsigned af[2][4], bf[8][2];
#pragma unroll
                    for (unsigned mi = 0; mi < 2; ++mi) r2_ldmatrix_x4(af[mi], ao + mi * 16 * SB);
#pragma unroll
                    for (unsigned p = 0; p < 4; ++p) {
                        unsigned r[4];
                        r2_ldmatrix_x4(r, bo + p * 16 * SB);
                        bf[2 * p][0] = r[0];
                        bf[2 * p][1] = r[1];
                        bf[2 * p + 1][0] = r[2];
                        bf[2 * p + 1][1] = r[3];
                    }
#pragma unroll
                    for (unsigned mi = 0; mi < 2; ++mi)
#pragma unroll
                        for (unsigned ni = 0; ni < 8; ++ni) r2_mma(acc[mi][ni], af[mi], bf[ni], T());
                }
            }
            cur = stage;
            stage = stage + 1 == NS ? 0 : stage + 1;
        }

        // ---- Epilogue of the tile. Thread element (x, y), x = 0..3, y = 0..15, is
        // acc[x / 2][y / 2][(x % 2) * 2 + y % 2]: query wr*32 + (x / 2)*16 + (x % 2)*8 + g,
        // key wc*64 + (y / 2)*8 + 2 t4 + y % 2. The norms are in the last step's stage,
        // which the next issue overwrites only after the next step's barrier.
        const unsigned tbase = row0 + tile * BK;
        const float* nd = reinterpret_cast<const float*>(smem + cur * STAGE + OPB);
        float kv[16];
#pragma unroll
        for (unsigned y = 0; y < 16; ++y) kv[y] = nd[wc * 64 + (y >> 1) * 8 + 2 * t4 + (y & 1u)];
        // Element (x, y) of the accumulators, x a run-time value (selects, no local memory).
        auto elem = [&](unsigned x, unsigned y) -> float {
            float v = acc[0][0][0];
#pragma unroll
            for (unsigned xx = 0; xx < 4; ++xx)
#pragma unroll
                for (unsigned yy = 0; yy < 16; ++yy)
                    if (xx == x && yy == y) v = acc[xx >> 1][yy >> 1][(xx & 1u) * 2 + (yy & 1u)];
            return v;
        };
        auto kval = [&](unsigned y) -> float {
            float v = kv[0];
#pragma unroll
            for (unsigned yy = 1; yy < 16; ++yy)
                if (yy == y) v = kv[yy];
            return v;
        };
        if (tile == 0) {
            // Seed: each holder's best ceil(n / 8) approximate scores of the query (distinct
            // rows, 8 holders: 2 warps x 4 lanes), then the lists sorted.
            if (wactive) {
                const unsigned h = (n + 7) / 8, slot0 = (wc * 4 + t4) * h;
#pragma unroll 1
                for (unsigned x = 0; x < 4; ++x) {
                    const unsigned qi = wr * 32 + (x >> 1) * 16 + (x & 1u) * 8 + g;
                    if (qi >= nq) continue;
                    const unsigned qg = q0 + qi;
                    const float e = qeps[qg];
                    const unsigned ex = excl != nullptr ? excl[qg] : R2_PAD_INDEX;
                    float sv[16];
#pragma unroll
                    for (unsigned y = 0; y < 16; ++y) {
                        const unsigned row = tbase + wc * 64 + (y >> 1) * 8 + 2 * t4 + (y & 1u);
                        float v = acc[0][y >> 1][y & 1u];
#pragma unroll
                        for (unsigned xx = 1; xx < 4; ++xx)
                            if (xx == x) v = acc[xx >> 1][y >> 1][(xx & 1u) * 2 + (y & 1u)];
                        const float sc = v * __frcp_rn(kv[y] + e);
                        sv[y] = row < row1 && row != ex && !isnan(sc) ? sc : -R2_INF;
                    }
                    unsigned taken = 0;
                    for (unsigned j = 0; j < h; ++j) {
                        float best = -R2_INF;
                        unsigned bi = 16;
#pragma unroll
                        for (unsigned y = 0; y < 16; ++y) {
                            if (!((taken >> y) & 1u) && sv[y] > best) {
                                best = sv[y];
                                bi = y;
                            }
                        }
                        if (bi < 16) taken |= 1u << bi;
                        lists[qi * nl + slot0 + j] = best;
                    }
                }
            }
            __syncthreads();
            cosine_topk_tc_sort_lists(lists, nl, nq);
            thresholds();
            __syncthreads();
        }

        // Filter: any pass (or NaN) sends this thread to the exact test of its 64 scores, and
        // so does an infinite key norm: a -inf dot product fails the fast test whatever the
        // threshold, while its score -inf / inf is NaN, an error (a finite dot product over an
        // infinite norm scores 0, which the exact test decides).
        bool any = false;
        if (wactive) {
#pragma unroll
            for (unsigned y = 0; y < 16; ++y) any |= !(kv[y] < R2_INF);
            float fk[4], fe[4];
#pragma unroll
            for (unsigned x = 0; x < 4; ++x) {
                const unsigned qi = wr * 32 + (x >> 1) * 16 + (x & 1u) * 8 + g;
                fk[x] = th_k[qi];
                fe[x] = th_e[qi];
            }
#pragma unroll
            for (unsigned x = 0; x < 4; ++x)
#pragma unroll
                for (unsigned y = 0; y < 16; ++y)
                    any |= !(acc[x >> 1][y >> 1][(x & 1u) * 2 + (y & 1u)] < fmaf(fk[x], kv[y], fe[x]));
        }
        bool offered = false;
        if (any) {
#pragma unroll 1
            for (unsigned x = 0; x < 4; ++x) {
                const unsigned qi = wr * 32 + (x >> 1) * 16 + (x & 1u) * 8 + g;
                if (qi >= nq) continue;
                const float fk = th_k[qi], fe = th_e[qi];
                unsigned pass = 0;  // bit y: element (x, y) passes the fast test, or |k| is not finite
#pragma unroll
                for (unsigned y = 0; y < 16; ++y)
                    if (!(elem(x, y) < fmaf(fk, kv[y], fe)) || !(kv[y] < R2_INF)) pass |= 1u << y;
                if (pass == 0u) continue;
                const unsigned qg = q0 + qi;
                const float e = qeps[qg], t = th_t[qi], worst = lists[qi * nl + n - 1];
                const unsigned ex = excl != nullptr ? excl[qg] : R2_PAD_INDEX;
                const size_t o = (size_t)qg * capq;
                while (pass) {
                    const unsigned y = __ffs(pass) - 1;
                    pass &= pass - 1;
                    const unsigned row = tbase + wc * 64 + (y >> 1) * 8 + 2 * t4 + (y & 1u);
                    if (row >= row1) continue;
                    const float sc = elem(x, y) * __frcp_rn(kval(y) + e);
                    if (isnan(sc)) {
                        r2_report(a.err, R2_ERR_NAN_SCORE, qg, row);
                        continue;
                    }
                    if (row == ex || !(sc >= t)) continue;
                    const unsigned slot = atomicAdd(a.count + qg, 1u);
                    if (slot < capq) {
                        a.cand_s[o + slot] = sc;
                        a.cand_i[o + slot] = row;
                    }
                    // The first tile's rows reach the lists only through the seed (a row
                    // offered twice would count twice toward the n-th best).
                    if (tile > 0 && sc > worst) {
                        const unsigned hs = atomicAdd(hit_n + qi, 1u);
                        if (hs < HQ) hit_s[qi * HQ + hs] = sc;
                        offered = true;
                    }
                }
            }
        }
        // Offered scores enter their lists (one warp per query; a score dropped for want of a
        // buffer slot only leaves the list lower, still the n-th best of rows it was offered).
        if (__syncthreads_or(offered)) {
            for (unsigned qi = warp; qi < nq; qi += NW) {
                const unsigned c = hit_n[qi];
                if (c == 0u) continue;  // warp-uniform
                float* L = lists + qi * nl;
                for (unsigned j = 0; j < min(c, HQ); ++j) {
                    const float v = hit_s[qi * HQ + j];
                    if (v > L[n - 1]) cosine_topk_tc_insert(L, n, nl, v, lane);
                }
                __syncwarp();  // every lane has read the count
                if (lane == 0) hit_n[qi] = 0u;
            }
            __syncthreads();
        }
        thresholds();  // read by the next tile's filter, after the next step's barrier
    }
    __pipeline_wait_prior(0);  // no copy outlives the block (the last groups are empty)
}

#define R2_TC_ENTRIES(SUFFIX, T)                                                              \
    R2_ENTRY(cosine_topk_tc_##SUFFIX, CosineTopkTcArgs, R2_TC_THREADS, R2_TC_MIN_BLOCKS) { \
        cosine_topk_tc_pass<T>(a);                                                            \
    }

R2_TC_ENTRIES(f32, float)
R2_TC_ENTRIES(f16, __half)
R2_TC_ENTRIES(bf16, __nv_bfloat16)
