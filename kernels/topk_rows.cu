// topk_rows.cu: the CAP row top-k (paper Eq. 7, phase 2 saliency selection).
//
// Op: src/cap/topk_rows/ (plan and launch in kernel.rs, shared by the CUDA device and the
// emulator). Arguments: TopkRowsArgs (r2_abi.h).
//
// topk_rows_f32 over scores [B, L] f32, two ways chosen by the plan (warp_rows):
//   - short rows (L <= R2_TOPK_WARP_MAX_L, k <= R2_TOPK_WARP_MAX_K): one WARP per row,
//     R2_CAP_TOPK_THREADS / 32 rows per block, r2_warp_topk (registers and shuffles, no
//     shared memory, no block barrier);
//   - otherwise one block per row: the row streams through the same top-k machinery as
//     dissonance_topk (topk.cuh's R2Stream). Shared memory (4-byte words):
//     cnt[3 * R2_TOPK_MAXQ] | R2Stream(nq = 1, kp, tile).
// Values [B, k] are the original scores, indices [B, k]; larger first, ties to the lower
// index, NaN ranked as -inf.
#include "topk.cuh"

// One warp per row.
__device__ __forceinline__ void cap_topk_rows_warp(const TopkRowsArgs& a) {
    const unsigned L = a.l, k = a.k;
    const unsigned row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= a.b) return;  // warp-uniform, no barrier below
    const float* r = a.scores + (size_t)row * L;
    r2_warp_topk<R2_TOPK_WARP_MAX_L / 32>(
        L, k, [&](unsigned i) { return r2_nan_last(r[i]); },
        [&](unsigned j, unsigned i) {
            a.idx[(size_t)row * k + j] = i;
            a.vals[(size_t)row * k + j] = r[i];
        });
}

// One block per row. C++ linkage like every R2_DYN_SMEM user, so the shared array has one
// linkage per TU.
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

R2_ENTRY(topk_rows_f32, TopkRowsArgs, R2_CAP_TOPK_THREADS) {
    if (a.warp_rows)
        cap_topk_rows_warp(a);
    else
        cap_topk_rows(a);
}
