//! `dissonance_topk`: phase 1 of CAP (Eq. 2-5).

use super::elem::{
    check_device, check_dims2, check_float, check_like, contiguous_slice, dims3, dot, mask_values,
    middle_dim, row_topk, Acc, CapElem,
};
use super::{Context, Dissonance, COS_EPS};
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

const OP: &str = "dissonance_topk";

/// Problem sizes after validation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub l: usize,
    pub la: usize,
    pub d: usize,
    pub k: usize,
}

/// Validates shapes, dtypes, devices and k; returns the sizes (`la` = 0 for an anchor).
pub(crate) fn validate(p: &Tensor, ctx: &Context, k: usize) -> Result<Dims> {
    let (b, l, d) = dims3((p, "P"), OP)?;
    check_float(p.dtype(), OP, "P")?;
    if k == 0 {
        bail!("{OP}: k = 0, expected 1 <= k <= L = {l}");
    }
    if k > l {
        bail!("{OP}: k = {k} exceeds the L = {l} retrieved tokens");
    }
    if d == 0 {
        bail!("{OP}: P has feature dim D = 0, expected D >= 1");
    }
    let la = match ctx {
        Context::Anchor(g) => {
            check_dims2((g, "anchor"), "[B, D]", b, d, OP)?;
            check_like((g, "anchor"), (p, "P"), OP)?;
            0
        }
        Context::Tokens { h_avl, mask } => {
            let la = middle_dim((h_avl, "h_avl"), "La", b, d, OP)?;
            if la == 0 {
                bail!("{OP}: h_avl has La = 0 tokens, expected La >= 1");
            }
            check_like((h_avl, "h_avl"), (p, "P"), OP)?;
            if let Some(m) = mask {
                check_dims2((m, "mask"), "[B, La]", b, la, OP)?;
                if !matches!(m.dtype(), DType::F32 | DType::U8) {
                    bail!("{OP}: mask dtype {:?}, expected f32 or u8", m.dtype());
                }
                check_device((m, "mask"), (p, "P"), OP)?;
            }
            la
        }
    };
    Ok(Dims { b, l, la, d, k })
}

/// Phase 1 of CAP, fused: masked mean pooling of the context (Eq. 2), delta = 1 - cosine of
/// every row of `p` [B, L, D] with the pooled anchor (Eq. 3, epsilon [`COS_EPS`]), and the
/// top-`k` noise indices by delta (Eq. 5), in one pass per batch row (CPU, rayon over rows) or
/// one kernel (CUDA). `p` and the context share one float dtype (f32, f16, bf16; f64 on CPU).
///
/// Errors: rank/shape/dtype/device mismatch, `k == 0`, `k > L`, `D == 0`, `La == 0`.
/// `delta` carries the gradient w.r.t. `p` and `h_avl` (or the anchor); indices and mask none.
pub fn dissonance_topk(p: &Tensor, ctx: Context, k: usize) -> Result<Dissonance> {
    let dims = validate(p, &ctx, k)?;
    let p = p.contiguous()?;
    let side = Arc::new(Mutex::new(None));
    let delta = match ctx {
        Context::Anchor(g) => {
            let op = DissonanceOp {
                dims,
                kind: Kind::Anchor,
                side: side.clone(),
            };
            p.apply_op2_arc(&g.contiguous()?, Arc::new(Box::new(op)))?
        }
        Context::Tokens { h_avl, mask: None } => {
            let op = DissonanceOp {
                dims,
                kind: Kind::Tokens,
                side: side.clone(),
            };
            p.apply_op2_arc(&h_avl.contiguous()?, Arc::new(Box::new(op)))?
        }
        Context::Tokens {
            h_avl,
            mask: Some(m),
        } => {
            let op = DissonanceOp {
                dims,
                kind: Kind::Masked,
                side: side.clone(),
            };
            p.apply_op3_arc(
                &h_avl.contiguous()?,
                &m.detach().contiguous()?,
                Arc::new(Box::new(op)),
            )?
        }
    };
    let taken = side
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{OP}: side-output lock poisoned")))?
        .take();
    let Some((idx, mask)) = taken else {
        bail!("{OP}: the fused forward produced no indices (unsupported device?)")
    };
    Ok(Dissonance {
        delta,
        noise_idx: Tensor::from_storage(idx, (dims.b, dims.k), BackpropOp::none(), false),
        noise_mask: Tensor::from_storage(mask, (dims.b, dims.l), BackpropOp::none(), false),
    })
}

