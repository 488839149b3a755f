//! `CapLayer`: the whole CAP mechanism (Algorithm 1) as one candle-nn layer.

use super::dissonance_topk::{dissonance_topk, dissonance_topk_reference, Context, Dissonance};
use super::gather_inject::{gather_inject, gather_inject_reference};
use super::topk_rows::{topk_rows, topk_rows_reference};
use crate::error::bail;
use crate::nn::{key_bias, LayerNorm, Mha};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

type DisFn = fn(&Tensor, Context, usize) -> crate::Result<Dissonance>;
type TopkFn = fn(&Tensor, usize) -> crate::Result<(Tensor, Tensor)>;
type InjectFn = fn(&Tensor, &Tensor, &Tensor, &Tensor) -> crate::Result<Tensor>;

/// Selection score of a token that must not be chosen (a padded token; below any
/// attention sum, which is >= 0, and below any dissonance, which is in [0, 2]).
const UNSELECTABLE: f64 = -1e30;

/// Configuration of a [`CapLayer`]: sizes plus the training-time switches. Build it with
/// [`CapConfig::new`] (the defaults below) and change a switch with the `with_*` methods,
/// or [`CapConfig::paper`] for the paper's Eq. 5-8 as this crate first implemented them.
///
/// | field | default | paper |
/// |---|---|---|
/// | `straight_through` | `false` | `true` |
/// | `detach_scoring` | `true` | `false` |
/// | `residual_gate` | `false` | `false` |
///
/// What each switch does, and the measurements behind the defaults, are on the fields and
/// in `docs/DESIGN.md` ("CAP that finds the noise").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CapConfig {
    /// Token feature size D of every input.
    pub dim: usize,
    /// Attention heads of the guidance block (must divide `dim`).
    pub heads: usize,
    /// Purification budget k (Algorithm 1): rows replaced per sample; needs k <= L and
    /// k <= the source's token count.
    pub k: usize,
    /// Straight-through gate: the hard top-k of phase 1 gives `W_proj` no gradient; with
    /// the gate the output adds a term that is exactly zero in value and whose backward
    /// gives d loss / d delta_i = <d loss / d out_i, C_i - x_i> (C_i: what replacing row
    /// i brings), so the task loss trains the scoring. It rewards replacing whatever row
    /// the injected rows improve, noise or not. Turn it on only when the replacement
    /// source is clean (it cannot hold the noise itself) and the task loss should shape
    /// `W_proj`; leave it off (the default) when the source may hold the noise, or when
    /// the selection should stay fixed while the layers around it learn. Measured: with a
    /// source holding the noise it cut the share of `noise_idx` on the noise from 87.6% to
    /// 77.5% in the noisy-token classifier; in the R2ScP model it found no more noise and
    /// did not help accuracy (`docs/DESIGN.md`, "CAP that finds the noise").
    pub straight_through: bool,
    /// Phase 1 scores detached inputs: `delta` carries a gradient to `W_proj` only, never
    /// to the sequence or the context it compares (so no loss on `delta`, e.g. the
    /// straight-through term or a detection loss, reshapes the features the rest of the
    /// model reads).
    pub detach_scoring: bool,
    /// A learned residual gate a = sigmoid(`gate`) in (0, 1) (var `gate` \[1\], starts at
    /// 0.5): a noise row becomes x_i + a (s_j - x_i) instead of s_j, so training can leave
    /// recovered rows untouched (a -> 0) or replace them fully (a -> 1).
    pub residual_gate: bool,
}

impl CapConfig {
    /// `dim`, `heads`, `k` with the default switches (table above).
    pub fn new(dim: usize, heads: usize, k: usize) -> Self {
        Self {
            dim,
            heads,
            k,
            straight_through: false,
            detach_scoring: true,
            residual_gate: false,
        }
    }

    /// The paper's Eq. 5-8 as first implemented here: hard replacement, the
    /// straight-through gate on, scoring gradients reaching the inputs.
    pub fn paper(dim: usize, heads: usize, k: usize) -> Self {
        Self {
            straight_through: true,
            detach_scoring: false,
            residual_gate: false,
            ..Self::new(dim, heads, k)
        }
    }

