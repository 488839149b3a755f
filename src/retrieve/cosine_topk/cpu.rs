//! Fused CPU path of `cosine_topk`.
//!
//! The bank is cut into row chunks sized to stay in L2 (~128 KiB of keys); rayon spreads
//! chunks over threads, each thread folding into its own bounded [`TopK`] per query, and
//! the per-thread lists are merged at the end. With one query (B = 1) each row is dotted
//! front to back, so a thread reads its chunk as one sequential stream; with 2..15
//! queries, blocks of up to 3 queries x 3 keys are scored by a register-blocked
//! AVX2/FMA micro-kernel ([`Elem::block`]), so every key byte is read once per query block.
//! Both convert f16 (F16C) and bf16 keys to f32 in registers, and no B x M matrix exists
//! (B >= 16 switches to the query-lane gemm kernel of `qlanes.rs`, AVX-512 or AVX2).
//! Without AVX2/FMA/F16C a portable scalar kernel with the same structure runs instead.

use super::chunks::{chunk_rows_for, NanAt};
use super::contract::Checked;
use super::qlanes;
use crate::check::{nan_score, with_cpu_slice};
use crate::elem::Elem;
use crate::kernel::abi::COS_EPS;
use crate::topk::{NanPolicy, TopK};
use candle_core::{bail, DType, Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

const OP: &str = "cosine_topk";

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

/// Offers the Eq. 1 score of (`qi`, `row`) to the query's collector; a NaN score is an
/// error even for the excluded row, as in the reference.
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
    let s = dot / (ctx_qn * kn + COS_EPS);
    if row as u32 == excl {
        if s.is_nan() {
            return Err((qi, row));
        }
        return Ok(());
    }
    tops[qi].offer(s, row as u32).map_err(|_| (qi, row))
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

/// Top-n of every query over the whole bank with the B < 16 kernels, chunks in parallel.
fn scan_bank<T: Elem>(ctx: &Ctx<T>, m: usize, n: usize) -> Result<Vec<TopK>, NanAt> {
    let b = ctx.qn.len();
    let rows = chunk_rows(ctx.d, std::mem::size_of::<T>());
    let nchunks = m.div_ceil(rows);
    let fresh = || {
        (0..b)
            .map(|_| TopK::new(n, NanPolicy::Error))
            .collect::<Vec<_>>()
    };
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
        DType::F32 => with_cpu_slice::<f32, _>(keys, OP, |s| Ok(norms_of(s, d)))?,
        DType::F16 => with_cpu_slice::<f16, _>(keys, OP, |s| Ok(norms_of(s, d)))?,
        DType::BF16 => with_cpu_slice::<bf16, _>(keys, OP, |s| Ok(norms_of(s, d)))?,
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
    if b == 0 {
        // Nothing to score; and candle's views of empty tensors may point past their storage.
        return Ok((
            Tensor::zeros((0, n), DType::F32, &Device::Cpu)?,
            Tensor::zeros((0, n), DType::U32, &Device::Cpu)?,
        ));
    }
    let q = to_f32_vec(queries)?;
    let qn: Vec<f32> = q
        .chunks(d)
        .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    let kn_t = match key_norms {
        Some(t) => t.clone(),
        None => key_norms_cpu(keys)?,
    };
    let kn = with_cpu_slice::<f32, _>(&kn_t, OP, |s| Ok(s.to_vec()))?;
    let ql = if b >= qlanes_min_b() {
        qlanes::isa()
    } else {
        None
    };
    macro_rules! scan {
        ($t:ty) => {
            with_cpu_slice::<$t, _>(keys, OP, |k| {
                Ok(match ql {
                    Some(isa) => {
                        let job = qlanes::Job {
                            d,
                            kn: &kn,
                            exclude: &c.exclude,
                        };
                        qlanes::scan_bank(isa, &q, &qn, k, n, &job)
                    }
                    None => {
                        let ctx = Ctx {
                            q: &q,
                            qn: &qn,
                            keys: k,
                            kn: &kn,
                            d,
                            exclude: &c.exclude,
                        };
                        scan_bank(&ctx, m, n)
                    }
                })
            })?
        };
    }
    let scanned = match keys.dtype() {
        DType::F32 => scan!(f32),
        DType::F16 => scan!(f16),
        DType::BF16 => scan!(bf16),
        dt => bail!("{OP}: unsupported keys dtype {dt:?}"),
    };
    let tops = scanned.map_err(|(qi, row)| nan_score(OP, qi, row))?;
    let mut scores = Vec::with_capacity(b * n);
    let mut idx = Vec::with_capacity(b * n);
    for (qi, t) in tops.into_iter().enumerate() {
        let v = t.into_sorted();
        if v.len() != n {
            bail!(
                "{OP}: internal error, query {qi} collected {} of n = {n} rows",
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

/// From this batch size on the query-lane kernel ([`qlanes`]) runs instead of the
/// register-blocked dot kernel; `R2SCP_CPU_QLANES_MIN_B` overrides it (benchmarks and
/// tests of both paths).
fn qlanes_min_b() -> usize {
    std::env::var("R2SCP_CPU_QLANES_MIN_B")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(qlanes::QLANES_MIN_B)
}
