//! `topk_rows`: the CAP top-k over score rows (phase 2 saliency selection, Eq. 7).
//!
//! Files of this op: `kernel.rs` (plan and device path of `kernels/topk_rows.cu`, CUDA and
//! emulator); the CPU path is `crate::topk::row_topk` over rows in parallel; tests in
//! `tests/ops/topk_rows.rs`.

pub mod kernel;

use crate::check::contiguous_slice;
use crate::elem::Acc;
use crate::topk::{row_topk, NanPolicy};
use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, DType, Result, Storage, Tensor};
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

/// Top-`k` of every row of `scores` [B, L] (f32; f64 on CPU): returns (values [B, k] in the
/// dtype of `scores`, indices [B, k] u32), larger first, ties to the lower index, NaN ranked
/// as -inf. The same top-k machinery as [`fn@super::dissonance_topk`]. Values are
/// differentiable w.r.t. `scores` (as a gather at the indices); indices carry no gradient.
/// Errors: rank != 2, a non-float dtype, `k == 0`, `k > L`.
pub fn topk_rows(scores: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let (b, l) = validate(scores, k)?;
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

/// `topk_rows` through the emulated `topk_rows_f32` kernel (f32 CPU tensors). Test
/// infrastructure (feature `emulate`).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn topk_rows_emulated(scores: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
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
/// index) of the scores with NaN keyed as -inf (ranked last, as the fused op does), `narrow`,
/// `gather` of the original scores.
pub fn topk_rows_reference(scores: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    validate(scores, k)?;
    let idx = crate::topk::nan_last_keys(&scores.detach().contiguous()?)?
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?
        .contiguous()?;
    Ok((scores.contiguous()?.gather(&idx, 1)?, idx))
}