    /// Sets [`CapConfig::straight_through`].
    pub fn with_straight_through(mut self, on: bool) -> Self {
        self.straight_through = on;
        self
    }

    /// Sets [`CapConfig::detach_scoring`].
    pub fn with_detach_scoring(mut self, on: bool) -> Self {
        self.detach_scoring = on;
        self
    }

    /// Sets [`CapConfig::residual_gate`].
    pub fn with_residual_gate(mut self, on: bool) -> Self {
        self.residual_gate = on;
        self
    }
}

/// Output of [`CapLayer::purify`] and [`CapLayer::forward_paper`].
#[derive(Clone, Debug)]
pub struct CapOutput {
    /// [B, L, D] the sequence with its k noise rows replaced by salient guided rows (Eq.
    /// 8-9; with the residual gate, moved towards them), in the input dtype.
    pub purified: Tensor,
    /// [B, k] u32 noise rows of the sequence, delta descending, ties to the lower index;
    /// padded rows (sequence mask 0) only when fewer than k rows are valid.
    pub noise_idx: Tensor,
    /// [B, k] u32 salient rows of the guided source, saliency descending, ties to the
    /// lower index.
    pub salient_idx: Tensor,
    /// [B, L] f32 (f64 for an f64 layer) dissonance delta = 1 - cos(x_i (I + W_proj), g).
    /// Differentiable: w.r.t. `W_proj` always, w.r.t. the inputs unless
    /// [`CapConfig::detach_scoring`].
    pub delta: Tensor,
    /// [B, Ls] f32 (f64 for an f64 layer) saliency: attention each source token receives,
    /// summed over heads and valid query positions of the self-attention and (with a
    /// question) of the question-to-source attention; 0 for padded tokens. No gradient.
    pub saliency: Tensor,
}

/// What [`CapLayer::purify`] purifies a sequence against.
#[derive(Clone, Copy, Debug)]
pub enum CapContext<'a> {
    /// Another token sequence `tokens` [B, Lc, D] with an optional `mask` [B, Lc] (f32 or
    /// u8, 1 = valid): its masked mean is the anchor of phase 1 and its tokens, through
    /// the guidance block, are what replaces the noise rows (needs k <= Lc).
    Tokens {
        /// [B, Lc, D] context tokens.
        tokens: &'a Tensor,
        /// [B, Lc] f32 or u8, 1 = valid; None = all valid.
        mask: Option<&'a Tensor>,
    },
    /// A pooled context vector [B, D]: the anchor of phase 1; the replacement rows are the
    /// sequence's own non-noise rows through the guidance block.
    Pooled(&'a Tensor),
    /// No outside context (what `Module::forward` uses): the anchor is the masked mean of
    /// the sequence itself and the replacement rows are its own non-noise rows.
    Own,
}

impl<'a> CapContext<'a> {
    /// [`CapContext::Tokens`] without a mask.
    pub fn tokens(tokens: &'a Tensor) -> Self {
        Self::Tokens { tokens, mask: None }
    }
}

/// The paper's four inputs (Algorithm 1) with their masks, for [`CapLayer::forward_paper`].
/// Masks are [B, n] f32 or u8, 1 = valid; None = all valid.
#[derive(Clone, Copy, Debug)]
pub struct PaperInputs<'a> {
    /// [B, L, D] recovered tokens of the missing modality (the sequence purified).
    pub h_miss: &'a Tensor,
    /// [B, La, D] tokens of the available modality (the anchor of phase 1, Eq. 2).
    pub h_avl: &'a Tensor,
    /// [B, La] mask of `h_avl`.
    pub avl_mask: Option<&'a Tensor>,
    /// [B, Lc, D] common representation H_com = E_miss(F_avl) (Eq. 6): the source of the
    /// injected rows; needs k <= Lc.
    pub h_com: &'a Tensor,
    /// [B, Lc] mask of `h_com`.
    pub com_mask: Option<&'a Tensor>,
    /// [B, Lq, D] question tokens H_t (cross-attention of the guidance block).
    pub q: &'a Tensor,
    /// [B, Lq] mask of `q`.
    pub q_mask: Option<&'a Tensor>,
}

