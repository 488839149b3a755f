//! Many-query CPU kernel of `cosine_topk` (B >= [`QLANES_MIN_B`]), a gemm micro-kernel
//! with the QUERIES in the vector lanes.
//!
//! Queries are transposed once per call into groups `qt[d][lanes]` (zero-padded), so one
//! vector holds one key dimension for 16 (AVX-512) or 8 (AVX2) queries. For a block of 6
//! key rows, each key element is broadcast and multiplied into `6 x QV` accumulator
//! vectors (QV <= 4 with AVX-512, <= 2 with AVX2): per key dimension `QV + 6` loads feed
//! `6 QV` FMAs, no horizontal sums. The Eq. 1 scaling, the NaN check and the comparison
//! with each query's current top-n threshold are vector ops too; only the rare entries
//! above a threshold reach the scalar [`TopK`]. f16/bf16 chunks are converted to f32
//! (SIMD) into a per-thread buffer first; row chunks run in parallel (rayon).

use super::chunks::{chunk_rows_for, NanAt};
use crate::elem::Elem;
use crate::kernel::abi::COS_EPS;
use crate::topk::{NanPolicy, TopK};
use rayon::prelude::*;

/// From this many queries on, [`scan_bank`] is used (when AVX2 or AVX-512 is available).
pub(crate) const QLANES_MIN_B: usize = 16;

/// Key rows per micro-kernel block.
const KR: usize = 6;

/// Which vector ISA the kernel uses, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
}

/// Vector width (queries per vector) and most vectors per group for `isa`.
fn shape(isa: Isa) -> (usize, usize) {
    match isa {
        Isa::Avx512 => (16, 4),
        Isa::Avx2 => (8, 2),
    }
}

/// One group of up to `lanes * qv_max` queries, transposed and padded.
struct Group {
    q0: usize,
    nq: usize,
    qv: usize,
    /// [d][qv * lanes]
    qt: Vec<f32>,
    /// [qv * lanes] query norms (0 for padding).
    qn: Vec<f32>,
}

fn groups(q: &[f32], qn: &[f32], d: usize, isa: Isa) -> Vec<Group> {
    let (lanes, qv_max) = shape(isa);
    let b = qn.len();
    let per = lanes * qv_max;
    let mut out = Vec::new();
    let mut q0 = 0;
    while q0 < b {
        let nq = per.min(b - q0);
        let qv = nq.div_ceil(lanes);
        let w = qv * lanes;
        let mut qt = vec![0f32; d * w];
        for j in 0..nq {
            for (dd, &x) in q[(q0 + j) * d..(q0 + j + 1) * d].iter().enumerate() {
                qt[dd * w + j] = x;
            }
        }
        let mut g_qn = vec![0f32; w];
        g_qn[..nq].copy_from_slice(&qn[q0..q0 + nq]);
        out.push(Group {
            q0,
            nq,
            qv,
            qt,
            qn: g_qn,
        });
        q0 += nq;
    }
    out
}

/// Per-call read-only state.
pub(crate) struct Job<'a> {
    pub d: usize,
    pub kn: &'a [f32],
    pub exclude: &'a [u32],
}

