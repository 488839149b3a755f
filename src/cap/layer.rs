//! `CapLayer`: the whole CAP mechanism (Algorithm 1) as one candle-nn layer.

use super::dissonance_topk::{dissonance_topk, dissonance_topk_reference, Context, Dissonance};
use super::gather_inject::{gather_inject, gather_inject_reference};
use super::topk_rows::{topk_rows, topk_rows_reference};
use crate::error::bail;
use crate::nn::{key_bias, LayerNorm, Mha};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

type DisFn = fn(&Tensor, Context, usize) -> crate::Result<Dissonance>;
type TopkFn = fn(&Tensor, usize) -> crate::Result<(Tensor, Tensor)>;
type InjectFn = fn(&Tensor, &Tensor, &Tensor, &Tensor) -> crate::Result<Tensor>;

/// Selection score of a padded `H_com` token (below any attention sum, which is >= 0).
const PAD_SALIENCY: f64 = -1e30;

/// Configuration of a [`CapLayer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CapConfig {
    /// Token feature size D of H_miss, H_avl, H_com and the question tokens.
    pub dim: usize,
    /// Attention heads of the guidance block (must divide `dim`).
    pub heads: usize,
    /// Purification budget k (Algorithm 1): rows replaced per sample; needs k <= L and k <= Lc.
    pub k: usize,
}

impl CapConfig {
    /// `CapConfig { dim, heads, k }`.
    pub fn new(dim: usize, heads: usize, k: usize) -> Self {
        Self { dim, heads, k }
    }
}

/// Output of [`CapLayer::forward`].
#[derive(Clone, Debug)]
pub struct CapOutput {
    /// [B, L, D] H_miss with its k noise rows replaced by salient guided rows (Eq. 8-9), plus
    /// the straight-through term that is exactly zero in value (see [`CapLayer`]).
    pub purified: Tensor,
    /// [B, k] u32 noise rows of H_miss, delta descending, ties to the lower index.
    pub noise_idx: Tensor,
    /// [B, k] u32 salient rows of H_guided, saliency descending, ties to the lower index.
    pub salient_idx: Tensor,
    /// [B, L] f32 (f64 for an f64 layer) dissonance delta, differentiable.
    pub delta: Tensor,
    /// [B, Lc] f32 (f64 for an f64 layer) saliency: attention each H_com token receives,
    /// summed over heads and valid query positions of the self-attention and of the
    /// question-to-H_com attention; 0 for padded tokens. No gradient.
    pub saliency: Tensor,
}

/// CAP as a drop-in layer (paper section 3.3, Algorithm 1).
///
/// Phase 1: P = H_miss (I + W_proj), delta and noise indices by [`dissonance_topk`] against
/// the masked mean of H_avl. `W_proj` starts at zero, so at initialisation the dissonance is
/// measured in the shared feature space and the learned part is a correction. Phase 2: the guidance block, H1 = LN(H_com + SA(H_com)) and
/// H_guided = LN(H1 + MCA(Q: H1, K/V: question)); saliency as in [`CapOutput::saliency`];
/// salient indices by [`topk_rows`]. Phase 3: [`gather_inject`] of H_guided rows into H_miss.
///
/// Straight-through gate (on by default): the hard top-k gives `W_proj` no gradient, so the
/// output adds `(delta - stop_grad(delta))[b, i] * stop_grad(C - H_miss)[b, i, :]`, exactly 0
/// in value, where C is the injected output for noise rows and, for the other rows, the mean
/// of the k injected salient rows (what replacing that row would have brought). The backward
/// gives d loss / d delta_i = <d loss / d out_i, C_i - H_miss_i>, which reaches `W_proj`
/// through the differentiable delta.
///
/// Variables (under the caller's prefix): `w_proj.weight` [D, D]; `sa.{q,k,v,o}.{weight,bias}`;
/// `sa_norm.{weight,bias}`; `ca.{q,k,v,o}.{weight,bias}`; `ca_norm.{weight,bias}`.
pub struct CapLayer {
    cfg: CapConfig,
    w_proj: Linear,
    sa: Mha,
    sa_norm: LayerNorm,
    ca: Mha,
    ca_norm: LayerNorm,
    straight_through: bool,
    reference_ops: bool,
}

