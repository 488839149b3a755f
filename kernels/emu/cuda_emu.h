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
// - Atomics use std::atomic_ref; __threadfence* are sequentially consistent fences.
// - __half / __nv_bfloat16 are 16-bit storage types with round-to-nearest-even
//   conversions; kernels convert explicitly (r2_to_f32 / r2_from_f32 in common.cuh).
// - Launches are serialised process-wide (static shared memory is a process global).
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
};

inline thread_local dim3 tl_thread_idx;
inline thread_local dim3 tl_block_idx;
inline thread_local dim3 tl_block_dim;
inline thread_local dim3 tl_grid_dim;
inline thread_local BlockCtx* tl_ctx = nullptr;
inline thread_local unsigned tl_warp = 0;
inline thread_local unsigned tl_lane = 0;

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
    const size_t smem = p.smem_bytes ? p.smem_bytes : 16;
    std::unique_ptr<unsigned char[]> dyn(new (std::align_val_t(64)) unsigned char[smem]);
    BlockCtx ctx{&block_barrier, warp_barriers.get(), slots.data(), dyn.get()};
    const dim3 bdim(p.block[0], p.block[1], p.block[2]);
    const dim3 gdim(p.grid[0], p.grid[1], p.grid[2]);
    auto worker = [&](unsigned t) {
        tl_ctx = &ctx;
        tl_block_dim = bdim;
        tl_grid_dim = gdim;
        tl_thread_idx = dim3(t % bdim.x, (t / bdim.x) % bdim.y, t / (bdim.x * bdim.y));
        tl_warp = t / 32;
        tl_lane = t % 32;
        for (unsigned z = 0; z < gdim.z; ++z)
            for (unsigned y = 0; y < gdim.y; ++y)
                for (unsigned x = 0; x < gdim.x; ++x) {
                    tl_block_idx = dim3(x, y, z);
                    if (t == 0) std::memset(ctx.dyn_smem, 0xFF, smem);
                    block_barrier.wait();
                    body();
                    block_barrier.wait();
                }
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
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

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
