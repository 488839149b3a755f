//! Launch plans and device path of `kernels/dissonance_topk.cu`: for a tokens context the
//! anchor pass (`dissonance_topk_anchor_<dt>`, the pooled anchor into a [B, D] f32 scratch),
//! then `dissonance_topk_<dt>`: [`chunks`] blocks of [`DIS_THREADS`] threads per batch row
//! score the tokens with 16-byte loads where the rows allow ([`rows_vec16`]), and the last block
//! of each row streams its deltas into a running top-`kp` list (`kernels/topk.cuh`). One
//! code for the CUDA device and the emulator.
// The device path runs with feature `cuda` (a GPU) or `emulate` (the tests); the plan is
// always public.
#![cfg_attr(not(any(feature = "cuda", feature = "emulate")), allow(dead_code))]

use super::contract::{Dims, OP};
use crate::kernel::abi::{DissonanceTopkArgs, DIS_ANCHOR_THREADS, DIS_ROWS_PER_WARP, DIS_THREADS};
use crate::kernel::topk::{row_topk_plan, warp_rows, TopkPlan};
use crate::kernel::{entry, rows_vec16, to_u32, AnyElem, LaunchPlan, Launcher, Ptr};
use candle_core::{DType, Result};

/// Tokens one block of `dissonance_topk_<dt>` scores.
pub const TOKENS_PER_BLOCK: usize = (DIS_THREADS / 32 * DIS_ROWS_PER_WARP) as usize;

/// Blocks of `dissonance_topk_<dt>` per batch row of L tokens (at least 1).
pub fn chunks(l: usize) -> usize {
    l.div_ceil(TOKENS_PER_BLOCK).max(1)
}

/// Plan of `dissonance_topk_<dt>` for B rows, L tokens, dimension D, top-k: a flat grid of
/// `B * chunks(L)` blocks of [`DIS_THREADS`] threads. Shared memory holds the anchor (D
/// floats), a 32-float reduction buffer, the hit counters and the streaming lists of
/// kernels/topk.cuh (running list, tile, hit buffer) that the last block of a row uses.
pub fn plan(b: usize, l: usize, d: usize, k: usize) -> Result<TopkPlan> {
    let mut p = row_topk_plan(OP, b, l, k, d + 32)?;
    p.launch.grid = (to_u32(b * chunks(l), "B * chunks", OP)?, 1, 1);
    p.launch.block = (DIS_THREADS, 1, 1);
    Ok(p)
}

/// Plan of `dissonance_topk_anchor_<dt>` for B rows of dimension D with `elem_bytes`-byte
/// elements: `B * ceil(D / (32 * V))` blocks of [`DIS_ANCHOR_THREADS`], V = 16 / elem_bytes
/// (each lane owns one 16-byte vector of columns), no dynamic shared memory.
pub fn anchor_plan(b: usize, d: usize, elem_bytes: usize) -> Result<LaunchPlan> {
    let per_row = d.div_ceil(32 * (16 / elem_bytes.clamp(1, 16)));
    Ok(LaunchPlan {
        grid: (to_u32(b * per_row, "B * column blocks", OP)?, 1, 1),
        block: (DIS_ANCHOR_THREADS, 1, 1),
        smem_bytes: 0,
    })
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
    let elem_bytes = inp.dtype.size_in_bytes();
    let g = if inp.anchor {
        None
    } else {
        Some(x.zeros::<f32>(b * d)?)
    };
    let done = x.zeros::<u32>(b)?;
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
        vec16: rows_vec16(d, elem_bytes, &[inp.p.addr(), inp.ctx.addr()]) as u32,
        chunks: to_u32(chunks(l), "chunks", OP)?,
        g: g.as_ref().map_or_else(Ptr::null, |g| x.ptr(g)),
        done: x.ptr(&done),
        warp_select: warp_rows(l, k) as u32,
        delta: x.ptr(&out.delta),
        idx: x.ptr(&out.idx),
        noise_mask: x.ptr(&out.mask),
    };
    let name = entry::<DissonanceTopkArgs>(inp.dtype)?;
    if !inp.anchor {
        let anchor_name = name.replacen("dissonance_topk", "dissonance_topk_anchor", 1);
        // SAFETY: ctx B*La*D, mask B*La when present, g B*D as allocated.
        unsafe { x.launch(&anchor_name, &anchor_plan(b, d, elem_bytes)?, &args)? };
    }
    // SAFETY: p B*L*D, ctx B*D (anchor) or g B*D (written above, same stream), done B zeroed,
    // outputs as allocated.
    unsafe { x.launch(&name, &p.launch, &args)? };
    Ok(out)
}
