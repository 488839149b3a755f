//! `gather_inject`: phase 3 of CAP (Eq. 8-9), out of place, with its backward.

use super::elem::{
    axpy, check_device, check_dims2, check_float, check_like, contiguous_slice, dims3, middle_dim,
    CapElem,
};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

const OP: &str = "gather_inject";

/// Validated sizes and host copies of the indices.
#[derive(Clone, Debug)]
pub(crate) struct InjectPlan {
    pub b: usize,
    pub l: usize,
    pub ls: usize,
    pub d: usize,
    pub k: usize,
    /// [B*k] noise (target) rows.
    pub noise: Vec<u32>,
    /// [B*k] salient (source) rows.
    pub sal: Vec<u32>,
}

/// Validates shapes, dtypes and every index (range, and no duplicate noise index within a
/// batch row) on the host, before any kernel runs.
pub(crate) fn validate(
    h: &Tensor,
    src: &Tensor,
    noise_idx: &Tensor,
    salient_idx: &Tensor,
) -> Result<InjectPlan> {
    let (b, l, d) = dims3((h, "h"), OP)?;
    let ls = middle_dim((src, "src"), "Ls", b, d, OP)?;
    check_float(h.dtype(), OP, "h")?;
    check_like((src, "src"), (h, "h"), OP)?;
    check_device((noise_idx, "noise_idx"), (h, "h"), OP)?;
    check_device((salient_idx, "salient_idx"), (h, "h"), OP)?;
    let k = match noise_idx.dims() {
        &[nb, k] if nb == b => k,
        s => bail!("{OP}: noise_idx has shape {s:?}, expected [B, k] with B = {b}"),
    };
    check_dims2((salient_idx, "salient_idx"), "[B, k]", b, k, OP)?;
    for (name, t) in [("noise_idx", noise_idx), ("salient_idx", salient_idx)] {
        if t.dtype() != DType::U32 {
            bail!("{OP}: {name} has dtype {:?}, expected u32", t.dtype());
        }
    }
    if k == 0 {
        bail!("{OP}: k = 0, expected 1 <= k <= L = {l}");
    }
    if k > l {
        bail!("{OP}: k = {k} noise indices per row exceed the L = {l} rows of h");
    }
    // Rows of zero width would make the CPU path chunk by 0 (a panic), as in dissonance_topk.
    if d == 0 {
        bail!("{OP}: h has feature dim D = 0, expected D >= 1");
    }
    let host = |t: &Tensor| -> Result<Vec<u32>> {
        t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u32>()
    };
    let noise = host(noise_idx)?;
    let sal = host(salient_idx)?;
    let mut seen = vec![usize::MAX; l];
    for bi in 0..b {
        for j in 0..k {
            let n = noise[bi * k + j] as usize;
            if n >= l {
                bail!("{OP}: noise_idx[{bi}, {j}] = {n} is out of range, expected < L = {l}");
            }
            if seen[n] == bi {
                bail!("{OP}: noise_idx row {bi} holds index {n} twice; noise indices must be distinct");
            }
            seen[n] = bi;
            let s = sal[bi * k + j] as usize;
            if s >= ls {
                bail!("{OP}: salient_idx[{bi}, {j}] = {s} is out of range, expected < Ls = {ls}");
            }
        }
    }
    Ok(InjectPlan {
        b,
        l,
        ls,
        d,
        k,
        noise,
        sal,
    })
}

/// Phase 3 of CAP (Eq. 8-9), out of place: returns a copy of `h` [B, L, D] in which row
/// `noise_idx[b, j]` is replaced by `src[b, salient_idx[b, j]]` for every j (`src` [B, Ls, D],
/// the dtype of `h`; indices [B, k] u32). One fused pass (CPU) or one kernel (CUDA).
///
/// Backward: grad_h = output gradient with the noise rows zeroed; grad_src accumulates each
/// injected row's gradient into its salient source row (a row used twice receives both).
/// Errors (all checked on the host before any kernel): shape/dtype/device mismatch, `k == 0`,
/// `k > L`, `D == 0`, an index out of range, a noise index repeated within a batch row.
pub fn gather_inject(
    h: &Tensor,
    src: &Tensor,
    noise_idx: &Tensor,
    salient_idx: &Tensor,
) -> Result<Tensor> {
    let plan = validate(h, src, noise_idx, salient_idx)?;
    let op = InjectOp {
        plan,
        noise_t: noise_idx.contiguous()?,
        sal_t: salient_idx.contiguous()?,
    };
    h.contiguous()?.apply_op2(&src.contiguous()?, op)
}

