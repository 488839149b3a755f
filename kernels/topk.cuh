// topk.cuh: block-level top-k machinery shared by cosine_topk, dissonance_topk and
// topk_rows. Ties go to the LOWER index everywhere.
//
// Lists live in shared memory as two parallel arrays (score float, index unsigned).
// Padding entries are (-inf, R2_PAD_INDEX): they rank below every real entry.
// All functions are called by EVERY thread of the block (they contain __syncthreads)
// with block-uniform arguments; `mask` selects which of `nq` lists take part (bit q),
// so one call can serve several queries of a block. Every function ends with a
// __syncthreads, so its results are visible to all threads on return.
#pragma once
#include "common.cuh"

// (sa, ia) ranks strictly above (sb, ib).
__device__ __forceinline__ bool r2_better(float sa, unsigned ia, float sb, unsigned ib) {
    return sa > sb || (sa == sb && ia < ib);
}

// Fills `len` entries of each of the `nq` lists (stride `stride`) with padding.
__device__ __forceinline__ void r2_topk_fill(float* s, unsigned* ix, unsigned len, unsigned nq,
                                             unsigned stride) {
    for (unsigned t = threadIdx.x; t < len * nq; t += blockDim.x) {
        const unsigned q = t / len, e = t % len;
        s[q * stride + e] = -R2_INF;
        ix[q * stride + e] = R2_PAD_INDEX;
    }
    __syncthreads();
}

// Compare-exchange so that the better of (a, b) ends at a.
__device__ __forceinline__ void r2_cmpx(float* s, unsigned* ix, unsigned a, unsigned b, bool best_first) {
    const float sa = s[a], sb = s[b];
    const unsigned ia = ix[a], ib = ix[b];
    const bool swap = best_first ? r2_better(sb, ib, sa, ia) : r2_better(sa, ia, sb, ib);
    if (swap) {
        s[a] = sb;
        s[b] = sa;
        ix[a] = ib;
        ix[b] = ia;
    }
}

// Sorts each selected list of `len` entries (len a power of two) best first: bitonic
// sort, one __syncthreads per stage.
__device__ __forceinline__ void r2_block_sort(float* s, unsigned* ix, unsigned len, unsigned nq,
                                              unsigned stride, unsigned mask) {
    const unsigned half = len / 2;
    for (unsigned k = 2; k <= len; k <<= 1) {
        for (unsigned j = k >> 1; j > 0; j >>= 1) {
            for (unsigned t = threadIdx.x; t < half * nq; t += blockDim.x) {
                const unsigned q = t / half, p = t % half;
                if (!((mask >> q) & 1u)) continue;
                const unsigned a = 2 * j * (p / j) + (p % j);
                r2_cmpx(s + q * stride, ix + q * stride, a, a + j, (a & k) == 0);
            }
            __syncthreads();
        }
    }
}

// Running list `run` (kp entries, sorted best first) absorbs the best kp of
// `tile` (>= kp entries, sorted best first): keeps the best kp of the union, sorted.
// (Select the better of run[i] and tile[kp-1-i]: a bitonic sequence; then a bitonic merge.)
__device__ __forceinline__ void r2_block_merge(float* rs, unsigned* ri, unsigned run_stride,
                                               const float* ts, const unsigned* ti, unsigned tile_stride,
                                               unsigned kp, unsigned nq, unsigned mask) {
    for (unsigned t = threadIdx.x; t < kp * nq; t += blockDim.x) {
        const unsigned q = t / kp, i = t % kp;
        if (!((mask >> q) & 1u)) continue;
        float* s = rs + q * run_stride;
        unsigned* x = ri + q * run_stride;
        const float cs = ts[q * tile_stride + kp - 1 - i];
        const unsigned ci = ti[q * tile_stride + kp - 1 - i];
        if (r2_better(cs, ci, s[i], x[i])) {
            s[i] = cs;
            x[i] = ci;
        }
    }
    __syncthreads();
    const unsigned half = kp / 2;
    for (unsigned j = half; j > 0; j >>= 1) {
        for (unsigned t = threadIdx.x; t < half * nq; t += blockDim.x) {
            const unsigned q = t / half, p = t % half;
            if (!((mask >> q) & 1u)) continue;
            const unsigned a = 2 * j * (p / j) + (p % j);
            r2_cmpx(rs + q * run_stride, ri + q * run_stride, a, a + j, true);
        }
        __syncthreads();
    }
}

