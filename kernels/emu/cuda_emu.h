// cuda_emu.h: a small host implementation of the CUDA execution model, so the same
// kernels/*.cu sources compile with g++ and run on CPU threads in the tests.
//
// Test infrastructure only (feature `emulate`); never part of the library API.
//
// Model:
// - A launch runs the grid's blocks ONE AFTER ANOTHER (x fastest, then y, then z).
// - Each block runs with one OS thread per CUDA thread. The same threads are reused
//   for every block of the launch (a per-launch pool); an internal barrier separates
//   blocks, so static __shared__ memory (a function-local `static`) is reused safely.
// - threadIdx/blockIdx/blockDim/gridDim are thread-locals; warpSize is 32; the warp of a
//   thread is its linear thread id / 32 (x fastest), as on hardware.
// - __syncthreads() is a real barrier of all the block's threads: a missing one shows up
//   as a wrong result or as a ThreadSanitizer race.
// - Warp intrinsics (__shfl_sync, __shfl_xor_sync, __shfl_down_sync, __shfl_up_sync,
//   __ballot_sync, __any_sync, __all_sync, __syncwarp) require the FULL warp
//   (mask 0xffffffff, all 32 lanes calling): each exchanges through a per-warp slot array
//   between two warp barriers. Block sizes must be a multiple of 32.
// - Dynamic shared memory comes from R2_DYN_SMEM (kernels/common.cuh), filled with 0xFF
//   bytes (f32 NaN, u32 0xffffffff) before every block, so reading it uninitialised shows.
// - Atomics use std::atomic_ref; __threadfence* are sequentially consistent fences (no-ops
//   under ThreadSanitizer, which does not model fences: see __threadfence).
// - __half / __nv_bfloat16 are 16-bit storage types with round-to-nearest-even
//   conversions; kernels convert explicitly (r2_to_f32 / r2_from_f32 in common.cuh).
// - Launches are serialised process-wide (static shared memory is a process global).
// - Vector types, block votes and asynchronous copies: see "Vector types, block votes and
//   asynchronous copies" below (float4/uint4/..., __syncthreads_or/and/count, the
//   __pipeline_* primitives of cp.async).
// - Warp matrix instructions (ldmatrix, mma.sync, cvt.rna.tf32.f32, as kernels/mma.cuh issues
//   them in inline PTX) are emulated in their own section at the end of this file, with the
//   fragment layouts of the PTX ISA (see its header); cp.async is the one implementation above.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace r2emu {

// Reusable barrier (sense by generation) on C++20 atomic wait/notify. Its acquire/release
// edges are what ThreadSanitizer sees as __syncthreads' happens-before.
class Barrier {
public:
    explicit Barrier(unsigned expected = 1) : expected_(expected) {}
    void wait() {
        const unsigned gen = generation_.load(std::memory_order_acquire);
        if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == expected_) {
            count_.store(0, std::memory_order_relaxed);
            generation_.fetch_add(1, std::memory_order_acq_rel);
            generation_.notify_all();
        } else {
            unsigned g = gen;
            while (g == gen) {
                generation_.wait(gen, std::memory_order_acquire);
                g = generation_.load(std::memory_order_acquire);
            }
        }
    }

private:
    unsigned expected_;
    std::atomic<unsigned> count_{0};
    std::atomic<unsigned> generation_{0};
};

struct BlockCtx {
    Barrier* block_barrier;
    Barrier* warp_barriers;   // one per warp
    uint64_t* warp_slots;     // 32 per warp
    unsigned char* dyn_smem;
    std::atomic<int>* votes;  // 3 rotating counters of __syncthreads_count/or/and
    uint32_t* mma_slots;      // kMmaSlotWords per warp (the warp matrix section)
    size_t dyn_smem_bytes;    // size of dyn_smem (shared-memory addresses are offsets into it)
};

// One warp-collective matrix instruction's operands: 2 parities x 32 lanes x 8 words.
inline constexpr unsigned kMmaLaneWords = 8;
inline constexpr unsigned kMmaSlotWords = 2 * 32 * kMmaLaneWords;

// One asynchronous copy (__pipeline_memcpy_async) issued and not yet waited for.
struct AsyncCopy {
    unsigned char* dst;
    const unsigned char* src;
    unsigned bytes;   // copied from src
    unsigned zeros;   // then zero-filled
    uint64_t batch;   // commits issued before it
};

