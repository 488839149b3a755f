//! Fused CPU path of `cosine_topk`.
//!
//! The bank is cut into row chunks sized to stay in L2 (~128 KiB of keys); rayon spreads
//! chunks over threads, each thread folding into its own bounded [`TopK`] per query, and
//! the per-thread lists are merged at the end. With one query (B = 1) each row is dotted
//! front to back, so a thread reads its chunk as one sequential stream; with 2..15
//! queries, blocks of up to 3 queries x 3 keys are scored by a register-blocked
//! AVX2/FMA micro-kernel, so every key byte is read once per query block. Both convert
//! f16 (F16C) and bf16 keys to f32 in registers, and no B x M matrix exists (B >= 16
//! switches to the query-lane gemm kernel of `qlanes.rs`, AVX-512 or AVX2). Without
//! AVX2/FMA/F16C a portable scalar kernel with the same structure runs instead.

use super::{qlanes, Checked, EPS};
use crate::topk::TopK;
use candle_core::{bail, DType, Device, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// A key element type the micro-kernels can read.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// The slice itself when `Self` is f32.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// Converts `src` into `dst` (same length), vectorised where the CPU allows.
    fn convert(src: &[Self], dst: &mut [f32]);
    /// Dots of `QB` f32 queries against `KB` key rows, all of length `d`.
    ///
    /// # Safety
    /// Every pointer must be valid for `d` reads.
    unsafe fn block<const QB: usize, const KB: usize>(
        q: &[*const f32; QB],
        k: &[*const Self; KB],
        d: usize,
    ) -> [[f32; KB]; QB];
    /// Dot of one f32 query with one key row, both of length `d`, reading the row front
    /// to back with four independent accumulators.
    ///
    /// # Safety
    /// Both pointers must be valid for `d` reads.
    unsafe fn row_dot(q: *const f32, k: *const Self, d: usize) -> f32;
}

/// The query-lane kernel uses AVX-512 (F, BW, VL) when the CPU has it and
/// `R2SCP_NO_AVX512` is unset; otherwise AVX2/FMA/F16C; otherwise portable code.
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        static STATE: AtomicU8 = AtomicU8::new(0);
        match STATE.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let yes = std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && has_avx2()
                    && std::env::var_os("R2SCP_NO_AVX512").is_none();
                STATE.store(if yes { 1 } else { 2 }, Ordering::Relaxed);
                yes
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
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

