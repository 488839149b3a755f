//! `dissonance_topk`: phase 1 of CAP (paper Eq. 2-5).
//!
//! Files of this op: `contract.rs` (validation), `cpu.rs` (fused CPU path), `kernel.rs` (plan
//! and device path of `kernels/dissonance_topk.cu`, CUDA and emulator); tests in
//! `tests/ops/dissonance_topk.rs`.

mod contract;
mod cpu;
pub mod kernel;

use crate::error::bail;
use crate::kernel::abi::COS_EPS;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};
use contract::{validate, Dims, OP};
pub use contract::{Context, Dissonance};
use std::sync::{Arc, Mutex};

/// Phase 1 of CAP, fused: masked mean pooling of the context (Eq. 2), delta = 1 - cosine of
/// every row of `p` [B, L, D] with the pooled anchor (Eq. 3, epsilon
/// [`COS_EPS`]), and the top-`k` noise indices by delta (Eq. 5),
/// in one pass per batch row (CPU, rayon over rows) or one kernel (CUDA). `p` and the context
/// share one float dtype (f32, f16, bf16; f64 on CPU).
///
/// `delta` carries the gradient w.r.t. `p` and `h_avl` (or the anchor); indices and mask none.
/// Ties go to the lower index.
///
/// NaN: a NaN delta (a NaN or infinite value in `p` or in the context) is an error naming the
/// batch row and token, since a NaN has no rank; on CUDA finding it costs one reduction and a
/// one-byte read (a synchronisation).
///
/// Errors: rank/shape/dtype/device mismatch, `k == 0`, `k > L`, `D == 0`, `La == 0`, NaN.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use r2scp::{dissonance_topk, Context};
///
/// let dev = Device::Cpu;
/// // 1 sample, 3 retrieved tokens of D = 2, against 2 available tokens
/// let p = Tensor::new(&[[[1f32, 0.], [0., 1.], [-1., 0.1]]], &dev)?;
/// let h_avl = Tensor::new(&[[[1f32, 0.1], [1., -0.1]]], &dev)?;
/// let out = dissonance_topk(&p, Context::Tokens { h_avl: &h_avl, mask: None }, 1)?;
/// assert_eq!(out.noise_idx.to_vec2::<u32>()?, [[2]]); // the token pointing away
/// assert_eq!(out.noise_mask.to_vec2::<f32>()?, [[0., 0., 1.]]);
/// // or against a pooled context vector [B, D]
/// let g = Tensor::new(&[[0f32, 1.]], &dev)?;
/// let out = dissonance_topk(&p, Context::Anchor(&g), 2)?;
/// assert_eq!(out.noise_idx.to_vec2::<u32>()?, [[0, 2]]); // delta 1 and 0.90; token 1 is aligned
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn dissonance_topk(p: &Tensor, ctx: Context, k: usize) -> crate::Result<Dissonance> {
    let out = fused(p, ctx, k)?;
    refuse_nan_delta(OP, &out)?;
    Ok(out)
}

/// [`dissonance_topk`] before its NaN check.
fn fused(p: &Tensor, ctx: Context, k: usize) -> Result<Dissonance> {
    let dims = validate(p, &ctx, k)?;
    let p = p.contiguous()?;
    let indices = IndexOutputs::default();
    let op = |kind| DissonanceOp {
        dims,
        kind,
        indices: indices.clone(),
    };
    let delta = match ctx {
        Context::Anchor(g) => p.apply_op2_arc(
            &g.contiguous()?,
            Arc::new(Box::new(op(ContextKind::Anchor))),
        )?,
        Context::Tokens { h_avl, mask: None } => p.apply_op2_arc(
            &h_avl.contiguous()?,
            Arc::new(Box::new(op(ContextKind::Tokens))),
        )?,
        Context::Tokens {
            h_avl,
            mask: Some(m),
        } => p.apply_op3_arc(
            &h_avl.contiguous()?,
            &m.detach().contiguous()?,
            Arc::new(Box::new(op(ContextKind::Masked))),
        )?,
    };
    let Some((idx, mask)) = indices.take()? else {
        bail!("{OP}: the fused forward produced no indices (unsupported device?)")
    };
    Ok(Dissonance {
        delta,
        noise_idx: Tensor::from_storage(idx, (dims.b, dims.k), BackpropOp::none(), false),
        noise_mask: Tensor::from_storage(mask, (dims.b, dims.l), BackpropOp::none(), false),
    })
}

