// The emulated dissonance_topk: kernels/dissonance_topk.cu compiled for the host; its entry points register
// themselves with the emulator (R2_ENTRY in common.cuh).
#include "../dissonance_topk.cu"