/// Portable row dot: 8 partial sums so the loop can vectorise without fast-math.
#[inline(always)]
unsafe fn row_scalar<T: Elem>(q: *const f32, k: *const T, d: usize) -> f32 {
    block_scalar::<T, 1, 1>(&[q], &[k], d)[0][0]
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_bf16(p: *const bf16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
        _mm_cvtss_f32(s)
    }

    macro_rules! block_impl {
        ($name:ident, $kt:ty, $load:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name<const QB: usize, const KB: usize>(
                q: &[*const f32; QB],
                k: &[*const $kt; KB],
                d: usize,
            ) -> [[f32; KB]; QB] {
                let mut acc = [[_mm256_setzero_ps(); KB]; QB];
                let d8 = d & !7;
                let mut i = 0;
                while i < d8 {
                    let mut kv = [_mm256_setzero_ps(); KB];
                    for j in 0..KB {
                        kv[j] = $load(k[j].add(i));
                    }
                    for qi in 0..QB {
                        let qv = _mm256_loadu_ps(q[qi].add(i));
                        for j in 0..KB {
                            acc[qi][j] = _mm256_fmadd_ps(qv, kv[j], acc[qi][j]);
                        }
                    }
                    i += 8;
                }
                let mut out = [[0f32; KB]; QB];
                for qi in 0..QB {
                    for j in 0..KB {
                        let mut s = hsum(acc[qi][j]);
                        for t in d8..d {
                            s += *q[qi].add(t) * (*k[j].add(t)).to_f32();
                        }
                        out[qi][j] = s;
                    }
                }
                out
            }
        };
    }
    macro_rules! convert_impl {
        ($name:ident, $kt:ty, $load:ident) => {
            /// `dst[i] = src[i] as f32`, 8 at a time.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(src: &[$kt], dst: &mut [f32]) {
                let n = src.len().min(dst.len());
                let n8 = n & !7;
                let mut i = 0;
                while i < n8 {
                    _mm256_storeu_ps(dst.as_mut_ptr().add(i), $load(src.as_ptr().add(i)));
                    i += 8;
                }
                for j in n8..n {
                    dst[j] = src[j].to_f32();
                }
            }
        };
    }
    macro_rules! row_impl {
        ($name:ident, $kt:ty, $load:ident) => {
            /// One row, 32 elements a step into 4 accumulators: the row is read in
            /// address order, so consecutive rows form one sequential stream.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(q: *const f32, k: *const $kt, d: usize) -> f32 {
                let mut a = [_mm256_setzero_ps(); 4];
                let d32 = d & !31;
                let mut i = 0;
                while i < d32 {
                    for (j, acc) in a.iter_mut().enumerate() {
                        let o = i + 8 * j;
                        *acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(o)), $load(k.add(o)), *acc);
                    }
                    i += 32;
                }
                let d8 = d & !7;
                while i < d8 {
                    a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), $load(k.add(i)), a[0]);
                    i += 8;
                }
                let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
                let mut out = hsum(s);
                for t in d8..d {
                    out += *q.add(t) * (*k.add(t)).to_f32();
                }
                out
            }
        };
    }
    row_impl!(row_f32, f32, load_f32);
    row_impl!(row_f16, f16, load_f16);
    row_impl!(row_bf16, bf16, load_bf16);

    convert_impl!(convert_f16, f16, load_f16);
    convert_impl!(convert_bf16, bf16, load_bf16);

    block_impl!(block_f32, f32, load_f32);
    block_impl!(block_f16, f16, load_f16);
    block_impl!(block_bf16, bf16, load_bf16);

    // `to_f32` for the scalar tails inside the macro.
    trait ToF32 {
        fn to_f32(self) -> f32;
    }
    impl ToF32 for f32 {
        #[inline(always)]
        fn to_f32(self) -> f32 {
            self
        }
    }
    impl ToF32 for f16 {
        #[inline(always)]
        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
    }
    impl ToF32 for bf16 {
        #[inline(always)]
        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
    }
}

macro_rules! elem_impl {
    ($t:ty, $conv:expr, $avx:ident, $row:ident, $as_f32:expr, $convert:expr) => {
        impl Elem for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $conv(self)
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
                        return avx::$avx::<QB, KB>(q, k, d);
                    }
                }
                block_scalar::<Self, QB, KB>(q, k, d)
            }
            #[inline]
            unsafe fn row_dot(q: *const f32, k: *const Self, d: usize) -> f32 {
                #[cfg(target_arch = "x86_64")]
                {
                    if has_avx2() {
                        return avx::$row(q, k, d);
                    }
                }
                row_scalar::<Self>(q, k, d)
            }
        }
    };
}
elem_impl!(
    f32,
    |x: f32| x,
    block_f32,
    row_f32,
    some_f32,
    |s: &[f32], d: &mut [f32]| d.copy_from_slice(s)
);
elem_impl!(
    f16,
    |x: f16| x.to_f32(),
    block_f16,
    row_f16,
    no_f32,
    |s: &[f16], d: &mut [f32]| convert_with(s, d, ConvertKind::F16)
);
elem_impl!(
    bf16,
    |x: bf16| x.to_f32(),
    block_bf16,
    row_bf16,
    no_f32,
    |s: &[bf16], d: &mut [f32]| convert_with(s, d, ConvertKind::Bf16)
);

enum ConvertKind {
    F16,
    Bf16,
}

/// 16-bit keys to f32: AVX2/F16C when available, else element by element.
fn convert_with<T: Elem>(src: &[T], dst: &mut [f32], kind: ConvertKind) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: features checked; T is f16 / bf16 as `kind` says (2-byte layout).
            unsafe {
                match kind {
                    ConvertKind::F16 => avx::convert_f16(
                        std::slice::from_raw_parts(src.as_ptr() as *const f16, src.len()),
                        dst,
                    ),
                    ConvertKind::Bf16 => avx::convert_bf16(
                        std::slice::from_raw_parts(src.as_ptr() as *const bf16, src.len()),
                        dst,
                    ),
                }
            }
            return;
        }
    }
    let _ = kind;
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

