// topk_rows.cu: the CAP row top-k (paper Eq. 7, phase 2 saliency selection).
//
// Op: src/cap/topk_rows/ (plan and launch in kernel.rs, shared by the CUDA device and the
// emulator). Arguments: TopkRowsArgs (r2_abi.h).
//
// topk_rows_f32: one block per row of scores [B, L] f32; the row streams through the same
// top-k machinery as dissonance_topk (topk.cuh). Values [B, k] are the original scores,
// indices [B, k]; larger first, ties to the lower index, NaN ranked as -inf.
// Shared memory (4-byte words): cnt[3 * R2_TOPK_MAXQ] | R2Stream(nq = 1, kp, tile).
#include "topk.cuh"

// C++ linkage like every R2_DYN_SMEM user, so the shared array has one linkage per TU.
__device__ __forceinline__ void cap_topk_rows(const TopkRowsArgs& a) {
    const unsigned L = a.l, k = a.k, kp = a.kp, tile = a.tile;
    const unsigned b = blockIdx.x;
    const unsigned nt = blockDim.x, tid = threadIdx.x;
    R2_DYN_SMEM(unsigned, cnt);
    R2Stream st;
    r2_stream_carve(st, reinterpret_cast<unsigned char*>(cnt + 3 * R2_TOPK_MAXQ), 1, kp, tile, cnt);
    const float* row = a.scores + (size_t)b * L;
    r2_stream_topk(st, L, [&](unsigned t, unsigned t0) {
        for (unsigned r = tid; r < tile; r += nt) {
            const unsigned i = t0 + r;
            r2_stream_offer(st, t, 0, r, i < L ? r2_nan_last(row[i]) : -R2_INF, i < L ? i : R2_PAD_INDEX);
        }
    });
    for (unsigned j = tid; j < k; j += nt) {
        const unsigned i = st.run_i[j];
        a.idx[(size_t)b * k + j] = i;
        a.vals[(size_t)b * k + j] = row[i];
    }
}

R2_ENTRY(topk_rows_f32, TopkRowsArgs, R2_CAP_TOPK_THREADS) { cap_topk_rows(a); }
