//! `gather_inject`: phase 3 of CAP (paper Eq. 8-9), out of place, with its backward.
//!
//! Files of this op: `contract.rs` (validation of shapes and indices), `cpu.rs` (fused CPU
//! paths), `kernel.rs` (plan and device path of `kernels/gather_inject.cu`, CUDA and
//! emulator); tests in `tests/ops/gather_inject.rs`.

mod contract;
mod cpu;
pub mod kernel;

use crate::check::contiguous_slice;
use crate::error::bail;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use contract::{validate, Injection, OP};
use kernel::Pass;

/// Phase 3 of CAP (Eq. 8-9), out of place: returns a copy of `h` [B, L, D] in which row
/// `noise_idx[b, j]` is replaced by `src[b, salient_idx[b, j]]` for every j (`src` [B, Ls, D],
/// the dtype of `h`; indices [B, k] u32). One fused pass (CPU) or one kernel (CUDA).
///
/// Backward: grad_h = output gradient with the noise rows zeroed; grad_src accumulates each
/// injected row's gradient into its salient source row (a row used twice receives both).
/// NaN: the op ranks nothing, so values are copied as they are: a NaN in `h` or `src` lands
/// in the output exactly where the copy puts it (never dropped, never invented).
///
/// Errors (all checked on the host before any kernel): shape/dtype/device mismatch, `k == 0`,
/// `k > L`, `D == 0`, an index out of range, a noise index repeated within a batch row.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let h = Tensor::new(&[[[1f32, 1.], [2., 2.], [3., 3.]]], &dev)?; // [1, 3, 2]
/// let src = Tensor::new(&[[[7f32, 7.], [9., 9.]]], &dev)?; // [1, 2, 2]
/// let noise = Tensor::new(&[[2u32, 0]], &dev)?; // replace rows 2 and 0 of h ...
/// let salient = Tensor::new(&[[1u32, 0]], &dev)?; // ... by rows 1 and 0 of src
/// let out = r2scp::gather_inject(&h, &src, &noise, &salient)?;
/// assert_eq!(out.to_vec3::<f32>()?, [[[7., 7.], [2., 2.], [9., 9.]]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn gather_inject(
    h: &Tensor,
    src: &Tensor,
    noise_idx: &Tensor,
    salient_idx: &Tensor,
) -> crate::Result<Tensor> {
    let inj = validate(h, src, noise_idx, salient_idx)?;
    Ok(h.contiguous()?
        .apply_op2(&src.contiguous()?, InjectOp { inj })?)
}

/// Unfused reference of [`gather_inject`] from plain candle ops, literally Eq. 9:
/// `(1 - M_noise) * h + M_noise * Gather(src, salient)`, with the gather by `gather` and the
/// placement by a one-hot [B, L, k] matmul (differentiable through candle's autograd; candle
/// 0.11.1's `scatter_add` backward rejects this shape). Same validation.
///
/// A NaN in `h` or `src` spreads wider here than in [`gather_inject`]: the one-hot matmul
/// multiplies every row of `src` (and `0 * NaN` is NaN), which is one reason the fused op
/// copies rows instead.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// # use r2scp::cap::{gather_inject, gather_inject_reference};
/// let dev = Device::Cpu;
/// let h = Tensor::randn(0f32, 1., (2, 5, 3), &dev)?;
/// let src = Tensor::randn(0f32, 1., (2, 4, 3), &dev)?;
/// let noise = Tensor::new(&[[4u32, 1], [0, 2]], &dev)?;
/// let salient = Tensor::new(&[[3u32, 3], [1, 0]], &dev)?;
/// let a = gather_inject(&h, &src, &noise, &salient)?;
/// let b = gather_inject_reference(&h, &src, &noise, &salient)?;
/// assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn gather_inject_reference(
    h: &Tensor,
    src: &Tensor,
    noise_idx: &Tensor,
    salient_idx: &Tensor,
) -> crate::Result<Tensor> {
    Ok(reference(h, src, noise_idx, salient_idx)?)
}