fn some_f32(s: &[f32]) -> Option<&[f32]> {
    Some(s)
}

fn no_f32<T>(_: &[T]) -> Option<&[f32]> {
    None
}

/// First NaN score met: (query, bank row).
pub(crate) type NanAt = (usize, usize);

struct Ctx<'a, T> {
    q: &'a [f32],
    qn: &'a [f32],
    keys: &'a [T],
    kn: &'a [f32],
    d: usize,
    exclude: &'a [u32],
}

/// Rows per chunk: ~128 KiB of keys, a multiple of 12 (3- and 4-row blocks).
fn chunk_rows(d: usize, elt: usize) -> usize {
    chunk_rows_for(d, elt, 12)
}

/// Rows per chunk of about 128 KiB (`elt` bytes per element), a multiple of `multiple`.
pub(crate) fn chunk_rows_for(d: usize, elt: usize, multiple: usize) -> usize {
    let r = (128 * 1024) / (d * elt).max(1);
    (r.max(multiple) / multiple) * multiple
}

#[inline(always)]
fn offer(
    tops: &mut [TopK],
    ctx_qn: f32,
    qi: usize,
    excl: u32,
    row: usize,
    dot: f32,
    kn: f32,
) -> Result<(), NanAt> {
    let s = dot / (ctx_qn * kn + EPS);
    let t = &mut tops[qi];
    if s >= t.threshold() {
        if row as u32 != excl {
            t.push(s, row as u32);
        }
    } else if s.is_nan() {
        return Err((qi, row));
    }
    Ok(())
}

/// Scores rows `r0..r1` for queries `q0..q0+QB` and offers them to `tops`.
#[inline(always)]
fn scan_qblock<T: Elem, const QB: usize, const KB: usize>(
    ctx: &Ctx<T>,
    q0: usize,
    r0: usize,
    r1: usize,
    tops: &mut [TopK],
) -> Result<(), NanAt> {
    let d = ctx.d;
    let qp: [*const f32; QB] = std::array::from_fn(|i| ctx.q[(q0 + i) * d..].as_ptr());
    let mut r = r0;
    while r + KB <= r1 {
        let kp: [*const T; KB] = std::array::from_fn(|j| ctx.keys[(r + j) * d..].as_ptr());
        // SAFETY: rows r..r+KB and queries q0..q0+QB lie inside their slices.
        let dots = unsafe { T::block::<QB, KB>(&qp, &kp, d) };
        for (i, row) in dots.iter().enumerate() {
            let q = q0 + i;
            for (j, &dot) in row.iter().enumerate() {
                offer(
                    tops,
                    ctx.qn[q],
                    q,
                    ctx.exclude[q],
                    r + j,
                    dot,
                    ctx.kn[r + j],
                )?;
            }
        }
        r += KB;
    }
    while r < r1 {
        let kp = [ctx.keys[r * d..].as_ptr()];
        // SAFETY: as above, one row.
        let dots = unsafe { T::block::<QB, 1>(&qp, &kp, d) };
        for (i, row) in dots.iter().enumerate() {
            let q = q0 + i;
            offer(tops, ctx.qn[q], q, ctx.exclude[q], r, row[0], ctx.kn[r])?;
        }
        r += 1;
    }
    Ok(())
}

