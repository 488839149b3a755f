//! The full R2ScP model: experts, CMR, CAP, router (Eq. 11), Z_joint (Eq. 12), decoder.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use candle_core::{DType, Device, Module, Result, Tensor, TensorId, D};
use candle_nn::{Init, Linear, VarBuilder};

use super::config::{CapAnchor, ModelConfig};
use super::expert::{AvExpert, ExpertSizes, TextExpert};
use super::recovery::{self, Banks, RecoveryHead, ROUTER_STATS};
use crate::cap::{CapConfig, CapLayer, PaperInputs};
use crate::data::{Batch, DataDims, Missing, Modality};
use crate::nn::{index_tensor, masked_mean, DropoutRng, LayerNorm, Mha, TransformerEncoder};

/// Prefix of every stage-I var (Phi_m, E_m and the stage-I heads of all three experts).
/// Stage II trains every var whose name does NOT start with it.
pub const EXPERT_PREFIX: &str = "expert.";

/// True when the VarMap entry `name` belongs to an expert (frozen in stage II).
pub fn is_expert_var(name: &str) -> bool {
    name.starts_with(EXPERT_PREFIX)
}

/// Stage-I logits of the three experts (Eq. 10), each [B, A] f32.
/// `audio` / `visual` rows of samples whose modality is missing are zeros (the expert
/// never runs on them): weight the per-sample losses by `audio_present` / `visual_present`.
#[derive(Clone, Debug)]
pub struct ExpertLogits {
    /// P(y | E_a(F_a), question) logits [B, A].
    pub audio: Tensor,
    /// P(y | E_v(F_v), question) logits [B, A].
    pub visual: Tensor,
    /// The {v, t, a} term: E_t tokens attending over the available A/V expert tokens [B, A].
    pub text: Tensor,
    /// \[B\] f32, 1 where audio is present.
    pub audio_present: Tensor,
    /// \[B\] f32, 1 where visual is present.
    pub visual_present: Tensor,
}

/// Logits for the ranking loss (Eq. 13-15) on the R batch rows that have a missing
/// modality whose clip is in the bank (so its ground truth is known in training).
#[derive(Clone, Debug)]
pub struct RankTerms {
    /// Batch rows \[R\] (ascending), also as a u32 tensor `rows_t` \[R\] for `index_select`.
    pub rows: Vec<usize>,
    /// `rows` as a \[R\] u32 tensor on the batch's device.
    pub rows_t: Tensor,
    /// [R, A]: the missing modality replaced by the ground-truth features (the bank row
    /// of the sample's own clip) through Phi/E, no CAP: Y | X_gt.
    pub logits_gt: Tensor,
    /// [R, A]: the ordinary forward (top-n positive retrieval, CAP if on): Y | R+.
    /// Equal to `Output::logits` at `rows`.
    pub logits_pos: Tensor,
    /// [R, A]: the n LEAST similar bank rows instead (CAP if on): Y | R-.
    pub logits_neg: Tensor,
}

/// What CMR retrieved for the rows missing `modality` in one forward.
#[derive(Clone, Debug)]
pub struct RetrievalTrace {
    /// The missing modality that was recovered (the bank searched).
    pub modality: Modality,
    /// Negative (least similar) retrieval, for the ranking loss.
    pub negative: bool,
    /// Batch rows \[M\].
    pub rows: Vec<usize>,
    /// Bank rows [M, n] u32.
    pub indices: Tensor,
    /// Eq. 1 similarities [M, n] f32.
    pub scores: Tensor,
}

/// The rows CAP chose as noise when purifying the recovered `modality` in one forward.
#[derive(Clone, Debug)]
pub struct CapTrace {
    /// The missing modality that was purified.
    pub modality: Modality,
    /// Purification of the negative retrieval (ranking loss).
    pub negative: bool,
    /// Batch rows \[M\].
    pub rows: Vec<usize>,
    /// Noise rows of the recovered tokens [M, k] u32 (phase 1, Eq. 5).
    pub noise_idx: Tensor,
}

/// Result of [`R2scp::forward`].
#[derive(Clone, Debug)]
pub struct Output {
    /// Answer logits [B, A] f32.
    pub logits: Tensor,
    /// Router weights alpha [B, 3] f32 (Eq. 11), columns (audio, visual, text); rows sum to 1.
    pub router_weights: Tensor,
    /// Ranking-loss logits when asked (`ForwardOptions::rank_terms`), retrieval is on
    /// and some row qualifies; else None.
    pub rank: Option<RankTerms>,
    /// One trace per retrieval made (positive and, with rank terms, negative).
    pub retrieval: Vec<RetrievalTrace>,
    /// One trace per CAP purification made (positive and, with rank terms, negative).
    pub cap: Vec<CapTrace>,
    /// Training forwards with `cap.detect_weight > 0`, retrieval and CAP on: the
    /// detection loss (scalar, unweighted) over the recovered rows whose own clip is in
    /// the bank; else None.
    pub detect_loss: Option<Tensor>,
}

/// What one forward records besides its logits.
#[derive(Default)]
struct Traces {
    retrieval: Vec<RetrievalTrace>,
    cap: Vec<CapTrace>,
    /// Per-row detection losses [R] of each recovered group (training only).
    detect: Vec<Tensor>,
}

/// Options of [`R2scp::forward_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Training mode (dropout on).
    pub train: bool,
    /// Also compute [`RankTerms`].
    pub rank_terms: bool,
}

/// h + Linear(h), Linear initialised to zero (identity at init). Maps Phi_avl(F_avl)
/// into the input space of the missing modality's expert for H_com.
#[derive(Debug, Clone)]
struct ComAdapter {
    lin: Linear,
}

impl ComAdapter {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get_with_hints((dim, dim), "weight", Init::Const(0.0))?;
        let b = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            lin: Linear::new(w, Some(b)),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x + self.lin.forward(x)?
    }
}

