// Emulated launchers for kernels/dissonance_topk.cu (one extern "C" host function per kernel
// entry). Called from src/cap/emu.rs with the plan from src/cap/kernel.rs.
#include "../dissonance_topk.cu"

#define R2EMU_CAP_DIS(SUFFIX, T)                                                                          \
    extern "C" int r2emu_dissonance_topk_##SUFFIX(r2emu::Plan pl, const T* p, const T* ctx,               \
                                                  const float* mask, unsigned has_mask, unsigned anchor,  \
                                                  unsigned L, unsigned La, unsigned D, unsigned k,        \
                                                  unsigned kp, unsigned tile, float* delta, unsigned* idx, \
                                                  float* nmask) {                                          \
        return r2emu::launch(pl, [=] {                                                                    \
            dissonance_topk_##SUFFIX(p, ctx, mask, has_mask, anchor, L, La, D, k, kp, tile, delta, idx,   \
                                     nmask);                                                               \
        });                                                                                               \
    }

R2EMU_CAP_DIS(f32, float)
R2EMU_CAP_DIS(f16, __half)
R2EMU_CAP_DIS(bf16, __nv_bfloat16)

extern "C" int r2emu_topk_rows_f32(r2emu::Plan pl, const float* scores, unsigned L, unsigned k,
                                   unsigned kp, unsigned tile, float* vals, unsigned* idx) {
    return r2emu::launch(pl, [=] { topk_rows_f32(scores, L, k, kp, tile, vals, idx); });
}