/// Scores rows `r0..r1` for the single query `q` one row at a time.
///
/// With one query there is no key reuse to block for, and reading rows in address
/// order keeps the hardware prefetcher on one sequential stream. Interleaving 8 rows
/// (the blocked kernel with KB = 8) splits the chunk into 8 short strided streams and
/// measured 10-25% slower at M = 1M (BENCHMARKS.md, "B = 1 kernel shape").
#[inline(always)]
fn scan_one_query<T: Elem>(
    ctx: &Ctx<T>,
    q: usize,
    r0: usize,
    r1: usize,
    tops: &mut [TopK],
) -> Result<(), NanAt> {
    let d = ctx.d;
    let qp = ctx.q[q * d..].as_ptr();
    let keys = &ctx.keys[r0 * d..r1 * d];
    for (j, row) in keys.chunks_exact(d).enumerate() {
        // SAFETY: the query and the row both hold d elements.
        let dot = unsafe { T::row_dot(qp, row.as_ptr(), d) };
        let r = r0 + j;
        offer(tops, ctx.qn[q], q, ctx.exclude[q], r, dot, ctx.kn[r])?;
    }
    Ok(())
}

fn scan_chunk<T: Elem>(ctx: &Ctx<T>, r0: usize, r1: usize, tops: &mut [TopK]) -> Result<(), NanAt> {
    let b = ctx.qn.len();
    if b == 1 {
        return scan_one_query(ctx, 0, r0, r1, tops);
    }
    let mut q0 = 0;
    while q0 + 3 <= b {
        scan_qblock::<T, 3, 3>(ctx, q0, r0, r1, tops)?;
        q0 += 3;
    }
    match b - q0 {
        2 => scan_qblock::<T, 2, 3>(ctx, q0, r0, r1, tops),
        1 => scan_qblock::<T, 1, 4>(ctx, q0, r0, r1, tops),
        _ => Ok(()),
    }
}

fn run<T: Elem>(ctx: &Ctx<T>, m: usize, n: usize) -> Result<Vec<TopK>, NanAt> {
    let b = ctx.qn.len();
    let rows = chunk_rows(ctx.d, std::mem::size_of::<T>());
    let nchunks = m.div_ceil(rows);
    let fresh = || (0..b).map(|_| TopK::new(n)).collect::<Vec<_>>();
    (0..nchunks)
        .into_par_iter()
        .try_fold(fresh, |mut tops, c| {
            let r0 = c * rows;
            let r1 = (r0 + rows).min(m);
            scan_chunk(ctx, r0, r1, &mut tops)?;
            Ok(tops)
        })
        .try_reduce(fresh, |mut a, b| {
            for (x, y) in a.iter_mut().zip(b.iter()) {
                x.merge(y);
            }
            Ok(a)
        })
}

/// Contiguous f32 copy of a small CPU tensor.
fn to_f32_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Runs `f` on the contiguous CPU slice of `t` (made contiguous first if needed).
fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = match layout.contiguous_offsets() {
        Some(o) => o,
        None => bail!("cosine_topk: internal error, tensor not contiguous after contiguous()"),
    };
    match &*storage {
        Storage::Cpu(c) => f(&c.as_slice::<T>()?[start..end]),
        _ => bail!("cosine_topk: expected a CPU tensor"),
    }
}

fn norms_of<T: Elem>(keys: &[T], d: usize) -> Vec<f32> {
    keys.par_chunks(d)
        .map(|row| {
            let p = [row.as_ptr()];
            let mut own = Vec::new();
            let qp: *const f32 = if std::mem::size_of::<T>() == 4 {
                row.as_ptr() as *const f32
            } else {
                own.extend(row.iter().map(|x| x.to_f32()));
                own.as_ptr()
            };
            // SAFETY: both pointers are valid for d reads; T is f32 when size is 4.
            let s = unsafe { T::block::<1, 1>(&[qp], &p, d) };
            s[0][0].sqrt()
        })
        .collect()
}

/// `|k_i|` per row of CPU keys [M, D] (f32|f16|bf16), as f32 [M].
pub(crate) fn key_norms_cpu(keys: &Tensor) -> candle_core::Result<Tensor> {
    let (m, d) = keys.dims2()?;
    let v = match keys.dtype() {
        DType::F32 => with_slice::<f32, _>(keys, |s| Ok(norms_of(s, d)))?,
        DType::F16 => with_slice::<f16, _>(keys, |s| Ok(norms_of(s, d)))?,
        DType::BF16 => with_slice::<bf16, _>(keys, |s| Ok(norms_of(s, d)))?,
        dt => bail!("key_norms: unsupported keys dtype {dt:?}"),
    };
    Tensor::from_vec(v, m, &Device::Cpu)
}

