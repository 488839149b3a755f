//! Input checks shared by every op (retrieval and CAP): each returns an error naming the op,
//! the offending value and the expected one; none panics.

use candle_core::{bail, DType, Error, Layout, Result, Tensor};

/// A tensor with the name the error messages give it.
pub(crate) type Named<'a> = (&'a Tensor, &'a str);

/// The one error of a NaN score: "NaN score for query `query` at bank row `row`".
pub(crate) fn nan_score(op: &str, query: usize, row: usize) -> Error {
    Error::Msg(format!(
        "{op}: NaN score for query {query} at bank row {row} (NaN or infinite input)"
    ))
}

/// The first `(row, column)` of `t` [R, C] (any float dtype) that holds NaN, if any. On a
/// device: one comparison, one reduction and a one-byte read, then the whole mask only when
/// there is a NaN to locate.
pub(crate) fn first_nan(t: &Tensor) -> Result<Option<(usize, usize)>> {
    let (_, c) = t.dims2()?;
    if t.elem_count() == 0 {
        return Ok(None);
    }
    let t = t.detach();
    let nan = t.ne(&t)?; // u8 [R, C]
    if !t.device().is_cpu() && nan.max_all()?.to_scalar::<u8>()? == 0 {
        return Ok(None);
    }
    let flat = nan.flatten_all()?.to_vec1::<u8>()?;
    Ok(flat.iter().position(|&x| x != 0).map(|p| (p / c, p % c)))
}

/// `(rows, cols)` of `t`, which must have rank 2; `axes` names them (e.g. `"[B, D]"`).
pub(crate) fn rank2((t, what): Named, axes: &str, op: &str) -> Result<(usize, usize)> {
    match t.dims() {
        &[r, c] => Ok((r, c)),
        s => bail!(
            "{op}: {what} must be {axes}, got rank {} shape {s:?}",
            s.len()
        ),
    }
}

/// `(B, L, D)` of `t`, which must have rank 3.
pub(crate) fn dims3((t, what): Named, op: &str) -> Result<(usize, usize, usize)> {
    match t.dims() {
        &[b, l, d] => Ok((b, l, d)),
        s => bail!("{op}: {what} must have rank 3 [B, L, D], got shape {s:?}"),
    }
}

/// `N` of `t` [B, N, D] whose B and D must be `b` and `d`; `n` names N in the error.
pub(crate) fn middle_dim((t, what): Named, n: &str, b: usize, d: usize, op: &str) -> Result<usize> {
    match t.dims() {
        &[tb, tn, td] if tb == b && td == d => Ok(tn),
        s => bail!("{op}: {what} has shape {s:?}, expected [B, {n}, D] with B = {b}, D = {d}"),
    }
}

/// `t` has shape `[r, c]`; `axes` names the two axes in the error (e.g. `"[B, D]"`).
pub(crate) fn check_dims2(
    (t, what): Named,
    axes: &str,
    r: usize,
    c: usize,
    op: &str,
) -> Result<()> {
    if t.dims() != [r, c] {
        bail!(
            "{op}: {what} has shape {:?}, expected {axes} = [{r}, {c}]",
            t.dims()
        );
    }
    Ok(())
}

/// `t` is on the device of `like`.
pub(crate) fn check_device((t, what): Named, (like, name): Named, op: &str) -> Result<()> {
    if !t.device().same_device(like.device()) {
        bail!(
            "{op}: {what} is on {:?}, expected {name}'s device {:?}",
            t.device().location(),
            like.device().location()
        );
    }
    Ok(())
}

/// `t` has the dtype and the device of `like`.
pub(crate) fn check_like((t, what): Named, (like, name): Named, op: &str) -> Result<()> {
    if t.dtype() != like.dtype() {
        bail!(
            "{op}: {what} dtype {:?} differs from {name}'s dtype {:?}",
            t.dtype(),
            like.dtype()
        );
    }
    check_device((t, what), (like, name), op)
}

/// `dtype` is one of `allowed`; `expected` spells them in the error (e.g. "f32, f16 or bf16").
pub(crate) fn check_dtype(
    dtype: DType,
    allowed: &[DType],
    what: &str,
    expected: &str,
    op: &str,
) -> Result<()> {
    if !allowed.contains(&dtype) {
        bail!("{op}: {what} dtype {dtype:?} is not supported, expected {expected}");
    }
    Ok(())
}

/// Float dtypes of the CAP ops (f64 on CPU only).
pub(crate) const CAP_FLOATS: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F64];

/// Storage dtypes of the kernels and of retrieval keys.
pub(crate) const KEY_FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The contiguous slice of typed CPU storage `data` seen through `layout`.
pub(crate) fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: expected a contiguous input (the public op makes inputs contiguous)"),
    }
}

/// Runs `f` on the contiguous CPU slice of `t` (made contiguous first if needed).
pub(crate) fn with_cpu_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(c) => f(contiguous_slice(c.as_slice::<T>()?, layout, op)?),
        _ => bail!("{op}: expected a CPU tensor"),
    }
}
