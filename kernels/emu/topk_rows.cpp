// The emulated topk_rows: kernels/topk_rows.cu compiled for the host; its entry points register
// themselves with the emulator (R2_ENTRY in common.cuh).
#include "../topk_rows.cu"
