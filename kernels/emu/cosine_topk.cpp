// The emulated cosine_topk: kernels/cosine_topk.cu compiled for the host; its entry points register
// themselves with the emulator (R2_ENTRY in common.cuh).
#include "../cosine_topk.cu"
