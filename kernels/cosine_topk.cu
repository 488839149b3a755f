// cosine_topk.cu: fused cosine top-n retrieval (paper Eq. 1), one pass over the bank.
//
// Op: src/retrieve/cosine_topk/ (plan and launches in kernel.rs, shared by the CUDA device and
// the emulator). Arguments: CosineTopkPartialArgs, CosineTopkMergeArgs (r2_abi.h).
//
// cosine_topk_partial_<cfg>_<dt>: grid (gx, gy), R2_CT_THREADS threads, bandwidth first.
//   Block (x, y) scores bank rows [y*chunk_rows, (y+1)*chunk_rows) against the qb queries
//   [x*qb, x*qb + qb) of its configuration (q1, q8, q16, q32: qb = 1, 8, 16, 32), so each key
//   byte is read from memory once per qb queries; the grid is sized to fill the GPU once (a
//   persistent grid, src/retrieve/cosine_topk/kernel.rs). Query groups are the fast grid axis,
//   so the blocks that read the same chunk for different queries run side by side (L2 shares).
//
//   Copy pipeline: the chunk is cut into steps of (R2_CT_TILE_ROWS rows) x (kb key bytes per
//   row, a power of two up to R2_CT_KB_MAX: as much of a row as the plan's shared memory
//   allows, from the device's opt-in limit). Step s is copied into shared-memory stage
//   s % R2_CT_STAGES with 16-byte `cp.async` (r2_cp_async16, by shared address: the kb / 16
//   threads of a row read its kb contiguous bytes, each thread's source and destination advance
//   by constant strides) together with the queries' matching f32 columns and, on a tile's last
//   step, its key norms; two steps are in flight while a third is scored. One __syncthreads per
//   step: after the wait for step s, it also retires step s - 1's stage, which step s + 2 then
//   overwrites. Rows of keys and queries are 16-byte aligned: the op copies other inputs once
//   to a zero-padded aligned layout (kernel.rs, `staged`).
//
//   Scoring: a warp's lanes form 32/QG row groups of QG lanes; lane (row group g, query group
//   h) accumulates RT rows x QT queries (rows warp*RG*RT + t*RG + g, queries j*QG + h) from
//   16-byte shared loads: the keys of a row group are read once for its QT queries, the queries
//   of a query group once for its RT rows (broadcast across row groups). Each accumulator sums
//   in index order (fmaf, d ascending), so a (query, row) score is the same in every block.
//
//   Running top-n: per query a sorted list of kp (score, row) in shared memory. At a tile's
//   end every thread compares each score with its query's list worst (one compare, nearly
//   always false after the first tiles); __syncthreads_or says whether any thread holds a hit.
//   Hits go to a per-query buffer of hb slots; the buffer is sorted and merged into the list
//   (topk.cuh r2_block_sort / r2_block_merge), and hits that found no slot are compared again
//   against the raised worst and offered in the next round. Scores stay in registers.
//
//   Writes kp candidates per (query, block): B*gy*kp pairs, never the B x M scores.
//
// cosine_topk_merge: one block per query merges its gy*kp candidates into the top n (topk.cuh
//   R2Stream, tiles of R2_CT_MERGE_TILE, the next tile loaded while the current one is
//   absorbed). If the partial kernel set the error word, every score it writes is NaN: an
//   unchecked caller reading the scores sees the failure (kernel.rs, "NaN contract").
//
// Score: dot / (|q| |k| + R2_COS_EPS) with key norms precomputed ([M] f32) and |q| computed
// per block in the canonical order of cosine_topk_qnorm (the same bits in every configuration,
// whatever the batch size). Excluded rows and rows past the chunk are never offered. A NaN
// score (the excluded row's too) sets err = (R2_ERR_NAN_SCORE, query, row) (first reporter).
// Blocks of chunk 0 check `exclude`: an entry >= M that is not R2_PAD_INDEX sets
// R2_ERR_BAD_EXCLUDE (query, entry); a valid exclusion with n = M sets R2_ERR_FEW_ROWS.
#include "topk.cuh"

