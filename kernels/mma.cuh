// mma.cuh: the warp matrix instructions of sm_80+ in inline PTX (the tensor-core path,
// cosine_topk_tc.cuh), as CUTLASS 2.x and FlashAttention-2 issue them: ldmatrix loads the
// operand fragments from shared memory, mma.sync multiplies them with f32 accumulation.
// Under the emulator each is the instruction of the same name in emu/cuda_emu.h (section
// "Warp matrix instructions"), with the fragment layouts of the PTX ISA.
//
// Fragments (g = lane >> 2, t = lane % 4; 16-bit registers hold two elements, low half first):
//   m16n8k16 bf16/f16: A 16 x 16 row-major in 4 registers, B 16 x 8 ("col": one key row per
//   n) in 2, D 16 x 8 f32 in 4: d_i at row g + 8 (i >> 1), column 2t + (i & 1).
//   m16n8k8 tf32: A 16 x 8 in 4 registers, B 8 x 8 in 2, D as above.
// r2_ldmatrix_x4 with lane l pointing at row l % 8 of matrix l / 8 gives, for A stored
// row-major (rows = M, 16-byte row pieces), matrices (rows 0-7, bytes 0-15), (8-15, 0-15),
// (0-7, 16-31), (8-15, 16-31) the A registers of both shapes; for B stored one row per n,
// matrices (n 0-7, bytes 0-15), (n 0-7, bytes 16-31) are one n-tile's two B registers.
#pragma once
#include "common.cuh"

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8 x 8 matrices of 16-bit elements (row
// addresses 16-byte aligned); register j of lane l holds row l / 4, elements 2 (l % 4) and
// 2 (l % 4) + 1 of matrix j. The memory clobber keeps it after the barrier that publishes
// the stage it reads.
__device__ __forceinline__ void r2_ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
#ifdef __CUDACC__
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
#else
    ::r2emu::ldmatrix_x4(r, addr);
#endif
}

// d += a b: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (or .f16).
__device__ __forceinline__ void r2_mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                       __nv_bfloat16) {
#ifdef __CUDACC__
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    ::r2emu::mma_16x8(d, a, b, ::r2emu::MmaType::bf16);
#endif
}
__device__ __forceinline__ void r2_mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], __half) {
#ifdef __CUDACC__
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    ::r2emu::mma_16x8(d, a, b, ::r2emu::MmaType::f16);
#endif
}
// f32 operands are tf32: mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (registers hold
// f32 bits, rounded beforehand with r2_tf32_rna; the low 13 bits are ignored).
__device__ __forceinline__ void r2_mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], float) {
#ifdef __CUDACC__
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    ::r2emu::mma_16x8(d, a, b, ::r2emu::MmaType::tf32);
#endif
}

// cvt.rna.tf32.f32: x rounded to tf32 (nearest, ties away from zero), as f32 bits.
__device__ __forceinline__ unsigned r2_tf32_rna(float x) {
#ifdef __CUDACC__
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
#else
    return ::r2emu::cvt_rna_tf32(x);
#endif
}