/// Unfused reference of [`dissonance_topk`] from plain candle ops (mean, cosine, `arg_sort`,
/// `scatter_add`); `delta` is differentiable through candle's autograd. Same validation.
pub fn dissonance_topk_reference(p: &Tensor, ctx: Context, k: usize) -> Result<Dissonance> {
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
    let den = (np.broadcast_mul(&ng)? + COS_EPS)?;
    let delta = (1.0 - (s / den)?)?;
    let noise_idx = delta
        .detach()
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

#[derive(Clone, Copy, Debug)]
enum Kind {
    Anchor,
    Tokens,
    Masked,
}

pub(crate) type Side = Arc<Mutex<Option<(Storage, Storage)>>>;

/// The fused op: its output is delta; indices and mask go to `side`.
struct DissonanceOp {
    dims: Dims,
    kind: Kind,
    side: Side,
}

enum CpuCtx<'a, T: CapElem> {
    Anchor(&'a [T]),
    Tokens {
        h: &'a [T],
        mask: Option<Vec<T::Acc>>,
    },
}

/// Fused CPU forward: returns (delta [B*L], idx [B*k], mask [B*L]).
fn cpu_dissonance<T: CapElem>(
    p: &[T],
    ctx: CpuCtx<'_, T>,
    dims: Dims,
) -> (Vec<T::Acc>, Vec<u32>, Vec<f32>) {
    let Dims { b, l, la, d, k } = dims;
    let mut delta = vec![T::Acc::ZERO; b * l];
    let mut idx = vec![0u32; b * k];
    let mut nmask = vec![0f32; b * l];
    let eps = T::Acc::from_f64(COS_EPS);
    // one task per batch row; small rows are grouped so a task carries ~64k MACs.
    let work = (l + la.max(1)) * d;
    let min_len = (65_536 / work.max(1)).max(1);
    delta
        .par_chunks_mut(l)
        .zip(idx.par_chunks_mut(k))
        .zip(nmask.par_chunks_mut(l))
        .enumerate()
        .with_min_len(min_len)
        .for_each_init(
            || (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
            |(buf, gbuf, gacc, scratch), (bi, ((drow, irow), mrow))| {
                // Eq. 2: the anchor.
                let g: &[T::Acc] = match &ctx {
                    CpuCtx::Anchor(a) => T::widen(&a[bi * d..(bi + 1) * d], gbuf),
                    CpuCtx::Tokens { h, mask } => {
                        gacc.clear();
                        gacc.resize(d, T::Acc::ZERO);
                        let mut cnt = T::Acc::ZERO;
                        for t in 0..la {
                            let w = match mask {
                                Some(m) => m[bi * la + t],
                                None => T::Acc::ONE,
                            };
                            if w == T::Acc::ZERO {
                                continue;
                            }
                            let row = T::widen(&h[(bi * la + t) * d..(bi * la + t + 1) * d], buf);
                            super::elem::axpy(gacc, w, row);
                            cnt = cnt + w;
                        }
                        if cnt != T::Acc::ZERO {
                            for v in gacc.iter_mut() {
                                *v = *v / cnt;
                            }
                        }
                        gacc
                    }
                };
                let ng = dot(g, g).sqrt();
                // Eq. 3: one cosine per retrieved token.
                for (i, dv) in drow.iter_mut().enumerate() {
                    let row = T::widen(&p[(bi * l + i) * d..(bi * l + i + 1) * d], buf);
                    let s = dot(row, g);
                    let np = dot(row, row).sqrt();
                    *dv = T::Acc::ONE - s / (np * ng + eps);
                }
                // Eq. 5: top-k by delta, ties to the lower index.
                row_topk(drow, k, irow, scratch);
                for &i in irow.iter() {
                    mrow[i as usize] = 1.0;
                }
            },
        );
    (delta, idx, nmask)
}

fn run_cpu<T: CapElem>(
    p: &[T],
    ctx: CpuCtx<'_, T>,
    dims: Dims,
    side: &Side,
) -> Result<(CpuStorage, Shape)> {
    let (delta, idx, nmask) = cpu_dissonance(p, ctx, dims);
    store_side(
        side,
        Storage::Cpu(CpuStorage::U32(idx)),
        Storage::Cpu(CpuStorage::F32(nmask)),
    )?;
    Ok((T::Acc::into_storage(delta), Shape::from((dims.b, dims.l))))
}

pub(crate) fn store_side(side: &Side, idx: Storage, mask: Storage) -> Result<()> {
    let mut guard = side
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{OP}: side-output lock poisoned")))?;
    *guard = Some((idx, mask));
    Ok(())
}

macro_rules! dispatch_cpu {
    ($p:expr, $l1:expr, $s2:expr, $l2:expr, $mask:expr, $kind:expr, $dims:expr, $side:expr) => {{
        match ($p, $s2) {
            (CpuStorage::F32(p), CpuStorage::F32(c)) => dispatch_cpu!(@one f32, p, c, $l1, $l2, $mask, $kind, $dims, $side),
            (CpuStorage::F16(p), CpuStorage::F16(c)) => dispatch_cpu!(@one f16, p, c, $l1, $l2, $mask, $kind, $dims, $side),
            (CpuStorage::BF16(p), CpuStorage::BF16(c)) => dispatch_cpu!(@one bf16, p, c, $l1, $l2, $mask, $kind, $dims, $side),
            (CpuStorage::F64(p), CpuStorage::F64(c)) => dispatch_cpu!(@one f64, p, c, $l1, $l2, $mask, $kind, $dims, $side),
            (p, c) => bail!(
                "{OP}: unsupported dtypes P {:?} / context {:?}",
                p.dtype(),
                c.dtype()
            ),
        }
    }};
    (@one $t:ty, $p:expr, $c:expr, $l1:expr, $l2:expr, $mask:expr, $kind:expr, $dims:expr, $side:expr) => {{
        let p: &[$t] = contiguous_slice($p, $l1, OP)?;
        let c: &[$t] = contiguous_slice($c, $l2, OP)?;
        let mask: Option<(&CpuStorage, &Layout)> = $mask;
        let mask = match mask {
            Some((ms, ml)) => Some(mask_values::<<$t as CapElem>::Acc>(ms, ml, OP)?),
            None => None,
        };
        let ctx = match $kind {
            Kind::Anchor => CpuCtx::Anchor(c),
            Kind::Tokens | Kind::Masked => CpuCtx::Tokens { h: c, mask },
        };
        run_cpu::<$t>(p, ctx, $dims, $side)
    }};
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
        dispatch_cpu!(s1, l1, s2, l2, None, self.kind, self.dims, &self.side)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let anchor = matches!(self.kind, Kind::Anchor);
        super::cuda::dissonance_fwd(s1, l1, s2, l2, None, anchor, self.dims, &self.side)
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
        dispatch_cpu!(
            s1,
            l1,
            s2,
            l2,
            Some((s3, l3)),
            self.kind,
            self.dims,
            &self.side
        )
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
        super::cuda::dissonance_fwd(s1, l1, s2, l2, Some((s3, l3)), false, self.dims, &self.side)
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
    kind: Kind,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let acc = acc_dtype(p.dtype());
    let pf = p.to_dtype(acc)?; // [B, L, D]
    let gd = grad.to_dtype(acc)?.unsqueeze(2)?; // [B, L, 1]
    let (g, pool) = match kind {
        Kind::Anchor => (ctx.to_dtype(acc)?, None),
        Kind::Tokens | Kind::Masked => {
            let (g, m, cnt) = pooled(&ctx.to_dtype(acc)?, mask, acc)?;
            (g, Some((m, cnt)))
        }
    };
    let gu = g.unsqueeze(1)?; // [B, 1, D]
    let ng = g.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.unsqueeze(1)?; // [B, 1, 1]
    let np = pf.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?; // [B, L, 1]
    let s = pf.broadcast_mul(&gu)?.sum_keepdim(D::Minus1)?; // [B, L, 1]
    let den = (np.broadcast_mul(&ng)? + COS_EPS)?; // [B, L, 1]
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
