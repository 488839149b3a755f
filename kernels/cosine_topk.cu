// cosine_topk.cu: fused cosine top-n retrieval (paper Eq. 1), one pass over the bank.
//
// Op: src/retrieve/cosine_topk/ (plan and launches in kernel.rs, shared by the CUDA device
// and the emulator). Arguments: CosineTopkPartialArgs, CosineTopkMergeArgs (r2_abi.h).
//
// cosine_topk_partial_<dt>: grid (gx, gy), R2_CT_THREADS threads. Block (x, y) scores
//   bank rows [x*chunk_rows, (x+1)*chunk_rows) against queries [y*qb, y*qb+qb): queries
//   (f32) and their norms sit in shared memory; each tile of R2_CT_TILE rows is scored
//   thread-per-row from 32 x 32 blocks that each warp loads coalesced and transposes
//   through shared memory (every key element read from global memory once for all qb
//   queries, converted to f32), written to a shared tile, and absorbed into a running
//   top-kp per query (topk.cuh) only when some entry beats the running worst. Writes kp candidates per
//   (query, block): B*gx*kp pairs in global memory, never the B x M scores.
// cosine_topk_merge: one block per query merges its gx*kp candidates into the top n.
// kp (up to 1024, src/retrieve/cosine_topk/kernel.rs KMAX) may exceed R2_CT_TILE: a tile
// then has fewer hits than kp, so r2_stream_flush only ever sorts its hit buffer.
//
// Score: dot / (|q| |k| + R2_COS_EPS) with key norms precomputed ([M] f32). Excluded rows
// and rows past the chunk get (-inf, R2_PAD_INDEX). A NaN score (the excluded row's too) sets err[0] =
// R2_ERR_NAN_SCORE with err[1] = query, err[2] = row (first reporter), and the host turns it
// into an error.
#include "topk.cuh"

// Per-warp [32][33] f32 transpose buffers at the start of the partial kernel's dynamic
// shared memory (src/retrieve/cosine_topk/kernel.rs `TRANSPOSE_BYTES`).
#define R2_CT_TRANSPOSE_FLOATS ((R2_CT_THREADS / 32) * 32 * 33)