/// The NaN policy of the CAP ops: a NaN delta is an error naming its batch row and token.
fn refuse_nan_delta(op: &str, out: &Dissonance) -> crate::Result<()> {
    if let Some((b, i)) = crate::check::first_nan(&out.delta)? {
        bail!(
            "{op}: NaN delta at batch row {b}, token {i} (a NaN or infinite value in P or the context); NaN has no rank"
        );
    }
    Ok(())
}

/// `dissonance_topk` through the emulated `dissonance_topk_<dt>` kernel (f32, f16, bf16; CPU
/// tensors): same validation and outputs as the op, without the op's NaN check (so the
/// tests see the kernel's own NaN-last order); `delta` carries no gradient. Test
/// infrastructure (feature `emulate`).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn dissonance_topk_emulated(p: &Tensor, ctx: Context, k: usize) -> crate::Result<Dissonance> {
    use crate::kernel::{emu::EmuLauncher, tensor_ptr, Launcher, Ptr};
    let dims = validate(p, &ctx, k)?;
    if !p.device().is_cpu() {
        bail!("{OP} (emulated kernel): expects CPU tensors");
    }
    let (ctx_t, mask, anchor) = match ctx {
        Context::Anchor(g) => (g, None, true),
        Context::Tokens { h_avl, mask } => (h_avl, mask, false),
    };
    let p = p.contiguous()?;
    let ctx_t = ctx_t.contiguous()?;
    let mask = mask
        .map(|m| m.to_dtype(DType::F32)?.contiguous())
        .transpose()?;
    let (pp, _p) = tensor_ptr(&p, OP)?;
    let (cp, _c) = tensor_ptr(&ctx_t, OP)?;
    let mp = mask.as_ref().map(|m| tensor_ptr(m, OP)).transpose()?;
    let inputs = kernel::Inputs {
        p: pp,
        ctx: cp,
        dtype: p.dtype(),
        mask: mp.as_ref().map(|(m, _)| Ptr::new(m.addr())),
        anchor,
    };
    let x = EmuLauncher;
    let out = kernel::launch(&x, dims, &inputs)?;
    Ok(Dissonance {
        delta: x.tensor_of(out.delta, (dims.b, dims.l))?,
        noise_idx: x.tensor_of(out.idx, (dims.b, dims.k))?,
        noise_mask: x.tensor_of(out.mask, (dims.b, dims.l))?,
    })
}

/// Unfused reference of [`dissonance_topk`] from plain candle ops (mean, cosine, `arg_sort` of
/// delta, `scatter_add`); `delta` is differentiable through candle's autograd. Same
/// validation and NaN error.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// # use r2scp::cap::{dissonance_topk, dissonance_topk_reference, Context};
/// let p = Tensor::new(&[[[1f32, 0.], [0., 1.]]], &Device::Cpu)?;
/// let g = Tensor::new(&[[1f32, 0.2]], &Device::Cpu)?;
/// let (a, b) = (dissonance_topk(&p, Context::Anchor(&g), 1)?, dissonance_topk_reference(&p, Context::Anchor(&g), 1)?);
/// assert_eq!(a.noise_idx.to_vec2::<u32>()?, b.noise_idx.to_vec2::<u32>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn dissonance_topk_reference(p: &Tensor, ctx: Context, k: usize) -> crate::Result<Dissonance> {
    let out = reference(p, ctx, k)?;
    refuse_nan_delta("dissonance_topk_reference", &out)?;
    Ok(out)
}

