//! `topk_rows`: the CAP top-k over score rows (phase 2 saliency selection, Eq. 7).
//!
//! Files of this op: `kernel.rs` (plan and device path of `kernels/topk_rows.cu`, CUDA and
//! emulator); the CPU path is `crate::topk::row_topk` over rows in parallel; tests in
//! `tests/ops/topk_rows.rs`.

pub mod kernel;

use crate::check::contiguous_slice;
use crate::elem::Acc;
use crate::error::bail;
use crate::topk::{row_topk, NanPolicy};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use rayon::prelude::*;

const OP: &str = "topk_rows";

fn validate(scores: &Tensor, k: usize) -> Result<(usize, usize)> {
    let (b, l) = match scores.dims() {
        &[b, l] => (b, l),
        s => bail!("{OP}: scores must have rank 2 [B, L], got shape {s:?}"),
    };
    if !matches!(scores.dtype(), DType::F32 | DType::F64) {
        bail!(
            "{OP}: scores dtype {:?}, expected f32 (or f64 on CPU)",
            scores.dtype()
        );
    }
    if k == 0 {
        bail!("{OP}: k = 0, expected 1 <= k <= L = {l}");
    }
    if k > l {
        bail!("{OP}: k = {k} exceeds the L = {l} scores per row");
    }
    Ok((b, l))
}

/// The CPU path: every row's top-k in parallel.
fn cpu_topk<A: Acc>(s: &[A], l: usize, k: usize) -> Result<(Vec<A>, Vec<u32>)> {
    let b = s.len() / l;
    let mut idx = vec![0u32; b * k];
    let mut val = vec![A::ZERO; b * k];
    idx.par_chunks_mut(k)
        .zip(val.par_chunks_mut(k))
        .enumerate()
        .with_min_len((16_384 / l).max(1))
        .try_for_each_init(
            || None,
            |topk, (bi, (irow, vrow))| {
                let row = &s[bi * l..(bi + 1) * l];
                row_topk(row, k, NanPolicy::RankLast, irow, topk).map_err(|(i, _)| {
                    candle_core::Error::Msg(format!("{OP}: internal error, NaN at column {i}"))
                })?;
                for (v, &i) in vrow.iter_mut().zip(irow.iter()) {
                    *v = row[i as usize];
                }
                Ok::<(), candle_core::Error>(())
            },
        )?;
    Ok((val, idx))
}

/// The NaN policy of the CAP ops: a NaN score is an error naming its row and column.
fn refuse_nan(op: &str, scores: &Tensor) -> crate::Result<()> {
    if let Some((b, i)) = crate::check::first_nan(scores)? {
        bail!("{op}: NaN score at row {b}, column {i}; NaN has no rank");
    }
    Ok(())
}

/// Top-`k` of every row of `scores` [B, L] (f32; f64 on CPU): returns (values [B, k] in the
/// dtype of `scores`, indices [B, k] u32), larger first, ties to the lower index; `-inf` is
/// a number (ranked last), NaN an error naming its row and column (on CUDA finding it costs
/// one reduction and a one-byte read). The same top-k machinery as
/// [`fn@super::dissonance_topk`]. Values are differentiable w.r.t. `scores` (as a gather at
/// the indices); indices carry no gradient. Errors: rank != 2, a non-float dtype, `k == 0`,
/// `k > L`, NaN.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let scores = Tensor::new(&[[0.1f32, 0.9, 0.5], [3., 3., f32::NEG_INFINITY]], &Device::Cpu)?;
/// let (values, idx) = r2scp::topk_rows(&scores, 2)?;
/// assert_eq!(idx.to_vec2::<u32>()?, [[1, 2], [0, 1]]); // ties to the lower index
/// assert_eq!(values.to_vec2::<f32>()?, [[0.9, 0.5], [3., 3.]]);
/// let nan = Tensor::new(&[[0.1f32, f32::NAN]], &Device::Cpu)?;
/// assert_eq!(
///     r2scp::topk_rows(&nan, 1).unwrap_err().to_string(),
///     "topk_rows: NaN score at row 0, column 1; NaN has no rank"
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn topk_rows(scores: &Tensor, k: usize) -> crate::Result<(Tensor, Tensor)> {
    let (b, l) = validate(scores, k)?;
    refuse_nan(OP, scores)?;
    Ok(fused(scores, b, l, k)?)
}

