//! The element types of every fused CPU path (retrieval and CAP): one trait, [`Elem`], for the
//! storage types f32, f16, bf16 and f64, and [`Acc`], the type they accumulate in.
//!
//! f32, f16 and bf16 accumulate in f32; f64 (CPU only, used by the finite-difference gradient
//! checks) accumulates in f64. Rows of f16/bf16 are widened once into a scratch buffer
//! (F16C-accelerated by `half`), or converted in registers by the AVX2 micro-kernels of
//! [`crate::simd`], so the inner loops see the accumulation type only.

use crate::simd::has_avx2;
use candle_core::CpuStorage;
use half::{bf16, f16, slice::HalfFloatSliceExt};
use std::ops::{Add, Div, Mul, Sub};

/// Accumulation (and top-k score) type: f32 or f64.
pub(crate) trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    const INF: Self;
    fn sqrt(self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn is_nan(self) -> bool;
    /// IEEE total order (as `f32::total_cmp`).
    fn total_cmp(&self, other: &Self) -> std::cmp::Ordering;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
}

/// `Acc` for the float types `$t`, stored as `CpuStorage::$variant`.
macro_rules! impl_acc {
    ($($t:ident => $variant:ident),+) => {$(
        impl Acc for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = $t::NEG_INFINITY;
            const INF: Self = $t::INFINITY;
            fn sqrt(self) -> Self {
                $t::sqrt(self)
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn is_nan(self) -> bool {
                $t::is_nan(self)
            }
            fn total_cmp(&self, other: &Self) -> std::cmp::Ordering {
                $t::total_cmp(self, other)
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    )+};
}

impl_acc!(f32 => F32, f64 => F64);

/// A storage element type of the fused CPU paths.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// What sums of this type accumulate in.
    type Acc: Acc;

    /// The value as f32 (f64 rounds).
    fn to_f32(self) -> f32;

    /// `src` in the accumulation type: borrowed when it already is, else widened into `buf`.
    fn widen<'a>(src: &'a [Self], buf: &'a mut Vec<Self::Acc>) -> &'a [Self::Acc];

    /// Rounds `src` into `dst` (same length).
    fn narrow(src: &[Self::Acc], dst: &mut [Self]);

    /// The slice itself when `Self` is f32.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;

    /// Converts `src` into `dst` (same length) as f32, vectorised where the CPU allows.
    fn convert(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    /// Dots of `QB` f32 queries against `KB` rows of `Self`, all of length `d`, in f32.
    ///
    /// # Safety
    /// Every pointer must be valid for `d` reads.
    #[inline(always)]
    unsafe fn block<const QB: usize, const KB: usize>(
        q: &[*const f32; QB],
        k: &[*const Self; KB],
        d: usize,
    ) -> [[f32; KB]; QB] {
        block_scalar::<Self, QB, KB>(q, k, d)
    }

    /// Dot of one f32 query with one row of `Self`, both of length `d`, reading the row front
    /// to back (AVX2: four independent accumulators).
    ///
    /// # Safety
    /// Both pointers must be valid for `d` reads.
    #[inline(always)]
    unsafe fn row_dot(q: *const f32, k: *const Self, d: usize) -> f32 {
        block_scalar::<Self, 1, 1>(&[q], &[k], d)[0][0]
    }
}

/// Portable kernel: 8 partial sums per pair so the loop can vectorise without fast-math.
#[inline(always)]
unsafe fn block_scalar<T: Elem, const QB: usize, const KB: usize>(
    q: &[*const f32; QB],
    k: &[*const T; KB],
    d: usize,
) -> [[f32; KB]; QB] {
    let mut out = [[0f32; KB]; QB];
    for (qi, row) in out.iter_mut().enumerate() {
        for (kj, o) in row.iter_mut().enumerate() {
            let mut acc = [0f32; 8];
            let mut i = 0;
            while i + 8 <= d {
                for (l, a) in acc.iter_mut().enumerate() {
                    *a += *q[qi].add(i + l) * (*k[kj].add(i + l)).to_f32();
                }
                i += 8;
            }
            let mut s = 0f32;
            while i < d {
                s += *q[qi].add(i) * (*k[kj].add(i)).to_f32();
                i += 1;
            }
            *o = acc.iter().sum::<f32>() + s;
        }
    }
    out
}

/// `Elem` for f32, f16 and bf16: the AVX2 micro-kernels of [`crate::simd`] when the CPU
/// has them, else the portable ones.
macro_rules! impl_elem_simd {
    ($t:ty, $acc:ty, $block:ident, $row:ident, $convert:expr, $widen:expr, $narrow:expr, $as_f32:expr) => {
        impl Elem for $t {
            type Acc = $acc;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                f32::from(self)
            }
            fn widen<'a>(src: &'a [Self], buf: &'a mut Vec<$acc>) -> &'a [$acc] {
                $widen(src, buf)
            }
            fn narrow(src: &[$acc], dst: &mut [Self]) {
                $narrow(src, dst)
            }
            fn as_f32(s: &[Self]) -> Option<&[f32]> {
                $as_f32(s)
            }
            fn convert(src: &[Self], dst: &mut [f32]) {
                $convert(src, dst)
            }
            #[inline]
            unsafe fn block<const QB: usize, const KB: usize>(
                q: &[*const f32; QB],
                k: &[*const Self; KB],
                d: usize,
            ) -> [[f32; KB]; QB] {
                #[cfg(target_arch = "x86_64")]
                {
                    if has_avx2() {
                        return crate::simd::avx::$block::<QB, KB>(q, k, d);
                    }
                }
                block_scalar::<Self, QB, KB>(q, k, d)
            }
            #[inline]
            unsafe fn row_dot(q: *const f32, k: *const Self, d: usize) -> f32 {
                #[cfg(target_arch = "x86_64")]
                {
                    if has_avx2() {
                        return crate::simd::avx::$row(q, k, d);
                    }
                }
                block_scalar::<Self, 1, 1>(&[q], &[k], d)[0][0]
            }
        }
    };
}

impl_elem_simd!(
    f32,
    f32,
    block_f32,
    row_f32,
    |s: &[f32], d: &mut [f32]| d.copy_from_slice(s),
    widen_same,
    |s: &[f32], d: &mut [f32]| d.copy_from_slice(s),
    Some
);
impl_elem_simd!(
    f16,
    f32,
    block_f16,
    row_f16,
    convert_f16,
    widen_half,
    |s: &[f32], d: &mut [f16]| d.convert_from_f32_slice(s),
    |_: &[f16]| None
);
impl_elem_simd!(
    bf16,
    f32,
    block_bf16,
    row_bf16,
    convert_bf16,
    widen_half,
    |s: &[f32], d: &mut [bf16]| d.convert_from_f32_slice(s),
    |_: &[bf16]| None
);

impl Elem for f64 {
    type Acc = f64;
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn widen<'a>(src: &'a [f64], buf: &'a mut Vec<f64>) -> &'a [f64] {
        widen_same(src, buf)
    }
    fn narrow(src: &[f64], dst: &mut [f64]) {
        dst.copy_from_slice(src)
    }
    fn as_f32(_: &[f64]) -> Option<&[f32]> {
        None
    }
}

/// A slice already in its accumulation type: borrowed.
fn widen_same<'a, A>(src: &'a [A], _buf: &'a mut Vec<A>) -> &'a [A] {
    src
}

/// f16/bf16 widened into the scratch buffer.
fn widen_half<'a, T>(src: &'a [T], buf: &'a mut Vec<f32>) -> &'a [f32]
where
    [T]: HalfFloatSliceExt,
{
    buf.resize(src.len(), 0.0);
    src.convert_to_f32_slice(buf);
    buf
}

fn convert_f16(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU features were checked at run time.
            unsafe { crate::simd::avx::convert_f16(src, dst) };
            return;
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

fn convert_bf16(src: &[bf16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU features were checked at run time.
            unsafe { crate::simd::avx::convert_bf16(src, dst) };
            return;
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

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