fn reference(p: &Tensor, ctx: Context, k: usize) -> Result<Dissonance> {
    let dims = validate(p, &ctx, k)?;
    let acc = acc_dtype(p.dtype());
    let pf = p.to_dtype(acc)?;
    let g = match ctx {
        Context::Anchor(g) => g.to_dtype(acc)?,
        Context::Tokens { h_avl, mask } => pooled(&h_avl.to_dtype(acc)?, mask, acc)?.0,
    };
    let s = pf.broadcast_mul(&g.unsqueeze(1)?)?.sum(D::Minus1)?; // [B, L]
    let np = pf.sqr()?.sum(D::Minus1)?.sqrt()?; // [B, L]
    let ng = g.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?; // [B, 1]
    let den = (np.broadcast_mul(&ng)? + COS_EPS as f64)?;
    let delta = (1.0 - (s / den)?)?;
    let noise_idx = crate::topk::nan_last_keys(&delta.detach())?
        .arg_sort_last_dim(false)?
        .narrow(1, 0, dims.k)?
        .contiguous()?;
    let noise_mask = Tensor::zeros((dims.b, dims.l), DType::F32, p.device())?.scatter_add(
        &noise_idx,
        &Tensor::ones((dims.b, dims.k), DType::F32, p.device())?,
        1,
    )?;
    Ok(Dissonance {
        delta,
        noise_idx,
        noise_mask,
    })
}

/// Accumulation dtype of a storage dtype.
pub(crate) fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Masked mean of `h` [B, La, D] (already in `acc`): returns (g [B, D], weights [B, La],
/// safe counts [B, 1]).
fn pooled(h: &Tensor, mask: Option<&Tensor>, acc: DType) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, la, _) = h.dims3()?;
    let m = match mask {
        Some(m) => m.to_dtype(acc)?,
        None => Tensor::ones((b, la), acc, h.device())?,
    };
    let sum = h.broadcast_mul(&m.unsqueeze(2)?)?.sum(1)?;
    let cnt = m.sum_keepdim(1)?;
    let cnt_safe = (&cnt + cnt.eq(0.0)?.to_dtype(acc)?)?;
    Ok((sum.broadcast_div(&cnt_safe)?, m, cnt_safe))
}

/// Which context the fused op was given.
#[derive(Clone, Copy, Debug)]
enum ContextKind {
    Anchor,
    Tokens,
    Masked,
}

/// The noise indices [B, k] and mask [B, L] the fused op computes beside its output delta
/// (a candle custom op has one output): the forward stores them, [`dissonance_topk`] takes
/// them.
#[derive(Clone, Default)]
struct IndexOutputs(Arc<Mutex<Option<(Storage, Storage)>>>);

impl IndexOutputs {
    fn store(&self, idx: Storage, mask: Storage) -> Result<()> {
        *self.lock()? = Some((idx, mask));
        Ok(())
    }

    fn take(&self) -> Result<Option<(Storage, Storage)>> {
        Ok(self.lock()?.take())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<(Storage, Storage)>>> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{OP}: index-output lock poisoned")))
    }
}

/// The fused op: its output is delta; indices and mask go to `indices`.
struct DissonanceOp {
    dims: Dims,
    kind: ContextKind,
    indices: IndexOutputs,
}