/// The fused top-k of validated, NaN-free `scores`.
fn fused(scores: &Tensor, b: usize, l: usize, k: usize) -> Result<(Tensor, Tensor)> {
    let s = scores.contiguous()?;
    let (vals, idx) = {
        let (storage, layout) = s.storage_and_layout();
        match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => {
                let (val, idx) = cpu_topk(contiguous_slice(v, layout, OP)?, l, k)?;
                (
                    Storage::Cpu(CpuStorage::F32(val)),
                    Storage::Cpu(CpuStorage::U32(idx)),
                )
            }
            Storage::Cpu(CpuStorage::F64(v)) => {
                let (val, idx) = cpu_topk(contiguous_slice(v, layout, OP)?, l, k)?;
                (
                    Storage::Cpu(CpuStorage::F64(val)),
                    Storage::Cpu(CpuStorage::U32(idx)),
                )
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => {
                use crate::kernel::cuda::{storage_ptr, CudaLauncher};
                use candle_core::backend::BackendStorage;
                if c.dtype() != DType::F32 {
                    bail!("{OP}: dtype {:?} has no CUDA kernel (f32)", c.dtype());
                }
                let dev = c.device().clone();
                let scores = crate::kernel::Ptr::new(storage_ptr(c, layout, OP)?.addr());
                let out = kernel::launch(&CudaLauncher::new(&dev), scores, b, l, k)?;
                (
                    Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(
                        out.vals,
                        dev.clone(),
                    )),
                    Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(out.idx, dev)),
                )
            }
            other => bail!(
                "{OP}: unsupported storage {:?} on {:?}",
                other.dtype(),
                scores.device().location()
            ),
        }
    };
    let idx = Tensor::from_storage(idx, (b, k), BackpropOp::none(), false);
    let vals = if scores.track_op() {
        scores.gather(&idx, 1)?
    } else {
        Tensor::from_storage(vals, (b, k), BackpropOp::none(), false)
    };
    Ok((vals, idx))
}

/// `topk_rows` through the emulated `topk_rows_f32` kernel (f32 CPU tensors), without the
/// op's NaN check (the kernel ranks NaN as -inf, and the tests check that order). Test
/// infrastructure (feature `emulate`).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn topk_rows_emulated(scores: &Tensor, k: usize) -> crate::Result<(Tensor, Tensor)> {
    use crate::kernel::{emu::EmuLauncher, tensor_ptr, Launcher, Ptr};
    let (b, l) = validate(scores, k)?;
    if !scores.device().is_cpu() || scores.dtype() != DType::F32 {
        bail!("{OP} (emulated kernel): expects f32 CPU tensors");
    }
    let s = scores.contiguous()?;
    let (sp, _s) = tensor_ptr(&s, OP)?;
    let x = EmuLauncher;
    let out = kernel::launch(&x, Ptr::new(sp.addr()), b, l, k)?;
    Ok((
        x.tensor_of(out.vals, (b, k))?,
        x.tensor_of(out.idx, (b, k))?,
    ))
}

/// Unfused reference of [`topk_rows`]: `arg_sort_last_dim` (stable, so ties keep the lower
/// index) of the scores, `narrow`, `gather` of the original scores. Same validation and NaN
/// error.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let s = Tensor::new(&[[0.1f32, 0.9, 0.5]], &Device::Cpu)?;
/// let (_, idx) = r2scp::cap::topk_rows_reference(&s, 2)?;
/// assert_eq!(idx.to_vec2::<u32>()?, [[1, 2]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn topk_rows_reference(scores: &Tensor, k: usize) -> crate::Result<(Tensor, Tensor)> {
    validate(scores, k)?;
    refuse_nan("topk_rows_reference", scores)?;
    let idx = crate::topk::nan_last_keys(&scores.detach().contiguous()?)?
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?
        .contiguous()?;
    Ok((scores.contiguous()?.gather(&idx, 1)?, idx))
}