// Configuration: QG lanes per row group (they split the queries), QT queries and RT rows per
// lane. Rows per tile = (R2_CT_THREADS / 32) * (32 / QG) * RT = R2_CT_TILE_ROWS for each.
template <unsigned QG_, unsigned QT_, unsigned RT_>
struct CtCfg {
    static constexpr unsigned QG = QG_, QT = QT_, RT = RT_;
    static constexpr unsigned QB = QG * QT;
    static constexpr unsigned RG = 32 / QG;
    static constexpr unsigned TR = (R2_CT_THREADS / 32) * RG * RT;
    static_assert(TR == R2_CT_TILE_ROWS, "every configuration tiles R2_CT_TILE_ROWS rows");
    static_assert(QB <= R2_CT_QB_MAX && QB <= 32, "query masks are 32-bit");
    static_assert(RT * QT <= 32, "pending hits are one 32-bit mask per thread");
};
using CtQ1 = CtCfg<1, 1, 1>;
using CtQ8 = CtCfg<4, 2, 4>;
using CtQ16 = CtCfg<4, 4, 4>;
using CtQ32 = CtCfg<4, 8, 4>;

// |q| in one canonical order, shared by every configuration and by the tensor-core path's
// exact rescoring (cosine_topk_tc.cuh), so that a (query, row) pair scores the same bits
// whatever the batch size, configuration or path: R2_CT_QN_SLICES strided slices, slice s an
// fmaf chain over d = s, s + R2_CT_QN_SLICES, ... ascending, then the slices summed in order.
__device__ __forceinline__ float cosine_topk_qnorm_slice(const float* __restrict__ q, unsigned D, unsigned s) {
    float ss = 0.f;
    for (unsigned d = s; d < D; d += R2_CT_QN_SLICES) ss = fmaf(q[d], q[d], ss);
    return ss;
}
__device__ __forceinline__ float cosine_topk_qnorm(const float* slices) {
    float ss = 0.f;
    for (unsigned s = 0; s < R2_CT_QN_SLICES; ++s) ss += slices[s];
    return sqrtf(ss);
}

