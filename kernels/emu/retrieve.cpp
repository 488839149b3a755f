// Emulated launchers for kernels/cosine_topk.cu (one extern "C" host function per
// kernel entry). Called from src/emu.rs with the plan from src/retrieve/kernel.rs.
#include "../cosine_topk.cu"

#define R2EMU_PARTIAL(SUFFIX, T)                                                                     \
    extern "C" int r2emu_cosine_topk_partial_##SUFFIX(                                               \
        r2emu::Plan p, const float* q, const T* keys, const float* kn, const unsigned* excl,         \
        unsigned B, unsigned M, unsigned D, unsigned qb, unsigned kp, unsigned chunk_rows,           \
        float* cand_s, unsigned* cand_i, unsigned* err) {                                            \
        return r2emu::launch(p, [=] {                                                                \
            cosine_topk_partial_##SUFFIX(q, keys, kn, excl, B, M, D, qb, kp, chunk_rows, cand_s,     \
                                         cand_i, err);                                               \
        });                                                                                          \
    }

R2EMU_PARTIAL(f32, float)
R2EMU_PARTIAL(f16, __half)
R2EMU_PARTIAL(bf16, __nv_bfloat16)

extern "C" int r2emu_cosine_topk_merge(r2emu::Plan p, const float* cand_s, const unsigned* cand_i,
                                       unsigned ncand, unsigned kp, unsigned n, float* out_s,
                                       unsigned* out_i) {
    return r2emu::launch(p, [=] { cosine_topk_merge(cand_s, cand_i, ncand, kp, n, out_s, out_i); });
}
