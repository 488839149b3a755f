// common.cuh: included first by every kernels/<name>.cu.
//
// Under nvcc (__CUDACC__) it pulls in the CUDA half/bfloat16 headers; under the host
// compiler (feature `emulate`) it pulls in emu/cuda_emu.h, the CPU shim of the CUDA
// execution model. Kernels use only what both sides provide (see kernels/README.md).
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
// Dynamic shared memory: `R2_DYN_SMEM(float, smem);` declares `float* smem`.
#define R2_DYN_SMEM(T, name)                                   \
    extern __shared__ __align__(16) unsigned char r2_dyn_smem_[]; \
    T* name = reinterpret_cast<T*>(r2_dyn_smem_)
#else
#include "emu/cuda_emu.h"
#define R2_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(R2_EMU_DYN_SMEM_PTR)
#endif

#ifndef R2_INF
#define R2_INF __int_as_float(0x7f800000)
#endif

// Storage-type conversions: do all arithmetic in f32.
__device__ __forceinline__ float r2_to_f32(float x) { return x; }
__device__ __forceinline__ float r2_to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float r2_to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T r2_from_f32(float x);
template <>
__device__ __forceinline__ float r2_from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half r2_from_f32<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 r2_from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Full-warp sum (every lane gets the total).
__device__ __forceinline__ float r2_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Error flag protocol: err[0] != 0 after a kernel means it hit an error; the first
// thread to set it stores two u32 details in err[1], err[2] (e.g. query and row).
__device__ __forceinline__ void r2_report(unsigned* err, unsigned code, unsigned a, unsigned b) {
    if (atomicCAS(err, 0u, code) == 0u) {
        atomicExch(err + 1, a);
        atomicExch(err + 2, b);
    }
}