fn reference(h: &Tensor, src: &Tensor, noise_idx: &Tensor, salient_idx: &Tensor) -> Result<Tensor> {
    let Injection { b, l, d, k, .. } = validate(h, src, noise_idx, salient_idx)?;
    let sal = salient_idx
        .unsqueeze(2)?
        .broadcast_as((b, k, d))?
        .contiguous()?;
    let gathered = src.contiguous()?.gather(&sal, 1)?; // [B, k, D]
                                                       // one_hot[b, i, j] = 1 if noise[b, j] == i
    let rows = Tensor::arange(0u32, l as u32, h.device())?.reshape((1, l, 1))?;
    let one_hot = rows
        .broadcast_eq(&noise_idx.unsqueeze(1)?)?
        .to_dtype(h.dtype())?; // [B, L, k]
    let mask = one_hot.sum_keepdim(2)?; // [B, L, 1]
    let injected = one_hot.matmul(&gathered)?; // [B, L, D]
    h.broadcast_mul(&(1.0 - mask)?)? + injected
}

/// `gather_inject` through the emulated `gather_inject_fwd_<dt>` kernel (CPU tensors). Test
/// infrastructure (feature `emulate`).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn gather_inject_emulated(
    h: &Tensor,
    src: &Tensor,
    noise_idx: &Tensor,
    salient_idx: &Tensor,
) -> crate::Result<Tensor> {
    let inj = validate(h, src, noise_idx, salient_idx)?;
    Ok(emulated(Pass::Forward, &inj, h, Some(src))?)
}

/// The backward of `gather_inject` through the emulated `gather_inject_zero_<dt>` and
/// `gather_inject_scatter_<dt>` kernels: `grad` [B, L, D] (the output gradient), `src`
/// [B, Ls, D] (for its shape) -> (grad_h [B, L, D], grad_src [B, Ls, D]). Test
/// infrastructure (feature `emulate`).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn gather_inject_backward_emulated(
    grad: &Tensor,
    src: &Tensor,
    noise_idx: &Tensor,
    salient_idx: &Tensor,
) -> crate::Result<(Tensor, Tensor)> {
    let inj = validate(grad, src, noise_idx, salient_idx)?;
    Ok((
        emulated(Pass::GradH, &inj, grad, None)?,
        emulated(Pass::GradSrc, &inj, grad, None)?,
    ))
}

/// One pass through the emulator on CPU tensors.
#[cfg(feature = "emulate")]
fn emulated(pass: Pass, inj: &Injection, h: &Tensor, src: Option<&Tensor>) -> Result<Tensor> {
    use crate::kernel::{emu::EmuLauncher, tensor_ptr, Launcher, Ptr};
    if !h.device().is_cpu() {
        bail!("{OP} (emulated kernel): expects CPU tensors");
    }
    let h = h.contiguous()?;
    let src = src.map(|s| s.contiguous()).transpose()?;
    let (hp, _h) = tensor_ptr(&h, OP)?;
    let sp = src.as_ref().map(|s| tensor_ptr(s, OP)).transpose()?;
    let sp_addr = sp.as_ref().map_or(Ptr::null(), |(p, _)| *p);
    let x = EmuLauncher;
    let shape = (inj.b, pass.out_rows(inj), inj.d);
    macro_rules! typed {
        ($t:ty) => {{
            let out = kernel::launch::<_, $t>(&x, pass, inj, h.dtype(), hp, sp_addr)?;
            x.tensor_of(out, shape)
        }};
    }
    match h.dtype() {
        candle_core::DType::F32 => typed!(f32),
        candle_core::DType::F16 => typed!(half::f16),
        candle_core::DType::BF16 => typed!(half::bf16),
        dt => bail!("{OP} (emulated kernel): dtype {dt:?} has no kernel (f32, f16, bf16)"),
    }
}

