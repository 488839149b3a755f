// The one C entry the Rust emulator launcher calls (src/kernel/emu.rs): finds a registered
// entry point by name and runs it with the plan and argument bytes it was given.
#include <cstring>

#include "cuda_emu.h"

// 0 = ran; 1 = no such entry; 2 = bad block size; 3 = empty grid; 4 = argument size mismatch.
extern "C" int r2emu_launch(const char* entry, r2emu::Plan plan, const void* args, size_t args_size) {
    for (const auto& e : r2emu::registry()) {
        if (std::strcmp(e.name, entry) != 0) continue;
        if (e.args_size != args_size) return 4;
        return e.run(plan, args);
    }
    return 1;
}

// cvt.rna.tf32.f32 as the emulator performs it (src/kernel/emu.rs `cvt_rna_tf32`, for the tests).
extern "C" unsigned r2emu_cvt_rna_tf32(float x) { return r2emu::cvt_rna_tf32(x); }
