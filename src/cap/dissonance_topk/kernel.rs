//! Launch plan and device path of `kernels/dissonance_topk.cu`: one block of
//! [`CAP_TOPK_THREADS`](crate::kernel::abi::CAP_TOPK_THREADS) threads per batch row; the
//! row's tokens stream through a shared tile into a running top-`kp` list
//! (`kernels/topk.cuh`). One code for the CUDA device and the emulator.
// The device path runs with feature `cuda` (a GPU) or `emulate` (the tests); the plan is
// always public.
#![cfg_attr(not(any(feature = "cuda", feature = "emulate")), allow(dead_code))]

use super::contract::{Dims, OP};
use crate::kernel::abi::DissonanceTopkArgs;
use crate::kernel::topk::{row_topk_plan, TopkPlan};
use crate::kernel::{entry, to_u32, AnyElem, Launcher, Ptr};
use candle_core::{DType, Result};

/// Plan of `dissonance_topk_<dt>` for B rows, L tokens, dimension D, top-k. Shared memory
/// holds the anchor (D floats), a 32-float reduction buffer, the hit counters and the
/// streaming lists of kernels/topk.cuh (running list, tile, hit buffer).
pub fn plan(b: usize, l: usize, d: usize, k: usize) -> Result<TopkPlan> {
    row_topk_plan(OP, b, l, k, d + 32)
}

/// Device addresses of one call's inputs (contiguous, on the launcher's device).
pub(crate) struct Inputs {
    /// [B, L, D] in `dtype`.
    pub p: Ptr<AnyElem>,
    /// [B, La, D] tokens or [B, D] anchors in `dtype`.
    pub ctx: Ptr<AnyElem>,
    pub dtype: DType,
    /// [B, La] f32 token weights, if any.
    pub mask: Option<Ptr<f32>>,
    /// `ctx` holds anchors.
    pub anchor: bool,
}

/// The three outputs: delta [B, L] f32, noise indices [B, k], noise mask [B, L] f32.
pub(crate) struct Outputs<L: Launcher> {
    pub delta: L::Buf<f32>,
    pub idx: L::Buf<u32>,
    pub mask: L::Buf<f32>,
}

/// Runs the kernel of one call on `x`.
pub(crate) fn launch<L: Launcher>(x: &L, dims: Dims, inp: &Inputs) -> Result<Outputs<L>> {
    let Dims { b, l, la, d, k } = dims;
    let out = Outputs {
        delta: x.zeros::<f32>(b * l)?,
        idx: x.zeros::<u32>(b * k)?,
        mask: x.zeros::<f32>(b * l)?,
    };
    if b == 0 {
        return Ok(out); // nothing to launch: empty outputs, as on the CPU
    }
    let p = plan(b, l, d, k)?;
    let args = DissonanceTopkArgs {
        p: inp.p,
        ctx: inp.ctx,
        mask: inp.mask.unwrap_or_else(Ptr::null),
        has_mask: inp.mask.is_some() as u32,
        anchor: inp.anchor as u32,
        l: to_u32(l, "L", OP)?,
        la: to_u32(la, "La", OP)?,
        d: to_u32(d, "D", OP)?,
        k: to_u32(k, "k", OP)?,
        kp: p.kp,
        tile: p.tile,
        delta: x.ptr(&out.delta),
        idx: x.ptr(&out.idx),
        noise_mask: x.ptr(&out.mask),
    };
    // SAFETY: p B*L*D, ctx B*La*D (or B*D), mask B*La when present, outputs as allocated.
    unsafe { x.launch(&entry::<DissonanceTopkArgs>(inp.dtype)?, &p.launch, &args)? };
    Ok(out)
}