/// One pass on a CUDA device; `h` and `src` are contiguous storages.
#[cfg(feature = "cuda")]
fn cuda_pass(
    pass: Pass,
    inj: &Injection,
    (h, hl): (&candle_core::CudaStorage, &Layout),
    src: Option<(&candle_core::CudaStorage, &Layout)>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use crate::kernel::cuda::{storage_ptr, CudaLauncher};
    use candle_core::CudaStorage;
    let dev = h.device().clone();
    let x = CudaLauncher::new(&dev);
    let hp = storage_ptr(h, hl, OP)?;
    let sp = match src {
        Some((s, sl)) => storage_ptr(s, sl, OP)?,
        None => crate::kernel::Ptr::null(),
    };
    macro_rules! typed {
        ($t:ty) => {{
            let out = kernel::launch::<_, $t>(&x, pass, inj, h.dtype(), hp, sp)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match h.dtype() {
        candle_core::DType::F32 => typed!(f32),
        candle_core::DType::F16 => typed!(half::f16),
        candle_core::DType::BF16 => typed!(half::bf16),
        dt => bail!("{OP}: dtype {dt:?} has no CUDA kernel (f32, f16, bf16; f64 runs on CPU)"),
    };
    Ok((out, Shape::from((inj.b, pass.out_rows(inj), inj.d))))
}

/// The forward op on (h, src); the validated indices live in the op.
struct InjectOp {
    inj: Injection,
}

impl CustomOp2 for InjectOp {
    fn name(&self) -> &'static str {
        "gather-inject"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.inj.b, self.inj.l, self.inj.d));
        macro_rules! typed {
            ($v:ident, $h:expr, $s:expr) => {
                CpuStorage::$v(cpu::forward(
                    contiguous_slice($h, l1, OP)?,
                    contiguous_slice($s, l2, OP)?,
                    &self.inj,
                ))
            };
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(h), CpuStorage::F32(s)) => typed!(F32, h, s),
            (CpuStorage::F16(h), CpuStorage::F16(s)) => typed!(F16, h, s),
            (CpuStorage::BF16(h), CpuStorage::BF16(s)) => typed!(BF16, h, s),
            (CpuStorage::F64(h), CpuStorage::F64(s)) => typed!(F64, h, s),
            (h, s) => bail!(
                "{OP}: unsupported dtypes h {:?} / src {:?}",
                h.dtype(),
                s.dtype()
            ),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_pass(Pass::Forward, &self.inj, (s1, l1), Some((s2, l2)))
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _src: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gh = grad.apply_op1_no_bwd(&InjectBwdOp {
            inj: &self.inj,
            pass: Pass::GradH,
        })?;
        let gs = grad.apply_op1_no_bwd(&InjectBwdOp {
            inj: &self.inj,
            pass: Pass::GradSrc,
        })?;
        Ok((Some(gh), Some(gs)))
    }
}

/// One half of the backward on the output gradient: [`Pass::GradH`] or [`Pass::GradSrc`].
struct InjectBwdOp<'a> {
    inj: &'a Injection,
    pass: Pass,
}

impl CustomOp1 for InjectBwdOp<'_> {
    fn name(&self) -> &'static str {
        "gather-inject-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.inj;
        macro_rules! typed {
            ($v:ident, $g:expr) => {{
                let g = contiguous_slice($g, l, OP)?;
                CpuStorage::$v(match self.pass {
                    Pass::GradSrc => cpu::scatter_rows(g, p),
                    _ => cpu::zero_rows(g, p),
                })
            }};
        }
        let out = match s {
            CpuStorage::F32(g) => typed!(F32, g),
            CpuStorage::F16(g) => typed!(F16, g),
            CpuStorage::BF16(g) => typed!(BF16, g),
            CpuStorage::F64(g) => typed!(F64, g),
            g => bail!("{OP}: unsupported gradient dtype {:?}", g.dtype()),
        };
        Ok((out, Shape::from((p.b, self.pass.out_rows(p), p.d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_pass(self.pass, self.inj, (s, l), None)
    }
}
