//! Cross-modal retrieval (CMR, paper section 3.2): fused cosine top-n over a memory bank.
//!
//! Score (paper Eq. 1): `S_i = (q . k_i) / (|q| |k_i| + EPS)` with [`EPS`] = 1e-8, computed
//! in f32 whatever the storage dtype. A zero query or key scores exactly 0, never NaN.
//!
//! Contract shared by [`cosine_topk`] (fused: CPU path or CUDA kernel) and
//! [`cosine_topk_reference`] (plain candle ops):
//! - `queries` [B, D]: f32, or the keys' dtype. `keys` [M, D]: f32, f16 or bf16.
//! - `key_norms` [M] f32: `|k_i|` precomputed once per bank (`None` = computed here).
//! - `exclude` [B] u32: a bank row each query must skip (its own clip), `u32::MAX` = none.
//! - Output: `(scores [B, n] f32 sorted descending, indices [B, n] u32)` on the keys'
//!   device. Equal scores rank the lower index first.
//! - NaN policy: any NaN score (a NaN or an infinity in the inputs) is an **error** naming
//!   the query and bank row; it is never silently ordered.
//! - Errors (never panics): `n == 0`, `n` above the rows left after exclusion, rank,
//!   dimension, dtype and device mismatches, `exclude` rows out of range.
//! - Non-contiguous inputs are accepted (copied to contiguous first).

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod kernel;
mod qlanes;

use candle_core::{bail, DType, Device, Tensor, D};

/// The epsilon of paper Eq. 1: `S = q.k / (|q| |k| + EPS)`.
pub const EPS: f32 = 1e-8;

/// Validated shapes of one `cosine_topk` call.
#[derive(Clone, Debug)]
pub(crate) struct Checked {
    pub b: usize,
    pub m: usize,
    pub d: usize,
    pub n: usize,
    /// Per-query excluded row (`u32::MAX` = none), length `b`.
    pub exclude: Vec<u32>,
}

fn is_key_dtype(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::F16 | DType::BF16)
}

