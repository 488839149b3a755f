//! Launch plan and device path of `kernels/gather_inject.cu`: one warp per output row,
//! [`GI_ROWS_PER_BLOCK`] rows per block, 16-byte moves where every row is 16-byte aligned
//! ([`rows_vec16`]). One code for the CUDA device and the emulator.
// The device path runs with feature `cuda` (a GPU) or `emulate` (the tests); the plan is
// always public.
#![cfg_attr(not(any(feature = "cuda", feature = "emulate")), allow(dead_code))]

use super::contract::{Injection, OP};
use crate::kernel::abi::{GatherInjectArgs, GI_ROWS_PER_BLOCK};
use crate::kernel::{entry, rows_vec16, to_u32, AnyElem, LaunchPlan, Launcher, Ptr};
use candle_core::{bail, DType, Result};

/// Plan of the injection kernels over `rows` output rows (B*L forward / zero, B*Ls scatter).
pub fn plan(rows: usize) -> Result<LaunchPlan> {
    if rows == 0 {
        bail!("{OP} kernel: no rows to write");
    }
    let blocks = rows.div_ceil(GI_ROWS_PER_BLOCK as usize);
    Ok(LaunchPlan {
        grid: (to_u32(blocks, "blocks", OP)?, 1, 1),
        block: (32 * GI_ROWS_PER_BLOCK, 1, 1),
        smem_bytes: 0,
    })
}

/// Which of the three entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// `gather_inject_fwd`: `h` with noise rows replaced by `src` rows, [B, L, D].
    Forward,
    /// `gather_inject_zero`: the gradient w.r.t. `h` (noise rows zeroed), [B, L, D].
    GradH,
    /// `gather_inject_scatter`: the gradient w.r.t. `src`, [B, Ls, D].
    GradSrc,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::GradH => "zero",
            Pass::GradSrc => "scatter",
        }
    }

    /// Output rows per batch row.
    pub(crate) fn out_rows(self, inj: &Injection) -> usize {
        match self {
            Pass::Forward | Pass::GradH => inj.l,
            Pass::GradSrc => inj.ls,
        }
    }
}

/// Runs `pass` on `x`: `h` is `h` (forward) or the output gradient (backward), `src` the
/// source rows (forward only; null otherwise); both contiguous in `dtype` on `x`'s device.
/// Returns the output, `[B, pass.out_rows(), D]` elements of `T` (`T` must be `dtype`).
pub(crate) fn launch<L: Launcher, T: crate::kernel::DevElem>(
    x: &L,
    pass: Pass,
    inj: &Injection,
    dtype: DType,
    h: Ptr<AnyElem>,
    src: Ptr<AnyElem>,
) -> Result<L::Buf<T>> {
    if T::DTYPE != dtype {
        bail!(
            "{OP}: internal error, output type {:?} for dtype {dtype:?}",
            T::DTYPE
        );
    }
    let rows = inj.b * pass.out_rows(inj);
    let out = x.zeros::<T>(rows * inj.d)?;
    if rows == 0 {
        return Ok(out); // nothing to launch: an empty output, as on the CPU
    }
    let p = plan(rows)?;
    let noise = x.upload(&inj.noise)?;
    let sal = x.upload(&inj.sal)?;
    let out_ptr = x.ptr(&out).erase();
    let vec = rows_vec16(
        inj.d,
        dtype.size_in_bytes(),
        &[h.addr(), src.addr(), out_ptr.addr()],
    );
    let args = GatherInjectArgs {
        h,
        src,
        noise: x.ptr(&noise),
        sal: x.ptr(&sal),
        b: to_u32(inj.b, "B", OP)?,
        l: to_u32(inj.l, "L", OP)?,
        ls: to_u32(inj.ls, "Ls", OP)?,
        d: to_u32(inj.d, "D", OP)?,
        k: to_u32(inj.k, "k", OP)?,
        vec16: vec as u32,
        out: out_ptr,
    };
    let name = entry::<GatherInjectArgs>(dtype)?.replacen(
        "gather_inject",
        &format!("gather_inject_{}", pass.name()),
        1,
    );
    // SAFETY: h B*L*D (or the gradient), src B*Ls*D when read, indices B*k validated on the
    // host (in range, distinct noise rows), out as allocated.
    unsafe { x.launch(&name, &p, &args)? };
    Ok(out)
}