/// A [B, n] f32|u8 mask as `dtype` (ones when absent), after a shape check.
fn mask_or_ones(
    m: Option<&Tensor>,
    b: usize,
    n: usize,
    dtype: DType,
    like: &Tensor,
    what: &str,
) -> Result<Tensor> {
    match m {
        Some(m) => {
            if m.dims() != [b, n] {
                bail!(
                    "CapLayer: {what} has shape {:?}, expected [{b}, {n}]",
                    m.dims()
                );
            }
            if !matches!(m.dtype(), DType::F32 | DType::U8 | DType::F64) {
                bail!("CapLayer: {what} dtype {:?}, expected f32 or u8", m.dtype());
            }
            m.to_dtype(dtype)
        }
        None => Tensor::ones((b, n), dtype, like.device()),
    }
}

impl CapLayer {
    /// Builds the layer; `cfg.heads` must divide `cfg.dim`, `cfg.k >= 1`.
    pub fn new(cfg: &CapConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.dim == 0 || cfg.heads == 0 || !cfg.dim.is_multiple_of(cfg.heads) {
            bail!(
                "CapLayer: heads = {} must divide dim = {} (both >= 1)",
                cfg.heads,
                cfg.dim
            );
        }
        if cfg.k == 0 {
            bail!("CapLayer: k = 0, expected k >= 1");
        }
        let d = cfg.dim;
        Ok(Self {
            cfg: *cfg,
            w_proj: Linear::new(
                vb.pp("w_proj")
                    .get_with_hints((d, d), "weight", candle_nn::Init::Const(0.0))?,
                None,
            ),
            sa: Mha::new(d, cfg.heads, vb.pp("sa"))?,
            sa_norm: LayerNorm::new(d, vb.pp("sa_norm"))?,
            ca: Mha::new(d, cfg.heads, vb.pp("ca"))?,
            ca_norm: LayerNorm::new(d, vb.pp("ca_norm"))?,
            straight_through: true,
            reference_ops: false,
        })
    }

    /// Turns the straight-through gate on (default) or off. Off, `W_proj` gets no gradient and
    /// every gradient is the exact derivative of the (piecewise smooth) forward.
    pub fn with_straight_through(mut self, on: bool) -> Self {
        self.straight_through = on;
        self
    }

