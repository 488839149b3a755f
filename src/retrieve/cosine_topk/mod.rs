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
/// CUDA tensors (feature `cuda`) run `kernels/cosine_topk.cu` (the bandwidth kernels, or the
/// tensor-core path for large batches, [`kernel::choose`]) and wait once, after the kernels,
/// to read the call's error word ([`cosine_topk_deferred`] does not wait for it).
pub fn cosine_topk(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    cosine_topk_deferred(queries, keys, key_norms, n, exclude)?.check()
}

/// The top-n of a [`cosine_topk_deferred`] call, and the call's device error word, not yet
/// read. Input errors found on the device (a NaN score, an `exclude` entry out of range, an
/// exclusion with n = M) are reported by [`PendingTopN::check`]; until then every score of a
/// failed call is NaN, so code that consumes the scores without checking sees the failure.
#[derive(Debug)]
pub struct PendingTopN {
    scores: Tensor,
    indices: Tensor,
    /// \[3\] u32 (code, detail, detail) on the keys' device; `None` on the CPU path, whose
    /// errors are immediate.
    status: Option<Tensor>,
    op: &'static str,
    m: usize,
    n: usize,
}

impl PendingTopN {
    /// Reads the error word (one device synchronisation on CUDA) and returns `(scores [B, n]
    /// f32, indices [B, n] u32)`, or the call's error: the first NaN score met (query and bank
    /// row) or the offending `exclude` entry, worded as the CPU path words it.
    pub fn check(self) -> Result<(Tensor, Tensor)> {
        if let Some(st) = &self.status {
            let w = st.to_vec1::<u32>()?;
            if let Some(e) = contract::status_error(self.op, &w, self.m, self.n) {
                return Err(e);
            }
        }
        Ok((self.scores, self.indices))
    }

    /// `(scores, indices)` without reading the error word: valid only if the call succeeded;
    /// after a failed call every score is NaN.
    pub fn unchecked(&self) -> (&Tensor, &Tensor) {
        (&self.scores, &self.indices)
    }

    /// The call's error word on the device, \[3\] u32, `[0, 0, 0]` after success (`None` on
    /// the CPU path). Callers that batch their checks can keep these and read them together.
    pub fn status(&self) -> Option<&Tensor> {
        self.status.as_ref()
    }
}

/// [`cosine_topk`] without the wait: on CUDA the kernels are queued and the call returns at
/// once, with nothing read back or uploaded (the `exclude` tensor is read by the kernels where
/// it lies; pass it on the keys' device to avoid a copy), so calls queue back to back on the
/// stream. The tensor-core path (large batches) is the exception: it waits for its kernels to
/// read which queries overflowed their candidate lists (B flags; the error word stays unread),
/// and after an overflow for the bandwidth rerun of those queries. Shape, dtype and device errors are immediate; errors that need the data come from
/// [`PendingTopN::check`]. CPU tensors run the fused CPU path, whose errors are immediate.
pub fn cosine_topk_deferred(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<PendingTopN> {
    const OP: &str = "cosine_topk";
    match keys.device() {
        Device::Cpu => {
            let c = check(OP, queries, keys, key_norms, n, exclude)?;
            let (scores, indices) = cpu::cosine_topk_cpu(queries, keys, key_norms, &c)?;
            Ok(PendingTopN {
                scores,
                indices,
                status: None,
                op: OP,
                m: c.m,
                n,
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let c = contract::check_device_call(OP, queries, keys, key_norms, n, exclude)?;
            let kn = match key_norms {
                Some(t) => t.clone(),
                None => self::key_norms(keys)?,
            };
            let r = kernel::cosine_topk_cuda(queries, keys, &kn, &c)?;
            Ok(PendingTopN {
                scores: r.scores,
                indices: r.indices,
                status: Some(r.status),
                op: OP,
                m: c.m,
                n,
            })
        }
        dev => bail!(
            "cosine_topk: device {:?} is not supported (CPU, or CUDA with feature `cuda`)",
            dev.location()
        ),
    }
}

/// `cosine_topk` run through the emulated CUDA kernels (`kernels/cosine_topk.cu` on CPU
/// threads) on CPU tensors: same contract and checks as [`cosine_topk`] on CUDA (the
/// exclusions checked by the kernels), n <= [`kernel::KMAX`]; the plan is [`kernel::plan`] for
/// [`crate::kernel::EMU_SM_COUNT`] multiprocessors. Test infrastructure (feature `emulate`).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn cosine_topk_emulated(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    cosine_topk_deferred_emulated(queries, keys, key_norms, n, exclude)?.check()
}

/// [`cosine_topk_deferred`] through the emulated kernels (see [`cosine_topk_emulated`]).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn cosine_topk_deferred_emulated(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<PendingTopN> {
    deferred_emulated(queries, keys, key_norms, n, exclude, None)
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
    cosine_topk_deferred_emulated_with(queries, keys, key_norms, n, exclude, kernel, knobs)?.check()
}

/// [`cosine_topk_deferred_emulated`] with the kernel forced (see [`cosine_topk_emulated_with`]).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn cosine_topk_deferred_emulated_with(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
    kernel: kernel::Kernel,
    knobs: tensor_core::TcOverrides,
) -> Result<PendingTopN> {
    deferred_emulated(queries, keys, key_norms, n, exclude, Some((kernel, knobs)))
}

#[cfg(feature = "emulate")]
fn deferred_emulated(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
    force: Option<(kernel::Kernel, tensor_core::TcOverrides)>,
) -> Result<PendingTopN> {
    let op = "cosine_topk (emulated kernel)";
    let c = contract::check_device_call(op, queries, keys, key_norms, n, exclude)?;
    if !keys.device().is_cpu() {
        bail!("{op}: expects CPU tensors");
    }
    let kn = match key_norms {
        Some(t) => t.clone(),
        None => self::key_norms(keys)?,
    };
    let emu = crate::kernel::emu::EmuLauncher;
    let r = match force {
        None => kernel::run_on(&emu, &c, queries, keys, &kn)?,
        Some(f) => kernel::run_with(&emu, &c, queries, keys, &kn, Some(f))?,
    };
    Ok(PendingTopN {
        scores: r.scores,
        indices: r.indices,
        status: Some(r.status),
        op,
        m: c.m,
        n,
    })
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