/// Stage-II parts that recover one missing modality: the null token sequence (no
/// retrieval; also the gate's fallback), the H_com adapter (only with `com_adapter`),
/// the retrieval head (only with retrieval) and the CAP layer.
struct Recovery {
    null: Tensor,
    com: Option<ComAdapter>,
    head: Option<RecoveryHead>,
    cap: CapLayer,
}

impl Recovery {
    fn new(len: usize, cfg: &ModelConfig, vb_null: VarBuilder, vb_cap: VarBuilder) -> Result<Self> {
        Ok(Self {
            null: vb_null.get_with_hints(
                (len, cfg.dim),
                "null",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
            com: cfg
                .com_adapter
                .then(|| ComAdapter::new(cfg.dim, vb_null.pp("com")))
                .transpose()?,
            head: cfg
                .use_retrieval
                .then(|| RecoveryHead::new(&cfg.recovery, vb_null.clone()))
                .transpose()?,
            cap: CapLayer::new(
                &CapConfig::new(cfg.dim, cfg.heads, cfg.cap.budget(cfg.k_purge, len))
                    .with_straight_through(cfg.cap.straight_through)
                    .with_detach_scoring(cfg.cap.detach_scoring)
                    .with_residual_gate(cfg.cap.residual_gate),
                vb_cap,
            )?
            .with_centered_straight_through(cfg.cap.centered_straight_through),
        })
    }
}

/// The R2ScP model. See `docs/DESIGN.md` ("Model") for every choice the paper leaves open.
///
/// Var prefixes: `expert.{audio,visual,text}.{phi,enc,head}.*` (stage I);
/// `recover.{audio,visual}.null`, `recover.{audio,visual}.com.*` (with `com_adapter`), `cap.{audio,visual}.*`, `router.*`,
/// `decoder.*` (stage II). The name of the missing modality is used in
/// `recover.*` / `cap.*` (e.g. `cap.audio` purifies recovered audio).
pub struct R2scp {
    cfg: ModelConfig,
    dims: DataDims,
    audio: AvExpert,
    visual: AvExpert,
    text: TextExpert,
    rec_audio: Recovery,
    rec_visual: Recovery,
    router_fc1: Linear,
    router_fc2: Linear,
    pool_audio: Mha,
    pool_visual: Mha,
    dec_ln: LayerNorm,
    dec_fc1: Linear,
    dec_fc2: Linear,
    drop: DropoutRng,
    frozen: AtomicBool,
    /// Detached copies of E_a, E_v used for H_com while experts are frozen.
    frozen_enc: RwLock<Option<[TransformerEncoder; 2]>>,
    /// While frozen: E_m(Phi_m(v)) of every bank row, computed once (see `bank_tokens`).
    bank_cache: RwLock<Option<BankCache>>,
}

/// Expert tokens of all bank rows, valid for one pair of banks (by key tensor id),
/// one device and one state of the expert weights (by a weight fingerprint).
struct BankCache {
    banks: (TensorId, TensorId),
    fingerprint: Vec<f32>,
    tokens: [Tensor; 2],
}

/// Rows of the batch where modality `m` is present / missing (ascending).
fn partition(missing: &[Missing], m: Modality) -> (Vec<u32>, Vec<u32>) {
    let mut present = Vec::new();
    let mut absent = Vec::new();
    for (i, x) in missing.iter().enumerate() {
        if x.is_missing(m) {
            absent.push(i as u32);
        } else {
            present.push(i as u32);
        }
    }
    (present, absent)
}

/// Stacks `parts` (tensor with rows for the given output positions) into one tensor of
/// `n` rows along dim 0: output row `positions[i]` of a part is its row i. The
/// positions of all parts must cover 0..n exactly once.
fn assemble(n: usize, parts: &[(&Tensor, &[usize])], device: &Device) -> Result<Tensor> {
    let mut perm = vec![u32::MAX; n];
    let mut offset = 0usize;
    let mut tensors = Vec::new();
    for (t, pos) in parts {
        if pos.is_empty() {
            continue;
        }
        if t.dim(0)? != pos.len() {
            crate::error::bail!(
                "assemble: a part has {} rows for {} positions",
                t.dim(0)?,
                pos.len()
            );
        }
        for (i, &p) in pos.iter().enumerate() {
            if p >= n || perm[p] != u32::MAX {
                crate::error::bail!("assemble: position {p} out of range or repeated (n = {n})");
            }
            perm[p] = (offset + i) as u32;
        }
        offset += pos.len();
        tensors.push(*t);
    }
    if let Some(p) = perm.iter().position(|&x| x == u32::MAX) {
        crate::error::bail!("assemble: output row {p} of {n} is not covered by any part");
    }
    let all = if tensors.len() == 1 {
        tensors[0].clone()
    } else {
        Tensor::cat(&tensors, 0)?
    };
    all.index_select(&index_tensor(&perm, device)?, 0)
}

fn as_usize(rows: &[u32]) -> Vec<usize> {
    rows.iter().map(|&r| r as usize).collect()
}

impl R2scp {
    /// Builds the model for data of shape `dims`. Errors name the offending size
    /// (e.g. `k_purge` larger than a modality's token count).
    pub fn new(cfg: &ModelConfig, dims: &DataDims, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let kmax = dims.la.min(dims.lv);
        if cfg.k_purge > kmax {
            crate::error::bail!(
                "R2scp: k_purge = {} exceeds min(La = {}, Lv = {}) = {kmax} tokens",
                cfg.k_purge,
                dims.la,
                dims.lv
            );
        }
        if dims.la == 0 || dims.lv == 0 || dims.lq == 0 || dims.vocab_size == 0 {
            crate::error::bail!("R2scp: data dims {dims:?} have an empty axis");
        }
        if dims.n_answers < 2 {
            crate::error::bail!("R2scp: n_answers = {}, expected >= 2", dims.n_answers);
        }
        let d = cfg.dim;
        let s = ExpertSizes {
            dim: d,
            heads: cfg.heads,
            ffn: cfg.ffn_mult * d,
            vocab: dims.vocab_size,
            answers: dims.n_answers,
        };
        let ve = vb.pp("expert");
        let audio = AvExpert::new(dims.la, dims.da, cfg.expert_layers, s, ve.pp("audio"))?;
        let visual = AvExpert::new(dims.lv, dims.dv, cfg.expert_layers, s, ve.pp("visual"))?;
        let text = TextExpert::new(dims.lq, cfg.text_layers, s, ve.pp("text"))?;
        let rec_audio = Recovery::new(
            dims.la,
            cfg,
            vb.pp("recover").pp("audio"),
            vb.pp("cap").pp("audio"),
        )?;
        let rec_visual = Recovery::new(
            dims.lv,
            cfg,
            vb.pp("recover").pp("visual"),
            vb.pp("cap").pp("visual"),
        )?;
        let vr = vb.pp("router");
        let vd = vb.pp("decoder");
        Ok(Self {
            cfg: cfg.clone(),
            dims: *dims,
            audio,
            visual,
            text,
            rec_audio,
            rec_visual,
            router_fc1: candle_nn::linear(3 * d + Self::router_stats_dim(cfg), d, vr.pp("fc1"))?,
            router_fc2: candle_nn::linear(d, 3, vr.pp("fc2"))?,
            pool_audio: Mha::new(d, cfg.heads, vd.pp("pool_audio"))?,
            pool_visual: Mha::new(d, cfg.heads, vd.pp("pool_visual"))?,
            dec_ln: LayerNorm::new(d, vd.pp("ln"))?,
            dec_fc1: candle_nn::linear(d, 2 * d, vd.pp("fc1"))?,
            dec_fc2: candle_nn::linear(2 * d, dims.n_answers, vd.pp("fc2"))?,
            drop: DropoutRng::new(cfg.seed),
            frozen: AtomicBool::new(false),
            frozen_enc: RwLock::new(None),
            bank_cache: RwLock::new(None),
        })
    }

