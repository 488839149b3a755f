//! The validated shape of one `cosine_topk` call: every check of the contract except NaN
//! (which needs the scores).

use crate::check::{check_device, check_dtype, rank2, KEY_FLOATS};
use crate::kernel::abi::{ERR_BAD_EXCLUDE, ERR_FEW_ROWS, ERR_NAN_SCORE};
use candle_core::{bail, DType, Result, Tensor};

/// Validated sizes of one `cosine_topk` call.
#[derive(Clone, Debug)]
pub(crate) struct Checked {
    pub b: usize,
    pub m: usize,
    pub d: usize,
    pub n: usize,
    /// Per-query excluded row (`u32::MAX` = none), length `b`.
    pub exclude: Vec<u32>,
}

/// Validated sizes of one `cosine_topk` call on a device: everything checked on the host
/// except what needs the data (NaN scores; the `exclude` entries, which the kernels check, see
/// `kernel.rs` "NaN contract"), so that building it reads nothing back from the device.
#[derive(Clone, Debug)]
pub(crate) struct DeviceCall {
    pub b: usize,
    pub m: usize,
    pub d: usize,
    pub n: usize,
    /// [B] u32 excluded rows (`u32::MAX` = none), shape and dtype checked, values not read.
    pub exclude: Option<Tensor>,
}

/// The outputs of one device call and its error word, not yet read (see the NaN contract in
/// `kernel.rs`): scores [B, n] f32 (all NaN when the call failed), indices [B, n] u32, status
/// \[3\] u32 on the device, `(0, 0, 0)` when the call succeeded. Every device path returns it.
#[cfg_attr(not(any(feature = "cuda", feature = "emulate")), allow(dead_code))]
pub(crate) struct DeviceTopN {
    pub scores: Tensor,
    pub indices: Tensor,
    pub status: Tensor,
}

/// The error a call's error word `w` reports, if any (messages as the CPU path's).
pub(crate) fn status_error(op: &str, w: &[u32], m: usize, n: usize) -> Option<candle_core::Error> {
    let (code, a, b) = (*w.first()?, *w.get(1)? as usize, *w.get(2)? as usize);
    match code {
        0 => None,
        ERR_NAN_SCORE => Some(crate::check::nan_score(op, a, b)),
        ERR_BAD_EXCLUDE => Some(bad_exclude(op, a, b as u32, m)),
        ERR_FEW_ROWS => Some(too_few_rows(op, n, m - 1, a, m)),
        other => Some(candle_core::Error::Msg(format!(
            "{op}: the kernel reported unknown error code {other} ({a}, {b})"
        ))),
    }
}

/// The error of an `exclude` entry that is neither a bank row nor `u32::MAX`.
pub(crate) fn bad_exclude(op: &str, q: usize, r: u32, m: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: exclude[{q}] = {r} is not a bank row (M = {m}) nor u32::MAX (none)"
    ))
}

/// The error of `n` above the `left` rows query `q` may return.
pub(crate) fn too_few_rows(
    op: &str,
    n: usize,
    left: usize,
    q: usize,
    m: usize,
) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: n = {n} exceeds the {left} bank rows left after exclusion (query {q}, M = {m})"
    ))
}

/// Shapes, dtypes and devices of the inputs, the key norms and the shape and dtype of
/// `exclude`: `(B, M, D)`.
fn check_inputs(
    op: &str,
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    exclude: Option<&Tensor>,
) -> Result<(usize, usize, usize)> {
    let (b, d) = rank2((queries, "queries"), "[B, D]", op)?;
    let (m, dk) = rank2((keys, "keys"), "[M, D]", op)?;
    if d != dk {
        bail!("{op}: query dimension D = {d} does not match the keys' D = {dk}");
    }
    if d == 0 {
        bail!("{op}: vectors must have D >= 1, got D = 0");
    }
    check_dtype(
        keys.dtype(),
        &KEY_FLOATS,
        "keys",
        "f32, f16 or bf16 (convert the bank once with `keys.to_dtype(DType::F32)`)",
        op,
    )?;
    // The public ops convert other float queries to f32 before this check.
    if queries.dtype() != DType::F32 && queries.dtype() != keys.dtype() {
        bail!(
            "{op}: queries dtype {:?} must be f32 or the keys' dtype {:?}",
            queries.dtype(),
            keys.dtype()
        );
    }
    check_device((queries, "queries"), (keys, "keys"), op)?;
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
        check_device((kn, "key_norms"), (keys, "keys"), op)?;
    }
    if let Some(ex) = exclude {
        if ex.dims() != [b] {
            bail!(
                "{op}: exclude must be [B] = [{b}], got shape {:?}",
                ex.dims()
            );
        }
        if ex.dtype() != DType::U32 {
            bail!("{op}: exclude must be u32, got {:?}", ex.dtype());
        }
    }
    Ok((b, m, d))
}

/// Checks the whole contract except NaN (the exclusions read to the host); `op` names the
/// caller in the errors.
pub(crate) fn check(
    op: &str,
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<Checked> {
    let (b, m, d) = check_inputs(op, queries, keys, key_norms, exclude)?;
    let exclude = match exclude {
        None => vec![u32::MAX; b],
        Some(ex) => {
            let v = ex.to_vec1::<u32>()?;
            for (q, &r) in v.iter().enumerate() {
                if r != u32::MAX && r as usize >= m {
                    return Err(bad_exclude(op, q, r, m));
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
            return Err(too_few_rows(op, n, left, q, m));
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

/// Checks what a device call can check without reading data back (see [`DeviceCall`]):
/// everything [`check`] does except the `exclude` values. `n` above M is refused here (as
/// [`check`] words it for query 0); `n = M` with an exclusion is the kernels' `ERR_FEW_ROWS`.
#[cfg(any(feature = "cuda", feature = "emulate"))]
pub(crate) fn check_device_call(
    op: &str,
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    n: usize,
    exclude: Option<&Tensor>,
) -> Result<DeviceCall> {
    let (b, m, d) = check_inputs(op, queries, keys, key_norms, exclude)?;
    if n == 0 {
        bail!("{op}: n must be >= 1, got n = 0");
    }
    if n > m {
        if b == 0 {
            bail!("{op}: n = {n} exceeds the M = {m} bank rows");
        }
        return Err(too_few_rows(op, n, m, 0, m));
    }
    Ok(DeviceCall {
        b,
        m,
        d,
        n,
        exclude: exclude.cloned(),
    })
}
