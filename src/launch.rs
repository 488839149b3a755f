//! Launch plans shared by the CUDA path (cudarc) and the CPU emulation of the kernels.
//!
//! Each op computes its plan with one Rust function (e.g.
//! [`crate::retrieve::kernel::plan`]); both the real launch and the emulated launch use
//! that same plan, so the configuration the tests prove is the one that ships.

/// Grid, block and dynamic shared-memory size of one kernel launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes.
    pub smem_bytes: u32,
}

impl LaunchPlan {
    /// Total threads per block.
    pub fn threads_per_block(&self) -> u32 {
        self.block.0 * self.block.1 * self.block.2
    }

    /// Total number of blocks.
    pub fn blocks(&self) -> u64 {
        self.grid.0 as u64 * self.grid.1 as u64 * self.grid.2 as u64
    }
}

/// Dynamic shared memory every plan stays within: the 48 KiB per-block limit that needs
/// no opt-in attribute on any GPU from sm_50 on covers static and dynamic shared memory
/// together, so 1 KiB is left for the kernels' static `__shared__` arrays (ptxas reports
/// at most 160 bytes of them).
pub const MAX_DYN_SMEM_BYTES: u32 = 47 * 1024;

/// Streaming multiprocessor count the emulated launches plan for. Small on purpose:
/// the emulator runs blocks one after another, and a small grid still exercises the
/// multi-block candidate merge.
pub const EMU_SM_COUNT: u32 = 2;