/// Checks the whole contract except NaN (which needs the scores).
pub(crate) fn check(
    op: &str,
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> candle_core::Result<Checked> {
    if queries.rank() != 2 {
        bail!(
            "{op}: queries must be [B, D], got rank {} shape {:?}",
            queries.rank(),
            queries.dims()
        );
    }
    if keys.rank() != 2 {
        bail!(
            "{op}: keys must be [M, D], got rank {} shape {:?}",
            keys.rank(),
            keys.dims()
        );
    }
    let (b, d) = queries.dims2()?;
    let (m, dk) = keys.dims2()?;
    if d != dk {
        bail!("{op}: query dimension D = {d} does not match the keys' D = {dk}");
    }
    if d == 0 {
        bail!("{op}: vectors must have D >= 1, got D = 0");
    }
    if !is_key_dtype(keys.dtype()) {
        bail!(
            "{op}: keys dtype {:?} is not supported, expected f32, f16 or bf16",
            keys.dtype()
        );
    }
    if queries.dtype() != DType::F32 && queries.dtype() != keys.dtype() {
        bail!(
            "{op}: queries dtype {:?} must be f32 or the keys' dtype {:?}",
            queries.dtype(),
            keys.dtype()
        );
    }
    if !queries.device().same_device(keys.device()) {
        bail!(
            "{op}: queries on {:?} but keys on {:?}",
            queries.device().location(),
            keys.device().location()
        );
    }
    if let Some(kn) = key_norms {
        if kn.dims() != [m] {
            bail!(
                "{op}: key_norms must be [M] = [{m}], got shape {:?}",
                kn.dims()
            );
        }
        if kn.dtype() != DType::F32 {
            bail!("{op}: key_norms must be f32, got {:?}", kn.dtype());
        }
        if !kn.device().same_device(keys.device()) {
            bail!(
                "{op}: key_norms on {:?} but keys on {:?}",
                kn.device().location(),
                keys.device().location()
            );
        }
    }
    let exclude = match exclude {
        None => vec![u32::MAX; b],
        Some(ex) => {
            if ex.dims() != [b] {
                bail!(
                    "{op}: exclude must be [B] = [{b}], got shape {:?}",
                    ex.dims()
                );
            }
            if ex.dtype() != DType::U32 {
                bail!("{op}: exclude must be u32, got {:?}", ex.dtype());
            }
            let v = ex.to_vec1::<u32>()?;
            for (q, &r) in v.iter().enumerate() {
                if r != u32::MAX && r as usize >= m {
                    bail!(
                        "{op}: exclude[{q}] = {r} is not a bank row (M = {m}) nor u32::MAX (none)"
                    );
                }
            }
            v
        }
    };
    if n == 0 {
        bail!("{op}: n must be >= 1, got n = 0");
    }
    for (q, &r) in exclude.iter().enumerate() {
        let left = if r == u32::MAX { m } else { m - 1 };
        if n > left {
            bail!(
                "{op}: n = {n} exceeds the {left} bank rows left after exclusion (query {q}, M = {m})"
            );
        }
    }
    if b == 0 && n > m {
        bail!("{op}: n = {n} exceeds the M = {m} bank rows");
    }
    Ok(Checked {
        b,
        m,
        d,
        n,
        exclude,
    })
}

/// Fused cosine top-n (paper Eq. 1) — see the module docs for the full contract.
///
/// `queries` [B, D] (f32 or the keys' dtype), `keys` [M, D] (f32|f16|bf16), `key_norms`
/// [M] f32 (`None` = computed), `exclude` [B] u32 (`u32::MAX` = none). Returns
/// `(scores [B, n] f32 descending, indices [B, n] u32)`; ties go to the lower index.
/// CPU tensors run the fused CPU path (tiled, vectorised, threaded, no B x M matrix);
/// CUDA tensors (feature `cuda`) run `kernels/cosine_topk.cu`.
pub fn cosine_topk(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let c = check("cosine_topk", queries, keys, key_norms, n, exclude)?;
    match keys.device() {
        Device::Cpu => cpu::cosine_topk_cpu(queries, keys, key_norms, &c),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::cosine_topk_cuda(queries, keys, key_norms, &c),
        dev => bail!(
            "cosine_topk: device {:?} is not supported (CPU, or CUDA with feature `cuda`)",
            dev.location()
        ),
    }
}

/// `|k_i|` for each bank row, as f32 [M] on the keys' device (keys [M, D] f32|f16|bf16).
/// Computed once per bank and passed to [`cosine_topk`] as `key_norms`.
pub fn key_norms(keys: &Tensor) -> candle_core::Result<Tensor> {
    if keys.rank() != 2 {
        bail!(
            "key_norms: keys must be [M, D], got shape {:?}",
            keys.dims()
        );
    }
    if !is_key_dtype(keys.dtype()) {
        bail!(
            "key_norms: keys dtype {:?} is not supported, expected f32, f16 or bf16",
            keys.dtype()
        );
    }
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
) -> candle_core::Result<(Tensor, Tensor)> {
    let c = check(
        "cosine_topk_reference",
        queries,
        keys,
        key_norms,
        n,
        exclude,
    )?;
    let dev = keys.device();
    let q = queries.to_dtype(DType::F32)?;
    let k = keys.to_dtype(DType::F32)?;
    let qn = q.sqr()?.sum_keepdim(1)?.sqrt()?; // [B, 1]
    let kn = match key_norms {
        Some(t) => t.reshape((1, c.m))?,
        None => k.sqr()?.sum_keepdim(1)?.sqrt()?.t()?, // [1, M]
    };
    let dots = q.matmul(&k.t()?)?; // [B, M]
    let denom = qn.broadcast_mul(&kn)?.affine(1.0, EPS as f64)?;
    let mut scores = dots.broadcast_div(&denom)?;
    let nan = scores.ne(&scores)?; // u8 [B, M]
    if nan.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? > 0 {
        let flat = nan.flatten_all()?.to_vec1::<u8>()?;
        let pos = flat.iter().position(|&x| x != 0).unwrap_or(0);
        bail!(
            "cosine_topk_reference: NaN score for query {} at bank row {} (NaN or infinite input)",
            pos / c.m.max(1),
            pos % c.m.max(1)
        );
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