template <class T, class C>
__device__ __forceinline__ void cosine_topk_partial(const CosineTopkPartialArgs& a) {
    constexpr unsigned NT = R2_CT_THREADS, QB = C::QB, QG = C::QG, QT = C::QT, RT = C::RT;
    constexpr unsigned RG = C::RG, TR = C::TR, NS = R2_CT_STAGES;
    constexpr unsigned E = 16 / sizeof(T);  // key elements per 16 bytes
    const float* __restrict__ q = a.q;
    const T* __restrict__ keys = static_cast<const T*>(a.keys);
    const float* __restrict__ kn = a.key_norms;
    const unsigned* __restrict__ excl = a.exclude;
    const unsigned B = a.b, M = a.m, D = a.d, kp = a.kp, hb = a.hb, kb = a.kb;
    const unsigned DK = kb / sizeof(T);            // key elements per row and step
    const unsigned nchunks = (D + DK - 1) / DK;    // steps per tile
    const unsigned KS = kb + 16, QS = DK * 4 + 16;  // padded row strides (conflict-free LDS.128)
    const unsigned SB = TR * KS + QB * QS + TR * 4;  // stage: keys | queries | norms
    R2_DYN_SMEM(unsigned char, smem);
    float* run_s = reinterpret_cast<float*>(smem + NS * SB);
    unsigned* run_i = reinterpret_cast<unsigned*>(run_s + QB * kp);
    float* buf_s = reinterpret_cast<float*>(run_i + QB * kp);
    unsigned* buf_i = reinterpret_cast<unsigned*>(buf_s + QB * hb);
    __shared__ float qn[QB];
    __shared__ unsigned ex[QB];
    __shared__ unsigned cnt[QB];

    const unsigned tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const unsigned q0 = blockIdx.x * QB, nq = min(QB, B - q0);
    const unsigned row0 = blockIdx.y * a.chunk_rows, row1 = min(M, row0 + a.chunk_rows);
    const unsigned total = (row1 - row0 + TR - 1) / TR * nchunks;  // pipeline steps

    // Copies of one step. Keys: KV = kb / 16 chunks per row (a power of two): thread tid moves
    // chunk tid % KV of rows tid / KV + k * (NT / KV), k < KV, so the KV threads of a row read
    // its kb contiguous bytes and the thread's source and destination advance by constant
    // strides. Queries: QV = DK * 4 / 16 chunks per row. Chunks past D and rows past the chunk
    // are zero-filled (nothing read).
    const unsigned lkv = __ffs(kb >> 4) - 1, KV = 1u << lkv, kvc = tid & (KV - 1u);
    const unsigned krow = tid >> lkv, kstep = NT >> lkv;
    const unsigned lqv = __ffs(DK >> 2) - 1, QV = 1u << lqv;
    const unsigned sbase = r2_smem_addr(smem);
    // Copies step s (tile s / nchunks, chunk s % nchunks) into its stage, as one commit group.
    auto issue = [&](unsigned s) {
        const unsigned st = sbase + (s % NS) * SB;
        const unsigned c = s % nchunks, col0 = c * DK;
        const unsigned rbase = row0 + (s / nchunks) * TR;
        const unsigned col = col0 + kvc * E;
        const T* src = keys + (size_t)(rbase + krow) * D + col;
        unsigned dst = st + krow * KS + kvc * 16;
        for (unsigned k = 0, r = rbase + krow; k < KV; ++k, r += kstep) {
            r2_cp_async16(dst, src, r < row1 && col < D ? 16 : 0);
            src += (size_t)kstep * D;
            dst += kstep * KS;
        }
        for (unsigned u = tid; u < QB * QV; u += NT) {
            const unsigned j = u >> lqv, qc = col0 + (u & (QV - 1u)) * 4;
            r2_cp_async16(st + TR * KS + j * QS + (u & (QV - 1u)) * 16, q + (size_t)(q0 + j) * D + qc,
                          j < nq && qc < D ? 16 : 0);
        }
        if (c == nchunks - 1) {
            for (unsigned r = tid; r < TR; r += NT)
                r2_cp_async4(st + TR * KS + QB * QS + 4 * r, kn + rbase + r, rbase + r < row1 ? 4 : 0);
        }
        __pipeline_commit();
    };

    // The first NS - 1 steps go out before the prologue, which then overlaps their latency.
#pragma unroll
    for (unsigned s = 0; s < NS - 1; ++s) {
        if (s < total) issue(s);
        else __pipeline_commit();  // empty group: the wait below counts groups
    }

    // Prologue: |q| slices (cosine_topk_qnorm_slice; NT / QB threads per query, each some of
    // its slices) into the hit buffers, unused until the first tile's end (QB x hb x 8 bytes,
    // hb >= 16: room for QB x R2_CT_QN_SLICES floats), exclusions, empty lists.
    {
        constexpr unsigned SL = NT / QB;
        const unsigned j = tid / SL;
        if (j < nq)
            for (unsigned sl = tid % SL; sl < R2_CT_QN_SLICES; sl += SL)
                buf_s[j * R2_CT_QN_SLICES + sl] = cosine_topk_qnorm_slice(q + (size_t)(q0 + j) * D, D, sl);
    }
    if (tid < QB) {
        unsigned e = R2_PAD_INDEX;
        if (tid < nq && excl != nullptr) {
            e = excl[q0 + tid];
            if (e != R2_PAD_INDEX && e >= M) {
                if (blockIdx.y == 0) r2_report(a.err, R2_ERR_BAD_EXCLUDE, q0 + tid, e);
                e = R2_PAD_INDEX;
            } else if (e != R2_PAD_INDEX && a.n >= M && blockIdx.y == 0) {
                r2_report(a.err, R2_ERR_FEW_ROWS, q0 + tid, e);
            }
        }
        ex[tid] = e;
        cnt[tid] = 0;
    }
    for (unsigned t = tid; t < QB * kp; t += NT) {
        run_s[t] = -R2_INF;
        run_i[t] = R2_PAD_INDEX;
    }
    __syncthreads();
    if (tid < QB) qn[tid] = tid < nq ? cosine_topk_qnorm(buf_s + tid * R2_CT_QN_SLICES) : 0.f;
    // (qn is read after the first step's barrier.)

    const unsigned qg = lane % QG, rg = lane / QG;
    unsigned lrow[RT];
#pragma unroll
    for (unsigned t = 0; t < RT; ++t) lrow[t] = warp * RG * RT + t * RG + rg;
    float acc[RT][QT];
#pragma unroll
    for (unsigned t = 0; t < RT; ++t)
#pragma unroll
        for (unsigned j = 0; j < QT; ++j) acc[t][j] = 0.f;

    for (unsigned s = 0; s < total; ++s) {
        __pipeline_wait_prior(NS - 2);  // this thread's copies of step s have landed
        __syncthreads();                // everyone's have; everyone is done with step s - 1
        if (s + NS - 1 < total) issue(s + NS - 1);
        else __pipeline_commit();

        const unsigned char* st = smem + (s % NS) * SB;
        const unsigned c = s % nchunks;
        const unsigned nv = (min(DK, D - c * DK) * sizeof(T) + 15) / 16;  // chunks holding columns < D
        const unsigned char* qrow = st + TR * KS + qg * QS;
        for (unsigned v = 0; v < nv; ++v) {
            float kf[RT][E];
#pragma unroll
            for (unsigned t = 0; t < RT; ++t) r2_unpack16<T>(r2_load16(st + lrow[t] * KS + v * 16), kf[t]);
#pragma unroll
            for (unsigned j = 0; j < QT; ++j) {
                float qf[E];
                const unsigned char* qp = qrow + j * QG * QS + v * E * 4;
#pragma unroll
                for (unsigned h = 0; h < E / 4; ++h) r2_unpack16<float>(r2_load16(qp + h * 16), qf + 4 * h);
#pragma unroll
                for (unsigned t = 0; t < RT; ++t)
#pragma unroll
                    for (unsigned e = 0; e < E; ++e) acc[t][j] = fmaf(kf[t][e], qf[e], acc[t][j]);
            }
        }
        if (c != nchunks - 1) continue;

        // ---- tile end: scores, then rounds of hits into the running lists ----
        const unsigned tbase = row0 + (s / nchunks) * TR;
        const float* nd = reinterpret_cast<const float*>(st + TR * KS + QB * QS);
        unsigned pend = 0;  // bit t * QT + j: acc[t][j] still to offer
#pragma unroll
        for (unsigned t = 0; t < RT; ++t) {
            const unsigned row = tbase + lrow[t];
            const float knr = nd[lrow[t]];
#pragma unroll
            for (unsigned j = 0; j < QT; ++j) {
                const unsigned qi = j * QG + qg;
                if (row < row1 && qi < nq) {
                    // A NaN score is an error even at the excluded row, as on every path.
                    const float v = acc[t][j] / (qn[qi] * knr + R2_COS_EPS);
                    acc[t][j] = v;
                    if (isnan(v)) r2_report(a.err, R2_ERR_NAN_SCORE, q0 + qi, row);
                    else if (row != ex[qi] &&
                             r2_beats_worst(run_s + qi * kp, run_i + qi * kp, kp, v, row))
                        pend |= 1u << (t * QT + j);
                }
            }
        }
        while (__syncthreads_or(pend != 0)) {
#pragma unroll
            for (unsigned t = 0; t < RT; ++t)
#pragma unroll
                for (unsigned j = 0; j < QT; ++j) {
                    const unsigned bit = 1u << (t * QT + j), qi = j * QG + qg;
                    if (!(pend & bit)) continue;
                    const unsigned slot = atomicAdd(&cnt[qi], 1u);
                    if (slot < hb) {
                        buf_s[qi * hb + slot] = acc[t][j];
                        buf_i[qi * hb + slot] = tbase + lrow[t];
                        pend &= ~bit;
                    }
                }
            __syncthreads();
            unsigned mask = 0;
            for (unsigned qi = 0; qi < QB; ++qi)
                if (cnt[qi] != 0) mask |= 1u << qi;
            for (unsigned u = tid; u < QB * hb; u += NT) {
                const unsigned qi = u / hb, e = u % hb;
                if (((mask >> qi) & 1u) && e >= cnt[qi]) {
                    buf_s[u] = -R2_INF;
                    buf_i[u] = R2_PAD_INDEX;
                }
            }
            __syncthreads();  // every read of cnt above is done
            if (tid < QB) cnt[tid] = 0;
            r2_block_sort(buf_s, buf_i, hb, QB, hb, mask);
            r2_block_merge(run_s, run_i, kp, buf_s, buf_i, hb, kp, QB, mask);
            // Hits left without a slot enter only if they still beat the raised worst.
#pragma unroll
            for (unsigned t = 0; t < RT; ++t)
#pragma unroll
                for (unsigned j = 0; j < QT; ++j) {
                    const unsigned bit = 1u << (t * QT + j), qi = j * QG + qg;
                    if ((pend & bit) &&
                        !r2_beats_worst(run_s + qi * kp, run_i + qi * kp, kp, acc[t][j], tbase + lrow[t]))
                        pend &= ~bit;
                }
        }
#pragma unroll
        for (unsigned t = 0; t < RT; ++t)
#pragma unroll
            for (unsigned j = 0; j < QT; ++j) acc[t][j] = 0.f;
    }
    __pipeline_wait_prior(0);  // no copy outlives the block
    __syncthreads();

    for (unsigned t = tid; t < nq * kp; t += NT) {
        const unsigned j = t / kp, i = t % kp;
        const size_t o = ((size_t)(q0 + j) * gridDim.y + blockIdx.y) * kp + i;
        a.cand_s[o] = run_s[j * kp + i];
        a.cand_i[o] = run_i[j * kp + i];
    }
}

