//! Emulated CUDA launchers of the CAP kernels (feature `emulate`, test infrastructure).
//!
//! The wrappers take CPU tensors, validate them exactly like the public ops, compute the
//! launch plan with [`super::kernel`] (the plan the CUDA path uses) and run
//! `kernels/dissonance_topk.cu` / `kernels/gather_inject.cu` through the CPU shim
//! (`kernels/emu/cap_*.cpp`).

use super::kernel::{dissonance_plan, inject_plan, topk_rows_plan};
use super::{dissonance, inject, Context, Dissonance};
use crate::emu::EmuPlan;
use candle_core::{bail, DType, Device, Result, Tensor};
use half::{bf16, f16};

macro_rules! dis_decl {
    ($name:ident, $t:ty) => {
        fn $name(
            pl: EmuPlan,
            p: *const $t,
            ctx: *const $t,
            mask: *const f32,
            has_mask: u32,
            anchor: u32,
            l: u32,
            la: u32,
            d: u32,
            k: u32,
            kp: u32,
            tile: u32,
            delta: *mut f32,
            idx: *mut u32,
            nmask: *mut f32,
        ) -> i32;
    };
}

/// The `gather_inject` entries of one dtype. `fwd` (inputs h, src) and `scatter` (input grad)
/// share the argument tail (noise, sal, B, L, Ls, D, k, out) that `gather_call!` passes.
macro_rules! inj_decl {
    ($fwd:ident, $zero:ident, $scatter:ident, $t:ty) => {
        inj_decl!(@gather $fwd, $t, h, src);
        fn $zero(
            pl: EmuPlan,
            grad: *const $t,
            noise: *const u32,
            b: u32,
            l: u32,
            d: u32,
            k: u32,
            out: *mut $t,
        ) -> i32;
        inj_decl!(@gather $scatter, $t, grad);
    };
    (@gather $name:ident, $t:ty, $($input:ident),+) => {
        fn $name(
            pl: EmuPlan,
            $($input: *const $t,)+
            noise: *const u32,
            sal: *const u32,
            b: u32,
            l: u32,
            ls: u32,
            d: u32,
            k: u32,
            out: *mut $t,
        ) -> i32;
    };
}

/// Calls `$f`, a `gather_inject_{fwd,scatter}_<dt>` entry, with `$plan`, the `$input` buffers,
/// then the tail both entries share, from the `InjectPlan` `$p` and `$out`.
macro_rules! gather_call {
    ($f:ident, $plan:expr, [$($input:expr),+], $p:expr, $out:expr) => {
        $f(
            $plan.into(),
            $($input.as_ptr(),)+
            $p.noise.as_ptr(),
            $p.sal.as_ptr(),
            $p.b as u32,
            $p.l as u32,
            $p.ls as u32,
            $p.d as u32,
            $p.k as u32,
            $out.as_mut_ptr(),
        )
    };
}

extern "C" {
    dis_decl!(r2emu_dissonance_topk_f32, f32);
    dis_decl!(r2emu_dissonance_topk_f16, f16);
    dis_decl!(r2emu_dissonance_topk_bf16, bf16);
    fn r2emu_topk_rows_f32(
        pl: EmuPlan,
        scores: *const f32,
        l: u32,
        k: u32,
        kp: u32,
        tile: u32,
        vals: *mut f32,
        idx: *mut u32,
    ) -> i32;
    inj_decl!(
        r2emu_gather_inject_fwd_f32,
        r2emu_gather_inject_zero_f32,
        r2emu_gather_inject_scatter_f32,
        f32
    );
    inj_decl!(
        r2emu_gather_inject_fwd_f16,
        r2emu_gather_inject_zero_f16,
        r2emu_gather_inject_scatter_f16,
        f16
    );
    inj_decl!(
        r2emu_gather_inject_fwd_bf16,
        r2emu_gather_inject_zero_bf16,
        r2emu_gather_inject_scatter_bf16,
        bf16
    );
}