pub(crate) fn cosine_topk_cpu(
    queries: &Tensor,
    keys: &Tensor,
    key_norms: Option<&Tensor>,
    c: &Checked,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, m, d, n) = (c.b, c.m, c.d, c.n);
    let q = to_f32_vec(queries)?;
    let qn: Vec<f32> = q
        .chunks(d)
        .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    let kn_t = match key_norms {
        Some(t) => t.clone(),
        None => key_norms_cpu(keys)?,
    };
    let kn = with_slice::<f32, _>(&kn_t, |s| Ok(s.to_vec()))?;
    let ql = if b >= qlanes_min_b() {
        qlanes::isa()
    } else {
        None
    };
    let tops = if let Some(isa) = ql {
        let job = qlanes::Job {
            d,
            kn: &kn,
            exclude: &c.exclude,
        };
        let r = match keys.dtype() {
            DType::F32 => {
                with_slice::<f32, _>(keys, |k| Ok(qlanes::run(isa, &q, &qn, k, n, &job)))?
            }
            DType::F16 => {
                with_slice::<f16, _>(keys, |k| Ok(qlanes::run(isa, &q, &qn, k, n, &job)))?
            }
            DType::BF16 => {
                with_slice::<bf16, _>(keys, |k| Ok(qlanes::run(isa, &q, &qn, k, n, &job)))?
            }
            dt => bail!("cosine_topk: unsupported keys dtype {dt:?}"),
        };
        match r {
            Ok(t) => t,
            Err((qi, row)) => bail!(
                "cosine_topk: NaN score for query {qi} at bank row {row} (NaN or infinite input)"
            ),
        }
    } else {
        match keys.dtype() {
            DType::F32 => with_slice::<f32, _>(keys, |k| go(&q, &qn, k, &kn, d, m, n, &c.exclude))?,
            DType::F16 => with_slice::<f16, _>(keys, |k| go(&q, &qn, k, &kn, d, m, n, &c.exclude))?,
            DType::BF16 => {
                with_slice::<bf16, _>(keys, |k| go(&q, &qn, k, &kn, d, m, n, &c.exclude))?
            }
            dt => bail!("cosine_topk: unsupported keys dtype {dt:?}"),
        }
    };
    let mut scores = Vec::with_capacity(b * n);
    let mut idx = Vec::with_capacity(b * n);
    for (qi, t) in tops.into_iter().enumerate() {
        let v = t.into_sorted();
        if v.len() != n {
            bail!(
                "cosine_topk: internal error, query {qi} collected {} of n = {n} rows",
                v.len()
            );
        }
        for s in v {
            scores.push(s.score);
            idx.push(s.index);
        }
    }
    Ok((
        Tensor::from_vec(scores, (b, n), &Device::Cpu)?,
        Tensor::from_vec(idx, (b, n), &Device::Cpu)?,
    ))
}

#[allow(clippy::too_many_arguments)]
fn go<T: Elem>(
    q: &[f32],
    qn: &[f32],
    keys: &[T],
    kn: &[f32],
    d: usize,
    m: usize,
    n: usize,
    exclude: &[u32],
) -> candle_core::Result<Vec<TopK>> {
    let ctx = Ctx {
        q,
        qn,
        keys,
        kn,
        d,
        exclude,
    };
    match run(&ctx, m, n) {
        Ok(t) => Ok(t),
        Err((qi, row)) => {
            bail!("cosine_topk: NaN score for query {qi} at bank row {row} (NaN or infinite input)")
        }
    }
}

/// From this batch size on the query-lane kernel ([`qlanes`]) runs instead of the
/// register-blocked dot kernel; `R2SCP_CPU_QLANES_MIN_B` overrides it (benchmarks and
/// tests of both paths).
fn qlanes_min_b() -> usize {
    std::env::var("R2SCP_CPU_QLANES_MIN_B")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(qlanes::QLANES_MIN_B)
}
