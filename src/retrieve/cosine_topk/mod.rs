//! `cosine_topk`: fused cosine top-n of a query batch against a memory bank (paper Eq. 1).
//!
//! Files of this op: `cpu.rs` (B < 16) and `qlanes.rs` (B >= 16), the fused CPU paths;
//! `kernel.rs`, the launch plan and the device path of `kernels/cosine_topk.cu` (CUDA and the
//! emulator, `kernels/emu/cosine_topk.cpp`); `contract.rs`, the input checks; tests in
//! `tests/ops/cosine_topk.rs`.

mod chunks;
mod contract;
mod cpu;
pub mod dispatch;
#[doc(hidden)]
pub mod gemm_select;
#[doc(hidden)]
pub mod kernel;
mod qlanes;
#[doc(hidden)]
pub mod rescore;
#[doc(hidden)]
pub mod tensor_core;
#[cfg(feature = "cuda")]
pub mod tune;

use crate::error::{bail, Result};
use crate::kernel::abi::COS_EPS;
use candle_core::{DType, Device, Tensor, D};
use contract::check;
use std::borrow::Cow;

/// Fused cosine top-n (paper Eq. 1): the `n` bank rows most similar to each query.
///
/// - `queries` [B, D], any float dtype: f32 and the keys' dtype are used as they are, any
///   other float (f16, bf16, f64) is converted to f32 first (every score is computed in f32).
/// - `keys` [M, D]: f32, f16 or bf16 (convert an f64 bank once with `to_dtype(DType::F32)`).
/// - `key_norms` \[M\] f32: `|k_i|` from [`key_norms`], computed once per bank (`None` =
///   computed in the call). Debug builds recompute them and refuse norms that are wrong.
/// - `exclude` \[B\] u32: a bank row each query skips (its own clip), `u32::MAX` = none.
///
/// Returns `(scores [B, n] f32, indices [B, n] u32)` on the keys' device, scores descending,
/// equal scores to the lower index. The scores carry **no gradient** (the op has no
/// backward): to train through a similarity, recompute it for the returned indices with
/// candle ops (second example).
///
/// Errors (never panics): `n == 0`, `n` above the rows left after exclusion (use
/// [`MemoryBank::search`](crate::MemoryBank::search) for FAISS's padding instead), a NaN
/// score (a NaN or infinite input: an error naming the query and bank row, never an
/// ordering), rank, dimension, dtype and device mismatches, `exclude` rows out of range.
///
/// CPU tensors run the fused CPU path (tiled, vectorised, threaded, no B x M matrix); CUDA
/// tensors (feature `cuda`) run the device path the dispatcher picks for the GPU (the
/// bandwidth kernel for small batches, the cuBLAS GEMM + select path for larger ones, or what
/// the GPU's measured dispatch table says: docs/DESIGN.md, "Dispatch by measurement") and wait
/// once, after the kernels, to read the call's error word ([`cosine_topk_deferred`] does not
/// wait for it).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use r2scp::{cosine_topk, key_norms};
///
/// let dev = Device::Cpu;
/// // a bank of 4 keys in 3 dimensions, and 2 queries
/// let keys = Tensor::new(&[[1f32, 0., 0.], [0., 1., 0.], [0., 0., 1.], [1., 1., 0.]], &dev)?;
/// let queries = Tensor::new(&[[1f32, 0.1, 0.], [0., 0., 2.]], &dev)?;
/// let norms = key_norms(&keys)?; // once per bank
/// let (scores, rows) = cosine_topk(&queries, &keys, Some(&norms), 2, None)?;
/// assert_eq!(rows.to_vec2::<u32>()?, [[0, 3], [2, 0]]);
/// let s = scores.to_vec2::<f32>()?;
/// assert!((s[1][0] - 1.0).abs() < 1e-6 && s[1][1] == 0.0);
/// // a bf16 query against this f32 bank is converted to f32
/// let q16 = queries.to_dtype(candle_core::DType::BF16)?;
/// assert_eq!(cosine_topk(&q16, &keys, None, 2, None)?.1.to_vec2::<u32>()?, [[0, 3], [2, 0]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Scores with a gradient: gather the returned rows and recompute Eq. 1 with candle ops.
///
/// ```
/// use candle_core::{Device, Tensor, Var, D};
/// let dev = Device::Cpu;
/// let keys = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &dev)?;
/// let q = Var::new(&[[1f32, 0.2]], &dev)?; // a learned query
/// let (_, rows) = r2scp::cosine_topk(q.as_tensor(), &keys, None, 2, None)?;
/// let k = keys.index_select(&rows.flatten_all()?, 0)?.reshape((1, 2, 2))?; // [B, n, D]
/// let dots = k.broadcast_mul(&q.unsqueeze(1)?)?.sum(D::Minus1)?; // [B, n]
/// let norms = k.sqr()?.sum(D::Minus1)?.sqrt()?.broadcast_mul(&q.sqr()?.sum_keepdim(1)?.sqrt()?)?;
/// let scores = (dots / (norms + 1e-8)?)?; // Eq. 1, differentiable w.r.t. q (and keys)
/// let grads = scores.sum_all()?.backward()?;
/// assert!(grads.get(&q).is_some());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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
    /// A device call's outputs, its error word unread.
    #[cfg(any(feature = "cuda", feature = "emulate"))]
    fn of_device(r: contract::DeviceTopN, op: &'static str, m: usize, n: usize) -> Self {
        PendingTopN {
            scores: r.scores,
            indices: r.indices,
            status: Some(r.status),
            op,
            m,
            n,
        }
    }

    /// Reads the error word (one device synchronisation on CUDA) and returns `(scores [B, n]
    /// f32, indices [B, n] u32)`, or the call's error: the first NaN score met (query and bank
    /// row) or the offending `exclude` entry, worded as the CPU path words it.
    pub fn check(self) -> Result<(Tensor, Tensor)> {
        if let Some(st) = &self.status {
            let w = st.to_vec1::<u32>()?;
            if let Some(e) = contract::status_error(self.op, &w, self.m, self.n) {
                return Err(e.into());
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
/// stream, on every device path (the approximate paths answer overflowed queries on the
/// device, `rescore.rs`). Shape, dtype and device
/// errors are immediate; errors that need the data come from [`PendingTopN::check`]. CPU
/// tensors run the fused CPU path, whose errors are immediate. Same arguments, dtype rules
/// and (debug-build) key-norm check as [`cosine_topk`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let keys = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu)?;
/// let pending = r2scp::cosine_topk_deferred(&keys, &keys, None, 1, None)?;
/// // ... queue more work here; then read the result (and any error) once:
/// let (_, rows) = pending.check()?;
/// assert_eq!(rows.to_vec2::<u32>()?, [[0], [1]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn cosine_topk_deferred(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<PendingTopN> {
    const OP: &str = "cosine_topk";
    if let Some(kn) = key_norms {
        debug_check_key_norms(OP, keys, kn)?;
    }
    deferred_trusted(OP, queries, keys, key_norms, n, exclude)
}

/// `queries` as the paths take them: f32 or the keys' dtype as they are, any other float
/// converted to f32; a non-float dtype is an error naming the fix.
fn promote_queries<'a>(op: &str, queries: &'a Tensor, keys: &Tensor) -> Result<Cow<'a, Tensor>> {
    let dt = queries.dtype();
    if dt == DType::F32 || dt == keys.dtype() || !crate::check::KEY_FLOATS.contains(&keys.dtype()) {
        // (unsupported key dtypes are reported by the contract check)
        return Ok(Cow::Borrowed(queries));
    }
    if !dt.is_float() {
        bail!(
            "{op}: queries dtype {dt:?} is not a float dtype, expected f32 (or any float: convert with `queries.to_dtype(DType::F32)`)"
        );
    }
    Ok(Cow::Owned(queries.to_dtype(DType::F32)?))
}