// Candidates of query b: ncand = gy * kp pairs at b * ncand (gy sorted runs of kp).
__device__ __forceinline__ void cosine_topk_merge_impl(const CosineTopkMergeArgs& a) {
    constexpr unsigned NT = R2_CT_THREADS, TILE = R2_CT_MERGE_TILE, PER = TILE / NT;
    const float* __restrict__ cs = a.cand_s;
    const unsigned* __restrict__ ci = a.cand_i;
    const unsigned ncand = a.ncand, kp = a.kp, n = a.n;
    float* __restrict__ out_s = a.out_s;
    unsigned* __restrict__ out_i = a.out_i;
    R2_DYN_SMEM(unsigned char, smem);
    __shared__ unsigned cnt[3 * R2_TOPK_MAXQ];
    const unsigned tid = threadIdx.x;
    const size_t b = blockIdx.x;
    R2Stream st;
    r2_stream_carve(st, smem, 1, kp, TILE, cnt);
    r2_stream_init(st);
    float ns[PER];
    unsigned ni[PER];
    auto load = [&](unsigned base) {
#pragma unroll
        for (unsigned k = 0; k < PER; ++k) {
            const unsigned c = base + tid + k * NT;
            ns[k] = c < ncand ? cs[b * ncand + c] : -R2_INF;
            ni[k] = c < ncand ? ci[b * ncand + c] : R2_PAD_INDEX;
        }
    };
    load(0);
    unsigned tile = 0;
    for (unsigned base = 0; base < ncand; base += TILE, ++tile) {
        float s[PER];
        unsigned i[PER];
#pragma unroll
        for (unsigned k = 0; k < PER; ++k) {
            s[k] = ns[k];
            i[k] = ni[k];
        }
        load(base + TILE);  // in flight while this tile is absorbed
#pragma unroll
        for (unsigned k = 0; k < PER; ++k) r2_stream_offer(st, tile, 0, tid + k * NT, s[k], i[k]);
        r2_stream_flush(st, tile);
    }
    const bool failed = a.err[0] != 0u;
    for (unsigned k = tid; k < n; k += NT) {
        out_s[b * n + k] = failed ? __int_as_float(0x7fc00000) : st.run_s[k];
        out_i[b * n + k] = st.run_i[k];
    }
}