    /// Runs the three CAP ops through their plain-candle `*_reference` compositions instead
    /// of the fused paths (for benchmarks and cross-checks; same results).
    pub fn with_reference_ops(mut self, on: bool) -> Self {
        self.reference_ops = on;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &CapConfig {
        &self.cfg
    }

    /// CAP forward. Shapes: `h_miss` [B, L, D] (retrieved, missing modality), `h_avl`
    /// [B, La, D] with `avl_mask` [B, La], `h_com` [B, Lc, D] with `com_mask` [B, Lc], `q`
    /// [B, Lq, D] question tokens with `q_mask` [B, Lq]; masks f32 or u8, 1 = valid, None = all
    /// valid. All tensors in the layer's dtype and device. Needs k <= L and k <= Lc.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        h_miss: &Tensor,
        h_avl: &Tensor,
        avl_mask: Option<&Tensor>,
        h_com: &Tensor,
        com_mask: Option<&Tensor>,
        q: &Tensor,
        q_mask: Option<&Tensor>,
    ) -> Result<CapOutput> {
        let d = self.cfg.dim;
        let k = self.cfg.k;
        let (b, l, dm) = h_miss.dims3()?;
        let (cb, lc, cd) = h_com.dims3()?;
        let (qb, lq, qd) = q.dims3()?;
        if dm != d || cd != d || qd != d {
            bail!("CapLayer: feature dims h_miss {dm}, h_com {cd}, q {qd}; expected dim = {d}");
        }
        if cb != b || qb != b {
            bail!("CapLayer: batch sizes h_miss {b}, h_com {cb}, q {qb} differ");
        }
        if k > lc {
            bail!("CapLayer: k = {k} exceeds the Lc = {lc} common tokens");
        }
        let dt = h_miss.dtype();
        // Phase 1: consistency-based noise profiling.
        let p = (h_miss + self.w_proj.forward(h_miss)?)?; // P = H_miss (I + W_proj)
        let (dis_op, topk_op, inject_op) = if self.reference_ops {
            (
                dissonance_topk_reference as DisFn,
                topk_rows_reference as TopkFn,
                gather_inject_reference as InjectFn,
            )
        } else {
            (
                dissonance_topk as DisFn,
                topk_rows as TopkFn,
                gather_inject as InjectFn,
            )
        };
        let dis = dis_op(
            &p,
            Context::Tokens {
                h_avl,
                mask: avl_mask,
            },
            k,
        )?;

        // Phase 2: guidance block.
        let cm = mask_or_ones(com_mask, b, lc, dt, h_com, "com_mask")?;
        let qm = mask_or_ones(q_mask, b, lq, dt, q, "q_mask")?;
        let cbias = key_bias(&cm, dt)?; // [B, 1, 1, Lc]
        let qbias = key_bias(&qm, dt)?; // [B, 1, 1, Lq]

        let sa_logits = self.sa.logits(h_com, h_com)?.broadcast_add(&cbias)?;
        let a_self = candle_nn::ops::softmax(&sa_logits, D::Minus1)?; // [B, H, Lc, Lc]
        let h1 = self
            .sa_norm
            .forward(&(h_com + self.sa.mix(&a_self, h_com)?)?)?;

        let ca_logits = self.ca.logits(&h1, q)?; // [B, H, Lc, Lq]
        let a_cross = candle_nn::ops::softmax(&ca_logits.broadcast_add(&qbias)?, D::Minus1)?;
        let h_guided = self.ca_norm.forward(&(&h1 + self.ca.mix(&a_cross, q)?)?)?;

        // Saliency: attention received by each H_com token (no gradient).
        let acc = super::dissonance_topk::acc_dtype(dt);
        let cm_a = cm.to_dtype(acc)?;
        let qm_a = qm.to_dtype(acc)?;
        let recv_self = a_self
            .detach()
            .to_dtype(acc)?
            .broadcast_mul(&cm_a.unsqueeze(1)?.unsqueeze(3)?)? // valid query rows
            .sum(2)?
            .sum(1)?; // [B, Lc]
        let q2c = candle_nn::ops::softmax(
            &ca_logits
                .detach()
                .to_dtype(acc)?
                .broadcast_add(&cbias.to_dtype(acc)?.reshape((b, 1, lc, 1))?)?,
            2,
        )?; // [B, H, Lc, Lq], softmax over the H_com axis
        let recv_cross = q2c
            .broadcast_mul(&qm_a.unsqueeze(1)?.unsqueeze(1)?)? // valid question tokens
            .sum(3)?
            .sum(1)?;
        let saliency = ((recv_self + recv_cross)? * &cm_a)?;
        let select = (&saliency + ((1.0 - &cm_a)? * PAD_SALIENCY)?)?;
        let (_, salient_idx) = topk_op(&select, k)?;

        // Phase 3: selective injection.
        let mut purified = inject_op(h_miss, &h_guided, &dis.noise_idx, &salient_idx)?;
        if self.straight_through {
            let sal_rows = salient_idx
                .unsqueeze(2)?
                .broadcast_as((b, k, d))?
                .contiguous()?;
            let mean_inj = h_guided.detach().gather(&sal_rows, 1)?.mean_keepdim(1)?; // [B, 1, D]
            let fill = mean_inj.broadcast_as((b, l, d))?.contiguous()?;
            let counter = inject_op(&fill, &h_guided.detach(), &dis.noise_idx, &salient_idx)?;
            let diff = (counter - h_miss.detach())?;
            let gate = (&dis.delta - dis.delta.detach())?.to_dtype(dt)?; // 0 in value
            purified = (purified + diff.broadcast_mul(&gate.unsqueeze(2)?)?)?;
        }
        Ok(CapOutput {
            purified,
            noise_idx: dis.noise_idx,
            salient_idx,
            delta: dis.delta,
            saliency,
        })
    }
}
