//! Launch plan and device path of `kernels/topk_rows.cu`: one warp per row of scores for short
//! rows and small k ([`warp_rows`]: `r2_warp_topk`), else one block per row (the streaming
//! top-k of `kernels/topk.cuh`). One code for the CUDA device and the emulator.
// The device path runs with feature `cuda` (a GPU) or `emulate` (the tests); the plan is
// always public.
#![cfg_attr(not(any(feature = "cuda", feature = "emulate")), allow(dead_code))]

use crate::kernel::abi::TopkRowsArgs;
use crate::kernel::abi::CAP_TOPK_THREADS;
use crate::kernel::topk::{row_topk_plan, warp_rows, TopkPlan};
use crate::kernel::{to_u32, KernelArgs, Launcher, Ptr};
use candle_core::Result;

const OP: &str = "topk_rows";

/// Plan of `topk_rows_f32` for B rows of L scores, top-k: one block per row, or with
/// [`warp_rows`] one warp per row (`ceil(B / warps per block)` blocks, no shared memory).
pub fn plan(b: usize, l: usize, k: usize) -> Result<TopkPlan> {
    let mut p = row_topk_plan(OP, b, l, k, 0)?;
    if warp_rows(l, k) {
        let rows_per_block = (CAP_TOPK_THREADS / 32) as usize;
        p.launch.grid = (to_u32(b.div_ceil(rows_per_block), "blocks", OP)?, 1, 1);
        p.launch.smem_bytes = 0;
    }
    Ok(p)
}

/// Values [B, k] f32 and indices [B, k] of one call.
pub(crate) struct Outputs<L: Launcher> {
    pub vals: L::Buf<f32>,
    pub idx: L::Buf<u32>,
}

/// Runs the kernel on `x` for `scores` [B, L] f32 (contiguous, on the launcher's device).
pub(crate) fn launch<L: Launcher>(
    x: &L,
    scores: Ptr<f32>,
    b: usize,
    l: usize,
    k: usize,
) -> Result<Outputs<L>> {
    let out = Outputs {
        vals: x.zeros::<f32>(b * k)?,
        idx: x.zeros::<u32>(b * k)?,
    };
    if b == 0 {
        return Ok(out); // nothing to launch: empty outputs, as on the CPU
    }
    let p = plan(b, l, k)?;
    let args = TopkRowsArgs {
        scores,
        b: to_u32(b, "B", OP)?,
        warp_rows: warp_rows(l, k) as u32,
        l: to_u32(l, "L", OP)?,
        k: to_u32(k, "k", OP)?,
        kp: p.kp,
        tile: p.tile,
        vals: x.ptr(&out.vals),
        idx: x.ptr(&out.idx),
    };
    // SAFETY: scores B*L, outputs B*k as allocated.
    unsafe { x.launch(&format!("{}_f32", TopkRowsArgs::ENTRY), &p.launch, &args)? };
    Ok(out)
}