/// CAP as a layer (paper section 3.3, Algorithm 1): purifies a token sequence against a
/// context.
///
/// - Phase 1 (noise profiling, Eq. 2-5): P = x (I + W_proj), delta_i = 1 - cos(P_i, g)
///   against the context anchor g (masked mean of the context tokens, or the given pooled
///   vector), the k rows of largest delta are the noise rows ([`dissonance_topk`]).
///   `W_proj` starts at zero, so at initialisation the dissonance is measured in the
///   shared feature space and the learned part is a correction.
/// - Phase 2 (guidance, Eq. 6-7): over the source tokens S (the context tokens, or the
///   sequence itself), H1 = LN(S + SA(S)) and, with a question, H_guided = LN(H1 + MCA(Q:
///   H1, K/V: question)); saliency = attention each source token receives
///   ([`CapOutput::saliency`]); the k most salient rows by [`topk_rows`]. When the
///   sequence is its own source, its noise rows are never salient.
/// - Phase 3 (injection, Eq. 8-9): noise row `noise_idx[j]` becomes guided row
///   `salient_idx[j]` ([`gather_inject`]); with the residual gate it moves a learned
///   fraction of the way.
///
/// Entry points: [`CapLayer::purify`] (a sequence against a [`CapContext`], optional
/// masks, an optional question), `Module::forward` (self-purification of one [B, L, D]
/// tensor, no mask) and [`CapLayer::forward_paper`] (the paper's four inputs, what the
/// R2ScP model calls). All tensors in the layer's dtype and device.
///
/// NaN: a NaN or infinite value in the sequence or the anchor makes a dissonance NaN
/// ([`dissonance_topk`] then errors), and one in the source or the question a saliency NaN
/// (the layer then errors); either error names the batch row and token (like retrieval),
/// instead of ranking the row silently.
///
/// Variables (under the caller's prefix): `w_proj.weight` [D, D]; `sa.{q,k,v,o}.{weight,
/// bias}`; `sa_norm.{weight,bias}`; `ca.{q,k,v,o}.{weight,bias}`; `ca_norm.{weight,bias}`;
/// `gate` \[1\] with the residual gate. The cross-attention vars exist (and are trained)
/// only when a question is given.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use r2scp::cap::{CapConfig, CapContext, CapLayer};
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// // D = 16, 4 heads, replace k = 2 rows per sample
/// let cap = CapLayer::new(&CapConfig::new(16, 4, 2), vb.pp("cap"))?;
///
/// let xs = Tensor::randn(0f32, 1.0, (3, 10, 16), &dev)?; // [B, L, D]
/// let ctx = Tensor::randn(0f32, 1.0, (3, 6, 16), &dev)?; // [B, Lc, D]
///
/// // purify against another sequence: which rows were noise, what replaced them
/// let out = cap.purify(&xs, None, CapContext::tokens(&ctx), None)?;
/// assert_eq!(out.purified.dims(), &[3, 10, 16]);
/// assert_eq!(out.noise_idx.dims(), &[3, 2]);
///
/// // or self-purification, as any candle Module
/// let ys = cap.forward(&xs)?;
/// assert_eq!(ys.dims(), xs.dims());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct CapLayer {
    cfg: CapConfig,
    w_proj: Linear,
    sa: Mha,
    sa_norm: LayerNorm,
    ca: Mha,
    ca_norm: LayerNorm,
    gate: Option<Tensor>,
    centered_st: bool,
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

/// `[B, n, D]` with the layer's D and batch `b`, or an error naming `what`.
fn dims_of(t: &Tensor, what: &str, b: usize, d: usize) -> Result<usize> {
    let (tb, n, td) = t.dims3().map_err(|_| {
        candle_core::Error::Msg(format!(
            "CapLayer: {what} has shape {:?}, expected [B, n, D = {d}]",
            t.dims()
        ))
    })?;
    if td != d {
        bail!("CapLayer: {what} has feature dim {td}, expected dim = {d}");
    }
    if tb != b {
        bail!("CapLayer: {what} has batch size {tb}, expected B = {b} (the sequence's)");
    }
    Ok(n)
}

