//! FFI to the emulated kernels (feature `emulate`, test infrastructure, `doc(hidden)`).
//!
//! `build.rs` compiles `kernels/emu/*.cpp` — the real `kernels/*.cu` sources plus the
//! CPU shim of the CUDA execution model (`kernels/emu/cuda_emu.h`) — into a static
//! library. Each launcher takes the [`EmuPlan`] converted from the op's
//! [`LaunchPlan`](crate::launch::LaunchPlan) and runs the grid's blocks one after
//! another, one OS thread per CUDA thread. The safe wrappers here take CPU tensors and
//! mirror the CUDA path of each op step by step, with the same plan.

use crate::launch::{LaunchPlan, EMU_SM_COUNT};
use crate::retrieve::{check, kernel};
use candle_core::{bail, DType, Device, Tensor};
use half::{bf16, f16};

/// Launch plan in the C layout of `r2emu::Plan` (kernels/emu/cuda_emu.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EmuPlan {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory bytes.
    pub smem_bytes: u32,
}

impl From<LaunchPlan> for EmuPlan {
    fn from(p: LaunchPlan) -> Self {
        EmuPlan {
            grid: [p.grid.0, p.grid.1, p.grid.2],
            block: [p.block.0, p.block.1, p.block.2],
            smem_bytes: p.smem_bytes,
        }
    }
}

/// Declares the emulated partial-kernel entry points; they differ only in the key type.
macro_rules! partial_entries {
    ($($name:ident: $kt:ty),+) => {
        extern "C" {$(
            fn $name(
                p: EmuPlan,
                q: *const f32,
                keys: *const $kt,
                kn: *const f32,
                excl: *const u32,
                b: u32,
                m: u32,
                d: u32,
                qb: u32,
                kp: u32,
                chunk_rows: u32,
                cand_s: *mut f32,
                cand_i: *mut u32,
                err: *mut u32,
            ) -> i32;
        )+}
    };
}
partial_entries!(
    r2emu_cosine_topk_partial_f32: f32,
    r2emu_cosine_topk_partial_f16: f16,
    r2emu_cosine_topk_partial_bf16: bf16
);

extern "C" {
    fn r2emu_cosine_topk_merge(
        p: EmuPlan,
        cand_s: *const f32,
        cand_i: *const u32,
        ncand: u32,
        kp: u32,
        n: u32,
        out_s: *mut f32,
        out_i: *mut u32,
    ) -> i32;
}

fn launched(op: &str, code: i32) -> candle_core::Result<()> {
    if code != 0 {
        bail!("{op}: the emulator rejected the launch plan (code {code})");
    }
    Ok(())
}

/// `cosine_topk` run through the emulated CUDA kernels (`kernels/cosine_topk.cu`) on CPU
/// tensors: same contract and checks as [`crate::retrieve::cosine_topk`], n <=
/// [`kernel::KMAX`]. The plan is [`kernel::plan`] with [`EMU_SM_COUNT`] multiprocessors.
pub fn cosine_topk_emulated(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let op = "cosine_topk (emulated kernel)";
    let c = check(op, queries, keys, key_norms, n, exclude)?;
    if !matches!(keys.device(), Device::Cpu) {
        bail!("{op}: expects CPU tensors");
    }
    if c.b == 0 {
        return Ok((
            Tensor::zeros((0, n), DType::F32, &Device::Cpu)?,
            Tensor::zeros((0, n), DType::U32, &Device::Cpu)?,
        ));
    }
    let plan = kernel::plan(c.b, c.m, c.d, c.n, EMU_SM_COUNT)?;
    // The host side of the CUDA path: f32 queries, f32 norms, u32 exclusion.
    let q = queries
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let kn = match key_norms {
        Some(t) => t.flatten_all()?.to_vec1::<f32>()?,
        None => crate::retrieve::key_norms(keys)?.to_vec1::<f32>()?,
    };
    let gx = plan.partial.grid.0 as usize;
    let kp = plan.kp as usize;
    let ncand = gx * kp;
    let mut cand_s = vec![0f32; c.b * ncand];
    let mut cand_i = vec![0u32; c.b * ncand];
    let mut err = [0u32; 3];
    let (b, m, d) = (c.b as u32, c.m as u32, c.d as u32);
    let pp = EmuPlan::from(plan.partial);
    let keys = keys.contiguous()?;
    // The three dtype entry points take the same arguments; only the key element type and
    // the symbol differ.
    macro_rules! partial {
        ($t:ty, $entry:ident) => {{
            let k = keys.flatten_all()?.to_vec1::<$t>()?;
            $entry(
                pp,
                q.as_ptr(),
                k.as_ptr(),
                kn.as_ptr(),
                c.exclude.as_ptr(),
                b,
                m,
                d,
                plan.qb,
                plan.kp,
                plan.chunk_rows,
                cand_s.as_mut_ptr(),
                cand_i.as_mut_ptr(),
                err.as_mut_ptr(),
            )
        }};
    }
    // SAFETY: every buffer has the size the kernel indexes for this plan (B*D queries,
    // M*D keys, M norms, B exclusions, B*gx*kp candidates, 3 error words).
    let code = unsafe {
        match keys.dtype() {
            DType::F32 => partial!(f32, r2emu_cosine_topk_partial_f32),
            DType::F16 => partial!(f16, r2emu_cosine_topk_partial_f16),
            DType::BF16 => partial!(bf16, r2emu_cosine_topk_partial_bf16),
            dt => bail!("{op}: unsupported keys dtype {dt:?}"),
        }
    };
    launched(op, code)?;
    if err[0] != 0 {
        bail!(
            "{op}: NaN score for query {} at bank row {} (NaN or infinite input)",
            err[1],
            err[2]
        );
    }
    if !plan.needs_merge() {
        let s = Tensor::from_vec(cand_s, (c.b, kp), &Device::Cpu)?.narrow(1, 0, c.n)?;
        let i = Tensor::from_vec(cand_i, (c.b, kp), &Device::Cpu)?.narrow(1, 0, c.n)?;
        return Ok((s.contiguous()?, i.contiguous()?));
    }
    let mut out_s = vec![0f32; c.b * c.n];
    let mut out_i = vec![0u32; c.b * c.n];
    // SAFETY: candidates B*ncand, outputs B*n.
    let code = unsafe {
        r2emu_cosine_topk_merge(
            EmuPlan::from(plan.merge),
            cand_s.as_ptr(),
            cand_i.as_ptr(),
            ncand as u32,
            plan.kp,
            c.n as u32,
            out_s.as_mut_ptr(),
            out_i.as_mut_ptr(),
        )
    };
    launched(op, code)?;
    Ok((
        Tensor::from_vec(out_s, (c.b, c.n), &Device::Cpu)?,
        Tensor::from_vec(out_i, (c.b, c.n), &Device::Cpu)?,
    ))
}