// True when (s, i) would enter the running list whose worst entry is run[kp-1].
__device__ __forceinline__ bool r2_beats_worst(const float* rs, const unsigned* ri, unsigned kp, float s,
                                               unsigned i) {
    return r2_better(s, i, rs[kp - 1], ri[kp - 1]);
}

// ---- Streaming top-kp over tiles of candidates -------------------------------------
//
// Shared state for nq lists (caller-allocated, shared memory):
//   run  [nq][kp]        running best-kp list per query, sorted best first
//   tile [nq][tile_len]  the current tile (every entry written, padding where dead)
//   buf  [nq][kp]        compacted entries of the tile that beat the running worst
//   cnt  [3][R2_TOPK_MAXQ] per-query hit counters; tile t uses slot t % 3 and flush(t)
//        resets slot (t + 2) % 3, whose last reader passed flush(t)'s first barrier and
//        whose next writer (tile t + 2) starts after flush(t + 1)'s barrier
// Per tile: every thread calls r2_stream_offer for the entries it produced (any
// distribution of entries over threads), then ALL threads call r2_stream_flush.
// Few hits (<= kp) are sorted in `buf` (log^2 kp stages) instead of the whole tile, which
// after the first tile is the common case. Initialise with r2_stream_init.

struct R2Stream {
    float* run_s;
    unsigned* run_i;
    float* tile_s;
    unsigned* tile_i;
    float* buf_s;
    unsigned* buf_i;
    unsigned* cnt;  // 3 * R2_TOPK_MAXQ
    unsigned kp, tile_len, nq;
};

// Carves an R2Stream for nq lists out of `smem` (4-byte aligned), returns the end.
__device__ __forceinline__ unsigned char* r2_stream_carve(R2Stream& st, unsigned char* smem, unsigned nq,
                                                          unsigned kp, unsigned tile_len, unsigned* cnt) {
    st.kp = kp;
    st.tile_len = tile_len;
    st.nq = nq;
    st.cnt = cnt;
    st.run_s = reinterpret_cast<float*>(smem);
    st.run_i = reinterpret_cast<unsigned*>(st.run_s + nq * kp);
    st.tile_s = reinterpret_cast<float*>(st.run_i + nq * kp);
    st.tile_i = reinterpret_cast<unsigned*>(st.tile_s + nq * tile_len);
    st.buf_s = reinterpret_cast<float*>(st.tile_i + nq * tile_len);
    st.buf_i = reinterpret_cast<unsigned*>(st.buf_s + nq * kp);
    return reinterpret_cast<unsigned char*>(st.buf_i + nq * kp);
}

// Bytes r2_stream_carve uses.
__host__ __device__ __forceinline__ unsigned r2_stream_bytes(unsigned nq, unsigned kp, unsigned tile_len) {
    return nq * (2 * kp + tile_len) * 8;
}

__device__ __forceinline__ void r2_stream_init(const R2Stream& st) {
    if (threadIdx.x < 3 * R2_TOPK_MAXQ) st.cnt[threadIdx.x] = 0;
    r2_topk_fill(st.run_s, st.run_i, st.kp, st.nq, st.kp);  // ends with a barrier
}

// Entry e of list q's tile number `tile` is (s, i); i == R2_PAD_INDEX marks a dead entry.
__device__ __forceinline__ void r2_stream_offer(const R2Stream& st, unsigned tile, unsigned q, unsigned e,
                                                float s, unsigned i) {
    st.tile_s[q * st.tile_len + e] = s;
    st.tile_i[q * st.tile_len + e] = i;
    if (i != R2_PAD_INDEX && r2_beats_worst(st.run_s + q * st.kp, st.run_i + q * st.kp, st.kp, s, i)) {
        const unsigned slot = atomicAdd(&st.cnt[(tile % 3) * R2_TOPK_MAXQ + q], 1u);
        if (slot < st.kp) {
            st.buf_s[q * st.kp + slot] = s;
            st.buf_i[q * st.kp + slot] = i;
        }
    }
}

