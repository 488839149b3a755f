//! [`ModelConfig`]: every size and switch of the R2ScP model (serde, TOML-friendly).

use serde::{Deserialize, Serialize};

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
    /// token counts of both modalities.
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
        }
    }
}

impl ModelConfig {
    /// Checks the sizes that do not depend on the data.
    pub fn validate(&self) -> candle_core::Result<()> {
        if self.dim == 0 || self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
            candle_core::bail!(
                "ModelConfig: dim = {} must be a positive multiple of heads = {}",
                self.dim,
                self.heads
            );
        }
        if self.expert_layers == 0 || self.text_layers == 0 || self.ffn_mult == 0 {
            candle_core::bail!(
                "ModelConfig: expert_layers = {}, text_layers = {}, ffn_mult = {} must all be >= 1",
                self.expert_layers,
                self.text_layers,
                self.ffn_mult
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            candle_core::bail!("ModelConfig: dropout = {} must be in [0, 1)", self.dropout);
        }
        if self.n_retrieved == 0 {
            candle_core::bail!("ModelConfig: n_retrieved = 0, expected >= 1");
        }
        if self.k_purge == 0 {
            candle_core::bail!("ModelConfig: k_purge = 0, expected >= 1");
        }
        Ok(())
    }
}