fn check_rc(rc: i32, what: &str) -> Result<()> {
    if rc != 0 {
        bail!("{what}: the emulator rejected the launch plan (code {rc})");
    }
    Ok(())
}

fn cpu_only(t: &Tensor, what: &str) -> Result<()> {
    if !t.device().is_cpu() {
        bail!("{what}: emulated kernels take CPU tensors");
    }
    Ok(())
}

fn host<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// `dissonance_topk` through the emulated `dissonance_topk_<dt>` kernel (f32, f16, bf16;
/// CPU tensors). Same validation and outputs as the op; `delta` carries no gradient.
pub fn dissonance_topk_emulated(p: &Tensor, ctx: Context, k: usize) -> Result<Dissonance> {
    let dims = dissonance::validate(p, &ctx, k)?;
    cpu_only(p, "dissonance_topk_emulated")?;
    let plan = dissonance_plan(dims.b, dims.l, dims.d, k)?;
    let (ctx_t, mask, anchor) = match ctx {
        Context::Anchor(g) => (g, None, 1u32),
        Context::Tokens { h_avl, mask } => (h_avl, mask, 0u32),
    };
    let (mask_v, has_mask) = match mask {
        Some(m) => (host::<f32>(&m.to_dtype(DType::F32)?)?, 1u32),
        None => (vec![0f32], 0u32),
    };
    let (b, l) = (dims.b, dims.l);
    let mut delta = vec![0f32; b * l];
    let mut idx = vec![0u32; b * k];
    let mut nmask = vec![0f32; b * l];
    macro_rules! go {
        ($f:ident, $t:ty) => {{
            let pv = host::<$t>(p)?;
            let cv = host::<$t>(ctx_t)?;
            // SAFETY: every pointer covers the extent the kernel indexes for this plan.
            unsafe {
                $f(
                    plan.launch.into(),
                    pv.as_ptr(),
                    cv.as_ptr(),
                    mask_v.as_ptr(),
                    has_mask,
                    anchor,
                    l as u32,
                    dims.la as u32,
                    dims.d as u32,
                    k as u32,
                    plan.kp,
                    plan.tile,
                    delta.as_mut_ptr(),
                    idx.as_mut_ptr(),
                    nmask.as_mut_ptr(),
                )
            }
        }};
    }
    let rc = match p.dtype() {
        DType::F32 => go!(r2emu_dissonance_topk_f32, f32),
        DType::F16 => go!(r2emu_dissonance_topk_f16, f16),
        DType::BF16 => go!(r2emu_dissonance_topk_bf16, bf16),
        dt => bail!("dissonance_topk_emulated: dtype {dt:?} has no kernel (f32, f16, bf16)"),
    };
    check_rc(rc, "dissonance_topk_emulated")?;
    Ok(Dissonance {
        delta: Tensor::from_vec(delta, (b, l), &Device::Cpu)?,
        noise_idx: Tensor::from_vec(idx, (b, k), &Device::Cpu)?,
        noise_mask: Tensor::from_vec(nmask, (b, l), &Device::Cpu)?,
    })
}

/// `topk_rows` through the emulated `topk_rows_f32` kernel (f32 CPU tensors).
pub fn topk_rows_emulated(scores: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    cpu_only(scores, "topk_rows_emulated")?;
    let (b, l) = scores.dims2()?;
    if scores.dtype() != DType::F32 {
        bail!(
            "topk_rows_emulated: dtype {:?}, expected f32",
            scores.dtype()
        );
    }
    let plan = topk_rows_plan(b, l, k)?;
    let sv = host::<f32>(scores)?;
    let mut vals = vec![0f32; b * k];
    let mut idx = vec![0u32; b * k];
    // SAFETY: buffers match the plan's extents.
    let rc = unsafe {
        r2emu_topk_rows_f32(
            plan.launch.into(),
            sv.as_ptr(),
            l as u32,
            k as u32,
            plan.kp,
            plan.tile,
            vals.as_mut_ptr(),
            idx.as_mut_ptr(),
        )
    };
    check_rc(rc, "topk_rows_emulated")?;
    Ok((
        Tensor::from_vec(vals, (b, k), &Device::Cpu)?,
        Tensor::from_vec(idx, (b, k), &Device::Cpu)?,
    ))
}