// Absorbs tile number `tile` into the running lists. Called by all threads.
__device__ __forceinline__ void r2_stream_flush(const R2Stream& st, unsigned tile) {
    __syncthreads();  // tile, buf and counters complete
    const unsigned* c = st.cnt + (tile % 3) * R2_TOPK_MAXQ;
    unsigned small = 0, full = 0;
    for (unsigned q = 0; q < st.nq; ++q) {
        const unsigned h = c[q];
        if (h > st.kp) full |= 1u << q;
        else if (h > 0) small |= 1u << q;
    }
    if (threadIdx.x < R2_TOPK_MAXQ) st.cnt[((tile + 2) % 3) * R2_TOPK_MAXQ + threadIdx.x] = 0;
    if (small) {
        for (unsigned t = threadIdx.x; t < st.nq * st.kp; t += blockDim.x) {
            const unsigned q = t / st.kp, e = t % st.kp;
            if (((small >> q) & 1u) && e >= c[q]) {
                st.buf_s[t] = -R2_INF;
                st.buf_i[t] = R2_PAD_INDEX;
            }
        }
        __syncthreads();
        r2_block_sort(st.buf_s, st.buf_i, st.kp, st.nq, st.kp, small);
        r2_block_merge(st.run_s, st.run_i, st.kp, st.buf_s, st.buf_i, st.kp, st.kp, st.nq, small);
    }
    if (full) {
        r2_block_sort(st.tile_s, st.tile_i, st.tile_len, st.nq, st.tile_len, full);
        r2_block_merge(st.run_s, st.run_i, st.kp, st.tile_s, st.tile_i, st.tile_len, st.kp, st.nq, full);
    }
}

// NaN policy "rank last" (dissonance_topk, topk_rows): the key of a NaN is -inf, so NaN
// entries rank after every number, and among -inf/NaN entries by index.
__device__ __forceinline__ float r2_nan_last(float v) { return v != v ? -R2_INF : v; }

// Streams L entries through the single list of `st`: produce(t, t0) must r2_stream_offer
// every entry t0 .. t0 + tile_len - 1 of tile t (padding past L). The result is
// st.run_i[0 .. kp). Called by all threads.
template <class Produce>
__device__ __forceinline__ void r2_stream_topk(const R2Stream& st, unsigned L, Produce produce) {
    r2_stream_init(st);
    unsigned t = 0;
    for (unsigned t0 = 0; t0 < L; t0 += st.tile_len, ++t) {
        produce(t, t0);
        r2_stream_flush(st, t);
    }
}

// ---- One warp per row: short rows, small k -------------------------------------------
//
// (s, i) as one u64 whose unsigned order is r2_better's: larger s first, then the lower i.
// -0 and +0 compare equal, as in r2_better; s must not be NaN (pass r2_nan_last keys). Every
// real entry maps above 0, and none to ~0 (that would be a NaN).
__device__ __forceinline__ unsigned long long r2_rank_key(float s, unsigned i) {
    if (s == 0.f) s = 0.f;
    unsigned u = __float_as_uint(s);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (unsigned long long)(~i);
}

// The top-k (best first, ties to the lower index) of entries 0 .. L - 1, L <= 32 * SLOTS and
// k <= L, by ONE warp (all 32 lanes call it), with no shared memory and no block barrier:
// lane l holds the rank keys of entries l, l + 32, ... in registers; round j takes the best
// key below round j - 1's (the rank keys are distinct, so no entry is taken twice) by a
// 5-step shuffle reduction. key(i) is entry i's key (NaN-free); lane j % 32 calls emit(j, i)
// with the j-th best index. Cost: k rounds of SLOTS compares and 5 shuffles.
template <unsigned SLOTS, class Key, class Emit>
__device__ __forceinline__ void r2_warp_topk(unsigned L, unsigned k, Key key, Emit emit) {
    const unsigned lane = threadIdx.x & 31u;
    unsigned long long rk[SLOTS];
#pragma unroll
    for (unsigned s = 0; s < SLOTS; ++s) {
        const unsigned i = lane + 32 * s;
        rk[s] = i < L ? r2_rank_key(key(i), i) : 0ull;
    }
    unsigned long long prev = ~0ull;
    for (unsigned j = 0; j < k; ++j) {
        unsigned long long best = 0ull;
#pragma unroll
        for (unsigned s = 0; s < SLOTS; ++s)
            if (rk[s] < prev && rk[s] > best) best = rk[s];
        for (int o = 16; o > 0; o >>= 1) {
            const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
            best = other > best ? other : best;
        }
        if (lane == (j & 31u)) emit(j, ~(unsigned)(best & 0xffffffffull));
        prev = best;
    }
}
