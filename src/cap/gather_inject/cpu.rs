//! Fused CPU paths of `gather_inject`: the forward copy with injected rows, and the two
//! halves of its backward (zeroed noise rows; gradients summed into source rows), rayon over
//! batch rows.

use super::contract::Injection;
use crate::elem::{axpy, Acc, Elem};
use rayon::prelude::*;

/// Rows per rayon task so that a task moves at least ~256 KiB.
fn min_rows(row_bytes: usize) -> usize {
    (262_144 / row_bytes.max(1)).max(1)
}

/// A copy of `h` [B, L, D] whose noise rows are rewritten by `fill(b, j, row)` (j indexes
/// the noise list of batch row b).
fn rewrite_noise_rows<T: Copy + Send + Sync>(
    h: &[T],
    plan: &Injection,
    fill: impl Fn(usize, usize, &mut [T]) + Sync,
) -> Vec<T> {
    let Injection { l, d, k, .. } = *plan;
    let mut out = h.to_vec();
    out.par_chunks_mut(l * d)
        .enumerate()
        .with_min_len(min_rows(l * d * std::mem::size_of::<T>()))
        .for_each(|(bi, orow)| {
            for j in 0..k {
                let n = plan.noise[bi * k + j] as usize;
                fill(bi, j, &mut orow[n * d..(n + 1) * d]);
            }
        });
    out
}

/// The forward: `h` with row `noise[b, j]` replaced by `src[b, sal[b, j]]`.
pub(crate) fn forward<T: Copy + Send + Sync>(h: &[T], src: &[T], plan: &Injection) -> Vec<T> {
    let Injection { ls, d, k, .. } = *plan;
    rewrite_noise_rows(h, plan, |bi, j, row| {
        let s = bi * ls + plan.sal[bi * k + j] as usize;
        row.copy_from_slice(&src[s * d..(s + 1) * d]);
    })
}

/// The gradient w.r.t. `h`: the output gradient `g` with the noise rows zeroed.
pub(crate) fn zero_rows<T: Copy + Send + Sync + Default>(g: &[T], plan: &Injection) -> Vec<T> {
    rewrite_noise_rows(g, plan, |_, _, row| row.fill(T::default()))
}

/// The gradient w.r.t. `src` [B, Ls, D]: each source row sums, in j order, the gradients of
/// the rows it was injected into (0 where unused).
pub(crate) fn scatter_rows<T: Elem + Default>(g: &[T], plan: &Injection) -> Vec<T> {
    let Injection { l, ls, d, k, .. } = *plan;
    let mut out = vec![T::default(); plan.b * ls * d];
    out.par_chunks_mut(ls * d)
        .enumerate()
        .with_min_len(min_rows(ls * d * std::mem::size_of::<T>()))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(acc, buf), (bi, orow)| {
                for s in 0..ls {
                    // sum, in j order, the gradients of the rows this source row was injected into
                    let mut used = false;
                    for j in 0..k {
                        if plan.sal[bi * k + j] as usize != s {
                            continue;
                        }
                        if !used {
                            acc.clear();
                            acc.resize(d, <T::Acc as Acc>::ZERO);
                            used = true;
                        }
                        let n = plan.noise[bi * k + j] as usize;
                        let row = T::widen(&g[(bi * l + n) * d..(bi * l + n + 1) * d], buf);
                        axpy(acc, <T::Acc as Acc>::ONE, row);
                    }
                    if used {
                        T::narrow(acc, &mut orow[s * d..(s + 1) * d]);
                    }
                }
            },
        );
    out
}