    /// Extra router inputs: [`ROUTER_STATS`] per modality when retrieval is on and
    /// `recovery.router_stats` is set, else 0.
    fn router_stats_dim(cfg: &ModelConfig) -> usize {
        if cfg.use_retrieval && cfg.recovery.router_stats {
            2 * ROUTER_STATS
        } else {
            0
        }
    }

    /// Top-n bank rows (of `banks.get(m)`) retrieved for batch rows `rows` missing `m`,
    /// with this model's query mode; the sample's own clip is excluded. This is the
    /// search the forward makes (before aggregation).
    pub fn retrieve(
        &self,
        batch: &Batch,
        banks: &Banks,
        m: Modality,
        rows: &[u32],
        n: usize,
    ) -> Result<crate::bank::Retrieved> {
        recovery::search(self.cfg.recovery.query, banks, batch, m, rows, n, false)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The data shapes the model was built for.
    pub fn dims(&self) -> &DataDims {
        &self.dims
    }

    /// Stage II: with `frozen`, experts act as constants: expert outputs are detached,
    /// the H_com path runs a detached copy of E_miss (so no expert var ever gets a
    /// gradient, while the adapter still does) and experts run without dropout.
    /// The trainer must still leave `expert.*` vars out of the optimizer.
    pub fn set_experts_frozen(&self, frozen: bool) {
        let copies = frozen.then(|| [self.audio.enc.detached(), self.visual.enc.detached()]);
        match self.frozen_enc.write() {
            Ok(mut g) => *g = copies,
            Err(poisoned) => *poisoned.into_inner() = copies,
        }
        match self.bank_cache.write() {
            Ok(mut g) => *g = None,
            Err(poisoned) => *poisoned.into_inner() = None,
        }
        self.frozen.store(frozen, Ordering::SeqCst);
    }

    /// Sums of |w| of the expert input projections: changes when expert weights are reloaded.
    fn expert_fingerprint(&self) -> Result<Vec<f32>> {
        [&self.audio, &self.visual]
            .iter()
            .map(|e| e.phi.fingerprint())
            .collect()
    }

    /// E_m(Phi_m(values)) of the bank rows at `indices` [R, n] u32 -> [R, n, L_m, D] on
    /// `dev`. While experts are frozen the tokens of all bank rows are computed once per
    /// (banks, device, expert weights) and gathered; otherwise the expert runs on the
    /// gathered raw values (with dropout when training).
    fn bank_tokens(
        &self,
        banks: &Banks,
        m: Modality,
        indices: &Tensor,
        dev: &Device,
        train: bool,
    ) -> Result<Tensor> {
        let (r, n) = indices.dims2()?;
        let (l, d) = (self.len_of(m), self.cfg.dim);
        let mi = if m == Modality::Audio { 0 } else { 1 };
        if !self.experts_frozen() {
            let vals = banks
                .get(m)
                .gather_values(indices)?
                .to_device(dev)?
                .to_dtype(DType::F32)?;
            let (_, _, lr, draw) = vals.dims4()?;
            let h = self.expert(m).encode(
                &vals.reshape((r * n, lr, draw))?,
                &self.drop,
                self.p_expert(),
                train,
            )?;
            return h.reshape((r, n, l, d));
        }
        let key = (banks.audio.keys().id(), banks.visual.keys().id());
        let fp = self.expert_fingerprint()?;
        let cached = {
            let g = match self.bank_cache.read() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            g.as_ref()
                .filter(|c| {
                    c.banks == key && c.fingerprint == fp && c.tokens[mi].device().same_device(dev)
                })
                .map(|c| c.tokens[mi].clone())
        };
        let all = match cached {
            Some(t) => t,
            None => {
                let mut tokens = Vec::new();
                for mm in Modality::ALL {
                    let vals = banks.get(mm).values().ok_or_else(|| {
                        candle_core::Error::Msg(format!("R2scp: the {mm} bank carries no values"))
                    })?;
                    let rows = vals.dim(0)?;
                    let mut parts = Vec::new();
                    let chunk = 256;
                    for start in (0..rows).step_by(chunk) {
                        let len = chunk.min(rows - start);
                        let v = vals
                            .narrow(0, start, len)?
                            .to_device(dev)?
                            .to_dtype(DType::F32)?;
                        parts.push(self.expert(mm).encode(&v, &self.drop, 0.0, false)?.detach());
                    }
                    tokens.push(Tensor::cat(&parts, 0)?);
                }
                let t = tokens[mi].clone();
                let entry = BankCache {
                    banks: key,
                    fingerprint: fp,
                    tokens: [tokens[0].clone(), tokens[1].clone()],
                };
                match self.bank_cache.write() {
                    Ok(mut g) => *g = Some(entry),
                    Err(poisoned) => *poisoned.into_inner() = Some(entry),
                }
                t
            }
        };
        let flat = indices.flatten_all()?.to_device(dev)?;
        all.index_select(&flat, 0)?.reshape((r, n, l, d))
    }

    /// E_m for the H_com path: the detached copy while frozen (gradients reach the
    /// adapter through it but never the expert's vars), else E_m itself.
    fn com_encoder(&self, m: Modality) -> TransformerEncoder {
        let i = if m == Modality::Audio { 0 } else { 1 };
        let guard = match self.frozen_enc.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match guard.as_ref() {
            Some(c) if self.experts_frozen() => c[i].clone(),
            _ => self.expert(m).enc.clone(),
        }
    }

    /// Whether experts are frozen (see [`R2scp::set_experts_frozen`]).
    pub fn experts_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Restarts the dropout stream at `seed` (masks are a function of the seed and the
    /// number of dropout calls since). Call it e.g. with (epoch, step) for exact resume.
    pub fn set_dropout_seed(&self, seed: u64) {
        self.drop.reseed(seed);
    }

    fn expert(&self, m: Modality) -> &AvExpert {
        match m {
            Modality::Audio => &self.audio,
            Modality::Visual => &self.visual,
        }
    }

    fn recovery(&self, m: Modality) -> &Recovery {
        match m {
            Modality::Audio => &self.rec_audio,
            Modality::Visual => &self.rec_visual,
        }
    }

    fn raw(batch: &Batch, m: Modality) -> &Tensor {
        match m {
            Modality::Audio => &batch.audio,
            Modality::Visual => &batch.visual,
        }
    }

    fn len_of(&self, m: Modality) -> usize {
        match m {
            Modality::Audio => self.dims.la,
            Modality::Visual => self.dims.lv,
        }
    }

    /// Expert dropout probability: none while frozen.
    fn p_expert(&self) -> f32 {
        if self.experts_frozen() {
            0.0
        } else {
            self.cfg.dropout
        }
    }

    /// Detach an expert-only result when experts are frozen.
    fn detach_if_frozen(&self, t: Tensor) -> Tensor {
        if self.experts_frozen() {
            t.detach()
        } else {
            t
        }
    }

    fn check_batch(&self, batch: &Batch) -> Result<usize> {
        let b = batch.missing.len();
        if b == 0 {
            crate::error::bail!("R2scp: empty batch");
        }
        let d = &self.dims;
        let checks: [(&str, &Tensor, Vec<usize>); 4] = [
            ("audio", &batch.audio, vec![b, d.la, d.da]),
            ("visual", &batch.visual, vec![b, d.lv, d.dv]),
            ("audio_key", &batch.audio_key, vec![b, d.dk]),
            ("visual_key", &batch.visual_key, vec![b, d.dk]),
        ];
        // Questions are padded per batch: any width from 1 to the model's Lq.
        let lb = batch.question.dims().get(1).copied().unwrap_or(0);
        for (name, t) in [
            ("question", &batch.question),
            ("question_mask", &batch.question_mask),
        ] {
            if t.rank() != 2 || t.dims()[0] != b || t.dims()[1] != lb || lb == 0 || lb > d.lq {
                candle_core::bail!(
                    "R2scp: batch.{name} has shape {:?}, expected [{b}, 1..={}] (the same width for both)",
                    t.dims(),
                    d.lq
                );
            }
        }
        for (name, t, want) in checks.iter() {
            if t.dims() != want.as_slice() {
                crate::error::bail!(
                    "R2scp: batch.{name} has shape {:?}, expected {:?}",
                    t.dims(),
                    want
                );
            }
        }
        if batch.clip_ids.len() != b {
            crate::error::bail!(
                "R2scp: batch.clip_ids has {} entries, expected B = {b}",
                batch.clip_ids.len()
            );
        }
        Ok(b)
    }

    /// E_m(Phi_m(raw)) on the given rows only (the other rows are never read).
    fn encode_rows(&self, batch: &Batch, m: Modality, rows: &[u32], train: bool) -> Result<Tensor> {
        let dev = batch.audio.device();
        let x = Self::raw(batch, m).index_select(&index_tensor(rows, dev)?, 0)?;
        let h = self
            .expert(m)
            .encode(&x, &self.drop, self.p_expert(), train)?;
        Ok(self.detach_if_frozen(h))
    }

    /// Stage I (Eq. 10): logits of the audio, visual and text(-fused) experts.
    /// Experts never run on a missing modality's rows.
    pub fn expert_logits(&self, batch: &Batch, train: bool) -> Result<ExpertLogits> {
        let b = self.check_batch(batch)?;
        let dev = batch.audio.device().clone();
        let p = self.p_expert();
        let ht = self.detach_if_frozen(self.text.encode(
            &batch.question,
            &batch.question_mask,
            &self.drop,
            p,
            train,
        )?);
        let a_cls = self.dims.n_answers;
        let mut logits = Vec::new();
        let mut tokens = Vec::new();
        for m in Modality::ALL {
            let (present, absent) = partition(&batch.missing, m);
            let l = self.len_of(m);
            let zeros_l = Tensor::zeros((absent.len(), a_cls), DType::F32, &dev)?;
            let zeros_h = Tensor::zeros((absent.len(), l, self.cfg.dim), DType::F32, &dev)?;
            if present.is_empty() {
                logits.push(Tensor::zeros((b, a_cls), DType::F32, &dev)?);
                tokens.push(Tensor::zeros((b, l, self.cfg.dim), DType::F32, &dev)?);
                continue;
            }
            let h = self.encode_rows(batch, m, &present, train)?;
            let idx = index_tensor(&present, &dev)?;
            let q = batch.question.index_select(&idx, 0)?;
            let qm = batch.question_mask.index_select(&idx, 0)?;
            let lg = self
                .expert(m)
                .head
                .forward(&h, &q, &qm, &self.drop, p, train)?;
            let (pu, au) = (as_usize(&present), as_usize(&absent));
            logits.push(assemble(b, &[(&lg, &pu), (&zeros_l, &au)], &dev)?);
            // The fused text head must not train E_a / E_v (no cross-modal shortcut).
            tokens.push(assemble(b, &[(&h.detach(), &pu), (&zeros_h, &au)], &dev)?);
        }
        let pa = batch.present(Modality::Audio)?;
        let pv = batch.present(Modality::Visual)?;
        let av = Tensor::cat(&[&tokens[0], &tokens[1]], 1)?;
        let av_mask = Tensor::cat(
            &[
                pa.unsqueeze(1)?.repeat((1, self.dims.la))?,
                pv.unsqueeze(1)?.repeat((1, self.dims.lv))?,
            ],
            1,
        )?;
        let text = self.text.head.forward(
            &ht,
            &batch.question_mask,
            &av,
            &av_mask,
            &self.drop,
            p,
            train,
        )?;
        Ok(ExpertLogits {
            audio: logits[0].clone(),
            visual: logits[1].clone(),
            text,
            audio_present: pa,
            visual_present: pv,
        })
    }

    /// Full forward (stage II / evaluation) without ranking terms.
    pub fn forward(&self, batch: &Batch, banks: &Banks, train: bool) -> Result<Output> {
        self.forward_with(
            batch,
            banks,
            ForwardOptions {
                train,
                rank_terms: false,
            },
        )
    }

    /// Recovers modality `m` (missing) for batch `rows`: H_miss from CMR (Eq. 4, or the
    /// safe variants of `recovery`) or the null tokens, then CAP if on. `h_avl`
    /// [M, L_avl, D] are the available modality's expert tokens of these rows, `ht`
    /// [M, Lq, D] / `qm` [M, Lq] their question. Returns H [M, L_m, D] and, with
    /// retrieval, the router statistics [M, ROUTER_STATS].
    #[allow(clippy::too_many_arguments)]
    fn recover(
        &self,
        batch: &Batch,
        banks: &Banks,
        m: Modality,
        rows: &[u32],
        h_avl: &Tensor,
        ht: &Tensor,
        qm: &Tensor,
        negative: bool,
        train: bool,
        traces: &mut Traces,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dev = batch.audio.device();
        let mrows = rows.len();
        let d = self.cfg.dim;
        let l = self.len_of(m);
        let idx = index_tensor(rows, dev)?;
        let rec = self.recovery(m);
        let (h_miss, stats, mixed) = match rec.head.as_ref() {
            Some(head) => {
                let n = self.cfg.n_retrieved;
                // The query comes from the AVAILABLE modality only (key or raw tokens).
                let ret =
                    recovery::search(self.cfg.recovery.query, banks, batch, m, rows, n, negative)?;
                let h =
                    self.detach_if_frozen(self.bank_tokens(banks, m, &ret.indices, dev, train)?);
                // Eq. 4 ([M, n, L, D] -> [M, L, D]) or its safe variants.
                let c = head.combine(&h, &ret.scores, &rec.null)?;
                traces.retrieval.push(RetrievalTrace {
                    modality: m,
                    negative,
                    rows: as_usize(rows),
                    indices: ret.indices.to_device(dev)?,
                    scores: ret.scores.to_device(dev)?,
                });
                (c.h, Some(c.router_stats), Some(c.mixed))
            }
            None => (
                rec.null
                    .unsqueeze(0)?
                    .broadcast_as((mrows, l, d))?
                    .contiguous()?,
                None,
                None,
            ),
        };
        if !self.cfg.use_cap {
            return Ok((h_miss, stats));
        }
        // H_com = E_miss(A(Phi_avl(F_avl))): the missing modality's expert applied to
        // the available modality's encoded features through the trainable adapter A.
        let avl = m.other();
        let f_avl = self
            .expert(avl)
            .phi
            .forward(&Self::raw(batch, avl).index_select(&idx, 0)?)?;
        let f_avl = self.detach_if_frozen(f_avl);
        let f_avl = match rec.com.as_ref() {
            Some(a) => a.forward(&f_avl)?,
            None => f_avl,
        };
        let h_com =
            self.com_encoder(m)
                .forward(&f_avl, None, &self.drop, self.p_expert(), train)?;
        // `PaperInputs::h_avl` is the sequence phase 1 scores against (its mean is the anchor).
        let anchor = match self.cfg.cap.anchor {
            CapAnchor::Available => h_avl,
            CapAnchor::Common => &h_com,
        };
        let out = rec.cap.forward_paper(&PaperInputs {
            h_miss: &h_miss,
            h_avl: anchor,
            avl_mask: None,
            h_com: &h_com,
            com_mask: None,
            q: ht,
            q_mask: Some(qm),
        })?;
        let weight = self.cfg.cap.detect_weight;
        if let (true, false, true, Some(mixed)) = (train, negative, weight > 0.0, mixed.as_ref()) {
            if let Some(l) = self.detect_loss(banks, m, batch, rows, mixed, &out.delta, train)? {
                traces.detect.push(l);
            }
        }
        traces.cap.push(CapTrace {
            modality: m,
            negative,
            rows: as_usize(rows),
            noise_idx: out.noise_idx.clone(),
        });
        Ok((out.purified, stats))
    }

    /// Detection loss of the recovered rows `rows` missing `m` whose own clip is in the
    /// bank: per row, the k tokens of `mixed` [M, L, D] (the retrieved combination before
    /// the gate) farthest (1 - cosine) from the clip's real expert tokens are the noise;
    /// the loss is the cross-entropy between the uniform distribution over them and
    /// softmax(delta / [`Self::DETECT_TAU`]) over the row. Returns the per-row losses [R]
    /// (None when no row's clip is in the bank).
    #[allow(clippy::too_many_arguments)]
    fn detect_loss(
        &self,
        banks: &Banks,
        m: Modality,
        batch: &Batch,
        rows: &[u32],
        mixed: &Tensor,
        delta: &Tensor,
        train: bool,
    ) -> Result<Option<Tensor>> {
        let dev = batch.audio.device();
        let bank = banks.get(m);
        let mut pos = Vec::new();
        let mut brows = Vec::new();
        for (p, &r) in rows.iter().enumerate() {
            if let Some(br) = bank.row_of(batch.clip_ids[r as usize]) {
                pos.push(p as u32);
                brows.push(br as u32);
            }
        }
        if pos.is_empty() {
            return Ok(None);
        }
        let k = self.cfg.cap.budget(self.cfg.k_purge, self.len_of(m));
        let n = brows.len();
        let bidx = Tensor::from_vec(brows, (n, 1), bank.keys().device())?;
        let gt = self
            .bank_tokens(banks, m, &bidx, dev, train)?
            .squeeze(1)?
            .detach(); // [R, L, D]
        let pidx = index_tensor(&pos, dev)?;
        let rec = mixed.detach().index_select(&pidx, 0)?;
        let dot = (&rec * &gt)?.sum(D::Minus1)?;
        let norms = (rec.sqr()?.sum(D::Minus1)?.sqrt()? * gt.sqr()?.sum(D::Minus1)?.sqrt()?)?;
        let dev_tok = (1.0 - (dot / (norms + 1e-8)?)?)?; // [R, L]
        let (_, noisy) = crate::cap::topk_rows(&dev_tok, k)?;
        let target = Tensor::zeros(dev_tok.dims(), DType::F32, dev)?.scatter_add(
            &noisy,
            &Tensor::full(1.0 / k as f32, (n, k), dev)?,
            1,
        )?;
        let logp = candle_nn::ops::log_softmax(
            &(delta.index_select(&pidx, 0)?.to_dtype(DType::F32)? / Self::DETECT_TAU)?,
            D::Minus1,
        )?;
        Ok(Some((target * logp)?.sum(D::Minus1)?.neg()?))
    }

    /// Temperature of the detection loss's softmax over delta (a dissonance is in [0, 2];
    /// rows of recovered tokens differ by tenths).
    pub const DETECT_TAU: f64 = 0.1;

    /// Router (Eq. 11) + Z_joint (Eq. 12) + decoder on assembled expert tokens.
    /// ha [B, La, D], hv [B, Lv, D], ht [B, Lq, D], qm [B, Lq] -> (logits [B, A], alpha [B, 3]).
    /// `stats` [B, 2 ROUTER_STATS] (audio's then visual's retrieval statistics, zeros
    /// where a modality is real) is appended to the router input when the router takes it.
    fn decode(
        &self,
        ha: &Tensor,
        hv: &Tensor,
        ht: &Tensor,
        qm: &Tensor,
        stats: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let s_t = masked_mean(ht, qm)?; // [B, D]
        let q = s_t.unsqueeze(1)?;
        let s_a = self.pool_audio.forward(&q, ha, None)?.squeeze(1)?;
        let s_v = self.pool_visual.forward(&q, hv, None)?.squeeze(1)?;
        let r_in = if Self::router_stats_dim(&self.cfg) > 0 {
            Tensor::cat(&[&ha.mean(1)?, &hv.mean(1)?, &s_t, stats], 1)?
        } else {
            Tensor::cat(&[&ha.mean(1)?, &hv.mean(1)?, &s_t], 1)?
        };
        let g = self
            .router_fc2
            .forward(&self.router_fc1.forward(&r_in)?.gelu()?)?;
        let alpha = candle_nn::ops::softmax(&g, D::Minus1)?; // [B, 3]
        let z = (s_a.broadcast_mul(&alpha.narrow(1, 0, 1)?)?
            + s_v.broadcast_mul(&alpha.narrow(1, 1, 1)?)?
            + s_t.broadcast_mul(&alpha.narrow(1, 2, 1)?)?)?;
        let h = self.dec_fc1.forward(&self.dec_ln.forward(&z)?)?.gelu()?;
        let h = self.drop.apply(&h, self.cfg.dropout, train)?;
        Ok((self.dec_fc2.forward(&h)?, alpha))
    }

    /// Full forward. Per-sample `batch.missing` decides, for each modality, which rows
    /// run the real expert and which are recovered (retrieval and/or CAP per config, or
    /// the null tokens); a missing modality's features and key are never read.
    /// `banks` must be built from the training split; they are only searched when
    /// retrieval is on.
    ///
    /// With `recovery.complete_ensemble` (retrieval on, evaluation only), the logits of a
    /// complete row are log of the mean answer probabilities of three forwards: the real
    /// pair, audio recovered and visual recovered; every other row and every other output
    /// (router weights, traces) are those of the ordinary forward.
    pub fn forward_with(
        &self,
        batch: &Batch,
        banks: &Banks,
        opts: ForwardOptions,
    ) -> Result<Output> {
        let out = self.forward_once(batch, banks, opts)?;
        let complete: Vec<usize> = (0..batch.missing.len())
            .filter(|&i| batch.missing[i] == Missing::None)
            .collect();
        let ensemble = self.cfg.use_retrieval && self.cfg.recovery.complete_ensemble;
        if opts.train || !ensemble || complete.is_empty() {
            return Ok(out);
        }
        let views = [Missing::Audio, Missing::Visual];
        let mut probs = candle_nn::ops::softmax(&out.logits, D::Minus1)?;
        for v in views {
            let mut recovered = batch.clone();
            for &i in &complete {
                recovered.missing[i] = v;
            }
            let o = self.forward_once(&recovered, banks, ForwardOptions::default())?;
            probs = (probs + candle_nn::ops::softmax(&o.logits, D::Minus1)?)?;
        }
        // The floor keeps log finite where every view's probability underflowed to 0.
        let mixed = ((probs / (views.len() + 1) as f64)? + 1e-30)?.log()?;
        let flag: Vec<f32> = batch
            .missing
            .iter()
            .map(|m| f32::from(u8::from(*m == Missing::None)))
            .collect();
        let c = Tensor::from_vec(flag, (batch.missing.len(), 1), out.logits.device())?;
        let logits =
            (out.logits.broadcast_mul(&c.affine(-1.0, 1.0)?)? + mixed.broadcast_mul(&c)?)?;
        Ok(Output { logits, ..out })
    }

    /// One forward of `batch` as its `missing` says (see [`R2scp::forward_with`]).
    fn forward_once(&self, batch: &Batch, banks: &Banks, opts: ForwardOptions) -> Result<Output> {
        let b = self.check_batch(batch)?;
        let train = opts.train;
        let dev = batch.audio.device().clone();
        let qmask = &batch.question_mask;
        let ht = self.detach_if_frozen(self.text.encode(
            &batch.question,
            qmask,
            &self.drop,
            self.p_expert(),
            train,
        )?);
        let (a_present, a_absent) = partition(&batch.missing, Modality::Audio);
        let (v_present, v_absent) = partition(&batch.missing, Modality::Visual);
        if let Some(r) = a_absent.iter().find(|r| v_absent.contains(r)) {
            crate::error::bail!("R2scp: sample {r} misses both modalities");
        }
        let real = [
            (!a_present.is_empty())
                .then(|| self.encode_rows(batch, Modality::Audio, &a_present, train))
                .transpose()?,
            (!v_present.is_empty())
                .then(|| self.encode_rows(batch, Modality::Visual, &v_present, train))
                .transpose()?,
        ];
        let present = [&a_present, &v_present];
        let absent = [&a_absent, &v_absent];
        let mut traces = Traces::default();
        let mut full = Vec::new();
        let mut stats = Vec::new();
        for (mi, m) in Modality::ALL.into_iter().enumerate() {
            let oi = 1 - mi;
            let rec = if absent[mi].is_empty() {
                None
            } else {
                Some(self.recover_rows(
                    batch,
                    banks,
                    m,
                    absent[mi],
                    real[oi].as_ref(),
                    present[oi],
                    &ht,
                    false,
                    train,
                    &mut traces,
                )?)
            };
            let pu = as_usize(present[mi]);
            let au = as_usize(absent[mi]);
            let mut parts: Vec<(&Tensor, &[usize])> = Vec::new();
            if let Some(r) = real[mi].as_ref() {
                parts.push((r, &pu));
            }
            if let Some((r, _)) = rec.as_ref() {
                parts.push((r, &au));
            }
            full.push(assemble(b, &parts, &dev)?);
            stats.push(Self::assemble_stats(
                b,
                rec.as_ref().and_then(|r| r.1.as_ref()),
                &au,
                &dev,
            )?);
        }
        let stats = Tensor::cat(&stats, 1)?;
        let detect_loss = match traces.detect.len() {
            0 => None,
            1 => Some(traces.detect[0].mean_all()?),
            _ => Some(Tensor::cat(&traces.detect, 0)?.mean_all()?),
        };
        let (logits, alpha) = self.decode(&full[0], &full[1], &ht, qmask, &stats, train)?;
        let rank = if opts.rank_terms && self.cfg.use_retrieval {
            self.rank_terms(
                batch,
                banks,
                &full,
                &stats,
                &ht,
                &real,
                &logits,
                train,
                &mut traces,
            )?
        } else {
            None
        };
        Ok(Output {
            logits,
            router_weights: alpha,
            rank,
            retrieval: traces.retrieval,
            cap: traces.cap,
            detect_loss,
        })
    }

    /// Router statistics of one modality for all `b` rows: `rec` [R, ROUTER_STATS] at
    /// rows `pos`, zeros elsewhere (real modality, or no retrieval) -> [b, ROUTER_STATS].
    fn assemble_stats(
        b: usize,
        rec: Option<&Tensor>,
        pos: &[usize],
        dev: &Device,
    ) -> Result<Tensor> {
        let Some(r) = rec else {
            return Tensor::zeros((b, ROUTER_STATS), DType::F32, dev);
        };
        let keep: Vec<usize> = (0..b).filter(|i| !pos.contains(i)).collect();
        let zeros = Tensor::zeros((keep.len(), ROUTER_STATS), DType::F32, dev)?;
        assemble(b, &[(r, pos), (&zeros, &keep)], dev)
    }

    /// [`R2scp::recover`] for batch rows `rows` missing `m`, picking their available
    /// tokens out of `real_other` (the other modality's expert tokens of `other_rows`).
    #[allow(clippy::too_many_arguments)]
    fn recover_rows(
        &self,
        batch: &Batch,
        banks: &Banks,
        m: Modality,
        rows: &[u32],
        real_other: Option<&Tensor>,
        other_rows: &[u32],
        ht: &Tensor,
        negative: bool,
        train: bool,
        traces: &mut Traces,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dev = batch.audio.device();
        let real_other = real_other.ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "R2scp: rows {rows:?} miss {m} but no row has the other modality"
            ))
        })?;
        let pos: Vec<u32> = rows
            .iter()
            .map(|r| {
                other_rows.binary_search(r).map(|p| p as u32).map_err(|_| {
                    candle_core::Error::Msg(format!("R2scp: sample {r} misses both modalities"))
                })
            })
            .collect::<Result<_>>()?;
        let h_avl = real_other.index_select(&index_tensor(&pos, dev)?, 0)?;
        let idx = index_tensor(rows, dev)?;
        let ht_r = ht.index_select(&idx, 0)?;
        let qm_r = batch.question_mask.index_select(&idx, 0)?;
        self.recover(
            batch, banks, m, rows, &h_avl, &ht_r, &qm_r, negative, train, traces,
        )
    }

    /// Ranking-loss logits (Eq. 13-15) on rows with a missing modality whose own clip
    /// is in that modality's bank (its ground truth).
    #[allow(clippy::too_many_arguments)]
    fn rank_terms(
        &self,
        batch: &Batch,
        banks: &Banks,
        full: &[Tensor],
        stats: &Tensor,
        ht: &Tensor,
        real: &[Option<Tensor>; 2],
        logits: &Tensor,
        train: bool,
        traces: &mut Traces,
    ) -> Result<Option<RankTerms>> {
        let dev = batch.audio.device().clone();
        // Rows (ascending) that qualify, and per modality (row, bank row of its own clip).
        let mut rows = Vec::new();
        let mut per_mod: [Vec<(u32, u32)>; 2] = [Vec::new(), Vec::new()];
        for (i, x) in batch.missing.iter().enumerate() {
            if let Some(m) = x.modality() {
                let mi = if m == Modality::Audio { 0 } else { 1 };
                if let Some(br) = banks.get(m).row_of(batch.clip_ids[i]) {
                    rows.push(i);
                    per_mod[mi].push((i as u32, br as u32));
                }
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let r = rows.len();
        let rows_u: Vec<u32> = rows.iter().map(|&x| x as u32).collect();
        let rows_t = index_tensor(&rows_u, &dev)?;
        let pos_in_r = |row: u32| rows.binary_search(&(row as usize)).unwrap_or(usize::MAX);
        let mut gt_full = Vec::new();
        let mut neg_full = Vec::new();
        let mut gt_stats = Vec::new();
        let mut neg_stats = Vec::new();
        for (mi, m) in Modality::ALL.into_iter().enumerate() {
            let base = full[mi].index_select(&rows_t, 0)?; // rows where m is real or recovered
            let base_stats = stats
                .narrow(1, mi * ROUTER_STATS, ROUTER_STATS)?
                .contiguous()?
                .index_select(&rows_t, 0)?;
            let sel = &per_mod[mi];
            if sel.is_empty() {
                gt_full.push(base.clone());
                neg_full.push(base);
                gt_stats.push(base_stats.clone());
                neg_stats.push(base_stats);
                continue;
            }
            let sel_rows: Vec<u32> = sel.iter().map(|x| x.0).collect();
            let sel_pos: Vec<usize> = sel_rows.iter().map(|&x| pos_in_r(x)).collect();
            let keep_pos: Vec<usize> = (0..r).filter(|p| !sel_pos.contains(p)).collect();
            let keep = if keep_pos.is_empty() {
                None
            } else {
                let kp: Vec<u32> = keep_pos.iter().map(|&p| p as u32).collect();
                Some(base.index_select(&index_tensor(&kp, &dev)?, 0)?)
            };
            // Ground truth: the bank row of the sample's own clip through Phi_m / E_m.
            let bank = banks.get(m);
            let brows: Vec<u32> = sel.iter().map(|x| x.1).collect();
            let bidx = Tensor::from_vec(brows.clone(), (brows.len(), 1), bank.keys().device())?;
            let gt =
                self.detach_if_frozen(self.bank_tokens(banks, m, &bidx, &dev, train)?.squeeze(1)?);
            let oi = 1 - mi;
            let (other_present, _) = partition(&batch.missing, m.other());
            let (neg, neg_st) = self.recover_rows(
                batch,
                banks,
                m,
                &sel_rows,
                real[oi].as_ref(),
                &other_present,
                ht,
                true,
                train,
                traces,
            )?;
            let mut gparts: Vec<(&Tensor, &[usize])> = vec![(&gt, &sel_pos)];
            let mut nparts: Vec<(&Tensor, &[usize])> = vec![(&neg, &sel_pos)];
            if let Some(k) = keep.as_ref() {
                gparts.push((k, &keep_pos));
                nparts.push((k, &keep_pos));
            }
            gt_full.push(assemble(r, &gparts, &dev)?);
            neg_full.push(assemble(r, &nparts, &dev)?);
            // The ground truth is a real clip: its statistics are a real modality's (zeros).
            let keep_st: Vec<u32> = keep_pos.iter().map(|&p| p as u32).collect();
            let kst = (!keep_st.is_empty())
                .then(|| base_stats.index_select(&index_tensor(&keep_st, &dev)?, 0))
                .transpose()?;
            let zeros = Tensor::zeros((sel_pos.len(), ROUTER_STATS), DType::F32, &dev)?;
            let neg_st = match neg_st {
                Some(t) => t,
                None => zeros.clone(),
            };
            let mut gs: Vec<(&Tensor, &[usize])> = vec![(&zeros, &sel_pos)];
            let mut ns: Vec<(&Tensor, &[usize])> = vec![(&neg_st, &sel_pos)];
            if let Some(k) = kst.as_ref() {
                gs.push((k, &keep_pos));
                ns.push((k, &keep_pos));
            }
            gt_stats.push(assemble(r, &gs, &dev)?);
            neg_stats.push(assemble(r, &ns, &dev)?);
        }
        let ht_r = ht.index_select(&rows_t, 0)?;
        let qm_r = batch.question_mask.index_select(&rows_t, 0)?;
        let gt_stats = Tensor::cat(&gt_stats, 1)?;
        let neg_stats = Tensor::cat(&neg_stats, 1)?;
        let (logits_gt, _) =
            self.decode(&gt_full[0], &gt_full[1], &ht_r, &qm_r, &gt_stats, train)?;
        let (logits_neg, _) =
            self.decode(&neg_full[0], &neg_full[1], &ht_r, &qm_r, &neg_stats, train)?;
        Ok(Some(RankTerms {
            rows,
            rows_t: rows_t.clone(),
            logits_gt,
            logits_pos: logits.index_select(&rows_t, 0)?,
            logits_neg,
        }))
    }
}
