// Emulated launchers for kernels/gather_inject.cu (one extern "C" host function per kernel
// entry). Called from src/cap/emu.rs with the plan from src/cap/kernel.rs.
#include "../gather_inject.cu"

#define R2EMU_CAP_INJ(SUFFIX, T)                                                                          \
    extern "C" int r2emu_gather_inject_fwd_##SUFFIX(r2emu::Plan pl, const T* h, const T* src,             \
                                                    const unsigned* noise, const unsigned* sal,           \
                                                    unsigned B, unsigned L, unsigned Ls, unsigned D,      \
                                                    unsigned k, T* out) {                                 \
        return r2emu::launch(pl, [=] { gather_inject_fwd_##SUFFIX(h, src, noise, sal, B, L, Ls, D, k, out); }); \
    }                                                                                                     \
    extern "C" int r2emu_gather_inject_zero_##SUFFIX(r2emu::Plan pl, const T* grad, const unsigned* noise, \
                                                     unsigned B, unsigned L, unsigned D, unsigned k,       \
                                                     T* out) {                                            \
        return r2emu::launch(pl, [=] { gather_inject_zero_##SUFFIX(grad, noise, B, L, D, k, out); });     \
    }                                                                                                     \
    extern "C" int r2emu_gather_inject_scatter_##SUFFIX(r2emu::Plan pl, const T* grad,                    \
                                                        const unsigned* noise, const unsigned* sal,       \
                                                        unsigned B, unsigned L, unsigned Ls, unsigned D,  \
                                                        unsigned k, T* out) {                             \
        return r2emu::launch(pl, [=] {                                                                    \
            gather_inject_scatter_##SUFFIX(grad, noise, sal, B, L, Ls, D, k, out);                        \
        });                                                                                               \
    }

R2EMU_CAP_INJ(f32, float)
R2EMU_CAP_INJ(f16, __half)
R2EMU_CAP_INJ(bf16, __nv_bfloat16)
