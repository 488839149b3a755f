// The emulated gather_inject: kernels/gather_inject.cu compiled for the host; its entry points register
// themselves with the emulator (R2_ENTRY in common.cuh).
#include "../gather_inject.cu"