/// Debug builds only: `norms` must be the norms of `keys` (relative difference at most 1e-4
/// where the key's norm is finite), else an error naming the first wrong row. Release builds
/// trust them (the check rereads the whole bank).
fn debug_check_key_norms(op: &str, keys: &Tensor, norms: &Tensor) -> Result<()> {
    // Shapes and dtypes that are wrong are the contract check's errors, worded there.
    let checkable = keys.rank() == 2
        && norms.dims() == [keys.dim(0)?]
        && norms.dtype() == DType::F32
        && crate::check::KEY_FLOATS.contains(&keys.dtype());
    if cfg!(debug_assertions) && checkable {
        check_key_norms(op, keys, norms)?;
    }
    Ok(())
}

/// `norms` \[M\] f32 against the norms of `keys` [M, D]: relative difference at most 1e-4
/// wherever the key's own norm is finite (a NaN or infinite key is the op's NaN error).
fn check_key_norms(op: &str, keys: &Tensor, norms: &Tensor) -> Result<()> {
    let fresh = self::key_norms(keys)?.to_vec1::<f32>()?;
    let given = norms.to_vec1::<f32>()?;
    for (row, (&g, &f)) in given.iter().zip(&fresh).enumerate() {
        // A NaN `g` is not close to anything.
        let close = (g - f).abs() <= 1e-4 * f.abs().max(1.0);
        if f.is_finite() && !close {
            bail!(
                "{op}: key_norms[{row}] = {g} is not the norm of key row {row} ({f}); pass `key_norms(&keys)` or None"
            );
        }
    }
    Ok(())
}