inline thread_local dim3 tl_thread_idx;
inline thread_local dim3 tl_block_idx;
inline thread_local dim3 tl_block_dim;
inline thread_local dim3 tl_grid_dim;
inline thread_local BlockCtx* tl_ctx = nullptr;
inline thread_local unsigned tl_warp = 0;
inline thread_local unsigned tl_lane = 0;
inline thread_local unsigned tl_vote_phase = 0;       // calls of __syncthreads_count & co.
inline thread_local uint64_t tl_commits = 0;          // __pipeline_commit calls this block
inline thread_local unsigned tl_mma_phase = 0;        // warp matrix instructions this block
inline thread_local std::vector<AsyncCopy>* tl_copies = nullptr;  // pending, issue order

inline std::mutex& launch_mutex() {
    static std::mutex m;
    return m;
}

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s\n", what);
    std::abort();
}

inline void check_full_mask(unsigned mask) {
    if (mask != 0xffffffffu) fail("warp intrinsics need the full mask 0xffffffff");
}

inline void warp_sync() { tl_ctx->warp_barriers[tl_warp].wait(); }

// Every lane publishes `v`, then reads lane `src`'s value (src == own lane: unchanged).
template <class T>
inline T warp_exchange(T v, unsigned src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
    uint64_t* slots = tl_ctx->warp_slots + 32 * tl_warp;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    slots[tl_lane] = bits;
    warp_sync();
    uint64_t got = slots[src];
    warp_sync();
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

// Plan as passed over FFI from Rust (src/kernel/emu.rs).
struct Plan {
    unsigned grid[3];
    unsigned block[3];
    unsigned smem_bytes;
};

// Runs `body` (which calls the kernel) for every thread of every block of `p`.
// Returns 0, or a nonzero code when the plan cannot be emulated.
template <class F>
int launch(const Plan& p, F body) noexcept {
    const unsigned nt = p.block[0] * p.block[1] * p.block[2];
    if (nt == 0 || nt % 32 != 0 || nt > 1024) return 2;
    if (p.grid[0] == 0 || p.grid[1] == 0 || p.grid[2] == 0) return 3;
    std::lock_guard<std::mutex> lock(launch_mutex());
    const unsigned nwarps = nt / 32;
    Barrier block_barrier(nt);
    std::unique_ptr<Barrier[]> warp_barriers(new Barrier[nwarps]);
    for (unsigned w = 0; w < nwarps; ++w) new (&warp_barriers[w]) Barrier(32);
    std::vector<uint64_t> slots(32 * nwarps, 0);
    std::vector<uint32_t> mma(kMmaSlotWords * nwarps, 0u);
    const size_t smem = p.smem_bytes ? p.smem_bytes : 16;
    std::unique_ptr<unsigned char[]> dyn(new (std::align_val_t(64)) unsigned char[smem]);
    std::atomic<int> votes[3];
    BlockCtx ctx{&block_barrier, warp_barriers.get(), slots.data(), dyn.get(), votes, mma.data(), smem};
    const dim3 bdim(p.block[0], p.block[1], p.block[2]);
    const dim3 gdim(p.grid[0], p.grid[1], p.grid[2]);
    auto worker = [&](unsigned t) {
        tl_ctx = &ctx;
        tl_block_dim = bdim;
        tl_grid_dim = gdim;
        tl_thread_idx = dim3(t % bdim.x, (t / bdim.x) % bdim.y, t / (bdim.x * bdim.y));
        tl_warp = t / 32;
        tl_lane = t % 32;
        std::vector<AsyncCopy> copies;
        tl_copies = &copies;
        for (unsigned z = 0; z < gdim.z; ++z)
            for (unsigned y = 0; y < gdim.y; ++y)
                for (unsigned x = 0; x < gdim.x; ++x) {
                    tl_block_idx = dim3(x, y, z);
                    tl_commits = 0;
                    tl_vote_phase = 0;
                    tl_mma_phase = 0;
                    if (t == 0) {
                        std::memset(ctx.dyn_smem, 0xFF, smem);
                        for (auto& v : votes) v.store(0, std::memory_order_relaxed);
                    }
                    block_barrier.wait();
                    body();
                    // On hardware a copy still in flight at exit would land in the next
                    // block's shared memory: every kernel waits for its copies before it ends.
                    if (!copies.empty())
                        fail("a thread ended its block with cp.async copies it never waited for");
                    block_barrier.wait();
                }
        tl_copies = nullptr;
        tl_ctx = nullptr;
    };
    std::vector<std::thread> threads;
    threads.reserve(nt);
    try {
        for (unsigned t = 1; t < nt; ++t) threads.emplace_back(worker, t);
    } catch (...) {
        fail("could not start the block's threads");
    }
    worker(0);
    for (auto& th : threads) th.join();
    ::operator delete[](dyn.release(), std::align_val_t(64));
    return 0;
}

// ---- Entry registry ------------------------------------------------------------------
// Each kernels/emu/<op>.cpp registers its entry points with R2EMU_ENTRY(kernel, Args) (through
// R2_ENTRY); r2emu_launch (kernels/emu/launch.cpp) finds them by name for the Rust launcher
// (src/kernel/emu.rs). build.rs compiles every emu/*.cpp as one translation unit, so the
// registrars live in the object the linker keeps for r2emu_launch.
using Entry = int (*)(const Plan& p, const void* args);
struct Registered {
    const char* name;
    Entry run;
    size_t args_size;
};
inline std::vector<Registered>& registry() {
    static std::vector<Registered> r;
    return r;
}
struct Registrar {
    Registrar(const char* name, Entry run, size_t args_size) { registry().push_back({name, run, args_size}); }
};

inline uint16_t f32_to_f16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) return sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
    if (abs < 0x38800000u) {                       // subnormal half or zero
        if (abs < 0x33000000u) return sign;         // < 2^-25: rounds to 0
        const uint32_t e = abs >> 23;
        const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;  // 14 + (113 - e) - 1 ... gives m >> (shift)
        uint32_t h = m >> (shift);
        const uint32_t rem = m & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) ++h;
        return sign | h;
    }
    uint32_t h = ((abs - 0x38000000u) >> 13);
    const uint32_t rem = abs & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
    return sign | h;
}

inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1f;
    uint32_t m = h & 0x3ff;
    uint32_t x;
    if (e == 0) {
        if (m == 0) {
            x = sign;
        } else {  // subnormal: normalise
            int ee = -1;
            do {
                ++ee;
                m <<= 1;
            } while ((m & 0x400) == 0);
            x = sign | ((uint32_t)(112 - ee) << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

inline uint16_t f32_to_bf16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

inline float bf16_bits_to_f32(uint16_t b) {
    uint32_t x = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

}  // namespace r2emu

// Registers `KERNEL` (an entry point taking `ARGS` by value) under its own name.
#define R2EMU_ENTRY(KERNEL, ARGS)                                                         \
    static int r2emu_run_##KERNEL(const r2emu::Plan& p, const void* a) {                  \
        const ARGS args = *static_cast<const ARGS*>(a);                                   \
        return r2emu::launch(p, [=] { KERNEL(args); });                                   \
    }                                                                                     \
    static const r2emu::Registrar r2emu_registrar_##KERNEL(#KERNEL, r2emu_run_##KERNEL, sizeof(ARGS));

// ---- CUDA names ----------------------------------------------------------------------
#define threadIdx (::r2emu::tl_thread_idx)
#define blockIdx (::r2emu::tl_block_idx)
#define blockDim (::r2emu::tl_block_dim)
#define gridDim (::r2emu::tl_grid_dim)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// Dynamic shared memory of the running block (see R2_DYN_SMEM in common.cuh).
#define R2_EMU_DYN_SMEM_PTR (::r2emu::tl_ctx->dyn_smem)

inline void __syncthreads() { ::r2emu::tl_ctx->block_barrier->wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::r2emu::check_full_mask(mask);
    ::r2emu::warp_sync();
}
inline unsigned __activemask() { return 0xffffffffu; }
#ifdef __SANITIZE_THREAD__
// ThreadSanitizer does not model standalone fences (gcc warns, -Wtsan): it checks as if they
// were absent, so they are left out under it. Cross-thread order then comes only from what it
// does model (the atomics, the barriers, the block hand-off), which is the stricter check.
inline void __threadfence() {}
inline void __threadfence_block() {}
#else
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
#endif

// Every shuffle: lane `src(lane)` of the warp's value (a lane outside the width group reads
// its own value, as on the device).
template <class T, class Src>
inline T r2emu_shfl(unsigned mask, T v, Src src) {
    ::r2emu::check_full_mask(mask);
    return ::r2emu::warp_exchange(v, src(::r2emu::tl_lane));
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    const unsigned w = (unsigned)width;
    return r2emu_shfl(mask, v, [=](unsigned l) { return (l & ~(w - 1)) + ((unsigned)src & (w - 1)); });
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const unsigned w = (unsigned)width;
    return r2emu_shfl(mask, v, [=](unsigned l) {
        const unsigned s = l ^ (unsigned)lane_mask;
        return s / w != l / w || s >= 32 ? l : s;
    });
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const unsigned w = (unsigned)width;
    return r2emu_shfl(mask, v, [=](unsigned l) { return (l & (w - 1)) + delta < w ? l + delta : l; });
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const unsigned w = (unsigned)width;
    return r2emu_shfl(mask, v, [=](unsigned l) { return (l & (w - 1)) >= delta ? l - delta : l; });
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    ::r2emu::check_full_mask(mask);
    uint64_t* slots = ::r2emu::tl_ctx->warp_slots + 32 * ::r2emu::tl_warp;
    slots[::r2emu::tl_lane] = pred ? 1 : 0;
    ::r2emu::warp_sync();
    unsigned b = 0;
    for (unsigned l = 0; l < 32; ++l) b |= (unsigned)(slots[l] & 1u) << l;
    ::r2emu::warp_sync();
    return b;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }

// Atomics (device-wide and shared memory alike).
template <class T>
inline T atomicAdd(T* a, T v) { return std::atomic_ref<T>(*a).fetch_add(v); }
template <class T>
inline T atomicSub(T* a, T v) { return std::atomic_ref<T>(*a).fetch_sub(v); }
template <class T>
inline T atomicExch(T* a, T v) { return std::atomic_ref<T>(*a).exchange(v); }
template <class T>
inline T atomicOr(T* a, T v) { return std::atomic_ref<T>(*a).fetch_or(v); }
template <class T>
inline T atomicAnd(T* a, T v) { return std::atomic_ref<T>(*a).fetch_and(v); }
template <class T>
inline T atomicCAS(T* a, T expected, T desired) {
    std::atomic_ref<T>(*a).compare_exchange_strong(expected, desired);
    return expected;  // the old value either way
}
// Stores v while better(v, current) holds; returns the old value, as CUDA's atomicMax/Min.
template <class T, class Better>
inline T r2emu_atomic_improve(T* a, T v, Better better) {
    std::atomic_ref<T> r(*a);
    T old = r.load();
    while (better(v, old) && !r.compare_exchange_weak(old, v)) {
    }
    return old;
}
template <class T>
inline T atomicMax(T* a, T v) { return r2emu_atomic_improve(a, v, [](T x, T y) { return y < x; }); }
template <class T>
inline T atomicMin(T* a, T v) { return r2emu_atomic_improve(a, v, [](T x, T y) { return x < y; }); }

template <class T>
inline T __ldg(const T* p) { return *p; }

// 16-bit float storage types (conversions only; do arithmetic in f32).
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __half2float(__half h) { return ::r2emu::f16_bits_to_f32(h.bits); }
inline __half __float2half(float f) { return __half{::r2emu::f32_to_f16_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::r2emu::bf16_bits_to_f32(b.bits); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{::r2emu::f32_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }

// Device math and bit helpers.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
using std::isinf;
using std::isnan;
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }

// ---- Vector types, block votes and asynchronous copies -------------------------------------
// (Added for the bandwidth-first cosine_topk and the CAP kernels.)
//
// - float2/float4/uint2/uint4 with CUDA's alignment (8 or 16 bytes) and make_* constructors;
//   the bit casts __ushort_as_half, __half_as_ushort, __ushort_as_bfloat16, __bfloat16_as_ushort.
//   Kernels load 16 bytes through r2_load16 (common.cuh), which uses memcpy here,
//   so no pointer is read through a type it does not hold.
// - __syncthreads_count/_or/_and: a real block barrier whose result is the count (any, all)
//   of the threads' predicates. Three rotating counters: call k adds to counter k % 3 before
//   the barrier and reads it after; thread 0 clears counter (k + 1) % 3 before the barrier,
//   whose last readers (call k - 2) all passed call k - 1's barrier, and whose next writers
//   (call k + 1) start after call k's barrier. Every thread of the block must call them in the
//   same order (as on hardware).
// - __pipeline_memcpy_async / __pipeline_commit / __pipeline_wait_prior (cuda_pipeline_primitives.h,
//   cp.async on sm_80+): the copy is owned by the issuing thread. At issue the destination is
//   filled with 0xFF bytes (NaN as f32): until the wait that covers it, a copy's destination
//   holds no defined value on hardware either, so reading it early, or overwriting a buffer
//   other threads still read, shows as a wrong result (and, without a barrier, as a
//   ThreadSanitizer race). __pipeline_wait_prior(N) performs every copy of the batches older
//   than the N most recent commits: `size - zfill` bytes from the source, then `zfill` zero
//   bytes. As on hardware, other threads see the data only after a barrier following the wait.
//   A thread that ends its block with copies never waited for (committed or not) aborts the
//   launch. One implementation serves both cp.async users (cosine_topk.cu and
//   cosine_topk_tc.cuh): zero fill, and the 0xFF fill at every issue (not only the first use
//   of a buffer), catch more than performing the copies at the wait alone.
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

namespace r2emu {
inline int block_vote(int pred) {
    BlockCtx* c = tl_ctx;
    const unsigned k = tl_vote_phase++;
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0)
        c->votes[(k + 1) % 3].store(0, std::memory_order_relaxed);
    if (pred) c->votes[k % 3].fetch_add(1, std::memory_order_relaxed);
    c->block_barrier->wait();
    return c->votes[k % 3].load(std::memory_order_relaxed);
}

inline void complete_copy(const AsyncCopy& cp) {
    std::memcpy(cp.dst, cp.src, cp.bytes);
    std::memset(cp.dst + cp.bytes, 0, cp.zeros);
}
}  // namespace r2emu

// Bit casts of the 16-bit storage types (as cuda_fp16.h / cuda_bf16.h).
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

inline int __syncthreads_count(int pred) { return ::r2emu::block_vote(pred); }
inline int __syncthreads_or(int pred) { return ::r2emu::block_vote(pred) != 0; }
inline int __syncthreads_and(int pred) {
    return ::r2emu::block_vote(pred) == (int)(blockDim.x * blockDim.y * blockDim.z);
}

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, size_t size_and_align,
                                    size_t zfill = 0) {
    if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16)
        ::r2emu::fail("__pipeline_memcpy_async: size must be 4, 8 or 16 bytes");
    if (zfill > size_and_align) ::r2emu::fail("__pipeline_memcpy_async: zfill exceeds the size");
    const uintptr_t d = reinterpret_cast<uintptr_t>(dst_shared), s = reinterpret_cast<uintptr_t>(src_global);
    if ((d | s) & (size_and_align - 1)) ::r2emu::fail("__pipeline_memcpy_async: misaligned address");
    auto* dst = static_cast<unsigned char*>(dst_shared);
    std::memset(dst, 0xFF, size_and_align);
    ::r2emu::tl_copies->push_back({dst, static_cast<const unsigned char*>(src_global),
                                   (unsigned)(size_and_align - zfill), (unsigned)zfill,
                                   ::r2emu::tl_commits});
}
inline void __pipeline_commit() { ++::r2emu::tl_commits; }
inline void __pipeline_wait_prior(size_t prior) {
    auto& q = *::r2emu::tl_copies;
    const uint64_t done_below = ::r2emu::tl_commits >= prior ? ::r2emu::tl_commits - prior : 0;
    size_t keep = 0;
    for (size_t i = 0; i < q.size(); ++i) {
        if (q[i].batch < done_below) ::r2emu::complete_copy(q[i]);
        else q[keep++] = q[i];
    }
    q.resize(keep);
}