// The min-blocks hint (R2_CT_MIN_BLOCKS) caps registers at 65536 / (128 x 4) = 128 a thread, so
// four blocks fit a multiprocessor whatever ptxas would otherwise choose (the plan assumes it).
#define R2_CT_PARTIAL_Q1(SUFFIX, T)                                                                    \
    R2_ENTRY(cosine_topk_partial_q1_##SUFFIX, CosineTopkPartialArgs, R2_CT_THREADS, R2_CT_MIN_BLOCKS) { \
        cosine_topk_partial<T, CtQ1>(a);                                                               \
    }
#define R2_CT_PARTIAL_Q8(SUFFIX, T)                                                                    \
    R2_ENTRY(cosine_topk_partial_q8_##SUFFIX, CosineTopkPartialArgs, R2_CT_THREADS, R2_CT_MIN_BLOCKS) { \
        cosine_topk_partial<T, CtQ8>(a);                                                               \
    }
#define R2_CT_PARTIAL_Q16(SUFFIX, T)                                                                    \
    R2_ENTRY(cosine_topk_partial_q16_##SUFFIX, CosineTopkPartialArgs, R2_CT_THREADS, R2_CT_MIN_BLOCKS) { \
        cosine_topk_partial<T, CtQ16>(a);                                                               \
    }
#define R2_CT_PARTIAL_Q32(SUFFIX, T)                                                                    \
    R2_ENTRY(cosine_topk_partial_q32_##SUFFIX, CosineTopkPartialArgs, R2_CT_THREADS, R2_CT_MIN_BLOCKS) { \
        cosine_topk_partial<T, CtQ32>(a);                                                               \
    }
#define R2_CT_PARTIALS(SUFFIX, T) \
    R2_CT_PARTIAL_Q1(SUFFIX, T)   \
    R2_CT_PARTIAL_Q8(SUFFIX, T)   \
    R2_CT_PARTIAL_Q16(SUFFIX, T)  \
    R2_CT_PARTIAL_Q32(SUFFIX, T)

R2_CT_PARTIALS(f32, float)
R2_CT_PARTIALS(f16, __half)
R2_CT_PARTIALS(bf16, __nv_bfloat16)

R2_ENTRY(cosine_topk_merge, CosineTopkMergeArgs, R2_CT_THREADS) { cosine_topk_merge_impl(a); }

// The tensor-core path for large batches (build.rs inlines quoted includes for NVRTC and
// reads the whole rest of the line as the file name: no comment after it).
#include "cosine_topk_tc.cuh"
// The unit queries and the exact rescoring shared by the tensor-core and GEMM + select paths,
// and the GEMM + select path's select kernel.
#include "cosine_topk_rescore.cuh"
#include "cosine_topk_gemm_select.cuh"
