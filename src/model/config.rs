//! [`ModelConfig`]: every size and switch of the R2ScP model (serde, TOML-friendly).

use serde::{Deserialize, Serialize};

/// Which bank keys CMR compares a query with (see `docs/DESIGN.md`, "Safe retrieval").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetrievalQuery {
    /// The paper's cross-modal search (Eq. 1): the available modality's unified key
    /// against the MISSING modality's unified keys of the bank clips.
    CrossKey,
    /// The available modality's unified key against the SAME modality's keys of the
    /// bank clips; the missing modality of the clips found is borrowed.
    SameKey,
    /// The available modality's raw tokens (flattened, standardised per feature with the
    /// bank's statistics) against the same of the bank clips; the missing modality of
    /// the clips found is borrowed.
    SameFeatures,
    /// Both of the above at once: the similarity is the mean of the unified-key cosine
    /// and the standardised-feature cosine (each part unit-normalised, then concatenated).
    SameKeyAndFeatures,
}

/// How the n retrieved candidates become one token sequence H_miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// The paper's Eq. 4: plain mean over the n candidates.
    Mean,
    /// Weights softmax(S_j / tau) of the candidates' similarities, tau learned per
    /// missing modality (`recover.{m}.log_tau`).
    Softmax,
}

/// How retrieval-based recovery guards against wrong neighbours. Only used with
/// `use_retrieval`; [`RecoveryConfig::paper`] is the paper's plain version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecoveryConfig {
    /// What the query is compared with.
    pub query: RetrievalQuery,
    /// How the n candidates are combined.
    pub aggregate: Aggregate,
    /// Reliability gate: H_miss = g H_retrieved + (1 - g) null, with g in (0, 1) per sample
    /// from the retrieval statistics (`recover.{m}.gate.*`); g -> 0 is the no-retrieval model.
    pub gate: bool,
    /// The router also sees, per modality, whether it was recovered and the retrieval
    /// statistics, so it can down-weight a doubtful recovery per sample.
    pub router_stats: bool,
    /// In evaluation, a complete sample is also answered with each modality in turn
    /// recovered as if it were missing, and its answer probabilities are the mean of the
    /// three forwards (the real pair, audio recovered, visual recovered). Training is
    /// unchanged: the recovered views are the paths the missing samples train.
    pub complete_ensemble: bool,
}

impl RecoveryConfig {
    /// The paper's plain CMR: cross-modal key search, mean of Eq. 4, nothing else.
    pub fn paper() -> Self {
        Self {
            query: RetrievalQuery::CrossKey,
            aggregate: Aggregate::Mean,
            gate: false,
            router_stats: false,
            complete_ensemble: false,
        }
    }

    /// True when this is exactly [`RecoveryConfig::paper`].
    pub fn is_paper(&self) -> bool {
        *self == Self::paper()
    }
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            query: RetrievalQuery::SameKeyAndFeatures,
            aggregate: Aggregate::Softmax,
            gate: true,
            router_stats: true,
            complete_ensemble: true,
        }
    }
}

/// CAP's switches in the model (`[model.cap]`); sizes come from [`ModelConfig`]
/// (`dim`, `heads`, `k_purge`). [`CapSettings::paper`] is the paper's Eq. 5-8 as this crate
/// first implemented them (`--paper-cap`). The default scores recovered tokens against
/// H_com's mean, trains `W_proj` with the detection loss only (no straight-through gate,
/// detached scoring) and replaces at most a quarter of a sequence; the measurements behind
/// it are in `docs/DESIGN.md` ("CAP that finds the noise").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapSettings {
    /// The straight-through gate of the layer (`CapConfig::straight_through`).
    pub straight_through: bool,
    /// Phase 1 scores detached inputs (`CapConfig::detach_scoring`).
    pub detach_scoring: bool,
    /// The layer's learned residual gate (`CapConfig::residual_gate`).
    pub residual_gate: bool,
    /// Straight-through gradient taken relative to the row mean (experiment switch).
    pub centered_straight_through: bool,
    /// Weight of the detection loss (0 = off): on training rows whose own clip is in the
    /// bank, the recovered tokens farthest from the clip's real tokens are the noise CAP
    /// should find, and a listwise cross-entropy pulls `delta`'s softmax towards them.
    pub detect_weight: f64,
    /// At most this share of a recovered sequence is replaced: the layer purifying a
    /// modality of L tokens uses k = min(`k_purge`, max(1, floor(L * share))). 1 = always
    /// `k_purge` (the paper). The paper's budget, k = 5 of about 60 tokens, replaces 8%;
    /// k = 2 of UCI's 4 audio tokens would replace half of what retrieval found.
    pub max_purge_share: f64,
    /// What phase 1 scores the recovered tokens against (see [`CapAnchor`]).
    pub anchor: CapAnchor,
}

/// The context phase 1 of the model's CAP compares recovered tokens with (a dissonance is
/// 1 - cosine against this sequence's mean).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CapAnchor {
    /// The mean of the available expert's tokens H_avl (the paper's Eq. 5): another
    /// expert's space than the recovered tokens, which no loss aligns with theirs.
    Available,
    /// The mean of H_com, the available modality encoded by the missing modality's expert
    /// (through the adapter): the recovered tokens' own space. The default.
    #[default]
    Common,
}