template <class T>
__device__ __forceinline__ void cosine_topk_partial(const CosineTopkPartialArgs& a) {
    const float* __restrict__ q = a.q;
    const T* __restrict__ keys = static_cast<const T*>(a.keys);
    const float* __restrict__ kn = a.key_norms;
    const unsigned* __restrict__ excl = a.exclude;
    const unsigned B = a.b, M = a.m, D = a.d, qb = a.qb, kp = a.kp, chunk_rows = a.chunk_rows;
    float* __restrict__ cand_s = a.cand_s;
    unsigned* __restrict__ cand_i = a.cand_i;
    R2_DYN_SMEM(unsigned char, smem);
    __shared__ float qn[R2_CT_QB_MAX];
    __shared__ unsigned ex[R2_CT_QB_MAX];
    __shared__ unsigned cnt[3 * R2_TOPK_MAXQ];

    const unsigned tid = threadIdx.x;
    const unsigned q0 = blockIdx.y * qb;
    const unsigned nq = min(qb, B - q0);
    const unsigned row0 = blockIdx.x * chunk_rows;
    const unsigned row1 = min(M, row0 + chunk_rows);

    float* trs = reinterpret_cast<float*>(smem);  // R2_CT_TRANSPOSE_FLOATS
    float* qs = trs + R2_CT_TRANSPOSE_FLOATS;
    R2Stream st;
    r2_stream_carve(st, reinterpret_cast<unsigned char*>(qs + (size_t)qb * D), nq, kp, R2_CT_TILE, cnt);

    for (unsigned t = tid; t < nq * D; t += blockDim.x) qs[t] = q[(size_t)q0 * D + t];
    if (tid < nq) ex[tid] = excl[q0 + tid];
    r2_stream_init(st);  // ends with a barrier: qs and ex visible
    if (tid < nq) {
        float s = 0.f;
        for (unsigned d = 0; d < D; ++d) s += qs[tid * D + d] * qs[tid * D + d];
        qn[tid] = sqrtf(s);
    }
    __syncthreads();

    // Each warp scores groups of 32 rows, 32 columns at a time: lane l reads column
    // d0 + l of each of the 32 rows (one coalesced segment per row: 128 bytes for f32)
    // into its warp's [32][33] transpose buffer, then lane i dots row i from it (the
    // padding keeps both the writes and the reads free of bank conflicts). Each row is
    // summed in index order by one thread, as the CPU reference does. `nrows` is
    // warp-uniform, so every lane reaches every __syncwarp.
    const unsigned lane = tid & 31u, warp = tid >> 5, nwarps = blockDim.x >> 5;
    float* tr = trs + warp * 32 * 33;
    unsigned tile = 0;
    for (unsigned base = row0; base < row1; base += R2_CT_TILE, ++tile) {
        for (unsigned g = warp * 32; g < R2_CT_TILE; g += nwarps * 32) {
            const unsigned first = base + g;
            const unsigned nrows = first < row1 ? min(32u, row1 - first) : 0u;
            float acc[R2_CT_QB_MAX];
#pragma unroll
            for (unsigned j = 0; j < R2_CT_QB_MAX; ++j) acc[j] = 0.f;
            for (unsigned d0 = 0; nrows > 0 && d0 < D; d0 += 32) {
                const unsigned col = d0 + lane;
                for (unsigned i = 0; i < nrows; ++i)
                    tr[i * 33 + lane] = col < D ? r2_to_f32(keys[(size_t)(first + i) * D + col]) : 0.f;
                __syncwarp();
                if (lane < nrows) {
                    const unsigned w = min(32u, D - d0);
                    for (unsigned t = 0; t < w; ++t) {
                        const float kv = tr[lane * 33 + t];
#pragma unroll
                        for (unsigned j = 0; j < R2_CT_QB_MAX; ++j)
                            if ((unsigned)j < nq) acc[j] += qs[j * D + d0 + t] * kv;
                    }
                }
                __syncwarp();  // the buffer is rewritten for the next columns
            }
            const unsigned e = g + lane;
            const unsigned r = base + e;
            const bool live = lane < nrows;
            const float knr = live ? kn[r] : 0.f;
#pragma unroll
            for (unsigned j = 0; j < R2_CT_QB_MAX; ++j) {
                if ((unsigned)j >= nq) continue;
                float s = -R2_INF;
                unsigned idx = R2_PAD_INDEX;
                if (live) {
                    // A NaN score is an error even at the excluded row, as on every path.
                    const float v = acc[j] / (qn[j] * knr + R2_COS_EPS);
                    if (isnan(v)) {
                        r2_report(a.err, R2_ERR_NAN_SCORE, q0 + j, r);
                    } else if (r != ex[j]) {
                        s = v;
                        idx = r;
                    }
                }
                r2_stream_offer(st, tile, j, e, s, idx);
            }
        }
        r2_stream_flush(st, tile);
    }

    for (unsigned t = tid; t < nq * kp; t += blockDim.x) {
        const unsigned j = t / kp, i = t % kp;
        const size_t o = ((size_t)(q0 + j) * gridDim.x + blockIdx.x) * kp + i;
        cand_s[o] = st.run_s[j * kp + i];
        cand_i[o] = st.run_i[j * kp + i];
    }
}

// Candidates of query b: ncand = gx * kp pairs at b * ncand (gx sorted runs of kp).
__device__ __forceinline__ void cosine_topk_merge_impl(const CosineTopkMergeArgs& a) {
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
    r2_stream_carve(st, smem, 1, kp, R2_CT_TILE, cnt);
    r2_stream_init(st);
    unsigned tile = 0;
    for (unsigned base = 0; base < ncand; base += R2_CT_TILE, ++tile) {
        for (unsigned e = tid; e < R2_CT_TILE; e += blockDim.x) {
            const unsigned c = base + e;
            float s = -R2_INF;
            unsigned i = R2_PAD_INDEX;
            if (c < ncand) {
                s = cs[b * ncand + c];
                i = ci[b * ncand + c];
            }
            r2_stream_offer(st, tile, 0, e, s, i);
        }
        r2_stream_flush(st, tile);
    }
    for (unsigned i = tid; i < n; i += blockDim.x) {
        out_s[b * n + i] = st.run_s[i];
        out_i[b * n + i] = st.run_i[i];
    }
}

// The min-blocks hint of 4 (at most 65536 / (128 x 4) = 128 registers a thread) is for
// ptxas: with none it capped the f32 kernel at 56 registers on sm_80 and spilled 16 bytes.
#define R2_CT_PARTIAL(SUFFIX, T)                                                                 \
    R2_ENTRY(cosine_topk_partial_##SUFFIX, CosineTopkPartialArgs, R2_CT_THREADS, 4) {              \
        cosine_topk_partial<T>(a);                                                               \
    }

R2_CT_PARTIAL(f32, float)
R2_CT_PARTIAL(f16, __half)
R2_CT_PARTIAL(bf16, __nv_bfloat16)

R2_ENTRY(cosine_topk_merge, CosineTopkMergeArgs, R2_CT_THREADS) { cosine_topk_merge_impl(a); }

// The tensor-core path for large batches (build.rs inlines quoted includes for NVRTC and
// reads the whole rest of the line as the file name: no comment after it).
#include "cosine_topk_tc.cuh"
