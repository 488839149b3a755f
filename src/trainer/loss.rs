//! Losses of the two stages: per-sample cross-entropy (Eq. 10, L_task) and the hinge
//! ranking loss of Eq. 13-15.

use candle_core::{bail, DType, Result, Tensor, D};

/// Per-sample cross-entropy: logits [B, A] f32, target \[B\] u32 -> \[B\] f32 (differentiable
/// w.r.t. the logits; built from ops that all have a backward).
pub fn cross_entropy_per_sample(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let (b, a) = logits.dims2()?;
    if target.dims() != [b] {
        bail!(
            "cross_entropy: target has shape {:?}, expected [{b}] for logits [{b}, {a}]",
            target.dims()
        );
    }
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let t = target.to_dtype(DType::U32)?.unsqueeze(1)?;
    logp.gather(&t, 1)?.squeeze(1)?.neg()
}

/// Mean of `per_sample` \[B\] weighted by `weight` \[B\] (0/1 presence); 0 when all weights are 0.
pub fn weighted_mean(per_sample: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let w = weight.to_dtype(DType::F32)?;
    let n = w.sum_all()?.to_scalar::<f32>()?;
    let s = (per_sample * &w)?.sum_all()?;
    if n <= 0.0 {
        return s.affine(0.0, 0.0);
    }
    s.affine(1.0 / n as f64, 0.0)
}

/// The two hinge terms of Eq. 13-14 from per-sample task losses \[R\] (mean over R):
/// `L_rank+ = mean max(0, margin + L(Y|X_gt) - L(Y|R+))`,
/// `L_rank- = mean max(0, margin + L(Y|R+) - L(Y|R-))`.
/// Returns `(rank_pos, rank_neg)`, scalars. Gradients flow into all three terms, as
/// written in the paper.
pub fn rank_terms(
    l_gt: &Tensor,
    l_pos: &Tensor,
    l_neg: &Tensor,
    margin: f64,
) -> Result<(Tensor, Tensor)> {
    if l_gt.dims() != l_pos.dims() || l_pos.dims() != l_neg.dims() || l_gt.rank() != 1 {
        bail!(
            "rank_terms: per-sample losses must be [R] alike, got gt {:?}, pos {:?}, neg {:?}",
            l_gt.dims(),
            l_pos.dims(),
            l_neg.dims()
        );
    }
    let pos = ((l_gt - l_pos)? + margin)?.relu()?.mean_all()?;
    let neg = ((l_pos - l_neg)? + margin)?.relu()?.mean_all()?;
    Ok((pos, neg))
}

/// Number of rows of logits [B, A] whose argmax equals target \[B\] (ties: lowest index).
pub fn correct(logits: &Tensor, target: &Tensor) -> Result<Vec<bool>> {
    let pred = argmax_rows(logits)?;
    let t = target.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(&t).map(|(p, t)| p == t).collect())
}

/// Row-wise argmax of [B, A] (ties go to the lower index), on the host.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let v = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(v.iter()
        .map(|row| {
            let mut best = 0usize;
            for (i, x) in row.iter().enumerate() {
                if *x > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ce_matches_manual() -> Result<()> {
        let dev = Device::Cpu;
        let l = Tensor::new(&[[1f32, 2.0, 3.0], [0.0, 0.0, 0.0]], &dev)?;
        let t = Tensor::new(&[2u32, 1], &dev)?;
        let ce = cross_entropy_per_sample(&l, &t)?.to_vec1::<f32>()?;
        let lse = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        assert!((ce[0] - (lse - 3.0)).abs() < 1e-5);
        assert!((ce[1] - 3f32.ln()).abs() < 1e-5);
        assert_eq!(correct(&l, &t)?, vec![true, false]);
        Ok(())
    }
}
