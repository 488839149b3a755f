//! `cosine_topk`: fused cosine top-n of a query batch against a memory bank (paper Eq. 1).
//!
//! Files of this op: `cpu.rs` (B < 16) and `qlanes.rs` (B >= 16), the fused CPU paths;
//! `kernel.rs`, the launch plan and the device path of `kernels/cosine_topk.cu` (CUDA and the
//! emulator, `kernels/emu/cosine_topk.cpp`); `contract.rs`, the input checks; tests in
//! `tests/ops/cosine_topk.rs`.

mod chunks;
mod contract;
mod cpu;
pub mod kernel;
mod qlanes;
pub mod tensor_core;

use crate::kernel::abi::COS_EPS;
use candle_core::{bail, DType, Device, Result, Tensor, D};
use contract::check;

/// Fused cosine top-n (paper Eq. 1); see [`crate::retrieve`] for the full contract.
///
/// `queries` [B, D] (f32 or the keys' dtype), `keys` [M, D] (f32|f16|bf16), `key_norms`
/// \[M\] f32 (`None` = computed), `exclude` \[B\] u32 (`u32::MAX` = none). Returns
/// `(scores [B, n] f32 descending, indices [B, n] u32)`; ties go to the lower index.
/// CPU tensors run the fused CPU path (tiled, vectorised, threaded, no B x M matrix);
/// CUDA tensors (feature `cuda`) run `kernels/cosine_topk.cu`.
pub fn cosine_topk(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let c = check("cosine_topk", queries, keys, key_norms, n, exclude)?;
    match keys.device() {
        Device::Cpu => cpu::cosine_topk_cpu(queries, keys, key_norms, &c),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let kn = match key_norms {
                Some(t) => t.clone(),
                None => self::key_norms(keys)?,
            };
            kernel::cosine_topk_cuda(queries, keys, &kn, &c)
        }
        dev => bail!(
            "cosine_topk: device {:?} is not supported (CPU, or CUDA with feature `cuda`)",
            dev.location()
        ),
    }
}

/// `cosine_topk` run through the emulated CUDA kernels (`kernels/cosine_topk.cu` on CPU
/// threads) on CPU tensors: same contract and checks as [`cosine_topk`], n <=
/// [`kernel::KMAX`]; the plan is [`kernel::plan`] for [`crate::kernel::EMU_SM_COUNT`]
/// multiprocessors. Test infrastructure (feature `emulate`).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn cosine_topk_emulated(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let op = "cosine_topk (emulated kernel)";
    let c = check(op, queries, keys, key_norms, n, exclude)?;
    if !keys.device().is_cpu() {
        bail!("{op}: expects CPU tensors");
    }
    let kn = match key_norms {
        Some(t) => t.clone(),
        None => self::key_norms(keys)?,
    };
    kernel::run_on(&crate::kernel::emu::EmuLauncher, &c, queries, keys, &kn)
}

/// [`cosine_topk_emulated`] with the kernel forced (the tensor-core path even for small
/// batches, where [`kernel::choose`] would pick the bandwidth kernel) and the tensor-core test
/// knobs. A forced tensor-core call the path cannot take (D, n, alignment) is an error. Test
/// infrastructure (feature `emulate`).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn cosine_topk_emulated_with(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
    kernel: kernel::Kernel,
    knobs: tensor_core::TcOverrides,
) -> Result<(Tensor, Tensor)> {
    let op = "cosine_topk (emulated kernel)";
    let c = check(op, queries, keys, key_norms, n, exclude)?;
    if !keys.device().is_cpu() {
        bail!("{op}: expects CPU tensors");
    }
    let kn = match key_norms {
        Some(t) => t.clone(),
        None => self::key_norms(keys)?,
    };
    let emu = crate::kernel::emu::EmuLauncher;
    kernel::run_with(&emu, &c, queries, keys, &kn, Some((kernel, knobs)))
}

/// `|k_i|` for each bank row, as f32 \[M\] on the keys' device (keys \[M, D\] f32|f16|bf16).
/// Computed once per bank and passed to [`cosine_topk`] as `key_norms`.
pub fn key_norms(keys: &Tensor) -> Result<Tensor> {
    crate::check::rank2((keys, "keys"), "[M, D]", "key_norms")?;
    crate::check::check_dtype(
        keys.dtype(),
        &crate::check::KEY_FLOATS,
        "keys",
        "f32, f16 or bf16",
        "key_norms",
    )?;
    match keys.device() {
        Device::Cpu => cpu::key_norms_cpu(keys),
        _ => keys.to_dtype(DType::F32)?.sqr()?.sum(D::Minus1)?.sqrt(),
    }
}

/// Reference implementation of [`cosine_topk`] from plain candle ops: Eq. 1 scores as a
/// full [B, M] matrix (matmul, norms, epsilon), excluded rows set to -inf, a stable
/// descending `arg_sort` (ties keep the lower index), `narrow` to n, `gather`.
/// Same contract and errors as [`cosine_topk`]; used by the tests and benchmarks.
pub fn cosine_topk_reference(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let op = "cosine_topk_reference";
    let c = check(op, queries, keys, key_norms, n, exclude)?;
    let dev = keys.device();
    let q = queries.to_dtype(DType::F32)?;
    let k = keys.to_dtype(DType::F32)?;
    let qn = q.sqr()?.sum_keepdim(1)?.sqrt()?; // [B, 1]
    let kn = match key_norms {
        Some(t) => t.reshape((1, c.m))?,
        None => k.sqr()?.sum_keepdim(1)?.sqrt()?.t()?, // [1, M]
    };
    let dots = q.matmul(&k.t()?)?; // [B, M]
    let denom = qn.broadcast_mul(&kn)?.affine(1.0, COS_EPS as f64)?;
    let mut scores = dots.broadcast_div(&denom)?;
    let nan = scores.ne(&scores)?; // u8 [B, M]
    if nan.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? > 0 {
        let flat = nan.flatten_all()?.to_vec1::<u8>()?;
        let pos = flat.iter().position(|&x| x != 0).unwrap_or(0);
        return Err(crate::check::nan_score(
            op,
            pos / c.m.max(1),
            pos % c.m.max(1),
        ));
    }
    if c.exclude.iter().any(|&r| r != u32::MAX) {
        let ex = Tensor::from_vec(c.exclude.clone(), (c.b, 1), dev)?;
        let rows = Tensor::arange(0u32, c.m as u32, dev)?.reshape((1, c.m))?;
        let mask = rows.broadcast_eq(&ex)?; // [B, M]
        let neg = Tensor::full(f32::NEG_INFINITY, (c.b, c.m), dev)?;
        scores = mask.where_cond(&neg, &scores)?;
    }
    let idx = scores
        .arg_sort_last_dim(false)?
        .narrow(1, 0, c.n)?
        .contiguous()?;
    let top = scores.gather(&idx, 1)?;
    Ok((top, idx))
}