impl DissonanceOp {
    fn cpu_forward(
        &self,
        p: (&CpuStorage, &Layout),
        ctx: (&CpuStorage, &Layout),
        mask: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let anchor = matches!(self.kind, ContextKind::Anchor);
        let out = cpu::forward_storage(p, ctx, mask, anchor, self.dims)?;
        self.indices.store(
            Storage::Cpu(CpuStorage::U32(out.idx)),
            Storage::Cpu(CpuStorage::F32(out.mask)),
        )?;
        Ok((out.delta, Shape::from((self.dims.b, self.dims.l))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_forward(
        &self,
        (p, pl): (&candle_core::CudaStorage, &Layout),
        (c, cl): (&candle_core::CudaStorage, &Layout),
        mask: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::kernel::cuda::{storage_ptr, CudaLauncher};
        use crate::kernel::Ptr;
        use candle_core::backend::BackendStorage;
        use candle_core::CudaStorage;
        let dev = p.device().clone();
        let mask32 = mask
            .map(|(ms, ml)| ms.to_dtype(ml, DType::F32))
            .transpose()?;
        let mask_ptr = match &mask32 {
            Some(m) => {
                let layout = Layout::contiguous(self.dims.b * self.dims.la);
                Some(Ptr::new(storage_ptr(m, &layout, OP)?.addr()))
            }
            None => None,
        };
        let inputs = kernel::Inputs {
            p: storage_ptr(p, pl, OP)?,
            ctx: storage_ptr(c, cl, OP)?,
            dtype: p.dtype(),
            mask: mask_ptr,
            anchor: matches!(self.kind, ContextKind::Anchor),
        };
        let out = kernel::launch(&CudaLauncher::new(&dev), self.dims, &inputs)?;
        self.indices.store(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(out.idx, dev.clone())),
            Storage::Cuda(CudaStorage::wrap_cuda_slice(out.mask, dev.clone())),
        )?;
        Ok((
            CudaStorage::wrap_cuda_slice(out.delta, dev),
            Shape::from((self.dims.b, self.dims.l)),
        ))
    }
}

impl CustomOp2 for DissonanceOp {
    fn name(&self) -> &'static str {
        "dissonance-topk"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((s1, l1), (s2, l2), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        p: &Tensor,
        ctx: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gp, gc) = delta_backward(p, ctx, None, self.kind, grad)?;
        Ok((Some(gp), Some(gc)))
    }
}

impl CustomOp3 for DissonanceOp {
    fn name(&self) -> &'static str {
        "dissonance-topk-masked"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        p: &Tensor,
        ctx: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gp, gc) = delta_backward(p, ctx, Some(mask), self.kind, grad)?;
        Ok((Some(gp), Some(gc), None))
    }
}

/// Analytic gradient of delta = 1 - s / (|p| |g| + eps), s = p.g, w.r.t. `p` and the context
/// (anchor g, or tokens h through the masked mean). Plain candle ops, any device.
fn delta_backward(
    p: &Tensor,
    ctx: &Tensor,
    mask: Option<&Tensor>,
    kind: ContextKind,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let acc = acc_dtype(p.dtype());
    let pf = p.to_dtype(acc)?; // [B, L, D]
    let gd = grad.to_dtype(acc)?.unsqueeze(2)?; // [B, L, 1]
    let (g, pool) = match kind {
        ContextKind::Anchor => (ctx.to_dtype(acc)?, None),
        ContextKind::Tokens | ContextKind::Masked => {
            let (g, m, cnt) = pooled(&ctx.to_dtype(acc)?, mask, acc)?;
            (g, Some((m, cnt)))
        }
    };
    let gu = g.unsqueeze(1)?; // [B, 1, D]
    let ng = g.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.unsqueeze(1)?; // [B, 1, 1]
    let np = pf.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?; // [B, L, 1]
    let s = pf.broadcast_mul(&gu)?.sum_keepdim(D::Minus1)?; // [B, L, 1]
    let den = (np.broadcast_mul(&ng)? + COS_EPS as f64)?; // [B, L, 1]
    let den2 = den.sqr()?;
    // d delta / d p = -g / den + s |g| p / (den^2 |p|)
    let c1 = (&gd / &den)?;
    let c2 = (&gd * &s)?
        .broadcast_mul(&ng)?
        .div(&(&den2 * np.maximum(1e-30)?)?)?;
    let grad_p = (pf.broadcast_mul(&c2)? - gu.broadcast_mul(&c1)?)?;
    // d delta / d g = sum_i [ -p_i / den_i + s_i |p_i| g / (den_i^2 |g|) ]
    let c3 = ((&gd * &s)? * &np)?
        .div(&den2)?
        .sum_keepdim(1)?
        .broadcast_div(&ng.maximum(1e-30)?)?; // [B, 1, 1]
    let grad_g = (gu.broadcast_mul(&c3)? - pf.broadcast_mul(&c1)?.sum_keepdim(1)?)?; // [B, 1, D]
    let grad_ctx = match pool {
        None => grad_g.squeeze(1)?,
        Some((m, cnt)) => {
            let w = m.broadcast_div(&cnt)?.unsqueeze(2)?; // [B, La, 1]
            w.broadcast_mul(&grad_g)?
        }
    };
    Ok((grad_p.to_dtype(p.dtype())?, grad_ctx.to_dtype(ctx.dtype())?))
}