/// [`cosine_topk_deferred`] with key norms the caller guarantees (the memory bank computed
/// them, or checked them when it loaded them): no debug recheck.
pub(crate) fn deferred_trusted(
    op: &'static str,
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<PendingTopN> {
    let queries = promote_queries(op, queries, keys)?;
    let queries = queries.as_ref();
    match keys.device() {
        Device::Cpu => {
            let c = check(op, queries, keys, key_norms, n, exclude)?;
            let (scores, indices) = cpu::cosine_topk_cpu(queries, keys, key_norms, &c)?;
            Ok(PendingTopN {
                scores,
                indices,
                status: None,
                op,
                m: c.m,
                n,
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let c = contract::check_device_call(op, queries, keys, key_norms, n, exclude)?;
            let kn = match key_norms {
                Some(t) => t.clone(),
                None => self::key_norms(keys)?,
            };
            let r = kernel::cosine_topk_cuda(queries, keys, &kn, &c)?;
            Ok(PendingTopN::of_device(r, op, c.m, n))
        }
        dev => bail!(
            "{op}: device {:?} is not supported (CPU, or CUDA with feature `cuda`)",
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
    let knobs = kernel::Knobs {
        tc: knobs,
        ..kernel::Knobs::default()
    };
    deferred_emulated(queries, keys, key_norms, n, exclude, Some((kernel, knobs)))
}

/// [`cosine_topk_emulated`] on the GEMM + select path (candle's CPU matmul standing in for
/// cuBLAS) with its test knobs; an error where the path cannot take the call. Test
/// infrastructure (feature `emulate`).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn cosine_topk_emulated_gemm(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
    knobs: gemm_select::GemmOverrides,
) -> Result<(Tensor, Tensor)> {
    cosine_topk_deferred_emulated_gemm(queries, keys, key_norms, n, exclude, knobs)?.check()
}

/// [`cosine_topk_emulated_gemm`] without the check (see [`cosine_topk_deferred_emulated`]).
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn cosine_topk_deferred_emulated_gemm(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
    knobs: gemm_select::GemmOverrides,
) -> Result<PendingTopN> {
    let knobs = kernel::Knobs {
        gemm: knobs,
        ..kernel::Knobs::default()
    };
    deferred_emulated(
        queries,
        keys,
        key_norms,
        n,
        exclude,
        Some((kernel::Kernel::Gemm, knobs)),
    )
}

/// [`cosine_topk_deferred`] on one device path, forced ([`kernel::Kernel`]): CUDA tensors run
/// it on the GPU (feature `cuda`), CPU tensors through the emulated kernels (feature
/// `emulate`); an error where the path cannot take the call (no fallback to another path).
/// What `r2scp tune` and `r2scp bench retrieve` time per path.
#[doc(hidden)]
pub fn cosine_topk_on_path(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
    path: kernel::Kernel,
) -> Result<PendingTopN> {
    cosine_topk_on_path_with(
        queries,
        keys,
        key_norms,
        n,
        exclude,
        path,
        kernel::Knobs::default(),
    )
}

/// [`cosine_topk_on_path`] with the approximate paths' test knobs (chunks, capacities,
/// margins), on a GPU or in the emulator. Test infrastructure.
#[doc(hidden)]
#[allow(unused_variables)]
pub fn cosine_topk_on_path_with(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
    path: kernel::Kernel,
    knobs: kernel::Knobs,
) -> Result<PendingTopN> {
    const OP: &str = "cosine_topk";
    match keys.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let c = contract::check_device_call(OP, queries, keys, key_norms, n, exclude)?;
            let kn = match key_norms {
                Some(t) => t.clone(),
                None => self::key_norms(keys)?,
            };
            let r = kernel::run_with(
                &crate::kernel::cuda::CudaLauncher::new(dev),
                &c,
                queries,
                keys,
                &kn,
                kernel::Pick::Force(path, knobs),
            )?;
            Ok(PendingTopN::of_device(r, OP, c.m, n))
        }
        #[cfg(feature = "emulate")]
        Device::Cpu => deferred_emulated(queries, keys, key_norms, n, exclude, Some((path, knobs))),
        dev => bail!(
            "{OP} on path {}: device {:?} has no device path (CUDA with feature `cuda`)",
            path.name(),
            dev.location()
        ),
    }
}

#[cfg(feature = "emulate")]
fn deferred_emulated(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
    force: Option<(kernel::Kernel, kernel::Knobs)>,
) -> Result<PendingTopN> {
    let op = "cosine_topk (emulated kernel)";
    let queries = promote_queries(op, queries, keys)?;
    let queries = queries.as_ref();
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
        Some((k, knobs)) => {
            kernel::run_with(&emu, &c, queries, keys, &kn, kernel::Pick::Force(k, knobs))?
        }
    };
    Ok(PendingTopN::of_device(r, op, c.m, n))
}

/// `|k_i|` for each bank row, as f32 \[M\] on the keys' device (keys \[M, D\] f32|f16|bf16).
/// Computed once per bank and passed to [`cosine_topk`] as `key_norms`; no gradient.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let keys = Tensor::new(&[[3f32, 4.], [0., 0.]], &Device::Cpu)?;
/// assert_eq!(r2scp::key_norms(&keys)?.to_vec1::<f32>()?, [5.0, 0.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn key_norms(keys: &Tensor) -> Result<Tensor> {
    crate::check::rank2((keys, "keys"), "[M, D]", "key_norms")?;
    crate::check::check_dtype(
        keys.dtype(),
        &crate::check::KEY_FLOATS,
        "keys",
        "f32, f16 or bf16",
        "key_norms",
    )?;
    Ok(match keys.device() {
        Device::Cpu => cpu::key_norms_cpu(keys)?,
        _ => keys.to_dtype(DType::F32)?.sqr()?.sum(D::Minus1)?.sqrt()?,
    })
}