/// Unfused reference of [`gather_inject`] from plain candle ops, literally Eq. 9:
/// `(1 - M_noise) * h + M_noise * Gather(src, salient)`, with the gather by `gather` and the
/// placement by a one-hot [B, L, k] matmul (differentiable through candle's autograd; candle
/// 0.11.1's `scatter_add` backward rejects this shape). Same validation.
pub fn gather_inject_reference(
    h: &Tensor,
    src: &Tensor,
    noise_idx: &Tensor,
    salient_idx: &Tensor,
) -> Result<Tensor> {
    let InjectPlan { b, l, d, k, .. } = validate(h, src, noise_idx, salient_idx)?;
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

/// Rows per rayon task so that a task moves at least ~256 KiB.
fn min_rows(row_bytes: usize) -> usize {
    (262_144 / row_bytes.max(1)).max(1)
}

fn cpu_forward<T: Copy + Send + Sync>(h: &[T], src: &[T], plan: &InjectPlan) -> Vec<T> {
    let InjectPlan { l, ls, d, k, .. } = *plan;
    let mut out = h.to_vec();
    out.par_chunks_mut(l * d)
        .enumerate()
        .with_min_len(min_rows(l * d * std::mem::size_of::<T>()))
        .for_each(|(bi, orow)| {
            for j in 0..k {
                let n = plan.noise[bi * k + j] as usize;
                let s = plan.sal[bi * k + j] as usize;
                let from = &src[(bi * ls + s) * d..(bi * ls + s + 1) * d];
                orow[n * d..(n + 1) * d].copy_from_slice(from);
            }
        });
    out
}

fn cpu_zero_rows<T: Copy + Send + Sync + Default>(g: &[T], plan: &InjectPlan) -> Vec<T> {
    let InjectPlan { l, d, k, .. } = *plan;
    let mut out = g.to_vec();
    out.par_chunks_mut(l * d)
        .enumerate()
        .with_min_len(min_rows(l * d * std::mem::size_of::<T>()))
        .for_each(|(bi, orow)| {
            for j in 0..k {
                let n = plan.noise[bi * k + j] as usize;
                orow[n * d..(n + 1) * d].fill(T::default());
            }
        });
    out
}

fn cpu_scatter_rows<T: CapElem + Default>(g: &[T], plan: &InjectPlan) -> Vec<T> {
    let InjectPlan { l, ls, d, k, .. } = *plan;
    let mut out = vec![T::default(); plan.b * ls * d];
    out.par_chunks_mut(ls * d)
        .enumerate()
        .with_min_len(min_rows(ls * d * std::mem::size_of::<T>()))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(acc, buf), (bi, orow)| {
                for s in 0..ls {
                    // sum, in j order, the gradients of the rows this source row was injected into
                    let mut used = false;
                    for j in 0..k {
                        if plan.sal[bi * k + j] as usize != s {
                            continue;
                        }
                        if !used {
                            acc.clear();
                            acc.resize(d, <T::Acc as super::elem::Acc>::ZERO);
                            used = true;
                        }
                        let n = plan.noise[bi * k + j] as usize;
                        let row = T::widen(&g[(bi * l + n) * d..(bi * l + n + 1) * d], buf);
                        axpy(acc, <T::Acc as super::elem::Acc>::ONE, row);
                    }
                    if used {
                        T::narrow(acc, &mut orow[s * d..(s + 1) * d]);
                    }
                }
            },
        );
    out
}

/// The forward op on (h, src); indices live in the op.
struct InjectOp {
    plan: InjectPlan,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    noise_t: Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    sal_t: Tensor,
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
        let shape = Shape::from((self.plan.b, self.plan.l, self.plan.d));
        macro_rules! go {
            ($v:ident, $h:expr, $s:expr) => {
                CpuStorage::$v(cpu_forward(
                    contiguous_slice($h, l1, OP)?,
                    contiguous_slice($s, l2, OP)?,
                    &self.plan,
                ))
            };
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(h), CpuStorage::F32(s)) => go!(F32, h, s),
            (CpuStorage::F16(h), CpuStorage::F16(s)) => go!(F16, h, s),
            (CpuStorage::BF16(h), CpuStorage::BF16(s)) => go!(BF16, h, s),
            (CpuStorage::F64(h), CpuStorage::F64(s)) => go!(F64, h, s),
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
        super::cuda::inject_fwd(s1, l1, s2, l2, &self.noise_t, &self.sal_t, &self.plan)
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
            fwd: self,
            part: Part::ZeroRows,
        })?;
        let gs = grad.apply_op1_no_bwd(&InjectBwdOp {
            fwd: self,
            part: Part::ScatterRows,
        })?;
        Ok((Some(gh), Some(gs)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Part {
    /// grad_h: the output gradient with the noise rows zeroed.
    ZeroRows,
    /// grad_src [B, Ls, D]: injected rows' gradients summed into their salient rows.
    ScatterRows,
}

struct InjectBwdOp<'a> {
    fwd: &'a InjectOp,
    part: Part,
}

impl CustomOp1 for InjectBwdOp<'_> {
    fn name(&self) -> &'static str {
        "gather-inject-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.fwd.plan;
        macro_rules! go {
            ($v:ident, $g:expr) => {{
                let g = contiguous_slice($g, l, OP)?;
                CpuStorage::$v(match self.part {
                    Part::ZeroRows => cpu_zero_rows(g, p),
                    Part::ScatterRows => cpu_scatter_rows(g, p),
                })
            }};
        }
        let out = match s {
            CpuStorage::F32(g) => go!(F32, g),
            CpuStorage::F16(g) => go!(F16, g),
            CpuStorage::BF16(g) => go!(BF16, g),
            CpuStorage::F64(g) => go!(F64, g),
            g => bail!("{OP}: unsupported gradient dtype {:?}", g.dtype()),
        };
        let shape = match self.part {
            Part::ZeroRows => Shape::from((p.b, p.l, p.d)),
            Part::ScatterRows => Shape::from((p.b, p.ls, p.d)),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::inject_bwd(
            s,
            l,
            &self.fwd.noise_t,
            &self.fwd.sal_t,
            &self.fwd.plan,
            self.part,
        )
    }
}