/// `gather_inject` through the emulated `gather_inject_fwd_<dt>` kernel.
pub fn gather_inject_emulated(
    h: &Tensor,
    src: &Tensor,
    noise_idx: &Tensor,
    salient_idx: &Tensor,
) -> Result<Tensor> {
    let p = inject::validate(h, src, noise_idx, salient_idx)?;
    cpu_only(h, "gather_inject_emulated")?;
    let plan = inject_plan(p.b * p.l)?;
    macro_rules! go {
        ($f:ident, $t:ty) => {{
            let (hv, sv) = (host::<$t>(h)?, host::<$t>(src)?);
            let mut out = vec![<$t>::default(); p.b * p.l * p.d];
            // SAFETY: buffers match the validated shapes; indices are in range.
            let rc = unsafe { gather_call!($f, plan, [hv, sv], p, out) };
            check_rc(rc, "gather_inject_emulated")?;
            Tensor::from_vec(out, (p.b, p.l, p.d), &Device::Cpu)
        }};
    }
    match h.dtype() {
        DType::F32 => go!(r2emu_gather_inject_fwd_f32, f32),
        DType::F16 => go!(r2emu_gather_inject_fwd_f16, f16),
        DType::BF16 => go!(r2emu_gather_inject_fwd_bf16, bf16),
        dt => bail!("gather_inject_emulated: dtype {dt:?} has no kernel (f32, f16, bf16)"),
    }
}

/// The backward of `gather_inject` through the emulated `gather_inject_zero_<dt>` and
/// `gather_inject_scatter_<dt>` kernels: `grad` [B, L, D] (the output gradient), `src`
/// [B, Ls, D] (for its shape) -> (grad_h [B, L, D], grad_src [B, Ls, D]).
pub fn gather_inject_backward_emulated(
    grad: &Tensor,
    src: &Tensor,
    noise_idx: &Tensor,
    salient_idx: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let p = inject::validate(grad, src, noise_idx, salient_idx)?;
    cpu_only(grad, "gather_inject_backward_emulated")?;
    let zplan = inject_plan(p.b * p.l)?;
    let splan = inject_plan(p.b * p.ls)?;
    macro_rules! go {
        ($zero:ident, $scatter:ident, $t:ty) => {{
            let gv = host::<$t>(grad)?;
            let mut gh = vec![<$t>::default(); p.b * p.l * p.d];
            let mut gs = vec![<$t>::default(); p.b * p.ls * p.d];
            // SAFETY: buffers match the validated shapes; indices are in range.
            let rc = unsafe {
                $zero(
                    zplan.into(),
                    gv.as_ptr(),
                    p.noise.as_ptr(),
                    p.b as u32,
                    p.l as u32,
                    p.d as u32,
                    p.k as u32,
                    gh.as_mut_ptr(),
                )
            };
            check_rc(rc, "gather_inject_backward_emulated (zero)")?;
            // SAFETY: as above.
            let rc = unsafe { gather_call!($scatter, splan, [gv], p, gs) };
            check_rc(rc, "gather_inject_backward_emulated (scatter)")?;
            (
                Tensor::from_vec(gh, (p.b, p.l, p.d), &Device::Cpu)?,
                Tensor::from_vec(gs, (p.b, p.ls, p.d), &Device::Cpu)?,
            )
        }};
    }
    Ok(match grad.dtype() {
        DType::F32 => go!(
            r2emu_gather_inject_zero_f32,
            r2emu_gather_inject_scatter_f32,
            f32
        ),
        DType::F16 => go!(
            r2emu_gather_inject_zero_f16,
            r2emu_gather_inject_scatter_f16,
            f16
        ),
        DType::BF16 => go!(
            r2emu_gather_inject_zero_bf16,
            r2emu_gather_inject_scatter_bf16,
            bf16
        ),
        dt => bail!("gather_inject_backward_emulated: dtype {dt:?} has no kernel"),
    })
}