/// Columns candle 0.11's CUDA `arg_sort` can sort in one row: it sorts a row inside one
/// block's shared memory (48 KiB of u32 indices, padded to a power of two).
pub const CUDA_SORT_MAX_COLS: usize = 8192;

/// Elements of one chunk's [B, rows] score matrix the CPU reference materialises at most
/// (1 GiB of f32): below it the whole bank is one chunk.
const CPU_REFERENCE_MAX_ELEMS: usize = 1 << 28;

/// Reference implementation of [`cosine_topk`] from plain candle ops: Eq. 1 scores as
/// [B, rows] matrices (matmul, norms, epsilon) over chunks of the bank, excluded rows set to
/// -inf, and a running top-n kept by a descending `arg_sort` of the previous top-n followed
/// by the chunk's scores, `narrow` to n, `gather`. Same contract, dtype rules and errors as
/// [`cosine_topk`]; used by the tests and benchmarks.
///
/// Chunks: on the CPU the whole bank is one chunk (up to 2^28 scores), and the stable sort
/// puts equal scores in index order. On CUDA a chunk has `8192 - n` rows, so that every sort
/// fits candle's CUDA `arg_sort` ([`CUDA_SORT_MAX_COLS`]): this works for any M (10M rows in
/// about 1200 chunks), and n >= 8192 is an error saying so. candle's CUDA sort is a bitonic
/// sort, not stable: there equal scores may come in either index order.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use r2scp::retrieve::{cosine_topk, cosine_topk_reference};
/// let keys = Tensor::randn(0f32, 1., (300, 16), &Device::Cpu)?;
/// let q = Tensor::randn(0f32, 1., (3, 16), &Device::Cpu)?;
/// let (_, fused) = cosine_topk(&q, &keys, None, 8, None)?;
/// let (_, plain) = cosine_topk_reference(&q, &keys, None, 8, None)?;
/// assert_eq!(fused.to_vec2::<u32>()?, plain.to_vec2::<u32>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn cosine_topk_reference(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let op = "cosine_topk_reference";
    if let Some(kn) = key_norms {
        debug_check_key_norms(op, keys, kn)?;
    }
    let queries = promote_queries(op, queries, keys)?;
    let queries = queries.as_ref();
    let c = check(op, queries, keys, key_norms, n, exclude)?;
    let chunk_rows = if keys.device().is_cpu() {
        (CPU_REFERENCE_MAX_ELEMS / c.b.max(1)).max(1)
    } else if c.n < CUDA_SORT_MAX_COLS {
        CUDA_SORT_MAX_COLS - c.n
    } else {
        bail!(
            "{op}: n = {} needs a sort of more than {CUDA_SORT_MAX_COLS} columns on {:?}, which candle's CUDA arg_sort cannot do (expected n < {CUDA_SORT_MAX_COLS})",
            c.n,
            keys.device().location()
        )
    };
    reference_chunks(op, &c, queries, keys, key_norms, chunk_rows)
}