// ==== Warp matrix instructions (ldmatrix, mma.sync, cvt.rna.tf32.f32) ===================
// What kernels/mma.cuh issues in inline PTX on the device, emulated with the fragment layouts
// of the PTX ISA (9.7.14.5.7 and 9.7.14.5.8, "Matrix Fragments for mma.m16n8k8" and
// "... mma.m16n8k16 with floating point type"; 9.7.9.x "ldmatrix"), and nothing else: any other
// shape or type is a compile error.
// - Shared-memory addresses are 32-bit offsets into the block's dynamic shared memory
//   (smem_offset / r2_smem_addr), as the device's .shared window is; an address outside it,
//   or a row address of ldmatrix that is not 16-byte aligned, aborts.
// - Each instruction is warp-collective: every lane publishes its operands (a row address, or
//   its A and B registers) in the warp's slot record of the current parity, passes ONE warp
//   barrier, and reads the other lanes' records. The parity alternates per instruction, so a
//   lane may publish instruction k + 1 while a slower lane still reads instruction k: that lane
//   finished reading instruction k - 1 (the other parity) before the barrier of instruction k.
//   Memory written by other warps still needs __syncthreads (ThreadSanitizer reports it).
// - groupID g = lane >> 2, threadID_in_group t = lane % 4; registers of 16-bit operands hold
//   two elements, the lower-numbered one in the low half.
//   ldmatrix .m8n8.x4.b16: lanes 8j .. 8j + 7 give the row addresses (16 bytes each) of matrix
//     j; register j of lane l receives elements (row g, columns 2t, 2t + 1) of matrix j.
//   m16n8k16 .bf16/.f16, A (16 x 16): a_i at row g + 8 ((i >> 1) & 1), column 2t + (i & 1) +
//     8 (i >> 2); B (16 x 8): b_i at row 2t + (i & 1) + 8 (i >> 1), column g.
//   m16n8k8 .tf32, A (16 x 8): a_i at row g + 8 (i & 1), column t + 4 (i >> 1); B (8 x 8): b_i
//     at row t + 4 i, column g.
//   C and D (16 x 8, f32, both shapes): c_i at row g + 8 (i >> 1), column 2t + (i & 1).
// - D = A B + C: products exact, each output c + sum_k a b evaluated in double and rounded to
//   f32 TOWARD ZERO (the tensor cores' truncating adder, the pessimistic side; the same model
//   the margin of docs/DESIGN.md "Tensor-core path" assumes). tf32 operands: only the top 19
//   bits of each register are read (the hardware ignores the low 13).
// - cvt.rna.tf32.f32 as ptxas 13.0 lowers it (FSETP, IADD, LOP3 in the SASS of sm_80 and
//   sm_90): a finite x becomes (bits + 0x1000) & ~0x1fff (nearest, ties away from zero, an
//   overflow to infinity), an infinity or NaN bits & ~0x1fff.
// - ld.relaxed.gpu (r2_load_relaxed in common.cuh): an atomic relaxed load.
namespace r2emu {

inline uint32_t f32_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    return x;
}

