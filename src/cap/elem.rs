//! Element types, accumulation, row top-k and input checks shared by the CAP ops (the fused
//! CPU paths and the validation of every path).
//!
//! f32, f16 and bf16 inputs accumulate in f32; f64 inputs (CPU only, used by the
//! finite-difference gradient checks) accumulate in f64. Rows of f16/bf16 are widened once
//! into a per-thread scratch buffer (F16C-accelerated by `half`), so the inner loops only see
//! the accumulation type.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use std::ops::{Add, Div, Mul, Sub};

/// Accumulation type (f32 or f64).
pub(crate) trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn sqrt(self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn is_nan(self) -> bool;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
}

/// `Acc` for the float types `$t`, stored as `CpuStorage::$variant`.
macro_rules! impl_acc {
    ($($t:ident => $variant:ident),+) => {$(
        impl Acc for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = $t::NEG_INFINITY;
            fn sqrt(self) -> Self {
                $t::sqrt(self)
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn is_nan(self) -> bool {
                $t::is_nan(self)
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    )+};
}

impl_acc!(f32 => F32, f64 => F64);

/// A storage element type of the CAP ops with its accumulation type.
pub(crate) trait CapElem: Copy + Send + Sync + 'static {
    type Acc: Acc;
    /// `src` in the accumulation type: borrowed when it already is, else widened into `buf`.
    fn widen<'a>(src: &'a [Self], buf: &'a mut Vec<Self::Acc>) -> &'a [Self::Acc];
    /// Rounds `src` into `dst` (same length).
    fn narrow(src: &[Self::Acc], dst: &mut [Self]);
}

/// f32 and f64 accumulate in their own type: `widen` borrows, `narrow` copies.
macro_rules! impl_elem_native {
    ($($t:ty),+) => {$(
        impl CapElem for $t {
            type Acc = $t;
            fn narrow(src: &[$t], dst: &mut [Self]) {
                dst.copy_from_slice(src);
            }
            fn widen<'a>(src: &'a [Self], _buf: &'a mut Vec<$t>) -> &'a [$t] {
                src
            }
        }
    )+};
}

/// f16 and bf16 accumulate in f32: `widen` converts into the scratch buffer.
macro_rules! impl_elem_half {
    ($($t:ty),+) => {$(
        impl CapElem for $t {
            type Acc = f32;
            fn narrow(src: &[f32], dst: &mut [Self]) {
                dst.convert_from_f32_slice(src);
            }
            fn widen<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32] {
                buf.resize(src.len(), 0.0);
                src.convert_to_f32_slice(buf);
                buf
            }
        }
    )+};
}

impl_elem_native!(f32, f64);
impl_elem_half!(f16, bf16);

const LANES: usize = 8;

/// Dot product with 8 independent partial sums (vectorisable, fixed summation order).
#[inline]
pub(crate) fn dot<A: Acc>(a: &[A], b: &[A]) -> A {
    let n = a.len().min(b.len());
    let mut acc = [A::ZERO; LANES];
    let chunks = n / LANES;
    for c in 0..chunks {
        let o = c * LANES;
        let (xa, xb) = (&a[o..o + LANES], &b[o..o + LANES]);
        for l in 0..LANES {
            acc[l] = acc[l] + xa[l] * xb[l];
        }
    }
    let mut tail = A::ZERO;
    for i in chunks * LANES..n {
        tail = tail + a[i] * b[i];
    }
    let mut s = tail;
    for v in acc {
        s = s + v;
    }
    s
}

/// `acc[d] += w * x[d]`.
#[inline]
pub(crate) fn axpy<A: Acc>(acc: &mut [A], w: A, x: &[A]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a = *a + w * v;
    }
}

/// Ordering used by every CAP top-k (CPU and `kernels/topk.cuh`): larger value first, ties
/// to the lower index; NaN ranks as -inf (so after every number, and among -inf/NaN entries
/// by index).
#[inline]
pub(crate) fn better<A: Acc>(a: A, ia: u32, b: A, ib: u32) -> bool {
    let key = |v: A| if v.is_nan() { A::NEG_INF } else { v };
    let (a, b) = (key(a), key(b));
    a > b || (a == b && ia < ib)
}

/// Top-`k` of `row` (k <= row.len()) into `idx`, best first, by [`better`]. `scratch` holds
/// the bounded candidate list between calls.
pub(crate) fn row_topk<A: Acc>(row: &[A], k: usize, idx: &mut [u32], scratch: &mut Vec<(A, u32)>) {
    scratch.clear();
    for (i, &v) in row.iter().enumerate() {
        let i = i as u32;
        if scratch.len() == k {
            let (lv, li) = scratch[k - 1];
            // indices arrive in increasing order, so an equal value never displaces.
            if !better(v, i, lv, li) {
                continue;
            }
            scratch.pop();
        }
        let mut pos = scratch.len();
        while pos > 0 {
            let (pv, pi) = scratch[pos - 1];
            if better(v, i, pv, pi) {
                pos -= 1;
            } else {
                break;
            }
        }
        scratch.insert(pos, (v, i));
    }
    for (o, &(_, i)) in idx.iter_mut().zip(scratch.iter()) {
        *o = i;
    }
}

/// Contiguous slice of a typed CPU storage.
pub(crate) fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: expected a contiguous input (the public op makes inputs contiguous)"),
    }
}

/// Mask weights of a CPU storage (f32, u8 or f64) as `Acc` values.
pub(crate) fn mask_values<A: Acc>(s: &CpuStorage, layout: &Layout, op: &str) -> Result<Vec<A>> {
    Ok(match s {
        CpuStorage::F32(v) => contiguous_slice(v, layout, op)?
            .iter()
            .map(|&x| A::from_f64(x as f64))
            .collect(),
        CpuStorage::F64(v) => contiguous_slice(v, layout, op)?
            .iter()
            .map(|&x| A::from_f64(x))
            .collect(),
        CpuStorage::U8(v) => contiguous_slice(v, layout, op)?
            .iter()
            .map(|&x| A::from_f64(x as f64))
            .collect(),
        other => bail!(
            "{op}: mask dtype {:?} is not supported (expected f32 or u8)",
            other.dtype()
        ),
    })
}

/// Float dtypes the CAP ops accept.
pub(crate) fn check_float(dtype: DType, op: &str, what: &str) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(()),
        d => bail!("{op}: {what} has dtype {d:?}, expected f32, f16, bf16 or f64"),
    }
}

/// A tensor with the name the error messages give it.
pub(crate) type Named<'a> = (&'a Tensor, &'a str);

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