/// Offers the scores `s[lane]` of row `row` for queries `q0 + lane` (lane < nq) whose
/// bit is set in `mask`, then refreshes their thresholds.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn offer_mask(
    mut mask: u32,
    s: &[f32],
    q0: usize,
    lane0: usize,
    row: usize,
    exclude: &[u32],
    tops: &mut [TopK],
    thr: &mut [f32],
) {
    while mask != 0 {
        let l = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        let lane = lane0 + l;
        let q = q0 + lane;
        if row as u32 != exclude[q] {
            tops[q].push(s[l], row as u32);
            thr[lane] = tops[q].threshold();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    macro_rules! kernel {
        (
            $name:ident, $feat:literal, $vec:ty, $lanes:expr, $zero:ident, $load:ident,
            $set1:ident, $fmadd:ident, $mul:ident, $add:ident, $div:ident, $store:ident,
            $ge:ident, $nan:ident
        ) => {
            /// Scores rows `[0, nrows)` of `rows` (f32, stride d; global index `r0 + i`)
            /// against group `g`, offering hits to `tops`.
            #[target_feature(enable = $feat)]
            #[allow(clippy::too_many_arguments)]
            pub(crate) unsafe fn $name<const QV: usize>(
                g_qt: &[f32],
                g_qn: &[f32],
                q0: usize,
                nq: usize,
                rows: &[f32],
                r0: usize,
                nrows: usize,
                job: &Job,
                tops: &mut [TopK],
                thr: &mut [f32],
            ) -> Result<(), NanAt> {
                let d = job.d;
                let w = QV * $lanes;
                let qt = g_qt.as_ptr();
                let mut qnv = [$zero(); QV];
                let mut eps = [$zero(); QV];
                for v in 0..QV {
                    qnv[v] = $load(g_qn.as_ptr().add(v * $lanes));
                    eps[v] = $set1(COS_EPS);
                }
                let mut sbuf = [0f32; $lanes];
                let mut r = 0;
                while r < nrows {
                    let kr = if nrows - r >= KR { KR } else { 1 };
                    let mut acc = [[$zero(); QV]; KR];
                    let kp = rows.as_ptr().add(r * d);
                    if kr == KR {
                        for dd in 0..d {
                            let mut qv = [$zero(); QV];
                            for v in 0..QV {
                                qv[v] = $load(qt.add(dd * w + v * $lanes));
                            }
                            for i in 0..KR {
                                let kb = $set1(*kp.add(i * d + dd));
                                for v in 0..QV {
                                    acc[i][v] = $fmadd(kb, qv[v], acc[i][v]);
                                }
                            }
                        }
                    } else {
                        for dd in 0..d {
                            let kb = $set1(*kp.add(dd));
                            for v in 0..QV {
                                acc[0][v] =
                                    $fmadd(kb, $load(qt.add(dd * w + v * $lanes)), acc[0][v]);
                            }
                        }
                    }
                    for i in 0..kr {
                        let row = r0 + r + i;
                        let knr = $set1(job.kn[row]);
                        for v in 0..QV {
                            let den = $add($mul(qnv[v], knr), eps[v]);
                            let s = $div(acc[i][v], den);
                            let t = $load(thr.as_ptr().add(v * $lanes));
                            let hit: u32 = $ge(s, t);
                            let nan: u32 = $nan(s);
                            if (hit | nan) != 0 {
                                let lane0 = v * $lanes;
                                let live = if nq > lane0 {
                                    let k = (nq - lane0).min($lanes);
                                    if k >= 32 {
                                        u32::MAX
                                    } else {
                                        (1u32 << k) - 1
                                    }
                                } else {
                                    0
                                };
                                if nan & live != 0 {
                                    let l = (nan & live).trailing_zeros() as usize;
                                    return Err((q0 + lane0 + l, row));
                                }
                                $store(sbuf.as_mut_ptr(), s);
                                offer_mask(
                                    hit & live,
                                    &sbuf,
                                    q0,
                                    lane0,
                                    row,
                                    job.exclude,
                                    tops,
                                    thr,
                                );
                            }
                        }
                    }
                    r += kr;
                }
                Ok(())
            }
        };
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn ge512(a: __m512, b: __m512) -> u32 {
        _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, b) as u32
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn nan512(a: __m512) -> u32 {
        _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a) as u32
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ge256(a: __m256, b: __m256) -> u32 {
        _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(a, b)) as u32
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nan256(a: __m256) -> u32 {
        _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(a, a)) as u32
    }

    kernel!(
        scan512,
        "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_mul_ps,
        _mm512_add_ps,
        _mm512_div_ps,
        _mm512_storeu_ps,
        ge512,
        nan512
    );
    kernel!(
        scan256,
        "avx2,fma,f16c",
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_mul_ps,
        _mm256_add_ps,
        _mm256_div_ps,
        _mm256_storeu_ps,
        ge256,
        nan256
    );
}

/// Scores `rows` (f32, global rows `r0..r0+nrows`) for every group.
#[allow(clippy::too_many_arguments)]
fn scan_rows(
    isa: Isa,
    gs: &[Group],
    rows: &[f32],
    r0: usize,
    nrows: usize,
    job: &Job,
    tops: &mut [TopK],
    thr: &mut [Vec<f32>],
) -> Result<(), NanAt> {
    for (g, t) in gs.iter().zip(thr.iter_mut()) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected at run time; all slices have the sizes the group
        // and row counts imply.
        unsafe {
            let a = (&g.qt[..], &g.qn[..], g.q0, g.nq, rows, r0, nrows);
            match (isa, g.qv) {
                (Isa::Avx512, 1) => {
                    x86::scan512::<1>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, job, tops, t)?
                }
                (Isa::Avx512, 2) => {
                    x86::scan512::<2>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, job, tops, t)?
                }
                (Isa::Avx512, 3) => {
                    x86::scan512::<3>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, job, tops, t)?
                }
                (Isa::Avx512, _) => {
                    x86::scan512::<4>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, job, tops, t)?
                }
                (Isa::Avx2, 1) => {
                    x86::scan256::<1>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, job, tops, t)?
                }
                (Isa::Avx2, _) => {
                    x86::scan256::<2>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, job, tops, t)?
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, g, rows, r0, nrows, job, &tops, &t);
            unreachable!("qlanes::scan_bank is only selected on x86_64");
        }
    }
    Ok(())
}