/// [`cosine_topk_reference`] with the bank cut into chunks of `chunk_rows` rows (>= 1) on any
/// device; the tests hold small chunks to the one-chunk result. Test infrastructure.
#[doc(hidden)]
pub fn cosine_topk_reference_chunked(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
    chunk_rows: usize,
) -> Result<(Tensor, Tensor)> {
    let op = "cosine_topk_reference";
    let queries = promote_queries(op, queries, keys)?;
    let queries = queries.as_ref();
    let c = check(op, queries, keys, key_norms, n, exclude)?;
    if chunk_rows == 0 {
        bail!("{op}: chunk_rows = 0, expected at least 1");
    }
    reference_chunks(op, &c, queries, keys, key_norms, chunk_rows)
}

/// The chunked reference after validation (see [`cosine_topk_reference`]).
fn reference_chunks(
    op: &str,
    c: &contract::Checked,
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    chunk_rows: usize,
) -> Result<(Tensor, Tensor)> {
    let dev = keys.device();
    let q = queries.to_dtype(DType::F32)?;
    let qn = q.sqr()?.sum_keepdim(1)?.sqrt()?; // [B, 1]
    let ex = c
        .exclude
        .iter()
        .any(|&r| r != u32::MAX)
        .then(|| Tensor::from_vec(c.exclude.clone(), (c.b, 1), dev))
        .transpose()?;
    // Eq. 1 scores of bank rows [r0, r0 + rows) as [B, rows] f32 (NaN where an input is).
    let raw_scores = |r0: usize, rows: usize| -> Result<Tensor> {
        let k = keys.narrow(0, r0, rows)?.to_dtype(DType::F32)?;
        let kn = match key_norms {
            Some(t) => t.narrow(0, r0, rows)?.reshape((1, rows))?,
            None => k.sqr()?.sum_keepdim(1)?.sqrt()?.t()?, // [1, rows]
        };
        let dots = q.matmul(&k.t()?)?; // [B, rows]
        let denom = qn.broadcast_mul(&kn)?.affine(1.0, COS_EPS as f64)?;
        Ok(dots.broadcast_div(&denom)?)
    };
    // The chunk's scores with excluded rows and NaN scores at -inf (a NaN makes the call an
    // error after the last chunk, and candle's CPU sort panics on NaN), and the number of
    // NaN scores (a [1] u32 tensor, read once at the end).
    let chunk_scores = |r0: usize, rows: usize| -> Result<(Tensor, Tensor)> {
        let scores = raw_scores(r0, rows)?;
        let mut drop = scores.ne(&scores)?; // u8 [B, rows]
        let nans = drop.to_dtype(DType::U32)?.sum_all()?.reshape(1)?;
        if let Some(ex) = &ex {
            let ids = Tensor::arange(r0 as u32, (r0 + rows) as u32, dev)?.reshape((1, rows))?;
            drop = drop.maximum(&ids.broadcast_eq(ex)?)?; // [B, rows]
        }
        let neg = Tensor::full(f32::NEG_INFINITY, (c.b, rows), dev)?;
        Ok((drop.where_cond(&neg, &scores)?, nans))
    };
    // The running top-n: (scores [B, <= n], bank indices [B, <= n] u32), index-ordered
    // before each chunk's rows, so a stable sort keeps ties at the lower index.
    let mut top: Option<(Tensor, Tensor)> = None;
    let mut nan_counts = Vec::new();
    let mut r0 = 0;
    while r0 < c.m {
        let rows = chunk_rows.min(c.m - r0);
        let (scores, nans) = chunk_scores(r0, rows)?;
        nan_counts.push(nans);
        let ids = Tensor::arange(r0 as u32, (r0 + rows) as u32, dev)?
            .reshape((1, rows))?
            .broadcast_as((c.b, rows))?
            .contiguous()?;
        let (cand, cand_ids) = match top.take() {
            None => (scores, ids),
            Some((ts, ti)) => (
                Tensor::cat(&[&ts, &scores], 1)?,
                Tensor::cat(&[&ti, &ids], 1)?,
            ),
        };
        let keep = c.n.min(cand.dim(1)?);
        let order = cand
            .arg_sort_last_dim(false)?
            .narrow(1, 0, keep)?
            .contiguous()?;
        top = Some((cand.gather(&order, 1)?, cand_ids.gather(&order, 1)?));
        r0 += rows;
    }
    // One read of the NaN counts for the whole bank; the first chunk with a NaN is scored
    // again to name the query and row.
    if !nan_counts.is_empty() {
        let counts = Tensor::cat(&nan_counts, 0)?.to_vec1::<u32>()?;
        if let Some(chunk) = counts.iter().position(|&x| x > 0) {
            let r0 = chunk * chunk_rows;
            let rows = chunk_rows.min(c.m - r0);
            let scores = raw_scores(r0, rows)?;
            let flat = scores.ne(&scores)?.flatten_all()?.to_vec1::<u8>()?;
            let pos = flat.iter().position(|&x| x != 0).unwrap_or(0);
            return Err(crate::check::nan_score(op, pos / rows, r0 + pos % rows).into());
        }
    }
    match top {
        Some(t) => Ok(t),
        // M = 0 cannot pass the checks (n >= 1 > M); kept as an error, not a panic.
        None => bail!("{op}: empty bank"),
    }
}