/// First (row, column) of a [B, n] tensor holding a NaN or an infinity, if any.
fn first_non_finite(t: &Tensor) -> Result<Option<(usize, usize)>> {
    let v = t.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    Ok(v.iter()
        .enumerate()
        .find_map(|(b, row)| row.iter().position(|x| !x.is_finite()).map(|i| (b, i))))
}

/// The inputs of one run of the three phases.
struct Run<'a> {
    xs: &'a Tensor,
    xs_mask: Option<&'a Tensor>,
    anchor: Context<'a>,
    /// Replacement source [B, Ls, D] and its mask; `None` = the sequence itself.
    source: Option<(&'a Tensor, Option<&'a Tensor>)>,
    query: Option<(&'a Tensor, Option<&'a Tensor>)>,
}

impl CapLayer {
    /// Builds the layer from `vb` (candle-nn convention); `cfg.heads` must divide
    /// `cfg.dim`, `cfg.k >= 1`.
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
        let gate = cfg
            .residual_gate
            .then(|| vb.get_with_hints(1, "gate", Init::Const(0.0)))
            .transpose()?;
        Ok(Self {
            cfg: *cfg,
            w_proj: Linear::new(
                vb.pp("w_proj")
                    .get_with_hints((d, d), "weight", Init::Const(0.0))?,
                None,
            ),
            sa: Mha::new(d, cfg.heads, vb.pp("sa"))?,
            sa_norm: LayerNorm::new(d, vb.pp("sa_norm"))?,
            ca: Mha::new(d, cfg.heads, vb.pp("ca"))?,
            ca_norm: LayerNorm::new(d, vb.pp("ca_norm"))?,
            gate,
            centered_st: false,
            reference_ops: false,
        })
    }

    /// Turns the straight-through gate on or off (see [`CapConfig::straight_through`]).
    pub fn with_straight_through(mut self, on: bool) -> Self {
        self.cfg.straight_through = on;
        self
    }

    /// Experiment switch: the straight-through gradient of a row is taken relative to the
    /// row's mean over the sequence (the top-k does not change when every delta of a row
    /// moves together, so that component of the gradient carries no selection signal).
    #[doc(hidden)]
    pub fn with_centered_straight_through(mut self, on: bool) -> Self {
        self.centered_st = on;
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

    /// The residual gate's current value a in (0, 1) (None without the gate).
    pub fn residual_gate(&self) -> Result<Option<f64>> {
        self.gate
            .as_ref()
            .map(|g| {
                candle_nn::ops::sigmoid(&g.to_dtype(DType::F64)?)?
                    .squeeze(0)?
                    .to_scalar::<f64>()
            })
            .transpose()
    }

    /// Purifies `xs` [B, L, D] (optional `xs_mask` [B, L], 1 = valid: padded rows are
    /// chosen as noise only when fewer than k rows are valid) against `context`, with an
    /// optional question `query` = (tokens [B, Lq, D], mask [B, Lq]) guiding the choice
    /// of replacement rows (cross-attention). Masks are f32 or u8. Needs k <= L, and
    /// k <= Lc for a token context.
    pub fn purify(
        &self,
        xs: &Tensor,
        xs_mask: Option<&Tensor>,
        context: CapContext<'_>,
        query: Option<(&Tensor, Option<&Tensor>)>,
    ) -> Result<CapOutput> {
        let (anchor, source) = match context {
            CapContext::Tokens { tokens, mask } => (
                Context::Tokens {
                    h_avl: tokens,
                    mask,
                },
                Some((tokens, mask)),
            ),
            CapContext::Pooled(g) => (Context::Anchor(g), None),
            CapContext::Own => (
                Context::Tokens {
                    h_avl: xs,
                    mask: xs_mask,
                },
                None,
            ),
        };
        self.run(Run {
            xs,
            xs_mask,
            anchor,
            source,
            query,
        })
    }

    /// The paper's form (Algorithm 1): `h_miss` purified against the masked mean of
    /// `h_avl`, noise rows replaced by salient rows of `h_com` guided by the question `q`.
    /// This is what the R2ScP model calls. Needs k <= L and k <= Lc.
    pub fn forward_paper(&self, x: &PaperInputs<'_>) -> Result<CapOutput> {
        self.run(Run {
            xs: x.h_miss,
            xs_mask: None,
            anchor: Context::Tokens {
                h_avl: x.h_avl,
                mask: x.avl_mask,
            },
            source: Some((x.h_com, x.com_mask)),
            query: Some((x.q, x.q_mask)),
        })
    }

    fn run(&self, r: Run<'_>) -> Result<CapOutput> {
        let d = self.cfg.dim;
        let k = self.cfg.k;
        let (b, l, dm) = r.xs.dims3()?;
        if dm != d {
            bail!("CapLayer: the sequence has feature dim {dm}, expected dim = {d}");
        }
        if k > l {
            bail!("CapLayer: k = {k} exceeds the L = {l} tokens of the sequence");
        }
        let dt = r.xs.dtype();
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
        let acc = super::dissonance_topk::acc_dtype(dt);
        let xm = r
            .xs_mask
            .map(|m| mask_or_ones(Some(m), b, l, acc, r.xs, "sequence mask"))
            .transpose()?;

        // Phase 1: consistency-based noise profiling.
        let detach = self.cfg.detach_scoring;
        let xs_s = if detach { r.xs.detach() } else { r.xs.clone() };
        let p = (&xs_s + self.w_proj.forward(&xs_s)?)?; // P = x (I + W_proj)
        let anchor_d;
        let anchor = match r.anchor {
            Context::Anchor(g) if detach => {
                anchor_d = g.detach();
                Context::Anchor(&anchor_d)
            }
            Context::Tokens { h_avl, mask } if detach => {
                anchor_d = h_avl.detach();
                Context::Tokens {
                    h_avl: &anchor_d,
                    mask,
                }
            }
            c => c,
        };
        // A NaN delta (a NaN or infinity in the sequence, its context or W_proj) is the op's
        // error, naming the batch row and token.
        let dis = dis_op(&p, anchor, k)?;
        let noise_idx = match &xm {
            // padded rows are selected last
            Some(m) => {
                let sel = (dis.delta.detach() + ((1.0 - m)? * UNSELECTABLE)?)?;
                topk_op(&sel, k)?.1
            }
            None => dis.noise_idx.clone(),
        };

        // Phase 2: guidance block over the source.
        let own = r.source.is_none();
        let (src, src_mask) = match r.source {
            Some((s, m)) => (s.clone(), m.cloned()),
            None => (r.xs.clone(), r.xs_mask.cloned()),
        };
        let ls = dims_of(&src, "the context tokens", b, d)?;
        if k > ls {
            bail!("CapLayer: k = {k} exceeds the Lc = {ls} tokens of the context");
        }
        let cm = mask_or_ones(src_mask.as_ref(), b, ls, dt, &src, "context mask")?;
        let cbias = key_bias(&cm, dt)?; // [B, 1, 1, Ls]
        let sa_logits = self.sa.logits(&src, &src)?.broadcast_add(&cbias)?;
        let a_self = candle_nn::ops::softmax(&sa_logits, D::Minus1)?; // [B, H, Ls, Ls]
        let h1 = self
            .sa_norm
            .forward(&(&src + self.sa.mix(&a_self, &src)?)?)?;
        let cm_a = cm.to_dtype(acc)?;
        let recv_self = a_self
            .detach()
            .to_dtype(acc)?
            .broadcast_mul(&cm_a.unsqueeze(1)?.unsqueeze(3)?)? // valid query rows
            .sum(2)?
            .sum(1)?; // [B, Ls]
        let (h_guided, saliency) = match r.query {
            None => (h1, (recv_self * &cm_a)?),
            Some((q, q_mask)) => {
                let lq = dims_of(q, "the question", b, d)?;
                let qm = mask_or_ones(q_mask, b, lq, dt, q, "question mask")?;
                let qbias = key_bias(&qm, dt)?; // [B, 1, 1, Lq]
                let ca_logits = self.ca.logits(&h1, q)?; // [B, H, Ls, Lq]
                let a_cross =
                    candle_nn::ops::softmax(&ca_logits.broadcast_add(&qbias)?, D::Minus1)?;
                let h_guided = self.ca_norm.forward(&(&h1 + self.ca.mix(&a_cross, q)?)?)?;
                let q2c = candle_nn::ops::softmax(
                    &ca_logits
                        .detach()
                        .to_dtype(acc)?
                        .broadcast_add(&cbias.to_dtype(acc)?.reshape((b, 1, ls, 1))?)?,
                    2,
                )?; // [B, H, Ls, Lq], softmax over the source axis
                let recv_cross = q2c
                    .broadcast_mul(&qm.to_dtype(acc)?.unsqueeze(1)?.unsqueeze(1)?)? // valid question tokens
                    .sum(3)?
                    .sum(1)?;
                (h_guided, ((recv_self + recv_cross)? * &cm_a)?)
            }
        };
        if let Some((bi, i)) = first_non_finite(&saliency)? {
            bail!(
                "CapLayer: the saliency of context token {i} of batch row {bi} is not finite \
                 (a NaN or infinite value in the context or the question)"
            );
        }
        let mut select = (&saliency + ((1.0 - &cm_a)? * UNSELECTABLE)?)?;
        if own {
            // A row replaced by (a guided copy of) itself or another noise row is not
            // purified: the salient rows come from the sequence's non-noise rows.
            let noise_rows = Tensor::zeros((b, l), acc, r.xs.device())?.scatter_add(
                &noise_idx,
                &Tensor::ones((b, k), acc, r.xs.device())?,
                1,
            )?;
            select = (select + (noise_rows * UNSELECTABLE)?)?;
        }
        let (_, salient_idx) = topk_op(&select, k)?;

        // Phase 3: selective injection.
        let injected = inject_op(r.xs, &h_guided, &noise_idx, &salient_idx)?;
        let gate = self
            .gate
            .as_ref()
            .map(|g| candle_nn::ops::sigmoid(&g.to_dtype(dt)?))
            .transpose()?;
        let mut purified = match &gate {
            // x + a (injected - x): only the noise rows differ from x
            Some(a) => (r.xs + (injected - r.xs)?.broadcast_mul(a)?)?,
            None => injected,
        };
        if self.cfg.straight_through {
            let sal_rows = salient_idx
                .unsqueeze(2)?
                .broadcast_as((b, k, d))?
                .contiguous()?;
            let hg = h_guided.detach();
            let mean_inj = hg.gather(&sal_rows, 1)?.mean_keepdim(1)?; // [B, 1, D]
            let fill = mean_inj.broadcast_as((b, l, d))?.contiguous()?;
            let counter = inject_op(&fill, &hg, &noise_idx, &salient_idx)?;
            let mut diff = (counter - r.xs.detach())?;
            if let Some(a) = &gate {
                diff = diff.broadcast_mul(&a.detach())?;
            }
            let delta = if self.centered_st {
                dis.delta.broadcast_sub(&dis.delta.mean_keepdim(1)?)?
            } else {
                dis.delta.clone()
            };
            let st = (&delta - delta.detach())?.to_dtype(dt)?; // 0 in value
            purified = (purified + diff.broadcast_mul(&st.unsqueeze(2)?)?)?;
        }
        Ok(CapOutput {
            purified,
            noise_idx,
            salient_idx,
            delta: dis.delta,
            saliency,
        })
    }
}

/// Self-purification: `xs` [B, L, D] against its own mean, noise rows replaced by its own
/// guided non-noise rows; returns the purified [B, L, D]. Needs 1 <= k <= L.
impl Module for CapLayer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.purify(xs, None, CapContext::Own, None)?.purified)
    }
}