inline float bits_f32(uint32_t x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

// x rounded to f32 toward zero.
inline float f32_toward_zero(double x) {
    float f = static_cast<float>(x);
    if (std::isfinite(f) && std::fabs(static_cast<double>(f)) > std::fabs(x))
        f = std::nextafter(f, 0.0f);
    return f;
}

struct MmaCoord {
    unsigned row, col;
};

inline MmaCoord ldmatrix_src(unsigned lane, unsigned) { return {lane >> 2, 2 * (lane & 3)}; }
inline MmaCoord mma_a_m16n8k16(unsigned lane, unsigned i) {
    return {(lane >> 2) + 8 * ((i >> 1) & 1), 2 * (lane & 3) + (i & 1) + 8 * (i >> 2)};
}
inline MmaCoord mma_b_m16n8k16(unsigned lane, unsigned i) {
    return {2 * (lane & 3) + (i & 1) + 8 * (i >> 1), lane >> 2};
}
inline MmaCoord mma_a_m16n8k8_tf32(unsigned lane, unsigned i) {
    return {(lane >> 2) + 8 * (i & 1), (lane & 3) + 4 * (i >> 1)};
}
inline MmaCoord mma_b_m16n8k8_tf32(unsigned lane, unsigned i) { return {(lane & 3) + 4 * i, lane >> 2}; }
inline MmaCoord mma_c_m16n8(unsigned lane, unsigned i) {
    return {(lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)};
}

inline uint32_t smem_offset(const void* p) {
    const auto* c = static_cast<const unsigned char*>(p);
    if (c < tl_ctx->dyn_smem || c >= tl_ctx->dyn_smem + tl_ctx->dyn_smem_bytes)
        fail("shared-memory address outside the block's dynamic shared memory");
    return static_cast<uint32_t>(c - tl_ctx->dyn_smem);
}

inline const unsigned char* smem_at(uint32_t off, size_t bytes) {
    if (off > tl_ctx->dyn_smem_bytes || bytes > tl_ctx->dyn_smem_bytes - off)
        fail("shared-memory access outside the block's dynamic shared memory");
    return tl_ctx->dyn_smem + off;
}

// Publishes this lane's record, passes one warp barrier, returns the 32 records.
inline const uint32_t* mma_exchange(const uint32_t (&rec)[kMmaLaneWords]) {
    uint32_t* base = tl_ctx->mma_slots + kMmaSlotWords * tl_warp + (tl_mma_phase++ & 1u) * 32 * kMmaLaneWords;
    std::memcpy(base + tl_lane * kMmaLaneWords, rec, sizeof rec);
    warp_sync();
    return base;
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    if (addr % 16 != 0) fail("ldmatrix: a row address is not 16-byte aligned");
    uint32_t rec[kMmaLaneWords] = {addr};
    const uint32_t* all = mma_exchange(rec);
    for (unsigned j = 0; j < 4; ++j) {
        const MmaCoord e = ldmatrix_src(tl_lane, j);
        const uint32_t row_addr = all[(8 * j + e.row) * kMmaLaneWords];
        std::memcpy(&r[j], smem_at(row_addr + 2 * e.col, 4), 4);
    }
}

enum class MmaType { bf16, f16, tf32 };

// Element i of a register array of `type` (16-bit: two per register, low half first).
inline float mma_element(const uint32_t* regs, unsigned i, MmaType type) {
    if (type == MmaType::tf32) return bits_f32(regs[i] & 0xffffe000u);
    const uint16_t h = static_cast<uint16_t>(regs[i / 2] >> (16 * (i % 2)));
    return type == MmaType::bf16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
}

// d = a b + c for one m16n8k16 (16-bit types) or m16n8k8 (tf32) of the warp.
inline void mma_16x8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], MmaType type) {
    const bool tf32 = type == MmaType::tf32;
    const unsigned K = tf32 ? 8 : 16, na = tf32 ? 4 : 8, nb = tf32 ? 2 : 4;
    uint32_t rec[kMmaLaneWords] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    const uint32_t* all = mma_exchange(rec);
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const uint32_t* r = all + l * kMmaLaneWords;
        for (unsigned i = 0; i < na; ++i) {
            const MmaCoord e = tf32 ? mma_a_m16n8k8_tf32(l, i) : mma_a_m16n8k16(l, i);
            A[e.row][e.col] = mma_element(r, i, type);
        }
        for (unsigned i = 0; i < nb; ++i) {
            const MmaCoord e = tf32 ? mma_b_m16n8k8_tf32(l, i) : mma_b_m16n8k16(l, i);
            B[e.row][e.col] = mma_element(r + 4, i, type);
        }
    }
    for (unsigned i = 0; i < 4; ++i) {
        const MmaCoord e = mma_c_m16n8(tl_lane, i);
        double acc = d[i];
        for (unsigned k = 0; k < K; ++k) acc += static_cast<double>(A[e.row][k]) * static_cast<double>(B[k][e.col]);
        d[i] = f32_toward_zero(acc);
    }
}

inline uint32_t cvt_rna_tf32(float x) {
    const uint32_t u = f32_bits(x);
    return ((u & 0x7fffffffu) < 0x7f800000u ? u + 0x1000u : u) & 0xffffe000u;
}

inline unsigned load_relaxed(const unsigned* p) {
    return std::atomic_ref<unsigned>(*const_cast<unsigned*>(p)).load(std::memory_order_relaxed);
}

}  // namespace r2emu

// Correctly rounded reciprocal.
inline float __frcp_rn(float x) { return 1.0f / x; }