/// Top-n of every query over the whole bank `keys` [M, d] with the query-lane kernel.
pub(crate) fn scan_bank<T: Elem>(
    isa: Isa,
    q: &[f32],
    qn: &[f32],
    keys: &[T],
    n: usize,
    job: &Job,
) -> Result<Vec<TopK>, NanAt> {
    let d = job.d;
    let b = qn.len();
    let m = keys.len() / d.max(1);
    let gs = groups(q, qn, d, isa);
    let (lanes, _) = shape(isa);
    let rows_per = chunk_rows_for(d, 4, KR);
    let nchunks = m.div_ceil(rows_per);
    let thr0 = || -> Vec<Vec<f32>> {
        gs.iter()
            .map(|g| {
                let mut t = vec![f32::INFINITY; g.qv * lanes];
                t[..g.nq].fill(f32::NEG_INFINITY);
                t
            })
            .collect()
    };
    let fresh = || {
        (
            (0..b)
                .map(|_| TopK::new(n, NanPolicy::Error))
                .collect::<Vec<_>>(),
            thr0(),
            Vec::<f32>::new(),
        )
    };
    let (tops, _, _) = (0..nchunks)
        .into_par_iter()
        .try_fold(fresh, |(mut tops, mut thr, mut buf), c| {
            let r0 = c * rows_per;
            let r1 = (r0 + rows_per).min(m);
            let src = &keys[r0 * d..r1 * d];
            let rows: &[f32] = match T::as_f32(src) {
                Some(s) => s,
                None => {
                    buf.resize(src.len(), 0.0);
                    T::convert(src, &mut buf);
                    &buf
                }
            };
            scan_rows(isa, &gs, rows, r0, r1 - r0, job, &mut tops, &mut thr)?;
            Ok::<_, NanAt>((tops, thr, buf))
        })
        .try_reduce(fresh, |(mut a, ta, ba), (b2, _, _)| {
            for (x, y) in a.iter_mut().zip(b2.iter()) {
                x.merge(y);
            }
            Ok((a, ta, ba))
        })?;
    Ok(tops)
}

/// The ISA of the query-lane kernel on this CPU, if any.
pub(crate) fn isa() -> Option<Isa> {
    if crate::simd::has_avx512() {
        Some(Isa::Avx512)
    } else if crate::simd::has_avx2() {
        Some(Isa::Avx2)
    } else {
        None
    }
}
