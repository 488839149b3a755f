//! Fused CPU path of `dissonance_topk`: one pass per batch row (rayon over rows): the anchor
//! (Eq. 2), one cosine per retrieved token (Eq. 3) and the top-k by delta (Eq. 5), ties to
//! the lower index, NaN ranked last.

use super::contract::{Dims, OP};
use crate::check::contiguous_slice;
use crate::elem::{axpy, dot, Acc, Elem};
use crate::kernel::abi::COS_EPS;
use crate::topk::{row_topk, NanPolicy};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// The context of the CPU path: anchor rows [B, D], or tokens [B, La, D] with optional
/// per-token weights [B, La].
enum CpuContext<'a, T: Elem> {
    Anchor(&'a [T]),
    Tokens {
        h: &'a [T],
        mask: Option<Vec<T::Acc>>,
    },
}

/// What the CPU forward returns: delta [B, L] (accumulation type), noise indices [B, k] and
/// the 0/1 noise mask [B, L].
pub(crate) struct CpuOutputs {
    pub delta: CpuStorage,
    pub idx: Vec<u32>,
    pub mask: Vec<f32>,
}

fn forward<T: Elem>(p: &[T], ctx: CpuContext<'_, T>, dims: Dims) -> Result<CpuOutputs> {
    let Dims { b, l, la, d, k } = dims;
    let mut delta = vec![T::Acc::ZERO; b * l];
    let mut idx = vec![0u32; b * k];
    let mut nmask = vec![0f32; b * l];
    let eps = T::Acc::from_f64(COS_EPS as f64);
    // one task per batch row; small rows are grouped so a task carries ~64k MACs.
    let work = (l + la.max(1)) * d;
    let min_len = (65_536 / work.max(1)).max(1);
    delta
        .par_chunks_mut(l)
        .zip(idx.par_chunks_mut(k))
        .zip(nmask.par_chunks_mut(l))
        .enumerate()
        .with_min_len(min_len)
        .try_for_each_init(
            || (Vec::new(), Vec::new(), Vec::new(), None),
            |(buf, gbuf, gacc, topk), (bi, ((drow, irow), mrow))| {
                // Eq. 2: the anchor.
                let g: &[T::Acc] = match &ctx {
                    CpuContext::Anchor(a) => T::widen(&a[bi * d..(bi + 1) * d], gbuf),
                    CpuContext::Tokens { h, mask } => {
                        gacc.clear();
                        gacc.resize(d, T::Acc::ZERO);
                        let mut cnt = T::Acc::ZERO;
                        for t in 0..la {
                            let w = match mask {
                                Some(m) => m[bi * la + t],
                                None => T::Acc::ONE,
                            };
                            if w == T::Acc::ZERO {
                                continue;
                            }
                            let row = T::widen(&h[(bi * la + t) * d..(bi * la + t + 1) * d], buf);
                            axpy(gacc, w, row);
                            cnt = cnt + w;
                        }
                        if cnt != T::Acc::ZERO {
                            for v in gacc.iter_mut() {
                                *v = *v / cnt;
                            }
                        }
                        gacc
                    }
                };
                let ng = dot(g, g).sqrt();
                // Eq. 3: one cosine per retrieved token.
                for (i, dv) in drow.iter_mut().enumerate() {
                    let row = T::widen(&p[(bi * l + i) * d..(bi * l + i + 1) * d], buf);
                    let s = dot(row, g);
                    let np = dot(row, row).sqrt();
                    *dv = T::Acc::ONE - s / (np * ng + eps);
                }
                // Eq. 5: top-k by delta, ties to the lower index, NaN last.
                row_topk(drow, k, NanPolicy::RankLast, irow, topk).map_err(|(i, _)| {
                    candle_core::Error::Msg(format!("{OP}: internal error, NaN at token {i}"))
                })?;
                for &i in irow.iter() {
                    mrow[i as usize] = 1.0;
                }
                Ok::<(), candle_core::Error>(())
            },
        )?;
    Ok(CpuOutputs {
        delta: T::Acc::into_storage(delta),
        idx,
        mask: nmask,
    })
}

/// Mask weights of a CPU storage (f32, u8 or f64) in the accumulation type.
fn mask_values<A: Acc>(s: &CpuStorage, layout: &Layout) -> Result<Vec<A>> {
    Ok(match s {
        CpuStorage::F32(v) => contiguous_slice(v, layout, OP)?
            .iter()
            .map(|&x| A::from_f64(x as f64))
            .collect(),
        CpuStorage::F64(v) => contiguous_slice(v, layout, OP)?
            .iter()
            .map(|&x| A::from_f64(x))
            .collect(),
        CpuStorage::U8(v) => contiguous_slice(v, layout, OP)?
            .iter()
            .map(|&x| A::from_f64(x as f64))
            .collect(),
        other => bail!(
            "{OP}: mask dtype {:?} is not supported (expected f32 or u8)",
            other.dtype()
        ),
    })
}

/// The CPU forward on storages: `p` [B, L, D], the context (`anchor`: [B, D] rows, else
/// tokens [B, La, D] with an optional mask [B, La]).
pub(crate) fn forward_storage(
    (p, pl): (&CpuStorage, &Layout),
    (c, cl): (&CpuStorage, &Layout),
    mask: Option<(&CpuStorage, &Layout)>,
    anchor: bool,
    dims: Dims,
) -> Result<CpuOutputs> {
    macro_rules! typed {
        ($t:ty, $p:expr, $c:expr) => {{
            let p: &[$t] = contiguous_slice($p, pl, OP)?;
            let c: &[$t] = contiguous_slice($c, cl, OP)?;
            let ctx = if anchor {
                CpuContext::Anchor(c)
            } else {
                let mask = match mask {
                    Some((ms, ml)) => Some(mask_values::<<$t as Elem>::Acc>(ms, ml)?),
                    None => None,
                };
                CpuContext::Tokens { h: c, mask }
            };
            forward::<$t>(p, ctx, dims)
        }};
    }
    match (p, c) {
        (CpuStorage::F32(p), CpuStorage::F32(c)) => typed!(f32, p, c),
        (CpuStorage::F16(p), CpuStorage::F16(c)) => typed!(f16, p, c),
        (CpuStorage::BF16(p), CpuStorage::BF16(c)) => typed!(bf16, p, c),
        (CpuStorage::F64(p), CpuStorage::F64(c)) => typed!(f64, p, c),
        (p, c) => bail!(
            "{OP}: unsupported dtypes P {:?} / context {:?}",
            p.dtype(),
            c.dtype()
        ),
    }
}