impl CapSettings {
    /// The paper's Eq. 5-8 as first implemented here (hard replacement, dissonance against
    /// H_avl, straight-through gate, scoring gradients into the inputs, no detection loss).
    pub fn paper() -> Self {
        Self {
            straight_through: true,
            detach_scoring: false,
            residual_gate: false,
            centered_straight_through: false,
            detect_weight: 0.0,
            max_purge_share: 1.0,
            anchor: CapAnchor::Available,
        }
    }

    /// The purification budget for a sequence of `len` tokens (see
    /// [`CapSettings::max_purge_share`]).
    pub fn budget(&self, k_purge: usize, len: usize) -> usize {
        let cap = ((len as f64 * self.max_purge_share).floor() as usize).max(1);
        k_purge.min(cap)
    }

    /// True when this is exactly [`CapSettings::paper`].
    pub fn is_paper(&self) -> bool {
        *self == Self::paper()
    }
}

impl Default for CapSettings {
    fn default() -> Self {
        Self {
            straight_through: false,
            detach_scoring: true,
            residual_gate: false,
            centered_straight_through: false,
            detect_weight: 1.0,
            max_purge_share: 0.25,
            anchor: CapAnchor::Common,
        }
    }
}

/// Model hyper-parameters. Every field has a default (`#[serde(default)]`), so a
/// TOML table may name only what it changes. Defaults are sized for the built-in
/// synthetic data set on 2 CPU cores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Hidden width D shared by all experts, CAP, router and decoder.
    pub dim: usize,
    /// Attention heads in experts, poolers and CAP (must divide `dim`).
    pub heads: usize,
    /// Transformer layers in the audio and visual experts E_a, E_v.
    pub expert_layers: usize,
    /// Transformer layers in the text expert E_t.
    pub text_layers: usize,
    /// FFN hidden width = `ffn_mult * dim`.
    pub ffn_mult: usize,
    /// Dropout probability (experts while they train, decoder, heads).
    pub dropout: f32,
    /// n: candidates retrieved per missing modality (CMR, Eq. 4).
    pub n_retrieved: usize,
    /// k: CAP purification budget (tokens replaced, Eq. 5/7); must be <= the
    /// token counts of both modalities. Each modality's layer uses
    /// `cap.budget(k_purge, L)`, at most `cap.max_purge_share` of its L tokens.
    pub k_purge: usize,
    /// CMR on: a missing modality is recovered from retrieved real features;
    /// off: it is a learned null token sequence.
    pub use_retrieval: bool,
    /// CAP on: the recovered (or null) tokens are purified by `CapLayer`.
    pub use_cap: bool,
    /// H_com adapter on: H_com = E_miss(A(Phi_avl(x_avl))) with the trainable residual
    /// adapter A (identity at init); off: H_com = E_miss(Phi_avl(x_avl)) exactly as Eq. 6.
    pub com_adapter: bool,
    /// Seed of the dropout stream (see `R2scp::set_dropout_seed`).
    pub seed: u64,
    /// Safeguards of retrieval-based recovery (`[model.recovery]`); the paper's plain
    /// version is [`RecoveryConfig::paper`].
    pub recovery: RecoveryConfig,
    /// CAP's switches (`[model.cap]`); [`CapSettings::paper`] is the paper's version.
    pub cap: CapSettings,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dim: 64,
            heads: 4,
            expert_layers: 2,
            text_layers: 1,
            ffn_mult: 2,
            dropout: 0.1,
            n_retrieved: 3,
            k_purge: 2,
            use_retrieval: true,
            use_cap: true,
            com_adapter: false,
            seed: 0,
            recovery: RecoveryConfig::default(),
            cap: CapSettings::default(),
        }
    }
}

impl ModelConfig {
    /// Checks the sizes that do not depend on the data.
    pub fn validate(&self) -> candle_core::Result<()> {
        if self.dim == 0 || self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
            crate::error::bail!(
                "ModelConfig: dim = {} must be a positive multiple of heads = {}",
                self.dim,
                self.heads
            );
        }
        if self.expert_layers == 0 || self.text_layers == 0 || self.ffn_mult == 0 {
            crate::error::bail!(
                "ModelConfig: expert_layers = {}, text_layers = {}, ffn_mult = {} must all be >= 1",
                self.expert_layers,
                self.text_layers,
                self.ffn_mult
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            crate::error::bail!("ModelConfig: dropout = {} must be in [0, 1)", self.dropout);
        }
        if self.n_retrieved == 0 {
            crate::error::bail!("ModelConfig: n_retrieved = 0, expected >= 1");
        }
        if !(self.cap.detect_weight.is_finite() && self.cap.detect_weight >= 0.0) {
            candle_core::bail!(
                "ModelConfig: cap.detect_weight = {}, expected a finite value >= 0",
                self.cap.detect_weight
            );
        }
        if !(self.cap.max_purge_share > 0.0 && self.cap.max_purge_share <= 1.0) {
            candle_core::bail!(
                "ModelConfig: cap.max_purge_share = {}, expected a share in (0, 1]",
                self.cap.max_purge_share
            );
        }
        if self.k_purge == 0 {
            crate::error::bail!("ModelConfig: k_purge = 0, expected >= 1");
        }
        Ok(())
    }
}
